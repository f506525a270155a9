//! Reports of an `nvseal perf` run: fio-style JSON ([`PerfReport`], with fio's latency
//! percentiles taken from the HDR histograms) and the side-by-side text table shared with
//! `bdevperf`.
//!
//! Runs on the control thread after the run. It is apart from the engine because it is only
//! formatting: nothing here touches a queue.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::{ControllerInfo, PerfConfig, PerfOutcome};
use crate::stats::{IoStats, OpClass};
use crate::tools::bdevperf::{Ratios, SideReport, SideResult, Workload};

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
    /// Extra idle controllers held on the target during the run (`--idle-connections`).
    pub idle_connections: usize,
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
            idle_connections: cfg.idle_connections,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
