//! Subcommand implementations. Exit codes mean the same everywhere:
//! 0 success, 1 the run failed (I/O errors, verify mismatches), 2 bad usage or configuration
//! (clap's own usage errors are 2 as well), 3 a start-up failure of the engine (reactors, bdevs).

use std::process::ExitCode;

pub mod bdevperf;
pub mod bundle;
pub mod config;
pub mod format;
pub mod perf;
pub mod rpc;
pub mod serve;

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_STARTUP: u8 = 3;

/// Logs to stderr, filtered by `filter`.
pub fn init_logging(filter: &str) {
    let f = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(f)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Prints `msg` as an error and returns `code`.
pub fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("nvseal: error: {msg}");
    ExitCode::from(code)
}

/// Loads `-c PATH` or the built-in default.
pub fn load_config(
    path: Option<&std::path::Path>,
) -> Result<nvseal::config::Config, nvseal::config::ConfigError> {
    match path {
        Some(p) => nvseal::config::Config::load(p),
        None => Ok(nvseal::config::Config::builtin_default()),
    }
}
