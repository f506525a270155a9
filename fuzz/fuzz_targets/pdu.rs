//! Fuzzes the NVMe/TCP PDU decoder: any input, under every digest setting, must decode or return
//! a typed error, never panic, and a successful decode must account for no more bytes than given.
//! Run: `cargo +nightly fuzz run pdu` from the repository root.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvseal::nvmf::pdu::{decode, CommonHeader, Digests, CH_LEN};

fuzz_target!(|data: &[u8]| {
    for dg in [
        Digests {
            header: false,
            data: false,
        },
        Digests {
            header: true,
            data: false,
        },
        Digests {
            header: false,
            data: true,
        },
        Digests {
            header: true,
            data: true,
        },
    ] {
        if let Ok((pdu, used)) = decode(data, dg, 1 << 20) {
            assert!(used <= data.len());
            assert!(pdu.data.len() <= used);
        }
        // The streaming path: header validation alone must be total too.
        if let Some(ch) = data
            .get(..CH_LEN)
            .and_then(|s| <&[u8; CH_LEN]>::try_from(s).ok())
        {
            if let Ok(layout) = CommonHeader::parse(ch).layout(dg, 1 << 20) {
                assert!(layout.data_off >= layout.header_len);
            }
        }
    }
});
