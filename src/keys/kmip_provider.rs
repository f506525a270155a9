//! The KMIP key provider: [`KeyProvider`] on top of a [`KmsCluster`] (ordered KMIP servers with
//! failover).
//!
//! Owns the translation between the key-management layer and the KMS client: KEK ids
//! ([`KekId`] ↔ KMIP Unique Identifier) and errors ([`KmsError`] → [`ProviderError`], deciding
//! what the boot path retries). Key material needs no translation: the KMS client hands back
//! the one [`Kek`] type of the crate (defined in `kms::key`), which is passed on as it is. Runs on control threads only: every
//! call is one or more blocking TLS round trips, each bounded by the cluster's connect and
//! response timeouts per server.
//!
//! Error mapping (what is transient decides whether a locked namespace keeps retrying):
//! * every server failed at transport level (refused, timed out, I/O, closed, garbled reply)
//!   → [`ProviderError::Unavailable`] (transient: boot retries with back-off);
//! * every server rejected the TLS handshake (certificate refused by either side, no shared
//!   cipher) → [`ProviderError::Denied`]: retrying cannot help until the configuration changes;
//! * a KMIP failure reply: Item Not Found → [`ProviderError::NotFound`]; Permission Denied and
//!   Authentication Not Successful → [`ProviderError::Denied`]; anything else →
//!   [`ProviderError::Denied`] with the server's reason (the server answered and said no);
//! * a reply that cannot be used (wrong key length, fingerprint mismatch) →
//!   [`ProviderError::Protocol`].
//!
//! The fingerprint check itself lives one layer up ([`super::open_encrypted`] compares the
//! fetched KEK with the header's fingerprint), so a KEK fetched from a server that holds a
//! different key under the same id is refused before it unwraps anything.

use std::sync::Arc;

use super::provider::{KekId, KeyProvider, ProviderError, ProviderInfo, ProviderKind};
use super::wrap::Kek;
use crate::kms::{self, KmsCluster, KmsError, Phase, ResultReason, RevocationReason};

/// KEKs held by a KMIP cluster. Cheap to clone; clones share the cluster's connection.
#[derive(Clone)]
pub struct KmipKeyProvider {
    cluster: Arc<KmsCluster>,
}

impl std::fmt::Debug for KmipKeyProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmipKeyProvider")
            .field("alias", &self.cluster.alias())
            .field("servers", &self.cluster.servers())
            .finish()
    }
}

impl KmipKeyProvider {
    /// A provider over `cluster` (its alias is what headers record).
    pub fn new(cluster: Arc<KmsCluster>) -> Self {
        Self { cluster }
    }

    /// The cluster, for status reports.
    pub fn cluster(&self) -> &Arc<KmsCluster> {
        &self.cluster
    }

    /// Ids of the KEKs named `name` on the cluster (KMIP Locate).
    pub fn locate(&self, name: &str) -> Result<Vec<KekId>, ProviderError> {
        let ids = self.cluster.locate_by_name(name).map_err(map_error)?;
        ids.into_iter()
            .map(|id| KekId::new(id.as_str()).map_err(ProviderError::from))
            .collect()
    }
}

fn kms_id(id: &KekId) -> kms::KeyId {
    kms::KeyId::new(id.as_str())
}

/// True when a transport failure means "the TLS peer refused us" (configuration), not "the
/// server is not there" (availability).
fn is_tls_rejection(e: &KmsError) -> bool {
    matches!(
        e,
        KmsError::Tls { .. }
            | KmsError::Closed {
                phase: Phase::Handshake,
                ..
            }
    )
}

/// Maps a KMS error onto the provider error space (see the module docs).
pub fn map_error(e: KmsError) -> ProviderError {
    match &e {
        KmsError::AllServersFailed { attempts, .. }
            if !attempts.is_empty() && attempts.iter().all(is_tls_rejection) =>
        {
            ProviderError::Denied {
                detail: format!("TLS handshake rejected by every server (check the client certificate, key and CA bundle): {e}"),
            }
        }
        KmsError::AllServersFailed { .. } => ProviderError::Unavailable {
            detail: e.to_string(),
        },
        e if e.is_transport() => ProviderError::Unavailable {
            detail: e.to_string(),
        },
        // The server answered and said no; Item Not Found is turned into NotFound by callers
        // that know the id (`map_error_for`).
        KmsError::Server { .. } => ProviderError::Denied {
            detail: e.to_string(),
        },
        _ => ProviderError::Protocol {
            detail: e.to_string(),
        },
    }
}

/// Like [`map_error`], but an Item Not Found reply becomes [`ProviderError::NotFound`] for `id`.
fn map_error_for(id: &KekId, e: KmsError) -> ProviderError {
    if e.result_reason() == Some(ResultReason::ITEM_NOT_FOUND) {
        return ProviderError::NotFound { id: id.clone() };
    }
    map_error(e)
}

impl KeyProvider for KmipKeyProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Kmip
    }

    fn cluster_alias(&self) -> &str {
        self.cluster.alias()
    }

    /// Create + Activate (usage mask Wrap | Unwrap, Name `name`), then Get on the same
    /// connection to hand the key back.
    fn create_kek(&mut self, name: &str) -> Result<(KekId, Kek), ProviderError> {
        let served = self
            .cluster
            .execute(|c| {
                let id = c.create_kek(name)?;
                let key = c.get_key(&id)?;
                Ok((id, key))
            })
            .map_err(map_error)?;
        let (id, kek) = served.value;
        let id = KekId::new(id.as_str())?;
        tracing::info!(cluster = %self.cluster.alias(), server = %served.server, kek_id = %id,
            fingerprint = %kek.fingerprint(), name, "created and activated KEK");
        Ok((id, kek))
    }

    fn get_kek(&mut self, id: &KekId) -> Result<Kek, ProviderError> {
        let served = self
            .cluster
            .execute(|c| c.get_key(&kms_id(id)))
            .map_err(|e| map_error_for(id, e))?;
        tracing::debug!(cluster = %self.cluster.alias(), server = %served.server, kek_id = %id,
            "fetched KEK");
        Ok(served.value)
    }

    fn revoke_kek(&mut self, id: &KekId) -> Result<(), ProviderError> {
        self.cluster
            .revoke(&kms_id(id), RevocationReason::Superseded)
            .map_err(|e| map_error_for(id, e))?;
        tracing::info!(cluster = %self.cluster.alias(), kek_id = %id, "revoked KEK (superseded)");
        Ok(())
    }

    fn destroy_kek(&mut self, id: &KekId) -> Result<(), ProviderError> {
        self.cluster
            .destroy(&kms_id(id))
            .map_err(|e| map_error_for(id, e))?;
        tracing::info!(cluster = %self.cluster.alias(), kek_id = %id, "destroyed KEK");
        Ok(())
    }

    fn describe(&self) -> ProviderInfo {
        let servers: Vec<String> = self
            .cluster
            .servers()
            .iter()
            .map(ToString::to_string)
            .collect();
        ProviderInfo {
            kind: ProviderKind::Kmip,
            cluster_alias: self.cluster.alias().to_owned(),
            detail: format!(
                "KMIP cluster, servers in failover order: {}",
                servers.join(", ")
            ),
            production_ready: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn server(port: u16) -> String {
        format!("127.0.0.1:{port}")
    }

    #[test]
    fn transport_failures_are_transient_and_tls_rejections_are_not() {
        let refused = KmsError::Refused { server: server(1) };
        let timeout = KmsError::Timeout {
            server: server(2),
            phase: Phase::Response,
            timeout: Duration::from_millis(10),
        };
        let closed_hs = KmsError::Closed {
            server: server(3),
            phase: Phase::Handshake,
        };
        let all = |attempts| KmsError::AllServersFailed {
            alias: "c".into(),
            attempts,
        };
        assert!(map_error(all(vec![refused])).is_transient());
        let mixed = map_error(all(vec![
            KmsError::Refused { server: server(1) },
            timeout,
            KmsError::Closed {
                server: server(3),
                phase: Phase::Handshake,
            },
        ]));
        assert!(mixed.is_transient(), "{mixed}");
        let denied = map_error(all(vec![closed_hs]));
        assert!(!denied.is_transient());
        assert!(
            denied.to_string().contains("client certificate"),
            "{denied}"
        );
        // A server answer is never transient.
        let answer = KmsError::Server {
            server: server(4),
            operation: "Get",
            result_status: kms::ResultStatus::OperationFailed,
            reason: Some(ResultReason::ITEM_NOT_FOUND),
            message: String::new(),
        };
        let id = KekId::new("7").expect("id");
        assert!(matches!(
            map_error_for(&id, answer),
            ProviderError::NotFound { ref id } if id.as_str() == "7"
        ));
    }
}
