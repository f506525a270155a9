//! `nvseal config check|default`.

use super::{fail, EXIT_USAGE};
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum ConfigCmd {
    /// Validate a config file as `nvseal serve` does before it opens anything (syntax, values,
    /// and what this machine must have: CPUs, key file, directories); errors and warnings
    /// name the key, line and column. Exit 0 valid (warnings on stderr), 2 invalid.
    Check {
        /// The YAML file.
        path: PathBuf,
    },
    /// Print the built-in default configuration.
    Default,
}

pub fn run(cmd: ConfigCmd) -> ExitCode {
    match cmd {
        ConfigCmd::Check { path } => match super::load_checked(Some(&path)) {
            Ok((c, warnings)) => {
                for w in &warnings {
                    eprintln!("nvseal: warning: {w}");
                }
                println!(
                    "{}: ok ({} bdevs, {} subsystems, {} warnings)",
                    path.display(),
                    c.bdevs.len(),
                    c.subsystems.len(),
                    warnings.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(EXIT_USAGE, e),
        },
        ConfigCmd::Default => {
            print!("{}", nvseal::config::DEFAULT_YAML);
            ExitCode::SUCCESS
        }
    }
}
