//! `nvseal bundle`: a support bundle encrypted with a password (age, scrypt passphrase mode).
//! Each source that fails (an RPC call, a log file, the config file) is named in a warning
//! and makes the exit status 1 ("incomplete"); the bundle is written with the rest, and a
//! summary of what went in is printed.

use super::{fail, EXIT_FAILED, EXIT_USAGE};
use clap::Args;
use nvseal::bundle::{write_bundle, BundleContents, SecretString};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
#[command(
    after_help = "The password is never stored. Give it with --password (visible in `ps`), the\n\
    NVSEAL_BUNDLE_PASSWORD environment variable, or on the first line of standard input.\n\
    Open a bundle with `age -d -o bundle.tar BUNDLE` (docs/rpc.md)."
)]
pub struct BundleArgs {
    /// Output file (never overwritten).
    #[arg(short, long)]
    pub out: PathBuf,
    /// Password for the bundle (at least 8 characters).
    #[arg(long, env = "NVSEAL_BUNDLE_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Config to include (secrets are redacted) when no running target gives its own over
    /// --socket. Default: the built-in default.
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// Log files to include (their newest part).
    #[arg(long = "log-file")]
    pub logs: Vec<PathBuf>,
    /// Control socket of a running target: its state and stats go into the bundle.
    #[arg(short, long, env = "NVSEAL_RPC_SOCKET")]
    pub socket: Option<PathBuf>,
}

/// What a bundle asks a running target for (`--socket`): its state, every stats family, and
/// the config it runs (`config.get`, redacted by the target).
const RPC_SOURCES: [&str; 10] = [
    "health",
    "config.get",
    "subsystems.list",
    "spdk.controllers",
    "keys.status",
    "kms.status",
    "stats.reactors",
    "stats.nvmf",
    "stats.namespaces",
    "stats.process",
];

pub fn run(a: BundleArgs) -> ExitCode {
    let password = match a.password {
        Some(p) => SecretString::from(p),
        None => {
            eprintln!("nvseal bundle: reading the password from standard input");
            let mut line = String::new();
            if std::io::stdin().lock().read_line(&mut line).is_err() {
                return fail(EXIT_USAGE, "no password given");
            }
            SecretString::from(line.trim_end_matches(['\r', '\n']).to_string())
        }
    };
    let mut failed: Vec<String> = Vec::new();
    let mut warn = |source: &str, e: &dyn std::fmt::Display| {
        eprintln!("nvseal: warning: bundle: {source}: {e}");
        failed.push(source.to_string());
    };
    // The target's state over its control socket, one call per source.
    let mut stats = serde_json::Map::new();
    let mut answered = 0usize;
    let mut running_config: Option<(String, String)> = None;
    if let Some(sock) = &a.socket {
        for m in RPC_SOURCES {
            match nvseal::rpc::client::call(sock, m, None) {
                Ok(v) => {
                    answered += 1;
                    if m == "config.get" {
                        let file = v["file"].as_str().unwrap_or("").to_string();
                        match v["text"].as_str() {
                            Some(t) => running_config = Some((file, t.to_string())),
                            None => warn(m, &"the reply holds no config text"),
                        }
                    } else {
                        stats.insert(m.to_string(), v);
                    }
                }
                Err(e) => {
                    warn(m, &e);
                    stats.insert(m.to_string(), serde_json::json!({ "error": e.to_string() }));
                }
            }
        }
    }
    // The config: the one the target runs, else -c, else the built-in default.
    let (config_text, config_from) = match (running_config, &a.config) {
        (Some((file, text)), _) => (text, format!("running config of the target ({file})")),
        (None, Some(p)) => match std::fs::read_to_string(p) {
            Ok(t) => (t, p.display().to_string()),
            Err(e) => {
                warn(&p.display().to_string(), &e);
                (String::new(), format!("none ({} unreadable)", p.display()))
            }
        },
        (None, None) => (
            nvseal::config::DEFAULT_YAML.to_string(),
            "the built-in default (no --config, no running target)".to_string(),
        ),
    };
    for log in &a.logs {
        if let Err(e) = std::fs::File::open(log) {
            warn(&log.display().to_string(), &e);
        }
    }
    let logs_given = a.logs.len();
    let contents = BundleContents::gather(&config_text, a.logs, serde_json::Value::Object(stats));
    match write_bundle(&a.out, &password, &contents) {
        Ok(s) => {
            let logs_in = s.entries.iter().filter(|e| e.contains("/logs/")).count();
            println!(
                "nvseal bundle: wrote {} ({} bytes, encrypted with the password)",
                s.path.display(),
                s.bytes
            );
            println!("  config:   {config_from}, secrets redacted");
            match &a.socket {
                Some(sock) => println!(
                    "  target:   {answered} of {} calls answered on {}",
                    RPC_SOURCES.len(),
                    sock.display()
                ),
                None => println!("  target:   not asked (no --socket)"),
            }
            println!("  logs:     {logs_in} of {logs_given} files");
            println!(
                "  versions: nvseal {}, kernel {}",
                contents.versions.nvseal, contents.versions.kernel
            );
            println!("  open it:  age -d -o bundle.tar {}", s.path.display());
            if failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                fail(
                    EXIT_FAILED,
                    format!(
                        "the bundle is incomplete: {} source(s) failed ({})",
                        failed.len(),
                        failed.join(", ")
                    ),
                )
            }
        }
        Err(e) => fail(EXIT_FAILED, e),
    }
}
