//! Prometheus text exposition of [`IoStats`](super::IoStats): counters and a summary with
//! quantiles per op class, labelled by the caller (e.g. subsystem and namespace).

use super::{IoStats, OpClass};
use std::fmt::Write;

/// Appends `stats` to `out` in Prometheus text format 0.0.4. `labels` are `key="value"` pairs
/// already escaped by the caller (values must not contain `"` or `\`).
pub fn write_io_stats(out: &mut String, labels: &[(&str, &str)], stats: &IoStats) {
    let base: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    for op in OpClass::ALL {
        let s = stats.op(op);
        if s.ios == 0 {
            continue;
        }
        let mut l = base.clone();
        l.push(format!("op=\"{}\"", op.name()));
        let l = l.join(",");
        let _ = writeln!(out, "nvseal_ios_total{{{l}}} {}", s.ios);
        let _ = writeln!(out, "nvseal_bytes_total{{{l}}} {}", s.bytes);
        let _ = writeln!(out, "nvseal_io_errors_total{{{l}}} {}", s.errors);
        for q in [0.5, 0.9, 0.99, 0.999, 0.9999] {
            let v = s.latency_ns.value_at_quantile(q) as f64 / 1e9;
            let _ = writeln!(
                out,
                "nvseal_io_latency_seconds{{{l},quantile=\"{q}\"}} {v:e}"
            );
        }
        let _ = writeln!(
            out,
            "nvseal_io_latency_seconds_count{{{l}}} {}",
            s.latency_ns.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn exposition() {
        let mut st = IoStats::new();
        st.record(OpClass::Write, 4096, 10_000, true);
        let mut out = String::new();
        write_io_stats(&mut out, &[("nsid", "1")], &st);
        assert!(
            out.contains("nvseal_ios_total{nsid=\"1\",op=\"write\"} 1"),
            "{out}"
        );
        assert!(out.contains("quantile=\"0.99\""));
        assert!(!out.contains("op=\"read\""));
    }
}
