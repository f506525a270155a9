//! The non-blocking TCP listener of the NVMe/TCP target, polled by reactor 0's accept poller.
//!
//! Runs on a reactor: `poll_accept` never blocks, and after an empty `accept` it waits
//! [`ACCEPT_INTERVAL_US`] before trying again (see there for why).
//!
//! Every accepted socket gets TCP keepalive and TCP_USER_TIMEOUT ([`TcpKeepalive`], from the
//! `nvmf` limits): a host that vanishes without a FIN or RST is found by the kernel even where
//! no NVMe keep alive covers the socket (before Connect, I/O queues, a host with KATO 0).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};

use nix::sys::socket::{setsockopt, sockopt};

use crate::nvmf::config::TcpKeepalive;
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
    keepalive: TcpKeepalive,
}

impl Listener {
    /// Binds and switches to non-blocking mode; accepted sockets get the default
    /// [`TcpKeepalive`] (see [`Listener::set_keepalive`]).
    pub fn bind(addr: SocketAddr) -> io::Result<Listener> {
        let inner = TcpListener::bind(addr)?;
        inner.set_nonblocking(true)?;
        let interval_ticks = clock::ns_to_ticks(ACCEPT_INTERVAL_US * 1000);
        Ok(Listener {
            inner,
            interval_ticks,
            next_try_ticks: 0,
            keepalive: TcpKeepalive::default(),
        })
    }
    /// The keepalive settings of the sockets accepted from now on (`Limits::tcp_keepalive`).
    pub fn set_keepalive(&mut self, k: TcpKeepalive) {
        self.keepalive = k;
    }
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
    /// Accepts one pending connection, non-blocking with TCP_NODELAY, keepalive and
    /// TCP_USER_TIMEOUT set; `None` if there is none (or accept failed transiently, or the
    /// socket could not be configured: the error is logged, the socket closed, and a later poll
    /// tries again). After an empty `accept` the next attempt waits `ACCEPT_INTERVAL_US` (1 ms).
    pub fn poll_accept(&mut self) -> Option<TcpStream> {
        let now = clock::ticks();
        if now < self.next_try_ticks {
            return None;
        }
        match self.inner.accept() {
            Ok((s, peer)) => {
                let configured = s
                    .set_nonblocking(true)
                    .and_then(|_| s.set_nodelay(true))
                    .and_then(|_| set_keepalive(&s, &self.keepalive));
                if let Err(e) = configured {
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

/// Turns TCP keepalive on for `s` with `k`'s timing, and sets TCP_USER_TIMEOUT.
fn set_keepalive(s: &TcpStream, k: &TcpKeepalive) -> io::Result<()> {
    let r = setsockopt(s, sockopt::KeepAlive, &true)
        .and_then(|_| setsockopt(s, sockopt::TcpKeepIdle, &k.idle_s))
        .and_then(|_| setsockopt(s, sockopt::TcpKeepInterval, &k.interval_s))
        .and_then(|_| setsockopt(s, sockopt::TcpKeepCount, &k.count))
        .and_then(|_| setsockopt(s, sockopt::TcpUserTimeout, &k.user_timeout_ms));
    r.map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::getsockopt;
    use std::time::{Duration, Instant};

    /// An accepted socket carries keepalive and TCP_USER_TIMEOUT as configured (the host side
    /// cannot see them; this is the only place to check).
    #[test]
    fn accepted_sockets_get_keepalive_and_user_timeout() {
        let mut l = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let k = TcpKeepalive {
            idle_s: 7,
            interval_s: 3,
            count: 4,
            user_timeout_ms: 12_345,
        };
        l.set_keepalive(k);
        let _client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let s = loop {
            if let Some(s) = l.poll_accept() {
                break s;
            }
            assert!(Instant::now() < deadline, "no connection accepted");
            std::thread::sleep(Duration::from_millis(2));
        };
        assert!(getsockopt(&s, sockopt::KeepAlive).unwrap(), "SO_KEEPALIVE");
        assert_eq!(getsockopt(&s, sockopt::TcpKeepIdle).unwrap(), 7);
        assert_eq!(getsockopt(&s, sockopt::TcpKeepInterval).unwrap(), 3);
        assert_eq!(getsockopt(&s, sockopt::TcpKeepCount).unwrap(), 4);
        assert_eq!(getsockopt(&s, sockopt::TcpUserTimeout).unwrap(), 12_345);
        assert!(getsockopt(&s, sockopt::TcpNoDelay).unwrap(), "TCP_NODELAY");
    }

    /// The defaults are what `Limits::default()` documents, and on by default.
    #[test]
    fn default_listener_sets_the_default_keepalive() {
        let mut l = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let _client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let s = loop {
            if let Some(s) = l.poll_accept() {
                break s;
            }
            assert!(Instant::now() < deadline, "no connection accepted");
            std::thread::sleep(Duration::from_millis(2));
        };
        let d = crate::nvmf::config::Limits::default();
        assert!(getsockopt(&s, sockopt::KeepAlive).unwrap());
        assert_eq!(
            getsockopt(&s, sockopt::TcpKeepIdle).unwrap(),
            d.tcp_keepalive_idle_s
        );
        assert_eq!(
            getsockopt(&s, sockopt::TcpUserTimeout).unwrap(),
            d.tcp_user_timeout_ms
        );
    }
}
