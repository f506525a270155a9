//! The pass's data I/O through a reactor ([`ReactorDataIo`]): the I/O is submitted and completed
//! on a reactor, on that reactor's own channel of the bdev, like any host I/O; the control thread
//! running [`super::run`] only hands it requests and waits for the answers.
//!
//! On creation a [`DataPoller`] is installed on the chosen reactor (by a [`Msg`]); it opens its
//! channel of the bdev there, with the reactor's core, and owns it for its whole life. The
//! control side sends it I/Os through a bounded channel and gets each one back, completed, on a
//! reply channel of the same bound. A read or write of a segment is split into I/Os of at most
//! [`ReactorIoOptions::max_io_bytes`] and up to [`ReactorIoOptions::queue_depth`] of them are
//! in flight at once, so the pass is not bound by one I/O's latency.
//!
//! Sharing the reactor with host I/O: the poller submits at most
//! [`ReactorIoOptions::per_poll`] new I/Os per poll of the reactor, so every loop iteration the
//! host's pollers get their turn between two of the pass's I/Os (the pass "yields to host I/O each
//! poll"; a `rate_mib_s` limit on top is [`super::PassControl`]'s). A parked `Busy` I/O is
//! retried on the next poll, never in a loop. When it has nothing to do the poller reports no
//! work, so the reactor's busy/idle accounting stays right.
//!
//! Failure is an `io::Error`, never a hang or a panic: a reactor that is draining answers every
//! request not yet started with an error; a reactor that is gone drops the poller and with it
//! both channels, which the control side sees at once; an I/O that does not come back within
//! [`ReactorIoOptions::timeout`] fails the call, and the next call first waits for the late ones
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
    /// I/Os in flight at once (the channel's queue depth and both channels' bound).
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

/// The status a draining reactor's poller answers requests it will not start with.
const SHUTDOWN_ERRNO: i32 = libc::ESHUTDOWN;

/// How long the control side polls for a reply before it blocks.
const REPLY_SPIN: std::time::Duration = std::time::Duration::from_micros(50);

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

/// A request to the poller: an I/O, and for a conversion read, the conversion.
pub(crate) struct Request {
    io: BdevIo,
    convert: Option<Arc<ConvertJob>>,
}

/// Per data unit of a converted buffer: CRC-32C before, after.
type Sums = (Vec<u32>, Vec<u32>);

/// An answer: the completed I/O, and for a conversion read that succeeded, the checksums (the
/// buffer then holds the converted bytes).
pub(crate) struct Reply {
    io: BdevIo,
    sums: Option<Sums>,
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
        let (req_tx, req_rx) = bounded::<Request>(opts.queue_depth);
        let (rep_tx, rep_rx) = bounded::<Reply>(opts.queue_depth);
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
                        parked: None,
                        jobs: Vec::with_capacity(qd),
                        ready: std::collections::VecDeque::with_capacity(qd),
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

    /// Waits for answers to I/Os of an earlier call that timed out (they are dropped): nothing of
    /// an earlier call may still be in flight when a new one starts.
    fn settle(&mut self) -> io::Result<()> {
        while self.outstanding > 0 {
            let rep = self.recv()?;
            self.outstanding -= 1;
            if let Some(b) = rep.io.buf {
                self.pool.put(b);
            }
        }
        Ok(())
    }

    fn recv(&self) -> io::Result<Reply> {
        // A reactor answers within microseconds: poll briefly before sleeping on the channel, so
        // each I/O does not pay a futex sleep and wake-up (which made the pass several times
        // slower than the I/O itself).
        let spin_until = std::time::Instant::now() + REPLY_SPIN;
        while std::time::Instant::now() < spin_until {
            if let Ok(io) = self.replies.try_recv() {
                return Ok(io);
            }
            std::hint::spin_loop();
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

    /// Runs one read or write of `len` bytes at `lba` as I/Os of at most `max_io_bytes`, up to
    /// `queue_depth` in flight. `give(off, n, pool)` supplies the buffer of the I/O at byte `off`
    /// (`n` bytes; a write's filled); `take(off, buf, sums, pool)` takes it back once the I/O
    /// succeeded. A read with `convert` is converted on the reactor before it comes back.
    #[allow(clippy::too_many_arguments)]
    fn transfer(
        &mut self,
        io_type: IoType,
        lba: u64,
        len: usize,
        fua: bool,
        convert: Option<&Arc<ConvertJob>>,
        give: &mut dyn FnMut(usize, usize, &mut BufPool) -> io::Result<IoBuf>,
        take: &mut dyn FnMut(usize, IoBuf, Option<Sums>, &mut BufPool),
    ) -> io::Result<()> {
        self.blocks_of(len)?;
        self.settle()?;
        self.call = self.call.wrapping_add(1);
        let call = u64::from(self.call) << 32;
        let chunk = self.opts.max_io_bytes;
        let total = len.div_ceil(chunk);
        let mut next = 0usize;
        let mut answered = 0usize;
        let mut failure: Option<io::Error> = None;
        while answered < total {
            // Fill the window (never past the bound: the send cannot block).
            while failure.is_none() && next < total && self.outstanding < self.opts.queue_depth {
                let off = next * chunk;
                let n = chunk.min(len - off);
                let b = match give(off, n, &mut self.pool) {
                    Ok(b) => b,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                };
                let blocks = (n / self.block_size) as u32;
                let io = BdevIo::new(
                    io_type,
                    lba + (off / self.block_size) as u64,
                    blocks,
                    Some(b),
                    call | next as u64,
                )
                .with_fua(fua);
                let req = Request {
                    io,
                    convert: convert.cloned(),
                };
                match self.requests.try_send(req) {
                    Ok(()) => {
                        self.outstanding += 1;
                        next += 1;
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        return Err(self.err(io::ErrorKind::BrokenPipe, "the reactor has stopped"))
                    }
                    // Cannot happen (outstanding < bound); treated as the poller being stuck.
                    Err(TrySendError::Full(_)) => {
                        return Err(self.err(io::ErrorKind::Other, "request channel full"))
                    }
                }
            }
            if self.outstanding == 0 {
                break;
            }
            let Reply { io, sums } = self.recv()?;
            self.outstanding -= 1;
            answered += 1;
            let idx = (io.ctx & 0xffff_ffff) as usize;
            if io.ctx & !0xffff_ffff != call || idx >= total {
                return Err(self.err(io::ErrorKind::Other, "an answer to another request"));
            }
            let status = io.status;
            if let Some(b) = io.buf {
                if status == IoStatus::Success && (convert.is_none() || sums.is_some()) {
                    take(idx * chunk, b, sums, &mut self.pool);
                } else {
                    self.pool.put(b);
                }
            }
            if status != IoStatus::Success && failure.is_none() {
                failure = Some(self.status_error(status));
            }
        }
        match failure {
            Some(e) => {
                // Let the rest of the call come back first, so nothing of it is left in flight.
                self.settle()?;
                Err(e)
            }
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
        self.call = self.call.wrapping_add(1);
        let call = u64::from(self.call) << 32;
        match self.requests.try_send(Request {
            io: BdevIo::new(IoType::Flush, 0, 0, None, call),
            convert: None,
        }) {
            Ok(()) => self.outstanding += 1,
            Err(_) => return Err(self.err(io::ErrorKind::BrokenPipe, "the reactor has stopped")),
        }
        let io = self.recv()?.io;
        self.outstanding -= 1;
        if io.ctx != call {
            return Err(self.err(io::ErrorKind::Other, "an answer to another request"));
        }
        match io.status {
            IoStatus::Success => Ok(()),
            s => Err(self.status_error(s)),
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
        let mut slots: Vec<Option<(IoBuf, Sums)>> = (0..len.div_ceil(chunk)).map(|_| None).collect();
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
            return Err(self.err(io::ErrorKind::Other, "a converted read came back without its data"));
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
        let fits = seg.bufs.iter().enumerate().all(|(i, b)| {
            b.len() == chunk || i + 1 == seg.bufs.len()
        });
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
            return Err(self.err(io::ErrorKind::Other, "a segment write came back without its buffer"));
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

/// The reactor side: owns the channel, takes requests, answers each with its completed I/O.
pub(crate) struct DataPoller {
    name: String,
    ch: Box<dyn BdevChannel>,
    requests: Receiver<Request>,
    replies: Sender<Reply>,
    /// An I/O the channel refused as Busy, retried on the next poll.
    parked: Option<Request>,
    /// The conversion of each read in flight that has one, by the read's `ctx`.
    jobs: Vec<(u64, Arc<ConvertJob>)>,
    /// Reads that completed and wait for their conversion (one per poll).
    ready: std::collections::VecDeque<(BdevIo, Arc<ConvertJob>)>,
    per_poll: usize,
    draining: bool,
    closing: bool,
}

impl DataPoller {
    /// Answers `io` with a failure without starting (or converting) it.
    fn refuse(&self, mut io: BdevIo) {
        io.status = IoStatus::IoError(SHUTDOWN_ERRNO);
        let _ = self.replies.try_send(Reply { io, sums: None });
    }

    /// Converts one completed read's buffer in place and answers it with the checksums.
    fn convert(&self, mut io: BdevIo, job: &ConvertJob) {
        let sums = io.buf.as_mut().map(|b| {
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
        });
        let _ = self.replies.try_send(Reply { io, sums });
    }
}

impl Poller for DataPoller {
    fn name(&self) -> &str {
        &self.name
    }

    fn poll(&mut self) -> usize {
        let mut work = 0;
        let (replies, jobs, ready) = (&self.replies, &mut self.jobs, &mut self.ready);
        // The answer channel holds as many as may be in flight, so this never drops one; if the
        // control side is gone, the I/O (and its buffer) is simply dropped here. A read with a
        // conversion waits in `ready` for its turn.
        work += self.ch.poll(&mut |io| {
            if let Some(i) = jobs.iter().position(|(ctx, _)| *ctx == io.ctx) {
                let (_, job) = jobs.swap_remove(i);
                if io.status == IoStatus::Success {
                    ready.push_back((io, job));
                    return;
                }
            }
            let _ = replies.try_send(Reply { io, sums: None });
        });
        if self.closing {
            self.parked = None;
            self.ready.clear();
            while self.requests.try_recv().is_ok() {}
            return work;
        }
        if self.draining {
            if let Some(req) = self.parked.take() {
                self.refuse(req.io);
                work += 1;
            }
            while let Some((io, _)) = self.ready.pop_front() {
                self.refuse(io);
                work += 1;
            }
            while let Ok(req) = self.requests.try_recv() {
                self.refuse(req.io);
                work += 1;
            }
            return work;
        }
        // Conversions: one buffer per poll each (as much CPU as encrypting one large host I/O),
        // so host I/O on this reactor gets its turn between them.
        for _ in 0..self.per_poll {
            let Some((io, job)) = self.ready.pop_front() else {
                break;
            };
            self.convert(io, &job);
            work += 1;
        }
        for _ in 0..self.per_poll {
            let req = match self.parked.take() {
                Some(req) => req,
                None => match self.requests.try_recv() {
                    Ok(req) => req,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.closing = true;
                        break;
                    }
                },
            };
            let Request { io, convert } = req;
            let ctx = io.ctx;
            if let Some(job) = &convert {
                self.jobs.push((ctx, job.clone()));
            }
            match self.ch.submit(io) {
                Submit::Queued => work += 1,
                Submit::Busy(io) => {
                    if convert.is_some() {
                        self.jobs.retain(|(c, _)| *c != ctx);
                    }
                    self.parked = Some(Request { io, convert });
                    break;
                }
            }
        }
        work
    }

    fn in_flight(&self) -> usize {
        self.ch.in_flight() + self.ready.len()
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
