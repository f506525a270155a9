//! Key-encryption keys: the one in-memory [`Kek`] type, its [`KekFingerprint`], and KMIP
//! [`KeyId`]s.
//!
//! Owns the KEK as it exists in memory (zeroized on drop, page-locked, never printable) and the
//! single definition of its fingerprint. Used on control threads only (KMS round trips, format,
//! open, rekey); nothing here is on the data path.
//!
//! Why it lives here: both the KMIP client (a KMIP Get yields a `Kek`, and
//! [`super::check_fingerprint`] checks one) and the key-management layer (`keys`: the local key
//! provider, DEK wrapping, the header's fingerprint field) need the same type and the same
//! fingerprint. `keys` sits above `kms` and uses it, never the reverse, so this module is the
//! lowest place both can import; `keys::wrap` re-exports [`Kek`] and [`KekFingerprint`]. There
//! is exactly one fingerprint function, so a fingerprint computed by the KMS client always
//! agrees with the one stored in an on-disk header.
//!
//! Fingerprint (version 1): `HMAC-SHA256(key = KEK, message = FINGERPRINT_LABEL)`, 32 bytes,
//! with the label `"nvseal kek fingerprint v1"` (lowercase ASCII). Headers store the 32 raw
//! bytes; logs, errors and serde use the text form `hmac-sha256:` followed by 64 lowercase hex
//! digits. docs/on-disk-format.md §3 is the reference, with an OpenSSL check value. It lets
//! `open` tell "the KMS handed back a different key under this id" (KMIP ids are unique only per
//! server: id "1" on two independent servers names two keys) from "the wrapped DEK is corrupt"
//! before anything is unwrapped. A keyed MAC rather than a plain hash of the KEK: only a holder of
//! the KEK can compute it, so no table of fingerprints of candidate keys can be precomputed, and
//! the value reveals nothing about the key.

use std::fmt;
use std::str::FromStr;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::sys::mlock::{locked_copy, LockedBox};

/// Size of a KEK: AES-256.
pub const KEK_BYTES: usize = 32;
/// Size of a KEK fingerprint (HMAC-SHA256 output).
pub const FINGERPRINT_BYTES: usize = 32;
/// The fixed message of the KEK fingerprint MAC (version 1). Changing it changes every
/// fingerprint: it is part of the on-disk format (docs/on-disk-format.md), and headers in the
/// field carry values computed with exactly these bytes.
pub const FINGERPRINT_LABEL: &[u8] = b"nvseal kek fingerprint v1";

/// Prefix of the text form of a fingerprint.
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

/// A 256-bit AES key-encryption key. The bytes live in a locked page (`mlock`, excluded from
/// core dumps) that is zeroed on drop. Deliberately has no `Clone`, `Display` or `Serialize`;
/// its `Debug` prints `Kek(<redacted>)`. Callers that wrap or unwrap DEKs, or a provider that
/// must store the key, read it through [`Kek::expose`] and must not copy it into memory that is
/// not zeroized.
pub struct Kek(LockedBox<[u8; KEK_BYTES]>);

impl Kek {
    /// Takes ownership of key bytes. The caller passes a `Zeroizing` buffer so that no copy of
    /// the key outlives this value.
    pub fn from_bytes(bytes: Zeroizing<[u8; KEK_BYTES]>) -> Self {
        Self(locked_copy(&bytes))
    }

    /// Copies `bytes` if it is exactly [`KEK_BYTES`] long (a key from a KMIP reply).
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; KEK_BYTES] = bytes.try_into().ok()?;
        Some(Self(locked_copy(bytes)))
    }

    /// A fresh random KEK from the OS CSPRNG, written straight into locked memory (used by the
    /// local key provider; KMIP servers make their own).
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = locked_copy(&[0u8; KEK_BYTES]);
        getrandom::fill(bytes.as_mut())?;
        Ok(Self(bytes))
    }

    /// The raw key, for wrapping and for providers that must store it.
    pub fn expose(&self) -> &[u8; KEK_BYTES] {
        &self.0
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC accepts keys of every length; a 32-byte key cannot fail.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0[..])
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
        mac.update(FINGERPRINT_LABEL);
        mac
    }

    /// `HMAC-SHA256(KEK, FINGERPRINT_LABEL)`; see the module documentation.
    pub fn fingerprint(&self) -> KekFingerprint {
        let mut fp = [0u8; FINGERPRINT_BYTES];
        fp.copy_from_slice(&self.mac().finalize().into_bytes());
        KekFingerprint(fp)
    }

    /// Whether this key has the fingerprint `expected` (compared in constant time).
    pub fn matches(&self, expected: &KekFingerprint) -> bool {
        self.mac().verify_slice(&expected.0).is_ok()
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

/// The fingerprint of a KEK (see the module documentation). Not secret: safe to store, log and
/// show. Any 32 bytes are a value (a header field is decoded into one as it is); only
/// [`Kek::fingerprint`] makes one that belongs to a key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KekFingerprint(pub [u8; FINGERPRINT_BYTES]);

impl KekFingerprint {
    /// The 32 bytes stored in a header.
    pub fn as_bytes(&self) -> &[u8; FINGERPRINT_BYTES] {
        &self.0
    }
}

/// The text form: `hmac-sha256:` and 64 lowercase hex digits.
impl fmt::Display for KekFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(FINGERPRINT_PREFIX)?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KekFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KekFingerprint({self})")
    }
}

/// A fingerprint string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KEK fingerprint must be \"{FINGERPRINT_PREFIX}\" followed by 64 hex digits")]
pub struct FingerprintParseError;

/// Parses the text form (lower- or uppercase hex digits).
impl FromStr for KekFingerprint {
    type Err = FingerprintParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix(FINGERPRINT_PREFIX)
            .ok_or(FingerprintParseError)?;
        if hex.len() != FINGERPRINT_BYTES * 2 || !hex.is_ascii() {
            return Err(FingerprintParseError);
        }
        let mut out = [0u8; FINGERPRINT_BYTES];
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

    /// The check value docs/on-disk-format.md gives for a KEK of 32 bytes `0x01`, computed with
    /// the OpenSSL command line printed there:
    /// `printf 'nvseal kek fingerprint v1' | openssl dgst -sha256 -mac HMAC -macopt hexkey:0101..01`
    /// (tests/keys_openssl.rs runs that command and compares it with this value and the doc).
    const DOC_CHECK_VALUE: &str =
        "fa25d833ed572c7b80436ac0e5b7cff9f69469e7219678b692074344990ba5f7";

    #[test]
    fn fingerprint_is_the_documented_check_value() {
        let kek = Kek::from_slice(&[0x01; 32]).unwrap();
        assert_eq!(
            kek.fingerprint().to_string(),
            format!("hmac-sha256:{DOC_CHECK_VALUE}")
        );
        assert_eq!(FINGERPRINT_LABEL, b"nvseal kek fingerprint v1");
    }

    #[test]
    fn fingerprint_is_keyed_round_trips_and_matches() {
        let kek = Kek::from_slice(&[0x0b; 32]).unwrap();
        let fp = kek.fingerprint();
        assert_eq!(
            fp,
            Kek::from_bytes(Zeroizing::new([0x0b; 32])).fingerprint()
        );
        let text = fp.to_string();
        assert_eq!(text.parse::<KekFingerprint>().unwrap(), fp);
        assert_eq!(
            text.to_uppercase()
                .replacen("HMAC-SHA256", "hmac-sha256", 1)
                .parse::<KekFingerprint>()
                .unwrap(),
            fp
        );
        assert!(kek.matches(&fp));
        let other = Kek::from_slice(&[0x0c; 32]).unwrap();
        assert!(!other.matches(&fp));
        assert_ne!(other.fingerprint(), fp);
        // Not the key, and not a plain hash of it.
        assert_ne!(fp.as_bytes(), kek.expose());
        use sha2::Digest;
        assert_ne!(&fp.0[..], &Sha256::digest([0x0b; 32])[..]);
        let json = serde_json::to_string(&fp).unwrap();
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<KekFingerprint>(&json).unwrap(), fp);
        assert_eq!(format!("{fp:?}"), format!("KekFingerprint({text})"));
    }

    #[test]
    fn bad_fingerprint_strings_are_rejected() {
        let good = Kek::from_slice(&[1; 32]).unwrap().fingerprint().to_string();
        assert!(good.parse::<KekFingerprint>().is_ok());
        assert!(good[1..].parse::<KekFingerprint>().is_err());
        assert!(good[..good.len() - 1].parse::<KekFingerprint>().is_err());
        assert!(format!("{good}0").parse::<KekFingerprint>().is_err());
        assert!(good["hmac-sha256:".len()..]
            .parse::<KekFingerprint>()
            .is_err());
        let mut non_hex = good.clone();
        non_hex.replace_range(20..21, "g");
        assert!(non_hex.parse::<KekFingerprint>().is_err());
        let mut non_ascii = good[..good.len() - 2].to_owned();
        non_ascii.push('é');
        assert!(non_ascii.parse::<KekFingerprint>().is_err());
    }

    #[test]
    fn kek_requires_exactly_32_bytes_and_prints_redacted() {
        assert!(Kek::from_slice(&[0; 31]).is_none());
        assert!(Kek::from_slice(&[0; 33]).is_none());
        assert_eq!(Kek::from_slice(&[5; 32]).unwrap().expose(), &[5; 32]);
        let kek = Kek::from_slice(&[9; 32]).unwrap();
        assert_eq!(
            format!("{kek:?} {kek:#?}"),
            "Kek(<redacted>) Kek(<redacted>)"
        );
        let a = Kek::generate().expect("rng");
        let b = Kek::generate().expect("rng");
        assert_ne!(a.expose(), b.expose());
    }
}
