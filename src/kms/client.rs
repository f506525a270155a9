//! One blocking KMIP-over-TLS connection to one KMS server, and the operations nvseal uses.
//!
//! Owns the TCP socket and TLS session to a single server. Runs on control threads only: every
//! call blocks up to the configured timeouts (name resolution uses the system resolver and is
//! bounded only by it). Never call it from a reactor. It exists because the `kmip-protocol`
//! crate's bundled transports cannot dial IP addresses, ignore read timeouts and flatten errors
//! into strings; this one has a connect timeout, a response deadline per request, client
//! certificate authentication and typed errors that tell the cluster when to fail over.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{DnsName, ServerName};
use zeroize::Zeroizing;

use super::error::{KmsConfigError, KmsError, Phase};
use super::key::{Kek, KeyId};
use super::message::{
    self, KeyState, Operation, Outcome, ProtocolError, ProtocolVersion, Request, RevocationReason,
    ServerInfo, KEK_USAGE_MASK,
};
use super::tls::TlsMaterial;
use super::ttlv::{self, HEADER_LEN};

/// Largest response accepted. nvseal's replies are a few hundred bytes; a Locate listing
/// thousands of ids stays well below this. Anything larger is treated as hostile.
pub const MAX_RESPONSE_LEN: usize = 1 << 20;

/// Default TCP connect timeout. A reachable KMS accepts in milliseconds; 10 s tolerates a
/// loaded WAN link without stalling failover for long.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default time a server may take to complete a TLS handshake or answer a request. 60 s, as
/// vCenter uses for its KMS connections, so a busy-but-alive KMS is not abandoned too early.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long to wait for each phase of an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect, per resolved address.
    pub connect: Duration,
    /// TLS handshake, and each request from send to complete response.
    pub response: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: DEFAULT_CONNECT_TIMEOUT,
            response: DEFAULT_RESPONSE_TIMEOUT,
        }
    }
}

/// A KMS server address: a host name or IP literal and a TCP port (`host:port`,
/// `[v6-literal]:port`). Standard KMIP port is 5696.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServerAddr {
    host: String,
    port: u16,
}

impl ServerAddr {
    pub fn new(host: impl Into<String>, port: u16) -> Result<Self, KmsConfigError> {
        let host = host.into();
        let invalid = |reason| KmsConfigError::Address {
            addr: format!("{host}:{port}"),
            reason,
        };
        if port == 0 {
            return Err(invalid("port 0"));
        }
        if host.parse::<IpAddr>().is_err() && DnsName::try_from(host.as_str()).is_err() {
            return Err(invalid(
                "host is neither an IP address nor a valid DNS name",
            ));
        }
        Ok(Self { host, port })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The name the server certificate must carry: an IP SAN for IP literals, else a DNS SAN.
    fn server_name(&self) -> Result<ServerName<'static>, KmsError> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(ServerName::IpAddress(ip.into()));
        }
        DnsName::try_from(self.host.clone())
            .map(ServerName::DnsName)
            .map_err(|_| KmsError::Resolve {
                server: self.to_string(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "invalid DNS name"),
            })
    }
}

impl FromStr for ServerAddr {
    type Err = KmsConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| KmsConfigError::Address {
            addr: s.to_owned(),
            reason,
        };
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, port) = rest
                .split_once("]:")
                .ok_or(invalid("expected [v6-address]:port"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(invalid("bracketed host is not an IPv6 address"));
            }
            (host, port)
        } else {
            let (host, port) = s.rsplit_once(':').ok_or(invalid("expected host:port"))?;
            if host.contains(':') {
                return Err(invalid("IPv6 addresses must be written [address]:port"));
            }
            (host, port)
        };
        let port = port
            .parse::<u16>()
            .map_err(|_| invalid("port is not a number 1-65535"))?;
        Self::new(host, port)
    }
}

impl TryFrom<String> for ServerAddr {
    type Error = KmsConfigError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ServerAddr> for String {
    fn from(addr: ServerAddr) -> String {
        addr.to_string()
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// An established, authenticated KMIP session with one server. Requests are sent one at a
/// time. After any transport failure the connection is unusable: drop it and connect again.
pub struct KmipClient {
    server: ServerAddr,
    label: String,
    timeouts: Timeouts,
    stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    broken: bool,
}

impl KmipClient {
    /// Resolves, connects (within `timeouts.connect` per address) and completes the TLS
    /// handshake (within `timeouts.response`), so that certificate problems surface here.
    pub fn connect(
        server: &ServerAddr,
        tls: &TlsMaterial,
        timeouts: Timeouts,
    ) -> Result<Self, KmsError> {
        let label = server.to_string();
        let addrs: Vec<SocketAddr> = (server.host.as_str(), server.port)
            .to_socket_addrs()
            .map_err(|source| KmsError::Resolve {
                server: label.clone(),
                source,
            })?
            .collect();
        let mut last_error = None;
        let mut tcp = None;
        for addr in &addrs {
            match TcpStream::connect_timeout(addr, timeouts.connect) {
                Ok(stream) => {
                    tcp = Some(stream);
                    break;
                }
                Err(e) => last_error = Some(io_error(&label, Phase::Connect, timeouts.connect, e)),
            }
        }
        let Some(tcp) = tcp else {
            return Err(last_error.unwrap_or_else(|| KmsError::Resolve {
                server: label.clone(),
                source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
            }));
        };
        let setup = |e| io_error(&label, Phase::Connect, timeouts.connect, e);
        tcp.set_nodelay(true).map_err(setup)?;
        tcp.set_write_timeout(Some(timeouts.response))
            .map_err(setup)?;

        let conn = rustls::ClientConnection::new(tls.config().clone(), server.server_name()?)
            .map_err(|source| KmsError::Tls {
                server: label.clone(),
                phase: Phase::Handshake,
                source,
            })?;
        let mut client = Self {
            server: server.clone(),
            label,
            timeouts,
            stream: rustls::StreamOwned::new(conn, tcp),
            broken: false,
        };
        client.handshake()?;
        Ok(client)
    }

    fn handshake(&mut self) -> Result<(), KmsError> {
        let deadline = Instant::now() + self.timeouts.response;
        while self.stream.conn.is_handshaking() {
            self.arm_read_timeout(deadline, Phase::Handshake)?;
            let (conn, sock) = (&mut self.stream.conn, &mut self.stream.sock);
            if let Err(e) = conn.complete_io(sock) {
                return Err(self.fail(Phase::Handshake, e));
            }
        }
        Ok(())
    }

    /// The server this client is connected to.
    pub fn server(&self) -> &ServerAddr {
        &self.server
    }

    /// Creates an AES-256 key with the given Cryptographic Usage Mask and Name; returns its id.
    /// The key starts in the Pre-Active state: call [`KmipClient::activate`].
    pub fn create_aes256_key(&mut self, name: &str, usage_mask: i32) -> Result<KeyId, KmsError> {
        let reply = self.call(message::create_aes256(name, usage_mask), Operation::Create)?;
        self.decode(Operation::Create, message::unique_identifier(reply))
    }

    /// Creates a KEK: AES-256, usage mask Wrap Key | Unwrap Key, Name `name`, then activates it.
    /// If Activate fails the key stays Pre-Active on the server (the error says so by its
    /// operation name).
    pub fn create_kek(&mut self, name: &str) -> Result<KeyId, KmsError> {
        let id = self.create_aes256_key(name, KEK_USAGE_MASK)?;
        self.activate(&id)?;
        Ok(id)
    }

    pub fn activate(&mut self, id: &KeyId) -> Result<(), KmsError> {
        let reply = self.call(message::activate(id), Operation::Activate)?;
        self.decode(Operation::Activate, message::unique_identifier(reply))
            .map(drop)
    }

    /// Fetches a 32-byte AES key in Raw format.
    pub fn get_key(&mut self, id: &KeyId) -> Result<Kek, KmsError> {
        let reply = self.call(message::get(id), Operation::Get)?;
        self.decode(Operation::Get, message::symmetric_key(reply))
    }

    /// Ids of the symmetric keys carrying Name `name` (usually zero or one).
    pub fn locate_by_name(&mut self, name: &str) -> Result<Vec<KeyId>, KmsError> {
        let reply = self.call(message::locate_by_name(name), Operation::Locate)?;
        self.decode(Operation::Locate, message::located_ids(reply))
    }

    /// Ids of the symmetric keys carrying Name `name` that are Active (a revoked key keeps its
    /// Name; this never returns it).
    pub fn locate_active_by_name(&mut self, name: &str) -> Result<Vec<KeyId>, KmsError> {
        let reply = self.call(message::locate_active_by_name(name), Operation::Locate)?;
        self.decode(Operation::Locate, message::located_ids(reply))
    }

    /// The key's lifecycle state (Get Attributes "State").
    pub fn get_state(&mut self, id: &KeyId) -> Result<KeyState, KmsError> {
        let reply = self.call(message::get_state(id), Operation::GetAttributes)?;
        self.decode(Operation::GetAttributes, message::key_state(reply))
    }

    /// Revokes a key; it can no longer be used to protect data. Whether it can still be
    /// fetched depends on the server: PyKMIP hands out a Deactivated key, strict servers
    /// (Cosmian) refuse with Wrong Key Lifecycle State. nvseal's KMIP provider checks the state
    /// itself, so it behaves like a strict server everywhere.
    pub fn revoke(&mut self, id: &KeyId, reason: RevocationReason) -> Result<(), KmsError> {
        let now_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let reply = self.call(message::revoke(id, reason, now_s), Operation::Revoke)?;
        self.decode(Operation::Revoke, message::unique_identifier(reply))
            .map(drop)
    }

    /// Destroys a key. Servers refuse to destroy an Active key: revoke it first.
    pub fn destroy(&mut self, id: &KeyId) -> Result<(), KmsError> {
        let reply = self.call(message::destroy(id), Operation::Destroy)?;
        self.decode(Operation::Destroy, message::unique_identifier(reply))
            .map(drop)
    }

    /// Supported operations, object types and vendor.
    pub fn query(&mut self) -> Result<ServerInfo, KmsError> {
        let reply = self.call(message::query(), Operation::Query)?;
        self.decode(Operation::Query, message::server_info(reply))
    }

    /// Protocol versions the server supports, most preferred first.
    pub fn discover_versions(&mut self) -> Result<Vec<ProtocolVersion>, KmsError> {
        let reply = self.call(message::discover_versions(), Operation::DiscoverVersions)?;
        self.decode(
            Operation::DiscoverVersions,
            message::protocol_versions(reply),
        )
    }

    fn decode<T>(&self, operation: Operation, r: Result<T, ProtocolError>) -> Result<T, KmsError> {
        r.map_err(|source| self.protocol_error(operation, source))
    }

    fn protocol_error(&self, operation: Operation, source: ProtocolError) -> KmsError {
        KmsError::Protocol {
            server: self.label.clone(),
            operation: operation.name(),
            source,
        }
    }

    /// Sends one request and reads its complete response within the response timeout.
    fn call(
        &mut self,
        request: Result<Request, ProtocolError>,
        operation: Operation,
    ) -> Result<Option<ttlv::Item>, KmsError> {
        let request = self.decode(operation, request)?;
        if self.broken {
            return Err(KmsError::Io {
                server: self.label.clone(),
                phase: Phase::Request,
                source: io::Error::new(io::ErrorKind::NotConnected, "connection failed earlier"),
            });
        }
        let deadline = Instant::now() + self.timeouts.response;
        if let Err(e) = self
            .stream
            .write_all(&request.bytes)
            .and_then(|()| self.stream.flush())
        {
            return Err(self.fail(Phase::Request, e));
        }
        let mut header = [0u8; HEADER_LEN];
        self.read_full(&mut header, deadline)?;
        let h = ttlv::parse_header(&header);
        if h.tag != message::tag::RESPONSE_MESSAGE || h.item_type != 0x01 {
            self.broken = true;
            return Err(
                self.protocol_error(operation, ProtocolError::NotAResponse { found: h.tag })
            );
        }
        let body_len = usize::try_from(h.length).unwrap_or(usize::MAX);
        let total = body_len
            .checked_add(HEADER_LEN)
            .filter(|&t| t <= MAX_RESPONSE_LEN);
        let Some(total) = total else {
            self.broken = true;
            return Err(self.protocol_error(
                operation,
                ProtocolError::ResponseTooLarge { length: h.length },
            ));
        };
        let mut bytes = Zeroizing::new(vec![0u8; total]);
        bytes[..HEADER_LEN].copy_from_slice(&header);
        self.read_full(&mut bytes[HEADER_LEN..], deadline)?;

        match self.decode(operation, message::parse_response(&bytes, operation))? {
            Outcome::Success(payload) => Ok(payload),
            Outcome::Failure {
                status,
                reason,
                message,
            } => Err(KmsError::Server {
                server: self.label.clone(),
                operation: operation.name(),
                result_status: status,
                reason,
                message,
            }),
        }
    }

    fn read_full(&mut self, buf: &mut [u8], deadline: Instant) -> Result<(), KmsError> {
        let mut filled = 0;
        while filled < buf.len() {
            self.arm_read_timeout(deadline, Phase::Response)?;
            match self.stream.read(&mut buf[filled..]) {
                Ok(0) => {
                    self.broken = true;
                    return Err(KmsError::Closed {
                        server: self.label.clone(),
                        phase: Phase::Response,
                    });
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail(Phase::Response, e)),
            }
        }
        Ok(())
    }

    /// Sets SO_RCVTIMEO to the time left before `deadline` (bounds slow-drip servers too).
    fn arm_read_timeout(&mut self, deadline: Instant, phase: Phase) -> Result<(), KmsError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            self.broken = true;
            return Err(KmsError::Timeout {
                server: self.label.clone(),
                phase,
                timeout: self.timeouts.response,
            });
        }
        // A zero duration means "no timeout" to the OS and is rejected by std; `left` > 0.
        let result = self.stream.sock.set_read_timeout(Some(left));
        result.map_err(|e| self.fail(phase, e))
    }

    fn fail(&mut self, phase: Phase, e: io::Error) -> KmsError {
        self.broken = true;
        io_error(&self.label, phase, self.timeouts.response, e)
    }
}

impl Drop for KmipClient {
    /// Best effort close_notify so the server logs a clean close; never blocks for long
    /// (the write timeout bounds it and the alert fits in the socket buffer).
    fn drop(&mut self) {
        if !self.broken {
            self.stream.conn.send_close_notify();
            let _ = self
                .stream
                .sock
                .set_write_timeout(Some(Duration::from_millis(100)));
            let _ = self.stream.conn.write_tls(&mut self.stream.sock);
        }
    }
}

/// Classifies a socket or TLS error.
fn io_error(server: &str, phase: Phase, timeout: Duration, e: io::Error) -> KmsError {
    let server = server.to_owned();
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => KmsError::Timeout {
            server,
            phase,
            timeout,
        },
        io::ErrorKind::ConnectionRefused => KmsError::Refused { server },
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => KmsError::Closed { server, phase },
        _ => match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(tls) => KmsError::Tls {
                server,
                phase,
                source: tls.clone(),
            },
            None => KmsError::Io {
                server,
                phase,
                source: e,
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addr_parses_hosts_ips_and_v6() {
        let a: ServerAddr = "kms1.example.com:5696".parse().unwrap();
        assert_eq!((a.host(), a.port()), ("kms1.example.com", 5696));
        let b: ServerAddr = "127.0.0.1:15696".parse().unwrap();
        assert_eq!(b.to_string(), "127.0.0.1:15696");
        let c: ServerAddr = "[::1]:5696".parse().unwrap();
        assert_eq!((c.host(), c.to_string().as_str()), ("::1", "[::1]:5696"));
        for bad in [
            "kms",
            "kms:",
            "kms:0",
            "kms:70000",
            "::1:5696",
            "[kms]:1",
            ":5696",
            "bad host:1",
        ] {
            assert!(bad.parse::<ServerAddr>().is_err(), "{bad}");
        }
        assert!(matches!(b.server_name(), Ok(ServerName::IpAddress(_))));
        assert!(matches!(a.server_name(), Ok(ServerName::DnsName(_))));
    }

    #[test]
    fn io_errors_are_classified() {
        let t = Duration::from_secs(1);
        let k = |kind| io_error("h:1", Phase::Response, t, io::Error::from(kind)).kind();
        assert_eq!(k(io::ErrorKind::WouldBlock), "timeout");
        assert_eq!(k(io::ErrorKind::TimedOut), "timeout");
        assert_eq!(k(io::ErrorKind::ConnectionRefused), "refused");
        assert_eq!(k(io::ErrorKind::UnexpectedEof), "closed");
        assert_eq!(k(io::ErrorKind::ConnectionReset), "closed");
        assert_eq!(k(io::ErrorKind::PermissionDenied), "io");
        let tls = io::Error::new(io::ErrorKind::InvalidData, rustls::Error::DecryptError);
        assert!(matches!(
            io_error("h:1", Phase::Handshake, t, tls),
            KmsError::Tls {
                source: rustls::Error::DecryptError,
                ..
            }
        ));
    }
}
