//! The measurement behind docs/perf.md's numbers, run by hand (ignored by default):
//! `cargo test --release --test perf_bench -- --ignored --nocapture`.
//!
//! An in-process nvseal target whose poll thread is pinned to one core (`PERF_TARGET_CORE`,
//! default 0) serves plaintext and encrypted namespaces over `malloc` and `null`; the perf
//! engine runs `--ab` on another core (`PERF_HOST_CORE`, default 1). It prints each run's table
//! and the target thread's busy share. It asserts only that every run completes without errors:
//! numbers depend on the machine and are reported, not tested.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nvseal::bdev::malloc::{self, MallocConfig};
use nvseal::bdev::null::{self, NullConfig};
use nvseal::bdev::Bdev;
use nvseal::crypto::bdev::{CryptoBdev, DataKey};
use nvseal::crypto::key::XtsKey;
use nvseal::nvmf::pdu::Digests;
use nvseal::nvmf::{
    Connection, Limits, ListenAddr, Listener, NamespaceConfig, SubsystemConfig, Target,
};
use nvseal::reactor::ReactorOptions;
use nvseal::sys::{affinity, clock};
use nvseal::tools::bdevperf::{JobSpec, Workload};
use nvseal::tools::nvmeperf::{self, PerfConfig, TargetSpec};
use nvseal::types::CoreId;

const NQN: &str = "nqn.2026-01.io.nvseal:bench";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-0000000000be";

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn crypto(name: &str, base: Arc<dyn Bdev>) -> Arc<dyn Bdev> {
    let key = DataKey::new(&XtsKey::generate().unwrap(), None).unwrap();
    Arc::new(CryptoBdev::new(name, base, key, false).unwrap())
}

#[test]
#[ignore = "benchmark: cargo test --release --test perf_bench -- --ignored --nocapture"]
fn loopback_ab_plain_vs_encrypted() {
    let target_core = CoreId(env_or("PERF_TARGET_CORE", 0));
    let host_core = CoreId(env_or("PERF_HOST_CORE", 1));
    let secs = env_or("PERF_SECS", 5) as u64;
    let repeats = env_or("PERF_REPEATS", 3);
    let size = 1u64 << 30;
    let m = |n: &str| -> Arc<dyn Bdev> {
        let c: MallocConfig = serde_yaml_ng::from_str(&format!(
            "name: {n}\nsize_bytes: {size}\nblock_size: 4096\n"
        ))
        .unwrap();
        malloc::open(&c).unwrap()
    };
    let z = |n: &str| -> Arc<dyn Bdev> {
        let c: NullConfig = serde_yaml_ng::from_str(&format!(
            "name: {n}\nsize_bytes: {}\nblock_size: 4096\n",
            64 * size
        ))
        .unwrap();
        null::open(&c).unwrap()
    };
    let mut bdevs: HashMap<String, Arc<dyn Bdev>> = HashMap::new();
    bdevs.insert("m0".into(), m("m0"));
    bdevs.insert("m1c".into(), crypto("m1c", m("m1")));
    bdevs.insert("n0".into(), z("n0"));
    bdevs.insert("n1c".into(), crypto("n1c", z("n1")));
    let ns = |nsid, bdev: &str, encrypted| NamespaceConfig {
        nsid,
        bdev: bdev.into(),
        encrypted: Some(encrypted),
    };
    let cfg = SubsystemConfig {
        nqn: NQN.into(),
        serial: "BENCH".into(),
        model: "nvseal bench".into(),
        namespaces: vec![
            ns(1, "m0", false),
            ns(2, "m1c", true),
            ns(3, "n0", false),
            ns(4, "n1c", true),
        ],
        allowed_hosts: vec![HOST.into()],
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
    let busy = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let (t2, s2, b2, tot2) = (target.clone(), stop.clone(), busy.clone(), total.clone());
    let thread = std::thread::spawn(move || {
        affinity::pin_current_thread(target_core).unwrap();
        let mut conns: Vec<Connection> = Vec::new();
        while !s2.load(Ordering::Relaxed) {
            let t0 = clock::ticks();
            let mut work = 0;
            if let Some(s) = listener.poll_accept() {
                if let Ok(c) = Connection::new(s, t2.clone(), target_core, port) {
                    conns.push(c);
                }
                work += 1;
            }
            for c in conns.iter_mut() {
                work += c.poll();
            }
            conns.retain(|c| !c.is_closed());
            let dt = clock::ticks().wrapping_sub(t0);
            if work > 0 {
                b2.fetch_add(dt, Ordering::Relaxed);
            }
            tot2.fetch_add(dt, Ordering::Relaxed);
        }
    });

    let runs: [(&str, Workload, usize, usize, u32, u32); 4] = [
        (
            "malloc 4k randread QD32",
            Workload::Randread,
            4096,
            32,
            1,
            2,
        ),
        ("malloc 128k read QD8", Workload::Read, 128 * 1024, 8, 1, 2),
        ("null 4k randread QD32", Workload::Randread, 4096, 32, 3, 4),
        ("null 128k read QD8", Workload::Read, 128 * 1024, 8, 3, 4),
    ];
    for (name, workload, io_size, qd, a, b) in runs {
        for rep in 0..repeats {
            let cfg = PerfConfig {
                target: TargetSpec {
                    addr,
                    subnqn: NQN.into(),
                    hostnqn: HOST.into(),
                    hostid: [0xbe; 16],
                    digests: Digests::default(),
                    kato_ms: 10_000,
                    timeout: Duration::from_secs(10),
                },
                cores: vec![host_core],
                queues_per_core: 1,
                spec: JobSpec {
                    workload,
                    rwmixread: 70,
                    io_size,
                    queue_depth: qd,
                    verify: false,
                    seed: 1 + rep as u64,
                },
                time: Duration::from_secs(secs),
                io_count: None,
                nsids: vec![a, b],
                slice: Duration::from_secs(1),
                reactor: ReactorOptions::default(),
                target_rpc: None,
                fua: false,
                idle_connections: 0,
            };
            let (b0, t0) = (busy.load(Ordering::Relaxed), total.load(Ordering::Relaxed));
            let out = nvmeperf::run(&cfg, &mut |_| {}).unwrap();
            let (b1, t1) = (busy.load(Ordering::Relaxed), total.load(Ordering::Relaxed));
            assert_eq!(out.failures(), 0, "{name}");
            let r = nvmeperf::report(&cfg, &out);
            let ratio = r.ratio_b_over_a.as_ref().map_or(0.0, |x| x.iops);
            println!(
                "\n== {name} (nsid {a} plain vs {b} encrypted), run {} of {repeats}: b/a IOPS {ratio:.3}, target busy {:.1}%",
                rep + 1,
                100.0 * (b1 - b0) as f64 / (t1 - t0).max(1) as f64
            );
            nvmeperf::print_text(&mut std::io::stdout(), &out);
        }
    }
    stop.store(true, Ordering::Relaxed);
    thread.join().unwrap();
}
