//! The YAML configuration: schema, parsing and validation.
//!
//! Runs on the control thread at start-up (and for `nvseal config check`). Every error names the
//! key path, the line and the column (`configs/x.yaml:12:14: bdevs[2].base: no bdev named "mem9"`):
//! syntax and type errors come from the YAML deserializer with their position; errors found
//! after parsing are located by [`locate`] walking the same text. Unknown keys are refused, so a
//! typo never silently falls back to a default.
//!
//! YAML is read with `serde_yaml_ng`, a maintained fork of the deprecated `serde_yaml` with the
//! same API.

use crate::bdev::malloc::MallocConfig;
use crate::bdev::null::NullConfig;
use crate::bdev::uring::UringConfig;
use crate::reactor::placement::{parse_cpu_list, Placement};
use crate::reactor::ReactorOptions;
use serde::Deserialize;
use std::fmt;
use std::path::Path;
use std::time::Duration;

pub mod locate;

/// The built-in default configuration (`configs/default.yaml`), used when no `-c` is given.
pub const DEFAULT_YAML: &str = include_str!("../../configs/default.yaml");

/// A configuration error with its place in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// File name (or `<built-in default>`).
    pub file: String,
    /// Key path like `bdevs[1].base`; empty for syntax errors outside any key.
    pub path: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, ":{l}:{c}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub reactor: ReactorConfig,
    #[serde(default)]
    pub crypto: CryptoConfig,
    #[serde(default)]
    pub bdevs: Vec<BdevConfig>,
    /// SPDK's environment, for `spdk_nvme` bdevs (`spdk` feature; docs/spdk.md).
    #[serde(default)]
    pub spdk: crate::spdk::SpdkEnvConfig,
    /// NVMe/TCP transport limits.
    #[serde(default)]
    pub nvmf: crate::nvmf::config::Limits,
    /// Exported NVM subsystems.
    #[serde(default)]
    pub subsystems: Vec<crate::nvmf::config::SubsystemConfig>,
    /// Key management: KMS clusters, the local key file, unlock retries, audit log.
    #[serde(default)]
    pub keys: Option<crate::keys::manager::KeysConfig>,
    /// The JSON-RPC control socket; absent = no socket.
    #[serde(default)]
    pub rpc: Option<crate::rpc::config::RpcConfig>,
    /// Where the config came from and its text, as read (set by [`Config::from_yaml`]): for
    /// the positions of errors found later ([`Config::preflight`]) and for `config.get`.
    #[serde(skip)]
    pub source: Source,
}

/// A config's file name and text.
#[derive(Clone, Default)]
pub struct Source {
    pub file: String,
    /// As read: it may hold secrets, so it is never printed (see `bundle::redact_config`).
    pub text: String,
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Source")
            .field("file", &self.file)
            .field("text_bytes", &self.text.len())
            .finish()
    }
}

/// A finding that does not stop start-up (a subsystem no host can reach), with its place in
/// the file; printed by `nvseal config check` and logged by `nvseal serve`.
pub type ConfigWarning = ConfigError;

/// `reactor:` — where reactors run and how they poll.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReactorConfig {
    /// A CPU list (`"0-3,6"`: one reactor pinned on each) or a count (`2`: the first N allowed CPUs).
    #[serde(default = "default_cores")]
    pub cores: CoreSpec,
    /// Bounded mailbox depth per reactor. 1024 messages: control traffic is a few per second;
    /// the bound exists so a stuck reactor pushes back instead of growing memory.
    #[serde(default = "default_mailbox_depth")]
    pub mailbox_depth: usize,
    /// Sleep this long between polls after ~10k idle polls. 0 = spin always (lowest latency,
    /// one full core per reactor). The default config uses 50 µs so a laptop is not cooked.
    #[serde(default)]
    pub idle_backoff_us: u64,
    /// Pin reactors to their cores (leave on; off only for oversubscribed test machines).
    #[serde(default = "default_true")]
    pub pin: bool,
    /// How long a shutdown waits for in-flight I/O. 10 s: longer than any sane device timeout.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
}

impl Default for ReactorConfig {
    fn default() -> Self {
        ReactorConfig {
            cores: default_cores(),
            mailbox_depth: default_mailbox_depth(),
            idle_backoff_us: 0,
            pin: true,
            drain_timeout_ms: default_drain_timeout_ms(),
        }
    }
}

impl ReactorConfig {
    pub fn options(&self) -> ReactorOptions {
        ReactorOptions {
            mailbox_depth: self.mailbox_depth,
            idle_backoff_us: self.idle_backoff_us,
            pin: self.pin,
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
        }
    }
}

/// Reactor cores as written in the file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum CoreSpec {
    Count(usize),
    List(String),
}

impl CoreSpec {
    pub fn placement(&self) -> Result<Placement, String> {
        match self {
            CoreSpec::Count(n) => Ok(Placement::Count(*n)),
            CoreSpec::List(s) => parse_cpu_list(s).map(Placement::Fixed),
        }
    }
}

fn default_cores() -> CoreSpec {
    CoreSpec::Count(1)
}
fn default_mailbox_depth() -> usize {
    1024
}
fn default_true() -> bool {
    true
}
fn default_drain_timeout_ms() -> u64 {
    10_000
}

/// `crypto:` — XTS engine settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CryptoConfig {
    /// Highest XTS kernel tier to use: `vaes512`, `vaes256`, `aesni` or `soft`. Unset = the best
    /// this CPU has. The environment variable `NVSEAL_XTS_TIER` also caps it (lower cap wins).
    #[serde(default)]
    pub max_tier: Option<String>,
}

/// One bdev (`bdevs:` list entry), tagged by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BdevConfig {
    Malloc(MallocConfig),
    Null(NullConfig),
    Uring(UringConfig),
    SpdkNvme(crate::spdk::SpdkNvmeConfig),
    Crypto(CryptoBdevConfig),
    Encrypted(EncryptedBdevConfig),
}

impl BdevConfig {
    /// Checks block size and size of a backend as its `open` would, without opening it:
    /// the field at fault (`block_size`, `size_bytes`, `num_blocks`) and why.
    fn check_geometry(&self) -> Result<(), (&'static str, String)> {
        let (bs, num_blocks, size_bytes, sized) = match self {
            BdevConfig::Malloc(c) => (c.block_size, c.num_blocks, c.size_bytes, true),
            BdevConfig::Null(c) => (c.block_size, c.num_blocks, c.size_bytes, true),
            BdevConfig::Uring(c) => (c.block_size, None, c.size_bytes, false),
            // The namespace's own geometry, read when the controller is attached.
            BdevConfig::SpdkNvme(_) | BdevConfig::Crypto(_) | BdevConfig::Encrypted(_) => {
                return Ok(())
            }
        };
        if bs != 512 && bs != 4096 {
            return Err(("block_size", format!("block_size {bs} must be 512 or 4096")));
        }
        match (num_blocks, size_bytes) {
            (Some(_), Some(_)) => Err((
                "size_bytes",
                "give exactly one of num_blocks and size_bytes".into(),
            )),
            (None, None) if sized => Err((
                "size_bytes",
                "give the size: num_blocks or size_bytes".into(),
            )),
            (Some(0), None) => Err(("num_blocks", "size must be at least one block".into())),
            (None, Some(s)) if s < u64::from(bs) || !s.is_multiple_of(u64::from(bs)) => Err((
                "size_bytes",
                format!("size_bytes {s} is not a positive multiple of block_size {bs}"),
            )),
            _ => Ok(()),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            BdevConfig::Malloc(c) => &c.name,
            BdevConfig::Null(c) => &c.name,
            BdevConfig::Uring(c) => &c.name,
            BdevConfig::SpdkNvme(c) => &c.name,
            BdevConfig::Crypto(c) => &c.name,
            BdevConfig::Encrypted(c) => &c.name,
        }
    }
}

/// A crypto bdev stacked on `base`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CryptoBdevConfig {
    pub name: String,
    /// Name of the bdev underneath (defined earlier in the list).
    pub base: String,
    /// Where the DEK comes from. Development sources only until key management is configured.
    pub key: DevKeySource,
    /// Pass Unmap (NVMe deallocate) through to the base, like dm-crypt's `allow_discards`: saves
    /// space on thin backends but reveals which blocks are unused. Off by default.
    #[serde(default)]
    pub allow_discards: bool,
}

/// An encrypted namespace with managed keys (vSAN semantics): `base` starts with the 1 MiB
/// metadata header (two copies) holding the DEK wrapped by a KEK from `provider`; the data area
/// follows. The bdev stays locked (its namespace offline) until the key manager has fetched the
/// KEK and unwrapped the DEK.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptedBdevConfig {
    pub name: String,
    /// The backing bdev (defined earlier in the list).
    pub base: String,
    /// `local` (the key file of `keys.local`) or the alias of a KMS cluster in `keys.kms_clusters`.
    pub provider: String,
    /// KEK to wrap a new DEK with, by name on the provider (created if missing); default: a
    /// fresh KEK per namespace.
    #[serde(default)]
    pub kek_name: Option<String>,
    /// Format a blank header (fresh DEK) on first start. Never formats over anything non-blank.
    #[serde(default)]
    pub create: bool,
    /// The device holds plaintext until `namespace.encrypt`: with no header (a blank reserved
    /// 1 MiB region in front, or no `header_file` yet) its data area is served in the clear.
    /// Never together with `create`.
    #[serde(default)]
    pub plaintext: bool,
    /// A detached header file (absolute path): the header lives there and the data area is the
    /// whole base device from offset 0, so a full device can be encrypted with no change of
    /// size. Created by `namespace.encrypt` (never over an existing path); checked at each start
    /// against this namespace's name and the device's size.
    #[serde(default)]
    pub header_file: Option<String>,
}

impl EncryptedBdevConfig {
    /// Checks the fields that only make sense together: `(field, why)` on a refusal.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.create && self.plaintext {
            return Err((
                "plaintext",
                "create (format a fresh encrypted namespace) and plaintext (serve the data in \
                 the clear until namespace.encrypt) exclude each other"
                    .into(),
            ));
        }
        if let Some(p) = &self.header_file {
            let path = std::path::Path::new(p);
            if !path.is_absolute()
                || path.components().any(|c| {
                    !matches!(
                        c,
                        std::path::Component::RootDir | std::path::Component::Normal(_)
                    )
                })
            {
                return Err((
                    "header_file",
                    format!("{p:?} must be an absolute path without \".\" or \"..\""),
                ));
            }
            if self.create {
                return Err((
                    "create",
                    "a detached header file is written by namespace.encrypt, not by create".into(),
                ));
            }
        }
        Ok(())
    }
}

/// A development DEK source (key management proper wraps DEKs with a KEK from a KMS).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DevKeySource {
    /// A fresh random key for this run: data does not survive a restart. Perf labs.
    Ephemeral,
    /// A file holding the 64-byte XTS key as 128 hex digits (mode 0600).
    File { path: String },
}

impl Config {
    /// Parses and validates `text`; `file` names it in errors.
    pub fn from_yaml(text: &str, file: &str) -> Result<Config, ConfigError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let mut cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let (line, column) = match inner.location() {
                Some(l) => (Some(l.line()), Some(l.column())),
                None => match locate::locate(text, &path) {
                    Some(p) => (Some(p.line), Some(p.column)),
                    None => (None, None),
                },
            };
            let path = if path == "." { String::new() } else { path };
            ConfigError {
                file: file.to_string(),
                path,
                line,
                column,
                message: strip_location(&inner.to_string()),
            }
        })?;
        cfg.source = Source {
            file: file.to_string(),
            text: text.to_string(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            path: String::new(),
            line: None,
            column: None,
            message: format!("cannot read: {e}"),
        })?;
        Config::from_yaml(&text, &path.display().to_string())
    }

    /// The built-in default configuration.
    pub fn builtin_default() -> Config {
        // The default is checked by a unit test, so this cannot fail at run time.
        Config::from_yaml(DEFAULT_YAML, "<built-in default>")
            .expect("built-in default config is valid")
    }

    /// A located error (or warning) about the key at `path`.
    fn located(&self, path: String, message: String) -> ConfigError {
        let pos = locate::locate(&self.source.text, &path);
        ConfigError {
            file: self.source.file.clone(),
            path,
            line: pos.map(|p| p.line),
            column: pos.map(|p| p.column),
            message,
        }
    }

    /// The one validation `nvseal config check` and `nvseal serve` both run, before anything
    /// is opened, allocated or bound: what [`Config::from_yaml`] checks, plus what depends on
    /// this machine (the reactor cores exist and may be used; the key file, the KMS TLS files
    /// and the directories of the audit log and of `uring` files exist). Returns the warnings (a
    /// subsystem without a listener, a config without any); an error names the key, line and
    /// column.
    pub fn preflight(&self) -> Result<Vec<ConfigWarning>, ConfigError> {
        self.validate()?;
        self.check_host(&crate::sys::affinity::allowed_cpus())?;
        Ok(self.warnings())
    }

    /// The checks of [`Config::preflight`] that depend on the machine: `allowed` are the CPUs
    /// this process may run on.
    fn check_host(&self, allowed: &[crate::types::CoreId]) -> Result<(), ConfigError> {
        let err = |path: &str, message: String| self.located(path.to_string(), message);
        let placement = self
            .reactor
            .cores
            .placement()
            .map_err(|m| err("reactor.cores", m))?;
        let cores = placement
            .resolve(allowed)
            .map_err(|m| err("reactor.cores", m))?;
        // Unpinned reactors (oversubscribed test machines) may name any core.
        for c in cores.iter().filter(|_| self.reactor.pin) {
            if !allowed.contains(c) {
                return Err(err(
                    "reactor.cores",
                    format!(
                        "CPU {} is not one this process may run on (allowed: {})",
                        c.0,
                        crate::reactor::placement::format_cpu_list(allowed)
                    ),
                ));
            }
        }
        let dir_of = |p: &Path| -> Option<std::path::PathBuf> {
            match p.parent() {
                Some(d) if d.as_os_str().is_empty() => Some(".".into()),
                Some(d) => Some(d.to_path_buf()),
                None => None,
            }
        };
        let need_dir = |key: &str, p: &Path| -> Result<(), ConfigError> {
            let Some(d) = dir_of(p) else {
                return Err(err(key, format!("{} is not a file path", p.display())));
            };
            if !d.is_dir() {
                return Err(err(
                    key,
                    format!(
                        "the directory {} of {} does not exist (create it first)",
                        d.display(),
                        p.display()
                    ),
                ));
            }
            Ok(())
        };
        if let Some(k) = &self.keys {
            if let Some(l) = k.local.as_ref().filter(|l| !l.create) {
                if !l.path.is_file() {
                    return Err(err(
                        "keys.local.path",
                        format!(
                            "key file {} does not exist (set create: true to make a new one)",
                            l.path.display()
                        ),
                    ));
                }
            }
            if let Some(a) = &k.audit_log {
                need_dir("keys.audit_log", a)?;
            }
            // Read when the key manager starts, after the listeners: a missing one is refused
            // here instead.
            for (i, c) in k.kms_clusters.iter().enumerate() {
                for (field, p) in [
                    ("ca_file", &c.ca_file),
                    ("client_cert_file", &c.client_cert_file),
                    ("client_key_file", &c.client_key_file),
                ] {
                    if !p.is_file() {
                        return Err(err(
                            &format!("keys.kms_clusters[{i}].{field}"),
                            format!("{} does not exist or is not a file", p.display()),
                        ));
                    }
                }
            }
        }
        if let Some(a) = self.rpc.as_ref().and_then(|r| r.audit_log.as_ref()) {
            need_dir("rpc.audit_log", a)?;
        }
        for (i, b) in self.bdevs.iter().enumerate() {
            let BdevConfig::Uring(u) = b else { continue };
            let key = format!("bdevs[{i}].path");
            if u.size_bytes.is_some() {
                if !u.path.exists() {
                    need_dir(&key, &u.path)?;
                }
            } else if !u.path.exists() {
                return Err(err(
                    &key,
                    format!(
                        "{} does not exist (give size_bytes to create a file)",
                        u.path.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Findings that do not stop start-up.
    fn warnings(&self) -> Vec<ConfigWarning> {
        let mut w = Vec::new();
        for (i, s) in self.subsystems.iter().enumerate() {
            if s.listen.is_empty() {
                w.push(self.located(
                    format!("subsystems[{i}]"),
                    format!(
                        "subsystem {} has no listen address: no host can reach it",
                        s.nqn
                    ),
                ));
            }
        }
        if self.subsystems.iter().all(|s| s.listen.is_empty()) {
            w.push(ConfigError {
                file: self.source.file.clone(),
                path: String::new(),
                line: None,
                column: None,
                message: "no subsystem has a listen address: nvseal serve will accept no NVMe/TCP connection".into(),
            });
        }
        w
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let err = |path: String, message: String| self.located(path, message);
        if let Err(m) = self.reactor.cores.placement() {
            return Err(err("reactor.cores".into(), m));
        }
        if self.reactor.mailbox_depth == 0 || self.reactor.mailbox_depth > 1 << 20 {
            return Err(err(
                "reactor.mailbox_depth".into(),
                "must be between 1 and 1048576".into(),
            ));
        }
        if let Some(t) = &self.crypto.max_tier {
            if t.parse::<crate::crypto::xts::Tier>().is_err() {
                return Err(err(
                    "crypto.max_tier".into(),
                    format!("unknown tier {t:?} (expected vaes512, vaes256, aesni or soft)"),
                ));
            }
        }
        let mut seen: Vec<&str> = Vec::new();
        for (i, b) in self.bdevs.iter().enumerate() {
            let name = b.name();
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
            {
                return Err(err(
                    format!("bdevs[{i}].name"),
                    format!("bad bdev name {name:?} (1-64 of A-Z a-z 0-9 _ - .)"),
                ));
            }
            if seen.contains(&name) {
                return Err(err(
                    format!("bdevs[{i}].name"),
                    format!("bdev name {name:?} is used twice"),
                ));
            }
            if let Err((field, m)) = b.check_geometry() {
                return Err(err(format!("bdevs[{i}].{field}"), m));
            }
            if let BdevConfig::SpdkNvme(c) = b {
                if !crate::spdk::AVAILABLE {
                    return Err(err(
                        format!("bdevs[{i}].type"),
                        format!("bdev {}: type spdk_nvme needs a build with the `spdk` feature (cargo build --release --features spdk, against an installed SPDK: docs/spdk.md); this binary has none", c.name),
                    ));
                }
                if c.trid.trim().is_empty() {
                    return Err(err(
                        format!("bdevs[{i}].trid"),
                        "trid must not be empty".into(),
                    ));
                }
            }
            if let BdevConfig::Encrypted(c) = b {
                if let Err((field, why)) = c.check() {
                    return Err(err(format!("bdevs[{i}].{field}"), why));
                }
                if !seen.contains(&c.base.as_str()) {
                    return Err(err(
                        format!("bdevs[{i}].base"),
                        format!("no bdev named {:?} defined before this one", c.base),
                    ));
                }
                let keys = self.keys.as_ref();
                let known = if c.provider == crate::keys::manager::LOCAL_PROVIDER {
                    keys.is_some_and(|k| k.local.is_some())
                } else {
                    keys.is_some_and(|k| k.kms_clusters.iter().any(|kc| kc.alias == c.provider))
                };
                if !known {
                    return Err(err(
                        format!("bdevs[{i}].provider"),
                        format!(
                            "no key provider {:?} (configure keys.local for \"local\", or a keys.kms_clusters entry with that alias)",
                            c.provider
                        ),
                    ));
                }
            }
            if let BdevConfig::Crypto(c) = b {
                if !seen.contains(&c.base.as_str()) {
                    return Err(err(
                        format!("bdevs[{i}].base"),
                        format!("no bdev named {:?} defined before this one", c.base),
                    ));
                }
                if self
                    .bdevs
                    .iter()
                    .filter(|o| matches!(o, BdevConfig::Crypto(x) if x.base == c.base))
                    .count()
                    > 1
                {
                    return Err(err(
                        format!("bdevs[{i}].base"),
                        format!("bdev {:?} is the base of two crypto bdevs", c.base),
                    ));
                }
            }
            seen.push(name);
        }
        let mut nqns: Vec<&str> = Vec::new();
        for (i, sub) in self.subsystems.iter().enumerate() {
            use crate::nvmf::config::{
                is_valid_nqn, DISCOVERY_NQN, MAX_NAMESPACE_SLOTS, NQN_MAX_LEN,
            };
            if !is_valid_nqn(&sub.nqn) || sub.nqn == DISCOVERY_NQN {
                return Err(err(
                    format!("subsystems[{i}].nqn"),
                    format!(
                        "not a subsystem NQN: {:?} (\"nqn.\" prefix, at most {NQN_MAX_LEN} bytes, no spaces or control characters, not the discovery NQN)",
                        sub.nqn
                    ),
                ));
            }
            if nqns.contains(&sub.nqn.as_str()) {
                return Err(err(
                    format!("subsystems[{i}].nqn"),
                    format!("subsystem {:?} is defined twice", sub.nqn),
                ));
            }
            nqns.push(&sub.nqn);
            // Identify Controller carries them in fixed ASCII fields (SN 20 bytes, MN 40).
            for (field, v, max) in [("serial", &sub.serial, 20), ("model", &sub.model, 40)] {
                if v.is_empty() || v.len() > max || !v.bytes().all(|c| (0x20..0x7f).contains(&c)) {
                    return Err(err(
                        format!("subsystems[{i}].{field}"),
                        format!("{field} {v:?} must be 1-{max} printable ASCII characters"),
                    ));
                }
            }
            let mut nsids: Vec<u32> = Vec::new();
            for (j, ns) in sub.namespaces.iter().enumerate() {
                if ns.nsid == 0 || ns.nsid > MAX_NAMESPACE_SLOTS {
                    return Err(err(
                        format!("subsystems[{i}].namespaces[{j}].nsid"),
                        format!(
                            "nsid {} is outside 1..={MAX_NAMESPACE_SLOTS} (0 is reserved)",
                            ns.nsid
                        ),
                    ));
                }
                if nsids.contains(&ns.nsid) {
                    return Err(err(
                        format!("subsystems[{i}].namespaces[{j}].nsid"),
                        format!("nsid {} is used twice in this subsystem", ns.nsid),
                    ));
                }
                nsids.push(ns.nsid);
                if !seen.contains(&ns.bdev.as_str()) {
                    return Err(err(
                        format!("subsystems[{i}].namespaces[{j}].bdev"),
                        format!("no bdev named {:?}", ns.bdev),
                    ));
                }
                // `encrypted` is derived from the bdev stack; a label that disagrees is refused.
                let stack = matches!(
                    self.bdev(&ns.bdev),
                    Some(BdevConfig::Crypto(_) | BdevConfig::Encrypted(_))
                );
                if let Some(said) = ns.encrypted.filter(|&said| said != stack) {
                    return Err(err(
                        format!("subsystems[{i}].namespaces[{j}].encrypted"),
                        format!(
                            "encrypted: {said}, but bdev {:?} is {}; whether a namespace is encrypted follows from its bdev stack (remove the field, or export a crypto/encrypted bdev)",
                            ns.bdev,
                            if stack {
                                "a crypto/encrypted bdev"
                            } else {
                                "not a crypto or encrypted bdev (plaintext)"
                            }
                        ),
                    ));
                }
            }
            if let Err(e) = sub.check_access() {
                return Err(err(format!("subsystems[{i}].{}", e.field()), e.to_string()));
            }
        }
        if let Err(e) = self.nvmf.validate() {
            return Err(err("nvmf".into(), e.to_string()));
        }
        if let Some(k) = &self.keys {
            if let Err(e) = k.unlock_retry.validate() {
                return Err(err("keys.unlock_retry".into(), e.to_string()));
            }
            for (i, c) in k.kms_clusters.iter().enumerate() {
                if c.alias == crate::keys::manager::LOCAL_PROVIDER
                    || k.kms_clusters[..i].iter().any(|o| o.alias == c.alias)
                {
                    return Err(err(
                        format!("keys.kms_clusters[{i}].alias"),
                        format!(
                            "KMS cluster alias {:?} is used twice (\"local\" is reserved)",
                            c.alias
                        ),
                    ));
                }
                if let Err(e) = c.validate() {
                    return Err(err(format!("keys.kms_clusters[{i}]"), e.to_string()));
                }
            }
        }
        if let Some(r) = &self.rpc {
            if let Err(e) = r.validate() {
                return Err(err(format!("rpc.{}", e.field), e.message));
            }
            let encrypted = self
                .bdevs
                .iter()
                .any(|b| matches!(b, BdevConfig::Encrypted(_)));
            let audit =
                self.keys.as_ref().is_some_and(|k| k.audit_log.is_some()) || r.audit_log.is_some();
            let ns = &r.namespaces;
            if (!ns.paths.is_empty() || ns.malloc_bytes_max > 0 || ns.hugepage_bytes_max > 0)
                && !audit
            {
                return Err(err(
                    "rpc.namespaces".into(),
                    "every namespace.* call is audited: set rpc.audit_log (or keys.audit_log)"
                        .into(),
                ));
            }
            if encrypted && !audit {
                return Err(err(
                    "rpc".into(),
                    "key operations over the control socket are audited: set keys.audit_log (or rpc.audit_log)".into(),
                ));
            }
        }
        Ok(())
    }

    pub fn bdev(&self, name: &str) -> Option<&BdevConfig> {
        self.bdevs.iter().find(|b| b.name() == name)
    }
}

/// serde_yaml_ng appends " at line L column C" to messages; we print the position ourselves.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) if msg[i..].contains("column") => msg[..i].to_string(),
        _ => msg.to_string(),
    }
}

#[cfg(test)]
mod tests;
