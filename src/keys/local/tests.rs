//! Unit tests of `keys::local` (kept beside it, in their own file).

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
        (
            "# c\nk1 bogus 0000000000000000000000000000000000000000000000000000000000000000 n\n",
            2,
        ),
        (
            "k1 destroyed 0000000000000000000000000000000000000000000000000000000000000000 n\n",
            1,
        ),
        (
            "k1 active zz00000000000000000000000000000000000000000000000000000000000000 n\n",
            1,
        ),
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
