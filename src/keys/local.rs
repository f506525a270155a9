//! The local key provider: KEKs kept in clear in a key file. NOT FOR PRODUCTION.
//!
//! Owns the key-file format and its crash-safe rewrite. It exists so that development setups,
//! CI and perf labs run encrypted namespaces (including shallow rekey, hence several KEKs) with no
//! KMS; anyone who can read the file can decrypt every namespace wrapped under it, so every open
//! logs a loud warning. Runs on control threads (blocking file I/O).
//!
//! File format (UTF-8 text, mode 0600):
//!
//! ```text
//! # comment lines and blank lines are ignored
//! <kek id> <state> <key: 64 hex digits, or "-" once destroyed> <name (rest of line)>
//! default active 6f1c...e2 default
//! local-5b0e...-9c1d revoked 77a0...41 rekey-2026-11
//! ```
//!
//! For quick setups a file holding only one key — 32 raw bytes, or 64 hex digits on one line —
//! is also accepted; that key gets the id `default`. The first change (create, revoke, destroy)
//! rewrites such a file in the line format.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::provider::{
    check_kms_alias, KekId, KekState, KeyProvider, ProviderError, ProviderInfo, ProviderKind,
};
use super::wrap::{Kek, KEK_BYTES};

/// The id given to the key of a single-key file and to the key created with a new file.
pub const DEFAULT_KEK_ID: &str = "default";
/// The KMS cluster alias stored in headers for local KEKs unless configured otherwise.
pub const DEFAULT_LOCAL_ALIAS: &str = "local";
/// Longest KEK name accepted (bytes): a name is a label for people, not an identifier.
const KEK_NAME_MAX_BYTES: usize = 128;
/// Largest key file read (bytes): bounds memory on a wrong path (e.g. a disk image).
const KEY_FILE_MAX_BYTES: u64 = 1 << 20;
/// Permission bits beyond owner read/write that trigger the warning.
const MODE_TOO_WIDE_MASK: u32 = 0o077;

/// Whether [`LocalKeyProvider::open`] may create a missing key file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateMode {
    /// A missing file is an error.
    MustExist,
    /// A missing file is created (mode 0600) holding one fresh KEK with id `default`.
    CreateIfMissing,
}

struct Entry {
    id: KekId,
    state: KekState,
    /// `None` once destroyed.
    key: Option<Zeroizing<[u8; KEK_BYTES]>>,
    name: String,
}

/// KEKs from a local file. See the module documentation; not for production.
pub struct LocalKeyProvider {
    path: PathBuf,
    alias: String,
    entries: Vec<Entry>,
    /// The file's permission bits when they were wider than 0600 at open.
    mode_too_wide: Option<u32>,
}

impl std::fmt::Debug for LocalKeyProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKeyProvider")
            .field("path", &self.path)
            .field("alias", &self.alias)
            .field("keks", &self.entries.len())
            .finish_non_exhaustive()
    }
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ProviderError + '_ {
    move |source| ProviderError::Io {
        path: path_str(path),
        source,
    }
}

fn bad_file(path: &Path, line: usize, reason: impl Into<String>) -> ProviderError {
    ProviderError::BadKeyFile {
        path: path_str(path),
        line,
        reason: reason.into(),
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Parses exactly 64 hex digits into a key.
fn parse_key_hex(s: &[u8]) -> Option<Zeroizing<[u8; KEK_BYTES]>> {
    if s.len() != KEK_BYTES * 2 {
        return None;
    }
    let mut key = Zeroizing::new([0u8; KEK_BYTES]);
    for (out, pair) in key.iter_mut().zip(s.chunks_exact(2)) {
        let hi = hex_digit(*pair.first()?)?;
        let lo = hex_digit(*pair.get(1)?)?;
        *out = (hi << 4) | lo;
    }
    Some(key)
}

fn push_key_hex(out: &mut String, key: &[u8; KEK_BYTES]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in key {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xF)]));
    }
}

fn check_name(name: &str) -> Result<(), ProviderError> {
    let ok = !name.is_empty()
        && name.len() <= KEK_NAME_MAX_BYTES
        && name.trim() == name
        && !name.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(ProviderError::Protocol {
            detail: format!(
                "KEK name must be 1..={KEK_NAME_MAX_BYTES} bytes without control characters or \
                 surrounding spaces"
            ),
        })
    }
}

fn parse_state(s: &str) -> Option<KekState> {
    match s {
        "active" => Some(KekState::Active),
        "revoked" => Some(KekState::Revoked),
        "destroyed" => Some(KekState::Destroyed),
        _ => None,
    }
}

/// Parses the contents of a key file (any of the three forms).
fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<Entry>, ProviderError> {
    let is_text = bytes
        .iter()
        .all(|&b| b.is_ascii_graphic() || b.is_ascii_whitespace() || b >= 0x80);
    if bytes.len() == KEK_BYTES && !is_text {
        let mut key = Zeroizing::new([0u8; KEK_BYTES]);
        key.copy_from_slice(bytes);
        return Ok(vec![default_entry(key)]);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| bad_file(path, 0, "not UTF-8 text"))?;
    if let Some(key) = parse_key_hex(text.trim().as_bytes()) {
        return Ok(vec![default_entry(key)]);
    }
    let mut entries: Vec<Entry> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.splitn(4, char::is_whitespace);
        let (Some(id), Some(state), Some(key), Some(name)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(bad_file(
                path,
                line_no,
                "expected: <id> <state> <key hex|-> <name>",
            ));
        };
        let id = KekId::new(id).map_err(|e| bad_file(path, line_no, e.to_string()))?;
        let state = parse_state(state)
            .ok_or_else(|| bad_file(path, line_no, "state must be active, revoked or destroyed"))?;
        let key = match (state, key) {
            (KekState::Destroyed, "-") => None,
            (KekState::Destroyed, _) => {
                return Err(bad_file(path, line_no, "a destroyed KEK has key \"-\""));
            }
            (_, hex) => Some(
                parse_key_hex(hex.as_bytes())
                    .ok_or_else(|| bad_file(path, line_no, "key must be 64 hex digits"))?,
            ),
        };
        let name = name.trim().to_owned();
        check_name(&name).map_err(|_| bad_file(path, line_no, "invalid KEK name"))?;
        if entries.iter().any(|e| e.id == id) {
            return Err(bad_file(path, line_no, format!("duplicate KEK id {id}")));
        }
        entries.push(Entry {
            id,
            state,
            key,
            name,
        });
    }
    Ok(entries)
}

fn default_entry(key: Zeroizing<[u8; KEK_BYTES]>) -> Entry {
    Entry {
        id: KekId::new(DEFAULT_KEK_ID).unwrap_or_else(|_| unreachable!("constant id is valid")),
        state: KekState::Active,
        key: Some(key),
        name: DEFAULT_KEK_ID.to_owned(),
    }
}

fn render(entries: &[Entry]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(128 + entries.len() * 160));
    out.push_str("# nvseal local key file: NOT FOR PRODUCTION (KEKs are stored in clear).\n");
    out.push_str("# <kek id> <state> <key hex|-> <name>\n");
    for e in entries {
        out.push_str(e.id.as_str());
        out.push(' ');
        out.push_str(&e.state.to_string());
        out.push(' ');
        match &e.key {
            Some(key) => push_key_hex(&mut out, key),
            None => out.push('-'),
        }
        out.push(' ');
        out.push_str(&e.name);
        out.push('\n');
    }
    out
}

/// Replaces `path` with `contents` crash-safely: temp file (0600) in the same directory, fsync,
/// rename, fsync of the directory.
fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), ProviderError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = path
        .file_name()
        .ok_or_else(|| bad_file(path, 0, "key file path has no file name"))?
        .to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_error(&tmp))?;
    // A leftover temp file may have been created with other permissions.
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io_error(&tmp))?;
    f.write_all(contents).map_err(io_error(&tmp))?;
    f.sync_all().map_err(io_error(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_error(path))?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(&dir))?;
    Ok(())
}

impl LocalKeyProvider {
    /// Opens (or, with [`CreateMode::CreateIfMissing`], creates) the key file. Logs a
    /// NOT FOR PRODUCTION warning every time, and another if the file is readable by anyone but
    /// its owner.
    pub fn open(path: impl Into<PathBuf>, mode: CreateMode) -> Result<Self, ProviderError> {
        let path = path.into();
        tracing::warn!(
            path = %path.display(),
            "local key provider in use: KEKs are stored IN CLEAR in a file. NOT FOR PRODUCTION: \
             anyone who can read this file can decrypt every namespace wrapped under it"
        );
        let mut mode_too_wide = None;
        let entries = match fs::metadata(&path) {
            Ok(meta) => {
                let mode_bits = meta.permissions().mode() & 0o777;
                if mode_bits & MODE_TOO_WIDE_MASK != 0 {
                    mode_too_wide = Some(mode_bits);
                    tracing::warn!(
                        path = %path.display(),
                        mode = format_args!("{mode_bits:04o}"),
                        "key file permissions are wider than 0600: other users may read the KEKs"
                    );
                }
                if meta.len() > KEY_FILE_MAX_BYTES {
                    return Err(bad_file(&path, 0, "file too large for a key file"));
                }
                let bytes = Zeroizing::new(fs::read(&path).map_err(io_error(&path))?);
                parse(&path, &bytes)?
            }
            Err(e)
                if e.kind() == io::ErrorKind::NotFound && mode == CreateMode::CreateIfMissing =>
            {
                let kek = Kek::generate()?;
                let entries = vec![default_entry(Zeroizing::new(*kek.expose()))];
                let contents = render(&entries);
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io_error(&path))?;
                f.write_all(contents.as_bytes()).map_err(io_error(&path))?;
                f.sync_all().map_err(io_error(&path))?;
                tracing::warn!(path = %path.display(), "created local key file with KEK \"default\"");
                entries
            }
            Err(e) => return Err(io_error(&path)(e)),
        };
        Ok(Self {
            path,
            alias: DEFAULT_LOCAL_ALIAS.to_owned(),
            entries,
            mode_too_wide,
        })
    }

    /// Sets the alias stored in headers for this provider's KEKs (default `local`).
    pub fn with_alias(mut self, alias: &str) -> Result<Self, ProviderError> {
        check_kms_alias(alias)?;
        self.alias = alias.to_owned();
        Ok(self)
    }

    /// The key file's permission bits if they were wider than 0600 when it was opened (a warning
    /// was logged; health reporting may repeat it).
    pub fn mode_too_wide(&self) -> Option<u32> {
        self.mode_too_wide
    }

    /// The key file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state of a KEK, if known.
    pub fn state(&self, id: &KekId) -> Option<KekState> {
        self.entries.iter().find(|e| &e.id == id).map(|e| e.state)
    }

    fn entry_mut(&mut self, id: &KekId) -> Result<&mut Entry, ProviderError> {
        self.entries
            .iter_mut()
            .find(|e| &e.id == id)
            .ok_or_else(|| ProviderError::NotFound { id: id.clone() })
    }

    fn persist(&self) -> Result<(), ProviderError> {
        let contents = render(&self.entries);
        write_atomically(&self.path, contents.as_bytes())
    }

    /// Changes an entry, persists, and rolls the in-memory change back if persisting fails.
    fn set_state(
        &mut self,
        id: &KekId,
        state: KekState,
        drop_key: bool,
    ) -> Result<(), ProviderError> {
        let entry = self.entry_mut(id)?;
        let old_state = entry.state;
        let old_key = if drop_key { entry.key.take() } else { None };
        entry.state = state;
        if let Err(e) = self.persist() {
            let entry = self.entry_mut(id)?;
            entry.state = old_state;
            if old_key.is_some() {
                entry.key = old_key;
            }
            return Err(e);
        }
        Ok(())
    }
}

impl KeyProvider for LocalKeyProvider {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Local
    }

    fn cluster_alias(&self) -> &str {
        &self.alias
    }

    fn create_kek(&mut self, name: &str) -> Result<(KekId, Kek), ProviderError> {
        check_name(name)?;
        let id = KekId::new(format!("local-{}", uuid::Uuid::new_v4()))?;
        let kek = Kek::generate()?;
        self.entries.push(Entry {
            id: id.clone(),
            state: KekState::Active,
            key: Some(Zeroizing::new(*kek.expose())),
            name: name.to_owned(),
        });
        if let Err(e) = self.persist() {
            self.entries.pop();
            return Err(e);
        }
        Ok((id, kek))
    }

    fn get_kek(&mut self, id: &KekId) -> Result<Kek, ProviderError> {
        let entry = self.entry_mut(id)?;
        match (&entry.state, &entry.key) {
            (KekState::Active, Some(key)) => Ok(Kek::from_bytes(Zeroizing::new(**key))),
            (state, _) => Err(ProviderError::InvalidState {
                id: id.clone(),
                state: *state,
                op: "get",
            }),
        }
    }

    fn revoke_kek(&mut self, id: &KekId) -> Result<(), ProviderError> {
        match self.entry_mut(id)?.state {
            KekState::Active => self.set_state(id, KekState::Revoked, false),
            KekState::Revoked => Ok(()),
            KekState::Destroyed => Err(ProviderError::InvalidState {
                id: id.clone(),
                state: KekState::Destroyed,
                op: "revoke",
            }),
        }
    }

    fn destroy_kek(&mut self, id: &KekId) -> Result<(), ProviderError> {
        match self.entry_mut(id)?.state {
            KekState::Revoked => self.set_state(id, KekState::Destroyed, true),
            KekState::Destroyed => Ok(()),
            KekState::Active => Err(ProviderError::InvalidState {
                id: id.clone(),
                state: KekState::Active,
                op: "destroy (revoke it first)",
            }),
        }
    }

    fn describe(&self) -> ProviderInfo {
        let active = self
            .entries
            .iter()
            .filter(|e| e.state == KekState::Active)
            .count();
        ProviderInfo {
            kind: ProviderKind::Local,
            cluster_alias: self.alias.clone(),
            detail: format!(
                "local key file {} ({} KEKs, {} active) - NOT FOR PRODUCTION",
                self.path.display(),
                self.entries.len(),
                active
            ),
            production_ready: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> KekId {
        KekId::new(s).expect("id")
    }

    #[test]
    fn create_if_missing_makes_a_0600_file_with_a_default_kek() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys");
        assert!(matches!(
            LocalKeyProvider::open(&path, CreateMode::MustExist),
            Err(ProviderError::Io { .. })
        ));
        let mut p = LocalKeyProvider::open(&path, CreateMode::CreateIfMissing).expect("create");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let k1 = p.get_kek(&id(DEFAULT_KEK_ID)).expect("default");
        // Reopening yields the same key.
        let mut again = LocalKeyProvider::open(&path, CreateMode::MustExist).expect("reopen");
        let k2 = again.get_kek(&id(DEFAULT_KEK_ID)).expect("default");
        assert_eq!(k1.expose(), k2.expose());
        assert!(!p.describe().production_ready);
        assert_eq!(p.mode_too_wide(), None);
        assert_eq!(again.mode_too_wide(), None);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let loose = LocalKeyProvider::open(&path, CreateMode::MustExist).expect("reopen");
        assert_eq!(loose.mode_too_wide(), Some(0o644));
        // A rewrite restores 0600.
        let mut loose = loose;
        loose.create_kek("x").expect("create");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn single_key_files_raw_and_hex() {
        let dir = tempfile::tempdir().expect("tempdir");
        let raw: [u8; 32] = core::array::from_fn(|i| (i as u8).wrapping_mul(37) ^ 0x80);
        let raw_path = dir.path().join("raw.key");
        fs::write(&raw_path, raw).expect("write");
        let mut p = LocalKeyProvider::open(&raw_path, CreateMode::MustExist).expect("raw");
        assert_eq!(p.get_kek(&id("default")).expect("get").expose(), &raw);

        let hex_path = dir.path().join("hex.key");
        let mut hex = String::new();
        push_key_hex(&mut hex, &raw);
        fs::write(&hex_path, format!("{}\n", hex.to_uppercase())).expect("write");
        let mut p = LocalKeyProvider::open(&hex_path, CreateMode::MustExist).expect("hex");
        assert_eq!(p.get_kek(&id("default")).expect("get").expose(), &raw);
        // A change rewrites it in the line format, keeping the key.
        let (new_id, _) = p.create_kek("second").expect("create");
        let mut p = LocalKeyProvider::open(&hex_path, CreateMode::MustExist).expect("reopen");
        assert_eq!(p.get_kek(&id("default")).expect("get").expose(), &raw);
        assert!(p.get_kek(&new_id).is_ok());
    }

    #[test]
    fn lifecycle_create_revoke_destroy_persists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys");
        let mut p = LocalKeyProvider::open(&path, CreateMode::CreateIfMissing).expect("create");
        let (a, ka) = p.create_kek("rekey target").expect("create");
        assert_eq!(p.get_kek(&a).expect("get").expose(), ka.expose());
        assert!(matches!(
            p.destroy_kek(&a),
            Err(ProviderError::InvalidState {
                state: KekState::Active,
                ..
            })
        ));
        p.revoke_kek(&a).expect("revoke");
        assert!(matches!(
            p.get_kek(&a),
            Err(ProviderError::InvalidState {
                state: KekState::Revoked,
                ..
            })
        ));
        let mut reopened = LocalKeyProvider::open(&path, CreateMode::MustExist).expect("reopen");
        assert_eq!(reopened.state(&a), Some(KekState::Revoked));
        reopened.destroy_kek(&a).expect("destroy");
        let text = fs::read_to_string(&path).expect("read");
        let line = text
            .lines()
            .find(|l| l.starts_with(a.as_str()))
            .expect("line kept");
        assert_eq!(line, format!("{a} destroyed - rekey target"));
        assert!(matches!(
            reopened.get_kek(&id("nope")),
            Err(ProviderError::NotFound { .. })
        ));
    }

    #[test]
    fn malformed_files_are_typed_errors_without_key_material() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad");
        let cases: [(&str, usize); 5] = [
            ("k1 active 00\n", 1),
            ("# c\nk1 bogus 0000000000000000000000000000000000000000000000000000000000000000 n\n", 2),
            ("k1 destroyed 0000000000000000000000000000000000000000000000000000000000000000 n\n", 1),
            ("k1 active zz00000000000000000000000000000000000000000000000000000000000000 n\n", 1),
            (
                "k1 active 0000000000000000000000000000000000000000000000000000000000000001 n\n\
                 k1 active 0000000000000000000000000000000000000000000000000000000000000002 n\n",
                2,
            ),
        ];
        for (text, want_line) in cases {
            fs::write(&path, text).expect("write");
            match LocalKeyProvider::open(&path, CreateMode::MustExist) {
                Err(ProviderError::BadKeyFile { line, reason, .. }) => {
                    assert_eq!(line, want_line, "{text:?}");
                    assert!(!reason.contains("0000000000"), "reason leaks key text");
                }
                other => panic!("{text:?}: expected BadKeyFile, got {other:?}"),
            }
        }
    }

    #[test]
    fn kek_debug_is_redacted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys");
        let mut p = LocalKeyProvider::open(&path, CreateMode::CreateIfMissing).expect("create");
        let k = p.get_kek(&id("default")).expect("get");
        assert_eq!(format!("{k:?}"), "Kek(<redacted>)");
        assert!(!format!("{p:?}").contains("key:"));
    }
}
