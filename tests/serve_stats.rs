//! Per-namespace I/O stats end to end on the real binary: `nvseal serve` on two reactors exports
//! two namespaces; nvseal's NVMe/TCP host runs a known number of reads and writes on two I/O
//! queues (which land on different reactors), one of which closes before the stats are read;
//! `stats.namespaces` reports the exact counts, ordered percentiles and base64 HDR histograms
//! that decode to the same counts; `stats.prometheus` carries the counters; `stats.reset` zeroes
//! them.

mod common;

use base64::Engine;
use common::serve::{addr_of, Serve};
use nvseal::nvme::connect;
use nvseal::nvmf::host::{HostConfig, HostQpair};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2026-11.io.nvseal:stats";
const BS: u32 = 4096;

fn host_cfg() -> HostConfig {
    HostConfig {
        hostnqn: "nqn.2014-08.org.nvmexpress:uuid:stats-test-host".into(),
        queue_depth: 16,
        ..Default::default()
    }
}

/// Runs one I/O to completion; returns whether it succeeded.
fn io(q: &mut HostQpair, write: bool, nsid: u32, lba: u64) -> bool {
    if write {
        let data = vec![(lba as u8) ^ (nsid as u8); BS as usize];
        q.write(nsid, lba, &data, BS, 1).unwrap();
    } else {
        q.read(nsid, lba, 1, BS, 1).unwrap();
    }
    let mut out = None;
    let t0 = Instant::now();
    while out.is_none() {
        q.poll(&mut |c| out = Some(c.cqe.status().is_success()))
            .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(20), "I/O timed out");
    }
    out.unwrap()
}

fn rpc(sock: &Path, method: &str) -> Value {
    nvseal::rpc::client::call(sock, method, Some(json!({})))
        .unwrap_or_else(|e| panic!("{method}: {e}"))
}

fn ns(v: &Value, nsid: u32) -> &Value {
    v["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["nqn"] == NQN && n["nsid"] == nsid)
        .unwrap_or_else(|| panic!("no nsid {nsid} in {v}"))
}

/// Checks one op's counters, percentiles and histogram.
fn check_op(v: &Value, nsid: u32, op: &str, ios: u64, bytes: u64, errors: u64) {
    let o = &ns(v, nsid)["ops"][op];
    assert_eq!(o["ios"], ios, "nsid {nsid} {op}: {o}");
    assert_eq!(o["bytes"], bytes, "nsid {nsid} {op}: {o}");
    assert_eq!(o["errors"], errors, "nsid {nsid} {op}: {o}");
    let l = &o["latency_us"];
    let p: Vec<f64> = ["min", "p50", "p90", "p99", "p99_9", "p99_99", "max"]
        .iter()
        .map(|k| l[*k].as_f64().unwrap())
        .collect();
    assert!(p.windows(2).all(|w| w[0] <= w[1]), "nsid {nsid} {op}: {l}");
    if ios > 0 {
        assert!(p[0] > 0.0, "a latency is never 0: {l}");
        assert!(o["iops"].as_f64().unwrap() > 0.0);
        let mean = l["mean"].as_f64().unwrap();
        assert!(p[0] <= mean && mean <= p[6], "{l}");
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(o["histogram"].as_str().unwrap())
        .unwrap();
    let h: hdrhistogram::Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
        .deserialize(&mut raw.as_slice())
        .unwrap();
    assert_eq!(h.len(), ios, "nsid {nsid} {op}: histogram count");
    if ios > 0 {
        // The histogram is in ns, the report in µs.
        let max_us = h.max() as f64 / 1000.0;
        assert!(
            (max_us - p[6]).abs() <= 0.01 * p[6] + 0.01,
            "{max_us} vs {l}"
        );
    }
}

#[test]
fn serve_reports_per_namespace_stats_over_the_control_socket() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let d = dir.path();
    let cfg = d.join("stats.yaml");
    let sock = d.join("rpc.sock");
    std::fs::write(
        &cfg,
        format!(
            "reactor:\n  cores: 2\n  pin: false\n  idle_backoff_us: 20\n\
             rpc:\n  socket_path: {sock}\n  audit_log: {audit}\n\
             bdevs:\n  - name: mem0\n    type: malloc\n    size_bytes: 4194304\n\
             \x20 - name: mem1\n    type: malloc\n    size_bytes: 4194304\n\
             subsystems:\n  - nqn: {NQN}\n    serial: STATS1\n    allowed_hosts: [\"nqn.2014-08.org.nvmexpress:uuid:stats-test-host\"]\n    namespaces:\n      - nsid: 1\n        bdev: mem0\n      - nsid: 2\n        bdev: mem1\n    listen:\n      - addr: 127.0.0.1\n        port: 0\n",
            sock = sock.display(),
            audit = d.join("audit.jsonl").display(),
        ),
    )
    .unwrap();
    let mut s = Serve::start(&cfg);
    let addr = addr_of(&s.wait_for("NVMe/TCP listening"));
    s.wait_for("control socket listening");

    // Nothing yet: no namespace has been used.
    let v = rpc(&sock, "stats.namespaces");
    assert_eq!(v["namespaces"], json!([]), "{v}");

    let mut admin = HostQpair::connect(addr, NQN, 0, connect::CNTLID_DYNAMIC, host_cfg()).unwrap();
    admin.enable().unwrap();
    let (blocks2, bs2) = admin.namespace_geometry(2).unwrap();
    assert_eq!(bs2, BS);
    // Round robin over two reactors: admin, q1 and q2 do not all share one.
    let mut q1 = HostQpair::connect(addr, NQN, 1, admin.cntlid(), host_cfg()).unwrap();
    let mut q2 = HostQpair::connect(addr, NQN, 2, admin.cntlid(), host_cfg()).unwrap();
    for i in 0..5 {
        assert!(io(&mut q1, true, 1, i,));
    }
    for i in 0..7 {
        assert!(io(&mut q1, false, 1, i));
    }
    for i in 0..3 {
        assert!(io(&mut q2, false, 1, i));
    }
    for i in 0..4 {
        assert!(io(&mut q2, true, 2, i));
    }
    for i in 0..6 {
        assert!(io(&mut q2, false, 2, i));
    }
    assert!(!io(&mut q2, false, 2, blocks2), "read past the end fails");
    // q2 closes: what it recorded stays with its reactor.
    drop(q2);
    std::thread::sleep(Duration::from_millis(200));

    let v = rpc(&sock, "stats.namespaces");
    assert_eq!(v["namespaces"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["histogram_unit"], "ns");
    check_op(&v, 1, "read", 10, 10 * 4096, 0);
    check_op(&v, 1, "write", 5, 5 * 4096, 0);
    check_op(&v, 1, "flush", 0, 0, 0);
    check_op(&v, 2, "read", 7, 6 * 4096, 1);
    check_op(&v, 2, "write", 4, 4 * 4096, 0);
    assert!(v["elapsed_s"].as_f64().unwrap() > 0.0);

    let p = rpc(&sock, "stats.prometheus");
    let text = p["text"].as_str().unwrap();
    for (nsid, op, n) in [
        (1, "read", 10),
        (1, "write", 5),
        (2, "read", 7),
        (2, "write", 4),
    ] {
        let line = format!("nvseal_ios_total{{subnqn=\"{NQN}\",nsid=\"{nsid}\",op=\"{op}\"}} {n}");
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    assert!(text.contains(&format!(
        "nvseal_io_errors_total{{subnqn=\"{NQN}\",nsid=\"2\",op=\"read\"}} 1"
    )));

    // A reset zeroes the counters; recording goes on.
    let r = rpc(&sock, "stats.reset");
    assert_eq!(r["reset"], true);
    assert!(io(&mut q1, false, 1, 0));
    let v = rpc(&sock, "stats.namespaces");
    check_op(&v, 1, "read", 1, 4096, 0);
    check_op(&v, 1, "write", 0, 0, 0);
    check_op(&v, 2, "read", 0, 0, 0);

    drop(q1);
    drop(admin);
    s.stop();
}

/// `stats.reactors` carries raw busy/idle time, and `nvseal perf --target-rpc` turns it into the
/// target's busy % and CPU µs per I/O for each side of an A/B run (what the perf matrix reports
/// next to its own reactor's). A socket that does not answer is a warning, not a failed run.
#[test]
fn perf_reports_the_target_reactors_busy_time_per_side() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let d = dir.path();
    let cfg = d.join("busy.yaml");
    let sock = d.join("rpc.sock");
    std::fs::write(
        &cfg,
        format!(
            "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 0\n\
             rpc:\n  socket_path: {sock}\n\
             bdevs:\n  - {{ name: n0, type: null, size_bytes: 1073741824 }}\n\
             \x20 - {{ name: n1, type: null, size_bytes: 1073741824 }}\n\
             \x20 - {{ name: n1c, type: crypto, base: n1, key: ephemeral }}\n\
             subsystems:\n  - nqn: {NQN}\n    serial: BUSY1\n    allowed_hosts: [\"nqn.2014-08.org.nvmexpress:uuid:stats-test-host\"]\n    namespaces:\n      - {{ nsid: 1, bdev: n0 }}\n      - {{ nsid: 2, bdev: n1c, encrypted: true }}\n    listen:\n      - addr: 127.0.0.1\n        port: 0\n",
            sock = sock.display(),
        ),
    )
    .unwrap();
    let mut s = Serve::start(&cfg);
    let addr = addr_of(&s.wait_for("NVMe/TCP listening"));
    s.wait_for("control socket listening");

    let v = rpc(&sock, "stats.reactors");
    let r0 = &v["reactors"][0];
    assert!(r0["busy_ns"].as_u64().is_some(), "{v}");
    assert!(r0["idle_ns"].as_u64().unwrap() > 0, "{v}");

    let perf = |rpc_path: &Path, json: &Path| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_nvseal"))
            .args([
                "perf",
                "--traddr",
                &addr.to_string(),
                "--subnqn",
                NQN,
                "--hostnqn",
                "nqn.2014-08.org.nvmexpress:uuid:stats-test-host",
                "--ab",
            ])
            .args([
                "-w", "randread", "-o", "4k", "-q", "8", "-t", "1", "--slice", "250ms",
            ])
            .args(["--no-pin", "--no-progress", "--cores", "0", "--target-rpc"])
            .arg(rpc_path)
            .arg("--json")
            .arg(json)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let j: Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
        (
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
            j,
        )
    };
    let (table, _, j) = perf(&sock, &d.join("a.json"));
    assert!(table.contains("target busy %"), "{table}");
    assert!(table.contains("target cpu us/io"), "{table}");
    for job in j["jobs"].as_array().unwrap() {
        let busy = job["target_busy_pct"].as_f64().unwrap();
        // A spinning reactor that served I/O: some busy time, never more than all of it.
        assert!(busy > 0.0 && busy <= 100.0, "{job}");
        assert!(job["target_cpu_us_per_io"].as_f64().unwrap() > 0.0, "{job}");
    }
    assert!(
        j["ratio_b_over_a"]["target_cpu_us_per_io"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    // No socket there: the run still succeeds, says why once, and reports no target figures.
    let (table, err, j) = perf(&d.join("missing.sock"), &d.join("b.json"));
    assert!(err.contains("target busy time"), "{err}");
    assert!(!table.contains("target busy %"), "{table}");
    assert!(j["jobs"][0].get("target_busy_pct").is_none(), "{j}");
    s.stop();
}
