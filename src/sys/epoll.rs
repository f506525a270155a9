//! A non-blocking epoll instance ([`Epoll`]) for readiness polling of sockets on a reactor.
//!
//! A reactor owns one `Epoll` (through its NVMe/TCP poll group) and asks it once per loop
//! iteration, with a zero timeout, which of its sockets became readable. Registration is
//! edge-triggered: the kernel reports a socket once each time new bytes arrive, so the owner
//! must read it until `EAGAIN` before it waits for the next report (and an idle socket costs
//! nothing per loop). Nothing here blocks: [`Epoll::poll`] never sleeps.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Readiness reported for one registered fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ready {
    /// The token given at [`Epoll::add`].
    pub token: u64,
    /// Bytes (or end of stream) can be read.
    pub readable: bool,
    /// The peer hung up or the socket is in error: a read will say what.
    pub hangup: bool,
}

/// An epoll instance, closed on drop.
pub struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    /// A new instance whose [`Epoll::poll`] reports up to `max_events` fds per call (the rest
    /// are reported by the next call).
    pub fn new(max_events: usize) -> io::Result<Epoll> {
        // SAFETY: plain syscall without pointers; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by epoll_create1, is valid and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let n = max_events.max(1);
        Ok(Epoll {
            fd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; n],
        })
    }

    /// Registers `fd` for edge-triggered read readiness (with hang-up and error), reported with
    /// `token`. The caller keeps `fd` open until it calls [`Epoll::delete`] (closing it also
    /// removes it).
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call; the kernel copies it.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Removes `fd`; no event for it is reported by later [`Epoll::poll`] calls.
    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as in `add` (a non-null event pointer keeps pre-2.6.9 kernels happy).
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Collects the readiness reported since the last call, without waiting, and hands each to
    /// `f`; returns how many were reported. Allocates nothing.
    pub fn poll(&mut self, mut f: impl FnMut(Ready)) -> io::Result<usize> {
        let max = self.events.len().min(i32::MAX as usize) as i32;
        // SAFETY: `events` is a live buffer of `max` epoll_event entries the kernel fills; a zero
        // timeout makes the call return at once.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), self.events.as_mut_ptr(), max, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(e);
        }
        let n = n as usize;
        for ev in &self.events[..n] {
            let bits = ev.events;
            let token = ev.u64;
            f(Ready {
                token,
                readable: bits & (libc::EPOLLIN as u32) != 0,
                hangup: bits & ((libc::EPOLLHUP | libc::EPOLLRDHUP | libc::EPOLLERR) as u32) != 0,
            });
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    fn wait_ready(ep: &mut Epoll) -> Vec<Ready> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let mut got = Vec::new();
            ep.poll(|r| got.push(r)).unwrap();
            if !got.is_empty() || std::time::Instant::now() > deadline {
                return got;
            }
            std::thread::yield_now();
        }
    }

    #[test]
    fn edge_triggered_readiness() {
        let mut ep = Epoll::new(8).unwrap();
        let (mut a, mut b) = pair();
        ep.add(b.as_raw_fd(), 7).unwrap();
        // Nothing sent: nothing reported.
        assert_eq!(ep.poll(|_| panic!("idle socket reported")).unwrap(), 0);
        a.write_all(b"hello").unwrap();
        let got = wait_ready(&mut ep);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].token, 7);
        assert!(got[0].readable);
        // Edge-triggered: not reported again until new bytes arrive, even though unread.
        assert_eq!(ep.poll(|_| {}).unwrap(), 0);
        let mut buf = [0u8; 16];
        assert_eq!(b.read(&mut buf).unwrap(), 5);
        assert_eq!(
            b.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        a.write_all(b"x").unwrap();
        assert_eq!(wait_ready(&mut ep).len(), 1);
        // Hang-up is reported too.
        drop(a);
        let got = wait_ready(&mut ep);
        assert!(got.iter().any(|r| r.token == 7 && r.hangup));
        ep.delete(b.as_raw_fd()).unwrap();
        assert!(ep.delete(b.as_raw_fd()).is_err(), "already removed");
    }
}
