//! The control socket server: binds the unix socket, accepts connections on one control
//! thread (`rpc-accept`), serves each connection on its own thread (`rpc-conn-N`), and tears
//! everything down (socket file included) on shutdown.
//!
//! Exists so operators and scripts can drive a running target. Every connection's roles are
//! fixed at accept time from SO_PEERCRED and the [`RpcConfig`] role map; the limits
//! (connections, request size, read/write timeouts, batch length) come from the config.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde_json::Value;
use thiserror::Error;

use super::config::{RpcConfig, RpcConfigError};
use super::dispatch::{error_response, Dispatcher, Handler, Registry, ServerCounters};
use super::error::RpcError;
use super::frame::{FrameError, LineReader};
use super::{CallContext, Caller, Role, RoleSet};
use crate::audit::{AuditSink, JsonlAuditSink};

/// How long the "busy" refusal may take to write to a connection over the limit.
const BUSY_WRITE_TIMEOUT: Duration = Duration::from_millis(200);

/// Why the server could not be built or started.
#[derive(Debug, Error)]
pub enum ServeError {
    /// A limit in the config is out of range.
    #[error(transparent)]
    Config(#[from] RpcConfigError),
    /// A method registration was refused (duplicate, reserved or malformed name).
    #[error("rpc method registration: {0}")]
    Registration(String),
    /// Crypto-role methods are registered but no audit sink exists.
    #[error("crypto-role methods need an audit sink: set rpc.audit_log or call .audit()")]
    NoAuditSink,
    /// The audit file could not be opened.
    #[error("cannot open audit log {path}: {source}")]
    AuditLog {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Another live server answers on the socket path.
    #[error("{0}: another server is listening on this socket")]
    InUse(PathBuf),
    /// Something other than a socket is at the path; it is left alone.
    #[error("{0}: exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Socket creation, permission change or thread start failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The step that failed.
        what: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Collects methods and settings; [`RpcServerBuilder::build`] checks them.
pub struct RpcServerBuilder {
    config: RpcConfig,
    registry: Registry,
    errors: Vec<String>,
    has_crypto: bool,
    health: Option<Arc<Handler>>,
    audit: Option<Arc<dyn AuditSink>>,
}

impl RpcServerBuilder {
    /// Registers `name`, callable by peers holding `role`. Errors (duplicate, reserved `rpc.`
    /// prefix, `health`/`version`, bad characters) are reported by [`Self::build`].
    pub fn method<F>(mut self, name: &str, role: Role, handler: F) -> Self
    where
        F: Fn(&CallContext, &Value) -> Result<Value, RpcError> + Send + Sync + 'static,
    {
        if name == "health" || name == "version" {
            self.errors.push(format!(
                "{name} is built in (use .health() to replace health)"
            ));
            return self;
        }
        if let Err(e) = self.registry.insert(name, role, Arc::new(handler)) {
            self.errors.push(e);
        }
        self.has_crypto |= role == Role::Crypto;
        self
    }

    /// Replaces the body of the built-in `health` method (viewer role).
    pub fn health<F>(mut self, handler: F) -> Self
    where
        F: Fn(&CallContext, &Value) -> Result<Value, RpcError> + Send + Sync + 'static,
    {
        self.health = Some(Arc::new(handler));
        self
    }

    /// Sets the audit sink (overrides `rpc.audit_log`).
    pub fn audit(mut self, sink: Arc<dyn AuditSink>) -> Self {
        self.audit = Some(sink);
        self
    }

    /// Validates the config and the registrations; opens `rpc.audit_log` if no sink was set.
    pub fn build(self) -> Result<RpcServer, ServeError> {
        self.config.validate()?;
        if let Some(e) = self.errors.into_iter().next() {
            return Err(ServeError::Registration(e));
        }
        let audit = match (self.audit, &self.config.audit_log) {
            (Some(sink), _) => Some(sink),
            (None, Some(path)) => {
                let sink = JsonlAuditSink::open(path).map_err(|source| ServeError::AuditLog {
                    path: path.clone(),
                    source,
                })?;
                Some(Arc::new(sink) as Arc<dyn AuditSink>)
            }
            (None, None) => None,
        };
        if self.has_crypto && audit.is_none() {
            return Err(ServeError::NoAuditSink);
        }
        let counters = Arc::new(ServerCounters::default());
        let dispatcher = Dispatcher::new(
            self.registry,
            self.health,
            audit,
            self.config.max_batch_len,
            Arc::clone(&counters),
        )
        .map_err(ServeError::Registration)?;
        Ok(RpcServer {
            config: self.config,
            dispatcher: Arc::new(dispatcher),
            counters,
        })
    }
}

/// A configured server, not yet listening.
pub struct RpcServer {
    config: RpcConfig,
    dispatcher: Arc<Dispatcher>,
    counters: Arc<ServerCounters>,
}

impl RpcServer {
    /// Starts a builder with the built-in methods (`rpc.methods`, `health`, `version`).
    pub fn builder(config: RpcConfig) -> RpcServerBuilder {
        RpcServerBuilder {
            config,
            registry: Registry::default(),
            errors: Vec::new(),
            has_crypto: false,
            health: None,
            audit: None,
        }
    }

    /// Runs one request line as `caller` would over the socket (roles from the config).
    /// For in-process tools and the fuzz target.
    pub fn handle_line(&self, caller: Caller, line: &[u8]) -> Option<String> {
        let roles = self.config.roles_for(caller.uid, caller.gid);
        self.dispatcher.handle_line(caller, roles, line)
    }

    /// Binds the socket (replacing a stale one), sets its mode and group, and starts the
    /// accept thread.
    pub fn start(self) -> Result<RpcHandle, ServeError> {
        let path = self.config.socket_path.clone();
        let io_err = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| ServeError::Io { what, path, source }
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if !parent.exists() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)
                    .map_err(io_err("create directory for", &path))?;
            }
        }
        remove_stale_socket(&path)?;
        let listener = UnixListener::bind(&path).map_err(io_err("bind", &path))?;
        // bind(2) creates the socket with 0777 & !umask, then it is set to the configured
        // mode. Under umask 022 (or stricter) the first mode lets only the owner connect
        // (connect(2) needs write permission), so the moment before the chmod grants nothing
        // the final mode does not; a umask without the group/other write bits masked would.
        let prepared = prepare_socket_file(&path, &self.config, &listener);
        let ident = match prepared {
            Ok(ident) => ident,
            Err(e) => {
                // Do not leave a socket nobody serves behind.
                let _ = fs::remove_file(&path);
                return Err(e);
            }
        };
        let (wake_tx, wake_rx) =
            UnixStream::pair().map_err(io_err("create wake pair for", &path))?;
        let shared = Arc::new(Shared {
            config: self.config,
            dispatcher: self.dispatcher,
            counters: self.counters,
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_path = path.clone();
        let thread = std::thread::Builder::new()
            .name("rpc-accept".into())
            .spawn(move || accept_loop(accept_shared, listener, wake_rx, accept_path, ident))
            .map_err(io_err("start accept thread for", &path))?;
        tracing::info!(socket = %path.display(), "rpc: control socket listening");
        Ok(RpcHandle {
            path,
            wake: Some(wake_tx),
            thread: Some(thread),
            shared,
        })
    }
}

/// Sets the socket file's mode and group and makes the listener non-blocking; returns the
/// file's (device, inode) so shutdown removes only the file it created.
fn prepare_socket_file(
    path: &Path,
    config: &RpcConfig,
    listener: &UnixListener,
) -> Result<(u64, u64), ServeError> {
    let io_err = |what: &'static str| {
        let path = path.to_path_buf();
        move |source| ServeError::Io { what, path, source }
    };
    fs::set_permissions(path, fs::Permissions::from_mode(config.socket_mode.0))
        .map_err(io_err("chmod"))?;
    if let Some(gid) = config.socket_gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(io_err("chown"))?;
    }
    listener
        .set_nonblocking(true)
        .map_err(io_err("set non-blocking"))?;
    fs::metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .map_err(io_err("stat"))
}

/// Removes a socket file no server answers on; refuses a live socket or a non-socket.
fn remove_stale_socket(path: &Path) -> Result<(), ServeError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServeError::Io {
                what: "stat",
                path: path.into(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServeError::NotASocket(path.into()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServeError::InUse(path.into())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::warn!(socket = %path.display(), "rpc: removing stale socket file");
            fs::remove_file(path).map_err(|source| ServeError::Io {
                what: "remove stale",
                path: path.into(),
                source,
            })
        }
        Err(source) => Err(ServeError::Io {
            what: "probe existing socket",
            path: path.into(),
            source,
        }),
    }
}

/// State shared by the accept thread, the connection threads and the handle.
struct Shared {
    config: RpcConfig,
    dispatcher: Arc<Dispatcher>,
    counters: Arc<ServerCounters>,
    stopping: AtomicBool,
    /// A clone of every open connection, so shutdown can unblock their reads.
    conns: Mutex<HashMap<u64, UnixStream>>,
}

impl Shared {
    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, UnixStream>> {
        // Poisoning only means a holder panicked; the map itself stays consistent.
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running server. Dropping it shuts it down like [`RpcHandle::shutdown`].
pub struct RpcHandle {
    path: PathBuf,
    wake: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl RpcHandle {
    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Connections being served now.
    pub fn active_connections(&self) -> u64 {
        self.shared
            .counters
            .active_connections
            .load(Ordering::Relaxed)
    }

    /// Stops accepting, removes the socket file, closes every connection (a handler still
    /// running finishes and its response is sent first) and joins all threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(mut wake) = self.wake.take() {
            // If the write fails the accept thread is already gone; joining is still right.
            let _ = wake.write_all(b"x");
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("rpc: accept thread panicked");
            }
        }
    }
}

impl Drop for RpcHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(
    shared: Arc<Shared>,
    listener: UnixListener,
    wake: UnixStream,
    path: PathBuf,
    ident: (u64, u64),
) {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    let next_id = AtomicU64::new(0);
    loop {
        workers.retain(|w| !w.is_finished());
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "rpc: poll failed; stopping the control socket");
                break;
            }
        }
        let woken = fds[1].revents().is_some_and(|r| !r.is_empty());
        if woken || shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        // Drain every pending connection.
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    if let Some(w) = admit(&shared, stream, id) {
                        workers.push(w);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on a readable socket.
                    tracing::warn!(error = %e, "rpc: accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
            }
        }
    }
    drop(listener);
    match fs::symlink_metadata(&path) {
        Ok(m) if (m.dev(), m.ino()) == ident => {
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(socket = %path.display(), error = %e, "rpc: cannot remove socket");
            }
        }
        // Replaced by someone else (or already gone): not ours to remove.
        _ => {}
    }
    // Shut only the read side: idle connections see end-of-file at once, while a handler
    // still running delivers its response (bounded by the write timeout) before its thread
    // ends.
    for conn in shared.conns().values() {
        let _ = conn.shutdown(std::net::Shutdown::Read);
    }
    for w in workers {
        if w.join().is_err() {
            tracing::error!("rpc: connection thread panicked");
        }
    }
    tracing::info!(socket = %path.display(), "rpc: control socket closed");
}

/// Reads the peer's credentials, enforces the connection limit and starts the connection
/// thread. Returns its handle, or `None` when the connection was refused.
fn admit(shared: &Arc<Shared>, stream: UnixStream, id: u64) -> Option<JoinHandle<()>> {
    shared
        .counters
        .accepted_total
        .fetch_add(1, Ordering::Relaxed);
    // accept(2) does not inherit O_NONBLOCK on Linux; make sure regardless.
    if stream.set_nonblocking(false).is_err() {
        return None;
    }
    let creds = match getsockopt(&stream, PeerCredentials) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "rpc: SO_PEERCRED failed; closing connection");
            return None;
        }
    };
    let caller = Caller {
        uid: creds.uid(),
        gid: creds.gid(),
        pid: creds.pid(),
    };
    let max = shared.config.max_connections as u64;
    if shared.counters.active_connections.load(Ordering::SeqCst) >= max {
        shared
            .counters
            .refused_busy_total
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%caller, max, "rpc: connection refused, too many open");
        refuse_busy(stream, max);
        return None;
    }
    let roles = shared.config.roles_for(caller.uid, caller.gid);
    let clone = match stream.try_clone() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "rpc: cannot clone connection; closing it");
            return None;
        }
    };
    shared
        .counters
        .active_connections
        .fetch_add(1, Ordering::SeqCst);
    shared.conns().insert(id, clone);
    let guard = ConnGuard {
        shared: Arc::clone(shared),
        id,
    };
    let worker_shared = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name(format!("rpc-conn-{id}"))
        .spawn(move || {
            let _guard = guard;
            serve_connection(&worker_shared, stream, caller, roles);
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            // The closure (and with it the guard and the stream) was dropped: counters and the
            // map are already restored.
            tracing::warn!(error = %e, "rpc: cannot start connection thread");
            None
        }
    }
}

fn refuse_busy(mut stream: UnixStream, max: u64) {
    let err = RpcError::busy(format!(
        "{max} connections already open (rpc.max_connections)"
    ))
    .with_data(serde_json::json!({ "max_connections": max }));
    let mut line = error_response(Value::Null, err);
    line.push('\n');
    let _ = stream.set_write_timeout(Some(BUSY_WRITE_TIMEOUT));
    let _ = stream.write_all(line.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Undoes a connection's registration when its thread ends, however it ends.
struct ConnGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shared.conns().remove(&self.id);
        self.shared
            .counters
            .active_connections
            .fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve_connection(shared: &Shared, mut stream: UnixStream, caller: Caller, roles: RoleSet) {
    let cfg = &shared.config;
    let read_timeout = Duration::from_millis(cfg.read_timeout_ms);
    if stream
        .set_write_timeout(Some(Duration::from_millis(cfg.write_timeout_ms)))
        .is_err()
    {
        return;
    }
    tracing::debug!(%caller, roles = ?roles.names(), "rpc: connection open");
    let mut reader = LineReader::new(cfg.max_request_bytes);
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let line = match reader.read_line(&mut stream, Instant::now() + read_timeout) {
            Ok(line) => line,
            Err(FrameError::TooLarge { limit }) => {
                let err = RpcError::invalid_request(format!(
                    "request exceeds {limit} bytes (rpc.max_request_bytes); closing connection"
                ));
                let _ = write_line(&mut stream, &error_response(Value::Null, err));
                break;
            }
            Err(e @ (FrameError::Timeout | FrameError::Truncated { .. } | FrameError::Io(_))) => {
                tracing::debug!(%caller, error = %e, "rpc: connection dropped");
                break;
            }
            Err(FrameError::Closed) => break,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if let Some(response) = shared.dispatcher.handle_line(caller, roles, &line) {
            if let Err(e) = write_line(&mut stream, &response) {
                tracing::debug!(%caller, error = %e, "rpc: response not delivered");
                break;
            }
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn write_line(stream: &mut UnixStream, line: &str) -> io::Result<()> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    stream.write_all(&buf)
}
