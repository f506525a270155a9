//! Pinning threads to CPUs, and asking which CPUs exist.

use crate::types::CoreId;
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// CPUs this process may run on (its affinity mask at start-up).
pub fn allowed_cpus() -> Vec<CoreId> {
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .map(CoreId)
            .collect(),
        Err(_) => (0..std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1))
            .map(CoreId)
            .collect(),
    }
}

/// Pins the calling thread to `core`.
pub fn pin_current_thread(core: CoreId) -> Result<(), String> {
    let mut set = CpuSet::new();
    set.set(core.0).map_err(|e| format!("cpu {core}: {e}"))?;
    sched_setaffinity(Pid::from_raw(0), &set)
        .map_err(|e| format!("cpu {core}: sched_setaffinity: {e}"))
}
