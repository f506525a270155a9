//! Build script: records the git revision for `nvseal --version`-style reports (support bundles,
//! JSON outputs), so a result can always be traced to the code that produced it.
//!
//! The optional SPDK binding (bindgen over our own C shim in `vendor/`) is not part of this
//! build yet; when it lands it is generated here behind a cargo feature.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/index");
    let rev = Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=NVSEAL_GIT_REV={rev}");
}
