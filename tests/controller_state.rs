//! Controller state conformance over real sockets (issue 12, item 7): a controller reset
//! (CC.EN 1 to 0) deletes the I/O queues and aborts held commands, I/O queues exist only while
//! the controller is enabled, Set Features Number of Queues is fixed once I/O queues exist, and
//! the log lines a peer can trigger at will from a reactor are rate-limited.

mod common;

use common::nvmf::*;
use nvseal::nvme::{fctype, feature, prop, FABRICS_OPCODE};

/// CC.EN with 64-byte SQ and 16-byte CQ entries: what every host writes to enable.
const CC_ENABLE: u32 = prop::CC_EN | (6 << prop::CC_IOSQES_SHIFT) | (4 << prop::CC_IOCQES_SHIFT);

/// A raw admin queue: ICReq, Connect (dynamic controller) as `HOST`; the stream and cntlid.
fn raw_admin(addr: SocketAddr) -> (TcpStream, u16) {
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
        &connect_data(NQN, HOST, connect::CNTLID_DYNAMIC),
        Digests::default(),
    );
    match raw_read_pdu(&mut s, Digests::default()) {
        Some((PduHeader::CapsuleResp(c), _)) => {
            assert_eq!(c.status(), Status::SUCCESS, "admin Connect");
            (s, c.dw0 as u16)
        }
        other => panic!("expected a CapsuleResp to Connect, got {other:?}"),
    }
}

/// Sends a command without data and returns its completion (the next PDU must be it).
fn raw_cmd(s: &mut TcpStream, sqe: &Sqe) -> nvme::Cqe {
    raw_capsule(s, sqe, &[], Digests::default());
    match raw_read_pdu(s, Digests::default()) {
        Some((PduHeader::CapsuleResp(c), _)) => {
            assert_eq!(c.cid, sqe.cid, "completion of the command just sent");
            c
        }
        other => panic!("expected a CapsuleResp, got {other:?}"),
    }
}

fn prop_set_sqe(cid: u16, value: u32) -> Sqe {
    Sqe {
        opcode: FABRICS_OPCODE,
        cid,
        nsid: u32::from(fctype::PROPERTY_SET),
        cdw11: prop::CC,
        cdw12: value,
        ..Default::default()
    }
}

fn csts(s: &mut TcpStream, cid: u16) -> u32 {
    let c = raw_cmd(
        s,
        &Sqe {
            opcode: FABRICS_OPCODE,
            cid,
            nsid: u32::from(fctype::PROPERTY_GET),
            cdw11: prop::CSTS,
            ..Default::default()
        },
    );
    assert_eq!(c.status(), Status::SUCCESS, "Property Get CSTS");
    c.dw0
}

fn flush_sqe(cid: u16) -> Sqe {
    Sqe {
        opcode: io_op::FLUSH,
        cid,
        nsid: 1,
        ..Default::default()
    }
}

fn number_of_queues_sqe(cid: u16, set: bool, queues: u32) -> Sqe {
    Sqe {
        opcode: if set {
            admin_op::SET_FEATURES
        } else {
            admin_op::GET_FEATURES
        },
        cid,
        cdw10: u32::from(feature::NUMBER_OF_QUEUES),
        cdw11: (queues - 1) | ((queues - 1) << 16),
        ..Default::default()
    }
}

/// After a controller reset, what a deleted I/O queue's socket yields for a command: never a
/// success. The target either already closed it (end of stream or reset) or refuses the
/// command with Command Aborted due to SQ Deletion and then closes.
fn expect_deleted_queue(s: &mut TcpStream, cid: u16) {
    // The write may fail if the target already closed the socket.
    let mut h = [0u8; pdu::MAX_HEADER_REGION];
    let n = pdu::encode_capsule_cmd(&mut h, &flush_sqe(cid), 0, Digests::default(), 0);
    let _ = s.write_all(&h[..n]);
    if let Some((p, _)) = raw_read_pdu(s, Digests::default()) {
        match p {
            PduHeader::CapsuleResp(c) => {
                assert_eq!(c.cid, cid);
                assert_eq!(
                    c.status(),
                    Status::SQ_DELETED,
                    "I/O on a queue a controller reset deleted"
                );
            }
            other => panic!("unexpected PDU on a deleted I/O queue: {other:?}"),
        }
    }
    let mut rest = [0u8; 64];
    assert_eq!(
        s.read(&mut rest).unwrap_or(0),
        0,
        "the deleted I/O queue's connection is closed by the target"
    );
}

#[test]
fn controller_reset_deletes_io_queues_and_aborts_held_commands() {
    let h = start(Limits::default(), vec![HOST.into()], 0);
    let (mut a, cntlid) = raw_admin(h.addr);
    assert_eq!(
        raw_cmd(&mut a, &prop_set_sqe(2, CC_ENABLE)).status(),
        Status::SUCCESS
    );
    assert_ne!(csts(&mut a, 3) & prop::CSTS_RDY, 0, "ready after enable");
    let (st, mut q1) = raw_io_connect(h.addr, cntlid, 1);
    assert_eq!(st, Status::SUCCESS, "I/O queue 1 while enabled");
    let (st, mut q2) = raw_io_connect(h.addr, cntlid, 2);
    assert_eq!(st, Status::SUCCESS, "I/O queue 2 while enabled");
    assert_eq!(raw_cmd(&mut q1, &flush_sqe(10)).status(), Status::SUCCESS);
    assert_eq!(h.target.connection_count(), 3);

    // An Asynchronous Event Request is held on the admin queue...
    raw_capsule(
        &mut a,
        &Sqe {
            opcode: admin_op::ASYNC_EVENT_REQUEST,
            cid: 4,
            ..Default::default()
        },
        &[],
        Digests::default(),
    );
    // ... until the host resets the controller: the reset aborts it, then completes.
    raw_capsule(&mut a, &prop_set_sqe(5, 0), &[], Digests::default());
    let mut got = HashMap::new();
    for _ in 0..2 {
        match raw_read_pdu(&mut a, Digests::default()) {
            Some((PduHeader::CapsuleResp(c), _)) => {
                got.insert(c.cid, c.status());
            }
            other => panic!("expected completions of the AER and the reset, got {other:?}"),
        }
    }
    assert_eq!(got.get(&4), Some(&Status::SQ_DELETED), "held AER aborted");
    assert_eq!(got.get(&5), Some(&Status::SUCCESS), "CC.EN cleared");
    assert_eq!(csts(&mut a, 6) & prop::CSTS_RDY, 0, "not ready after reset");

    // Both I/O queues are gone: their commands are refused and the target closes them.
    expect_deleted_queue(&mut q1, 11);
    expect_deleted_queue(&mut q2, 12);
    wait_until("deleted I/O queues reaped", || {
        h.target.connection_count() == 1
    });

    // While disabled, no I/O queue may be created.
    let (st, _) = raw_io_connect(h.addr, cntlid, 1);
    assert_eq!(
        st,
        Status::COMMAND_SEQUENCE_ERROR,
        "I/O queue Connect before CC.EN=1 again"
    );
    // The admin queue survived the reset: enabling again works, and the queue ids are free.
    assert_eq!(
        raw_cmd(&mut a, &prop_set_sqe(7, CC_ENABLE)).status(),
        Status::SUCCESS
    );
    let (st, mut q1) = raw_io_connect(h.addr, cntlid, 1);
    assert_eq!(
        st,
        Status::SUCCESS,
        "queue id 1 connects again after re-enable"
    );
    assert_eq!(raw_cmd(&mut q1, &flush_sqe(13)).status(), Status::SUCCESS);
}

#[test]
fn reset_and_reenable_in_one_go_still_deletes_the_old_queues() {
    // The host clears and sets CC.EN back to back: the old I/O queue still goes (a generation,
    // not the current CC.EN, decides), and its id can be connected again at once even if the
    // old connection has not been reaped yet.
    let h = start(Limits::default(), vec![HOST.into()], 0);
    let (mut a, cntlid) = raw_admin(h.addr);
    assert_eq!(
        raw_cmd(&mut a, &prop_set_sqe(2, CC_ENABLE)).status(),
        Status::SUCCESS
    );
    let (st, mut old) = raw_io_connect(h.addr, cntlid, 1);
    assert_eq!(st, Status::SUCCESS);
    raw_capsule(&mut a, &prop_set_sqe(3, 0), &[], Digests::default());
    raw_capsule(&mut a, &prop_set_sqe(4, CC_ENABLE), &[], Digests::default());
    for cid in [3, 4] {
        match raw_read_pdu(&mut a, Digests::default()) {
            Some((PduHeader::CapsuleResp(c), _)) => {
                assert_eq!((c.cid, c.status()), (cid, Status::SUCCESS))
            }
            other => panic!("expected a CapsuleResp, got {other:?}"),
        }
    }
    let (st, mut new) = raw_io_connect(h.addr, cntlid, 1);
    assert_eq!(st, Status::SUCCESS, "queue id 1 is free after the reset");
    expect_deleted_queue(&mut old, 10);
    assert_eq!(raw_cmd(&mut new, &flush_sqe(11)).status(), Status::SUCCESS);
}

#[test]
fn io_queue_connect_needs_an_enabled_ready_controller() {
    let h = start(Limits::default(), vec![HOST.into()], 0);
    let (mut a, cntlid) = raw_admin(h.addr);
    let (st, _) = raw_io_connect(h.addr, cntlid, 1);
    assert_eq!(st, Status::COMMAND_SEQUENCE_ERROR, "before CC.EN=1");
    // CC.EN with entry sizes an NVM controller cannot use: CSTS.CFS, never ready.
    assert_eq!(
        raw_cmd(&mut a, &prop_set_sqe(2, prop::CC_EN)).status(),
        Status::SUCCESS
    );
    assert_ne!(csts(&mut a, 3) & prop::CSTS_CFS, 0);
    let (st, _) = raw_io_connect(h.addr, cntlid, 1);
    assert_eq!(
        st,
        Status::COMMAND_SEQUENCE_ERROR,
        "controller fatal status"
    );
    // Admin commands other than Fabrics ones are refused before enable too.
    let (mut b, _) = raw_admin(h.addr);
    let c = raw_cmd(&mut b, &number_of_queues_sqe(2, false, 1));
    assert_eq!(c.status(), Status::COMMAND_SEQUENCE_ERROR);
}

#[test]
fn number_of_queues_is_fixed_once_io_queues_exist() {
    let h = start(Limits::default(), vec![HOST.into()], 0);
    let (mut a, cntlid) = raw_admin(h.addr);
    assert_eq!(
        raw_cmd(&mut a, &prop_set_sqe(2, CC_ENABLE)).status(),
        Status::SUCCESS
    );
    let c = raw_cmd(&mut a, &number_of_queues_sqe(3, true, 4));
    assert_eq!(c.status(), Status::SUCCESS, "before any I/O queue");
    assert_eq!(c.dw0, 3 | (3 << 16), "4 queues granted");
    let (st, mut q1) = raw_io_connect(h.addr, cntlid, 1);
    assert_eq!(st, Status::SUCCESS);

    // With an I/O queue connected the count may not change, in either direction.
    for (cid, n) in [(4, 1), (5, 8), (6, 4)] {
        let c = raw_cmd(&mut a, &number_of_queues_sqe(cid, true, n));
        assert_eq!(
            c.status(),
            Status::COMMAND_SEQUENCE_ERROR,
            "Set Number of Queues ({n}) with I/O queues"
        );
    }
    let c = raw_cmd(&mut a, &number_of_queues_sqe(7, false, 1));
    assert_eq!(c.status(), Status::SUCCESS, "Get is always fine");
    assert_eq!(c.dw0, 3 | (3 << 16), "still 4 queues granted");
    let (st, _) = raw_io_connect(h.addr, cntlid, 4);
    assert_eq!(st, Status::SUCCESS, "queue 4 of the 4 granted");
    let (st, _) = raw_io_connect(h.addr, cntlid, 5);
    assert_eq!(
        st,
        Status::CONNECT_INVALID_PARAMETERS,
        "queue 5: above the grant"
    );
    assert_eq!(raw_cmd(&mut q1, &flush_sqe(20)).status(), Status::SUCCESS);

    // A controller reset deletes the I/O queues: the count may be set again.
    assert_eq!(
        raw_cmd(&mut a, &prop_set_sqe(8, 0)).status(),
        Status::SUCCESS
    );
    assert_eq!(
        raw_cmd(&mut a, &prop_set_sqe(9, CC_ENABLE)).status(),
        Status::SUCCESS
    );
    let c = raw_cmd(&mut a, &number_of_queues_sqe(10, true, 2));
    assert_eq!(c.status(), Status::SUCCESS, "after the reset");
    assert_eq!(c.dw0, 1 | (1 << 16));
}

#[test]
fn log_lines_peers_can_trigger_are_rate_limited() {
    let logs = common::capture_logs();
    let h = start(Limits::default(), vec![HOST.into()], 0);
    // Each kind of event, again and again from fresh sockets: a PDU a host must never send
    // (fatal: C2HTermReq), and a host terminating the connection (H2CTermReq).
    const EACH: usize = 150;
    let mut fatal_peers = Vec::new();
    let mut term_peers = Vec::new();
    for _ in 0..EACH {
        let mut s = raw_connect(h.addr, Digests::default());
        fatal_peers.push(format!("Some({})", s.local_addr().unwrap()));
        let mut b = [0u8; 24];
        let n = pdu::encode_capsule_resp(&mut b, &nvme::Cqe::default(), Digests::default());
        s.write_all(&b[..n]).unwrap();
        expect_term(&mut s, Fes::InvalidHeaderField);

        let mut s = raw_connect(h.addr, Digests::default());
        term_peers.push(format!("Some({})", s.local_addr().unwrap()));
        let mut t = [0u8; 24 + pdu::TERM_MAX_DATA];
        let n = pdu::encode_term_req(&mut t, false, &pdu::TermReq { fes: 1, fei: 0 }, &[]);
        s.write_all(&t[..n]).unwrap();
        let mut rest = [0u8; 8];
        assert_eq!(s.read(&mut rest).unwrap_or(0), 0, "closed after H2CTermReq");
    }
    // Once the bucket has refilled, the next line gets through and says how many were
    // dropped before it.
    std::thread::sleep(Duration::from_millis(500));
    let mut s = raw_connect(h.addr, Digests::default());
    let last = format!("Some({})", s.local_addr().unwrap());
    let mut b = [0u8; 24];
    let n = pdu::encode_capsule_resp(&mut b, &nvme::Cqe::default(), Digests::default());
    s.write_all(&b[..n]).unwrap();
    expect_term(&mut s, Fes::InvalidHeaderField);
    wait_until("connections reaped", || h.target.connection_count() == 0);
    let text = logs.text();
    let count = |what: &str, peers: &[String]| {
        text.lines()
            .filter(|l| l.contains(what) && peers.iter().any(|p| l.contains(p.as_str())))
            .count()
    };
    let fatal = count("fatal NVMe/TCP error", &fatal_peers);
    let term = count("host terminated the connection", &term_peers);
    // The first ones reach the log (with the peer that caused them); a flood does not.
    assert!(fatal >= 1, "the first fatal PDU is logged");
    assert!(term >= 1, "the first termination is logged");
    assert!(
        fatal + term < EACH,
        "{EACH} fatal PDUs and {EACH} terminations gave {fatal} + {term} log lines"
    );
    let after = text
        .lines()
        .find(|l| l.contains("fatal NVMe/TCP error") && l.contains(last.as_str()))
        .expect("the fatal PDU after the pause is logged");
    assert!(
        after.contains("suppressed_before=") && !after.contains("suppressed_before=0"),
        "the line after a suppressed stretch says how many were dropped: {after}"
    );
}
