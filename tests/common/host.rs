//! Small synchronous helpers over nvseal's own NVMe/TCP host (`nvmf::host::HostQpair`).

use nvseal::nvme::connect;
use nvseal::nvmf::host::{HostConfig, HostQpair};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Connects as `hostnqn` to `subnqn` at `addr`: an enabled admin queue and I/O queue 1 of
/// `queue_depth` entries (20 s command timeout). The admin queue must be kept alive with the
/// I/O queue. Panics on any failure.
#[allow(dead_code)]
pub fn connect_io(
    addr: SocketAddr,
    subnqn: &str,
    hostnqn: &str,
    queue_depth: u16,
) -> (HostQpair, HostQpair) {
    let cfg = HostConfig {
        hostnqn: hostnqn.into(),
        queue_depth,
        timeout: Duration::from_secs(20),
        ..Default::default()
    };
    let mut admin =
        HostQpair::connect(addr, subnqn, 0, connect::CNTLID_DYNAMIC, cfg.clone()).unwrap();
    admin.enable().unwrap();
    let q = HostQpair::connect(addr, subnqn, 1, admin.cntlid(), cfg).unwrap();
    (admin, q)
}

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
