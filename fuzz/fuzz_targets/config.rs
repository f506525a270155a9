//! Fuzzes the YAML configuration parser and validator: any text gives a config or an error with
//! a position, never a panic. Run: `cargo +nightly fuzz run config`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = nvseal::config::Config::from_yaml(text, "fuzz.yaml");
    }
});
