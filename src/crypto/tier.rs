//! The XTS kernel tiers ([`Tier`]): their names, their order and whether this CPU runs them.
//!
//! Owns nothing but that description; the kernels themselves live in [`super::xts`], which picks
//! one tier per key when an engine is built (on a control thread). It is a module of its own so
//! that the dependencies inside the crypto layer point one way: [`super::key`] (the key type and
//! the layer's error, which names a tier) and [`super::xts`] (the engine, which takes a key) both
//! import this module, and `xts` imports `key`, never the reverse. `crypto::xts::Tier` remains
//! the path callers use (re-exported there).

use std::fmt;
use std::str::FromStr;

/// A kernel tier, ordered from the slowest (portable) to the fastest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// Portable software on the `aes` crate (which itself may use AES-NI if present).
    Soft,
    /// AES-NI, 128-bit registers.
    AesNi,
    /// VAES + VPCLMULQDQ with AVX2, 256-bit registers.
    Vaes256,
    /// VAES + VPCLMULQDQ with AVX-512F/BW, 512-bit registers.
    Vaes512,
}

impl Tier {
    /// Every tier, lowest first.
    pub fn all() -> [Tier; 4] {
        [Tier::Soft, Tier::AesNi, Tier::Vaes256, Tier::Vaes512]
    }

    /// The name used by [`FromStr`], the config and `NVSEAL_XTS_TIER`.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Soft => "soft",
            Tier::AesNi => "aesni",
            Tier::Vaes256 => "vaes256",
            Tier::Vaes512 => "vaes512",
        }
    }

    /// Whether this CPU runs the tier. VAES is only trusted together with the register width
    /// it is used at (the CPUID bit alone says nothing about AVX2/AVX-512 state being enabled).
    pub fn is_available(self) -> bool {
        match self {
            Tier::Soft => true,
            #[cfg(target_arch = "x86_64")]
            Tier::AesNi => std::arch::is_x86_feature_detected!("aes"),
            #[cfg(target_arch = "x86_64")]
            Tier::Vaes256 => {
                std::arch::is_x86_feature_detected!("aes")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("vaes")
                    && std::arch::is_x86_feature_detected!("vpclmulqdq")
            }
            #[cfg(target_arch = "x86_64")]
            Tier::Vaes512 => {
                std::arch::is_x86_feature_detected!("aes")
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("vaes")
                    && std::arch::is_x86_feature_detected!("vpclmulqdq")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest tier this CPU runs.
    pub fn best_available() -> Tier {
        Tier::best_at_most(Tier::Vaes512)
    }

    /// The fastest available tier that is not above `cap` (Soft is always available).
    pub(crate) fn best_at_most(cap: Tier) -> Tier {
        Tier::all()
            .into_iter()
            .rev()
            .find(|t| *t <= cap && t.is_available())
            .unwrap_or(Tier::Soft)
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A tier name that is not one of soft, aesni, vaes256, vaes512 (what [`Tier::from_str`]
/// refuses; the crypto layer's error carries it as `CryptoError::UnknownTier`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown XTS tier {0:?} (expected soft, aesni, vaes256 or vaes512)")]
pub struct UnknownTier(pub String);

impl FromStr for Tier {
    type Err = UnknownTier;
    fn from_str(s: &str) -> Result<Tier, UnknownTier> {
        let s = s.trim();
        Tier::all()
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownTier(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_names_round_trip_and_order() {
        for t in Tier::all() {
            assert_eq!(t.name().parse::<Tier>().expect("parse"), t);
            assert_eq!(t.to_string(), t.name());
        }
        assert!(matches!("aes".parse::<Tier>(), Err(UnknownTier(_))));
        assert!(Tier::Soft < Tier::AesNi && Tier::AesNi < Tier::Vaes256);
        assert!(Tier::Vaes256 < Tier::Vaes512);
        assert!(Tier::Soft.is_available());
        assert!(Tier::best_available().is_available());
    }
}
