//! AES-256-XTS correctness for every kernel tier this CPU runs:
//! IEEE 1619-2007 vectors 10–14, NIST CAVP XTSGenAES256 (both tweak formats, encrypt and
//! decrypt), randomized cross-checks against OpenSSL's aes-256-xts, and the key/tier API rules.
//!
//! Vector files live in `tests/data/xts/` (see the header of each for its origin).

use std::path::PathBuf;

use nvseal::crypto::key::{CryptoError, XtsKey};
use nvseal::crypto::xts::{Tier, UnitRun, Xts};
use openssl::symm::{Cipher, Crypter, Mode};

fn data_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/xts")
        .join(name)
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length: {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn tiers() -> Vec<Tier> {
    let t: Vec<Tier> = Tier::all()
        .into_iter()
        .filter(|t| t.is_available())
        .collect();
    println!("tiers under test: {:?}", t);
    t
}

fn engine(key: &[u8], tier: Tier) -> Xts {
    Xts::with_tier(&XtsKey::from_bytes(key).expect("key"), tier).expect("tier")
}

// ---------------------------------------------------------------------------------------------
// IEEE 1619-2007 Annex B, XTS-AES-256 vectors 10..14

#[test]
fn ieee1619_vectors_10_to_14() {
    let text = std::fs::read_to_string(data_path("ieee1619-xts-aes256.txt")).expect("vector file");
    let mut key = None;
    let mut cases = Vec::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f[0] == "KEY" {
            key = Some(unhex(f[1]));
        } else {
            assert_eq!(f.len(), 3, "line: {line}");
            let seq = u64::from_str_radix(f[1], 16).expect("tweak");
            cases.push((f[0].to_string(), seq, unhex(f[2])));
        }
    }
    let key = key.expect("KEY line");
    assert_eq!(key.len(), 64);
    assert_eq!(cases.len(), 5, "vectors 10..14");
    let plain: Vec<u8> = (0..512).map(|i| i as u8).collect();
    for tier in tiers() {
        let x = engine(&key, tier);
        for (n, seq, ct) in &cases {
            assert_eq!(ct.len(), 512);
            let mut d = plain.clone();
            x.encrypt_units(&mut d, 512, *seq).expect("enc");
            assert_eq!(&d, ct, "vector {n} encrypt, tier {tier:?}");
            x.decrypt_units(&mut d, 512, *seq).expect("dec");
            assert_eq!(d, plain, "vector {n} decrypt, tier {tier:?}");
            // The same through the explicit-tweak entry point.
            let mut d = plain.clone();
            x.encrypt_with_tweak(&mut d, &u128::from(*seq).to_le_bytes())
                .expect("enc");
            assert_eq!(&d, ct, "vector {n} encrypt_with_tweak, tier {tier:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NIST CAVP XTSGenAES256

struct Cavp {
    decrypt: bool,
    count: u32,
    bits: usize,
    key: Vec<u8>,
    tweak: [u8; 16],
    seq: Option<u64>,
    pt: Vec<u8>,
    ct: Vec<u8>,
}

/// Parses a CAVP .rsp file (CR, LF or CRLF line ends) into its vectors.
fn parse_rsp(name: &str) -> Vec<Cavp> {
    let text = std::fs::read_to_string(data_path(name)).expect("rsp file");
    let mut out = Vec::new();
    let mut decrypt = false;
    let mut cur: Option<Cavp> = None;
    let flush = |cur: &mut Option<Cavp>, out: &mut Vec<Cavp>| {
        if let Some(c) = cur.take() {
            out.push(c);
        }
    };
    for line in text.split(['\r', '\n']).map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line {
            "[ENCRYPT]" => {
                flush(&mut cur, &mut out);
                decrypt = false;
                continue;
            }
            "[DECRYPT]" => {
                flush(&mut cur, &mut out);
                decrypt = true;
                continue;
            }
            _ => {}
        }
        let (k, v) = line
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .expect("k = v");
        match k {
            "COUNT" => {
                flush(&mut cur, &mut out);
                cur = Some(Cavp {
                    decrypt,
                    count: v.parse().expect("count"),
                    bits: 0,
                    key: Vec::new(),
                    tweak: [0; 16],
                    seq: None,
                    pt: Vec::new(),
                    ct: Vec::new(),
                });
            }
            _ => {
                let c = cur.as_mut().expect("field before COUNT");
                match k {
                    "DataUnitLen" => c.bits = v.parse().expect("bits"),
                    "Key" => c.key = unhex(v),
                    "i" => c.tweak = unhex(v).try_into().expect("16-byte tweak"),
                    "DataUnitSeqNumber" => {
                        let n: u64 = v.parse().expect("seq");
                        c.seq = Some(n);
                        c.tweak = u128::from(n).to_le_bytes();
                    }
                    "PT" => c.pt = unhex(v),
                    "CT" => c.ct = unhex(v),
                    other => panic!("unknown field {other}"),
                }
            }
        }
    }
    flush(&mut cur, &mut out);
    out
}

fn run_cavp(name: &str, use_seq: bool) {
    let vectors = parse_rsp(name);
    assert_eq!(
        vectors.len(),
        1000,
        "{name}: 500 encrypt + 500 decrypt vectors"
    );
    let tiers = tiers();
    let (mut checked, mut skipped) = (0usize, 0usize);
    for v in &vectors {
        if v.bits % 128 != 0 {
            // Ciphertext stealing is not implemented. A byte length that is not a whole number
            // of blocks must be refused (250-bit units fill 32 bytes, so only some are).
            skipped += 1;
            if v.pt.len() % 16 != 0 {
                let x = engine(&v.key, Tier::Soft);
                let mut d = v.pt.clone();
                assert!(
                    x.encrypt_with_tweak(&mut d, &v.tweak).is_err(),
                    "partial block accepted"
                );
                assert_eq!(d, v.pt, "refused data must be untouched");
            }
            continue;
        }
        assert_eq!(v.pt.len() * 8, v.bits, "COUNT {}", v.count);
        assert_eq!(v.ct.len(), v.pt.len());
        for &tier in &tiers {
            let x = engine(&v.key, tier);
            let what = format!(
                "{name} {} COUNT {} tier {tier:?}",
                if v.decrypt { "DECRYPT" } else { "ENCRYPT" },
                v.count
            );
            // Both directions for every vector: the file's direction says which is the input.
            let mut d = v.pt.clone();
            if use_seq {
                let seq = v.seq.expect("DataUnitSeqNumber");
                x.encrypt_units(&mut d, v.pt.len(), seq).expect("enc");
            } else {
                x.encrypt_with_tweak(&mut d, &v.tweak).expect("enc");
            }
            assert_eq!(d, v.ct, "{what}: encrypt");
            let mut d = v.ct.clone();
            if use_seq {
                let seq = v.seq.expect("DataUnitSeqNumber");
                x.decrypt_units(&mut d, v.ct.len(), seq).expect("dec");
            } else {
                x.decrypt_with_tweak(&mut d, &v.tweak).expect("dec");
            }
            assert_eq!(d, v.pt, "{what}: decrypt");
        }
        checked += 1;
    }
    println!("{name}: {checked} vectors checked on {} tiers, {skipped} skipped (DataUnitLen not a multiple of 128 bits)", tiers.len());
    assert!(checked > 200, "only {checked} vectors checked");
    assert!(vectors.iter().any(|v| v.decrypt) && vectors.iter().any(|v| !v.decrypt));
}

#[test]
fn cavp_tweak_128hexstr() {
    run_cavp("XTSGenAES256-tweak-128hexstr.rsp", false);
}

#[test]
fn cavp_tweak_dataunitseqno() {
    run_cavp("XTSGenAES256-tweak-dataunitseqno.rsp", true);
}

// ---------------------------------------------------------------------------------------------
// Randomized cross-check against OpenSSL

/// splitmix64: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("NVSEAL_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_1619);
        println!("NVSEAL_TEST_SEED={seed}");
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    fn key(&mut self) -> [u8; 64] {
        let mut k = [0u8; 64];
        self.fill(&mut k);
        k
    }
    /// Unit numbers: small, around 2^32, large, and near the top of u64.
    fn unit_number(&mut self) -> u64 {
        match self.next() % 4 {
            0 => self.next() % 1000,
            1 => (1 << 32) - 8 + self.next() % 16,
            2 => self.next(),
            _ => u64::MAX - self.next() % 64,
        }
    }
}

/// OpenSSL aes-256-xts of one data unit with the tweak value `seq` (128-bit little-endian).
fn openssl_unit(key: &[u8; 64], decrypt: bool, seq: u128, data: &[u8]) -> Vec<u8> {
    let mode = if decrypt {
        Mode::Decrypt
    } else {
        Mode::Encrypt
    };
    let iv = seq.to_le_bytes();
    let mut c = Crypter::new(Cipher::aes_256_xts(), mode, key, Some(&iv)).expect("openssl xts");
    let mut out = vec![0u8; data.len() + 16];
    let n = c.update(data, &mut out).expect("update");
    let m = c.finalize(&mut out[n..]).expect("finalize");
    out.truncate(n + m);
    out
}

/// Encrypts `units` units of `unit` bytes starting at `first` with tier `tier` in a buffer
/// placed at `offset` bytes past an aligned start, compares each unit with OpenSSL, then
/// decrypts and compares with the original.
fn check_request(rng: &mut Rng, tier: Tier, unit: usize, units: usize, first: u64, offset: usize) {
    let key = rng.key();
    let x = engine(&key, tier);
    let mut backing = vec![0u8; unit * units + 64];
    let start = backing.as_ptr().align_offset(64) + offset;
    let len = unit * units;
    rng.fill(&mut backing[start..start + len]);
    let plain = backing[start..start + len].to_vec();
    x.encrypt_units(&mut backing[start..start + len], unit, first)
        .expect("enc");
    for (i, (c, p)) in backing[start..start + len]
        .chunks(unit)
        .zip(plain.chunks(unit))
        .enumerate()
    {
        let want = openssl_unit(&key, false, u128::from(first) + i as u128, p);
        assert!(
            c == &want[..],
            "tier {tier:?} unit {unit} x{units} first {first} offset {offset}: unit {i} differs from OpenSSL"
        );
    }
    // OpenSSL decrypts what we encrypted (spot check the first unit) and we decrypt it back.
    let back = openssl_unit(&key, true, u128::from(first), &backing[start..start + unit]);
    assert_eq!(back, plain[..unit]);
    x.decrypt_units(&mut backing[start..start + len], unit, first)
        .expect("dec");
    assert!(
        backing[start..start + len] == plain[..],
        "tier {tier:?} round trip"
    );
}

#[test]
fn random_single_units_every_size_against_openssl() {
    let mut rng = Rng::from_env();
    for tier in tiers() {
        for unit in (16..=4096).step_by(16) {
            let first = rng.unit_number();
            check_request(&mut rng, tier, unit, 1, first, 0);
        }
    }
}

#[test]
fn random_multi_unit_requests_against_openssl() {
    let mut rng = Rng::from_env();
    for tier in tiers() {
        for units in 1..=64 {
            let first = rng.unit_number();
            check_request(&mut rng, tier, 512, units, first, 0);
        }
        for units in 1..=8 {
            let first = rng.unit_number();
            check_request(&mut rng, tier, 4096, units, first, 0);
        }
        // Odd unit sizes (tails inside every unit) across the kernels' tweak batch boundaries.
        for _ in 0..24 {
            let unit = 16 * (1 + (rng.next() % 40) as usize);
            let units = 1 + (rng.next() % 40) as usize;
            let first = rng.unit_number();
            check_request(&mut rng, tier, unit, units, first, 0);
        }
    }
}

#[test]
fn misaligned_buffers_against_openssl() {
    let mut rng = Rng::from_env();
    for tier in tiers() {
        for offset in 1..16 {
            let (unit, units) = [(512, 3), (4096, 2), (16, 5), (272, 2), (4080, 1)][offset % 5];
            let first = rng.unit_number();
            check_request(&mut rng, tier, unit, units, first, offset);
        }
    }
}

/// One `UnitRun` per request buffer; shape = (unit size, units, first unit number, offset).
/// One request of a random batch: unit size, units, first unit number, offset of its
/// buffer, and whether it runs out of place (from a separate source buffer at offset
/// `(off + 5) % 16`).
type Shape = (usize, usize, u64, usize, bool);

fn runs<'a>(bufs: &'a mut [Vec<u8>], srcs: &'a [Vec<u8>], shapes: &[Shape]) -> Vec<UnitRun<'a>> {
    bufs.iter_mut()
        .zip(srcs)
        .zip(shapes)
        .map(|((b, s), &(unit, _, first, off, oop))| {
            if oop {
                UnitRun::from_source(&mut b[off..], &s[(off + 5) % 16..], unit, first)
            } else {
                UnitRun::new(&mut b[off..], unit, first)
            }
            .expect("run")
        })
        .collect()
}

/// Batch calls (`encrypt_runs` / `decrypt_runs`, what the crypto bdev uses): random batches of
/// 1..=40 requests, each with its own random unit size, unit count, first unit number and
/// misalignment, about half of them out of place (`UnitRun::from_source`, what the NVMe/TCP
/// target uses for in-capsule writes). Every unit of every request is compared with OpenSSL,
/// every source must be left untouched, and everything is decrypted back (out of place again
/// for the same requests, into fresh garbage).
#[test]
fn random_batches_of_requests_against_openssl() {
    let mut rng = Rng::from_env();
    for tier in tiers() {
        for _ in 0..40 {
            let key = rng.key();
            let x = engine(&key, tier);
            let n = 1 + (rng.next() % 40) as usize;
            let shapes: Vec<Shape> = (0..n)
                .map(|_| {
                    let unit = match rng.next() % 3 {
                        0 => 4096,
                        1 => 512,
                        _ => 16 * (1 + (rng.next() % 40) as usize),
                    };
                    let units = (rng.next() % 21) as usize; // 0 = an empty request
                    let off = (rng.next() % 16) as usize;
                    (
                        unit,
                        units,
                        rng.unit_number(),
                        off,
                        rng.next().is_multiple_of(2),
                    )
                })
                .collect();
            // In place: `bufs` holds the plaintext. Out of place: `srcs` does and `bufs` starts
            // as garbage.
            let mut plain = Vec::with_capacity(n);
            let mut bufs = Vec::with_capacity(n);
            let mut srcs = Vec::with_capacity(n);
            for &(unit, units, _, off, oop) in &shapes {
                let mut p = vec![0u8; unit * units];
                rng.fill(&mut p);
                let mut b = vec![0u8; off + p.len()];
                let mut src = vec![0u8; (off + 5) % 16 + p.len()];
                if oop {
                    rng.fill(&mut b);
                    src[(off + 5) % 16..].copy_from_slice(&p);
                } else {
                    b[off..].copy_from_slice(&p);
                }
                plain.push(p);
                bufs.push(b);
                srcs.push(src);
            }
            let srcs_before = srcs.clone();
            x.encrypt_runs(runs(&mut bufs, &srcs, &shapes));
            assert!(srcs == srcs_before, "tier {tier:?}: a source was written");
            for (r, (b, &(unit, _, first, off, oop))) in bufs.iter().zip(&shapes).enumerate() {
                for (i, (c, p)) in b[off..].chunks(unit).zip(plain[r].chunks(unit)).enumerate() {
                    let want = openssl_unit(&key, false, u128::from(first) + i as u128, p);
                    assert!(
                        c == &want[..],
                        "tier {tier:?} batch of {n}: request {r} (unit {unit}, out of place \
                         {oop}), unit {i} differs from OpenSSL"
                    );
                }
            }
            // Decrypt: out-of-place requests read the ciphertext from `srcs` into garbage.
            for ((b, s), &(_, _, _, off, oop)) in bufs.iter_mut().zip(&mut srcs).zip(&shapes) {
                if oop {
                    let so = (off + 5) % 16;
                    s[so..].copy_from_slice(&b[off..]);
                    rng.fill(&mut b[off..]);
                }
            }
            x.decrypt_runs(runs(&mut bufs, &srcs, &shapes));
            for (r, (b, &(_, _, _, off, oop))) in bufs.iter().zip(&shapes).enumerate() {
                assert!(
                    b[off..] == plain[r][..],
                    "tier {tier:?} batch of {n}: request {r} (out of place {oop}) round trip"
                );
            }
        }
    }
}

/// Unit numbers whose +1 carries out of 64 bits: the tweak is the 128-bit sum.
#[test]
fn unit_numbers_carry_into_the_high_tweak_half() {
    let mut rng = Rng::from_env();
    for tier in tiers() {
        check_request(&mut rng, tier, 512, 20, u64::MAX - 2, 0);
    }
}

// ---------------------------------------------------------------------------------------------
// Key and tier rules

#[test]
fn duplicate_key_halves_are_rejected() {
    let mut k = [0u8; 64];
    for (i, b) in k.iter_mut().enumerate() {
        *b = (i % 32) as u8 ^ 0x5a;
    }
    assert!(matches!(
        XtsKey::from_bytes(&k),
        Err(CryptoError::DuplicateKeys)
    ));
    k[40] ^= 1;
    assert!(XtsKey::from_bytes(&k).is_ok());
    assert!(matches!(
        XtsKey::from_bytes(&k[..32]),
        Err(CryptoError::BadKeyLength(32))
    ));
}

#[test]
fn debug_output_does_not_contain_key_bytes() {
    let key = XtsKey::generate().expect("rng");
    let secret = *key.expose_secret();
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let dec_list = format!("{:?}", &secret[..4])
        .trim_end_matches(']')
        .to_string();
    for tier in tiers() {
        let x = Xts::with_tier(&key, tier).expect("tier");
        for s in [
            format!("{key:?}"),
            format!("{key:#?}"),
            format!("{x:?}"),
            format!("{x:#?}"),
        ] {
            assert!(!s.to_lowercase().contains(&hex[..8]), "{s}");
            assert!(!s.contains(&dec_list), "{s}");
        }
        assert!(
            format!("{x:?}").contains(tier.name())
                || format!("{x:?}").contains(&format!("{tier:?}"))
        );
    }
    assert_eq!(format!("{key:?}"), "XtsKey(<redacted>)");
}

/// `max_tier` and `NVSEAL_XTS_TIER` cap the chosen tier; the lower cap wins. One test so the
/// environment variable is not changed under another test that reads it.
#[test]
fn tier_caps_from_argument_and_environment() {
    let key = XtsKey::generate().expect("rng");
    std::env::remove_var("NVSEAL_XTS_TIER");
    assert_eq!(
        Xts::new(&key, None).expect("new").tier(),
        Tier::best_available()
    );
    for cap in Tier::all() {
        let t = Xts::new(&key, Some(cap)).expect("new").tier();
        assert!(t <= cap && t.is_available(), "cap {cap:?} gave {t:?}");
        if cap.is_available() {
            assert_eq!(t, cap);
        }
    }
    for env in Tier::all() {
        std::env::set_var("NVSEAL_XTS_TIER", env.name());
        let t = Xts::new(&key, None).expect("new").tier();
        assert!(t <= env, "env {env:?} gave {t:?}");
        if env.is_available() {
            assert_eq!(t, env);
        }
        // The lower of the two caps wins, whichever side it is on.
        for cap in Tier::all() {
            let t = Xts::new(&key, Some(cap)).expect("new").tier();
            assert!(t <= cap.min(env));
            if cap.min(env).is_available() {
                assert_eq!(t, cap.min(env));
            }
        }
    }
    std::env::set_var("NVSEAL_XTS_TIER", "AESNI");
    assert!(Xts::new(&key, None).expect("new").tier() <= Tier::AesNi);
    std::env::set_var("NVSEAL_XTS_TIER", "fastest");
    assert!(matches!(
        Xts::new(&key, None),
        Err(CryptoError::UnknownTier(_))
    ));
    std::env::remove_var("NVSEAL_XTS_TIER");
    for tier in Tier::all() {
        match Xts::with_tier(&key, tier) {
            Ok(x) => assert_eq!(x.tier(), tier),
            Err(CryptoError::TierUnavailable(t)) => assert!(t == tier && !tier.is_available()),
            Err(e) => panic!("unexpected {e}"),
        }
    }
}
