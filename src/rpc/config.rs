//! The `rpc:` section of the configuration: where the control socket lives, its limits, and
//! which uids/gids hold which role.
//!
//! Parsed once on the control thread at start-up. Kept in this module (not `src/config/`) so
//! the control socket can be built and tested on its own; the main config embeds
//! [`RpcConfig`] as a field.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use super::{Role, RoleSet};

/// Default socket path: `/run` is a tmpfs, so a stale socket never survives a reboot.
pub const DEFAULT_SOCKET_PATH: &str = "/run/nvseal/nvseal.sock";
/// Default mode: owner and group may connect (connect(2) on a unix socket needs write
/// permission), nobody else.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// A control socket serves operators and scripts, not a fleet: 16 concurrent clients is far
/// more than a human needs, and caps the threads an unprivileged local user can make us spawn.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16;
/// 1 MiB: the largest legitimate request (a namespace list to create) is a few KiB; the cap
/// bounds the memory one connection can pin.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1 << 20;
/// 30 s to deliver a complete request line once the server starts waiting for one; bounds
/// idle and slow (byte-at-a-time) clients.
pub const DEFAULT_READ_TIMEOUT_MS: u64 = 30_000;
/// 10 s for a response to be taken by the client before the connection is dropped.
pub const DEFAULT_WRITE_TIMEOUT_MS: u64 = 10_000;
/// Requests per batch; a batch runs on one connection thread, one after another.
pub const DEFAULT_MAX_BATCH_LEN: usize = 32;

/// Upper bounds that keep a typo from turning a limit off.
const MAX_CONNECTIONS_LIMIT: usize = 4096;
const MAX_REQUEST_BYTES_LIMIT: usize = 64 << 20;
const MIN_REQUEST_BYTES: usize = 256;

/// The control socket's settings (`rpc:` in the YAML).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RpcConfig {
    /// Path of the unix socket.
    #[serde(default = "default_socket_path")]
    pub socket_path: PathBuf,
    /// Permission bits of the socket file, as an octal string (`"0660"`).
    #[serde(default)]
    pub socket_mode: SocketMode,
    /// Group that owns the socket file (numeric gid); `None` keeps the server's group.
    #[serde(default)]
    pub socket_gid: Option<u32>,
    /// Concurrent connections; one more is answered with a busy error and closed.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest request line in bytes (newline excluded).
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// Time allowed for a complete request line, in milliseconds.
    #[serde(default = "default_read_timeout_ms")]
    pub read_timeout_ms: u64,
    /// Time allowed for a response write, in milliseconds.
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// Requests per batch array.
    #[serde(default = "default_max_batch_len")]
    pub max_batch_len: usize,
    /// uid 0 holds every role without being listed. Set `false` to make root list itself.
    #[serde(default = "default_true")]
    pub root_has_all_roles: bool,
    /// JSON-lines audit file for crypto-role calls; `None` = the caller supplies a sink.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// Role membership.
    #[serde(default)]
    pub roles: RoleMap,
    /// What `namespace.create` may use: backing paths and memory budgets. Absent = no path
    /// and no RAM (only `null` bdevs and stacks on them).
    #[serde(default)]
    pub namespaces: NamespacePolicy,
}

/// `rpc.namespaces`: the resources a `namespace.create` caller may make nvseal (running as
/// root) use. Everything not granted here is refused; the defaults grant nothing, because the
/// admin role is meant to manage namespaces, not to reach every file and all the memory the
/// target's process can.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NamespacePolicy {
    /// Files and block devices a `uring` bdev created over RPC may open. Config bdevs are not
    /// limited by this list (the operator wrote them), but they are locked the same way, so an
    /// RPC bdev can never open what a config bdev uses.
    #[serde(default)]
    pub paths: Vec<PathRule>,
    /// Total bytes of `malloc` bdevs (regular pages) that RPC-created namespaces may hold at
    /// once. Default 0: RAM disks are a benchmark tool, and a host can fill every byte of one,
    /// so the operator decides how much memory callers may pin.
    #[serde(default)]
    pub malloc_bytes_max: u64,
    /// Total bytes of hugepage-backed `malloc` bdevs RPC-created namespaces may hold at once.
    /// Default 0: hugepages are a reserved, scarce pool shared with other processes.
    #[serde(default)]
    pub hugepage_bytes_max: u64,
}

/// One entry of `rpc.namespaces.paths`: a directory (regular files beneath it) or one block
/// device.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PathRule {
    /// A directory: regular files anywhere beneath it may back a bdev. The path a caller gives
    /// is resolved beneath this directory (no `..`, no symlink leading out of it).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// A block device, matched by the exact path written here (it may be a `/dev/disk/by-id`
    /// link: the operator's path is trusted, the caller's must equal it).
    #[serde(default)]
    pub device: Option<PathBuf>,
    /// `dir` only: a missing file may be created (mode 0600) when the caller gives
    /// `size_bytes`. Needs `max_size_bytes`.
    #[serde(default)]
    pub create: bool,
    /// `dir` only: an existing file shorter than the caller's `size_bytes` may be extended.
    /// Needs `max_size_bytes`.
    #[serde(default)]
    pub grow: bool,
    /// `dir` only: largest size a file may be created with or grown to.
    #[serde(default)]
    pub max_size_bytes: Option<u64>,
}

/// Where a caller's path points, once matched against [`NamespacePolicy::paths`].
#[derive(Debug, Clone, PartialEq)]
pub enum PathGrant<'a> {
    /// A file beneath `rule.dir`: `rel` is the path below it (no `.`/`..`, not empty).
    Dir {
        index: usize,
        rule: &'a PathRule,
        dir: &'a Path,
        rel: PathBuf,
    },
    /// The block device of `rule.device`.
    Device {
        index: usize,
        rule: &'a PathRule,
        device: &'a Path,
    },
}

impl NamespacePolicy {
    /// Matches a caller's path against the allow-list. Only the text is looked at here (no
    /// file-system access): the path must be absolute and free of `.`/`..`, and either equal a
    /// `device` entry or lie beneath a `dir` entry (the deepest one wins). Opening it safely
    /// (beneath the directory, locked) is the bdev layer's job.
    pub fn grant(&self, path: &Path) -> Result<PathGrant<'_>, String> {
        let text = path.as_os_str().as_encoded_bytes();
        if !path.is_absolute() {
            return Err(format!("{} is not an absolute path", path.display()));
        }
        if text.contains(&0) {
            return Err("the path contains a NUL byte".into());
        }
        if path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
            || text.split(|b| *b == b'/').any(|c| c == b".")
        {
            return Err(format!(
                "{} contains `.` or `..`: give the path as it lies beneath an allowed directory",
                path.display()
            ));
        }
        for (index, rule) in self.paths.iter().enumerate() {
            if let Some(device) = rule.device.as_deref() {
                if device == path {
                    return Ok(PathGrant::Device {
                        index,
                        rule,
                        device,
                    });
                }
            }
        }
        let mut best: Option<PathGrant<'_>> = None;
        for (index, rule) in self.paths.iter().enumerate() {
            let Some(dir) = rule.dir.as_deref() else {
                continue;
            };
            let Ok(rel) = path.strip_prefix(dir) else {
                continue;
            };
            if rel.as_os_str().is_empty() {
                continue;
            }
            let deeper = match &best {
                Some(PathGrant::Dir { dir: d, .. }) => {
                    dir.components().count() > d.components().count()
                }
                _ => true,
            };
            if deeper {
                best = Some(PathGrant::Dir {
                    index,
                    rule,
                    dir,
                    rel: rel.to_path_buf(),
                });
            }
        }
        best.ok_or_else(|| {
            format!(
                "{} is not allowed: it is neither beneath an rpc.namespaces.paths dir nor one of its devices",
                path.display()
            )
        })
    }

    /// Checks the entries; `field` in the error is relative to `rpc.`.
    fn validate(&self) -> Result<(), RpcConfigError> {
        let err = |field: String, message: String| Err(RpcConfigError { field, message });
        for (i, r) in self.paths.iter().enumerate() {
            let at = |f: &str| format!("namespaces.paths[{i}].{f}");
            let (key, p) = match (&r.dir, &r.device) {
                (Some(d), None) => ("dir", d),
                (None, Some(d)) => ("device", d),
                (Some(_), Some(_)) => {
                    return err(
                        at("device"),
                        "give either dir or device in one entry, not both".into(),
                    )
                }
                (None, None) => {
                    return err(
                        format!("namespaces.paths[{i}]"),
                        "each entry needs dir (files beneath it) or device (one block device)"
                            .into(),
                    )
                }
            };
            if !p.is_absolute()
                || p.components()
                    .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
            {
                return err(
                    at(key),
                    format!("{} must be an absolute path without . or ..", p.display()),
                );
            }
            if key == "dir" && p.parent().is_none() {
                return err(
                    at(key),
                    "/ would allow every file on the machine; name a directory for volumes".into(),
                );
            }
            if key == "device" && (r.create || r.grow || r.max_size_bytes.is_some()) {
                return err(
                    at(if r.create {
                        "create"
                    } else if r.grow {
                        "grow"
                    } else {
                        "max_size_bytes"
                    }),
                    "only a dir entry can create or grow files".into(),
                );
            }
            if (r.create || r.grow) && r.max_size_bytes.is_none_or(|m| m == 0) {
                return err(
                    at(if r.create { "create" } else { "grow" }),
                    "creating or growing files needs max_size_bytes (> 0), so a caller cannot fill the file system".into(),
                );
            }
        }
        Ok(())
    }
}

/// Members of each role.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoleMap {
    /// Key operations: create encrypted namespace, rekey, change KMS, any key export.
    #[serde(default)]
    pub crypto: RoleMembers,
    /// Non-key changes: create/delete plaintext namespaces, subsystems, listeners.
    #[serde(default)]
    pub admin: RoleMembers,
    /// Read-only calls.
    #[serde(default)]
    pub viewer: RoleMembers,
}

/// The uids and (primary) gids that hold one role.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoleMembers {
    /// Peer uids.
    #[serde(default)]
    pub uids: Vec<u32>,
    /// Peer primary gids (SO_PEERCRED reports no supplementary groups).
    #[serde(default)]
    pub gids: Vec<u32>,
}

impl RoleMembers {
    fn contains(&self, uid: u32, gid: u32) -> bool {
        self.uids.contains(&uid) || self.gids.contains(&gid)
    }
}

/// Socket permission bits, written in the YAML as an octal string so `0660` cannot be misread
/// as decimal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl Default for SocketMode {
    fn default() -> Self {
        SocketMode(DEFAULT_SOCKET_MODE)
    }
}

impl SocketMode {
    /// Parses `"0660"`, `"660"` or `"0o660"`.
    pub fn parse(text: &str) -> Result<SocketMode, String> {
        let t = text.trim();
        let digits = t.strip_prefix("0o").unwrap_or(t);
        if digits.is_empty()
            || digits.len() > 4
            || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
        {
            return Err(format!(
                "socket_mode {text:?} is not an octal mode like \"0660\""
            ));
        }
        let mode =
            u32::from_str_radix(digits, 8).map_err(|e| format!("socket_mode {text:?}: {e}"))?;
        if mode > 0o777 {
            return Err(format!(
                "socket_mode {text:?}: only permission bits (at most 0777) are allowed"
            ));
        }
        Ok(SocketMode(mode))
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SocketMode::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for SocketMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:04o}", self.0))
    }
}

fn default_socket_path() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET_PATH)
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_max_request_bytes() -> usize {
    DEFAULT_MAX_REQUEST_BYTES
}
fn default_read_timeout_ms() -> u64 {
    DEFAULT_READ_TIMEOUT_MS
}
fn default_write_timeout_ms() -> u64 {
    DEFAULT_WRITE_TIMEOUT_MS
}
fn default_max_batch_len() -> usize {
    DEFAULT_MAX_BATCH_LEN
}
fn default_true() -> bool {
    true
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            socket_path: default_socket_path(),
            socket_mode: SocketMode::default(),
            socket_gid: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            read_timeout_ms: DEFAULT_READ_TIMEOUT_MS,
            write_timeout_ms: DEFAULT_WRITE_TIMEOUT_MS,
            max_batch_len: DEFAULT_MAX_BATCH_LEN,
            root_has_all_roles: true,
            audit_log: None,
            roles: RoleMap::default(),
            namespaces: NamespacePolicy::default(),
        }
    }
}

/// A limit out of range; names the field.
#[derive(Debug, Error, PartialEq)]
#[error("rpc.{field}: {message}")]
pub struct RpcConfigError {
    /// The offending field, relative to `rpc.` (`max_connections`, `namespaces.paths[0].dir`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl RpcConfig {
    /// Checks every limit; the server refuses to start on an error.
    pub fn validate(&self) -> Result<(), RpcConfigError> {
        let err = |field: &str, message: String| {
            Err(RpcConfigError {
                field: field.to_string(),
                message,
            })
        };
        if self.socket_path.as_os_str().is_empty() {
            return err("socket_path", "must not be empty".into());
        }
        if !(1..=MAX_CONNECTIONS_LIMIT).contains(&self.max_connections) {
            return err(
                "max_connections",
                format!("must be 1..={MAX_CONNECTIONS_LIMIT}"),
            );
        }
        if !(MIN_REQUEST_BYTES..=MAX_REQUEST_BYTES_LIMIT).contains(&self.max_request_bytes) {
            return err(
                "max_request_bytes",
                format!("must be {MIN_REQUEST_BYTES}..={MAX_REQUEST_BYTES_LIMIT}"),
            );
        }
        if self.read_timeout_ms == 0 {
            return err("read_timeout_ms", "must be > 0".into());
        }
        if self.write_timeout_ms == 0 {
            return err("write_timeout_ms", "must be > 0".into());
        }
        if !(1..=1024).contains(&self.max_batch_len) {
            return err("max_batch_len", "must be 1..=1024".into());
        }
        self.namespaces.validate()
    }

    /// The roles a peer with this uid and primary gid holds. Holding admin or crypto implies
    /// viewer; admin and crypto are independent of each other (vSAN's "no cryptography
    /// administrator" split).
    pub fn roles_for(&self, uid: u32, gid: u32) -> RoleSet {
        if uid == 0 && self.root_has_all_roles {
            return RoleSet::ALL;
        }
        let mut set = RoleSet::EMPTY;
        if self.roles.crypto.contains(uid, gid) {
            set = set.with(Role::Crypto).with(Role::Viewer);
        }
        if self.roles.admin.contains(uid, gid) {
            set = set.with(Role::Admin).with(Role::Viewer);
        }
        if self.roles.viewer.contains(uid, gid) {
            set = set.with(Role::Viewer);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_octal_mode() {
        let c: RpcConfig = serde_yaml_ng::from_str("socket_mode: \"0600\"\n").unwrap();
        assert_eq!(c.socket_mode, SocketMode(0o600));
        assert_eq!(c.max_connections, 16);
        assert_eq!(c.max_request_bytes, 1 << 20);
        assert!(c.root_has_all_roles);
        c.validate().unwrap();
        assert_eq!(SocketMode::parse("0o660"), Ok(SocketMode(0o660)));
        assert!(SocketMode::parse("0999").is_err());
        assert!(SocketMode::parse("4777").is_err());
        assert!(SocketMode::parse("").is_err());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_yaml_ng::from_str::<RpcConfig>("roles: { crypto: { uid: [1] } }\n");
        assert!(e.is_err());
        let e = serde_yaml_ng::from_str::<RpcConfig>("max_conections: 3\n");
        assert!(e.is_err());
    }

    #[test]
    fn limits_are_checked() {
        let c = RpcConfig {
            max_connections: 0,
            ..RpcConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "max_connections");
        let c = RpcConfig {
            max_request_bytes: 10,
            ..RpcConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "max_request_bytes");
    }

    #[test]
    fn namespace_policy_is_checked() {
        let c: RpcConfig = serde_yaml_ng::from_str(
            "namespaces:\n  paths:\n    - { dir: /srv/vols, create: true, max_size_bytes: 1048576 }\n    - { device: /dev/nvme1n1 }\n  malloc_bytes_max: 4096\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.namespaces.hugepage_bytes_max, 0);
        assert_eq!(RpcConfig::default().namespaces, NamespacePolicy::default());
        let bad = |yaml: &str| {
            serde_yaml_ng::from_str::<RpcConfig>(yaml)
                .unwrap()
                .validate()
                .unwrap_err()
                .field
        };
        assert_eq!(
            bad("namespaces:\n  paths:\n    - { dir: /srv/v, create: true }\n"),
            "namespaces.paths[0].create"
        );
        assert_eq!(
            bad("namespaces:\n  paths:\n    - { dir: /srv, grow: true, max_size_bytes: 0 }\n"),
            "namespaces.paths[0].grow"
        );
        assert_eq!(
            bad("namespaces:\n  paths:\n    - { dir: /srv }\n    - { dir: /srv/../etc }\n"),
            "namespaces.paths[1].dir"
        );
        assert_eq!(
            bad("namespaces:\n  paths:\n    - { dir: srv }\n"),
            "namespaces.paths[0].dir"
        );
        assert_eq!(
            bad("namespaces:\n  paths:\n    - { dir: / }\n"),
            "namespaces.paths[0].dir"
        );
        assert_eq!(
            bad("namespaces:\n  paths:\n    - { device: /dev/sdb, create: true }\n"),
            "namespaces.paths[0].create"
        );
        assert_eq!(
            bad("namespaces:\n  paths:\n    - { dir: /a, device: /dev/sdb }\n"),
            "namespaces.paths[0].device"
        );
        assert_eq!(
            bad("namespaces:\n  paths:\n    - { create: false }\n"),
            "namespaces.paths[0]"
        );
        assert!(serde_yaml_ng::from_str::<RpcConfig>(
            "namespaces:\n  paths:\n    - { dirr: /a }\n"
        )
        .is_err());
    }

    #[test]
    fn paths_are_granted_by_text_only_when_beneath_or_equal() {
        let p = NamespacePolicy {
            paths: vec![
                PathRule {
                    dir: Some("/srv/vols".into()),
                    ..PathRule::default()
                },
                PathRule {
                    dir: Some("/srv/vols/big".into()),
                    create: true,
                    max_size_bytes: Some(1 << 30),
                    ..PathRule::default()
                },
                PathRule {
                    device: Some("/dev/nvme1n1".into()),
                    ..PathRule::default()
                },
            ],
            ..NamespacePolicy::default()
        };
        match p.grant(Path::new("/srv/vols/a.img")).unwrap() {
            PathGrant::Dir { index, rel, .. } => {
                assert_eq!((index, rel), (0, PathBuf::from("a.img")))
            }
            g => panic!("{g:?}"),
        }
        // The deepest directory decides.
        match p.grant(Path::new("/srv/vols/big/x/b.img")).unwrap() {
            PathGrant::Dir { index, rel, .. } => {
                assert_eq!((index, rel), (1, PathBuf::from("x/b.img")))
            }
            g => panic!("{g:?}"),
        }
        assert!(matches!(
            p.grant(Path::new("/dev/nvme1n1")),
            Ok(PathGrant::Device { index: 2, .. })
        ));
        for bad in [
            "/srv/vols/../../etc/shadow",
            "/srv/vols/./a.img",
            "/srv/vols",
            "/srv/volsX/a.img",
            "/etc/shadow",
            "srv/vols/a.img",
            "/dev/nvme1n1p1",
            "/dev/nvme1",
        ] {
            assert!(p.grant(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn role_mapping() {
        let yaml = "roles:\n  crypto: { uids: [1000] }\n  admin: { gids: [50] }\n  viewer: { uids: [65534] }\n";
        let c: RpcConfig = serde_yaml_ng::from_str(yaml).unwrap();
        assert_eq!(c.roles_for(0, 0), RoleSet::ALL);
        let r = c.roles_for(1000, 1000);
        assert!(r.contains(Role::Crypto) && r.contains(Role::Viewer) && !r.contains(Role::Admin));
        let r = c.roles_for(7, 50);
        assert!(r.contains(Role::Admin) && r.contains(Role::Viewer) && !r.contains(Role::Crypto));
        let r = c.roles_for(65534, 65534);
        assert!(r.contains(Role::Viewer) && !r.contains(Role::Admin));
        assert_eq!(c.roles_for(4242, 4242), RoleSet::EMPTY);
        let strict = RpcConfig {
            root_has_all_roles: false,
            ..c
        };
        assert_eq!(strict.roles_for(0, 0), RoleSet::EMPTY);
    }
}
