//! The control socket client: one request, one response, with connect and read timeouts.
//! Used by `nvseal rpc <method> [params-json]` through [`cli_main`] and by tests.
//!
//! Runs on the calling thread (the CLI's main thread); blocking by design.

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use serde_json::{json, Value};
use thiserror::Error;

use super::frame::{FrameError, LineReader};

/// Default time to get a connection (the listen backlog may be full).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time for the response; rekey and KMS calls may wait on a KMS for a while.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest response accepted (stats with many histograms are big, but not this big).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 << 20;
/// Pause between connect attempts while the server's backlog is full.
const CONNECT_RETRY_PAUSE: Duration = Duration::from_millis(10);

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: the server answered with a JSON-RPC error.
pub const EXIT_RPC_ERROR: u8 = 1;
/// Exit code: bad command-line input (params are not JSON).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: no usable answer (cannot connect, timeout, malformed response).
pub const EXIT_CONNECTION: u8 = 3;

/// Client knobs.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Time to establish the connection.
    pub connect_timeout: Duration,
    /// Time for the complete response after sending the request.
    pub read_timeout: Duration,
    /// Largest response line accepted.
    pub max_response_bytes: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

/// Why a call gave no result.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error (ENOENT: no server; EACCES: socket mode; ECONNREFUSED: stale).
        source: io::Error,
    },
    /// Nothing usable within the timeout.
    #[error("{0}")]
    Timeout(String),
    /// Send/receive failed or the server closed the connection early.
    #[error("connection to {path}: {detail}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What happened.
        detail: String,
    },
    /// The answer is not a JSON-RPC response to our request.
    #[error("malformed response: {0}")]
    Protocol(String),
    /// The server answered with a JSON-RPC error.
    #[error("{message} (code {code})")]
    Rpc {
        /// The error code.
        code: i64,
        /// The server's message.
        message: String,
        /// The server's data member, if any.
        data: Option<Value>,
    },
}

impl ClientError {
    /// The CLI exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Rpc { .. } => EXIT_RPC_ERROR,
            _ => EXIT_CONNECTION,
        }
    }
}

/// Calls `method` with `params` (`None`: no params member) with default options.
pub fn call(socket_path: &Path, method: &str, params: Option<Value>) -> Result<Value, ClientError> {
    call_with(socket_path, method, params, &ClientOptions::default())
}

/// Calls `method` with explicit options.
pub fn call_with(
    socket_path: &Path,
    method: &str,
    params: Option<Value>,
    opts: &ClientOptions,
) -> Result<Value, ClientError> {
    let id = u64::from(std::process::id());
    let mut request = json!({ "jsonrpc": "2.0", "method": method, "id": id });
    if let Some(p) = params {
        request["params"] = p;
    }
    let response = exchange(socket_path, &request.to_string(), opts)?;
    let v: Value = serde_json::from_slice(&response)
        .map_err(|e| ClientError::Protocol(format!("not JSON: {e}")))?;
    if v.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(ClientError::Protocol("missing \"jsonrpc\": \"2.0\"".into()));
    }
    if let Some(err) = v.get("error") {
        let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
        let message = err
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("(no message)")
            .to_string();
        return Err(ClientError::Rpc {
            code,
            message,
            data: err.get("data").cloned(),
        });
    }
    if v.get("id") != Some(&json!(id)) {
        return Err(ClientError::Protocol(format!(
            "response id {:?} does not match {id}",
            v.get("id")
        )));
    }
    v.get("result")
        .cloned()
        .ok_or_else(|| ClientError::Protocol("neither result nor error".into()))
}

/// Sends one raw line (newline added) and returns the raw response line. For tools and tests
/// that need to send something [`call`] would not build.
pub fn exchange(
    socket_path: &Path,
    line: &str,
    opts: &ClientOptions,
) -> Result<Vec<u8>, ClientError> {
    let mut stream = connect_with_timeout(socket_path, opts.connect_timeout)?;
    let io_err = |e: io::Error| ClientError::Io {
        path: socket_path.into(),
        detail: e.to_string(),
    };
    stream
        .set_write_timeout(Some(opts.read_timeout))
        .map_err(io_err)?;
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    let mut reader = LineReader::new(opts.max_response_bytes);
    if let Err(e) = stream.write_all(&buf) {
        // A server that refuses the connection (busy) answers first and closes; show its
        // answer rather than the broken pipe.
        return match reader.read_line(&mut stream, Instant::now() + opts.read_timeout) {
            Ok(line) => Ok(line),
            Err(_) => Err(io_err(e)),
        };
    }
    match reader.read_line(&mut stream, Instant::now() + opts.read_timeout) {
        Ok(line) => Ok(line),
        Err(FrameError::Timeout) => Err(ClientError::Timeout(format!(
            "no response from {} within {} ms",
            socket_path.display(),
            opts.read_timeout.as_millis()
        ))),
        Err(FrameError::Io(e)) => Err(io_err(e)),
        Err(e) => Err(ClientError::Io {
            path: socket_path.into(),
            detail: e.to_string(),
        }),
    }
}

/// Connects, retrying while the server's listen backlog is full (EAGAIN), until `timeout`.
pub fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<UnixStream, ClientError> {
    let conn_err = |source: io::Error| ClientError::Connect {
        path: path.into(),
        source,
    };
    let addr = UnixAddr::new(path).map_err(|e| conn_err(e.into()))?;
    let deadline = Instant::now() + timeout;
    loop {
        let fd: OwnedFd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| conn_err(e.into()))?;
        match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
            Ok(()) => {
                let stream = UnixStream::from(fd);
                stream.set_nonblocking(false).map_err(conn_err)?;
                return Ok(stream);
            }
            Err(Errno::EAGAIN | Errno::EINTR) if Instant::now() < deadline => {
                std::thread::sleep(CONNECT_RETRY_PAUSE);
            }
            Err(Errno::EAGAIN) => {
                return Err(ClientError::Timeout(format!(
                    "cannot connect to {} within {} ms: server backlog full",
                    path.display(),
                    timeout.as_millis()
                )))
            }
            Err(e) => return Err(conn_err(e.into())),
        }
    }
}

/// The body of `nvseal rpc <method> [params-json]`: prints the result as pretty JSON on
/// stdout. A JSON-RPC error goes to stderr as `error <code>: <message>` (plus its data) and
/// exits 1; bad params JSON exits 2; a connection failure, timeout or malformed response
/// exits 3.
pub fn cli_main(socket_path: &Path, method: &str, params_json: Option<&str>) -> ExitCode {
    let stdout = io::stdout();
    let stderr = io::stderr();
    let code = run_cli(
        socket_path,
        method,
        params_json,
        &ClientOptions::default(),
        &mut stdout.lock(),
        &mut stderr.lock(),
    );
    ExitCode::from(code)
}

/// [`cli_main`] with explicit options and output streams; returns the exit code.
pub fn run_cli(
    socket_path: &Path,
    method: &str,
    params_json: Option<&str>,
    opts: &ClientOptions,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    let params = match params_json.map(serde_json::from_str::<Value>).transpose() {
        Ok(p) => p,
        Err(e) => {
            let _ = writeln!(err, "nvseal rpc: params are not valid JSON: {e}");
            return EXIT_USAGE;
        }
    };
    if let Some(p) = &params {
        if !p.is_object() && !p.is_array() {
            let _ = writeln!(err, "nvseal rpc: params must be a JSON object or array");
            return EXIT_USAGE;
        }
    }
    match call_with(socket_path, method, params, opts) {
        Ok(result) => {
            let text = serde_json::to_string_pretty(&result).unwrap_or_else(|_| result.to_string());
            if writeln!(out, "{text}").is_err() {
                return EXIT_CONNECTION;
            }
            EXIT_OK
        }
        Err(e @ ClientError::Rpc { .. }) => {
            if let ClientError::Rpc {
                code,
                message,
                data,
            } = &e
            {
                let _ = writeln!(err, "error {code}: {message}");
                if let Some(d) = data {
                    let _ = writeln!(err, "{d}");
                }
            }
            e.exit_code()
        }
        Err(e) => {
            let _ = writeln!(err, "nvseal rpc: {e}");
            e.exit_code()
        }
    }
}
