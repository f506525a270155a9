//! Key management of encrypted namespaces, vSAN style: a KEK held by a key provider (KMIP
//! cluster or local key file), a per-namespace DEK wrapped under it and stored in a two-copy
//! metadata header at the start of the backing device.
//!
//! * [`header`] — the on-disk header layout and its validating decoder.
//! * [`store`] — the two copies, crash-safe update, the [`store::HeaderIo`] trait and the
//!   fault-injecting [`store::MemIo`].
//! * [`wrap`] — [`Dek`], AES key wrap; re-exports [`Kek`] and [`KekFingerprint`] (defined once,
//!   in `kms::key`, for both this layer and the KMIP client).
//! * [`provider`] — the [`KeyProvider`] trait both providers implement.
//! * [`local`] — the local key-file provider (not for production).
//! * [`rekey`] — the header steps that replace a key slot, shared by every rekey.
//!
//! This module holds the namespace key lifecycle: [`format_encrypted`], [`open_encrypted`],
//! [`shallow_rekey`]. All of it is blocking and runs on control threads (KMS round trips, header
//! writes with fdatasync); a reactor only ever receives the unwrapped DEK (as the XTS engine's
//! key) in a mailbox message.

pub mod convert;
pub mod crashpoint;
pub mod deep;
pub mod header;
pub mod header_io;
pub mod kmip_provider;
pub mod local;
pub mod manager;
pub mod provider;
pub mod rekey;
pub mod store;
pub mod wrap;

use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;
use uuid::Uuid;

pub use header::{CopyId, DataUnit, Header, KeySlot, RekeyState};
pub use provider::{KekId, KeyProvider, ProviderError, ProviderKind};
pub use store::{HeaderIo, StoreError, Stored};
pub use wrap::{unwrap_dek, wrap_dek, Dek, Kek, KekFingerprint, KeyError, WrappedDek};

use header::{DEFAULT_DATA_OFFSET_BYTES, METADATA_REGION_BYTES};

/// What to format.
#[derive(Clone, Debug)]
pub struct FormatParams {
    /// Identity of the backing device (a fresh v4 UUID by default).
    pub device_uuid: Uuid,
    /// Identity of the namespace.
    pub namespace_uuid: Uuid,
    /// Logical block size = XTS data unit.
    pub data_unit: DataUnit,
    /// Size of the whole backing device in bytes; the data area is what follows the 1 MiB
    /// metadata region, rounded down to whole data units.
    pub device_bytes: u64,
    /// The KEK to wrap the new DEK under (it must exist at the provider).
    pub kek_id: KekId,
    /// Replace an existing valid header (destroys access to the data it protected).
    pub overwrite: bool,
}

impl FormatParams {
    /// Parameters with a fresh device UUID and `overwrite = false`.
    pub fn new(
        namespace_uuid: Uuid,
        data_unit: DataUnit,
        device_bytes: u64,
        kek_id: KekId,
    ) -> Self {
        Self {
            device_uuid: Uuid::new_v4(),
            namespace_uuid,
            data_unit,
            device_bytes,
            kek_id,
            overwrite: false,
        }
    }
}

/// Which key slot opened the namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotUsed {
    /// The active slot (normal case).
    Active,
    /// The pending slot of an interrupted shallow rekey (the old KEK was unavailable).
    Pending,
}

/// An opened (or freshly formatted) encrypted namespace.
pub struct Opened {
    /// The current header, which copy it came from and the other copy's state.
    pub stored: Stored,
    /// The unwrapped DEK.
    pub dek: Dek,
    /// Which slot's KEK unwrapped it.
    pub slot: SlotUsed,
}

/// Written by hand so that the DEK field can never be printed, whatever `Dek`'s own Debug does.
impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("stored", &self.stored)
            .field("dek", &"<redacted>")
            .field("slot", &self.slot)
            .finish()
    }
}

impl Opened {
    /// The current header.
    pub fn header(&self) -> &Header {
        &self.stored.header
    }

    /// Splits into header and DEK.
    pub fn into_parts(self) -> (Header, Dek) {
        (self.stored.header, self.dek)
    }
}

/// Errors of [`format_encrypted`].
#[derive(Debug, Error)]
pub enum FormatError {
    /// A valid header is present and `overwrite` was not set.
    #[error("device already holds an nvseal header (generation {generation}); set overwrite to replace it")]
    AlreadyFormatted {
        /// Its generation.
        generation: u64,
    },
    /// The header area holds something other than zeros or a valid header (a damaged nvseal
    /// header whose DEK might still be recovered by hand, or another format's data).
    #[error("header area is not blank (copy A: {a}; copy B: {b}); set overwrite to format anyway")]
    NotBlank {
        /// What copy A holds.
        a: store::CopyFault,
        /// What copy B holds.
        b: store::CopyFault,
    },
    /// The device cannot hold the metadata region and at least one data unit.
    #[error("device of {device_bytes} bytes has no room for data after the {METADATA_REGION_BYTES}-byte metadata region")]
    DeviceTooSmall {
        /// Its size.
        device_bytes: u64,
    },
    /// Fetching the KEK failed.
    #[error("fetching KEK: {0}")]
    Provider(#[from] ProviderError),
    /// Generating the DEK failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Writing the header failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Errors of [`open_encrypted`].
#[derive(Debug, Error)]
pub enum OpenError {
    /// No usable header.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The header's KEK lives at another provider (kind or KMS cluster alias differ).
    #[error("KEK {kek_id} lives at {want_kind} cluster {want_alias:?}, but the provider is {have_kind} cluster {have_alias:?}")]
    ProviderMismatch {
        /// The KEK.
        kek_id: KekId,
        /// Kind recorded in the header.
        want_kind: ProviderKind,
        /// Alias recorded in the header.
        want_alias: String,
        /// Kind of the provider given.
        have_kind: ProviderKind,
        /// Alias of the provider given.
        have_alias: String,
    },
    /// The provider failed to hand out the KEK.
    #[error("fetching KEK: {0}")]
    Provider(#[from] ProviderError),
    /// The provider returned a key whose fingerprint differs from the header's.
    #[error("KEK {kek_id} from the provider does not match the fingerprint in the header")]
    FingerprintMismatch {
        /// The KEK.
        kek_id: KekId,
    },
    /// The DEK did not unwrap (corrupt wrapped DEK despite a matching KEK fingerprint).
    #[error(transparent)]
    Unwrap(#[from] KeyError),
    /// A deep rekey is in progress; opening it is the deep-rekey code's job.
    #[error("a deep rekey is in progress on this namespace")]
    DeepRekeyInProgress,
    /// An encrypt or decrypt pass is in progress; opening it is the conversion code's job.
    #[error("an encrypt/decrypt pass is in progress on this namespace")]
    ConversionInProgress,
    /// During an interrupted shallow rekey neither slot opened.
    #[error("neither key slot opened: active: {active}; pending: {pending}")]
    NoSlotOpened {
        /// Why the active slot failed.
        active: Box<OpenError>,
        /// Why the pending slot failed.
        pending: Box<OpenError>,
    },
}

impl OpenError {
    /// True when retrying later may succeed (the KMS was unreachable).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Provider(e) => e.is_transient(),
            Self::NoSlotOpened { active, pending } => {
                active.is_transient() || pending.is_transient()
            }
            _ => false,
        }
    }
}

/// Whether [`shallow_rekey`] revokes the old KEK when done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevokeOld {
    /// Revoke it (the old KEK protects nothing else).
    Yes,
    /// Leave it: other namespaces still use it. The rekey driver revokes it once all are done.
    No,
}

/// What happened to the old KEK after a shallow rekey.
#[derive(Debug)]
pub enum RevokeOutcome {
    /// Revoked at the provider.
    Revoked(KekId),
    /// Not asked to.
    Skipped(KekId),
    /// A rerun finished an interrupted rekey, but the stale header copy that named the old KEK
    /// was unreadable: the old KEK's id is unknown here and must be revoked by hand.
    OldKekUnknown,
    /// The rekey is complete and durable, but revoking failed; the operator must revoke it.
    Failed(KekId, ProviderError),
}

/// Result of a completed shallow rekey.
#[derive(Debug)]
pub struct ShallowRekeyOutcome {
    /// The header now on disk (active slot = new KEK, no rekey in progress).
    pub stored: Stored,
    /// The old KEK's fate.
    pub revoke: RevokeOutcome,
}

/// Errors of [`shallow_rekey`].
#[derive(Debug, Error)]
pub enum RekeyError {
    /// The namespace could not be opened with its current KEK.
    #[error("opening the namespace: {0}")]
    Open(#[from] OpenError),
    /// The new KEK is the one already in use.
    #[error("the new KEK {0} is already the active KEK")]
    SameKek(KekId),
    /// The key passed in differs from what the provider returns for `new_kek_id`.
    #[error("the new KEK does not match what the provider returns for {0}")]
    NewKekMismatch(KekId),
    /// Fetching the new KEK from the provider failed.
    #[error("fetching the new KEK: {0}")]
    Provider(#[from] ProviderError),
    /// The new key slot failed a check before anything was written (see
    /// [`rekey::apply_new_slot`]).
    #[error("refusing to write the new key slot: {0}")]
    NewSlotInvalid(&'static str),
    /// Writing the header failed (the old KEK still opens the namespace).
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(crate) fn now_unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Formats an encrypted namespace: fetches the KEK, draws a fresh DEK, wraps it, writes both
/// header copies. Unless `params.overwrite` is set, the two header copies must be blank (all
/// zeros): a valid header, a damaged one or foreign data there is refused.
pub fn format_encrypted<I, P>(
    io: &mut I,
    provider: &mut P,
    params: &FormatParams,
) -> Result<Opened, FormatError>
where
    I: HeaderIo + ?Sized,
    P: KeyProvider + ?Sized,
{
    let unit = u64::from(params.data_unit.bytes());
    let data_blocks = params
        .device_bytes
        .checked_sub(DEFAULT_DATA_OFFSET_BYTES)
        .map(|bytes| bytes / unit)
        .filter(|&blocks| blocks > 0)
        .ok_or(FormatError::DeviceTooSmall {
            device_bytes: params.device_bytes,
        })?;
    if !params.overwrite {
        match store::read_header(io) {
            Ok(existing) => {
                return Err(FormatError::AlreadyFormatted {
                    generation: existing.header.generation,
                })
            }
            Err(StoreError::NotFormatted) => {}
            Err(StoreError::NoValidCopy { a, b }) => return Err(FormatError::NotBlank { a, b }),
            Err(e) => return Err(e.into()),
        }
    }
    let kek = provider.get_kek(&params.kek_id)?;
    let dek = Dek::generate()?;
    let now = now_unix_s();
    let header = Header {
        generation: 1,
        device_uuid: params.device_uuid,
        namespace_uuid: params.namespace_uuid,
        data_unit: params.data_unit,
        data_offset_bytes: DEFAULT_DATA_OFFSET_BYTES,
        data_blocks,
        created_unix_s: now,
        updated_unix_s: now,
        active: rekey::slot_for(provider, &params.kek_id, &kek, &dek),
        rekey: RekeyState::None,
        detached: None,
    };
    let stored = store::format(io, &header)?;
    tracing::info!(
        namespace = %params.namespace_uuid,
        kek_id = %params.kek_id,
        data_blocks,
        "formatted encrypted namespace"
    );
    Ok(Opened {
        stored,
        dek,
        slot: SlotUsed::Active,
    })
}

/// Fetches the slot's KEK, checks its fingerprint, unwraps the DEK.
pub(crate) fn open_slot<P: KeyProvider + ?Sized>(
    provider: &mut P,
    slot: &KeySlot,
) -> Result<Dek, OpenError> {
    if slot.provider != provider.kind() || slot.kms_alias != provider.cluster_alias() {
        return Err(OpenError::ProviderMismatch {
            kek_id: slot.kek_id.clone(),
            want_kind: slot.provider,
            want_alias: slot.kms_alias.clone(),
            have_kind: provider.kind(),
            have_alias: provider.cluster_alias().to_owned(),
        });
    }
    let kek = provider.get_kek(&slot.kek_id)?;
    if !kek.matches(&slot.fingerprint) {
        return Err(OpenError::FingerprintMismatch {
            kek_id: slot.kek_id.clone(),
        });
    }
    Ok(unwrap_dek(&kek, &slot.wrapped_dek)?)
}

fn open_stored<P: KeyProvider + ?Sized>(
    provider: &mut P,
    stored: Stored,
) -> Result<Opened, OpenError> {
    if let Some((copy, fault)) = stored.bad_copy() {
        tracing::warn!(
            namespace = %stored.header.namespace_uuid,
            copy = ?copy,
            %fault,
            "header copy is invalid; using the other (it is rewritten on the next update)"
        );
    }
    let pending = match &stored.header.rekey {
        RekeyState::None => None,
        RekeyState::Shallow { new } => Some(new.clone()),
        RekeyState::Deep(_) => return Err(OpenError::DeepRekeyInProgress),
        RekeyState::Convert(_) => return Err(OpenError::ConversionInProgress),
    };
    match open_slot(provider, &stored.header.active) {
        Ok(dek) => Ok(Opened {
            stored,
            dek,
            slot: SlotUsed::Active,
        }),
        Err(active_err) => {
            let Some(pending) = pending else {
                return Err(active_err);
            };
            match open_slot(provider, &pending) {
                Ok(dek) => {
                    tracing::warn!(
                        namespace = %stored.header.namespace_uuid,
                        old_kek = %stored.header.active.kek_id,
                        new_kek = %pending.kek_id,
                        error = %active_err,
                        "opened with the new KEK of an interrupted shallow rekey; rerun the rekey to finish it"
                    );
                    Ok(Opened {
                        stored,
                        dek,
                        slot: SlotUsed::Pending,
                    })
                }
                Err(pending_err) => Err(OpenError::NoSlotOpened {
                    active: Box::new(active_err),
                    pending: Box::new(pending_err),
                }),
            }
        }
    }
}

/// Opens an encrypted namespace: reads the header (either copy), fetches the KEK by id, checks
/// its fingerprint, unwraps the DEK. During an interrupted shallow rekey the new KEK is tried
/// when the old one does not open. Writes nothing.
pub fn open_encrypted<I, P>(io: &mut I, provider: &mut P) -> Result<Opened, OpenError>
where
    I: HeaderIo + ?Sized,
    P: KeyProvider + ?Sized,
{
    let stored = store::read_header(io)?;
    open_stored(provider, stored)
}

/// Shallow rekey: re-wraps the namespace's DEK under `new_kek_id` (the data is untouched).
///
/// Opens the namespace, then writes the new slot with the three durable header steps of
/// [`rekey::apply_new_slot`] (pending, active, other copy rewritten), then revokes the old KEK if
/// asked. A crash anywhere leaves a namespace that opens with the old or the new KEK; running
/// `shallow_rekey` again with the same new KEK finishes the job (including the scrub and the
/// revocation).
///
/// `new_kek` must be what the provider returns for `new_kek_id` (checked by fingerprint), so a
/// DEK is never wrapped under a key the provider cannot hand back.
pub fn shallow_rekey<I, P>(
    io: &mut I,
    provider: &mut P,
    new_kek_id: &KekId,
    new_kek: &Kek,
    revoke: RevokeOld,
) -> Result<ShallowRekeyOutcome, RekeyError>
where
    I: HeaderIo + ?Sized,
    P: KeyProvider + ?Sized,
{
    let opened = open_encrypted(io, provider)?;
    let current_id = opened.stored.header.active.kek_id.clone();
    if &current_id == new_kek_id {
        return resume_scrub(io, provider, &opened.stored, new_kek_id, revoke);
    }
    let new_slot = rekey::new_slot(provider, new_kek_id, new_kek, &opened.dek)?;
    let stored = rekey::apply_new_slot(io, &opened, new_slot, new_kek)?;
    Ok(ShallowRekeyOutcome {
        revoke: revoke_old(provider, Some(current_id), revoke),
        stored,
    })
}

/// The active KEK is already `new_kek_id`: finish an interrupted rekey whose scrub step did not
/// happen (the other copy still names another KEK, or is unreadable), or refuse a no-op rekey.
fn resume_scrub<I, P>(
    io: &mut I,
    provider: &mut P,
    stored: &Stored,
    new_kek_id: &KekId,
    revoke: RevokeOld,
) -> Result<ShallowRekeyOutcome, RekeyError>
where
    I: HeaderIo + ?Sized,
    P: KeyProvider + ?Sized,
{
    let old_kek_id = match store::read_copy(io, stored.copy.other()) {
        Ok(other) if other.active.kek_id == *new_kek_id && other.rekey == RekeyState::None => {
            return Err(RekeyError::SameKek(new_kek_id.clone()));
        }
        Ok(other) if other.active.kek_id != *new_kek_id => Some(other.active.kek_id),
        _ => None,
    };
    let scrubbed = store::update(io, stored, &stored.header)?;
    tracing::info!(
        namespace = %scrubbed.header.namespace_uuid,
        new_kek = %new_kek_id,
        generation = scrubbed.header.generation,
        "finished an interrupted shallow rekey"
    );
    Ok(ShallowRekeyOutcome {
        revoke: revoke_old(provider, old_kek_id, revoke),
        stored: scrubbed,
    })
}

fn revoke_old<P: KeyProvider + ?Sized>(
    provider: &mut P,
    old_kek_id: Option<KekId>,
    revoke: RevokeOld,
) -> RevokeOutcome {
    let Some(old_kek_id) = old_kek_id else {
        if revoke == RevokeOld::Yes {
            tracing::warn!(
                "old KEK of the interrupted shallow rekey is unknown; revoke it by hand"
            );
        }
        return RevokeOutcome::OldKekUnknown;
    };
    match revoke {
        RevokeOld::No => RevokeOutcome::Skipped(old_kek_id),
        RevokeOld::Yes => match provider.revoke_kek(&old_kek_id) {
            Ok(()) => RevokeOutcome::Revoked(old_kek_id),
            Err(e) => {
                tracing::error!(
                    old_kek = %old_kek_id,
                    error = %e,
                    "shallow rekey done but revoking the old KEK failed; revoke it by hand"
                );
                RevokeOutcome::Failed(old_kek_id, e)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::local::{CreateMode, LocalKeyProvider, DEFAULT_KEK_ID};
    use super::store::{CrashMode, Fault, MemIo};
    use super::*;

    const DEV_BYTES: usize = METADATA_REGION_BYTES as usize + 64 * 4096;

    fn setup() -> (tempfile::TempDir, LocalKeyProvider, MemIo) {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = LocalKeyProvider::open(dir.path().join("keys"), CreateMode::CreateIfMissing)
            .expect("provider");
        (dir, p, MemIo::new(DEV_BYTES))
    }

    fn params() -> FormatParams {
        FormatParams::new(
            Uuid::from_bytes([7; 16]),
            DataUnit::Bytes4096,
            DEV_BYTES as u64,
            KekId::new(DEFAULT_KEK_ID).expect("id"),
        )
    }

    #[test]
    fn opened_debug_never_shows_the_dek() {
        let (_d, mut p, mut io) = setup();
        let o = format_encrypted(&mut io, &mut p, &params()).expect("format");
        let text = format!("{o:?} {o:#?}");
        let hex: String = o.dek.expose().iter().map(|b| format!("{b:02x}")).collect();
        assert!(text.contains("<redacted>"), "{text}");
        assert!(
            !text.contains(&hex[..16]) && !text.contains(&hex[64..80]),
            "{text}"
        );
        assert!(
            !text.contains(&format!("{:?}", &o.dek.expose()[..8])),
            "{text}"
        );
    }

    #[test]
    fn format_then_open_returns_the_same_dek() {
        let (_d, mut p, mut io) = setup();
        let f = format_encrypted(&mut io, &mut p, &params()).expect("format");
        assert_eq!(f.header().data_blocks, 64);
        assert_eq!(f.header().data_offset_bytes, 1 << 20);
        let o = open_encrypted(&mut io, &mut p).expect("open");
        assert_eq!(o.dek.expose(), f.dek.expose());
        assert_eq!(o.slot, SlotUsed::Active);
        // The plaintext DEK never reaches the device.
        let dek = f.dek.expose();
        assert!(!io
            .image()
            .windows(32)
            .any(|w| w == &dek[..32] || w == &dek[32..]));
    }

    #[test]
    fn format_refuses_to_overwrite_unless_asked() {
        let (_d, mut p, mut io) = setup();
        let first = format_encrypted(&mut io, &mut p, &params()).expect("format");
        assert!(matches!(
            format_encrypted(&mut io, &mut p, &params()),
            Err(FormatError::AlreadyFormatted { generation: 1 })
        ));
        let mut again = params();
        again.overwrite = true;
        let second = format_encrypted(&mut io, &mut p, &again).expect("reformat");
        assert_ne!(first.dek.expose(), second.dek.expose());
        // A damaged header (or foreign data) is not silently formatted over either.
        let mut damaged = MemIo::new(DEV_BYTES);
        format_encrypted(&mut damaged, &mut p, &params()).expect("format");
        damaged.corrupt(0x200, 1);
        damaged.corrupt(0x10200, 1);
        assert!(matches!(
            format_encrypted(&mut damaged, &mut p, &params()),
            Err(FormatError::NotBlank { .. })
        ));
        let mut tiny = params();
        tiny.device_bytes = METADATA_REGION_BYTES + 4095;
        assert!(matches!(
            format_encrypted(&mut MemIo::new(DEV_BYTES), &mut p, &tiny),
            Err(FormatError::DeviceTooSmall { .. })
        ));
    }

    #[test]
    fn open_detects_wrong_key_and_wrong_provider() {
        let (_d, mut p, mut io) = setup();
        format_encrypted(&mut io, &mut p, &params()).expect("format");
        // Another key file whose "default" KEK is a different key: fingerprint mismatch.
        let (_d2, mut other, _) = setup();
        assert!(matches!(
            open_encrypted(&mut io, &mut other),
            Err(OpenError::FingerprintMismatch { .. })
        ));
        let mut renamed = other.with_alias("lab-2").expect("alias");
        assert!(matches!(
            open_encrypted(&mut io, &mut renamed),
            Err(OpenError::ProviderMismatch { .. })
        ));
    }

    #[test]
    fn shallow_rekey_switches_kek_and_revokes_the_old_one() {
        let (_d, mut p, mut io) = setup();
        let f = format_encrypted(&mut io, &mut p, &params()).expect("format");
        let (new_id, new_kek) = p.create_kek("rekey-1").expect("create");
        let out = shallow_rekey(&mut io, &mut p, &new_id, &new_kek, RevokeOld::Yes).expect("rekey");
        assert_eq!(out.stored.header.generation, 4);
        assert_eq!(out.stored.header.active.kek_id, new_id);
        assert_eq!(out.stored.header.rekey, RekeyState::None);
        assert!(
            matches!(out.revoke, RevokeOutcome::Revoked(ref id) if id.as_str() == DEFAULT_KEK_ID)
        );
        let o = open_encrypted(&mut io, &mut p).expect("open with new KEK");
        assert_eq!(o.dek.expose(), f.dek.expose());
        // Rekeying to the active KEK is refused.
        assert!(matches!(
            shallow_rekey(&mut io, &mut p, &new_id, &new_kek, RevokeOld::No),
            Err(RekeyError::SameKek(_))
        ));
        // A key that is not the provider's key for that id is refused before anything is written.
        let (id2, _) = p.create_kek("rekey-2").expect("create");
        let impostor = Kek::generate().expect("rng");
        let before = io.ops_total();
        assert!(matches!(
            shallow_rekey(&mut io, &mut p, &id2, &impostor, RevokeOld::No),
            Err(RekeyError::NewKekMismatch(_))
        ));
        assert_eq!(io.ops_total(), before);
    }

    /// A crash at every point of a shallow rekey (each write and flush, unflushed writes dropped
    /// or kept, and each write torn) leaves a namespace that opens — with the old or the new KEK —
    /// to the same DEK, and rerunning the rekey completes it.
    #[test]
    fn shallow_rekey_survives_a_crash_at_every_point() {
        let (_d, mut p, base) = setup();
        let mut io0 = base.clone();
        let f = format_encrypted(&mut io0, &mut p, &params()).expect("format");
        let (new_id, new_kek) = p.create_kek("rekey").expect("create");
        let dek = *f.dek.expose();

        let mut clean = io0.clone();
        let start = clean.ops_total();
        shallow_rekey(&mut clean, &mut p, &new_id, &new_kek, RevokeOld::No).expect("rekey");
        let total = clean.ops_total() - start;
        assert_eq!(total, 6, "three header updates, each a write and a flush");
        let old_wrapped = *f.header().active.wrapped_dek.as_bytes();

        let mut faults: Vec<Fault> = (0..=total)
            .map(|ops| Fault::PowerLossAfter { ops })
            .collect();
        faults.extend((0..3).map(|nth| Fault::TearWrite { nth }));
        let mut saw_pending = false;
        for fault in faults {
            for mode in [CrashMode::DropUnflushed, CrashMode::KeepUnflushed] {
                let mut io = io0.clone();
                io.arm(fault);
                let _ = shallow_rekey(&mut io, &mut p, &new_id, &new_kek, RevokeOld::No);
                io.crash(mode);
                let o = open_encrypted(&mut io, &mut p)
                    .unwrap_or_else(|e| panic!("{fault:?} {mode:?}: {e}"));
                assert_eq!(o.dek.expose(), &dek, "{fault:?} {mode:?}");
                let active = o.header().active.kek_id.clone();
                assert!(active.as_str() == DEFAULT_KEK_ID || active == new_id);
                if matches!(o.header().rekey, RekeyState::Shallow { .. }) {
                    saw_pending = true;
                }
                // Rerunning finishes whatever was left: it completes (rekey or scrub) or says
                // there is nothing left to do.
                match shallow_rekey(&mut io, &mut p, &new_id, &new_kek, RevokeOld::No) {
                    Ok(done) => assert_eq!(done.stored.header.active.kek_id, new_id),
                    Err(RekeyError::SameKek(_)) => {}
                    Err(e) => panic!("{fault:?} {mode:?}: rerun: {e}"),
                }
                let o = open_encrypted(&mut io, &mut p).expect("open after completion");
                assert_eq!(o.dek.expose(), &dek);
                assert_eq!(o.header().active.kek_id, new_id);
                // Neither copy still holds the DEK wrapped under the old KEK.
                assert!(
                    !io.image().windows(72).any(|w| w == &old_wrapped[..]),
                    "{fault:?} {mode:?}: old wrapped DEK left on the device"
                );
            }
        }
        assert!(
            saw_pending,
            "some crash point left the rekey-in-progress state"
        );
    }

    #[test]
    fn interrupted_rekey_opens_with_new_kek_when_old_is_gone() {
        let (_d, mut p, mut io) = setup();
        let f = format_encrypted(&mut io, &mut p, &params()).expect("format");
        let (new_id, new_kek) = p.create_kek("rekey").expect("create");
        // Crash after step 1 is durable (write + flush), before step 2.
        io.arm(Fault::PowerLossAfter { ops: 2 });
        assert!(shallow_rekey(&mut io, &mut p, &new_id, &new_kek, RevokeOld::No).is_err());
        io.crash(CrashMode::DropUnflushed);
        // The old KEK is revoked behind our back: the pending slot still opens the namespace.
        p.revoke_kek(&KekId::new(DEFAULT_KEK_ID).expect("id"))
            .expect("revoke");
        let o = open_encrypted(&mut io, &mut p).expect("open via pending slot");
        assert_eq!(o.slot, SlotUsed::Pending);
        assert_eq!(o.dek.expose(), f.dek.expose());
        // With both gone, the error names both failures.
        p.revoke_kek(&new_id).expect("revoke");
        assert!(matches!(
            open_encrypted(&mut io, &mut p),
            Err(OpenError::NoSlotOpened { .. })
        ));
    }
}
