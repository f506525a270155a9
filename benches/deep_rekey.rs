//! Deep-rekey pass throughput: the whole pass (`keys::deep::run`: read, checksum, transform,
//! checksum, journal the checksums, write back durably, header update, per step) over a malloc →
//! slice → crypto stack, with its data I/O through a reactor ([`ReactorDataIo`]) and through a
//! private channel on the calling thread ([`BdevDataIo`]) in the same run, next to the ceilings
//! measured in the same run: XTS decrypt+encrypt of the same bytes in memory, the whole in-memory
//! work of a step (CRC-32C, decrypt, encrypt, CRC-32C: the best a pass can do without I/O), and
//! one memory copy (a step also copies each byte in and out of the I/O buffers).
//!
//! `cargo bench --bench deep_rekey` prints one table. Environment:
//! * `NVSEAL_BENCH_DEEP_MIB` — data area size (default 1024);
//! * `NVSEAL_BENCH_DEEP_SEGMENT_KIB` — the header's segment (default 2048; the pass's steps are
//!   2 MiB at most, `keys::deep::MAX_STEP_BYTES`; at most 65536);
//! * `NVSEAL_BENCH_DEEP_IO_KIB` — largest I/O of `ReactorDataIo` (default 128);
//! * `NVSEAL_BENCH_DEEP_PER_POLL` — its I/Os per reactor poll (default 1);
//! * `NVSEAL_BENCH_DEEP_ROUNDS` — passes of each kind, interleaved; the best is shown (default 2).
//!
//! Times are wall-clock (the reactor's thread works while the control thread waits), so run it on
//! an otherwise idle machine. The reactor is not pinned (set `NVSEAL_BENCH_PIN=<cpu>` to pin it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvseal::bdev::malloc::{MallocBdev, MallocConfig};
use nvseal::bdev::slice::SliceBdev;
use nvseal::bdev::Bdev;
use nvseal::crypto::bdev::{CryptoBdev, DataKey};
use nvseal::crypto::key::XtsKey;
use nvseal::keys::convert::{self, DataIo};
use nvseal::keys::deep::{
    run, BdevDataIo, NamespaceIo, PassControl, PassEnd, ReactorDataIo, ReactorIoOptions,
};
use nvseal::keys::header::{DataUnit, Header, KeySlot, RekeyState, METADATA_REGION_BYTES};
use nvseal::keys::header_io::BdevHeaderIo;
use nvseal::keys::provider::{KekId, ProviderKind};
use nvseal::keys::store::{self, Stored};
use nvseal::keys::wrap::{KekFingerprint, WrappedDek};
use nvseal::reactor::{ReactorOptions, ReactorSet};
use nvseal::types::CoreId;

const BS: u64 = 4096;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
        Err(_) => default,
    }
}

fn key(seed: u8) -> DataKey {
    let mut k = [0u8; 64];
    for (i, b) in k.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    DataKey::new(&XtsKey::from_bytes(&k).expect("key"), None).expect("data key")
}

fn slot(seed: u8) -> KeySlot {
    KeySlot {
        provider: ProviderKind::Local,
        kms_alias: "bench".into(),
        kek_id: KekId::new(format!("kek-{seed}")).expect("id"),
        fingerprint: KekFingerprint([seed; 32]),
        wrapped_dek: WrappedDek([seed; 72]),
    }
}

fn now() -> u64 {
    1_800_000_000
}

struct Bench {
    base: Arc<dyn Bdev>,
    crypto: Arc<CryptoBdev>,
    stored: Stored,
    key_seed: u8,
    segment_blocks: u32,
}

impl Bench {
    /// One deep rekey from the current key to the next over `data`; its throughput in GB/s.
    fn pass(&mut self, data: &mut dyn DataIo) -> f64 {
        let mut meta =
            BdevHeaderIo::new(self.base.clone(), CoreId(0), METADATA_REGION_BYTES).expect("meta");
        let mut io = NamespaceIo {
            meta: &mut meta,
            data,
        };
        let (old, new) = (key(self.key_seed), key(self.key_seed + 1));
        let cur = convert::begin(
            &mut io,
            &self.stored,
            slot(self.key_seed + 1),
            self.segment_blocks,
            now(),
        )
        .expect("begin");
        let ctl = self.crypto.key_control().clone();
        let control = PassControl::new(0);
        let t = Instant::now();
        let end = run(&mut io, cur, &ctl, &old, &new, &control, &now).expect("pass");
        let secs = t.elapsed().as_secs_f64();
        let PassEnd::Finished(done) = end else {
            panic!("pass paused");
        };
        self.stored = done;
        self.key_seed += 1;
        control.bytes_done() as f64 / secs / 1e9
    }
}

/// GB/s of `f` over `bytes` bytes per call, best of a few calls of at least 200 ms.
fn rate(bytes: u64, mut f: impl FnMut()) -> f64 {
    let mut best: f64 = 0.0;
    for _ in 0..3 {
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < Duration::from_millis(200) {
            f();
            n += 1;
        }
        best = best.max((n * bytes) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

fn main() {
    let mib = env_u64("NVSEAL_BENCH_DEEP_MIB", 1024);
    let seg_kib = env_u64("NVSEAL_BENCH_DEEP_SEGMENT_KIB", 2048);
    let io_kib = env_u64("NVSEAL_BENCH_DEEP_IO_KIB", 128);
    let per_poll = env_u64("NVSEAL_BENCH_DEEP_PER_POLL", 1) as usize;
    let rounds = env_u64("NVSEAL_BENCH_DEEP_ROUNDS", 2).max(1);
    let pin = std::env::var("NVSEAL_BENCH_PIN")
        .ok()
        .map(|v| CoreId(v.parse().expect("NVSEAL_BENCH_PIN: a cpu number")));
    let data_blocks = mib * 1024 * 1024 / BS;
    let meta_blocks = METADATA_REGION_BYTES / BS;
    let segment_blocks = (seg_kib * 1024 / BS) as u32;

    let base: Arc<dyn Bdev> = Arc::new(
        MallocBdev::new(&MallocConfig {
            name: "m".into(),
            num_blocks: Some(meta_blocks + data_blocks),
            size_bytes: None,
            block_size: BS as u32,
            hugepages: false,
        })
        .expect("malloc"),
    );
    let slice: Arc<dyn Bdev> =
        Arc::new(SliceBdev::new("s", base.clone(), meta_blocks, data_blocks).expect("slice"));
    let header = Header {
        generation: 1,
        device_uuid: uuid::Uuid::from_bytes([1; 16]),
        namespace_uuid: uuid::Uuid::from_bytes([2; 16]),
        data_unit: DataUnit::Bytes4096,
        data_offset_bytes: METADATA_REGION_BYTES,
        data_blocks,
        created_unix_s: now(),
        updated_unix_s: now(),
        active: slot(1),
        rekey: RekeyState::None,
        detached: None,
    };
    let mut meta = BdevHeaderIo::new(base.clone(), CoreId(0), METADATA_REGION_BYTES).expect("meta");
    let stored = store::format(&mut meta, &header).expect("format");
    let crypto = Arc::new(CryptoBdev::new("c", slice.clone(), key(1), false).expect("crypto"));
    // Touch every page first, so no pass pays the first-touch faults.
    {
        let mut w = BdevDataIo::new(slice.clone(), CoreId(0));
        let chunk = vec![0x5au8; 8 << 20];
        let mut lba = 0;
        while lba < data_blocks {
            let n = (chunk.len() as u64 / BS).min(data_blocks - lba);
            w.write_blocks_durable(lba, &chunk[..(n * BS) as usize])
                .expect("fill");
            lba += n;
        }
    }
    let mut b = Bench {
        base,
        crypto,
        stored,
        key_seed: 1,
        segment_blocks,
    };

    let set = ReactorSet::start(
        &[pin.unwrap_or(CoreId(0))],
        &ReactorOptions {
            pin: pin.is_some(),
            ..Default::default()
        },
    )
    .expect("reactor");
    let mailboxes = set.call(0, |r| r.mailboxes()).expect("mailboxes");
    let mut reactor_io = ReactorDataIo::with_options(
        mailboxes,
        0,
        slice.clone(),
        ReactorIoOptions {
            max_io_bytes: (io_kib * 1024) as usize,
            per_poll,
            ..Default::default()
        },
    )
    .expect("reactor data io");
    let mut bdev_io = BdevDataIo::new(slice.clone(), CoreId(0));
    let (mut via_reactor, mut via_thread) = (0f64, 0f64);
    for _ in 0..rounds {
        via_reactor = via_reactor.max(b.pass(&mut reactor_io));
        via_thread = via_thread.max(b.pass(&mut bdev_io));
    }

    // Ceilings, same step size, same keys' tier.
    let seg = (u64::from(segment_blocks) * BS).min(nvseal::keys::deep::MAX_STEP_BYTES) as usize;
    let mut buf = vec![0x33u8; seg];
    let mut other = vec![0u8; seg];
    let (k1, k2) = (key(100), key(101));
    let xts = rate(seg as u64, || {
        let _ = k1.xts().decrypt_units(&mut buf, BS as usize, 7);
        let _ = k2.xts().encrypt_units(&mut buf, BS as usize, 7);
    });
    let keys = convert::Keys {
        below: Some(k2.clone()),
        above: Some(k1.clone()),
    };
    let (mut before, mut after) = (Vec::new(), Vec::new());
    let work = rate(seg as u64, || {
        before.clear();
        after.clear();
        convert::convert_units(&mut buf, BS as usize, 7, &keys, &mut before, &mut after);
        std::hint::black_box((&before, &after));
    });
    let copy = rate(seg as u64, || {
        other.copy_from_slice(std::hint::black_box(&buf));
    });

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    println!("deep rekey pass, {mib} MiB data area, segment {seg_kib} KiB, 4 KiB units, malloc");
    println!("cpu: {cpu}; XTS tier: {:?}", k1.xts().tier());
    println!("reactor I/O: up to {io_kib} KiB per I/O, {per_poll} per poll; best of {rounds}");
    println!("{:<44} {:>8}", "", "GB/s");
    println!(
        "{:<44} {:>8.2}",
        "pass, data I/O through a reactor", via_reactor
    );
    println!(
        "{:<44} {:>8.2}",
        "pass, data I/O on the control thread", via_thread
    );
    println!(
        "{:<44} {:>8.2}",
        "ceiling: XTS decrypt+encrypt in memory", xts
    );
    println!(
        "{:<44} {:>8.2}",
        "ceiling: convert_units (2 CRC + XTS, fused)", work
    );
    println!("{:<44} {:>8.2}", "  one memcpy", copy);
    println!(
        "reactor / control thread: {:.2}; reactor / XTS ceiling: {:.2}; reactor / step work: {:.2}",
        via_reactor / via_thread,
        via_reactor / xts,
        via_reactor / work
    );
    drop(reactor_io);
    set.shutdown();
}
