//! `namespace.encrypt` and `namespace.decrypt` on the real `nvseal serve` while
//! `nvseal perf --verify` writes and reads the namespace over NVMe/TCP: on `uring` over a real
//! file and on `malloc`, block sizes 512 and 4096, and on a file with a detached header.
//!
//! A plaintext namespace (config `plaintext: true`, reserved region blank) is encrypted under a
//! verified workload, paused and resumed over RPC; a second workload rewrites every block while
//! the pass runs; afterwards every block reads back as acknowledged. On a file the target is then
//! stopped and the file checked with an independent XTS (Python `cryptography`, the DEK
//! unwrapped by the OpenSSL CLI): every unit decrypts under the DEK, and no plaintext is left on
//! the device (journal area included). Then the namespace is decrypted under load the same way;
//! on a file the decrypt is paused half way and the target stopped: plaintext below the
//! watermark, the DEK above; a restart resumes it by itself; at the end the file holds the
//! plaintext at its data offset and both header copies are retired (no wrapped DEK left).
//!
//! Needs `openssl` and `python3` with `cryptography` (as tests/keys_openssl.rs).

mod common;

use common::pass::{
    check_all_blocks, check_perf, openssl_unwrap, python_decrypt, rpc, rpc_err, wait_pass, Area,
    Perf,
};
use common::serve::{addr_of, Serve};
use nvseal::keys::header::{AnyHeader, CopyId, Direction, RekeyState, METADATA_REGION_BYTES};
use nvseal::keys::store;
use nvseal::tools::bdevperf::fill_pattern;
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

const NQN: &str = "nqn.2026-12.io.nvseal:encdec";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:e9cde9cd-0000-4000-8000-000000000001";
/// Size of the data area (the size hosts see, before and after).
const DATA_BYTES: u64 = 4 << 20;
const SEED_A: u64 = 91;
const SEED_B: u64 = 92;
const SEED_C: u64 = 93;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Backing {
    File,
    Malloc,
    /// A file with no room for a header: the header goes to a detached file.
    Detached,
}

fn config(d: &Path, backing: Backing, bs: u32) -> PathBuf {
    let region = if backing == Backing::Detached {
        0
    } else {
        METADATA_REGION_BYTES
    };
    let base = match backing {
        Backing::File | Backing::Detached => format!(
            "  - name: disk\n    type: uring\n    path: {}\n    size_bytes: {}\n    block_size: {bs}\n",
            d.join("disk.img").display(),
            region + DATA_BYTES
        ),
        Backing::Malloc => format!(
            "  - name: disk\n    type: malloc\n    size_bytes: {}\n    block_size: {bs}\n",
            region + DATA_BYTES
        ),
    };
    let header = if backing == Backing::Detached {
        format!("    header_file: {}\n", d.join("vol.hdr").display())
    } else {
        String::new()
    };
    let cfg = d.join("encdec.yaml");
    fs::write(
        &cfg,
        format!(
            "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 20\n\
             keys:\n  local:\n    path: {keys}\n    create: true\n  audit_log: {audit}\n\
             rpc:\n  socket_path: {sock}\n\
             bdevs:\n{base}\
             \x20 - name: vol\n    type: encrypted\n    base: disk\n    provider: local\n    plaintext: true\n{header}\
             subsystems:\n  - nqn: {NQN}\n    serial: ENCDEC1\n    allowed_hosts: [\"{HOST}\"]\n\
             \x20   namespaces:\n      - nsid: 1\n        bdev: vol\n        encrypted: true\n\
             \x20   listen:\n      - addr: 127.0.0.1\n        port: 0\n",
            keys = d.join("keys").display(),
            audit = d.join("audit.jsonl").display(),
            sock = d.join("rpc.sock").display(),
        ),
    )
    .unwrap();
    cfg
}

fn start(cfg: &Path) -> (Serve, std::net::SocketAddr) {
    let mut s = Serve::start(cfg);
    let addr = addr_of(&s.wait_for("NVMe/TCP listening"));
    s.wait_for("namespace online");
    s.wait_for("control socket listening");
    common::pass::wait_online(&cfg.parent().unwrap().join("rpc.sock"), "vol");
    (s, addr)
}

fn data_state(sock: &Path) -> Value {
    let ks = rpc(sock, "keys.status", json!({}));
    let list = rpc(sock, "subsystems.list", json!({}));
    let from_list = list["subsystems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["nqn"] == NQN)
        .map(|s| s["namespaces"][0]["data_state"].clone())
        .unwrap_or(Value::Null);
    assert_eq!(
        ks["namespaces"][0]["data_state"], from_list,
        "keys.status and subsystems.list disagree: {ks} / {list}"
    );
    from_list
}

/// The header (either kind) and the place of the data area of a stopped target's files.
fn header_any(d: &Path, backing: Backing) -> (AnyHeader, [AnyHeader; 2]) {
    let path = match backing {
        Backing::Detached => d.join("vol.hdr"),
        _ => d.join("disk.img"),
    };
    let mut f = fs::File::open(path).unwrap();
    let cur = store::read_any(&mut f).expect("header").header;
    let copies = CopyId::ALL.map(|c| store::read_copy_any(&mut f, c).expect("copy"));
    (cur, copies)
}

/// No 64-byte piece of perf's data for `seed` at a few units is anywhere in `bytes`.
fn assert_no_plaintext(bytes: &[u8], bs: u32, seeds: &[u64], what: &str) {
    let blocks = DATA_BYTES / u64::from(bs);
    for &seed in seeds {
        let mut want = vec![0u8; DATA_BYTES as usize];
        fill_pattern(&mut want, 0, bs as usize, seed);
        for lba in [0, blocks / 2, blocks - 1] {
            let at = (lba * u64::from(bs)) as usize;
            assert!(
                !common::leaks(bytes, &want[at..at + 64]),
                "plaintext of unit {lba} (seed {seed}) is in {what}"
            );
        }
    }
}

fn case(backing: Backing, bs: u32) {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let d = dir.path();
    let cfg = config(d, backing, bs);
    let sock = d.join("rpc.sock");
    let blocks = DATA_BYTES / u64::from(bs);
    let (s, addr) = start(&cfg);
    let at = addr.to_string();
    let pf = Perf {
        addr: &at,
        nqn: NQN,
        host: HOST,
        data_bytes: DATA_BYTES,
    };
    assert_eq!(data_state(&sock), "plaintext");
    assert!(
        s.log
            .iter()
            .any(|l| l.contains("plaintext managed namespace online")),
        "a plaintext namespace must not be logged as encrypted:\n{}",
        s.log.join("\n")
    );

    // Bad requests first: nothing starts, nothing is written.
    let (code, msg) = rpc_err(&sock, "namespace.decrypt", json!({ "namespace": "vol" }));
    assert!(code == -32602 && msg.contains("already plaintext"), "{msg}");
    let (code, msg) = rpc_err(&sock, "rekey.deep", json!({ "namespace": "vol" }));
    assert!(code == -32602 && msg.contains("plaintext"), "{msg}");
    let (code, msg) = rpc_err(
        &sock,
        "namespace.encrypt",
        json!({ "namespace": "vol", "rate_mib_s": 0 }),
    );
    assert_eq!(code, -32602, "{msg}");
    let (code, _) = rpc_err(&sock, "namespace.encrypt", json!({ "namespace": "nope" }));
    assert_eq!(code, -32002);
    let (code, msg) = rpc_err(
        &sock,
        "namespace.crypto_erase",
        json!({ "namespace": "vol" }),
    );
    assert!(code < 0, "{msg}");
    if backing == Backing::Detached {
        assert!(
            !d.join("vol.hdr").exists(),
            "a refusal created the header file"
        );
    }

    // Encrypt under verified I/O, paused and resumed; a second run rewrites every block while
    // the pass still goes.
    let json1 = d.join("perf1.json");
    let p = pf.spawn(1, SEED_A, &json1);
    std::thread::sleep(Duration::from_millis(300));
    let st = rpc(
        &sock,
        "namespace.encrypt",
        json!({ "namespace": "vol", "rate_mib_s": 2 }),
    );
    assert_eq!(st["operation"], "encrypt", "{st}");
    assert_eq!(st["state"], "running", "{st}");
    let (code, msg) = rpc_err(&sock, "namespace.encrypt", json!({ "namespace": "vol" }));
    assert_eq!(code, -32003, "a second encrypt while one runs: {msg}");
    let (code, msg) = rpc_err(&sock, "namespace.decrypt", json!({ "namespace": "vol" }));
    assert_eq!(code, -32003, "a decrypt while an encrypt runs: {msg}");
    std::thread::sleep(Duration::from_millis(600));
    let st = rpc(&sock, "rekey.pause", json!({ "namespace": "vol" }));
    assert_eq!(st["state"], "paused", "{st}");
    let w = st["watermark_blocks"].as_u64().unwrap();
    assert!(w > 0 && w < blocks, "{st}");
    assert_eq!(data_state(&sock), "converting");
    rpc(
        &sock,
        "rekey.resume",
        json!({ "namespace": "vol", "rate_mib_s": 2 }),
    );
    check_perf(p, &json1);
    let json2 = d.join("perf2.json");
    let p = pf.spawn(2, SEED_B, &json2);
    let st = wait_pass(&sock, "vol", "finished");
    assert_eq!(st["percent"], 100.0, "{st}");
    check_perf(p, &json2);
    check_all_blocks(&pf, addr, bs, SEED_B, SEED_A);
    assert_eq!(data_state(&sock), "encrypted");

    let (img, area_off) = match backing {
        Backing::Detached => (d.join("disk.img"), 0),
        _ => (d.join("disk.img"), METADATA_REGION_BYTES),
    };
    let area = Area {
        img: &img,
        unit: bs,
        offset: area_off,
        blocks,
    };
    let mut want_b = vec![0u8; DATA_BYTES as usize];
    fill_pattern(&mut want_b, 0, bs as usize, SEED_B);
    let (s, addr) = if backing == Backing::Malloc {
        (s, addr)
    } else {
        // The file, checked independently: every unit under the DEK, no plaintext anywhere.
        s.stop();
        let (cur, copies) = header_any(d, backing);
        let AnyHeader::Keyed(h) = &cur else {
            panic!("not encrypted: {cur:?}")
        };
        assert_eq!(h.rekey, RekeyState::None);
        assert_eq!(h.data_blocks, blocks, "the size hosts see changed");
        for c in &copies {
            assert!(
                matches!(c, AnyHeader::Keyed(k) if k.rekey == RekeyState::None && k.active == h.active)
            );
        }
        let dek = openssl_unwrap(d, &h.active.wrapped_dek.0, h.active.kek_id.as_str());
        let plain = python_decrypt(&area, blocks, Some(&dek), None);
        assert!(
            plain == want_b,
            "the file does not decrypt to the data under the DEK"
        );
        assert_no_plaintext(
            &fs::read(&img).unwrap(),
            bs,
            &[SEED_A, SEED_B],
            "the device",
        );
        if backing == Backing::Detached {
            assert_no_plaintext(
                &fs::read(d.join("vol.hdr")).unwrap(),
                bs,
                &[SEED_A, SEED_B],
                "the header file",
            );
        }
        let (s, addr) = start(&cfg);
        assert_eq!(data_state(&sock), "encrypted");
        check_all_blocks(&pf, addr, bs, SEED_B, SEED_A);
        (s, addr)
    };
    let at = addr.to_string();
    let pf = Perf {
        addr: &at,
        nqn: NQN,
        host: HOST,
        data_bytes: DATA_BYTES,
    };

    // Decrypt under verified I/O.
    let json3 = d.join("perf3.json");
    let p = pf.spawn(2, SEED_C, &json3);
    std::thread::sleep(Duration::from_millis(200));
    let st = rpc(
        &sock,
        "namespace.decrypt",
        json!({ "namespace": "vol", "rate_mib_s": 2 }),
    );
    assert_eq!(st["operation"], "decrypt", "{st}");
    if backing == Backing::Malloc {
        wait_pass(&sock, "vol", "finished");
        check_perf(p, &json3);
        check_all_blocks(&pf, addr, bs, SEED_C, SEED_B);
        assert_eq!(data_state(&sock), "plaintext");
        s.stop();
        return;
    }
    // Paused part way while perf keeps writing both sides of the watermark; then stopped.
    std::thread::sleep(Duration::from_millis(600));
    let st = rpc(&sock, "rekey.pause", json!({ "namespace": "vol" }));
    let w = st["watermark_blocks"].as_u64().unwrap();
    assert!(w > 0 && w < blocks, "paused at {st}");
    assert_eq!(data_state(&sock), "converting");
    check_perf(p, &json3);
    s.stop();
    // Half way: plaintext below the watermark, the DEK above.
    let (cur, _) = header_any(d, backing);
    let AnyHeader::Keyed(h) = &cur else {
        panic!("retired too early: {cur:?}")
    };
    let RekeyState::Convert(c) = &h.rekey else {
        panic!("no decrypt in the header: {:?}", h.rekey)
    };
    assert_eq!((c.direction, c.watermark_blocks), (Direction::Decrypt, w));
    let dek = openssl_unwrap(d, &h.active.wrapped_dek.0, h.active.kek_id.as_str());
    let plain = python_decrypt(&area, w, None, Some(&dek));
    let mut want_c = vec![0u8; DATA_BYTES as usize];
    fill_pattern(&mut want_c, 0, bs as usize, SEED_C);
    let unit = bs as usize;
    for lba in 0..blocks as usize {
        assert!(
            plain[lba * unit..(lba + 1) * unit] == want_c[lba * unit..(lba + 1) * unit],
            "unit {lba} (watermark {w}) is not what its side of the watermark says"
        );
    }
    // A restart resumes the decrypt by itself.
    let (s, addr) = start(&cfg);
    wait_pass(&sock, "vol", "finished");
    check_all_blocks(&pf, addr, bs, SEED_C, SEED_B);
    assert_eq!(data_state(&sock), "plaintext");
    s.stop();
    let (cur, copies) = header_any(d, backing);
    assert!(matches!(cur, AnyHeader::Plain(_)), "{cur:?}");
    for c in &copies {
        assert!(
            matches!(c, AnyHeader::Plain(_)),
            "a copy still holds a key: {c:?}"
        );
    }
    let raw = fs::read(&img).unwrap();
    let off = area_off as usize;
    assert!(
        raw[off..off + DATA_BYTES as usize] == want_c[..],
        "the device does not hold the plaintext at its data offset"
    );
}

#[test]
fn encrypt_and_decrypt_under_verified_io_file_4096() {
    case(Backing::File, 4096);
}

#[test]
fn encrypt_and_decrypt_under_verified_io_file_512() {
    case(Backing::File, 512);
}

#[test]
fn encrypt_and_decrypt_under_verified_io_malloc_4096() {
    case(Backing::Malloc, 4096);
}

#[test]
fn encrypt_and_decrypt_under_verified_io_malloc_512() {
    case(Backing::Malloc, 512);
}

#[test]
fn encrypt_and_decrypt_under_verified_io_detached_header_4096() {
    case(Backing::Detached, 4096);
}
