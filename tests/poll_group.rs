//! The per-reactor NVMe/TCP poll group (issue 12 items 4 and 5): connections placed on a real
//! reactor's [`PollGroup`] (as `nvseal serve` does), idle ones read only on readiness, busy ones
//! unaffected, connect/disconnect churn while I/O runs.

mod common;
use common::nvmf::*;

use nvseal::nvmf::{GroupStats, PollGroup};
use nvseal::reactor::{PollerId, ReactorCounters, ReactorOptions, ReactorSet};
use nvseal::tools::bdevperf::{JobSpec, Workload};
use nvseal::tools::nvmeperf::{self, PerfConfig, TargetSpec};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::AtomicU64;

/// Counts allocations process-wide (the steady-state test below reads it in a window).
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call unchanged to the system allocator; the counter is a static atomic,
// which needs no allocation to update.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
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

/// A target whose connections live on one real reactor's poll group; a plain thread accepts
/// and places them there by reactor message, like the server's accept poller.
struct GroupHarness {
    addr: SocketAddr,
    target: Arc<Target>,
    set: Option<ReactorSet>,
    group: PollerId,
    stats: Arc<GroupStats>,
    counters: Arc<ReactorCounters>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Drop for GroupHarness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.accept.take() {
            t.join().unwrap();
        }
        if let Some(s) = self.set.take() {
            s.shutdown();
        }
    }
}

impl GroupHarness {
    fn start(limits: Limits, bdevs: HashMap<String, Arc<dyn Bdev>>) -> GroupHarness {
        let cfg = test_subsystem(NQN, vec![HOST.into()], false, &[4420]);
        let target = Target::new(&[cfg], limits, &bdevs).unwrap();
        let (port, configured) = target.ports().next().unwrap();
        let mut listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        target.set_bound_port(configured, addr.port());
        let opts = ReactorOptions {
            pin: false,
            ..Default::default()
        };
        let set = ReactorSet::start(&[CoreId(0)], &opts).unwrap();
        let stats = Arc::new(GroupStats::default());
        let st = stats.clone();
        let group = set
            .call(0, move |r| {
                let g = PollGroup::new(r.core(), limits.reactor_channel_depth as usize, st);
                r.add_poller(Box::new(g.expect("epoll")))
            })
            .unwrap();
        let mailboxes = set.call(0, |r| r.mailboxes()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (t2, s2) = (target.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            while !s2.load(Ordering::Acquire) {
                let Some(s) = listener.poll_accept() else {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                };
                let t = t2.clone();
                mailboxes
                    .send(
                        0,
                        Box::new(move |r| {
                            if let Ok(c) = Connection::new(s, t, r.core(), port) {
                                let g = r.poller_as::<PollGroup>(group).expect("poll group");
                                assert!(g.add(c).is_ok(), "socket registration failed");
                            }
                        }),
                    )
                    .unwrap();
            }
        });
        let counters = set.counters(0);
        GroupHarness {
            addr,
            target,
            set: Some(set),
            group,
            stats,
            counters,
            stop,
            accept: Some(accept),
        }
    }

    fn admin(&self) -> HostQpair {
        let mut a = HostQpair::connect(
            self.addr,
            NQN,
            0,
            connect::CNTLID_DYNAMIC,
            host_cfg(Digests::default()),
        )
        .unwrap();
        a.enable().unwrap();
        a
    }

    fn io_queue(&self, a: &HostQpair, qid: u16) -> HostQpair {
        HostQpair::connect(
            self.addr,
            NQN,
            qid,
            a.cntlid(),
            host_cfg(Digests::default()),
        )
        .unwrap()
    }

    /// Connections the group owns, read on its reactor.
    fn group_len(&self) -> usize {
        let g = self.group;
        self.set
            .as_ref()
            .unwrap()
            .call(0, move |r| {
                r.poller_as::<PollGroup>(g).map_or(0, |p| p.len())
            })
            .unwrap()
    }

    fn iterations(&self) -> u64 {
        self.counters.iterations.load(Ordering::Relaxed)
    }

    /// Lets the reactor run at least `n` more loop iterations (progress, not time).
    fn spin(&self, n: u64) {
        let start = self.iterations();
        wait_until("reactor iterations", || self.iterations() >= start + n);
    }
}

fn ram_bdevs() -> HashMap<String, Arc<dyn Bdev>> {
    let mut bdevs: HashMap<String, Arc<dyn Bdev>> = HashMap::new();
    for (name, bs) in [("ram0", BS), ("ram1", 4096)] {
        bdevs.insert(
            name.into(),
            Arc::new(RamBdev {
                name: name.into(),
                block_size: bs,
                data: Arc::new(Mutex::new(vec![0; BLOCKS as usize * BS as usize])),
                busy_every: 0,
                hold: Arc::new(AtomicBool::new(false)),
            }),
        );
    }
    bdevs
}

/// Item 5: idle connections on a reactor cost no socket reads. 50 connected, enabled admin
/// queues sit idle while the reactor spins thousands of loop iterations: the count of reads that
/// found nothing (EAGAIN) must stay flat (with `recv` on every poll it grows by ~50 per
/// iteration). A busy queue on the same reactor keeps working meanwhile.
#[test]
fn idle_connections_cost_no_reads() {
    let h = GroupHarness::start(Limits::default(), ram_bdevs());
    let idle: Vec<HostQpair> = (0..50).map(|_| h.admin()).collect();
    let a = h.admin();
    let mut q = h.io_queue(&a, 1);
    wait_until("all queues placed", || h.group_len() == 52);
    // Let the connect traffic settle into the counters.
    h.spin(2_000);
    let empty0 = GroupStats::get(&h.stats.recv_empty);
    let calls0 = GroupStats::get(&h.stats.recv_calls);
    let it0 = h.iterations();
    h.spin(20_000);
    let empty = GroupStats::get(&h.stats.recv_empty) - empty0;
    let calls = GroupStats::get(&h.stats.recv_calls) - calls0;
    let iters = h.iterations() - it0;
    assert!(
        empty < 52,
        "{empty} empty reads ({calls} reads) over {iters} iterations with 52 idle queues"
    );
    // The busy queue is served (readiness reports wake it) and each command costs at most a
    // few reads.
    let before = GroupStats::get(&h.stats.recv_calls);
    for i in 0..20u32 {
        write_read_verify(&mut q, 1, BS, u64::from(i) * 8, 4096, i);
    }
    let reads = GroupStats::get(&h.stats.recv_calls) - before;
    assert!(
        reads <= 40 * 4,
        "{reads} socket reads for 40 commands: reads are not readiness-driven"
    );
    assert!(GroupStats::get(&h.stats.epoll_events) > 0);
    // Idle admin queues are still alive: their controllers answer.
    for mut a in idle.into_iter().take(3) {
        let (s, _, _) = run(
            &mut a,
            Sqe {
                opcode: admin_op::KEEP_ALIVE,
                ..Default::default()
            },
            Dir::None,
            &[],
            0,
        );
        assert_eq!(s, Status::SUCCESS);
    }
}

/// A closed idle connection (host hung up, no bytes) is noticed through epoll's hang-up report
/// and reaped: the group shrinks back and the target's connection count returns.
#[test]
fn hangups_are_reaped() {
    let h = GroupHarness::start(Limits::default(), ram_bdevs());
    let qs: Vec<HostQpair> = (0..10).map(|_| h.admin()).collect();
    wait_until("placed", || h.group_len() == 10);
    drop(qs);
    wait_until("reaped", || h.group_len() == 0);
    assert_eq!(GroupStats::get(&h.stats.connections), 0);
    // A new connection is served after the churn (slots are reused).
    let a = h.admin();
    let mut q = h.io_queue(&a, 1);
    write_read_verify(&mut q, 1, BS, 0, 4096, 9);
    assert_eq!(h.target.connection_count(), 2);
}

// ------------------------------------------------------------------------------------------------
// Item 4: shared channels, memory budget, connect/disconnect churn.

/// A RAM bdev that counts the channels opened on it and those still open.
struct CountingBdev {
    inner: RamBdev,
    opened: Arc<AtomicUsize>,
    open_now: Arc<AtomicUsize>,
}

struct CountedChannel {
    inner: Box<dyn BdevChannel>,
    open_now: Arc<AtomicUsize>,
}

impl Drop for CountedChannel {
    fn drop(&mut self) {
        self.open_now.fetch_sub(1, Ordering::AcqRel);
    }
}

impl BdevChannel for CountedChannel {
    fn submit(&mut self, io: BdevIo) -> Submit {
        self.inner.submit(io)
    }
    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        self.inner.poll(done)
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
}

impl Bdev for CountingBdev {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks()
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        self.inner.io_type_supported(t)
    }
    fn open_channel(&self, core: CoreId, depth: usize) -> Result<Box<dyn BdevChannel>, BdevError> {
        let inner = self.inner.open_channel(core, depth)?;
        self.opened.fetch_add(1, Ordering::AcqRel);
        self.open_now.fetch_add(1, Ordering::AcqRel);
        Ok(Box::new(CountedChannel {
            inner,
            open_now: self.open_now.clone(),
        }))
    }
}

/// `ram0` counting its channels (opened, open now); `ram1` plain.
/// Bdevs by name, and `ram0`'s channels (opened ever, open now).
type Counted = (
    HashMap<String, Arc<dyn Bdev>>,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
);

fn counting_bdevs() -> Counted {
    let mut bdevs = ram_bdevs();
    let (opened, open_now) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    bdevs.insert(
        "ram0".into(),
        Arc::new(CountingBdev {
            inner: RamBdev {
                name: "ram0".into(),
                block_size: BS,
                data: Arc::new(Mutex::new(vec![0; BLOCKS as usize * BS as usize])),
                busy_every: 0,
                hold: Arc::new(AtomicBool::new(false)),
            },
            opened: opened.clone(),
            open_now: open_now.clone(),
        }),
    );
    (bdevs, opened, open_now)
}

/// Item 4: I/O queues on one reactor share one bdev channel per namespace (one open for four
/// queues, not four), completions reach the right queue, and the channel closes when the last
/// queue using it is gone.
#[test]
fn queues_on_a_reactor_share_one_channel_per_namespace() {
    let (bdevs, opened, open_now) = counting_bdevs();
    let h = GroupHarness::start(Limits::default(), bdevs);
    let a = h.admin();
    let mut qs: Vec<HostQpair> = (1..=4).map(|qid| h.io_queue(&a, qid)).collect();
    for (i, q) in qs.iter_mut().enumerate() {
        write_read_verify(q, 1, BS, i as u64 * 64, 8192, i as u32);
    }
    // Interleaved on all queues at once: completions are routed by queue.
    let data: Vec<Vec<u8>> = (0..4).map(|i| pattern(4096, 100 + i)).collect();
    for (i, q) in qs.iter_mut().enumerate() {
        let (s, _, _) = run(
            q,
            nvseal::nvmf::host::rw_sqe(io_op::WRITE, 1, 1024 + i as u64 * 8, 8),
            Dir::ToCtrl,
            &data[i],
            0,
        );
        assert_eq!(s, Status::SUCCESS);
    }
    for (i, q) in qs.iter_mut().enumerate() {
        let (s, _, back) = run(
            q,
            nvseal::nvmf::host::rw_sqe(io_op::READ, 1, 1024 + i as u64 * 8, 8),
            Dir::FromCtrl,
            &[],
            4096,
        );
        assert_eq!(s, Status::SUCCESS);
        assert!(back == data[i], "queue {i} got another queue's data");
    }
    assert_eq!(
        opened.load(Ordering::Acquire),
        1,
        "four I/O queues on one reactor must share one channel to the namespace"
    );
    assert_eq!(open_now.load(Ordering::Acquire), 1);
    drop(qs);
    drop(a);
    wait_until("queues gone", || h.group_len() == 0);
    wait_until("shared channel closed", || {
        open_now.load(Ordering::Acquire) == 0
    });
}

/// A completion handler: queue index, tag, status, data.
type OnDone<'a> = dyn FnMut(usize, u64, Status, &[u8]) + 'a;

/// Item 4: the queues of a reactor share one data-buffer pool. Connect allocates no data
/// buffers (nothing reserved under the budget, no pool buffer allocated); four I/O queues
/// (32 deep × 128 KiB each) then share a pool capped by a 1 MiB budget (8 buffers) with many
/// commands in flight on each: R2T writes, in-capsule writes and reads all complete with their
/// data verified, requests that found the pool empty waited (none failed), and at the end
/// every buffer is back and the reservation matches what the pool allocated.
#[test]
fn queues_share_a_pool_smaller_than_their_depth() {
    let limits = Limits {
        buffer_budget_mib: 1,
        ..Limits::default()
    };
    let buf = u64::from(limits.max_io_size);
    let cap = (1u64 << 20) / buf;
    let h = GroupHarness::start(limits, ram_bdevs());
    let a = h.admin();
    let mut qs: Vec<HostQpair> = (1..=4).map(|qid| h.io_queue(&a, qid)).collect();
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    assert_eq!(get(&h.stats.bufs_allocated), 0, "Connect allocated buffers");
    assert_eq!(
        h.target.buffer_bytes_reserved(),
        0,
        "Connect reserved buffers"
    );
    for q in &mut qs {
        q.set_in_capsule_max(8192);
    }
    // Per queue (its own 512 KiB region of ram0): four 64 KiB writes (R2T), four 4 KiB
    // writes (in capsule), all in flight at once, then all the reads back at once.
    let region = 1024u64; // blocks of BS
    let ops: Vec<(u64, usize)> = (0..4)
        .map(|i| (i * 128, 64 << 10))
        .chain((0..4).map(|i| (512 + i * 8, 4096)))
        .collect();
    let data = |qi: usize, k: usize, len: usize| pattern(len, (qi * 100 + k) as u32 + 1);
    let drain = |qs: &mut Vec<HostQpair>, pending: &mut usize, on: &mut OnDone| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while *pending > 0 {
            assert!(Instant::now() < deadline, "I/O did not complete");
            for (qi, q) in qs.iter_mut().enumerate() {
                let n = q
                    .poll(&mut |c| on(qi, c.tag, c.cqe.status(), c.data))
                    .unwrap();
                *pending -= n;
            }
        }
    };
    let mut pending = 0;
    for (qi, q) in qs.iter_mut().enumerate() {
        for (k, &(lba, len)) in ops.iter().enumerate() {
            let at = qi as u64 * region + lba;
            q.write(1, at, &data(qi, k, len), BS, k as u64).unwrap();
            pending += 1;
        }
    }
    drain(&mut qs, &mut pending, &mut |qi, tag, st, _| {
        assert_eq!(st, Status::SUCCESS, "queue {qi} write {tag}");
    });
    for (qi, q) in qs.iter_mut().enumerate() {
        for (k, &(lba, len)) in ops.iter().enumerate() {
            let at = qi as u64 * region + lba;
            q.read(1, at, (len / BS as usize) as u32, BS, k as u64)
                .unwrap();
            pending += 1;
        }
    }
    let mut checked = 0;
    drain(&mut qs, &mut pending, &mut |qi, tag, st, got| {
        assert_eq!(st, Status::SUCCESS, "queue {qi} read {tag}");
        let len = ops[tag as usize].1;
        assert!(
            got == data(qi, tag as usize, len),
            "queue {qi} read {tag}: data mismatch"
        );
        checked += 1;
    });
    assert_eq!(checked, 4 * ops.len());
    let allocated = get(&h.stats.bufs_allocated);
    assert!(
        allocated >= 1 && allocated <= cap,
        "pool of {allocated} buffers, cap {cap}"
    );
    assert!(
        get(&h.stats.buf_waits) > 0,
        "the pool never ran dry: the test did not exercise waiting"
    );
    wait_until("every buffer back in the pool", || {
        get(&h.stats.bufs_free) == allocated
    });
    assert_eq!(h.target.buffer_bytes_reserved(), allocated * buf);
    // Buffers are reused, not allocated again, by new queues and new I/O.
    drop(qs);
    let mut q = h.io_queue(&a, 5);
    write_read_verify(&mut q, 1, BS, 0, 64 << 10, 9);
    assert_eq!(get(&h.stats.bufs_allocated), allocated);
}

/// Item 4: a request that finds the shared pool empty waits for a buffer, it does not fail.
/// A 1 MiB budget with 1 MiB I/Os holds one buffer; while the bdev holds a first queue's Read
/// (and so the only buffer), a second queue's Read and R2T Write wait (no completion, no
/// error), and so does a third queue's third in-capsule Write once its two boot buffers are
/// held too; once the bdev lets I/O complete, all of them finish with the right data.
#[test]
fn requests_wait_for_a_buffer_instead_of_failing() {
    let limits = Limits {
        buffer_budget_mib: 1,
        max_io_size: 1 << 20,
        ..Limits::default()
    };
    let hold = Arc::new(AtomicBool::new(false));
    let mut bdevs: HashMap<String, Arc<dyn Bdev>> = HashMap::new();
    bdevs.insert(
        "ram0".into(),
        Arc::new(RamBdev {
            name: "ram0".into(),
            block_size: BS,
            data: Arc::new(Mutex::new(vec![0; BLOCKS as usize * BS as usize])),
            busy_every: 0,
            hold: hold.clone(),
        }),
    );
    bdevs.insert("ram1".into(), ram_bdevs().remove("ram1").unwrap());
    let h = GroupHarness::start(limits, bdevs);
    let a = h.admin();
    let mut q1 = h.io_queue(&a, 1);
    let mut q2 = h.io_queue(&a, 2);
    q2.set_in_capsule_max(0);
    let mut q3 = h.io_queue(&a, 3);
    q3.set_in_capsule_max(8192);
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    write_read_verify(&mut q2, 1, BS, 64, 16 << 10, 5);
    assert_eq!(
        get(&h.stats.bufs_allocated),
        1,
        "a 1 MiB budget holds one 1 MiB buffer"
    );
    let waits = get(&h.stats.buf_waits);
    hold.store(true, Ordering::Release);
    q1.read(1, 64, 32, BS, 1).unwrap();
    q1.poll(&mut |_| panic!("completed while the bdev holds it"))
        .unwrap();
    wait_until("q1's read holds the buffer", || {
        get(&h.stats.bufs_free) == 0
    });
    q2.read(1, 64, 32, BS, 2).unwrap();
    let w = pattern(16 << 10, 6);
    q2.write(1, 200, &w, BS, 3).unwrap();
    wait_until("q2's requests wait for a buffer", || {
        q2.poll(&mut |c| {
            panic!(
                "tag {} completed without a buffer: {:?}",
                c.tag,
                c.cqe.status()
            )
        })
        .unwrap();
        get(&h.stats.buf_waits) >= waits + 2
    });
    // In-capsule writes: two take the connection's boot buffers (held at the bdev), the third
    // finds no buffer at all and its data waits in the socket.
    let icd: Vec<Vec<u8>> = (0..3).map(|i| pattern(4096, 20 + i)).collect();
    for (i, d) in icd.iter().enumerate() {
        q3.write(1, 400 + 8 * i as u64, d, BS, 10 + i as u64)
            .unwrap();
    }
    wait_until("q3's third in-capsule write waits for a buffer", || {
        q3.poll(&mut |c| {
            panic!(
                "tag {} completed while the bdev holds: {:?}",
                c.tag,
                c.cqe.status()
            )
        })
        .unwrap();
        get(&h.stats.buf_waits) >= waits + 3
    });
    hold.store(false, Ordering::Release);
    let expect = pattern(16 << 10, 5);
    let mut done = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while done < 6 {
        assert!(Instant::now() < deadline, "requests never completed");
        for q in [&mut q1, &mut q2, &mut q3] {
            done += q
                .poll(&mut |c| {
                    assert_eq!(c.cqe.status(), Status::SUCCESS, "tag {}", c.tag);
                    if c.tag == 1 || c.tag == 2 {
                        assert!(c.data == &expect[..], "tag {}: data mismatch", c.tag);
                    }
                })
                .unwrap();
        }
    }
    let mut back = vec![];
    q2.read(1, 200, 32, BS, 4).unwrap();
    while back.is_empty() {
        q2.poll(&mut |c| back = c.data.to_vec()).unwrap();
    }
    assert!(back == w, "the waiting write's data");
    for (i, d) in icd.iter().enumerate() {
        let (s, _, back) = run(
            &mut q3,
            nvseal::nvmf::host::rw_sqe(io_op::READ, 1, 400 + 8 * i as u64, 8),
            Dir::FromCtrl,
            &[],
            4096,
        );
        assert_eq!(s, Status::SUCCESS);
        assert!(back == *d, "in-capsule write {i}: data mismatch");
    }
    wait_until("the buffer is back", || get(&h.stats.bufs_free) == 1);
}

/// Item 4: hundreds of connect/disconnect cycles on the reactor while a queue does verified I/O
/// on it: the data stays right, and connections, channels and reserved buffers return to their
/// baseline. Prints the I/O stream's worst and p99 latency with and without the churn (the
/// reactor stall the churn causes; not asserted, timings are the environment's).
#[test]
fn connect_disconnect_churn_while_io_runs() {
    let (bdevs, _opened, open_now) = counting_bdevs();
    let h = GroupHarness::start(Limits::default(), bdevs);
    let a = h.admin();
    let mut q = h.io_queue(&a, 1);
    let base_conns = h.group_len();
    let base_bytes = h.target.buffer_bytes_reserved();
    let base_channels = open_now.load(Ordering::Acquire);
    assert_eq!(base_channels, 1);

    let io_stream = |q: &mut HostQpair, stop: &AtomicBool, seed: u32| -> Vec<Duration> {
        let mut lat = Vec::new();
        let mut i = 0u32;
        while !stop.load(Ordering::Acquire) || lat.len() < 500 {
            let t = Instant::now();
            write_read_verify(q, 1, BS, u64::from(i % 256) * 8, 4096, seed + i);
            lat.push(t.elapsed());
            i += 1;
        }
        lat
    };
    let report = |what: &str, mut lat: Vec<Duration>| {
        lat.sort();
        let p50 = lat[lat.len() / 2];
        let p99 = lat[lat.len() * 99 / 100];
        eprintln!(
            "{what}: {} write+read pairs, p50 {p50:?}, p99 {:?}, max {:?}",
            lat.len(),
            p99,
            lat.last().unwrap()
        );
    };

    // Without churn: a baseline for the numbers printed below.
    let stop = AtomicBool::new(true);
    report("I/O alone", io_stream(&mut q, &stop, 0));

    let stop = Arc::new(AtomicBool::new(false));
    let addr = h.addr;
    let s2 = stop.clone();
    let churn = std::thread::spawn(move || {
        for i in 0..200u32 {
            let mut c = HostQpair::connect(
                addr,
                NQN,
                0,
                connect::CNTLID_DYNAMIC,
                host_cfg(Digests::default()),
            )
            .unwrap();
            c.enable().unwrap();
            let mut io =
                HostQpair::connect(addr, NQN, 1, c.cntlid(), host_cfg(Digests::default())).unwrap();
            if i % 10 == 0 {
                write_read_verify(&mut io, 1, BS, 4000, 4096, 7 + i);
            }
        }
        s2.store(true, Ordering::Release);
    });
    let lat = io_stream(&mut q, &stop, 1000);
    churn.join().unwrap();
    report("I/O during 200 connect/disconnect cycles", lat);

    wait_until("churned connections gone", || h.group_len() == base_conns);
    // The shared pool keeps what it allocated for reuse; nothing else stays reserved.
    wait_until("reservations back", || {
        h.target.buffer_bytes_reserved()
            == base_bytes
                + h.stats.bufs_allocated.load(Ordering::Relaxed)
                    * u64::from(Limits::default().max_io_size)
    });
    wait_until("channels back", || {
        open_now.load(Ordering::Acquire) == base_channels
    });
    write_read_verify(&mut q, 1, BS, 0, 4096, 99);
}

/// `nvseal perf --idle-connections` against a poll-group target: the idle controllers connect
/// and stay idle (no empty reads for them), the run's I/O is verified, and in steady state
/// neither the target's reactor (poll group, shared channels, completion routing) nor the tool
/// allocates anything.
#[test]
fn perf_with_idle_connections_allocates_nothing_in_steady_state() {
    let h = GroupHarness::start(Limits::default(), ram_bdevs());
    let cfg = PerfConfig {
        target: TargetSpec {
            addr: h.addr,
            subnqn: NQN.into(),
            hostnqn: HOST.into(),
            hostid: [1; 16],
            digests: Digests::default(),
            kato_ms: 0,
            timeout: Duration::from_secs(10),
        },
        cores: vec![CoreId(0)],
        queues_per_core: 2,
        spec: JobSpec {
            workload: Workload::Randrw,
            rwmixread: 50,
            io_size: 4096,
            queue_depth: 8,
            verify: true,
            seed: 3,
        },
        time: Duration::from_millis(3500),
        io_count: None,
        nsids: vec![1],
        slice: Duration::from_secs(1),
        reactor: ReactorOptions {
            pin: false,
            ..ReactorOptions::default()
        },
        target_rpc: None,
        fua: false,
        idle_connections: 20,
    };
    let mut calls = 0;
    let mut window = [0u64; 2];
    let mut ios = [0u64; 2];
    let mut placed = 0;
    let out = nvmeperf::run(&cfg, &mut |p| {
        calls += 1;
        if calls == 2 {
            window[0] = ALLOCS.load(Ordering::Relaxed);
            ios[0] = p.side_ios;
        } else if calls == 5 {
            window[1] = ALLOCS.load(Ordering::Relaxed);
            ios[1] = p.side_ios;
            placed = GroupStats::get(&h.stats.connections);
        }
    })
    .unwrap();
    assert_eq!(out.failures(), 0);
    assert!(calls >= 5, "only {calls} progress reports");
    // The run's admin queue, 20 idle ones and 2 I/O queues were on the reactor.
    assert_eq!(placed, 23);
    let n = ios[1] - ios[0];
    assert!(n > 100, "only {n} I/Os in the window");
    assert_eq!(
        window[1] - window[0],
        0,
        "allocations during {n} steady-state I/Os"
    );
    wait_until("all disconnected", || h.group_len() == 0);
}
