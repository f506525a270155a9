//! The control socket over a real unix socket in a temp dir: roles (including a real
//! unprivileged peer: a child process running as nobody), audit records, hostile input,
//! connection limits, stale sockets, the CLI helper's exit codes, and clean shutdown.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvseal::leak::{assert_no_secret, find_secret};
use nvseal::rpc::client::{self, ClientError, ClientOptions};
use nvseal::rpc::error::{
    BUSY, INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR,
    PERMISSION_DENIED,
};
use nvseal::rpc::Role;
use nvseal::rpc::{
    parse_params, RoleMembers, RpcConfig, RpcError, RpcHandle, RpcServer, ServeError, SocketMode,
};
use serde::Deserialize;
use serde_json::{json, Value};

/// A DEK the "keys.fingerprint" handler holds; no response may ever contain it.
const DEK: [u8; 64] = {
    let mut k = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        k[i] = (i as u8).wrapping_mul(37).wrapping_add(11);
        i += 1;
    }
    k
};

/// A secret sent as a param of a crypto call; it must not reach the audit log.
const PARAM_SECRET: &str = "5f4dcc3b5aa765d61d8327deb882cf995f4dcc3b5aa765d61d8327deb882cf99";

const NOBODY: u32 = 65534;

struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    socket: PathBuf,
    audit: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    // Let an unprivileged child reach the socket inside.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().to_path_buf();
    Fixture {
        socket: path.join("run").join("nvseal.sock"),
        audit: path.join("audit.jsonl"),
        dir: path,
        _dir: dir,
    }
}

fn config(f: &Fixture) -> RpcConfig {
    let mut c = RpcConfig {
        socket_path: f.socket.clone(),
        audit_log: Some(f.audit.clone()),
        max_request_bytes: 4096,
        read_timeout_ms: 2_000,
        ..RpcConfig::default()
    };
    c.roles.viewer = RoleMembers {
        uids: vec![NOBODY],
        gids: vec![],
    };
    c
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NsParams {
    nsid: u32,
}

fn start(cfg: RpcConfig) -> RpcHandle {
    RpcServer::builder(cfg)
        .method("ns.list", Role::Viewer, |_, _| {
            Ok(json!([{"nsid": 1, "state": "online"}]))
        })
        .method("ns.delete", Role::Admin, |_, p| {
            let p: NsParams = parse_params(p)?;
            if p.nsid == 9 {
                return Err(RpcError::not_found("namespace", "9"));
            }
            Ok(json!({"deleted": p.nsid}))
        })
        .method("keys.rekey", Role::Crypto, |ctx, _| {
            Ok(json!({"generation": 2, "by_uid": ctx.caller.uid}))
        })
        .method("keys.fingerprint", Role::Crypto, |_, _| {
            // What a real handler must do: derive a non-reversible identifier, never echo key bytes.
            use sha2::{Digest, Sha256};
            let fp = Sha256::digest(DEK);
            Ok(json!({"fingerprint": fp.iter().map(|b| format!("{b:02x}")).collect::<String>()}))
        })
        .method("debug.leaky", Role::Viewer, |_, _| {
            // A deliberately broken handler, to show the leak scanner catches it.
            Ok(json!({"oops": DEK.iter().map(|b| format!("{b:02x}")).collect::<String>()}))
        })
        .method("crash", Role::Viewer, |_, _| -> Result<Value, RpcError> {
            panic!("handler bug")
        })
        .method("hold", Role::Viewer, |_, _| {
            std::thread::sleep(Duration::from_millis(300));
            Ok(json!("held"))
        })
        .build()
        .expect("build")
        .start()
        .expect("start")
}

/// One raw connection for hand-made lines.
struct Raw {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw {
            writer: s.try_clone().unwrap(),
            reader: BufReader::new(s),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    fn recv(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("recv");
        assert!(line.ends_with('\n'), "unterminated response {line:?}");
        serde_json::from_str(&line).expect("response is JSON")
    }

    /// Waits until the server closes the connection (EOF), skipping any remaining lines.
    fn expect_closed(&mut self) {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => {}
            // Closing with our unread bytes still queued makes the kernel reset the stream.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("server did not close the connection: {e}"),
        }
    }
}

fn code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error: {v}"))
}

fn rpc_code(e: ClientError) -> i64 {
    match e {
        ClientError::Rpc { code, .. } => code,
        other => panic!("expected a JSON-RPC error, got {other}"),
    }
}

fn audit_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}

#[test]
fn methods_roles_and_audit_as_root() {
    let f = fixture();
    let h = start(config(&f));
    let meta = std::fs::metadata(&f.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);

    let methods = client::call(&f.socket, "rpc.methods", None).unwrap();
    let listed: Vec<(String, String)> = methods["methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().into(),
                m["role"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        listed.contains(&("keys.rekey".into(), "crypto".into())),
        "{listed:?}"
    );
    assert!(listed.contains(&("ns.delete".into(), "admin".into())));
    assert!(listed.contains(&("health".into(), "viewer".into())));

    let health = client::call(&f.socket, "health", None).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["caller"]["uid"], 0);
    assert_eq!(
        health["caller"]["roles"],
        json!(["viewer", "admin", "crypto"])
    );
    let version = client::call(&f.socket, "version", None).unwrap();
    assert_eq!(version["version"], env!("CARGO_PKG_VERSION"));

    assert_eq!(
        client::call(&f.socket, "ns.delete", Some(json!({"nsid": 3}))).unwrap()["deleted"],
        3
    );
    let e = client::call(&f.socket, "ns.delete", Some(json!({"nsid": "3"}))).unwrap_err();
    assert_eq!(rpc_code(e), i64::from(INVALID_PARAMS));
    let e = client::call(&f.socket, "ns.delete", Some(json!({"nsid": 9}))).unwrap_err();
    assert_eq!(rpc_code(e), -32002);
    let e = client::call(&f.socket, "no.such", None).unwrap_err();
    assert_eq!(rpc_code(e), i64::from(METHOD_NOT_FOUND));
    let e = client::call(&f.socket, "crash", None).unwrap_err();
    assert_eq!(rpc_code(e), i64::from(INTERNAL_ERROR));
    // The server survived the panicking handler.
    assert_eq!(
        client::call(&f.socket, "health", None).unwrap()["status"],
        "ok"
    );

    let r = client::call(
        &f.socket,
        "keys.rekey",
        Some(json!({"nsid": 1, "new_kek": PARAM_SECRET})),
    )
    .unwrap();
    assert_eq!(r["generation"], 2);
    let fp = client::call(&f.socket, "keys.fingerprint", Some(json!({"nsid": 1}))).unwrap();
    assert_no_secret(fp.to_string().as_bytes(), &DEK, "keys.fingerprint response");
    // The scanner does catch a leak on a real response.
    let leaky = client::call(&f.socket, "debug.leaky", None).unwrap();
    assert_eq!(
        find_secret(leaky.to_string().as_bytes(), &DEK)
            .unwrap()
            .encoding,
        "hex-lower"
    );

    let records = audit_records(&f.audit);
    // Admin and crypto calls are audited, whatever their outcome; viewer calls are not.
    let ops: Vec<(&str, &str)> = records
        .iter()
        .map(|r| (r["op"].as_str().unwrap(), r["result"].as_str().unwrap()))
        .map(|(op, res)| (op, res.split(':').next().unwrap()))
        .collect();
    assert_eq!(
        ops,
        [
            ("ns.delete", "ok"),
            ("ns.delete", "error -32602"),
            ("ns.delete", "error -32002"),
            ("keys.rekey", "ok"),
            ("keys.fingerprint", "ok"),
        ],
        "{records:?}"
    );
    assert_eq!(records[0]["target"], "nsid=3");
    let rekey = &records[3];
    assert!(rekey["who"]
        .as_str()
        .unwrap()
        .starts_with("uid=0 gid=0 pid="));
    assert_eq!(rekey["target"], "new_kek=<redacted> nsid=1");
    let audit_bytes = std::fs::read(&f.audit).unwrap();
    assert!(!String::from_utf8_lossy(&audit_bytes).contains(PARAM_SECRET));
    assert_no_secret(&audit_bytes, &DEK, "audit log");
    drop(h);
}

/// Runs this test binary as `uid:gid` to make one call; see `child_client`.
fn call_as(uid: u32, gid: u32, exe: &Path, socket: &Path, method: &str, params: &str) -> Value {
    use std::os::unix::process::CommandExt;
    let out = Command::new(exe)
        .args([
            "--exact",
            "child_client",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NVSEAL_RPC_CHILD_SOCKET", socket)
        .env("NVSEAL_RPC_CHILD_METHOD", method)
        .env("NVSEAL_RPC_CHILD_PARAMS", params)
        .uid(uid)
        .gid(gid)
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

/// Not a test of its own: the body of the unprivileged child that
/// `unprivileged_peer_is_refused_crypto_and_allowed_viewer` runs (with `--ignored`).
#[test]
#[ignore = "helper process for unprivileged_peer_*, run by that test"]
fn child_client() {
    let Ok(socket) = std::env::var("NVSEAL_RPC_CHILD_SOCKET") else {
        return;
    };
    let method = std::env::var("NVSEAL_RPC_CHILD_METHOD").unwrap();
    let params: Value =
        serde_json::from_str(&std::env::var("NVSEAL_RPC_CHILD_PARAMS").unwrap()).unwrap();
    let params = if params.is_null() { None } else { Some(params) };
    let uid = nix::unistd::geteuid().as_raw();
    let v = match client::call(Path::new(&socket), &method, params) {
        Ok(r) => json!({"uid": uid, "result": r}),
        Err(ClientError::Rpc {
            code,
            message,
            data,
        }) => {
            json!({"uid": uid, "error": {"code": code, "message": message, "data": data}})
        }
        Err(e) => json!({"uid": uid, "client_error": e.to_string()}),
    };
    println!("CHILD-RESULT {v}");
}

#[test]
fn unprivileged_peer_is_refused_crypto_and_allowed_viewer() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP unprivileged_peer_*: needs root to run a child as uid {NOBODY}");
        return;
    }
    let f = fixture();
    // The test binary, where nobody can execute it.
    let exe = f.dir.join("rpc_child");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cfg = config(&f);
    // Group access through the socket's group: 0660 owned by nogroup.
    cfg.socket_gid = Some(NOBODY);
    let h = start(cfg);
    std::fs::set_permissions(
        f.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();

    let v = call_as(NOBODY, NOBODY, &exe, &f.socket, "health", "null");
    assert_eq!(v["uid"], NOBODY);
    assert_eq!(v["result"]["caller"]["uid"], NOBODY, "{v}");
    assert_eq!(v["result"]["caller"]["roles"], json!(["viewer"]));
    let v = call_as(NOBODY, NOBODY, &exe, &f.socket, "ns.list", "null");
    assert_eq!(v["result"][0]["nsid"], 1, "{v}");

    let v = call_as(
        NOBODY,
        NOBODY,
        &exe,
        &f.socket,
        "keys.rekey",
        &json!({"new_kek": PARAM_SECRET}).to_string(),
    );
    assert_eq!(v["error"]["code"], PERMISSION_DENIED, "{v}");
    assert_eq!(v["error"]["data"]["required_role"], "crypto");
    assert_eq!(v["error"]["data"]["uid"], NOBODY);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("uid 65534"),
        "{v}"
    );
    let v = call_as(
        NOBODY,
        NOBODY,
        &exe,
        &f.socket,
        "ns.delete",
        r#"{"nsid":1}"#,
    );
    assert_eq!(v["error"]["data"]["required_role"], "admin", "{v}");

    // An unmapped uid in the socket's group can connect but holds no role at all.
    let v = call_as(4242, NOBODY, &exe, &f.socket, "health", "null");
    assert_eq!(v["error"]["code"], PERMISSION_DENIED, "{v}");
    // A uid outside the socket's group cannot even connect (mode 0660).
    let v = call_as(4242, 4242, &exe, &f.socket, "health", "null");
    assert!(
        v["client_error"]
            .as_str()
            .unwrap_or("")
            .contains("ermission denied"),
        "{v}"
    );

    let records = audit_records(&f.audit);
    // Both refused changes are audited (crypto and admin); the viewer calls are not.
    assert_eq!(records.len(), 2, "{records:?}");
    for (r, op) in records.iter().zip(["keys.rekey", "ns.delete"]) {
        assert!(r["who"]
            .as_str()
            .unwrap()
            .starts_with("uid=65534 gid=65534 pid="));
        assert_eq!(r["op"], op);
        assert!(
            r["result"].as_str().unwrap().starts_with("error -32001"),
            "{records:?}"
        );
    }
    assert!(!std::fs::read_to_string(&f.audit)
        .unwrap()
        .contains(PARAM_SECRET));
    h.shutdown();
}

#[test]
fn malformed_input_gets_errors_and_never_kills_the_server() {
    let f = fixture();
    let h = start(config(&f));
    let mut c = Raw::connect(&f.socket);
    let cases: Vec<(Vec<u8>, i32)> = vec![
        (b"garbage\n".to_vec(), PARSE_ERROR),
        (b"{\"jsonrpc\":\"2.0\",\"method\":\n".to_vec(), PARSE_ERROR),
        (vec![0xff, 0xfe, 0x00, 0x80, b'\n'], PARSE_ERROR),
        (format!("{}\n", "[".repeat(3000)).into_bytes(), PARSE_ERROR),
        (
            format!("{}\n", "{\"a\":".repeat(600)).into_bytes(),
            PARSE_ERROR,
        ),
        (b"17\n".to_vec(), INVALID_REQUEST),
        (b"null\n".to_vec(), INVALID_REQUEST),
        (b"[]\n".to_vec(), INVALID_REQUEST),
        (b"{}\n".to_vec(), INVALID_REQUEST),
        (
            br#"{"jsonrpc":"2.0","method":["health"],"id":1}"#.to_vec(),
            INVALID_REQUEST,
        ),
        (
            br#"{"jsonrpc":2.0,"method":"health","id":1}"#.to_vec(),
            INVALID_REQUEST,
        ),
        (
            br#"{"jsonrpc":"2.0","method":"health","params":"x","id":1}"#.to_vec(),
            INVALID_REQUEST,
        ),
        (
            br#"{"jsonrpc":"2.0","method":"health","id":[1]}"#.to_vec(),
            INVALID_REQUEST,
        ),
        (
            br#"{"jsonrpc":"2.0","method":"ns.delete","params":{"nsid":-1},"id":1}"#.to_vec(),
            INVALID_PARAMS,
        ),
        (
            br#"{"jsonrpc":"2.0","method":"ns.delete","params":{"nsid":1,"x":2},"id":1}"#.to_vec(),
            INVALID_PARAMS,
        ),
        (
            br#"{"jsonrpc":"2.0","method":"ns.delete","params":[[[[1]]]],"id":1}"#.to_vec(),
            INVALID_PARAMS,
        ),
    ];
    for (mut line, want) in cases {
        if line.last() != Some(&b'\n') {
            line.push(b'\n');
        }
        c.send(&line);
        let v = c.recv();
        assert_eq!(
            code(&v),
            i64::from(want),
            "{} -> {v}",
            String::from_utf8_lossy(&line)
        );
    }
    // Same connection still serves; blank lines are skipped; pipelined requests answer in order.
    c.send(b"\n  \r\n{\"jsonrpc\":\"2.0\",\"method\":\"health\",\"id\":\"a\"}\n{\"jsonrpc\":\"2.0\",\"method\":\"version\",\"id\":\"b\"}\n");
    assert_eq!(c.recv()["id"], "a");
    assert_eq!(c.recv()["id"], "b");
    // A batch: result, error, notification (no entry), and invalid member.
    c.send(br#"[{"jsonrpc":"2.0","method":"ns.list","id":1},{"jsonrpc":"2.0","method":"nope","id":2},{"jsonrpc":"2.0","method":"health"},5]"#);
    c.send(b"\n");
    let v = c.recv();
    let arr = v.as_array().expect("batch response is an array");
    assert_eq!(arr.len(), 3);
    assert_eq!(arr[0]["result"][0]["nsid"], 1);
    assert_eq!(code(&arr[1]), i64::from(METHOD_NOT_FOUND));
    assert_eq!(code(&arr[2]), i64::from(INVALID_REQUEST));
    // Over-long line (limit 4096): an error, then the server closes this connection.
    c.send(&vec![b'x'; 10_000]);
    let v = c.recv();
    assert_eq!(code(&v), i64::from(INVALID_REQUEST));
    assert!(v["error"]["message"].as_str().unwrap().contains("4096"));
    c.expect_closed();
    // Half a request, then hang up: nothing breaks.
    let mut half = Raw::connect(&f.socket);
    half.send(br#"{"jsonrpc":"2.0","meth"#);
    drop(half);
    // Half a request, then silence: the read timeout (2 s here) closes the connection.
    let mut slow = Raw::connect(&f.socket);
    slow.send(br#"{"jsonrpc":"2.0","method":"hea"#);
    slow.expect_closed();
    // Endless garbage without newlines on another connection: capped and closed.
    let mut flood = Raw::connect(&f.socket);
    let junk: Vec<u8> = (0..65_536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 | 1)
        .filter(|b| *b != b'\n')
        .collect();
    let _ = flood.writer.write_all(&junk);
    let v = flood.recv();
    assert_eq!(code(&v), i64::from(INVALID_REQUEST));
    flood.expect_closed();
    assert_eq!(
        client::call(&f.socket, "health", None).unwrap()["status"],
        "ok"
    );
    h.shutdown();
}

#[test]
fn connection_limit_with_100_clients() {
    let f = fixture();
    let cfg = RpcConfig {
        max_connections: 16,
        ..config(&f)
    };
    let h = start(cfg);
    // 100 connections held open at once: the first 16 are served, the rest told "busy".
    let mut conns: Vec<Raw> = (0..100).map(|_| Raw::connect(&f.socket)).collect();
    let mut served = 0;
    let mut busy = 0;
    for c in conns.iter_mut() {
        // A refused connection may already be closed; ignore a failed send.
        let _ = c
            .writer
            .write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"ns.list\",\"id\":1}\n");
        let v = c.recv();
        if v.get("result").is_some() {
            served += 1;
        } else {
            assert_eq!(code(&v), i64::from(BUSY), "{v}");
            assert_eq!(v["error"]["data"]["max_connections"], 16);
            busy += 1;
        }
    }
    assert_eq!((served, busy), (16, 84));
    drop(conns);
    // Once they are gone the server serves again; wait for the threads to notice the hang-ups.
    let deadline = Instant::now() + Duration::from_secs(20);
    while h.active_connections() > 0 {
        assert!(Instant::now() < deadline, "connections never released");
        std::thread::sleep(Duration::from_millis(10));
    }
    // 100 concurrent callers on threads: each gets a result or a clean busy error, none hangs.
    let socket = Arc::new(f.socket.clone());
    let threads: Vec<_> = (0..100)
        .map(|_| {
            let s = Arc::clone(&socket);
            std::thread::spawn(move || client::call(&s, "hold", None))
        })
        .collect();
    let mut ok = 0;
    for t in threads {
        match t.join().unwrap() {
            Ok(v) => {
                assert_eq!(v, json!("held"));
                ok += 1;
            }
            Err(e) => assert_eq!(rpc_code(e), i64::from(BUSY)),
        }
    }
    assert!(
        ok >= 16,
        "at least one full round of callers is served, got {ok}"
    );
    assert_eq!(
        client::call(&f.socket, "health", None).unwrap()["status"],
        "ok"
    );
    h.shutdown();
}

#[test]
fn stale_live_and_foreign_socket_paths() {
    let f = fixture();
    std::fs::create_dir_all(f.socket.parent().unwrap()).unwrap();
    // Stale: a socket file nobody listens on.
    drop(UnixListener::bind(&f.socket).unwrap());
    assert!(f.socket.exists());
    let h = start(config(&f));
    assert_eq!(
        client::call(&f.socket, "health", None).unwrap()["status"],
        "ok"
    );
    // Live: a second server on the same path is refused and the first keeps working.
    let second = RpcServer::builder(config(&f)).build().unwrap().start();
    assert!(
        matches!(second, Err(ServeError::InUse(_))),
        "{:?}",
        second.err()
    );
    assert_eq!(
        client::call(&f.socket, "health", None).unwrap()["status"],
        "ok"
    );
    // Shutdown removes the socket and ends open connections.
    let mut open = Raw::connect(&f.socket);
    h.shutdown();
    assert!(!f.socket.exists(), "socket removed at shutdown");
    open.expect_closed();
    let e = client::call(&f.socket, "health", None).unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    // Foreign: a regular file is never replaced.
    std::fs::write(&f.socket, b"precious").unwrap();
    let e = RpcServer::builder(config(&f))
        .build()
        .unwrap()
        .start()
        .err()
        .unwrap();
    assert!(matches!(e, ServeError::NotASocket(_)), "{e}");
    assert_eq!(std::fs::read(&f.socket).unwrap(), b"precious");
}

#[test]
fn shutdown_delivers_the_response_of_a_running_handler() {
    let f = fixture();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let started_tx = std::sync::Mutex::new(started_tx);
    let h = RpcServer::builder(config(&f))
        .method("ns.slow_delete", Role::Admin, move |_, _| {
            let _ = started_tx.lock().unwrap().send(());
            std::thread::sleep(Duration::from_millis(200));
            Ok(json!({"deleted": 1}))
        })
        .build()
        .unwrap()
        .start()
        .unwrap();
    let idle = Raw::connect(&f.socket);
    let socket = f.socket.clone();
    let caller = std::thread::spawn(move || client::call(&socket, "ns.slow_delete", None));
    started_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("handler started");
    h.shutdown();
    assert_eq!(caller.join().unwrap().unwrap(), json!({"deleted": 1}));
    let mut idle = idle;
    idle.expect_closed();
    assert!(!f.socket.exists());
}

#[test]
fn configured_mode_and_build_errors() {
    let f = fixture();
    let cfg = RpcConfig {
        socket_mode: SocketMode(0o600),
        ..config(&f)
    };
    let h = start(cfg);
    assert_eq!(
        std::fs::metadata(&f.socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
    h.shutdown();
    // Crypto methods need an audit sink.
    let cfg = RpcConfig {
        audit_log: None,
        ..config(&f)
    };
    let e = RpcServer::builder(cfg)
        .method("k", Role::Crypto, |_, _| Ok(Value::Null))
        .build()
        .err()
        .unwrap();
    assert!(matches!(e, ServeError::NoAuditSink), "{e}");
    let e = RpcServer::builder(config(&f))
        .method("a", Role::Viewer, |_, _| Ok(Value::Null))
        .method("a", Role::Viewer, |_, _| Ok(Value::Null))
        .build()
        .err()
        .unwrap();
    assert!(matches!(e, ServeError::Registration(_)), "{e}");
    let e = RpcServer::builder(config(&f))
        .method("health", Role::Viewer, |_, _| Ok(Value::Null))
        .build()
        .err()
        .unwrap();
    assert!(matches!(e, ServeError::Registration(_)), "{e}");
    let e = RpcServer::builder(RpcConfig {
        max_connections: 0,
        ..config(&f)
    })
    .build()
    .err()
    .unwrap();
    assert!(matches!(e, ServeError::Config(_)), "{e}");
}

#[test]
fn cli_helper_prints_pretty_json_and_maps_exit_codes() {
    let f = fixture();
    let h = start(config(&f));
    let opts = ClientOptions::default();
    let run = |method: &str, params: Option<&str>, socket: &Path| {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = client::run_cli(socket, method, params, &opts, &mut out, &mut err);
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    };
    let (code, out, err) = run("ns.delete", Some(r#"{"nsid": 4}"#), &f.socket);
    assert_eq!((code, err.as_str()), (0, ""));
    assert_eq!(out, "{\n  \"deleted\": 4\n}\n");
    let (code, out, err) = run("ns.delete", Some(r#"{"nsid": 9}"#), &f.socket);
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(
        err.starts_with("error -32002: namespace not found: 9"),
        "{err}"
    );
    let (code, _, err) = run("ns.delete", Some("{nsid: 4"), &f.socket);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run("ns.delete", Some("4"), &f.socket);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run("health", None, &f.dir.join("absent.sock"));
    assert_eq!(code, 3);
    assert!(err.contains("cannot connect"), "{err}");
    // A server that accepts but never answers: the read timeout gives exit code 3.
    let silent_path = f.dir.join("silent.sock");
    let _silent = UnixListener::bind(&silent_path).unwrap();
    let quick = ClientOptions {
        read_timeout: Duration::from_millis(200),
        ..ClientOptions::default()
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = client::run_cli(&silent_path, "health", None, &quick, &mut out, &mut err);
    assert_eq!(code, 3, "{}", String::from_utf8_lossy(&err));
    h.shutdown();
}
