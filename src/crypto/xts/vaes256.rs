//! The VAES-256 tier: AES-256-XTS on 256-bit registers (2 blocks per `vaesenc`), for CPUs with
//! VAES and AVX2 but no (or unwanted) AVX-512, e.g. Zen 3 and Alder Lake.
//!
//! Same shape as the VAES-512 tier (see `vaes512.rs`): [`REGS`] = 8 ymm registers = 16 blocks
//! interleaved per iteration, tweaks built and advanced in registers (α^16 per iteration with one
//! VPCLMULQDQ reduction), the tweaks of up to [`TWEAK_BATCH`] units encrypted together, the
//! post-whitening folded into the last round key. AVX2 has only 16 ymm registers, so round keys
//! are read from the (L1-resident) broadcast table instead of staying in registers. Without
//! AVX-512VL there is no three-way XOR, so the pre-whitening is two XORs.
//!
//! Runs on the thread that calls [`Xts`](super::Xts); no allocation.

use core::arch::x86_64::*;

use super::aesni::{mul_alpha, wipe};
use super::{RoundKeys, WideKey, BLOCK_LEN, ROUND_KEYS};

/// Blocks per ymm register.
const LANES: usize = 2;
/// ymm registers (independent AES chains) per iteration.
const REGS: usize = 8;
/// Bytes per iteration: 16 blocks.
const CHUNK: usize = REGS * LANES * BLOCK_LEN;
/// Units whose tweaks are encrypted together (4 ymm of counters).
const TWEAK_BATCH: usize = 8;
/// Bytes per register.
const REG_BYTES: usize = LANES * BLOCK_LEN;

/// `t · α^k` per 128-bit lane, for 1 <= k <= 56: shift the lane left by `k` bits and reduce the
/// `k` bits that fall off the top with one carry-less multiply by 0x87.
#[inline]
#[target_feature(enable = "avx2,vpclmulqdq")]
fn mul_alpha_pow(t: __m256i, k: i32) -> __m256i {
    let shifted = _mm256_sll_epi64(t, _mm_cvtsi32_si128(k));
    let carries = _mm256_srl_epi64(t, _mm_cvtsi32_si128(64 - k));
    let into_high = _mm256_bslli_epi128::<8>(carries);
    let off_top = _mm256_bsrli_epi128::<8>(carries);
    let reduced = _mm256_clmulepi64_epi128::<0x00>(off_top, _mm256_set1_epi64x(0x87));
    _mm256_xor_si256(_mm256_xor_si256(shifted, into_high), reduced)
}

/// `t · α^16` per 128-bit lane: a 2-byte shift, and the 16 bits shifted out times 0x87.
#[inline]
#[target_feature(enable = "avx2,vpclmulqdq")]
fn mul_alpha16(t: __m256i, poly: __m256i) -> __m256i {
    let off_top = _mm256_bsrli_epi128::<14>(t);
    let reduced = _mm256_clmulepi64_epi128::<0x00>(off_top, poly);
    _mm256_xor_si256(_mm256_bslli_epi128::<2>(t), reduced)
}

/// Loads the 15 round keys, two lanes each.
#[inline]
#[target_feature(enable = "avx2")]
fn broadcast_keys(keys: &[WideKey; ROUND_KEYS]) -> [__m256i; ROUND_KEYS] {
    let mut out = [_mm256_setzero_si256(); ROUND_KEYS];
    for (o, k) in out.iter_mut().zip(keys.iter()) {
        // SAFETY: `k` is 64 bytes, the load reads its first 32; no alignment requirement.
        *o = unsafe { _mm256_loadu_si256(k.as_ptr().cast()) };
    }
    out
}

/// Encrypts the tweak counters `seq .. seq + 2N` with key2, `N` ymm chains, and returns them
/// one block per entry.
#[inline]
#[target_feature(enable = "avx2,vaes")]
fn encrypt_counters<const N: usize>(
    k2: &[__m256i; ROUND_KEYS],
    seq: u128,
    out: &mut [__m128i; TWEAK_BATCH],
) {
    let mut b = [_mm256_setzero_si256(); N];
    for (j, x) in b.iter_mut().enumerate() {
        let base = seq.wrapping_add((j * LANES) as u128);
        let lane = |i: u128| base.wrapping_add(i);
        let (l0, l1) = (lane(0), lane(1));
        let v = _mm256_set_epi64x((l1 >> 64) as i64, l1 as i64, (l0 >> 64) as i64, l0 as i64);
        *x = _mm256_xor_si256(v, k2[0]);
    }
    for k in &k2[1..ROUND_KEYS - 1] {
        for x in b.iter_mut() {
            *x = _mm256_aesenc_epi128(*x, *k);
        }
    }
    for (j, x) in b.iter().enumerate() {
        let v = _mm256_aesenclast_epi128(*x, k2[ROUND_KEYS - 1]);
        out[j * LANES] = _mm256_extracti128_si256::<0>(v);
        out[j * LANES + 1] = _mm256_extracti128_si256::<1>(v);
    }
}

/// VAES-256 XTS over whole units; see [`super::Xts::encrypt_units`]. `DEC` selects decryption.
/// Requires `data.len()` to be a multiple of `unit_size` and `unit_size` a non-zero multiple of
/// 16 (checked by the caller; otherwise trailing bytes are left as they are).
#[target_feature(enable = "avx2,vaes,vpclmulqdq,aes")]
pub(super) fn crypt_units<const DEC: bool>(
    rk: &RoundKeys,
    data: &mut [u8],
    unit_size: usize,
    first_tweak: u128,
) {
    if unit_size == 0 {
        return;
    }
    let k = broadcast_keys(if DEC { &rk.dec } else { &rk.enc });
    let mut seq = first_tweak;
    for group in data.chunks_mut(unit_size.saturating_mul(TWEAK_BATCH)) {
        let units = group.len() / unit_size;
        let mut t0 = [_mm_setzero_si128(); TWEAK_BATCH];
        {
            let k2 = broadcast_keys(&rk.tweak);
            match units.div_ceil(LANES) {
                0 | 1 => encrypt_counters::<1>(&k2, seq, &mut t0),
                2 => encrypt_counters::<2>(&k2, seq, &mut t0),
                _ => encrypt_counters::<4>(&k2, seq, &mut t0),
            }
        }
        seq = seq.wrapping_add(units as u128);
        for (unit, t) in group.chunks_exact_mut(unit_size).zip(t0) {
            crypt_unit::<DEC>(&k, unit, t);
        }
    }
}

/// One data unit whose encrypted tweak is `t0`.
#[inline]
#[target_feature(enable = "avx2,vaes,vpclmulqdq,aes")]
fn crypt_unit<const DEC: bool>(k: &[__m256i; ROUND_KEYS], unit: &mut [u8], t0: __m128i) {
    let t1 = mul_alpha(t0);
    let base = _mm256_set_m128i(t1, t0);
    let mut tw = [base; REGS];
    for (j, t) in tw.iter_mut().enumerate().skip(1) {
        *t = mul_alpha_pow(base, (j * LANES) as i32);
    }
    let poly = _mm256_set1_epi64x(0x87);
    let (chunks, rest) = unit.as_chunks_mut::<CHUNK>();
    for c in chunks {
        crypt_chunk::<DEC>(k, &tw, c);
        for t in tw.iter_mut() {
            *t = mul_alpha16(*t, poly);
        }
    }
    if !rest.is_empty() {
        let mut buf = [0u8; CHUNK];
        let n = rest.len();
        buf[..n].copy_from_slice(rest);
        crypt_chunk::<DEC>(k, &tw, &mut buf);
        rest.copy_from_slice(&buf[..n]);
        wipe(&mut buf);
    }
}

/// XTS on 16 consecutive blocks with the tweaks `tw` (4 per register).
#[inline]
#[target_feature(enable = "avx2,vaes")]
fn crypt_chunk<const DEC: bool>(
    k: &[__m256i; ROUND_KEYS],
    tw: &[__m256i; REGS],
    c: &mut [u8; CHUNK],
) {
    let p = c.as_mut_ptr();
    let mut b = [_mm256_setzero_si256(); REGS];
    for (j, x) in b.iter_mut().enumerate() {
        // SAFETY: `c` is CHUNK = REGS * 32 bytes, so bytes [32j, 32j + 32) lie inside it;
        // loadu has no alignment requirement.
        let v = unsafe { _mm256_loadu_si256(p.add(j * REG_BYTES).cast()) };
        *x = _mm256_xor_si256(v, _mm256_xor_si256(tw[j], k[0]));
    }
    for key in &k[1..ROUND_KEYS - 1] {
        for x in b.iter_mut() {
            *x = if DEC {
                _mm256_aesdec_epi128(*x, *key)
            } else {
                _mm256_aesenc_epi128(*x, *key)
            };
        }
    }
    for (j, x) in b.iter().enumerate() {
        let last = _mm256_xor_si256(k[ROUND_KEYS - 1], tw[j]);
        let v = if DEC {
            _mm256_aesdeclast_epi128(*x, last)
        } else {
            _mm256_aesenclast_epi128(*x, last)
        };
        // SAFETY: as for the load above.
        unsafe { _mm256_storeu_si256(p.add(j * REG_BYTES).cast(), v) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes(v: __m256i) -> [u128; 2] {
        let mut b = [0u8; 32];
        // SAFETY: b is 32 bytes; only called after AVX2 was detected.
        unsafe { _mm256_storeu_si256(b.as_mut_ptr().cast(), v) };
        let mut out = [0u128; 2];
        for (o, c) in out.iter_mut().zip(b.chunks_exact(16)) {
            let mut a = [0u8; 16];
            a.copy_from_slice(c);
            *o = u128::from_le_bytes(a);
        }
        out
    }

    #[target_feature(enable = "avx2,vpclmulqdq")]
    fn check_powers() {
        let vals = [1u128 << 127 | 5, 0x8000_0000_0000_0001_8000_0000_0000_0001];
        let mut bytes = [0u8; 32];
        for (c, v) in bytes.chunks_exact_mut(16).zip(vals) {
            c.copy_from_slice(&v.to_le_bytes());
        }
        // SAFETY: bytes is 32 bytes.
        let t = unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) };
        for k in [1, 4, 8, 12, 16, 33, 56] {
            let got = lanes(mul_alpha_pow(t, k));
            for (g, v) in got.iter().zip(vals) {
                let mut want = v;
                for _ in 0..k {
                    want = super::super::mul_alpha(want);
                }
                assert_eq!(*g, want, "k={k} v={v:x}");
            }
        }
        let got = lanes(mul_alpha16(t, _mm256_set1_epi64x(0x87)));
        for (g, v) in got.iter().zip(vals) {
            let mut want = v;
            for _ in 0..16 {
                want = super::super::mul_alpha(want);
            }
            assert_eq!(*g, want);
        }
    }

    #[test]
    fn lane_multiplies_match_scalar() {
        if !super::super::Tier::Vaes256.is_available() {
            return;
        }
        // SAFETY: the features of check_powers are a subset of the detected Vaes256 tier.
        unsafe { check_powers() };
    }
}
