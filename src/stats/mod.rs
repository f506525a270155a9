//! I/O statistics: an HDR latency histogram per op class, recorded on the reactor that did the
//! I/O (plain `&mut`, no locks, no atomics) and merged off the data path.
//!
//! A reactor owns its [`IoStats`]; control threads get copies (a message to the reactor clones
//! them, which allocates — that is fine off the data path) and merge them with [`IoStats::merge`].
//! Latencies are recorded in nanoseconds; reports show microseconds.

use hdrhistogram::Histogram;
use serde::Serialize;

pub mod prometheus;
pub mod reactor;

/// Highest latency a histogram tracks (ns); larger values are clamped to it.
/// One minute: anything slower is a hang, and is still counted.
pub const LATENCY_NS_MAX: u64 = 60_000_000_000;
/// Significant decimal digits kept (3 = 0.1 % relative error, ~200 KiB per histogram).
pub const LATENCY_SIGFIG: u8 = 3;

/// Op classes stats are kept for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpClass {
    Read,
    Write,
    Flush,
    WriteZeroes,
    Unmap,
    Admin,
}

impl OpClass {
    pub const ALL: [OpClass; 6] = [
        OpClass::Read,
        OpClass::Write,
        OpClass::Flush,
        OpClass::WriteZeroes,
        OpClass::Unmap,
        OpClass::Admin,
    ];
    pub fn name(self) -> &'static str {
        match self {
            OpClass::Read => "read",
            OpClass::Write => "write",
            OpClass::Flush => "flush",
            OpClass::WriteZeroes => "write_zeroes",
            OpClass::Unmap => "unmap",
            OpClass::Admin => "admin",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

impl From<crate::bdev::IoType> for OpClass {
    fn from(t: crate::bdev::IoType) -> Self {
        use crate::bdev::IoType;
        match t {
            IoType::Read => OpClass::Read,
            IoType::Write => OpClass::Write,
            IoType::Flush => OpClass::Flush,
            IoType::WriteZeroes => OpClass::WriteZeroes,
            IoType::Unmap => OpClass::Unmap,
        }
    }
}

/// Counters and a latency histogram for one op class.
#[derive(Clone)]
pub struct OpStats {
    pub ios: u64,
    pub bytes: u64,
    pub errors: u64,
    pub latency_ns: Histogram<u64>,
}

impl OpStats {
    fn new() -> Self {
        OpStats {
            ios: 0,
            bytes: 0,
            errors: 0,
            latency_ns: Histogram::new_with_bounds(1, LATENCY_NS_MAX, LATENCY_SIGFIG)
                .expect("static histogram bounds are valid"),
        }
    }
}

/// Stats of one reactor (or a merge of several), per op class.
#[derive(Clone)]
pub struct IoStats {
    ops: [OpStats; 6],
}

impl Default for IoStats {
    fn default() -> Self {
        Self::new()
    }
}

impl IoStats {
    /// Allocates every histogram up front (start-up only).
    pub fn new() -> Self {
        IoStats {
            ops: std::array::from_fn(|_| OpStats::new()),
        }
    }
    /// Records one finished I/O. Never allocates.
    #[inline]
    pub fn record(&mut self, op: OpClass, bytes: u64, latency_ns: u64, ok: bool) {
        let s = &mut self.ops[op.index()];
        s.ios += 1;
        s.bytes += bytes;
        if !ok {
            s.errors += 1;
        }
        s.latency_ns
            .saturating_record(latency_ns.clamp(1, LATENCY_NS_MAX));
    }
    pub fn op(&self, op: OpClass) -> &OpStats {
        &self.ops[op.index()]
    }
    /// Adds another reactor's stats into these.
    pub fn merge(&mut self, other: &IoStats) {
        for (a, b) in self.ops.iter_mut().zip(other.ops.iter()) {
            a.ios += b.ios;
            a.bytes += b.bytes;
            a.errors += b.errors;
            // Same bounds on both sides, so adding cannot fail.
            let _ = a.latency_ns.add(&b.latency_ns);
        }
    }
    pub fn reset(&mut self) {
        for s in self.ops.iter_mut() {
            s.ios = 0;
            s.bytes = 0;
            s.errors = 0;
            s.latency_ns.reset();
        }
    }
    pub fn total_ios(&self) -> u64 {
        self.ops.iter().map(|s| s.ios).sum()
    }
    pub fn total_bytes(&self) -> u64 {
        self.ops.iter().map(|s| s.bytes).sum()
    }
    /// All data ops (read + write) merged into one histogram, for mixed workloads.
    pub fn data_latency(&self) -> Histogram<u64> {
        let mut h = self.ops[OpClass::Read.index()].latency_ns.clone();
        let _ = h.add(&self.ops[OpClass::Write.index()].latency_ns);
        h
    }
    /// A summary of one op class over `elapsed_s` seconds.
    pub fn summary(&self, op: OpClass, elapsed_s: f64) -> Summary {
        let s = &self.ops[op.index()];
        Summary::from_parts(s.ios, s.bytes, s.errors, &s.latency_ns, elapsed_s)
    }
    /// A summary of reads and writes together.
    pub fn data_summary(&self, elapsed_s: f64) -> Summary {
        let r = &self.ops[OpClass::Read.index()];
        let w = &self.ops[OpClass::Write.index()];
        Summary::from_parts(
            r.ios + w.ios,
            r.bytes + w.bytes,
            r.errors + w.errors,
            &self.data_latency(),
            elapsed_s,
        )
    }
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct LatencyUs {
    pub mean: f64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub p99_99: f64,
    pub max: f64,
}

impl LatencyUs {
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencyUs::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencyUs {
            mean: h.mean() / 1000.0,
            min: us(h.min()),
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p99_9: us(h.value_at_quantile(0.999)),
            p99_99: us(h.value_at_quantile(0.9999)),
            max: us(h.max()),
        }
    }
}

/// Rates and percentiles of one op class (or a merge) over a time window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub ios: u64,
    pub bytes: u64,
    pub errors: u64,
    pub elapsed_s: f64,
    pub iops: f64,
    /// Megabytes (10^6 bytes) per second, as fio and SPDK report.
    pub mb_per_s: f64,
    pub latency_us: LatencyUs,
}

impl Summary {
    fn from_parts(ios: u64, bytes: u64, errors: u64, h: &Histogram<u64>, elapsed_s: f64) -> Self {
        let e = if elapsed_s > 0.0 {
            elapsed_s
        } else {
            f64::INFINITY
        };
        Summary {
            ios,
            bytes,
            errors,
            elapsed_s,
            iops: ios as f64 / e,
            mb_per_s: bytes as f64 / e / 1e6,
            latency_us: LatencyUs::from_histogram(h),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_merge_summarise() {
        let mut a = IoStats::new();
        let mut b = IoStats::new();
        for i in 1..=1000u64 {
            a.record(OpClass::Read, 4096, i * 1000, true);
        }
        b.record(OpClass::Read, 4096, 2_000_000, true);
        b.record(OpClass::Write, 512, 5_000, false);
        a.merge(&b);
        let s = a.summary(OpClass::Read, 2.0);
        assert_eq!(s.ios, 1001);
        assert_eq!(s.bytes, 1001 * 4096);
        assert!((s.iops - 500.5).abs() < 1e-9);
        assert!(
            (s.latency_us.p50 - 501.0).abs() < 2.0,
            "p50 {}",
            s.latency_us.p50
        );
        assert!(
            (s.latency_us.max - 2000.0).abs() < 3.0,
            "max {}",
            s.latency_us.max
        );
        let w = a.summary(OpClass::Write, 1.0);
        assert_eq!((w.ios, w.errors), (1, 1));
        let d = a.data_summary(1.0);
        assert_eq!(d.ios, 1002);
        a.reset();
        assert_eq!(a.total_ios(), 0);
        assert_eq!(
            a.summary(OpClass::Read, 1.0).latency_us,
            LatencyUs::default()
        );
    }

    #[test]
    fn huge_latencies_are_clamped_not_lost() {
        let mut a = IoStats::new();
        a.record(OpClass::Flush, 0, u64::MAX, true);
        a.record(OpClass::Flush, 0, 0, true);
        assert_eq!(a.op(OpClass::Flush).latency_ns.len(), 2);
    }
}
