//! Unit tests of `keys::store` (kept beside it, in their own file).

use super::*;
use crate::keys::header::tests::sample;

const DEV_BYTES: usize = METADATA_REGION_BYTES as usize + 4096;

fn formatted() -> (MemIo, Stored) {
    let mut io = MemIo::new(DEV_BYTES);
    let stored = format(&mut io, &sample()).expect("format");
    (io, stored)
}

fn bumped(h: &Header) -> Header {
    let mut n = h.clone();
    n.updated_unix_s += 1;
    n
}

#[test]
fn format_then_updates_alternate_copies() {
    let (mut io, s1) = formatted();
    assert_eq!(s1.header.generation, 1);
    assert_eq!(read_header(&mut io).expect("read"), s1);
    let s2 = update(&mut io, &s1, &bumped(&s1.header)).expect("update");
    assert_eq!((s2.header.generation, s2.copy), (2, CopyId::B));
    let s3 = update(&mut io, &s2, &bumped(&s2.header)).expect("update");
    assert_eq!((s3.header.generation, s3.copy), (3, CopyId::A));
    assert_eq!(read_header(&mut io).expect("read"), s3);
}

#[test]
fn blank_device_is_not_formatted_and_nothing_is_written() {
    let mut io = MemIo::new(DEV_BYTES);
    assert!(matches!(
        read_header(&mut io),
        Err(StoreError::NotFormatted)
    ));
    assert_eq!(io.ops_total(), 0);
}

#[test]
fn a_corrupt_copy_is_reported_and_the_other_used() {
    let (mut io, s1) = formatted();
    update(&mut io, &s1, &bumped(&s1.header)).expect("update");
    // Corrupt the newest copy (B, generation 2): the reader falls back to A (generation 1).
    io.corrupt(CopyId::B.offset_bytes() as usize + 300, 0x01);
    let r = read_header(&mut io).expect("read");
    assert_eq!(r.header.generation, 1);
    assert_eq!(
        r.bad_copy(),
        Some((CopyId::B, &CopyFault::Decode(HeaderError::ChecksumMismatch)))
    );
    // The next update rewrites the bad copy and both are valid again.
    let s3 = update(&mut io, &r, &bumped(&r.header)).expect("update");
    assert_eq!((s3.header.generation, s3.copy), (2, CopyId::B));
    assert_eq!(
        read_header(&mut io).expect("read").other,
        OtherCopy::Valid { generation: 1 }
    );
}

#[test]
fn both_copies_bad_is_a_precise_error_and_writes_nothing() {
    let (mut io, _) = formatted();
    io.corrupt(CopyId::A.offset_bytes() as usize, 0xFF);
    io.corrupt(CopyId::B.offset_bytes() as usize + 100, 0x01);
    let before = io.ops_total();
    match read_header(&mut io) {
        Err(StoreError::NoValidCopy { a, b }) => {
            assert_eq!(a, CopyFault::Decode(HeaderError::BadMagic));
            assert_eq!(b, CopyFault::Decode(HeaderError::ChecksumMismatch));
        }
        other => panic!("expected NoValidCopy, got {other:?}"),
    }
    assert_eq!(io.ops_total(), before);
}

#[test]
fn stale_and_identity_changing_updates_are_refused() {
    let (mut io, s1) = formatted();
    let s2 = update(&mut io, &s1, &bumped(&s1.header)).expect("update");
    assert!(matches!(
        update(&mut io, &s1, &bumped(&s1.header)),
        Err(StoreError::Stale {
            expected: 1,
            found: 2
        })
    ));
    let mut moved = s2.header.clone();
    moved.data_blocks += 1;
    assert!(matches!(
        update(&mut io, &s2, &moved),
        Err(StoreError::IdentityChanged {
            field: "data_blocks"
        })
    ));
}

#[test]
fn equal_generations_with_different_contents_are_refused() {
    let (mut io, s1) = formatted();
    let mut other = s1.header.clone();
    other.updated_unix_s += 5;
    let bytes = other.encode(CopyId::B).expect("encode");
    io.write_at(CopyId::B.offset_bytes(), &bytes[..])
        .expect("write");
    assert!(matches!(
        read_header(&mut io),
        Err(StoreError::GenerationConflict { generation: 1 })
    ));
}

#[test]
fn failed_write_leaves_old_header_and_retry_succeeds() {
    let (mut io, s1) = formatted();
    io.arm(Fault::FailWrite { nth: 0 });
    assert!(matches!(
        update(&mut io, &s1, &bumped(&s1.header)),
        Err(StoreError::Io { .. })
    ));
    assert_eq!(read_header(&mut io).expect("read").header, s1.header);
    let s2 = update(&mut io, &s1, &bumped(&s1.header)).expect("retry");
    assert_eq!(s2.header.generation, 2);
}

/// A crash at every point of a sequence of updates (before/after each write and flush, with
/// unflushed writes dropped or kept, and a torn write at each write) leaves a header that
/// opens with the old or the new generation, never neither; an update that returned Ok is
/// never lost.
#[test]
fn crash_at_every_point_of_an_update_keeps_old_or_new() {
    let (base, s1) = formatted();
    // Three chained updates: generations 2, 3, 4.
    let run = |io: &mut MemIo| -> u64 {
        let mut cur = s1.clone();
        for _ in 0..3 {
            match update(io, &cur, &bumped(&cur.header)) {
                Ok(next) => cur = next,
                Err(_) => break,
            }
        }
        cur.header.generation
    };
    let mut clean = base.clone();
    let total_ops = {
        let before = clean.ops_total();
        assert_eq!(run(&mut clean), 4);
        clean.ops_total() - before
    };
    assert_eq!(total_ops, 6, "one write and one flush per update");
    let mut cases = 0;
    for ops in 0..=total_ops {
        for mode in [CrashMode::DropUnflushed, CrashMode::KeepUnflushed] {
            let mut io = base.clone();
            io.arm(Fault::PowerLossAfter { ops });
            let acked = run(&mut io);
            io.crash(mode);
            let got = read_header(&mut io)
                .expect("a header must survive")
                .header
                .generation;
            assert!(
                got == acked || got == acked + 1,
                "ops {ops} {mode:?}: acked {acked}, found {got}"
            );
            cases += 1;
        }
    }
    for nth in 0..3 {
        for mode in [CrashMode::DropUnflushed, CrashMode::KeepUnflushed] {
            let mut io = base.clone();
            io.arm(Fault::TearWrite { nth });
            let acked = run(&mut io);
            io.crash(mode);
            let r = read_header(&mut io).expect("a header must survive");
            assert_eq!(r.header.generation, acked, "torn write {nth}");
            assert!(r.bad_copy().is_some(), "the torn copy is reported");
            cases += 1;
        }
    }
    assert_eq!(cases, 20);
}

#[test]
fn crash_during_reformat_never_resurrects_the_old_header() {
    let (base, s1) = formatted();
    let mut old = base.clone();
    let s2 = update(&mut old, &s1, &bumped(&s1.header)).expect("update");
    assert_eq!(s2.copy, CopyId::B);
    let mut fresh = sample();
    fresh.device_uuid = uuid::Uuid::from_bytes([0x99; 16]);
    for ops in 0..=6 {
        for mode in [CrashMode::DropUnflushed, CrashMode::KeepUnflushed] {
            let mut io = old.clone();
            io.arm(Fault::PowerLossAfter { ops });
            let _ = format(&mut io, &fresh);
            io.crash(mode);
            // Ops 1-3 wipe A, wipe B, flush; 4-6 write A, write B, flush.
            let wipe_durable = ops >= 3;
            match read_header(&mut io) {
                Ok(r) if r.header.device_uuid == fresh.device_uuid => {}
                Ok(r) => {
                    assert!(!wipe_durable, "ops {ops} {mode:?}: old header after wipe");
                    assert_eq!(r.header, s2.header, "ops {ops} {mode:?}: old header intact");
                }
                Err(StoreError::NotFormatted) => {}
                Err(e) => panic!("ops {ops}: {e}"),
            }
        }
    }
}

/// A device whose flush fails (EIO) without making anything durable; optionally its writes
/// never land, or its reads fail after the failed flush.
struct FlushFails {
    dev: MemIo,
    drop_writes: bool,
    reads_fail_after_flush: bool,
    flushed: bool,
}

impl HeaderIo for FlushFails {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        if self.flushed && self.reads_fail_after_flush {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.dev.read_at(off, buf)
    }
    fn write_at(&mut self, off: u64, buf: &[u8]) -> io::Result<()> {
        if self.drop_writes {
            return Ok(());
        }
        self.dev.write_at(off, buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flushed = true;
        Err(io::Error::from_raw_os_error(libc::EIO))
    }
}

fn flush_fails(drop_writes: bool, reads_fail_after_flush: bool) -> (FlushFails, Stored) {
    let (dev, s1) = formatted();
    let io = FlushFails {
        dev,
        drop_writes,
        reads_fail_after_flush,
        flushed: false,
    };
    (io, s1)
}

#[test]
fn failed_flush_after_the_write_landed_reports_new_but_not_durable() {
    let (mut io, s1) = flush_fails(false, false);
    let err = update(&mut io, &s1, &bumped(&s1.header)).expect_err("flush fails");
    let StoreError::UpdateFlushFailed { state, source } = &err else {
        panic!("expected UpdateFlushFailed, got {err:?}");
    };
    assert_eq!(source.raw_os_error(), Some(libc::EIO));
    let UpdateState::NewNotDurable(found) = state else {
        panic!("expected NewNotDurable, got {state:?}");
    };
    assert_eq!((found.header.generation, found.copy), (2, CopyId::B));
    assert!(err.to_string().contains("not known to be durable"), "{err}");
    // And indeed it was not durable: a power loss brings generation 1 back.
    io.dev.crash(CrashMode::DropUnflushed);
    assert_eq!(read_header(&mut io.dev).expect("read").header, s1.header);
}

#[test]
fn failed_flush_with_the_write_lost_reports_old_current() {
    let (mut io, s1) = flush_fails(true, false);
    match update(&mut io, &s1, &bumped(&s1.header)) {
        Err(StoreError::UpdateFlushFailed {
            state: UpdateState::OldCurrent,
            ..
        }) => {}
        other => panic!("expected OldCurrent, got {other:?}"),
    }
    // Retrying with the same `current` is then safe (here on a healthy device).
    let s2 = update(&mut io.dev, &s1, &bumped(&s1.header)).expect("retry");
    assert_eq!(s2.header.generation, 2);
}

#[test]
fn failed_flush_and_failed_re_read_report_unknown() {
    let (mut io, s1) = flush_fails(false, true);
    match update(&mut io, &s1, &bumped(&s1.header)) {
        Err(StoreError::UpdateFlushFailed {
            state: UpdateState::Unknown(why),
            ..
        }) => assert!(why.contains("re-read failed"), "{why}"),
        other => panic!("expected Unknown, got {other:?}"),
    }
}

#[test]
fn file_io_round_trip() {
    let file = tempfile::tempfile().expect("tempfile");
    file.set_len(DEV_BYTES as u64).expect("set_len");
    let mut io = file;
    let s1 = format(&mut io, &sample()).expect("format");
    let s2 = update(&mut io, &s1, &bumped(&s1.header)).expect("update");
    assert_eq!(read_header(&mut io).expect("read"), s2);
}
