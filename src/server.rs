//! The running target (`nvseal serve`): reactors, bdev stacks, the NVMe/TCP target, the key
//! manager and the control socket, put together from one [`Config`].
//!
//! Threads: [`Server::start`] runs on the main (control) thread. Reactors run the NVMe/TCP
//! listener (reactor 0 accepts and places each new connection on a reactor, round robin) and the
//! connections, each owned by one reactor for its whole life. The key manager unlocks encrypted
//! namespaces on its own control threads and, when a key arrives, binds the namespace's crypto
//! bdev and brings the namespace online; until then the namespace is exported offline (locked).
//! The RPC server has its own accept thread and one thread per client.
//!
//! Namespaces can also be created and deleted at run time over the control socket
//! (`namespace.create`, `namespace.delete`): the RPC client thread builds the bdev stack, adds
//! it to the target (connections pick it up on their own reactors, see `nvmf::target`), and for
//! a managed-key namespace registers it with the key manager, which brings it online when its
//! key arrives. What such a stack may use is bounded by `rpc.namespaces` (backing paths from an
//! allow-list, RAM budgets; see `stack::Stacks::open_rpc`), and every call, allowed or
//! refused, is in the audit trail.

use crate::audit::{AuditSink, JsonlAuditSink};
use crate::bdev::late::LateBdev;
use crate::bdev::uring::BackingId;
use crate::bdev::Bdev;
use crate::config::{BdevConfig, Config, EncryptedBdevConfig};
use crate::keys::header::METADATA_REGION_BYTES;
use crate::keys::manager::{KeyManager, ManagerOptions, NamespaceKeyConfig};
use crate::nvmf::conn::{ConnError, Connection};
use crate::nvmf::poll_group::{GroupStats, PollGroup};
use crate::nvmf::target::{Listener, PortId, Target};
use crate::reactor::{busy_pct, Mailboxes, Poller, PollerId, ReactorSet};
use crate::rpc::config::NamespacePolicy;
use crate::rpc::{parse_params, Role, RpcError, RpcHandle, RpcServer};
use crate::stack::{RpcLimits, Stacks};
use crate::stats::reactor as ns_stats;
use crate::types::CoreId;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

mod erase;
mod keys_rpc;
mod namespaces;
mod rekey_rpc;
use namespaces::register_encrypted;

/// File descriptors `nvseal serve` keeps open beyond sockets and bdevs: stdio, the control
/// socket and its clients, audit and log files, reactor wakeups, KMS TLS connections, io_uring
/// instances. Generous on purpose: running out of descriptors fails accepts and opens at random.
pub const FD_RESERVE: u64 = 256;

/// File descriptors `cfg` can need at once: every socket the target admits (connected and
/// pre-Connect), each listener, each bdev (a backing file or device, plus one io_uring per
/// reactor), and [`FD_RESERVE`]. `nvseal serve` refuses to start below it.
pub fn fds_needed(cfg: &Config) -> u64 {
    let reactors = cfg
        .reactor
        .cores
        .placement()
        .and_then(|p| p.resolve(&crate::sys::affinity::allowed_cpus()))
        .map_or(1, |c| c.len());
    let l = &cfg.nvmf;
    let sockets = (l.max_connections as u64).saturating_add(l.max_pre_connect as u64);
    let listeners = cfg
        .subsystems
        .iter()
        .flat_map(|s| s.listen.iter().map(|a| (a.addr.as_str(), a.port)))
        .collect::<BTreeSet<_>>()
        .len() as u64;
    let bdevs = (cfg.bdevs.len() as u64).saturating_mul(1 + reactors as u64);
    sockets
        .saturating_add(listeners)
        .saturating_add(bdevs)
        .saturating_add(FD_RESERVE)
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The config fails [`Config::preflight`] (callers normally run it first, for exit 2).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("reactor.cores: {0}")]
    Cores(String),
    #[error(transparent)]
    Reactor(#[from] crate::reactor::ReactorError),
    #[error(transparent)]
    Stack(#[from] crate::stack::StackError),
    #[error("nvmf: {0}")]
    Target(String),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("keys: {0}")]
    Keys(String),
    #[error("rpc: {0}")]
    Rpc(String),
}

/// Accepts NVMe/TCP connections on reactor 0 and places them on reactors round robin, into
/// each reactor's poll group; each connection carries the target port of the listener that
/// accepted it.
struct AcceptPoller {
    listeners: Vec<(Listener, PortId)>,
    target: Arc<Target>,
    mailboxes: Mailboxes,
    /// The poll group poller of each reactor (index = reactor index).
    groups: Arc<Vec<PollerId>>,
    next: usize,
}

impl Poller for AcceptPoller {
    fn name(&self) -> &str {
        "nvmf-accept"
    }
    fn poll(&mut self) -> usize {
        let mut n = 0;
        for (l, port) in self.listeners.iter_mut() {
            let port = *port;
            while let Some(stream) = l.poll_accept() {
                n += 1;
                let idx = self.next % self.mailboxes.len();
                self.next = self.next.wrapping_add(1);
                let target = self.target.clone();
                let peer = stream.peer_addr().ok();
                let group = self.groups.get(idx).copied();
                let msg: crate::reactor::Msg =
                    Box::new(
                        move |r| match Connection::new(stream, target, r.core(), port) {
                            Ok(c) => {
                                let Some(g) = group.and_then(|g| r.poller_as::<PollGroup>(g))
                                else {
                                    tracing::error!(
                                        ?peer,
                                        reactor = r.index(),
                                        "no poll group on this reactor; connection dropped"
                                    );
                                    return;
                                };
                                match g.add(c) {
                                    Ok(()) => tracing::debug!(
                                        ?peer,
                                        reactor = r.index(),
                                        "connection placed"
                                    ),
                                    Err(e) => tracing::warn!(
                                        ?peer,
                                        "connection refused: cannot watch its socket: {e}"
                                    ),
                                }
                            }
                            // Slot refusals are logged (rate-limited) by `Connection::new`.
                            Err(e @ ConnError::Refused(_)) => tracing::debug!(?peer, "{e}"),
                            Err(e) => tracing::warn!(?peer, "connection refused: {e}"),
                        },
                    );
                if let Err(e) = self.mailboxes.send(idx, msg) {
                    tracing::warn!(?peer, "cannot place connection on reactor {idx}: {e}");
                }
            }
        }
        n
    }
}

/// Logs a warning for every encrypted namespace of a subsystem that admits any host: any
/// initiator that reaches one of its listeners reads the plaintext, which defeats most of the
/// point of encrypting it. A namespace counts as encrypted if its bdev is a crypto or encrypted
/// bdev (a label cannot say otherwise: config validation refuses one that disagrees).
fn warn_open_encrypted(cfg: &Config) {
    for s in cfg.subsystems.iter().filter(|s| s.allow_any_host) {
        for n in &s.namespaces {
            let crypto = matches!(
                cfg.bdev(&n.bdev),
                Some(BdevConfig::Crypto(_) | BdevConfig::Encrypted(_))
            );
            if crypto {
                tracing::warn!(
                    nqn = %s.nqn,
                    nsid = n.nsid,
                    bdev = %n.bdev,
                    "encrypted namespace exported to any host (allow_any_host: true): every initiator that reaches a listener of the subsystem reads its plaintext; list the hosts in allowed_hosts instead"
                );
            }
        }
    }
}

/// Which (subsystem, nsid) pairs export a bdev.
fn exports_of(cfg: &Config, bdev: &str) -> Vec<(String, u32)> {
    cfg.subsystems
        .iter()
        .flat_map(|s| {
            s.namespaces
                .iter()
                .filter(|n| n.bdev == bdev)
                .map(move |n| (s.nqn.clone(), n.nsid))
        })
        .collect()
}

/// Managed-key namespaces the key manager brings online: bdev name → the stand-in it binds
/// and the (subsystem, nsid) pairs exporting it. Control threads only.
type LateMap = BTreeMap<String, (Arc<LateBdev>, Vec<(String, u32)>)>;

/// A namespace created over the control socket.
struct DynNamespace {
    /// Its bdevs (kept open while it exists).
    stacks: Stacks,
    /// Names of its bdevs.
    names: Vec<String>,
    /// Whether a key is involved (crypto or managed-key encrypted).
    encrypted: bool,
}

/// Run-time namespace state shared by the `namespace.*` handlers (control path only).
struct Dynamic {
    target: Arc<Target>,
    keys: Option<Arc<KeyManager>>,
    /// The server's config: `crypto` and the KMS settings new bdev stacks are built with.
    template: Config,
    /// Every bdev name in use (config and run time): a new bdev may not reuse one.
    names: Mutex<BTreeSet<String>>,
    created: Mutex<BTreeMap<(String, u32), DynNamespace>>,
    late: Arc<Mutex<LateMap>>,
    /// Serializes namespace.create / namespace.delete.
    change: Mutex<()>,
    /// Where namespace changes are recorded (the dispatcher writes one record per call); the
    /// handlers refuse to change anything without one.
    audit: Option<Arc<dyn AuditSink>>,
    /// `rpc.namespaces`: what a run-time stack may use.
    policy: NamespacePolicy,
    /// Files and devices under the config's encrypted bdevs.
    config_encrypted_bases: Vec<(BackingId, String)>,
    /// RAM disks of run-time namespaces, alive until the last reference (a draining I/O queue
    /// may hold one after its namespace is deleted): (bdev, regular bytes, hugepage bytes).
    ram: Mutex<Vec<RamHold>>,
}

/// A run-time RAM disk and the (regular, hugepage) bytes it holds while it lives.
type RamHold = (std::sync::Weak<dyn Bdev>, u64, u64);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long `namespace.delete` waits, by default, for I/O in flight to the namespace.
const DEFAULT_DRAIN_MS: u64 = 5000;

/// A running target.
pub struct Server {
    reactors: Option<ReactorSet>,
    /// Counters of each reactor's NVMe/TCP poll group (index = reactor index).
    group_stats: Vec<Arc<GroupStats>>,
    target: Arc<Target>,
    keys: Option<Arc<KeyManager>>,
    rpc: Option<RpcHandle>,
    listen_addrs: Vec<SocketAddr>,
    dynamic: Arc<Dynamic>,
    stacks: Stacks,
}

impl Server {
    /// Starts everything `cfg` describes. Encrypted namespaces start locked (offline) and come
    /// online on their own as their keys arrive.
    pub fn start(cfg: &Config) -> Result<Server, ServerError> {
        // Everything a config can be refused for is refused here, before a RAM disk is
        // allocated, a file created or a port bound (`nvseal serve` has run it already).
        cfg.preflight()?;
        let allowed = crate::sys::affinity::allowed_cpus();
        let cores = cfg
            .reactor
            .cores
            .placement()
            .and_then(|p| p.resolve(&allowed))
            .map_err(ServerError::Cores)?;
        let stacks = Stacks::open(cfg)?;
        let bdevs: HashMap<String, Arc<dyn Bdev>> = stacks
            .bdevs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let target = Target::new(&cfg.subsystems, cfg.nvmf, &bdevs)
            .map_err(|e| ServerError::Target(e.to_string()))?;
        for name in stacks.encrypted.keys() {
            for (nqn, nsid) in exports_of(cfg, name) {
                target
                    .set_namespace_online(&nqn, nsid, false)
                    .map_err(|e| ServerError::Target(e.to_string()))?;
            }
        }
        let set = ReactorSet::start(&cores, &cfg.reactor.options())?;
        // One NVMe/TCP poll group per reactor: it owns the connections placed there.
        let mut groups = Vec::with_capacity(set.len());
        let mut group_stats = Vec::with_capacity(set.len());
        let channel_depth = cfg.nvmf.reactor_channel_depth as usize;
        // Each reactor's shared data-buffer pool grows up to its share of the budget.
        let buf_share = (u64::from(cfg.nvmf.buffer_budget_mib) << 20) / set.len().max(1) as u64;
        let max_io = cfg.nvmf.max_io_size;
        for i in 0..set.len() {
            let stats = Arc::new(GroupStats::default());
            let st = stats.clone();
            let id = set.call(i, move |r| -> Result<PollerId, String> {
                let mut g = PollGroup::new(r.core(), channel_depth, st)
                    .map_err(|e| format!("epoll: {e}"))?;
                g.set_buffer_cap(buf_share, max_io);
                Ok(r.add_poller(Box::new(g)))
            })?;
            groups.push(id.map_err(|what| ServerError::Target(format!("reactor {i}: {what}")))?);
            group_stats.push(stats);
        }
        let groups = Arc::new(groups);

        warn_open_encrypted(cfg);

        // One listener per target port (each distinct listen address once) on reactor 0.
        let mut listeners = Vec::new();
        let mut listen_addrs = Vec::new();
        for (port, a) in target.ports() {
            let mut l =
                Listener::bind(a).map_err(|source| ServerError::Listen { addr: a, source })?;
            l.set_keepalive(cfg.nvmf.tcp_keepalive());
            let bound = l.local_addr().unwrap_or(a);
            listen_addrs.push(bound);
            target.set_bound_port(a, bound.port());
            let serves: Vec<&str> = target
                .subsystems()
                .iter()
                .filter(|s| s.ports().contains(&port))
                .map(|s| s.nqn.as_str())
                .collect();
            tracing::info!(addr = %bound, %port, subsystems = ?serves, "NVMe/TCP listening");
            listeners.push((l, port));
        }
        if !listeners.is_empty() {
            let t = target.clone();
            set.call(0, move |r| {
                let mailboxes = r.mailboxes();
                r.add_poller(Box::new(AcceptPoller {
                    listeners,
                    target: t,
                    mailboxes,
                    groups,
                    next: 0,
                }));
            })?;
        }

        // Audit sink shared by the key manager and the control socket.
        let audit_path = cfg
            .keys
            .as_ref()
            .and_then(|k| k.audit_log.clone())
            .or_else(|| cfg.rpc.as_ref().and_then(|r| r.audit_log.clone()));
        let audit: Option<Arc<dyn AuditSink>> = match &audit_path {
            Some(p) => Some(Arc::new(JsonlAuditSink::open(p).map_err(|e| {
                ServerError::Keys(format!("audit log {}: {e}", p.display()))
            })?)),
            None => None,
        };

        // Key manager: encrypted namespaces (configured, or created later over the control
        // socket when a keys: section exists).
        let late_map: Arc<Mutex<LateMap>> = Arc::new(Mutex::new(
            stacks
                .encrypted
                .iter()
                .map(|(k, (l, _))| (k.clone(), (l.clone(), exports_of(cfg, k))))
                .collect(),
        ));
        let keys = if stacks.encrypted.is_empty() && cfg.keys.is_none() {
            None
        } else {
            let kc = cfg
                .keys
                .clone()
                .ok_or_else(|| ServerError::Keys("encrypted bdevs need a keys: section".into()))?;
            if let Some(local) = kc.local.as_ref().filter(|l| l.create) {
                if let Some(dir) = local
                    .path
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty() && !d.exists())
                {
                    use std::os::unix::fs::DirBuilderExt;
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(dir)
                        .map_err(|e| {
                            ServerError::Keys(format!("creating {}: {e}", dir.display()))
                        })?;
                }
            }
            let t = target.clone();
            let late = late_map.clone();
            let on_online: crate::keys::manager::OnOnline =
                Arc::new(move |ns_id: &str, bdev: Arc<dyn Bdev>| {
                    let Some((l, exports)) = lock(&late).get(ns_id).cloned() else {
                        return;
                    };
                    let bdev_encrypts = bdev.encrypts_data();
                    if !l.is_bound() {
                        if let Err(e) = l.bind(bdev) {
                            tracing::error!(bdev = ns_id, "cannot bring the namespace online: {e}");
                            return;
                        }
                    }
                    for (nqn, nsid) in &exports {
                        if let Err(e) = t.set_namespace_online(nqn, *nsid, true) {
                            tracing::error!(bdev = ns_id, nqn, nsid, "{e}");
                        }
                    }
                    if bdev_encrypts {
                        tracing::info!(bdev = ns_id, "encrypted namespace online");
                    } else {
                        // A managed namespace served in the clear (`plaintext: true`, or
                        // decrypted): never logged as encrypted.
                        tracing::info!(bdev = ns_id, "plaintext managed namespace online");
                    }
                });
            let max_tier = cfg.crypto.max_tier.as_deref().and_then(|t| t.parse().ok());
            // A deep-rekey pass does its data I/O on a reactor (the one a stable hash of the
            // namespace picks), through that reactor's own channel of the base bdev.
            let mailboxes = set.call(0, |r| r.mailboxes())?;
            let reactor_cores: Vec<CoreId> = (0..set.len()).map(|i| set.core(i)).collect();
            let pinned = cfg.reactor.options().pin;
            let pass_io: crate::keys::manager::PassIoFactory =
                Arc::new(move |ns_id: &str, base: Arc<dyn Bdev>| {
                    // This runs on the pass's control thread: keep it off the pinned reactors'
                    // CPUs, so it never takes turns with a poll loop.
                    if pinned {
                        if let Err(e) = crate::sys::affinity::avoid_cores(&reactor_cores) {
                            tracing::debug!(error = %e, "pass thread: CPU affinity unchanged");
                        }
                    }
                    let n = mailboxes.len().max(1);
                    let idx = ns_id.bytes().fold(0usize, |h, b| {
                        h.wrapping_mul(31).wrapping_add(usize::from(b))
                    }) % n;
                    let io = crate::keys::deep::ReactorDataIo::new(mailboxes.clone(), idx, base)?;
                    Ok(Box::new(io) as Box<dyn crate::keys::convert::DataIo + Send>)
                });
            let km = KeyManager::new(
                &kc,
                ManagerOptions {
                    on_online: Some(on_online),
                    audit: audit.clone(),
                    xts_max_tier: max_tier,
                    pass_io: Some(pass_io),
                },
            )
            .map_err(|e| ServerError::Keys(e.to_string()))?;
            for (name, (_, ec)) in &stacks.encrypted {
                register_encrypted(&km, "nvseal", &stacks, name, ec).map_err(ServerError::Keys)?;
            }
            let km = Arc::new(km);
            // Format NVM / Sanitize crypto erase from hosts go through the key manager.
            target
                .erase()
                .install(Arc::new(erase::KeyEraser(km.clone())))
                .map_err(|e| ServerError::Keys(format!("starting the crypto erase thread: {e}")))?;
            Some(km)
        };

        let dynamic = Arc::new(Dynamic {
            target: target.clone(),
            keys: keys.clone(),
            template: cfg.clone(),
            names: Mutex::new(stacks.bdevs.keys().cloned().collect()),
            created: Mutex::new(BTreeMap::new()),
            late: late_map,
            change: Mutex::new(()),
            audit: audit.clone(),
            policy: cfg
                .rpc
                .as_ref()
                .map(|r| r.namespaces.clone())
                .unwrap_or_default(),
            config_encrypted_bases: stacks.encrypted_bases(),
            ram: Mutex::new(Vec::new()),
        });
        let mut server = Server {
            reactors: Some(set),
            group_stats,
            target,
            keys,
            rpc: None,
            listen_addrs,
            dynamic,
            stacks,
        };
        if let Some(rc) = &cfg.rpc {
            server.rpc = Some(server.start_rpc(rc.clone(), audit)?);
        }
        Ok(server)
    }

    /// Addresses the NVMe/TCP listeners are bound to (ports resolved when 0 was asked).
    pub fn listen_addrs(&self) -> &[SocketAddr] {
        &self.listen_addrs
    }
    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }
    pub fn key_manager(&self) -> Option<&Arc<KeyManager>> {
        self.keys.as_ref()
    }
    pub fn rpc_socket(&self) -> Option<&std::path::Path> {
        self.rpc.as_ref().map(|h| h.socket_path())
    }

    fn start_rpc(
        &self,
        rc: crate::rpc::config::RpcConfig,
        audit: Option<Arc<dyn AuditSink>>,
    ) -> Result<RpcHandle, ServerError> {
        let t = self.target.clone();
        let t2 = self.target.clone();
        let k1 = self.keys.clone();
        let k2 = self.keys.clone();
        let k3 = self.keys.clone();
        let k4 = self.keys.clone();
        let d1 = self.dynamic.clone();
        let d2 = self.dynamic.clone();
        let spdk = self.stacks.spdk.clone();
        let reactors = self
            .reactors
            .as_ref()
            .map(|s| (0..s.len()).map(|i| s.counters(i)).collect::<Vec<_>>())
            .unwrap_or_default();
        let group_stats = self.group_stats.clone();
        // Per-namespace I/O stats live on the reactors; the RPC threads reach them by message.
        let mailboxes = match self.reactors.as_ref() {
            Some(s) => Some(s.call(0, |r| r.mailboxes())?),
            None => None,
        };
        let stats = Arc::new(StatsAccess {
            mailboxes,
            since: std::sync::Mutex::new(std::time::Instant::now()),
        });
        let (st1, st2, st3) = (stats.clone(), stats.clone(), stats);
        let source = self.dynamic.template.source.clone();
        let mut b = RpcServer::builder(rc)
            .method("subsystems.list", Role::Viewer, move |_ctx, _p| {
                Ok(subsystems_json(&t, k1.as_deref()))
            })
            .method("keys.status", Role::Viewer, move |_ctx, _p| {
                Ok(json!({ "namespaces": k2.as_ref().map(|k| k.states()).unwrap_or_default() }))
            })
            .method("kms.status", Role::Viewer, move |_ctx, _p| {
                Ok(json!({ "clusters": k3.as_ref().map(|k| k.kms_status()).unwrap_or_default() }))
            })
            .method("stats.reactors", Role::Viewer, move |_ctx, _p| {
                let v: Vec<Value> = reactors
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let s = c.snapshot();
                        json!({
                            "reactor": i,
                            "busy_pct_lifetime": busy_pct((0, 0), s),
                            "busy_ns": crate::sys::clock::ticks_to_ns(s.0),
                            "idle_ns": crate::sys::clock::ticks_to_ns(s.1),
                            "pollers": c.pollers.load(std::sync::atomic::Ordering::Relaxed),
                            "iterations": c.iterations.load(std::sync::atomic::Ordering::Relaxed),
                            "nvmf": group_stats.get(i).map(|g| g.to_json()),
                        })
                    })
                    .collect();
                Ok(json!({ "reactors": v }))
            })
            .method("spdk.controllers", Role::Viewer, move |_ctx, _p| {
                let v: Vec<Value> = spdk.values().map(|c| c.status()).collect();
                Ok(json!({ "available": crate::spdk::AVAILABLE, "version": crate::spdk::version(), "controllers": v }))
            })
            .method("stats.nvmf", Role::Viewer, move |_ctx, _p| {
                Ok(json!({
                    "connections": t2.connection_stats(),
                    "controllers": t2.controller_count(),
                    "buffer_bytes_reserved": t2.buffer_bytes_reserved(),
                }))
            })
            .method("stats.process", Role::Viewer, move |_ctx, _p| {
                let (rss, vm) = crate::sys::usage::memory_bytes().map_err(RpcError::internal)?;
                Ok(json!({
                    "open_fds": crate::sys::usage::open_fds().map_err(RpcError::internal)?,
                    "rss_bytes": rss,
                    "vm_bytes": vm,
                }))
            })
            .method("stats.namespaces", Role::Viewer, move |_ctx, _p| {
                let (all, elapsed) = st1.collect()?;
                Ok(ns_stats::namespaces_json(&all, elapsed))
            })
            .method("config.get", Role::Viewer, move |_ctx, _p| {
                // The file the target started from, secrets redacted as in a support bundle
                // (namespaces created over RPC since are in subsystems.list, not here).
                Ok(json!({
                    "file": source.file,
                    "text": crate::bundle::redact_config(&source.text),
                }))
            })
            .method("stats.prometheus", Role::Viewer, move |_ctx, _p| {
                let (all, _) = st2.collect()?;
                Ok(json!({ "text": ns_stats::prometheus_text(&all) }))
            })
            .method("stats.reset", Role::Admin, move |_ctx, _p| {
                st3.reset()?;
                Ok(json!({ "reset": true }))
            });
        // Key operations exist only where there are keys to manage (and then an audit log is
        // required by the config check).
        if let Some(km) = k4 {
            b = rekey_rpc::register(b, km.clone());
            b = keys_rpc::register(b, km.clone());
        }
        if let Some((km, t)) = self.keys.clone().map(|k| (k, self.target.clone())) {
            b = b.method("namespace.crypto_erase", Role::Crypto, move |ctx, p| {
                erase::crypto_erase_rpc(&t, &km, ctx, p)
            });
        }
        b = b
            .method("namespace.create", Role::Admin, move |ctx, p| {
                d1.create(ctx, p)
            })
            .method("namespace.delete", Role::Admin, move |ctx, p| {
                d2.delete(ctx, p)
            });
        if let Some(a) = audit {
            b = b.audit(a);
        }
        let server = b.build().map_err(|e| ServerError::Rpc(e.to_string()))?;
        let h = server
            .start()
            .map_err(|e| ServerError::Rpc(e.to_string()))?;
        tracing::info!(socket = %h.socket_path().display(), "control socket listening");
        Ok(h)
    }

    /// Stops the control socket, drains the reactors (in-flight I/O completes) and stops them,
    /// then flushes every backend so that every write acknowledged to a host is on stable
    /// storage before the process exits (see [`flush_all`]). Returns how many backends failed
    /// to flush (each is logged): non-zero means acknowledged writes may not be durable.
    #[must_use = "a failed shutdown flush must reach the exit status"]
    pub fn shutdown(mut self) -> usize {
        if let Some(r) = self.rpc.take() {
            r.shutdown();
        }
        if let Some(set) = self.reactors.take() {
            set.shutdown();
        }
        let mut bdevs = flushable(&self.stacks);
        for d in lock(&self.dynamic.created).values() {
            bdevs.extend(flushable(&d.stacks));
        }
        flush_all(&bdevs)
    }
}

/// Every bdev of `stacks` to flush at shutdown: all of them but the stand-ins of encrypted
/// namespaces whose key never arrived (nothing was written through those; their base is in
/// the list on its own).
fn flushable(stacks: &Stacks) -> Vec<Arc<dyn Bdev>> {
    stacks
        .bdevs
        .iter()
        .filter(|(name, _)| match stacks.encrypted.get(name.as_str()) {
            Some((late, _)) if !late.is_bound() => {
                tracing::info!(bdev = %name, "shutdown: locked namespace, nothing to flush");
                false
            }
            _ => true,
        })
        .map(|(_, b)| b.clone())
        .collect()
}

/// How long a shutdown waits for one backend's flush. A healthy device flushes in well under
/// a second; a stuck one must not keep the process from exiting forever (and is logged).
const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// Flushes each bdev from the calling (control) thread, after the reactors stopped: every
/// base and every layer above it, so nothing depends on how a stack is built (a second flush of
/// a device is cheap). Logs each result; returns how many flushes failed.
pub fn flush_all(bdevs: &[Arc<dyn Bdev>]) -> usize {
    let mut failed = 0;
    for b in bdevs {
        match crate::bdev::flush_blocking(b.as_ref(), CoreId(0), SHUTDOWN_FLUSH_TIMEOUT) {
            Ok(()) => tracing::info!(bdev = b.name(), "shutdown: bdev flushed"),
            Err(e) => {
                tracing::error!(bdev = b.name(), "shutdown: flush failed: {e}");
                failed += 1;
            }
        }
    }
    failed
}

/// What the `stats.*` RPC methods need: the reactors' mailboxes and the start of the window.
struct StatsAccess {
    mailboxes: Option<Mailboxes>,
    /// Start of the rate window: server start or the last `stats.reset` (control threads only).
    since: std::sync::Mutex<std::time::Instant>,
}

/// How long an RPC waits for one reactor to answer a stats message.
const STATS_REACTOR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl StatsAccess {
    /// Merged per-namespace stats of all reactors and the seconds they cover.
    fn collect(&self) -> Result<(Vec<ns_stats::NsSnapshot>, f64), RpcError> {
        let Some(mb) = &self.mailboxes else {
            return Ok((Vec::new(), 0.0));
        };
        let since = *self.since.lock().unwrap_or_else(|e| e.into_inner());
        let all = ns_stats::collect(mb, STATS_REACTOR_TIMEOUT)
            .map_err(|e| RpcError::internal(e.to_string()))?;
        Ok((all, since.elapsed().as_secs_f64()))
    }
    fn reset(&self) -> Result<(), RpcError> {
        let mut since = self.since.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mb) = &self.mailboxes {
            ns_stats::reset_all(mb, STATS_REACTOR_TIMEOUT)
                .map_err(|e| RpcError::internal(e.to_string()))?;
        }
        *since = std::time::Instant::now();
        Ok(())
    }
}

/// `subsystems.list`: subsystems, namespaces, crypto state.
fn subsystems_json(t: &Target, keys: Option<&KeyManager>) -> Value {
    let states: BTreeMap<String, Value> = keys
        .map(|k| {
            k.states()
                .into_iter()
                .map(|s| {
                    (
                        s.ns_id.clone(),
                        serde_json::to_value(&s).unwrap_or(Value::Null),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let subs: Vec<Value> = t
        .subsystems()
        .iter()
        .map(|s| {
            let ns: Vec<Value> = s
                .namespaces()
                .iter()
                .map(|n| {
                    // A managed namespace says what its header says (plaintext, converting,
                    // encrypted; null while locked before its header was read).
                    let data_state = match states.get(n.bdev.name()) {
                        Some(st) => st.get("data_state").cloned().unwrap_or(Value::Null),
                        None if n.encrypted => json!("encrypted"),
                        None => json!("plaintext"),
                    };
                    let encrypted = match states.get(n.bdev.name()) {
                        Some(_) => data_state != json!("plaintext"),
                        None => n.encrypted,
                    };
                    json!({
                        "nsid": n.nsid,
                        "bdev": n.bdev.name(),
                        "encrypted": encrypted,
                        "data_state": data_state,
                        "online": n.is_online(),
                        "block_size": n.block_size,
                        "num_blocks": n.num_blocks,
                        "key": states.get(n.bdev.name()),
                    })
                })
                .collect();
            let listen: Vec<String> = s
                .ports()
                .iter()
                .filter_map(|&p| t.port_addr(p))
                .map(|a| a.to_string())
                .collect();
            json!({ "nqn": s.nqn, "serial": s.serial, "model": s.model, "allowed_hosts": s.allowed_hosts, "allow_any_host": s.allow_any_host, "listen": listen, "namespaces": ns })
        })
        .collect();
    json!({ "subsystems": subs })
}
