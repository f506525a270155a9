//! Fuzzes the on-disk metadata header decoder: a corrupt or hostile header copy must give a
//! typed error, never a panic. Run: `cargo +nightly fuzz run header`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvseal::keys::header::{decode, CopyId};

fuzz_target!(|data: &[u8]| {
    for copy in [CopyId::A, CopyId::B] {
        if let Ok(h) = decode(data, copy) {
            // A header that decodes must encode back to the same copy.
            let _ = h.encode(copy);
        }
    }
});
