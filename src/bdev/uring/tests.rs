//! Unit tests of `bdev::uring` (kept beside it, in their own file).

use super::*;
use crate::bdev::BufPool;
use std::time::{Duration, Instant};

/// A directory on a disk filesystem (O_DIRECT and fallocate need one; /tmp may be tmpfs).
fn disk_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").unwrap()
}

fn cfg(dir: &tempfile::TempDir, bs: u32, size: u64) -> UringConfig {
    UringConfig {
        name: "u0".into(),
        path: dir.path().join("disk.img"),
        block_size: bs,
        direct: true,
        size_bytes: Some(size),
    }
}

/// A second bdev on the same open file (the file is locked, so it cannot be opened again),
/// for tests that change one bdev's flags or descriptor.
fn twin(b: &UringBdev) -> UringBdev {
    UringBdev {
        name: b.name.clone(),
        path: b.path.clone(),
        file: b.file.clone(),
        counters: b.counters.clone(),
        ..*b
    }
}

fn wait_all(ch: &mut dyn BdevChannel, n: usize) -> Vec<BdevIo> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < n && Instant::now() < deadline {
        ch.poll(&mut |io| got.push(io));
    }
    assert_eq!(got.len(), n, "completions missing");
    got
}

fn run(ch: &mut dyn BdevChannel, io: BdevIo) -> BdevIo {
    assert!(matches!(ch.submit(io), Submit::Queued));
    wait_all(ch, 1).pop().unwrap()
}

fn pattern(lba: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (lba as usize * 131 + i * 7 + 5) as u8)
        .collect()
}

#[test]
fn write_read_flush_unmap_zeroes_direct() {
    let dir = disk_dir();
    let b = open(&cfg(&dir, 4096, 1 << 20)).unwrap();
    assert_eq!((b.num_blocks(), b.buf_align()), (256, 4096));
    assert!(b.io_type_supported(IoType::Unmap));
    let mut ch = b.open_channel(CoreId(0), 8).unwrap();
    let mut pool = BufPool::new(4, 16 << 10, b.buf_align()).unwrap();
    for lba in [0u64, 10, 252] {
        let mut w = pool.get(4 << 12).unwrap();
        w.as_mut_slice().copy_from_slice(&pattern(lba, 4 << 12));
        let io = run(
            ch.as_mut(),
            BdevIo::new(IoType::Write, lba, 4, Some(w), lba),
        );
        assert_eq!((io.status, io.ctx), (IoStatus::Success, lba));
        pool.put(io.buf.unwrap());
    }
    assert_eq!(
        run(ch.as_mut(), BdevIo::new(IoType::Flush, 0, 0, None, 0)).status,
        IoStatus::Success
    );
    for lba in [0u64, 10, 252] {
        let r = pool.get(4 << 12).unwrap();
        let io = run(ch.as_mut(), BdevIo::new(IoType::Read, lba, 4, Some(r), 0));
        assert_eq!(io.status, IoStatus::Success);
        assert_eq!(
            io.buf.as_ref().unwrap().as_slice(),
            &pattern(lba, 4 << 12)[..]
        );
        pool.put(io.buf.unwrap());
    }
    // Punch block 11, zero block 12 (fallocate or zero-buffer writes), read 10..14 back.
    assert_eq!(
        run(ch.as_mut(), BdevIo::new(IoType::Unmap, 11, 1, None, 0)).status,
        IoStatus::Success
    );
    assert_eq!(
        run(
            ch.as_mut(),
            BdevIo::new(IoType::WriteZeroes, 12, 1, None, 0)
        )
        .status,
        IoStatus::Success
    );
    let r = pool.get(4 << 12).unwrap();
    let io = run(ch.as_mut(), BdevIo::new(IoType::Read, 10, 4, Some(r), 0));
    let got = io.buf.as_ref().unwrap().as_slice();
    let want = pattern(10, 4 << 12);
    assert_eq!(&got[..4096], &want[..4096]);
    assert!(
        got[4096..3 * 4096].iter().all(|&x| x == 0),
        "unmapped/zeroed blocks must read zero"
    );
    assert_eq!(&got[3 * 4096..], &want[3 * 4096..]);
    pool.put(io.buf.unwrap());
    drop(ch);
    // The data is really in the file (read it without the bdev).
    let raw = std::fs::read(dir.path().join("disk.img")).unwrap();
    assert_eq!(raw.len(), 1 << 20);
    assert_eq!(&raw[252 * 4096..], &pattern(252, 4 << 12)[..]);
}

#[test]
fn fua_writes_go_out_with_dsync_and_flushes_are_counted() {
    let dir = disk_dir();
    let b = Arc::new(UringBdev::new(&cfg(&dir, 4096, 1 << 20)).unwrap());
    let mut ch = b.open_channel(CoreId(0), 4).unwrap();
    let mut pool = BufPool::new(2, 8192, 4096).unwrap();
    let mut w = pool.get(8192).unwrap();
    w.as_mut_slice().copy_from_slice(&pattern(3, 8192));
    let io = run(ch.as_mut(), BdevIo::new(IoType::Write, 3, 2, Some(w), 0));
    assert_eq!(io.status, IoStatus::Success);
    assert_eq!(
        b.stats(),
        UringStats::default(),
        "a plain write is no FUA write"
    );
    let mut w = io.buf.unwrap();
    w.as_mut_slice().copy_from_slice(&pattern(7, 8192));
    let io = run(
        ch.as_mut(),
        BdevIo::new(IoType::Write, 7, 2, Some(w), 0).with_fua(true),
    );
    assert_eq!(io.status, IoStatus::Success);
    assert!(io.fua, "the completion still says FUA");
    assert_eq!(
        b.stats(),
        UringStats {
            flushes: 0,
            fua_writes: 1
        }
    );
    // FUA on a read means nothing to this backend (and is not counted).
    let r = pool.get(8192).unwrap();
    let io = run(
        ch.as_mut(),
        BdevIo::new(IoType::Read, 7, 2, Some(r), 0).with_fua(true),
    );
    assert_eq!(io.buf.as_ref().unwrap().as_slice(), &pattern(7, 8192)[..]);
    let io = run(ch.as_mut(), BdevIo::new(IoType::Flush, 0, 0, None, 0));
    assert_eq!(io.status, IoStatus::Success);
    assert_eq!(
        b.stats(),
        UringStats {
            flushes: 1,
            fua_writes: 1
        }
    );
    // Through the generic control-thread helper too.
    crate::bdev::flush_blocking(b.as_ref(), CoreId(0), Duration::from_secs(20)).unwrap();
    assert_eq!(b.stats().flushes, 2);
}

#[test]
fn zero_write_path_for_large_ranges() {
    let dir = disk_dir();
    let b = UringBdev::new(&cfg(&dir, 512, 2 << 20)).unwrap();
    let mut ch = b.open_channel(CoreId(0), 4).unwrap();
    let mut pool = BufPool::new(1, 1 << 20, 4096).unwrap();
    let mut w = pool.get(1 << 20).unwrap();
    w.as_mut_slice().fill(0xee);
    let io = run(
        ch.as_mut(),
        BdevIo::new(IoType::Write, 1024, 2048, Some(w), 0),
    );
    assert_eq!(io.status, IoStatus::Success);
    pool.put(io.buf.unwrap());
    // Force the write path (as on a filesystem without ZERO_RANGE) across several zero-buffer
    // lengths: 1 MiB - 1 KiB starting 1 KiB into the written area.
    let mut raw = twin(&b);
    raw.fallocate = false;
    let mut ch2 = raw.open_channel(CoreId(0), 4).unwrap();
    let io = run(
        ch2.as_mut(),
        BdevIo::new(IoType::WriteZeroes, 1026, 2046, None, 0),
    );
    assert_eq!(io.status, IoStatus::Success);
    assert!(!raw.io_type_supported(IoType::Unmap));
    assert_eq!(
        run(ch2.as_mut(), BdevIo::new(IoType::Unmap, 0, 1, None, 0)).status,
        IoStatus::Unsupported
    );
    let r = pool.get(1 << 20).unwrap();
    let io = run(
        ch.as_mut(),
        BdevIo::new(IoType::Read, 1024, 2048, Some(r), 0),
    );
    let got = io.buf.as_ref().unwrap().as_slice();
    assert!(got[..1024].iter().all(|&x| x == 0xee));
    assert!(got[1024..].iter().all(|&x| x == 0));
}

#[test]
fn queue_depth_32_concurrent() {
    let dir = disk_dir();
    let b = open(&cfg(&dir, 4096, 4 << 20)).unwrap();
    let mut ch = b.open_channel(CoreId(0), 32).unwrap();
    let mut pool = BufPool::new(33, 8192, 4096).unwrap();
    let submit_all = |ch: &mut dyn BdevChannel, pool: &mut BufPool, t: IoType| {
        for i in 0..32u64 {
            let mut buf = pool.get(8192).unwrap();
            if t == IoType::Write {
                buf.as_mut_slice().copy_from_slice(&pattern(i * 2, 8192));
            }
            assert!(matches!(
                ch.submit(BdevIo::new(t, i * 2, 2, Some(buf), i)),
                Submit::Queued
            ));
        }
        assert_eq!(ch.in_flight(), 32);
        let extra = pool.get(8192).unwrap();
        match ch.submit(BdevIo::new(t, 0, 2, Some(extra), 99)) {
            Submit::Busy(io) => pool.put(io.buf.unwrap()),
            Submit::Queued => panic!("33rd I/O on a depth-32 channel must be Busy"),
        }
        wait_all(ch, 32)
    };
    for io in submit_all(ch.as_mut(), &mut pool, IoType::Write) {
        assert_eq!(io.status, IoStatus::Success);
        pool.put(io.buf.unwrap());
    }
    let reads = submit_all(ch.as_mut(), &mut pool, IoType::Read);
    let mut seen = [false; 32];
    for io in reads {
        assert_eq!(io.status, IoStatus::Success);
        assert_eq!(
            io.buf.as_ref().unwrap().as_slice(),
            &pattern(io.ctx * 2, 8192)[..]
        );
        seen[io.ctx as usize] = true;
    }
    assert!(seen.iter().all(|&s| s));
    assert_eq!(ch.in_flight(), 0);
}

#[test]
fn invalid_io_and_kernel_errors() {
    let dir = disk_dir();
    let b = UringBdev::new(&cfg(&dir, 4096, 64 << 10)).unwrap();
    let mut ch = b.open_channel(CoreId(0), 4).unwrap();
    let mut pool = BufPool::new(2, 8192, 4096).unwrap();
    let r = pool.get(8192).unwrap();
    let io = run(ch.as_mut(), BdevIo::new(IoType::Read, 15, 2, Some(r), 0));
    assert_eq!(io.status, IoStatus::InvalidRange);
    pool.put(io.buf.unwrap());
    // A kernel error: the same file opened read-only, so a write gets EBADF from the ring.
    let mut ro = twin(&b);
    ro.file = Arc::new(File::open(dir.path().join("disk.img")).unwrap());
    let mut roch = ro.open_channel(CoreId(0), 4).unwrap();
    let w = pool.get(4096).unwrap();
    let io = run(roch.as_mut(), BdevIo::new(IoType::Write, 0, 1, Some(w), 0));
    assert_eq!(io.status, IoStatus::IoError(libc::EBADF));
    let r = pool.get(4096).unwrap();
    assert_eq!(
        run(roch.as_mut(), BdevIo::new(IoType::Read, 0, 1, Some(r), 0)).status,
        IoStatus::Success
    );
    assert!(b.open_channel(CoreId(0), 0).is_err());
    assert!(b.open_channel(CoreId(0), MAX_QUEUE_DEPTH + 1).is_err());
}

#[test]
fn open_errors_are_clear() {
    let dir = disk_dir();
    let missing = UringConfig {
        size_bytes: None,
        ..cfg(&dir, 4096, 0)
    };
    assert!(matches!(open(&missing), Err(BdevError::Io { .. })));
    let tiny = cfg(&dir, 4096, 100);
    assert!(matches!(open(&tiny), Err(BdevError::Invalid { .. })));
    let odd = UringConfig {
        block_size: 1024,
        ..cfg(&dir, 4096, 1 << 20)
    };
    assert!(matches!(open(&odd), Err(BdevError::Invalid { .. })));
    // Existing file, size taken from it.
    let p = dir.path().join("existing.img");
    std::fs::write(&p, vec![0u8; 3 * 4096 + 100]).unwrap();
    let c = UringConfig {
        path: p,
        size_bytes: None,
        ..cfg(&dir, 4096, 0)
    };
    assert_eq!(open(&c).unwrap().num_blocks(), 3);
    let y = "name: u\npath: /x\nblock_size: 512\ndirect: false\nsize_bytes: 4096\n";
    assert!(serde_yaml_ng::from_str::<UringConfig>(y).is_ok());
    assert!(serde_yaml_ng::from_str::<UringConfig>("name: u\npath: /x\nsize: 1\n").is_err());
    // O_DIRECT on a filesystem without it (tmpfs before Linux 6.6) must say what to do.
    if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
        let c = UringConfig {
            path: shm.path().join("d.img"),
            ..cfg(&dir, 4096, 1 << 20)
        };
        match open(&c) {
            Ok(_) => println!("note: /dev/shm supports O_DIRECT on this kernel"),
            Err(e) => assert!(e.to_string().contains("direct: false"), "{e}"),
        }
    }
}

#[test]
fn zero_range_refused_falls_back_to_writes() {
    // tmpfs has no FALLOC_FL_ZERO_RANGE: the first write-zeroes gets EOPNOTSUPP from the ring
    // and must be redone by writing zeroes.
    let Ok(shm) = tempfile::tempdir_in("/dev/shm") else {
        println!("skip: no /dev/shm");
        return;
    };
    let c = UringConfig {
        name: "shm".into(),
        path: shm.path().join("d.img"),
        block_size: 512,
        direct: false,
        size_bytes: Some(64 << 10),
    };
    std::fs::write(&c.path, vec![0x11u8; 64 << 10]).unwrap();
    let b = open(&c).unwrap();
    assert_eq!(b.buf_align(), 64);
    let mut ch = b.open_channel(CoreId(0), 2).unwrap();
    for lba in [3u64, 40] {
        let io = run(
            ch.as_mut(),
            BdevIo::new(IoType::WriteZeroes, lba, 5, None, 0),
        );
        assert_eq!(io.status, IoStatus::Success);
    }
    let raw = std::fs::read(&c.path).unwrap();
    for (i, &x) in raw.iter().enumerate() {
        let blk = (i / 512) as u64;
        let zeroed = (3..8).contains(&blk) || (40..45).contains(&blk);
        assert_eq!(x, if zeroed { 0 } else { 0x11 }, "byte {i}");
    }
}

#[test]
fn dropping_a_busy_channel_finishes_its_io() {
    let dir = disk_dir();
    let b = open(&cfg(&dir, 4096, 1 << 20)).unwrap();
    let mut ch = b.open_channel(CoreId(0), 16).unwrap();
    let mut pool = BufPool::new(16, 4096, 4096).unwrap();
    for i in 0..16u64 {
        let mut w = pool.get(4096).unwrap();
        w.as_mut_slice().copy_from_slice(&pattern(i, 4096));
        assert!(matches!(
            ch.submit(BdevIo::new(IoType::Write, i, 1, Some(w), i)),
            Submit::Queued
        ));
    }
    assert_eq!(ch.in_flight(), 16);
    // Never polled: the SQEs are still in the ring. Drop must submit and wait for them
    // before the buffers are freed.
    drop(ch);
    let raw = std::fs::read(dir.path().join("disk.img")).unwrap();
    for i in 0..16usize {
        assert_eq!(
            &raw[i * 4096..(i + 1) * 4096],
            &pattern(i as u64, 4096)[..],
            "block {i}"
        );
    }
}

#[test]
fn short_read_is_continued_then_reported() {
    // Buffered, so the file can end mid-block: the kernel returns a short read, the channel
    // asks for the rest, gets 0 bytes (EOF) and must report EIO instead of spinning.
    let dir = disk_dir();
    let c = UringConfig {
        direct: false,
        ..cfg(&dir, 512, 8 * 512)
    };
    let b = open(&c).unwrap();
    std::fs::write(&c.path, pattern(0, 8 * 512)).unwrap();
    let mut ch = b.open_channel(CoreId(0), 2).unwrap();
    let mut pool = BufPool::new(2, 8 * 512, 64).unwrap();
    let io = run(
        ch.as_mut(),
        BdevIo::new(IoType::Read, 0, 8, pool.get(8 * 512), 0),
    );
    assert_eq!(io.status, IoStatus::Success);
    assert_eq!(
        io.buf.as_ref().unwrap().as_slice(),
        &pattern(0, 8 * 512)[..]
    );
    pool.put(io.buf.unwrap());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&c.path)
        .unwrap()
        .set_len(5 * 512 + 100)
        .unwrap();
    let io = run(
        ch.as_mut(),
        BdevIo::new(IoType::Read, 4, 4, pool.get(4 * 512), 0),
    );
    assert_eq!(io.status, IoStatus::IoError(libc::EIO));
    let got = io.buf.as_ref().unwrap().as_slice();
    assert_eq!(
        &got[..612],
        &pattern(0, 8 * 512)[4 * 512..5 * 512 + 100],
        "the short part was read"
    );
}

fn beneath<'a>(dir: &'a Path, rel: &'a Path, create: bool, grow: bool) -> AllowedPath<'a> {
    AllowedPath::Beneath {
        dir,
        rel,
        create,
        grow,
        max_size_bytes: 4 << 20,
    }
}

fn at(dir: &Path, rel: &str, size: Option<u64>) -> UringConfig {
    UringConfig {
        name: "r".into(),
        path: dir.join(rel),
        block_size: 4096,
        direct: false,
        size_bytes: size,
    }
}

fn no_check(_: BackingId) -> Result<(), String> {
    Ok(())
}

/// Caller paths are resolved beneath the allowed directory by the kernel: `..`, symlinks
/// leading out, and hard links are refused, whatever the text looked like.
#[test]
fn allowed_paths_stay_beneath_their_directory() {
    let top = disk_dir();
    let vols = top.path().join("vols");
    std::fs::create_dir(&vols).unwrap();
    let secret = top.path().join("secret.img");
    std::fs::write(&secret, vec![7u8; 8192]).unwrap();
    std::os::unix::fs::symlink(&secret, vols.join("abs.img")).unwrap();
    std::os::unix::fs::symlink("../secret.img", vols.join("rel.img")).unwrap();
    std::fs::create_dir(vols.join("sub")).unwrap();
    std::os::unix::fs::symlink("../..", vols.join("sub/up")).unwrap();
    std::fs::write(vols.join("inside.img"), vec![1u8; 8192]).unwrap();
    std::os::unix::fs::symlink("inside.img", vols.join("alias.img")).unwrap();
    std::fs::hard_link(&secret, vols.join("hard.img")).unwrap();
    std::os::unix::net::UnixListener::bind(vols.join("sock")).unwrap();
    let denied = |rel: &str| match UringBdev::open_allowed(
        &at(&vols, rel, None),
        beneath(&vols, Path::new(rel), true, true),
        &no_check,
    ) {
        Err(OpenRefused::Denied(m)) => m,
        Err(e) => panic!("{rel}: {e}"),
        Ok(_) => panic!("{rel}: opened"),
    };
    for rel in ["abs.img", "rel.img", "sub/up/secret.img", "../secret.img"] {
        let m = denied(rel);
        assert!(
            m.contains("leads out") || m.contains("without . or .."),
            "{rel}: {m}"
        );
    }
    assert!(denied("hard.img").contains("hard links"));
    assert!(denied("sock").contains("not a regular file"));
    assert!(denied("/etc/passwd").contains("beneath"));
    // A symlink that stays inside is followed; the file is what gets opened.
    let b = UringBdev::open_allowed(
        &at(&vols, "alias.img", None),
        beneath(&vols, Path::new("alias.img"), false, false),
        &no_check,
    )
    .unwrap();
    let m = std::fs::metadata(vols.join("inside.img")).unwrap();
    assert_eq!(
        b.backing_id(),
        BackingId::File {
            dev: m.dev(),
            ino: m.ino()
        }
    );
    // The identity check runs on the file reached, before it is claimed.
    let check = |id: BackingId| {
        if id == b.backing_id() {
            Err("is the base of encrypted bdev x".to_string())
        } else {
            Ok(())
        }
    };
    match UringBdev::open_allowed(
        &at(&vols, "inside.img", None),
        beneath(&vols, Path::new("inside.img"), false, false),
        &check,
    ) {
        Err(OpenRefused::Denied(m)) => assert!(m.contains("base of encrypted"), "{m}"),
        r => panic!("{:?}", r.err()),
    }
    assert_eq!(std::fs::read(&secret).unwrap(), vec![7u8; 8192]);
}

/// Create and grow happen only where allowed, up to the cap; a file in use is refused.
#[test]
fn allowed_paths_create_grow_and_lock() {
    let top = disk_dir();
    let d = top.path();
    let open = |rel: &str, size: Option<u64>, create: bool, grow: bool| {
        UringBdev::open_allowed(
            &at(d, rel, size),
            beneath(d, Path::new(rel), create, grow),
            &no_check,
        )
    };
    let denied = |r: Result<UringBdev, OpenRefused>| match r {
        Err(OpenRefused::Denied(m)) => m,
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened"),
    };
    assert!(denied(open("new.img", Some(8192), false, true)).contains("does not permit create"));
    assert!(denied(open("new.img", None, true, true)).contains("does not exist"));
    assert!(denied(open("new.img", Some(8 << 20), true, true)).contains("max_size_bytes"));
    assert!(!d.join("new.img").exists());
    let b = open("new.img", Some(8192), true, false).unwrap();
    assert_eq!(b.num_blocks(), 2);
    let m = std::fs::metadata(d.join("new.img")).unwrap();
    assert_eq!((m.len(), m.mode() & 0o777), (8192, 0o600));
    // Locked while the bdev (or a channel) holds it: by path through the config, or again.
    match open("new.img", None, false, false) {
        Err(OpenRefused::InUse(m)) => assert!(m.contains("in use"), "{m}"),
        r => panic!("{:?}", r.err()),
    }
    let cfg_again = UringBdev::new(&at(d, "new.img", None));
    assert!(
        cfg_again
            .as_ref()
            .err()
            .is_some_and(|e| e.to_string().contains("in use")),
        "{:?}",
        cfg_again.err()
    );
    let ch = b.open_channel(CoreId(0), 2).unwrap();
    drop(b);
    assert!(matches!(
        open("new.img", None, false, false),
        Err(OpenRefused::InUse(_))
    ));
    drop(ch);
    // Growth: refused without grow, or past the cap; allowed within it.
    assert!(denied(open("new.img", Some(16384), false, false)).contains("does not permit grow"));
    assert_eq!(std::fs::metadata(d.join("new.img")).unwrap().len(), 8192);
    assert!(denied(open("new.img", Some(8 << 20), false, true)).contains("max_size_bytes"));
    let b = open("new.img", Some(16384), false, true).unwrap();
    assert_eq!(b.num_blocks(), 4);
    drop(b);
    // A device entry must be a block device.
    let r = UringBdev::open_allowed(
        &at(d, "new.img", None),
        AllowedPath::Device {
            path: &d.join("new.img"),
        },
        &no_check,
    );
    assert!(denied(r).contains("not a block device"));
}
