//! Data transfer to the host for a [`Connection`]: completing a command (C2HData and/or
//! CapsuleResp, per-namespace stats), the send queue of R2T/C2HData/CapsuleResp PDUs and the
//! control buffer (ICResp, C2HTermReq), written with `writev` and advanced as bytes go out.
//!
//! Runs on the connection's reactor, inside [`Connection::poll`] and the handlers it calls. It
//! exists as its own file so the send side is apart from the receive state machine (`recv`).

use std::io::{self, IoSlice, Write};

use super::{Connection, Phase, ReqState};
use crate::nvme::Status;
use crate::nvmf::pdu::{self, flags, DataHdr, DIGEST_LEN};
use crate::stats::reactor as stats_reactor;
use crate::stats::OpClass;
use crate::sys::clock;

/// `writev` calls per poll step.
const TX_BUDGET: usize = 16;
/// iovecs per `writev` (each PDU takes at most 3).
const MAX_IOV: usize = 64;

impl Connection {
    /// Completes a command: C2HData (when it has data for the host) and/or CapsuleResp.
    pub(in crate::nvmf) fn complete(&mut self, idx: usize, status: Status) {
        let r = &mut self.reqs[idx];
        r.icd_at = None;
        r.icd_go = false;
        if self.phase == Phase::Closed || self.phase == Phase::Closing {
            self.release(idx);
            return;
        }
        if !status.is_success() && self.qid == 0 {
            if let Some(c) = &self.ctrl {
                let r = &self.reqs[idx];
                c.record_error(crate::nvme::log::ErrorEntry {
                    sqid: 0,
                    cid: r.sqe.cid,
                    status: status.to_field(),
                    param_loc: 0xffff,
                    nsid: r.sqe.nsid,
                    ..Default::default()
                });
            }
        }
        if self.qid != 0 {
            self.record_io(idx, status);
        }
        let dg = self.dg;
        let hpda = self.hpda;
        let sqhd_disabled = self.sqhd_disabled;
        let r = &mut self.reqs[idx];
        r.cqe.cid = r.sqe.cid;
        r.cqe.sqid = self.qid;
        r.cqe.sqhd = self.sqhd;
        r.cqe.status = status.to_field();
        r.tx_off = 0;
        let data_len = r.buf.as_ref().map_or(0, |b| b.len());
        if status.is_success() && r.c2h && data_len > 0 {
            let mut fl = flags::LAST_PDU;
            // SUCCESS replaces the CapsuleResp only when the host disabled SQ flow control (it
            // then needs no SQHD) and nothing but success is reported.
            r.tx_success = sqhd_disabled;
            if r.tx_success {
                fl |= flags::SUCCESS;
            }
            let d = DataHdr {
                cccid: r.sqe.cid,
                ttag: 0,
                datao: 0,
                datal: data_len as u32,
                flags: fl,
            };
            r.tx_hdr_len = pdu::encode_c2h_data(&mut r.tx_hdr, &d, dg, hpda);
            r.tx_data = true;
            if dg.data {
                let crc = r.buf.as_ref().map_or(0, |b| pdu::crc32c(b.as_slice()));
                r.tx_ddgst = crc.to_le_bytes();
            }
            self.transition(idx, ReqState::TxC2hData);
        } else {
            self.put_buf(idx);
            self.queue_resp(idx);
        }
        self.tx_queue.push_back(idx);
    }

    /// Records an I/O command's completion in the reactor's per-namespace stats
    /// (`crate::stats::reactor`): latency from capsule decoded to completion queued, bytes moved
    /// by successful reads/writes, errors. Allocates only the first time this connection
    /// completes a command for a namespace; nsids that do not exist are not recorded.
    fn record_io(&mut self, idx: usize, status: Status) {
        let r = &self.reqs[idx];
        let Some(op) = stats_reactor::op_class_of(r.sqe.opcode) else {
            return;
        };
        let nsid = r.sqe.nsid;
        let ok = status.is_success();
        let bytes = match op {
            OpClass::Read | OpClass::Write if ok => r.buf.as_ref().map_or(0, |b| b.len() as u64),
            _ => 0,
        };
        let ns = clock::ticks_to_ns(clock::ticks().wrapping_sub(r.t_rx));
        if !self.io_stats.record(nsid, op, bytes, ns, ok) {
            let Some(s) = self.subsys.as_ref() else {
                return;
            };
            if s.namespace(nsid).is_some() {
                let h = self.io_stats.attach(&s.nqn, nsid);
                h.borrow_mut().record(op, bytes, ns, ok);
            }
        }
    }

    fn queue_resp(&mut self, idx: usize) {
        let dg = self.dg;
        let r = &mut self.reqs[idx];
        r.tx_hdr_len = pdu::encode_capsule_resp(&mut r.tx_hdr, &r.cqe, dg);
        r.tx_data = false;
        r.tx_off = 0;
        self.transition(idx, ReqState::TxResp);
    }

    // ----------------------------------------------------------------------------------------
    // Send path.

    pub(super) fn flush_tx(&mut self) -> usize {
        let mut work = 0;
        while self.ctl_off < self.ctl_len {
            match self.stream.write(&self.ctl_buf[self.ctl_off..self.ctl_len]) {
                Ok(0) => {
                    self.close_now("peer closed while sending");
                    return work;
                }
                Ok(n) => {
                    self.ctl_off += n;
                    work += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return work,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close_now("send error");
                    return work;
                }
            }
        }
        if self.phase == Phase::Closing {
            self.close_now("fatal error reported");
            return work;
        }
        let dd = self.dg.data;
        for _ in 0..TX_BUDGET {
            if self.tx_queue.is_empty() {
                break;
            }
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut n_iov = 0;
            for &idx in self.tx_queue.iter() {
                if n_iov + 3 > MAX_IOV {
                    break;
                }
                let r = &self.reqs[idx];
                let data: &[u8] = if r.tx_data {
                    r.buf.as_ref().map_or(&[], |b| b.as_slice())
                } else {
                    &[]
                };
                let dig: &[u8] = if r.tx_data && dd { &r.tx_ddgst } else { &[] };
                let mut skip = r.tx_off;
                for s in [&r.tx_hdr[..r.tx_hdr_len], data, dig] {
                    if skip >= s.len() {
                        skip -= s.len();
                        continue;
                    }
                    iov[n_iov] = IoSlice::new(&s[skip..]);
                    skip = 0;
                    n_iov += 1;
                }
            }
            match self.stream.write_vectored(&iov[..n_iov]) {
                Ok(0) => {
                    self.close_now("peer closed while sending");
                    return work;
                }
                Ok(n) => {
                    work += 1;
                    self.tx_advance(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close_now("send error");
                    return work;
                }
            }
        }
        work
    }

    fn pdu_len(&self, idx: usize) -> usize {
        let r = &self.reqs[idx];
        let data = if r.tx_data {
            r.buf.as_ref().map_or(0, |b| b.len())
        } else {
            0
        };
        let dig = if r.tx_data && self.dg.data {
            DIGEST_LEN
        } else {
            0
        };
        r.tx_hdr_len + data + dig
    }

    fn tx_advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(&idx) = self.tx_queue.front() else {
                return;
            };
            let left = self.pdu_len(idx) - self.reqs[idx].tx_off;
            if n < left {
                self.reqs[idx].tx_off += n;
                return;
            }
            n -= left;
            self.tx_queue.pop_front();
            self.pdu_sent(idx);
        }
    }

    fn pdu_sent(&mut self, idx: usize) {
        match self.reqs[idx].state {
            ReqState::R2tQueued => self.transition(idx, ReqState::RecvH2cData),
            ReqState::TxC2hData => {
                if self.reqs[idx].tx_success {
                    self.release(idx);
                } else {
                    self.put_buf(idx);
                    self.queue_resp(idx);
                    self.tx_queue.push_back(idx);
                }
            }
            ReqState::TxResp => self.release(idx),
            s => debug_assert!(false, "PDU sent for a request in state {s:?}"),
        }
    }
}
