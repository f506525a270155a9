//! The control side of an `nvseal perf` run: [`run`] connects, sizes the I/O, spreads the
//! queues over the reactors, runs every phase (A/B slices alternate namespaces), sends
//! keep-alives, reports progress, reads an nvseal target's reactor busy time, merges the
//! per-reactor results and disconnects.
//!
//! Runs on the control thread (blocking). It is apart from the engine so the data path and the
//! orchestration around it can be read separately.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};

use super::controller::close_all;
use super::engine::PhaseCtx;
use super::engine::Shared;
use super::{
    split_io, Controller, ControllerInfo, IoQueue, NsInfo, PerfConfig, PerfError, PhaseJob,
    PhaseOutput,
};
use crate::nvmf::host::HostQpair;
use crate::reactor::ReactorSet;
use crate::stats::IoStats;
use crate::tools::bdevperf::{JobSpec, SideResult, Until};
use crate::types::CoreId;

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
    if let Err(e) = ctl.connect_idle(cfg.idle_connections) {
        ctl.disconnect();
        return Err(e);
    }
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
