//! Log output as a new user and a log shipper see it: `nvseal serve 2> serve.log` must write
//! plain text (no ANSI colour escapes when stderr is not a terminal), and `--log-format json`
//! must write one JSON object per line.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn config(dir: &Path) -> std::path::PathBuf {
    let cfg = dir.join("log.yaml");
    std::fs::write(
        &cfg,
        "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 50\n\
         bdevs:\n  - name: n0\n    type: null\n    size_bytes: 1048576\n\
         subsystems:\n  - nqn: nqn.2026-11.io.nvseal:logtest\n    serial: LOG1\n\
         \x20   namespaces:\n      - nsid: 1\n        bdev: n0\n\
         \x20   allowed_hosts: [\"nqn.2014-08.org.nvmexpress:uuid:log-test\"]\n\
         \x20   listen:\n      - addr: 127.0.0.1\n        port: 0\n",
    )
    .unwrap();
    cfg
}

/// Runs `nvseal [extra] serve -c CFG` with stderr into a file until it logs that it listens,
/// stops it with SIGTERM and returns the file's contents. `NO_COLOR` is removed from the
/// environment so only the terminal check can keep colour out.
fn serve_log(dir: &Path, extra: &[&str]) -> String {
    let cfg = config(dir);
    let log = dir.join(format!("serve{}.log", extra.len()));
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nvseal"))
        .args(extra)
        .args(["serve", "-c", cfg.to_str().unwrap()])
        .env_remove("NO_COLOR")
        .env_remove("NVSEAL_LOG_FORMAT")
        .env("NVSEAL_LOG", "info")
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("listening") {
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("serve exited early ({st}):\n{text}");
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("serve did not log 'listening' in 60 s:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(st.success(), "serve exit {st}:\n{text}");
    text
}

#[test]
fn serve_log_redirected_to_a_file_has_no_colour_escapes() {
    let dir = tempfile::tempdir().unwrap();
    let text = serve_log(dir.path(), &[]);
    assert!(text.lines().count() >= 2, "too few log lines:\n{text}");
    assert!(
        !text.contains('\x1b'),
        "ANSI escape in a log written to a file:\n{text:?}"
    );
    assert!(text.contains(" INFO "), "no plain INFO level in:\n{text}");
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let text = serve_log(dir.path(), &["--log-format", "json"]);
    let mut listening = false;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line:?}"));
        let o = v.as_object().expect("each line is an object");
        for k in ["timestamp", "level", "target", "message"] {
            assert!(o.contains_key(k), "no {k:?} in {line}");
        }
        if o["message"].as_str().unwrap_or("").contains("listening") {
            // Structured fields stay fields, not text folded into the message.
            assert!(
                o.contains_key("addr"),
                "listening line without addr: {line}"
            );
            listening = true;
        }
    }
    assert!(listening, "no listening line in:\n{text}");
    assert!(!text.contains('\x1b'));
}
