//! NVMe over Fabrics on TCP: the target (and the host side used by `nvseal perf` and tests).
//!
//! * [`pdu`] — the NVMe/TCP PDU codec (pure functions, fuzzed).
//! * [`config`] — subsystem configuration and transport limits.
//! * [`target`] — subsystems, namespaces, controllers (dynamic model), discovery, the listener.
//! * [`conn`] — one target queue pair: the transport state machines and the I/O path.
//! * `admin` — Fabrics and admin command handlers of a target queue pair.
//! * [`host`] — a non-blocking initiator queue pair.
//!
//! Threads: the control thread builds the [`Target`]; each reactor owns the [`Connection`]s it
//! accepted (a connection never moves between reactors once created) and polls them; the host
//! side runs on whichever thread drives it. See docs/nvmf.md for the request state machine,
//! the limits and what is supported.

mod admin;
pub mod config;
pub mod conn;
pub mod erase;
/// The whole-[`Connection`] driver of the `connection` fuzz target and tests/connection_fuzz.rs.
#[doc(hidden)]
pub mod fuzzing;
pub mod host;
pub mod listener;
pub mod pdu;
pub mod poll_group;
pub mod target;

pub use config::{Limits, ListenAddr, NamespaceConfig, SubsystemConfig, DISCOVERY_NQN};
pub use conn::{ConnError, Connection, ReqState};
pub use poll_group::{GroupStats, PollGroup};
pub use target::{Controller, Listener, Namespace, Subsystem, Target, TargetError};
