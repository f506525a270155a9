//! A reactor that panics must take the process down (logged, exit status 70) instead of dying
//! silently while the rest of the process looks healthy.
//!
//! The test re-runs its own test binary as a child (selected by an environment variable), so
//! the process that exits is the child, not the test harness.

use std::process::Command;
use std::time::Duration;

use nvseal::reactor::{ReactorOptions, ReactorSet, EXIT_REACTOR_PANIC};
use nvseal::types::CoreId;

const CHILD_ENV: &str = "NVSEAL_REACTOR_PANIC_CHILD";

/// Child side: two reactors; the second panics in a message handler. The first keeps polling;
/// without the fatal handling the process would sleep here and exit 0 at the end.
fn child() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let opts = ReactorOptions {
        pin: false,
        idle_backoff_us: 100,
        ..Default::default()
    };
    let set = ReactorSet::start(&[CoreId(0), CoreId(1)], &opts).expect("reactors start");
    set.call(0, |_| ()).expect("reactor 0 answers");
    set.send(1, Box::new(|_| panic!("injected reactor fault")))
        .expect("message queued");
    std::thread::sleep(Duration::from_secs(20));
    eprintln!("CHILD SURVIVED THE REACTOR PANIC");
    set.shutdown();
    std::process::exit(0);
}

#[test]
fn a_reactor_panic_exits_the_process_with_status_70() {
    if std::env::var_os(CHILD_ENV).is_some() {
        child();
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_reactor_panic_exits_the_process_with_status_70",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(EXIT_REACTOR_PANIC),
        "child status {:?}, stderr:\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("CHILD SURVIVED"), "{stderr}");
    assert!(stderr.contains("injected reactor fault"), "{stderr}");
    assert!(
        stderr.contains("reactor panicked") && stderr.contains("reactor=1"),
        "no error log naming the reactor:\n{stderr}"
    );
}
