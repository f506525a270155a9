//! The deep-rekey pass on a real stack (malloc → slice → crypto) with a host verifying its I/O
//! on another thread, a pause and resume, and a data write that fails half-way through a segment.

use super::*;
use crate::bdev::malloc::{MallocBdev, MallocConfig};
use crate::bdev::slice::SliceBdev;
use crate::bdev::{BufPool, Submit};
use crate::crypto::bdev::CryptoBdev;
use crate::crypto::key::XtsKey;
use crate::crypto::xts::{Tier, Xts};
use crate::keys::header::tests::{sample, slot};
use crate::keys::header::{DataUnit, METADATA_REGION_BYTES};
use crate::keys::header_io::BdevHeaderIo;
use crate::keys::store;

pub(super) const BS: usize = 4096;
pub(super) const BLOCKS: u64 = 48;
const META_BLOCKS: u64 = METADATA_REGION_BYTES / BS as u64;

pub(super) fn key(seed: u8) -> XtsKey {
    let mut k = [0u8; 64];
    for (i, b) in k.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(29).wrapping_add(seed);
    }
    XtsKey::from_bytes(&k).unwrap()
}

pub(super) fn dk(seed: u8) -> DataKey {
    DataKey::new(&key(seed), None).unwrap()
}

pub(super) fn pattern(lba: u64, v: u32) -> Vec<u8> {
    (0..BS)
        .map(|i| (lba as usize * 7 + i * 13 + v as usize * 101 + i / 4093) as u8)
        .collect()
}

pub(super) struct Stack {
    pub(super) base: Arc<dyn Bdev>,
    pub(super) slice: Arc<dyn Bdev>,
    pub(super) crypto: Arc<CryptoBdev>,
    pub(super) stored: Stored,
}

pub(super) fn stack() -> Stack {
    let base: Arc<dyn Bdev> = Arc::new(
        MallocBdev::new(&MallocConfig {
            name: "m".into(),
            num_blocks: Some(META_BLOCKS + BLOCKS),
            size_bytes: None,
            block_size: BS as u32,
            hugepages: false,
        })
        .unwrap(),
    );
    let slice: Arc<dyn Bdev> =
        Arc::new(SliceBdev::new("s", base.clone(), META_BLOCKS, BLOCKS).unwrap());
    let mut h = sample();
    h.generation = 1;
    h.data_unit = DataUnit::Bytes4096;
    h.data_blocks = BLOCKS;
    let mut meta = BdevHeaderIo::new(base.clone(), CoreId(0), METADATA_REGION_BYTES).unwrap();
    let stored = store::format(&mut meta, &h).unwrap();
    let crypto = Arc::new(CryptoBdev::new("c", slice.clone(), dk(1), false).unwrap());
    Stack {
        base,
        slice,
        crypto,
        stored,
    }
}

/// Runs one I/O through `ch` to completion; `None` if it was refused as Busy.
fn sync_io(
    ch: &mut dyn crate::bdev::BdevChannel,
    pool: &mut BufPool,
    write: Option<&[u8]>,
    lba: u64,
) -> Option<Vec<u8>> {
    let mut b = pool.get(BS).unwrap();
    if let Some(d) = write {
        b.as_mut_slice().copy_from_slice(d);
    }
    let t = if write.is_some() {
        IoType::Write
    } else {
        IoType::Read
    };
    if let Submit::Busy(io) = ch.submit(BdevIo::new(t, lba, 1, Some(b), lba)) {
        pool.put(io.buf.unwrap());
        return None;
    }
    for _ in 0..1_000_000 {
        let mut got = None;
        ch.poll(&mut |io| got = Some(io));
        if let Some(io) = got {
            assert_eq!(io.status, IoStatus::Success);
            let b = io.buf.unwrap();
            let v = b.as_slice().to_vec();
            pool.put(b);
            return Some(v);
        }
    }
    panic!("I/O did not complete");
}

/// A host on its own thread: random writes and verified reads until `stop` (at least 500).
fn host(
    crypto: Arc<CryptoBdev>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<u32>, u64)> {
    std::thread::spawn(move || {
        let mut ch = crypto.open_channel(CoreId(0), 8).unwrap();
        let mut pool = BufPool::new(8, BS, 4096).unwrap();
        let mut model = vec![0u32; BLOCKS as usize];
        for lba in 0..BLOCKS {
            while sync_io(ch.as_mut(), &mut pool, Some(&pattern(lba, 0)), lba).is_none() {
                std::thread::yield_now();
            }
        }
        let (mut x, mut v, mut ios) = (0x9e3779b97f4a7c15u64, 0u32, 0u64);
        while !stop.load(Ordering::Acquire) || ios < 500 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let lba = x % BLOCKS;
            if x & 0x100 != 0 {
                let next = v + 1;
                if sync_io(ch.as_mut(), &mut pool, Some(&pattern(lba, next)), lba).is_some() {
                    v = next;
                    model[lba as usize] = v;
                    ios += 1;
                }
            } else if let Some(got) = sync_io(ch.as_mut(), &mut pool, None, lba) {
                assert_eq!(got, pattern(lba, model[lba as usize]), "unit {lba}");
                ios += 1;
            }
            std::thread::yield_now();
        }
        (model, ios)
    })
}

pub(super) fn check_base(s: &Stack, model: &[u32], seed: u8) {
    let x = Xts::with_tier(&key(seed), Tier::Soft).unwrap();
    let mut data = BdevDataIo::new(s.slice.clone(), CoreId(0));
    for lba in 0..BLOCKS {
        let mut b = vec![0u8; BS];
        data.read_blocks(lba, &mut b).unwrap();
        x.decrypt_units(&mut b, BS, lba).unwrap();
        assert_eq!(b, pattern(lba, model[lba as usize]), "unit {lba}");
    }
}

pub(super) fn now() -> u64 {
    1_800_000_000
}

#[test]
fn a_deep_rekey_under_a_verifying_host_with_a_pause_finishes_and_loses_nothing() {
    let s = stack();
    let stop = Arc::new(AtomicBool::new(false));
    let h = host(s.crypto.clone(), stop.clone());
    // Let the host lay down version 0 first.
    std::thread::sleep(Duration::from_millis(50));
    let mut meta = BdevHeaderIo::new(s.base.clone(), CoreId(0), METADATA_REGION_BYTES).unwrap();
    let mut data = BdevDataIo::new(s.slice.clone(), CoreId(0));
    let mut io = NamespaceIo {
        meta: &mut meta,
        data: &mut data,
    };
    let cur = convert::begin(&mut io, &s.stored, slot("new-kek", 9), 4, now()).unwrap();
    let ctl = s.crypto.key_control().clone();
    let (old, new) = (dk(1), dk(2));
    let control = PassControl::new(0);
    control.pause();
    let PassEnd::Paused(cur) = run(&mut io, cur, &ctl, &old, &new, &control, &now).unwrap() else {
        panic!("not paused");
    };
    assert_eq!(control.watermark(), 0);
    control.resume();
    let PassEnd::Finished(done) = run(&mut io, cur, &ctl, &old, &new, &control, &now).unwrap()
    else {
        panic!("not finished");
    };
    assert_eq!(done.header.active, slot("new-kek", 9));
    assert_eq!(control.watermark(), BLOCKS);
    assert_eq!(control.bytes_done(), BLOCKS * BS as u64);
    assert!(matches!(ctl.keying(), Keying::Single(_)));
    stop.store(true, Ordering::Release);
    let (model, ios) = h.join().unwrap();
    assert!(ios >= 500);
    check_base(&s, &model, 2);
}

/// Writes durably until the `fail_at`th data write, which lands half and fails.
struct TearingData {
    inner: BdevDataIo,
    writes: u32,
    fail_at: u32,
}

impl DataIo for TearingData {
    fn read_blocks(&mut self, lba: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_blocks(lba, buf)
    }
    fn write_blocks_durable(&mut self, lba: u64, buf: &[u8]) -> io::Result<()> {
        self.writes += 1;
        if self.writes == self.fail_at {
            let half = buf.len() / 2;
            self.inner.write_blocks_durable(lba, &buf[..half])?;
            return Err(io::Error::other("simulated write error"));
        }
        self.inner.write_blocks_durable(lba, buf)
    }
}

#[test]
fn a_segment_write_that_fails_half_way_is_restored_before_the_host_sees_it() {
    let s = stack();
    let stop = Arc::new(AtomicBool::new(false));
    let h = host(s.crypto.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(50));
    let mut meta = BdevHeaderIo::new(s.base.clone(), CoreId(0), METADATA_REGION_BYTES).unwrap();
    let mut data = TearingData {
        inner: BdevDataIo::new(s.slice.clone(), CoreId(0)),
        writes: 0,
        fail_at: 3,
    };
    let mut io = NamespaceIo {
        meta: &mut meta,
        data: &mut data,
    };
    let cur = convert::begin(&mut io, &s.stored, slot("new-kek", 9), 4, now()).unwrap();
    let ctl = s.crypto.key_control().clone();
    let (old, new) = (dk(1), dk(2));
    let control = PassControl::new(0);
    let err = run(&mut io, cur, &ctl, &old, &new, &control, &now).unwrap_err();
    assert!(
        matches!(err, PassError::Convert(ConvertError::Io(_))),
        "{err}"
    );
    // Two segments done, the third restored; the host keeps verifying meanwhile.
    assert_eq!(control.watermark(), 8);
    std::thread::sleep(Duration::from_millis(50));
    let cur = store::read_header(&mut io).unwrap();
    let PassEnd::Finished(_) = run(&mut io, cur, &ctl, &old, &new, &control, &now).unwrap() else {
        panic!("not finished");
    };
    stop.store(true, Ordering::Release);
    let (model, _) = h.join().unwrap();
    check_base(&s, &model, 2);
}
