//! The target's shared state: subsystems and their namespaces, the discovery subsystem, the
//! controller registry (dynamic controller model). The TCP [`Listener`] lives in
//! `nvmf::listener` and is re-exported here.
//! This file stays whole (about 1,000 lines; tests in `target/tests.rs`, admission accounting
//! in `target/admission.rs`): the subsystem table and its access rules are read together.
//!
//! A [`Target`] is built once on the control thread and shared by every reactor through an
//! `Arc`. What the I/O path reads of it is immutable or atomic (namespace geometry, the
//! namespace online flags, a controller's dead flag); the `Mutex`es here are taken only on the
//! Connect/admin path and by control-thread calls such as [`Target::set_namespace_online`].
//!
//! Access control (deny by default): a subsystem admits the hosts it lists in `allowed_hosts`
//! (or any host with `allow_any_host`), and only through the listeners of its own `listen`
//! addresses. The target numbers every distinct configured listen address as a [`PortId`] (the
//! PORTID of discovery log entries); each [`Connection`](crate::nvmf::Connection) carries the
//! port it was accepted on, Connect refuses a subsystem not linked to that port exactly as an
//! unknown NQN, and the discovery log lists only what that port serves. The discovery subsystem
//! is reachable through every port and admits any host (as Linux nvmet does); what it lists is
//! filtered by port and by the subsystems' host lists.
//!
//! Namespaces are dynamic: each subsystem has a fixed table of `Limits::max_namespaces` slots
//! (slot `i` holds nsid `i + 1`) whose entries are published with `arc-swap` (a lock-free load)
//! and a per-subsystem generation counter. [`Target::add_namespace`] and
//! [`Target::remove_namespace`] (control thread) publish a change and bump the counter; every
//! connection compares the counter with its own copy once per poll (one atomic load) and, only
//! when it moved, re-reads the table on its own reactor and opens or drops its bdev channels.
//! Between changes the I/O path uses the connection's own copy of the table: no lock, no
//! allocation.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

pub use super::listener::Listener;
use crate::bdev::{Bdev, IoType};
use crate::nvme::log::{self, ErrorEntry};
use crate::nvmf::config::{
    Limits, ListenAddr, SubsystemConfig, DISCOVERY_NQN, MAX_NAMESPACE_SLOTS,
};

/// Errors building or changing a [`Target`].
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("invalid limits: {0}")]
    Limits(String),
    #[error("subsystem {nqn}: {what}")]
    Subsystem { nqn: String, what: String },
    #[error("no subsystem {0}")]
    NoSubsystem(String),
    #[error("subsystem {nqn} has no namespace {nsid}")]
    NoNamespace { nqn: String, nsid: u32 },
    #[error("subsystem {nqn}: nsid {nsid} is in use")]
    NsidInUse { nqn: String, nsid: u32 },
    #[error("subsystem {nqn}: nsid {nsid} is outside 1..={max} (max_namespaces)")]
    NsidOutOfRange { nqn: String, nsid: u32, max: u32 },
    #[error("subsystem {nqn}: all {max} namespace slots are in use")]
    NoFreeNsid { nqn: String, max: u32 },
    #[error("subsystem {nqn}: bdev {bdev}: {what}")]
    BadBdev {
        nqn: String,
        bdev: String,
        what: String,
    },
    #[error("subsystem {nqn} namespace {nsid} was removed, but I/O queues still held it after {waited_ms} ms; it is freed when they let go")]
    DrainTimeout {
        nqn: String,
        nsid: u32,
        waited_ms: u64,
    },
}

/// One namespace: a bdev, its stable identifiers, and whether it is online.
pub struct Namespace {
    pub nsid: u32,
    pub bdev: Arc<dyn Bdev>,
    pub encrypted: bool,
    pub nguid: [u8; 16],
    pub uuid: [u8; 16],
    /// False while the namespace is locked (an encrypted namespace waiting for its key). Read
    /// with `Acquire` at Identify and I/O time; written by the control thread.
    online: AtomicBool,
    /// Set while a Sanitize of its subsystem runs (crate::nvmf::erase): I/O to it completes
    /// with Sanitize In Progress.
    sanitizing: AtomicBool,
    /// Cached geometry (the bdev's is immutable after open).
    pub block_size: u32,
    pub num_blocks: u64,
}

impl Namespace {
    fn new(nqn: &str, nsid: u32, bdev: Arc<dyn Bdev>, encrypted: bool, online: bool) -> Namespace {
        Namespace {
            nsid,
            encrypted,
            nguid: nguid_for(nqn, nsid),
            uuid: uuid_for(nqn, nsid),
            online: AtomicBool::new(online),
            sanitizing: AtomicBool::new(false),
            block_size: bdev.block_size(),
            num_blocks: bdev.num_blocks(),
            bdev,
        }
    }
    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }
    pub fn is_sanitizing(&self) -> bool {
        self.sanitizing.load(Ordering::Acquire)
    }
    pub fn set_sanitizing(&self, on: bool) {
        self.sanitizing.store(on, Ordering::Release);
    }
    pub fn supports(&self, t: IoType) -> bool {
        self.bdev.io_type_supported(t)
    }
}

/// Derives a stable 16-byte identifier from the subsystem NQN and nsid: four CRC32C values over
/// `domain || index || nqn || nsid`. Stable across restarts and Rust versions, distinct per
/// subsystem/namespace; not a secret and not meant to resist deliberate collisions.
fn derive_id(domain: &[u8], nqn: &str, nsid: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, chunk) in out.chunks_exact_mut(4).enumerate() {
        let mut c = crc32c::crc32c(domain);
        c = crc32c::crc32c_append(c, &[i as u8]);
        c = crc32c::crc32c_append(c, nqn.as_bytes());
        c = crc32c::crc32c_append(c, &nsid.to_le_bytes());
        chunk.copy_from_slice(&c.to_be_bytes());
    }
    out
}

/// The NGUID of namespace `nsid` in subsystem `nqn`.
pub fn nguid_for(nqn: &str, nsid: u32) -> [u8; 16] {
    derive_id(b"nvseal-nguid", nqn, nsid)
}

/// The UUID of namespace `nsid` in subsystem `nqn` (RFC 9562 version 8, custom).
pub fn uuid_for(nqn: &str, nsid: u32) -> [u8; 16] {
    let mut u = derive_id(b"nvseal-uuid", nqn, nsid);
    u[6] = (u[6] & 0x0f) | 0x80;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// Whether a subsystem serves I/O or discovery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubsystemKind {
    Nvm,
    Discovery,
}

/// An NVM subsystem (or the discovery subsystem).
pub struct Subsystem {
    pub nqn: String,
    pub kind: SubsystemKind,
    pub serial: String,
    pub model: String,
    /// Namespace slots: slot `i` holds nsid `i + 1` (see the module docs).
    slots: Box<[ArcSwapOption<Namespace>]>,
    /// Bumped (Release) after every change of `slots`; connections compare it (Acquire).
    ns_gen: AtomicU64,
    /// Serializes namespace create/delete (control thread only, never the I/O path).
    ns_change: Mutex<()>,
    /// Host NQNs admitted (exact match); ignored when `allow_any_host` is set.
    pub allowed_hosts: Vec<String>,
    /// Admit every host, an empty HOSTNQN included (the discovery subsystem always does).
    pub allow_any_host: bool,
    pub listen: Vec<ListenAddr>,
    /// The target ports (listen addresses) this subsystem is linked to.
    ports: Vec<PortId>,
}

impl Subsystem {
    /// Whether a host with this NQN may connect (deny by default: an empty list admits no one).
    /// An empty HOSTNQN is treated like any other name: admitted only where any host is.
    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        self.allow_any_host || self.allowed_hosts.iter().any(|h| h == hostnqn)
    }
    /// Whether this subsystem is reachable through target port `port`: the discovery
    /// subsystem through every port, an NVM subsystem through the ports of its `listen`.
    pub fn serves(&self, port: PortId) -> bool {
        self.kind == SubsystemKind::Discovery || self.ports.contains(&port)
    }
    /// The target ports this subsystem is linked to (none for the discovery subsystem, which
    /// every port serves).
    pub fn ports(&self) -> &[PortId] {
        &self.ports
    }
    /// The namespace with this id, if it exists (online or not).
    pub fn namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        let i = usize::try_from(nsid.checked_sub(1)?).ok()?;
        self.slots.get(i)?.load_full()
    }
    /// The namespace published in slot `i` (nsid `i + 1`), if any.
    pub fn slot(&self, i: usize) -> Option<Arc<Namespace>> {
        self.slots.get(i)?.load_full()
    }
    /// Number of namespace slots (Identify Controller NN; the highest valid nsid).
    pub fn max_nsid(&self) -> u32 {
        self.slots.len() as u32
    }
    /// The namespaces that exist now, by nsid (admin and control path: allocates).
    pub fn namespaces(&self) -> Vec<Arc<Namespace>> {
        self.slots.iter().filter_map(|s| s.load_full()).collect()
    }
    /// Namespace table generation: changes whenever a namespace is added or removed.
    #[inline]
    pub fn ns_generation(&self) -> u64 {
        self.ns_gen.load(Ordering::Acquire)
    }
    fn new(
        nqn: String,
        kind: SubsystemKind,
        serial: String,
        model: String,
        slots: usize,
        access: Access,
    ) -> Subsystem {
        Subsystem {
            nqn,
            kind,
            serial,
            model,
            slots: (0..slots).map(|_| ArcSwapOption::empty()).collect(),
            ns_gen: AtomicU64::new(1),
            ns_change: Mutex::new(()),
            allowed_hosts: access.allowed_hosts,
            allow_any_host: access.allow_any_host,
            listen: access.listen,
            ports: access.ports,
        }
    }
    fn bump_generation(&self) {
        self.ns_gen.fetch_add(1, Ordering::AcqRel);
    }
}

/// Who may reach a subsystem and where (the arguments of `Subsystem::new`).
struct Access {
    allowed_hosts: Vec<String>,
    allow_any_host: bool,
    listen: Vec<ListenAddr>,
    ports: Vec<PortId>,
}

/// Per-queue I/O counters: written only by the reactor that owns the queue (plain load + store,
/// no read-modify-write), read by the admin path to build the SMART log.
#[derive(Default)]
pub struct QueueStats {
    pub read_cmds: AtomicU64,
    pub write_cmds: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub media_errors: AtomicU64,
}

impl QueueStats {
    /// Adds these counters to `s`.
    pub fn add_to(&self, s: &mut log::Smart) {
        s.read_cmds += self.read_cmds.load(Ordering::Relaxed);
        s.write_cmds += self.write_cmds.load(Ordering::Relaxed);
        s.bytes_read += self.bytes_read.load(Ordering::Relaxed);
        s.bytes_written += self.bytes_written.load(Ordering::Relaxed);
        s.media_errors += self.media_errors.load(Ordering::Relaxed);
    }
    /// Single-writer increment (the owning reactor is the only writer).
    #[inline]
    pub fn add(c: &AtomicU64, v: u64) {
        c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
    }
}

/// Number of error log entries kept per controller (ELPE + 1).
pub const ERROR_LOG_ENTRIES: usize = 8;
/// Async event completion dword 0 for "namespace attribute changed": type 2 (notice) in bits
/// 2:0, information 0x00 in bits 15:8, log page 0x04 (Changed Namespace List) in bits 23:16.
pub const NS_ATTR_CHANGED_EVENT: u32 = 0x2 | (0x04 << 16);
/// Asynchronous Event Requests a controller holds at once (AERL + 1).
pub const MAX_AERS: usize = 4;

/// What the admin path of a controller keeps behind its mutex.
pub struct AdminState {
    /// I/O queues granted by Set Features Number of Queues (count, not 0-based).
    pub io_queues_granted: u16,
    /// Which I/O queue ids are connected (index = qid).
    pub io_qids: Vec<bool>,
    /// Async Event Configuration (feature 0x0b).
    pub aen_config: u32,
    /// Namespaces whose attributes changed since the Changed Namespace List was last read.
    pub changed_ns: Vec<u32>,
    /// Events not yet delivered to an Asynchronous Event Request (completion dword 0).
    pub pending_events: VecDeque<u32>,
    /// A namespace attribute event is outstanding until the host reads the changed NS log.
    pub ns_event_masked: bool,
    pub errors: VecDeque<ErrorEntry>,
    pub error_count: u64,
    pub queue_stats: Vec<Arc<QueueStats>>,
    /// Counters of I/O queues that are gone, so SMART totals survive reconnects.
    pub retired: log::Smart,
    /// Mandatory features a host may read and set; they change nothing in how nvseal works
    /// (see docs/nvmf.md) but hosts and tools (spdk_nvme_identify, nvme-cli) expect them.
    pub features: FeatureValues,
}

/// Current values of the mandatory NVM features nvseal only records (Get/Set Features).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureValues {
    /// Arbitration (01h), dword 11 as set: AB in bits 2:0, the weights above.
    pub arbitration: u32,
    /// Power Management (02h): PS in bits 4:0 (only power state 0 exists), WH in bits 7:5.
    pub power_mgmt: u32,
    /// Temperature Threshold (04h) of the composite sensor (the only one): over, under (K).
    pub temp_over_k: u16,
    pub temp_under_k: u16,
    /// Error Recovery (05h): TLER in 100 ms units (0 = no limit); DULBE is not supported.
    pub tler_100ms: u16,
}

/// Default over-temperature threshold (343 K = 70 °C), the value QEMU's emulated NVMe and
/// many drives ship with. nvseal has no sensor (SMART reports 0 K), so it never trips.
pub const DEFAULT_OVER_TEMP_K: u16 = 343;

impl Default for FeatureValues {
    fn default() -> Self {
        FeatureValues {
            // AB = 111b: no arbitration burst limit; weights 0 (CAP.AMS: round robin only).
            arbitration: 0b111,
            power_mgmt: 0,
            temp_over_k: DEFAULT_OVER_TEMP_K,
            temp_under_k: 0,
            tler_100ms: 0,
        }
    }
}

/// A controller (dynamic model): created by an admin-queue Connect, joined by I/O queue
/// Connects that name its cntlid, gone when its admin queue closes or its keep alive expires.
pub struct Controller {
    pub cntlid: u16,
    pub subsys: Arc<Subsystem>,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub cc: AtomicU32,
    pub csts: AtomicU32,
    /// Keep alive timeout in ms (0 = disabled); the admin connection enforces it.
    pub kato_ms: AtomicU32,
    /// Set when the controller is torn down; its I/O queues see it and close.
    pub dead: AtomicBool,
    /// Set by the control plane when an event is queued; the admin queue polls it.
    pub event_pending: AtomicBool,
    /// I/O queue generation: bumped, under the admin lock, by a controller reset (CC.EN 1 to
    /// 0). An I/O queue records it at Connect; once it moves, the queue refuses commands and
    /// closes (one atomic load per command and per poll, no lock on the I/O path).
    io_gen: AtomicU64,
    admin: Mutex<AdminState>,
}

impl Controller {
    /// The admin state; a poisoned lock (a panic elsewhere on the admin path) is recovered,
    /// since the state stays structurally valid.
    pub fn admin(&self) -> MutexGuard<'_, AdminState> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }
    pub fn kill(&self) {
        self.dead.store(true, Ordering::Release);
    }
    /// The current I/O queue generation (see [`Controller::reset_io_queues`]).
    #[inline]
    pub fn io_generation(&self) -> u64 {
        self.io_gen.load(Ordering::Acquire)
    }
    /// Controller reset (CC.EN 1 to 0): every I/O queue of this controller is deleted. Bumps
    /// the generation, so each I/O queue connection, on whichever reactor owns it, refuses
    /// further commands and closes on its next poll, and frees every queue id at once, so the
    /// host may connect them again after it re-enables the controller (a closing queue of the
    /// old generation leaves the ids alone). Admin path; returns how many I/O queues were
    /// connected.
    pub fn reset_io_queues(&self) -> usize {
        let mut a = self.admin();
        self.io_gen.fetch_add(1, Ordering::AcqRel);
        let n = a.io_qids.iter().filter(|&&q| q).count();
        a.io_qids.fill(false);
        n
    }
    /// Records a failed admin command in the error log.
    pub fn record_error(&self, mut e: ErrorEntry) {
        let mut a = self.admin();
        a.error_count += 1;
        e.error_count = a.error_count;
        if a.errors.len() == ERROR_LOG_ENTRIES {
            a.errors.pop_back();
        }
        a.errors.push_front(e);
    }
    /// SMART counters summed over the controller's queues.
    pub fn smart(&self) -> log::Smart {
        let a = self.admin();
        let mut s = log::Smart {
            error_log_entries: a.error_count,
            ..a.retired
        };
        for q in &a.queue_stats {
            q.add_to(&mut s);
        }
        s
    }
}

struct Registry {
    next_cntlid: u16,
    ctrls: HashMap<u16, Weak<Controller>>,
}

/// Checks that a bdev's block size is one a namespace can have (a power of two, 512..=64 KiB).
fn check_block_size(bdev: &dyn Bdev) -> Result<(), String> {
    let bs = bdev.block_size();
    if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
        return Err(format!("bdev {} block size {bs} unsupported", bdev.name()));
    }
    Ok(())
}

/// Highest cntlid the dynamic model hands out (0xfff0..0xffff are reserved).
const MAX_CNTLID: u16 = 0xffef;

/// A target port: one distinct listen address of the configuration. Subsystems are linked to
/// ports, connections carry the port they came through, and discovery entries report it as
/// PORTID. Numbered from 0 in the order the addresses first appear in the subsystem list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortId(pub u16);

impl std::fmt::Display for PortId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One target port.
struct Port {
    /// The address as configured (port 0 = any free port).
    addr: SocketAddr,
    /// For port 0: the port its listener was bound to (0 until known). Discovery advertises
    /// this, since TRSVCID "0" would be useless to a host.
    bound_port: AtomicU16,
}

/// A token bucket for log lines that peers can trigger at will (refused Connects, fatal PDUs,
/// timeouts, resets): reactors must not flood the log, yet the first lines of a burst, and the
/// count of those dropped, must reach it. Its lock is taken only on those rare paths (Connect,
/// admin commands, a connection going down), never per I/O.
pub struct LogLimiter {
    burst: u32,
    per_sec: u32,
    state: Mutex<LimiterState>,
}

struct LimiterState {
    /// Tokens in thousandths, so a fractional refill is not lost.
    tokens_milli: u64,
    last: Option<Instant>,
    /// Lines dropped since the last one logged.
    suppressed: u64,
}

impl LogLimiter {
    /// At most `burst` lines at once, then `per_sec` a second.
    pub fn new(burst: u32, per_sec: u32) -> LogLimiter {
        LogLimiter {
            burst,
            per_sec,
            state: Mutex::new(LimiterState {
                tokens_milli: u64::from(burst) * 1000,
                last: None,
                suppressed: 0,
            }),
        }
    }
    /// Whether a line may be logged at `now`: `Some(n)` with the number of lines dropped since
    /// the previous one that was (log it with the line), or `None` to drop this one.
    pub fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(last) = s.last {
            let ms = now.saturating_duration_since(last).as_millis();
            let refill = u64::try_from(ms)
                .unwrap_or(u64::MAX)
                .saturating_mul(u64::from(self.per_sec));
            s.tokens_milli = s
                .tokens_milli
                .saturating_add(refill)
                .min(u64::from(self.burst) * 1000);
        }
        s.last = Some(now);
        if s.tokens_milli < 1000 {
            s.suppressed += 1;
            return None;
        }
        s.tokens_milli -= 1000;
        Some(std::mem::take(&mut s.suppressed))
    }
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }
}

/// Refused Connects logged at once before the limiter holds back: enough to see the pattern
/// of a misconfigured host (it retries every few seconds) or the start of a scan.
const REFUSAL_LOG_BURST: u32 = 20;
/// Refused Connects logged per second after a burst: a flood costs a few lines a second, and
/// each line that gets through says how many were dropped before it.
const REFUSAL_LOG_PER_SEC: u32 = 2;

/// Lines about connection life a peer can cause (fatal PDUs, host terminations, keep alive
/// and connect timeouts, controller resets and shutdowns, admin queue connects) logged at once
/// before the limiter holds back.
const PEER_LOG_BURST: u32 = 20;
/// Such lines logged per second after a burst: one misbehaving host in a reconnect loop costs a
/// few lines a second, each saying how many were dropped before it.
const PEER_LOG_PER_SEC: u32 = 5;

/// The NVMe/TCP target: subsystems, limits, controllers.
pub struct Target {
    pub limits: Limits,
    subsystems: Vec<Arc<Subsystem>>,
    registry: Mutex<Registry>,
    /// Queue data buffer bytes reserved (`Limits::buffer_budget_mib`).
    buffer_bytes: AtomicU64,
    /// Connection slots: pre-Connect and connected counts, per source and per host.
    slots: Slots,
    /// Discovery log generation counter: bumped whenever what discovery reports changes.
    genctr: AtomicU64,
    /// Every distinct listen address of the subsystems; index = [`PortId`].
    ports: Vec<Port>,
    /// Rate limit of the "Connect refused" log lines (any reactor may refuse one).
    refusal_log: LogLimiter,
    /// Rate limit of the other log lines peers can trigger from a reactor ([`Target::peer_log`]).
    peer_log: LogLimiter,
    /// Crypto erase from the host (Format NVM, Sanitize) and the Sanitize Status.
    erase: crate::nvmf::erase::EraseHub,
}

impl Target {
    /// Builds the target from subsystem configs and the bdevs they name. The discovery
    /// subsystem is added automatically.
    pub fn new(
        configs: &[SubsystemConfig],
        limits: Limits,
        bdevs: &HashMap<String, Arc<dyn Bdev>>,
    ) -> Result<Arc<Target>, TargetError> {
        limits.validate().map_err(TargetError::Limits)?;
        let mut subsystems = Vec::with_capacity(configs.len() + 1);
        // Discovery admits any host (it is how hosts find what they may use; nvmet does the
        // same) and is reachable through every port.
        subsystems.push(Arc::new(Subsystem::new(
            DISCOVERY_NQN.to_string(),
            SubsystemKind::Discovery,
            "discovery".into(),
            "nvseal discovery".into(),
            0,
            Access {
                allowed_hosts: Vec::new(),
                allow_any_host: true,
                listen: Vec::new(),
                ports: Vec::new(),
            },
        )));
        let mut ports: Vec<Port> = Vec::new();
        for c in configs {
            let err = |what: String| TargetError::Subsystem {
                nqn: c.nqn.clone(),
                what,
            };
            if !c.nqn.starts_with("nqn.") || c.nqn.len() > 223 || c.nqn == DISCOVERY_NQN {
                return Err(err("NQN must start with \"nqn.\", be at most 223 bytes, and not be the discovery NQN".into()));
            }
            if subsystems.iter().any(|s: &Arc<Subsystem>| s.nqn == c.nqn) {
                return Err(err("duplicate NQN".into()));
            }
            c.check_access()
                .map_err(|e| err(format!("{}: {e}", e.field())))?;
            let mut linked = Vec::with_capacity(c.listen.len());
            for l in &c.listen {
                // check_access proved every address parses.
                let ip: IpAddr = l
                    .addr
                    .parse()
                    .map_err(|_| err(format!("bad listen address {:?}", l.addr)))?;
                let addr = SocketAddr::new(ip, l.port);
                let i = match ports.iter().position(|p| p.addr == addr) {
                    Some(i) => i,
                    None => {
                        ports.push(Port {
                            addr,
                            bound_port: AtomicU16::new(0),
                        });
                        ports.len() - 1
                    }
                };
                let id = PortId(
                    u16::try_from(i).map_err(|_| err("more than 65536 listen addresses".into()))?,
                );
                if !linked.contains(&id) {
                    linked.push(id);
                }
            }
            if !c.serial.is_ascii()
                || c.serial.len() > 20
                || !c.model.is_ascii()
                || c.model.len() > 40
            {
                return Err(err(
                    "serial (<= 20) and model (<= 40) must be short ASCII".into()
                ));
            }
            let highest = c.namespaces.iter().map(|n| n.nsid).max().unwrap_or(0);
            if highest > MAX_NAMESPACE_SLOTS {
                return Err(err(format!(
                    "nsid {highest} is above the {MAX_NAMESPACE_SLOTS} namespace slots nvseal supports"
                )));
            }
            let s = Subsystem::new(
                c.nqn.clone(),
                SubsystemKind::Nvm,
                c.serial.clone(),
                c.model.clone(),
                limits.max_namespaces.max(highest) as usize,
                Access {
                    allowed_hosts: c.allowed_hosts.clone(),
                    allow_any_host: c.allow_any_host,
                    listen: c.listen.clone(),
                    ports: linked,
                },
            );
            for n in &c.namespaces {
                if n.nsid == 0 {
                    return Err(err(format!("nsid {} is reserved", n.nsid)));
                }
                let bdev = bdevs
                    .get(&n.bdev)
                    .ok_or_else(|| err(format!("no bdev named {}", n.bdev)))?;
                check_block_size(bdev.as_ref()).map_err(err)?;
                let encrypted = bdev.encrypts_data();
                if n.encrypted.is_some_and(|said| said != encrypted) {
                    return Err(err(format!(
                        "namespace {} says encrypted: {}, but bdev {} is {}",
                        n.nsid,
                        !encrypted,
                        n.bdev,
                        if encrypted {
                            "a crypto bdev (encrypted)"
                        } else {
                            "not a crypto bdev (plaintext)"
                        }
                    )));
                }
                let slot = &s.slots[(n.nsid - 1) as usize];
                if slot.load().is_some() {
                    return Err(err("duplicate nsid".into()));
                }
                slot.store(Some(Arc::new(Namespace::new(
                    &c.nqn,
                    n.nsid,
                    Arc::clone(bdev),
                    encrypted,
                    true,
                ))));
            }
            if s.ports.is_empty() {
                tracing::warn!(nqn = %c.nqn, "subsystem has no listen address: no host can reach it");
            }
            if !c.allow_any_host && c.allowed_hosts.is_empty() {
                tracing::warn!(nqn = %c.nqn, "subsystem admits no host: list host NQNs under allowed_hosts (or set allow_any_host: true)");
            }
            subsystems.push(Arc::new(s));
        }
        Ok(Arc::new(Target {
            limits,
            subsystems,
            registry: Mutex::new(Registry {
                next_cntlid: 1,
                ctrls: HashMap::new(),
            }),
            buffer_bytes: AtomicU64::new(0),
            slots: Slots::default(),
            genctr: AtomicU64::new(1),
            ports,
            refusal_log: LogLimiter::new(REFUSAL_LOG_BURST, REFUSAL_LOG_PER_SEC),
            peer_log: LogLimiter::new(PEER_LOG_BURST, PEER_LOG_PER_SEC),
            erase: crate::nvmf::erase::EraseHub::default(),
        }))
    }

    /// Crypto erase support (the server installs the eraser).
    pub fn erase(&self) -> &crate::nvmf::erase::EraseHub {
        &self.erase
    }

    pub fn subsystem(&self, nqn: &str) -> Option<&Arc<Subsystem>> {
        self.subsystems.iter().find(|s| s.nqn == nqn)
    }

    pub fn subsystems(&self) -> &[Arc<Subsystem>] {
        &self.subsystems
    }

    /// The target ports and their addresses as configured (port 0 = any free port): what the
    /// server binds a listener for, each once.
    pub fn ports(&self) -> impl Iterator<Item = (PortId, SocketAddr)> + '_ {
        self.ports
            .iter()
            .enumerate()
            .map(|(i, p)| (PortId(i as u16), p.addr))
    }

    /// The port of a configured listen address (as written in the config, port 0 included).
    pub fn port_for(&self, configured: SocketAddr) -> Option<PortId> {
        self.ports
            .iter()
            .position(|p| p.addr == configured)
            .map(|i| PortId(i as u16))
    }

    /// The configured address of a port.
    pub fn port_addr(&self, port: PortId) -> Option<SocketAddr> {
        self.ports.get(usize::from(port.0)).map(|p| p.addr)
    }

    /// The rate limit for "Connect refused" log lines.
    pub fn refusal_log(&self) -> &LogLimiter {
        &self.refusal_log
    }

    /// The rate limit for every other line a peer can trigger again and again from a reactor
    /// (fatal PDUs, terminations, timeouts, controller resets and shutdowns, admin connects):
    /// separate from [`Target::refusal_log`], so a flood of one kind does not hide the other.
    pub fn peer_log(&self) -> &LogLimiter {
        &self.peer_log
    }

    /// Marks a namespace online or offline (locked). Offline: it leaves the active namespace list,
    /// Identify Namespace returns zeroes for it, and I/O to it completes with Namespace Not Ready
    /// (retryable). Every controller of the subsystem records the change in its Changed
    /// Namespace List and, if the host enabled namespace attribute notices, gets an async event.
    pub fn set_namespace_online(
        &self,
        subnqn: &str,
        nsid: u32,
        online: bool,
    ) -> Result<(), TargetError> {
        let s = self
            .subsystem(subnqn)
            .ok_or_else(|| TargetError::NoSubsystem(subnqn.to_string()))?;
        let ns = s.namespace(nsid).ok_or_else(|| TargetError::NoNamespace {
            nqn: subnqn.to_string(),
            nsid,
        })?;
        if ns.online.swap(online, Ordering::AcqRel) == online {
            return Ok(());
        }
        tracing::info!(subnqn, nsid, online, "namespace state changed");
        self.notify_ns_changed(subnqn, nsid);
        Ok(())
    }

    /// Adds a namespace at run time: `nsid` (or, if `None`, the lowest free one) in subsystem
    /// `subnqn`, exporting `bdev`. `online: false` adds it locked (an encrypted namespace whose
    /// key has not arrived; [`Target::set_namespace_online`] brings it up). Whether it is
    /// encrypted is the bdev's to say ([`Bdev::encrypts_data`]). Connections pick it
    /// up on their next poll; hosts learn through the Changed Namespace List and, if enabled, a
    /// namespace attribute notice. Returns the nsid. Control thread only.
    pub fn add_namespace(
        &self,
        subnqn: &str,
        nsid: Option<u32>,
        bdev: Arc<dyn Bdev>,
        online: bool,
    ) -> Result<u32, TargetError> {
        let encrypted = bdev.encrypts_data();
        let s = self
            .subsystem(subnqn)
            .filter(|s| s.kind == SubsystemKind::Nvm)
            .ok_or_else(|| TargetError::NoSubsystem(subnqn.to_string()))?;
        check_block_size(bdev.as_ref()).map_err(|what| TargetError::BadBdev {
            nqn: subnqn.to_string(),
            bdev: bdev.name().to_string(),
            what,
        })?;
        let _g = s.ns_change.lock().unwrap_or_else(|e| e.into_inner());
        let max = s.max_nsid();
        let nsid = match nsid {
            Some(n) if n == 0 || n > max => {
                return Err(TargetError::NsidOutOfRange {
                    nqn: subnqn.to_string(),
                    nsid: n,
                    max,
                })
            }
            Some(n) => n,
            None => s
                .slots
                .iter()
                .position(|x| x.load().is_none())
                .map(|i| i as u32 + 1)
                .ok_or_else(|| TargetError::NoFreeNsid {
                    nqn: subnqn.to_string(),
                    max,
                })?,
        };
        let slot = &s.slots[(nsid - 1) as usize];
        if slot.load().is_some() {
            return Err(TargetError::NsidInUse {
                nqn: subnqn.to_string(),
                nsid,
            });
        }
        slot.store(Some(Arc::new(Namespace::new(
            subnqn, nsid, bdev, encrypted, online,
        ))));
        s.bump_generation();
        if encrypted && s.allow_any_host {
            tracing::warn!(
                subnqn,
                nsid,
                "encrypted namespace exported to any host (allow_any_host: true): every initiator that reaches a listener of the subsystem reads its plaintext"
            );
        }
        tracing::info!(subnqn, nsid, online, "namespace added");
        self.notify_ns_changed(subnqn, nsid);
        Ok(nsid)
    }

    /// Removes a namespace at run time: it goes offline and leaves the table at once (new I/O
    /// to it completes with Invalid Namespace), hosts are notified, and then this waits, up to
    /// `drain`, until every connection has seen the change and its I/O in flight to the
    /// namespace has completed (each drops its channel and its reference on its own reactor).
    /// On success the namespace, and the bdev unless someone else holds it, are freed. On
    /// [`TargetError::DrainTimeout`] it is removed all the same and freed when the last I/O
    /// completes. Control thread only (it sleeps).
    pub fn remove_namespace(
        &self,
        subnqn: &str,
        nsid: u32,
        drain: Duration,
    ) -> Result<(), TargetError> {
        let s = self
            .subsystem(subnqn)
            .ok_or_else(|| TargetError::NoSubsystem(subnqn.to_string()))?;
        let ns = {
            let _g = s.ns_change.lock().unwrap_or_else(|e| e.into_inner());
            let ns = nsid
                .checked_sub(1)
                .and_then(|i| s.slots.get(i as usize))
                .and_then(|slot| slot.swap(None))
                .ok_or_else(|| TargetError::NoNamespace {
                    nqn: subnqn.to_string(),
                    nsid,
                })?;
            ns.online.store(false, Ordering::Release);
            s.bump_generation();
            ns
        };
        tracing::info!(
            subnqn,
            nsid,
            "namespace removed; waiting for I/O queues to let go"
        );
        self.notify_ns_changed(subnqn, nsid);
        let start = Instant::now();
        while Arc::strong_count(&ns) > 1 {
            if start.elapsed() >= drain {
                return Err(TargetError::DrainTimeout {
                    nqn: subnqn.to_string(),
                    nsid,
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        tracing::info!(subnqn, nsid, "namespace freed");
        Ok(())
    }

    /// Records a namespace change in every controller of the subsystem (Changed Namespace List,
    /// namespace attribute notice).
    fn notify_ns_changed(&self, subnqn: &str, nsid: u32) {
        for c in self.controllers_of(subnqn) {
            let mut a = c.admin();
            if !a.changed_ns.contains(&nsid) {
                a.changed_ns.push(nsid);
            }
            // AEN config bit 8: namespace attribute notices. Type 2 (notice), info 0 (namespace
            // attribute changed), log page 0x04; masked until the host reads that log page.
            if a.aen_config & (1 << 8) != 0 && !a.ns_event_masked {
                a.ns_event_masked = true;
                a.pending_events.push_back(NS_ATTR_CHANGED_EVENT);
                c.event_pending.store(true, Ordering::Release);
            }
        }
    }

    /// Live controllers of a subsystem.
    pub fn controllers_of(&self, subnqn: &str) -> Vec<Arc<Controller>> {
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        r.ctrls
            .values()
            .filter_map(Weak::upgrade)
            .filter(|c| c.subsys.nqn == subnqn && !c.is_dead())
            .collect()
    }

    /// Records the port the listener for `configured` was bound to. Only listen addresses
    /// configured with port 0 need it: without it the discovery log page would advertise
    /// TRSVCID "0", which no host can connect to. Called once per listener at start-up.
    pub fn set_bound_port(&self, configured: SocketAddr, bound_port: u16) {
        if configured.port() != 0 {
            return;
        }
        if let Some(p) = self.ports.iter().find(|p| p.addr == configured) {
            p.bound_port.store(bound_port, Ordering::Relaxed);
            self.genctr.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The TCP port discovery advertises for a target port: the configured port, or for port
    /// 0 the one its listener was bound to (0 while unknown).
    pub fn advertised_port(&self, port: PortId) -> u16 {
        match self.ports.get(usize::from(port.0)) {
            Some(p) if p.addr.port() != 0 => p.addr.port(),
            Some(p) => p.bound_port.load(Ordering::Relaxed),
            None => 0,
        }
    }

    /// Discovery log generation counter.
    pub fn genctr(&self) -> u64 {
        self.genctr.load(Ordering::Relaxed)
    }

    /// Creates a controller with the next free cntlid; `None` if all are taken.
    pub(crate) fn create_controller(
        &self,
        subsys: Arc<Subsystem>,
        hostnqn: &str,
        hostid: [u8; 16],
        kato_ms: u32,
    ) -> Option<Arc<Controller>> {
        let mut r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        r.ctrls.retain(|_, w| w.strong_count() > 0);
        let mut id = r.next_cntlid;
        for _ in 0..MAX_CNTLID {
            if !r.ctrls.contains_key(&id) {
                break;
            }
            id = if id >= MAX_CNTLID { 1 } else { id + 1 };
        }
        if r.ctrls.contains_key(&id) {
            return None;
        }
        r.next_cntlid = if id >= MAX_CNTLID { 1 } else { id + 1 };
        let max_q = usize::from(self.limits.max_io_queues) + 1;
        let c = Arc::new(Controller {
            cntlid: id,
            subsys,
            hostnqn: hostnqn.to_string(),
            hostid,
            cc: AtomicU32::new(0),
            csts: AtomicU32::new(0),
            kato_ms: AtomicU32::new(kato_ms),
            dead: AtomicBool::new(false),
            event_pending: AtomicBool::new(false),
            io_gen: AtomicU64::new(0),
            admin: Mutex::new(AdminState {
                io_queues_granted: self.limits.max_io_queues,
                io_qids: vec![false; max_q],
                aen_config: 0,
                changed_ns: Vec::new(),
                pending_events: VecDeque::new(),
                ns_event_masked: false,
                errors: VecDeque::with_capacity(ERROR_LOG_ENTRIES),
                error_count: 0,
                queue_stats: Vec::new(),
                retired: log::Smart::default(),
                features: FeatureValues::default(),
            }),
        });
        r.ctrls.insert(id, Arc::downgrade(&c));
        Some(c)
    }

    /// Looks a live controller up by cntlid.
    pub(crate) fn find_controller(&self, cntlid: u16) -> Option<Arc<Controller>> {
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        r.ctrls
            .get(&cntlid)
            .and_then(Weak::upgrade)
            .filter(|c| !c.is_dead())
    }

    /// Live controllers of every subsystem (for `stats.nvmf`).
    pub fn controller_count(&self) -> usize {
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        r.ctrls
            .values()
            .filter(|w| w.upgrade().is_some_and(|c| !c.is_dead()))
            .count()
    }

    /// Removes a controller from the registry (its admin queue is gone).
    pub(crate) fn remove_controller(&self, cntlid: u16) {
        let mut r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        r.ctrls.remove(&cntlid);
    }
}

mod admission;
use admission::Slots;
pub use admission::{ConnPhase, ConnectionStats, SlotRefusal};

#[cfg(test)]
mod tests;
