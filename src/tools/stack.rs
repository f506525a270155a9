//! Builds the bdev stacks a config describes (control thread, start-up only).

use crate::bdev::late::LateBdev;
use crate::bdev::{self, Bdev, BdevError};
use crate::config::{BdevConfig, Config, DevKeySource, EncryptedBdevConfig};
use crate::crypto::bdev::{CryptoBdev, DataKey};
use crate::crypto::key::XtsKey;
use crate::crypto::xts::Tier;
use crate::keys::header::METADATA_REGION_BYTES;
use std::collections::BTreeMap;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Every bdev of a config, by name.
pub struct Stacks {
    pub bdevs: BTreeMap<String, Arc<dyn Bdev>>,
    /// For each crypto bdev: the name of its base.
    pub crypto_base: BTreeMap<String, String>,
    /// For each crypto bdev: its data key (for timing the kernel in the same run).
    pub crypto_keys: BTreeMap<String, DataKey>,
    /// Encrypted (managed-key) bdevs: the stand-in exported until the key manager binds the
    /// crypto bdev, and the config entry.
    pub encrypted: BTreeMap<String, (Arc<LateBdev>, EncryptedBdevConfig)>,
}

/// Errors building stacks.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error(transparent)]
    Bdev(#[from] BdevError),
    #[error("bdev {name}: key: {what}")]
    Key { name: String, what: String },
}

impl Stacks {
    /// Opens every bdev of `cfg` in order (bases before the crypto bdevs stacked on them).
    pub fn open(cfg: &Config) -> Result<Stacks, StackError> {
        let max_tier: Option<Tier> = cfg.crypto.max_tier.as_deref().and_then(|t| t.parse().ok());
        let mut bdevs: BTreeMap<String, Arc<dyn Bdev>> = BTreeMap::new();
        let mut crypto_base = BTreeMap::new();
        let mut crypto_keys = BTreeMap::new();
        let mut encrypted = BTreeMap::new();
        for b in &cfg.bdevs {
            let dev: Arc<dyn Bdev> = match b {
                BdevConfig::Malloc(c) => bdev::malloc::open(c)?,
                BdevConfig::Null(c) => bdev::null::open(c)?,
                BdevConfig::Uring(c) => bdev::uring::open(c)?,
                BdevConfig::Crypto(c) => {
                    let base = bdevs
                        .get(&c.base)
                        .cloned()
                        .ok_or_else(|| BdevError::Invalid {
                            name: c.name.clone(),
                            what: format!("base bdev {} not found", c.base),
                        })?;
                    let key = dev_key(&c.name, &c.key)?;
                    let dk = DataKey::new(&key, max_tier).map_err(|e| StackError::Key {
                        name: c.name.clone(),
                        what: e.to_string(),
                    })?;
                    crypto_base.insert(c.name.clone(), c.base.clone());
                    crypto_keys.insert(c.name.clone(), dk.clone());
                    Arc::new(CryptoBdev::new(&c.name, base, dk, c.allow_discards)?)
                }
                BdevConfig::Encrypted(c) => {
                    let base = bdevs
                        .get(&c.base)
                        .cloned()
                        .ok_or_else(|| BdevError::Invalid {
                            name: c.name.clone(),
                            what: format!("base bdev {} not found", c.base),
                        })?;
                    let bs = u64::from(base.block_size());
                    let header_blocks = METADATA_REGION_BYTES / bs;
                    if base.num_blocks() <= header_blocks {
                        return Err(BdevError::Invalid {
                            name: c.name.clone(),
                            what: format!(
                                "base {} ({} bytes) is not larger than the {METADATA_REGION_BYTES}-byte metadata header",
                                c.base,
                                base.num_blocks() * bs
                            ),
                        }
                        .into());
                    }
                    let late = Arc::new(LateBdev::new(
                        &c.name,
                        base.block_size(),
                        base.num_blocks() - header_blocks,
                        base.buf_align(),
                    ));
                    encrypted.insert(c.name.clone(), (late.clone(), c.clone()));
                    late
                }
            };
            bdevs.insert(b.name().to_string(), dev);
        }
        Ok(Stacks {
            bdevs,
            crypto_base,
            crypto_keys,
            encrypted,
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Bdev>> {
        self.bdevs.get(name).cloned()
    }

    /// The crypto bdev stacked on `base`, if any.
    pub fn crypto_over(&self, base: &str) -> Option<String> {
        self.crypto_base
            .iter()
            .find(|(_, b)| b.as_str() == base)
            .map(|(c, _)| c.clone())
    }
}

/// Loads a development DEK.
pub fn dev_key(name: &str, src: &DevKeySource) -> Result<XtsKey, StackError> {
    let kerr = |what: String| StackError::Key {
        name: name.to_string(),
        what,
    };
    match src {
        DevKeySource::Ephemeral => XtsKey::generate().map_err(|e| kerr(e.to_string())),
        DevKeySource::File { path } => {
            let text = Zeroizing::new(
                std::fs::read_to_string(path).map_err(|e| kerr(format!("{path}: {e}")))?,
            );
            let hex = text.trim();
            if hex.len() != 128 {
                return Err(kerr(format!(
                    "{path}: expected 128 hex digits (a 64-byte XTS key), found {}",
                    hex.len()
                )));
            }
            let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
            let mut bytes = Zeroizing::new([0u8; 64]);
            for (out, pair) in bytes.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
                match (nibble(pair[0]), nibble(pair[1])) {
                    (Some(h), Some(l)) => *out = h << 4 | l,
                    _ => return Err(kerr(format!("{path}: not hexadecimal"))),
                }
            }
            XtsKey::from_bytes(&bytes[..]).map_err(|e| kerr(format!("{path}: {e}")))
        }
    }
}
