//! Unit tests of `keys::convert`: the journal record, a whole deep-rekey pass, and a power loss
//! (and a torn write) at every operation of a pass with host writes between its steps.

use super::*;
use crate::crypto::bdev::DataKey;
use crate::crypto::key::XtsKey;
use crate::keys::header::tests::{sample, slot};
use crate::keys::header::DataUnit;
use crate::keys::store::{CrashMode, Fault, MemIo};
use std::collections::BTreeSet;

const NOW: u64 = 1_800_000_000;

fn xts(seed: u8) -> DataKey {
    let mut k = [0u8; 64];
    for (i, b) in k.iter_mut().enumerate() {
        *b = seed.wrapping_mul(31).wrapping_add(i as u8);
    }
    DataKey::new(&XtsKey::from_bytes(&k).unwrap(), None).unwrap()
}

/// Plaintext of data unit `lba` in version `v` (0 = as formatted).
fn plain(lba: u64, v: u32, unit: usize) -> Vec<u8> {
    (0..unit)
        .map(|i| (lba as u32 ^ v.wrapping_mul(0x9e37) ^ i as u32).to_le_bytes()[i % 4] ^ 0x5a)
        .collect()
}

struct Setup {
    io: MemIo,
    stored: Stored,
    old: DataKey,
    new: DataKey,
    unit: usize,
    blocks: u64,
}

/// A formatted device of `blocks` units whose data area holds version 0 under the old key,
/// with a segment of `seg` units.
fn setup(unit: DataUnit, blocks: u64) -> Setup {
    let u = unit.bytes() as usize;
    let mut io =
        MemIo::new(METADATA_REGION_BYTES as usize + blocks as usize * u).with_atomic_bytes(u);
    let mut h = sample();
    h.generation = 1;
    h.data_unit = unit;
    h.data_blocks = blocks;
    let stored = store::format(&mut io, &h).unwrap();
    let old = xts(1);
    let mut data = Vec::new();
    for lba in 0..blocks {
        let mut b = plain(lba, 0, u);
        old.xts().encrypt_units(&mut b, u, lba).unwrap();
        data.extend_from_slice(&b);
    }
    io.write_at(METADATA_REGION_BYTES, &data).unwrap();
    io.flush().unwrap();
    Setup {
        io,
        stored,
        old,
        new: xts(2),
        unit: u,
        blocks,
    }
}

fn whole(io: &mut MemIo, unit: usize) -> WholeDevice<'_, MemIo> {
    WholeDevice {
        io,
        data_offset_bytes: METADATA_REGION_BYTES,
        data_unit_bytes: unit as u32,
    }
}

/// The model of what the host may read back: per unit, the version it holds after its last
/// acknowledged write; an empty set for a unit whose last write was cut off by the power loss
/// and never acknowledged (any contents allowed).
struct Model(Vec<BTreeSet<u32>>);

impl Model {
    fn new(blocks: u64) -> Model {
        Model((0..blocks).map(|_| BTreeSet::from([0])).collect())
    }
}

/// A host write of version `v` to `lba` while the pass is between steps: keyed by the watermark
/// the header on disk holds (`None` = before or after the pass).
fn host_write(
    d: &mut WholeDevice<'_, MemIo>,
    s: &Setup,
    stored: &Stored,
    lba: u64,
    v: u32,
    model: &mut Model,
) -> io::Result<()> {
    let below = match &stored.header.rekey {
        RekeyState::Deep(dd) => lba < dd.watermark_blocks,
        _ => stored.header.active == slot("new-kek", 9),
    };
    let mut b = plain(lba, v, s.unit);
    let k = if below { &s.new } else { &s.old };
    k.xts().encrypt_units(&mut b, s.unit, lba).unwrap();
    if let Err(e) = d.write_blocks_durable(lba, &b) {
        // Never acknowledged: the unit may hold the old version, the new one, or (a torn
        // write) a mix of both; the host may not rely on any of them.
        model.0[lba as usize].clear();
        return Err(e);
    }
    // Acknowledged: only `v` may be read back now.
    model.0[lba as usize] = BTreeSet::from([v]);
    Ok(())
}

/// Runs (or resumes) the whole deep rekey as the key manager will: begin if not begun, recover,
/// steps with a host write before each, finish. Stops at the first error (a power loss).
fn drive(s: &mut Setup, model: &mut Model, writes: &mut u32) -> Result<(), ConvertError> {
    let unit = s.unit;
    let blocks = s.blocks;
    let new_slot = slot("new-kek", 9);
    let mut io = std::mem::replace(&mut s.io, MemIo::new(0));
    let r = (|| {
        let mut d = whole(&mut io, unit);
        let mut cur = store::read_header(&mut d)?;
        if cur.header.active == new_slot && matches!(cur.header.rekey, RekeyState::None) {
            // Finished, but perhaps cut off before the other copy was rewritten.
            scrub_other_copy(&mut d, &cur)?;
            return Ok(());
        }
        if matches!(cur.header.rekey, RekeyState::None) {
            cur = begin(&mut d, &cur, new_slot.clone(), 3, NOW)?;
        }
        let keys = Keys {
            below: Some(s.new.clone()),
            above: Some(s.old.clone()),
        };
        recover(&mut d, &cur, &keys)?;
        loop {
            *writes += 1;
            let lba = u64::from(*writes).wrapping_mul(7) % blocks;
            host_write(&mut d, s, &cur, lba, *writes, model)?;
            match step(&mut d, &cur, &keys, NOW)? {
                Step::Advanced(next) => cur = *next,
                Step::Complete => break,
            }
        }
        finish(&mut d, &cur, NOW)?;
        Ok(())
    })();
    s.io = io;
    r
}

/// After a finished pass: every unit decrypts under the new key to a version the model allows,
/// the journal area is zero, and no copy of the old wrapped DEK is left on the device.
fn check_done(s: &mut Setup, model: &Model) {
    let unit = s.unit;
    let stored = store::read_header(&mut whole(&mut s.io, unit)).unwrap();
    assert_eq!(stored.header.active, slot("new-kek", 9));
    assert_eq!(stored.header.rekey, RekeyState::None);
    let img = s.io.image().to_vec();
    for lba in 0..s.blocks {
        let off = METADATA_REGION_BYTES as usize + lba as usize * unit;
        let mut b = img[off..off + unit].to_vec();
        s.new.xts().decrypt_units(&mut b, unit, lba).unwrap();
        let allowed = &model.0[lba as usize];
        let ok = allowed.is_empty() || allowed.iter().any(|&v| b == plain(lba, v, unit));
        assert!(
            ok,
            "unit {lba} holds none of versions {:?}",
            model.0[lba as usize]
        );
    }
    let j = JOURNAL_OFFSET_BYTES as usize;
    assert!(img[j..METADATA_REGION_BYTES as usize]
        .iter()
        .all(|&b| b == 0));
    let old_wrapped = slot("4711", 3).wrapped_dek.0;
    assert!(
        !img[..METADATA_REGION_BYTES as usize]
            .windows(old_wrapped.len())
            .any(|w| w == old_wrapped),
        "a header copy still holds the old wrapped DEK"
    );
}

#[test]
fn record_round_trip_and_refusals() {
    let r = Record {
        id: ConversionId {
            kind: KIND_DEEP_REKEY,
            device_uuid: Uuid::from_bytes([7; 16]),
            started_unix_s: NOW,
            key_tag: [9; 32],
        },
        data_unit_bytes: 4096,
        start_blocks: 96,
        len_blocks: 128,
        data_check: DataCheck::Sha256([3; 32]),
    };
    let b = r.encode();
    assert_eq!(Record::decode(&b[..]), Ok(Some(r.clone())));
    assert_eq!(Record::decode(&[0u8; RECORD_HEADER_BYTES]), Ok(None));
    for off in [0usize, 0x10, 0x48, 0x58, 0x100, 0xFE0] {
        let mut bad = b.clone();
        bad[off] ^= 1;
        assert!(
            Record::decode(&bad[..]).is_err(),
            "flip at {off:#x} accepted"
        );
    }
    // Half a record (a torn sector write) is refused.
    let mut torn = [0u8; RECORD_HEADER_BYTES];
    torn[..2048].copy_from_slice(&b[..2048]);
    assert!(Record::decode(&torn).is_err());
    // A segment larger than the journal is refused even with a valid checksum.
    let mut huge = r.clone();
    huge.len_blocks = (JOURNAL_DATA_BYTES / 4096 + 1) as u32;
    assert!(Record::decode(&huge.encode()[..]).is_err());
}

#[test]
fn a_whole_pass_reencrypts_every_unit_for_both_unit_sizes() {
    for unit in [DataUnit::Bytes512, DataUnit::Bytes4096] {
        let mut s = setup(unit, 20);
        let mut model = Model::new(20);
        let mut writes = 0;
        drive(&mut s, &mut model, &mut writes).unwrap();
        check_done(&mut s, &model);
        // 20 units in segments of 3: 7 steps, each after a host write.
        assert_eq!(writes, 8);
    }
}

#[test]
fn begin_refuses_bad_requests_and_writes_nothing() {
    let mut s = setup(DataUnit::Bytes4096, 8);
    let unit = s.unit;
    let before = s.io.image().to_vec();
    let cur = s.stored.clone();
    let mut d = whole(&mut s.io, unit);
    assert!(matches!(
        begin(&mut d, &cur, slot("new-kek", 9), 0, NOW),
        Err(ConvertError::BadSegment { .. })
    ));
    assert!(matches!(
        begin(&mut d, &cur, slot("new-kek", 9), 16_385, NOW),
        Err(ConvertError::BadSegment {
            blocks: 16_385,
            max: 16_384
        })
    ));
    assert!(matches!(
        begin(&mut d, &cur, cur.header.active.clone(), 4, NOW),
        Err(ConvertError::SameSlot)
    ));
    assert!(matches!(
        step(
            &mut d,
            &cur,
            &Keys {
                below: None,
                above: None
            },
            NOW
        ),
        Err(ConvertError::NotConverting)
    ));
    assert!(matches!(
        finish(&mut d, &cur, NOW),
        Err(ConvertError::NotConverting)
    ));
    assert_eq!(s.io.image(), &before[..]);
    // A second deep rekey while one runs.
    let mut d = whole(&mut s.io, unit);
    let running = begin(&mut d, &cur, slot("new-kek", 9), 4, NOW).unwrap();
    assert!(matches!(
        begin(&mut d, &running, slot("other", 5), 4, NOW),
        Err(ConvertError::AlreadyConverting)
    ));
    assert!(matches!(
        finish(&mut d, &running, NOW),
        Err(ConvertError::NotFinished {
            watermark: 0,
            data_blocks: 8
        })
    ));
}

/// Counts the operations (writes + flushes) of a full pass, and its writes.
fn ops_of_a_pass(unit: DataUnit, blocks: u64) -> u64 {
    let mut s = setup(unit, blocks);
    let before = s.io.ops_total();
    drive(&mut s, &mut Model::new(blocks), &mut 0).unwrap();
    s.io.ops_total() - before
}

#[test]
fn a_power_loss_at_every_operation_loses_no_acknowledged_write() {
    for unit in [DataUnit::Bytes512, DataUnit::Bytes4096] {
        let blocks = 10;
        let total = ops_of_a_pass(unit, blocks);
        assert!(total > 30, "{total} operations");
        for mode in [CrashMode::DropUnflushed, CrashMode::KeepUnflushed] {
            for k in 0..total {
                let mut s = setup(unit, blocks);
                let mut model = Model::new(blocks);
                let mut writes = 0;
                s.io.arm(Fault::PowerLossAfter { ops: k });
                assert!(drive(&mut s, &mut model, &mut writes).is_err(), "k {k}");
                s.io.crash(mode);
                drive(&mut s, &mut model, &mut writes).unwrap_or_else(|e| {
                    panic!("resume after power loss at op {k} ({mode:?}): {e}")
                });
                check_done(&mut s, &model);
            }
        }
    }
}

#[test]
fn a_torn_write_at_every_write_loses_no_acknowledged_write() {
    torn_write_at_every_write();
}

/// The same with every step journaled by its data (record version 2), the fallback a CRC
/// collision between a unit's two forms takes.
#[test]
fn the_data_journal_fallback_survives_a_torn_write_at_every_write() {
    super::FORCE_DATA_JOURNAL.with(|f| f.set(true));
    torn_write_at_every_write();
    super::FORCE_DATA_JOURNAL.with(|f| f.set(false));
}

fn torn_write_at_every_write() {
    let unit = DataUnit::Bytes4096;
    let blocks = 10;
    // Writes are at most the operations of a pass; a fault armed past the last write never
    // fires, which the loop detects and stops at.
    for nth in 0..ops_of_a_pass(unit, blocks) {
        let mut s = setup(unit, blocks);
        let mut model = Model::new(blocks);
        let mut writes = 0;
        s.io.arm(Fault::TearWrite { nth });
        if drive(&mut s, &mut model, &mut writes).is_ok() {
            assert!(nth > 20, "the pass has more than 20 writes");
            check_done(&mut s, &model);
            break;
        }
        s.io.crash(CrashMode::DropUnflushed);
        drive(&mut s, &mut model, &mut writes)
            .unwrap_or_else(|e| panic!("resume after torn write {nth}: {e}"));
        check_done(&mut s, &model);
    }
}

#[test]
fn a_record_for_a_passed_segment_is_never_written_back() {
    // Step once, then let the host overwrite the converted segment under the new key: the
    // journal still holds that segment's old bytes, and recovery must leave them there.
    let mut s = setup(DataUnit::Bytes4096, 9);
    let unit = s.unit;
    let mut model = Model::new(9);
    let cur = s.stored.clone();
    let mut d = whole(&mut s.io, unit);
    let cur = begin(&mut d, &cur, slot("new-kek", 9), 3, NOW).unwrap();
    let keys = Keys {
        below: Some(s.new.clone()),
        above: Some(s.old.clone()),
    };
    let Step::Advanced(cur) = step(&mut d, &cur, &keys, NOW).unwrap() else {
        panic!("no step");
    };
    let cur = *cur;
    let mut b = plain(1, 77, unit);
    s.new.xts().encrypt_units(&mut b, unit, 1).unwrap();
    d.write_blocks_durable(1, &b).unwrap();
    model.0[1] = BTreeSet::from([77]);
    assert_eq!(
        recover(&mut d, &cur, &keys).unwrap(),
        Recovery::Clean { watermark: 3 }
    );
    let mut got = vec![0u8; unit];
    d.read_blocks(1, &mut got).unwrap();
    assert_eq!(got, b);
}

/// Version 2 records (CRC-32C of the bytes) round-trip and are what a step writes; version 1
/// records (SHA-256, written by older builds) still decode and still check their bytes, so a
/// pass interrupted under an older build recovers under this one. Junk after the CRC is refused.
#[test]
fn journal_record_versions_1_and_2() {
    let data = vec![0x5Au8; 8192];
    let mut r = Record {
        id: ConversionId {
            kind: KIND_DEEP_REKEY,
            device_uuid: Uuid::from_bytes([7; 16]),
            started_unix_s: NOW,
            key_tag: [9; 32],
        },
        data_unit_bytes: 4096,
        start_blocks: 0,
        len_blocks: 2,
        data_check: DataCheck::of(&data),
    };
    assert!(matches!(r.data_check, DataCheck::Crc32c(_)));
    let b = r.encode();
    assert_eq!(u16::from_le_bytes([b[8], b[9]]), JOURNAL_VERSION);
    let back = Record::decode(&b[..]).unwrap().unwrap();
    assert!(back.data_check.matches(&data));
    assert!(!back.data_check.matches(&data[..4096]));
    let mut junk = b.clone();
    junk[0x58 + 4] = 1;
    let sum = sha2::Sha256::digest(&junk[..0xFE0]);
    junk[0xFE0..].copy_from_slice(&sum);
    assert!(
        Record::decode(&junk[..]).is_err(),
        "junk after the CRC accepted"
    );
    r.data_check = DataCheck::Sha256(sha2::Sha256::digest(&data).into());
    let b1 = r.encode();
    assert_eq!(u16::from_le_bytes([b1[8], b1[9]]), JOURNAL_VERSION_SHA256);
    let back1 = Record::decode(&b1[..]).unwrap().unwrap();
    assert!(back1.data_check.matches(&data));
    let mut other = data.clone();
    other[100] ^= 1;
    assert!(!back1.data_check.matches(&other));
}

#[test]
fn the_unit_checksum_is_crc32c_as_journals_record_it() {
    // Journals written by earlier builds (crc32c crate) must check under this one, and back.
    assert_eq!(unit_crc(b"123456789"), 0xE306_9283);
    for len in [0usize, 1, 15, 16, 63, 64, 255, 512, 4096, 4097, 65536] {
        let data: Vec<u8> = (0..len).map(|i| (i * 131 + len) as u8).collect();
        assert_eq!(unit_crc(&data), crc32c::crc32c(&data), "length {len}");
    }
}
