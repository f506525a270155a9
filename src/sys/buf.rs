//! Aligned heap buffers. An [`AlignedBuf`] owns `capacity` bytes aligned to a power of two; it is
//! `Send` (plain owned memory) so pools can be built on a control thread and moved to a reactor.
//!
//! Buffers that carry I/O data ([`AlignedBuf::for_io`]) come from the process's I/O allocator
//! when one is installed ([`set_io_allocator`]: SPDK's DMA-able memory, once a `spdk_nvme` bdev
//! has started SPDK's environment), so a PCIe drive can DMA straight into them; otherwise, and
//! whenever that allocator is out of memory, from the heap.

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::OnceLock;

/// A source of I/O buffer memory other than the heap.
pub trait IoAllocator: Sync {
    /// `size` zeroed bytes aligned to `align` (a power of two), or `None`.
    fn alloc_zeroed(&self, size: usize, align: usize) -> Option<*mut u8>;
    /// Frees memory from [`IoAllocator::alloc_zeroed`].
    ///
    /// # Safety
    /// `ptr` came from this allocator's `alloc_zeroed` and is not used or freed again.
    unsafe fn free(&self, ptr: *mut u8);
}

static IO_ALLOCATOR: OnceLock<&'static dyn IoAllocator> = OnceLock::new();

/// Installs the allocator [`AlignedBuf::for_io`] uses from now on (once per process; a second
/// call is ignored).
pub fn set_io_allocator(a: &'static dyn IoAllocator) {
    let _ = IO_ALLOCATOR.set(a);
}

/// Owned, zero-initialised, aligned memory.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
    /// Where the memory came from when not the heap.
    from: Option<&'static dyn IoAllocator>,
}

// SAFETY: AlignedBuf uniquely owns its allocation (like Box<[u8]>); moving it between threads
// moves that ownership. Shared references only give `&[u8]`.
unsafe impl Send for AlignedBuf {}
// SAFETY: `&AlignedBuf` only allows reads of initialised bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `capacity` zeroed bytes aligned to `align`; `None` if the size/alignment is
    /// invalid or the allocator fails. A zero capacity is rounded up to one alignment unit.
    pub fn zeroed(capacity: usize, align: usize) -> Option<Self> {
        let layout = Layout::from_size_align(capacity.max(align), align).ok()?;
        // SAFETY: the layout has a non-zero size (max with align ≥ 1).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        NonNull::new(raw).map(|ptr| AlignedBuf {
            ptr,
            layout,
            from: None,
        })
    }
    /// Like [`AlignedBuf::zeroed`], for a buffer that carries I/O data: from the installed
    /// [`IoAllocator`] if there is one and it has room, else from the heap.
    pub fn for_io(capacity: usize, align: usize) -> Option<Self> {
        let layout = Layout::from_size_align(capacity.max(align), align).ok()?;
        if let Some(a) = IO_ALLOCATOR.get() {
            if let Some(ptr) = a
                .alloc_zeroed(layout.size(), layout.align())
                .and_then(NonNull::new)
            {
                return Some(AlignedBuf {
                    ptr,
                    layout,
                    from: Some(*a),
                });
            }
        }
        Self::zeroed(capacity, align)
    }
    /// Whether the memory came from the installed [`IoAllocator`] (not the heap).
    pub fn is_io_memory(&self) -> bool {
        self.from.is_some()
    }
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }
    pub fn align(&self) -> usize {
        self.layout.align()
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() initialised bytes (alloc_zeroed) for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` guarantees unique access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        match self.from {
            // SAFETY: ptr came from this allocator's alloc_zeroed (`for_io`) and is freed once.
            Some(a) => unsafe { a.free(self.ptr.as_ptr()) },
            // SAFETY: ptr was returned by alloc_zeroed with exactly this layout and is freed once.
            None => unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_and_zeroing() {
        for align in [64usize, 512, 4096] {
            let mut b = AlignedBuf::zeroed(8192, align).unwrap();
            assert_eq!(b.as_mut_ptr() as usize % align, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice()[8191] = 7;
            assert_eq!(b.as_slice()[8191], 7);
        }
        assert!(
            AlignedBuf::zeroed(4096, 3).is_none(),
            "non-power-of-two alignment must fail"
        );
    }
}
