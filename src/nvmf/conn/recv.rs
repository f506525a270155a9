//! The PDU receive state machine of a [`Connection`]: reads from the socket into the staging
//! buffer (or straight into a request's buffer for large data), accumulates header regions,
//! decodes ICReq/CapsuleCmd/H2CData/H2CTermReq, copies data and checks data digests, then hands
//! complete commands on (R2T when more data is needed, else dispatch).
//!
//! Runs on the connection's reactor, inside [`Connection::poll`]. It exists as its own file so
//! the byte-level transport parsing sits apart from command execution (`exec`) and sending
//! (`xfer`).

use std::io::{self, Read};

use super::{Connection, DataKind, Fatal, Phase, ReqState, Rx, BOOT_BUF_SIZE};
use crate::nvme::{io_op, sgl, Cqe, Sqe, Status, FABRICS_OPCODE};
use crate::nvmf::pdu::{
    self, CommonHeader, DataHdr, Digests, Fes, Layout, PduHeader, R2t, CH_LEN, DIGEST_LEN,
    MAX_HEADER_REGION,
};
use crate::nvmf::poll_group::GroupStats;
use crate::sys::clock;

/// Data reads of at least this many bytes bypass the staging buffer and land directly in the
/// request's buffer (one copy saved for large writes).
const DIRECT_READ_MIN: usize = 8 * 1024;
/// Reads per poll step, so one busy connection cannot starve the others on its reactor.
const RX_BUDGET: usize = 16;

impl Connection {
    // ----------------------------------------------------------------------------------------
    // Receive path.

    /// One receive step; in-capsule write data left in `rx_buf` is dealt with before it returns.
    pub(super) fn poll_recv(&mut self) -> usize {
        let work = self.recv_step();
        self.flush_icd();
        work
    }

    fn recv_step(&mut self) -> usize {
        let mut work = 0;
        for _ in 0..RX_BUDGET {
            if self.icd_wait.is_some() {
                // In-capsule data waits for a buffer: read nothing more until it has one.
                return work;
            }
            if self.rx_pos < self.rx_len {
                if let Err(f) = self.consume() {
                    self.fatal(f);
                    return work + 1;
                }
                work += 1;
                if !matches!(self.phase, Phase::AwaitIcReq | Phase::Ready) {
                    return work;
                }
                continue;
            }
            // Everything still pointing into rx_buf goes before it is overwritten.
            self.flush_icd();
            self.rx_pos = 0;
            self.rx_len = 0;
            GroupStats::bump(&self.rx_stats.recv_calls);
            let res: io::Result<(usize, bool)> = match self.rx {
                Rx::Data { idx, off, left, .. } if left >= DIRECT_READ_MIN => {
                    let dst = self.reqs[idx]
                        .buf
                        .as_mut()
                        .and_then(|b| b.as_mut_slice().get_mut(off..off + left));
                    match dst {
                        None => {
                            self.close_now("receive buffer missing");
                            return work;
                        }
                        Some(dst) => match self.stream.read(dst) {
                            Ok(n) => {
                                if self.dg.data && n > 0 {
                                    self.rx_crc = pdu::crc32c_append(self.rx_crc, &dst[..n]);
                                }
                                Ok((n, true))
                            }
                            Err(e) => Err(e),
                        },
                    }
                }
                _ => self.stream.read(&mut self.rx_buf).map(|n| (n, false)),
            };
            match res {
                Ok((0, _)) => {
                    self.close_now("peer closed the connection");
                    return work;
                }
                Ok((n, true)) => {
                    work += 1;
                    if let Err(f) = self.data_advanced(n) {
                        self.fatal(f);
                        return work;
                    }
                }
                Ok((n, false)) => {
                    self.rx_len = n;
                    work += 1;
                    // Commands in these bytes may have been sent after a `namespace.create`
                    // that returned since this poll's check: they must see the new table.
                    if self.ns_gen != 0 {
                        self.refresh_namespaces();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    GroupStats::bump(&self.rx_stats.recv_empty);
                    // Drained: in a poll group, the next read waits for epoll's next report.
                    if self.in_group {
                        self.rx_ready = false;
                    }
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "receive failed");
                    self.close_now("receive error");
                    return work;
                }
            }
        }
        work
    }

    /// Consumes staged bytes according to the receive state.
    fn consume(&mut self) -> Result<(), Fatal> {
        let avail = self.rx_len - self.rx_pos;
        match self.rx {
            Rx::Header => {
                let need = match self.rx_layout {
                    None => CH_LEN,
                    Some((_, l)) => region_len(&l),
                };
                let n = avail.min(need - self.rx_have);
                self.rx_hdr[self.rx_have..self.rx_have + n]
                    .copy_from_slice(&self.rx_buf[self.rx_pos..self.rx_pos + n]);
                self.rx_have += n;
                self.rx_pos += n;
                if self.rx_have < need {
                    return Ok(());
                }
                match self.rx_layout {
                    None => {
                        let mut ch8 = [0u8; CH_LEN];
                        ch8.copy_from_slice(&self.rx_hdr[..CH_LEN]);
                        let ch = CommonHeader::parse(&ch8);
                        let layout = ch
                            .layout(self.dg, self.max_plen())
                            .map_err(Fatal::from_pdu)?;
                        self.rx_layout = Some((ch, layout));
                        if region_len(&layout) == CH_LEN {
                            self.header_done()?;
                        }
                    }
                    Some(_) => self.header_done()?,
                }
                Ok(())
            }
            Rx::Data {
                idx,
                kind,
                off,
                left,
                ..
            } => {
                let n = avail.min(left);
                if kind == DataKind::Capsule && off == 0 && n == left && self.may_defer_icd(idx) {
                    // The whole in-capsule data is here: leave it in rx_buf for flush_icd.
                    self.reqs[idx].icd_at = Some((self.rx_pos as u32, n as u32));
                    self.icd_deferred.push(idx);
                    self.rx_pos += n;
                    return self.data_advanced(n);
                }
                let src = &self.rx_buf[self.rx_pos..self.rx_pos + n];
                match self.reqs[idx]
                    .buf
                    .as_mut()
                    .and_then(|b| b.as_mut_slice().get_mut(off..off + n))
                {
                    Some(dst) => dst.copy_from_slice(src),
                    None => return Err(Fatal { fes: None }),
                }
                if self.dg.data {
                    self.rx_crc = pdu::crc32c_append(self.rx_crc, src);
                }
                self.rx_pos += n;
                self.data_advanced(n)
            }
            Rx::Digest {
                idx,
                kind,
                start,
                len,
            } => {
                let n = avail.min(DIGEST_LEN - self.rx_dig_have);
                self.rx_dig[self.rx_dig_have..self.rx_dig_have + n]
                    .copy_from_slice(&self.rx_buf[self.rx_pos..self.rx_pos + n]);
                self.rx_dig_have += n;
                self.rx_pos += n;
                if self.rx_dig_have == DIGEST_LEN {
                    let received = u32::from_le_bytes(self.rx_dig);
                    if received != self.rx_crc {
                        if let Some(suppressed) = self.target.peer_log().admit() {
                            tracing::warn!(
                                peer = ?self.peer,
                                qid = self.qid,
                                computed = self.rx_crc,
                                received,
                                suppressed_before = suppressed,
                                "data digest error"
                            );
                        }
                        return Err(Fatal { fes: None });
                    }
                    self.rx = Rx::Header;
                    self.data_done(idx, kind, start, len)?;
                }
                Ok(())
            }
        }
    }

    /// `n` data bytes landed (from staging or a direct read).
    fn data_advanced(&mut self, n: usize) -> Result<(), Fatal> {
        if let Rx::Data {
            idx,
            kind,
            off,
            left,
            start,
        } = self.rx
        {
            let left = left - n;
            let off = off + n;
            if left > 0 {
                self.rx = Rx::Data {
                    idx,
                    kind,
                    off,
                    left,
                    start,
                };
                return Ok(());
            }
            let len = off - start;
            if self.dg.data {
                self.rx = Rx::Digest {
                    idx,
                    kind,
                    start,
                    len,
                };
                self.rx_dig_have = 0;
            } else {
                self.rx = Rx::Header;
                self.data_done(idx, kind, start, len)?;
            }
        }
        Ok(())
    }

    fn max_plen(&self) -> u32 {
        let l = &self.target.limits;
        let data = l
            .in_capsule_data_size
            .max(l.max_h2c_data_size)
            .max(BOOT_BUF_SIZE as u32);
        (MAX_HEADER_REGION + DIGEST_LEN) as u32 + data
    }

    /// A complete header region is in `rx_hdr`.
    fn header_done(&mut self) -> Result<(), Fatal> {
        let Some((ch, layout)) = self.rx_layout.take() else {
            return Err(Fatal { fes: None });
        };
        let res = self.handle_header(&ch, &layout);
        if res.is_ok() {
            self.rx_have = 0;
        }
        res
    }

    fn handle_header(&mut self, ch: &CommonHeader, layout: &Layout) -> Result<(), Fatal> {
        let (ch, layout) = (*ch, *layout);
        let hdr = pdu::decode_header(&ch, &layout, &self.rx_hdr[..layout.header_len])
            .map_err(Fatal::from_pdu)?;
        if self.phase == Phase::AwaitIcReq
            && !matches!(hdr, PduHeader::IcReq(_) | PduHeader::H2CTermReq(_))
        {
            return Err(Fatal::term(Fes::PduSequenceError, pdu::OFF_TYPE));
        }
        match hdr {
            PduHeader::IcReq(r) => {
                if self.phase != Phase::AwaitIcReq {
                    return Err(Fatal::term(Fes::PduSequenceError, pdu::OFF_TYPE));
                }
                if r.pfv != 0 {
                    return Err(Fatal::term(Fes::UnsupportedParameter, 8));
                }
                let allow = self.target.limits.allow_digests;
                self.dg = Digests {
                    header: r.digests.header && allow,
                    data: r.digests.data && allow,
                };
                self.hpda = r.hpda;
                let resp = pdu::IcResp {
                    pfv: 0,
                    cpda: 0,
                    digests: self.dg,
                    maxh2cdata: self.target.limits.max_h2c_data_size,
                };
                let mut b = [0u8; 128];
                let n = pdu::encode_ic_resp(&mut b, &resp);
                self.ctl_buf[..n].copy_from_slice(&b[..n]);
                self.ctl_len = n;
                self.ctl_off = 0;
                self.set_phase(Phase::Ready);
                tracing::debug!(digests = ?self.dg, hpda = r.hpda, maxr2t = r.maxr2t, "ICReq accepted");
                Ok(())
            }
            PduHeader::H2CTermReq(t) => {
                if let Some(suppressed) = self.target.peer_log().admit() {
                    tracing::info!(
                        peer = ?self.peer,
                        fes = t.fes,
                        fei = t.fei,
                        suppressed_before = suppressed,
                        "host terminated the connection"
                    );
                }
                self.close_now("H2CTermReq");
                Ok(())
            }
            PduHeader::CapsuleCmd(sqe) => self.on_capsule(sqe, layout.data_len),
            PduHeader::H2CData(d) => self.on_h2c_data(&d),
            PduHeader::IcResp(_)
            | PduHeader::C2HTermReq(_)
            | PduHeader::CapsuleResp(_)
            | PduHeader::C2HData(_)
            | PduHeader::R2T(_) => Err(Fatal::term(Fes::InvalidHeaderField, pdu::OFF_TYPE)),
        }
    }

    fn on_capsule(&mut self, sqe: Sqe, data_len: usize) -> Result<(), Fatal> {
        if self.outstanding >= self.depth {
            if let Some(suppressed) = self.target.peer_log().admit() {
                tracing::warn!(
                    peer = ?self.peer,
                    qid = self.qid,
                    depth = self.depth,
                    suppressed_before = suppressed,
                    "host exceeded the queue depth"
                );
            }
            return Err(Fatal::term(Fes::PduSequenceError, pdu::OFF_TYPE));
        }
        // Taken out of the free list here; `transition` (Free -> ...) accounts for it below.
        let Some(idx) = self.free.pop() else {
            return Err(Fatal::term(Fes::PduSequenceError, pdu::OFF_TYPE));
        };
        let r = &mut self.reqs[idx];
        r.t_rx = clock::ticks();
        r.sqe = sqe;
        r.cqe = Cqe::default();
        r.c2h = false;
        r.xfer_len = 0;
        r.h2c_done = 0;
        r.sub_next = 0;
        r.sub_total = 0;
        r.sub_pending = 0;
        r.sub_status = Status::SUCCESS;
        r.tx_success = false;
        r.tx_data = false;
        r.icd_at = None;
        r.icd_go = false;
        self.sqhd = if self.depth > 0 {
            ((usize::from(self.sqhd) + 1) % self.depth) as u16
        } else {
            0
        };
        if data_len > 0 {
            let limit = if self.qid == 0 || self.ctrl.is_none() {
                BOOT_BUF_SIZE
            } else {
                self.target.limits.in_capsule_data_size as usize
            };
            if data_len > limit {
                // Put the slot back untouched: the connection is going down anyway.
                self.free.push(idx);
                return Err(Fatal::term(Fes::DataLimitExceeded, pdu::OFF_PLEN));
            }
            self.transition(idx, ReqState::RecvCapsuleData);
            if !self.take_buf(idx, data_len, true) {
                if !self.shared_bufs {
                    return Err(Fatal { fes: None });
                }
                // No buffer in the shared pool nor in the boot reserve (in-capsule data in
                // flight fills both): the data stays in the socket until one comes back.
                self.reqs[idx].xfer_len = data_len as u32;
                self.icd_wait = Some((idx, data_len));
                GroupStats::bump(&self.rx_stats.buf_waits);
                if let Some(p) = self.group_bufs.as_ref() {
                    p.borrow_mut().wait(self.group_slot);
                }
                return Ok(());
            }
            self.start_capsule_data(idx, data_len);
        } else {
            self.transition(idx, ReqState::RecvCapsuleData);
            self.command_ready(idx);
        }
        Ok(())
    }

    /// Request `idx` has its buffer: receive its `len` bytes of in-capsule data next.
    pub(super) fn start_capsule_data(&mut self, idx: usize, len: usize) {
        self.reqs[idx].xfer_len = len as u32;
        self.rx = Rx::Data {
            idx,
            kind: DataKind::Capsule,
            off: 0,
            left: len,
            start: 0,
        };
        self.rx_crc = 0;
    }

    fn on_h2c_data(&mut self, d: &DataHdr) -> Result<(), Fatal> {
        let idx = usize::from(d.ttag);
        let max_h2c = self.target.limits.max_h2c_data_size;
        let Some(r) = self.reqs.get(idx) else {
            return Err(Fatal::term(Fes::InvalidHeaderField, 10));
        };
        if r.state != ReqState::RecvH2cData || r.sqe.cid != d.cccid {
            return Err(Fatal::term(Fes::InvalidHeaderField, 10));
        }
        if d.datao != r.h2c_done {
            return Err(Fatal::term(Fes::DataOutOfRange, 12));
        }
        let end = d
            .datao
            .checked_add(d.datal)
            .ok_or(Fatal::term(Fes::DataOutOfRange, 16))?;
        if end > r.xfer_len {
            return Err(Fatal::term(Fes::DataOutOfRange, 16));
        }
        if d.datal > max_h2c {
            return Err(Fatal::term(Fes::DataLimitExceeded, 16));
        }
        let off = d.datao as usize;
        self.rx = Rx::Data {
            idx,
            kind: DataKind::H2c,
            off,
            left: d.datal as usize,
            start: off,
        };
        self.rx_crc = 0;
        Ok(())
    }

    fn data_done(
        &mut self,
        idx: usize,
        kind: DataKind,
        _start: usize,
        len: usize,
    ) -> Result<(), Fatal> {
        match kind {
            DataKind::Capsule => self.command_ready(idx),
            DataKind::H2c => {
                let r = &mut self.reqs[idx];
                r.h2c_done += len as u32;
                if r.h2c_done == r.xfer_len {
                    self.dispatch(idx);
                }
            }
        }
        Ok(())
    }

    /// The capsule (with any in-capsule data) is in: check the SGL, solicit data by R2T if the
    /// command has more, else run it.
    pub(super) fn command_ready(&mut self, idx: usize) {
        let sqe = self.reqs[idx].sqe;
        let has_icd = self.reqs[idx].buf.is_some();
        if has_icd {
            let len = self.reqs[idx].buf.as_ref().map_or(0, |b| b.len());
            if sqe.sgl.type_byte != sgl::DATA_BLOCK_OFFSET {
                return self.complete(idx, Status::SGL_TYPE_INVALID);
            }
            if sqe.sgl.addr != 0 || sqe.sgl.len as usize != len {
                return self.complete(idx, Status::DATA_SGL_LENGTH_INVALID);
            }
            return self.dispatch(idx);
        }
        let host_to_ctrl = if sqe.opcode == FABRICS_OPCODE {
            sqe.fctype() == crate::nvme::fctype::CONNECT
        } else {
            sqe.opcode & 0b11 == 0b01
        };
        // Without in-capsule data, the only descriptor NVMe/TCP defines for a transfer in either
        // direction is the Transport SGL Data Block (R2T/H2CData or C2HData). Any other type
        // (reserved ones included) describing data is refused here, before the command runs;
        // a zero-length descriptor moves nothing, so its type does not matter.
        if sqe.sgl.len != 0 && sqe.sgl.type_byte != sgl::TRANSPORT_DATA_BLOCK {
            return self.complete(idx, Status::SGL_TYPE_INVALID);
        }
        if !host_to_ctrl || sqe.sgl.len == 0 {
            return self.dispatch(idx);
        }
        // Check what can be checked before asking the host for data.
        if self.qid != 0 && sqe.opcode == io_op::WRITE {
            if let Err(s) = self.check_rw(&sqe) {
                return self.complete(idx, s);
            }
        }
        let max = if self.pool.is_some() || self.shared_bufs {
            self.target.limits.max_io_size
        } else {
            BOOT_BUF_SIZE as u32
        };
        if sqe.sgl.len > max {
            return self.complete(idx, Status::INVALID_FIELD);
        }
        if !self.take_buf(idx, sqe.sgl.len as usize, false) {
            if self.shared_bufs {
                // Waits for a buffer of the reactor's shared pool (retried in `poll`).
                return self.park_for_buf(idx);
            }
            return self.complete(idx, Status::INTERNAL_ERROR);
        }
        let dg = self.dg;
        let r = &mut self.reqs[idx];
        r.xfer_len = sqe.sgl.len;
        r.h2c_done = 0;
        let r2t = R2t {
            cccid: sqe.cid,
            ttag: idx as u16,
            r2to: 0,
            r2tl: sqe.sgl.len,
        };
        r.tx_hdr_len = pdu::encode_r2t(&mut r.tx_hdr, &r2t, dg);
        r.tx_data = false;
        r.tx_off = 0;
        self.transition(idx, ReqState::R2tQueued);
        self.tx_queue.push_back(idx);
    }
}

/// Header region length: header + digest + padding, up to the data (or the whole PDU if none).
fn region_len(l: &Layout) -> usize {
    if l.data_len > 0 {
        l.data_off
    } else {
        l.header_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_region_includes_padding_up_to_pdo() {
        let l = Layout {
            header_len: 76,
            data_off: 128,
            data_len: 10,
            data_digest: false,
        };
        assert_eq!(region_len(&l), 128);
        let l = Layout {
            header_len: 28,
            data_off: 28,
            data_len: 0,
            data_digest: false,
        };
        assert_eq!(region_len(&l), 28);
    }
}
