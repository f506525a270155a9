//! Controller shutdown (CC.SHN) for the admin queue's [`Connection`]: a Flush per namespace,
//! each through a private bdev channel, and CSTS.SHST/CFS set from their outcome.
//!
//! Runs on the admin queue's reactor (started by the property handler in `super::super::admin`,
//! driven by [`Connection::poll`], also after the host hung up). It exists as its own file
//! because it is an admin-path job with its own state, apart from the I/O path.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Connection;
use crate::bdev::{BdevChannel, BdevIo, IoStatus, IoType, Submit};
use crate::nvme::prop;
use crate::nvmf::target::Namespace;

/// One namespace's flush during a controller shutdown (CC.SHN): a private channel opened on the
/// admin queue's reactor, and the Flush not yet taken by it (`None` once submitted).
pub(super) struct ShutdownFlush {
    ns: Arc<Namespace>,
    ch: Box<dyn BdevChannel>,
    io: Option<BdevIo>,
    pub(super) done: bool,
}

impl Connection {
    // ----------------------------------------------------------------------------------------
    // Controller shutdown (CC.SHN).

    /// Starts flushing every namespace of the controller's subsystem, each through a private
    /// channel on this reactor (admin path: allocating here is fine). CSTS.SHST was set to
    /// "occurring" by the caller; [`Connection::poll_shutdown`] sets "complete" once every
    /// flush succeeded. A Flush covers every write completed before it was submitted, on any
    /// queue: the backends flush the device, not a channel.
    pub(in crate::nvmf) fn start_shutdown_flush(&mut self) {
        let Some(c) = self.ctrl.clone() else {
            return;
        };
        // A previous shutdown's flushes (SHN cleared and set again) are superseded.
        self.shutdown.retain(|f| !f.done);
        self.shutdown_failed = false;
        for ns in c.subsys.namespaces() {
            if !ns.supports(IoType::Flush) {
                continue;
            }
            match ns.bdev.open_channel(self.core, 1) {
                Ok(ch) => self.shutdown.push(ShutdownFlush {
                    ns: ns.clone(),
                    ch,
                    io: Some(BdevIo::new(IoType::Flush, 0, 0, None, u64::from(ns.nsid))),
                    done: false,
                }),
                Err(e) => {
                    if let Some(suppressed) = self.target.peer_log().admit() {
                        tracing::error!(
                            subnqn = %c.subsys.nqn,
                            nsid = ns.nsid,
                            bdev = ns.bdev.name(),
                            suppressed_before = suppressed,
                            "shutdown: cannot open a channel to flush the namespace: {e}; \
                             shutdown will not report complete"
                        );
                    }
                    self.shutdown_failed = true;
                }
            }
        }
        // A host may toggle CC.SHN at will: rate-limited.
        if let Some(suppressed) = self.target.peer_log().admit() {
            tracing::info!(
                subnqn = %c.subsys.nqn,
                cntlid = c.cntlid,
                namespaces = self.shutdown.len(),
                suppressed_before = suppressed,
                "controller shutdown: flushing namespaces"
            );
        }
        self.poll_shutdown();
    }

    /// Drives the shutdown flushes; when the last one is done, reports CSTS.SHST complete (or,
    /// if one failed, leaves SHST at "occurring" and sets CSTS.CFS: the host must not believe
    /// its acknowledged writes are safe).
    pub(super) fn poll_shutdown(&mut self) -> usize {
        let mut work = 0;
        let mut failed = false;
        for f in self.shutdown.iter_mut().filter(|f| !f.done) {
            if let Some(io) = f.io.take() {
                if let Submit::Busy(io) = f.ch.submit(io) {
                    f.io = Some(io);
                    continue;
                }
                work += 1;
            }
            let mut status = None;
            work += f.ch.poll(&mut |io| status = Some(io.status));
            let Some(status) = status else { continue };
            f.done = true;
            match status {
                IoStatus::Success => {
                    tracing::debug!(
                        nsid = f.ns.nsid,
                        bdev = f.ns.bdev.name(),
                        "shutdown flush done"
                    )
                }
                // A locked namespace (its key never arrived) was never written through.
                IoStatus::IoError(libc::EAGAIN) if !f.ns.is_online() => tracing::debug!(
                    nsid = f.ns.nsid,
                    bdev = f.ns.bdev.name(),
                    "shutdown flush: namespace offline, nothing to flush"
                ),
                other => {
                    if let Some(suppressed) = self.target.peer_log().admit() {
                        tracing::error!(
                            nsid = f.ns.nsid,
                            bdev = f.ns.bdev.name(),
                            status = ?other,
                            suppressed_before = suppressed,
                            "shutdown flush failed; shutdown will not report complete"
                        );
                    }
                    failed = true;
                }
            }
        }
        self.shutdown_failed |= failed;
        if self.shutdown.iter().all(|f| f.done) {
            self.shutdown.clear();
            if let Some(c) = &self.ctrl {
                let cc = c.cc.load(Ordering::Acquire);
                let mut csts = c.csts.load(Ordering::Acquire);
                // Only if the host still asks for shutdown (a reset meanwhile cleared SHST).
                if cc & prop::CC_SHN_MASK != 0
                    && csts & prop::CSTS_SHST_MASK == prop::CSTS_SHST_OCCURRING
                {
                    if self.shutdown_failed {
                        csts |= prop::CSTS_CFS;
                    } else {
                        csts = (csts & !prop::CSTS_SHST_MASK) | prop::CSTS_SHST_COMPLETE;
                        if let Some(suppressed) = self.target.peer_log().admit() {
                            tracing::info!(
                                cntlid = c.cntlid,
                                suppressed_before = suppressed,
                                "controller shutdown complete"
                            );
                        }
                    }
                    c.csts.store(csts, Ordering::Release);
                }
            }
            work += 1;
        }
        work
    }
}
