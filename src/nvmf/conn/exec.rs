//! I/O command execution of a [`Connection`] (I/O queues): routing a received command to its
//! handler, the Read/Write/Write Zeroes/Flush/Dataset Management checks, bdev submission (with
//! parking on Busy and retry), bdev completion, and the batched submission of Writes whose
//! in-capsule data is still in the receive staging buffer.
//!
//! Runs on the connection's reactor, inside [`Connection::poll`]. It exists as its own file so
//! the hot command path is apart from the transport state machines (`recv`, `xfer`).

use super::{Action, Chan, Connection, ReqState};
use crate::bdev::{BdevIo, IoStatus, IoType, Submit, WriteFrom};
use crate::nvme::{io_op, Sqe, Status, FABRICS_OPCODE};
use crate::nvmf::target::{Namespace, QueueStats};

/// Writes whose in-capsule data is handed to a channel per `submit_writes_from` call (the
/// requests are gathered in a stack array).
const ICD_BATCH: usize = 32;

impl Connection {
    /// Whether request `idx`'s in-capsule data may stay in `rx_buf` until `flush_icd`: Writes
    /// on I/O queues without data digests (with them the digest may arrive after a refill).
    pub(super) fn may_defer_icd(&self, idx: usize) -> bool {
        !self.dg.data
            && self.qid != 0
            && self.reqs[idx].sqe.opcode == io_op::WRITE
            && self.icd_deferred.len() < self.icd_deferred.capacity()
    }

    /// Deals with every in-capsule data still in `rx_buf`, before it is refilled: Writes that
    /// passed their checks go to their namespace's channel through
    /// [`crate::bdev::BdevChannel::submit_writes_from`], up to [`ICD_BATCH`] per call (the
    /// crypto bdev encrypts them straight out of `rx_buf`, the others copy); anything else gets
    /// its data copied into its buffer as if it had never been deferred.
    pub(super) fn flush_icd(&mut self) {
        if self.icd_deferred.is_empty() {
            return;
        }
        // Pass 1: anything that cannot go as a batch is copied now (and a Write that was ready
        // but whose namespace has no channel is submitted the ordinary way, which fails it).
        for k in 0..self.icd_deferred.len() {
            let idx = self.icd_deferred[k];
            let r = &mut self.reqs[idx];
            let Some((at, len)) = r.icd_at else { continue };
            let ready = r.icd_go
                && r.state == ReqState::ReadyToExecute
                && r.buf.as_ref().is_some_and(|b| b.len() == len as usize)
                && self.channels.get(r.ns_idx).is_some_and(|c| c.is_some());
            if !ready {
                self.icd_copy_out(idx, at, len);
            }
        }
        // Pass 2: batches per namespace, in arrival order.
        let mut k = 0;
        while k < self.icd_deferred.len() {
            let first = self.icd_deferred[k];
            if self.reqs[first].icd_at.is_none() {
                k += 1;
                continue;
            }
            let ns = self.reqs[first].ns_idx;
            let Some(mut ch) = self.channels.get_mut(ns).and_then(Option::take) else {
                k += 1;
                continue;
            };
            let tag = self.io_tag(0);
            let mut batch: [usize; ICD_BATCH] = [0; ICD_BATCH];
            let mut n = 0;
            let mut refused: [Option<BdevIo>; ICD_BATCH] = Default::default();
            let mut nrefused = 0;
            {
                let rx_buf = &self.rx_buf;
                let reqs = &mut self.reqs;
                let mut writes: [Option<WriteFrom<'_>>; ICD_BATCH] = Default::default();
                for &idx in &self.icd_deferred[k..] {
                    if n == ICD_BATCH {
                        break;
                    }
                    let r = &mut reqs[idx];
                    let Some((at, len)) = r.icd_at else { continue };
                    if r.ns_idx != ns {
                        continue;
                    }
                    let (at, len) = (at as usize, len as usize);
                    let io = BdevIo::new(
                        r.io_type,
                        r.io_lba,
                        r.io_nlb,
                        r.buf.take(),
                        tag | idx as u64,
                    )
                    .with_fua(r.io_fua);
                    match WriteFrom::new(io, &rx_buf[at..at + len]) {
                        Ok(w) => {
                            r.icd_at = None;
                            writes[n] = Some(w);
                            batch[n] = idx;
                            n += 1;
                        }
                        // Pass 1 checked the length: unreachable, but never lose the buffer.
                        Err(io) => r.buf = io.buf,
                    }
                }
                let mut it = writes.iter_mut().take(n).filter_map(Option::take);
                ch.with(|c| {
                    c.submit_writes_from(&mut it, &mut |io| {
                        if nrefused < ICD_BATCH {
                            refused[nrefused] = Some(io);
                            nrefused += 1;
                        }
                    })
                });
            }
            self.channels[ns] = Some(ch);
            self.bdev_pending += n - nrefused;
            // Refused (channel full): their data is in their buffers now; park them.
            for io in refused.iter_mut().take(nrefused).filter_map(Option::take) {
                let idx = (io.ctx & 0xffff_ffff) as usize;
                let r = &mut self.reqs[idx];
                r.buf = io.buf;
                r.icd_go = false;
                self.exec_queue.push_back(idx);
            }
            for &idx in &batch[..n] {
                let r = &mut self.reqs[idx];
                if r.icd_go {
                    r.icd_go = false;
                    r.sub_pending = 1;
                    self.transition(idx, ReqState::Executing);
                }
            }
            if n == 0 {
                k += 1;
            }
        }
        // Anything left over (unreachable: pass 2 takes every request with data left) is
        // copied rather than lost.
        for k in 0..self.icd_deferred.len() {
            let idx = self.icd_deferred[k];
            if let Some((at, len)) = self.reqs[idx].icd_at {
                self.icd_copy_out(idx, at, len);
            }
        }
        self.icd_deferred.clear();
    }

    /// The ordinary path for deferred in-capsule data: copy it from `rx_buf` (`len` bytes at
    /// `at`) into the request's buffer, and submit the Write if it was waiting to be.
    fn icd_copy_out(&mut self, idx: usize, at: u32, len: u32) {
        let r = &mut self.reqs[idx];
        let go = r.icd_go;
        r.icd_at = None;
        r.icd_go = false;
        let (at, len) = (at as usize, len as usize);
        if let Some(b) = r.buf.as_mut() {
            let n = len.min(b.len());
            b.as_mut_slice()[..n].copy_from_slice(&self.rx_buf[at..at + n]);
        }
        if go {
            self.submit(idx);
        }
    }

    /// Routes a fully received command to its handler.
    pub(super) fn dispatch(&mut self, idx: usize) {
        let sqe = self.reqs[idx].sqe;
        let action = if sqe.opcode == FABRICS_OPCODE {
            self.fabrics_cmd(idx)
        } else if self.ctrl.is_none() {
            Action::Complete(Status::COMMAND_SEQUENCE_ERROR)
        } else if self.qid == 0 {
            self.admin_cmd(idx)
        } else if self.io_queue_deleted() {
            // A controller reset deleted this queue; it closes on this poll.
            Action::Complete(Status::SQ_DELETED)
        } else {
            match self.io_cmd(idx) {
                Ok(()) => Action::Pending,
                Err(s) => Action::Complete(s),
            }
        };
        if let Action::Complete(s) = action {
            self.complete(idx, s);
        }
    }

    // ----------------------------------------------------------------------------------------
    // I/O commands.

    /// Whether a controller reset (CC.EN 1 to 0) deleted this I/O queue since it connected:
    /// one atomic load.
    fn io_queue_deleted(&self) -> bool {
        self.ctrl
            .as_ref()
            .is_none_or(|c| c.io_generation() != self.io_gen)
    }

    /// Namespace, state, LBA range and transfer-size checks of a Read/Write.
    pub(super) fn check_rw(&self, sqe: &Sqe) -> Result<(usize, u64, u32, u32), Status> {
        let (ns_idx, ns) = self.io_namespace(sqe.nsid)?;
        let nlb = sqe.nlb();
        let lba = sqe.slba();
        let end = lba
            .checked_add(u64::from(nlb))
            .ok_or(Status::LBA_OUT_OF_RANGE)?;
        if end > ns.num_blocks {
            return Err(Status::LBA_OUT_OF_RANGE);
        }
        let bytes = u64::from(nlb) * u64::from(ns.block_size);
        if bytes > u64::from(self.target.limits.max_io_size) {
            return Err(Status::INVALID_FIELD);
        }
        if u64::from(sqe.sgl.len) < bytes {
            return Err(Status::DATA_SGL_LENGTH_INVALID);
        }
        Ok((ns_idx, lba, nlb, bytes as u32))
    }

    fn io_namespace(&self, nsid: u32) -> Result<(usize, &Namespace), Status> {
        if self.subsys.is_none() {
            return Err(Status::COMMAND_SEQUENCE_ERROR);
        }
        let i = nsid.wrapping_sub(1) as usize;
        let ns = self
            .ns_cache
            .get(i)
            .and_then(Option::as_deref)
            .ok_or(Status::INVALID_NAMESPACE)?;
        if !ns.is_online() || self.channels.get(i).is_none_or(|c| c.is_none()) {
            return Err(Status::NAMESPACE_NOT_READY);
        }
        if ns.is_sanitizing() {
            return Err(Status::SANITIZE_IN_PROGRESS);
        }
        Ok((i, ns))
    }

    fn io_cmd(&mut self, idx: usize) -> Result<(), Status> {
        let sqe = self.reqs[idx].sqe;
        match sqe.opcode {
            io_op::READ => {
                let (ns_idx, lba, nlb, bytes) = self.check_rw(&sqe)?;
                if !self.take_buf(idx, bytes as usize, false) {
                    if self.shared_bufs {
                        // Waits for a buffer of the reactor's shared pool (retried in `poll`).
                        self.park_for_buf(idx);
                        return Ok(());
                    }
                    return Err(Status::INTERNAL_ERROR);
                }
                self.set_io(idx, ns_idx, IoType::Read, lba, nlb);
                self.reqs[idx].c2h = true;
            }
            io_op::WRITE => {
                let (ns_idx, lba, nlb, bytes) = self.check_rw(&sqe)?;
                let r = &mut self.reqs[idx];
                match r.buf.as_mut() {
                    Some(b) if b.len() >= bytes as usize => b.set_len(bytes as usize),
                    _ => return Err(Status::DATA_SGL_LENGTH_INVALID),
                }
                if let Some((at, _)) = r.icd_at {
                    r.icd_at = Some((at, bytes));
                }
                self.set_io(idx, ns_idx, IoType::Write, lba, nlb);
                // FUA: acknowledged only from stable storage (the bdev stack carries the flag
                // to the backend). FUA on a Read needs nothing: no layer keeps a read cache
                // that could differ from the media.
                self.reqs[idx].io_fua = sqe.fua();
            }
            io_op::WRITE_ZEROES => {
                let (ns_idx, ns) = self.io_namespace(sqe.nsid)?;
                if !ns.supports(IoType::WriteZeroes) {
                    return Err(Status::INVALID_OPCODE);
                }
                let end = sqe
                    .slba()
                    .checked_add(u64::from(sqe.nlb()))
                    .ok_or(Status::LBA_OUT_OF_RANGE)?;
                if end > ns.num_blocks {
                    return Err(Status::LBA_OUT_OF_RANGE);
                }
                self.put_buf(idx);
                self.set_io(idx, ns_idx, IoType::WriteZeroes, sqe.slba(), sqe.nlb());
            }
            io_op::FLUSH => {
                let (ns_idx, flush) = self
                    .io_namespace(sqe.nsid)
                    .map(|(i, ns)| (i, ns.supports(IoType::Flush)))?;
                self.put_buf(idx);
                if !flush {
                    // Nothing volatile to flush on this bdev.
                    return self.finish_inline(idx, Status::SUCCESS);
                }
                self.set_io(idx, ns_idx, IoType::Flush, 0, 0);
            }
            io_op::DATASET_MANAGEMENT => {
                let (ns_idx, ns) = self.io_namespace(sqe.nsid)?;
                let nr = (sqe.cdw10 & 0xff) as usize + 1;
                let num_blocks = ns.num_blocks;
                let unmap = ns.supports(IoType::Unmap);
                let Some(buf) = self.reqs[idx].buf.as_ref() else {
                    return Err(Status::DATA_SGL_LENGTH_INVALID);
                };
                let ranges = buf
                    .as_slice()
                    .get(..nr * 16)
                    .ok_or(Status::DATA_SGL_LENGTH_INVALID)?;
                for r in ranges.chunks_exact(16) {
                    let (len, slba) = dsm_range(r);
                    let end = slba
                        .checked_add(u64::from(len))
                        .ok_or(Status::LBA_OUT_OF_RANGE)?;
                    if end > num_blocks {
                        return Err(Status::LBA_OUT_OF_RANGE);
                    }
                }
                // Only the deallocate attribute (AD, CDW11 bit 2) has an effect; the others are
                // hints. A bdev without unmap deallocates nothing, which the spec allows.
                if sqe.cdw11 & (1 << 2) == 0 || !unmap {
                    return self.finish_inline(idx, Status::SUCCESS);
                }
                let r = &mut self.reqs[idx];
                r.ns_idx = ns_idx;
                r.io_type = IoType::Unmap;
                r.sub_total = nr as u16;
                r.sub_next = 0;
                r.sub_pending = 0;
                self.transition(idx, ReqState::ReadyToExecute);
                self.submit_dsm(idx);
                return Ok(());
            }
            _ => return Err(Status::INVALID_OPCODE),
        }
        self.transition(idx, ReqState::ReadyToExecute);
        self.submit(idx);
        Ok(())
    }

    /// A command that succeeded without bdev work.
    fn finish_inline(&mut self, idx: usize, s: Status) -> Result<(), Status> {
        self.complete(idx, s);
        Ok(())
    }

    fn set_io(&mut self, idx: usize, ns_idx: usize, t: IoType, lba: u64, nlb: u32) {
        let r = &mut self.reqs[idx];
        r.ns_idx = ns_idx;
        r.io_type = t;
        r.io_lba = lba;
        r.io_nlb = nlb;
        r.io_fua = false;
        r.sub_pending = 0;
    }

    /// Submits a ReadyToExecute single-I/O request; parks it on Busy. A Write whose data is
    /// still in `rx_buf` is left for `flush_icd`, which hands it over with the others.
    fn submit(&mut self, idx: usize) {
        let tag = self.io_tag(idx);
        let r = &mut self.reqs[idx];
        if r.icd_at.is_some() && r.io_type == IoType::Write {
            r.icd_go = true;
            return;
        }
        let buf = if r.io_type.has_data() {
            r.buf.take()
        } else {
            None
        };
        let io = BdevIo::new(r.io_type, r.io_lba, r.io_nlb, buf, tag).with_fua(r.io_fua);
        let Some(ch) = self.channels.get_mut(r.ns_idx).and_then(|c| c.as_mut()) else {
            r.buf = io.buf;
            return self.complete(idx, Status::NAMESPACE_NOT_READY);
        };
        match ch.with(|c| c.submit(io)) {
            Submit::Queued => {
                self.bdev_pending += 1;
                r.sub_pending = 1;
                self.transition(idx, ReqState::Executing);
            }
            Submit::Busy(mut io) => {
                r.buf = io.buf.take();
                self.exec_queue.push_back(idx);
            }
        }
    }

    /// Submits the remaining Dataset Management ranges as Unmap I/Os (zero-length ones skipped).
    fn submit_dsm(&mut self, idx: usize) {
        let tag = self.io_tag(idx);
        let r = &mut self.reqs[idx];
        let Some(ch) = self.channels.get_mut(r.ns_idx).and_then(|c| c.as_mut()) else {
            return self.complete(idx, Status::NAMESPACE_NOT_READY);
        };
        let mut parked = false;
        while r.sub_next < r.sub_total {
            let off = usize::from(r.sub_next) * 16;
            let (len, slba) = match r.buf.as_ref().and_then(|b| b.as_slice().get(off..off + 16)) {
                Some(x) => dsm_range(x),
                None => (0, 0),
            };
            if len == 0 {
                r.sub_next += 1;
                continue;
            }
            match ch.with(|c| c.submit(BdevIo::new(IoType::Unmap, slba, len, None, tag))) {
                Submit::Queued => {
                    self.bdev_pending += 1;
                    r.sub_next += 1;
                    r.sub_pending += 1;
                }
                Submit::Busy(_) => {
                    parked = true;
                    break;
                }
            }
        }
        let pending = r.sub_pending;
        if parked {
            if pending > 0 && r.state == ReqState::ReadyToExecute {
                self.transition(idx, ReqState::Executing);
            }
            self.exec_queue.push_back(idx);
        } else if pending == 0 {
            // Every range was empty.
            let s = r.sub_status;
            self.complete(idx, s);
        } else if self.reqs[idx].state == ReqState::ReadyToExecute {
            self.transition(idx, ReqState::Executing);
        }
    }

    pub(super) fn retry_exec(&mut self) -> usize {
        let n = self.exec_queue.len();
        let mut work = 0;
        for _ in 0..n {
            let Some(idx) = self.exec_queue.pop_front() else {
                break;
            };
            work += 1;
            if self.reqs[idx].io_type == IoType::Unmap {
                self.submit_dsm(idx);
            } else {
                self.submit(idx);
            }
            if self.exec_queue.len() >= n {
                // The channel is still full; try again next poll.
                break;
            }
        }
        work
    }

    pub(super) fn poll_bdevs(&mut self) -> usize {
        let mut work = 0;
        for i in 0..self.channels.len() {
            // Shared channels are polled by the poll group, which routes their completions.
            if !matches!(self.channels[i], Some(Chan::Own(_))) {
                continue;
            }
            let Some(Chan::Own(mut ch)) = self.channels[i].take() else {
                continue;
            };
            work += ch.poll(&mut |io| self.io_done(io));
            self.channels[i] = Some(Chan::Own(ch));
        }
        work
    }

    /// A bdev I/O of this connection completed (from its own channel, a retired one, or its
    /// poll group's shared channel).
    pub fn io_done(&mut self, mut io: BdevIo) {
        self.bdev_pending = self.bdev_pending.saturating_sub(1);
        let idx = (io.ctx & 0xffff_ffff) as usize;
        let Some(r) = self.reqs.get_mut(idx) else {
            return;
        };
        if io.buf.is_some() {
            r.buf = io.buf.take();
        }
        r.sub_pending = r.sub_pending.saturating_sub(1);
        if io.status != IoStatus::Success && r.sub_status.is_success() {
            r.sub_status = match io.status {
                IoStatus::InvalidRange => Status::LBA_OUT_OF_RANGE,
                IoStatus::Unsupported => Status::INVALID_OPCODE,
                IoStatus::IoError(_) if io.io_type == IoType::Read => {
                    Status::UNRECOVERED_READ_ERROR
                }
                IoStatus::IoError(_) if io.io_type == IoType::Write => Status::WRITE_FAULT,
                _ => Status::INTERNAL_ERROR,
            };
            if matches!(io.status, IoStatus::IoError(_)) {
                QueueStats::add(&self.stats.media_errors, 1);
            }
        }
        let more = r.io_type == IoType::Unmap && r.sub_next < r.sub_total;
        if r.sub_pending > 0 || more {
            return;
        }
        let status = r.sub_status;
        if status.is_success() {
            let bytes = r.buf.as_ref().map_or(0, |b| b.len() as u64);
            match io.io_type {
                IoType::Read => {
                    QueueStats::add(&self.stats.read_cmds, 1);
                    QueueStats::add(&self.stats.bytes_read, bytes);
                }
                IoType::Write => {
                    QueueStats::add(&self.stats.write_cmds, 1);
                    QueueStats::add(&self.stats.bytes_written, bytes);
                }
                _ => {}
            }
        }
        self.complete(idx, status);
    }
}

/// A Dataset Management range: (length in blocks, starting LBA).
fn dsm_range(r: &[u8]) -> (u32, u64) {
    let mut len = [0u8; 4];
    let mut lba = [0u8; 8];
    if let (Some(a), Some(b)) = (r.get(4..8), r.get(8..16)) {
        len.copy_from_slice(a);
        lba.copy_from_slice(b);
    }
    (u32::from_le_bytes(len), u64::from_le_bytes(lba))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsm_range_decoding() {
        let mut r = [0u8; 16];
        r[4..8].copy_from_slice(&7u32.to_le_bytes());
        r[8..16].copy_from_slice(&0x1_0000_0000u64.to_le_bytes());
        assert_eq!(dsm_range(&r), (7, 0x1_0000_0000));
        assert_eq!(
            dsm_range(&r[..3]),
            (0, 0),
            "short input decodes as an empty range"
        );
    }
}
