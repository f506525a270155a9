//! Unit tests of `nvmf::host` (kept beside it, in their own file).

use super::*;
use std::net::TcpListener;

/// A scripted controller: answers ICReq and Connect, then sends `extra` raw bytes.
fn scripted(extra: Vec<u8>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut ic = [0u8; 128];
        s.read_exact(&mut ic).unwrap();
        let mut b = [0u8; 128];
        let resp = pdu::IcResp {
            pfv: 0,
            cpda: 0,
            digests: Digests::default(),
            maxh2cdata: 8192,
        };
        pdu::encode_ic_resp(&mut b, &resp);
        s.write_all(&b).unwrap();
        let mut cap = vec![0u8; 72 + connect::DATA_SIZE];
        s.read_exact(&mut cap).unwrap();
        let mut r = [0u8; 24];
        let cqe = Cqe {
            dw0: 7,
            ..Cqe::new(0, Status::SUCCESS)
        };
        pdu::encode_capsule_resp(&mut r, &cqe, Digests::default());
        s.write_all(&r).unwrap();
        s.write_all(&extra).unwrap();
        // Keep the socket open until the host is done.
        let mut sink = [0u8; 64];
        while s.read(&mut sink).map(|n| n > 0).unwrap_or(false) {}
    });
    addr
}

fn poll_until_err(q: &mut HostQpair) -> HostError {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Err(e) = q.poll(&mut |_| {}) {
            return e;
        }
        assert!(Instant::now() < deadline, "no error reported");
        std::thread::yield_now();
    }
}

#[test]
fn duplicate_completion_is_a_protocol_error() {
    let mut r = [0u8; 24];
    pdu::encode_capsule_resp(&mut r, &Cqe::new(0, Status::SUCCESS), Digests::default());
    let addr = scripted(r.to_vec());
    let mut q = HostQpair::connect(addr, "nqn.x", 0, 0xffff, HostConfig::default()).unwrap();
    assert_eq!(q.cntlid(), 7);
    assert!(matches!(poll_until_err(&mut q), HostError::Protocol(_)));
}

#[test]
fn unsolicited_c2h_data_and_term_req_are_reported() {
    let mut h = [0u8; MAX_HEADER_REGION];
    let d = DataHdr {
        cccid: 3,
        ttag: 0,
        datao: 0,
        datal: 4,
        flags: flags::LAST_PDU,
    };
    let n = pdu::encode_c2h_data(&mut h, &d, Digests::default(), 0);
    let mut v = h[..n].to_vec();
    v.extend_from_slice(&[1, 2, 3, 4]);
    let addr = scripted(v);
    let mut q = HostQpair::connect(addr, "nqn.x", 0, 0xffff, HostConfig::default()).unwrap();
    assert!(matches!(poll_until_err(&mut q), HostError::Protocol(_)));

    let mut t = [0u8; 24 + pdu::TERM_MAX_DATA];
    let n = pdu::encode_term_req(&mut t, true, &pdu::TermReq { fes: 2, fei: 0 }, &[]);
    let addr = scripted(t[..n].to_vec());
    let mut q = HostQpair::connect(addr, "nqn.x", 0, 0xffff, HostConfig::default()).unwrap();
    assert!(matches!(
        poll_until_err(&mut q),
        HostError::Terminated { fes: 2, fei: 0 }
    ));
}
