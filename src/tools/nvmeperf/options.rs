//! What an `nvseal perf` run is asked to do: the target to connect to and as whom
//! ([`TargetSpec`]), the whole run's parameters ([`PerfConfig`]), and the host identity used
//! when none is given.
//!
//! Plain data and pure functions, built on the CLI's main thread before a run starts. They live
//! apart from the engine so the options can be read without the data path around them.

use std::net::SocketAddr;
use std::time::Duration;

use crate::nvmf::pdu::Digests;
use crate::reactor::ReactorOptions;
use crate::tools::bdevperf::JobSpec;
use crate::types::CoreId;

/// Where to connect and as whom.
#[derive(Clone, Debug)]
pub struct TargetSpec {
    pub addr: SocketAddr,
    pub subnqn: String,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    /// Digests to ask for (the controller may grant fewer; the report says which were used).
    pub digests: Digests,
    /// Keep alive timeout asked for in the admin Connect (0 = none).
    pub kato_ms: u32,
    /// Bound of each blocking setup step (TCP connect, ICResp, admin commands).
    pub timeout: Duration,
}

/// A whole run's parameters.
#[derive(Clone, Debug)]
pub struct PerfConfig {
    pub target: TargetSpec,
    /// Reactor cores (one reactor each).
    pub cores: Vec<CoreId>,
    pub queues_per_core: usize,
    /// Workload, I/O size, queue depth per queue, verify, seed.
    pub spec: JobSpec,
    /// Run time per side (ignored with `io_count`).
    pub time: Duration,
    /// I/Os per queue instead of a time limit.
    pub io_count: Option<u64>,
    /// One namespace, or two for an A/B run (`a`, `b`).
    pub nsids: Vec<u32>,
    /// A/B slice length.
    pub slice: Duration,
    pub reactor: ReactorOptions,
    /// The target's nvseal control socket, when it is an nvseal on this machine: its reactors'
    /// busy time is read (`stats.reactors`) at the start and end of every phase.
    pub target_rpc: Option<std::path::PathBuf>,
    /// Set Force Unit Access on every Write: each is acknowledged only from stable storage.
    pub fua: bool,
    /// Extra controllers (admin queue pairs) connected before the run and left idle, to measure
    /// what idle connections cost the target.
    pub idle_connections: usize,
}

/// The host identity to use when none is given: `/etc/nvme/hostnqn` and `/etc/nvme/hostid` as
/// nvme-cli keeps them, else a UUID NQN derived from `/etc/machine-id` (stable per machine, so
/// it can go on a target's allowed list), else a random one.
pub fn default_host_identity() -> (String, [u8; 16]) {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    let hostid_file = read("/etc/nvme/hostid").and_then(|s| uuid::Uuid::parse_str(&s).ok());
    if let Some(nqn) = read("/etc/nvme/hostnqn").filter(|s| s.starts_with("nqn.")) {
        let id = hostid_file
            .or_else(|| {
                nqn.rsplit(':')
                    .next()
                    .and_then(|u| uuid::Uuid::parse_str(u).ok())
            })
            .map(|u| *u.as_bytes())
            .unwrap_or([0; 16]);
        return (nqn, id);
    }
    let id = read("/etc/machine-id")
        .and_then(|m| machine_id_uuid(&m))
        .unwrap_or_else(uuid::Uuid::new_v4);
    (host_nqn_for(&id), *id.as_bytes())
}

/// A version-4-shaped UUID from a 32-hex-digit machine id; `None` if it is not one.
pub fn machine_id_uuid(machine_id: &str) -> Option<uuid::Uuid> {
    let m = machine_id.trim();
    if m.len() != 32 || !m.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let v = u128::from_str_radix(m, 16).ok()?;
    Some(uuid::Builder::from_random_bytes(v.to_be_bytes()).into_uuid())
}

/// The UUID-based host NQN format of the NVMe base specification.
pub fn host_nqn_for(id: &uuid::Uuid) -> String {
    format!("nqn.2014-08.org.nvmexpress:uuid:{}", id.hyphenated())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_identity_from_machine_id() {
        let u = machine_id_uuid("0123456789abcdef0123456789ABCDEF\n").unwrap();
        assert_eq!(u.get_version_num(), 4);
        assert_eq!(
            u,
            machine_id_uuid("0123456789abcdef0123456789abcdef").unwrap()
        );
        assert!(machine_id_uuid("xyz").is_none());
        assert!(machine_id_uuid("0123456789abcdef0123456789abcdeg").is_none());
        let nqn = host_nqn_for(&u);
        assert!(nqn.starts_with("nqn.2014-08.org.nvmexpress:uuid:"));
        assert_eq!(nqn.len(), "nqn.2014-08.org.nvmexpress:uuid:".len() + 36);
    }
}
