//! Reactors: one OS thread per configured core, pinned to it, busy-polling its pollers.
//!
//! Thread model. A reactor owns everything registered on it (NVMe/TCP connections, bdev
//! channels, benchmark jobs) for their whole life; nothing it runs may block, sleep in a syscall,
//! take a lock on the data path or allocate per I/O. The only way in is its bounded mailbox
//! ([`Msg`]: a closure run on the reactor with `&mut Reactor`), filled by control threads or by
//! other reactors. Blocking work (KMIP, TLS, metadata writes, RPC) runs on control threads.
//!
//! Each loop iteration: poll every [`Poller`], drain up to [`MAILBOX_BATCH`] messages, then
//! account the iteration's ticks as *busy* if anything did work, else *idle*. The ratio is the
//! reactor's CPU busy % (a spinning reactor is always 100 % on `top`; this is the useful number).
//! With `idle_backoff_us > 0`, a reactor that found no work for [`IDLE_SPINS_BEFORE_BACKOFF`]
//! iterations in a row sleeps that long between polls (laptops, CI), at a latency cost; the
//! sleep counts as idle.
//!
//! Stop: [`ReactorSet::shutdown`] asks every reactor to drain: each poller is told to start no
//! new work ([`Poller::drain`]), the reactor keeps polling until no poller has I/O in flight (or the
//! drain timeout passes), then the thread exits.

use crate::sys::{affinity, clock};
use crate::types::CoreId;
use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub mod placement;

pub use placement::Placement;

/// Messages handled per loop iteration: bounds the time a burst of control messages can steal
/// from I/O polling.
pub const MAILBOX_BATCH: usize = 16;
/// Empty iterations in a row before an idle back-off sleep (≈ tens of µs of spinning first, so a
/// busy reactor never sleeps between two I/Os).
pub const IDLE_SPINS_BEFORE_BACKOFF: u32 = 10_000;

/// Something a reactor polls. Runs on its reactor only.
pub trait Poller {
    /// Short name for logs and stats.
    fn name(&self) -> &str;
    /// Does whatever work is ready without blocking; returns units of work done (0 = idle).
    fn poll(&mut self) -> usize;
    /// I/Os started and not finished; the reactor waits for 0 before it stops.
    fn in_flight(&self) -> usize {
        0
    }
    /// Stop starting new work (shutdown); finish what is in flight.
    fn drain(&mut self) {}
    /// True when the poller has nothing more to do and can be removed.
    fn is_done(&self) -> bool {
        false
    }
    /// The poller as `Any`, for owners that hand it more work through the reactor
    /// ([`Reactor::poller_mut`] then a downcast); `None` for pollers that take none.
    fn as_any_mut(&mut self) -> Option<&mut (dyn std::any::Any + 'static)> {
        None
    }
}

/// A closure run on a reactor thread.
pub type Msg = Box<dyn FnOnce(&mut Reactor) + Send>;

/// Identifies a poller on its reactor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollerId(u64);

/// Counters a reactor publishes for other threads (relaxed atomics, one writer).
#[derive(Default)]
pub struct ReactorCounters {
    pub busy_ticks: AtomicU64,
    pub idle_ticks: AtomicU64,
    pub iterations: AtomicU64,
    pub pollers: AtomicU64,
}

impl ReactorCounters {
    /// Busy share in percent over the whole life, or between two snapshots via [`busy_pct`].
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.busy_ticks.load(Ordering::Relaxed),
            self.idle_ticks.load(Ordering::Relaxed),
        )
    }
}

/// Busy % between two (busy, idle) tick snapshots.
pub fn busy_pct(before: (u64, u64), after: (u64, u64)) -> f64 {
    let busy = after.0.saturating_sub(before.0) as f64;
    let idle = after.1.saturating_sub(before.1) as f64;
    if busy + idle == 0.0 {
        0.0
    } else {
        100.0 * busy / (busy + idle)
    }
}

/// Tunables of all reactors (from the `reactor:` config section).
#[derive(Clone, Debug)]
pub struct ReactorOptions {
    /// Messages a mailbox holds before senders see `MailboxFull`.
    pub mailbox_depth: usize,
    /// Sleep between polls once idle for a while; 0 = always spin (lowest latency).
    pub idle_backoff_us: u64,
    /// Pin each reactor thread to its core (off only for tests on oversubscribed machines).
    pub pin: bool,
    /// Longest a shutdown waits for in-flight I/O before giving up on it.
    pub drain_timeout: Duration,
}

impl Default for ReactorOptions {
    fn default() -> Self {
        ReactorOptions {
            mailbox_depth: 1024,
            idle_backoff_us: 0,
            pin: true,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Errors starting or talking to reactors.
#[derive(Debug, thiserror::Error)]
pub enum ReactorError {
    #[error("core {core} does not exist or is not allowed for this process (allowed: {allowed})")]
    NoSuchCore { core: CoreId, allowed: String },
    #[error("core {0} is listed twice")]
    DuplicateCore(CoreId),
    #[error("no reactor cores configured")]
    NoCores,
    #[error("reactor {0}: mailbox full")]
    MailboxFull(usize),
    #[error("reactor {0} has stopped")]
    Stopped(usize),
    #[error("reactor on core {core}: {what}")]
    Start { core: CoreId, what: String },
}

/// The state of one reactor, owned by its thread.
pub struct Reactor {
    index: usize,
    core: CoreId,
    pollers: Vec<(PollerId, Box<dyn Poller>)>,
    next_poller: u64,
    mailbox: Receiver<Msg>,
    peers: Arc<Vec<Sender<Msg>>>,
    counters: Arc<ReactorCounters>,
    stop: Arc<AtomicBool>,
    draining: bool,
}

impl Reactor {
    /// This reactor's index in its set (0-based).
    pub fn index(&self) -> usize {
        self.index
    }
    /// The CPU it is pinned to.
    pub fn core(&self) -> CoreId {
        self.core
    }
    /// Number of reactors in the set.
    pub fn count(&self) -> usize {
        self.peers.len()
    }
    /// Registers a poller; it is polled from the next iteration on.
    pub fn add_poller(&mut self, poller: Box<dyn Poller>) -> PollerId {
        let id = PollerId(self.next_poller);
        self.next_poller += 1;
        self.pollers.push((id, poller));
        self.counters
            .pollers
            .store(self.pollers.len() as u64, Ordering::Relaxed);
        id
    }
    /// Removes a poller, handing it back.
    pub fn remove_poller(&mut self, id: PollerId) -> Option<Box<dyn Poller>> {
        let pos = self.pollers.iter().position(|(p, _)| *p == id)?;
        let (_, p) = self.pollers.remove(pos);
        self.counters
            .pollers
            .store(self.pollers.len() as u64, Ordering::Relaxed);
        Some(p)
    }
    /// The poller registered as `id`, if it is still there.
    pub fn poller_mut(&mut self, id: PollerId) -> Option<&mut dyn Poller> {
        self.pollers
            .iter_mut()
            .find(|(p, _)| *p == id)
            .map(|(_, p)| &mut **p as &mut dyn Poller)
    }
    /// The poller registered as `id` as its concrete type `T`, if it is still there and is one.
    pub fn poller_as<T: 'static>(&mut self, id: PollerId) -> Option<&mut T> {
        self.poller_mut(id)?.as_any_mut()?.downcast_mut::<T>()
    }
    /// Sends a message to another reactor of the set (never blocks).
    pub fn send_to(&self, index: usize, msg: Msg) -> Result<(), ReactorError> {
        let tx = self.peers.get(index).ok_or(ReactorError::Stopped(index))?;
        tx.try_send(msg).map_err(|e| match e {
            TrySendError::Full(_) => ReactorError::MailboxFull(index),
            TrySendError::Disconnected(_) => ReactorError::Stopped(index),
        })
    }
    /// Senders into every reactor of the set (including this one).
    pub fn mailboxes(&self) -> Mailboxes {
        Mailboxes(self.peers.clone())
    }
    /// Whether a shutdown is draining this reactor.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    fn poll_once(&mut self) -> usize {
        let mut work = 0;
        let mut finished = false;
        for (_, p) in self.pollers.iter_mut() {
            work += p.poll();
            finished |= p.is_done();
        }
        if finished {
            self.pollers.retain(|(_, p)| !p.is_done());
            self.counters
                .pollers
                .store(self.pollers.len() as u64, Ordering::Relaxed);
        }
        for _ in 0..MAILBOX_BATCH {
            match self.mailbox.try_recv() {
                Ok(msg) => {
                    msg(self);
                    work += 1;
                }
                Err(_) => break,
            }
        }
        work
    }

    fn run(&mut self, opts: &ReactorOptions) {
        let mut idle_spins = 0u32;
        let backoff = Duration::from_micros(opts.idle_backoff_us);
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let t0 = clock::ticks();
            let work = self.poll_once();
            let t1 = clock::ticks();
            let c = &self.counters;
            if work > 0 {
                c.busy_ticks.store(
                    c.busy_ticks.load(Ordering::Relaxed) + (t1 - t0),
                    Ordering::Relaxed,
                );
                idle_spins = 0;
            } else {
                c.idle_ticks.store(
                    c.idle_ticks.load(Ordering::Relaxed) + (t1 - t0),
                    Ordering::Relaxed,
                );
                idle_spins = idle_spins.saturating_add(1);
                if !backoff.is_zero() && idle_spins >= IDLE_SPINS_BEFORE_BACKOFF {
                    std::thread::sleep(backoff);
                    // The back-off sleep is idle time: left out, an idle target that wakes now
                    // and then for a little work reads as mostly busy.
                    c.idle_ticks.store(
                        c.idle_ticks.load(Ordering::Relaxed) + clock::ticks().saturating_sub(t1),
                        Ordering::Relaxed,
                    );
                }
            }
            c.iterations
                .store(c.iterations.load(Ordering::Relaxed) + 1, Ordering::Relaxed);

            if self.stop.load(Ordering::Acquire) {
                if !self.draining {
                    self.draining = true;
                    for (_, p) in self.pollers.iter_mut() {
                        p.drain();
                    }
                    drain_deadline = Some(Instant::now() + opts.drain_timeout);
                }
                let in_flight: usize = self.pollers.iter().map(|(_, p)| p.in_flight()).sum();
                if in_flight == 0 {
                    break;
                }
                if drain_deadline.is_some_and(|d| Instant::now() > d) {
                    tracing::error!(
                        reactor = self.index,
                        in_flight,
                        "drain timed out with I/O in flight"
                    );
                    break;
                }
            }
        }
        // Run what is left in the mailbox so that request/response callers are not left hanging
        // (their reply senders are dropped with the closures otherwise, which they also handle).
        while let Ok(msg) = self.mailbox.try_recv() {
            msg(self);
        }
        self.pollers.clear();
    }
}

/// Senders into every reactor's mailbox, for pollers that hand work to other reactors (an
/// accept poller placing new connections). Cheap to clone.
#[derive(Clone)]
pub struct Mailboxes(Arc<Vec<Sender<Msg>>>);

impl Mailboxes {
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Queues `msg` for reactor `index` without blocking.
    pub fn send(&self, index: usize, msg: Msg) -> Result<(), ReactorError> {
        let tx = self.0.get(index).ok_or(ReactorError::Stopped(index))?;
        tx.try_send(msg).map_err(|e| match e {
            TrySendError::Full(_) => ReactorError::MailboxFull(index),
            TrySendError::Disconnected(_) => ReactorError::Stopped(index),
        })
    }
}

/// Exit status of a process whose reactor panicked (`EX_SOFTWARE` of sysexits.h: an internal
/// software error). Distinct from the CLI's own codes (0-3) so a supervisor or script can tell
/// a crash from a failed run.
pub const EXIT_REACTOR_PANIC: i32 = 70;

/// Logs a reactor's panic and ends the process with [`EXIT_REACTOR_PANIC`]. Never returns.
/// `std::process::exit` skips other threads' destructors, which is what we want here: nothing
/// a broken reactor left behind is trusted to shut down cleanly. Keys in locked memory leave
/// with the process (their pages are excluded from core dumps).
fn reactor_panicked(index: usize, core: CoreId, payload: &(dyn std::any::Any + Send)) -> ! {
    let what = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-text panic payload)");
    tracing::error!(
        reactor = index,
        %core,
        panic = %what,
        exit_code = EXIT_REACTOR_PANIC,
        "reactor panicked: its connections and in-flight I/O are lost; exiting so a supervisor restarts nvseal"
    );
    std::process::exit(EXIT_REACTOR_PANIC)
}

/// Handle on one running reactor.
struct ReactorHandle {
    core: CoreId,
    counters: Arc<ReactorCounters>,
    join: Option<JoinHandle<()>>,
}

/// All reactors of the process. Owned by the control thread.
pub struct ReactorSet {
    reactors: Vec<ReactorHandle>,
    senders: Arc<Vec<Sender<Msg>>>,
    stop: Arc<AtomicBool>,
}

impl ReactorSet {
    /// Starts one pinned reactor per entry of `cores` (validated against the CPUs this process
    /// may use).
    pub fn start(cores: &[CoreId], opts: &ReactorOptions) -> Result<ReactorSet, ReactorError> {
        if cores.is_empty() {
            return Err(ReactorError::NoCores);
        }
        let allowed = affinity::allowed_cpus();
        for (i, c) in cores.iter().enumerate() {
            if cores[..i].contains(c) {
                return Err(ReactorError::DuplicateCore(*c));
            }
            if opts.pin && !allowed.contains(c) {
                return Err(ReactorError::NoSuchCore {
                    core: *c,
                    allowed: placement::format_cpu_list(&allowed),
                });
            }
        }
        // Calibrate the clock before any reactor needs it, off the data path.
        clock::ticks_per_ns();
        let mut txs = Vec::with_capacity(cores.len());
        let mut rxs = Vec::with_capacity(cores.len());
        for _ in cores {
            let (tx, rx) = bounded::<Msg>(opts.mailbox_depth.max(1));
            txs.push(tx);
            rxs.push(rx);
        }
        let senders = Arc::new(txs);
        let stop = Arc::new(AtomicBool::new(false));
        let mut reactors = Vec::with_capacity(cores.len());
        for (index, (core, rx)) in cores.iter().copied().zip(rxs).enumerate() {
            let counters = Arc::new(ReactorCounters::default());
            let (ready_tx, ready_rx) = bounded::<Result<(), String>>(1);
            let (peers, ctr, stop2) = (senders.clone(), counters.clone(), stop.clone());
            let o = opts.clone();
            let join = std::thread::Builder::new()
                .name(format!("reactor-{index}"))
                .spawn(move || {
                    if o.pin {
                        if let Err(e) = affinity::pin_current_thread(core) {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    }
                    let _ = ready_tx.send(Ok(()));
                    // A panic on a reactor leaves its connections, channels and in-flight I/O in
                    // an unknown state while RPC and the other reactors would still look healthy:
                    // make it fatal to the whole process instead (logged, non-zero exit), so a
                    // supervisor restarts nvseal and hosts reconnect to a consistent target.
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let mut reactor = Reactor {
                            index,
                            core,
                            pollers: Vec::new(),
                            next_poller: 0,
                            mailbox: rx,
                            peers,
                            counters: ctr,
                            stop: stop2,
                            draining: false,
                        };
                        reactor.run(&o);
                    }));
                    if let Err(payload) = ran {
                        reactor_panicked(index, core, payload.as_ref());
                    }
                })
                .map_err(|e| ReactorError::Start {
                    core,
                    what: e.to_string(),
                })?;
            let started = match ready_rx.recv() {
                Ok(r) => r,
                Err(_) => Err("reactor thread died during start-up".to_string()),
            };
            if let Err(what) = started {
                let _ = join.join();
                let set = ReactorSet {
                    reactors,
                    senders,
                    stop,
                };
                set.shutdown();
                return Err(ReactorError::Start { core, what });
            }
            reactors.push(ReactorHandle {
                core,
                counters,
                join: Some(join),
            });
        }
        Ok(ReactorSet {
            reactors,
            senders,
            stop,
        })
    }

    pub fn len(&self) -> usize {
        self.reactors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.reactors.is_empty()
    }
    /// The core of reactor `index`.
    pub fn core(&self, index: usize) -> CoreId {
        self.reactors[index].core
    }
    /// Live counters of reactor `index`.
    pub fn counters(&self, index: usize) -> Arc<ReactorCounters> {
        self.reactors[index].counters.clone()
    }
    /// Busy/idle tick snapshots of every reactor.
    pub fn snapshots(&self) -> Vec<(u64, u64)> {
        self.reactors
            .iter()
            .map(|r| r.counters.snapshot())
            .collect()
    }

    /// Queues a message for reactor `index` without blocking.
    pub fn send(&self, index: usize, msg: Msg) -> Result<(), ReactorError> {
        let tx = self
            .senders
            .get(index)
            .ok_or(ReactorError::Stopped(index))?;
        tx.try_send(msg).map_err(|e| match e {
            TrySendError::Full(_) => ReactorError::MailboxFull(index),
            TrySendError::Disconnected(_) => ReactorError::Stopped(index),
        })
    }

    /// Runs `f` on reactor `index` and waits for its result (control threads only).
    pub fn call<R: Send + 'static>(
        &self,
        index: usize,
        f: impl FnOnce(&mut Reactor) -> R + Send + 'static,
    ) -> Result<R, ReactorError> {
        let (tx, rx) = bounded(1);
        let msg: Msg = Box::new(move |r: &mut Reactor| {
            let _ = tx.send(f(r));
        });
        let tx = self
            .senders
            .get(index)
            .ok_or(ReactorError::Stopped(index))?;
        // A full mailbox is waited out here: this is a control thread and may block.
        tx.send(msg).map_err(|_| ReactorError::Stopped(index))?;
        rx.recv().map_err(|_| ReactorError::Stopped(index))
    }

    /// A flag that, once set, makes every reactor drain and exit (shared with signal handlers).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Drains and stops every reactor, then joins the threads.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        for r in self.reactors.iter_mut() {
            if let Some(j) = r.join.take() {
                if j.join().is_err() {
                    tracing::error!(core = %r.core, "reactor thread panicked");
                }
            }
        }
    }
}

impl Drop for ReactorSet {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Counter {
        n: Arc<AtomicUsize>,
        in_flight: usize,
        draining: bool,
    }
    impl Poller for Counter {
        fn name(&self) -> &str {
            "counter"
        }
        fn poll(&mut self) -> usize {
            if self.draining {
                // Finish one in-flight unit per poll.
                if self.in_flight > 0 {
                    self.in_flight -= 1;
                    self.n.fetch_add(1, Ordering::Relaxed);
                    return 1;
                }
                return 0;
            }
            self.n.fetch_add(1, Ordering::Relaxed);
            1
        }
        fn in_flight(&self) -> usize {
            self.in_flight
        }
        fn drain(&mut self) {
            self.draining = true;
        }
    }

    fn opts() -> ReactorOptions {
        ReactorOptions {
            pin: false,
            ..Default::default()
        }
    }

    #[test]
    fn runs_pollers_and_messages_then_drains() {
        let set = ReactorSet::start(&[CoreId(0), CoreId(1)], &opts()).unwrap();
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        set.call(1, move |r| {
            assert_eq!(r.index(), 1);
            r.add_poller(Box::new(Counter {
                n: n2,
                in_flight: 5,
                draining: false,
            }));
        })
        .unwrap();
        while n.load(Ordering::Relaxed) < 1000 {
            std::thread::yield_now();
        }
        // reactor → reactor message
        let (tx, rx) = bounded(1);
        set.call(1, move |r| {
            r.send_to(
                0,
                Box::new(move |r0: &mut Reactor| tx.send(r0.index()).unwrap()),
            )
            .unwrap();
        })
        .unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 0);
        let before = n.load(Ordering::Relaxed);
        set.shutdown();
        // Drain finished the in-flight units.
        assert!(n.load(Ordering::Relaxed) >= before + 5);
    }

    #[test]
    fn busy_accounting() {
        let set = ReactorSet::start(&[CoreId(0)], &opts()).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let s0 = set.snapshots()[0];
        assert!(
            busy_pct((0, 0), s0) < 50.0,
            "an empty reactor is mostly idle"
        );
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        set.call(0, move |r| {
            r.add_poller(Box::new(Counter {
                n: n2,
                in_flight: 0,
                draining: false,
            }));
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let s1 = set.snapshots()[0];
        assert!(
            busy_pct(s0, s1) > 50.0,
            "a reactor whose poller always works is busy"
        );
    }

    /// Works for `work` on one poll in `every`, doing nothing on the others.
    struct Sporadic {
        polls: u32,
        every: u32,
        work: Duration,
    }
    impl Poller for Sporadic {
        fn name(&self) -> &str {
            "sporadic"
        }
        fn poll(&mut self) -> usize {
            self.polls += 1;
            if self.polls.is_multiple_of(self.every) {
                let t = Instant::now();
                while t.elapsed() < self.work {
                    std::hint::spin_loop();
                }
                1
            } else {
                0
            }
        }
    }

    #[test]
    fn idle_backoff_sleep_counts_as_idle() {
        // Each cycle: 2 ms of work, the spins before a back-off, then 50 sleeps of 1 ms. The
        // reactor is busy a few % of the time; counting only polling time as idle (the sleeps
        // nowhere) would put it near 80 %.
        let o = ReactorOptions {
            pin: false,
            idle_backoff_us: 1000,
            ..Default::default()
        };
        let set = ReactorSet::start(&[CoreId(0)], &o).unwrap();
        set.call(0, |r| {
            r.add_poller(Box::new(Sporadic {
                polls: 0,
                every: IDLE_SPINS_BEFORE_BACKOFF + 50,
                work: Duration::from_millis(2),
            }));
        })
        .unwrap();
        let s0 = set.snapshots()[0];
        std::thread::sleep(Duration::from_millis(400));
        let s1 = set.snapshots()[0];
        set.shutdown();
        assert!(s1.0 > s0.0, "the poller worked at least once");
        let pct = busy_pct(s0, s1);
        assert!(
            pct < 30.0,
            "a reactor that mostly sleeps is mostly idle: {pct:.1} % busy"
        );
    }

    #[test]
    fn bad_cores_are_errors() {
        let o = ReactorOptions::default();
        match ReactorSet::start(&[CoreId(4096)], &o) {
            Err(ReactorError::NoSuchCore { core, .. }) => assert_eq!(core, CoreId(4096)),
            Err(e) => panic!("wrong error {e}"),
            Ok(_) => panic!("core 4096 accepted"),
        }
        assert!(matches!(
            ReactorSet::start(&[CoreId(0), CoreId(0)], &o),
            Err(ReactorError::DuplicateCore(_))
        ));
        assert!(matches!(
            ReactorSet::start(&[], &o),
            Err(ReactorError::NoCores)
        ));
    }

    #[test]
    fn mailbox_is_bounded() {
        let o = ReactorOptions {
            pin: false,
            mailbox_depth: 2,
            ..Default::default()
        };
        let set = ReactorSet::start(&[CoreId(0)], &o).unwrap();
        // Block the reactor inside a message so the mailbox fills up.
        let (gate_tx, gate_rx) = bounded::<()>(0);
        set.send(
            0,
            Box::new(move |_| {
                let _ = gate_rx.recv();
            }),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut full = false;
        for _ in 0..8 {
            if let Err(ReactorError::MailboxFull(0)) = set.send(0, Box::new(|_| {})) {
                full = true;
                break;
            }
        }
        gate_tx.send(()).unwrap();
        assert!(full, "a bounded mailbox must refuse messages when full");
    }
}
