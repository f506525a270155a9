//! Large anonymous memory mappings ([`Region`]), optionally backed by 2 MiB hugepages.
//!
//! A `Region` is created once by the control thread when a RAM-backed bdev (malloc, sim) opens,
//! then shared (`Arc`) by every reactor that has a channel on that bdev. It exists so that a RAM
//! disk of many GiB is one mapping the kernel can back with hugepages (fewer TLB misses) instead
//! of a heap allocation.
//!
//! # Concurrent access rule
//!
//! Several reactors copy into and out of one region at the same time, at offsets the remote
//! hosts choose. The region therefore never hands out `&[u8]`/`&mut [u8]` over its memory: every
//! access is a raw-pointer copy (`ptr::copy_nonoverlapping` / `ptr::write_bytes`) of exactly the
//! requested byte range, after a bounds check. No Rust reference to the shared bytes ever exists,
//! so the aliasing rules are never broken.
//!
//! What this does **not** make sound: two copies that overlap in the region and run at the same
//! time on different threads, at least one of them a write, are a data race, and in Rust's
//! memory model (C++'s, which LLVM implements) a data race on non-atomic accesses is undefined
//! behaviour, whatever the bytes. Nothing here prevents it: a remote host may issue overlapping
//! I/Os on two queue pairs at once, which land on two reactors. We accept that knowingly, for
//! speed: the copies are opaque `memcpy`/`memset` calls into memory that only raw pointers
//! reach, which the compiler can neither see the other thread's access to nor cache across
//! calls, so what a race does in practice is what it does on a disk: unspecified bytes (any mix
//! of the two I/Os) in the overlap. The memory holds only plain bytes (any bit pattern is a
//! valid `u8`), and no control decision is ever read back from it. The sound alternative would
//! be relaxed atomic word copies (`AtomicU64` loads and stores), which cannot use vector
//! `memcpy` and cost several times the copy bandwidth of a RAM disk; volatile copies would not
//! help, since a race between volatile accesses is still a data race. Hosts that need ordering
//! (any sane NVMe initiator) must not issue overlapping I/O concurrently, as with a drive.

use std::ptr::NonNull;

/// Size of the hugepages a [`Region`] asks for (x86-64 / arm64 default hugetlb size).
pub const HUGEPAGE_SIZE: usize = 2 << 20;

/// Errors creating or addressing a [`Region`].
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("cannot map {len} bytes of anonymous memory: {source}")]
    Map { len: usize, source: std::io::Error },
    #[error(
        "cannot map {len} bytes ({pages} x 2 MiB) on hugepages: {source}; reserve them first, e.g. \
         `echo {pages} > /proc/sys/vm/nr_hugepages` (as root), or disable hugepages for this bdev"
    )]
    Hugepages {
        len: usize,
        pages: usize,
        source: std::io::Error,
    },
    #[error("region length must be > 0")]
    Empty,
    #[error("range {offset}+{len} is outside the region of {region_len} bytes")]
    OutOfRange {
        offset: usize,
        len: usize,
        region_len: usize,
    },
}

/// How to back a [`Region`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Normal 4 KiB pages, faulted in on first touch (untouched pages read as zero).
    Pages,
    /// 2 MiB hugetlb pages, all reserved and faulted in at creation (`MAP_POPULATE`), so a
    /// shortage shows up as an error now, not as a SIGBUS on the data path later.
    Hugepages,
}

/// An anonymous, private, zero-initialised memory mapping. See the module docs for the rule on
/// concurrent access.
pub struct Region {
    ptr: NonNull<u8>,
    /// Bytes usable by callers.
    len: usize,
    /// Bytes actually mapped (`len` rounded up to the page size in use).
    map_len: usize,
    backing: Backing,
}

// SAFETY: a Region uniquely owns its mapping; it is only ever accessed through raw-pointer copies
// of bounds-checked ranges (no references into the mapping), so sending it to another thread
// cannot create aliasing references.
unsafe impl Send for Region {}
// SAFETY: shared access only performs bounds-checked raw-pointer byte copies into/out of plain
// `u8` memory that lives as long as the Region; no `&`/`&mut` to the mapped bytes is ever
// created, so no access dangles and no reference aliasing rule is broken. Concurrent copies
// that overlap (one of them a write) are NOT made sound by this: they are a data race, undefined
// behaviour in Rust's memory model, accepted knowingly for the RAM disks' copy speed (module
// docs, "Concurrent access rule": in practice unspecified bytes in the overlap, as on a disk).
unsafe impl Sync for Region {}

/// `MADV_POPULATE_WRITE` (Linux 5.14+; not in every libc crate version).
const MADV_POPULATE_WRITE: libc::c_int = 23;

impl Region {
    /// Maps `len` zeroed bytes with the given backing.
    pub fn new(len: usize, backing: Backing) -> Result<Self, MemError> {
        if len == 0 {
            return Err(MemError::Empty);
        }
        let page = match backing {
            Backing::Pages => page_size(),
            Backing::Hugepages => HUGEPAGE_SIZE,
        };
        let map_len = len.checked_next_multiple_of(page).ok_or(MemError::Map {
            len,
            source: std::io::Error::from_raw_os_error(libc::ENOMEM),
        })?;
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        if backing == Backing::Hugepages {
            // Hugetlb pages are reserved at mmap time anyway; NORESERVE would defer the failure.
            flags =
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_POPULATE;
        }
        // SAFETY: an anonymous mapping at a kernel-chosen address touches no existing memory; the
        // arguments are plain values and the result is checked for MAP_FAILED below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            let source = std::io::Error::last_os_error();
            return Err(match backing {
                Backing::Pages => MemError::Map { len, source },
                Backing::Hugepages => MemError::Hugepages {
                    len,
                    pages: map_len / HUGEPAGE_SIZE,
                    source,
                },
            });
        }
        if backing == Backing::Pages {
            // Transparent hugepages (best effort; THP may be off) cut TLB misses for random access
            // over a large disk. The advice must come before the first touch to take effect.
            // SAFETY: advice on a mapping we just created and own; no memory is accessed.
            let _ = unsafe { libc::madvise(raw, map_len, libc::MADV_HUGEPAGE) };
            // Back the whole region now, as SPDK's malloc bdev does: no page faults on the data
            // path and no late out-of-memory surprise under load.
            // SAFETY: as above; MADV_POPULATE_WRITE (Linux 5.14) only faults pages in.
            let populated = unsafe { libc::madvise(raw, map_len, MADV_POPULATE_WRITE) } == 0;
            if !populated {
                let base = raw.cast::<u8>();
                for off in (0..map_len).step_by(page) {
                    // SAFETY: off < map_len, inside our fresh private mapping, which no one else
                    // references yet; writing the zero it already holds faults the page in.
                    unsafe { std::ptr::write_volatile(base.add(off), 0) };
                }
            }
        }
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or(MemError::Map {
            len,
            source: std::io::Error::from_raw_os_error(libc::ENOMEM),
        })?;
        Ok(Region {
            ptr,
            len,
            map_len,
            backing,
        })
    }

    /// Start of the mapping. Only for raw copies under the module's concurrency rule.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a region has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), MemError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(MemError::OutOfRange {
                offset,
                len,
                region_len: self.len,
            }),
        }
    }

    /// Copies `dst.len()` bytes starting at `offset` out of the region.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
        self.check(offset, dst.len())?;
        // SAFETY: offset..offset+dst.len() is inside the mapping (checked above) and the mapping
        // lives as long as `self`; `dst` is a distinct allocation (it cannot point into the
        // region, which never hands out references), so the ranges do not overlap. A concurrent
        // write to the same range would be a data race (undefined behaviour in Rust's model);
        // that is the accepted risk the module docs describe, not something ruled out here.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
        Ok(())
    }

    /// Copies `src` into the region starting at `offset`.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Result<(), MemError> {
        self.check(offset, src.len())?;
        // SAFETY: as in `read_at`: in-bounds destination inside our live mapping, a source that is
        // not part of the region, raw copy without creating references to the shared bytes. A
        // concurrent overlapping access is a data race (see the module docs).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(offset), src.len())
        };
        Ok(())
    }

    /// Starts fetching the cache lines of `[offset, offset + len)` for writing (x86 `prefetchw`),
    /// so that a [`Region::write_at`] issued a little later finds them in cache. Only a hint:
    /// out-of-range parts are ignored and nothing is read or written.
    #[inline]
    pub fn prefetch_for_write(&self, offset: usize, len: usize) {
        if self.check(offset, len).is_err() {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
            let base = self.ptr.as_ptr() as usize + offset;
            // One prefetch per 128 bytes: the L2's adjacent-line prefetch fetches the other
            // half of each 128-byte pair. Measured on Zen 5 (4 KiB encrypted random writes to
            // a 1 GiB malloc, interleaved runs): the crypto bdev's cost over the cipher was
            // 1.03-1.10x the kernel with this stride, 1.15-1.24x with a prefetch per line
            // (twice the instructions, and more misses queued than the core can track).
            const STRIDE: usize = 128;
            let mut line = base & !(STRIDE - 1);
            while line < base + len {
                // SAFETY: a prefetch never faults and has no architectural effect; the address
                // is inside our live mapping, or at most 64 bytes before `offset` within the
                // same 128-byte pair (still inside the mapping, which is page aligned).
                unsafe { _mm_prefetch::<_MM_HINT_ET0>(line as *const i8) };
                line += STRIDE;
            }
        }
    }

    /// Sets `len` bytes starting at `offset` to zero. Whole 4 KiB pages inside a large range of a
    /// [`Backing::Pages`] region are given back to the kernel (`MADV_DONTNEED`: they read back as
    /// zero and stop using memory), the rest is cleared with `memset`.
    pub fn zero(&self, offset: usize, len: usize) -> Result<(), MemError> {
        self.check(offset, len)?;
        let base = self.ptr.as_ptr() as usize;
        let page = page_size();
        // Below this size a memset is cheaper than the madvise syscall and its page faults.
        const MADVISE_MIN_BYTES: usize = 1 << 20;
        if self.backing == Backing::Pages && len >= MADVISE_MIN_BYTES {
            let start = base + offset;
            let end = start + len;
            let inner_start = start.next_multiple_of(page);
            let inner_end = end - end % page;
            if inner_end > inner_start {
                // SAFETY: [inner_start, inner_end) is page aligned and inside our private
                // anonymous mapping (within offset..offset+len, checked); MADV_DONTNEED on such
                // memory only makes those pages read back as zero. No references exist into it.
                let rc = unsafe {
                    libc::madvise(
                        inner_start as *mut libc::c_void,
                        inner_end - inner_start,
                        libc::MADV_DONTNEED,
                    )
                };
                if rc == 0 {
                    self.memset_zero(offset, inner_start - start);
                    self.memset_zero(inner_end - base, end - inner_end);
                    return Ok(());
                }
            }
        }
        self.memset_zero(offset, len);
        Ok(())
    }

    /// `memset(0)` of a range the caller has bounds-checked.
    fn memset_zero(&self, offset: usize, len: usize) {
        debug_assert!(offset + len <= self.len);
        // SAFETY: callers pass a range inside the mapping (checked by `zero`); a raw write_bytes
        // creates no reference to the shared bytes.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(offset), 0, len) };
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: ptr/map_len are exactly what mmap returned; after drop nothing can reach the
        // mapping (every user held a borrow of or an Arc to this Region).
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
        debug_assert_eq!(rc, 0, "munmap failed");
    }
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("len", &self.len)
            .field("backing", &self.backing)
            .finish()
    }
}

/// The system page size (4 KiB on the targets nvseal runs on).
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as usize
    } else {
        4096
    }
}

/// Free hugepages of the default size, from `/proc/meminfo` (`HugePages_Free`); 0 if unknown.
pub fn hugepages_free() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("HugePages_Free:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_zero_roundtrip() {
        let r = Region::new(3 << 20, Backing::Pages).unwrap();
        assert_eq!(r.len(), 3 << 20);
        let mut got = vec![0xffu8; 4096];
        r.read_at(0, &mut got).unwrap();
        assert!(got.iter().all(|&b| b == 0), "fresh region must read zero");

        let pat: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        r.write_at(12345, &pat).unwrap();
        let mut back = vec![0u8; 8192];
        r.read_at(12345, &mut back).unwrap();
        assert_eq!(back, pat);

        // Large zero (madvise path) with unaligned ends, surrounded by data that must survive.
        let fill = vec![0xabu8; 3 << 20];
        r.write_at(0, &fill).unwrap();
        r.zero(100, (2 << 20) + 5000).unwrap();
        let mut all = vec![0u8; 3 << 20];
        r.read_at(0, &mut all).unwrap();
        let end = 100 + (2 << 20) + 5000;
        assert!(all[..100].iter().all(|&b| b == 0xab));
        assert!(all[100..end].iter().all(|&b| b == 0));
        assert!(all[end..].iter().all(|&b| b == 0xab));

        // Small zero (memset path).
        r.zero(10, 20).unwrap();
        let mut s = [0u8; 40];
        r.read_at(0, &mut s).unwrap();
        assert!(s[10..30].iter().all(|&b| b == 0) && s[..10].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn out_of_range_is_an_error() {
        let r = Region::new(4096, Backing::Pages).unwrap();
        let mut b = [0u8; 16];
        assert!(matches!(
            r.read_at(4090, &mut b),
            Err(MemError::OutOfRange { .. })
        ));
        assert!(matches!(
            r.write_at(usize::MAX, &b),
            Err(MemError::OutOfRange { .. })
        ));
        assert!(matches!(
            r.zero(1, usize::MAX),
            Err(MemError::OutOfRange { .. })
        ));
        assert!(r.read_at(4080, &mut b).is_ok());
        assert!(matches!(
            Region::new(0, Backing::Pages),
            Err(MemError::Empty)
        ));
    }

    #[test]
    fn hugepage_region_when_available() {
        let need = 2;
        if hugepages_free() < need {
            println!("skip: HugePages_Free < {need} (reserve with `echo 64 > /proc/sys/vm/nr_hugepages`)");
            return;
        }
        let r = match Region::new(HUGEPAGE_SIZE + 1, Backing::Hugepages) {
            Ok(r) => r,
            Err(e @ MemError::Hugepages { .. }) if hugepages_free() < need => {
                println!("skip: another process took the free hugepages ({e})");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(r.as_ptr() as usize % HUGEPAGE_SIZE, 0);
        r.write_at(HUGEPAGE_SIZE - 2, &[1, 2, 3]).unwrap();
        let mut b = [0u8; 3];
        r.read_at(HUGEPAGE_SIZE - 2, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
    }

    #[test]
    fn concurrent_disjoint_writers() {
        let r = std::sync::Arc::new(Region::new(1 << 20, Backing::Pages).unwrap());
        let hs: Vec<_> = (0..4u8)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    let buf = vec![t + 1; 4096];
                    for i in 0..64usize {
                        r.write_at((i * 4 + usize::from(t)) * 4096, &buf).unwrap();
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        let mut b = vec![0u8; 4096];
        for blk in 0..256usize {
            r.read_at(blk * 4096, &mut b).unwrap();
            assert!(b.iter().all(|&x| usize::from(x) == blk % 4 + 1));
        }
    }
}
