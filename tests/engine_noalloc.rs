//! The whole engine data path allocates nothing in steady state: a bdevperf job (the same poller
//! the reactors run) driving the crypto bdev over malloc, over null, and plaintext malloc, with
//! reads, writes and verify, watched by a per-thread counting allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use nvseal::bdev::malloc::{self, MallocConfig};
use nvseal::bdev::null::{self, NullConfig};
use nvseal::bdev::Bdev;
use nvseal::crypto::bdev::{CryptoBdev, DataKey};
use nvseal::crypto::key::XtsKey;
use nvseal::reactor::Poller;
use nvseal::tools::bdevperf::{Job, JobSpec, Until, Workload};
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

fn malloc_bdev(name: &str) -> Arc<dyn Bdev> {
    let cfg: MallocConfig = serde_yaml_ng::from_str(&format!(
        "name: {name}\nsize_bytes: 16777216\nblock_size: 4096\n"
    ))
    .unwrap();
    malloc::open(&cfg).unwrap()
}

fn crypto_over(base: Arc<dyn Bdev>) -> Arc<dyn Bdev> {
    let key = DataKey::new(&XtsKey::generate().unwrap(), None).unwrap();
    Arc::new(CryptoBdev::new("enc", base, key, false).unwrap())
}

/// Runs a job on this thread: `warm` polls, then counts allocations over `measured` polls.
fn steady_state_allocs(
    bdev: &Arc<dyn Bdev>,
    raw: Option<&Arc<dyn Bdev>>,
    workload: Workload,
    verify: bool,
) -> (u64, u64) {
    let spec = JobSpec {
        workload,
        rwmixread: 50,
        io_size: 8192,
        queue_depth: 16,
        verify,
        seed: 3,
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    let progress = Arc::new(AtomicU64::new(0));
    let mut job = Job::new(
        "t",
        bdev,
        raw,
        &spec,
        0,
        1,
        Until::Count(1 << 40),
        CoreId(0),
        progress.clone(),
        tx,
    )
    .unwrap();
    for _ in 0..1_000 {
        job.poll();
    }
    let before = allocs();
    let done_before = progress.load(std::sync::atomic::Ordering::Relaxed);
    for _ in 0..10_000 {
        job.poll();
    }
    let n = allocs() - before;
    let ios = progress.load(std::sync::atomic::Ordering::Relaxed) - done_before;
    drop(rx);
    (n, ios)
}

#[test]
fn counting_allocator_sees_allocations() {
    let before = allocs();
    let v: Vec<u8> = Vec::with_capacity(10);
    assert!(allocs() > before, "the counter must count");
    drop(v);
}

#[test]
fn steady_state_allocates_nothing() {
    let m = malloc_bdev("m0");
    let enc = crypto_over(m.clone());
    let nul: Arc<dyn Bdev> = null::open(
        &serde_yaml_ng::from_str::<NullConfig>("name: n0\nnum_blocks: 65536\nblock_size: 4096\n")
            .unwrap(),
    )
    .unwrap();
    let enc_null = crypto_over(nul.clone());
    type Case<'a> = (
        &'a str,
        &'a Arc<dyn Bdev>,
        Option<&'a Arc<dyn Bdev>>,
        Workload,
        bool,
    );
    let cases: Vec<Case> = vec![
        ("malloc randrw", &m, None, Workload::Randrw, false),
        ("crypto/malloc randrw", &enc, None, Workload::Randrw, false),
        (
            "crypto/malloc seq write",
            &enc,
            None,
            Workload::Write,
            false,
        ),
        (
            "crypto/malloc verify + raw check",
            &enc,
            Some(&m),
            Workload::Write,
            true,
        ),
        (
            "crypto/null randread",
            &enc_null,
            None,
            Workload::Randread,
            false,
        ),
    ];
    for (name, b, raw, w, verify) in cases {
        let (n, ios) = steady_state_allocs(b, raw, w, verify);
        assert!(ios > 500, "{name}: only {ios} I/Os completed");
        assert_eq!(n, 0, "{name}: {n} allocations in {ios} steady-state I/Os");
    }
}
