//! The VAES-512 tier: AES-256-XTS on 512-bit registers (4 blocks per `vaesenc`).
//!
//! Shape (each point measured, see `docs/xts.md` and `notes/xts.md`):
//! * [`REGS`] = 4 zmm registers = 16 blocks per iteration. Their 13 middle rounds are one `asm!`
//!   block that issues the four chains round by round: left to itself LLVM scheduled three chains
//!   together and the fourth one alone (2 % slower at 32 x 4 KiB, 8 % at 4 KiB, 15 % at 512 B,
//!   measured as ratios to OpenSSL in the same runs). The 15 round keys stay in
//!   registers for the whole request (4 data + 4 tweak + 15 key registers fit in the 32 zmm).
//! * Tweaks never leave vector registers inside a unit: the unit's encrypted tweak is broadcast
//!   to the four lanes and each of the four registers gets its lanes multiplied by α^(4j+i) with
//!   variable shifts and one carry-less reduction (no serial doubling chain); each iteration then
//!   advances every register by α^16 (a 2-byte lane shift plus one VPCLMULQDQ).
//! * The tweaks of up to [`TWEAK_BATCH`] units of a request are encrypted with key2 together.
//! * The pre-whitening is one three-way XOR (`vpternlogq`: block ^ tweak ^ round key 0) and the
//!   post-whitening is folded into the last round key (`aesenclast(x, k14 ^ tweak)`).
//! * A unit tail shorter than 256 bytes (only for units that are not a multiple of 256 bytes,
//!   e.g. CAVP vectors) goes through a zero-padded stack copy that is wiped afterwards.
//!
//! Runs on the thread that calls [`Xts`](super::Xts); no allocation.

use core::arch::asm;
use core::arch::x86_64::*;

use super::aesni::wipe;
use super::{RoundKeys, WideKey, BLOCK_LEN, ROUND_KEYS};

/// Blocks per zmm register.
const LANES: usize = 4;
/// zmm registers (independent AES chains) per iteration.
const REGS: usize = 4;
/// Bytes per iteration: 16 blocks.
const CHUNK: usize = REGS * LANES * BLOCK_LEN;
/// Units whose tweaks are encrypted together (4 zmm of counters).
const TWEAK_BATCH: usize = 16;

/// A data unit and, out of place, its source.
type Unit<'a> = (&'a mut [u8], Option<&'a [u8]>);

/// One of the three schedules of a [`RoundKeys`], seen in place as 15 zmm values (each round
/// key already repeated in four lanes).
///
/// Key hygiene: the kernels index this view, so every round key is loaded from the key's
/// locked, wiped-on-drop page right where it is used. No array of round keys is ever built on
/// the reactor's stack (the former `load_keys` copied all 15 into a local array, which the
/// compiler placed on the stack and nothing wiped). `tests::no_round_key_left_on_the_stack`
/// checks the stack after a call.
#[inline]
fn schedule(keys: &[WideKey; ROUND_KEYS]) -> &[__m512i; ROUND_KEYS] {
    debug_assert_eq!(keys.as_ptr() as usize % core::mem::align_of::<__m512i>(), 0);
    // SAFETY: `[WideKey; ROUND_KEYS]` and `[__m512i; ROUND_KEYS]` have the same size (64 bytes
    // per element); every schedule lives in a `RoundKeys` (the only caller passes one of its
    // fields), which is `repr(C, align(64))` with its schedules at offsets that are multiples
    // of 64 (asserted below), so the reference is aligned for `__m512i`; any bit pattern is a
    // valid `__m512i`; the lifetime is the input's and the view is read-only.
    unsafe { &*keys.as_ptr().cast::<[__m512i; ROUND_KEYS]>() }
}

const _: () = {
    assert!(
        core::mem::size_of::<[WideKey; ROUND_KEYS]>()
            == core::mem::size_of::<[__m512i; ROUND_KEYS]>()
    );
    assert!(core::mem::align_of::<RoundKeys>() >= core::mem::align_of::<__m512i>());
    assert!(core::mem::offset_of!(RoundKeys, enc) % 64 == 0);
    assert!(core::mem::offset_of!(RoundKeys, dec) % 64 == 0);
    assert!(core::mem::offset_of!(RoundKeys, tweak) % 64 == 0);
};

/// Lane `i` of the result is lane `i` of `t` times α^(`first` + i), for `first + 3 <= 56`:
/// shift each lane left by its own count and reduce the bits that fall off the top with one
/// carry-less multiply by 0x87.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn mul_alpha_lanes(t: __m512i, first: i64, poly: __m512i) -> __m512i {
    let (a, b, c, d) = (first, first + 1, first + 2, first + 3);
    let counts = _mm512_set_epi64(d, d, c, c, b, b, a, a);
    let shifted = _mm512_sllv_epi64(t, counts);
    // A count of 64 (for α^0) yields 0: no carries, as wanted.
    let carries = _mm512_srlv_epi64(t, _mm512_sub_epi64(_mm512_set1_epi64(64), counts));
    let into_high = _mm512_bslli_epi128::<8>(carries);
    let off_top = _mm512_bsrli_epi128::<8>(carries);
    let reduced = _mm512_clmulepi64_epi128::<0x00>(off_top, poly);
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

/// Encrypts the tweak counters `seqs[..4N]` with key2 (`N` zmm chains) into `out`, one 16-byte
/// tweak per unit.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vaes")]
fn encrypt_counters<const N: usize>(
    k2: &[WideKey; ROUND_KEYS],
    seqs: &[u128; TWEAK_BATCH],
    out: &mut [[u8; BLOCK_LEN]; TWEAK_BATCH],
) {
    let k2 = schedule(k2);
    let mut b = [_mm512_setzero_si512(); N];
    for (x, l) in b.iter_mut().zip(seqs.as_chunks::<LANES>().0) {
        let v = _mm512_set_epi64(
            (l[3] >> 64) as i64,
            l[3] as i64,
            (l[2] >> 64) as i64,
            l[2] as i64,
            (l[1] >> 64) as i64,
            l[1] as i64,
            (l[0] >> 64) as i64,
            l[0] as i64,
        );
        // The rounds are asm with the round key as a register operand loaded from the locked
        // page: an intrinsic the compiler does not inline (debug builds) would receive the
        // round key through a copy on the stack, which nothing wipes.
        // SAFETY: register-only XOR (no memory, no stack, flags untouched); avx512f is enabled.
        unsafe {
            asm!("vpxorq {x}, {v}, {k}", x = lateout(zmm_reg) *x, v = in(zmm_reg) v,
                k = in(zmm_reg) k2[0], options(pure, nomem, nostack, preserves_flags))
        };
    }
    for k in &k2[1..ROUND_KEYS - 1] {
        for x in b.iter_mut() {
            // SAFETY: register-only AES round (no memory, no stack, flags untouched); avx512f
            // and vaes are enabled, which EVEX `vaesenc` on zmm needs.
            unsafe {
                asm!("vaesenc {x}, {x}, {k}", x = inout(zmm_reg) *x, k = in(zmm_reg) *k,
                    options(pure, nomem, nostack, preserves_flags))
            };
        }
    }
    for (x, o) in b.iter().zip(out.as_chunks_mut::<LANES>().0.iter_mut()) {
        let v: __m512i;
        // SAFETY: as above, the last AES round.
        unsafe {
            asm!("vaesenclast {v}, {x}, {k}", v = lateout(zmm_reg) v, x = in(zmm_reg) *x,
                k = in(zmm_reg) k2[ROUND_KEYS - 1], options(pure, nomem, nostack, preserves_flags))
        };
        // SAFETY: `o` is 4 x 16 = 64 bytes; storeu has no alignment requirement.
        unsafe { _mm512_storeu_si512(o.as_mut_ptr().cast(), v) };
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
    let units = data
        .chunks_exact_mut(unit_size)
        .zip(0u128..)
        .map(|(u, i)| (u, None, first_tweak.wrapping_add(i)));
    crypt_stream::<DEC, _>(rk, units);
}

/// VAES-512 XTS over several requests' buffers in one call; see [`super::Xts::encrypt_runs`].
/// Units of different requests share tweak batches and follow each other with no pipeline
/// drain in between. An out-of-place run's units are read from its source directly.
#[target_feature(enable = "avx512f,avx512bw,vaes,vpclmulqdq,aes")]
pub(super) fn crypt_runs<'a, const DEC: bool>(
    rk: &RoundKeys,
    runs: impl Iterator<Item = super::UnitRun<'a>>,
) {
    let units = runs.flat_map(|r| {
        let (data, src, unit_size, first) = r.into_parts_with_source();
        // A source unit per data unit, or none (in place). The lengths match (UnitRun checks).
        let srcs = src
            .into_iter()
            .flat_map(move |s| s.chunks_exact(unit_size).map(Some))
            .chain(core::iter::repeat(None));
        data.chunks_exact_mut(unit_size)
            .zip(srcs)
            .zip(0u128..)
            .map(move |((u, s), i)| (u, s, first.wrapping_add(i)))
    });
    crypt_stream::<DEC, _>(rk, units);
}

/// The shared loop: `units` yields each data unit, its source unit when out of place (same
/// length), and its tweak counter; their tweaks are encrypted [`TWEAK_BATCH`] at a time, then
/// the units are transformed in order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vaes,vpclmulqdq,aes")]
fn crypt_stream<'a, const DEC: bool, I: Iterator<Item = (&'a mut [u8], Option<&'a [u8]>, u128)>>(
    rk: &RoundKeys,
    mut units: I,
) {
    let k = schedule(if DEC { &rk.dec } else { &rk.enc });
    let mut t0 = [[0u8; BLOCK_LEN]; TWEAK_BATCH];
    loop {
        let mut group: [Option<Unit<'_>>; TWEAK_BATCH] = Default::default();
        let mut seqs = [0u128; TWEAK_BATCH];
        let mut n = 0;
        for (slot, (u, src, s)) in group.iter_mut().zip(units.by_ref()) {
            *slot = Some((u, src));
            seqs[n] = s;
            n += 1;
        }
        match n.div_ceil(LANES) {
            0 => return,
            1 => encrypt_counters::<1>(&rk.tweak, &seqs, &mut t0),
            2 => encrypt_counters::<2>(&rk.tweak, &seqs, &mut t0),
            3 => encrypt_counters::<3>(&rk.tweak, &seqs, &mut t0),
            _ => encrypt_counters::<4>(&rk.tweak, &seqs, &mut t0),
        }
        for (unit, t) in group.iter_mut().zip(t0.iter()) {
            if let Some((unit, src)) = unit {
                crypt_unit::<DEC>(k, unit, *src, t);
            }
        }
        if n < TWEAK_BATCH {
            return;
        }
    }
}

/// One data unit whose encrypted tweak is `t`: in place, or from `src` (as long as `unit`) into
/// `unit`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vaes,vpclmulqdq,aes")]
fn crypt_unit<const DEC: bool>(
    k: &[__m512i; ROUND_KEYS],
    unit: &mut [u8],
    src: Option<&[u8]>,
    t: &[u8; BLOCK_LEN],
) {
    let poly = _mm512_set1_epi64(0x87);
    // SAFETY: `t` is 16 bytes; loadu has no alignment requirement.
    let t = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(t.as_ptr().cast()) });
    let mut tw = [
        mul_alpha_lanes(t, 0, poly),
        mul_alpha_lanes(t, 4, poly),
        mul_alpha_lanes(t, 8, poly),
        mul_alpha_lanes(t, 12, poly),
    ];
    let len = unit.len();
    let dp = unit.as_mut_ptr();
    let sp: *const u8 = match src {
        Some(s) if s.len() == len => s.as_ptr(),
        // In place (a source of another length cannot come from a checked UnitRun).
        _ => dp,
    };
    let whole = len / CHUNK * CHUNK;
    let mut off = 0;
    while off < whole {
        // SAFETY: `off + CHUNK <= whole <= len`, and both `src` and `unit` are `len` bytes long,
        // so both ranges lie inside their buffers. They are either the same bytes (in place) or
        // two distinct borrows that cannot overlap.
        unsafe { crypt_chunk::<DEC>(k, &tw, sp.add(off), dp.add(off)) };
        for t in tw.iter_mut() {
            *t = mul_alpha16(*t, poly);
        }
        off += CHUNK;
    }
    if off < len {
        let n = len - off;
        let mut buf = [0u8; CHUNK];
        // SAFETY: bytes [off, len) lie inside `src`; `buf` is a distinct local of CHUNK > n bytes.
        unsafe { core::ptr::copy_nonoverlapping(sp.add(off), buf.as_mut_ptr(), n) };
        let b = buf.as_mut_ptr();
        // SAFETY: `buf` is CHUNK bytes, used as source and destination (in place).
        unsafe { crypt_chunk::<DEC>(k, &tw, b, b) };
        unit[off..].copy_from_slice(&buf[..n]);
        wipe(&mut buf);
    }
}

/// XTS on 16 consecutive blocks with the tweaks `tw` (4 per register), read from `src` and
/// written to `dst`.
///
/// # Safety
/// `src` must be valid for reading and `dst` for writing [`CHUNK`] bytes. They may be equal (in
/// place); every block is loaded before any is stored, so that is safe.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vaes")]
unsafe fn crypt_chunk<const DEC: bool>(
    k: &[__m512i; ROUND_KEYS],
    tw: &[__m512i; REGS],
    src: *const u8,
    dst: *mut u8,
) {
    let mut b = [_mm512_setzero_si512(); REGS];
    for (j, x) in b.iter_mut().enumerate() {
        // SAFETY: the caller guarantees CHUNK = REGS * 64 readable bytes at `src`, so bytes
        // [64j, 64j + 64) are inside them; loadu has no alignment requirement.
        let v = unsafe { _mm512_loadu_si512(src.add(j * 64).cast()) };
        *x = _mm512_ternarylogic_epi64::<0x96>(v, tw[j], k[0]);
    }
    if DEC {
        // SAFETY: register-only AES rounds (no memory, no stack, flags untouched); this
        // function enables avx512f and vaes, which EVEX `vaesdec` on zmm needs.
        unsafe {
            asm!(
                "vaesdec {b0}, {b0}, {k1}", "vaesdec {b1}, {b1}, {k1}", "vaesdec {b2}, {b2}, {k1}", "vaesdec {b3}, {b3}, {k1}",
                "vaesdec {b0}, {b0}, {k2}", "vaesdec {b1}, {b1}, {k2}", "vaesdec {b2}, {b2}, {k2}", "vaesdec {b3}, {b3}, {k2}",
                "vaesdec {b0}, {b0}, {k3}", "vaesdec {b1}, {b1}, {k3}", "vaesdec {b2}, {b2}, {k3}", "vaesdec {b3}, {b3}, {k3}",
                "vaesdec {b0}, {b0}, {k4}", "vaesdec {b1}, {b1}, {k4}", "vaesdec {b2}, {b2}, {k4}", "vaesdec {b3}, {b3}, {k4}",
                "vaesdec {b0}, {b0}, {k5}", "vaesdec {b1}, {b1}, {k5}", "vaesdec {b2}, {b2}, {k5}", "vaesdec {b3}, {b3}, {k5}",
                "vaesdec {b0}, {b0}, {k6}", "vaesdec {b1}, {b1}, {k6}", "vaesdec {b2}, {b2}, {k6}", "vaesdec {b3}, {b3}, {k6}",
                "vaesdec {b0}, {b0}, {k7}", "vaesdec {b1}, {b1}, {k7}", "vaesdec {b2}, {b2}, {k7}", "vaesdec {b3}, {b3}, {k7}",
                "vaesdec {b0}, {b0}, {k8}", "vaesdec {b1}, {b1}, {k8}", "vaesdec {b2}, {b2}, {k8}", "vaesdec {b3}, {b3}, {k8}",
                "vaesdec {b0}, {b0}, {k9}", "vaesdec {b1}, {b1}, {k9}", "vaesdec {b2}, {b2}, {k9}", "vaesdec {b3}, {b3}, {k9}",
                "vaesdec {b0}, {b0}, {k10}", "vaesdec {b1}, {b1}, {k10}", "vaesdec {b2}, {b2}, {k10}", "vaesdec {b3}, {b3}, {k10}",
                "vaesdec {b0}, {b0}, {k11}", "vaesdec {b1}, {b1}, {k11}", "vaesdec {b2}, {b2}, {k11}", "vaesdec {b3}, {b3}, {k11}",
                "vaesdec {b0}, {b0}, {k12}", "vaesdec {b1}, {b1}, {k12}", "vaesdec {b2}, {b2}, {k12}", "vaesdec {b3}, {b3}, {k12}",
                "vaesdec {b0}, {b0}, {k13}", "vaesdec {b1}, {b1}, {k13}", "vaesdec {b2}, {b2}, {k13}", "vaesdec {b3}, {b3}, {k13}",
                b0 = inout(zmm_reg) b[0],
                b1 = inout(zmm_reg) b[1],
                b2 = inout(zmm_reg) b[2],
                b3 = inout(zmm_reg) b[3],
                k1 = in(zmm_reg) k[1],
                k2 = in(zmm_reg) k[2],
                k3 = in(zmm_reg) k[3],
                k4 = in(zmm_reg) k[4],
                k5 = in(zmm_reg) k[5],
                k6 = in(zmm_reg) k[6],
                k7 = in(zmm_reg) k[7],
                k8 = in(zmm_reg) k[8],
                k9 = in(zmm_reg) k[9],
                k10 = in(zmm_reg) k[10],
                k11 = in(zmm_reg) k[11],
                k12 = in(zmm_reg) k[12],
                k13 = in(zmm_reg) k[13],
                options(pure, nomem, nostack, preserves_flags),
            )
        };
    } else {
        // SAFETY: register-only AES rounds (no memory, no stack, flags untouched); this
        // function enables avx512f and vaes, which EVEX `vaesenc` on zmm needs.
        unsafe {
            asm!(
                "vaesenc {b0}, {b0}, {k1}", "vaesenc {b1}, {b1}, {k1}", "vaesenc {b2}, {b2}, {k1}", "vaesenc {b3}, {b3}, {k1}",
                "vaesenc {b0}, {b0}, {k2}", "vaesenc {b1}, {b1}, {k2}", "vaesenc {b2}, {b2}, {k2}", "vaesenc {b3}, {b3}, {k2}",
                "vaesenc {b0}, {b0}, {k3}", "vaesenc {b1}, {b1}, {k3}", "vaesenc {b2}, {b2}, {k3}", "vaesenc {b3}, {b3}, {k3}",
                "vaesenc {b0}, {b0}, {k4}", "vaesenc {b1}, {b1}, {k4}", "vaesenc {b2}, {b2}, {k4}", "vaesenc {b3}, {b3}, {k4}",
                "vaesenc {b0}, {b0}, {k5}", "vaesenc {b1}, {b1}, {k5}", "vaesenc {b2}, {b2}, {k5}", "vaesenc {b3}, {b3}, {k5}",
                "vaesenc {b0}, {b0}, {k6}", "vaesenc {b1}, {b1}, {k6}", "vaesenc {b2}, {b2}, {k6}", "vaesenc {b3}, {b3}, {k6}",
                "vaesenc {b0}, {b0}, {k7}", "vaesenc {b1}, {b1}, {k7}", "vaesenc {b2}, {b2}, {k7}", "vaesenc {b3}, {b3}, {k7}",
                "vaesenc {b0}, {b0}, {k8}", "vaesenc {b1}, {b1}, {k8}", "vaesenc {b2}, {b2}, {k8}", "vaesenc {b3}, {b3}, {k8}",
                "vaesenc {b0}, {b0}, {k9}", "vaesenc {b1}, {b1}, {k9}", "vaesenc {b2}, {b2}, {k9}", "vaesenc {b3}, {b3}, {k9}",
                "vaesenc {b0}, {b0}, {k10}", "vaesenc {b1}, {b1}, {k10}", "vaesenc {b2}, {b2}, {k10}", "vaesenc {b3}, {b3}, {k10}",
                "vaesenc {b0}, {b0}, {k11}", "vaesenc {b1}, {b1}, {k11}", "vaesenc {b2}, {b2}, {k11}", "vaesenc {b3}, {b3}, {k11}",
                "vaesenc {b0}, {b0}, {k12}", "vaesenc {b1}, {b1}, {k12}", "vaesenc {b2}, {b2}, {k12}", "vaesenc {b3}, {b3}, {k12}",
                "vaesenc {b0}, {b0}, {k13}", "vaesenc {b1}, {b1}, {k13}", "vaesenc {b2}, {b2}, {k13}", "vaesenc {b3}, {b3}, {k13}",
                b0 = inout(zmm_reg) b[0],
                b1 = inout(zmm_reg) b[1],
                b2 = inout(zmm_reg) b[2],
                b3 = inout(zmm_reg) b[3],
                k1 = in(zmm_reg) k[1],
                k2 = in(zmm_reg) k[2],
                k3 = in(zmm_reg) k[3],
                k4 = in(zmm_reg) k[4],
                k5 = in(zmm_reg) k[5],
                k6 = in(zmm_reg) k[6],
                k7 = in(zmm_reg) k[7],
                k8 = in(zmm_reg) k[8],
                k9 = in(zmm_reg) k[9],
                k10 = in(zmm_reg) k[10],
                k11 = in(zmm_reg) k[11],
                k12 = in(zmm_reg) k[12],
                k13 = in(zmm_reg) k[13],
                options(pure, nomem, nostack, preserves_flags),
            )
        };
    }
    for (j, x) in b.iter().enumerate() {
        let last = _mm512_xor_si512(k[ROUND_KEYS - 1], tw[j]);
        let v = if DEC {
            _mm512_aesdeclast_epi128(*x, last)
        } else {
            _mm512_aesenclast_epi128(*x, last)
        };
        // SAFETY: the caller guarantees CHUNK writable bytes at `dst`; storeu has no alignment
        // requirement.
        unsafe { _mm512_storeu_si512(dst.add(j * 64).cast(), v) };
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
        let poly = _mm512_set1_epi64(0x87);
        for first in [0, 1, 4, 8, 12, 30, 53] {
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

    /// Bytes of dead stack below the caller that [`dead_stack`] copies out.
    const SCAN_BYTES: usize = 16 * 1024;

    /// Copies the [`SCAN_BYTES`] below this function's stack pointer (the frames of whatever
    /// the caller called last, now dead) into `out`. Pure asm, so this function leaves no frame
    /// of its own over that memory.
    #[inline(never)]
    fn dead_stack(out: &mut [u8; SCAN_BYTES]) {
        // SAFETY: reads SCAN_BYTES of this thread's stack mapping just below rsp (the mapping
        // reaches far lower: a test thread has a 2 MiB stack, and nothing here runs deep) and
        // writes them to `out`, a distinct buffer of that size. rep movsb uses rsi/rdi/rcx,
        // declared clobbered; the direction flag is clear per the ABI.
        unsafe {
            asm!(
                "mov rsi, rsp",
                "sub rsi, {n}",
                "rep movsb",
                n = const SCAN_BYTES,
                inout("rdi") out.as_mut_ptr() => _,
                inout("rcx") SCAN_BYTES => _,
                out("rsi") _,
                options(nostack, preserves_flags),
            )
        };
    }

    /// Whether any 16-byte round key of `rk` (any schedule) occurs in `hay`.
    fn holds_a_round_key(rk: &RoundKeys, hay: &[u8]) -> Option<(usize, usize)> {
        for (s, sched) in [&rk.enc, &rk.dec, &rk.tweak].into_iter().enumerate() {
            for (i, wide) in sched.iter().enumerate() {
                let k = &wide[..16];
                if hay.windows(16).any(|w| w == k) {
                    return Some((s, i));
                }
            }
        }
        None
    }

    /// Builds a key schedule (then scrubs the stack the expansion used), on its own frame.
    #[inline(never)]
    fn schedule_in_locked_page() -> crate::sys::mlock::LockedBox<RoundKeys> {
        let mut key = [0u8; 64];
        for (i, b) in key.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(151).wrapping_add(7);
        }
        let mut rk = crate::sys::mlock::LockedBox::new(RoundKeys {
            enc: [[0; 64]; ROUND_KEYS],
            dec: [[0; 64]; ROUND_KEYS],
            tweak: [[0; 64]; ROUND_KEYS],
        })
        .expect("locked box");
        let (k1, k2) = key.split_at(32);
        // SAFETY: only called after the Vaes512 tier (which includes AES-NI) was detected.
        unsafe {
            super::super::aesni::expand_keys(
                k1.try_into().expect("32"),
                k2.try_into().expect("32"),
                &mut rk,
            )
        };
        zeroize::Zeroize::zeroize(&mut key);
        rk
    }

    /// Encrypts and decrypts a 4 KiB unit and a 512-byte one through the kernel, on its own
    /// frame.
    #[inline(never)]
    fn run_kernel(rk: &RoundKeys, data: &mut [u8]) {
        // SAFETY: only called after the Vaes512 tier was detected.
        unsafe {
            crypt_units::<false>(rk, data, 4096, 9);
            crypt_units::<true>(rk, data, 4096, 9);
            crypt_units::<false>(rk, &mut data[..512], 512, 3);
            crypt_units::<true>(rk, &mut data[..512], 512, 3);
        }
    }

    /// Key hygiene (issue 11 item 9): after a kernel call returns, no round key is left in the
    /// dead stack frames it used. The former code copied all 15 round keys into a local array.
    #[test]
    fn no_round_key_left_on_the_stack() {
        if !super::super::Tier::Vaes512.is_available() {
            eprintln!("skipped: no VAES-512 on this CPU");
            return;
        }
        let rk = schedule_in_locked_page();
        crate::sys::mlock::scrub_stack();
        let mut dump = Box::new([0u8; SCAN_BYTES]);
        dead_stack(&mut dump);
        assert_eq!(
            holds_a_round_key(&rk, &dump[..]),
            None,
            "the key expansion left a round key on the stack: the test cannot see the kernel's"
        );
        let mut data = vec![0x3Cu8; 8192];
        let plain = data.clone();
        run_kernel(&rk, &mut data);
        dead_stack(&mut dump);
        if let Some((sched, i)) = holds_a_round_key(&rk, &dump[..]) {
            panic!("round key {i} of schedule {sched} (0 enc, 1 dec, 2 tweak) left on the stack");
        }
        assert_eq!(data, plain, "the kernel ran (and round-tripped)");
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
