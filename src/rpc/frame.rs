//! Newline-delimited framing for the control socket: one JSON value per line, in both
//! directions, with a cap on the line length and a deadline for a complete line.
//!
//! Runs on the RPC connection thread (and in the client). Newline framing was chosen over a
//! length prefix because compact JSON never contains a raw newline (JSON escapes it inside
//! strings), so `socat - UNIX-CONNECT:/run/nvseal/nvseal.sock` is a usable client, and a
//! length prefix would add nothing but a second thing to validate.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use thiserror::Error;

/// Bytes asked of the kernel per read.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Why no complete line came.
#[derive(Debug, Error)]
pub enum FrameError {
    /// More than `limit` bytes without a newline; the stream cannot be resynchronised.
    #[error("request exceeds {limit} bytes without a newline")]
    TooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// The deadline passed before the newline arrived.
    #[error("no complete request within the read timeout")]
    Timeout,
    /// The peer closed the connection between requests.
    #[error("connection closed")]
    Closed,
    /// The peer closed the connection in the middle of a line.
    #[error("connection closed after {bytes} bytes of an unterminated request")]
    Truncated {
        /// Bytes of the half line that were dropped.
        bytes: usize,
    },
    /// Any other socket error.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

/// A reader that can bound its next blocking read.
pub trait DeadlineRead: Read {
    /// Makes the next read return `WouldBlock`/`TimedOut` after at most `timeout`.
    fn set_read_timeout_for(&mut self, timeout: Duration) -> io::Result<()>;
}

impl DeadlineRead for UnixStream {
    fn set_read_timeout_for(&mut self, timeout: Duration) -> io::Result<()> {
        // A zero duration is an error for set_read_timeout; the caller never passes one.
        self.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
    }
}

impl DeadlineRead for &[u8] {
    fn set_read_timeout_for(&mut self, _timeout: Duration) -> io::Result<()> {
        Ok(())
    }
}

/// Splits a byte stream into lines of at most `max_line_bytes`; keeps bytes after a newline
/// for the next call (pipelined requests). Its buffer never exceeds `max_line_bytes + 1`.
pub struct LineReader {
    buf: Vec<u8>,
    /// `buf[..scanned]` is known to hold no newline.
    scanned: usize,
    max_line_bytes: usize,
}

impl LineReader {
    /// A reader for lines of at most `max_line_bytes` (newline excluded).
    pub fn new(max_line_bytes: usize) -> LineReader {
        LineReader {
            buf: Vec::new(),
            scanned: 0,
            max_line_bytes,
        }
    }

    /// Returns the next line without its `\n` (and without a `\r` before it).
    pub fn read_line<R: DeadlineRead>(
        &mut self,
        r: &mut R,
        deadline: Instant,
    ) -> Result<Vec<u8>, FrameError> {
        let mut chunk = [0u8; READ_CHUNK_BYTES];
        loop {
            let unscanned = self.buf.get(self.scanned..).unwrap_or(&[]);
            if let Some(pos) = unscanned.iter().position(|&b| b == b'\n') {
                let end = self.scanned + pos;
                if end > self.max_line_bytes {
                    return Err(FrameError::TooLarge {
                        limit: self.max_line_bytes,
                    });
                }
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop(); // the '\n'
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.scanned = 0;
                return Ok(line);
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.max_line_bytes {
                return Err(FrameError::TooLarge {
                    limit: self.max_line_bytes,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(FrameError::Timeout);
            }
            r.set_read_timeout_for(deadline - now)?;
            // Never buffer more than one maximal line plus its newline.
            let room = (self.max_line_bytes + 1 - self.buf.len()).clamp(1, READ_CHUNK_BYTES);
            match r.read(&mut chunk[..room]) {
                Ok(0) if self.buf.is_empty() => return Err(FrameError::Closed),
                Ok(0) => {
                    return Err(FrameError::Truncated {
                        bytes: self.buf.len(),
                    })
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    if Instant::now() >= deadline {
                        return Err(FrameError::Timeout);
                    }
                }
                Err(e) => return Err(FrameError::Io(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn splits_pipelined_lines_and_strips_cr() {
        let mut input: &[u8] = b"{\"a\":1}\r\n{\"b\":2}\n\nrest";
        let mut lr = LineReader::new(64);
        assert_eq!(lr.read_line(&mut input, far()).unwrap(), b"{\"a\":1}");
        assert_eq!(lr.read_line(&mut input, far()).unwrap(), b"{\"b\":2}");
        assert_eq!(lr.read_line(&mut input, far()).unwrap(), b"");
        match lr.read_line(&mut input, far()) {
            Err(FrameError::Truncated { bytes: 4 }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn closed_between_lines() {
        let mut input: &[u8] = b"x\n";
        let mut lr = LineReader::new(64);
        lr.read_line(&mut input, far()).unwrap();
        assert!(matches!(
            lr.read_line(&mut input, far()),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn cap_is_exact() {
        let mut ok = vec![b'a'; 16];
        ok.push(b'\n');
        let mut lr = LineReader::new(16);
        assert_eq!(lr.read_line(&mut ok.as_slice(), far()).unwrap().len(), 16);
        let mut long = vec![b'a'; 17];
        long.push(b'\n');
        let mut lr = LineReader::new(16);
        assert!(matches!(
            lr.read_line(&mut long.as_slice(), far()),
            Err(FrameError::TooLarge { limit: 16 })
        ));
        let endless = vec![b'a'; 1000];
        let mut lr = LineReader::new(16);
        assert!(matches!(
            lr.read_line(&mut endless.as_slice(), far()),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(lr.buf.len() <= 17);
    }

    #[test]
    fn past_deadline_times_out() {
        let mut input: &[u8] = b"partial";
        let mut lr = LineReader::new(64);
        assert!(matches!(
            lr.read_line(&mut input, Instant::now()),
            Err(FrameError::Timeout)
        ));
    }
}
