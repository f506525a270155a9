//! Issue 18 ("Operator trust"), items 1-4, against real PyKMIP 0.11 servers and the key
//! manager: a replaced KEK is kept unless revocation is asked for, and never revoked while
//! referenced; a revoked KEK is refused on Get the way strict servers (Cosmian) refuse it, even
//! though PyKMIP would hand it out; a `kek_name` finds Active keys only; a KMS that closes the
//! connection during the TLS handshake leaves the namespace locked and retrying, not in
//! `error`; a namespace in `error` can be retried without a restart; `rekey.shallow` checks its
//! scope before it creates a KEK, and a KMS that is down is "unavailable".

mod common;

use common::serve::Serve;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::kmip::{cluster, free_port, kmip_state, Certs, PyKmip};
use common::{kms_config, online, pattern, read_blocks, settle, write_blocks};
use nvseal::bdev::Bdev;
use nvseal::keys::header::METADATA_REGION_BYTES;
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
    common::malloc_dev(name, DEV_BYTES, BS)
}

fn hio(dev: &Arc<dyn Bdev>) -> Box<dyn HeaderIo + Send> {
    common::header_io(dev)
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

/// Item 6: `encrypted` used to be a label. A plain RAM disk marked `encrypted: true` was
/// reported encrypted, and a crypto bdev exported without it plaintext. Now it follows from the
/// bdev stack, and a config whose label disagrees is refused with line and column.
#[test]
fn encrypted_follows_the_bdev_stack_and_a_wrong_label_is_refused() {
    use nvseal::config::Config;
    use nvseal::nvmf::config::NamespaceConfig;
    use nvseal::nvmf::target::Target;
    let yaml = |plain: &str, crypto: &str| {
        format!(
            "bdevs:\n  - {{ name: n0, type: null, size_bytes: 1048576 }}\n\
             \x20 - {{ name: n1, type: null, size_bytes: 1048576 }}\n\
             \x20 - {{ name: n1c, type: crypto, base: n1, key: ephemeral }}\n\
             subsystems:\n  - nqn: nqn.2026-12.io.nvseal:trust\n    serial: TRUST1\n\
             \x20   allowed_hosts: [\"nqn.2014-08.org.nvmexpress:uuid:trust-host\"]\n\
             \x20   namespaces:\n      - {{ nsid: 1, bdev: n0{plain} }}\n\
             \x20     - {{ nsid: 2, bdev: n1c{crypto} }}\n\
             \x20   listen:\n      - addr: 127.0.0.1\n        port: 0\n"
        )
    };
    // No labels, or labels that agree: accepted; the target reports what the stack is.
    for (plain, crypto) in [("", ""), (", encrypted: false", ", encrypted: true")] {
        let cfg = Config::from_yaml(&yaml(plain, crypto), "t.yaml").unwrap();
        let stacks = nvseal::stack::Stacks::open(&cfg).unwrap();
        let bdevs: std::collections::HashMap<String, Arc<dyn Bdev>> = stacks
            .bdevs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let t = Target::new(&cfg.subsystems, cfg.nvmf, &bdevs).unwrap();
        let s = t.subsystem("nqn.2026-12.io.nvseal:trust").unwrap();
        let enc: Vec<(u32, bool)> = s
            .namespaces()
            .iter()
            .map(|n| (n.nsid, n.encrypted))
            .collect();
        assert_eq!(enc, [(1, false), (2, true)], "labels {plain:?} {crypto:?}");

        // The target refuses a label that disagrees even when handed a config that skipped
        // validation.
        let mut subs = cfg.subsystems.clone();
        subs[0].namespaces[0] = NamespaceConfig {
            nsid: 1,
            bdev: "n0".into(),
            encrypted: Some(true),
        };
        let e = Target::new(&subs, cfg.nvmf, &bdevs).err().expect("refused");
        assert!(e.to_string().contains("plaintext"), "{e}");
    }
    // A plain null bdev said to be encrypted, a crypto bdev said to be plaintext: refused,
    // pointing at the field.
    for (plain, crypto, j, line) in [
        (", encrypted: true", "", 0, 10),
        ("", ", encrypted: false", 1, 11),
    ] {
        let Err(e) = Config::from_yaml(&yaml(plain, crypto), "t.yaml") else {
            panic!("labels {plain:?} {crypto:?} accepted");
        };
        assert_eq!(
            e.path,
            format!("subsystems[0].namespaces[{j}].encrypted"),
            "{e}"
        );
        assert_eq!(e.line, Some(line), "{e}");
        assert!(e.column.is_some(), "{e}");
        assert!(e.message.contains("bdev stack"), "{e}");
    }
}

fn rpc(sock: &Path, method: &str, params: serde_json::Value) -> serde_json::Value {
    nvseal::rpc::client::call(sock, method, Some(params))
        .unwrap_or_else(|e| panic!("{method}: {e}"))
}

/// The JSON-RPC error code and data of a call that must fail.
fn rpc_err(sock: &Path, method: &str, params: serde_json::Value) -> (i64, serde_json::Value) {
    match nvseal::rpc::client::call(sock, method, Some(params)) {
        Err(nvseal::rpc::client::ClientError::Rpc { code, data, .. }) => {
            (code, data.unwrap_or_default())
        }
        other => panic!("{method}: expected an RPC error, got {other:?}"),
    }
}

/// Waits until `keys.status` shows `ns` in state `want`; returns its status object.
fn wait_state(sock: &Path, ns: &str, want: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let st = rpc(sock, "keys.status", serde_json::json!({}));
        let found = st["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["ns_id"] == ns)
            .cloned();
        if let Some(n) = found.filter(|n| n["state"]["state"] == want) {
            return n;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{ns} never {want}: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Items 1, 3 and 4 over the control socket of a real `nvseal serve` (local key provider):
/// `rekey.shallow` refuses an unknown namespace with -32002 and keeps the old KEK,
/// `keys.revoke_kek` refuses a KEK in use with -32003 naming who uses it, and
/// `namespace.retry_unlock` restarts a namespace in `error` (audited) and refuses an online one.
#[test]
fn key_rpcs_over_the_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = d.join("trust.yaml");
    let sock = d.join("rpc.sock");
    let audit = d.join("audit.jsonl");
    std::fs::write(
        &cfg,
        format!(
            "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 20\n\
             keys:\n  local:\n    path: {keys}\n    create: true\n  audit_log: {audit}\n\
             \x20 unlock_retry: {{ initial_ms: 50, max_ms: 200 }}\n\
             rpc:\n  socket_path: {sock}\n\
             bdevs:\n  - {{ name: m1, type: malloc, size_bytes: 4194304 }}\n\
             \x20 - {{ name: m2, type: malloc, size_bytes: 4194304 }}\n\
             \x20 - {{ name: vol1, type: encrypted, base: m1, provider: local, create: true }}\n\
             \x20 - {{ name: vol2, type: encrypted, base: m2, provider: local, kek_name: no-such-kek, create: true }}\n\
             subsystems:\n  - nqn: nqn.2026-12.io.nvseal:trustrpc\n    serial: TRPC1\n\
             \x20   allowed_hosts: [\"nqn.2014-08.org.nvmexpress:uuid:trust-host\"]\n\
             \x20   namespaces:\n      - {{ nsid: 1, bdev: vol1 }}\n      - {{ nsid: 2, bdev: vol2 }}\n\
             \x20   listen:\n      - addr: 127.0.0.1\n        port: 0\n",
            keys = d.join("keys").display(),
            audit = audit.display(),
            sock = sock.display(),
        ),
    )
    .unwrap();
    let mut s = Serve::start(&cfg);
    s.wait_for("control socket listening");
    let vol1 = wait_state(&sock, "vol1", "online");
    let err = wait_state(&sock, "vol2", "error");
    assert!(
        err["state"]["reason"]
            .as_str()
            .unwrap()
            .contains("no-such-kek"),
        "{err}"
    );
    // Both namespaces are reported encrypted (derived from the stack, no label in the config).
    let subs = rpc(&sock, "subsystems.list", serde_json::json!({}));
    for n in subs["subsystems"][0]["namespaces"].as_array().unwrap() {
        assert_eq!(n["encrypted"], true, "{subs}");
    }

    // rekey.shallow: an unknown namespace is -32002 and creates nothing.
    let (code, _) = rpc_err(
        &sock,
        "rekey.shallow",
        serde_json::json!({ "provider": "local", "namespaces": ["vol1", "nope"] }),
    );
    assert_eq!(code, -32002);
    // A rekey keeps the old KEK.
    let rep = rpc(
        &sock,
        "rekey.shallow",
        serde_json::json!({ "provider": "local", "namespaces": ["vol1"] }),
    );
    assert_eq!(rep["old_keks"][0]["kek_id"], vol1["kek_id"], "{rep}");
    assert_eq!(rep["old_keks"][0]["action"], "kept", "{rep}");
    // keys.revoke_kek: the new KEK is in use by vol1; the old one is refused while vol2's header
    // (never read: it is in error) might name it.
    let new_kek = rep["new_kek_id"].clone();
    let (code, data) = rpc_err(
        &sock,
        "keys.revoke_kek",
        serde_json::json!({ "provider": "local", "kek_id": new_kek }),
    );
    assert_eq!(code, -32003);
    assert!(data["used_by"].to_string().contains("vol1"), "{data}");
    let (code, data) = rpc_err(
        &sock,
        "keys.revoke_kek",
        serde_json::json!({ "provider": "local", "kek_id": vol1["kek_id"] }),
    );
    assert_eq!(code, -32003);
    assert!(data["used_by"].to_string().contains("vol2"), "{data}");

    // namespace.retry_unlock: restarts vol2 (which fails again: its KEK does not exist),
    // refuses vol1 (online) and an unknown name.
    let r = rpc(
        &sock,
        "namespace.retry_unlock",
        serde_json::json!({ "namespace": "vol2" }),
    );
    assert_eq!(r["action"], "restarted", "{r}");
    wait_state(&sock, "vol2", "error");
    let (code, _) = rpc_err(
        &sock,
        "namespace.retry_unlock",
        serde_json::json!({ "namespace": "vol1" }),
    );
    assert_eq!(code, -32003);
    let (code, _) = rpc_err(
        &sock,
        "namespace.retry_unlock",
        serde_json::json!({ "namespace": "nope" }),
    );
    assert_eq!(code, -32002);
    s.assert_running("after the key RPCs");
    s.stop();
    let trail = std::fs::read_to_string(&audit).unwrap();
    assert!(
        trail
            .lines()
            .any(|l| l.contains("retry-unlock") && l.contains("vol2") && l.contains("restarted")),
        "{trail}"
    );
    assert!(
        trail
            .lines()
            .any(|l| l.contains("revoke") && l.contains("refused")),
        "{trail}"
    );
}
