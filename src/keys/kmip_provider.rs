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
//! Key state: [`KeyProvider::get_kek`] asks for the key's State (Get Attributes) before Get, on
//! the same connection, and refuses anything but Active with [`ProviderError::InvalidState`].
//! Strict servers (Cosmian) refuse Get of a Deactivated key themselves (Wrong Key Lifecycle
//! State); PyKMIP hands it out. With the check nvseal behaves the same on both, so what works in
//! a PyKMIP test works against a strict server. [`KmipKeyProvider::locate`] finds Active keys
//! only (a revoked key keeps its Name).
//!
//! Error mapping (what is transient decides whether a locked namespace keeps retrying):
//! * every server failed at transport level (refused, timed out, I/O, closed, garbled reply)
//!   → [`ProviderError::Unavailable`] (transient: boot retries with back-off). That includes a
//!   connection closed during the TLS handshake: a load balancer with no healthy backend, or a
//!   server killed mid-handshake, does that, and it says nothing about our certificate;
//! * every server rejected the TLS handshake with a TLS alert about the certificate or the
//!   protocol (bad/unknown/expired certificate, unknown CA, access denied, handshake failure,
//!   no shared version or cipher), or we rejected the server's certificate →
//!   [`ProviderError::Denied`]: retrying cannot help until the configuration changes;
//! * a KMIP failure reply: Item Not Found (1.x) or Object Not Found (2.x) →
//!   [`ProviderError::NotFound`]; Object Destroyed → [`ProviderError::InvalidState`];
//!   anything else (Permission Denied, Wrong Key Lifecycle State, ...) →
//!   [`ProviderError::Denied`] with the server's reason (the server answered and said no);
//! * a reply that cannot be used (wrong key length, fingerprint mismatch) →
//!   [`ProviderError::Protocol`].
//!
//! The fingerprint check itself lives one layer up ([`super::open_encrypted`] compares the
//! fetched KEK with the header's fingerprint), so a KEK fetched from a server that holds a
//! different key under the same id is refused before it unwraps anything.

use std::sync::Arc;

use super::provider::KekState;
use super::provider::{KekId, KeyProvider, ProviderError, ProviderInfo, ProviderKind};
use super::wrap::Kek;
use crate::kms::{self, KeyState, KmsCluster, KmsError, ResultReason, RevocationReason};

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

    /// Ids of the Active KEKs named `name` on the cluster (KMIP Locate with State = Active; a
    /// revoked or not yet activated key of that name is not returned).
    pub fn locate(&self, name: &str) -> Result<Vec<KekId>, ProviderError> {
        let ids = self
            .cluster
            .locate_active_by_name(name)
            .map_err(map_error)?;
        ids.into_iter()
            .map(|id| KekId::new(id.as_str()).map_err(ProviderError::from))
            .collect()
    }
}

fn kms_id(id: &KekId) -> kms::KeyId {
    kms::KeyId::new(id.as_str())
}

/// True when a transport failure means "the TLS peer refused us, or we refused it"
/// (configuration), not "the server is not there" (availability). Only a TLS alert about the
/// certificate or the protocol, or our own verdict on the server's certificate, says that: a
/// connection closed or reset during the handshake, a garbled record, or an alert such as
/// internal_error are what an unhealthy server or a load balancer without a backend produce.
fn is_tls_rejection(e: &KmsError) -> bool {
    use rustls::AlertDescription as A;
    let KmsError::Tls { source, .. } = e else {
        return false;
    };
    match source {
        rustls::Error::AlertReceived(alert) => matches!(
            alert,
            A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::HandshakeFailure
                | A::ProtocolVersion
                | A::InsufficientSecurity
                | A::CertificateRequired
                | A::IllegalParameter
        ),
        rustls::Error::InvalidCertificate(_)
        | rustls::Error::NoCertificatesPresented
        | rustls::Error::PeerIncompatible(_)
        | rustls::Error::InconsistentKeys(_) => true,
        _ => false,
    }
}

/// Maps a KMS error onto the provider error space (see the module docs).
pub fn map_error(e: KmsError) -> ProviderError {
    match &e {
        KmsError::AllServersFailed { attempts, .. }
            if !attempts.is_empty() && attempts.iter().all(is_tls_rejection) =>
        {
            ProviderError::Denied {
                detail: format!("TLS handshake rejected by every server (check the client certificate, key and CA bundle; namespace.retry_unlock retries once fixed): {e}"),
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

/// Like [`map_error`], but a not-found reply (1.x Item Not Found, 2.x Object Not Found)
/// becomes [`ProviderError::NotFound`] for `id`, and 2.x Object Destroyed an
/// [`ProviderError::InvalidState`] for operation `op`.
fn map_error_for(id: &KekId, op: &'static str, e: KmsError) -> ProviderError {
    match e.result_reason() {
        Some(r) if r.is_not_found() => ProviderError::NotFound { id: id.clone() },
        Some(ResultReason::OBJECT_DESTROYED) => ProviderError::InvalidState {
            id: id.clone(),
            state: KekState::Destroyed,
            op,
        },
        _ => map_error(e),
    }
}

/// nvseal's view of a KMIP key state; None for a value outside the enumeration.
fn kek_state(s: KeyState) -> Option<KekState> {
    match s {
        KeyState::PreActive => Some(KekState::PreActive),
        KeyState::Active => Some(KekState::Active),
        KeyState::Deactivated | KeyState::Compromised => Some(KekState::Revoked),
        KeyState::Destroyed | KeyState::DestroyedCompromised => Some(KekState::Destroyed),
        KeyState::Other(_) => None,
    }
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

    /// Get Attributes (State), then Get only if the key is Active, on one connection.
    fn get_kek(&mut self, id: &KekId) -> Result<Kek, ProviderError> {
        let served = self
            .cluster
            .execute(|c| {
                let kid = kms_id(id);
                match c.get_state(&kid)? {
                    KeyState::Active => c.get_key(&kid).map(Ok),
                    other => Ok(Err(other)),
                }
            })
            .map_err(|e| map_error_for(id, "get", e))?;
        match served.value {
            Ok(kek) => {
                tracing::debug!(cluster = %self.cluster.alias(), server = %served.server,
                    kek_id = %id, "fetched KEK");
                Ok(kek)
            }
            Err(state) => {
                tracing::warn!(cluster = %self.cluster.alias(), server = %served.server,
                    kek_id = %id, %state, "KEK is not Active: refused to fetch it");
                Err(match kek_state(state) {
                    Some(state) => ProviderError::InvalidState {
                        id: id.clone(),
                        state,
                        op: "get",
                    },
                    None => ProviderError::Protocol {
                        detail: format!("{}: KEK {id} has unknown {state}", served.server),
                    },
                })
            }
        }
    }

    fn revoke_kek(&mut self, id: &KekId) -> Result<(), ProviderError> {
        self.cluster
            .revoke(&kms_id(id), RevocationReason::Superseded)
            .map_err(|e| map_error_for(id, "revoke", e))?;
        tracing::info!(cluster = %self.cluster.alias(), kek_id = %id, "revoked KEK (superseded)");
        Ok(())
    }

    fn destroy_kek(&mut self, id: &KekId) -> Result<(), ProviderError> {
        self.cluster
            .destroy(&kms_id(id))
            .map_err(|e| map_error_for(id, "destroy", e))?;
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
    use crate::kms::Phase;
    use std::time::Duration;

    fn server(port: u16) -> String {
        format!("127.0.0.1:{port}")
    }

    fn all(attempts: Vec<KmsError>) -> KmsError {
        KmsError::AllServersFailed {
            alias: "c".into(),
            attempts,
        }
    }

    fn alert(port: u16, a: rustls::AlertDescription) -> KmsError {
        KmsError::Tls {
            server: server(port),
            phase: Phase::Handshake,
            source: rustls::Error::AlertReceived(a),
        }
    }

    #[test]
    fn transport_failures_are_transient_and_tls_rejections_are_not() {
        let refused = KmsError::Refused { server: server(1) };
        let timeout = KmsError::Timeout {
            server: server(2),
            phase: Phase::Response,
            timeout: Duration::from_millis(10),
        };
        assert!(map_error(all(vec![refused])).is_transient());
        let mixed = map_error(all(vec![
            KmsError::Refused { server: server(1) },
            timeout,
            alert(3, rustls::AlertDescription::UnknownCA),
        ]));
        assert!(mixed.is_transient(), "{mixed}");
        // Every server sent a certificate alert: configuration, not availability.
        for a in [
            rustls::AlertDescription::BadCertificate,
            rustls::AlertDescription::UnknownCA,
            rustls::AlertDescription::HandshakeFailure,
            rustls::AlertDescription::CertificateRequired,
        ] {
            let denied = map_error(all(vec![alert(3, a)]));
            assert!(!denied.is_transient(), "{a:?}");
            assert!(
                denied.to_string().contains("client certificate"),
                "{denied}"
            );
        }
        // We rejected the server's certificate.
        let ours = KmsError::Tls {
            server: server(4),
            phase: Phase::Handshake,
            source: rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        };
        assert!(!map_error(all(vec![ours])).is_transient());
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
            map_error_for(&id, "get", answer),
            ProviderError::NotFound { ref id } if id.as_str() == "7"
        ));
    }

    /// Issue 18 item 3: a connection closed (or reset) during the handshake is what a load
    /// balancer with no healthy backend, or a server killed mid-handshake, produces. It is an
    /// availability problem: the namespace keeps retrying instead of going to `error`.
    #[test]
    fn a_connection_closed_in_the_handshake_is_transient() {
        let closed = KmsError::Closed {
            server: server(3),
            phase: Phase::Handshake,
        };
        let e = map_error(all(vec![closed]));
        assert!(e.is_transient(), "{e}");
        let reset = KmsError::Io {
            server: server(3),
            phase: Phase::Handshake,
            source: std::io::Error::from(std::io::ErrorKind::ConnectionReset),
        };
        assert!(map_error(all(vec![reset])).is_transient());
        // Alerts that say nothing about the certificate, and garbage, retry too.
        for source in [
            rustls::Error::AlertReceived(rustls::AlertDescription::InternalError),
            rustls::Error::AlertReceived(rustls::AlertDescription::CloseNotify),
            rustls::Error::DecryptError,
        ] {
            let e = map_error(all(vec![KmsError::Tls {
                server: server(5),
                phase: Phase::Handshake,
                source,
            }]));
            assert!(e.is_transient(), "{e}");
        }
    }

    /// Issue 18 item 4: KMIP 2.x reasons. Object Not Found (0x37) is "not found" like 1.x Item
    /// Not Found; Object Destroyed (0x36) is a state; Wrong Key Lifecycle State (0x43) is a
    /// refusal that names itself.
    #[test]
    fn kmip_2_reasons_are_mapped() {
        let reply = |code| KmsError::Server {
            server: server(6),
            operation: "Get",
            result_status: kms::ResultStatus::OperationFailed,
            reason: Some(ResultReason(code)),
            message: String::new(),
        };
        let id = KekId::new("k").expect("id");
        assert!(matches!(
            map_error_for(&id, "get", reply(0x37)),
            ProviderError::NotFound { .. }
        ));
        assert!(matches!(
            map_error_for(&id, "get", reply(0x36)),
            ProviderError::InvalidState {
                state: KekState::Destroyed,
                op: "get",
                ..
            }
        ));
        let wrong = map_error_for(&id, "get", reply(0x43));
        assert!(matches!(wrong, ProviderError::Denied { .. }), "{wrong}");
        assert!(
            wrong.to_string().contains("Wrong Key Lifecycle State"),
            "{wrong}"
        );
        assert!(!wrong.is_transient());
    }

    #[test]
    fn kmip_states_map_onto_kek_states() {
        assert_eq!(kek_state(KeyState::Active), Some(KekState::Active));
        assert_eq!(kek_state(KeyState::PreActive), Some(KekState::PreActive));
        assert_eq!(kek_state(KeyState::Deactivated), Some(KekState::Revoked));
        assert_eq!(kek_state(KeyState::Compromised), Some(KekState::Revoked));
        assert_eq!(kek_state(KeyState::Destroyed), Some(KekState::Destroyed));
        assert_eq!(kek_state(KeyState::Other(9)), None);
    }
}
