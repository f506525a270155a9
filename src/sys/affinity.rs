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

/// Keeps the calling thread off `cores` (the reactors' CPUs): its affinity becomes the CPUs it
/// may run on now minus those. Returns false (and changes nothing) when that would leave none.
/// A control thread woken by a reactor is otherwise often placed on the waker's CPU, where it
/// takes turns with a poll loop that never yields.
pub fn avoid_cores(cores: &[CoreId]) -> Result<bool, String> {
    let now = sched_getaffinity(Pid::from_raw(0)).map_err(|e| format!("sched_getaffinity: {e}"))?;
    let mut set = CpuSet::new();
    let mut any = false;
    for c in 0..CpuSet::count() {
        if now.is_set(c).unwrap_or(false) && !cores.iter().any(|r| r.0 == c) {
            set.set(c).map_err(|e| format!("cpu {c}: {e}"))?;
            any = true;
        }
    }
    if !any {
        return Ok(false);
    }
    sched_setaffinity(Pid::from_raw(0), &set).map_err(|e| format!("sched_setaffinity: {e}"))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avoid_cores_leaves_the_other_cpus_and_never_none() {
        std::thread::spawn(|| {
            let all = allowed_cpus();
            // Avoiding every CPU would leave none: refused, nothing changed.
            assert_eq!(avoid_cores(&all), Ok(false));
            assert_eq!(allowed_cpus(), all);
            if all.len() < 2 {
                return;
            }
            assert_eq!(avoid_cores(&all[..1]), Ok(true));
            assert_eq!(allowed_cpus(), all[1..].to_vec());
        })
        .join()
        .unwrap();
    }
}
