//! Replacing a namespace's key slot on disk: the header steps every rekey shares.
//!
//! Owns the one implementation of "put the DEK, wrapped under a new KEK, into the header without
//! a moment where neither KEK opens the namespace". [`super::shallow_rekey`] (one provider) and
//! the key manager's rekey onto another provider (change of KMS cluster) both build the new slot
//! with [`new_slot`] and write it with [`apply_new_slot`]; the deep rekey builds on the same
//! steps. Blocking (KMS round trip, header writes with flush); control threads only.
//!
//! The steps, each one durable header update ([`store::update`] writes the copy that does not
//! hold the current header, then flushes):
//! 1. record the new slot as a shallow rekey in progress; the old KEK stays active;
//! 2. make the new slot active and clear the rekey state;
//! 3. rewrite the other copy with the same header, so that no copy on the device still holds the
//!    DEK wrapped under the old KEK.
//!
//! A crash before step 2 is durable leaves a header that opens with the old KEK (active slot) or
//! the new one (pending slot); after it, with the new one. Before step 1 the slot is proven to
//! open to the namespace's DEK under the new KEK, so nothing is ever written that only a key the
//! provider cannot hand back would open.

use super::header::{KeySlot, RekeyState};
use super::provider::{KekId, KeyProvider};
use super::store::{self, HeaderIo, Stored};
use super::wrap::{unwrap_dek, wrap_dek, Dek, Kek};
use super::{now_unix_s, Opened, RekeyError};

/// A key slot holding `dek` wrapped under `new_kek`, for `provider`'s KEK `new_kek_id`.
///
/// `new_kek` must be what `provider` returns for `new_kek_id` (fetched again and compared by
/// fingerprint: [`RekeyError::NewKekMismatch`] otherwise), so a DEK is never wrapped under a key
/// the provider cannot hand back.
pub fn new_slot<P: KeyProvider + ?Sized>(
    provider: &mut P,
    new_kek_id: &KekId,
    new_kek: &Kek,
    dek: &Dek,
) -> Result<KeySlot, RekeyError> {
    let fetched = provider.get_kek(new_kek_id)?;
    if fetched.fingerprint() != new_kek.fingerprint() {
        tracing::error!(kek_id = %new_kek_id, cluster = provider.cluster_alias(),
            "refusing the new KEK: it differs from what the provider returns for its id");
        return Err(RekeyError::NewKekMismatch(new_kek_id.clone()));
    }
    drop(fetched);
    Ok(slot_for(provider, new_kek_id, new_kek, dek))
}

/// The slot of `kek` (`provider`'s `kek_id`) holding `dek`. No checks: callers that write it
/// over an existing header go through [`new_slot`] and [`apply_new_slot`].
pub(crate) fn slot_for<P: KeyProvider + ?Sized>(
    provider: &P,
    kek_id: &KekId,
    kek: &Kek,
    dek: &Dek,
) -> KeySlot {
    KeySlot {
        provider: provider.kind(),
        kms_alias: provider.cluster_alias().to_owned(),
        kek_id: kek_id.clone(),
        fingerprint: kek.fingerprint(),
        wrapped_dek: wrap_dek(kek, dek),
    }
}

/// Makes `new_slot` the active slot of the opened namespace, in the three durable steps of the
/// module documentation, and returns the header now on disk (active slot = `new_slot`, no rekey
/// in progress, both copies holding it).
///
/// Checked before anything is written, each refusal logged and returned with the device
/// untouched: no deep rekey is in progress; `new_slot` names another KEK than the active slot
/// ([`RekeyError::SameKek`]); `new_slot` carries `new_kek`'s fingerprint and unwraps under it to
/// the namespace's DEK ([`RekeyError::NewSlotInvalid`]). A failed header write is returned as
/// [`RekeyError::Store`]; the header then still opens with the old or the new KEK.
pub fn apply_new_slot<I: HeaderIo + ?Sized>(
    io: &mut I,
    opened: &Opened,
    new_slot: KeySlot,
    new_kek: &Kek,
) -> Result<Stored, RekeyError> {
    let current = &opened.stored;
    let namespace = current.header.namespace_uuid;
    let old = &current.header.active;
    if matches!(current.header.rekey, RekeyState::Deep(_)) {
        tracing::error!(%namespace, "refusing to replace the key slot: a deep rekey is in progress");
        return Err(RekeyError::NewSlotInvalid("a deep rekey is in progress"));
    }
    if old.provider == new_slot.provider
        && old.kms_alias == new_slot.kms_alias
        && old.kek_id == new_slot.kek_id
    {
        tracing::error!(%namespace, kek_id = %new_slot.kek_id,
            "refusing to replace the key slot: the new KEK is the active one");
        return Err(RekeyError::SameKek(new_slot.kek_id));
    }
    if !new_kek.matches(&new_slot.fingerprint) {
        tracing::error!(%namespace, kek_id = %new_slot.kek_id,
            "refusing to replace the key slot: its fingerprint is not the new KEK's");
        return Err(RekeyError::NewSlotInvalid(
            "its fingerprint is not the new KEK's",
        ));
    }
    match unwrap_dek(new_kek, &new_slot.wrapped_dek) {
        Ok(check) if check.expose() == opened.dek.expose() => {}
        _ => {
            tracing::error!(%namespace, kek_id = %new_slot.kek_id,
                "refusing to replace the key slot: it does not unwrap to the namespace's DEK");
            return Err(RekeyError::NewSlotInvalid(
                "it does not unwrap to the namespace's DEK under the new KEK",
            ));
        }
    }

    let mut step1 = current.header.clone();
    step1.rekey = RekeyState::Shallow {
        new: new_slot.clone(),
    };
    step1.updated_unix_s = now_unix_s();
    let stored1 = store::update(io, current, &step1)?;
    tracing::debug!(%namespace, generation = stored1.header.generation,
        "rekey step 1: new key slot recorded as pending");

    let mut step2 = stored1.header.clone();
    step2.active = new_slot;
    step2.rekey = RekeyState::None;
    let stored2 = store::update(io, &stored1, &step2)?;
    tracing::debug!(%namespace, generation = stored2.header.generation,
        "rekey step 2: new key slot active");

    let stored3 = store::update(io, &stored2, &stored2.header)?;
    tracing::info!(
        %namespace,
        old_cluster = %old.kms_alias,
        old_kek = %old.kek_id,
        new_cluster = %stored3.header.active.kms_alias,
        new_kek = %stored3.header.active.kek_id,
        generation = stored3.header.generation,
        "shallow rekey complete: both header copies hold the new key slot"
    );
    Ok(stored3)
}

#[cfg(test)]
mod tests {
    use super::super::header::{DataUnit, METADATA_REGION_BYTES};
    use super::super::local::{CreateMode, LocalKeyProvider, DEFAULT_KEK_ID};
    use super::super::store::MemIo;
    use super::super::{format_encrypted, open_encrypted, FormatParams, SlotUsed};
    use super::*;

    const DEV_BYTES: usize = METADATA_REGION_BYTES as usize + 16 * 4096;

    fn formatted() -> (tempfile::TempDir, LocalKeyProvider, MemIo, Opened) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = LocalKeyProvider::open(dir.path().join("keys"), CreateMode::CreateIfMissing)
            .expect("provider");
        let mut io = MemIo::new(DEV_BYTES);
        let params = FormatParams::new(
            uuid::Uuid::from_bytes([3; 16]),
            DataUnit::Bytes4096,
            DEV_BYTES as u64,
            KekId::new(DEFAULT_KEK_ID).expect("id"),
        );
        let opened = format_encrypted(&mut io, &mut p, &params).expect("format");
        (dir, p, io, opened)
    }

    /// Whether any 72-byte window of the device equals `wrapped`.
    fn holds(io: &MemIo, wrapped: &[u8; 72]) -> bool {
        io.image().windows(72).any(|w| w == wrapped)
    }

    #[test]
    fn applied_slot_is_active_in_both_copies_and_the_old_wrapping_is_gone() {
        let (_d, mut p, mut io, opened) = formatted();
        let old_wrapped = *opened.header().active.wrapped_dek.as_bytes();
        let (new_id, new_kek) = p.create_kek("rekey-test").expect("create");
        let slot = new_slot(&mut p, &new_id, &new_kek, &opened.dek).expect("slot");
        let stored = apply_new_slot(&mut io, &opened, slot.clone(), &new_kek).expect("apply");
        assert_eq!(stored.header.generation, opened.header().generation + 3);
        assert_eq!(stored.header.active, slot);
        assert_eq!(stored.header.rekey, RekeyState::None);
        for copy in [stored.copy, stored.copy.other()] {
            assert_eq!(store::read_copy(&mut io, copy).expect("copy").active, slot);
        }
        assert!(
            !holds(&io, &old_wrapped),
            "the DEK under the old KEK is scrubbed"
        );
        let reopened = open_encrypted(&mut io, &mut p).expect("open");
        assert_eq!(reopened.slot, SlotUsed::Active);
        assert_eq!(reopened.dek.expose(), opened.dek.expose());
    }

    #[test]
    fn a_slot_that_fails_a_check_is_refused_and_nothing_is_written() {
        let (_d, mut p, mut io, opened) = formatted();
        let before = io.image().to_vec();
        let (new_id, new_kek) = p.create_kek("rekey-test").expect("create");

        // The DEK of another namespace under the right KEK.
        let other_dek = Dek::generate().expect("rng");
        let wrong_dek = slot_for(&p, &new_id, &new_kek, &other_dek);
        assert!(matches!(
            apply_new_slot(&mut io, &opened, wrong_dek, &new_kek),
            Err(RekeyError::NewSlotInvalid(_))
        ));
        // A slot sealed under another key than the one passed in.
        let (_, third_kek) = p.create_kek("rekey-third").expect("create");
        let sealed_elsewhere = slot_for(&p, &new_id, &third_kek, &opened.dek);
        assert!(matches!(
            apply_new_slot(&mut io, &opened, sealed_elsewhere, &new_kek),
            Err(RekeyError::NewSlotInvalid(_))
        ));
        // The active KEK again.
        let old_id = opened.header().active.kek_id.clone();
        let old_kek = p.get_kek(&old_id).expect("old");
        let same = slot_for(&p, &old_id, &old_kek, &opened.dek);
        assert!(matches!(
            apply_new_slot(&mut io, &opened, same, &old_kek),
            Err(RekeyError::SameKek(_))
        ));
        // A key that is not what the provider holds under the id.
        let impostor = Kek::generate().expect("rng");
        assert!(matches!(
            new_slot(&mut p, &new_id, &impostor, &opened.dek),
            Err(RekeyError::NewKekMismatch(_))
        ));
        assert!(
            io.image() == &before[..],
            "a refused slot wrote to the device"
        );
        let reopened = open_encrypted(&mut io, &mut p).expect("open");
        assert_eq!(reopened.header().active.kek_id, old_id);
    }
}
