//! Error types of the KMS client.
//!
//! Owns the classification of every way a KMS exchange can fail. The cluster logic uses it to
//! decide whether to fail over: transport failures (refused, timeout, TLS, closed, I/O, protocol
//! garbage) move on to the next server; an answer from a KMS ([`KmsError::Server`]) does not,
//! because a replicated cluster would answer the same and a retried Create would leave orphans.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use super::key::{KekFingerprint, KeyId};
use super::message::{ProtocolError, ResultReason, ResultStatus};

/// Where in an exchange a failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Phase {
    /// TCP connect.
    Connect,
    /// TLS handshake.
    Handshake,
    /// Sending a request.
    Request,
    /// Waiting for or reading a response.
    Response,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connect => "connecting",
            Self::Handshake => "in the TLS handshake",
            Self::Request => "sending the request",
            Self::Response => "waiting for the response",
        })
    }
}

/// One failed KMS exchange. `server` is always the `host:port` that was tried.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// Nothing listens there (TCP RST). The cluster tries the next server at once.
    #[error("{server}: connection refused")]
    Refused { server: String },
    /// No progress within the connect timeout (connect) or the response timeout (others).
    #[error("{server}: no answer {phase} within {} ms", timeout.as_millis())]
    Timeout {
        server: String,
        phase: Phase,
        timeout: Duration,
    },
    /// The TLS layer failed: certificate rejected by either side, no shared cipher, alert.
    #[error("{server}: TLS failure {phase}: {source}")]
    Tls {
        server: String,
        phase: Phase,
        source: rustls::Error,
    },
    /// The peer closed the connection. During the handshake this usually means the server
    /// rejected our client certificate.
    #[error("{server}: connection closed by the server {phase}")]
    Closed { server: String, phase: Phase },
    /// The host name did not resolve.
    #[error("{server}: cannot resolve address: {source}")]
    Resolve { server: String, source: io::Error },
    /// Any other socket error.
    #[error("{server}: I/O error {phase}: {source}")]
    Io {
        server: String,
        phase: Phase,
        source: io::Error,
    },
    /// The server sent something that is not a valid reply.
    #[error("{server}: bad KMIP reply to {operation}: {source}")]
    Protocol {
        server: String,
        operation: &'static str,
        source: ProtocolError,
    },
    /// The server answered with a failure status.
    #[error(
        "{server}: KMIP {operation} failed: {result_status}{}{}",
        reason.map(|r| format!(" ({r})")).unwrap_or_default(),
        if message.is_empty() { String::new() } else { format!(": {message}") }
    )]
    Server {
        server: String,
        operation: &'static str,
        result_status: ResultStatus,
        reason: Option<ResultReason>,
        message: String,
    },
    /// A fetched KEK does not match the fingerprint stored with its id: the server holds a
    /// different key under that id (another KMS, or a KMS rebuilt from scratch).
    #[error("{server}: key {key_id} does not match stored fingerprint {expected} (server's key: {actual})")]
    FingerprintMismatch {
        server: String,
        key_id: KeyId,
        expected: KekFingerprint,
        actual: KekFingerprint,
    },
    /// Every server of the cluster failed at transport level; one entry per attempt.
    #[error("KMS cluster {alias}: all servers failed: {}", summarize(attempts))]
    AllServersFailed {
        alias: String,
        attempts: Vec<KmsError>,
    },
}

fn summarize(attempts: &[KmsError]) -> String {
    attempts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl KmsError {
    /// True when the next server of a cluster should be tried.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            Self::Refused { .. }
                | Self::Timeout { .. }
                | Self::Tls { .. }
                | Self::Closed { .. }
                | Self::Resolve { .. }
                | Self::Io { .. }
                | Self::Protocol { .. }
        )
    }

    /// The server this error is about, if it is about one.
    pub fn server(&self) -> Option<&str> {
        match self {
            Self::Refused { server }
            | Self::Timeout { server, .. }
            | Self::Tls { server, .. }
            | Self::Closed { server, .. }
            | Self::Resolve { server, .. }
            | Self::Io { server, .. }
            | Self::Protocol { server, .. }
            | Self::Server { server, .. }
            | Self::FingerprintMismatch { server, .. } => Some(server),
            Self::AllServersFailed { .. } => None,
        }
    }

    /// A short machine-readable kind, for status reports and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Refused { .. } => "refused",
            Self::Timeout { .. } => "timeout",
            Self::Tls { .. } => "tls",
            Self::Closed { .. } => "closed",
            Self::Resolve { .. } => "resolve",
            Self::Io { .. } => "io",
            Self::Protocol { .. } => "protocol",
            Self::Server { .. } => "server",
            Self::FingerprintMismatch { .. } => "fingerprint_mismatch",
            Self::AllServersFailed { .. } => "all_servers_failed",
        }
    }

    /// The KMIP result reason, if the server answered with one.
    pub fn result_reason(&self) -> Option<ResultReason> {
        match self {
            Self::Server { reason, .. } => *reason,
            _ => None,
        }
    }
}

/// Problems with KMS configuration or TLS material, found before any connection is made.
#[derive(Debug, thiserror::Error)]
pub enum KmsConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{what}: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("invalid KMS configuration: {0}")]
    Invalid(String),
    #[error("invalid server address {addr:?}: {reason}")]
    Address { addr: String, reason: &'static str },
}
