//! Crypto erase from the host: Format NVM with a secure erase and Sanitize (crypto erase action),
//! and the NVM subsystem's Sanitize Status (log page 81h). docs/lifecycle.md §5 has the rules.
//!
//! The target layer does not know about keys (dependencies point down): the server installs a
//! [`CryptoEraser`] (implemented over the key manager) with [`EraseHub::install`]. That starts
//! one control thread, `crypto-erase`, which runs every erase the hosts ask for, one at a time;
//! the reactor only checks the command, hands a [`Job`] over a bounded channel and completes the
//! command later (Format NVM) or at once (Sanitize, whose progress is in the log page). Nothing
//! here blocks a reactor: the job channel is `try_send`, the state locks are taken on the admin
//! path only, and the erase thread wakes the admin queue the way the control plane queues an
//! asynchronous event (`Controller::event_pending`).
//!
//! Sanitize is NVM-subsystem wide: it erases every namespace of the subsystem, and while it runs
//! I/O commands to them complete with Sanitize In Progress.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crossbeam_channel::{Sender, TrySendError};
use thiserror::Error;

use crate::nvme::log::{sstat, SanitizeStatus, SPROG_IDLE};
use crate::nvme::Status;
use crate::nvmf::target::{Controller, Namespace};

/// Erase jobs waiting for the erase thread, target-wide. A host that sends more Format NVM or
/// Sanitize commands than this while they run gets Command Interrupted (retryable) for the rest;
/// each job is a few header writes, so the queue drains in well under a second.
pub const ERASE_QUEUE_DEPTH: usize = 16;

/// What the nvmf layer needs from key management to crypto-erase a namespace.
pub trait CryptoEraser: Send + Sync {
    /// Whether the namespace exported from bdev `bdev_name` can be crypto-erased (it is an
    /// encrypted namespace whose DEK nvseal manages). Cheap; called on the admin path.
    fn can_crypto_erase(&self, bdev_name: &str) -> bool;
    /// Replaces the namespace's DEK (blocking: KMS, header writes). `who` goes to the audit log.
    fn crypto_erase(&self, who: &str, bdev_name: &str) -> Result<(), EraseError>;
}

/// Why a crypto erase did not happen; each maps to the NVMe status the host gets.
#[derive(Debug, Error)]
pub enum EraseError {
    /// Not an encrypted namespace: nothing to erase cryptographically (Invalid Field).
    #[error("not encrypted: {0}")]
    NotEncrypted(String),
    /// The namespace is locked (its key has not been fetched): Namespace Not Ready.
    #[error("not ready: {0}")]
    NotReady(String),
    /// A deep rekey or conversion is running: Command Interrupted (DNR).
    #[error("busy: {0}")]
    Busy(String),
    /// Anything else (KMS, header I/O): Internal Error.
    #[error("failed: {0}")]
    Failed(String),
}

impl EraseError {
    /// The completion status of a Format NVM that failed with this error.
    pub fn status(&self) -> Status {
        match self {
            EraseError::NotEncrypted(_) => Status::INVALID_FIELD,
            EraseError::NotReady(_) => Status::NAMESPACE_NOT_READY,
            EraseError::Busy(_) => Status::COMMAND_INTERRUPTED,
            EraseError::Failed(_) => Status::INTERNAL_ERROR,
        }
    }
}

/// Where a deferred Format NVM completion is left for the admin queue.
#[derive(Default)]
pub struct Done {
    status: Mutex<Option<Status>>,
}

impl Done {
    /// The status once the erase thread finished the job.
    pub fn take(&self) -> Option<Status> {
        lock(&self.status).take()
    }
    fn set(&self, s: Status) {
        *lock(&self.status) = Some(s);
    }
}

/// What an erase job does.
pub enum JobKind {
    /// Format NVM with a secure erase of one namespace; the admin queue waits on `done`.
    Format { done: Arc<Done> },
    /// Sanitize (crypto erase) of every namespace of subsystem `nqn`.
    Sanitize { nqn: String },
}

/// One request for the erase thread.
pub struct Job {
    /// For the audit log: host NQN and controller.
    pub who: String,
    /// The namespaces to erase, in order.
    pub namespaces: Vec<Arc<Namespace>>,
    /// The controller to wake when done.
    pub ctrl: Arc<Controller>,
    pub kind: JobKind,
}

/// Per-subsystem sanitize state (by NQN): the log page and whether one runs.
type SanitizeMap = HashMap<String, SanitizeStatus>;

/// Crypto erase support of a target: the eraser, the erase thread's queue and the Sanitize
/// Status of each NVM subsystem. Empty (every namespace plaintext) until [`EraseHub::install`].
#[derive(Default)]
pub struct EraseHub {
    eraser: OnceLock<Arc<dyn CryptoEraser>>,
    jobs: OnceLock<Sender<Job>>,
    sanitize: Arc<Mutex<SanitizeMap>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl EraseHub {
    /// Installs the eraser and starts the erase thread (control plane, once; a second call is
    /// refused). The thread ends when the hub (the target) is dropped.
    pub fn install(&self, eraser: Arc<dyn CryptoEraser>) -> std::io::Result<()> {
        if self.eraser.get().is_some() {
            return Err(std::io::Error::other(
                "a crypto eraser is already installed",
            ));
        }
        let (tx, rx) = crossbeam_channel::bounded::<Job>(ERASE_QUEUE_DEPTH);
        let sanitize = self.sanitize.clone();
        let worker = eraser.clone();
        std::thread::Builder::new()
            .name("crypto-erase".into())
            .spawn(move || {
                for job in rx {
                    run_job(worker.as_ref(), &sanitize, job);
                }
            })?;
        // The queue first: once the eraser is visible, Identify advertises crypto erase and a
        // Format NVM may be queued at once.
        let _ = self.jobs.set(tx);
        let _ = self.eraser.set(eraser);
        Ok(())
    }

    /// Whether the namespace can be crypto-erased (false without an eraser).
    pub fn can_erase(&self, ns: &Namespace) -> bool {
        self.eraser
            .get()
            .is_some_and(|e| e.can_crypto_erase(ns.bdev.name()))
    }

    /// Hands a job to the erase thread; the status to complete the command with if it cannot
    /// take it now.
    pub fn submit(&self, job: Job) -> Result<(), Status> {
        let Some(tx) = self.jobs.get() else {
            return Err(Status::INVALID_FIELD);
        };
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            // Command Interrupted without DNR: retry once the queue drained.
            Err(TrySendError::Full(_)) => Err(Status {
                dnr: false,
                ..Status::COMMAND_INTERRUPTED
            }),
            Err(TrySendError::Disconnected(_)) => Err(Status::INTERNAL_ERROR),
        }
    }

    /// The Sanitize Status log page of subsystem `nqn`.
    pub fn sanitize_status(&self, nqn: &str) -> SanitizeStatus {
        lock(&self.sanitize).get(nqn).copied().unwrap_or_default()
    }

    /// Whether a sanitize operation runs on subsystem `nqn`.
    pub fn sanitizing(&self, nqn: &str) -> bool {
        self.sanitize_status(nqn).sstat & 0x7 == sstat::IN_PROGRESS
    }

    /// Marks a sanitize operation on `nqn` as started (SSTAT in progress, SPROG 0, `cdw10`
    /// recorded) and each namespace as sanitizing, unless one runs already (`None` then).
    /// Returns the status before, for [`EraseHub::abandon_sanitize`]. Admin path, before the job
    /// is queued, so that I/O submitted after the Sanitize command completes already sees it.
    pub fn begin_sanitize(
        &self,
        nqn: &str,
        cdw10: u32,
        namespaces: &[Arc<Namespace>],
    ) -> Option<SanitizeStatus> {
        let mut m = lock(&self.sanitize);
        let e = m.entry(nqn.to_owned()).or_default();
        if e.sstat & 0x7 == sstat::IN_PROGRESS {
            return None;
        }
        let prev = *e;
        *e = SanitizeStatus {
            sprog: 0,
            sstat: sstat::IN_PROGRESS,
            scdw10: cdw10,
        };
        for ns in namespaces {
            ns.set_sanitizing(true);
        }
        Some(prev)
    }

    /// Rolls back [`EraseHub::begin_sanitize`] when the job could not be queued.
    pub fn abandon_sanitize(&self, nqn: &str, prev: SanitizeStatus, namespaces: &[Arc<Namespace>]) {
        for ns in namespaces {
            ns.set_sanitizing(false);
        }
        lock(&self.sanitize).insert(nqn.to_owned(), prev);
    }
}

/// Runs one job on the erase thread and reports its outcome.
fn run_job(eraser: &dyn CryptoEraser, sanitize: &Mutex<SanitizeMap>, job: Job) {
    let total = job.namespaces.len().max(1);
    let mut outcome: Result<(), EraseError> = Ok(());
    for (i, ns) in job.namespaces.iter().enumerate() {
        outcome = eraser.crypto_erase(&job.who, ns.bdev.name());
        if let Err(e) = &outcome {
            tracing::error!(who = %job.who, nsid = ns.nsid, bdev = ns.bdev.name(), error = %e,
                "crypto erase requested by the host failed");
            break;
        }
        tracing::info!(who = %job.who, nsid = ns.nsid, bdev = ns.bdev.name(),
            "namespace crypto-erased at the host's request");
        if let JobKind::Sanitize { nqn } = &job.kind {
            if let Some(s) = lock(sanitize).get_mut(nqn) {
                s.sprog = (((i + 1) * 65536) / total).min(65535) as u16;
            }
        }
    }
    match &job.kind {
        JobKind::Format { done } => done.set(match &outcome {
            Ok(()) => Status::SUCCESS,
            Err(e) => e.status(),
        }),
        JobKind::Sanitize { nqn } => {
            if let Some(s) = lock(sanitize).get_mut(nqn) {
                s.sprog = SPROG_IDLE;
                s.sstat = if outcome.is_ok() {
                    sstat::COMPLETED
                } else {
                    sstat::FAILED
                };
            }
            for ns in &job.namespaces {
                ns.set_sanitizing(false);
            }
            tracing::info!(who = %job.who, subsystem = %nqn, ok = outcome.is_ok(),
                "sanitize (crypto erase) finished");
        }
    }
    job.ctrl.event_pending.store(true, Ordering::Release);
}
