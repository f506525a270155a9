//! The key manager's deep rekey on a real crypto bdev (malloc backing, local key provider):
//! every block checked after the pass and after a restart; pause, resume and a restart
//! mid-pass (the unlock path recovers and resumes it); the requests it must refuse.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::super::*;
use crate::bdev::malloc::{self, MallocConfig};
use crate::bdev::{run_blocking, Bdev, BdevIo, IoBuf, IoStatus, IoType};
use crate::keys::convert::{JOURNAL_OFFSET_BYTES, RECORD_HEADER_BYTES};
use crate::keys::header::METADATA_REGION_BYTES;
use crate::keys::header_io::BdevHeaderIo;
use crate::keys::store::{self, HeaderIo};
use crate::keys::CopyId;
use crate::sys::buf::AlignedBuf;
use crate::types::CoreId;

pub(in crate::keys::manager) const BS: u32 = 4096;
/// 8 MiB of data: 16 segments of 512 KiB.
pub(in crate::keys::manager) const DATA_BLOCKS: u64 = 2048;

pub(in crate::keys::manager) fn keys_cfg(dir: &std::path::Path) -> KeysConfig {
    KeysConfig {
        local: Some(LocalKeysConfig {
            path: dir.join("keys"),
            create: true,
        }),
        ..KeysConfig::default()
    }
}

pub(in crate::keys::manager) fn dev() -> Arc<dyn Bdev> {
    malloc::open(&MallocConfig {
        name: "deep".into(),
        num_blocks: None,
        size_bytes: Some(METADATA_REGION_BYTES + DATA_BLOCKS * u64::from(BS)),
        block_size: BS,
        hugepages: false,
    })
    .expect("malloc")
}

fn add(m: &KeyManager, d: &Arc<dyn Bdev>) {
    let hio = BdevHeaderIo::new(d.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio");
    let key = NamespaceKeyConfig {
        provider: LOCAL_PROVIDER.into(),
        kek_name: None,
    };
    m.add_encrypted("test", "ns", d.clone(), Box::new(hio), &key, true)
        .expect("add");
    let st = m
        .wait_for("ns", Duration::from_secs(30), |s| {
            matches!(
                s,
                NamespaceKeyState::Online | NamespaceKeyState::Error { .. }
            )
        })
        .expect("status");
    assert_eq!(st.state, NamespaceKeyState::Online, "{st:?}");
}

pub(in crate::keys::manager) fn io(
    b: &Arc<dyn Bdev>,
    t: IoType,
    lba: u64,
    data: Option<&[u8]>,
    n: u32,
) -> Vec<u8> {
    let len = n as usize * BS as usize;
    let mut mem = AlignedBuf::zeroed(len, 4096).expect("buf");
    if let Some(d) = data {
        mem.as_mut_slice().copy_from_slice(d);
    }
    let done = run_blocking(
        b.as_ref(),
        CoreId(0),
        BdevIo::new(t, lba, n, Some(IoBuf::new(mem, len)), 0),
        Duration::from_secs(10),
    )
    .expect("io");
    assert_eq!(done.status, IoStatus::Success, "{t:?} at {lba}");
    done.buf.expect("buf").as_slice().to_vec()
}

pub(in crate::keys::manager) fn pattern(lba: u64, gen: u8) -> Vec<u8> {
    (0..BS as usize)
        .map(|i| (lba as u8) ^ (i as u8).wrapping_mul(7) ^ gen)
        .collect()
}

/// Writes a distinct pattern to every block through the crypto bdev.
pub(in crate::keys::manager) fn fill(b: &Arc<dyn Bdev>, gen: u8) -> BTreeMap<u64, Vec<u8>> {
    let mut m = BTreeMap::new();
    for lba in 0..DATA_BLOCKS {
        let p = pattern(lba, gen);
        io(b, IoType::Write, lba, Some(&p), 1);
        m.insert(lba, p);
    }
    m
}

pub(in crate::keys::manager) fn check(b: &Arc<dyn Bdev>, want: &BTreeMap<u64, Vec<u8>>) {
    let all = io(b, IoType::Read, 0, None, DATA_BLOCKS as u32);
    for (lba, p) in want {
        let off = *lba as usize * BS as usize;
        assert!(&all[off..off + BS as usize] == p.as_slice(), "block {lba}");
    }
}

/// The raw (ciphertext) data area of the backing device.
pub(in crate::keys::manager) fn raw_data(d: &Arc<dyn Bdev>) -> Vec<u8> {
    let mut v = vec![0u8; (DATA_BLOCKS * u64::from(BS)) as usize];
    let bytes = d.num_blocks() * u64::from(d.block_size());
    BdevHeaderIo::new(d.clone(), CoreId(0), bytes)
        .expect("whole")
        .read_at(METADATA_REGION_BYTES, &mut v)
        .expect("read");
    v
}

fn header_copies(d: &Arc<dyn Bdev>) -> (crate::keys::Header, crate::keys::Header) {
    let mut hio = BdevHeaderIo::new(d.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio");
    (
        store::read_copy(&mut hio, CopyId::A).expect("copy A"),
        store::read_copy(&mut hio, CopyId::B).expect("copy B"),
    )
}

pub(in crate::keys::manager) fn journal_is_zero(d: &Arc<dyn Bdev>) -> bool {
    let mut hio = BdevHeaderIo::new(d.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio");
    let mut b = vec![0u8; RECORD_HEADER_BYTES + 512 * 1024];
    hio.read_at(JOURNAL_OFFSET_BYTES, &mut b).expect("read");
    b.iter().all(|&x| x == 0)
}

/// A whole pass with no host I/O: every block reads back; every block's ciphertext changed;
/// both header copies hold only the new wrapped DEK and the journal is zero; a new manager
/// (a restart) opens it with the new DEK.
#[test]
fn deep_rekey_reencrypts_every_block_and_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dev();
    let (old_slot, want) = {
        let m = KeyManager::new(&keys_cfg(dir.path()), ManagerOptions::default()).expect("m");
        add(&m, &d);
        let b = m.bdev("ns").expect("bdev");
        let want = fill(&b, 1);
        let before = raw_data(&d);
        let old_slot = header_copies(&d).0.active;
        let st = m.deep_rekey("test", "ns", None, None).expect("start");
        assert_eq!(st.data_blocks, DATA_BLOCKS);
        let st = m.wait_rekey("ns", Duration::from_secs(60)).expect("status");
        assert_eq!(st.state, DeepState::Finished, "{st:?}");
        assert_eq!(st.watermark_blocks, DATA_BLOCKS);
        assert_eq!(st.percent, 100.0);
        check(&b, &want);
        let after = raw_data(&d);
        for lba in 0..DATA_BLOCKS as usize {
            let r = lba * BS as usize..(lba + 1) * BS as usize;
            assert!(
                before[r.clone()] != after[r],
                "block {lba} was not re-encrypted"
            );
        }
        let (a, bb) = header_copies(&d);
        for h in [&a, &bb] {
            assert_eq!(h.rekey, RekeyState::None);
            assert!(
                h.active.wrapped_dek != old_slot.wrapped_dek,
                "old wrapped DEK left"
            );
            assert_eq!(
                h.active.kek_id, old_slot.kek_id,
                "same KEK when no provider is named"
            );
        }
        assert!(journal_is_zero(&d));
        let ks = m.state("ns").expect("state");
        assert_eq!(
            ks.deep_rekey.as_ref().map(|s| s.state),
            Some(DeepState::Finished)
        );
        (old_slot, want)
    };
    let m = KeyManager::new(&keys_cfg(dir.path()), ManagerOptions::default()).expect("m2");
    add(&m, &d);
    check(&m.bdev("ns").expect("bdev"), &want);
    assert!(header_copies(&d).0.active.wrapped_dek != old_slot.wrapped_dek);
}

/// Pause stops between segments with a clean watermark; host writes during the pass land on
/// both sides of it; the manager is dropped mid-pass (a restart) and the next unlock resumes
/// and finishes the pass without being asked; every block is right at the end.
#[test]
fn pause_resume_and_restart_mid_pass() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dev();
    let mut want;
    {
        let m = KeyManager::new(&keys_cfg(dir.path()), ManagerOptions::default()).expect("m");
        add(&m, &d);
        let b = m.bdev("ns").expect("bdev");
        want = fill(&b, 1);
        // 2 MiB/s: a 512 KiB segment every 0.25 s.
        m.deep_rekey("test", "ns", None, Some(2)).expect("start");
        std::thread::sleep(Duration::from_millis(400));
        let st = m.pause_rekey("test", "ns").expect("pause");
        assert_eq!(st.state, DeepState::Paused);
        assert!(
            st.watermark_blocks > 0 && st.watermark_blocks < DATA_BLOCKS,
            "{st:?}"
        );
        assert_eq!(st.watermark_blocks % 128, 0, "segment-aligned: {st:?}");
        // Host writes on both sides of the watermark, while paused.
        for lba in [
            0,
            st.watermark_blocks - 1,
            st.watermark_blocks,
            DATA_BLOCKS - 1,
        ] {
            let p = pattern(lba, 2);
            io(&b, IoType::Write, lba, Some(&p), 1);
            want.insert(lba, p);
        }
        check(&b, &want);
        // Refusals while paused.
        assert!(matches!(
            m.pause_rekey("test", "ns"),
            Err(DeepRekeyError::NothingToDo { .. })
        ));
        assert!(matches!(
            m.deep_rekey("test", "ns", None, None),
            Err(DeepRekeyError::Busy { .. })
        ));
        // Resume at 2 MiB/s again, then "crash" (drop the manager) mid-pass.
        m.resume_rekey("test", "ns", Some(2)).expect("resume");
        std::thread::sleep(Duration::from_millis(300));
        let st = m.rekey_status(Some("ns")).expect("status");
        assert_eq!(st[0].state, DeepState::Running);
    }
    let (a, _) = header_copies(&d);
    let RekeyState::Deep(deep) = &a.rekey else {
        panic!("the header lost the deep rekey: {:?}", a.rekey);
    };
    assert!(deep.watermark_blocks < DATA_BLOCKS);
    let m = KeyManager::new(&keys_cfg(dir.path()), ManagerOptions::default()).expect("m2");
    add(&m, &d);
    let b = m.bdev("ns").expect("bdev");
    check(&b, &want);
    let st = m.wait_rekey("ns", Duration::from_secs(60)).expect("status");
    assert_eq!(st.state, DeepState::Finished, "{st:?}");
    check(&b, &want);
    assert!(journal_is_zero(&d));
    let (a, bb) = header_copies(&d);
    assert_eq!(a.rekey, RekeyState::None);
    assert_eq!(a.active, bb.active);
}

/// Requests that must be refused, each with nothing written.
#[test]
fn bad_requests_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dev();
    let m = KeyManager::new(&keys_cfg(dir.path()), ManagerOptions::default()).expect("m");
    add(&m, &d);
    let before = header_copies(&d);
    assert!(matches!(
        m.deep_rekey("t", "nope", None, None),
        Err(DeepRekeyError::UnknownNamespace(_))
    ));
    for rate in [0, MAX_RATE_MIB_S + 1, u64::MAX] {
        assert!(matches!(
            m.deep_rekey("t", "ns", None, Some(rate)),
            Err(DeepRekeyError::BadRate(_))
        ));
    }
    assert!(matches!(
        m.deep_rekey("t", "ns", Some("kms-nowhere"), None),
        Err(DeepRekeyError::UnknownProvider(_))
    ));
    assert!(matches!(
        m.pause_rekey("t", "ns"),
        Err(DeepRekeyError::NothingToDo { .. })
    ));
    assert!(matches!(
        m.resume_rekey("t", "ns", None),
        Err(DeepRekeyError::NothingToDo { .. })
    ));
    assert!(m.rekey_status(Some("ns")).expect("status").is_empty());
    assert_eq!(
        header_copies(&d),
        before,
        "a refused request wrote the header"
    );
}

/// Power loss at every I/O of a deep rekey on a drive with a volatile cache (`sim`): the drive
/// dies at the Nth I/O of the pass (that I/O and all later ones fail), then the unflushed
/// writes are torn block by block (a torn journal write, a torn header-copy write, depending on
/// where N falls), then a new manager opens the image: it recovers, resumes, finishes, and every
/// block reads back as written. N runs over every I/O of the pass (and past its end).
#[test]
fn power_loss_at_every_io_of_a_pass_with_torn_writes() {
    use crate::bdev::sim::{CrashMode, SimBdev, SimConfig};
    const BLOCKS: u64 = 512; // 2 MiB: 4 segments
    let dir = tempfile::tempdir().expect("tempdir");
    let mut torn = 0usize;
    let mut n = 1u64;
    loop {
        let sim = SimBdev::open(&SimConfig {
            name: "sim".into(),
            num_blocks: None,
            size_bytes: Some(METADATA_REGION_BYTES + BLOCKS * u64::from(BS)),
            block_size: BS,
            seed: n,
            fail_nth: None,
            fail_ratio: 0.0,
            cache_blocks: 4096,
        })
        .expect("sim");
        let d: Arc<dyn Bdev> = sim.clone();
        let want: BTreeMap<u64, Vec<u8>>;
        let ended;
        {
            let m = KeyManager::new(&keys_cfg(dir.path()), ManagerOptions::default()).expect("m");
            add(&m, &d);
            let b = m.bdev("ns").expect("bdev");
            want = (0..BLOCKS)
                .map(|lba| {
                    let p = pattern(lba, 3);
                    io(&b, IoType::Write, lba, Some(&p), 1);
                    (lba, p)
                })
                .collect();
            run_blocking(
                d.as_ref(),
                CoreId(0),
                BdevIo::new(IoType::Flush, 0, 0, None, 0),
                Duration::from_secs(5),
            )
            .expect("flush");
            sim.die_in(n);
            m.deep_rekey("test", "ns", None, None).ok();
            let st = m.wait_rekey("ns", Duration::from_secs(30));
            ended = st.map(|s| s.state);
        }
        let report = sim.crash(CrashMode::Torn);
        torn += report.torn_writes;
        sim.revive();
        let m = KeyManager::new(&keys_cfg(dir.path()), ManagerOptions::default()).expect("m2");
        add(&m, &d);
        let b = m.bdev("ns").expect("bdev");
        if let Some(st) = m.wait_rekey("ns", Duration::from_secs(30)) {
            assert_eq!(st.state, DeepState::Finished, "N={n}: {st:?}");
        }
        let all = io(&b, IoType::Read, 0, None, BLOCKS as u32);
        for (lba, p) in &want {
            let off = *lba as usize * BS as usize;
            assert!(
                &all[off..off + BS as usize] == p.as_slice(),
                "N={n}: block {lba} lost after a power loss (first run ended {ended:?}, {report:?})"
            );
        }
        drop(m);
        if ended == Some(DeepState::Finished) {
            // N fell past the pass's last I/O: every point has been covered.
            break;
        }
        n += 1;
        assert!(n < 500, "the pass never finished");
    }
    assert!(n > 20, "only {n} I/O points in a pass");
    assert!(torn > 0, "no write was ever torn");
    eprintln!("power loss at each of {n} I/O points; {torn} torn writes");
}
