//! The VAES-256 tier: AES-256-XTS on 256-bit registers (2 blocks per `vaesenc`), for CPUs with
//! VAES and AVX2 but no (or unwanted) AVX-512, e.g. Zen 3 and Alder Lake.
//!
//! Same shape as the VAES-512 tier (see `vaes512.rs`): [`REGS`] = 8 ymm registers = 16 blocks
//! per iteration whose 13 middle rounds are one `asm!` block issuing the eight chains round by
//! round; tweaks built per unit with lane-parallel multiplies and advanced by α^16 per iteration
//! in registers; the tweaks of up to [`TWEAK_BATCH`] units encrypted together; the
//! post-whitening folded into the last round key. AVX2 has only 16 ymm registers, so the middle
//! round keys are loaded from the (L1-resident, pre-broadcast) key table once per round and
//! shared by the eight chains. Without AVX-512VL there is no three-way XOR, so the
//! pre-whitening is two XORs.
//!
//! Runs on the thread that calls [`Xts`](super::Xts); no allocation.

use core::arch::asm;
use core::arch::x86_64::*;

use super::aesni::wipe;
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

/// Loads round key `i` (two lanes of its pre-broadcast [`WideKey`]).
#[inline]
#[target_feature(enable = "avx2")]
fn load_key(keys: &[WideKey; ROUND_KEYS], i: usize) -> __m256i {
    let k = &keys[i.min(ROUND_KEYS - 1)];
    // SAFETY: `k` is 64 bytes, the load reads its first 32; no alignment requirement.
    unsafe { _mm256_loadu_si256(k.as_ptr().cast()) }
}

/// Lane `i` of the result is lane `i` of `t` times α^(`first` + i), for `first + 1 <= 56`.
#[inline]
#[target_feature(enable = "avx2,vpclmulqdq")]
fn mul_alpha_lanes(t: __m256i, first: i64, poly: __m256i) -> __m256i {
    let (a, b) = (first, first + 1);
    let counts = _mm256_set_epi64x(b, b, a, a);
    let shifted = _mm256_sllv_epi64(t, counts);
    // A count of 64 (for α^0) yields 0: no carries, as wanted.
    let carries = _mm256_srlv_epi64(t, _mm256_sub_epi64(_mm256_set1_epi64x(64), counts));
    let into_high = _mm256_bslli_epi128::<8>(carries);
    let off_top = _mm256_bsrli_epi128::<8>(carries);
    let reduced = _mm256_clmulepi64_epi128::<0x00>(off_top, poly);
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

/// Encrypts the tweak counters `seq .. seq + 2N` with key2 (`N` ymm chains) into `out`, one
/// 16-byte tweak per unit.
#[inline]
#[target_feature(enable = "avx2,vaes")]
fn encrypt_counters<const N: usize>(
    k2: &[WideKey; ROUND_KEYS],
    seq: u128,
    out: &mut [[u8; BLOCK_LEN]; TWEAK_BATCH],
) {
    let mut b = [_mm256_setzero_si256(); N];
    let k0 = load_key(k2, 0);
    for (j, x) in b.iter_mut().enumerate() {
        let lane = |i: usize| seq.wrapping_add((j * LANES + i) as u128);
        let (l0, l1) = (lane(0), lane(1));
        let v = _mm256_set_epi64x((l1 >> 64) as i64, l1 as i64, (l0 >> 64) as i64, l0 as i64);
        *x = _mm256_xor_si256(v, k0);
    }
    for r in 1..ROUND_KEYS - 1 {
        let k = load_key(k2, r);
        for x in b.iter_mut() {
            *x = _mm256_aesenc_epi128(*x, k);
        }
    }
    let last = load_key(k2, ROUND_KEYS - 1);
    for (x, o) in b.iter().zip(out.as_chunks_mut::<LANES>().0.iter_mut()) {
        let v = _mm256_aesenclast_epi128(*x, last);
        // SAFETY: `o` is 2 x 16 = 32 bytes; storeu has no alignment requirement.
        unsafe { _mm256_storeu_si256(o.as_mut_ptr().cast(), v) };
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
    let keys = if DEC { &rk.dec } else { &rk.enc };
    let mut t0 = [[0u8; BLOCK_LEN]; TWEAK_BATCH];
    let mut seq = first_tweak;
    for group in data.chunks_mut(unit_size.saturating_mul(TWEAK_BATCH)) {
        let units = group.len() / unit_size;
        match units.div_ceil(LANES) {
            0 | 1 => encrypt_counters::<1>(&rk.tweak, seq, &mut t0),
            2 => encrypt_counters::<2>(&rk.tweak, seq, &mut t0),
            _ => encrypt_counters::<4>(&rk.tweak, seq, &mut t0),
        }
        seq = seq.wrapping_add(units as u128);
        for (unit, t) in group.chunks_exact_mut(unit_size).zip(t0.iter()) {
            crypt_unit::<DEC>(keys, unit, t);
        }
    }
}

/// One data unit whose encrypted tweak is `t`.
#[inline]
#[target_feature(enable = "avx2,vaes,vpclmulqdq,aes")]
fn crypt_unit<const DEC: bool>(keys: &[WideKey; ROUND_KEYS], unit: &mut [u8], t: &[u8; BLOCK_LEN]) {
    let poly = _mm256_set1_epi64x(0x87);
    // SAFETY: `t` is 16 bytes; loadu has no alignment requirement.
    let t = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(t.as_ptr().cast()) });
    let mut tw = [_mm256_setzero_si256(); REGS];
    for (j, x) in tw.iter_mut().enumerate() {
        *x = mul_alpha_lanes(t, (j * LANES) as i64, poly);
    }
    let (chunks, rest) = unit.as_chunks_mut::<CHUNK>();
    for c in chunks {
        crypt_chunk::<DEC>(keys, &tw, c);
        for t in tw.iter_mut() {
            *t = mul_alpha16(*t, poly);
        }
    }
    if !rest.is_empty() {
        let mut buf = [0u8; CHUNK];
        let n = rest.len();
        buf[..n].copy_from_slice(rest);
        crypt_chunk::<DEC>(keys, &tw, &mut buf);
        rest.copy_from_slice(&buf[..n]);
        wipe(&mut buf);
    }
}

/// XTS on 16 consecutive blocks with the tweaks `tw` (2 per register).
#[inline]
#[target_feature(enable = "avx2,vaes")]
fn crypt_chunk<const DEC: bool>(
    keys: &[WideKey; ROUND_KEYS],
    tw: &[__m256i; REGS],
    c: &mut [u8; CHUNK],
) {
    let p = c.as_mut_ptr();
    let k0 = load_key(keys, 0);
    let mut b = [_mm256_setzero_si256(); REGS];
    for (j, x) in b.iter_mut().enumerate() {
        // SAFETY: `c` is CHUNK = REGS * 32 bytes, so bytes [32j, 32j + 32) lie inside it;
        // loadu has no alignment requirement.
        let v = unsafe { _mm256_loadu_si256(p.add(j * REG_BYTES).cast()) };
        *x = _mm256_xor_si256(v, _mm256_xor_si256(tw[j], k0));
    }
    if DEC {
        // SAFETY: AES rounds on registers plus reads of round keys 1..=13 at byte offsets
        // 64..=832 of `keys` (15 x 64 bytes, so in bounds); no writes, no stack, flags
        // untouched; this function enables avx2 and vaes, which VEX `vaesdec` on ymm needs.
        unsafe {
            asm!(
                "vmovdqu {key}, ymmword ptr [{kp} + 64]",
                "vaesdec {b0}, {b0}, {key}", "vaesdec {b1}, {b1}, {key}", "vaesdec {b2}, {b2}, {key}", "vaesdec {b3}, {b3}, {key}", "vaesdec {b4}, {b4}, {key}", "vaesdec {b5}, {b5}, {key}", "vaesdec {b6}, {b6}, {key}", "vaesdec {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 128]",
                "vaesdec {b0}, {b0}, {key}", "vaesdec {b1}, {b1}, {key}", "vaesdec {b2}, {b2}, {key}", "vaesdec {b3}, {b3}, {key}", "vaesdec {b4}, {b4}, {key}", "vaesdec {b5}, {b5}, {key}", "vaesdec {b6}, {b6}, {key}", "vaesdec {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 192]",
                "vaesdec {b0}, {b0}, {key}", "vaesdec {b1}, {b1}, {key}", "vaesdec {b2}, {b2}, {key}", "vaesdec {b3}, {b3}, {key}", "vaesdec {b4}, {b4}, {key}", "vaesdec {b5}, {b5}, {key}", "vaesdec {b6}, {b6}, {key}", "vaesdec {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 256]",
                "vaesdec {b0}, {b0}, {key}", "vaesdec {b1}, {b1}, {key}", "vaesdec {b2}, {b2}, {key}", "vaesdec {b3}, {b3}, {key}", "vaesdec {b4}, {b4}, {key}", "vaesdec {b5}, {b5}, {key}", "vaesdec {b6}, {b6}, {key}", "vaesdec {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 320]",
                "vaesdec {b0}, {b0}, {key}", "vaesdec {b1}, {b1}, {key}", "vaesdec {b2}, {b2}, {key}", "vaesdec {b3}, {b3}, {key}", "vaesdec {b4}, {b4}, {key}", "vaesdec {b5}, {b5}, {key}", "vaesdec {b6}, {b6}, {key}", "vaesdec {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 384]",
                "vaesdec {b0}, {b0}, {key}", "vaesdec {b1}, {b1}, {key}", "vaesdec {b2}, {b2}, {key}", "vaesdec {b3}, {b3}, {key}", "vaesdec {b4}, {b4}, {key}", "vaesdec {b5}, {b5}, {key}", "vaesdec {b6}, {b6}, {key}", "vaesdec {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 448]",
                "vaesdec {b0}, {b0}, {key}", "vaesdec {b1}, {b1}, {key}", "vaesdec {b2}, {b2}, {key}", "vaesdec {b3}, {b3}, {key}", "vaesdec {b4}, {b4}, {key}", "vaesdec {b5}, {b5}, {key}", "vaesdec {b6}, {b6}, {key}", "vaesdec {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 512]",
                "vaesdec {b0}, {b0}, {key}", "vaesdec {b1}, {b1}, {key}", "vaesdec {b2}, {b2}, {key}", "vaesdec {b3}, {b3}, {key}", "vaesdec {b4}, {b4}, {key}", "vaesdec {b5}, {b5}, {key}", "vaesdec {b6}, {b6}, {key}", "vaesdec {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 576]",
                "vaesdec {b0}, {b0}, {key}", "vaesdec {b1}, {b1}, {key}", "vaesdec {b2}, {b2}, {key}", "vaesdec {b3}, {b3}, {key}", "vaesdec {b4}, {b4}, {key}", "vaesdec {b5}, {b5}, {key}", "vaesdec {b6}, {b6}, {key}", "vaesdec {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 640]",
                "vaesdec {b0}, {b0}, {key}", "vaesdec {b1}, {b1}, {key}", "vaesdec {b2}, {b2}, {key}", "vaesdec {b3}, {b3}, {key}", "vaesdec {b4}, {b4}, {key}", "vaesdec {b5}, {b5}, {key}", "vaesdec {b6}, {b6}, {key}", "vaesdec {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 704]",
                "vaesdec {b0}, {b0}, {key}", "vaesdec {b1}, {b1}, {key}", "vaesdec {b2}, {b2}, {key}", "vaesdec {b3}, {b3}, {key}", "vaesdec {b4}, {b4}, {key}", "vaesdec {b5}, {b5}, {key}", "vaesdec {b6}, {b6}, {key}", "vaesdec {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 768]",
                "vaesdec {b0}, {b0}, {key}", "vaesdec {b1}, {b1}, {key}", "vaesdec {b2}, {b2}, {key}", "vaesdec {b3}, {b3}, {key}", "vaesdec {b4}, {b4}, {key}", "vaesdec {b5}, {b5}, {key}", "vaesdec {b6}, {b6}, {key}", "vaesdec {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 832]",
                "vaesdec {b0}, {b0}, {key}", "vaesdec {b1}, {b1}, {key}", "vaesdec {b2}, {b2}, {key}", "vaesdec {b3}, {b3}, {key}", "vaesdec {b4}, {b4}, {key}", "vaesdec {b5}, {b5}, {key}", "vaesdec {b6}, {b6}, {key}", "vaesdec {b7}, {b7}, {key}",
                b0 = inout(ymm_reg) b[0],
                b1 = inout(ymm_reg) b[1],
                b2 = inout(ymm_reg) b[2],
                b3 = inout(ymm_reg) b[3],
                b4 = inout(ymm_reg) b[4],
                b5 = inout(ymm_reg) b[5],
                b6 = inout(ymm_reg) b[6],
                b7 = inout(ymm_reg) b[7],
                key = out(ymm_reg) _,
                kp = in(reg) keys.as_ptr(),
                options(pure, readonly, nostack, preserves_flags),
            )
        };
    } else {
        // SAFETY: as above, with `vaesenc`.
        unsafe {
            asm!(
                "vmovdqu {key}, ymmword ptr [{kp} + 64]",
                "vaesenc {b0}, {b0}, {key}", "vaesenc {b1}, {b1}, {key}", "vaesenc {b2}, {b2}, {key}", "vaesenc {b3}, {b3}, {key}", "vaesenc {b4}, {b4}, {key}", "vaesenc {b5}, {b5}, {key}", "vaesenc {b6}, {b6}, {key}", "vaesenc {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 128]",
                "vaesenc {b0}, {b0}, {key}", "vaesenc {b1}, {b1}, {key}", "vaesenc {b2}, {b2}, {key}", "vaesenc {b3}, {b3}, {key}", "vaesenc {b4}, {b4}, {key}", "vaesenc {b5}, {b5}, {key}", "vaesenc {b6}, {b6}, {key}", "vaesenc {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 192]",
                "vaesenc {b0}, {b0}, {key}", "vaesenc {b1}, {b1}, {key}", "vaesenc {b2}, {b2}, {key}", "vaesenc {b3}, {b3}, {key}", "vaesenc {b4}, {b4}, {key}", "vaesenc {b5}, {b5}, {key}", "vaesenc {b6}, {b6}, {key}", "vaesenc {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 256]",
                "vaesenc {b0}, {b0}, {key}", "vaesenc {b1}, {b1}, {key}", "vaesenc {b2}, {b2}, {key}", "vaesenc {b3}, {b3}, {key}", "vaesenc {b4}, {b4}, {key}", "vaesenc {b5}, {b5}, {key}", "vaesenc {b6}, {b6}, {key}", "vaesenc {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 320]",
                "vaesenc {b0}, {b0}, {key}", "vaesenc {b1}, {b1}, {key}", "vaesenc {b2}, {b2}, {key}", "vaesenc {b3}, {b3}, {key}", "vaesenc {b4}, {b4}, {key}", "vaesenc {b5}, {b5}, {key}", "vaesenc {b6}, {b6}, {key}", "vaesenc {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 384]",
                "vaesenc {b0}, {b0}, {key}", "vaesenc {b1}, {b1}, {key}", "vaesenc {b2}, {b2}, {key}", "vaesenc {b3}, {b3}, {key}", "vaesenc {b4}, {b4}, {key}", "vaesenc {b5}, {b5}, {key}", "vaesenc {b6}, {b6}, {key}", "vaesenc {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 448]",
                "vaesenc {b0}, {b0}, {key}", "vaesenc {b1}, {b1}, {key}", "vaesenc {b2}, {b2}, {key}", "vaesenc {b3}, {b3}, {key}", "vaesenc {b4}, {b4}, {key}", "vaesenc {b5}, {b5}, {key}", "vaesenc {b6}, {b6}, {key}", "vaesenc {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 512]",
                "vaesenc {b0}, {b0}, {key}", "vaesenc {b1}, {b1}, {key}", "vaesenc {b2}, {b2}, {key}", "vaesenc {b3}, {b3}, {key}", "vaesenc {b4}, {b4}, {key}", "vaesenc {b5}, {b5}, {key}", "vaesenc {b6}, {b6}, {key}", "vaesenc {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 576]",
                "vaesenc {b0}, {b0}, {key}", "vaesenc {b1}, {b1}, {key}", "vaesenc {b2}, {b2}, {key}", "vaesenc {b3}, {b3}, {key}", "vaesenc {b4}, {b4}, {key}", "vaesenc {b5}, {b5}, {key}", "vaesenc {b6}, {b6}, {key}", "vaesenc {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 640]",
                "vaesenc {b0}, {b0}, {key}", "vaesenc {b1}, {b1}, {key}", "vaesenc {b2}, {b2}, {key}", "vaesenc {b3}, {b3}, {key}", "vaesenc {b4}, {b4}, {key}", "vaesenc {b5}, {b5}, {key}", "vaesenc {b6}, {b6}, {key}", "vaesenc {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 704]",
                "vaesenc {b0}, {b0}, {key}", "vaesenc {b1}, {b1}, {key}", "vaesenc {b2}, {b2}, {key}", "vaesenc {b3}, {b3}, {key}", "vaesenc {b4}, {b4}, {key}", "vaesenc {b5}, {b5}, {key}", "vaesenc {b6}, {b6}, {key}", "vaesenc {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 768]",
                "vaesenc {b0}, {b0}, {key}", "vaesenc {b1}, {b1}, {key}", "vaesenc {b2}, {b2}, {key}", "vaesenc {b3}, {b3}, {key}", "vaesenc {b4}, {b4}, {key}", "vaesenc {b5}, {b5}, {key}", "vaesenc {b6}, {b6}, {key}", "vaesenc {b7}, {b7}, {key}",
                "vmovdqu {key}, ymmword ptr [{kp} + 832]",
                "vaesenc {b0}, {b0}, {key}", "vaesenc {b1}, {b1}, {key}", "vaesenc {b2}, {b2}, {key}", "vaesenc {b3}, {b3}, {key}", "vaesenc {b4}, {b4}, {key}", "vaesenc {b5}, {b5}, {key}", "vaesenc {b6}, {b6}, {key}", "vaesenc {b7}, {b7}, {key}",
                b0 = inout(ymm_reg) b[0],
                b1 = inout(ymm_reg) b[1],
                b2 = inout(ymm_reg) b[2],
                b3 = inout(ymm_reg) b[3],
                b4 = inout(ymm_reg) b[4],
                b5 = inout(ymm_reg) b[5],
                b6 = inout(ymm_reg) b[6],
                b7 = inout(ymm_reg) b[7],
                key = out(ymm_reg) _,
                kp = in(reg) keys.as_ptr(),
                options(pure, readonly, nostack, preserves_flags),
            )
        };
    }
    let k14 = load_key(keys, ROUND_KEYS - 1);
    for (j, x) in b.iter().enumerate() {
        let last = _mm256_xor_si256(k14, tw[j]);
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
        let poly = _mm256_set1_epi64x(0x87);
        for first in [0, 1, 2, 14, 30, 55] {
            let got = lanes(mul_alpha_lanes(t, first, poly));
            for (i, (g, v)) in got.iter().zip(vals).enumerate() {
                let mut want = v;
                for _ in 0..first as usize + i {
                    want = super::super::mul_alpha(want);
                }
                assert_eq!(*g, want, "first={first} lane {i} v={v:x}");
            }
        }
        let got = lanes(mul_alpha16(t, poly));
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
