//! The deep-rekey pass under live I/O: joins the crypto bdev's key map (hot zone, split keying;
//! `crate::crypto::keymap`) with the durable steps of `super::convert` (docs/lifecycle.md §2).
//!
//! [`run`] drives the pass on a control thread, one segment at a time: make the segment hot (host
//! I/O to it is refused as Busy, I/O already in flight drains), convert it durably, publish the
//! new watermark, let the host back in. It stops between segments when asked ([`PassControl`]:
//! pause, rate limit) and finishes the rekey when the watermark reaches the end. Online, the data
//! I/O of the pass goes through [`ReactorDataIo`]: submitted and completed on a reactor, on that
//! reactor's own channel of the base bdev, a bounded number per poll so host I/O on the same
//! reactor interleaves; the control thread only waits for the answers. [`BdevDataIo`] (a private
//! channel polled on the calling thread) serves offline use and tests.
//!
//! A failed step never hands a half-written segment to the host: the segment stays hot until
//! [`super::convert::recover`] has put it back as the header describes; if even that fails, it
//! stays hot (its I/O keeps being refused) and the error says so.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::convert::{self, ConvertError, Converted, DataIo, Keys, Step};
use super::store::{HeaderIo, Stored, StoredAny};
use crate::bdev::{Bdev, BdevIo, IoBuf, IoStatus, IoType};
use crate::crypto::bdev::DataKey;
use crate::crypto::keymap::{KeyControl, KeyMapError, Keying};
use crate::sys::buf::AlignedBuf;
use crate::types::CoreId;

/// How long a segment may wait for host I/O already in flight before the step gives up.
pub const GRACE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one data I/O of the pass may take.
const DATA_IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of the pass.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    Convert(#[from] ConvertError),
    #[error(transparent)]
    KeyMap(#[from] KeyMapError),
    #[error("step failed ({step}) and the segment could not be restored ({recover}); it stays fenced off from host I/O")]
    Fenced { step: String, recover: String },
}

/// What a caller may change while a pass runs (from any thread), and its progress.
#[derive(Debug, Default)]
pub struct PassControl {
    pause: AtomicBool,
    /// MiB/s; 0 = unlimited.
    rate_mib_s: AtomicU64,
    watermark: AtomicU64,
    bytes_done: AtomicU64,
}

impl PassControl {
    pub fn new(rate_mib_s: u64) -> Arc<PassControl> {
        let c = PassControl::default();
        c.rate_mib_s.store(rate_mib_s, Ordering::Relaxed);
        Arc::new(c)
    }
    /// Asks the pass to stop after the segment in progress.
    pub fn pause(&self) {
        self.pause.store(true, Ordering::Release);
    }
    pub fn is_paused(&self) -> bool {
        self.pause.load(Ordering::Acquire)
    }
    pub fn resume(&self) {
        self.pause.store(false, Ordering::Release);
    }
    pub fn set_rate(&self, mib_s: u64) {
        self.rate_mib_s.store(mib_s, Ordering::Relaxed);
    }
    /// The rate limit in MiB/s (0 = unlimited).
    pub fn rate_mib_s(&self) -> u64 {
        self.rate_mib_s.load(Ordering::Relaxed)
    }
    /// Records the watermark a resumed pass starts at (status before its first segment).
    pub fn set_watermark(&self, blocks: u64) {
        self.watermark.store(blocks, Ordering::Relaxed);
    }
    /// The watermark last made durable.
    pub fn watermark(&self) -> u64 {
        self.watermark.load(Ordering::Relaxed)
    }
    /// Bytes converted by this run of the pass.
    pub fn bytes_done(&self) -> u64 {
        self.bytes_done.load(Ordering::Relaxed)
    }
}

/// How [`run`] ended.
#[derive(Debug)]
pub enum PassEnd {
    /// Every unit is under the new key (deep rekey) or the DEK (encrypt); the header says so;
    /// the bdev is keyed `Single(new)`.
    Finished(Stored),
    /// Paused between segments; resume with another [`run`] on this header.
    Paused(Stored),
    /// A decrypt finished: every unit is plaintext, the header is retired (no key on disk), the
    /// bdev is keyed plaintext.
    Decrypted(StoredAny),
}

/// The metadata region and the data area of one namespace, as one object for
/// [`convert::step`].
pub struct NamespaceIo<'a> {
    pub meta: &'a mut dyn HeaderIo,
    pub data: &'a mut dyn DataIo,
}

impl HeaderIo for NamespaceIo<'_> {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.meta.read_at(off, buf)
    }
    fn write_at(&mut self, off: u64, buf: &[u8]) -> io::Result<()> {
        self.meta.write_at(off, buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.meta.flush()
    }
}

impl DataIo for NamespaceIo<'_> {
    fn read_blocks(&mut self, lba: u64, buf: &mut [u8]) -> io::Result<()> {
        self.data.read_blocks(lba, buf)
    }
    fn write_blocks_durable(&mut self, lba: u64, buf: &[u8]) -> io::Result<()> {
        self.data.write_blocks_durable(lba, buf)
    }
    fn read_converted(
        &mut self,
        lba: u64,
        units: u32,
        unit: usize,
        keys: &Keys,
    ) -> io::Result<Converted> {
        self.data.read_converted(lba, units, unit, keys)
    }
    fn write_converted_durable(
        &mut self,
        lba: u64,
        seg: &mut Converted,
        len: usize,
        unit: usize,
    ) -> io::Result<()> {
        self.data.write_converted_durable(lba, seg, len, unit)
    }
    fn recycle(&mut self, seg: Converted) {
        self.data.recycle(seg);
    }
}

/// Runs (or resumes) the deep rekey whose state `current` holds, on `ctl`'s bdev keyed
/// `Split { below: new, above: old }` at the header's watermark (installed here if it is not).
/// Blocking; control threads only.
pub fn run(
    io: &mut NamespaceIo<'_>,
    current: Stored,
    ctl: &KeyControl,
    old: &DataKey,
    new: &DataKey,
    control: &PassControl,
    now_unix_s: &dyn Fn() -> u64,
) -> Result<PassEnd, PassError> {
    convert::deep_state(&current.header)?;
    run_any(io, current, ctl, Some(new), Some(old), control, now_unix_s)
}

/// Runs (or resumes) any pass `current` records (deep rekey, encrypt, decrypt) on `ctl`'s bdev
/// keyed `Split { below, above }` at the header's watermark (installed here if the bdev is not
/// split yet): `below` keys the units the pass has converted, `above` the rest, `None` is
/// plaintext (encrypt: `below` = the DEK; decrypt: `above` = the DEK). At the end a deep rekey or
/// an encrypt is finished with [`convert::finish`] and the bdev keyed `Single(below)`; a decrypt
/// with [`convert::finish_decrypt`] and the bdev keyed plaintext. Blocking; control threads only.
pub fn run_any(
    io: &mut NamespaceIo<'_>,
    mut current: Stored,
    ctl: &KeyControl,
    below: Option<&DataKey>,
    above: Option<&DataKey>,
    control: &PassControl,
    now_unix_s: &dyn Fn() -> u64,
) -> Result<PassEnd, PassError> {
    let (watermark, segment) = convert::progress(&current.header)?;
    let split_now = match ctl.keying() {
        Keying::Split(s) => !s.is_plain(),
        Keying::Single(_) => false,
    };
    if !split_now {
        ctl.begin_split(
            below.cloned(),
            above.cloned(),
            watermark,
            u64::from(segment),
        );
    }
    control.watermark.store(watermark, Ordering::Relaxed);
    let unit = u64::from(current.header.data_unit.bytes());
    let keys = Keys {
        below: below.cloned(),
        above: above.cloned(),
    };
    let started = Instant::now();
    let mut bytes = 0u64;
    loop {
        if control.is_paused() {
            return Ok(PassEnd::Paused(current));
        }
        let (w, seg) = convert::progress(&current.header)?;
        let (_, len) = convert::segment_from(w, seg, current.header.data_blocks);
        if len == 0 {
            break;
        }
        let units = step_units(control.rate_mib_s(), unit).min(u64::from(len));
        ctl.make_hot_for(units, GRACE_TIMEOUT).inspect_err(|_| {
            let _ = ctl.cool();
        })?;
        match convert::step_limited(io, &current, &keys, now_unix_s(), units) {
            Ok(Step::Advanced(next)) => {
                let (w, _) = convert::progress(&next.header)?;
                ctl.advance(w)?;
                control.watermark.store(w, Ordering::Relaxed);
                current = *next;
            }
            Ok(Step::Complete) => {
                ctl.cool()?;
                break;
            }
            Err(step) => {
                // The segment may be half rewritten: put it back before the host sees it.
                return match convert::recover(io, &current, &keys) {
                    Ok(_) => {
                        ctl.cool()?;
                        Err(step.into())
                    }
                    Err(rec) => {
                        tracing::error!(step = %step, recover = %rec,
                            "conversion pass: segment could not be restored; it stays fenced off");
                        Err(PassError::Fenced {
                            step: step.to_string(),
                            recover: rec.to_string(),
                        })
                    }
                };
            }
        }
        let seg_bytes = units * unit;
        bytes += seg_bytes;
        control.bytes_done.fetch_add(seg_bytes, Ordering::Relaxed);
        throttle(control, bytes, started);
    }
    if convert::conversion_state(&current.header)
        .is_ok_and(|c| c.direction == crate::keys::header::Direction::Decrypt)
    {
        let done = convert::finish_decrypt(io, &current, now_unix_s())?;
        ctl.set_keying(Keying::plain());
        return Ok(PassEnd::Decrypted(done));
    }
    let done = convert::finish(io, &current, now_unix_s())?;
    match below {
        Some(k) => ctl.set_keying(Keying::Single(k.clone())),
        None => ctl.set_keying(Keying::plain()),
    }
    Ok(PassEnd::Finished(done))
}

/// Largest step (and the step of an unlimited pass): 2 MiB, one checksum-journal flush group.
/// Measured on a 4 GiB malloc pass (cpu family 25): 512 KiB steps 2.06 GB/s, 2 MiB 2.39 GB/s,
/// 16 MiB 1.41 GB/s (the step's buffer falls out of the caches between its passes over it); on a
/// file 2 MiB and 16 MiB steps both ran at 0.62 of `dd` read+rewrite. Host I/O to the step's
/// units waits while they are converted (about 0.7 ms for 2 MiB).
pub const MAX_STEP_BYTES: u64 = 2 << 20;
/// Smallest step: 512 KiB.
pub const MIN_STEP_BYTES: u64 = 512 << 10;

/// The units one step converts: unlimited → [`MAX_STEP_BYTES`]; at a rate limit, what the rate
/// moves in 4 ms, within [`MIN_STEP_BYTES`]..=[`MAX_STEP_BYTES`]. Each step pays a fixed cost
/// (two grace periods of the host I/O in flight, a journal and a header write, and ~2 reactor
/// polls per I/O, which take longer under host load): with 1 ms steps a 500 MiB/s pass under a
/// QD32 host fell to 100–300 MiB/s.
pub fn step_units(rate_mib_s: u64, unit: u64) -> u64 {
    let bytes = if rate_mib_s == 0 {
        MAX_STEP_BYTES
    } else {
        (rate_mib_s << 20) / 250
    };
    bytes.clamp(MIN_STEP_BYTES, MAX_STEP_BYTES) / unit.max(1)
}

/// Sleeps so that the pass stays under its rate (if one is set).
fn throttle(control: &PassControl, bytes: u64, started: Instant) {
    let rate = control.rate_mib_s.load(Ordering::Relaxed);
    if rate == 0 {
        return;
    }
    let due = Duration::from_secs_f64(bytes as f64 / (rate as f64 * 1024.0 * 1024.0));
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        std::thread::sleep(wait.min(Duration::from_secs(1)));
    }
}

/// Data-area I/O on a bdev (the namespace's data window) through a private channel polled on
/// the calling thread; "durable" = the write, then a Flush if the bdev has a cache to flush.
pub struct BdevDataIo {
    bdev: Arc<dyn Bdev>,
    core: CoreId,
}

impl BdevDataIo {
    pub fn new(bdev: Arc<dyn Bdev>, core: CoreId) -> BdevDataIo {
        BdevDataIo { bdev, core }
    }

    fn run(&self, io: BdevIo) -> io::Result<BdevIo> {
        let io = crate::bdev::run_blocking(self.bdev.as_ref(), self.core, io, DATA_IO_TIMEOUT)
            .map_err(|e| io::Error::other(format!("data I/O of the pass: {e}")))?;
        match io.status {
            IoStatus::Success => Ok(io),
            IoStatus::IoError(errno) => Err(io::Error::from_raw_os_error(errno)),
            other => Err(io::Error::other(format!(
                "bdev {}: data I/O of the pass failed: {other:?}",
                self.bdev.name()
            ))),
        }
    }

    fn blocks_of(&self, len: usize) -> io::Result<u32> {
        let bs = self.bdev.block_size() as usize;
        if bs == 0 || !len.is_multiple_of(bs) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "data I/O of the pass is not whole blocks",
            ));
        }
        u32::try_from(len / bs)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "data I/O too large"))
    }

    fn buffer(&self, len: usize) -> io::Result<IoBuf> {
        let mem = AlignedBuf::zeroed(len, self.bdev.buf_align().max(64))
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "pass buffer"))?;
        Ok(IoBuf::new(mem, len))
    }
}

impl DataIo for BdevDataIo {
    fn read_blocks(&mut self, lba: u64, buf: &mut [u8]) -> io::Result<()> {
        let n = self.blocks_of(buf.len())?;
        let b = self.buffer(buf.len())?;
        let io = self.run(BdevIo::new(IoType::Read, lba, n, Some(b), 0))?;
        let b = io
            .buf
            .ok_or_else(|| io::Error::other("read completed without its buffer"))?;
        buf.copy_from_slice(b.as_slice());
        Ok(())
    }
    fn write_blocks_durable(&mut self, lba: u64, buf: &[u8]) -> io::Result<()> {
        let n = self.blocks_of(buf.len())?;
        let mut b = self.buffer(buf.len())?;
        b.as_mut_slice().copy_from_slice(buf);
        self.run(BdevIo::new(IoType::Write, lba, n, Some(b), 0).with_fua(true))?;
        if self.bdev.io_type_supported(IoType::Flush) {
            self.run(BdevIo::new(IoType::Flush, 0, 0, None, 0))?;
        }
        Ok(())
    }
}

pub mod reactor_io;
pub use reactor_io::{ReactorDataIo, ReactorIoOptions};

#[cfg(test)]
mod tests;
