//! The NVMe/TCP initiator side: one non-blocking host queue pair ([`HostQpair`]) that connects
//! to any NVMe/TCP controller, negotiates ICReq/ICResp, issues Fabrics Connect (admin or I/O
//! queue), and then submits commands and polls completions. Writes go in-capsule when they fit
//! the controller's in-capsule size, otherwise by R2T/H2CData; reads arrive as C2HData (with or
//! without the SUCCESS flag). Digests are optional.
//!
//! This file stays whole (about 1,000 lines without its tests, which live in `host/tests.rs`):
//! it is one state machine, the host queue pair, whose submit, receive and completion paths all
//! work on the same private slot table; splitting it would mean making that table crate-visible.
//!
//! Thread model: a `HostQpair` is owned by one thread (a `nvseal perf` worker or a test) and
//! driven by [`HostQpair::poll`]. Every slot owns a preallocated buffer of `max_io_size` bytes;
//! after `connect` the submit/poll path allocates nothing. The blocking helpers (`connect`,
//! `identify_*`, `enable`, `admin_cmd`) are for setup and tests: they spin on `poll` with a
//! timeout.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::nvme::identify::IDENTIFY_SIZE;
use crate::nvme::{
    admin_op, cns, connect, fctype, io_op, prop, Cqe, SglDesc, Sqe, Status, FABRICS_OPCODE,
    PSDT_SGL_MPTR_CONTIG,
};
use crate::nvmf::pdu::{
    self, flags, CommonHeader, DataHdr, Digests, IcReq, Layout, PduError, PduHeader, CH_LEN,
    DIGEST_LEN, MAX_HEADER_REGION,
};

/// Staging buffer for received bytes.
const RX_BUF_SIZE: usize = 64 * 1024;
const MAX_IOV: usize = 64;
/// C2HData runs of at least this many bytes bypass the staging buffer.
const DIRECT_READ_MIN: usize = 8 * 1024;

/// Host queue pair settings.
#[derive(Clone, Debug)]
pub struct HostConfig {
    pub hostnqn: String,
    pub hostid: [u8; 16],
    /// Digests to request (the controller may grant fewer).
    pub digests: Digests,
    /// Queue depth (Connect SQSIZE + 1).
    pub queue_depth: u16,
    /// Keep alive timeout requested in the admin Connect (ms, 0 = none).
    pub kato_ms: u32,
    /// Per-slot buffer size: the largest transfer this queue pair can do.
    pub max_io_size: u32,
    /// Writes up to this many bytes go in-capsule (clamp it to the controller's IOCCSZ - 64;
    /// 0 = always use R2T).
    pub in_capsule_max: u32,
    /// Ask the controller to disable SQ flow control (lets it use the C2HData SUCCESS flag).
    pub disable_sqflow: bool,
    /// Timeout of the blocking setup helpers.
    pub timeout: Duration,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000000".into(),
            hostid: [0; 16],
            digests: Digests::default(),
            queue_depth: 32,
            kato_ms: 0,
            max_io_size: 128 * 1024,
            in_capsule_max: 8192,
            disable_sqflow: true,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Host-side errors.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("bad PDU from the controller: {0}")]
    Pdu(#[from] PduError),
    #[error("protocol violation by the controller: {0}")]
    Protocol(&'static str),
    #[error("controller terminated the connection: FES {fes:#x}, FEI {fei:#x}")]
    Terminated { fes: u16, fei: u32 },
    #[error("command failed: {status:?} (dw0 {dw0:#x})")]
    Status { status: Status, dw0: u32 },
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("connection closed by the controller")]
    Closed,
    #[error("no free command slot")]
    Busy,
    #[error("transfer of {0} bytes is larger than the slot buffers")]
    TooLarge(u32),
    /// A broken invariant on the host side (not the controller's doing).
    #[error("host-side error: {0}")]
    Internal(&'static str),
}

/// Direction of a command's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    None,
    /// Host to controller (the slot buffer's first `len` bytes are sent).
    ToCtrl,
    /// Controller to host (received into the slot buffer).
    FromCtrl,
}

/// A finished command as `poll` hands it over. `data` is the received data for reads.
pub struct Completion<'a> {
    pub tag: u64,
    pub cqe: Cqe,
    pub data: &'a [u8],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tx {
    Idle,
    /// CapsuleCmd, with `data` bytes of in-capsule data.
    Capsule {
        data: usize,
    },
    /// H2CData from `off`, `len` bytes.
    H2c {
        off: usize,
        len: usize,
        last: bool,
    },
}

struct Slot {
    busy: bool,
    /// Its completion is decoded (queued in `ready`); later PDUs for it are protocol errors.
    done: bool,
    tag: u64,
    sqe: Sqe,
    dir: Dir,
    len: usize,
    buf: Box<[u8]>,
    tx: Tx,
    hdr: [u8; MAX_HEADER_REGION],
    hdr_len: usize,
    ddgst: [u8; DIGEST_LEN],
    tx_off: usize,
    queued: bool,
    /// Current R2T window end and transfer tag.
    r2t_end: usize,
    ttag: u16,
    c2h_done: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rx {
    Header,
    Data {
        slot: usize,
        off: usize,
        left: usize,
    },
    Digest {
        slot: usize,
        success: bool,
    },
}

/// One NVMe/TCP host queue pair.
pub struct HostQpair {
    stream: TcpStream,
    cfg: HostConfig,
    dg: Digests,
    cpda: u8,
    maxh2cdata: u32,
    qid: u16,
    cntlid: u16,
    slots: Vec<Slot>,
    free: Vec<usize>,
    tx_queue: VecDeque<usize>,
    rx_buf: Box<[u8]>,
    rx_pos: usize,
    rx_len: usize,
    rx: Rx,
    rx_hdr: [u8; MAX_HEADER_REGION],
    rx_have: usize,
    rx_layout: Option<(CommonHeader, Layout)>,
    rx_dig: [u8; DIGEST_LEN],
    rx_dig_have: usize,
    rx_crc: u32,
    /// Completions decoded but not yet handed out (C2HData SUCCESS, CapsuleResp).
    ready: VecDeque<(usize, Cqe)>,
    /// The C2HData being received carries the SUCCESS flag.
    pending_success: bool,
}

impl HostQpair {
    /// Connects TCP, exchanges ICReq/ICResp, and issues Fabrics Connect for queue `qid` of
    /// subsystem `subnqn` (`cntlid` = 0xffff for an admin queue, the admin queue's cntlid for an
    /// I/O queue). Blocking, bounded by `cfg.timeout`.
    pub fn connect(
        addr: SocketAddr,
        subnqn: &str,
        qid: u16,
        cntlid: u16,
        cfg: HostConfig,
    ) -> Result<HostQpair, HostError> {
        let mut q = HostQpair::connect_transport(addr, cfg)?;
        q.fabrics_connect(subnqn, qid, cntlid)?;
        Ok(q)
    }

    /// Connects TCP and exchanges ICReq/ICResp only (no Fabrics Connect yet).
    pub fn connect_transport(addr: SocketAddr, cfg: HostConfig) -> Result<HostQpair, HostError> {
        let stream = TcpStream::connect_timeout(&addr, cfg.timeout)?;
        stream.set_nodelay(true)?;
        let mut q = HostQpair::from_stream(stream, cfg)?;
        q.ic_exchange()?;
        Ok(q)
    }

    /// The socket, for fault injection in tests (writing raw bytes) or socket options.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Wraps a connected stream (no PDUs exchanged yet); allocates every slot buffer.
    pub fn from_stream(stream: TcpStream, cfg: HostConfig) -> Result<HostQpair, HostError> {
        stream.set_nonblocking(true)?;
        let depth = usize::from(cfg.queue_depth.max(2));
        let slots = (0..depth)
            .map(|_| Slot {
                busy: false,
                done: false,
                tag: 0,
                sqe: Sqe::default(),
                dir: Dir::None,
                len: 0,
                buf: vec![0u8; cfg.max_io_size.max(connect::DATA_SIZE as u32) as usize]
                    .into_boxed_slice(),
                tx: Tx::Idle,
                hdr: [0; MAX_HEADER_REGION],
                hdr_len: 0,
                ddgst: [0; DIGEST_LEN],
                tx_off: 0,
                queued: false,
                r2t_end: 0,
                ttag: 0,
                c2h_done: 0,
            })
            .collect();
        Ok(HostQpair {
            stream,
            dg: Digests::default(),
            cpda: 0,
            maxh2cdata: 0,
            qid: 0,
            cntlid: 0,
            slots,
            free: (0..depth).rev().collect(),
            tx_queue: VecDeque::with_capacity(depth),
            rx_buf: vec![0u8; RX_BUF_SIZE].into_boxed_slice(),
            rx_pos: 0,
            rx_len: 0,
            rx: Rx::Header,
            rx_hdr: [0; MAX_HEADER_REGION],
            rx_have: 0,
            rx_layout: None,
            rx_dig: [0; DIGEST_LEN],
            rx_dig_have: 0,
            rx_crc: 0,
            ready: VecDeque::with_capacity(depth),
            pending_success: false,
            cfg,
        })
    }

    /// The controller id (after Connect).
    pub fn cntlid(&self) -> u16 {
        self.cntlid
    }
    /// Digests in effect.
    pub fn digests(&self) -> Digests {
        self.dg
    }
    /// MAXH2CDATA granted by the controller.
    pub fn maxh2cdata(&self) -> u32 {
        self.maxh2cdata
    }
    /// Commands submitted and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.slots.len() - self.free.len()
    }
    /// Sets the in-capsule threshold (e.g. from Identify Controller IOCCSZ).
    pub fn set_in_capsule_max(&mut self, bytes: u32) {
        self.cfg.in_capsule_max = bytes;
    }

    fn ic_exchange(&mut self) -> Result<(), HostError> {
        let mut b = [0u8; 128];
        let n = pdu::encode_ic_req(
            &mut b,
            &IcReq {
                pfv: 0,
                hpda: 0,
                digests: self.cfg.digests,
                maxr2t: 0,
            },
        );
        self.write_all_blocking(&b[..n])?;
        let deadline = Instant::now() + self.cfg.timeout;
        let mut resp = [0u8; 128];
        let mut have = 0;
        while have < resp.len() {
            match self.stream.read(&mut resp[have..]) {
                Ok(0) => return Err(HostError::Closed),
                Ok(k) => have += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(HostError::Timeout("ICResp"));
                    }
                    std::thread::yield_now();
                }
                Err(e) => return Err(e.into()),
            }
            // A TermReq is shorter than an ICResp: look at what we have.
            if have >= CH_LEN && resp[0] == pdu::pdu_type::C2H_TERM_REQ && have >= 24 {
                return Err(HostError::Terminated {
                    fes: u16::from_le_bytes([resp[8], resp[9]]),
                    fei: u32::from_le_bytes([resp[10], resp[11], resp[12], resp[13]]),
                });
            }
        }
        let (p, _) = pdu::decode(&resp, Digests::default(), 128)?;
        let PduHeader::IcResp(r) = p.header else {
            return Err(HostError::Protocol("expected ICResp"));
        };
        if r.pfv != 0 || r.maxh2cdata < 4096 {
            return Err(HostError::Protocol("bad ICResp parameters"));
        }
        if (r.digests.header && !self.cfg.digests.header)
            || (r.digests.data && !self.cfg.digests.data)
        {
            return Err(HostError::Protocol(
                "controller enabled a digest we did not ask for",
            ));
        }
        self.dg = r.digests;
        self.cpda = r.cpda;
        self.maxh2cdata = r.maxh2cdata;
        Ok(())
    }

    fn write_all_blocking(&mut self, mut b: &[u8]) -> Result<(), HostError> {
        let deadline = Instant::now() + self.cfg.timeout;
        while !b.is_empty() {
            match self.stream.write(b) {
                Ok(0) => return Err(HostError::Closed),
                Ok(n) => b = &b[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(HostError::Timeout("send"));
                    }
                    std::thread::yield_now();
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Fabrics Connect for queue `qid` (`cntlid` 0xffff for an admin queue).
    pub fn fabrics_connect(
        &mut self,
        subnqn: &str,
        qid: u16,
        cntlid: u16,
    ) -> Result<(), HostError> {
        let mut data = [0u8; connect::DATA_SIZE];
        data[connect::HOSTID_OFF..connect::HOSTID_OFF + 16].copy_from_slice(&self.cfg.hostid);
        data[connect::CNTLID_OFF..connect::CNTLID_OFF + 2].copy_from_slice(&cntlid.to_le_bytes());
        crate::nvme::put_str(
            &mut data[connect::SUBNQN_OFF..connect::SUBNQN_OFF + 256],
            subnqn,
            0,
        );
        crate::nvme::put_str(
            &mut data[connect::HOSTNQN_OFF..connect::HOSTNQN_OFF + 256],
            &self.cfg.hostnqn,
            0,
        );
        let cattr = if self.cfg.disable_sqflow {
            connect::CATTR_DISABLE_SQ_FLOW
        } else {
            0
        };
        let cmd = connect::ConnectCmd {
            recfmt: 0,
            qid,
            sqsize: self.cfg.queue_depth.max(2) - 1,
            cattr,
            kato_ms: if qid == 0 { self.cfg.kato_ms } else { 0 },
        };
        let sqe = cmd.to_sqe(0);
        // Connect data always goes in the capsule (the Fabrics spec requires controllers to take it).
        let saved = self.cfg.in_capsule_max;
        self.cfg.in_capsule_max = saved.max(connect::DATA_SIZE as u32);
        let r = self.admin_cmd(sqe, Dir::ToCtrl, &data, 0);
        self.cfg.in_capsule_max = saved;
        let (cqe, _) = r?;
        self.qid = qid;
        self.cntlid = (cqe.dw0 & 0xffff) as u16;
        Ok(())
    }

    /// Submits one command. For `Dir::ToCtrl`, `fill` writes the `len` data bytes into the slot
    /// buffer; `tag` comes back in the completion. Non-blocking; `Busy` if every slot is in use.
    pub fn submit(
        &mut self,
        mut sqe: Sqe,
        dir: Dir,
        len: u32,
        fill: impl FnOnce(&mut [u8]),
        tag: u64,
    ) -> Result<u16, HostError> {
        let Some(&idx) = self.free.last() else {
            return Err(HostError::Busy);
        };
        let s = &mut self.slots[idx];
        let len_us = len as usize;
        if len_us > s.buf.len() {
            return Err(HostError::TooLarge(len));
        }
        self.free.pop();
        let cid = idx as u16;
        sqe.cid = cid;
        sqe.flags |= PSDT_SGL_MPTR_CONTIG;
        let in_capsule = dir == Dir::ToCtrl && len > 0 && len <= self.cfg.in_capsule_max;
        sqe.sgl = if in_capsule {
            SglDesc::in_capsule(0, len)
        } else {
            SglDesc::transport(len)
        };
        if dir == Dir::ToCtrl {
            fill(&mut s.buf[..len_us]);
        }
        s.busy = true;
        s.done = false;
        s.tag = tag;
        s.sqe = sqe;
        s.dir = dir;
        s.len = len_us;
        s.c2h_done = 0;
        s.r2t_end = 0;
        let data = if in_capsule { len_us } else { 0 };
        s.hdr_len = pdu::encode_capsule_cmd(&mut s.hdr, &sqe, data, self.dg, self.cpda);
        if data > 0 && self.dg.data {
            s.ddgst = pdu::crc32c(&s.buf[..data]).to_le_bytes();
        }
        s.tx = Tx::Capsule { data };
        s.tx_off = 0;
        s.queued = true;
        self.tx_queue.push_back(idx);
        Ok(cid)
    }

    /// Submits a Read of `nlb` blocks of `block_size` at `lba`.
    pub fn read(
        &mut self,
        nsid: u32,
        lba: u64,
        nlb: u32,
        block_size: u32,
        tag: u64,
    ) -> Result<u16, HostError> {
        let sqe = rw_sqe(io_op::READ, nsid, lba, nlb);
        self.submit(
            sqe,
            Dir::FromCtrl,
            nlb.saturating_mul(block_size),
            |_| {},
            tag,
        )
    }

    /// Submits a Write of `data` (whole blocks) at `lba`.
    pub fn write(
        &mut self,
        nsid: u32,
        lba: u64,
        data: &[u8],
        block_size: u32,
        tag: u64,
    ) -> Result<u16, HostError> {
        let nlb = (data.len() / block_size as usize) as u32;
        let len = u32::try_from(data.len()).map_err(|_| HostError::TooLarge(u32::MAX))?;
        let sqe = rw_sqe(io_op::WRITE, nsid, lba, nlb);
        self.submit(sqe, Dir::ToCtrl, len, |b| b.copy_from_slice(data), tag)
    }

    /// One poll step: sends what is queued, receives what arrived, and hands each completion to
    /// `done`. Returns the number of completions.
    pub fn poll(&mut self, done: &mut dyn FnMut(Completion<'_>)) -> Result<usize, HostError> {
        self.flush_tx()?;
        self.recv()?;
        self.flush_tx()?;
        let mut n = 0;
        while let Some((idx, cqe)) = self.ready.pop_front() {
            let s = &mut self.slots[idx];
            let data_len = if s.dir == Dir::FromCtrl {
                s.c2h_done.min(s.len)
            } else {
                0
            };
            s.busy = false;
            if s.queued {
                self.tx_queue.retain(|&i| i != idx);
                s.queued = false;
            }
            let tag = s.tag;
            done(Completion {
                tag,
                cqe,
                data: &self.slots[idx].buf[..data_len],
            });
            self.free.push(idx);
            n += 1;
        }
        Ok(n)
    }

    /// Submits a command and polls until it completes (setup path); returns the CQE and data.
    /// Completions of other commands that arrive meanwhile stay queued for the next `poll`.
    pub fn admin_cmd(
        &mut self,
        sqe: Sqe,
        dir: Dir,
        data: &[u8],
        read_len: u32,
    ) -> Result<(Cqe, Vec<u8>), HostError> {
        let len = if dir == Dir::ToCtrl {
            data.len() as u32
        } else {
            read_len
        };
        let cid = self.submit(
            sqe,
            dir,
            len,
            |b| b.copy_from_slice(&data[..b.len()]),
            u64::MAX,
        )?;
        let idx = usize::from(cid);
        let deadline = Instant::now() + self.cfg.timeout;
        loop {
            self.flush_tx()?;
            self.recv()?;
            self.flush_tx()?;
            if let Some(pos) = self.ready.iter().position(|&(i, _)| i == idx) {
                let (_, cqe) = self
                    .ready
                    .remove(pos)
                    .ok_or(HostError::Timeout("command completion"))?;
                let s = &mut self.slots[idx];
                let data_len = if s.dir == Dir::FromCtrl {
                    s.c2h_done.min(s.len)
                } else {
                    0
                };
                let out = s.buf[..data_len].to_vec();
                s.busy = false;
                if s.queued {
                    self.tx_queue.retain(|&i| i != idx);
                    self.slots[idx].queued = false;
                }
                self.free.push(idx);
                if !cqe.status().is_success() {
                    return Err(HostError::Status {
                        status: cqe.status(),
                        dw0: cqe.dw0,
                    });
                }
                return Ok((cqe, out));
            }
            if Instant::now() > deadline {
                return Err(HostError::Timeout("command completion"));
            }
            std::thread::yield_now();
        }
    }

    /// Property Get (admin queue).
    pub fn property_get(&mut self, ofst: u32, size8: bool) -> Result<u64, HostError> {
        let sqe = Sqe {
            opcode: FABRICS_OPCODE,
            nsid: u32::from(fctype::PROPERTY_GET),
            cdw10: u32::from(size8),
            cdw11: ofst,
            ..Default::default()
        };
        let (c, _) = self.admin_cmd(sqe, Dir::None, &[], 0)?;
        Ok(u64::from(c.dw0) | (u64::from(c.dw1) << 32))
    }

    /// Property Set of a 4-byte property (admin queue).
    pub fn property_set(&mut self, ofst: u32, value: u32) -> Result<(), HostError> {
        let sqe = Sqe {
            opcode: FABRICS_OPCODE,
            nsid: u32::from(fctype::PROPERTY_SET),
            cdw11: ofst,
            cdw12: value,
            ..Default::default()
        };
        self.admin_cmd(sqe, Dir::None, &[], 0).map(|_| ())
    }

    /// Enables the controller (CC.EN with 64/16-byte entries) and waits for CSTS.RDY.
    pub fn enable(&mut self) -> Result<(), HostError> {
        let cc = prop::CC_EN | (6 << prop::CC_IOSQES_SHIFT) | (4 << prop::CC_IOCQES_SHIFT);
        self.property_set(prop::CC, cc)?;
        let deadline = Instant::now() + self.cfg.timeout;
        loop {
            let csts = self.property_get(prop::CSTS, false)? as u32;
            if csts & prop::CSTS_CFS != 0 {
                return Err(HostError::Protocol("controller fatal status after enable"));
            }
            if csts & prop::CSTS_RDY != 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HostError::Timeout("CSTS.RDY"));
            }
        }
    }

    /// Identify with the given CNS and NSID (4096 bytes).
    pub fn identify(&mut self, cns_v: u8, nsid: u32) -> Result<Vec<u8>, HostError> {
        let sqe = Sqe {
            opcode: admin_op::IDENTIFY,
            nsid,
            cdw10: u32::from(cns_v),
            ..Default::default()
        };
        self.admin_cmd(sqe, Dir::FromCtrl, &[], IDENTIFY_SIZE as u32)
            .map(|(_, d)| d)
    }

    /// Identify Controller.
    pub fn identify_controller(&mut self) -> Result<Vec<u8>, HostError> {
        self.identify(cns::CONTROLLER, 0)
    }

    /// Identify Namespace, decoded: (number of blocks, block size in bytes). A zero-filled
    /// (inactive) namespace reads as `(0, 512)`.
    pub fn namespace_geometry(&mut self, nsid: u32) -> Result<(u64, u32), HostError> {
        let d = self.identify(cns::NAMESPACE, nsid)?;
        let le = |o: usize, n: usize| {
            d.get(o..o + n)
                .map(|b| b.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
        };
        let nsze = le(0, 8).ok_or(HostError::Protocol("short Identify Namespace"))?;
        let flbas = usize::from(d.get(26).copied().unwrap_or(0) & 0x0f);
        let lbaf = le(128 + 4 * flbas, 4).ok_or(HostError::Protocol("short Identify Namespace"))?;
        let lbads = (lbaf >> 16) & 0xff;
        if nsze != 0 && !(9..=16).contains(&lbads) {
            return Err(HostError::Protocol("unsupported LBA data size"));
        }
        Ok((nsze, 1u32 << lbads.max(9)))
    }

    /// Sets the in-capsule threshold from Identify Controller data (IOCCSZ, as read on the admin
    /// queue), capped at the slot buffer size; returns the in-capsule size the controller takes.
    pub fn adopt_in_capsule_size(&mut self, id_ctrl: &[u8]) -> Result<u32, HostError> {
        let ioccsz = id_ctrl
            .get(1792..1796)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(HostError::Protocol("short Identify Controller"))?;
        let icd = ioccsz.saturating_mul(16).saturating_sub(64);
        self.cfg.in_capsule_max = icd.min(self.cfg.max_io_size);
        Ok(icd)
    }

    /// Get Log Page of `len` bytes (a multiple of 4) at byte offset `lpo`.
    pub fn get_log_page(
        &mut self,
        lid: u8,
        nsid: u32,
        len: u32,
        lpo: u64,
    ) -> Result<Vec<u8>, HostError> {
        let numd = len / 4 - 1;
        let sqe = Sqe {
            opcode: admin_op::GET_LOG_PAGE,
            nsid,
            cdw10: u32::from(lid) | ((numd & 0xffff) << 16),
            cdw11: numd >> 16,
            cdw12: lpo as u32,
            cdw13: (lpo >> 32) as u32,
            ..Default::default()
        };
        self.admin_cmd(sqe, Dir::FromCtrl, &[], len).map(|(_, d)| d)
    }

    // ----------------------------------------------------------------------------------------

    fn flush_tx(&mut self) -> Result<(), HostError> {
        let dd = self.dg.data;
        loop {
            if self.tx_queue.is_empty() {
                return Ok(());
            }
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut n_iov = 0;
            for &idx in self.tx_queue.iter() {
                if n_iov + 3 > MAX_IOV {
                    break;
                }
                let s = &self.slots[idx];
                let data: &[u8] = match s.tx {
                    Tx::Capsule { data } => &s.buf[..data],
                    Tx::H2c { off, len, .. } => &s.buf[off..off + len],
                    Tx::Idle => &[],
                };
                let dig: &[u8] = if dd && !data.is_empty() {
                    &s.ddgst
                } else {
                    &[]
                };
                let mut skip = s.tx_off;
                for seg in [&s.hdr[..s.hdr_len], data, dig] {
                    if skip >= seg.len() {
                        skip -= seg.len();
                        continue;
                    }
                    iov[n_iov] = IoSlice::new(&seg[skip..]);
                    skip = 0;
                    n_iov += 1;
                }
            }
            match self.stream.write_vectored(&iov[..n_iov]) {
                Ok(0) => return Err(HostError::Closed),
                Ok(n) => self.tx_advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn tx_len(&self, idx: usize) -> usize {
        let s = &self.slots[idx];
        let data = match s.tx {
            Tx::Capsule { data } => data,
            Tx::H2c { len, .. } => len,
            Tx::Idle => 0,
        };
        s.hdr_len
            + data
            + if self.dg.data && data > 0 {
                DIGEST_LEN
            } else {
                0
            }
    }

    fn tx_advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(&idx) = self.tx_queue.front() else {
                return;
            };
            let left = self.tx_len(idx) - self.slots[idx].tx_off;
            if n < left {
                self.slots[idx].tx_off += n;
                return;
            }
            n -= left;
            self.tx_queue.pop_front();
            self.slots[idx].queued = false;
            // More H2CData for the current R2T window?
            if let Tx::H2c {
                off,
                len,
                last: false,
            } = self.slots[idx].tx
            {
                self.queue_h2c(idx, off + len);
            } else {
                self.slots[idx].tx = Tx::Idle;
            }
        }
    }

    /// Queues the H2CData PDU that starts at `off` inside the current R2T window.
    fn queue_h2c(&mut self, idx: usize, off: usize) {
        let max = self.maxh2cdata as usize;
        let s = &mut self.slots[idx];
        let len = (s.r2t_end - off).min(max);
        let last = off + len == s.r2t_end;
        let d = DataHdr {
            cccid: s.sqe.cid,
            ttag: s.ttag,
            datao: off as u32,
            datal: len as u32,
            flags: if last { flags::LAST_PDU } else { 0 },
        };
        s.hdr_len = pdu::encode_h2c_data(&mut s.hdr, &d, self.dg, self.cpda);
        if self.dg.data {
            s.ddgst = pdu::crc32c(&s.buf[off..off + len]).to_le_bytes();
        }
        s.tx = Tx::H2c { off, len, last };
        s.tx_off = 0;
        s.queued = true;
        self.tx_queue.push_back(idx);
    }

    fn recv(&mut self) -> Result<(), HostError> {
        loop {
            if self.rx_pos < self.rx_len {
                self.consume()?;
                continue;
            }
            self.rx_pos = 0;
            self.rx_len = 0;
            // Large data runs are read straight into the slot buffer (no staging copy).
            if let Rx::Data { slot, off, left } = self.rx {
                if left >= DIRECT_READ_MIN {
                    let dst = &mut self.slots[slot].buf[off..off + left];
                    match self.stream.read(dst) {
                        Ok(0) => return Err(HostError::Closed),
                        Ok(n) => {
                            if self.dg.data {
                                self.rx_crc = pdu::crc32c_append(self.rx_crc, &dst[..n]);
                            }
                            self.data_landed(slot, off, left, n);
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            match self.stream.read(&mut self.rx_buf) {
                Ok(0) => return Err(HostError::Closed),
                Ok(n) => self.rx_len = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// `n` bytes of the current C2HData landed in the slot buffer at `off`.
    fn data_landed(&mut self, slot: usize, off: usize, left: usize, n: usize) {
        let left = left - n;
        self.slots[slot].c2h_done += n;
        if left > 0 {
            self.rx = Rx::Data {
                slot,
                off: off + n,
                left,
            };
            return;
        }
        let success = self.pending_success;
        if self.dg.data {
            self.rx = Rx::Digest { slot, success };
            self.rx_dig_have = 0;
        } else {
            self.rx = Rx::Header;
            self.c2h_done(slot, success);
        }
    }

    fn consume(&mut self) -> Result<(), HostError> {
        let avail = self.rx_len - self.rx_pos;
        match self.rx {
            Rx::Header => {
                let need = match self.rx_layout {
                    None => CH_LEN,
                    Some((_, l)) => {
                        if l.data_len > 0 {
                            l.data_off
                        } else {
                            l.header_len
                        }
                    }
                };
                let n = avail.min(need - self.rx_have);
                self.rx_hdr[self.rx_have..self.rx_have + n]
                    .copy_from_slice(&self.rx_buf[self.rx_pos..self.rx_pos + n]);
                self.rx_have += n;
                self.rx_pos += n;
                if self.rx_have < need {
                    return Ok(());
                }
                if self.rx_layout.is_none() {
                    let mut c = [0u8; CH_LEN];
                    c.copy_from_slice(&self.rx_hdr[..CH_LEN]);
                    let ch = CommonHeader::parse(&c);
                    let max =
                        (MAX_HEADER_REGION + DIGEST_LEN) as u32 + self.slots[0].buf.len() as u32;
                    let l = ch.layout(self.dg, max)?;
                    self.rx_layout = Some((ch, l));
                    let region = if l.data_len > 0 {
                        l.data_off
                    } else {
                        l.header_len
                    };
                    if region > CH_LEN {
                        return Ok(());
                    }
                }
                let Some((ch, l)) = self.rx_layout.take() else {
                    return Ok(());
                };
                self.rx_have = 0;
                let h = pdu::decode_header(&ch, &l, &self.rx_hdr[..l.header_len])?;
                self.on_header(h, &l)
            }
            Rx::Data { slot, off, left } => {
                let n = avail.min(left);
                let src = &self.rx_buf[self.rx_pos..self.rx_pos + n];
                self.slots[slot].buf[off..off + n].copy_from_slice(src);
                if self.dg.data {
                    self.rx_crc = pdu::crc32c_append(self.rx_crc, src);
                }
                self.rx_pos += n;
                self.data_landed(slot, off, left, n);
                Ok(())
            }
            Rx::Digest { slot, success } => {
                let n = avail.min(DIGEST_LEN - self.rx_dig_have);
                self.rx_dig[self.rx_dig_have..self.rx_dig_have + n]
                    .copy_from_slice(&self.rx_buf[self.rx_pos..self.rx_pos + n]);
                self.rx_dig_have += n;
                self.rx_pos += n;
                if self.rx_dig_have == DIGEST_LEN {
                    let received = u32::from_le_bytes(self.rx_dig);
                    if received != self.rx_crc {
                        return Err(PduError::DataDigest {
                            computed: self.rx_crc,
                            received,
                        }
                        .into());
                    }
                    self.rx = Rx::Header;
                    self.c2h_done(slot, success);
                }
                Ok(())
            }
        }
    }

    fn c2h_done(&mut self, slot: usize, success: bool) {
        if success {
            self.slots[slot].done = true;
            let cid = self.slots[slot].sqe.cid;
            self.ready.push_back((
                slot,
                Cqe {
                    cid,
                    sqid: self.qid,
                    ..Default::default()
                },
            ));
        }
    }

    fn slot_for(&self, cid: u16) -> Result<usize, HostError> {
        let idx = usize::from(cid);
        match self.slots.get(idx) {
            Some(s) if s.busy && !s.done => Ok(idx),
            _ => Err(HostError::Protocol(
                "PDU for a command that is not outstanding",
            )),
        }
    }

    fn on_header(&mut self, h: PduHeader, l: &Layout) -> Result<(), HostError> {
        match h {
            PduHeader::CapsuleResp(cqe) => {
                let idx = self.slot_for(cqe.cid)?;
                self.slots[idx].done = true;
                self.ready.push_back((idx, cqe));
                Ok(())
            }
            PduHeader::C2HData(d) => {
                let idx = self.slot_for(d.cccid)?;
                let s = &self.slots[idx];
                let end = (d.datao as usize)
                    .checked_add(d.datal as usize)
                    .ok_or(HostError::Protocol("C2HData range"))?;
                if s.dir != Dir::FromCtrl || end > s.len || d.datao as usize != s.c2h_done {
                    return Err(HostError::Protocol("C2HData outside the transfer"));
                }
                let success = d.flags & flags::SUCCESS != 0;
                if success && (d.flags & flags::LAST_PDU == 0 || end != s.len) {
                    return Err(HostError::Protocol("SUCCESS flag without the last PDU"));
                }
                self.pending_success = success;
                self.rx = Rx::Data {
                    slot: idx,
                    off: d.datao as usize,
                    left: l.data_len,
                };
                self.rx_crc = 0;
                Ok(())
            }
            PduHeader::R2T(r) => {
                let idx = self.slot_for(r.cccid)?;
                let s = &mut self.slots[idx];
                let end = (r.r2to as usize)
                    .checked_add(r.r2tl as usize)
                    .ok_or(HostError::Protocol("R2T range"))?;
                if s.dir != Dir::ToCtrl || end > s.len || s.queued {
                    return Err(HostError::Protocol("R2T outside the transfer"));
                }
                s.r2t_end = end;
                s.ttag = r.ttag;
                self.queue_h2c(idx, r.r2to as usize);
                Ok(())
            }
            PduHeader::C2HTermReq(t) => Err(HostError::Terminated {
                fes: t.fes,
                fei: t.fei,
            }),
            _ => Err(HostError::Protocol(
                "unexpected PDU type from the controller",
            )),
        }
    }
}

/// A Read/Write SQE (SGL filled in by `submit`).
pub fn rw_sqe(opcode: u8, nsid: u32, lba: u64, nlb: u32) -> Sqe {
    Sqe {
        opcode,
        nsid,
        cdw10: lba as u32,
        cdw11: (lba >> 32) as u32,
        cdw12: nlb.saturating_sub(1) & 0xffff,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
