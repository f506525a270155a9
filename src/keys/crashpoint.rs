//! Named crash points for the SIGKILL crash tests of conversions (docs/lifecycle.md §6).
//!
//! A conversion calls [`hit`] at each step boundary that matters for crash safety (journal
//! written, journal flushed, half a segment written back, segment written, header updated, the
//! last copy of a finished header). When the environment variable `NVSEAL_CRASH_AT` is set to
//! `NAME:N`, the Nth hit of point `NAME` in this process sends the process SIGKILL: it dies
//! between two syscalls exactly there, as a power loss or an OOM kill would leave it. Unset (the
//! normal case) a hit costs one relaxed atomic load.
//!
//! This is a test hook in the shipped binary on purpose: the crash tests must kill the real
//! `nvseal serve`, not a special build. It can do nothing an attacker who controls the
//! process's environment could not do anyway (kill it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable.
pub const ENV: &str = "NVSEAL_CRASH_AT";

/// Every crash point, for the tests and the docs.
pub const POINTS: &[&str] = &[
    "journal-data",
    "journal-flushed",
    "segment-half",
    "segment-written",
    "header-updated",
    "finish-first-copy",
    "plain-copy-a",
];

struct Armed {
    name: String,
    nth: u64,
    hits: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var(ENV).ok()?;
            let (name, n) = v.split_once(':')?;
            let nth: u64 = n.parse().ok().filter(|&n| n > 0)?;
            if !POINTS.contains(&name) {
                tracing::warn!(value = %v, "{ENV}: unknown crash point; ignored");
                return None;
            }
            tracing::warn!(
                point = name,
                nth,
                "{ENV} is set: this process kills itself there"
            );
            Some(Armed {
                name: name.to_owned(),
                nth,
                hits: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Whether the armed point is `name` (the caller then splits a step to reach the point, e.g.
/// writes half a segment first).
pub fn is_armed(name: &str) -> bool {
    armed().is_some_and(|a| a.name == name)
}

/// Crash point `name`: dies here by SIGKILL on the armed hit.
pub fn hit(name: &'static str) {
    let Some(a) = armed() else {
        return;
    };
    if a.name != name {
        return;
    }
    if a.hits.fetch_add(1, Ordering::SeqCst) + 1 == a.nth {
        tracing::warn!(point = name, nth = a.nth, "crash point reached: SIGKILL");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
