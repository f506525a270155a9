//! In steady state a `nvseal perf` run allocates nothing — on its reactors (the I/O path), on
//! its control thread (progress, phase wait), nor on the in-process target's poll thread serving
//! it — for plain reads, plain writes (in-capsule and R2T/H2CData), encrypted writes with
//! digests, and verify. A process-wide counting allocator is read between two progress reports.
//! The target's connections record every I/O in their thread's per-namespace latency stats
//! (`nvseal::stats::reactor`), so the window also covers that recording.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nvseal::bdev::malloc::{self, MallocConfig};
use nvseal::bdev::Bdev;
use nvseal::crypto::bdev::{CryptoBdev, DataKey};
use nvseal::crypto::key::XtsKey;
use nvseal::nvmf::pdu::Digests;
use nvseal::nvmf::{
    Connection, Limits, ListenAddr, Listener, NamespaceConfig, SubsystemConfig, Target,
};
use nvseal::reactor::ReactorOptions;
use nvseal::stats::OpClass;
use nvseal::tools::bdevperf::{JobSpec, Workload};
use nvseal::tools::nvmeperf::{self, PerfConfig, TargetSpec};
use nvseal::types::CoreId;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call unchanged to the system allocator; the counter is a static atomic,
// which needs no allocation to update.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const NQN: &str = "nqn.2026-01.io.nvseal:noalloc";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000a110";

fn malloc_bdev(name: &str) -> Arc<dyn Bdev> {
    let cfg: MallocConfig = serde_yaml_ng::from_str(&format!(
        "name: {name}\nsize_bytes: 16777216\nblock_size: 4096\n"
    ))
    .unwrap();
    malloc::open(&cfg).unwrap()
}

#[test]
fn steady_state_allocates_nothing() {
    let before = ALLOCS.load(Ordering::Relaxed);
    let v: Vec<u8> = Vec::with_capacity(10);
    assert!(
        ALLOCS.load(Ordering::Relaxed) > before,
        "the counter must count"
    );
    drop(v);
    let key = DataKey::new(&XtsKey::generate().unwrap(), None).unwrap();
    let mut bdevs: HashMap<String, Arc<dyn Bdev>> = HashMap::new();
    bdevs.insert("p".into(), malloc_bdev("p"));
    bdevs.insert(
        "e".into(),
        Arc::new(CryptoBdev::new("e", malloc_bdev("b"), key, false).unwrap()),
    );
    let ns = |nsid, bdev: &str| NamespaceConfig {
        nsid,
        bdev: bdev.into(),
        encrypted: Some(nsid == 2),
    };
    let cfg = SubsystemConfig {
        nqn: NQN.into(),
        serial: "NOALLOC".into(),
        model: "nvseal".into(),
        namespaces: vec![ns(1, "p"), ns(2, "e")],
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
    let s2 = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut conns: Vec<Connection> = Vec::with_capacity(16);
        while !s2.load(Ordering::Acquire) {
            if let Some(s) = listener.poll_accept() {
                if let Ok(c) = Connection::new(s, target.clone(), CoreId(0), port) {
                    conns.push(c);
                }
            }
            for c in conns.iter_mut() {
                c.poll();
            }
            conns.retain(|c| !c.is_closed());
        }
        drop(conns);
        nvseal::stats::reactor::snapshot()
    });
    let cases = [
        ("randread 4k", 1, Workload::Randread, 4096, false, false),
        (
            "randwrite 4k in-capsule",
            1,
            Workload::Randwrite,
            4096,
            false,
            false,
        ),
        (
            "write 64k R2T, encrypted, digests",
            2,
            Workload::Write,
            65536,
            true,
            false,
        ),
        (
            "verify 16k, encrypted",
            2,
            Workload::Randrw,
            16384,
            false,
            true,
        ),
    ];
    for (name, nsid, workload, io_size, digests, verify) in cases {
        let cfg = PerfConfig {
            target: TargetSpec {
                addr,
                subnqn: NQN.into(),
                hostnqn: HOST.into(),
                hostid: [1; 16],
                digests: Digests {
                    header: digests,
                    data: digests,
                },
                kato_ms: 0,
                timeout: Duration::from_secs(10),
            },
            cores: vec![CoreId(0)],
            queues_per_core: 2,
            spec: JobSpec {
                workload,
                rwmixread: 50,
                io_size,
                queue_depth: 8,
                verify,
                seed: 5,
            },
            time: Duration::from_millis(3500),
            io_count: None,
            nsids: vec![nsid],
            slice: Duration::from_secs(1),
            reactor: ReactorOptions {
                pin: false,
                ..ReactorOptions::default()
            },
            target_rpc: None,
            fua: false,
            idle_connections: 0,
        };
        // Progress comes every ~500 ms: compare the counter at the 2nd and the 5th report.
        let mut calls = 0;
        let mut window = [0u64; 2];
        let mut ios = [0u64; 2];
        let out = nvmeperf::run(&cfg, &mut |p| {
            calls += 1;
            if calls == 2 {
                window[0] = ALLOCS.load(Ordering::Relaxed);
                ios[0] = p.side_ios;
            } else if calls == 5 {
                window[1] = ALLOCS.load(Ordering::Relaxed);
                ios[1] = p.side_ios;
            }
        })
        .unwrap();
        assert_eq!(out.failures(), 0, "{name}");
        assert!(calls >= 5, "{name}: only {calls} progress reports");
        let n = ios[1] - ios[0];
        assert!(n > 100, "{name}: only {n} I/Os in the window");
        assert_eq!(
            window[1] - window[0],
            0,
            "{name}: allocations during {n} steady-state I/Os"
        );
    }
    stop.store(true, Ordering::Release);
    let stats = thread.join().unwrap();
    // The I/Os of the window above were recorded (and survive their connections).
    let ios = |nsid: u32, op: OpClass| {
        stats
            .iter()
            .find(|s| s.nqn == NQN && s.nsid == nsid)
            .map_or(0, |s| s.stats.op(op).latency_ns.len())
    };
    for (nsid, op) in [
        (1, OpClass::Read),
        (1, OpClass::Write),
        (2, OpClass::Write),
        (2, OpClass::Read),
    ] {
        assert!(
            ios(nsid, op) > 100,
            "nsid {nsid} {op:?}: {} recorded",
            ios(nsid, op)
        );
    }
}
