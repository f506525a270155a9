//! Fuzzes the whole target `Connection` state machine, not only its decoders: each input is a
//! script (handshake, mutated capsules, H2CData for the target's R2Ts, property sets and
//! CC.EN toggles, namespace changes, disconnects mid-transfer) played against a real target
//! over loopback TCP pairs, polling the connections in between. A session must never panic or
//! hang, every PDU the target sends must be well-formed, and every request, connection slot
//! and controller must be released once the host hangs up (see `nvseal::nvmf::fuzzing`).
//! Run: `cargo +nightly fuzz run connection` from the repository root; seed the corpus with
//! `cargo test --test connection_fuzz -- --ignored write_seed_corpus` first.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nvseal::nvmf::fuzzing::run(data);
});
