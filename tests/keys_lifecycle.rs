//! Namespace key lifecycle on a real file and a real key file, through the public API only:
//! format, reopen from a fresh file handle and a fresh provider (as after a restart), shallow
//! rekey twice, damage to one header copy, and the errors an operator sees.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use nvseal::keys::header::{CopyId, HeaderError, METADATA_REGION_BYTES};
use nvseal::keys::local::{CreateMode, LocalKeyProvider, DEFAULT_KEK_ID};
use nvseal::keys::provider::KekState;
use nvseal::keys::store::CopyFault;
use nvseal::keys::{
    format_encrypted, open_encrypted, shallow_rekey, DataUnit, FormatParams, KekId, KeyProvider,
    OpenError, RekeyState, RevokeOld, RevokeOutcome,
};

const DEVICE_BYTES: u64 = METADATA_REGION_BYTES + 256 * 4096;

fn provider(path: &Path) -> LocalKeyProvider {
    LocalKeyProvider::open(path, CreateMode::CreateIfMissing).expect("provider")
}

fn volume(path: &Path) -> std::fs::File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("volume")
}

#[test]
fn format_reopen_rekey_twice_and_survive_a_damaged_copy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys");
    let vol = dir.path().join("vol.img");
    std::fs::File::create(&vol)
        .and_then(|f| f.set_len(DEVICE_BYTES))
        .expect("create volume");

    let ns = uuid::Uuid::new_v4();
    let formatted = format_encrypted(
        &mut volume(&vol),
        &mut provider(&keys),
        &FormatParams::new(
            ns,
            DataUnit::Bytes4096,
            DEVICE_BYTES,
            KekId::new(DEFAULT_KEK_ID).expect("id"),
        ),
    )
    .expect("format");
    let dek = *formatted.dek.expose();

    // "Restart": new handles, new provider instance reading the key file again.
    let opened = open_encrypted(&mut volume(&vol), &mut provider(&keys)).expect("open");
    assert_eq!(opened.dek.expose(), &dek);
    assert_eq!(opened.header().namespace_uuid, ns);
    assert_eq!(opened.header().data_blocks, 256);

    // Two shallow rekeys in a row, the first revoking the old KEK.
    let mut p = provider(&keys);
    let (k1, kek1) = p.create_kek("rekey-1").expect("create");
    let out =
        shallow_rekey(&mut volume(&vol), &mut p, &k1, &kek1, RevokeOld::Yes).expect("rekey 1");
    assert!(matches!(out.revoke, RevokeOutcome::Revoked(_)));
    let (k2, kek2) = p.create_kek("rekey-2").expect("create");
    let out = shallow_rekey(&mut volume(&vol), &mut p, &k2, &kek2, RevokeOld::No).expect("rekey 2");
    assert!(matches!(out.revoke, RevokeOutcome::Skipped(ref id) if *id == k1));
    assert_eq!(out.stored.header.generation, 7);

    let mut fresh = provider(&keys);
    assert_eq!(
        fresh.state(&KekId::new(DEFAULT_KEK_ID).expect("id")),
        Some(KekState::Revoked)
    );
    let opened = open_encrypted(&mut volume(&vol), &mut fresh).expect("open after rekeys");
    assert_eq!(opened.dek.expose(), &dek, "shallow rekey keeps the DEK");
    assert_eq!(opened.header().active.kek_id, k2);

    // No copy still holds the DEK wrapped under a retired KEK (the rekey scrubs the stale copy).
    let image = std::fs::read(&vol).expect("read volume");
    let first_wrap = formatted.header().active.wrapped_dek;
    assert!(!image.windows(72).any(|w| w == &first_wrap.as_bytes()[..]));

    // Damage the current copy (generation 7 in copy A: format 1→A+B, then each rekey writes
    // three generations alternately: 2→B 3→A 4→B, 5→A 6→B 7→A). Copy B (generation 6, the
    // second rekey's switch) still opens the namespace with k2.
    assert_eq!(opened.header().generation, 7);
    assert_eq!(opened.stored.copy, CopyId::A);
    volume(&vol)
        .write_all_at(&[0xFF; 16], CopyId::A.offset_bytes() + 0x100)
        .expect("damage");
    let opened = open_encrypted(&mut volume(&vol), &mut fresh).expect("open from copy B");
    assert_eq!(opened.stored.copy, CopyId::B);
    assert_eq!(opened.header().generation, 6);
    assert_eq!(opened.header().active.kek_id, k2);
    assert_eq!(opened.header().rekey, RekeyState::None);
    assert_eq!(
        opened.stored.bad_copy(),
        Some((CopyId::A, &CopyFault::Decode(HeaderError::ChecksumMismatch)))
    );
    assert_eq!(opened.dek.expose(), &dek);

    // Once k2 is revoked the namespace stays locked, and the error names the KEK.
    fresh.revoke_kek(&k2).expect("revoke");
    match open_encrypted(&mut volume(&vol), &mut fresh) {
        Err(e @ OpenError::Provider(_)) => {
            assert!(e.to_string().contains(k2.as_str()), "{e}");
            assert!(!e.is_transient());
        }
        other => panic!("expected a provider error, got {other:?}"),
    }
}
