//! Deep rekey on the real `nvseal serve` while `nvseal perf --verify` writes and reads the
//! namespace over NVMe/TCP: on `uring` over a real file and on `malloc`, block sizes 512 and
//! 4096.
//!
//! Phase 1: perf runs with verification through a whole rate-limited pass that is paused and
//! resumed over RPC; perf must see no mismatch and no I/O error, and afterwards every block
//! reads back as perf's pattern. Phase 2 (file only): a second pass is paused half way and the
//! target stopped; the backing file is then checked with an independent XTS (Python
//! `cryptography`, DEKs unwrapped by the OpenSSL CLI with the KEK from the key file): the new
//! DEK below the header's watermark, the old one above it, and no plaintext block anywhere. A
//! restart resumes the pass by itself; after it every block still reads back right.
//!
//! Needs `openssl` and `python3` with `cryptography` (as tests/keys_openssl.rs).

mod common;

use common::pass::{
    check_all_blocks, check_perf, openssl_unwrap, python_decrypt, rpc, rpc_err, wait_pass, Area,
    Perf,
};
use common::serve::{addr_of, Serve};
use nvseal::keys::header::{CopyId, Header, RekeyState, METADATA_REGION_BYTES};
use nvseal::keys::store;
use nvseal::tools::bdevperf::fill_pattern;
use serde_json::json;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const NQN: &str = "nqn.2026-12.io.nvseal:deep";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:dee9dee9-0000-4000-8000-000000000001";
/// Size of the data area.
const DATA_BYTES: u64 = 4 << 20;
/// perf's pattern seed before the pass, and the one a second perf run writes during it (a host
/// write lost to the pass leaves the first seed's data behind, which the final check sees).
const SEED_A: u64 = 77;
const SEED_B: u64 = 78;

#[derive(Clone, Copy, PartialEq)]
enum Backing {
    File,
    Malloc,
}

fn config(d: &Path, backing: Backing, bs: u32) -> PathBuf {
    let base = match backing {
        Backing::File => format!(
            "  - name: disk\n    type: uring\n    path: {}\n    size_bytes: {}\n    block_size: {bs}\n",
            d.join("disk.img").display(),
            METADATA_REGION_BYTES + DATA_BYTES
        ),
        Backing::Malloc => format!(
            "  - name: disk\n    type: malloc\n    size_bytes: {}\n    block_size: {bs}\n",
            METADATA_REGION_BYTES + DATA_BYTES
        ),
    };
    let cfg = d.join("deep.yaml");
    fs::write(
        &cfg,
        format!(
            "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 20\n\
             keys:\n  local:\n    path: {keys}\n    create: true\n  audit_log: {audit}\n\
             rpc:\n  socket_path: {sock}\n\
             bdevs:\n{base}\
             \x20 - name: vol\n    type: encrypted\n    base: disk\n    provider: local\n    create: true\n\
             subsystems:\n  - nqn: {NQN}\n    serial: DEEP1\n    allowed_hosts: [\"{HOST}\"]\n\
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

fn header_of(img: &Path) -> Header {
    let mut f = fs::File::open(img).unwrap();
    store::read_header(&mut f).expect("header").header
}

fn case(backing: Backing, bs: u32) {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let d = dir.path();
    let cfg = config(d, backing, bs);
    let sock = d.join("rpc.sock");
    let mut s = Serve::start(&cfg);
    let addr = addr_of(&s.wait_for("NVMe/TCP listening"));
    s.wait_for("encrypted namespace online");
    s.wait_for("control socket listening");
    let at = addr.to_string();
    let pf = Perf {
        addr: &at,
        nqn: NQN,
        host: HOST,
        data_bytes: DATA_BYTES,
    };

    // Bad requests first: nothing starts.
    let (code, msg) = rpc_err(
        &sock,
        "rekey.deep",
        json!({ "namespace": "vol", "rate_mib_s": 0 }),
    );
    assert_eq!(code, -32602, "{msg}");
    let (code, _) = rpc_err(&sock, "rekey.deep", json!({ "namespace": "nope" }));
    assert_eq!(code, -32002);
    let (code, _) = rpc_err(&sock, "rekey.pause", json!({ "namespace": "vol" }));
    assert_eq!(code, -32602);

    // Phase 1: verified workloads across a whole pass, paused and resumed; the second perf
    // run rewrites every block with other data while the pass is still going.
    let json1 = d.join("perf1.json");
    let p = pf.spawn(1, SEED_A, &json1);
    std::thread::sleep(Duration::from_millis(300));
    let st = rpc(
        &sock,
        "rekey.deep",
        json!({ "namespace": "vol", "rate_mib_s": 2 }),
    );
    assert_eq!(st["state"], "running", "{st}");
    let (code, msg) = rpc_err(&sock, "rekey.deep", json!({ "namespace": "vol" }));
    assert_eq!(code, -32003, "a second deep rekey while one runs: {msg}");
    std::thread::sleep(Duration::from_millis(600));
    let st = rpc(&sock, "rekey.pause", json!({ "namespace": "vol" }));
    assert_eq!(st["state"], "paused", "{st}");
    let w = st["watermark_blocks"].as_u64().unwrap();
    assert!(w > 0 && w < DATA_BYTES / u64::from(bs), "{st}");
    std::thread::sleep(Duration::from_millis(300));
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
    let ks = rpc(&sock, "keys.status", json!({}));
    assert_eq!(
        ks["namespaces"][0]["deep_rekey"]["state"], "finished",
        "{ks}"
    );

    // The progress display ends (exit 0) once nothing runs, with the final line.
    let out = Command::new(env!("CARGO_BIN_EXE_nvseal"))
        .args(["rpc", "-s"])
        .arg(&sock)
        .args(["rekey.status", "--watch", "--interval-s", "0.2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("vol") && text.contains("100.00%") && text.contains("finished"),
        "{text}"
    );
    if backing == Backing::Malloc {
        s.stop();
        return;
    }
    // Phase 2: a pass paused half way, the target stopped, the file checked independently.
    let img = d.join("disk.img");
    rpc(
        &sock,
        "rekey.deep",
        json!({ "namespace": "vol", "rate_mib_s": 2 }),
    );
    std::thread::sleep(Duration::from_millis(900));
    let st = rpc(&sock, "rekey.pause", json!({ "namespace": "vol" }));
    let w = st["watermark_blocks"].as_u64().unwrap();
    assert!(w > 0 && w < DATA_BYTES / u64::from(bs), "{st}");
    s.stop();
    let h = header_of(&img);
    let RekeyState::Deep(deep) = &h.rekey else {
        panic!("header has no deep rekey: {:?}", h.rekey);
    };
    assert_eq!(deep.watermark_blocks, w);
    let new_dek = openssl_unwrap(d, &deep.new.wrapped_dek.0, deep.new.kek_id.as_str());
    let old_dek = openssl_unwrap(d, &h.active.wrapped_dek.0, h.active.kek_id.as_str());
    let area = Area {
        img: &img,
        unit: bs,
        offset: METADATA_REGION_BYTES,
        blocks: DATA_BYTES / u64::from(bs),
    };
    let plain = python_decrypt(&area, w, Some(&new_dek), Some(&old_dek));
    let mut want = vec![0u8; DATA_BYTES as usize];
    fill_pattern(&mut want, 0, bs as usize, SEED_B);
    let unit = bs as usize;
    for lba in 0..(DATA_BYTES / u64::from(bs)) as usize {
        assert!(
            plain[lba * unit..(lba + 1) * unit] == want[lba * unit..(lba + 1) * unit],
            "unit {lba} (watermark {w}) does not decrypt to the data under the key its side names"
        );
    }
    // No plaintext block on the device.
    let raw = fs::read(&img).unwrap();
    for lba in [
        0usize,
        w as usize,
        (DATA_BYTES / u64::from(bs)) as usize - 1,
    ] {
        assert!(
            !common::leaks(&raw, &want[lba * unit..lba * unit + 64]),
            "plaintext of unit {lba} is on the device"
        );
    }
    // A restart resumes the pass by itself.
    let mut s = Serve::start(&cfg);
    let addr = addr_of(&s.wait_for("NVMe/TCP listening"));
    s.wait_for("encrypted namespace online");
    s.wait_for("control socket listening");
    let st = wait_pass(&sock, "vol", "finished");
    assert_eq!(st["watermark_blocks"], DATA_BYTES / u64::from(bs));
    check_all_blocks(&pf, addr, bs, SEED_B, SEED_A);
    s.stop();
    let h2 = header_of(&img);
    assert_eq!(h2.rekey, RekeyState::None);
    assert_eq!(h2.active.wrapped_dek, deep.new.wrapped_dek);
    let mut f = fs::File::open(&img).unwrap();
    let other = store::read_copy(&mut f, CopyId::B).unwrap();
    let a = store::read_copy(&mut f, CopyId::A).unwrap();
    assert_eq!(a.active, other.active, "both copies hold the new slot only");
}

#[test]
fn deep_rekey_under_verified_io_file_4096() {
    case(Backing::File, 4096);
}

#[test]
fn deep_rekey_under_verified_io_file_512() {
    case(Backing::File, 512);
}

#[test]
fn deep_rekey_under_verified_io_malloc_4096() {
    case(Backing::Malloc, 4096);
}

#[test]
fn deep_rekey_under_verified_io_malloc_512() {
    case(Backing::Malloc, 512);
}
