//! Shallow rekey orchestration: creating the new KEK at the target provider, re-wrapping the
//! DEK of every online namespace in scope (also across providers, i.e. a change of KMS cluster,
//! via [`rekey_across`]), and what happens to the replaced KEKs.
//!
//! Replaced KEKs are **kept** (left Active) unless the caller asks for revocation
//! (`rekey.shallow {"revoke_old": true}` or `keys.revoke_kek`). nvseal only knows the
//! namespaces registered in this process: a namespace created later with the same `kek_name`,
//! another target sharing the KMS, or a header on a disk not exported right now may still need
//! the old KEK, and strict KMS servers refuse Get of a revoked (Deactivated) key, which would
//! leave such a namespace in `error` for good. An explicit revocation is refused while any
//! registered namespace (or a removed one's header, or the provider's current KEK) references
//! the KEK, or while a registered namespace's header has not been read (its KEK is unknown).
//!
//! Runs on the caller's control thread (an RPC handler), serialized by the manager's rekey
//! lock; it blocks for the KMS round trips and header writes it does. Split out of the manager
//! because the rekey is a multi-step, crash-sensitive procedure best read on its own.

use std::sync::Arc;

use super::{
    generated_kek_name, lock, Inner, KekRef, KeyManager, NamespaceKeyState, NamespaceRekey,
    NamespaceRekeyResult, OldKek, OldKekAction, ProviderSlot, RekeyReport, RekeyRequestError,
    RekeyScope,
};
use crate::keys::provider::{KekId, ProviderError};
use crate::keys::rekey;
use crate::keys::store::{self, HeaderIo, Stored};
use crate::keys::wrap::Kek;
use crate::keys::{open_encrypted, RekeyError, RevokeOld};

impl Inner {
    pub(super) fn shallow_rekey(
        &self,
        who: &str,
        scope: &RekeyScope,
        target: &str,
        revoke_old: bool,
    ) -> Result<RekeyReport, RekeyRequestError> {
        let _serial = lock(&self.rekey_lock);
        let target_slot = self
            .provider_by_name(target)
            .ok_or_else(|| RekeyRequestError::UnknownProvider(target.to_owned()))?
            .clone();
        // The scope is checked before the KEK is created: a KEK made for nothing would be an
        // orphan on the KMS.
        let ids = self.rekey_scope(scope)?;
        let name = generated_kek_name();
        let (new_id, new_kek) = {
            let mut p = lock(&target_slot.inner);
            match p.as_dyn().create_kek(&name) {
                Ok(created) => {
                    self.audit(who, "kek-create", &format!("{target}/{}", created.0), "ok");
                    created
                }
                Err(source) => {
                    self.audit(who, "kek-create", target, &format!("error: {source}"));
                    return Err(RekeyRequestError::CreateKek {
                        provider: target.to_owned(),
                        source,
                    });
                }
            }
        };
        tracing::info!(provider = target, new_kek = %new_id, namespaces = ids.len(),
            "shallow rekey started");

        let mut lines = Vec::with_capacity(ids.len());
        let mut replaced: Vec<KekRef> = Vec::new();
        for ns_id in &ids {
            let line = self.rekey_one(who, ns_id, &target_slot, &new_id, &new_kek);
            if line.result == NamespaceRekeyResult::Rekeyed {
                if let (Some(p), Some(id)) = (&line.old_provider, &line.old_kek_id) {
                    let old = (p.clone(), id.clone());
                    let is_new = p == target && id == &new_id;
                    if !is_new && !replaced.contains(&old) {
                        replaced.push(old);
                    }
                }
            }
            lines.push(line);
        }
        drop(new_kek);

        if lines
            .iter()
            .any(|l| l.result == NamespaceRekeyResult::Rekeyed)
        {
            *lock(&target_slot.current_kek) = Some(new_id.clone());
        }
        let mut old_keks = Vec::with_capacity(replaced.len());
        for (provider, kek_id) in replaced {
            let action = if revoke_old {
                self.revoke_if_unreferenced(who, &provider, &kek_id)
            } else {
                self.retire_kek(who, &provider, &kek_id)
            };
            old_keks.push(OldKek {
                provider,
                kek_id,
                action,
            });
        }
        let report = RekeyReport {
            provider: target.to_owned(),
            new_kek_id: new_id,
            namespaces: lines,
            old_keks,
        };
        tracing::info!(provider = target, new_kek = %report.new_kek_id,
            rekeyed = report.namespaces.iter().filter(|l| l.result == NamespaceRekeyResult::Rekeyed).count(),
            "shallow rekey finished");
        Ok(report)
    }

    /// Rekeys one namespace onto `new_id` and records the header's new KEK references.
    fn rekey_one(
        &self,
        who: &str,
        ns_id: &str,
        target: &Arc<ProviderSlot>,
        new_id: &KekId,
        new_kek: &Kek,
    ) -> NamespaceRekey {
        let mut line = NamespaceRekey {
            ns_id: ns_id.to_owned(),
            old_provider: None,
            old_kek_id: None,
            result: NamespaceRekeyResult::Rekeyed,
        };
        let io = {
            let table = lock(&self.namespaces);
            match table.get(ns_id) {
                None => {
                    line.result = NamespaceRekeyResult::Skipped {
                        reason: "unknown namespace".into(),
                    };
                    return line;
                }
                Some(e) if e.state != NamespaceKeyState::Online => {
                    line.result = NamespaceRekeyResult::Skipped {
                        reason: format!("not online ({:?})", e.state),
                    };
                    return line;
                }
                Some(e) if e.data_state == Some(super::DataState::Plaintext) => {
                    line.result = NamespaceRekeyResult::Skipped {
                        reason: "plaintext: no DEK to re-wrap".into(),
                    };
                    return line;
                }
                Some(e) => e.io.clone(),
            }
        };
        let mut io = lock(&io);
        let result = self.rekey_io(&mut **io, target, new_id, new_kek, &mut line);
        match result {
            Ok(stored) => {
                self.note_header(ns_id, &stored);
                self.audit(
                    who,
                    "rekey",
                    ns_id,
                    &format!(
                        "ok: {}/{} -> {}/{new_id}",
                        line.old_provider.as_deref().unwrap_or("?"),
                        line.old_kek_id.as_ref().map(KekId::as_str).unwrap_or("?"),
                        target.name
                    ),
                );
                tracing::info!(namespace = %ns_id, old_kek = ?line.old_kek_id, new_kek = %new_id,
                    generation = stored.header.generation, "namespace re-wrapped under the new KEK");
            }
            Err(reason) => {
                tracing::error!(namespace = %ns_id, %reason, "shallow rekey of namespace failed");
                self.audit(who, "rekey", ns_id, &format!("error: {reason}"));
                line.result = NamespaceRekeyResult::Failed { reason };
            }
        }
        line
    }

    fn rekey_io(
        &self,
        io: &mut dyn HeaderIo,
        target: &Arc<ProviderSlot>,
        new_id: &KekId,
        new_kek: &Kek,
        line: &mut NamespaceRekey,
    ) -> Result<Stored, String> {
        let stored = store::read_header(io).map_err(|e| e.to_string())?;
        let old = self.provider_for_slot(&stored.header.active)?.clone();
        line.old_provider = Some(old.name.clone());
        line.old_kek_id = Some(stored.header.active.kek_id.clone());
        if Arc::ptr_eq(&old, target) {
            let mut p = lock(&target.inner);
            crate::keys::shallow_rekey(io, p.as_dyn(), new_id, new_kek, RevokeOld::No)
                .map(|out| out.stored)
                .map_err(|e| e.to_string())
        } else {
            rekey_across(io, &old, target, new_id, new_kek)
        }
    }

    /// The namespace ids a rekey covers, checked: every named namespace must be registered,
    /// the list must not be empty, and at least one must be online (else nothing would use the
    /// new KEK).
    fn rekey_scope(&self, scope: &RekeyScope) -> Result<Vec<String>, RekeyRequestError> {
        let table = lock(&self.namespaces);
        let ids: Vec<String> = match scope {
            RekeyScope::All => table.keys().cloned().collect(),
            RekeyScope::Namespaces(v) => {
                if v.is_empty() {
                    return Err(RekeyRequestError::EmptyScope);
                }
                let unknown: Vec<String> = v
                    .iter()
                    .filter(|id| !table.contains_key(id.as_str()))
                    .cloned()
                    .collect();
                if !unknown.is_empty() {
                    return Err(RekeyRequestError::UnknownNamespaces(unknown));
                }
                let mut ids = v.clone();
                ids.sort();
                ids.dedup();
                ids
            }
        };
        let online = ids.iter().any(|id| {
            table
                .get(id)
                .is_some_and(|e| e.state == NamespaceKeyState::Online)
        });
        if !online {
            return Err(RekeyRequestError::NothingOnline(ids));
        }
        Ok(ids)
    }

    /// What may still need KEK `provider/kek_id`, as far as this process can tell: registered
    /// namespaces whose header names it (active or pending slot), removed namespaces whose
    /// header named it, the provider's current KEK (new namespaces get it), and registered
    /// namespaces whose header has not been read (they may name it).
    fn kek_references(&self, provider: &str, kek_id: &KekId) -> Vec<String> {
        let mut used_by: Vec<String> = Vec::new();
        for (id, e) in lock(&self.namespaces).iter() {
            let uses = |r: &Option<KekRef>| {
                r.as_ref()
                    .is_some_and(|(p, k)| p == provider && k == kek_id)
            };
            if uses(&e.active) || uses(&e.pending) {
                used_by.push(id.clone());
            } else if e.active.is_none() {
                used_by.push(format!("{id} (header not read yet: its KEK is unknown)"));
            }
        }
        used_by.extend(
            lock(&self.retained)
                .iter()
                .filter(|((p, id), _)| p == provider && id == kek_id)
                .map(|(_, ns)| format!("{ns} (removed; its header still needs it)")),
        );
        if let Some(slot) = self.provider_by_name(provider) {
            if lock(&slot.current_kek).as_ref() == Some(kek_id) {
                used_by.push(format!(
                    "{provider} current KEK (new namespaces are wrapped under it)"
                ));
            }
        }
        used_by
    }

    /// What happens by default to a KEK a rekey replaced: nothing. It stays Active at its
    /// provider, and the report says who still uses it (maybe nobody this process knows of).
    /// Revoking is explicit (`revoke_old`, `keys.revoke_kek`): see the module docs. Called by
    /// shallow rekeys and at the end of a deep rekey pass (under the rekey lock).
    pub(super) fn retire_kek(&self, _who: &str, provider: &str, kek_id: &KekId) -> OldKekAction {
        let used_by = self.kek_references(provider, kek_id);
        tracing::info!(kek = %format!("{provider}/{kek_id}"), ?used_by,
            "old KEK kept (not revoked: revocation is explicit, keys.revoke_kek)");
        if used_by.is_empty() {
            OldKekAction::NotRevoked {
                note: format!(
                    "no namespace of this target uses it; revoke it with keys.revoke_kek once no other target or disk needs {provider}/{kek_id}"
                ),
            }
        } else {
            OldKekAction::Kept { used_by }
        }
    }

    /// Revokes KEK `provider/kek_id` unless something references it ([`Self::kek_references`]).
    fn revoke_if_unreferenced(&self, who: &str, provider: &str, kek_id: &KekId) -> OldKekAction {
        match self.revoke_unreferenced(who, provider, kek_id) {
            Ok(()) => OldKekAction::Revoked,
            Err(RevokeKekError::InUse { used_by, .. }) => OldKekAction::Kept { used_by },
            Err(e) => OldKekAction::RevokeFailed {
                reason: e.to_string(),
            },
        }
    }

    /// The one place nvseal revokes a KEK. Caller holds the rekey lock.
    fn revoke_unreferenced(
        &self,
        who: &str,
        provider: &str,
        kek_id: &KekId,
    ) -> Result<(), RevokeKekError> {
        let target = format!("{provider}/{kek_id}");
        let Some(slot) = self.provider_by_name(provider) else {
            return Err(RevokeKekError::UnknownProvider(provider.to_owned()));
        };
        let used_by = self.kek_references(provider, kek_id);
        if !used_by.is_empty() {
            tracing::warn!(kek = %target, ?used_by, "revocation refused: the KEK is still referenced");
            self.audit(
                who,
                "revoke",
                &target,
                &format!("refused: in use by {}", used_by.join(", ")),
            );
            return Err(RevokeKekError::InUse {
                kek: target,
                used_by,
            });
        }
        let result = lock(&slot.inner).as_dyn().revoke_kek(kek_id);
        match result {
            Ok(()) => {
                self.audit(who, "revoke", &target, "ok");
                tracing::info!(kek = %target, "KEK revoked");
                Ok(())
            }
            Err(e) => {
                self.audit(who, "revoke", &target, &format!("error: {e}"));
                tracing::error!(kek = %target, error = %e, "revoking the KEK failed");
                Err(RevokeKekError::Provider {
                    kek: target,
                    source: e,
                })
            }
        }
    }
}

/// Why [`KeyManager::revoke_kek`] did not revoke.
#[derive(Debug, thiserror::Error)]
pub enum RevokeKekError {
    /// No provider of that name is configured.
    #[error("no key provider named {0:?} is configured")]
    UnknownProvider(String),
    /// Something this target knows of may still need the KEK.
    #[error("KEK {kek} is still referenced, not revoked: {}", used_by.join(", "))]
    InUse {
        /// `provider/kek-id`.
        kek: String,
        /// Who references it.
        used_by: Vec<String>,
    },
    /// The provider refused or could not be reached.
    #[error("revoking KEK {kek}: {source}")]
    Provider {
        /// `provider/kek-id`.
        kek: String,
        /// Why.
        #[source]
        source: ProviderError,
    },
}

impl KeyManager {
    /// Revokes KEK `kek_id` of provider `provider` (KMIP Revoke, reason Superseded; local:
    /// state `revoked`), the explicit step after a rekey. Refused while a registered namespace's
    /// header (active or pending slot) or a removed namespace's header names it, while it is the
    /// provider's current KEK, or while a registered namespace's header has not been read.
    /// Other targets sharing the KMS are the operator's to check. Audited as `revoke`.
    pub fn revoke_kek(
        &self,
        who: &str,
        provider: &str,
        kek_id: &KekId,
    ) -> Result<(), RevokeKekError> {
        let _serial = lock(&self.inner.rekey_lock);
        self.inner.revoke_unreferenced(who, provider, kek_id)
    }
}

/// Shallow rekey onto a KEK of another provider (change of KMS cluster): opens with the old
/// provider, builds the new slot with the new one, and writes it with the same three durable
/// steps as [`crate::keys::shallow_rekey`] ([`rekey::apply_new_slot`]), so a crash leaves a header
/// that opens with the old or the new provider's KEK; the manager's open path tries the pending
/// slot's provider when the active one fails. `keys::shallow_rekey` itself takes one provider
/// for both KEKs, hence this variant. Each provider's lock is held only for its own calls.
pub(super) fn rekey_across(
    io: &mut dyn HeaderIo,
    old: &ProviderSlot,
    new: &ProviderSlot,
    new_id: &KekId,
    new_kek: &Kek,
) -> Result<Stored, String> {
    let opened = {
        let mut p = lock(&old.inner);
        open_encrypted(io, p.as_dyn()).map_err(|e| format!("opening with the old KEK: {e}"))?
    };
    let new_slot = {
        let mut np = lock(&new.inner);
        rekey::new_slot(np.as_dyn(), new_id, new_kek, &opened.dek).map_err(|e| match e {
            RekeyError::NewKekMismatch(id) => format!(
                "the new KEK does not match what {} returns for {id}",
                new.name
            ),
            e => e.to_string(),
        })?
    };
    rekey::apply_new_slot(io, &opened, new_slot, new_kek).map_err(|e| e.to_string())
}
