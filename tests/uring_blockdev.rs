//! The `uring` bdev on a real block device: a loop device (`losetup`) over a file on a disk
//! filesystem. Geometry comes from the device's ioctls, I/O goes through O_DIRECT and io_uring,
//! Write Zeroes and Unmap go through `fallocate` on the device and read back as zeroes, and what
//! was written is found in the file under the loop device. A device whose logical blocks are
//! larger than the configured block size is refused with a message that says so.
//!
//! Loop devices need root and `/dev/loop-control`; where either is missing the test says so on
//! stderr and does nothing (this machine kind and CI have both).

use nvseal::bdev::uring::{UringBdev, UringConfig};
use nvseal::bdev::{Bdev, BdevChannel, BdevIo, BufPool, IoStatus, IoType, Submit};
use nvseal::types::CoreId;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const DISK: u64 = 32 << 20;

/// A loop device attached to a file; detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn attach(file: &Path, sector: u32) -> Option<Loop> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/loop-control").exists() {
        eprintln!("skipped: loop devices need root and /dev/loop-control");
        return None;
    }
    let out = Command::new("losetup")
        .args(["--find", "--show", "--sector-size", &sector.to_string()])
        .arg(file)
        .output()
        .expect("losetup (util-linux) runs");
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    Some(Loop { dev })
}

fn run(ch: &mut dyn BdevChannel, io: BdevIo) -> BdevIo {
    assert!(matches!(ch.submit(io), Submit::Queued));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = None;
    while out.is_none() {
        ch.poll(&mut |io| out = Some(io));
        assert!(Instant::now() < deadline, "no completion");
    }
    out.unwrap()
}

fn pattern(lba: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (lba as usize * 37 + i * 11 + 3) as u8)
        .collect()
}

#[test]
fn uring_bdev_on_a_loop_device() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(DISK).unwrap();
    let Some(lo) = attach(&img, 512) else {
        return;
    };
    let cfg = UringConfig {
        name: "blk0".into(),
        path: lo.dev.clone(),
        block_size: 4096,
        direct: true,
        size_bytes: None,
    };
    // A size over the device's is refused; a smaller one limits the bdev.
    let err = UringBdev::new(&UringConfig {
        size_bytes: Some(DISK + 4096),
        ..cfg.clone()
    })
    .err()
    .expect("larger than the device");
    assert!(err.to_string().contains("larger than the device"), "{err}");
    let small = UringBdev::new(&UringConfig {
        size_bytes: Some(DISK / 2),
        ..cfg.clone()
    })
    .unwrap();
    assert_eq!(small.num_blocks(), DISK / 2 / 4096);
    // The device is opened O_EXCL: while one bdev holds it, no other can open it.
    let busy = UringBdev::new(&cfg).err().expect("the device is claimed");
    assert!(busy.to_string().contains("in use"), "{busy}");
    drop(small);
    let b = UringBdev::new(&cfg).unwrap();
    assert!(b.is_block_device());
    assert_eq!(b.num_blocks(), DISK / 4096, "size from BLKGETSIZE64");
    assert!(b.io_type_supported(IoType::Unmap));
    assert!(b.io_type_supported(IoType::WriteZeroes));

    let mut ch = b.open_channel(CoreId(0), 8).unwrap();
    let mut pool = BufPool::new(4, 4 * 4096, b.buf_align()).unwrap();
    let last = b.num_blocks() - 4;
    for lba in [0u64, 8, last] {
        let mut w = pool.get(4 * 4096).unwrap();
        w.as_mut_slice().copy_from_slice(&pattern(lba, 4 * 4096));
        let io = run(
            ch.as_mut(),
            BdevIo::new(IoType::Write, lba, 4, Some(w), lba),
        );
        assert_eq!(io.status, IoStatus::Success);
        pool.put(io.buf.unwrap());
    }
    let io = run(ch.as_mut(), BdevIo::new(IoType::Flush, 0, 0, None, 0));
    assert_eq!(io.status, IoStatus::Success);
    for lba in [0u64, 8, last] {
        let io = run(
            ch.as_mut(),
            BdevIo::new(IoType::Read, lba, 4, pool.get(4 * 4096), 0),
        );
        assert_eq!(io.status, IoStatus::Success);
        assert_eq!(
            io.buf.as_ref().unwrap().as_slice(),
            &pattern(lba, 4 * 4096)[..]
        );
        pool.put(io.buf.unwrap());
    }
    // The device really holds it: the file under the loop device has the bytes.
    let f = std::fs::File::open(&img).unwrap();
    let mut got = vec![0u8; 4 * 4096];
    f.read_exact_at(&mut got, last * 4096).unwrap();
    assert_eq!(got, pattern(last, 4 * 4096));

    // Write Zeroes on block 9, Unmap on block 10: both read back as zeroes, 8 and 11 intact.
    let io = run(ch.as_mut(), BdevIo::new(IoType::WriteZeroes, 9, 1, None, 0));
    assert_eq!(io.status, IoStatus::Success);
    let io = run(ch.as_mut(), BdevIo::new(IoType::Unmap, 10, 1, None, 0));
    assert_eq!(io.status, IoStatus::Success);
    let io = run(
        ch.as_mut(),
        BdevIo::new(IoType::Read, 8, 4, pool.get(4 * 4096), 0),
    );
    assert_eq!(io.status, IoStatus::Success);
    let data = io.buf.as_ref().unwrap().as_slice();
    let want = pattern(8, 4 * 4096);
    assert_eq!(&data[..4096], &want[..4096], "block 8 intact");
    assert!(
        data[4096..3 * 4096].iter().all(|&x| x == 0),
        "blocks 9, 10 zero"
    );
    assert_eq!(&data[3 * 4096..], &want[3 * 4096..], "block 11 intact");
    pool.put(io.buf.unwrap());

    // Past the end: a status, not a kernel error.
    let io = run(
        ch.as_mut(),
        BdevIo::new(IoType::Read, b.num_blocks() - 1, 2, pool.get(2 * 4096), 0),
    );
    assert_eq!(io.status, IoStatus::InvalidRange);
    drop(ch);
    drop(b);

    // A 4 KiB-sector device cannot take 512-byte blocks under O_DIRECT.
    drop(lo);
    let Some(lo4k) = attach(&img, 4096) else {
        return;
    };
    let err = UringBdev::new(&UringConfig {
        path: lo4k.dev.clone(),
        block_size: 512,
        ..cfg
    })
    .err()
    .expect("512 on a 4K device");
    assert!(err.to_string().contains("logical block size 4096"), "{err}");
    let mut f = std::fs::File::open(&lo4k.dev).unwrap();
    let mut first = vec![0u8; 4096];
    f.read_exact(&mut first).unwrap();
    assert_eq!(first, pattern(0, 4096), "same data through the new device");
}
