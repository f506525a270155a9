//! The `connection` fuzz target's driver (`nvseal::nvmf::fuzzing`) run in the suite for a
//! bounded time: the hand-written sessions of its seed corpus, checked to reach the states they
//! are written for, then scripts from a seeded generator: mutations of those sessions and plain
//! random bytes. Every session checks the driver's invariants itself (no panic, no hang,
//! well-formed PDUs, request/slot/controller accounting back to zero).

use std::time::{Duration, Instant};

use nvseal::nvmf::fuzzing::{self, corpus, Op, Report};

/// Deterministic xorshift generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[test]
fn seed_sessions_reach_the_states_they_are_written_for() {
    let reports: Vec<(&str, Report)> = corpus()
        .into_iter()
        .map(|(name, s)| (name, fuzzing::run(&s)))
        .collect();
    let get = |n: &str| {
        reports
            .iter()
            .find(|(name, _)| *name == n)
            .map(|(_, r)| r.clone())
            .unwrap()
    };
    for (name, r) in &reports {
        assert!(r.admin_connected, "{name}: admin Connect: {r:?}");
        assert!(r.io_connected, "{name}: I/O queue Connect: {r:?}");
    }
    let w = get("write_r2t_read");
    assert!(w.r2ts >= 2, "R2Ts for the two large writes: {w:?}");
    assert!(w.c2h_data >= 1, "the read returned data: {w:?}");
    assert_eq!(w.completions, w.successes, "every command succeeded: {w:?}");
    assert_eq!(w.term_reqs, 0);
    let d = get("digests");
    assert!(
        d.c2h_data >= 1 && d.r2ts >= 1,
        "data moved both ways with digests: {d:?}"
    );
    assert_eq!(
        d.closed_by_target, 1,
        "the bad data digest ends the I/O queue: {d:?}"
    );
    let r = get("reset_mid_transfer");
    assert_eq!(
        (r.closed_by_target, r.term_reqs),
        (1, 0),
        "the controller reset (not a transport error) closes the I/O queue: {r:?}"
    );
    let t = get("transport_errors");
    assert!(t.term_reqs >= 1, "a bad PDU gets a C2HTermReq: {t:?}");
}

/// A mutation of `s`: byte flips, a splice of another script, an inserted operation, or a cut.
fn mutate(rng: &mut Rng, s: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut v = s.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            0 | 1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            2 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            3 => {
                let o = &others[rng.below(others.len())];
                let a = rng.below(o.len());
                let b = a + rng.below(o.len() - a);
                let at = rng.below(v.len() + 1);
                v.splice(at..at, o[a..b].iter().copied());
            }
            _ => {
                let op = match rng.below(4) {
                    0 => Op::PropertySet {
                        lane: 0,
                        sel: (rng.next() % 6) as u8,
                        value: rng.next() as u32,
                    },
                    1 => Op::CloseClient {
                        lane: (rng.next() & 1) as u8,
                    },
                    2 => Op::NsSwap {
                        nsid: (rng.next() % 4) as u8,
                    },
                    _ => Op::H2c {
                        lane: 1,
                        pick: rng.next() as u8,
                        flags: rng.next() as u8,
                        len: (rng.next() % 9000) as u16,
                    },
                };
                let mut b = Vec::new();
                op.encode(&mut b);
                let at = rng.below(v.len() + 1);
                v.splice(at..at, b);
            }
        }
    }
    if rng.below(8) == 0 && !v.is_empty() {
        v.truncate(rng.below(v.len()));
    }
    v
}

#[test]
fn seeded_random_and_mutated_sessions_keep_every_invariant() {
    let seeds: Vec<Vec<u8>> = corpus().into_iter().map(|(_, s)| s).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Bounded in time (a slow, shared machine gets fewer sessions, never a longer test) and in
    // count.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut sessions = 0;
    let mut deep = 0;
    while sessions < 20_000 && Instant::now() < deadline {
        let script = if sessions % 4 == 3 {
            (0..rng.below(200)).map(|_| rng.next() as u8).collect()
        } else {
            let base = &seeds[rng.below(seeds.len())];
            mutate(&mut rng, base, &seeds)
        };
        let r = fuzzing::run(&script);
        if r.io_connected {
            deep += 1;
        }
        sessions += 1;
    }
    assert!(sessions >= 50, "only {sessions} sessions ran");
    // Mutations of the seed sessions mostly keep their handshake: the generator does reach
    // the I/O path rather than bouncing off the first PDU.
    assert!(
        deep * 4 >= sessions,
        "{deep} of {sessions} sessions got an I/O queue"
    );
    eprintln!("{sessions} sessions, {deep} with an I/O queue");
}

/// Writes the seed sessions to fuzz/corpus/connection/ for cargo-fuzz (run it by hand).
#[test]
#[ignore = "writes the seed corpus of the connection fuzz target; run by hand"]
fn write_seed_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/connection");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, s) in corpus() {
        std::fs::write(dir.join(name), s).unwrap();
    }
}
