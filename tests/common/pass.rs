//! Helpers for the tests of conversion passes (deep rekey, encrypt, decrypt) on the real
//! `nvseal serve`: JSON-RPC calls, `nvseal perf --verify` runs and their reports, a read-back of
//! every block over NVMe/TCP against perf's pattern, and an independent check of a backing file
//! (DEKs unwrapped by the OpenSSL CLI, data decrypted by Python `cryptography`).

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nvseal::rpc::client::{call, ClientError};
use nvseal::tools::bdevperf::fill_pattern;
use serde_json::{json, Value};

/// perf's I/O size (its verify mode writes the namespace in order, each write read back).
pub const IO: u64 = 8192;

/// A JSON-RPC call that must succeed.
pub fn rpc(sock: &Path, method: &str, p: Value) -> Value {
    call(sock, method, Some(p)).unwrap_or_else(|e| panic!("{method}: {e}"))
}

/// A JSON-RPC call that must fail: its code and message.
pub fn rpc_err(sock: &Path, method: &str, p: Value) -> (i64, String) {
    match call(sock, method, Some(p)) {
        Err(ClientError::Rpc { code, message, .. }) => (code, message),
        other => panic!("{method}: expected an error, got {other:?}"),
    }
}

/// `rekey.status` of one namespace (the first pass listed).
pub fn pass_status(sock: &Path, ns: &str) -> Value {
    let v = rpc(sock, "rekey.status", json!({ "namespace": ns }));
    v["rekeys"][0].clone()
}

/// Waits until the namespace's pass is in `want` (panics on `failed` or after 120 s).
pub fn wait_pass(sock: &Path, ns: &str, want: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let s = pass_status(sock, ns);
        if s["state"] == want {
            return s;
        }
        assert!(s["state"] != "failed", "pass failed: {s}");
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no {want} within 120 s: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the key manager reports namespace `ns` online (the target has its bdev a moment
/// before the manager's state says so).
pub fn wait_online(sock: &Path, ns: &str) {
    let t0 = Instant::now();
    loop {
        let ks = rpc(sock, "keys.status", json!({}));
        let st = ks["namespaces"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["ns_id"] == ns))
            .map(|n| n["state"]["state"].clone());
        if st == Some(json!("online")) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{ns} not online within 60 s: {ks}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where perf runs: target address, subsystem, host NQN, namespace size.
pub struct Perf<'a> {
    pub addr: &'a str,
    pub nqn: &'a str,
    pub host: &'a str,
    pub data_bytes: u64,
}

impl Perf<'_> {
    /// `nvseal perf --verify` (8 KiB randrw, QD 8) for `passes` passes over the namespace (a
    /// count, not a time, so a slow machine still covers every block).
    pub fn spawn(&self, passes: u64, seed: u64, json_out: &Path) -> Child {
        Command::new(env!("CARGO_BIN_EXE_nvseal"))
            .args(["perf", "--traddr", self.addr, "--subnqn", self.nqn])
            .args(["--hostnqn", self.host, "--nsid", "1", "-w", "randrw"])
            .args(["-o", "8k", "-q", "8", "-n"])
            .arg((passes * self.data_bytes / IO).to_string())
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
}

/// Waits for a perf run: it must exit 0 with no mismatch, no I/O error and some I/O done.
pub fn check_perf(child: Child, json_out: &Path) {
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

/// Reads every block over NVMe/TCP and compares it with perf's pattern for `seed`; a mismatch
/// says whether the block holds `older` seed's data instead (a host write lost).
pub fn check_all_blocks(p: &Perf<'_>, addr: SocketAddr, bs: u32, seed: u64, older: u64) {
    let (_admin, mut q) = super::host::connect_io(addr, p.nqn, p.host, 8);
    let blocks = p.data_bytes / u64::from(bs);
    let per = (64 * 1024 / bs) as u64;
    let mut want = vec![0u8; (per * u64::from(bs)) as usize];
    let mut lba = 0;
    while lba < blocks {
        let n = per.min(blocks - lba);
        let got = super::host::read_blocks(&mut q, 1, lba, n as u32, bs);
        let w = &mut want[..(n * u64::from(bs)) as usize];
        fill_pattern(w, lba, bs as usize, seed);
        for k in 0..n as usize {
            let r = k * bs as usize..(k + 1) * bs as usize;
            if got[r.clone()] != w[r.clone()] {
                let mut other = vec![0u8; bs as usize];
                fill_pattern(&mut other, lba + k as u64, bs as usize, older);
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

/// Runs a command that must succeed; its standard output.
pub fn run(cmd: &mut Command) -> Vec<u8> {
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

/// The DEK in `wrapped`, unwrapped by the OpenSSL CLI (RFC 3394) with the KEK `kek_id` of the
/// local key file `dir/keys`; written to a new file in `dir`, whose path is returned.
pub fn openssl_unwrap(dir: &Path, wrapped: &[u8], kek_id: &str) -> PathBuf {
    let text = fs::read_to_string(dir.join("keys")).expect("key file");
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(kek_id))
        .expect("KEK line");
    let kek_hex = line.split_whitespace().nth(2).expect("KEK hex").to_owned();
    let n = fs::read_dir(dir).unwrap().count();
    let win = dir.join(format!("wrapped{n}.bin"));
    let out = dir.join(format!("dek{n}.bin"));
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

/// The data area of an image: `blocks` units of `unit` bytes from byte `offset`.
pub struct Area<'a> {
    pub img: &'a Path,
    pub unit: u32,
    pub offset: u64,
    pub blocks: u64,
}

/// Decrypts `area` with Python `cryptography`, AES-256-XTS with tweak = unit number (little
/// endian): units below `watermark` with the key in file `below`, the others with `above`;
/// `None` = that side is plaintext (copied as is).
pub fn python_decrypt(
    area: &Area<'_>,
    watermark: u64,
    below: Option<&Path>,
    above: Option<&Path>,
) -> Vec<u8> {
    let script = r#"
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
img, unit, off, n, wm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
below = open(sys.argv[6], 'rb').read() if sys.argv[6] != '-' else None
above = open(sys.argv[7], 'rb').read() if sys.argv[7] != '-' else None
f = open(img, 'rb')
f.seek(off)
data = f.read(n * unit)
out = bytearray()
for lba in range(n):
    tweak = lba.to_bytes(8, 'little') + bytes(8)
    key = below if lba < wm else above
    block = data[lba * unit:(lba + 1) * unit]
    if key is None:
        out += block
        continue
    d = Cipher(algorithms.AES(key), modes.XTS(tweak)).decryptor()
    out += d.update(block) + d.finalize()
sys.stdout.buffer.write(out)
"#;
    let key = |k: Option<&Path>| k.map_or_else(|| "-".into(), |p| p.as_os_str().to_owned());
    run(Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(area.img)
        .arg(area.unit.to_string())
        .arg(area.offset.to_string())
        .arg(area.blocks.to_string())
        .arg(watermark.to_string())
        .arg(key(below))
        .arg(key(above)))
}
