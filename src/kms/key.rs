//! Key-encryption keys fetched from a KMS, their KMIP ids and their fingerprints.
//!
//! Owns the in-memory KEK (zeroized on drop, never printable) and the fingerprint nvseal stores
//! next to the KEK id. Used on control threads only. The fingerprint exists because KMIP ids
//! are only unique per server: id "1" on two independent KMS servers names two different
//! keys, so a KEK fetched by id must be checked against what was stored when the DEKs were
//! wrapped, before it is used to unwrap anything.
//!
//! Fingerprint definition (version 1): `HMAC-SHA-256(key = KEK, message = FINGERPRINT_LABEL)`,
//! written as `hmac-sha256:` followed by 64 lowercase hex digits. Keyed with the KEK, it
//! commits to the key without revealing it (recovering the key from it is as hard as breaking
//! HMAC-SHA-256), and the fixed label keeps it distinct from any other value derived from the
//! KEK.

use std::fmt;
use std::str::FromStr;

/// KEK length in bytes: AES-256.
pub const KEK_LEN: usize = 32;

/// Message authenticated with the KEK to form its fingerprint (version 1).
pub const FINGERPRINT_LABEL: &[u8] = b"nvseal KEK fingerprint v1";

const FINGERPRINT_PREFIX: &str = "hmac-sha256:";

/// A KMIP Unique Identifier: opaque text, unique only within one KMS (or replicated cluster).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct KeyId(String);

impl KeyId {
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A 256-bit AES key-encryption key. Zeroized on drop; deliberately has no `Debug`,
/// `Display`, `Clone` or `Serialize`. Callers that wrap or unwrap DEKs read it through
/// [`Kek::as_bytes`] and must not copy it into non-zeroizing memory.
/// The bytes live in a locked page (`mlock`, excluded from core dumps) that is zeroed on drop.
pub struct Kek(crate::sys::mlock::LockedBox<[u8; KEK_LEN]>);

impl Kek {
    /// Takes `bytes` if it is exactly [`KEK_LEN`] long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != KEK_LEN {
            return None;
        }
        let mut key = Kek(crate::sys::mlock::locked_copy(&[0; KEK_LEN]));
        key.0.copy_from_slice(bytes);
        Some(key)
    }

    pub fn as_bytes(&self) -> &[u8; KEK_LEN] {
        &self.0
    }

    /// The fingerprint stored next to the KEK id (see the module docs).
    pub fn fingerprint(&self) -> KekFingerprint {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0[..]);
        let tag = ring::hmac::sign(&key, FINGERPRINT_LABEL);
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        KekFingerprint(out)
    }

    /// Checks this key against a stored fingerprint, in constant time.
    pub fn matches(&self, expected: &KekFingerprint) -> bool {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0[..]);
        ring::hmac::verify(&key, FINGERPRINT_LABEL, &expected.0).is_ok()
    }
}

/// A KEK fingerprint; safe to store, log and show.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KekFingerprint([u8; 32]);

impl KekFingerprint {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for KekFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(FINGERPRINT_PREFIX)?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KekFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A fingerprint string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KEK fingerprint must be \"{FINGERPRINT_PREFIX}\" followed by 64 hex digits")]
pub struct FingerprintParseError;

impl FromStr for KekFingerprint {
    type Err = FingerprintParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix(FINGERPRINT_PREFIX)
            .ok_or(FingerprintParseError)?;
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(FingerprintParseError);
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| FingerprintParseError)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| FingerprintParseError)?;
        }
        Ok(Self(out))
    }
}

impl serde::Serialize for KekFingerprint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for KekFingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_hmac_of_label_and_round_trips() {
        // Expected value computed independently with Python:
        // hmac.new(b"\x0b" * 32, b"nvseal KEK fingerprint v1", hashlib.sha256).hexdigest()
        let kek = Kek::from_slice(&[0x0b; 32]).unwrap();
        let fp = kek.fingerprint();
        let text = fp.to_string();
        assert_eq!(
            text,
            "hmac-sha256:e491ba6b6e390bdeaa78a0e108ce773e7b98c4f17c6ab05963f69c9868a79032"
        );
        assert_eq!(text.parse::<KekFingerprint>().unwrap(), fp);
        assert!(kek.matches(&fp));
        let other = Kek::from_slice(&[0x0c; 32]).unwrap();
        assert!(!other.matches(&fp));
        assert_ne!(other.fingerprint(), fp);
        // The fingerprint is not the key and does not contain it.
        assert_ne!(fp.as_bytes(), kek.as_bytes());
        let json = serde_json::to_string(&fp).unwrap();
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<KekFingerprint>(&json).unwrap(), fp);
    }

    #[test]
    fn bad_fingerprint_strings_are_rejected() {
        let good = Kek::from_slice(&[1; 32]).unwrap().fingerprint().to_string();
        assert!(good.parse::<KekFingerprint>().is_ok());
        assert!(good[1..].parse::<KekFingerprint>().is_err());
        assert!(good[..good.len() - 1].parse::<KekFingerprint>().is_err());
        let mut non_hex = good.clone();
        non_hex.replace_range(20..21, "g");
        assert!(non_hex.parse::<KekFingerprint>().is_err());
        let mut non_ascii = good[..good.len() - 2].to_owned();
        non_ascii.push('é');
        assert!(non_ascii.parse::<KekFingerprint>().is_err());
    }

    #[test]
    fn kek_requires_exactly_32_bytes() {
        assert!(Kek::from_slice(&[0; 31]).is_none());
        assert!(Kek::from_slice(&[0; 33]).is_none());
        assert_eq!(Kek::from_slice(&[5; 32]).unwrap().as_bytes(), &[5; 32]);
    }
}
