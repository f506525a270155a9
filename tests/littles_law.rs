//! The latencies nvseal's load generators report obey Little's law: with the queue kept full
//! (QD I/Os always in flight), mean latency × IOPS = QD. A latency clock read in the wrong
//! place breaks it. Stamping completions before the poll that does the cipher work, for example,
//! left the encrypted mean at 6.7 µs where 32 / 1.07 M IOPS is 30 µs (issue 17). Checked on the
//! real binaries: `nvseal bdevperf --ab` (plaintext and encrypted sides, small and large I/O) and
//! `nvseal perf` against `nvseal serve` over NVMe/TCP. docs/perf.md says where each clock is read.
//!
//! Both sides of the law come from the same run, so the check holds at any machine speed. The
//! slack is one-sided. Between a completion and the resubmission of its slot, an I/O is in no
//! one's clock: the generator is doing its own work. So the product sits a little *below* QD, by
//! IOPS × that gap: 3.8 % for plaintext 4 KiB on malloc at 1.8 M IOPS, and less for anything
//! slower. It can never honestly sit above QD. The bug this catches puts it far below (7 of 32).

mod common;

use std::fs;
use std::process::Command;

use serde_json::Value;

/// How far below the queue depth mean latency × IOPS may fall (module docs).
const BELOW: f64 = 0.10;
/// How far above (clock noise only).
const ABOVE: f64 = 0.02;

fn check(what: &str, mean_us: f64, iops: f64, qd: f64) {
    let l = mean_us * 1e-6 * iops;
    println!("{what}: mean {mean_us:.2} us x {iops:.0} IOPS = {l:.2} in flight (QD {qd})");
    assert!(
        iops > 0.0 && l >= qd * (1.0 - BELOW) && l <= qd * (1.0 + ABOVE),
        "{what}: mean latency {mean_us:.2} us x {iops:.0} IOPS = {l:.2} I/Os in flight, \
         but the queue depth is {qd}: a latency clock is read in the wrong place"
    );
}

fn run_json(args: &[&str], json: &std::path::Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_nvseal"))
        .args(args)
        .arg("--json")
        .arg(json)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nvseal {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&fs::read(json).unwrap()).unwrap()
}

#[test]
fn bdevperf_latency_times_iops_is_the_queue_depth_on_both_sides() {
    let d = tempfile::tempdir().unwrap();
    for (wl, size, qd) in [("randwrite", "4k", 32), ("randread", "128k", 8)] {
        let json = d.path().join(format!("{wl}.json"));
        let q = qd.to_string();
        let v = run_json(
            &[
                "bdevperf", "--malloc", "64M", "--ab", "-w", wl, "-o", size, "-q", &q, "-t", "2",
                "--cores", "0",
            ],
            &json,
        );
        assert_eq!(v["reactors"], 1, "{v}");
        let sides = v["sides"].as_array().expect("sides");
        assert_eq!(sides.len(), 2, "plaintext and encrypted");
        for s in sides {
            check(
                &format!("bdevperf {wl} {size} QD{qd} {}", s["label"]),
                s["latency_us"]["mean"].as_f64().unwrap(),
                s["iops"].as_f64().unwrap(),
                f64::from(qd),
            );
        }
    }
}

#[test]
fn perf_latency_times_iops_is_the_queue_depth() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("serve.yaml");
    fs::write(
        &cfg,
        "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 0\n\
         bdevs:\n  - { name: n0, type: null, size_bytes: 1073741824, block_size: 4096 }\n\
         \x20 - { name: n1, type: null, size_bytes: 1073741824, block_size: 4096 }\n\
         \x20 - { name: n1-crypt, type: crypto, base: n1, key: ephemeral }\n\
         subsystems:\n  - nqn: nqn.2026-12.io.nvseal:little\n    serial: LITTLE\n\
         \x20   allowed_hosts: [\"nqn.2026-12.io.nvseal:little-host\"]\n\
         \x20   namespaces:\n      - { nsid: 1, bdev: n0 }\n\
         \x20     - { nsid: 2, bdev: n1-crypt, encrypted: true }\n\
         \x20   listen: [{ addr: 127.0.0.1, port: 0 }]\n",
    )
    .unwrap();
    let mut serve = common::serve::Serve::start(&cfg);
    let addr = common::serve::addr_of(&serve.wait_for("NVMe/TCP listening")).to_string();
    serve.wait_for("nvseal serving");
    for (nsid, wl, size, qd) in [
        ("1", "randread", "4k", 16),
        ("2", "randwrite", "4k", 16),
        ("2", "read", "128k", 4),
    ] {
        let json = d.path().join(format!("perf-{nsid}-{wl}.json"));
        let q = qd.to_string();
        let v = run_json(
            &[
                "perf",
                "--traddr",
                &addr,
                "--subnqn",
                "nqn.2026-12.io.nvseal:little",
                "--hostnqn",
                "nqn.2026-12.io.nvseal:little-host",
                "--nsid",
                nsid,
                "-w",
                wl,
                "-o",
                size,
                "-q",
                &q,
                "-t",
                "2",
                "--no-pin",
                "--no-progress",
            ],
            &json,
        );
        assert_eq!(v["global_options"]["numjobs"], 1, "{v}");
        let job = &v["jobs"][0];
        let dir = if wl.contains("read") { "read" } else { "write" };
        check(
            &format!("perf nsid {nsid} {wl} {size} QD{qd}"),
            job[dir]["clat_ns"]["mean"].as_f64().unwrap() / 1000.0,
            job[dir]["iops"].as_f64().unwrap(),
            f64::from(qd),
        );
    }
    serve.stop();
}
