//! The control socket: JSON-RPC 2.0 over a unix stream socket, with roles checked against the
//! peer's credentials (SO_PEERCRED), an audit trail of key operations (written through
//! [`crate::audit`], the layer below both this module and `keys`), and the client the CLI
//! (`nvseal rpc`) uses.
//!
//! Threads: [`server`] runs one control thread that accepts connections and one short-lived
//! thread per connection; handlers run on the connection thread and may block (KMS round
//! trips, header writes). Nothing here runs on a reactor. The lead wires concrete methods
//! (namespaces, rekey, KMS status, stats) through [`RpcServerBuilder::method`].
//!
//! * [`config`] — the `rpc:` config section and the uid/gid → role mapping.
//! * [`error`] — JSON-RPC error codes and [`RpcError`].
//! * [`frame`] — newline-delimited framing with a size cap and a deadline.
//! * [`dispatch`] — request validation, the method registry, role checks, auditing.
//! * [`server`] — the socket, the accept loop, connection threads, shutdown.
//! * [`client`] — [`client::call`] and the CLI helper [`client::cli_main`].
//!
//! Wire rules (docs/rpc.md): one JSON value per line; responses never contain key material;
//! params of crypto-role methods are never logged, only a redacted summary.

pub mod client;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod frame;
pub mod server;

use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::Value;

pub use config::{RoleMap, RoleMembers, RpcConfig, RpcConfigError, SocketMode};
pub use dispatch::{Handler, MethodInfo, Registry};
pub use error::RpcError;
pub use server::{RpcHandle, RpcServer, RpcServerBuilder, ServeError};

/// The privilege a method requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Read-only calls: lists, status, stats, health.
    Viewer,
    /// Changes that involve no key: plaintext namespaces, subsystems, listeners.
    Admin,
    /// Key operations: encrypted namespaces, rekey, KMS changes, any key export. Audited.
    Crypto,
}

impl Role {
    /// All roles, lowest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Admin, Role::Crypto];

    /// The name used in config, errors and `rpc.methods`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Admin => "admin",
            Role::Crypto => "crypto",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Role::Viewer => 1,
            Role::Admin => 2,
            Role::Crypto => 4,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The set of roles one caller holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RoleSet(u8);

impl RoleSet {
    /// No role: every method is refused.
    pub const EMPTY: RoleSet = RoleSet(0);
    /// Every role (uid 0 by default).
    pub const ALL: RoleSet = RoleSet(7);

    /// This set plus `role`.
    pub fn with(self, role: Role) -> RoleSet {
        RoleSet(self.0 | role.bit())
    }

    /// Whether `role` is held.
    pub fn contains(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }

    /// Role names, for `health`/logging.
    pub fn names(self) -> Vec<&'static str> {
        Role::ALL
            .iter()
            .filter(|r| self.contains(**r))
            .map(|r| r.name())
            .collect()
    }
}

/// Who is calling, from SO_PEERCRED at accept time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// Effective uid of the peer when it connected.
    pub uid: u32,
    /// Effective (primary) gid of the peer when it connected.
    pub gid: u32,
    /// Peer pid when it connected (for the audit trail; pids are reused, never authorize on it).
    pub pid: i32,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid={} gid={} pid={}", self.uid, self.gid, self.pid)
    }
}

/// What a handler knows about the call.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The peer.
    pub caller: Caller,
    /// The roles the peer holds (the method's own role has already been checked).
    pub roles: RoleSet,
    /// The method name as called.
    pub method: String,
    /// What the handler wants its audit record to name (admin and crypto methods are audited).
    pub audit: crate::audit::AuditNote,
}

/// Decodes `params` into `T`, mapping failures to -32602 with the offending path in the
/// message. Absent params decode as `null`, so a params struct with all-default fields works.
pub fn parse_params<T: DeserializeOwned>(params: &Value) -> Result<T, RpcError> {
    serde_path_to_error::deserialize(params).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            RpcError::invalid_params(inner.to_string())
        } else {
            RpcError::invalid_params(format!("{path}: {inner}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct P {
        nsid: u32,
        name: String,
    }

    #[test]
    fn parse_params_names_the_path() {
        let e = parse_params::<P>(&json!({"nsid": "x", "name": "a"})).unwrap_err();
        assert_eq!(e.code, error::INVALID_PARAMS);
        assert!(e.message.contains("nsid"), "{}", e.message);
        let e = parse_params::<P>(&json!([1])).unwrap_err();
        assert_eq!(e.code, error::INVALID_PARAMS);
        assert!(parse_params::<P>(&json!({"nsid": 1, "name": "a"})).is_ok());
    }

    #[test]
    fn role_set() {
        let s = RoleSet::EMPTY.with(Role::Crypto);
        assert!(s.contains(Role::Crypto) && !s.contains(Role::Viewer));
        assert_eq!(RoleSet::ALL.names(), vec!["viewer", "admin", "crypto"]);
    }
}
