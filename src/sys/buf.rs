//! Aligned heap buffers. An [`AlignedBuf`] owns `capacity` bytes aligned to a power of two; it is
//! `Send` (plain owned memory) so pools can be built on a control thread and moved to a reactor.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Owned, zero-initialised, aligned memory.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
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
        NonNull::new(raw).map(|ptr| AlignedBuf { ptr, layout })
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
        // SAFETY: ptr was returned by alloc_zeroed with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
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
