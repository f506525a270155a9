//! Issue 18 ("Operator trust"), items 7-11: what an operator sees from `config check`, `serve`,
//! `bundle`, `bdevperf` and `perf` when something is wrong. Each test runs the real binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn nvseal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nvseal"))
        .args(args)
        .env("NVSEAL_LOG", "info")
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh directory for one test.
fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nvseal-ops-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_cfg(dir: &Path, yaml: &str) -> PathBuf {
    let p = dir.join("cfg.yaml");
    std::fs::write(&p, yaml).unwrap();
    p
}

/// Item 7: a config `serve` cannot run is refused by `config check` and by `serve` alike, with
/// the same located message and exit 2, and `serve` refuses it before it creates a file.
#[test]
fn config_check_and_serve_refuse_the_same_configs_before_opening_anything() {
    let dir = tmp_dir("check");
    let img = dir.join("disk.img");
    let base = format!(
        "bdevs:\n  - name: f\n    type: uring\n    path: {}\n    size_bytes: 67108864\n    direct: false\nsubsystems:\n  - nqn: nqn.2026-12.io.nvseal:ops\n    serial: OPS1\n    allowed_hosts:\n      - nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001\n    listen:\n      - addr: 127.0.0.1\n        port: 0\n    namespaces:\n      - nsid: 1\n        bdev: f\n",
        img.display()
    );
    let cases = [
        (
            format!("{base}      - nsid: 1\n        bdev: f\n"),
            "cfg.yaml:18:15: subsystems[0].namespaces[1].nsid",
        ),
        (
            base.replace("serial: OPS1", "serial: OPS1-this-serial-is-too-long"),
            "cfg.yaml:9:13: subsystems[0].serial",
        ),
        (
            base.replace("nsid: 1\n", "nsid: 0\n"),
            "cfg.yaml:16:15: subsystems[0].namespaces[0].nsid",
        ),
        (
            base.replace("nqn.2026-12.io.nvseal:ops", "ops-volume"),
            "cfg.yaml:8:10: subsystems[0].nqn",
        ),
        (
            base.replace("size_bytes: 67108864", "size_bytes: 67108865"),
            "cfg.yaml:5:17: bdevs[0].size_bytes",
        ),
        (
            format!("reactor:\n  cores: \"4095\"\n{base}"),
            "cfg.yaml:2:10: reactor.cores",
        ),
        (
            format!(
                "keys:\n  audit_log: {}/no/dir/audit.jsonl\n{base}",
                dir.display()
            ),
            "cfg.yaml:2:14: keys.audit_log",
        ),
    ];
    for (yaml, want) in &cases {
        let cfg = write_cfg(&dir, yaml);
        let check = nvseal(&["config", "check", cfg.to_str().unwrap()]);
        assert_eq!(
            check.status.code(),
            Some(2),
            "config check: {}",
            stderr(&check)
        );
        assert!(
            stderr(&check).contains(want),
            "want {want}: {}",
            stderr(&check)
        );
        let serve = nvseal(&["serve", "-c", cfg.to_str().unwrap()]);
        assert_eq!(serve.status.code(), Some(2), "serve: {}", stderr(&serve));
        assert!(
            stderr(&serve).contains(want),
            "want {want}: {}",
            stderr(&serve)
        );
        assert!(
            !stderr(&serve).contains("NVMe/TCP listening"),
            "{}",
            stderr(&serve)
        );
        assert!(
            !img.exists(),
            "serve created {} for a config it refused",
            img.display()
        );
    }
    // The same config, fixed, passes; no subsystem listening is worth a warning, not an error.
    let cfg = write_cfg(
        &dir,
        &base.replace(
            "    listen:\n      - addr: 127.0.0.1\n        port: 0\n",
            "",
        ),
    );
    let check = nvseal(&["config", "check", cfg.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(0), "{}", stderr(&check));
    assert!(
        stderr(&check).contains("warning: ") && stderr(&check).contains("no listen address"),
        "{}",
        stderr(&check)
    );
    assert!(!img.exists(), "config check creates nothing");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Item 10: `bdevperf --verify` on a null bdev (which stores nothing) is refused, not passed
/// (plaintext) or reported as a plaintext leak (encrypted).
#[test]
fn bdevperf_refuses_verify_on_null() {
    for extra in [&[][..], &["--encrypted"][..]] {
        let mut args = vec![
            "bdevperf",
            "--null",
            "64M",
            "--verify",
            "-w",
            "write",
            "-o",
            "4k",
            "-q",
            "4",
            "-n",
            "64",
            "--no-progress",
        ];
        args.extend_from_slice(extra);
        let o = nvseal(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("--verify needs a bdev that stores data"),
            "{}",
            stderr(&o)
        );
    }
    // Verify on a RAM disk still runs.
    let o = nvseal(&[
        "bdevperf",
        "--malloc",
        "16M",
        "--verify",
        "-w",
        "write",
        "-o",
        "4k",
        "-q",
        "4",
        "-n",
        "64",
        "--no-progress",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// Item 11: `serve &` then `perf`: perf retries a refused connection within
/// `--connect-timeout` instead of failing while the target is still starting.
#[test]
fn perf_waits_for_a_target_that_is_still_starting() {
    let dir = tmp_dir("perf-retry");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let host = "nqn.2014-08.org.nvmexpress:uuid:7e57c0de-0000-4000-8000-000000000011";
    let nqn = "nqn.2026-12.io.nvseal:retry";
    let cfg = write_cfg(
        &dir,
        &format!(
            "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 50\nbdevs:\n  - name: n0\n    type: null\n    size_bytes: 67108864\nsubsystems:\n  - nqn: {nqn}\n    serial: RETRY1\n    allowed_hosts:\n      - {host}\n    listen:\n      - addr: 127.0.0.1\n        port: {port}\n    namespaces:\n      - nsid: 1\n        bdev: n0\n"
        ),
    );
    let traddr = format!("127.0.0.1:{port}");
    let perf = Command::new(env!("CARGO_BIN_EXE_nvseal"))
        .args([
            "perf",
            "--traddr",
            &traddr,
            "--subnqn",
            nqn,
            "--hostnqn",
            host,
            "-w",
            "randread",
            "-o",
            "4k",
            "-q",
            "4",
            "-n",
            "200",
            "--connect-timeout",
            "60s",
            "--no-pin",
            "--no-progress",
        ])
        .env("NVSEAL_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Let perf meet a closed port first (what `serve &` then `perf` does), then start the target.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let mut serve = common::serve::Serve::start(&cfg);
    serve.wait_for("nvseal serving");
    let out = perf.wait_with_output().unwrap();
    serve.stop();
    assert_eq!(out.status.code(), Some(0), "perf: {}", stderr(&out));
    assert!(
        stderr(&out).contains("connection refused; retrying"),
        "perf met the closed port first: {}",
        stderr(&out)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Item 9: `nvseal bundle` names every source that failed and exits 1 (incomplete) rather than
/// 0; it prints a summary (not a debug struct); from a running target it takes the config the
/// target runs and the namespace stats.
#[test]
fn bundle_reports_failed_sources_and_fetches_the_running_config() {
    let dir = tmp_dir("bundle");
    let sock = dir.join("rpc.sock");
    let cfg = write_cfg(
        &dir,
        &format!(
            "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 50\nrpc:\n  socket_path: {}\nbdevs:\n  - name: n0\n    type: null\n    size_bytes: 67108864\nsubsystems:\n  - nqn: nqn.2026-12.io.nvseal:bundle\n    serial: BUNDLE1\n    allowed_hosts:\n      - nqn.2014-08.org.nvmexpress:uuid:7e57c0de-0000-4000-8000-000000000012\n    listen:\n      - addr: 127.0.0.1\n        port: 0\n    namespaces:\n      - nsid: 1\n        bdev: n0\n",
            sock.display()
        ),
    );
    let password = "correct horse battery";

    // Nothing answers and the log file is missing: each is named, and the exit status says so.
    let out = dir.join("dead.age");
    let o = nvseal(&[
        "bundle",
        "-o",
        out.to_str().unwrap(),
        "--password",
        password,
        "--socket",
        sock.to_str().unwrap(),
        "--log-file",
        "/nonexistent/nvseal.log",
    ]);
    let (err, text) = (stderr(&o), String::from_utf8_lossy(&o.stdout).into_owned());
    assert_eq!(o.status.code(), Some(1), "{err}");
    for source in [
        "health",
        "config.get",
        "stats.namespaces",
        "/nonexistent/nvseal.log",
    ] {
        assert!(
            err.contains(&format!("warning: bundle: {source}: ")),
            "{source}: {err}"
        );
    }
    assert!(err.contains("the bundle is incomplete"), "{err}");
    assert!(text.contains("0 of 10 calls answered"), "{text}");
    assert!(!text.contains("BundleSummary"), "no debug struct: {text}");
    assert!(out.exists(), "what could be gathered is still written");

    // A running target: its own config and every stats family go in, exit 0.
    let mut serve = common::serve::Serve::start(&cfg);
    serve.wait_for("control socket listening");
    let out = dir.join("live.age");
    let o = nvseal(&[
        "bundle",
        "-o",
        out.to_str().unwrap(),
        "--password",
        password,
        "--socket",
        sock.to_str().unwrap(),
    ]);
    serve.stop();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(text.contains("10 of 10 calls answered"), "{text}");
    assert!(text.contains("running config of the target"), "{text}");
    let entries = nvseal::bundle::read_bundle(
        &out,
        &nvseal::bundle::SecretString::from(password.to_string()),
    )
    .unwrap();
    let entry = |name: &str| {
        let (_, data) = entries
            .iter()
            .find(|(n, _)| n.ends_with(name))
            .unwrap_or_else(|| panic!("{name} in the bundle"));
        String::from_utf8_lossy(data).into_owned()
    };
    assert!(
        entry("config.yaml").contains("serial: BUNDLE1"),
        "the running config"
    );
    let stats: serde_json::Value = serde_json::from_str(&entry("stats.json")).unwrap();
    assert!(stats["stats.namespaces"].is_object(), "{stats}");
    assert!(stats["stats.nvmf"].is_object(), "{stats}");
    std::fs::remove_dir_all(&dir).unwrap();
}
