//! Data buffers of a queue pair: taken from the reactor poll group's shared pool (or the
//! queue's own pool outside a group), requests waiting for one in arrival order, and the
//! per-queue setup at Connect. Runs on the connection's reactor.

use super::*;

impl Connection {
    /// Returns the request's buffer to its pool.
    pub(in crate::nvmf) fn put_buf(&mut self, idx: usize) {
        let r = &mut self.reqs[idx];
        if let Some(b) = r.buf.take() {
            match r.buf_src {
                BufSrc::Boot => self.boot_pool.put(b),
                BufSrc::Own => {
                    if let Some(p) = self.pool.as_mut() {
                        p.put(b);
                    }
                }
                BufSrc::Shared => {
                    if let Some(p) = self.group_bufs.as_ref() {
                        p.borrow_mut().put(b);
                    }
                }
            }
        }
    }

    /// Gives request `idx` a buffer of `len` bytes from the current pool. With the poll
    /// group's shared pool, `reserve` lets it fall back to the boot pool (in-capsule data and
    /// admin data, which never wait for the host to send more); false means the caller parks
    /// the request ([`Connection::park_for_buf`]) or, outside a group, fails it.
    pub(in crate::nvmf) fn take_buf(&mut self, idx: usize, len: usize, reserve: bool) -> bool {
        self.put_buf(idx);
        let (b, src) = if self.shared_bufs {
            // Requests already waiting on this queue go first.
            let b = if self.buf_wait.is_empty() || self.buf_retrying {
                self.group_bufs
                    .as_ref()
                    .and_then(|p| p.borrow_mut().get(self.group_slot, len, &self.target))
            } else {
                None
            };
            match b {
                Some(b) => (Some(b), BufSrc::Shared),
                None if reserve => (self.boot_pool.get(len), BufSrc::Boot),
                None => (None, BufSrc::Shared),
            }
        } else {
            match self.pool.as_mut() {
                Some(p) => (p.get(len), BufSrc::Own),
                None => (self.boot_pool.get(len), BufSrc::Boot),
            }
        };
        let r = &mut self.reqs[idx];
        r.buf_src = src;
        r.buf = b;
        r.buf.is_some()
    }

    /// Request `idx` (in `RecvCapsuleData`) found no shared buffer: it waits in `buf_wait`
    /// (at the front again when a retry failed, so the order holds) and the queue joins the
    /// pool's waiters.
    pub(in crate::nvmf) fn park_for_buf(&mut self, idx: usize) {
        if self.buf_retrying {
            self.buf_wait.push_front(idx);
            self.buf_retry_failed = true;
        } else {
            self.buf_wait.push_back(idx);
            GroupStats::bump(&self.rx_stats.buf_waits);
        }
        if let Some(p) = self.group_bufs.as_ref() {
            p.borrow_mut().wait(self.group_slot);
        }
    }

    /// Retries the requests waiting for a buffer, oldest first, until one finds none.
    pub(in crate::nvmf) fn retry_bufs(&mut self) -> usize {
        if self.buf_wait.is_empty() && self.icd_wait.is_none() {
            return 0;
        }
        let mut work = 0;
        self.buf_retrying = true;
        if let Some((idx, len)) = self.icd_wait {
            if self.take_buf(idx, len, true) {
                self.icd_wait = None;
                self.start_capsule_data(idx, len);
                work += 1;
            }
        }
        self.buf_retry_failed = false;
        while let Some(idx) = self.buf_wait.pop_front() {
            self.command_ready(idx);
            if self.buf_retry_failed {
                break;
            }
            work += 1;
        }
        self.buf_retrying = false;
        self.leave_buf_waiters();
        work
    }

    /// Leaves the shared pool's waiters once nothing of this queue waits for a buffer.
    pub(in crate::nvmf) fn leave_buf_waiters(&mut self) {
        if self.buf_wait.is_empty() && self.icd_wait.is_none() {
            if let Some(p) = self.group_bufs.as_ref() {
                p.borrow_mut().leave(self.group_slot);
            }
        }
    }

    /// Sets the queue up after a successful Connect: in a poll group, data buffers come from
    /// the group's shared pool (nothing allocated here); outside one, the queue's own pool is
    /// reserved under the budget and allocated. Opens (or takes) the bdev channels.
    pub(in crate::nvmf) fn setup_queue(
        &mut self,
        depth: usize,
        io_queue: bool,
    ) -> Result<(), Status> {
        let l = self.target.limits;
        let subsys = self.subsys.clone().ok_or(Status::INTERNAL_ERROR)?;
        // Page alignment suits every backend (O_DIRECT included), so namespaces added after
        // Connect can use this pool too.
        let align = subsys
            .namespaces()
            .iter()
            .map(|n| n.bdev.buf_align())
            .max()
            .unwrap_or(POOL_ALIGN)
            .max(POOL_ALIGN);
        if self.group_bufs.is_some() && align <= SHARED_BUF_ALIGN {
            // In a poll group: data buffers come from the reactor's shared pool, allocated
            // when needed (under the same budget) and reused by every queue; Connect
            // allocates nothing.
            self.pool_align = SHARED_BUF_ALIGN;
            self.shared_bufs = true;
            self.depth = depth;
            self.sqhd = 0;
            if io_queue {
                self.sync_namespaces();
            }
            return Ok(());
        }
        self.pool_align = align;
        // The target-wide budget first: refused, nothing is allocated.
        let bytes = depth as u64 * u64::from(l.max_io_size);
        if !self.target.reserve_buffers(bytes) {
            if let Some(suppressed) = self.target.refusal_log().admit() {
                tracing::warn!(
                    peer = ?self.peer,
                    depth,
                    bytes,
                    reserved = self.target.buffer_bytes_reserved(),
                    budget_mib = l.buffer_budget_mib,
                    suppressed,
                    "queue refused: its data buffers would exceed nvmf.buffer_budget_mib"
                );
            }
            return Err(Status::CONNECT_CONTROLLER_BUSY);
        }
        let pool = match BufPool::new(depth, l.max_io_size as usize, align) {
            Ok(p) => p,
            Err(_) => {
                self.target.release_buffers(bytes);
                return Err(Status::INTERNAL_ERROR);
            }
        };
        self.target.release_buffers(self.reserved_bytes);
        self.reserved_bytes = bytes;
        self.pool = Some(pool);
        self.depth = depth;
        self.sqhd = 0;
        if io_queue {
            self.sync_namespaces();
        }
        Ok(())
    }
}
