//! The `uring` bdev: a regular file or a block device, driven through one io_uring per channel.
//!
//! The file is opened once (with `O_DIRECT` by default, so the page cache neither doubles memory
//! nor hides device latency) and shared by all reactors. Each reactor's [`UringChannel`] owns an
//! io_uring ([`UringQueue`]) of `queue_depth` entries: `submit` only pushes an SQE, and the
//! reactor's `poll` hands SQEs to the kernel and reaps CQEs without ever waiting (no
//! `submit_and_wait`), so one reactor thread drives many requests.
//!
//! Operations:
//! * Read / Write: `IORING_OP_READ`/`WRITE`; a short transfer is continued for the remainder, a
//!   zero-byte transfer is `IoError(EIO)`.
//! * Write with Force Unit Access ([`BdevIo::fua`]): every SQE of it carries `RWF_DSYNC`, so the
//!   kernel completes it only once its data is on stable storage (a FUA write to the device
//!   under O_DIRECT with allocated blocks; otherwise the write plus a data sync of its range,
//!   which also commits a sparse file's block allocation). Counted in [`UringStats`].
//! * Flush: `IORING_OP_FSYNC` with `DATASYNC` (the file size never changes, so data sync is a
//!   full flush of what was written); file-wide, so one channel's Flush covers the writes every
//!   channel completed before it. Counted in [`UringStats`].
//! * WriteZeroes: `fallocate(FALLOC_FL_ZERO_RANGE | KEEP_SIZE)` through the ring, on a regular
//!   file and on a block device alike (for a block device the kernel turns it into a zero-out
//!   that keeps the blocks allocated); if the filesystem or device answers `EOPNOTSUPP`/`EINVAL`,
//!   the channel switches (for good) to writing from a preallocated zero buffer.
//! * Unmap: `fallocate(FALLOC_FL_PUNCH_HOLE | KEEP_SIZE)`: on a file it punches a hole, on a
//!   block device the kernel issues a write-zeroes that may deallocate (thin devices, SSDs);
//!   either way the range reads back as zeroes. A block device that cannot do that answers
//!   `EOPNOTSUPP`; the channel then zeroes unmapped ranges as WriteZeroes does (for good), so
//!   the read-back-zeroes promise holds everywhere. Plain `BLKDISCARD` is not used because a
//!   discarded range may read back as anything.
//! * Errors from the kernel (negative CQE results) become `IoStatus::IoError(errno)`.
//!
//! Dropping a channel with requests in flight is safe: its queue waits for their CQEs (bounded by
//! [`crate::sys::uring::DROP_WAIT`]) and leaks the buffers if the kernel never answers.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Deserialize;

use super::null::{default_block_size, DoneRing};
use super::{validate, Bdev, BdevChannel, BdevError, BdevIo, IoStatus, IoType, Submit};
use crate::sys::uring::{self as sysuring, PushError, UringQueue};
use crate::types::CoreId;

/// `uring` bdev settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UringConfig {
    pub name: String,
    /// A regular file or a block device (`/dev/nvme0n1`).
    pub path: PathBuf,
    /// 512 or 4096 (default 4096); must be ≥ the device's logical block size under O_DIRECT.
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// Open with O_DIRECT (default true). Turn off for filesystems without direct I/O (tmpfs).
    #[serde(default = "default_direct")]
    pub direct: bool,
    /// Regular files only: create the file if missing and grow it to this size; the bdev covers
    /// exactly this many bytes. Without it, the file must exist and its current size is used.
    /// For a block device, a size no larger than the device limits the bdev to its start.
    #[serde(default)]
    pub size_bytes: Option<u64>,
}

fn default_direct() -> bool {
    true
}

/// Most channels one bdev will run at once per reactor is small, but the ring caps what one
/// channel can hold; more would only pin kernel memory without adding throughput.
pub const MAX_QUEUE_DEPTH: usize = 4096;

/// Largest single read/write SQE; longer I/Os are issued in pieces of this size.
const MAX_RW_BYTES: u64 = 1 << 30;

/// Size of each channel's zero buffer for write-zeroes by writing.
const ZERO_BUF_BYTES: usize = 256 << 10;

/// Alignment of I/O buffers under O_DIRECT: a page satisfies every device's DMA alignment.
const DIRECT_ALIGN: usize = 4096;

/// Durability operations a uring bdev completed (all channels together).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UringStats {
    /// Flushes completed successfully (`fdatasync` through the ring).
    pub flushes: u64,
    /// Writes with Force Unit Access completed successfully (issued with `RWF_DSYNC`).
    pub fua_writes: u64,
}

/// Shared counters behind [`UringStats`]. Only FUA writes and flushes touch them — operations
/// that wait for the media anyway — so one relaxed atomic add each costs nothing measurable,
/// and plain writes and reads never touch them.
#[derive(Debug, Default)]
struct Counters {
    flushes: AtomicU64,
    fua_writes: AtomicU64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FileKind {
    Regular,
    BlockDevice,
}

/// A file or block device used as a bdev.
pub struct UringBdev {
    name: String,
    path: PathBuf,
    block_size: u32,
    num_blocks: u64,
    kind: FileKind,
    direct: bool,
    /// The kernel supports `IORING_OP_FALLOCATE` (probed at open).
    fallocate: bool,
    file: Arc<File>,
    counters: Arc<Counters>,
}

/// Opens a `uring` bdev.
pub fn open(cfg: &UringConfig) -> Result<Arc<dyn Bdev>, BdevError> {
    Ok(Arc::new(UringBdev::new(cfg)?))
}

impl UringBdev {
    pub fn new(cfg: &UringConfig) -> Result<Self, BdevError> {
        let name = cfg.name.clone();
        let path_s = cfg.path.display().to_string();
        let invalid = |what: String| BdevError::Invalid {
            name: name.clone(),
            what,
        };
        let io_err = |source: std::io::Error| BdevError::Io {
            name: name.clone(),
            path: path_s.clone(),
            source,
        };
        if name.is_empty() {
            return Err(invalid("name must not be empty".into()));
        }
        if cfg.block_size != 512 && cfg.block_size != 4096 {
            return Err(invalid(format!(
                "block_size {} must be 512 or 4096",
                cfg.block_size
            )));
        }
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if cfg.direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let existing = std::fs::metadata(&cfg.path).ok();
        let is_blockdev = existing
            .as_ref()
            .is_some_and(|m| m.file_type().is_block_device());
        if cfg.size_bytes.is_some() && !is_blockdev {
            opts.create(true);
        }
        let file = opts.open(&cfg.path).map_err(|e| {
            if cfg.direct && e.raw_os_error() == Some(libc::EINVAL) {
                invalid(format!(
                    "{path_s}: the filesystem does not support O_DIRECT (EINVAL); set `direct: false`"
                ))
            } else {
                io_err(e)
            }
        })?;
        let meta = file.metadata().map_err(io_err)?;
        let ft = meta.file_type();
        let (kind, size, lbs) = if ft.is_block_device() {
            let dev = sysuring::blockdev_size_bytes(file.as_fd()).map_err(io_err)?;
            let lbs = sysuring::blockdev_logical_block_size(file.as_fd()).map_err(io_err)?;
            let size = match cfg.size_bytes {
                Some(s) if s > dev => {
                    return Err(invalid(format!(
                        "size_bytes {s} is larger than the device ({dev} bytes)"
                    )))
                }
                Some(s) => s,
                None => dev,
            };
            (FileKind::BlockDevice, size, Some(lbs))
        } else if ft.is_file() {
            let size = match cfg.size_bytes {
                Some(s) => {
                    if meta.len() < s {
                        file.set_len(s).map_err(io_err)?;
                    }
                    s
                }
                None => meta.len(),
            };
            let lbs = if cfg.direct {
                sysuring::dio_offset_align(file.as_fd())
            } else {
                None
            };
            (FileKind::Regular, size, lbs)
        } else {
            return Err(invalid(format!(
                "{path_s} is neither a regular file nor a block device"
            )));
        };
        if let Some(lbs) = lbs {
            if cfg.direct && lbs > cfg.block_size {
                return Err(invalid(format!(
                    "block_size {} is smaller than the device's logical block size {lbs}",
                    cfg.block_size
                )));
            }
        }
        let num_blocks = size / u64::from(cfg.block_size);
        if num_blocks == 0 {
            return Err(invalid(format!(
                "{path_s} holds less than one block ({size} bytes)"
            )));
        }
        if size % u64::from(cfg.block_size) != 0 {
            tracing::warn!(bdev = %name, size, "size is not a multiple of the block size; the tail is unused");
        }
        let probe: UringQueue<()> = UringQueue::new(1, 1, 1).map_err(io_err)?;
        let fallocate = probe.supports(io_uring::opcode::Fallocate::CODE);
        Ok(UringBdev {
            name,
            path: cfg.path.clone(),
            block_size: cfg.block_size,
            num_blocks,
            kind,
            direct: cfg.direct,
            fallocate,
            file: Arc::new(file),
            counters: Arc::new(Counters::default()),
        })
    }
}

impl UringBdev {
    /// Whether the path is a block device (rather than a regular file).
    pub fn is_block_device(&self) -> bool {
        self.kind == FileKind::BlockDevice
    }

    /// Flushes and FUA writes completed so far, over all channels.
    pub fn stats(&self) -> UringStats {
        UringStats {
            flushes: self.counters.flushes.load(Ordering::Relaxed),
            fua_writes: self.counters.fua_writes.load(Ordering::Relaxed),
        }
    }
}

impl Bdev for UringBdev {
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
        match io_type {
            IoType::Read | IoType::Write | IoType::Flush | IoType::WriteZeroes => true,
            IoType::Unmap => self.fallocate,
        }
    }
    fn buf_align(&self) -> usize {
        if self.direct {
            DIRECT_ALIGN
        } else {
            64
        }
    }
    fn open_channel(
        &self,
        _core: CoreId,
        queue_depth: usize,
    ) -> Result<Box<dyn BdevChannel>, BdevError> {
        if queue_depth == 0 || queue_depth > MAX_QUEUE_DEPTH {
            return Err(BdevError::Invalid {
                name: self.name.clone(),
                what: format!("queue_depth {queue_depth} not in 1..={MAX_QUEUE_DEPTH}"),
            });
        }
        let q = UringQueue::new(queue_depth as u32, ZERO_BUF_BYTES, DIRECT_ALIGN).map_err(
            |source| BdevError::Io {
                name: self.name.clone(),
                path: self.path.display().to_string(),
                source,
            },
        )?;
        Ok(Box::new(UringChannel {
            q,
            ready: DoneRing::new(queue_depth),
            depth: queue_depth,
            file: self.file.clone(),
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            zero_range: self.fallocate,
            unmap: self.fallocate,
            unmap_supported: self.fallocate,
            counters: self.counters.clone(),
        }))
    }
}

/// What a slot's request is doing at the ring level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Step {
    #[default]
    Idle,
    Read,
    Write,
    /// Write-zeroes by writing from the zero buffer.
    ZeroWrite,
    /// Write-zeroes by `fallocate(ZERO_RANGE)`.
    ZeroRange,
    /// Unmap by `fallocate(PUNCH_HOLE)`.
    Punch,
    Fsync,
}

/// Per-slot progress of a request.
#[derive(Clone, Copy, Debug, Default)]
struct OpState {
    step: Step,
    /// Byte offset of the request in the file.
    file_off: u64,
    /// Bytes of the request.
    total: u64,
    /// Bytes already transferred (Read/Write/ZeroWrite).
    done: u64,
    /// A Write with Force Unit Access: each of its SQEs carries `RWF_DSYNC`.
    fua: bool,
}

/// A reactor's channel on a [`UringBdev`]: one io_uring and its slot table.
pub struct UringChannel {
    // Field order matters: the queue (which waits for in-flight CQEs) drops before the file.
    q: UringQueue<OpState>,
    /// I/Os finished without reaching the ring (invalid, unsupported), waiting for `poll`.
    ready: DoneRing,
    depth: usize,
    file: Arc<File>,
    block_size: u32,
    num_blocks: u64,
    /// Write-zeroes may still use fallocate(ZERO_RANGE) (cleared if the filesystem refuses it).
    zero_range: bool,
    /// Unmap may still use fallocate(PUNCH_HOLE) (cleared if the device refuses it; unmap then
    /// zeroes the range).
    unmap: bool,
    /// Unmap is offered at all (the kernel's io_uring has fallocate).
    unmap_supported: bool,
    counters: Arc<Counters>,
}

/// How a request's next SQE went.
enum Issued {
    Pushed,
    /// Nothing left to do: the request is complete with this status.
    Finished(IoStatus),
    SqFull,
}

impl UringChannel {
    /// Pushes the next SQE of the request in slot `id` according to its state.
    fn issue(&mut self, id: u32) -> Issued {
        let Some(st) = self.q.state_mut(id).copied() else {
            return Issued::Finished(IoStatus::IoError(libc::EINVAL));
        };
        let rem = st.total.saturating_sub(st.done);
        let off = st.file_off + st.done;
        let fd = self.file.as_fd();
        let r = match st.step {
            Step::Read | Step::Write | Step::ZeroWrite if rem == 0 => {
                return Issued::Finished(IoStatus::Success)
            }
            Step::Read => {
                self.q
                    .push_read(fd, id, off, st.done as usize, rem.min(MAX_RW_BYTES) as u32)
            }
            Step::Write => self.q.push_write(
                fd,
                id,
                off,
                st.done as usize,
                rem.min(MAX_RW_BYTES) as u32,
                st.fua,
            ),
            Step::ZeroWrite => {
                let len = rem.min(self.q.zero_len() as u64) as u32;
                self.q.push_write_zeroes(fd, id, off, len)
            }
            Step::ZeroRange => self.q.push_fallocate(
                fd,
                id,
                st.file_off,
                st.total,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            ),
            Step::Punch => self.q.push_fallocate(
                fd,
                id,
                st.file_off,
                st.total,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            ),
            Step::Fsync => self.q.push_fsync(fd, id, true),
            Step::Idle => return Issued::Finished(IoStatus::IoError(libc::EINVAL)),
        };
        match r {
            Ok(()) => Issued::Pushed,
            Err(PushError::SqFull) => Issued::SqFull,
            Err(PushError::BadSlot) => Issued::Finished(IoStatus::IoError(libc::EINVAL)),
        }
    }

    /// Applies one CQE to its request; `Some(status)` when the request is complete.
    fn on_cqe(&mut self, id: u32, res: i32) -> Option<IoStatus> {
        let st = self.q.state_mut(id)?;
        if res < 0 {
            let refused = matches!(-res, libc::EOPNOTSUPP | libc::EINVAL);
            if st.step == Step::ZeroRange && refused {
                // This filesystem cannot zero a range: write zeroes from now on.
                st.step = Step::ZeroWrite;
                st.done = 0;
                self.zero_range = false;
                return self.next(id);
            }
            if st.step == Step::Punch && refused {
                // This device cannot deallocate with zeroes: unmap zeroes the range instead.
                st.step = if self.zero_range {
                    Step::ZeroRange
                } else {
                    Step::ZeroWrite
                };
                st.done = 0;
                self.unmap = false;
                return self.next(id);
            }
            return Some(IoStatus::IoError(-res));
        }
        match st.step {
            Step::Read | Step::Write | Step::ZeroWrite => {
                if res == 0 {
                    // No progress (EOF, device gone): stop instead of spinning.
                    return Some(IoStatus::IoError(libc::EIO));
                }
                st.done += res as u64;
                self.next(id)
            }
            _ => Some(IoStatus::Success),
        }
    }

    fn next(&mut self, id: u32) -> Option<IoStatus> {
        match self.issue(id) {
            Issued::Pushed => None,
            Issued::Finished(s) => Some(s),
            // Cannot happen: every slot has at most one SQE, and the SQ has room for all slots.
            Issued::SqFull => Some(IoStatus::IoError(libc::EBUSY)),
        }
    }

    fn finish(&mut self, id: u32, status: IoStatus, done: &mut dyn FnMut(BdevIo)) {
        if let Some(mut io) = self.q.release(id) {
            if status == IoStatus::Success {
                if io.is_fua_write() {
                    self.counters.fua_writes.fetch_add(1, Ordering::Relaxed);
                } else if io.io_type == IoType::Flush {
                    self.counters.flushes.fetch_add(1, Ordering::Relaxed);
                }
            }
            io.status = status;
            done(io);
        }
    }
}

impl BdevChannel for UringChannel {
    fn submit(&mut self, mut io: BdevIo) -> Submit {
        if self.q.used() + self.ready.len() >= self.depth {
            return Submit::Busy(io);
        }
        if let Err(s) = validate(&io, self.block_size, self.num_blocks) {
            io.status = s;
            self.ready.push(io);
            return Submit::Queued;
        }
        let bs = u64::from(self.block_size);
        let step = match io.io_type {
            IoType::Read => Step::Read,
            IoType::Write => Step::Write,
            IoType::Flush => Step::Fsync,
            IoType::WriteZeroes if self.zero_range => Step::ZeroRange,
            IoType::WriteZeroes => Step::ZeroWrite,
            IoType::Unmap if !self.unmap_supported => {
                io.status = IoStatus::Unsupported;
                self.ready.push(io);
                return Submit::Queued;
            }
            IoType::Unmap if self.unmap => Step::Punch,
            IoType::Unmap if self.zero_range => Step::ZeroRange,
            IoType::Unmap => Step::ZeroWrite,
        };
        if io.io_type != IoType::Flush && io.num_blocks == 0 {
            io.status = IoStatus::Success;
            self.ready.push(io);
            return Submit::Queued;
        }
        // validate() bounded offset+num_blocks by num_blocks, which came from a byte size.
        let st = OpState {
            step,
            file_off: io.offset_blocks * bs,
            total: u64::from(io.num_blocks) * bs,
            done: 0,
            fua: io.is_fua_write(),
        };
        let id = match self.q.alloc(io) {
            Ok(id) => id,
            Err(io) => return Submit::Busy(io),
        };
        if let Some(s) = self.q.state_mut(id) {
            *s = st;
        }
        match self.issue(id) {
            Issued::Pushed => Submit::Queued,
            Issued::SqFull => match self.q.release(id) {
                Some(io) => Submit::Busy(io),
                None => Submit::Queued,
            },
            Issued::Finished(status) => {
                if let Some(mut io) = self.q.release(id) {
                    io.status = status;
                    self.ready.push(io);
                }
                Submit::Queued
            }
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        let mut n = self.ready.drain(done);
        if self.q.kernel_owned() == 0 {
            return n;
        }
        if let Err(e) = self.q.submit() {
            tracing::error!(error = %e, "io_uring submit failed");
        }
        while let Some(c) = self.q.pop() {
            if let Some(status) = self.on_cqe(c.slot, c.res) {
                self.finish(c.slot, status, done);
                n += 1;
            }
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.q.used() + self.ready.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::BufPool;
    use std::time::{Duration, Instant};

    /// A directory on a disk filesystem (O_DIRECT and fallocate need one; /tmp may be tmpfs).
    fn disk_dir() -> tempfile::TempDir {
        tempfile::tempdir_in("/var/tmp").unwrap()
    }

    fn cfg(dir: &tempfile::TempDir, bs: u32, size: u64) -> UringConfig {
        UringConfig {
            name: "u0".into(),
            path: dir.path().join("disk.img"),
            block_size: bs,
            direct: true,
            size_bytes: Some(size),
        }
    }

    fn wait_all(ch: &mut dyn BdevChannel, n: usize) -> Vec<BdevIo> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < n && Instant::now() < deadline {
            ch.poll(&mut |io| got.push(io));
        }
        assert_eq!(got.len(), n, "completions missing");
        got
    }

    fn run(ch: &mut dyn BdevChannel, io: BdevIo) -> BdevIo {
        assert!(matches!(ch.submit(io), Submit::Queued));
        wait_all(ch, 1).pop().unwrap()
    }

    fn pattern(lba: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (lba as usize * 131 + i * 7 + 5) as u8)
            .collect()
    }

    #[test]
    fn write_read_flush_unmap_zeroes_direct() {
        let dir = disk_dir();
        let b = open(&cfg(&dir, 4096, 1 << 20)).unwrap();
        assert_eq!((b.num_blocks(), b.buf_align()), (256, 4096));
        assert!(b.io_type_supported(IoType::Unmap));
        let mut ch = b.open_channel(CoreId(0), 8).unwrap();
        let mut pool = BufPool::new(4, 16 << 10, b.buf_align()).unwrap();
        for lba in [0u64, 10, 252] {
            let mut w = pool.get(4 << 12).unwrap();
            w.as_mut_slice().copy_from_slice(&pattern(lba, 4 << 12));
            let io = run(
                ch.as_mut(),
                BdevIo::new(IoType::Write, lba, 4, Some(w), lba),
            );
            assert_eq!((io.status, io.ctx), (IoStatus::Success, lba));
            pool.put(io.buf.unwrap());
        }
        assert_eq!(
            run(ch.as_mut(), BdevIo::new(IoType::Flush, 0, 0, None, 0)).status,
            IoStatus::Success
        );
        for lba in [0u64, 10, 252] {
            let r = pool.get(4 << 12).unwrap();
            let io = run(ch.as_mut(), BdevIo::new(IoType::Read, lba, 4, Some(r), 0));
            assert_eq!(io.status, IoStatus::Success);
            assert_eq!(
                io.buf.as_ref().unwrap().as_slice(),
                &pattern(lba, 4 << 12)[..]
            );
            pool.put(io.buf.unwrap());
        }
        // Punch block 11, zero block 12 (fallocate or zero-buffer writes), read 10..14 back.
        assert_eq!(
            run(ch.as_mut(), BdevIo::new(IoType::Unmap, 11, 1, None, 0)).status,
            IoStatus::Success
        );
        assert_eq!(
            run(
                ch.as_mut(),
                BdevIo::new(IoType::WriteZeroes, 12, 1, None, 0)
            )
            .status,
            IoStatus::Success
        );
        let r = pool.get(4 << 12).unwrap();
        let io = run(ch.as_mut(), BdevIo::new(IoType::Read, 10, 4, Some(r), 0));
        let got = io.buf.as_ref().unwrap().as_slice();
        let want = pattern(10, 4 << 12);
        assert_eq!(&got[..4096], &want[..4096]);
        assert!(
            got[4096..3 * 4096].iter().all(|&x| x == 0),
            "unmapped/zeroed blocks must read zero"
        );
        assert_eq!(&got[3 * 4096..], &want[3 * 4096..]);
        pool.put(io.buf.unwrap());
        drop(ch);
        // The data is really in the file (read it without the bdev).
        let raw = std::fs::read(dir.path().join("disk.img")).unwrap();
        assert_eq!(raw.len(), 1 << 20);
        assert_eq!(&raw[252 * 4096..], &pattern(252, 4 << 12)[..]);
    }

    #[test]
    fn fua_writes_go_out_with_dsync_and_flushes_are_counted() {
        let dir = disk_dir();
        let b = Arc::new(UringBdev::new(&cfg(&dir, 4096, 1 << 20)).unwrap());
        let mut ch = b.open_channel(CoreId(0), 4).unwrap();
        let mut pool = BufPool::new(2, 8192, 4096).unwrap();
        let mut w = pool.get(8192).unwrap();
        w.as_mut_slice().copy_from_slice(&pattern(3, 8192));
        let io = run(ch.as_mut(), BdevIo::new(IoType::Write, 3, 2, Some(w), 0));
        assert_eq!(io.status, IoStatus::Success);
        assert_eq!(
            b.stats(),
            UringStats::default(),
            "a plain write is no FUA write"
        );
        let mut w = io.buf.unwrap();
        w.as_mut_slice().copy_from_slice(&pattern(7, 8192));
        let io = run(
            ch.as_mut(),
            BdevIo::new(IoType::Write, 7, 2, Some(w), 0).with_fua(true),
        );
        assert_eq!(io.status, IoStatus::Success);
        assert!(io.fua, "the completion still says FUA");
        assert_eq!(
            b.stats(),
            UringStats {
                flushes: 0,
                fua_writes: 1
            }
        );
        // FUA on a read means nothing to this backend (and is not counted).
        let r = pool.get(8192).unwrap();
        let io = run(
            ch.as_mut(),
            BdevIo::new(IoType::Read, 7, 2, Some(r), 0).with_fua(true),
        );
        assert_eq!(io.buf.as_ref().unwrap().as_slice(), &pattern(7, 8192)[..]);
        let io = run(ch.as_mut(), BdevIo::new(IoType::Flush, 0, 0, None, 0));
        assert_eq!(io.status, IoStatus::Success);
        assert_eq!(
            b.stats(),
            UringStats {
                flushes: 1,
                fua_writes: 1
            }
        );
        // Through the generic control-thread helper too.
        crate::bdev::flush_blocking(b.as_ref(), CoreId(0), Duration::from_secs(20)).unwrap();
        assert_eq!(b.stats().flushes, 2);
    }

    #[test]
    fn zero_write_path_for_large_ranges() {
        let dir = disk_dir();
        let b = open(&cfg(&dir, 512, 2 << 20)).unwrap();
        let mut ch = b.open_channel(CoreId(0), 4).unwrap();
        let mut pool = BufPool::new(1, 1 << 20, 4096).unwrap();
        let mut w = pool.get(1 << 20).unwrap();
        w.as_mut_slice().fill(0xee);
        let io = run(
            ch.as_mut(),
            BdevIo::new(IoType::Write, 1024, 2048, Some(w), 0),
        );
        assert_eq!(io.status, IoStatus::Success);
        pool.put(io.buf.unwrap());
        // Force the write path (as on a filesystem without ZERO_RANGE) across several zero-buffer
        // lengths: 1 MiB - 1 KiB starting 1 KiB into the written area.
        let mut raw = UringBdev::new(&cfg(&dir, 512, 2 << 20)).unwrap();
        raw.fallocate = false;
        let mut ch2 = raw.open_channel(CoreId(0), 4).unwrap();
        let io = run(
            ch2.as_mut(),
            BdevIo::new(IoType::WriteZeroes, 1026, 2046, None, 0),
        );
        assert_eq!(io.status, IoStatus::Success);
        assert!(!raw.io_type_supported(IoType::Unmap));
        assert_eq!(
            run(ch2.as_mut(), BdevIo::new(IoType::Unmap, 0, 1, None, 0)).status,
            IoStatus::Unsupported
        );
        let r = pool.get(1 << 20).unwrap();
        let io = run(
            ch.as_mut(),
            BdevIo::new(IoType::Read, 1024, 2048, Some(r), 0),
        );
        let got = io.buf.as_ref().unwrap().as_slice();
        assert!(got[..1024].iter().all(|&x| x == 0xee));
        assert!(got[1024..].iter().all(|&x| x == 0));
    }

    #[test]
    fn queue_depth_32_concurrent() {
        let dir = disk_dir();
        let b = open(&cfg(&dir, 4096, 4 << 20)).unwrap();
        let mut ch = b.open_channel(CoreId(0), 32).unwrap();
        let mut pool = BufPool::new(33, 8192, 4096).unwrap();
        let submit_all = |ch: &mut dyn BdevChannel, pool: &mut BufPool, t: IoType| {
            for i in 0..32u64 {
                let mut buf = pool.get(8192).unwrap();
                if t == IoType::Write {
                    buf.as_mut_slice().copy_from_slice(&pattern(i * 2, 8192));
                }
                assert!(matches!(
                    ch.submit(BdevIo::new(t, i * 2, 2, Some(buf), i)),
                    Submit::Queued
                ));
            }
            assert_eq!(ch.in_flight(), 32);
            let extra = pool.get(8192).unwrap();
            match ch.submit(BdevIo::new(t, 0, 2, Some(extra), 99)) {
                Submit::Busy(io) => pool.put(io.buf.unwrap()),
                Submit::Queued => panic!("33rd I/O on a depth-32 channel must be Busy"),
            }
            wait_all(ch, 32)
        };
        for io in submit_all(ch.as_mut(), &mut pool, IoType::Write) {
            assert_eq!(io.status, IoStatus::Success);
            pool.put(io.buf.unwrap());
        }
        let reads = submit_all(ch.as_mut(), &mut pool, IoType::Read);
        let mut seen = [false; 32];
        for io in reads {
            assert_eq!(io.status, IoStatus::Success);
            assert_eq!(
                io.buf.as_ref().unwrap().as_slice(),
                &pattern(io.ctx * 2, 8192)[..]
            );
            seen[io.ctx as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(ch.in_flight(), 0);
    }

    #[test]
    fn invalid_io_and_kernel_errors() {
        let dir = disk_dir();
        let b = open(&cfg(&dir, 4096, 64 << 10)).unwrap();
        let mut ch = b.open_channel(CoreId(0), 4).unwrap();
        let mut pool = BufPool::new(2, 8192, 4096).unwrap();
        let r = pool.get(8192).unwrap();
        let io = run(ch.as_mut(), BdevIo::new(IoType::Read, 15, 2, Some(r), 0));
        assert_eq!(io.status, IoStatus::InvalidRange);
        pool.put(io.buf.unwrap());
        // A kernel error: the same file opened read-only, so a write gets EBADF from the ring.
        let mut ro = UringBdev::new(&cfg(&dir, 4096, 64 << 10)).unwrap();
        ro.file = Arc::new(File::open(dir.path().join("disk.img")).unwrap());
        let mut roch = ro.open_channel(CoreId(0), 4).unwrap();
        let w = pool.get(4096).unwrap();
        let io = run(roch.as_mut(), BdevIo::new(IoType::Write, 0, 1, Some(w), 0));
        assert_eq!(io.status, IoStatus::IoError(libc::EBADF));
        let r = pool.get(4096).unwrap();
        assert_eq!(
            run(roch.as_mut(), BdevIo::new(IoType::Read, 0, 1, Some(r), 0)).status,
            IoStatus::Success
        );
        assert!(b.open_channel(CoreId(0), 0).is_err());
        assert!(b.open_channel(CoreId(0), MAX_QUEUE_DEPTH + 1).is_err());
    }

    #[test]
    fn open_errors_are_clear() {
        let dir = disk_dir();
        let missing = UringConfig {
            size_bytes: None,
            ..cfg(&dir, 4096, 0)
        };
        assert!(matches!(open(&missing), Err(BdevError::Io { .. })));
        let tiny = cfg(&dir, 4096, 100);
        assert!(matches!(open(&tiny), Err(BdevError::Invalid { .. })));
        let odd = UringConfig {
            block_size: 1024,
            ..cfg(&dir, 4096, 1 << 20)
        };
        assert!(matches!(open(&odd), Err(BdevError::Invalid { .. })));
        // Existing file, size taken from it.
        let p = dir.path().join("existing.img");
        std::fs::write(&p, vec![0u8; 3 * 4096 + 100]).unwrap();
        let c = UringConfig {
            path: p,
            size_bytes: None,
            ..cfg(&dir, 4096, 0)
        };
        assert_eq!(open(&c).unwrap().num_blocks(), 3);
        let y = "name: u\npath: /x\nblock_size: 512\ndirect: false\nsize_bytes: 4096\n";
        assert!(serde_yaml_ng::from_str::<UringConfig>(y).is_ok());
        assert!(serde_yaml_ng::from_str::<UringConfig>("name: u\npath: /x\nsize: 1\n").is_err());
        // O_DIRECT on a filesystem without it (tmpfs before Linux 6.6) must say what to do.
        if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
            let c = UringConfig {
                path: shm.path().join("d.img"),
                ..cfg(&dir, 4096, 1 << 20)
            };
            match open(&c) {
                Ok(_) => println!("note: /dev/shm supports O_DIRECT on this kernel"),
                Err(e) => assert!(e.to_string().contains("direct: false"), "{e}"),
            }
        }
    }

    #[test]
    fn zero_range_refused_falls_back_to_writes() {
        // tmpfs has no FALLOC_FL_ZERO_RANGE: the first write-zeroes gets EOPNOTSUPP from the ring
        // and must be redone by writing zeroes.
        let Ok(shm) = tempfile::tempdir_in("/dev/shm") else {
            println!("skip: no /dev/shm");
            return;
        };
        let c = UringConfig {
            name: "shm".into(),
            path: shm.path().join("d.img"),
            block_size: 512,
            direct: false,
            size_bytes: Some(64 << 10),
        };
        std::fs::write(&c.path, vec![0x11u8; 64 << 10]).unwrap();
        let b = open(&c).unwrap();
        assert_eq!(b.buf_align(), 64);
        let mut ch = b.open_channel(CoreId(0), 2).unwrap();
        for lba in [3u64, 40] {
            let io = run(
                ch.as_mut(),
                BdevIo::new(IoType::WriteZeroes, lba, 5, None, 0),
            );
            assert_eq!(io.status, IoStatus::Success);
        }
        let raw = std::fs::read(&c.path).unwrap();
        for (i, &x) in raw.iter().enumerate() {
            let blk = (i / 512) as u64;
            let zeroed = (3..8).contains(&blk) || (40..45).contains(&blk);
            assert_eq!(x, if zeroed { 0 } else { 0x11 }, "byte {i}");
        }
    }

    #[test]
    fn dropping_a_busy_channel_finishes_its_io() {
        let dir = disk_dir();
        let b = open(&cfg(&dir, 4096, 1 << 20)).unwrap();
        let mut ch = b.open_channel(CoreId(0), 16).unwrap();
        let mut pool = BufPool::new(16, 4096, 4096).unwrap();
        for i in 0..16u64 {
            let mut w = pool.get(4096).unwrap();
            w.as_mut_slice().copy_from_slice(&pattern(i, 4096));
            assert!(matches!(
                ch.submit(BdevIo::new(IoType::Write, i, 1, Some(w), i)),
                Submit::Queued
            ));
        }
        assert_eq!(ch.in_flight(), 16);
        // Never polled: the SQEs are still in the ring. Drop must submit and wait for them
        // before the buffers are freed.
        drop(ch);
        let raw = std::fs::read(dir.path().join("disk.img")).unwrap();
        for i in 0..16usize {
            assert_eq!(
                &raw[i * 4096..(i + 1) * 4096],
                &pattern(i as u64, 4096)[..],
                "block {i}"
            );
        }
    }

    #[test]
    fn short_read_is_continued_then_reported() {
        // Buffered, so the file can end mid-block: the kernel returns a short read, the channel
        // asks for the rest, gets 0 bytes (EOF) and must report EIO instead of spinning.
        let dir = disk_dir();
        let c = UringConfig {
            direct: false,
            ..cfg(&dir, 512, 8 * 512)
        };
        let b = open(&c).unwrap();
        std::fs::write(&c.path, pattern(0, 8 * 512)).unwrap();
        let mut ch = b.open_channel(CoreId(0), 2).unwrap();
        let mut pool = BufPool::new(2, 8 * 512, 64).unwrap();
        let io = run(
            ch.as_mut(),
            BdevIo::new(IoType::Read, 0, 8, pool.get(8 * 512), 0),
        );
        assert_eq!(io.status, IoStatus::Success);
        assert_eq!(
            io.buf.as_ref().unwrap().as_slice(),
            &pattern(0, 8 * 512)[..]
        );
        pool.put(io.buf.unwrap());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&c.path)
            .unwrap()
            .set_len(5 * 512 + 100)
            .unwrap();
        let io = run(
            ch.as_mut(),
            BdevIo::new(IoType::Read, 4, 4, pool.get(4 * 512), 0),
        );
        assert_eq!(io.status, IoStatus::IoError(libc::EIO));
        let got = io.buf.as_ref().unwrap().as_slice();
        assert_eq!(
            &got[..612],
            &pattern(0, 8 * 512)[4 * 512..5 * 512 + 100],
            "the short part was read"
        );
    }
}
