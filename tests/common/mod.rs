//! Helpers shared by the integration tests: PyKMIP servers ([`kmip`]), a log capture that sees
//! every thread, synchronous block I/O on a bdev, and key-manager plumbing.
//!
//! Each test binary includes this module with `mod common;` and uses what it needs.

#![allow(dead_code)]

pub mod host;
pub mod kmip;
pub mod nvmf;
pub mod pass;
pub mod qemu;
pub mod serve;

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nvseal::bdev::{Bdev, BdevIo, IoBuf, IoStatus, IoType, Submit};
use nvseal::keys::manager::{KeyManager, NamespaceKeyState, NamespaceStatus};
use nvseal::kms::{KmsClusterConfig, ServerAddr};
use nvseal::sys::buf::AlignedBuf;
use nvseal::types::CoreId;

/// Everything every thread logged (tracing, all levels, no colours) since the first call.
#[derive(Clone)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (once per test binary) a global subscriber writing every event, at TRACE, to a
/// shared buffer, and returns that buffer. Global, because unlock threads log too.
pub fn capture_logs() -> Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_thread_names(true)
            .with_writer(move || LogWriter(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("global subscriber");
        Logs(buf)
    })
    .clone()
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// True when `hay` contains `needle` as raw bytes, lower-case hex, upper-case hex, or the
/// `Debug` form of a byte slice (`[12, 255, ...]`, what `?bytes` in a log line prints).
pub fn leaks(hay: &[u8], needle: &[u8]) -> bool {
    let lower = hex(needle);
    let upper = lower.to_uppercase();
    let debug = format!("{needle:?}");
    // Inner part of the Debug list, so that a longer printed array containing it also counts.
    let debug_inner = debug.trim_start_matches('[').trim_end_matches(']');
    let has = |n: &[u8]| !n.is_empty() && hay.windows(n.len()).any(|w| w == n);
    has(needle) || has(lower.as_bytes()) || has(upper.as_bytes()) || has(debug_inner.as_bytes())
}

/// A deterministic pattern for `blocks` blocks starting at `lba`, tagged with `seed`.
pub fn pattern(seed: u64, lba: u64, blocks: u64, block_size: usize) -> Vec<u8> {
    let mut out = vec![0u8; blocks as usize * block_size];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let v = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(
            (lba * block_size as u64 / 8 + i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9),
        );
        chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
    }
    out
}

/// Runs one I/O on a fresh channel and polls it to completion.
pub fn run_io(bdev: &Arc<dyn Bdev>, io: BdevIo) -> BdevIo {
    let mut ch = bdev.open_channel(CoreId(0), 4).expect("channel");
    submit_and_wait(ch.as_mut(), io)
}

/// Submits `io` on `ch` and polls until it completes.
pub fn submit_and_wait(ch: &mut dyn nvseal::bdev::BdevChannel, io: BdevIo) -> BdevIo {
    let mut pending = Some(io);
    let mut out = None;
    while out.is_none() {
        if let Some(io) = pending.take() {
            if let Submit::Busy(io) = ch.submit(io) {
                pending = Some(io);
            }
        }
        ch.poll(&mut |io| out = Some(io));
        if out.is_none() {
            std::thread::yield_now();
        }
    }
    out.unwrap()
}

fn buf(bdev: &Arc<dyn Bdev>, len: usize) -> IoBuf {
    IoBuf::new(
        AlignedBuf::zeroed(len, bdev.buf_align().max(64)).unwrap(),
        len,
    )
}

/// Writes `data` (whole blocks) at `lba` through `ch`.
pub fn write_on(
    ch: &mut dyn nvseal::bdev::BdevChannel,
    bdev: &Arc<dyn Bdev>,
    lba: u64,
    data: &[u8],
) {
    let bs = bdev.block_size() as usize;
    let mut b = buf(bdev, data.len());
    b.as_mut_slice().copy_from_slice(data);
    let io = submit_and_wait(
        ch,
        BdevIo::new(IoType::Write, lba, (data.len() / bs) as u32, Some(b), 0),
    );
    assert_eq!(io.status, IoStatus::Success, "write at {lba}");
}

/// Reads `blocks` blocks at `lba` through `ch`.
pub fn read_on(
    ch: &mut dyn nvseal::bdev::BdevChannel,
    bdev: &Arc<dyn Bdev>,
    lba: u64,
    blocks: u32,
) -> Vec<u8> {
    let bs = bdev.block_size() as usize;
    let b = buf(bdev, blocks as usize * bs);
    let io = submit_and_wait(ch, BdevIo::new(IoType::Read, lba, blocks, Some(b), 0));
    assert_eq!(io.status, IoStatus::Success, "read at {lba}");
    io.buf.unwrap().as_slice().to_vec()
}

/// Writes `data` at `lba` on a fresh channel.
pub fn write_blocks(bdev: &Arc<dyn Bdev>, lba: u64, data: &[u8]) {
    let mut ch = bdev.open_channel(CoreId(0), 4).expect("channel");
    write_on(ch.as_mut(), bdev, lba, data);
}

/// Reads on a fresh channel.
pub fn read_blocks(bdev: &Arc<dyn Bdev>, lba: u64, blocks: u32) -> Vec<u8> {
    let mut ch = bdev.open_channel(CoreId(0), 4).expect("channel");
    read_on(ch.as_mut(), bdev, lba, blocks)
}

/// A RAM disk of `size_bytes` in `block_size` blocks (metadata region included by the caller).
pub fn malloc_dev(name: &str, size_bytes: u64, block_size: usize) -> Arc<dyn Bdev> {
    nvseal::bdev::malloc::open(&nvseal::bdev::malloc::MallocConfig {
        name: name.into(),
        num_blocks: None,
        size_bytes: Some(size_bytes),
        block_size: block_size as u32,
        hugepages: false,
    })
    .expect("malloc")
}

/// Header I/O on `dev`'s metadata region, as the key manager takes it.
pub fn header_io(dev: &Arc<dyn Bdev>) -> Box<dyn nvseal::keys::store::HeaderIo + Send> {
    Box::new(
        nvseal::keys::header_io::BdevHeaderIo::new(
            dev.clone(),
            nvseal::types::CoreId(0),
            nvseal::keys::header::METADATA_REGION_BYTES,
        )
        .expect("header I/O"),
    )
}

/// A KMS cluster configuration over `servers` with the certificates in `certs_dir`
/// (`client`: `client`, `wrong-client`, ...).
pub fn kms_config(
    certs_dir: &Path,
    alias: &str,
    servers: Vec<ServerAddr>,
    client: &str,
    response_timeout_ms: u64,
) -> KmsClusterConfig {
    KmsClusterConfig {
        alias: alias.to_owned(),
        servers,
        ca_file: certs_dir.join("ca.pem"),
        client_cert_file: certs_dir.join(format!("{client}.pem")),
        client_key_file: certs_dir.join(format!("{client}.key")),
        connect_timeout_ms: 10_000,
        response_timeout_ms,
    }
}

/// Waits (generously: a loaded CI machine) until the namespace is online or in error.
pub fn settle(m: &KeyManager, ns_id: &str) -> NamespaceStatus {
    m.wait_for(ns_id, Duration::from_secs(90), |s| {
        matches!(
            s,
            NamespaceKeyState::Online | NamespaceKeyState::Error { .. }
        )
    })
    .expect("namespace registered")
}

/// Like [`settle`], and asserts it came online.
pub fn online(m: &KeyManager, ns_id: &str) -> NamespaceStatus {
    let st = settle(m, ns_id);
    assert_eq!(st.state, NamespaceKeyState::Online, "{st:?}");
    st
}
