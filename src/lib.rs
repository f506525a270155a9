//! nvseal: an NVMe-over-Fabrics target that encrypts data at rest inline with AES-256-XTS.
//!
//! The crate is one library with one binary (`nvseal`, see `src/main.rs`). The library is split
//! by layer, bottom up:
//!
//! * [`sys`] — the only home of OS `unsafe`: CPU affinity, aligned/hugepage buffers, mlock,
//!   io_uring, the cycle clock.
//! * [`reactor`] — one pinned, busy-polling thread per core; pollers; bounded mailboxes.
//! * [`bdev`] — the block-device interface with per-reactor channels, and its backends.
//! * [`crypto`] — the AES-256-XTS engine (tiered `core::arch` kernels) and the crypto bdev.
//! * [`stats`] — HDR latency histograms recorded per reactor, merged off the data path.
//! * [`config`] — the YAML schema and its validation (errors carry key, line and column).
//! * [`leak`] — secret detection (field names, values, encodings), to redact and to test.
//! * [`audit`] — the audit trail of changes, a service below both [`rpc`] and [`keys`].
//! * [`spdk`] — the `spdk_nvme` bdev over SPDK's user-space NVMe driver (`spdk` feature).
//! * [`stack`] — builds the bdev stacks a config (or a `namespace.create` call) describes.
//! * [`server`] — `nvseal serve`: the target, the key manager and the control socket together.
//! * [`tools`] — `bdevperf` and `perf`, engine-level tools driven from the CLI.

pub mod audit;
pub mod bdev;
pub mod bundle;
pub mod config;
pub mod crypto;
pub mod keys;
pub mod kms;
pub mod leak;
pub mod nvme;
pub mod nvmf;
pub mod reactor;
pub mod rpc;
pub mod server;
pub mod spdk;
pub mod stack;
pub mod stats;
pub mod sys;
pub mod tools;
pub mod types;
