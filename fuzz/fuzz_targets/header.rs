//! Fuzzes the on-disk metadata header decoder (format versions 1 and 2): a corrupt or hostile
//! header copy must give a typed error, never a panic. Run: `cargo +nightly fuzz run header`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvseal::keys::header::{decode, decode_any, AnyHeader, CopyId};

fuzz_target!(|data: &[u8]| {
    for copy in [CopyId::A, CopyId::B] {
        if let Ok(h) = decode(data, copy) {
            // A header that decodes must encode back to the same copy.
            assert_eq!(h.encode(copy).ok().as_deref().map(|b| &b[..]), Some(data));
        }
        if let Ok(h) = decode_any(data, copy) {
            assert_eq!(h.encode(copy).ok().as_deref().map(|b| &b[..]), Some(data));
            if let AnyHeader::Plain(p) = &h {
                let _ = p.check_binding(Some("ns"), u64::MAX);
            }
        }
    }
});
