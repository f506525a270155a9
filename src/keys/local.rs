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
    use std::os::unix::fs::PermissionsExt;

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

    /// The error text of a refused open.
    fn refusal(r: Result<LocalKeyProvider, ProviderError>) -> String {
        match r {
            Err(ProviderError::Io { path, source }) => {
                let text = format!("key file {path}: {source}");
                assert_eq!(source.kind(), io::ErrorKind::PermissionDenied, "{text}");
                text
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn mode_of(p: &Path) -> u32 {
        fs::symlink_metadata(p).expect("meta").permissions().mode() & 0o7777
    }

    /// chown needs root; the test suite runs as root (see README).
    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn key_dir_owned_by_another_uid_is_refused() {
        if !is_root() {
            eprintln!("skipped: chown needs root");
            return;
        }
        let top = tempfile::tempdir().expect("tempdir");
        let dir = top.path().join("keys.d");
        fs::create_dir(&dir).expect("mkdir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        let path = dir.join("keys");
        LocalKeyProvider::open(&path, CreateMode::CreateIfMissing).expect("create");
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).expect("chown");
        let text = refusal(LocalKeyProvider::open(&path, CreateMode::MustExist));
        assert!(text.contains("owned by uid 65534"), "{text}");
        assert!(text.contains(&dir.display().to_string()), "{text}");
        // Nor is a new file created there.
        let other = dir.join("other");
        let text = refusal(LocalKeyProvider::open(&other, CreateMode::CreateIfMissing));
        assert!(text.contains("owned by uid 65534"), "{text}");
        assert!(!other.exists());
        // An ancestor owned by someone else is refused too.
        std::os::unix::fs::chown(&dir, Some(0), Some(0)).expect("chown back");
        std::os::unix::fs::chown(top.path(), Some(65534), None).expect("chown top");
        let text = refusal(LocalKeyProvider::open(&path, CreateMode::MustExist));
        assert!(text.contains("owned by uid 65534"), "{text}");
        std::os::unix::fs::chown(top.path(), Some(0), None).expect("chown top back");
        LocalKeyProvider::open(&path, CreateMode::MustExist).expect("trusted again");
    }

    #[test]
    fn key_file_owned_by_another_uid_or_writable_by_others_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys");
        LocalKeyProvider::open(&path, CreateMode::CreateIfMissing).expect("create");
        for mode in [0o620, 0o602, 0o666] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
            let text = refusal(LocalKeyProvider::open(&path, CreateMode::MustExist));
            assert!(text.contains("writable by others"), "{mode:o}: {text}");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        if is_root() {
            std::os::unix::fs::chown(&path, Some(65534), None).expect("chown");
            let text = refusal(LocalKeyProvider::open(&path, CreateMode::MustExist));
            assert!(text.contains("key file is owned by uid 65534"), "{text}");
        }
    }

    #[test]
    fn group_or_world_writable_key_dir_is_refused() {
        let top = tempfile::tempdir().expect("tempdir");
        let dir = top.path().join("keys.d");
        fs::create_dir(&dir).expect("mkdir");
        let path = dir.join("keys");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
        LocalKeyProvider::open(&path, CreateMode::CreateIfMissing).expect("create");
        // The key file's own directory: no write for group or others, sticky bit or not.
        for (mode, who) in [
            (0o770, "its group"),
            (0o777, "everyone"),
            (0o1777, "everyone"),
        ] {
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).expect("chmod");
            let text = refusal(LocalKeyProvider::open(&path, CreateMode::MustExist));
            assert!(
                text.contains(&format!("is writable by {who}")),
                "{mode:o}: {text}"
            );
            assert!(text.contains("directory of its own"), "{text}");
            let text = refusal(LocalKeyProvider::open(
                dir.join("new"),
                CreateMode::CreateIfMissing,
            ));
            assert!(text.contains("writable by"), "{text}");
            assert!(!dir.join("new").exists());
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        // An ancestor: world-writable without the sticky bit is refused, with it accepted.
        fs::set_permissions(top.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
        let text = refusal(LocalKeyProvider::open(&path, CreateMode::MustExist));
        assert!(
            text.contains(&format!(
                "directory {} is writable by everyone",
                top.path().display()
            )),
            "{text}"
        );
        fs::set_permissions(top.path(), fs::Permissions::from_mode(0o1777)).expect("chmod");
        LocalKeyProvider::open(&path, CreateMode::MustExist).expect("sticky ancestor is fine");
        fs::set_permissions(top.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
    }

    #[test]
    fn links_in_the_directory_path_are_resolved_and_checked() {
        let top = tempfile::tempdir().expect("tempdir");
        let real = top.path().join("real");
        fs::create_dir(&real).expect("mkdir");
        fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).expect("chmod");
        LocalKeyProvider::open(real.join("keys"), CreateMode::CreateIfMissing).expect("create");
        // A link in a trusted directory to a trusted directory is fine.
        std::os::unix::fs::symlink(&real, top.path().join("via")).expect("symlink");
        LocalKeyProvider::open(top.path().join("via/keys"), CreateMode::MustExist)
            .expect("through a trusted link");
        // A link that sits in a directory others may write could be swapped: refused.
        let open = top.path().join("open");
        fs::create_dir(&open).expect("mkdir");
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).expect("chmod");
        std::os::unix::fs::symlink("../real", open.join("via")).expect("symlink");
        let text = refusal(LocalKeyProvider::open(
            open.join("via/keys"),
            CreateMode::MustExist,
        ));
        assert!(
            text.contains(&format!(
                "directory {} is writable by everyone",
                open.display()
            )),
            "{text}"
        );
        // A link whose target passes through such a directory: refused as well.
        let inner = open.join("inner");
        fs::create_dir(&inner).expect("mkdir");
        fs::set_permissions(&inner, fs::Permissions::from_mode(0o700)).expect("chmod");
        std::os::unix::fs::symlink(&inner, top.path().join("into-open")).expect("symlink");
        let text = refusal(LocalKeyProvider::open(
            top.path().join("into-open/keys"),
            CreateMode::CreateIfMissing,
        ));
        assert!(text.contains("writable by everyone"), "{text}");
        assert!(!inner.join("keys").exists());
    }

    #[test]
    fn symlink_at_the_key_path_is_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Somebody else's key file, with a KEK they know.
        let planted = dir.path().join("planted");
        fs::write(&planted, [0x5Au8; 32]).expect("write");
        fs::set_permissions(&planted, fs::Permissions::from_mode(0o600)).expect("chmod");
        let path = dir.path().join("keys");
        std::os::unix::fs::symlink(&planted, &path).expect("symlink");
        for mode in [CreateMode::MustExist, CreateMode::CreateIfMissing] {
            let text = refusal(LocalKeyProvider::open(&path, mode));
            assert!(text.contains("symbolic link"), "{text}");
        }
        // A dangling link is not created through either.
        let victim = dir.path().join("victim");
        fs::remove_file(&path).expect("rm");
        std::os::unix::fs::symlink(&victim, &path).expect("symlink");
        let err = LocalKeyProvider::open(&path, CreateMode::CreateIfMissing).expect_err("refused");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert!(!victim.exists(), "the link was followed");
        assert_eq!(fs::read(&planted).expect("read"), [0x5Au8; 32]);
    }

    #[test]
    fn rewrites_never_follow_a_planted_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys");
        let mut p = LocalKeyProvider::open(&path, CreateMode::CreateIfMissing).expect("create");
        // Links at the names a predictable temp file would have: a rewrite must write none of
        // their targets.
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").expect("write");
        for name in ["keys.tmp", ".keys.tmp", "keys~"] {
            std::os::unix::fs::symlink(&victim, dir.path().join(name)).expect("symlink");
        }
        let (id, kek) = p.create_kek("after plant").expect("create kek");
        assert_eq!(fs::read(&victim).expect("read"), b"precious");
        let meta = fs::symlink_metadata(&path).expect("meta");
        assert!(meta.file_type().is_file());
        assert_eq!(mode_of(&path), 0o600);
        let mut again = LocalKeyProvider::open(&path, CreateMode::MustExist).expect("reopen");
        assert_eq!(again.get_kek(&id).expect("get").expose(), kek.expose());
        // No temporary file is left behind.
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".keys.tmp", "keys", "keys.tmp", "keys~", "victim"]);
    }

    #[test]
    fn missing_key_dir_is_created_0700() {
        let top = tempfile::tempdir().expect("tempdir");
        let path = top.path().join("var/lib/nvseal/dev-kek.keys");
        assert!(matches!(
            LocalKeyProvider::open(&path, CreateMode::MustExist),
            Err(ProviderError::Io { .. })
        ));
        assert!(
            !top.path().join("var").exists(),
            "MustExist creates nothing"
        );
        LocalKeyProvider::open(&path, CreateMode::CreateIfMissing).expect("create");
        for d in ["var", "var/lib", "var/lib/nvseal"] {
            assert_eq!(mode_of(&top.path().join(d)), 0o700, "{d}");
        }
        assert_eq!(mode_of(&path), 0o600);
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
