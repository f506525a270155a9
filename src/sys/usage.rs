//! What the process holds, read from /proc: open file descriptors and resident memory. For the
//! `stats.process` RPC (leak checks in soak tests, operators watching a long-running target).

use std::fs;

/// Open file descriptors of this process (entries of /proc/self/fd, not counting the one the
/// directory listing itself holds while it is read).
pub fn open_fds() -> Result<usize, String> {
    let n = fs::read_dir("/proc/self/fd")
        .map_err(|e| format!("/proc/self/fd: {e}"))?
        .count();
    Ok(n.saturating_sub(1))
}

/// Resident and virtual memory in bytes (/proc/self/statm).
pub fn memory_bytes() -> Result<(u64, u64), String> {
    let s = fs::read_to_string("/proc/self/statm").map_err(|e| format!("/proc/self/statm: {e}"))?;
    let mut f = s.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(size)), Some(Ok(resident))) = (f.next(), f.next()) else {
        return Err(format!("/proc/self/statm: unexpected contents {s:?}"));
    };
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    Ok((resident * page, size * page))
}

#[cfg(test)]
mod tests {
    #[test]
    fn fds_and_memory_follow_what_the_process_holds() {
        let before = super::open_fds().unwrap();
        let f = std::fs::File::open("/proc/self/statm").unwrap();
        assert_eq!(super::open_fds().unwrap(), before + 1);
        drop(f);
        assert_eq!(super::open_fds().unwrap(), before);
        let (rss, vm) = super::memory_bytes().unwrap();
        assert!(rss > 0 && vm >= rss, "rss {rss} vm {vm}");
    }
}
