//! `nvseal perf` end to end: an in-process NVMe/TCP target (Listener + Connections polled on a
//! thread) serving a plaintext `malloc` namespace, an encrypted one (crypto bdev over another
//! malloc), and a namespace that corrupts reads (to show verify catches it); the perf engine runs
//! against it as a library call and as the real binary.

mod common;

use common::host::read_blocks;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvseal::bdev::malloc::{self, MallocConfig};
use nvseal::bdev::{Bdev, BdevChannel, BdevError, BdevIo, IoStatus, IoType, Submit};
use nvseal::crypto::bdev::{CryptoBdev, DataKey};
use nvseal::crypto::key::XtsKey;
use nvseal::nvme::connect;
use nvseal::nvmf::host::{HostConfig, HostQpair};
use nvseal::nvmf::pdu::Digests;
use nvseal::nvmf::{
    Connection, Limits, ListenAddr, Listener, NamespaceConfig, SubsystemConfig, Target,
};
use nvseal::reactor::ReactorOptions;
use nvseal::stats::OpClass;
use nvseal::tools::bdevperf::{JobSpec, Workload};
use nvseal::tools::nvmeperf::{self, PerfConfig, PerfError, TargetSpec};
use nvseal::types::CoreId;

const NQN: &str = "nqn.2026-01.io.nvseal:perf-test";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:0f0f0f0f-1111-2222-3333-444444444444";

// ------------------------------------------------------------------------------------------------
// A bdev that flips one byte of every read (over a real malloc bdev): verify must notice.

struct FlipBdev {
    inner: Arc<dyn Bdev>,
}

struct FlipChannel {
    inner: Box<dyn BdevChannel>,
}

impl Bdev for FlipBdev {
    fn name(&self) -> &str {
        "flip"
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks()
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        self.inner.io_type_supported(t)
    }
    fn buf_align(&self) -> usize {
        self.inner.buf_align()
    }
    fn open_channel(&self, core: CoreId, qd: usize) -> Result<Box<dyn BdevChannel>, BdevError> {
        Ok(Box::new(FlipChannel {
            inner: self.inner.open_channel(core, qd)?,
        }))
    }
}

impl BdevChannel for FlipChannel {
    fn submit(&mut self, io: BdevIo) -> Submit {
        self.inner.submit(io)
    }
    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        self.inner.poll(&mut |mut io| {
            if io.io_type == IoType::Read && io.status == IoStatus::Success {
                if let Some(b) = io.buf.as_mut() {
                    b.as_mut_slice()[100] ^= 0x01;
                }
            }
            done(io)
        })
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
}

// ------------------------------------------------------------------------------------------------
// Target harness.

struct Harness {
    addr: SocketAddr,
    target: Arc<Target>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn malloc_bdev(name: &str, mib: u64) -> Arc<dyn Bdev> {
    let cfg: MallocConfig = serde_yaml_ng::from_str(&format!(
        "name: {name}\nsize_bytes: {}\nblock_size: 4096\n",
        mib << 20
    ))
    .unwrap();
    malloc::open(&cfg).unwrap()
}

/// nsid 1 plaintext malloc, nsid 2 crypto over malloc, nsid 3 read-corrupting malloc.
fn start(allowed: Vec<String>) -> Harness {
    let plain = malloc_bdev("plain0", 16);
    let base = malloc_bdev("base1", 16);
    let key = DataKey::new(&XtsKey::generate().unwrap(), None).unwrap();
    let enc: Arc<dyn Bdev> = Arc::new(CryptoBdev::new("enc1", base, key, false).unwrap());
    let flip: Arc<dyn Bdev> = Arc::new(FlipBdev {
        inner: malloc_bdev("flipbase", 4),
    });
    let mut bdevs: HashMap<String, Arc<dyn Bdev>> = HashMap::new();
    bdevs.insert("plain0".into(), plain);
    bdevs.insert("enc1".into(), enc);
    bdevs.insert("flip".into(), flip);
    let ns = |nsid, bdev: &str, encrypted| NamespaceConfig {
        nsid,
        bdev: bdev.into(),
        encrypted: Some(encrypted),
    };
    let cfg = SubsystemConfig {
        nqn: NQN.into(),
        serial: "NVSEALPERF01".into(),
        model: "nvseal perf test".into(),
        namespaces: vec![
            ns(1, "plain0", false),
            ns(2, "enc1", true),
            ns(3, "flip", false),
        ],
        allowed_hosts: allowed,
        allow_any_host: false,
        listen: vec![ListenAddr {
            addr: "127.0.0.1".into(),
            port: 4420,
        }],
    };
    let target = Target::new(&[cfg], Limits::default(), &bdevs).unwrap();
    let port = target.port_for("127.0.0.1:4420".parse().unwrap()).unwrap();
    let mut listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (t2, s2) = (Arc::clone(&target), Arc::clone(&stop));
    let thread = std::thread::spawn(move || {
        let mut conns: Vec<Connection> = Vec::new();
        while !s2.load(Ordering::Acquire) {
            let mut work = 0;
            if let Some(s) = listener.poll_accept() {
                if let Ok(c) = Connection::new(s, Arc::clone(&t2), CoreId(0), port) {
                    conns.push(c);
                }
                work += 1;
            }
            for c in conns.iter_mut() {
                work += c.poll();
            }
            conns.retain(|c| !c.is_closed());
            if work == 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    });
    Harness {
        addr,
        target,
        stop,
        thread: Some(thread),
    }
}

fn lib_config(h: &Harness, nsids: Vec<u32>, spec: JobSpec) -> PerfConfig {
    PerfConfig {
        target: TargetSpec {
            addr: h.addr,
            subnqn: NQN.into(),
            hostnqn: HOST.into(),
            hostid: [7; 16],
            digests: Digests::default(),
            kato_ms: 0,
            timeout: Duration::from_secs(10),
        },
        cores: vec![CoreId(0)],
        queues_per_core: 1,
        spec,
        time: Duration::from_secs(1),
        io_count: None,
        nsids,
        slice: Duration::from_millis(250),
        reactor: ReactorOptions {
            pin: false,
            ..ReactorOptions::default()
        },
        target_rpc: None,
        fua: false,
        idle_connections: 0,
    }
}

fn spec(workload: Workload, io_size: usize, qd: usize, verify: bool) -> JobSpec {
    JobSpec {
        workload,
        rwmixread: 50,
        io_size,
        queue_depth: qd,
        verify,
        seed: 11,
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn perf_bin(h: &Harness, args: &[&str]) -> Output {
    let addr = h.addr.to_string();
    Command::new(env!("CARGO_BIN_EXE_nvseal"))
        .args([
            "perf",
            "--traddr",
            &addr,
            "--hostnqn",
            HOST,
            "--no-pin",
            "--no-progress",
        ])
        .args(args)
        .output()
        .expect("run nvseal perf")
}

fn json_of(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

// ------------------------------------------------------------------------------------------------
// Library calls.

#[test]
fn library_ab_verify_passes_on_plain_and_encrypted_namespaces() {
    let h = start(vec![HOST.into()]);
    let mut cfg = lib_config(&h, vec![1, 2], spec(Workload::Randrw, 8192, 8, true));
    cfg.queues_per_core = 2;
    cfg.io_count = Some(300);
    let out = nvmeperf::run(&cfg, &mut |_| {}).unwrap();
    assert_eq!(
        out.failures(),
        0,
        "{:?}",
        out.sides.iter().map(|s| &s.first_error).collect::<Vec<_>>()
    );
    assert_eq!(out.sides.len(), 2);
    assert_eq!(out.queues, 2);
    for s in &out.sides {
        // Every verify I/O is one write then one read of the same blocks: 300 per queue.
        assert_eq!(s.stats.op(OpClass::Write).ios, 600, "{}", s.label);
        assert_eq!(s.stats.op(OpClass::Read).ios, 600, "{}", s.label);
        assert_eq!(s.stats.op(OpClass::Read).bytes, 600 * 8192);
    }
    assert_eq!(out.namespaces[1].block_size, 4096);
    assert_eq!(out.namespaces[1].num_blocks, 4096);
    let r = nvmeperf::report(&cfg, &out);
    assert_eq!(r.jobs.len(), 2);
    assert_eq!(
        (r.jobs[0].jobname.as_str(), r.jobs[1].jobname.as_str()),
        ("a", "b")
    );
    assert!(r.ratio_b_over_a.as_ref().is_some_and(|x| x.iops > 0.0));
    assert_eq!(r.controller.serial, "NVSEALPERF01");
    assert_eq!(r.controller.mdts_bytes, Some(128 * 1024));
    // Every queue pair and the admin queue were closed by the host.
    wait_until("connections to close", || h.target.connection_count() == 0);
}

/// Reads `nlb` 4 KiB blocks at `lba` of `nsid` with nvseal's host, one command of at most 128 KiB.
fn read_back(h: &Harness, nsid: u32, lba: u64, nlb: u32) -> Vec<u8> {
    let hc = HostConfig {
        hostnqn: HOST.into(),
        ..Default::default()
    };
    let mut admin =
        HostQpair::connect(h.addr, NQN, 0, connect::CNTLID_DYNAMIC, hc.clone()).unwrap();
    admin.enable().unwrap();
    let mut q = HostQpair::connect(h.addr, NQN, 1, admin.cntlid(), hc).unwrap();
    let mut out = Vec::new();
    for chunk in 0..nlb.div_ceil(32) {
        let n = 32.min(nlb - chunk * 32);
        out.extend(read_blocks(
            &mut q,
            nsid,
            lba + u64::from(chunk * 32),
            n,
            4096,
        ));
    }
    out
}

#[test]
fn library_ios_over_mdts_are_split_into_mdts_commands() {
    let h = start(vec![HOST.into()]);
    // 512 KiB I/Os against a 128 KiB MDTS: 4 commands each, on both namespaces, with digests
    // and verify. The target refuses any command over its MDTS, so a clean run means split.
    let mut cfg = lib_config(&h, vec![1, 2], spec(Workload::Randrw, 512 << 10, 4, true));
    cfg.target.digests = Digests {
        header: true,
        data: true,
    };
    cfg.io_count = Some(24);
    let out = nvmeperf::run(&cfg, &mut |_| {}).unwrap();
    assert_eq!(
        out.failures(),
        0,
        "{:?}",
        out.sides.iter().map(|s| &s.first_error).collect::<Vec<_>>()
    );
    assert_eq!(out.commands_per_io, 4);
    for s in &out.sides {
        // I/Os are counted whole: 24 verified writes and 24 read-backs of 512 KiB.
        assert_eq!(s.stats.op(OpClass::Write).ios, 24, "{}", s.label);
        assert_eq!(s.stats.op(OpClass::Read).ios, 24, "{}", s.label);
        assert_eq!(s.stats.op(OpClass::Read).bytes, 24 * (512 << 10));
    }
    let r = nvmeperf::report(&cfg, &out);
    assert_eq!(r.global_options.commands_per_io, 4);

    // Sequential 384 KiB writes (3 commands each) from LBA 0: the namespace holds the pattern
    // exactly where each piece was aimed, read back in other-sized commands.
    let mut cfg = lib_config(&h, vec![1], spec(Workload::Write, 384 << 10, 2, true));
    cfg.io_count = Some(5);
    let out = nvmeperf::run(&cfg, &mut |_| {}).unwrap();
    assert_eq!(out.failures(), 0, "{:?}", out.sides[0].first_error);
    assert_eq!(out.commands_per_io, 3);
    let blocks = 5 * 96;
    let got = read_back(&h, 1, 0, blocks);
    let mut want = vec![0u8; blocks as usize * 4096];
    nvseal::tools::bdevperf::fill_pattern(&mut want, 0, 4096, 11);
    assert!(
        got == want,
        "the split writes did not land where they belong"
    );
    wait_until("connections to close", || h.target.connection_count() == 0);
}

#[test]
fn split_sizes() {
    // Under or at MDTS: one command. Over: MDTS-sized pieces, rounded down to whole blocks.
    assert_eq!(
        nvmeperf::split_io(4096, Some(131072), 4096).unwrap(),
        (4096, 1)
    );
    assert_eq!(
        nvmeperf::split_io(131072, Some(131072), 4096).unwrap(),
        (131072, 1)
    );
    assert_eq!(
        nvmeperf::split_io(1 << 20, Some(131072), 4096).unwrap(),
        (131072, 8)
    );
    assert_eq!(
        nvmeperf::split_io(300 * 512, Some(65536), 512).unwrap(),
        (65536, 3)
    );
    assert_eq!(
        nvmeperf::split_io(1 << 20, None, 4096).unwrap(),
        (1 << 20, 1)
    );
    assert!(nvmeperf::split_io(8192, Some(2048), 4096).is_err());
}

#[test]
fn library_randrw_with_digests_over_two_reactors() {
    let h = start(vec![HOST.into()]);
    let mut cfg = lib_config(&h, vec![2], spec(Workload::Randrw, 16384, 16, false));
    cfg.cores = vec![CoreId(0), CoreId(1)];
    cfg.queues_per_core = 2;
    cfg.io_count = Some(500);
    cfg.target.digests = Digests {
        header: true,
        data: true,
    };
    let mut progress_calls = 0;
    let out = nvmeperf::run(&cfg, &mut |_| progress_calls += 1).unwrap();
    assert_eq!(out.failures(), 0);
    let s = &out.sides[0];
    assert_eq!(s.stats.total_ios(), 4 * 500);
    assert!(s.stats.op(OpClass::Read).ios > 0 && s.stats.op(OpClass::Write).ios > 0);
    assert!(out.controller.header_digest && out.controller.data_digest);
    assert_eq!(out.controller.io_queues_granted, 4);
    let _ = progress_calls;
}

#[test]
fn library_verify_reports_corrupted_reads() {
    let h = start(vec![HOST.into()]);
    let mut cfg = lib_config(&h, vec![3], spec(Workload::Write, 4096, 4, true));
    cfg.io_count = Some(50);
    let out = nvmeperf::run(&cfg, &mut |_| {}).unwrap();
    assert_eq!(out.sides[0].verify_mismatches, 50);
    assert!(out.sides[0]
        .first_error
        .as_deref()
        .is_some_and(|e| e.contains("verify") && e.contains("nsid 3")));
}

#[test]
fn library_refusals_are_connect_errors() {
    let h = start(vec![HOST.into()]);
    let mut cfg = lib_config(&h, vec![1], spec(Workload::Read, 4096, 4, false));
    cfg.target.subnqn = "nqn.2026-01.io.nvseal:nope".into();
    match nvmeperf::run(&cfg, &mut |_| {}) {
        Err(PerfError::Connect(m)) => assert!(m.contains("no subsystem"), "{m}"),
        other => panic!("expected a connect error, got {:?}", other.err()),
    }
    let mut cfg = lib_config(&h, vec![1], spec(Workload::Read, 4096, 4, false));
    cfg.target.hostnqn =
        "nqn.2014-08.org.nvmexpress:uuid:99999999-0000-0000-0000-000000000000".into();
    match nvmeperf::run(&cfg, &mut |_| {}) {
        Err(PerfError::Connect(m)) => assert!(m.contains("not allowed"), "{m}"),
        other => panic!("expected a connect error, got {:?}", other.err()),
    }
    // Namespace 9 does not exist: a usage error, and the controller is let go cleanly.
    let cfg = lib_config(&h, vec![9], spec(Workload::Read, 4096, 4, false));
    assert!(matches!(
        nvmeperf::run(&cfg, &mut |_| {}),
        Err(PerfError::Usage(_))
    ));
    wait_until("connections to close", || h.target.connection_count() == 0);
}

#[test]
fn library_target_going_away_fails_the_run() {
    let h = start(vec![HOST.into()]);
    let mut cfg = lib_config(&h, vec![1], spec(Workload::Randread, 4096, 8, false));
    cfg.time = Duration::from_secs(20);
    let stop = h.stop.clone();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        stop.store(true, Ordering::Release);
    });
    let t0 = Instant::now();
    let out = nvmeperf::run(&cfg, &mut |_| {}).unwrap();
    killer.join().unwrap();
    // The queue pair saw the connection go: the run ends early and fails, it does not hang.
    assert!(out.failures() > 0);
    assert!(out.sides[0]
        .first_error
        .as_deref()
        .is_some_and(|e| e.contains("I/O queue 1")));
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t0.elapsed()
    );
}

// ------------------------------------------------------------------------------------------------
// The binary.

#[test]
fn binary_ab_verify_json_has_both_sides_and_ratios() {
    let h = start(vec![HOST.into()]);
    let o = perf_bin(
        &h,
        &[
            "--subnqn", NQN, "--ab", "--nsid-a", "1", "--nsid-b", "2", "-w", "randrw", "-o", "4k",
            "-q", "16", "-n", "400", "--verify", "--json", "-",
        ],
    );
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let j = json_of(&o);
    let jobs = j["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    for (job, (name, nsid)) in jobs.iter().zip([("a", 1), ("b", 2)]) {
        assert_eq!(job["jobname"], name);
        assert_eq!(job["nsid"], nsid);
        assert_eq!(job["verify_mismatches"], 0);
        assert_eq!(job["io_errors"], 0);
        assert_eq!(job["read"]["total_ios"], 400);
        assert_eq!(job["write"]["total_ios"], 400);
        assert!(job["read"]["iops"].as_f64().unwrap() > 0.0);
        assert!(job["read"]["bw_bytes"].as_u64().unwrap() > 0);
        assert!(
            job["read"]["clat_ns"]["percentile"]["99.000000"]
                .as_u64()
                .unwrap()
                > 0
        );
        assert!(
            job["read"]["clat_ns"]["percentile"]["99.990000"]
                .as_u64()
                .unwrap()
                > 0
        );
    }
    assert!(j["ratio_b_over_a"]["iops"].as_f64().unwrap() > 0.0);
    assert!(j["ratio_b_over_a"]["clat_p99"].as_f64().unwrap() > 0.0);
    assert_eq!(j["global_options"]["rw"], "randrw");
    assert_eq!(j["global_options"]["iodepth"], 16);
}

#[test]
fn binary_table_shows_both_sides() {
    let h = start(vec![HOST.into()]);
    let o = perf_bin(
        &h,
        &[
            "--subnqn", NQN, "--ab", "-w", "randread", "-n", "200", "-q", "8",
        ],
    );
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "b/a",
        "nsid 1",
        "nsid 2",
        "lat p50 us",
        "lat p99 us",
        "lat p99.9 us",
        "IOPS",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}

#[test]
fn binary_wrong_subnqn_and_host_not_allowed_exit_3() {
    let h = start(vec![HOST.into()]);
    let o = perf_bin(&h, &["--subnqn", "nqn.2026-01.io.nvseal:wrong", "-n", "10"]);
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no subsystem nqn.2026-01.io.nvseal:wrong"),
        "{err}"
    );

    let addr = h.addr.to_string();
    let o = Command::new(env!("CARGO_BIN_EXE_nvseal"))
        .args([
            "perf", "--traddr", &addr, "--subnqn", NQN, "-n", "10", "--no-pin",
        ])
        .args([
            "--hostnqn",
            "nqn.2014-08.org.nvmexpress:uuid:12345678-0000-0000-0000-000000000000",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is not allowed on subsystem"), "{err}");

    // Nothing listening: also a start-up failure (once the connect timeout has passed: perf
    // retries a refused connection until then).
    drop(h);
    let o = Command::new(env!("CARGO_BIN_EXE_nvseal"))
        .args([
            "perf", "--traddr", &addr, "--subnqn", NQN, "-n", "10", "--no-pin",
        ])
        .args(["--connect-timeout", "300ms"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
}

#[test]
fn binary_usage_errors_exit_2() {
    let h = start(vec![HOST.into()]);
    // Over MDTS (128 KiB on this target) the I/O is split: 1 MiB = 8 commands, and QD 32 x 8
    // is over the 128 queue entries this target allows.
    let o = perf_bin(&h, &["--subnqn", NQN, "-o", "1m", "-q", "32", "-n", "10"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("8 commands per I/O") && err.contains("MQES"),
        "{err}"
    );
    // Deeper than CAP.MQES allows.
    let o = perf_bin(&h, &["--subnqn", NQN, "-q", "4096", "-n", "10"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("MQES"));
    wait_until("connections to close", || h.target.connection_count() == 0);
}

#[test]
fn binary_verify_mismatch_exits_1() {
    let h = start(vec![HOST.into()]);
    let o = perf_bin(
        &h,
        &[
            "--subnqn", NQN, "--nsid", "3", "-w", "write", "-q", "4", "-n", "20", "--verify",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("verify: data read back from nsid 3"), "{err}");
}

#[test]
fn binary_time_limited_run_stops_on_time_with_keep_alive() {
    let h = start(vec![HOST.into()]);
    // KATO 800 ms over a 2 s run: without Keep Alive the target would drop the controller.
    let t0 = Instant::now();
    let o = perf_bin(
        &h,
        &[
            "--subnqn", NQN, "-w", "randread", "-q", "8", "-t", "2", "--kato", "800", "--json", "-",
        ],
    );
    let wall = t0.elapsed();
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let j = json_of(&o);
    let runtime = j["jobs"][0]["job_runtime"].as_u64().unwrap();
    assert!((2000..4000).contains(&runtime), "job_runtime {runtime} ms");
    assert!(wall < Duration::from_secs(30), "took {wall:?}");
    assert_eq!(j["jobs"][0]["io_errors"], 0);
    assert!(j["jobs"][0]["read"]["total_ios"].as_u64().unwrap() > 0);
    wait_until("connections to close", || h.target.connection_count() == 0);
}
