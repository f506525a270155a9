//! A cheap monotonic clock for per-I/O latency: the CPU's invariant TSC on x86_64 (one `rdtsc`,
//! a few ns, versus ~20 ns for `clock_gettime`), calibrated once against `Instant`.
//! Elsewhere it falls back to `Instant`.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Raw clock ticks.
#[inline(always)]
pub fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc has no preconditions on x86_64 and reads no memory.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// Ticks per nanosecond, measured once (about 10 ms at first use).
pub fn ticks_per_ns() -> f64 {
    static RATE: OnceLock<f64> = OnceLock::new();
    *RATE.get_or_init(|| {
        if cfg!(not(target_arch = "x86_64")) {
            return 1.0;
        }
        let t0 = Instant::now();
        let c0 = ticks();
        while t0.elapsed() < Duration::from_millis(10) {
            std::hint::spin_loop();
        }
        let c1 = ticks();
        let ns = t0.elapsed().as_nanos() as f64;
        ((c1.wrapping_sub(c0)) as f64 / ns).max(1e-3)
    })
}

/// Converts a tick delta to nanoseconds.
#[inline]
pub fn ticks_to_ns(delta: u64) -> u64 {
    (delta as f64 / ticks_per_ns()) as u64
}

/// Converts nanoseconds to ticks.
#[inline]
pub fn ns_to_ticks(ns: u64) -> u64 {
    (ns as f64 * ticks_per_ns()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn monotonic_and_calibrated() {
        let a = ticks();
        std::thread::sleep(Duration::from_millis(20));
        let b = ticks();
        let ns = ticks_to_ns(b - a);
        assert!(ns >= 15_000_000, "20 ms sleep measured as {ns} ns");
        assert!(ns < 2_000_000_000, "20 ms sleep measured as {ns} ns");
    }
}
