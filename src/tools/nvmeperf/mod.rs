//! `nvseal perf`: an NVMe/TCP load generator in the manner of SPDK's `spdk_nvme_perf`.
//!
//! It owns the initiator side of a run: one admin queue pair on the control thread (Identify,
//! Set Features Number of Queues, keep-alive, the shutdown handshake), and N I/O queue pairs
//! ([`HostQpair`]) spread over M reactors. Each reactor runs one [`PhaseJob`] poller per phase
//! that keeps `queue_depth` commands in flight on each of its queues, records every completion's
//! latency in the reactor's own HDR histograms, and resubmits — with every buffer and slot
//! allocated when the queues connect, none per I/O. The control thread connects, starts phases,
//! sends keep-alives, prints progress and merges results; a phase hands its queues back when it
//! ends, so the same connections serve every slice of a run.
//!
//! It exists so nvseal (and any other NVMe/TCP target: SPDK's nvmf_tgt, Linux nvmet) can be
//! measured over the wire with the same workloads and reports as `nvseal bdevperf`, whose job
//! spec, verify pattern, per-side results and table it reuses. Only standard Fabrics/NVMe
//! behaviour is used: Identify for block size, capacity and MDTS; CAP for MQES and the page
//! size; the controller's IOCCSZ and MAXH2CDATA for in-capsule data and H2CData sizes; each I/O
//! queue connects with the admin queue's controller id.
//!
//! `--ab` runs the same workload against two namespaces of one subsystem (typically a plaintext
//! and an encrypted one) in alternating slices, so both see the same machine conditions.
//!
//! Its parts, all in this directory:
//!
//! * [`options`] — what a run is asked to do ([`PerfConfig`], [`TargetSpec`]) and the default
//!   host identity.
//! * [`controller`] — the admin queue ([`Controller`]): connect, Identify, keep-alive, I/O queue
//!   set-up and the shutdown handshake (control thread).
//! * [`engine`] — the data path: I/O queues ([`IoQueue`]) and the per-reactor [`PhaseJob`]
//!   poller that generates I/O and verifies it (reactor threads).
//! * [`mod@run`] — the control side of a run: phases, A/B slices, progress, the target probe.
//! * [`mod@report`] — fio-style JSON ([`PerfReport`]) and the text table.

pub mod controller;
pub mod engine;
pub mod options;
pub mod report;
pub mod run;

pub use controller::{mdts_bytes, split_io, Controller, ControllerInfo, NsInfo};
pub use engine::{IoQueue, PhaseJob, PhaseOutput};
pub use options::{default_host_identity, host_nqn_for, machine_id_uuid, PerfConfig, TargetSpec};
pub use report::{
    print_text, report, side_report, AbRatios, FioJob, FioLat, FioOp, GlobalOptions, PerfReport,
    FIO_PERCENTILES,
};
pub use run::{run, side_label, PerfOutcome, Progress};

/// Why a run did not happen or did not pass. The CLI maps these to exit codes 2, 3 and 1.
#[derive(Debug, thiserror::Error)]
pub enum PerfError {
    /// The options do not fit together or do not fit the controller (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The target could not be reached or refused us (exit code 3).
    #[error("{0}")]
    Connect(String),
    /// The run itself failed: transport errors, a target that stopped answering (exit code 1).
    #[error("{0}")]
    Run(String),
}
