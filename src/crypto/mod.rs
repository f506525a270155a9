//! AES-256-XTS for data at rest (IEEE 1619), and the crypto bdev.
//!
//! * [`xts`] — the engine: tiered `core::arch` kernels (VAES-512, VAES-256, AES-NI) and a
//!   software tier on the `aes` crate, chosen once per key at run time.
//! * [`key`] — key types: zeroized on drop, mlock'ed, never printable; the layer's error type.
//! * [`tier`] — the kernel tiers and which of them this CPU runs.
//! * [`bdev`] — a bdev that encrypts writes in place before its base bdev sees them and decrypts
//!   reads in place after the base completes them.
//!
//! Inside the layer the imports point one way: `bdev` → `xts` → `key` → `tier` (`xts` also
//! uses `tier`, which imports nothing from the others).

pub mod bdev;
pub mod key;
pub mod keymap;
pub mod tier;
pub mod xts;

pub use key::CryptoError;
