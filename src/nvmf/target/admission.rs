//! Admission accounting of the target: connection slots in two stages (pre-Connect sockets per
//! source, connected queue pairs per host), the per-phase counts `stats.nvmf` reports, and the
//! target-wide budget for queue data buffers. Split out of `target.rs` along that seam; these
//! counters are touched at accept, Connect and drop only, never on the I/O path.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::Target;

impl Target {
    /// Admits an accepted socket from `source` into a pre-Connect slot, or says why not:
    /// `max_pre_connect` sockets are waiting for Connect, or `source` holds
    /// `max_connections_per_source` sockets already. Reactors call it at accept; a socket
    /// admitted here must be let go with [`Target::release_socket`].
    pub(crate) fn admit_socket(&self, source: IpAddr) -> Result<(), SlotRefusal> {
        let l = &self.limits;
        let mut per_source = lock(&self.slots.per_source);
        let held = per_source.get(&source).copied().unwrap_or(0);
        if held >= l.max_connections_per_source {
            return Err(SlotRefusal::PerSource(l.max_connections_per_source));
        }
        if self
            .slots
            .pre_connect
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < l.max_pre_connect).then_some(n + 1)
            })
            .is_err()
        {
            return Err(SlotRefusal::PreConnect(l.max_pre_connect));
        }
        per_source.insert(source, held + 1);
        Ok(())
    }

    /// Trades a socket's pre-Connect slot for a connection slot once its Connect is accepted
    /// for host `hostnqn`, or says why not (`max_connections` queue pairs are connected, or
    /// the host holds `max_queues_per_host`); on refusal the socket keeps its pre-Connect slot.
    pub(crate) fn promote_socket(&self, hostnqn: &str) -> Result<(), SlotRefusal> {
        let l = &self.limits;
        let mut per_host = lock(&self.slots.per_host);
        let held = per_host.get(hostnqn).copied().unwrap_or(0);
        if held >= l.max_queues_per_host {
            return Err(SlotRefusal::PerHost(l.max_queues_per_host));
        }
        if self
            .slots
            .connected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < l.max_connections).then_some(n + 1)
            })
            .is_err()
        {
            return Err(SlotRefusal::Connections(l.max_connections));
        }
        per_host.insert(hostnqn.to_string(), held + 1);
        self.slots.pre_connect.fetch_sub(1, Ordering::AcqRel);
        Ok(())
    }
    /// Reserves `bytes` of queue data buffers under `Limits::buffer_budget_mib`; false (nothing
    /// reserved) if that would go over it.
    pub(crate) fn reserve_buffers(&self, bytes: u64) -> bool {
        let budget = u64::from(self.limits.buffer_budget_mib) << 20;
        self.buffer_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                n.checked_add(bytes).filter(|&t| t <= budget)
            })
            .is_ok()
    }
    /// Returns a reservation made by [`Target::reserve_buffers`].
    pub(crate) fn release_buffers(&self, bytes: u64) {
        self.buffer_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
    /// Bytes of queue data buffers reserved now (all queues of the target).
    pub fn buffer_bytes_reserved(&self) -> u64 {
        self.buffer_bytes.load(Ordering::Acquire)
    }

    /// Undoes [`Target::promote_socket`] (the queue could not be set up after all): the socket
    /// is back in a pre-Connect slot, even if that briefly exceeds `max_pre_connect`.
    pub(crate) fn demote_socket(&self, hostnqn: &str) {
        self.release_host(hostnqn);
        self.slots.connected.fetch_sub(1, Ordering::AcqRel);
        self.slots.pre_connect.fetch_add(1, Ordering::AcqRel);
    }

    /// Lets go of an admitted socket's slots: its connection slot and host count if it was
    /// promoted (`connected_as` = its host NQN), else its pre-Connect slot, and its source's.
    pub(crate) fn release_socket(&self, source: IpAddr, connected_as: Option<&str>) {
        match connected_as {
            Some(h) => {
                self.release_host(h);
                self.slots.connected.fetch_sub(1, Ordering::AcqRel);
            }
            None => {
                self.slots.pre_connect.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let mut per_source = lock(&self.slots.per_source);
        if let Some(n) = per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                per_source.remove(&source);
            }
        }
    }

    fn release_host(&self, hostnqn: &str) {
        let mut per_host = lock(&self.slots.per_host);
        if let Some(n) = per_host.get_mut(hostnqn) {
            *n -= 1;
            if *n == 0 {
                per_host.remove(hostnqn);
            }
        }
    }

    /// Records that a connection moved from phase `from` to `to` (`None` = not counted: before
    /// it exists, after it is dropped).
    pub(crate) fn count_phase(&self, from: Option<ConnPhase>, to: Option<ConnPhase>) {
        if let Some(f) = from {
            self.slots.phases[f as usize].fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(t) = to {
            self.slots.phases[t as usize].fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Connected queue pairs (Fabrics Connect succeeded, socket not dropped yet).
    pub fn connection_count(&self) -> usize {
        self.slots.connected.load(Ordering::Acquire)
    }

    /// Sockets waiting for (or refused) their Fabrics Connect.
    pub fn pre_connect_count(&self) -> usize {
        self.slots.pre_connect.load(Ordering::Acquire)
    }

    /// A snapshot of the connection counters (the `stats.nvmf` RPC; soak tests).
    pub fn connection_stats(&self) -> ConnectionStats {
        let phase = |p: ConnPhase| self.slots.phases[p as usize].load(Ordering::Acquire);
        let per_source = lock(&self.slots.per_source);
        let per_host = lock(&self.slots.per_host);
        ConnectionStats {
            connected: self.connection_count(),
            pre_connect: self.pre_connect_count(),
            await_icreq: phase(ConnPhase::AwaitIcReq),
            ready: phase(ConnPhase::Ready),
            closing: phase(ConnPhase::Closing),
            closed: phase(ConnPhase::Closed),
            sources: per_source.len(),
            max_per_source: per_source.values().copied().max().unwrap_or(0),
            hosts: per_host.len(),
            max_per_host: per_host.values().copied().max().unwrap_or(0),
        }
    }
}

/// Why a socket or a queue got no slot (logged with the peer; see [`Target::admit_socket`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotRefusal {
    /// `max_pre_connect` sockets are waiting for Connect.
    PreConnect(usize),
    /// The source address holds `max_connections_per_source` sockets.
    PerSource(usize),
    /// `max_connections` queue pairs are connected.
    Connections(usize),
    /// The host NQN holds `max_queues_per_host` queue pairs.
    PerHost(usize),
}

impl SlotRefusal {
    /// The limit that refused, as named in the config.
    pub fn limit(&self) -> &'static str {
        match self {
            SlotRefusal::PreConnect(_) => "max_pre_connect",
            SlotRefusal::PerSource(_) => "max_connections_per_source",
            SlotRefusal::Connections(_) => "max_connections",
            SlotRefusal::PerHost(_) => "max_queues_per_host",
        }
    }
}

impl std::fmt::Display for SlotRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (SlotRefusal::PreConnect(n)
        | SlotRefusal::PerSource(n)
        | SlotRefusal::Connections(n)
        | SlotRefusal::PerHost(n)) = *self;
        let what = match self {
            SlotRefusal::PreConnect(_) => "sockets are waiting for Fabrics Connect",
            SlotRefusal::PerSource(_) => "sockets are open from this source address",
            SlotRefusal::Connections(_) => "queue pairs are connected",
            SlotRefusal::PerHost(_) => "queue pairs are held by this host NQN",
        };
        write!(f, "{} ({n}) reached: {n} {what}", self.limit())
    }
}

/// A connection's phase as the target counts it (see `nvmf::conn`, where each is explained).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnPhase {
    /// Accepted; no ICReq yet.
    AwaitIcReq = 0,
    /// ICReq exchanged; capsules flow (Connect pending or done).
    Ready = 1,
    /// A fatal error is being reported (C2HTermReq); bounded by `closing_timeout_ms`.
    Closing = 2,
    /// Socket shut down; bdev I/O still draining.
    Closed = 3,
}

/// Connection counters of the target (see [`Target::connection_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConnectionStats {
    /// Queue pairs whose Connect succeeded (limit `max_connections`).
    pub connected: usize,
    /// Sockets without a successful Connect (limit `max_pre_connect`).
    pub pre_connect: usize,
    /// Connections per phase.
    pub await_icreq: usize,
    pub ready: usize,
    pub closing: usize,
    pub closed: usize,
    /// Distinct source addresses with a socket, and the most sockets one of them holds.
    pub sources: usize,
    pub max_per_source: usize,
    /// Distinct host NQNs with a connected queue, and the most queues one of them holds.
    pub hosts: usize,
    pub max_per_host: usize,
}

/// The slot counters behind [`Target::admit_socket`] and friends. The maps are taken at accept,
/// Connect and drop only, never on the I/O path.
#[derive(Default)]
pub(super) struct Slots {
    pre_connect: AtomicUsize,
    connected: AtomicUsize,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    per_host: Mutex<HashMap<String, usize>>,
    phases: [AtomicUsize; 4],
}

/// Locks a map of [`Slots`]; a poisoned lock (a panic elsewhere) is recovered: counts stay
/// structurally valid.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
