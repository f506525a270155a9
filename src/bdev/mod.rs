//! The block-device layer: a small ops interface (SPDK's bdev idea) with per-reactor channels.
//!
//! A [`Bdev`] is shared by every reactor (`Send + Sync`, immutable after open). Each reactor asks
//! it once for its own [`BdevChannel`] — per-core queues against the backend, so the data path
//! takes no lock and nothing crosses cores. A channel is owned by one reactor for its whole life.
//!
//! The I/O life on a channel: the reactor [`BdevChannel::submit`]s a [`BdevIo`]; the channel
//! either takes it ([`Submit::Queued`]) or hands it back ([`Submit::Busy`], backpressure is a
//! value, not an error). Later the reactor calls [`BdevChannel::poll`], which hands every finished
//! I/O back with its [`IoStatus`] set. An I/O is never completed inline from `submit`: the caller
//! always sees completions from `poll`, which keeps the callers' state machines simple.
//!
//! Buffer ownership: a read or write carries its [`IoBuf`] inside the [`BdevIo`]; whoever holds
//! the `BdevIo` owns the buffer. Between `submit` and the completion the channel (and, for
//! io_uring, the kernel) owns it; the caller gets it back in the completion.
//!
//! Backends: [`malloc`] (RAM, optionally hugepages), [`null`] (no data), [`uring`] (file or block
//! device, O_DIRECT, io_uring polled by the reactor). The crypto bdev lives in
//! [`crate::crypto::bdev`] and wraps any of them.
//!
//! Durability (NVMe's volatile write cache model, which every bdev follows):
//! * A completed Write may still sit in a volatile cache (the drive's, the page cache, `sim`'s
//!   simulated one) and be lost on power failure.
//! * A Write with [`BdevIo::fua`] set completes only once its data is on stable storage.
//! * A Flush completes only once every write that completed before the Flush was submitted is
//!   on stable storage.
//!
//! A backend with nothing volatile (`malloc`, `null`: RAM dies with the process anyway) treats
//! both as no-ops and still answers Flush with success. Layers that pass an I/O down (`slice`,
//! `late`, the crypto bdev) hand the same [`BdevIo`] to their base, so `fua` travels with it
//! unchanged to the backend that must honour it.

use crate::sys::buf::AlignedBuf;
use crate::types::CoreId;

pub mod late;
pub mod malloc;
pub mod null;
pub mod sim;
pub mod slice;
pub mod uring;

/// What an I/O does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoType {
    Read,
    Write,
    Flush,
    WriteZeroes,
    Unmap,
}

impl IoType {
    /// Whether this type moves data through an [`IoBuf`].
    pub fn has_data(self) -> bool {
        matches!(self, IoType::Read | IoType::Write)
    }
}

/// The outcome of an I/O, set by the channel before it hands the I/O back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoStatus {
    /// Not completed yet (the value an I/O carries while it is in flight).
    Pending,
    Success,
    /// The range is past the end of the device, or the buffer does not match `num_blocks`.
    InvalidRange,
    /// The bdev does not support this [`IoType`].
    Unsupported,
    /// The backend failed; the errno it reported.
    IoError(i32),
}

/// A data buffer for one I/O: block-aligned memory from a [`BufPool`], `len` bytes in use.
pub struct IoBuf {
    mem: AlignedBuf,
    len: usize,
}

impl IoBuf {
    /// Wraps an aligned allocation; `len` bytes of it are the I/O's data.
    pub fn new(mem: AlignedBuf, len: usize) -> Self {
        assert!(
            len <= mem.capacity(),
            "IoBuf len {len} over capacity {}",
            mem.capacity()
        );
        IoBuf { mem, len }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.mem.capacity()
    }
    /// Changes how many bytes are in use (no reallocation; must fit the capacity).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.mem.capacity());
        self.len = len;
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.mem.as_slice()[..self.len]
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.mem.as_mut_slice()[..len]
    }
    /// The allocation itself (for the pool it goes back to).
    pub fn into_mem(self) -> AlignedBuf {
        self.mem
    }
    /// Raw pointer for the kernel (io_uring); valid while this `IoBuf` is alive and not moved out
    /// of its allocation (moving the `IoBuf` value does not move the memory).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.mem.as_mut_ptr()
    }
}

/// An I/O parked in an io_uring slot: the ring may point into its data buffer (the bytes in
/// use), whose heap allocation stays put while the `BdevIo` value moves.
impl crate::sys::uring::RingRequest for BdevIo {
    fn ring_buffer(&mut self) -> Option<(&mut AlignedBuf, usize)> {
        self.buf.as_mut().map(|b| {
            let len = b.len;
            (&mut b.mem, len)
        })
    }
}

/// A fixed set of equally sized aligned buffers, owned by one reactor.
///
/// All memory is allocated at construction; `get`/`put` move buffers in and out of a free list
/// whose capacity was reserved up front, so the steady state allocates nothing.
pub struct BufPool {
    free: Vec<AlignedBuf>,
    buf_size: usize,
    total: usize,
}

impl BufPool {
    /// `count` buffers of `buf_size` bytes each, aligned to `align` (a power of two ≥ 512 for
    /// O_DIRECT backends).
    pub fn new(count: usize, buf_size: usize, align: usize) -> Result<Self, BdevError> {
        let mut free = Vec::with_capacity(count);
        for _ in 0..count {
            free.push(
                AlignedBuf::for_io(buf_size, align).ok_or(BdevError::NoMemory {
                    bytes: buf_size * count,
                })?,
            );
        }
        Ok(BufPool {
            free,
            buf_size,
            total: count,
        })
    }
    /// Takes a buffer with `len` bytes in use, or `None` if the pool is empty or `len` is bigger
    /// than the pool's buffers (callers park the request and retry: SPDK's -ENOMEM rule).
    pub fn get(&mut self, len: usize) -> Option<IoBuf> {
        if len > self.buf_size {
            return None;
        }
        self.free.pop().map(|mem| IoBuf::new(mem, len))
    }
    /// Returns a buffer taken from this pool.
    pub fn put(&mut self, buf: IoBuf) {
        debug_assert_eq!(buf.capacity(), self.buf_size, "buffer from another pool");
        debug_assert!(self.free.len() < self.total, "pool over-filled");
        self.free.push(buf.mem);
    }
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }
    pub fn available(&self) -> usize {
        self.free.len()
    }
    pub fn total(&self) -> usize {
        self.total
    }
}

/// One I/O request travelling through a bdev stack.
pub struct BdevIo {
    pub io_type: IoType,
    /// First block (in the bdev's block size).
    pub offset_blocks: u64,
    /// Number of blocks; for Read/Write `buf.len()` must equal `num_blocks * block_size`.
    pub num_blocks: u32,
    /// The data for Read/Write; `None` for the other types.
    pub buf: Option<IoBuf>,
    /// Opaque caller cookie (e.g. the index of the request slot it belongs to).
    pub ctx: u64,
    /// Force Unit Access, meaningful for [`IoType::Write`]: complete only once the data is on
    /// stable storage (see the module docs). Ignored for the other types (a Read is always
    /// served from what the backend holds; none of our backends keep a read cache that could
    /// disagree with the media).
    pub fua: bool,
    /// Set by the channel when the I/O completes.
    pub status: IoStatus,
    /// A bit stack stacked bdevs push to while the I/O is below them and pop when it comes
    /// back (the crypto bdev keeps the epoch parity of its hot-zone gate here): no side table,
    /// nothing allocated. Zero when the I/O is created; callers never touch it.
    pub(crate) stack_bits: u64,
}

impl BdevIo {
    pub fn new(
        io_type: IoType,
        offset_blocks: u64,
        num_blocks: u32,
        buf: Option<IoBuf>,
        ctx: u64,
    ) -> Self {
        BdevIo {
            io_type,
            offset_blocks,
            num_blocks,
            buf,
            ctx,
            fua: false,
            status: IoStatus::Pending,
            stack_bits: 0,
        }
    }
    /// The same I/O with Force Unit Access set or cleared.
    pub fn with_fua(mut self, fua: bool) -> Self {
        self.fua = fua;
        self
    }
    /// Whether this I/O is a write that must reach stable storage before it completes.
    pub fn is_fua_write(&self) -> bool {
        self.fua && self.io_type == IoType::Write
    }
}

/// A write whose data is not in its buffer yet but in memory the caller reuses right after the
/// call (the NVMe/TCP target's receive staging buffer): see [`BdevChannel::submit_writes_from`].
/// Built only through [`WriteFrom::new`], which checks that the source is exactly as long as the
/// write's buffer, so a channel never has to handle a mismatch.
pub struct WriteFrom<'a> {
    io: BdevIo,
    src: &'a [u8],
}

impl<'a> WriteFrom<'a> {
    /// `io` must be a [`IoType::Write`] whose buffer is `src.len()` bytes long; otherwise the
    /// I/O is handed back untouched.
    pub fn new(io: BdevIo, src: &'a [u8]) -> Result<Self, BdevIo> {
        let fits =
            io.io_type == IoType::Write && io.buf.as_ref().is_some_and(|b| b.len() == src.len());
        if fits {
            Ok(WriteFrom { io, src })
        } else {
            Err(io)
        }
    }
    /// The I/O (its buffer not filled yet) and the data.
    /// The I/O (its buffer not yet filled).
    pub fn io(&self) -> &BdevIo {
        &self.io
    }
    pub fn into_parts(self) -> (BdevIo, &'a [u8]) {
        (self.io, self.src)
    }
    /// Copies the data into the buffer: an ordinary write from here on.
    pub fn into_copied(mut self) -> BdevIo {
        if let Some(b) = self.io.buf.as_mut() {
            b.as_mut_slice().copy_from_slice(self.src);
        }
        self.io
    }
}

/// Result of [`BdevChannel::submit`].
pub enum Submit {
    /// The channel took the I/O; it comes back from `poll`.
    Queued,
    /// The channel is full; the caller keeps the I/O and retries after a `poll`.
    Busy(BdevIo),
}

/// A reactor's own handle on a bdev. Not `Send`: it never leaves the reactor that opened it.
pub trait BdevChannel {
    /// Hands an I/O to the channel (see the module docs for the life of an I/O).
    fn submit(&mut self, io: BdevIo) -> Submit;
    /// Hands every finished I/O to `done`; returns how many completed.
    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize;
    /// I/Os submitted and not yet handed back by `poll`.
    fn in_flight(&self) -> usize;
    /// A hint that a write of `num_blocks` at `offset_blocks` will be submitted soon: a layer
    /// that works on the data first (the crypto bdev encrypting it) calls this so that the
    /// backend can start moving its destination into cache meanwhile. Default: nothing.
    fn hint_write(&mut self, _offset_blocks: u64, _num_blocks: u32) {}
    /// Submits writes whose data is still in the caller's transient memory ([`WriteFrom`]): the
    /// channel is done with every source when this returns. Each write is otherwise taken as
    /// [`BdevChannel::submit`] would take it, in iteration order; one the channel cannot take
    /// goes to `busy` with its data copied into its buffer, for the caller to retry with
    /// `submit`.
    ///
    /// Default: copy each into its buffer and `submit` it. The crypto bdev overrides it to
    /// encrypt the whole batch from the sources straight into the buffers in one cipher call,
    /// which saves the copy (see `docs/engine.md`).
    fn submit_writes_from(
        &mut self,
        writes: &mut dyn Iterator<Item = WriteFrom<'_>>,
        busy: &mut dyn FnMut(BdevIo),
    ) {
        for w in writes {
            if let Submit::Busy(io) = self.submit(w.into_copied()) {
                busy(io);
            }
        }
    }
}

/// A block device shared by all reactors.
pub trait Bdev: Send + Sync {
    fn name(&self) -> &str;
    /// Logical block size in bytes (512 or 4096).
    fn block_size(&self) -> u32;
    fn num_blocks(&self) -> u64;
    fn io_type_supported(&self, io_type: IoType) -> bool;
    /// Buffer alignment this bdev needs (O_DIRECT backends need the device's logical block size).
    fn buf_align(&self) -> usize {
        64
    }
    /// Whether the data written through this bdev is encrypted before it reaches the storage
    /// below (a crypto bdev, or the stand-in for one). What the target reports as a
    /// namespace's `encrypted` is derived from this, never taken from a label.
    fn encrypts_data(&self) -> bool {
        false
    }
    /// Opens the calling reactor's channel, able to hold `queue_depth` I/Os in flight.
    fn open_channel(
        &self,
        core: CoreId,
        queue_depth: usize,
    ) -> Result<Box<dyn BdevChannel>, BdevError>;
}

/// The queue depth check every RAM-backed channel makes when it opens.
pub(crate) fn check_queue_depth(name: &str, queue_depth: usize) -> Result<(), BdevError> {
    if queue_depth == 0 {
        return Err(BdevError::Invalid {
            name: name.to_string(),
            what: "queue_depth must be > 0".into(),
        });
    }
    Ok(())
}

/// Checks an I/O against a device's geometry; the status to complete it with if it is invalid.
pub fn validate(io: &BdevIo, block_size: u32, num_blocks: u64) -> Result<(), IoStatus> {
    let end = io
        .offset_blocks
        .checked_add(u64::from(io.num_blocks))
        .ok_or(IoStatus::InvalidRange)?;
    if end > num_blocks {
        return Err(IoStatus::InvalidRange);
    }
    if io.io_type.has_data() {
        let want = u64::from(io.num_blocks) * u64::from(block_size);
        match &io.buf {
            Some(b) if b.len() as u64 == want => {}
            _ => return Err(IoStatus::InvalidRange),
        }
    }
    Ok(())
}

/// Runs one I/O to completion on a private channel opened for `core`, polling on the calling
/// thread. For control threads only (shutdown flushes, tools): it spins with `yield_now` and
/// would stall a reactor. Gives up after `timeout` (a stuck backend must not hang shutdown);
/// the channel, and with it any I/O still in flight, is dropped then (the uring channel waits
/// for or leaks its buffers safely, see [`crate::sys::uring`]).
pub fn run_blocking(
    bdev: &dyn Bdev,
    core: CoreId,
    io: BdevIo,
    timeout: std::time::Duration,
) -> Result<BdevIo, BdevError> {
    let mut ch = bdev.open_channel(core, 1)?;
    let started = std::time::Instant::now();
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
            if started.elapsed() > timeout {
                return Err(BdevError::TimedOut {
                    name: bdev.name().to_string(),
                    what: "I/O did not complete",
                    after: timeout,
                });
            }
            std::thread::yield_now();
        }
    }
    finished.ok_or_else(|| BdevError::Invalid {
        name: bdev.name().to_string(),
        what: "no completion".into(),
    })
}

/// Flushes `bdev` from a control thread (see [`run_blocking`]): `Ok` once everything written
/// before the call is on stable storage. A bdev without Flush has nothing to flush.
pub fn flush_blocking(
    bdev: &dyn Bdev,
    core: CoreId,
    timeout: std::time::Duration,
) -> Result<(), BdevError> {
    if !bdev.io_type_supported(IoType::Flush) {
        return Ok(());
    }
    let io = run_blocking(
        bdev,
        core,
        BdevIo::new(IoType::Flush, 0, 0, None, 0),
        timeout,
    )?;
    match io.status {
        IoStatus::Success => Ok(()),
        other => Err(BdevError::Failed {
            name: bdev.name().to_string(),
            what: "flush",
            status: other,
        }),
    }
}

/// Errors opening or configuring a bdev (not I/O errors: those are [`IoStatus`]).
#[derive(Debug, thiserror::Error)]
pub enum BdevError {
    #[error("out of memory allocating {bytes} bytes")]
    NoMemory { bytes: usize },
    #[error("bdev {name}: {what}")]
    Invalid { name: String, what: String },
    #[error("bdev {name}: {path}: {source}")]
    Io {
        name: String,
        path: String,
        source: std::io::Error,
    },
    #[error("hugepages: {0}")]
    Hugepages(String),
    /// A blocking I/O from a control thread ([`run_blocking`]) did not finish in time.
    #[error("bdev {name}: {what} within {after:?}")]
    TimedOut {
        name: String,
        what: &'static str,
        after: std::time::Duration,
    },
    /// A blocking I/O from a control thread completed with an error status.
    #[error("bdev {name}: {what} failed: {status:?}")]
    Failed {
        name: String,
        what: &'static str,
        status: IoStatus,
    },
}
