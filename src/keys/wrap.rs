//! DEK types and DEK wrapping: [`Dek`], [`WrappedDek`], [`wrap_dek`], [`unwrap_dek`]; re-exports
//! the KEK types [`Kek`] and [`KekFingerprint`].
//!
//! Owns the only code that turns a plaintext DEK into the bytes stored on disk (AES Key Wrap,
//! RFC 3394, with a 256-bit KEK) and back. Runs on control threads only (format, open, rekey);
//! nothing here is on the data path. It exists so that the wrapping algorithm and the DEK rules
//! (512-bit XTS key, halves must differ) are defined in one place.
//!
//! The KEK and its fingerprint are defined once, in [`crate::kms::key`] (the lowest layer that
//! both the KMIP client and this layer use; see there for the fingerprint definition). They are
//! re-exported here so that the key layer names them as `keys::Kek` and `keys::KekFingerprint`.
//!
//! Secrets (`Kek`, `Dek`) zeroize on drop, do not implement `Clone`, `Serialize` or `Display`,
//! and their `Debug` prints `<redacted>`.

use std::fmt;

use aes_kw::{KeyInit, KwAes256};
use thiserror::Error;
use zeroize::Zeroizing;

pub use crate::kms::key::{Kek, KekFingerprint, FINGERPRINT_BYTES, FINGERPRINT_LABEL, KEK_BYTES};
use crate::sys::mlock::{locked_copy, LockedBox};

/// Size of a DEK: AES-256-XTS uses two AES-256 keys (key1 = data, key2 = tweak).
pub const DEK_BYTES: usize = 64;
/// Size of a wrapped DEK: RFC 3394 adds one 64-bit integrity block.
pub const WRAPPED_DEK_BYTES: usize = DEK_BYTES + 8;

/// How many times [`Dek::generate`] draws again when the two halves come out equal. Equal halves
/// from a working CSPRNG have probability 2^-256; a second occurrence means the RNG is broken.
const DEK_DRAW_ATTEMPTS_MAX: u32 = 2;

/// Errors of key generation and unwrapping.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The RFC 3394 integrity check failed: the KEK is not the one that wrapped this DEK, or the
    /// wrapped bytes are corrupt.
    #[error(
        "DEK unwrap failed the AES key wrap integrity check (wrong KEK or corrupt wrapped DEK)"
    )]
    UnwrapIntegrity,
    /// The two XTS halves of a DEK are equal (IEEE 1619 forbids it; OpenSSL refuses it).
    #[error("DEK rejected: XTS key1 equals key2")]
    XtsHalvesEqual,
    /// The operating system CSPRNG failed.
    #[error("OS random number generator failed: {0}")]
    Rng(String),
}

/// A data-encryption key: the 512-bit AES-256-XTS key of one namespace (bytes 0..32 = key1, the
/// data key; bytes 32..64 = key2, the tweak key — the order dm-crypt and OpenSSL use).
/// Zeroized on drop; never printed. The two halves are guaranteed to differ.
pub struct Dek(LockedBox<[u8; DEK_BYTES]>);

impl Dek {
    /// A fresh DEK from the OS CSPRNG; draws again if the halves are equal.
    pub fn generate() -> Result<Self, KeyError> {
        for _ in 0..DEK_DRAW_ATTEMPTS_MAX {
            let mut bytes = Zeroizing::new([0u8; DEK_BYTES]);
            getrandom::fill(bytes.as_mut()).map_err(|e| KeyError::Rng(e.to_string()))?;
            if let Ok(dek) = Self::from_bytes(bytes) {
                return Ok(dek);
            }
        }
        Err(KeyError::XtsHalvesEqual)
    }

    /// Wraps existing key bytes, rejecting equal XTS halves.
    pub fn from_bytes(bytes: Zeroizing<[u8; DEK_BYTES]>) -> Result<Self, KeyError> {
        let (key1, key2) = bytes.split_at(DEK_BYTES / 2);
        if key1 == key2 {
            return Err(KeyError::XtsHalvesEqual);
        }
        Ok(Self(locked_copy(&bytes)))
    }

    /// The raw 64-byte XTS key (key1 ‖ key2).
    pub fn expose(&self) -> &[u8; DEK_BYTES] {
        &self.0
    }

    /// Hands the key bytes over (e.g. to build the XTS engine's key type) without a copy that
    /// escapes zeroization.
    pub fn into_zeroizing(self) -> Zeroizing<[u8; DEK_BYTES]> {
        Zeroizing::new(*self.0)
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dek(<redacted>)")
    }
}

/// A DEK wrapped with a KEK (RFC 3394). Not secret without the KEK; stored in the header.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct WrappedDek(pub [u8; WRAPPED_DEK_BYTES]);

impl WrappedDek {
    /// The 72 stored bytes.
    pub fn as_bytes(&self) -> &[u8; WRAPPED_DEK_BYTES] {
        &self.0
    }
}

impl fmt::Debug for WrappedDek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WrappedDek({})", hex(&self.0))
    }
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Wraps `dek` under `kek` with AES Key Wrap (RFC 3394, default IV `A6A6A6A6A6A6A6A6`).
pub fn wrap_dek(kek: &Kek, dek: &Dek) -> WrappedDek {
    let kw = KwAes256::new(kek.expose().into());
    let mut out = [0u8; WRAPPED_DEK_BYTES];
    // A 64-byte input is a multiple of 8 and the output buffer is exactly 72 bytes, the two
    // conditions `wrap_key` checks.
    kw.wrap_key(dek.expose(), &mut out)
        .unwrap_or_else(|_| unreachable!("64-byte key into a 72-byte buffer always wraps"));
    WrappedDek(out)
}

/// Unwraps a DEK. A wrong KEK or corrupt bytes give [`KeyError::UnwrapIntegrity`]; a DEK whose
/// XTS halves are equal is refused with [`KeyError::XtsHalvesEqual`].
pub fn unwrap_dek(kek: &Kek, wrapped: &WrappedDek) -> Result<Dek, KeyError> {
    let kw = KwAes256::new(kek.expose().into());
    let mut out = Zeroizing::new([0u8; DEK_BYTES]);
    kw.unwrap_key(wrapped.as_bytes(), out.as_mut())
        .map_err(|_| KeyError::UnwrapIntegrity)?;
    Dek::from_bytes(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek_from(bytes: [u8; 32]) -> Kek {
        Kek::from_bytes(Zeroizing::new(bytes))
    }

    #[test]
    fn rfc3394_vector_4_6_256_bit_kek_256_bit_data() {
        // RFC 3394 §4.6: 256 bits of key data with a 256-bit KEK. Checks that the crate is used
        // with the standard IV and the byte order the RFC (and OpenSSL's id-aes256-wrap) uses.
        let kek: [u8; 32] = core::array::from_fn(|i| i as u8);
        let data: [u8; 32] = [
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xAA, 0xBB, 0xCC, 0xDD,
            0xEE, 0xFF, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B,
            0x0C, 0x0D, 0x0E, 0x0F,
        ];
        let expected: [u8; 40] = [
            0x28, 0xC9, 0xF4, 0x04, 0xC4, 0xB8, 0x10, 0xF4, 0xCB, 0xCC, 0xB3, 0x5C, 0xFB, 0x87,
            0xF8, 0x26, 0x3F, 0x57, 0x86, 0xE2, 0xD8, 0x0E, 0xD3, 0x26, 0xCB, 0xC7, 0xF0, 0xE7,
            0x1A, 0x99, 0xF4, 0x3B, 0xFB, 0x98, 0x8B, 0x9B, 0x7A, 0x02, 0xDD, 0x21,
        ];
        let kw = KwAes256::new((&kek).into());
        let mut out = [0u8; 40];
        let got = kw.wrap_key(&data, &mut out).expect("wrap");
        assert_eq!(got, &expected[..]);
    }

    #[test]
    fn wrap_unwrap_round_trip_and_wrong_kek_is_typed_error() {
        let kek = kek_from([7u8; 32]);
        let other = kek_from([8u8; 32]);
        let dek = Dek::generate().expect("rng");
        let wrapped = wrap_dek(&kek, &dek);
        assert_ne!(
            &wrapped.0[8..],
            &dek.expose()[..],
            "wrapped bytes must not contain the DEK"
        );
        let back = unwrap_dek(&kek, &wrapped).expect("unwrap");
        assert_eq!(back.expose(), dek.expose());
        assert_eq!(
            unwrap_dek(&other, &wrapped).err(),
            Some(KeyError::UnwrapIntegrity)
        );
        let mut corrupt = wrapped;
        corrupt.0[40] ^= 1;
        assert_eq!(
            unwrap_dek(&kek, &corrupt).err(),
            Some(KeyError::UnwrapIntegrity)
        );
    }

    #[test]
    fn equal_xts_halves_are_rejected_even_when_unwrapped() {
        let same = Zeroizing::new([0x5Au8; 64]);
        assert_eq!(Dek::from_bytes(same).err(), Some(KeyError::XtsHalvesEqual));
        // A wrapped DEK with equal halves (written by something else) is refused on unwrap too.
        let kek = kek_from([1u8; 32]);
        let kw = KwAes256::new(kek.expose().into());
        let mut out = [0u8; 72];
        kw.wrap_key(&[0x5Au8; 64], &mut out).expect("wrap");
        assert_eq!(
            unwrap_dek(&kek, &WrappedDek(out)).err(),
            Some(KeyError::XtsHalvesEqual)
        );
    }

    #[test]
    fn secrets_print_redacted() {
        let kek = kek_from([9u8; 32]);
        let dek = Dek::generate().expect("rng");
        assert_eq!(format!("{kek:?}"), "Kek(<redacted>)");
        assert_eq!(format!("{dek:?}"), "Dek(<redacted>)");
    }
}
