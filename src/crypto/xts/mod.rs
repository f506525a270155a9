//! The AES-256-XTS engine (IEEE 1619-2007): tiered kernels and their one-time dispatch.
//!
//! [`Xts`] holds the expanded round keys of one [`XtsKey`] for one kernel [`Tier`], chosen once
//! when the engine is built (on a control thread) and never re-checked per call. Reactors call
//! [`Xts::encrypt_units`] / [`Xts::decrypt_units`] in place on whole requests: one call covers
//! every data unit of a request, so the kernel computes all of the request's tweaks together and
//! keeps its vector pipelines full (see `docs/xts.md` and `notes/xts.md` for the numbers that made
//! this the shape). Nothing here allocates or locks after [`Xts::new`].
//!
//! Tiers, lowest to highest:
//! * [`Tier::Soft`] — the `aes` crate (`soft.rs`); portable, runs everywhere.
//! * [`Tier::AesNi`] — AES-NI on 128-bit registers, 8 blocks interleaved (`aesni.rs`).
//! * [`Tier::Vaes256`] — VAES + VPCLMULQDQ on 256-bit registers, AVX2 (`vaes256.rs`).
//! * [`Tier::Vaes512`] — VAES + VPCLMULQDQ on 512-bit registers, AVX-512 (`vaes512.rs`).
//!
//! Tweak convention: data unit `n` uses the tweak `n` as a 128-bit little-endian integer, i.e.
//! dm-crypt's `aes-xts-plain64` with the sector size set to the data unit. Ciphertext stealing is
//! not implemented: data units are whole AES blocks, other lengths are rejected.
//!
//! The `unsafe` of the kernels lives in this directory only; every block says why it is sound.

use std::fmt;

use crate::crypto::key::{CryptoError, XtsKey};
pub use crate::crypto::tier::{Tier, UnknownTier};
use crate::sys::mlock::LockedBox;

mod soft;

#[cfg(target_arch = "x86_64")]
mod aesni;
#[cfg(target_arch = "x86_64")]
mod vaes256;
#[cfg(target_arch = "x86_64")]
mod vaes512;

/// The AES block size; data units must be a multiple of it.
pub const BLOCK_LEN: usize = 16;

/// Name of the environment variable that caps the tier (`soft`, `aesni`, `vaes256`, `vaes512`).
pub const TIER_ENV: &str = "NVSEAL_XTS_TIER";

/// Number of AES-256 round keys (14 rounds + the initial whitening key).
pub(crate) const ROUND_KEYS: usize = 15;

/// One round key repeated in all four 128-bit lanes of a 64-byte line, so every tier loads its
/// register width straight from memory (AES-NI the first 16 bytes, VAES-256 the first 32,
/// VAES-512 all 64) with no broadcast and no spill of broadcast copies.
pub(crate) type WideKey = [u8; 64];

/// Expanded AES-256 round keys for the hardware tiers, cache-line aligned.
///
/// `enc` is key1's encryption schedule, `dec` key1's schedule for the equivalent inverse cipher
/// (reversed, with InvMixColumns applied to rounds 1..=13, as `aesdec` expects), `tweak` key2's
/// encryption schedule (the tweak is always encrypted, also when decrypting).
#[repr(C, align(64))]
pub(crate) struct RoundKeys {
    pub(crate) enc: [WideKey; ROUND_KEYS],
    pub(crate) dec: [WideKey; ROUND_KEYS],
    pub(crate) tweak: [WideKey; ROUND_KEYS],
}

impl RoundKeys {
    const fn zeroed() -> RoundKeys {
        RoundKeys {
            enc: [[0; 64]; ROUND_KEYS],
            dec: [[0; 64]; ROUND_KEYS],
            tweak: [[0; 64]; ROUND_KEYS],
        }
    }
}

/// The key material of the chosen tier. Both variants live in a locked page wiped on drop.
enum Keys {
    Soft(LockedBox<soft::SoftKeys>),
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Hw(LockedBox<RoundKeys>),
}

/// Direction of a kernel call.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    Encrypt,
    Decrypt,
}

/// One request's buffer in a batch call ([`Xts::encrypt_runs`]): whole data units, the first
/// with tweak `first_unit`. Built only through [`UnitRun::new`] / [`UnitRun::from_source`], which
/// check the lengths, so a batch call cannot fail half-way through.
///
/// A run built with [`UnitRun::from_source`] is out of place: its input is read from `src` and
/// the result written to `data`, which saves the copy a caller would otherwise make first (the
/// NVMe/TCP target encrypts in-capsule write data straight out of its receive buffer).
pub struct UnitRun<'a> {
    data: &'a mut [u8],
    src: Option<&'a [u8]>,
    unit_size: usize,
    first_unit: u128,
}

impl<'a> UnitRun<'a> {
    /// `data` must be a whole number of `unit_size` units and `unit_size` a non-zero multiple
    /// of 16 bytes, as for [`Xts::encrypt_units`].
    pub fn new(data: &'a mut [u8], unit_size: usize, first_unit: u64) -> Result<Self, CryptoError> {
        check_units(data.len(), unit_size)?;
        Ok(UnitRun {
            data,
            src: None,
            unit_size,
            first_unit: u128::from(first_unit),
        })
    }

    /// An out-of-place run: transforms `src` into `dst` (same length; the units are checked as
    /// for [`UnitRun::new`]). `src` is left as it is.
    pub fn from_source(
        dst: &'a mut [u8],
        src: &'a [u8],
        unit_size: usize,
        first_unit: u64,
    ) -> Result<Self, CryptoError> {
        if src.len() != dst.len() {
            return Err(CryptoError::SourceLength {
                src_len: src.len(),
                dst_len: dst.len(),
            });
        }
        check_units(dst.len(), unit_size)?;
        Ok(UnitRun {
            data: dst,
            src: Some(src),
            unit_size,
            first_unit: u128::from(first_unit),
        })
    }

    /// The run's parts; an out-of-place run's source is copied into `data` first (the tiers
    /// without an out-of-place kernel then work in place).
    fn into_parts(self) -> (&'a mut [u8], usize, u128) {
        if let Some(src) = self.src {
            self.data.copy_from_slice(src);
        }
        (self.data, self.unit_size, self.first_unit)
    }

    /// The run's parts with the source kept apart (for the VAES-512 kernel, which reads it
    /// directly).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn into_parts_with_source(self) -> (&'a mut [u8], Option<&'a [u8]>, usize, u128) {
        (self.data, self.src, self.unit_size, self.first_unit)
    }
}

/// An AES-256-XTS engine bound to one key and one kernel tier. See the module docs.
pub struct Xts {
    tier: Tier,
    keys: Keys,
}

impl fmt::Debug for Xts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Xts")
            .field("tier", &self.tier)
            .finish_non_exhaustive()
    }
}

impl Xts {
    /// Chooses the best available tier `<= max_tier` (None = best). The environment variable
    /// `NVSEAL_XTS_TIER` (same names) also caps the tier; the lower cap wins. An unparsable
    /// value of the variable is an error rather than silently ignored. Chosen once here, never
    /// per call.
    pub fn new(key: &XtsKey, max_tier: Option<Tier>) -> Result<Xts, CryptoError> {
        let env_cap = match std::env::var(TIER_ENV) {
            Ok(v) if !v.trim().is_empty() => Some(v.parse::<Tier>()?),
            _ => None,
        };
        let cap = [max_tier, env_cap]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(Tier::Vaes512);
        Xts::with_tier(key, Tier::best_at_most(cap))
    }

    /// Builds the engine for exactly `tier`, or fails with [`CryptoError::TierUnavailable`].
    /// Ignores `NVSEAL_XTS_TIER` (tests and benches use this to run every tier).
    pub fn with_tier(key: &XtsKey, tier: Tier) -> Result<Xts, CryptoError> {
        if !tier.is_available() {
            return Err(CryptoError::TierUnavailable(tier));
        }
        let keys = match tier {
            Tier::Soft => Keys::Soft(soft::SoftKeys::new(key)?),
            #[cfg(target_arch = "x86_64")]
            Tier::AesNi | Tier::Vaes256 | Tier::Vaes512 => {
                let mut rk = LockedBox::try_new(RoundKeys::zeroed())?;
                // SAFETY: every hardware tier requires AES-NI, and `tier.is_available()` checked
                // it above, so the `aes` target feature of the key schedule is present.
                unsafe { aesni::expand_keys(key.key1(), key.key2(), &mut rk) };
                // The expansion works in registers, but whatever it spilled is wiped here.
                crate::sys::mlock::scrub_stack();
                Keys::Hw(rk)
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => return Err(CryptoError::TierUnavailable(tier)),
        };
        Ok(Xts { tier, keys })
    }

    /// The tier this engine runs.
    pub fn tier(&self) -> Tier {
        self.tier
    }

    /// Encrypts in place `data.len() / unit_size` consecutive data units; unit `i` uses the tweak
    /// `first_unit + i` as a 128-bit little-endian integer (dm-crypt plain64). `unit_size` must be
    /// a non-zero multiple of 16 and `data.len()` a multiple of `unit_size`, else
    /// [`CryptoError::BadLength`] and `data` is untouched. An empty `data` is a no-op.
    pub fn encrypt_units(
        &self,
        data: &mut [u8],
        unit_size: usize,
        first_unit: u64,
    ) -> Result<(), CryptoError> {
        check_units(data.len(), unit_size)?;
        self.run(Dir::Encrypt, data, unit_size, u128::from(first_unit));
        Ok(())
    }

    /// Decrypts in place; the inverse of [`Xts::encrypt_units`] with the same arguments.
    pub fn decrypt_units(
        &self,
        data: &mut [u8],
        unit_size: usize,
        first_unit: u64,
    ) -> Result<(), CryptoError> {
        check_units(data.len(), unit_size)?;
        self.run(Dir::Decrypt, data, unit_size, u128::from(first_unit));
        Ok(())
    }

    /// Encrypts several requests' buffers in one call (in place, or out of place for runs built
    /// with [`UnitRun::from_source`]): the same result as [`Xts::encrypt_units`] on each run, but the VAES-512 kernel shares tweak batches across
    /// runs and streams their units back to back, so a batch of small I/Os pays the per-call
    /// pipeline fill and drain once (measured in `benches/xts.rs`, see `docs/xts.md`). Other
    /// tiers process the runs one after the other.
    pub fn encrypt_runs<'a>(&self, runs: impl IntoIterator<Item = UnitRun<'a>>) {
        self.run_batch(Dir::Encrypt, runs.into_iter());
    }

    /// Decrypts several requests' buffers in one call; the inverse of [`Xts::encrypt_runs`].
    pub fn decrypt_runs<'a>(&self, runs: impl IntoIterator<Item = UnitRun<'a>>) {
        self.run_batch(Dir::Decrypt, runs.into_iter());
    }

    fn run_batch<'a>(&self, dir: Dir, runs: impl Iterator<Item = UnitRun<'a>>) {
        #[cfg(target_arch = "x86_64")]
        if let (Tier::Vaes512, Keys::Hw(rk)) = (self.tier, &self.keys) {
            match dir {
                // SAFETY: `Keys::Hw` with tier Vaes512 is only built after
                // `Tier::Vaes512.is_available()` passed, which covers the kernel's features.
                Dir::Encrypt => unsafe { vaes512::crypt_runs::<false>(rk, runs) },
                // SAFETY: see above.
                Dir::Decrypt => unsafe { vaes512::crypt_runs::<true>(rk, runs) },
            }
            return;
        }
        for r in runs {
            let (data, unit_size, first) = r.into_parts();
            self.run(dir, data, unit_size, first);
        }
    }

    /// Encrypts one data unit (any non-zero multiple of 16 bytes) with an arbitrary 16-byte
    /// tweak, given as the bytes fed to the tweak cipher (CAVP `i` values).
    pub fn encrypt_with_tweak(&self, data: &mut [u8], tweak: &[u8; 16]) -> Result<(), CryptoError> {
        check_units(data.len(), data.len())?;
        self.run(Dir::Encrypt, data, data.len(), u128::from_le_bytes(*tweak));
        Ok(())
    }

    /// Decrypts one data unit with an arbitrary 16-byte tweak; see [`Xts::encrypt_with_tweak`].
    pub fn decrypt_with_tweak(&self, data: &mut [u8], tweak: &[u8; 16]) -> Result<(), CryptoError> {
        check_units(data.len(), data.len())?;
        self.run(Dir::Decrypt, data, data.len(), u128::from_le_bytes(*tweak));
        Ok(())
    }

    /// The one dispatch per request. Lengths were checked by the caller.
    fn run(&self, dir: Dir, data: &mut [u8], unit_size: usize, first_tweak: u128) {
        if data.is_empty() {
            return;
        }
        match &self.keys {
            Keys::Soft(k) => match dir {
                Dir::Encrypt => k.crypt_units::<false>(data, unit_size, first_tweak),
                Dir::Decrypt => k.crypt_units::<true>(data, unit_size, first_tweak),
            },
            #[cfg(target_arch = "x86_64")]
            Keys::Hw(rk) => match (self.tier, dir) {
                // SAFETY: (all arms) `Xts::with_tier` only builds `Keys::Hw` for a tier whose
                // `is_available()` check passed, and that check covers exactly the target
                // features each kernel is compiled with.
                (Tier::Vaes512, Dir::Encrypt) => unsafe {
                    vaes512::crypt_units::<false>(rk, data, unit_size, first_tweak)
                },
                // SAFETY: see above.
                (Tier::Vaes512, Dir::Decrypt) => unsafe {
                    vaes512::crypt_units::<true>(rk, data, unit_size, first_tweak)
                },
                // SAFETY: see above.
                (Tier::Vaes256, Dir::Encrypt) => unsafe {
                    vaes256::crypt_units::<false>(rk, data, unit_size, first_tweak)
                },
                // SAFETY: see above.
                (Tier::Vaes256, Dir::Decrypt) => unsafe {
                    vaes256::crypt_units::<true>(rk, data, unit_size, first_tweak)
                },
                // SAFETY: see above.
                (Tier::AesNi, Dir::Encrypt) => unsafe {
                    aesni::crypt_units::<false>(rk, data, unit_size, first_tweak)
                },
                // SAFETY: see above.
                (Tier::AesNi, Dir::Decrypt) => unsafe {
                    aesni::crypt_units::<true>(rk, data, unit_size, first_tweak)
                },
                // Keys::Hw is never built for Soft.
                (Tier::Soft, _) => {}
            },
            #[cfg(not(target_arch = "x86_64"))]
            Keys::Hw(_) => {}
        }
    }
}

/// Checks that `data_len` is a whole number of `unit_size` units and the unit a non-zero whole
/// number of AES blocks. An empty buffer with a valid unit passes (and is a no-op); the
/// `*_with_tweak` calls pass `data.len()` as the unit, so there an empty buffer fails.
fn check_units(data_len: usize, unit_size: usize) -> Result<(), CryptoError> {
    let unit_ok = unit_size != 0 && unit_size.is_multiple_of(BLOCK_LEN);
    if !unit_ok || !data_len.is_multiple_of(unit_size.max(1)) {
        return Err(CryptoError::BadLength {
            data_len,
            unit_size,
        });
    }
    Ok(())
}

/// `t · α` in GF(2^128) with the XTS polynomial x^128 + x^7 + x^2 + x + 1, on the
/// little-endian integer view of a tweak block. Used by the scalar paths and tests.
#[inline]
pub(crate) fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ (0x87 & 0u128.wrapping_sub(t >> 127))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> XtsKey {
        let mut k = [0u8; 64];
        for (i, b) in k.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(11);
        }
        XtsKey::from_bytes(&k).expect("key")
    }

    #[test]
    fn bad_lengths_are_rejected_and_leave_data_alone() {
        let x = Xts::with_tier(&key(), Tier::Soft).expect("soft");
        let mut d = [5u8; 1024];
        for (len, unit) in [(1024, 0), (1024, 24), (1000, 512), (48, 32), (520, 512)] {
            let r = x.encrypt_units(&mut d[..len], unit, 0);
            assert!(
                matches!(r, Err(CryptoError::BadLength { .. })),
                "{len} {unit}"
            );
            let r = x.decrypt_units(&mut d[..len], unit, 0);
            assert!(
                matches!(r, Err(CryptoError::BadLength { .. })),
                "{len} {unit}"
            );
        }
        assert!(d.iter().all(|&b| b == 5));
        assert!(x.encrypt_with_tweak(&mut d[..15], &[0; 16]).is_err());
        assert!(x.encrypt_with_tweak(&mut d[..0], &[0; 16]).is_err());
        assert!(x.encrypt_units(&mut d[..0], 512, 9).is_ok());
    }

    #[test]
    fn mul_alpha_matches_definition() {
        assert_eq!(mul_alpha(1), 2);
        assert_eq!(mul_alpha(1u128 << 127), 0x87);
        assert_eq!(mul_alpha((1u128 << 127) | 1), 0x87 ^ 2);
    }

    /// Every available tier agrees with the soft tier, byte for byte, on odd shapes (the
    /// integration tests check all tiers against OpenSSL and the published vectors).
    #[test]
    fn all_tiers_agree_with_soft() {
        let k = key();
        let soft = Xts::with_tier(&k, Tier::Soft).expect("soft");
        let mut buf = vec![0u8; 8192];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i * 7 + i / 251) as u8;
        }
        for tier in Tier::all().into_iter().filter(|t| t.is_available()) {
            let x = Xts::with_tier(&k, tier).expect("tier");
            assert_eq!(x.tier(), tier);
            for (len, unit, first) in [
                (16, 16, 3u64),
                (48, 48, 0),
                (272, 272, u64::MAX),
                (8192, 512, 1 << 40),
                (8192, 4096, 7),
            ] {
                let mut a = buf[..len].to_vec();
                let mut b = buf[..len].to_vec();
                soft.encrypt_units(&mut a, unit, first).expect("soft enc");
                x.encrypt_units(&mut b, unit, first).expect("enc");
                assert_eq!(a, b, "{tier:?} len {len} unit {unit}");
                x.decrypt_units(&mut b, unit, first).expect("dec");
                assert_eq!(b, &buf[..len], "{tier:?} round trip len {len}");
            }
        }
    }

    /// A batch call gives exactly what one `*_units` call per run gives, on every tier: runs of
    /// mixed unit sizes, more than one tweak batch (16 units) in total, a run that is split
    /// across two tweak batches, an empty run, and tweaks at the top of the u64 range.
    #[test]
    fn batched_runs_match_one_call_per_run() {
        let k = key();
        let shapes: [(usize, usize, u64); 6] = [
            (4096, 4096, 9),
            (512 * 7, 512, u64::MAX - 3),
            (0, 4096, 1),
            (4096 * 12, 4096, 1 << 33),
            (48, 16, 0),
            (4096 * 3, 4096, 5),
        ];
        let total: usize = shapes.iter().map(|s| s.0).sum();
        let mut plain = vec![0u8; total];
        for (i, b) in plain.iter_mut().enumerate() {
            *b = (i * 13 + i / 509) as u8;
        }
        for tier in Tier::all().into_iter().filter(|t| t.is_available()) {
            let x = Xts::with_tier(&k, tier).expect("tier");
            let mut want = plain.clone();
            let mut rest = &mut want[..];
            for &(len, unit, first) in &shapes {
                let (run, tail) = rest.split_at_mut(len);
                x.encrypt_units(run, unit, first).expect("enc");
                rest = tail;
            }
            fn pieces<'a>(
                mut rest: &'a mut [u8],
                shapes: &[(usize, usize, u64)],
            ) -> Vec<UnitRun<'a>> {
                let mut out = Vec::new();
                for &(len, unit, first) in shapes {
                    let (run, tail) = rest.split_at_mut(len);
                    out.push(UnitRun::new(run, unit, first).expect("run"));
                    rest = tail;
                }
                out
            }
            let mut got = plain.clone();
            x.encrypt_runs(pieces(&mut got, &shapes));
            assert_eq!(got, want, "{tier:?} encrypt");
            x.decrypt_runs(pieces(&mut got, &shapes));
            assert_eq!(got, plain, "{tier:?} decrypt");
        }
        let mut odd = [0u8; 40];
        assert!(matches!(
            UnitRun::new(&mut odd, 16, 0),
            Err(CryptoError::BadLength { .. })
        ));
        assert!(UnitRun::new(&mut odd, 0, 0).is_err());
    }

    /// An out-of-place run gives what copying its source and running in place gives, on every
    /// tier, leaves the source alone, and mixes with in-place runs in one batch (including a
    /// unit that is not a multiple of the kernel's 256-byte chunk). Mismatched lengths are
    /// refused when the run is built.
    #[test]
    fn out_of_place_runs_match_copy_then_in_place() {
        let k = key();
        let shapes: [(usize, usize, u64, bool); 5] = [
            (4096 * 2, 4096, 77, true),
            (4096, 4096, 3, false),
            (512 * 5, 512, u64::MAX - 1, true),
            (48 * 3, 48, 1 << 40, true),
            (0, 512, 0, true),
        ];
        let total: usize = shapes.iter().map(|s| s.0).sum();
        let plain: Vec<u8> = (0..total).map(|i| (i * 29 + i / 251) as u8).collect();
        for tier in Tier::all().into_iter().filter(|t| t.is_available()) {
            let x = Xts::with_tier(&k, tier).expect("tier");
            for dec in [false, true] {
                let mut want = plain.clone();
                let mut rest = &mut want[..];
                for &(len, unit, first, _) in &shapes {
                    let (run, tail) = rest.split_at_mut(len);
                    if dec {
                        x.decrypt_units(run, unit, first).expect("dec");
                    } else {
                        x.encrypt_units(run, unit, first).expect("enc");
                    }
                    rest = tail;
                }
                // Out-of-place destinations start as garbage; in-place ones hold the input.
                let mut got: Vec<u8> = plain.clone();
                let mut pos = 0;
                for &(len, _, _, oop) in &shapes {
                    if oop {
                        got[pos..pos + len].fill(0xa5);
                    }
                    pos += len;
                }
                let src = plain.clone();
                let mut runs = Vec::new();
                let (mut rest, mut srest) = (&mut got[..], &src[..]);
                for &(len, unit, first, oop) in &shapes {
                    let (run, tail) = rest.split_at_mut(len);
                    let (s, stail) = srest.split_at(len);
                    runs.push(if oop {
                        UnitRun::from_source(run, s, unit, first).expect("run")
                    } else {
                        UnitRun::new(run, unit, first).expect("run")
                    });
                    rest = tail;
                    srest = stail;
                }
                if dec {
                    x.decrypt_runs(runs);
                } else {
                    x.encrypt_runs(runs);
                }
                assert_eq!(got, want, "{tier:?} decrypt {dec}");
                assert_eq!(src, plain, "{tier:?}: the source was written");
            }
        }
        let mut dst = [0u8; 32];
        assert!(matches!(
            UnitRun::from_source(&mut dst, &[0u8; 48], 16, 0),
            Err(CryptoError::SourceLength {
                src_len: 48,
                dst_len: 32
            })
        ));
        assert!(matches!(
            UnitRun::from_source(&mut dst, &[0u8; 32], 24, 0),
            Err(CryptoError::BadLength { .. })
        ));
    }

    /// Engines are built on a control thread and used from reactors (possibly several).
    #[test]
    fn engine_and_key_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Xts>();
        check::<XtsKey>();
    }

    #[test]
    fn debug_prints_tier_only() {
        let x = Xts::with_tier(&key(), Tier::Soft).expect("soft");
        assert_eq!(format!("{x:?}"), "Xts { tier: Soft, .. }");
    }
}
