//! SIGKILL crash harness for the conversion passes (deep rekey, encrypt, decrypt): the real
//! `nvseal serve` on a file is killed over and over while a pass runs and a host writes,
//! restarted, and checked.
//!
//! Each round starts `nvseal serve`, waits until the namespace is online (the unlock recovers
//! an interrupted segment and resumes the pass by itself), reads every block back and checks it
//! against what the host had acknowledged, starts a new pass if none runs (deep rekey; or, for
//! the encrypt/decrypt harness, `namespace.encrypt` on a plaintext namespace and
//! `namespace.decrypt` on an encrypted one, so the two alternate), and lets a
//! host write random blocks (each write a new generation of the block's pattern) until the
//! process dies. Half of the rounds arm a named crash point (`NVSEAL_CRASH_AT`, see
//! `src/keys/crashpoint.rs`: journal data written, journal flushed, half a segment written,
//! segment written, header updated, first copy of the finished header) at a random hit, so the
//! kill lands exactly at that step; the others kill at a random time. A write in flight at the
//! kill may land or not; every acknowledged one must be there after the restart.
//!
//! Counts: `NVSEAL_CRASH_KILLS` kills per test (deep rekey: default 50 for 4096-byte blocks, 20
//! for 512; encrypt/decrypt: 110 for 4096, 30 for 512); the summary line prints kills, kills per
//! operation (the pass running, or just started, when the target died), crash points hit,
//! recoveries that finished the pass, and acknowledged writes lost (asserted 0). The 4096-byte
//! encrypt/decrypt run must kill each of the two at least 50 times.

mod common;

use common::serve::{addr_of, Serve};
use nvseal::keys::crashpoint;
use nvseal::keys::header::METADATA_REGION_BYTES;
use nvseal::nvme::connect;
use nvseal::nvmf::host::{HostConfig, HostQpair};
use nvseal::rpc::client::call;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2026-12.io.nvseal:crash";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:c4a5c4a5-0000-4000-8000-000000000001";
const DATA_BYTES: u64 = 2 << 20;

/// splitmix64: the harness's only randomness (seeded, so a failure repeats).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn block(lba: u64, gen: u64, bs: u32) -> Vec<u8> {
    let mut v = vec![0u8; bs as usize];
    for (i, c) in v.chunks_mut(8).enumerate() {
        let w = (lba << 40) ^ (gen << 8) ^ i as u64;
        c.copy_from_slice(&w.to_le_bytes());
    }
    v
}

/// What each block may hold: the generations it may read back as (one after an acknowledged
/// write; two when a write was in flight at a kill).
struct Model {
    may: Vec<Vec<u64>>,
    gen: u64,
}

/// Which passes a harness drives.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Ops {
    /// `rekey.deep` on an encrypted namespace.
    Deep,
    /// `namespace.encrypt` / `namespace.decrypt` in turn on a namespace that starts plaintext.
    EncDec,
}

fn config(d: &Path, bs: u32, ops: Ops) -> PathBuf {
    let mode = match ops {
        Ops::Deep => "create: true",
        Ops::EncDec => "plaintext: true",
    };
    let cfg = d.join("crash.yaml");
    std::fs::write(
        &cfg,
        format!(
            "reactor:\n  cores: 1\n  pin: false\n  idle_backoff_us: 20\n\
             keys:\n  local:\n    path: {keys}\n    create: true\n  audit_log: {audit}\n\
             rpc:\n  socket_path: {sock}\n\
             bdevs:\n  - name: disk\n    type: uring\n    path: {img}\n    size_bytes: {size}\n    block_size: {bs}\n\
             \x20 - name: vol\n    type: encrypted\n    base: disk\n    provider: local\n    {mode}\n\
             subsystems:\n  - nqn: {NQN}\n    serial: CRASH1\n    allowed_hosts: [\"{HOST}\"]\n\
             \x20   namespaces:\n      - nsid: 1\n        bdev: vol\n        encrypted: true\n\
             \x20   listen:\n      - addr: 127.0.0.1\n        port: 0\n",
            keys = d.join("keys").display(),
            audit = d.join("audit.jsonl").display(),
            sock = d.join("rpc.sock").display(),
            img = d.join("disk.img").display(),
            size = METADATA_REGION_BYTES + DATA_BYTES,
        ),
    )
    .unwrap();
    cfg
}

fn connect_io(addr: SocketAddr) -> Option<(HostQpair, HostQpair)> {
    let cfg = HostConfig {
        hostnqn: HOST.into(),
        queue_depth: 16,
        timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let mut admin = HostQpair::connect(addr, NQN, 0, connect::CNTLID_DYNAMIC, cfg.clone()).ok()?;
    admin.enable().ok()?;
    let q = HostQpair::connect(addr, NQN, 1, admin.cntlid(), cfg).ok()?;
    Some((admin, q))
}

/// Reads every block and checks it against the model; returns how many blocks hold something
/// no acknowledged or in-flight write put there (lost acknowledged writes), or None if the
/// connection died first (the target killed itself at a crash point).
fn verify(q: &mut HostQpair, m: &mut Model, bs: u32) -> Option<usize> {
    let blocks = DATA_BYTES / u64::from(bs);
    let per = u64::from(64 * 1024 / bs);
    let mut lost = 0;
    let mut lba = 0;
    while lba < blocks {
        let n = per.min(blocks - lba);
        let got = read(q, lba, n as u32, bs)?;
        for k in 0..n {
            let b = lba + k;
            let r = (k * u64::from(bs)) as usize..((k + 1) * u64::from(bs)) as usize;
            let may = &m.may[b as usize];
            match may.iter().find(|&&g| got[r.clone()] == block(b, g, bs)[..]) {
                Some(&g) => m.may[b as usize] = vec![g],
                None => {
                    eprintln!("block {b}: holds none of generations {may:?}");
                    lost += 1;
                }
            }
        }
        lba += n;
    }
    Some(lost)
}

/// One read to completion; None if the connection fails.
fn read(q: &mut HostQpair, lba: u64, nlb: u32, bs: u32) -> Option<Vec<u8>> {
    q.read(1, lba, nlb, bs, 0).ok()?;
    let mut out = None;
    let t0 = Instant::now();
    while out.is_none() {
        q.poll(&mut |c| {
            assert!(c.cqe.status().is_success(), "read: {:?}", c.cqe.status());
            out = Some(c.data.to_vec());
        })
        .ok()?;
        if t0.elapsed() > Duration::from_secs(20) {
            return None;
        }
    }
    out
}

/// Writes random blocks (up to 8 in flight, never two to one block) until the connection dies
/// or `until` passes. Acknowledged writes narrow the model; writes in flight at the end widen it.
fn write_until(q: &mut HostQpair, m: &mut Model, rng: &mut Rng, bs: u32, until: Instant) {
    let blocks = DATA_BYTES / u64::from(bs);
    let mut inflight: HashMap<u64, (u64, u64)> = HashMap::new(); // tag -> (lba, gen)
    let mut busy: BTreeMap<u64, ()> = BTreeMap::new();
    let mut tag = 0u64;
    'run: while Instant::now() < until {
        while inflight.len() < 8 {
            let lba = rng.below(blocks);
            if busy.contains_key(&lba) {
                continue;
            }
            m.gen += 1;
            tag += 1;
            // Until acknowledged, the block may hold the old or the new generation.
            m.may[lba as usize].push(m.gen);
            if q.write(1, lba, &block(lba, m.gen, bs), bs, tag).is_err() {
                break 'run;
            }
            inflight.insert(tag, (lba, m.gen));
            busy.insert(lba, ());
        }
        let mut failed = false;
        let r = q.poll(&mut |c| {
            if let Some((lba, gen)) = inflight.remove(&c.tag) {
                busy.remove(&lba);
                if c.cqe.status().is_success() {
                    m.may[lba as usize] = vec![gen];
                } else {
                    failed = true;
                }
            }
        });
        if r.is_err() || failed {
            break;
        }
    }
}

fn rekey_state(sock: &Path) -> Option<String> {
    pass_of(sock).map(|(state, _)| state)
}

/// The namespace's pass (state, operation), if any.
fn pass_of(sock: &Path) -> Option<(String, String)> {
    let v = call(sock, "rekey.status", Some(json!({ "namespace": "vol" }))).ok()?;
    let p = &v["rekeys"][0];
    Some((
        p["state"].as_str()?.to_owned(),
        p["operation"].as_str()?.to_owned(),
    ))
}

fn data_state(sock: &Path) -> Option<String> {
    let v = call(sock, "keys.status", Some(json!({}))).ok()?;
    v["namespaces"][0]["data_state"].as_str().map(str::to_owned)
}

/// Starts the next pass if none runs; returns the operation that runs now (if any) and whether
/// this call started it.
fn next_pass(sock: &Path, ops: Ops) -> (Option<String>, bool) {
    let pass = pass_of(sock);
    if let Some((state, op)) = &pass {
        if state == "running" {
            return (Some(op.clone()), false);
        }
    }
    // Encrypt/decrypt slower, so that most random kills land inside a pass.
    let rate = if ops == Ops::Deep { 8 } else { 2 };
    let p = json!({ "namespace": "vol", "rate_mib_s": rate });
    let (method, op) = match ops {
        Ops::Deep => ("rekey.deep", "deep_rekey"),
        Ops::EncDec => match data_state(sock).as_deref() {
            Some("plaintext") => ("namespace.encrypt", "encrypt"),
            Some("encrypted") => ("namespace.decrypt", "decrypt"),
            _ => return (None, false),
        },
    };
    match call(sock, method, Some(p)) {
        Ok(_) => (Some(op.to_owned()), true),
        Err(_) => (None, false),
    }
}

fn harness(bs: u32, default_kills: u64, seed: u64, ops: Ops) {
    let kills: u64 = std::env::var("NVSEAL_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_kills);
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let d = dir.path();
    let cfg = config(d, bs, ops);
    let sock = d.join("rpc.sock");
    let blocks = DATA_BYTES / u64::from(bs);
    let mut rng = Rng(seed);
    // Generation 0 is a block never written: it reads back as whatever the blank (encrypted)
    // area decrypts to; fill everything once so every block has a known generation.
    let mut m = Model {
        may: vec![vec![]; blocks as usize],
        gen: 0,
    };
    {
        let mut s = Serve::start(&cfg);
        let addr = addr_of(&s.wait_for("NVMe/TCP listening"));
        s.wait_for("namespace online");
        let (_a, mut q) = connect_io(addr).expect("connect");
        for lba in 0..blocks {
            m.gen += 1;
            q.write(1, lba, &block(lba, m.gen, bs), bs, lba).unwrap();
            let mut ok = None;
            while ok.is_none() {
                q.poll(&mut |c| ok = Some(c.cqe.status().is_success()))
                    .unwrap();
            }
            assert_eq!(ok, Some(true));
            m.may[lba as usize] = vec![m.gen];
        }
        s.stop();
    }
    let mut points: BTreeMap<&str, u64> = BTreeMap::new();
    // Kills per operation: the pass that ran (or had just been started) when the target died.
    let mut by_op: BTreeMap<String, u64> = BTreeMap::new();
    // The pass a crash point of a resumed pass interrupts before this round could look.
    let mut last_op: Option<String> = None;
    let (mut done_kills, mut finished, mut lost, mut started) = (0u64, 0u64, 0usize, 0u64);
    for round in 0..=kills {
        // Odd rounds arm the crash points in turn (each at its 1st or 2nd hit).
        let armed = (round % 2 == 1).then(|| {
            let p = crashpoint::POINTS[(round / 2) as usize % crashpoint::POINTS.len()];
            (p, 1 + rng.below(2))
        });
        let env_val = armed.map(|(p, n)| format!("{p}:{n}"));
        let env: Vec<(&str, &str)> = env_val
            .as_deref()
            .map(|v| vec![(crashpoint::ENV, v)])
            .unwrap_or_default();
        let mut s = Serve::start_env(&cfg, "info", &env);
        // The target may kill itself at a crash point of the resumed pass at any moment (its
        // log lines may then be lost): every step below tolerates that.
        let t = Duration::from_secs(60);
        let up = s
            .try_wait_for("NVMe/TCP listening", t)
            .map(|l| addr_of(&l))
            .filter(|_| s.try_wait_for("namespace online", t).is_some());
        let conn = up.and_then(connect_io);
        let checked = conn.map(|(a, mut q)| {
            let l = verify(&mut q, &mut m, bs);
            (a, q, l)
        });
        let (_a, mut q) = match checked {
            Some((a, q, Some(l))) => {
                lost += l;
                assert_eq!(l, 0, "round {round}: acknowledged writes lost");
                (a, q)
            }
            _ => {
                // Only a crash point may take the target down here (give its exit a moment
                // to be visible).
                let t0 = Instant::now();
                while !s.exited() && t0.elapsed() < Duration::from_secs(3) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let gone = s.exited();
                s.drain();
                assert!(
                    gone && armed.is_some(),
                    "round {round} ({armed:?}): target {} before it could be checked:\n{}",
                    if gone { "exited" } else { "unusable" },
                    s.log.join("\n")
                );
                *points.entry(armed.map_or("?", |(p, _)| p)).or_default() += 1;
                *by_op
                    .entry(last_op.clone().unwrap_or_else(|| "?".into()))
                    .or_default() += 1;
                done_kills += 1;
                s.kill9();
                continue;
            }
        };
        if round == kills {
            // Last round: let the pass finish, check once more, stop cleanly.
            let t0 = Instant::now();
            while rekey_state(&sock).as_deref() == Some("running") {
                assert!(
                    t0.elapsed() < Duration::from_secs(120),
                    "pass never finished"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            assert_eq!(verify(&mut q, &mut m, bs), Some(0));
            s.stop();
            break;
        }
        let state = rekey_state(&sock);
        if state.as_deref() == Some("finished") {
            finished += 1;
        }
        let (op, new) = next_pass(&sock, ops);
        if new {
            started += 1;
        }
        let budget = match armed {
            Some(_) => Duration::from_secs(3),
            None => Duration::from_millis(50 + rng.below(500)),
        };
        let until = Instant::now() + budget;
        write_until(&mut q, &mut m, &mut rng, bs, until);
        if Instant::now() < until {
            // The connection died early: the target is going down; let its exit show.
            let t0 = Instant::now();
            while !s.exited() && t0.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Exited on its own = killed at the armed crash point (its last log lines may be lost
        // with it, so the exit is what counts).
        if s.exited() {
            if let Some((p, _)) = armed {
                *points.entry(p).or_default() += 1;
            }
        }
        s.kill9();
        done_kills += 1;
        // The pass that was running when it died: the one that ran or was started this round,
        // or (a pass that finished) none.
        let op = op.unwrap_or_else(|| "none".into());
        *by_op.entry(op.clone()).or_default() += 1;
        last_op = Some(op);
    }
    let summary: Value = json!({
        "block_size": bs,
        "kills": done_kills,
        "kills_by_operation": by_op,
        "crash_points_hit": points,
        "passes_started": started,
        "passes_seen_finished_after_restart": finished,
        "acknowledged_writes_lost": lost,
    });
    eprintln!("conversion crash harness ({ops:?}): {summary}");
    assert!(done_kills >= kills);
    assert!(
        points.values().sum::<u64>() > 0,
        "no crash point was ever hit: {summary}"
    );
    assert_eq!(lost, 0);
    if ops == Ops::EncDec {
        // Each operation type is killed about half the time; the default run must reach 50 each.
        let need = (kills / 2).saturating_sub(5).min(50);
        for op in ["encrypt", "decrypt"] {
            let n = by_op.get(op).copied().unwrap_or(0);
            assert!(
                n >= need,
                "only {n} kills during {op} (need {need}): {summary}"
            );
        }
    }
}

#[test]
fn sigkill_during_deep_rekey_loses_no_acknowledged_write_4096() {
    harness(4096, 50, 0x5eed_4096, Ops::Deep);
}

#[test]
fn sigkill_during_deep_rekey_loses_no_acknowledged_write_512() {
    harness(512, 20, 0x5eed_0512, Ops::Deep);
}

#[test]
fn sigkill_during_encrypt_and_decrypt_loses_no_acknowledged_write_4096() {
    harness(4096, 110, 0xe9cd_4096, Ops::EncDec);
}

#[test]
fn sigkill_during_encrypt_and_decrypt_loses_no_acknowledged_write_512() {
    harness(512, 30, 0xe9cd_0512, Ops::EncDec);
}
