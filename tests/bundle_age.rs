//! Support bundles end to end: write one from real files, open it with the age crate and,
//! where Debian's `age` CLI is installed, with `age -d` itself; check every entry, the
//! password's absence from the file, refusal of a wrong password, and no overwrite.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nvseal::bundle::{
    read_bundle, redact_config, write_bundle, write_bundle_with, BundleContents, BundleError,
    BundleOptions, SecretString, Versions,
};
use serde_json::{json, Value};

const PASSWORD: &str = "tr0ub4dor&3-correct-horse";
const DEK_HEX: &str = "8f4e0c3b2a19f7e6d5c4b3a29180706f5e4d3c2b1a09f8e7d6c5b4a392817060";

fn contents(dir: &Path) -> BundleContents {
    let small = dir.join("nvseal.log");
    std::fs::write(
        &small,
        "2026-11-28T00:00:00Z INFO started\n2026-11-28T00:00:01Z WARN kms slow\n",
    )
    .unwrap();
    let big = dir.join("nvseal.log.1");
    let mut text = String::new();
    for i in 0..5000 {
        text.push_str(&format!("line {i:05} of the rotated log\n"));
    }
    std::fs::write(&big, &text).unwrap();
    let config = format!(
        "rpc:\n  socket_path: /run/nvseal/nvseal.sock\nkms:\n  password: {PASSWORD}\n  dek: {DEK_HEX}\n"
    );
    BundleContents {
        config_redacted: redact_config(&config),
        logs: vec![small, big, dir.join("missing.log")],
        stats: json!({"namespaces": [{"nsid": 1, "read_iops": 1234}]}),
        versions: Versions::collect(),
    }
}

fn fast() -> BundleOptions {
    // A low scrypt cost keeps the test quick; the format is the same.
    BundleOptions {
        max_log_bytes: 4096,
        scrypt_log_n: Some(12),
    }
}

fn entry<'a>(entries: &'a [(String, Vec<u8>)], name: &str) -> &'a [u8] {
    &entries
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} missing"))
        .1
}

#[test]
fn bundle_round_trip_with_the_age_crate() {
    let dir = tempfile::tempdir().unwrap();
    let c = contents(dir.path());
    let out = dir.path().join("support.age");
    let pw = SecretString::from(PASSWORD);
    let summary = write_bundle_with(&out, &pw, &c, &fast()).unwrap();
    assert_eq!(summary.bytes, std::fs::metadata(&out).unwrap().len());
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(std::fs::read(&out)
        .unwrap()
        .starts_with(b"age-encryption.org/v1\n-> scrypt "));
    // No temp file is left beside it.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.to_string_lossy().contains(".partial")),
        "{names:?}"
    );

    let entries = read_bundle(&out, &pw).unwrap();
    let listed: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        listed,
        summary
            .entries
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );
    let config = String::from_utf8(entry(&entries, "nvseal-bundle/config.yaml").to_vec()).unwrap();
    assert!(
        config.contains("socket_path: /run/nvseal/nvseal.sock"),
        "{config}"
    );
    assert!(
        config.contains("password: <redacted>") && config.contains("dek: <redacted>"),
        "{config}"
    );
    assert!(!config.contains(PASSWORD) && !config.contains(DEK_HEX));
    let stats: Value = serde_json::from_slice(entry(&entries, "nvseal-bundle/stats.json")).unwrap();
    assert_eq!(stats["namespaces"][0]["read_iops"], 1234);
    let versions: Value =
        serde_json::from_slice(entry(&entries, "nvseal-bundle/versions.json")).unwrap();
    assert!(
        versions["nvseal"]
            .as_str()
            .unwrap()
            .starts_with(env!("CARGO_PKG_VERSION")),
        "{versions}"
    );
    assert!(versions["kernel"].as_str().unwrap().len() > 1);
    assert!(versions["cpu_flags"].is_array());
    let small = entry(&entries, "nvseal-bundle/logs/00-nvseal.log");
    assert_eq!(
        small,
        std::fs::read(dir.path().join("nvseal.log"))
            .unwrap()
            .as_slice()
    );
    // The big log is cut to its newest 4096 bytes.
    let big = entry(&entries, "nvseal-bundle/logs/01-nvseal.log.1");
    let full = std::fs::read(dir.path().join("nvseal.log.1")).unwrap();
    assert_eq!(big, &full[full.len() - 4096..]);
    let manifest: Value =
        serde_json::from_slice(entry(&entries, "nvseal-bundle/MANIFEST.json")).unwrap();
    assert_eq!(manifest["format"], "nvseal-bundle/1");
    assert_eq!(manifest["logs"][1]["skipped_head_bytes"], full.len() - 4096);
    assert!(
        manifest["logs"][2]["error"]
            .as_str()
            .unwrap()
            .contains("No such file"),
        "{manifest}"
    );

    // The password is nowhere in the file, in any encoding.
    let bytes = std::fs::read(&out).unwrap();
    nvseal::leak::assert_no_secret(&bytes, PASSWORD.as_bytes(), "bundle file");
    // A wrong password is refused.
    let wrong = read_bundle(&out, &SecretString::from("tr0ub4dor&3-wrong-horse"));
    assert!(matches!(wrong, Err(BundleError::Age(_))), "{wrong:?}");
    // Never overwrites.
    let again = write_bundle_with(&out, &pw, &c, &fast());
    assert!(matches!(again, Err(BundleError::Exists(_))), "{again:?}");
}

#[test]
fn default_options_write_a_readable_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let c = contents(dir.path());
    let out = dir.path().join("default.age");
    let pw = SecretString::from(PASSWORD);
    write_bundle(&out, &pw, &c).unwrap();
    let entries = read_bundle(&out, &pw).unwrap();
    assert_eq!(
        entry(&entries, "nvseal-bundle/logs/01-nvseal.log.1").len(),
        5000 * 30
    );
}

/// Runs `age -d` under `script` (age reads passphrases only from a terminal): waits for the
/// prompt, types the password, returns (exit ok, decrypted bytes).
fn age_cli_decrypt(bundle: &Path, out: &Path, password: &str) -> (bool, Vec<u8>) {
    let cmd = format!("age -d -o '{}' '{}'", out.display(), bundle.display());
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn script");
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("passphrase") {
        let n = stdout.read(&mut buf).expect("read prompt");
        assert!(
            n > 0,
            "age exited before prompting: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(format!("{password}\n").as_bytes()).unwrap();
    let mut rest = Vec::new();
    let _ = stdout.read_to_end(&mut rest);
    drop(stdin);
    let status = child.wait().unwrap();
    (status.success(), std::fs::read(out).unwrap_or_default())
}

#[test]
fn age_cli_opens_the_bundle() {
    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("age") || !have("script") {
        eprintln!(
            "SKIP age_cli_opens_the_bundle: needs the age CLI (apt-get install age) and script(1)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = contents(dir.path());
    let bundle = dir.path().join("cli.age");
    write_bundle_with(&bundle, &SecretString::from(PASSWORD), &c, &fast()).unwrap();
    let tar_path = dir.path().join("cli.tar");
    let (ok, tar_bytes) = age_cli_decrypt(&bundle, &tar_path, PASSWORD);
    assert!(ok, "age -d failed");
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    let mut names = Vec::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        if name.ends_with("stats.json") {
            let mut s = String::new();
            e.read_to_string(&mut s).unwrap();
            assert!(s.contains("1234"));
        }
        names.push(name);
    }
    assert!(
        names.contains(&"nvseal-bundle/config.yaml".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"nvseal-bundle/MANIFEST.json".to_string()),
        "{names:?}"
    );
    // And the CLI refuses a wrong password.
    let (ok, _) = age_cli_decrypt(&bundle, &dir.path().join("wrong.tar"), "not-the-password");
    assert!(!ok, "age -d accepted a wrong password");
}
