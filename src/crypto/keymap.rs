//! How a crypto bdev's data area is keyed, and how that changes under live I/O
//! (docs/lifecycle.md §1).
//!
//! A crypto bdev is keyed by one key ([`Keying::Single`]) or, while a conversion (deep rekey,
//! encrypt, decrypt) runs, in two parts split at a watermark ([`Keying::Split`]): data units below
//! it under `below`, the others under `above` (`None` = stored in plaintext). Its channels pick the
//! key per data unit when they encrypt a write or decrypt a read.
//!
//! The control side ([`KeyControl`], control threads only) swaps the keying and runs the
//! conversion's **hot zone**: the segment starting at the watermark, which no host I/O may touch
//! while the pass rewrites it. Exclusion costs the data path no lock: every channel counts its
//! I/Os in flight in two counters chosen by the parity of a global *epoch* it reads at submit,
//! then reads the hot flag; an I/O overlapping the hot segment is refused as Busy (its submitter
//! retries it later). [`KeyControl::make_hot`] sets the flag, flips the epoch and waits until every
//! channel's counter of the old parity is zero: each I/O that started before the flag was visible
//! has finished, and each later one saw the flag. (The argument is Dekker's: the channel's counter
//! store and the controller's flag store are each followed by a full fence before the other side
//! is read, so at least one of the two sees the other.) The wait ends within one I/O latency; it
//! never waits for I/O that starts later, so a busy host cannot starve the pass.
//!
//! The watermark moves only past the hot segment ([`KeyControl::advance`] stores it, then clears
//! the flag), so the key an in-flight I/O's data units were encrypted under never changes while
//! it is in flight: a read is decrypted at completion by the same rule its write used.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::crypto::bdev::DataKey;

/// The keying of a data area.
#[derive(Clone, Debug)]
pub enum Keying {
    /// Every data unit under one key.
    Single(DataKey),
    /// A conversion in progress: split at a watermark. With neither part keyed it is a plaintext
    /// data area ([`Keying::plain`]): a namespace served in the clear that `namespace.encrypt`
    /// can convert under live I/O (docs/lifecycle.md §7).
    Split(Arc<Split>),
}

impl Keying {
    /// Every data unit stored in plaintext: a `Split` with no key on either side and no hot
    /// segment, so an encrypt can start under live I/O by swapping in `Split { below: DEK,
    /// above: None }` at watermark 0 (the two agree on every unit).
    pub fn plain() -> Keying {
        Keying::Split(Arc::new(Split {
            below: None,
            above: None,
            watermark: AtomicU64::new(0),
            segment_blocks: 1,
            hot_blocks: AtomicU64::new(1),
            hot: AtomicBool::new(false),
        }))
    }

    /// True if no data unit is encrypted (see [`Keying::plain`]).
    pub fn is_plain(&self) -> bool {
        matches!(self, Keying::Split(s) if s.is_plain())
    }
}

/// A data area keyed in two parts (see the module docs).
#[derive(Debug)]
pub struct Split {
    /// Key of the data units below the watermark (`None` = plaintext).
    pub below: Option<DataKey>,
    /// Key of the data units at or above the watermark (`None` = plaintext).
    pub above: Option<DataKey>,
    watermark: AtomicU64,
    segment_blocks: u64,
    /// Length of the hot segment of the step in progress (≤ `segment_blocks`).
    hot_blocks: AtomicU64,
    hot: AtomicBool,
}

impl Split {
    /// The watermark: units below it are under `below`.
    pub fn watermark(&self) -> u64 {
        self.watermark.load(Ordering::Acquire)
    }
    /// The hot segment `[watermark, watermark + segment)`, if the pass is rewriting it.
    pub fn hot_range(&self) -> Option<(u64, u64)> {
        if self.hot.load(Ordering::SeqCst) {
            let w = self.watermark.load(Ordering::SeqCst);
            let len = self.hot_blocks.load(Ordering::SeqCst);
            Some((w, w.saturating_add(len)))
        } else {
            None
        }
    }
    /// True if neither part is keyed: a plaintext data area ([`Keying::plain`]).
    pub fn is_plain(&self) -> bool {
        self.below.is_none() && self.above.is_none()
    }
    /// The key of data unit `lba`.
    pub fn key_of(&self, lba: u64) -> Option<&DataKey> {
        if lba < self.watermark() {
            self.below.as_ref()
        } else {
            self.above.as_ref()
        }
    }
}

/// One channel's I/Os in flight, per epoch parity. Written only by its channel's reactor.
#[derive(Debug, Default)]
pub struct Gate {
    inflight: [AtomicU64; 2],
}

/// Errors of the control side.
#[derive(Debug, thiserror::Error)]
pub enum KeyMapError {
    #[error("I/O started before the hot zone was set did not finish within {0:?}")]
    GraceTimeout(Duration),
    #[error("no conversion is in progress on this bdev")]
    NotSplit,
}

/// Shared by a crypto bdev, its channels and the conversion driver.
#[derive(Debug)]
pub struct KeyControl {
    keying: Mutex<Keying>,
    /// Bumped on every change of `keying`; channels refresh their cached copy when it moves.
    version: AtomicU64,
    epoch: AtomicU64,
    gates: Mutex<Vec<Weak<Gate>>>,
    /// Serializes grace periods (one conversion driver at a time).
    grace: Mutex<()>,
}

impl KeyControl {
    pub fn new(keying: Keying) -> KeyControl {
        KeyControl {
            keying: Mutex::new(keying),
            version: AtomicU64::new(1),
            epoch: AtomicU64::new(0),
            gates: Mutex::new(Vec::new()),
            grace: Mutex::new(()),
        }
    }

    /// The current keying.
    pub fn keying(&self) -> Keying {
        self.keying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the keying. Only keyings that agree on every data unit without I/O in flight
    /// may be swapped under live I/O: `Single(k)` ↔ `Split` at watermark 0 with `above = k`, and
    /// `Split` with the watermark at the end and `below = k` → `Single(k)`. Anything else (crypto
    /// erase) first makes the whole area hot with [`KeyControl::quiesce_all`].
    pub fn set_keying(&self, keying: Keying) {
        *self.keying.lock().unwrap_or_else(|e| e.into_inner()) = keying;
        self.version.fetch_add(1, Ordering::SeqCst);
    }

    /// Starts a conversion: `Split` at `watermark` with hot segments of `segment_blocks`.
    pub fn begin_split(
        &self,
        below: Option<DataKey>,
        above: Option<DataKey>,
        watermark: u64,
        segment_blocks: u64,
    ) -> Arc<Split> {
        let s = Arc::new(Split {
            below,
            above,
            watermark: AtomicU64::new(watermark),
            segment_blocks: segment_blocks.max(1),
            hot_blocks: AtomicU64::new(segment_blocks.max(1)),
            hot: AtomicBool::new(false),
        });
        self.set_keying(Keying::Split(s.clone()));
        s
    }

    fn split(&self) -> Result<Arc<Split>, KeyMapError> {
        match self.keying() {
            Keying::Split(s) => Ok(s),
            Keying::Single(_) => Err(KeyMapError::NotSplit),
        }
    }

    /// Makes the segment at the watermark hot and waits (blocking, up to `timeout`) until no
    /// I/O that may overlap it is in flight. On a timeout the segment stays hot (host I/O to it
    /// keeps being refused as Busy): call [`KeyControl::cool`] to give it back.
    pub fn make_hot(&self, timeout: Duration) -> Result<(), KeyMapError> {
        let s = self.split()?;
        self.make_hot_for(s.segment_blocks, timeout)
    }

    /// [`KeyControl::make_hot`] for a step of `blocks` units (at most the split's segment): only
    /// `[watermark, watermark + blocks)` is fenced off from host I/O.
    pub fn make_hot_for(&self, blocks: u64, timeout: Duration) -> Result<(), KeyMapError> {
        let s = self.split()?;
        s.hot_blocks
            .store(blocks.clamp(1, s.segment_blocks), Ordering::SeqCst);
        s.hot.store(true, Ordering::SeqCst);
        self.grace_period(timeout)
    }

    /// Clears the hot flag without moving the watermark (pause, or a failed step).
    pub fn cool(&self) -> Result<(), KeyMapError> {
        self.split()?.hot.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// The hot segment is converted and the header records `watermark` durably: publish it and
    /// let host I/O back in.
    pub fn advance(&self, watermark: u64) -> Result<(), KeyMapError> {
        let s = self.split()?;
        s.watermark.store(watermark, Ordering::SeqCst);
        s.hot.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Parks all host I/O: a `Split` whose hot segment covers every data unit, then a grace
    /// period. Used before a keying change that does not agree with the old one anywhere (crypto
    /// erase); the caller then installs the new keying with [`KeyControl::set_keying`].
    pub fn quiesce_all(&self, key: DataKey, timeout: Duration) -> Result<(), KeyMapError> {
        let s = Arc::new(Split {
            below: None,
            above: Some(key),
            watermark: AtomicU64::new(0),
            segment_blocks: u64::MAX,
            hot_blocks: AtomicU64::new(u64::MAX),
            hot: AtomicBool::new(true),
        });
        self.set_keying(Keying::Split(s));
        self.grace_period(timeout)
    }

    /// Flips the epoch and waits until every live channel's counter of the old parity is 0.
    /// First waits for the parity about to become current to be empty: a previous grace period
    /// that timed out may have left I/O counted there, which the next flip would otherwise hide
    /// under the new epoch.
    fn grace_period(&self, timeout: Duration) -> Result<(), KeyMapError> {
        let _one = self.grace.lock().unwrap_or_else(|e| e.into_inner());
        let t0 = Instant::now();
        let cur = (self.epoch.load(Ordering::SeqCst) & 1) as usize;
        self.drain(1 - cur, t0, timeout)?;
        let old = (self.epoch.fetch_add(1, Ordering::SeqCst) & 1) as usize;
        fence(Ordering::SeqCst);
        self.drain(old, t0, timeout)
    }

    /// Waits until no live channel counts I/O under `parity`.
    fn drain(&self, parity: usize, t0: Instant, timeout: Duration) -> Result<(), KeyMapError> {
        let mut spins = 0u32;
        loop {
            let busy = {
                let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
                gates.retain(|g| g.strong_count() > 0);
                gates
                    .iter()
                    .filter_map(Weak::upgrade)
                    .any(|g| g.inflight[parity].load(Ordering::SeqCst) != 0)
            };
            if !busy {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                return Err(KeyMapError::GraceTimeout(timeout));
            }
            spins += 1;
            if spins > 100 {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// A new channel's gate (registered; dropped with the channel).
    pub(crate) fn register(self: &Arc<Self>) -> ChannelKeys {
        let gate = Arc::new(Gate::default());
        self.gates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&gate));
        let version = self.version.load(Ordering::SeqCst);
        ChannelKeys {
            keying: self.keying(),
            version,
            ctl: self.clone(),
            gate,
            counts: [0; 2],
        }
    }
}

/// A channel's side of the key map: its cached keying and its gate. Reactor thread only.
#[derive(Debug)]
pub(crate) struct ChannelKeys {
    pub(crate) keying: Keying,
    version: u64,
    ctl: Arc<KeyControl>,
    gate: Arc<Gate>,
    counts: [u64; 2],
}

/// What [`ChannelKeys::enter`] decided for an I/O.
pub(crate) enum Entry {
    /// Go on; the I/O holds this parity until [`ChannelKeys::leave`].
    Go(u8),
    /// The I/O overlaps the hot segment: refuse it as Busy (nothing is held).
    Hot,
}

impl ChannelKeys {
    /// Counts an I/O on `[lba, lba + blocks)` in, or refuses it if it overlaps the hot segment.
    /// Refreshes the cached keying first if the control side changed it.
    #[inline]
    pub(crate) fn enter(&mut self, lba: u64, blocks: u64) -> Entry {
        let p = (self.ctl.epoch.load(Ordering::SeqCst) & 1) as usize;
        self.counts[p] += 1;
        // SeqCst store: a full fence on x86 (xchg), ordering it before the loads below.
        self.gate.inflight[p].store(self.counts[p], Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.refresh();
        if let Keying::Split(s) = &self.keying {
            if let Some((h0, h1)) = s.hot_range() {
                if lba < h1 && lba.saturating_add(blocks) > h0 {
                    self.leave(p as u8);
                    return Entry::Hot;
                }
            }
        }
        Entry::Go(p as u8)
    }

    /// Takes the control side's keying if it changed. Called at every submit, and at every poll
    /// so an idle channel lets go of a replaced key (a finished deep rekey's or a crypto
    /// erase's old key is wiped once its last holder drops it).
    #[inline]
    pub(crate) fn refresh(&mut self) {
        let v = self.ctl.version.load(Ordering::SeqCst);
        if v != self.version {
            self.version = v;
            self.keying = self.ctl.keying();
        }
    }

    /// An I/O counted in with parity `p` is done.
    #[inline]
    pub(crate) fn leave(&mut self, p: u8) {
        let p = usize::from(p & 1);
        self.counts[p] = self.counts[p].saturating_sub(1);
        self.gate.inflight[p].store(self.counts[p], Ordering::Release);
    }
}

#[cfg(test)]
mod tests;
