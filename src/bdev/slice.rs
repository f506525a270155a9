//! The `slice` bdev: a window of a base bdev.
//!
//! An encrypted namespace's backing device starts with a 1 MiB metadata region (the key header,
//! see `docs/on-disk-format.md`); the namespace is the data area after it. [`SliceBdev`] exposes
//! blocks `[offset_blocks, offset_blocks + num_blocks)` of its base as blocks `[0, num_blocks)`,
//! and the crypto bdev sits on top of it, so XTS tweaks count from the start of the data area
//! (dm-crypt `--offset` semantics) and no host I/O can reach the header.
//!
//! Threads: a [`SliceBdev`] is shared (`Send + Sync`, immutable); each reactor opens its own
//! [`SliceChannel`], which runs on that reactor: `submit` range-checks against the window, adds
//! the offset and passes the same [`BdevIo`] down (no allocation, no lock, no copy); `poll`
//! subtracts the offset again before handing each completion up, so callers see their own LBAs.
//! Backpressure is passed through unchanged (`Busy` from the base comes back as `Busy`, with the
//! caller's LBA restored).
//!
//! The key header in front of the window is read and written by `keys::header_io`, never
//! through a slice.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{validate, Bdev, BdevChannel, BdevError, BdevIo, IoType, Submit};
use crate::types::CoreId;

/// A window of a base bdev.
pub struct SliceBdev {
    name: String,
    base: Arc<dyn Bdev>,
    offset_blocks: u64,
    num_blocks: u64,
}

impl SliceBdev {
    /// Blocks `[offset_blocks, offset_blocks + num_blocks)` of `base`. The window must be
    /// non-empty and lie inside the base.
    pub fn new(
        name: &str,
        base: Arc<dyn Bdev>,
        offset_blocks: u64,
        num_blocks: u64,
    ) -> Result<Self, BdevError> {
        let end = offset_blocks.checked_add(num_blocks);
        if num_blocks == 0 || end.is_none_or(|end| end > base.num_blocks()) {
            return Err(BdevError::Invalid {
                name: name.to_owned(),
                what: format!(
                    "window of {num_blocks} blocks at block {offset_blocks} does not fit base {} ({} blocks)",
                    base.name(),
                    base.num_blocks()
                ),
            });
        }
        Ok(Self {
            name: name.to_owned(),
            base,
            offset_blocks,
            num_blocks,
        })
    }

    /// The base bdev.
    pub fn base(&self) -> &Arc<dyn Bdev> {
        &self.base
    }

    /// First block of the window on the base.
    pub fn offset_blocks(&self) -> u64 {
        self.offset_blocks
    }
}

impl Bdev for SliceBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn block_size(&self) -> u32 {
        self.base.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks
    }
    fn io_type_supported(&self, io_type: IoType) -> bool {
        self.base.io_type_supported(io_type)
    }
    fn buf_align(&self) -> usize {
        self.base.buf_align()
    }
    fn open_channel(
        &self,
        core: CoreId,
        queue_depth: usize,
    ) -> Result<Box<dyn BdevChannel>, BdevError> {
        let base = self.base.open_channel(core, queue_depth)?;
        Ok(Box::new(SliceChannel {
            base,
            offset_blocks: self.offset_blocks,
            num_blocks: self.num_blocks,
            block_size: self.base.block_size(),
            invalid: VecDeque::with_capacity(queue_depth),
            depth: queue_depth,
        }))
    }
}

/// A reactor's channel on a [`SliceBdev`].
pub struct SliceChannel {
    base: Box<dyn BdevChannel>,
    offset_blocks: u64,
    num_blocks: u64,
    block_size: u32,
    /// I/Os refused by the window's range check, handed back by the next `poll`. Preallocated
    /// to the queue depth; `submit` answers `Busy` rather than grow it.
    invalid: VecDeque<BdevIo>,
    depth: usize,
}

impl BdevChannel for SliceChannel {
    fn submit(&mut self, mut io: BdevIo) -> Submit {
        if let Err(status) = validate(&io, self.block_size, self.num_blocks) {
            if self.invalid.len() + self.base.in_flight() >= self.depth {
                return Submit::Busy(io);
            }
            io.status = status;
            self.invalid.push_back(io);
            return Submit::Queued;
        }
        // validate() checked offset + num_blocks <= num_blocks, and the window lies inside the
        // base, so this cannot overflow.
        io.offset_blocks += self.offset_blocks;
        match self.base.submit(io) {
            Submit::Queued => Submit::Queued,
            Submit::Busy(mut io) => {
                io.offset_blocks -= self.offset_blocks;
                Submit::Busy(io)
            }
        }
    }

    fn hint_write(&mut self, offset_blocks: u64, num_blocks: u32) {
        if offset_blocks.saturating_add(u64::from(num_blocks)) <= self.num_blocks {
            // Inside the window, which lies inside the base: no overflow.
            self.base
                .hint_write(offset_blocks + self.offset_blocks, num_blocks);
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        let mut n = 0;
        while let Some(io) = self.invalid.pop_front() {
            done(io);
            n += 1;
        }
        let offset = self.offset_blocks;
        n += self.base.poll(&mut |mut io: BdevIo| {
            io.offset_blocks = io.offset_blocks.saturating_sub(offset);
            done(io)
        });
        n
    }

    fn in_flight(&self) -> usize {
        self.base.in_flight() + self.invalid.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::malloc::{self, MallocConfig};
    use crate::bdev::sim::{CrashMode, SimBdev, SimConfig};
    use crate::bdev::{BufPool, IoStatus};

    fn malloc_bdev(blocks: u64) -> Arc<dyn Bdev> {
        malloc::open(&MallocConfig {
            name: "m0".into(),
            num_blocks: Some(blocks),
            size_bytes: None,
            block_size: 512,
            hugepages: false,
        })
        .expect("malloc")
    }

    fn run(ch: &mut dyn BdevChannel, io: BdevIo) -> BdevIo {
        assert!(matches!(ch.submit(io), Submit::Queued));
        let mut out = None;
        while out.is_none() {
            ch.poll(&mut |io| out = Some(io));
        }
        out.expect("completion")
    }

    #[test]
    fn slice_maps_lbas_and_refuses_out_of_window_io() {
        let base = malloc_bdev(64);
        let slice: Arc<dyn Bdev> =
            Arc::new(SliceBdev::new("s", base.clone(), 16, 32).expect("slice"));
        assert_eq!(slice.num_blocks(), 32);
        assert!(SliceBdev::new("bad", base.clone(), 40, 32).is_err());
        assert!(SliceBdev::new("bad", base.clone(), u64::MAX, 2).is_err());
        assert!(SliceBdev::new("bad", base.clone(), 0, 0).is_err());

        let mut pool = BufPool::new(4, 2 * 512, 64).expect("pool");
        let mut ch = slice.open_channel(CoreId(0), 4).expect("channel");
        let mut w = pool.get(2 * 512).expect("buf");
        w.as_mut_slice().fill(0xA5);
        let io = run(ch.as_mut(), BdevIo::new(IoType::Write, 30, 2, Some(w), 7));
        assert_eq!(io.status, IoStatus::Success);
        // The caller sees its own LBA and cookie back.
        assert_eq!((io.offset_blocks, io.ctx), (30, 7));
        pool.put(io.buf.expect("buf"));

        // On the base the data sits at 16 + 30.
        let mut bch = base.open_channel(CoreId(0), 4).expect("channel");
        let r = pool.get(2 * 512).expect("buf");
        let io = run(bch.as_mut(), BdevIo::new(IoType::Read, 46, 2, Some(r), 0));
        assert!(io
            .buf
            .as_ref()
            .expect("buf")
            .as_slice()
            .iter()
            .all(|&b| b == 0xA5));
        pool.put(io.buf.expect("buf"));

        // Past the window's end: refused, never reaches the base (block 48 stays untouched).
        let w = pool.get(2 * 512).expect("buf");
        let io = run(ch.as_mut(), BdevIo::new(IoType::Write, 31, 2, Some(w), 9));
        assert_eq!(io.status, IoStatus::InvalidRange);
        assert_eq!(io.offset_blocks, 31);
        let r = pool.get(512).expect("buf");
        let io = run(bch.as_mut(), BdevIo::new(IoType::Read, 48, 1, Some(r), 0));
        assert!(io
            .buf
            .as_ref()
            .expect("buf")
            .as_slice()
            .iter()
            .all(|&b| b == 0));
        assert_eq!(ch.in_flight(), 0);
    }

    #[test]
    fn slice_passes_backpressure_through_with_the_callers_lba() {
        let base = malloc_bdev(64);
        let slice = SliceBdev::new("s", base, 8, 16).expect("slice");
        let mut ch = slice.open_channel(CoreId(0), 1).expect("channel");
        let mut pool = BufPool::new(2, 512, 64).expect("pool");
        let a = pool.get(512).expect("buf");
        assert!(matches!(
            ch.submit(BdevIo::new(IoType::Write, 0, 1, Some(a), 0)),
            Submit::Queued
        ));
        let b = pool.get(512).expect("buf");
        match ch.submit(BdevIo::new(IoType::Write, 5, 1, Some(b), 1)) {
            Submit::Busy(io) => assert_eq!(io.offset_blocks, 5),
            Submit::Queued => panic!("depth 1 channel took a second I/O"),
        }
        assert_eq!(ch.poll(&mut |_| {}), 1);
    }

    /// FUA travels through the window to the base with the LBA shifted, and comes back up.
    #[test]
    fn fua_passes_through_to_the_base() {
        let dev = SimBdev::open(&SimConfig {
            name: "s".into(),
            num_blocks: Some(64),
            size_bytes: None,
            block_size: 512,
            seed: 3,
            fail_nth: None,
            fail_ratio: 0.0,
            cache_blocks: 32,
        })
        .expect("sim");
        let base: Arc<dyn Bdev> = dev.clone();
        let slice: Arc<dyn Bdev> = Arc::new(SliceBdev::new("w", base, 16, 32).expect("slice"));
        let late = crate::bdev::late::LateBdev::new("l", 512, 32, 64);
        late.bind(slice).expect("bind");
        let mut ch = late.open_channel(CoreId(0), 4).expect("channel");
        let mut pool = BufPool::new(2, 512, 64).expect("pool");
        for (lba, fill, fua) in [(0u64, 0xa1u8, true), (1, 0xb2, false)] {
            let mut b = pool.get(512).expect("buffer");
            b.as_mut_slice().fill(fill);
            let io = run(
                ch.as_mut(),
                BdevIo::new(IoType::Write, lba, 1, Some(b), 0).with_fua(fua),
            );
            assert_eq!(
                (io.status, io.offset_blocks, io.fua),
                (IoStatus::Success, lba, fua)
            );
            pool.put(io.buf.expect("buffer"));
        }
        assert_eq!(dev.stats().fua_writes, 1);
        dev.crash(CrashMode::LoseUnflushed);
        let r = run(
            ch.as_mut(),
            BdevIo::new(IoType::Read, 0, 1, pool.get(512), 0),
        );
        assert_eq!(r.buf.as_ref().expect("buffer").as_slice(), &[0xa1; 512][..]);
        let r2 = run(
            ch.as_mut(),
            BdevIo::new(IoType::Read, 1, 1, pool.get(512), 0),
        );
        assert_eq!(r2.buf.as_ref().expect("buffer").as_slice(), &[0; 512][..]);
    }
}
