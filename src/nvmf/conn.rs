//! One NVMe/TCP queue pair on the target side: a non-blocking `TcpStream`, its receive and send
//! state machines, its preallocated request slots and data buffers, and the I/O command path.
//!
//! A [`Connection`] is owned by one reactor for its whole life and driven by [`Connection::poll`]
//! (a reactor poller step: it never blocks and returns the units of work done). The admin and
//! Fabrics command handlers live in `super::admin`; this file owns the transport and the I/O
//! commands.
//!
//! Request life: every request slot is in exactly one [`ReqState`]; every change of state goes
//! through `Connection::transition`, which checks the move and records it (trace + counters).
//! Slots and the buffer pool are allocated when the connection is created and at Connect; the
//! steady state allocates nothing and takes no lock: the controller's `Mutex` is only used on the
//! admin queue and at Connect/teardown.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bdev::{BdevChannel, BdevIo, BufPool, IoBuf, IoStatus, IoType, Submit, WriteFrom};
use crate::nvme::{io_op, prop, sgl, Cqe, Sqe, Status, FABRICS_OPCODE};
use crate::nvmf::pdu::{
    self, flags, CommonHeader, DataHdr, Digests, Fes, Layout, PduError, PduHeader, R2t, TermReq,
    CH_LEN, DIGEST_LEN, MAX_HEADER_REGION,
};
use crate::nvmf::target::{Controller, Namespace, PortId, QueueStats, Subsystem, Target};
use crate::stats::reactor::{self as stats_reactor, ConnStats};
use crate::stats::OpClass;
use crate::sys::clock;
use crate::types::CoreId;

/// Bytes of the receive staging buffer: headers and small data are read through it.
const RX_BUF_SIZE: usize = 64 * 1024;
/// Data reads of at least this many bytes bypass the staging buffer and land directly in the
/// request's buffer (one copy saved for large writes).
const DIRECT_READ_MIN: usize = 8 * 1024;
/// Reads per poll step, so one busy connection cannot starve the others on its reactor.
const RX_BUDGET: usize = 16;
/// Writes whose in-capsule data is handed to a channel per `submit_writes_from` call (the
/// requests are gathered in a stack array).
const ICD_BATCH: usize = 32;
/// `writev` calls per poll step.
const TX_BUDGET: usize = 16;
/// iovecs per `writev` (each PDU takes at most 3).
const MAX_IOV: usize = 64;
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
    #[error("connection limit ({0}) reached")]
    TooManyConnections(usize),
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

/// One request slot.
pub(super) struct Request {
    pub(super) state: ReqState,
    pub(super) sqe: Sqe,
    /// Data buffer (host data for writes, outgoing data for reads/admin).
    pub(super) buf: Option<IoBuf>,
    /// The buffer came from the pre-Connect boot pool.
    boot_buf: bool,
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
            boot_buf: false,
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

/// Connection-level phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for ICReq.
    AwaitIcReq,
    /// Initialized; capsules flow.
    Ready,
    /// A TermReq (or nothing) is being flushed; no more input is read.
    Closing,
    /// Socket shut down; only bdev completions are still drained.
    Closed,
}

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

/// One namespace's flush during a controller shutdown (CC.SHN): a private channel opened on the
/// admin queue's reactor, and the Flush not yet taken by it (`None` once submitted).
struct ShutdownFlush {
    ns: Arc<Namespace>,
    ch: Box<dyn BdevChannel>,
    io: Option<BdevIo>,
    done: bool,
}

/// Data pool buffer alignment at least: a page, enough for O_DIRECT backends.
const POOL_ALIGN: usize = 4096;

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
    // Session.
    pub(super) ctrl: Option<Arc<Controller>>,
    pub(super) subsys: Option<Arc<Subsystem>>,
    pub(super) qid: u16,
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
    /// Bdev channel per namespace slot (index = nsid - 1), I/O queues only.
    pub(super) channels: Vec<Option<Box<dyn BdevChannel>>>,
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
    pub(super) ka_deadline: Option<Instant>,
    /// Deadline for completing Fabrics Connect (cleared once connected).
    pub(super) connect_deadline: Option<Instant>,
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
    /// subsystems linked to that port can be connected to through it. Fails if the target's
    /// connection limit is reached. Request slots for the deepest queue allowed are allocated
    /// here; data buffers at Connect.
    pub fn new(
        stream: TcpStream,
        target: Arc<Target>,
        core: CoreId,
        port: PortId,
    ) -> Result<Connection, ConnError> {
        if !target.claim_connection() {
            return Err(ConnError::TooManyConnections(target.limits.max_connections));
        }
        let prep = || -> Result<BufPool, ConnError> {
            stream.set_nonblocking(true)?;
            stream.set_nodelay(true)?;
            BufPool::new(BOOT_BUFS, BOOT_BUF_SIZE, 64).map_err(|_| ConnError::NoMemory)
        };
        let boot_pool = match prep() {
            Ok(p) => p,
            Err(e) => {
                target.release_connection();
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
        // Calibrated once per process (reactors do it at start); never on the first I/O.
        clock::ticks_per_ns();
        let mut reqs = Vec::with_capacity(slots);
        reqs.resize_with(slots, Request::new);
        let peer = stream.peer_addr().ok();
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
            ctrl: None,
            subsys: None,
            qid: 0,
            sqhd_disabled: false,
            depth: BOOT_BUFS,
            sqhd: 0,
            reqs,
            free: (0..slots).rev().collect(),
            outstanding: 0,
            state_counts: [0; N_STATES],
            boot_pool,
            pool: None,
            channels: Vec::new(),
            ns_cache: Vec::new(),
            ns_gen: 0,
            pool_align: POOL_ALIGN,
            retired: Vec::new(),
            exec_queue: VecDeque::with_capacity(slots),
            icd_deferred: Vec::with_capacity(slots),
            tx_queue: VecDeque::with_capacity(slots * 2),
            ctl_buf: [0; 24 + pdu::TERM_MAX_DATA],
            ctl_len: 0,
            ctl_off: 0,
            aers: Vec::with_capacity(crate::nvmf::target::MAX_AERS),
            ka_deadline: None,
            connect_deadline: Some(
                Instant::now() + Duration::from_millis(u64::from(connect_timeout_ms)),
            ),
            stats: Arc::new(QueueStats::default()),
            io_stats: ConnStats::default(),
            port,
            peer,
            shutdown: Vec::new(),
            shutdown_failed: false,
        })
    }

    /// The reactor core this connection was created for.
    pub fn core(&self) -> CoreId {
        self.core
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
        self.channels
            .iter()
            .flatten()
            .map(|c| c.in_flight())
            .sum::<usize>()
            + self
                .retired
                .iter()
                .map(|(_, c)| c.in_flight())
                .sum::<usize>()
            + self.shutdown.iter().filter(|f| !f.done).count()
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
        if matches!(self.phase, Phase::AwaitIcReq | Phase::Ready) {
            work += self.poll_recv();
        }
        if self.phase == Phase::Ready && self.ctrl.is_some() {
            work += self.poll_events();
        } else if let Some(deadline) = self.connect_deadline {
            if self.ctrl.is_none() && Instant::now() > deadline {
                tracing::info!("no Fabrics Connect before the connect timeout, closing");
                self.close_now("connect timeout");
                return work + 1;
            }
        }
        work += self.flush_tx();
        work
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

    /// Returns the request's buffer to its pool.
    pub(super) fn put_buf(&mut self, idx: usize) {
        let r = &mut self.reqs[idx];
        if let Some(b) = r.buf.take() {
            if r.boot_buf {
                self.boot_pool.put(b);
            } else if let Some(p) = self.pool.as_mut() {
                p.put(b);
            }
        }
    }

    /// Gives request `idx` a buffer of `len` bytes from the current pool.
    pub(super) fn take_buf(&mut self, idx: usize, len: usize) -> bool {
        self.put_buf(idx);
        let (b, boot) = match self.pool.as_mut() {
            Some(p) => (p.get(len), false),
            None => (self.boot_pool.get(len), true),
        };
        let r = &mut self.reqs[idx];
        r.boot_buf = boot;
        r.buf = b;
        r.buf.is_some()
    }

    fn release(&mut self, idx: usize) {
        let r = &mut self.reqs[idx];
        r.icd_at = None;
        r.icd_go = false;
        self.put_buf(idx);
        self.transition(idx, ReqState::Free);
    }

    /// Completes a command: C2HData (when it has data for the host) and/or CapsuleResp.
    pub(super) fn complete(&mut self, idx: usize, status: Status) {
        let r = &mut self.reqs[idx];
        r.icd_at = None;
        r.icd_go = false;
        if self.phase == Phase::Closed || self.phase == Phase::Closing {
            self.release(idx);
            return;
        }
        if !status.is_success() && self.qid == 0 {
            if let Some(c) = &self.ctrl {
                let r = &self.reqs[idx];
                c.record_error(crate::nvme::log::ErrorEntry {
                    sqid: 0,
                    cid: r.sqe.cid,
                    status: status.to_field(),
                    param_loc: 0xffff,
                    nsid: r.sqe.nsid,
                    ..Default::default()
                });
            }
        }
        if self.qid != 0 {
            self.record_io(idx, status);
        }
        let dg = self.dg;
        let hpda = self.hpda;
        let sqhd_disabled = self.sqhd_disabled;
        let r = &mut self.reqs[idx];
        r.cqe.cid = r.sqe.cid;
        r.cqe.sqid = self.qid;
        r.cqe.sqhd = self.sqhd;
        r.cqe.status = status.to_field();
        r.tx_off = 0;
        let data_len = r.buf.as_ref().map_or(0, |b| b.len());
        if status.is_success() && r.c2h && data_len > 0 {
            let mut fl = flags::LAST_PDU;
            // SUCCESS replaces the CapsuleResp only when the host disabled SQ flow control (it
            // then needs no SQHD) and nothing but success is reported.
            r.tx_success = sqhd_disabled;
            if r.tx_success {
                fl |= flags::SUCCESS;
            }
            let d = DataHdr {
                cccid: r.sqe.cid,
                ttag: 0,
                datao: 0,
                datal: data_len as u32,
                flags: fl,
            };
            r.tx_hdr_len = pdu::encode_c2h_data(&mut r.tx_hdr, &d, dg, hpda);
            r.tx_data = true;
            if dg.data {
                let crc = r.buf.as_ref().map_or(0, |b| pdu::crc32c(b.as_slice()));
                r.tx_ddgst = crc.to_le_bytes();
            }
            self.transition(idx, ReqState::TxC2hData);
        } else {
            self.put_buf(idx);
            self.queue_resp(idx);
        }
        self.tx_queue.push_back(idx);
    }

    /// Records an I/O command's completion in the reactor's per-namespace stats
    /// (`crate::stats::reactor`): latency from capsule decoded to completion queued, bytes moved
    /// by successful reads/writes, errors. Allocates only the first time this connection
    /// completes a command for a namespace; nsids that do not exist are not recorded.
    fn record_io(&mut self, idx: usize, status: Status) {
        let r = &self.reqs[idx];
        let Some(op) = stats_reactor::op_class_of(r.sqe.opcode) else {
            return;
        };
        let nsid = r.sqe.nsid;
        let ok = status.is_success();
        let bytes = match op {
            OpClass::Read | OpClass::Write if ok => r.buf.as_ref().map_or(0, |b| b.len() as u64),
            _ => 0,
        };
        let ns = clock::ticks_to_ns(clock::ticks().wrapping_sub(r.t_rx));
        if !self.io_stats.record(nsid, op, bytes, ns, ok) {
            let Some(s) = self.subsys.as_ref() else {
                return;
            };
            if s.namespace(nsid).is_some() {
                let h = self.io_stats.attach(&s.nqn, nsid);
                h.borrow_mut().record(op, bytes, ns, ok);
            }
        }
    }

    fn queue_resp(&mut self, idx: usize) {
        let dg = self.dg;
        let r = &mut self.reqs[idx];
        r.tx_hdr_len = pdu::encode_capsule_resp(&mut r.tx_hdr, &r.cqe, dg);
        r.tx_data = false;
        r.tx_off = 0;
        self.transition(idx, ReqState::TxResp);
    }

    // ----------------------------------------------------------------------------------------
    // Receive path.

    /// One receive step; in-capsule write data left in `rx_buf` is dealt with before it returns.
    fn poll_recv(&mut self) -> usize {
        let work = self.recv_step();
        self.flush_icd();
        work
    }

    fn recv_step(&mut self) -> usize {
        let mut work = 0;
        for _ in 0..RX_BUDGET {
            if self.rx_pos < self.rx_len {
                if let Err(f) = self.consume() {
                    self.fatal(f);
                    return work + 1;
                }
                work += 1;
                if !matches!(self.phase, Phase::AwaitIcReq | Phase::Ready) {
                    return work;
                }
                continue;
            }
            // Everything still pointing into rx_buf goes before it is overwritten.
            self.flush_icd();
            self.rx_pos = 0;
            self.rx_len = 0;
            let res: io::Result<(usize, bool)> = match self.rx {
                Rx::Data { idx, off, left, .. } if left >= DIRECT_READ_MIN => {
                    let dst = self.reqs[idx]
                        .buf
                        .as_mut()
                        .and_then(|b| b.as_mut_slice().get_mut(off..off + left));
                    match dst {
                        None => {
                            self.close_now("receive buffer missing");
                            return work;
                        }
                        Some(dst) => match self.stream.read(dst) {
                            Ok(n) => {
                                if self.dg.data && n > 0 {
                                    self.rx_crc = pdu::crc32c_append(self.rx_crc, &dst[..n]);
                                }
                                Ok((n, true))
                            }
                            Err(e) => Err(e),
                        },
                    }
                }
                _ => self.stream.read(&mut self.rx_buf).map(|n| (n, false)),
            };
            match res {
                Ok((0, _)) => {
                    self.close_now("peer closed the connection");
                    return work;
                }
                Ok((n, true)) => {
                    work += 1;
                    if let Err(f) = self.data_advanced(n) {
                        self.fatal(f);
                        return work;
                    }
                }
                Ok((n, false)) => {
                    self.rx_len = n;
                    work += 1;
                    // Commands in these bytes may have been sent after a `namespace.create`
                    // that returned since this poll's check: they must see the new table.
                    if self.ns_gen != 0 {
                        self.refresh_namespaces();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "receive failed");
                    self.close_now("receive error");
                    return work;
                }
            }
        }
        work
    }

    /// Consumes staged bytes according to the receive state.
    fn consume(&mut self) -> Result<(), Fatal> {
        let avail = self.rx_len - self.rx_pos;
        match self.rx {
            Rx::Header => {
                let need = match self.rx_layout {
                    None => CH_LEN,
                    Some((_, l)) => region_len(&l),
                };
                let n = avail.min(need - self.rx_have);
                self.rx_hdr[self.rx_have..self.rx_have + n]
                    .copy_from_slice(&self.rx_buf[self.rx_pos..self.rx_pos + n]);
                self.rx_have += n;
                self.rx_pos += n;
                if self.rx_have < need {
                    return Ok(());
                }
                match self.rx_layout {
                    None => {
                        let mut ch8 = [0u8; CH_LEN];
                        ch8.copy_from_slice(&self.rx_hdr[..CH_LEN]);
                        let ch = CommonHeader::parse(&ch8);
                        let layout = ch
                            .layout(self.dg, self.max_plen())
                            .map_err(Fatal::from_pdu)?;
                        self.rx_layout = Some((ch, layout));
                        if region_len(&layout) == CH_LEN {
                            self.header_done()?;
                        }
                    }
                    Some(_) => self.header_done()?,
                }
                Ok(())
            }
            Rx::Data {
                idx,
                kind,
                off,
                left,
                ..
            } => {
                let n = avail.min(left);
                if kind == DataKind::Capsule && off == 0 && n == left && self.may_defer_icd(idx) {
                    // The whole in-capsule data is here: leave it in rx_buf for flush_icd.
                    self.reqs[idx].icd_at = Some((self.rx_pos as u32, n as u32));
                    self.icd_deferred.push(idx);
                    self.rx_pos += n;
                    return self.data_advanced(n);
                }
                let src = &self.rx_buf[self.rx_pos..self.rx_pos + n];
                match self.reqs[idx]
                    .buf
                    .as_mut()
                    .and_then(|b| b.as_mut_slice().get_mut(off..off + n))
                {
                    Some(dst) => dst.copy_from_slice(src),
                    None => return Err(Fatal { fes: None }),
                }
                if self.dg.data {
                    self.rx_crc = pdu::crc32c_append(self.rx_crc, src);
                }
                self.rx_pos += n;
                self.data_advanced(n)
            }
            Rx::Digest {
                idx,
                kind,
                start,
                len,
            } => {
                let n = avail.min(DIGEST_LEN - self.rx_dig_have);
                self.rx_dig[self.rx_dig_have..self.rx_dig_have + n]
                    .copy_from_slice(&self.rx_buf[self.rx_pos..self.rx_pos + n]);
                self.rx_dig_have += n;
                self.rx_pos += n;
                if self.rx_dig_have == DIGEST_LEN {
                    let received = u32::from_le_bytes(self.rx_dig);
                    if received != self.rx_crc {
                        tracing::warn!(
                            qid = self.qid,
                            computed = self.rx_crc,
                            received,
                            "data digest error"
                        );
                        return Err(Fatal { fes: None });
                    }
                    self.rx = Rx::Header;
                    self.data_done(idx, kind, start, len)?;
                }
                Ok(())
            }
        }
    }

    /// `n` data bytes landed (from staging or a direct read).
    fn data_advanced(&mut self, n: usize) -> Result<(), Fatal> {
        if let Rx::Data {
            idx,
            kind,
            off,
            left,
            start,
        } = self.rx
        {
            let left = left - n;
            let off = off + n;
            if left > 0 {
                self.rx = Rx::Data {
                    idx,
                    kind,
                    off,
                    left,
                    start,
                };
                return Ok(());
            }
            let len = off - start;
            if self.dg.data {
                self.rx = Rx::Digest {
                    idx,
                    kind,
                    start,
                    len,
                };
                self.rx_dig_have = 0;
            } else {
                self.rx = Rx::Header;
                self.data_done(idx, kind, start, len)?;
            }
        }
        Ok(())
    }

    /// Whether request `idx`'s in-capsule data may stay in `rx_buf` until `flush_icd`: Writes
    /// on I/O queues without data digests (with them the digest may arrive after a refill).
    fn may_defer_icd(&self, idx: usize) -> bool {
        !self.dg.data
            && self.qid != 0
            && self.reqs[idx].sqe.opcode == io_op::WRITE
            && self.icd_deferred.len() < self.icd_deferred.capacity()
    }

    /// Deals with every in-capsule data still in `rx_buf`, before it is refilled: Writes that
    /// passed their checks go to their namespace's channel through
    /// [`BdevChannel::submit_writes_from`], up to [`ICD_BATCH`] per call (the crypto bdev
    /// encrypts them straight out of `rx_buf`, the others copy); anything else gets its data
    /// copied into its buffer as if it had never been deferred.
    fn flush_icd(&mut self) {
        if self.icd_deferred.is_empty() {
            return;
        }
        // Pass 1: anything that cannot go as a batch is copied now (and a Write that was ready
        // but whose namespace has no channel is submitted the ordinary way, which fails it).
        for k in 0..self.icd_deferred.len() {
            let idx = self.icd_deferred[k];
            let r = &mut self.reqs[idx];
            let Some((at, len)) = r.icd_at else { continue };
            let ready = r.icd_go
                && r.state == ReqState::ReadyToExecute
                && r.buf.as_ref().is_some_and(|b| b.len() == len as usize)
                && self.channels.get(r.ns_idx).is_some_and(|c| c.is_some());
            if !ready {
                self.icd_copy_out(idx, at, len);
            }
        }
        // Pass 2: batches per namespace, in arrival order.
        let mut k = 0;
        while k < self.icd_deferred.len() {
            let first = self.icd_deferred[k];
            if self.reqs[first].icd_at.is_none() {
                k += 1;
                continue;
            }
            let ns = self.reqs[first].ns_idx;
            let Some(mut ch) = self.channels.get_mut(ns).and_then(Option::take) else {
                k += 1;
                continue;
            };
            let mut batch: [usize; ICD_BATCH] = [0; ICD_BATCH];
            let mut n = 0;
            let mut refused: [Option<BdevIo>; ICD_BATCH] = Default::default();
            let mut nrefused = 0;
            {
                let rx_buf = &self.rx_buf;
                let reqs = &mut self.reqs;
                let mut writes: [Option<WriteFrom<'_>>; ICD_BATCH] = Default::default();
                for &idx in &self.icd_deferred[k..] {
                    if n == ICD_BATCH {
                        break;
                    }
                    let r = &mut reqs[idx];
                    let Some((at, len)) = r.icd_at else { continue };
                    if r.ns_idx != ns {
                        continue;
                    }
                    let (at, len) = (at as usize, len as usize);
                    let io = BdevIo::new(r.io_type, r.io_lba, r.io_nlb, r.buf.take(), idx as u64)
                        .with_fua(r.io_fua);
                    match WriteFrom::new(io, &rx_buf[at..at + len]) {
                        Ok(w) => {
                            r.icd_at = None;
                            writes[n] = Some(w);
                            batch[n] = idx;
                            n += 1;
                        }
                        // Pass 1 checked the length: unreachable, but never lose the buffer.
                        Err(io) => r.buf = io.buf,
                    }
                }
                let mut it = writes.iter_mut().take(n).filter_map(Option::take);
                ch.submit_writes_from(&mut it, &mut |io| {
                    if nrefused < ICD_BATCH {
                        refused[nrefused] = Some(io);
                        nrefused += 1;
                    }
                });
            }
            self.channels[ns] = Some(ch);
            // Refused (channel full): their data is in their buffers now; park them.
            for io in refused.iter_mut().take(nrefused).filter_map(Option::take) {
                let idx = io.ctx as usize;
                let r = &mut self.reqs[idx];
                r.buf = io.buf;
                r.icd_go = false;
                self.exec_queue.push_back(idx);
            }
            for &idx in &batch[..n] {
                let r = &mut self.reqs[idx];
                if r.icd_go {
                    r.icd_go = false;
                    r.sub_pending = 1;
                    self.transition(idx, ReqState::Executing);
                }
            }
            if n == 0 {
                k += 1;
            }
        }
        // Anything left over (unreachable: pass 2 takes every request with data left) is
        // copied rather than lost.
        for k in 0..self.icd_deferred.len() {
            let idx = self.icd_deferred[k];
            if let Some((at, len)) = self.reqs[idx].icd_at {
                self.icd_copy_out(idx, at, len);
            }
        }
        self.icd_deferred.clear();
    }

    /// The ordinary path for deferred in-capsule data: copy it from `rx_buf` (`len` bytes at
    /// `at`) into the request's buffer, and submit the Write if it was waiting to be.
    fn icd_copy_out(&mut self, idx: usize, at: u32, len: u32) {
        let r = &mut self.reqs[idx];
        let go = r.icd_go;
        r.icd_at = None;
        r.icd_go = false;
        let (at, len) = (at as usize, len as usize);
        if let Some(b) = r.buf.as_mut() {
            let n = len.min(b.len());
            b.as_mut_slice()[..n].copy_from_slice(&self.rx_buf[at..at + n]);
        }
        if go {
            self.submit(idx);
        }
    }

    fn max_plen(&self) -> u32 {
        let l = &self.target.limits;
        let data = l
            .in_capsule_data_size
            .max(l.max_h2c_data_size)
            .max(BOOT_BUF_SIZE as u32);
        (MAX_HEADER_REGION + DIGEST_LEN) as u32 + data
    }

    /// A complete header region is in `rx_hdr`.
    fn header_done(&mut self) -> Result<(), Fatal> {
        let Some((ch, layout)) = self.rx_layout.take() else {
            return Err(Fatal { fes: None });
        };
        let res = self.handle_header(&ch, &layout);
        if res.is_ok() {
            self.rx_have = 0;
        }
        res
    }

    fn handle_header(&mut self, ch: &CommonHeader, layout: &Layout) -> Result<(), Fatal> {
        let (ch, layout) = (*ch, *layout);
        let hdr = pdu::decode_header(&ch, &layout, &self.rx_hdr[..layout.header_len])
            .map_err(Fatal::from_pdu)?;
        if self.phase == Phase::AwaitIcReq
            && !matches!(hdr, PduHeader::IcReq(_) | PduHeader::H2CTermReq(_))
        {
            return Err(Fatal::term(Fes::PduSequenceError, pdu::OFF_TYPE));
        }
        match hdr {
            PduHeader::IcReq(r) => {
                if self.phase != Phase::AwaitIcReq {
                    return Err(Fatal::term(Fes::PduSequenceError, pdu::OFF_TYPE));
                }
                if r.pfv != 0 {
                    return Err(Fatal::term(Fes::UnsupportedParameter, 8));
                }
                let allow = self.target.limits.allow_digests;
                self.dg = Digests {
                    header: r.digests.header && allow,
                    data: r.digests.data && allow,
                };
                self.hpda = r.hpda;
                let resp = pdu::IcResp {
                    pfv: 0,
                    cpda: 0,
                    digests: self.dg,
                    maxh2cdata: self.target.limits.max_h2c_data_size,
                };
                let mut b = [0u8; 128];
                let n = pdu::encode_ic_resp(&mut b, &resp);
                self.ctl_buf[..n].copy_from_slice(&b[..n]);
                self.ctl_len = n;
                self.ctl_off = 0;
                self.phase = Phase::Ready;
                tracing::debug!(digests = ?self.dg, hpda = r.hpda, maxr2t = r.maxr2t, "ICReq accepted");
                Ok(())
            }
            PduHeader::H2CTermReq(t) => {
                tracing::info!(fes = t.fes, fei = t.fei, "host terminated the connection");
                self.close_now("H2CTermReq");
                Ok(())
            }
            PduHeader::CapsuleCmd(sqe) => self.on_capsule(sqe, layout.data_len),
            PduHeader::H2CData(d) => self.on_h2c_data(&d),
            PduHeader::IcResp(_)
            | PduHeader::C2HTermReq(_)
            | PduHeader::CapsuleResp(_)
            | PduHeader::C2HData(_)
            | PduHeader::R2T(_) => Err(Fatal::term(Fes::InvalidHeaderField, pdu::OFF_TYPE)),
        }
    }

    fn on_capsule(&mut self, sqe: Sqe, data_len: usize) -> Result<(), Fatal> {
        if self.outstanding >= self.depth {
            tracing::warn!(
                qid = self.qid,
                depth = self.depth,
                "host exceeded the queue depth"
            );
            return Err(Fatal::term(Fes::PduSequenceError, pdu::OFF_TYPE));
        }
        // Taken out of the free list here; `transition` (Free -> ...) accounts for it below.
        let Some(idx) = self.free.pop() else {
            return Err(Fatal::term(Fes::PduSequenceError, pdu::OFF_TYPE));
        };
        let r = &mut self.reqs[idx];
        r.t_rx = clock::ticks();
        r.sqe = sqe;
        r.cqe = Cqe::default();
        r.c2h = false;
        r.xfer_len = 0;
        r.h2c_done = 0;
        r.sub_next = 0;
        r.sub_total = 0;
        r.sub_pending = 0;
        r.sub_status = Status::SUCCESS;
        r.tx_success = false;
        r.tx_data = false;
        r.icd_at = None;
        r.icd_go = false;
        self.sqhd = if self.depth > 0 {
            ((usize::from(self.sqhd) + 1) % self.depth) as u16
        } else {
            0
        };
        if data_len > 0 {
            let limit = if self.qid == 0 || self.ctrl.is_none() {
                BOOT_BUF_SIZE
            } else {
                self.target.limits.in_capsule_data_size as usize
            };
            if data_len > limit {
                // Put the slot back untouched: the connection is going down anyway.
                self.free.push(idx);
                return Err(Fatal::term(Fes::DataLimitExceeded, pdu::OFF_PLEN));
            }
            self.transition(idx, ReqState::RecvCapsuleData);
            if !self.take_buf(idx, data_len) {
                return Err(Fatal { fes: None });
            }
            self.reqs[idx].xfer_len = data_len as u32;
            self.rx = Rx::Data {
                idx,
                kind: DataKind::Capsule,
                off: 0,
                left: data_len,
                start: 0,
            };
            self.rx_crc = 0;
        } else {
            self.transition(idx, ReqState::RecvCapsuleData);
            self.command_ready(idx);
        }
        Ok(())
    }

    fn on_h2c_data(&mut self, d: &DataHdr) -> Result<(), Fatal> {
        let idx = usize::from(d.ttag);
        let max_h2c = self.target.limits.max_h2c_data_size;
        let Some(r) = self.reqs.get(idx) else {
            return Err(Fatal::term(Fes::InvalidHeaderField, 10));
        };
        if r.state != ReqState::RecvH2cData || r.sqe.cid != d.cccid {
            return Err(Fatal::term(Fes::InvalidHeaderField, 10));
        }
        if d.datao != r.h2c_done {
            return Err(Fatal::term(Fes::DataOutOfRange, 12));
        }
        let end = d
            .datao
            .checked_add(d.datal)
            .ok_or(Fatal::term(Fes::DataOutOfRange, 16))?;
        if end > r.xfer_len {
            return Err(Fatal::term(Fes::DataOutOfRange, 16));
        }
        if d.datal > max_h2c {
            return Err(Fatal::term(Fes::DataLimitExceeded, 16));
        }
        let off = d.datao as usize;
        self.rx = Rx::Data {
            idx,
            kind: DataKind::H2c,
            off,
            left: d.datal as usize,
            start: off,
        };
        self.rx_crc = 0;
        Ok(())
    }

    fn data_done(
        &mut self,
        idx: usize,
        kind: DataKind,
        _start: usize,
        len: usize,
    ) -> Result<(), Fatal> {
        match kind {
            DataKind::Capsule => self.command_ready(idx),
            DataKind::H2c => {
                let r = &mut self.reqs[idx];
                r.h2c_done += len as u32;
                if r.h2c_done == r.xfer_len {
                    self.dispatch(idx);
                }
            }
        }
        Ok(())
    }

    /// The capsule (with any in-capsule data) is in: check the SGL, solicit data by R2T if the
    /// command has more, else run it.
    fn command_ready(&mut self, idx: usize) {
        let sqe = self.reqs[idx].sqe;
        let has_icd = self.reqs[idx].buf.is_some();
        if has_icd {
            let len = self.reqs[idx].buf.as_ref().map_or(0, |b| b.len());
            if sqe.sgl.type_byte != sgl::DATA_BLOCK_OFFSET {
                return self.complete(idx, Status::SGL_TYPE_INVALID);
            }
            if sqe.sgl.addr != 0 || sqe.sgl.len as usize != len {
                return self.complete(idx, Status::DATA_SGL_LENGTH_INVALID);
            }
            return self.dispatch(idx);
        }
        let host_to_ctrl = if sqe.opcode == FABRICS_OPCODE {
            sqe.fctype() == crate::nvme::fctype::CONNECT
        } else {
            sqe.opcode & 0b11 == 0b01
        };
        // Without in-capsule data, the only descriptor NVMe/TCP defines for a transfer in either
        // direction is the Transport SGL Data Block (R2T/H2CData or C2HData). Any other type
        // (reserved ones included) describing data is refused here, before the command runs;
        // a zero-length descriptor moves nothing, so its type does not matter.
        if sqe.sgl.len != 0 && sqe.sgl.type_byte != sgl::TRANSPORT_DATA_BLOCK {
            return self.complete(idx, Status::SGL_TYPE_INVALID);
        }
        if !host_to_ctrl || sqe.sgl.len == 0 {
            return self.dispatch(idx);
        }
        // Check what can be checked before asking the host for data.
        if self.qid != 0 && sqe.opcode == io_op::WRITE {
            if let Err(s) = self.check_rw(&sqe) {
                return self.complete(idx, s);
            }
        }
        let max = if self.pool.is_some() {
            self.target.limits.max_io_size
        } else {
            BOOT_BUF_SIZE as u32
        };
        if sqe.sgl.len > max {
            return self.complete(idx, Status::INVALID_FIELD);
        }
        if !self.take_buf(idx, sqe.sgl.len as usize) {
            return self.complete(idx, Status::INTERNAL_ERROR);
        }
        let dg = self.dg;
        let r = &mut self.reqs[idx];
        r.xfer_len = sqe.sgl.len;
        r.h2c_done = 0;
        let r2t = R2t {
            cccid: sqe.cid,
            ttag: idx as u16,
            r2to: 0,
            r2tl: sqe.sgl.len,
        };
        r.tx_hdr_len = pdu::encode_r2t(&mut r.tx_hdr, &r2t, dg);
        r.tx_data = false;
        r.tx_off = 0;
        self.transition(idx, ReqState::R2tQueued);
        self.tx_queue.push_back(idx);
    }

    /// Routes a fully received command to its handler.
    fn dispatch(&mut self, idx: usize) {
        let sqe = self.reqs[idx].sqe;
        let action = if sqe.opcode == FABRICS_OPCODE {
            self.fabrics_cmd(idx)
        } else if self.ctrl.is_none() {
            Action::Complete(Status::COMMAND_SEQUENCE_ERROR)
        } else if self.qid == 0 {
            self.admin_cmd(idx)
        } else {
            match self.io_cmd(idx) {
                Ok(()) => Action::Pending,
                Err(s) => Action::Complete(s),
            }
        };
        if let Action::Complete(s) = action {
            self.complete(idx, s);
        }
    }

    // ----------------------------------------------------------------------------------------
    // I/O commands.

    /// Namespace, state, LBA range and transfer-size checks of a Read/Write.
    fn check_rw(&self, sqe: &Sqe) -> Result<(usize, u64, u32, u32), Status> {
        let (ns_idx, ns) = self.io_namespace(sqe.nsid)?;
        let nlb = sqe.nlb();
        let lba = sqe.slba();
        let end = lba
            .checked_add(u64::from(nlb))
            .ok_or(Status::LBA_OUT_OF_RANGE)?;
        if end > ns.num_blocks {
            return Err(Status::LBA_OUT_OF_RANGE);
        }
        let bytes = u64::from(nlb) * u64::from(ns.block_size);
        if bytes > u64::from(self.target.limits.max_io_size) {
            return Err(Status::INVALID_FIELD);
        }
        if u64::from(sqe.sgl.len) < bytes {
            return Err(Status::DATA_SGL_LENGTH_INVALID);
        }
        Ok((ns_idx, lba, nlb, bytes as u32))
    }

    fn io_namespace(&self, nsid: u32) -> Result<(usize, &Namespace), Status> {
        if self.subsys.is_none() {
            return Err(Status::COMMAND_SEQUENCE_ERROR);
        }
        let i = nsid.wrapping_sub(1) as usize;
        let ns = self
            .ns_cache
            .get(i)
            .and_then(Option::as_deref)
            .ok_or(Status::INVALID_NAMESPACE)?;
        if !ns.is_online() || self.channels.get(i).is_none_or(|c| c.is_none()) {
            return Err(Status::NAMESPACE_NOT_READY);
        }
        Ok((i, ns))
    }

    fn io_cmd(&mut self, idx: usize) -> Result<(), Status> {
        let sqe = self.reqs[idx].sqe;
        match sqe.opcode {
            io_op::READ => {
                let (ns_idx, lba, nlb, bytes) = self.check_rw(&sqe)?;
                if !self.take_buf(idx, bytes as usize) {
                    return Err(Status::INTERNAL_ERROR);
                }
                self.set_io(idx, ns_idx, IoType::Read, lba, nlb);
                self.reqs[idx].c2h = true;
            }
            io_op::WRITE => {
                let (ns_idx, lba, nlb, bytes) = self.check_rw(&sqe)?;
                let r = &mut self.reqs[idx];
                match r.buf.as_mut() {
                    Some(b) if b.len() >= bytes as usize => b.set_len(bytes as usize),
                    _ => return Err(Status::DATA_SGL_LENGTH_INVALID),
                }
                if let Some((at, _)) = r.icd_at {
                    r.icd_at = Some((at, bytes));
                }
                self.set_io(idx, ns_idx, IoType::Write, lba, nlb);
                // FUA: acknowledged only from stable storage (the bdev stack carries the flag
                // to the backend). FUA on a Read needs nothing: no layer keeps a read cache
                // that could differ from the media.
                self.reqs[idx].io_fua = sqe.fua();
            }
            io_op::WRITE_ZEROES => {
                let (ns_idx, ns) = self.io_namespace(sqe.nsid)?;
                if !ns.supports(IoType::WriteZeroes) {
                    return Err(Status::INVALID_OPCODE);
                }
                let end = sqe
                    .slba()
                    .checked_add(u64::from(sqe.nlb()))
                    .ok_or(Status::LBA_OUT_OF_RANGE)?;
                if end > ns.num_blocks {
                    return Err(Status::LBA_OUT_OF_RANGE);
                }
                self.put_buf(idx);
                self.set_io(idx, ns_idx, IoType::WriteZeroes, sqe.slba(), sqe.nlb());
            }
            io_op::FLUSH => {
                let (ns_idx, flush) = self
                    .io_namespace(sqe.nsid)
                    .map(|(i, ns)| (i, ns.supports(IoType::Flush)))?;
                self.put_buf(idx);
                if !flush {
                    // Nothing volatile to flush on this bdev.
                    return self.finish_inline(idx, Status::SUCCESS);
                }
                self.set_io(idx, ns_idx, IoType::Flush, 0, 0);
            }
            io_op::DATASET_MANAGEMENT => {
                let (ns_idx, ns) = self.io_namespace(sqe.nsid)?;
                let nr = (sqe.cdw10 & 0xff) as usize + 1;
                let num_blocks = ns.num_blocks;
                let unmap = ns.supports(IoType::Unmap);
                let Some(buf) = self.reqs[idx].buf.as_ref() else {
                    return Err(Status::DATA_SGL_LENGTH_INVALID);
                };
                let ranges = buf
                    .as_slice()
                    .get(..nr * 16)
                    .ok_or(Status::DATA_SGL_LENGTH_INVALID)?;
                for r in ranges.chunks_exact(16) {
                    let (len, slba) = dsm_range(r);
                    let end = slba
                        .checked_add(u64::from(len))
                        .ok_or(Status::LBA_OUT_OF_RANGE)?;
                    if end > num_blocks {
                        return Err(Status::LBA_OUT_OF_RANGE);
                    }
                }
                // Only the deallocate attribute (AD, CDW11 bit 2) has an effect; the others are
                // hints. A bdev without unmap deallocates nothing, which the spec allows.
                if sqe.cdw11 & (1 << 2) == 0 || !unmap {
                    return self.finish_inline(idx, Status::SUCCESS);
                }
                let r = &mut self.reqs[idx];
                r.ns_idx = ns_idx;
                r.io_type = IoType::Unmap;
                r.sub_total = nr as u16;
                r.sub_next = 0;
                r.sub_pending = 0;
                self.transition(idx, ReqState::ReadyToExecute);
                self.submit_dsm(idx);
                return Ok(());
            }
            _ => return Err(Status::INVALID_OPCODE),
        }
        self.transition(idx, ReqState::ReadyToExecute);
        self.submit(idx);
        Ok(())
    }

    /// A command that succeeded without bdev work.
    fn finish_inline(&mut self, idx: usize, s: Status) -> Result<(), Status> {
        self.complete(idx, s);
        Ok(())
    }

    fn set_io(&mut self, idx: usize, ns_idx: usize, t: IoType, lba: u64, nlb: u32) {
        let r = &mut self.reqs[idx];
        r.ns_idx = ns_idx;
        r.io_type = t;
        r.io_lba = lba;
        r.io_nlb = nlb;
        r.io_fua = false;
        r.sub_pending = 0;
    }

    /// Submits a ReadyToExecute single-I/O request; parks it on Busy. A Write whose data is
    /// still in `rx_buf` is left for `flush_icd`, which hands it over with the others.
    fn submit(&mut self, idx: usize) {
        let r = &mut self.reqs[idx];
        if r.icd_at.is_some() && r.io_type == IoType::Write {
            r.icd_go = true;
            return;
        }
        let buf = if r.io_type.has_data() {
            r.buf.take()
        } else {
            None
        };
        let io = BdevIo::new(r.io_type, r.io_lba, r.io_nlb, buf, idx as u64).with_fua(r.io_fua);
        let Some(ch) = self.channels.get_mut(r.ns_idx).and_then(|c| c.as_mut()) else {
            r.buf = io.buf;
            return self.complete(idx, Status::NAMESPACE_NOT_READY);
        };
        match ch.submit(io) {
            Submit::Queued => {
                r.sub_pending = 1;
                self.transition(idx, ReqState::Executing);
            }
            Submit::Busy(mut io) => {
                r.buf = io.buf.take();
                self.exec_queue.push_back(idx);
            }
        }
    }

    /// Submits the remaining Dataset Management ranges as Unmap I/Os (zero-length ones skipped).
    fn submit_dsm(&mut self, idx: usize) {
        let r = &mut self.reqs[idx];
        let Some(ch) = self.channels.get_mut(r.ns_idx).and_then(|c| c.as_mut()) else {
            return self.complete(idx, Status::NAMESPACE_NOT_READY);
        };
        let mut parked = false;
        while r.sub_next < r.sub_total {
            let off = usize::from(r.sub_next) * 16;
            let (len, slba) = match r.buf.as_ref().and_then(|b| b.as_slice().get(off..off + 16)) {
                Some(x) => dsm_range(x),
                None => (0, 0),
            };
            if len == 0 {
                r.sub_next += 1;
                continue;
            }
            match ch.submit(BdevIo::new(IoType::Unmap, slba, len, None, idx as u64)) {
                Submit::Queued => {
                    r.sub_next += 1;
                    r.sub_pending += 1;
                }
                Submit::Busy(_) => {
                    parked = true;
                    break;
                }
            }
        }
        let pending = r.sub_pending;
        if parked {
            if pending > 0 && r.state == ReqState::ReadyToExecute {
                self.transition(idx, ReqState::Executing);
            }
            self.exec_queue.push_back(idx);
        } else if pending == 0 {
            // Every range was empty.
            let s = r.sub_status;
            self.complete(idx, s);
        } else if self.reqs[idx].state == ReqState::ReadyToExecute {
            self.transition(idx, ReqState::Executing);
        }
    }

    fn retry_exec(&mut self) -> usize {
        let n = self.exec_queue.len();
        let mut work = 0;
        for _ in 0..n {
            let Some(idx) = self.exec_queue.pop_front() else {
                break;
            };
            work += 1;
            if self.reqs[idx].io_type == IoType::Unmap {
                self.submit_dsm(idx);
            } else {
                self.submit(idx);
            }
            if self.exec_queue.len() >= n {
                // The channel is still full; try again next poll.
                break;
            }
        }
        work
    }

    fn poll_bdevs(&mut self) -> usize {
        let mut work = 0;
        for i in 0..self.channels.len() {
            let Some(mut ch) = self.channels[i].take() else {
                continue;
            };
            work += ch.poll(&mut |io| self.io_done(io));
            self.channels[i] = Some(ch);
        }
        work
    }

    fn io_done(&mut self, mut io: BdevIo) {
        let Ok(idx) = usize::try_from(io.ctx) else {
            return;
        };
        let Some(r) = self.reqs.get_mut(idx) else {
            return;
        };
        if io.buf.is_some() {
            r.buf = io.buf.take();
        }
        r.sub_pending = r.sub_pending.saturating_sub(1);
        if io.status != IoStatus::Success && r.sub_status.is_success() {
            r.sub_status = match io.status {
                IoStatus::InvalidRange => Status::LBA_OUT_OF_RANGE,
                IoStatus::Unsupported => Status::INVALID_OPCODE,
                IoStatus::IoError(_) if io.io_type == IoType::Read => {
                    Status::UNRECOVERED_READ_ERROR
                }
                IoStatus::IoError(_) if io.io_type == IoType::Write => Status::WRITE_FAULT,
                _ => Status::INTERNAL_ERROR,
            };
            if matches!(io.status, IoStatus::IoError(_)) {
                QueueStats::add(&self.stats.media_errors, 1);
            }
        }
        let more = r.io_type == IoType::Unmap && r.sub_next < r.sub_total;
        if r.sub_pending > 0 || more {
            return;
        }
        let status = r.sub_status;
        if status.is_success() {
            let bytes = r.buf.as_ref().map_or(0, |b| b.len() as u64);
            match io.io_type {
                IoType::Read => {
                    QueueStats::add(&self.stats.read_cmds, 1);
                    QueueStats::add(&self.stats.bytes_read, bytes);
                }
                IoType::Write => {
                    QueueStats::add(&self.stats.write_cmds, 1);
                    QueueStats::add(&self.stats.bytes_written, bytes);
                }
                _ => {}
            }
        }
        self.complete(idx, status);
    }

    // ----------------------------------------------------------------------------------------
    // Controller shutdown (CC.SHN).

    /// Starts flushing every namespace of the controller's subsystem, each through a private
    /// channel on this reactor (admin path: allocating here is fine). CSTS.SHST was set to
    /// "occurring" by the caller; [`Connection::poll_shutdown`] sets "complete" once every
    /// flush succeeded. A Flush covers every write completed before it was submitted, on any
    /// queue: the backends flush the device, not a channel.
    pub(super) fn start_shutdown_flush(&mut self) {
        let Some(c) = self.ctrl.clone() else {
            return;
        };
        // A previous shutdown's flushes (SHN cleared and set again) are superseded.
        self.shutdown.retain(|f| !f.done);
        self.shutdown_failed = false;
        for ns in c.subsys.namespaces() {
            if !ns.supports(IoType::Flush) {
                continue;
            }
            match ns.bdev.open_channel(self.core, 1) {
                Ok(ch) => self.shutdown.push(ShutdownFlush {
                    ns: ns.clone(),
                    ch,
                    io: Some(BdevIo::new(IoType::Flush, 0, 0, None, u64::from(ns.nsid))),
                    done: false,
                }),
                Err(e) => {
                    tracing::error!(
                        subnqn = %c.subsys.nqn,
                        nsid = ns.nsid,
                        bdev = ns.bdev.name(),
                        "shutdown: cannot open a channel to flush the namespace: {e}; \
                         shutdown will not report complete"
                    );
                    self.shutdown_failed = true;
                }
            }
        }
        tracing::info!(
            subnqn = %c.subsys.nqn,
            cntlid = c.cntlid,
            namespaces = self.shutdown.len(),
            "controller shutdown: flushing namespaces"
        );
        self.poll_shutdown();
    }

    /// Drives the shutdown flushes; when the last one is done, reports CSTS.SHST complete (or,
    /// if one failed, leaves SHST at "occurring" and sets CSTS.CFS: the host must not believe
    /// its acknowledged writes are safe).
    fn poll_shutdown(&mut self) -> usize {
        let mut work = 0;
        let mut failed = false;
        for f in self.shutdown.iter_mut().filter(|f| !f.done) {
            if let Some(io) = f.io.take() {
                if let Submit::Busy(io) = f.ch.submit(io) {
                    f.io = Some(io);
                    continue;
                }
                work += 1;
            }
            let mut status = None;
            work += f.ch.poll(&mut |io| status = Some(io.status));
            let Some(status) = status else { continue };
            f.done = true;
            match status {
                IoStatus::Success => {
                    tracing::debug!(
                        nsid = f.ns.nsid,
                        bdev = f.ns.bdev.name(),
                        "shutdown flush done"
                    )
                }
                // A locked namespace (its key never arrived) was never written through.
                IoStatus::IoError(libc::EAGAIN) if !f.ns.is_online() => tracing::debug!(
                    nsid = f.ns.nsid,
                    bdev = f.ns.bdev.name(),
                    "shutdown flush: namespace offline, nothing to flush"
                ),
                other => {
                    tracing::error!(
                        nsid = f.ns.nsid,
                        bdev = f.ns.bdev.name(),
                        status = ?other,
                        "shutdown flush failed; shutdown will not report complete"
                    );
                    failed = true;
                }
            }
        }
        self.shutdown_failed |= failed;
        if self.shutdown.iter().all(|f| f.done) {
            self.shutdown.clear();
            if let Some(c) = &self.ctrl {
                let cc = c.cc.load(Ordering::Acquire);
                let mut csts = c.csts.load(Ordering::Acquire);
                // Only if the host still asks for shutdown (a reset meanwhile cleared SHST).
                if cc & prop::CC_SHN_MASK != 0
                    && csts & prop::CSTS_SHST_MASK == prop::CSTS_SHST_OCCURRING
                {
                    if self.shutdown_failed {
                        csts |= prop::CSTS_CFS;
                    } else {
                        csts = (csts & !prop::CSTS_SHST_MASK) | prop::CSTS_SHST_COMPLETE;
                        tracing::info!(cntlid = c.cntlid, "controller shutdown complete");
                    }
                    c.csts.store(csts, Ordering::Release);
                }
            }
            work += 1;
        }
        work
    }

    // ----------------------------------------------------------------------------------------
    // Send path.

    fn flush_tx(&mut self) -> usize {
        let mut work = 0;
        while self.ctl_off < self.ctl_len {
            match self.stream.write(&self.ctl_buf[self.ctl_off..self.ctl_len]) {
                Ok(0) => {
                    self.close_now("peer closed while sending");
                    return work;
                }
                Ok(n) => {
                    self.ctl_off += n;
                    work += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return work,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close_now("send error");
                    return work;
                }
            }
        }
        if self.phase == Phase::Closing {
            self.close_now("fatal error reported");
            return work;
        }
        let dd = self.dg.data;
        for _ in 0..TX_BUDGET {
            if self.tx_queue.is_empty() {
                break;
            }
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut n_iov = 0;
            for &idx in self.tx_queue.iter() {
                if n_iov + 3 > MAX_IOV {
                    break;
                }
                let r = &self.reqs[idx];
                let data: &[u8] = if r.tx_data {
                    r.buf.as_ref().map_or(&[], |b| b.as_slice())
                } else {
                    &[]
                };
                let dig: &[u8] = if r.tx_data && dd { &r.tx_ddgst } else { &[] };
                let mut skip = r.tx_off;
                for s in [&r.tx_hdr[..r.tx_hdr_len], data, dig] {
                    if skip >= s.len() {
                        skip -= s.len();
                        continue;
                    }
                    iov[n_iov] = IoSlice::new(&s[skip..]);
                    skip = 0;
                    n_iov += 1;
                }
            }
            match self.stream.write_vectored(&iov[..n_iov]) {
                Ok(0) => {
                    self.close_now("peer closed while sending");
                    return work;
                }
                Ok(n) => {
                    work += 1;
                    self.tx_advance(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close_now("send error");
                    return work;
                }
            }
        }
        work
    }

    fn pdu_len(&self, idx: usize) -> usize {
        let r = &self.reqs[idx];
        let data = if r.tx_data {
            r.buf.as_ref().map_or(0, |b| b.len())
        } else {
            0
        };
        let dig = if r.tx_data && self.dg.data {
            DIGEST_LEN
        } else {
            0
        };
        r.tx_hdr_len + data + dig
    }

    fn tx_advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(&idx) = self.tx_queue.front() else {
                return;
            };
            let left = self.pdu_len(idx) - self.reqs[idx].tx_off;
            if n < left {
                self.reqs[idx].tx_off += n;
                return;
            }
            n -= left;
            self.tx_queue.pop_front();
            self.pdu_sent(idx);
        }
    }

    fn pdu_sent(&mut self, idx: usize) {
        match self.reqs[idx].state {
            ReqState::R2tQueued => self.transition(idx, ReqState::RecvH2cData),
            ReqState::TxC2hData => {
                if self.reqs[idx].tx_success {
                    self.release(idx);
                } else {
                    self.put_buf(idx);
                    self.queue_resp(idx);
                    self.tx_queue.push_back(idx);
                }
            }
            ReqState::TxResp => self.release(idx),
            s => debug_assert!(false, "PDU sent for a request in state {s:?}"),
        }
    }

    // ----------------------------------------------------------------------------------------
    // Teardown.

    /// Reports a fatal transport error with a C2HTermReq (when the spec defines one) and closes.
    fn fatal(&mut self, f: Fatal) {
        if let Some((fes, fei)) = f.fes {
            tracing::warn!(
                qid = self.qid,
                ?fes,
                fei,
                "fatal NVMe/TCP error, sending C2HTermReq"
            );
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
            self.phase = Phase::Closing;
        } else {
            self.close_now("fatal transport error");
        }
    }

    /// Releases every request that is not at a bdev; those free when their I/O comes back.
    fn drop_requests(&mut self) {
        self.tx_queue.clear();
        self.exec_queue.clear();
        self.aers.clear();
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
        self.phase = Phase::Closed;
        self.teardown_controller();
    }

    fn teardown_controller(&mut self) {
        let Some(c) = self.ctrl.take() else { return };
        if self.qid == 0 {
            c.kill();
            self.target.remove_controller(c.cntlid);
        } else {
            let mut a = c.admin();
            if let Some(q) = a.io_qids.get_mut(usize::from(self.qid)) {
                *q = false;
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
            return 0;
        }
        let cntlid = c.cntlid;
        let mut work = 0;
        if c.event_pending.swap(false, Ordering::AcqRel) {
            work += self.deliver_events();
        }
        if let Some(deadline) = self.ka_deadline {
            if Instant::now() > deadline {
                tracing::warn!(
                    cntlid,
                    "keep alive timeout expired, tearing the controller down"
                );
                self.close_now("keep alive timeout");
                return work + 1;
            }
        }
        work
    }

    pub(super) fn sqhd_disabled_flag(cattr: u8) -> bool {
        cattr & crate::nvme::connect::CATTR_DISABLE_SQ_FLOW != 0
    }

    /// Allocates the data pool and opens bdev channels after a successful Connect.
    pub(super) fn setup_queue(&mut self, depth: usize, io_queue: bool) -> Result<(), Status> {
        let l = self.target.limits;
        let subsys = self.subsys.clone().ok_or(Status::INTERNAL_ERROR)?;
        // Page alignment suits every backend (O_DIRECT included), so namespaces added after
        // Connect can use this pool too.
        let align = subsys
            .namespaces()
            .iter()
            .map(|n| n.bdev.buf_align())
            .max()
            .unwrap_or(POOL_ALIGN)
            .max(POOL_ALIGN);
        self.pool_align = align;
        let pool = BufPool::new(depth, l.max_io_size as usize, align)
            .map_err(|_| Status::INTERNAL_ERROR)?;
        self.pool = Some(pool);
        self.depth = depth;
        self.sqhd = 0;
        if io_queue {
            self.sync_namespaces();
        }
        Ok(())
    }

    /// Brings `ns_cache` and `channels` up to date with the subsystem's namespace table, on
    /// this connection's reactor: a removed or replaced namespace's channel moves to `retired`
    /// (its I/O in flight completes there), requests parked for it fail with Invalid
    /// Namespace, and a new namespace gets a channel. Runs at Connect and when the table
    /// generation moved; the only place the I/O path allocates for namespaces.
    fn sync_namespaces(&mut self) {
        let Some(s) = self.subsys.clone() else { return };
        // Read the generation first: a change racing with this pass bumps it again, so the
        // next poll repeats the pass.
        let gen = s.ns_generation();
        let n = s.max_nsid() as usize;
        if self.ns_cache.len() < n {
            self.ns_cache.resize_with(n, || None);
        }
        if self.channels.len() < n {
            self.channels.resize_with(n, || None);
        }
        for i in 0..n {
            let cur = s.slot(i);
            let same = match (&cur, &self.ns_cache[i]) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if same {
                continue;
            }
            let old = self.ns_cache[i].take();
            if let (Some(old), Some(ch)) = (old, self.channels[i].take()) {
                self.retired.push((old, ch));
            }
            self.fail_parked(i);
            if let Some(ns) = cur {
                if ns.bdev.buf_align() > self.pool_align {
                    tracing::warn!(
                        bdev = ns.bdev.name(),
                        "bdev needs buffers aligned beyond this queue's pool; namespace not ready here"
                    );
                    self.ns_cache[i] = Some(ns);
                    continue;
                }
                match ns.bdev.open_channel(self.core, self.depth) {
                    Ok(c) => self.channels[i] = Some(c),
                    Err(e) => {
                        tracing::warn!(bdev = ns.bdev.name(), error = %e, "cannot open bdev channel")
                    }
                }
                self.ns_cache[i] = Some(ns);
            }
        }
        self.ns_gen = gen;
    }

    /// Re-reads the namespace table if the subsystem's generation moved (one atomic load
    /// otherwise); true if it did. Called once per poll and after each socket read that brings
    /// commands, so a command sent after an RPC changed the table always sees the change.
    fn refresh_namespaces(&mut self) -> bool {
        let moved = self
            .subsys
            .as_ref()
            .is_some_and(|s| s.ns_generation() != self.ns_gen);
        if moved {
            self.sync_namespaces();
        }
        moved
    }

    /// Fails requests parked (channel busy) for namespace slot `slot`, whose namespace is gone:
    /// they must not reach whatever namespace takes the slot next.
    fn fail_parked(&mut self, slot: usize) {
        for _ in 0..self.exec_queue.len() {
            let Some(idx) = self.exec_queue.pop_front() else {
                break;
            };
            let r = &mut self.reqs[idx];
            if r.ns_idx != slot {
                self.exec_queue.push_back(idx);
                continue;
            }
            if r.sub_pending == 0 {
                self.complete(idx, Status::INVALID_NAMESPACE);
            } else {
                // Dataset Management with ranges at the old channel: submit no more, complete
                // when those are back.
                r.sub_total = r.sub_next;
                if r.sub_status.is_success() {
                    r.sub_status = Status::INVALID_NAMESPACE;
                }
            }
        }
    }

    /// Polls the channels of removed namespaces; drops each (and its namespace reference, which
    /// [`Target::remove_namespace`] waits for) once nothing is in flight on it.
    fn poll_retired(&mut self) -> usize {
        let mut work = 0;
        let mut i = 0;
        while i < self.retired.len() {
            let (ns, mut ch) = self.retired.swap_remove(i);
            work += ch.poll(&mut |io| self.io_done(io));
            if ch.in_flight() == 0 {
                drop(ch);
                drop(ns);
                work += 1;
            } else {
                self.retired.push((ns, ch));
                let last = self.retired.len() - 1;
                self.retired.swap(i, last);
                i += 1;
            }
        }
        work
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close_now("dropped");
        self.target.release_connection();
    }
}

/// Header region length: header + digest + padding, up to the data (or the whole PDU if none).
fn region_len(l: &Layout) -> usize {
    if l.data_len > 0 {
        l.data_off
    } else {
        l.header_len
    }
}

/// A Dataset Management range: (length in blocks, starting LBA).
fn dsm_range(r: &[u8]) -> (u32, u64) {
    let mut len = [0u8; 4];
    let mut lba = [0u8; 8];
    if let (Some(a), Some(b)) = (r.get(4..8), r.get(8..16)) {
        len.copy_from_slice(a);
        lba.copy_from_slice(b);
    }
    (u32::from_le_bytes(len), u64::from_le_bytes(lba))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReqState::*;

    const ALL: [ReqState; N_STATES] = [
        Free,
        RecvCapsuleData,
        R2tQueued,
        RecvH2cData,
        ReadyToExecute,
        Executing,
        AwaitingEvent,
        TxC2hData,
        TxResp,
    ];

    #[test]
    fn state_indices_are_dense() {
        for (i, s) in ALL.iter().enumerate() {
            assert_eq!(s.index(), i);
        }
    }

    #[test]
    fn transition_table() {
        // Every live state can be released (connection teardown); Free cannot be freed again.
        for s in ALL {
            assert_eq!(s.may_move_to(Free), s != Free, "{s:?} -> Free");
        }
        // The write path through R2T, the read path, and an AER.
        let write = [
            Free,
            RecvCapsuleData,
            R2tQueued,
            RecvH2cData,
            ReadyToExecute,
            Executing,
            TxResp,
            Free,
        ];
        let read = [
            Free,
            RecvCapsuleData,
            ReadyToExecute,
            Executing,
            TxC2hData,
            TxResp,
            Free,
        ];
        let aer = [Free, RecvCapsuleData, AwaitingEvent, TxResp, Free];
        for path in [&write[..], &read[..], &aer[..]] {
            for w in path.windows(2) {
                assert!(w[0].may_move_to(w[1]), "{:?} -> {:?}", w[0], w[1]);
            }
        }
        // Moves that would mean a bug.
        for (a, b) in [
            (R2tQueued, Executing),
            (RecvH2cData, R2tQueued),
            (TxResp, TxC2hData),
            (TxResp, Executing),
            (AwaitingEvent, Executing),
            (Executing, RecvH2cData),
            (TxC2hData, Executing),
        ] {
            assert!(!a.may_move_to(b), "{a:?} -> {b:?} must be refused");
        }
    }

    #[test]
    fn header_region_includes_padding_up_to_pdo() {
        let l = Layout {
            header_len: 76,
            data_off: 128,
            data_len: 10,
            data_digest: false,
        };
        assert_eq!(region_len(&l), 128);
        let l = Layout {
            header_len: 28,
            data_off: 28,
            data_len: 0,
            data_digest: false,
        };
        assert_eq!(region_len(&l), 28);
    }

    #[test]
    fn dsm_range_decoding() {
        let mut r = [0u8; 16];
        r[4..8].copy_from_slice(&7u32.to_le_bytes());
        r[8..16].copy_from_slice(&0x1_0000_0000u64.to_le_bytes());
        assert_eq!(dsm_range(&r), (7, 0x1_0000_0000));
        assert_eq!(
            dsm_range(&r[..3]),
            (0, 0),
            "short input decodes as an empty range"
        );
    }
}
