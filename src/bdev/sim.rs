//! The `sim` bdev: a simulated drive with seeded faults, for deterministic crash and error tests
//! (TigerBeetle's storage twin idea).
//!
//! It behaves like a RAM disk with a volatile write cache:
//! * Every write, write-zeroes and unmap changes what reads see at once, and is also recorded in a
//!   **write log** of everything not yet flushed. A Flush makes the log durable and empties it.
//! * A write with Force Unit Access ([`BdevIo::fua`]) is durable when it completes: it reaches
//!   the media at once (the earlier unflushed writes stay volatile), and it stays in the log as
//!   a *forced* entry so that a crash replaying older unflushed writes of the same blocks lands it
//!   again on top of them, in order — the media ends up as a real drive's would.
//! * [`SimBdev::crash`] simulates power loss: [`CrashMode::LoseUnflushed`] drops every unflushed
//!   write; [`CrashMode::Torn`] lets each *block* of each unflushed write land or not (a seeded
//!   coin per block, applied in submission order), so a multi-block write can be torn. After a
//!   crash, reads return exactly the durable image. [`SimBdev::power_cut`] is the plain power
//!   cut (`LoseUnflushed`): the volatile cache is dropped.
//! * Faults: the Nth I/O (counted from 1 over the bdev's life, valid I/Os only) and/or a seeded
//!   fraction of I/Os complete with `IoError(EIO)` and have no effect.
//! * The cache is bounded (`cache_blocks`): when a write does not fit, the drive destages the
//!   whole log first (as a real drive writes its cache back), so memory stays fixed.
//!
//! Everything random comes from one seeded generator, so a test run with one channel repeats
//! exactly. Threading: unlike the production backends, every channel takes one mutex per I/O
//! (to give all cores one global order, which crash semantics need), and all memory — both
//! images, the log and its data arena — is allocated at open. It is a test backend: never
//! configure it for performance.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::Deserialize;

use super::null::{default_block_size, geometry, DoneRing};
use super::{
    check_queue_depth, validate, Bdev, BdevChannel, BdevError, BdevIo, IoStatus, IoType, Submit,
};
use crate::types::CoreId;

/// `sim` bdev settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    pub name: String,
    /// Device size in blocks; give this or `size_bytes`.
    #[serde(default)]
    pub num_blocks: Option<u64>,
    /// Device size in bytes (a multiple of `block_size`); give this or `num_blocks`.
    #[serde(default)]
    pub size_bytes: Option<u64>,
    /// 512 or 4096 (default 4096).
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// Seed of every random decision (fault selection, torn blocks).
    #[serde(default)]
    pub seed: u64,
    /// Fail the Nth valid I/O (1-based, counted over the bdev's life) with EIO.
    #[serde(default)]
    pub fail_nth: Option<u64>,
    /// Fraction of valid I/Os, 0.0..=1.0, that fail with EIO (seeded).
    #[serde(default)]
    pub fail_ratio: f64,
    /// Volatile write cache size in blocks: how much unflushed data a crash can lose.
    #[serde(default = "default_cache_blocks")]
    pub cache_blocks: u32,
}

fn default_cache_blocks() -> u32 {
    // Enough for a few hundred small unflushed writes, small enough to keep tests light.
    1024
}

/// What a power loss does to the unflushed writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// None of them reach the media.
    LoseUnflushed,
    /// Each block of each unflushed write reaches the media or not (seeded coin flip).
    Torn,
}

/// What a crash threw away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrashReport {
    /// Unflushed writes (including write-zeroes/unmap) at the time of the crash.
    pub unflushed_writes: usize,
    /// Blocks of those writes that reached the media.
    pub blocks_landed: u64,
    /// Blocks of those writes that were lost.
    pub blocks_lost: u64,
    /// Multi-block writes that landed only in part.
    pub torn_writes: usize,
}

/// Counters for tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Valid I/Os executed or failed.
    pub ios: u64,
    /// I/Os failed by fault injection.
    pub injected_failures: u64,
    /// Writes in the volatile log now.
    pub unflushed_writes: usize,
    /// Times the log was destaged because the cache was full.
    pub destages: u64,
    /// Flush I/Os executed successfully.
    pub flushes: u64,
    /// Writes with Force Unit Access executed successfully.
    pub fua_writes: u64,
}

/// SplitMix64: tiny, fast, and good enough to pick faults; repeatable from a seed.
#[derive(Clone, Copy, Debug)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One unflushed write: its blocks, and where its data sits in the arena (`None`: zeroes).
#[derive(Clone, Copy, Debug)]
struct LogEntry {
    lba: u64,
    num_blocks: u64,
    data_off: Option<usize>,
    /// A FUA write: already on the media, and landed again whenever the log is replayed.
    forced: bool,
}

struct SimState {
    /// What reads see.
    current: Vec<u8>,
    /// What survives a crash.
    durable: Vec<u8>,
    log: Vec<LogEntry>,
    /// Data of the logged writes, appended in order; capacity fixed at open.
    arena: Vec<u8>,
    rng: Rng,
    fail_nth: Option<u64>,
    fail_ratio: f64,
    /// From this I/O on (counted as `fail_nth`), every I/O fails: the drive lost power.
    dead_from: Option<u64>,
    stats: SimStats,
}

impl SimState {
    fn block_range(&self, lba: u64, n: u64, bs: usize) -> std::ops::Range<usize> {
        // Callers pass ranges validate() bounded by num_blocks, whose byte size is allocated.
        let start = lba as usize * bs;
        start..start + n as usize * bs
    }

    /// Applies log entry `e`'s block `i` to the durable image.
    fn land_block(&mut self, e: LogEntry, i: u64, bs: usize) {
        let dst = self.block_range(e.lba + i, 1, bs);
        match e.data_off {
            Some(off) => {
                let src = off + i as usize * bs;
                self.durable[dst].copy_from_slice(&self.arena[src..src + bs]);
            }
            None => self.durable[dst].fill(0),
        }
    }

    /// Makes the whole log durable (flush, or a full cache destaging itself).
    fn destage(&mut self, bs: usize) {
        let log = std::mem::take(&mut self.log);
        for &e in &log {
            for i in 0..e.num_blocks {
                self.land_block(e, i, bs);
            }
        }
        self.log = log;
        self.log.clear();
        self.arena.clear();
    }

    /// Records a change of `n` blocks at `lba` (data from `data`, or zeroes) in the log; a
    /// `forced` (FUA) change also reaches the media now.
    fn log_write(&mut self, lba: u64, n: u64, data: Option<&[u8]>, forced: bool, bs: usize) {
        let bytes = data.map_or(0, <[u8]>::len);
        if self.log.len() == self.log.capacity() || self.arena.len() + bytes > self.arena.capacity()
        {
            self.destage(bs);
            self.stats.destages += 1;
        }
        if bytes > self.arena.capacity() {
            // Larger than the whole cache: the drive writes it through.
            let r = self.block_range(lba, n, bs);
            if let Some(d) = data {
                self.durable[r].copy_from_slice(d);
            }
            return;
        }
        let data_off = data.map(|d| {
            let off = self.arena.len();
            self.arena.extend_from_slice(d);
            off
        });
        let e = LogEntry {
            lba,
            num_blocks: n,
            data_off,
            forced,
        };
        self.log.push(e);
        if forced {
            for i in 0..n {
                self.land_block(e, i, bs);
            }
        }
    }

    fn inject_fault(&mut self) -> bool {
        self.stats.ios += 1;
        let nth = self.fail_nth == Some(self.stats.ios)
            || self.dead_from.is_some_and(|d| self.stats.ios >= d);
        let ratio = self.fail_ratio > 0.0 && self.rng.next_f64() < self.fail_ratio;
        if nth || ratio {
            self.stats.injected_failures += 1;
        }
        nth || ratio
    }

    fn execute(&mut self, io: &mut BdevIo, bs: usize) -> IoStatus {
        if self.inject_fault() {
            return IoStatus::IoError(libc::EIO);
        }
        let n = u64::from(io.num_blocks);
        let r = self.block_range(io.offset_blocks, n, bs);
        match (io.io_type, io.buf.as_mut()) {
            (IoType::Read, Some(buf)) => buf.as_mut_slice().copy_from_slice(&self.current[r]),
            (IoType::Write, Some(buf)) => {
                self.current[r].copy_from_slice(buf.as_slice());
                self.log_write(io.offset_blocks, n, Some(buf.as_slice()), io.fua, bs);
                if io.fua {
                    self.stats.fua_writes += 1;
                }
            }
            (IoType::Read | IoType::Write, None) => return IoStatus::InvalidRange,
            (IoType::WriteZeroes | IoType::Unmap, _) => {
                self.current[r].fill(0);
                self.log_write(io.offset_blocks, n, None, false, bs);
            }
            (IoType::Flush, _) => {
                self.destage(bs);
                self.stats.flushes += 1;
            }
        }
        IoStatus::Success
    }
}

/// A simulated drive; see the module docs.
pub struct SimBdev {
    name: String,
    block_size: u32,
    num_blocks: u64,
    state: Arc<Mutex<SimState>>,
}

/// Opens a `sim` bdev as a generic bdev.
pub fn open(cfg: &SimConfig) -> Result<Arc<dyn Bdev>, BdevError> {
    Ok(SimBdev::open(cfg)?)
}

fn lock(m: &Mutex<SimState>) -> MutexGuard<'_, SimState> {
    // A panic while holding the lock (in a test) leaves consistent plain data: keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SimBdev {
    /// Opens a `sim` bdev, keeping the concrete handle for [`SimBdev::crash`] and friends.
    pub fn open(cfg: &SimConfig) -> Result<Arc<SimBdev>, BdevError> {
        let num_blocks = geometry(&cfg.name, cfg.block_size, cfg.num_blocks, cfg.size_bytes)?;
        let invalid = |what: String| BdevError::Invalid {
            name: cfg.name.clone(),
            what,
        };
        if !(0.0..=1.0).contains(&cfg.fail_ratio) {
            return Err(invalid(format!(
                "fail_ratio {} not in 0.0..=1.0",
                cfg.fail_ratio
            )));
        }
        if cfg.cache_blocks == 0 {
            return Err(invalid("cache_blocks must be > 0".into()));
        }
        let bs = cfg.block_size as usize;
        let bytes = usize::try_from(num_blocks)
            .ok()
            .and_then(|n| n.checked_mul(bs))
            .ok_or_else(|| invalid("size overflows memory".into()))?;
        let cache = cfg.cache_blocks as usize;
        let state = SimState {
            current: vec![0; bytes],
            durable: vec![0; bytes],
            log: Vec::with_capacity(cache),
            arena: Vec::with_capacity(cache * bs),
            rng: Rng(cfg.seed),
            fail_nth: cfg.fail_nth,
            fail_ratio: cfg.fail_ratio,
            dead_from: None,
            stats: SimStats::default(),
        };
        Ok(Arc::new(SimBdev {
            name: cfg.name.clone(),
            block_size: cfg.block_size,
            num_blocks,
            state: Arc::new(Mutex::new(state)),
        }))
    }

    /// Simulates power loss now; reads afterwards see only what reached the media.
    pub fn crash(&self, mode: CrashMode) -> CrashReport {
        let bs = self.block_size as usize;
        let mut s = lock(&self.state);
        let log = std::mem::take(&mut s.log);
        let mut rep = CrashReport {
            unflushed_writes: log.iter().filter(|e| !e.forced).count(),
            ..CrashReport::default()
        };
        for &e in &log {
            if e.forced {
                // A FUA write is on the media already. Landing it again, in log order, keeps it
                // on top of older unflushed writes of the same blocks that landed before it.
                for i in 0..e.num_blocks {
                    s.land_block(e, i, bs);
                }
                continue;
            }
            let mut landed = 0;
            for i in 0..e.num_blocks {
                let lands = match mode {
                    CrashMode::LoseUnflushed => false,
                    CrashMode::Torn => s.rng.next_u64() & 1 == 1,
                };
                if lands {
                    s.land_block(e, i, bs);
                    landed += 1;
                }
            }
            rep.blocks_landed += landed;
            rep.blocks_lost += e.num_blocks - landed;
            if landed > 0 && landed < e.num_blocks {
                rep.torn_writes += 1;
            }
        }
        // The volatile view is gone: reads now return the media.
        for &e in &log {
            let r = s.block_range(e.lba, e.num_blocks, bs);
            let SimState {
                current, durable, ..
            } = &mut *s;
            current[r.clone()].copy_from_slice(&durable[r]);
        }
        s.log = log;
        s.log.clear();
        s.arena.clear();
        rep
    }

    /// A power cut: every write not yet flushed (and not written with FUA) is lost; see
    /// [`SimBdev::crash`].
    pub fn power_cut(&self) -> CrashReport {
        self.crash(CrashMode::LoseUnflushed)
    }

    /// Fails the `n`th I/O from now (1 = the next one) with EIO.
    pub fn fail_in(&self, n: u64) {
        let mut s = lock(&self.state);
        s.fail_nth = s.stats.ios.checked_add(n);
    }

    /// The drive goes dead at the `n`th I/O from now (1 = the next one): it and every later I/O
    /// fail with EIO and have no effect, until [`SimBdev::revive`]. With [`SimBdev::crash`]
    /// afterwards this is a power loss at exactly that I/O: what was written before it and not
    /// flushed is lost or torn, nothing after it happens.
    pub fn die_in(&self, n: u64) {
        let mut s = lock(&self.state);
        s.dead_from = s.stats.ios.checked_add(n.max(1));
    }

    /// Powers a dead drive back on (see [`SimBdev::die_in`]).
    pub fn revive(&self) {
        lock(&self.state).dead_from = None;
    }

    /// Changes the fraction of I/Os that fail (clamped to 0.0..=1.0).
    pub fn set_fail_ratio(&self, ratio: f64) {
        lock(&self.state).fail_ratio = if ratio.is_nan() {
            0.0
        } else {
            ratio.clamp(0.0, 1.0)
        };
    }

    pub fn stats(&self) -> SimStats {
        let s = lock(&self.state);
        SimStats {
            unflushed_writes: s.log.iter().filter(|e| !e.forced).count(),
            ..s.stats
        }
    }
}

impl Bdev for SimBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn num_blocks(&self) -> u64 {
        self.num_blocks
    }
    fn io_type_supported(&self, _io_type: IoType) -> bool {
        true
    }
    fn open_channel(
        &self,
        _core: CoreId,
        queue_depth: usize,
    ) -> Result<Box<dyn BdevChannel>, BdevError> {
        check_queue_depth(&self.name, queue_depth)?;
        Ok(Box::new(SimChannel {
            ring: DoneRing::new(queue_depth),
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            state: self.state.clone(),
        }))
    }
}

/// A reactor's channel on a [`SimBdev`].
pub struct SimChannel {
    ring: DoneRing,
    block_size: u32,
    num_blocks: u64,
    state: Arc<Mutex<SimState>>,
}

impl BdevChannel for SimChannel {
    fn submit(&mut self, mut io: BdevIo) -> Submit {
        if self.ring.is_full() {
            return Submit::Busy(io);
        }
        io.status = match validate(&io, self.block_size, self.num_blocks) {
            Ok(()) => lock(&self.state).execute(&mut io, self.block_size as usize),
            Err(s) => s,
        };
        self.ring.push(io);
        Submit::Queued
    }
    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        self.ring.drain(done)
    }
    fn in_flight(&self) -> usize {
        self.ring.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::BufPool;

    fn cfg(seed: u64) -> SimConfig {
        SimConfig {
            name: "sim0".into(),
            num_blocks: Some(64),
            size_bytes: None,
            block_size: 512,
            seed,
            fail_nth: None,
            fail_ratio: 0.0,
            cache_blocks: 32,
        }
    }

    struct T {
        ch: Box<dyn BdevChannel>,
        pool: BufPool,
    }

    impl T {
        fn new(b: &Arc<SimBdev>) -> T {
            T {
                ch: b.open_channel(CoreId(0), 4).unwrap(),
                pool: BufPool::new(4, 8 * 512, 64).unwrap(),
            }
        }
        fn io(&mut self, t: IoType, lba: u64, n: u32, fill: u8) -> (IoStatus, Vec<u8>) {
            let buf = if t.has_data() {
                let mut b = self.pool.get(n as usize * 512).unwrap();
                b.as_mut_slice().fill(fill);
                Some(b)
            } else {
                None
            };
            assert!(matches!(
                self.ch.submit(BdevIo::new(t, lba, n, buf, 0)),
                Submit::Queued
            ));
            let mut out = None;
            assert_eq!(self.ch.poll(&mut |io| out = Some(io)), 1);
            let mut io = out.unwrap();
            let data = io
                .buf
                .as_ref()
                .map(|b| b.as_slice().to_vec())
                .unwrap_or_default();
            if let Some(b) = io.buf.take() {
                self.pool.put(b);
            }
            (io.status, data)
        }
        /// A write with Force Unit Access.
        fn fua_write(&mut self, lba: u64, n: u32, fill: u8) -> IoStatus {
            let mut b = self.pool.get(n as usize * 512).unwrap();
            b.as_mut_slice().fill(fill);
            let io = BdevIo::new(IoType::Write, lba, n, Some(b), 0).with_fua(true);
            assert!(matches!(self.ch.submit(io), Submit::Queued));
            let mut out = None;
            assert_eq!(self.ch.poll(&mut |io| out = Some(io)), 1);
            let mut io = out.unwrap();
            self.pool.put(io.buf.take().unwrap());
            io.status
        }
        fn read(&mut self, lba: u64, n: u32) -> Vec<u8> {
            let (s, d) = self.io(IoType::Read, lba, n, 0xff);
            assert_eq!(s, IoStatus::Success);
            d
        }
    }

    #[test]
    fn flushed_data_survives_unflushed_is_lost() {
        let b = SimBdev::open(&cfg(1)).unwrap();
        let mut t = T::new(&b);
        assert_eq!(t.io(IoType::Write, 0, 2, 0xaa).0, IoStatus::Success);
        assert_eq!(t.io(IoType::Flush, 0, 0, 0).0, IoStatus::Success);
        assert_eq!(t.io(IoType::Write, 1, 2, 0xbb).0, IoStatus::Success);
        assert_eq!(t.io(IoType::Unmap, 0, 1, 0).0, IoStatus::Success);
        // Before the crash, reads see the newest data.
        let d = t.read(0, 3);
        assert!(d[..512].iter().all(|&x| x == 0) && d[512..].iter().all(|&x| x == 0xbb));
        assert_eq!(b.stats().unflushed_writes, 2);
        let rep = b.crash(CrashMode::LoseUnflushed);
        assert_eq!(
            (rep.unflushed_writes, rep.blocks_landed, rep.blocks_lost),
            (2, 0, 3)
        );
        let d = t.read(0, 3);
        assert!(
            d[..1024].iter().all(|&x| x == 0xaa),
            "flushed blocks must survive"
        );
        assert!(
            d[1024..].iter().all(|&x| x == 0),
            "unflushed block must be lost"
        );
        assert_eq!(b.stats().unflushed_writes, 0);
    }

    #[test]
    fn fua_write_survives_a_power_cut_and_earlier_unflushed_writes_do_not() {
        let b = SimBdev::open(&cfg(1)).unwrap();
        let mut t = T::new(&b);
        assert_eq!(t.io(IoType::Write, 0, 1, 0x11).0, IoStatus::Success);
        assert_eq!(t.io(IoType::Write, 4, 2, 0x22).0, IoStatus::Success);
        assert_eq!(t.fua_write(4, 1, 0x33), IoStatus::Success);
        assert_eq!(t.io(IoType::Write, 4, 1, 0x44).0, IoStatus::Success);
        let st = b.stats();
        assert_eq!((st.fua_writes, st.flushes, st.unflushed_writes), (1, 0, 3));
        let rep = b.power_cut();
        assert_eq!(rep.unflushed_writes, 3);
        assert_eq!(t.read(0, 1), vec![0; 512], "plain unflushed write is lost");
        assert_eq!(
            t.read(4, 1),
            vec![0x33; 512],
            "the FUA write survives, the later one not"
        );
        assert_eq!(
            t.read(5, 1),
            vec![0; 512],
            "FUA does not flush other writes"
        );
    }

    #[test]
    fn fua_write_stays_on_top_of_older_unflushed_writes_in_a_torn_crash() {
        for seed in 0..16 {
            let b = SimBdev::open(&cfg(seed)).unwrap();
            let mut t = T::new(&b);
            t.io(IoType::Write, 8, 8, 0x55);
            assert_eq!(t.fua_write(8, 8, 0x66), IoStatus::Success);
            b.crash(CrashMode::Torn);
            assert_eq!(t.read(8, 8), vec![0x66; 8 * 512], "seed {seed}");
        }
    }

    #[test]
    fn flush_is_counted() {
        let b = SimBdev::open(&cfg(2)).unwrap();
        let mut t = T::new(&b);
        t.io(IoType::Write, 0, 1, 1);
        t.io(IoType::Flush, 0, 0, 0);
        assert_eq!(b.stats().flushes, 1);
        assert_eq!(b.stats().unflushed_writes, 0);
    }

    fn torn_run(seed: u64) -> (CrashReport, Vec<u8>) {
        let b = SimBdev::open(&cfg(seed)).unwrap();
        let mut t = T::new(&b);
        for i in 0..4u64 {
            assert_eq!(
                t.io(IoType::Write, i * 8, 8, 0x10 + i as u8).0,
                IoStatus::Success
            );
        }
        let rep = b.crash(CrashMode::Torn);
        let mut data = Vec::new();
        for i in 0..4u64 {
            data.extend(t.read(i * 8, 8));
        }
        (rep, data)
    }

    #[test]
    fn torn_crash_is_seeded_and_per_block() {
        let (r1, d1) = torn_run(42);
        let (r2, d2) = torn_run(42);
        assert_eq!((r1, &d1), (r2, &d2), "same seed, same crash");
        assert_eq!(r1.blocks_landed + r1.blocks_lost, 32);
        // Every block is either the written pattern or the old zeroes, never anything else.
        for (blk, chunk) in d1.chunks(512).enumerate() {
            let want = 0x10 + (blk / 8) as u8;
            assert!(
                chunk.iter().all(|&x| x == want) || chunk.iter().all(|&x| x == 0),
                "block {blk}"
            );
        }
        let landed = d1.chunks(512).filter(|c| c[0] != 0).count() as u64;
        assert_eq!(landed, r1.blocks_landed);
        // Across a few seeds some 8-block write must come out torn (probability 1 - 2^-… ≈ 1).
        let torn: usize = (0..8).map(|s| torn_run(s).0.torn_writes).sum();
        assert!(torn > 0, "no torn write in 32 eight-block writes");
        let differ = (0..8).any(|s| torn_run(s).1 != d1);
        assert!(differ, "different seeds should tear differently");
    }

    #[test]
    fn overlapping_unflushed_writes_land_in_order() {
        let b = SimBdev::open(&cfg(7)).unwrap();
        let mut t = T::new(&b);
        t.io(IoType::Write, 5, 1, 1);
        t.io(IoType::Write, 5, 1, 2);
        t.io(IoType::Flush, 0, 0, 0);
        assert_eq!(t.read(5, 1), vec![2; 512]);
        b.crash(CrashMode::LoseUnflushed);
        assert_eq!(
            t.read(5, 1),
            vec![2; 512],
            "flush must keep the last write, not the first"
        );
    }

    #[test]
    fn nth_and_ratio_faults() {
        let mut c = cfg(3);
        c.fail_nth = Some(2);
        let b = SimBdev::open(&c).unwrap();
        let mut t = T::new(&b);
        assert_eq!(t.io(IoType::Write, 0, 1, 9).0, IoStatus::Success);
        assert_eq!(t.io(IoType::Write, 0, 1, 8).0, IoStatus::IoError(libc::EIO));
        assert_eq!(t.read(0, 1), vec![9; 512], "a failed write has no effect");
        // Invalid I/O does not count and is not failed.
        assert_eq!(t.io(IoType::Read, 64, 1, 0).0, IoStatus::InvalidRange);
        b.fail_in(2);
        assert_eq!(t.io(IoType::Flush, 0, 0, 0).0, IoStatus::Success);
        assert_eq!(t.io(IoType::Flush, 0, 0, 0).0, IoStatus::IoError(libc::EIO));
        assert_eq!(b.stats().injected_failures, 2);

        let ratio_run = |seed| {
            let mut c = cfg(seed);
            c.fail_ratio = 0.25;
            let b = SimBdev::open(&c).unwrap();
            let mut t = T::new(&b);
            (0..400)
                .map(|_| t.io(IoType::Read, 0, 1, 0).0 != IoStatus::Success)
                .collect::<Vec<_>>()
        };
        let a = ratio_run(11);
        assert_eq!(a, ratio_run(11), "same seed, same failures");
        let fails = a.iter().filter(|&&f| f).count();
        assert!(
            (50..150).contains(&fails),
            "{fails} of 400 failed at ratio 0.25"
        );
        b.set_fail_ratio(1.0);
        assert_eq!(t.io(IoType::Read, 0, 1, 0).0, IoStatus::IoError(libc::EIO));
    }

    #[test]
    fn full_cache_destages_and_bounds_loss() {
        let b = SimBdev::open(&cfg(5)).unwrap(); // 32-block cache
        let mut t = T::new(&b);
        for i in 0..5u64 {
            t.io(IoType::Write, i * 8, 8, 0x20 + i as u8); // 40 blocks: the 5th forces a destage
        }
        assert_eq!(b.stats().destages, 1);
        let rep = b.crash(CrashMode::LoseUnflushed);
        assert_eq!(rep.unflushed_writes, 1);
        for i in 0..4u64 {
            assert_eq!(t.read(i * 8, 8), vec![0x20 + i as u8; 4096]);
        }
        assert_eq!(t.read(32, 8), vec![0; 4096]);
    }

    #[test]
    fn config_and_busy() {
        let y = "name: s\nnum_blocks: 8\nseed: 9\nfail_ratio: 0.5\n";
        let c: SimConfig = serde_yaml_ng::from_str(y).unwrap();
        assert!(open(&c).is_ok());
        assert!(serde_yaml_ng::from_str::<SimConfig>("name: s\nnum_blocks: 8\ntorn: 1\n").is_err());
        let mut c = cfg(0);
        c.fail_ratio = 1.5;
        assert!(SimBdev::open(&c).is_err());
        let b = SimBdev::open(&cfg(0)).unwrap();
        let mut ch = b.open_channel(CoreId(0), 1).unwrap();
        assert!(matches!(
            ch.submit(BdevIo::new(IoType::Flush, 0, 0, None, 0)),
            Submit::Queued
        ));
        assert!(matches!(
            ch.submit(BdevIo::new(IoType::Flush, 0, 0, None, 1)),
            Submit::Busy(_)
        ));
    }
}
