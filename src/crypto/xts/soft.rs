//! The portable tier: XTS on top of the `aes` crate's block cipher.
//!
//! Runs on any CPU (the `aes` crate picks its own backend: bit-sliced software, or AES-NI/VAES
//! where it detects them). It is the fallback and the reference the hardware kernels are checked
//! against in unit tests; it is not tuned. Like the kernels it works on whole requests: the
//! tweaks of up to [`BATCH`] units are encrypted in one `encrypt_blocks` call, and each unit's
//! blocks go through the cipher [`BATCH`] at a time with their tweaks precomputed on the stack.
//! Called on whichever thread owns the [`Xts`](super::Xts); no allocation.

use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::{Aes256, Aes256Enc, Block};
use zeroize::Zeroize;

use super::{mul_alpha, BLOCK_LEN};
use crate::crypto::key::{CryptoError, XtsKey};
use crate::sys::mlock::LockedBox;

/// Blocks (and unit tweaks) handed to the `aes` crate per call: large enough for its
/// parallel backends, small enough for the stack (512 bytes of tweaks).
const BATCH: usize = 32;

/// key1 (both directions) and key2 (encrypt only) as `aes` crate ciphers.
pub(super) struct SoftKeys {
    data: Aes256,
    tweak: Aes256Enc,
}

impl SoftKeys {
    /// Expands both halves of `key` into a locked page.
    pub(super) fn new(key: &XtsKey) -> Result<LockedBox<SoftKeys>, CryptoError> {
        let keys = SoftKeys {
            data: Aes256::new(key.key1().into()),
            tweak: Aes256Enc::new(key.key2().into()),
        };
        LockedBox::new(keys).ok_or(CryptoError::OutOfMemory)
    }

    /// Encrypts (`DEC == false`) or decrypts in place the units of `data`; unit `i` has the
    /// tweak value `first_tweak + i`. `data.len()` is a multiple of `unit_size`, which is a
    /// non-zero multiple of 16 (checked by the caller; other lengths leave a tail untouched).
    pub(super) fn crypt_units<const DEC: bool>(
        &self,
        data: &mut [u8],
        unit_size: usize,
        first_tweak: u128,
    ) {
        let mut tweaks = [Block::default(); BATCH];
        let mut seq = first_tweak;
        for group in data.chunks_mut(unit_size.saturating_mul(BATCH)) {
            // Encrypt the tweaks of every unit of this group together.
            let units = group.len() / unit_size;
            let first_tweaks = &mut tweaks[..units];
            for t in first_tweaks.iter_mut() {
                *t = Block::from(seq.to_le_bytes());
                seq = seq.wrapping_add(1);
            }
            self.tweak.encrypt_blocks(first_tweaks);
            let mut t0s = [0u128; BATCH];
            for (t0, t) in t0s.iter_mut().zip(first_tweaks.iter()) {
                *t0 = u128::from_le_bytes(t.0);
            }
            for (unit, t0) in group.chunks_exact_mut(unit_size).zip(t0s) {
                self.crypt_unit::<DEC>(unit, t0, &mut tweaks);
            }
            t0s.zeroize();
        }
        tweaks.iter_mut().for_each(|t| t.0.zeroize());
    }

    /// One data unit whose encrypted tweak is `t`; `scratch` holds the per-block tweaks.
    fn crypt_unit<const DEC: bool>(
        &self,
        unit: &mut [u8],
        mut t: u128,
        scratch: &mut [Block; BATCH],
    ) {
        let (blocks, _tail) = Block::slice_as_chunks_mut(unit);
        for chunk in blocks.chunks_mut(BATCH) {
            let tw = &mut scratch[..chunk.len()];
            for (b, tw) in chunk.iter_mut().zip(tw.iter_mut()) {
                *tw = Block::from(t.to_le_bytes());
                xor_into(b, tw);
                t = mul_alpha(t);
            }
            if DEC {
                self.data.decrypt_blocks(chunk);
            } else {
                self.data.encrypt_blocks(chunk);
            }
            for (b, tw) in chunk.iter_mut().zip(tw.iter()) {
                xor_into(b, tw);
            }
        }
        t.zeroize();
    }
}

#[inline]
fn xor_into(b: &mut Block, t: &Block) {
    for (x, y) in b.iter_mut().zip(t.iter()) {
        *x ^= y;
    }
}

const _: () = assert!(BLOCK_LEN == 16);
