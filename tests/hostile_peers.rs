//! Hostile and idle peers (issue 12): silent sockets, floods from one address or one host NQN,
//! a host that stops reading, keep alive switched off, and the open-file limit. Each test is a
//! regression test for one fix: it uses raw sockets against the in-process target (or the real
//! binary) and asserts what the target does, never how fast.

mod common;

use common::nvmf::*;
use common::serve::{addr_of, Serve};
use nvseal::nvme::Cqe;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

const OTHER_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:99999999-2222-3333-4444-555555555555";

// ------------------------------------------------------------------------------------------------
// Helpers.

/// Everything the target logs in this process (tests look for the refusal reasons). nextest runs
/// each test in its own process; under `cargo test` the buffer is shared, and each test looks
/// only for lines its own setup can cause.
fn log_buf() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b2 = Arc::clone(&buf);
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || LogWriter(Arc::clone(&b2)))
            .try_init();
        buf
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_text() -> String {
    String::from_utf8_lossy(&log_buf().lock().unwrap()).into_owned()
}

/// Waits for a log line containing every one of `parts`.
fn wait_for_log(parts: &[&str]) {
    wait_until(&format!("a log line with {parts:?}"), || {
        log_text()
            .lines()
            .any(|l| parts.iter().all(|p| l.contains(p)))
    });
}

/// A TCP connection to `addr` that says nothing.
fn silent(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Whether the target closed `s` (EOF or reset) rather than leaving it open until the read
/// timeout.
fn closed_by_target(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            // A TermReq or ICResp may come first; the close follows it.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// A raw Fabrics Connect (after ICReq) for queue `qid` of controller `cntlid` with `kato_ms`;
/// returns the socket and the completion.
fn raw_connect_cmd(
    addr: SocketAddr,
    subnqn: &str,
    hostnqn: &str,
    qid: u16,
    cntlid: u16,
    kato_ms: u32,
    sqsize: u16,
) -> (TcpStream, Cqe) {
    let mut s = raw_connect(addr, Digests::default());
    let mut sqe = connect::ConnectCmd {
        recfmt: 0,
        qid,
        sqsize,
        cattr: 0,
        kato_ms,
    }
    .to_sqe(1);
    sqe.sgl = nvme::SglDesc::in_capsule(0, 1024);
    raw_capsule(
        &mut s,
        &sqe,
        &connect_data(subnqn, hostnqn, cntlid),
        Digests::default(),
    );
    match raw_read_pdu(&mut s, Digests::default()) {
        Some((PduHeader::CapsuleResp(c), _)) => (s, c),
        other => panic!("expected a CapsuleResp to Connect, got {other:?}"),
    }
}

fn limits(f: impl FnOnce(&mut Limits)) -> Limits {
    let mut l = Limits::default();
    f(&mut l);
    l
}

/// Get Features Keep Alive Timer on an enabled admin queue.
fn get_kato(a: &mut HostQpair) -> u32 {
    let (s, dw0, _) = run(
        a,
        Sqe {
            opcode: admin_op::GET_FEATURES,
            cdw10: u32::from(nvme::feature::KEEP_ALIVE_TIMER),
            ..Default::default()
        },
        Dir::None,
        &[],
        0,
    );
    assert_eq!(s, Status::SUCCESS, "Get Features KATO");
    dw0
}

/// Set Features Keep Alive Timer; the status.
fn set_kato(a: &mut HostQpair, kato_ms: u32) -> Status {
    run(
        a,
        Sqe {
            opcode: admin_op::SET_FEATURES,
            cdw10: u32::from(nvme::feature::KEEP_ALIVE_TIMER),
            cdw11: kato_ms,
            ..Default::default()
        },
        Dir::None,
        &[],
        0,
    )
    .0
}

// ------------------------------------------------------------------------------------------------
// Item 1: connection slots, pre-Connect budget, ICReq timeout, per-source and per-host caps.

/// As many silent sockets as `max_connections` used to take every connection slot, and a host
/// that then connected was reset. Now they only hold pre-Connect slots.
#[test]
fn silent_sockets_do_not_lock_out_a_host() {
    let n = 4;
    let h = start(
        limits(|l| {
            l.max_connections = n;
            l.icreq_timeout_ms = 60_000;
            l.connect_timeout_ms = 60_000;
        }),
        vec![HOST.into()],
        0,
    );
    let _silent: Vec<TcpStream> = (0..n).map(|_| silent(h.addr)).collect();
    wait_until("the silent sockets to be accepted", || {
        h.live.load(Ordering::Acquire) == n
    });
    let st = h.target.connection_stats();
    assert_eq!((st.pre_connect, st.connected), (n, 0), "{st:?}");
    assert_eq!(st.await_icreq, n, "{st:?}");

    let cfg = host_cfg(Digests::default());
    let a = admin(&h, cfg.clone());
    let mut q = io_queue(&h, &a, 1, cfg);
    write_read_verify(&mut q, 1, BS, 0, 4096, 1);
    let st = h.target.connection_stats();
    assert_eq!((st.pre_connect, st.connected), (n, 2), "{st:?}");
    assert_eq!((st.hosts, st.max_per_host), (1, 2), "{st:?}");
    assert_eq!(st.sources, 1, "{st:?}");
}

/// `max_connections` counts connected queue pairs: the one over it is refused at Connect with
/// Controller Busy (the host may retry), and the log says which limit.
#[test]
fn connect_over_max_connections_is_refused_with_a_reason() {
    let _ = log_buf();
    let h = start(limits(|l| l.max_connections = 2), vec![HOST.into()], 0);
    let cfg = host_cfg(Digests::default());
    let a = admin(&h, cfg.clone());
    let _q1 = io_queue(&h, &a, 1, cfg);
    let (_s, c) = raw_connect_cmd(h.addr, NQN, HOST, 2, a.cntlid(), 0, 15);
    assert_eq!(c.status(), Status::CONNECT_CONTROLLER_BUSY);
    wait_for_log(&["Connect refused", "max_connections reached", "qid=2"]);
    assert_eq!(h.target.connection_count(), 2);
}

/// The pre-Connect budget refuses the socket over it (closed at once) and logs why; sockets
/// that say nothing do not pile up past it.
#[test]
fn pre_connect_budget_refuses_the_next_silent_socket() {
    let _ = log_buf();
    let h = start(
        limits(|l| {
            l.max_pre_connect = 3;
            l.icreq_timeout_ms = 60_000;
            l.connect_timeout_ms = 60_000;
        }),
        vec![HOST.into()],
        0,
    );
    let _silent: Vec<TcpStream> = (0..3).map(|_| silent(h.addr)).collect();
    wait_until("the silent sockets to be accepted", || {
        h.target.pre_connect_count() == 3
    });
    let mut over = silent(h.addr);
    assert!(
        closed_by_target(&mut over),
        "the socket over max_pre_connect must be closed"
    );
    wait_for_log(&["NVMe/TCP socket refused", "limit=\"max_pre_connect\""]);
    assert_eq!(h.live.load(Ordering::Acquire), 3);
    assert_eq!(h.target.pre_connect_count(), 3);
}

/// A socket that sends no ICReq is closed after `icreq_timeout_ms`, long before the Connect
/// timeout, and its pre-Connect slot is free again.
#[test]
fn icreq_timeout_closes_a_silent_socket() {
    let _ = log_buf();
    let h = start(
        limits(|l| {
            l.icreq_timeout_ms = 200;
            l.connect_timeout_ms = 60_000;
        }),
        vec![HOST.into()],
        0,
    );
    let mut s = silent(h.addr);
    assert!(closed_by_target(&mut s), "silent socket left open");
    wait_until("the silent socket to be reaped", || {
        h.target.pre_connect_count() == 0
    });
    wait_for_log(&[
        "closing NVMe/TCP connection",
        "no ICReq within icreq_timeout_ms",
    ]);
    // A socket that sent its ICReq is past that timer: it can still connect.
    let cfg = host_cfg(Digests::default());
    let a = admin(&h, cfg.clone());
    let mut q = io_queue(&h, &a, 1, cfg);
    write_read_verify(&mut q, 1, BS, 0, 4096, 2);
}

/// A TCP socket to `addr` from source address `from` (another loopback address).
fn connect_from(from: std::net::Ipv4Addr, addr: SocketAddr) -> TcpStream {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(from, 0)),
    )
    .unwrap();
    let SocketAddr::V4(to) = addr else {
        panic!("IPv4 listener expected")
    };
    connect(fd.as_raw_fd(), &SockaddrIn::from(to)).unwrap();
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// One source address cannot hold more than `max_connections_per_source` sockets; another
/// address still gets in, and a freed slot is usable again.
#[test]
fn per_source_cap_refuses_with_a_reason() {
    let _ = log_buf();
    let h = start(
        limits(|l| {
            l.max_connections_per_source = 2;
            l.icreq_timeout_ms = 60_000;
            l.connect_timeout_ms = 60_000;
        }),
        vec![HOST.into()],
        0,
    );
    let mut held: Vec<TcpStream> = (0..2).map(|_| silent(h.addr)).collect();
    wait_until("two sockets from 127.0.0.1", || {
        h.target.pre_connect_count() == 2
    });
    let mut over = silent(h.addr);
    assert!(closed_by_target(&mut over), "third socket from one address");
    wait_for_log(&[
        "NVMe/TCP socket refused",
        "limit=\"max_connections_per_source\"",
    ]);
    // Another source address is not affected.
    let other = connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), h.addr);
    wait_until("the socket from 127.0.0.2", || {
        h.target.connection_stats().sources == 2
    });
    drop(other);
    // Freeing one slot of 127.0.0.1 lets a host from there connect.
    drop(held.pop());
    wait_until("a slot of 127.0.0.1 to be freed", || {
        h.target.pre_connect_count() == 1
    });
    let _a = admin(&h, host_cfg(Digests::default()));
}

/// A host NQN cannot hold more than `max_queues_per_host` queue pairs across the target; the
/// refusal is Controller Busy with the reason logged, other hosts are unaffected, and a queue
/// that closes gives its slot back.
#[test]
fn per_host_queue_cap_refuses_with_a_reason() {
    let _ = log_buf();
    let h = start(
        limits(|l| l.max_queues_per_host = 2),
        vec![HOST.into(), OTHER_HOST.into()],
        0,
    );
    let cfg = host_cfg(Digests::default());
    let a = admin(&h, cfg.clone());
    let q1 = io_queue(&h, &a, 1, cfg.clone());
    let (_s, c) = raw_connect_cmd(h.addr, NQN, HOST, 2, a.cntlid(), 0, 15);
    assert_eq!(c.status(), Status::CONNECT_CONTROLLER_BUSY);
    wait_for_log(&["Connect refused", "max_queues_per_host reached", HOST]);
    // A second admin queue (a second controller) of the same host counts too.
    let c = raw_admin_connect(h.addr, NQN, HOST);
    assert_eq!(c.status(), Status::CONNECT_CONTROLLER_BUSY);

    // Another host is not affected.
    let other = HostConfig {
        hostnqn: OTHER_HOST.into(),
        ..cfg.clone()
    };
    let oa = admin(&h, other.clone());
    let mut oq = io_queue(&h, &oa, 1, other);
    write_read_verify(&mut oq, 1, BS, 0, 4096, 3);

    drop(q1);
    wait_until("the first host's I/O queue to be reaped", || {
        h.target.connection_stats().max_per_host == 2 && h.target.connection_count() == 3
    });
    let mut q2 = io_queue(&h, &a, 2, cfg);
    write_read_verify(&mut q2, 1, BS, 8, 4096, 4);
}

// ------------------------------------------------------------------------------------------------
// Item 2: Closing has a deadline, and the controller dies on entry.

/// Sends `cmds` on `s` (each asking for 128 KiB the host never reads: far more in total than
/// the socket buffers of both ends hold), waits until the target has filled our receive
/// buffer and stopped sending, then sends an unknown PDU type: a fatal error whose C2HTermReq
/// cannot go out. The connection is then in Closing with a peer that does not read.
fn stall_then_fatal(s: &mut TcpStream, cmds: impl Iterator<Item = Sqe>) {
    for sqe in cmds {
        raw_capsule(s, &sqe, &[], Digests::default());
    }
    let mut peek = vec![0u8; 8 << 20];
    let (mut last, mut stable) = (0, 0);
    wait_until("the target's sends to stall", || {
        let n = nix::sys::socket::recv(
            s.as_raw_fd(),
            &mut peek,
            nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        )
        .unwrap_or(0);
        stable = if n > 0 && n == last { stable + 1 } else { 0 };
        last = n;
        std::thread::sleep(Duration::from_millis(20));
        stable >= 10
    });
    s.write_all(&[0x08, 0, 24, 0, 24, 0, 0, 0]).unwrap();
    s.write_all(&[0u8; 16]).unwrap();
}

/// Reads `s` to its end: what the target sent, then EOF or a reset. Panics if the target
/// leaves the socket open.
fn drain_to_close(s: &mut TcpStream) {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut sink = vec![0u8; 1 << 20];
    loop {
        match s.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("socket not shut down by the target: {e}"),
        }
    }
}

/// A raw admin queue of depth 128, enabled, with an I/O queue on its controller; returns the
/// admin socket, the controller id and the I/O queue.
fn raw_admin_with_io(h: &Harness) -> (TcpStream, u16, TcpStream) {
    let (mut s, c) = raw_connect_cmd(h.addr, NQN, HOST, 0, connect::CNTLID_DYNAMIC, 0, 127);
    assert_eq!(c.status(), Status::SUCCESS);
    let cntlid = c.dw0 as u16;
    use nvme::prop;
    let cc = prop::CC_EN | (6 << prop::CC_IOSQES_SHIFT) | (4 << prop::CC_IOCQES_SHIFT);
    let set = Sqe {
        opcode: nvme::FABRICS_OPCODE,
        cid: 2,
        nsid: u32::from(nvme::fctype::PROPERTY_SET),
        cdw11: prop::CC,
        cdw12: cc,
        ..Default::default()
    };
    raw_capsule(&mut s, &set, &[], Digests::default());
    match raw_read_pdu(&mut s, Digests::default()) {
        Some((PduHeader::CapsuleResp(c), _)) => assert_eq!(c.status(), Status::SUCCESS),
        other => panic!("expected a CapsuleResp to Property Set, got {other:?}"),
    }
    wait_until("the controller to be ready", || {
        h.target
            .controllers_of(NQN)
            .iter()
            .any(|c| c.csts.load(Ordering::Acquire) & prop::CSTS_RDY != 0)
    });
    let io = raw_io_queue(h.addr, cntlid, 1);
    (s, cntlid, io)
}

/// 128 KiB Get Log Page (Error Information, zero-padded past its end) commands.
fn big_log_pages(n: u16) -> impl Iterator<Item = Sqe> {
    let numd = 128 * 1024 / 4 - 1;
    (0..n).map(move |cid| {
        let mut sqe = Sqe {
            opcode: admin_op::GET_LOG_PAGE,
            cid: 100 + cid,
            flags: nvme::PSDT_SGL_MPTR_CONTIG,
            cdw10: u32::from(log_id::ERROR_INFO) | ((numd & 0xffff) << 16),
            cdw11: numd >> 16,
            ..Default::default()
        };
        sqe.sgl = nvme::SglDesc::transport(128 * 1024);
        sqe
    })
}

/// An admin queue that hits a fatal error while its peer has stopped reading used to sit in
/// Closing for ever with its controller alive (and its I/O queues with it). Now the controller
/// dies as Closing begins: its I/O queue closes even while the admin socket still waits for
/// the peer (a long `closing_timeout_ms` here).
#[test]
fn stalled_admin_queue_in_closing_kills_its_controller_at_once() {
    let h = start(
        limits(|l| {
            l.max_admin_queue_depth = 128;
            l.closing_timeout_ms = 60_000;
        }),
        vec![HOST.into()],
        0,
    );
    let (mut s, _cntlid, mut io) = raw_admin_with_io(&h);
    stall_then_fatal(&mut s, big_log_pages(120));
    wait_until("the controller to die", || {
        h.target.controllers_of(NQN).is_empty()
    });
    // The I/O queue follows its controller; the stalled admin socket is still closing.
    assert!(
        closed_by_target(&mut io),
        "I/O queue of a dead controller left open"
    );
    wait_until("the I/O queue to be reaped", || {
        h.live.load(Ordering::Acquire) == 1
    });
    assert_eq!(h.target.connection_stats().closing, 1);
}

/// A connection in Closing whose peer stopped reading is shut down after
/// `closing_timeout_ms` (it used to stay there for ever, holding its slot and socket).
#[test]
fn stalled_reader_in_closing_is_shut_down_after_the_deadline() {
    let h = start(
        limits(|l| {
            l.max_admin_queue_depth = 128;
            l.closing_timeout_ms = 300;
        }),
        vec![HOST.into()],
        0,
    );
    // An I/O queue as deep as allowed (128), each slot reading 128 KiB.
    let (_admin, cntlid, _io1) = raw_admin_with_io(&h);
    let (mut s, c) = raw_connect_cmd(h.addr, NQN, HOST, 2, cntlid, 0, 127);
    assert_eq!(c.status(), Status::SUCCESS);
    let blocks = 128 * 1024 / BS;
    let reads = (0..128u16).map(|cid| {
        let mut sqe = nvseal::nvmf::host::rw_sqe(io_op::READ, 1, 0, blocks);
        sqe.cid = cid;
        sqe.flags = nvme::PSDT_SGL_MPTR_CONTIG;
        sqe.sgl = nvme::SglDesc::transport(128 * 1024);
        sqe
    });
    stall_then_fatal(&mut s, reads);
    wait_until("the stalled I/O queue to be shut down and reaped", || {
        h.live.load(Ordering::Acquire) == 2
    });
    assert_eq!(h.target.connection_stats().closing, 0);
    drain_to_close(&mut s);
    // An I/O queue's fatal error ends only that queue: the controller lives on.
    assert_eq!(h.target.controllers_of(NQN).len(), 1);
    assert_eq!(h.target.connection_count(), 2);

    // The same for an admin queue: shut down after the deadline, its controller gone.
    let (mut s, _, _io) = raw_admin_with_io(&h);
    stall_then_fatal(&mut s, big_log_pages(120));
    wait_until("the stalled admin queue to be shut down and reaped", || {
        h.live.load(Ordering::Acquire) == 2
    });
    drain_to_close(&mut s);
    assert_eq!(h.target.controllers_of(NQN).len(), 1);
}

// ------------------------------------------------------------------------------------------------
// Item 3: KATO rules.

/// A discovery controller whose host asks for KATO 0 gets `discovery_kato_ms` (120 s by
/// default, reported by Get Features), and dies after it when no Keep Alive comes.
#[test]
fn discovery_with_kato_zero_gets_a_keep_alive() {
    let h = start(Limits::default(), vec![HOST.into()], 0);
    let cfg = HostConfig {
        kato_ms: 0,
        ..host_cfg(Digests::default())
    };
    let mut d = HostQpair::connect(
        h.addr,
        DISCOVERY_NQN,
        0,
        connect::CNTLID_DYNAMIC,
        cfg.clone(),
    )
    .unwrap();
    d.enable().unwrap();
    assert_eq!(get_kato(&mut d), 120_000);
    drop(d);
    drop(h);

    let h = start(limits(|l| l.discovery_kato_ms = 200), vec![HOST.into()], 0);
    let mut d = HostQpair::connect(h.addr, DISCOVERY_NQN, 0, connect::CNTLID_DYNAMIC, cfg).unwrap();
    d.enable().unwrap();
    assert_eq!(get_kato(&mut d), 200);
    // No Keep Alive: the keep alive timer tears the controller down.
    wait_until("the discovery controller to expire", || {
        h.live.load(Ordering::Acquire) == 0
    });
    assert!(h.target.controllers_of(DISCOVERY_NQN).is_empty());
}

/// `min_kato_ms` above 0: KATO 0 on an NVM controller is refused at Connect (Connect Invalid
/// Parameters pointing at KATO) and in Set Features; smaller values are raised to it. At 0 (the
/// default) a host may switch keep alive off, as the spec allows.
#[test]
fn min_kato_is_enforced() {
    let h = start(limits(|l| l.min_kato_ms = 5000), vec![HOST.into()], 0);
    let (_s, c) = raw_connect_cmd(h.addr, NQN, HOST, 0, connect::CNTLID_DYNAMIC, 0, 15);
    assert_eq!(c.status(), Status::CONNECT_INVALID_PARAMETERS);
    assert_eq!(
        c.dw0,
        connect::invalid_param_dw0(false, 48),
        "IPO points at KATO"
    );
    let cfg = HostConfig {
        kato_ms: 1000,
        ..host_cfg(Digests::default())
    };
    let mut a = admin(&h, cfg);
    assert_eq!(get_kato(&mut a), 5000, "raised to min_kato_ms");
    assert_eq!(set_kato(&mut a, 0), Status::INVALID_FIELD);
    assert_eq!(set_kato(&mut a, 10), Status::SUCCESS);
    assert_eq!(get_kato(&mut a), 5000);
    assert_eq!(set_kato(&mut a, 9000), Status::SUCCESS);
    assert_eq!(get_kato(&mut a), 9000);
    drop(a);
    drop(h);

    let h = start(Limits::default(), vec![HOST.into()], 0);
    let mut a = admin(&h, host_cfg(Digests::default()));
    assert_eq!(
        get_kato(&mut a),
        0,
        "keep alive off when the host asks and no minimum is set"
    );
}

// ------------------------------------------------------------------------------------------------
// Item 4 (part): RLIMIT_NOFILE at start-up, and the counters over RPC.

fn serve_config(dir: &std::path::Path, extra_nvmf: &str) -> std::path::PathBuf {
    let cfg = dir.join("peers.yaml");
    std::fs::write(
        &cfg,
        format!(
            "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 20\n\
             rpc:\n  socket_path: {sock}\n  audit_log: {audit}\n\
             nvmf:\n  max_connections: 64\n{extra_nvmf}\
             bdevs:\n  - name: mem0\n    type: malloc\n    size_bytes: 1048576\n\
             subsystems:\n  - nqn: {NQN}\n    serial: PEERS1\n    allowed_hosts: [\"{HOST}\"]\n    namespaces:\n      - nsid: 1\n        bdev: mem0\n    listen:\n      - addr: 127.0.0.1\n        port: 0\n",
            sock = dir.join("rpc.sock").display(),
            audit = dir.join("audit.jsonl").display(),
        ),
    )
    .unwrap();
    cfg
}

/// `nvseal serve` raises its soft open-file limit to the hard one and logs it, and refuses to
/// start (a clear error, exit status for start-up failures) where the hard limit cannot cover
/// what the config admits. `stats.nvmf` reports the connection counters.
#[test]
fn serve_raises_the_open_file_limit_or_refuses_to_start() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let cfg = serve_config(dir.path(), "");
    let (_, hard) = nvseal::sys::process::nofile_limit().unwrap();
    let need = nvseal::server::fds_needed(&nvseal::config::Config::load(&cfg).unwrap());
    assert!(
        hard >= need + 10,
        "this machine's hard limit {hard} is too low for the test"
    );

    // Hard limit below what the config needs: refused, with the reason.
    let err_path = dir.path().join("refused.log");
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n {} && exec \"$0\" serve -c \"$1\"",
            need - 1
        ))
        .arg(env!("CARGO_BIN_EXE_nvseal"))
        .arg(&cfg)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "serve started below the open-file limit:\n{}",
                std::fs::read_to_string(&err_path).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = std::fs::read_to_string(&err_path).unwrap();
    assert!(!status.success(), "serve started below the limit: {err}");
    assert!(
        err.contains("RLIMIT_NOFILE") && err.contains("max_connections"),
        "unclear error: {err}"
    );

    // A low soft limit under a sufficient hard one: raised, logged, serving. The child inherits
    // this process's limits (nextest runs each test in its own process).
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, need - 1, hard)
        .unwrap();
    let mut s = Serve::start(&cfg);
    let line = s.wait_for("RLIMIT_NOFILE");
    assert!(line.contains(&format!("open_files_limit={hard}")), "{line}");
    let addr = addr_of(&s.wait_for("NVMe/TCP listening"));
    s.wait_for("control socket listening");
    let _silent = silent(addr);
    let mut a = HostQpair::connect(
        addr,
        NQN,
        0,
        connect::CNTLID_DYNAMIC,
        host_cfg(Digests::default()),
    )
    .unwrap();
    a.enable().unwrap();
    let sock = dir.path().join("rpc.sock");
    wait_until("stats.nvmf to count both sockets", || {
        let v =
            nvseal::rpc::client::call(&sock, "stats.nvmf", Some(serde_json::json!({}))).unwrap();
        let c = &v["connections"];
        c["connected"] == 1 && c["pre_connect"] == 1 && c["await_icreq"] == 1 && c["hosts"] == 1
    });
    drop(a);
    s.stop();
}
