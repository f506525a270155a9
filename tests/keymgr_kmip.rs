//! Encrypted namespaces with vSAN semantics against real PyKMIP 0.11 servers: create, write,
//! restart with the KEK fetched by id; boot while the KMS is down; shallow rekey (and change of
//! KMS cluster) under running I/O; three-server failover; wrong client certificate; header
//! copies corrupted. Every test starts its own servers; the tests run in parallel.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::kmip::{cluster, free_port, kmip_state, Certs, PyKmip};
use common::{
    capture_logs, kms_config, online, pattern, read_blocks, read_on, settle, write_blocks, write_on,
};
use nvseal::bdev::malloc::{self, MallocConfig};
use nvseal::bdev::uring::{self, UringConfig};
use nvseal::bdev::Bdev;
use nvseal::keys::header::METADATA_REGION_BYTES;
use nvseal::keys::header_io::{BdevHeaderIo, FileHeaderIo};
use nvseal::keys::manager::{
    KeyManager, KeysConfig, ManagerOptions, NamespaceKeyConfig, NamespaceKeyState,
    NamespaceRekeyResult, OldKek, OldKekAction, RekeyScope, RetryConfig,
};
use nvseal::keys::store::{self, HeaderIo};
use nvseal::keys::ProviderKind;
use nvseal::kms::{KeyId, KmipClient, ServerAddr, Timeouts};
use nvseal::types::CoreId;

const BS: usize = 4096;
/// Data area of every test device, in blocks.
const DATA_BLOCKS: u64 = 64;
const DEV_BYTES: u64 = METADATA_REGION_BYTES + DATA_BLOCKS * BS as u64;

/// Quick retries: tests wait for the KMS to come back, not for a minute-long back-off.
fn fast_retry() -> RetryConfig {
    RetryConfig {
        initial_ms: 100,
        max_ms: 500,
    }
}

fn keys_config(clusters: Vec<nvseal::kms::KmsClusterConfig>) -> KeysConfig {
    KeysConfig {
        kms_clusters: clusters,
        unlock_retry: fast_retry(),
        ..KeysConfig::default()
    }
}

/// A directory on a filesystem with O_DIRECT (tmpfs has none).
fn var_tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("nvseal-keymgr-")
        .tempdir_in("/var/tmp")
        .expect("tempdir in /var/tmp")
}

fn uring_dev(path: &Path) -> Arc<dyn Bdev> {
    uring::open(&UringConfig {
        name: "file0".into(),
        path: path.to_owned(),
        block_size: BS as u32,
        direct: true,
        size_bytes: Some(DEV_BYTES),
    })
    .expect("uring bdev")
}

fn file_hio(path: &Path) -> Box<dyn HeaderIo + Send> {
    Box::new(FileHeaderIo::open(path, METADATA_REGION_BYTES).expect("header file"))
}

fn malloc_dev(name: &str) -> Arc<dyn Bdev> {
    malloc::open(&MallocConfig {
        name: name.into(),
        num_blocks: None,
        size_bytes: Some(DEV_BYTES),
        block_size: BS as u32,
        hugepages: false,
    })
    .expect("malloc")
}

fn bdev_hio(dev: &Arc<dyn Bdev>) -> Box<dyn HeaderIo + Send> {
    Box::new(BdevHeaderIo::new(dev.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio"))
}

fn ns_key(provider: &str, kek_name: Option<&str>) -> NamespaceKeyConfig {
    NamespaceKeyConfig {
        provider: provider.into(),
        kek_name: kek_name.map(Into::into),
    }
}

/// Options that record every `on_online` call.
/// Every `(namespace, bdev)` handed to `on_online`.
type Onlined = Arc<Mutex<Vec<(String, Arc<dyn Bdev>)>>>;

fn recording() -> (ManagerOptions, Onlined) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let opts = ManagerOptions {
        on_online: Some(Arc::new(move |ns: &str, b: Arc<dyn Bdev>| {
            sink.lock().unwrap().push((ns.to_owned(), b))
        })),
        ..ManagerOptions::default()
    };
    (opts, got)
}

fn corrupt(path: &Path, off: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[0x5a; 16], off).unwrap();
    f.sync_all().unwrap();
}

fn patient() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(30),
        response: Duration::from_secs(60),
    }
}

#[test]
fn create_write_restart_fetches_kek_by_id_and_reads_back() {
    let certs = Certs::generate(&["nvseal"]);
    let server = PyKmip::start(&certs, "s1", None);
    let dir = var_tmp();
    let path = dir.path().join("ns.img");
    let cfg = keys_config(vec![kms_config(
        certs.dir.path(),
        "kms-a",
        vec![server.addr.clone()],
        "client",
        60_000,
    )]);
    let key = ns_key("kms-a", Some("nvseal-test-kek"));

    let (opts, got) = recording();
    let m = KeyManager::new(&cfg, opts).unwrap();
    let dev = uring_dev(&path);
    m.add_encrypted("test", "cw-ns", dev.clone(), file_hio(&path), &key, true)
        .unwrap();
    let st = online(&m, "cw-ns");
    assert_eq!(st.kek_provider.as_deref(), Some("kms-a"));
    let kek_id = st.kek_id.clone().unwrap();
    assert_eq!(st.header_generation, Some(1));
    // The target got the bdev through the callback, and only once.
    let bdev = {
        let got = got.lock().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "cw-ns");
        got[0].1.clone()
    };
    assert_eq!(bdev.num_blocks(), DATA_BLOCKS);
    let first = pattern(1, 0, 8, BS);
    let last = pattern(2, DATA_BLOCKS - 4, 4, BS);
    write_blocks(&bdev, 0, &first);
    write_blocks(&bdev, DATA_BLOCKS - 4, &last);
    // On the device the data area holds ciphertext, after the 1 MiB header region.
    let raw = std::fs::read(&path).unwrap();
    assert_eq!(raw.len() as u64, DEV_BYTES);
    let data_start = METADATA_REGION_BYTES as usize;
    assert_ne!(&raw[data_start..data_start + first.len()], &first[..]);
    assert!(raw[data_start..data_start + BS].iter().any(|&b| b != 0));
    drop((bdev, m, dev));
    got.lock().unwrap().clear();

    // Restart: the KEK is fetched by the id in the header; nothing is reformatted.
    let (opts, got) = recording();
    let m = KeyManager::new(&cfg, opts).unwrap();
    let dev = uring_dev(&path);
    m.add_encrypted("test", "cw-ns", dev, file_hio(&path), &key, true)
        .unwrap();
    let st = online(&m, "cw-ns");
    assert_eq!(st.kek_id.as_ref(), Some(&kek_id));
    assert_eq!(st.header_generation, Some(1));
    let bdev = got.lock().unwrap()[0].1.clone();
    assert_eq!(read_blocks(&bdev, 0, 8), first);
    assert_eq!(read_blocks(&bdev, DATA_BLOCKS - 4, 4), last);
    // The KEK is the one the server knows by that name: one key, found by Locate.
    let kms = cluster(&certs, vec![server.addr.clone()], patient());
    assert_eq!(
        kms.locate_by_name("nvseal-test-kek").unwrap(),
        vec![KeyId::new(kek_id.as_str())]
    );
}

#[test]
fn boot_with_kms_down_stays_locked_and_unlocks_when_it_returns() {
    let logs = capture_logs();
    let certs = Certs::generate(&["nvseal"]);
    let port = free_port();
    let db = certs.path("kms.db");
    let server = PyKmip::start_on(&certs, "s1", Some(&db), port);
    let addr = ServerAddr::new("127.0.0.1", port).unwrap();
    let cfg = keys_config(vec![kms_config(
        certs.dir.path(),
        "kms-a",
        vec![addr],
        "client",
        60_000,
    )]);
    let dev = malloc_dev("boot0");
    let data = pattern(3, 10, 6, BS);
    {
        let m = KeyManager::new(&cfg, ManagerOptions::default()).unwrap();
        m.add_encrypted(
            "test",
            "boot-ns",
            dev.clone(),
            bdev_hio(&dev),
            &ns_key("kms-a", None),
            true,
        )
        .unwrap();
        online(&m, "boot-ns");
        write_blocks(&m.bdev("boot-ns").unwrap(), 10, &data);
    }
    server.kill();
    drop(server);

    // Boot with the KMS down: locked, retrying, nothing handed to the target.
    let (opts, got) = recording();
    let m = KeyManager::new(&cfg, opts).unwrap();
    m.add_encrypted(
        "test",
        "boot-ns",
        dev.clone(),
        bdev_hio(&dev),
        &ns_key("kms-a", None),
        false,
    )
    .unwrap();
    let st = m
        .wait_for(
            "boot-ns",
            Duration::from_secs(60),
            |s| matches!(s, NamespaceKeyState::Unlocking { attempt } if *attempt >= 3),
        )
        .unwrap();
    assert!(
        matches!(st.state, NamespaceKeyState::Unlocking { attempt } if attempt >= 3),
        "{st:?}"
    );
    let st = m
        .wait_for("boot-ns", Duration::from_secs(60), |s| {
            *s == NamespaceKeyState::Locked
        })
        .unwrap();
    assert_eq!(st.state, NamespaceKeyState::Locked);
    let err = st.last_error.clone().unwrap_or_default();
    assert!(err.contains("connection refused"), "{st:?}");
    assert!(st.retry_in_ms.is_some(), "{st:?}");
    // The header was read without the KMS: the status already names the KEK.
    assert!(st.kek_id.is_some());
    assert!(got.lock().unwrap().is_empty());
    assert!(m.bdev("boot-ns").is_none());

    // The KMS comes back (same port, same database): the namespace unlocks by itself.
    let _server = PyKmip::start_on(&certs, "s1-again", Some(&db), port);
    let st = online(&m, "boot-ns");
    assert!(st.last_error.is_none());
    let bdev = got.lock().unwrap()[0].1.clone();
    assert_eq!(read_blocks(&bdev, 10, 6), data);
    let text = logs.text();
    assert!(
        text.contains("namespace=boot-ns") && text.contains("namespace key state: locked"),
        "{text}"
    );
}

/// Writes and verifies blocks on the crypto bdev until told to stop; returns how many
/// verified reads it did. Panics on any mismatch.
fn io_loop(
    bdev: Arc<dyn Bdev>,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    expected: Arc<Mutex<Vec<Vec<u8>>>>,
) {
    let mut ch = bdev.open_channel(CoreId(0), 4).unwrap();
    let mut round = 100u64;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let lba = round % DATA_BLOCKS;
        let want = expected.lock().unwrap()[lba as usize].clone();
        assert_eq!(
            read_on(ch.as_mut(), &bdev, lba, 1),
            want,
            "block {lba} differs"
        );
        let next = pattern(round, lba, 1, BS);
        write_on(ch.as_mut(), &bdev, lba, &next);
        expected.lock().unwrap()[lba as usize] = next;
        ops.fetch_add(1, Ordering::Relaxed);
    }
}

fn wait_ops(ops: &AtomicU64, at_least: u64) {
    while ops.load(Ordering::Relaxed) < at_least {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn header_of(dev: &Arc<dyn Bdev>) -> nvseal::keys::Header {
    let mut hio = BdevHeaderIo::new(dev.clone(), CoreId(0), METADATA_REGION_BYTES).unwrap();
    store::read_header(&mut hio).unwrap().header
}

#[test]
fn shallow_rekey_and_cluster_change_under_running_io() {
    let certs = Certs::generate(&["nvseal"]);
    let (sa, sb) = std::thread::scope(|s| {
        let a = s.spawn(|| PyKmip::start(&certs, "a", None));
        let b = s.spawn(|| PyKmip::start(&certs, "b", None));
        (a.join().unwrap(), b.join().unwrap())
    });
    let audit = certs.path("audit.log");
    let mut cfg = keys_config(vec![
        kms_config(
            certs.dir.path(),
            "kms-a",
            vec![sa.addr.clone()],
            "client",
            60_000,
        ),
        kms_config(
            certs.dir.path(),
            "kms-b",
            vec![sb.addr.clone()],
            "client",
            60_000,
        ),
    ]);
    cfg.audit_log = Some(audit.clone());
    let m = KeyManager::new(&cfg, ManagerOptions::default()).unwrap();
    let d1 = malloc_dev("rk1");
    let d2 = malloc_dev("rk2");
    m.add_encrypted(
        "boot",
        "rk1",
        d1.clone(),
        bdev_hio(&d1),
        &ns_key("kms-a", None),
        true,
    )
    .unwrap();
    let k1 = online(&m, "rk1").kek_id.unwrap();
    m.add_encrypted(
        "boot",
        "rk2",
        d2.clone(),
        bdev_hio(&d2),
        &ns_key("kms-a", None),
        true,
    )
    .unwrap();
    // Both namespaces share the cluster's current KEK, like vSAN's one KEK per cluster.
    assert_eq!(online(&m, "rk2").kek_id, Some(k1.clone()));

    let b1 = m.bdev("rk1").unwrap();
    let b2 = m.bdev("rk2").unwrap();
    let initial: Vec<Vec<u8>> = (0..DATA_BLOCKS).map(|l| pattern(7, l, 1, BS)).collect();
    for (l, d) in initial.iter().enumerate() {
        write_blocks(&b1, l as u64, d);
    }
    let rk2_data = pattern(9, 0, DATA_BLOCKS, BS);
    write_blocks(&b2, 0, &rk2_data);

    let expected = Arc::new(Mutex::new(initial));
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let io = {
        let (b, s, o, e) = (b1.clone(), stop.clone(), ops.clone(), expected.clone());
        std::thread::spawn(move || io_loop(b, s, o, e))
    };
    wait_ops(&ops, 50);

    // Rekey everything onto a new KEK of the same cluster while I/O runs.
    let report = m
        .shallow_rekey_with("uid:1000", &RekeyScope::All, "kms-a", true)
        .unwrap();
    let k2 = report.new_kek_id.clone();
    assert_ne!(k2, k1);
    assert_eq!(report.namespaces.len(), 2);
    for line in &report.namespaces {
        assert_eq!(line.result, NamespaceRekeyResult::Rekeyed, "{report:?}");
        assert_eq!(line.old_kek_id.as_ref(), Some(&k1));
    }
    assert_eq!(
        report.old_keks,
        [OldKek {
            provider: "kms-a".into(),
            kek_id: k1.clone(),
            action: OldKekAction::Revoked
        }]
    );
    let at = ops.load(Ordering::Relaxed);
    wait_ops(&ops, at + 50);

    // The old KEK is revoked on the server (KMIP state Deactivated), and still fetchable.
    let db_a = sa.db_path(None);
    assert_eq!(kmip_state(&db_a, k1.as_str()), 3);
    assert_eq!(kmip_state(&db_a, k2.as_str()), 2);
    let kms_a = cluster(&certs, vec![sa.addr.clone()], patient());
    kms_a.get_kek(&KeyId::new(k1.as_str())).unwrap();
    // Both headers name the new KEK, with no rekey left in progress.
    for dev in [&d1, &d2] {
        let h = header_of(dev);
        assert_eq!(h.active.kek_id, k2);
        assert_eq!(h.rekey, nvseal::keys::RekeyState::None);
        assert_eq!(h.generation, 4);
    }

    // Change of KMS cluster for rk2 only: its KEK moves to kms-b; k2 stays for rk1.
    let report = m
        .shallow_rekey_with(
            "uid:1000",
            &RekeyScope::Namespaces(vec!["rk2".into()]),
            "kms-b",
            true,
        )
        .unwrap();
    let k3 = report.new_kek_id.clone();
    assert_eq!(report.namespaces.len(), 1);
    assert_eq!(report.namespaces[0].result, NamespaceRekeyResult::Rekeyed);
    assert_eq!(report.namespaces[0].old_provider.as_deref(), Some("kms-a"));
    assert_eq!(
        report.old_keks,
        [OldKek {
            provider: "kms-a".into(),
            kek_id: k2.clone(),
            action: OldKekAction::Kept {
                used_by: vec![
                    "rk1".into(),
                    "kms-a current KEK (new namespaces are wrapped under it)".into()
                ]
            }
        }]
    );
    assert_eq!(kmip_state(&db_a, k2.as_str()), 2);
    let h2 = header_of(&d2);
    assert_eq!(h2.active.provider, ProviderKind::Kmip);
    assert_eq!(h2.active.kms_alias, "kms-b");
    assert_eq!(h2.active.kek_id, k3);
    let st2 = m.state("rk2").unwrap();
    assert_eq!(st2.kek_provider.as_deref(), Some("kms-b"));
    assert_eq!(st2.kek_id.as_ref(), Some(&k3));

    let at = ops.load(Ordering::Relaxed);
    wait_ops(&ops, at + 50);
    stop.store(true, Ordering::Relaxed);
    io.join().expect("I/O thread saw a data mismatch");
    // Everything reads back after the rekeys.
    let want = expected.lock().unwrap().concat();
    assert_eq!(read_blocks(&b1, 0, DATA_BLOCKS as u32), want);
    assert_eq!(read_blocks(&b2, 0, DATA_BLOCKS as u32), rk2_data);
    drop((b1, b2, m));

    // Restart: rk1 opens with k2 at kms-a, rk2 with k3 at kms-b (its config still says kms-a:
    // the header is authoritative).
    let m = KeyManager::new(&cfg, ManagerOptions::default()).unwrap();
    m.add_encrypted(
        "boot",
        "rk1",
        d1.clone(),
        bdev_hio(&d1),
        &ns_key("kms-a", None),
        false,
    )
    .unwrap();
    m.add_encrypted(
        "boot",
        "rk2",
        d2.clone(),
        bdev_hio(&d2),
        &ns_key("kms-a", None),
        false,
    )
    .unwrap();
    assert_eq!(online(&m, "rk1").kek_id, Some(k2.clone()));
    assert_eq!(online(&m, "rk2").kek_provider.as_deref(), Some("kms-b"));
    assert_eq!(
        read_blocks(&m.bdev("rk1").unwrap(), 0, DATA_BLOCKS as u32),
        want
    );
    assert_eq!(
        read_blocks(&m.bdev("rk2").unwrap(), 0, DATA_BLOCKS as u32),
        rk2_data
    );

    // The audit trail names the caller and each operation.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let has = |who: &str, op: &str, target: &str| {
        lines.iter().any(|l| {
            l["who"] == who
                && l["op"] == op
                && l["target"] == target
                && l["result"].as_str().unwrap().starts_with("ok")
        })
    };
    assert!(has("boot", "format", "rk1"), "{lines:?}");
    assert!(has("boot", "unlock", "rk2"), "{lines:?}");
    assert!(
        has("uid:1000", "kek-create", &format!("kms-a/{k2}")),
        "{lines:?}"
    );
    assert!(has("uid:1000", "rekey", "rk1"), "{lines:?}");
    assert!(
        has("uid:1000", "revoke", &format!("kms-a/{k1}")),
        "{lines:?}"
    );
    assert!(
        has("uid:1000", "kek-create", &format!("kms-b/{k3}")),
        "{lines:?}"
    );
    assert!(
        !has("uid:1000", "revoke", &format!("kms-a/{k2}")),
        "{lines:?}"
    );
}

#[test]
fn three_server_cluster_fails_over_to_the_live_server() {
    let logs = capture_logs();
    let certs = Certs::generate(&["nvseal"]);
    let db = certs.path("replicated.db");
    let (silent, live) = std::thread::scope(|s| {
        let silent = s.spawn(|| PyKmip::start(&certs, "silent", Some(&db)));
        let live = s.spawn(|| PyKmip::start(&certs, "live", Some(&db)));
        (silent.join().unwrap(), live.join().unwrap())
    });
    let closed = ServerAddr::new("127.0.0.1", free_port()).unwrap();
    // Warm the live server up (its first request is slow) so the short response timeout only
    // fires on the frozen server. The KEK is created here, with patience: a Create that timed
    // out on a loaded machine could leave a second key of the same name behind, which the
    // namespace would then refuse as ambiguous.
    let mut warm = KmipClient::connect(&live.addr, &certs.good_tls(), patient()).unwrap();
    warm.query().unwrap();
    let kek = warm.create_kek("fo-kek").unwrap();
    drop(warm);
    silent.pause();

    let cfg = keys_config(vec![kms_config(
        certs.dir.path(),
        "kms-f",
        vec![closed.clone(), silent.addr.clone(), live.addr.clone()],
        "client",
        2_000,
    )]);
    let m = KeyManager::new(&cfg, ManagerOptions::default()).unwrap();
    let dev = malloc_dev("fo0");
    m.add_encrypted(
        "test",
        "fo-ns",
        dev.clone(),
        bdev_hio(&dev),
        &ns_key("kms-f", Some("fo-kek")),
        true,
    )
    .unwrap();
    let st = online(&m, "fo-ns");
    assert_eq!(st.kek_provider.as_deref(), Some("kms-f"));
    assert_eq!(st.kek_id.as_ref().map(|k| k.as_str()), Some(kek.as_str()));
    let bdev = m.bdev("fo-ns").unwrap();
    let data = pattern(5, 0, 16, BS);
    write_blocks(&bdev, 0, &data);
    assert_eq!(read_blocks(&bdev, 0, 16), data);

    // The log names each failover: the refused server, the silent one, and who served.
    let text = logs.text();
    assert!(
        text.contains(&format!("{closed}: connection refused")),
        "{text}"
    );
    assert!(
        text.contains(&format!("{}: no answer", silent.addr)),
        "{text}"
    );
    assert!(text.contains(&format!("served_by={}", live.addr)), "{text}");
    let status = m.kms_status();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].servers[0].last_error_kind, Some("refused"));
    assert_eq!(status[0].servers[1].last_error_kind, Some("timeout"));
    assert_eq!(status[0].servers[2].reachable, Some(true));
    silent.resume();
}

#[test]
fn wrong_client_certificate_is_a_permanent_error_with_a_clear_reason() {
    let logs = capture_logs();
    let certs = Certs::generate(&["nvseal"]);
    let server = PyKmip::start(&certs, "s1", None);
    let dir = var_tmp();
    let path = dir.path().join("wc.img");
    let good = keys_config(vec![kms_config(
        certs.dir.path(),
        "kms-a",
        vec![server.addr.clone()],
        "client",
        60_000,
    )]);
    {
        let m = KeyManager::new(&good, ManagerOptions::default()).unwrap();
        m.add_encrypted(
            "test",
            "wc-ns",
            uring_dev(&path),
            file_hio(&path),
            &ns_key("kms-a", None),
            true,
        )
        .unwrap();
        online(&m, "wc-ns");
    }
    let before = std::fs::read(&path).unwrap();

    // Same cluster alias, but a client certificate from another CA.
    let wrong = keys_config(vec![kms_config(
        certs.dir.path(),
        "kms-a",
        vec![server.addr.clone()],
        "wrong-client",
        60_000,
    )]);
    let m = KeyManager::new(&wrong, ManagerOptions::default()).unwrap();
    m.add_encrypted(
        "test",
        "wc-boot2",
        uring_dev(&path),
        file_hio(&path),
        &ns_key("kms-a", None),
        true,
    )
    .unwrap();
    let st = settle(&m, "wc-boot2");
    match &st.state {
        NamespaceKeyState::Error { reason } => {
            assert!(reason.contains("client certificate"), "{reason}");
            assert!(reason.contains(&server.addr.to_string()), "{reason}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(m.bdev("wc-boot2").is_none());
    drop(m);
    // One attempt, no retries, nothing written.
    let text = logs.text();
    assert!(text.contains("namespace=wc-boot2"), "{text}");
    assert!(
        !text
            .lines()
            .any(|l| l.contains("namespace=wc-boot2") && l.contains("attempt: 2")),
        "{text}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn corrupt_header_copies_one_is_survived_both_refuse_without_writing() {
    let certs = Certs::generate(&["nvseal"]);
    let server = PyKmip::start(&certs, "s1", None);
    let dir = var_tmp();
    let path: PathBuf = dir.path().join("cc.img");
    let cfg = keys_config(vec![kms_config(
        certs.dir.path(),
        "kms-a",
        vec![server.addr.clone()],
        "client",
        60_000,
    )]);
    let key = ns_key("kms-a", None);
    let data = pattern(11, 0, DATA_BLOCKS, BS);
    {
        let m = KeyManager::new(&cfg, ManagerOptions::default()).unwrap();
        m.add_encrypted(
            "test",
            "cc-ns",
            uring_dev(&path),
            file_hio(&path),
            &key,
            true,
        )
        .unwrap();
        online(&m, "cc-ns");
        write_blocks(&m.bdev("cc-ns").unwrap(), 0, &data);
    }

    // Copy A damaged: copy B is used, the data reads back.
    corrupt(&path, 0x200);
    {
        let m = KeyManager::new(&cfg, ManagerOptions::default()).unwrap();
        m.add_encrypted(
            "test",
            "cc-ns",
            uring_dev(&path),
            file_hio(&path),
            &key,
            true,
        )
        .unwrap();
        let st = online(&m, "cc-ns");
        let warning = st.header_warning.unwrap_or_default();
        assert!(warning.contains("copy A"), "{warning}");
        assert_eq!(
            read_blocks(&m.bdev("cc-ns").unwrap(), 0, DATA_BLOCKS as u32),
            data
        );
    }

    // Both damaged: a precise error, and not one byte of the device changes (even with create).
    corrupt(&path, 64 * 1024 + 0x200);
    let before = std::fs::read(&path).unwrap();
    let m = KeyManager::new(&cfg, ManagerOptions::default()).unwrap();
    m.add_encrypted(
        "test",
        "cc-ns",
        uring_dev(&path),
        file_hio(&path),
        &key,
        true,
    )
    .unwrap();
    let st = settle(&m, "cc-ns");
    match &st.state {
        NamespaceKeyState::Error { reason } => {
            assert!(reason.contains("no valid header copy"), "{reason}");
            assert!(
                reason.contains("copy A") && reason.contains("copy B"),
                "{reason}"
            );
        }
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(m.bdev("cc-ns").is_none());
    drop(m);
    assert!(std::fs::read(&path).unwrap() == before, "device changed");
}
