//! `namespace.encrypt` / `namespace.decrypt` through the key manager on a real crypto bdev
//! (malloc backing, local key provider): a plaintext namespace with a reserved region encrypted
//! and decrypted back with every block checked through the bdev and on the device, across
//! restarts; a pause and a restart mid-encrypt that resumes by itself; a detached header file
//! (created by the encrypt, checked at every start); and the requests that must be refused with
//! nothing written.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::super::deep::tests::{
    check, dev, fill, journal_is_zero, keys_cfg, raw_data, BS, DATA_BLOCKS,
};
use super::super::*;
use crate::bdev::malloc::{self, MallocConfig};
use crate::bdev::Bdev;
use crate::keys::header::{AnyHeader, METADATA_REGION_BYTES};
use crate::keys::header_io::{BdevHeaderIo, FileHeaderIo};
use crate::keys::store::{self, HeaderIo};
use crate::keys::CopyId;
use crate::types::CoreId;

fn opts(plaintext: bool, header_file: Option<&Path>) -> NamespaceOptions {
    NamespaceOptions {
        create: false,
        plaintext,
        header_file: header_file.map(Path::to_path_buf),
    }
}

/// Registers `ns_id` on `d` and waits until it is online or in error.
fn add_as(m: &KeyManager, ns_id: &str, d: &Arc<dyn Bdev>, o: &NamespaceOptions) -> NamespaceStatus {
    let hio = BdevHeaderIo::new(d.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio");
    let key = NamespaceKeyConfig {
        provider: LOCAL_PROVIDER.into(),
        kek_name: None,
    };
    m.add_namespace("test", ns_id, d.clone(), Box::new(hio), &key, o)
        .expect("add");
    m.wait_for(ns_id, Duration::from_secs(30), |s| {
        matches!(
            s,
            NamespaceKeyState::Online | NamespaceKeyState::Error { .. }
        )
    })
    .expect("status")
}

fn online(st: &NamespaceStatus) {
    assert_eq!(st.state, NamespaceKeyState::Online, "{st:?}");
}

fn finish(m: &KeyManager, ns_id: &str) -> DeepRekeyStatus {
    let st = m
        .wait_rekey(ns_id, Duration::from_secs(60))
        .expect("status");
    assert_eq!(st.state, DeepState::Finished, "{st:?}");
    st
}

fn manager(dir: &Path) -> KeyManager {
    KeyManager::new(&keys_cfg(dir), ManagerOptions::default()).expect("manager")
}

fn plain_of(want: &std::collections::BTreeMap<u64, Vec<u8>>) -> Vec<u8> {
    want.values().flatten().copied().collect()
}

/// No block of the device's data area equals the plaintext that was written there.
fn assert_ciphertext(raw: &[u8], plain: &[u8]) {
    for (lba, (r, p)) in raw
        .chunks(BS as usize)
        .zip(plain.chunks(BS as usize))
        .enumerate()
    {
        assert!(r != p, "block {lba} is plaintext on the device");
    }
}

fn any_copies(io: &mut dyn HeaderIo) -> [AnyHeader; 2] {
    CopyId::ALL.map(|c| store::read_copy_any(io, c).expect("copy"))
}

/// Plaintext (reserved region, no header) → encrypt → restart → decrypt → restart: the data
/// reads back at every stage, the device holds ciphertext after the encrypt and plaintext after
/// the decrypt, both header copies end retired with no key, the journal is zero.
#[test]
fn encrypt_then_decrypt_in_place_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dev();
    let o = opts(true, None);
    let want = {
        let m = manager(dir.path());
        let st = add_as(&m, "ns", &d, &o);
        online(&st);
        assert_eq!(st.data_state, Some(DataState::Plaintext));
        let b = m.bdev("ns").expect("bdev");
        assert_eq!(b.num_blocks(), DATA_BLOCKS, "the size hosts see");
        let want = fill(&b, 3);
        assert_eq!(raw_data(&d), plain_of(&want), "plaintext on the device");
        let st = m.encrypt_namespace("test", "ns", None).expect("encrypt");
        assert_eq!(st.operation, PassOp::Encrypt);
        finish(&m, "ns");
        check(&b, &want);
        assert_ciphertext(&raw_data(&d), &plain_of(&want));
        let ks = m.state("ns").expect("state");
        assert_eq!(ks.data_state, Some(DataState::Encrypted));
        assert!(ks.kek_id.is_some());
        assert!(
            journal_is_zero(&d),
            "the journal held plaintext; it must be zero"
        );
        let mut hio = BdevHeaderIo::new(d.clone(), CoreId(0), METADATA_REGION_BYTES).unwrap();
        for h in any_copies(&mut hio) {
            let AnyHeader::Keyed(h) = h else {
                panic!("a copy is not keyed after the encrypt")
            };
            assert_eq!(h.rekey, RekeyState::None);
        }
        want
    };
    // Restart: the header is an ordinary encrypted one now.
    let m = manager(dir.path());
    online(&add_as(&m, "ns", &d, &o));
    let b = m.bdev("ns").expect("bdev");
    check(&b, &want);
    assert_eq!(
        m.state("ns").unwrap().data_state,
        Some(DataState::Encrypted)
    );
    let st = m
        .decrypt_namespace("test", "ns", Some(10_000))
        .expect("decrypt");
    assert_eq!(st.operation, PassOp::Decrypt);
    finish(&m, "ns");
    check(&b, &want);
    assert_eq!(raw_data(&d), plain_of(&want), "plaintext on the device");
    let mut hio = BdevHeaderIo::new(d.clone(), CoreId(0), METADATA_REGION_BYTES).unwrap();
    for h in any_copies(&mut hio) {
        assert!(matches!(h, AnyHeader::Plain(_)), "{h:?}");
    }
    assert!(journal_is_zero(&d));
    assert_eq!(
        m.state("ns").unwrap().data_state,
        Some(DataState::Plaintext)
    );
    drop((b, m));
    // Restart: served from the retired header, even without `plaintext`.
    let m = manager(dir.path());
    let st = add_as(&m, "ns", &d, &opts(false, None));
    online(&st);
    assert_eq!(st.data_state, Some(DataState::Plaintext));
    check(&m.bdev("ns").expect("bdev"), &want);
}

/// A paused encrypt is resumed by a restart on its own (the DEK is in the header before any
/// unit is encrypted); the data reads back throughout.
#[test]
fn encrypt_paused_then_restarted_resumes_by_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dev();
    let o = opts(true, None);
    let want = {
        let m = manager(dir.path());
        online(&add_as(&m, "ns", &d, &o));
        let b = m.bdev("ns").expect("bdev");
        let want = fill(&b, 5);
        // Slow enough to pause part way.
        m.encrypt_namespace("test", "ns", Some(4)).expect("encrypt");
        std::thread::sleep(Duration::from_millis(300));
        let st = m.pause_rekey("test", "ns").expect("pause");
        assert_eq!(st.state, DeepState::Paused);
        assert!(st.watermark_blocks < DATA_BLOCKS, "{st:?}");
        check(&b, &want);
        let ks = m.state("ns").unwrap();
        assert_eq!(ks.data_state, Some(DataState::Converting));
        assert!(ks.conversion.is_some() && ks.deep_rekey.is_none(), "{ks:?}");
        want
    };
    let m = manager(dir.path());
    let st = add_as(&m, "ns", &d, &o);
    online(&st);
    assert_eq!(st.data_state, Some(DataState::Converting));
    finish(&m, "ns");
    check(&m.bdev("ns").expect("bdev"), &want);
    assert_ciphertext(&raw_data(&d), &plain_of(&want));
}

/// A device with no spare room: its header goes to a detached file, created by the encrypt.
/// Later starts check the file against the namespace's name; a missing file without
/// `plaintext`, or a file of another namespace, is refused with the reason and nothing written.
#[test]
fn detached_header_file_is_created_by_encrypt_and_checked_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hdr: PathBuf = dir.path().join("ns.hdr");
    let d: Arc<dyn Bdev> = malloc::open(&MallocConfig {
        name: "full".into(),
        num_blocks: Some(DATA_BLOCKS),
        size_bytes: None,
        block_size: BS,
        hugepages: false,
    })
    .expect("malloc");
    let whole = |d: &Arc<dyn Bdev>| {
        let mut v = vec![0u8; (DATA_BLOCKS * u64::from(BS)) as usize];
        BdevHeaderIo::new(d.clone(), CoreId(0), DATA_BLOCKS * u64::from(BS))
            .unwrap()
            .read_at(0, &mut v)
            .unwrap();
        v
    };
    let want = {
        let m = manager(dir.path());
        let st = add_as(&m, "ns", &d, &opts(true, Some(&hdr)));
        online(&st);
        assert_eq!(st.data_state, Some(DataState::Plaintext));
        let b = m.bdev("ns").expect("bdev");
        assert_eq!(
            b.num_blocks(),
            DATA_BLOCKS,
            "the whole device, no header room taken"
        );
        let want = fill(&b, 9);
        assert!(!hdr.exists());
        m.encrypt_namespace("test", "ns", None).expect("encrypt");
        finish(&m, "ns");
        check(&b, &want);
        assert_ciphertext(&whole(&d), &plain_of(&want));
        want
    };
    assert_eq!(
        std::fs::metadata(&hdr).expect("header file").len(),
        METADATA_REGION_BYTES
    );
    let file_before = std::fs::read(&hdr).unwrap();
    // Restart, without `plaintext` now: opens through the file.
    let m = manager(dir.path());
    let st = add_as(&m, "ns", &d, &opts(false, Some(&hdr)));
    online(&st);
    assert_eq!(st.data_state, Some(DataState::Encrypted));
    assert_eq!(st.header_file.as_deref(), hdr.to_str());
    check(&m.bdev("ns").expect("bdev"), &want);
    drop(m);
    // The same file named for another namespace: refused, nothing written.
    let device_before = whole(&d);
    let m = manager(dir.path());
    let st = add_as(&m, "other", &d, &opts(true, Some(&hdr)));
    let NamespaceKeyState::Error { reason } = &st.state else {
        panic!("a header of another namespace was accepted: {st:?}")
    };
    assert!(
        reason.contains("label") || reason.contains("other"),
        "{reason}"
    );
    drop(m);
    // Missing file without `plaintext`: refused, nothing created.
    let gone = dir.path().join("missing.hdr");
    let m = manager(dir.path());
    let st = add_as(&m, "ns", &d, &opts(false, Some(&gone)));
    let NamespaceKeyState::Error { reason } = &st.state else {
        panic!("a missing header file was accepted: {st:?}")
    };
    assert!(reason.contains("does not exist"), "{reason}");
    assert!(!gone.exists());
    drop(m);
    assert_eq!(
        std::fs::read(&hdr).unwrap(),
        file_before,
        "header file changed"
    );
    assert_eq!(whole(&d), device_before, "device changed");
    // A symbolic link in place of the file is refused too.
    let link = dir.path().join("link.hdr");
    std::os::unix::fs::symlink(&hdr, &link).unwrap();
    let m = manager(dir.path());
    let st = add_as(&m, "ns", &d, &opts(false, Some(&link)));
    assert!(
        matches!(&st.state, NamespaceKeyState::Error { reason } if reason.contains("symbolic link")),
        "{st:?}"
    );
    let _ = FileHeaderIo::open_regular(&hdr, METADATA_REGION_BYTES).expect("still a header file");
}

/// Requests that do not fit the namespace's state are refused and write nothing.
#[test]
fn wrong_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dev();
    let m = manager(dir.path());
    online(&add_as(&m, "ns", &d, &opts(true, None)));
    let region = |d: &Arc<dyn Bdev>| {
        let mut v = vec![0u8; METADATA_REGION_BYTES as usize];
        BdevHeaderIo::new(d.clone(), CoreId(0), METADATA_REGION_BYTES)
            .unwrap()
            .read_at(0, &mut v)
            .unwrap();
        v
    };
    let blank = region(&d);
    assert!(blank.iter().all(|&b| b == 0));
    let wrong = |e: DeepRekeyError, what: &str| {
        assert!(
            matches!(&e, DeepRekeyError::WrongState { what: w, .. } if w.contains(what)),
            "{e:?}"
        )
    };
    wrong(
        m.decrypt_namespace("test", "ns", None).unwrap_err(),
        "already plaintext",
    );
    wrong(
        m.deep_rekey("test", "ns", None, None).unwrap_err(),
        "plaintext",
    );
    assert!(matches!(
        m.crypto_erase("test", "ns"),
        Err(CryptoEraseError::NotEncrypted(_))
    ));
    assert!(matches!(
        m.encrypt_namespace("test", "ns", Some(0)),
        Err(DeepRekeyError::BadRate(0))
    ));
    assert!(matches!(
        m.encrypt_namespace("test", "nope", None),
        Err(DeepRekeyError::UnknownNamespace(_))
    ));
    assert_eq!(region(&d), blank, "a refusal wrote to the metadata region");
    // Encrypted now: a second encrypt is refused; so is one while a pass runs.
    m.encrypt_namespace("test", "ns", Some(2)).expect("encrypt");
    assert!(matches!(
        m.encrypt_namespace("test", "ns", None),
        Err(DeepRekeyError::Busy { .. })
    ));
    assert!(matches!(
        m.decrypt_namespace("test", "ns", None),
        Err(DeepRekeyError::Busy { .. })
    ));
    assert!(matches!(
        m.crypto_erase("test", "ns"),
        Err(CryptoEraseError::Busy { .. })
    ));
    m.resume_rekey("test", "ns", None).unwrap_err();
    m.set_rekey_rate("ns", None).expect("unlimited");
    finish(&m, "ns");
    wrong(
        m.encrypt_namespace("test", "ns", None).unwrap_err(),
        "already encrypted",
    );
}

/// The region of a plaintext namespace must be blank (or hold what an interrupted encrypt start
/// leaves): anything else may be a damaged header with a key, so it is not served.
#[test]
fn a_plaintext_namespace_with_a_dirty_region_is_not_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dev();
    let mut hio = BdevHeaderIo::new(d.clone(), CoreId(0), METADATA_REGION_BYTES).unwrap();
    hio.write_at(64 * 1024, b"not a header").unwrap();
    hio.flush().unwrap();
    let m = manager(dir.path());
    let st = add_as(&m, "ns", &d, &opts(true, None));
    let NamespaceKeyState::Error { reason } = &st.state else {
        panic!("served over a dirty region: {st:?}")
    };
    assert!(reason.contains("not blank"), "{reason}");
    assert!(m.bdev("ns").is_none());
}
