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
//!
//! Where the file may live (checked at every open and before every rewrite, refused with a
//! reason otherwise): whoever can write the key file's directory can plant a KEK of their own or
//! make nvseal write every KEK into a file they own. So
//! * the key file's own directory must be owned by root or by the uid nvseal runs as and must
//!   not be writable by group or others (sticky bit or not);
//! * every directory above it (symbolic links resolved by hand, each directory they pass
//!   through checked too) must have a trusted owner and be writable by nobody else, unless it
//!   has the sticky bit (`/tmp`);
//! * the key file itself is opened with `O_NOFOLLOW` (a symbolic link there is refused), must be
//!   a regular file with a trusted owner and not writable by group or others (readable by them
//!   is only warned about);
//! * a missing directory is created mode 0700 (with [`CreateMode::CreateIfMissing`]);
//! * rewrites go through a temporary file with a random name created `O_EXCL | O_NOFOLLOW`,
//!   mode 0600, then `rename`; a new file is published with `link`, which refuses to replace
//!   anything already at the key path.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use zeroize::Zeroizing;

use super::provider::{
    check_kms_alias, KekId, KekState, KeyProvider, ProviderError, ProviderInfo, ProviderKind,
};
use super::wrap::{Kek, KeyError, KEK_BYTES};

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
/// Write permission for group or others: refused on the key file and on its directory.
const DIR_WRITE_OTHERS_MASK: u32 = 0o022;
/// Symbolic links followed while resolving the key file's directory (Linux's own limit).
const SYMLINK_HOPS_MAX: usize = 40;

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

/// Who may own the key file and every directory on the way to it: root, and the user nvseal
/// runs as (a developer's own key file). Anyone else could swap the file for one of their own.
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// A refusal of the key file's location, as a typed error that says why.
fn refuse(path: &Path, reason: String) -> ProviderError {
    ProviderError::Io {
        path: path_str(path),
        source: io::Error::new(io::ErrorKind::PermissionDenied, reason),
    }
}

/// Checks one directory met on the way to the key file. Above the key file's own directory a
/// group- or world-writable directory is accepted only with the sticky bit (`/tmp`, `/var/tmp`:
/// others may create entries there but not rename or delete ours); the key file's own directory
/// must not be writable by anyone but its owner at all.
fn check_dir(dir: &Path, meta: &fs::Metadata, own_dir: bool) -> Result<(), String> {
    if !trusted_owner(meta.uid()) {
        return Err(format!(
            "directory {} is owned by uid {}, not by root or uid {} (which nvseal runs as): \
             its owner could plant or read KEKs",
            dir.display(),
            meta.uid(),
            nix::unistd::geteuid()
        ));
    }
    let mode = meta.mode();
    let sticky_ok = !own_dir && mode & libc::S_ISVTX != 0;
    if mode & DIR_WRITE_OTHERS_MASK != 0 && !sticky_ok {
        return Err(format!(
            "directory {} is writable by {} (mode {:04o}): another user could replace the key \
             file{}",
            dir.display(),
            if mode & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            },
            mode & 0o7777,
            if own_dir {
                "; keep the key file in a directory of its own, mode 0700"
            } else {
                ""
            }
        ));
    }
    Ok(())
}

/// Resolves `dir` (the key file's directory) component by component, following symbolic links
/// by hand, and checks every directory it passes through with [`check_dir`] — the ancestors
/// leniently, the final directory strictly. Returns the resolved directory.
///
/// Why walk the ancestors: whoever can rename a directory above the key file can put a tree of
/// their own in its place. Why resolve links by hand: a link is only as safe as the directory
/// holding it and the directories its target passes through, and this way each of those is
/// checked exactly as if it were written in the path.
fn resolve_trusted_dir(dir: &Path) -> Result<PathBuf, String> {
    let abs = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("current directory: {e}"))?
            .join(dir)
    };
    let push_components = |todo: &mut Vec<OsString>, p: &Path| {
        let parts: Vec<OsString> = p
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_os_string()),
                Component::ParentDir => Some(OsString::from("..")),
                Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
            })
            .collect();
        todo.extend(parts.into_iter().rev());
    };
    let stat = |p: &Path| fs::symlink_metadata(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut todo = Vec::new();
    push_components(&mut todo, &abs);
    let mut cur = PathBuf::from("/");
    check_dir(&cur, &stat(&cur)?, false)?;
    let mut hops = 0usize;
    while let Some(name) = todo.pop() {
        if name == ".." {
            // Physical parent of a directory already checked (links are resolved already).
            cur.pop();
            continue;
        }
        let next = cur.join(&name);
        let meta = stat(&next)?;
        if meta.file_type().is_symlink() {
            hops += 1;
            if hops > SYMLINK_HOPS_MAX {
                return Err(format!(
                    "more than {SYMLINK_HOPS_MAX} symbolic links on the way to {}",
                    abs.display()
                ));
            }
            let target = fs::read_link(&next).map_err(|e| format!("{}: {e}", next.display()))?;
            if target.is_absolute() {
                cur = PathBuf::from("/");
            }
            push_components(&mut todo, &target);
            continue;
        }
        if !meta.is_dir() {
            return Err(format!("{} is not a directory", next.display()));
        }
        if !todo.is_empty() {
            // Not the key file's own directory (that one gets the strict check below).
            check_dir(&next, &meta, false)?;
        }
        cur = next;
    }
    check_dir(&cur, &stat(&cur)?, true)?;
    Ok(cur)
}

/// The key file's directory (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Checks the key file's directory (see [`resolve_trusted_dir`]).
fn check_key_dir(path: &Path) -> Result<(), ProviderError> {
    resolve_trusted_dir(&parent_dir(path))
        .map(drop)
        .map_err(|reason| refuse(path, format!("refusing the key file's location: {reason}")))
}

/// Opens `path` for reading without following a symbolic link at the key path itself (a
/// non-blocking open, so a FIFO planted there cannot hang start-up), and checks what was opened:
/// a regular file, owned by root or by nvseal's uid, writable by nobody else. Returns the file,
/// its permission bits and its length.
fn open_key_file(path: &Path) -> Result<(File, u32, u64), ProviderError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => refuse(
                path,
                "the key file is a symbolic link; refusing to follow it (put the file itself \
                 there)"
                    .into(),
            ),
            _ => io_error(path)(e),
        })?;
    let meta = file.metadata().map_err(io_error(path))?;
    if !meta.is_file() {
        return Err(refuse(path, "the key file is not a regular file".into()));
    }
    if !trusted_owner(meta.uid()) {
        return Err(refuse(
            path,
            format!(
                "the key file is owned by uid {}, not by root or uid {} (which nvseal runs as)",
                meta.uid(),
                nix::unistd::geteuid()
            ),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & DIR_WRITE_OTHERS_MASK != 0 {
        return Err(refuse(
            path,
            format!("the key file is writable by others (mode {mode:04o}); chmod 0600 it"),
        ));
    }
    Ok((file, mode, meta.len()))
}

/// Creates a fresh temporary file next to `path`: a random name, `O_CREAT | O_EXCL |
/// O_NOFOLLOW`, mode 0600, so nothing planted in the directory (a file, a symbolic link) is
/// opened or followed. Returns the file and its path.
fn create_temp(dir: &Path, path: &Path) -> Result<(File, PathBuf), ProviderError> {
    let name = path
        .file_name()
        .ok_or_else(|| bad_file(path, 0, "key file path has no file name"))?;
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
    let tmp = dir.join(tmp_name);
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io_error(&tmp))?;
    Ok((f, tmp))
}

/// Writes `contents` to a new temporary file (see [`create_temp`]) and syncs it, then calls
/// `publish(tmp)`; removes the temporary file if anything failed (or, after a link, always).
fn write_temp_then(
    path: &Path,
    contents: &[u8],
    publish: impl FnOnce(&Path) -> Result<(), ProviderError>,
) -> Result<(), ProviderError> {
    check_key_dir(path)?;
    let dir = parent_dir(path);
    let (mut f, tmp) = create_temp(&dir, path)?;
    let written = f
        .write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(io_error(&tmp));
    drop(f);
    let result = written.and_then(|()| publish(&tmp));
    // After a rename the temporary name is gone (NotFound); after a link or a failure it is
    // removed here. A failure to remove it leaves a 0600 file in a trusted directory.
    let _ = fs::remove_file(&tmp);
    result?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(&dir))
}

/// Replaces `path` with `contents` crash-safely: a temporary file (see [`create_temp`]), fsync,
/// rename over the key file, fsync of the directory. `rename` replaces the directory entry and
/// never follows a link there.
fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), ProviderError> {
    write_temp_then(path, contents, |tmp| {
        fs::rename(tmp, path).map_err(io_error(path))
    })
}

/// Creates `path` with `contents` crash-safely and only if nothing is there yet (not even a
/// dangling link): a temporary file, fsync, `link` to the key path (which fails if the name
/// exists), unlink of the temporary name, fsync of the directory.
fn create_exclusively(path: &Path, contents: &[u8]) -> Result<(), ProviderError> {
    write_temp_then(path, contents, |tmp| {
        fs::hard_link(tmp, path).map_err(io_error(path))
    })
}

/// Creates the key file's directory, mode 0700, if it is missing (with any missing parents, also
/// 0700).
fn create_key_dir(path: &Path) -> Result<(), ProviderError> {
    let dir = parent_dir(path);
    match fs::symlink_metadata(&dir) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_error(&dir))?;
            tracing::info!(dir = %dir.display(), "created the key file's directory (mode 0700)");
            Ok(())
        }
        Err(e) => Err(io_error(&dir)(e)),
    }
}

impl LocalKeyProvider {
    /// Opens (or, with [`CreateMode::CreateIfMissing`], creates, along with a missing directory,
    /// mode 0700) the key file, after checking its location (see the module documentation: an
    /// untrusted directory, a symbolic link at the key path or a file others may write is refused
    /// with [`ProviderError::Io`] of kind `PermissionDenied` that says why). Logs a NOT FOR
    /// PRODUCTION warning every time, and another if the file is readable by anyone but its owner.
    pub fn open(path: impl Into<PathBuf>, mode: CreateMode) -> Result<Self, ProviderError> {
        let path = path.into();
        tracing::warn!(
            path = %path.display(),
            "local key provider in use: KEKs are stored IN CLEAR in a file. NOT FOR PRODUCTION: \
             anyone who can read this file can decrypt every namespace wrapped under it"
        );
        if mode == CreateMode::CreateIfMissing {
            create_key_dir(&path)?;
        }
        check_key_dir(&path)?;
        let mut mode_too_wide = None;
        let entries = match open_key_file(&path) {
            Ok((file, mode_bits, len)) => {
                if mode_bits & MODE_TOO_WIDE_MASK != 0 {
                    mode_too_wide = Some(mode_bits);
                    tracing::warn!(
                        path = %path.display(),
                        mode = format_args!("{mode_bits:04o}"),
                        "key file permissions are wider than 0600: other users may read the KEKs"
                    );
                }
                if len > KEY_FILE_MAX_BYTES {
                    return Err(bad_file(&path, 0, "file too large for a key file"));
                }
                // Sized up front so that reading does not reallocate (and leave unwiped copies).
                let mut bytes = Zeroizing::new(Vec::with_capacity(len as usize + 1));
                file.take(KEY_FILE_MAX_BYTES + 1)
                    .read_to_end(&mut bytes)
                    .map_err(io_error(&path))?;
                if bytes.len() as u64 > KEY_FILE_MAX_BYTES {
                    return Err(bad_file(&path, 0, "file too large for a key file"));
                }
                parse(&path, &bytes)?
            }
            Err(ProviderError::Io { source, .. })
                if source.kind() == io::ErrorKind::NotFound
                    && mode == CreateMode::CreateIfMissing =>
            {
                let kek = Kek::generate().map_err(|e| KeyError::Rng(e.to_string()))?;
                let entries = vec![default_entry(Zeroizing::new(*kek.expose()))];
                let contents = render(&entries);
                create_exclusively(&path, contents.as_bytes())?;
                tracing::warn!(path = %path.display(), "created local key file with KEK \"default\"");
                entries
            }
            Err(e) => return Err(e),
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
        let kek = Kek::generate().map_err(|e| KeyError::Rng(e.to_string()))?;
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
            KekState::Active | KekState::PreActive => self.set_state(id, KekState::Revoked, false),
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
            state @ (KekState::Active | KekState::PreActive) => Err(ProviderError::InvalidState {
                id: id.clone(),
                state,
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
mod tests;
