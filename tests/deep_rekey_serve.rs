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

use common::serve::{addr_of, Serve};
use nvseal::keys::header::{CopyId, Header, RekeyState, METADATA_REGION_BYTES};
use nvseal::keys::store;
use nvseal::nvme::connect;
use nvseal::nvmf::host::{HostConfig, HostQpair};
use nvseal::rpc::client::{call, ClientError};
use nvseal::tools::bdevperf::fill_pattern;
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2026-12.io.nvseal:deep";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:dee9dee9-0000-4000-8000-000000000001";
/// Size of the data area.
const DATA_BYTES: u64 = 4 << 20;
/// perf's I/O size, and its I/Os per pass over the namespace (its verify mode writes the
/// namespace in order, each write read back and checked).
const IO: u64 = 8192;
const PASS_IOS: u64 = DATA_BYTES / IO;
/// perf's pattern seed before the pass, and the one a second perf run writes during it (a host
/// write lost to the pass leaves the first seed's data behind, which the final check sees).
const SEED_A: u64 = 77;
const SEED_B: u64 = 78;

#[derive(Clone, Copy, PartialEq)]
enum Backing {
    File,
    Malloc,
}

fn rpc(sock: &Path, method: &str, p: Value) -> Value {
    call(sock, method, Some(p)).unwrap_or_else(|e| panic!("{method}: {e}"))
}

fn rpc_err(sock: &Path, method: &str, p: Value) -> (i64, String) {
    match call(sock, method, Some(p)) {
        Err(ClientError::Rpc { code, message, .. }) => (code, message),
        other => panic!("{method}: expected an error, got {other:?}"),
    }
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

fn status(sock: &Path) -> Value {
    let v = rpc(sock, "rekey.status", json!({ "namespace": "vol" }));
    v["rekeys"][0].clone()
}

fn wait_state(sock: &Path, want: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let s = status(sock);
        if s["state"] == want {
            return s;
        }
        assert!(s["state"] != "failed", "deep rekey failed: {s}");
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no {want} within 120 s: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `nvseal perf --verify` for `passes` passes over the namespace (a count, not a time, so a
/// slow machine still covers every block).
fn perf(addr: &str, passes: u64, seed: u64, json_out: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_nvseal"))
        .args([
            "perf",
            "--traddr",
            addr,
            "--subnqn",
            NQN,
            "--hostnqn",
            HOST,
            "--nsid",
            "1",
            "-w",
            "randrw",
            "-o",
            "8k",
            "-q",
            "8",
            "-n",
        ])
        .arg((passes * PASS_IOS).to_string())
        .args(["--verify", "--no-pin", "--no-progress", "--seed"])
        .arg(seed.to_string())
        .arg("--json")
        .arg(json_out)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn check_perf(child: std::process::Child, json_out: &Path) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "perf --verify failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&fs::read(json_out).unwrap()).unwrap();
    for j in report["jobs"].as_array().expect("jobs") {
        assert_eq!(j["verify_mismatches"], 0, "{j}");
        assert_eq!(j["io_errors"], 0, "{j}");
        assert!(j["total"]["total_ios"].as_u64().unwrap() > 0, "{j}");
        eprintln!(
            "perf {}: {} I/Os",
            json_out.display(),
            j["total"]["total_ios"]
        );
    }
}

/// Reads every block over NVMe/TCP and compares it with perf's pattern.
fn check_all_blocks(addr: std::net::SocketAddr, bs: u32, seed: u64) {
    let cfg = HostConfig {
        hostnqn: HOST.into(),
        queue_depth: 8,
        timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let mut admin = HostQpair::connect(addr, NQN, 0, connect::CNTLID_DYNAMIC, cfg.clone()).unwrap();
    admin.enable().unwrap();
    let mut q = HostQpair::connect(addr, NQN, 1, admin.cntlid(), cfg).unwrap();
    let blocks = DATA_BYTES / u64::from(bs);
    let per = (64 * 1024 / bs) as u64;
    let mut want = vec![0u8; (per * u64::from(bs)) as usize];
    let mut lba = 0;
    while lba < blocks {
        let n = per.min(blocks - lba);
        let got = common::host::read_blocks(&mut q, 1, lba, n as u32, bs);
        let w = &mut want[..(n * u64::from(bs)) as usize];
        fill_pattern(w, lba, bs as usize, seed);
        for k in 0..n as usize {
            let r = k * bs as usize..(k + 1) * bs as usize;
            if got[r.clone()] != w[r.clone()] {
                let mut other = vec![0u8; bs as usize];
                fill_pattern(&mut other, lba + k as u64, bs as usize, SEED_A);
                let bad: Vec<u64> = (k..n as usize)
                    .filter(|&j| {
                        let rj = j * bs as usize..(j + 1) * bs as usize;
                        got[rj.clone()] != w[rj]
                    })
                    .map(|j| lba + j as u64)
                    .collect();
                panic!(
                    "block {} does not hold what perf acknowledged (holds the older seed's data: {}; {} bad in this read: {:?}...)",
                    lba + k as u64,
                    got[r] == other[..],
                    bad.len(),
                    &bad[..bad.len().min(8)]
                );
            }
        }
        lba += n;
    }
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is it installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The DEK in `wrapped`, unwrapped by the OpenSSL CLI (RFC 3394) with the local key file's KEK.
fn openssl_unwrap(d: &Path, wrapped: &[u8], kek_id: &str) -> PathBuf {
    let text = fs::read_to_string(d.join("keys")).expect("key file");
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(kek_id))
        .expect("KEK line");
    let kek_hex = line.split_whitespace().nth(2).expect("KEK hex").to_owned();
    let n = fs::read_dir(d).unwrap().count();
    let win = d.join(format!("wrapped{n}.bin"));
    let out = d.join(format!("dek{n}.bin"));
    fs::write(&win, wrapped).unwrap();
    run(Command::new("openssl")
        .args([
            "enc",
            "-d",
            "-id-aes256-wrap",
            "-iv",
            "A6A6A6A6A6A6A6A6",
            "-K",
        ])
        .arg(&kek_hex)
        .arg("-in")
        .arg(&win)
        .arg("-out")
        .arg(&out));
    out
}

/// Decrypts the data area of the image with Python `cryptography`: units below `watermark`
/// with `below`, the others with `above` (tweak = unit number, little endian).
fn python_decrypt(img: &Path, bs: u32, watermark: u64, below: &Path, above: &Path) -> Vec<u8> {
    let script = r#"
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
img, unit, off, n, wm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
below = open(sys.argv[6], 'rb').read()
above = open(sys.argv[7], 'rb').read()
f = open(img, 'rb')
f.seek(off)
data = f.read(n * unit)
out = bytearray()
for lba in range(n):
    tweak = lba.to_bytes(8, 'little') + bytes(8)
    key = below if lba < wm else above
    d = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()
    out += d.update(data[lba * unit:(lba + 1) * unit]) + d.finalize()
sys.stdout.buffer.write(out)
"#;
    run(Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(img)
        .arg(bs.to_string())
        .arg(METADATA_REGION_BYTES.to_string())
        .arg((DATA_BYTES / u64::from(bs)).to_string())
        .arg(watermark.to_string())
        .arg(below)
        .arg(above))
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
    let p = perf(&addr.to_string(), 1, SEED_A, &json1);
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
    let p = perf(&addr.to_string(), 2, SEED_B, &json2);
    let st = wait_state(&sock, "finished");
    assert_eq!(st["percent"], 100.0, "{st}");
    check_perf(p, &json2);
    check_all_blocks(addr, bs, SEED_B);
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
    let plain = python_decrypt(&img, bs, w, &new_dek, &old_dek);
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
    let st = wait_state(&sock, "finished");
    assert_eq!(st["watermark_blocks"], DATA_BYTES / u64::from(bs));
    check_all_blocks(addr, bs, SEED_B);
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
