//! Unit tests of the key manager (config, audit sink, format/blank checks, unlock, rekey across
//! providers with crash injection). Run by the test harness on its own threads; split out of
//! `mod.rs` so the manager's code is not buried under its tests.

use super::audit_log::rfc3339_utc;
use super::rekey::rekey_across;
use super::*;
use crate::bdev::malloc::{self, MallocConfig};
use crate::keys::header::{METADATA_REGION_BYTES, REKEY_AREA_OFFSET_BYTES};
use crate::keys::header_io::BdevHeaderIo;
use crate::keys::local::DEFAULT_KEK_ID;
use crate::keys::store::{self, FORMAT_DATA_PROBE_BYTES};
use crate::keys::{format_encrypted, FormatParams};
use crate::types::CoreId;
use std::path::Path;

#[test]
fn retry_delay_doubles_and_caps() {
    let r = RetryConfig {
        initial_ms: 1000,
        max_ms: 60_000,
    };
    let ms: Vec<u128> = (1..=9).map(|a| r.delay(a).as_millis()).collect();
    assert_eq!(
        ms,
        [1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000, 60_000]
    );
    assert_eq!(r.delay(u32::MAX).as_millis(), 60_000);
    assert!(RetryConfig {
        initial_ms: 0,
        max_ms: 1
    }
    .validate()
    .is_err());
    assert!(RetryConfig {
        initial_ms: 2,
        max_ms: 1
    }
    .validate()
    .is_err());
}

#[test]
fn config_parses_with_defaults_and_rejects_unknown_fields() {
    let c: KeysConfig =
        serde_yaml_ng::from_str("local: {path: /tmp/k}\naudit_log: /tmp/a\n").expect("yaml");
    assert_eq!(c.unlock_retry, RetryConfig::default());
    assert!(!c.local.as_ref().expect("local").create);
    assert!(serde_yaml_ng::from_str::<KeysConfig>("locl: {path: /tmp/k}\n").is_err());
    assert!(
        serde_yaml_ng::from_str::<KeysConfig>("unlock_retry: {initial_ms: 5, max: 9}\n").is_err()
    );
    let ns: NamespaceKeyConfig =
        serde_yaml_ng::from_str("provider: kms-a\nkek_name: vsan-kek\n").expect("yaml");
    assert_eq!(ns.kek_name.as_deref(), Some("vsan-kek"));
    assert!(serde_yaml_ng::from_str::<NamespaceKeyConfig>("provider: a\nkek: b\n").is_err());
}

#[test]
fn rfc3339_matches_known_instants() {
    assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
    // 2000-02-29T12:34:56.789Z (a leap day) = 951827696789 ms.
    assert_eq!(rfc3339_utc(951_827_696_789), "2000-02-29T12:34:56.789Z");
    // 2026-11-28T00:00:00Z = 1795824000 s.
    assert_eq!(rfc3339_utc(1_795_824_000_000), "2026-11-28T00:00:00.000Z");
}

#[test]
fn file_audit_sink_writes_one_json_line_per_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.log");
    let sink = FileAuditSink::open(&path).expect("open");
    sink.record("uid:1000", "rekey", "ns1", "ok");
    sink.record("nvseal", "unlock", "ns\"2", "error: x");
    let text = std::fs::read_to_string(&path).expect("read");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["who"], "uid:1000");
    assert_eq!(lines[0]["op"], "rekey");
    assert_eq!(lines[1]["target"], "ns\"2");
    assert!(lines[1]["ts"].as_str().expect("ts").ends_with('Z'));
    assert!(lines[1]["ts_unix_ms"].as_u64().expect("ms") > 0);
}

/// Keys config with only the local provider, its key file in `dir`.
fn local_keys(dir: &Path) -> KeysConfig {
    KeysConfig {
        local: Some(LocalKeysConfig {
            path: dir.join("keys"),
            create: true,
        }),
        ..KeysConfig::default()
    }
}

fn malloc_dev(name: &str) -> Arc<dyn Bdev> {
    malloc::open(&MallocConfig {
        name: name.into(),
        num_blocks: None,
        size_bytes: Some(METADATA_REGION_BYTES + 64 * 4096),
        block_size: 4096,
        hugepages: false,
    })
    .expect("malloc")
}

/// A RAM disk with a data area of 2 MiB (twice the blank-check probe).
fn malloc_dev_2m(name: &str) -> Arc<dyn Bdev> {
    malloc::open(&MallocConfig {
        name: name.into(),
        num_blocks: None,
        size_bytes: Some(METADATA_REGION_BYTES + 2 * FORMAT_DATA_PROBE_BYTES),
        block_size: 4096,
        hugepages: false,
    })
    .expect("malloc")
}

/// Raw access to the whole device (tests only; the manager's header I/O stops at 1 MiB).
fn whole_dev(d: &Arc<dyn Bdev>) -> BdevHeaderIo {
    let bytes = d.num_blocks() * u64::from(d.block_size());
    BdevHeaderIo::new(d.clone(), CoreId(0), bytes).expect("whole-device io")
}

fn image(d: &Arc<dyn Bdev>) -> Vec<u8> {
    let mut v = vec![0u8; (d.num_blocks() * u64::from(d.block_size())) as usize];
    whole_dev(d).read_at(0, &mut v).expect("read image");
    v
}

/// Issue 11 item 3: `create` formats only a device whose whole start is blank. A blank
/// header over data in the data area's first MiB, the journal area or the gaps beside the
/// copies (a wiped header, most likely) sends the namespace to `error` with a message that
/// names `nvseal format --force`, and not one byte of the device changes. A blank device, or
/// one with data only past the probed MiB, formats. `format_device` refuses the same device
/// without `force`, formats it with `force` (data area untouched, metadata region zeroed),
/// and refuses a device that holds a header even with `force`.
#[test]
fn blank_header_over_data_is_refused_until_forced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = KeyManager::new(&local_keys(dir.path()), ManagerOptions::default()).expect("manager");
    let key = NamespaceKeyConfig {
        provider: LOCAL_PROVIDER.into(),
        kek_name: None,
    };
    let hio = |d: &Arc<dyn Bdev>| -> Box<dyn HeaderIo + Send> {
        Box::new(BdevHeaderIo::new(d.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio"))
    };
    let data_off = METADATA_REGION_BYTES + 3 * 4096 + 17;
    let cases = [
        ("data", data_off, "the data area holds data"),
        (
            "data-end",
            METADATA_REGION_BYTES + FORMAT_DATA_PROBE_BYTES - 1,
            "the data area holds data",
        ),
        (
            "journal",
            0x20000 + 5,
            "the deep-rekey journal area holds data",
        ),
        ("gap", 0x1000 + 1, "beside the header copies"),
    ];
    let mut devs = BTreeMap::new();
    for (ns, off, what) in cases {
        let d = malloc_dev_2m(ns);
        whole_dev(&d).write_at(off, &[0xA5]).expect("plant");
        let before = image(&d);
        m.add_encrypted("test", ns, d.clone(), hio(&d), &key, true)
            .expect("add");
        let st = m
            .wait_for(ns, Duration::from_secs(30), |s| {
                matches!(
                    s,
                    NamespaceKeyState::Error { .. } | NamespaceKeyState::Online
                )
            })
            .expect("status");
        let NamespaceKeyState::Error { reason } = &st.state else {
            panic!("{ns}: formatted over data: {st:?}");
        };
        assert!(reason.contains(what), "{ns}: {reason}");
        assert!(
            reason.contains(&format!("device offset {off}")),
            "{ns}: {reason}"
        );
        assert!(
            reason.contains(&format!("nvseal format --force -c <config> --bdev {ns}")),
            "{ns}: {reason}"
        );
        assert!(image(&d) == before, "{ns}: the device was written");
        devs.insert(ns, d);
    }
    // Data only past the probed MiB, and a blank device: both format.
    let past = malloc_dev_2m("past");
    whole_dev(&past)
        .write_at(METADATA_REGION_BYTES + FORMAT_DATA_PROBE_BYTES, &[0xA5])
        .expect("plant");
    let blank = malloc_dev_2m("blank");
    for (ns, d) in [("past", &past), ("blank", &blank)] {
        m.add_encrypted("test", ns, d.clone(), hio(d), &key, true)
            .expect("add");
        let st = m
            .wait_for(ns, Duration::from_secs(30), |s| {
                *s == NamespaceKeyState::Online
            })
            .expect("status");
        assert_eq!(st.state, NamespaceKeyState::Online, "{ns}: {st:?}");
    }
    // The offline tool: refused without force (nothing written), formats with it.
    for (ns, off, _) in cases {
        let d = &devs[ns];
        assert!(m.remove("test", ns));
        let before = image(d);
        let mut io = BdevHeaderIo::new(d.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio");
        match m.format_device("test", ns, d, &mut io, &key, false) {
            Err(FormatDeviceError::Refused(r)) => assert!(r.contains("--force"), "{r}"),
            other => panic!("{ns}: {other:?}"),
        }
        assert!(image(d) == before, "{ns}: refused format wrote");
        let report = m
            .format_device("test", ns, d, &mut io, &key, true)
            .expect("forced format");
        assert!(report.forced);
        assert_eq!(report.data_blocks, 2 * FORMAT_DATA_PROBE_BYTES / 4096);
        let after = image(d);
        let meta = METADATA_REGION_BYTES as usize;
        assert_eq!(
            after[meta..],
            before[meta..],
            "{ns}: the data area was written"
        );
        assert!(
            after[REKEY_AREA_OFFSET_BYTES as usize..meta]
                .iter()
                .all(|&b| b == 0),
            "{ns}: the journal area was not zeroed"
        );
        if off >= METADATA_REGION_BYTES {
            assert_eq!(after[off as usize], 0xA5);
        }
        // It opens, as the namespace's old data would not have.
        m.add_encrypted("test", ns, d.clone(), hio(d), &key, false)
            .expect("add");
        let st = m
            .wait_for(ns, Duration::from_secs(30), |s| {
                *s == NamespaceKeyState::Online
            })
            .expect("status");
        assert_eq!(
            st.namespace_uuid.as_deref(),
            Some(report.namespace_uuid.as_str())
        );
        // A header, valid now, is never formatted over, force or not.
        let before = image(d);
        match m.format_device("test", ns, d, &mut io, &key, true) {
            Err(FormatDeviceError::Refused(r)) => {
                assert!(r.contains("holds an nvseal header"), "{r}")
            }
            other => panic!("{ns}: {other:?}"),
        }
        assert!(image(d) == before, "{ns}: formatted over a header");
    }
}

/// Removing a namespace: the manager lets go of its crypto bdev (so of its DEK), forgets
/// it, and a later rekey of the others does not revoke the KEK its header still names; it
/// can be added again and unlocks with that KEK.
#[test]
fn removed_namespace_lets_go_of_its_key_and_keeps_its_kek() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = local_keys(dir.path());
    let (d1, d2) = (malloc_dev("m1"), malloc_dev("m2"));
    let key = NamespaceKeyConfig {
        provider: LOCAL_PROVIDER.into(),
        kek_name: None,
    };
    let hio = |d: &Arc<dyn Bdev>| -> Box<dyn HeaderIo + Send> {
        Box::new(BdevHeaderIo::new(d.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio"))
    };
    let m = KeyManager::new(&cfg, ManagerOptions::default()).expect("manager");
    let online = |m: &KeyManager, ns: &str| {
        let st = m
            .wait_for(ns, Duration::from_secs(30), |s| {
                *s == NamespaceKeyState::Online
            })
            .expect("status");
        assert_eq!(st.state, NamespaceKeyState::Online, "{st:?}");
        st
    };
    for (ns, d) in [("ns1", &d1), ("ns2", &d2)] {
        m.add_encrypted("test", ns, d.clone(), hio(d), &key, true)
            .expect("add");
        online(&m, ns);
    }
    let weak = Arc::downgrade(&m.bdev("ns1").expect("bdev"));
    assert!(m.remove("op", "ns1"));
    assert!(!m.remove("op", "ns1"), "already gone");
    assert!(m.state("ns1").is_none());
    assert!(
        weak.upgrade().is_none(),
        "no reference to the crypto bdev (and its DEK) is left"
    );
    // Rekey what is left: ns2 moves to a new KEK; the old one stays, ns1's header needs it.
    let report = m
        .shallow_rekey("test", &RekeyScope::All, LOCAL_PROVIDER)
        .expect("rekey");
    assert_eq!(report.namespaces.len(), 1);
    assert_eq!(report.namespaces[0].result, NamespaceRekeyResult::Rekeyed);
    assert!(
        matches!(&report.old_keks[0].action, OldKekAction::Kept { used_by } if used_by[0].starts_with("ns1")),
        "{:?}",
        report.old_keks
    );
    // Back again: the header is read (not formatted over) and opens with the kept KEK.
    m.add_encrypted("test", "ns1", d1.clone(), hio(&d1), &key, true)
        .expect("add again");
    let st = online(&m, "ns1");
    assert_eq!(st.kek_id.as_ref().map(KekId::as_str), Some(DEFAULT_KEK_ID));
    assert_eq!(st.header_generation, Some(1));
    // Back, it names its KEK through its live entry: the retained reference is gone, so
    // once ns1 moves to a new KEK too, the old one is revoked when that is asked for.
    assert!(lock(&m.inner.retained).is_empty());
    let report = m
        .shallow_rekey_with(
            "test",
            &RekeyScope::Namespaces(vec!["ns1".into()]),
            LOCAL_PROVIDER,
            true,
        )
        .expect("rekey ns1");
    assert_eq!(report.namespaces[0].result, NamespaceRekeyResult::Rekeyed);
    assert_eq!(
        report.old_keks[0].action,
        OldKekAction::Revoked,
        "{report:?}"
    );
}

/// Local provider end to end on a RAM disk: format, online, restart, rekey, revoke.
#[test]
fn local_namespace_formats_unlocks_and_rekeys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = local_keys(dir.path());
    let dev = malloc_dev("m0");
    let online = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = online.clone();
    let opts = ManagerOptions {
        on_online: Some(Arc::new(move |ns: &str, _b: Arc<dyn Bdev>| {
            lock(&seen).push(ns.to_owned())
        })),
        ..ManagerOptions::default()
    };
    let key = NamespaceKeyConfig {
        provider: LOCAL_PROVIDER.into(),
        kek_name: None,
    };
    let hio = || -> Box<dyn HeaderIo + Send> {
        Box::new(BdevHeaderIo::new(dev.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio"))
    };
    let m = KeyManager::new(&cfg, opts.clone()).expect("manager");
    m.add_encrypted("test", "ns1", dev.clone(), hio(), &key, true)
        .expect("add");
    let st = m
        .wait_for("ns1", Duration::from_secs(30), |s| {
            !matches!(
                s,
                NamespaceKeyState::Locked | NamespaceKeyState::Unlocking { .. }
            )
        })
        .expect("status");
    assert_eq!(st.state, NamespaceKeyState::Online, "{st:?}");
    assert_eq!(st.kek_id.as_ref().map(KekId::as_str), Some(DEFAULT_KEK_ID));
    assert_eq!(m.bdev("ns1").expect("bdev").num_blocks(), 64);
    assert_eq!(*lock(&online), ["ns1"]);
    assert!(matches!(
        m.add_encrypted("test", "ns1", dev.clone(), hio(), &key, true),
        Err(AddError::Duplicate(_))
    ));
    assert!(matches!(
        m.add_encrypted(
            "test",
            "ns2",
            dev.clone(),
            hio(),
            &NamespaceKeyConfig {
                provider: "nope".into(),
                kek_name: None
            },
            true
        ),
        Err(AddError::UnknownProvider { .. })
    ));

    let report = m
        .shallow_rekey("test", &RekeyScope::All, LOCAL_PROVIDER)
        .expect("rekey");
    assert_eq!(report.namespaces.len(), 1);
    assert_eq!(report.namespaces[0].result, NamespaceRekeyResult::Rekeyed);
    // The old KEK is kept by default (revocation is explicit).
    assert_eq!(report.old_keks.len(), 1);
    assert_eq!(report.old_keks[0].kek_id.as_str(), DEFAULT_KEK_ID);
    assert!(
        matches!(report.old_keks[0].action, OldKekAction::NotRevoked { .. }),
        "{report:?}"
    );
    assert_eq!(
        m.state("ns1").expect("st").kek_id,
        Some(report.new_kek_id.clone())
    );
    // Explicitly: the new KEK is refused (ns1 uses it, and it is the provider's current KEK),
    // the old one is revoked.
    match m.revoke_kek("test", LOCAL_PROVIDER, &report.new_kek_id) {
        Err(RevokeKekError::InUse { used_by, .. }) => {
            assert!(used_by.iter().any(|u| u == "ns1"), "{used_by:?}");
            assert!(
                used_by.iter().any(|u| u.contains("current KEK")),
                "{used_by:?}"
            );
        }
        other => panic!("expected InUse, got {other:?}"),
    }
    m.revoke_kek(
        "test",
        LOCAL_PROVIDER,
        &KekId::new(DEFAULT_KEK_ID).expect("id"),
    )
    .expect("revoke the replaced KEK");
    drop(m);

    // Restart: the header names the new KEK; creating is a no-op on a formatted header.
    let m = KeyManager::new(&cfg, opts).expect("manager");
    m.add_encrypted("test", "ns1", dev.clone(), hio(), &key, true)
        .expect("add");
    let st = m
        .wait_for("ns1", Duration::from_secs(30), |s| {
            *s == NamespaceKeyState::Online
        })
        .expect("status");
    assert_eq!(st.state, NamespaceKeyState::Online);
    assert_eq!(st.kek_id, Some(report.new_kek_id));
    assert_eq!(st.header_generation, Some(4));
}

#[test]
fn blank_device_without_create_is_an_error_and_stays_blank() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = local_keys(dir.path());
    let dev = malloc_dev("m1");
    let m = KeyManager::new(&cfg, ManagerOptions::default()).expect("manager");
    let hio = BdevHeaderIo::new(dev.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio");
    m.add_encrypted(
        "test",
        "ns",
        dev.clone(),
        Box::new(hio),
        &NamespaceKeyConfig {
            provider: LOCAL_PROVIDER.into(),
            kek_name: None,
        },
        false,
    )
    .expect("add");
    let st = m
        .wait_for("ns", Duration::from_secs(30), |s| {
            matches!(s, NamespaceKeyState::Error { .. })
        })
        .expect("status");
    match st.state {
        NamespaceKeyState::Error { reason } => assert!(reason.contains("blank"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(m.bdev("ns").is_none());
    let mut hio = BdevHeaderIo::new(dev, CoreId(0), METADATA_REGION_BYTES).expect("hio");
    let mut buf = vec![1u8; 128 * 1024];
    hio.read_at(0, &mut buf).expect("read");
    assert!(buf.iter().all(|&b| b == 0));
}

fn fail_text(f: Fail) -> String {
    match f {
        Fail::Transient(t) => format!("transient: {t}"),
        Fail::Permanent(t) => format!("permanent: {t}"),
    }
}

fn local_slot(dir: &Path, file: &str, alias: &str) -> Arc<ProviderSlot> {
    let mut p =
        LocalKeyProvider::open(dir.join(file), CreateMode::CreateIfMissing).expect("provider");
    if alias != p.cluster_alias() {
        p = p.with_alias(alias).expect("alias");
    }
    Arc::new(ProviderSlot {
        name: alias.to_owned(),
        kind: ProviderKind::Local,
        alias: alias.to_owned(),
        inner: Mutex::new(ManagedProvider::Local(p)),
        cluster: None,
        current_kek: Mutex::new(None),
    })
}

fn inner_with(slots: &[Arc<ProviderSlot>]) -> Inner {
    Inner {
        providers: slots.iter().map(|s| (s.name.clone(), s.clone())).collect(),
        namespaces: Mutex::new(BTreeMap::new()),
        changed: Condvar::new(),
        retry: RetryConfig::default(),
        audit: None,
        on_online: None,
        pass_io: None,
        xts_max_tier: None,
        rekey_lock: Mutex::new(()),
        retained: Mutex::new(Vec::new()),
    }
}

/// A change of provider interrupted at every write and flush (unflushed writes lost or
/// kept, each write torn) leaves a header the manager opens — with the old provider's KEK
/// or the new one's — to the same DEK; with the old KEK gone, the pending slot opens it.
#[test]
fn rekey_across_providers_survives_a_crash_at_every_point() {
    use crate::keys::store::{CrashMode, Fault, MemIo};
    use crate::keys::SlotUsed;
    const DEV: usize = METADATA_REGION_BYTES as usize + 16 * 4096;
    let dir = tempfile::tempdir().expect("tempdir");
    let a = local_slot(dir.path(), "a.keys", "local");
    let b = local_slot(dir.path(), "b.keys", "lab-b");
    let inner = inner_with(&[a.clone(), b.clone()]);
    let mut io0 = MemIo::new(DEV);
    let params = FormatParams::new(
        Uuid::new_v4(),
        DataUnit::Bytes4096,
        DEV as u64,
        KekId::new(DEFAULT_KEK_ID).expect("id"),
    );
    let f = format_encrypted(&mut io0, lock(&a.inner).as_dyn(), &params).expect("format");
    let dek = *f.dek.expose();
    let (new_id, new_kek) = lock(&b.inner).as_dyn().create_kek("moved").expect("kek");

    let mut clean = io0.clone();
    let start = clean.ops_total();
    let done = rekey_across(&mut clean, &a, &b, &new_id, &new_kek).expect("rekey");
    assert_eq!(done.header.active.kms_alias, "lab-b");
    assert_eq!(done.header.rekey, RekeyState::None);
    let total = clean.ops_total() - start;
    assert_eq!(total, 6, "three header updates, each a write and a flush");

    let mut faults: Vec<Fault> = (0..=total)
        .map(|ops| Fault::PowerLossAfter { ops })
        .collect();
    faults.extend((0..3).map(|nth| Fault::TearWrite { nth }));
    let mut saw_pending = false;
    for fault in faults {
        for mode in [CrashMode::DropUnflushed, CrashMode::KeepUnflushed] {
            let mut io = io0.clone();
            io.arm(fault);
            let _ = rekey_across(&mut io, &a, &b, &new_id, &new_kek);
            io.crash(mode);
            let stored = store::read_header(&mut io).expect("a header copy survives");
            saw_pending |= matches!(stored.header.rekey, RekeyState::Shallow { .. });
            let o = inner
                .open_stored(&mut io, &stored)
                .map_err(fail_text)
                .unwrap_or_else(|e| panic!("{fault:?} {mode:?}: {e}"));
            assert_eq!(o.dek.expose(), &dek, "{fault:?} {mode:?}");
        }
    }
    assert!(saw_pending, "some crash point left the rekey in progress");

    // Crash right after step 1 is durable, then the old KEK is revoked at provider A: the
    // pending slot at provider B still opens the namespace.
    let mut io = io0.clone();
    io.arm(Fault::PowerLossAfter { ops: 2 });
    assert!(rekey_across(&mut io, &a, &b, &new_id, &new_kek).is_err());
    io.crash(CrashMode::DropUnflushed);
    lock(&a.inner)
        .as_dyn()
        .revoke_kek(&KekId::new(DEFAULT_KEK_ID).expect("id"))
        .expect("revoke");
    let stored = store::read_header(&mut io).expect("header");
    let o = inner
        .open_stored(&mut io, &stored)
        .map_err(fail_text)
        .expect("opens via the pending slot");
    assert_eq!(o.slot, SlotUsed::Pending);
    assert_eq!(o.dek.expose(), &dek);
}

#[test]
fn fingerprint_mismatch_is_a_permanent_error_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = malloc_dev("m2");
    let key = NamespaceKeyConfig {
        provider: LOCAL_PROVIDER.into(),
        kek_name: None,
    };
    let cfg = |file: &str| KeysConfig {
        local: Some(LocalKeysConfig {
            path: dir.path().join(file),
            create: true,
        }),
        ..KeysConfig::default()
    };
    let hio =
        || Box::new(BdevHeaderIo::new(dev.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio"));
    {
        let m = KeyManager::new(&cfg("a.keys"), ManagerOptions::default()).expect("manager");
        m.add_encrypted("test", "ns", dev.clone(), hio(), &key, true)
            .expect("add");
        let st = m
            .wait_for("ns", Duration::from_secs(30), |s| {
                *s == NamespaceKeyState::Online
            })
            .expect("status");
        assert_eq!(st.state, NamespaceKeyState::Online);
    }
    let mut before = vec![0u8; METADATA_REGION_BYTES as usize];
    hio().read_at(0, &mut before).expect("read");
    // Another key file: its KEK "default" is a different key.
    let m = KeyManager::new(&cfg("b.keys"), ManagerOptions::default()).expect("manager");
    m.add_encrypted("test", "ns", dev.clone(), hio(), &key, true)
        .expect("add");
    let st = m
        .wait_for("ns", Duration::from_secs(30), |s| {
            matches!(s, NamespaceKeyState::Error { .. })
        })
        .expect("status");
    match &st.state {
        NamespaceKeyState::Error { reason } => {
            assert!(
                reason.contains("does not match the fingerprint"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    drop(m);
    let mut after = vec![0u8; METADATA_REGION_BYTES as usize];
    hio().read_at(0, &mut after).expect("read");
    assert!(before == after, "header region changed");
}
