//! Independent check of docs/on-disk-format.md: a volume formatted by nvseal, with data encrypted
//! the way dm-crypt `aes-xts-plain64` does (tweak = data-unit number inside the data area, little
//! endian), is read back with standard tools only, following the document's recipe:
//!
//! 1. `dd` the wrapped DEK out of header copy A at its documented byte offset;
//! 2. unwrap it with the OpenSSL command line (`openssl enc -d -id-aes256-wrap`, RFC 3394) and
//!    the KEK hex from the local key file;
//! 3. `dd` the data area from the documented data offset and decrypt it with AES-256-XTS from
//!    Python's `cryptography` package (OpenSSL 3.0's `enc` refuses XTS ciphers, so the CLI
//!    cannot do this step; see the document).
//!
//! The data is encrypted in the test with the `openssl` crate (EVP aes-256-xts), standing in for
//! dm-crypt or nvseal's crypto bdev. Nothing in steps 1-3 uses nvseal code or the DEK nvseal
//! returned: the DEK comes out of the CLI unwrap.
//!
//! Needs `openssl`, `dd` and `python3` with `cryptography` (Debian: python3-cryptography) on
//! PATH; fails with a clear message when one is missing.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use nvseal::keys::header::{layout, CopyId, METADATA_REGION_BYTES};
use nvseal::keys::local::{CreateMode, LocalKeyProvider, DEFAULT_KEK_ID};
use nvseal::keys::{format_encrypted, open_encrypted, DataUnit, FormatParams, KekId};
use openssl::symm::{Cipher, Crypter, Mode};

/// Data units written per test volume.
const DATA_BLOCKS: u64 = 24;

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is it installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Deterministic, block-distinct plaintext.
fn plaintext(lba: u64, unit: usize) -> Vec<u8> {
    (0..unit)
        .map(|i| (lba as usize * 131 + i * 7 + (i >> 8)) as u8)
        .collect()
}

/// dm-crypt aes-xts-plain64: IV = data-unit number, 64-bit little endian, zero padded to 16.
fn xts_encrypt(dek: &[u8; 64], lba: u64, data: &[u8]) -> Vec<u8> {
    let mut iv = [0u8; 16];
    iv[..8].copy_from_slice(&lba.to_le_bytes());
    let mut c =
        Crypter::new(Cipher::aes_256_xts(), Mode::Encrypt, dek, Some(&iv)).expect("crypter");
    c.pad(false);
    let mut out = vec![0u8; data.len() + 16];
    let n = c.update(data, &mut out).expect("update");
    let m = c.finalize(&mut out[n..]).expect("finalize");
    out.truncate(n + m);
    out
}

/// The KEK hex of `id`, read from the key file text as the document tells an operator to.
fn kek_hex_from_key_file(path: &Path, id: &str) -> String {
    let text = fs::read_to_string(path).expect("key file");
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .expect("KEK line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[1], "active");
    fields[2].to_owned()
}

fn check_volume(unit: DataUnit) {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_path = dir.path().join("keys");
    let vol = dir.path().join("volume.img");
    let unit_bytes = unit.bytes() as usize;
    let device_bytes = METADATA_REGION_BYTES + DATA_BLOCKS * unit_bytes as u64;

    let mut provider =
        LocalKeyProvider::open(&key_path, CreateMode::CreateIfMissing).expect("provider");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&vol)
        .expect("volume");
    file.set_len(device_bytes).expect("set_len");
    let kek_id = KekId::new(DEFAULT_KEK_ID).expect("id");
    let formatted = format_encrypted(
        &mut file,
        &mut provider,
        &FormatParams::new(uuid::Uuid::new_v4(), unit, device_bytes, kek_id),
    )
    .expect("format");
    let header = formatted.header().clone();
    assert_eq!(header.data_blocks, DATA_BLOCKS);
    assert_eq!(header.data_offset_bytes, METADATA_REGION_BYTES);

    // Write the data area as dm-crypt would.
    let dek = *formatted.dek.expose();
    for lba in 0..DATA_BLOCKS {
        let ct = xts_encrypt(&dek, lba, &plaintext(lba, unit_bytes));
        file.write_all_at(&ct, header.data_offset_bytes + lba * unit_bytes as u64)
            .expect("write data");
    }
    file.sync_all().expect("sync");
    drop(file);
    // nvseal itself still opens it.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&vol)
        .expect("reopen");
    let reopened = open_encrypted(&mut file, &mut provider).expect("open");
    assert_eq!(reopened.dek.expose(), &dek);

    // 1. The wrapped DEK at its documented offset (copy A + active slot + wrapped-DEK field).
    let wrapped_off =
        CopyId::A.offset_bytes() as usize + layout::ACTIVE_SLOT + layout::SLOT_WRAPPED_DEK;
    assert_eq!(
        wrapped_off, 0x228,
        "docs/on-disk-format.md names this offset"
    );
    let wrapped = dir.path().join("wrapped.bin");
    run(Command::new("dd")
        .arg(format!("if={}", vol.display()))
        .arg(format!("of={}", wrapped.display()))
        .args(["iflag=skip_bytes,count_bytes", "bs=4096", "status=none"])
        .arg(format!("skip={wrapped_off}"))
        .arg("count=72"));

    // 2. Unwrap with the OpenSSL CLI and the KEK from the key file.
    let kek_hex = kek_hex_from_key_file(&key_path, DEFAULT_KEK_ID);
    let dek_file = dir.path().join("dek.bin");
    run(Command::new("openssl")
        .args([
            "enc",
            "-d",
            "-id-aes256-wrap",
            "-iv",
            "A6A6A6A6A6A6A6A6",
            "-K",
        ])
        .arg(&kek_hex)
        .arg("-in")
        .arg(&wrapped)
        .arg("-out")
        .arg(&dek_file));
    let cli_dek = fs::read(&dek_file).expect("dek");
    assert_eq!(cli_dek.len(), 64);
    assert_eq!(
        cli_dek, dek,
        "OpenSSL's RFC 3394 unwrap yields nvseal's DEK"
    );

    // 3. The data area from the documented data offset, decrypted by Python cryptography.
    let data = dir.path().join("data.bin");
    run(Command::new("dd")
        .arg(format!("if={}", vol.display()))
        .arg(format!("of={}", data.display()))
        .arg(format!("bs={unit_bytes}"))
        .arg(format!(
            "skip={}",
            header.data_offset_bytes / unit_bytes as u64
        ))
        .arg(format!("count={DATA_BLOCKS}"))
        .arg("status=none"));
    let script = r#"
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
dek = open(sys.argv[1], 'rb').read()
data = open(sys.argv[2], 'rb').read()
unit = int(sys.argv[3])
out = bytearray()
for lba in range(len(data) // unit):
    tweak = lba.to_bytes(8, 'little') + bytes(8)
    d = Cipher(algorithms.AES(dek), modes.XTS(tweak)).decryptor()
    out += d.update(data[lba * unit:(lba + 1) * unit]) + d.finalize()
sys.stdout.buffer.write(out)
"#;
    let plain = run(Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&dek_file)
        .arg(&data)
        .arg(unit_bytes.to_string()));
    assert_eq!(plain.len(), DATA_BLOCKS as usize * unit_bytes);
    for lba in 0..DATA_BLOCKS {
        let got = &plain[lba as usize * unit_bytes..(lba as usize + 1) * unit_bytes];
        assert_eq!(got, plaintext(lba, unit_bytes), "data unit {lba}");
    }

    // The CLI rejects a wrong KEK (integrity check), as nvseal does.
    let wrong = "00".repeat(32);
    let status = Command::new("openssl")
        .args([
            "enc",
            "-d",
            "-id-aes256-wrap",
            "-iv",
            "A6A6A6A6A6A6A6A6",
            "-K",
            &wrong,
        ])
        .arg("-in")
        .arg(&wrapped)
        .arg("-out")
        .arg(dir.path().join("bad.bin"))
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(!status.success());
}

#[test]
fn volume_with_4096_byte_units_reads_with_standard_tools() {
    check_volume(DataUnit::Bytes4096);
}

#[test]
fn volume_with_512_byte_units_reads_with_standard_tools() {
    check_volume(DataUnit::Bytes512);
}

/// The documented check value of the KEK fingerprint (docs/on-disk-format.md §3): KEK = 32 bytes
/// `0x01`.
const FINGERPRINT_CHECK_VALUE: &str =
    "fa25d833ed572c7b80436ac0e5b7cff9f69469e7219678b692074344990ba5f7";

/// `printf 'nvseal kek fingerprint v1' | openssl dgst -sha256 -mac HMAC -macopt hexkey:<kek>`,
/// the documented command line; returns the 64 hex digits it prints.
fn openssl_fingerprint(kek_hex: &str) -> String {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-mac", "HMAC", "-macopt"])
        .arg(format!("hexkey:{kek_hex}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run openssl (is it installed?)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"nvseal kek fingerprint v1")
        .expect("write label");
    let out = child.wait_with_output().expect("openssl dgst");
    assert!(
        out.status.success(),
        "openssl dgst failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "HMAC-SHA2-256(stdin)= <hex>" (the algorithm name varies between OpenSSL versions).
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .split_whitespace()
        .last()
        .expect("digest")
        .to_owned()
}

/// One fingerprint, pinned three ways: the documented OpenSSL command line gives the documented
/// check value; nvseal's `Kek::fingerprint` (the only definition, used by the KMS client and
/// the header code alike) gives the same; and a header formatted by nvseal carries, at the
/// documented offset, what the command computes from the key file's KEK, which the KMS client's
/// fingerprint check accepts.
#[test]
fn kek_fingerprint_is_the_documented_openssl_value() {
    let doc = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/on-disk-format.md"
    ))
    .expect("docs/on-disk-format.md");
    assert!(
        doc.contains(FINGERPRINT_CHECK_VALUE),
        "the document gives the check value"
    );
    assert!(
        doc.contains(
            "printf 'nvseal kek fingerprint v1' | openssl dgst -sha256 -mac HMAC -macopt hexkey:"
        ),
        "the document gives the command line"
    );
    assert_eq!(
        openssl_fingerprint(&"01".repeat(32)),
        FINGERPRINT_CHECK_VALUE
    );
    let kek = nvseal::kms::Kek::from_slice(&[0x01; 32]).expect("kek");
    assert_eq!(
        kek.fingerprint().to_string(),
        format!("hmac-sha256:{FINGERPRINT_CHECK_VALUE}")
    );

    // A formatted header: the fingerprint field of the active slot in copy A.
    let dir = tempfile::tempdir().expect("tempdir");
    let key_path = dir.path().join("keys");
    let mut provider =
        LocalKeyProvider::open(&key_path, CreateMode::CreateIfMissing).expect("provider");
    let device_bytes = METADATA_REGION_BYTES + 8 * 4096;
    let mut file = tempfile::tempfile().expect("volume");
    file.set_len(device_bytes).expect("set_len");
    let formatted = format_encrypted(
        &mut file,
        &mut provider,
        &FormatParams::new(
            uuid::Uuid::new_v4(),
            DataUnit::Bytes4096,
            device_bytes,
            KekId::new(DEFAULT_KEK_ID).expect("id"),
        ),
    )
    .expect("format");
    let fp_off = CopyId::A.offset_bytes() + (layout::ACTIVE_SLOT + layout::SLOT_FINGERPRINT) as u64;
    assert_eq!(fp_off, 0x208, "copy A + active slot 0x0C0 + field 0x148");
    let mut on_disk = [0u8; 32];
    file.read_exact_at(&mut on_disk, fp_off).expect("read");
    let on_disk_hex: String = on_disk.iter().map(|b| format!("{b:02x}")).collect();
    let kek_hex = kek_hex_from_key_file(&key_path, DEFAULT_KEK_ID);
    assert_eq!(on_disk_hex, openssl_fingerprint(&kek_hex));
    assert_eq!(&on_disk, formatted.header().active.fingerprint.as_bytes());

    // The KMS client's check accepts the header's fingerprint for that KEK, and only for it.
    let kek_bytes: Vec<u8> = (0..kek_hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&kek_hex[i..i + 2], 16).expect("hex"))
        .collect();
    let server: nvseal::kms::ServerAddr = "127.0.0.1:5696".parse().expect("addr");
    let id = nvseal::kms::KeyId::new(DEFAULT_KEK_ID);
    let stored = formatted.header().active.fingerprint;
    let fetched = nvseal::kms::Kek::from_slice(&kek_bytes).expect("kek");
    assert!(nvseal::kms::check_fingerprint(fetched, &id, &stored, &server).is_ok());
    let other = nvseal::kms::Kek::from_slice(&[0x01; 32]).expect("kek");
    assert!(nvseal::kms::check_fingerprint(other, &id, &stored, &server).is_err());
}
