//! Engine-level tools driven from the CLI: [`bdevperf`] (SPDK's bdevperf for nvseal's bdev
//! stacks) and [`nvmeperf`] (`nvseal perf`, an NVMe/TCP load generator). The bdev stack builder
//! they used to share with `serve` is [`crate::stack`].

pub mod bdevperf;
pub mod nvmeperf;
