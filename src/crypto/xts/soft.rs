//! The portable tier: XTS on top of the `aes` crate's block cipher.
//!
//! Runs on any CPU (the `aes` crate picks its own backend: bit-sliced software, or AES-NI/VAES
//! where it detects them). It is the fallback and the reference the hardware kernels are checked
//! against in unit tests; it is not tuned beyond feeding the `aes` crate full batches. Like the
//! kernels it works on whole requests: the tweaks of up to [`BATCH`] units are encrypted in one
//! `encrypt_blocks` call, and the request's blocks go through the cipher [`BATCH`] at a time
//! with their tweaks precomputed on the stack.
//! Called on whichever thread owns the [`Xts`](super::Xts); no allocation.

use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::{Aes256, Aes256Enc, Block};
use zeroize::Zeroize;

use super::{mul_alpha, BLOCK_LEN};
use crate::crypto::key::{CryptoError, XtsKey};
use crate::sys::mlock::{scrub_stack, LockedBox};

/// Blocks (and unit tweaks) handed to the `aes` crate per call: its VAES-512 backend only runs
/// on full batches of 64 blocks (1 KiB of tweaks on the stack).
const BATCH: usize = 64;

/// key1 (both directions) and key2 (encrypt only) as `aes` crate ciphers.
pub(super) struct SoftKeys {
    data: Aes256,
    tweak: Aes256Enc,
}

impl SoftKeys {
    /// Expands both halves of `key` straight into a locked page (never into a stack value that
    /// is then moved), then scrubs the stack the expansion ran on.
    pub(super) fn new(key: &XtsKey) -> Result<LockedBox<SoftKeys>, CryptoError> {
        let keys = LockedBox::try_new_with(|slot| {
            slot.write(SoftKeys {
                data: Aes256::new(key.key1().into()),
                tweak: Aes256Enc::new(key.key2().into()),
            })
        });
        scrub_stack();
        Ok(keys?)
    }

    /// Encrypts (`DEC == false`) or decrypts in place the units of `data`; unit `i` has the
    /// tweak value `first_tweak + i`. `data.len()` is a multiple of `unit_size`, which is a
    /// non-zero multiple of 16 (checked by the caller; other lengths leave a tail untouched).
    ///
    /// The request is one stream of blocks handed to the cipher [`BATCH`] at a time, across
    /// unit boundaries (the `aes` crate only uses its widest backend on full 64-block batches,
    /// and 512-byte units have 32 blocks); the units' tweaks are encrypted up to [`BATCH`] at a
    /// time, never more than the request has units.
    pub(super) fn crypt_units<const DEC: bool>(
        &self,
        data: &mut [u8],
        unit_size: usize,
        first_tweak: u128,
    ) {
        let blocks_per_unit = unit_size / BLOCK_LEN;
        if blocks_per_unit == 0 {
            return;
        }
        let mut tweaks = [0u128; BATCH];
        let mut unit_tweaks = [Block::default(); BATCH];
        let mut next_seq = first_tweak;
        let mut units_left = data.len() / unit_size;
        let (mut have, mut used) = (0usize, 0usize); // unit tweaks encrypted / consumed
        let mut pos = 0usize; // block index inside the current unit
        let mut t = 0u128;
        let (blocks, _) = Block::slice_as_chunks_mut(data);
        for chunk in blocks.chunks_mut(BATCH) {
            for (b, tw) in chunk.iter_mut().zip(tweaks.iter_mut()) {
                if pos == 0 {
                    if used == have {
                        // Only as many counters as units remain: one unit costs one block.
                        have = units_left.clamp(1, BATCH);
                        used = 0;
                        for u in unit_tweaks[..have].iter_mut() {
                            *u = Block::from(next_seq.to_le_bytes());
                            next_seq = next_seq.wrapping_add(1);
                        }
                        self.tweak.encrypt_blocks(&mut unit_tweaks[..have]);
                    }
                    t = u128::from_le_bytes(unit_tweaks[used].0);
                    used += 1;
                    units_left = units_left.saturating_sub(1);
                }
                *tw = t;
                xor_into(b, t);
                t = mul_alpha(t);
                pos += 1;
                if pos == blocks_per_unit {
                    pos = 0;
                }
            }
            if DEC {
                self.data.decrypt_blocks(chunk);
            } else {
                self.data.encrypt_blocks(chunk);
            }
            for (b, tw) in chunk.iter_mut().zip(tweaks.iter()) {
                xor_into(b, *tw);
            }
        }
        t.zeroize();
        tweaks.zeroize();
        unit_tweaks.iter_mut().for_each(|t| t.0.zeroize());
    }
}

/// `b ^= t`, with `t` the little-endian value of a tweak block.
#[inline]
fn xor_into(b: &mut Block, t: u128) {
    b.0 = (u128::from_le_bytes(b.0) ^ t).to_le_bytes();
}

const _: () = assert!(BLOCK_LEN == 16);
