//! Retrying the unlock of a namespace by hand (`namespace.retry_unlock`): a namespace in
//! `error` gets a new unlock thread, one that waits for its next attempt is woken at once.
//!
//! Runs on the caller's control thread (an RPC handler); the unlock itself runs on the new
//! `unlock-<ns>` thread. It exists because a permanent failure is only permanent until the
//! operator fixes its cause (a client certificate, a KEK re-activated at the KMS, a KMS that
//! was misclassified as rejecting us): the target should not have to restart for that.

use std::sync::Arc;

use super::{lock, KeyManager, NamespaceKeyState};

/// Why [`KeyManager::retry_unlock`] did nothing.
#[derive(Debug, thiserror::Error)]
pub enum RetryUnlockError {
    /// No encrypted namespace of that name is registered.
    #[error("no encrypted namespace named {0:?}")]
    UnknownNamespace(String),
    /// The namespace is online or an unlock attempt is running: nothing to retry.
    #[error("namespace {ns_id} is {state}: nothing to retry")]
    NotFailed {
        /// The namespace.
        ns_id: String,
        /// Its state, in words.
        state: &'static str,
    },
    /// The unlock thread could not be started (the namespace stays in `error`).
    #[error("namespace {ns_id}: starting the unlock thread: {source}")]
    Spawn {
        /// The namespace.
        ns_id: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What [`KeyManager::retry_unlock`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryUnlock {
    /// The namespace was in `error`: it is locked again and a new unlock loop runs.
    Restarted,
    /// The namespace was waiting for its next attempt after a transient failure: it tries now.
    Woken,
}

impl KeyManager {
    /// Retries the unlock of `ns_id` now: a namespace in `error` is set back to `locked` and
    /// gets a new unlock loop (with a fresh back-off); one waiting after a transient failure is
    /// woken. Refused for an online namespace or one whose attempt is running. Audited as op
    /// `retry-unlock` with the error it clears.
    pub fn retry_unlock(&self, who: &str, ns_id: &str) -> Result<RetryUnlock, RetryUnlockError> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let cleared = {
            let mut table = lock(&self.inner.namespaces);
            let entry = table
                .get_mut(ns_id)
                .ok_or_else(|| RetryUnlockError::UnknownNamespace(ns_id.to_owned()))?;
            match &entry.state {
                // An unlock loop only ever ends in `error` before a crypto bdev exists; one
                // that holds a key is never unlocked twice.
                NamespaceKeyState::Error { .. } if entry.crypto.is_some() => {
                    return Err(RetryUnlockError::NotFailed {
                        ns_id: ns_id.to_owned(),
                        state: "in error with its key held",
                    })
                }
                NamespaceKeyState::Error { reason } => {
                    let reason = reason.clone();
                    entry.state = NamespaceKeyState::Locked;
                    entry.retry_at = None;
                    entry.stop = Some(stop_tx);
                    reason
                }
                NamespaceKeyState::Locked => {
                    let woken = entry
                        .stop
                        .as_ref()
                        .is_some_and(|tx| tx.try_send(()).is_ok());
                    drop(table);
                    self.inner.audit(who, "retry-unlock", ns_id, "ok: woken");
                    tracing::info!(namespace = %ns_id, woken, "unlock retried now by request");
                    return Ok(RetryUnlock::Woken);
                }
                NamespaceKeyState::Unlocking { .. } => {
                    return Err(RetryUnlockError::NotFailed {
                        ns_id: ns_id.to_owned(),
                        state: "unlocking",
                    })
                }
                NamespaceKeyState::Online => {
                    return Err(RetryUnlockError::NotFailed {
                        ns_id: ns_id.to_owned(),
                        state: "online",
                    })
                }
            }
        };
        self.inner.changed.notify_all();
        tracing::warn!(namespace = %ns_id, previous_error = %cleared,
            "namespace key state: locked (unlock restarted by request)");
        let inner = Arc::clone(&self.inner);
        let id = ns_id.to_owned();
        let spawned = std::thread::Builder::new()
            .name(format!("unlock-{ns_id}"))
            .spawn(move || inner.unlock_loop(&id, &stop_rx));
        match spawned {
            Ok(handle) => {
                lock(&self.threads).push(handle);
                self.inner.audit(
                    who,
                    "retry-unlock",
                    ns_id,
                    &format!("ok: restarted after error: {cleared}"),
                );
                Ok(RetryUnlock::Restarted)
            }
            Err(source) => {
                self.inner
                    .set_state(ns_id, NamespaceKeyState::Error { reason: cleared }, |_| {});
                self.inner
                    .audit(who, "retry-unlock", ns_id, &format!("error: {source}"));
                Err(RetryUnlockError::Spawn {
                    ns_id: ns_id.to_owned(),
                    source,
                })
            }
        }
    }
}
