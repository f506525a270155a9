//! Process-wide hardening.

/// Marks the process non-dumpable: no core files, and other unprivileged processes cannot
/// ptrace it or read its memory through /proc — keys in memory stay in memory.
pub fn set_non_dumpable() -> Result<(), String> {
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("prctl(PR_SET_DUMPABLE, 0): {e}"))
}

/// Whether the process is currently dumpable.
pub fn is_dumpable() -> Result<bool, String> {
    nix::sys::prctl::get_dumpable().map_err(|e| format!("prctl(PR_GET_DUMPABLE): {e}"))
}

/// Raises the soft limit on open files (RLIMIT_NOFILE) to the hard limit; returns the soft
/// limit in force afterwards. Each NVMe/TCP queue pair is a socket, so the usual soft limit of
/// 1024 would make `accept` fail long before `max_connections`.
pub fn raise_nofile_limit() -> Result<u64, String> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| format!("getrlimit(RLIMIT_NOFILE): {e}"))?;
    if soft >= hard {
        return Ok(soft);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
        .map_err(|e| format!("setrlimit(RLIMIT_NOFILE, {hard}): {e}"))?;
    Ok(hard)
}

/// The soft and hard limits on open files.
pub fn nofile_limit() -> Result<(u64, u64), String> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_err(|e| format!("getrlimit(RLIMIT_NOFILE): {e}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn non_dumpable_sticks() {
        // nextest runs each test in its own process, so this changes nothing else.
        super::set_non_dumpable().unwrap();
        assert!(!super::is_dumpable().unwrap());
    }

    #[test]
    fn nofile_soft_limit_goes_up_to_the_hard_one() {
        use nix::sys::resource::{setrlimit, Resource};
        let (_, hard) = super::nofile_limit().unwrap();
        // Lower the soft limit first (own process: nextest runs each test alone), so the raise
        // has something to do.
        let low = hard.min(512);
        setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
        assert_eq!(super::nofile_limit().unwrap(), (low, hard));
        assert_eq!(super::raise_nofile_limit().unwrap(), hard);
        assert_eq!(super::nofile_limit().unwrap(), (hard, hard));
    }
}
