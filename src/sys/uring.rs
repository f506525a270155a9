//! A safe io_uring queue for the uring bdev ([`UringQueue`]), plus the block-device and
//! direct-I/O geometry queries it needs.
//!
//! Owned by one reactor (one ring per bdev channel, never shared, not `Send`); all calls are
//! non-blocking except `Drop`. It exists so that every `unsafe` io_uring submission lives here,
//! next to the rule that makes it sound:
//!
//! **Buffer lifetime rule.** An SQE may point into memory only while that memory cannot be freed
//! or reused. The queue therefore keeps each request (any [`RingRequest`]: the uring bdev parks
//! its `BdevIo`, which owns its data buffer) in a slot of a fixed table; the slot index is the
//! SQE's `user_data`. From the moment an SQE for a slot is pushed until its CQE is reaped the slot
//! is *kernel-owned*: the queue refuses to hand out or release the request
//! ([`UringQueue::io_mut`], [`UringQueue::release`] return `None`),
//! and each slot has at most one SQE in flight. The zero-source buffer used by write-zeroes lives
//! in the queue itself. When the queue is dropped with SQEs still in flight, `Drop` waits (bounded
//! by [`DROP_WAIT`]) for their CQEs; if they do not arrive it *leaks* the slot table and the zero
//! buffer instead of freeing memory the kernel may still write.
//!
//! The file descriptors passed in are only numbers to the kernel; the kernel takes its own
//! reference to the file when it issues the SQE, so they carry no lifetime obligation for memory
//! safety (the bdev keeps its file open for the life of its channels anyway).
//!
//! This module is the floor of the layer order: it knows nothing of bdevs. What a request is
//! stays with the caller (`bdev/uring.rs` implements [`RingRequest`] for its I/Os).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring, Probe};

use crate::sys::buf::AlignedBuf;

/// A request a queue slot holds while the kernel may be working on it: whatever the caller
/// tracks per I/O, owning the data buffer (if any) that read and write SQEs point into.
///
/// The buffer is an [`AlignedBuf`], whose bytes live in their own heap allocation: moving the
/// request value (into and out of its slot) does not move them, which is what lets the kernel
/// keep a pointer into them. The queue never touches the request while its slot is kernel-owned.
pub trait RingRequest {
    /// The data buffer and how many of its bytes are in use (reads and writes stay inside
    /// them); `None` for requests without data (flush, fallocate, write-zeroes).
    fn ring_buffer(&mut self) -> Option<(&mut AlignedBuf, usize)>;
}

/// How long dropping a queue waits for in-flight CQEs before leaking their buffers. Long enough
/// for any sane device to finish a request, short enough not to hang shutdown forever.
pub const DROP_WAIT: Duration = Duration::from_secs(10);

/// Largest ring the kernel accepts (`IORING_MAX_ENTRIES`).
pub const MAX_ENTRIES: u32 = 32768;

/// Why an SQE could not be pushed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushError {
    /// The submission queue is full: retry after the next `submit`.
    SqFull,
    /// The slot is free, already kernel-owned, or the buffer range is not inside its `IoBuf`.
    BadSlot,
}

/// One completion: which slot, and the kernel's result (`>= 0` bytes/ok, `< 0` is `-errno`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub slot: u32,
    pub res: i32,
}

struct Slot<T, S> {
    io: Option<T>,
    in_kernel: bool,
    state: S,
}

/// An io_uring with a fixed table of request slots (see the module docs for the lifetime rule).
/// `T` is the request a slot holds; `S` is the caller's per-slot bookkeeping, never seen by the
/// kernel.
pub struct UringQueue<T: RingRequest, S: Default> {
    ring: IoUring,
    slots: Box<[Slot<T, S>]>,
    /// Free slot indices; capacity reserved for all slots, so push/pop never allocate.
    free: Vec<u32>,
    /// SQEs pushed whose CQE has not been reaped.
    kernel_owned: usize,
    /// Whether the ring reports pending task work in its SQ flags (COOP_TASKRUN|TASKRUN_FLAG);
    /// without it we must enter the kernel on every poll while requests are in flight.
    taskrun_flag: bool,
    /// Source of write-zeroes data; `None` only inside `Drop`.
    zero: Option<AlignedBuf>,
}

impl<T: RingRequest, S: Default> UringQueue<T, S> {
    /// A ring with at least `depth` SQ entries and `depth` slots, and a zero-source buffer of
    /// `zero_bytes` aligned to `align`.
    pub fn new(depth: u32, zero_bytes: usize, align: usize) -> io::Result<Self> {
        if depth == 0 || depth > MAX_ENTRIES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("queue depth {depth} not in 1..={MAX_ENTRIES}"),
            ));
        }
        let entries = depth.next_power_of_two();
        // Cooperative task running: completions wait for our next syscall instead of
        // interrupting the reactor, and the SQ flags tell us when that syscall is needed.
        let (ring, taskrun_flag) = match IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(entries)
        {
            Ok(r) => (r, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (IoUring::new(entries)?, false),
            Err(e) => return Err(e),
        };
        let zero = AlignedBuf::zeroed(zero_bytes, align)
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "zero buffer"))?;
        let slots: Box<[Slot<T, S>]> = (0..depth)
            .map(|_| Slot {
                io: None,
                in_kernel: false,
                state: S::default(),
            })
            .collect();
        let free: Vec<u32> = (0..depth).rev().collect();
        Ok(UringQueue {
            ring,
            slots,
            free,
            kernel_owned: 0,
            taskrun_flag,
            zero: Some(zero),
        })
    }

    /// Whether the kernel supports `opcode` (e.g. `io_uring::opcode::Fallocate::CODE`).
    pub fn supports(&self, opcode: u8) -> bool {
        let mut probe = Probe::new();
        self.ring.submitter().register_probe(&mut probe).is_ok() && probe.is_supported(opcode)
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }
    /// Slots holding a request (kernel-owned or not).
    pub fn used(&self) -> usize {
        self.slots.len() - self.free.len()
    }
    /// SQEs whose CQE has not been reaped.
    pub fn kernel_owned(&self) -> usize {
        self.kernel_owned
    }
    pub fn zero_len(&self) -> usize {
        self.zero.as_ref().map_or(0, AlignedBuf::capacity)
    }

    /// Parks `io` in a free slot; hands it back if every slot is taken.
    pub fn alloc(&mut self, io: T) -> Result<u32, T> {
        match self.free.pop() {
            Some(id) => {
                let slot = &mut self.slots[id as usize];
                debug_assert!(slot.io.is_none() && !slot.in_kernel);
                slot.io = Some(io);
                Ok(id)
            }
            None => Err(io),
        }
    }

    /// The request in slot `id`, unless the slot is free or kernel-owned.
    pub fn io_mut(&mut self, id: u32) -> Option<&mut T> {
        match self.slots.get_mut(id as usize) {
            Some(s) if !s.in_kernel => s.io.as_mut(),
            _ => None,
        }
    }

    /// The caller's bookkeeping for slot `id` (never seen by the kernel).
    pub fn state_mut(&mut self, id: u32) -> Option<&mut S> {
        self.slots.get_mut(id as usize).map(|s| &mut s.state)
    }

    /// Frees slot `id` and returns its request, unless the slot is free or kernel-owned.
    pub fn release(&mut self, id: u32) -> Option<T> {
        let slot = self.slots.get_mut(id as usize)?;
        if slot.in_kernel {
            return None;
        }
        let io = slot.io.take()?;
        slot.state = S::default();
        self.free.push(id);
        Some(io)
    }

    /// Pushes a read of `len` bytes at file offset `file_off` into bytes `buf_off..buf_off+len`
    /// of slot `id`'s buffer.
    pub fn push_read(
        &mut self,
        fd: BorrowedFd<'_>,
        id: u32,
        file_off: u64,
        buf_off: usize,
        len: u32,
    ) -> Result<(), PushError> {
        let ptr = self.buf_range(id, buf_off, len)?;
        let sqe = opcode::Read::new(types::Fd(fd.as_raw_fd()), ptr, len)
            .offset(file_off)
            .build();
        self.push(id, sqe)
    }

    /// Pushes a write of bytes `buf_off..buf_off+len` of slot `id`'s buffer to file offset
    /// `file_off`; with `dsync` the write carries `RWF_DSYNC` (see [`write_sqe`]).
    pub fn push_write(
        &mut self,
        fd: BorrowedFd<'_>,
        id: u32,
        file_off: u64,
        buf_off: usize,
        len: u32,
        dsync: bool,
    ) -> Result<(), PushError> {
        let ptr = self.buf_range(id, buf_off, len)?;
        self.push(id, write_sqe(fd, ptr, len, file_off, dsync))
    }

    /// Pushes a write of `len` zero bytes (at most [`Self::zero_len`]) from the queue's zero
    /// buffer to `file_off`, on behalf of slot `id`.
    pub fn push_write_zeroes(
        &mut self,
        fd: BorrowedFd<'_>,
        id: u32,
        file_off: u64,
        len: u32,
    ) -> Result<(), PushError> {
        self.check_slot(id)?;
        let ptr = match self.zero.as_mut() {
            Some(z) if len as usize <= z.capacity() => z.as_mut_ptr().cast_const(),
            _ => return Err(PushError::BadSlot),
        };
        let sqe = opcode::Write::new(types::Fd(fd.as_raw_fd()), ptr, len)
            .offset(file_off)
            .build();
        self.push(id, sqe)
    }

    /// Pushes an `fsync` (`fdatasync` when `datasync`) for slot `id`.
    pub fn push_fsync(
        &mut self,
        fd: BorrowedFd<'_>,
        id: u32,
        datasync: bool,
    ) -> Result<(), PushError> {
        self.check_slot(id)?;
        let flags = if datasync {
            types::FsyncFlags::DATASYNC
        } else {
            types::FsyncFlags::empty()
        };
        let sqe = opcode::Fsync::new(types::Fd(fd.as_raw_fd()))
            .flags(flags)
            .build();
        self.push(id, sqe)
    }

    /// Pushes a `fallocate(mode, offset, len)` for slot `id`.
    pub fn push_fallocate(
        &mut self,
        fd: BorrowedFd<'_>,
        id: u32,
        offset: u64,
        len: u64,
        mode: i32,
    ) -> Result<(), PushError> {
        self.check_slot(id)?;
        let sqe = opcode::Fallocate::new(types::Fd(fd.as_raw_fd()), len)
            .offset(offset)
            .mode(mode)
            .build();
        self.push(id, sqe)
    }

    /// Hands pushed SQEs to the kernel and lets it post finished work; never waits. Enters the
    /// kernel only when there is something to submit or completions to run.
    pub fn submit(&mut self) -> io::Result<usize> {
        let (pending, taskrun) = {
            let sq = self.ring.submission();
            (sq.len(), sq.taskrun())
        };
        let needed = pending > 0 || taskrun || (!self.taskrun_flag && self.kernel_owned > 0);
        if !needed {
            return Ok(0);
        }
        match self.ring.submit() {
            Ok(n) => Ok(n),
            // The kernel is short of resources or we were interrupted: the SQEs stay queued
            // and the next poll tries again.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)
                ) =>
            {
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    /// Takes one completion if the kernel has posted one; the slot stops being kernel-owned.
    pub fn pop(&mut self) -> Option<Completion> {
        loop {
            let cqe = self.ring.completion().next()?;
            let id = cqe.user_data();
            match usize::try_from(id).ok().and_then(|i| self.slots.get_mut(i)) {
                Some(slot) if slot.in_kernel => {
                    slot.in_kernel = false;
                    self.kernel_owned -= 1;
                    return Some(Completion {
                        slot: id as u32,
                        res: cqe.result(),
                    });
                }
                // Every SQE we push carries an owned slot's index; anything else is a bug.
                // Skip it rather than corrupt a slot's state.
                _ => debug_assert!(false, "CQE for slot {id} that has no SQE in flight"),
            }
        }
    }

    fn check_slot(&self, id: u32) -> Result<(), PushError> {
        match self.slots.get(id as usize) {
            Some(s) if s.io.is_some() && !s.in_kernel => Ok(()),
            _ => Err(PushError::BadSlot),
        }
    }

    /// Pointer to `buf_off..buf_off+len` of slot `id`'s buffer, after checking that range.
    fn buf_range(&mut self, id: u32, buf_off: usize, len: u32) -> Result<*mut u8, PushError> {
        self.check_slot(id)?;
        let (buf, in_use) = self.slots[id as usize]
            .io
            .as_mut()
            .and_then(RingRequest::ring_buffer)
            .ok_or(PushError::BadSlot)?;
        match buf_off.checked_add(len as usize) {
            Some(end) if end <= in_use.min(buf.capacity()) => {}
            _ => return Err(PushError::BadSlot),
        }
        // In bounds (checked above): the offset pointer stays inside the buffer's allocation.
        Ok(buf.as_mut_ptr().wrapping_add(buf_off))
    }

    fn push(&mut self, id: u32, sqe: io_uring::squeue::Entry) -> Result<(), PushError> {
        let sqe = sqe.user_data(u64::from(id));
        // SAFETY: every pointer in `sqe` refers either to slot `id`'s request buffer (range
        // checked by `buf_range` against its capacity) or to `self.zero`. We mark the slot
        // kernel-owned right after a successful push; from then until `pop` reaps its CQE,
        // `io_mut`/`release` refuse the slot, so its request — and the heap allocation of its
        // `AlignedBuf`, which does not move when the request value moves — stays alive and
        // untouched by us. `self.zero` is only freed when the queue
        // drops, and `Drop` waits for (or leaks past) every in-flight CQE first.
        let pushed = unsafe { self.ring.submission().push(&sqe) };
        match pushed {
            Ok(()) => {
                self.slots[id as usize].in_kernel = true;
                self.kernel_owned += 1;
                Ok(())
            }
            Err(_) => Err(PushError::SqFull),
        }
    }
}

impl<T: RingRequest, S: Default> Drop for UringQueue<T, S> {
    fn drop(&mut self) {
        let deadline = Instant::now() + DROP_WAIT;
        // Pushed-but-unsubmitted SQEs are handed to the kernel too (an SQE cannot be taken back
        // once in the ring), then everything is waited for.
        while self.kernel_owned > 0 && Instant::now() < deadline {
            let _ = self.ring.submit();
            while self.pop().is_some() {}
            if self.kernel_owned > 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if self.kernel_owned > 0 {
            tracing::error!(
                in_flight = self.kernel_owned,
                "io_uring requests did not finish within {DROP_WAIT:?}; leaking their buffers"
            );
            // The kernel may still DMA into these buffers: never free them.
            std::mem::forget(std::mem::take(&mut self.slots));
            std::mem::forget(self.zero.take());
        }
    }
}

/// The SQE of a write of `len` bytes from `ptr` to `file_off`. With `dsync` it carries
/// `RWF_DSYNC` in its `rw_flags`: the kernel completes it only once the data (and the metadata
/// needed to read it back, e.g. a sparse file's new block allocation) is on stable storage —
/// a FUA write on a block device or an O_DIRECT file whose blocks are allocated, a write plus a
/// ranged data sync otherwise. Every kernel with io_uring (5.1+) has `RWF_DSYNC` (4.7+).
pub fn write_sqe(
    fd: BorrowedFd<'_>,
    ptr: *const u8,
    len: u32,
    file_off: u64,
    dsync: bool,
) -> io_uring::squeue::Entry {
    let flags = if dsync { libc::RWF_DSYNC } else { 0 };
    opcode::Write::new(types::Fd(fd.as_raw_fd()), ptr, len)
        .offset(file_off)
        .rw_flags(flags)
        .build()
}

/// `BLKGETSIZE64` = `_IOR(0x12, 114, u64)`: a block device's size in bytes. The encoding is the
/// generic `_IOC` one used by x86-64 and arm64 (libc does not export this request).
const BLKGETSIZE64: libc::c_ulong = (2 << 30) | (8 << 16) | (0x12 << 8) | 114;

/// Size in bytes of the block device open as `fd`.
pub fn blockdev_size_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live local.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Logical block size of the block device open as `fd` (`BLKSSZGET`).
pub fn blockdev_logical_block_size(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut lbs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to a live local.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::BLKSSZGET as _,
            &mut lbs as *mut libc::c_int,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(lbs).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The file offset alignment O_DIRECT needs on `fd` (`statx` `STATX_DIOALIGN`, Linux ≥ 6.1), or
/// `None` if the kernel or filesystem does not say.
pub fn dio_offset_align(fd: BorrowedFd<'_>) -> Option<u32> {
    // SAFETY: statx is a plain C struct for which all-zero bytes are a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid NUL-terminated empty string, AT_EMPTY_PATH makes statx use
    // `fd`, and `stx` is a live, writable statx buffer.
    let rc = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some(stx.stx_dio_offset_align)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::fd::AsFd;

    /// A test request: an optional buffer with all its bytes in use (no bdev types here).
    struct Req(Option<AlignedBuf>);

    impl RingRequest for Req {
        fn ring_buffer(&mut self) -> Option<(&mut AlignedBuf, usize)> {
            self.0.as_mut().map(|b| {
                let n = b.capacity();
                (b, n)
            })
        }
    }

    fn data(len: usize, fill: u8) -> Req {
        let mut b = AlignedBuf::zeroed(len, 64).unwrap();
        b.as_mut_slice().fill(fill);
        Req(Some(b))
    }

    fn reap(q: &mut UringQueue<Req, u8>, want: usize) -> Vec<Completion> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < want && Instant::now() < deadline {
            q.submit().unwrap();
            while let Some(c) = q.pop() {
                got.push(c);
            }
        }
        got
    }

    #[test]
    fn slot_is_locked_while_kernel_owned() {
        let mut f = tempfile::tempfile_in("/var/tmp").unwrap();
        f.write_all(&[7u8; 4096]).unwrap();
        let mut q: UringQueue<Req, u8> = UringQueue::new(4, 4096, 64).unwrap();
        let id = q.alloc(data(4096, 0)).ok().unwrap();
        assert_eq!(
            q.push_read(f.as_fd(), id, 0, 1, 4096),
            Err(PushError::BadSlot),
            "range past the buffer"
        );
        q.push_read(f.as_fd(), id, 0, 0, 4096).unwrap();
        assert!(
            q.io_mut(id).is_none() && q.release(id).is_none(),
            "kernel-owned slot must be locked"
        );
        assert_eq!(
            q.push_fsync(f.as_fd(), id, true),
            Err(PushError::BadSlot),
            "one SQE per slot"
        );
        let c = reap(&mut q, 1);
        assert_eq!(
            c,
            vec![Completion {
                slot: id,
                res: 4096
            }]
        );
        let io = q.release(id).unwrap();
        assert!(io.0.unwrap().as_slice().iter().all(|&b| b == 7));
        assert_eq!(q.used(), 0);
        assert!(q.release(id).is_none(), "double release");
    }

    /// The bytes of an SQE as the kernel reads them.
    fn sqe_bytes(e: &io_uring::squeue::Entry) -> [u8; 64] {
        assert_eq!(std::mem::size_of::<io_uring::squeue::Entry>(), 64);
        // SAFETY: `Entry` is `#[repr(C)]` around the kernel's 64-byte `io_uring_sqe` (size
        // checked above), which is plain integers and unions of integers: every byte is
        // initialized (the builder starts from a zeroed SQE) and may be read as `u8`.
        unsafe { std::mem::transmute_copy::<io_uring::squeue::Entry, [u8; 64]>(e) }
    }

    /// `rw_flags` of an SQE: bytes 28..32 of `struct io_uring_sqe` (kernel ABI).
    fn rw_flags(e: &io_uring::squeue::Entry) -> i32 {
        let b = sqe_bytes(e);
        i32::from_le_bytes([b[28], b[29], b[30], b[31]])
    }

    #[test]
    fn fua_write_sqe_carries_rwf_dsync() {
        let f = tempfile::tempfile_in("/var/tmp").unwrap();
        let buf = [0u8; 512];
        let plain = write_sqe(f.as_fd(), buf.as_ptr(), 512, 4096, false);
        let fua = write_sqe(f.as_fd(), buf.as_ptr(), 512, 4096, true);
        assert_eq!(rw_flags(&plain), 0);
        assert_eq!(rw_flags(&fua), libc::RWF_DSYNC);
        let (p, u) = (sqe_bytes(&plain), sqe_bytes(&fua));
        assert_eq!(p[0], opcode::Write::CODE, "opcode byte");
        // Nothing else differs: same opcode, fd, offset, address and length.
        let differ: Vec<usize> = (0..64).filter(|&i| p[i] != u[i]).collect();
        assert!(differ.iter().all(|i| (28..32).contains(i)), "{differ:?}");
        // And the kernel takes it: a DSYNC write through a ring completes in full.
        let mut q: UringQueue<Req, u8> = UringQueue::new(2, 4096, 64).unwrap();
        let id = q.alloc(data(4096, 0x5a)).ok().unwrap();
        q.push_write(f.as_fd(), id, 0, 0, 4096, true).unwrap();
        assert_eq!(
            reap(&mut q, 1),
            vec![Completion {
                slot: id,
                res: 4096
            }]
        );
        let mut back = [0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 0).unwrap();
        assert!(back.iter().all(|&x| x == 0x5a));
    }

    #[test]
    fn slots_run_out() {
        let mut q: UringQueue<Req, u8> = UringQueue::new(2, 4096, 64).unwrap();
        assert!(q.alloc(Req(None)).is_ok());
        assert!(q.alloc(Req(None)).is_ok());
        assert!(q.alloc(Req(None)).is_err());
        assert!(UringQueue::<Req, u8>::new(0, 4096, 64).is_err());
    }

    #[test]
    fn drop_with_requests_in_flight_waits() {
        let f = tempfile::tempfile_in("/var/tmp").unwrap();
        let mut q: UringQueue<Req, u8> = UringQueue::new(8, 4096, 64).unwrap();
        for i in 0..8u64 {
            let id = q.alloc(Req(None)).ok().unwrap();
            q.push_write_zeroes(f.as_fd(), id, i * 4096, 4096).unwrap();
        }
        q.submit().unwrap();
        drop(q); // must not return before the kernel is done with the zero buffer
        assert_eq!(f.metadata().unwrap().len(), 8 * 4096);
    }

    #[test]
    fn geometry_queries_on_a_regular_file() {
        let f = tempfile::tempfile_in("/var/tmp").unwrap();
        assert!(
            blockdev_size_bytes(f.as_fd()).is_err(),
            "BLKGETSIZE64 on a regular file"
        );
        if let Some(a) = dio_offset_align(f.as_fd()) {
            assert!(a.is_power_of_two() && a <= 4096, "odd DIO alignment {a}");
        }
    }
}
