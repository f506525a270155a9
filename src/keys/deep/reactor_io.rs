//! The pass's data I/O through a reactor ([`ReactorDataIo`]): the I/O is submitted and completed
//! on a reactor, on that reactor's own channel of the bdev, like any host I/O; the control thread
//! running [`super::run`] only hands it requests and waits for the answers.
//!
//! On creation a [`DataPoller`] is installed on the chosen reactor (by a [`Msg`]); it opens its
//! channel of the bdev there, with the reactor's core, and owns it for its whole life. The
//! control side hands it one *phase* at a time (a step's read, its write, a Flush) as one
//! [`Request`] holding all of the phase's I/Os (each of at most
//! [`ReactorIoOptions::max_io_bytes`]); the poller keeps up to
//! [`ReactorIoOptions::queue_depth`] of them in flight, and answers the whole phase in one
//! [`Reply`] when the last is back: one message each way per phase, not per I/O. The control
//! thread waits for it spinning (then asleep, past [`REPLY_SPIN`]).
//!
//! A conversion step's read carries the conversion ([`ConvertJob`]): as each I/O completes, the
//! poller converts its buffer in place ([`convert::convert_units`]: checksum, decrypt with the
//! old key, encrypt with the new one, checksum) on the reactor, as the crypto bdev does a host
//! I/O's data, and the buffers themselves go back to the control side and then, as the step's
//! write, to the device (no copies).
//!
//! Sharing the reactor with host I/O: the poller submits at most
//! [`ReactorIoOptions::per_poll`] new I/Os and converts at most as many buffers per poll of the
//! reactor, so every loop iteration the host's pollers get their turn between two of the pass's
//! I/Os (the pass "yields to host I/O each poll"; a `rate_mib_s` limit on top is
//! [`super::PassControl`]'s). A `Busy` I/O is retried on the next poll, never in a loop. When it
//! has nothing to do the poller reports no work, so the reactor's busy/idle accounting stays
//! right.
//!
//! Failure is an `io::Error`, never a hang or a panic: a reactor that is draining answers every
//! I/O not yet started (or converted) as failed; a reactor that is gone drops the poller and with
//! it both channels, which the control side sees at once; a phase that does not come back within
//! [`ReactorIoOptions::timeout`] fails the call, and the next call first waits for the late one
//! (so a late write can never land after a later one, e.g. recovery's write-back) or fails too.
//!
//! Dropping a [`ReactorDataIo`] closes its request channel and tells the poller (by a message) to
//! go: it finishes what it has in flight and is removed, with its channel. It holds no reference
//! to the bdev itself (only the channel does, as long as the backend needs it).

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};

use super::convert::{self, Converted, Keys};
use crate::bdev::{Bdev, BdevChannel, BdevIo, IoBuf, IoStatus, IoType, Submit};
use crate::reactor::{Mailboxes, Msg, Poller, PollerId, Reactor, ReactorError};
use crate::sys::buf::AlignedBuf;

/// Tunables of a [`ReactorDataIo`].
#[derive(Clone, Debug)]
pub struct ReactorIoOptions {
    /// Largest single I/O (rounded down to whole blocks; at least one block). The `Bdev` trait
    /// has no transfer limit of its own: this is the split that gives the pass its queue depth.
    pub max_io_bytes: usize,
    /// I/Os in flight at once (the channel's queue depth).
    pub queue_depth: usize,
    /// New I/Os the poller submits per poll of its reactor (≥ 1).
    pub per_poll: usize,
    /// How long one I/O (and the poller's installation) may take before the call fails.
    pub timeout: Duration,
}

impl Default for ReactorIoOptions {
    fn default() -> Self {
        ReactorIoOptions {
            max_io_bytes: 128 * 1024,
            queue_depth: 16,
            per_poll: 1,
            timeout: super::DATA_IO_TIMEOUT,
        }
    }
}

/// Most buffers one converted segment may hold (a step of [`super::MAX_STEP_BYTES`] in I/Os of
/// the default 128 KiB is 16); a larger step is converted on the calling thread instead.
const MAX_SEGMENT_BUFS: usize = 64;

/// How long the control thread spins for a phase's answer before it sleeps (a 2 MiB phase takes
/// about 0.5 ms).
const REPLY_SPIN: Duration = Duration::from_millis(5);

/// The status a draining reactor's poller answers requests it will not start with.
const SHUTDOWN_ERRNO: i32 = libc::ESHUTDOWN;

/// Data-area I/O of the pass through a poller on one reactor (module docs). Implements
/// [`super::DataIo`]; "durable" = the writes with FUA, then a Flush if the bdev has one.
pub struct ReactorDataIo {
    name: String,
    block_size: usize,
    flush: bool,
    opts: ReactorIoOptions,
    mailboxes: Mailboxes,
    reactor: usize,
    poller: PollerId,
    requests: Sender<Request>,
    replies: Receiver<Reply>,
    /// I/Os sent and not answered yet (only after a timeout between calls).
    outstanding: usize,
    /// Numbers the calls, so an answer is matched to the call that asked.
    call: u32,
    pool: BufPool,
}

/// Buffers of `max_io_bytes`, reused from call to call (and from step to step: a converted
/// segment's buffers come back with [`super::DataIo::recycle`]).
struct BufPool {
    /// Names the pass's I/O in errors.
    what: String,
    free: Vec<IoBuf>,
    size: usize,
    align: usize,
    keep: usize,
}

impl BufPool {
    fn take(&mut self, len: usize) -> io::Result<IoBuf> {
        if let Some(mut b) = self.free.pop() {
            b.set_len(len);
            return Ok(b);
        }
        let mem = AlignedBuf::zeroed(self.size, self.align).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("{}: no memory for a buffer", self.what),
            )
        })?;
        Ok(IoBuf::new(mem, len))
    }

    fn put(&mut self, b: IoBuf) {
        if b.capacity() == self.size && self.free.len() < self.keep {
            self.free.push(b);
        }
    }
}

/// What a read of a conversion step asks of the reactor once the data is in: convert the
/// buffer's data units with these keys ([`convert::convert_units`]) and note their checksums.
pub(crate) struct ConvertJob {
    keys: Keys,
    unit: usize,
}

/// A request to the poller: the I/Os of one phase of the pass (a read or write of up to a step,
/// in I/Os of `max_io_bytes`; or one Flush), submitted by the poller with up to `queue_depth` in
/// flight, converted after reading if `convert` is set, and answered together in one [`Reply`]:
/// the control thread wakes once per phase, not once per I/O.
pub(crate) struct Request {
    tag: u64,
    ios: Vec<BdevIo>,
    convert: Option<Arc<ConvertJob>>,
}

/// Per data unit of a converted buffer: CRC-32C before, after.
type Sums = (Vec<u32>, Vec<u32>);

/// Takes back a phase's buffer: (its byte offset in the phase, the buffer, a converted read's
/// checksums, the pool).
type TakeBuf<'a> = dyn FnMut(usize, IoBuf, Option<Sums>, &mut BufPool) + 'a;

/// The answer to a [`Request`]: each of its I/Os, completed (or refused), with the checksums of
/// a converted read that succeeded (its buffer then holds the converted bytes).
pub(crate) struct Reply {
    tag: u64,
    done: Vec<(BdevIo, Option<Sums>)>,
}

impl ReactorDataIo {
    /// Installs a poller on reactor `reactor` of `mailboxes` that does `bdev`'s I/O for the pass,
    /// with the default options. Blocks (control threads only) until the poller runs.
    pub fn new(mailboxes: Mailboxes, reactor: usize, bdev: Arc<dyn Bdev>) -> io::Result<Self> {
        Self::with_options(mailboxes, reactor, bdev, ReactorIoOptions::default())
    }

    /// As [`ReactorDataIo::new`] with explicit options.
    pub fn with_options(
        mailboxes: Mailboxes,
        reactor: usize,
        bdev: Arc<dyn Bdev>,
        opts: ReactorIoOptions,
    ) -> io::Result<Self> {
        let name = bdev.name().to_string();
        let block_size = bdev.block_size() as usize;
        if block_size == 0 || opts.queue_depth == 0 || opts.per_poll == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "bdev {name}: pass I/O needs a block size, a queue depth and a per-poll count above 0"
                ),
            ));
        }
        let mut opts = opts;
        opts.max_io_bytes = (opts.max_io_bytes / block_size).max(1) * block_size;
        // One phase at a time is outstanding (a late one is waited for before the next); room
        // for two keeps a send from ever finding the channel full.
        let (req_tx, req_rx) = bounded::<Request>(2);
        let (rep_tx, rep_rx) = bounded::<Reply>(2);
        let (ready_tx, ready_rx) = bounded::<Result<PollerId, String>>(1);
        let flush = bdev.io_type_supported(IoType::Flush);
        let align = bdev.buf_align().max(64);
        let (qd, per_poll, poller_name) = (
            opts.queue_depth,
            opts.per_poll,
            format!("deep-rekey-io {name}"),
        );
        let install: Msg = Box::new(move |r: &mut Reactor| {
            let res = if r.is_draining() {
                Err("the reactor is shutting down".to_string())
            } else {
                match bdev.open_channel(r.core(), qd) {
                    Ok(ch) => Ok(r.add_poller(Box::new(DataPoller {
                        name: poller_name,
                        ch,
                        requests: req_rx,
                        replies: rep_tx,
                        active: None,
                        queue_depth: qd,
                        per_poll,
                        draining: false,
                        closing: false,
                    }))),
                    Err(e) => Err(e.to_string()),
                }
            };
            // The bdev reference ends here: the channel holds what the backend needs.
            drop(bdev);
            let _ = ready_tx.send(res);
        });
        send_msg(&mailboxes, reactor, install, opts.timeout)
            .map_err(|e| io::Error::other(format!("bdev {name}: pass I/O poller: {e}")))?;
        let poller = match ready_rx.recv_timeout(opts.timeout) {
            Ok(Ok(id)) => id,
            Ok(Err(why)) => {
                return Err(io::Error::other(format!(
                    "bdev {name}: pass I/O poller on reactor {reactor}: {why}"
                )))
            }
            // If the message still runs later, the poller finds its request channel closed and
            // removes itself.
            Err(RecvTimeoutError::Timeout) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "bdev {name}: reactor {reactor} did not install the pass I/O poller within {:?}",
                        opts.timeout
                    ),
                ))
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(io::Error::other(format!(
                    "bdev {name}: reactor {reactor} stopped before installing the pass I/O poller"
                )))
            }
        };
        let (max_io_bytes, queue_depth) = (opts.max_io_bytes, opts.queue_depth);
        Ok(ReactorDataIo {
            name: name.clone(),
            block_size,
            flush,
            opts,
            mailboxes,
            reactor,
            poller,
            requests: req_tx,
            replies: rep_rx,
            outstanding: 0,
            call: 0,
            pool: BufPool {
                what: format!("bdev {name} (reactor {reactor}): data I/O of the pass"),
                free: Vec::new(),
                size: max_io_bytes,
                align,
                keep: queue_depth + MAX_SEGMENT_BUFS,
            },
        })
    }

    /// The reactor the I/O runs on.
    pub fn reactor(&self) -> usize {
        self.reactor
    }

    fn err(&self, kind: io::ErrorKind, what: impl std::fmt::Display) -> io::Error {
        io::Error::new(
            kind,
            format!(
                "bdev {} (reactor {}): data I/O of the pass: {what}",
                self.name, self.reactor
            ),
        )
    }

    fn blocks_of(&self, len: usize) -> io::Result<u64> {
        if !len.is_multiple_of(self.block_size) {
            return Err(self.err(io::ErrorKind::InvalidInput, "not whole blocks"));
        }
        Ok((len / self.block_size) as u64)
    }

    /// Waits for the answer to an earlier call that timed out (its I/Os are dropped): nothing of
    /// an earlier call may still be in flight when a new one starts.
    fn settle(&mut self) -> io::Result<()> {
        while self.outstanding > 0 {
            let rep = self.recv()?;
            self.outstanding -= 1;
            for (io, _) in rep.done {
                if let Some(b) = io.buf {
                    self.pool.put(b);
                }
            }
        }
        Ok(())
    }

    fn recv(&self) -> io::Result<Reply> {
        // Wait hot first: a sleeping control thread must be woken for each phase, and on a
        // machine whose CPUs are all busy polling (a co-located load generator) the wake-up
        // waits for a time slice: measured, a 500 MiB/s pass under a QD32 host then fell to
        // ~170 MiB/s; spinning, it held 500.
        let until = Instant::now() + REPLY_SPIN;
        while Instant::now() < until {
            match self.replies.try_recv() {
                Ok(r) => return Ok(r),
                Err(TryRecvError::Empty) => std::hint::spin_loop(),
                Err(TryRecvError::Disconnected) => break,
            }
        }
        self.replies
            .recv_timeout(self.opts.timeout)
            .map_err(|e| match e {
                RecvTimeoutError::Timeout => self.err(
                    io::ErrorKind::TimedOut,
                    format_args!("an I/O did not complete within {:?}", self.opts.timeout),
                ),
                RecvTimeoutError::Disconnected => {
                    self.err(io::ErrorKind::BrokenPipe, "the reactor has stopped")
                }
            })
    }

    /// Sends the phase `ios` (and its conversion) and waits for its answer.
    fn exchange(
        &mut self,
        ios: Vec<BdevIo>,
        convert: Option<Arc<ConvertJob>>,
    ) -> io::Result<Vec<(BdevIo, Option<Sums>)>> {
        self.call = self.call.wrapping_add(1);
        let tag = u64::from(self.call);
        match self.requests.try_send(Request { tag, ios, convert }) {
            Ok(()) => self.outstanding += 1,
            Err(TrySendError::Disconnected(r) | TrySendError::Full(r)) => {
                for io in r.ios {
                    if let Some(b) = io.buf {
                        self.pool.put(b);
                    }
                }
                return Err(self.err(io::ErrorKind::BrokenPipe, "the reactor has stopped"));
            }
        }
        let rep = self.recv()?;
        self.outstanding -= 1;
        if rep.tag != tag {
            for (io, _) in rep.done {
                if let Some(b) = io.buf {
                    self.pool.put(b);
                }
            }
            return Err(self.err(io::ErrorKind::Other, "an answer to another request"));
        }
        Ok(rep.done)
    }

    /// Runs one read or write of `len` bytes at `lba` as one phase (I/Os of at most
    /// `max_io_bytes`, the poller keeping up to `queue_depth` in flight). `give(off, n, pool)`
    /// supplies the buffer of the I/O at byte `off` (`n` bytes; a write's filled); `take(off,
    /// buf, sums, pool)` takes it back once the I/O succeeded. A read with `convert` is converted
    /// on the reactor before it comes back.
    #[allow(clippy::too_many_arguments)]
    fn transfer(
        &mut self,
        io_type: IoType,
        lba: u64,
        len: usize,
        fua: bool,
        convert: Option<&Arc<ConvertJob>>,
        give: &mut dyn FnMut(usize, usize, &mut BufPool) -> io::Result<IoBuf>,
        take: &mut TakeBuf<'_>,
    ) -> io::Result<()> {
        self.blocks_of(len)?;
        self.settle()?;
        let chunk = self.opts.max_io_bytes;
        let total = len.div_ceil(chunk);
        let mut ios = Vec::with_capacity(total);
        for idx in 0..total {
            let off = idx * chunk;
            let n = chunk.min(len - off);
            let b = match give(off, n, &mut self.pool) {
                Ok(b) => b,
                Err(e) => {
                    for io in ios {
                        let io: BdevIo = io;
                        if let Some(b) = io.buf {
                            take(io.ctx as usize * chunk, b, None, &mut self.pool);
                        }
                    }
                    return Err(e);
                }
            };
            let blocks = (n / self.block_size) as u32;
            ios.push(
                BdevIo::new(
                    io_type,
                    lba + (off / self.block_size) as u64,
                    blocks,
                    Some(b),
                    idx as u64,
                )
                .with_fua(fua),
            );
        }
        let done = self.exchange(ios, convert.cloned())?;
        let mut failure: Option<io::Error> = None;
        let mut seen = 0usize;
        for (io, sums) in done {
            let idx = io.ctx as usize;
            if idx >= total {
                failure.get_or_insert_with(|| {
                    self.err(io::ErrorKind::Other, "an answer to another request")
                });
                continue;
            }
            seen += 1;
            let status = io.status;
            if let Some(b) = io.buf {
                if status == IoStatus::Success && (convert.is_none() || sums.is_some()) {
                    take(idx * chunk, b, sums, &mut self.pool);
                } else {
                    // A failed I/O's buffer: the caller's `take` gets it back unchanged (a
                    // segment write keeps its bytes), with no checksums.
                    take(idx * chunk, b, None, &mut self.pool);
                }
            }
            if status != IoStatus::Success && failure.is_none() {
                failure = Some(self.status_error(status));
            }
        }
        if seen != total && failure.is_none() {
            failure = Some(self.err(io::ErrorKind::Other, "an answer is missing I/Os"));
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn status_error(&self, status: IoStatus) -> io::Error {
        match status {
            IoStatus::IoError(SHUTDOWN_ERRNO) => {
                self.err(io::ErrorKind::BrokenPipe, "the reactor is shutting down")
            }
            IoStatus::IoError(errno) => {
                let e = io::Error::from_raw_os_error(errno);
                self.err(e.kind(), e)
            }
            other => self.err(io::ErrorKind::Other, format_args!("failed: {other:?}")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.settle()?;
        let done = self.exchange(vec![BdevIo::new(IoType::Flush, 0, 0, None, 0)], None)?;
        match done.as_slice() {
            [(io, _)] => match io.status {
                IoStatus::Success => Ok(()),
                s => Err(self.status_error(s)),
            },
            _ => Err(self.err(io::ErrorKind::Other, "a flush answered with other I/Os")),
        }
    }
}

impl super::DataIo for ReactorDataIo {
    fn read_blocks(&mut self, lba: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len();
        self.transfer(
            IoType::Read,
            lba,
            len,
            false,
            None,
            &mut |_, n, pool| pool.take(n),
            &mut |off, b, _, pool| {
                buf[off..off + b.len()].copy_from_slice(b.as_slice());
                pool.put(b);
            },
        )
    }
    fn write_blocks_durable(&mut self, lba: u64, buf: &[u8]) -> io::Result<()> {
        self.transfer(
            IoType::Write,
            lba,
            buf.len(),
            true,
            None,
            &mut |off, n, pool| {
                let mut b = pool.take(n)?;
                b.as_mut_slice().copy_from_slice(&buf[off..off + n]);
                Ok(b)
            },
            &mut |_, b, _, pool| pool.put(b),
        )?;
        if self.flush {
            self.flush()?;
        }
        Ok(())
    }

    /// Reads the step's units in I/Os of `max_io_bytes`, each converted on the reactor when it
    /// completes (one per poll, like a host I/O's encryption), and keeps their buffers.
    fn read_converted(
        &mut self,
        lba: u64,
        units: u32,
        unit: usize,
        keys: &Keys,
    ) -> io::Result<Converted> {
        let len = units as usize * unit;
        if unit != self.block_size || len.div_ceil(self.opts.max_io_bytes) > MAX_SEGMENT_BUFS {
            // Not this path's shape (a data unit is a block of the bdev; a step fits the
            // pool): convert here.
            return convert::read_converted_here(self, lba, units, unit, keys);
        }
        let job = Arc::new(ConvertJob {
            keys: keys.clone(),
            unit,
        });
        let chunk = self.opts.max_io_bytes;
        let mut slots: Vec<Option<(IoBuf, Sums)>> =
            (0..len.div_ceil(chunk)).map(|_| None).collect();
        let res = self.transfer(
            IoType::Read,
            lba,
            len,
            false,
            Some(&job),
            &mut |_, n, pool| pool.take(n),
            &mut |off, b, sums, _| {
                if let Some(s) = sums {
                    slots[off / chunk] = Some((b, s));
                }
            },
        );
        let mut seg = Converted {
            bufs: Vec::with_capacity(slots.len()),
            before: Vec::with_capacity(units as usize),
            after: Vec::with_capacity(units as usize),
        };
        let mut missing = false;
        for slot in slots {
            match slot {
                Some((b, (before, after))) => {
                    seg.bufs.push(b);
                    seg.before.extend(before);
                    seg.after.extend(after);
                }
                None => missing = true,
            }
        }
        if let Err(e) = res {
            self.recycle(seg);
            return Err(e);
        }
        if missing {
            self.recycle(seg);
            return Err(self.err(
                io::ErrorKind::Other,
                "a converted read came back without its data",
            ));
        }
        Ok(seg)
    }

    /// Writes the segment's own buffers back (FUA, then a Flush if the bdev has one).
    fn write_converted_durable(
        &mut self,
        lba: u64,
        seg: &mut Converted,
        len: usize,
        unit: usize,
    ) -> io::Result<()> {
        let chunk = self.opts.max_io_bytes;
        let fits = seg
            .bufs
            .iter()
            .enumerate()
            .all(|(i, b)| b.len() == chunk || i + 1 == seg.bufs.len());
        if unit != self.block_size || !fits || len > seg.len() {
            return convert::write_converted_here(self, lba, seg, len, unit);
        }
        let lens: Vec<usize> = seg.bufs.iter().map(IoBuf::len).collect();
        let mut slots: Vec<Option<IoBuf>> = seg.bufs.drain(..).map(Some).collect();
        let res = {
            let slots_cell = std::cell::RefCell::new(&mut slots);
            self.transfer(
                IoType::Write,
                lba,
                len,
                true,
                None,
                &mut |off, n, _| {
                    let mut b = slots_cell.borrow_mut()[off / chunk]
                        .take()
                        .ok_or_else(|| io::Error::other("segment buffer already in flight"))?;
                    b.set_len(n);
                    Ok(b)
                },
                &mut |off, mut b, _, _| {
                    b.set_len(lens[off / chunk]);
                    slots_cell.borrow_mut()[off / chunk] = Some(b);
                },
            )
        };
        // A buffer that did not come back (a failed write) leaves the segment short: the step
        // fails and recovery rereads the device.
        let complete = slots.iter().all(Option::is_some);
        seg.bufs.extend(slots.into_iter().flatten());
        res?;
        if !complete {
            return Err(self.err(
                io::ErrorKind::Other,
                "a segment write came back without its buffer",
            ));
        }
        if self.flush {
            self.flush()?;
        }
        Ok(())
    }

    fn recycle(&mut self, seg: Converted) {
        for b in seg.bufs {
            self.pool.put(b);
        }
    }
}

impl Drop for ReactorDataIo {
    fn drop(&mut self) {
        // The request channel closes with `self.requests`; the poller would notice it on its
        // next poll anyway. The message makes the removal explicit.
        let id = self.poller;
        let msg: Msg = Box::new(move |r: &mut Reactor| {
            if let Some(p) = r.poller_as::<DataPoller>(id) {
                p.closing = true;
            }
        });
        if let Err(e) = self.mailboxes.send(self.reactor, msg) {
            tracing::debug!(reactor = self.reactor, error = %e,
                "pass I/O poller: close message not delivered; it closes on its own");
        }
    }
}

/// Sends `msg` to reactor `index`, waiting out a full mailbox for up to `timeout`.
fn send_msg(
    mailboxes: &Mailboxes,
    index: usize,
    msg: Msg,
    timeout: Duration,
) -> Result<(), ReactorError> {
    let deadline = Instant::now() + timeout;
    // A full mailbox hands the message back only as an error: keep it in a slot to retry.
    let slot = Arc::new(std::sync::Mutex::new(Some(msg)));
    loop {
        let s = slot.clone();
        let attempt: Msg = Box::new(move |r: &mut Reactor| {
            let m = s.lock().ok().and_then(|mut g| g.take());
            if let Some(m) = m {
                m(r);
            }
        });
        match mailboxes.send(index, attempt) {
            Err(ReactorError::MailboxFull(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            other => return other,
        }
    }
}

/// The phase a poller is working through.
pub(crate) struct Active {
    tag: u64,
    /// I/Os not submitted yet (a Busy one goes back to the front).
    pending: std::collections::VecDeque<BdevIo>,
    /// Submitted and not completed.
    in_flight: usize,
    /// Reads that completed and wait for their conversion (one per poll).
    ready: std::collections::VecDeque<BdevIo>,
    convert: Option<Arc<ConvertJob>>,
    done: Vec<(BdevIo, Option<Sums>)>,
}

impl Active {
    fn finished(&self) -> bool {
        self.pending.is_empty() && self.in_flight == 0 && self.ready.is_empty()
    }
}

/// The reactor side: owns the channel, takes one phase at a time, answers it when all of its
/// I/Os are back (and converted).
pub(crate) struct DataPoller {
    name: String,
    ch: Box<dyn BdevChannel>,
    requests: Receiver<Request>,
    replies: Sender<Reply>,
    active: Option<Active>,
    queue_depth: usize,
    per_poll: usize,
    draining: bool,
    closing: bool,
}

/// Converts one completed read's buffer in place; returns its checksums.
fn convert_io(io: &mut BdevIo, job: &ConvertJob) -> Option<Sums> {
    io.buf.as_mut().map(|b| {
        let (mut before, mut after) = (Vec::new(), Vec::new());
        convert::convert_units(
            b.as_mut_slice(),
            job.unit,
            io.offset_blocks,
            &job.keys,
            &mut before,
            &mut after,
        );
        (before, after)
    })
}

impl DataPoller {
    /// Marks `io` failed without starting (or converting) it.
    fn refused(mut io: BdevIo) -> (BdevIo, Option<Sums>) {
        io.status = IoStatus::IoError(SHUTDOWN_ERRNO);
        (io, None)
    }
}

impl Poller for DataPoller {
    fn name(&self) -> &str {
        &self.name
    }

    fn poll(&mut self) -> usize {
        let mut work = 0;
        if let Some(a) = self.active.as_mut() {
            // A completed read that has a conversion waits in `ready` for its turn.
            work += self.ch.poll(&mut |io| {
                a.in_flight = a.in_flight.saturating_sub(1);
                if a.convert.is_some() && io.status == IoStatus::Success {
                    a.ready.push_back(io);
                } else {
                    a.done.push((io, None));
                }
            });
        } else {
            // Nothing of ours can be in flight without a phase; a backend may still report.
            work += self.ch.poll(&mut |_| {});
        }
        if self.closing {
            // The control side is gone: what comes back is dropped with its buffer.
            if let Some(a) = self.active.as_mut() {
                a.pending.clear();
                a.ready.clear();
                a.done.clear();
            }
            while self.requests.try_recv().is_ok() {}
            return work;
        }
        if self.active.is_none() {
            match self.requests.try_recv() {
                Ok(r) => {
                    self.active = Some(Active {
                        tag: r.tag,
                        pending: r.ios.into(),
                        in_flight: 0,
                        ready: Default::default(),
                        convert: r.convert,
                        done: Vec::new(),
                    });
                }
                Err(TryRecvError::Empty) => return work,
                Err(TryRecvError::Disconnected) => {
                    self.closing = true;
                    return work;
                }
            }
        }
        let Some(a) = self.active.as_mut() else {
            return work;
        };
        if self.draining {
            // Nothing new starts; what is in flight is waited for.
            while let Some(io) = a.pending.pop_front() {
                a.done.push(Self::refused(io));
                work += 1;
            }
            while let Some(io) = a.ready.pop_front() {
                a.done.push(Self::refused(io));
                work += 1;
            }
        } else {
            // Conversions: one buffer per poll each (as much CPU as encrypting one large host
            // I/O), so host I/O on this reactor gets its turn between them.
            for _ in 0..self.per_poll {
                let Some(mut io) = a.ready.pop_front() else {
                    break;
                };
                let sums = a.convert.as_deref().and_then(|j| convert_io(&mut io, j));
                a.done.push((io, sums));
                work += 1;
            }
            for _ in 0..self.per_poll {
                if a.in_flight >= self.queue_depth {
                    break;
                }
                let Some(io) = a.pending.pop_front() else {
                    break;
                };
                match self.ch.submit(io) {
                    Submit::Queued => {
                        a.in_flight += 1;
                        work += 1;
                    }
                    Submit::Busy(io) => {
                        a.pending.push_front(io);
                        break;
                    }
                }
            }
        }
        if a.finished() {
            if let Some(a) = self.active.take() {
                // The answer channel has room (one phase at a time); if the control side is
                // gone, the I/Os and their buffers are dropped here.
                let _ = self.replies.try_send(Reply {
                    tag: a.tag,
                    done: a.done,
                });
                work += 1;
            }
        }
        work
    }

    fn in_flight(&self) -> usize {
        self.active
            .as_ref()
            .map_or(0, |a| a.in_flight + a.ready.len())
    }

    fn drain(&mut self) {
        self.draining = true;
    }

    fn is_done(&self) -> bool {
        self.closing && self.ch.in_flight() == 0
    }

    fn as_any_mut(&mut self) -> Option<&mut (dyn std::any::Any + 'static)> {
        Some(self)
    }
}

#[cfg(test)]
mod tests;
