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
