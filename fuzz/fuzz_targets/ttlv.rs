//! Fuzzes the KMIP TTLV decoder and the response parser: hostile replies from a KMS must decode
//! or give a typed error, never panic. Run: `cargo +nightly fuzz run ttlv`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvseal::kms::message::{parse_response, Operation};

fuzz_target!(|data: &[u8]| {
    let _ = nvseal::kms::ttlv::decode(data);
    for op in [Operation::Create, Operation::Get, Operation::Locate, Operation::Query, Operation::DiscoverVersions] {
        let _ = parse_response(data, op);
    }
});
