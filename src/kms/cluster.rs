//! A KMS cluster: an ordered list of KMIP servers with vCenter-style failover.
//!
//! Owns the cluster's configuration, one cached connection, and per-server health for RPC.
//! All methods block (up to connect + response timeout per server) and must run on control
//! threads, never on a reactor. It exists because nvseal, like vSAN, names its KEK by
//! (cluster alias, key id) and must keep working while some servers are down.
//!
//! Failover rules, applied per operation:
//! * Servers are tried in configured order, starting from the first, except that a healthy
//!   cached connection to the server that served last is reused first.
//! * Connection refused (nothing listening): next server at once.
//! * Connected but no answer — TCP connect, TLS handshake or response not done within its
//!   timeout: next server. The response timeout defaults to 60 s like vCenter's.
//! * TLS failures, closed connections and malformed replies: next server.
//! * A KMIP failure reply (e.g. Item Not Found, Permission Denied): returned at once, no
//!   failover — the server answered, replicas would answer the same, and retrying a Create
//!   elsewhere would mint a second key.
//! * A request that timed out may still have been executed by the silent server; for Create
//!   that can leave an orphan key there (named, so an operator can find it with Locate).
//!
//! Every failover is logged (tracing, WARN) with the server that failed, why, and the server
//! that finally served; [`KmsCluster::status`] reports per-server health.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::client::{
    KmipClient, ServerAddr, Timeouts, DEFAULT_CONNECT_TIMEOUT, DEFAULT_RESPONSE_TIMEOUT,
};
use super::error::{KmsConfigError, KmsError};
use super::key::{Kek, KekFingerprint, KeyId};
use super::message::{KeyState, ProtocolVersion, RevocationReason, ServerInfo};
use super::tls::TlsMaterial;

/// Configuration of one KMS cluster (YAML/JSON).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KmsClusterConfig {
    /// Name nvseal stores next to every KEK id; must stay stable for the cluster's life.
    pub alias: String,
    /// Servers in failover order, each `host:port` or `[v6]:port`.
    pub servers: Vec<ServerAddr>,
    /// PEM bundle of CA certificates trusted to sign the servers' certificates.
    pub ca_file: PathBuf,
    /// PEM client certificate (its CN is the key owner on PyKMIP-like servers).
    pub client_cert_file: PathBuf,
    /// PEM private key of the client certificate.
    pub client_key_file: PathBuf,
    /// TCP connect timeout per server address.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// TLS handshake and per-request answer timeout.
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
}

fn default_connect_timeout_ms() -> u64 {
    DEFAULT_CONNECT_TIMEOUT.as_millis() as u64
}

fn default_response_timeout_ms() -> u64 {
    DEFAULT_RESPONSE_TIMEOUT.as_millis() as u64
}

/// Upper bound for either timeout: a day-long timeout is a configuration mistake.
const MAX_TIMEOUT_MS: u64 = 3_600_000;

impl KmsClusterConfig {
    /// Checks values that serde cannot: non-empty alias and server list, no duplicate
    /// servers, timeouts in 1 ms ..= 1 h.
    pub fn validate(&self) -> Result<(), KmsConfigError> {
        let invalid = |m: String| Err(KmsConfigError::Invalid(m));
        if self.alias.trim().is_empty() {
            return invalid("alias must not be empty".into());
        }
        if self.servers.is_empty() {
            return invalid(format!(
                "cluster {}: servers must list at least one host:port",
                self.alias
            ));
        }
        for (i, s) in self.servers.iter().enumerate() {
            if self.servers[..i].contains(s) {
                return invalid(format!("cluster {}: server {s} listed twice", self.alias));
            }
        }
        for (name, ms) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("response_timeout_ms", self.response_timeout_ms),
        ] {
            if ms == 0 || ms > MAX_TIMEOUT_MS {
                return invalid(format!(
                    "cluster {}: {name} must be 1..={MAX_TIMEOUT_MS}",
                    self.alias
                ));
            }
        }
        Ok(())
    }

    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            connect: Duration::from_millis(self.connect_timeout_ms),
            response: Duration::from_millis(self.response_timeout_ms),
        }
    }
}

/// Health of one server as last observed, for RPC and logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerStatus {
    pub server: ServerAddr,
    /// `None` until the server was tried once; then whether the last attempt got an answer
    /// (a KMIP failure reply counts as reachable).
    pub reachable: Option<bool>,
    /// Round trip of the last answered operation, including connect when one was needed.
    pub last_latency_us: Option<u64>,
    /// Kind of the last failure (`refused`, `timeout`, `tls`, ... see [`KmsError::kind`]).
    pub last_error_kind: Option<&'static str>,
    /// Text of the last failure.
    pub last_error: Option<String>,
    /// When the server was last tried, milliseconds since the Unix epoch.
    pub last_attempt_unix_ms: Option<u64>,
    /// When the server last answered, milliseconds since the Unix epoch.
    pub last_success_unix_ms: Option<u64>,
}

impl ServerStatus {
    fn new(server: ServerAddr) -> Self {
        Self {
            server,
            reachable: None,
            last_latency_us: None,
            last_error_kind: None,
            last_error: None,
            last_attempt_unix_ms: None,
            last_success_unix_ms: None,
        }
    }
}

/// The result of a cluster operation and the server that produced it.
pub struct Served<T> {
    pub value: T,
    pub server: ServerAddr,
}

/// A KEK just created on the cluster: its id, fingerprint and the server that created it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedKek {
    pub id: KeyId,
    pub fingerprint: KekFingerprint,
    pub server: ServerAddr,
}

/// An ordered set of KMIP servers sharing one key space (replicas), with failover.
/// `Sync`: control threads may share it; operations are serialized internally (one
/// connection), while [`KmsCluster::status`] never waits for an operation in flight.
pub struct KmsCluster {
    alias: String,
    servers: Vec<ServerAddr>,
    tls: TlsMaterial,
    timeouts: Timeouts,
    /// The connection that served last, with its server's index.
    conn: Mutex<Option<(usize, KmipClient)>>,
    status: Mutex<Vec<ServerStatus>>,
}

impl KmsCluster {
    pub fn new(
        alias: impl Into<String>,
        servers: Vec<ServerAddr>,
        tls: TlsMaterial,
        timeouts: Timeouts,
    ) -> Result<Self, KmsConfigError> {
        let alias = alias.into();
        if servers.is_empty() {
            return Err(KmsConfigError::Invalid(format!(
                "cluster {alias}: no servers"
            )));
        }
        let status = servers.iter().cloned().map(ServerStatus::new).collect();
        Ok(Self {
            alias,
            servers,
            tls,
            timeouts,
            conn: Mutex::new(None),
            status: Mutex::new(status),
        })
    }

    /// Validates `config` and loads its TLS files.
    pub fn from_config(config: &KmsClusterConfig) -> Result<Self, KmsConfigError> {
        config.validate()?;
        let tls = TlsMaterial::from_files(
            &config.ca_file,
            &config.client_cert_file,
            &config.client_key_file,
        )?;
        Self::new(
            config.alias.clone(),
            config.servers.clone(),
            tls,
            config.timeouts(),
        )
    }

    pub fn alias(&self) -> &str {
        &self.alias
    }

    pub fn servers(&self) -> &[ServerAddr] {
        &self.servers
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// A snapshot of every server's health, in configured order.
    pub fn status(&self) -> Vec<ServerStatus> {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs `op` on one server, failing over as described in the module docs. `op` may issue
    /// several requests on the connection it is given; it is re-run from the start on the next
    /// server if it fails at transport level.
    pub fn execute<T>(
        &self,
        mut op: impl FnMut(&mut KmipClient) -> Result<T, KmsError>,
    ) -> Result<Served<T>, KmsError> {
        let mut conn_slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut failures: Vec<KmsError> = Vec::new();
        let mut skip = None;

        // A cached connection first: it saves a TLS handshake per operation.
        if let Some((index, mut client)) = conn_slot.take() {
            let started = Instant::now();
            match op(&mut client) {
                Ok(value) => {
                    self.record_answer(index, started, None);
                    let server = client.server().clone();
                    *conn_slot = Some((index, client));
                    return Ok(Served { value, server });
                }
                Err(e) if !e.is_transport() => {
                    self.record_answer(index, started, Some(&e));
                    *conn_slot = Some((index, client));
                    return Err(e);
                }
                // Closed: the server (or a middlebox) dropped an idle session; a fresh
                // connection to the same server in the loop below is the normal remedy.
                Err(KmsError::Closed { .. }) => {
                    tracing::debug!(cluster = %self.alias, server = %self.servers[index],
                        "cached KMS connection was closed; reconnecting");
                }
                Err(e) => {
                    self.record_failure(index, &e);
                    tracing::warn!(cluster = %self.alias, server = %self.servers[index], error = %e,
                        "KMS server failed; trying the next one");
                    failures.push(e);
                    skip = Some(index);
                }
            }
        }

        for (index, server) in self.servers.iter().enumerate() {
            if skip == Some(index) {
                continue;
            }
            let started = Instant::now();
            let result = KmipClient::connect(server, &self.tls, self.timeouts).and_then(
                |mut client| match op(&mut client) {
                    Ok(value) => Ok((Ok(value), client)),
                    Err(e) if !e.is_transport() => Ok((Err(e), client)),
                    Err(e) => Err(e),
                },
            );
            match result {
                Ok((Ok(value), client)) => {
                    self.record_answer(index, started, None);
                    if !failures.is_empty() {
                        tracing::warn!(cluster = %self.alias, served_by = %server,
                            failed = failures.len(), "KMS failover: operation served by a later server");
                    }
                    *conn_slot = Some((index, client));
                    return Ok(Served {
                        value,
                        server: server.clone(),
                    });
                }
                Ok((Err(e), client)) => {
                    // The server answered with a failure: no failover (see module docs).
                    self.record_answer(index, started, Some(&e));
                    *conn_slot = Some((index, client));
                    return Err(e);
                }
                Err(e) => {
                    self.record_failure(index, &e);
                    tracing::warn!(cluster = %self.alias, server = %server, error = %e,
                        "KMS server failed; trying the next one");
                    failures.push(e);
                }
            }
        }
        tracing::error!(cluster = %self.alias, "every KMS server of the cluster failed");
        Err(KmsError::AllServersFailed {
            alias: self.alias.clone(),
            attempts: failures,
        })
    }

    fn record_answer(&self, index: usize, started: Instant, error: Option<&KmsError>) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = status.get_mut(index) {
            let now = unix_ms();
            s.reachable = Some(true);
            s.last_latency_us =
                Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
            s.last_attempt_unix_ms = Some(now);
            s.last_success_unix_ms = Some(now);
            s.last_error_kind = error.map(KmsError::kind);
            s.last_error = error.map(ToString::to_string);
        }
    }

    fn record_failure(&self, index: usize, error: &KmsError) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = status.get_mut(index) {
            s.reachable = Some(false);
            s.last_attempt_unix_ms = Some(unix_ms());
            s.last_error_kind = Some(error.kind());
            s.last_error = Some(error.to_string());
        }
    }

    /// Creates and activates a KEK named `name` and returns its id and fingerprint (the key
    /// is fetched once on the same connection to compute it, then dropped).
    pub fn create_kek(&self, name: &str) -> Result<CreatedKek, KmsError> {
        let served = self.execute(|c| {
            let id = c.create_kek(name)?;
            let fingerprint = c.get_key(&id)?.fingerprint();
            Ok((id, fingerprint))
        })?;
        let (id, fingerprint) = served.value;
        tracing::info!(cluster = %self.alias, server = %served.server, key_id = %id, %fingerprint, "created KEK");
        Ok(CreatedKek {
            id,
            fingerprint,
            server: served.server,
        })
    }

    /// Fetches a KEK without checking it. Prefer [`KmsCluster::get_kek_checked`].
    pub fn get_kek(&self, id: &KeyId) -> Result<Kek, KmsError> {
        self.execute(|c| c.get_key(id)).map(|s| s.value)
    }

    /// Fetches a KEK and checks it against the fingerprint stored with its id. A mismatch
    /// means the server holds a different key under this id, and is not failed over.
    pub fn get_kek_checked(&self, id: &KeyId, expected: &KekFingerprint) -> Result<Kek, KmsError> {
        let served = self.execute(|c| c.get_key(id))?;
        check_fingerprint(served.value, id, expected, &served.server)
    }

    pub fn locate_by_name(&self, name: &str) -> Result<Vec<KeyId>, KmsError> {
        self.execute(|c| c.locate_by_name(name)).map(|s| s.value)
    }

    /// Ids of the Active keys named `name` (see [`KmipClient::locate_active_by_name`]).
    pub fn locate_active_by_name(&self, name: &str) -> Result<Vec<KeyId>, KmsError> {
        self.execute(|c| c.locate_active_by_name(name))
            .map(|s| s.value)
    }

    /// A key's lifecycle state.
    pub fn get_state(&self, id: &KeyId) -> Result<KeyState, KmsError> {
        self.execute(|c| c.get_state(id)).map(|s| s.value)
    }

    pub fn activate(&self, id: &KeyId) -> Result<(), KmsError> {
        self.execute(|c| c.activate(id)).map(|s| s.value)
    }

    pub fn revoke(&self, id: &KeyId, reason: RevocationReason) -> Result<(), KmsError> {
        self.execute(|c| c.revoke(id, reason)).map(|s| s.value)
    }

    pub fn destroy(&self, id: &KeyId) -> Result<(), KmsError> {
        self.execute(|c| c.destroy(id)).map(|s| s.value)
    }

    pub fn query(&self) -> Result<Served<ServerInfo>, KmsError> {
        self.execute(|c| c.query())
    }

    pub fn discover_versions(&self) -> Result<Served<Vec<ProtocolVersion>>, KmsError> {
        self.execute(|c| c.discover_versions())
    }
}

/// Returns `kek` if it matches `expected`, else a [`KmsError::FingerprintMismatch`] naming
/// `server` (the key is zeroized on that path).
pub fn check_fingerprint(
    kek: Kek,
    id: &KeyId,
    expected: &KekFingerprint,
    server: &ServerAddr,
) -> Result<Kek, KmsError> {
    if kek.matches(expected) {
        return Ok(kek);
    }
    Err(KmsError::FingerprintMismatch {
        server: server.to_string(),
        key_id: id.clone(),
        expected: *expected,
        actual: kek.fingerprint(),
    })
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Result<KmsClusterConfig, serde_yaml_ng::Error> {
        serde_yaml_ng::from_str(yaml)
    }

    #[test]
    fn config_parses_with_defaults_and_rejects_unknown_fields() {
        let c = config(
            "alias: lab\nservers: [\"127.0.0.1:5696\", \"kms2.example:5696\"]\n\
             ca_file: /etc/nvseal/ca.pem\nclient_cert_file: c.pem\nclient_key_file: c.key\n",
        )
        .unwrap();
        assert_eq!(c.servers.len(), 2);
        assert_eq!(c.servers[1].host(), "kms2.example");
        assert_eq!(c.timeouts(), Timeouts::default());
        assert_eq!(c.response_timeout_ms, 60_000);
        c.validate().unwrap();

        let unknown = config(
            "alias: lab\nservers: [\"a:1\"]\nca_file: a\nclient_cert_file: b\nclient_key_file: c\nretries: 3\n",
        );
        assert!(unknown.unwrap_err().to_string().contains("retries"));
        let bad_addr = config(
            "alias: lab\nservers: [\"a\"]\nca_file: a\nclient_cert_file: b\nclient_key_file: c\n",
        );
        assert!(bad_addr.is_err());
    }

    /// Regression (issue 13 item 6): the KMS client once computed KEK fingerprints with another
    /// label than the one headers are written with, so this check refused every header's
    /// fingerprint. The stored value here is the documented check value of the KEK 32 × `0x01`
    /// (docs/on-disk-format.md), i.e. what a header formatted under that KEK holds.
    #[test]
    fn header_fingerprints_pass_the_kms_check() {
        let stored: KekFingerprint =
            "hmac-sha256:fa25d833ed572c7b80436ac0e5b7cff9f69469e7219678b692074344990ba5f7"
                .parse()
                .unwrap();
        let server: ServerAddr = "127.0.0.1:5696".parse().unwrap();
        let id = KeyId::new("1");
        let kek = Kek::from_slice(&[0x01; 32]).unwrap();
        assert!(check_fingerprint(kek, &id, &stored, &server).is_ok());
        let other = Kek::from_slice(&[0x02; 32]).unwrap();
        match check_fingerprint(other, &id, &stored, &server) {
            Err(KmsError::FingerprintMismatch {
                expected, actual, ..
            }) => {
                assert_eq!(expected, stored);
                assert_ne!(actual, stored);
            }
            Err(e) => panic!("expected a fingerprint mismatch, got {e}"),
            Ok(_) => panic!("another key passed the fingerprint check"),
        }
    }

    #[test]
    fn config_validation_catches_what_serde_cannot() {
        let base = config(
            "alias: lab\nservers: [\"a:1\"]\nca_file: a\nclient_cert_file: b\nclient_key_file: c\n\
             response_timeout_ms: 2000\n",
        )
        .unwrap();
        base.validate().unwrap();
        assert_eq!(base.timeouts().response, Duration::from_secs(2));
        let mut c = base.clone();
        c.servers.clear();
        assert!(c.validate().is_err());
        let mut c = base.clone();
        c.servers.push(c.servers[0].clone());
        assert!(c.validate().is_err());
        let mut c = base.clone();
        c.response_timeout_ms = 0;
        assert!(c.validate().is_err());
        let mut c = base.clone();
        c.alias = " ".into();
        assert!(c.validate().is_err());
    }
}
