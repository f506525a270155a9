//! The per-reactor NVMe/TCP poll group (issue 12 items 4 and 5): connections placed on a real
//! reactor's [`PollGroup`] (as `nvseal serve` does), idle ones read only on readiness, busy ones
//! unaffected, connect/disconnect churn while I/O runs.

mod common;
use common::nvmf::*;

use nvseal::nvmf::{GroupStats, PollGroup};
use nvseal::reactor::{PollerId, ReactorCounters, ReactorOptions, ReactorSet};

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
        let (port, configured) = target.ports()[0];
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
                r.add_poller(Box::new(PollGroup::new(st).expect("epoll")))
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
        HostQpair::connect(self.addr, NQN, qid, a.cntlid(), host_cfg(Digests::default())).unwrap()
    }

    /// Connections the group owns, read on its reactor.
    fn group_len(&self) -> usize {
        let g = self.group;
        self.set
            .as_ref()
            .unwrap()
            .call(0, move |r| r.poller_as::<PollGroup>(g).map_or(0, |p| p.len()))
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
    let _ = &h.target;
}
