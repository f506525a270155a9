//! Configuration of the NVMe/TCP target: subsystems (what is exported, to whom, where) and the
//! transport limits. Plain data deserialized from the YAML config on the control thread
//! (`deny_unknown_fields`, so a typo is an error and not a silently ignored key) and validated by
//! [`crate::nvmf::Target::new`].

use serde::Deserialize;

/// The well-known NQN of the discovery subsystem.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// One exported NVM subsystem.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubsystemConfig {
    /// NVMe Qualified Name, e.g. `nqn.2026-01.io.nvseal:vol0` (at most 223 bytes).
    pub nqn: String,
    /// Serial number reported in Identify Controller (at most 20 ASCII characters).
    pub serial: String,
    /// Model number reported in Identify Controller (at most 40 ASCII characters).
    #[serde(default = "default_model")]
    pub model: String,
    pub namespaces: Vec<NamespaceConfig>,
    /// Host NQNs allowed to connect. Deny by default: with this list empty and
    /// `allow_any_host` false, no host can connect.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Admit every host, whatever its NQN (an empty HOSTNQN included). Only for trusted
    /// networks: nvseal warns at start-up for each encrypted namespace exported this way. Setting
    /// it together with a non-empty `allowed_hosts` is refused as ambiguous.
    #[serde(default)]
    pub allow_any_host: bool,
    /// Addresses where this subsystem is reachable. It accepts Connects only through the
    /// listeners of these addresses, and discovery lists it only there.
    #[serde(default)]
    pub listen: Vec<ListenAddr>,
}

/// Longest NQN the spec allows, in bytes (the Connect data fields are 256 bytes, NUL-padded).
pub const NQN_MAX_LEN: usize = 223;

/// Whether `s` is a well-formed NQN as nvseal accepts it: `nqn.` prefix, at most 223 bytes of
/// UTF-8 (as the spec allows) without whitespace or control characters.
pub fn is_valid_nqn(s: &str) -> bool {
    s.starts_with("nqn.")
        && s.len() <= NQN_MAX_LEN
        && s.chars().all(|c| !c.is_whitespace() && !c.is_control())
}

/// Which field of a subsystem's access settings is wrong, and why (see
/// [`SubsystemConfig::check_access`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessError {
    /// `allow_any_host: true` with a non-empty `allowed_hosts`.
    AnyHostAndList,
    /// `allowed_hosts[index]` is not a valid host NQN.
    BadHost { index: usize, why: String },
    /// `listen[index].addr` is not an IP address.
    BadListen { index: usize, why: String },
}

impl AccessError {
    /// The key path of the bad field inside the subsystem (`allow_any_host`, `listen[0].addr`).
    pub fn field(&self) -> String {
        match self {
            AccessError::AnyHostAndList => "allow_any_host".into(),
            AccessError::BadHost { index, .. } => format!("allowed_hosts[{index}]"),
            AccessError::BadListen { index, .. } => format!("listen[{index}].addr"),
        }
    }
}

impl std::fmt::Display for AccessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccessError::AnyHostAndList => write!(
                f,
                "allow_any_host: true and a non-empty allowed_hosts contradict each other; keep one"
            ),
            AccessError::BadHost { why, .. } | AccessError::BadListen { why, .. } => {
                f.write_str(why)
            }
        }
    }
}

impl SubsystemConfig {
    /// Checks who may connect and where: the host list, `allow_any_host`, and the listen
    /// addresses. Used by config validation (with line and column) and by
    /// [`crate::nvmf::Target::new`].
    pub fn check_access(&self) -> Result<(), AccessError> {
        if self.allow_any_host && !self.allowed_hosts.is_empty() {
            return Err(AccessError::AnyHostAndList);
        }
        for (index, h) in self.allowed_hosts.iter().enumerate() {
            if !is_valid_nqn(h) {
                return Err(AccessError::BadHost {
                    index,
                    why: format!(
                        "not a host NQN: {h:?} (\"nqn.\" prefix, at most {NQN_MAX_LEN} bytes, no spaces or control characters)"
                    ),
                });
            }
        }
        for (index, l) in self.listen.iter().enumerate() {
            if l.addr.parse::<std::net::IpAddr>().is_err() {
                return Err(AccessError::BadListen {
                    index,
                    why: format!("not an IP address: {:?}", l.addr),
                });
            }
        }
        Ok(())
    }
}

fn default_model() -> String {
    "nvseal".to_string()
}

/// One namespace of a subsystem.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Namespace id, 1-based, unique in the subsystem.
    pub nsid: u32,
    /// Name of the bdev that backs it.
    pub bdev: String,
    /// Optional assertion that the bdev is (or is not) an encrypted one. The target derives
    /// what it reports from the bdev stack (a `crypto` or `encrypted` bdev is encrypted); a
    /// value here that disagrees with the stack is refused (config error with line and
    /// column), so a label can neither make a plain RAM disk look encrypted nor hide one.
    #[serde(default)]
    pub encrypted: Option<bool>,
}

/// A transport address (TCP).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListenAddr {
    /// IPv4 or IPv6 address as text.
    pub addr: String,
    /// TCP port; 4420 is the IANA port for NVMe/TCP.
    #[serde(default = "default_port")]
    pub port: u16,
}

fn default_port() -> u16 {
    4420
}

/// Upper bound of [`Limits::max_namespaces`] (and of a configured nsid).
pub const MAX_NAMESPACE_SLOTS: u32 = 1024;

/// Transport and queue limits. Every limit has a default that a Linux host works well with.
///
/// Sockets are admitted in two stages (see docs/nvmf.md, "Connection limits"): an accepted
/// socket takes one of `max_pre_connect` slots until its Fabrics Connect succeeds, and only
/// then one of `max_connections`; silent or slow peers therefore cannot take the slots of
/// hosts that speak.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connected queue pairs (Fabrics Connect succeeded) the whole target holds at once. 1024
    /// covers 8 hosts with one I/O queue per CPU on 64-CPU machines plus their admin queues, and
    /// bounds the memory the per-connection buffer pools can take.
    pub max_connections: usize,
    /// Accepted sockets that have not completed Fabrics Connect yet (ICReq pending or Connect
    /// pending). A host spends two round trips here per queue, so 64 lets dozens of queues
    /// (re)connect at once, while a scan or a flood of silent sockets is refused here and never
    /// reaches `max_connections`.
    pub max_pre_connect: usize,
    /// Sockets (pre-Connect and connected together) one source IP address may hold. 256 fits a
    /// 64-CPU host with three controllers (3 x 65 queues) plus discovery and reconnects, and
    /// keeps one address from taking every slot. Hosts behind one NAT address share it.
    pub max_connections_per_source: usize,
    /// Queue pairs (admin, I/O and discovery queues) one host NQN may hold across the whole
    /// target. 256, like the per-source cap, fits a 64-CPU host on three subsystems and keeps
    /// one host from taking every connection slot.
    pub max_queues_per_host: usize,
    /// Deepest I/O queue a host may ask for in Connect (SQSIZE + 1); also CAP.MQES + 1. 128 is
    /// the Linux host default and enough to saturate a NVMe device per queue.
    pub max_queue_depth: u16,
    /// Deepest admin queue accepted. Admin traffic is light; Linux asks for 32.
    pub max_admin_queue_depth: u16,
    /// I/O queues a controller may create (Number of Queues feature). 64 = one per CPU on
    /// typical hosts without letting one host take every connection.
    pub max_io_queues: u16,
    /// In-capsule data bytes accepted for I/O commands (IOCCSZ - 64). 8 KiB lets 4 KiB writes
    /// skip the R2T round trip (Linux nvmet uses one page; SPDK 4 KiB) at little memory cost.
    pub in_capsule_data_size: u32,
    /// Largest transfer of one command (reported as MDTS, so a power of two ≥ 4 KiB). 128 KiB is
    /// what Linux splits I/O to by default and bounds each queue's pool to depth × 128 KiB.
    pub max_io_size: u32,
    /// Largest H2CData PDU payload (MAXH2CDATA in ICResp, ≥ 4 KiB by spec). 128 KiB = one PDU
    /// per R2T at the default max I/O size.
    pub max_h2c_data_size: u32,
    /// Whether header/data digests are granted when a host asks for them.
    pub allow_digests: bool,
    /// A socket that has not sent its ICReq this long after accept is closed. A host sends
    /// ICReq right after the TCP handshake, so 1 s is generous; a silent socket holds a
    /// pre-Connect slot no longer than this.
    pub icreq_timeout_ms: u32,
    /// A connection that has not completed Fabrics Connect this long after accept is closed, so
    /// idle or half-open sockets cannot pin pre-Connect slots (Linux nvmet waits similarly).
    pub connect_timeout_ms: u32,
    /// A connection closing after a fatal transport error gets this long to send its
    /// C2HTermReq; a peer that stops reading cannot keep it (and its socket) longer. 5 s is
    /// many round trips even on a slow link.
    pub closing_timeout_ms: u32,
    /// Keep alive timeout given to a discovery controller whose host asks for none (KATO 0, what
    /// a one-shot `nvme discover` sends). A discovery controller is otherwise never torn down
    /// if the host vanishes; 120 s is what Linux nvmet enforces.
    pub discovery_kato_ms: u32,
    /// Smallest keep alive timeout an NVM controller runs with. 0 (the default) follows the
    /// spec: a host may disable keep alive with KATO 0. Above 0, KATO 0 is refused at Connect
    /// (and in Set Features) and smaller values are raised to this one (docs/nvmf.md).
    pub min_kato_ms: u32,
    /// TCP keepalive on accepted sockets: idle seconds before the first probe. With the
    /// interval and count below a peer that vanished without a FIN or RST is found in about
    /// 45 s even when no NVMe keep alive covers the socket (pre-Connect, I/O queues of a host
    /// with KATO 0).
    pub tcp_keepalive_idle_s: u32,
    /// TCP keepalive: seconds between probes.
    pub tcp_keepalive_interval_s: u32,
    /// TCP keepalive: unanswered probes before the kernel drops the connection.
    pub tcp_keepalive_count: u32,
    /// TCP_USER_TIMEOUT on accepted sockets: how long sent data may stay unacknowledged before
    /// the kernel drops the connection. 30 s outlasts any retransmission a live peer needs.
    pub tcp_user_timeout_ms: u32,
    /// Namespace slots per subsystem (Identify Controller NN): the highest nsid a namespace
    /// created at run time may take. Slots are allocated up front so the I/O path never sees a
    /// table being resized; 32 is plenty for a target exporting volumes, the cap is 1024.
    pub max_namespaces: u32,
    /// I/Os one reactor's bdev channel to one namespace holds in flight. That channel is shared
    /// by every I/O queue on the reactor (one io_uring per reactor and namespace, not per queue);
    /// an I/O beyond it parks and is retried when one completes. 1024 = 8 queues at the default
    /// depth, and the ring stays a few hundred KiB.
    pub reactor_channel_depth: u32,
    /// Target-wide budget for data buffers, in MiB. The reactors' shared buffer pools grow up
    /// to it (each up to its share) and requests wait for a buffer beyond it, so the number of
    /// hosts and queues cannot take all the memory. A connection outside a poll group reserves
    /// queue depth × `max_io_size` at Connect instead, refused over the budget (Connect
    /// Controller Busy, logged).
    pub buffer_budget_mib: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_pre_connect: 64,
            max_connections_per_source: 256,
            max_queues_per_host: 256,
            max_queue_depth: 128,
            max_admin_queue_depth: 32,
            max_io_queues: 64,
            in_capsule_data_size: 8192,
            max_io_size: 128 * 1024,
            max_h2c_data_size: 128 * 1024,
            allow_digests: true,
            icreq_timeout_ms: 1000,
            connect_timeout_ms: 10_000,
            closing_timeout_ms: 5000,
            discovery_kato_ms: 120_000,
            min_kato_ms: 0,
            tcp_keepalive_idle_s: 30,
            tcp_keepalive_interval_s: 5,
            tcp_keepalive_count: 3,
            tcp_user_timeout_ms: 30_000,
            max_namespaces: 32,
            reactor_channel_depth: 1024,
            buffer_budget_mib: 4096,
        }
    }
}

/// Largest TCP_KEEPIDLE and TCP_KEEPINTVL Linux accepts (seconds).
const MAX_TCP_KEEPALIVE_S: u32 = 32767;
/// Largest TCP_KEEPCNT Linux accepts.
const MAX_TCP_KEEPALIVE_COUNT: u32 = 127;

/// TCP settings of an accepted socket (from [`Limits`]; applied by the listener).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpKeepalive {
    pub idle_s: u32,
    pub interval_s: u32,
    pub count: u32,
    pub user_timeout_ms: u32,
}

impl Default for TcpKeepalive {
    fn default() -> Self {
        Limits::default().tcp_keepalive()
    }
}

impl Limits {
    /// Checks the relations the protocol requires; the reason if they do not hold.
    pub fn validate(&self) -> Result<(), String> {
        if !self.max_io_size.is_power_of_two() || self.max_io_size < 4096 {
            return Err(format!(
                "max_io_size {} must be a power of two >= 4096",
                self.max_io_size
            ));
        }
        if self.max_h2c_data_size < 4096 {
            return Err(format!(
                "max_h2c_data_size {} must be >= 4096",
                self.max_h2c_data_size
            ));
        }
        if !self.in_capsule_data_size.is_multiple_of(16)
            || self.in_capsule_data_size > self.max_io_size
        {
            return Err(format!(
                "in_capsule_data_size {} must be a multiple of 16 and <= max_io_size",
                self.in_capsule_data_size
            ));
        }
        if self.max_queue_depth < 2 || self.max_admin_queue_depth < 2 {
            return Err("queue depths must be >= 2".into());
        }
        if !(1..=MAX_NAMESPACE_SLOTS).contains(&self.max_namespaces) {
            return Err(format!(
                "max_namespaces {} must be between 1 and {MAX_NAMESPACE_SLOTS}",
                self.max_namespaces
            ));
        }
        if self.reactor_channel_depth == 0 || self.reactor_channel_depth > 32768 {
            return Err(format!(
                "reactor_channel_depth {} must be between 1 and 32768",
                self.reactor_channel_depth
            ));
        }
        if self.buffer_budget_mib == 0 {
            return Err("buffer_budget_mib must be >= 1".into());
        }
        if self.max_connections == 0 || self.max_io_queues == 0 {
            return Err("max_connections and max_io_queues must be >= 1".into());
        }
        if self.max_pre_connect == 0
            || self.max_connections_per_source == 0
            || self.max_queues_per_host == 0
        {
            return Err(
                "max_pre_connect, max_connections_per_source and max_queues_per_host must be >= 1"
                    .into(),
            );
        }
        if self.icreq_timeout_ms == 0
            || self.connect_timeout_ms == 0
            || self.closing_timeout_ms == 0
        {
            return Err(
                "icreq_timeout_ms, connect_timeout_ms and closing_timeout_ms must be >= 1".into(),
            );
        }
        if self.discovery_kato_ms == 0 {
            return Err(
                "discovery_kato_ms must be >= 1: a discovery controller needs a keep alive".into(),
            );
        }
        if !(1..=MAX_TCP_KEEPALIVE_S).contains(&self.tcp_keepalive_idle_s)
            || !(1..=MAX_TCP_KEEPALIVE_S).contains(&self.tcp_keepalive_interval_s)
        {
            return Err(format!(
                "tcp_keepalive_idle_s and tcp_keepalive_interval_s must be between 1 and {MAX_TCP_KEEPALIVE_S}"
            ));
        }
        if !(1..=MAX_TCP_KEEPALIVE_COUNT).contains(&self.tcp_keepalive_count) {
            return Err(format!(
                "tcp_keepalive_count {} must be between 1 and {MAX_TCP_KEEPALIVE_COUNT}",
                self.tcp_keepalive_count
            ));
        }
        if self.tcp_user_timeout_ms < 1000 {
            return Err(format!(
                "tcp_user_timeout_ms {} must be >= 1000",
                self.tcp_user_timeout_ms
            ));
        }
        Ok(())
    }

    /// The TCP keepalive and user timeout settings of accepted sockets.
    pub fn tcp_keepalive(&self) -> TcpKeepalive {
        TcpKeepalive {
            idle_s: self.tcp_keepalive_idle_s,
            interval_s: self.tcp_keepalive_interval_s,
            count: self.tcp_keepalive_count,
            user_timeout_ms: self.tcp_user_timeout_ms,
        }
    }

    /// The keep alive timeout a controller runs with when its host asks for `requested_ms`
    /// (Connect CDW12 or Set Features KATO), or why the request is refused:
    /// * discovery, KATO 0: `discovery_kato_ms`;
    /// * NVM, KATO 0: 0 (keep alive off) when `min_kato_ms` is 0, else refused;
    /// * any other value below `min_kato_ms`: `min_kato_ms`.
    pub fn effective_kato_ms(
        &self,
        discovery: bool,
        requested_ms: u32,
    ) -> Result<u32, &'static str> {
        match requested_ms {
            0 if discovery => Ok(self.discovery_kato_ms.max(self.min_kato_ms)),
            0 if self.min_kato_ms > 0 => {
                Err("KATO 0 (keep alive disabled) and min_kato_ms requires a keep alive")
            }
            0 => Ok(0),
            v => Ok(v.max(self.min_kato_ms)),
        }
    }

    /// MDTS as Identify reports it: log2 of max_io_size in 4 KiB pages.
    pub fn mdts(&self) -> u8 {
        (self.max_io_size / 4096).trailing_zeros() as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_reject_unknown_keys() {
        let y = "nqn: nqn.2026-01.io.nvseal:a\nserial: S1\nnamespaces:\n  - {nsid: 1, bdev: m0, encrypted: true}\nlisten:\n  - {addr: 127.0.0.1}\n";
        let c: SubsystemConfig = serde_yaml_ng::from_str(y).unwrap();
        assert_eq!(c.namespaces[0].nsid, 1);
        assert_eq!(c.namespaces[0].encrypted, Some(true));
        assert_eq!(c.listen[0].port, 4420);
        assert!(c.allowed_hosts.is_empty());
        assert!(!c.allow_any_host, "deny by default");
        assert_eq!(c.check_access(), Ok(()));
        assert_eq!(c.model, "nvseal");
        let bad = format!("{y}bogus: 1\n");
        assert!(serde_yaml_ng::from_str::<SubsystemConfig>(&bad).is_err());
        let l: Limits = serde_yaml_ng::from_str("max_io_size: 65536\n").unwrap();
        assert_eq!(l.max_io_size, 65536);
        assert_eq!(l.mdts(), 4);
        assert!(l.validate().is_ok());
        assert!(serde_yaml_ng::from_str::<Limits>("max_io_sz: 1\n").is_err());
        assert!(Limits {
            max_io_size: 5000,
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn kato_rules() {
        let d = Limits::default();
        assert_eq!(
            d.effective_kato_ms(true, 0),
            Ok(120_000),
            "discovery always has one"
        );
        assert_eq!(d.effective_kato_ms(true, 5000), Ok(5000));
        assert_eq!(
            d.effective_kato_ms(false, 0),
            Ok(0),
            "NVM may disable by default"
        );
        assert_eq!(d.effective_kato_ms(false, 10), Ok(10));
        let m = Limits {
            min_kato_ms: 2000,
            discovery_kato_ms: 1000,
            ..Default::default()
        };
        assert!(m.effective_kato_ms(false, 0).is_err());
        assert_eq!(m.effective_kato_ms(false, 1), Ok(2000));
        assert_eq!(m.effective_kato_ms(false, 3000), Ok(3000));
        assert_eq!(
            m.effective_kato_ms(true, 0),
            Ok(2000),
            "the minimum holds for discovery"
        );
    }

    #[test]
    fn peer_limits_are_validated() {
        assert!(Limits::default().validate().is_ok());
        for bad in [
            Limits {
                max_pre_connect: 0,
                ..Default::default()
            },
            Limits {
                max_connections_per_source: 0,
                ..Default::default()
            },
            Limits {
                max_queues_per_host: 0,
                ..Default::default()
            },
            Limits {
                icreq_timeout_ms: 0,
                ..Default::default()
            },
            Limits {
                closing_timeout_ms: 0,
                ..Default::default()
            },
            Limits {
                discovery_kato_ms: 0,
                ..Default::default()
            },
            Limits {
                tcp_keepalive_idle_s: 40_000,
                ..Default::default()
            },
            Limits {
                tcp_keepalive_count: 0,
                ..Default::default()
            },
            Limits {
                tcp_user_timeout_ms: 10,
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let l: Limits =
            serde_yaml_ng::from_str("max_pre_connect: 8\nicreq_timeout_ms: 500\nmin_kato_ms: 1\n")
                .unwrap();
        assert_eq!(
            (l.max_pre_connect, l.icreq_timeout_ms, l.min_kato_ms),
            (8, 500, 1)
        );
    }

    #[test]
    fn access_settings_are_checked() {
        let base = "nqn: nqn.2026-01.io.nvseal:a\nserial: S1\nnamespaces: []\n";
        let c = |extra: &str| -> SubsystemConfig {
            serde_yaml_ng::from_str(&format!("{base}{extra}")).unwrap()
        };
        assert_eq!(c("allow_any_host: true\n").check_access(), Ok(()));
        assert_eq!(
            c("allowed_hosts: [nqn.2014-08.org.nvmexpress:uuid:1]\n").check_access(),
            Ok(())
        );
        assert_eq!(
            c("allow_any_host: true\nallowed_hosts: [nqn.2014-08.x:h]\n").check_access(),
            Err(AccessError::AnyHostAndList)
        );
        for bad in ["\"\"", "host1", "\"nqn.a b\""] {
            let e = c(&format!("allowed_hosts: [nqn.x:ok, {bad}]\n"))
                .check_access()
                .unwrap_err();
            assert_eq!(e.field(), "allowed_hosts[1]", "{bad}");
        }
        let long = format!("nqn.{}", "x".repeat(NQN_MAX_LEN));
        assert!(!is_valid_nqn(&long));
        assert!(is_valid_nqn(&long[..NQN_MAX_LEN]));
        assert!(is_valid_nqn("nqn.2026-01.example:vol-ü"), "NQNs are UTF-8");
        assert!(!is_valid_nqn("nqn.x:a\nforged log line"));
        let e = c("listen: [{addr: 127.0.0.1}, {addr: localhost}]\n")
            .check_access()
            .unwrap_err();
        assert_eq!(e.field(), "listen[1].addr");
    }
}
