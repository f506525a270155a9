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
pub mod units;

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_STARTUP: u8 = 3;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; coloured only when stderr is a terminal (and `NO_COLOR` is unset).
    Text,
    /// One JSON object per line (timestamp, level, target, fields), for log shippers.
    Json,
}

/// Whether text logs may carry ANSI colour: only on a terminal, never when `NO_COLOR` is set
/// (<https://no-color.org>), so `nvseal serve 2> serve.log` writes plain text.
fn colour_allowed(is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Logs to stderr, filtered by `filter`, as text or JSON lines.
pub fn init_logging(filter: &str, format: LogFormat) {
    use std::io::IsTerminal;
    let f = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(f)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(colour_allowed(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR"),
            ))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_ansi(false)
            .try_init(),
    };
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

/// Loads `-c PATH` (or the built-in default) and runs the one validation `nvseal config check`
/// and `nvseal serve` share ([`nvseal::config::Config::preflight`]), before anything is
/// opened: the config and its warnings, or the first error with its line and column.
pub fn load_checked(
    path: Option<&std::path::Path>,
) -> Result<(nvseal::config::Config, Vec<nvseal::config::ConfigWarning>), nvseal::config::ConfigError>
{
    let cfg = load_config(path)?;
    let warnings = cfg.preflight()?;
    Ok((cfg, warnings))
}

#[cfg(test)]
mod tests {
    use super::colour_allowed;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_allowed(true, None));
        assert!(colour_allowed(true, Some("".into())));
        assert!(!colour_allowed(true, Some("1".into())));
        assert!(!colour_allowed(false, None));
    }
}
