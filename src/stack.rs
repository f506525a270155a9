//! Builds the bdev stacks a config describes (control thread): at start-up from the config
//! ([`Stacks::open`]), and at run time from a `namespace.create` call ([`Stacks::open_rpc`]),
//! where every resource the caller names is held against `rpc.namespaces`: backing paths must
//! be granted by the allow-list and are opened beneath it, a file or device under an encrypted
//! bdev (or holding an nvseal key header) is never handed out raw, and RAM disks count against
//! the memory budgets.
//!
//! It lives at the server level, next to [`crate::server`], its main user (`nvseal bdevperf`
//! opens the same stacks), because it composes every layer below it: bdev backends, the crypto
//! bdev, key headers and the `rpc.namespaces` policy.

use crate::bdev::late::LateBdev;
use crate::bdev::uring::UringConfig;
use crate::bdev::uring::{AllowedPath, BackingId, OpenRefused, UringBdev};
use crate::bdev::{self, Bdev, BdevError};
use crate::config::{BdevConfig, Config, DevKeySource, EncryptedBdevConfig};
use crate::crypto::bdev::{CryptoBdev, DataKey};
use crate::crypto::key::XtsKey;
use crate::crypto::xts::Tier;
use crate::keys::header::{COPY_OFFSETS_BYTES, MAGIC, METADATA_REGION_BYTES};
use crate::rpc::config::{NamespacePolicy, PathGrant};
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
    /// The `uring` bdevs, for their file identity and their own descriptor.
    pub uring: BTreeMap<String, Arc<UringBdev>>,
    /// The `spdk_nvme` bdevs, for their controllers' state.
    pub spdk: BTreeMap<String, Arc<dyn crate::spdk::ControllerStatus>>,
    /// RAM held by `malloc` bdevs: (regular pages, hugepages), in bytes.
    pub memory_bytes: (u64, u64),
}

/// What a `namespace.create` caller may use (from `rpc.namespaces`) and what is taken.
pub struct RpcLimits<'a> {
    pub policy: &'a NamespacePolicy,
    /// Files and devices under an encrypted (`crypto` or `encrypted`) bdev now, with that
    /// bdev's name: never opened again for another bdev.
    pub encrypted_bases: &'a [(BackingId, String)],
    /// Bytes of regular-page `malloc` bdevs that run-time namespaces hold now.
    pub malloc_bytes_used: u64,
    /// Bytes of hugepage `malloc` bdevs that run-time namespaces hold now.
    pub hugepage_bytes_used: u64,
}

/// Errors building stacks.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error(transparent)]
    Bdev(#[from] BdevError),
    #[error("bdev {name}: key: {what}")]
    Key { name: String, what: String },
    /// The allow-list or a safety rule refuses a run-time bdev (`field`: `bdevs[i].path`).
    #[error("{field}: {what}")]
    Denied { field: String, what: String },
    /// The file or device is used by another bdev or process, or a memory budget is spent.
    #[error("{field}: {what}")]
    InUse { field: String, what: String },
}

impl Stacks {
    /// Opens every bdev of `cfg` in order (bases before the crypto bdevs stacked on them).
    pub fn open(cfg: &Config) -> Result<Stacks, StackError> {
        Self::build(cfg, None)
    }

    /// Opens the bdevs of a `namespace.create` call (`cfg.bdevs`), holding each against
    /// `limits`: a `uring` path must be granted by `rpc.namespaces.paths` and is opened
    /// beneath the entry that grants it ([`UringBdev::open_allowed`]); a file under an
    /// encrypted bdev is refused, and so is one that holds an nvseal key header unless an
    /// `encrypted` bdev of this call stacks on it; `malloc` bytes count against the budgets.
    /// Nothing is allocated or opened for a request that a budget refuses.
    pub fn open_rpc(cfg: &Config, limits: &RpcLimits<'_>) -> Result<Stacks, StackError> {
        let p = limits.policy;
        // Attaching a drive or a remote controller (and starting SPDK's environment, which pins
        // memory) is the operator's decision, made in the config file.
        for (i, b) in cfg.bdevs.iter().enumerate() {
            if let BdevConfig::SpdkNvme(c) = b {
                return Err(StackError::Denied {
                    field: format!("bdevs[{i}].type"),
                    what: format!(
                        "bdev {}: spdk_nvme bdevs come from the config file only, never from namespace.create",
                        c.name
                    ),
                });
            }
        }
        let (mut pages, mut huge) = (limits.malloc_bytes_used, limits.hugepage_bytes_used);
        for (i, b) in cfg.bdevs.iter().enumerate() {
            let BdevConfig::Malloc(c) = b else { continue };
            let bytes = c.memory_bytes()?;
            let (used, max, what, field) = if c.hugepages {
                huge = huge.saturating_add(bytes);
                (
                    huge,
                    p.hugepage_bytes_max,
                    "hugepage_bytes_max",
                    "hugepages",
                )
            } else {
                pages = pages.saturating_add(bytes);
                (pages, p.malloc_bytes_max, "malloc_bytes_max", "size_bytes")
            };
            if used > max {
                let field = format!("bdevs[{i}].{field}");
                let what = format!(
                    "{bytes} bytes would bring RAM disks created over RPC to {used} bytes, over rpc.namespaces.{what} ({max})"
                );
                return Err(if max == 0 {
                    StackError::Denied { field, what }
                } else {
                    StackError::InUse { field, what }
                });
            }
        }
        let stacks = Self::build(cfg, Some(limits))?;
        // A key header on a file means an encrypted namespace lives there: only an `encrypted`
        // bdev may use it, never a raw or development-key view that could overwrite it.
        for (i, b) in cfg.bdevs.iter().enumerate() {
            let BdevConfig::Uring(u) = b else { continue };
            let managed = cfg
                .bdevs
                .iter()
                .any(|o| matches!(o, BdevConfig::Encrypted(e) if e.base == u.name));
            if managed {
                continue;
            }
            let Some(dev) = stacks.uring.get(&u.name) else {
                continue;
            };
            if holds_key_header(dev).map_err(|e| {
                StackError::Bdev(BdevError::Io {
                    name: u.name.clone(),
                    path: u.path.display().to_string(),
                    source: e,
                })
            })? {
                return Err(StackError::Denied {
                    field: format!("bdevs[{i}].path"),
                    what: format!(
                        "{} holds an nvseal key header (the base of an encrypted namespace); only an `encrypted` bdev may use it",
                        u.path.display()
                    ),
                });
            }
        }
        Ok(stacks)
    }

    fn build(cfg: &Config, rpc: Option<&RpcLimits<'_>>) -> Result<Stacks, StackError> {
        let max_tier: Option<Tier> = cfg.crypto.max_tier.as_deref().and_then(|t| t.parse().ok());
        let mut bdevs: BTreeMap<String, Arc<dyn Bdev>> = BTreeMap::new();
        let mut crypto_base = BTreeMap::new();
        let mut crypto_keys = BTreeMap::new();
        let mut encrypted = BTreeMap::new();
        let mut uring = BTreeMap::new();
        let mut spdk = BTreeMap::new();
        let mut memory_bytes = (0u64, 0u64);
        for (i, b) in cfg.bdevs.iter().enumerate() {
            let dev: Arc<dyn Bdev> = match b {
                BdevConfig::Malloc(c) => {
                    let dev = bdev::malloc::open(c)?;
                    let bytes = c.memory_bytes()?;
                    if c.hugepages {
                        memory_bytes.1 += bytes;
                    } else {
                        memory_bytes.0 += bytes;
                    }
                    dev
                }
                BdevConfig::Null(c) => bdev::null::open(c)?,
                BdevConfig::SpdkNvme(c) => {
                    let cores = cfg
                        .reactor
                        .cores
                        .placement()
                        .and_then(|p| p.resolve(&crate::sys::affinity::allowed_cpus()))
                        .unwrap_or_default();
                    let (dev, status) = crate::spdk::open(c, &cfg.spdk, &cores)?;
                    spdk.insert(c.name.clone(), status);
                    dev
                }
                BdevConfig::Uring(c) => {
                    let u = Arc::new(match rpc {
                        None => UringBdev::new(c)?,
                        Some(l) => open_granted(i, c, l)?,
                    });
                    uring.insert(c.name.clone(), u.clone());
                    u
                }
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
                    // A detached header leaves the whole base to the data area.
                    let header_blocks = if c.header_file.is_some() {
                        0
                    } else {
                        METADATA_REGION_BYTES / bs
                    };
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
            uring,
            spdk,
            memory_bytes,
        })
    }

    /// Files and devices under an encrypted bdev (`crypto` or `encrypted`) of these stacks,
    /// with the name of the encrypted bdev.
    pub fn encrypted_bases(&self) -> Vec<(BackingId, String)> {
        let crypto = self.crypto_base.iter();
        let managed = self.encrypted.iter().map(|(n, (_, c))| (n, &c.base));
        crypto
            .chain(managed)
            .filter_map(|(name, base)| self.uring.get(base).map(|u| (u.backing_id(), name.clone())))
            .collect()
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

/// Opens the `uring` bdev `bdevs[i]` of a run-time call as the allow-list grants it.
fn open_granted(i: usize, c: &UringConfig, l: &RpcLimits<'_>) -> Result<UringBdev, StackError> {
    let field = format!("bdevs[{i}].path");
    let grant = l.policy.grant(&c.path).map_err(|what| StackError::Denied {
        field: field.clone(),
        what,
    })?;
    let allowed = match &grant {
        PathGrant::Dir { rule, dir, rel, .. } => AllowedPath::Beneath {
            dir,
            rel,
            create: rule.create,
            grow: rule.grow,
            max_size_bytes: rule.max_size_bytes.unwrap_or(0),
        },
        PathGrant::Device { device, .. } => AllowedPath::Device { path: device },
    };
    let check = |id: BackingId| match l.encrypted_bases.iter().find(|(b, _)| *b == id) {
        Some((_, name)) => Err(format!(
            "is the base of encrypted bdev {name}; it is never exported any other way"
        )),
        None => Ok(()),
    };
    UringBdev::open_allowed(c, allowed, &check).map_err(|e| match e {
        OpenRefused::Denied(what) => StackError::Denied { field, what },
        OpenRefused::InUse(what) => StackError::InUse { field, what },
        OpenRefused::Bdev(b) => StackError::Bdev(b),
    })
}

/// Whether either copy of the nvseal key header's magic is at its place on `dev`'s file
/// (read through the bdev's own descriptor, buffered; a file too short for it holds none).
fn holds_key_header(dev: &UringBdev) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(dev.own_fd_path())?;
    for off in COPY_OFFSETS_BYTES {
        let mut magic = [0u8; 8];
        match f.read_exact_at(&mut magic, off) {
            Ok(()) if magic == MAGIC => return Ok(true),
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
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
