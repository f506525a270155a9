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

#[cfg(test)]
mod tests {
    #[test]
    fn non_dumpable_sticks() {
        // nextest runs each test in its own process, so this changes nothing else.
        super::set_non_dumpable().unwrap();
        assert!(!super::is_dumpable().unwrap());
    }
}
