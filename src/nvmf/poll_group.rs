//! The per-reactor NVMe/TCP poll group: every connection a reactor owns, polled by readiness.
//!
//! One [`PollGroup`] is registered as a single [`Poller`] on each reactor and owns that
//! reactor's [`Connection`]s for their whole life. Its sockets are registered edge-triggered
//! with one epoll instance ([`crate::sys::epoll::Epoll`]); each loop iteration asks it, with a
//! zero timeout, which sockets got bytes, and a connection reads its socket only after such a
//! report, until the read finds it empty (`EAGAIN`). So an idle connection costs no system call
//! per loop, where polling every socket with `recv` cost one per connection per loop (200 idle
//! admin queues: tens of thousands of empty reads per second on a busy reactor).
//!
//! Each loop the group polls only the connections that have something to do
//! ([`Connection::wants_poll`]: bytes to read, requests in progress, data to send, a close to
//! finish). Every [`SWEEP_INTERVAL_NS`] it also polls all the others once (the housekeeping
//! sweep): their timers (keep alive, Connect timeout), controller events for held AERs,
//! namespace table changes and the dropping of closed connections need no socket bytes.
//!
//! The group also owns the reactor's **bdev channels**: one per namespace ([`ChannelSet`]),
//! shared by all its I/O queues, instead of one per queue and namespace (with io_uring, one
//! ring per queue). A queue tags each I/O with its group slot (`BdevIo::ctx` bits 63..32,
//! request slot in bits 31..0); the group polls every shared channel once per loop and hands
//! each completion to the connection it belongs to. A channel opens when the first queue on the
//! reactor needs its namespace and closes at a sweep once no queue uses it and nothing is in
//! flight on it (so a removed namespace is released once its I/O drained).
//!
//! And it owns the reactor's **data buffers** ([`SharedBufs`]): one pool shared by all its
//! queues, grown on demand under the target's buffer budget (Connect allocates none), from
//! which a request that finds it empty waits its turn instead of failing.
//!
//! Runs on its reactor only; control threads reach it by reactor message
//! ([`crate::reactor::Reactor::poller_as`]). It exists so that what a reactor shares between
//! its queue pairs (the epoll set, the counters) has one owner.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::bdev::{BdevChannel, BdevError, IoBuf};
use crate::nvmf::conn::Connection;
use crate::nvmf::target::{Namespace, Target};
use crate::reactor::Poller;
use crate::sys::buf::AlignedBuf;
use crate::sys::clock;
use crate::sys::epoll::Epoll;
use crate::types::CoreId;

/// How often idle connections are polled anyway (timers, AER events, namespace changes,
/// reaping closed ones). 1 ms keeps every such reaction far below the host-visible timeouts
/// (keep alive is seconds) while costing a few µs per ms even with hundreds of idle queues.
pub const SWEEP_INTERVAL_NS: u64 = 1_000_000;
/// Readiness reports taken per epoll call; more are collected by the next loop iteration.
const EPOLL_BATCH: usize = 256;

/// Counters of one poll group (relaxed atomics, one writer: the group's reactor), read by the
/// `stats.reactors` RPC and tests. A connection outside any group keeps its own.
#[derive(Debug, Default)]
pub struct GroupStats {
    /// Connections the group owns now.
    pub connections: AtomicU64,
    /// Socket reads attempted.
    pub recv_calls: AtomicU64,
    /// Socket reads that found nothing (`EAGAIN`): the cost readiness polling removes.
    pub recv_empty: AtomicU64,
    /// epoll calls made (one per loop iteration).
    pub epoll_waits: AtomicU64,
    /// Readiness reports received.
    pub epoll_events: AtomicU64,
    /// Housekeeping sweeps over every connection.
    pub sweeps: AtomicU64,
    /// Shared bdev channels open now (one per namespace in use on the reactor).
    pub channels_open: AtomicU64,
    /// Shared bdev channels opened over the group's life.
    pub channels_opened: AtomicU64,
    /// Data buffers the group's shared pool holds now (free or in use); freed when the group
    /// has no connection left.
    pub bufs_allocated: AtomicU64,
    /// Data buffers free in the shared pool now.
    pub bufs_free: AtomicU64,
    /// Requests that found no data buffer and waited for one (parked).
    pub buf_waits: AtomicU64,
}

impl GroupStats {
    /// Single-writer increment.
    #[inline]
    pub fn bump(c: &AtomicU64) {
        Self::add(c, 1);
    }
    /// Single-writer add.
    #[inline]
    pub fn add(c: &AtomicU64, v: u64) {
        c.store(c.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
    }
    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
    /// The counters as JSON (for `stats.reactors`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "connections": Self::get(&self.connections),
            "recv_calls": Self::get(&self.recv_calls),
            "recv_empty": Self::get(&self.recv_empty),
            "epoll_waits": Self::get(&self.epoll_waits),
            "epoll_events": Self::get(&self.epoll_events),
            "sweeps": Self::get(&self.sweeps),
            "channels_open": Self::get(&self.channels_open),
            "channels_opened": Self::get(&self.channels_opened),
            "bufs_allocated": Self::get(&self.bufs_allocated),
            "bufs_free": Self::get(&self.bufs_free),
            "buf_waits": Self::get(&self.buf_waits),
        })
    }
}

/// A bdev channel shared by the queues of one reactor.
pub type SharedChannel = Rc<RefCell<Box<dyn BdevChannel>>>;

/// The reactor's bdev channels, one per namespace in use, shared by its I/O queues (see the
/// module docs). Connections hold it through an `Rc` to look channels up at Connect and when
/// the namespace table changes; the group polls the channels and routes their completions.
pub struct ChannelSet {
    core: CoreId,
    depth: usize,
    entries: RefCell<Vec<(Arc<Namespace>, SharedChannel)>>,
    stats: Arc<GroupStats>,
}

impl ChannelSet {
    fn new(core: CoreId, depth: usize, stats: Arc<GroupStats>) -> Self {
        ChannelSet {
            core,
            depth: depth.max(1),
            entries: RefCell::new(Vec::new()),
            stats,
        }
    }

    /// The reactor's channel to `ns`, opened on first use.
    pub fn channel_for(&self, ns: &Arc<Namespace>) -> Result<SharedChannel, BdevError> {
        let mut entries = self.entries.borrow_mut();
        if let Some((_, ch)) = entries.iter().find(|(n, _)| Arc::ptr_eq(n, ns)) {
            return Ok(ch.clone());
        }
        let ch: SharedChannel = Rc::new(RefCell::new(ns.bdev.open_channel(self.core, self.depth)?));
        entries.push((ns.clone(), ch.clone()));
        GroupStats::bump(&self.stats.channels_opened);
        self.stats
            .channels_open
            .store(entries.len() as u64, Ordering::Relaxed);
        tracing::debug!(
            bdev = ns.bdev.name(),
            nsid = ns.nsid,
            depth = self.depth,
            "shared bdev channel opened"
        );
        Ok(ch)
    }

    /// Channels open now.
    pub fn len(&self) -> usize {
        self.entries.borrow().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes the channels no queue holds any more and with nothing in flight.
    fn close_unused(&self) {
        let mut entries = self.entries.borrow_mut();
        let before = entries.len();
        entries.retain(|(_, ch)| Rc::strong_count(ch) > 1 || ch.borrow().in_flight() > 0);
        if entries.len() != before {
            self.stats
                .channels_open
                .store(entries.len() as u64, Ordering::Relaxed);
        }
    }
}

/// Buffers a shared pool allocates at once when it runs dry (fewer where its cap or the
/// budget stop it): growth happens a few times per reactor, not once per new peak of load.
pub const GROW_CHUNK: usize = 32;

/// Alignment of the shared pool's buffers: a page suits every backend (O_DIRECT included).
pub const SHARED_BUF_ALIGN: usize = 4096;

/// The reactor's data buffers, shared by all its queues (see the module docs): `max_io_size`
/// bytes each, allocated on first need (never at Connect) up to the group's cap and the
/// target-wide `buffer_budget_mib` (each buffer is reserved with [`Target::reserve_buffers`]
/// before it is allocated, and released when the pool is dropped), then reused by every queue.
///
/// A queue that finds no buffer parks the request and registers in the waiters list (FIFO, one
/// entry per queue); while anyone waits, only the queue at its head may take a buffer, so a
/// freed buffer goes to the queue that has waited longest and no queue starves. Reactor-local:
/// no lock, no atomics but the counters.
pub struct SharedBufs {
    free: Vec<AlignedBuf>,
    buf_size: usize,
    total: usize,
    cap: usize,
    waiters: VecDeque<u32>,
    target: Option<Arc<Target>>,
    stats: Arc<GroupStats>,
}

/// A handle on a group's [`SharedBufs`] (connections hold one).
pub type BufShare = Rc<RefCell<SharedBufs>>;

impl SharedBufs {
    /// An empty pool holding at most `cap` buffers.
    pub fn new(cap: usize, stats: Arc<GroupStats>) -> Self {
        SharedBufs {
            free: Vec::new(),
            buf_size: 0,
            total: 0,
            cap: cap.max(1),
            waiters: VecDeque::new(),
            target: None,
            stats,
        }
    }

    /// A buffer with `len` bytes in use for the queue in group slot `slot`, or `None`: the pool
    /// is empty and may not grow, or other queues wait for buffers and `slot` is not the first
    /// of them (the caller then parks the request and calls [`SharedBufs::wait`]).
    pub fn get(&mut self, slot: u32, len: usize, target: &Arc<Target>) -> Option<IoBuf> {
        if self.waiters.front().is_some_and(|&w| w != slot) {
            return None;
        }
        if self.target.is_none() {
            self.buf_size = target.limits.max_io_size as usize;
            self.target = Some(target.clone());
        }
        if len > self.buf_size {
            return None;
        }
        if self.free.is_empty() {
            self.grow();
        }
        let mem = self.free.pop()?;
        self.stats
            .bufs_free
            .store(self.free.len() as u64, Ordering::Relaxed);
        Some(IoBuf::new(mem, len))
    }

    /// Allocates up to [`GROW_CHUNK`] more buffers into the free list, as far as the cap and
    /// the target's budget allow (a buffer once allocated stays in the pool until the group
    /// empties, so growth stops once the pool fits the reactor's load: the steady state
    /// allocates nothing).
    fn grow(&mut self) {
        let Some(t) = self.target.as_ref() else {
            return;
        };
        let bytes = self.buf_size as u64;
        let want = GROW_CHUNK.min(self.cap.saturating_sub(self.total));
        // The free list can hold every buffer: `put` never allocates.
        self.free.reserve(self.total + want - self.free.len());
        for _ in 0..want {
            if !t.reserve_buffers(bytes) {
                break;
            }
            let Some(mem) = AlignedBuf::for_io(self.buf_size, SHARED_BUF_ALIGN) else {
                t.release_buffers(bytes);
                break;
            };
            self.free.push(mem);
            self.total += 1;
        }
        self.stats
            .bufs_allocated
            .store(self.total as u64, Ordering::Relaxed);
    }

    /// Returns a buffer taken from this pool.
    pub fn put(&mut self, buf: IoBuf) {
        debug_assert!(self.free.len() < self.total, "shared pool over-filled");
        self.free.push(buf.into_mem());
        self.stats
            .bufs_free
            .store(self.free.len() as u64, Ordering::Relaxed);
    }

    /// Queue `slot` has a request waiting for a buffer: it joins the waiters (once).
    pub fn wait(&mut self, slot: u32) {
        if !self.waiters.contains(&slot) {
            self.waiters.push_back(slot);
        }
    }

    /// Queue `slot` waits for nothing any more (or is gone): it leaves the waiters.
    pub fn leave(&mut self, slot: u32) {
        if let Some(p) = self.waiters.iter().position(|&w| w == slot) {
            self.waiters.remove(p);
        }
    }

    /// Frees every buffer not in use and returns its reservation (called when the group has
    /// no connection left: an idle reactor holds no data buffers).
    pub fn trim(&mut self) {
        let n = self.free.len();
        if n == 0 {
            return;
        }
        self.free.clear();
        self.total -= n;
        if let Some(t) = self.target.as_ref() {
            t.release_buffers(n as u64 * self.buf_size as u64);
        }
        self.stats
            .bufs_allocated
            .store(self.total as u64, Ordering::Relaxed);
        self.stats.bufs_free.store(0, Ordering::Relaxed);
    }

    /// Buffers allocated (free or in use).
    pub fn total(&self) -> usize {
        self.total
    }
    /// Buffers free now.
    pub fn available(&self) -> usize {
        self.free.len()
    }
    /// Queues waiting for a buffer.
    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }
}

impl Drop for SharedBufs {
    fn drop(&mut self) {
        if let Some(t) = self.target.take() {
            t.release_buffers(self.total as u64 * self.buf_size as u64);
        }
    }
}

/// The connections of one reactor (see the module docs).
pub struct PollGroup {
    epoll: Epoll,
    /// Connection slots; the slot index is the epoll token. Freed slots are reused.
    conns: Vec<Option<Connection>>,
    free: Vec<usize>,
    /// Slots to poll this loop (readiness reported, or work left from the last poll), and
    /// whether each slot is in that list; idle connections are in neither until a report or a
    /// sweep, so a loop costs nothing per idle connection.
    active: Vec<usize>,
    listed: Vec<bool>,
    /// The next loop's list, built while this one is polled (both keep their capacity).
    next_active: Vec<usize>,
    stats: Arc<GroupStats>,
    channels: Rc<ChannelSet>,
    bufs: BufShare,
    next_sweep: u64,
    sweep_ticks: u64,
    /// An epoll failure was logged (once: it is not expected to recover or to be transient).
    epoll_failed: bool,
}

impl PollGroup {
    /// An empty group for the reactor on `core`, publishing its counters to `stats`; its shared
    /// bdev channels hold `channel_depth` I/Os each (`Limits::reactor_channel_depth`).
    pub fn new(
        core: CoreId,
        channel_depth: usize,
        stats: Arc<GroupStats>,
    ) -> io::Result<PollGroup> {
        Ok(PollGroup {
            epoll: Epoll::new(EPOLL_BATCH)?,
            conns: Vec::new(),
            free: Vec::new(),
            active: Vec::new(),
            listed: Vec::new(),
            next_active: Vec::new(),
            channels: Rc::new(ChannelSet::new(core, channel_depth, stats.clone())),
            bufs: Rc::new(RefCell::new(SharedBufs::new(usize::MAX, stats.clone()))),
            stats,
            next_sweep: 0,
            sweep_ticks: clock::ns_to_ticks(SWEEP_INTERVAL_NS).max(1),
            epoll_failed: false,
        })
    }

    /// Takes ownership of `conn` and registers its socket; on failure the connection is dropped
    /// (which closes it) and the reason returned for the caller to log.
    pub fn add(&mut self, mut conn: Connection) -> io::Result<()> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.conns.push(None);
                self.listed.push(false);
                // The lists hold every slot at most once: reserve here, off the data path.
                let n = self.conns.len();
                self.active.reserve(n.saturating_sub(self.active.len()));
                self.next_active
                    .reserve(n.saturating_sub(self.next_active.len()));
                self.conns.len() - 1
            }
        };
        if let Err(e) = self.epoll.add(conn.raw_fd(), slot as u64) {
            self.free.push(slot);
            drop(conn);
            return Err(e);
        }
        conn.join_group(
            self.stats.clone(),
            slot as u32,
            self.channels.clone(),
            self.bufs.clone(),
        );
        self.conns[slot] = Some(conn);
        if !self.listed[slot] {
            self.listed[slot] = true;
            self.active.push(slot);
        }
        GroupStats::bump(&self.stats.connections);
        Ok(())
    }

    /// Connections owned now.
    pub fn len(&self) -> usize {
        self.conns.len() - self.free.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The group's counters.
    pub fn stats(&self) -> &Arc<GroupStats> {
        &self.stats
    }
    /// Shared bdev channels open now.
    pub fn channels_open(&self) -> usize {
        self.channels.len()
    }
    /// Caps the shared data-buffer pool at `max_bytes` (at least one buffer): the reactor's
    /// share of `buffer_budget_mib`, so no reactor can be left without buffers by the others.
    /// Call before the first connection; the default is the target-wide budget alone.
    pub fn set_buffer_cap(&mut self, max_bytes: u64, buf_size: u32) {
        let n = (max_bytes / u64::from(buf_size.max(1))).max(1);
        self.bufs.borrow_mut().cap = usize::try_from(n).unwrap_or(usize::MAX);
    }
    /// The shared data-buffer pool (tests, stats).
    pub fn buffers(&self) -> &BufShare {
        &self.bufs
    }

    fn remove(&mut self, slot: usize) {
        if let Some(c) = self.conns[slot].take() {
            // The socket closes with the connection, which also removes it from the set; the
            // explicit delete keeps the set exact even if the fd were shared.
            let _ = self.epoll.delete(c.raw_fd());
            drop(c);
            self.free.push(slot);
            let n = GroupStats::get(&self.stats.connections).saturating_sub(1);
            self.stats.connections.store(n, Ordering::Relaxed);
        }
    }
}

impl Poller for PollGroup {
    fn name(&self) -> &str {
        "nvmf-poll-group"
    }

    fn poll(&mut self) -> usize {
        if self.is_empty() {
            if !self.channels.is_empty() {
                self.channels.close_unused();
            }
            if self.bufs.borrow().total() > 0 {
                self.bufs.borrow_mut().trim();
            }
            return 0;
        }
        let mut work = 0;
        let conns = &mut self.conns;
        let (active, listed) = (&mut self.active, &mut self.listed);
        GroupStats::bump(&self.stats.epoll_waits);
        match self.epoll.poll(|r| {
            let slot = r.token as usize;
            if let Some(Some(c)) = conns.get_mut(slot) {
                c.set_readable();
                if !listed[slot] {
                    listed[slot] = true;
                    active.push(slot);
                }
            }
        }) {
            Ok(n) => {
                if n > 0 {
                    GroupStats::add(&self.stats.epoll_events, n as u64);
                }
            }
            Err(e) => {
                // Without readiness reports, read every socket every loop (the old cost, but
                // correct) rather than leave a connection unread.
                if !self.epoll_failed {
                    self.epoll_failed = true;
                    tracing::error!(error = %e, "epoll_wait failed; reading every socket each loop from now on");
                }
                for (slot, c) in conns.iter_mut().enumerate() {
                    if let Some(c) = c {
                        c.set_readable();
                        if !listed[slot] {
                            listed[slot] = true;
                            active.push(slot);
                        }
                    }
                }
            }
        }
        let now = clock::ticks();
        let sweep = now >= self.next_sweep;
        if sweep {
            self.next_sweep = now + self.sweep_ticks;
            GroupStats::bump(&self.stats.sweeps);
        }
        // Completions of the shared channels, each to the connection that submitted it. Idle
        // channels are polled at sweeps only (a crypto channel then lets go of a replaced key).
        {
            let conns = &mut self.conns;
            for (_, ch) in self.channels.entries.borrow().iter() {
                let mut ch = ch.borrow_mut();
                if ch.in_flight() == 0 && !sweep {
                    continue;
                }
                work += ch.poll(&mut |io| {
                    let slot = (io.ctx >> 32) as usize;
                    match conns.get_mut(slot) {
                        Some(Some(c)) => c.io_done(io),
                        // Unreachable: a connection leaves the group only with nothing at a
                        // bdev. Its buffer is freed with the I/O.
                        _ => tracing::error!(slot, "bdev completion for a connection that is gone"),
                    }
                });
            }
        }
        // Poll the listed connections (all of them at a sweep) and list for the next loop those
        // with work left. A connection with work is always listed: it got bytes (epoll), or it
        // had work at its last poll (bdev completions only come for I/O it submitted then).
        self.next_active.clear();
        let n = if sweep {
            self.conns.len()
        } else {
            self.active.len()
        };
        for k in 0..n {
            let slot = if sweep { k } else { self.active[k] };
            self.listed[slot] = false;
            let Some(c) = self.conns[slot].as_mut() else {
                continue;
            };
            work += c.poll();
            if c.is_closed() {
                self.remove(slot);
                work += 1;
            } else if c.wants_poll() {
                self.listed[slot] = true;
                self.next_active.push(slot);
            }
        }
        if sweep {
            // Slots listed by epoll this loop were polled above too.
            for &slot in &self.active {
                self.listed[slot] = false;
            }
            for &slot in &self.next_active {
                self.listed[slot] = true;
            }
            self.channels.close_unused();
        }
        std::mem::swap(&mut self.active, &mut self.next_active);
        work
    }

    fn in_flight(&self) -> usize {
        self.conns.iter().flatten().map(|c| c.in_flight()).sum()
    }

    fn as_any_mut(&mut self) -> Option<&mut (dyn std::any::Any + 'static)> {
        Some(self)
    }
}
