//! The crypto bdev: AES-256-XTS in place on top of any bdev.
//!
//! Runs on the reactor that owns the channel; the cipher work happens on that core, inside the
//! channel's `poll`, with no copy: the buffer belongs to the I/O, so it is transformed where it
//! is (SPDK's crypto vbdev pays a bounce copy for writes; we do not).
//!
//! Batching: a write is not encrypted in `submit`; it is staged, and the next `poll` encrypts
//! every staged write in one kernel call ([`Xts::encrypt_runs`]) before handing them to the base
//! in submission order. Likewise the reads the base completes in one `poll` are decrypted in one
//! call before they are handed back. The reactor polls the channel right after the transport's
//! receive step, so staging adds no poll round to a write, and a batch of small I/Os pays the
//! cipher's per-call pipeline fill and drain once (4 KiB: 179 → 139 ns per I/O on Zen 5, see
//! `docs/xts.md`).
//!
//! Writes from transient memory ([`BdevChannel::submit_writes_from`], the NVMe/TCP target's
//! in-capsule data still in its receive buffer) are encrypted out of place, straight from that
//! memory into the I/O's buffer, up to [`FROM_BATCH`] per cipher call: the copy the target
//! would otherwise make first is not made (measured in `docs/perf.md`).
//!
//! Buffer ownership and contents:
//! * Write: the caller hands a plaintext buffer to `submit`; it is encrypted in place before the
//!   base bdev sees it. When the write completes the caller gets the buffer back holding
//!   **ciphertext** (callers that need the plaintext afterwards must keep their own copy).
//! * Read: the base bdev fills the buffer with ciphertext; it is decrypted in place before the
//!   completion is handed to the caller, so the caller only ever sees plaintext. A failed read is
//!   handed back undecrypted with its error status.
//!
//! Data unit = the base bdev's block size; tweak = the block's LBA on this bdev, little-endian
//! (dm-crypt `aes-xts-plain64` with `--sector-size` = block size).
//!
//! Write Zeroes is not supported (reading zeroes back would need encrypted zero blocks written;
//! dm-crypt refuses it too). Unmap passes through only with `allow_discards` (as dm-crypt's
//! option: it reveals which blocks are unused); unmapped blocks then read back as unspecified data.

use crate::bdev::{
    validate, Bdev, BdevChannel, BdevError, BdevIo, IoStatus, IoType, Submit, WriteFrom,
};
use crate::crypto::key::XtsKey;
use crate::crypto::keymap::{ChannelKeys, Entry, KeyControl, Keying};
use crate::crypto::xts::{Tier, UnitRun, Xts};
use crate::crypto::CryptoError;
use crate::types::CoreId;
use std::collections::VecDeque;
use std::sync::Arc;

/// The key a crypto bdev encrypts with: an expanded XTS key shared by all of the bdev's channels.
/// Key management (KEK/DEK unwrap) produces one of these; the crypto bdev never sees how.
#[derive(Clone)]
pub struct DataKey {
    xts: Arc<Xts>,
}

impl DataKey {
    /// Expands `key` for the best tier ≤ `max_tier`.
    pub fn new(key: &XtsKey, max_tier: Option<Tier>) -> Result<DataKey, CryptoError> {
        Ok(DataKey {
            xts: Arc::new(Xts::new(key, max_tier)?),
        })
    }
    pub fn tier(&self) -> Tier {
        self.xts.tier()
    }
    pub fn xts(&self) -> &Xts {
        &self.xts
    }
    /// The shared engine (tests: to watch when the last holder lets go of it).
    #[cfg(test)]
    pub(crate) fn xts_arc(&self) -> Arc<Xts> {
        self.xts.clone()
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataKey(<redacted>, tier {})", self.xts.tier().name())
    }
}

/// A bdev that encrypts everything it stores on `base`.
pub struct CryptoBdev {
    name: String,
    base: Arc<dyn Bdev>,
    /// Its keying (one key, or two split at a watermark during a conversion) and the hot-zone
    /// machinery of conversions (`crate::crypto::keymap`).
    ctl: Arc<KeyControl>,
    tier: Tier,
    allow_discards: bool,
}

/// A crypto bdev's data unit is its base's block: a whole number of AES blocks.
fn check_block_size(name: &str, base: &dyn Bdev) -> Result<(), BdevError> {
    let bs = base.block_size();
    if bs == 0 || !bs.is_multiple_of(16) {
        return Err(BdevError::Invalid {
            name: name.to_string(),
            what: format!("base block size {bs} is not a multiple of the AES block (16 bytes)"),
        });
    }
    Ok(())
}

impl CryptoBdev {
    pub fn new(
        name: &str,
        base: Arc<dyn Bdev>,
        key: DataKey,
        allow_discards: bool,
    ) -> Result<Self, BdevError> {
        check_block_size(name, base.as_ref())?;
        Ok(CryptoBdev {
            name: name.to_string(),
            base,
            tier: key.tier(),
            ctl: Arc::new(KeyControl::new(Keying::Single(key))),
            allow_discards,
        })
    }
    /// A crypto bdev whose data area holds plaintext ([`Keying::plain`]): a managed namespace
    /// that is not encrypted (yet, or any more). It passes data through unchanged until a
    /// conversion installs a key; `tier` is the cipher tier its later keys will use.
    pub fn plaintext(
        name: &str,
        base: Arc<dyn Bdev>,
        tier: Tier,
        allow_discards: bool,
    ) -> Result<Self, BdevError> {
        check_block_size(name, base.as_ref())?;
        Ok(CryptoBdev {
            name: name.to_string(),
            base,
            tier,
            ctl: Arc::new(KeyControl::new(Keying::plain())),
            allow_discards,
        })
    }
    pub fn base(&self) -> &Arc<dyn Bdev> {
        &self.base
    }
    /// The cipher tier of the key it was created with (every later key of a conversion is
    /// expanded with the same `max_tier`).
    pub fn tier(&self) -> Tier {
        self.tier
    }
    /// Its key control: the current keying, and conversions (docs/lifecycle.md §1).
    pub fn key_control(&self) -> &Arc<KeyControl> {
        &self.ctl
    }
}

impl Bdev for CryptoBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn encrypts_data(&self) -> bool {
        // A managed namespace served in the clear (not encrypted yet, or decrypted) is keyed
        // plaintext: say so. Control plane only (takes the keying lock).
        !self.ctl.keying().is_plain()
    }
    fn block_size(&self) -> u32 {
        self.base.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.base.num_blocks()
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        match t {
            IoType::Read | IoType::Write | IoType::Flush => self.base.io_type_supported(t),
            IoType::WriteZeroes => false,
            IoType::Unmap => self.allow_discards && self.base.io_type_supported(t),
        }
    }
    fn buf_align(&self) -> usize {
        self.base.buf_align()
    }
    fn open_channel(
        &self,
        core: CoreId,
        queue_depth: usize,
    ) -> Result<Box<dyn BdevChannel>, BdevError> {
        let base = self.base.open_channel(core, queue_depth)?;
        Ok(Box::new(CryptoChannel {
            base,
            keys: self.ctl.register(),
            block_size: self.base.block_size() as usize,
            num_blocks: self.base.num_blocks(),
            allow_discards: self.allow_discards,
            pending: VecDeque::with_capacity(queue_depth),
            done: VecDeque::with_capacity(queue_depth),
            reads: VecDeque::with_capacity(queue_depth),
            depth: queue_depth,
        }))
    }
}

/// An I/O accepted by the channel that the base has not taken yet.
struct Waiting {
    io: BdevIo,
    /// False for a write whose buffer still holds plaintext (encrypted at the next poll).
    sealed: bool,
}

/// A reactor's channel on a crypto bdev.
struct CryptoChannel {
    base: Box<dyn BdevChannel>,
    keys: ChannelKeys,
    block_size: usize,
    num_blocks: u64,
    allow_discards: bool,
    /// I/O not yet taken by the base, in submission order: staged writes (encrypted at the next
    /// poll), and I/O the base pushed back or that arrived behind them.
    pending: VecDeque<Waiting>,
    /// I/O completed here without reaching the base (invalid, unsupported).
    done: VecDeque<BdevIo>,
    /// Reads the base completed in this poll, decrypted together before they are handed back.
    reads: VecDeque<BdevIo>,
    depth: usize,
}

impl CryptoChannel {
    fn queued(&self) -> usize {
        self.pending.len() + self.done.len()
    }

    /// Encrypts every staged write: one batch call for a single key; during a conversion one
    /// batch per part, a write across the watermark cut in two runs (see [`unit_run`] for a bad
    /// buffer).
    fn seal_staged(&mut self) {
        let bs = self.block_size;
        match &self.keys.keying {
            Keying::Single(k) => {
                let runs = self
                    .pending
                    .iter_mut()
                    .filter(|w| !w.sealed)
                    .filter_map(|w| {
                        w.sealed = true;
                        unit_run(&mut w.io, bs)
                    });
                k.xts.encrypt_runs(runs);
            }
            Keying::Split(sp) => {
                let wm = sp.watermark();
                for (below, key) in [(true, &sp.below), (false, &sp.above)] {
                    let Some(k) = key else { continue };
                    let runs = self
                        .pending
                        .iter_mut()
                        .filter(|w| !w.sealed)
                        .filter_map(|w| part_run(&mut w.io, bs, wm, below));
                    k.xts.encrypt_runs(runs);
                }
                for w in self.pending.iter_mut() {
                    w.sealed = true;
                }
            }
        }
    }

    /// Encrypts out of place the writes `pending[start..]` from `srcs` (in order), with `key`.
    fn seal_from(&mut self, start: usize, srcs: &[&[u8]], key: &DataKey) {
        let bs = self.block_size;
        let runs = self
            .pending
            .range_mut(start..)
            .zip(srcs.iter())
            .filter_map(|(w, src)| unit_run_from(&mut w.io, src, bs));
        key.xts.encrypt_runs(runs);
    }

    /// Decrypts the reads the base completed in this poll, as [`CryptoChannel::seal_staged`]
    /// encrypts.
    fn open_reads(&mut self) {
        let bs = self.block_size;
        match &self.keys.keying {
            Keying::Single(k) => {
                let runs = self.reads.iter_mut().filter_map(|io| unit_run(io, bs));
                k.xts.decrypt_runs(runs);
            }
            Keying::Split(sp) => {
                let wm = sp.watermark();
                for (below, key) in [(true, &sp.below), (false, &sp.above)] {
                    let Some(k) = key else { continue };
                    let runs = self
                        .reads
                        .iter_mut()
                        .filter_map(|io| part_run(io, bs, wm, below));
                    k.xts.decrypt_runs(runs);
                }
            }
        }
    }
}

/// The part of an I/O's buffer below (`below`) or at/above the watermark `wm`, as a cipher run;
/// `None` if the I/O has no data units there (or failed: a buffer that does not hold whole
/// blocks fails the I/O as in [`unit_run`]).
fn part_run(io: &mut BdevIo, block_size: usize, wm: u64, below: bool) -> Option<UnitRun<'_>> {
    if io.status != IoStatus::Pending && io.status != IoStatus::Success {
        return None;
    }
    let first = io.offset_blocks;
    let end = first.saturating_add(u64::from(io.num_blocks));
    let (lo, hi) = if below {
        (first, end.min(wm))
    } else {
        (first.max(wm), end)
    };
    if lo >= hi {
        return None;
    }
    let a = usize::try_from(lo - first).ok()?.checked_mul(block_size)?;
    let b = usize::try_from(hi - first).ok()?.checked_mul(block_size)?;
    let ok = io.buf.as_ref().is_some_and(|buf| b <= buf.len());
    if !ok {
        io.status = IoStatus::InvalidRange;
        return None;
    }
    let buf = io.buf.as_mut()?.as_mut_slice();
    match UnitRun::new(&mut buf[a..b], block_size, lo) {
        Ok(run) => Some(run),
        Err(_) => {
            io.status = IoStatus::InvalidRange;
            None
        }
    }
}

/// Pushes the epoch parity an I/O entered the hot-zone gate with onto its bit stack.
fn push_parity(io: &mut BdevIo, p: u8) {
    io.stack_bits = (io.stack_bits << 1) | u64::from(p & 1);
}

/// Pops what [`push_parity`] pushed.
fn pop_parity(io: &mut BdevIo) -> u8 {
    let p = (io.stack_bits & 1) as u8;
    io.stack_bits >>= 1;
    p
}

/// Writes from transient sources encrypted per cipher call in [`CryptoChannel::submit_writes_from`]
/// (the sources are held in a stack array, so nothing is allocated).
const FROM_BATCH: usize = 32;

/// The cipher's view of an out-of-place write: `src` encrypted into the I/O's buffer. A length
/// mismatch (which [`WriteFrom`] and validate() make unreachable) fails the I/O, as in
/// [`unit_run`].
fn unit_run_from<'a>(io: &'a mut BdevIo, src: &'a [u8], block_size: usize) -> Option<UnitRun<'a>> {
    let first = io.offset_blocks;
    match io
        .buf
        .as_mut()
        .map(|b| UnitRun::from_source(b.as_mut_slice(), src, block_size, first))
    {
        Some(Ok(run)) => Some(run),
        _ => {
            io.status = IoStatus::InvalidRange;
            None
        }
    }
}

/// The cipher's view of an I/O's buffer. A buffer that does not hold whole blocks (validate()
/// makes that unreachable) marks the I/O failed instead: a write's plaintext then never reaches
/// the base and a read is handed back undecrypted with an error status.
fn unit_run(io: &mut BdevIo, block_size: usize) -> Option<UnitRun<'_>> {
    let first = io.offset_blocks;
    match io
        .buf
        .as_mut()
        .map(|b| UnitRun::new(b.as_mut_slice(), block_size, first))
    {
        Some(Ok(run)) => Some(run),
        Some(Err(_)) => {
            io.status = IoStatus::InvalidRange;
            None
        }
        None => None,
    }
}

impl BdevChannel for CryptoChannel {
    fn submit(&mut self, mut io: BdevIo) -> Submit {
        if self.queued() + self.base.in_flight() >= self.depth {
            return Submit::Busy(io);
        }
        let unsupported = match io.io_type {
            IoType::WriteZeroes => true,
            IoType::Unmap => !self.allow_discards,
            _ => false,
        };
        if unsupported {
            io.status = IoStatus::Unsupported;
            self.done.push_back(io);
            return Submit::Queued;
        }
        if let Err(st) = validate(&io, self.block_size as u32, self.num_blocks) {
            io.status = st;
            self.done.push_back(io);
            return Submit::Queued;
        }
        // Counted in flight from here until it comes back from the base (or fails here); an I/O
        // on a segment a conversion is rewriting waits, as Busy.
        match self.keys.enter(io.offset_blocks, u64::from(io.num_blocks)) {
            Entry::Go(p) => push_parity(&mut io, p),
            Entry::Hot => return Submit::Busy(io),
        }
        if io.io_type == IoType::Write {
            // Let the base start fetching the destination while the write waits for its batch.
            self.base.hint_write(io.offset_blocks, io.num_blocks);
            self.pending.push_back(Waiting { io, sealed: false });
            return Submit::Queued;
        }
        if !self.pending.is_empty() {
            // Keep order behind earlier staged or pushed-back I/O.
            self.pending.push_back(Waiting { io, sealed: true });
            return Submit::Queued;
        }
        match self.base.submit(io) {
            Submit::Queued => Submit::Queued,
            Submit::Busy(io) => {
                self.pending.push_back(Waiting { io, sealed: true });
                Submit::Queued
            }
        }
    }

    /// Encrypts the writes straight from their sources into their buffers, up to
    /// [`FROM_BATCH`] per cipher call, and queues them as sealed: no copy, no plaintext in the
    /// buffers. The base gets them at the next `poll`, with the staged writes, in order.
    fn submit_writes_from(
        &mut self,
        writes: &mut dyn Iterator<Item = WriteFrom<'_>>,
        busy: &mut dyn FnMut(BdevIo),
    ) {
        let bs = self.block_size;
        loop {
            let mut start = self.pending.len();
            let mut srcs: [&[u8]; FROM_BATCH] = [&[]; FROM_BATCH];
            let mut n = 0;
            // The key the writes of this batch were counted in under (one key: `Single`).
            let mut batch_key: Option<DataKey> = None;
            let mut more = true;
            while n < FROM_BATCH {
                let Some(w) = writes.next() else {
                    more = false;
                    break;
                };
                if self.queued() + self.base.in_flight() >= self.depth {
                    busy(w.into_copied());
                    continue;
                }
                if let Err(st) = validate(w.io(), bs as u32, self.num_blocks) {
                    let (mut io, _) = w.into_parts();
                    io.status = st;
                    self.done.push_back(io);
                    continue;
                }
                let (lba, blocks) = (w.io().offset_blocks, u64::from(w.io().num_blocks));
                let p = match self.keys.enter(lba, blocks) {
                    Entry::Go(p) => p,
                    Entry::Hot => {
                        busy(w.into_copied());
                        continue;
                    }
                };
                let (mut io, src) = w.into_parts();
                push_parity(&mut io, p);
                self.base.hint_write(io.offset_blocks, io.num_blocks);
                if let Keying::Single(k) = &self.keys.keying {
                    batch_key.get_or_insert_with(|| k.clone());
                    self.pending.push_back(Waiting { io, sealed: true });
                    srcs[n] = src;
                    n += 1;
                    continue;
                }
                // A conversion started (or runs): seal what this batch holds under the key it
                // was counted in with, then copy this write in; the next poll encrypts it in
                // place per part with the staged writes (seal_staged).
                if let Some(k) = batch_key.take() {
                    self.seal_from(start, &srcs[..n], &k);
                }
                n = 0;
                if let Some(b) = io.buf.as_mut() {
                    b.as_mut_slice().copy_from_slice(src);
                }
                self.pending.push_back(Waiting { io, sealed: false });
                start = self.pending.len();
            }
            if let Some(k) = batch_key {
                self.seal_from(start, &srcs[..n], &k);
            }
            if !more {
                return;
            }
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        let mut n = 0;
        self.keys.refresh();
        if self.pending.iter().any(|w| !w.sealed) {
            self.seal_staged();
        }
        while let Some(w) = self.pending.pop_front() {
            if w.io.status != IoStatus::Pending {
                // Failed its encryption (seal_staged): completed here, never submitted.
                let mut io = w.io;
                let p = pop_parity(&mut io);
                self.keys.leave(p);
                self.done.push_back(io);
                continue;
            }
            match self.base.submit(w.io) {
                Submit::Queued => {}
                Submit::Busy(io) => {
                    // Already encrypted: keep it rather than hand ciphertext back to the caller.
                    self.pending.push_front(Waiting { io, sealed: true });
                    break;
                }
            }
        }
        while let Some(io) = self.done.pop_front() {
            done(io);
            n += 1;
        }
        let reads = &mut self.reads;
        let keys = &mut self.keys;
        n += self.base.poll(&mut |mut io: BdevIo| {
            let p = pop_parity(&mut io);
            if io.io_type == IoType::Read && io.status == IoStatus::Success {
                // Still counted until it is decrypted (below): the watermark cannot pass it.
                push_parity(&mut io, p);
                reads.push_back(io);
            } else {
                keys.leave(p);
                done(io);
            }
        });
        if !self.reads.is_empty() {
            self.open_reads();
            while let Some(mut io) = self.reads.pop_front() {
                let p = pop_parity(&mut io);
                self.keys.leave(p);
                done(io);
            }
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.base.in_flight() + self.queued()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::malloc::{MallocBdev, MallocConfig};
    use crate::bdev::BufPool;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const BS: usize = 4096;

    fn malloc(blocks: u64) -> Arc<MallocBdev> {
        Arc::new(
            MallocBdev::new(&MallocConfig {
                name: "m".into(),
                num_blocks: Some(blocks),
                size_bytes: None,
                block_size: BS as u32,
                hugepages: false,
            })
            .expect("malloc"),
        )
    }

    fn key() -> XtsKey {
        let mut k = [0u8; 64];
        for (i, b) in k.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(29).wrapping_add(3);
        }
        XtsKey::from_bytes(&k).expect("key")
    }

    /// A crypto bdev with the test key (best tier) over `base`.
    fn crypto_on(base: Arc<dyn Bdev>) -> CryptoBdev {
        let dk = DataKey::new(&key(), None).expect("data key");
        CryptoBdev::new("c", base, dk, false).expect("crypto")
    }

    fn pattern(lba: u64, blocks: usize) -> Vec<u8> {
        (0..blocks * BS)
            .map(|i| (lba as usize * 7 + i * 13 + i / 4093) as u8)
            .collect()
    }

    fn io(pool: &mut BufPool, t: IoType, lba: u64, data: Option<&[u8]>, blocks: u32) -> BdevIo {
        let mut b = pool.get(blocks as usize * BS).expect("buffer");
        if let Some(d) = data {
            b.as_mut_slice().copy_from_slice(d);
        }
        BdevIo::new(t, lba, blocks, Some(b), lba)
    }

    /// Polls until `n` I/Os came back (bounded), in completion order.
    fn drain(ch: &mut dyn BdevChannel, n: usize) -> Vec<BdevIo> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            ch.poll(&mut |io| out.push(io));
            if out.len() >= n {
                return out;
            }
        }
        panic!("only {} of {n} I/Os completed", out.len());
    }

    /// What the base must hold for `plain` at `lba`: encrypted by an independent engine.
    fn sealed(plain: &[u8], lba: u64) -> Vec<u8> {
        let x = Xts::with_tier(&key(), Tier::Soft).expect("soft");
        let mut c = plain.to_vec();
        x.encrypt_units(&mut c, BS, lba).expect("encrypt");
        c
    }

    fn read_base(base: &Arc<MallocBdev>, pool: &mut BufPool, lba: u64, blocks: u32) -> Vec<u8> {
        let mut ch = base.open_channel(CoreId(0), 4).expect("base channel");
        assert!(matches!(
            ch.submit(io(pool, IoType::Read, lba, None, blocks)),
            Submit::Queued
        ));
        let mut got = drain(ch.as_mut(), 1);
        let io = got.pop().expect("read");
        assert_eq!(io.status, IoStatus::Success);
        let b = io.buf.expect("buffer");
        let v = b.as_slice().to_vec();
        pool.put(b);
        v
    }

    /// Force Unit Access travels with a write through the crypto layer, both on the staged path
    /// and on the out-of-place one: on a `sim` base with a volatile cache, the FUA writes survive
    /// a power cut and the others do not; a Flush after plain writes makes them survive too.
    #[test]
    fn fua_and_flush_reach_the_base_on_every_write_path() {
        use crate::bdev::sim::{SimBdev, SimConfig};
        use crate::bdev::WriteFrom;
        let dev = SimBdev::open(&SimConfig {
            name: "s".into(),
            num_blocks: Some(64),
            size_bytes: None,
            block_size: BS as u32,
            seed: 1,
            fail_nth: None,
            fail_ratio: 0.0,
            cache_blocks: 32,
        })
        .expect("sim");
        let crypto = crypto_on(dev.clone());
        let mut ch = crypto.open_channel(CoreId(0), 8).expect("channel");
        let mut pool = BufPool::new(8, BS, 64).expect("pool");
        // Staged path: lba 1 plain, lba 2 FUA.
        for (lba, fua) in [(1u64, false), (2, true)] {
            let p = pattern(lba, 1);
            let w = io(&mut pool, IoType::Write, lba, Some(&p), 1).with_fua(fua);
            assert!(matches!(ch.submit(w), Submit::Queued));
        }
        // Out-of-place path: lba 3 plain, lba 4 FUA.
        let srcs = [pattern(3, 1), pattern(4, 1)];
        let mut ws =
            [(3u64, false), (4, true)]
                .into_iter()
                .zip(srcs.iter())
                .map(|((lba, fua), src)| {
                    let b = pool.get(BS).expect("buffer");
                    let io = BdevIo::new(IoType::Write, lba, 1, Some(b), lba).with_fua(fua);
                    WriteFrom::new(io, src).ok().expect("fits")
                });
        ch.submit_writes_from(&mut ws, &mut |_| panic!("busy"));
        for io in drain(ch.as_mut(), 4) {
            assert_eq!(io.status, IoStatus::Success);
            assert_eq!(
                io.fua,
                io.offset_blocks % 2 == 0,
                "the flag comes back as it went"
            );
            pool.put(io.buf.expect("buffer"));
        }
        assert_eq!(dev.stats().fua_writes, 2);
        dev.power_cut();
        let read = |ch: &mut dyn BdevChannel, pool: &mut BufPool, lba: u64| {
            assert!(matches!(
                ch.submit(io(pool, IoType::Read, lba, None, 1)),
                Submit::Queued
            ));
            let io = drain(ch, 1).pop().expect("read");
            let b = io.buf.expect("buffer");
            let v = b.as_slice().to_vec();
            pool.put(b);
            v
        };
        for lba in 1..=4u64 {
            let survived = read(ch.as_mut(), &mut pool, lba) == pattern(lba, 1);
            assert_eq!(survived, lba % 2 == 0, "lba {lba}: only FUA writes survive");
        }
        // Plain writes followed by a Flush survive.
        let p = pattern(9, 1);
        assert!(matches!(
            ch.submit(io(&mut pool, IoType::Write, 9, Some(&p), 1)),
            Submit::Queued
        ));
        pool.put(
            drain(ch.as_mut(), 1)
                .pop()
                .and_then(|io| io.buf)
                .expect("buffer"),
        );
        assert!(matches!(
            ch.submit(BdevIo::new(IoType::Flush, 0, 0, None, 0)),
            Submit::Queued
        ));
        assert_eq!(drain(ch.as_mut(), 1)[0].status, IoStatus::Success);
        dev.power_cut();
        assert_eq!(read(ch.as_mut(), &mut pool, 9), p);
    }

    /// Writes submitted between two polls are staged (the base sees nothing, plaintext never
    /// reaches it), then encrypted as one batch at the next poll; a read submitted behind them
    /// sees the new data; the base holds exactly what an independent engine produces.
    #[test]
    fn staged_writes_are_encrypted_as_one_batch_in_submission_order() {
        let base = malloc(64);
        let crypto = crypto_on(base.clone());
        let mut ch = crypto.open_channel(CoreId(0), 16).expect("channel");
        let mut pool = BufPool::new(16, 2 * BS, 64).expect("pool");
        let writes: [(u64, u32); 5] = [(3, 1), (9, 2), (20, 1), (4, 1), (40, 2)];
        for &(lba, n) in &writes {
            let p = pattern(lba, n as usize);
            assert!(matches!(
                ch.submit(io(&mut pool, IoType::Write, lba, Some(&p), n)),
                Submit::Queued
            ));
        }
        assert!(matches!(
            ch.submit(io(&mut pool, IoType::Read, 9, None, 2)),
            Submit::Queued
        ));
        assert_eq!(ch.in_flight(), 6);
        // Nothing has reached the base yet.
        assert!(read_base(&base, &mut pool, 9, 2).iter().all(|&b| b == 0));

        let done = drain(ch.as_mut(), 6);
        assert_eq!(ch.in_flight(), 0);
        for io in done {
            assert_eq!(io.status, IoStatus::Success, "lba {}", io.offset_blocks);
            if io.io_type == IoType::Read {
                let b = io.buf.as_ref().expect("buffer");
                assert_eq!(b.as_slice(), &pattern(9, 2)[..], "read behind the writes");
            }
            pool.put(io.buf.expect("buffer"));
        }
        for &(lba, n) in &writes {
            assert_eq!(
                read_base(&base, &mut pool, lba, n),
                sealed(&pattern(lba, n as usize), lba),
                "ciphertext at lba {lba}"
            );
        }
    }

    /// Writes handed over from transient sources (the target's receive buffer) are encrypted
    /// out of place, more than one cipher batch of them, mixed with ordinary staged writes; the
    /// sources are left alone, the buffers come back holding ciphertext, the base holds what an
    /// independent engine gives, and a write past the end fails without touching the base.
    /// On a plain bdev the default copies: the same bytes land unencrypted.
    #[test]
    fn writes_from_transient_sources_are_encrypted_out_of_place() {
        let n = FROM_BATCH + 7;
        let base = malloc(128);
        let crypto = crypto_on(base.clone());
        let plain = malloc(128);
        let mut pool = BufPool::new(2 * n + 8, BS, 64).expect("pool");
        // One contiguous "receive buffer" holding every write's data.
        // 37 is prime to 120: distinct LBAs, out of order.
        let lbas: Vec<u64> = (0..n as u64).map(|i| (i * 37) % 120).collect();
        let rx: Vec<u8> = lbas
            .iter()
            .flat_map(|&lba| pattern(lba + 1000, 1))
            .collect();
        let rx_before = rx.clone();
        let devs: [(bool, &dyn Bdev, &Arc<MallocBdev>); 2] =
            [(true, &crypto, &base), (false, plain.as_ref(), &plain)];
        for (encrypted, dev, b) in devs {
            let mut ch = dev.open_channel(CoreId(0), 2 * n).expect("channel");
            let staged = pattern(125, 1);
            assert!(matches!(
                ch.submit(io(&mut pool, IoType::Write, 125, Some(&staged), 1)),
                Submit::Queued
            ));
            let mut ios = lbas
                .iter()
                .zip(rx.chunks(BS))
                .map(|(&lba, src)| {
                    let io = io(&mut pool, IoType::Write, lba, None, 1);
                    WriteFrom::new(io, src).ok().expect("write from")
                })
                .collect::<Vec<_>>()
                .into_iter();
            let mut refused = Vec::new();
            ch.submit_writes_from(&mut ios, &mut |io| refused.push(io));
            assert!(refused.is_empty());
            // Past the end: fails, never reaches the base.
            let past = io(&mut pool, IoType::Write, 128, None, 1);
            let mut one = std::iter::once(WriteFrom::new(past, &rx[..BS]).ok().expect("wf"));
            ch.submit_writes_from(&mut one, &mut |io| refused.push(io));
            assert_eq!(rx, rx_before, "a source was written");
            let done = drain(ch.as_mut(), n + 2);
            for io in done {
                let want = if io.offset_blocks == 128 {
                    IoStatus::InvalidRange
                } else {
                    IoStatus::Success
                };
                assert_eq!(io.status, want, "lba {}", io.offset_blocks);
                pool.put(io.buf.expect("buffer"));
            }
            let expect = |data: &[u8], lba: u64| {
                if encrypted {
                    sealed(data, lba)
                } else {
                    data.to_vec()
                }
            };
            for (i, &lba) in lbas.iter().enumerate() {
                assert_eq!(
                    read_base(b, &mut pool, lba, 1),
                    expect(&rx[i * BS..(i + 1) * BS], lba),
                    "encrypted {encrypted}: lba {lba}"
                );
            }
            assert_eq!(read_base(b, &mut pool, 125, 1), expect(&staged, 125));
        }
    }

    /// A full channel hands writes from transient sources back with their data copied into
    /// their buffers (plaintext), and a plain `submit` of them later stores the right data.
    #[test]
    fn writes_from_sources_refused_when_full_carry_their_data() {
        let base = malloc(16);
        let crypto = crypto_on(base.clone());
        let mut ch = crypto.open_channel(CoreId(0), 4).expect("channel");
        let mut pool = BufPool::new(16, BS, 64).expect("pool");
        let rx: Vec<u8> = (0..6u64).flat_map(|l| pattern(l, 1)).collect();
        let mut ios = (0..6u64)
            .map(|l| {
                let io = io(&mut pool, IoType::Write, l, None, 1);
                WriteFrom::new(io, &rx[l as usize * BS..(l as usize + 1) * BS])
                    .ok()
                    .expect("wf")
            })
            .collect::<Vec<_>>()
            .into_iter();
        let mut refused = Vec::new();
        ch.submit_writes_from(&mut ios, &mut |io| refused.push(io));
        assert_eq!(refused.len(), 2);
        for io in &refused {
            let l = io.offset_blocks;
            assert_eq!(io.buf.as_ref().expect("buf").as_slice(), &pattern(l, 1)[..]);
        }
        for io in drain(ch.as_mut(), 4) {
            assert_eq!(io.status, IoStatus::Success);
            pool.put(io.buf.expect("buffer"));
        }
        for io in refused {
            assert!(matches!(ch.submit(io), Submit::Queued));
        }
        for io in drain(ch.as_mut(), 2) {
            assert_eq!(io.status, IoStatus::Success);
            pool.put(io.buf.expect("buffer"));
        }
        for l in 0..6u64 {
            assert_eq!(read_base(&base, &mut pool, l, 1), sealed(&pattern(l, 1), l));
        }
        // A source of the wrong length, or a read, is refused when the WriteFrom is built.
        let w = io(&mut pool, IoType::Write, 0, None, 1);
        assert!(WriteFrom::new(w, &rx[..BS - 16]).is_err());
        let r = io(&mut pool, IoType::Read, 0, None, 1);
        assert!(WriteFrom::new(r, &rx[..BS]).is_err());
    }

    /// A base that refuses its first `busy` submissions.
    struct Refusing {
        inner: Arc<MallocBdev>,
        busy: Arc<AtomicUsize>,
    }
    struct RefusingChannel {
        inner: Box<dyn BdevChannel>,
        busy: Arc<AtomicUsize>,
    }
    impl Bdev for Refusing {
        fn name(&self) -> &str {
            "refusing"
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
        fn open_channel(&self, core: CoreId, qd: usize) -> Result<Box<dyn BdevChannel>, BdevError> {
            Ok(Box::new(RefusingChannel {
                inner: self.inner.open_channel(core, qd)?,
                busy: self.busy.clone(),
            }))
        }
    }
    impl BdevChannel for RefusingChannel {
        fn submit(&mut self, io: BdevIo) -> Submit {
            let left = self.busy.load(Ordering::Relaxed);
            if left > 0 {
                self.busy.store(left - 1, Ordering::Relaxed);
                return Submit::Busy(io);
            }
            self.inner.submit(io)
        }
        fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
            self.inner.poll(done)
        }
        fn in_flight(&self) -> usize {
            self.inner.in_flight()
        }
    }

    /// Writes the base pushes back are kept (already encrypted, encrypted once) and retried in
    /// order; what lands is the ciphertext, and reads decrypt it back.
    #[test]
    fn pushed_back_writes_are_retried_encrypted_once() {
        let inner = malloc(32);
        let busy = Arc::new(AtomicUsize::new(0));
        let base: Arc<dyn Bdev> = Arc::new(Refusing {
            inner: inner.clone(),
            busy: busy.clone(),
        });
        let crypto = crypto_on(base);
        let mut ch = crypto.open_channel(CoreId(0), 8).expect("channel");
        let mut pool = BufPool::new(8, BS, 64).expect("pool");
        for lba in [1u64, 2, 3] {
            let p = pattern(lba, 1);
            assert!(matches!(
                ch.submit(io(&mut pool, IoType::Write, lba, Some(&p), 1)),
                Submit::Queued
            ));
        }
        busy.store(2, Ordering::Relaxed);
        let done = drain(ch.as_mut(), 3);
        for io in done {
            assert_eq!(io.status, IoStatus::Success);
            pool.put(io.buf.expect("buffer"));
        }
        for lba in [1u64, 2, 3] {
            assert_eq!(
                read_base(&inner, &mut pool, lba, 1),
                sealed(&pattern(lba, 1), lba)
            );
            assert!(matches!(
                ch.submit(io(&mut pool, IoType::Read, lba, None, 1)),
                Submit::Queued
            ));
            let mut got = drain(ch.as_mut(), 1);
            let io = got.pop().expect("read");
            assert_eq!(
                io.buf.as_ref().expect("buffer").as_slice(),
                &pattern(lba, 1)[..]
            );
            pool.put(io.buf.expect("buffer"));
        }
    }
}
