//! A bdev bound late: its geometry is known at start-up, its implementation arrives later.
//!
//! An encrypted namespace is exported (as *offline*) before its key is known: the NVMe target
//! needs the namespace and its geometry at start-up, but the crypto bdev can only be built once
//! the key manager has fetched the KEK and unwrapped the DEK. [`LateBdev`] stands in for it and
//! is bound exactly once ([`LateBdev::bind`], control thread). Channels opened before the bind
//! open their inner channel at the first I/O after it (a one-time allocation on the reactor,
//! not a per-I/O one); until then every I/O completes with `IoError(EAGAIN)` — the NVMe layer
//! does not send I/O to an offline namespace, so that is a last line of defence.
//!
//! When its namespace is deleted, [`LateBdev::release`] drops the stand-in's reference to the
//! bound bdev (and with it, once the last channel is closed, the crypto bdev and its key); a
//! released stand-in never binds again.

use super::{Bdev, BdevChannel, BdevError, BdevIo, IoStatus, IoType, Submit, WriteFrom};
use crate::types::CoreId;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

/// Stand-in for a bdev that is not available yet.
pub struct LateBdev {
    name: String,
    block_size: u32,
    num_blocks: u64,
    buf_align: usize,
    inner: Arc<Mutex<Cell>>,
}

/// What a stand-in holds.
enum Cell {
    Unbound,
    Bound(Arc<dyn Bdev>),
    /// Its namespace was deleted: the bdev (and key) let go, never bound again.
    Released,
}

fn lock(c: &Mutex<Cell>) -> MutexGuard<'_, Cell> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

fn bound(c: &Mutex<Cell>) -> Option<Arc<dyn Bdev>> {
    match &*lock(c) {
        Cell::Bound(b) => Some(b.clone()),
        _ => None,
    }
}

impl LateBdev {
    pub fn new(name: &str, block_size: u32, num_blocks: u64, buf_align: usize) -> Self {
        LateBdev {
            name: name.to_string(),
            block_size,
            num_blocks,
            buf_align,
            inner: Arc::new(Mutex::new(Cell::Unbound)),
        }
    }
    /// Binds the real bdev; its geometry must match what was announced.
    pub fn bind(&self, bdev: Arc<dyn Bdev>) -> Result<(), BdevError> {
        if bdev.block_size() != self.block_size || bdev.num_blocks() != self.num_blocks {
            return Err(BdevError::Invalid {
                name: self.name.clone(),
                what: format!(
                    "bound bdev has {} blocks of {} bytes, {} blocks of {} were announced",
                    bdev.num_blocks(),
                    bdev.block_size(),
                    self.num_blocks,
                    self.block_size
                ),
            });
        }
        let mut cell = lock(&self.inner);
        match &*cell {
            Cell::Unbound => {
                *cell = Cell::Bound(bdev);
                Ok(())
            }
            Cell::Bound(_) => Err(BdevError::Invalid {
                name: self.name.clone(),
                what: "already bound".into(),
            }),
            Cell::Released => Err(BdevError::Invalid {
                name: self.name.clone(),
                what: "released (its namespace was deleted)".into(),
            }),
        }
    }
    pub fn is_bound(&self) -> bool {
        matches!(&*lock(&self.inner), Cell::Bound(_))
    }
    /// Lets go of the bound bdev, if any, for good: channels already open keep theirs until
    /// they are closed; no new channel reaches it and nothing binds again. Returns whether a
    /// bdev was bound.
    pub fn release(&self) -> bool {
        let old = std::mem::replace(&mut *lock(&self.inner), Cell::Released);
        matches!(old, Cell::Bound(_))
    }
}

impl Bdev for LateBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks
    }
    fn io_type_supported(&self, io_type: IoType) -> bool {
        match bound(&self.inner) {
            Some(b) => b.io_type_supported(io_type),
            // What the crypto bdev will support (it refuses Write Zeroes and, by default, Unmap).
            None => matches!(io_type, IoType::Read | IoType::Write | IoType::Flush),
        }
    }
    fn buf_align(&self) -> usize {
        self.buf_align
    }
    /// A stand-in exists only for an encrypted (managed-key) namespace's crypto bdev (see the
    /// module docs): encrypted before the bind, and whatever it is bound to says after.
    fn encrypts_data(&self) -> bool {
        bound(&self.inner).is_none_or(|b| b.encrypts_data())
    }
    fn open_channel(
        &self,
        core: CoreId,
        queue_depth: usize,
    ) -> Result<Box<dyn BdevChannel>, BdevError> {
        let inner = match bound(&self.inner) {
            Some(b) => Some(b.open_channel(core, queue_depth)?),
            None => None,
        };
        Ok(Box::new(LateChannel {
            cell: self.inner.clone(),
            core,
            depth: queue_depth,
            inner,
            refused: VecDeque::with_capacity(queue_depth),
        }))
    }
}

struct LateChannel {
    /// The `LateBdev`'s cell: read (a short lock, only while this channel has no inner one,
    /// i.e. while the namespace is offline) until the bdev is bound, then never again.
    cell: Arc<Mutex<Cell>>,
    core: CoreId,
    depth: usize,
    inner: Option<Box<dyn BdevChannel>>,
    refused: VecDeque<BdevIo>,
}

impl LateChannel {
    /// Opens the inner channel once the bdev is bound (once per channel).
    fn try_bind(&mut self) {
        if self.inner.is_none() {
            if let Some(b) = bound(&self.cell) {
                match b.open_channel(self.core, self.depth) {
                    Ok(ch) => self.inner = Some(ch),
                    Err(e) => tracing::error!(bdev = b.name(), "opening channel after bind: {e}"),
                }
            }
        }
    }
}

impl BdevChannel for LateChannel {
    fn submit(&mut self, mut io: BdevIo) -> Submit {
        if self.inner.is_none() {
            self.try_bind();
        }
        if let Some(ch) = self.inner.as_mut() {
            return ch.submit(io);
        }
        if self.refused.len() >= self.depth {
            return Submit::Busy(io);
        }
        io.status = IoStatus::IoError(libc::EAGAIN);
        self.refused.push_back(io);
        Submit::Queued
    }
    fn submit_writes_from(
        &mut self,
        writes: &mut dyn Iterator<Item = WriteFrom<'_>>,
        busy: &mut dyn FnMut(BdevIo),
    ) {
        if self.inner.is_none() {
            self.try_bind();
        }
        match self.inner.as_mut() {
            Some(ch) => ch.submit_writes_from(writes, busy),
            None => {
                for w in writes {
                    if let Submit::Busy(io) = self.submit(w.into_copied()) {
                        busy(io);
                    }
                }
            }
        }
    }
    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        let mut n = 0;
        while let Some(io) = self.refused.pop_front() {
            done(io);
            n += 1;
        }
        if let Some(ch) = self.inner.as_mut() {
            n += ch.poll(done);
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.refused.len() + self.inner.as_ref().map_or(0, |c| c.in_flight())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::malloc::{self, MallocConfig};
    use crate::bdev::BufPool;

    #[test]
    fn refuses_until_bound_then_passes_through() {
        let late = LateBdev::new("late", 4096, 256, 64);
        let mut ch = late.open_channel(CoreId(0), 4).unwrap();
        let mut pool = BufPool::new(2, 4096, 4096).unwrap();
        let io = BdevIo::new(IoType::Read, 0, 1, pool.get(4096), 1);
        assert!(matches!(ch.submit(io), Submit::Queued));
        let mut got = Vec::new();
        ch.poll(&mut |io| got.push(io.status));
        assert_eq!(got, vec![IoStatus::IoError(libc::EAGAIN)]);

        let cfg: MallocConfig =
            serde_yaml_ng::from_str("name: m\nnum_blocks: 128\nblock_size: 4096\n").unwrap();
        assert!(
            late.bind(malloc::open(&cfg).unwrap()).is_err(),
            "geometry mismatch must be refused"
        );
        let cfg: MallocConfig =
            serde_yaml_ng::from_str("name: m\nnum_blocks: 256\nblock_size: 4096\n").unwrap();
        late.bind(malloc::open(&cfg).unwrap()).unwrap();
        assert!(late.is_bound());
        let mut buf = pool.get(4096).unwrap();
        buf.as_mut_slice().fill(7);
        assert!(matches!(
            ch.submit(BdevIo::new(IoType::Write, 3, 1, Some(buf), 2)),
            Submit::Queued
        ));
        let mut st = Vec::new();
        while st.is_empty() {
            ch.poll(&mut |io| st.push(io.status));
        }
        assert_eq!(st, vec![IoStatus::Success]);

        // Released: the stand-in lets go of the bdev (the open channel keeps working until it
        // is closed), new channels refuse I/O, and it never binds again.
        let weak = match &*lock(&late.inner) {
            Cell::Bound(b) => Arc::downgrade(b),
            _ => unreachable!(),
        };
        assert!(late.release());
        assert!(!late.is_bound());
        // The stand-in held the only reference to the bdev object.
        assert!(weak.upgrade().is_none(), "released: the bdev is gone");
        // The channel opened before keeps its own resources until it is closed.
        let mut pool = BufPool::new(2, 4096, 4096).unwrap();
        let buf = pool.get(4096).unwrap();
        assert!(matches!(
            ch.submit(BdevIo::new(IoType::Read, 3, 1, Some(buf), 4)),
            Submit::Queued
        ));
        let mut st = Vec::new();
        while st.is_empty() {
            ch.poll(&mut |io| st.push(io.status));
        }
        assert_eq!(st, vec![IoStatus::Success]);
        let mut ch2 = late.open_channel(CoreId(0), 4).unwrap();
        let io = BdevIo::new(IoType::Read, 0, 1, pool.get(4096), 3);
        assert!(matches!(ch2.submit(io), Submit::Queued));
        let mut got = Vec::new();
        ch2.poll(&mut |io| got.push(io.status));
        assert_eq!(got, vec![IoStatus::IoError(libc::EAGAIN)]);
        let cfg: MallocConfig =
            serde_yaml_ng::from_str("name: m\nnum_blocks: 256\nblock_size: 4096\n").unwrap();
        assert!(late.bind(malloc::open(&cfg).unwrap()).is_err());
        assert!(!late.release(), "nothing left to release");
    }
}
