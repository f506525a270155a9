//! Run-time namespaces on the real binary: `nvseal serve` starts with one plaintext namespace
//! and a control socket; `namespace.create` adds a plaintext RAM namespace and a managed-key
//! encrypted one (local key provider) while a host is connected; nvseal's own NVMe/TCP host
//! writes and reads all three on the connection it already had; `namespace.delete` removes one,
//! after which I/O to it fails with an NVMe status while the others keep working. A second
//! test restricts root to the admin role and checks that keyed namespaces are refused to it.

use nvseal::nvme::connect;
use nvseal::nvmf::host::{HostConfig, HostQpair};
use nvseal::rpc::client::ClientError;
use serde_json::{json, Value};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2026-11.io.nvseal:nsrpc";

struct Serve {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Serve {
    fn start(cfg: &Path) -> Serve {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nvseal"))
            .args(["serve", "-c", cfg.to_str().unwrap()])
            .env("NVSEAL_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Serve {
            child,
            lines: rx,
            log: Vec::new(),
        }
    }
    fn wait_for(&mut self, what: &str) -> String {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => {
                    self.log.push(l.clone());
                    if l.contains(what) {
                        return l;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(s) = self.child.try_wait().unwrap() {
                        panic!(
                            "serve exited ({s}) before {what:?}:\n{}",
                            self.log.join("\n")
                        );
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no {what:?} in serve's log:\n{}", self.log.join("\n"));
    }
    fn stop(mut self) -> Vec<String> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let st = self.child.wait().unwrap();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.log.push(l);
        }
        assert!(st.success(), "serve exit {st}:\n{}", self.log.join("\n"));
        std::mem::take(&mut self.log)
    }
}

/// A test that fails part-way must not leave its serve process running.
impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn addr_of(line: &str) -> SocketAddr {
    let i = line.find("addr=").expect("addr= in listening line") + 5;
    line[i..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn host_cfg() -> HostConfig {
    HostConfig {
        hostnqn: "nqn.2014-08.org.nvmexpress:uuid:nsrpc-test-host".into(),
        queue_depth: 16,
        ..Default::default()
    }
}

fn pattern(nsid: u32, lba: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            ((i as u64).wrapping_mul(29) ^ lba.wrapping_mul(113) ^ (u64::from(nsid) * 11)) as u8
        })
        .collect()
}

/// Runs one I/O to completion; returns (NVMe status code type and code, data).
fn io(
    q: &mut HostQpair,
    write: Option<&[u8]>,
    nsid: u32,
    lba: u64,
    nlb: u32,
) -> (bool, u16, Vec<u8>) {
    match write {
        Some(d) => q.write(nsid, lba, d, 4096, 1).unwrap(),
        None => q.read(nsid, lba, nlb, 4096, 1).unwrap(),
    };
    let mut out = None;
    let t0 = Instant::now();
    while out.is_none() {
        q.poll(&mut |c| {
            let s = c.cqe.status();
            out = Some((s.is_success(), s.to_field(), c.data.to_vec()))
        })
        .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(20), "I/O timed out");
    }
    out.unwrap()
}

fn verify(q: &mut HostQpair, nsid: u32, lba: u64) {
    let data = pattern(nsid, lba, 2 * 4096);
    let (ok, st, _) = io(q, Some(&data), nsid, lba, 2);
    assert!(ok, "nsid {nsid} write: status {st:#x}");
    let (ok, st, back) = io(q, None, nsid, lba, 2);
    assert!(ok && back == data, "nsid {nsid} read back: status {st:#x}");
}

fn rpc(sock: &Path, method: &str, params: Value) -> Value {
    nvseal::rpc::client::call(sock, method, Some(params))
        .unwrap_or_else(|e| panic!("{method}: {e}"))
}

fn rpc_err(sock: &Path, method: &str, params: Value) -> (i64, String) {
    match nvseal::rpc::client::call(sock, method, Some(params)) {
        Err(ClientError::Rpc { code, message, .. }) => (code, message),
        other => panic!("{method}: expected a JSON-RPC error, got {other:?}"),
    }
}

fn config(d: &Path, rpc_extra: &str) -> std::path::PathBuf {
    let cfg = d.join("nsrpc.yaml");
    std::fs::write(
        &cfg,
        format!(
            "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 20\n\
             keys:\n  local:\n    path: {keys}\n    create: true\n  audit_log: {audit}\n\
             rpc:\n  socket_path: {sock}\n{rpc_extra}\
             bdevs:\n  - name: mem0\n    type: malloc\n    size_bytes: 8388608\n\
             subsystems:\n  - nqn: {NQN}\n    serial: NSRPC1\n    allowed_hosts: [\"nqn.2014-08.org.nvmexpress:uuid:nsrpc-test-host\"]\n    namespaces:\n      - nsid: 1\n        bdev: mem0\n    listen:\n      - addr: 127.0.0.1\n        port: 0\n",
            keys = d.join("keys").display(),
            audit = d.join("audit.jsonl").display(),
            sock = d.join("rpc.sock").display(),
        ),
    )
    .unwrap();
    cfg
}

/// `namespace.create` params for a managed-key namespace (local provider) at nsid 5 over a
/// fresh RAM disk.
fn vol5_stack() -> Value {
    json!({ "nqn": NQN, "nsid": 5, "bdevs": [
        { "name": "raw5", "type": "malloc", "size_bytes": 6291456 },
        { "name": "vol5", "type": "encrypted", "base": "raw5", "provider": "local", "create": true }
    ] })
}

#[test]
fn namespaces_created_and_deleted_over_the_control_socket() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let d = dir.path();
    let cfg = config(d, "");
    let sock = d.join("rpc.sock");
    let mut s = Serve::start(&cfg);
    let addr = addr_of(&s.wait_for("NVMe/TCP listening"));
    s.wait_for("control socket listening");

    // A host connected before any namespace is created.
    let mut admin = HostQpair::connect(addr, NQN, 0, connect::CNTLID_DYNAMIC, host_cfg()).unwrap();
    admin.enable().unwrap();
    let mut q = HostQpair::connect(addr, NQN, 1, admin.cntlid(), host_cfg()).unwrap();
    verify(&mut q, 1, 0);

    // Plaintext RAM namespace, lowest free nsid.
    let r = rpc(
        &sock,
        "namespace.create",
        json!({ "nqn": NQN, "bdevs": [{ "name": "mem1", "type": "malloc", "size_bytes": 4194304 }] }),
    );
    assert_eq!(r["nsid"], 2, "{r}");
    assert_eq!(r["online"], true, "{r}");
    // Encrypted (managed key, local provider) on a RAM base at nsid 5.
    let r = rpc(&sock, "namespace.create", vol5_stack());
    assert_eq!(r["nsid"], 5, "{r}");
    assert_eq!(r["encrypted"], true, "{r}");
    s.wait_for("encrypted namespace online");

    // Errors: unknown subsystem, nsid in use, bad bdev config (names the field), name clash.
    let (code, msg) = rpc_err(
        &sock,
        "namespace.create",
        json!({ "nqn": "nqn.2026-11.io.nvseal:nope", "bdevs": [{ "name": "x", "type": "null", "num_blocks": 8 }] }),
    );
    assert_eq!(code, -32002, "{msg}");
    let (code, msg) = rpc_err(
        &sock,
        "namespace.create",
        json!({ "nqn": NQN, "nsid": 2, "bdevs": [{ "name": "x", "type": "malloc", "size_bytes": 1048576 }] }),
    );
    assert_eq!(code, -32003, "{msg}");
    let (code, msg) = rpc_err(
        &sock,
        "namespace.create",
        json!({ "nqn": NQN, "bdevs": [{ "name": "x", "type": "malloc", "size_bytez": 1048576 }] }),
    );
    assert_eq!(code, -32602, "{msg}");
    assert!(msg.contains("bdevs[0]"), "{msg}");
    let (code, msg) = rpc_err(
        &sock,
        "namespace.create",
        json!({ "nqn": NQN, "bdevs": [{ "name": "mem0", "type": "malloc", "size_bytes": 1048576 }] }),
    );
    assert_eq!(code, -32003, "{msg}");
    assert!(msg.contains("bdevs[0].name"), "{msg}");

    // All three namespaces work on the I/O queue that existed before they were created.
    for nsid in [1u32, 2, 5] {
        verify(&mut q, nsid, 3);
    }
    let list = rpc(&sock, "subsystems.list", json!({}));
    let ns = list["subsystems"][1]["namespaces"]
        .as_array()
        .unwrap()
        .clone();
    let ids: Vec<u64> = ns.iter().map(|n| n["nsid"].as_u64().unwrap()).collect();
    assert_eq!(ids, [1, 2, 5], "{list}");
    assert_eq!(ns[2]["online"], true, "{list}");
    assert_eq!(ns[2]["encrypted"], true, "{list}");
    assert_eq!(ns[2]["key"]["ns_id"], "vol5", "{list}");

    // Delete the plaintext one: I/O to it fails with Invalid Namespace (SCT 0, SC 0x0b);
    // the others keep working.
    let r = rpc(&sock, "namespace.delete", json!({ "nqn": NQN, "nsid": 2 }));
    assert_eq!(r["freed"], true, "{r}");
    let (ok, st, _) = io(&mut q, None, 2, 3, 2);
    assert!(!ok);
    assert_eq!(
        st & 0x7ff,
        0x0b,
        "Invalid Namespace (SCT 0, SC 0x0b), status field {st:#x}"
    );
    verify(&mut q, 1, 9);
    verify(&mut q, 5, 9);
    let (code, msg) = rpc_err(&sock, "namespace.delete", json!({ "nqn": NQN, "nsid": 2 }));
    assert_eq!(code, -32002, "{msg}");
    // The name is free again; the nsid too.
    let r = rpc(
        &sock,
        "namespace.create",
        json!({ "nqn": NQN, "bdevs": [{ "name": "mem1", "type": "null", "num_blocks": 1024, "block_size": 4096 }] }),
    );
    assert_eq!(r["nsid"], 2, "{r}");
    // (The null bdev discards data and does not fill read buffers: only the status counts.)
    let (ok, st, _) = io(&mut q, None, 2, 0, 1);
    assert!(ok, "I/O to the re-created nsid 2: status {st:#x}");

    // The encrypted one goes too (crypto role: root holds every role here); nsid 1 stays.
    let r = rpc(&sock, "namespace.delete", json!({ "nqn": NQN, "nsid": 5 }));
    assert_eq!(r["freed"], true, "{r}");
    // Its key left key management (the DEK goes with the last channel, already closed).
    assert_eq!(r["key_released"], true, "{r}");
    let (ok, st, _) = io(&mut q, None, 5, 3, 2);
    assert!(!ok && st & 0x7ff == 0x0b, "status field {st:#x}");
    verify(&mut q, 1, 17);
    let k = rpc(&sock, "keys.status", json!({}));
    assert_eq!(k["namespaces"], json!([]), "{k}");
    // Its names are free again: the same stack can be created anew and comes online.
    let r = rpc(&sock, "namespace.create", vol5_stack());
    assert_eq!(r["nsid"], 5, "{r}");
    s.wait_for("encrypted namespace online");
    verify(&mut q, 5, 4);
    let r = rpc(&sock, "namespace.delete", json!({ "nqn": NQN, "nsid": 5 }));
    assert_eq!(r["key_released"], true, "{r}");

    drop(q);
    drop(admin);
    s.stop();
    let audit = std::fs::read_to_string(d.join("audit.jsonl")).unwrap();
    let lines: Vec<&str> = audit.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"remove\"") && l.contains("vol5") && l.contains("\"ok\"")),
        "the key manager's release of vol5 is audited: {audit}"
    );
    for op in ["namespace.create", "namespace.delete"] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains(op) && l.contains("vol5") && l.contains("\"ok\"")),
            "{op} of the encrypted namespace is audited: {audit}"
        );
    }
    assert!(
        !lines.iter().any(|l| l.contains("mem1")),
        "plaintext namespaces are not key operations: {audit}"
    );
}

#[test]
fn keyed_namespaces_need_the_crypto_role() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let d = dir.path();
    let cfg = config(
        d,
        "  root_has_all_roles: false\n  roles:\n    viewer:\n      uids: [0]\n    admin:\n      uids: [0]\n",
    );
    let sock = d.join("rpc.sock");
    let mut s = Serve::start(&cfg);
    s.wait_for("control socket listening");
    let (code, msg) = rpc_err(&sock, "namespace.create", vol5_stack());
    assert_eq!(code, -32001, "{msg}");
    assert!(msg.contains("crypto"), "{msg}");
    let audit = std::fs::read_to_string(d.join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("namespace.create") && audit.contains("permission denied"),
        "the refusal is audited: {audit}"
    );
    // Plaintext is an admin operation.
    let r = rpc(
        &sock,
        "namespace.create",
        json!({ "nqn": NQN, "bdevs": [{ "name": "mem1", "type": "malloc", "size_bytes": 1048576 }] }),
    );
    assert_eq!(r["nsid"], 2, "{r}");
    let r = rpc(&sock, "namespace.delete", json!({ "nqn": NQN, "nsid": 2 }));
    assert_eq!(r["freed"], true, "{r}");
    s.stop();
}
