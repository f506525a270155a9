//! `nvseal config check|default`.

use super::{fail, EXIT_USAGE};
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum ConfigCmd {
    /// Parse and validate a config file; errors name the key, line and column.
    Check {
        /// The YAML file.
        path: PathBuf,
    },
    /// Print the built-in default configuration.
    Default,
}

pub fn run(cmd: ConfigCmd) -> ExitCode {
    match cmd {
        ConfigCmd::Check { path } => match nvseal::config::Config::load(&path) {
            Ok(c) => {
                println!("{}: ok ({} bdevs)", path.display(), c.bdevs.len());
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
