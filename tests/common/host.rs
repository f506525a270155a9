//! Small synchronous helpers over nvseal's own NVMe/TCP host (`nvmf::host::HostQpair`).

use nvseal::nvmf::host::HostQpair;
use std::time::{Duration, Instant};

/// Reads `nlb` blocks of `block_size` at `lba` of `nsid` (one command) and waits for it;
/// panics on an error status or after 20 s.
pub fn read_blocks(q: &mut HostQpair, nsid: u32, lba: u64, nlb: u32, block_size: u32) -> Vec<u8> {
    q.read(nsid, lba, nlb, block_size, 1).unwrap();
    let mut out = None;
    let t0 = Instant::now();
    while out.is_none() {
        q.poll(&mut |c| out = Some((c.cqe.status().is_success(), c.data.to_vec())))
            .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(20), "read timed out");
    }
    let (ok, data) = out.unwrap();
    assert!(ok, "read nsid {nsid} lba {lba} failed");
    data
}

/// Like [`read_blocks`], but an error status is `Err(status)` instead of a panic (a transport
/// error or 20 s without an answer still panic).
#[allow(dead_code)]
pub fn try_read_blocks(
    q: &mut HostQpair,
    nsid: u32,
    lba: u64,
    nlb: u32,
    block_size: u32,
) -> Result<Vec<u8>, u16> {
    q.read(nsid, lba, nlb, block_size, 1).unwrap();
    let mut out = None;
    let t0 = Instant::now();
    while out.is_none() {
        q.poll(&mut |c| out = Some((c.cqe.status(), c.data.to_vec())))
            .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(20), "read timed out");
    }
    let (st, data) = out.unwrap();
    if st.is_success() {
        Ok(data)
    } else {
        Err(st.to_field())
    }
}
