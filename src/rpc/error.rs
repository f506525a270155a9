//! JSON-RPC error objects: the five codes of the JSON-RPC 2.0 specification and nvseal's
//! application codes, with constructors that keep messages uniform across handlers.
//!
//! Runs wherever a handler runs (an RPC connection thread). Exists so every refusal a client
//! sees is a proper `{"code", "message", "data"}` object with a stable code scripts can test.

use serde::Serialize;
use serde_json::{json, Value};

use super::Role;

/// Invalid JSON was received (JSON-RPC 2.0 §5.1).
pub const PARSE_ERROR: i32 = -32700;
/// The JSON sent is not a valid request object.
pub const INVALID_REQUEST: i32 = -32600;
/// The method does not exist.
pub const METHOD_NOT_FOUND: i32 = -32601;
/// Invalid method parameters.
pub const INVALID_PARAMS: i32 = -32602;
/// Internal error of the server or of a handler.
pub const INTERNAL_ERROR: i32 = -32603;
/// The caller's uid/gid does not hold the role the method needs.
pub const PERMISSION_DENIED: i32 = -32001;
/// The object named in the params (namespace, subsystem, KMS cluster, ...) does not exist.
pub const NOT_FOUND: i32 = -32002;
/// Busy or conflicting: too many connections, an operation already running, an object that
/// already exists.
pub const BUSY: i32 = -32003;
/// Temporarily unavailable: the KMS is unreachable, the namespace is locked, the server is
/// shutting down.
pub const UNAVAILABLE: i32 = -32004;

/// One JSON-RPC error object as sent on the wire.
///
/// Handlers must never put key material in `message` or `data` (see docs/rpc.md, "Secrets").
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RpcError {
    /// One of the constants of this module.
    pub code: i32,
    /// One sentence for a human.
    pub message: String,
    /// Structured detail for scripts; omitted when `None`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    /// An error with any code.
    pub fn new(code: i32, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }

    /// Adds structured detail.
    pub fn with_data(mut self, data: Value) -> RpcError {
        self.data = Some(data);
        self
    }

    /// -32700: the request line is not JSON; `detail` is the parser's message.
    pub fn parse_error(detail: impl Into<String>) -> RpcError {
        RpcError::new(PARSE_ERROR, "parse error: request is not valid JSON")
            .with_data(json!({ "detail": detail.into() }))
    }

    /// -32600: the JSON is not a valid request object.
    pub fn invalid_request(detail: impl Into<String>) -> RpcError {
        let detail = detail.into();
        RpcError::new(INVALID_REQUEST, format!("invalid request: {detail}"))
            .with_data(json!({ "detail": detail }))
    }

    /// -32601.
    pub fn method_not_found(method: &str) -> RpcError {
        RpcError::new(METHOD_NOT_FOUND, format!("method not found: {method}"))
            .with_data(json!({ "method": method, "hint": "call rpc.methods for the list" }))
    }

    /// -32602: `detail` says which parameter and why.
    pub fn invalid_params(detail: impl Into<String>) -> RpcError {
        let detail = detail.into();
        RpcError::new(INVALID_PARAMS, format!("invalid params: {detail}"))
            .with_data(json!({ "detail": detail }))
    }

    /// -32603. The message reaches the client: keep internals (and secrets) out of it.
    pub fn internal(detail: impl Into<String>) -> RpcError {
        let detail = detail.into();
        RpcError::new(INTERNAL_ERROR, format!("internal error: {detail}"))
    }

    /// -32001: names the method, the role it needs and the caller's uid.
    pub fn permission_denied(method: &str, needed: Role, uid: u32, gid: u32) -> RpcError {
        RpcError::new(
            PERMISSION_DENIED,
            format!(
                "permission denied: {method} needs the {} role; uid {uid} (gid {gid}) does not \
                 hold it",
                needed.name()
            ),
        )
        .with_data(json!({
            "method": method,
            "required_role": needed.name(),
            "uid": uid,
            "gid": gid,
        }))
    }

    /// -32002: `kind` is what was looked up ("namespace"), `name` its identifier.
    pub fn not_found(kind: &str, name: &str) -> RpcError {
        RpcError::new(NOT_FOUND, format!("{kind} not found: {name}"))
            .with_data(json!({ "kind": kind, "name": name }))
    }

    /// -32003: busy or conflicting state.
    pub fn busy(detail: impl Into<String>) -> RpcError {
        let detail = detail.into();
        RpcError::new(BUSY, format!("busy: {detail}"))
    }

    /// -32004: temporarily unavailable.
    pub fn unavailable(detail: impl Into<String>) -> RpcError {
        let detail = detail.into();
        RpcError::new(UNAVAILABLE, format!("unavailable: {detail}"))
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for RpcError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_denied_names_role_and_uid() {
        let e = RpcError::permission_denied("keys.rekey", Role::Crypto, 65534, 65534);
        assert_eq!(e.code, PERMISSION_DENIED);
        assert!(e.message.contains("crypto role"), "{}", e.message);
        assert!(e.message.contains("uid 65534"), "{}", e.message);
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["data"]["required_role"], "crypto");
        assert_eq!(v["data"]["uid"], 65534);
    }

    #[test]
    fn data_is_omitted_when_absent() {
        let v = serde_json::to_value(RpcError::internal("x")).unwrap();
        assert!(v.get("data").is_none());
        assert_eq!(v["code"], INTERNAL_ERROR);
    }
}
