//! Issue 18 ("Operator trust"), items 1-4, against real PyKMIP 0.11 servers and the key
//! manager: a replaced KEK is kept unless revocation is asked for, and never revoked while
//! referenced; a revoked KEK is refused on Get the way strict servers (Cosmian) refuse it, even
//! though PyKMIP would hand it out; a `kek_name` finds Active keys only; a KMS that closes the
//! connection during the TLS handshake leaves the namespace locked and retrying, not in
//! `error`; a namespace in `error` can be retried without a restart; `rekey.shallow` checks its
//! scope before it creates a KEK, and a KMS that is down is "unavailable".

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::kmip::{cluster, free_port, kmip_state, Certs, PyKmip};
use common::{kms_config, online, pattern, read_blocks, settle, write_blocks};
use nvseal::bdev::malloc::{self, MallocConfig};
use nvseal::bdev::Bdev;
use nvseal::keys::header::METADATA_REGION_BYTES;
use nvseal::keys::header_io::BdevHeaderIo;
use nvseal::keys::kmip_provider::KmipKeyProvider;
use nvseal::keys::manager::{
    KeyManager, KeysConfig, ManagerOptions, NamespaceKeyConfig, NamespaceKeyState,
    NamespaceRekeyResult, OldKekAction, RekeyRequestError, RekeyScope, RetryConfig, RetryUnlock,
    RetryUnlockError, RevokeKekError,
};
use nvseal::keys::provider::KekState;
use nvseal::keys::store::HeaderIo;
use nvseal::keys::{KekId, KeyProvider, ProviderError};
use nvseal::kms::{KeyId, RevocationReason, Timeouts};
use nvseal::types::CoreId;

const BS: usize = 4096;
const DATA_BLOCKS: u64 = 16;
const DEV_BYTES: u64 = METADATA_REGION_BYTES + DATA_BLOCKS * BS as u64;

fn keys_config(clusters: Vec<nvseal::kms::KmsClusterConfig>) -> KeysConfig {
    KeysConfig {
        kms_clusters: clusters,
        unlock_retry: RetryConfig {
            initial_ms: 100,
            max_ms: 300,
        },
        ..KeysConfig::default()
    }
}

fn one_server(certs: &Certs, server: &PyKmip) -> KeysConfig {
    keys_config(vec![kms_config(
        certs.dir.path(),
        "kms-a",
        vec![server.addr.clone()],
        "client",
        60_000,
    )])
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

fn hio(dev: &Arc<dyn Bdev>) -> Box<dyn HeaderIo + Send> {
    Box::new(BdevHeaderIo::new(dev.clone(), CoreId(0), METADATA_REGION_BYTES).expect("hio"))
}

fn key(kek_name: Option<&str>) -> NamespaceKeyConfig {
    NamespaceKeyConfig {
        provider: "kms-a".into(),
        kek_name: kek_name.map(Into::into),
    }
}

fn patient() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(30),
        response: Duration::from_secs(60),
    }
}

/// Number of objects PyKMIP holds (its SQLite database), read with Python's sqlite3 so the
/// count does not go through nvseal's client.
fn kmip_objects(db: &Path) -> u32 {
    let script = "import sqlite3, sys\n\
                  c = sqlite3.connect(sys.argv[1])\n\
                  print(c.execute('select count(*) from crypto_objects').fetchone()[0])\n";
    let out = Command::new("python3")
        .args(["-c", script, db.to_str().unwrap()])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Item 1: PyKMIP serves Get of a Deactivated key; Cosmian answers Wrong Key Lifecycle State.
/// The provider checks the State itself, so nvseal refuses a revoked KEK on both.
#[test]
fn a_revoked_kek_is_refused_like_a_strict_server_would() {
    let certs = Certs::generate(&["nvseal"]);
    let server = PyKmip::start(&certs, "s1", None);
    let kms = Arc::new(cluster(&certs, vec![server.addr.clone()], patient()));
    let mut p = KmipKeyProvider::new(kms.clone());
    let (id, kek) = p.create_kek("trust-revoke").unwrap();
    assert_eq!(
        p.get_kek(&id).unwrap().fingerprint(),
        kek.fingerprint(),
        "an Active KEK is served"
    );
    kms.revoke(&KeyId::new(id.as_str()), RevocationReason::Superseded)
        .unwrap();
    assert_eq!(kmip_state(&server.db_path(None), id.as_str()), 3);
    // PyKMIP itself still hands the key out (what this test guards against)...
    kms.get_kek(&KeyId::new(id.as_str())).unwrap();
    // ...the provider does not.
    match p.get_kek(&id) {
        Err(ProviderError::InvalidState {
            state: KekState::Revoked,
            op: "get",
            ..
        }) => {}
        Err(e) => panic!("expected a refusal for state revoked, got {e}"),
        Ok(_) => panic!("a revoked KEK was handed out"),
    }
    // An unknown id is "not found", not a refusal.
    let missing = KekId::new("999999").unwrap();
    assert!(matches!(
        p.get_kek(&missing),
        Err(ProviderError::NotFound { .. })
    ));
}

/// Item 1: a rekey used to revoke the old KEK once no *registered* namespace named it. A
/// namespace created afterwards with the same `kek_name` then wrapped its DEK under (PyKMIP) or
/// failed on (Cosmian) the revoked key. Now the old KEK is kept, the later namespace comes
/// online under an Active KEK, and an explicit revocation is refused while it is in use.
#[test]
fn a_rekey_keeps_the_old_kek_for_a_later_namespace_with_the_same_kek_name() {
    let certs = Certs::generate(&["nvseal"]);
    let server = PyKmip::start(&certs, "s1", None);
    let db = server.db_path(None);
    let m = KeyManager::new(&one_server(&certs, &server), ManagerOptions::default()).unwrap();
    let d1 = malloc_dev("shared1");
    m.add_encrypted(
        "test",
        "shared1",
        d1.clone(),
        hio(&d1),
        &key(Some("shared-kek")),
        true,
    )
    .unwrap();
    let k1 = online(&m, "shared1").kek_id.unwrap();

    let report = m.shallow_rekey("test", &RekeyScope::All, "kms-a").unwrap();
    assert_eq!(report.namespaces[0].result, NamespaceRekeyResult::Rekeyed);
    assert_eq!(report.old_keks.len(), 1);
    assert_eq!(report.old_keks[0].kek_id, k1);
    assert!(
        matches!(report.old_keks[0].action, OldKekAction::NotRevoked { .. }),
        "{report:?}"
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["old_keks"][0]["action"], "kept", "{json}");
    assert_eq!(kmip_state(&db, k1.as_str()), 2, "the old KEK stays Active");

    // A namespace created later (e.g. over RPC) with the same kek_name.
    let d2 = malloc_dev("shared2");
    m.add_encrypted(
        "test",
        "shared2",
        d2.clone(),
        hio(&d2),
        &key(Some("shared-kek")),
        true,
    )
    .unwrap();
    let st = online(&m, "shared2");
    assert_eq!(st.kek_id.as_ref(), Some(&k1));
    assert_eq!(kmip_state(&db, k1.as_str()), 2);

    // Revoking it by hand is refused while shared2 uses it; nothing changes at the KMS.
    match m.revoke_kek("test", "kms-a", &k1) {
        Err(RevokeKekError::InUse { used_by, .. }) => {
            assert_eq!(used_by, ["shared2"], "{used_by:?}")
        }
        other => panic!("expected InUse, got {other:?}"),
    }
    assert_eq!(kmip_state(&db, k1.as_str()), 2);

    // Restart: both unlock.
    drop(m);
    let m = KeyManager::new(&one_server(&certs, &server), ManagerOptions::default()).unwrap();
    for (ns, d) in [("shared1", &d1), ("shared2", &d2)] {
        m.add_encrypted(
            "boot",
            ns,
            d.clone(),
            hio(d),
            &key(Some("shared-kek")),
            false,
        )
        .unwrap();
        online(&m, ns);
    }
    // Once shared2 moved on too, asking for revocation revokes it.
    let report = m
        .shallow_rekey_with(
            "test",
            &RekeyScope::Namespaces(vec!["shared2".into()]),
            "kms-a",
            true,
        )
        .unwrap();
    assert_eq!(report.old_keks[0].kek_id, k1);
    assert_eq!(
        report.old_keks[0].action,
        OldKekAction::Revoked,
        "{report:?}"
    );
    assert_eq!(kmip_state(&db, k1.as_str()), 3);
}

/// Item 2: a KEK name still names a revoked key after a rekey. Locate used to return it and a
/// new namespace was wrapped under it; now only an Active key of that name counts, and when
/// there is none a new one is created.
#[test]
fn a_kek_name_finds_only_active_keys() {
    let certs = Certs::generate(&["nvseal"]);
    let server = PyKmip::start(&certs, "s1", None);
    let db = server.db_path(None);
    let kms = cluster(&certs, vec![server.addr.clone()], patient());
    let old = kms.create_kek("named-kek").unwrap().id;
    kms.revoke(&old, RevocationReason::Superseded).unwrap();
    assert_eq!(kmip_state(&db, old.as_str()), 3);

    let m = KeyManager::new(&one_server(&certs, &server), ManagerOptions::default()).unwrap();
    let d = malloc_dev("named");
    m.add_encrypted(
        "test",
        "named",
        d.clone(),
        hio(&d),
        &key(Some("named-kek")),
        true,
    )
    .unwrap();
    let st = online(&m, "named");
    let kek = st.kek_id.unwrap();
    assert_ne!(kek.as_str(), old.as_str(), "wrapped under the revoked KEK");
    assert_eq!(kmip_state(&db, kek.as_str()), 2);
    // The new key carries the name: a second namespace with it shares the Active key.
    let d2 = malloc_dev("named2");
    m.add_encrypted(
        "test",
        "named2",
        d2.clone(),
        hio(&d2),
        &key(Some("named-kek")),
        true,
    )
    .unwrap();
    assert_eq!(online(&m, "named2").kek_id, Some(kek));
}

/// A TCP server that accepts connections and closes each at once, during the TLS handshake (a
/// load balancer without a healthy backend). Counts the connections.
struct Closer {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Closer {
    fn start(port: u16) -> Closer {
        let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU32::new(0));
        let (s, a) = (stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((conn, _)) => {
                        a.fetch_add(1, Ordering::Relaxed);
                        drop(conn);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Closer {
            stop,
            accepted,
            thread: Some(thread),
        }
    }
}

impl Drop for Closer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Item 3: a connection closed during the handshake is not a certificate rejection. The
/// namespace stays locked and keeps retrying; when a healthy server appears at that address it
/// comes online, without a restart.
#[test]
fn a_kms_closing_in_the_handshake_leaves_the_namespace_locked_until_it_is_healthy() {
    let certs = Certs::generate(&["nvseal"]);
    let port = free_port();
    let closer = Closer::start(port);
    let addr = nvseal::kms::ServerAddr::new("127.0.0.1", port).unwrap();
    let cfg = keys_config(vec![kms_config(
        certs.dir.path(),
        "kms-a",
        vec![addr],
        "client",
        10_000,
    )]);
    let m = KeyManager::new(&cfg, ManagerOptions::default()).unwrap();
    let d = malloc_dev("lb");
    m.add_encrypted("test", "lb", d.clone(), hio(&d), &key(None), true)
        .unwrap();
    // Several attempts, every one closed in the handshake: still locked, never in error.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while closer.accepted.load(Ordering::Relaxed) < 3 {
        assert!(std::time::Instant::now() < deadline, "no retries seen");
        let st = m.state("lb").unwrap();
        assert!(
            !matches!(st.state, NamespaceKeyState::Error { .. }),
            "a closed handshake put the namespace in error: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = m
        .wait_for("lb", Duration::from_secs(30), |s| {
            *s == NamespaceKeyState::Locked
        })
        .unwrap();
    assert_eq!(st.state, NamespaceKeyState::Locked, "{st:?}");
    let err = st.last_error.unwrap_or_default();
    assert!(err.contains("handshake"), "{err}");
    assert!(
        !err.contains("client certificate"),
        "blames the certificate: {err}"
    );
    // The backend becomes healthy: a real KMS on the same address.
    drop(closer);
    let server = PyKmip::start_on(&certs, "s1", None, port);
    let st = online(&m, "lb");
    assert_eq!(
        kmip_state(&server.db_path(None), st.kek_id.unwrap().as_str()),
        2
    );
}

/// Item 3: `retry_unlock` (the `namespace.retry_unlock` RPC) restarts the unlock of a namespace
/// in `error` once its cause is fixed: here both header copies were damaged, then restored
/// from a copy taken earlier.
#[test]
fn a_namespace_in_error_is_retried_without_a_restart() {
    let certs = Certs::generate(&["nvseal"]);
    let server = PyKmip::start(&certs, "s1", None);
    let cfg = one_server(&certs, &server);
    let d = malloc_dev("rt");
    let data = pattern(5, 0, DATA_BLOCKS, BS);
    {
        let m = KeyManager::new(&cfg, ManagerOptions::default()).unwrap();
        m.add_encrypted("test", "rt", d.clone(), hio(&d), &key(None), true)
            .unwrap();
        online(&m, "rt");
        write_blocks(&m.bdev("rt").unwrap(), 0, &data);
    }
    // Header copies at 0 and 64 KiB (blocks 0 and 16).
    let saved = [read_blocks(&d, 0, 1), read_blocks(&d, 16, 1)];
    for lba in [0, 16] {
        let mut bad = read_blocks(&d, lba, 1);
        bad[100..132].fill(0x5a);
        write_blocks(&d, lba, &bad);
    }
    let m = KeyManager::new(&cfg, ManagerOptions::default()).unwrap();
    m.add_encrypted("boot", "rt", d.clone(), hio(&d), &key(None), true)
        .unwrap();
    let st = settle(&m, "rt");
    assert!(
        matches!(st.state, NamespaceKeyState::Error { .. }),
        "{st:?}"
    );
    // Nothing to retry for an unknown namespace.
    assert!(matches!(
        m.retry_unlock("op", "nope"),
        Err(RetryUnlockError::UnknownNamespace(_))
    ));
    // The operator restores the header, then retries: it comes online, the data reads back.
    write_blocks(&d, 0, &saved[0]);
    write_blocks(&d, 16, &saved[1]);
    assert_eq!(m.retry_unlock("op", "rt").unwrap(), RetryUnlock::Restarted);
    online(&m, "rt");
    assert_eq!(
        read_blocks(&m.bdev("rt").unwrap(), 0, DATA_BLOCKS as u32),
        data
    );
    // Online: nothing to retry.
    assert!(matches!(
        m.retry_unlock("op", "rt"),
        Err(RetryUnlockError::NotFailed { .. })
    ));
}

/// Item 4: `rekey.shallow` naming an unknown namespace used to create a KEK first (an orphan
/// on the KMS). The scope is checked first now; with the KMS down the error is transient
/// (the RPC answers -32004, see `server::keys_rpc`).
#[test]
fn rekey_shallow_checks_its_scope_before_creating_a_kek() {
    let certs = Certs::generate(&["nvseal"]);
    let server = PyKmip::start(&certs, "s1", None);
    let db = server.db_path(None);
    let m = KeyManager::new(&one_server(&certs, &server), ManagerOptions::default()).unwrap();
    let d = malloc_dev("sc");
    m.add_encrypted("test", "sc", d.clone(), hio(&d), &key(None), true)
        .unwrap();
    online(&m, "sc");
    let objects = kmip_objects(&db);
    match m.shallow_rekey(
        "test",
        &RekeyScope::Namespaces(vec!["sc".into(), "no-such-ns".into()]),
        "kms-a",
    ) {
        Err(RekeyRequestError::UnknownNamespaces(v)) => assert_eq!(v, ["no-such-ns"]),
        other => panic!("expected UnknownNamespaces, got {other:?}"),
    }
    assert!(matches!(
        m.shallow_rekey("test", &RekeyScope::Namespaces(vec![]), "kms-a"),
        Err(RekeyRequestError::EmptyScope)
    ));
    assert_eq!(kmip_objects(&db), objects, "a KEK was created for nothing");

    // The KMS goes away: creating the KEK fails as "unavailable", not as a bad request.
    drop(server);
    match m.shallow_rekey("test", &RekeyScope::All, "kms-a") {
        Err(RekeyRequestError::CreateKek { source, .. }) => {
            assert!(source.is_transient(), "{source}")
        }
        other => panic!("expected CreateKek, got {other:?}"),
    }
}
