//! The audit trail of changes: every call of an admin- or crypto-role method (allowed or
//! refused, whatever the reason) becomes one record saying who (uid/gid/pid), what (method and
//! a redacted summary of its params, or the handler's own [`AuditNote`]), when, and the result.
//!
//! Records are written by the RPC connection thread that served the call, after the handler
//! returns. [`JsonlAuditSink`] appends one JSON object per line to a file and syncs it, so a
//! crash cannot lose an acknowledged operation's record.
//!
//! It is its own module, below both the control socket (`rpc`, which records every call) and
//! key management (`keys`, which takes an [`AuditSink`] for the operations it runs itself), so
//! neither depends on the other for it. It uses only [`crate::leak`] to redact.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::leak::{looks_like_secret_name, looks_like_secret_value};

/// What a handler adds to the audit record of its own call: what it acted on, in its own
/// words (`nqn.x nsid 3 bdevs ram1=malloc(...)`), when the redacted params summary would say
/// too little (nested params show only as `<array:N>`). Never a secret. Shared by the clones
/// of one RPC call's context (`rpc::CallContext`); the RPC dispatcher reads it after the handler returns.
#[derive(Debug, Clone, Default)]
pub struct AuditNote(std::sync::Arc<Mutex<Option<String>>>);

impl AuditNote {
    /// Sets (replaces) the note.
    pub fn set(&self, target: impl Into<String>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(target.into());
    }

    /// The note, if the handler set one.
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Where audit records go.
pub trait AuditSink: Send + Sync {
    /// Records one operation. `who` identifies the caller, `op` the operation (method name),
    /// `target` what it acted on (a redacted summary, never a secret), `result` the outcome.
    /// A sink that cannot write logs the failure itself; the operation already happened.
    fn record(&self, who: &str, op: &str, target: &str, result: &str);
}

/// Appends JSON lines `{"ts", "ts_unix_ms", "who", "op", "target", "result"}` to a file
/// created with mode 0600.
pub struct JsonlAuditSink {
    path: PathBuf,
    file: Mutex<File>,
}

impl JsonlAuditSink {
    /// Opens (creating if needed) `path` for appending.
    pub fn open(path: &Path) -> io::Result<JsonlAuditSink> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(JsonlAuditSink {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AuditSink for JsonlAuditSink {
    fn record(&self, who: &str, op: &str, target: &str, result: &str) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let record = json!({
            "ts": rfc3339_utc(now.as_secs(), now.subsec_millis()),
            "ts_unix_ms": u64::try_from(now.as_millis()).unwrap_or(u64::MAX),
            "who": who,
            "op": op,
            "target": target,
            "result": result,
        });
        let mut line = record.to_string();
        line.push('\n');
        // A poisoned lock only means another writer panicked mid-record; the file is still
        // append-only and usable.
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let written = file
            .write_all(line.as_bytes())
            .and_then(|()| file.sync_data());
        if let Err(e) = written {
            tracing::error!(path = %self.path.display(), error = %e, op, who,
                "could not write audit record");
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for a Unix time (proleptic Gregorian, days-from-civil inverse).
pub fn rfc3339_utc(secs: u64, millis: u32) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Shift the epoch to 0000-03-01 so leap days fall at the end of a 400-year era.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
}

/// Longest string value shown in a summary.
const SUMMARY_STRING_MAX_CHARS: usize = 96;

/// A one-line summary of call params that is safe to log and audit: numbers, booleans and
/// short non-secret strings of the top level are shown; values under secret-looking names
/// (`*key*`, `*password*`, `*secret*`, `*pem*`, `*token*`, ...), secret-looking strings (long
/// hex or base64) and nested values are replaced by their type and size.
pub fn summarize_params(params: &Value) -> String {
    match params {
        Value::Null => String::new(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k}={}", summarize_value(looks_like_secret_name(k), v)))
            .collect::<Vec<_>>()
            .join(" "),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| format!("[{i}]={}", summarize_value(false, v)))
            .collect::<Vec<_>>()
            .join(" "),
        other => summarize_value(false, other),
    }
}

fn summarize_value(secret_name: bool, v: &Value) -> String {
    if secret_name {
        return "<redacted>".into();
    }
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) if looks_like_secret_value(s) => "<redacted>".into(),
        Value::String(s) if s.chars().count() > SUMMARY_STRING_MAX_CHARS => {
            format!("<string:{} bytes>", s.len())
        }
        // Debug formatting quotes and escapes, so a value cannot forge extra fields.
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!("<array:{}>", a.len()),
        Value::Object(o) => format!("<object:{} keys>", o.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339_utc(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(rfc3339_utc(1_798_761_599, 999), "2026-12-31T23:59:59.999Z");
    }

    #[test]
    fn summary_hides_secrets() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let p = serde_json::json!({
            "nsid": 3,
            "subsystem": "nqn.2026-01.io.nvseal:s1",
            "dek": hex,
            "passphrase": "hunter2hunter2",
            "comment": hex,
            "servers": ["a", "b"],
        });
        let s = summarize_params(&p);
        assert!(!s.contains(hex), "{s}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("nsid=3"), "{s}");
        assert!(s.contains("subsystem=\"nqn.2026-01.io.nvseal:s1\""), "{s}");
        assert!(s.contains("servers=<array:2>"), "{s}");
        assert_eq!(summarize_params(&Value::Null), "");
    }

    #[test]
    fn jsonl_sink_appends_parseable_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let sink = JsonlAuditSink::open(&path).unwrap();
        sink.record("uid=0 gid=0 pid=1", "keys.rekey", "nsid=1", "ok");
        sink.record(
            "uid=5 gid=5 pid=2",
            "keys.rekey",
            "x=\"a\\nb\"",
            "error -32001",
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["op"], "keys.rekey");
        assert_eq!(lines[1]["who"], "uid=5 gid=5 pid=2");
        assert!(lines[0]["ts"].as_str().unwrap().ends_with('Z'));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
