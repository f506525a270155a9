//! Tests of the split keying and the hot-zone gate on a real crypto bdev over a malloc bdev:
//! per-part keys on every write path, Busy on the hot segment, grace periods that wait for
//! I/O in flight (and only for it), and a conversion racing a host that writes and verifies.

use super::*;
use crate::bdev::malloc::{MallocBdev, MallocConfig};
use crate::bdev::WriteFrom;
use crate::bdev::{Bdev, BdevChannel, BdevError, BdevIo, BufPool, IoStatus, IoType, Submit};
use crate::crypto::bdev::CryptoBdev;
use crate::crypto::key::XtsKey;
use crate::crypto::xts::{Tier, Xts};
use crate::types::CoreId;
use std::sync::atomic::AtomicBool;

const BS: usize = 4096;

fn key(seed: u8) -> XtsKey {
    let mut k = [0u8; 64];
    for (i, b) in k.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(29).wrapping_add(seed);
    }
    XtsKey::from_bytes(&k).unwrap()
}

fn dk(seed: u8) -> DataKey {
    DataKey::new(&key(seed), None).unwrap()
}

/// Independent engine: `plain` at `lba` under key `seed` (`None` = stored in plaintext).
fn sealed(plain: &[u8], lba: u64, seed: Option<u8>) -> Vec<u8> {
    let mut c = plain.to_vec();
    if let Some(seed) = seed {
        let x = Xts::with_tier(&key(seed), Tier::Soft).unwrap();
        x.encrypt_units(&mut c, BS, lba).unwrap();
    }
    c
}

fn pattern(lba: u64, v: u32) -> Vec<u8> {
    (0..BS)
        .map(|i| (lba as usize * 7 + i * 13 + v as usize * 101 + i / 4093) as u8)
        .collect()
}

/// A base whose completions are held while `hold` is set (I/O stays in flight).
struct Holding {
    inner: Arc<MallocBdev>,
    hold: Arc<AtomicBool>,
}

struct HoldingChannel {
    inner: Box<dyn BdevChannel>,
    hold: Arc<AtomicBool>,
}

impl Bdev for Holding {
    fn name(&self) -> &str {
        "holding"
    }
    fn block_size(&self) -> u32 {
        BS as u32
    }
    fn num_blocks(&self) -> u64 {
        self.inner.num_blocks()
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        self.inner.io_type_supported(t)
    }
    fn open_channel(&self, core: CoreId, qd: usize) -> Result<Box<dyn BdevChannel>, BdevError> {
        Ok(Box::new(HoldingChannel {
            inner: self.inner.open_channel(core, qd)?,
            hold: self.hold.clone(),
        }))
    }
}

impl BdevChannel for HoldingChannel {
    fn submit(&mut self, io: BdevIo) -> Submit {
        self.inner.submit(io)
    }
    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        if self.hold.load(Ordering::Acquire) {
            return 0;
        }
        self.inner.poll(done)
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
}

struct Rig {
    base: Arc<MallocBdev>,
    hold: Arc<AtomicBool>,
    crypto: Arc<CryptoBdev>,
    pool: BufPool,
}

/// A crypto bdev keyed `Single(key 1)` over a holdable malloc of `blocks` units.
fn rig(blocks: u64) -> Rig {
    let base = Arc::new(
        MallocBdev::new(&MallocConfig {
            name: "m".into(),
            num_blocks: Some(blocks),
            size_bytes: None,
            block_size: BS as u32,
            hugepages: false,
        })
        .unwrap(),
    );
    let hold = Arc::new(AtomicBool::new(false));
    let holding = Arc::new(Holding {
        inner: base.clone(),
        hold: hold.clone(),
    });
    let crypto = Arc::new(CryptoBdev::new("c", holding, dk(1), false).unwrap());
    Rig {
        base,
        hold,
        crypto,
        pool: BufPool::new(64, 16 * BS, 4096).unwrap(),
    }
}

fn io(pool: &mut BufPool, t: IoType, lba: u64, data: Option<&[u8]>, blocks: u32) -> BdevIo {
    let mut b = pool.get(blocks as usize * BS).unwrap();
    if let Some(d) = data {
        b.as_mut_slice().copy_from_slice(d);
    }
    BdevIo::new(t, lba, blocks, Some(b), lba)
}

fn wait_one(ch: &mut dyn BdevChannel) -> BdevIo {
    for _ in 0..100_000 {
        let mut got = None;
        ch.poll(&mut |io| got = Some(io));
        if let Some(io) = got {
            return io;
        }
    }
    panic!("I/O did not complete");
}

/// Writes `data` at `lba` through `ch` and waits for it.
fn write(r: &mut Rig, ch: &mut dyn BdevChannel, lba: u64, data: &[u8]) -> Submit {
    let n = (data.len() / BS) as u32;
    match ch.submit(io(&mut r.pool, IoType::Write, lba, Some(data), n)) {
        Submit::Queued => {
            let io = wait_one(ch);
            assert_eq!(io.status, IoStatus::Success);
            r.pool.put(io.buf.unwrap());
            Submit::Queued
        }
        busy => busy,
    }
}

fn read(r: &mut Rig, ch: &mut dyn BdevChannel, lba: u64, blocks: u32) -> Vec<u8> {
    let s = ch.submit(io(&mut r.pool, IoType::Read, lba, None, blocks));
    assert!(matches!(s, Submit::Queued), "read refused");
    let io = wait_one(ch);
    assert_eq!(io.status, IoStatus::Success);
    let b = io.buf.unwrap();
    let v = b.as_slice().to_vec();
    r.pool.put(b);
    v
}

fn base_bytes(r: &mut Rig, lba: u64, blocks: u32) -> Vec<u8> {
    let mut ch = r.base.open_channel(CoreId(0), 4).unwrap();
    assert!(matches!(
        ch.submit(io(&mut r.pool, IoType::Read, lba, None, blocks)),
        Submit::Queued
    ));
    let io = wait_one(ch.as_mut());
    let b = io.buf.unwrap();
    let v = b.as_slice().to_vec();
    r.pool.put(b);
    v
}

#[test]
fn each_unit_is_sealed_with_the_key_of_its_part_on_every_write_path() {
    // (below, above) as key seeds; None = plaintext part (decrypt / encrypt conversions).
    for (below, above) in [(Some(2u8), Some(1u8)), (None, Some(1)), (Some(2), None)] {
        let mut r = rig(32);
        let ctl = r.crypto.key_control().clone();
        let mut ch = r.crypto.open_channel(CoreId(0), 16).unwrap();
        ctl.begin_split(below.map(dk), above.map(dk), 10, 4);
        // Staged path: 8 units across the watermark (6..14).
        let plain: Vec<u8> = (6..14).flat_map(|l| pattern(l, 1)).collect();
        assert!(matches!(
            write(&mut r, ch.as_mut(), 6, &plain),
            Submit::Queued
        ));
        // Out-of-place path: 4 units across it (8..12).
        let plain2: Vec<u8> = (8..12).flat_map(|l| pattern(l, 2)).collect();
        let Ok(w) = WriteFrom::new(io(&mut r.pool, IoType::Write, 8, None, 4), &plain2) else {
            panic!("write from");
        };
        ch.submit_writes_from(&mut std::iter::once(w), &mut |_| panic!("busy"));
        let done = wait_one(ch.as_mut());
        assert_eq!(done.status, IoStatus::Success);
        r.pool.put(done.buf.unwrap());
        for lba in 6..14u64 {
            let v = if (8..12).contains(&lba) { 2 } else { 1 };
            let want = sealed(&pattern(lba, v), lba, if lba < 10 { below } else { above });
            assert_eq!(
                base_bytes(&mut r, lba, 1),
                want,
                "unit {lba} ({below:?}, {above:?})"
            );
        }
        // Reads across the watermark come back in plaintext.
        let back = read(&mut r, ch.as_mut(), 6, 8);
        for (i, lba) in (6..14u64).enumerate() {
            let v = if (8..12).contains(&lba) { 2 } else { 1 };
            assert_eq!(
                back[i * BS..(i + 1) * BS],
                pattern(lba, v)[..],
                "unit {lba}"
            );
        }
    }
}

#[test]
fn the_hot_segment_is_busy_until_the_watermark_moves_past_it() {
    let mut r = rig(32);
    let ctl = r.crypto.key_control().clone();
    let mut ch = r.crypto.open_channel(CoreId(0), 16).unwrap();
    ctl.begin_split(Some(dk(2)), Some(dk(1)), 8, 4);
    ctl.make_hot(Duration::from_secs(5)).unwrap();
    let p = pattern(9, 3);
    assert!(matches!(write(&mut r, ch.as_mut(), 9, &p), Submit::Busy(_)));
    // Across the segment's edge: refused too. Outside it: served.
    let two: Vec<u8> = (11..13).flat_map(|l| pattern(l, 3)).collect();
    assert!(matches!(
        write(&mut r, ch.as_mut(), 11, &two),
        Submit::Busy(_)
    ));
    assert!(matches!(
        write(&mut r, ch.as_mut(), 12, &pattern(12, 3)),
        Submit::Queued
    ));
    assert!(matches!(
        write(&mut r, ch.as_mut(), 7, &pattern(7, 3)),
        Submit::Queued
    ));
    ctl.advance(12).unwrap();
    assert!(matches!(write(&mut r, ch.as_mut(), 9, &p), Submit::Queued));
    assert_eq!(base_bytes(&mut r, 9, 1), sealed(&p, 9, Some(2)));
    assert_eq!(
        base_bytes(&mut r, 12, 1),
        sealed(&pattern(12, 3), 12, Some(1))
    );
}

#[test]
fn a_grace_period_waits_for_io_in_flight_and_only_for_it() {
    let mut r = rig(32);
    let ctl = r.crypto.key_control().clone();
    let mut ch = r.crypto.open_channel(CoreId(0), 16).unwrap();
    ctl.begin_split(Some(dk(2)), Some(dk(1)), 0, 4);
    // A write on the segment, held in flight at the base.
    r.hold.store(true, Ordering::Release);
    let w = io(&mut r.pool, IoType::Write, 1, Some(&pattern(1, 1)), 1);
    assert!(matches!(ch.submit(w), Submit::Queued));
    ch.poll(&mut |_| panic!("held"));
    assert!(matches!(
        ctl.make_hot(Duration::from_millis(100)),
        Err(KeyMapError::GraceTimeout(_))
    ));
    // Segment stays hot after the timeout; retry in a thread while the write is held.
    let ctl2 = ctl.clone();
    let waiter = std::thread::spawn(move || ctl2.make_hot(Duration::from_secs(20)));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !waiter.is_finished(),
        "the grace period ended with I/O in flight"
    );
    // New I/O elsewhere neither blocks nor prolongs it.
    let far = io(&mut r.pool, IoType::Write, 20, Some(&pattern(20, 1)), 1);
    assert!(matches!(ch.submit(far), Submit::Queued));
    r.hold.store(false, Ordering::Release);
    let mut done = 0;
    for _ in 0..100_000 {
        ch.poll(&mut |io| {
            assert_eq!(io.status, IoStatus::Success);
            done += 1;
        });
        if done == 2 {
            break;
        }
    }
    assert_eq!(done, 2);
    waiter.join().unwrap().unwrap();
}

#[test]
fn quiesce_then_a_new_key_is_a_crypto_erase() {
    let mut r = rig(16);
    let ctl = r.crypto.key_control().clone();
    let mut ch = r.crypto.open_channel(CoreId(0), 16).unwrap();
    assert!(matches!(
        write(&mut r, ch.as_mut(), 3, &pattern(3, 1)),
        Submit::Queued
    ));
    ctl.quiesce_all(dk(1), Duration::from_secs(5)).unwrap();
    assert!(matches!(
        ch.submit(io(&mut r.pool, IoType::Read, 3, None, 1)),
        Submit::Busy(_)
    ));
    ctl.set_keying(Keying::Single(dk(9)));
    let old = read(&mut r, ch.as_mut(), 3, 1);
    assert_ne!(
        old,
        pattern(3, 1),
        "old data still readable after the erase"
    );
    assert!(matches!(
        write(&mut r, ch.as_mut(), 3, &pattern(3, 2)),
        Submit::Queued
    ));
    assert_eq!(read(&mut r, ch.as_mut(), 3, 1), pattern(3, 2));
    assert_eq!(base_bytes(&mut r, 3, 1), sealed(&pattern(3, 2), 3, Some(9)));
}

/// A host thread writes and reads back random units through a crypto channel (verifying every
/// read) while the control thread converts the whole area key 1 → key 2 segment by segment,
/// exactly as the pass does: hot, read the base, transform, write the base, advance. A write
/// lost to the pass, or sealed or opened with the wrong part's key, fails a read.
#[test]
fn a_conversion_racing_a_verifying_host_loses_nothing() {
    let blocks = 64u64;
    let mut r = rig(blocks);
    let ctl = r.crypto.key_control().clone();
    {
        // Version 0 everywhere under key 1.
        let mut ch = r.crypto.open_channel(CoreId(0), 16).unwrap();
        for lba in 0..blocks {
            assert!(matches!(
                write(&mut r, ch.as_mut(), lba, &pattern(lba, 0)),
                Submit::Queued
            ));
        }
    }
    let split = ctl.begin_split(Some(dk(2)), Some(dk(1)), 0, 4);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let crypto = r.crypto.clone();
    let hostthread = std::thread::spawn(move || {
        // The host's channel lives on its thread, as on a reactor.
        let mut host = crypto.open_channel(CoreId(0), 16).unwrap();
        let mut pool = BufPool::new(64, 16 * BS, 4096).unwrap();
        let mut model: Vec<u32> = vec![0; blocks as usize];
        let mut x = 0x2545f4914f6cdd1du64;
        let mut v = 0u32;
        let mut busy = 0u64;
        let mut ios = 0u64;
        while !stop2.load(Ordering::Acquire) || ios < 2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let lba = x % blocks;
            let is_write = x & 0x100 != 0;
            let mut b = pool.get(BS).unwrap();
            if is_write {
                v += 1;
                b.as_mut_slice().copy_from_slice(&pattern(lba, v));
            }
            let t = if is_write {
                IoType::Write
            } else {
                IoType::Read
            };
            match host.submit(BdevIo::new(t, lba, 1, Some(b), lba)) {
                Submit::Busy(io) => {
                    busy += 1;
                    pool.put(io.buf.unwrap());
                    std::thread::yield_now();
                    continue;
                }
                Submit::Queued => {}
            }
            let io = wait_one(host.as_mut());
            assert_eq!(io.status, IoStatus::Success);
            let b = io.buf.unwrap();
            if is_write {
                model[lba as usize] = v;
            } else {
                assert_eq!(
                    b.as_slice(),
                    &pattern(lba, model[lba as usize])[..],
                    "unit {lba}: read back other data than version {}",
                    model[lba as usize]
                );
            }
            pool.put(b);
            ios += 1;
        }
        (model, busy, ios)
    });
    // The pass, on this thread with its own base channel.
    let base = r.base.clone();
    let mut bch = base.open_channel(CoreId(0), 4).unwrap();
    let old = Xts::with_tier(&key(1), Tier::Soft).unwrap();
    let new = Xts::with_tier(&key(2), Tier::Soft).unwrap();
    let mut w = 0;
    while w < blocks {
        ctl.make_hot(Duration::from_secs(20)).unwrap();
        let n = 4u32.min((blocks - w) as u32);
        assert!(matches!(
            bch.submit(io(&mut r.pool, IoType::Read, w, None, n)),
            Submit::Queued
        ));
        let got = wait_one(bch.as_mut());
        let mut b = got.buf.unwrap();
        // Hold the segment a while, as a pass on a slow device would: a host write that got
        // in now would be overwritten below.
        std::thread::sleep(Duration::from_millis(1));
        old.decrypt_units(b.as_mut_slice(), BS, w).unwrap();
        new.encrypt_units(b.as_mut_slice(), BS, w).unwrap();
        assert!(matches!(
            bch.submit(BdevIo::new(IoType::Write, w, n, Some(b), 0)),
            Submit::Queued
        ));
        let done = wait_one(bch.as_mut());
        r.pool.put(done.buf.unwrap());
        w += u64::from(n);
        ctl.advance(w).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(split.watermark(), blocks);
    ctl.set_keying(Keying::Single(dk(2)));
    stop.store(true, Ordering::Release);
    let (model, _busy, ios) = hostthread.join().unwrap();
    assert!(ios >= 2000);
    // Everything on the base is now under key 2 and holds the host's last version.
    for lba in 0..blocks {
        assert_eq!(
            base_bytes(&mut r, lba, 1),
            sealed(&pattern(lba, model[lba as usize]), lba, Some(2)),
            "unit {lba}"
        );
    }
}

#[test]
fn debug_output_of_a_keying_never_carries_key_material() {
    let r = rig(8);
    let ctl = r.crypto.key_control().clone();
    ctl.begin_split(Some(dk(2)), Some(dk(1)), 3, 2);
    let text = format!("{:?} {:?}", ctl, ctl.keying());
    assert!(text.contains("redacted"), "{text}");
    for seed in [1u8, 2] {
        let k = key(seed);
        let bytes = k.expose_secret();
        // Neither the key as hex nor any 8-byte window of it as a decimal list.
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!text.contains(&hex[..16]), "key hex in {text}");
        let dec = format!("{:?}", &bytes[..8]);
        assert!(
            !text.contains(&dec[1..dec.len() - 1]),
            "key bytes in {text}"
        );
    }
}

/// A replaced key is not kept alive by an idle channel: its next poll drops its cached copy,
/// so the last holder lets go and the key's memory is wiped (LockedBox) without waiting for the
/// next I/O on that channel.
#[test]
fn an_idle_channel_lets_go_of_a_replaced_key_on_poll() {
    let r = rig(16);
    let ctl = r.crypto.key_control().clone();
    let mut ch = r.crypto.open_channel(CoreId(0), 16).unwrap();
    let old = match ctl.keying() {
        Keying::Single(k) => k,
        Keying::Split(_) => unreachable!("rig is keyed Single"),
    };
    let probe = std::sync::Arc::downgrade(&old.xts_arc());
    drop(old);
    ctl.set_keying(Keying::Single(dk(9)));
    assert!(
        probe.upgrade().is_some(),
        "the channel still caches the old key"
    );
    ch.poll(&mut |_| {});
    assert!(
        probe.upgrade().is_none(),
        "the old key outlived the poll that saw the new keying"
    );
}
