//! SPDK's environment: DPDK's memory (hugepages, or no-huge mode with a given size) and, when a
//! PCIe controller is configured, its PCI bus. Started once per process, by the first
//! `spdk_nvme` bdev; it cannot be restarted or reconfigured while the process lives, so a later
//! bdev that needs more than the running environment gives (PCI when it was started without) is
//! refused with a message that says to restart.
//!
//! Threads: `spdk_env_init` runs on the thread that opens the bdev (a control thread at start-up
//! or the RPC thread). DPDK pins the thread that initialises it to its "main lcore"; we give it
//! the first reactor core (so its idle service threads land where nvseal already polls) and put
//! the calling thread's affinity back afterwards, so the control thread does not end up pinned
//! on a reactor's CPU. DPDK's own threads (interrupt handling, multi-process IPC) sleep unless a
//! PCI event arrives.
//!
//! Once SPDK's memory is up, buffers handed out for I/O ([`crate::sys::buf::AlignedBuf::for_io`])
//! come from it (`spdk_dma_zmalloc`): pinned memory with a known physical address, which a PCIe
//! drive can DMA to with no copy. What was allocated before (or once it is exhausted) is ordinary
//! memory, which the bdev checks per I/O and bounces through its own DMA buffer (docs/spdk.md).

use std::ffi::CString;
use std::sync::Mutex;

use super::ffi;
use super::SpdkEnvConfig;
use crate::types::CoreId;

/// What the running environment was started with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvInfo {
    pub hugepages: bool,
    pub mem_size_mib: u32,
    pub pci: bool,
    pub main_core: usize,
}

static ENV: Mutex<Option<EnvInfo>> = Mutex::new(None);

/// Starts SPDK's environment if it is not running; `pci`: a PCIe controller will be attached.
/// Errors are for the operator: what failed and what to check.
pub fn ensure(cfg: &SpdkEnvConfig, pci: bool, cores: &[CoreId]) -> Result<EnvInfo, String> {
    let mut g = ENV.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(info) = g.as_ref() {
        if pci && !info.pci {
            return Err("SPDK's environment was started without PCI (only fabrics controllers were configured then); restart nvseal to attach a PCIe controller".into());
        }
        return Ok(info.clone());
    }
    if cfg.mem_size_mib == 0 {
        return Err("spdk.mem_size_mib must be > 0".into());
    }
    if cfg.mem_size_mib > i32::MAX as u32 {
        return Err("spdk.mem_size_mib is too large".into());
    }
    if pci && !cfg.hugepages {
        return Err(
            "a PCIe controller needs spdk.hugepages: true (its DMA must reach pinned memory)"
                .into(),
        );
    }
    let main_core = cores.first().map(|c| c.0).unwrap_or(0);
    let name = CString::new("nvseal").expect("no NUL");
    let mask = CString::new(format!("[{main_core}]")).expect("no NUL");
    let hugedir = match &cfg.hugedir {
        Some(p) => Some(
            CString::new(p.as_os_str().as_encoded_bytes())
                .map_err(|_| "spdk.hugedir holds a NUL byte".to_string())?,
        ),
        None => None,
    };
    // DPDK logs its start at info level on stdout; keep it to warnings and errors.
    let context = CString::new("--log-level=lib.eal:warning").expect("no NUL");
    let mut opts = ffi::spdk_env_opts {
        opts_size: std::mem::size_of::<ffi::spdk_env_opts>(),
        ..Default::default()
    };
    // SAFETY: `opts` is a valid, writable spdk_env_opts whose opts_size is its own size, as
    // spdk_env_opts_init requires; it only writes fields within that size.
    unsafe { ffi::spdk_env_opts_init(&mut opts) };
    opts.name = name.as_ptr();
    opts.core_mask = mask.as_ptr();
    opts.mem_size = cfg.mem_size_mib as i32;
    opts.no_huge = !cfg.hugepages;
    opts.no_pci = !pci;
    opts.shm_id = -1;
    opts.env_context = context.as_ptr() as *mut std::ffi::c_void;
    if let Some(h) = &hugedir {
        opts.hugedir = h.as_ptr();
    }
    let before = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok();
    // SAFETY: `opts` was initialised by spdk_env_opts_init and every pointer in it (name, core
    // mask, hugedir, env_context) points to a CString that outlives the call; SPDK copies what
    // it keeps. The ENV mutex is held, so this runs at most once per process (SPDK forbids a
    // second initialisation without spdk_env_fini, which nvseal never calls).
    let rc = unsafe { ffi::spdk_env_init(&opts) };
    if let Some(set) = before {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
    if rc != 0 {
        return Err(format!(
            "SPDK environment failed to start ({}): {}",
            std::io::Error::from_raw_os_error(-rc),
            if cfg.hugepages {
                "SPDK and DPDK said why on standard error above; the usual causes are no hugepages \
                 reserved (/proc/sys/vm/nr_hugepages) or no hugetlbfs mounted (spdk.hugepages: \
                 false runs without them, fabrics controllers only), and an OpenSSL config file \
                 SPDK cannot load (set OPENSSL_CONF)"
            } else {
                "SPDK and DPDK said why on standard error above (an OpenSSL config file SPDK \
                 cannot load: set OPENSSL_CONF)"
            }
        ));
    }
    crate::sys::buf::set_io_allocator(&SPDK_DMA);
    let info = EnvInfo {
        hugepages: cfg.hugepages,
        mem_size_mib: cfg.mem_size_mib,
        pci,
        main_core,
    };
    tracing::info!(
        spdk = super::version(),
        hugepages = info.hugepages,
        mem_size_mib = info.mem_size_mib,
        pci = info.pci,
        main_core,
        "SPDK environment started"
    );
    *g = Some(info.clone());
    Ok(info)
}

/// Whether the environment is running.
pub fn running() -> bool {
    ENV.lock().map(|g| g.is_some()).unwrap_or(true)
}

/// I/O buffers from SPDK's DMA-able memory.
struct SpdkDma;

static SPDK_DMA: SpdkDma = SpdkDma;

impl crate::sys::buf::IoAllocator for SpdkDma {
    fn alloc_zeroed(&self, size: usize, align: usize) -> Option<*mut u8> {
        // SAFETY: the environment is running (this allocator is installed only after
        // spdk_env_init succeeded); size and align were checked by the caller (align a power of
        // two); the last argument must be NULL.
        let p = unsafe { ffi::spdk_dma_zmalloc(size, align, std::ptr::null_mut()) };
        (!p.is_null()).then_some(p.cast())
    }
    unsafe fn free(&self, ptr: *mut u8) {
        // SAFETY: the caller guarantees `ptr` came from `alloc_zeroed` above and is freed once.
        unsafe { ffi::spdk_dma_free(ptr.cast()) }
    }
}

/// `SPDK_VTOPHYS_ERROR` (all ones; bindgen reads the macro as an `int`).
const VTOPHYS_ERROR: u64 = u64::MAX;

/// Whether SPDK can DMA to `len` bytes at `ptr` (they are in memory it has registered, and
/// physically contiguous for all of `len`... or mapped through an IOMMU as one range).
pub fn dma_ok(ptr: *const u8, len: usize) -> bool {
    let mut size = len as u64;
    // SAFETY: spdk_vtophys only translates the address (it does not dereference it); `size`
    // is a valid out-parameter.
    let pa = unsafe { ffi::spdk_vtophys(ptr.cast(), &mut size) };
    pa != VTOPHYS_ERROR && size >= len as u64
}
