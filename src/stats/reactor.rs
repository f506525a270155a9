//! Per-namespace I/O stats kept by each reactor, and their collection by control threads.
//!
//! Ownership. Every reactor thread owns one table (a thread-local) of [`IoStats`], one entry per
//! (subsystem NQN, nsid) that a connection on that reactor has used. An entry is created (and
//! its histograms allocated) the first time a connection of the reactor completes an I/O for that
//! namespace; the connection keeps an `Rc` to the entry in its [`ConnStats`] cache, so recording
//! an I/O is a short linear search of that cache plus a `RefCell` borrow: no lock, no atomic, no
//! allocation. Because a connection records straight into its reactor's entry, nothing is lost
//! when the connection closes: dropping the cache only drops `Rc`s, the entries stay in the
//! table for the life of the reactor thread.
//!
//! Collection. A control thread sends every reactor a message (through its mailbox, see
//! [`collect`]); on the reactor, the message clones the table (allocates — off the data path, one
//! message per reactor per collection) and sends the copy back on a channel. The control thread
//! merges the copies with [`IoStats::merge`]. [`reset`] clears the table's counters in place, so
//! the connections' `Rc`s stay valid.
//!
//! A thread that is not a reactor (a test driving connections by hand) gets its own table too.

use super::{IoStats, OpClass};
use crate::reactor::{Mailboxes, ReactorError};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// One namespace's stats on one reactor, shared by the connections that use it.
pub type NsStatsHandle = Rc<RefCell<IoStats>>;

struct Entry {
    nqn: String,
    nsid: u32,
    stats: NsStatsHandle,
}

thread_local! {
    static TABLE: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
}

/// The calling reactor's entry for (`nqn`, `nsid`), created on first use (allocates then).
pub fn handle(nqn: &str, nsid: u32) -> NsStatsHandle {
    TABLE.with(|t| {
        let mut t = t.borrow_mut();
        if let Some(e) = t.iter().find(|e| e.nsid == nsid && e.nqn == nqn) {
            return e.stats.clone();
        }
        let stats = Rc::new(RefCell::new(IoStats::new()));
        t.push(Entry {
            nqn: nqn.to_string(),
            nsid,
            stats: stats.clone(),
        });
        stats
    })
}

/// A copy of one namespace's stats (from one reactor, or merged).
#[derive(Clone)]
pub struct NsSnapshot {
    pub nqn: String,
    pub nsid: u32,
    pub stats: IoStats,
}

/// Copies the calling reactor's table (control messages only: allocates).
pub fn snapshot() -> Vec<NsSnapshot> {
    TABLE.with(|t| {
        t.borrow()
            .iter()
            .map(|e| NsSnapshot {
                nqn: e.nqn.clone(),
                nsid: e.nsid,
                stats: e.stats.borrow().clone(),
            })
            .collect()
    })
}

/// Zeroes the calling reactor's counters and histograms (entries and handles stay).
pub fn reset() {
    TABLE.with(|t| {
        for e in t.borrow().iter() {
            e.stats.borrow_mut().reset();
        }
    })
}

/// A connection's cache of its reactor's entries, by nsid (a connection belongs to one
/// subsystem, so the nsid is enough). Lives in the connection, on its reactor.
#[derive(Default)]
pub struct ConnStats {
    by_nsid: Vec<(u32, NsStatsHandle)>,
}

impl ConnStats {
    /// Reserves room for `n` namespaces (at Connect), so the first I/Os do not grow the cache.
    pub fn with_capacity(n: usize) -> Self {
        ConnStats {
            by_nsid: Vec::with_capacity(n),
        }
    }

    /// The cached entry for `nsid`, if this connection has used it already. Never allocates.
    #[inline]
    pub fn get(&self, nsid: u32) -> Option<&NsStatsHandle> {
        self.by_nsid
            .iter()
            .find(|(n, _)| *n == nsid)
            .map(|(_, h)| h)
    }

    /// Adds (`nqn`, `nsid`) from the reactor's table to the cache (first use of a namespace on
    /// this connection: allocates). The caller checks that the namespace exists, so a host cannot
    /// grow the table with made-up nsids.
    pub fn attach(&mut self, nqn: &str, nsid: u32) -> &NsStatsHandle {
        if let Some(i) = self.by_nsid.iter().position(|(n, _)| *n == nsid) {
            return &self.by_nsid[i].1;
        }
        self.by_nsid.push((nsid, handle(nqn, nsid)));
        &self.by_nsid[self.by_nsid.len() - 1].1
    }

    /// Records one I/O into a cached entry; false when `nsid` is not cached (call
    /// [`attach`](Self::attach) first). Never allocates.
    #[inline]
    pub fn record(&self, nsid: u32, op: OpClass, bytes: u64, latency_ns: u64, ok: bool) -> bool {
        match self.get(nsid) {
            Some(h) => {
                h.borrow_mut().record(op, bytes, latency_ns, ok);
                true
            }
            None => false,
        }
    }
}

/// Errors collecting stats from the reactors.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error(transparent)]
    Reactor(#[from] ReactorError),
    #[error("reactor {0} did not answer within {1:?}")]
    Timeout(usize, Duration),
}

/// Asks every reactor for a copy of its table and merges them, per (nqn, nsid), sorted.
/// Control threads only: blocks up to `timeout` per reactor.
pub fn collect(mb: &Mailboxes, timeout: Duration) -> Result<Vec<NsSnapshot>, CollectError> {
    let mut merged: BTreeMap<(String, u32), IoStats> = BTreeMap::new();
    for i in 0..mb.len() {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<NsSnapshot>>(1);
        let deadline = Instant::now() + timeout;
        // A full mailbox is waited out (briefly) rather than reported: a collection is rare.
        loop {
            let tx = tx.clone();
            let m: crate::reactor::Msg = Box::new(move |_r: &mut crate::reactor::Reactor| {
                let _ = tx.send(snapshot());
            });
            match mb.send(i, m) {
                Ok(()) => break,
                Err(ReactorError::MailboxFull(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(ReactorError::MailboxFull(_)) => return Err(CollectError::Timeout(i, timeout)),
                Err(e) => return Err(e.into()),
            }
        }
        drop(tx);
        let left = deadline.saturating_duration_since(Instant::now());
        let part = rx.recv_timeout(left).map_err(|e| match e {
            crossbeam_channel::RecvTimeoutError::Timeout => CollectError::Timeout(i, timeout),
            crossbeam_channel::RecvTimeoutError::Disconnected => {
                CollectError::Reactor(ReactorError::Stopped(i))
            }
        })?;
        for s in part {
            match merged.get_mut(&(s.nqn.clone(), s.nsid)) {
                Some(m) => m.merge(&s.stats),
                None => {
                    merged.insert((s.nqn, s.nsid), s.stats);
                }
            }
        }
    }
    Ok(merged
        .into_iter()
        .map(|((nqn, nsid), stats)| NsSnapshot { nqn, nsid, stats })
        .collect())
}

/// Asks every reactor to zero its table. Control threads only.
pub fn reset_all(mb: &Mailboxes, timeout: Duration) -> Result<(), CollectError> {
    for i in 0..mb.len() {
        let (tx, rx) = crossbeam_channel::bounded::<()>(1);
        mb.send(
            i,
            Box::new(move |_r: &mut crate::reactor::Reactor| {
                reset();
                let _ = tx.send(());
            }),
        )?;
        rx.recv_timeout(timeout)
            .map_err(|_| CollectError::Timeout(i, timeout))?;
    }
    Ok(())
}

/// The op class of an NVM I/O opcode (Dataset Management counts as unmap); `None` for others.
pub fn op_class_of(opcode: u8) -> Option<OpClass> {
    use crate::nvme::io_op;
    match opcode {
        io_op::READ => Some(OpClass::Read),
        io_op::WRITE => Some(OpClass::Write),
        io_op::FLUSH => Some(OpClass::Flush),
        io_op::WRITE_ZEROES => Some(OpClass::WriteZeroes),
        io_op::DATASET_MANAGEMENT => Some(OpClass::Unmap),
        _ => None,
    }
}

/// Op classes an NVMe/TCP I/O queue records (admin commands are not per namespace).
pub const IO_OPS: [OpClass; 5] = [
    OpClass::Read,
    OpClass::Write,
    OpClass::Flush,
    OpClass::WriteZeroes,
    OpClass::Unmap,
];

/// A histogram in HdrHistogram's compressed V2 encoding (the one `HistogramLogReader` and the
/// other HdrHistogram implementations decode), base64: values are nanoseconds.
pub fn histogram_base64(h: &hdrhistogram::Histogram<u64>) -> String {
    use base64::Engine;
    use hdrhistogram::serialization::{Serializer, V2DeflateSerializer};
    let mut raw = Vec::new();
    match V2DeflateSerializer::new().serialize(h, &mut raw) {
        Ok(_) => base64::engine::general_purpose::STANDARD.encode(raw),
        // Serialising into a Vec cannot fail on I/O; report an empty string rather than panic.
        Err(e) => {
            tracing::warn!("histogram serialisation: {e:?}");
            String::new()
        }
    }
}

/// `stats.namespaces`: per namespace, per op class, counters, rates over `elapsed_s`,
/// percentiles (µs) and the mergeable histogram.
pub fn namespaces_json(all: &[NsSnapshot], elapsed_s: f64) -> serde_json::Value {
    let ns: Vec<serde_json::Value> = all
        .iter()
        .map(|s| {
            let mut ops = serde_json::Map::new();
            for op in IO_OPS {
                let mut v = serde_json::to_value(s.stats.summary(op, elapsed_s))
                    .unwrap_or(serde_json::Value::Null);
                if let Some(o) = v.as_object_mut() {
                    o.insert(
                        "histogram".into(),
                        histogram_base64(&s.stats.op(op).latency_ns).into(),
                    );
                }
                ops.insert(op.name().into(), v);
            }
            serde_json::json!({ "nqn": s.nqn, "nsid": s.nsid, "ops": ops })
        })
        .collect();
    serde_json::json!({
        "elapsed_s": elapsed_s,
        "histogram_encoding": "hdrhistogram-v2-deflate-base64",
        "histogram_unit": "ns",
        "namespaces": ns,
    })
}

/// `stats.prometheus`: the Prometheus text of every namespace, labelled `subnqn` and `nsid`.
pub fn prometheus_text(all: &[NsSnapshot]) -> String {
    let mut out = String::new();
    for s in all {
        // Label values: escape as the exposition format asks (NQNs are validated anyway).
        let nqn = s
            .nqn
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let nsid = s.nsid.to_string();
        super::prometheus::write_io_stats(
            &mut out,
            &[("subnqn", nqn.as_str()), ("nsid", nsid.as_str())],
            &s.stats,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reactor::{ReactorOptions, ReactorSet};
    use crate::types::CoreId;

    #[test]
    fn record_on_reactors_then_collect_and_merge() {
        let set = ReactorSet::start(
            &[CoreId(0), CoreId(1)],
            &ReactorOptions {
                pin: false,
                ..Default::default()
            },
        )
        .unwrap();
        // Two "connections" on each reactor; one of them closes after recording.
        for r in 0..2usize {
            set.call(r, move |_| {
                let mut a = ConnStats::with_capacity(2);
                assert!(
                    !a.record(1, OpClass::Read, 4096, 1000, true),
                    "not attached yet"
                );
                a.attach("nqn.a", 1);
                a.attach("nqn.a", 2);
                for i in 0..10u64 {
                    assert!(a.record(1, OpClass::Read, 4096, 1000 + i, true));
                }
                assert!(a.record(2, OpClass::Write, 512, 50_000, false));
                let b = {
                    let mut b = ConnStats::default();
                    b.attach("nqn.a", 1);
                    b
                };
                assert!(b.record(1, OpClass::Read, 4096, 2_000_000, true));
                drop(b); // closed first: its I/Os stay in the reactor's table
                drop(a);
            })
            .unwrap();
        }
        let mb = set.call(0, |r| r.mailboxes()).unwrap();
        let all = collect(&mb, Duration::from_secs(5)).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].nqn.as_str(), all[0].nsid), ("nqn.a", 1));
        let r = all[0].stats.op(OpClass::Read);
        assert_eq!((r.ios, r.bytes, r.errors), (22, 22 * 4096, 0));
        assert_eq!(r.latency_ns.len(), 22);
        assert!(r.latency_ns.max() >= 1_999_000);
        let w = all[1].stats.op(OpClass::Write);
        assert_eq!((w.ios, w.bytes, w.errors), (2, 1024, 2));
        reset_all(&mb, Duration::from_secs(5)).unwrap();
        let all = collect(&mb, Duration::from_secs(5)).unwrap();
        assert_eq!(all.len(), 2, "entries survive a reset");
        assert!(all.iter().all(|s| s.stats.total_ios() == 0));
        set.shutdown();
    }

    #[test]
    fn json_histogram_decodes_and_prometheus_labels() {
        let mut st = IoStats::new();
        for i in 0..100u64 {
            st.record(OpClass::Write, 4096, 10_000 + i * 100, true);
        }
        let all = vec![NsSnapshot {
            nqn: "nqn.x".into(),
            nsid: 3,
            stats: st,
        }];
        let v = namespaces_json(&all, 2.0);
        let w = &v["namespaces"][0]["ops"]["write"];
        assert_eq!(w["ios"], 100);
        assert_eq!(w["iops"], 50.0);
        assert!(
            w["latency_us"]["p50"].as_f64().unwrap() <= w["latency_us"]["p99"].as_f64().unwrap()
        );
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(w["histogram"].as_str().unwrap())
            .unwrap();
        let h: hdrhistogram::Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
            .deserialize(&mut raw.as_slice())
            .unwrap();
        assert_eq!(h.len(), 100);
        assert_eq!(v["namespaces"][0]["ops"]["read"]["ios"], 0);
        let text = prometheus_text(&all);
        assert!(
            text.contains("nvseal_ios_total{subnqn=\"nqn.x\",nsid=\"3\",op=\"write\"} 100"),
            "{text}"
        );
    }

    #[test]
    fn opcodes_map_to_classes() {
        assert_eq!(op_class_of(crate::nvme::io_op::READ), Some(OpClass::Read));
        assert_eq!(
            op_class_of(crate::nvme::io_op::DATASET_MANAGEMENT),
            Some(OpClass::Unmap)
        );
        assert_eq!(op_class_of(0x7f), None);
    }
}
