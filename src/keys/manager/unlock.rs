//! The boot-time unlock of an encrypted namespace: the per-namespace unlock loop with
//! exponential back-off, one unlock attempt (read header, format if blank and asked, open with
//! the active or pending KEK), and building slice → crypto bdev once the DEK is unwrapped.
//!
//! Runs on each namespace's own `unlock-<ns>` thread (spawned by
//! [`KeyManager::add_encrypted`](super::KeyManager::add_encrypted)); the `on_online` callback is
//! called from here. Split out of the manager so the retry/back-off state machine stands apart
//! from the namespace table and the rekey path.

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::{lock, Fail, Inner, NamespaceKeyState};
use crate::bdev::slice::SliceBdev;
use crate::bdev::Bdev;
use crate::crypto::bdev::{CryptoBdev, DataKey};
use crate::crypto::key::XtsKey;
use crate::keys::header::RekeyState;
use crate::keys::store::{self, HeaderIo, StoreError, Stored};
use crate::keys::{open_encrypted, OpenError, Opened};

/// How a failed open is classified.
fn classify_open(e: &OpenError) -> Fail {
    if e.is_transient() {
        Fail::Transient(e.to_string())
    } else {
        Fail::Permanent(e.to_string())
    }
}

impl Inner {
    pub(super) fn unlock_loop(&self, ns_id: &str, stop: &Receiver<()>) {
        let mut attempt: u32 = 0;
        let mut last_transient: Option<String> = None;
        loop {
            attempt = attempt.saturating_add(1);
            if !self.set_state(ns_id, NamespaceKeyState::Unlocking { attempt }, |e| {
                e.retry_at = None;
            }) {
                return;
            }
            let who = lock(&self.namespaces)
                .get(ns_id)
                .map(|e| e.who.clone())
                .unwrap_or_default();
            match self.try_unlock(ns_id) {
                Ok(bdev) => {
                    self.audit(&who, "unlock", ns_id, "ok");
                    // Hand the bdev over first, so that "online" in states() never shows a
                    // namespace the target has not been given yet.
                    if let Some(cb) = &self.on_online {
                        cb(ns_id, bdev.clone() as Arc<dyn Bdev>);
                    }
                    self.set_state(ns_id, NamespaceKeyState::Online, |e| {
                        e.crypto = Some(bdev);
                        e.last_error = None;
                    });
                    return;
                }
                Err(Fail::Permanent(reason)) => {
                    self.audit(&who, "unlock", ns_id, &format!("error: {reason}"));
                    self.set_state(
                        ns_id,
                        NamespaceKeyState::Error {
                            reason: reason.clone(),
                        },
                        |e| e.last_error = Some(reason.clone()),
                    );
                    return;
                }
                Err(Fail::Transient(reason)) => {
                    // Audit the first failure and each change of cause, not every retry.
                    if last_transient.as_deref() != Some(reason.as_str()) {
                        self.audit(&who, "unlock", ns_id, &format!("retrying: {reason}"));
                    }
                    let delay = self.retry.delay(attempt);
                    self.set_state(ns_id, NamespaceKeyState::Locked, |e| {
                        e.last_error = Some(reason.clone());
                        e.retry_at = Some(Instant::now() + delay);
                    });
                    last_transient = Some(reason);
                    match stop.recv_timeout(delay) {
                        Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            }
        }
    }

    /// One unlock attempt: read the header (format it if blank and asked), open, build bdevs.
    fn try_unlock(&self, ns_id: &str) -> Result<Arc<CryptoBdev>, Fail> {
        let (io, backing, provider, kek_name, create, who) = {
            let table = lock(&self.namespaces);
            let e = table
                .get(ns_id)
                .ok_or_else(|| Fail::Permanent("namespace removed".into()))?;
            (
                e.io.clone(),
                e.backing.clone(),
                e.provider.clone(),
                e.kek_name.clone(),
                e.create,
                e.who.clone(),
            )
        };
        let mut io = lock(&io);
        let opened = match store::read_header(&mut **io) {
            Ok(stored) => {
                self.note_header(ns_id, &stored);
                self.open_stored(&mut **io, &stored)?
            }
            Err(StoreError::NotFormatted) if create => {
                self.refuse_unless_blank(&mut **io, ns_id, &who, &backing)?;
                let opened = self.format(
                    &mut **io,
                    ns_id,
                    &who,
                    &backing,
                    &provider,
                    kek_name.as_deref(),
                )?;
                self.note_header(ns_id, &opened.stored);
                opened
            }
            Err(StoreError::NotFormatted) => {
                return Err(Fail::Permanent(
                    "no nvseal header on the device (both copies blank) and create is off".into(),
                ))
            }
            Err(e @ StoreError::Io { .. }) => return Err(Fail::Transient(e.to_string())),
            Err(e) => return Err(Fail::Permanent(e.to_string())),
        };
        drop(io);
        self.build_bdev(ns_id, backing, opened)
    }

    /// Opens with the provider the active slot names; during an interrupted rekey onto another
    /// provider, falls back to the pending slot's provider.
    pub(super) fn open_stored(
        &self,
        io: &mut dyn HeaderIo,
        stored: &Stored,
    ) -> Result<Opened, Fail> {
        let active = self
            .provider_for_slot(&stored.header.active)
            .map(Arc::clone);
        let first = match &active {
            Ok(p) => open_encrypted(io, lock(&p.inner).as_dyn()),
            Err(reason) => return self.open_pending_only(io, stored, reason.clone()),
        };
        let err = match first {
            Ok(o) => return Ok(o),
            Err(e) => e,
        };
        let RekeyState::Shallow { new } = &stored.header.rekey else {
            return Err(classify_open(&err));
        };
        let pending = match self.provider_for_slot(new) {
            Ok(p) if active.as_ref().is_ok_and(|a| !Arc::ptr_eq(a, p)) => p.clone(),
            _ => return Err(classify_open(&err)),
        };
        let second = open_encrypted(io, lock(&pending.inner).as_dyn());
        match second {
            Ok(o) => Ok(o),
            Err(e2) => {
                let text = format!("active KEK: {err}; pending KEK: {e2}");
                if err.is_transient() || e2.is_transient() {
                    Err(Fail::Transient(text))
                } else {
                    Err(Fail::Permanent(text))
                }
            }
        }
    }

    fn open_pending_only(
        &self,
        io: &mut dyn HeaderIo,
        stored: &Stored,
        reason: String,
    ) -> Result<Opened, Fail> {
        if let RekeyState::Shallow { new } = &stored.header.rekey {
            if let Ok(p) = self.provider_for_slot(new) {
                return open_encrypted(io, lock(&p.inner).as_dyn()).map_err(|e| classify_open(&e));
            }
        }
        Err(Fail::Permanent(reason))
    }

    /// Checks the header's geometry against the device and builds slice → crypto bdev.
    fn build_bdev(
        &self,
        ns_id: &str,
        backing: Arc<dyn Bdev>,
        opened: Opened,
    ) -> Result<Arc<CryptoBdev>, Fail> {
        let (header, dek) = opened.into_parts();
        let bs = u64::from(backing.block_size());
        if u64::from(header.data_unit.bytes()) != bs {
            return Err(Fail::Permanent(format!(
                "header data unit {} bytes differs from the device block size {bs}",
                header.data_unit.bytes()
            )));
        }
        if header.data_offset_bytes % bs != 0 {
            return Err(Fail::Permanent(format!(
                "header data offset {} is not a multiple of the block size {bs}",
                header.data_offset_bytes
            )));
        }
        let offset_blocks = header.data_offset_bytes / bs;
        let fits = offset_blocks
            .checked_add(header.data_blocks)
            .is_some_and(|end| end <= backing.num_blocks());
        if !fits {
            return Err(Fail::Permanent(format!(
                "header data area ({} blocks at block {offset_blocks}) does not fit the device ({} blocks)",
                header.data_blocks,
                backing.num_blocks()
            )));
        }
        let xts_key = XtsKey::from_bytes(dek.expose())
            .map_err(|e| Fail::Permanent(format!("DEK unusable: {e}")))?;
        drop(dek);
        let key = DataKey::new(&xts_key, self.xts_max_tier)
            .map_err(|e| Fail::Permanent(format!("XTS engine: {e}")))?;
        drop(xts_key);
        let slice = SliceBdev::new(
            &format!("{ns_id}-data"),
            backing,
            offset_blocks,
            header.data_blocks,
        )
        .map_err(|e| Fail::Permanent(e.to_string()))?;
        let crypto = CryptoBdev::new(&format!("{ns_id}-crypt"), Arc::new(slice), key, false)
            .map_err(|e| Fail::Permanent(e.to_string()))?;
        tracing::info!(
            namespace = %ns_id,
            data_blocks = header.data_blocks,
            offset_blocks,
            tier = crypto.tier().name(),
            "crypto bdev ready"
        );
        Ok(Arc::new(crypto))
    }
}
