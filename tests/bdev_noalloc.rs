//! Proves the bdev data path allocates nothing after start-up: a counting global allocator
//! (per thread, so the test harness's own threads do not interfere) watches steady-state
//! submit/poll loops on the null, malloc and uring backends.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use nvseal::bdev::malloc::{self, MallocConfig};
use nvseal::bdev::null::{self, NullConfig};
use nvseal::bdev::uring::{self, UringConfig};
use nvseal::bdev::{Bdev, BdevChannel, BdevIo, BufPool, IoStatus, IoType, Submit};
use nvseal::types::CoreId;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call unchanged to the system allocator; the counter is a const-initialised
// thread-local Cell, which needs no allocation to access.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

/// Keeps `depth` I/Os in flight for `rounds` completions, mixing reads, writes and the other
/// types; buffers cycle through a pool. Returns how many I/Os completed.
fn drive(
    ch: &mut dyn BdevChannel,
    pool: &mut BufPool,
    bs: usize,
    blocks: u64,
    depth: usize,
    rounds: usize,
) -> usize {
    let mut completed = 0usize;
    let mut issued = 0usize;
    let mut parked: Option<BdevIo> = None;
    let mut bufs_back: [Option<nvseal::bdev::IoBuf>; 64] = std::array::from_fn(|_| None);
    while completed < rounds {
        while ch.in_flight() < depth && issued < rounds {
            let io = match parked.take() {
                Some(io) => io,
                None => {
                    let kind = match issued % 8 {
                        0..=3 => IoType::Read,
                        4..=6 => IoType::Write,
                        _ => IoType::WriteZeroes,
                    };
                    let lba = (issued as u64 * 7) % (blocks - 1);
                    let buf = if kind.has_data() { pool.get(bs) } else { None };
                    BdevIo::new(kind, lba, 1, buf, issued as u64)
                }
            };
            match ch.submit(io) {
                Submit::Queued => issued += 1,
                Submit::Busy(io) => {
                    parked = Some(io);
                    break;
                }
            }
        }
        let mut n = 0usize;
        ch.poll(&mut |mut io| {
            assert_eq!(io.status, IoStatus::Success, "I/O {} failed", io.ctx);
            if let Some(b) = io.buf.take() {
                bufs_back[n] = Some(b);
                n += 1;
            }
            completed += 1;
        });
        for slot in bufs_back.iter_mut().take(n) {
            if let Some(b) = slot.take() {
                pool.put(b);
            }
        }
    }
    completed
}

fn check(name: &str, b: &dyn Bdev, depth: usize) {
    let bs = b.block_size() as usize;
    let mut ch = b.open_channel(CoreId(0), depth).unwrap();
    let mut pool = BufPool::new(depth, bs, b.buf_align()).unwrap();
    // Warm-up: first use of the channel, the pool and any lazy runtime state.
    drive(ch.as_mut(), &mut pool, bs, b.num_blocks(), depth, 2000);
    let before = allocs();
    let done = drive(ch.as_mut(), &mut pool, bs, b.num_blocks(), depth, 20_000);
    let after = allocs();
    assert_eq!(done, 20_000);
    assert_eq!(
        after - before,
        0,
        "{name}: {} allocations in 20000 steady-state I/Os",
        after - before
    );
    assert_eq!(pool.available(), depth, "{name}: buffers lost");
}

#[test]
fn steady_state_submit_poll_allocates_nothing() {
    let n = null::open(&NullConfig {
        name: "n".into(),
        num_blocks: Some(1 << 20),
        size_bytes: None,
        block_size: 4096,
    })
    .unwrap();
    check("null", n.as_ref(), 32);

    let m = malloc::open(&MallocConfig {
        name: "m".into(),
        num_blocks: Some(1024),
        size_bytes: None,
        block_size: 4096,
        hugepages: false,
    })
    .unwrap();
    check("malloc", m.as_ref(), 32);

    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let u = uring::open(&UringConfig {
        name: "u".into(),
        path: dir.path().join("noalloc.img"),
        block_size: 4096,
        direct: true,
        size_bytes: Some(4 << 20),
    })
    .unwrap();
    check("uring", u.as_ref(), 32);
}

#[test]
fn the_counter_sees_allocations() {
    let before = allocs();
    let v = std::hint::black_box(vec![1u8; 100]);
    assert!(allocs() > before, "counting allocator is not installed");
    drop(v);
}
