//! The key manager's public state, report and error types (serde for RPC; none holds a
//! secret): what [`super::KeyManager`] reports and refuses with. Split out of `mod.rs` so that
//! the manager's API and internals read apart from its vocabulary.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::deep::DeepRekeyStatus;
use crate::keys::provider::{KekId, ProviderError};
use crate::kms::ServerStatus;

// ---------------------------------------------------------------------------------------------
// Public state and report types (serde, for RPC)
// ---------------------------------------------------------------------------------------------

/// Key state of an encrypted namespace. Only `Online` namespaces are exposed to hosts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum NamespaceKeyState {
    /// Waiting: registered, or waiting for the next unlock attempt after a transient failure.
    Locked,
    /// An unlock attempt (format if asked, KEK fetch, unwrap) is running.
    Unlocking {
        /// 1-based attempt number.
        attempt: u32,
    },
    /// The DEK is unwrapped and the crypto bdev was handed to `on_online`.
    Online,
    /// A permanent failure; no retries, nothing was written.
    Error {
        /// What went wrong, precisely.
        reason: String,
    },
}

/// What a managed namespace's data area holds, from its header (docs/lifecycle.md §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataState {
    /// Plaintext: a retired header, or no header where the config allows plaintext.
    Plaintext,
    /// An encrypt or decrypt pass runs (or is paused): split at its watermark.
    Converting,
    /// Every data unit under the DEK (a deep rekey may run: two DEKs, still all ciphertext).
    Encrypted,
}

/// How a managed namespace's header is found and what its config allows (the `encrypted`
/// bdev's `create`, `plaintext` and `header_file`).
#[derive(Clone, Debug, Default)]
pub struct NamespaceOptions {
    /// Format a blank header with a fresh DEK (never over anything non-blank).
    pub create: bool,
    /// With no header (blank reserved region, or no detached header file), serve the data area
    /// as plaintext until `namespace.encrypt`.
    pub plaintext: bool,
    /// The detached header file (LUKS2's `--header`): the header lives there and the data area
    /// is the whole backing device from offset 0.
    pub header_file: Option<PathBuf>,
}

/// One namespace as reported by [`KeyManager::states`]. Holds no secret.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NamespaceStatus {
    /// The namespace id given to [`KeyManager::add_encrypted`].
    pub ns_id: String,
    /// Its key state.
    pub state: NamespaceKeyState,
    /// The configured provider.
    pub provider: String,
    /// Provider holding the active KEK, per the header (after a change of KMS cluster it
    /// differs from `provider`).
    pub kek_provider: Option<String>,
    /// Active KEK id, per the header.
    pub kek_id: Option<KekId>,
    /// KEK of an interrupted shallow rekey, per the header.
    pub pending_kek_id: Option<KekId>,
    /// Namespace UUID from the header (hyphenated).
    pub namespace_uuid: Option<String>,
    /// Header generation last seen.
    pub header_generation: Option<u64>,
    /// A header copy that was found bad (the other one is used; the next update rewrites it).
    pub header_warning: Option<String>,
    /// The last transient failure while locked.
    pub last_error: Option<String>,
    /// When locked after a transient failure: milliseconds until the next attempt.
    pub retry_in_ms: Option<u64>,
    /// Its deep rekey (running, paused, failed or finished since start-up), if any.
    pub deep_rekey: Option<DeepRekeyStatus>,
    /// Plaintext, converting or encrypted, per its header (None until the header was read).
    pub data_state: Option<DataState>,
    /// Its encrypt or decrypt pass (running, paused, failed or finished since start-up).
    pub conversion: Option<DeepRekeyStatus>,
    /// The detached header file, if the header lives in one.
    pub header_file: Option<String>,
}

/// Which namespaces a shallow rekey covers.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RekeyScope {
    /// Every encrypted namespace.
    All,
    /// These namespace ids.
    Namespaces(Vec<String>),
}

/// What happened to one namespace in a shallow rekey.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum NamespaceRekeyResult {
    /// Re-wrapped under the new KEK; headers updated durably.
    Rekeyed,
    /// Not touched (not online, unknown id).
    Skipped {
        /// Why.
        reason: String,
    },
    /// Failed; the namespace still opens with its old KEK (see the reason).
    Failed {
        /// Why.
        reason: String,
    },
}

/// One namespace's line in a [`RekeyReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NamespaceRekey {
    /// Namespace id.
    pub ns_id: String,
    /// Provider of the KEK before.
    pub old_provider: Option<String>,
    /// KEK before.
    pub old_kek_id: Option<KekId>,
    /// Outcome.
    #[serde(flatten)]
    pub result: NamespaceRekeyResult,
}

/// What happened to a KEK the rekey replaced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum OldKekAction {
    /// Revoked at its provider (asked for, and nothing this target knows of uses it).
    Revoked,
    /// Kept: these namespaces (or the provider's current-KEK slot) still reference it.
    Kept {
        /// The namespaces.
        used_by: Vec<String>,
    },
    /// Kept because revocation was not asked for (the default): nothing this target knows of
    /// uses it, but another target or a disk not exported now may (`keys.revoke_kek`).
    #[serde(rename = "kept")]
    NotRevoked {
        /// What to do about it.
        note: String,
    },
    /// Revoking failed; revoke it by hand.
    RevokeFailed {
        /// Why.
        reason: String,
    },
}

/// One replaced KEK in a [`RekeyReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OldKek {
    /// Its provider.
    pub provider: String,
    /// Its id.
    pub kek_id: KekId,
    /// What was done with it.
    #[serde(flatten)]
    pub action: OldKekAction,
}

/// Result of [`KeyManager::shallow_rekey`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RekeyReport {
    /// Provider of the new KEK.
    pub provider: String,
    /// The new KEK.
    pub new_kek_id: KekId,
    /// One entry per namespace in scope.
    pub namespaces: Vec<NamespaceRekey>,
    /// The KEKs replaced.
    pub old_keks: Vec<OldKek>,
}

/// A KMIP cluster's per-server health, for RPC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    /// Cluster alias.
    pub alias: String,
    /// Servers in failover order.
    pub servers: Vec<ServerStatus>,
}

/// Errors building a [`KeyManager`].
#[derive(Debug, Error)]
pub enum ManagerError {
    /// Invalid settings.
    #[error("keys configuration: {0}")]
    Config(String),
    /// A KMS cluster's configuration or TLS files.
    #[error("KMS cluster {alias}: {source}")]
    Kms {
        /// The cluster.
        alias: String,
        /// Why.
        #[source]
        source: crate::kms::KmsConfigError,
    },
    /// The local key file.
    #[error("local key provider: {0}")]
    Local(#[source] ProviderError),
    /// Key memory cannot be locked and unlocked memory is not allowed.
    #[error("keys: {0}")]
    Memory(#[source] crate::sys::mlock::LockError),
    /// The audit log.
    #[error("audit log {path}: {source}")]
    Audit {
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Errors of [`KeyManager::add_encrypted`] (found before anything is started).
#[derive(Debug, Error)]
pub enum AddError {
    /// No provider of that name is configured.
    #[error("namespace {ns_id}: no key provider named {provider:?} is configured")]
    UnknownProvider {
        /// Namespace.
        ns_id: String,
        /// The name asked for.
        provider: String,
    },
    /// The id is taken.
    #[error("namespace {0} is already registered")]
    Duplicate(String),
    /// The backing device's block size is not an XTS data unit nvseal supports.
    #[error("namespace {ns_id}: block size {block_size} is not 512 or 4096")]
    BlockSize {
        /// Namespace.
        ns_id: String,
        /// The block size.
        block_size: u32,
    },
    /// The unlock thread could not be started.
    #[error("namespace {ns_id}: starting the unlock thread: {source}")]
    Spawn {
        /// Namespace.
        ns_id: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What [`KeyManager::format_device`] did. Holds no secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FormatReport {
    /// The namespace (encrypted bdev) name.
    pub ns_id: String,
    /// The new namespace UUID.
    pub namespace_uuid: String,
    /// Provider of the KEK the new DEK is wrapped under.
    pub kek_provider: String,
    /// That KEK.
    pub kek_id: KekId,
    /// Data unit (logical block) size.
    pub data_unit_bytes: u32,
    /// Size of the data area in data units.
    pub data_blocks: u64,
    /// Whether `force` was given.
    pub forced: bool,
}

/// Why [`KeyManager::format_device`] did not format.
#[derive(Debug, Error)]
pub enum FormatDeviceError {
    /// Refused: the device is not blank, or the request is invalid. Nothing was written.
    #[error("format refused: {0}")]
    Refused(String),
    /// Reading or writing the device failed, or the KMS was unreachable.
    #[error("format failed: {0}")]
    Io(String),
    /// Formatting failed for good (KEK unusable, device too small, ...).
    #[error("format failed: {0}")]
    Failed(String),
}

/// Errors that stop a shallow rekey before any namespace is touched.
#[derive(Debug, Error)]
pub enum RekeyRequestError {
    /// No provider of that name is configured.
    #[error("no key provider named {0:?} is configured")]
    UnknownProvider(String),
    /// The scope names namespaces that are not registered (nothing was created or changed).
    #[error("no encrypted namespace named {}", .0.join(", "))]
    UnknownNamespaces(Vec<String>),
    /// The scope is an empty list.
    #[error("namespaces: empty list (omit it to rekey every namespace)")]
    EmptyScope,
    /// No namespace in scope is online, so no header could be re-wrapped (nothing was created).
    #[error("no namespace in scope is online (locked or in error): {}", .0.join(", "))]
    NothingOnline(Vec<String>),
    /// Creating the new KEK failed.
    #[error("creating the new KEK at {provider}: {source}")]
    CreateKek {
        /// The provider.
        provider: String,
        /// Why.
        #[source]
        source: ProviderError,
    },
}
