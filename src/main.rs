//! The `nvseal` command line: `serve`, `bdevperf`, `format`, `config`. Each subcommand lives in
//! `src/cli/`; the library does the work.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod cli;

/// nvseal — an NVMe-over-Fabrics target that encrypts data at rest inline with AES-256-XTS.
#[derive(Parser)]
#[command(name = "nvseal", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("NVSEAL_GIT_REV"), ")"), about, long_about = None, propagate_version = true)]
struct Cli {
    /// Log filter (tracing-subscriber syntax: `info`, `nvseal=debug`, ...).
    #[arg(long, global = true, env = "NVSEAL_LOG", default_value = "info")]
    log: String,
    /// Log line format: `text` (coloured only on a terminal) or `json` (one object a line).
    #[arg(
        long,
        global = true,
        env = "NVSEAL_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: cli::LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the target: start reactors, open the bdev stacks of the config, serve until SIGINT/SIGTERM.
    Serve(cli::serve::ServeArgs),
    /// Benchmark a bdev stack from the reactors (plaintext, encrypted, or both with --ab).
    Bdevperf(Box<cli::bdevperf::BdevperfArgs>),
    /// Load-test an NVMe/TCP target (any: nvseal, SPDK, Linux nvmet), as spdk_nvme_perf does.
    Perf(Box<cli::perf::PerfArgs>),
    /// Call a method on a running target's control socket (JSON-RPC 2.0).
    Rpc(cli::rpc::RpcArgs),
    /// Write a password-encrypted support bundle (redacted config, logs, stats, versions).
    Bundle(cli::bundle::BundleArgs),
    /// Format one encrypted bdev's header offline (fresh DEK); --force formats over non-blank data.
    Format(cli::format::FormatArgs),
    /// Check or print configuration files.
    #[command(subcommand)]
    Config(cli::config::ConfigCmd),
}

fn main() -> ExitCode {
    let args = Cli::parse();
    cli::init_logging(&args.log, args.log_format);
    match args.cmd {
        Cmd::Serve(a) => cli::serve::run(a),
        Cmd::Bdevperf(a) => cli::bdevperf::run(*a),
        Cmd::Perf(a) => cli::perf::run(*a),
        Cmd::Rpc(a) => cli::rpc::run(a),
        Cmd::Bundle(a) => cli::bundle::run(a),
        Cmd::Format(a) => cli::format::run(a),
        Cmd::Config(c) => cli::config::run(c),
    }
}
