//! Page-locked, wipe-on-drop storage for secrets (keys and expanded round keys).
//!
//! [`LockedBox<T>`] owns a value in its own page-aligned heap allocation that is `mlock`ed (kept
//! out of swap) and marked `MADV_DONTDUMP` (kept out of core dumps), both best effort. On drop the
//! value is dropped, every byte of the allocation is overwritten with zeroes (volatile writes that
//! the compiler cannot elide) and the pages are unlocked.
//!
//! Why one allocation per secret: `mlock` does not nest. If two secrets shared a page, unlocking
//! one would silently unlock the other. A whole page per key is cheap (there are a handful of
//! keys per process) and makes lock/unlock exact.
//!
//! Created and dropped on control threads (key setup); reactors only read through `&T`.
//! A failed `mlock` (usually `RLIMIT_MEMLOCK`) is not fatal: it is logged once per process with
//! `tracing::warn!` and the value stays usable (and is still wiped on drop).

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use zeroize::Zeroize;

/// Set after the first failed `mlock` was logged, so the warning is printed once per process.
static MLOCK_WARNED: AtomicBool = AtomicBool::new(false);

/// The system page size (falls back to 4 KiB if `sysconf` fails, which it does not on Linux).
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let raw = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(raw)
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}

/// A `T` in its own page-aligned, `mlock`ed allocation, zeroed on drop. See the module docs.
pub struct LockedBox<T> {
    ptr: NonNull<T>,
    layout: Layout,
    locked: bool,
}

// SAFETY: LockedBox uniquely owns its allocation like Box<T>; sending it sends the T.
unsafe impl<T: Send> Send for LockedBox<T> {}
// SAFETY: `&LockedBox<T>` only hands out `&T`.
unsafe impl<T: Sync> Sync for LockedBox<T> {}

impl<T> LockedBox<T> {
    /// Moves `value` into a fresh locked allocation. Returns `None` only if the allocator fails
    /// (or `T` needs more than page alignment). To keep the secret from lingering in a moved-from
    /// stack slot, pass a zeroed value and fill it in place through [`DerefMut`](std::ops::DerefMut).
    pub fn new(value: T) -> Option<Self> {
        let page = page_size();
        if std::mem::align_of::<T>() > page {
            return None;
        }
        let size = std::mem::size_of::<T>()
            .max(1)
            .checked_next_multiple_of(page)?;
        let layout = Layout::from_size_align(size, page).ok()?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw.cast::<T>())?;
        // SAFETY: ptr is freshly allocated, page-aligned (>= align_of::<T>()) and at least
        // size_of::<T>() bytes long; writing does not drop the (zeroed) previous contents.
        unsafe { ptr.as_ptr().write(value) };
        // SAFETY: [raw, raw + size) is our own live allocation; mlock only changes residency.
        let locked = unsafe { libc::mlock(raw.cast(), size) } == 0;
        if !locked {
            let err = std::io::Error::last_os_error();
            if !MLOCK_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    error = %err,
                    "mlock of key memory failed (raise RLIMIT_MEMLOCK / ulimit -l); keys may be swapped out"
                );
            }
        }
        // SAFETY: as above; MADV_DONTDUMP only excludes the range from core dumps. Its failure
        // (old kernels) is harmless and ignored.
        let _ = unsafe { libc::madvise(raw.cast(), size, libc::MADV_DONTDUMP) };
        Some(LockedBox {
            ptr,
            layout,
            locked,
        })
    }

    /// Whether the pages are actually locked (mlock succeeded).
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl<T> std::ops::Deref for LockedBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: ptr holds an initialised T for as long as self lives.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> std::ops::DerefMut for LockedBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in deref, and `&mut self` guarantees unique access.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for LockedBox<T> {
    fn drop(&mut self) {
        let raw = self.ptr.as_ptr().cast::<u8>();
        let size = self.layout.size();
        // SAFETY: the T is initialised and dropped exactly once, here.
        unsafe { std::ptr::drop_in_place(self.ptr.as_ptr()) };
        // SAFETY: [raw, raw + size) is our allocation; after drop_in_place its bytes are plain
        // memory we may overwrite (u8 has no invalid values).
        let bytes = unsafe { std::slice::from_raw_parts_mut(raw, size) };
        bytes.zeroize();
        if self.locked {
            // SAFETY: same range we locked in `new`; failure only means it stays resident.
            let _ = unsafe { libc::munlock(raw.cast(), size) };
        }
        // SAFETY: allocated in `new` with exactly this layout and not freed before.
        unsafe { alloc::dealloc(raw, self.layout) };
    }
}

/// A locked, zeroed-on-drop copy of `src` (key bytes). Aborts like `Box::new` if the allocator
/// fails: key material never falls back to unlocked memory silently.
pub fn locked_copy<const N: usize>(src: &[u8; N]) -> LockedBox<[u8; N]> {
    let Some(mut b) = LockedBox::new([0u8; N]) else {
        let page = page_size();
        // The layout is valid (page is a power of two); only allocation can fail here.
        std::alloc::handle_alloc_error(
            std::alloc::Layout::from_size_align(N.max(1).next_multiple_of(page), page)
                .unwrap_or(std::alloc::Layout::new::<u8>()),
        );
    };
    b.copy_from_slice(src);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_value_page_aligned_and_mutable() {
        let mut b = LockedBox::new([0u8; 64]).expect("alloc");
        assert_eq!((&*b as *const [u8; 64] as usize) % page_size(), 0);
        b[3] = 7;
        assert_eq!(b[3], 7);
        assert!(b
            .iter()
            .enumerate()
            .all(|(i, &v)| if i == 3 { v == 7 } else { v == 0 }));
    }

    #[test]
    fn drops_inner_value() {
        use std::rc::Rc;
        let rc = Rc::new(5u32);
        let b = LockedBox::new(Rc::clone(&rc)).expect("alloc");
        assert_eq!(Rc::strong_count(&rc), 2);
        drop(b);
        assert_eq!(Rc::strong_count(&rc), 1);
    }
}
