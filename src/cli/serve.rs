//! `nvseal serve`: the main job.

use super::{fail, load_checked, EXIT_STARTUP, EXIT_USAGE};
use clap::Args;
use nvseal::server::Server;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    /// YAML configuration; without it the built-in default runs (RAM disks, no KMS).
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// Allow core dumps (by default the process marks itself non-dumpable so keys cannot leak
    /// into a core file).
    #[arg(long)]
    pub allow_core_dumps: bool,
}

pub fn run(args: ServeArgs) -> ExitCode {
    // First, so a stop request during start-up is honoured once start-up is done.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            return fail(EXIT_STARTUP, format!("installing signal handler: {e}"));
        }
    }
    if !args.allow_core_dumps {
        if let Err(e) = nvseal::sys::process::set_non_dumpable() {
            tracing::warn!("could not mark the process non-dumpable: {e}");
        }
    }
    // The same validation as `nvseal config check`, before anything is opened or bound.
    let cfg = match load_checked(args.config.as_deref()) {
        Ok((c, warnings)) => {
            for w in warnings {
                tracing::warn!("config: {w}");
            }
            c
        }
        Err(e) => return fail(EXIT_USAGE, e),
    };
    // Every queue pair is a socket: raise the open-file limit as far as allowed, and refuse to
    // start where it cannot cover what the config admits.
    let need = nvseal::server::fds_needed(&cfg);
    match nvseal::sys::process::raise_nofile_limit() {
        Ok(have) if have >= need => {
            tracing::info!(open_files_limit = have, needed = need, "RLIMIT_NOFILE")
        }
        Ok(have) => {
            return fail(
                EXIT_STARTUP,
                format!(
                    "the open-file limit (RLIMIT_NOFILE) is {have} even after raising it to the hard limit, below the {need} this config can need (max_connections {} + max_pre_connect {} + listeners + bdevs + {} reserved): raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower nvmf.max_connections",
                    cfg.nvmf.max_connections,
                    cfg.nvmf.max_pre_connect,
                    nvseal::server::FD_RESERVE
                ),
            )
        }
        Err(e) => return fail(EXIT_STARTUP, format!("open-file limit: {e}")),
    }
    let server = match Server::start(&cfg) {
        Ok(s) => s,
        Err(e) => return fail(EXIT_STARTUP, e),
    };
    for sub in server.target().subsystems() {
        for n in &sub.namespaces() {
            tracing::info!(nqn = %sub.nqn, nsid = n.nsid, bdev = n.bdev.name(), online = n.is_online(), "namespace");
        }
    }
    tracing::info!(listen = ?server.listen_addrs(), "nvseal serving; SIGINT or SIGTERM stops");
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    tracing::info!("signal received: draining in-flight I/O and stopping");
    let unflushed = server.shutdown();
    if unflushed > 0 {
        tracing::error!(
            backends = unflushed,
            "stopped, but backends failed to flush: acknowledged writes may not be durable"
        );
        return fail(
            super::EXIT_FAILED,
            format!("{unflushed} backend(s) failed to flush at shutdown (see the log)"),
        );
    }
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
