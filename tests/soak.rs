//! Soak: the real `nvseal serve` under connection churn and hostile idle peers while
//! `nvseal perf --verify` writes and reads a namespace from another host NQN.
//!
//! Around the verified workload, in parallel: hundreds of connect/enable/I/O/disconnect cycles
//! (admin + I/O queue, a verified write and read on a second namespace), connected admin
//! queues that sit idle, silent sockets that never send ICReq, half-open sockets that stop in
//! the middle of a PDU header, and a stalled reader (a queue full of reads whose host never
//! reads the socket). At the end: perf saw zero verify and I/O errors, and once every peer is
//! gone the target holds no connection slot, no controller, no reserved buffer and no extra
//! file descriptor (`stats.nvmf`, `stats.process`). A second, shorter round then runs without perf; resident memory after it
//! must not have grown beyond a small slack over the first round's (a per-connection leak of a
//! receive buffer would show as megabytes). `max_connections` is 48: the ~30 queue pairs the
//! hosts connect fit, the silent and half-open sockets must not take slots from them.

mod common;

use common::serve::{addr_of, Serve};
use nvseal::nvme::connect;
use nvseal::nvmf::host::{HostConfig, HostQpair};
use nvseal::nvmf::pdu::{self, Digests};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2026-12.io.nvseal:soak";
const PERF_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:50a50a50-0000-4000-8000-000000000001";
const CHURN_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:50a50a50-0000-4000-8000-000000000002";
const IDLE_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:50a50a50-0000-4000-8000-000000000003";
const BS: u32 = 4096;
/// Connect/disconnect cycles of the first round (the second runs a third of them).
const CYCLES: u64 = 300;
/// Connected admin queues that sit idle through a round.
const IDLE: usize = 24;

fn rpc(sock: &Path, method: &str) -> Value {
    nvseal::rpc::client::call(sock, method, Some(json!({})))
        .unwrap_or_else(|e| panic!("{method}: {e}"))
}

fn host(nqn: &str, depth: u16) -> HostConfig {
    HostConfig {
        hostnqn: nqn.into(),
        queue_depth: depth,
        timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

/// Runs one I/O to completion; panics on a failed one.
fn io(q: &mut HostQpair, write: bool, lba: u64, seed: u8) -> Vec<u8> {
    let data = vec![seed; BS as usize];
    if write {
        q.write(2, lba, &data, BS, 1).unwrap();
    } else {
        q.read(2, lba, 1, BS, 1).unwrap();
    }
    let mut out = None;
    let t0 = Instant::now();
    while out.is_none() {
        q.poll(&mut |c| {
            assert!(
                c.cqe.status().is_success(),
                "churn I/O: {:?}",
                c.cqe.status()
            );
            out = Some(c.data.to_vec());
        })
        .unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "churn I/O timed out"
        );
    }
    out.unwrap()
}

/// One churn cycle: admin queue, enable, I/O queue, a verified write + read on nsid 2, then
/// both sockets are dropped (no Disconnect, no shutdown: the rudest way a host goes).
fn churn_cycle(addr: SocketAddr, n: u64) {
    let mut admin =
        HostQpair::connect(addr, NQN, 0, connect::CNTLID_DYNAMIC, host(CHURN_HOST, 8)).unwrap();
    admin.enable().unwrap();
    let mut q = HostQpair::connect(addr, NQN, 1, admin.cntlid(), host(CHURN_HOST, 8)).unwrap();
    let lba = n % 1024;
    let seed = (n % 251) as u8 + 1;
    io(&mut q, true, lba, seed);
    let back = io(&mut q, false, lba, 0);
    assert!(
        back.iter().all(|&b| b == seed),
        "cycle {n}: read back other data"
    );
}

/// The hostile peers of one round, held until `stop`: idle connected admin queues, silent
/// sockets, half-open ones and a stalled reader. Returns how many of each it opened.
fn hostile_peers(addr: SocketAddr, stop: Arc<AtomicBool>) -> (usize, usize, usize) {
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        let mut a =
            HostQpair::connect(addr, NQN, 0, connect::CNTLID_DYNAMIC, host(IDLE_HOST, 4)).unwrap();
        a.enable().unwrap();
        idle.push(a);
    }
    // A stalled reader: an I/O queue that fills itself with 128 KiB reads and never reads
    // the socket again.
    let mut stalled_admin =
        HostQpair::connect(addr, NQN, 0, connect::CNTLID_DYNAMIC, host(IDLE_HOST, 4)).unwrap();
    stalled_admin.enable().unwrap();
    let mut stalled =
        HostQpair::connect(addr, NQN, 1, stalled_admin.cntlid(), host(IDLE_HOST, 32)).unwrap();
    for i in 0..31u64 {
        stalled.read(2, i * 32, 32, BS, i).unwrap();
    }
    // Sends the queued commands without reading anything back.
    let _ = stalled.poll(&mut |_| {});
    let mut silent = 0;
    let mut half_open = 0;
    let mut held: Vec<TcpStream> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        // Silent: a TCP connection and nothing else.
        if let Ok(s) = TcpStream::connect(addr) {
            silent += 1;
            held.push(s);
        }
        // Half-open: the first 10 bytes of an ICReq, then silence.
        if let Ok(mut s) = TcpStream::connect(addr) {
            let mut icreq = [0u8; 128];
            pdu::encode_ic_req(
                &mut icreq,
                &pdu::IcReq {
                    pfv: 0,
                    hpda: 0,
                    digests: Digests::default(),
                    maxr2t: 0,
                },
            );
            if s.write_all(&icreq[..10]).is_ok() {
                half_open += 1;
            }
            held.push(s);
        }
        // The target closes such sockets (ICReq/Connect timeouts); drop the ones it closed so
        // this thread holds only a handful of fds at a time.
        held.retain(|s| {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 64];
            matches!((&*s).read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        });
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(held);
    drop(stalled);
    drop(stalled_admin);
    drop(idle);
    (IDLE + 1, silent, half_open)
}

/// Waits until `stats.nvmf` and `stats.process` show nothing held over the baseline; returns
/// the last `stats.process` reading.
fn wait_released(sock: &Path, fds0: u64) -> Value {
    let t0 = Instant::now();
    loop {
        let n = rpc(sock, "stats.nvmf");
        let v = rpc(sock, "stats.process");
        let c = &n["connections"];
        if c["connected"] == 0
            && c["pre_connect"] == 0
            && n["controllers"] == 0
            && n["buffer_bytes_reserved"] == 0
            && v["open_fds"].as_u64() == Some(fds0)
        {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the target still holds resources after every peer left: {n} {v} (open_fds at start {fds0})"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One round: churn `cycles` times while the hostile peers (and perf, if given) run.
fn round(addr: SocketAddr, cycles: u64, perf: Option<std::process::Child>) -> (u64, Option<bool>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let peers = std::thread::spawn(move || hostile_peers(addr, s2));
    let done = Arc::new(AtomicU64::new(0));
    let mut perf = perf;
    let mut n = 0;
    let t0 = Instant::now();
    // At least `cycles`, and for as long as perf runs.
    loop {
        let perf_running = perf
            .as_mut()
            .is_some_and(|p| p.try_wait().unwrap().is_none());
        if n >= cycles && !perf_running {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "round did not finish"
        );
        churn_cycle(addr, n);
        n += 1;
        done.store(n, Ordering::Relaxed);
    }
    stop.store(true, Ordering::Release);
    let (idle, silent, half) = peers.join().unwrap();
    assert!(idle > 0 && silent > 0 && half > 0);
    let ok = perf.map(|p| {
        let out = p.wait_with_output().unwrap();
        if !out.status.success() {
            eprintln!("perf: {}", String::from_utf8_lossy(&out.stderr));
        }
        out.status.success()
    });
    (n, ok)
}

#[test]
fn soak_churn_and_hostile_peers_while_perf_verifies() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let d = dir.path();
    let cfg = d.join("soak.yaml");
    let sock = d.join("rpc.sock");
    std::fs::write(
        &cfg,
        format!(
            "reactor:\n  cores: 2\n  pin: false\n  idle_backoff_us: 20\n\
             rpc:\n  socket_path: {sock}\n  audit_log: {audit}\n\
             nvmf:\n  connect_timeout_ms: 2000\n  max_connections: 48\n\
             bdevs:\n  - {{ name: mem0, type: malloc, size_bytes: 33554432, block_size: 4096 }}\n\
             \x20 - {{ name: mem1, type: malloc, size_bytes: 8388608, block_size: 4096 }}\n\
             subsystems:\n  - nqn: {NQN}\n    serial: SOAK1\n    allowed_hosts: [\"{PERF_HOST}\", \"{CHURN_HOST}\", \"{IDLE_HOST}\"]\n    namespaces:\n      - {{ nsid: 1, bdev: mem0 }}\n      - {{ nsid: 2, bdev: mem1 }}\n    listen:\n      - {{ addr: 127.0.0.1, port: 0 }}\n",
            sock = sock.display(),
            audit = d.join("audit.jsonl").display(),
        ),
    )
    .unwrap();
    let mut s = Serve::start(&cfg);
    let addr = addr_of(&s.wait_for("NVMe/TCP listening"));
    s.wait_for("control socket listening");
    let v0 = rpc(&sock, "stats.process");
    let fds0 = v0["open_fds"].as_u64().unwrap();
    assert_eq!(rpc(&sock, "stats.nvmf")["connections"]["connected"], 0);

    let json_out = d.join("perf.json");
    let perf = Command::new(env!("CARGO_BIN_EXE_nvseal"))
        .args([
            "perf",
            "--traddr",
            &addr.to_string(),
            "--subnqn",
            NQN,
            "--hostnqn",
            PERF_HOST,
            "--nsid",
            "1",
            "-w",
            "randrw",
            "-o",
            "4k",
            "-q",
            "16",
            "-t",
            "20",
            "--verify",
            "--no-pin",
            "--no-progress",
            "--json",
            json_out.to_str().unwrap(),
        ])
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (cycles, perf_ok) = round(addr, CYCLES, Some(perf));
    assert!(cycles >= CYCLES);
    assert_eq!(perf_ok, Some(true), "nvseal perf --verify failed");
    let report: Value = serde_json::from_slice(&std::fs::read(&json_out).unwrap()).unwrap();
    let jobs = report["jobs"].as_array().expect("jobs in perf report");
    assert!(!jobs.is_empty());
    for j in jobs {
        assert_eq!(j["verify_mismatches"], 0, "{j}");
        assert_eq!(j["io_errors"], 0, "{j}");
        assert!(j["total"]["total_ios"].as_u64().unwrap() > 0, "{j}");
    }
    let after1 = wait_released(&sock, fds0);
    let rss1 = after1["rss_bytes"].as_u64().unwrap();

    // Second round, no perf: memory must stay where the first round left it.
    let (cycles2, _) = round(addr, CYCLES / 3, None);
    assert!(cycles2 >= CYCLES / 3);
    let after2 = wait_released(&sock, fds0);
    let rss2 = after2["rss_bytes"].as_u64().unwrap();
    assert!(
        rss2 <= rss1 + 8 * 1024 * 1024,
        "resident memory grew by {} KiB over {cycles2} more cycles: {after1} -> {after2}",
        (rss2.saturating_sub(rss1)) / 1024
    );
    s.assert_running("after the soak");
    s.stop();
}
