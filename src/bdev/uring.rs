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
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
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

/// How long opening a file waits for its lock before refusing it as in use.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

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
    /// What the file is, for "is this already used" checks.
    id: BackingId,
    /// The open file description. It also carries the exclusive claim (`flock` on a regular
    /// file, `O_EXCL` on a block device), which lasts until its last descriptor (the bdev's and
    /// every channel's clone of this `Arc`) is closed.
    file: Arc<File>,
    counters: Arc<Counters>,
}

/// Which file a bdev uses: device and inode for a regular file, the device number for a block
/// device (every node and link of one block device has the same `st_rdev`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackingId {
    File { dev: u64, ino: u64 },
    Block { rdev: u64 },
}

/// A path handed in at run time (`namespace.create`) that the allow-list admitted, and what
/// the matching entry permits. See [`UringBdev::open_allowed`].
#[derive(Clone, Copy, Debug)]
pub enum AllowedPath<'a> {
    /// A regular file beneath `dir`, at `rel` (relative, without `.`/`..`; checked again by
    /// the kernel, which resolves it with `RESOLVE_BENEATH`).
    Beneath {
        dir: &'a Path,
        rel: &'a Path,
        /// A missing file may be created (mode 0600) at the requested `size_bytes`.
        create: bool,
        /// An existing file shorter than `size_bytes` may be extended.
        grow: bool,
        /// Largest size a file may be created with or grown to.
        max_size_bytes: u64,
    },
    /// Exactly this block device (the operator's path, trusted as written).
    Device { path: &'a Path },
}

/// Why a bdev could not be opened on a path handed in at run time.
#[derive(Debug, thiserror::Error)]
pub enum OpenRefused {
    /// The allow-list or a safety rule forbids it.
    #[error("{0}")]
    Denied(String),
    /// Another bdev or process holds the file or device.
    #[error("{0}")]
    InUse(String),
    /// Any other failure (I/O error, bad geometry).
    #[error(transparent)]
    Bdev(#[from] BdevError),
}

/// Whether opening may extend a regular file to `size_bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Growth {
    /// Config bdevs: the operator asked for this size.
    Any,
    /// Up to this many bytes (an allow-list entry that permits create or grow).
    UpTo(u64),
    /// Never (an allow-list entry without `grow`).
    Never,
}

/// Opens a `uring` bdev.
pub fn open(cfg: &UringConfig) -> Result<Arc<dyn Bdev>, BdevError> {
    Ok(Arc::new(UringBdev::new(cfg)?))
}

impl UringBdev {
    /// Opens the path of a config entry (trusted: written by the operator). A missing file is
    /// created and a short one grown to `size_bytes`. The file is claimed exclusively for the
    /// bdev's life (`flock` on a file, `O_EXCL` on a block device), so nothing else that
    /// follows these rules (another bdev, another nvseal) can open it meanwhile.
    pub fn new(cfg: &UringConfig) -> Result<Self, BdevError> {
        Self::check_cfg(cfg)?;
        let path_s = cfg.path.display().to_string();
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        let existing = std::fs::metadata(&cfg.path).ok();
        let is_blockdev = existing
            .as_ref()
            .is_some_and(|m| m.file_type().is_block_device());
        let mut flags = if cfg.direct { libc::O_DIRECT } else { 0 };
        if cfg.size_bytes.is_some() && !is_blockdev {
            opts.create(true);
        } else {
            // Exclusive open of a block device (EBUSY when mounted or claimed); ignored by
            // Linux for other files when O_CREAT is not given.
            flags |= libc::O_EXCL;
        }
        opts.custom_flags(flags);
        let file = opts.open(&cfg.path).map_err(|e| {
            if cfg.direct && e.raw_os_error() == Some(libc::EINVAL) {
                Self::no_direct(&cfg.name, &path_s)
            } else if e.raw_os_error() == Some(libc::EBUSY) {
                BdevError::Invalid {
                    name: cfg.name.clone(),
                    what: format!(
                        "{path_s} is in use (mounted, or claimed by another bdev or process)"
                    ),
                }
            } else {
                BdevError::Io {
                    name: cfg.name.clone(),
                    path: path_s.clone(),
                    source: e,
                }
            }
        })?;
        Self::from_file(cfg, file, Growth::Any, &|_| Ok(())).map_err(|e| match e {
            OpenRefused::Bdev(b) => b,
            OpenRefused::Denied(what) | OpenRefused::InUse(what) => BdevError::Invalid {
                name: cfg.name.clone(),
                what,
            },
        })
    }

    /// Opens a path handed in at run time, as `allowed` permits, never by following the
    /// caller's text anywhere else:
    ///
    /// * beneath a directory: the path is resolved by `openat2(RESOLVE_BENEATH |
    ///   RESOLVE_NO_MAGICLINKS)` from the directory, first as `O_PATH` (no side effects), so
    ///   `..` and symlinks leading out are refused by the kernel; the result must be a regular
    ///   file with one link (a hard link could bring in a file from elsewhere), and is then
    ///   reopened through its own descriptor, so what is checked is what is used. A missing
    ///   file is created only if `create` (`O_CREAT|O_EXCL`, mode 0600), a short one grown
    ///   only if `grow`, both up to `max_size_bytes`;
    /// * a device: the operator's path must be a block device; it is opened `O_EXCL`.
    ///
    /// `check` sees the file's identity before it is claimed, so a caller can refuse a file
    /// that is, for example, the base of an encrypted bdev. The claim (`flock`/`O_EXCL`)
    /// refuses a file another bdev or process already holds.
    pub fn open_allowed(
        cfg: &UringConfig,
        allowed: AllowedPath<'_>,
        check: &dyn Fn(BackingId) -> Result<(), String>,
    ) -> Result<Self, OpenRefused> {
        use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
        use nix::sys::stat::{Mode, SFlag};
        Self::check_cfg(cfg)?;
        let path_s = cfg.path.display().to_string();
        let io_err = |source: std::io::Error| {
            OpenRefused::Bdev(BdevError::Io {
                name: cfg.name.clone(),
                path: path_s.clone(),
                source,
            })
        };
        let errno = |e: nix::errno::Errno| std::io::Error::from_raw_os_error(e as i32);
        let denied = |what: String| OpenRefused::Denied(format!("{path_s}: {what}"));
        let mut flags = OFlag::O_RDWR | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
        if cfg.direct {
            flags |= OFlag::O_DIRECT;
        }
        let (opath, growth) = match allowed {
            AllowedPath::Beneath {
                dir,
                rel,
                create,
                grow,
                max_size_bytes,
            } => {
                if rel.is_absolute()
                    || rel.as_os_str().is_empty()
                    || rel
                        .components()
                        .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(denied(
                        "must name a file beneath the allowed directory, without . or ..".into(),
                    ));
                }
                let dirfd = nix::fcntl::open(
                    dir,
                    OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| {
                    io_err(std::io::Error::new(
                        errno(e).kind(),
                        format!("allowed directory {}: {e}", dir.display()),
                    ))
                })?;
                let resolve = ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS;
                let how = OpenHow::new()
                    .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
                    .resolve(resolve);
                let escape = |e: nix::errno::Errno| {
                    match e {
                    nix::errno::Errno::EXDEV => denied(format!(
                        "leads out of the allowed directory {} (`..` or a symlink pointing outside)",
                        dir.display()
                    )),
                    nix::errno::Errno::ELOOP => denied("too many symlinks, or a /proc magic link".into()),
                    nix::errno::Errno::ENOSYS => denied(
                        "openat2 is not available (Linux 5.6 or later is needed to open caller paths safely)".into(),
                    ),
                    e => io_err(errno(e)),
                }
                };
                match nix::fcntl::openat2(&dirfd, rel, how) {
                    Ok(fd) => {
                        let growth = if grow {
                            Growth::UpTo(max_size_bytes)
                        } else {
                            Growth::Never
                        };
                        (fd, growth)
                    }
                    Err(nix::errno::Errno::ENOENT) => {
                        let Some(size) = cfg.size_bytes else {
                            return Err(denied("does not exist (give size_bytes to create it where the allow-list permits)".into()));
                        };
                        if !create {
                            return Err(denied(format!(
                                "does not exist, and the allow-list entry for {} does not permit create",
                                dir.display()
                            )));
                        }
                        if size > max_size_bytes {
                            return Err(denied(format!(
                                "size_bytes {size} is larger than the allow-list's max_size_bytes {max_size_bytes}"
                            )));
                        }
                        let how = OpenHow::new()
                            .flags(
                                OFlag::O_RDWR
                                    | OFlag::O_CREAT
                                    | OFlag::O_EXCL
                                    | OFlag::O_CLOEXEC
                                    | OFlag::O_NOCTTY,
                            )
                            .mode(Mode::from_bits_truncate(0o600))
                            .resolve(resolve);
                        let fd = nix::fcntl::openat2(&dirfd, rel, how).map_err(escape)?;
                        tracing::info!(bdev = %cfg.name, path = %path_s, size, "created a backing file");
                        (fd, Growth::UpTo(max_size_bytes))
                    }
                    Err(e) => return Err(escape(e)),
                }
            }
            AllowedPath::Device { path } => {
                let fd = nix::fcntl::open(path, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
                    .map_err(|e| io_err(errno(e)))?;
                (fd, Growth::Never)
            }
        };
        let st = nix::sys::stat::fstat(&opath).map_err(|e| io_err(errno(e)))?;
        let fmt = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        match allowed {
            AllowedPath::Beneath { .. } => {
                if fmt != SFlag::S_IFREG {
                    return Err(denied("is not a regular file".into()));
                }
                if st.st_nlink > 1 {
                    return Err(denied(format!(
                        "has {} hard links; one of them may lie outside the allowed directory",
                        st.st_nlink
                    )));
                }
            }
            AllowedPath::Device { .. } => {
                if fmt != SFlag::S_IFBLK {
                    return Err(denied("is not a block device".into()));
                }
                flags |= OFlag::O_EXCL;
            }
        }
        // Reopen the very inode just checked (not the path again) with the real flags.
        let own = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&opath)
        ));
        let fd = nix::fcntl::open(&own, flags, Mode::empty()).map_err(|e| match e {
            nix::errno::Errno::EINVAL if cfg.direct => {
                OpenRefused::Bdev(Self::no_direct(&cfg.name, &path_s))
            }
            nix::errno::Errno::EBUSY => OpenRefused::InUse(format!(
                "{path_s} is in use (mounted, or claimed by another bdev or process)"
            )),
            e => io_err(errno(e)),
        })?;
        drop(opath);
        let bdev = Self::from_file(cfg, File::from(fd), growth, check)?;
        if bdev.id != Self::id_of(&st) {
            return Err(denied("changed while it was opened".into()));
        }
        Ok(bdev)
    }

    fn check_cfg(cfg: &UringConfig) -> Result<(), BdevError> {
        let invalid = |what: String| BdevError::Invalid {
            name: cfg.name.clone(),
            what,
        };
        if cfg.name.is_empty() {
            return Err(invalid("name must not be empty".into()));
        }
        if cfg.block_size != 512 && cfg.block_size != 4096 {
            return Err(invalid(format!(
                "block_size {} must be 512 or 4096",
                cfg.block_size
            )));
        }
        Ok(())
    }

    fn no_direct(name: &str, path_s: &str) -> BdevError {
        BdevError::Invalid {
            name: name.to_string(),
            what: format!(
                "{path_s}: the filesystem does not support O_DIRECT (EINVAL); set `direct: false`"
            ),
        }
    }

    fn id_of(st: &libc::stat) -> BackingId {
        if st.st_mode & libc::S_IFMT == libc::S_IFBLK {
            BackingId::Block { rdev: st.st_rdev }
        } else {
            BackingId::File {
                dev: st.st_dev,
                ino: st.st_ino,
            }
        }
    }

    /// Finishes opening `file`: `check` on its identity, the exclusive claim of a regular file
    /// (`flock`, non-blocking), the size (growing a regular file as `growth` permits), the
    /// block size against the device, and the ring probe.
    fn from_file(
        cfg: &UringConfig,
        file: File,
        growth: Growth,
        check: &dyn Fn(BackingId) -> Result<(), String>,
    ) -> Result<Self, OpenRefused> {
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
        let meta = file.metadata().map_err(io_err)?;
        let ft = meta.file_type();
        let id = if ft.is_block_device() {
            BackingId::Block { rdev: meta.rdev() }
        } else {
            BackingId::File {
                dev: meta.dev(),
                ino: meta.ino(),
            }
        };
        check(id).map_err(|w| OpenRefused::Denied(format!("{path_s}: {w}")))?;
        if ft.is_file() {
            // The lock belongs to the open file description, so it lasts until the bdev and
            // every channel have closed their descriptor: exactly the file's use. nix's `Flock`
            // guard would unlock when the bdev drops while channels still write, which is why
            // the plain call is used.
            //
            // A process that was just killed can hold the lock a moment longer: its io_uring
            // instance (which references the file) is torn down by the kernel after the exit.
            // A restart right after a crash therefore waits a little for the lock before it
            // refuses the file as in use.
            let flock = || {
                #[allow(deprecated)]
                nix::fcntl::flock(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    nix::fcntl::FlockArg::LockExclusiveNonblock,
                )
            };
            let mut locked = flock();
            let t0 = std::time::Instant::now();
            let mut logged = false;
            while locked == Err(nix::errno::Errno::EWOULDBLOCK) && t0.elapsed() < LOCK_WAIT {
                if !logged {
                    logged = true;
                    tracing::info!(path = %path_s, "file is locked; waiting up to {LOCK_WAIT:?} (a process that just exited may still hold it)");
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
                locked = flock();
            }
            match locked {
                Ok(()) => {}
                Err(nix::errno::Errno::EWOULDBLOCK) => {
                    return Err(OpenRefused::InUse(format!(
                        "{path_s} is in use (locked by another bdev or process)"
                    )))
                }
                Err(e) => return Err(io_err(std::io::Error::from_raw_os_error(e as i32)).into()),
            }
        }
        let (kind, size, lbs) = if ft.is_block_device() {
            let dev = sysuring::blockdev_size_bytes(file.as_fd()).map_err(io_err)?;
            let lbs = sysuring::blockdev_logical_block_size(file.as_fd()).map_err(io_err)?;
            let size = match cfg.size_bytes {
                Some(s) if s > dev => {
                    return Err(invalid(format!(
                        "size_bytes {s} is larger than the device ({dev} bytes)"
                    ))
                    .into())
                }
                Some(s) => s,
                None => dev,
            };
            (FileKind::BlockDevice, size, Some(lbs))
        } else if ft.is_file() {
            let size = match cfg.size_bytes {
                Some(s) => {
                    if meta.len() < s {
                        match growth {
                            Growth::Any => {}
                            Growth::UpTo(max) if s <= max => {}
                            Growth::UpTo(max) => {
                                return Err(OpenRefused::Denied(format!(
                                    "{path_s}: size_bytes {s} is larger than the allow-list's max_size_bytes {max}"
                                )))
                            }
                            Growth::Never => {
                                return Err(OpenRefused::Denied(format!(
                                    "{path_s}: size_bytes {s} is larger than the file ({} bytes), and the allow-list entry does not permit grow",
                                    meta.len()
                                )))
                            }
                        }
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
            ))
            .into());
        };
        if let Some(lbs) = lbs {
            if cfg.direct && lbs > cfg.block_size {
                return Err(invalid(format!(
                    "block_size {} is smaller than the device's logical block size {lbs}",
                    cfg.block_size
                ))
                .into());
            }
        }
        let num_blocks = size / u64::from(cfg.block_size);
        if num_blocks == 0 {
            return Err(
                invalid(format!("{path_s} holds less than one block ({size} bytes)")).into(),
            );
        }
        if size % u64::from(cfg.block_size) != 0 {
            tracing::warn!(bdev = %name, size, "size is not a multiple of the block size; the tail is unused");
        }
        let probe: UringQueue<BdevIo, ()> = UringQueue::new(1, 1, 1).map_err(io_err)?;
        let fallocate = probe.supports(io_uring::opcode::Fallocate::CODE);
        Ok(UringBdev {
            name,
            path: cfg.path.clone(),
            block_size: cfg.block_size,
            num_blocks,
            kind,
            direct: cfg.direct,
            fallocate,
            id,
            file: Arc::new(file),
            counters: Arc::new(Counters::default()),
        })
    }

    /// What the file is (device+inode, or the block device number).
    pub fn backing_id(&self) -> BackingId {
        self.id
    }

    /// The path the bdev was opened by (as given; not re-resolved).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path that reopens exactly this file (`/proc/self/fd/N` of the bdev's descriptor),
    /// never the original path again, valid while the bdev lives. For buffered side access,
    /// such as the key header of an encrypted bdev on this file.
    pub fn own_fd_path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&*self.file)
        ))
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
    q: UringQueue<BdevIo, OpState>,
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
mod tests;
