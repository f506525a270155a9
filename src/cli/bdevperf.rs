//! `nvseal bdevperf`: command-line driver of [`nvseal::tools::bdevperf`].

use super::units::{parse_duration, parse_size};
use super::{fail, load_config, EXIT_FAILED, EXIT_STARTUP, EXIT_USAGE};
use clap::Args;
use nvseal::config::{BdevConfig, Config, CryptoBdevConfig, DevKeySource};
use nvseal::reactor::ReactorSet;
use nvseal::stack::Stacks;
use nvseal::tools::bdevperf::{
    print_table, run_phase, time_xts_kernel, JobSpec, KernelTime, Ratios, Side, SideReport,
    SideResult, Until, Workload,
};
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    nvseal bdevperf --malloc 1G -w randwrite -o 4k -q 32 -t 10 --ab\n  \
    nvseal bdevperf --null 64G -w randread -o 4k -q 32 -t 5\n  \
    nvseal bdevperf -c configs/bdevperf-malloc.yaml --bdev mem0 -w randrw -M 70 --ab --json out.json\n  \
    nvseal bdevperf --uring /var/tmp/disk.img --size 4G -w write -o 512k -q 8 --verify --encrypted")]
pub struct BdevperfArgs {
    /// Take the bdev stack from this YAML config (with --bdev).
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// Bdev to run on (from the config). With --ab or --encrypted, the plaintext base; the
    /// crypto bdev stacked on it is the encrypted side (one is created with an ephemeral key if
    /// the config has none).
    #[arg(long)]
    pub bdev: Option<String>,
    /// Use a `null` bdev of this size instead of a config (e.g. 64G).
    #[arg(long, value_name = "SIZE", conflicts_with_all = ["config", "malloc", "uring"])]
    pub null: Option<String>,
    /// Use a `malloc` RAM bdev of this size instead of a config (e.g. 1G).
    #[arg(long, value_name = "SIZE", conflicts_with_all = ["config", "uring"])]
    pub malloc: Option<String>,
    /// Use a `uring` bdev on this file or block device instead of a config.
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    pub uring: Option<PathBuf>,
    /// Size for a new --uring file.
    #[arg(long, value_name = "SIZE")]
    pub size: Option<String>,
    /// Open --uring without O_DIRECT (filesystems that refuse it, such as tmpfs).
    #[arg(long)]
    pub buffered: bool,
    /// Block size of a flag-built bdev (512 or 4096).
    #[arg(long, default_value_t = 4096)]
    pub block_size: u32,
    /// Back a --malloc bdev with 2 MiB hugepages (reserve them first).
    #[arg(long)]
    pub hugepages: bool,
    /// Workload.
    #[arg(short = 'w', long, value_enum, default_value = "randread")]
    pub workload: Workload,
    /// Percentage of reads for randrw.
    #[arg(short = 'M', long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmixread: u8,
    /// I/O size (bytes, or 4k, 512k, ...): a multiple of the block size.
    #[arg(short = 'o', long, default_value = "4k")]
    pub io_size: String,
    /// I/Os in flight per reactor.
    #[arg(short = 'q', long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub queue_depth: u32,
    /// Run time per side (seconds, or 500ms, 2m).
    #[arg(short = 't', long, default_value = "10")]
    pub time: String,
    /// Stop each reactor's job after this many I/Os instead of after --time.
    #[arg(short = 'n', long)]
    pub io_count: Option<u64>,
    /// Reactor cores as a CPU list ("0", "0-3,6"): one pinned reactor each.
    #[arg(long, conflicts_with = "reactors")]
    pub cores: Option<String>,
    /// Number of reactors, on the first CPUs this process may use. Default: the config's, else 1.
    #[arg(short = 'r', long)]
    pub reactors: Option<usize>,
    /// Run plaintext and encrypted, interleaved in slices, and report both with ratios.
    #[arg(long, conflicts_with = "encrypted")]
    pub ab: bool,
    /// Run only the encrypted stack.
    #[arg(long)]
    pub encrypted: bool,
    /// Length of one --ab slice.
    #[arg(long, default_value = "1s")]
    pub slice: String,
    /// Write, read back and compare every I/O; on encrypted stacks also check the backend holds
    /// no plaintext.
    #[arg(long)]
    pub verify: bool,
    /// Highest XTS tier (vaes512, vaes256, aesni, soft).
    #[arg(long)]
    pub max_tier: Option<String>,
    /// Seed for offsets and verify patterns.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the JSON report here ("-" = stdout, which then carries no table).
    #[arg(long, value_name = "PATH")]
    pub json: Option<String>,
    /// No progress line.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Serialize)]
struct Report {
    workload: Workload,
    io_size: usize,
    queue_depth: usize,
    reactors: usize,
    cores: String,
    time_per_side_s: f64,
    verify: bool,
    xts_tier: Option<String>,
    /// The XTS kernel's time for one I/O of `io_size` bytes, same reactor, same run.
    xts_kernel: Option<KernelTime>,
    sides: Vec<SideReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio_encrypted_over_plaintext: Option<Ratios>,
}

fn flag_config(a: &BdevperfArgs) -> Result<Option<Config>, String> {
    let size = |s: &str| parse_size(s).map_err(|e| format!("--size: {e}"));
    let yaml = if let Some(s) = &a.null {
        format!(
            "bdevs:\n  - name: null0\n    type: null\n    size_bytes: {}\n    block_size: {}\n",
            size(s)?,
            a.block_size
        )
    } else if let Some(s) = &a.malloc {
        format!(
            "bdevs:\n  - name: malloc0\n    type: malloc\n    size_bytes: {}\n    block_size: {}\n    hugepages: {}\n",
            size(s)?,
            a.block_size,
            a.hugepages
        )
    } else if let Some(p) = &a.uring {
        let sz = match &a.size {
            Some(s) => format!("    size_bytes: {}\n", size(s)?),
            None => String::new(),
        };
        let path = serde_json::to_string(&p.display().to_string()).map_err(|e| e.to_string())?;
        format!(
            "bdevs:\n  - name: uring0\n    type: uring\n    path: {path}\n{sz}    block_size: {}\n    direct: {}\n",
            a.block_size, !a.buffered
        )
    } else {
        return Ok(None);
    };
    Config::from_yaml(&yaml, "<command line>")
        .map(Some)
        .map_err(|e| e.to_string())
}

pub fn run(a: BdevperfArgs) -> ExitCode {
    match run_inner(&a) {
        Ok(code) => code,
        Err((code, msg)) => fail(code, msg),
    }
}

fn run_inner(a: &BdevperfArgs) -> Result<ExitCode, (u8, String)> {
    let usage = |m: String| (EXIT_USAGE, m);
    let io_size = parse_size(&a.io_size).map_err(|e| usage(format!("--io-size: {e}")))? as usize;
    let time = parse_duration(&a.time).map_err(|e| usage(format!("--time: {e}")))?;
    let slice = parse_duration(&a.slice).map_err(|e| usage(format!("--slice: {e}")))?;
    if slice.is_zero() || time.is_zero() {
        return Err(usage("--time and --slice must be positive".into()));
    }
    let mut cfg =
        match flag_config(a).map_err(usage)? {
            Some(c) => c,
            None if a.config.is_some() => {
                load_config(a.config.as_deref()).map_err(|e| usage(e.to_string()))?
            }
            None => return Err(usage(
                "give a bdev: --null SIZE, --malloc SIZE, --uring PATH, or -c CONFIG --bdev NAME"
                    .into(),
            )),
        };
    if let Some(t) = &a.max_tier {
        cfg.crypto.max_tier = Some(t.clone());
        if t.parse::<nvseal::crypto::xts::Tier>().is_err() {
            return Err(usage(format!(
                "--max-tier: unknown tier {t:?} (vaes512, vaes256, aesni, soft)"
            )));
        }
    }
    if let Some(c) = &a.cores {
        cfg.reactor.cores = nvseal::config::CoreSpec::List(c.clone());
    }
    if let Some(n) = a.reactors {
        cfg.reactor.cores = nvseal::config::CoreSpec::Count(n);
    }
    // bdevperf spins: no idle back-off, whatever the config says.
    cfg.reactor.idle_backoff_us = 0;

    // Which bdev is the plaintext base, and make sure an encrypted stack exists over it.
    let base_name = match &a.bdev {
        Some(n) => n.clone(),
        None => cfg
            .bdevs
            .iter()
            .find(|b| !matches!(b, BdevConfig::Crypto(_)))
            .map(|b| b.name().to_string())
            .ok_or_else(|| usage("the config has no bdevs".into()))?,
    };
    let base_cfg = cfg
        .bdev(&base_name)
        .ok_or_else(|| usage(format!("--bdev: no bdev named {base_name:?}")))?;
    let (base_name, enc_name) = if let BdevConfig::Crypto(c) = base_cfg {
        (c.base.clone(), c.name.clone())
    } else {
        let existing = cfg.bdevs.iter().find_map(|b| match b {
            BdevConfig::Crypto(c) if c.base == base_name => Some(c.name.clone()),
            _ => None,
        });
        let enc = existing.unwrap_or_else(|| format!("{base_name}-crypt"));
        if cfg.bdev(&enc).is_none() && (a.ab || a.encrypted) {
            cfg.bdevs.push(BdevConfig::Crypto(CryptoBdevConfig {
                name: enc.clone(),
                base: base_name.clone(),
                key: DevKeySource::Ephemeral,
                allow_discards: false,
            }));
        }
        (base_name, enc)
    };
    // A null bdev stores nothing: a read-back "passes" only because nothing is compared with
    // what was written, and under --encrypted the zeroes it returns decrypt to garbage that
    // looks like a leak. Refuse instead of reporting either.
    if a.verify && matches!(cfg.bdev(&base_name), Some(BdevConfig::Null(_))) {
        return Err(usage(format!(
            "--verify needs a bdev that stores data; {base_name} is a null bdev (writes are discarded, reads return zeroes): use --malloc or --uring"
        )));
    }
    let allowed = nvseal::sys::affinity::allowed_cpus();
    let cores = cfg
        .reactor
        .cores
        .placement()
        .and_then(|p| p.resolve(&allowed))
        .map_err(|e| usage(format!("cores: {e}")))?;
    let stacks = Stacks::open(&cfg).map_err(|e| (EXIT_STARTUP, e.to_string()))?;
    let base = stacks
        .get(&base_name)
        .ok_or_else(|| (EXIT_STARTUP, format!("bdev {base_name} did not open")))?;
    let enc = stacks.get(&enc_name);
    let set = ReactorSet::start(&cores, &cfg.reactor.options())
        .map_err(|e| (EXIT_STARTUP, e.to_string()))?;

    let spec = JobSpec {
        workload: a.workload,
        rwmixread: a.rwmixread,
        io_size,
        queue_depth: a.queue_depth as usize,
        verify: a.verify,
        seed: a.seed,
    };
    let mut sides: Vec<Side> = Vec::new();
    if !a.encrypted {
        sides.push(Side {
            label: "plaintext".into(),
            bdev: base.clone(),
            raw: None,
        });
    }
    if a.ab || a.encrypted {
        let e = enc
            .clone()
            .ok_or_else(|| (EXIT_STARTUP, format!("no crypto bdev over {base_name}")))?;
        sides.push(Side {
            label: "encrypted".into(),
            bdev: e,
            raw: Some(base.clone()),
        });
    }
    // Kernel timing for the crypto-cost comparison, on reactor 0, before the load.
    let crypto = stacks.crypto_keys.get(&enc_name).cloned();
    let (tier, kernel_ns) = match (&crypto, a.ab || a.encrypted) {
        (Some(k), true) => {
            let align = base.buf_align().max(64);
            let ns = time_xts_kernel(
                &set,
                k,
                io_size,
                base.block_size() as usize,
                a.queue_depth as usize,
                align,
            )
            .map_err(|e| (EXIT_STARTUP, e))?;
            (Some(k.tier().name().to_string()), Some(ns))
        }
        _ => (None, None),
    };

    let show_progress = !a.no_progress;
    let tty = std::io::stderr().is_terminal();
    let mut results: Vec<SideResult> = sides
        .iter()
        .map(|s| SideResult::new(&s.label, s.bdev.name()))
        .collect();
    let slices: Vec<Until> = match a.io_count {
        Some(n) => vec![Until::Count(n)],
        None if sides.len() > 1 => {
            let mut v = Vec::new();
            let mut left = time;
            while !left.is_zero() {
                let s = left.min(slice);
                v.push(Until::Time(s));
                left -= s;
            }
            v
        }
        None => vec![Until::Time(time)],
    };
    let nslices = slices.len();
    let mut last_print = std::time::Instant::now();
    for (k, until) in slices.iter().enumerate() {
        for (side, res) in sides.iter().zip(results.iter_mut()) {
            let label = side.label.clone();
            let done_before = res.stats.total_ios();
            let elapsed_before = res.elapsed_s;
            run_phase(&set, side, &spec, *until, res, &mut |_r, ios, secs| {
                if show_progress && last_print.elapsed() >= Duration::from_millis(900) {
                    last_print = std::time::Instant::now();
                    let rate = ios as f64 / secs.max(1e-9);
                    let line = format!(
                        "[{label} slice {}/{nslices}] {:.1}s {:>10.0} IOPS  total {} I/Os",
                        k + 1,
                        elapsed_before + secs,
                        rate,
                        done_before + ios
                    );
                    if tty {
                        eprint!("\r{line}\x1b[K");
                    } else {
                        eprintln!("{line}");
                    }
                }
            })
            .map_err(|e| (EXIT_FAILED, e))?;
        }
    }
    if show_progress && tty {
        eprintln!();
    }
    set.shutdown();

    let reports: Vec<SideReport> = results.iter().map(SideReport::from_side).collect();
    let ratios = if reports.len() == 2 {
        Some(Ratios::new(&reports[0], &reports[1], kernel_ns))
    } else {
        None
    };
    let report = Report {
        workload: a.workload,
        io_size,
        queue_depth: spec.queue_depth,
        reactors: cores.len(),
        cores: nvseal::reactor::placement::format_cpu_list(&cores),
        time_per_side_s: results.first().map_or(0.0, |r| r.elapsed_s),
        verify: a.verify,
        xts_tier: tier,
        xts_kernel: kernel_ns,
        sides: reports,
        ratio_encrypted_over_plaintext: ratios,
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| (EXIT_FAILED, e.to_string()))?;
    let mut out = std::io::stdout().lock();
    match a.json.as_deref() {
        Some("-") => {
            let _ = writeln!(out, "{json}");
        }
        other => {
            let _ = writeln!(
                out,
                "bdevperf: {:?} {} B QD{} on {} reactor(s) [{}], {:.1} s per side{}",
                a.workload,
                io_size,
                spec.queue_depth,
                report.reactors,
                report.cores,
                report.time_per_side_s,
                report
                    .xts_tier
                    .as_ref()
                    .map(|t| format!(", XTS tier {t}"))
                    .unwrap_or_default()
            );
            print_table(
                &mut out,
                &report.sides,
                report.ratio_encrypted_over_plaintext.as_ref(),
            );
            if let (Some(k), Some(r)) = (kernel_ns, report.ratio_encrypted_over_plaintext.as_ref())
            {
                let _ = writeln!(
                    out,
                    "crypto cost: {:.3} us/io over plaintext; XTS kernel alone (same run): {:.3} us/io hot \
                     -> {:.2}x, {:.3} us/io over {} rotating buffers -> {:.2}x",
                    r.crypto_us_per_io,
                    k.hot_ns / 1000.0,
                    r.crypto_cost_over_kernel_hot.unwrap_or(0.0),
                    k.working_set_ns / 1000.0,
                    spec.queue_depth,
                    r.crypto_cost_over_kernel_working_set.unwrap_or(0.0)
                );
            }
            if let Some(path) = other {
                std::fs::write(path, format!("{json}\n"))
                    .map_err(|e| (EXIT_FAILED, format!("{path}: {e}")))?;
            }
        }
    }
    let bad: u64 = results
        .iter()
        .map(|r| r.io_errors + r.verify_mismatches + r.plaintext_leaks)
        .sum();
    if bad > 0 {
        for r in &results {
            if let Some(e) = &r.first_error {
                eprintln!("nvseal: {}: {e}", r.label);
            }
        }
        return Ok(ExitCode::from(EXIT_FAILED));
    }
    Ok(ExitCode::SUCCESS)
}
