//! End to end on the real binary: `nvseal serve` exports a plaintext and an encrypted namespace
//! (local key provider, header on a real file) over NVMe/TCP on loopback; nvseal's own NVMe/TCP
//! host writes and reads both; the file holds ciphertext; the control socket shows the state and
//! performs a shallow rekey (audited); after a restart the data reads back through the new KEK.

mod common;

use common::serve::{addr_of, Serve};
use nvseal::nvme::connect;
use nvseal::nvmf::host::{HostConfig, HostQpair};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2026-11.io.nvseal:e2e";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:e2e-test-host";

fn host_cfg() -> HostConfig {
    HostConfig {
        hostnqn: HOST.into(),
        queue_depth: 16,
        ..Default::default()
    }
}

fn pattern(nsid: u32, lba: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            ((i as u64).wrapping_mul(31) ^ lba.wrapping_mul(131) ^ (u64::from(nsid) * 7)) as u8
        })
        .collect()
}

/// Runs one I/O to completion; returns (status ok, data).
fn io(
    q: &mut HostQpair,
    write: Option<&[u8]>,
    nsid: u32,
    lba: u64,
    nlb: u32,
    bs: u32,
) -> (bool, Vec<u8>) {
    match write {
        Some(d) => q.write(nsid, lba, d, bs, 1).unwrap(),
        None => q.read(nsid, lba, nlb, bs, 1).unwrap(),
    };
    let mut out = None;
    let t0 = Instant::now();
    while out.is_none() {
        q.poll(&mut |c| out = Some((c.cqe.status().is_success(), c.data.to_vec())))
            .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(20), "I/O timed out");
    }
    out.unwrap()
}

fn rpc(sock: &Path, method: &str, params: serde_json::Value) -> serde_json::Value {
    nvseal::rpc::client::call(sock, method, Some(params))
        .unwrap_or_else(|e| panic!("{method}: {e}"))
}

#[test]
fn serve_exports_plain_and_encrypted_namespaces_over_nvme_tcp() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let d = dir.path();
    let img = d.join("disk1.img");
    let cfg = d.join("e2e.yaml");
    let sock = d.join("rpc.sock");
    std::fs::write(
        &cfg,
        format!(
            "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 20\n\
             keys:\n  local:\n    path: {keys}\n    create: true\n  audit_log: {audit}\n\
             rpc:\n  socket_path: {sock}\n\
             bdevs:\n  - name: mem0\n    type: malloc\n    size_bytes: 16777216\n\
             \x20 - name: disk1\n    type: uring\n    path: {img}\n    size_bytes: 17825792\n\
             \x20 - name: vol1\n    type: encrypted\n    base: disk1\n    provider: local\n    create: true\n\
             subsystems:\n  - nqn: {NQN}\n    serial: E2E1\n    allowed_hosts: [\"{HOST}\"]\n    namespaces:\n      - nsid: 1\n        bdev: mem0\n      - nsid: 2\n        bdev: vol1\n        encrypted: true\n    listen:\n      - addr: 127.0.0.1\n        port: 0\n",
            keys = d.join("keys").display(),
            audit = d.join("audit.jsonl").display(),
            sock = sock.display(),
            img = img.display(),
        ),
    )
    .unwrap();

    let mut s = Serve::start(&cfg);
    let addr = addr_of(&s.wait_for("NVMe/TCP listening"));
    s.wait_for("encrypted namespace online");

    let mut admin = HostQpair::connect(addr, NQN, 0, connect::CNTLID_DYNAMIC, host_cfg()).unwrap();
    admin.enable().unwrap();
    let (blocks2, bs2) = admin.namespace_geometry(2).unwrap();
    assert_eq!(bs2, 4096);
    assert_eq!(
        blocks2,
        16 * 1024 * 1024 / 4096,
        "the 1 MiB header is not part of the namespace"
    );
    let mut q = HostQpair::connect(addr, NQN, 1, admin.cntlid(), host_cfg()).unwrap();
    for nsid in [1u32, 2] {
        for (lba, nlb) in [(0u64, 1u32), (7, 4), (blocks2 - 2, 2)] {
            let data = pattern(nsid, lba, nlb as usize * 4096);
            assert!(io(&mut q, Some(&data), nsid, lba, nlb, 4096).0);
            let (ok, back) = io(&mut q, None, nsid, lba, nlb, 4096);
            assert!(
                ok && back == data,
                "nsid {nsid} lba {lba}: read back differs"
            );
        }
    }
    // Past the end: an NVMe error status, connection still fine.
    assert!(!io(&mut q, None, 2, blocks2, 1, 4096).0);
    assert!(io(&mut q, None, 2, 0, 1, 4096).0);

    // The backing file holds ciphertext, after the 1 MiB header.
    let raw = std::fs::read(&img).unwrap();
    let at = |lba: u64| &raw[(1 << 20) + lba as usize * 4096..][..4096];
    assert_ne!(
        at(7),
        &pattern(2, 7, 4096)[..],
        "plaintext reached the disk"
    );
    assert!(at(7).iter().any(|&b| b != 0));

    // Control socket: state, then a shallow rekey onto a new local KEK.
    let subs = rpc(&sock, "subsystems.list", serde_json::json!({}));
    let ns2 = &subs["subsystems"][1]["namespaces"][1];
    assert_eq!(ns2["online"], true, "{subs}");
    assert_eq!(ns2["key"]["state"]["state"], "online", "{subs}");
    let old_kek = ns2["key"]["kek_id"].clone();
    let rep = rpc(
        &sock,
        "rekey.shallow",
        serde_json::json!({ "provider": "local" }),
    );
    assert!(rep.to_string().contains("rekeyed"), "{rep}");
    let st = rpc(&sock, "keys.status", serde_json::json!({}));
    let new_kek = st["namespaces"][0]["kek_id"].clone();
    assert_ne!(old_kek, new_kek, "{st}");
    // I/O still flows after the rekey.
    let (ok, back) = io(&mut q, None, 2, 7, 4, 4096);
    assert!(ok && back == pattern(2, 7, 4 * 4096));
    // The CLI client and a support bundle from the running target.
    let out = Command::new(env!("CARGO_BIN_EXE_nvseal"))
        .args(["rpc", "--socket", sock.to_str().unwrap(), "keys.status"])
        .output()
        .unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("online"));
    let bundle = d.join("support.age");
    let out = Command::new(env!("CARGO_BIN_EXE_nvseal"))
        .args([
            "bundle",
            "--out",
            bundle.to_str().unwrap(),
            "-c",
            cfg.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
        ])
        .env("NVSEAL_BUNDLE_PASSWORD", "correct horse battery")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw_bundle = std::fs::read(&bundle).unwrap();
    assert!(
        !raw_bundle.windows(7).any(|w| w == b"correct"),
        "the password must not be in the bundle"
    );
    let files = nvseal::bundle::read_bundle(
        &bundle,
        &nvseal::bundle::SecretString::from("correct horse battery".to_string()),
    )
    .unwrap();
    let all: String = files
        .iter()
        .map(|(n, b)| format!("{n}\n{}\n", String::from_utf8_lossy(b)))
        .collect();
    assert!(
        all.contains("keys.status") && all.contains(NQN),
        "bundle lacks state: {all}"
    );
    drop(q);
    drop(admin);
    let log = s.stop();
    let audit = std::fs::read_to_string(d.join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("rekey") && audit.contains("uid=0"),
        "{audit}"
    );
    assert!(log.iter().any(|l| l.contains("NOT FOR PRODUCTION")));

    // Restart: the DEK comes back through the new KEK; data persists.
    let mut s = Serve::start(&cfg);
    let addr = addr_of(&s.wait_for("NVMe/TCP listening"));
    s.wait_for("encrypted namespace online");
    let mut admin = HostQpair::connect(addr, NQN, 0, connect::CNTLID_DYNAMIC, host_cfg()).unwrap();
    admin.enable().unwrap();
    let mut q = HostQpair::connect(addr, NQN, 1, admin.cntlid(), host_cfg()).unwrap();
    let (ok, back) = io(&mut q, None, 2, 7, 4, 4096);
    assert!(
        ok && back == pattern(2, 7, 4 * 4096),
        "data lost across restart + rekey"
    );
    drop(q);
    drop(admin);
    s.stop();
}

/// Access control on the real binary (issue 11 items 4 and 5, issue 13 item 11): an encrypted
/// namespace exported to any host is warned about at start-up; refused Connects are logged
/// with their reason (a host not on the list, an NQN not served on that listener); a subsystem
/// with `allow_any_host` admits an empty HOSTNQN; `subsystems.list` shows who may connect.
#[test]
fn access_warnings_and_refused_connects_are_logged() {
    const OPEN: &str = "nqn.2026-11.io.nvseal:open";
    const CLOSED: &str = "nqn.2026-11.io.nvseal:closed";
    const ELSEWHERE: &str = "nqn.2026-11.io.nvseal:elsewhere";
    const STRANGER: &str = "nqn.2014-08.org.nvmexpress:uuid:stranger";
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let d = dir.path();
    let cfg = d.join("access.yaml");
    let sock = d.join("rpc.sock");
    // A port nothing listens on yet, for the subsystem that must stay unreachable here.
    let elsewhere_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        &cfg,
        format!(
            "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 20\n\
             rpc:\n  socket_path: {sock}\n\
             bdevs:\n  - {{ name: n0, type: null, size_bytes: 16777216 }}\n\
             \x20 - {{ name: n0c, type: crypto, base: n0, key: ephemeral }}\n\
             \x20 - {{ name: n1, type: null, size_bytes: 16777216 }}\n\
             \x20 - {{ name: n2, type: null, size_bytes: 16777216 }}\n\
             subsystems:\n\
             \x20 - nqn: {OPEN}\n    serial: OPEN1\n    allow_any_host: true\n    namespaces: [{{ nsid: 1, bdev: n0c }}]\n    listen: [{{ addr: 127.0.0.1, port: 0 }}]\n\
             \x20 - nqn: {CLOSED}\n    serial: CLOSED1\n    allowed_hosts: [\"{HOST}\"]\n    namespaces: [{{ nsid: 1, bdev: n1 }}]\n    listen: [{{ addr: 127.0.0.1, port: 0 }}]\n\
             \x20 - nqn: {ELSEWHERE}\n    serial: ELSE1\n    allowed_hosts: [\"{HOST}\"]\n    namespaces: [{{ nsid: 1, bdev: n2 }}]\n    listen: [{{ addr: 127.0.0.2, port: {elsewhere_port} }}]\n",
            sock = sock.display(),
        ),
    )
    .unwrap();
    let mut s = Serve::start(&cfg);
    let warn = s.wait_for("encrypted namespace exported to any host");
    assert!(warn.contains(OPEN) && warn.contains("n0c"), "{warn}");
    let listening: Vec<String> = {
        s.wait_for("control socket listening");
        s.log
            .iter()
            .filter(|l| l.contains("NVMe/TCP listening"))
            .cloned()
            .collect()
    };
    assert_eq!(listening.len(), 2, "one listener per distinct address");
    let addr = addr_of(
        listening
            .iter()
            .find(|l| l.contains("addr=127.0.0.1:"))
            .unwrap(),
    );

    let connect = |nqn: &str, hostnqn: &str| {
        let cfg = HostConfig {
            hostnqn: hostnqn.into(),
            ..host_cfg()
        };
        HostQpair::connect(addr, nqn, 0, connect::CNTLID_DYNAMIC, cfg)
    };
    // An empty HOSTNQN where any host is allowed; the listed host where only it is.
    connect(OPEN, "").unwrap();
    connect(CLOSED, HOST).unwrap();
    // Refusals: the host sees a status, the log says why.
    assert!(connect(CLOSED, STRANGER).is_err());
    let l = s.wait_for("host not in allowed_hosts");
    assert!(l.contains("Connect refused") && l.contains(STRANGER), "{l}");
    assert!(connect(CLOSED, "").is_err());
    s.wait_for("empty HOSTNQN and the subsystem does not allow any host");
    assert!(connect(ELSEWHERE, HOST).is_err());
    let l = s.wait_for("subsystem is not served on this listener");
    assert!(l.contains(ELSEWHERE), "{l}");

    let v = rpc(&sock, "subsystems.list", serde_json::json!({}));
    let subs = v["subsystems"].as_array().unwrap();
    let sub = |nqn: &str| subs.iter().find(|x| x["nqn"] == nqn).unwrap().clone();
    assert_eq!(sub(OPEN)["allow_any_host"], true, "{v}");
    assert_eq!(sub(CLOSED)["allow_any_host"], false, "{v}");
    assert_eq!(sub(CLOSED)["allowed_hosts"][0], HOST, "{v}");
    assert_eq!(
        sub(ELSEWHERE)["listen"][0],
        format!("127.0.0.2:{elsewhere_port}"),
        "{v}"
    );
    s.stop();
}
