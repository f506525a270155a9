//! `nvseal perf` against a target that is not nvseal: the Linux kernel's own NVMe/TCP target
//! (nvmet-tcp over two `brd` RAM disks) in the QEMU/TCG guest of scripts/qemu/, reached from the
//! host through a QEMU port forward on 127.0.0.1 (scripts/qemu/guest/nvmet-target.sh).
//!
//! Checks what a perf lab relies on when it points the tool at Linux: Connect, Identify and the
//! controller facts (model "Linux", the configured serial, digests on request), an `--ab` run on
//! two namespaces with verification and both digests, a timed read run, refusals reported with
//! the target's reason (host not allowed; unknown subsystem, which carries IPO/IATTR), and —
//! independently of perf's own read-back check — that the bytes perf wrote are the bytes on
//! Linux's RAM disks (SHA-256 computed in the guest, compared with the pattern here).
//!
//! Needs root (the harness build uses apt, mknod, chroot). `NVSEAL_SKIP_QEMU=1` skips it, loudly.

mod common;

use common::qemu::{harness_ready, repo, Done, Guest};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::{Command, Output, Stdio};

const SUBNQN: &str = "nqn.2026-11.io.nvseal:linux-nvmet";
const SERIAL: &str = "LNXNVMETPERF01";
/// Port nvmet listens on inside the guest.
const GUEST_PORT: u16 = 4420;
/// Each RAM disk, MiB.
const NS_MB: u32 = 64;
/// How long the guest serves before it gives up on the host.
const GUEST_WAIT_S: u32 = 480;
/// run-guest.sh limit (boot + serving + hashing).
const GUEST_TIMEOUT_S: u32 = 560;
/// The runs whose data the guest hashes: (nsid, I/O size, I/Os, seed).
const HASHED: [(u32, usize, usize, u64); 2] = [(1, 4096, 256, 11), (2, 128 << 10, 16, 22)];

fn perf(fwd: u16, args: &[&str]) -> Output {
    let addr = format!("127.0.0.1:{fwd}");
    let mut all = vec!["perf", "--traddr", &addr, "--no-pin", "--no-progress"];
    all.extend_from_slice(args);
    println!("+ nvseal {}", all.join(" "));
    let out = Command::new(env!("CARGO_BIN_EXE_nvseal"))
        .args(&all)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run nvseal perf");
    println!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn perf_ok(fwd: u16, args: &[&str], json: &Path) -> serde_json::Value {
    let mut a = args.to_vec();
    let j = json.display().to_string();
    a.extend_from_slice(&["--json", &j]);
    let out = perf(fwd, &a);
    assert!(out.status.success(), "nvseal perf {args:?} failed");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    for job in v["jobs"].as_array().expect("jobs") {
        assert_eq!(job["io_errors"], 0, "I/O errors in {job}");
        assert_eq!(job["verify_mismatches"], 0, "verify mismatches in {job}");
    }
    v
}

fn perf_refused(fwd: u16, args: &[&str], want: &[&str]) {
    let out = perf(fwd, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nvseal perf {args:?} should fail");
    for w in want {
        assert!(err.contains(w), "error of {args:?} should say {w:?}: {err}");
    }
}

#[test]
fn perf_drives_the_linux_kernel_target_with_verify_digests_and_ab() {
    if !harness_ready() {
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let d = dir.path();
    let log = d.join("console.log");
    let fwd = common::kmip::free_port();
    let done = Done::start();
    let hostnqn = format!("nqn.2014-08.org.nvmexpress:uuid:{}", uuid::Uuid::new_v4());
    let hash_blocks: Vec<String> = HASHED
        .iter()
        .map(|&(nsid, bs, n, _)| format!("{nsid}:{}", bs * n / 4096))
        .collect();
    let params = format!(
        "GUEST_PORT={GUEST_PORT} SUBNQN='{SUBNQN}' SERIAL='{SERIAL}' HOSTNQN='{hostnqn}' \
         NS_MB={NS_MB} DONE_URL='{}' WAIT_S={GUEST_WAIT_S} \
         HASH_BLOCKS='{}'\n",
        done.url(),
        hash_blocks.join(" ")
    );
    let body = std::fs::read_to_string(repo().join("scripts/qemu/guest/nvmet-target.sh")).unwrap();
    let script = d.join("guest.sh");
    std::fs::write(&script, params + &body).unwrap();

    let mut guest = Guest::start(
        &script,
        GUEST_TIMEOUT_S,
        log,
        &[("NVSEAL_QEMU_HOSTFWD", format!("{fwd}:{GUEST_PORT}"))],
    );
    guest.wait_for("NVMET-READY", "NVMET-FAIL", 300);
    println!("nvmet up after {:.1} s", guest.elapsed_s());

    // Refusals carry the target's reason.
    let other_host = format!("nqn.2014-08.org.nvmexpress:uuid:{}", uuid::Uuid::new_v4());
    perf_refused(
        fwd,
        &["--subnqn", SUBNQN, "--hostnqn", &other_host, "-t", "1"],
        &["is not allowed on subsystem", "Connect Invalid Host"],
    );
    perf_refused(
        fwd,
        &[
            "--subnqn",
            "nqn.2026-11.io.nvseal:absent",
            "--hostnqn",
            &hostnqn,
            "-t",
            "1",
        ],
        &[
            "no subsystem nqn.2026-11.io.nvseal:absent",
            "Connect Invalid Parameters",
        ],
    );

    // --ab on both namespaces, every I/O written then read back and compared, with header and
    // data digests (CRC32C) on every PDU.
    let ab = perf_ok(
        fwd,
        &[
            "--subnqn",
            SUBNQN,
            "--hostnqn",
            &hostnqn,
            "--ab",
            "--nsid-a",
            "1",
            "--nsid-b",
            "2",
            "-w",
            "randrw",
            "-M",
            "50",
            "-o",
            "16k",
            "-q",
            "8",
            "-n",
            "150",
            "--verify",
            "-H",
            "-I",
        ],
        &d.join("ab.json"),
    );
    let c = &ab["controller"];
    assert_eq!(c["model"], "Linux", "{c}");
    assert_eq!(c["serial"], SERIAL, "{c}");
    assert_eq!(
        (c["header_digest"].as_bool(), c["data_digest"].as_bool()),
        (Some(true), Some(true))
    );
    let jobs = ab["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    for (job, nsid) in jobs.iter().zip([1, 2]) {
        assert_eq!(job["nsid"], nsid);
        assert_eq!(
            job["num_blocks"],
            u64::from(NS_MB) << 20 >> 9,
            "brd: 512-byte blocks"
        );
        assert_eq!(job["write"]["total_ios"], 150, "{job}");
        assert_eq!(job["read"]["total_ios"], 150, "{job}");
    }
    assert!(ab["ratio_b_over_a"]["iops"].as_f64().unwrap() > 0.0);

    // A timed sequential read run of large I/Os.
    let rd = perf_ok(
        fwd,
        &[
            "--subnqn",
            SUBNQN,
            "--hostnqn",
            &hostnqn,
            "-w",
            "read",
            "-o",
            "128k",
            "-q",
            "4",
            "-t",
            "1",
        ],
        &d.join("read.json"),
    );
    assert!(
        rd["jobs"][0]["read"]["total_ios"].as_u64().unwrap() > 0,
        "{rd}"
    );

    // Several I/O queues on one controller (Set Features Number of Queues, one Connect per qid)
    // with 1 MiB verified I/Os: Linux reports no MDTS, so nothing is split.
    let mq = perf_ok(
        fwd,
        &[
            "--subnqn",
            SUBNQN,
            "--hostnqn",
            &hostnqn,
            "--queues-per-core",
            "3",
            "-w",
            "randrw",
            "-o",
            "1m",
            "-q",
            "2",
            "-n",
            "4",
            "--verify",
        ],
        &d.join("multiqueue.json"),
    );
    assert_eq!(mq["global_options"]["numjobs"], 3, "{mq}");
    assert_eq!(mq["global_options"]["commands_per_io"], 1, "{mq}");
    assert!(
        mq["controller"]["io_queues_granted"].as_u64().unwrap() >= 3,
        "{mq}"
    );
    assert_eq!(
        mq["controller"]["mdts_bytes"],
        serde_json::Value::Null,
        "{mq}"
    );
    // 4 verified I/Os per queue, 3 queues.
    assert_eq!(mq["jobs"][0]["write"]["total_ios"], 12, "{mq}");
    assert_eq!(mq["jobs"][0]["read"]["total_ios"], 12, "{mq}");

    // Last writes: the guest hashes what they left on the RAM disks.
    for &(nsid, bs, n, seed) in &HASHED {
        let (ns, o, count, s) = (
            nsid.to_string(),
            bs.to_string(),
            n.to_string(),
            seed.to_string(),
        );
        let v = perf_ok(
            fwd,
            &[
                "--subnqn",
                SUBNQN,
                "--hostnqn",
                &hostnqn,
                "--nsid",
                &ns,
                "-w",
                "write",
                "-o",
                &o,
                "-q",
                "4",
                "-n",
                &count,
                "--verify",
                "--seed",
                &s,
            ],
            &d.join(format!("write-{nsid}.json")),
        );
        assert_eq!(v["jobs"][0]["write"]["total_ios"], n);
    }

    done.set();
    let t0 = std::time::Instant::now();
    let (status, c, err) = guest.finish();
    assert!(
        status.success() && c.contains("NVMET-DONE"),
        "guest failed: run-guest.sh {status}\n{err}"
    );
    for &(nsid, bs, n, seed) in &HASHED {
        let mut want = vec![0u8; bs * n];
        // Sequential writes from LBA 0 in 512-byte blocks: one continuous pattern.
        nvseal::tools::bdevperf::fill_pattern(&mut want, 0, 512, seed);
        let want: String = Sha256::digest(&want)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let line = format!("NVMET-SHA256 nsid={nsid} blocks={} {want}", bs * n / 4096);
        assert!(
            c.lines().any(|l| l.trim_end() == line),
            "nsid {nsid}: the Linux target's RAM disk does not hold what perf wrote (want {line:?})"
        );
    }
    println!("guest shut down in {:.1} s", t0.elapsed().as_secs_f64());
}
