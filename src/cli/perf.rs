//! `nvseal perf`: command-line driver of [`nvseal::tools::nvmeperf`], the NVMe/TCP load
//! generator. Parses options, prints progress on stderr, and the table or JSON on stdout.

use super::units::{parse_duration, parse_size};
use super::{fail, EXIT_FAILED, EXIT_STARTUP, EXIT_USAGE};
use clap::Args;
use nvseal::nvmf::pdu::Digests;
use nvseal::reactor::placement::{parse_cpu_list, Placement};
use nvseal::reactor::ReactorOptions;
use nvseal::tools::bdevperf::{JobSpec, Workload};
use nvseal::tools::nvmeperf::{self, PerfConfig, PerfError, TargetSpec};
use nvseal::types::CoreId;
use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    nvseal perf --traddr 127.0.0.1:4420 --subnqn nqn.2026-01.io.nvseal:disk0 -w randread -o 4k -q 32 -t 10\n  \
    nvseal perf --traddr 10.0.0.5 --subnqn NQN --ab --nsid-a 1 --nsid-b 2 -w randwrite -q 32 --json out.json\n  \
    nvseal perf --traddr 127.0.0.1:4420 --subnqn NQN --cores 2-3 --queues-per-core 2 -w read -o 128k -q 8\n  \
    nvseal perf --traddr 127.0.0.1:4420 --subnqn NQN -w randrw -M 70 --verify -n 10000 --hdgst --ddgst\n  \
    nvseal perf --traddr 127.0.0.1:4420 --subnqn NQN -w randwrite -o 4k -q 32 -t 10 --fua")]
pub struct PerfArgs {
    /// Target address: IP or host name, with an optional `:port` (default port: --trsvcid).
    #[arg(long)]
    pub traddr: String,
    /// Port when --traddr has none.
    #[arg(long, default_value_t = 4420)]
    pub trsvcid: u16,
    /// NQN of the subsystem to connect to.
    #[arg(long)]
    pub subnqn: String,
    /// Host NQN. Default: /etc/nvme/hostnqn, else a UUID NQN derived from /etc/machine-id.
    #[arg(long)]
    pub hostnqn: Option<String>,
    /// Host identifier (UUID). Default: /etc/nvme/hostid, or the UUID in the default host NQN.
    #[arg(long)]
    pub hostid: Option<String>,
    /// Namespace to run on.
    #[arg(long, default_value_t = 1, conflicts_with = "ab")]
    pub nsid: u32,
    /// Run the same workload on --nsid-a and --nsid-b in alternating slices; report both and b/a.
    #[arg(long)]
    pub ab: bool,
    /// Side a of --ab (e.g. the plaintext namespace).
    #[arg(long, default_value_t = 1, requires = "ab")]
    pub nsid_a: u32,
    /// Side b of --ab (e.g. the encrypted namespace).
    #[arg(long, default_value_t = 2, requires = "ab")]
    pub nsid_b: u32,
    /// Length of one --ab slice.
    #[arg(long, default_value = "1s")]
    pub slice: String,
    /// Workload.
    #[arg(short = 'w', long, value_enum, default_value = "randread")]
    pub workload: Workload,
    /// Percentage of reads for randrw.
    #[arg(short = 'M', long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmixread: u8,
    /// I/O size (bytes, or 4k, 128k, ...): a multiple of the namespace block size. Over the
    /// controller's MDTS each I/O is split into MDTS-sized commands (as SPDK's driver does).
    #[arg(short = 'o', long, default_value = "4k")]
    pub io_size: String,
    /// I/Os in flight per I/O queue (each split I/O holds all of its commands).
    #[arg(short = 'q', long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub queue_depth: u32,
    /// Run time per side (seconds, or 500ms, 2m).
    #[arg(short = 't', long, default_value = "10")]
    pub time: String,
    /// Stop each queue after this many I/Os instead of after --time.
    #[arg(short = 'n', long)]
    pub io_count: Option<u64>,
    /// Reactor cores as a CPU list ("1", "2-3"): one pinned reactor each.
    #[arg(long, conflicts_with = "reactors")]
    pub cores: Option<String>,
    /// Number of reactors, on the last CPUs this process may use (a local `nvseal serve`
    /// polls on the first by default; sharing its CPU would measure the two competing).
    #[arg(short = 'r', long, default_value_t = 1)]
    pub reactors: usize,
    /// I/O queue pairs (TCP connections) per reactor.
    #[arg(long, default_value_t = 1)]
    pub queues_per_core: usize,
    /// Ask for the NVMe/TCP header digest (CRC32C).
    #[arg(short = 'H', long)]
    pub hdgst: bool,
    /// Ask for the NVMe/TCP data digest (CRC32C).
    #[arg(short = 'I', long)]
    pub ddgst: bool,
    /// Control socket of the nvseal target under test (same machine): its reactors' busy % and
    /// CPU µs per I/O are read over `stats.reactors` for each side and shown in the report.
    #[arg(long, value_name = "SOCKET")]
    pub target_rpc: Option<std::path::PathBuf>,
    /// Keep alive timeout to ask for (ms; 0 = none). Keep Alive goes out every KATO/2.
    #[arg(long, default_value_t = 10_000)]
    pub kato: u32,
    /// Time limit of each connection and setup step.
    #[arg(long, default_value = "10s")]
    pub connect_timeout: String,
    /// Write a pattern, read it back and compare, for every I/O.
    #[arg(long)]
    pub verify: bool,
    /// Set Force Unit Access (CDW12 bit 30) on every Write: the target acknowledges each only
    /// once it is on stable storage (uring backend: RWF_DSYNC). Shows what durable writes cost.
    #[arg(long)]
    pub fua: bool,
    /// Connect this many extra controllers (admin queue pairs: ICReq, Connect, enable, Identify,
    /// then only keep alives) to the same target as the same host before the run, and leave them
    /// idle during it: what idle connections cost the target shows as the IOPS difference to a
    /// run without them. The target must admit that many connections from this host.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=4096))]
    pub idle_connections: u32,
    /// Seed for offsets and verify patterns.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Do not pin reactor threads (oversubscribed machines, tests).
    #[arg(long)]
    pub no_pin: bool,
    /// Write the JSON report here ("-" = stdout, which then carries no table).
    #[arg(long, value_name = "PATH")]
    pub json: Option<String>,
    /// No progress line.
    #[arg(long)]
    pub no_progress: bool,
}

fn resolve_addr(traddr: &str, port: u16) -> Result<SocketAddr, String> {
    if let Ok(a) = traddr.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = traddr.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let with_port = if traddr.contains(':') {
        traddr.to_string()
    } else {
        format!("{traddr}:{port}")
    };
    with_port
        .to_socket_addrs()
        .map_err(|e| format!("--traddr {traddr}: {e}"))?
        .next()
        .ok_or_else(|| format!("--traddr {traddr}: no address"))
}

fn config(a: &PerfArgs) -> Result<PerfConfig, String> {
    let io_size = parse_size(&a.io_size).map_err(|e| format!("--io-size: {e}"))? as usize;
    let time = parse_duration(&a.time).map_err(|e| format!("--time: {e}"))?;
    let slice = parse_duration(&a.slice).map_err(|e| format!("--slice: {e}"))?;
    let timeout =
        parse_duration(&a.connect_timeout).map_err(|e| format!("--connect-timeout: {e}"))?;
    if time.is_zero() || slice.is_zero() {
        return Err("--time and --slice must be positive".into());
    }
    if a.queues_per_core == 0 {
        return Err("--queues-per-core must be at least 1".into());
    }
    if a.ab && a.nsid_a == a.nsid_b {
        return Err("--nsid-a and --nsid-b must differ".into());
    }
    let addr = resolve_addr(&a.traddr, a.trsvcid)?;
    let (default_nqn, default_id) = nvmeperf::default_host_identity();
    let hostid = match &a.hostid {
        Some(s) => *uuid::Uuid::parse_str(s)
            .map_err(|e| format!("--hostid: {e}"))?
            .as_bytes(),
        None if a.hostnqn.is_some() => a
            .hostnqn
            .as_deref()
            .and_then(|n| n.rsplit(':').next())
            .and_then(|u| uuid::Uuid::parse_str(u).ok())
            .map_or(default_id, |u| *u.as_bytes()),
        None => default_id,
    };
    let allowed = nvseal::sys::affinity::allowed_cpus();
    let cores = match &a.cores {
        Some(c) => Placement::Fixed(parse_cpu_list(c).map_err(|e| format!("--cores: {e}"))?)
            .resolve(&allowed)
            .map_err(|e| format!("cores: {e}"))?,
        None => default_cores(a.reactors, &allowed).map_err(|e| format!("--reactors: {e}"))?,
    };
    Ok(PerfConfig {
        target: TargetSpec {
            addr,
            subnqn: a.subnqn.clone(),
            hostnqn: a.hostnqn.clone().unwrap_or(default_nqn),
            hostid,
            digests: Digests {
                header: a.hdgst,
                data: a.ddgst,
            },
            kato_ms: a.kato,
            timeout,
        },
        cores,
        queues_per_core: a.queues_per_core,
        spec: JobSpec {
            workload: a.workload,
            rwmixread: a.rwmixread,
            io_size,
            queue_depth: a.queue_depth as usize,
            verify: a.verify,
            seed: a.seed,
        },
        time,
        io_count: a.io_count,
        nsids: if a.ab {
            vec![a.nsid_a, a.nsid_b]
        } else {
            vec![a.nsid]
        },
        slice,
        reactor: ReactorOptions {
            // A load generator spins: no idle back-off.
            idle_backoff_us: 0,
            pin: !a.no_pin,
            ..ReactorOptions::default()
        },
        target_rpc: a.target_rpc.clone(),
        fua: a.fua,
        idle_connections: a.idle_connections as usize,
    })
}

/// Reactor cores when `--cores` is not given: the last `n` CPUs this process may use. A local
/// target's default reactor polls on the first one (`reactor.cores: 1`); a load generator
/// spinning on that CPU too would halve both and measure the contention.
fn default_cores(n: usize, allowed: &[CoreId]) -> Result<Vec<CoreId>, String> {
    let cores = Placement::Count(n).resolve(allowed)?;
    let last = allowed[allowed.len() - cores.len()..].to_vec();
    if last.len() == allowed.len() {
        tracing::warn!(
            cpus = %nvseal::reactor::placement::format_cpu_list(allowed),
            "perf takes every CPU this process may use: a target on this machine shares them (pick --cores apart from its reactor.cores)"
        );
    }
    Ok(last)
}

pub fn run(a: PerfArgs) -> ExitCode {
    match run_inner(&a) {
        Ok(code) => code,
        Err((code, msg)) => fail(code, msg),
    }
}

fn run_inner(a: &PerfArgs) -> Result<ExitCode, (u8, String)> {
    let cfg = config(a).map_err(|m| (EXIT_USAGE, m))?;
    let show_progress = !a.no_progress;
    let tty = std::io::stderr().is_terminal();
    let mut last_print = Instant::now();
    let outcome = nvmeperf::run(&cfg, &mut |p| {
        if show_progress && last_print.elapsed() >= Duration::from_millis(900) {
            last_print = Instant::now();
            let line = format!(
                "[{} slice {}/{}] {:.1}s {:>10.0} IOPS  total {} I/Os",
                p.side, p.slice, p.slices, p.side_secs, p.iops_now, p.side_ios
            );
            if tty {
                eprint!("\r{line}\x1b[K");
            } else {
                eprintln!("{line}");
            }
        }
    });
    if show_progress && tty {
        eprintln!();
    }
    let outcome = outcome.map_err(|e| match e {
        PerfError::Usage(m) => (EXIT_USAGE, m),
        PerfError::Connect(m) => (EXIT_STARTUP, m),
        PerfError::Run(m) => (EXIT_FAILED, m),
    })?;
    let report = nvmeperf::report(&cfg, &outcome);
    let json = serde_json::to_string_pretty(&report).map_err(|e| (EXIT_FAILED, e.to_string()))?;
    let mut out = std::io::stdout().lock();
    match a.json.as_deref() {
        Some("-") => {
            let _ = writeln!(out, "{json}");
        }
        other => {
            let c = &report.controller;
            let _ = writeln!(
                out,
                "perf: {} {:?} {} B QD{} x {} queue(s) on {} reactor(s) [{}], {:.1} s per side; \
                 controller {} \"{}\" cntlid {}, digests hdr={} data={}",
                cfg.target.addr,
                cfg.spec.workload,
                cfg.spec.io_size,
                cfg.spec.queue_depth,
                outcome.queues,
                outcome.cores.len(),
                report.global_options.cores,
                outcome.sides.first().map_or(0.0, |s| s.elapsed_s),
                c.serial,
                c.model,
                c.cntlid,
                c.header_digest,
                c.data_digest
            );
            if outcome.commands_per_io > 1 {
                let _ = writeln!(
                    out,
                    "perf: each I/O is split into {} commands (over the controller's MDTS of {} \
                     bytes); IOPS and latency count whole I/Os",
                    outcome.commands_per_io,
                    c.mdts_bytes.unwrap_or(0)
                );
            }
            nvmeperf::print_text(&mut out, &outcome);
            if let Some(path) = other {
                std::fs::write(path, format!("{json}\n"))
                    .map_err(|e| (EXIT_FAILED, format!("{path}: {e}")))?;
            }
        }
    }
    if outcome.failures() > 0 {
        for s in &outcome.sides {
            if let Some(e) = &s.first_error {
                eprintln!("nvseal: {}: {e}", s.label);
            }
        }
        return Ok(ExitCode::from(EXIT_FAILED));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_with_and_without_port() {
        assert_eq!(
            resolve_addr("127.0.0.1:4421", 4420).unwrap(),
            "127.0.0.1:4421".parse().unwrap()
        );
        assert_eq!(
            resolve_addr("127.0.0.1", 4420).unwrap(),
            "127.0.0.1:4420".parse().unwrap()
        );
        assert_eq!(
            resolve_addr("::1", 4420).unwrap(),
            "[::1]:4420".parse().unwrap()
        );
        assert!(resolve_addr("no such host.invalid", 4420).is_err());
    }

    #[test]
    fn default_reactors_avoid_the_first_cpu_a_local_target_polls_on() {
        let allowed = [0, 1, 2, 3].map(CoreId);
        assert_eq!(default_cores(1, &allowed).unwrap(), vec![CoreId(3)]);
        assert_eq!(
            default_cores(2, &allowed).unwrap(),
            vec![CoreId(2), CoreId(3)]
        );
        assert_eq!(default_cores(4, &allowed).unwrap(), allowed.to_vec());
        assert!(default_cores(5, &allowed).is_err());
        assert!(default_cores(0, &allowed).is_err());
    }
}
