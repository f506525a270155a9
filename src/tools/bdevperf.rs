//! `nvseal bdevperf`: drives a bdev stack from the reactors, as SPDK's bdevperf does for SPDK.
//!
//! One [`Job`] poller per reactor keeps `queue_depth` I/Os in flight against its own channel,
//! records each completion's latency in the reactor's HDR histograms, and resubmits — all on the
//! reactor, with buffers and request slots allocated when the job starts, none per I/O.
//! The control thread only starts phases, prints progress and merges results.
//!
//! `--ab` runs the same workload on the plaintext stack (the base bdev) and the encrypted stack
//! (the crypto bdev over that same base), alternating short slices so both sides see the same
//! machine conditions, and reports both with ratios. It also times the XTS kernel on the same
//! reactor in the same run, so the crypto bdev's own overhead can be compared with the cipher's.
//!
//! `--verify` turns each I/O into write → read back → compare (SPDK's verify workload); on an
//! encrypted stack it also reads the same blocks from the base bdev and checks that what
//! reached the backend is not the plaintext.

use crate::bdev::{Bdev, BdevChannel, BdevIo, BufPool, IoStatus, IoType, Submit};
use crate::crypto::bdev::DataKey;
use crate::reactor::{busy_pct, Poller, ReactorSet};
use crate::stats::{IoStats, OpClass, Summary};
use crate::sys::clock;
use crossbeam_channel::{bounded, Receiver, Sender};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the jobs do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Read,
    Write,
    Randread,
    Randwrite,
    Randrw,
}

impl Workload {
    /// Random offsets (as opposed to sequential).
    pub fn random(self) -> bool {
        matches!(
            self,
            Workload::Randread | Workload::Randwrite | Workload::Randrw
        )
    }
}

/// A job's parameters (the same for every reactor).
#[derive(Clone, Debug, Serialize)]
pub struct JobSpec {
    pub workload: Workload,
    /// Percentage of reads for `randrw`.
    pub rwmixread: u8,
    pub io_size: usize,
    pub queue_depth: usize,
    pub verify: bool,
    pub seed: u64,
}

/// When a phase ends.
#[derive(Clone, Copy, Debug)]
pub enum Until {
    Time(Duration),
    /// I/Os per job.
    Count(u64),
}

/// Verify stages of a slot.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    Plain,
    VerifyWrite,
    VerifyRead,
    VerifyRaw,
}

#[derive(Clone, Copy)]
struct Slot {
    start_ticks: u64,
    stage: Stage,
}

/// What a job hands back when it finishes.
pub struct JobResult {
    pub stats: IoStats,
    pub elapsed_ns: u64,
    pub verify_mismatches: u64,
    pub plaintext_leaks: u64,
    pub io_errors: u64,
    pub first_error: Option<String>,
}

/// Everything of a job except its channels (so completions can update it while a channel is
/// being polled).
struct JobCore {
    spec: JobSpec,
    pool: BufPool,
    block_size: u64,
    io_blocks: u32,
    region_start: u64,
    region_ios: u64,
    cursor: u64,
    rng: u64,
    slots: Vec<Slot>,
    free_slots: Vec<usize>,
    /// I/Os ready to go to the main channel (next verify stage, or pushed back by Busy).
    ready: VecDeque<BdevIo>,
    /// Reads ready to go to the raw (base) channel.
    ready_raw: VecDeque<BdevIo>,
    stats: IoStats,
    in_flight: usize,
    ios_left: Option<u64>,
    verify_mismatches: u64,
    plaintext_leaks: u64,
    io_errors: u64,
    first_error: Option<String>,
    progress: Arc<AtomicU64>,
}

/// One reactor's load generator.
pub struct Job {
    name: String,
    chan: Box<dyn BdevChannel>,
    raw: Option<Box<dyn BdevChannel>>,
    core: JobCore,
    until: Until,
    start_ticks: u64,
    stop_ticks: u64,
    started: bool,
    draining: bool,
    result_tx: Option<Sender<JobResult>>,
}

/// SplitMix64 step: seeds and verify-pattern words (shared with `nvmeperf`).
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` (blocks starting at `lba`) with the verify pattern.
pub fn fill_pattern(buf: &mut [u8], lba: u64, block_size: usize, seed: u64) {
    for (b, block) in buf.chunks_exact_mut(block_size).enumerate() {
        let base = splitmix(seed ^ (lba + b as u64));
        for (w, word) in block.chunks_exact_mut(8).enumerate() {
            word.copy_from_slice(&base.wrapping_add(w as u64).to_le_bytes());
        }
    }
}

/// Whether `buf` holds the verify pattern (all of it).
pub fn check_pattern(buf: &[u8], lba: u64, block_size: usize, seed: u64) -> bool {
    buf.chunks_exact(block_size).enumerate().all(|(b, block)| {
        let base = splitmix(seed ^ (lba + b as u64));
        block
            .chunks_exact(8)
            .enumerate()
            .all(|(w, word)| word == base.wrapping_add(w as u64).to_le_bytes())
    })
}

/// Whether any 16-byte AES block of `buf` equals the pattern's: plaintext reaching the backend.
fn leaks_pattern(buf: &[u8], lba: u64, block_size: usize, seed: u64) -> bool {
    buf.chunks_exact(block_size).enumerate().any(|(b, block)| {
        let base = splitmix(seed ^ (lba + b as u64));
        block.chunks_exact(16).enumerate().any(|(i, c)| {
            c[..8] == base.wrapping_add(2 * i as u64).to_le_bytes()
                && c[8..] == base.wrapping_add(2 * i as u64 + 1).to_le_bytes()
        })
    })
}

impl JobCore {
    fn next_rand(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A new I/O for a free slot, or None when out of slots or buffers.
    fn new_io(&mut self, now: u64) -> Option<BdevIo> {
        if self.ios_left == Some(0) {
            return None;
        }
        let slot = *self.free_slots.last()?;
        let mut buf = self.pool.get(self.spec.io_size)?;
        self.free_slots.pop();
        let index = if self.spec.workload.random() && !self.spec.verify {
            self.next_rand() % self.region_ios
        } else {
            let i = self.cursor;
            self.cursor = (self.cursor + 1) % self.region_ios;
            i
        };
        let lba = self.region_start + index * u64::from(self.io_blocks);
        let (io_type, stage) = if self.spec.verify {
            fill_pattern(
                buf.as_mut_slice(),
                lba,
                self.block_size as usize,
                self.spec.seed,
            );
            (IoType::Write, Stage::VerifyWrite)
        } else {
            let read = match self.spec.workload {
                Workload::Read | Workload::Randread => true,
                Workload::Write | Workload::Randwrite => false,
                Workload::Randrw => (self.next_rand() % 100) < u64::from(self.spec.rwmixread),
            };
            (
                if read { IoType::Read } else { IoType::Write },
                Stage::Plain,
            )
        };
        if let Some(n) = self.ios_left.as_mut() {
            *n -= 1;
        }
        self.slots[slot] = Slot {
            start_ticks: now,
            stage,
        };
        Some(BdevIo::new(
            io_type,
            lba,
            self.io_blocks,
            Some(buf),
            slot as u64,
        ))
    }

    fn note_error(&mut self, what: String) {
        if self.first_error.is_none() {
            self.first_error = Some(what);
        }
    }

    /// Handles one completion from either channel.
    fn complete(&mut self, mut io: BdevIo, now: u64) {
        self.in_flight -= 1;
        let slot_index = io.ctx as usize;
        let slot = self.slots[slot_index];
        let ok = io.status == IoStatus::Success;
        let bytes = io.buf.as_ref().map_or(0, |b| b.len() as u64);
        self.stats.record(
            OpClass::from(io.io_type),
            bytes,
            clock::ticks_to_ns(now.wrapping_sub(slot.start_ticks)),
            ok,
        );
        self.progress
            .store(self.progress.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        if !ok {
            self.io_errors += 1;
            let (lba, st) = (io.offset_blocks, io.status);
            self.note_error(format!("{:?} at LBA {lba} failed: {st:?}", io.io_type));
            return self.release(io);
        }
        let bs = self.block_size as usize;
        let seed = self.spec.seed;
        match slot.stage {
            Stage::Plain => self.release(io),
            Stage::VerifyWrite => {
                io.io_type = IoType::Read;
                io.status = IoStatus::Pending;
                self.slots[slot_index] = Slot {
                    start_ticks: now,
                    stage: Stage::VerifyRead,
                };
                self.ready.push_back(io);
            }
            Stage::VerifyRead => {
                let good = io
                    .buf
                    .as_ref()
                    .is_some_and(|b| check_pattern(b.as_slice(), io.offset_blocks, bs, seed));
                if !good {
                    self.verify_mismatches += 1;
                    let lba = io.offset_blocks;
                    self.note_error(format!(
                        "verify: data read back at LBA {lba} differs from what was written"
                    ));
                }
                if good && self.ready_raw.capacity() > 0 {
                    io.status = IoStatus::Pending;
                    self.slots[slot_index] = Slot {
                        start_ticks: now,
                        stage: Stage::VerifyRaw,
                    };
                    self.ready_raw.push_back(io);
                } else {
                    self.release(io);
                }
            }
            Stage::VerifyRaw => {
                if io
                    .buf
                    .as_ref()
                    .is_some_and(|b| leaks_pattern(b.as_slice(), io.offset_blocks, bs, seed))
                {
                    self.plaintext_leaks += 1;
                    let lba = io.offset_blocks;
                    self.note_error(format!(
                        "verify: plaintext found on the backend at LBA {lba}"
                    ));
                }
                self.release(io);
            }
        }
    }

    fn release(&mut self, mut io: BdevIo) {
        if let Some(b) = io.buf.take() {
            self.pool.put(b);
        }
        self.free_slots.push(io.ctx as usize);
    }
}

impl Job {
    /// Builds a job on the calling reactor: opens its channels and allocates every buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        bdev: &Arc<dyn Bdev>,
        raw: Option<&Arc<dyn Bdev>>,
        spec: &JobSpec,
        job_index: usize,
        job_count: usize,
        until: Until,
        core: crate::types::CoreId,
        progress: Arc<AtomicU64>,
        result_tx: Sender<JobResult>,
    ) -> Result<Job, String> {
        let bs = u64::from(bdev.block_size());
        if spec.io_size == 0 || !(spec.io_size as u64).is_multiple_of(bs) {
            return Err(format!(
                "I/O size {} is not a multiple of the block size {bs}",
                spec.io_size
            ));
        }
        let io_blocks = (spec.io_size as u64 / bs) as u32;
        let total_ios = bdev.num_blocks() / u64::from(io_blocks);
        // Sequential and verify jobs get disjoint regions; random jobs share the whole device.
        let (region_start_io, region_ios) = if spec.workload.random() && !spec.verify {
            (0, total_ios)
        } else {
            let per = total_ios / job_count as u64;
            (per * job_index as u64, per)
        };
        if region_ios < spec.queue_depth as u64 {
            return Err(format!(
                "bdev {} is too small: {region_ios} I/Os of {} bytes per job for a queue depth of {}",
                bdev.name(),
                spec.io_size,
                spec.queue_depth
            ));
        }
        let qd = spec.queue_depth;
        let chan = bdev.open_channel(core, qd).map_err(|e| e.to_string())?;
        let raw_chan = match raw {
            Some(r) if spec.verify => Some(r.open_channel(core, qd).map_err(|e| e.to_string())?),
            _ => None,
        };
        let align = bdev
            .buf_align()
            .max(raw.map_or(1, |r| r.buf_align()))
            .max(64);
        let pool = BufPool::new(qd, spec.io_size, align).map_err(|e| e.to_string())?;
        let ios_left = match until {
            Until::Count(n) => Some(n),
            Until::Time(_) => None,
        };
        Ok(Job {
            name: name.to_string(),
            chan,
            core: JobCore {
                spec: spec.clone(),
                pool,
                block_size: bs,
                io_blocks,
                region_start: region_start_io * u64::from(io_blocks),
                region_ios,
                cursor: 0,
                rng: splitmix(spec.seed ^ (job_index as u64 + 1)) | 1,
                slots: vec![
                    Slot {
                        start_ticks: 0,
                        stage: Stage::Plain
                    };
                    qd
                ],
                free_slots: (0..qd).rev().collect(),
                ready: VecDeque::with_capacity(qd),
                ready_raw: VecDeque::with_capacity(if raw_chan.is_some() { qd } else { 0 }),
                stats: IoStats::new(),
                in_flight: 0,
                ios_left,
                verify_mismatches: 0,
                plaintext_leaks: 0,
                io_errors: 0,
                first_error: None,
                progress,
            },
            raw: raw_chan,
            until,
            start_ticks: 0,
            stop_ticks: u64::MAX,
            started: false,
            draining: false,
            result_tx: Some(result_tx),
        })
    }

    fn submit_to(
        chan: &mut Box<dyn BdevChannel>,
        core: &mut JobCore,
        io: BdevIo,
        raw: bool,
    ) -> bool {
        if io.io_type == IoType::Write {
            // The hint the crypto bdev gives its base before each write, given here to every
            // channel so both sides of an A/B run get it once per write (a crypto channel
            // ignores it and hints its base itself).
            chan.hint_write(io.offset_blocks, io.num_blocks);
        }
        match chan.submit(io) {
            Submit::Queued => {
                core.in_flight += 1;
                true
            }
            Submit::Busy(io) => {
                if raw {
                    core.ready_raw.push_front(io);
                } else {
                    core.ready.push_front(io);
                }
                false
            }
        }
    }

    fn finish(&mut self, now: u64) {
        if let Some(tx) = self.result_tx.take() {
            let c = &mut self.core;
            let res = JobResult {
                stats: std::mem::take(&mut c.stats),
                elapsed_ns: clock::ticks_to_ns(now.wrapping_sub(self.start_ticks)),
                verify_mismatches: c.verify_mismatches,
                plaintext_leaks: c.plaintext_leaks,
                io_errors: c.io_errors,
                first_error: c.first_error.take(),
            };
            let _ = tx.try_send(res);
        }
    }
}

impl Poller for Job {
    fn name(&self) -> &str {
        &self.name
    }

    fn poll(&mut self) -> usize {
        let mut now = clock::ticks();
        if !self.started {
            self.started = true;
            self.start_ticks = now;
            if let Until::Time(d) = self.until {
                self.stop_ticks = now + clock::ns_to_ticks(d.as_nanos() as u64);
            }
        }
        let core = &mut self.core;
        // Each completion is stamped as it is handed over, not with a time read before the
        // poll: otherwise the poll's own work is missing from every latency.
        let mut work = self.chan.poll(&mut |io| core.complete(io, clock::ticks()));
        if let Some(raw) = self.raw.as_mut() {
            work += raw.poll(&mut |io| core.complete(io, clock::ticks()));
        }
        if work > 0 {
            now = clock::ticks();
        }
        // Follow-up stages first (they already own a slot), then raw reads, then new I/O.
        while let Some(mut io) = core.ready.pop_front() {
            core.slots[io.ctx as usize].start_ticks = now;
            io.status = IoStatus::Pending;
            if !Self::submit_to(&mut self.chan, core, io, false) {
                break;
            }
            work += 1;
        }
        if let Some(raw) = self.raw.as_mut() {
            while let Some(io) = core.ready_raw.pop_front() {
                if !Self::submit_to(raw, core, io, true) {
                    break;
                }
                work += 1;
            }
        }
        if !self.draining && now >= self.stop_ticks {
            self.draining = true;
        }
        if !self.draining && core.ready.is_empty() {
            while let Some(io) = core.new_io(now) {
                if !Self::submit_to(&mut self.chan, core, io, false) {
                    break;
                }
                work += 1;
            }
            if core.ios_left == Some(0) {
                self.draining = true;
            }
        }
        if self.draining
            && core.in_flight == 0
            && core.ready.is_empty()
            && core.ready_raw.is_empty()
        {
            // Release buffers parked in the ready queues (none in practice once drained).
            self.finish(now);
        }
        work
    }

    fn in_flight(&self) -> usize {
        self.core.in_flight + self.core.ready.len() + self.core.ready_raw.len()
    }

    fn drain(&mut self) {
        self.draining = true;
    }

    fn is_done(&self) -> bool {
        self.result_tx.is_none()
    }
}

/// Results of one side (plaintext or encrypted) over all its phases.
pub struct SideResult {
    pub label: String,
    pub bdev: String,
    pub stats: IoStats,
    /// Wall time the side's jobs ran (sum over slices; max over reactors per slice).
    pub elapsed_s: f64,
    /// Busy ticks and total ticks over the side's phases, all reactors.
    pub busy_ticks: u64,
    pub total_ticks: u64,
    /// The target's reactors (all of them) over the side's phases, in ns, when the target
    /// reports them (`nvseal perf --target-rpc`); both 0 when unknown.
    pub target_busy_ns: u64,
    pub target_total_ns: u64,
    pub verify_mismatches: u64,
    pub plaintext_leaks: u64,
    pub io_errors: u64,
    pub first_error: Option<String>,
}

impl SideResult {
    pub fn new(label: &str, bdev: &str) -> Self {
        SideResult {
            label: label.to_string(),
            bdev: bdev.to_string(),
            stats: IoStats::new(),
            elapsed_s: 0.0,
            busy_ticks: 0,
            total_ticks: 0,
            target_busy_ns: 0,
            target_total_ns: 0,
            verify_mismatches: 0,
            plaintext_leaks: 0,
            io_errors: 0,
            first_error: None,
        }
    }
    pub fn busy_pct(&self) -> f64 {
        if self.total_ticks == 0 {
            0.0
        } else {
            100.0 * self.busy_ticks as f64 / self.total_ticks as f64
        }
    }
    /// Reactor CPU time (busy polls only) per I/O, in µs.
    pub fn cpu_us_per_io(&self) -> f64 {
        let ios = self.stats.total_ios();
        if ios == 0 {
            return 0.0;
        }
        clock::ticks_to_ns(self.busy_ticks) as f64 / 1000.0 / ios as f64
    }
    pub fn summary(&self) -> Summary {
        self.stats.data_summary(self.elapsed_s)
    }
    /// The target reactors' busy share while this side ran, when known.
    pub fn target_busy_pct(&self) -> Option<f64> {
        (self.target_total_ns > 0)
            .then(|| 100.0 * self.target_busy_ns as f64 / self.target_total_ns as f64)
    }
    /// Target reactor CPU time (busy polls, all reactors) per I/O in µs, when known.
    pub fn target_cpu_us_per_io(&self) -> Option<f64> {
        let ios = self.stats.total_ios();
        (self.target_total_ns > 0 && ios > 0)
            .then(|| self.target_busy_ns as f64 / 1000.0 / ios as f64)
    }
}

/// One side of a run: a bdev, and for verify on an encrypted stack, the base to check for leaks.
pub struct Side {
    pub label: String,
    pub bdev: Arc<dyn Bdev>,
    pub raw: Option<Arc<dyn Bdev>>,
}

/// Runs the jobs of one phase on every reactor and merges their results into `into`.
pub fn run_phase(
    set: &ReactorSet,
    side: &Side,
    spec: &JobSpec,
    until: Until,
    into: &mut SideResult,
    progress: &mut dyn FnMut(&SideResult, u64, f64),
) -> Result<(), String> {
    let n = set.len();
    let (tx, rx): (Sender<JobResult>, Receiver<JobResult>) = bounded(n);
    let counters: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let before = set.snapshots();
    for (i, counter) in counters.iter().enumerate() {
        let bdev = side.bdev.clone();
        let raw = side.raw.clone();
        let spec = spec.clone();
        let tx = tx.clone();
        let progress = counter.clone();
        let label = format!("bdevperf-{}-{}", side.label, i);
        set.call(i, move |r| {
            let core = r.core();
            Job::new(
                &label,
                &bdev,
                raw.as_ref(),
                &spec,
                i,
                n,
                until,
                core,
                progress,
                tx,
            )
            .map(|job| {
                r.add_poller(Box::new(job));
            })
        })
        .map_err(|e| e.to_string())??;
    }
    drop(tx);
    let t0 = Instant::now();
    let mut got = 0;
    let mut max_elapsed_ns = 0u64;
    let deadline = match until {
        Until::Time(d) => Some(t0 + d + Duration::from_secs(60)),
        Until::Count(_) => None,
    };
    while got < n {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(res) => {
                got += 1;
                max_elapsed_ns = max_elapsed_ns.max(res.elapsed_ns);
                into.stats.merge(&res.stats);
                into.verify_mismatches += res.verify_mismatches;
                into.plaintext_leaks += res.plaintext_leaks;
                into.io_errors += res.io_errors;
                if into.first_error.is_none() {
                    into.first_error = res.first_error;
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                let done: u64 = counters.iter().map(|c| c.load(Ordering::Relaxed)).sum();
                progress(into, done, t0.elapsed().as_secs_f64());
                if deadline.is_some_and(|d| Instant::now() > d) {
                    return Err(
                        "jobs did not finish within 60 s of their time limit (stuck I/O?)".into(),
                    );
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                return Err("a reactor stopped before its job finished".into());
            }
        }
    }
    let after = set.snapshots();
    for (b, a) in before.iter().zip(after.iter()) {
        into.busy_ticks += a.0.saturating_sub(b.0);
        into.total_ticks += a.0.saturating_sub(b.0) + a.1.saturating_sub(b.1);
    }
    into.elapsed_s += max_elapsed_ns as f64 / 1e9;
    let _ = busy_pct; // (per-phase busy % is derived from the tick sums above)
    Ok(())
}

/// The XTS kernel's own time per I/O, measured on reactor 0 in the same run as the benchmark it
/// is compared with.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct KernelTime {
    /// One buffer encrypted over and over: the kernel at its best, data hot in L1 (what
    /// `cargo bench --bench xts` reports).
    pub hot_ns: f64,
    /// `queue_depth` pool-like buffers (same size and alignment as the job's) in rotation, as the
    /// data path sees them: each buffer was last touched `queue_depth` I/Os ago.
    pub working_set_ns: f64,
}

/// Times the XTS kernel of `key` on reactor 0 for `io_size` bytes in units of `unit` bytes:
/// median of 7 rounds of ~64 MiB each, ns per call, hot and over a working set of `buffers`.
pub fn time_xts_kernel(
    set: &ReactorSet,
    key: &DataKey,
    io_size: usize,
    unit: usize,
    buffers: usize,
    align: usize,
) -> Result<KernelTime, String> {
    let key = key.clone();
    set.call(0, move |_| {
        let time = |bufs: &mut [crate::sys::buf::AlignedBuf]| {
            let rounds = 7;
            let iters = (64 << 20) / io_size.max(1) + 16;
            let mut per_call = Vec::with_capacity(rounds);
            for r in 0..rounds {
                let t0 = clock::ticks();
                for i in 0..iters {
                    let b = &mut bufs[i % bufs.len()];
                    let _ = key.xts().encrypt_units(
                        &mut b.as_mut_slice()[..io_size],
                        unit,
                        (r * iters + i) as u64,
                    );
                }
                per_call.push(clock::ticks_to_ns(clock::ticks() - t0) as f64 / iters as f64);
            }
            per_call.sort_by(f64::total_cmp);
            per_call[rounds / 2]
        };
        let alloc = |n: usize| -> Option<Vec<crate::sys::buf::AlignedBuf>> {
            (0..n.max(1))
                .map(|_| crate::sys::buf::AlignedBuf::zeroed(io_size, align))
                .collect()
        };
        let mut one = alloc(1).ok_or("out of memory")?;
        let mut many = alloc(buffers).ok_or("out of memory")?;
        let hot_ns = time(&mut one);
        let working_set_ns = time(&mut many);
        Ok::<KernelTime, &str>(KernelTime {
            hot_ns,
            working_set_ns,
        })
    })
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// JSON form of one side.
#[derive(Serialize)]
pub struct SideReport {
    pub label: String,
    pub bdev: String,
    #[serde(flatten)]
    pub summary: Summary,
    pub read: Summary,
    pub write: Summary,
    pub reactor_busy_pct: f64,
    pub cpu_us_per_io: f64,
    /// The target's reactors (NVMe/TCP runs with `--target-rpc` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_busy_pct: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_cpu_us_per_io: Option<f64>,
    pub verify_mismatches: u64,
    pub plaintext_leaks: u64,
    pub io_errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

impl SideReport {
    pub fn from_side(s: &SideResult) -> Self {
        SideReport {
            label: s.label.clone(),
            bdev: s.bdev.clone(),
            summary: s.summary(),
            read: s.stats.summary(OpClass::Read, s.elapsed_s),
            write: s.stats.summary(OpClass::Write, s.elapsed_s),
            reactor_busy_pct: s.busy_pct(),
            cpu_us_per_io: s.cpu_us_per_io(),
            target_busy_pct: s.target_busy_pct(),
            target_cpu_us_per_io: s.target_cpu_us_per_io(),
            verify_mismatches: s.verify_mismatches,
            plaintext_leaks: s.plaintext_leaks,
            io_errors: s.io_errors,
            first_error: s.first_error.clone(),
        }
    }
}

/// Ratios encrypted / plaintext.
#[derive(Serialize)]
pub struct Ratios {
    pub iops: f64,
    pub mb_per_s: f64,
    pub latency_p50: f64,
    pub latency_p99: f64,
    pub latency_p99_9: f64,
    pub cpu_us_per_io: f64,
    /// (encrypted − plaintext) reactor µs per I/O.
    pub crypto_us_per_io: f64,
    /// `crypto_us_per_io` / the XTS kernel's own time per I/O on one hot buffer, same run
    /// (1.0 = the crypto bdev costs exactly the cipher at its best and nothing else).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crypto_cost_over_kernel_hot: Option<f64>,
    /// `crypto_us_per_io` / the kernel's time over a working set like the job's buffers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crypto_cost_over_kernel_working_set: Option<f64>,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        0.0
    } else {
        a / b
    }
}

impl Ratios {
    pub fn new(plain: &SideReport, enc: &SideReport, kernel: Option<KernelTime>) -> Self {
        let d = enc.cpu_us_per_io - plain.cpu_us_per_io;
        Ratios {
            iops: ratio(enc.summary.iops, plain.summary.iops),
            mb_per_s: ratio(enc.summary.mb_per_s, plain.summary.mb_per_s),
            latency_p50: ratio(enc.summary.latency_us.p50, plain.summary.latency_us.p50),
            latency_p99: ratio(enc.summary.latency_us.p99, plain.summary.latency_us.p99),
            latency_p99_9: ratio(enc.summary.latency_us.p99_9, plain.summary.latency_us.p99_9),
            cpu_us_per_io: ratio(enc.cpu_us_per_io, plain.cpu_us_per_io),
            crypto_us_per_io: d,
            crypto_cost_over_kernel_hot: kernel.map(|k| ratio(d * 1000.0, k.hot_ns)),
            crypto_cost_over_kernel_working_set: kernel
                .map(|k| ratio(d * 1000.0, k.working_set_ns)),
        }
    }
}

/// Prints sides side by side (and the ratio column when there are two).
pub fn print_table(out: &mut dyn std::io::Write, sides: &[SideReport], ratios: Option<&Ratios>) {
    print_table_labeled(out, sides, ratios, "bdev", "enc/plain");
}

/// [`print_table`] with the first row's name (`bdev`, `namespace`, ...) and the ratio column's
/// heading chosen by the caller.
pub fn print_table_labeled(
    out: &mut dyn std::io::Write,
    sides: &[SideReport],
    ratios: Option<&Ratios>,
    what: &str,
    ratio_heading: &str,
) {
    let mut rows: Vec<(&str, Vec<String>, Option<String>)> = Vec::new();
    let f = |v: f64, p: usize| format!("{v:.p$}");
    let col = |get: &dyn Fn(&SideReport) -> f64, p: usize| {
        sides.iter().map(|s| f(get(s), p)).collect::<Vec<_>>()
    };
    let r = |get: &dyn Fn(&Ratios) -> f64| ratios.map(|x| format!("{:.3}", get(x)));
    rows.push((what, sides.iter().map(|s| s.bdev.clone()).collect(), None));
    rows.push(("IOPS", col(&|s| s.summary.iops, 0), r(&|x| x.iops)));
    rows.push(("MB/s", col(&|s| s.summary.mb_per_s, 1), r(&|x| x.mb_per_s)));
    rows.push(("lat mean us", col(&|s| s.summary.latency_us.mean, 2), None));
    rows.push((
        "lat p50 us",
        col(&|s| s.summary.latency_us.p50, 2),
        r(&|x| x.latency_p50),
    ));
    rows.push(("lat p90 us", col(&|s| s.summary.latency_us.p90, 2), None));
    rows.push((
        "lat p99 us",
        col(&|s| s.summary.latency_us.p99, 2),
        r(&|x| x.latency_p99),
    ));
    rows.push((
        "lat p99.9 us",
        col(&|s| s.summary.latency_us.p99_9, 2),
        r(&|x| x.latency_p99_9),
    ));
    rows.push((
        "lat p99.99 us",
        col(&|s| s.summary.latency_us.p99_99, 2),
        None,
    ));
    rows.push(("lat max us", col(&|s| s.summary.latency_us.max, 2), None));
    rows.push(("reactor busy %", col(&|s| s.reactor_busy_pct, 1), None));
    rows.push((
        "cpu us/io",
        col(&|s| s.cpu_us_per_io, 3),
        r(&|x| x.cpu_us_per_io),
    ));
    if sides.iter().any(|s| s.target_busy_pct.is_some()) {
        let opt = |get: &dyn Fn(&SideReport) -> Option<f64>, p: usize| {
            sides
                .iter()
                .map(|s| get(s).map_or_else(|| "-".to_string(), |v| f(v, p)))
                .collect::<Vec<_>>()
        };
        let cpu_ratio = match sides {
            [a, b] => match (a.target_cpu_us_per_io, b.target_cpu_us_per_io) {
                (Some(x), Some(y)) if x > 0.0 => Some(format!("{:.3}", y / x)),
                _ => None,
            },
            _ => None,
        };
        rows.push(("target busy %", opt(&|s| s.target_busy_pct, 1), None));
        rows.push((
            "target cpu us/io",
            opt(&|s| s.target_cpu_us_per_io, 3),
            cpu_ratio,
        ));
    }
    rows.push((
        "errors",
        col(
            &|s| (s.io_errors + s.verify_mismatches + s.plaintext_leaks) as f64,
            0,
        ),
        None,
    ));
    let _ = write!(out, "{:<16}", "");
    for s in sides {
        let _ = write!(out, "{:>16}", s.label);
    }
    if ratios.is_some() {
        let _ = write!(out, "{:>12}", ratio_heading);
    }
    let _ = writeln!(out);
    for (name, vals, rat) in rows {
        let _ = write!(out, "{name:<16}");
        for v in vals {
            let _ = write!(out, "{v:>16}");
        }
        if let Some(x) = rat {
            let _ = write!(out, "{x:>12}");
        }
        let _ = writeln!(out);
    }
}

#[cfg(test)]
mod tests;
