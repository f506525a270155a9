//! The `rpc:` section of the configuration: where the control socket lives, its limits, and
//! which uids/gids hold which role.
//!
//! Parsed once on the control thread at start-up. Kept in this module (not `src/config/`) so
//! the control socket can be built and tested on its own; the main config embeds
//! [`RpcConfig`] as a field.

use std::path::PathBuf;

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
        }
    }
}

/// A limit out of range; names the field.
#[derive(Debug, Error, PartialEq)]
#[error("rpc.{field}: {message}")]
pub struct RpcConfigError {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

impl RpcConfig {
    /// Checks every limit; the server refuses to start on an error.
    pub fn validate(&self) -> Result<(), RpcConfigError> {
        let err = |field, message: String| Err(RpcConfigError { field, message });
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
        Ok(())
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
