//! One NVMe/TCP queue pair on the target side: a non-blocking `TcpStream`, its receive and send
//! state machines, its preallocated request slots and data buffers, and the I/O command path.
//!
//! A [`Connection`] is owned by one reactor for its whole life and driven by [`Connection::poll`]
//! (a reactor poller step: it never blocks and returns the units of work done); every file of
//! this module runs on that reactor. The admin and Fabrics command handlers live in
//! `super::admin`; this module owns the transport and the I/O commands, split along its seams:
//!
//! * this file — the [`Connection`] struct, its request slots and [`ReqState`], the poll loop,
//!   buffers, teardown, events/timers and the per-queue setup at Connect;
//! * `bufs` — data buffers: the shared pool of the poll group or the queue's own, waiting for
//!   one, and the per-queue setup at Connect;
//! * `recv` — the PDU receive state machine (ICReq, CapsuleCmd, H2CData, digests);
//! * `exec` — I/O command execution: checks, bdev submission and completion, Dataset
//!   Management, in-capsule write batching;
//! * `xfer` — data transfer to the host: completions, C2HData/R2T/CapsuleResp on the send queue;
//! * `namespaces` — this queue's copy of the namespace table and its bdev channels;
//! * `shutdown` — the namespace flushes of a controller shutdown (CC.SHN).
//!
//! Request life: every request slot is in exactly one [`ReqState`]; every change of state goes
//! through `Connection::transition`, which checks the move and records it (trace + counters).
//! Slots and the buffer pool are allocated when the connection is created and at Connect; the
//! steady state allocates nothing and takes no lock: the controller's `Mutex` is only used on the
//! admin queue and at Connect/teardown.

mod bufs;
mod exec;
mod namespaces;
mod recv;
mod shutdown;
mod xfer;

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bdev::{BdevChannel, BufPool, IoBuf, IoType};
use crate::nvme::{Cqe, Sqe, Status};
use crate::nvmf::pdu::{
    self, CommonHeader, Digests, Fes, Layout, PduError, TermReq, DIGEST_LEN, MAX_HEADER_REGION,
};
use crate::nvmf::poll_group::{BufShare, ChannelSet, GroupStats, SharedChannel, SHARED_BUF_ALIGN};
use crate::nvmf::target::{
    ConnPhase, Controller, Namespace, PortId, QueueStats, SlotRefusal, Subsystem, Target,
};
use crate::stats::reactor::ConnStats;
use crate::sys::clock;
use crate::types::CoreId;

use shutdown::ShutdownFlush;

/// Bytes of the receive staging buffer: headers and small data are read through it.
const RX_BUF_SIZE: usize = 64 * 1024;
/// Before Connect only the Connect command is meaningful; these few small buffers hold its data
/// (the admin queue accepts 8 KiB of in-capsule data, per the Fabrics spec).
const BOOT_BUFS: usize = 2;
const BOOT_BUF_SIZE: usize = 8192;
/// Size of a request's send-header scratch: a 24-byte header, its digest, and padding up to an
/// HPDA of 31 (128-byte alignment).
const TX_HDR_SIZE: usize = 128;

/// Errors creating a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// No slot for the socket (pre-Connect budget or per-source cap); logged, rate-limited.
    #[error("connection refused: {0}")]
    Refused(SlotRefusal),
    #[error("socket setup: {0}")]
    Io(#[from] io::Error),
    #[error("out of memory for connection buffers")]
    NoMemory,
}

/// The life of one request slot. One enum, one comment per state; see `Connection::transition`
/// for the allowed moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReqState {
    /// In the free list; owns no buffer.
    Free,
    /// CapsuleCmd header decoded; its in-capsule data (if any) is arriving into the request's
    /// buffer. A command without data passes through this state on its way to dispatch.
    RecvCapsuleData,
    /// The command needs host data that was not in the capsule; its R2T is on the send queue.
    R2tQueued,
    /// The R2T went out; H2CData PDUs are arriving into the request's buffer.
    RecvH2cData,
    /// All data is in; the bdev channel said Busy, the request waits to be resubmitted.
    ReadyToExecute,
    /// Submitted to the bdev; it comes back through the channel's `poll`.
    Executing,
    /// An Asynchronous Event Request held until an event fires or an Abort takes it.
    AwaitingEvent,
    /// Its C2HData PDU is on the send queue (or partly sent).
    TxC2hData,
    /// Its CapsuleResp is on the send queue (or partly sent); the slot frees once it is out.
    TxResp,
}

const N_STATES: usize = 9;

impl ReqState {
    fn index(self) -> usize {
        self as usize
    }
    /// Whether a request may move from `self` to `to`.
    fn may_move_to(self, to: ReqState) -> bool {
        use ReqState::*;
        match (self, to) {
            // Any live request is released when the connection closes.
            (_, Free) => self != Free,
            (
                Free,
                RecvCapsuleData | R2tQueued | ReadyToExecute | Executing | AwaitingEvent
                | TxC2hData | TxResp,
            ) => true,
            (
                RecvCapsuleData,
                R2tQueued | ReadyToExecute | Executing | AwaitingEvent | TxC2hData | TxResp,
            ) => true,
            (R2tQueued, RecvH2cData) => true,
            (RecvH2cData, ReadyToExecute | Executing | TxC2hData | TxResp) => true,
            (ReadyToExecute, Executing | ReadyToExecute | TxResp) => true,
            (Executing, TxC2hData | TxResp | Executing | ReadyToExecute) => true,
            (AwaitingEvent, TxResp) => true,
            (TxC2hData, TxResp) => true,
            _ => false,
        }
    }
}

/// Where a request's data buffer came from (and goes back to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BufSrc {
    /// The connection's boot pool: before Connect, admin data, and the in-capsule reserve.
    Boot,
    /// The queue's own pool (a connection outside any poll group).
    Own,
    /// The poll group's shared pool.
    Shared,
}

/// One request slot.
pub(super) struct Request {
    pub(super) state: ReqState,
    pub(super) sqe: Sqe,
    /// Data buffer (host data for writes, outgoing data for reads/admin).
    pub(super) buf: Option<IoBuf>,
    /// Which pool the buffer came from.
    buf_src: BufSrc,
    /// Host-to-controller bytes this command transfers (in capsule or by R2T).
    xfer_len: u32,
    /// H2CData bytes received so far.
    h2c_done: u32,
    /// Set by handlers whose buffer holds data for the host (reads, Identify, logs).
    pub(super) c2h: bool,
    pub(super) cqe: Cqe,
    /// Bdev I/O parameters.
    ns_idx: usize,
    io_type: IoType,
    io_lba: u64,
    io_nlb: u32,
    /// A Write with Force Unit Access (CDW12 bit 30): the bdev completes it only once durable.
    io_fua: bool,
    /// Dataset Management: next range to submit, number of ranges, I/Os outstanding.
    sub_next: u16,
    sub_total: u16,
    sub_pending: u16,
    sub_status: Status,
    /// Send side: the current PDU's header, whether data + digest follow it, bytes sent.
    tx_hdr: [u8; TX_HDR_SIZE],
    tx_hdr_len: usize,
    tx_data: bool,
    tx_ddgst: [u8; DIGEST_LEN],
    tx_off: usize,
    /// The C2HData carries the SUCCESS flag: no CapsuleResp follows it.
    tx_success: bool,
    /// `clock::ticks()` when the command capsule was decoded (latency stats).
    t_rx: u64,
    /// A Write's in-capsule data not copied out of `rx_buf` yet: its offset and length there.
    /// Valid until `rx_buf` is refilled; [`Connection::flush_icd`] runs before that.
    icd_at: Option<(u32, u32)>,
    /// The Write with `icd_at` passed every check and waits for `flush_icd` to submit it.
    icd_go: bool,
}

impl Request {
    fn new() -> Self {
        Request {
            state: ReqState::Free,
            sqe: Sqe::default(),
            buf: None,
            buf_src: BufSrc::Boot,
            xfer_len: 0,
            h2c_done: 0,
            c2h: false,
            cqe: Cqe::default(),
            ns_idx: 0,
            io_type: IoType::Flush,
            io_lba: 0,
            io_nlb: 0,
            io_fua: false,
            sub_next: 0,
            sub_total: 0,
            sub_pending: 0,
            sub_status: Status::SUCCESS,
            tx_hdr: [0; TX_HDR_SIZE],
            tx_hdr_len: 0,
            tx_data: false,
            tx_ddgst: [0; DIGEST_LEN],
            tx_off: 0,
            tx_success: false,
            t_rx: 0,
            icd_at: None,
            icd_go: false,
        }
    }
}

/// Where received data goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataKind {
    Capsule,
    H2c,
}

/// Receive state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rx {
    /// Accumulating a PDU header region (common header, header, digest, padding).
    Header,
    /// Copying `left` data bytes into request `idx`'s buffer at `off`.
    Data {
        idx: usize,
        kind: DataKind,
        off: usize,
        left: usize,
        start: usize,
    },
    /// Reading the 4-byte data digest of the data just received.
    Digest {
        idx: usize,
        kind: DataKind,
        start: usize,
        len: usize,
    },
}

// Connection-level phase (the target counts connections per phase, so the enum lives there):
// * `AwaitIcReq` — waiting for ICReq, at most `icreq_timeout_ms` after accept;
// * `Ready` — initialized, capsules flow; Connect due `connect_timeout_ms` after accept;
// * `Closing` — a TermReq is being flushed, no more input is read; the controller is already
//   let go of (killed if this is its admin queue), and after `closing_timeout_ms` the socket
//   is shut down whether or not the TermReq went out;
// * `Closed` — socket shut down; only bdev completions are still drained.
//
// Every change goes through `Connection::set_phase`.
use ConnPhase as Phase;

/// A fatal transport error: the TermReq to send (if any).
#[derive(Clone, Copy, Debug)]
pub(super) struct Fatal {
    fes: Option<(Fes, u32)>,
}

impl Fatal {
    pub(super) fn term(fes: Fes, fei: u32) -> Self {
        Fatal {
            fes: Some((fes, fei)),
        }
    }
    fn from_pdu(e: PduError) -> Self {
        Fatal { fes: e.fes() }
    }
}

/// Outcome of a command handler.
pub(super) enum Action {
    /// Complete now with this status (data in the buffer is sent when `c2h` is set).
    Complete(Status),
    /// Submitted to a bdev, or held (AER): completes later.
    Pending,
}

/// Data pool buffer alignment at least: a page, enough for O_DIRECT backends.
const POOL_ALIGN: usize = 4096;

/// A queue's bdev channel to one namespace: its own (a connection outside a poll group), or
/// its reactor's, shared with the other queues there (whose poll group polls it and routes the
/// completions back by the tag in `BdevIo::ctx`).
pub(super) enum Chan {
    Own(Box<dyn BdevChannel>),
    Shared(SharedChannel),
}

impl Chan {
    /// Runs `f` on the channel.
    #[inline]
    pub(super) fn with<R>(&mut self, f: impl FnOnce(&mut dyn BdevChannel) -> R) -> R {
        match self {
            Chan::Own(c) => f(&mut **c),
            Chan::Shared(c) => f(&mut **c.borrow_mut()),
        }
    }
}

/// One NVMe/TCP queue pair (see the module docs).
pub struct Connection {
    stream: TcpStream,
    pub(super) target: Arc<Target>,
    core: CoreId,
    phase: Phase,
    pub(super) dg: Digests,
    hpda: u8,
    // Receive side.
    rx_buf: Box<[u8]>,
    rx_pos: usize,
    rx_len: usize,
    rx: Rx,
    rx_hdr: [u8; MAX_HEADER_REGION],
    rx_have: usize,
    rx_layout: Option<(CommonHeader, Layout)>,
    rx_dig: [u8; DIGEST_LEN],
    rx_dig_have: usize,
    rx_crc: u32,
    /// Whether a read may find bytes: always true outside a poll group (every receive step
    /// reads); inside one, set by the group's epoll report and cleared by the `EAGAIN` that
    /// ends an edge-triggered drain, so an idle socket is never read.
    rx_ready: bool,
    /// Registered with a [`crate::nvmf::poll_group::PollGroup`] (readiness-driven reads).
    in_group: bool,
    /// Receive counters: this connection's own, or its poll group's shared ones once it joins.
    rx_stats: Arc<GroupStats>,
    // Session.
    pub(super) ctrl: Option<Arc<Controller>>,
    pub(super) subsys: Option<Arc<Subsystem>>,
    pub(super) qid: u16,
    /// I/O queues: the controller's I/O queue generation at Connect; a reset moves it on.
    pub(in crate::nvmf) io_gen: u64,
    pub(super) sqhd_disabled: bool,
    /// Queue depth granted at Connect (SQSIZE + 1); before Connect the boot depth.
    pub(super) depth: usize,
    sqhd: u16,
    pub(super) reqs: Vec<Request>,
    free: Vec<usize>,
    outstanding: usize,
    state_counts: [u32; N_STATES],
    boot_pool: BufPool,
    pub(super) pool: Option<BufPool>,
    /// The poll group's shared data buffers, once in a group.
    group_bufs: Option<BufShare>,
    /// This queue takes its data buffers from `group_bufs` (set at Connect in a group).
    pub(super) shared_bufs: bool,
    /// Requests waiting for a shared buffer (Reads and R2T writes, in arrival order); each is
    /// in `RecvCapsuleData` and goes through `command_ready` again when retried.
    buf_wait: VecDeque<usize>,
    /// A command capsule whose in-capsule data found no buffer: the request, and its data
    /// length. Nothing more is read from the socket until it gets one.
    icd_wait: Option<(usize, usize)>,
    /// Set while `retry_bufs` runs: takes may go ahead of `buf_wait`, a failed one parks at
    /// the front again.
    buf_retrying: bool,
    buf_retry_failed: bool,
    /// Bdev channel per namespace slot (index = nsid - 1), I/O queues only.
    pub(super) channels: Vec<Option<Chan>>,
    /// The poll group's shared channels, once in a group (else each queue opens its own).
    pub(super) group_channels: Option<Rc<ChannelSet>>,
    /// This connection's slot in its poll group, tagged into `BdevIo::ctx` bits 63..32.
    group_slot: u32,
    /// I/Os submitted to a bdev and not completed yet (own, shared and retired channels).
    pub(super) bdev_pending: usize,
    /// Data buffer bytes reserved under the target's budget (released on drop).
    reserved_bytes: u64,
    /// This queue's copy of the subsystem's namespace table (index = nsid - 1): what the I/O
    /// path reads, so it takes no lock. Refreshed when `ns_gen` falls behind the subsystem's.
    ns_cache: Vec<Option<Arc<Namespace>>>,
    /// Namespace table generation `ns_cache` reflects; 0 until this is an I/O queue.
    ns_gen: u64,
    /// Alignment of the data pool's buffers (set at Connect).
    pool_align: usize,
    /// Channels of removed (or replaced) namespaces with I/O still in flight: polled until
    /// drained, then dropped with their namespace reference.
    retired: Vec<(Arc<Namespace>, Box<dyn BdevChannel>)>,
    exec_queue: VecDeque<usize>,
    /// Requests whose in-capsule data was left in `rx_buf` (`Request::icd_at`), in arrival
    /// order; emptied by `flush_icd` before every refill of `rx_buf`.
    icd_deferred: Vec<usize>,
    tx_queue: VecDeque<usize>,
    ctl_buf: [u8; 24 + pdu::TERM_MAX_DATA],
    ctl_len: usize,
    ctl_off: usize,
    /// Held Asynchronous Event Requests (slot indices).
    pub(super) aers: Vec<usize>,
    /// Format NVM commands waiting for the erase thread (slot index, where it leaves the status).
    pub(super) erase_wait: Vec<(usize, std::sync::Arc<crate::nvmf::erase::Done>)>,
    pub(super) ka_deadline: Option<Instant>,
    /// Deadline for completing Fabrics Connect (cleared once connected).
    pub(super) connect_deadline: Option<Instant>,
    /// Deadline for the ICReq (checked while the phase is `AwaitIcReq`).
    icreq_deadline: Instant,
    /// Deadline for sending the TermReq once `Closing`.
    closing_deadline: Option<Instant>,
    /// The peer's address: its sockets count against `max_connections_per_source`.
    source: IpAddr,
    /// Set once Connect succeeded: the host NQN whose `max_queues_per_host` count and whose
    /// connection slot this socket holds (until then it holds a pre-Connect slot).
    pub(super) connected_as: Option<String>,
    pub(super) stats: Arc<QueueStats>,
    /// This connection's handles into its reactor's per-namespace latency stats.
    io_stats: ConnStats,
    /// The target port (listener) it was accepted on: Connect and discovery are scoped to it.
    pub(super) port: PortId,
    /// The host's address, for the log.
    pub(super) peer: Option<std::net::SocketAddr>,
    /// Flushes of a controller shutdown in progress (admin queue only; empty otherwise).
    shutdown: Vec<ShutdownFlush>,
    /// A shutdown flush failed: CSTS.SHST never reports complete for it.
    shutdown_failed: bool,
}

impl Connection {
    /// Wraps a stream accepted on target port `port` (see [`Target::port_for`]): only the
    /// subsystems linked to that port can be connected to through it. The socket takes a
    /// pre-Connect slot ([`Target::admit_socket`]); without one it is refused (and the reason
    /// logged, rate-limited). It trades the slot for a connection slot when its Connect
    /// succeeds. Request slots for the deepest queue allowed are allocated here; data buffers
    /// come from the poll group's shared pool (outside a group: a pool allocated at Connect).
    pub fn new(
        stream: TcpStream,
        target: Arc<Target>,
        core: CoreId,
        port: PortId,
    ) -> Result<Connection, ConnError> {
        // A socket whose peer already left has no address: nothing to serve.
        let peer = stream.peer_addr()?;
        if let Err(r) = target.admit_socket(peer.ip()) {
            if let Some(suppressed) = target.refusal_log().admit() {
                tracing::warn!(
                    %peer,
                    port = %port,
                    limit = r.limit(),
                    reason = %r,
                    suppressed_before = suppressed,
                    "NVMe/TCP socket refused"
                );
            }
            return Err(ConnError::Refused(r));
        }
        let prep = || -> Result<BufPool, ConnError> {
            stream.set_nonblocking(true)?;
            stream.set_nodelay(true)?;
            // Boot buffers also hold an I/O queue's in-capsule data when the shared pool has
            // none (so in-capsule writes never wait behind R2T writes for a buffer): they fit
            // the in-capsule data size too.
            let size = BOOT_BUF_SIZE.max(target.limits.in_capsule_data_size as usize);
            BufPool::new(BOOT_BUFS, size, 64).map_err(|_| ConnError::NoMemory)
        };
        let boot_pool = match prep() {
            Ok(p) => p,
            Err(e) => {
                target.release_socket(peer.ip(), None);
                return Err(e);
            }
        };
        let slots = usize::from(
            target
                .limits
                .max_queue_depth
                .max(target.limits.max_admin_queue_depth),
        );
        let connect_timeout_ms = target.limits.connect_timeout_ms;
        let icreq_timeout_ms = target.limits.icreq_timeout_ms;
        // Calibrated once per process (reactors do it at start); never on the first I/O.
        clock::ticks_per_ns();
        let mut reqs = Vec::with_capacity(slots);
        reqs.resize_with(slots, Request::new);
        target.count_phase(None, Some(Phase::AwaitIcReq));
        let now = Instant::now();
        Ok(Connection {
            stream,
            target,
            core,
            phase: Phase::AwaitIcReq,
            dg: Digests::default(),
            hpda: 0,
            rx_buf: vec![0u8; RX_BUF_SIZE].into_boxed_slice(),
            rx_pos: 0,
            rx_len: 0,
            rx: Rx::Header,
            rx_hdr: [0; MAX_HEADER_REGION],
            rx_have: 0,
            rx_layout: None,
            rx_dig: [0; DIGEST_LEN],
            rx_dig_have: 0,
            rx_crc: 0,
            rx_ready: true,
            in_group: false,
            rx_stats: Arc::new(GroupStats::default()),
            ctrl: None,
            subsys: None,
            qid: 0,
            io_gen: 0,
            sqhd_disabled: false,
            depth: BOOT_BUFS,
            sqhd: 0,
            reqs,
            free: (0..slots).rev().collect(),
            outstanding: 0,
            state_counts: [0; N_STATES],
            boot_pool,
            pool: None,
            group_bufs: None,
            shared_bufs: false,
            channels: Vec::new(),
            group_channels: None,
            group_slot: 0,
            bdev_pending: 0,
            reserved_bytes: 0,
            ns_cache: Vec::new(),
            ns_gen: 0,
            pool_align: POOL_ALIGN,
            retired: Vec::new(),
            exec_queue: VecDeque::with_capacity(slots),
            icd_deferred: Vec::with_capacity(slots),
            buf_wait: VecDeque::with_capacity(slots),
            icd_wait: None,
            buf_retrying: false,
            buf_retry_failed: false,
            tx_queue: VecDeque::with_capacity(slots * 2),
            ctl_buf: [0; 24 + pdu::TERM_MAX_DATA],
            ctl_len: 0,
            ctl_off: 0,
            aers: Vec::with_capacity(crate::nvmf::target::MAX_AERS),
            erase_wait: Vec::new(),
            ka_deadline: None,
            connect_deadline: Some(now + Duration::from_millis(u64::from(connect_timeout_ms))),
            icreq_deadline: now + Duration::from_millis(u64::from(icreq_timeout_ms)),
            closing_deadline: None,
            source: peer.ip(),
            connected_as: None,
            stats: Arc::new(QueueStats::default()),
            io_stats: ConnStats::default(),
            port,
            peer: Some(peer),
            shutdown: Vec::new(),
            shutdown_failed: false,
        })
    }

    /// The reactor core this connection was created for.
    pub fn core(&self) -> CoreId {
        self.core
    }

    /// The socket, for readiness registration.
    pub fn raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Joins a poll group as its connection `slot` (before Connect): from now on the socket is
    /// read only after [`Connection::set_readable`] (the group's epoll said so) until a read
    /// finds it empty, receive counters go to the group's `stats`, and I/O goes through the
    /// group's shared `channels`, whose completions the group hands to [`Connection::io_done`].
    /// The first receive step still reads, for bytes that arrived before.
    pub fn join_group(
        &mut self,
        stats: Arc<GroupStats>,
        slot: u32,
        channels: Rc<ChannelSet>,
        bufs: BufShare,
    ) {
        self.in_group = true;
        self.group_bufs = Some(bufs);
        self.rx_ready = true;
        self.rx_stats = stats;
        self.group_slot = slot;
        self.group_channels = Some(channels);
    }

    /// The `BdevIo::ctx` of request slot `idx`: the group slot above, the request below.
    #[inline]
    pub(super) fn io_tag(&self, idx: usize) -> u64 {
        (u64::from(self.group_slot) << 32) | idx as u64
    }

    /// The socket has new bytes (or an end of stream / error) to read.
    #[inline]
    pub fn set_readable(&mut self) {
        self.rx_ready = true;
    }

    /// Whether a poll step has anything to do right now: bytes to read, requests in progress
    /// (an Asynchronous Event Request held for an event does not count), something to send,
    /// retiring channels or shutdown flushes, or a close to finish. A poll group polls only such
    /// connections every loop, and the others at its housekeeping sweep (timers, events,
    /// namespace changes).
    #[inline]
    pub fn wants_poll(&self) -> bool {
        let held = self.state_counts[ReqState::AwaitingEvent.index()] as usize;
        (self.rx_ready && matches!(self.phase, Phase::AwaitIcReq | Phase::Ready))
            || self.outstanding > held
            || self.ctl_off < self.ctl_len
            || self.phase == Phase::Closing
            || !self.retired.is_empty()
            || !self.shutdown.is_empty()
    }

    /// Receive counters this connection adds to (its poll group's once it joined one).
    pub fn recv_stats(&self) -> &Arc<GroupStats> {
        &self.rx_stats
    }

    /// Queue id (valid after Connect; 0 = admin).
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// True once the socket is shut down and no I/O is left at a bdev: the owner may drop it.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed && self.bdev_in_flight() == 0
    }

    /// Requests not in the free list (commands being received, executed or answered).
    pub fn in_flight(&self) -> usize {
        self.outstanding
    }

    /// Requests per state (indexed as [`ReqState`] is declared), for stats and tests.
    pub fn state_counts(&self) -> [u32; N_STATES] {
        self.state_counts
    }

    fn bdev_in_flight(&self) -> usize {
        // Retired channels' I/O is in `bdev_pending` too.
        self.bdev_pending + self.shutdown.iter().filter(|f| !f.done).count()
    }

    /// One poll step: namespace changes, bdev completions, parked submissions, input,
    /// events/timers, output.
    pub fn poll(&mut self) -> usize {
        let mut work = 0;
        if self.ns_gen != 0 {
            if self.refresh_namespaces() {
                work += 1;
            }
            if !self.retired.is_empty() {
                work += self.poll_retired();
            }
        }
        work += self.poll_bdevs();
        if !self.shutdown.is_empty() {
            // Also after the host hung up: the flush it asked for still runs to the end.
            work += self.poll_shutdown();
        }
        if self.phase == Phase::Closed {
            return work;
        }
        work += self.retry_exec();
        work += self.retry_bufs();
        if self.rx_ready && matches!(self.phase, Phase::AwaitIcReq | Phase::Ready) {
            work += self.poll_recv();
        }
        if self.phase == Phase::Ready && self.ctrl.is_some() {
            work += self.poll_events();
        } else if self.phase != Phase::Closing && self.ctrl.is_none() {
            if let Some(why) = self.pre_connect_expired(Instant::now()) {
                self.log_close(why);
                self.close_now(why);
                return work + 1;
            }
        }
        work += self.flush_tx();
        if self.phase == Phase::Closing {
            if let Some(deadline) = self.closing_deadline {
                if Instant::now() > deadline {
                    self.log_close(
                        "the peer did not take the C2HTermReq within closing_timeout_ms",
                    );
                    self.close_now("closing timeout");
                    work += 1;
                }
            }
        }
        work
    }

    /// Why a connection without a controller must close now: no ICReq within
    /// `icreq_timeout_ms`, or no successful Connect within `connect_timeout_ms`.
    fn pre_connect_expired(&self, now: Instant) -> Option<&'static str> {
        if self.phase == Phase::AwaitIcReq && now > self.icreq_deadline {
            return Some("no ICReq within icreq_timeout_ms");
        }
        match self.connect_deadline {
            Some(d) if now > d => Some("no Fabrics Connect within connect_timeout_ms"),
            _ => None,
        }
    }

    /// Logs why the target closes this connection (rate-limited: peers trigger it at will).
    fn log_close(&self, why: &str) {
        if let Some(suppressed) = self.target.refusal_log().admit() {
            tracing::info!(
                peer = ?self.peer,
                port = %self.port,
                qid = self.qid,
                why,
                suppressed_before = suppressed,
                "closing NVMe/TCP connection"
            );
        }
    }

    /// The one place the connection's phase changes: keeps the target's per-phase counts.
    pub(super) fn set_phase(&mut self, to: Phase) {
        if self.phase != to {
            self.target.count_phase(Some(self.phase), Some(to));
            self.phase = to;
        }
    }

    // ----------------------------------------------------------------------------------------
    // Request state.

    /// The one place a request changes state: checks the move, keeps the counters and the free
    /// list, and traces it.
    pub(super) fn transition(&mut self, idx: usize, to: ReqState) {
        let r = &mut self.reqs[idx];
        let from = r.state;
        debug_assert!(
            from.may_move_to(to),
            "request {idx}: illegal move {from:?} -> {to:?}"
        );
        tracing::trace!(
            qid = self.qid,
            cid = r.sqe.cid,
            slot = idx,
            ?from,
            ?to,
            "request state"
        );
        r.state = to;
        if from != ReqState::Free {
            self.state_counts[from.index()] -= 1;
        }
        if to == ReqState::Free {
            self.outstanding -= 1;
            self.free.push(idx);
        } else {
            self.state_counts[to.index()] += 1;
            if from == ReqState::Free {
                self.outstanding += 1;
            }
        }
    }

    fn release(&mut self, idx: usize) {
        let r = &mut self.reqs[idx];
        r.icd_at = None;
        r.icd_go = false;
        self.put_buf(idx);
        self.transition(idx, ReqState::Free);
    }

    // ----------------------------------------------------------------------------------------
    // Teardown.

    /// Reports a fatal transport error with a C2HTermReq (when the spec defines one) and closes.
    fn fatal(&mut self, f: Fatal) {
        if let Some((fes, fei)) = f.fes {
            if let Some(suppressed) = self.target.peer_log().admit() {
                tracing::warn!(
                    peer = ?self.peer,
                    qid = self.qid,
                    ?fes,
                    fei,
                    suppressed_before = suppressed,
                    "fatal NVMe/TCP error, sending C2HTermReq"
                );
            }
            let offending_len = self.rx_have.min(pdu::TERM_MAX_DATA);
            let mut off = [0u8; pdu::TERM_MAX_DATA];
            off[..offending_len].copy_from_slice(&self.rx_hdr[..offending_len]);
            let n = pdu::encode_term_req(
                &mut self.ctl_buf,
                true,
                &TermReq {
                    fes: fes as u16,
                    fei,
                },
                &off[..offending_len],
            );
            self.ctl_len = n;
            self.ctl_off = 0;
            self.drop_requests();
            // Let go of the controller now, not when the TermReq is out, which a peer that
            // stopped reading would postpone for ever: an admin queue kills it (its I/O queues
            // close), an I/O queue frees its QID. And bound the wait for the TermReq.
            self.teardown_controller();
            let closing_ms = u64::from(self.target.limits.closing_timeout_ms);
            self.closing_deadline = Some(Instant::now() + Duration::from_millis(closing_ms));
            self.set_phase(Phase::Closing);
        } else {
            self.close_now("fatal transport error");
        }
    }

    /// Releases every request that is not at a bdev; those free when their I/O comes back.
    fn drop_requests(&mut self) {
        self.tx_queue.clear();
        self.exec_queue.clear();
        self.aers.clear();
        self.erase_wait.clear();
        self.buf_wait.clear();
        self.icd_wait = None;
        self.leave_buf_waiters();
        for i in 0..self.reqs.len() {
            let s = self.reqs[i].state;
            if s != ReqState::Free && s != ReqState::Executing {
                self.release(i);
            }
        }
    }

    pub(super) fn close_now(&mut self, why: &str) {
        if self.phase == Phase::Closed {
            return;
        }
        tracing::debug!(qid = self.qid, why, "closing NVMe/TCP connection");
        self.drop_requests();
        let _ = self.stream.shutdown(Shutdown::Both);
        self.set_phase(Phase::Closed);
        self.teardown_controller();
    }

    fn teardown_controller(&mut self) {
        let Some(c) = self.ctrl.take() else { return };
        if self.qid == 0 {
            c.kill();
            self.target.remove_controller(c.cntlid);
        } else {
            let mut a = c.admin();
            // After a controller reset the id is no longer this queue's (it may be taken again).
            if c.io_generation() == self.io_gen {
                if let Some(q) = a.io_qids.get_mut(usize::from(self.qid)) {
                    *q = false;
                }
            }
            let me = Arc::as_ptr(&self.stats);
            a.queue_stats.retain(|s| Arc::as_ptr(s) != me);
            let mut retired = a.retired;
            self.stats.add_to(&mut retired);
            a.retired = retired;
        }
    }

    // ----------------------------------------------------------------------------------------
    // Events and timers (admin queue) / controller liveness (I/O queues).

    fn poll_events(&mut self) -> usize {
        let Some(c) = self.ctrl.as_ref() else {
            return 0;
        };
        if self.qid != 0 {
            if c.is_dead() {
                self.close_now("controller gone");
                return 1;
            }
            if c.io_generation() != self.io_gen {
                self.close_now("controller reset deleted the I/O queue");
                return 1;
            }
            return 0;
        }
        let cntlid = c.cntlid;
        let mut work = 0;
        if c.event_pending.swap(false, Ordering::AcqRel) {
            work += self.deliver_events();
        }
        if let Some(deadline) = self.ka_deadline {
            if Instant::now() > deadline {
                if let Some(suppressed) = self.target.peer_log().admit() {
                    tracing::warn!(
                        cntlid,
                        peer = ?self.peer,
                        suppressed_before = suppressed,
                        "keep alive timeout expired, tearing the controller down"
                    );
                }
                self.close_now("keep alive timeout");
                return work + 1;
            }
        }
        work
    }

    pub(super) fn sqhd_disabled_flag(cattr: u8) -> bool {
        cattr & crate::nvme::connect::CATTR_DISABLE_SQ_FLOW != 0
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close_now("dropped");
        self.target.release_buffers(self.reserved_bytes);
        self.reserved_bytes = 0;
        self.target.count_phase(Some(self.phase), None);
        self.target
            .release_socket(self.source, self.connected_as.as_deref());
    }
}

#[cfg(test)]
mod tests;
