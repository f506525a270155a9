//! Unit tests of encrypt and decrypt in place (docs/lifecycle.md §7): whole passes, a power loss
//! at every operation and a torn write at every write, with the header in front of the data area
//! and detached, for 512 B and 4 KiB data units; every unit checked at the end (decrypt:
//! plaintext; encrypt: AES-256-XTS under the DEK with tweak = LBA, checked with OpenSSL), no
//! wrapped DEK left after a decrypt, no plaintext left anywhere after an encrypt; detached-header
//! refusals.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashSet};
use std::rc::Rc;

use openssl::symm::{Cipher, Crypter, Mode};

use super::*;
use crate::crypto::bdev::DataKey;
use crate::crypto::key::XtsKey;
use crate::keys::header::tests::{sample, slot};
use crate::keys::header::{DataUnit, Detached};
use crate::keys::store::{CrashMode, Fault, MemIo};

const NOW: u64 = 1_800_000_000;
const SEG: u32 = 3;
const LABEL: &str = "nqn.2026-12.invalid:ns-a";

fn dek_bytes() -> [u8; 64] {
    let mut k = [0u8; 64];
    for (i, b) in k.iter_mut().enumerate() {
        *b = 0x31u8
            .wrapping_mul(7)
            .wrapping_add((i as u8).wrapping_mul(13));
    }
    k
}

fn dek() -> DataKey {
    DataKey::new(&XtsKey::from_bytes(&dek_bytes()).unwrap(), None).unwrap()
}

/// dm-crypt aes-xts-plain64 with OpenSSL: tweak = LBA, 64-bit little endian.
fn openssl_encrypt(lba: u64, data: &[u8]) -> Vec<u8> {
    let mut iv = [0u8; 16];
    iv[..8].copy_from_slice(&lba.to_le_bytes());
    let mut c = Crypter::new(
        Cipher::aes_256_xts(),
        Mode::Encrypt,
        &dek_bytes(),
        Some(&iv),
    )
    .expect("crypter");
    c.pad(false);
    let mut out = vec![0u8; data.len() + 16];
    let n = c.update(data, &mut out).expect("update");
    let m = c.finalize(&mut out[n..]).expect("finalize");
    out.truncate(n + m);
    out
}

/// Plaintext of data unit `lba` in version `v` (0 = the data the namespace held before).
fn plain(lba: u64, v: u32, unit: usize) -> Vec<u8> {
    (0..unit)
        .map(|i| (lba as u32 ^ v.wrapping_mul(0x9e37) ^ i as u32).to_le_bytes()[i % 4] ^ 0x5a)
        .collect()
}

/// A positioned view at `base` of one simulated medium. A detached header and its data device
/// are two views of the same [`MemIo`], so that one power loss hits both at the same instant.
#[derive(Clone)]
struct View {
    dev: Rc<RefCell<MemIo>>,
    base: u64,
}

impl HeaderIo for View {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.dev.borrow_mut().read_at(self.base + off, buf)
    }
    fn write_at(&mut self, off: u64, buf: &[u8]) -> io::Result<()> {
        self.dev.borrow_mut().write_at(self.base + off, buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.dev.borrow_mut().flush()
    }
}

trait Dev: HeaderIo + DataIo {}
impl<T: HeaderIo + DataIo + ?Sized> Dev for T {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// The metadata region in front of the data area (data at 1 MiB).
    Front,
    /// A detached header file; the data device starts with the data area (offset 0). Simulated
    /// as the medium's first MiB (the header file) and the rest (the data device).
    Detached,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// Decrypt an encrypted namespace.
    Encrypted,
    /// Encrypt a plaintext namespace whose metadata region (or new header file) is blank.
    Blank,
    /// Encrypt a plaintext namespace whose header is retired (left by a decrypt).
    Retired,
}

struct Setup {
    dev: Rc<RefCell<MemIo>>,
    unit: usize,
    blocks: u64,
    place: Place,
    direction: Direction,
    frame: PlainHeader,
}

fn frame(unit: DataUnit, blocks: u64, place: Place) -> PlainHeader {
    let mut f = sample().frame();
    f.generation = 1;
    f.data_unit = unit;
    f.data_blocks = blocks;
    if place == Place::Detached {
        f.data_offset_bytes = 0;
        f.detached = Some(Detached {
            label: LABEL.to_owned(),
        });
    }
    f
}

fn setup(unit: DataUnit, blocks: u64, place: Place, start: Start) -> Setup {
    let u = unit.bytes() as usize;
    let dev = Rc::new(RefCell::new(
        MemIo::new(METADATA_REGION_BYTES as usize + blocks as usize * u).with_atomic_bytes(u),
    ));
    let f = frame(unit, blocks, place);
    let mut header = View {
        dev: dev.clone(),
        base: 0,
    };
    match start {
        Start::Encrypted => {
            let h = Header::from_frame(&f, slot("4711", 3), RekeyState::None);
            store::format(&mut header, &h).unwrap();
        }
        Start::Blank => {}
        Start::Retired => {
            for copy in CopyId::ALL {
                let b = f.encode(copy).unwrap();
                header.write_at(copy.offset_bytes(), &b[..]).unwrap();
            }
        }
    }
    let mut data = Vec::new();
    for lba in 0..blocks {
        let mut b = plain(lba, 0, u);
        if start == Start::Encrypted {
            dek().xts().encrypt_units(&mut b, u, lba).unwrap();
        }
        data.extend_from_slice(&b);
    }
    let mut d = dev.borrow_mut();
    d.write_at(METADATA_REGION_BYTES, &data).unwrap();
    d.flush().unwrap();
    drop(d);
    Setup {
        dev,
        unit: u,
        blocks,
        place,
        direction: if start == Start::Encrypted {
            Direction::Decrypt
        } else {
            Direction::Encrypt
        },
        frame: f,
    }
}

/// Runs `f` on the namespace as the conversion code sees it: [`WholeDevice`] for a header in
/// front of the data, [`DetachedDevice`] for a detached one.
fn with_dev<R>(s: &Setup, f: impl FnOnce(&mut dyn Dev) -> R) -> R {
    let mut header = View {
        dev: s.dev.clone(),
        base: 0,
    };
    match s.place {
        Place::Front => f(&mut WholeDevice {
            io: &mut header,
            data_offset_bytes: METADATA_REGION_BYTES,
            data_unit_bytes: s.unit as u32,
        }),
        Place::Detached => {
            let mut data = View {
                dev: s.dev.clone(),
                base: METADATA_REGION_BYTES,
            };
            f(&mut DetachedDevice {
                header: &mut header,
                data: &mut data,
                data_offset_bytes: 0,
                data_unit_bytes: s.unit as u32,
            })
        }
    }
}

/// Per unit, the versions the host may read back (empty: a write cut off, anything allowed).
struct Model(Vec<BTreeSet<u32>>);

impl Model {
    fn new(blocks: u64) -> Model {
        Model((0..blocks).map(|_| BTreeSet::from([0])).collect())
    }
}

/// A host write of version `v` to `lba` between steps, keyed as the header on disk says.
fn host_write(
    d: &mut dyn Dev,
    s: &Setup,
    cur: &Stored,
    lba: u64,
    v: u32,
    model: &mut Model,
) -> io::Result<()> {
    let c = conversion_state(&cur.header).expect("converting");
    let below = lba < c.watermark_blocks;
    let encrypted = match c.direction {
        Direction::Decrypt => !below,
        Direction::Encrypt => below,
    };
    let mut b = plain(lba, v, s.unit);
    if encrypted {
        dek().xts().encrypt_units(&mut b, s.unit, lba).unwrap();
    }
    if let Err(e) = d.write_blocks_durable(lba, &b) {
        model.0[lba as usize].clear();
        return Err(e);
    }
    model.0[lba as usize] = BTreeSet::from([v]);
    Ok(())
}

/// Runs (or resumes after a crash) the whole pass as the key manager will: read the header,
/// begin if not begun, recover, steps with a host write before each, finish; a finished pass
/// cut off before its last header write gets the other copy scrubbed. Stops at the first error.
fn drive(s: &Setup, model: &mut Model, writes: &mut u32) -> Result<(), ConvertError> {
    with_dev(s, |d| {
        let cur = match (s.direction, store::read_any(d)) {
            (Direction::Decrypt, Ok(any)) => match &any.header {
                AnyHeader::Plain(_) => {
                    scrub_other_copy_any(d, &any)?;
                    return Ok(());
                }
                AnyHeader::Keyed(h) if h.rekey == RekeyState::None => {
                    begin_decrypt(d, &any.keyed().expect("keyed"), SEG, NOW)?
                }
                AnyHeader::Keyed(_) => any.keyed().expect("keyed"),
            },
            (
                Direction::Encrypt,
                Err(StoreError::NotFormatted | StoreError::NoValidCopy { .. }),
            ) => begin_encrypt_blank(d, &s.frame, slot("dek-kek", 6), SEG, NOW)?,
            (Direction::Encrypt, Ok(any)) => match &any.header {
                AnyHeader::Plain(_) => begin_encrypt(d, &any, slot("dek-kek", 6), SEG, NOW)?,
                AnyHeader::Keyed(h) if h.rekey == RekeyState::None => {
                    scrub_other_copy(d, &any.keyed().expect("keyed"))?;
                    return Ok(());
                }
                AnyHeader::Keyed(_) => any.keyed().expect("keyed"),
            },
            (_, Err(e)) => return Err(e.into()),
        };
        let k = dek();
        let keys = match s.direction {
            Direction::Decrypt => Keys {
                below: None,
                above: Some(k.clone()),
            },
            Direction::Encrypt => Keys {
                below: Some(k.clone()),
                above: None,
            },
        };
        recover(d, &cur, &keys)?;
        let mut cur = cur;
        loop {
            *writes += 1;
            let lba = u64::from(*writes).wrapping_mul(7) % s.blocks;
            host_write(d, s, &cur, lba, *writes, model)?;
            match step(d, &cur, &keys, NOW)? {
                Step::Advanced(next) => cur = *next,
                Step::Complete => break,
            }
        }
        match s.direction {
            Direction::Decrypt => drop(finish_decrypt(d, &cur, NOW)?),
            Direction::Encrypt => drop(finish(d, &cur, NOW)?),
        }
        Ok(())
    })
}

/// After a finished pass: the header says so in both copies, every unit holds a version the
/// model allows in the final form, the journal area is zero; after a decrypt no copy of the
/// wrapped DEK is left, after an encrypt no plaintext of any version is left anywhere.
fn check_done(s: &Setup, model: &Model, writes: u32) {
    let img = s.dev.borrow().image().to_vec();
    let unit = s.unit;
    let mut header = View {
        dev: s.dev.clone(),
        base: 0,
    };
    for copy in CopyId::ALL {
        let got = store::read_copy_any(&mut header, copy).expect("both copies valid");
        match s.direction {
            Direction::Decrypt => assert!(matches!(got, AnyHeader::Plain(_)), "{copy:?}"),
            Direction::Encrypt => {
                let h = got.keyed().expect("keyed");
                assert_eq!(h.rekey, RekeyState::None);
                assert_eq!(h.active, slot("dek-kek", 6));
            }
        }
        // Version 1 unless a version-2 feature is still in use (detached).
        let v = u16::from_le_bytes([
            img[copy.offset_bytes() as usize + 8],
            img[copy.offset_bytes() as usize + 9],
        ]);
        let want = match (s.direction, s.place) {
            (Direction::Encrypt, Place::Front) => 1,
            _ => 2,
        };
        assert_eq!(v, want, "format version of {copy:?}");
    }
    for lba in 0..s.blocks {
        let off = METADATA_REGION_BYTES as usize + lba as usize * unit;
        let got = &img[off..off + unit];
        let allowed = &model.0[lba as usize];
        let ok = allowed.is_empty()
            || allowed.iter().any(|&v| {
                let p = plain(lba, v, unit);
                match s.direction {
                    Direction::Decrypt => got == &p[..],
                    Direction::Encrypt => got == &openssl_encrypt(lba, &p)[..],
                }
            });
        assert!(ok, "unit {lba} holds none of versions {allowed:?}");
    }
    let j = JOURNAL_OFFSET_BYTES as usize;
    assert!(
        img[j..METADATA_REGION_BYTES as usize]
            .iter()
            .all(|&b| b == 0),
        "journal area not zero"
    );
    match s.direction {
        Direction::Decrypt => {
            let wrapped = slot("4711", 3).wrapped_dek.0;
            assert!(
                !img[..METADATA_REGION_BYTES as usize]
                    .windows(wrapped.len())
                    .any(|w| w == wrapped),
                "a header copy still holds the wrapped DEK"
            );
        }
        Direction::Encrypt => {
            // Every 64-byte piece of every version the host or the device ever held.
            let mut pieces = HashSet::new();
            for lba in 0..s.blocks {
                for v in 0..=writes {
                    for piece in plain(lba, v, unit).chunks(64) {
                        pieces.insert(piece.to_vec());
                    }
                }
            }
            for (i, piece) in img.chunks(64).enumerate() {
                assert!(
                    !pieces.contains(piece),
                    "plaintext left at device byte {}",
                    i * 64
                );
            }
        }
    }
}

const CASES: [(Place, Start); 5] = [
    (Place::Front, Start::Encrypted),
    (Place::Front, Start::Blank),
    (Place::Front, Start::Retired),
    (Place::Detached, Start::Encrypted),
    (Place::Detached, Start::Blank),
];

#[test]
fn whole_passes_convert_every_unit() {
    for unit in [DataUnit::Bytes512, DataUnit::Bytes4096] {
        for (place, start) in CASES {
            let s = setup(unit, 20, place, start);
            let mut model = Model::new(20);
            let mut writes = 0;
            drive(&s, &mut model, &mut writes).unwrap();
            check_done(&s, &model, writes);
            // 20 units in segments of 3: 7 steps, each after a host write.
            assert_eq!(writes, 8, "{unit:?} {place:?} {start:?}");
        }
    }
}

/// Operations (writes + flushes) of a whole pass.
fn ops_of_a_pass(unit: DataUnit, blocks: u64, place: Place, start: Start) -> u64 {
    let s = setup(unit, blocks, place, start);
    let before = s.dev.borrow().ops_total();
    drive(&s, &mut Model::new(blocks), &mut 0).unwrap();
    let after = s.dev.borrow().ops_total();
    after - before
}

fn crash(s: &Setup, mode: CrashMode) {
    s.dev.borrow_mut().crash(mode);
}

#[test]
fn a_power_loss_at_every_operation_loses_no_acknowledged_write() {
    for unit in [DataUnit::Bytes512, DataUnit::Bytes4096] {
        for (place, start) in CASES {
            let blocks = 8;
            let total = ops_of_a_pass(unit, blocks, place, start);
            assert!(total > 20, "{total} operations");
            for mode in [CrashMode::DropUnflushed, CrashMode::KeepUnflushed] {
                for k in 0..total {
                    let s = setup(unit, blocks, place, start);
                    let mut model = Model::new(blocks);
                    let mut writes = 0;
                    s.dev.borrow_mut().arm(Fault::PowerLossAfter { ops: k });
                    assert!(drive(&s, &mut model, &mut writes).is_err(), "k {k}");
                    crash(&s, mode);
                    drive(&s, &mut model, &mut writes).unwrap_or_else(|e| {
                        panic!("{unit:?} {place:?} {start:?}: resume after power loss at op {k} ({mode:?}): {e}")
                    });
                    check_done(&s, &model, writes);
                }
            }
        }
    }
}

#[test]
fn a_torn_write_at_every_write_loses_no_acknowledged_write() {
    for unit in [DataUnit::Bytes512, DataUnit::Bytes4096] {
        for (place, start) in CASES {
            let blocks = 8;
            for nth in 0..ops_of_a_pass(unit, blocks, place, start) {
                let s = setup(unit, blocks, place, start);
                let mut model = Model::new(blocks);
                let mut writes = 0;
                s.dev.borrow_mut().arm(Fault::TearWrite { nth });
                if drive(&s, &mut model, &mut writes).is_ok() {
                    assert!(nth > 15, "the pass has more than 15 writes");
                    check_done(&s, &model, writes);
                    break;
                }
                crash(&s, CrashMode::DropUnflushed);
                drive(&s, &mut model, &mut writes).unwrap_or_else(|e| {
                    panic!("{unit:?} {place:?} {start:?}: resume after torn write {nth}: {e}")
                });
                check_done(&s, &model, writes);
            }
        }
    }
}

#[test]
fn wrong_calls_are_refused_and_write_nothing() {
    let s = setup(DataUnit::Bytes4096, 8, Place::Front, Start::Encrypted);
    let before = s.dev.borrow().image().to_vec();
    with_dev(&s, |d| {
        let cur = store::read_header(d).unwrap();
        let k = dek();
        // Not converting: step, finish_decrypt refuse.
        assert!(matches!(
            finish_decrypt(d, &cur, NOW),
            Err(ConvertError::NotConverting)
        ));
        // An encrypted namespace has a key already.
        assert!(matches!(
            begin_encrypt(d, &cur.clone().into(), slot("dek-kek", 6), SEG, NOW),
            Err(ConvertError::AlreadyConverting)
        ));
        // Formatting over a valid header, even for a blank-region encrypt.
        assert!(matches!(
            begin_encrypt_blank(d, &s.frame, slot("dek-kek", 6), SEG, NOW),
            Err(ConvertError::AlreadyConverting)
        ));
        assert!(matches!(
            begin_decrypt(d, &cur, 0, NOW),
            Err(ConvertError::BadSegment { .. })
        ));
        let _ = k;
    });
    assert_eq!(s.dev.borrow().image(), &before[..]);
    // Once decrypting: keys that do not fit the direction, and the other finish.
    with_dev(&s, |d| {
        let cur = store::read_header(d).unwrap();
        let cur = begin_decrypt(d, &cur, SEG, NOW).unwrap();
        let k = dek();
        for keys in [
            Keys {
                below: Some(k.clone()),
                above: None,
            },
            Keys {
                below: Some(k.clone()),
                above: Some(k.clone()),
            },
            Keys {
                below: None,
                above: None,
            },
        ] {
            assert!(matches!(
                step(d, &cur, &keys, NOW),
                Err(ConvertError::WrongKeys(_))
            ));
        }
        assert!(matches!(
            finish(d, &cur, NOW),
            Err(ConvertError::WrongPass { .. })
        ));
        assert!(matches!(
            finish_decrypt(d, &cur, NOW),
            Err(ConvertError::NotFinished { .. })
        ));
        assert!(matches!(
            begin_decrypt(d, &cur, SEG, NOW),
            Err(ConvertError::AlreadyConverting)
        ));
    });
}

#[test]
fn a_blank_encrypt_refuses_a_region_that_may_hold_a_key() {
    // A damaged header copy that still holds a key slot (its checksum fails, so no valid
    // header is found) is not overwritten: its wrapped DEK might be recovered by hand.
    for copy in CopyId::ALL {
        let s = setup(DataUnit::Bytes512, 8, Place::Front, Start::Blank);
        let mut keyed = sample().encode(copy).unwrap();
        keyed[0xFE0] ^= 1;
        s.dev
            .borrow_mut()
            .write_at(copy.offset_bytes(), &keyed[..])
            .unwrap();
        let before = s.dev.borrow().image().to_vec();
        let got = with_dev(&s, |d| {
            begin_encrypt_blank(d, &s.frame, slot("dek-kek", 6), SEG, NOW)
        });
        assert!(
            matches!(got, Err(ConvertError::NotBlank(NotBlank::Metadata { .. }))),
            "{copy:?}: {got:?}"
        );
        assert_eq!(s.dev.borrow().image(), &before[..]);
    }
    // Half of another namespace's retired header (not what this encrypt would have written).
    let s = setup(DataUnit::Bytes512, 8, Place::Front, Start::Blank);
    let mut other = s.frame.clone();
    other.namespace_uuid = Uuid::from_bytes([0x33; 16]);
    let b = other.encode(CopyId::A).unwrap();
    s.dev.borrow_mut().write_at(0, &b[..2048]).unwrap();
    let before = s.dev.borrow().image().to_vec();
    let got = with_dev(&s, |d| {
        begin_encrypt_blank(d, &s.frame, slot("dek-kek", 6), SEG, NOW)
    });
    assert!(
        matches!(
            got,
            Err(ConvertError::NotBlank(NotBlank::Metadata { offset: 0x30 }))
        ),
        "{got:?}"
    );
    assert_eq!(s.dev.borrow().image(), &before[..]);
    // The same half of its own retired header is what an interrupted call leaves: accepted.
    let own = s.frame.encode(CopyId::A).unwrap();
    s.dev.borrow_mut().write_at(0, &own[..2048]).unwrap();
    with_dev(&s, |d| {
        begin_encrypt_blank(d, &s.frame, slot("dek-kek", 6), SEG, NOW + 5).unwrap();
    });
    // Anything in the journal area or the gaps.
    let s = setup(DataUnit::Bytes512, 8, Place::Front, Start::Blank);
    s.dev
        .borrow_mut()
        .write_at(JOURNAL_DATA_OFFSET_BYTES + 100, &[1])
        .unwrap();
    let got = with_dev(&s, |d| {
        begin_encrypt_blank(d, &s.frame, slot("dek-kek", 6), SEG, NOW)
    });
    assert!(matches!(
        got,
        Err(ConvertError::NotBlank(NotBlank::Metadata { offset })) if offset == JOURNAL_DATA_OFFSET_BYTES + 100
    ));
}

#[test]
fn a_detached_header_that_is_missing_or_belongs_elsewhere_is_refused_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ns-a.hdr");
    let blocks = 16u64;
    let device_bytes = blocks * 4096;
    // Missing.
    let err = open_detached(&path, LABEL, device_bytes)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert!(!path.exists(), "nothing created");
    // Created once, never over an existing file.
    create_detached_header(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        METADATA_REGION_BYTES
    );
    assert!(create_detached_header(&path).is_err());
    // A blank file is not a header yet.
    assert!(matches!(
        open_detached(&path, LABEL, device_bytes),
        Err(ConvertError::DetachedHeader { .. })
    ));
    // Begin an encrypt into it (a real file), then use it for other namespaces/devices.
    {
        let mut io = FileHeaderIo::open(&path, METADATA_REGION_BYTES).unwrap();
        let f = frame(DataUnit::Bytes4096, blocks, Place::Detached);
        begin_encrypt_blank(&mut io, &f, slot("dek-kek", 6), SEG, NOW).unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let (_, stored) = open_detached(&path, LABEL, device_bytes).unwrap();
    assert_eq!(stored.header.state_name(), "converting");
    for (label, bytes) in [
        ("nqn.2026-12.invalid:ns-b", device_bytes),
        (LABEL, device_bytes + 4096),
        (LABEL, device_bytes - 4096),
    ] {
        let err = open_detached(&path, label, bytes).err().expect("refused");
        assert!(matches!(err, ConvertError::Binding { .. }), "{err}");
        assert!(err.to_string().contains("nothing was changed"), "{err}");
    }
    // A file that is not a header at all, or too small.
    let small = dir.path().join("small.hdr");
    std::fs::write(&small, [0u8; 4096]).unwrap();
    assert!(open_detached(&small, LABEL, device_bytes)
        .err()
        .expect("refused")
        .to_string()
        .contains("smaller than"));
    assert!(open_detached(dir.path(), LABEL, device_bytes).is_err());
    // A symlink to the right header is refused (a config path is never followed elsewhere),
    // and creating a header over a symlink is refused too.
    let link = dir.path().join("link.hdr");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let err = open_detached(&link, LABEL, device_bytes)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert!(create_detached_header(&link).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before, "nothing changed");
    assert_eq!(std::fs::read(&small).unwrap(), [0u8; 4096]);
}

#[test]
fn state_survives_a_restart_and_is_named() {
    // The state, direction and watermark are read back from the device alone.
    let s = setup(DataUnit::Bytes4096, 8, Place::Front, Start::Retired);
    with_dev(&s, |d| {
        let any = store::read_any(d).unwrap();
        assert_eq!(any.header.state_name(), "plain");
        assert!(matches!(store::read_header(d), Err(StoreError::Plain)));
        let cur = begin_encrypt(d, &any, slot("dek-kek", 6), SEG, NOW).unwrap();
        let k = dek();
        let keys = Keys {
            below: Some(k.clone()),
            above: None,
        };
        step(d, &cur, &keys, NOW).unwrap();
    });
    with_dev(&s, |d| {
        let any = store::read_any(d).unwrap();
        assert_eq!(any.header.state_name(), "converting");
        let c = conversion_state(any.header.keyed().unwrap())
            .unwrap()
            .clone();
        assert_eq!(c.direction, Direction::Encrypt);
        assert_eq!(c.watermark_blocks, u64::from(SEG));
    });
}
