//! Header I/O ([`HeaderIo`]) on the metadata region in front of an encrypted namespace's data
//! area: the bdev-backed implementations of the trait `keys::store` defines.
//!
//! Runs on control threads, before a namespace is online or while a rekey rewrites the header,
//! and never on a reactor. It lives in `keys` (not next to the `slice` bdev) so that the layers
//! point one way: keys use bdevs, bdevs know nothing of keys. Two implementations, picked by
//! backend:
//! * [`FileHeaderIo`] — files and block devices (the `uring` backend): the path is opened a
//!   second time with plain buffered `pread`/`pwrite` and `fdatasync`. The data path may use
//!   O_DIRECT on the same device; the two never overlap (the header region is outside every
//!   slice), so the page cache and direct I/O do not alias.
//! * [`BdevHeaderIo`] — RAM backends (`malloc`, `sim`), which have no path: each call opens a
//!   private channel on the bdev, submits one I/O and polls it to completion on the calling
//!   thread. That blocks the control thread for the length of one RAM copy, which is fine there
//!   and would be wrong on a reactor.
//!
//! Both refuse any access outside the metadata region, so a bug in the header code cannot write
//! into namespace data.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bdev::{Bdev, BdevIo, IoBuf, IoStatus, IoType, Submit};
use crate::keys::store::HeaderIo;
use crate::sys::buf::AlignedBuf;
use crate::types::CoreId;

/// Checks that `[off, off + len)` lies inside a region of `region_bytes`.
fn check_region(off: u64, len: usize, region_bytes: u64) -> io::Result<()> {
    let end = u64::try_from(len).ok().and_then(|l| off.checked_add(l));
    match end {
        Some(end) if end <= region_bytes => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "header I/O of {len} bytes at {off} leaves the {region_bytes}-byte metadata region"
            ),
        )),
    }
}

/// Header I/O on a file or block device by path (buffered `pread`/`pwrite`, `fdatasync`),
/// limited to the first `region_bytes` bytes.
pub struct FileHeaderIo {
    file: File,
    path: PathBuf,
    region_bytes: u64,
}

impl FileHeaderIo {
    /// Opens `path` read-write (no O_DIRECT, no create).
    pub fn open(path: &Path, region_bytes: u64) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Self {
            file,
            path: path.to_owned(),
            region_bytes,
        })
    }

    /// Opens `path` read-write only if it is a regular file reached without following a final
    /// symlink (O_NOFOLLOW; the type is checked on the opened descriptor, so the path cannot be
    /// swapped between check and use). For header files a config names (detached headers).
    pub fn open_regular(path: &Path, region_bytes: u64) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        if meta.len() < region_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} bytes, smaller than the {region_bytes}-byte metadata region",
                    meta.len()
                ),
            ));
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            region_bytes,
        })
    }

    /// The device path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl HeaderIo for FileHeaderIo {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        check_region(off, buf.len(), self.region_bytes)?;
        self.file.read_exact_at(buf, off)
    }
    fn write_at(&mut self, off: u64, buf: &[u8]) -> io::Result<()> {
        check_region(off, buf.len(), self.region_bytes)?;
        self.file.write_all_at(buf, off)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// How long [`BdevHeaderIo`] waits for one I/O before giving up. A RAM bdev answers in
/// microseconds; anything near this is a stuck backend, which must not hang boot forever.
const BDEV_HEADER_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Header I/O through a bdev channel driven synchronously on the calling (control) thread,
/// limited to the first `region_bytes` bytes. For backends without a path (`malloc`, `sim`).
pub struct BdevHeaderIo {
    bdev: Arc<dyn Bdev>,
    core: CoreId,
    region_bytes: u64,
}

impl BdevHeaderIo {
    /// Header I/O on `bdev`; channels are opened for `core` (any core id: the channel lives only
    /// for one call on the calling thread).
    pub fn new(bdev: Arc<dyn Bdev>, core: CoreId, region_bytes: u64) -> io::Result<Self> {
        let bs = u64::from(bdev.block_size());
        let device_bytes = bdev.num_blocks().saturating_mul(bs);
        if bs == 0 || !region_bytes.is_multiple_of(bs) || region_bytes > device_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "bdev {}: metadata region of {region_bytes} bytes does not fit whole blocks of {bs} bytes on a {device_bytes}-byte device",
                    bdev.name()
                ),
            ));
        }
        Ok(Self {
            bdev,
            core,
            region_bytes,
        })
    }

    /// Runs one I/O to completion on a private channel.
    fn run(&self, io: BdevIo) -> io::Result<BdevIo> {
        let mut ch = self
            .bdev
            .open_channel(self.core, 1)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let started = Instant::now();
        let mut pending = Some(io);
        let mut finished = None;
        while finished.is_none() {
            if let Some(io) = pending.take() {
                if let Submit::Busy(io) = ch.submit(io) {
                    pending = Some(io);
                }
            }
            ch.poll(&mut |io| finished = Some(io));
            if finished.is_none() {
                if started.elapsed() > BDEV_HEADER_IO_TIMEOUT {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("bdev {}: header I/O did not complete", self.bdev.name()),
                    ));
                }
                std::thread::yield_now();
            }
        }
        let io = finished.ok_or_else(|| io::Error::other("no completion"))?;
        match io.status {
            IoStatus::Success => Ok(io),
            IoStatus::IoError(errno) => Err(io::Error::from_raw_os_error(errno)),
            other => Err(io::Error::other(format!(
                "bdev {}: header I/O failed: {other:?}",
                self.bdev.name()
            ))),
        }
    }

    /// The whole blocks covering `[off, off + len)`: first block, block count, byte offset of
    /// `off` inside the first block.
    fn span(&self, off: u64, len: usize) -> io::Result<(u64, u32, usize)> {
        check_region(off, len, self.region_bytes)?;
        let bs = u64::from(self.bdev.block_size());
        let first = off / bs;
        // check_region bounded off + len by the region, which fits the device.
        let end = off + len as u64;
        let last = end.div_ceil(bs);
        let blocks = u32::try_from(last - first)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "header I/O too large"))?;
        Ok((first, blocks, (off - first * bs) as usize))
    }

    fn buffer(&self, blocks: u32) -> io::Result<IoBuf> {
        let bytes = blocks as usize * self.bdev.block_size() as usize;
        let mem = AlignedBuf::zeroed(bytes, self.bdev.buf_align().max(64))
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "header I/O buffer"))?;
        Ok(IoBuf::new(mem, bytes))
    }

    fn read_blocks(&self, first: u64, blocks: u32) -> io::Result<IoBuf> {
        let buf = self.buffer(blocks)?;
        let io = self.run(BdevIo::new(IoType::Read, first, blocks, Some(buf), 0))?;
        io.buf
            .ok_or_else(|| io::Error::other("read completed without its buffer"))
    }
}

impl HeaderIo for BdevHeaderIo {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let (first, blocks, skip) = self.span(off, buf.len())?;
        let data = self.read_blocks(first, blocks)?;
        let src = data
            .as_slice()
            .get(skip..skip + buf.len())
            .ok_or_else(|| io::Error::other("short header read"))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&mut self, off: u64, buf: &[u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let (first, blocks, skip) = self.span(off, buf.len())?;
        let bs = self.bdev.block_size() as usize;
        let whole = skip == 0 && buf.len().is_multiple_of(bs);
        // Partial blocks: read-modify-write.
        let mut data = if whole {
            self.buffer(blocks)?
        } else {
            self.read_blocks(first, blocks)?
        };
        data.as_mut_slice()
            .get_mut(skip..skip + buf.len())
            .ok_or_else(|| io::Error::other("header write span"))?
            .copy_from_slice(buf);
        self.run(BdevIo::new(IoType::Write, first, blocks, Some(data), 0))?;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.bdev.io_type_supported(IoType::Flush) {
            return Ok(());
        }
        self.run(BdevIo::new(IoType::Flush, 0, 0, None, 0))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::malloc::{self, MallocConfig};
    use crate::bdev::sim::{CrashMode, SimBdev, SimConfig};

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

    #[test]
    fn bdev_header_io_reads_writes_and_stays_in_its_region() {
        let base = malloc_bdev(64);
        let mut hio = BdevHeaderIo::new(base.clone(), CoreId(0), 8 * 512).expect("hio");
        // Unaligned write spanning two blocks (read-modify-write) and an aligned one.
        hio.write_at(
            500,
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
        )
        .expect("write");
        hio.write_at(1024, &[0xEE; 512]).expect("write");
        hio.flush().expect("flush");
        let mut back = [0u8; 17];
        hio.read_at(500, &mut back).expect("read");
        assert_eq!(back[0], 1);
        assert_eq!(back[16], 17);
        let mut whole = vec![0u8; 1536];
        hio.read_at(0, &mut whole).expect("read");
        assert_eq!(&whole[500..517], &back);
        assert!(whole[..500].iter().all(|&b| b == 0));
        assert!(whole[1024..].iter().all(|&b| b == 0xEE));
        // Outside the region: refused.
        assert!(hio.write_at(8 * 512 - 1, &[0, 0]).is_err());
        assert!(hio.read_at(u64::MAX, &mut [0]).is_err());
        assert!(BdevHeaderIo::new(base, CoreId(0), 100).is_err());
    }

    #[test]
    fn bdev_header_io_flush_makes_writes_durable_on_sim() {
        let sim = SimBdev::open(&SimConfig {
            name: "sim0".into(),
            num_blocks: Some(64),
            size_bytes: None,
            block_size: 512,
            seed: 1,
            fail_nth: None,
            fail_ratio: 0.0,
            cache_blocks: 64,
        })
        .expect("sim");
        let bdev: Arc<dyn Bdev> = sim.clone();
        let mut hio = BdevHeaderIo::new(bdev, CoreId(0), 4096).expect("hio");
        hio.write_at(0, &[7; 512]).expect("write");
        hio.flush().expect("flush");
        hio.write_at(512, &[8; 512]).expect("write");
        sim.crash(CrashMode::LoseUnflushed);
        let mut back = [0u8; 1024];
        hio.read_at(0, &mut back).expect("read");
        assert!(back[..512].iter().all(|&b| b == 7), "flushed write lost");
        assert!(
            back[512..].iter().all(|&b| b == 0),
            "unflushed write survived"
        );
    }

    #[test]
    fn file_header_io_stays_in_its_region() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("dev");
        std::fs::write(&path, vec![0u8; 8192]).expect("file");
        let mut f = FileHeaderIo::open(&path, 4096).expect("open");
        f.write_at(4000, &[9; 96]).expect("write");
        f.flush().expect("flush");
        assert!(f.write_at(4000, &[9; 97]).is_err());
        let mut b = [0u8; 96];
        f.read_at(4000, &mut b).expect("read");
        assert_eq!(b, [9; 96]);
        assert_eq!(
            std::fs::read(&path).expect("read")[4096..],
            vec![0u8; 4096][..]
        );
    }
}
