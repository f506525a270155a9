//! `nvseal rpc`: one JSON-RPC call on the control socket, or (`--watch`) a progress display
//! of the deep rekeys that run.

use clap::Args;
use serde_json::Value;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use nvseal::rpc::client::{
    self, ClientOptions, EXIT_CONNECTION, EXIT_OK, EXIT_RPC_ERROR, EXIT_USAGE,
};

#[derive(Args)]
#[command(after_help = "Examples:\n  \
    nvseal rpc rpc.methods\n  \
    nvseal rpc subsystems.list\n  \
    nvseal rpc keys.status\n  \
    nvseal rpc kms.status\n  \
    nvseal rpc rekey.shallow '{\"provider\":\"kms-b\"}'\n  \
    nvseal rpc rekey.deep '{\"namespace\":\"vol0\",\"rate_mib_s\":500}'\n  \
    nvseal rpc rekey.status --watch\n  \
    nvseal rpc rekey.pause '{\"namespace\":\"vol0\"}'\n\n\
    Exit codes: 0 result printed, 1 JSON-RPC error (message on stderr; with --watch: a rekey\n\
    failed), 2 params are not JSON, 3 cannot reach the socket.")]
pub struct RpcArgs {
    /// Control socket of the running `nvseal serve` (its `rpc.socket_path`).
    #[arg(short, long, env = "NVSEAL_RPC_SOCKET", default_value = nvseal::rpc::config::DEFAULT_SOCKET_PATH)]
    pub socket: PathBuf,
    /// Method name (`rpc.methods` lists them with the role each needs).
    pub method: String,
    /// Parameters as one JSON object or array.
    pub params: Option<String>,
    /// With `rekey.status`: show a progress bar per deep rekey, refreshed every --interval-s,
    /// until none is running. On a terminal the bars redraw in place; otherwise one line per
    /// namespace and refresh is printed (for logs and scripts).
    #[arg(long)]
    pub watch: bool,
    /// Refresh period of --watch in seconds.
    #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
    pub interval_s: f64,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if !(0.1..=3600.0).contains(&v) {
        return Err("must be between 0.1 and 3600 seconds".into());
    }
    Ok(v)
}

pub fn run(a: RpcArgs) -> ExitCode {
    if a.watch {
        if a.method != "rekey.status" {
            eprintln!("nvseal rpc: --watch is only for rekey.status");
            return ExitCode::from(EXIT_USAGE);
        }
        return ExitCode::from(watch(&a));
    }
    client::cli_main(&a.socket, &a.method, a.params.as_deref())
}

/// One line of progress for a `rekey.status` entry.
pub fn progress_line(r: &Value) -> String {
    let f = |k: &str| r.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let pct = f("percent").clamp(0.0, 100.0);
    let width = 30usize;
    let full = ((pct / 100.0) * width as f64).round() as usize;
    let bar: String = "#".repeat(full.min(width)) + &"-".repeat(width - full.min(width));
    let eta = match r.get("eta_s").and_then(Value::as_u64) {
        Some(s) => format!("ETA {}h{:02}m{:02}s", s / 3600, (s / 60) % 60, s % 60),
        None => "ETA -".into(),
    };
    let mut line = format!(
        "{:<16} [{bar}] {pct:6.2}% {:>9} {:>9.1} MiB/s {eta}  watermark {}/{}",
        r.get("ns_id").and_then(Value::as_str).unwrap_or("?"),
        r.get("state").and_then(Value::as_str).unwrap_or("?"),
        f("mib_s"),
        r.get("watermark_blocks")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        r.get("data_blocks").and_then(Value::as_u64).unwrap_or(0),
    );
    if let Some(e) = r.get("error").and_then(Value::as_str) {
        line.push_str(&format!("  error: {e}"));
    }
    line
}

fn watch(a: &RpcArgs) -> u8 {
    let params = match a
        .params
        .as_deref()
        .map(serde_json::from_str::<Value>)
        .transpose()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("nvseal rpc: params are not valid JSON: {e}");
            return EXIT_USAGE;
        }
    };
    let tty = std::io::stdout().is_terminal();
    let mut drawn = 0usize;
    let opts = ClientOptions::default();
    loop {
        let v = match client::call_with(&a.socket, &a.method, params.clone(), &opts) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("nvseal rpc: {e}");
                return match e {
                    client::ClientError::Rpc { .. } => EXIT_RPC_ERROR,
                    _ => EXIT_CONNECTION,
                };
            }
        };
        let rekeys = v
            .get("rekeys")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut out = std::io::stdout().lock();
        if tty && drawn > 0 {
            // Back to the first bar of the last refresh.
            let _ = write!(out, "\x1b[{drawn}A");
        }
        if rekeys.is_empty() {
            let _ = writeln!(out, "no deep rekey");
        }
        for r in &rekeys {
            let line = progress_line(r);
            if tty {
                let _ = writeln!(out, "\x1b[2K{line}");
            } else {
                let _ = writeln!(out, "{line}");
            }
        }
        let _ = out.flush();
        drawn = rekeys.len().max(1);
        let state = |r: &Value| r.get("state").and_then(Value::as_str).map(str::to_owned);
        if !rekeys
            .iter()
            .any(|r| state(r).as_deref() == Some("running"))
        {
            let failed = rekeys.iter().any(|r| state(r).as_deref() == Some("failed"));
            return if failed { EXIT_RPC_ERROR } else { EXIT_OK };
        }
        std::thread::sleep(Duration::from_secs_f64(a.interval_s));
    }
}
