//! A bdev bound late: its geometry is known at start-up, its implementation arrives later.
//!
//! An encrypted namespace is exported (as *offline*) before its key is known: the NVMe target
//! needs the namespace and its geometry at start-up, but the crypto bdev can only be built once
//! the key manager has fetched the KEK and unwrapped the DEK. [`LateBdev`] stands in for it and
//! is bound exactly once ([`LateBdev::bind`], control thread). Channels opened before the bind
//! open their inner channel at the first I/O after it (a one-time allocation on the reactor,
//! not a per-I/O one); until then every I/O completes with `IoError(EAGAIN)` — the NVMe layer
//! does not send I/O to an offline namespace, so that is a last line of defence.

use super::{Bdev, BdevChannel, BdevError, BdevIo, IoStatus, IoType, Submit};
use crate::types::CoreId;
use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

/// Stand-in for a bdev that is not available yet.
pub struct LateBdev {
    name: String,
    block_size: u32,
    num_blocks: u64,
    buf_align: usize,
    inner: Arc<OnceLock<Arc<dyn Bdev>>>,
}

impl LateBdev {
    pub fn new(name: &str, block_size: u32, num_blocks: u64, buf_align: usize) -> Self {
        LateBdev {
            name: name.to_string(),
            block_size,
            num_blocks,
            buf_align,
            inner: Arc::new(OnceLock::new()),
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
        self.inner.set(bdev).map_err(|_| BdevError::Invalid {
            name: self.name.clone(),
            what: "already bound".into(),
        })
    }
    pub fn is_bound(&self) -> bool {
        self.inner.get().is_some()
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
        match self.inner.get() {
            Some(b) => b.io_type_supported(io_type),
            // What the crypto bdev will support (it refuses Write Zeroes and, by default, Unmap).
            None => matches!(io_type, IoType::Read | IoType::Write | IoType::Flush),
        }
    }
    fn buf_align(&self) -> usize {
        self.buf_align
    }
    fn open_channel(
        &self,
        core: CoreId,
        queue_depth: usize,
    ) -> Result<Box<dyn BdevChannel>, BdevError> {
        let inner = match self.inner.get() {
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
    /// The `LateBdev`'s cell: read until the bdev is bound, then never again.
    cell: Arc<OnceLock<Arc<dyn Bdev>>>,
    core: CoreId,
    depth: usize,
    inner: Option<Box<dyn BdevChannel>>,
    refused: VecDeque<BdevIo>,
}

impl LateChannel {
    /// Opens the inner channel once the bdev is bound (once per channel).
    fn try_bind(&mut self) {
        if self.inner.is_none() {
            if let Some(b) = self.cell.get() {
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
    }
}
