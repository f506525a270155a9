//! `nvseal perf`: an NVMe/TCP load generator in the manner of SPDK's `spdk_nvme_perf`.
//!
//! It owns the initiator side of a run: one admin queue pair on the control thread (Identify,
//! Set Features Number of Queues, keep-alive, the shutdown handshake), and N I/O queue pairs
//! ([`HostQpair`]) spread over M reactors. Each reactor runs one [`PhaseJob`] poller per phase
//! that keeps `queue_depth` commands in flight on each of its queues, records every completion's
//! latency in the reactor's own HDR histograms, and resubmits — with every buffer and slot
//! allocated when the queues connect, none per I/O. The control thread connects, starts phases,
//! sends keep-alives, prints progress and merges results; a phase hands its queues back when it
//! ends, so the same connections serve every slice of a run.
//!
//! It exists so nvseal (and any other NVMe/TCP target: SPDK's nvmf_tgt, Linux nvmet) can be
//! measured over the wire with the same workloads and reports as `nvseal bdevperf`, whose job
//! spec, verify pattern, per-side results and table it reuses. Only standard Fabrics/NVMe
//! behaviour is used: Identify for block size, capacity and MDTS; CAP for MQES and the page
//! size; the controller's IOCCSZ and MAXH2CDATA for in-capsule data and H2CData sizes; each I/O
//! queue connects with the admin queue's controller id.
//!
//! `--ab` runs the same workload against two namespaces of one subsystem (typically a plaintext
//! and an encrypted one) in alternating slices, so both see the same machine conditions.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::nvme::identify::ctrl_off;
use crate::nvme::{admin_op, connect, feature, io_op, prop, Sqe, Status};
use crate::nvmf::host::{rw_sqe, Completion, Dir, HostConfig, HostError, HostQpair};
use crate::nvmf::pdu::Digests;
use crate::reactor::{Poller, ReactorOptions, ReactorSet};
use crate::stats::{IoStats, OpClass};
use crate::sys::clock;
use crate::tools::bdevperf::{
    check_pattern, fill_pattern, splitmix, JobResult, JobSpec, Ratios, SideReport, SideResult,
    Until, Workload,
};
use crate::types::CoreId;

/// Why a run did not happen or did not pass. The CLI maps these to exit codes 2, 3 and 1.
#[derive(Debug, thiserror::Error)]
pub enum PerfError {
    /// The options do not fit together or do not fit the controller (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The target could not be reached or refused us (exit code 3).
    #[error("{0}")]
    Connect(String),
    /// The run itself failed: transport errors, a target that stopped answering (exit code 1).
    #[error("{0}")]
    Run(String),
}

/// Where to connect and as whom.
#[derive(Clone, Debug)]
pub struct TargetSpec {
    pub addr: SocketAddr,
    pub subnqn: String,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    /// Digests to ask for (the controller may grant fewer; the report says which were used).
    pub digests: Digests,
    /// Keep alive timeout asked for in the admin Connect (0 = none).
    pub kato_ms: u32,
    /// Bound of each blocking setup step (TCP connect, ICResp, admin commands).
    pub timeout: Duration,
}

/// A namespace's geometry from Identify Namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct NsInfo {
    pub nsid: u32,
    pub block_size: u32,
    pub num_blocks: u64,
}

/// What the controller told us at start-up (reported in the JSON).
#[derive(Clone, Debug, Serialize)]
pub struct ControllerInfo {
    pub cntlid: u16,
    pub model: String,
    pub serial: String,
    pub firmware: String,
    /// Largest transfer (MDTS × minimum page size); `None` = no limit reported.
    pub mdts_bytes: Option<u64>,
    /// Most entries an I/O queue may have (CAP.MQES + 1).
    pub max_queue_entries: u32,
    /// In-capsule data the controller accepts on I/O queues (IOCCSZ × 16 − 64).
    pub in_capsule_bytes: u32,
    /// MAXH2CDATA granted on the first I/O queue.
    pub maxh2cdata: u32,
    pub header_digest: bool,
    pub data_digest: bool,
    pub kato_ms: u32,
    pub io_queues_granted: u16,
}

/// Describes a failed admin/I/O queue Connect in words a user can act on.
fn describe_connect(e: HostError, t: &TargetSpec, qid: u16) -> PerfError {
    let what = if qid == 0 {
        "admin queue".to_string()
    } else {
        format!("I/O queue {qid}")
    };
    let msg = match e {
        HostError::Status { status, .. } if status == Status::CONNECT_INVALID_HOST => format!(
            "{}: host {} is not allowed on subsystem {} (Connect Invalid Host)",
            t.addr, t.hostnqn, t.subnqn
        ),
        HostError::Status { status, dw0 } if status == Status::CONNECT_INVALID_PARAMETERS => {
            let (in_data, ipo) = connect::invalid_param_from_dw0(dw0);
            let field = match (in_data, usize::from(ipo)) {
                (true, o) if o == connect::SUBNQN_OFF => {
                    format!("the target has no subsystem {}", t.subnqn)
                }
                (true, o) if o == connect::HOSTNQN_OFF => {
                    format!("host NQN {} rejected", t.hostnqn)
                }
                (true, o) if o == connect::CNTLID_OFF => "controller id rejected".to_string(),
                (false, o) if o == usize::from(connect::SQE_SQSIZE_OFF) => {
                    "queue size rejected (lower -q)".to_string()
                }
                (false, o) if o == usize::from(connect::SQE_QID_OFF) => {
                    "queue id rejected (fewer queues)".to_string()
                }
                (d, o) => format!(
                    "invalid parameter at {} offset {o}",
                    if d { "data" } else { "command" }
                ),
            };
            format!(
                "{}: {what} Connect refused: {field} (Connect Invalid Parameters)",
                t.addr
            )
        }
        HostError::Status { status, dw0 } => format!(
            "{}: {what} Connect to {} failed with status {status:?} (dw0 {dw0:#x})",
            t.addr, t.subnqn
        ),
        HostError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!(
                "{}: connection refused (is a target listening there?)",
                t.addr
            )
        }
        other => format!("{}: {what}: {other}", t.addr),
    };
    PerfError::Connect(msg)
}

fn le(d: &[u8], off: usize, n: usize) -> Option<u64> {
    d.get(off..off.checked_add(n)?)
        .map(|b| b.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
}

fn text(d: &[u8], off: usize, n: usize) -> String {
    d.get(off..off + n)
        .map(|b| String::from_utf8_lossy(b).trim().to_string())
        .unwrap_or_default()
}

/// How an I/O of `io_size` bytes goes out: (bytes per command, commands per I/O). Over `mdts`
/// the I/O is split, as SPDK's NVMe driver does, into commands of the largest multiple of
/// `block_size` (the largest block size of the namespaces used) that fits.
pub fn split_io(io_size: u32, mdts: Option<u64>, block_size: u32) -> Result<(u32, u32), PerfError> {
    match mdts {
        Some(m) if u64::from(io_size) > m => {
            let bs = u64::from(block_size.max(1));
            let cmd = m / bs * bs;
            if cmd == 0 {
                return Err(PerfError::Usage(format!(
                    "the controller's maximum transfer (MDTS) of {m} bytes is below one \
                     {block_size}-byte block"
                )));
            }
            Ok((cmd as u32, io_size.div_ceil(cmd as u32)))
        }
        _ => Ok((io_size, 1)),
    }
}

/// The largest transfer allowed: `mdts` (Identify byte 77, a power of two of the minimum page
/// size, 0 = unlimited) and CAP.MPSMIN.
pub fn mdts_bytes(mdts: u8, cap: u64) -> Option<u64> {
    if mdts == 0 {
        return None;
    }
    let mpsmin = (cap >> 48) & 0xf;
    let page = 4096u64 << mpsmin;
    Some(page.checked_shl(u32::from(mdts)).unwrap_or(u64::MAX))
}

/// The admin queue and what it learned (control thread only).
pub struct Controller {
    admin: HostQpair,
    target: TargetSpec,
    pub info: ControllerInfo,
    ka_every: Option<Duration>,
    last_ka: Instant,
    /// Bytes per I/O command and commands per I/O of the run (split over MDTS).
    cmd_bytes: u32,
    split: u32,
}

impl Controller {
    /// Connects the admin queue, enables the controller, and reads CAP and Identify Controller.
    pub fn connect(t: &TargetSpec) -> Result<Controller, PerfError> {
        let cfg = HostConfig {
            hostnqn: t.hostnqn.clone(),
            hostid: t.hostid,
            digests: t.digests,
            queue_depth: 32,
            kato_ms: t.kato_ms,
            max_io_size: 4096,
            in_capsule_max: 0,
            disable_sqflow: true,
            timeout: t.timeout,
        };
        let mut admin = HostQpair::connect(t.addr, &t.subnqn, 0, connect::CNTLID_DYNAMIC, cfg)
            .map_err(|e| describe_connect(e, t, 0))?;
        let setup = |e: HostError| PerfError::Connect(format!("{}: controller setup: {e}", t.addr));
        let cap = admin.property_get(prop::CAP, true).map_err(setup)?;
        admin.enable().map_err(setup)?;
        let id = admin.identify_controller().map_err(setup)?;
        let mdts = id.get(ctrl_off::MDTS).copied().unwrap_or(0);
        let ioccsz = le(&id, ctrl_off::IOCCSZ, 4).unwrap_or(0) as u32;
        let info = ControllerInfo {
            cntlid: admin.cntlid(),
            model: text(&id, ctrl_off::MN, 40),
            serial: text(&id, ctrl_off::SN, 20),
            firmware: text(&id, ctrl_off::FR, 8),
            mdts_bytes: mdts_bytes(mdts, cap),
            max_queue_entries: (cap & 0xffff) as u32 + 1,
            in_capsule_bytes: ioccsz.saturating_mul(16).saturating_sub(64),
            maxh2cdata: 0,
            header_digest: admin.digests().header,
            data_digest: admin.digests().data,
            kato_ms: t.kato_ms,
            io_queues_granted: 0,
        };
        let ka_every = (t.kato_ms > 0).then(|| Duration::from_millis(u64::from(t.kato_ms) / 2));
        Ok(Controller {
            admin,
            target: t.clone(),
            info,
            ka_every,
            last_ka: Instant::now(),
            cmd_bytes: 0,
            split: 1,
        })
    }

    /// Identify Namespace `nsid`; an inactive or unknown namespace is an error.
    pub fn namespace(&mut self, nsid: u32) -> Result<NsInfo, PerfError> {
        let (num_blocks, block_size) = match self.admin.namespace_geometry(nsid) {
            Ok(g) => g,
            Err(HostError::Status { status, .. }) => {
                return Err(PerfError::Usage(format!(
                    "namespace {nsid} of {}: Identify failed with {status:?}",
                    self.target.subnqn
                )))
            }
            Err(e) => {
                return Err(PerfError::Connect(format!(
                    "Identify Namespace {nsid}: {e}"
                )))
            }
        };
        if num_blocks == 0 {
            return Err(PerfError::Usage(format!(
                "namespace {nsid} is not active on {}",
                self.target.subnqn
            )));
        }
        Ok(NsInfo {
            nsid,
            block_size,
            num_blocks,
        })
    }

    /// Set Features Number of Queues: asks for `n` I/O queue pairs; errors if fewer are granted.
    pub fn request_io_queues(&mut self, n: u16) -> Result<u16, PerfError> {
        let want = u32::from(n.saturating_sub(1));
        let sqe = Sqe {
            opcode: admin_op::SET_FEATURES,
            cdw10: u32::from(feature::NUMBER_OF_QUEUES),
            cdw11: want | (want << 16),
            ..Default::default()
        };
        let (cqe, _) = self
            .admin
            .admin_cmd(sqe, Dir::None, &[], 0)
            .map_err(|e| PerfError::Connect(format!("Set Features (Number of Queues): {e}")))?;
        let granted = ((cqe.dw0 & 0xffff).min(cqe.dw0 >> 16) + 1).min(u32::from(u16::MAX)) as u16;
        self.info.io_queues_granted = granted;
        if granted < n {
            return Err(PerfError::Usage(format!(
                "the controller grants {granted} I/O queues, {n} asked for (fewer cores or --queues-per-core)"
            )));
        }
        Ok(granted)
    }

    /// Connects I/O queue `qid` with this controller's id.
    pub fn connect_io_queue(
        &mut self,
        qid: u16,
        depth: u16,
        max_io: u32,
    ) -> Result<HostQpair, PerfError> {
        let in_capsule = self.info.in_capsule_bytes.min(max_io);
        let cfg = HostConfig {
            hostnqn: self.target.hostnqn.clone(),
            hostid: self.target.hostid,
            digests: self.target.digests,
            queue_depth: depth,
            kato_ms: 0,
            max_io_size: max_io,
            in_capsule_max: in_capsule,
            disable_sqflow: true,
            timeout: self.target.timeout,
        };
        let q = HostQpair::connect(
            self.target.addr,
            &self.target.subnqn,
            qid,
            self.info.cntlid,
            cfg,
        )
        .map_err(|e| describe_connect(e, &self.target, qid))?;
        if self.info.maxh2cdata == 0 {
            self.info.maxh2cdata = q.maxh2cdata();
        }
        Ok(q)
    }

    /// Sends a Keep Alive when half the KATO has passed since the last one (control thread;
    /// blocking for one round trip).
    pub fn keep_alive_tick(&mut self) -> Result<(), PerfError> {
        let Some(every) = self.ka_every else {
            return Ok(());
        };
        if self.last_ka.elapsed() < every {
            return Ok(());
        }
        self.last_ka = Instant::now();
        let sqe = Sqe {
            opcode: admin_op::KEEP_ALIVE,
            ..Default::default()
        };
        match self.admin.admin_cmd(sqe, Dir::None, &[], 0) {
            Ok(_) => Ok(()),
            Err(HostError::Status { status, .. }) if status == Status::INVALID_OPCODE => {
                // A controller without keep alive: stop asking.
                self.ka_every = None;
                Ok(())
            }
            Err(e) => Err(PerfError::Run(format!("keep alive: {e}"))),
        }
    }

    /// Normal shutdown (CC.SHN, wait for CSTS.SHST complete, bounded) and a clean TCP close.
    pub fn disconnect(mut self) {
        let deadline = Instant::now() + self.target.timeout.min(Duration::from_secs(5));
        if let Ok(cc) = self.admin.property_get(prop::CC, false) {
            let cc = (cc as u32 & !prop::CC_SHN_MASK) | (1 << prop::CC_SHN_SHIFT);
            if self.admin.property_set(prop::CC, cc).is_ok() {
                while Instant::now() < deadline {
                    match self.admin.property_get(prop::CSTS, false) {
                        Ok(c) if c as u32 & prop::CSTS_SHST_MASK == prop::CSTS_SHST_COMPLETE => {
                            break
                        }
                        Ok(_) => std::thread::sleep(Duration::from_millis(1)),
                        Err(_) => break,
                    }
                }
            }
        }
        close_all(&[&self.admin], deadline);
    }
}

/// Half-closes every socket (FIN, not RST: nothing is left unread) and waits, bounded, for the
/// controller to close its side.
fn close_all(qps: &[&HostQpair], deadline: Instant) {
    for q in qps {
        let _ = q.stream().shutdown(Shutdown::Write);
    }
    let mut open: Vec<bool> = vec![true; qps.len()];
    let mut sink = [0u8; 4096];
    while open.iter().any(|&o| o) && Instant::now() < deadline {
        for (q, o) in qps.iter().zip(open.iter_mut()) {
            if !*o {
                continue;
            }
            match (&mut q.stream()).read(&mut sink) {
                Ok(0) => *o = false,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => *o = false,
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ---------------------------------------------------------------------------------------------
// The data path.

/// What a slot's outstanding command is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Read,
    Write,
    VerifyWrite,
    VerifyRead,
}

/// One I/O of the workload (a parent: one command, or several when the I/O size is over the
/// controller's MDTS and the I/O is split, as SPDK's driver does).
#[derive(Clone, Copy)]
struct IoSlot {
    start_ticks: u64,
    lba: u64,
    stage: Stage,
    /// Commands of this I/O still outstanding.
    pending: u32,
    /// One of its commands failed (or read back wrong data); reported once the rest are back.
    failed: bool,
}

/// Per-queue bookkeeping (slots, offsets), reset at the start of each phase.
struct QueueState {
    slots: Vec<IoSlot>,
    free: Vec<u16>,
    /// Verify read-backs waiting for a queue slot.
    ready: VecDeque<u16>,
    in_flight: usize,
    region_start: u64,
    region_ios: u64,
    cursor: u64,
    rng: u64,
    ios_left: Option<u64>,
    /// The queue pair failed; nothing more is submitted on it.
    dead: bool,
}

/// One connected I/O queue pair and its bookkeeping; moves to a reactor for a phase and back.
pub struct IoQueue {
    qp: HostQpair,
    qid: u16,
    /// Index among all queues of the run (0-based), for region placement and seeds.
    index: usize,
    st: QueueState,
}

impl IoQueue {
    fn new(qp: HostQpair, qid: u16, index: usize, depth: usize) -> IoQueue {
        IoQueue {
            qp,
            qid,
            index,
            st: QueueState {
                slots: vec![
                    IoSlot {
                        start_ticks: 0,
                        lba: 0,
                        stage: Stage::Read,
                        pending: 0,
                        failed: false,
                    };
                    depth
                ],
                free: (0..depth as u16).rev().collect(),
                ready: VecDeque::with_capacity(depth),
                in_flight: 0,
                region_start: 0,
                region_ios: 0,
                cursor: 0,
                rng: 1,
                ios_left: None,
                dead: false,
            },
        }
    }

    /// Prepares a phase on namespace `ns`: offsets region, RNG, I/O budget.
    fn reset(
        &mut self,
        ns: &NsInfo,
        spec: &JobSpec,
        until: Until,
        total_queues: usize,
    ) -> Result<(), PerfError> {
        let io_blocks = spec.io_size as u64 / u64::from(ns.block_size);
        let total_ios = ns.num_blocks / io_blocks.max(1);
        let (start, count) = if spec.workload.random() && !spec.verify {
            (0, total_ios)
        } else {
            let per = total_ios / total_queues.max(1) as u64;
            (per * self.index as u64, per)
        };
        if count < spec.queue_depth as u64 {
            return Err(PerfError::Usage(format!(
                "namespace {} is too small: {count} I/Os of {} bytes per queue for a queue depth of {}",
                ns.nsid, spec.io_size, spec.queue_depth
            )));
        }
        let st = &mut self.st;
        st.region_start = start * io_blocks;
        st.region_ios = count;
        st.cursor = 0;
        st.rng = splitmix(spec.seed ^ ((self.index as u64 + 1) << 32) ^ u64::from(ns.nsid)) | 1;
        st.ios_left = match until {
            Until::Count(n) => Some(n),
            Until::Time(_) => None,
        };
        st.ready.clear();
        Ok(())
    }
}

/// Read-only parameters of a phase.
#[derive(Clone)]
struct PhaseCtx {
    spec: JobSpec,
    ns: NsInfo,
    io_blocks: u32,
    /// Blocks per command: `io_blocks`, or the MDTS-sized piece of a split I/O.
    cmd_blocks: u32,
    /// Commands per I/O (1 unless the I/O size is over MDTS).
    split: u32,
    /// Every Write carries Force Unit Access (CDW12 bit 30).
    fua: bool,
}

impl PhaseCtx {
    fn new(spec: &JobSpec, ns: &NsInfo, cmd_bytes: u32, fua: bool) -> PhaseCtx {
        let bs = u64::from(ns.block_size.max(1));
        let io_blocks = (spec.io_size as u64 / bs) as u32;
        let cmd_blocks = ((u64::from(cmd_bytes) / bs) as u32).clamp(1, io_blocks.max(1));
        PhaseCtx {
            spec: spec.clone(),
            ns: *ns,
            io_blocks,
            cmd_blocks,
            split: io_blocks.div_ceil(cmd_blocks).max(1),
            fua,
        }
    }

    /// First block and block count of command `child` of the I/O at `lba`.
    fn piece(&self, lba: u64, child: u32) -> (u64, u32) {
        let off = child * self.cmd_blocks;
        (
            lba + u64::from(off),
            self.cmd_blocks.min(self.io_blocks - off),
        )
    }
}

/// Results and counters shared by a job's queues.
struct Shared {
    stats: IoStats,
    io_errors: u64,
    verify_mismatches: u64,
    first_error: Option<String>,
    progress: Arc<AtomicU64>,
}

impl Shared {
    fn note_error(&mut self, what: impl FnOnce() -> String) {
        if self.first_error.is_none() {
            self.first_error = Some(what());
        }
    }
}

impl QueueState {
    fn next_rand(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Handles one completion (inside `HostQpair::poll`). The command tag is
    /// `slot * split + child`; the I/O completes (and is timed) when its last command is back.
    fn complete(&mut self, c: Completion<'_>, ctx: &PhaseCtx, sh: &mut Shared, now: u64) {
        let split = u64::from(ctx.split);
        let Some(tag) = usize::try_from(c.tag / split)
            .ok()
            .filter(|&t| t < self.slots.len() && self.slots[t].pending > 0)
        else {
            sh.io_errors += 1;
            sh.note_error(|| format!("completion with an unknown tag {}", c.tag));
            return;
        };
        let child = (c.tag % split) as u32;
        let status = c.cqe.status();
        let slot = &mut self.slots[tag];
        slot.pending -= 1;
        let (lba, nlb) = ctx.piece(slot.lba, child);
        if !status.is_success() {
            if !slot.failed {
                sh.io_errors += 1;
            }
            slot.failed = true;
            let nsid = ctx.ns.nsid;
            let op = match slot.stage {
                Stage::Read | Stage::VerifyRead => "Read",
                Stage::Write | Stage::VerifyWrite => "Write",
            };
            sh.note_error(|| format!("{op} of nsid {nsid} LBA {lba} failed: {status:?}"));
        } else if slot.stage == Stage::VerifyRead {
            let bs = ctx.ns.block_size as usize;
            if c.data.len() != nlb as usize * bs || !check_pattern(c.data, lba, bs, ctx.spec.seed) {
                if !slot.failed {
                    sh.verify_mismatches += 1;
                }
                slot.failed = true;
                let nsid = ctx.ns.nsid;
                sh.note_error(|| {
                    format!("verify: data read back from nsid {nsid} LBA {lba} differs from what was written")
                });
            }
        }
        if slot.pending > 0 {
            return;
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        let slot = *slot;
        let ok = !slot.failed;
        let op = match slot.stage {
            Stage::Read | Stage::VerifyRead => OpClass::Read,
            Stage::Write | Stage::VerifyWrite => OpClass::Write,
        };
        let bytes = if ok { ctx.spec.io_size as u64 } else { 0 };
        sh.stats.record(
            op,
            bytes,
            clock::ticks_to_ns(now.wrapping_sub(slot.start_ticks)),
            ok,
        );
        sh.progress
            .store(sh.progress.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        let tag16 = tag as u16;
        if ok && slot.stage == Stage::VerifyWrite {
            self.slots[tag].stage = Stage::VerifyRead;
            self.ready.push_back(tag16);
        } else {
            self.free.push(tag16);
        }
    }

    /// Every command of a failed queue pair is lost: count them as errors.
    fn fail(&mut self, sh: &mut Shared, qid: u16, e: &HostError) {
        sh.io_errors += (self.in_flight + self.ready.len()) as u64;
        sh.io_errors += 1;
        sh.note_error(|| format!("I/O queue {qid}: {e}"));
        self.in_flight = 0;
        self.ready.clear();
        self.dead = true;
    }

    /// Picks the next I/O's LBA and kind.
    fn next_io(&mut self, ctx: &PhaseCtx) -> (u64, Stage) {
        let index = if ctx.spec.workload.random() && !ctx.spec.verify {
            self.next_rand() % self.region_ios.max(1)
        } else {
            let i = self.cursor;
            self.cursor = (self.cursor + 1) % self.region_ios.max(1);
            i
        };
        let lba = self.region_start + index * u64::from(ctx.io_blocks);
        let stage = if ctx.spec.verify {
            Stage::VerifyWrite
        } else {
            let read = match ctx.spec.workload {
                Workload::Read | Workload::Randread => true,
                Workload::Write | Workload::Randwrite => false,
                Workload::Randrw => (self.next_rand() % 100) < u64::from(ctx.spec.rwmixread),
            };
            if read {
                Stage::Read
            } else {
                Stage::Write
            }
        };
        (lba, stage)
    }
}

/// Submits the command(s) of slot `tag` (already filled in); returns how many went out. `Busy`
/// only when the first one finds no free queue entry: queue pairs are connected with
/// `depth × split` entries, so the rest of an I/O always fits.
fn submit_slot(
    qp: &mut HostQpair,
    ctx: &PhaseCtx,
    slot: IoSlot,
    tag: u16,
) -> Result<u32, HostError> {
    let ns = &ctx.ns;
    let (bs, seed) = (ns.block_size as usize, ctx.spec.seed);
    let write_sqe = |lba, nlb| {
        let mut sqe = rw_sqe(io_op::WRITE, ns.nsid, lba, nlb);
        if ctx.fua {
            sqe.cdw12 |= crate::nvme::CDW12_FUA;
        }
        sqe
    };
    for child in 0..ctx.split {
        let (lba, nlb) = ctx.piece(slot.lba, child);
        let ctag = u64::from(tag) * u64::from(ctx.split) + u64::from(child);
        let len = nlb * ns.block_size;
        let r = match slot.stage {
            Stage::Read | Stage::VerifyRead => qp.read(ns.nsid, lba, nlb, ns.block_size, ctag),
            // Plain writes send whatever the slot buffer holds: content does not matter.
            Stage::Write => qp.submit(write_sqe(lba, nlb), Dir::ToCtrl, len, |_| {}, ctag),
            Stage::VerifyWrite => qp.submit(
                write_sqe(lba, nlb),
                Dir::ToCtrl,
                len,
                |b| fill_pattern(b, lba, bs, seed),
                ctag,
            ),
        };
        match r {
            Ok(_) => {}
            Err(HostError::Busy) if child > 0 => {
                return Err(HostError::Internal(
                    "queue pair full in the middle of a split I/O",
                ))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(ctx.split)
}

/// What a phase job hands back: its results and the queues it borrowed.
pub struct PhaseOutput {
    pub result: JobResult,
    reactor: usize,
    queues: Vec<IoQueue>,
}

/// One reactor's load generator for one phase (one side, one slice).
pub struct PhaseJob {
    name: String,
    reactor: usize,
    queues: Vec<IoQueue>,
    ctx: PhaseCtx,
    sh: Shared,
    until: Until,
    start_ticks: u64,
    stop_ticks: u64,
    started: bool,
    draining: bool,
    result_tx: Option<Sender<PhaseOutput>>,
}

impl PhaseJob {
    fn finish(&mut self, now: u64) {
        if let Some(tx) = self.result_tx.take() {
            let result = JobResult {
                stats: std::mem::take(&mut self.sh.stats),
                elapsed_ns: clock::ticks_to_ns(now.wrapping_sub(self.start_ticks)),
                verify_mismatches: self.sh.verify_mismatches,
                plaintext_leaks: 0,
                io_errors: self.sh.io_errors,
                first_error: self.sh.first_error.take(),
            };
            let _ = tx.try_send(PhaseOutput {
                result,
                reactor: self.reactor,
                queues: std::mem::take(&mut self.queues),
            });
        }
    }
}

impl Poller for PhaseJob {
    fn name(&self) -> &str {
        &self.name
    }

    fn poll(&mut self) -> usize {
        if self.result_tx.is_none() {
            return 0;
        }
        let mut now = clock::ticks();
        if !self.started {
            self.started = true;
            self.start_ticks = now;
            if let Until::Time(d) = self.until {
                self.stop_ticks = now + clock::ns_to_ticks(d.as_nanos() as u64);
            }
        }
        if !self.draining && now >= self.stop_ticks {
            self.draining = true;
        }
        let ctx = &self.ctx;
        let sh = &mut self.sh;
        let mut work = 0;
        let mut budget_left = false;
        for q in self.queues.iter_mut() {
            let IoQueue { qp, qid, st, .. } = q;
            if st.dead {
                continue;
            }
            match qp.poll(&mut |c| st.complete(c, ctx, sh, now)) {
                Ok(n) => {
                    if n > 0 {
                        work += n;
                        now = clock::ticks();
                    }
                }
                Err(e) => {
                    st.fail(sh, *qid, &e);
                    continue;
                }
            }
            // Verify read-backs first (they own a slot already), then new I/O.
            while let Some(&tag) = st.ready.front() {
                let i = usize::from(tag);
                st.slots[i].start_ticks = now;
                match submit_slot(qp, ctx, st.slots[i], tag) {
                    Ok(n) => {
                        st.ready.pop_front();
                        st.slots[i].pending = n;
                        st.in_flight += 1;
                        work += 1;
                    }
                    Err(HostError::Busy) => break,
                    Err(e) => {
                        st.fail(sh, *qid, &e);
                        break;
                    }
                }
            }
            if !self.draining && !st.dead {
                while let Some(&tag) = st.free.last() {
                    if st.ios_left == Some(0) {
                        break;
                    }
                    let (lba, stage) = st.next_io(ctx);
                    let mut slot = IoSlot {
                        start_ticks: now,
                        lba,
                        stage,
                        pending: 0,
                        failed: false,
                    };
                    match submit_slot(qp, ctx, slot, tag) {
                        Ok(n) => {
                            st.free.pop();
                            slot.pending = n;
                            st.slots[usize::from(tag)] = slot;
                            st.in_flight += 1;
                            if let Some(n) = st.ios_left.as_mut() {
                                *n -= 1;
                            }
                            work += 1;
                        }
                        Err(HostError::Busy) => break,
                        Err(e) => {
                            st.fail(sh, *qid, &e);
                            break;
                        }
                    }
                }
            }
            if !st.dead && st.ios_left != Some(0) {
                budget_left = true;
            }
        }
        if !budget_left {
            self.draining = true;
        }
        if self.draining
            && self
                .queues
                .iter()
                .all(|q| q.st.dead || (q.st.in_flight == 0 && q.st.ready.is_empty()))
        {
            self.finish(now);
        }
        work
    }

    fn in_flight(&self) -> usize {
        self.queues
            .iter()
            .map(|q| q.st.in_flight + q.st.ready.len())
            .sum()
    }

    fn drain(&mut self) {
        self.draining = true;
    }

    fn is_done(&self) -> bool {
        self.result_tx.is_none()
    }
}

// ---------------------------------------------------------------------------------------------
// The control side.

/// A whole run's parameters.
#[derive(Clone, Debug)]
pub struct PerfConfig {
    pub target: TargetSpec,
    /// Reactor cores (one reactor each).
    pub cores: Vec<CoreId>,
    pub queues_per_core: usize,
    /// Workload, I/O size, queue depth per queue, verify, seed.
    pub spec: JobSpec,
    /// Run time per side (ignored with `io_count`).
    pub time: Duration,
    /// I/Os per queue instead of a time limit.
    pub io_count: Option<u64>,
    /// One namespace, or two for an A/B run (`a`, `b`).
    pub nsids: Vec<u32>,
    /// A/B slice length.
    pub slice: Duration,
    pub reactor: ReactorOptions,
    /// The target's nvseal control socket, when it is an nvseal on this machine: its reactors'
    /// busy time is read (`stats.reactors`) at the start and end of every phase.
    pub target_rpc: Option<std::path::PathBuf>,
    /// Set Force Unit Access on every Write: each is acknowledged only from stable storage.
    pub fua: bool,
}

/// Reads the busy and total time of an nvseal target's reactors over its control socket.
/// A failure is reported once on stderr and turns the probe off: the run goes on without it.
struct TargetProbe {
    socket: Option<std::path::PathBuf>,
}

impl TargetProbe {
    /// (busy ns, busy + idle ns) summed over the target's reactors.
    fn sample(&mut self) -> Option<(u64, u64)> {
        let path = self.socket.as_ref()?;
        let r = crate::rpc::client::call(path, "stats.reactors", None)
            .map_err(|e| e.to_string())
            .and_then(|v| parse_reactor_times(&v));
        match r {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!(
                    "nvseal perf: warning: target busy time from {}: {e}; not reported",
                    path.display()
                );
                self.socket = None;
                None
            }
        }
    }
}

/// Sums `busy_ns` and `idle_ns` over the reactors of a `stats.reactors` result.
fn parse_reactor_times(v: &serde_json::Value) -> Result<(u64, u64), String> {
    let list = v
        .get("reactors")
        .and_then(serde_json::Value::as_array)
        .ok_or("no \"reactors\" array in the answer")?;
    let (mut busy, mut total) = (0u64, 0u64);
    for r in list {
        let get = |k: &str| {
            r.get(k)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| format!("a reactor without \"{k}\" (not an nvseal target?)"))
        };
        let (b, i) = (get("busy_ns")?, get("idle_ns")?);
        busy = busy.saturating_add(b);
        total = total.saturating_add(b.saturating_add(i));
    }
    Ok((busy, total))
}

/// Progress as the control thread sees it (about once per 100 ms).
pub struct Progress<'a> {
    pub side: &'a str,
    pub slice: usize,
    pub slices: usize,
    /// Seconds this side has run so far (all slices).
    pub side_secs: f64,
    /// I/Os this side has completed so far.
    pub side_ios: u64,
    /// Rate of the current slice so far.
    pub iops_now: f64,
}

/// Everything a run produced.
pub struct PerfOutcome {
    pub sides: Vec<SideResult>,
    pub namespaces: Vec<NsInfo>,
    pub controller: ControllerInfo,
    /// NVMe commands per I/O: 1, or more when the I/O size is over MDTS and I/Os are split.
    pub commands_per_io: u32,
    pub queues: usize,
    pub cores: Vec<CoreId>,
    /// Wall time of the whole run, setup and teardown included.
    pub wall_s: f64,
}

impl PerfOutcome {
    /// I/O errors and verify mismatches over all sides.
    pub fn failures(&self) -> u64 {
        self.sides
            .iter()
            .map(|s| s.io_errors + s.verify_mismatches)
            .sum()
    }
}

/// Side labels: `a`/`b` in A/B runs, `nsN` for a single namespace.
pub fn side_label(cfg: &PerfConfig, i: usize) -> String {
    if cfg.nsids.len() > 1 {
        ["a", "b"]
            .get(i)
            .map_or(format!("side{i}"), |s| s.to_string())
    } else {
        format!("ns{}", cfg.nsids.get(i).copied().unwrap_or(0))
    }
}

/// Connects, runs every phase, disconnects. Blocking; call from a control thread.
pub fn run(
    cfg: &PerfConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<PerfOutcome, PerfError> {
    let t_start = Instant::now();
    let spec = &cfg.spec;
    if cfg.cores.is_empty() || cfg.queues_per_core == 0 {
        return Err(PerfError::Usage(
            "need at least one core and one queue per core".into(),
        ));
    }
    if cfg.nsids.is_empty() || cfg.nsids.len() > 2 {
        return Err(PerfError::Usage("one namespace, or two with --ab".into()));
    }
    if spec.queue_depth == 0 || spec.io_size == 0 {
        return Err(PerfError::Usage(
            "queue depth and I/O size must be positive".into(),
        ));
    }
    let total_queues = cfg.cores.len() * cfg.queues_per_core;
    let nq = u16::try_from(total_queues)
        .ok()
        .filter(|&n| n < u16::MAX)
        .ok_or_else(|| PerfError::Usage(format!("{total_queues} queues are too many")))?;
    let io_size = u32::try_from(spec.io_size)
        .map_err(|_| PerfError::Usage(format!("I/O size {} is too large", spec.io_size)))?;

    let mut ctl = Controller::connect(&cfg.target)?;
    let result = run_connected(cfg, &mut ctl, total_queues, nq, io_size, progress, t_start);
    match result {
        Ok((mut out, queues)) => {
            let deadline = Instant::now() + Duration::from_secs(2);
            let qps: Vec<&HostQpair> = queues.iter().flatten().map(|q| &q.qp).collect();
            close_all(&qps, deadline);
            drop(queues);
            out.controller = ctl.info.clone();
            ctl.disconnect();
            out.wall_s = t_start.elapsed().as_secs_f64();
            Ok(out)
        }
        Err(e) => {
            ctl.disconnect();
            Err(e)
        }
    }
}

fn run_connected(
    cfg: &PerfConfig,
    ctl: &mut Controller,
    total_queues: usize,
    nq: u16,
    io_size: u32,
    progress: &mut dyn FnMut(&Progress),
    t_start: Instant,
) -> Result<(PerfOutcome, Vec<Vec<IoQueue>>), PerfError> {
    let spec = &cfg.spec;
    let mut namespaces = Vec::new();
    for &nsid in &cfg.nsids {
        let ns = ctl.namespace(nsid)?;
        if !(spec.io_size as u64).is_multiple_of(u64::from(ns.block_size)) {
            return Err(PerfError::Usage(format!(
                "I/O size {io_size} is not a multiple of namespace {nsid}'s block size {}",
                ns.block_size
            )));
        }
        namespaces.push(ns);
    }
    let max_bs = namespaces.iter().map(|n| n.block_size).max().unwrap_or(512);
    let (cmd_bytes, split) = split_io(io_size, ctl.info.mdts_bytes, max_bs)?;
    let entries = spec.queue_depth.saturating_mul(split as usize);
    let depth = u16::try_from(entries)
        .ok()
        .filter(|&d| u32::from(d) <= ctl.info.max_queue_entries)
        .ok_or_else(|| {
            PerfError::Usage(if split > 1 {
                format!(
                    "queue depth {} x {split} commands per I/O ({io_size}-byte I/Os split at \
                     the controller's MDTS into {cmd_bytes}-byte commands) is over its maximum \
                     of {} entries (CAP.MQES): lower -q or -o",
                    spec.queue_depth, ctl.info.max_queue_entries
                )
            } else {
                format!(
                    "queue depth {} is over the controller's maximum of {} entries (CAP.MQES)",
                    spec.queue_depth, ctl.info.max_queue_entries
                )
            })
        })?;
    ctl.cmd_bytes = cmd_bytes;
    ctl.split = split;
    ctl.request_io_queues(nq)?;
    // Connect every I/O queue (qid 1..=N), queue i on reactor i / queues_per_core.
    let mut per_reactor: Vec<Vec<IoQueue>> = (0..cfg.cores.len()).map(|_| Vec::new()).collect();
    for i in 0..total_queues {
        let qid = i as u16 + 1;
        let qp = ctl.connect_io_queue(qid, depth, cmd_bytes)?;
        per_reactor[i / cfg.queues_per_core].push(IoQueue::new(qp, qid, i, spec.queue_depth));
        // Many queues to a slow target can take a while: keep the controller alive meanwhile.
        ctl.keep_alive_tick()?;
    }
    // Reject digests we asked for and did not get? Report them instead: targets may refuse.
    if let Some(q) = per_reactor.first().and_then(|v| v.first()) {
        ctl.info.header_digest = q.qp.digests().header;
        ctl.info.data_digest = q.qp.digests().data;
    }

    let set = ReactorSet::start(&cfg.cores, &cfg.reactor)
        .map_err(|e| PerfError::Connect(format!("reactors: {e}")))?;
    let mut sides: Vec<SideResult> = namespaces
        .iter()
        .enumerate()
        .map(|(i, ns)| SideResult::new(&side_label(cfg, i), &format!("nsid {}", ns.nsid)))
        .collect();
    let slices: Vec<Until> = match cfg.io_count {
        Some(n) => vec![Until::Count(n)],
        None if namespaces.len() > 1 && !cfg.slice.is_zero() => {
            let mut v = Vec::new();
            let mut left = cfg.time;
            while !left.is_zero() {
                let s = left.min(cfg.slice);
                v.push(Until::Time(s));
                left -= s;
            }
            v
        }
        None => vec![Until::Time(cfg.time)],
    };
    let nslices = slices.len();
    let mut probe = TargetProbe {
        socket: cfg.target_rpc.clone(),
    };
    let mut failure = None;
    'outer: for (k, until) in slices.iter().enumerate() {
        for (ns, side) in namespaces.iter().zip(sides.iter_mut()) {
            let label = side.label.clone();
            let ios_before = side.stats.total_ios();
            let secs_before = side.elapsed_s;
            let r = run_phase(
                &set,
                ctl,
                &mut per_reactor,
                &mut probe,
                ns,
                spec,
                cfg.fua,
                *until,
                total_queues,
                side,
                &mut |ios, secs| {
                    progress(&Progress {
                        side: &label,
                        slice: k + 1,
                        slices: nslices,
                        side_secs: secs_before + secs,
                        side_ios: ios_before + ios,
                        iops_now: ios as f64 / secs.max(1e-9),
                    })
                },
            );
            if let Err(e) = r.and_then(|_| ctl.keep_alive_tick()) {
                failure = Some(e);
                break 'outer;
            }
            // A dead queue pair cannot serve the next slice.
            if per_reactor.iter().flatten().any(|q| q.st.dead) {
                break 'outer;
            }
        }
    }
    set.shutdown();
    if let Some(e) = failure {
        return Err(e);
    }
    let outcome = PerfOutcome {
        sides,
        namespaces,
        controller: ctl.info.clone(),
        commands_per_io: ctl.split,
        queues: total_queues,
        cores: cfg.cores.clone(),
        wall_s: t_start.elapsed().as_secs_f64(),
    };
    Ok((outcome, per_reactor))
}

/// Runs one phase on every reactor and merges the results into `into`.
#[allow(clippy::too_many_arguments)]
fn run_phase(
    set: &ReactorSet,
    ctl: &mut Controller,
    per_reactor: &mut [Vec<IoQueue>],
    probe: &mut TargetProbe,
    ns: &NsInfo,
    spec: &JobSpec,
    fua: bool,
    until: Until,
    total_queues: usize,
    into: &mut SideResult,
    progress: &mut dyn FnMut(u64, f64),
) -> Result<(), PerfError> {
    for q in per_reactor.iter_mut().flatten() {
        q.reset(ns, spec, until, total_queues)?;
    }
    let ctx = PhaseCtx::new(spec, ns, ctl.cmd_bytes, fua);
    let n = per_reactor.len();
    let (tx, rx): (Sender<PhaseOutput>, Receiver<PhaseOutput>) = bounded(n);
    let counters: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let target_before = probe.sample();
    let before = set.snapshots();
    for (i, queues) in per_reactor.iter_mut().enumerate() {
        let job = PhaseJob {
            name: format!("perf-{}-{i}", into.label),
            reactor: i,
            queues: std::mem::take(queues),
            ctx: ctx.clone(),
            sh: Shared {
                stats: IoStats::new(),
                io_errors: 0,
                verify_mismatches: 0,
                first_error: None,
                progress: counters[i].clone(),
            },
            until,
            start_ticks: 0,
            stop_ticks: u64::MAX,
            started: false,
            draining: false,
            result_tx: Some(tx.clone()),
        };
        set.call(i, move |r| {
            r.add_poller(Box::new(job));
        })
        .map_err(|e| PerfError::Run(e.to_string()))?;
    }
    drop(tx);
    let t0 = Instant::now();
    let deadline = match until {
        Until::Time(d) => Some(t0 + d + Duration::from_secs(30)),
        Until::Count(_) => None,
    };
    let mut got = 0;
    let mut max_elapsed_ns = 0u64;
    let mut last_progress = Instant::now();
    while got < n {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(out) => {
                got += 1;
                let res = out.result;
                max_elapsed_ns = max_elapsed_ns.max(res.elapsed_ns);
                into.stats.merge(&res.stats);
                into.verify_mismatches += res.verify_mismatches;
                into.io_errors += res.io_errors;
                if into.first_error.is_none() {
                    into.first_error = res.first_error;
                }
                if let Some(slot) = per_reactor.get_mut(out.reactor) {
                    *slot = out.queues;
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                ctl.keep_alive_tick()?;
                if last_progress.elapsed() >= Duration::from_millis(500) {
                    last_progress = Instant::now();
                    let done: u64 = counters.iter().map(|c| c.load(Ordering::Relaxed)).sum();
                    progress(done, t0.elapsed().as_secs_f64());
                }
                if deadline.is_some_and(|d| Instant::now() > d) {
                    return Err(PerfError::Run(
                        "I/O did not finish within 30 s of the time limit (target not answering?)"
                            .into(),
                    ));
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(PerfError::Run(
                    "a reactor stopped before its job finished".into(),
                ));
            }
        }
    }
    let after = set.snapshots();
    for (b, a) in before.iter().zip(after.iter()) {
        into.busy_ticks += a.0.saturating_sub(b.0);
        into.total_ticks += a.0.saturating_sub(b.0) + a.1.saturating_sub(b.1);
    }
    if let (Some(b), Some(a)) = (target_before, probe.sample()) {
        into.target_busy_ns += a.0.saturating_sub(b.0);
        into.target_total_ns += a.1.saturating_sub(b.1);
    }
    into.elapsed_s += max_elapsed_ns as f64 / 1e9;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Reports.

/// fio's default completion-latency percentiles.
pub const FIO_PERCENTILES: [f64; 17] = [
    1.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95,
    99.99,
];

/// fio's latency block (`clat_ns`): nanoseconds; percentiles keyed like fio (`"99.000000"`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FioLat {
    pub min: u64,
    pub max: u64,
    pub mean: f64,
    pub stddev: f64,
    #[serde(rename = "N")]
    pub n: u64,
    pub percentile: BTreeMap<String, u64>,
}

impl FioLat {
    pub fn from_histogram(h: &Histogram<u64>) -> FioLat {
        if h.is_empty() {
            return FioLat::default();
        }
        FioLat {
            min: h.min(),
            max: h.max(),
            mean: h.mean(),
            stddev: h.stdev(),
            n: h.len(),
            percentile: FIO_PERCENTILES
                .iter()
                .map(|&p| (format!("{p:.6}"), h.value_at_percentile(p)))
                .collect(),
        }
    }
}

/// fio's per-direction block (`read`, `write`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FioOp {
    pub io_bytes: u64,
    pub io_kbytes: u64,
    /// Bytes per second.
    pub bw_bytes: u64,
    /// KiB per second.
    pub bw: u64,
    pub iops: f64,
    /// Milliseconds.
    pub runtime: u64,
    pub total_ios: u64,
    /// Submit-to-completion latency as seen by the poller (fio's `clat_ns` for async engines).
    pub clat_ns: FioLat,
}

impl FioOp {
    fn new(stats: &IoStats, op: OpClass, elapsed_s: f64) -> FioOp {
        let s = stats.op(op);
        let e = if elapsed_s > 0.0 {
            elapsed_s
        } else {
            f64::INFINITY
        };
        let bw_bytes = (s.bytes as f64 / e) as u64;
        FioOp {
            io_bytes: s.bytes,
            io_kbytes: s.bytes / 1024,
            bw_bytes,
            bw: bw_bytes / 1024,
            iops: s.ios as f64 / e,
            runtime: (elapsed_s * 1000.0) as u64,
            total_ios: s.ios,
            clat_ns: FioLat::from_histogram(&s.latency_ns),
        }
    }
}

/// One side of the run, shaped like an entry of fio's `jobs[]`.
#[derive(Clone, Debug, Serialize)]
pub struct FioJob {
    pub jobname: String,
    pub nsid: u32,
    pub block_size: u32,
    pub num_blocks: u64,
    /// Milliseconds this side ran (sum over its slices).
    pub job_runtime: u64,
    pub read: FioOp,
    pub write: FioOp,
    /// Reads and writes together (nvseal's addition), with the same fields.
    pub total: FioOp,
    /// Busy share of the perf reactors while this side ran.
    pub reactor_busy_pct: f64,
    pub cpu_us_per_io: f64,
    /// Busy share of the target's reactors while this side ran (`--target-rpc` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_busy_pct: Option<f64>,
    /// Target reactor time per I/O in µs (`--target-rpc` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_cpu_us_per_io: Option<f64>,
    pub io_errors: u64,
    pub verify_mismatches: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// b / a for an A/B run.
#[derive(Clone, Debug, Serialize)]
pub struct AbRatios {
    pub iops: f64,
    pub bw_bytes: f64,
    pub clat_p50: f64,
    pub clat_p99: f64,
    pub clat_p99_9: f64,
    pub cpu_us_per_io: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_cpu_us_per_io: Option<f64>,
}

/// The run's options as fio names them where it has a name for them.
#[derive(Clone, Debug, Serialize)]
pub struct GlobalOptions {
    pub traddr: String,
    pub subnqn: String,
    pub hostnqn: String,
    pub rw: Workload,
    pub rwmixread: u8,
    pub bs: usize,
    pub iodepth: usize,
    /// Number of I/O queue pairs.
    pub numjobs: usize,
    pub cores: String,
    pub queues_per_core: usize,
    /// Seconds per side (0 with `number_ios`).
    pub runtime: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number_ios: Option<u64>,
    pub verify: bool,
    /// Every Write carried Force Unit Access.
    pub fua: bool,
    pub hdgst: bool,
    pub ddgst: bool,
    /// NVMe commands per I/O (I/Os over the controller's MDTS are split; latency and IOPS count
    /// whole I/Os, as spdk_nvme_perf does).
    pub commands_per_io: u32,
}

/// The JSON report.
#[derive(Clone, Debug, Serialize)]
pub struct PerfReport {
    pub tool: &'static str,
    pub version: &'static str,
    pub global_options: GlobalOptions,
    pub controller: ControllerInfo,
    pub jobs: Vec<FioJob>,
    /// Present in A/B runs: side b over side a.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_b_over_a: Option<AbRatios>,
    pub wall_s: f64,
}

/// The table's view of a side (shared with bdevperf's table).
pub fn side_report(s: &SideResult) -> SideReport {
    SideReport::from_side(s)
}

/// Builds the JSON report of a run.
pub fn report(cfg: &PerfConfig, o: &PerfOutcome) -> PerfReport {
    let jobs: Vec<FioJob> = o
        .sides
        .iter()
        .zip(o.namespaces.iter())
        .map(|(s, ns)| {
            let total = {
                let d = s.stats.data_summary(s.elapsed_s);
                let h = s.stats.data_latency();
                let e = if s.elapsed_s > 0.0 {
                    s.elapsed_s
                } else {
                    f64::INFINITY
                };
                let bw_bytes = (d.bytes as f64 / e) as u64;
                FioOp {
                    io_bytes: d.bytes,
                    io_kbytes: d.bytes / 1024,
                    bw_bytes,
                    bw: bw_bytes / 1024,
                    iops: d.iops,
                    runtime: (s.elapsed_s * 1000.0) as u64,
                    total_ios: d.ios,
                    clat_ns: FioLat::from_histogram(&h),
                }
            };
            FioJob {
                jobname: s.label.clone(),
                nsid: ns.nsid,
                block_size: ns.block_size,
                num_blocks: ns.num_blocks,
                job_runtime: (s.elapsed_s * 1000.0) as u64,
                read: FioOp::new(&s.stats, OpClass::Read, s.elapsed_s),
                write: FioOp::new(&s.stats, OpClass::Write, s.elapsed_s),
                total,
                reactor_busy_pct: s.busy_pct(),
                cpu_us_per_io: s.cpu_us_per_io(),
                target_busy_pct: s.target_busy_pct(),
                target_cpu_us_per_io: s.target_cpu_us_per_io(),
                io_errors: s.io_errors,
                verify_mismatches: s.verify_mismatches,
                first_error: s.first_error.clone(),
            }
        })
        .collect();
    let ratio_b_over_a = match (jobs.first(), jobs.get(1)) {
        (Some(a), Some(b)) => {
            let r = |x: f64, y: f64| if y == 0.0 { 0.0 } else { x / y };
            let p = |j: &FioJob, k: &str| {
                j.total.clat_ns.percentile.get(k).copied().unwrap_or(0) as f64
            };
            Some(AbRatios {
                iops: r(b.total.iops, a.total.iops),
                bw_bytes: r(b.total.bw_bytes as f64, a.total.bw_bytes as f64),
                clat_p50: r(p(b, "50.000000"), p(a, "50.000000")),
                clat_p99: r(p(b, "99.000000"), p(a, "99.000000")),
                clat_p99_9: r(p(b, "99.900000"), p(a, "99.900000")),
                cpu_us_per_io: r(b.cpu_us_per_io, a.cpu_us_per_io),
                target_cpu_us_per_io: match (a.target_cpu_us_per_io, b.target_cpu_us_per_io) {
                    (Some(x), Some(y)) => Some(r(y, x)),
                    _ => None,
                },
            })
        }
        _ => None,
    };
    PerfReport {
        tool: "nvseal perf",
        version: env!("CARGO_PKG_VERSION"),
        global_options: GlobalOptions {
            traddr: cfg.target.addr.to_string(),
            subnqn: cfg.target.subnqn.clone(),
            hostnqn: cfg.target.hostnqn.clone(),
            rw: cfg.spec.workload,
            rwmixread: cfg.spec.rwmixread,
            bs: cfg.spec.io_size,
            iodepth: cfg.spec.queue_depth,
            numjobs: o.queues,
            cores: crate::reactor::placement::format_cpu_list(&o.cores),
            queues_per_core: cfg.queues_per_core,
            runtime: if cfg.io_count.is_some() {
                0.0
            } else {
                cfg.time.as_secs_f64()
            },
            number_ios: cfg.io_count,
            verify: cfg.spec.verify,
            fua: cfg.fua,
            hdgst: o.controller.header_digest,
            ddgst: o.controller.data_digest,
            commands_per_io: o.commands_per_io,
        },
        controller: o.controller.clone(),
        jobs,
        ratio_b_over_a,
        wall_s: o.wall_s,
    }
}

/// Prints the side-by-side table (bdevperf's layout; ratio column b/a in A/B runs).
pub fn print_text(out: &mut dyn std::io::Write, o: &PerfOutcome) {
    let sides: Vec<SideReport> = o.sides.iter().map(side_report).collect();
    let ratios = match (sides.first(), sides.get(1)) {
        (Some(a), Some(b)) => Some(Ratios::new(a, b, None)),
        _ => None,
    };
    crate::tools::bdevperf::print_table_labeled(out, &sides, ratios.as_ref(), "namespace", "b/a");
}

/// The host identity to use when none is given: `/etc/nvme/hostnqn` and `/etc/nvme/hostid` as
/// nvme-cli keeps them, else a UUID NQN derived from `/etc/machine-id` (stable per machine, so
/// it can go on a target's allowed list), else a random one.
pub fn default_host_identity() -> (String, [u8; 16]) {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    let hostid_file = read("/etc/nvme/hostid").and_then(|s| uuid::Uuid::parse_str(&s).ok());
    if let Some(nqn) = read("/etc/nvme/hostnqn").filter(|s| s.starts_with("nqn.")) {
        let id = hostid_file
            .or_else(|| {
                nqn.rsplit(':')
                    .next()
                    .and_then(|u| uuid::Uuid::parse_str(u).ok())
            })
            .map(|u| *u.as_bytes())
            .unwrap_or([0; 16]);
        return (nqn, id);
    }
    let id = read("/etc/machine-id")
        .and_then(|m| machine_id_uuid(&m))
        .unwrap_or_else(uuid::Uuid::new_v4);
    (host_nqn_for(&id), *id.as_bytes())
}

/// A version-4-shaped UUID from a 32-hex-digit machine id; `None` if it is not one.
pub fn machine_id_uuid(machine_id: &str) -> Option<uuid::Uuid> {
    let m = machine_id.trim();
    if m.len() != 32 || !m.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let v = u128::from_str_radix(m, 16).ok()?;
    Some(uuid::Builder::from_random_bytes(v.to_be_bytes()).into_uuid())
}

/// The UUID-based host NQN format of the NVMe base specification.
pub fn host_nqn_for(id: &uuid::Uuid) -> String {
    format!("nqn.2014-08.org.nvmexpress:uuid:{}", id.hyphenated())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mdts_uses_the_minimum_page_size() {
        assert_eq!(mdts_bytes(0, 0), None);
        assert_eq!(mdts_bytes(5, 0), Some(128 * 1024));
        // MPSMIN = 1: 8 KiB pages.
        assert_eq!(mdts_bytes(5, 1 << 48), Some(256 * 1024));
        assert_eq!(mdts_bytes(255, 0), Some(u64::MAX));
    }

    #[test]
    fn fio_percentile_keys_and_values() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let l = FioLat::from_histogram(&h);
        assert_eq!(l.n, 1000);
        assert_eq!(l.percentile.len(), FIO_PERCENTILES.len());
        let p99 = l.percentile["99.000000"];
        assert!((989_000..=991_000).contains(&p99), "{p99}");
        assert!(l.percentile.contains_key("99.990000"));
        assert!(l.percentile.contains_key("1.000000"));
        assert!(FioLat::from_histogram(&Histogram::<u64>::new(3).unwrap())
            .percentile
            .is_empty());
    }

    #[test]
    fn host_identity_from_machine_id() {
        let u = machine_id_uuid("0123456789abcdef0123456789ABCDEF\n").unwrap();
        assert_eq!(u.get_version_num(), 4);
        assert_eq!(
            u,
            machine_id_uuid("0123456789abcdef0123456789abcdef").unwrap()
        );
        assert!(machine_id_uuid("xyz").is_none());
        assert!(machine_id_uuid("0123456789abcdef0123456789abcdeg").is_none());
        let nqn = host_nqn_for(&u);
        assert!(nqn.starts_with("nqn.2014-08.org.nvmexpress:uuid:"));
        assert_eq!(nqn.len(), "nqn.2014-08.org.nvmexpress:uuid:".len() + 36);
    }

    fn spec_t() -> TargetSpec {
        TargetSpec {
            addr: "127.0.0.1:4420".parse().unwrap(),
            subnqn: "nqn.x:sub".into(),
            hostnqn: "nqn.x:host".into(),
            hostid: [0; 16],
            digests: Digests::default(),
            kato_ms: 0,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn connect_refusals_are_described() {
        let t = spec_t();
        let e = describe_connect(
            HostError::Status {
                status: Status::CONNECT_INVALID_PARAMETERS,
                // What Linux nvmet answers for an unknown subsystem.
                dw0: (1 << 16) | 256,
            },
            &t,
            0,
        );
        assert!(
            matches!(&e, PerfError::Connect(m) if m.contains("no subsystem nqn.x:sub")),
            "{e}"
        );
        let e = describe_connect(
            HostError::Status {
                status: Status::CONNECT_INVALID_HOST,
                dw0: 0,
            },
            &t,
            0,
        );
        assert!(
            matches!(&e, PerfError::Connect(m) if m.contains("nqn.x:host is not allowed")),
            "{e}"
        );
        let e = describe_connect(
            HostError::Status {
                status: Status::CONNECT_INVALID_PARAMETERS,
                dw0: 44,
            },
            &t,
            3,
        );
        assert!(
            matches!(&e, PerfError::Connect(m) if m.contains("I/O queue 3") && m.contains("queue size")),
            "{e}"
        );
    }

    #[test]
    fn identify_text_and_numbers_never_panic_on_short_data() {
        assert_eq!(le(&[1, 2], 0, 4), None);
        assert_eq!(le(&[1, 2, 0, 0], 0, 4), Some(0x0201));
        assert_eq!(le(&[], usize::MAX, 4), None);
        assert_eq!(text(b"ab  ", 0, 4), "ab");
        assert_eq!(text(b"ab", 0, 4), "");
    }
}
