//! A controller attached through SPDK's NVMe driver, its namespace, and I/O queue pairs.
//!
//! Ownership and threads (docs/spdk.md has the picture):
//! * [`Controller`] is shared (`Arc`) by the bdev, each reactor's queue pair and the controller's
//!   admin thread. It is detached (`spdk_nvme_detach`) when the last of them lets go, so no queue
//!   pair outlives it.
//! * The admin thread (`spdk-admin-<bdev>`) is the only caller of the admin queue: it processes
//!   admin completions every [`ADMIN_POLL`] (keep-alive for fabrics controllers, asynchronous
//!   events), notices a failed controller and resets it in the background. For a PCIe
//!   controller it also asks SPDK, every [`REMOVAL_SCAN`], whether the device is still there
//!   (`spdk_nvme_scan_attached`: the kernel's uevents and DPDK's view of the bus); a removed
//!   device fails the controller for good (no reset can bring it back).
//! * An [`IoQpair`] is made on, and used only by, the reactor that owns the bdev channel
//!   (`!Send`). The one exception is a reset: the admin thread must disconnect and reconnect
//!   every queue pair while nothing else touches them. Each queue pair therefore has a
//!   [`QpairGate`]: the reactor marks itself *inside* around every SPDK call on its queue pair
//!   (and the completions those calls deliver), the admin thread *fences* the gate and waits
//!   until the reactor is outside. Both sides use sequentially consistent atomics (a Dekker
//!   handshake), so at any moment at most one thread uses the queue pair; a fenced reactor
//!   answers new I/O with an error instead of waiting.

use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::ffi;

/// How often the admin thread services the admin queue.
pub const ADMIN_POLL: Duration = Duration::from_millis(10);
/// First wait between reset attempts of a failed controller; doubles up to [`RESET_BACKOFF_MAX`].
const RESET_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RESET_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often the admin thread of a PCIe controller checks that its device is still there.
const REMOVAL_SCAN: Duration = Duration::from_millis(100);
/// How long a reset waits for a reactor to step out of its queue pair.
const FENCE_TIMEOUT: Duration = Duration::from_secs(5);

/// A controller's state as the bdev and RPC see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtrlrState {
    /// Attached and working.
    Online,
    /// Failed (target gone, transport error, device removed); I/O is answered with errors and a
    /// reset is tried in the background.
    Failed,
    /// A reset is in progress.
    Resetting,
}

impl CtrlrState {
    fn from_u8(v: u8) -> CtrlrState {
        match v {
            0 => CtrlrState::Online,
            2 => CtrlrState::Resetting,
            _ => CtrlrState::Failed,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            CtrlrState::Online => "online",
            CtrlrState::Failed => "failed",
            CtrlrState::Resetting => "resetting",
        }
    }
}

/// A transport ID as SPDK parsed it.
#[derive(Clone)]
pub struct TransportId {
    raw: ffi::spdk_nvme_transport_id,
    pcie: bool,
}

impl TransportId {
    /// Parses `s` (`trtype:TCP adrfam:IPv4 traddr:… trsvcid:… subnqn:…` or
    /// `trtype:PCIe traddr:0000:03:00.0`) with SPDK's own parser; the error says what is wrong.
    pub fn parse(s: &str) -> Result<TransportId, String> {
        let c = CString::new(s).map_err(|_| "transport ID holds a NUL byte".to_string())?;
        let mut raw = ffi::spdk_nvme_transport_id::default();
        // SAFETY: `raw` is a valid, writable transport ID and `c` a NUL-terminated string that
        // lives through the call; the parser only reads the string and writes `raw`.
        let rc = unsafe { ffi::spdk_nvme_transport_id_parse(&mut raw, c.as_ptr()) };
        if rc != 0 {
            return Err(format!(
                "malformed transport ID {s:?} ({}); expected e.g. \"trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420 subnqn:nqn.2024-01.io.example:ns\" or \"trtype:PCIe traddr:0000:03:00.0\"",
                std::io::Error::from_raw_os_error(-rc)
            ));
        }
        let trtype = field(s, "trtype").unwrap_or_default().to_ascii_lowercase();
        let pcie = trtype == "pcie";
        if !pcie && trtype != "tcp" && trtype != "rdma" {
            return Err(format!(
                "transport ID {s:?}: trtype must be PCIe, TCP or RDMA"
            ));
        }
        if !pcie && field(s, "subnqn").is_none() {
            return Err(format!(
                "transport ID {s:?}: a fabrics controller needs subnqn:<subsystem NQN>"
            ));
        }
        if field(s, "traddr").is_none() {
            return Err(format!("transport ID {s:?}: traddr is missing"));
        }
        Ok(TransportId { raw, pcie })
    }
    pub fn is_pcie(&self) -> bool {
        self.pcie
    }
}

/// The value of `key:` in a transport ID string (keys are case-insensitive, as SPDK reads them).
fn field<'a>(s: &'a str, key: &str) -> Option<&'a str> {
    s.split_whitespace().find_map(|kv| {
        let (k, v) = kv.split_once(':')?;
        (k.eq_ignore_ascii_case(key) && !v.is_empty()).then_some(v)
    })
}

/// Where a reactor stands with its queue pair (module docs).
pub struct QpairGate {
    inside: AtomicBool,
    fenced: AtomicBool,
    /// The queue pair, for the admin thread's reset (used only while fenced).
    qpair: AtomicPtr<ffi::spdk_nvme_qpair>,
}

impl QpairGate {
    /// The reactor's side: true if it may use the queue pair now (then it must call
    /// [`QpairGate::leave`] when done), false while a reset has it fenced.
    pub fn enter(&self) -> bool {
        self.inside.store(true, Ordering::SeqCst);
        if self.fenced.load(Ordering::SeqCst) {
            self.inside.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }
    pub fn leave(&self) {
        self.inside.store(false, Ordering::SeqCst);
    }
    /// The admin thread's side: fences the gate and waits for the reactor to leave. False on
    /// timeout (the gate is then unfenced again and the queue pair must not be touched).
    fn fence(&self, timeout: Duration) -> bool {
        self.fenced.store(true, Ordering::SeqCst);
        let start = Instant::now();
        while self.inside.load(Ordering::SeqCst) {
            if start.elapsed() > timeout {
                self.fenced.store(false, Ordering::SeqCst);
                return false;
            }
            std::thread::yield_now();
        }
        true
    }
    fn unfence(&self) {
        self.fenced.store(false, Ordering::SeqCst);
    }
}

/// An attached controller (module docs).
pub struct Controller {
    ptr: NonNull<ffi::spdk_nvme_ctrlr>,
    /// The bdev's name, for log lines.
    bdev: String,
    trid: String,
    pcie: bool,
    nsid: u32,
    /// The namespace handle; replaced after a reset (SPDK may invalidate the old one).
    ns: AtomicPtr<ffi::spdk_nvme_ns>,
    state: AtomicU8,
    /// Bumped by every successful reset.
    generation: AtomicU64,
    gates: Mutex<Vec<Arc<QpairGate>>>,
    queue_size: u32,
    /// The transport ID as SPDK parsed it (the removal scan names it).
    trid_raw: TransportId,
    /// Set by SPDK's remove callback when the PCIe device went away. Leaked on purpose (a few
    /// bytes per attach): the callback may run on any thread that probes PCIe, so its context
    /// must outlive this controller's detach.
    removed: &'static AtomicBool,
}

/// SPDK's remove callback: `ctx` is the controller's `removed` flag (never freed).
unsafe extern "C" fn on_remove(ctx: *mut std::ffi::c_void, _ctrlr: *mut ffi::spdk_nvme_ctrlr) {
    // SAFETY: `ctx` is the `&'static AtomicBool` registered in `Controller::attach`.
    let removed = unsafe { &*(ctx as *const AtomicBool) };
    removed.store(true, Ordering::Release);
}

// SAFETY: the controller handle is used from several threads only through SPDK calls that SPDK
// documents as safe from any thread (I/O queue pair allocation and free, namespace lookups,
// which take the controller's own lock) or that this module serialises itself: the admin queue
// and resets on the admin thread only, queue pairs behind their gates, detach in Drop once no
// other reference exists.
unsafe impl Send for Controller {}
// SAFETY: as for Send; shared references only reach the calls above and atomics.
unsafe impl Sync for Controller {}

/// The namespace's geometry and capabilities, read at attach.
#[derive(Clone, Copy, Debug)]
pub struct NsInfo {
    pub sector_size: u32,
    pub num_sectors: u64,
    pub flush: bool,
    pub write_zeroes: bool,
    pub deallocate: bool,
    pub max_io_bytes: u32,
}

impl Controller {
    /// Attaches the controller `trid` names and checks namespace `nsid`. Blocking (a fabrics
    /// connect, a PCIe controller's enable); control threads only.
    pub fn attach(
        bdev: &str,
        trid_str: &str,
        nsid: u32,
        queue_size: u32,
        hostnqn: Option<&str>,
    ) -> Result<(Arc<Controller>, NsInfo), String> {
        let trid = TransportId::parse(trid_str)?;
        let mut opts = ffi::spdk_nvme_ctrlr_opts::default();
        let size = std::mem::size_of::<ffi::spdk_nvme_ctrlr_opts>();
        // SAFETY: `opts` is a valid, writable options struct of `size` bytes.
        unsafe { ffi::spdk_nvme_ctrlr_get_default_ctrlr_opts(&mut opts, size) };
        if let Some(h) = hostnqn {
            let bytes = h.as_bytes();
            if bytes.is_empty() || bytes.len() >= opts.hostnqn.len() || bytes.contains(&0) {
                return Err(format!(
                    "hostnqn must be 1..{} bytes with no NUL",
                    opts.hostnqn.len() - 1
                ));
            }
            for (d, s) in opts.hostnqn.iter_mut().zip(bytes) {
                *d = *s as std::ffi::c_char;
            }
            opts.hostnqn[bytes.len()] = 0;
        }
        if queue_size > 0 {
            opts.io_queue_size = opts.io_queue_size.max(queue_size);
            opts.io_queue_requests = opts.io_queue_requests.max(queue_size * 2);
        }
        // SAFETY: `trid` and `opts` are valid and initialised, `size` is opts' size; SPDK copies
        // both. The environment is running (the bdev started it before calling attach).
        let raw = unsafe { ffi::spdk_nvme_connect(&trid.raw, &opts, size) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            if trid.pcie {
                format!("could not attach the PCIe controller {trid_str:?}: no such device, or it is not bound to vfio-pci/uio_pci_generic (see SPDK's messages above)")
            } else {
                format!("could not connect to {trid_str:?} (target down, wrong address or subsystem NQN, or this host NQN not allowed; see SPDK's messages above)")
            }
        })?;
        let ctrlr = Arc::new(Controller {
            ptr,
            bdev: bdev.to_string(),
            trid: trid_str.to_string(),
            pcie: trid.pcie,
            nsid,
            ns: AtomicPtr::new(std::ptr::null_mut()),
            state: AtomicU8::new(0),
            generation: AtomicU64::new(0),
            gates: Mutex::new(Vec::new()),
            queue_size,
            trid_raw: trid.clone(),
            removed: Box::leak(Box::new(AtomicBool::new(false))),
        });
        if ctrlr.pcie {
            // SAFETY: the controller is attached; the context is a 'static flag that outlives
            // it, and `on_remove` only stores into that flag.
            unsafe {
                ffi::spdk_nvme_ctrlr_set_remove_cb(
                    ctrlr.ptr.as_ptr(),
                    Some(on_remove),
                    ctrlr.removed as *const AtomicBool as *mut std::ffi::c_void,
                )
            };
        }
        // From here on dropping `ctrlr` detaches the controller.
        let info = ctrlr.lookup_ns()?;
        Ok((ctrlr, info))
    }

    /// Looks the namespace up (again, after a reset) and publishes its handle.
    fn lookup_ns(&self) -> Result<NsInfo, String> {
        // SAFETY: the controller is attached; get_ns returns NULL for an nsid it lacks.
        let ns = unsafe { ffi::spdk_nvme_ctrlr_get_ns(self.ptr.as_ptr(), self.nsid) };
        // SAFETY: `ns` is checked non-NULL first; is_active only reads it.
        if ns.is_null() || !unsafe { ffi::spdk_nvme_ns_is_active(ns) } {
            return Err(format!(
                "controller {:?} has no active namespace {}",
                self.trid, self.nsid
            ));
        }
        // SAFETY: `ns` is an active namespace of this attached controller; these only read it.
        let info = unsafe {
            let flags = ffi::spdk_nvme_ns_get_flags(ns);
            NsInfo {
                sector_size: ffi::spdk_nvme_ns_get_sector_size(ns),
                num_sectors: ffi::spdk_nvme_ns_get_num_sectors(ns),
                flush: flags & ffi::spdk_nvme_ns_flags_SPDK_NVME_NS_FLUSH_SUPPORTED != 0,
                write_zeroes: flags & ffi::spdk_nvme_ns_flags_SPDK_NVME_NS_WRITE_ZEROES_SUPPORTED
                    != 0,
                deallocate: flags & ffi::spdk_nvme_ns_flags_SPDK_NVME_NS_DEALLOCATE_SUPPORTED != 0,
                max_io_bytes: ffi::spdk_nvme_ns_get_max_io_xfer_size(ns),
            }
        };
        self.ns.store(ns, Ordering::Release);
        Ok(info)
    }

    pub fn state(&self) -> CtrlrState {
        CtrlrState::from_u8(self.state.load(Ordering::Acquire))
    }
    pub fn is_pcie(&self) -> bool {
        self.pcie
    }
    pub fn trid(&self) -> &str {
        &self.trid
    }
    /// Whether the PCIe device was removed (the controller then stays failed).
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }
    /// Successful resets so far.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
    pub(crate) fn ns_ptr(&self) -> *mut ffi::spdk_nvme_ns {
        self.ns.load(Ordering::Acquire)
    }

    /// Marks the controller failed (a reactor saw its queue pair fail); the admin thread resets
    /// it. Logs once per failure.
    pub fn mark_failed(&self, why: &str) {
        if self
            .state
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            tracing::error!(bdev = %self.bdev, trid = %self.trid, why,
                "spdk_nvme: controller failed; its namespace is offline (I/O fails) until a background reset reconnects it");
        }
    }

    /// Allocates an I/O queue pair for the calling reactor.
    pub fn alloc_qpair(self: &Arc<Self>) -> Result<IoQpair, String> {
        let mut opts = ffi::spdk_nvme_io_qpair_opts::default();
        let size = std::mem::size_of::<ffi::spdk_nvme_io_qpair_opts>();
        // SAFETY: the controller is attached and `opts` is a writable struct of `size` bytes.
        unsafe {
            ffi::spdk_nvme_ctrlr_get_default_io_qpair_opts(self.ptr.as_ptr(), &mut opts, size)
        };
        if self.queue_size > 0 {
            opts.io_queue_size = self.queue_size;
            opts.io_queue_requests = opts.io_queue_requests.max(self.queue_size * 2);
        }
        // Connect in the background (a fabrics Connect is a network round trip): commands
        // submitted meanwhile wait in SPDK's queue and go out once it is connected, so a reactor
        // never blocks here.
        opts.async_mode = true;
        // SAFETY: as above; allocation of I/O queue pairs is safe from any thread (SPDK takes
        // the controller lock). The queue pair is connected before it is returned.
        let q = unsafe { ffi::spdk_nvme_ctrlr_alloc_io_qpair(self.ptr.as_ptr(), &opts, size) };
        let q = NonNull::new(q).ok_or_else(|| {
            format!(
                "controller {:?}: no I/O queue pair (the controller's queue limit, or it is failed)",
                self.trid
            )
        })?;
        let gate = Arc::new(QpairGate {
            inside: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            qpair: AtomicPtr::new(q.as_ptr()),
        });
        self.gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(gate.clone());
        Ok(IoQpair {
            ptr: q,
            ctrlr: self.clone(),
            gate,
            _not_send: std::marker::PhantomData,
        })
    }

    /// One round of the admin thread: admin completions, failure detection, a reset when due.
    fn admin_round(&self, backoff: &mut Duration, next_try: &mut Instant, next_scan: &mut Instant) {
        if self.pcie && !self.is_removed() && Instant::now() >= *next_scan {
            *next_scan = Instant::now() + REMOVAL_SCAN;
            // SAFETY: a valid transport ID; SPDK takes its driver lock and, for a device that
            // is gone, fails the controller and calls `on_remove` (a store into a flag).
            unsafe { ffi::spdk_nvme_scan_attached(&self.trid_raw.raw) };
            if self.is_removed() {
                self.state.store(1, Ordering::Release);
                tracing::error!(bdev = %self.bdev, trid = %self.trid,
                    "spdk_nvme: the PCIe device was removed; its namespace is offline for good (I/O fails; a replacement drive needs nvseal restarted)");
            }
        }
        if self.is_removed() {
            // Nothing to reset: the device is gone. Completions of aborted I/O arrive on the
            // reactors' queue pairs.
            return;
        }
        // SAFETY: the admin thread is the only caller of the admin queue (module docs).
        let rc = unsafe { ffi::spdk_nvme_ctrlr_process_admin_completions(self.ptr.as_ptr()) };
        // SAFETY: a read of the controller's failed flag.
        let failed = rc < 0 || unsafe { ffi::spdk_nvme_ctrlr_is_failed(self.ptr.as_ptr()) };
        if failed && self.state() == CtrlrState::Online {
            self.mark_failed(if rc < 0 {
                "admin queue failed"
            } else {
                "controller reported failed"
            });
            *next_try = Instant::now();
        }
        if self.state() != CtrlrState::Online && Instant::now() >= *next_try {
            match self.reset() {
                Ok(()) => {
                    *backoff = RESET_BACKOFF_MIN;
                    tracing::warn!(bdev = %self.bdev, trid = %self.trid,
                        "spdk_nvme: controller reset; namespace back online");
                }
                Err(e) => {
                    tracing::warn!(bdev = %self.bdev, trid = %self.trid, error = %e,
                        retry_in_s = backoff.as_secs(), "spdk_nvme: reset failed; will retry");
                    *next_try = Instant::now() + *backoff;
                    *backoff = (*backoff * 2).min(RESET_BACKOFF_MAX);
                }
            }
        }
    }

    /// Resets the controller: fences every queue pair, disconnects them, resets, looks the
    /// namespace up again and reconnects them. The controller stays `Failed` if anything fails.
    fn reset(&self) -> Result<(), String> {
        self.state.store(2, Ordering::Release);
        let gates: Vec<Arc<QpairGate>> =
            self.gates.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut fenced = Vec::with_capacity(gates.len());
        let result = (|| {
            for g in &gates {
                if !g.fence(FENCE_TIMEOUT) {
                    return Err("a reactor did not release its queue pair".to_string());
                }
                fenced.push(g.clone());
                let q = g.qpair.load(Ordering::Acquire);
                if !q.is_null() {
                    // SAFETY: the gate is fenced and the reactor is outside it, so this thread
                    // alone uses the queue pair; it belongs to this controller. Aborted I/O
                    // completes through its callbacks here, into the channel's own lists, which
                    // the reactor reads only inside the gate.
                    unsafe { ffi::spdk_nvme_ctrlr_disconnect_io_qpair(q) };
                }
            }
            // SAFETY: the admin thread is the only user of the admin queue and every I/O queue
            // pair is fenced and disconnected: no other thread uses the controller.
            let rc = unsafe { ffi::spdk_nvme_ctrlr_reset(self.ptr.as_ptr()) };
            if rc != 0 {
                return Err(format!("spdk_nvme_ctrlr_reset: {rc}"));
            }
            self.lookup_ns()?;
            for g in &gates {
                let q = g.qpair.load(Ordering::Acquire);
                if q.is_null() {
                    continue;
                }
                // SAFETY: as for the disconnect above.
                let rc = unsafe { ffi::spdk_nvme_ctrlr_reconnect_io_qpair(q) };
                if rc != 0 {
                    return Err(format!("reconnecting an I/O queue pair: {rc}"));
                }
            }
            Ok(())
        })();
        match &result {
            Ok(()) => {
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.state.store(0, Ordering::Release);
            }
            Err(_) => self.state.store(1, Ordering::Release),
        }
        for g in fenced {
            g.unfence();
        }
        result
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        // SAFETY: this is the last reference: every queue pair (each holds an Arc) is freed and
        // the admin thread (which holds one too) has stopped; nothing uses the controller.
        let rc = unsafe { ffi::spdk_nvme_detach(self.ptr.as_ptr()) };
        if rc != 0 {
            tracing::warn!(bdev = %self.bdev, trid = %self.trid, rc, "spdk_nvme_detach failed");
        }
    }
}

/// The admin thread of one controller; stopped and joined on drop.
pub struct AdminThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl AdminThread {
    pub fn start(ctrlr: Arc<Controller>) -> Result<AdminThread, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let name = format!("spdk-admin-{}", ctrlr.bdev);
        let handle = std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
                let mut backoff = RESET_BACKOFF_MIN;
                let mut next_try = Instant::now();
                let mut next_scan = Instant::now();
                while !s.load(Ordering::Acquire) {
                    ctrlr.admin_round(&mut backoff, &mut next_try, &mut next_scan);
                    std::thread::sleep(ADMIN_POLL);
                }
            })
            .map_err(|e| format!("admin thread: {e}"))?;
        Ok(AdminThread {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for AdminThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// An I/O queue pair owned by one reactor (`!Send`), freed on drop.
pub struct IoQpair {
    ptr: NonNull<ffi::spdk_nvme_qpair>,
    ctrlr: Arc<Controller>,
    gate: Arc<QpairGate>,
    _not_send: std::marker::PhantomData<*mut ()>,
}

impl IoQpair {
    pub fn raw(&self) -> *mut ffi::spdk_nvme_qpair {
        self.ptr.as_ptr()
    }
    pub fn ctrlr(&self) -> &Arc<Controller> {
        &self.ctrlr
    }
    pub fn gate(&self) -> &QpairGate {
        &self.gate
    }
}

impl Drop for IoQpair {
    fn drop(&mut self) {
        // Unregister first so no reset picks the queue pair up again, then wait out a reset
        // that may be using it right now.
        self.ctrlr
            .gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|g| !Arc::ptr_eq(g, &self.gate));
        while !self.gate.enter() {
            std::thread::yield_now();
        }
        self.gate
            .qpair
            .store(std::ptr::null_mut(), Ordering::Release);
        // SAFETY: the queue pair belongs to this controller, is used by no other thread (the
        // gate is entered and no reset can reach it any more), and is freed once. Outstanding
        // I/O completes (aborted) through its callbacks during the free; the owner has already
        // drained or abandoned its slots (see the channel's Drop).
        let rc = unsafe { ffi::spdk_nvme_ctrlr_free_io_qpair(self.ptr.as_ptr()) };
        self.gate.leave();
        if rc != 0 {
            tracing::warn!(bdev = %self.ctrlr.bdev, rc, "spdk_nvme: freeing an I/O queue pair failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_ids_are_checked_before_anything_is_attached() {
        let tcp = "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420 subnqn:nqn.2026-12.io.x:a";
        let t = TransportId::parse(tcp).expect("a full TCP transport ID");
        assert!(!t.is_pcie());
        assert!(TransportId::parse("trtype:PCIe traddr:0000:03:00.0")
            .expect("a PCIe transport ID")
            .is_pcie());
        for (bad, why) in [
            (
                "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420",
                "subnqn",
            ),
            ("trtype:Bogus traddr:x", "trtype must be"),
            ("trtype:PCIe", "traddr"),
            ("nonsense", "malformed"),
            ("trtype:TCP\0 traddr:1", "NUL"),
        ] {
            let e = TransportId::parse(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_fenced_gate_keeps_the_reactor_out_and_waits_for_it_to_leave() {
        let g = Arc::new(QpairGate {
            inside: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            qpair: AtomicPtr::new(std::ptr::null_mut()),
        });
        assert!(g.enter());
        // The reactor is inside: a fence times out (and is lifted again).
        assert!(!g.fence(Duration::from_millis(20)));
        assert!(!g.fenced.load(Ordering::SeqCst));
        g.leave();
        assert!(g.fence(Duration::from_millis(20)));
        assert!(!g.enter(), "a fenced gate lets nobody in");
        g.unfence();
        assert!(g.enter());
        g.leave();
    }
}
