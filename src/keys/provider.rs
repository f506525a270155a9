//! The key-provider interface: where KEKs come from ([`KeyProvider`]), KEK ids, provider errors.
//!
//! Both providers implement it: the local key file ([`super::local`], development and perf labs)
//! and the KMIP client (`src/kms/`). Every call blocks (file I/O, or a TLS round trip to a KMS
//! with failover and timeouts) and therefore runs on a control thread, never on a reactor.
//! It exists so that format, open and rekey (in [`super`]) are written once against one
//! interface, whatever holds the KEK.

use std::fmt;

use serde::Serialize;
use thiserror::Error;

use super::wrap::Kek;

/// Longest KEK id accepted (bytes). KMIP unique identifiers are short strings (PyKMIP uses
/// decimal integers, most servers UUIDs); 256 bounds the header field.
pub const KEK_ID_MAX_BYTES: usize = 256;
/// Longest KMS cluster alias accepted (bytes); bounds the header field.
pub const KMS_ALIAS_MAX_BYTES: usize = 64;

/// Which kind of provider holds a KEK. Stored in the header (byte values are on-disk format).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// The local key file ([`super::local::LocalKeyProvider`]). Not for production.
    Local,
    /// A KMIP key server cluster.
    Kmip,
}

impl ProviderKind {
    /// The on-disk byte.
    pub const fn to_byte(self) -> u8 {
        match self {
            Self::Local => 1,
            Self::Kmip => 2,
        }
    }

    /// Parses the on-disk byte.
    pub const fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Local),
            2 => Some(Self::Kmip),
            _ => None,
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Local => "local",
            Self::Kmip => "kmip",
        })
    }
}

/// Why a KEK id or KMS alias string was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("invalid {what}: must be 1..={max} bytes of printable ASCII without spaces")]
pub struct InvalidName {
    /// Which kind of name (`"KEK id"`, `"KMS cluster alias"`).
    pub what: &'static str,
    /// Its length limit.
    pub max: usize,
}

/// Checks the shared rule for ids and aliases: 1..=max bytes, printable ASCII, no spaces.
fn check_name(s: &str, what: &'static str, max: usize) -> Result<(), InvalidName> {
    let ok = !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(InvalidName { what, max })
    }
}

/// The identifier of a KEK at its provider (a KMIP Unique Identifier, or a local key id).
/// 1..=256 bytes of printable ASCII without spaces.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct KekId(String);

impl KekId {
    /// Validates and wraps an id.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidName> {
        let id = id.into();
        check_name(&id, "KEK id", KEK_ID_MAX_BYTES)?;
        Ok(Self(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KekId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Validates a KMS cluster alias (1..=64 bytes, printable ASCII, no spaces).
pub fn check_kms_alias(alias: &str) -> Result<(), InvalidName> {
    check_name(alias, "KMS cluster alias", KMS_ALIAS_MAX_BYTES)
}

/// The state of a KEK at its provider, as far as nvseal cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KekState {
    /// Created but not activated yet (KMIP Pre-Active): not usable.
    PreActive,
    /// Usable for wrap and unwrap.
    Active,
    /// Revoked (KMIP: deactivated): kept, but a provider refuses to hand it out for new use.
    Revoked,
    /// Key material destroyed; only the id remains.
    Destroyed,
}

impl fmt::Display for KekState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PreActive => "pre-active",
            Self::Active => "active",
            Self::Revoked => "revoked",
            Self::Destroyed => "destroyed",
        })
    }
}

/// Errors every provider maps its failures onto.
#[derive(Debug, Error)]
pub enum ProviderError {
    /// The provider has no KEK with this id.
    #[error("KEK {id} not found")]
    NotFound {
        /// The id asked for.
        id: KekId,
    },
    /// The KEK exists but its state forbids the operation (e.g. get of a revoked key, destroy of
    /// an active one).
    #[error("KEK {id} is {state}: {op} refused")]
    InvalidState {
        /// The KEK.
        id: KekId,
        /// Its state.
        state: KekState,
        /// The refused operation.
        op: &'static str,
    },
    /// The provider could not be reached or did not answer in time; retrying later may work.
    #[error("key provider unavailable: {detail}")]
    Unavailable {
        /// What failed (server, timeout, ...).
        detail: String,
    },
    /// The provider refused the request (authentication, authorisation).
    #[error("key provider denied the request: {detail}")]
    Denied {
        /// The provider's reason.
        detail: String,
    },
    /// The provider answered something nvseal cannot use (malformed reply, wrong key size, ...).
    #[error("key provider protocol error: {detail}")]
    Protocol {
        /// What was wrong.
        detail: String,
    },
    /// A local file operation failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The local key file is malformed.
    #[error("key file {path} line {line}: {reason}")]
    BadKeyFile {
        /// The file.
        path: String,
        /// 1-based line number (0 for whole-file problems).
        line: usize,
        /// What is wrong (never contains key material).
        reason: String,
    },
    /// A name given to the provider was refused.
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    /// The OS random number generator failed while creating a key.
    #[error("creating a KEK failed: {0}")]
    Key(#[from] super::wrap::KeyError),
}

impl ProviderError {
    /// True when retrying the same request later may succeed (boot retries with backoff on
    /// these and gives up on the others).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// What a provider says about itself (RPC, logs, support bundles). Holds no secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProviderInfo {
    /// Local or KMIP.
    pub kind: ProviderKind,
    /// The KMS cluster alias stored in headers for KEKs of this provider.
    pub cluster_alias: String,
    /// Free text: key file path and key count, or server list.
    pub detail: String,
    /// False for the local key file.
    pub production_ready: bool,
}

/// A source of KEKs. Blocking; call from control threads only.
///
/// A provider is identified in headers by its [`ProviderKind`] and [`cluster_alias`]
/// (`open` refuses to ask a provider about a KEK that a header says lives elsewhere).
///
/// [`cluster_alias`]: KeyProvider::cluster_alias
pub trait KeyProvider {
    /// Local or KMIP.
    fn kind(&self) -> ProviderKind;
    /// The alias of the KMS cluster (or local key file) this provider talks to.
    fn cluster_alias(&self) -> &str;
    /// Creates a new active AES-256 KEK named `name` and returns its id and the key.
    fn create_kek(&mut self, name: &str) -> Result<(KekId, Kek), ProviderError>;
    /// Fetches an active KEK. A KEK in any other state (revoked, destroyed, pre-active) is
    /// refused with [`ProviderError::InvalidState`] by every provider, whatever the server
    /// behind it would allow: strict KMIP servers refuse Get of a Deactivated key, PyKMIP
    /// serves it, and nvseal must behave the same on both.
    fn get_kek(&mut self, id: &KekId) -> Result<Kek, ProviderError>;
    /// Revokes a KEK: it stays known but is no longer handed out.
    fn revoke_kek(&mut self, id: &KekId) -> Result<(), ProviderError>;
    /// Destroys a revoked KEK's key material.
    fn destroy_kek(&mut self, id: &KekId) -> Result<(), ProviderError>;
    /// Describes the provider (no secrets).
    fn describe(&self) -> ProviderInfo;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kek_id_bounds() {
        assert!(KekId::new("1").is_ok());
        assert!(KekId::new("a".repeat(KEK_ID_MAX_BYTES)).is_ok());
        assert!(KekId::new("a".repeat(KEK_ID_MAX_BYTES + 1)).is_err());
        assert!(KekId::new("").is_err());
        assert!(KekId::new("has space").is_err());
        assert!(KekId::new("nul\0").is_err());
        assert!(KekId::new("é").is_err());
    }

    #[test]
    fn provider_kind_bytes_round_trip() {
        for k in [ProviderKind::Local, ProviderKind::Kmip] {
            assert_eq!(ProviderKind::from_byte(k.to_byte()), Some(k));
        }
        assert_eq!(ProviderKind::from_byte(0), None);
        assert_eq!(ProviderKind::from_byte(3), None);
    }
}
