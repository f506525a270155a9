//! The AES-256-XTS data-encryption key ([`XtsKey`]) and the crypto layer's error type.
//!
//! An [`XtsKey`] is the 64-byte XTS key of one namespace: `key1` (bytes 0..32, encrypts the data)
//! followed by `key2` (bytes 32..64, encrypts the tweak) — the order OpenSSL, dm-crypt and the
//! NIST CAVP files use. It lives in its own `mlock`ed page ([`LockedBox`]), is wiped on drop and
//! cannot be printed, cloned or serialised. Keys are built on control threads (key unwrap, local
//! key provider); reactors only ever see the expanded XTS engine built from it (`crypto::xts`,
//! which imports this module; this module never imports it).

use std::fmt;

use crate::crypto::tier::{Tier, UnknownTier};
use crate::sys::mlock::{LockError, LockedBox};

/// Length of an AES-256-XTS key: two AES-256 keys.
pub const XTS_KEY_LEN: usize = 64;

/// Errors of the crypto layer.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// key1 == key2: XTS loses its security argument; OpenSSL refuses this too.
    #[error("XTS key halves are identical (key1 == key2)")]
    DuplicateKeys,
    /// The key is not 64 bytes.
    #[error("XTS key must be {XTS_KEY_LEN} bytes, got {0}")]
    BadKeyLength(usize),
    /// The requested kernel tier does not run on this CPU.
    #[error("XTS tier {} is not available on this CPU", .0.name())]
    TierUnavailable(Tier),
    /// A tier name that is not one of soft, aesni, vaes256, vaes512.
    #[error(transparent)]
    UnknownTier(#[from] UnknownTier),
    /// The buffer is not a whole number of data units, or the unit is not a non-zero multiple of
    /// the 16-byte AES block (ciphertext stealing is not implemented).
    #[error("bad XTS length: {data_len} bytes with data unit {unit_size} bytes")]
    BadLength { data_len: usize, unit_size: usize },
    /// An out-of-place run whose source and destination differ in length.
    #[error("XTS source is {src_len} bytes but the destination {dst_len}")]
    SourceLength { src_len: usize, dst_len: usize },
    /// The OS random number generator failed.
    #[error("OS random number generator failed: {0}")]
    Rng(String),
    /// Allocating locked memory for key material failed.
    #[error("out of memory for key material")]
    OutOfMemory,
    /// Key memory could not be locked (and unlocked memory is not allowed), or not allocated.
    #[error(transparent)]
    Memory(#[from] LockError),
}

/// A 512-bit AES-256-XTS key (key1 || key2). Zeroed on drop, page-locked (an `mlock` failure is
/// an error unless the process allows unlocked key memory, see [`crate::sys::mlock`]), never
/// printable.
pub struct XtsKey {
    bytes: LockedBox<[u8; XTS_KEY_LEN]>,
}

impl XtsKey {
    /// Copies a 64-byte key. Rejects other lengths and keys whose halves are equal.
    pub fn from_bytes(bytes: &[u8]) -> Result<XtsKey, CryptoError> {
        if bytes.len() != XTS_KEY_LEN {
            return Err(CryptoError::BadKeyLength(bytes.len()));
        }
        let (key1, key2) = bytes.split_at(XTS_KEY_LEN / 2);
        if ct_eq(key1, key2) {
            return Err(CryptoError::DuplicateKeys);
        }
        let mut locked = LockedBox::try_new([0u8; XTS_KEY_LEN])?;
        locked.copy_from_slice(bytes);
        Ok(XtsKey { bytes: locked })
    }

    /// A fresh random key from the OS CSPRNG (`getrandom`), written straight into locked memory.
    pub fn generate() -> Result<XtsKey, CryptoError> {
        let mut locked = LockedBox::try_new([0u8; XTS_KEY_LEN])?;
        getrandom::fill(&mut locked[..]).map_err(|e| CryptoError::Rng(e.to_string()))?;
        let (key1, key2) = locked.split_at(XTS_KEY_LEN / 2);
        // Equal halves from a working CSPRNG have probability 2^-256; treat it as an RNG fault.
        if ct_eq(key1, key2) {
            return Err(CryptoError::Rng(
                "generated key halves are identical".into(),
            ));
        }
        Ok(XtsKey { bytes: locked })
    }

    /// The raw key (key1 || key2), for wrapping by key management. Do not copy it elsewhere.
    pub fn expose_secret(&self) -> &[u8; XTS_KEY_LEN] {
        &self.bytes
    }

    /// key1, the data-encryption half.
    pub(crate) fn key1(&self) -> &[u8; 32] {
        let (k1, _) = self
            .bytes
            .split_first_chunk::<32>()
            .expect("a 64-byte array has 32 first bytes");
        k1
    }

    /// key2, the tweak-encryption half.
    pub(crate) fn key2(&self) -> &[u8; 32] {
        let (_, k2) = self
            .bytes
            .split_last_chunk::<32>()
            .expect("a 64-byte array has 32 last bytes");
        k2
    }

    /// Whether the key's page is actually locked in memory.
    pub fn is_locked(&self) -> bool {
        self.bytes.is_locked()
    }
}

impl fmt::Debug for XtsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("XtsKey(<redacted>)")
    }
}

/// Equality without an early exit, so comparing key halves does not leak where they differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_length_and_duplicate_halves() {
        assert!(matches!(
            XtsKey::from_bytes(&[1u8; 63]),
            Err(CryptoError::BadKeyLength(63))
        ));
        assert!(matches!(
            XtsKey::from_bytes(&[1u8; 65]),
            Err(CryptoError::BadKeyLength(65))
        ));
        assert!(matches!(
            XtsKey::from_bytes(&[7u8; 64]),
            Err(CryptoError::DuplicateKeys)
        ));
        let mut k = [7u8; 64];
        k[63] = 8;
        let key = XtsKey::from_bytes(&k).expect("distinct halves");
        assert_eq!(key.expose_secret(), &k);
        assert_eq!(key.key1(), &[7u8; 32]);
        assert_eq!(&key.key2()[..31], &[7u8; 31]);
        assert_eq!(key.key2()[31], 8);
    }

    #[test]
    fn generate_gives_distinct_keys() {
        let a = XtsKey::generate().expect("rng");
        let b = XtsKey::generate().expect("rng");
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_ne!(a.key1(), a.key2());
    }

    #[test]
    fn debug_is_redacted() {
        let mut k = [0u8; 64];
        for (i, b) in k.iter_mut().enumerate() {
            *b = 0xA0 ^ i as u8;
        }
        let key = XtsKey::from_bytes(&k).expect("key");
        let s = format!("{key:?} {key:#?}");
        assert_eq!(format!("{key:?}"), "XtsKey(<redacted>)");
        assert!(!s.to_lowercase().contains("a0a1a2"));
        assert!(!s.contains("160")); // 0xA0 in decimal, as a derived Debug of [u8] would print
    }
}
