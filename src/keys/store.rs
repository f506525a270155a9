//! The two header copies on the device and their crash-safe update.
//!
//! Owns: choosing the current copy on read ([`read_header`]), formatting ([`format()`]), and the
//! atomic update protocol ([`update`]): the new generation is written to the copy that does *not*
//! hold the current header (the older or the invalid one), then flushed; only after the flush
//! returns does the update count. At every instant at least one copy holds a complete header —
//! the old one until the new one is durable — so a crash or torn write at any point leaves a
//! device that opens with the old or the new generation.
//!
//! Thread: control threads only. The I/O is blocking (`pread`/`pwrite` + `fdatasync` through
//! [`HeaderIo`]) on purpose: header writes happen at format, open and rekey, never per I/O, and
//! are not on a reactor.
//!
//! [`MemIo`] is a simulated device with seeded faults (failed write, torn write, power loss with
//! or without losing unflushed writes) for the crash tests of this module, of
//! [`super::shallow_rekey`] and of the deep-rekey code.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use thiserror::Error;

use super::header::{
    decode_any, AnyHeader, CopyId, Header, HeaderError, PlainHeader, HEADER_COPY_BYTES,
    METADATA_REGION_BYTES, REKEY_AREA_OFFSET_BYTES,
};

/// Blocking positioned I/O on the backing device for header reads and writes.
pub trait HeaderIo {
    /// Reads exactly `buf.len()` bytes at byte offset `off`.
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at byte offset `off` (not durable until [`HeaderIo::flush`]).
    fn write_at(&mut self, off: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn flush(&mut self) -> io::Result<()>;
}

/// Header I/O on a regular file or block device through the page cache, made durable with
/// `fdatasync`. The data path may use O_DIRECT on the same device: the metadata region and the
/// data area never overlap, so the two do not alias in the page cache.
impl HeaderIo for File {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_exact_at(buf, off)
    }
    fn write_at(&mut self, off: u64, buf: &[u8]) -> io::Result<()> {
        self.write_all_at(buf, off)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}

impl<T: HeaderIo + ?Sized> HeaderIo for &mut T {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(off, buf)
    }
    fn write_at(&mut self, off: u64, buf: &[u8]) -> io::Result<()> {
        (**self).write_at(off, buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        (**self).flush()
    }
}

/// Why a copy could not be used.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CopyFault {
    /// Reading it failed.
    #[error("read failed: {kind:?}: {detail}")]
    Io {
        /// The error kind.
        kind: io::ErrorKind,
        /// The OS message.
        detail: String,
    },
    /// It was read but refused by the decoder.
    #[error(transparent)]
    Decode(#[from] HeaderError),
}

/// The state of the copy that was not chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OtherCopy {
    /// Valid, older (or, right after format, equal) generation.
    Valid {
        /// Its generation.
        generation: u64,
    },
    /// Unusable; the next update rewrites it.
    Invalid(CopyFault),
}

/// The current header and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The current header.
    pub header: Header,
    /// The copy it was read from (or last written to).
    pub copy: CopyId,
    /// The state of the other copy.
    pub other: OtherCopy,
}

impl Stored {
    /// The copy that was found bad, if any, and why (for logs and health reporting).
    pub fn bad_copy(&self) -> Option<(CopyId, &CopyFault)> {
        match &self.other {
            OtherCopy::Valid { .. } => None,
            OtherCopy::Invalid(fault) => Some((self.copy.other(), fault)),
        }
    }
}

/// The current header, with or without a key, and where it came from ([`read_any`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAny {
    /// The current header.
    pub header: AnyHeader,
    /// The copy it was read from (or last written to).
    pub copy: CopyId,
    /// The state of the other copy.
    pub other: OtherCopy,
}

impl StoredAny {
    /// The keyed header as a [`Stored`], or `None` for a retired (plain) header.
    pub fn keyed(&self) -> Option<Stored> {
        match &self.header {
            AnyHeader::Keyed(h) => Some(Stored {
                header: h.clone(),
                copy: self.copy,
                other: self.other.clone(),
            }),
            AnyHeader::Plain(_) => None,
        }
    }
}

impl From<Stored> for StoredAny {
    fn from(s: Stored) -> StoredAny {
        StoredAny {
            header: AnyHeader::Keyed(s.header),
            copy: s.copy,
            other: s.other,
        }
    }
}

/// Errors of the header store.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The current header is retired (a finished decrypt): the device holds plaintext and no
    /// key; [`read_any`] returns it.
    #[error("the nvseal header on this device is retired: it holds plaintext and no key")]
    Plain,
    /// Both copies are blank: the device was never formatted (or was wiped).
    #[error("no nvseal header on this device (both copies blank)")]
    NotFormatted,
    /// Neither copy is usable.
    #[error("no valid header copy: copy A: {a}; copy B: {b}")]
    NoValidCopy {
        /// Why copy A was refused.
        a: CopyFault,
        /// Why copy B was refused.
        b: CopyFault,
    },
    /// Both copies are valid with the same generation but different contents: something other
    /// than this protocol wrote them. Refused rather than guessed.
    #[error("both header copies claim generation {generation} with different contents")]
    GenerationConflict {
        /// The shared generation.
        generation: u64,
    },
    /// The valid copies belong to different devices or namespaces.
    #[error("header copies disagree on device/namespace identity")]
    CopiesDisagree,
    /// An update tried to change what a header identifies (device, namespace, creation time,
    /// geometry).
    #[error("header update may not change identity or geometry field {field}")]
    IdentityChanged {
        /// The field.
        field: &'static str,
    },
    /// The device no longer holds the header the caller based its update on.
    #[error("header on device changed since it was read (expected generation {expected}, found {found})")]
    Stale {
        /// The generation the caller had.
        expected: u64,
        /// The generation on the device.
        found: u64,
    },
    /// The generation counter would overflow.
    #[error("header generation counter exhausted")]
    GenerationExhausted,
    /// The header to write is invalid.
    #[error("refusing to write an invalid header: {0}")]
    Invalid(#[from] HeaderError),
    /// The new copy of an update was written but flushing it failed. [`update`] read both
    /// copies back to learn what the device holds; `state` says what it found.
    #[error("header update: flush failed: {source}; re-read: {state}")]
    UpdateFlushFailed {
        /// The flush error.
        #[source]
        source: io::Error,
        /// What the re-read found.
        state: UpdateState,
    },
    /// The device is smaller than the metadata region.
    #[error(
        "device of {bytes} bytes is smaller than the {METADATA_REGION_BYTES}-byte metadata region"
    )]
    DeviceTooSmall {
        /// Its size.
        bytes: u64,
    },
    /// An I/O error during format, or while reading or writing during an update. An update
    /// that fails here did not count: the previous header is still current (the write goes to
    /// the other copy, so a failed or partial write leaves the current one untouched). A failed
    /// *flush* of an update is [`StoreError::UpdateFlushFailed`] instead.
    #[error("header I/O failed during {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// What the device held when [`update`] read both copies back after its flush failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateState {
    /// Reads return the new header as current, but it is **not known to be durable**: a failed
    /// `fdatasync` may have dropped it from a volatile cache (Linux marks such pages clean), so
    /// a power loss can still bring the old header back. Treat the update as not done: do not
    /// act on it (never revoke the old KEK), and base a retry on this header — it is what the
    /// device returns now.
    NewNotDurable(Box<Stored>),
    /// Reads return the old header as current: the write did not reach the device; the update
    /// did not happen and retrying with the same `current` is safe.
    OldCurrent,
    /// The re-read failed, or found a header that is neither: the state is unknown until the
    /// device is read successfully again (reopen it before touching the header).
    Unknown(String),
}

impl std::fmt::Display for UpdateState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpdateState::NewNotDurable(s) => write!(
                f,
                "the new header (generation {}) reads back as current but is not known to be durable",
                s.header.generation
            ),
            UpdateState::OldCurrent => f.write_str("the old header is still current"),
            UpdateState::Unknown(why) => write!(f, "the header state is unknown ({why})"),
        }
    }
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> StoreError {
    move |source| StoreError::Io { op, source }
}

/// Reads and decodes one copy (for inspection; [`read_header`] chooses the current one). A
/// retired copy is [`HeaderError::Plain`] here; [`read_copy_any`] accepts it.
pub fn read_copy<I: HeaderIo + ?Sized>(io: &mut I, copy: CopyId) -> Result<Header, CopyFault> {
    match read_copy_any(io, copy)? {
        AnyHeader::Keyed(h) => Ok(h),
        AnyHeader::Plain(_) => Err(CopyFault::Decode(HeaderError::Plain)),
    }
}

/// Reads and decodes one copy, keyed or retired.
pub fn read_copy_any<I: HeaderIo + ?Sized>(
    io: &mut I,
    copy: CopyId,
) -> Result<AnyHeader, CopyFault> {
    let mut buf = vec![0u8; HEADER_COPY_BYTES];
    io.read_at(copy.offset_bytes(), &mut buf)
        .map_err(|e| CopyFault::Io {
            kind: e.kind(),
            detail: e.to_string(),
        })?;
    Ok(decode_any(&buf, copy)?)
}

/// Reads both copies and returns the valid one with the highest generation, which must carry a
/// key: a current retired header is [`StoreError::Plain`] (an older retired copy beside a
/// newer keyed one is simply the other copy). Writes nothing.
pub fn read_header<I: HeaderIo + ?Sized>(io: &mut I) -> Result<Stored, StoreError> {
    read_any(io)?.keyed().ok_or(StoreError::Plain)
}

/// Reads both copies and returns the valid one with the highest generation, keyed or retired.
/// Writes nothing.
pub fn read_any<I: HeaderIo + ?Sized>(io: &mut I) -> Result<StoredAny, StoreError> {
    let a = read_copy_any(io, CopyId::A);
    let b = read_copy_any(io, CopyId::B);
    match (a, b) {
        (Ok(a), Ok(b)) => {
            let (fa, fb) = (a.frame(), b.frame());
            if fa.device_uuid != fb.device_uuid
                || fa.namespace_uuid != fb.namespace_uuid
                || fa.created_unix_s != fb.created_unix_s
            {
                return Err(StoreError::CopiesDisagree);
            }
            if a.generation() == b.generation() {
                if a != b {
                    return Err(StoreError::GenerationConflict {
                        generation: a.generation(),
                    });
                }
                let generation = b.generation();
                return Ok(StoredAny {
                    header: a,
                    copy: CopyId::A,
                    other: OtherCopy::Valid { generation },
                });
            }
            let (newer, copy, older) = if a.generation() > b.generation() {
                (a, CopyId::A, b)
            } else {
                (b, CopyId::B, a)
            };
            Ok(StoredAny {
                header: newer,
                copy,
                other: OtherCopy::Valid {
                    generation: older.generation(),
                },
            })
        }
        (Ok(a), Err(fault)) => Ok(StoredAny {
            header: a,
            copy: CopyId::A,
            other: OtherCopy::Invalid(fault),
        }),
        (Err(fault), Ok(b)) => Ok(StoredAny {
            header: b,
            copy: CopyId::B,
            other: OtherCopy::Invalid(fault),
        }),
        (Err(a), Err(b)) => {
            let blank = CopyFault::Decode(HeaderError::Blank);
            if a == blank && b == blank {
                Err(StoreError::NotFormatted)
            } else {
                Err(StoreError::NoValidCopy { a, b })
            }
        }
    }
}

/// Writes a fresh header (generation 1) to both copies, replacing whatever was there.
///
/// Order: wipe both copies and flush, then write A and B and flush. A crash before the end
/// leaves either no valid header or the new one — never an older header from a previous format
/// beside a half-written new one.
pub fn format<I: HeaderIo + ?Sized>(io: &mut I, header: &Header) -> Result<Stored, StoreError> {
    let mut header = header.clone();
    header.generation = 1;
    let a = header.encode(CopyId::A)?;
    let b = header.encode(CopyId::B)?;
    let zero = vec![0u8; HEADER_COPY_BYTES];
    for copy in CopyId::ALL {
        io.write_at(copy.offset_bytes(), &zero)
            .map_err(io_err("format: wipe"))?;
    }
    io.flush().map_err(io_err("format: flush wipe"))?;
    io.write_at(CopyId::A.offset_bytes(), &a[..])
        .map_err(io_err("format: write copy A"))?;
    io.write_at(CopyId::B.offset_bytes(), &b[..])
        .map_err(io_err("format: write copy B"))?;
    io.flush().map_err(io_err("format: flush"))?;
    Ok(Stored {
        header,
        copy: CopyId::A,
        other: OtherCopy::Valid { generation: 1 },
    })
}

/// Fields an update may not change; returns the first that differs.
fn changed_identity(old: &Header, new: &Header) -> Option<&'static str> {
    changed_frame(&old.frame(), &new.frame())
}

/// [`changed_identity`] on the fields keyed and retired headers share.
fn changed_frame(old: &PlainHeader, new: &PlainHeader) -> Option<&'static str> {
    if old.device_uuid != new.device_uuid {
        Some("device_uuid")
    } else if old.namespace_uuid != new.namespace_uuid {
        Some("namespace_uuid")
    } else if old.created_unix_s != new.created_unix_s {
        Some("created_unix_s")
    } else if old.data_unit != new.data_unit {
        Some("data_unit")
    } else if old.data_offset_bytes != new.data_offset_bytes {
        Some("data_offset_bytes")
    } else if old.data_blocks != new.data_blocks {
        Some("data_blocks")
    } else if old.detached != new.detached {
        Some("detached")
    } else {
        None
    }
}

/// Atomically replaces the current header `current` with `new` (whose `generation` is ignored
/// and set to `current`'s + 1).
///
/// First re-reads the device and checks it still holds `current` (refusing with
/// [`StoreError::Stale`] otherwise), then writes the other copy and flushes. On `Ok` the new
/// header is durable and current. On [`StoreError::UpdateFlushFailed`] the write was issued but
/// is not known to be durable; `update` has read both copies back and the error's
/// [`UpdateState`] says what the device returns now (the outcome is unknown until that
/// re-read). On any other `Err` the old header is still current and retrying with the same
/// `current` is safe.
pub fn update<I: HeaderIo + ?Sized>(
    io: &mut I,
    current: &Stored,
    new: &Header,
) -> Result<Stored, StoreError> {
    if let Some(field) = changed_identity(&current.header, new) {
        return Err(StoreError::IdentityChanged { field });
    }
    let generation = current
        .header
        .generation
        .checked_add(1)
        .ok_or(StoreError::GenerationExhausted)?;
    let on_disk = read_header(io)?;
    if on_disk.header != current.header {
        return Err(StoreError::Stale {
            expected: current.header.generation,
            found: on_disk.header.generation,
        });
    }
    let mut header = new.clone();
    header.generation = generation;
    // Write the copy that does not hold the current header. After format both copies hold
    // generation 1 and the current one is A, so the first update goes to B.
    let target = on_disk.copy.other();
    let bytes = header.encode(target)?;
    io.write_at(target.offset_bytes(), &bytes[..])
        .map_err(io_err("update: write"))?;
    if let Err(source) = io.flush() {
        // The write may or may not have reached the device: ask it. A flush is not retried —
        // after a failed fdatasync Linux may report the next one clean with the data lost.
        let state = match read_header(io) {
            Ok(found) if found.header == header => UpdateState::NewNotDurable(Box::new(found)),
            Ok(found) if found.header == current.header => UpdateState::OldCurrent,
            Ok(found) => UpdateState::Unknown(format!(
                "found generation {} that is neither the old {} nor the new {}",
                found.header.generation, current.header.generation, header.generation
            )),
            Err(e) => UpdateState::Unknown(format!("re-read failed: {e}")),
        };
        tracing::error!(
            generation = header.generation,
            error = %source,
            "header update flush failed; re-read: {state}"
        );
        return Err(StoreError::UpdateFlushFailed { source, state });
    }
    Ok(Stored {
        header,
        copy: target,
        other: OtherCopy::Valid {
            generation: current.header.generation,
        },
    })
}

/// [`update`] for any header: replaces the current header (keyed or retired) with `new` (keyed
/// or retired), with the same protocol and guarantees. Used where a conversion retires a header
/// (decrypt) or puts a key on a retired one (encrypt). On a failed flush the error's
/// [`UpdateState`] is `NewNotDurable` only for a keyed new header; a retired one that reads back
/// as current is reported as `Unknown` (not known to be durable: re-read before acting).
pub fn update_any<I: HeaderIo + ?Sized>(
    io: &mut I,
    current: &StoredAny,
    new: &AnyHeader,
) -> Result<StoredAny, StoreError> {
    if let Some(field) = changed_frame(&current.header.frame(), &new.frame()) {
        return Err(StoreError::IdentityChanged { field });
    }
    let generation = current
        .header
        .generation()
        .checked_add(1)
        .ok_or(StoreError::GenerationExhausted)?;
    let on_disk = read_any(io)?;
    if on_disk.header != current.header {
        return Err(StoreError::Stale {
            expected: current.header.generation(),
            found: on_disk.header.generation(),
        });
    }
    let mut header = new.clone();
    header.set_generation(generation);
    let target = on_disk.copy.other();
    let bytes = header.encode(target)?;
    io.write_at(target.offset_bytes(), &bytes[..])
        .map_err(io_err("update: write"))?;
    if let Err(source) = io.flush() {
        let state = match read_any(io) {
            Ok(found) if found.header == header => match found.keyed() {
                Some(k) => UpdateState::NewNotDurable(Box::new(k)),
                None => UpdateState::Unknown(format!(
                    "the new retired header (generation {generation}) reads back as current but \
                     is not known to be durable"
                )),
            },
            Ok(found) if found.header == current.header => UpdateState::OldCurrent,
            Ok(found) => UpdateState::Unknown(format!(
                "found generation {} that is neither the old {} nor the new {generation}",
                found.header.generation(),
                current.header.generation()
            )),
            Err(e) => UpdateState::Unknown(format!("re-read failed: {e}")),
        };
        tracing::error!(
            generation,
            error = %source,
            "header update flush failed; re-read: {state}"
        );
        return Err(StoreError::UpdateFlushFailed { source, state });
    }
    Ok(StoredAny {
        header,
        copy: target,
        other: OtherCopy::Valid {
            generation: current.header.generation(),
        },
    })
}

/// How much of the data area must read as zeros, besides the whole metadata region, before a
/// namespace is formatted without `force`. 1 MiB: a wiped header (`wipefs`, a stray partition
/// table, an accidental `dd` over the first 128 KiB) leaves the namespace's ciphertext right
/// after the metadata region, and any file system or volume written through the namespace puts
/// its own metadata in its first MiB, so ciphertext there is all but certain on a used device
/// (one MiB of random bytes reads as zeros with probability 2^-8388608).
pub const FORMAT_DATA_PROBE_BYTES: u64 = 1 << 20;

/// Bytes read per call by [`first_nonzero`].
const BLANK_CHECK_CHUNK_BYTES: usize = 128 * 1024;

/// Where the blank check before a format found data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotBlank {
    /// Non-zero bytes in the metadata region outside the two header copies (the gaps after them
    /// or the deep-rekey journal area), at this device byte offset.
    Metadata {
        /// Device byte offset of the first non-zero byte.
        offset: u64,
    },
    /// Non-zero bytes in the first [`FORMAT_DATA_PROBE_BYTES`] of the data area.
    Data {
        /// Device byte offset of the first non-zero byte.
        offset: u64,
    },
}

impl std::fmt::Display for NotBlank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotBlank::Metadata { offset } if *offset >= REKEY_AREA_OFFSET_BYTES => write!(
                f,
                "the deep-rekey journal area holds data (first non-zero byte at device offset \
                 {offset})"
            ),
            NotBlank::Metadata { offset } => write!(
                f,
                "the metadata region holds data beside the header copies (first non-zero byte at \
                 device offset {offset})"
            ),
            NotBlank::Data { offset } => write!(
                f,
                "the data area holds data (first non-zero byte at device offset {offset})"
            ),
        }
    }
}

/// The device offset of the first non-zero byte in `[start, start + len)`, read with `read` in
/// chunks of [`BLANK_CHECK_CHUNK_BYTES`]. Reads only.
pub fn first_nonzero(
    mut read: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    start: u64,
    len: u64,
) -> io::Result<Option<u64>> {
    let mut buf = vec![0u8; BLANK_CHECK_CHUNK_BYTES];
    let mut off = start;
    let end = start.saturating_add(len);
    while off < end {
        let n = usize::try_from(end - off)
            .unwrap_or(usize::MAX)
            .min(BLANK_CHECK_CHUNK_BYTES);
        let chunk = &mut buf[..n];
        read(off, chunk)?;
        if let Some(i) = chunk.iter().position(|&b| b != 0) {
            return Ok(Some(off + i as u64));
        }
        off += n as u64;
    }
    Ok(None)
}

/// Checks that the whole metadata region reads as zeros through `io` (the header copies, the
/// gaps after them and the deep-rekey journal area). Part of the blank check before a format;
/// the caller checks the first [`FORMAT_DATA_PROBE_BYTES`] of the data area through the base
/// device. Reads only.
pub fn check_metadata_blank<I: HeaderIo + ?Sized>(io: &mut I) -> Result<(), FormatBlankError> {
    match first_nonzero(|off, buf| io.read_at(off, buf), 0, METADATA_REGION_BYTES) {
        Ok(None) => Ok(()),
        Ok(Some(offset)) => Err(FormatBlankError::NotBlank(NotBlank::Metadata { offset })),
        Err(source) => Err(FormatBlankError::Io(StoreError::Io {
            op: "blank check: read metadata region",
            source,
        })),
    }
}

/// Why the blank check before a format did not pass.
#[derive(Debug, Error)]
pub enum FormatBlankError {
    /// Data was found; formatting would draw a new DEK over it.
    #[error("{0}")]
    NotBlank(NotBlank),
    /// Reading failed (retrying may work).
    #[error(transparent)]
    Io(StoreError),
}

/// Checks that a device of `bytes` can hold the metadata region.
pub fn check_device_size(bytes: u64) -> Result<(), StoreError> {
    if bytes <= METADATA_REGION_BYTES {
        return Err(StoreError::DeviceTooSmall { bytes });
    }
    Ok(())
}

/// A seeded fault for [`MemIo`]. Counters start when the fault is armed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// No fault.
    None,
    /// Write number `nth` (0-based) fails with EIO and changes nothing; the device stays up.
    FailWrite {
        /// Which write.
        nth: u64,
    },
    /// Write number `nth` (0-based) reaches the media only in its first half (whole atomic
    /// pieces), then power is lost: that write and every later operation fail until [`MemIo::crash`].
    TearWrite {
        /// Which write.
        nth: u64,
    },
    /// After `ops` successful writes and flushes, power is lost: later operations fail until
    /// [`MemIo::crash`].
    PowerLossAfter {
        /// How many operations succeed.
        ops: u64,
    },
}

/// What happens to writes that were not flushed when power is lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// They are lost (the volatile cache is dropped).
    DropUnflushed,
    /// They reached the media anyway.
    KeepUnflushed,
}

/// An in-memory device with fault injection: a durable image (what survives power loss) and a
/// volatile image (what reads see; writes land here and reach the durable image on flush).
#[derive(Clone, Debug)]
pub struct MemIo {
    durable: Vec<u8>,
    volatile: Vec<u8>,
    fault: Fault,
    writes_since_armed: u64,
    ops_since_armed: u64,
    ops_total: u64,
    powered: bool,
    /// Write atomicity: a torn write keeps whole pieces of this size (the device's block; a
    /// data unit is written atomically, as devices promise for one logical block).
    atomic: usize,
}

fn power_lost() -> io::Error {
    io::Error::other("simulated power loss")
}

impl MemIo {
    /// A zero-filled device of `bytes` bytes.
    pub fn new(bytes: usize) -> Self {
        Self {
            durable: vec![0; bytes],
            volatile: vec![0; bytes],
            fault: Fault::None,
            writes_since_armed: 0,
            ops_since_armed: 0,
            ops_total: 0,
            powered: true,
            atomic: 512,
        }
    }

    /// Sets the write atomicity (default 512 bytes): a torn write keeps whole pieces of `bytes`.
    pub fn with_atomic_bytes(mut self, bytes: usize) -> Self {
        self.atomic = bytes.max(1);
        self
    }

    /// Arms a fault and restarts its counters.
    pub fn arm(&mut self, fault: Fault) {
        self.fault = fault;
        self.writes_since_armed = 0;
        self.ops_since_armed = 0;
    }

    /// Writes and flushes performed since creation (to enumerate crash points).
    pub fn ops_total(&self) -> u64 {
        self.ops_total
    }

    /// False after a simulated power loss, until [`MemIo::crash`].
    pub fn is_powered(&self) -> bool {
        self.powered
    }

    /// Power cycle: unflushed writes are dropped or kept per `mode`, the fault is disarmed and
    /// the device works again.
    pub fn crash(&mut self, mode: CrashMode) {
        match mode {
            CrashMode::DropUnflushed => self.volatile.copy_from_slice(&self.durable),
            CrashMode::KeepUnflushed => self.durable.copy_from_slice(&self.volatile),
        }
        self.powered = true;
        self.arm(Fault::None);
    }

    /// The bytes reads currently see.
    pub fn image(&self) -> &[u8] {
        &self.volatile
    }

    /// Flips bits in both images (silent corruption at rest).
    pub fn corrupt(&mut self, off: usize, xor: u8) {
        if let Some(b) = self.volatile.get_mut(off) {
            *b ^= xor;
        }
        if let Some(b) = self.durable.get_mut(off) {
            *b ^= xor;
        }
    }

    fn range(&self, off: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start =
            usize::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let end = start
            .checked_add(len)
            .filter(|&end| end <= self.volatile.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        Ok(start..end)
    }

    /// Counts an operation against a `PowerLossAfter` fault; false = power is now lost.
    fn admit_op(&mut self) -> bool {
        if !self.powered {
            return false;
        }
        if let Fault::PowerLossAfter { ops } = self.fault {
            if self.ops_since_armed >= ops {
                self.powered = false;
                return false;
            }
        }
        self.ops_since_armed += 1;
        self.ops_total += 1;
        true
    }
}

impl HeaderIo for MemIo {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        if !self.powered {
            return Err(power_lost());
        }
        let r = self.range(off, buf.len())?;
        buf.copy_from_slice(&self.volatile[r]);
        Ok(())
    }

    fn write_at(&mut self, off: u64, buf: &[u8]) -> io::Result<()> {
        let r = self.range(off, buf.len())?;
        let nth = self.writes_since_armed;
        match self.fault {
            Fault::FailWrite { nth: n } if n == nth && self.powered => {
                self.writes_since_armed += 1;
                return Err(io::Error::other("simulated write error"));
            }
            Fault::TearWrite { nth: n } if n == nth && self.powered => {
                let half = buf.len() / 2 / self.atomic * self.atomic;
                let torn = r.start..r.start + half;
                self.volatile[torn.clone()].copy_from_slice(&buf[..half]);
                self.durable[torn].copy_from_slice(&buf[..half]);
                self.powered = false;
                return Err(power_lost());
            }
            _ => {}
        }
        if !self.admit_op() {
            return Err(power_lost());
        }
        self.writes_since_armed += 1;
        self.volatile[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.admit_op() {
            return Err(power_lost());
        }
        self.durable.copy_from_slice(&self.volatile);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
