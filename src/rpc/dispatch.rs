//! Request validation and dispatch: turns one request line into at most one response line.
//!
//! Runs on the RPC connection thread that read the line. Socket-free, so it is unit-tested
//! and fuzzed directly. Owns the method registry, the role check, the built-in methods
//! (`rpc.methods`, `health`, `version`) and the audit records of admin- and crypto-role calls
//! (every call that may change something, whether it succeeds or is refused).

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Map, Value};

use super::error::RpcError;
use super::{CallContext, Caller, Role, RoleSet};
use crate::audit::{summarize_params, AuditSink};

/// A method body: gets the call context and the params (`null` when absent), returns the
/// result or an error. Runs on a connection thread and may block.
pub type Handler = dyn Fn(&CallContext, &Value) -> Result<Value, RpcError> + Send + Sync;

/// One entry of `rpc.methods`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodInfo {
    /// Method name.
    pub name: String,
    /// Role the caller must hold.
    pub role: Role,
}

struct Entry {
    role: Role,
    handler: Arc<Handler>,
}

/// Names the JSON-RPC spec reserves for the server itself.
const RESERVED_PREFIX: &str = "rpc.";
/// Longest method name accepted at registration.
const METHOD_NAME_MAX_CHARS: usize = 128;

/// The methods a server answers.
#[derive(Default)]
pub struct Registry {
    methods: BTreeMap<String, Entry>,
}

impl Registry {
    /// Adds a method. Refuses empty or over-long names, names with spaces or control
    /// characters, the reserved `rpc.` prefix, and duplicates.
    pub fn insert(&mut self, name: &str, role: Role, handler: Arc<Handler>) -> Result<(), String> {
        Self::check_name(name)?;
        if name.starts_with(RESERVED_PREFIX) {
            return Err(format!("method name {name:?}: the rpc. prefix is reserved"));
        }
        self.insert_unchecked(name, role, handler)
    }

    fn check_name(name: &str) -> Result<(), String> {
        if name.is_empty() || name.len() > METHOD_NAME_MAX_CHARS {
            return Err(format!(
                "method name {name:?}: must be 1..={METHOD_NAME_MAX_CHARS} bytes"
            ));
        }
        if !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "method name {name:?}: only printable ASCII without spaces"
            ));
        }
        Ok(())
    }

    fn insert_unchecked(
        &mut self,
        name: &str,
        role: Role,
        handler: Arc<Handler>,
    ) -> Result<(), String> {
        if self.methods.contains_key(name) {
            return Err(format!("method {name:?} registered twice"));
        }
        self.methods
            .insert(name.to_string(), Entry { role, handler });
        Ok(())
    }

    /// Every method with its role, sorted by name.
    pub fn list(&self) -> Vec<MethodInfo> {
        self.methods
            .iter()
            .map(|(name, e)| MethodInfo {
                name: name.clone(),
                role: e.role,
            })
            .collect()
    }
}

/// Counters the server keeps and `health` reports.
#[derive(Debug, Default)]
pub struct ServerCounters {
    /// Connections being served now.
    pub active_connections: AtomicU64,
    /// Connections accepted since start.
    pub accepted_total: AtomicU64,
    /// Connections answered "busy" and closed because `max_connections` were open.
    pub refused_busy_total: AtomicU64,
    /// Requests dispatched (batch members count one each).
    pub requests_total: AtomicU64,
}

/// Validates and runs requests against a [`Registry`].
pub struct Dispatcher {
    registry: Registry,
    audit: Option<Arc<dyn AuditSink>>,
    max_batch_len: usize,
    counters: Arc<ServerCounters>,
}

/// What the server says about itself in `version`.
pub fn version_info() -> Value {
    json!({
        "name": "nvseal",
        "version": env!("CARGO_PKG_VERSION"),
        "jsonrpc": "2.0",
        "framing": "newline-delimited JSON",
    })
}

impl Dispatcher {
    /// Builds the dispatcher: adds `rpc.methods`, `version`, and `health` (the default body
    /// reports uptime and connection counters unless `health` is given).
    pub fn new(
        mut registry: Registry,
        health: Option<Arc<Handler>>,
        audit: Option<Arc<dyn AuditSink>>,
        max_batch_len: usize,
        counters: Arc<ServerCounters>,
    ) -> Result<Dispatcher, String> {
        let started = Instant::now();
        let health = health.unwrap_or_else(|| {
            let c = Arc::clone(&counters);
            Arc::new(move |ctx: &CallContext, _p: &Value| {
                Ok(json!({
                    "status": "ok",
                    "uptime_s": started.elapsed().as_secs(),
                    "connections": {
                        "active": c.active_connections.load(Ordering::Relaxed),
                        "accepted_total": c.accepted_total.load(Ordering::Relaxed),
                        "refused_busy_total": c.refused_busy_total.load(Ordering::Relaxed),
                    },
                    "requests_total": c.requests_total.load(Ordering::Relaxed),
                    "caller": { "uid": ctx.caller.uid, "gid": ctx.caller.gid,
                                "roles": ctx.roles.names() },
                }))
            })
        });
        registry.insert_unchecked("health", Role::Viewer, health)?;
        registry.insert_unchecked(
            "version",
            Role::Viewer,
            Arc::new(|_: &CallContext, _: &Value| Ok(version_info())),
        )?;
        // rpc.methods lists itself too, so compute the list with a placeholder name first.
        let mut listing: Vec<Value> = registry
            .list()
            .into_iter()
            .map(|m| json!({ "name": m.name, "role": m.role.name() }))
            .collect();
        listing.push(json!({ "name": "rpc.methods", "role": "viewer" }));
        listing.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let listing = Value::Array(listing);
        registry.insert_unchecked(
            "rpc.methods",
            Role::Viewer,
            Arc::new(move |_: &CallContext, _: &Value| Ok(json!({ "methods": listing.clone() }))),
        )?;
        Ok(Dispatcher {
            registry,
            audit,
            max_batch_len,
            counters,
        })
    }

    /// The registry, for listing.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Handles one request line (a single request or a batch). Returns the response line
    /// without its newline, or `None` when nothing is to be sent (only notifications).
    pub fn handle_line(&self, caller: Caller, roles: RoleSet, line: &[u8]) -> Option<String> {
        let value: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                return Some(error_response(
                    Value::Null,
                    RpcError::parse_error(e.to_string()),
                ))
            }
        };
        match value {
            Value::Array(items) if items.is_empty() => Some(error_response(
                Value::Null,
                RpcError::invalid_request("empty batch"),
            )),
            Value::Array(items) if items.len() > self.max_batch_len => Some(error_response(
                Value::Null,
                RpcError::invalid_request(format!(
                    "batch of {} requests exceeds max_batch_len {}",
                    items.len(),
                    self.max_batch_len
                )),
            )),
            Value::Array(items) => {
                let responses: Vec<Value> = items
                    .into_iter()
                    .filter_map(|r| self.handle_one(caller, roles, r))
                    .collect();
                if responses.is_empty() {
                    None
                } else {
                    Some(Value::Array(responses).to_string())
                }
            }
            single => self
                .handle_one(caller, roles, single)
                .map(|v| v.to_string()),
        }
    }

    /// Handles one request object; `None` for a notification.
    fn handle_one(&self, caller: Caller, roles: RoleSet, request: Value) -> Option<Value> {
        self.counters.requests_total.fetch_add(1, Ordering::Relaxed);
        let Value::Object(mut obj) = request else {
            return Some(error_value(
                Value::Null,
                RpcError::invalid_request("a request must be a JSON object"),
            ));
        };
        // The id first, so later errors can echo it.
        let id = match obj.remove("id") {
            None => None,
            Some(id @ (Value::String(_) | Value::Number(_) | Value::Null)) => Some(id),
            Some(_) => {
                return Some(error_value(
                    Value::Null,
                    RpcError::invalid_request("id must be a string, a number or null"),
                ))
            }
        };
        let reply = |err: RpcError| Some(error_value(id.clone().unwrap_or(Value::Null), err));
        match obj.remove("jsonrpc") {
            Some(Value::String(v)) if v == "2.0" => {}
            _ => return reply(RpcError::invalid_request("jsonrpc must be \"2.0\"")),
        }
        let method = match obj.remove("method") {
            Some(Value::String(m)) => m,
            Some(_) => return reply(RpcError::invalid_request("method must be a string")),
            None => return reply(RpcError::invalid_request("method is missing")),
        };
        let params = match obj.remove("params") {
            None => Value::Null,
            Some(p @ (Value::Object(_) | Value::Array(_))) => p,
            Some(_) => {
                return reply(RpcError::invalid_request(
                    "params must be an object or an array",
                ))
            }
        };
        if let Some(extra) = obj.keys().next() {
            return reply(RpcError::invalid_request(format!(
                "unknown member {extra:?}"
            )));
        }
        let result = self.call(caller, roles, &method, &params);
        let id = id?; // a notification gets no response, even on error
        Some(match result {
            Ok(v) => {
                let mut m = Map::new();
                m.insert("jsonrpc".into(), Value::from("2.0"));
                m.insert("result".into(), v);
                m.insert("id".into(), id);
                Value::Object(m)
            }
            Err(e) => error_value(id, e),
        })
    }

    /// Looks the method up, checks the role, runs the handler, audits crypto calls.
    fn call(
        &self,
        caller: Caller,
        roles: RoleSet,
        method: &str,
        params: &Value,
    ) -> Result<Value, RpcError> {
        let Some(entry) = self.registry.methods.get(method) else {
            tracing::debug!(%caller, method = %method.escape_debug(), "rpc: method not found");
            return Err(RpcError::method_not_found(method));
        };
        // Everything that may change state is audited (DESIGN: "every mutating call is
        // audited"), including refusals; read-only calls are not.
        let audited = entry.role != Role::Viewer;
        let note = crate::audit::AuditNote::default();
        let result = if !roles.contains(entry.role) {
            Err(RpcError::permission_denied(
                method, entry.role, caller.uid, caller.gid,
            ))
        } else {
            let ctx = CallContext {
                caller,
                roles,
                method: method.to_string(),
                audit: note.clone(),
            };
            let handler = &entry.handler;
            match catch_unwind(AssertUnwindSafe(|| handler(&ctx, params))) {
                Ok(r) => r,
                Err(_) => {
                    tracing::error!(%caller, method, "rpc: handler panicked");
                    Err(RpcError::internal(format!(
                        "the {method} handler failed unexpectedly"
                    )))
                }
            }
        };
        // Read-only calls (monitoring polls health every few seconds) log at debug; calls
        // that change something log at info.
        match (&result, entry.role) {
            (Ok(_), Role::Viewer) => tracing::debug!(%caller, method, "rpc call ok"),
            (Ok(_), _) => tracing::info!(%caller, method, "rpc call ok"),
            (Err(e), Role::Viewer) => {
                tracing::debug!(%caller, method, code = e.code, "rpc call failed")
            }
            (Err(e), _) => {
                tracing::info!(%caller, method, code = e.code, error = %e.message, "rpc call failed")
            }
        }
        if audited {
            let outcome = match &result {
                Ok(_) => "ok".to_string(),
                Err(e) => format!("error {}: {}", e.code, e.message),
            };
            let target = note.get().unwrap_or_else(|| summarize_params(params));
            match &self.audit {
                Some(sink) => sink.record(&caller.to_string(), method, &target, &outcome),
                // Without a sink (no audit_log: crypto methods are then refused at build
                // time), admin calls are still recorded, in the log.
                None => tracing::warn!(target: "nvseal::audit", who = %caller, op = method,
                    %target, result = %outcome, "audit record (no audit sink configured)"),
            }
        }
        result
    }
}

/// A complete error response object.
pub fn error_value(id: Value, err: RpcError) -> Value {
    let mut m = Map::new();
    m.insert("jsonrpc".into(), Value::from("2.0"));
    m.insert(
        "error".into(),
        serde_json::to_value(err).unwrap_or(Value::Null),
    );
    m.insert("id".into(), id);
    Value::Object(m)
}

/// A complete error response line (no newline).
pub fn error_response(id: Value, err: RpcError) -> String {
    error_value(id, err).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::error::*;

    struct VecSink(std::sync::Mutex<Vec<String>>);
    impl AuditSink for VecSink {
        fn record(&self, who: &str, op: &str, target: &str, result: &str) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{who}|{op}|{target}|{result}"));
        }
    }

    fn dispatcher(sink: Arc<VecSink>) -> Dispatcher {
        let mut r = Registry::default();
        r.insert(
            "echo",
            Role::Viewer,
            Arc::new(|_: &CallContext, p: &Value| Ok(p.clone())),
        )
        .unwrap();
        r.insert(
            "ns.delete",
            Role::Admin,
            Arc::new(|_: &CallContext, _: &Value| Ok(json!(true))),
        )
        .unwrap();
        r.insert(
            "keys.rekey",
            Role::Crypto,
            Arc::new(|_: &CallContext, _: &Value| Ok(json!({"generation": 2}))),
        )
        .unwrap();
        r.insert(
            "boom",
            Role::Viewer,
            Arc::new(|_: &CallContext, _: &Value| panic!("handler bug")),
        )
        .unwrap();
        Dispatcher::new(r, None, Some(sink), 4, Arc::new(ServerCounters::default())).unwrap()
    }

    const ROOT: Caller = Caller {
        uid: 0,
        gid: 0,
        pid: 1,
    };

    fn call(d: &Dispatcher, roles: RoleSet, line: &str) -> Value {
        serde_json::from_str(
            &d.handle_line(ROOT, roles, line.as_bytes())
                .expect("a response"),
        )
        .unwrap()
    }

    fn code(v: &Value) -> i64 {
        v["error"]["code"].as_i64().unwrap_or(0)
    }

    #[test]
    fn success_echoes_id_and_result() {
        let d = dispatcher(Arc::new(VecSink(Default::default())));
        let v = call(
            &d,
            RoleSet::ALL,
            r#"{"jsonrpc":"2.0","method":"echo","params":[1,"a"],"id":"x7"}"#,
        );
        assert_eq!(v, json!({"jsonrpc":"2.0","result":[1,"a"],"id":"x7"}));
    }

    #[test]
    fn malformed_requests_get_the_right_codes() {
        let d = dispatcher(Arc::new(VecSink(Default::default())));
        let cases: &[(&str, i32)] = &[
            ("not json", PARSE_ERROR),
            ("{\"jsonrpc\":\"2.0\",", PARSE_ERROR),
            ("\u{0}\u{1}", PARSE_ERROR),
            ("42", INVALID_REQUEST),
            ("\"str\"", INVALID_REQUEST),
            ("[]", INVALID_REQUEST),
            (r#"{"method":"echo","id":1}"#, INVALID_REQUEST),
            (
                r#"{"jsonrpc":"1.0","method":"echo","id":1}"#,
                INVALID_REQUEST,
            ),
            (r#"{"jsonrpc":"2.0","method":7,"id":1}"#, INVALID_REQUEST),
            (r#"{"jsonrpc":"2.0","id":1}"#, INVALID_REQUEST),
            (
                r#"{"jsonrpc":"2.0","method":"echo","params":3,"id":1}"#,
                INVALID_REQUEST,
            ),
            (
                r#"{"jsonrpc":"2.0","method":"echo","id":{"a":1}}"#,
                INVALID_REQUEST,
            ),
            (
                r#"{"jsonrpc":"2.0","method":"echo","id":1,"extra":true}"#,
                INVALID_REQUEST,
            ),
            (
                r#"{"jsonrpc":"2.0","method":"nope","id":1}"#,
                METHOD_NOT_FOUND,
            ),
            (r#"[1,2,3,4,5]"#, INVALID_REQUEST),
        ];
        for (line, want) in cases {
            let v = call(&d, RoleSet::ALL, line);
            assert_eq!(code(&v), i64::from(*want), "{line} -> {v}");
            assert_eq!(v["jsonrpc"], "2.0");
        }
        let deep = "[".repeat(100_000);
        assert_eq!(code(&call(&d, RoleSet::ALL, &deep)), i64::from(PARSE_ERROR));
        let deep_obj = format!("{}1{}", "{\"a\":".repeat(5000), "}".repeat(5000));
        assert_eq!(
            code(&call(&d, RoleSet::ALL, &deep_obj)),
            i64::from(PARSE_ERROR)
        );
    }

    #[test]
    fn batch_mixes_results_errors_and_notifications() {
        let d = dispatcher(Arc::new(VecSink(Default::default())));
        let v = call(
            &d,
            RoleSet::ALL,
            r#"[{"jsonrpc":"2.0","method":"echo","params":{"a":1},"id":1},
                {"jsonrpc":"2.0","method":"echo","params":{}},
                {"jsonrpc":"2.0","method":"nope","id":2},
                7]"#,
        );
        let arr = v.as_array().unwrap();
        assert_eq!(arr.len(), 3);
        assert_eq!(arr[0]["result"], json!({"a":1}));
        assert_eq!(code(&arr[1]), i64::from(METHOD_NOT_FOUND));
        assert_eq!(code(&arr[2]), i64::from(INVALID_REQUEST));
        let only_notes = r#"[{"jsonrpc":"2.0","method":"echo"},{"jsonrpc":"2.0","method":"nope"}]"#;
        assert!(d
            .handle_line(ROOT, RoleSet::ALL, only_notes.as_bytes())
            .is_none());
    }

    #[test]
    fn roles_are_enforced_and_crypto_calls_audited() {
        let sink = Arc::new(VecSink(Default::default()));
        let d = dispatcher(Arc::clone(&sink));
        let viewer = RoleSet::EMPTY.with(Role::Viewer);
        let v = call(
            &d,
            viewer,
            r#"{"jsonrpc":"2.0","method":"keys.rekey","params":{"nsid":1,"kek":"00112233445566778899aabbccddeeff"},"id":1}"#,
        );
        assert_eq!(code(&v), i64::from(PERMISSION_DENIED));
        assert_eq!(v["error"]["data"]["required_role"], "crypto");
        let v = call(
            &d,
            viewer,
            r#"{"jsonrpc":"2.0","method":"ns.delete","id":2}"#,
        );
        assert_eq!(v["error"]["data"]["required_role"], "admin");
        let v = call(
            &d,
            RoleSet::EMPTY,
            r#"{"jsonrpc":"2.0","method":"health","id":3}"#,
        );
        assert_eq!(code(&v), i64::from(PERMISSION_DENIED));
        let v = call(
            &d,
            RoleSet::ALL,
            r#"{"jsonrpc":"2.0","method":"keys.rekey","params":{"nsid":1},"id":4}"#,
        );
        assert_eq!(v["result"]["generation"], 2);
        let records = sink.0.lock().unwrap().clone();
        assert_eq!(records.len(), 3, "{records:?}");
        assert!(
            records[0]
                .starts_with("uid=0 gid=0 pid=1|keys.rekey|kek=<redacted> nsid=1|error -32001"),
            "{}",
            records[0]
        );
        assert!(!records[0].contains("00112233445566778899aabbccddeeff"));
        // Admin calls are changes too: the refusal is recorded; viewer calls are not.
        assert!(
            records[1].starts_with("uid=0 gid=0 pid=1|ns.delete||error -32001"),
            "{}",
            records[1]
        );
        assert_eq!(records[2], "uid=0 gid=0 pid=1|keys.rekey|nsid=1|ok");
    }

    #[test]
    fn admin_calls_are_audited_with_the_handlers_note() {
        let sink = Arc::new(VecSink(Default::default()));
        let mut r = Registry::default();
        r.insert(
            "namespace.create",
            Role::Admin,
            Arc::new(|ctx: &CallContext, _: &Value| {
                ctx.audit.set("nqn.x nsid 2 bdevs mem1=malloc(4096)");
                Err(RpcError::invalid_params("bdevs[0].size_bytes: over budget"))
            }),
        )
        .unwrap();
        r.insert(
            "namespace.delete",
            Role::Admin,
            Arc::new(|_: &CallContext, _: &Value| Ok(json!({"freed": true}))),
        )
        .unwrap();
        let d = Dispatcher::new(r, None, Some(sink.clone()), 4, Arc::default()).unwrap();
        let admin = RoleSet::EMPTY.with(Role::Admin).with(Role::Viewer);
        call(
            &d,
            admin,
            r#"{"jsonrpc":"2.0","method":"namespace.create","params":{"bdevs":[{"a":1}]},"id":1}"#,
        );
        call(
            &d,
            admin,
            r#"{"jsonrpc":"2.0","method":"namespace.delete","params":{"nsid":2},"id":2}"#,
        );
        call(
            &d,
            RoleSet::EMPTY.with(Role::Viewer),
            r#"{"jsonrpc":"2.0","method":"namespace.delete","params":{"nsid":3},"id":3}"#,
        );
        call(&d, admin, r#"{"jsonrpc":"2.0","method":"health","id":4}"#);
        let records = sink.0.lock().unwrap().clone();
        assert_eq!(
            records,
            [
                "uid=0 gid=0 pid=1|namespace.create|nqn.x nsid 2 bdevs mem1=malloc(4096)|error -32602: invalid params: bdevs[0].size_bytes: over budget",
                "uid=0 gid=0 pid=1|namespace.delete|nsid=2|ok",
                "uid=0 gid=0 pid=1|namespace.delete|nsid=3|error -32001: permission denied: namespace.delete needs the admin role; uid 0 (gid 0) does not hold it",
            ]
        );
    }

    #[test]
    fn panicking_handler_is_an_internal_error() {
        let d = dispatcher(Arc::new(VecSink(Default::default())));
        let v = call(
            &d,
            RoleSet::ALL,
            r#"{"jsonrpc":"2.0","method":"boom","id":1}"#,
        );
        assert_eq!(code(&v), i64::from(INTERNAL_ERROR));
        let v = call(
            &d,
            RoleSet::ALL,
            r#"{"jsonrpc":"2.0","method":"echo","params":[1],"id":2}"#,
        );
        assert_eq!(v["result"], json!([1]));
    }

    /// Mutated requests (bytes flipped, cut, inserted, spliced) never panic the dispatcher,
    /// and every answer is a JSON-RPC 2.0 response (or a batch of them).
    #[test]
    fn mutated_requests_always_get_wellformed_answers() {
        let d = dispatcher(Arc::new(VecSink(Default::default())));
        let seeds: [&[u8]; 4] = [
            br#"{"jsonrpc":"2.0","method":"echo","params":{"a":[1,2,{"b":null}]},"id":7}"#,
            br#"[{"jsonrpc":"2.0","method":"keys.rekey","id":"x"},{"jsonrpc":"2.0","method":"health"}]"#,
            br#"{"jsonrpc":"2.0","method":"ns.delete","params":[1e400,-0,"\ud800"],"id":null}"#,
            br#"{"jsonrpc":"2.0","method":"rpc.methods","id":18446744073709551616}"#,
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let check = |v: &Value| {
            assert_eq!(v["jsonrpc"], "2.0", "{v}");
            assert!(v.get("id").is_some(), "{v}");
            assert!(v.get("result").is_some() != v.get("error").is_some(), "{v}");
        };
        for i in 0..3000 {
            let seed = seeds[i % seeds.len()];
            let mut req = seed.to_vec();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % req.len().max(1);
                match next() % 4 {
                    0 if !req.is_empty() => req[at] = next() as u8,
                    1 => req.truncate(at),
                    2 => req.insert(at.min(req.len()), b"{}[]\\\":,0"[(next() % 9) as usize]),
                    _ => {
                        let other = seeds[(next() as usize) % seeds.len()];
                        let cut = (next() as usize) % other.len();
                        req.extend_from_slice(&other[cut..]);
                    }
                }
            }
            if let Some(line) = d.handle_line(ROOT, RoleSet::ALL, &req) {
                let v: Value = serde_json::from_str(&line).expect("answer is JSON");
                match &v {
                    Value::Array(items) => items.iter().for_each(check),
                    single => check(single),
                }
            }
        }
    }

    #[test]
    fn builtins_and_registration_rules() {
        let d = dispatcher(Arc::new(VecSink(Default::default())));
        let v = call(
            &d,
            RoleSet::EMPTY.with(Role::Viewer),
            r#"{"jsonrpc":"2.0","method":"rpc.methods","id":1}"#,
        );
        let names: Vec<&str> = v["result"]["methods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "boom",
                "echo",
                "health",
                "keys.rekey",
                "ns.delete",
                "rpc.methods",
                "version"
            ]
        );
        let v = call(
            &d,
            RoleSet::ALL,
            r#"{"jsonrpc":"2.0","method":"version","id":1}"#,
        );
        assert_eq!(v["result"]["version"], env!("CARGO_PKG_VERSION"));
        let mut r = Registry::default();
        let h: Arc<Handler> = Arc::new(|_: &CallContext, _: &Value| Ok(Value::Null));
        assert!(r.insert("rpc.x", Role::Viewer, Arc::clone(&h)).is_err());
        assert!(r.insert("", Role::Viewer, Arc::clone(&h)).is_err());
        assert!(r.insert("a b", Role::Viewer, Arc::clone(&h)).is_err());
        r.insert("a", Role::Viewer, Arc::clone(&h)).unwrap();
        assert!(r.insert("a", Role::Admin, Arc::clone(&h)).is_err());
        r.insert("health", Role::Viewer, Arc::clone(&h)).unwrap();
        assert!(Dispatcher::new(r, None, None, 4, Arc::default()).is_err());
    }
}
