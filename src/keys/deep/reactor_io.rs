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
    align: usize,
    opts: ReactorIoOptions,
    mailboxes: Mailboxes,
    reactor: usize,
    poller: PollerId,
    requests: Sender<BdevIo>,
    replies: Receiver<BdevIo>,
    /// I/Os sent and not answered yet (only after a timeout between calls).
    outstanding: usize,
    /// Numbers the calls, so an answer is matched to the call that asked.
    call: u32,
    /// Buffers of `max_io_bytes`, reused from call to call.
    free: Vec<IoBuf>,
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
        let (req_tx, req_rx) = bounded::<BdevIo>(opts.queue_depth);
        let (rep_tx, rep_rx) = bounded::<BdevIo>(opts.queue_depth);
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
        Ok(ReactorDataIo {
            name,
            block_size,
            flush,
            align,
            opts,
            mailboxes,
            reactor,
            poller,
            requests: req_tx,
            replies: rep_rx,
            outstanding: 0,
            call: 0,
            free: Vec::new(),
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

    fn take_buf(&mut self, len: usize) -> io::Result<IoBuf> {
        if let Some(mut b) = self.free.pop() {
            b.set_len(len);
            return Ok(b);
        }
        let mem = AlignedBuf::zeroed(self.opts.max_io_bytes, self.align)
            .ok_or_else(|| self.err(io::ErrorKind::OutOfMemory, "no memory for a buffer"))?;
        Ok(IoBuf::new(mem, len))
    }

    fn put_buf(&mut self, b: IoBuf) {
        if b.capacity() == self.opts.max_io_bytes && self.free.len() < self.opts.queue_depth {
            self.free.push(b);
        }
    }

    /// Waits for answers to I/Os of an earlier call that timed out (they are dropped): nothing of
    /// an earlier call may still be in flight when a new one starts.
    fn settle(&mut self) -> io::Result<()> {
        while self.outstanding > 0 {
            let io = self.recv()?;
            self.outstanding -= 1;
            if let Some(b) = io.buf {
                self.put_buf(b);
            }
        }
        Ok(())
    }

    fn recv(&self) -> io::Result<BdevIo> {
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
    /// `queue_depth` in flight. `fill(off, buf)` fills a write's buffer from the caller's bytes at
    /// `off`; `done(off, buf)` takes a read's data.
    fn transfer(
        &mut self,
        io_type: IoType,
        lba: u64,
        len: usize,
        fua: bool,
        fill: &mut dyn FnMut(usize, &mut [u8]),
        done: &mut dyn FnMut(usize, &[u8]),
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
                let mut b = self.take_buf(n)?;
                if io_type == IoType::Write {
                    fill(off, b.as_mut_slice());
                }
                let blocks = (n / self.block_size) as u32;
                let io = BdevIo::new(
                    io_type,
                    lba + (off / self.block_size) as u64,
                    blocks,
                    Some(b),
                    call | next as u64,
                )
                .with_fua(fua);
                match self.requests.try_send(io) {
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
            let io = self.recv()?;
            self.outstanding -= 1;
            answered += 1;
            let idx = (io.ctx & 0xffff_ffff) as usize;
            if io.ctx & !0xffff_ffff != call || idx >= total {
                return Err(self.err(io::ErrorKind::Other, "an answer to another request"));
            }
            let status = io.status;
            if let Some(b) = io.buf {
                if status == IoStatus::Success && io_type == IoType::Read {
                    done(idx * chunk, b.as_slice());
                }
                self.put_buf(b);
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
        match self
            .requests
            .try_send(BdevIo::new(IoType::Flush, 0, 0, None, call))
        {
            Ok(()) => self.outstanding += 1,
            Err(_) => return Err(self.err(io::ErrorKind::BrokenPipe, "the reactor has stopped")),
        }
        let io = self.recv()?;
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
            &mut |_, _| {},
            &mut |off, data| buf[off..off + data.len()].copy_from_slice(data),
        )
    }
    fn write_blocks_durable(&mut self, lba: u64, buf: &[u8]) -> io::Result<()> {
        self.transfer(
            IoType::Write,
            lba,
            buf.len(),
            true,
            &mut |off, dst| dst.copy_from_slice(&buf[off..off + dst.len()]),
            &mut |_, _| {},
        )?;
        if self.flush {
            self.flush()?;
        }
        Ok(())
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
    requests: Receiver<BdevIo>,
    replies: Sender<BdevIo>,
    /// An I/O the channel refused as Busy, retried on the next poll.
    parked: Option<BdevIo>,
    per_poll: usize,
    draining: bool,
    closing: bool,
}

impl DataPoller {
    /// Answers `io` with a failure without starting it.
    fn refuse(&self, mut io: BdevIo) {
        io.status = IoStatus::IoError(SHUTDOWN_ERRNO);
        let _ = self.replies.try_send(io);
    }
}

impl Poller for DataPoller {
    fn name(&self) -> &str {
        &self.name
    }

    fn poll(&mut self) -> usize {
        let mut work = 0;
        let replies = &self.replies;
        // The answer channel holds as many as may be in flight, so this never drops one; if the
        // control side is gone, the I/O (and its buffer) is simply dropped here.
        work += self.ch.poll(&mut |io| {
            let _ = replies.try_send(io);
        });
        if self.closing {
            self.parked = None;
            while self.requests.try_recv().is_ok() {}
            return work;
        }
        if self.draining {
            if let Some(io) = self.parked.take() {
                self.refuse(io);
                work += 1;
            }
            while let Ok(io) = self.requests.try_recv() {
                self.refuse(io);
                work += 1;
            }
            return work;
        }
        for _ in 0..self.per_poll {
            let io = match self.parked.take() {
                Some(io) => io,
                None => match self.requests.try_recv() {
                    Ok(io) => io,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.closing = true;
                        break;
                    }
                },
            };
            match self.ch.submit(io) {
                Submit::Queued => work += 1,
                Submit::Busy(io) => {
                    self.parked = Some(io);
                    break;
                }
            }
        }
        work
    }

    fn in_flight(&self) -> usize {
        self.ch.in_flight()
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
