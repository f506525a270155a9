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
use crate::keys::convert::{self, ConvertError};
use crate::keys::deep::{BdevDataIo, NamespaceIo, PassControl};
use crate::keys::header::{
    DataUnit, Detached, Direction, PlainHeader, RekeyState, METADATA_REGION_BYTES,
};
use crate::keys::header_io::FileHeaderIo;
use crate::keys::store::{self, HeaderIo, StoreError, Stored, StoredAny};
use crate::keys::{open_encrypted, open_slot, Dek, OpenError, Opened};
use crate::types::CoreId;

use super::deep::{DeepRun, DeepState, PassOp};

/// How a failed open is classified.
fn classify_open(e: &OpenError) -> Fail {
    if e.is_transient() {
        Fail::Transient(e.to_string())
    } else {
        Fail::Permanent(e.to_string())
    }
}

impl Inner {
    pub(super) fn unlock_loop(self: &Arc<Self>, ns_id: &str, stop: &Receiver<()>) {
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
                Ok((bdev, resume)) => {
                    self.audit(&who, "unlock", ns_id, "ok");
                    // Hand the bdev over first, so that "online" in states() never shows a
                    // namespace the target has not been given yet.
                    if let Some(cb) = &self.on_online {
                        cb(ns_id, bdev.clone() as Arc<dyn Bdev>);
                    }
                    self.set_state(ns_id, NamespaceKeyState::Online, |e| {
                        e.crypto = Some(bdev);
                        e.last_error = None;
                        if let Some(run) = resume {
                            e.deep = Some(run);
                        }
                    });
                    if let Err(e) = self.start_pass(ns_id, &who) {
                        tracing::error!(namespace = %ns_id, error = %e,
                            "cannot resume the deep rekey pass; rekey.resume retries it");
                    }
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
    /// With a deep rekey, encrypt or decrypt in progress, also recovers its interrupted segment
    /// and returns the pass to resume. A plaintext namespace (retired header, or none where the
    /// config allows plaintext) comes online as a crypto bdev keyed plaintext.
    fn try_unlock(&self, ns_id: &str) -> Result<(Arc<CryptoBdev>, Option<DeepRun>), Fail> {
        let (io, backing, provider, kek_name, create, who, plaintext_ok, header_file) = {
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
                e.plaintext_ok,
                e.header_file.clone(),
            )
        };
        let device_bytes = backing
            .num_blocks()
            .saturating_mul(u64::from(backing.block_size()));
        let mut io = lock(&io);
        if let Some(path) = &header_file {
            match std::fs::symlink_metadata(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if !plaintext_ok {
                        return Err(Fail::Permanent(format!(
                            "detached header {}: the file does not exist, and without it the \
                             data cannot be read (set plaintext: true only for a device that \
                             holds plaintext and has never been encrypted)",
                            path.display()
                        )));
                    }
                    tracing::info!(namespace = %ns_id, header_file = %path.display(),
                        "no detached header file: the whole device is served as plaintext");
                    self.note_plain(ns_id, None);
                    let bdev = self.plain_bdev(ns_id, backing.clone(), 0, backing.num_blocks())?;
                    return Ok((bdev, None));
                }
                _ => {}
            }
            let file = FileHeaderIo::open_regular(path, METADATA_REGION_BYTES).map_err(|e| {
                let why = match e.raw_os_error() {
                    Some(libc::ELOOP) => "it is a symbolic link".to_owned(),
                    _ => e.to_string(),
                };
                Fail::Permanent(format!("detached header {}: {why}", path.display()))
            })?;
            *io = Box::new(file);
        }
        let label = header_file.as_ref().map(|_| ns_id);
        let read = store::read_any(&mut **io);
        if let Ok(any) = &read {
            any.header
                .frame()
                .check_binding(label, device_bytes)
                .map_err(|e| match &header_file {
                    Some(p) => Fail::Permanent(format!("detached header {}: {e}", p.display())),
                    None => Fail::Permanent(format!("header: {e}")),
                })?;
        }
        let opened = match read {
            Ok(any) => match any.keyed() {
                None => return self.open_retired(ns_id, &mut **io, &backing, &any),
                Some(stored) if matches!(stored.header.rekey, RekeyState::Deep(_)) => {
                    self.note_header(ns_id, &stored);
                    let (crypto, run) = self.open_deep(ns_id, &mut **io, &backing, &stored)?;
                    return Ok((crypto, Some(run)));
                }
                Some(stored) if matches!(stored.header.rekey, RekeyState::Convert(_)) => {
                    self.note_header(ns_id, &stored);
                    let (crypto, run) = self.open_convert(ns_id, &mut **io, &backing, &stored)?;
                    return Ok((crypto, Some(run)));
                }
                Some(stored) => {
                    self.note_header(ns_id, &stored);
                    let opened = self.open_stored(&mut **io, &stored)?;
                    self.finish_interrupted_deep(ns_id, &mut **io, opened)?
                }
            },
            Err(StoreError::NotFormatted) if create && header_file.is_none() => {
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
            Err(StoreError::NotFormatted | StoreError::NoValidCopy { .. }) if plaintext_ok => {
                return self.open_headerless(ns_id, &mut **io, &backing, header_file.is_some());
            }
            Err(StoreError::NotFormatted) => {
                return Err(Fail::Permanent(
                    "no nvseal header on the device (both copies blank), and neither create nor \
                     plaintext is set"
                        .into(),
                ))
            }
            Err(e @ StoreError::Io { .. }) => return Err(Fail::Transient(e.to_string())),
            Err(e) => return Err(Fail::Permanent(e.to_string())),
        };
        drop(io);
        Ok((self.build_bdev(ns_id, backing, opened)?, None))
    }

    /// A retired header (a decrypted namespace): the data area it describes, plaintext. If a
    /// decrypt's last write was cut short, the other copy may still hold the wrapped DEK: it is
    /// overwritten first.
    fn open_retired(
        &self,
        ns_id: &str,
        io: &mut dyn HeaderIo,
        backing: &Arc<dyn Bdev>,
        any: &StoredAny,
    ) -> Result<(Arc<CryptoBdev>, Option<DeepRun>), Fail> {
        let any = convert::scrub_other_copy_any(io, any).map_err(|e| match e {
            ConvertError::Io(e) => Fail::Transient(format!("retired header: {e}")),
            e => Fail::Permanent(format!("retired header: {e}")),
        })?;
        let frame = any.header.frame();
        self.note_plain(ns_id, Some(&frame));
        let bs = u64::from(frame.data_unit.bytes());
        if u64::from(backing.block_size()) != bs {
            return Err(Fail::Permanent(format!(
                "retired header data unit {bs} bytes differs from the device block size {}",
                backing.block_size()
            )));
        }
        tracing::info!(namespace = %ns_id, data_blocks = frame.data_blocks,
            "plaintext namespace (retired header): served in the clear");
        let bdev = self.plain_bdev(
            ns_id,
            backing.clone(),
            frame.data_offset_bytes / bs,
            frame.data_blocks,
        )?;
        Ok((bdev, None))
    }

    /// No valid header, and the config allows plaintext: the data area after the reserved
    /// metadata region (or, detached, the whole device) is served in the clear. The region must
    /// hold nothing but what an interrupted start of an encrypt can leave (a retired header,
    /// whole or torn): anything else may be a damaged header with a key, so it is refused and
    /// nothing is served. Reads only.
    fn open_headerless(
        &self,
        ns_id: &str,
        io: &mut dyn HeaderIo,
        backing: &Arc<dyn Bdev>,
        detached: bool,
    ) -> Result<(Arc<CryptoBdev>, Option<DeepRun>), Fail> {
        let frame = self
            .plain_frame(ns_id, backing, detached)
            .map_err(Fail::Permanent)?;
        convert::plain_frame_for_region(io, &frame).map_err(|e| match e {
            ConvertError::Io(e) => Fail::Transient(format!("reading the metadata region: {e}")),
            e => Fail::Permanent(format!(
                "plaintext namespace: the metadata region holds no valid header but is not \
                 blank either ({e}); it may be a damaged header with a key, so nothing is served"
            )),
        })?;
        self.note_plain(ns_id, None);
        tracing::info!(namespace = %ns_id, data_blocks = frame.data_blocks,
            "plaintext namespace (no header yet): served in the clear; namespace.encrypt encrypts it");
        let bs = u64::from(frame.data_unit.bytes());
        let bdev = self.plain_bdev(
            ns_id,
            backing.clone(),
            frame.data_offset_bytes / bs,
            frame.data_blocks,
        )?;
        Ok((bdev, None))
    }

    /// The retired-header frame of a plaintext namespace with no header: fresh identities, the
    /// data area after the metadata region (detached: the whole device, labelled `ns_id`).
    pub(super) fn plain_frame(
        &self,
        ns_id: &str,
        backing: &Arc<dyn Bdev>,
        detached: bool,
    ) -> Result<PlainHeader, String> {
        let unit = DataUnit::from_bytes(backing.block_size())
            .ok_or_else(|| format!("block size {} unsupported", backing.block_size()))?;
        let bs = u64::from(backing.block_size());
        let (offset, blocks) = if detached {
            (0, backing.num_blocks())
        } else {
            let skip = METADATA_REGION_BYTES / bs;
            (
                METADATA_REGION_BYTES,
                backing.num_blocks().saturating_sub(skip),
            )
        };
        if blocks == 0 {
            return Err(format!(
                "the device ({} blocks) has no room for a data area after the 1 MiB metadata region",
                backing.num_blocks()
            ));
        }
        let now = crate::keys::now_unix_s();
        Ok(PlainHeader {
            generation: 1,
            device_uuid: uuid::Uuid::new_v4(),
            namespace_uuid: uuid::Uuid::new_v4(),
            data_unit: unit,
            data_offset_bytes: offset,
            data_blocks: blocks,
            created_unix_s: now,
            updated_unix_s: now,
            detached: detached.then(|| Detached {
                label: ns_id.to_owned(),
            }),
        })
    }

    /// A crypto bdev keyed plaintext over `blocks` units of `backing` from `offset_blocks`.
    fn plain_bdev(
        &self,
        ns_id: &str,
        backing: Arc<dyn Bdev>,
        offset_blocks: u64,
        blocks: u64,
    ) -> Result<Arc<CryptoBdev>, Fail> {
        let fits = offset_blocks
            .checked_add(blocks)
            .is_some_and(|end| end <= backing.num_blocks());
        if !fits || blocks == 0 {
            return Err(Fail::Permanent(format!(
                "data area ({blocks} blocks at block {offset_blocks}) does not fit the device ({} blocks)",
                backing.num_blocks()
            )));
        }
        let slice = SliceBdev::new(&format!("{ns_id}-data"), backing, offset_blocks, blocks)
            .map_err(|e| Fail::Permanent(e.to_string()))?;
        let tier = match self.xts_max_tier {
            Some(cap) => crate::crypto::xts::Tier::best_at_most(cap),
            None => crate::crypto::xts::Tier::best_available(),
        };
        let crypto = CryptoBdev::plaintext(&format!("{ns_id}-crypt"), Arc::new(slice), tier, false)
            .map_err(|e| Fail::Permanent(e.to_string()))?;
        Ok(Arc::new(crypto))
    }

    /// Opens a namespace whose header says an encrypt or decrypt runs: unwraps the DEK, restores
    /// the segment a crash interrupted from the journal (before any host I/O can reach the data),
    /// and builds the crypto bdev keyed `Split` at the header's watermark (encrypt: the DEK
    /// below, plaintext above; decrypt: plaintext below, the DEK above).
    fn open_convert(
        &self,
        ns_id: &str,
        io: &mut dyn HeaderIo,
        backing: &Arc<dyn Bdev>,
        stored: &Stored,
    ) -> Result<(Arc<CryptoBdev>, DeepRun), Fail> {
        let c = convert::conversion_state(&stored.header)
            .map_err(|e| Fail::Permanent(e.to_string()))?
            .clone();
        let op = match c.direction {
            Direction::Encrypt => PassOp::Encrypt,
            Direction::Decrypt => PassOp::Decrypt,
        };
        let dek = self.open_slot_dek(&stored.header.active, op.name())?;
        let key = self.data_key(&dek)?;
        drop(dek);
        let slice = self.data_slice(ns_id, backing.clone(), &stored.header)?;
        let mut data = BdevDataIo::new(slice.clone(), CoreId(0));
        let keys = match c.direction {
            Direction::Encrypt => convert::Keys {
                below: Some(key.clone()),
                above: None,
            },
            Direction::Decrypt => convert::Keys {
                below: None,
                above: Some(key.clone()),
            },
        };
        let recovery = convert::recover(
            &mut NamespaceIo {
                meta: io,
                data: &mut data,
            },
            stored,
            &keys,
        )
        .map_err(|e| match e {
            ConvertError::Io(e) => Fail::Transient(format!("{} recovery: {e}", op.name())),
            e => Fail::Permanent(format!("{} recovery: {e}", op.name())),
        })?;
        tracing::info!(namespace = %ns_id, operation = op.name(), watermark = c.watermark_blocks,
            data_blocks = stored.header.data_blocks, ?recovery,
            "conversion in progress: recovered; the pass resumes once the namespace is online");
        let crypto = CryptoBdev::plaintext(&format!("{ns_id}-crypt"), slice, key.tier(), false)
            .map_err(|e| Fail::Permanent(e.to_string()))?;
        let (below, above) = match c.direction {
            Direction::Encrypt => (Some(key), None),
            Direction::Decrypt => (None, Some(key)),
        };
        crypto.key_control().begin_split(
            below,
            above,
            c.watermark_blocks,
            u64::from(c.segment_blocks),
        );
        let kek = self.slot_ref(&stored.header.active);
        let run = DeepRun {
            op,
            control: PassControl::new(0),
            state: DeepState::Running,
            error: None,
            data_blocks: stored.header.data_blocks,
            unit: stored.header.data_unit.bytes(),
            new_kek: kek.clone(),
            old_kek: kek,
            run_started: Instant::now(),
            run_bytes0: 0,
            thread: None,
        };
        run.control.set_watermark(c.watermark_blocks);
        Ok((Arc::new(crypto), run))
    }

    /// Unwraps the DEK of a header slot at the provider it names.
    fn open_slot_dek(&self, slot: &crate::keys::KeySlot, which: &str) -> Result<Dek, Fail> {
        let p = self
            .provider_for_slot(slot)
            .map_err(Fail::Permanent)?
            .clone();
        let r = open_slot(lock(&p.inner).as_dyn(), slot);
        r.map_err(|e| {
            let text = format!("{which}: KEK {}: {e}", slot.kek_id);
            if e.is_transient() {
                Fail::Transient(text)
            } else {
                Fail::Permanent(text)
            }
        })
    }

    /// Opens a namespace whose header says a deep rekey runs: unwraps both DEKs (the old KEK
    /// for the data above the watermark, the new KEK for below; each may be at another
    /// provider, and the namespace stays locked until both open), restores the segment a crash
    /// interrupted from the journal (before any host I/O can reach the data), and builds the
    /// crypto bdev keyed `Split` at the header's watermark.
    fn open_deep(
        &self,
        ns_id: &str,
        io: &mut dyn HeaderIo,
        backing: &Arc<dyn Bdev>,
        stored: &Stored,
    ) -> Result<(Arc<CryptoBdev>, DeepRun), Fail> {
        let RekeyState::Deep(d) = &stored.header.rekey else {
            return Err(Fail::Permanent("no deep rekey in the header".into()));
        };
        let old = self.open_slot_dek(
            &stored.header.active,
            "deep rekey in progress: old (active)",
        )?;
        let new = self.open_slot_dek(&d.new, "deep rekey in progress: new (pending)")?;
        let old_key = self.data_key(&old)?;
        let new_key = self.data_key(&new)?;
        drop((old, new));
        let slice = self.data_slice(ns_id, backing.clone(), &stored.header)?;
        let mut data = BdevDataIo::new(slice.clone(), CoreId(0));
        let recovery = convert::recover(
            &mut NamespaceIo {
                meta: io,
                data: &mut data,
            },
            stored,
            &convert::Keys {
                below: Some(new_key.clone()),
                above: Some(old_key.clone()),
            },
        )
        .map_err(|e| match e {
            ConvertError::Io(e) => Fail::Transient(format!("deep rekey recovery: {e}")),
            e => Fail::Permanent(format!("deep rekey recovery: {e}")),
        })?;
        tracing::info!(namespace = %ns_id, watermark = d.watermark_blocks,
            data_blocks = stored.header.data_blocks, ?recovery,
            "deep rekey in progress: recovered; the pass resumes once the namespace is online");
        let crypto = CryptoBdev::new(&format!("{ns_id}-crypt"), slice, old_key.clone(), false)
            .map_err(|e| Fail::Permanent(e.to_string()))?;
        crypto.key_control().begin_split(
            Some(new_key),
            Some(old_key),
            d.watermark_blocks,
            u64::from(d.segment_blocks),
        );
        let run = DeepRun {
            op: PassOp::DeepRekey,
            control: PassControl::new(0),
            // Started as soon as the namespace is online (unlock_loop).
            state: DeepState::Running,
            error: None,
            data_blocks: stored.header.data_blocks,
            unit: stored.header.data_unit.bytes(),
            new_kek: self.slot_ref(&d.new),
            old_kek: self.slot_ref(&stored.header.active),
            run_started: Instant::now(),
            run_bytes0: 0,
            thread: None,
        };
        run.control.set_watermark(d.watermark_blocks);
        Ok((Arc::new(crypto), run))
    }

    /// A deep rekey's last steps write the finished header into one copy, then the other. If
    /// a crash fell between them, the other copy still holds the old wrapped DEK: overwrite it
    /// now, so the old DEK is on no copy once the namespace is online.
    fn finish_interrupted_deep(
        &self,
        ns_id: &str,
        io: &mut dyn HeaderIo,
        opened: Opened,
    ) -> Result<Opened, Fail> {
        let stale = match store::read_copy(io, opened.stored.copy.other()) {
            Ok(other) => {
                let cur = &opened.stored.header;
                cur.rekey == RekeyState::None
                    && match &other.rekey {
                        RekeyState::Deep(d) => d.new == cur.active,
                        // An encrypt's finish cut between its two copies.
                        RekeyState::Convert(c) => {
                            c.direction == Direction::Encrypt && other.active == cur.active
                        }
                        _ => false,
                    }
            }
            Err(_) => false,
        };
        if !stale {
            return Ok(opened);
        }
        let stored = convert::scrub_other_copy(io, &opened.stored).map_err(|e| match e {
            ConvertError::Io(e) => Fail::Transient(format!("finishing the deep rekey: {e}")),
            e => Fail::Permanent(format!("finishing the deep rekey: {e}")),
        })?;
        tracing::info!(namespace = %ns_id,
            "deep rekey had finished but the other header copy still held the old key slot; overwritten");
        self.note_header(ns_id, &stored);
        Ok(Opened { stored, ..opened })
    }

    fn data_key(&self, dek: &Dek) -> Result<DataKey, Fail> {
        let xts_key = XtsKey::from_bytes(dek.expose())
            .map_err(|e| Fail::Permanent(format!("DEK unusable: {e}")))?;
        DataKey::new(&xts_key, self.xts_max_tier)
            .map_err(|e| Fail::Permanent(format!("XTS engine: {e}")))
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
        let slice = self.data_slice(ns_id, backing, &header)?;
        let key = self.data_key(&dek)?;
        drop(dek);
        let crypto = CryptoBdev::new(&format!("{ns_id}-crypt"), slice, key, false)
            .map_err(|e| Fail::Permanent(e.to_string()))?;
        let offset_blocks = header.data_offset_bytes / u64::from(header.data_unit.bytes());
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

impl Inner {
    /// The data area of `backing` the header describes, as a slice bdev (geometry checked).
    fn data_slice(
        &self,
        ns_id: &str,
        backing: Arc<dyn Bdev>,
        header: &crate::keys::Header,
    ) -> Result<Arc<dyn Bdev>, Fail> {
        let bs = u64::from(backing.block_size());
        if u64::from(header.data_unit.bytes()) != bs {
            return Err(Fail::Permanent(format!(
                "header data unit {} bytes differs from the device block size {bs}",
                header.data_unit.bytes()
            )));
        }
        if !header.data_offset_bytes.is_multiple_of(bs) {
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
        let slice = SliceBdev::new(
            &format!("{ns_id}-data"),
            backing,
            offset_blocks,
            header.data_blocks,
        )
        .map_err(|e| Fail::Permanent(e.to_string()))?;
        Ok(Arc::new(slice))
    }
}
