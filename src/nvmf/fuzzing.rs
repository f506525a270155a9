//! A driver for the whole target [`Connection`] state machine, for the `connection` fuzz
//! target (fuzz/fuzz_targets/connection.rs) and its bounded run in the test suite
//! (tests/connection_fuzz.rs). Not part of nvseal's API: hidden from the docs, stable only as
//! far as those two need it. It stays whole (1.5k lines): the script decoder, the session
//! driver and the invariant checks share one model of a session (lanes, expected R2Ts,
//! controller ids), which splitting would spread over files.
//!
//! One input is a script of operations ([`Op`], decoded from raw bytes by [`Op::decode`], so
//! any byte string is a valid script). Each session builds a fresh [`Target`] (one subsystem,
//! two RAM namespaces of 512 B and 4 KiB blocks, the fuzz host allowed) with small limits, and
//! two *lanes*: each a real loopback TCP pair whose server end is a real [`Connection`]. Lane 0
//! is meant for the admin queue, lane 1 for an I/O queue of the same controller, but any
//! operation may go to either. Operations cover the handshake (ICReq, Connect with the
//! cntlid the admin Connect returned), mutated capsules (admin and I/O commands, every SGL
//! kind, in-capsule data), H2CData answering the R2Ts the target sent (right, wrong offset,
//! too long, bad digest), property sets (CC.EN toggles, shutdown), raw bytes, H2CTermReq,
//! half-closes, namespaces going offline, removed and added, and the reactor dropping a
//! connection. Between operations the connections are polled (a bounded number of rounds).
//!
//! What every session checks, any input:
//! * nothing panics (debug assertions included: `Connection::transition` checks every
//!   request state move);
//! * the request accounting holds after every step: the per-state counts add up to
//!   [`Connection::in_flight`], which never exceeds the request slots;
//! * every byte the target sends decodes as a well-formed target-to-host PDU with the
//!   negotiated digests (data digests verified), ICResp only first, nothing after C2HTermReq;
//! * a controller reset (a successful Property Set clearing CC.EN) closes every I/O queue
//!   of that controller by the end of the step;
//! * no hang: once the host side half-closes, every connection reaches
//!   [`Connection::is_closed`] within a bounded number of polls, with nothing in flight;
//! * nothing leaks: after the connections are dropped the target counts no connection and no
//!   live controller.
//!
//! Runs on the calling thread (a fuzzer or a test), which plays the reactor. The host ends
//! never close their socket while the target may still write to it (they half-close and
//! are dropped last), so no write of the target can raise SIGPIPE in a process that does not
//! ignore it (libFuzzer's).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bdev::malloc::{self, MallocConfig};
use crate::bdev::Bdev;
use crate::nvme::{
    self, admin_op, connect, fctype, io_op, prop, Cqe, SglDesc, Sqe, Status, FABRICS_OPCODE,
};
use crate::nvmf::config::{Limits, ListenAddr, NamespaceConfig, SubsystemConfig};
use crate::nvmf::conn::Connection;
use crate::nvmf::pdu::{self, DataHdr, Digests, IcReq, PduError, PduHeader, R2t, TermReq};
use crate::nvmf::target::{PortId, Target};
use crate::types::CoreId;

/// The subsystem every session exports.
pub const NQN: &str = "nqn.2026-12.io.nvseal:fuzz";
/// The host NQN the subsystem allows (and the scripts connect as).
pub const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:f0f0f0f0-0000-4000-8000-000000000001";
/// Block sizes of namespaces 1 and 2.
const BLOCK_SIZES: [u32; 2] = [512, 4096];
/// Blocks per namespace: small, so LBA range checks are reached with one-byte LBAs.
const NS_BLOCKS: u64 = 64;
/// CC with EN and the only entry sizes an NVM controller accepts (64-byte SQE, 16-byte CQE).
pub const CC_ENABLE: u32 =
    prop::CC_EN | (6 << prop::CC_IOSQES_SHIFT) | (4 << prop::CC_IOCQES_SHIFT);
/// Poll rounds after each operation at most; fewer when the connections go idle.
const PUMP_ROUNDS: usize = 64;
/// Poll rounds the connections get to close after the host half-closed before the session
/// counts as hung. Closing needs a handful: one to read the end of stream, one to drain the
/// bdev completions.
const CLOSE_ROUNDS: usize = 10_000;
/// ... and the least time they get.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Bytes the driver writes for one operation at most (raw data, in-capsule data, H2CData).
const MAX_WRITE: usize = 96 * 1024;
/// PDU length the host side accepts from the target (a C2HData of the largest transfer).
const MAX_RX_PLEN: u32 = 1 << 20;
/// R2Ts remembered per lane for H2CData operations.
const MAX_R2TS: usize = 16;

/// The limits of a fuzz session: small queues, transfers and H2CData sizes, so that every
/// limit is reachable from a short script.
pub fn limits() -> Limits {
    Limits {
        max_connections: 4,
        max_queue_depth: 8,
        max_admin_queue_depth: 4,
        max_io_queues: 2,
        in_capsule_data_size: 4096,
        max_io_size: 16 * 1024,
        max_h2c_data_size: 4096,
        allow_digests: true,
        // Never reached within a session: what the fuzzer drives is the state machine, not
        // the clock.
        connect_timeout_ms: 600_000,
        icreq_timeout_ms: 600_000,
        closing_timeout_ms: 600_000,
        max_namespaces: 4,
        ..Limits::default()
    }
}

/// A keep alive timeout a script may ask for in Connect: longer than any session runs.
const KATO_MS: u32 = 600_000;

/// One scripted operation. `lane` is 0 or 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// ICReq with these digests, HPDA and PFV.
    IcReq {
        lane: u8,
        hdgst: bool,
        ddgst: bool,
        hpda: u8,
        pfv: u16,
    },
    /// Fabrics Connect (1024 bytes of in-capsule data). `subsys` 0 = the fuzz subsystem,
    /// 1 = discovery, 2 = an unknown NQN, 3 = the fuzz subsystem as an unknown host.
    /// `cntlid`: `None` = dynamic for the admin queue / the learned cntlid for I/O queues.
    Connect {
        lane: u8,
        qid: u16,
        sqsize: u16,
        subsys: u8,
        kato: bool,
        sq_flow_disabled: bool,
        cntlid: Option<u16>,
    },
    /// Property Set: `sel` 0 = CC enable, 1 = CC 0 (reset), 2 = CC enable + normal shutdown,
    /// 3 = CC = `value`, 4 = offset `value & 0xff` = `value`, 5 = CC with the 8-byte size.
    PropertySet { lane: u8, sel: u8, value: u32 },
    /// Property Get of CAP (8 bytes), VS, CC, CSTS or offset `raw` (`sel` 0..=4).
    PropertyGet { lane: u8, sel: u8, raw: u8 },
    /// An admin command (opcode from [`ADMIN_OPS`] by `sel`, else `raw_opcode`) with a
    /// Transport SGL of `sgl_len` bytes.
    Admin {
        lane: u8,
        sel: u8,
        raw_opcode: u8,
        nsid: u8,
        cdw10: u32,
        cdw11: u32,
        sgl_len: u16,
    },
    /// An I/O command (opcode from [`IO_OPS`] by `sel`, else `raw_opcode`) on namespace
    /// `nsid`, `nlb + 1` blocks at `slba` (Dataset Management: `nlb + 1` ranges). `flags`:
    /// bit 0 FUA (Dataset Management: deallocate), bits 1-2 SGL kind (Transport Data Block,
    /// in-capsule Data Block, Keyed Data Block, type `raw_opcode`), bit 3 send the data in the
    /// capsule, bit 4 use `len` as the SGL length instead of the command's size, bit 5 a bad
    /// data digest, bit 6 Dataset Management ranges as raw bytes (else valid ones).
    Io {
        lane: u8,
        sel: u8,
        raw_opcode: u8,
        nsid: u8,
        slba: u16,
        nlb: u8,
        flags: u8,
        len: u16,
    },
    /// H2CData for the `pick`-th R2T the lane saw (or, with none or flag bit 3, for a made-up
    /// transfer tag). `len` 0 = the rest of the R2T, up to MAXH2CDATA. `flags`: bit 0 LAST_PDU, bit 1 an offset
    /// off by one block, bit 2 one byte more than asked, bit 3 made-up tag, bit 4 a bad data
    /// digest.
    H2c {
        lane: u8,
        pick: u8,
        flags: u8,
        len: u16,
    },
    /// Raw bytes to the lane's socket.
    Raw { lane: u8, bytes: Vec<u8> },
    /// Polls every connection up to `rounds` more times.
    Poll { rounds: u8 },
    /// The host half-closes the lane (no more bytes from it; the target sees end of stream).
    CloseClient { lane: u8 },
    /// H2CTermReq with this FES.
    TermReq { lane: u8, fes: u8 },
    /// The control plane takes namespace `nsid` offline or brings it online.
    NsOnline { nsid: u8, online: bool },
    /// The control plane removes namespace `nsid` if it exists (without waiting for I/O to
    /// drain), or adds a fresh RAM namespace there.
    NsSwap { nsid: u8 },
    /// The reactor drops the lane's connection object (as at target shutdown).
    DropConnection { lane: u8 },
}

/// Admin opcodes an [`Op::Admin`] picks from.
pub const ADMIN_OPS: [u8; 7] = [
    admin_op::IDENTIFY,
    admin_op::GET_LOG_PAGE,
    admin_op::SET_FEATURES,
    admin_op::GET_FEATURES,
    admin_op::KEEP_ALIVE,
    admin_op::ASYNC_EVENT_REQUEST,
    admin_op::ABORT,
];

/// I/O opcodes an [`Op::Io`] picks from.
pub const IO_OPS: [u8; 5] = [
    io_op::READ,
    io_op::WRITE,
    io_op::FLUSH,
    io_op::WRITE_ZEROES,
    io_op::DATASET_MANAGEMENT,
];

/// Number of operation kinds (the low nibble of an operation's first byte, modulo this).
const OP_KINDS: u8 = 14;

/// Reads script bytes; past the end every read is 0, so any input decodes.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
}

impl Op {
    /// Decodes the next operation; `None` at the end of the script.
    fn decode(r: &mut Reader<'_>) -> Option<Op> {
        if r.done() {
            return None;
        }
        let b = r.u8();
        let lane = b >> 7;
        Some(match (b & 0x7f) % OP_KINDS {
            0 => {
                let f = r.u8();
                Op::IcReq {
                    lane,
                    hdgst: f & 1 != 0,
                    ddgst: f & 2 != 0,
                    hpda: (f >> 2) & 0x1f,
                    pfv: u16::from(f >> 7),
                }
            }
            1 => {
                let qid = u16::from(r.u8());
                let sqsize = u16::from(r.u8());
                let f = r.u8();
                let cntlid = r.u16();
                Op::Connect {
                    lane,
                    qid,
                    sqsize,
                    subsys: f & 3,
                    kato: f & 4 != 0,
                    sq_flow_disabled: f & 8 != 0,
                    cntlid: (f & 16 != 0).then_some(cntlid),
                }
            }
            2 => Op::PropertySet {
                lane,
                sel: r.u8() % 6,
                value: r.u32(),
            },
            3 => Op::PropertyGet {
                lane,
                sel: r.u8() % 5,
                raw: r.u8(),
            },
            4 => Op::Admin {
                lane,
                sel: r.u8(),
                raw_opcode: r.u8(),
                nsid: r.u8(),
                cdw10: r.u32(),
                cdw11: r.u32(),
                sgl_len: r.u16(),
            },
            5 => Op::Io {
                lane,
                sel: r.u8(),
                raw_opcode: r.u8(),
                nsid: r.u8(),
                slba: r.u16(),
                nlb: r.u8(),
                flags: r.u8(),
                len: r.u16(),
            },
            6 => Op::H2c {
                lane,
                pick: r.u8(),
                flags: r.u8(),
                len: r.u16(),
            },
            7 => {
                let n = usize::from(r.u8());
                let bytes = (0..n).map(|_| r.u8()).collect();
                Op::Raw { lane, bytes }
            }
            8 => Op::Poll { rounds: r.u8() },
            9 => Op::CloseClient { lane },
            10 => Op::TermReq { lane, fes: r.u8() },
            11 => {
                let v = r.u8();
                Op::NsOnline {
                    nsid: v & 0x7f,
                    online: v & 0x80 != 0,
                }
            }
            12 => Op::NsSwap { nsid: r.u8() },
            _ => Op::DropConnection { lane },
        })
    }

    /// Appends the bytes [`Op::decode`] reads back as this operation.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let head = |kind: u8, lane: u8| kind | ((lane & 1) << 7);
        match *self {
            Op::IcReq {
                lane,
                hdgst,
                ddgst,
                hpda,
                pfv,
            } => {
                out.push(head(0, lane));
                out.push(
                    u8::from(hdgst)
                        | (u8::from(ddgst) << 1)
                        | ((hpda & 0x1f) << 2)
                        | (u8::from(pfv != 0) << 7),
                );
            }
            Op::Connect {
                lane,
                qid,
                sqsize,
                subsys,
                kato,
                sq_flow_disabled,
                cntlid,
            } => {
                out.push(head(1, lane));
                out.push(qid as u8);
                out.push(sqsize as u8);
                out.push(
                    (subsys & 3)
                        | (u8::from(kato) << 2)
                        | (u8::from(sq_flow_disabled) << 3)
                        | (u8::from(cntlid.is_some()) << 4),
                );
                out.extend_from_slice(&cntlid.unwrap_or(0).to_le_bytes());
            }
            Op::PropertySet { lane, sel, value } => {
                out.push(head(2, lane));
                out.push(sel);
                out.extend_from_slice(&value.to_le_bytes());
            }
            Op::PropertyGet { lane, sel, raw } => {
                out.extend_from_slice(&[head(3, lane), sel, raw]);
            }
            Op::Admin {
                lane,
                sel,
                raw_opcode,
                nsid,
                cdw10,
                cdw11,
                sgl_len,
            } => {
                out.extend_from_slice(&[head(4, lane), sel, raw_opcode, nsid]);
                out.extend_from_slice(&cdw10.to_le_bytes());
                out.extend_from_slice(&cdw11.to_le_bytes());
                out.extend_from_slice(&sgl_len.to_le_bytes());
            }
            Op::Io {
                lane,
                sel,
                raw_opcode,
                nsid,
                slba,
                nlb,
                flags,
                len,
            } => {
                out.extend_from_slice(&[head(5, lane), sel, raw_opcode, nsid]);
                out.extend_from_slice(&slba.to_le_bytes());
                out.extend_from_slice(&[nlb, flags]);
                out.extend_from_slice(&len.to_le_bytes());
            }
            Op::H2c {
                lane,
                pick,
                flags,
                len,
            } => {
                out.extend_from_slice(&[head(6, lane), pick, flags]);
                out.extend_from_slice(&len.to_le_bytes());
            }
            Op::Raw { lane, ref bytes } => {
                let n = bytes.len().min(255);
                out.extend_from_slice(&[head(7, lane), n as u8]);
                out.extend_from_slice(&bytes[..n]);
            }
            Op::Poll { rounds } => out.extend_from_slice(&[head(8, 0), rounds]),
            Op::CloseClient { lane } => out.push(head(9, lane)),
            Op::TermReq { lane, fes } => out.extend_from_slice(&[head(10, lane), fes]),
            Op::NsOnline { nsid, online } => {
                out.extend_from_slice(&[head(11, 0), (nsid & 0x7f) | (u8::from(online) << 7)])
            }
            Op::NsSwap { nsid } => out.extend_from_slice(&[head(12, 0), nsid]),
            Op::DropConnection { lane } => out.push(head(13, lane)),
        }
    }
}

/// Encodes a script.
pub fn script(ops: &[Op]) -> Vec<u8> {
    let mut v = Vec::new();
    for op in ops {
        op.encode(&mut v);
    }
    v
}

/// What a session saw, for tests that check a script got where it meant to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Operations run.
    pub ops: usize,
    /// PDUs received from the target, all lanes.
    pub pdus: usize,
    /// CapsuleResps, and how many of them reported success.
    pub completions: usize,
    pub successes: usize,
    /// Completions with Command Aborted due to SQ Deletion (a controller reset).
    pub sq_deleted: usize,
    pub r2ts: usize,
    pub c2h_data: usize,
    pub term_reqs: usize,
    /// An admin queue / an I/O queue Connect succeeded.
    pub admin_connected: bool,
    pub io_connected: bool,
    /// Connections the target closed on its own before the host half-closed (fatal PDU,
    /// controller reset, ...).
    pub closed_by_target: usize,
}

/// One lane: the host end of a loopback TCP pair and the target [`Connection`] on the other.
struct Lane {
    /// Host end; half-closed by [`Op::CloseClient`], dropped only at the end of the session.
    client: TcpStream,
    client_open: bool,
    conn: Option<Connection>,
    /// Target bytes not decoded yet.
    rx: Vec<u8>,
    /// Digests as the ICResp granted them (none before).
    dg: Digests,
    /// The digests this lane asked for, applied when the ICResp comes back.
    dg_asked: Digests,
    seen_ic_resp: bool,
    /// MAXH2CDATA of the ICResp.
    max_h2c: u32,
    seen_term: bool,
    r2ts: Vec<R2t>,
    next_cid: u16,
    /// Connect commands waiting for their completion: cid -> (qid, cntlid asked for).
    connects: HashMap<u16, (u16, u16)>,
    /// After a successful Connect: the controller and the queue id.
    queue: Option<(u16, u16)>,
    /// Property Sets of CC waiting for their completion: cid -> value.
    cc_sets: HashMap<u16, u32>,
    /// CC of this lane's controller as its successful Property Sets left it (admin lanes).
    cc: u32,
    closed_reported: bool,
}

/// A fuzz session: a target, its two lanes, and what was learned on the way.
pub struct Session {
    target: Arc<Target>,
    lanes: Vec<Lane>,
    /// The cntlid the last successful admin Connect returned.
    cntlid: u16,
    report: Report,
    data_seed: u32,
    /// Controllers whose reset completed during the current step.
    resets: Vec<u16>,
}

fn ram_bdev(name: &str, block_size: u32) -> Arc<dyn Bdev> {
    malloc::open(&MallocConfig {
        name: name.into(),
        num_blocks: Some(NS_BLOCKS),
        size_bytes: None,
        block_size,
        hugepages: false,
    })
    .expect("RAM bdev for a fuzz session")
}

impl Session {
    /// A fresh target and two connected lanes (nothing sent yet).
    pub fn new() -> Session {
        let mut bdevs: HashMap<String, Arc<dyn Bdev>> = HashMap::new();
        for (i, bs) in BLOCK_SIZES.iter().enumerate() {
            let name = format!("ram{i}");
            bdevs.insert(name.clone(), ram_bdev(&name, *bs));
        }
        let cfg = SubsystemConfig {
            nqn: NQN.into(),
            serial: "NVSEALFUZZ".into(),
            model: "nvseal fuzz".into(),
            namespaces: (1..=2)
                .map(|nsid| NamespaceConfig {
                    nsid,
                    bdev: format!("ram{}", nsid - 1),
                    encrypted: None,
                })
                .collect(),
            allowed_hosts: vec![HOST.into()],
            allow_any_host: false,
            listen: vec![ListenAddr {
                addr: "127.0.0.1".into(),
                port: 4420,
            }],
        };
        let target = Target::new(&[cfg], limits(), &bdevs).expect("fuzz target");
        let port: PortId = target
            .port_for("127.0.0.1:4420".parse().expect("address"))
            .expect("the subsystem's port");
        let listener = TcpListener::bind("127.0.0.1:0").expect("loopback listener");
        let addr = listener.local_addr().expect("listener address");
        let mut lanes = Vec::with_capacity(2);
        for _ in 0..2 {
            let client = TcpStream::connect(addr).expect("loopback connect");
            // Dropped with a reset rather than a FIN: thousands of sessions must not leave
            // thousands of TIME_WAIT sockets behind.
            let _ = nix::sys::socket::setsockopt(
                &client,
                nix::sys::socket::sockopt::Linger,
                &libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            );
            client.set_nonblocking(true).expect("non-blocking client");
            let _ = client.set_nodelay(true);
            let (server, _) = listener.accept().expect("loopback accept");
            let conn =
                Connection::new(server, Arc::clone(&target), CoreId(0), port).expect("connection");
            lanes.push(Lane {
                client,
                client_open: true,
                conn: Some(conn),
                rx: Vec::new(),
                dg: Digests::default(),
                dg_asked: Digests::default(),
                seen_ic_resp: false,
                max_h2c: 4096,
                seen_term: false,
                r2ts: Vec::new(),
                next_cid: 1,
                connects: HashMap::new(),
                queue: None,
                cc_sets: HashMap::new(),
                cc: 0,
                closed_reported: false,
            });
        }
        Session {
            target,
            lanes,
            cntlid: connect::CNTLID_DYNAMIC,
            report: Report::default(),
            data_seed: 1,
            resets: Vec::new(),
        }
    }

    /// The target under test.
    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }

    /// Runs one operation and polls the connections.
    pub fn step(&mut self, op: &Op) {
        self.report.ops += 1;
        let mut rounds = PUMP_ROUNDS;
        match *op {
            Op::IcReq {
                lane,
                hdgst,
                ddgst,
                hpda,
                pfv,
            } => {
                let l = &mut self.lanes[usize::from(lane)];
                l.dg_asked = Digests {
                    header: hdgst,
                    data: ddgst,
                };
                let mut b = [0u8; 128];
                let n = pdu::encode_ic_req(
                    &mut b,
                    &IcReq {
                        pfv,
                        hpda,
                        digests: l.dg_asked,
                        maxr2t: 0,
                    },
                );
                self.send(lane, &b[..n]);
            }
            Op::Connect {
                lane,
                qid,
                sqsize,
                subsys,
                kato,
                sq_flow_disabled,
                cntlid,
            } => {
                let cntlid = cntlid.unwrap_or(if qid == 0 {
                    connect::CNTLID_DYNAMIC
                } else {
                    self.cntlid
                });
                let (subnqn, hostnqn) = match subsys {
                    0 => (NQN, HOST),
                    1 => (crate::nvmf::DISCOVERY_NQN, HOST),
                    2 => ("nqn.2026-12.io.nvseal:nobody", HOST),
                    _ => (NQN, "nqn.2026-12.io.nvseal:stranger"),
                };
                let mut data = vec![0u8; connect::DATA_SIZE];
                data[connect::CNTLID_OFF..connect::CNTLID_OFF + 2]
                    .copy_from_slice(&cntlid.to_le_bytes());
                nvme::put_str(
                    &mut data[connect::SUBNQN_OFF..connect::SUBNQN_OFF + connect::NQN_FIELD_LEN],
                    subnqn,
                    0,
                );
                nvme::put_str(
                    &mut data[connect::HOSTNQN_OFF..connect::HOSTNQN_OFF + connect::NQN_FIELD_LEN],
                    hostnqn,
                    0,
                );
                let cid = self.cid(lane);
                let mut sqe = connect::ConnectCmd {
                    recfmt: 0,
                    qid,
                    sqsize,
                    cattr: if sq_flow_disabled {
                        connect::CATTR_DISABLE_SQ_FLOW
                    } else {
                        0
                    },
                    kato_ms: if kato { KATO_MS } else { 0 },
                }
                .to_sqe(cid);
                sqe.sgl = SglDesc::in_capsule(0, connect::DATA_SIZE as u32);
                self.lanes[usize::from(lane)]
                    .connects
                    .insert(cid, (qid, cntlid));
                self.capsule(lane, &sqe, &data, false);
            }
            Op::PropertySet { lane, sel, value } => {
                let (ofst, v, size8) = match sel {
                    0 => (prop::CC, CC_ENABLE, false),
                    1 => (prop::CC, 0, false),
                    2 => (prop::CC, CC_ENABLE | (1 << prop::CC_SHN_SHIFT), false),
                    3 => (prop::CC, value, false),
                    4 => (value & 0xff, value, false),
                    _ => (prop::CC, value, true),
                };
                let cid = self.cid(lane);
                if ofst == prop::CC && !size8 {
                    self.lanes[usize::from(lane)].cc_sets.insert(cid, v);
                }
                let sqe = Sqe {
                    opcode: FABRICS_OPCODE,
                    cid,
                    nsid: u32::from(fctype::PROPERTY_SET),
                    cdw10: u32::from(size8),
                    cdw11: ofst,
                    cdw12: v,
                    ..Default::default()
                };
                self.capsule(lane, &sqe, &[], false);
            }
            Op::PropertyGet { lane, sel, raw } => {
                let (ofst, size8) = match sel {
                    0 => (prop::CAP, true),
                    1 => (prop::VS, false),
                    2 => (prop::CC, false),
                    3 => (prop::CSTS, false),
                    _ => (u32::from(raw), raw & 1 != 0),
                };
                let sqe = Sqe {
                    opcode: FABRICS_OPCODE,
                    cid: self.cid(lane),
                    nsid: u32::from(fctype::PROPERTY_GET),
                    cdw10: u32::from(size8),
                    cdw11: ofst,
                    ..Default::default()
                };
                self.capsule(lane, &sqe, &[], false);
            }
            Op::Admin {
                lane,
                sel,
                raw_opcode,
                nsid,
                cdw10,
                cdw11,
                sgl_len,
            } => {
                let opcode = ADMIN_OPS
                    .get(usize::from(sel))
                    .copied()
                    .unwrap_or(raw_opcode);
                let sqe = Sqe {
                    opcode,
                    cid: self.cid(lane),
                    nsid: fuzz_nsid(nsid),
                    flags: nvme::PSDT_SGL_MPTR_CONTIG,
                    sgl: SglDesc::transport(u32::from(sgl_len)),
                    cdw10,
                    cdw11,
                    ..Default::default()
                };
                self.capsule(lane, &sqe, &[], false);
            }
            Op::Io {
                lane,
                sel,
                raw_opcode,
                nsid,
                slba,
                nlb,
                flags,
                len,
            } => {
                let opcode = IO_OPS.get(usize::from(sel)).copied().unwrap_or(raw_opcode);
                let nsid = fuzz_nsid(nsid);
                let bs = match nsid {
                    1 | 2 => BLOCK_SIZES[nsid as usize - 1],
                    _ => 512,
                };
                let mut bytes = (u32::from(nlb) + 1) * bs;
                let mut cdw10 = u32::from(slba);
                if opcode == io_op::DATASET_MANAGEMENT {
                    // NR = nlb & 0xff ranges of 16 bytes; AD from the FUA bit.
                    cdw10 = u32::from(nlb);
                    bytes = (u32::from(nlb) + 1) * 16;
                }
                if flags & 16 != 0 {
                    bytes = u32::from(len);
                }
                let in_capsule = flags & 8 != 0;
                let sgl_desc = match (flags >> 1) & 3 {
                    0 if in_capsule => SglDesc::in_capsule(0, bytes),
                    0 => SglDesc::transport(bytes),
                    1 => SglDesc::in_capsule(u64::from(len & 0xf), bytes),
                    2 => SglDesc {
                        addr: 0x1000,
                        len: bytes,
                        // Keyed SGL Data Block (type 4): RDMA only, never valid on TCP.
                        type_byte: 0x40,
                    },
                    _ => SglDesc {
                        addr: 0,
                        len: bytes,
                        type_byte: raw_opcode,
                    },
                };
                let sqe = Sqe {
                    opcode,
                    cid: self.cid(lane),
                    nsid,
                    flags: nvme::PSDT_SGL_MPTR_CONTIG,
                    sgl: sgl_desc,
                    cdw10,
                    cdw11: if opcode == io_op::DATASET_MANAGEMENT {
                        u32::from(flags & 1) << 2
                    } else {
                        0
                    },
                    cdw12: u32::from(nlb) | (u32::from(flags & 1) << 30),
                    ..Default::default()
                };
                let mut data = if in_capsule {
                    self.pattern(bytes as usize)
                } else {
                    Vec::new()
                };
                if opcode == io_op::DATASET_MANAGEMENT && flags & 64 == 0 {
                    dsm_ranges(&mut data);
                }
                self.capsule(lane, &sqe, &data, flags & 32 != 0);
            }
            Op::H2c {
                lane,
                pick,
                flags,
                len,
            } => self.h2c(lane, pick, flags, len),
            Op::Raw { lane, ref bytes } => self.send(lane, bytes),
            Op::Poll { rounds: r } => rounds = usize::from(r),
            Op::CloseClient { lane } => {
                let l = &mut self.lanes[usize::from(lane)];
                if l.client_open {
                    l.client_open = false;
                    let _ = l.client.shutdown(Shutdown::Write);
                }
            }
            Op::TermReq { lane, fes } => {
                let mut b = [0u8; 24 + pdu::TERM_MAX_DATA];
                let n = pdu::encode_term_req(
                    &mut b,
                    false,
                    &TermReq {
                        fes: u16::from(fes),
                        fei: 0,
                    },
                    &[],
                );
                self.send(lane, &b[..n]);
            }
            Op::NsOnline { nsid, online } => {
                let _ = self
                    .target
                    .set_namespace_online(NQN, u32::from(nsid), online);
            }
            Op::NsSwap { nsid } => {
                let nsid = u32::from(nsid % 5);
                let exists = self
                    .target
                    .subsystem(NQN)
                    .is_some_and(|s| s.namespace(nsid).is_some());
                if exists {
                    // Not waiting: the I/O in flight drains on the next polls.
                    let _ = self.target.remove_namespace(NQN, nsid, Duration::ZERO);
                } else if (1..=4).contains(&nsid) {
                    let bs = BLOCK_SIZES[nsid as usize % 2];
                    let _ = self.target.add_namespace(
                        NQN,
                        Some(nsid),
                        ram_bdev(&format!("swap{nsid}"), bs),
                        true,
                    );
                }
            }
            Op::DropConnection { lane } => {
                let l = &mut self.lanes[usize::from(lane)];
                if let Some(c) = l.conn.take() {
                    drop(c);
                }
            }
        }
        self.pump(rounds);
        self.check_resets();
    }

    /// A controller reset (CC.EN 1 to 0) completed during this step: every I/O queue of that
    /// controller must be closed by the end of the step's polling.
    fn check_resets(&mut self) {
        for cntlid in std::mem::take(&mut self.resets) {
            for (i, l) in self.lanes.iter().enumerate() {
                if let (Some((c, qid)), Some(conn)) = (l.queue, l.conn.as_ref()) {
                    assert!(
                        c != cntlid || qid == 0 || conn.is_closed(),
                        "lane {i}: I/O queue {qid} of controller {c} still open after its reset"
                    );
                }
            }
        }
    }

    /// Ends the session: the host half-closes every lane, the connections must close within
    /// [`CLOSE_ROUNDS`] polls with nothing in flight, and once they are dropped the target
    /// must hold no connection and no controller. Returns what the session saw.
    pub fn finish(mut self) -> Report {
        for l in &mut self.lanes {
            if l.client_open {
                l.client_open = false;
                let _ = l.client.shutdown(Shutdown::Write);
            }
        }
        let mut rounds = 0;
        let start = Instant::now();
        while self
            .lanes
            .iter()
            .any(|l| l.conn.as_ref().is_some_and(|c| !c.is_closed()))
        {
            // Both bounds must pass, so a machine too loaded to run the loopback peer in time
            // is not mistaken for a hang.
            assert!(
                rounds < CLOSE_ROUNDS || start.elapsed() < CLOSE_WAIT,
                "hang: a connection did not close within {CLOSE_ROUNDS} polls and {CLOSE_WAIT:?} after the host half-closed"
            );
            self.pump(1);
            rounds += 1;
            if rounds > CLOSE_ROUNDS {
                std::thread::sleep(Duration::from_millis(1));
            } else if rounds % 64 == 0 {
                std::thread::yield_now();
            }
        }
        for l in &mut self.lanes {
            if let Some(c) = l.conn.take() {
                assert_eq!(c.in_flight(), 0, "requests left after close");
                assert!(
                    c.state_counts().iter().all(|&n| n == 0),
                    "request state counts after close: {:?}",
                    c.state_counts()
                );
            }
        }
        assert_eq!(self.target.connection_count(), 0, "connection slots leaked");
        assert!(
            self.target.controllers_of(NQN).is_empty(),
            "a controller outlived its admin queue"
        );
        self.report
    }

    fn cid(&mut self, lane: u8) -> u16 {
        let l = &mut self.lanes[usize::from(lane)];
        let c = l.next_cid;
        l.next_cid = l.next_cid.wrapping_add(1);
        c
    }

    fn pattern(&mut self, len: usize) -> Vec<u8> {
        let len = len.min(MAX_WRITE);
        self.data_seed = self.data_seed.wrapping_add(0x9e37_79b9);
        let seed = self.data_seed;
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed).to_le_bytes()[2])
            .collect()
    }

    /// Sends a CapsuleCmd with `data` in the capsule (and its digest if negotiated; a wrong
    /// one if `bad_digest`).
    fn capsule(&mut self, lane: u8, sqe: &Sqe, data: &[u8], bad_digest: bool) {
        let dg = self.lanes[usize::from(lane)].dg;
        let mut h = [0u8; pdu::MAX_HEADER_REGION];
        let n = pdu::encode_capsule_cmd(&mut h, sqe, data.len(), dg, 0);
        let mut v = h[..n].to_vec();
        v.extend_from_slice(data);
        if dg.data && !data.is_empty() {
            let crc = pdu::crc32c(data) ^ u32::from(bad_digest);
            v.extend_from_slice(&crc.to_le_bytes());
        }
        self.send(lane, &v);
    }

    fn h2c(&mut self, lane: u8, pick: u8, flags: u8, len: u16) {
        let l = &self.lanes[usize::from(lane)];
        let dg = l.dg;
        let max_h2c = l.max_h2c;
        let r2t = match l.r2ts.len() {
            0 => None,
            n if flags & 8 == 0 => Some(l.r2ts[usize::from(pick) % n]),
            _ => None,
        };
        let r2t = r2t.unwrap_or(R2t {
            cccid: u16::from(pick),
            ttag: u16::from(pick) % 8,
            r2to: 0,
            r2tl: u32::from(len).max(1),
        });
        let mut datao = r2t.r2to;
        if flags & 2 != 0 {
            datao = datao.wrapping_add(512);
        }
        let mut datal = if len == 0 {
            r2t.r2tl.min(max_h2c)
        } else {
            u32::from(len).min(r2t.r2tl)
        };
        if flags & 4 != 0 {
            datal += 1;
        }
        let data = self.pattern(datal as usize);
        let d = DataHdr {
            cccid: r2t.cccid,
            ttag: r2t.ttag,
            datao,
            datal: data.len() as u32,
            flags: if flags & 1 != 0 {
                pdu::flags::LAST_PDU
            } else {
                0
            },
        };
        let mut h = [0u8; pdu::MAX_HEADER_REGION];
        let n = pdu::encode_h2c_data(&mut h, &d, dg, 0);
        let mut v = h[..n].to_vec();
        v.extend_from_slice(&data);
        if dg.data {
            let crc = pdu::crc32c(&data) ^ u32::from(flags & 16 != 0);
            v.extend_from_slice(&crc.to_le_bytes());
        }
        // The R2T is answered (in part): later picks go to other ones.
        let l = &mut self.lanes[usize::from(lane)];
        if let Some(p) = l
            .r2ts
            .iter()
            .position(|r| r.ttag == r2t.ttag && r.cccid == r2t.cccid)
        {
            let r = &mut l.r2ts[p];
            let sent = datal.min(r.r2tl);
            r.r2to += sent;
            r.r2tl -= sent;
            if r.r2tl == 0 {
                l.r2ts.remove(p);
            }
        }
        self.send(lane, &v);
    }

    /// Writes `bytes` to a lane's socket, polling the connections while the socket is full;
    /// gives up (drops the rest) when the target stops reading.
    fn send(&mut self, lane: u8, bytes: &[u8]) {
        let li = usize::from(lane);
        if !self.lanes[li].client_open {
            return;
        }
        let bytes = &bytes[..bytes.len().min(MAX_WRITE)];
        let mut off = 0;
        let mut stalls = 0;
        while off < bytes.len() {
            match self.lanes[li].client.write(&bytes[off..]) {
                Ok(0) => return,
                Ok(n) => {
                    off += n;
                    stalls = 0;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    stalls += 1;
                    if stalls > 8 {
                        return;
                    }
                    self.pump(PUMP_ROUNDS);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The target closed the connection.
                Err(_) => return,
            }
        }
    }

    /// Polls every connection up to `rounds` times (fewer once nothing moves), reads what
    /// the target sent, and checks the invariants after each round.
    fn pump(&mut self, rounds: usize) {
        let mut idle = 0;
        for _ in 0..rounds {
            let mut work = 0;
            for i in 0..self.lanes.len() {
                if let Some(c) = self.lanes[i].conn.as_mut() {
                    work += c.poll();
                    check_accounting(c);
                }
                work += self.drain(i);
                let l = &mut self.lanes[i];
                if l.client_open
                    && !l.closed_reported
                    && l.conn.as_ref().is_some_and(|c| c.is_closed())
                {
                    l.closed_reported = true;
                    self.report.closed_by_target += 1;
                }
            }
            if work == 0 {
                idle += 1;
                if idle >= 2 {
                    break;
                }
            } else {
                idle = 0;
            }
        }
    }

    /// Reads everything the target sent on lane `i` and decodes it; the number of reads.
    fn drain(&mut self, i: usize) -> usize {
        let mut n_reads = 0;
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.lanes[i].client.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    n_reads += 1;
                    self.lanes[i].rx.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // WouldBlock, or the target reset the connection.
                Err(_) => break,
            }
        }
        if n_reads > 0 {
            self.decode_rx(i);
        }
        n_reads
    }

    /// Decodes complete PDUs from lane `i`'s received bytes and checks them.
    fn decode_rx(&mut self, i: usize) {
        loop {
            let l = &mut self.lanes[i];
            let (header, data_len, used) = match pdu::decode(&l.rx, l.dg, MAX_RX_PLEN) {
                Ok((p, used)) => (p.header, p.data.len(), used),
                Err(PduError::Truncated { .. }) => return,
                Err(e) => panic!(
                    "the target sent a malformed PDU ({e}) on lane {i} with digests {:?}: {:02x?}",
                    l.dg,
                    &l.rx[..l.rx.len().min(64)]
                ),
            };
            l.rx.drain(..used);
            assert!(!l.seen_term, "the target sent a PDU after its C2HTermReq");
            self.report.pdus += 1;
            match header {
                PduHeader::IcResp(r) => {
                    assert!(!l.seen_ic_resp, "a second ICResp");
                    assert!(
                        (!r.digests.header || l.dg_asked.header)
                            && (!r.digests.data || l.dg_asked.data),
                        "ICResp granted a digest the host did not ask for"
                    );
                    l.seen_ic_resp = true;
                    l.dg = r.digests;
                    l.max_h2c = r.maxh2cdata.max(1);
                }
                PduHeader::C2HTermReq(_) => {
                    l.seen_term = true;
                    self.report.term_reqs += 1;
                }
                PduHeader::CapsuleResp(c) => {
                    assert!(l.seen_ic_resp, "a CapsuleResp before ICResp");
                    self.completion(i, &c);
                }
                PduHeader::C2HData(d) => {
                    assert!(l.seen_ic_resp, "C2HData before ICResp");
                    assert_eq!(d.datal as usize, data_len, "C2HData DATAL");
                    self.report.c2h_data += 1;
                }
                PduHeader::R2T(r) => {
                    assert!(l.seen_ic_resp, "R2T before ICResp");
                    assert!(r.r2tl > 0, "an R2T for no data");
                    assert!(
                        r.r2tl <= limits().max_io_size,
                        "an R2T above the largest transfer"
                    );
                    if l.r2ts.len() == MAX_R2TS {
                        l.r2ts.remove(0);
                    }
                    l.r2ts.push(r);
                    self.report.r2ts += 1;
                }
                other => panic!("the target sent a host-to-controller PDU: {other:?}"),
            }
        }
    }

    fn completion(&mut self, i: usize, c: &Cqe) {
        self.report.completions += 1;
        let st = c.status();
        if st.is_success() {
            self.report.successes += 1;
        }
        if st == Status::SQ_DELETED {
            self.report.sq_deleted += 1;
        }
        let l = &mut self.lanes[i];
        // Commands whose data never came have no R2T to answer any more.
        l.r2ts.retain(|r| r.cccid != c.cid);
        if let Some((qid, cntlid)) = l.connects.remove(&c.cid) {
            if st.is_success() {
                if qid == 0 {
                    self.cntlid = c.dw0 as u16;
                    l.queue = Some((self.cntlid, 0));
                    self.report.admin_connected = true;
                } else {
                    l.queue = Some((cntlid, qid));
                    self.report.io_connected = true;
                }
            }
        }
        if let Some(v) = l.cc_sets.remove(&c.cid) {
            if st.is_success() {
                let old = std::mem::replace(&mut l.cc, v);
                if let Some((cntlid, 0)) = l.queue {
                    if old & prop::CC_EN != 0 && v & prop::CC_EN == 0 {
                        self.resets.push(cntlid);
                    }
                }
            }
        }
    }
}

impl Default for Session {
    fn default() -> Self {
        Session::new()
    }
}

/// Request accounting of a connection: the state counts add up to the requests in flight,
/// which never exceed the slots.
fn check_accounting(c: &Connection) {
    let counts = c.state_counts();
    let sum: u32 = counts.iter().sum();
    assert_eq!(
        sum as usize,
        c.in_flight(),
        "state counts {counts:?} vs in flight {}",
        c.in_flight()
    );
    let l = limits();
    let slots = usize::from(l.max_queue_depth.max(l.max_admin_queue_depth));
    assert!(c.in_flight() <= slots, "more requests than slots");
}

/// Turns pattern bytes into Dataset Management ranges inside the namespaces (up to 8 blocks
/// each), so deallocation is reached rather than refused at the range check.
fn dsm_ranges(data: &mut [u8]) {
    for r in data.chunks_exact_mut(16) {
        let nlb = u32::from(r[0] % 8);
        let slba = u64::from(r[1]) % (NS_BLOCKS - 8);
        r[..4].fill(0);
        r[4..8].copy_from_slice(&nlb.to_le_bytes());
        r[8..16].copy_from_slice(&slba.to_le_bytes());
    }
}

/// Namespace ids a script can name with one byte: mostly the existing ones and their
/// neighbours, sometimes the special values.
fn fuzz_nsid(b: u8) -> u32 {
    match b {
        0xff => u32::MAX,
        0xfe => 0xffff_fffe,
        b => u32::from(b % 8),
    }
}

/// Runs one script (any bytes) in a fresh session and returns what it saw; panics if an
/// invariant breaks.
pub fn run(data: &[u8]) -> Report {
    let mut s = Session::new();
    let mut r = Reader { data, pos: 0 };
    while let Some(op) = Op::decode(&mut r) {
        s.step(&op);
    }
    s.finish()
}

/// The handshake most scripts start with: ICReq on both lanes (with the given digests), an
/// admin Connect on lane 0, CC.EN, an I/O queue Connect (qid 1) on lane 1.
pub fn handshake(hdgst: bool, ddgst: bool) -> Vec<Op> {
    let ic = |lane| Op::IcReq {
        lane,
        hdgst,
        ddgst,
        hpda: 0,
        pfv: 0,
    };
    let connect = |lane, qid: u16| Op::Connect {
        lane,
        qid,
        // The deepest queues the limits allow (admin 4, I/O 8), 0-based.
        sqsize: if qid == 0 { 3 } else { 7 },
        subsys: 0,
        kato: false,
        sq_flow_disabled: false,
        cntlid: None,
    };
    vec![
        ic(0),
        connect(0, 0),
        Op::PropertySet {
            lane: 0,
            sel: 0,
            value: 0,
        },
        ic(1),
        connect(1, 1),
    ]
}

/// An I/O command with everything ordinary: `nlb + 1` blocks of namespace 1 at `slba`.
pub fn io(sel: u8, slba: u16, nlb: u8, flags: u8) -> Op {
    Op::Io {
        lane: 1,
        sel,
        raw_opcode: 0,
        nsid: 1,
        slba,
        nlb,
        flags,
        len: 0,
    }
}

/// Hand-written sessions that reach deep states: the seed corpus of the fuzz target and the
/// fixed part of the suite's run. Each entry: a name and its script.
pub fn corpus() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let with = |mut ops: Vec<Op>, more: Vec<Op>| {
        ops.extend(more);
        script(&ops)
    };
    // Writes through R2T/H2CData (whole and in pieces) and in-capsule, reads back.
    out.push((
        "write_r2t_read",
        with(
            handshake(false, false),
            vec![
                io(1, 0, 7, 0),
                Op::H2c {
                    lane: 1,
                    pick: 0,
                    flags: 1,
                    len: 0,
                },
                io(1, 8, 15, 0),
                Op::H2c {
                    lane: 1,
                    pick: 0,
                    flags: 0,
                    len: 4096,
                },
                Op::H2c {
                    lane: 1,
                    pick: 0,
                    flags: 1,
                    len: 0,
                },
                io(1, 30, 3, 8),
                io(0, 0, 31, 0),
                io(2, 0, 0, 0),
                io(3, 4, 3, 0),
                io(4, 0, 1, 1 | 8),
            ],
        ),
    ));
    // The same with both digests, one of them wrong at the end.
    out.push((
        "digests",
        with(
            handshake(true, true),
            vec![
                io(1, 0, 3, 8),
                io(1, 0, 7, 0),
                Op::H2c {
                    lane: 1,
                    pick: 0,
                    flags: 1,
                    len: 0,
                },
                io(0, 0, 7, 0),
                io(1, 0, 1, 8 | 32),
            ],
        ),
    ));
    // Controller reset in the middle of a transfer, I/O on the deleted queue, enable again and
    // reconnect the queue id.
    out.push((
        "reset_mid_transfer",
        with(
            handshake(false, false),
            vec![
                io(1, 0, 15, 0),
                Op::PropertySet {
                    lane: 0,
                    sel: 1,
                    value: 0,
                },
                Op::H2c {
                    lane: 1,
                    pick: 0,
                    flags: 1,
                    len: 0,
                },
                io(0, 0, 0, 0),
                Op::PropertySet {
                    lane: 0,
                    sel: 0,
                    value: 0,
                },
                Op::Connect {
                    lane: 1,
                    qid: 1,
                    sqsize: 7,
                    subsys: 0,
                    kato: false,
                    sq_flow_disabled: false,
                    cntlid: None,
                },
            ],
        ),
    ));
    // Held AERs and Set Features around a reset; shutdown; namespaces changing under I/O.
    out.push((
        "admin_events_shutdown",
        with(
            handshake(false, false),
            vec![
                Op::Admin {
                    lane: 0,
                    sel: 5,
                    raw_opcode: 0,
                    nsid: 0,
                    cdw10: 0,
                    cdw11: 0,
                    sgl_len: 0,
                },
                Op::Admin {
                    lane: 0,
                    sel: 2,
                    raw_opcode: 0,
                    nsid: 0,
                    cdw10: u32::from(nvme::feature::ASYNC_EVENT_CONFIG),
                    cdw11: 1 << 8,
                    sgl_len: 0,
                },
                Op::Admin {
                    lane: 0,
                    sel: 2,
                    raw_opcode: 0,
                    nsid: 0,
                    cdw10: u32::from(nvme::feature::NUMBER_OF_QUEUES),
                    cdw11: 0,
                    sgl_len: 0,
                },
                io(1, 0, 7, 0),
                Op::NsOnline {
                    nsid: 1,
                    online: false,
                },
                Op::H2c {
                    lane: 1,
                    pick: 0,
                    flags: 1,
                    len: 0,
                },
                Op::NsSwap { nsid: 2 },
                Op::NsSwap { nsid: 2 },
                Op::Admin {
                    lane: 0,
                    sel: 0,
                    raw_opcode: 0,
                    nsid: 0,
                    cdw10: 1,
                    cdw11: 0,
                    sgl_len: 4096,
                },
                Op::PropertySet {
                    lane: 0,
                    sel: 2,
                    value: 0,
                },
                Op::PropertySet {
                    lane: 0,
                    sel: 1,
                    value: 0,
                },
            ],
        ),
    ));
    // Disconnects mid-transfer: the host half-closes inside a write's data; the reactor
    // drops the admin queue while the I/O queue has a command out.
    out.push((
        "disconnect_mid_transfer",
        with(
            handshake(false, false),
            vec![
                io(1, 0, 15, 0),
                Op::H2c {
                    lane: 1,
                    pick: 0,
                    flags: 0,
                    len: 1000,
                },
                Op::CloseClient { lane: 1 },
                Op::DropConnection { lane: 0 },
            ],
        ),
    ));
    // Transport errors after a good start: a bad PDU type, an H2CData nobody asked for, a
    // capsule over the in-capsule limit, and a host TermReq.
    out.push((
        "transport_errors",
        with(
            handshake(false, false),
            vec![
                Op::H2c {
                    lane: 1,
                    pick: 3,
                    flags: 8 | 1,
                    len: 512,
                },
                Op::Raw {
                    lane: 0,
                    bytes: vec![0x05, 0, 24, 0, 24, 0, 0, 0],
                },
            ],
        ),
    ));
    out
}
