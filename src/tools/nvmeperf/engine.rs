//! The data path of `nvseal perf`: I/O queues ([`IoQueue`]) with every buffer and slot
//! allocated when they connect, and the per-reactor [`PhaseJob`] poller that keeps
//! `queue_depth` commands in flight on each queue, generates offsets, writes and verifies the
//! pattern, and records each completion's latency in the reactor's own histograms.
//!
//! Runs on the reactor threads (a phase's queues are handed to a reactor, and handed back when
//! the phase ends). It is apart from the control side so the hot path reads on its own.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::Sender;

use super::{NsInfo, PerfError};
use crate::nvme::io_op;
use crate::nvmf::host::{rw_sqe, Completion, Dir, HostError, HostQpair};
use crate::reactor::Poller;
use crate::stats::{IoStats, OpClass};
use crate::sys::clock;
use crate::tools::bdevperf::{
    check_pattern, fill_pattern, splitmix, JobResult, JobSpec, Until, Workload,
};

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
pub(super) struct QueueState {
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
    pub(super) dead: bool,
}

/// One connected I/O queue pair and its bookkeeping; moves to a reactor for a phase and back.
pub struct IoQueue {
    pub(super) qp: HostQpair,
    qid: u16,
    /// Index among all queues of the run (0-based), for region placement and seeds.
    index: usize,
    pub(super) st: QueueState,
}

impl IoQueue {
    pub(super) fn new(qp: HostQpair, qid: u16, index: usize, depth: usize) -> IoQueue {
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
    pub(super) fn reset(
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
pub(super) struct PhaseCtx {
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
    pub(super) fn new(spec: &JobSpec, ns: &NsInfo, cmd_bytes: u32, fua: bool) -> PhaseCtx {
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
pub(super) struct Shared {
    pub(super) stats: IoStats,
    pub(super) io_errors: u64,
    pub(super) verify_mismatches: u64,
    pub(super) first_error: Option<String>,
    pub(super) progress: Arc<AtomicU64>,
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
    pub(super) reactor: usize,
    pub(super) queues: Vec<IoQueue>,
}

/// One reactor's load generator for one phase (one side, one slice).
pub struct PhaseJob {
    pub(super) name: String,
    pub(super) reactor: usize,
    pub(super) queues: Vec<IoQueue>,
    pub(super) ctx: PhaseCtx,
    pub(super) sh: Shared,
    pub(super) until: Until,
    pub(super) start_ticks: u64,
    pub(super) stop_ticks: u64,
    pub(super) started: bool,
    pub(super) draining: bool,
    pub(super) result_tx: Option<Sender<PhaseOutput>>,
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
            // Each completion is stamped when the socket has delivered it, not with a time
            // read before the receive: that would leave the receive out of every latency.
            match qp.poll(&mut |c| st.complete(c, ctx, sh, clock::ticks())) {
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
