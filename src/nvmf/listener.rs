//! The non-blocking TCP listener of the NVMe/TCP target, polled by reactor 0's accept poller.
//!
//! Runs on a reactor: `poll_accept` never blocks, and after an empty `accept` it waits
//! [`ACCEPT_INTERVAL_US`] before trying again (see there for why).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};

use crate::sys::clock;

/// How often an idle listener tries `accept` (µs). On Linux, an `accept` that finds nothing
/// still allocates and frees a socket inode (a few µs), so a reactor that called it on every
/// loop would spend much of its time there. At 100 µs reactor 0 still made ~8,000 calls a
/// second under load (~1 % of its time in `perf record`); 1 ms makes that ~1,000 and adds at
/// most 1 ms to a connection's setup, which already takes several round trips (ICReq,
/// Connect). SPDK's acceptor poller runs every 10 ms by default.
const ACCEPT_INTERVAL_US: u64 = 1000;

/// A non-blocking TCP listener for NVMe/TCP.
pub struct Listener {
    inner: TcpListener,
    interval_ticks: u64,
    next_try_ticks: u64,
}

impl Listener {
    /// Binds and switches to non-blocking mode.
    pub fn bind(addr: SocketAddr) -> io::Result<Listener> {
        let inner = TcpListener::bind(addr)?;
        inner.set_nonblocking(true)?;
        let interval_ticks = clock::ns_to_ticks(ACCEPT_INTERVAL_US * 1000);
        Ok(Listener {
            inner,
            interval_ticks,
            next_try_ticks: 0,
        })
    }
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
    /// Accepts one pending connection, non-blocking with TCP_NODELAY set; `None` if there is none
    /// (or accept failed transiently: the error is logged and a later poll tries again). After
    /// an empty `accept` the next attempt waits `ACCEPT_INTERVAL_US` (1 ms).
    pub fn poll_accept(&mut self) -> Option<TcpStream> {
        let now = clock::ticks();
        if now < self.next_try_ticks {
            return None;
        }
        match self.inner.accept() {
            Ok((s, peer)) => {
                if let Err(e) = s.set_nonblocking(true).and_then(|_| s.set_nodelay(true)) {
                    tracing::warn!(%peer, error = %e, "could not configure accepted socket");
                    return None;
                }
                tracing::debug!(%peer, "accepted NVMe/TCP connection");
                Some(s)
            }
            Err(e) => {
                self.next_try_ticks = now.saturating_add(self.interval_ticks);
                if e.kind() != io::ErrorKind::WouldBlock {
                    tracing::warn!(error = %e, "accept failed");
                }
                None
            }
        }
    }
}
