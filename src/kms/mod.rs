//! Key management service (KMS) client: KMIP 1.x over TLS, with vSAN-style cluster failover.
//!
//! Owns everything nvseal says to KMIP key servers: creating, activating, fetching, locating,
//! revoking and destroying key-encryption keys (KEKs), and checking a fetched KEK against the
//! fingerprint stored with its id. Everything here is **blocking** and runs on control threads
//! (start-up, rekey driver, RPC handlers) — never on a reactor, whose loop must not sleep in a
//! syscall. Reactors receive unwrapped keys by message, not by calling into this module.
//!
//! Layers, bottom up:
//! * [`ttlv`] — panic-free TTLV decoder (fuzzing entry point: [`ttlv::decode`]).
//! * [`message`] — requests (built with the `kmip-protocol` crate) and response decoding
//!   ([`message::parse_response`] is the second fuzzing entry point).
//! * [`tls`] — rustls client configuration from CA bundle, client certificate and key.
//! * [`client`] — one connection to one server with connect/response timeouts.
//! * [`cluster`] — ordered servers, failover, per-server status, configuration.
//! * [`key`] — the zeroizing [`Kek`] and its [`KekFingerprint`] (the only definitions in the
//!   crate; `keys` re-exports them), and [`KeyId`].
//!
//! See `docs/kms.md` for semantics and for running PyKMIP during development.

pub mod client;
pub mod cluster;
pub mod error;
pub mod key;
pub mod message;
pub mod tls;
pub mod ttlv;

pub use client::{
    KmipClient, ServerAddr, Timeouts, DEFAULT_CONNECT_TIMEOUT, DEFAULT_RESPONSE_TIMEOUT,
};
pub use cluster::{
    check_fingerprint, CreatedKek, KmsCluster, KmsClusterConfig, Served, ServerStatus,
};
pub use error::{KmsConfigError, KmsError, Phase};
pub use key::{Kek, KekFingerprint, KeyId, KEK_BYTES};
pub use message::{
    KeyState, ProtocolVersion, ResultReason, ResultStatus, RevocationReason, ServerInfo,
};
pub use tls::TlsMaterial;
