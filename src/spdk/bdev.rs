//! The `spdk_nvme` bdev: one namespace of a controller driven by SPDK's user-space NVMe driver.
//!
//! Each reactor's [`SpdkNvmeChannel`] owns an I/O queue pair of its own. `submit` issues the
//! command straight into it (`spdk_nvme_ns_cmd_read/write/flush/write_zeroes/dataset_management`,
//! FUA as the command's FUA bit); `poll` calls `spdk_nvme_qpair_process_completions`, whose
//! callbacks mark the I/O's slot done, and hands the finished I/Os back like any other channel.
//! The slots (one per queue entry) are allocated when the channel opens: nothing is allocated,
//! locked or copied per I/O. A PCIe controller must DMA into the I/O's buffer: buffers from
//! SPDK's memory ([`crate::sys::buf::AlignedBuf::for_io`] once the environment runs) go as they
//! are; any other buffer is bounced through the slot's own DMA buffer (allocated the first time
//! a slot needs one, then reused) and counted, so a lab can see it happen. Fabrics transports
//! copy to the socket themselves and take any memory.
//!
//! Failure: a command that completes with an NVMe error is an `IoError` (EIO; ENXIO for aborts
//! and path errors). A queue pair that fails marks the controller failed (one log line); from
//! then on new I/O is answered ENXIO at once, outstanding I/O completes aborted, and the
//! controller's admin thread resets it in the background (super::nvme).
//!
//! A new queue pair connects in the background (a fabrics Connect is a round trip). Until it is
//! connected the channel keeps its I/O itself (never in SPDK's queue), so a Connect the remote
//! refuses loses nothing: the channel frees that queue pair and asks for another after a short,
//! doubling wait, and the I/O goes out once one connects (or fails ENXIO after
//! [`HELD_LIMIT`], or at once if the controller fails). Linux's nvmet refuses a Connect for a
//! queue ID whose previous queue it is still tearing down ("qid already created": Command
//! Sequence Error), and SPDK hands a freed queue ID out again at once: a channel closed and
//! another opened right after (a host disconnecting, then the shutdown Flush) meets exactly that.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::env;
use super::ffi;
use super::nvme::{AdminThread, Controller, CtrlrState, IoQpair, NsInfo, TransportId};
use super::{SpdkEnvConfig, SpdkNvmeConfig};
use crate::bdev::{validate, Bdev, BdevChannel, BdevError, BdevIo, IoStatus, IoType, Submit};
use crate::sys::buf::AlignedBuf;
use crate::types::CoreId;

/// Most blocks one NVMe Write Zeroes command may cover (NLB is 16 bits, zero-based); longer
/// requests are issued as a chain of commands.
const MAX_WRITE_ZEROES_BLOCKS: u32 = 1 << 16;

/// How often a channel without a queue pair tries to get one while its controller is online.
const ATTACH_RETRY: Duration = Duration::from_secs(1);

/// First wait before a channel asks again for a queue pair whose Connect was refused (doubling
/// up to [`ATTACH_RETRY`]).
const CONNECT_RETRY_MIN: Duration = Duration::from_millis(10);

/// How long I/O may wait in a channel for its queue pair to connect before it fails (ENXIO).
const HELD_LIMIT: Duration = Duration::from_secs(5);

/// A namespace of an SPDK-attached controller.
pub struct SpdkNvmeBdev {
    name: String,
    ctrlr: Arc<Controller>,
    info: NsInfo,
    // Stops the admin thread (which holds its own reference to the controller) on drop.
    _admin: AdminThread,
}

impl SpdkNvmeBdev {
    /// Starts SPDK's environment if needed, attaches the controller and checks the namespace.
    /// Blocking; control threads only. Every failure names the bdev and says what to check.
    pub fn open(
        cfg: &SpdkNvmeConfig,
        env_cfg: &SpdkEnvConfig,
        cores: &[CoreId],
    ) -> Result<SpdkNvmeBdev, BdevError> {
        let invalid = |what: String| BdevError::Invalid {
            name: cfg.name.clone(),
            what,
        };
        if cfg.name.is_empty() {
            return Err(invalid("name must not be empty".into()));
        }
        if cfg.nsid == 0 || cfg.nsid == u32::MAX {
            return Err(invalid(format!("nsid {} is not a namespace ID", cfg.nsid)));
        }
        if !(2..=4096).contains(&cfg.queue_depth) {
            return Err(invalid(format!(
                "queue_depth {} must be 2..=4096",
                cfg.queue_depth
            )));
        }
        let trid = TransportId::parse(&cfg.trid).map_err(invalid)?;
        env::ensure(env_cfg, trid.is_pcie(), cores).map_err(invalid)?;
        let (ctrlr, info) = Controller::attach(
            &cfg.name,
            &cfg.trid,
            cfg.nsid,
            cfg.queue_depth,
            cfg.hostnqn.as_deref(),
        )
        .map_err(invalid)?;
        if info.sector_size != 512 && info.sector_size != 4096 {
            return Err(invalid(format!(
                "namespace {} has {}-byte blocks; nvseal needs 512 or 4096",
                cfg.nsid, info.sector_size
            )));
        }
        // SAFETY: the namespace handle was just looked up on the attached controller; get_md_size
        // only reads it.
        let md = unsafe { ffi::spdk_nvme_ns_get_md_size(ctrlr.ns_ptr()) };
        if md != 0 {
            return Err(invalid(format!(
                "namespace {} is formatted with {md} bytes of metadata per block; nvseal needs a format without metadata",
                cfg.nsid
            )));
        }
        if info.num_sectors == 0 {
            return Err(invalid(format!("namespace {} is empty", cfg.nsid)));
        }
        let admin = AdminThread::start(ctrlr.clone()).map_err(invalid)?;
        tracing::info!(bdev = %cfg.name, trid = %cfg.trid, nsid = cfg.nsid,
            block_size = info.sector_size, num_blocks = info.num_sectors,
            volatile_cache = info.flush, write_zeroes = info.write_zeroes,
            deallocate = info.deallocate, "spdk_nvme: controller attached");
        Ok(SpdkNvmeBdev {
            name: cfg.name.clone(),
            ctrlr,
            info,
            _admin: admin,
        })
    }

    /// The controller's state (`online`, `failed`, `resetting`).
    pub fn state(&self) -> CtrlrState {
        self.ctrlr.state()
    }
    pub fn trid(&self) -> &str {
        self.ctrlr.trid()
    }
}

impl super::ControllerStatus for SpdkNvmeBdev {
    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "bdev": self.name,
            "trid": self.ctrlr.trid(),
            "state": self.ctrlr.state().as_str(),
            "removed": self.ctrlr.is_removed(),
            "resets": self.ctrlr.generation(),
            "block_size": self.info.sector_size,
            "num_blocks": self.info.num_sectors,
            "volatile_write_cache": self.info.flush,
        })
    }
}

impl Bdev for SpdkNvmeBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn block_size(&self) -> u32 {
        self.info.sector_size
    }
    fn num_blocks(&self) -> u64 {
        self.info.num_sectors
    }
    fn io_type_supported(&self, io_type: IoType) -> bool {
        match io_type {
            IoType::Read | IoType::Write | IoType::Flush => true,
            IoType::WriteZeroes => self.info.write_zeroes,
            IoType::Unmap => self.info.deallocate,
        }
    }
    fn buf_align(&self) -> usize {
        // A PCIe drive's PRP entries start on dword boundaries and the driver splits on pages;
        // page-aligned buffers never need a bounce for alignment.
        4096
    }
    fn open_channel(
        &self,
        _core: CoreId,
        queue_depth: usize,
    ) -> Result<Box<dyn BdevChannel>, BdevError> {
        crate::bdev::check_queue_depth(&self.name, queue_depth)?;
        // A channel opened while the controller is failed (a host connecting during an outage)
        // gets its queue pair once the controller is back (`attach_qpair`); until then it
        // answers I/O with an error, like every other channel of a failed controller.
        let qpair = match self.ctrlr.state() {
            CtrlrState::Online => match self.ctrlr.alloc_qpair() {
                Ok(q) => Some(q),
                Err(e) => {
                    tracing::warn!(bdev = %self.name, error = %e,
                        "spdk_nvme: no I/O queue pair for a new channel yet; retrying while it answers I/O with errors");
                    None
                }
            },
            _ => None,
        };
        let slots: Box<[Slot]> = (0..queue_depth)
            .map(|i| Slot {
                io: None,
                status: IoStatus::Pending,
                bounce: None,
                bounced: false,
                range: ffi::spdk_nvme_dsm_range::default(),
                next_lba: 0,
                left: 0,
                chan: std::ptr::null_mut(),
                idx: i as u32,
            })
            .collect();
        let inner = Box::new(Inner {
            slots,
            free: (0..queue_depth as u32).rev().collect(),
            done: Vec::with_capacity(queue_depth),
            qpair: qpair.as_ref().map_or(std::ptr::null_mut(), |q| q.raw()),
            ctrlr: self.ctrlr.clone(),
            bounces: 0,
        });
        let inner = NonNull::from(Box::leak(inner));
        // SAFETY: `inner` was just leaked from a Box and is uniquely referenced here; each slot
        // learns where its channel state lives (stable: the Box is never moved or reallocated).
        unsafe {
            let p = inner.as_ptr();
            for s in (*p).slots.iter_mut() {
                s.chan = p;
            }
        }
        Ok(Box::new(SpdkNvmeChannel {
            qpair,
            ctrlr: self.ctrlr.clone(),
            next_attach: Instant::now(),
            inner,
            block_size: self.info.sector_size,
            num_blocks: self.info.num_sectors,
            info: self.info,
            pcie: self.ctrlr.is_pcie(),
            taken: 0,
            rejected: Vec::with_capacity(queue_depth),
            connected: false,
            held: std::collections::VecDeque::with_capacity(queue_depth),
            held_since: Instant::now(),
            retry: CONNECT_RETRY_MIN,
            depth: queue_depth,
        }))
    }
}

/// One queue entry's state: the I/O while SPDK has it, and what its callback needs.
struct Slot {
    io: Option<BdevIo>,
    status: IoStatus,
    /// DMA memory for a buffer SPDK cannot DMA to (PCIe only); kept for the slot's next use.
    bounce: Option<AlignedBuf>,
    bounced: bool,
    /// A Dataset Management range (SPDK copies it, but it lives here until completion anyway).
    range: ffi::spdk_nvme_dsm_range,
    /// Write Zeroes longer than one command: where the next command starts, and blocks left.
    next_lba: u64,
    left: u32,
    chan: *mut Inner,
    idx: u32,
}

/// A channel's state that completion callbacks reach (through raw pointers: module docs of
/// super::nvme for who may run them when).
struct Inner {
    slots: Box<[Slot]>,
    free: Vec<u32>,
    done: Vec<u32>,
    qpair: *mut ffi::spdk_nvme_qpair,
    ctrlr: Arc<Controller>,
    bounces: u64,
}

/// A reactor's channel: its own I/O queue pair (module docs).
pub struct SpdkNvmeChannel {
    /// Dropped before `inner` is freed (Drop): freeing the queue pair may still run callbacks.
    qpair: Option<IoQpair>,
    ctrlr: Arc<Controller>,
    /// When a channel without a queue pair may try to get one again.
    next_attach: Instant,
    inner: NonNull<Inner>,
    block_size: u32,
    num_blocks: u64,
    info: NsInfo,
    pcie: bool,
    /// Slots taken (issued or finished and not yet handed back).
    taken: usize,
    /// I/O answered while a reset held the queue pair (never in a slot).
    rejected: Vec<BdevIo>,
    /// The queue pair has connected (module docs); until then I/O waits in `held`.
    connected: bool,
    /// I/O waiting for the queue pair to connect, oldest first (never in a slot).
    held: std::collections::VecDeque<BdevIo>,
    /// When the oldest I/O in `held` arrived.
    held_since: Instant,
    /// Wait before asking again after a refused Connect.
    retry: Duration,
    depth: usize,
}

/// Maps a completion to an I/O status: success, or an errno the layers above turn into an NVMe
/// status (ENXIO: aborted or path error, the controller is going away; EIO: anything else).
fn status_of(cpl: *const ffi::spdk_nvme_cpl) -> IoStatus {
    let (mut sct, mut sc) = (0u16, 0u16);
    // SAFETY: SPDK passes a valid completion for the duration of the callback.
    let err = unsafe { ffi::nvseal_spdk_cpl_is_error(cpl) };
    if !err {
        return IoStatus::Success;
    }
    // SAFETY: as above; the out-parameters are valid locals.
    unsafe { ffi::nvseal_spdk_cpl_status(cpl, &mut sct, &mut sc) };
    tracing::debug!(sct, sc, "spdk_nvme: command failed");
    // Generic status 0x07 (aborted by request), 0x08 (aborted: SQ deletion); path-related
    // status type 3.
    if (sct == 0 && (sc == 0x07 || sc == 0x08)) || sct == 3 {
        IoStatus::IoError(libc::ENXIO)
    } else {
        IoStatus::IoError(libc::EIO)
    }
}

/// Completion callback of every command a channel issues; `arg` is its slot.
unsafe extern "C" fn on_complete(arg: *mut c_void, cpl: *const ffi::spdk_nvme_cpl) {
    // SAFETY: `arg` is the slot this command was issued for (a stable element of its channel's
    // slot array, alive until the queue pair is freed), and only the thread inside the queue
    // pair's gate runs callbacks, so nothing else touches the slot now.
    let slot = unsafe { &mut *arg.cast::<Slot>() };
    let mut status = status_of(cpl);
    if status == IoStatus::Success && slot.left > 0 {
        // The next command of a long Write Zeroes.
        // SAFETY: `chan` points to this slot's live channel state; only its qpair field is read.
        let (qpair, ns) = unsafe { ((*slot.chan).qpair, (*slot.chan).ctrlr.ns_ptr()) };
        match issue_write_zeroes(slot, ns, qpair) {
            Ok(()) => return,
            Err(rc) => status = IoStatus::IoError(rc),
        }
    }
    if slot.bounced {
        slot.bounced = false;
        if status == IoStatus::Success {
            if let (Some(io), Some(b)) = (slot.io.as_mut(), slot.bounce.as_ref()) {
                if io.io_type == IoType::Read {
                    if let Some(buf) = io.buf.as_mut() {
                        let n = buf.len();
                        buf.as_mut_slice().copy_from_slice(&b.as_slice()[..n]);
                    }
                }
            }
        }
    }
    slot.status = status;
    let idx = slot.idx;
    // SAFETY: as above; only the `done` list is touched (disjoint from the slot array).
    unsafe { (*slot.chan).done.push(idx) };
}

/// Issues the next command (at most [`MAX_WRITE_ZEROES_BLOCKS`]) of a Write Zeroes.
fn issue_write_zeroes(
    slot: &mut Slot,
    ns: *mut ffi::spdk_nvme_ns,
    qpair: *mut ffi::spdk_nvme_qpair,
) -> Result<(), i32> {
    let n = slot.left.min(MAX_WRITE_ZEROES_BLOCKS);
    let arg = (slot as *mut Slot).cast::<c_void>();
    // SAFETY: the caller is inside the queue pair's gate; `ns` belongs to its controller; the
    // callback argument is the slot, which outlives the command.
    let rc = unsafe {
        ffi::spdk_nvme_ns_cmd_write_zeroes(ns, qpair, slot.next_lba, n, Some(on_complete), arg, 0)
    };
    if rc != 0 {
        return Err(-rc);
    }
    slot.next_lba += u64::from(n);
    slot.left -= n;
    Ok(())
}

impl SpdkNvmeChannel {
    /// The slots and lists; only inside the queue pair's gate (a reset's callbacks reach them
    /// from the admin thread while it holds the gate).
    fn inner(&mut self) -> &mut Inner {
        // SAFETY: `inner` lives until Drop. Callers are inside the gate, so the admin thread is
        // not running callbacks; the reactor's own callbacks run only inside SPDK calls made
        // while no reference from here is alive.
        unsafe { self.inner.as_mut() }
    }

    /// Completes slot `idx` with `io` and `status` at the next poll.
    fn finish(&mut self, idx: u32, io: BdevIo, status: IoStatus) {
        let inner = self.inner();
        let s = &mut inner.slots[idx as usize];
        s.io = Some(io);
        s.status = status;
        inner.done.push(idx);
    }

    /// Puts the data in DMA-able memory for a PCIe controller; the payload pointer to give SPDK.
    fn payload(&mut self, idx: u32, write: bool) -> Result<*mut c_void, i32> {
        let pcie = self.pcie;
        let inner = self.inner();
        let s = &mut inner.slots[idx as usize];
        let io = s.io.as_mut().ok_or(libc::EINVAL)?;
        let buf = io.buf.as_mut().ok_or(libc::EINVAL)?;
        let len = buf.len();
        let ptr = buf.as_mut_ptr();
        if !pcie || env::dma_ok(ptr, len) {
            return Ok(ptr.cast());
        }
        if s.bounce.as_ref().is_none_or(|b| b.capacity() < len) {
            let b = AlignedBuf::for_io(len, 4096).ok_or(libc::ENOMEM)?;
            if !b.is_io_memory() {
                return Err(libc::ENOMEM);
            }
            s.bounce = Some(b);
        }
        let b = s.bounce.as_mut().ok_or(libc::ENOMEM)?;
        if write {
            b.as_mut_slice()[..len].copy_from_slice(buf.as_slice());
        }
        s.bounced = true;
        if inner.bounces == 0 {
            tracing::warn!(trid = %inner.ctrlr.trid(),
                "spdk_nvme: an I/O buffer is not in SPDK's DMA memory; bouncing it through a copy (raise spdk.mem_size_mib so the I/O buffers fit there)");
        }
        inner.bounces += 1;
        Ok(b.as_mut_ptr().cast())
    }

    /// Issues slot `idx`'s I/O on the queue pair (inside its gate). 0, or a negative errno.
    fn issue(&mut self, idx: u32) -> i32 {
        let (qpair, ns) = {
            let inner = self.inner();
            (inner.qpair, inner.ctrlr.ns_ptr())
        };
        let (io_type, lba, n, fua) = {
            let s = &self.inner().slots[idx as usize];
            let io = s.io.as_ref().expect("slot holds its I/O");
            (
                io.io_type,
                io.offset_blocks,
                io.num_blocks,
                io.is_fua_write(),
            )
        };
        let arg = (&mut self.inner().slots[idx as usize] as *mut Slot).cast::<c_void>();
        let cb = Some(on_complete as unsafe extern "C" fn(*mut c_void, *const ffi::spdk_nvme_cpl));
        match io_type {
            IoType::Read | IoType::Write => {
                let write = io_type == IoType::Write;
                let payload = match self.payload(idx, write) {
                    Ok(p) => p,
                    Err(e) => return -e,
                };
                let flags = if fua {
                    ffi::SPDK_NVME_IO_FLAGS_FORCE_UNIT_ACCESS
                } else {
                    0
                };
                // SAFETY: inside the gate; `ns` and `qpair` belong to this controller; the
                // payload is `n` blocks of memory owned by the slot's I/O (or its bounce
                // buffer), which stays put until the callback runs; `arg` is the slot.
                unsafe {
                    if write {
                        ffi::spdk_nvme_ns_cmd_write(ns, qpair, payload, lba, n, cb, arg, flags)
                    } else {
                        ffi::spdk_nvme_ns_cmd_read(ns, qpair, payload, lba, n, cb, arg, flags)
                    }
                }
            }
            // SAFETY: inside the gate; `ns`/`qpair` of this controller; `arg` is the slot.
            IoType::Flush => unsafe { ffi::spdk_nvme_ns_cmd_flush(ns, qpair, cb, arg) },
            IoType::WriteZeroes => {
                let s = &mut self.inner().slots[idx as usize];
                s.next_lba = lba;
                s.left = n;
                match issue_write_zeroes(s, ns, qpair) {
                    Ok(()) => 0,
                    Err(e) => {
                        s.left = 0;
                        -e
                    }
                }
            }
            IoType::Unmap => {
                let s = &mut self.inner().slots[idx as usize];
                s.range = ffi::spdk_nvme_dsm_range {
                    starting_lba: lba,
                    length: n,
                    ..Default::default()
                };
                let range = &s.range as *const ffi::spdk_nvme_dsm_range;
                // SAFETY: inside the gate; `range` points to one range in the slot, alive until
                // the callback; `arg` is the slot.
                unsafe {
                    ffi::spdk_nvme_ns_cmd_dataset_management(
                        ns,
                        qpair,
                        ffi::spdk_nvme_dsm_attribute_SPDK_NVME_DSM_ATTR_DEALLOCATE,
                        range,
                        1,
                        cb,
                        arg,
                    )
                }
            }
        }
    }
}

impl SpdkNvmeChannel {
    /// Gets a queue pair for a channel that has none, if the controller is online and the last
    /// try is long enough ago. Asynchronous connect: it never blocks the reactor.
    fn attach_qpair(&mut self) -> bool {
        if self.qpair.is_some() {
            return true;
        }
        let now = Instant::now();
        if now < self.next_attach || self.ctrlr.state() != CtrlrState::Online {
            return false;
        }
        self.next_attach = now + ATTACH_RETRY;
        match self.ctrlr.alloc_qpair() {
            Ok(q) => {
                // No callback can reach `inner` yet: the queue pair is new and nothing was
                // submitted on it.
                self.inner().qpair = q.raw();
                self.qpair = Some(q);
                tracing::info!(trid = %self.ctrlr.trid(), "spdk_nvme: channel got its I/O queue pair");
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "spdk_nvme: still no I/O queue pair");
                false
            }
        }
    }

    /// Whether the channel's queue pair is connected (asking for one first if it has none and
    /// one is due). False while it connects.
    fn ready(&mut self) -> bool {
        if !self.attach_qpair() {
            return false;
        }
        if self.connected {
            return true;
        }
        let Some(q) = self.qpair.as_ref() else {
            return false;
        };
        if !q.gate().enter() {
            return false;
        }
        // SAFETY: inside the gate, on the reactor that owns the queue pair; a read of its state.
        let up = unsafe { ffi::spdk_nvme_qpair_is_connected(q.raw()) };
        q.gate().leave();
        if up {
            self.connected = true;
            self.retry = CONNECT_RETRY_MIN;
        }
        up
    }

    /// The queue pair's Connect was refused (or its connection dropped before it connected):
    /// free it and ask for another after `retry`. Nothing was submitted on it (I/O waits in
    /// `held` until it connects), so freeing it aborts nothing.
    fn connect_refused(&mut self, why: ffi::spdk_nvme_qp_failure_reason) {
        tracing::warn!(trid = %self.ctrlr.trid(), reason = ?why,
            retry_ms = self.retry.as_millis() as u64, waiting = self.held.len(),
            "spdk_nvme: the I/O queue pair's Connect was refused; asking for another");
        self.inner().qpair = std::ptr::null_mut();
        drop(self.qpair.take());
        self.next_attach = Instant::now() + self.retry;
        self.retry = (self.retry * 2).min(ATTACH_RETRY);
    }

    /// [`BdevChannel::submit`] inside the queue pair's gate.
    fn submit_inside(&mut self, mut io: BdevIo) -> Submit {
        let Some(idx) = self.inner().free.pop() else {
            return Submit::Busy(io);
        };
        self.taken += 1;
        if let Err(st) = validate(&io, self.block_size, self.num_blocks) {
            self.finish(idx, io, st);
            return Submit::Queued;
        }
        let skip = match io.io_type {
            // No volatile write cache: nothing to flush.
            IoType::Flush if !self.info.flush => Some(IoStatus::Success),
            IoType::WriteZeroes if !self.info.write_zeroes => Some(IoStatus::Unsupported),
            IoType::Unmap if !self.info.deallocate => Some(IoStatus::Unsupported),
            IoType::WriteZeroes | IoType::Unmap if io.num_blocks == 0 => Some(IoStatus::Success),
            _ => None,
        };
        if let Some(st) = skip {
            self.finish(idx, io, st);
            return Submit::Queued;
        }
        let online = self
            .qpair
            .as_ref()
            .is_some_and(|q| q.ctrlr().state() == CtrlrState::Online);
        if !online {
            self.finish(idx, io, IoStatus::IoError(libc::ENXIO));
            return Submit::Queued;
        }
        io.status = IoStatus::Pending;
        self.inner().slots[idx as usize].io = Some(io);
        let rc = self.issue(idx);
        if rc == 0 {
            return Submit::Queued;
        }
        let s = &mut self.inner().slots[idx as usize];
        s.bounced = false;
        let io = s.io.take().expect("slot holds its I/O");
        if rc == -libc::ENOMEM {
            // SPDK is out of request objects: backpressure, the caller retries after a poll.
            self.inner().free.push(idx);
            self.taken -= 1;
            return Submit::Busy(io);
        }
        if rc == -libc::ENXIO {
            if let Some(q) = self.qpair.as_ref() {
                q.ctrlr().mark_failed("I/O queue pair failed on submit");
            }
        }
        self.finish(idx, io, IoStatus::IoError(-rc));
        Submit::Queued
    }
}

impl BdevChannel for SpdkNvmeChannel {
    fn submit(&mut self, mut io: BdevIo) -> Submit {
        if self.ctrlr.state() == CtrlrState::Online && !self.ready() {
            // The queue pair is connecting (or another is about to be asked for): the I/O
            // waits here for it.
            if self.taken + self.rejected.len() + self.held.len() >= self.depth {
                return Submit::Busy(io);
            }
            if self.held.is_empty() {
                self.held_since = Instant::now();
            }
            self.held.push_back(io);
            return Submit::Queued;
        }
        let entered = self.attach_qpair() && self.qpair.as_ref().is_some_and(|q| q.gate().enter());
        if !entered {
            // No queue pair yet (the controller is failed), or a reset has it (and may be
            // completing aborted commands into this channel's slots): answer without touching
            // them.
            if self.taken + self.rejected.len() + self.held.len() >= self.depth {
                return Submit::Busy(io);
            }
            io.status = IoStatus::IoError(libc::ENXIO);
            self.rejected.push(io);
            return Submit::Queued;
        }
        let r = self.submit_inside(io);
        if let Some(q) = self.qpair.as_ref() {
            q.gate().leave();
        }
        r
    }

    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        let mut n = self.rejected.len();
        for io in self.rejected.drain(..) {
            done(io);
        }
        if !self.held.is_empty()
            && (self.ctrlr.state() != CtrlrState::Online || self.held_since.elapsed() > HELD_LIMIT)
        {
            tracing::warn!(trid = %self.ctrlr.trid(), ios = self.held.len(),
                "spdk_nvme: no connected I/O queue pair for I/O waiting {:?}; failing it",
                self.held_since.elapsed());
            for mut io in self.held.drain(..) {
                io.status = IoStatus::IoError(libc::ENXIO);
                done(io);
                n += 1;
            }
        }
        if !self.attach_qpair() {
            return n;
        }
        let Some(q) = self.qpair.as_ref() else {
            return n;
        };
        if !q.gate().enter() {
            // A reset has the queue pair; what it aborts waits in the slots for the next poll.
            return n;
        }
        let raw = q.raw();
        // SAFETY: inside the gate, on the reactor that owns the queue pair.
        let rc = unsafe { ffi::spdk_nvme_qpair_process_completions(raw, 0) };
        if rc < 0 && !self.connected {
            // SAFETY: as above; a read of the failure reason.
            let why = unsafe { ffi::spdk_nvme_qpair_get_failure_reason(raw) };
            q.gate().leave();
            self.connect_refused(why);
            return n;
        }
        if rc < 0 {
            // SAFETY: as above; a read of the failure reason.
            let why = unsafe { ffi::spdk_nvme_qpair_get_failure_reason(raw) };
            q.ctrlr()
                .mark_failed(&format!("I/O queue pair failed ({why:?})"));
        }
        while let Some(idx) = self.inner().done.pop() {
            let inner = self.inner();
            let s = &mut inner.slots[idx as usize];
            if let Some(mut io) = s.io.take() {
                io.status = s.status;
                s.status = IoStatus::Pending;
                inner.free.push(idx);
                self.taken -= 1;
                done(io);
                n += 1;
            }
        }
        if let Some(q) = self.qpair.as_ref() {
            q.gate().leave();
        }
        // Once connected, what waited goes out, oldest first.
        if !self.held.is_empty() && self.ready() {
            while let Some(io) = self.held.pop_front() {
                match self.submit(io) {
                    Submit::Queued => n += 1,
                    Submit::Busy(io) => {
                        self.held.push_front(io);
                        break;
                    }
                }
            }
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.taken + self.rejected.len() + self.held.len()
    }
}

impl Drop for SpdkNvmeChannel {
    fn drop(&mut self) {
        // Free the queue pair first: aborted commands' callbacks still write into the slots.
        drop(self.qpair.take());
        // SAFETY: `inner` came from Box::leak in open_channel and nothing refers to it any more
        // (the queue pair, the only source of callbacks, is gone).
        drop(unsafe { Box::from_raw(self.inner.as_ptr()) });
    }
}
