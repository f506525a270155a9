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
//!
//! A failed `mlock` (usually `RLIMIT_MEMLOCK` without `CAP_IPC_LOCK`) is governed by one
//! process-wide policy, [`set_allow_unlocked`]: by default it is refused — [`LockedBox::try_new`]
//! returns [`LockError::NotLocked`], and the key manager checks with [`probe`] at start-up so
//! that a serve that cannot lock its keys fails to start instead of running with keys that may
//! be swapped out. When unlocked memory is explicitly allowed (`keys.allow_unlocked_memory`),
//! a failure is logged (once per process) and the value stays usable (still wiped on drop).
//! [`LockedBox::new`] is the best-effort form for short-lived secrets (a KEK during one unwrap).
//!
//! [`scrub_stack`] overwrites the stack below the caller, for the temporaries of a key expansion
//! that the compiler may have left there.

use std::alloc::{self, Layout};
use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use zeroize::Zeroize;

/// Set after the first failed `mlock` was logged, so the warning is printed once per process.
static MLOCK_WARNED: AtomicBool = AtomicBool::new(false);

/// Whether [`LockedBox::try_new`] accepts memory that could not be locked (default: no).
static ALLOW_UNLOCKED: AtomicBool = AtomicBool::new(false);

/// Sets the process-wide policy for a failed `mlock`: `true` logs it and goes on, `false` (the
/// default) makes [`LockedBox::try_new`] fail. Set once at start-up from the configuration.
pub fn set_allow_unlocked(allow: bool) {
    ALLOW_UNLOCKED.store(allow, Ordering::Relaxed);
}

/// The current policy (see [`set_allow_unlocked`]).
pub fn unlocked_allowed() -> bool {
    ALLOW_UNLOCKED.load(Ordering::Relaxed)
}

/// Why a [`LockedBox::try_new`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The allocator failed (or the type needs more than page alignment).
    #[error("out of memory for key material")]
    OutOfMemory,
    /// `mlock` failed and unlocked key memory is not allowed.
    #[error(
        "cannot lock key memory in RAM (mlock: {0}); raise RLIMIT_MEMLOCK (`ulimit -l`, \
         systemd LimitMEMLOCK=) or grant CAP_IPC_LOCK, or allow keys that may be swapped out \
         with keys.allow_unlocked_memory: true"
    )]
    NotLocked(std::io::Error),
}

/// Checks that this process can lock memory now: locks and unlocks one page. Start-up calls it
/// so that a missing `RLIMIT_MEMLOCK` shows up before any key exists.
pub fn probe() -> Result<(), LockError> {
    let page = page_size();
    let layout = Layout::from_size_align(page, page).map_err(|_| LockError::OutOfMemory)?;
    // SAFETY: the layout has a non-zero size.
    let raw = unsafe { alloc::alloc_zeroed(layout) };
    if raw.is_null() {
        return Err(LockError::OutOfMemory);
    }
    // SAFETY: [raw, raw + page) is our own live allocation; mlock only changes residency.
    let result = if unsafe { libc::mlock(raw.cast(), page) } == 0 {
        // SAFETY: the range locked just above.
        let _ = unsafe { libc::munlock(raw.cast(), page) };
        Ok(())
    } else {
        Err(LockError::NotLocked(std::io::Error::last_os_error()))
    };
    // SAFETY: allocated above with exactly this layout and not freed before.
    unsafe { alloc::dealloc(raw, layout) };
    result
}

/// Bytes [`scrub_stack`] overwrites: more than the deepest key expansion uses (the `aes` crate's
/// bit-sliced schedule and the AES-NI expansion take well under 8 KiB of stack).
pub const SCRUB_STACK_BYTES: usize = 16 * 1024;

/// Overwrites [`SCRUB_STACK_BYTES`] of stack below the caller's frame with zeros, with volatile
/// writes the compiler cannot drop. The frames of functions the caller called before (a key
/// expansion) lay in that range, so whatever temporaries they left there are gone. Control
/// threads only (costs a few microseconds); never on the data path.
#[inline(never)]
pub fn scrub_stack() {
    let mut area = std::mem::MaybeUninit::<[u8; SCRUB_STACK_BYTES]>::uninit();
    let p = area.as_mut_ptr().cast::<u8>();
    for i in 0..SCRUB_STACK_BYTES {
        // SAFETY: `p + i` lies inside the local `area` (i < its size); writing a u8 into
        // uninitialised memory is allowed.
        unsafe { p.add(i).write_volatile(0) };
    }
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
    std::hint::black_box(&area);
}

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
    /// Moves `value` into a fresh locked allocation, best effort: a failed `mlock` is logged
    /// (once per process) and the value is kept in unlocked memory. Returns `None` only if the
    /// allocator fails (or `T` needs more than page alignment). For long-lived keys use
    /// [`LockedBox::try_new`], which follows the process policy. To keep the secret from
    /// lingering in a moved-from stack slot, pass a zeroed value and fill it in place through
    /// [`DerefMut`](std::ops::DerefMut).
    pub fn new(value: T) -> Option<Self> {
        let (b, err) = Self::alloc(value)?;
        if let Some(err) = err {
            warn_unlocked(&err);
        }
        Some(b)
    }

    /// Moves `value` into a fresh locked allocation. If `mlock` fails, this is an error
    /// ([`LockError::NotLocked`]; the value is wiped and freed) unless unlocked memory is allowed
    /// ([`set_allow_unlocked`]), in which case the failure is logged (once per process).
    pub fn try_new(value: T) -> Result<Self, LockError> {
        let (b, err) = Self::alloc(value).ok_or(LockError::OutOfMemory)?;
        match err {
            None => Ok(b),
            Some(err) if unlocked_allowed() => {
                warn_unlocked(&err);
                Ok(b)
            }
            Some(err) => Err(LockError::NotLocked(err)),
        }
    }

    /// Builds the value inside a fresh locked allocation instead of moving it in: `init` gets
    /// the (zeroed) slot and must return the reference [`MaybeUninit::write`] gave back. The
    /// value is thus written straight into the locked page (where the compiler builds it in
    /// place, which it does for a `write` of a call's result it can see through; callers that
    /// expand keys also call [`scrub_stack`]). `mlock` policy as for [`LockedBox::try_new`].
    ///
    /// If `init` returns a reference to anything but the slot, the slot may be uninitialised:
    /// the process aborts rather than use it.
    pub fn try_new_with(
        init: impl for<'a> FnOnce(&'a mut MaybeUninit<T>) -> &'a mut T,
    ) -> Result<Self, LockError> {
        let (mut slot, err) = LockedBox::<MaybeUninit<T>>::alloc(MaybeUninit::uninit())
            .ok_or(LockError::OutOfMemory)?;
        let slot_ptr: *mut MaybeUninit<T> = &mut *slot;
        let written: *mut T = init(&mut slot);
        if !std::ptr::eq(written, slot_ptr.cast::<T>()) {
            std::process::abort();
        }
        let (ptr, layout, locked) = (slot.ptr.cast::<T>(), slot.layout, slot.locked);
        // The T is initialised now; the MaybeUninit box must not free it (its drop would wipe
        // and free the allocation that the new box takes over).
        std::mem::forget(slot);
        let b = LockedBox {
            ptr,
            layout,
            locked,
        };
        match err {
            None => Ok(b),
            Some(err) if unlocked_allowed() => {
                warn_unlocked(&err);
                Ok(b)
            }
            Some(err) => Err(LockError::NotLocked(err)),
        }
    }

    /// The allocation, and the error of `mlock` if it failed.
    fn alloc(value: T) -> Option<(Self, Option<std::io::Error>)> {
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
        let err = (!locked).then(std::io::Error::last_os_error);
        // SAFETY: as above; MADV_DONTDUMP only excludes the range from core dumps. Its failure
        // (old kernels) is harmless and ignored.
        let _ = unsafe { libc::madvise(raw.cast(), size, libc::MADV_DONTDUMP) };
        Some((
            LockedBox {
                ptr,
                layout,
                locked,
            },
            err,
        ))
    }

    /// Whether the pages are actually locked (mlock succeeded).
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

fn warn_unlocked(err: &std::io::Error) {
    if !MLOCK_WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            error = %err,
            "mlock of key memory failed (raise RLIMIT_MEMLOCK / ulimit -l); keys may be swapped out"
        );
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
