//! The VAES-512 tier: AES-256-XTS on 512-bit registers (4 blocks per `vaesenc`).
//!
//! Shape (each point measured in `notes/xts.md`):
//! * [`REGS`] = 4 zmm registers = 16 blocks per iteration, interleaved round by round; the 15
//!   round keys stay broadcast in registers for the whole request (4 data + 4 tweak + 15 key
//!   registers fit in the 32 zmm).
//! * Tweaks never leave vector registers: a unit's first four tweaks are built with SSE2
//!   doublings, the other lanes by one carry-less multiply by α^4/α^8/α^12, and each iteration
//!   advances every register by α^16 (a 2-byte lane shift plus one VPCLMULQDQ reduction).
//! * The tweaks of up to [`TWEAK_BATCH`] units of a request are encrypted with key2 together.
//! * The pre-whitening is one three-way XOR (`vpternlogq`: block ^ tweak ^ round key 0) and the
//!   post-whitening is folded into the last round key (`aesenclast(x, k14 ^ tweak)`).
//! * A unit tail shorter than 256 bytes (only for units that are not a multiple of 256 bytes,
//!   e.g. CAVP vectors) goes through a zero-padded stack copy that is wiped afterwards.
//!
//! Runs on the thread that calls [`Xts`](super::Xts); no allocation.

use core::arch::x86_64::*;

use super::aesni::{mul_alpha, wipe};
use super::{RoundKeys, BLOCK_LEN, ROUND_KEYS};

/// Blocks per zmm register.
const LANES: usize = 4;
/// zmm registers (independent AES chains) per iteration.
const REGS: usize = 4;
/// Bytes per iteration: 16 blocks.
const CHUNK: usize = REGS * LANES * BLOCK_LEN;
/// Units whose tweaks are encrypted together (4 zmm of counters).
const TWEAK_BATCH: usize = 16;

/// `t · α^k` per 128-bit lane, for 1 <= k <= 56: shift the lane left by `k` bits and reduce the
/// `k` bits that fall off the top with one carry-less multiply by 0x87.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn mul_alpha_pow(t: __m512i, k: i32) -> __m512i {
    let shifted = _mm512_sll_epi64(t, _mm_cvtsi32_si128(k));
    let carries = _mm512_srl_epi64(t, _mm_cvtsi32_si128(64 - k));
    let into_high = _mm512_bslli_epi128::<8>(carries);
    let off_top = _mm512_bsrli_epi128::<8>(carries);
    let reduced = _mm512_clmulepi64_epi128::<0x00>(off_top, _mm512_set1_epi64(0x87));
    _mm512_ternarylogic_epi64::<0x96>(shifted, into_high, reduced)
}

/// `t · α^16` per 128-bit lane: a 2-byte shift, and the 16 bits shifted out times 0x87.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn mul_alpha16(t: __m512i, poly: __m512i) -> __m512i {
    let off_top = _mm512_bsrli_epi128::<14>(t);
    let reduced = _mm512_clmulepi64_epi128::<0x00>(off_top, poly);
    _mm512_xor_si512(_mm512_bslli_epi128::<2>(t), reduced)
}

/// Broadcasts each 16-byte round key to all four lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn broadcast_keys(keys: &[[u8; BLOCK_LEN]; ROUND_KEYS]) -> [__m512i; ROUND_KEYS] {
    let mut out = [_mm512_setzero_si512(); ROUND_KEYS];
    for (o, k) in out.iter_mut().zip(keys.iter()) {
        // SAFETY: `k` is a 16-byte array; loadu has no alignment requirement.
        *o = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(k.as_ptr().cast()) });
    }
    out
}

/// Encrypts the tweak counters `seq .. seq + 4N` with key2, `N` zmm chains, and returns them
/// one block per entry.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vaes")]
fn encrypt_counters<const N: usize>(
    k2: &[__m512i; ROUND_KEYS],
    seq: u128,
    out: &mut [__m128i; TWEAK_BATCH],
) {
    let mut b = [_mm512_setzero_si512(); N];
    for (j, x) in b.iter_mut().enumerate() {
        let base = seq.wrapping_add((j * LANES) as u128);
        let lane = |i: u128| base.wrapping_add(i);
        let (l0, l1, l2, l3) = (lane(0), lane(1), lane(2), lane(3));
        let v = _mm512_set_epi64(
            (l3 >> 64) as i64,
            l3 as i64,
            (l2 >> 64) as i64,
            l2 as i64,
            (l1 >> 64) as i64,
            l1 as i64,
            (l0 >> 64) as i64,
            l0 as i64,
        );
        *x = _mm512_xor_si512(v, k2[0]);
    }
    for k in &k2[1..ROUND_KEYS - 1] {
        for x in b.iter_mut() {
            *x = _mm512_aesenc_epi128(*x, *k);
        }
    }
    for (j, x) in b.iter().enumerate() {
        let v = _mm512_aesenclast_epi128(*x, k2[ROUND_KEYS - 1]);
        out[j * LANES] = _mm512_extracti32x4_epi32::<0>(v);
        out[j * LANES + 1] = _mm512_extracti32x4_epi32::<1>(v);
        out[j * LANES + 2] = _mm512_extracti32x4_epi32::<2>(v);
        out[j * LANES + 3] = _mm512_extracti32x4_epi32::<3>(v);
    }
}

/// VAES-512 XTS over whole units; see [`super::Xts::encrypt_units`]. `DEC` selects decryption.
/// Requires `data.len()` to be a multiple of `unit_size` and `unit_size` a non-zero multiple of
/// 16 (checked by the caller; otherwise trailing bytes are left as they are).
#[target_feature(enable = "avx512f,avx512bw,vaes,vpclmulqdq,aes")]
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
                3 => encrypt_counters::<3>(&k2, seq, &mut t0),
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
#[target_feature(enable = "avx512f,avx512bw,vaes,vpclmulqdq,aes")]
fn crypt_unit<const DEC: bool>(k: &[__m512i; ROUND_KEYS], unit: &mut [u8], t0: __m128i) {
    let t1 = mul_alpha(t0);
    let t2 = mul_alpha(t1);
    let t3 = mul_alpha(t2);
    let mut base = _mm512_castsi128_si512(t0);
    base = _mm512_inserti32x4::<1>(base, t1);
    base = _mm512_inserti32x4::<2>(base, t2);
    base = _mm512_inserti32x4::<3>(base, t3);
    let mut tw = [
        base,
        mul_alpha_pow(base, 4),
        mul_alpha_pow(base, 8),
        mul_alpha_pow(base, 12),
    ];
    let poly = _mm512_set1_epi64(0x87);
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
#[target_feature(enable = "avx512f,avx512bw,vaes")]
fn crypt_chunk<const DEC: bool>(
    k: &[__m512i; ROUND_KEYS],
    tw: &[__m512i; REGS],
    c: &mut [u8; CHUNK],
) {
    let p = c.as_mut_ptr();
    let mut b = [_mm512_setzero_si512(); REGS];
    for (j, x) in b.iter_mut().enumerate() {
        // SAFETY: `c` is CHUNK = REGS * 64 bytes, so bytes [64j, 64j + 64) lie inside it;
        // loadu has no alignment requirement.
        let v = unsafe { _mm512_loadu_si512(p.add(j * 64).cast()) };
        *x = _mm512_ternarylogic_epi64::<0x96>(v, tw[j], k[0]);
    }
    for key in &k[1..ROUND_KEYS - 1] {
        for x in b.iter_mut() {
            *x = if DEC {
                _mm512_aesdec_epi128(*x, *key)
            } else {
                _mm512_aesenc_epi128(*x, *key)
            };
        }
    }
    for (j, x) in b.iter().enumerate() {
        let last = _mm512_xor_si512(k[ROUND_KEYS - 1], tw[j]);
        let v = if DEC {
            _mm512_aesdeclast_epi128(*x, last)
        } else {
            _mm512_aesenclast_epi128(*x, last)
        };
        // SAFETY: as for the load above.
        unsafe { _mm512_storeu_si512(p.add(j * 64).cast(), v) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes(v: __m512i) -> [u128; 4] {
        let mut b = [0u8; 64];
        // SAFETY: b is 64 bytes; only called after AVX-512F was detected.
        unsafe { _mm512_storeu_si512(b.as_mut_ptr().cast(), v) };
        let mut out = [0u128; 4];
        for (o, c) in out.iter_mut().zip(b.chunks_exact(16)) {
            let mut a = [0u8; 16];
            a.copy_from_slice(c);
            *o = u128::from_le_bytes(a);
        }
        out
    }

    #[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
    fn check_powers() {
        let vals = [
            1u128 << 127 | 5,
            u128::MAX,
            0x8000_0000_0000_0001_8000_0000_0000_0001,
            3,
        ];
        let mut bytes = [0u8; 64];
        for (c, v) in bytes.chunks_exact_mut(16).zip(vals) {
            c.copy_from_slice(&v.to_le_bytes());
        }
        // SAFETY: bytes is 64 bytes.
        let t = unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) };
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
        let got = lanes(mul_alpha16(t, _mm512_set1_epi64(0x87)));
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
        if !super::super::Tier::Vaes512.is_available() {
            return;
        }
        // SAFETY: the features of check_powers are a subset of the detected Vaes512 tier.
        unsafe { check_powers() };
    }
}
