//! Key safety at the process level (issue 11 items 3 and 9), with the real binary:
//! * `nvseal serve` refuses to start when key memory cannot be locked (RLIMIT_MEMLOCK lowered to
//!   0 and CAP_IPC_LOCK dropped in the child with util-linux `prlimit` and `setpriv`), unless
//!   `keys.allow_unlocked_memory: true`;
//! * a file-backed namespace whose header copies are blank but whose data area is not goes to
//!   `error` under `serve` (the message names `nvseal format --force`), and nothing is written;
//!   `nvseal format` refuses it without `--force`, formats it with `--force` (data area
//!   untouched), and refuses a formatted device even with `--force`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2026-11.io.nvseal:keys-safety";
const HOST_NQN: &str = "nqn.2026-11.io.nvseal:keys-safety-host";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_nvseal")
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A child whose stderr is collected line by line.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .env("NVSEAL_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let err = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines: rx,
            log: Vec::new(),
        }
    }

    /// Waits for a line containing `what`, or for the process to exit (then returns None).
    fn wait_for(&mut self, what: &str) -> Option<String> {
        if let Some(l) = self.log.iter().find(|l| l.contains(what)) {
            return Some(l.clone());
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => {
                    self.log.push(l.clone());
                    if l.contains(what) {
                        return Some(l);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
        panic!("no {what:?} within 60 s:\n{}", self.log.join("\n"));
    }

    /// SIGTERM, wait, and return the exit code.
    fn stop(mut self) -> Option<i32> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let st = self.child.wait().expect("wait");
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(300)) {
            self.log.push(l);
        }
        st.code()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A serve config: one encrypted RAM namespace with a local key file in `dir`.
fn ram_config(dir: &Path, allow_unlocked: bool) -> PathBuf {
    let cfg = dir.join(format!("ram-{allow_unlocked}.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 50\n\
             keys:\n  local:\n    path: {keys}\n    create: true\n  allow_unlocked_memory: {allow_unlocked}\n\
             bdevs:\n  - name: mem1\n    type: malloc\n    size_bytes: 5242880\n    block_size: 4096\n\
             \x20 - name: vol1\n    type: encrypted\n    base: mem1\n    provider: local\n    create: true\n\
             subsystems:\n  - nqn: {NQN}\n    serial: KS1\n    allowed_hosts: [\"{HOST_NQN}\"]\n    namespaces:\n      - nsid: 1\n        bdev: vol1\n        encrypted: true\n    listen:\n      - addr: 127.0.0.1\n        port: 0\n",
            keys = dir.join("keys").display(),
        ),
    )
    .expect("write config");
    cfg
}

/// `serve -c cfg` with RLIMIT_MEMLOCK 0 and without CAP_IPC_LOCK (root ignores the limit
/// with it): every mlock fails, as on a host whose limit is too low.
fn serve_unable_to_lock(cfg: &Path) -> Proc {
    let mut cmd = Command::new("prlimit");
    cmd.args([
        "--memlock=0:0",
        "--",
        "setpriv",
        "--bounding-set=-ipc_lock",
        "--",
    ])
    .arg(bin())
    .args(["serve", "-c"])
    .arg(cfg);
    Proc::spawn(cmd)
}

#[test]
fn mlock_failure_is_a_startup_error_unless_allowed() {
    assert!(
        have("prlimit") && have("setpriv"),
        "util-linux prlimit and setpriv are needed (apt-get install util-linux)"
    );
    let dir = tempfile::tempdir().expect("tempdir");

    let mut refused = serve_unable_to_lock(&ram_config(dir.path(), false));
    let never = refused.wait_for("nvseal serving");
    assert!(
        never.is_none(),
        "serve started although key memory cannot be locked:\n{}",
        refused.log.join("\n")
    );
    let code = refused.child.wait().expect("wait").code();
    let log = refused.log.join("\n");
    assert_eq!(code, Some(3), "start-up failure exit code:\n{log}");
    assert!(log.contains("cannot lock key memory"), "{log}");
    assert!(log.contains("allow_unlocked_memory"), "{log}");

    let mut allowed = serve_unable_to_lock(&ram_config(dir.path(), true));
    assert!(
        allowed.wait_for("encrypted namespace online").is_some(),
        "serve with allow_unlocked_memory did not bring the namespace online:\n{}",
        allowed.log.join("\n")
    );
    let log = allowed.log.join("\n");
    assert!(log.contains("keys may be swapped out"), "{log}");
    assert_eq!(allowed.stop(), Some(0));
}

/// A file-backed encrypted namespace (no O_DIRECT, so any filesystem works) and a control
/// socket, in `dir`.
fn file_config(dir: &Path, img: &Path) -> PathBuf {
    let cfg = dir.join("file.yaml");
    std::fs::write(
        &cfg,
        format!(
            "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 50\n\
             keys:\n  local:\n    path: {keys}\n    create: true\n  audit_log: {audit}\n\
             rpc:\n  socket_path: {sock}\n\
             bdevs:\n  - name: disk1\n    type: uring\n    path: {img}\n    direct: false\n    block_size: 4096\n\
             \x20 - name: vol1\n    type: encrypted\n    base: disk1\n    provider: local\n    create: true\n\
             subsystems:\n  - nqn: {NQN}\n    serial: KS2\n    allowed_hosts: [\"{HOST_NQN}\"]\n    namespaces:\n      - nsid: 1\n        bdev: vol1\n        encrypted: true\n    listen:\n      - addr: 127.0.0.1\n        port: 0\n",
            keys = dir.join("keys").display(),
            audit = dir.join("audit.jsonl").display(),
            sock = dir.join("rpc.sock").display(),
            img = img.display(),
        ),
    )
    .expect("write config");
    cfg
}

fn format(cfg: &Path, force: bool) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(["format", "-c"])
        .arg(cfg)
        .args(["--bdev", "vol1"])
        .env("NO_COLOR", "1");
    if force {
        cmd.arg("--force");
    }
    cmd.output().expect("run nvseal format")
}

/// 1 MiB metadata region + 2 MiB data area: a blank metadata region (a wiped header) in front
/// of data that looks like ciphertext.
fn wiped_image(path: &Path) -> Vec<u8> {
    let mut bytes = vec![0u8; 3 << 20];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for b in bytes[1 << 20..].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(path, &bytes).expect("write image");
    bytes
}

#[test]
fn wiped_header_over_data_goes_to_error_and_only_format_force_formats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk1.img");
    let original = wiped_image(&img);
    let cfg = file_config(dir.path(), &img);

    // serve: the namespace goes to error, naming the way out; nothing is written.
    let mut s = Proc::spawn({
        let mut c = Command::new(bin());
        c.args(["serve", "-c"]).arg(&cfg);
        c
    });
    let line = s
        .wait_for("namespace key state: error")
        .unwrap_or_else(|| panic!("serve exited:\n{}", s.log.join("\n")));
    assert!(
        line.contains("nvseal format --force -c <config> --bdev vol1"),
        "{line}"
    );
    assert!(line.contains("the data area holds data"), "{line}");
    assert!(s.wait_for("nvseal serving").is_some());
    // While serve runs (its control socket answers), the offline tool refuses to touch it.
    let busy = format(&cfg, true);
    assert_eq!(busy.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("stop it before formatting"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    assert_eq!(s.stop(), Some(0));
    assert!(
        std::fs::read(&img).expect("read") == original,
        "serve wrote to the device"
    );

    // format without --force: refused, nothing written.
    let out = format(&cfg, false);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("format refused"), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert!(
        std::fs::read(&img).expect("read") == original,
        "refused format wrote"
    );

    // format --force: formatted; the data area is untouched.
    let out = format(&cfg, true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["forced"], true);
    assert_eq!(report["ns_id"], "vol1");
    assert_eq!(report["kek_provider"], "local");
    assert_eq!(report["data_blocks"], (2 << 20) / 4096);
    let now = std::fs::read(&img).expect("read");
    assert_eq!(&now[..8], b"NVSEALHD");
    assert!(
        now[1 << 20..] == original[1 << 20..],
        "the data area was written"
    );
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).expect("audit log");
    assert!(
        audit.contains("forced over: the data area holds data"),
        "{audit}"
    );

    // serve now opens it.
    let mut s = Proc::spawn({
        let mut c = Command::new(bin());
        c.args(["serve", "-c"]).arg(&cfg);
        c
    });
    assert!(
        s.wait_for("encrypted namespace online").is_some(),
        "{}",
        s.log.join("\n")
    );
    assert_eq!(s.stop(), Some(0));

    // A formatted device is never formatted over, --force or not.
    let before = std::fs::read(&img).expect("read");
    let out = format(&cfg, true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("holds an nvseal header"), "{err}");
    assert!(std::fs::read(&img).expect("read") == before);
}
