//! The only home of OS `unsafe` (besides the XTS kernels): every `unsafe` block here carries a
//! `// SAFETY:` line and the rest of the crate uses the safe wrappers.
//!
//! * [`buf`] — aligned heap buffers for I/O.
//! * [`mem`] — large anonymous mappings, optionally on hugepages, and `mlock`.
//! * [`affinity`] — pinning a thread to a CPU.
//! * [`clock`] — a cheap monotonic cycle clock for per-I/O latency.
//! * [`epoll`] — non-blocking, edge-triggered socket readiness for reactors.
//! * [`uring`] — the io_uring wrapper used by the uring bdev.

pub mod affinity;
pub mod buf;
pub mod clock;
pub mod epoll;
pub mod mem;
pub mod mlock;
pub mod process;
pub mod uring;
pub mod usage;
