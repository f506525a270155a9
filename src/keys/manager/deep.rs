//! Deep rekey of online namespaces (docs/lifecycle.md): `rekey.deep`, pause, resume, status,
//! and the automatic resume of a pass that a restart interrupted.
//!
//! [`KeyManager::deep_rekey`] runs on the caller's thread (an RPC handler): it checks the
//! request, draws the new DEK, wraps it (under the namespace's KEK, or a new KEK at another
//! provider), records it durably as the header's pending slot with the watermark at 0
//! (`convert::begin`), splits the crypto bdev's keying at 0, and starts the pass on its own
//! control thread (`deep-<ns>`). The pass ([`crate::keys::deep::run`]) converts one segment at a
//! time while hosts keep doing I/O; pause stops it between segments (the header then holds a
//! clean watermark), resume starts a new thread at that watermark.
//!
//! At unlock, a header that says a deep rekey runs needs both DEKs (the old KEK for the data
//! above the watermark, the new for below; the namespace stays locked until both unwrap). The
//! unlock thread runs the journal recovery before the bdev is handed to the target, keys the
//! crypto bdev `Split` at the watermark, and resumes the pass ([`Inner::start_pass`]).
//!
//! When the pass completes, the new slot is active in both header copies, the journal is
//! zeroed, the crypto bdev is keyed by the new DEK alone (the old one is wiped from memory once
//! the pass thread and the channels have let go of it: each channel drops its cached keying on
//! its next poll) and the old KEK, if the rekey moved to another, is kept and reported: it is
//! revoked only on request (`keys.revoke_kek`, refused while anything references it).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use serde::Serialize;
use thiserror::Error;

use super::{generated_kek_name, lock, Inner, KekRef, KeyManager, NamespaceKeyState, SharedIo};
use crate::bdev::Bdev;
use crate::crypto::bdev::{CryptoBdev, DataKey};
use crate::crypto::key::XtsKey;
use crate::crypto::keymap::Keying;
use crate::keys::convert::{self, DataIo};
use crate::keys::deep::{self, BdevDataIo, NamespaceIo, PassControl, PassEnd};
use crate::keys::header::RekeyState;
use crate::keys::store::{self, HeaderIo};
use crate::keys::wrap::Dek;
use crate::keys::{now_unix_s, rekey};
use crate::types::CoreId;

/// Highest `rate_mib_s` accepted (above it the limit would mean nothing on any device).
pub const MAX_RATE_MIB_S: u64 = 1_000_000;

/// Which pass a namespace runs: all three move a watermark over the data area with the same
/// hot zone, journal and recovery (docs/lifecycle.md §1–§4, §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PassOp {
    /// `rekey.deep`: every unit from the old DEK to a new one.
    DeepRekey,
    /// `namespace.encrypt`: every unit from plaintext to the DEK.
    Encrypt,
    /// `namespace.decrypt`: every unit from the DEK to plaintext; the header is retired at the end.
    Decrypt,
}

impl PassOp {
    pub(super) fn name(self) -> &'static str {
        match self {
            PassOp::DeepRekey => "deep rekey",
            PassOp::Encrypt => "encrypt",
            PassOp::Decrypt => "decrypt",
        }
    }
    fn audit_op(self) -> &'static str {
        match self {
            PassOp::DeepRekey => "rekey-deep",
            PassOp::Encrypt => "namespace-encrypt",
            PassOp::Decrypt => "namespace-decrypt",
        }
    }
}

/// Where a deep rekey (or an encrypt/decrypt pass) stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeepState {
    /// The pass is running.
    Running,
    /// Paused between segments (`rekey.pause`); `rekey.resume` continues it.
    Paused,
    /// Every block is under the new DEK; the old one is gone.
    Finished,
    /// The pass stopped on an error (see `error`); `rekey.resume` retries it.
    Failed,
}

/// Progress of a namespace's deep rekey, for `rekey.status` and `keys.status`. Holds no secret.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeepRekeyStatus {
    /// Namespace (encrypted bdev) id.
    pub ns_id: String,
    /// The pass: deep rekey, encrypt or decrypt.
    pub operation: PassOp,
    /// State.
    pub state: DeepState,
    /// Data units below it are under the new DEK.
    pub watermark_blocks: u64,
    /// Size of the data area in data units.
    pub data_blocks: u64,
    /// Data unit size.
    pub data_unit_bytes: u32,
    /// `watermark / data_blocks` in percent.
    pub percent: f64,
    /// Rate of this run of the pass (since it was started or last resumed).
    pub mib_s: f64,
    /// Seconds left at that rate (None until there is a rate, or when not running).
    pub eta_s: Option<u64>,
    /// The rate limit (0 = unlimited).
    pub rate_mib_s: u64,
    /// Provider and id of the KEK the new DEK is wrapped under.
    pub new_kek_provider: String,
    /// That KEK.
    pub new_kek_id: String,
    /// Why the pass stopped, when it failed.
    pub error: Option<String>,
}

/// Why a deep-rekey request was refused or failed. Nothing on disk changed unless said.
#[derive(Debug, Error)]
pub enum DeepRekeyError {
    /// No such namespace.
    #[error("no encrypted namespace {0:?}")]
    UnknownNamespace(String),
    /// The namespace is not online (locked, unlocking or in error).
    #[error("namespace {ns_id} is not online ({state}); its key must be unlocked first")]
    NotOnline {
        /// Namespace.
        ns_id: String,
        /// Its state.
        state: String,
    },
    /// A deep rekey (or another header change) is already in progress.
    #[error("namespace {ns_id}: {what}")]
    Busy {
        /// Namespace.
        ns_id: String,
        /// What runs.
        what: String,
    },
    /// Pause/resume of a namespace with no deep rekey to pause or resume.
    #[error("namespace {ns_id}: {what}")]
    NothingToDo {
        /// Namespace.
        ns_id: String,
        /// Why.
        what: String,
    },
    /// The namespace's data is not in the state the request needs (plaintext for an encrypt,
    /// encrypted for a decrypt, a deep rekey or a crypto erase).
    #[error("namespace {ns_id}: {what}")]
    WrongState {
        /// Namespace.
        ns_id: String,
        /// Why.
        what: String,
    },
    /// The rate is out of range.
    #[error("rate_mib_s {0} is out of range (1..={MAX_RATE_MIB_S}; omit it for unlimited)")]
    BadRate(u64),
    /// No provider of that name.
    #[error("no key provider named {0:?} is configured")]
    UnknownProvider(String),
    /// The KMS or the local key provider failed (nothing written).
    #[error("key provider {provider}: {reason}")]
    Provider {
        /// The provider.
        provider: String,
        /// Why.
        reason: String,
    },
    /// Reading or writing the header failed.
    #[error("namespace {ns_id}: {reason}")]
    Failed {
        /// Namespace.
        ns_id: String,
        /// Why.
        reason: String,
    },
}

/// A namespace's deep rekey as the manager tracks it (in its [`super::NsEntry`]).
pub(super) struct DeepRun {
    pub(super) op: PassOp,
    pub(super) control: Arc<PassControl>,
    pub(super) state: DeepState,
    pub(super) error: Option<String>,
    pub(super) data_blocks: u64,
    pub(super) unit: u32,
    pub(super) new_kek: KekRef,
    /// The KEK of the data above the watermark (reported at the end; revoked only on request).
    pub(super) old_kek: KekRef,
    /// When this run of the pass started, and `bytes_done` then.
    pub(super) run_started: Instant,
    pub(super) run_bytes0: u64,
    pub(super) thread: Option<JoinHandle<()>>,
}

impl DeepRun {
    pub(super) fn status(&self, ns_id: &str) -> DeepRekeyStatus {
        let watermark = match self.state {
            DeepState::Finished => self.data_blocks,
            _ => self.control.watermark(),
        };
        let percent = if self.data_blocks == 0 {
            100.0
        } else {
            watermark as f64 * 100.0 / self.data_blocks as f64
        };
        let secs = self.run_started.elapsed().as_secs_f64();
        let bytes = self.control.bytes_done().saturating_sub(self.run_bytes0);
        let mib_s = if secs > 0.0 {
            bytes as f64 / (1024.0 * 1024.0) / secs
        } else {
            0.0
        };
        let left = self.data_blocks.saturating_sub(watermark) * u64::from(self.unit);
        let eta_s = (self.state == DeepState::Running && mib_s > 0.0)
            .then(|| (left as f64 / (mib_s * 1024.0 * 1024.0)).ceil() as u64);
        DeepRekeyStatus {
            ns_id: ns_id.to_owned(),
            operation: self.op,
            state: self.state,
            watermark_blocks: watermark,
            data_blocks: self.data_blocks,
            data_unit_bytes: self.unit,
            percent: (percent * 100.0).round() / 100.0,
            mib_s: (mib_s * 10.0).round() / 10.0,
            eta_s,
            rate_mib_s: self.control.rate_mib_s(),
            new_kek_provider: self.new_kek.0.clone(),
            new_kek_id: self.new_kek.1.to_string(),
            error: self.error.clone(),
        }
    }

    pub(super) fn active(&self) -> bool {
        matches!(self.state, DeepState::Running | DeepState::Paused)
    }
}

/// Refuses to start a pass over a header that records one (or an unfinished shallow rekey):
/// what deep rekey and decrypt both start from is a header with no rekey in progress.
pub(super) fn refuse_unless_settled(ns_id: &str, rekey: &RekeyState) -> Result<(), DeepRekeyError> {
    let what = match rekey {
        RekeyState::None => return Ok(()),
        RekeyState::Deep(_) => "a deep rekey is already in progress",
        RekeyState::Convert(_) => "an encrypt/decrypt pass is in progress",
        RekeyState::Shallow { .. } => {
            "a shallow rekey was interrupted; rerun rekey.shallow to finish it first"
        }
    };
    Err(DeepRekeyError::Busy {
        ns_id: ns_id.to_owned(),
        what: what.to_owned(),
    })
}

/// Checks a requested rate: absent = unlimited (0).
pub(super) fn check_rate(rate: Option<u64>) -> Result<u64, DeepRekeyError> {
    match rate {
        None => Ok(0),
        Some(r) if r == 0 || r > MAX_RATE_MIB_S => Err(DeepRekeyError::BadRate(r)),
        Some(r) => Ok(r),
    }
}

/// Header I/O that takes the namespace's header lock for each call, so a pass that runs for
/// hours does not hold it between its own writes (status and refusals stay responsive).
struct LockedIo(SharedIo);

impl HeaderIo for LockedIo {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        lock(&self.0).read_at(off, buf)
    }
    fn write_at(&mut self, off: u64, buf: &[u8]) -> std::io::Result<()> {
        lock(&self.0).write_at(off, buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        lock(&self.0).flush()
    }
}

pub(super) fn data_key(dek: &Dek, inner: &Inner) -> Result<DataKey, String> {
    let xts = XtsKey::from_bytes(dek.expose()).map_err(|e| format!("DEK unusable: {e}"))?;
    DataKey::new(&xts, inner.xts_max_tier).map_err(|e| format!("XTS engine: {e}"))
}

impl KeyManager {
    /// Starts a deep rekey of an online namespace: a new DEK (wrapped under the namespace's
    /// current KEK, or under a new KEK created at `provider`), then a background pass that
    /// re-encrypts every block while hosts keep doing I/O. `rate_mib_s` limits the pass (None =
    /// unlimited). Returns the status once the new slot is durable and the pass has started.
    pub fn deep_rekey(
        &self,
        who: &str,
        ns_id: &str,
        provider: Option<&str>,
        rate_mib_s: Option<u64>,
    ) -> Result<DeepRekeyStatus, DeepRekeyError> {
        let r = self.inner.deep_rekey(who, ns_id, provider, rate_mib_s);
        match &r {
            Ok(s) => self.inner.audit(
                who,
                "rekey-deep",
                ns_id,
                &format!(
                    "ok: started, new KEK {}/{}",
                    s.new_kek_provider, s.new_kek_id
                ),
            ),
            Err(e) => self
                .inner
                .audit(who, "rekey-deep", ns_id, &format!("error: {e}")),
        }
        if let Err(e) = &r {
            tracing::warn!(namespace = %ns_id, error = %e, "deep rekey refused");
        }
        r
    }

    /// Pauses a running deep rekey after the segment in progress; waits until it stopped.
    pub fn pause_rekey(&self, who: &str, ns_id: &str) -> Result<DeepRekeyStatus, DeepRekeyError> {
        let r = self.inner.pause_rekey(ns_id);
        self.inner.audit_result(who, "rekey-pause", ns_id, &r);
        r
    }

    /// Resumes a paused (or failed) deep rekey, optionally with a new rate.
    pub fn resume_rekey(
        &self,
        who: &str,
        ns_id: &str,
        rate_mib_s: Option<u64>,
    ) -> Result<DeepRekeyStatus, DeepRekeyError> {
        let r = self.inner.resume_rekey(who, ns_id, rate_mib_s);
        self.inner.audit_result(who, "rekey-resume", ns_id, &r);
        r
    }

    /// Changes the rate of a running or paused deep rekey.
    pub fn set_rekey_rate(
        &self,
        ns_id: &str,
        rate_mib_s: Option<u64>,
    ) -> Result<(), DeepRekeyError> {
        let rate = check_rate(rate_mib_s)?;
        let table = lock(&self.inner.namespaces);
        let e = table
            .get(ns_id)
            .ok_or_else(|| DeepRekeyError::UnknownNamespace(ns_id.to_owned()))?;
        match &e.deep {
            Some(d) if d.active() => {
                d.control.set_rate(rate);
                Ok(())
            }
            _ => Err(DeepRekeyError::NothingToDo {
                ns_id: ns_id.to_owned(),
                what: "no pass is running or paused".into(),
            }),
        }
    }

    /// The deep rekey of `ns_id` (None if it never had one since the process started and its
    /// header has none), or of every namespace that has one.
    pub fn rekey_status(
        &self,
        ns_id: Option<&str>,
    ) -> Result<Vec<DeepRekeyStatus>, DeepRekeyError> {
        let table = lock(&self.inner.namespaces);
        match ns_id {
            Some(id) => {
                let e = table
                    .get(id)
                    .ok_or_else(|| DeepRekeyError::UnknownNamespace(id.to_owned()))?;
                Ok(e.deep.iter().map(|d| d.status(id)).collect())
            }
            None => Ok(table
                .iter()
                .filter_map(|(id, e)| e.deep.as_ref().map(|d| d.status(id)))
                .collect()),
        }
    }

    /// Waits until the deep rekey of `ns_id` is no longer running (finished, paused or failed),
    /// or `timeout` passes; returns its status then.
    pub fn wait_rekey(&self, ns_id: &str, timeout: std::time::Duration) -> Option<DeepRekeyStatus> {
        let deadline = Instant::now() + timeout;
        let mut table = lock(&self.inner.namespaces);
        loop {
            let d = table.get(ns_id)?.deep.as_ref()?;
            let now = Instant::now();
            if d.state != DeepState::Running || now >= deadline {
                return Some(d.status(ns_id));
            }
            table = self
                .inner
                .changed
                .wait_timeout(table, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Inner {
    fn deep_rekey(
        self: &Arc<Self>,
        who: &str,
        ns_id: &str,
        provider: Option<&str>,
        rate_mib_s: Option<u64>,
    ) -> Result<DeepRekeyStatus, DeepRekeyError> {
        let rate = check_rate(rate_mib_s)?;
        let _serial = lock(&self.rekey_lock);
        let (io, crypto) = self.online_parts(ns_id)?;
        let busy = |what: &str| DeepRekeyError::Busy {
            ns_id: ns_id.to_owned(),
            what: what.to_owned(),
        };
        let failed = |reason: String| DeepRekeyError::Failed {
            ns_id: ns_id.to_owned(),
            reason,
        };
        let old_key = match crypto.key_control().keying() {
            Keying::Single(k) => k,
            k if k.is_plain() => {
                return Err(DeepRekeyError::WrongState {
                    ns_id: ns_id.to_owned(),
                    what: "the namespace is plaintext; namespace.encrypt encrypts it".into(),
                })
            }
            Keying::Split(_) => return Err(busy("a conversion is already in progress")),
        };
        let mut g = lock(&io);
        let stored = store::read_header(&mut **g).map_err(|e| failed(e.to_string()))?;
        refuse_unless_settled(ns_id, &stored.header.rekey)?;
        let old_slot = self
            .provider_for_slot(&stored.header.active)
            .map_err(failed)?
            .clone();
        let old_kek = (old_slot.name.clone(), stored.header.active.kek_id.clone());
        // The provider and KEK of the new slot: the current KEK, or a new one at `provider`.
        let target = match provider {
            None => old_slot.clone(),
            Some(name) => self
                .provider_by_name(name)
                .ok_or_else(|| DeepRekeyError::UnknownProvider(name.to_owned()))?
                .clone(),
        };
        let perr = |reason: String| DeepRekeyError::Provider {
            provider: target.name.clone(),
            reason,
        };
        let dek = Dek::generate().map_err(|e| failed(format!("drawing the new DEK: {e}")))?;
        let (new_id, slot) = {
            let mut p = lock(&target.inner);
            let (id, kek) = match provider {
                None => {
                    let id = stored.header.active.kek_id.clone();
                    let kek = p.as_dyn().get_kek(&id).map_err(|e| perr(e.to_string()))?;
                    if !kek.matches(&stored.header.active.fingerprint) {
                        return Err(perr(format!(
                            "KEK {id} does not match the fingerprint in the header"
                        )));
                    }
                    (id, kek)
                }
                Some(name) => match p.as_dyn().create_kek(&generated_kek_name()) {
                    Ok((id, kek)) => {
                        self.audit(who, "kek-create", &format!("{name}/{id}"), "ok");
                        (id, kek)
                    }
                    Err(e) => {
                        self.audit(who, "kek-create", name, &format!("error: {e}"));
                        return Err(perr(format!("creating the new KEK: {e}")));
                    }
                },
            };
            let slot = rekey::slot_for(p.as_dyn(), &id, &kek, &dek);
            (id, slot)
        };
        let new_key = data_key(&dek, self).map_err(failed)?;
        drop(dek);
        let unit = stored.header.data_unit.bytes();
        let seg = convert::default_segment_blocks(unit);
        let begun = convert::begin(&mut **g, &stored, slot, seg, now_unix_s())
            .map_err(|e| failed(e.to_string()))?;
        drop(g);
        crypto
            .key_control()
            .begin_split(Some(new_key), Some(old_key), 0, u64::from(seg));
        self.note_header(ns_id, &begun);
        let control = PassControl::new(rate);
        {
            let mut table = lock(&self.namespaces);
            if let Some(e) = table.get_mut(ns_id) {
                e.deep = Some(DeepRun {
                    op: PassOp::DeepRekey,
                    control: control.clone(),
                    state: DeepState::Running,
                    error: None,
                    data_blocks: begun.header.data_blocks,
                    unit,
                    new_kek: (target.name.clone(), new_id.clone()),
                    old_kek,
                    run_started: Instant::now(),
                    run_bytes0: 0,
                    thread: None,
                });
            }
        }
        tracing::info!(namespace = %ns_id, provider = %target.name, new_kek = %new_id,
            data_blocks = begun.header.data_blocks, rate_mib_s = rate, "deep rekey started");
        self.start_pass(ns_id, who)
            .map_err(|e| failed(format!("starting the pass: {e}")))?;
        self.deep_status(ns_id)
    }

    /// The deep-rekey status of `ns_id` as the manager tracks it now.
    pub(super) fn deep_status(&self, ns_id: &str) -> Result<DeepRekeyStatus, DeepRekeyError> {
        let table = lock(&self.namespaces);
        table
            .get(ns_id)
            .and_then(|e| e.deep.as_ref())
            .map(|d| d.status(ns_id))
            .ok_or_else(|| DeepRekeyError::UnknownNamespace(ns_id.to_owned()))
    }

    /// Audits a control call: `ok` or `error: <reason>`.
    fn audit_result<T>(&self, who: &str, op: &str, ns_id: &str, r: &Result<T, DeepRekeyError>) {
        match r {
            Ok(_) => self.audit(who, op, ns_id, "ok"),
            Err(e) => self.audit(who, op, ns_id, &format!("error: {e}")),
        }
    }

    /// The header I/O and crypto bdev of an online namespace.
    pub(super) fn online_parts(
        &self,
        ns_id: &str,
    ) -> Result<(SharedIo, Arc<CryptoBdev>), DeepRekeyError> {
        let table = lock(&self.namespaces);
        let e = table
            .get(ns_id)
            .ok_or_else(|| DeepRekeyError::UnknownNamespace(ns_id.to_owned()))?;
        match (&e.state, &e.crypto) {
            (NamespaceKeyState::Online, Some(c)) => Ok((e.io.clone(), c.clone())),
            (state, _) => Err(DeepRekeyError::NotOnline {
                ns_id: ns_id.to_owned(),
                state: format!("{state:?}"),
            }),
        }
    }

    /// Starts (or resumes) the pass thread of a namespace whose `deep` record is set and not
    /// running. The crypto bdev must already be keyed `Split`.
    pub(super) fn start_pass(self: &Arc<Self>, ns_id: &str, who: &str) -> std::io::Result<()> {
        let mut table = lock(&self.namespaces);
        let Some(e) = table.get_mut(ns_id) else {
            return Ok(());
        };
        let Some(d) = e.deep.as_mut() else {
            return Ok(());
        };
        if let Some(h) = d.thread.take() {
            if !h.is_finished() {
                d.thread = Some(h);
                return Ok(());
            }
            let _ = h.join();
        }
        d.state = DeepState::Running;
        d.error = None;
        d.run_started = Instant::now();
        d.run_bytes0 = d.control.bytes_done();
        let inner = self.clone();
        let (id, who) = (ns_id.to_owned(), who.to_owned());
        let spawned = std::thread::Builder::new()
            .name(format!("deep-{ns_id}"))
            .spawn(move || inner.pass_thread(&id, &who));
        match spawned {
            Ok(h) => {
                d.thread = Some(h);
                drop(table);
                self.changed.notify_all();
                Ok(())
            }
            Err(err) => {
                d.state = DeepState::Failed;
                d.error = Some(format!("starting the pass thread: {err}"));
                Err(err)
            }
        }
    }

    fn pass_thread(self: &Arc<Self>, ns_id: &str, who: &str) {
        let parts = {
            let table = lock(&self.namespaces);
            table.get(ns_id).and_then(|e| {
                let d = e.deep.as_ref()?;
                Some((e.io.clone(), e.crypto.clone()?, d.control.clone(), d.op))
            })
        };
        let Some((io, crypto, control, op)) = parts else {
            return;
        };
        let outcome = self.run_pass(ns_id, io, &crypto, &control);
        let (state, error) = match &outcome {
            Ok(PassEnd::Finished(_) | PassEnd::Decrypted(_)) => (DeepState::Finished, None),
            Ok(PassEnd::Paused(_)) => (DeepState::Paused, None),
            Err(reason) => (DeepState::Failed, Some(reason.clone())),
        };
        match &outcome {
            Ok(PassEnd::Finished(stored)) => self.note_header(ns_id, stored),
            Ok(PassEnd::Decrypted(any)) => {
                let frame = any.header.frame();
                self.note_plain(ns_id, Some(&frame));
            }
            _ => {}
        }
        let (old_kek, new_kek) = {
            let mut table = lock(&self.namespaces);
            let Some(d) = table.get_mut(ns_id).and_then(|e| e.deep.as_mut()) else {
                return;
            };
            d.state = state;
            d.error = error.clone();
            (d.old_kek.clone(), d.new_kek.clone())
        };
        self.changed.notify_all();
        let name = op.name();
        match state {
            DeepState::Finished => {
                match op {
                    PassOp::DeepRekey => tracing::info!(namespace = %ns_id, new_kek = %new_kek.1,
                        "deep rekey finished: every block is under the new DEK; the old DEK is gone from both header copies"),
                    PassOp::Encrypt => tracing::info!(namespace = %ns_id, kek = %new_kek.1,
                        "encrypt finished: every block is under the DEK; the journal is zeroed"),
                    PassOp::Decrypt => tracing::info!(namespace = %ns_id,
                        "decrypt finished: every block is plaintext; the header is retired and holds no key"),
                }
                self.audit(who, op.audit_op(), ns_id, "ok: finished");
                if op == PassOp::DeepRekey && old_kek != new_kek {
                    let _serial = lock(&self.rekey_lock);
                    let action = self.retire_kek(who, &old_kek.0, &old_kek.1);
                    tracing::info!(namespace = %ns_id, old_kek = %old_kek.1, ?action, "old KEK after deep rekey");
                }
            }
            DeepState::Paused => {
                tracing::info!(namespace = %ns_id, watermark = control.watermark(), "{name} paused");
                self.audit(who, op.audit_op(), ns_id, "ok: paused");
            }
            DeepState::Failed | DeepState::Running => {
                let reason = error.unwrap_or_default();
                tracing::error!(namespace = %ns_id, %reason, "{name} stopped on an error; rekey.resume retries it");
                self.audit(who, op.audit_op(), ns_id, &format!("error: {reason}"));
            }
        }
    }

    fn run_pass(
        &self,
        ns_id: &str,
        io: SharedIo,
        crypto: &Arc<CryptoBdev>,
        control: &PassControl,
    ) -> Result<PassEnd, String> {
        let ctl = crypto.key_control();
        let (below, above) = match ctl.keying() {
            Keying::Split(s) if !s.is_plain() => (s.below.clone(), s.above.clone()),
            _ => return Err("the crypto bdev is not keyed for a conversion pass".into()),
        };
        let mut meta = LockedIo(io);
        let current = store::read_header(&mut meta).map_err(|e| e.to_string())?;
        let base = crypto.base().clone() as Arc<dyn Bdev>;
        let mut data: Box<dyn DataIo + Send> = match &self.pass_io {
            Some(open) => {
                open(ns_id, base).map_err(|e| format!("opening the pass's data I/O: {e}"))?
            }
            None => Box::new(BdevDataIo::new(base, CoreId(0))),
        };
        let mut nio = NamespaceIo {
            meta: &mut meta,
            data: data.as_mut(),
        };
        deep::run_any(
            &mut nio,
            current,
            ctl,
            below.as_ref(),
            above.as_ref(),
            control,
            &now_unix_s,
        )
        .map_err(|e| e.to_string())
    }

    fn pause_rekey(&self, ns_id: &str) -> Result<DeepRekeyStatus, DeepRekeyError> {
        let handle = {
            let mut table = lock(&self.namespaces);
            let e = table
                .get_mut(ns_id)
                .ok_or_else(|| DeepRekeyError::UnknownNamespace(ns_id.to_owned()))?;
            match e.deep.as_mut() {
                Some(d) if d.state == DeepState::Running => {
                    d.control.pause();
                    d.thread.take()
                }
                Some(d) => {
                    return Err(DeepRekeyError::NothingToDo {
                        ns_id: ns_id.to_owned(),
                        what: format!("the pass is not running ({:?})", d.state),
                    })
                }
                None => {
                    return Err(DeepRekeyError::NothingToDo {
                        ns_id: ns_id.to_owned(),
                        what: "no deep rekey, encrypt or decrypt pass to pause".into(),
                    })
                }
            }
        };
        if let Some(h) = handle {
            let _ = h.join();
        }
        self.deep_status(ns_id)
    }

    fn resume_rekey(
        self: &Arc<Self>,
        who: &str,
        ns_id: &str,
        rate_mib_s: Option<u64>,
    ) -> Result<DeepRekeyStatus, DeepRekeyError> {
        let rate = rate_mib_s.map(|r| check_rate(Some(r))).transpose()?;
        {
            let table = lock(&self.namespaces);
            let e = table
                .get(ns_id)
                .ok_or_else(|| DeepRekeyError::UnknownNamespace(ns_id.to_owned()))?;
            match e.deep.as_ref() {
                Some(d) if matches!(d.state, DeepState::Paused | DeepState::Failed) => {
                    if let Some(r) = rate {
                        d.control.set_rate(r);
                    }
                    d.control.resume();
                }
                Some(d) => {
                    return Err(DeepRekeyError::NothingToDo {
                        ns_id: ns_id.to_owned(),
                        what: format!("the pass is {:?}, not paused", d.state),
                    })
                }
                None => {
                    return Err(DeepRekeyError::NothingToDo {
                        ns_id: ns_id.to_owned(),
                        what: "no deep rekey, encrypt or decrypt pass to resume".into(),
                    })
                }
            }
        }
        self.start_pass(ns_id, who)
            .map_err(|e| DeepRekeyError::Failed {
                ns_id: ns_id.to_owned(),
                reason: format!("starting the pass: {e}"),
            })?;
        self.deep_status(ns_id)
    }

    /// Stops every pass between segments and waits for the threads (shutdown, removal).
    pub(super) fn stop_pass(&self, ns_id: Option<&str>) {
        let handles: Vec<JoinHandle<()>> = {
            let mut table = lock(&self.namespaces);
            table
                .iter_mut()
                .filter(|(id, _)| ns_id.is_none_or(|n| n == id.as_str()))
                .filter_map(|(_, e)| {
                    let d = e.deep.as_mut()?;
                    d.control.pause();
                    d.thread.take()
                })
                .collect()
        };
        for h in handles {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
pub(super) mod tests;
