//! The in-process NVMe/TCP target harness of the loopback tests: a real target (Listener +
//! Connections polled by a thread, like a reactor), the crate's own host queue pair, and
//! raw-socket helpers for fault injection. The backing store is a small RAM bdev defined here
//! (tests only) with an optional "busy every Nth submit" fault so the target's park-and-retry
//! path runs too.
//!
//! Its imports are re-exported so a test file needs only `use common::nvmf::*;`.

#![allow(unused_imports)]

pub use std::collections::{HashMap, VecDeque};
pub use std::io::{Read, Write};
pub use std::net::{SocketAddr, TcpStream};
pub use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
pub use std::sync::{Arc, Mutex};
pub use std::thread::JoinHandle;
pub use std::time::{Duration, Instant};

pub use nvseal::bdev::{validate, Bdev, BdevChannel, BdevError, BdevIo, IoStatus, IoType, Submit};
pub use nvseal::nvme::{self, admin_op, cns, connect, io_op, log_id, Sqe, Status};
pub use nvseal::nvmf::host::{Dir, HostConfig, HostError, HostQpair};
pub use nvseal::nvmf::pdu::{self, Digests, Fes, PduHeader};
pub use nvseal::nvmf::{
    Connection, Limits, ListenAddr, Listener, NamespaceConfig, SubsystemConfig, Target,
    DISCOVERY_NQN,
};
pub use nvseal::types::CoreId;

// ------------------------------------------------------------------------------------------------
// RAM bdev (tests only).

pub struct RamBdev {
    pub name: String,
    pub block_size: u32,
    pub data: Arc<Mutex<Vec<u8>>>,
    /// Every Nth submit answers Busy (0 = never).
    pub busy_every: usize,
    /// While set, completions are held at the bdev (I/O stays in flight).
    pub hold: Arc<AtomicBool>,
}

pub struct RamChannel {
    pub block_size: u32,
    pub num_blocks: u64,
    pub data: Arc<Mutex<Vec<u8>>>,
    pub done: VecDeque<BdevIo>,
    pub depth: usize,
    pub busy_every: usize,
    pub submits: usize,
    pub hold: Arc<AtomicBool>,
}

impl Bdev for RamBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        (self.data.lock().unwrap().len() / self.block_size as usize) as u64
    }
    fn io_type_supported(&self, _t: IoType) -> bool {
        true
    }
    fn open_channel(
        &self,
        _core: CoreId,
        queue_depth: usize,
    ) -> Result<Box<dyn BdevChannel>, BdevError> {
        Ok(Box::new(RamChannel {
            block_size: self.block_size,
            num_blocks: self.num_blocks(),
            data: Arc::clone(&self.data),
            done: VecDeque::with_capacity(queue_depth),
            depth: queue_depth,
            busy_every: self.busy_every,
            submits: 0,
            hold: Arc::clone(&self.hold),
        }))
    }
}

impl BdevChannel for RamChannel {
    fn submit(&mut self, mut io: BdevIo) -> Submit {
        self.submits += 1;
        if self.done.len() >= self.depth
            || (self.busy_every > 0 && self.submits.is_multiple_of(self.busy_every))
        {
            return Submit::Busy(io);
        }
        io.status = match validate(&io, self.block_size, self.num_blocks) {
            Err(s) => s,
            Ok(()) => {
                let bs = self.block_size as usize;
                let off = io.offset_blocks as usize * bs;
                let len = io.num_blocks as usize * bs;
                let mut d = self.data.lock().unwrap();
                match io.io_type {
                    IoType::Read => io
                        .buf
                        .as_mut()
                        .unwrap()
                        .as_mut_slice()
                        .copy_from_slice(&d[off..off + len]),
                    IoType::Write => {
                        d[off..off + len].copy_from_slice(io.buf.as_ref().unwrap().as_slice())
                    }
                    IoType::WriteZeroes | IoType::Unmap => d[off..off + len].fill(0),
                    IoType::Flush => {}
                }
                IoStatus::Success
            }
        };
        self.done.push_back(io);
        Submit::Queued
    }
    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        if self.hold.load(Ordering::Acquire) {
            return 0;
        }
        let n = self.done.len();
        while let Some(io) = self.done.pop_front() {
            done(io);
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

// ------------------------------------------------------------------------------------------------
// Target harness.

pub const NQN: &str = "nqn.2026-01.io.nvseal:test";
pub const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
pub const BS: u32 = 512;
pub const BLOCKS: u64 = 4096; // 2 MiB

pub struct Harness {
    /// The listener of the first target port.
    pub addr: SocketAddr,
    /// Every listener, by target port (port id order).
    pub addrs: Vec<SocketAddr>,
    pub target: Arc<Target>,
    pub stop: Arc<AtomicBool>,
    pub live: Arc<AtomicUsize>,
    pub thread: Option<JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// The test subsystem (`NQN`, nsid 1 on `ram0`, nsid 2 on `ram1`) admitting `allowed`, on
/// 127.0.0.1:4420 as configured (the harness listens on a free port for it).
pub fn start(limits: Limits, allowed: Vec<String>, busy_every: usize) -> Harness {
    start_listen(limits, allowed, busy_every, 4420)
}

/// `start` with the subsystem's configured listen port (0 = any free port, as `nvseal serve`
/// allows: the harness then records the port it bound, as the server does).
pub fn start_listen(
    limits: Limits,
    allowed: Vec<String>,
    busy_every: usize,
    listen_port: u16,
) -> Harness {
    let cfg = test_subsystem(NQN, allowed, false, &[listen_port]);
    start_with(vec![cfg], limits, busy_every)
}

/// A subsystem config like the test one, on 127.0.0.1 at each of `ports` (as configured).
pub fn test_subsystem(
    nqn: &str,
    allowed: Vec<String>,
    any: bool,
    ports: &[u16],
) -> SubsystemConfig {
    SubsystemConfig {
        nqn: nqn.into(),
        serial: "NVSEAL0001".into(),
        model: "nvseal test".into(),
        namespaces: vec![
            NamespaceConfig {
                nsid: 1,
                bdev: "ram0".into(),
                encrypted: None,
            },
            NamespaceConfig {
                nsid: 2,
                bdev: "ram1".into(),
                encrypted: None,
            },
        ],
        allowed_hosts: allowed,
        allow_any_host: any,
        listen: ports
            .iter()
            .map(|&port| ListenAddr {
                addr: "127.0.0.1".into(),
                port,
            })
            .collect(),
    }
}

/// A target with `subsystems` (namespaces on the shared RAM bdevs `ram0` and `ram1`) and one
/// listener per target port, on a free port each, polled by a thread like a reactor. Each
/// accepted connection carries its listener's port, as `nvseal serve` does.
pub fn start_with(subsystems: Vec<SubsystemConfig>, limits: Limits, busy_every: usize) -> Harness {
    let mut bdevs: HashMap<String, Arc<dyn Bdev>> = HashMap::new();
    for (name, bs) in [("ram0", BS), ("ram1", 4096)] {
        let size = BLOCKS as usize * BS as usize;
        bdevs.insert(
            name.into(),
            Arc::new(RamBdev {
                name: name.into(),
                block_size: bs,
                data: Arc::new(Mutex::new(vec![0; size])),
                busy_every,
                hold: Arc::new(AtomicBool::new(false)),
            }),
        );
    }
    let target = Target::new(&subsystems, limits, &bdevs).unwrap();
    let mut listeners = Vec::new();
    let mut addrs = Vec::new();
    for (port, configured) in target.ports() {
        let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        target.set_bound_port(configured, addr.port());
        addrs.push(addr);
        listeners.push((listener, port));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(AtomicUsize::new(0));
    let (t2, s2, l2) = (Arc::clone(&target), Arc::clone(&stop), Arc::clone(&live));
    let thread = std::thread::spawn(move || {
        let mut conns: Vec<Connection> = Vec::new();
        while !s2.load(Ordering::Acquire) {
            let mut work = 0;
            for (listener, port) in listeners.iter_mut() {
                if let Some(s) = listener.poll_accept() {
                    if let Ok(c) = Connection::new(s, Arc::clone(&t2), CoreId(0), *port) {
                        conns.push(c);
                    }
                    work += 1;
                }
            }
            for c in conns.iter_mut() {
                work += c.poll();
            }
            conns.retain(|c| !c.is_closed());
            l2.store(conns.len(), Ordering::Release);
            if work == 0 {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    });
    Harness {
        addr: addrs[0],
        addrs,
        target,
        stop,
        live,
        thread: Some(thread),
    }
}

pub fn host_cfg(dg: Digests) -> HostConfig {
    HostConfig {
        hostnqn: HOST.into(),
        digests: dg,
        queue_depth: 32,
        ..Default::default()
    }
}

/// Admin queue connected and enabled.
pub fn admin(h: &Harness, cfg: HostConfig) -> HostQpair {
    let mut a = HostQpair::connect(h.addr, NQN, 0, connect::CNTLID_DYNAMIC, cfg).unwrap();
    a.enable().unwrap();
    a
}

pub fn io_queue(h: &Harness, a: &HostQpair, qid: u16, cfg: HostConfig) -> HostQpair {
    HostQpair::connect(h.addr, NQN, qid, a.cntlid(), cfg).unwrap()
}

/// Runs one command to completion, returning its status, dw0, and data.
pub fn run(
    q: &mut HostQpair,
    sqe: Sqe,
    dir: Dir,
    data: &[u8],
    read_len: u32,
) -> (Status, u32, Vec<u8>) {
    match q.admin_cmd(sqe, dir, data, read_len) {
        Ok((c, d)) => (c.status(), c.dw0, d),
        Err(HostError::Status { status, dw0 }) => (status, dw0, Vec::new()),
        Err(e) => panic!("command failed at transport level: {e}"),
    }
}

pub fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed)
                .to_le_bytes()[1]
        })
        .collect()
}

pub fn write_read_verify(q: &mut HostQpair, nsid: u32, bs: u32, lba: u64, len: usize, seed: u32) {
    let data = pattern(len, seed);
    let (s, _, _) = run(
        q,
        nvseal::nvmf::host::rw_sqe(io_op::WRITE, nsid, lba, (len / bs as usize) as u32),
        Dir::ToCtrl,
        &data,
        0,
    );
    assert_eq!(s, Status::SUCCESS, "write of {len} bytes");
    let (s, _, back) = run(
        q,
        nvseal::nvmf::host::rw_sqe(io_op::READ, nsid, lba, (len / bs as usize) as u32),
        Dir::FromCtrl,
        &[],
        len as u32,
    );
    assert_eq!(s, Status::SUCCESS, "read of {len} bytes");
    assert!(back == data, "data mismatch at {len} bytes");
}

pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ------------------------------------------------------------------------------------------------
// Raw-socket helpers for fault injection.

pub fn raw_connect(addr: SocketAddr, dg: Digests) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 128];
    pdu::encode_ic_req(
        &mut b,
        &pdu::IcReq {
            pfv: 0,
            hpda: 0,
            digests: dg,
            maxr2t: 0,
        },
    );
    s.write_all(&b).unwrap();
    let mut r = [0u8; 128];
    s.read_exact(&mut r).unwrap();
    assert!(matches!(
        pdu::decode(&r, Digests::default(), 128).unwrap().0.header,
        PduHeader::IcResp(_)
    ));
    s
}

/// Reads one PDU (blocking); `None` when the peer closed first.
pub fn raw_read_pdu(s: &mut TcpStream, dg: Digests) -> Option<(PduHeader, Vec<u8>)> {
    let mut ch = [0u8; 8];
    s.read_exact(&mut ch).ok()?;
    let plen = u32::from_le_bytes(ch[4..8].try_into().unwrap()) as usize;
    let mut v = ch.to_vec();
    v.resize(plen, 0);
    s.read_exact(&mut v[8..]).ok()?;
    let (p, _) = pdu::decode(&v, dg, 1 << 20).unwrap();
    Some((p.header, p.data.to_vec()))
}

pub fn raw_capsule(s: &mut TcpStream, sqe: &Sqe, data: &[u8], dg: Digests) {
    let mut h = [0u8; pdu::MAX_HEADER_REGION];
    let n = pdu::encode_capsule_cmd(&mut h, sqe, data.len(), dg, 0);
    let mut v = h[..n].to_vec();
    v.extend_from_slice(data);
    if dg.data && !data.is_empty() {
        v.extend_from_slice(&pdu::crc32c(data).to_le_bytes());
    }
    s.write_all(&v).unwrap();
}

pub fn connect_data(subnqn: &str, hostnqn: &str, cntlid: u16) -> Vec<u8> {
    let mut d = vec![0u8; connect::DATA_SIZE];
    d[connect::CNTLID_OFF..connect::CNTLID_OFF + 2].copy_from_slice(&cntlid.to_le_bytes());
    nvme::put_str(&mut d[256..512], subnqn, 0);
    nvme::put_str(&mut d[512..768], hostnqn, 0);
    d
}

/// Sends an I/O queue Connect for `qid` to controller `cntlid` on a fresh socket; its status
/// and the socket.
pub fn raw_io_connect(addr: SocketAddr, cntlid: u16, qid: u16) -> (Status, TcpStream) {
    let mut s = raw_connect(addr, Digests::default());
    let mut sqe = connect::ConnectCmd {
        recfmt: 0,
        qid,
        sqsize: 15,
        cattr: 0,
        kato_ms: 0,
    }
    .to_sqe(1);
    sqe.sgl = nvme::SglDesc::in_capsule(0, 1024);
    raw_capsule(
        &mut s,
        &sqe,
        &connect_data(NQN, HOST, cntlid),
        Digests::default(),
    );
    match raw_read_pdu(&mut s, Digests::default()) {
        Some((PduHeader::CapsuleResp(c), _)) => (c.status(), s),
        other => panic!("expected a CapsuleResp to Connect, got {other:?}"),
    }
}

/// A raw I/O queue connected to controller `cntlid`.
pub fn raw_io_queue(addr: SocketAddr, cntlid: u16, qid: u16) -> TcpStream {
    let (status, s) = raw_io_connect(addr, cntlid, qid);
    assert_eq!(status, Status::SUCCESS);
    s
}

/// Sends a raw admin-queue Fabrics Connect (`subnqn`, `hostnqn` as given, even empty) through
/// the listener at `addr` and returns its completion.
pub fn raw_admin_connect(addr: SocketAddr, subnqn: &str, hostnqn: &str) -> nvme::Cqe {
    let mut s = raw_connect(addr, Digests::default());
    let mut sqe = connect::ConnectCmd {
        recfmt: 0,
        qid: 0,
        sqsize: 15,
        cattr: 0,
        kato_ms: 0,
    }
    .to_sqe(1);
    sqe.sgl = nvme::SglDesc::in_capsule(0, 1024);
    raw_capsule(
        &mut s,
        &sqe,
        &connect_data(subnqn, hostnqn, connect::CNTLID_DYNAMIC),
        Digests::default(),
    );
    match raw_read_pdu(&mut s, Digests::default()) {
        Some((PduHeader::CapsuleResp(c), _)) => c,
        other => panic!("expected a CapsuleResp to Connect, got {other:?}"),
    }
}

/// The subsystem NQNs a discovery controller reached through `addr` lists to `hostnqn`, with
/// each entry's TRSVCID and PORTID.
pub fn discovered(addr: SocketAddr, hostnqn: &str) -> Vec<(String, String, u16)> {
    let cfg = HostConfig {
        hostnqn: hostnqn.into(),
        ..host_cfg(Digests::default())
    };
    let mut d = HostQpair::connect(addr, DISCOVERY_NQN, 0, connect::CNTLID_DYNAMIC, cfg).unwrap();
    d.enable().unwrap();
    let hdr = d.get_log_page(log_id::DISCOVERY, 0, 1024, 0).unwrap();
    let numrec = u64::from_le_bytes(hdr[8..16].try_into().unwrap()) as usize;
    let full = d
        .get_log_page(log_id::DISCOVERY, 0, (1024 * (numrec + 1)) as u32, 0)
        .unwrap();
    full[1024..]
        .chunks_exact(1024)
        .map(|e| {
            let text = |b: &[u8]| {
                String::from_utf8_lossy(b)
                    .trim_end_matches(['\0', ' '])
                    .to_string()
            };
            (
                text(&e[256..512]),
                text(&e[32..64]),
                u16::from_le_bytes([e[4], e[5]]),
            )
        })
        .collect()
}

pub fn expect_term(s: &mut TcpStream, fes: Fes) -> u32 {
    match raw_read_pdu(s, Digests::default()) {
        Some((PduHeader::C2HTermReq(t), _)) => {
            assert_eq!(t.fes, fes as u16, "FES");
            let mut rest = [0u8; 1];
            assert_eq!(
                s.read(&mut rest).unwrap_or(0),
                0,
                "connection closed after the TermReq"
            );
            t.fei
        }
        other => panic!("expected C2HTermReq, got {other:?}"),
    }
}
