//! Durability end to end: Force Unit Access, Flush, the volatile write cache bit and controller
//! shutdown, driven through the real NVMe/TCP target with nvseal's own host, on `sim` bdevs
//! whose volatile write cache a simulated power cut drops (`SimBdev::power_cut`). What survives
//! the cut is exactly what reached stable storage, so these tests see whether a FUA write, a
//! Flush or a shutdown really made the data durable — through the whole encrypted stack
//! (late → crypto → slice → sim) as well as on a plain namespace.
//!
//! The last test runs `nvseal serve` on a `uring` file and stops it with SIGTERM: every backend
//! must be flushed on the way out.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::serve::{addr_of, Serve};
use nvseal::bdev::late::LateBdev;
use nvseal::bdev::sim::{SimBdev, SimConfig};
use nvseal::bdev::slice::SliceBdev;
use nvseal::bdev::Bdev;
use nvseal::crypto::bdev::{CryptoBdev, DataKey};
use nvseal::crypto::key::XtsKey;
use nvseal::nvme::identify::ctrl_off;
use nvseal::nvme::{connect, io_op, prop, Sqe, Status, CDW12_FUA};
use nvseal::nvmf::host::{rw_sqe, Dir, HostConfig, HostError, HostQpair};
use nvseal::nvmf::pdu::Digests;
use nvseal::nvmf::{
    Connection, Limits, ListenAddr, Listener, NamespaceConfig, SubsystemConfig, Target,
};
use nvseal::types::CoreId;

const NQN: &str = "nqn.2026-01.io.nvseal:durability";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:0d0d0d0d-1111-2222-3333-444444444444";
const BS: u32 = 512;
/// Blocks of each sim device.
const SIM_BLOCKS: u64 = 2048;
/// Blocks the slice keeps in front of the encrypted namespace (stands for the key header).
const HEADER_BLOCKS: u64 = 64;

fn sim(name: &str, seed: u64) -> Arc<SimBdev> {
    SimBdev::open(&SimConfig {
        name: name.into(),
        num_blocks: Some(SIM_BLOCKS),
        size_bytes: None,
        block_size: BS,
        seed,
        fail_nth: None,
        fail_ratio: 0.0,
        cache_blocks: 1024,
    })
    .unwrap()
}

/// The encrypted namespace's stack as `nvseal serve` builds it for a managed key: a stand-in
/// bound to a crypto bdev on a slice (data area after the header) of the device.
fn encrypted_stack(dev: &Arc<SimBdev>) -> Arc<dyn Bdev> {
    let base: Arc<dyn Bdev> = dev.clone();
    let slice = Arc::new(
        SliceBdev::new("slice0", base, HEADER_BLOCKS, SIM_BLOCKS - HEADER_BLOCKS).unwrap(),
    );
    let mut k = [0u8; 64];
    for (i, b) in k.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    let key = DataKey::new(&XtsKey::from_bytes(&k).unwrap(), None).unwrap();
    let crypto: Arc<dyn Bdev> = Arc::new(CryptoBdev::new("crypt0", slice, key, false).unwrap());
    let late = Arc::new(LateBdev::new(
        "vol0",
        crypto.block_size(),
        crypto.num_blocks(),
        crypto.buf_align(),
    ));
    late.bind(crypto).unwrap();
    late
}

/// A target whose connections one thread polls (as a reactor would).
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
            t.join().unwrap();
        }
    }
}

/// Starts a target exporting `bdevs` (nsid = position + 1).
fn start(bdevs: Vec<Arc<dyn Bdev>>) -> Harness {
    let mut map: HashMap<String, Arc<dyn Bdev>> = HashMap::new();
    let mut namespaces = Vec::new();
    for (i, b) in bdevs.into_iter().enumerate() {
        namespaces.push(NamespaceConfig {
            nsid: i as u32 + 1,
            bdev: b.name().to_string(),
            encrypted: None,
        });
        map.insert(b.name().to_string(), b);
    }
    let cfg = SubsystemConfig {
        nqn: NQN.into(),
        serial: "DUR0001".into(),
        model: "nvseal durability test".into(),
        namespaces,
        allowed_hosts: vec![HOST.into()],
        allow_any_host: false,
        listen: vec![ListenAddr {
            addr: "127.0.0.1".into(),
            port: 0,
        }],
    };
    let target = Target::new(&[cfg], Limits::default(), &map).unwrap();
    let mut listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    target.set_bound_port("127.0.0.1:0".parse().unwrap(), addr.port());
    let port = target.port_for("127.0.0.1:0".parse().unwrap()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (t2, s2) = (target.clone(), stop.clone());
    let thread = std::thread::spawn(move || {
        let mut conns: Vec<Connection> = Vec::new();
        while !s2.load(Ordering::Acquire) {
            let mut work = 0;
            if let Some(s) = listener.poll_accept() {
                if let Ok(c) = Connection::new(s, t2.clone(), CoreId(0), port) {
                    conns.push(c);
                }
                work += 1;
            }
            for c in conns.iter_mut() {
                work += c.poll();
            }
            conns.retain(|c| !c.is_closed());
            if work == 0 {
                std::thread::sleep(Duration::from_micros(100));
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

fn host_cfg() -> HostConfig {
    HostConfig {
        hostnqn: HOST.into(),
        digests: Digests::default(),
        queue_depth: 16,
        ..Default::default()
    }
}

fn admin(h: &Harness) -> HostQpair {
    let mut a = HostQpair::connect(h.addr, NQN, 0, connect::CNTLID_DYNAMIC, host_cfg()).unwrap();
    a.enable().unwrap();
    a
}

fn io_queue(h: &Harness, a: &HostQpair) -> HostQpair {
    HostQpair::connect(h.addr, NQN, 1, a.cntlid(), host_cfg()).unwrap()
}

/// Runs one command; its status and data.
fn run(q: &mut HostQpair, sqe: Sqe, dir: Dir, data: &[u8], read_len: u32) -> (Status, Vec<u8>) {
    match q.admin_cmd(sqe, dir, data, read_len) {
        Ok((c, d)) => (c.status(), d),
        Err(HostError::Status { status, .. }) => (status, Vec::new()),
        Err(e) => panic!("transport error: {e}"),
    }
}

fn pattern(seed: u8, blocks: u32) -> Vec<u8> {
    (0..blocks as usize * BS as usize)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn write(q: &mut HostQpair, nsid: u32, lba: u64, data: &[u8], fua: bool) {
    let mut sqe = rw_sqe(io_op::WRITE, nsid, lba, data.len() as u32 / BS);
    if fua {
        sqe.cdw12 |= CDW12_FUA;
    }
    let (s, _) = run(q, sqe, Dir::ToCtrl, data, 0);
    assert_eq!(s, Status::SUCCESS, "write nsid {nsid} lba {lba}");
}

fn read(q: &mut HostQpair, nsid: u32, lba: u64, blocks: u32) -> Vec<u8> {
    let (s, d) = run(
        q,
        rw_sqe(io_op::READ, nsid, lba, blocks),
        Dir::FromCtrl,
        &[],
        blocks * BS,
    );
    assert_eq!(s, Status::SUCCESS, "read nsid {nsid} lba {lba}");
    d
}

fn flush(q: &mut HostQpair, nsid: u32) -> Status {
    let sqe = Sqe {
        opcode: io_op::FLUSH,
        nsid,
        ..Default::default()
    };
    run(q, sqe, Dir::None, &[], 0).0
}

fn csts(a: &mut HostQpair) -> u32 {
    a.property_get(prop::CSTS, false).unwrap() as u32
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn fua_writes_and_flushed_writes_survive_a_power_cut_through_target_and_crypto_stack() {
    let enc_dev = sim("sim-enc", 1);
    let plain_dev = sim("sim-plain", 2);
    let h = start(vec![encrypted_stack(&enc_dev), plain_dev.clone()]);
    let a = admin(&h);
    let mut q = io_queue(&h, &a);
    for nsid in [1u32, 2] {
        // Some in-capsule (small), some by R2T (over the in-capsule size): both paths carry FUA.
        write(&mut q, nsid, 0, &pattern(1, 2), false); // unflushed: lost
        write(&mut q, nsid, 8, &pattern(2, 2), true); // FUA: survives
        write(&mut q, nsid, 16, &pattern(3, 32), true); // FUA by R2T: survives
    }
    for dev in [&enc_dev, &plain_dev] {
        assert_eq!(dev.stats().fua_writes, 2, "FUA reached {}", dev.name());
        dev.power_cut();
    }
    for nsid in [1u32, 2] {
        assert_eq!(
            read(&mut q, nsid, 8, 2),
            pattern(2, 2),
            "nsid {nsid}: FUA write"
        );
        assert_eq!(
            read(&mut q, nsid, 16, 32),
            pattern(3, 32),
            "nsid {nsid}: FUA write (R2T)"
        );
        assert_ne!(
            read(&mut q, nsid, 0, 2),
            pattern(1, 2),
            "nsid {nsid}: unflushed write kept"
        );
    }
    // Flush: what completed before it survives, what came after it does not.
    for nsid in [1u32, 2] {
        write(&mut q, nsid, 64, &pattern(4, 4), false);
        assert_eq!(flush(&mut q, nsid), Status::SUCCESS);
        write(&mut q, nsid, 128, &pattern(5, 2), false);
    }
    for dev in [&enc_dev, &plain_dev] {
        assert_eq!(dev.stats().flushes, 1, "Flush reached {}", dev.name());
        dev.power_cut();
    }
    for nsid in [1u32, 2] {
        assert_eq!(
            read(&mut q, nsid, 64, 4),
            pattern(4, 4),
            "nsid {nsid}: flushed write"
        );
        assert_ne!(
            read(&mut q, nsid, 128, 2),
            pattern(5, 2),
            "nsid {nsid}: late write kept"
        );
    }
    // The encrypted namespace stored ciphertext behind the header area: the raw device does not
    // hold the plaintext the host wrote.
    let raw = nvseal::bdev::run_blocking(
        enc_dev.as_ref(),
        CoreId(0),
        nvseal::bdev::BdevIo::new(
            nvseal::bdev::IoType::Read,
            HEADER_BLOCKS + 8,
            2,
            Some(nvseal::bdev::IoBuf::new(
                nvseal::sys::buf::AlignedBuf::zeroed(2 * BS as usize, 64).unwrap(),
                2 * BS as usize,
            )),
            0,
        ),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_ne!(raw.buf.unwrap().as_slice(), &pattern(2, 2)[..]);
}

#[test]
fn vwc_is_reported_before_any_namespace_exists_and_a_later_namespace_flushes() {
    let h = start(Vec::new());
    let mut a = admin(&h);
    let id = a.identify_controller().unwrap();
    assert_eq!(
        id[ctrl_off::VWC] & 1,
        1,
        "VWC must not depend on the namespaces at Identify"
    );
    // A namespace added afterwards (what namespace.create does) on a device with a volatile
    // cache: the host that identified earlier flushes it, and the flush is real.
    let dev = sim("sim-late", 3);
    h.target
        .add_namespace(NQN, Some(1), dev.clone(), true)
        .unwrap();
    let mut q = io_queue(&h, &a);
    write(&mut q, 1, 4, &pattern(7, 4), false);
    assert_eq!(flush(&mut q, 1), Status::SUCCESS);
    assert_eq!(dev.stats().flushes, 1);
    dev.power_cut();
    assert_eq!(read(&mut q, 1, 4, 4), pattern(7, 4));
    let id = a.identify_controller().unwrap();
    assert_eq!(id[ctrl_off::VWC] & 1, 1);
}

#[test]
fn cc_shn_flushes_every_namespace_before_shutdown_is_reported_complete() {
    let enc_dev = sim("sim-enc", 4);
    let plain_dev = sim("sim-plain", 5);
    let h = start(vec![encrypted_stack(&enc_dev), plain_dev.clone()]);
    let mut a = admin(&h);
    let mut q = io_queue(&h, &a);
    for nsid in [1u32, 2] {
        write(&mut q, nsid, 32, &pattern(9, 8), false);
    }
    assert_eq!(enc_dev.stats().unflushed_writes, 1);
    let cc = a.property_get(prop::CC, false).unwrap() as u32;
    a.property_set(prop::CC, cc | (0b01 << prop::CC_SHN_SHIFT))
        .unwrap();
    wait_until("CSTS.SHST complete", || {
        csts(&mut a) & prop::CSTS_SHST_MASK == prop::CSTS_SHST_COMPLETE
    });
    // Once the host sees "complete", both devices have been flushed.
    for dev in [&enc_dev, &plain_dev] {
        assert!(
            dev.stats().flushes >= 1,
            "{}: no flush before SHST complete",
            dev.name()
        );
        assert_eq!(dev.stats().unflushed_writes, 0);
        dev.power_cut();
    }
    for nsid in [1u32, 2] {
        assert_eq!(read(&mut q, nsid, 32, 8), pattern(9, 8), "nsid {nsid}");
    }
}

#[test]
fn cc_shn_never_reports_complete_when_a_flush_fails() {
    let dev = sim("sim-bad", 6);
    let h = start(vec![dev.clone()]);
    let mut a = admin(&h);
    let mut q = io_queue(&h, &a);
    write(&mut q, 1, 0, &pattern(1, 1), false);
    dev.fail_in(1); // the shutdown flush fails with EIO
    let cc = a.property_get(prop::CC, false).unwrap() as u32;
    a.property_set(prop::CC, cc | (0b01 << prop::CC_SHN_SHIFT))
        .unwrap();
    wait_until("CSTS.CFS after the failed flush", || {
        csts(&mut a) & prop::CSTS_CFS != 0
    });
    assert_eq!(
        csts(&mut a) & prop::CSTS_SHST_MASK,
        prop::CSTS_SHST_OCCURRING,
        "a failed flush must not be reported as a completed shutdown"
    );
    assert_eq!(dev.stats().injected_failures, 1);
}

#[test]
fn sigterm_of_nvseal_serve_flushes_every_backend() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let d = dir.path();
    let img = d.join("disk0.img");
    let cfg = d.join("dur.yaml");
    std::fs::write(
        &cfg,
        format!(
            "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 20\n\
             bdevs:\n  - name: disk0\n    type: uring\n    path: {img}\n    size_bytes: 4194304\n\
             \x20 - name: mem0\n    type: malloc\n    size_bytes: 1048576\n\
             subsystems:\n  - nqn: {NQN}\n    serial: DUR2\n    allowed_hosts:\n      - {HOST}\n\
             \x20   namespaces:\n      - nsid: 1\n        bdev: disk0\n      - nsid: 2\n        bdev: mem0\n\
             \x20   listen:\n      - addr: 127.0.0.1\n        port: 0\n",
            img = img.display(),
        ),
    )
    .unwrap();
    let mut s = Serve::start(&cfg);
    let addr = addr_of(&s.wait_for("NVMe/TCP listening"));
    let mut a = HostQpair::connect(addr, NQN, 0, connect::CNTLID_DYNAMIC, host_cfg()).unwrap();
    a.enable().unwrap();
    let (_, bs) = a.namespace_geometry(1).unwrap();
    let mut q = HostQpair::connect(addr, NQN, 1, a.cntlid(), host_cfg()).unwrap();
    let data: Vec<u8> = (0..bs as usize).map(|i| (i * 7 + 3) as u8).collect();
    let (st, _) = run(&mut q, rw_sqe(io_op::WRITE, 1, 5, 1), Dir::ToCtrl, &data, 0);
    assert_eq!(st, Status::SUCCESS);
    drop(q);
    drop(a);
    let log = s.stop();
    for bdev in ["disk0", "mem0"] {
        assert!(
            log.iter()
                .any(|l| l.contains("shutdown: bdev flushed") && l.contains(bdev)),
            "no shutdown flush of {bdev} in serve's log:\n{}",
            log.join("\n")
        );
    }
    assert!(
        !log.iter().any(|l| l.contains("flush failed")),
        "{}",
        log.join("\n")
    );
    let raw = std::fs::read(&img).unwrap();
    assert_eq!(&raw[5 * bs as usize..6 * bs as usize], &data[..]);
}
