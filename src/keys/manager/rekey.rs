//! Shallow rekey orchestration: creating the new KEK at the target provider, re-wrapping the
//! DEK of every online namespace in scope (also across providers, i.e. a change of KMS cluster,
//! via [`rekey_across`]), and retiring the KEKs no namespace references any more.
//!
//! Runs on the caller's control thread (an RPC handler), serialized by the manager's rekey
//! lock; it blocks for the KMS round trips and header writes it does. Split out of the manager
//! because the rekey is a multi-step, crash-sensitive procedure best read on its own.

use std::sync::Arc;

use super::{
    generated_kek_name, lock, Inner, KekRef, NamespaceKeyState, NamespaceRekey,
    NamespaceRekeyResult, OldKek, OldKekAction, ProviderSlot, RekeyReport, RekeyRequestError,
    RekeyScope,
};
use crate::keys::provider::KekId;
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
    ) -> Result<RekeyReport, RekeyRequestError> {
        let _serial = lock(&self.rekey_lock);
        let target_slot = self
            .provider_by_name(target)
            .ok_or_else(|| RekeyRequestError::UnknownProvider(target.to_owned()))?
            .clone();
        let ids: Vec<String> = match scope {
            RekeyScope::All => lock(&self.namespaces).keys().cloned().collect(),
            RekeyScope::Namespaces(v) => v.clone(),
        };
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

        let mut old_keks = Vec::with_capacity(replaced.len());
        for (provider, kek_id) in replaced {
            let action = self.retire_kek(who, &provider, &kek_id);
            old_keks.push(OldKek {
                provider,
                kek_id,
                action,
            });
        }
        if lines
            .iter()
            .any(|l| l.result == NamespaceRekeyResult::Rekeyed)
        {
            *lock(&target_slot.current_kek) = Some(new_id.clone());
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

    /// Revokes a replaced KEK unless a registered namespace still references it.
    pub(super) fn retire_kek(&self, who: &str, provider: &str, kek_id: &KekId) -> OldKekAction {
        let used_by: Vec<String> = lock(&self.namespaces)
            .iter()
            .filter(|(_, e)| {
                let uses = |r: &Option<KekRef>| {
                    r.as_ref()
                        .is_some_and(|(p, id)| p == provider && id == kek_id)
                };
                uses(&e.active) || uses(&e.pending)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut used_by = used_by;
        used_by.extend(
            lock(&self.retained)
                .iter()
                .filter(|((p, id), _)| p == provider && id == kek_id)
                .map(|(_, ns)| format!("{ns} (removed; its header still needs it)")),
        );
        let target = format!("{provider}/{kek_id}");
        if !used_by.is_empty() {
            tracing::info!(kek = %target, ?used_by, "old KEK still in use; not revoked");
            return OldKekAction::Kept { used_by };
        }
        let Some(slot) = self.provider_by_name(provider) else {
            return OldKekAction::RevokeFailed {
                reason: format!("provider {provider:?} is not configured"),
            };
        };
        let result = lock(&slot.inner).as_dyn().revoke_kek(kek_id);
        match result {
            Ok(()) => {
                self.audit(who, "revoke", &target, "ok");
                tracing::info!(kek = %target, "old KEK revoked");
                OldKekAction::Revoked
            }
            Err(e) => {
                self.audit(who, "revoke", &target, &format!("error: {e}"));
                tracing::error!(kek = %target, error = %e, "revoking the old KEK failed; revoke it by hand");
                OldKekAction::RevokeFailed {
                    reason: e.to_string(),
                }
            }
        }
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
