//! The QEMU/TCG guest harness (scripts/qemu/) as the Linux-side tests use it.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds (or checks) the QEMU harness. Returns false only when the run is explicitly skipped.
pub fn harness_ready() -> bool {
    if std::env::var("NVSEAL_SKIP_QEMU").as_deref() == Ok("1") {
        eprintln!(
            "\n{bar}\n!! NVSEAL_SKIP_QEMU=1: this QEMU guest test is SKIPPED.\n\
             !! Nothing was checked against the real Linux NVMe/TCP host or target.\n{bar}\n",
            bar = "!".repeat(72)
        );
        return false;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "the QEMU guest tests need root to build their harness \
         (scripts/qemu/setup.sh uses apt-get, mknod and chroot). Run the suite as root \
         (scripts/test.sh), or set NVSEAL_SKIP_QEMU=1 to skip this test explicitly."
    );
    let t0 = Instant::now();
    let out = Command::new("bash")
        .arg(repo().join("scripts/qemu/setup.sh"))
        .output()
        .expect("cannot run bash scripts/qemu/setup.sh");
    assert!(
        out.status.success(),
        "scripts/qemu/setup.sh failed ({}): the QEMU harness for the Linux guest tests \
         could not be built.\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "harness ready in {:.1} s: {}",
        t0.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    true
}

/// A one-route HTTP server on the host's loopback: `GET /done` answers 404 until [`Done::set`],
/// then 200. A guest script polls it (busybox wget via 10.0.2.2) to learn that the host is
/// finished with what the guest serves.
pub struct Done {
    pub port: u16,
    flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Done {
    pub fn start() -> Done {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = flag.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
                let mut req = [0u8; 1024];
                let _ = s.read(&mut req);
                let reply = if f.load(Ordering::SeqCst) {
                    "HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\ndone\n"
                } else {
                    "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n"
                };
                let _ = s.write_all(reply.as_bytes());
            }
        });
        Done { port, flag }
    }

    /// The URL the guest polls.
    pub fn url(&self) -> String {
        format!("http://10.0.2.2:{}/done", self.port)
    }

    pub fn set(&self) {
        self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A guest booted by scripts/qemu/run-guest.sh; killed if the test ends early.
pub struct Guest {
    child: Option<std::process::Child>,
    pub log: PathBuf,
    started: Instant,
}

impl Guest {
    /// Boots the guest running `script` (killed after `timeout_s`) with its console in `log`
    /// and the extra run-guest.sh environment `env` (NVSEAL_QEMU_HOSTFWD, …).
    pub fn start(
        script: &std::path::Path,
        timeout_s: u32,
        log: PathBuf,
        env: &[(&str, String)],
    ) -> Guest {
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("scripts/qemu/run-guest.sh"))
            .arg(script)
            .arg(timeout_s.to_string())
            .env("NVSEAL_QEMU_LOG", &log)
            .env("NVSEAL_QEMU_ECHO", "0")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("cannot run scripts/qemu/run-guest.sh");
        Guest {
            child: Some(child),
            log,
            started: Instant::now(),
        }
    }

    /// The console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the console shows `ready`; panics with the console if it shows `fail`, the
    /// guest stops, or `limit_s` pass first.
    pub fn wait_for(&mut self, ready: &str, fail: &str, limit_s: u64) {
        loop {
            let c = self.console();
            if c.contains(ready) {
                return;
            }
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none() && !c.contains(fail) && self.started.elapsed().as_secs() < limit_s,
                "the guest did not get to {ready:?} ({exited:?} after {:.0} s):\n{c}",
                self.started.elapsed().as_secs_f64()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// Seconds since boot began.
    pub fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Waits for run-guest.sh to end; prints the console and returns it with the exit status
    /// and run-guest.sh's own stderr.
    pub fn finish(mut self) -> (std::process::ExitStatus, String, String) {
        let out = self.child.take().unwrap().wait_with_output().unwrap();
        let c = self.console();
        println!("---- guest console ----\n{c}\n---- end of guest console ----");
        (
            out.status,
            c,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
