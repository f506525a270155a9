//! Interop with the real Linux NVMe/TCP initiator: `nvseal serve` on the host exports a
//! plaintext (malloc) and an encrypted (AES-256-XTS over a uring file, local key provider)
//! namespace; a Debian kernel booted under QEMU/TCG (scripts/qemu/) discovers, connects,
//! identifies, runs fio with crc32c verify on both namespaces and disconnects
//! (scripts/qemu/guest/interop.sh). The host side then checks that serve is still healthy, that
//! fio's data reads back through nvseal's own host, that the backing file of the encrypted
//! namespace holds no plaintext, and that serve stops cleanly.
//!
//! In the same boot, docs/on-disk-format.md §6 is checked with the real dm-crypt: two more
//! encrypted namespaces (512-byte and 4096-byte data units) get a random pattern written through
//! nvseal by the guest; their backing files are attached to the guest as read-only virtio disks,
//! and the guest opens each with the document's own `cryptsetup open --type plain` line (read
//! from the document by this test; the DEK unwrapped on the host with the document's `dd` +
//! `openssl` recipe) and compares the plaintext dm-crypt returns with the pattern.
//!
//! A second test, in its own boot, runs `nvme format -s 2`, `nvme sanitize -a 4` and
//! `nvme sanitize-log` from the guest (scripts/qemu/guest/erase.sh; docs/lifecycle.md §5).
//!
//! Needs root (the harness build uses apt, mknod, chroot). `NVSEAL_SKIP_QEMU=1` skips it, loudly;
//! anything else that keeps it from running is a failure.

mod common;

use common::host::read_blocks;
use common::qemu::harness_ready;

use common::serve::{addr_of, Serve};
use nvseal::keys::local::DEFAULT_KEK_ID;
use nvseal::nvme::connect;
use nvseal::nvmf::host::{HostConfig, HostQpair};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2026-11.io.nvseal:interop";
const SERIAL: &str = "NVSEALINTEROP01";
/// `nvmf.max_namespaces`: Identify Controller NN, the highest nsid the controller supports.
const MAX_NAMESPACES: u32 = 4;
const MODEL: &str = "nvseal-interop";
/// Both namespaces: 64 MiB of 4 KiB blocks (the encrypted one's file adds the 1 MiB header).
const NS_BYTES: u64 = 64 << 20;
const HEADER_BYTES: u64 = 1 << 20;
const BLOCK: u64 = 4096;
/// fio jobs run on each namespace, "bs:rw:offset:size": writes, then crc32c-verified reads.
/// The 4 KiB job starts at LBA 0, which the host reads back afterwards.
const FIO_JOBS: &str = "4k:randwrite:0:8M 64k:randwrite:8M:16M 512k:write:24M:24M";
/// Run in a second session with header and data digests; starts at LBA 12288 (48 MiB).
const FIO_JOBS_DIGEST: &str = "4k:randwrite:48M:4M 128k:write:52M:8M";
const DIGEST_LBA: u64 = (48 << 20) / BLOCK;
/// Also in the digest session: on both namespaces at once, the jobs on different guest CPUs.
const FIO_CONCURRENT: &str = "16k:randwrite:60M:4M";
/// Everything the jobs above write: [0, 64 MiB) of each namespace.
const WRITTEN_BYTES: usize = 64 << 20;
/// Guest run limit (boot + the whole script) for run-guest.sh.
const GUEST_TIMEOUT_S: u32 = 420;
/// The dm-crypt check of docs/on-disk-format.md §6: (nsid, data unit bytes) of the two encrypted
/// namespaces whose backing files the guest opens with `cryptsetup`.
const CRYPT_NS: [(u32, u64); 2] = [(3, 512), (4, 4096)];
/// Data bytes of each of those namespaces (behind the 1 MiB header), all written by the guest.
/// 3072 sectors: not 2048, the documented `--offset`, so a doc that mixed the two up fails.
const CRYPT_BYTES: u64 = 3 << 19;
/// The document whose `cryptsetup` lines the guest runs.
const ON_DISK_FORMAT_DOC: &str = "docs/on-disk-format.md";
/// Longest wait for every namespace to come online after serve starts (the encrypted ones
/// unlock on a control thread); a bound, not a timing assertion.
const ONLINE_WAIT: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn uuid_nqn() -> String {
    format!("nqn.2014-08.org.nvmexpress:uuid:{}", uuid::Uuid::new_v4())
}

fn rpc(sock: &Path, method: &str) -> serde_json::Value {
    nvseal::rpc::client::call(sock, method, Some(serde_json::json!({})))
        .unwrap_or_else(|e| panic!("{method}: {e}"))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The `cryptsetup open --type plain` commands in §6 of docs/on-disk-format.md, continuation
/// lines joined and blanks collapsed, as `(--sector-size, command)`: exactly one for 512 and one
/// for 4096. Each keeps the document's placeholders `<SECTORS>` and `/dev/DEVICE` (the guest
/// fills them in), reads the key from `dek.bin` in the working directory, and has only
/// characters that need no shell quoting, so the guest can split it into words as a shell would.
fn documented_cryptsetup_lines() -> Vec<(u64, String)> {
    let doc = std::fs::read_to_string(repo().join(ON_DISK_FORMAT_DOC)).unwrap();
    let start = doc
        .find("\n## 6.")
        .unwrap_or_else(|| panic!("{ON_DISK_FORMAT_DOC} has no section 6"));
    let sect = &doc[start + 1..];
    let sect = &sect[..sect[1..].find("\n## ").map_or(sect.len(), |e| e + 1)];
    let mut found: Vec<(u64, String)> = Vec::new();
    let mut in_sh = false;
    let mut lines = sect.lines();
    while let Some(l) = lines.next() {
        if l.starts_with("```") {
            in_sh = !in_sh && l.trim() == "```sh";
            continue;
        }
        if !in_sh || !l.starts_with("cryptsetup open --type plain") {
            continue;
        }
        let mut cmd = String::new();
        let mut cur = l;
        loop {
            let (part, more) = match cur.trim_end().strip_suffix('\\') {
                Some(p) => (p, true),
                None => (cur, false),
            };
            cmd.push_str(part);
            cmd.push(' ');
            if !more {
                break;
            }
            cur = lines
                .next()
                .expect("a cryptsetup line ends in a continuation");
        }
        let cmd = cmd.split_whitespace().collect::<Vec<_>>().join(" ");
        let words: Vec<&str> = cmd.split(' ').collect();
        let sector = words
            .iter()
            .position(|w| *w == "--sector-size")
            .and_then(|i| words.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no --sector-size N in the documented line {cmd:?}"));
        assert!(
            cmd.chars()
                .all(|c| c.is_ascii_alphanumeric() || " ./<>_-".contains(c)),
            "the documented line {cmd:?} has characters the guest would have to unquote"
        );
        for placeholder in ["<SECTORS>", "/dev/DEVICE"] {
            assert_eq!(
                words.iter().filter(|w| **w == placeholder).count(),
                1,
                "the documented line {cmd:?} must name {placeholder} once"
            );
        }
        assert!(
            cmd.contains(" --key-file dek.bin "),
            "the documented line {cmd:?} does not read the key from dek.bin"
        );
        assert!(
            found.iter().all(|(s, _)| *s != sector),
            "{ON_DISK_FORMAT_DOC} §6 has two cryptsetup lines for --sector-size {sector}"
        );
        found.push((sector, cmd));
    }
    found.sort();
    let sizes: Vec<u64> = found.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        sizes,
        [512, 4096],
        "{ON_DISK_FORMAT_DOC} §6 must give one cryptsetup line per data unit size: {found:?}"
    );
    found
}

/// The DEK of an nvseal volume, unwrapped as docs/on-disk-format.md §6 tells an operator to: the
/// wrapped DEK of header copy A taken out with `dd`, unwrapped with `openssl enc
/// -id-aes256-wrap` and the KEK hex from the local key file. Writes it to `out` (64 bytes).
fn unwrap_dek_as_documented(volume: &Path, key_file: &Path, out: &Path) {
    let keys = std::fs::read_to_string(key_file).unwrap();
    let kek_hex = keys
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.first() == Some(&DEFAULT_KEK_ID) && f.get(1) == Some(&"active"))
        .and_then(|f| f.get(2).map(|k| k.to_string()))
        .unwrap_or_else(|| panic!("no active {DEFAULT_KEK_ID:?} KEK in {}", key_file.display()));
    // Beside the volume, not beside `out` (the guest's payload needs only the DEK).
    let wrapped = volume.with_extension("wrapped");
    let run = |cmd: &mut Command| {
        let o = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is it installed?)"));
        assert!(
            o.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(Command::new("dd")
        .arg(format!("if={}", volume.display()))
        .arg(format!("of={}", wrapped.display()))
        .args([
            "iflag=skip_bytes,count_bytes",
            "skip=552",
            "count=72",
            "status=none",
        ]));
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
        .arg(&wrapped)
        .arg("-out")
        .arg(out));
    let len = std::fs::metadata(out).unwrap().len();
    assert_eq!(
        len,
        64,
        "the unwrapped DEK of {} is not 64 bytes",
        volume.display()
    );
}

#[test]
fn the_documented_cryptsetup_lines_are_there_for_both_data_unit_sizes() {
    // The guest run below needs QEMU; this part of it does not, so it runs everywhere.
    let lines = documented_cryptsetup_lines();
    assert!(lines[1].1.contains(" --iv-large-sectors "), "{lines:?}");
}

#[test]
fn linux_initiator_discovers_connects_and_verifies_fio_on_both_namespaces() {
    let t_start = Instant::now();
    if !harness_ready() {
        return;
    }
    let t_setup = t_start.elapsed();

    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let d = dir.path();
    let img = d.join("ns2.img");
    let crypt_img = |nsid: u32| d.join(format!("ns{nsid}.img"));
    let cfg = d.join("interop.yaml");
    let sock = d.join("rpc.sock");
    let guest_nqn = uuid_nqn();
    let denied_nqn = uuid_nqn();
    let check_nqn = uuid_nqn();
    // fio fills every block with this string (after its verify header); it must never reach the
    // encrypted namespace's file. Unique per run, so stale data cannot satisfy the checks.
    let pattern = format!("nvseal{}", &uuid::Uuid::new_v4().simple().to_string()[..18]);
    std::fs::write(
        &cfg,
        format!(
            "reactor:\n  cores: 2\n  pin: false\n  idle_backoff_us: 50\n\
             nvmf:\n  max_namespaces: {MAX_NAMESPACES}\n\
             keys:\n  local:\n    path: {keys}\n    create: true\n  audit_log: {audit}\n\
             rpc:\n  socket_path: {sock}\n\
             bdevs:\n  - name: mem0\n    type: malloc\n    size_bytes: {ns}\n    block_size: 4096\n\
             \x20 - name: file1\n    type: uring\n    path: {img}\n    size_bytes: {file}\n\
             \x20 - name: vol1\n    type: encrypted\n    base: file1\n    provider: local\n    create: true\n\
             {crypt_bdevs}\
             subsystems:\n  - nqn: {NQN}\n    serial: {SERIAL}\n    model: {MODEL}\n\
             \x20   allowed_hosts: [\"{guest_nqn}\", \"{check_nqn}\"]\n\
             \x20   namespaces:\n      - nsid: 1\n        bdev: mem0\n      - nsid: 2\n        bdev: vol1\n        encrypted: true\n\
             {crypt_namespaces}\
             \x20   listen:\n      - addr: 127.0.0.1\n        port: 0\n",
            crypt_bdevs = CRYPT_NS
                .iter()
                .map(|(n, bs)| format!(
                    "  - name: file{n}\n    type: uring\n    path: {img}\n    block_size: {bs}\n    size_bytes: {size}\n\
                     \x20 - name: vol{n}\n    type: encrypted\n    base: file{n}\n    provider: local\n    create: true\n",
                    img = crypt_img(*n).display(),
                    size = CRYPT_BYTES + HEADER_BYTES,
                ))
                .collect::<String>(),
            crypt_namespaces = CRYPT_NS
                .iter()
                .map(|(n, _)| format!("      - nsid: {n}\n        bdev: vol{n}\n        encrypted: true\n"))
                .collect::<String>(),
            keys = d.join("keys").display(),
            audit = d.join("audit.jsonl").display(),
            sock = sock.display(),
            img = img.display(),
            ns = NS_BYTES,
            file = NS_BYTES + HEADER_BYTES,
        ),
    )
    .unwrap();

    let mut s = Serve::start_with_log(&cfg, "info,nvseal::nvmf::conn=debug");
    let addr = addr_of(&s.wait_for("NVMe/TCP listening"));
    s.wait_for("encrypted namespace online");
    s.wait_for("nvseal serving");
    // All three encrypted namespaces unlock on their own; the guest must find all four.
    let t_online = Instant::now();
    loop {
        let subs = rpc(&sock, "subsystems.list");
        let online = subs["subsystems"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["nqn"] == NQN))
            .and_then(|sub| sub["namespaces"].as_array())
            .map_or(0, |ns| ns.iter().filter(|n| n["online"] == true).count());
        if online == 2 + CRYPT_NS.len() {
            break;
        }
        assert!(
            t_online.elapsed() < ONLINE_WAIT,
            "not every namespace came online: {subs}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    s.assert_running("before the guest run");

    // The dm-crypt check: per namespace the DEK (unwrapped here as the document says) and a
    // random pattern the guest writes through nvseal, in /payload/ns<nsid>/ of the guest; the
    // backing files as read-only virtio disks; the document's cryptsetup lines as parameters.
    let payload = d.join("payload");
    let mut crypt_ns = Vec::new();
    let mut disks = Vec::new();
    let mut patterns = Vec::new();
    for (nsid, bs) in CRYPT_NS {
        let dir = payload.join(format!("ns{nsid}"));
        std::fs::create_dir_all(&dir).unwrap();
        unwrap_dek_as_documented(&crypt_img(nsid), &d.join("keys"), &dir.join("dek.bin"));
        let mut pat = vec![0u8; CRYPT_BYTES as usize];
        std::fs::File::open("/dev/urandom")
            .unwrap()
            .read_exact(&mut pat)
            .unwrap();
        std::fs::write(dir.join("pattern.bin"), &pat).unwrap();
        patterns.push(pat);
        let serial = format!("nvseal-ns{nsid}");
        crypt_ns.push(format!("{nsid}:{bs}:{}:{serial}", CRYPT_BYTES / 512));
        disks.push(format!("{serial}={}", crypt_img(nsid).display()));
    }
    let crypt_lines = documented_cryptsetup_lines();
    let crypt_open = crypt_lines
        .iter()
        .map(|(sector, cmd)| format!("CRYPT_OPEN_{sector}='{cmd}' "))
        .collect::<String>();

    let blocks = NS_BYTES / BLOCK;
    let params = format!(
        "PORT={port} SUBNQN='{NQN}' SERIAL='{SERIAL}' NN={MAX_NAMESPACES} MODEL='{MODEL}' HOSTNQN='{guest_nqn}' \
         DENIED_HOSTNQN='{denied_nqn}' NS_BLOCKS='1:{blocks} 2:{blocks}' PATTERN='{pattern}' \
         FIO_JOBS='{FIO_JOBS}' FIO_JOBS_DIGEST='{FIO_JOBS_DIGEST}' \
         FIO_CONCURRENT='{FIO_CONCURRENT}' CRYPT_NS='{crypt_ns}' {crypt_open}\n",
        port = addr.port(),
        crypt_ns = crypt_ns.join(" "),
    );
    let guest_body = std::fs::read_to_string(repo().join("scripts/qemu/guest/interop.sh")).unwrap();
    let guest_script = d.join("guest.sh");
    std::fs::write(&guest_script, params + &guest_body).unwrap();

    let t_guest0 = Instant::now();
    let guest = Command::new("bash")
        .arg(repo().join("scripts/qemu/run-guest.sh"))
        .arg(&guest_script)
        .arg(GUEST_TIMEOUT_S.to_string())
        .env("NVSEAL_QEMU_LOG", d.join("console.log"))
        .env("NVSEAL_QEMU_ECHO", "0")
        .env("NVSEAL_QEMU_PAYLOAD", &payload)
        .env("NVSEAL_QEMU_DISKS", disks.join(" "))
        .output()
        .expect("cannot run scripts/qemu/run-guest.sh");
    let t_guest = t_guest0.elapsed();
    let console = std::fs::read_to_string(d.join("console.log")).unwrap_or_default();
    println!("---- guest console ----\n{console}\n---- end of guest console ----");
    s.drain();
    assert!(
        guest.status.code() == Some(0) && console.contains("INTEROP-PASS"),
        "guest interop script failed: run-guest.sh {} (124 timeout, 125 guest crashed, 126 \
         harness error)\nrun-guest.sh stderr:\n{}\nserve log:\n{}",
        guest.status,
        String::from_utf8_lossy(&guest.stderr),
        s.log.join("\n")
    );

    // serve is still up and healthy after the Linux host came and went.
    s.assert_running("after the guest run");
    let subs = rpc(&sock, "subsystems.list");
    let sub = subs["subsystems"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["nqn"] == NQN))
        .unwrap_or_else(|| panic!("{NQN} missing from subsystems.list: {subs}"));
    let expected = [(1u32, blocks), (2, blocks)]
        .into_iter()
        .chain(CRYPT_NS.iter().map(|(n, bs)| (*n, CRYPT_BYTES / bs)));
    for (i, (nsid, nblocks)) in expected.enumerate() {
        let ns = &sub["namespaces"][i];
        assert_eq!(ns["nsid"], nsid, "{subs}");
        assert_eq!(ns["online"], true, "{subs}");
        assert_eq!(ns["num_blocks"], nblocks, "{subs}");
        if nsid != 1 {
            assert_eq!(ns["key"]["state"]["state"], "online", "{subs}");
        }
    }

    // The target saw the guest's host NQN connect, and refused the denied one, saying why.
    s.drain();
    assert!(
        s.log
            .iter()
            .any(|l| l.contains("admin queue connected") && l.contains(&guest_nqn)),
        "no admin connect from {guest_nqn} in serve's log:\n{}",
        s.log.join("\n")
    );
    assert!(
        s.log.iter().any(|l| l.contains("Connect refused")
            && l.contains("host not in allowed_hosts")
            && l.contains(&denied_nqn)),
        "serve did not log refusing {denied_nqn}:\n{}",
        s.log.join("\n")
    );

    // The digest session really ran with both digests: its admin and I/O queue connections.
    let with_digests = s
        .log
        .iter()
        .filter(|l| {
            l.contains("ICReq accepted") && l.contains("Digests { header: true, data: true }")
        })
        .count();
    assert!(
        with_digests >= 2,
        "expected the admin and I/O queues of the second session to negotiate header and data \
         digests, found {with_digests} such connections:\n{}",
        s.log.join("\n")
    );

    // fio's data is there, in plaintext, through nvseal's own host: LBA 0.. of both namespaces
    // were written by the 4 KiB job, each block carrying fio's verify header and the pattern.
    let cfg_host = HostConfig {
        hostnqn: check_nqn.clone(),
        queue_depth: 16,
        ..Default::default()
    };
    let mut admin =
        HostQpair::connect(addr, NQN, 0, connect::CNTLID_DYNAMIC, cfg_host.clone()).unwrap();
    admin.enable().unwrap();
    let mut q = HostQpair::connect(addr, NQN, 1, admin.cntlid(), cfg_host).unwrap();
    for nsid in [1u32, 2] {
        for lba in [0, DIGEST_LBA] {
            let data = read_blocks(&mut q, nsid, lba, 4, BLOCK as u32);
            for (i, blk) in data.chunks(BLOCK as usize).enumerate() {
                assert!(
                    contains(blk, pattern.as_bytes()),
                    "nsid {nsid} lba {}: fio's pattern {pattern:?} is not in the block read back",
                    lba + i as u64
                );
            }
        }
    }
    drop(q);
    drop(admin);

    // The encrypted namespace's file: data arrived (not all zeroes) but never the plaintext.
    let raw = std::fs::read(&img).unwrap();
    let body = &raw[HEADER_BYTES as usize..];
    assert_eq!(body.len() as u64, NS_BYTES);
    let written = &body[..WRITTEN_BYTES];
    assert!(
        written
            .chunks(BLOCK as usize)
            .all(|b| b.iter().any(|&x| x != 0)),
        "a block fio wrote is all zeroes in the backing file"
    );
    assert!(
        !contains(body, pattern.as_bytes()),
        "fio's plaintext pattern reached the encrypted namespace's backing file"
    );
    // The cryptsetup namespaces: their files hold the guest's data, but not as plaintext (the
    // guest already saw dm-crypt turn it back into the pattern).
    for ((nsid, _), pat) in CRYPT_NS.iter().zip(&patterns) {
        let raw = std::fs::read(crypt_img(*nsid)).unwrap();
        let body = &raw[HEADER_BYTES as usize..];
        assert_eq!(body.len() as u64, CRYPT_BYTES);
        assert!(
            body != &pat[..] && !contains(body, &pat[..64]),
            "nsid {nsid}: plaintext on disk"
        );
    }

    let log = s.stop();
    println!(
        "---- serve log ----\n{}\n---- end of serve log ----",
        log.join("\n")
    );
    // Nothing went wrong on the target's side: the only warnings are the local key provider's
    // and the refusals of the denied host NQN the guest tried on purpose.
    let bad: Vec<&String> = log
        .iter()
        .filter(|l| {
            (l.contains(" WARN ") || l.contains(" ERROR "))
                && !l.contains("nvseal::keys::local")
                && !(l.contains("Connect refused") && l.contains(&denied_nqn))
        })
        .collect();
    assert!(bad.is_empty(), "serve logged warnings or errors: {bad:#?}");
    assert!(
        log.iter().any(|l| l.contains("NOT FOR PRODUCTION")),
        "local key provider warning missing"
    );
    eprintln!(
        "linux_initiator timings: harness setup {:.1} s, guest run {:.1} s, total {:.1} s",
        t_setup.as_secs_f64(),
        t_guest.as_secs_f64(),
        t_start.elapsed().as_secs_f64()
    );
}

/// The two header copies' wrapped DEKs of an encrypted namespace's backing file.
fn wrapped_deks(img: &Path) -> Vec<Vec<u8>> {
    use nvseal::keys::header::{decode, CopyId, HEADER_COPY_BYTES};
    let bytes = std::fs::read(img).unwrap();
    [CopyId::A, CopyId::B]
        .into_iter()
        .map(|c| {
            let off = c.offset_bytes() as usize;
            decode(&bytes[off..off + HEADER_COPY_BYTES], c)
                .unwrap_or_else(|e| panic!("{}: header copy {c:?}: {e}", img.display()))
                .active
                .wrapped_dek
                .as_bytes()
                .to_vec()
        })
        .collect()
}

/// Issue 14 §3 from the real Linux host (scripts/qemu/guest/erase.sh): nvme-cli reads the
/// Identify bits, `nvme format -s 2` of the encrypted namespace leaves the data written before
/// unreadable while new writes work and the plaintext namespace of the same subsystem keeps its
/// data, `nvme format -s 2` of the plaintext one and `nvme sanitize` of a subsystem with a
/// plaintext namespace are refused, and `nvme sanitize -a 4` + `nvme sanitize-log` on a subsystem
/// of encrypted namespaces erase it. Here: both header copies of both encrypted files hold a new
/// wrapped DEK afterwards, the erases are audited under the guest's host NQN, and the refusals
/// are logged with their reasons.
#[test]
fn linux_initiator_crypto_erases_with_format_and_sanitize() {
    if !harness_ready() {
        return;
    }
    const NQN_A: &str = "nqn.2026-12.io.nvseal:erase-a";
    const NQN_B: &str = "nqn.2026-12.io.nvseal:erase-b";
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let d = dir.path();
    let cfg = d.join("erase.yaml");
    let sock = d.join("rpc.sock");
    let img = |n: &str| d.join(format!("{n}.img"));
    let guest_nqn = uuid_nqn();
    std::fs::write(
        &cfg,
        format!(
            "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 50\n\
             keys:\n  local:\n    path: {keys}\n    create: true\n  audit_log: {audit}\n\
             rpc:\n  socket_path: {sock}\n\
             bdevs:\n\
             \x20 - {{name: plaina, type: malloc, size_bytes: 8388608, block_size: 4096}}\n\
             \x20 - {{name: filea, type: uring, path: {a}, size_bytes: 9437184}}\n\
             \x20 - {{name: vola, type: encrypted, base: filea, provider: local, create: true}}\n\
             \x20 - {{name: fileb, type: uring, path: {b}, size_bytes: 9437184}}\n\
             \x20 - {{name: volb, type: encrypted, base: fileb, provider: local, create: true}}\n\
             subsystems:\n\
             \x20 - nqn: {NQN_A}\n    serial: ERASEA\n    allowed_hosts: [\"{guest_nqn}\"]\n    namespaces:\n\
             \x20     - {{nsid: 1, bdev: plaina}}\n      - {{nsid: 2, bdev: vola, encrypted: true}}\n\
             \x20   listen:\n      - {{addr: 127.0.0.1, port: 0}}\n\
             \x20 - nqn: {NQN_B}\n    serial: ERASEB\n    allowed_hosts: [\"{guest_nqn}\"]\n    namespaces:\n\
             \x20     - {{nsid: 1, bdev: volb, encrypted: true}}\n\
             \x20   listen:\n      - {{addr: 127.0.0.1, port: 0}}\n",
            keys = d.join("keys").display(),
            audit = d.join("audit.jsonl").display(),
            sock = sock.display(),
            a = img("filea").display(),
            b = img("fileb").display(),
        ),
    )
    .unwrap();

    let mut s = Serve::start(&cfg);
    let addr = addr_of(&s.wait_for("NVMe/TCP listening"));
    s.wait_for("nvseal serving");
    let t_online = Instant::now();
    loop {
        let st = rpc(&sock, "keys.status");
        let online = st["namespaces"].as_array().map_or(0, |v| {
            v.iter().filter(|n| n["state"]["state"] == "online").count()
        });
        if online == 2 {
            break;
        }
        assert!(t_online.elapsed() < ONLINE_WAIT, "not online: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before_a = wrapped_deks(&img("filea"));
    let before_b = wrapped_deks(&img("fileb"));

    let params = format!(
        "PORT={port} HOSTNQN='{guest_nqn}' SUBNQN_A='{NQN_A}' SUBNQN_B='{NQN_B}'\n",
        port = addr.port()
    );
    let body = std::fs::read_to_string(repo().join("scripts/qemu/guest/erase.sh")).unwrap();
    let script = d.join("guest.sh");
    std::fs::write(&script, params + &body).unwrap();
    let guest = Command::new("bash")
        .arg(repo().join("scripts/qemu/run-guest.sh"))
        .arg(&script)
        .arg(GUEST_TIMEOUT_S.to_string())
        .env("NVSEAL_QEMU_LOG", d.join("console.log"))
        .env("NVSEAL_QEMU_ECHO", "0")
        .output()
        .expect("cannot run scripts/qemu/run-guest.sh");
    let console = std::fs::read_to_string(d.join("console.log")).unwrap_or_default();
    println!("---- guest console ----\n{console}\n---- end of guest console ----");
    s.drain();
    assert!(
        guest.status.code() == Some(0) && console.contains("ERASE-PASS"),
        "guest erase script failed: run-guest.sh {}\nstderr:\n{}\nserve log:\n{}",
        guest.status,
        String::from_utf8_lossy(&guest.stderr),
        s.log.join("\n")
    );
    s.assert_running("after the guest run");

    for (name, before) in [("filea", before_a), ("fileb", before_b)] {
        let after = wrapped_deks(&img(name));
        assert_eq!(after[0], after[1], "{name}: both copies hold the new DEK");
        for old in &before {
            assert!(
                !after.contains(old),
                "{name}: the old wrapped DEK is still there"
            );
        }
    }
    let audit = std::fs::read_to_string(d.join("audit.jsonl")).unwrap();
    for ns in ["vola", "volb"] {
        assert!(
            audit.lines().any(|l| l.contains("crypto-erase")
                && l.contains(&format!("\"{ns}\""))
                && l.contains(&guest_nqn)
                && l.contains("\"ok")),
            "no audited crypto erase of {ns} by {guest_nqn}:\n{audit}"
        );
    }
    let log = s.stop();
    for what in ["Format NVM refused", "Sanitize refused"] {
        assert!(
            log.iter()
                .any(|l| l.contains(what) && l.contains("plaintext")
                    || l.contains(what) && l.contains("every namespace")),
            "serve did not log {what:?} with its reason:\n{}",
            log.join("\n")
        );
    }
}
