//! The key manager: key providers, encrypted namespaces and their lock state, boot-time
//! unlocking with back-off, shallow rekey (including change of KMS cluster), and the audit trail.
//!
//! It owns, by name, one optional local key provider (`"local"`) and any number of KMIP clusters
//! (by alias), and every encrypted namespace registered with [`KeyManager::add_encrypted`]: its
//! header I/O, its backing bdev, its [`NamespaceKeyState`] and, once online, its crypto bdev.
//! It exists so that the target never exposes an encrypted namespace before its DEK is
//! unwrapped, and so that every crypto operation goes through one place that logs and audits it.
//!
//! Threads (all of them control threads; nothing here ever runs on a reactor):
//! * The caller's thread (start-up, RPC handlers) runs [`KeyManager::new`],
//!   [`KeyManager::add_encrypted`], [`KeyManager::states`] and [`KeyManager::shallow_rekey`].
//!   A rekey blocks its caller for the KMS round trips and header writes it does.
//! * Each namespace gets its own unlock thread (`unlock-<ns>`), so namespaces come online
//!   independently: one whose KMS is down does not hold back another. The thread formats (if
//!   asked and the header is blank), fetches the KEK, unwraps the DEK, builds
//!   slice → crypto bdev, and hands the bdev to the `on_online` callback, then exits. Transient
//!   failures (KMS unreachable) are retried with exponential back-off; permanent ones end in
//!   [`NamespaceKeyState::Error`] without retries and without writing anything.
//! * The `on_online` callback runs on the unlock thread; it must only pass the bdev on (e.g. a
//!   mailbox message to the reactors), never block for long.
//!
//! Locks (control plane only, never on the data path): the namespace table, one mutex per
//! namespace's header I/O, one per provider. Order: namespace header I/O, then provider; the
//! table lock is never held across I/O. Rekeys are serialized by their own lock.
//!
//! Keys: the DEK exists in this module only between unwrap and building the XTS engine (a
//! [`Dek`], zeroized on drop); KEKs only inside provider calls and a rekey. Nothing here derives
//! or implements `Debug`/`Serialize` over key material; states, reports and logs carry ids,
//! fingerprints and reasons only.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

use super::header::{DataUnit, KeySlot, RekeyState, METADATA_REGION_BYTES};
use super::kmip_provider::KmipKeyProvider;
use super::local::{CreateMode, LocalKeyProvider, DEFAULT_KEK_ID};
use super::provider::{KekId, KeyProvider, ProviderError, ProviderKind};
use super::store::{
    self, FormatBlankError, HeaderIo, NotBlank, StoreError, Stored, FORMAT_DATA_PROBE_BYTES,
};
use super::wrap::Kek;
use super::{
    format_encrypted, open_encrypted, rekey, FormatError, FormatParams, OpenError, Opened,
    RekeyError, RevokeOld,
};
use crate::bdev::slice::SliceBdev;
use crate::bdev::Bdev;
use crate::crypto::bdev::{CryptoBdev, DataKey};
use crate::crypto::key::XtsKey;
use crate::crypto::xts::Tier;
use crate::keys::header_io::BdevHeaderIo;
use crate::kms::{KmsCluster, KmsClusterConfig, ServerStatus};
use crate::types::CoreId;

/// Name of the local key provider in [`NamespaceKeyConfig::provider`].
pub const LOCAL_PROVIDER: &str = "local";

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Key-management configuration (the `keys:` section of the YAML).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// KMIP clusters; each alias is a provider name.
    #[serde(default)]
    pub kms_clusters: Vec<KmsClusterConfig>,
    /// The local key file (development and perf labs only).
    #[serde(default)]
    pub local: Option<LocalKeysConfig>,
    /// Back-off of boot-time unlock retries while the KMS is unreachable.
    #[serde(default)]
    pub unlock_retry: RetryConfig,
    /// Append one JSON line per crypto operation to this file.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// Run even if key memory cannot be locked in RAM (`mlock` fails, usually for lack of
    /// `RLIMIT_MEMLOCK`): keys may then be swapped out to disk. Default false: start-up fails.
    #[serde(default)]
    pub allow_unlocked_memory: bool,
}

/// The local key file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalKeysConfig {
    /// Path of the key file.
    pub path: PathBuf,
    /// Create the file (mode 0600, one fresh KEK `default`) if it is missing.
    #[serde(default)]
    pub create: bool,
}

/// Exponential back-off: the n-th retry waits `initial_ms * 2^(n-1)`, capped at `max_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// First wait (default 1 s: a KMS that restarts is usually back within seconds).
    #[serde(default = "default_initial_ms")]
    pub initial_ms: u64,
    /// Longest wait (default 60 s, the KMS response timeout vCenter uses: retrying more often
    /// than a request can time out only adds load on a struggling KMS).
    #[serde(default = "default_max_ms")]
    pub max_ms: u64,
}

fn default_initial_ms() -> u64 {
    1_000
}

fn default_max_ms() -> u64 {
    60_000
}

/// Longest back-off accepted: beyond an hour a locked namespace looks dead to operators.
const RETRY_MAX_MS_LIMIT: u64 = 3_600_000;

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_ms: default_initial_ms(),
            max_ms: default_max_ms(),
        }
    }
}

impl RetryConfig {
    /// Checks 1 ≤ initial_ms ≤ max_ms ≤ 1 h.
    pub fn validate(&self) -> Result<(), ManagerError> {
        if self.initial_ms == 0 || self.initial_ms > self.max_ms || self.max_ms > RETRY_MAX_MS_LIMIT
        {
            return Err(ManagerError::Config(format!(
                "unlock_retry: need 1 <= initial_ms ({}) <= max_ms ({}) <= {RETRY_MAX_MS_LIMIT}",
                self.initial_ms, self.max_ms
            )));
        }
        Ok(())
    }

    /// The wait after failed attempt `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(32);
        let ms = self
            .initial_ms
            .saturating_mul(1u64 << shift)
            .min(self.max_ms);
        Duration::from_millis(ms)
    }
}

/// Key settings of one encrypted namespace.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceKeyConfig {
    /// `"local"` or a KMS cluster alias: where a new namespace's KEK comes from. An existing
    /// namespace is always opened with the provider its header names.
    pub provider: String,
    /// KEK for a new namespace. KMIP: the KEK Name (Locate; created and activated if no key has
    /// it). Local: the KEK id in the key file. Unset: the provider's current KEK (the one the
    /// last rekey or format created), else a new KEK (KMIP) or `default` (local).
    #[serde(default)]
    pub kek_name: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Audit
// ---------------------------------------------------------------------------------------------

/// The one audit trait of the process (shared with the RPC layer). The key manager records one
/// event per crypto operation: `who` is the caller identity (the RPC layer passes the peer's
/// uid/gid/pid; the boot path passes `"nvseal"`), `op` one of `format`, `unlock`, `kek-create`,
/// `rekey`, `revoke`, `target` a namespace id or `provider/kek-id`, `result` `ok` or
/// `error: <reason>`. Called on control threads; implementations must not panic.
pub use crate::audit::AuditSink;

/// Appends one JSON object per line to a file, made durable with `fdatasync` per record:
/// `{"time":"2026-11-28T01:02:03.456Z","unix_ms":…,"who":…,"op":…,"target":…,"result":…}`.
pub struct FileAuditSink {
    path: PathBuf,
    file: Mutex<File>,
}

impl FileAuditSink {
    /// Opens (creating, mode 0600) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(file),
        })
    }
}

#[derive(Serialize)]
struct AuditLine<'a> {
    time: String,
    unix_ms: u64,
    who: &'a str,
    op: &'a str,
    target: &'a str,
    result: &'a str,
}

impl AuditSink for FileAuditSink {
    fn record(&self, who: &str, op: &str, target: &str, result: &str) {
        let unix_ms = unix_ms();
        let line = AuditLine {
            time: rfc3339_utc(unix_ms),
            unix_ms,
            who,
            op,
            target,
            result,
        };
        let mut text = match serde_json::to_string(&line) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "audit record not serializable");
                return;
            }
        };
        text.push('\n');
        let mut file = lock(&self.file);
        // One write call per line on an O_APPEND file: lines from several processes do not
        // interleave.
        if let Err(e) = file
            .write_all(text.as_bytes())
            .and_then(|()| file.sync_data())
        {
            tracing::error!(path = %self.path.display(), error = %e, op, target,
                "writing the audit log failed");
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for a Unix time in milliseconds (proleptic Gregorian, UTC).
fn rfc3339_utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm, unsigned form).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

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

/// One namespace as reported by [`KeyManager::states`]. Holds no secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
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
    /// Revoked at its provider (no namespace uses it any more).
    Revoked,
    /// Kept: these namespaces still reference it.
    Kept {
        /// The namespaces.
        used_by: Vec<String>,
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

// ---------------------------------------------------------------------------------------------
// Internals
// ---------------------------------------------------------------------------------------------

/// Called once per namespace when it comes online, on its unlock thread.
pub type OnOnline = Arc<dyn Fn(&str, Arc<dyn Bdev>) + Send + Sync>;

/// Options of [`KeyManager::new`] that are not configuration.
#[derive(Clone, Default)]
pub struct ManagerOptions {
    /// Receives each namespace's crypto bdev when it comes online.
    pub on_online: Option<OnOnline>,
    /// Audit sink; when unset and `audit_log` is configured, a [`FileAuditSink`] on it.
    pub audit: Option<Arc<dyn AuditSink>>,
    /// Highest XTS kernel tier for the crypto bdevs (None: best available).
    pub xts_max_tier: Option<Tier>,
}

enum ManagedProvider {
    Local(LocalKeyProvider),
    Kmip(KmipKeyProvider),
}

impl ManagedProvider {
    fn as_dyn(&mut self) -> &mut dyn KeyProvider {
        match self {
            Self::Local(p) => p,
            Self::Kmip(p) => p,
        }
    }
}

struct ProviderSlot {
    name: String,
    kind: ProviderKind,
    alias: String,
    inner: Mutex<ManagedProvider>,
    /// The KMIP cluster, for status reports that must not wait behind an operation in flight
    /// (the cluster's own status lock is separate from its connection lock).
    cluster: Option<Arc<KmsCluster>>,
    /// The KEK new namespaces get when their config names none.
    current_kek: Mutex<Option<KekId>>,
}

type SharedIo = Arc<Mutex<Box<dyn HeaderIo + Send>>>;

/// A KEK reference: provider name and id.
type KekRef = (String, KekId);

struct NsEntry {
    provider: String,
    kek_name: Option<String>,
    create: bool,
    who: String,
    io: SharedIo,
    backing: Arc<dyn Bdev>,
    state: NamespaceKeyState,
    active: Option<KekRef>,
    pending: Option<KekRef>,
    namespace_uuid: Option<Uuid>,
    generation: Option<u64>,
    header_warning: Option<String>,
    last_error: Option<String>,
    retry_at: Option<Instant>,
    bdev: Option<Arc<dyn Bdev>>,
    /// Dropping it stops the unlock thread's back-off wait.
    stop: Option<Sender<()>>,
}

struct Inner {
    providers: BTreeMap<String, Arc<ProviderSlot>>,
    namespaces: Mutex<BTreeMap<String, NsEntry>>,
    changed: Condvar,
    retry: RetryConfig,
    audit: Option<Arc<dyn AuditSink>>,
    on_online: Option<OnOnline>,
    xts_max_tier: Option<Tier>,
    rekey_lock: Mutex<()>,
    /// KEKs named by the headers of namespaces that were removed (`KeyManager::remove`): their
    /// data is still on disk under those KEKs, so a later rekey never revokes them.
    retained: Mutex<Vec<(KekRef, String)>>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why an unlock attempt failed.
enum Fail {
    /// Retry later (KMS unreachable).
    Transient(String),
    /// Give up: Error state.
    Permanent(String),
}

/// The key manager. See the module documentation for threads and locks.
pub struct KeyManager {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl KeyManager {
    /// Builds the providers from `config` (loads TLS material and the local key file; contacts
    /// no KMS) and the audit sink.
    pub fn new(config: &KeysConfig, options: ManagerOptions) -> Result<Self, ManagerError> {
        config.unlock_retry.validate()?;
        // Keys are unwrapped long after start-up, on the unlock threads: find out now whether
        // they can be locked in RAM, and refuse to start if not (unless allowed).
        crate::sys::mlock::set_allow_unlocked(config.allow_unlocked_memory);
        if let Err(e) = crate::sys::mlock::probe() {
            if !config.allow_unlocked_memory {
                return Err(ManagerError::Memory(e));
            }
            tracing::warn!(error = %e,
                "key memory cannot be locked in RAM; keys may be swapped out to disk \
                 (allowed by keys.allow_unlocked_memory)");
        }
        let mut providers = BTreeMap::new();
        if let Some(local) = &config.local {
            let mode = if local.create {
                CreateMode::CreateIfMissing
            } else {
                CreateMode::MustExist
            };
            let p = LocalKeyProvider::open(&local.path, mode).map_err(ManagerError::Local)?;
            let alias = p.cluster_alias().to_owned();
            providers.insert(
                LOCAL_PROVIDER.to_owned(),
                Arc::new(ProviderSlot {
                    name: LOCAL_PROVIDER.to_owned(),
                    kind: ProviderKind::Local,
                    alias,
                    inner: Mutex::new(ManagedProvider::Local(p)),
                    cluster: None,
                    current_kek: Mutex::new(None),
                }),
            );
        }
        for c in &config.kms_clusters {
            if c.alias == LOCAL_PROVIDER || providers.contains_key(&c.alias) {
                return Err(ManagerError::Config(format!(
                    "KMS cluster alias {:?} is used twice (\"local\" is reserved)",
                    c.alias
                )));
            }
            super::provider::check_kms_alias(&c.alias)
                .map_err(|e| ManagerError::Config(e.to_string()))?;
            let cluster =
                Arc::new(
                    KmsCluster::from_config(c).map_err(|source| ManagerError::Kms {
                        alias: c.alias.clone(),
                        source,
                    })?,
                );
            providers.insert(
                c.alias.clone(),
                Arc::new(ProviderSlot {
                    name: c.alias.clone(),
                    kind: ProviderKind::Kmip,
                    alias: c.alias.clone(),
                    inner: Mutex::new(ManagedProvider::Kmip(KmipKeyProvider::new(cluster.clone()))),
                    cluster: Some(cluster),
                    current_kek: Mutex::new(None),
                }),
            );
        }
        let audit = match (options.audit, &config.audit_log) {
            (Some(sink), _) => Some(sink),
            (None, Some(path)) => {
                Some(Arc::new(
                    FileAuditSink::open(path).map_err(|source| ManagerError::Audit {
                        path: path.clone(),
                        source,
                    })?,
                ) as Arc<dyn AuditSink>)
            }
            (None, None) => None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                providers,
                namespaces: Mutex::new(BTreeMap::new()),
                changed: Condvar::new(),
                retry: config.unlock_retry,
                audit,
                on_online: options.on_online,
                xts_max_tier: options.xts_max_tier,
                rekey_lock: Mutex::new(()),
                retained: Mutex::new(Vec::new()),
            }),
            threads: Mutex::new(Vec::new()),
        })
    }

    /// Names of the configured providers.
    pub fn providers(&self) -> Vec<String> {
        self.inner.providers.keys().cloned().collect()
    }

    /// Per-server health of every KMIP cluster. Never waits for a KMS operation in flight.
    pub fn kms_status(&self) -> Vec<ClusterStatus> {
        self.inner
            .providers
            .values()
            .filter_map(|p| {
                p.cluster.as_ref().map(|c| ClusterStatus {
                    alias: p.name.clone(),
                    servers: c.status(),
                })
            })
            .collect()
    }

    /// Registers an encrypted namespace and starts unlocking it on its own thread. The
    /// namespace is [`NamespaceKeyState::Locked`] until its crypto bdev (data area of `backing`
    /// after the header region, encrypted with its DEK) is handed to `on_online`.
    ///
    /// With `create`, a blank header area (all zeros) is formatted first with a fresh DEK
    /// wrapped under the KEK chosen by `key` (see [`NamespaceKeyConfig::kek_name`]). A header
    /// area holding anything else is never formatted over. `who` is recorded in the audit log.
    pub fn add_encrypted(
        &self,
        who: &str,
        ns_id: &str,
        backing: Arc<dyn Bdev>,
        header_io: Box<dyn HeaderIo + Send>,
        key: &NamespaceKeyConfig,
        create: bool,
    ) -> Result<(), AddError> {
        if !self.inner.providers.contains_key(&key.provider) {
            return Err(AddError::UnknownProvider {
                ns_id: ns_id.to_owned(),
                provider: key.provider.clone(),
            });
        }
        if DataUnit::from_bytes(backing.block_size()).is_none() {
            return Err(AddError::BlockSize {
                ns_id: ns_id.to_owned(),
                block_size: backing.block_size(),
            });
        }
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
        {
            let mut table = lock(&self.inner.namespaces);
            if table.contains_key(ns_id) {
                return Err(AddError::Duplicate(ns_id.to_owned()));
            }
            table.insert(
                ns_id.to_owned(),
                NsEntry {
                    provider: key.provider.clone(),
                    kek_name: key.kek_name.clone(),
                    create,
                    who: who.to_owned(),
                    io: Arc::new(Mutex::new(header_io)),
                    backing,
                    state: NamespaceKeyState::Locked,
                    active: None,
                    pending: None,
                    namespace_uuid: None,
                    generation: None,
                    header_warning: None,
                    last_error: None,
                    retry_at: None,
                    bdev: None,
                    stop: Some(stop_tx),
                },
            );
        }
        tracing::info!(namespace = %ns_id, provider = %key.provider, create,
            "encrypted namespace registered: locked until its KEK is fetched");
        let inner = self.inner.clone();
        let id = ns_id.to_owned();
        let spawned = std::thread::Builder::new()
            .name(format!("unlock-{ns_id}"))
            .spawn(move || inner.unlock_loop(&id, &stop_rx));
        match spawned {
            Ok(handle) => {
                lock(&self.threads).push(handle);
                Ok(())
            }
            Err(source) => {
                lock(&self.inner.namespaces).remove(ns_id);
                Err(AddError::Spawn {
                    ns_id: ns_id.to_owned(),
                    source,
                })
            }
        }
    }

    /// Formats one device now, on the calling thread: the offline `nvseal format` tool. The
    /// header copies must be blank: a valid header (its DEK would be destroyed) or a damaged one
    /// (whose wrapped DEK might still be recovered by hand) is refused, `force` or not. The rest
    /// of the metadata region and the first [`FORMAT_DATA_PROBE_BYTES`] of the data area must be
    /// blank as well unless `force` is set; with `force`, the metadata region is zeroed first
    /// (the deep-rekey journal area must read as zeros on a fresh namespace) and the data area is
    /// left as it is, to be overwritten by the namespace's users. Audited as op `format`. The
    /// namespace is not registered: a later `add_encrypted` opens it.
    pub fn format_device(
        &self,
        who: &str,
        ns_id: &str,
        backing: &Arc<dyn Bdev>,
        io: &mut dyn HeaderIo,
        key: &NamespaceKeyConfig,
        force: bool,
    ) -> Result<FormatReport, FormatDeviceError> {
        let refused = |reason: String| {
            self.inner
                .audit(who, "format", ns_id, &format!("refused: {reason}"));
            FormatDeviceError::Refused(reason)
        };
        if !self.inner.providers.contains_key(&key.provider) {
            return Err(refused(format!(
                "no key provider named {:?} is configured",
                key.provider
            )));
        }
        match store::read_header(io) {
            Ok(stored) => {
                return Err(refused(format!(
                    "the device holds an nvseal header (namespace {}, generation {}); formatting \
                     would destroy its DEK and with it every byte of the namespace, so it is \
                     refused even with --force",
                    stored.header.namespace_uuid, stored.header.generation
                )))
            }
            Err(StoreError::NotFormatted) => {}
            Err(e @ StoreError::Io { .. }) => return Err(FormatDeviceError::Io(e.to_string())),
            Err(e) => {
                return Err(refused(format!(
                    "the header copies are not blank ({e}); a damaged header may still hold a \
                     recoverable wrapped DEK, so it is refused even with --force (if the device \
                     is expendable, zero its first 128 KiB by hand first)"
                )))
            }
        }
        match check_blank(io, backing) {
            Ok(()) => {}
            Err(FormatBlankError::Io(e)) => return Err(FormatDeviceError::Io(e.to_string())),
            Err(FormatBlankError::NotBlank(found)) if !force => {
                return Err(refused(format!(
                    "the header copies are blank but {found}; this may be the namespace's \
                     ciphertext under a wiped header. Pass --force only if that data is \
                     expendable"
                )))
            }
            Err(FormatBlankError::NotBlank(found)) => {
                tracing::warn!(namespace = %ns_id, %found,
                    "formatting over a device that is not blank, as forced");
                self.inner
                    .audit(who, "format", ns_id, &format!("forced over: {found}"));
                zero_metadata_region(io).map_err(|e| FormatDeviceError::Io(e.to_string()))?;
            }
        }
        let opened = self
            .inner
            .format(
                io,
                ns_id,
                who,
                backing,
                &key.provider,
                key.kek_name.as_deref(),
            )
            .map_err(|f| match f {
                Fail::Transient(r) => FormatDeviceError::Io(r),
                Fail::Permanent(r) => FormatDeviceError::Failed(r),
            })?;
        let header = &opened.stored.header;
        Ok(FormatReport {
            ns_id: ns_id.to_owned(),
            namespace_uuid: header.namespace_uuid.to_string(),
            kek_provider: key.provider.clone(),
            kek_id: header.active.kek_id.clone(),
            data_unit_bytes: header.data_unit.bytes(),
            data_blocks: header.data_blocks,
            forced: force,
        })
    }

    /// Forgets an encrypted namespace whose export was deleted: stops its unlock thread (a
    /// key that arrives afterwards is dropped, never brought online) and drops the manager's
    /// reference to its crypto bdev, so its DEK is wiped from memory once the target's channels
    /// are closed. The header on disk is left alone, and the KEKs it names are kept from
    /// revocation by later rekeys (the data still needs them), so the namespace can be added
    /// again. Waits for a rekey in progress. Returns false if `ns_id` is not registered.
    pub fn remove(&self, who: &str, ns_id: &str) -> bool {
        let _serial = lock(&self.inner.rekey_lock);
        let Some(entry) = lock(&self.inner.namespaces).remove(ns_id) else {
            return false;
        };
        {
            let mut retained = lock(&self.inner.retained);
            for r in [&entry.active, &entry.pending].into_iter().flatten() {
                retained.push((r.clone(), ns_id.to_owned()));
            }
        }
        let was = entry.state.clone();
        // Dropping the entry drops its stop sender (the unlock thread's back-off wait ends and
        // the thread sees the entry gone) and its reference to the crypto bdev.
        drop(entry);
        self.inner.changed.notify_all();
        self.inner.audit(who, "remove", ns_id, "ok");
        tracing::info!(namespace = %ns_id, state = ?was, "encrypted namespace removed from key management");
        true
    }

    /// Wakes a namespace that waits for its next unlock attempt, so it retries now (e.g. after
    /// an operator fixed the KMS). Returns false if it is not waiting.
    pub fn retry_now(&self, ns_id: &str) -> bool {
        let table = lock(&self.inner.namespaces);
        match table.get(ns_id) {
            Some(e) if e.state == NamespaceKeyState::Locked => {
                e.stop.as_ref().is_some_and(|tx| tx.try_send(()).is_ok())
            }
            _ => false,
        }
    }

    /// Every namespace's status, sorted by id.
    pub fn states(&self) -> Vec<NamespaceStatus> {
        let table = lock(&self.inner.namespaces);
        table.iter().map(|(id, e)| status_of(id, e)).collect()
    }

    /// One namespace's status.
    pub fn state(&self, ns_id: &str) -> Option<NamespaceStatus> {
        lock(&self.inner.namespaces)
            .get(ns_id)
            .map(|e| status_of(ns_id, e))
    }

    /// The crypto bdev of an online namespace.
    pub fn bdev(&self, ns_id: &str) -> Option<Arc<dyn Bdev>> {
        lock(&self.inner.namespaces)
            .get(ns_id)
            .and_then(|e| e.bdev.clone())
    }

    /// Waits until `pred` holds for the namespace's state, or `timeout` passes; returns its
    /// status then (None if the namespace is unknown).
    pub fn wait_for(
        &self,
        ns_id: &str,
        timeout: Duration,
        pred: impl Fn(&NamespaceKeyState) -> bool,
    ) -> Option<NamespaceStatus> {
        let deadline = Instant::now() + timeout;
        let mut table = lock(&self.inner.namespaces);
        loop {
            let entry = table.get(ns_id)?;
            let now = Instant::now();
            if pred(&entry.state) || now >= deadline {
                return Some(status_of(ns_id, entry));
            }
            table = self
                .inner
                .changed
                .wait_timeout(table, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Shallow rekey: creates and activates a new KEK at provider `target`, re-wraps the DEK of
    /// every online namespace in `scope` under it (three durable header updates each, see
    /// [`super::shallow_rekey`]; the DEK and the crypto bdev are untouched, so I/O keeps
    /// flowing), then revokes each replaced KEK that no registered namespace references any more.
    /// A `target` other than a namespace's current provider is a change of KMS cluster.
    pub fn shallow_rekey(
        &self,
        who: &str,
        scope: &RekeyScope,
        target: &str,
    ) -> Result<RekeyReport, RekeyRequestError> {
        self.inner.shallow_rekey(who, scope, target)
    }
}

impl Drop for KeyManager {
    fn drop(&mut self) {
        for entry in lock(&self.inner.namespaces).values_mut() {
            entry.stop = None;
        }
        for handle in lock(&self.threads).drain(..) {
            let _ = handle.join();
        }
    }
}

fn status_of(ns_id: &str, e: &NsEntry) -> NamespaceStatus {
    NamespaceStatus {
        ns_id: ns_id.to_owned(),
        state: e.state.clone(),
        provider: e.provider.clone(),
        kek_provider: e.active.as_ref().map(|(p, _)| p.clone()),
        kek_id: e.active.as_ref().map(|(_, id)| id.clone()),
        pending_kek_id: e.pending.as_ref().map(|(_, id)| id.clone()),
        namespace_uuid: e.namespace_uuid.map(|u| u.to_string()),
        header_generation: e.generation,
        header_warning: e.header_warning.clone(),
        last_error: e.last_error.clone(),
        retry_in_ms: e.retry_at.map(|at| {
            u64::try_from(at.saturating_duration_since(Instant::now()).as_millis())
                .unwrap_or(u64::MAX)
        }),
    }
}

/// The blank check of a device about to be formatted: the whole metadata region through the
/// header I/O, then the first [`FORMAT_DATA_PROBE_BYTES`] of the data area (as much as the
/// device has) through the backing bdev, on a private channel driven on this control thread.
/// Reads only.
fn check_blank(io: &mut dyn HeaderIo, backing: &Arc<dyn Bdev>) -> Result<(), FormatBlankError> {
    store::check_metadata_blank(io)?;
    let bs = u64::from(backing.block_size()).max(1);
    let device_bytes = backing.num_blocks().saturating_mul(bs);
    let end = device_bytes.min(METADATA_REGION_BYTES + FORMAT_DATA_PROBE_BYTES) / bs * bs;
    if end <= METADATA_REGION_BYTES {
        // No data area: the format itself refuses the device as too small.
        return Ok(());
    }
    let io_failed = |source: std::io::Error| {
        FormatBlankError::Io(StoreError::Io {
            op: "blank check: read data area",
            source,
        })
    };
    let mut reader = BdevHeaderIo::new(backing.clone(), CoreId(0), end).map_err(io_failed)?;
    match store::first_nonzero(
        |off, buf| reader.read_at(off, buf),
        METADATA_REGION_BYTES,
        end - METADATA_REGION_BYTES,
    ) {
        Ok(None) => Ok(()),
        Ok(Some(offset)) => Err(FormatBlankError::NotBlank(NotBlank::Data { offset })),
        Err(e) => Err(io_failed(e)),
    }
}

/// Zeroes the whole metadata region and flushes (a forced format only).
fn zero_metadata_region(io: &mut dyn HeaderIo) -> std::io::Result<()> {
    let zero = vec![0u8; 128 * 1024];
    let mut off = 0u64;
    while off < METADATA_REGION_BYTES {
        io.write_at(off, &zero)?;
        off += zero.len() as u64;
    }
    io.flush()
}

/// The error of a namespace whose header copies are blank over a device that is not.
fn not_blank_reason(ns_id: &str, found: &NotBlank) -> String {
    format!(
        "the header copies are blank but {found}: refusing to format, since this is most \
         likely the namespace's ciphertext under a wiped header and a new DEK would make it \
         unreadable for good. If the header was wiped by accident, restore the first 1 MiB of \
         the device from a backup. If the data is expendable, stop nvseal and run \
         `nvseal format --force -c <config> --bdev {ns_id}`"
    )
}

/// How a failed open is classified.
fn classify_open(e: &OpenError) -> Fail {
    if e.is_transient() {
        Fail::Transient(e.to_string())
    } else {
        Fail::Permanent(e.to_string())
    }
}

impl Inner {
    fn audit(&self, who: &str, op: &str, target: &str, result: &str) {
        if let Some(sink) = &self.audit {
            sink.record(who, op, target, result);
        }
    }

    /// Changes a namespace's state, logs the transition and wakes waiters.
    fn set_state(
        &self,
        ns_id: &str,
        state: NamespaceKeyState,
        f: impl FnOnce(&mut NsEntry),
    ) -> bool {
        let mut table = lock(&self.namespaces);
        let Some(entry) = table.get_mut(ns_id) else {
            return false;
        };
        f(entry);
        if entry.state != state {
            match &state {
                NamespaceKeyState::Error { reason } => {
                    tracing::error!(namespace = %ns_id, from = ?entry.state, %reason,
                        "namespace key state: error (no retries)")
                }
                NamespaceKeyState::Locked => {
                    tracing::warn!(namespace = %ns_id, from = ?entry.state,
                        error = entry.last_error.as_deref().unwrap_or(""),
                        retry_in_ms = ?entry.retry_at.map(|at| at.saturating_duration_since(Instant::now()).as_millis()),
                        "namespace key state: locked")
                }
                to => tracing::info!(namespace = %ns_id, from = ?entry.state, to = ?to,
                    "namespace key state change"),
            }
            entry.state = state;
        }
        drop(table);
        self.changed.notify_all();
        true
    }

    fn provider_by_name(&self, name: &str) -> Option<&Arc<ProviderSlot>> {
        self.providers.get(name)
    }

    /// The provider a header slot names (kind and alias must match a configured provider).
    fn provider_for_slot(&self, slot: &KeySlot) -> Result<&Arc<ProviderSlot>, String> {
        self.providers
            .values()
            .find(|p| p.kind == slot.provider && p.alias == slot.kms_alias)
            .ok_or_else(|| {
                format!(
                    "header names KEK {} at {} provider {:?}, which is not configured",
                    slot.kek_id, slot.provider, slot.kms_alias
                )
            })
    }

    fn slot_ref(&self, slot: &KeySlot) -> KekRef {
        let name = self
            .provider_for_slot(slot)
            .map(|p| p.name.clone())
            .unwrap_or_else(|_| slot.kms_alias.clone());
        (name, slot.kek_id.clone())
    }

    /// Records what a header says (KEK references, identity, bad copy) in the namespace entry.
    fn note_header(&self, ns_id: &str, stored: &Stored) {
        let active = self.slot_ref(&stored.header.active);
        let pending = match &stored.header.rekey {
            RekeyState::Shallow { new } => Some(self.slot_ref(new)),
            _ => None,
        };
        let warning = stored.bad_copy().map(|(copy, fault)| {
            format!("header copy {copy:?} is invalid ({fault}); using the other")
        });
        let mut table = lock(&self.namespaces);
        if let Some(e) = table.get_mut(ns_id) {
            // Back after a removal: its live entry names its KEKs from now on, so what was
            // retained for it goes (else a KEK its header no longer names after a rekey would
            // never be revoked). Lock order: namespaces, then retained (as nowhere the reverse).
            lock(&self.retained).retain(|(_, ns)| ns != ns_id);
            e.active = Some(active);
            e.pending = pending;
            e.namespace_uuid = Some(stored.header.namespace_uuid);
            e.generation = Some(stored.header.generation);
            e.header_warning = warning;
        }
    }

    fn unlock_loop(&self, ns_id: &str, stop: &Receiver<()>) {
        let mut attempt: u32 = 0;
        let mut last_transient: Option<String> = None;
        loop {
            attempt = attempt.saturating_add(1);
            if !self.set_state(ns_id, NamespaceKeyState::Unlocking { attempt }, |e| {
                e.retry_at = None;
            }) {
                return;
            }
            let who = lock(&self.namespaces)
                .get(ns_id)
                .map(|e| e.who.clone())
                .unwrap_or_default();
            match self.try_unlock(ns_id) {
                Ok(bdev) => {
                    self.audit(&who, "unlock", ns_id, "ok");
                    // Hand the bdev over first, so that "online" in states() never shows a
                    // namespace the target has not been given yet.
                    if let Some(cb) = &self.on_online {
                        cb(ns_id, bdev.clone());
                    }
                    self.set_state(ns_id, NamespaceKeyState::Online, |e| {
                        e.bdev = Some(bdev);
                        e.last_error = None;
                    });
                    return;
                }
                Err(Fail::Permanent(reason)) => {
                    self.audit(&who, "unlock", ns_id, &format!("error: {reason}"));
                    self.set_state(
                        ns_id,
                        NamespaceKeyState::Error {
                            reason: reason.clone(),
                        },
                        |e| e.last_error = Some(reason.clone()),
                    );
                    return;
                }
                Err(Fail::Transient(reason)) => {
                    // Audit the first failure and each change of cause, not every retry.
                    if last_transient.as_deref() != Some(reason.as_str()) {
                        self.audit(&who, "unlock", ns_id, &format!("retrying: {reason}"));
                    }
                    let delay = self.retry.delay(attempt);
                    self.set_state(ns_id, NamespaceKeyState::Locked, |e| {
                        e.last_error = Some(reason.clone());
                        e.retry_at = Some(Instant::now() + delay);
                    });
                    last_transient = Some(reason);
                    match stop.recv_timeout(delay) {
                        Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            }
        }
    }

    /// One unlock attempt: read the header (format it if blank and asked), open, build bdevs.
    fn try_unlock(&self, ns_id: &str) -> Result<Arc<dyn Bdev>, Fail> {
        let (io, backing, provider, kek_name, create, who) = {
            let table = lock(&self.namespaces);
            let e = table
                .get(ns_id)
                .ok_or_else(|| Fail::Permanent("namespace removed".into()))?;
            (
                e.io.clone(),
                e.backing.clone(),
                e.provider.clone(),
                e.kek_name.clone(),
                e.create,
                e.who.clone(),
            )
        };
        let mut io = lock(&io);
        let opened = match store::read_header(&mut **io) {
            Ok(stored) => {
                self.note_header(ns_id, &stored);
                self.open_stored(&mut **io, &stored)?
            }
            Err(StoreError::NotFormatted) if create => {
                self.refuse_unless_blank(&mut **io, ns_id, &who, &backing)?;
                let opened = self.format(
                    &mut **io,
                    ns_id,
                    &who,
                    &backing,
                    &provider,
                    kek_name.as_deref(),
                )?;
                self.note_header(ns_id, &opened.stored);
                opened
            }
            Err(StoreError::NotFormatted) => {
                return Err(Fail::Permanent(
                    "no nvseal header on the device (both copies blank) and create is off".into(),
                ))
            }
            Err(e @ StoreError::Io { .. }) => return Err(Fail::Transient(e.to_string())),
            Err(e) => return Err(Fail::Permanent(e.to_string())),
        };
        drop(io);
        self.build_bdev(ns_id, backing, opened)
    }

    /// Opens with the provider the active slot names; during an interrupted rekey onto another
    /// provider, falls back to the pending slot's provider.
    fn open_stored(&self, io: &mut dyn HeaderIo, stored: &Stored) -> Result<Opened, Fail> {
        let active = self
            .provider_for_slot(&stored.header.active)
            .map(Arc::clone);
        let first = match &active {
            Ok(p) => open_encrypted(io, lock(&p.inner).as_dyn()),
            Err(reason) => return self.open_pending_only(io, stored, reason.clone()),
        };
        let err = match first {
            Ok(o) => return Ok(o),
            Err(e) => e,
        };
        let RekeyState::Shallow { new } = &stored.header.rekey else {
            return Err(classify_open(&err));
        };
        let pending = match self.provider_for_slot(new) {
            Ok(p) if active.as_ref().is_ok_and(|a| !Arc::ptr_eq(a, p)) => p.clone(),
            _ => return Err(classify_open(&err)),
        };
        let second = open_encrypted(io, lock(&pending.inner).as_dyn());
        match second {
            Ok(o) => Ok(o),
            Err(e2) => {
                let text = format!("active KEK: {err}; pending KEK: {e2}");
                if err.is_transient() || e2.is_transient() {
                    Err(Fail::Transient(text))
                } else {
                    Err(Fail::Permanent(text))
                }
            }
        }
    }

    fn open_pending_only(
        &self,
        io: &mut dyn HeaderIo,
        stored: &Stored,
        reason: String,
    ) -> Result<Opened, Fail> {
        if let RekeyState::Shallow { new } = &stored.header.rekey {
            if let Ok(p) = self.provider_for_slot(new) {
                return open_encrypted(io, lock(&p.inner).as_dyn()).map_err(|e| classify_open(&e));
            }
        }
        Err(Fail::Permanent(reason))
    }

    /// The blank check before `create` formats a device whose header copies are blank: the
    /// rest of the metadata region and the first [`FORMAT_DATA_PROBE_BYTES`] of the data area
    /// must read as zeros too. Otherwise the header was most likely wiped over live ciphertext,
    /// and a fresh DEK would make it unreadable for good: a permanent error that says what to do
    /// (nothing is written). A read failure is transient.
    fn refuse_unless_blank(
        &self,
        io: &mut dyn HeaderIo,
        ns_id: &str,
        who: &str,
        backing: &Arc<dyn Bdev>,
    ) -> Result<(), Fail> {
        match check_blank(io, backing) {
            Ok(()) => Ok(()),
            Err(FormatBlankError::Io(e)) => Err(Fail::Transient(format!("blank check: {e}"))),
            Err(FormatBlankError::NotBlank(found)) => {
                let reason = not_blank_reason(ns_id, &found);
                self.audit(who, "format", ns_id, &format!("refused: {found}"));
                Err(Fail::Permanent(reason))
            }
        }
    }

    /// Formats a blank header: chooses the KEK, draws a DEK, writes both copies.
    fn format(
        &self,
        io: &mut dyn HeaderIo,
        ns_id: &str,
        who: &str,
        backing: &Arc<dyn Bdev>,
        provider: &str,
        kek_name: Option<&str>,
    ) -> Result<Opened, Fail> {
        let slot = self
            .provider_by_name(provider)
            .ok_or_else(|| Fail::Permanent(format!("no key provider named {provider:?}")))?;
        let data_unit = DataUnit::from_bytes(backing.block_size()).ok_or_else(|| {
            Fail::Permanent(format!("block size {} unsupported", backing.block_size()))
        })?;
        let device_bytes = backing
            .num_blocks()
            .saturating_mul(u64::from(backing.block_size()));
        let mut p = lock(&slot.inner);
        let kek_id = self
            .format_kek(slot, &mut p, kek_name, who)
            .map_err(|e| provider_fail("choosing the KEK", e))?;
        let params = FormatParams::new(Uuid::new_v4(), data_unit, device_bytes, kek_id.clone());
        match format_encrypted(io, p.as_dyn(), &params) {
            Ok(opened) => {
                self.audit(
                    who,
                    "format",
                    ns_id,
                    &format!("ok: kek {provider}/{kek_id}"),
                );
                Ok(opened)
            }
            Err(FormatError::Provider(e)) if e.is_transient() => {
                Err(Fail::Transient(format!("formatting: fetching KEK: {e}")))
            }
            Err(e) => {
                self.audit(who, "format", ns_id, &format!("error: {e}"));
                Err(Fail::Permanent(format!("formatting: {e}")))
            }
        }
    }

    /// The KEK a new namespace is wrapped under (see [`NamespaceKeyConfig::kek_name`]).
    fn format_kek(
        &self,
        slot: &ProviderSlot,
        p: &mut ManagedProvider,
        kek_name: Option<&str>,
        who: &str,
    ) -> Result<KekId, ProviderError> {
        let current = lock(&slot.current_kek).clone();
        match (p, kek_name) {
            (ManagedProvider::Local(_), Some(name)) => Ok(KekId::new(name)?),
            (ManagedProvider::Local(_), None) => Ok(current.unwrap_or(KekId::new(DEFAULT_KEK_ID)?)),
            (ManagedProvider::Kmip(k), Some(name)) => {
                let found = k.locate(name)?;
                match found.as_slice() {
                    [id] => Ok(id.clone()),
                    [] => self.create_kek(slot, k, name, who),
                    many => Err(ProviderError::Protocol {
                        detail: format!(
                            "{} KEKs are named {name:?} on cluster {}; name one by a unique name",
                            many.len(),
                            slot.name
                        ),
                    }),
                }
            }
            (ManagedProvider::Kmip(k), None) => match current {
                Some(id) => Ok(id),
                None => {
                    let id = self.create_kek(slot, k, &generated_kek_name(), who)?;
                    *lock(&slot.current_kek) = Some(id.clone());
                    Ok(id)
                }
            },
        }
    }

    fn create_kek(
        &self,
        slot: &ProviderSlot,
        p: &mut dyn KeyProvider,
        name: &str,
        who: &str,
    ) -> Result<KekId, ProviderError> {
        match p.create_kek(name) {
            Ok((id, _kek)) => {
                self.audit(who, "kek-create", &format!("{}/{id}", slot.name), "ok");
                Ok(id)
            }
            Err(e) => {
                self.audit(who, "kek-create", &slot.name, &format!("error: {e}"));
                Err(e)
            }
        }
    }

    /// Checks the header's geometry against the device and builds slice → crypto bdev.
    fn build_bdev(
        &self,
        ns_id: &str,
        backing: Arc<dyn Bdev>,
        opened: Opened,
    ) -> Result<Arc<dyn Bdev>, Fail> {
        let (header, dek) = opened.into_parts();
        let bs = u64::from(backing.block_size());
        if u64::from(header.data_unit.bytes()) != bs {
            return Err(Fail::Permanent(format!(
                "header data unit {} bytes differs from the device block size {bs}",
                header.data_unit.bytes()
            )));
        }
        if header.data_offset_bytes % bs != 0 {
            return Err(Fail::Permanent(format!(
                "header data offset {} is not a multiple of the block size {bs}",
                header.data_offset_bytes
            )));
        }
        let offset_blocks = header.data_offset_bytes / bs;
        let fits = offset_blocks
            .checked_add(header.data_blocks)
            .is_some_and(|end| end <= backing.num_blocks());
        if !fits {
            return Err(Fail::Permanent(format!(
                "header data area ({} blocks at block {offset_blocks}) does not fit the device ({} blocks)",
                header.data_blocks,
                backing.num_blocks()
            )));
        }
        let xts_key = XtsKey::from_bytes(dek.expose())
            .map_err(|e| Fail::Permanent(format!("DEK unusable: {e}")))?;
        drop(dek);
        let key = DataKey::new(&xts_key, self.xts_max_tier)
            .map_err(|e| Fail::Permanent(format!("XTS engine: {e}")))?;
        drop(xts_key);
        let slice = SliceBdev::new(
            &format!("{ns_id}-data"),
            backing,
            offset_blocks,
            header.data_blocks,
        )
        .map_err(|e| Fail::Permanent(e.to_string()))?;
        let crypto = CryptoBdev::new(&format!("{ns_id}-crypt"), Arc::new(slice), key, false)
            .map_err(|e| Fail::Permanent(e.to_string()))?;
        tracing::info!(
            namespace = %ns_id,
            data_blocks = header.data_blocks,
            offset_blocks,
            tier = crypto.tier().name(),
            "crypto bdev ready"
        );
        Ok(Arc::new(crypto))
    }

    fn shallow_rekey(
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
            super::shallow_rekey(io, p.as_dyn(), new_id, new_kek, RevokeOld::No)
                .map(|out| out.stored)
                .map_err(|e| e.to_string())
        } else {
            rekey_across(io, &old, target, new_id, new_kek)
        }
    }

    /// Revokes a replaced KEK unless a registered namespace still references it.
    fn retire_kek(&self, who: &str, provider: &str, kek_id: &KekId) -> OldKekAction {
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

fn provider_fail(what: &str, e: ProviderError) -> Fail {
    if e.is_transient() {
        Fail::Transient(format!("{what}: {e}"))
    } else {
        Fail::Permanent(format!("{what}: {e}"))
    }
}

fn generated_kek_name() -> String {
    let id = Uuid::new_v4().simple().to_string();
    format!("nvseal-kek-{}-{}", unix_ms() / 1000, &id[..8])
}

/// Shallow rekey onto a KEK of another provider (change of KMS cluster): opens with the old
/// provider, builds the new slot with the new one, and writes it with the same three durable
/// steps as [`super::shallow_rekey`] ([`rekey::apply_new_slot`]), so a crash leaves a header
/// that opens with the old or the new provider's KEK; the manager's open path tries the pending
/// slot's provider when the active one fails. `keys::shallow_rekey` itself takes one provider
/// for both KEKs, hence this variant. Each provider's lock is held only for its own calls.
fn rekey_across(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::malloc::{self, MallocConfig};
    use crate::keys::header::{METADATA_REGION_BYTES, REKEY_AREA_OFFSET_BYTES};
    use crate::keys::header_io::BdevHeaderIo;
    use crate::types::CoreId;
    use std::path::Path;

    #[test]
    fn retry_delay_doubles_and_caps() {
        let r = RetryConfig {
            initial_ms: 1000,
            max_ms: 60_000,
        };
        let ms: Vec<u128> = (1..=9).map(|a| r.delay(a).as_millis()).collect();
        assert_eq!(
            ms,
            [1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000, 60_000]
        );
        assert_eq!(r.delay(u32::MAX).as_millis(), 60_000);
        assert!(RetryConfig {
            initial_ms: 0,
            max_ms: 1
        }
        .validate()
        .is_err());
        assert!(RetryConfig {
            initial_ms: 2,
            max_ms: 1
        }
        .validate()
        .is_err());
    }

    #[test]
    fn config_parses_with_defaults_and_rejects_unknown_fields() {
        let c: KeysConfig =
            serde_yaml_ng::from_str("local: {path: /tmp/k}\naudit_log: /tmp/a\n").expect("yaml");
        assert_eq!(c.unlock_retry, RetryConfig::default());
        assert!(!c.local.as_ref().expect("local").create);
        assert!(serde_yaml_ng::from_str::<KeysConfig>("locl: {path: /tmp/k}\n").is_err());
        assert!(
            serde_yaml_ng::from_str::<KeysConfig>("unlock_retry: {initial_ms: 5, max: 9}\n")
                .is_err()
        );
        let ns: NamespaceKeyConfig =
            serde_yaml_ng::from_str("provider: kms-a\nkek_name: vsan-kek\n").expect("yaml");
        assert_eq!(ns.kek_name.as_deref(), Some("vsan-kek"));
        assert!(serde_yaml_ng::from_str::<NamespaceKeyConfig>("provider: a\nkek: b\n").is_err());
    }

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29T12:34:56.789Z (a leap day) = 951827696789 ms.
        assert_eq!(rfc3339_utc(951_827_696_789), "2000-02-29T12:34:56.789Z");
        // 2026-11-28T00:00:00Z = 1795824000 s.
        assert_eq!(rfc3339_utc(1_795_824_000_000), "2026-11-28T00:00:00.000Z");
    }

    #[test]
    fn file_audit_sink_writes_one_json_line_per_event() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let sink = FileAuditSink::open(&path).expect("open");
        sink.record("uid:1000", "rekey", "ns1", "ok");
        sink.record("nvseal", "unlock", "ns\"2", "error: x");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["who"], "uid:1000");
        assert_eq!(lines[0]["op"], "rekey");
        assert_eq!(lines[1]["target"], "ns\"2");
        assert!(lines[1]["time"].as_str().expect("time").ends_with('Z'));
        assert!(lines[1]["unix_ms"].as_u64().expect("ms") > 0);
    }

    /// Keys config with only the local provider, its key file in `dir`.
    fn local_keys(dir: &Path) -> KeysConfig {
        KeysConfig {
            local: Some(LocalKeysConfig {
                path: dir.join("keys"),
                create: true,
            }),
            ..KeysConfig::default()
        }
    }

    fn malloc_dev(name: &str) -> Arc<dyn Bdev> {
        malloc::open(&MallocConfig {
            name: name.into(),
            num_blocks: None,
            size_bytes: Some(METADATA_REGION_BYTES + 64 * 4096),
            block_size: 4096,
            hugepages: false,
        })
        .expect("malloc")
    }

    /// A RAM disk with a data area of 2 MiB (twice the blank-check probe).
    fn malloc_dev_2m(name: &str) -> Arc<dyn Bdev> {
        malloc::open(&MallocConfig {
            name: name.into(),
            num_blocks: None,
            size_bytes: Some(METADATA_REGION_BYTES + 2 * FORMAT_DATA_PROBE_BYTES),
            block_size: 4096,
            hugepages: false,
        })
        .expect("malloc")
    }

    /// Raw access to the whole device (tests only; the manager's header I/O stops at 1 MiB).
    fn whole_dev(d: &Arc<dyn Bdev>) -> BdevHeaderIo {
        let bytes = d.num_blocks() * u64::from(d.block_size());
        BdevHeaderIo::new(d.clone(), CoreId(0), bytes).expect("whole-device io")
    }

    fn image(d: &Arc<dyn Bdev>) -> Vec<u8> {
        let mut v = vec![0u8; (d.num_blocks() * u64::from(d.block_size())) as usize];
        whole_dev(d).read_at(0, &mut v).expect("read image");
        v
    }

    /// Issue 11 item 3: `create` formats only a device whose whole start is blank. A blank
    /// header over data in the data area's first MiB, the journal area or the gaps beside the
    /// copies (a wiped header, most likely) sends the namespace to `error` with a message that
    /// names `nvseal format --force`, and not one byte of the device changes. A blank device, or
    /// one with data only past the probed MiB, formats. `format_device` refuses the same device
    /// without `force`, formats it with `force` (data area untouched, metadata region zeroed),
    /// and refuses a device that holds a header even with `force`.
    #[test]
    fn blank_header_over_data_is_refused_until_forced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m =
            KeyManager::new(&local_keys(dir.path()), ManagerOptions::default()).expect("manager");
        let key = NamespaceKeyConfig {
            provider: LOCAL_PROVIDER.into(),
            kek_name: None,
        };
        let hio = |d: &Arc<dyn Bdev>| -> Box<dyn HeaderIo + Send> {
            Box::new(BdevHeaderIo::new(d.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio"))
        };
        let data_off = METADATA_REGION_BYTES + 3 * 4096 + 17;
        let cases = [
            ("data", data_off, "the data area holds data"),
            (
                "data-end",
                METADATA_REGION_BYTES + FORMAT_DATA_PROBE_BYTES - 1,
                "the data area holds data",
            ),
            (
                "journal",
                0x20000 + 5,
                "the deep-rekey journal area holds data",
            ),
            ("gap", 0x1000 + 1, "beside the header copies"),
        ];
        let mut devs = BTreeMap::new();
        for (ns, off, what) in cases {
            let d = malloc_dev_2m(ns);
            whole_dev(&d).write_at(off, &[0xA5]).expect("plant");
            let before = image(&d);
            m.add_encrypted("test", ns, d.clone(), hio(&d), &key, true)
                .expect("add");
            let st = m
                .wait_for(ns, Duration::from_secs(30), |s| {
                    matches!(
                        s,
                        NamespaceKeyState::Error { .. } | NamespaceKeyState::Online
                    )
                })
                .expect("status");
            let NamespaceKeyState::Error { reason } = &st.state else {
                panic!("{ns}: formatted over data: {st:?}");
            };
            assert!(reason.contains(what), "{ns}: {reason}");
            assert!(
                reason.contains(&format!("device offset {off}")),
                "{ns}: {reason}"
            );
            assert!(
                reason.contains(&format!("nvseal format --force -c <config> --bdev {ns}")),
                "{ns}: {reason}"
            );
            assert!(image(&d) == before, "{ns}: the device was written");
            devs.insert(ns, d);
        }
        // Data only past the probed MiB, and a blank device: both format.
        let past = malloc_dev_2m("past");
        whole_dev(&past)
            .write_at(METADATA_REGION_BYTES + FORMAT_DATA_PROBE_BYTES, &[0xA5])
            .expect("plant");
        let blank = malloc_dev_2m("blank");
        for (ns, d) in [("past", &past), ("blank", &blank)] {
            m.add_encrypted("test", ns, d.clone(), hio(d), &key, true)
                .expect("add");
            let st = m
                .wait_for(ns, Duration::from_secs(30), |s| {
                    *s == NamespaceKeyState::Online
                })
                .expect("status");
            assert_eq!(st.state, NamespaceKeyState::Online, "{ns}: {st:?}");
        }
        // The offline tool: refused without force (nothing written), formats with it.
        for (ns, off, _) in cases {
            let d = &devs[ns];
            assert!(m.remove("test", ns));
            let before = image(d);
            let mut io =
                BdevHeaderIo::new(d.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio");
            match m.format_device("test", ns, d, &mut io, &key, false) {
                Err(FormatDeviceError::Refused(r)) => assert!(r.contains("--force"), "{r}"),
                other => panic!("{ns}: {other:?}"),
            }
            assert!(image(d) == before, "{ns}: refused format wrote");
            let report = m
                .format_device("test", ns, d, &mut io, &key, true)
                .expect("forced format");
            assert!(report.forced);
            assert_eq!(report.data_blocks, 2 * FORMAT_DATA_PROBE_BYTES / 4096);
            let after = image(d);
            let meta = METADATA_REGION_BYTES as usize;
            assert_eq!(
                after[meta..],
                before[meta..],
                "{ns}: the data area was written"
            );
            assert!(
                after[REKEY_AREA_OFFSET_BYTES as usize..meta]
                    .iter()
                    .all(|&b| b == 0),
                "{ns}: the journal area was not zeroed"
            );
            if off >= METADATA_REGION_BYTES {
                assert_eq!(after[off as usize], 0xA5);
            }
            // It opens, as the namespace's old data would not have.
            m.add_encrypted("test", ns, d.clone(), hio(d), &key, false)
                .expect("add");
            let st = m
                .wait_for(ns, Duration::from_secs(30), |s| {
                    *s == NamespaceKeyState::Online
                })
                .expect("status");
            assert_eq!(
                st.namespace_uuid.as_deref(),
                Some(report.namespace_uuid.as_str())
            );
            // A header, valid now, is never formatted over, force or not.
            let before = image(d);
            match m.format_device("test", ns, d, &mut io, &key, true) {
                Err(FormatDeviceError::Refused(r)) => {
                    assert!(r.contains("holds an nvseal header"), "{r}")
                }
                other => panic!("{ns}: {other:?}"),
            }
            assert!(image(d) == before, "{ns}: formatted over a header");
        }
    }

    /// Removing a namespace: the manager lets go of its crypto bdev (so of its DEK), forgets
    /// it, and a later rekey of the others does not revoke the KEK its header still names; it
    /// can be added again and unlocks with that KEK.
    #[test]
    fn removed_namespace_lets_go_of_its_key_and_keeps_its_kek() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = local_keys(dir.path());
        let (d1, d2) = (malloc_dev("m1"), malloc_dev("m2"));
        let key = NamespaceKeyConfig {
            provider: LOCAL_PROVIDER.into(),
            kek_name: None,
        };
        let hio = |d: &Arc<dyn Bdev>| -> Box<dyn HeaderIo + Send> {
            Box::new(BdevHeaderIo::new(d.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio"))
        };
        let m = KeyManager::new(&cfg, ManagerOptions::default()).expect("manager");
        let online = |m: &KeyManager, ns: &str| {
            let st = m
                .wait_for(ns, Duration::from_secs(30), |s| {
                    *s == NamespaceKeyState::Online
                })
                .expect("status");
            assert_eq!(st.state, NamespaceKeyState::Online, "{st:?}");
            st
        };
        for (ns, d) in [("ns1", &d1), ("ns2", &d2)] {
            m.add_encrypted("test", ns, d.clone(), hio(d), &key, true)
                .expect("add");
            online(&m, ns);
        }
        let weak = Arc::downgrade(&m.bdev("ns1").expect("bdev"));
        assert!(m.remove("op", "ns1"));
        assert!(!m.remove("op", "ns1"), "already gone");
        assert!(m.state("ns1").is_none());
        assert!(
            weak.upgrade().is_none(),
            "no reference to the crypto bdev (and its DEK) is left"
        );
        // Rekey what is left: ns2 moves to a new KEK; the old one stays, ns1's header needs it.
        let report = m
            .shallow_rekey("test", &RekeyScope::All, LOCAL_PROVIDER)
            .expect("rekey");
        assert_eq!(report.namespaces.len(), 1);
        assert_eq!(report.namespaces[0].result, NamespaceRekeyResult::Rekeyed);
        assert!(
            matches!(&report.old_keks[0].action, OldKekAction::Kept { used_by } if used_by[0].starts_with("ns1")),
            "{:?}",
            report.old_keks
        );
        // Back again: the header is read (not formatted over) and opens with the kept KEK.
        m.add_encrypted("test", "ns1", d1.clone(), hio(&d1), &key, true)
            .expect("add again");
        let st = online(&m, "ns1");
        assert_eq!(st.kek_id.as_ref().map(KekId::as_str), Some(DEFAULT_KEK_ID));
        assert_eq!(st.header_generation, Some(1));
        // Back, it names its KEK through its live entry: the retained reference is gone, so
        // once ns1 moves to a new KEK too, the old one is revoked.
        assert!(lock(&m.inner.retained).is_empty());
        let report = m
            .shallow_rekey(
                "test",
                &RekeyScope::Namespaces(vec!["ns1".into()]),
                LOCAL_PROVIDER,
            )
            .expect("rekey ns1");
        assert_eq!(report.namespaces[0].result, NamespaceRekeyResult::Rekeyed);
        assert_eq!(
            report.old_keks[0].action,
            OldKekAction::Revoked,
            "{report:?}"
        );
    }

    /// Local provider end to end on a RAM disk: format, online, restart, rekey, revoke.
    #[test]
    fn local_namespace_formats_unlocks_and_rekeys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = local_keys(dir.path());
        let dev = malloc_dev("m0");
        let online = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen = online.clone();
        let opts = ManagerOptions {
            on_online: Some(Arc::new(move |ns: &str, _b: Arc<dyn Bdev>| {
                lock(&seen).push(ns.to_owned())
            })),
            ..ManagerOptions::default()
        };
        let key = NamespaceKeyConfig {
            provider: LOCAL_PROVIDER.into(),
            kek_name: None,
        };
        let hio = || -> Box<dyn HeaderIo + Send> {
            Box::new(BdevHeaderIo::new(dev.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio"))
        };
        let m = KeyManager::new(&cfg, opts.clone()).expect("manager");
        m.add_encrypted("test", "ns1", dev.clone(), hio(), &key, true)
            .expect("add");
        let st = m
            .wait_for("ns1", Duration::from_secs(30), |s| {
                !matches!(
                    s,
                    NamespaceKeyState::Locked | NamespaceKeyState::Unlocking { .. }
                )
            })
            .expect("status");
        assert_eq!(st.state, NamespaceKeyState::Online, "{st:?}");
        assert_eq!(st.kek_id.as_ref().map(KekId::as_str), Some(DEFAULT_KEK_ID));
        assert_eq!(m.bdev("ns1").expect("bdev").num_blocks(), 64);
        assert_eq!(*lock(&online), ["ns1"]);
        assert!(matches!(
            m.add_encrypted("test", "ns1", dev.clone(), hio(), &key, true),
            Err(AddError::Duplicate(_))
        ));
        assert!(matches!(
            m.add_encrypted(
                "test",
                "ns2",
                dev.clone(),
                hio(),
                &NamespaceKeyConfig {
                    provider: "nope".into(),
                    kek_name: None
                },
                true
            ),
            Err(AddError::UnknownProvider { .. })
        ));

        let report = m
            .shallow_rekey("test", &RekeyScope::All, LOCAL_PROVIDER)
            .expect("rekey");
        assert_eq!(report.namespaces.len(), 1);
        assert_eq!(report.namespaces[0].result, NamespaceRekeyResult::Rekeyed);
        assert_eq!(
            report.old_keks,
            [OldKek {
                provider: LOCAL_PROVIDER.into(),
                kek_id: KekId::new(DEFAULT_KEK_ID).expect("id"),
                action: OldKekAction::Revoked
            }]
        );
        assert_eq!(
            m.state("ns1").expect("st").kek_id,
            Some(report.new_kek_id.clone())
        );
        drop(m);

        // Restart: the header names the new KEK; creating is a no-op on a formatted header.
        let m = KeyManager::new(&cfg, opts).expect("manager");
        m.add_encrypted("test", "ns1", dev.clone(), hio(), &key, true)
            .expect("add");
        let st = m
            .wait_for("ns1", Duration::from_secs(30), |s| {
                *s == NamespaceKeyState::Online
            })
            .expect("status");
        assert_eq!(st.state, NamespaceKeyState::Online);
        assert_eq!(st.kek_id, Some(report.new_kek_id));
        assert_eq!(st.header_generation, Some(4));
    }

    #[test]
    fn blank_device_without_create_is_an_error_and_stays_blank() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = local_keys(dir.path());
        let dev = malloc_dev("m1");
        let m = KeyManager::new(&cfg, ManagerOptions::default()).expect("manager");
        let hio = BdevHeaderIo::new(dev.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio");
        m.add_encrypted(
            "test",
            "ns",
            dev.clone(),
            Box::new(hio),
            &NamespaceKeyConfig {
                provider: LOCAL_PROVIDER.into(),
                kek_name: None,
            },
            false,
        )
        .expect("add");
        let st = m
            .wait_for("ns", Duration::from_secs(30), |s| {
                matches!(s, NamespaceKeyState::Error { .. })
            })
            .expect("status");
        match st.state {
            NamespaceKeyState::Error { reason } => assert!(reason.contains("blank"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(m.bdev("ns").is_none());
        let mut hio = BdevHeaderIo::new(dev, CoreId(0), METADATA_REGION_BYTES).expect("hio");
        let mut buf = vec![1u8; 128 * 1024];
        hio.read_at(0, &mut buf).expect("read");
        assert!(buf.iter().all(|&b| b == 0));
    }

    fn fail_text(f: Fail) -> String {
        match f {
            Fail::Transient(t) => format!("transient: {t}"),
            Fail::Permanent(t) => format!("permanent: {t}"),
        }
    }

    fn local_slot(dir: &Path, file: &str, alias: &str) -> Arc<ProviderSlot> {
        let mut p =
            LocalKeyProvider::open(dir.join(file), CreateMode::CreateIfMissing).expect("provider");
        if alias != p.cluster_alias() {
            p = p.with_alias(alias).expect("alias");
        }
        Arc::new(ProviderSlot {
            name: alias.to_owned(),
            kind: ProviderKind::Local,
            alias: alias.to_owned(),
            inner: Mutex::new(ManagedProvider::Local(p)),
            cluster: None,
            current_kek: Mutex::new(None),
        })
    }

    fn inner_with(slots: &[Arc<ProviderSlot>]) -> Inner {
        Inner {
            providers: slots.iter().map(|s| (s.name.clone(), s.clone())).collect(),
            namespaces: Mutex::new(BTreeMap::new()),
            changed: Condvar::new(),
            retry: RetryConfig::default(),
            audit: None,
            on_online: None,
            xts_max_tier: None,
            rekey_lock: Mutex::new(()),
            retained: Mutex::new(Vec::new()),
        }
    }

    /// A change of provider interrupted at every write and flush (unflushed writes lost or
    /// kept, each write torn) leaves a header the manager opens — with the old provider's KEK
    /// or the new one's — to the same DEK; with the old KEK gone, the pending slot opens it.
    #[test]
    fn rekey_across_providers_survives_a_crash_at_every_point() {
        use crate::keys::store::{CrashMode, Fault, MemIo};
        use crate::keys::SlotUsed;
        const DEV: usize = METADATA_REGION_BYTES as usize + 16 * 4096;
        let dir = tempfile::tempdir().expect("tempdir");
        let a = local_slot(dir.path(), "a.keys", "local");
        let b = local_slot(dir.path(), "b.keys", "lab-b");
        let inner = inner_with(&[a.clone(), b.clone()]);
        let mut io0 = MemIo::new(DEV);
        let params = FormatParams::new(
            Uuid::new_v4(),
            DataUnit::Bytes4096,
            DEV as u64,
            KekId::new(DEFAULT_KEK_ID).expect("id"),
        );
        let f = format_encrypted(&mut io0, lock(&a.inner).as_dyn(), &params).expect("format");
        let dek = *f.dek.expose();
        let (new_id, new_kek) = lock(&b.inner).as_dyn().create_kek("moved").expect("kek");

        let mut clean = io0.clone();
        let start = clean.ops_total();
        let done = rekey_across(&mut clean, &a, &b, &new_id, &new_kek).expect("rekey");
        assert_eq!(done.header.active.kms_alias, "lab-b");
        assert_eq!(done.header.rekey, RekeyState::None);
        let total = clean.ops_total() - start;
        assert_eq!(total, 6, "three header updates, each a write and a flush");

        let mut faults: Vec<Fault> = (0..=total)
            .map(|ops| Fault::PowerLossAfter { ops })
            .collect();
        faults.extend((0..3).map(|nth| Fault::TearWrite { nth }));
        let mut saw_pending = false;
        for fault in faults {
            for mode in [CrashMode::DropUnflushed, CrashMode::KeepUnflushed] {
                let mut io = io0.clone();
                io.arm(fault);
                let _ = rekey_across(&mut io, &a, &b, &new_id, &new_kek);
                io.crash(mode);
                let stored = store::read_header(&mut io).expect("a header copy survives");
                saw_pending |= matches!(stored.header.rekey, RekeyState::Shallow { .. });
                let o = inner
                    .open_stored(&mut io, &stored)
                    .map_err(fail_text)
                    .unwrap_or_else(|e| panic!("{fault:?} {mode:?}: {e}"));
                assert_eq!(o.dek.expose(), &dek, "{fault:?} {mode:?}");
            }
        }
        assert!(saw_pending, "some crash point left the rekey in progress");

        // Crash right after step 1 is durable, then the old KEK is revoked at provider A: the
        // pending slot at provider B still opens the namespace.
        let mut io = io0.clone();
        io.arm(Fault::PowerLossAfter { ops: 2 });
        assert!(rekey_across(&mut io, &a, &b, &new_id, &new_kek).is_err());
        io.crash(CrashMode::DropUnflushed);
        lock(&a.inner)
            .as_dyn()
            .revoke_kek(&KekId::new(DEFAULT_KEK_ID).expect("id"))
            .expect("revoke");
        let stored = store::read_header(&mut io).expect("header");
        let o = inner
            .open_stored(&mut io, &stored)
            .map_err(fail_text)
            .expect("opens via the pending slot");
        assert_eq!(o.slot, SlotUsed::Pending);
        assert_eq!(o.dek.expose(), &dek);
    }

    #[test]
    fn fingerprint_mismatch_is_a_permanent_error_and_nothing_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = malloc_dev("m2");
        let key = NamespaceKeyConfig {
            provider: LOCAL_PROVIDER.into(),
            kek_name: None,
        };
        let cfg = |file: &str| KeysConfig {
            local: Some(LocalKeysConfig {
                path: dir.path().join(file),
                create: true,
            }),
            ..KeysConfig::default()
        };
        let hio = || {
            Box::new(BdevHeaderIo::new(dev.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio"))
        };
        {
            let m = KeyManager::new(&cfg("a.keys"), ManagerOptions::default()).expect("manager");
            m.add_encrypted("test", "ns", dev.clone(), hio(), &key, true)
                .expect("add");
            let st = m
                .wait_for("ns", Duration::from_secs(30), |s| {
                    *s == NamespaceKeyState::Online
                })
                .expect("status");
            assert_eq!(st.state, NamespaceKeyState::Online);
        }
        let mut before = vec![0u8; METADATA_REGION_BYTES as usize];
        hio().read_at(0, &mut before).expect("read");
        // Another key file: its KEK "default" is a different key.
        let m = KeyManager::new(&cfg("b.keys"), ManagerOptions::default()).expect("manager");
        m.add_encrypted("test", "ns", dev.clone(), hio(), &key, true)
            .expect("add");
        let st = m
            .wait_for("ns", Duration::from_secs(30), |s| {
                matches!(s, NamespaceKeyState::Error { .. })
            })
            .expect("status");
        match &st.state {
            NamespaceKeyState::Error { reason } => {
                assert!(
                    reason.contains("does not match the fingerprint"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        drop(m);
        let mut after = vec![0u8; METADATA_REGION_BYTES as usize];
        hio().read_at(0, &mut after).expect("read");
        assert!(before == after, "header region changed");
    }
}
