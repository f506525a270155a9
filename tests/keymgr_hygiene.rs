//! Key hygiene of the key manager: a full create → unlock → rekey (both directions between the
//! local key file and a real PyKMIP cluster) → restart cycle, with every tracing event of every
//! thread captured, must not show any DEK or KEK — raw, lower-case or upper-case hex — in the
//! logs, the Debug or JSON form of any state, status or report, or the audit log.

mod common;

use std::sync::Arc;

use common::kmip::{cluster, Certs, PyKmip};
use common::{capture_logs, hex, kms_config, leaks, online, pattern, read_blocks, write_blocks};
use nvseal::bdev::malloc::{self, MallocConfig};
use nvseal::bdev::Bdev;
use nvseal::keys::header::METADATA_REGION_BYTES;
use nvseal::keys::header_io::BdevHeaderIo;
use nvseal::keys::manager::{
    KeyManager, KeysConfig, LocalKeysConfig, ManagerOptions, NamespaceKeyConfig,
    NamespaceRekeyResult, RekeyScope, RetryConfig, LOCAL_PROVIDER,
};
use nvseal::keys::{store, unwrap_dek, Kek, ProviderKind};
use nvseal::kms::{KeyId, Timeouts};
use nvseal::types::CoreId;
use zeroize::Zeroizing;

const BS: usize = 4096;
const DATA_BLOCKS: u64 = 32;

fn dev(name: &str) -> Arc<dyn Bdev> {
    malloc::open(&MallocConfig {
        name: name.into(),
        num_blocks: None,
        size_bytes: Some(METADATA_REGION_BYTES + DATA_BLOCKS * BS as u64),
        block_size: BS as u32,
        hugepages: false,
    })
    .unwrap()
}

fn hio(d: &Arc<dyn Bdev>) -> BdevHeaderIo {
    BdevHeaderIo::new(d.clone(), CoreId(0), METADATA_REGION_BYTES).unwrap()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[test]
fn keys_never_appear_in_logs_states_reports_or_audit() {
    let logs = capture_logs();
    let certs = Certs::generate(&["nvseal"]);
    let server = PyKmip::start(&certs, "s1", None);
    let key_file = certs.path("local.keys");
    let audit = certs.path("audit.log");
    let cfg = KeysConfig {
        kms_clusters: vec![kms_config(
            certs.dir.path(),
            "kms-a",
            vec![server.addr.clone()],
            "client",
            60_000,
        )],
        local: Some(LocalKeysConfig {
            path: key_file.clone(),
            create: true,
        }),
        unlock_retry: RetryConfig {
            initial_ms: 100,
            max_ms: 500,
        },
        audit_log: Some(audit.clone()),
        allow_unlocked_memory: false,
    };
    let d_local = dev("hy0");
    let d_kmip = dev("hy1");
    let ns_local = NamespaceKeyConfig {
        provider: LOCAL_PROVIDER.into(),
        kek_name: None,
    };
    let ns_kmip = NamespaceKeyConfig {
        provider: "kms-a".into(),
        kek_name: Some("hygiene-kek".into()),
    };
    let mut printed: Vec<u8> = Vec::new();
    let mut record = |s: String| {
        printed.extend_from_slice(s.as_bytes());
        printed.push(b'\n');
    };
    let data = pattern(21, 0, DATA_BLOCKS, BS);

    let m = KeyManager::new(&cfg, ManagerOptions::default()).unwrap();
    m.add_encrypted(
        "hygiene",
        "hy-local",
        d_local.clone(),
        Box::new(hio(&d_local)),
        &ns_local,
        true,
    )
    .unwrap();
    m.add_encrypted(
        "hygiene",
        "hy-kmip",
        d_kmip.clone(),
        Box::new(hio(&d_kmip)),
        &ns_kmip,
        true,
    )
    .unwrap();
    for ns in ["hy-local", "hy-kmip"] {
        record(format!("{:?}", online(&m, ns)));
        write_blocks(&m.bdev(ns).unwrap(), 0, &data);
    }
    // Local → KMIP (change of provider) for both, then the local one back to the key file.
    let r1 = m.shallow_rekey("uid:0", &RekeyScope::All, "kms-a").unwrap();
    let r2 = m
        .shallow_rekey(
            "uid:0",
            &RekeyScope::Namespaces(vec!["hy-local".into()]),
            LOCAL_PROVIDER,
        )
        .unwrap();
    for r in [&r1, &r2] {
        assert!(
            r.namespaces
                .iter()
                .all(|l| l.result == NamespaceRekeyResult::Rekeyed),
            "{r:?}"
        );
        record(format!("{r:?}"));
        record(format!("{r:#?}"));
        record(serde_json::to_string(r).unwrap());
    }
    for st in m.states() {
        record(format!("{st:?}"));
        record(serde_json::to_string(&st).unwrap());
    }
    record(serde_json::to_string(&m.kms_status()).unwrap());
    drop(m);

    // Restart: both unlock again under their new KEKs.
    let m = KeyManager::new(&cfg, ManagerOptions::default()).unwrap();
    m.add_encrypted(
        "hygiene",
        "hy-local",
        d_local.clone(),
        Box::new(hio(&d_local)),
        &ns_local,
        false,
    )
    .unwrap();
    m.add_encrypted(
        "hygiene",
        "hy-kmip",
        d_kmip.clone(),
        Box::new(hio(&d_kmip)),
        &ns_kmip,
        false,
    )
    .unwrap();
    for ns in ["hy-local", "hy-kmip"] {
        record(format!("{:?}", online(&m, ns)));
        assert_eq!(
            read_blocks(&m.bdev(ns).unwrap(), 0, DATA_BLOCKS as u32),
            data
        );
    }
    record(format!("{:?}", m.states()));
    drop(m);

    // Every key of the run: all KEKs of the key file, every KMIP KEK the reports name, and
    // both DEKs (unwrapped here from the headers, independently of the manager).
    let mut keys: Vec<Vec<u8>> = Vec::new();
    let file = std::fs::read_to_string(&key_file).unwrap();
    for line in file.lines().filter(|l| !l.starts_with('#')) {
        if let Some(k) = line.split_whitespace().nth(2).and_then(decode_hex) {
            assert_eq!(k.len(), 32);
            keys.push(k);
        }
    }
    assert!(keys.len() >= 2, "default KEK and the rekey's local KEK");
    let kms = cluster(
        &certs,
        vec![server.addr.clone()],
        Timeouts {
            connect: std::time::Duration::from_secs(30),
            response: std::time::Duration::from_secs(60),
        },
    );
    let kmip_ids: Vec<_> = [&r1, &r2]
        .iter()
        .flat_map(|r| {
            r.old_keks
                .iter()
                .filter(|o| o.provider == "kms-a")
                .map(|o| o.kek_id.clone())
                .chain(std::iter::once(r.new_kek_id.clone()).filter(|_| r.provider == "kms-a"))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(!kmip_ids.is_empty());
    for id in &kmip_ids {
        keys.push(
            kms.get_kek(&KeyId::new(id.as_str()))
                .unwrap()
                .expose()
                .to_vec(),
        );
    }
    for d in [&d_local, &d_kmip] {
        let header = store::read_header(&mut hio(d)).unwrap().header;
        let kek_bytes = match header.active.provider {
            ProviderKind::Kmip => kms
                .get_kek(&KeyId::new(header.active.kek_id.as_str()))
                .unwrap()
                .expose()
                .to_vec(),
            ProviderKind::Local => {
                let line = file
                    .lines()
                    .find(|l| l.split_whitespace().next() == Some(header.active.kek_id.as_str()))
                    .unwrap();
                decode_hex(line.split_whitespace().nth(2).unwrap()).unwrap()
            }
        };
        let mut kb = Zeroizing::new([0u8; 32]);
        kb.copy_from_slice(&kek_bytes);
        let dek = unwrap_dek(&Kek::from_bytes(kb), &header.active.wrapped_dek).unwrap();
        let dek = dek.expose().to_vec();
        keys.push(dek[..32].to_vec());
        keys.push(dek[32..].to_vec());
        keys.push(dek);
    }

    // Positive control: the scan finds a key where it is known to be (the local key file).
    assert!(leaks(file.as_bytes(), &keys[0]));
    assert!(leaks(hex(&keys[0]).to_uppercase().as_bytes(), &keys[0]));
    assert!(leaks(format!("x = {:?}", &keys[0]).as_bytes(), &keys[0]));

    let log_bytes = logs.bytes();
    assert!(
        logs.text().contains("shallow rekey finished"),
        "the capture saw the run"
    );
    let audit_text = std::fs::read(&audit).unwrap();
    assert!(!audit_text.is_empty());
    for (i, k) in keys.iter().enumerate() {
        assert!(!leaks(&log_bytes, k), "key #{i} appears in the logs");
        assert!(!leaks(&printed, k), "key #{i} appears in a state or report");
        assert!(!leaks(&audit_text, k), "key #{i} appears in the audit log");
    }
}
