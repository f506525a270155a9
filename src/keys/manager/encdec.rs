//! Encrypting a plaintext namespace and decrypting an encrypted one, online
//! (`namespace.encrypt`, `namespace.decrypt`; docs/lifecycle.md §7).
//!
//! Both run on the caller's thread (an RPC handler) up to the first durable header update, then
//! hand over to the same pass thread as a deep rekey ([`Inner::start_pass`]): one segment at a
//! time under the hot zone, a journal record per step, recovery at the next open, pause, resume,
//! rate limit and `rekey.status`. What differs is the keying of the two parts (encrypt: the DEK
//! below the watermark, plaintext above; decrypt: the reverse) and the end: an encrypt leaves an
//! ordinary encrypted header, a decrypt a retired one that holds no key.
//!
//! Encrypt starts from a plaintext namespace in one of three states: a retired header (decrypted
//! earlier), no header in a reserved metadata region (config `plaintext: true`), or no detached
//! header file yet (config `header_file` + `plaintext: true`: the file is created here, never
//! over an existing path). The DEK is fresh, wrapped under the namespace's KEK (its `kek_name`,
//! or the provider's current KEK, created if missing as for a format), and on disk in the
//! header's active slot before the first unit is encrypted.

use std::sync::Arc;
use std::time::Instant;

use super::deep::{
    check_rate, data_key, refuse_unless_settled, DeepRekeyError, DeepRekeyStatus, DeepRun,
    DeepState,
};
use super::{lock, Inner, KeyManager, PassOp};
use crate::bdev::Bdev;
use crate::crypto::keymap::Keying;
use crate::keys::convert;
use crate::keys::deep::PassControl;
use crate::keys::header::{AnyHeader, KeySlot, METADATA_REGION_BYTES};
use crate::keys::header_io::FileHeaderIo;
use crate::keys::store::{self, HeaderIo, StoreError, Stored};
use crate::keys::wrap::Dek;
use crate::keys::{now_unix_s, rekey};

impl KeyManager {
    /// Starts encrypting an online plaintext namespace in place while hosts keep doing I/O.
    /// Returns the pass's status once the DEK is durable in the header and the pass runs.
    /// Audited as `namespace-encrypt`.
    pub fn encrypt_namespace(
        &self,
        who: &str,
        ns_id: &str,
        rate_mib_s: Option<u64>,
    ) -> Result<DeepRekeyStatus, DeepRekeyError> {
        let r = self.inner.encrypt(who, ns_id, rate_mib_s);
        self.inner.audit_start(who, PassOp::Encrypt, ns_id, &r);
        r
    }

    /// Starts decrypting an online encrypted namespace in place while hosts keep doing I/O; at
    /// the end its header is retired (no key on disk) and it is served as plaintext. Audited as
    /// `namespace-decrypt`.
    pub fn decrypt_namespace(
        &self,
        who: &str,
        ns_id: &str,
        rate_mib_s: Option<u64>,
    ) -> Result<DeepRekeyStatus, DeepRekeyError> {
        let r = self.inner.decrypt(who, ns_id, rate_mib_s);
        self.inner.audit_start(who, PassOp::Decrypt, ns_id, &r);
        r
    }
}

impl Inner {
    fn audit_start(
        &self,
        who: &str,
        op: PassOp,
        ns_id: &str,
        r: &Result<DeepRekeyStatus, DeepRekeyError>,
    ) {
        let audit_op = match op {
            PassOp::Encrypt => "namespace-encrypt",
            PassOp::Decrypt => "namespace-decrypt",
            PassOp::DeepRekey => "rekey-deep",
        };
        match r {
            Ok(s) => self.audit(
                who,
                audit_op,
                ns_id,
                &format!("ok: started, KEK {}/{}", s.new_kek_provider, s.new_kek_id),
            ),
            Err(e) => {
                tracing::warn!(namespace = %ns_id, error = %e, "{} refused", op.name());
                self.audit(who, audit_op, ns_id, &format!("error: {e}"));
            }
        }
    }

    /// Refuses a second pass on a namespace.
    fn check_idle(&self, ns_id: &str) -> Result<(), DeepRekeyError> {
        let table = lock(&self.namespaces);
        match table.get(ns_id).and_then(|e| e.deep.as_ref()) {
            Some(d) if d.active() => Err(DeepRekeyError::Busy {
                ns_id: ns_id.to_owned(),
                what: format!("a {} pass is {:?}", d.op.name(), d.state).to_lowercase(),
            }),
            _ => Ok(()),
        }
    }

    fn encrypt(
        self: &Arc<Self>,
        who: &str,
        ns_id: &str,
        rate_mib_s: Option<u64>,
    ) -> Result<DeepRekeyStatus, DeepRekeyError> {
        let rate = check_rate(rate_mib_s)?;
        let _serial = lock(&self.rekey_lock);
        let (io, crypto) = self.online_parts(ns_id)?;
        self.check_idle(ns_id)?;
        let wrong = |what: &str| DeepRekeyError::WrongState {
            ns_id: ns_id.to_owned(),
            what: what.to_owned(),
        };
        let failed = |reason: String| DeepRekeyError::Failed {
            ns_id: ns_id.to_owned(),
            reason,
        };
        match crypto.key_control().keying() {
            k if k.is_plain() => {}
            Keying::Single(_) => return Err(wrong("the namespace is already encrypted")),
            Keying::Split(_) => {
                return Err(DeepRekeyError::Busy {
                    ns_id: ns_id.to_owned(),
                    what: "a conversion is in progress".into(),
                })
            }
        }
        let (provider, kek_name, header_file, backing) = {
            let table = lock(&self.namespaces);
            let e = table
                .get(ns_id)
                .ok_or_else(|| DeepRekeyError::UnknownNamespace(ns_id.to_owned()))?;
            (
                e.provider.clone(),
                e.kek_name.clone(),
                e.header_file.clone(),
                e.backing.clone(),
            )
        };
        let slot = self
            .provider_by_name(&provider)
            .ok_or_else(|| DeepRekeyError::UnknownProvider(provider.clone()))?
            .clone();
        let perr = |reason: String| DeepRekeyError::Provider {
            provider: provider.clone(),
            reason,
        };
        // The DEK and its slot first: nothing is written if the KMS fails.
        let dek = Dek::generate().map_err(|e| failed(format!("drawing the DEK: {e}")))?;
        let (kek_id, key_slot) = {
            let mut p = lock(&slot.inner);
            let id = self
                .format_kek(&slot, &mut p, kek_name.as_deref(), who)
                .map_err(|e| perr(format!("choosing the KEK: {e}")))?;
            let kek = p
                .as_dyn()
                .get_kek(&id)
                .map_err(|e| perr(format!("fetching KEK {id}: {e}")))?;
            let s = rekey::slot_for(p.as_dyn(), &id, &kek, &dek);
            (id, s)
        };
        let key = data_key(&dek, self).map_err(failed)?;
        drop(dek);
        let unit = backing.block_size();
        let seg = convert::default_segment_blocks(unit);
        let device_bytes = backing.num_blocks().saturating_mul(u64::from(unit));
        let mut g = lock(&io);
        if let Some(path) = &header_file {
            let missing = matches!(std::fs::symlink_metadata(path),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound);
            if missing {
                convert::create_detached_header(path).map_err(|e| failed(e.to_string()))?;
                tracing::info!(namespace = %ns_id, header_file = %path.display(),
                    "detached header file created for the encrypt");
            }
            let file = FileHeaderIo::open_regular(path, METADATA_REGION_BYTES)
                .map_err(|e| failed(format!("detached header {}: {e}", path.display())))?;
            *g = Box::new(file);
        }
        let label = header_file.as_ref().map(|_| ns_id);
        let begun = self.begin_encrypt(
            &mut **g,
            ns_id,
            &backing,
            label,
            device_bytes,
            crypto.num_blocks(),
            key_slot,
            seg,
        )?;
        drop(g);
        crypto
            .key_control()
            .begin_split(Some(key), None, 0, u64::from(seg));
        self.note_header(ns_id, &begun);
        tracing::info!(namespace = %ns_id, provider = %provider, kek = %kek_id,
            data_blocks = begun.header.data_blocks, rate_mib_s = rate,
            "encrypt started: the DEK is in the header; blocks below the watermark are ciphertext");
        self.install_run(
            ns_id,
            PassOp::Encrypt,
            rate,
            &begun,
            (slot.name.clone(), kek_id),
        );
        self.start_pass(ns_id, who)
            .map_err(|e| failed(format!("starting the pass: {e}")))?;
        self.deep_status(ns_id)
    }

    /// Writes the header that starts an encrypt: over a retired header ([`convert::begin_encrypt`])
    /// or a blank region / new detached file ([`convert::begin_encrypt_blank`]). The header must
    /// describe exactly the `served_blocks` units the namespace shows now. Refusals write nothing.
    #[allow(clippy::too_many_arguments)]
    fn begin_encrypt(
        &self,
        io: &mut dyn HeaderIo,
        ns_id: &str,
        backing: &Arc<dyn Bdev>,
        label: Option<&str>,
        device_bytes: u64,
        served_blocks: u64,
        key_slot: KeySlot,
        seg: u32,
    ) -> Result<Stored, DeepRekeyError> {
        let failed = |reason: String| DeepRekeyError::Failed {
            ns_id: ns_id.to_owned(),
            reason,
        };
        let same_size = |blocks: u64| {
            if blocks == served_blocks {
                Ok(())
            } else {
                Err(failed(format!(
                    "the header would describe {blocks} blocks but the namespace serves \
                     {served_blocks}; nothing was changed"
                )))
            }
        };
        match store::read_any(io) {
            Ok(any) => {
                let AnyHeader::Plain(frame) = &any.header else {
                    return Err(DeepRekeyError::WrongState {
                        ns_id: ns_id.to_owned(),
                        what: "the header holds a key although the namespace is served as \
                               plaintext; restart to reread it"
                            .into(),
                    });
                };
                any.header
                    .frame()
                    .check_binding(label, device_bytes)
                    .map_err(|e| failed(format!("header: {e}; nothing was changed")))?;
                same_size(frame.data_blocks)?;
                convert::begin_encrypt(io, &any, key_slot, seg, now_unix_s())
                    .map_err(|e| failed(e.to_string()))
            }
            Err(StoreError::NotFormatted | StoreError::NoValidCopy { .. }) => {
                let fresh = self
                    .plain_frame(ns_id, backing, label.is_some())
                    .map_err(failed)?;
                same_size(fresh.data_blocks)?;
                let frame = convert::plain_frame_for_region(io, &fresh)
                    .map_err(|e| failed(e.to_string()))?;
                convert::begin_encrypt_blank(io, &frame, key_slot, seg, now_unix_s())
                    .map_err(|e| failed(e.to_string()))
            }
            Err(e) => Err(failed(e.to_string())),
        }
    }

    fn decrypt(
        self: &Arc<Self>,
        who: &str,
        ns_id: &str,
        rate_mib_s: Option<u64>,
    ) -> Result<DeepRekeyStatus, DeepRekeyError> {
        let rate = check_rate(rate_mib_s)?;
        let _serial = lock(&self.rekey_lock);
        let (io, crypto) = self.online_parts(ns_id)?;
        self.check_idle(ns_id)?;
        let busy = |what: &str| DeepRekeyError::Busy {
            ns_id: ns_id.to_owned(),
            what: what.to_owned(),
        };
        let failed = |reason: String| DeepRekeyError::Failed {
            ns_id: ns_id.to_owned(),
            reason,
        };
        let key = match crypto.key_control().keying() {
            Keying::Single(k) => k,
            k if k.is_plain() => {
                return Err(DeepRekeyError::WrongState {
                    ns_id: ns_id.to_owned(),
                    what: "the namespace is already plaintext".into(),
                })
            }
            Keying::Split(_) => return Err(busy("a conversion is in progress")),
        };
        let mut g = lock(&io);
        let stored = store::read_header(&mut **g).map_err(|e| failed(e.to_string()))?;
        refuse_unless_settled(ns_id, &stored.header.rekey)?;
        let seg = convert::default_segment_blocks(stored.header.data_unit.bytes());
        let begun = convert::begin_decrypt(&mut **g, &stored, seg, now_unix_s())
            .map_err(|e| failed(e.to_string()))?;
        drop(g);
        crypto
            .key_control()
            .begin_split(None, Some(key), 0, u64::from(seg));
        self.note_header(ns_id, &begun);
        let kek = self.slot_ref(&begun.header.active);
        tracing::info!(namespace = %ns_id, kek = %kek.1, data_blocks = begun.header.data_blocks,
            rate_mib_s = rate,
            "decrypt started: blocks below the watermark are plaintext from now on");
        self.install_run(ns_id, PassOp::Decrypt, rate, &begun, kek);
        self.start_pass(ns_id, who)
            .map_err(|e| failed(format!("starting the pass: {e}")))?;
        self.deep_status(ns_id)
    }

    /// Records a new encrypt/decrypt pass in the namespace's entry (started by `start_pass`).
    fn install_run(&self, ns_id: &str, op: PassOp, rate: u64, begun: &Stored, kek: super::KekRef) {
        let mut table = lock(&self.namespaces);
        if let Some(e) = table.get_mut(ns_id) {
            e.deep = Some(DeepRun {
                op,
                control: PassControl::new(rate),
                state: DeepState::Running,
                error: None,
                data_blocks: begun.header.data_blocks,
                unit: begun.header.data_unit.bytes(),
                new_kek: kek.clone(),
                old_kek: kek,
                run_started: Instant::now(),
                run_bytes0: 0,
                thread: None,
            });
        }
    }
}

#[cfg(test)]
mod tests;
