//! The `malloc` bdev: a RAM disk on one anonymous mapping ([`Region`]), optionally on hugepages.
//!
//! Reads and writes are `memcpy`s between the I/O buffer and the region; write-zeroes and unmap
//! zero the range (unmapped blocks read back as zeroes); flush has nothing to do. Contents are
//! lost when the bdev is dropped. It exists for benchmarks and tests that need real data without
//! a disk.
//!
//! Threading: the [`MallocBdev`] (and its region) is shared by every reactor; each reactor's
//! [`MallocChannel`] does the copy on its own core at submit time and parks the finished I/O in a
//! preallocated ring of finished I/Os until `poll`. Reactors write the shared region concurrently at
//! different offsets; see [`crate::sys::mem`] for why that is sound and what overlapping I/O means.

use std::sync::Arc;

use serde::Deserialize;

use super::null::{default_block_size, geometry, DoneRing};
use super::{
    check_queue_depth, validate, Bdev, BdevChannel, BdevError, BdevIo, IoStatus, IoType, Submit,
};
use crate::sys::mem::{Backing, MemError, Region};
use crate::types::CoreId;

/// `malloc` bdev settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MallocConfig {
    pub name: String,
    /// Device size in blocks; give this or `size_bytes`.
    #[serde(default)]
    pub num_blocks: Option<u64>,
    /// Device size in bytes (a multiple of `block_size`); give this or `num_blocks`.
    #[serde(default)]
    pub size_bytes: Option<u64>,
    /// 512 or 4096 (default 4096).
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// Back the disk with 2 MiB hugepages (they must be reserved beforehand).
    #[serde(default)]
    pub hugepages: bool,
}

impl MallocConfig {
    /// The memory this bdev will hold, in bytes, as [`MallocBdev::new`] would allocate it
    /// (rounded up to whole 2 MiB pages when on hugepages). Checked before any allocation, so
    /// a caller's request can be held against a budget without touching memory.
    pub fn memory_bytes(&self) -> Result<u64, BdevError> {
        let num_blocks = geometry(
            &self.name,
            self.block_size,
            self.num_blocks,
            self.size_bytes,
        )?;
        let bytes = num_blocks
            .checked_mul(u64::from(self.block_size))
            .ok_or_else(|| BdevError::Invalid {
                name: self.name.clone(),
                what: "size overflows memory".into(),
            })?;
        if self.hugepages {
            let page = crate::sys::mem::HUGEPAGE_SIZE as u64;
            Ok(bytes.div_ceil(page).saturating_mul(page))
        } else {
            Ok(bytes)
        }
    }
}

/// A RAM disk.
pub struct MallocBdev {
    name: String,
    block_size: u32,
    num_blocks: u64,
    region: Arc<Region>,
}

impl MallocBdev {
    pub fn new(cfg: &MallocConfig) -> Result<Self, BdevError> {
        let num_blocks = geometry(&cfg.name, cfg.block_size, cfg.num_blocks, cfg.size_bytes)?;
        let bytes = num_blocks
            .checked_mul(u64::from(cfg.block_size))
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| BdevError::Invalid {
                name: cfg.name.clone(),
                what: "size overflows memory".into(),
            })?;
        let backing = if cfg.hugepages {
            Backing::Hugepages
        } else {
            Backing::Pages
        };
        let region = Region::new(bytes, backing).map_err(|e| match e {
            MemError::Hugepages { .. } => BdevError::Hugepages(format!("bdev {}: {e}", cfg.name)),
            _ => BdevError::NoMemory { bytes },
        })?;
        Ok(MallocBdev {
            name: cfg.name.clone(),
            block_size: cfg.block_size,
            num_blocks,
            region: Arc::new(region),
        })
    }
}

/// Opens a `malloc` bdev.
pub fn open(cfg: &MallocConfig) -> Result<Arc<dyn Bdev>, BdevError> {
    Ok(Arc::new(MallocBdev::new(cfg)?))
}

impl Bdev for MallocBdev {
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
        Ok(Box::new(MallocChannel {
            ring: DoneRing::new(queue_depth),
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            region: self.region.clone(),
        }))
    }
}

/// A reactor's channel on a [`MallocBdev`].
pub struct MallocChannel {
    ring: DoneRing,
    block_size: u32,
    num_blocks: u64,
    region: Arc<Region>,
}

impl MallocChannel {
    /// Does a validated I/O. The region's own bounds check backs up `validate`; its failure (which
    /// `validate` makes impossible) still becomes a status, never a panic.
    fn execute(&self, io: &mut BdevIo) -> IoStatus {
        let bs = u64::from(self.block_size);
        // validate() bounded offset+num_blocks by num_blocks, whose byte size fits usize (new()).
        let offset = (io.offset_blocks * bs) as usize;
        let len = (u64::from(io.num_blocks) * bs) as usize;
        let r = match (io.io_type, io.buf.as_mut()) {
            (IoType::Read, Some(buf)) => self.region.read_at(offset, buf.as_mut_slice()),
            (IoType::Write, Some(buf)) => self.region.write_at(offset, buf.as_slice()),
            (IoType::Read | IoType::Write, None) => return IoStatus::InvalidRange,
            (IoType::WriteZeroes | IoType::Unmap, _) => self.region.zero(offset, len),
            (IoType::Flush, _) => Ok(()),
        };
        match r {
            Ok(()) => IoStatus::Success,
            Err(_) => IoStatus::InvalidRange,
        }
    }
}

impl BdevChannel for MallocChannel {
    fn submit(&mut self, mut io: BdevIo) -> Submit {
        if self.ring.is_full() {
            return Submit::Busy(io);
        }
        io.status = match validate(&io, self.block_size, self.num_blocks) {
            Ok(()) => self.execute(&mut io),
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
    fn hint_write(&mut self, offset_blocks: u64, num_blocks: u32) {
        let bs = u64::from(self.block_size);
        let end = offset_blocks.saturating_add(u64::from(num_blocks));
        if end <= self.num_blocks {
            // In bounds, so the byte range fits usize (checked in new()).
            self.region.prefetch_for_write(
                (offset_blocks * bs) as usize,
                (u64::from(num_blocks) * bs) as usize,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::BufPool;
    use crate::sys::mem::{hugepages_free, HUGEPAGE_SIZE};

    fn cfg(bs: u32, n: u64) -> MallocConfig {
        MallocConfig {
            name: "m0".into(),
            num_blocks: Some(n),
            size_bytes: None,
            block_size: bs,
            hugepages: false,
        }
    }

    fn run(ch: &mut dyn BdevChannel, io: BdevIo) -> BdevIo {
        assert!(matches!(ch.submit(io), Submit::Queued));
        let mut out = None;
        assert_eq!(ch.poll(&mut |io| out = Some(io)), 1);
        out.unwrap()
    }

    fn pattern(lba: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (lba as usize * 31 + i * 13 + 1) as u8)
            .collect()
    }

    fn write_read_zero(b: &Arc<dyn Bdev>) {
        let bs = b.block_size() as usize;
        let mut ch = b.open_channel(CoreId(0), 8).unwrap();
        let mut pool = BufPool::new(4, 8 * bs, 64).unwrap();
        for lba in [0u64, 5, b.num_blocks() - 3] {
            // The write hint is only a hint: in range, past the end or overflowing, it changes
            // nothing and never fails.
            ch.hint_write(lba, 3);
            ch.hint_write(b.num_blocks() - 1, 3);
            ch.hint_write(u64::MAX, u32::MAX);
            assert_eq!(ch.in_flight(), 0);
            let mut w = pool.get(3 * bs).unwrap();
            w.as_mut_slice().copy_from_slice(&pattern(lba, 3 * bs));
            let io = run(ch.as_mut(), BdevIo::new(IoType::Write, lba, 3, Some(w), 0));
            assert_eq!(io.status, IoStatus::Success);
            pool.put(io.buf.unwrap());
        }
        for lba in [0u64, 5, b.num_blocks() - 3] {
            let r = pool.get(3 * bs).unwrap();
            let io = run(ch.as_mut(), BdevIo::new(IoType::Read, lba, 3, Some(r), 0));
            assert_eq!(io.status, IoStatus::Success);
            assert_eq!(
                io.buf.as_ref().unwrap().as_slice(),
                &pattern(lba, 3 * bs)[..]
            );
            pool.put(io.buf.unwrap());
        }
        // Zero the middle block of the write at 5 (write-zeroes) and block 0 (unmap).
        assert_eq!(
            run(ch.as_mut(), BdevIo::new(IoType::WriteZeroes, 6, 1, None, 0)).status,
            IoStatus::Success
        );
        assert_eq!(
            run(ch.as_mut(), BdevIo::new(IoType::Unmap, 0, 1, None, 0)).status,
            IoStatus::Success
        );
        assert_eq!(
            run(ch.as_mut(), BdevIo::new(IoType::Flush, 0, 0, None, 0)).status,
            IoStatus::Success
        );
        let r = pool.get(3 * bs).unwrap();
        let io = run(ch.as_mut(), BdevIo::new(IoType::Read, 5, 3, Some(r), 0));
        let got = io.buf.as_ref().unwrap().as_slice();
        let want = pattern(5, 3 * bs);
        assert_eq!(&got[..bs], &want[..bs]);
        assert!(got[bs..2 * bs].iter().all(|&x| x == 0));
        assert_eq!(&got[2 * bs..], &want[2 * bs..]);
        pool.put(io.buf.unwrap());
        let r = pool.get(bs).unwrap();
        let io = run(ch.as_mut(), BdevIo::new(IoType::Read, 0, 1, Some(r), 0));
        assert!(io.buf.as_ref().unwrap().as_slice().iter().all(|&x| x == 0));
    }

    #[test]
    fn roundtrip_512_and_4096() {
        write_read_zero(&open(&cfg(512, 64)).unwrap());
        write_read_zero(&open(&cfg(4096, 64)).unwrap());
    }

    #[test]
    fn invalid_io_and_busy() {
        let b = open(&cfg(512, 16)).unwrap();
        let mut ch = b.open_channel(CoreId(0), 2).unwrap();
        let mut pool = BufPool::new(4, 4096, 64).unwrap();
        let r = pool.get(1024).unwrap();
        assert!(matches!(
            ch.submit(BdevIo::new(IoType::Read, 15, 2, Some(r), 1)),
            Submit::Queued
        ));
        let w = pool.get(1000).unwrap();
        assert!(matches!(
            ch.submit(BdevIo::new(IoType::Write, 0, 2, Some(w), 2)),
            Submit::Queued
        ));
        let busy = match ch.submit(BdevIo::new(IoType::Flush, 0, 0, None, 3)) {
            Submit::Busy(io) => io,
            Submit::Queued => panic!("full channel must be Busy"),
        };
        let mut got = Vec::new();
        assert_eq!(ch.poll(&mut |io| got.push((io.ctx, io.status))), 2);
        assert_eq!(
            got,
            vec![(1, IoStatus::InvalidRange), (2, IoStatus::InvalidRange)]
        );
        assert!(matches!(ch.submit(busy), Submit::Queued));
    }

    #[test]
    fn two_channels_share_the_disk() {
        let b = open(&cfg(4096, 8)).unwrap();
        let mut a = b.open_channel(CoreId(0), 1).unwrap();
        let mut c = b.open_channel(CoreId(1), 1).unwrap();
        let mut pool = BufPool::new(2, 4096, 64).unwrap();
        let mut w = pool.get(4096).unwrap();
        w.as_mut_slice().fill(0xc3);
        assert_eq!(
            run(a.as_mut(), BdevIo::new(IoType::Write, 7, 1, Some(w), 0)).status,
            IoStatus::Success
        );
        let r = pool.get(4096).unwrap();
        let io = run(c.as_mut(), BdevIo::new(IoType::Read, 7, 1, Some(r), 0));
        assert!(io.buf.unwrap().as_slice().iter().all(|&x| x == 0xc3));
    }

    #[test]
    fn hugepage_backed_when_available() {
        if hugepages_free() < 2 {
            println!("skip: fewer than 2 free hugepages (see /proc/sys/vm/nr_hugepages)");
            return;
        }
        let mut c = cfg(4096, (2 * HUGEPAGE_SIZE / 4096) as u64);
        c.hugepages = true;
        match open(&c) {
            Ok(b) => write_read_zero(&b),
            Err(BdevError::Hugepages(e)) if hugepages_free() < 2 => {
                println!("skip: another process took the free hugepages ({e})")
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn hugepage_shortage_is_a_clear_error() {
        // Ask for far more hugepages than any test machine has free.
        let free = hugepages_free() as u64;
        let mut c = cfg(4096, (free + 1024) * (HUGEPAGE_SIZE / 4096) as u64);
        c.hugepages = true;
        match open(&c) {
            Err(BdevError::Hugepages(msg)) => assert!(msg.contains("nr_hugepages"), "{msg}"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => println!(
                "skip: the kernel granted {} extra hugepages (overcommit)",
                free + 1024
            ),
        }
    }
}
