//! Engine-level tools driven from the CLI: [`bdevperf`] (SPDK's bdevperf for nvseal's bdev
//! stacks) and the bdev stack builder they share with `serve`.

pub mod bdevperf;
pub mod nvmeperf;
pub mod stack;
pub mod units;
