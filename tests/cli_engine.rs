//! The real `nvseal` binary: bdevperf runs (plain, encrypted, A/B, verify), config errors,
//! and `serve` starting on the built-in default config and stopping cleanly on SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn nvseal() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nvseal"));
    c.env("NVSEAL_LOG", "warn");
    c
}

fn run_json(args: &[&str]) -> serde_json::Value {
    let out = nvseal()
        .args(args)
        .args(["--json", "-", "--no-progress", "--reactors", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nvseal {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn bdevperf_ab_on_malloc_reports_both_sides() {
    let r = run_json(&[
        "bdevperf", "--malloc", "64M", "-w", "randrw", "-M", "50", "-o", "4k", "-q", "8", "-t",
        "400ms", "--slice", "100ms", "--ab",
    ]);
    let sides = r["sides"].as_array().unwrap();
    assert_eq!(sides.len(), 2);
    assert_eq!(sides[0]["label"], "plaintext");
    assert_eq!(sides[1]["label"], "encrypted");
    for s in sides {
        assert!(s["ios"].as_u64().unwrap() > 100, "{s}");
        assert_eq!(s["io_errors"], 0);
        assert!(s["read"]["ios"].as_u64().unwrap() > 0 && s["write"]["ios"].as_u64().unwrap() > 0);
        assert!(
            s["latency_us"]["p99"].as_f64().unwrap() >= s["latency_us"]["p50"].as_f64().unwrap()
        );
    }
    assert!(
        r["ratio_encrypted_over_plaintext"]["iops"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(r["xts_kernel"]["hot_ns"].as_f64().unwrap() > 0.0);
    assert!(r["xts_kernel"]["working_set_ns"].as_f64().unwrap() > 0.0);
    assert!(r["xts_tier"].is_string());
}

#[test]
fn bdevperf_verify_through_crypto_on_a_real_file_every_tier() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let img = dir.path().join("disk.img");
    for tier in ["soft", "aesni", "vaes256", "vaes512"] {
        let t = tier.parse::<nvseal::crypto::xts::Tier>().unwrap();
        if !t.is_available() {
            eprintln!("tier {tier} not available on this CPU: skipped");
            continue;
        }
        let r = run_json(&[
            "bdevperf",
            "--uring",
            img.to_str().unwrap(),
            "--size",
            "16M",
            "-w",
            "write",
            "-o",
            "16k",
            "-q",
            "4",
            "-n",
            "150",
            "--verify",
            "--encrypted",
            "--max-tier",
            tier,
        ]);
        let s = &r["sides"][0];
        assert_eq!(s["label"], "encrypted");
        assert_eq!(r["xts_tier"], tier);
        // write + read-back + raw read of the backend, for every I/O
        assert_eq!(s["ios"].as_u64().unwrap(), 150 * 3, "{s}");
        assert_eq!(s["verify_mismatches"], 0);
        assert_eq!(s["plaintext_leaks"], 0);
    }
}

#[test]
fn bdevperf_verify_plaintext_and_null_speed_run() {
    let r = run_json(&[
        "bdevperf",
        "--malloc",
        "32M",
        "-w",
        "randwrite",
        "-o",
        "8k",
        "-q",
        "16",
        "-n",
        "2000",
        "--verify",
    ]);
    assert_eq!(r["sides"][0]["verify_mismatches"], 0);
    let r = run_json(&[
        "bdevperf", "--null", "1G", "-w", "randread", "-q", "32", "-t", "200ms",
    ]);
    assert!(r["sides"][0]["iops"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_usage_and_config_exit_2_with_position() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(&cfg, "reactor:\n  cores: 1\nbdevs:\n  - name: e\n    type: crypto\n    base: nothere\n    key: ephemeral\n").unwrap();
    let out = nvseal()
        .args(["config", "check", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml:6:11: bdevs[0].base: no bdev named \"nothere\""),
        "{err}"
    );
    let out = nvseal()
        .args(["serve", "-c", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = nvseal()
        .args(["bdevperf", "--malloc", "1M", "-o", "3000", "-t", "1"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = nvseal()
        .args(["bdevperf", "--malloc", "1M", "--cores", "4096"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("core 4096"));
    let out = nvseal().args(["bdevperf"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = nvseal()
        .args(["config", "check", "configs/default.yaml"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// Kills a still-running child when a test fails part-way (a leaked `serve` would hold the
/// default port for every later run).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn serve_default_config_starts_and_stops_on_sigterm() {
    let mut guard = KillOnDrop(
        nvseal()
            .args(["serve"])
            .env("NVSEAL_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let child = &mut guard.0;
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // Wait until it says it is serving and the encrypted namespace is online (its unlock runs
    // on its own thread and may finish after "serving"), then stop it the way an init system
    // would.
    let t0 = Instant::now();
    let (mut serving, mut online) = (false, false);
    while !(serving && online) {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.contains("nvseal serving") => serving = true,
            Ok(l) if l.contains("encrypted namespace online") => online = true,
            Ok(_) => {}
            Err(e) => {
                // Say what serve said: it exited (the channel closed) or went quiet.
                let _ = child.kill();
                let _ = child.wait();
                drop(rx);
                let said = reader.join().unwrap_or_default();
                panic!("serve never reported serving with its namespace online ({e}); it said:\n{said}");
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(30));
    }
    assert!(child.try_wait().unwrap().is_none(), "serve exited early");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = reader.join().unwrap();
    assert!(status.success(), "{status}\n{log}");
    assert!(log.contains("nvseal serving"), "{log}");
    assert!(
        log.contains("encrypted namespace online") && log.contains("vol1"),
        "{log}"
    );
    assert!(
        log.contains("NOT FOR PRODUCTION"),
        "the local key provider must warn loudly: {log}"
    );
    assert!(log.contains("stopped"), "{log}");
}

#[test]
fn every_command_has_help() {
    for cmd in [
        &["--help"][..],
        &["serve", "--help"],
        &["bdevperf", "--help"],
        &["perf", "--help"],
        &["rpc", "--help"],
        &["bundle", "--help"],
        &["config", "--help"],
        &["config", "check", "--help"],
    ] {
        let out = nvseal().args(cmd).output().unwrap();
        assert!(
            out.status.success(),
            "nvseal {cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "nvseal {cmd:?}"
        );
    }
}
