//! The admin side of an `nvseal perf` run: the admin queue pair ([`Controller`]) that connects,
//! enables the controller, reads CAP and Identify, negotiates the number of I/O queues, sends
//! keep-alives, connects the I/O queues and runs the shutdown handshake; plus the pure helpers
//! that read Identify data and size commands against MDTS.
//!
//! Runs on the control thread only. It is apart from the data path because nothing here is
//! per-I/O: it runs before, between and after the phases.

use std::io::Read;
use std::net::Shutdown;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{PerfError, TargetSpec};
use crate::nvme::identify::ctrl_off;
use crate::nvme::{admin_op, connect, feature, prop, Sqe, Status};
use crate::nvmf::host::{Dir, HostConfig, HostError, HostQpair};

/// A namespace's geometry from Identify Namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct NsInfo {
    pub nsid: u32,
    pub block_size: u32,
    pub num_blocks: u64,
}

/// What the controller told us at start-up (reported in the JSON).
#[derive(Clone, Debug, Serialize)]
pub struct ControllerInfo {
    pub cntlid: u16,
    pub model: String,
    pub serial: String,
    pub firmware: String,
    /// Largest transfer (MDTS × minimum page size); `None` = no limit reported.
    pub mdts_bytes: Option<u64>,
    /// Most entries an I/O queue may have (CAP.MQES + 1).
    pub max_queue_entries: u32,
    /// In-capsule data the controller accepts on I/O queues (IOCCSZ × 16 − 64).
    pub in_capsule_bytes: u32,
    /// MAXH2CDATA granted on the first I/O queue.
    pub maxh2cdata: u32,
    pub header_digest: bool,
    pub data_digest: bool,
    pub kato_ms: u32,
    pub io_queues_granted: u16,
}

/// Describes a failed admin/I/O queue Connect in words a user can act on.
fn describe_connect(e: HostError, t: &TargetSpec, qid: u16) -> PerfError {
    let what = if qid == 0 {
        "admin queue".to_string()
    } else {
        format!("I/O queue {qid}")
    };
    let msg = match e {
        HostError::Status { status, .. } if status == Status::CONNECT_INVALID_HOST => format!(
            "{}: host {} is not allowed on subsystem {} (Connect Invalid Host)",
            t.addr, t.hostnqn, t.subnqn
        ),
        HostError::Status { status, dw0 } if status == Status::CONNECT_INVALID_PARAMETERS => {
            let (in_data, ipo) = connect::invalid_param_from_dw0(dw0);
            let field = match (in_data, usize::from(ipo)) {
                (true, o) if o == connect::SUBNQN_OFF => {
                    format!("the target has no subsystem {}", t.subnqn)
                }
                (true, o) if o == connect::HOSTNQN_OFF => {
                    format!("host NQN {} rejected", t.hostnqn)
                }
                (true, o) if o == connect::CNTLID_OFF => "controller id rejected".to_string(),
                (false, o) if o == usize::from(connect::SQE_SQSIZE_OFF) => {
                    "queue size rejected (lower -q)".to_string()
                }
                (false, o) if o == usize::from(connect::SQE_QID_OFF) => {
                    "queue id rejected (fewer queues)".to_string()
                }
                (d, o) => format!(
                    "invalid parameter at {} offset {o}",
                    if d { "data" } else { "command" }
                ),
            };
            format!(
                "{}: {what} Connect refused: {field} (Connect Invalid Parameters)",
                t.addr
            )
        }
        HostError::Status { status, dw0 } => format!(
            "{}: {what} Connect to {} failed with status {status:?} (dw0 {dw0:#x})",
            t.addr, t.subnqn
        ),
        HostError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!(
                "{}: connection refused, also on every retry within the connect timeout of {} ms (is a target listening there?)",
                t.addr,
                t.timeout.as_millis()
            )
        }
        other => format!("{}: {what}: {other}", t.addr),
    };
    PerfError::Connect(msg)
}

/// First wait after a refused connection; doubled after each refusal up to
/// [`CONNECT_RETRY_MAX`]. A target that is starting (`nvseal serve &` allocates its RAM disks
/// before it listens) is usually up within a second or two.
const CONNECT_RETRY_FIRST: Duration = Duration::from_millis(50);
/// Longest wait between two tries: how late perf may notice the listener.
const CONNECT_RETRY_MAX: Duration = Duration::from_millis(500);

/// Connects the admin queue, retrying while the TCP connection is refused (nothing listens
/// yet) until `t.timeout` (`--connect-timeout`) has passed since the first try. Any other
/// failure (a Connect refused by the target, a timeout) is final at once.
fn connect_admin_retrying(t: &TargetSpec, cfg: HostConfig) -> Result<HostQpair, PerfError> {
    let deadline = Instant::now() + t.timeout;
    let mut wait = CONNECT_RETRY_FIRST;
    let mut refusals = 0u32;
    loop {
        match HostQpair::connect(t.addr, &t.subnqn, 0, connect::CNTLID_DYNAMIC, cfg.clone()) {
            Ok(q) => {
                if refusals > 0 {
                    tracing::info!(addr = %t.addr, refusals, "target is listening now");
                }
                return Ok(q);
            }
            Err(HostError::Io(e))
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() + wait < deadline =>
            {
                if refusals == 0 {
                    tracing::info!(
                        addr = %t.addr,
                        timeout_ms = t.timeout.as_millis() as u64,
                        "connection refused; retrying until the connect timeout (is the target still starting?)"
                    );
                }
                refusals += 1;
                std::thread::sleep(wait);
                wait = (wait * 2).min(CONNECT_RETRY_MAX);
            }
            Err(e) => return Err(describe_connect(e, t, 0)),
        }
    }
}

fn le(d: &[u8], off: usize, n: usize) -> Option<u64> {
    d.get(off..off.checked_add(n)?)
        .map(|b| b.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
}

fn text(d: &[u8], off: usize, n: usize) -> String {
    d.get(off..off + n)
        .map(|b| String::from_utf8_lossy(b).trim().to_string())
        .unwrap_or_default()
}

/// How an I/O of `io_size` bytes goes out: (bytes per command, commands per I/O). Over `mdts`
/// the I/O is split, as SPDK's NVMe driver does, into commands of the largest multiple of
/// `block_size` (the largest block size of the namespaces used) that fits.
pub fn split_io(io_size: u32, mdts: Option<u64>, block_size: u32) -> Result<(u32, u32), PerfError> {
    match mdts {
        Some(m) if u64::from(io_size) > m => {
            let bs = u64::from(block_size.max(1));
            let cmd = m / bs * bs;
            if cmd == 0 {
                return Err(PerfError::Usage(format!(
                    "the controller's maximum transfer (MDTS) of {m} bytes is below one \
                     {block_size}-byte block"
                )));
            }
            Ok((cmd as u32, io_size.div_ceil(cmd as u32)))
        }
        _ => Ok((io_size, 1)),
    }
}

/// The largest transfer allowed: `mdts` (Identify byte 77, a power of two of the minimum page
/// size, 0 = unlimited) and CAP.MPSMIN.
pub fn mdts_bytes(mdts: u8, cap: u64) -> Option<u64> {
    if mdts == 0 {
        return None;
    }
    let mpsmin = (cap >> 48) & 0xf;
    let page = 4096u64 << mpsmin;
    Some(page.checked_shl(u32::from(mdts)).unwrap_or(u64::MAX))
}

/// The admin queue and what it learned (control thread only).
pub struct Controller {
    admin: HostQpair,
    target: TargetSpec,
    pub info: ControllerInfo,
    ka_every: Option<Duration>,
    last_ka: Instant,
    /// Bytes per I/O command and commands per I/O of the run (split over MDTS).
    pub(super) cmd_bytes: u32,
    pub(super) split: u32,
    /// Extra controllers connected only to sit idle on the target (`--idle-connections`):
    /// kept alive with this one and shut down with it.
    idle: Vec<Controller>,
}

impl Controller {
    /// Connects the admin queue, enables the controller, and reads CAP and Identify Controller.
    pub fn connect(t: &TargetSpec) -> Result<Controller, PerfError> {
        let cfg = HostConfig {
            hostnqn: t.hostnqn.clone(),
            hostid: t.hostid,
            digests: t.digests,
            queue_depth: 32,
            kato_ms: t.kato_ms,
            max_io_size: 4096,
            in_capsule_max: 0,
            disable_sqflow: true,
            timeout: t.timeout,
        };
        let mut admin = connect_admin_retrying(t, cfg)?;
        let setup = |e: HostError| PerfError::Connect(format!("{}: controller setup: {e}", t.addr));
        let cap = admin.property_get(prop::CAP, true).map_err(setup)?;
        admin.enable().map_err(setup)?;
        let id = admin.identify_controller().map_err(setup)?;
        let mdts = id.get(ctrl_off::MDTS).copied().unwrap_or(0);
        let ioccsz = le(&id, ctrl_off::IOCCSZ, 4).unwrap_or(0) as u32;
        let info = ControllerInfo {
            cntlid: admin.cntlid(),
            model: text(&id, ctrl_off::MN, 40),
            serial: text(&id, ctrl_off::SN, 20),
            firmware: text(&id, ctrl_off::FR, 8),
            mdts_bytes: mdts_bytes(mdts, cap),
            max_queue_entries: (cap & 0xffff) as u32 + 1,
            in_capsule_bytes: ioccsz.saturating_mul(16).saturating_sub(64),
            maxh2cdata: 0,
            header_digest: admin.digests().header,
            data_digest: admin.digests().data,
            kato_ms: t.kato_ms,
            io_queues_granted: 0,
        };
        let ka_every = (t.kato_ms > 0).then(|| Duration::from_millis(u64::from(t.kato_ms) / 2));
        Ok(Controller {
            admin,
            target: t.clone(),
            info,
            ka_every,
            last_ka: Instant::now(),
            cmd_bytes: 0,
            split: 1,
            idle: Vec::new(),
        })
    }

    /// Identify Namespace `nsid`; an inactive or unknown namespace is an error.
    pub fn namespace(&mut self, nsid: u32) -> Result<NsInfo, PerfError> {
        let (num_blocks, block_size) = match self.admin.namespace_geometry(nsid) {
            Ok(g) => g,
            Err(HostError::Status { status, .. }) => {
                return Err(PerfError::Usage(format!(
                    "namespace {nsid} of {}: Identify failed with {status:?}",
                    self.target.subnqn
                )))
            }
            Err(e) => {
                return Err(PerfError::Connect(format!(
                    "Identify Namespace {nsid}: {e}"
                )))
            }
        };
        if num_blocks == 0 {
            return Err(PerfError::Usage(format!(
                "namespace {nsid} is not active on {}",
                self.target.subnqn
            )));
        }
        Ok(NsInfo {
            nsid,
            block_size,
            num_blocks,
        })
    }

    /// Set Features Number of Queues: asks for `n` I/O queue pairs; errors if fewer are granted.
    pub fn request_io_queues(&mut self, n: u16) -> Result<u16, PerfError> {
        let want = u32::from(n.saturating_sub(1));
        let sqe = Sqe {
            opcode: admin_op::SET_FEATURES,
            cdw10: u32::from(feature::NUMBER_OF_QUEUES),
            cdw11: want | (want << 16),
            ..Default::default()
        };
        let (cqe, _) = self
            .admin
            .admin_cmd(sqe, Dir::None, &[], 0)
            .map_err(|e| PerfError::Connect(format!("Set Features (Number of Queues): {e}")))?;
        let granted = ((cqe.dw0 & 0xffff).min(cqe.dw0 >> 16) + 1).min(u32::from(u16::MAX)) as u16;
        self.info.io_queues_granted = granted;
        if granted < n {
            return Err(PerfError::Usage(format!(
                "the controller grants {granted} I/O queues, {n} asked for (fewer cores or --queues-per-core)"
            )));
        }
        Ok(granted)
    }

    /// Connects I/O queue `qid` with this controller's id.
    pub fn connect_io_queue(
        &mut self,
        qid: u16,
        depth: u16,
        max_io: u32,
    ) -> Result<HostQpair, PerfError> {
        let in_capsule = self.info.in_capsule_bytes.min(max_io);
        let cfg = HostConfig {
            hostnqn: self.target.hostnqn.clone(),
            hostid: self.target.hostid,
            digests: self.target.digests,
            queue_depth: depth,
            kato_ms: 0,
            max_io_size: max_io,
            in_capsule_max: in_capsule,
            disable_sqflow: true,
            timeout: self.target.timeout,
        };
        let q = HostQpair::connect(
            self.target.addr,
            &self.target.subnqn,
            qid,
            self.info.cntlid,
            cfg,
        )
        .map_err(|e| describe_connect(e, &self.target, qid))?;
        if self.info.maxh2cdata == 0 {
            self.info.maxh2cdata = q.maxh2cdata();
        }
        Ok(q)
    }

    /// Sends a Keep Alive when half the KATO has passed since the last one (control thread;
    /// blocking for one round trip).
    pub fn keep_alive_tick(&mut self) -> Result<(), PerfError> {
        for c in self.idle.iter_mut() {
            c.keep_alive_tick()?;
        }
        let Some(every) = self.ka_every else {
            return Ok(());
        };
        if self.last_ka.elapsed() < every {
            return Ok(());
        }
        self.last_ka = Instant::now();
        let sqe = Sqe {
            opcode: admin_op::KEEP_ALIVE,
            ..Default::default()
        };
        match self.admin.admin_cmd(sqe, Dir::None, &[], 0) {
            Ok(_) => Ok(()),
            Err(HostError::Status { status, .. }) if status == Status::INVALID_OPCODE => {
                // A controller without keep alive: stop asking.
                self.ka_every = None;
                Ok(())
            }
            Err(e) => Err(PerfError::Run(format!("keep alive: {e}"))),
        }
    }

    /// Connects `n` more controllers (admin queue: ICReq, Fabrics Connect, enable, Identify) to
    /// the same target as the same host, which then sit idle except for their keep alives: the
    /// target's cost of idle connections shows in the run's numbers (`--idle-connections`).
    pub fn connect_idle(&mut self, n: usize) -> Result<(), PerfError> {
        self.idle.reserve(n);
        for i in 0..n {
            let c = Controller::connect(&self.target).map_err(|e| {
                PerfError::Connect(format!("idle connection {} of {n}: {e}", i + 1))
            })?;
            self.idle.push(c);
        }
        Ok(())
    }

    /// Idle controllers connected by [`Controller::connect_idle`].
    pub fn idle_connections(&self) -> usize {
        self.idle.len()
    }

    /// Normal shutdown (CC.SHN, wait for CSTS.SHST complete, bounded) and a clean TCP close,
    /// idle controllers first.
    pub fn disconnect(mut self) {
        for c in std::mem::take(&mut self.idle) {
            c.disconnect();
        }
        let deadline = Instant::now() + self.target.timeout.min(Duration::from_secs(5));
        if let Ok(cc) = self.admin.property_get(prop::CC, false) {
            let cc = (cc as u32 & !prop::CC_SHN_MASK) | (1 << prop::CC_SHN_SHIFT);
            if self.admin.property_set(prop::CC, cc).is_ok() {
                while Instant::now() < deadline {
                    match self.admin.property_get(prop::CSTS, false) {
                        Ok(c) if c as u32 & prop::CSTS_SHST_MASK == prop::CSTS_SHST_COMPLETE => {
                            break
                        }
                        Ok(_) => std::thread::sleep(Duration::from_millis(1)),
                        Err(_) => break,
                    }
                }
            }
        }
        close_all(&[&self.admin], deadline);
    }
}

/// Half-closes every socket (FIN, not RST: nothing is left unread) and waits, bounded, for the
/// controller to close its side.
pub(super) fn close_all(qps: &[&HostQpair], deadline: Instant) {
    for q in qps {
        let _ = q.stream().shutdown(Shutdown::Write);
    }
    let mut open: Vec<bool> = vec![true; qps.len()];
    let mut sink = [0u8; 4096];
    while open.iter().any(|&o| o) && Instant::now() < deadline {
        for (q, o) in qps.iter().zip(open.iter_mut()) {
            if !*o {
                continue;
            }
            match (&mut q.stream()).read(&mut sink) {
                Ok(0) => *o = false,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => *o = false,
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvmf::pdu::Digests;

    #[test]
    fn mdts_uses_the_minimum_page_size() {
        assert_eq!(mdts_bytes(0, 0), None);
        assert_eq!(mdts_bytes(5, 0), Some(128 * 1024));
        // MPSMIN = 1: 8 KiB pages.
        assert_eq!(mdts_bytes(5, 1 << 48), Some(256 * 1024));
        assert_eq!(mdts_bytes(255, 0), Some(u64::MAX));
    }

    fn spec_t() -> TargetSpec {
        TargetSpec {
            addr: "127.0.0.1:4420".parse().unwrap(),
            subnqn: "nqn.x:sub".into(),
            hostnqn: "nqn.x:host".into(),
            hostid: [0; 16],
            digests: Digests::default(),
            kato_ms: 0,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn connect_refusals_are_described() {
        let t = spec_t();
        let e = describe_connect(
            HostError::Status {
                status: Status::CONNECT_INVALID_PARAMETERS,
                // What Linux nvmet answers for an unknown subsystem.
                dw0: (1 << 16) | 256,
            },
            &t,
            0,
        );
        assert!(
            matches!(&e, PerfError::Connect(m) if m.contains("no subsystem nqn.x:sub")),
            "{e}"
        );
        let e = describe_connect(
            HostError::Status {
                status: Status::CONNECT_INVALID_HOST,
                dw0: 0,
            },
            &t,
            0,
        );
        assert!(
            matches!(&e, PerfError::Connect(m) if m.contains("nqn.x:host is not allowed")),
            "{e}"
        );
        let e = describe_connect(
            HostError::Status {
                status: Status::CONNECT_INVALID_PARAMETERS,
                dw0: 44,
            },
            &t,
            3,
        );
        assert!(
            matches!(&e, PerfError::Connect(m) if m.contains("I/O queue 3") && m.contains("queue size")),
            "{e}"
        );
    }

    #[test]
    fn identify_text_and_numbers_never_panic_on_short_data() {
        assert_eq!(le(&[1, 2], 0, 4), None);
        assert_eq!(le(&[1, 2, 0, 0], 0, 4), Some(0x0201));
        assert_eq!(le(&[], usize::MAX, 4), None);
        assert_eq!(text(b"ab  ", 0, 4), "ab");
        assert_eq!(text(b"ab", 0, 4), "");
    }
}
