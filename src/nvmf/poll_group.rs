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
//! Runs on its reactor only; control threads reach it by reactor message
//! ([`crate::reactor::Reactor::poller_as`]). It exists so that what a reactor shares between
//! its queue pairs (the epoll set, the counters) has one owner.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::nvmf::conn::Connection;
use crate::reactor::Poller;
use crate::sys::clock;
use crate::sys::epoll::Epoll;

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
        })
    }
}

/// The connections of one reactor (see the module docs).
pub struct PollGroup {
    epoll: Epoll,
    /// Connection slots; the slot index is the epoll token. Freed slots are reused.
    conns: Vec<Option<Connection>>,
    free: Vec<usize>,
    stats: Arc<GroupStats>,
    next_sweep: u64,
    sweep_ticks: u64,
    /// An epoll failure was logged (once: it is not expected to recover or to be transient).
    epoll_failed: bool,
}

impl PollGroup {
    /// An empty group publishing its counters to `stats`.
    pub fn new(stats: Arc<GroupStats>) -> io::Result<PollGroup> {
        Ok(PollGroup {
            epoll: Epoll::new(EPOLL_BATCH)?,
            conns: Vec::new(),
            free: Vec::new(),
            stats,
            next_sweep: 0,
            sweep_ticks: clock::ns_to_ticks(SWEEP_INTERVAL_NS).max(1),
            epoll_failed: false,
        })
    }

    /// Takes ownership of `conn` and registers its socket; on failure the connection is handed
    /// back with the reason (the caller drops it, which closes it).
    pub fn add(&mut self, mut conn: Connection) -> Result<(), (Connection, io::Error)> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        if let Err(e) = self.epoll.add(conn.raw_fd(), slot as u64) {
            self.free.push(slot);
            return Err((conn, e));
        }
        conn.join_group(self.stats.clone());
        self.conns[slot] = Some(conn);
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
            return 0;
        }
        let mut work = 0;
        let conns = &mut self.conns;
        GroupStats::bump(&self.stats.epoll_waits);
        match self.epoll.poll(|r| {
            if let Some(Some(c)) = conns.get_mut(r.token as usize) {
                c.set_readable();
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
                for c in conns.iter_mut().flatten() {
                    c.set_readable();
                }
            }
        }
        let now = clock::ticks();
        let sweep = now >= self.next_sweep;
        if sweep {
            self.next_sweep = now + self.sweep_ticks;
            GroupStats::bump(&self.stats.sweeps);
        }
        for slot in 0..self.conns.len() {
            let Some(c) = self.conns[slot].as_mut() else {
                continue;
            };
            if sweep || c.wants_poll() {
                work += c.poll();
                if c.is_closed() {
                    self.remove(slot);
                    work += 1;
                }
            }
        }
        work
    }

    fn in_flight(&self) -> usize {
        self.conns.iter().flatten().map(|c| c.in_flight()).sum()
    }

    fn as_any_mut(&mut self) -> Option<&mut (dyn std::any::Any + 'static)> {
        Some(self)
    }
}
