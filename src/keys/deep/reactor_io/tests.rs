//! The pass's data I/O through a real reactor: round trips on malloc and on a uring file, the
//! per-poll bound and Busy retries (a wrapper bdev counting what its channel sees), a pass under a
//! verifying host on the same reactor, a reactor stopped mid-pass, a stuck backend, and cleanup.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::bdev::malloc::{MallocBdev, MallocConfig};
use crate::bdev::uring::{UringBdev, UringConfig};
use crate::bdev::BdevError;
use crate::crypto::bdev::CryptoBdev;
use crate::crypto::keymap::Keying;
use crate::keys::convert::{self, DataIo};
use crate::keys::deep::tests::{check_base, dk, now, pattern, stack, BLOCKS, BS};
use crate::keys::deep::{run, BdevDataIo, NamespaceIo, PassControl, PassEnd, PassError};
use crate::keys::header::tests::slot;
use crate::keys::header::METADATA_REGION_BYTES;
use crate::keys::header_io::BdevHeaderIo;
use crate::reactor::{ReactorCounters, ReactorOptions, ReactorSet};
use crate::types::CoreId;

fn reactors(n: usize) -> ReactorSet {
    let cores: Vec<CoreId> = (0..n).map(CoreId).collect();
    ReactorSet::start(
        &cores,
        &ReactorOptions {
            pin: false,
            ..Default::default()
        },
    )
    .unwrap()
}

fn mailboxes(set: &ReactorSet) -> Mailboxes {
    set.call(0, |r| r.mailboxes()).unwrap()
}

fn malloc(blocks: u64) -> Arc<dyn Bdev> {
    Arc::new(
        MallocBdev::new(&MallocConfig {
            name: "m".into(),
            num_blocks: Some(blocks),
            size_bytes: None,
            block_size: BS as u32,
            hugepages: false,
        })
        .unwrap(),
    )
}

fn opts(max_io_bytes: usize, per_poll: usize) -> ReactorIoOptions {
    ReactorIoOptions {
        max_io_bytes,
        queue_depth: 8,
        per_poll,
        timeout: Duration::from_secs(20),
    }
}

fn bytes(len_blocks: usize, seed: u8) -> Vec<u8> {
    (0..len_blocks * BS)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(u32::from(seed)) as u8
        })
        .collect()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn pollers(c: &ReactorCounters) -> u64 {
    c.pollers.load(Ordering::Relaxed)
}

/// What a [`Watched`] bdev's channels saw.
#[derive(Default)]
struct Seen {
    /// Thread name and core of each channel open.
    opens: Mutex<Vec<(String, CoreId)>>,
    /// Thread name of each submit.
    submit_threads: Mutex<Vec<String>>,
    /// Reactor iteration of each accepted submit.
    submit_iterations: Mutex<Vec<u64>>,
    /// Submits refused as Busy.
    busy: AtomicUsize,
    fua_writes: AtomicUsize,
    flushes: AtomicUsize,
}

/// A real bdev behind a channel that records what it is asked to do, refuses every
/// `busy_every`th submit as Busy, and (while `stuck` is set) holds completions back.
struct Watched {
    inner: Arc<dyn Bdev>,
    seen: Arc<Seen>,
    counters: Arc<ReactorCounters>,
    busy_every: usize,
    stuck: Arc<AtomicBool>,
}

impl Bdev for Watched {
    fn name(&self) -> &str {
        "watched"
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
    fn open_channel(
        &self,
        core: CoreId,
        queue_depth: usize,
    ) -> Result<Box<dyn BdevChannel>, BdevError> {
        let thread = std::thread::current().name().unwrap_or("").to_string();
        self.seen.opens.lock().unwrap().push((thread, core));
        Ok(Box::new(WatchedChannel {
            inner: self.inner.open_channel(core, queue_depth)?,
            seen: self.seen.clone(),
            counters: self.counters.clone(),
            busy_every: self.busy_every,
            submits: 0,
            stuck: self.stuck.clone(),
        }))
    }
}

struct WatchedChannel {
    inner: Box<dyn BdevChannel>,
    seen: Arc<Seen>,
    counters: Arc<ReactorCounters>,
    busy_every: usize,
    submits: usize,
    stuck: Arc<AtomicBool>,
}

impl BdevChannel for WatchedChannel {
    fn submit(&mut self, io: BdevIo) -> Submit {
        self.submits += 1;
        let thread = std::thread::current().name().unwrap_or("").to_string();
        self.seen.submit_threads.lock().unwrap().push(thread);
        if self.busy_every > 0 && self.submits.is_multiple_of(self.busy_every) {
            self.seen.busy.fetch_add(1, Ordering::Relaxed);
            return Submit::Busy(io);
        }
        if io.is_fua_write() {
            self.seen.fua_writes.fetch_add(1, Ordering::Relaxed);
        }
        if io.io_type == IoType::Flush {
            self.seen.flushes.fetch_add(1, Ordering::Relaxed);
        }
        let it = self.counters.iterations.load(Ordering::Relaxed);
        self.seen.submit_iterations.lock().unwrap().push(it);
        self.inner.submit(io)
    }
    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        if self.stuck.load(Ordering::Acquire) {
            return 0;
        }
        self.inner.poll(done)
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
}

fn watched(set: &ReactorSet, reactor: usize, inner: Arc<dyn Bdev>, busy_every: usize) -> Watched {
    Watched {
        inner,
        seen: Arc::new(Seen::default()),
        counters: set.counters(reactor),
        busy_every,
        stuck: Arc::new(AtomicBool::new(false)),
    }
}

#[test]
fn reads_and_durable_writes_run_on_the_reactor_within_the_per_poll_bound() {
    let set = reactors(2);
    let base = malloc(256);
    let w = watched(&set, 1, base.clone(), 3);
    let seen = w.seen.clone();
    let mut io =
        ReactorDataIo::with_options(mailboxes(&set), 1, Arc::new(w), opts(3 * BS, 2)).unwrap();
    assert_eq!(io.reactor(), 1);
    assert_eq!(pollers(&set.counters(1)), 1);
    assert_eq!(pollers(&set.counters(0)), 0);
    // The channel was opened on reactor 1's thread, for its core.
    assert_eq!(
        *seen.opens.lock().unwrap(),
        vec![("reactor-1".to_string(), set.core(1))]
    );

    // 37 blocks in I/Os of 3 blocks: 13 I/Os, more than the queue depth of 8.
    let data = bytes(37, 1);
    io.write_blocks_durable(5, &data).unwrap();
    assert_eq!(seen.fua_writes.load(Ordering::Relaxed), 13);
    assert_eq!(seen.flushes.load(Ordering::Relaxed), 1);
    let mut back = vec![0u8; data.len()];
    io.read_blocks(5, &mut back).unwrap();
    assert!(back == data, "read back differs");
    // The bytes really are on the bdev, where another path finds them.
    let mut direct = vec![0u8; data.len()];
    BdevDataIo::new(base.clone(), CoreId(0))
        .read_blocks(5, &mut direct)
        .unwrap();
    assert!(direct == data, "bdev holds other bytes");

    // Every submit ran on the reactor thread; Busy refusals were retried, none lost.
    assert!(seen
        .submit_threads
        .lock()
        .unwrap()
        .iter()
        .all(|t| t == "reactor-1"));
    assert!(seen.busy.load(Ordering::Relaxed) > 0);
    // At most `per_poll` (2) new I/Os per reactor iteration: host pollers get every other turn.
    let its = seen.submit_iterations.lock().unwrap().clone();
    assert_eq!(its.len(), 13 + 1 + 13);
    for i in &its {
        let n = its.iter().filter(|j| *j == i).count();
        assert!(n <= 2, "{n} submits in reactor iteration {i}");
    }

    // Bad requests are errors, and the object stays usable.
    let e = io.read_blocks(250, &mut vec![0u8; 8 * BS]).unwrap_err();
    assert!(e.to_string().contains("InvalidRange"), "{e}");
    let e = io.read_blocks(0, &mut [0u8; 100]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    io.read_blocks(5, &mut back).unwrap();
    assert!(back == data);
}

#[test]
fn converted_reads_run_on_the_reactor_and_write_back_their_own_buffers() {
    let set = reactors(2);
    let base = malloc(256);
    // Every 4th submit refused as Busy: conversions must survive the retries.
    let w = watched(&set, 1, base.clone(), 4);
    let seen = w.seen.clone();
    let mut io =
        ReactorDataIo::with_options(mailboxes(&set), 1, Arc::new(w), opts(3 * BS, 1)).unwrap();
    let data = bytes(37, 7);
    io.write_blocks_durable(9, &data).unwrap();
    let keys = convert::Keys {
        below: Some(dk(2)),
        above: Some(dk(1)),
    };
    // The same segment converted on this thread (one buffer) and on the reactor (I/O buffers).
    let here = convert::read_converted_here(&mut io, 9, 37, BS, &keys).unwrap();
    let mut there = io.read_converted(9, 37, BS, &keys).unwrap();
    assert_eq!(there.bufs.len(), 13, "one buffer per I/O of 3 blocks");
    assert_eq!(there.len(), 37 * BS);
    let flat = |c: &convert::Converted| -> Vec<u8> {
        c.bufs.iter().flat_map(|b| b.as_slice().to_vec()).collect()
    };
    assert!(flat(&here) == flat(&there), "reactor conversion differs");
    assert_eq!(here.before, there.before);
    assert_eq!(here.after, there.after);
    assert_eq!(there.before.len(), 37);
    // The checksums are of the bytes read and of the bytes converted.
    assert_eq!(there.before[0], crc32c::crc32c(&data[..BS]));
    assert_eq!(there.after[36], crc32c::crc32c(&flat(&there)[36 * BS..]));
    assert_ne!(flat(&there), data);
    // A prefix of 20 units (not a whole number of I/Os), then the whole segment.
    let fua_before = seen.fua_writes.load(Ordering::Relaxed);
    io.write_converted_durable(9, &mut there, 20 * BS, BS)
        .unwrap();
    assert_eq!(seen.fua_writes.load(Ordering::Relaxed) - fua_before, 7);
    let mut back = vec![0u8; 37 * BS];
    io.read_blocks(9, &mut back).unwrap();
    let conv = flat(&there);
    assert!(back[..20 * BS] == conv[..20 * BS], "prefix not written");
    assert!(
        back[20 * BS..] == data[20 * BS..],
        "written past the prefix"
    );
    assert_eq!(
        there.len(),
        37 * BS,
        "the segment keeps its buffers and lengths"
    );
    io.write_converted_durable(9, &mut there, 37 * BS, BS)
        .unwrap();
    io.read_blocks(9, &mut back).unwrap();
    assert!(back == conv);
    // Converting back with the keys swapped gives the original bytes.
    let swapped = convert::Keys {
        below: keys.above.clone(),
        above: keys.below.clone(),
    };
    let undone = io.read_converted(9, 37, BS, &swapped).unwrap();
    assert!(flat(&undone) == data);
    io.recycle(there);
    io.recycle(undone);
    // A read past the end fails the call, with no segment.
    let e = io.read_converted(250, 8, BS, &keys).unwrap_err();
    assert!(e.to_string().contains("InvalidRange"), "{e}");
    // A unit that is not a block of the bdev is converted on this thread instead.
    let odd = io.read_converted(0, 2, 2 * BS, &keys).unwrap();
    assert_eq!(odd.bufs.len(), 1);
}

#[test]
fn durable_writes_on_a_uring_file_are_fua_and_flushed() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let u = Arc::new(
        UringBdev::new(&UringConfig {
            name: "u".into(),
            path: dir.path().join("d.img"),
            block_size: 4096,
            direct: true,
            size_bytes: Some(1 << 20),
        })
        .unwrap(),
    );
    let set = reactors(1);
    let bdev: Arc<dyn Bdev> = u.clone();
    let mut io = ReactorDataIo::with_options(mailboxes(&set), 0, bdev, opts(4 * BS, 1)).unwrap();
    let before = u.stats();
    let data = bytes(10, 7);
    io.write_blocks_durable(100, &data).unwrap();
    let after = u.stats();
    assert_eq!(after.fua_writes - before.fua_writes, 3);
    assert_eq!(after.flushes - before.flushes, 1);
    let mut back = vec![0u8; data.len()];
    io.read_blocks(100, &mut back).unwrap();
    assert!(back == data);
    let file = std::fs::read(dir.path().join("d.img")).unwrap();
    assert!(
        file[100 * BS..110 * BS] == data[..],
        "file holds other bytes"
    );
}

#[test]
fn dropping_it_removes_the_poller_and_its_channel_and_holds_no_bdev() {
    let set = reactors(1);
    let w = watched(&set, 0, malloc(16), 0);
    let seen = w.seen.clone();
    let bdev: Arc<dyn Bdev> = Arc::new(w);
    let c = set.counters(0);
    let mut io = ReactorDataIo::new(mailboxes(&set), 0, bdev.clone()).unwrap();
    io.write_blocks_durable(0, &bytes(2, 3)).unwrap();
    assert_eq!(pollers(&c), 1);
    // The poller's channel is alive (it shares `seen` with the bdev and us); the bdev is held
    // by nothing but us.
    assert_eq!(Arc::strong_count(&seen), 3);
    assert_eq!(Arc::strong_count(&bdev), 1);
    drop(io);
    wait_until("the poller to go", || pollers(&c) == 0);
    wait_until("its channel to close", || Arc::strong_count(&seen) == 2);
    assert_eq!(Arc::strong_count(&bdev), 1);
}

#[test]
fn an_idle_poller_reports_no_work() {
    let set = reactors(1);
    let ch = malloc(16).open_channel(set.core(0), 4).unwrap();
    let (_tx, rx) = bounded(4);
    let (rtx, _rrx) = bounded(4);
    let mut p = DataPoller {
        name: "t".into(),
        ch,
        requests: rx,
        replies: rtx,
        active: None,
        queue_depth: 4,
        per_poll: 1,
        draining: false,
        closing: false,
    };
    assert_eq!(p.poll(), 0);
    assert_eq!(p.poll(), 0);
    assert!(!p.is_done());
    // Its control side gone, it is done (and still reports no work).
    drop(_tx);
    assert_eq!(p.poll(), 0);
    assert!(p.is_done());
}

#[test]
fn a_stuck_backend_times_out_and_the_next_call_waits_for_the_late_io() {
    let set = reactors(1);
    let base = malloc(64);
    let w = watched(&set, 0, base.clone(), 0);
    let stuck = w.stuck.clone();
    let o = ReactorIoOptions {
        timeout: Duration::from_millis(300),
        ..opts(2 * BS, 1)
    };
    let mut io = ReactorDataIo::with_options(mailboxes(&set), 0, Arc::new(w), o).unwrap();
    let data = bytes(8, 9);
    stuck.store(true, Ordering::Release);
    let e = io.write_blocks_durable(0, &data).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    // Still stuck: the next call cannot start before the late I/O is back, so it fails too.
    let e = io.read_blocks(0, &mut vec![0u8; BS]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    stuck.store(false, Ordering::Release);
    let mut back = vec![0u8; data.len()];
    io.read_blocks(0, &mut back).unwrap();
    // The timed-out write's I/Os all completed before this read started.
    assert!(back == data);
}

/// Host I/O on the crypto bdev from a poller on the same reactor as the pass: writes new
/// versions and verifies every read against its model; never panics on the reactor.
struct HostPoller {
    ch: Box<dyn BdevChannel>,
    buf: Option<IoBuf>,
    parked: Option<BdevIo>,
    in_flight: bool,
    model: Vec<u32>,
    x: u64,
    next: u64,
    ios: Arc<AtomicU64>,
    bad: Vec<String>,
    /// Start no new I/O.
    stop: bool,
}

impl HostPoller {
    fn start(&mut self) -> Option<BdevIo> {
        let mut b = self.buf.take()?;
        let (t, lba, v) = if self.next < BLOCKS {
            (IoType::Write, self.next, 0)
        } else {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            let lba = self.x % BLOCKS;
            if self.x & 0x100 != 0 {
                (IoType::Write, lba, self.model[lba as usize] + 1)
            } else {
                (IoType::Read, lba, 0)
            }
        };
        if t == IoType::Write {
            b.as_mut_slice().copy_from_slice(&pattern(lba, v));
        }
        Some(BdevIo::new(t, lba, 1, Some(b), u64::from(v)))
    }
}

impl Poller for HostPoller {
    fn name(&self) -> &str {
        "test-host"
    }
    fn poll(&mut self) -> usize {
        let mut work = 0;
        let mut done = None;
        if self.stop {
            self.parked = None;
        }
        work += self.ch.poll(&mut |io| done = Some(io));
        if let Some(io) = done {
            self.in_flight = false;
            let lba = io.offset_blocks;
            if io.status != IoStatus::Success {
                self.bad.push(format!("unit {lba}: {:?}", io.status));
            } else if io.io_type == IoType::Write {
                self.model[lba as usize] = io.ctx as u32;
            } else if io.buf.as_ref().map(|b| b.as_slice().to_vec())
                != Some(pattern(lba, self.model[lba as usize]))
            {
                self.bad.push(format!("unit {lba}: read other bytes"));
            }
            self.next += 1;
            self.ios.fetch_add(1, Ordering::Relaxed);
            self.buf = io.buf;
        }
        if !self.in_flight && !self.stop {
            let io = self.parked.take().or_else(|| self.start());
            if let Some(io) = io {
                match self.ch.submit(io) {
                    Submit::Queued => {
                        self.in_flight = true;
                        work += 1;
                    }
                    Submit::Busy(io) => self.parked = Some(io),
                }
            }
        }
        work
    }
    fn in_flight(&self) -> usize {
        self.ch.in_flight()
    }
    fn as_any_mut(&mut self) -> Option<&mut (dyn std::any::Any + 'static)> {
        Some(self)
    }
}

fn install_host(set: &ReactorSet, crypto: Arc<CryptoBdev>) -> (PollerId, Arc<AtomicU64>) {
    let ios = Arc::new(AtomicU64::new(0));
    let ios2 = ios.clone();
    // Nothing on the reactor may panic (it ends the process): failures come back as values.
    let id = set
        .call(0, move |r| {
            let ch = crypto
                .open_channel(r.core(), 4)
                .map_err(|e| e.to_string())?;
            let mem = AlignedBuf::zeroed(BS, 4096).ok_or("no memory")?;
            Ok::<_, String>(r.add_poller(Box::new(HostPoller {
                ch,
                buf: Some(IoBuf::new(mem, BS)),
                parked: None,
                in_flight: false,
                model: vec![0; BLOCKS as usize],
                x: 0x9e37_79b9_7f4a_7c15,
                next: 0,
                ios: ios2,
                bad: Vec::new(),
                stop: false,
            })))
        })
        .unwrap()
        .unwrap();
    (id, ios)
}

/// Stops the host poller and hands back its model and what went wrong.
fn stop_host(set: &ReactorSet, id: PollerId) -> (Vec<u32>, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "the host did not stop");
        let r = set
            .call(0, move |r| {
                let h = r.poller_as::<HostPoller>(id)?;
                h.stop = true;
                if h.in_flight {
                    return Some(None);
                }
                let out = (h.model.clone(), h.bad.clone());
                r.remove_poller(id);
                Some(Some(out))
            })
            .unwrap()
            .expect("the host poller is gone");
        if let Some(r) = r {
            return r;
        }
    }
}

#[test]
fn a_deep_rekey_over_the_reactor_with_host_io_on_the_same_reactor_loses_nothing() {
    let s = stack();
    let set = reactors(1);
    let (host, ios) = install_host(&set, s.crypto.clone());
    wait_until("the host to lay down version 0", || {
        ios.load(Ordering::Relaxed) >= BLOCKS
    });
    let mut meta = BdevHeaderIo::new(s.base.clone(), CoreId(0), METADATA_REGION_BYTES).unwrap();
    let mut data =
        ReactorDataIo::with_options(mailboxes(&set), 0, s.slice.clone(), opts(2 * BS, 1)).unwrap();
    let mut io = NamespaceIo {
        meta: &mut meta,
        data: &mut data,
    };
    let cur = convert::begin(&mut io, &s.stored, slot("new-kek", 9), 4, now()).unwrap();
    let ctl = s.crypto.key_control().clone();
    let (old, new) = (dk(1), dk(2));
    let control = PassControl::new(0);
    let before = ios.load(Ordering::Relaxed);
    let PassEnd::Finished(done) = run(&mut io, cur, &ctl, &old, &new, &control, &now).unwrap()
    else {
        panic!("not finished");
    };
    assert_eq!(done.header.active, slot("new-kek", 9));
    assert_eq!(control.watermark(), BLOCKS);
    assert!(matches!(ctl.keying(), Keying::Single(_)));
    // The host kept going on the same reactor while the pass ran.
    assert!(ios.load(Ordering::Relaxed) > before);
    let at_end = ios.load(Ordering::Relaxed);
    wait_until("more host I/O under the new key", || {
        ios.load(Ordering::Relaxed) >= at_end + 200
    });
    let (model, bad) = stop_host(&set, host);
    assert!(bad.is_empty(), "host saw: {bad:?}");
    check_base(&s, &model, 2);
}

/// Data I/O that stops every reactor before its `stop_at`th durable write.
struct StopsReactors<'a> {
    inner: ReactorDataIo,
    set: &'a ReactorSet,
    mailboxes: Mailboxes,
    writes: u32,
    stop_at: u32,
}

impl DataIo for StopsReactors<'_> {
    fn read_blocks(&mut self, lba: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_blocks(lba, buf)
    }
    fn write_blocks_durable(&mut self, lba: u64, buf: &[u8]) -> io::Result<()> {
        self.writes += 1;
        if self.writes == self.stop_at {
            self.set.stop_flag().store(true, Ordering::Release);
            // Until the reactor is draining (or gone), so the write below meets a stopping one.
            // Not `ReactorSet::call`: a message queued as the reactor exits is never run nor
            // dropped (its mailbox's senders live on), and `call` would wait for it forever.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                assert!(Instant::now() < deadline, "the reactor did not stop");
                let (tx, rx) = bounded(1);
                let asked = self.mailboxes.send(
                    0,
                    Box::new(move |r: &mut Reactor| {
                        let _ = tx.send(r.is_draining());
                    }),
                );
                if asked.is_err() {
                    break;
                }
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(true) | Err(RecvTimeoutError::Disconnected) => break,
                    Ok(false) | Err(RecvTimeoutError::Timeout) => {}
                }
            }
        }
        self.inner.write_blocks_durable(lba, buf)
    }
}

#[test]
fn a_reactor_stopped_mid_pass_is_an_error_not_a_hang() {
    let s = stack();
    let set = reactors(1);
    let mut meta = BdevHeaderIo::new(s.base.clone(), CoreId(0), METADATA_REGION_BYTES).unwrap();
    let o = ReactorIoOptions {
        timeout: Duration::from_secs(5),
        ..opts(2 * BS, 1)
    };
    let mut data = StopsReactors {
        inner: ReactorDataIo::with_options(mailboxes(&set), 0, s.slice.clone(), o.clone()).unwrap(),
        set: &set,
        mailboxes: mailboxes(&set),
        writes: 0,
        stop_at: 3,
    };
    let mut io = NamespaceIo {
        meta: &mut meta,
        data: &mut data,
    };
    let cur = convert::begin(&mut io, &s.stored, slot("new-kek", 9), 4, now()).unwrap();
    let ctl = s.crypto.key_control().clone();
    let control = PassControl::new(0);
    let err = run(&mut io, cur, &ctl, &dk(1), &dk(2), &control, &now).unwrap_err();
    // The write fails and so does the restore (same reactor): the segment stays fenced off,
    // and the journal still holds its bytes for recovery at the next open.
    let PassError::Fenced { step, recover } = &err else {
        panic!("{err}");
    };
    let stopped = |m: &str| m.contains("has stopped") || m.contains("shutting down");
    assert!(stopped(step), "{step}");
    assert!(stopped(recover), "{recover}");
    assert_eq!(control.watermark(), 8);
    // Later calls fail at once too, and a new poller cannot be installed on a stopped set.
    let e = data.inner.read_blocks(0, &mut vec![0u8; BS]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    drop(data);
    set.shutdown();
    let mb = {
        let set = reactors(1);
        let mb = mailboxes(&set);
        set.shutdown();
        mb
    };
    let e = ReactorDataIo::with_options(mb, 0, s.slice.clone(), o)
        .err()
        .unwrap();
    assert!(e.to_string().contains("stopped"), "{e}");
}
