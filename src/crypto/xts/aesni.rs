//! The AES-NI tier (128-bit registers), and the AES-256 key schedule every hardware tier uses.
//!
//! Key schedule: AESKEYGENASSIST for the encryption round keys (FIPS-197 §5.2 done by the
//! instruction's SubWord/RotWord), and AESIMC to turn them into the decryption keys of the
//! equivalent inverse cipher (FIPS-197 §5.3.5), which `aesdec` needs. It runs once per key on a
//! control thread; the `aes` crate's schedule is not used because it does not expose its keys.
//!
//! Kernel: [`BLOCKS`] independent blocks are interleaved round by round so the AES unit's
//! latency is hidden (one `aesenc` chain would use a quarter of its throughput). Tweaks are
//! doubled in registers with SSE2 (no PCLMULQDQ needed), and the tweaks of up to [`BLOCKS`]
//! units of a request are encrypted together before the units are processed. The last round's
//! key is pre-xored with the block's tweak, so the post-whitening costs no extra latency.
//! Runs on the thread that calls [`Xts`](super::Xts); no allocation.

use core::arch::asm;
use core::arch::x86_64::*;

use zeroize::Zeroize;

use super::{RoundKeys, WideKey, BLOCK_LEN, ROUND_KEYS};

/// Blocks interleaved per iteration (8 × 16 bytes = 128 bytes; 16 xmm registers hold 8 blocks,
/// one round key and temporaries).
const BLOCKS: usize = 8;
const CHUNK: usize = BLOCKS * BLOCK_LEN;

/// Expands key1 (both directions) and key2 (encryption) into `rk`.
///
/// # Safety
/// The CPU must support AES-NI (`is_x86_feature_detected!("aes")`).
#[target_feature(enable = "aes")]
pub(super) unsafe fn expand_keys(key1: &[u8; 32], key2: &[u8; 32], rk: &mut RoundKeys) {
    let mut enc = [_mm_setzero_si128(); ROUND_KEYS];
    expand_256(key1, &mut enc);
    let mut dec = [_mm_setzero_si128(); ROUND_KEYS];
    dec[0] = enc[ROUND_KEYS - 1];
    for i in 1..ROUND_KEYS - 1 {
        dec[i] = _mm_aesimc_si128(enc[ROUND_KEYS - 1 - i]);
    }
    dec[ROUND_KEYS - 1] = enc[0];
    store_keys(&enc, &mut rk.enc);
    store_keys(&dec, &mut rk.dec);
    expand_256(key2, &mut enc);
    store_keys(&enc, &mut rk.tweak);
    // The register copies on this stack frame hold key material: wipe them.
    for k in enc.iter_mut().chain(dec.iter_mut()) {
        *k = _mm_setzero_si128();
    }
    // Keep the wipes from being optimised away.
    core::hint::black_box((&enc, &dec));
}

/// FIPS-197 key expansion for a 256-bit key, 15 round keys.
#[inline]
#[target_feature(enable = "aes")]
fn expand_256(key: &[u8; 32], out: &mut [__m128i; ROUND_KEYS]) {
    let (lo, hi) = key.split_at(16);
    // SAFETY: `lo` and `hi` are 16 bytes each; loadu has no alignment requirement.
    let (mut a, mut b) = unsafe {
        (
            _mm_loadu_si128(lo.as_ptr().cast()),
            _mm_loadu_si128(hi.as_ptr().cast()),
        )
    };
    out[0] = a;
    out[1] = b;
    // Each macro step derives two round keys: the even one from RotWord/SubWord/Rcon of the
    // previous key's last word (shuffle 0xff), the odd one from SubWord of it (shuffle 0xaa).
    macro_rules! step {
        ($rcon:literal, $i:literal) => {
            a = mix(
                a,
                _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(b)),
            );
            out[$i] = a;
        };
        ($rcon:literal, $i:literal, $j:literal) => {
            step!($rcon, $i);
            b = mix(
                b,
                _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(a)),
            );
            out[$j] = b;
        };
    }
    step!(0x01, 2, 3);
    step!(0x02, 4, 5);
    step!(0x04, 6, 7);
    step!(0x08, 8, 9);
    step!(0x10, 10, 11);
    step!(0x20, 12, 13);
    step!(0x40, 14);
}

/// w[i] = w[i-1] ^ w[i-Nk] over the four words of `a`, then xor with the assisted word `t`.
#[inline]
#[target_feature(enable = "sse2")]
fn mix(mut a: __m128i, t: __m128i) -> __m128i {
    a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
    a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
    a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
    _mm_xor_si128(a, t)
}

/// Stores each round key into all four lanes of its [`WideKey`].
#[target_feature(enable = "sse2")]
fn store_keys(keys: &[__m128i; ROUND_KEYS], out: &mut [WideKey; ROUND_KEYS]) {
    for (k, o) in keys.iter().zip(out.iter_mut()) {
        for lane in o.as_chunks_mut::<BLOCK_LEN>().0 {
            // SAFETY: `lane` is a 16-byte array; storeu has no alignment requirement.
            unsafe { _mm_storeu_si128(lane.as_mut_ptr().cast(), *k) };
        }
    }
}

/// Loads the 15 round keys (lane 0 of each [`WideKey`]).
#[inline]
#[target_feature(enable = "sse2")]
pub(super) fn load_keys(keys: &[WideKey; ROUND_KEYS]) -> [__m128i; ROUND_KEYS] {
    let mut out = [_mm_setzero_si128(); ROUND_KEYS];
    for (o, k) in out.iter_mut().zip(keys.iter()) {
        // SAFETY: `k` is 64 bytes, the load reads its first 16; no alignment requirement.
        *o = unsafe { _mm_loadu_si128(k.as_ptr().cast()) };
    }
    out
}

/// `t · α` in GF(2^128) (XTS polynomial), on a tweak in an xmm register, SSE2 only: shift the
/// 128-bit little-endian value left by one; the bit leaving qword 0 enters qword 1 and the bit
/// leaving the top is reduced as 0x87 into byte 0.
#[inline]
#[target_feature(enable = "sse2")]
pub(super) fn mul_alpha(t: __m128i) -> __m128i {
    // Sign-extend each dword's top bit, then move dword 3's to dword 0 and dword 1's to dword 2.
    let signs = _mm_shuffle_epi32::<0x13>(_mm_srai_epi32::<31>(t));
    let carries = _mm_and_si128(signs, _mm_set_epi32(0, 1, 0, 0x87));
    _mm_xor_si128(_mm_add_epi64(t, t), carries)
}

/// The tweak value `seq` as the 16-byte little-endian block.
#[inline]
#[target_feature(enable = "sse2")]
pub(super) fn counter_block(seq: u128) -> __m128i {
    _mm_set_epi64x((seq >> 64) as u64 as i64, seq as u64 as i64)
}

/// Encrypts `N` consecutive tweak counters `seq..seq+N` with key2; independent chains.
#[inline]
#[target_feature(enable = "aes")]
pub(super) fn encrypt_counters<const N: usize>(
    k2: &[__m128i; ROUND_KEYS],
    seq: u128,
) -> [__m128i; N] {
    let mut b = [_mm_setzero_si128(); N];
    for (j, x) in b.iter_mut().enumerate() {
        *x = _mm_xor_si128(counter_block(seq.wrapping_add(j as u128)), k2[0]);
    }
    for k in &k2[1..ROUND_KEYS - 1] {
        for x in b.iter_mut() {
            *x = _mm_aesenc_si128(*x, *k);
        }
    }
    for x in b.iter_mut() {
        *x = _mm_aesenclast_si128(*x, k2[ROUND_KEYS - 1]);
    }
    b
}

/// AES-NI XTS over whole units; see [`super::Xts::encrypt_units`]. `DEC` selects decryption.
/// Requires `data.len()` to be a multiple of `unit_size` and `unit_size` a non-zero multiple of
/// 16 (checked by the caller; otherwise trailing bytes are left as they are).
#[target_feature(enable = "aes")]
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
    let k = load_keys(keys);
    let k2 = load_keys(&rk.tweak);
    let mut seq = first_tweak;
    for group in data.chunks_mut(unit_size.saturating_mul(BLOCKS)) {
        let units = group.len() / unit_size;
        let mut t0 = [_mm_setzero_si128(); BLOCKS];
        // Encrypt only as many tweak counters as there are units (rounded up to 1, 2, 4, 8).
        match units {
            0 | 1 => t0[..1].copy_from_slice(&encrypt_counters::<1>(&k2, seq)),
            2 => t0[..2].copy_from_slice(&encrypt_counters::<2>(&k2, seq)),
            3 | 4 => t0[..4].copy_from_slice(&encrypt_counters::<4>(&k2, seq)),
            _ => t0 = encrypt_counters::<BLOCKS>(&k2, seq),
        }
        seq = seq.wrapping_add(units as u128);
        for (unit, t) in group.chunks_exact_mut(unit_size).zip(t0) {
            crypt_unit::<DEC>(keys, &k, unit, t);
        }
    }
}

/// One data unit with encrypted tweak `t`.
#[inline]
#[target_feature(enable = "aes")]
fn crypt_unit<const DEC: bool>(
    keys: &[WideKey; ROUND_KEYS],
    k: &[__m128i; ROUND_KEYS],
    unit: &mut [u8],
    mut t: __m128i,
) {
    let (chunks, rest) = unit.as_chunks_mut::<CHUNK>();
    for c in chunks {
        let mut tw = [t; BLOCKS];
        for j in 1..BLOCKS {
            tw[j] = mul_alpha(tw[j - 1]);
        }
        t = mul_alpha(tw[BLOCKS - 1]);
        crypt_chunk::<DEC>(keys, k, &tw, c);
    }
    let (blocks, _) = rest.as_chunks_mut::<BLOCK_LEN>();
    for b in blocks {
        crypt_blocks::<DEC, 1>(k, &[t], b);
        t = mul_alpha(t);
    }
}

/// XTS on [`BLOCKS`] consecutive blocks with tweaks `tw`. The 13 middle rounds are one `asm!`
/// block that issues the eight chains round by round (LLVM otherwise ran three chains together
/// and five one after the other), loading each round key once for the eight blocks: 16 xmm
/// registers do not hold 8 blocks, 15 keys and 8 tweaks.
#[inline]
#[target_feature(enable = "aes")]
fn crypt_chunk<const DEC: bool>(
    keys: &[WideKey; ROUND_KEYS],
    k: &[__m128i; ROUND_KEYS],
    tw: &[__m128i; BLOCKS],
    c: &mut [u8; CHUNK],
) {
    let p = c.as_mut_ptr();
    let mut b = [_mm_setzero_si128(); BLOCKS];
    for (j, x) in b.iter_mut().enumerate() {
        // SAFETY: `c` is CHUNK = BLOCKS * 16 bytes, so block j lies inside it; loadu has no
        // alignment requirement.
        let v = unsafe { _mm_loadu_si128(p.add(j * BLOCK_LEN).cast()) };
        *x = _mm_xor_si128(v, _mm_xor_si128(tw[j], k[0]));
    }
    if DEC {
        // SAFETY: AES rounds on registers plus 16-byte reads of round keys 1..=13 at byte
        // offsets 64..=832 of `keys` (15 x 64 bytes, so in bounds); no writes, no stack, flags
        // untouched; this function enables aes (and sse2), which `aesdec`/`movdqu` need.
        unsafe {
            asm!(
                "movdqu {key}, xmmword ptr [{kp} + 64]",
                "aesdec {b0}, {key}", "aesdec {b1}, {key}", "aesdec {b2}, {key}", "aesdec {b3}, {key}", "aesdec {b4}, {key}", "aesdec {b5}, {key}", "aesdec {b6}, {key}", "aesdec {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 128]",
                "aesdec {b0}, {key}", "aesdec {b1}, {key}", "aesdec {b2}, {key}", "aesdec {b3}, {key}", "aesdec {b4}, {key}", "aesdec {b5}, {key}", "aesdec {b6}, {key}", "aesdec {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 192]",
                "aesdec {b0}, {key}", "aesdec {b1}, {key}", "aesdec {b2}, {key}", "aesdec {b3}, {key}", "aesdec {b4}, {key}", "aesdec {b5}, {key}", "aesdec {b6}, {key}", "aesdec {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 256]",
                "aesdec {b0}, {key}", "aesdec {b1}, {key}", "aesdec {b2}, {key}", "aesdec {b3}, {key}", "aesdec {b4}, {key}", "aesdec {b5}, {key}", "aesdec {b6}, {key}", "aesdec {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 320]",
                "aesdec {b0}, {key}", "aesdec {b1}, {key}", "aesdec {b2}, {key}", "aesdec {b3}, {key}", "aesdec {b4}, {key}", "aesdec {b5}, {key}", "aesdec {b6}, {key}", "aesdec {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 384]",
                "aesdec {b0}, {key}", "aesdec {b1}, {key}", "aesdec {b2}, {key}", "aesdec {b3}, {key}", "aesdec {b4}, {key}", "aesdec {b5}, {key}", "aesdec {b6}, {key}", "aesdec {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 448]",
                "aesdec {b0}, {key}", "aesdec {b1}, {key}", "aesdec {b2}, {key}", "aesdec {b3}, {key}", "aesdec {b4}, {key}", "aesdec {b5}, {key}", "aesdec {b6}, {key}", "aesdec {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 512]",
                "aesdec {b0}, {key}", "aesdec {b1}, {key}", "aesdec {b2}, {key}", "aesdec {b3}, {key}", "aesdec {b4}, {key}", "aesdec {b5}, {key}", "aesdec {b6}, {key}", "aesdec {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 576]",
                "aesdec {b0}, {key}", "aesdec {b1}, {key}", "aesdec {b2}, {key}", "aesdec {b3}, {key}", "aesdec {b4}, {key}", "aesdec {b5}, {key}", "aesdec {b6}, {key}", "aesdec {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 640]",
                "aesdec {b0}, {key}", "aesdec {b1}, {key}", "aesdec {b2}, {key}", "aesdec {b3}, {key}", "aesdec {b4}, {key}", "aesdec {b5}, {key}", "aesdec {b6}, {key}", "aesdec {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 704]",
                "aesdec {b0}, {key}", "aesdec {b1}, {key}", "aesdec {b2}, {key}", "aesdec {b3}, {key}", "aesdec {b4}, {key}", "aesdec {b5}, {key}", "aesdec {b6}, {key}", "aesdec {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 768]",
                "aesdec {b0}, {key}", "aesdec {b1}, {key}", "aesdec {b2}, {key}", "aesdec {b3}, {key}", "aesdec {b4}, {key}", "aesdec {b5}, {key}", "aesdec {b6}, {key}", "aesdec {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 832]",
                "aesdec {b0}, {key}", "aesdec {b1}, {key}", "aesdec {b2}, {key}", "aesdec {b3}, {key}", "aesdec {b4}, {key}", "aesdec {b5}, {key}", "aesdec {b6}, {key}", "aesdec {b7}, {key}",
                b0 = inout(xmm_reg) b[0],
                b1 = inout(xmm_reg) b[1],
                b2 = inout(xmm_reg) b[2],
                b3 = inout(xmm_reg) b[3],
                b4 = inout(xmm_reg) b[4],
                b5 = inout(xmm_reg) b[5],
                b6 = inout(xmm_reg) b[6],
                b7 = inout(xmm_reg) b[7],
                key = out(xmm_reg) _,
                kp = in(reg) keys.as_ptr(),
                options(pure, readonly, nostack, preserves_flags),
            )
        };
    } else {
        // SAFETY: as above, with `aesenc`.
        unsafe {
            asm!(
                "movdqu {key}, xmmword ptr [{kp} + 64]",
                "aesenc {b0}, {key}", "aesenc {b1}, {key}", "aesenc {b2}, {key}", "aesenc {b3}, {key}", "aesenc {b4}, {key}", "aesenc {b5}, {key}", "aesenc {b6}, {key}", "aesenc {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 128]",
                "aesenc {b0}, {key}", "aesenc {b1}, {key}", "aesenc {b2}, {key}", "aesenc {b3}, {key}", "aesenc {b4}, {key}", "aesenc {b5}, {key}", "aesenc {b6}, {key}", "aesenc {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 192]",
                "aesenc {b0}, {key}", "aesenc {b1}, {key}", "aesenc {b2}, {key}", "aesenc {b3}, {key}", "aesenc {b4}, {key}", "aesenc {b5}, {key}", "aesenc {b6}, {key}", "aesenc {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 256]",
                "aesenc {b0}, {key}", "aesenc {b1}, {key}", "aesenc {b2}, {key}", "aesenc {b3}, {key}", "aesenc {b4}, {key}", "aesenc {b5}, {key}", "aesenc {b6}, {key}", "aesenc {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 320]",
                "aesenc {b0}, {key}", "aesenc {b1}, {key}", "aesenc {b2}, {key}", "aesenc {b3}, {key}", "aesenc {b4}, {key}", "aesenc {b5}, {key}", "aesenc {b6}, {key}", "aesenc {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 384]",
                "aesenc {b0}, {key}", "aesenc {b1}, {key}", "aesenc {b2}, {key}", "aesenc {b3}, {key}", "aesenc {b4}, {key}", "aesenc {b5}, {key}", "aesenc {b6}, {key}", "aesenc {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 448]",
                "aesenc {b0}, {key}", "aesenc {b1}, {key}", "aesenc {b2}, {key}", "aesenc {b3}, {key}", "aesenc {b4}, {key}", "aesenc {b5}, {key}", "aesenc {b6}, {key}", "aesenc {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 512]",
                "aesenc {b0}, {key}", "aesenc {b1}, {key}", "aesenc {b2}, {key}", "aesenc {b3}, {key}", "aesenc {b4}, {key}", "aesenc {b5}, {key}", "aesenc {b6}, {key}", "aesenc {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 576]",
                "aesenc {b0}, {key}", "aesenc {b1}, {key}", "aesenc {b2}, {key}", "aesenc {b3}, {key}", "aesenc {b4}, {key}", "aesenc {b5}, {key}", "aesenc {b6}, {key}", "aesenc {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 640]",
                "aesenc {b0}, {key}", "aesenc {b1}, {key}", "aesenc {b2}, {key}", "aesenc {b3}, {key}", "aesenc {b4}, {key}", "aesenc {b5}, {key}", "aesenc {b6}, {key}", "aesenc {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 704]",
                "aesenc {b0}, {key}", "aesenc {b1}, {key}", "aesenc {b2}, {key}", "aesenc {b3}, {key}", "aesenc {b4}, {key}", "aesenc {b5}, {key}", "aesenc {b6}, {key}", "aesenc {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 768]",
                "aesenc {b0}, {key}", "aesenc {b1}, {key}", "aesenc {b2}, {key}", "aesenc {b3}, {key}", "aesenc {b4}, {key}", "aesenc {b5}, {key}", "aesenc {b6}, {key}", "aesenc {b7}, {key}",
                "movdqu {key}, xmmword ptr [{kp} + 832]",
                "aesenc {b0}, {key}", "aesenc {b1}, {key}", "aesenc {b2}, {key}", "aesenc {b3}, {key}", "aesenc {b4}, {key}", "aesenc {b5}, {key}", "aesenc {b6}, {key}", "aesenc {b7}, {key}",
                b0 = inout(xmm_reg) b[0],
                b1 = inout(xmm_reg) b[1],
                b2 = inout(xmm_reg) b[2],
                b3 = inout(xmm_reg) b[3],
                b4 = inout(xmm_reg) b[4],
                b5 = inout(xmm_reg) b[5],
                b6 = inout(xmm_reg) b[6],
                b7 = inout(xmm_reg) b[7],
                key = out(xmm_reg) _,
                kp = in(reg) keys.as_ptr(),
                options(pure, readonly, nostack, preserves_flags),
            )
        };
    }
    for (j, x) in b.iter().enumerate() {
        let last = _mm_xor_si128(k[ROUND_KEYS - 1], tw[j]);
        let v = if DEC {
            _mm_aesdeclast_si128(*x, last)
        } else {
            _mm_aesenclast_si128(*x, last)
        };
        // SAFETY: as for the load above.
        unsafe { _mm_storeu_si128(p.add(j * BLOCK_LEN).cast(), v) };
    }
}

/// XTS on `N` consecutive blocks (`N * 16` bytes at `c`) with tweaks `tw`, `N` chains
/// interleaved round by round.
#[inline]
#[target_feature(enable = "aes")]
fn crypt_blocks<const DEC: bool, const N: usize>(
    k: &[__m128i; ROUND_KEYS],
    tw: &[__m128i; N],
    c: &mut [u8],
) {
    debug_assert_eq!(c.len(), N * BLOCK_LEN);
    if c.len() < N * BLOCK_LEN {
        return;
    }
    let p = c.as_mut_ptr();
    let mut b = [_mm_setzero_si128(); N];
    for (j, x) in b.iter_mut().enumerate() {
        // SAFETY: `c` holds at least N * 16 bytes (checked above), so block j lies inside it;
        // loadu has no alignment requirement.
        let v = unsafe { _mm_loadu_si128(p.add(j * BLOCK_LEN).cast()) };
        *x = _mm_xor_si128(v, _mm_xor_si128(tw[j], k[0]));
    }
    for key in &k[1..ROUND_KEYS - 1] {
        for x in b.iter_mut() {
            *x = if DEC {
                _mm_aesdec_si128(*x, *key)
            } else {
                _mm_aesenc_si128(*x, *key)
            };
        }
    }
    for (j, x) in b.iter().enumerate() {
        let last = _mm_xor_si128(k[ROUND_KEYS - 1], tw[j]);
        let v = if DEC {
            _mm_aesdeclast_si128(*x, last)
        } else {
            _mm_aesenclast_si128(*x, last)
        };
        // SAFETY: as for the load above.
        unsafe { _mm_storeu_si128(p.add(j * BLOCK_LEN).cast(), v) };
    }
}

/// Wipes a stack buffer that held data (used by the VAES tails).
#[inline]
pub(super) fn wipe(buf: &mut [u8]) {
    buf.zeroize();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_u128(v: __m128i) -> u128 {
        let mut b = [0u8; 16];
        // SAFETY: b is 16 bytes.
        unsafe { _mm_storeu_si128(b.as_mut_ptr().cast(), v) };
        u128::from_le_bytes(b)
    }

    #[test]
    fn mul_alpha_matches_scalar() {
        for v in [
            1u128,
            1 << 63,
            1 << 64,
            1 << 127,
            u128::MAX,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        ] {
            // SAFETY: SSE2 is part of the x86_64 baseline.
            let got = unsafe { mul_alpha(counter_block(v)) };
            assert_eq!(to_u128(got), super::super::mul_alpha(v), "{v:x}");
        }
    }

    /// FIPS-197 Appendix A.3 key expansion: first and last round keys of the example key.
    #[test]
    fn key_schedule_matches_fips197() {
        if !std::arch::is_x86_feature_detected!("aes") {
            return;
        }
        let mut key = [0u8; 32];
        let hex = "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4";
        for (i, b) in key.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex");
        }
        // SAFETY: AES-NI was detected above.
        let out = unsafe { expand_to_bytes(&key) };
        let (last, r2) = (out[14], out[2]);
        // w[56..60] = fe4890d1 e6188d0b 046df344 706c631e
        assert_eq!(
            last,
            [
                0xfe, 0x48, 0x90, 0xd1, 0xe6, 0x18, 0x8d, 0x0b, 0x04, 0x6d, 0xf3, 0x44, 0x70, 0x6c,
                0x63, 0x1e
            ]
        );
        // w[8..12] = 9ba35411 8e6925af a51a8b5f 2067fcde
        assert_eq!(
            r2,
            [
                0x9b, 0xa3, 0x54, 0x11, 0x8e, 0x69, 0x25, 0xaf, 0xa5, 0x1a, 0x8b, 0x5f, 0x20, 0x67,
                0xfc, 0xde
            ]
        );
    }

    /// # Safety
    /// AES-NI must be present.
    #[target_feature(enable = "aes")]
    unsafe fn expand_to_bytes(key: &[u8; 32]) -> [[u8; 16]; ROUND_KEYS] {
        let mut regs = [_mm_setzero_si128(); ROUND_KEYS];
        expand_256(key, &mut regs);
        let mut wide = [[0u8; 64]; ROUND_KEYS];
        store_keys(&regs, &mut wide);
        let mut out = [[0u8; 16]; ROUND_KEYS];
        for (o, w) in out.iter_mut().zip(wide.iter()) {
            o.copy_from_slice(&w[..16]);
            assert!(w.as_chunks::<16>().0.iter().all(|l| l == o), "lanes differ");
        }
        out
    }
}
