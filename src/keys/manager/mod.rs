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
//!
//! Files: this one holds the API ([`KeyManager`]), the public state/report/error types, the
//! namespace state table and the shared internals; `config` the `keys:` configuration types,
//! `audit_log` the file audit sink, `format` the format and blank-check path, `unlock` the
//! per-namespace unlock worker and its back-off, `rekey` the shallow rekey orchestration
//! (also across providers), and `tests` the unit tests.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use uuid::Uuid;

use super::header::{DataUnit, KeySlot, RekeyState};
use super::kmip_provider::KmipKeyProvider;
use super::local::{CreateMode, LocalKeyProvider};
use super::provider::{KekId, KeyProvider, ProviderKind};
use super::store::{HeaderIo, Stored};
use crate::bdev::Bdev;
use crate::crypto::bdev::CryptoBdev;
use crate::crypto::xts::Tier;
use crate::kms::KmsCluster;

mod audit_log;
mod config;
mod deep;
mod encdec;
mod erase;
mod format;
mod rekey;
mod retry;
#[cfg(test)]
mod tests;
mod types;
mod unlock;

use audit_log::unix_ms;
pub use audit_log::FileAuditSink;
pub use config::{KeysConfig, LocalKeysConfig, NamespaceKeyConfig, RetryConfig, LOCAL_PROVIDER};
pub use deep::{DeepRekeyError, DeepRekeyStatus, DeepState, PassOp, MAX_RATE_MIB_S};
pub use erase::{CryptoEraseError, CryptoEraseReport, ERASE_QUIESCE_TIMEOUT};
pub use rekey::RevokeKekError;
pub use retry::{RetryUnlock, RetryUnlockError};

// ---------------------------------------------------------------------------------------------
// Audit
// ---------------------------------------------------------------------------------------------

/// The one audit trait of the process (shared with the RPC layer). The key manager records one
/// event per crypto operation: `who` is the caller identity (the RPC layer passes the peer's
/// uid/gid/pid; the boot path passes `"nvseal"`), `op` one of `format`, `unlock`, `kek-create`,
/// `rekey`, `revoke`, `target` a namespace id or `provider/kek-id`, `result` `ok` or
/// `error: <reason>`. Called on control threads; implementations must not panic.
pub use crate::audit::AuditSink;

pub use types::*;

// ---------------------------------------------------------------------------------------------
// Internals
// ---------------------------------------------------------------------------------------------

/// Called once per namespace when it comes online, on its unlock thread.
pub type OnOnline = Arc<dyn Fn(&str, Arc<dyn Bdev>) + Send + Sync>;

/// Opens the data I/O of a deep-rekey pass over a namespace's data area (the server passes one
/// that runs it on a reactor: [`crate::keys::deep::ReactorDataIo`]); called on the pass thread.
pub type PassIoFactory = Arc<
    dyn Fn(&str, Arc<dyn Bdev>) -> std::io::Result<Box<dyn crate::keys::convert::DataIo + Send>>
        + Send
        + Sync,
>;

/// Options of [`KeyManager::new`] that are not configuration.
#[derive(Clone, Default)]
pub struct ManagerOptions {
    /// The data I/O of deep-rekey passes; None: a private channel polled on the pass thread
    /// (tests and tools without reactors).
    pub pass_io: Option<PassIoFactory>,
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
    /// With no header, serve plaintext (config `plaintext: true`).
    plaintext_ok: bool,
    /// Detached header file (config `header_file`).
    header_file: Option<PathBuf>,
    /// What the data area holds, per the header last read or written.
    data_state: Option<DataState>,
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
    /// The crypto bdev once online (its key control runs deep rekeys and crypto erases).
    crypto: Option<Arc<CryptoBdev>>,
    /// Its deep rekey, if one ran or runs since the namespace was registered.
    deep: Option<deep::DeepRun>,
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
    pass_io: Option<PassIoFactory>,
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
                pass_io: options.pass_io,
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
        let opts = NamespaceOptions {
            create,
            ..NamespaceOptions::default()
        };
        self.add_namespace(who, ns_id, backing, header_io, key, &opts)
    }

    /// [`KeyManager::add_encrypted`] with every option: a namespace that may be served as
    /// plaintext until `namespace.encrypt`, and a detached header file. With `header_file`,
    /// `header_io` is not used (the file is opened, checked against the namespace's name and the
    /// device's size, at each unlock attempt and by `namespace.encrypt`).
    pub fn add_namespace(
        &self,
        who: &str,
        ns_id: &str,
        backing: Arc<dyn Bdev>,
        header_io: Box<dyn HeaderIo + Send>,
        key: &NamespaceKeyConfig,
        opts: &NamespaceOptions,
    ) -> Result<(), AddError> {
        let create = opts.create;
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
                    plaintext_ok: opts.plaintext,
                    header_file: opts.header_file.clone(),
                    data_state: None,
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
                    crypto: None,
                    deep: None,
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

    /// Forgets an encrypted namespace whose export was deleted: stops its unlock thread (a
    /// key that arrives afterwards is dropped, never brought online) and drops the manager's
    /// reference to its crypto bdev, so its DEK is wiped from memory once the target's channels
    /// are closed. The header on disk is left alone, and the KEKs it names are kept from
    /// revocation by later rekeys (the data still needs them), so the namespace can be added
    /// again. Waits for a rekey in progress. Returns false if `ns_id` is not registered.
    pub fn remove(&self, who: &str, ns_id: &str) -> bool {
        // A deep rekey pass stops between segments first (its header then holds a clean
        // watermark; the next add resumes it).
        self.inner.stop_pass(Some(ns_id));
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
            .and_then(|e| e.crypto.clone())
            .map(|c| c as Arc<dyn Bdev>)
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
    /// flowing). Replaced KEKs are kept (see [`Self::shallow_rekey_with`] to revoke them).
    /// The scope is checked first (unknown namespaces, an empty list, nothing online: refused
    /// before any KEK is created).
    /// A `target` other than a namespace's current provider is a change of KMS cluster.
    pub fn shallow_rekey(
        &self,
        who: &str,
        scope: &RekeyScope,
        target: &str,
    ) -> Result<RekeyReport, RekeyRequestError> {
        self.inner.shallow_rekey(who, scope, target, false)
    }

    /// [`Self::shallow_rekey`], and with `revoke_old` also revokes each replaced KEK that
    /// nothing this target knows of references (see [`Self::revoke_kek`]).
    pub fn shallow_rekey_with(
        &self,
        who: &str,
        scope: &RekeyScope,
        target: &str,
        revoke_old: bool,
    ) -> Result<RekeyReport, RekeyRequestError> {
        self.inner.shallow_rekey(who, scope, target, revoke_old)
    }
}

impl Drop for KeyManager {
    fn drop(&mut self) {
        self.inner.stop_pass(None);
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
        deep_rekey: e
            .deep
            .as_ref()
            .filter(|d| d.op == PassOp::DeepRekey)
            .map(|d| d.status(ns_id)),
        data_state: e.data_state,
        conversion: e
            .deep
            .as_ref()
            .filter(|d| d.op != PassOp::DeepRekey)
            .map(|d| d.status(ns_id)),
        header_file: e.header_file.as_ref().map(|p| p.display().to_string()),
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
            RekeyState::Deep(d) => Some(self.slot_ref(&d.new)),
            RekeyState::None | RekeyState::Convert(_) => None,
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
            e.data_state = Some(match &stored.header.rekey {
                RekeyState::Convert(_) => DataState::Converting,
                _ => DataState::Encrypted,
            });
        }
    }

    /// Records a plaintext namespace: its retired header (identity, generation), or none.
    fn note_plain(&self, ns_id: &str, header: Option<&super::header::PlainHeader>) {
        let mut table = lock(&self.namespaces);
        if let Some(e) = table.get_mut(ns_id) {
            lock(&self.retained).retain(|(_, ns)| ns != ns_id);
            e.active = None;
            e.pending = None;
            e.namespace_uuid = header.map(|h| h.namespace_uuid);
            e.generation = header.map(|h| h.generation);
            e.header_warning = None;
            e.data_state = Some(DataState::Plaintext);
        }
    }
}

fn generated_kek_name() -> String {
    let id = Uuid::new_v4().simple().to_string();
    format!("nvseal-kek-{}-{}", unix_ms() / 1000, &id[..8])
}
