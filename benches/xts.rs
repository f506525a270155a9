//! AES-256-XTS throughput: every available kernel tier against OpenSSL, in the same run.
//!
//! `cargo bench --bench xts` prints a table; `cargo bench --bench xts -- --json` (or
//! `NVSEAL_BENCH_JSON=1`) prints one JSON document instead. `NVSEAL_BENCH_ROUNDS` (default 11)
//! and `NVSEAL_BENCH_SAMPLE_MS` (default 4) trade time for stability; `NVSEAL_BENCH_TIERS`
//! (comma-separated tier names) limits the tiers measured.
//!
//! Method: one thread pinned to one CPU; each sample runs the operation in a loop on a cache-hot
//! buffer, in place, and divides the bytes by the thread's CPU time (CLOCK_THREAD_CPUTIME_ID), so
//! time the thread spent descheduled by other processes does not count. Rounds interleave every
//! (size, implementation, direction) cell so drifting clocks and noisy neighbours hit all cells
//! alike; the median over rounds is reported. OpenSSL (libcrypto's aes-256-xts through the
//! `openssl` crate) reuses one cipher context per key and resets the IV per data unit, as a
//! crypto bdev on top of OpenSSL would.

use std::hint::black_box;

use nvseal::crypto::key::XtsKey;
use nvseal::crypto::xts::{Tier, UnitRun, Xts};
use nvseal::sys::buf::AlignedBuf;
use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;

/// A benchmark shape: `total` bytes per call made of `unit`-byte data units.
struct Row {
    name: &'static str,
    total: usize,
    unit: usize,
}

const ROWS: [Row; 4] = [
    Row {
        name: "512 B",
        total: 512,
        unit: 512,
    },
    Row {
        name: "4 KiB",
        total: 4096,
        unit: 4096,
    },
    Row {
        name: "128 KiB = 32 x 4 KiB",
        total: 128 * 1024,
        unit: 4096,
    },
    Row {
        name: "128 KiB = 256 x 512 B",
        total: 128 * 1024,
        unit: 512,
    },
];

#[derive(Clone, Copy, PartialEq)]
enum Imp {
    Ours(Tier),
    OpenSsl,
}

impl Imp {
    fn name(self) -> &'static str {
        match self {
            Imp::Ours(t) => t.name(),
            Imp::OpenSsl => "openssl",
        }
    }
}

struct OpenSslXts {
    enc: CipherCtx,
    dec: CipherCtx,
}

impl OpenSslXts {
    fn new(key: &[u8; 64]) -> OpenSslXts {
        let mut enc = CipherCtx::new().expect("ctx");
        enc.encrypt_init(Some(Cipher::aes_256_xts()), Some(key), None)
            .expect("init");
        let mut dec = CipherCtx::new().expect("ctx");
        dec.decrypt_init(Some(Cipher::aes_256_xts()), Some(key), None)
            .expect("init");
        OpenSslXts { enc, dec }
    }

    fn run(&mut self, decrypt: bool, data: &mut [u8], unit: usize, first: u64) {
        for (i, u) in data.chunks_exact_mut(unit).enumerate() {
            let iv = (u128::from(first) + i as u128).to_le_bytes();
            let len = u.len();
            if decrypt {
                self.dec.decrypt_init(None, None, Some(&iv)).expect("iv");
                self.dec.cipher_update_inplace(u, len).expect("update");
            } else {
                self.enc.encrypt_init(None, None, Some(&iv)).expect("iv");
                self.enc.cipher_update_inplace(u, len).expect("update");
            }
        }
    }
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The batch comparison: this many 4 KiB I/Os, each in its own buffer `BATCH_STRIDE` apart, by
/// the best tier, one `*_units` call per I/O against one `*_runs` call for all of them (what the
/// crypto bdev does with the I/Os of one poll).
const BATCH_IOS: usize = 8;
const BATCH_STRIDE: usize = 16 * 1024;

struct BatchCell {
    batched: bool,
    decrypt: bool,
    iters: u64,
    samples: Vec<f64>,
}

struct Cell {
    row: usize,
    imp: Imp,
    decrypt: bool,
    iters: u64,
    samples: Vec<f64>,
}

fn main() {
    let json = std::env::args().any(|a| a == "--json")
        || std::env::var("NVSEAL_BENCH_JSON").is_ok_and(|v| v != "0" && !v.is_empty());
    let rounds = env_num("NVSEAL_BENCH_ROUNDS", 11).max(1) as usize;
    let sample_ns = env_num("NVSEAL_BENCH_SAMPLE_MS", 4).max(1) * 1_000_000;

    let cpu = nvseal::sys::affinity::allowed_cpus().into_iter().last();
    let pinned = cpu.is_some_and(|c| nvseal::sys::affinity::pin_current_thread(c).is_ok());

    let key = XtsKey::generate().expect("key");
    // NVSEAL_BENCH_TIERS=vaes512,aesni restricts the tiers measured (OpenSSL always runs).
    let only: Option<Vec<Tier>> = std::env::var("NVSEAL_BENCH_TIERS").ok().map(|v| {
        v.split(',')
            .map(|t| t.parse().expect("tier name"))
            .collect()
    });
    let tiers: Vec<Tier> = Tier::all()
        .into_iter()
        .filter(|t| t.is_available() && only.as_ref().is_none_or(|o| o.contains(t)))
        .collect();
    let engines: Vec<Xts> = tiers
        .iter()
        .map(|&t| Xts::with_tier(&key, t).expect("tier"))
        .collect();
    let mut ossl = OpenSslXts::new(key.expose_secret());
    let mut buf = AlignedBuf::zeroed(128 * 1024, 4096).expect("buffer");
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (i * 131 + 7) as u8;
    }

    let mut imps: Vec<Imp> = tiers.iter().map(|&t| Imp::Ours(t)).collect();
    imps.push(Imp::OpenSsl);
    let mut cells = Vec::new();
    for row in 0..ROWS.len() {
        for &imp in &imps {
            for decrypt in [false, true] {
                cells.push(Cell {
                    row,
                    imp,
                    decrypt,
                    iters: 1,
                    samples: Vec::new(),
                });
            }
        }
    }

    let first_unit: u64 = 0x1_2345_6789;
    let mut run = |imp: Imp, decrypt: bool, row: &Row, data: &mut [u8]| match imp {
        Imp::Ours(t) => {
            let x = engines.iter().find(|e| e.tier() == t).expect("engine");
            let r = if decrypt {
                x.decrypt_units(data, row.unit, first_unit)
            } else {
                x.encrypt_units(data, row.unit, first_unit)
            };
            r.expect("xts");
        }
        Imp::OpenSsl => ossl.run(decrypt, data, row.unit, first_unit),
    };

    let best_engine = engines.last();
    let run_batch = |batched: bool, decrypt: bool, data: &mut [u8]| {
        let Some(x) = best_engine else { return };
        let ios = data
            .chunks_exact_mut(BATCH_STRIDE)
            .take(BATCH_IOS)
            .map(|c| &mut c[..4096])
            .zip((0u64..).map(|i| first_unit + i * 97));
        if batched {
            let runs = ios.map(|(d, t)| UnitRun::new(d, 4096, t).expect("run"));
            if decrypt {
                x.decrypt_runs(runs)
            } else {
                x.encrypt_runs(runs)
            }
        } else {
            for (d, t) in ios {
                let r = if decrypt {
                    x.decrypt_units(d, 4096, t)
                } else {
                    x.encrypt_units(d, 4096, t)
                };
                r.expect("xts");
            }
        }
    };
    let mut batch_cells: Vec<BatchCell> =
        [(false, false), (true, false), (false, true), (true, true)]
            .into_iter()
            .map(|(batched, decrypt)| BatchCell {
                batched,
                decrypt,
                iters: 1,
                samples: Vec::new(),
            })
            .collect();
    let batch_bytes = (BATCH_IOS * 4096) as u64;

    // Calibrate: iterations per sample so that one sample takes about sample_ns.
    for c in batch_cells.iter_mut() {
        let mut iters = 1u64;
        loop {
            let t0 = thread_cpu_ns();
            for _ in 0..iters {
                run_batch(c.batched, c.decrypt, black_box(buf.as_mut_slice()));
            }
            let dt = thread_cpu_ns() - t0;
            if dt >= sample_ns / 4 || iters >= 1 << 30 {
                c.iters = (iters * sample_ns / dt.max(1)).max(1);
                break;
            }
            iters *= 2;
        }
    }
    for c in cells.iter_mut() {
        let row = &ROWS[c.row];
        let data = &mut buf.as_mut_slice()[..row.total];
        let mut iters = 1u64;
        loop {
            let t0 = thread_cpu_ns();
            for _ in 0..iters {
                run(c.imp, c.decrypt, row, black_box(&mut *data));
            }
            let dt = thread_cpu_ns() - t0;
            if dt >= sample_ns / 4 || iters >= 1 << 30 {
                c.iters = (iters * sample_ns / dt.max(1)).max(1);
                break;
            }
            iters *= 2;
        }
    }
    for _ in 0..rounds {
        for c in cells.iter_mut() {
            let row = &ROWS[c.row];
            let data = &mut buf.as_mut_slice()[..row.total];
            let t0 = thread_cpu_ns();
            for _ in 0..c.iters {
                run(c.imp, c.decrypt, row, black_box(&mut *data));
            }
            let dt = (thread_cpu_ns() - t0).max(1);
            c.samples
                .push((row.total as u64 * c.iters) as f64 / dt as f64);
        }
        for c in batch_cells.iter_mut() {
            let t0 = thread_cpu_ns();
            for _ in 0..c.iters {
                run_batch(c.batched, c.decrypt, black_box(buf.as_mut_slice()));
            }
            let dt = (thread_cpu_ns() - t0).max(1);
            c.samples.push((batch_bytes * c.iters) as f64 / dt as f64);
        }
    }
    // ns per 4 KiB I/O: [encrypt one call each, encrypt batched, decrypt each, decrypt batched].
    let batch_ns: Vec<f64> = batch_cells
        .iter_mut()
        .map(|c| 4096.0 / median(&mut c.samples))
        .collect();

    let gbps = |cells: &mut Vec<Cell>, row: usize, imp: Imp, decrypt: bool| -> f64 {
        let c = cells
            .iter_mut()
            .find(|c| c.row == row && c.imp == imp && c.decrypt == decrypt);
        c.map(|c| median(&mut c.samples)).unwrap_or(f64::NAN)
    };
    let best = tiers.last().copied().unwrap_or(Tier::Soft);
    let mut results = Vec::new();
    for (ri, row) in ROWS.iter().enumerate() {
        for decrypt in [false, true] {
            let base = gbps(&mut cells, ri, Imp::OpenSsl, decrypt);
            for &imp in &imps {
                let v = gbps(&mut cells, ri, imp, decrypt);
                results.push((row.name, decrypt, imp, v, v / base));
            }
        }
    }
    let ns_4k = |decrypt: bool| {
        results
            .iter()
            .find(|r| r.0 == "4 KiB" && r.1 == decrypt && r.2 == Imp::Ours(best))
            .map(|r| 4096.0 / r.3)
            .unwrap_or(f64::NAN)
    };
    let cpu_desc = cpu.map(|c| c.to_string()).unwrap_or_else(|| "?".into());

    if json {
        let rows: Vec<serde_json::Value> = results
            .iter()
            .map(|(name, dec, imp, v, ratio)| {
                serde_json::json!({
                    "shape": name, "dir": if *dec { "decrypt" } else { "encrypt" },
                    "impl": imp.name(), "gb_per_s": v, "vs_openssl": ratio,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "method": "median of interleaved rounds; bytes / thread CPU time; in place; cache-hot",
            "rounds": rounds, "sample_ms": sample_ns / 1_000_000,
            "pinned_cpu": if pinned { Some(cpu_desc) } else { None },
            "best_tier": best.name(),
            "kernel_ns_per_4k": { "encrypt": ns_4k(false), "decrypt": ns_4k(true) },
            "batch": {
                "ios": BATCH_IOS, "io_bytes": 4096, "tier": best.name(),
                "ns_per_io": {
                    "encrypt_one_call_each": batch_ns[0], "encrypt_batched": batch_ns[1],
                    "decrypt_one_call_each": batch_ns[2], "decrypt_batched": batch_ns[3],
                },
            },
            "results": rows,
        });
        println!("{}", serde_json::to_string_pretty(&doc).expect("json"));
        return;
    }

    println!(
        "AES-256-XTS, in place, cache-hot, one thread {}.",
        if pinned {
            format!("pinned to CPU {cpu_desc}")
        } else {
            "(not pinned)".to_string()
        }
    );
    println!(
        "GB/s = bytes / thread CPU time (CLOCK_THREAD_CPUTIME_ID), median of {rounds} interleaved \
         rounds of ~{} ms samples; x = ratio to OpenSSL (reused ctx, IV reset per unit) in this run.",
        sample_ns / 1_000_000
    );
    println!();
    print!("{:<24} {:<4}", "shape", "dir");
    for imp in &imps {
        print!(" {:>17}", imp.name());
    }
    println!();
    for (ri, row) in ROWS.iter().enumerate() {
        for decrypt in [false, true] {
            print!(
                "{:<24} {:<4}",
                row.name,
                if decrypt { "dec" } else { "enc" }
            );
            for &imp in &imps {
                let r = results
                    .iter()
                    .find(|r| r.0 == ROWS[ri].name && r.1 == decrypt && r.2 == imp)
                    .map(|r| (r.3, r.4))
                    .unwrap_or((f64::NAN, f64::NAN));
                print!(" {:>7.2} ({:>5.2}x)", r.0, r.1);
            }
            println!();
        }
    }
    println!();
    println!(
        "kernel ns per 4 KiB ({}): encrypt {:.0} ns, decrypt {:.0} ns",
        best.name(),
        ns_4k(false),
        ns_4k(true)
    );
    println!(
        "{BATCH_IOS} x 4 KiB I/Os in separate buffers ({}), ns per I/O: encrypt {:.0} one call \
         each, {:.0} batched ({:.2}x); decrypt {:.0} one call each, {:.0} batched ({:.2}x)",
        best.name(),
        batch_ns[0],
        batch_ns[1],
        batch_ns[0] / batch_ns[1],
        batch_ns[2],
        batch_ns[3],
        batch_ns[2] / batch_ns[3]
    );
}
