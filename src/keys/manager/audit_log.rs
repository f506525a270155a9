//! The file-backed audit sink of the key manager: one JSON line per crypto operation, made
//! durable per record, with its UTC timestamp formatting.
//!
//! Runs on whichever control thread records the event (start-up, RPC handlers, unlock threads);
//! never on a reactor. Split out of the manager because the on-disk audit format is its own
//! concern, independent of key state.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::{lock, AuditSink};

/// Appends one JSON object per line to a file, made durable with `fdatasync` per record:
/// `{"ts":"2026-11-28T01:02:03.456Z","ts_unix_ms":…,"who":…,"op":…,"target":…,"result":…}`.
pub struct FileAuditSink {
    path: PathBuf,
    file: Mutex<File>,
}

impl FileAuditSink {
    /// Opens (creating, mode 0600) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(file),
        })
    }
}

#[derive(Serialize)]
struct AuditLine<'a> {
    /// Same field names as the control socket's audit log (`crate::audit::JsonlAuditSink`):
    /// one record format whichever sink writes it.
    ts: String,
    ts_unix_ms: u64,
    who: &'a str,
    op: &'a str,
    target: &'a str,
    result: &'a str,
}

impl AuditSink for FileAuditSink {
    fn record(&self, who: &str, op: &str, target: &str, result: &str) {
        let unix_ms = unix_ms();
        let line = AuditLine {
            ts: rfc3339_utc(unix_ms),
            ts_unix_ms: unix_ms,
            who,
            op,
            target,
            result,
        };
        let mut text = match serde_json::to_string(&line) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "audit record not serializable");
                return;
            }
        };
        text.push('\n');
        let mut file = lock(&self.file);
        // One write call per line on an O_APPEND file: lines from several processes do not
        // interleave.
        if let Err(e) = file
            .write_all(text.as_bytes())
            .and_then(|()| file.sync_data())
        {
            tracing::error!(path = %self.path.display(), error = %e, op, target,
                "writing the audit log failed");
        }
    }
}

pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for a Unix time in milliseconds (proleptic Gregorian, UTC).
pub(super) fn rfc3339_utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm, unsigned form).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}
