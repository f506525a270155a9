//! The crypto bdev: AES-256-XTS in place on top of any bdev.
//!
//! Runs on the reactor that owns the channel; the cipher work happens on that core, inside the
//! submit (writes) and poll (reads) calls, with no copy: the buffer belongs to the I/O, so it is
//! transformed where it is (SPDK's crypto vbdev pays a bounce copy for writes; we do not).
//!
//! Buffer ownership and contents:
//! * Write: the caller hands a plaintext buffer to `submit`; it is encrypted in place before the
//!   base bdev sees it. When the write completes the caller gets the buffer back holding
//!   **ciphertext** (callers that need the plaintext afterwards must keep their own copy).
//! * Read: the base bdev fills the buffer with ciphertext; it is decrypted in place before the
//!   completion is handed to the caller, so the caller only ever sees plaintext. A failed read is
//!   handed back undecrypted with its error status.
//!
//! Data unit = the base bdev's block size; tweak = the block's LBA on this bdev, little-endian
//! (dm-crypt `aes-xts-plain64` with `--sector-size` = block size).
//!
//! Write Zeroes is not supported (reading zeroes back would need encrypted zero blocks written;
//! dm-crypt refuses it too). Unmap passes through only with `allow_discards` (as dm-crypt's
//! option: it reveals which blocks are unused); unmapped blocks then read back as unspecified data.

use crate::bdev::{validate, Bdev, BdevChannel, BdevError, BdevIo, IoStatus, IoType, Submit};
use crate::crypto::key::XtsKey;
use crate::crypto::xts::{Tier, Xts};
use crate::crypto::CryptoError;
use crate::types::CoreId;
use std::collections::VecDeque;
use std::sync::Arc;

/// The key a crypto bdev encrypts with: an expanded XTS key shared by all of the bdev's channels.
/// Key management (KEK/DEK unwrap) produces one of these; the crypto bdev never sees how.
#[derive(Clone)]
pub struct DataKey {
    xts: Arc<Xts>,
}

impl DataKey {
    /// Expands `key` for the best tier ≤ `max_tier`.
    pub fn new(key: &XtsKey, max_tier: Option<Tier>) -> Result<DataKey, CryptoError> {
        Ok(DataKey {
            xts: Arc::new(Xts::new(key, max_tier)?),
        })
    }
    pub fn tier(&self) -> Tier {
        self.xts.tier()
    }
    pub fn xts(&self) -> &Xts {
        &self.xts
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataKey(<redacted>, tier {})", self.xts.tier().name())
    }
}

/// A bdev that encrypts everything it stores on `base`.
pub struct CryptoBdev {
    name: String,
    base: Arc<dyn Bdev>,
    key: DataKey,
    allow_discards: bool,
}

impl CryptoBdev {
    pub fn new(
        name: &str,
        base: Arc<dyn Bdev>,
        key: DataKey,
        allow_discards: bool,
    ) -> Result<Self, BdevError> {
        let bs = base.block_size();
        if bs == 0 || !bs.is_multiple_of(16) {
            return Err(BdevError::Invalid {
                name: name.to_string(),
                what: format!("base block size {bs} is not a multiple of the AES block (16 bytes)"),
            });
        }
        Ok(CryptoBdev {
            name: name.to_string(),
            base,
            key,
            allow_discards,
        })
    }
    pub fn base(&self) -> &Arc<dyn Bdev> {
        &self.base
    }
    pub fn tier(&self) -> Tier {
        self.key.tier()
    }
}

impl Bdev for CryptoBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn block_size(&self) -> u32 {
        self.base.block_size()
    }
    fn num_blocks(&self) -> u64 {
        self.base.num_blocks()
    }
    fn io_type_supported(&self, t: IoType) -> bool {
        match t {
            IoType::Read | IoType::Write | IoType::Flush => self.base.io_type_supported(t),
            IoType::WriteZeroes => false,
            IoType::Unmap => self.allow_discards && self.base.io_type_supported(t),
        }
    }
    fn buf_align(&self) -> usize {
        self.base.buf_align()
    }
    fn open_channel(
        &self,
        core: CoreId,
        queue_depth: usize,
    ) -> Result<Box<dyn BdevChannel>, BdevError> {
        let base = self.base.open_channel(core, queue_depth)?;
        Ok(Box::new(CryptoChannel {
            base,
            key: self.key.clone(),
            block_size: self.base.block_size() as usize,
            num_blocks: self.base.num_blocks(),
            allow_discards: self.allow_discards,
            pending: VecDeque::with_capacity(queue_depth),
            done: VecDeque::with_capacity(queue_depth),
            depth: queue_depth,
        }))
    }
}

/// A reactor's channel on a crypto bdev.
struct CryptoChannel {
    base: Box<dyn BdevChannel>,
    key: DataKey,
    block_size: usize,
    num_blocks: u64,
    allow_discards: bool,
    /// Already-encrypted writes (and other I/O) the base channel pushed back; retried in `poll`.
    pending: VecDeque<BdevIo>,
    /// I/O completed here without reaching the base (invalid, unsupported).
    done: VecDeque<BdevIo>,
    depth: usize,
}

impl CryptoChannel {
    fn queued(&self) -> usize {
        self.pending.len() + self.done.len()
    }
}

impl BdevChannel for CryptoChannel {
    fn submit(&mut self, mut io: BdevIo) -> Submit {
        if self.queued() + self.base.in_flight() >= self.depth {
            return Submit::Busy(io);
        }
        let unsupported = match io.io_type {
            IoType::WriteZeroes => true,
            IoType::Unmap => !self.allow_discards,
            _ => false,
        };
        if unsupported {
            io.status = IoStatus::Unsupported;
            self.done.push_back(io);
            return Submit::Queued;
        }
        if let Err(st) = validate(&io, self.block_size as u32, self.num_blocks) {
            io.status = st;
            self.done.push_back(io);
            return Submit::Queued;
        }
        if io.io_type == IoType::Write {
            let first = io.offset_blocks;
            // Let the base start fetching the destination while the cipher runs.
            self.base.hint_write(first, io.num_blocks);
            if let Some(buf) = io.buf.as_mut() {
                if self
                    .key
                    .xts
                    .encrypt_units(buf.as_mut_slice(), self.block_size, first)
                    .is_err()
                {
                    // validate() checked the length, so this is unreachable in practice; still a
                    // status, never a panic.
                    io.status = IoStatus::InvalidRange;
                    self.done.push_back(io);
                    return Submit::Queued;
                }
            }
        }
        if !self.pending.is_empty() {
            // Keep order behind earlier pushed-back I/O.
            self.pending.push_back(io);
            return Submit::Queued;
        }
        match self.base.submit(io) {
            Submit::Queued => Submit::Queued,
            Submit::Busy(io) => {
                // Already encrypted: keep it rather than hand ciphertext back to the caller.
                self.pending.push_back(io);
                Submit::Queued
            }
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(BdevIo)) -> usize {
        let mut n = 0;
        while let Some(io) = self.pending.pop_front() {
            match self.base.submit(io) {
                Submit::Queued => {}
                Submit::Busy(io) => {
                    self.pending.push_front(io);
                    break;
                }
            }
        }
        while let Some(io) = self.done.pop_front() {
            done(io);
            n += 1;
        }
        let key = &self.key;
        let bs = self.block_size;
        n += self.base.poll(&mut |mut io: BdevIo| {
            if io.io_type == IoType::Read && io.status == IoStatus::Success {
                let first = io.offset_blocks;
                if let Some(buf) = io.buf.as_mut() {
                    if key
                        .xts
                        .decrypt_units(buf.as_mut_slice(), bs, first)
                        .is_err()
                    {
                        io.status = IoStatus::InvalidRange;
                    }
                }
            }
            done(io)
        });
        n
    }

    fn in_flight(&self) -> usize {
        self.base.in_flight() + self.queued()
    }
}
