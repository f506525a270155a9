//! Formatting of encrypted namespaces: the offline [`KeyManager::format_device`] tool path, the
//! blank checks that refuse to format over data, and the boot-time format of a blank header
//! (choosing or creating its KEK, drawing the DEK).
//!
//! Runs on control threads only: the caller's thread for `format_device`, a namespace's unlock
//! thread for a `create` format. It exists as its own file because "never overwrite data not
//! proven blank" is a rule worth reading in one place.

use std::sync::Arc;

use super::{
    generated_kek_name, lock, Fail, FormatDeviceError, FormatReport, Inner, KeyManager,
    ManagedProvider, NamespaceKeyConfig, ProviderSlot,
};
use crate::bdev::Bdev;
use crate::keys::header::{DataUnit, METADATA_REGION_BYTES};
use crate::keys::header_io::BdevHeaderIo;
use crate::keys::local::DEFAULT_KEK_ID;
use crate::keys::provider::{KekId, KeyProvider, ProviderError};
use crate::keys::store::{
    self, FormatBlankError, HeaderIo, NotBlank, StoreError, FORMAT_DATA_PROBE_BYTES,
};
use crate::keys::{format_encrypted, FormatError, FormatParams, Opened};
use crate::types::CoreId;
use uuid::Uuid;

impl KeyManager {
    /// Formats one device now, on the calling thread: the offline `nvseal format` tool. The
    /// header copies must be blank: a valid header (its DEK would be destroyed) or a damaged one
    /// (whose wrapped DEK might still be recovered by hand) is refused, `force` or not. The rest
    /// of the metadata region and the first [`FORMAT_DATA_PROBE_BYTES`] of the data area must be
    /// blank as well unless `force` is set; with `force`, the metadata region is zeroed first
    /// (the deep-rekey journal area must read as zeros on a fresh namespace) and the data area is
    /// left as it is, to be overwritten by the namespace's users. Audited as op `format`. The
    /// namespace is not registered: a later `add_encrypted` opens it.
    pub fn format_device(
        &self,
        who: &str,
        ns_id: &str,
        backing: &Arc<dyn Bdev>,
        io: &mut dyn HeaderIo,
        key: &NamespaceKeyConfig,
        force: bool,
    ) -> Result<FormatReport, FormatDeviceError> {
        let refused = |reason: String| {
            self.inner
                .audit(who, "format", ns_id, &format!("refused: {reason}"));
            FormatDeviceError::Refused(reason)
        };
        if !self.inner.providers.contains_key(&key.provider) {
            return Err(refused(format!(
                "no key provider named {:?} is configured",
                key.provider
            )));
        }
        match store::read_header(io) {
            Ok(stored) => {
                return Err(refused(format!(
                    "the device holds an nvseal header (namespace {}, generation {}); formatting \
                     would destroy its DEK and with it every byte of the namespace, so it is \
                     refused even with --force",
                    stored.header.namespace_uuid, stored.header.generation
                )))
            }
            Err(StoreError::NotFormatted) => {}
            Err(e @ StoreError::Io { .. }) => return Err(FormatDeviceError::Io(e.to_string())),
            Err(e) => {
                return Err(refused(format!(
                    "the header copies are not blank ({e}); a damaged header may still hold a \
                     recoverable wrapped DEK, so it is refused even with --force (if the device \
                     is expendable, zero its first 128 KiB by hand first)"
                )))
            }
        }
        match check_blank(io, backing) {
            Ok(()) => {}
            Err(FormatBlankError::Io(e)) => return Err(FormatDeviceError::Io(e.to_string())),
            Err(FormatBlankError::NotBlank(found)) if !force => {
                return Err(refused(format!(
                    "the header copies are blank but {found}; this may be the namespace's \
                     ciphertext under a wiped header. Pass --force only if that data is \
                     expendable"
                )))
            }
            Err(FormatBlankError::NotBlank(found)) => {
                tracing::warn!(namespace = %ns_id, %found,
                    "formatting over a device that is not blank, as forced");
                self.inner
                    .audit(who, "format", ns_id, &format!("forced over: {found}"));
                zero_metadata_region(io).map_err(|e| FormatDeviceError::Io(e.to_string()))?;
            }
        }
        let opened = self
            .inner
            .format(
                io,
                ns_id,
                who,
                backing,
                &key.provider,
                key.kek_name.as_deref(),
            )
            .map_err(|f| match f {
                Fail::Transient(r) => FormatDeviceError::Io(r),
                Fail::Permanent(r) => FormatDeviceError::Failed(r),
            })?;
        let header = &opened.stored.header;
        Ok(FormatReport {
            ns_id: ns_id.to_owned(),
            namespace_uuid: header.namespace_uuid.to_string(),
            kek_provider: key.provider.clone(),
            kek_id: header.active.kek_id.clone(),
            data_unit_bytes: header.data_unit.bytes(),
            data_blocks: header.data_blocks,
            forced: force,
        })
    }
}

/// The blank check of a device about to be formatted: the whole metadata region through the
/// header I/O, then the first [`FORMAT_DATA_PROBE_BYTES`] of the data area (as much as the
/// device has) through the backing bdev, on a private channel driven on this control thread.
/// Reads only.
fn check_blank(io: &mut dyn HeaderIo, backing: &Arc<dyn Bdev>) -> Result<(), FormatBlankError> {
    store::check_metadata_blank(io)?;
    let bs = u64::from(backing.block_size()).max(1);
    let device_bytes = backing.num_blocks().saturating_mul(bs);
    let end = device_bytes.min(METADATA_REGION_BYTES + FORMAT_DATA_PROBE_BYTES) / bs * bs;
    if end <= METADATA_REGION_BYTES {
        // No data area: the format itself refuses the device as too small.
        return Ok(());
    }
    let io_failed = |source: std::io::Error| {
        FormatBlankError::Io(StoreError::Io {
            op: "blank check: read data area",
            source,
        })
    };
    let mut reader = BdevHeaderIo::new(backing.clone(), CoreId(0), end).map_err(io_failed)?;
    match store::first_nonzero(
        |off, buf| reader.read_at(off, buf),
        METADATA_REGION_BYTES,
        end - METADATA_REGION_BYTES,
    ) {
        Ok(None) => Ok(()),
        Ok(Some(offset)) => Err(FormatBlankError::NotBlank(NotBlank::Data { offset })),
        Err(e) => Err(io_failed(e)),
    }
}

/// Zeroes the whole metadata region and flushes (a forced format only).
fn zero_metadata_region(io: &mut dyn HeaderIo) -> std::io::Result<()> {
    let zero = vec![0u8; 128 * 1024];
    let mut off = 0u64;
    while off < METADATA_REGION_BYTES {
        io.write_at(off, &zero)?;
        off += zero.len() as u64;
    }
    io.flush()
}

/// The error of a namespace whose header copies are blank over a device that is not.
fn not_blank_reason(ns_id: &str, found: &NotBlank) -> String {
    format!(
        "the header copies are blank but {found}: refusing to format, since this is most \
         likely the namespace's ciphertext under a wiped header and a new DEK would make it \
         unreadable for good. If the header was wiped by accident, restore the first 1 MiB of \
         the device from a backup. If the data is expendable, stop nvseal and run \
         `nvseal format --force -c <config> --bdev {ns_id}`"
    )
}

impl Inner {
    /// The blank check before `create` formats a device whose header copies are blank: the
    /// rest of the metadata region and the first [`FORMAT_DATA_PROBE_BYTES`] of the data area
    /// must read as zeros too. Otherwise the header was most likely wiped over live ciphertext,
    /// and a fresh DEK would make it unreadable for good: a permanent error that says what to do
    /// (nothing is written). A read failure is transient.
    pub(super) fn refuse_unless_blank(
        &self,
        io: &mut dyn HeaderIo,
        ns_id: &str,
        who: &str,
        backing: &Arc<dyn Bdev>,
    ) -> Result<(), Fail> {
        match check_blank(io, backing) {
            Ok(()) => Ok(()),
            Err(FormatBlankError::Io(e)) => Err(Fail::Transient(format!("blank check: {e}"))),
            Err(FormatBlankError::NotBlank(found)) => {
                let reason = not_blank_reason(ns_id, &found);
                self.audit(who, "format", ns_id, &format!("refused: {found}"));
                Err(Fail::Permanent(reason))
            }
        }
    }

    /// Formats a blank header: chooses the KEK, draws a DEK, writes both copies.
    pub(super) fn format(
        &self,
        io: &mut dyn HeaderIo,
        ns_id: &str,
        who: &str,
        backing: &Arc<dyn Bdev>,
        provider: &str,
        kek_name: Option<&str>,
    ) -> Result<Opened, Fail> {
        let slot = self
            .provider_by_name(provider)
            .ok_or_else(|| Fail::Permanent(format!("no key provider named {provider:?}")))?;
        let data_unit = DataUnit::from_bytes(backing.block_size()).ok_or_else(|| {
            Fail::Permanent(format!("block size {} unsupported", backing.block_size()))
        })?;
        let device_bytes = backing
            .num_blocks()
            .saturating_mul(u64::from(backing.block_size()));
        let mut p = lock(&slot.inner);
        let kek_id = self
            .format_kek(slot, &mut p, kek_name, who)
            .map_err(|e| provider_fail("choosing the KEK", e))?;
        let params = FormatParams::new(Uuid::new_v4(), data_unit, device_bytes, kek_id.clone());
        match format_encrypted(io, p.as_dyn(), &params) {
            Ok(opened) => {
                self.audit(
                    who,
                    "format",
                    ns_id,
                    &format!("ok: kek {provider}/{kek_id}"),
                );
                Ok(opened)
            }
            Err(FormatError::Provider(e)) if e.is_transient() => {
                Err(Fail::Transient(format!("formatting: fetching KEK: {e}")))
            }
            Err(e) => {
                self.audit(who, "format", ns_id, &format!("error: {e}"));
                Err(Fail::Permanent(format!("formatting: {e}")))
            }
        }
    }

    /// The KEK a new namespace is wrapped under (see [`NamespaceKeyConfig::kek_name`]).
    pub(super) fn format_kek(
        &self,
        slot: &ProviderSlot,
        p: &mut ManagedProvider,
        kek_name: Option<&str>,
        who: &str,
    ) -> Result<KekId, ProviderError> {
        let current = lock(&slot.current_kek).clone();
        match (p, kek_name) {
            (ManagedProvider::Local(_), Some(name)) => Ok(KekId::new(name)?),
            (ManagedProvider::Local(_), None) => Ok(current.unwrap_or(KekId::new(DEFAULT_KEK_ID)?)),
            (ManagedProvider::Kmip(k), Some(name)) => {
                let found = k.locate(name)?;
                match found.as_slice() {
                    [id] => Ok(id.clone()),
                    [] => self.create_kek(slot, k, name, who),
                    many => Err(ProviderError::Protocol {
                        detail: format!(
                            "{} KEKs are named {name:?} on cluster {}; name one by a unique name",
                            many.len(),
                            slot.name
                        ),
                    }),
                }
            }
            (ManagedProvider::Kmip(k), None) => match current {
                Some(id) => Ok(id),
                None => {
                    let id = self.create_kek(slot, k, &generated_kek_name(), who)?;
                    *lock(&slot.current_kek) = Some(id.clone());
                    Ok(id)
                }
            },
        }
    }

    fn create_kek(
        &self,
        slot: &ProviderSlot,
        p: &mut dyn KeyProvider,
        name: &str,
        who: &str,
    ) -> Result<KekId, ProviderError> {
        match p.create_kek(name) {
            Ok((id, _kek)) => {
                self.audit(who, "kek-create", &format!("{}/{id}", slot.name), "ok");
                Ok(id)
            }
            Err(e) => {
                self.audit(who, "kek-create", &slot.name, &format!("error: {e}"));
                Err(e)
            }
        }
    }
}

fn provider_fail(what: &str, e: ProviderError) -> Fail {
    if e.is_transient() {
        Fail::Transient(format!("{what}: {e}"))
    } else {
        Fail::Permanent(format!("{what}: {e}"))
    }
}
