//! Test harness: real PyKMIP 0.11 servers started through `scripts/pykmip/*.sh`.
//!
//! Shared by every test binary that talks to a KMS (`tests/kmip_pykmip.rs`,
//! `tests/keymgr_*.rs`).
//!
//! Each test gets its own temporary directory, certificates and free ports; servers are killed
//! (whole process group) when their guard drops. If the PyKMIP venv is missing it is created
//! by `scripts/pykmip/setup.sh` (needs PyPI), so `cargo test` works on a fresh machine.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use nvseal::kms::{KmsCluster, ServerAddr, Timeouts, TlsMaterial};

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pykmip")
}

fn run(script: &str, args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(scripts().join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Makes sure the PyKMIP venv exists (once per test binary; setup.sh locks across binaries).
pub fn ensure_pykmip() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        run("setup.sh", &[]);
    });
}

/// A port on 127.0.0.1 for a test's KMS server that no other test process will be handed for
/// the next [`PORT_QUARANTINE`]. Tests kill a server and later restart it on the same port (KMS
/// down, then back); meanwhile its port must not become another test's server (one CI run saw
/// the key manager reach a parallel test's PyKMIP there and fail on its certificate). So ports
/// come from below the kernel's ephemeral range (`ip_local_port_range` starts at 32768 by
/// default), which `bind(…:0)` listeners never use, and every port handed out is recorded,
/// under an exclusive lock, in a file that all test processes share.
pub fn free_port() -> u16 {
    use std::io::{Read, Seek, Write};
    let path = std::env::temp_dir().join("nvseal-test-ports");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .expect("port registry");
    let _lock = nix::fcntl::Flock::lock(
        f.try_clone().expect("port registry"),
        nix::fcntl::FlockArg::LockExclusive,
    )
    .map_err(|(_, e)| e)
    .expect("lock the port registry");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut text = String::new();
    f.read_to_string(&mut text).expect("read the port registry");
    // "port unix_seconds" per line; entries older than the quarantine are forgotten.
    let mut recent: Vec<(u16, u64)> = text
        .lines()
        .filter_map(|l| {
            let (p, t) = l.split_once(' ')?;
            Some((p.parse().ok()?, t.parse().ok()?))
        })
        .filter(|&(_, t)| now.saturating_sub(t) < PORT_QUARANTINE.as_secs())
        .collect();
    let mut seed = u64::from(std::process::id()) ^ now.rotate_left(17);
    let port = (0..20_000)
        .find_map(|_| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let p = PORT_LOW + ((seed >> 33) % u64::from(PORT_HIGH - PORT_LOW)) as u16;
            if recent.iter().any(|&(q, _)| q == p) {
                return None;
            }
            // Free right now (no SO_REUSEADDR: a TIME_WAIT leftover counts as taken).
            std::net::TcpListener::bind(("127.0.0.1", p))
                .ok()
                .map(|_| p)
        })
        .expect("no free port in the test range");
    recent.push((port, now));
    let mut out = String::new();
    for (p, t) in &recent {
        out.push_str(&format!("{p} {t}\n"));
    }
    f.set_len(0).expect("rewrite the port registry");
    f.rewind().expect("rewrite the port registry");
    f.write_all(out.as_bytes())
        .expect("rewrite the port registry");
    port
}

/// How long a port handed out by [`free_port`] stays reserved for its test.
pub const PORT_QUARANTINE: std::time::Duration = std::time::Duration::from_secs(900);
/// The range [`free_port`] draws from: below the default ephemeral range.
const PORT_LOW: u16 = 20_000;
const PORT_HIGH: u16 = 32_000;

/// A temp directory holding CA, server and client certificates (see gen-certs.sh).
pub struct Certs {
    pub dir: tempfile::TempDir,
}

impl Certs {
    /// `owners`: CNs of client certificates; the first one is `client.pem`.
    pub fn generate(owners: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nvseal-kmip-")
            .tempdir()
            .unwrap();
        let mut args = vec![dir.path().to_str().unwrap()];
        args.extend_from_slice(owners);
        run("gen-certs.sh", &args);
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Client material: CA bundle `ca`, client certificate/key `client` (`client`,
    /// `client-<cn>`, `wrong-client`).
    pub fn tls(&self, ca: &str, client: &str) -> TlsMaterial {
        TlsMaterial::from_files(
            &self.path(&format!("{ca}.pem")),
            &self.path(&format!("{client}.pem")),
            &self.path(&format!("{client}.key")),
        )
        .unwrap()
    }

    pub fn good_tls(&self) -> TlsMaterial {
        self.tls("ca", "client")
    }
}

/// One running PyKMIP server; killed with its process group on drop.
pub struct PyKmip {
    pub addr: ServerAddr,
    pub dir: PathBuf,
    pgid: i32,
}

impl PyKmip {
    /// Starts a server using `certs`' CA and server certificate, in `certs/<name>/`, with the
    /// SQLite database `db` (default: its own).
    pub fn start(certs: &Certs, name: &str, db: Option<&Path>) -> Self {
        Self::start_inner(certs, name, db, None)
    }

    /// Like [`PyKmip::start`] on a given port (e.g. one reserved earlier with [`free_port`] and
    /// already written into a client configuration, or the port of a server that was killed).
    pub fn start_on(certs: &Certs, name: &str, db: Option<&Path>, port: u16) -> Self {
        Self::start_inner(certs, name, db, Some(port))
    }

    fn start_inner(certs: &Certs, name: &str, db: Option<&Path>, fixed_port: Option<u16>) -> Self {
        ensure_pykmip();
        let dir = certs.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["ca.pem", "server.pem", "server.key"] {
            std::fs::copy(certs.path(f), dir.join(f)).unwrap();
        }
        // A freshly freed port can be taken by a parallel test between our probe and the
        // server's bind; retry with another port if start.sh reports failure.
        let mut last = String::new();
        for _ in 0..3 {
            let port = fixed_port.unwrap_or_else(free_port);
            let mut args = vec![dir.to_str().unwrap().to_owned(), port.to_string()];
            if let Some(db) = db {
                args.push(db.to_str().unwrap().to_owned());
            }
            let out = Command::new("bash")
                .arg(scripts().join("start.sh"))
                .args(&args)
                .output()
                .unwrap();
            if out.status.success() {
                let pgid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
                assert!(pgid > 1);
                return Self {
                    addr: ServerAddr::new("127.0.0.1", port).unwrap(),
                    dir,
                    pgid,
                };
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
        }
        panic!("PyKMIP did not start: {last}");
    }

    /// Freezes the server (SIGSTOP): TCP connects still succeed (kernel backlog), nothing answers.
    /// Returns once every thread of the group is stopped: a busy machine can take a while to
    /// deliver the stop, and a server still running answers what should time out.
    pub fn pause(&self) {
        killpg(Pid::from_raw(self.pgid), Signal::SIGSTOP).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !self.all_stopped() {
            assert!(
                std::time::Instant::now() < deadline,
                "PyKMIP group {} not stopped 10 s after SIGSTOP",
                self.pgid
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Whether every thread of every process in the server's process group is stopped (or a
    /// zombie: neither can answer).
    fn all_stopped(&self) -> bool {
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return true;
        };
        let mut seen = false;
        for p in procs.flatten() {
            if !p
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                continue;
            }
            let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
                continue;
            };
            for t in tasks.flatten() {
                let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
                    continue;
                };
                // Fields after the parenthesised command: state, ppid, pgrp, ...
                let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                    continue;
                };
                let f: Vec<&str> = rest.split_whitespace().collect();
                if f.get(2).and_then(|g| g.parse::<i32>().ok()) != Some(self.pgid) {
                    continue;
                }
                seen = true;
                if !matches!(f.first(), Some(&"T") | Some(&"t") | Some(&"Z")) {
                    return false;
                }
            }
        }
        seen
    }

    pub fn resume(&self) {
        killpg(Pid::from_raw(self.pgid), Signal::SIGCONT).unwrap();
    }

    /// Kills the server and waits until its port refuses connections.
    pub fn kill(&self) {
        let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
        let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGCONT);
        for _ in 0..500 {
            let probe = std::net::TcpStream::connect(("127.0.0.1", self.addr.port()));
            if probe.is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!(
            "server on {} still accepts connections after SIGKILL",
            self.addr
        );
    }

    /// The server's SQLite database (its own unless one was given at start).
    pub fn db_path(&self, given: Option<&Path>) -> PathBuf {
        given.map_or_else(|| self.dir.join("pykmip.db"), Path::to_owned)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for PyKmip {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.pgid);
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = killpg(pid, Signal::SIGCONT);
    }
}

/// A cluster over `servers` with the good client certificate and the given timeouts.
pub fn cluster(certs: &Certs, servers: Vec<ServerAddr>, timeouts: Timeouts) -> KmsCluster {
    KmsCluster::new("test", servers, certs.good_tls(), timeouts).unwrap()
}

/// The KMIP State of object `id` as the server stored it (PyKMIP's SQLite database, table
/// `crypto_objects`): 1 Pre-Active, 2 Active, 3 Deactivated (revoked), 5 Destroyed. Read with
/// Python's sqlite3, so the check does not go through nvseal's own client.
pub fn kmip_state(db: &Path, id: &str) -> u32 {
    let script = "import sqlite3, sys\n\
                  c = sqlite3.connect(sys.argv[1])\n\
                  r = c.execute('select state from crypto_objects where uid = ?', (int(sys.argv[2]),)).fetchone()\n\
                  print(r[0] if r else 0)\n";
    let out = Command::new("python3")
        .args(["-c", script, db.to_str().unwrap(), id])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}
