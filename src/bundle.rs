//! Support bundles: a tar archive of what a support engineer needs (the redacted config, log
//! files, a stats snapshot, versions of nvseal, kernel, OS and the CPU's XTS-relevant
//! features), encrypted with `age` in passphrase mode (scrypt), written as one file.
//!
//! Runs on the CLI's main thread (`nvseal bundle --password`) or a control thread; blocking
//! file I/O only. Exists because operators must be able to hand diagnostics to a vendor
//! without handing over key material: the config is redacted ([`redact_config`]), the
//! archive is encrypted, and the password is only ever held in a zeroizing `SecretString`:
//! never written to disk, logged, or put in the archive. Open a bundle with `age -d`
//! (docs/rpc.md, "Support bundle") or [`read_bundle`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use age::secrecy::ExposeSecret;
pub use age::secrecy::SecretString;
use serde::Serialize;
use serde_json::{json, Value};
use thiserror::Error;

use crate::leak::{looks_like_secret_name, secret_token_ranges};

/// Directory every entry of the archive lives under.
pub const BUNDLE_ROOT: &str = "nvseal-bundle";
/// Default cap per log file: the newest 32 MiB, so a bundle of a long-running target stays
/// mailable.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 32 << 20;
/// Shortest password accepted: a bundle travels by email and ticket systems, so brute force
/// against it is realistic; scrypt slows it, a long password stops it.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Allowed scrypt work factors (log2 N) when set explicitly; age picks about one second of
/// work otherwise.
pub const SCRYPT_LOG_N_RANGE: std::ops::RangeInclusive<u8> = 10..=22;

/// Text that replaces a secret.
pub const REDACTED: &str = "<redacted>";

/// What goes into a bundle.
#[derive(Debug, Clone)]
pub struct BundleContents {
    /// The configuration text, already passed through [`redact_config`] by the caller.
    pub config_redacted: String,
    /// Log files to include (their newest `max_log_bytes` each). A missing or unreadable
    /// file is noted in the manifest instead of failing the bundle.
    pub logs: Vec<PathBuf>,
    /// What the running target answered, by method (`nvseal bundle --socket`: health, running
    /// config, subsystems, key and KMS state, every `stats.*` family).
    pub stats: Value,
    /// Versions of the software and the machine.
    pub versions: Versions,
}

impl BundleContents {
    /// Contents from the raw (unredacted) config text: redacts it with [`redact_config`] and
    /// collects [`Versions`] of this machine. What `nvseal bundle` calls.
    pub fn gather(raw_config_text: &str, logs: Vec<PathBuf>, stats: Value) -> BundleContents {
        BundleContents {
            config_redacted: redact_config(raw_config_text),
            logs,
            stats,
            versions: Versions::collect(),
        }
    }
}

/// Software and machine versions.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Versions {
    /// nvseal's version.
    pub nvseal: String,
    /// `uname -r`-like kernel release.
    pub kernel: String,
    /// `/proc/version`.
    pub kernel_build: String,
    /// PRETTY_NAME from /etc/os-release.
    pub os: String,
    /// Target architecture.
    pub arch: String,
    /// CPU model name.
    pub cpu_model: String,
    /// The CPU features that pick the XTS kernel tier (as detected by this process).
    pub cpu_flags: Vec<String>,
}

/// CPU features the XTS tiers depend on (see docs/xts.md).
const XTS_FLAGS: [&str; 8] = [
    "aes",
    "pclmulqdq",
    "sse4.1",
    "avx2",
    "avx512f",
    "avx512bw",
    "vaes",
    "vpclmulqdq",
];

impl Versions {
    /// Reads the versions of this process and machine (from /proc and /etc/os-release; an
    /// unreadable source gives "unknown").
    pub fn collect() -> Versions {
        let read = |p: &str| fs::read_to_string(p).map(|s| s.trim().to_string()).ok();
        let os = read("/etc/os-release")
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                    .map(|v| v.trim_matches('"').to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let cpu_model = read("/proc/cpuinfo")
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        Versions {
            nvseal: concat!(env!("CARGO_PKG_VERSION"), " (", env!("NVSEAL_GIT_REV"), ")")
                .to_string(),
            kernel: read("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into()),
            kernel_build: read("/proc/version").unwrap_or_else(|| "unknown".into()),
            os,
            arch: std::env::consts::ARCH.to_string(),
            cpu_model,
            cpu_flags: detected_xts_flags(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detected_xts_flags() -> Vec<String> {
    let detected = [
        std::arch::is_x86_feature_detected!("aes"),
        std::arch::is_x86_feature_detected!("pclmulqdq"),
        std::arch::is_x86_feature_detected!("sse4.1"),
        std::arch::is_x86_feature_detected!("avx2"),
        std::arch::is_x86_feature_detected!("avx512f"),
        std::arch::is_x86_feature_detected!("avx512bw"),
        std::arch::is_x86_feature_detected!("vaes"),
        std::arch::is_x86_feature_detected!("vpclmulqdq"),
    ];
    XTS_FLAGS
        .iter()
        .zip(detected)
        .filter(|(_, d)| *d)
        .map(|(f, _)| f.to_string())
        .collect()
}

#[cfg(not(target_arch = "x86_64"))]
fn detected_xts_flags() -> Vec<String> {
    let _ = XTS_FLAGS;
    Vec::new()
}

/// Knobs of [`write_bundle_with`].
#[derive(Debug, Clone)]
pub struct BundleOptions {
    /// Newest bytes kept of each log file.
    pub max_log_bytes: u64,
    /// scrypt work factor (log2 N) within [`SCRYPT_LOG_N_RANGE`]; `None` lets age calibrate
    /// about one second on this machine.
    pub scrypt_log_n: Option<u8>,
}

impl Default for BundleOptions {
    fn default() -> Self {
        BundleOptions {
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
            scrypt_log_n: None,
        }
    }
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct BundleSummary {
    /// The bundle file.
    pub path: PathBuf,
    /// Archive entry names, in order.
    pub entries: Vec<String>,
    /// Size of the encrypted file.
    pub bytes: u64,
}

/// Why a bundle could not be written or read.
#[derive(Debug, Error)]
pub enum BundleError {
    /// The password is shorter than [`MIN_PASSWORD_CHARS`].
    #[error("bundle password must have at least {MIN_PASSWORD_CHARS} characters")]
    WeakPassword,
    /// An option is out of range.
    #[error("bundle option {0}")]
    BadOption(String),
    /// The output file exists; bundles never overwrite.
    #[error("{0} exists; choose another path")]
    Exists(PathBuf),
    /// File system error.
    #[error("{what} {path}: {source}")]
    Io {
        /// The step.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Encryption or decryption failed (wrong password, corrupt file, not an age file).
    #[error("age: {0}")]
    Age(String),
}

/// Writes a bundle with default options. See [`write_bundle_with`].
pub fn write_bundle(
    out_path: &Path,
    password: &SecretString,
    contents: &BundleContents,
) -> Result<BundleSummary, BundleError> {
    write_bundle_with(out_path, password, contents, &BundleOptions::default())
}

/// Writes `contents` as an age-encrypted tar to `out_path` (mode 0600, never overwriting).
/// The file appears only when complete: it is written beside the target and renamed.
pub fn write_bundle_with(
    out_path: &Path,
    password: &SecretString,
    contents: &BundleContents,
    opts: &BundleOptions,
) -> Result<BundleSummary, BundleError> {
    if password.expose_secret().chars().count() < MIN_PASSWORD_CHARS {
        return Err(BundleError::WeakPassword);
    }
    let mut recipient = age::scrypt::Recipient::new(password.clone());
    if let Some(log_n) = opts.scrypt_log_n {
        if !SCRYPT_LOG_N_RANGE.contains(&log_n) {
            return Err(BundleError::BadOption(format!(
                "scrypt_log_n {log_n} is outside {SCRYPT_LOG_N_RANGE:?}"
            )));
        }
        recipient.set_work_factor(log_n);
    }
    if out_path.exists() {
        return Err(BundleError::Exists(out_path.to_path_buf()));
    }
    let tmp = temp_path(out_path);
    let result = write_to(&tmp, &recipient, contents, opts);
    let entries = match result {
        Ok(entries) => entries,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let io_err = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::Io { what, path, source }
    };
    // Publish with link(2), which fails if the target appeared meanwhile (rename would
    // silently replace it). File systems without hard links fall back to a checked rename.
    let published = match fs::hard_link(&tmp, out_path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists && !out_path.exists() => {
            fs::rename(&tmp, out_path)
        }
        other => other,
    };
    let _ = fs::remove_file(&tmp);
    match published {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(BundleError::Exists(out_path.to_path_buf()))
        }
        Err(e) => return Err(io_err("publish", out_path)(e)),
    }
    let bytes = fs::metadata(out_path)
        .map_err(io_err("stat", out_path))?
        .len();
    Ok(BundleSummary {
        path: out_path.to_path_buf(),
        entries,
        bytes,
    })
}

fn temp_path(out_path: &Path) -> PathBuf {
    let mut name = out_path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".partial-{}", std::process::id()));
    out_path.with_file_name(name)
}

fn write_to(
    tmp: &Path,
    recipient: &age::scrypt::Recipient,
    contents: &BundleContents,
    opts: &BundleOptions,
) -> Result<Vec<String>, BundleError> {
    let io_err = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::Io {
            what,
            path: path.clone(),
            source,
        }
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(io_err("create", tmp))?;
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(recipient as &dyn age::Recipient))
            .map_err(|e| BundleError::Age(e.to_string()))?;
    let age_writer = encryptor
        .wrap_output(BufWriter::new(file))
        .map_err(io_err("start encryption of", tmp))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut ar = Archive {
        tar: tar::Builder::new(age_writer),
        now,
        entries: Vec::new(),
    };
    let write_err = io_err("write", tmp);
    ar.add(
        format!("{BUNDLE_ROOT}/config.yaml"),
        contents.config_redacted.as_bytes(),
    )
    .map_err(&write_err)?;
    let stats = serde_json::to_vec_pretty(&contents.stats).unwrap_or_default();
    ar.add(format!("{BUNDLE_ROOT}/stats.json"), &stats)
        .map_err(&write_err)?;
    let versions = serde_json::to_vec_pretty(&contents.versions).unwrap_or_default();
    ar.add(format!("{BUNDLE_ROOT}/versions.json"), &versions)
        .map_err(&write_err)?;
    let mut log_notes = Vec::new();
    for (i, log) in contents.logs.iter().enumerate() {
        let base = log
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "log".into());
        let name = format!("{BUNDLE_ROOT}/logs/{i:02}-{base}");
        match read_tail(log, opts.max_log_bytes) {
            Ok((data, skipped)) => {
                ar.add(name.clone(), &data).map_err(&write_err)?;
                log_notes
                    .push(json!({ "source": log, "entry": name, "skipped_head_bytes": skipped }));
            }
            Err(e) => log_notes.push(json!({ "source": log, "error": e.to_string() })),
        }
    }
    let files: Vec<Value> = ar
        .entries
        .iter()
        .map(|(name, bytes)| json!({ "name": name, "bytes": bytes }))
        .collect();
    let manifest = json!({
        "format": "nvseal-bundle/1",
        "created_unix_s": now,
        "nvseal": env!("CARGO_PKG_VERSION"),
        "files": files,
        "logs": log_notes,
    });
    let manifest = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    ar.add(format!("{BUNDLE_ROOT}/MANIFEST.json"), &manifest)
        .map_err(&write_err)?;
    let entries = ar.entries.into_iter().map(|(n, _)| n).collect();
    let tar = ar.tar;
    let age_writer = tar.into_inner().map_err(&write_err)?;
    let mut buffered = age_writer.finish().map_err(&write_err)?;
    buffered.flush().map_err(&write_err)?;
    let file = buffered
        .into_inner()
        .map_err(|e| write_err(e.into_error()))?;
    file.sync_all().map_err(io_err("sync", tmp))?;
    Ok(entries)
}

/// The tar stream being built, and what went into it.
struct Archive<W: Write> {
    tar: tar::Builder<W>,
    now: u64,
    entries: Vec<(String, usize)>,
}

impl<W: Write> Archive<W> {
    /// Appends a regular file entry (mode 0600, owner 0:0, mtime = bundle time).
    fn add(&mut self, name: String, data: &[u8]) -> io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o600);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(self.now);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        self.tar.append_data(&mut header, &name, data)?;
        self.entries.push((name, data.len()));
        Ok(())
    }
}

/// The newest `max` bytes of a file, and how many older bytes were skipped.
fn read_tail(path: &Path, max: u64) -> io::Result<(Vec<u8>, u64)> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let skipped = len.saturating_sub(max);
    f.seek(SeekFrom::Start(skipped))?;
    let mut data = Vec::new();
    f.take(max).read_to_end(&mut data)?;
    Ok((data, skipped))
}

/// Decrypts a bundle and returns its entries (name, bytes). Wrong password → `Age` error.
pub fn read_bundle(
    path: &Path,
    password: &SecretString,
) -> Result<Vec<(String, Vec<u8>)>, BundleError> {
    let io_err = |what, source| BundleError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(|e| io_err("open", e))?;
    let decryptor = age::Decryptor::new(io::BufReader::new(file))
        .map_err(|e| BundleError::Age(e.to_string()))?;
    if !decryptor.is_scrypt() {
        return Err(BundleError::Age(
            "not a passphrase-encrypted age file".into(),
        ));
    }
    let identity = age::scrypt::Identity::new(password.clone());
    let reader = decryptor
        .decrypt(std::iter::once(&identity as &dyn age::Identity))
        .map_err(|e| BundleError::Age(e.to_string()))?;
    let mut archive = tar::Archive::new(reader);
    let mut out = Vec::new();
    for entry in archive.entries().map_err(|e| io_err("read", e))? {
        let mut entry = entry.map_err(|e| io_err("read", e))?;
        let name = entry
            .path()
            .map_err(|e| io_err("read", e))?
            .to_string_lossy()
            .into_owned();
        let mut data = Vec::new();
        entry
            .read_to_end(&mut data)
            .map_err(|e| io_err("read", e))?;
        out.push((name, data));
    }
    Ok(out)
}

/// Removes secret-looking values from YAML text, keeping everything else (comments, order,
/// layout) so the result reads like the original:
///
/// * the value of any key whose name contains `key`, `password`, `passphrase`, `secret`,
///   `pem`, `token` or `private` (case-insensitive), in block or flow style, including block
///   scalars (`key: |` and its indented lines);
/// * every PEM block (`-----BEGIN` … `-----END`), whatever key holds it;
/// * every run of at least 32 hex digits or 40 base64 characters, anywhere (comments too).
///
/// Redacted values read `<redacted>`. Over-redaction is accepted; missing a secret is not.
pub fn redact_config(yaml_text: &str) -> String {
    let mut out = String::with_capacity(yaml_text.len());
    // Column of the key whose block scalar is being dropped.
    let mut block_key_col: Option<usize> = None;
    let mut in_pem = false;
    for raw in yaml_text.split_inclusive('\n') {
        let (body, nl) = match raw.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (raw, ""),
        };
        let indent = body.len() - body.trim_start_matches(' ').len();
        if in_pem {
            if body.contains("-----END") {
                in_pem = false;
            }
            continue;
        }
        if let Some(col) = block_key_col {
            if body.trim().is_empty() || indent > col {
                continue;
            }
            block_key_col = None;
        }
        if let Some(pos) = body.find("-----BEGIN") {
            out.push_str(&redact_tokens(body.get(..pos).unwrap_or("")));
            out.push_str(REDACTED);
            out.push_str(nl);
            in_pem = !body.get(pos..).unwrap_or("").contains("-----END");
            continue;
        }
        let line = redact_line(body, &mut block_key_col);
        out.push_str(&redact_tokens(&line));
        out.push_str(nl);
    }
    out
}

/// Redacts a `key: value` line (with optional `- ` list markers) whose key is secret-named;
/// sets `block_key_col` when the value is a block scalar to drop.
fn redact_line(body: &str, block_key_col: &mut Option<usize>) -> String {
    let mut col = body.len() - body.trim_start_matches(' ').len();
    let mut rest = body.get(col..).unwrap_or("");
    while let Some(r) = rest.strip_prefix("- ") {
        let trimmed = r.trim_start_matches(' ');
        col += rest.len() - trimmed.len();
        rest = trimmed;
    }
    if rest.starts_with('#') {
        return body.to_string();
    }
    let Some((key, value_start)) = split_key(rest) else {
        return redact_flow(body);
    };
    let prefix_len = body.len() - rest.len() + value_start;
    let (head, value) = body.split_at(prefix_len.min(body.len()));
    let value_trim = value.trim();
    if !looks_like_secret_name(key) {
        return format!("{head}{}", redact_flow(value));
    }
    if value_trim.is_empty() || value_trim.starts_with('#') {
        // A mapping or list follows on the next lines; its entries are judged one by one
        // (secret-named keys and secret-looking values are still caught there).
        return body.to_string();
    }
    if value_trim.starts_with('|') || value_trim.starts_with('>') {
        *block_key_col = Some(col);
    }
    format!("{head} {REDACTED}")
}

/// Splits `key: value` (plain, single- or double-quoted key). Returns the key and the byte
/// offset just after the colon.
fn split_key(rest: &str) -> Option<(&str, usize)> {
    let (key, after) = if let Some(q @ ('"' | '\'')) = rest.chars().next() {
        let close = rest.get(1..)?.find(q)? + 1;
        (rest.get(1..close)?, close + 1)
    } else {
        if rest.starts_with(['{', '[', '&', '*', '!', '|', '>']) {
            return None;
        }
        let colon = rest
            .find(": ")
            .or_else(|| rest.strip_suffix(':').map(|k| k.len()))?;
        let key = rest.get(..colon)?;
        if key.contains(" #") {
            return None;
        }
        (key, colon)
    };
    rest.get(after..)?
        .starts_with(':')
        .then_some((key, after + 1))
}

/// In a flow collection (`{ a: 1, key: x }`), redacts the values of secret-named keys.
fn redact_flow(text: &str) -> String {
    if !text.contains('{') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut segment = String::new();
    let flush = |segment: &mut String, out: &mut String| {
        if let Some((k, _)) = segment.split_once(':') {
            let name = k.trim().trim_matches(['"', '\'']);
            if looks_like_secret_name(name) {
                out.push_str(k);
                out.push_str(": ");
                out.push_str(REDACTED);
                segment.clear();
                return;
            }
        }
        out.push_str(segment);
        segment.clear();
    };
    for c in text.chars() {
        if matches!(c, ',' | '{' | '}' | '[' | ']') {
            flush(&mut segment, &mut out);
            out.push(c);
        } else {
            segment.push(c);
        }
    }
    flush(&mut segment, &mut out);
    out
}

/// Replaces long hex/base64 runs with `<redacted>`.
fn redact_tokens(line: &str) -> String {
    let ranges: Vec<_> = secret_token_ranges(line).collect();
    if ranges.is_empty() {
        return line.to_string();
    }
    let mut out = String::with_capacity(line.len());
    let mut last = 0;
    for r in ranges {
        out.push_str(line.get(last..r.start).unwrap_or(""));
        out.push_str(REDACTED);
        last = r.end;
    }
    out.push_str(line.get(last..).unwrap_or(""));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX64: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn redacts_secret_keys_in_every_shape() {
        let yaml = format!(
            "# nvseal config\n\
             reactor:\n  cores: 2   # two\n\
             kms:\n  clusters:\n    - alias: prod\n      password: hunter2hunter2\n\
             \x20     \"api_key\": 'abc def'\n      tls: {{ cert: /etc/c.pem, private_key: /etc/k, ca: x }}\n\
             \x20     client_key_pem: |\n        -----BEGIN PRIVATE KEY-----\n        MIGHAgEAMBMGByqGSM49AgEGCCqGSM49\n        -----END PRIVATE KEY-----\n\
             \x20     servers: [a, b]\n\
             bdevs:\n  - name: enc1\n    key: ephemeral\n    comment: {HEX64}\n\
             # old dek 0x{HEX64}\n\
             uuid: 6f1c2a8e-3b7d-4c1e-9f00-0123456789ab\n\
             ca: |\n  -----BEGIN CERTIFICATE-----\n  MIIBszCCAVmgAwIBAgIUJ\n  -----END CERTIFICATE-----\n\
             tail: 1\n"
        );
        let out = redact_config(&yaml);
        for secret in [
            "hunter2",
            "abc def",
            "/etc/k",
            "MIGHAgEAMBMGByqGSM49",
            "MIIBszCCAVmgAwIBAgIUJ",
            HEX64,
            "ephemeral",
        ] {
            assert!(!out.contains(secret), "{secret} survived:\n{out}");
        }
        for kept in [
            "# nvseal config",
            "cores: 2   # two",
            "alias: prod",
            "cert: /etc/c.pem",
            "servers: [a, b]",
            "name: enc1",
            "uuid: 6f1c2a8e-3b7d-4c1e-9f00-0123456789ab",
            "tail: 1",
            "ca: x",
        ] {
            assert!(out.contains(kept), "{kept} lost:\n{out}");
        }
        assert!(out.contains("password: <redacted>"), "{out}");
        assert!(
            out.contains("client_key_pem: <redacted>\n      servers"),
            "{out}"
        );
        // Still YAML, same shape.
        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out).unwrap();
        assert_eq!(
            v["kms"]["clusters"][0]["servers"][1],
            serde_yaml_ng::Value::from("b")
        );
        assert_eq!(v["tail"], serde_yaml_ng::Value::from(1));
    }

    #[test]
    fn default_config_survives_redaction() {
        let text = include_str!("../configs/default.yaml");
        let out = redact_config(text);
        assert_eq!(out.lines().count(), text.lines().count());
        assert!(out.contains("idle_backoff_us: 50"));
        assert!(out.contains("provider: local"), "{out}");
        assert!(out.contains("nqn: nqn.2026-11.io.nvseal:default"), "{out}");
        let _: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out).unwrap();
    }

    #[test]
    fn weak_password_and_bad_options_refused() {
        let dir = tempfile::tempdir().unwrap();
        let contents = BundleContents {
            config_redacted: String::new(),
            logs: vec![],
            stats: Value::Null,
            versions: Versions::collect(),
        };
        let p = dir.path().join("b.age");
        let short = SecretString::from("short");
        assert!(matches!(
            write_bundle(&p, &short, &contents),
            Err(BundleError::WeakPassword)
        ));
        let pw = SecretString::from("long enough password");
        let opts = BundleOptions {
            scrypt_log_n: Some(40),
            ..Default::default()
        };
        assert!(matches!(
            write_bundle_with(&p, &pw, &contents, &opts),
            Err(BundleError::BadOption(_))
        ));
        assert!(!p.exists());
    }
}
