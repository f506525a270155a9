//! `nvseal bundle`: a support bundle encrypted with a password (age, scrypt passphrase mode).

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
    /// Config to include (secrets are redacted). Default: the built-in default.
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// Log files to include (their newest part).
    #[arg(long = "log-file")]
    pub logs: Vec<PathBuf>,
    /// Control socket of a running target: its state and stats go into the bundle.
    #[arg(short, long, env = "NVSEAL_RPC_SOCKET")]
    pub socket: Option<PathBuf>,
}

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
    let config_text = match &a.config {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => t,
            Err(e) => return fail(EXIT_USAGE, format!("{}: {e}", p.display())),
        },
        None => nvseal::config::DEFAULT_YAML.to_string(),
    };
    let mut stats = serde_json::Map::new();
    if let Some(sock) = &a.socket {
        for m in [
            "subsystems.list",
            "keys.status",
            "kms.status",
            "stats.reactors",
            "health",
        ] {
            let v = match nvseal::rpc::client::call(sock, m, None) {
                Ok(v) => v,
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            };
            stats.insert(m.to_string(), v);
        }
    }
    let contents = BundleContents::gather(&config_text, a.logs, serde_json::Value::Object(stats));
    match write_bundle(&a.out, &password, &contents) {
        Ok(s) => {
            println!("{}: {s:?}", a.out.display());
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_FAILED, e),
    }
}
