//! The `null` bdev: a device of a given geometry that stores nothing (SPDK's null bdev).
//!
//! Writes are discarded; reads succeed **without touching the buffer** (it keeps whatever it held
//! — like SPDK's null bdev, a read does not zero the buffer, so that the bdev costs no memory
//! bandwidth); flush, write-zeroes and unmap succeed. It exists to measure the layers above a
//! bdev (transport, crypto, reactor) with the storage cost taken out.
//!
//! Threading: the [`NullBdev`] is shared by all reactors; each reactor's [`NullChannel`] is a
//! preallocated ring of finished I/Os (`DoneRing`) owned by that reactor. Submitting completes
//! the I/O into the ring, `poll` hands it back: no allocation, no lock, no syscall per I/O.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::Deserialize;

use super::{
    check_queue_depth, validate, Bdev, BdevChannel, BdevError, BdevIo, IoStatus, IoType, Submit,
};
use crate::types::CoreId;

/// `null` bdev settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NullConfig {
    pub name: String,
    /// Device size in blocks; give this or `size_bytes`.
    #[serde(default)]
    pub num_blocks: Option<u64>,
    /// Device size in bytes (a multiple of `block_size`); give this or `num_blocks`.
    #[serde(default)]
    pub size_bytes: Option<u64>,
    /// 512 or 4096; 4096 by default because that is what modern NVMe drives format to.
    #[serde(default = "default_block_size")]
    pub block_size: u32,
}

pub(crate) fn default_block_size() -> u32 {
    4096
}

/// Checks a block size and resolves `num_blocks`/`size_bytes` (exactly one) into a block count.
pub(crate) fn geometry(
    name: &str,
    block_size: u32,
    num_blocks: Option<u64>,
    size_bytes: Option<u64>,
) -> Result<u64, BdevError> {
    let invalid = |what: String| BdevError::Invalid {
        name: name.to_string(),
        what,
    };
    if name.is_empty() {
        return Err(invalid("name must not be empty".into()));
    }
    if block_size != 512 && block_size != 4096 {
        return Err(invalid(format!(
            "block_size {block_size} must be 512 or 4096"
        )));
    }
    let blocks = match (num_blocks, size_bytes) {
        (Some(n), None) => n,
        (None, Some(s)) => {
            if s % u64::from(block_size) != 0 {
                return Err(invalid(format!(
                    "size_bytes {s} is not a multiple of block_size {block_size}"
                )));
            }
            s / u64::from(block_size)
        }
        _ => {
            return Err(invalid(
                "give exactly one of num_blocks and size_bytes".into(),
            ))
        }
    };
    if blocks == 0 {
        return Err(invalid("size must be at least one block".into()));
    }
    Ok(blocks)
}

/// A fixed-capacity FIFO of finished I/Os for backends that complete at submit time (null,
/// malloc, sim). The storage is reserved up front; `push` never allocates.
pub(crate) struct DoneRing {
    q: VecDeque<BdevIo>,
    cap: usize,
}

impl DoneRing {
    pub(crate) fn new(cap: usize) -> Self {
        DoneRing {
            q: VecDeque::with_capacity(cap),
            cap,
        }
    }
    pub(crate) fn is_full(&self) -> bool {
        self.q.len() >= self.cap
    }
    /// Stores a finished I/O. Callers check `is_full` first; a push into a full ring is a bug.
    pub(crate) fn push(&mut self, io: BdevIo) {
        debug_assert!(!self.is_full(), "DoneRing overfilled");
        debug_assert!(
            io.status != IoStatus::Pending,
            "pushed an I/O without a status"
        );
        self.q.push_back(io);
    }
    pub(crate) fn drain(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        let n = self.q.len();
        while let Some(io) = self.q.pop_front() {
            done(io);
        }
        n
    }
    pub(crate) fn len(&self) -> usize {
        self.q.len()
    }
}

/// A device of fixed geometry that stores nothing.
pub struct NullBdev {
    name: String,
    block_size: u32,
    num_blocks: u64,
}

impl NullBdev {
    pub fn new(cfg: &NullConfig) -> Result<Self, BdevError> {
        let num_blocks = geometry(&cfg.name, cfg.block_size, cfg.num_blocks, cfg.size_bytes)?;
        Ok(NullBdev {
            name: cfg.name.clone(),
            block_size: cfg.block_size,
            num_blocks,
        })
    }
}

/// Opens a `null` bdev.
pub fn open(cfg: &NullConfig) -> Result<Arc<dyn Bdev>, BdevError> {
    Ok(Arc::new(NullBdev::new(cfg)?))
}

impl Bdev for NullBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks
    }
    fn io_type_supported(&self, _io_type: IoType) -> bool {
        true
    }
    fn open_channel(
        &self,
        _core: CoreId,
        queue_depth: usize,
    ) -> Result<Box<dyn BdevChannel>, BdevError> {
        check_queue_depth(&self.name, queue_depth)?;
        Ok(Box::new(NullChannel {
            ring: DoneRing::new(queue_depth),
            block_size: self.block_size,
            num_blocks: self.num_blocks,
        }))
    }
}

/// A reactor's channel on a [`NullBdev`].
pub struct NullChannel {
    ring: DoneRing,
    block_size: u32,
    num_blocks: u64,
}

impl BdevChannel for NullChannel {
    fn submit(&mut self, mut io: BdevIo) -> Submit {
        if self.ring.is_full() {
            return Submit::Busy(io);
        }
        io.status = match validate(&io, self.block_size, self.num_blocks) {
            Ok(()) => IoStatus::Success,
            Err(s) => s,
        };
        self.ring.push(io);
        Submit::Queued
    }
    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        self.ring.drain(done)
    }
    fn in_flight(&self) -> usize {
        self.ring.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::{BufPool, IoBuf};

    fn bdev(bs: u32, n: u64) -> Arc<dyn Bdev> {
        open(&NullConfig {
            name: "n0".into(),
            num_blocks: Some(n),
            size_bytes: None,
            block_size: bs,
        })
        .unwrap()
    }

    fn run(ch: &mut dyn BdevChannel, io: BdevIo) -> BdevIo {
        assert!(matches!(ch.submit(io), Submit::Queued));
        let mut out = None;
        assert_eq!(ch.poll(&mut |io| out = Some(io)), 1);
        out.unwrap()
    }

    #[test]
    fn reads_leave_buffer_and_all_types_succeed() {
        let b = bdev(512, 100);
        let mut ch = b.open_channel(CoreId(0), 4).unwrap();
        let mut pool = BufPool::new(2, 4096, 64).unwrap();
        let mut buf = pool.get(1024).unwrap();
        buf.as_mut_slice().fill(0x5a);
        let io = run(ch.as_mut(), BdevIo::new(IoType::Read, 98, 2, Some(buf), 7));
        assert_eq!(io.status, IoStatus::Success);
        assert_eq!(io.ctx, 7);
        assert!(
            io.buf
                .as_ref()
                .unwrap()
                .as_slice()
                .iter()
                .all(|&b| b == 0x5a),
            "null read must not touch the buffer"
        );
        for t in [IoType::Flush, IoType::WriteZeroes, IoType::Unmap] {
            assert_eq!(
                run(ch.as_mut(), BdevIo::new(t, 0, 100, None, 0)).status,
                IoStatus::Success
            );
        }
        let w = pool.get(512).unwrap();
        assert_eq!(
            run(ch.as_mut(), BdevIo::new(IoType::Write, 99, 1, Some(w), 0)).status,
            IoStatus::Success
        );
    }

    #[test]
    fn range_and_buffer_errors_complete_through_poll() {
        let b = bdev(4096, 10);
        let mut ch = b.open_channel(CoreId(0), 4).unwrap();
        let mk = |len| {
            Some(IoBuf::new(
                crate::sys::buf::AlignedBuf::zeroed(8192, 64).unwrap(),
                len,
            ))
        };
        let cases = [
            BdevIo::new(IoType::Read, 9, 2, mk(8192), 1), // past the end
            BdevIo::new(IoType::Write, 0, 1, mk(4095), 2), // wrong buffer length
            BdevIo::new(IoType::Read, 0, 1, None, 3),     // no buffer
            BdevIo::new(IoType::Unmap, u64::MAX, 2, None, 4), // overflow
        ];
        for io in cases {
            assert!(matches!(ch.submit(io), Submit::Queued));
        }
        assert_eq!(ch.in_flight(), 4);
        let mut got = Vec::new();
        assert_eq!(ch.poll(&mut |io| got.push((io.ctx, io.status))), 4);
        assert_eq!(
            got,
            (1..=4)
                .map(|c| (c, IoStatus::InvalidRange))
                .collect::<Vec<_>>()
        );
        assert_eq!(ch.in_flight(), 0);
    }

    #[test]
    fn busy_when_full() {
        let b = bdev(512, 10);
        let mut ch = b.open_channel(CoreId(0), 2).unwrap();
        for i in 0..2 {
            assert!(matches!(
                ch.submit(BdevIo::new(IoType::Flush, 0, 0, None, i)),
                Submit::Queued
            ));
        }
        match ch.submit(BdevIo::new(IoType::Flush, 0, 0, None, 9)) {
            Submit::Busy(io) => assert_eq!((io.ctx, io.status), (9, IoStatus::Pending)),
            Submit::Queued => panic!("third I/O on a depth-2 channel must be Busy"),
        }
        assert_eq!(ch.poll(&mut |_| {}), 2);
        assert!(matches!(
            ch.submit(BdevIo::new(IoType::Flush, 0, 0, None, 9)),
            Submit::Queued
        ));
    }

    #[test]
    fn config_checks() {
        let bad = |s: &str| {
            serde_yaml_ng::from_str::<NullConfig>(s)
                .map_err(|e| e.to_string())
                .and_then(|c| open(&c).map(|_| ()).map_err(|e| e.to_string()))
        };
        assert!(bad("name: a\nnum_blocks: 8\n").is_ok());
        assert!(bad("name: a\nsize_bytes: 8192\nblock_size: 512\n").is_ok());
        assert!(
            bad("name: a\nnum_blocks: 8\nbogus: 1\n").is_err(),
            "unknown field"
        );
        assert!(bad("name: a\nnum_blocks: 8\nblock_size: 1000\n").is_err());
        assert!(bad("name: a\nnum_blocks: 8\nsize_bytes: 4096\n").is_err());
        assert!(bad("name: a\nsize_bytes: 5000\n").is_err());
        assert!(bad("name: a\nnum_blocks: 0\n").is_err());
        let b = bdev(512, 10);
        assert!(b.open_channel(CoreId(0), 0).is_err());
    }
}
