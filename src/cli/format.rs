//! `nvseal format`: formats the header of one encrypted bdev offline, with a fresh DEK wrapped
//! under a KEK of its configured provider.
//!
//! `serve` formats a device only when `create: true` is set and the whole device start is blank:
//! both header copies, the rest of the 1 MiB metadata region (the deep-rekey journal area) and
//! the first MiB of the data area. A device whose header copies are blank but whose data is not
//! (an accidental wipe of the header, most likely) goes to `error` instead. This tool is the
//! deliberate way out: `--force` formats over such data, which is lost for good. A device that
//! holds a header (valid or damaged) is refused even with `--force`: formatting would destroy
//! its DEK.
//!
//! Runs on the main thread; blocking file I/O and KMS calls. Prints a JSON report on stdout.

use super::{fail, EXIT_FAILED, EXIT_STARTUP, EXIT_USAGE};
use clap::Args;
use nvseal::audit::{AuditSink, JsonlAuditSink};
use nvseal::config::BdevConfig;
use nvseal::keys::header::METADATA_REGION_BYTES;
use nvseal::keys::manager::{FormatDeviceError, KeyManager, ManagerOptions, NamespaceKeyConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Args)]
#[command(after_help = "\
Exit codes: 0 formatted; 1 refused (the device is not blank, or holds a header) or the format \
failed; 2 bad usage or configuration; 3 the device, key file or KMS could not be opened.

Only `encrypted` bdevs over a `uring` base (a file or block device) can be formatted offline: a \
RAM disk is blank at every start and `create: true` formats it. Stop `nvseal serve` first; the \
tool refuses while the config's control socket answers.")]
pub struct FormatArgs {
    /// YAML configuration that defines the bdev, its base and the key providers.
    #[arg(short, long)]
    pub config: PathBuf,
    /// Name of the `encrypted` bdev to format.
    #[arg(long)]
    pub bdev: String,
    /// Format even if the deep-rekey journal area or the first MiB of the data area hold data
    /// (after a wiped header: the namespace's old data is lost for good). Never formats over a
    /// header, valid or damaged.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: FormatArgs) -> ExitCode {
    let cfg = match nvseal::config::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_USAGE, e),
    };
    let ec = match cfg.bdev(&args.bdev) {
        Some(BdevConfig::Encrypted(ec)) => ec.clone(),
        Some(_) => {
            return fail(
                EXIT_USAGE,
                format!("bdev {:?} is not of type encrypted", args.bdev),
            )
        }
        None => {
            return fail(
                EXIT_USAGE,
                format!("no bdev {:?} in {}", args.bdev, args.config.display()),
            )
        }
    };
    let uring = match cfg.bdev(&ec.base) {
        Some(BdevConfig::Uring(u)) => u.clone(),
        _ => {
            return fail(
                EXIT_USAGE,
                format!(
                    "the base {:?} of {:?} is not a uring file or block device: a RAM disk is \
                     blank at every start (create: true formats it), so there is nothing to \
                     format offline",
                    ec.base, args.bdev
                ),
            )
        }
    };
    let Some(keys) = cfg.keys.clone() else {
        return fail(EXIT_USAGE, "encrypted bdevs need a keys: section");
    };
    if let Some(rpc) = &cfg.rpc {
        if std::os::unix::net::UnixStream::connect(&rpc.socket_path).is_ok() {
            return fail(
                EXIT_FAILED,
                format!(
                    "a target answers on the control socket {} of this config: stop it before \
                     formatting one of its devices",
                    rpc.socket_path.display()
                ),
            );
        }
    }
    let audit_path = keys
        .audit_log
        .clone()
        .or_else(|| cfg.rpc.as_ref().and_then(|r| r.audit_log.clone()));
    let audit: Option<Arc<dyn AuditSink>> = match &audit_path {
        Some(p) => match JsonlAuditSink::open(p) {
            Ok(s) => Some(Arc::new(s)),
            Err(e) => return fail(EXIT_STARTUP, format!("audit log {}: {e}", p.display())),
        },
        None => None,
    };
    let km = match KeyManager::new(
        &keys,
        ManagerOptions {
            audit,
            ..ManagerOptions::default()
        },
    ) {
        Ok(k) => k,
        Err(e) => return fail(EXIT_STARTUP, e),
    };
    let backing = match nvseal::bdev::uring::open(&uring) {
        Ok(b) => b,
        Err(e) => return fail(EXIT_STARTUP, format!("{}: {e}", ec.base)),
    };
    let mut io =
        match nvseal::keys::header_io::FileHeaderIo::open(&uring.path, METADATA_REGION_BYTES) {
            Ok(io) => io,
            Err(e) => {
                return fail(
                    EXIT_STARTUP,
                    format!("header of {}: {e}", uring.path.display()),
                )
            }
        };
    let who = format!("cli:uid:{}", nix::unistd::getuid());
    let key = NamespaceKeyConfig {
        provider: ec.provider.clone(),
        kek_name: ec.kek_name.clone(),
    };
    match km.format_device(&who, &args.bdev, &backing, &mut io, &key, args.force) {
        Ok(report) => {
            match serde_json::to_string_pretty(&report) {
                Ok(text) => println!("{text}"),
                Err(e) => return fail(EXIT_FAILED, e),
            }
            ExitCode::SUCCESS
        }
        Err(e @ FormatDeviceError::Refused(_)) => fail(EXIT_FAILED, e),
        Err(e @ FormatDeviceError::Io(_)) => fail(EXIT_STARTUP, e),
        Err(e @ FormatDeviceError::Failed(_)) => fail(EXIT_FAILED, e),
    }
}
