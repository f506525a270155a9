//! Run-time namespaces on the real binary: `nvseal serve` starts with one plaintext namespace
//! and a control socket; `namespace.create` adds a plaintext RAM namespace and a managed-key
//! encrypted one (local key provider) while a host is connected; nvseal's own NVMe/TCP host
//! writes and reads all three on the connection it already had; `namespace.delete` removes one,
//! after which I/O to it fails with an NVMe status while the others keep working. A second
//! test restricts root to the admin role and checks that keyed namespaces are refused to it.
//! The `unprivileged_*` tests run the client as another uid (a copy of this binary, as in
//! tests/rpc_socket.rs) with only the admin role: backing paths come only from
//! `rpc.namespaces.paths`, files and devices in use or under an encrypted namespace are
//! refused, RAM is held to the budgets, and every `namespace.*` call is in the audit trail.

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
             rpc:\n  socket_path: {sock}\n  namespaces:\n    malloc_bytes_max: 33554432\n{rpc_extra}\
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

    // A detached header path from a caller is refused (config file only), as is plaintext with
    // create; nothing is created.
    let hdr = d.join("caller.hdr");
    let (code, msg) = rpc_err(
        &sock,
        "namespace.create",
        json!({ "nqn": NQN, "nsid": 6, "bdevs": [
            { "name": "raw6", "type": "malloc", "size_bytes": 6291456 },
            { "name": "vol6", "type": "encrypted", "base": "raw6", "provider": "local",
              "plaintext": true, "header_file": hdr }
        ] }),
    );
    assert!(code == -32602 && msg.contains("header_file"), "{msg}");
    assert!(!hdr.exists());
    let (code, msg) = rpc_err(
        &sock,
        "namespace.create",
        json!({ "nqn": NQN, "nsid": 6, "bdevs": [
            { "name": "raw6", "type": "malloc", "size_bytes": 6291456 },
            { "name": "vol6", "type": "encrypted", "base": "raw6", "provider": "local",
              "plaintext": true, "create": true }
        ] }),
    );
    assert!(
        code == -32602 && msg.contains("exclude each other"),
        "{msg}"
    );
    // A caller cannot attach a drive or a remote controller (config file only).
    let (code, msg) = rpc_err(
        &sock,
        "namespace.create",
        json!({ "nqn": NQN, "nsid": 6, "bdevs": [
            { "name": "ssd6", "type": "spdk_nvme", "trid": "trtype:PCIe traddr:0000:03:00.0" }
        ] }),
    );
    assert!(code != 0 && msg.contains("spdk_nvme"), "{code} {msg}");

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
        lines.iter().any(|l| l.contains("namespace.create")
            && l.contains("mem1=malloc(4194304)")
            && l.contains("\"ok\"")),
        "plaintext namespace changes are audited too: {audit}"
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

const NOBODY: u32 = 65534;
/// A peer that holds only the viewer role in the allow-list test.
const VIEWER_UID: u32 = 65533;

/// Runs `namespace.*` as another uid through a copy of this test binary (`child_client`),
/// like tests/rpc_socket.rs: the server sees a real unprivileged peer.
fn call_as(uid: u32, exe: &Path, sock: &Path, method: &str, params: &Value) -> Value {
    use std::os::unix::process::CommandExt;
    let out = Command::new(exe)
        .args([
            "--exact",
            "child_client",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NVSEAL_RPC_CHILD_SOCKET", sock)
        .env("NVSEAL_RPC_CHILD_METHOD", method)
        .env("NVSEAL_RPC_CHILD_PARAMS", params.to_string())
        .uid(uid)
        .gid(NOBODY)
        .output()
        .expect("spawn child client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("CHILD-RESULT ").map(|(_, rest)| rest))
        .unwrap_or_else(|| {
            panic!(
                "child printed no result; stdout: {stdout}\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).unwrap()
}

/// Not a test of its own: the body of the unprivileged child that `call_as` runs.
#[test]
#[ignore = "helper process for the unprivileged_* tests, run by them"]
fn child_client() {
    let Ok(socket) = std::env::var("NVSEAL_RPC_CHILD_SOCKET") else {
        return;
    };
    let method = std::env::var("NVSEAL_RPC_CHILD_METHOD").unwrap();
    let params: Value =
        serde_json::from_str(&std::env::var("NVSEAL_RPC_CHILD_PARAMS").unwrap()).unwrap();
    let uid = nix::unistd::geteuid().as_raw();
    let v = match nvseal::rpc::client::call(Path::new(&socket), &method, Some(params)) {
        Ok(r) => json!({"uid": uid, "result": r}),
        Err(ClientError::Rpc {
            code,
            message,
            data,
        }) => json!({"uid": uid, "error": {"code": code, "message": message, "data": data}}),
        Err(e) => json!({"uid": uid, "client_error": e.to_string()}),
    };
    println!("CHILD-RESULT {v}");
}

/// An unprivileged peer with the admin role, and every `namespace.*` call it makes.
struct Peer {
    exe: std::path::PathBuf,
    sock: std::path::PathBuf,
    /// (method, uid, Ok or the error code) of every call, in order, for the audit check.
    calls: Vec<(String, u32, Result<(), i64>)>,
}

impl Peer {
    fn call(&mut self, uid: u32, method: &str, params: Value) -> Value {
        let v = call_as(uid, &self.exe, &self.sock, method, &params);
        assert_eq!(v["uid"], uid, "{v}");
        let outcome = match v["error"]["code"].as_i64() {
            Some(c) => Err(c),
            None => {
                assert!(v.get("result").is_some(), "{method} {params}: {v}");
                Ok(())
            }
        };
        self.calls.push((method.to_string(), uid, outcome));
        v
    }
    fn ok(&mut self, params: Value) -> Value {
        let v = self.call(NOBODY, "namespace.create", params.clone());
        assert!(v.get("result").is_some(), "{params}: {v}");
        v["result"].clone()
    }
    /// A refused create: checks the code and that the message contains `what`.
    fn refused(&mut self, params: Value, code: i64, what: &str) -> String {
        let v = self.call(NOBODY, "namespace.create", params.clone());
        assert_eq!(v["error"]["code"], code, "{params}: {v}");
        let msg = v["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains(what), "{params}: {msg:?} lacks {what:?}");
        msg
    }
}

fn uring(name: &str, path: &Path, size: Option<u64>) -> Value {
    let mut b = json!({ "name": name, "type": "uring", "path": path });
    if let Some(s) = size {
        b["size_bytes"] = json!(s);
    }
    b
}

fn ns(bdevs: Vec<Value>) -> Value {
    json!({ "nqn": NQN, "bdevs": bdevs })
}

const MIB: u64 = 1 << 20;

/// Checks the audit trail holds one record per `namespace.*` call of `peer`, in order, with
/// the caller's uid and the outcome, whether the call was allowed, refused by the handler or
/// refused by the role check.
fn assert_every_call_audited(audit: &Path, peer: &Peer) {
    let text = std::fs::read_to_string(audit).unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["op"].as_str().unwrap().starts_with("namespace."))
        .filter(|r| {
            let who = r["who"].as_str().unwrap();
            who.starts_with(&format!("uid={NOBODY} "))
                || who.starts_with(&format!("uid={VIEWER_UID} "))
        })
        .collect();
    assert_eq!(records.len(), peer.calls.len(), "{text}");
    for (r, (method, uid, outcome)) in records.iter().zip(&peer.calls) {
        assert_eq!(r["op"], method.as_str(), "{r}");
        assert!(
            r["who"]
                .as_str()
                .unwrap()
                .starts_with(&format!("uid={uid} ")),
            "{r}"
        );
        let result = r["result"].as_str().unwrap();
        match outcome {
            Ok(()) => assert_eq!(result, "ok", "{r}"),
            Err(code) => assert!(result.starts_with(&format!("error {code}:")), "{r}"),
        }
    }
}

/// `namespace.create` for an unprivileged admin: backing paths only as `rpc.namespaces.paths`
/// grants them (no path outside, no `..`, no symlink leading out, no hard link, no file a
/// config or run-time bdev uses, no create or grow unless the entry permits, no encrypted
/// base, no file with a key header), RAM only within the budgets, and every call audited.
#[test]
fn unprivileged_admin_is_held_to_the_allow_list_and_budgets() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP unprivileged_*: needs root to run a child as uid {NOBODY}");
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let d = dir.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = d.join("rpc_child");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let vols = d.join("vols");
    let fixed = d.join("fixed");
    std::fs::create_dir(&vols).unwrap();
    std::fs::create_dir(&fixed).unwrap();
    // A root-only file outside the allowed directories.
    let secret = d.join("secret.img");
    let secret_bytes: Vec<u8> = b"TOPSECRET-"
        .iter()
        .copied()
        .cycle()
        .take(MIB as usize)
        .collect();
    std::fs::write(&secret, &secret_bytes).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&secret, vols.join("escape.img")).unwrap();
    std::os::unix::fs::symlink("enc.img", vols.join("enclink.img")).unwrap();
    let small = fixed.join("small.img");
    std::fs::write(&small, vec![0u8; MIB as usize]).unwrap();
    // A hard link into an allowed directory of another root-only file (the symlink above
    // points at a file with one link, so only the beneath-resolution refuses it).
    let secret2 = d.join("secret2.img");
    std::fs::write(&secret2, &secret_bytes).unwrap();
    std::fs::set_permissions(&secret2, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::hard_link(&secret2, vols.join("hard.img")).unwrap();
    // A file that holds an nvseal key header (an encrypted namespace's base, not open now).
    let mut hdr = vec![0u8; 2 * MIB as usize];
    hdr[..8].copy_from_slice(&nvseal::keys::header::MAGIC);
    std::fs::write(vols.join("hdr.img"), &hdr).unwrap();

    let audit = d.join("audit.jsonl");
    let cfg = d.join("nsrpc.yaml");
    std::fs::write(
        &cfg,
        format!(
            "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 20\n\
             keys:\n  local:\n    path: {keys}\n    create: true\n  audit_log: {audit}\n\
             rpc:\n  socket_path: {sock}\n  socket_gid: {NOBODY}\n\
             \x20 roles:\n    admin: {{ uids: [{NOBODY}] }}\n    viewer: {{ uids: [{VIEWER_UID}] }}\n\
             \x20 namespaces:\n    paths:\n\
             \x20     - {{ dir: {vols}, create: true, max_size_bytes: {max} }}\n\
             \x20     - {{ dir: {fixed} }}\n\
             \x20   malloc_bytes_max: {ram}\n    hugepage_bytes_max: {huge}\n\
             bdevs:\n  - name: mem0\n    type: malloc\n    size_bytes: 4194304\n\
             \x20 - name: used\n    type: uring\n    path: {vols}/used.img\n    size_bytes: 2097152\n\
             \x20 - name: encdisk\n    type: uring\n    path: {vols}/enc.img\n    size_bytes: 3145728\n\
             \x20 - name: enc\n    type: encrypted\n    base: encdisk\n    provider: local\n    create: true\n\
             subsystems:\n  - nqn: {NQN}\n    serial: NSRPC2\n    allowed_hosts: [{host}]\n    namespaces:\n      - nsid: 1\n        bdev: mem0\n      - nsid: 2\n        bdev: enc\n    listen:\n      - addr: 127.0.0.1\n        port: 0\n",
            keys = d.join("keys").display(),
            audit = audit.display(),
            sock = d.join("rpc.sock").display(),
            vols = vols.display(),
            fixed = fixed.display(),
            max = 8 * MIB,
            ram = 6 * MIB,
            huge = 2 * MIB,
            host = host_cfg().hostnqn,
        ),
    )
    .unwrap();
    let mut s = Serve::start(&cfg);
    s.wait_for("control socket listening");
    let mut p = Peer {
        exe,
        sock: d.join("rpc.sock"),
        calls: Vec::new(),
    };

    // Not in the allow-list: the root-only file, directly, through `..`, through a symlink
    // inside an allowed directory, or through a hard link into one.
    p.refused(
        ns(vec![uring("s", &secret, None)]),
        -32001,
        "is not allowed",
    );
    let msg = p.refused(
        ns(vec![uring("s", &vols.join("../secret.img"), None)]),
        -32001,
        "`..`",
    );
    assert!(msg.contains("bdevs[0].path"), "{msg}");
    p.refused(
        ns(vec![uring("s", &vols.join("escape.img"), None)]),
        -32001,
        "leads out of the allowed directory",
    );
    p.refused(
        ns(vec![uring("s", &vols.join("hard.img"), None)]),
        -32001,
        "hard links",
    );
    assert_eq!(std::fs::read(&secret).unwrap(), secret_bytes);

    // In use: by a config bdev, by another run-time bdev, twice in one call.
    p.refused(
        ns(vec![uring("u", &vols.join("used.img"), None)]),
        -32003,
        "in use",
    );
    let r = p.ok(ns(vec![uring("n1", &vols.join("new.img"), Some(4 * MIB))]));
    let n1 = r["nsid"].as_u64().unwrap();
    let meta = std::fs::metadata(vols.join("new.img")).unwrap();
    assert_eq!(
        (meta.len(), meta.permissions().mode() & 0o777),
        (4 * MIB, 0o600)
    );
    p.refused(
        ns(vec![uring("n2", &vols.join("new.img"), None)]),
        -32003,
        "in use",
    );
    p.refused(
        ns(vec![
            uring("t1", &vols.join("twice.img"), Some(MIB)),
            uring("t2", &vols.join("twice.img"), None),
        ]),
        -32003,
        "in use",
    );

    // Create and grow only where the entry says so, and only up to max_size_bytes.
    p.refused(
        ns(vec![uring("m", &fixed.join("missing.img"), Some(MIB))]),
        -32001,
        "does not permit create",
    );
    assert!(!fixed.join("missing.img").exists());
    p.refused(
        ns(vec![uring("g", &small, Some(2 * MIB))]),
        -32001,
        "does not permit grow",
    );
    assert_eq!(std::fs::metadata(&small).unwrap().len(), MIB);
    p.refused(
        ns(vec![uring("b", &vols.join("big.img"), Some(16 * MIB))]),
        -32001,
        "max_size_bytes",
    );
    assert!(!vols.join("big.img").exists());
    // An existing file in a no-create, no-grow directory is fine at its size.
    let r = p.ok(ns(vec![uring("f1", &small, None)]));
    let f1 = r["nsid"].as_u64().unwrap();

    // The base of an encrypted namespace (also through a symlink to it), and a file with a key
    // header, are never exported raw.
    p.refused(
        ns(vec![uring("e", &vols.join("enc.img"), None)]),
        -32001,
        "base of encrypted bdev enc",
    );
    p.refused(
        ns(vec![uring("e", &vols.join("enclink.img"), None)]),
        -32001,
        "base of encrypted bdev enc",
    );
    p.refused(
        ns(vec![uring("h", &vols.join("hdr.img"), None)]),
        -32001,
        "key header",
    );

    // RAM budgets: 6 MiB of pages, 2 MiB of hugepages, for all run-time namespaces together.
    let ram = |name: &str, bytes: u64| {
        ns(vec![
            json!({ "name": name, "type": "malloc", "size_bytes": bytes }),
        ])
    };
    p.refused(ram("r0", 8 * MIB), -32003, "malloc_bytes_max");
    let r = p.ok(ram("r1", 4 * MIB));
    let r1 = r["nsid"].as_u64().unwrap();
    p.refused(ram("r2", 4 * MIB), -32003, "malloc_bytes_max");
    p.refused(
        ns(vec![
            json!({ "name": "hp", "type": "malloc", "size_bytes": 4 * MIB, "hugepages": true }),
        ]),
        -32003,
        "hugepage_bytes_max",
    );
    let v = p.call(
        NOBODY,
        "namespace.delete",
        json!({ "nqn": NQN, "nsid": r1 }),
    );
    assert_eq!(v["result"]["freed"], true, "{v}");
    p.ok(ram("r2", 4 * MIB));

    // A deleted namespace's file is free again.
    let v = p.call(
        NOBODY,
        "namespace.delete",
        json!({ "nqn": NQN, "nsid": n1 }),
    );
    assert_eq!(v["result"]["freed"], true, "{v}");
    p.ok(ns(vec![uring("n3", &vols.join("new.img"), None)]));

    // Failed calls of every kind are audited too: bad params, unknown namespace, no role.
    let v = p.call(
        NOBODY,
        "namespace.create",
        json!({ "nqn": NQN, "bdevz": [] }),
    );
    assert_eq!(v["error"]["code"], -32602, "{v}");
    let v = p.call(
        NOBODY,
        "namespace.delete",
        json!({ "nqn": NQN, "nsid": 77 }),
    );
    assert_eq!(v["error"]["code"], -32002, "{v}");
    let v = p.call(VIEWER_UID, "namespace.create", ram("v", MIB));
    assert_eq!(v["error"]["code"], -32001, "{v}");
    let v = p.call(
        VIEWER_UID,
        "namespace.delete",
        json!({ "nqn": NQN, "nsid": f1 }),
    );
    assert_eq!(v["error"]["code"], -32001, "{v}");

    let log = s.stop();
    assert!(
        log.iter()
            .any(|l| l.contains("refused") && l.contains("does not permit grow")),
        "refusals are logged with their reason:\n{}",
        log.join("\n")
    );
    assert_every_call_audited(&audit, &p);
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(
        text.contains(&format!("n1=uring({}/new.img)", vols.display())),
        "the audit record names the path: {text}"
    );
}

/// Block devices: only the devices listed, opened O_EXCL, so a device a config bdev holds (or
/// another run-time bdev) is refused, and a device is never grown into a file.
#[test]
fn unprivileged_admin_gets_only_listed_block_devices_exclusively() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() || !Path::new("/dev/loop-control").exists() {
        eprintln!("SKIP: needs root and loop devices");
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let d = dir.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = d.join("rpc_child");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let attach = |name: &str| {
        let img = d.join(name);
        std::fs::File::create(&img)
            .unwrap()
            .set_len(4 * MIB)
            .unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&img)
            .output()
            .expect("losetup runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDev(std::path::PathBuf::from(
            String::from_utf8(out.stdout).unwrap().trim(),
        ))
    };
    let cfg_dev = attach("a.img");
    let rpc_dev = attach("b.img");
    let other = attach("c.img");
    let audit = d.join("audit.jsonl");
    let cfg = d.join("blk.yaml");
    std::fs::write(
        &cfg,
        format!(
            "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 20\n\
             rpc:\n  socket_path: {sock}\n  socket_gid: {NOBODY}\n  audit_log: {audit}\n\
             \x20 roles:\n    admin: {{ uids: [{NOBODY}] }}\n\
             \x20 namespaces:\n    paths:\n      - {{ device: {a} }}\n      - {{ device: {b} }}\n\
             bdevs:\n  - name: blk0\n    type: uring\n    path: {a}\n\
             subsystems:\n  - nqn: {NQN}\n    serial: NSRPC3\n    allowed_hosts: [{host}]\n    namespaces:\n      - nsid: 1\n        bdev: blk0\n    listen:\n      - addr: 127.0.0.1\n        port: 0\n",
            sock = d.join("rpc.sock").display(),
            audit = audit.display(),
            a = cfg_dev.0.display(),
            b = rpc_dev.0.display(),
            host = host_cfg().hostnqn,
        ),
    )
    .unwrap();
    let mut s = Serve::start(&cfg);
    s.wait_for("control socket listening");
    let mut p = Peer {
        exe,
        sock: d.join("rpc.sock"),
        calls: Vec::new(),
    };
    // Held by the config bdev (O_EXCL): refused.
    p.refused(ns(vec![uring("x", &cfg_dev.0, None)]), -32003, "in use");
    // Not listed: refused, even though it is a block device.
    p.refused(
        ns(vec![uring("x", &other.0, None)]),
        -32001,
        "is not allowed",
    );
    // Listed and free: exported; a second bdev on it is refused.
    p.ok(ns(vec![uring("b1", &rpc_dev.0, None)]));
    p.refused(ns(vec![uring("b2", &rpc_dev.0, None)]), -32003, "in use");
    s.stop();
    assert_every_call_audited(&audit, &p);
}

/// A loop device, detached on drop.
struct LoopDev(std::path::PathBuf);

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}
