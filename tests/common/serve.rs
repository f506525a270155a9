//! `nvseal serve` as a child process for end-to-end tests: start it on a config, wait for log
//! lines, stop it with SIGTERM and check it exits 0; a failing test never leaves it running.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running `nvseal serve` child whose stderr is read line by line.
pub struct Serve {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line read so far.
    pub log: Vec<String>,
}

impl Serve {
    /// Starts `nvseal serve -c CFG` with `NVSEAL_LOG=info`.
    pub fn start(cfg: &Path) -> Serve {
        Serve::start_with_log(cfg, "info")
    }

    /// Starts `nvseal serve -c CFG` with the given log filter.
    pub fn start_with_log(cfg: &Path, filter: &str) -> Serve {
        Serve::start_env(cfg, filter, &[])
    }

    /// Starts `nvseal serve -c CFG` with the given log filter and extra environment.
    pub fn start_env(cfg: &Path, filter: &str, env: &[(&str, &str)]) -> Serve {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nvseal"))
            .args(["serve", "-c", cfg.to_str().unwrap()])
            .envs(env.iter().copied())
            .env("NVSEAL_LOG", filter)
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

    /// Waits for a log line containing `what` (or finds one already received); returns it.
    pub fn wait_for(&mut self, what: &str) -> String {
        if let Some(l) = self.log.iter().find(|l| l.contains(what)) {
            return l.clone();
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => {
                    self.log.push(l.clone());
                    if l.contains(what) {
                        return l;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => self.assert_running(what),
                Err(_) => break,
            }
        }
        panic!("no {what:?} in serve's log:\n{}", self.log.join("\n"));
    }

    /// Like [`Serve::wait_for`], but `None` (no panic) if the process exits first or `timeout`
    /// passes (crash tests, where the process may kill itself at any point).
    pub fn try_wait_for(&mut self, what: &str, timeout: Duration) -> Option<String> {
        if let Some(l) = self.log.iter().find(|l| l.contains(what)) {
            return Some(l.clone());
        }
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => {
                    self.log.push(l.clone());
                    if l.contains(what) {
                        return Some(l);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) if self.exited() => return None,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => return None,
            }
        }
        None
    }

    /// Moves every log line received so far into `self.log`.
    pub fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.log.push(l);
        }
    }

    pub fn assert_running(&mut self, when: &str) {
        if let Some(s) = self.child.try_wait().unwrap() {
            self.drain();
            panic!("serve exited ({s}) {when}:\n{}", self.log.join("\n"));
        }
    }

    /// Whether the process has exited (e.g. killed itself at a crash point).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// SIGKILL (if still running) and reap; returns the log.
    pub fn kill9(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(100)) {
            self.log.push(l);
        }
        std::mem::take(&mut self.log)
    }

    pub fn stop(mut self) -> Vec<String> {
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

impl Drop for Serve {
    fn drop(&mut self) {
        // A failing test must not leave serve running (stop() has already reaped it).
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The socket address in a "NVMe/TCP listening addr=..." log line.
pub fn addr_of(line: &str) -> SocketAddr {
    let i = line.find("addr=").expect("addr= in listening line") + 5;
    line[i..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}
