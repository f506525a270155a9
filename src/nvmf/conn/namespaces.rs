//! A [`Connection`]'s copy of its subsystem's namespace table and the bdev channels opened
//! for it: syncing it when the table generation moves, failing requests parked for a namespace
//! that went away, and draining the channels of removed namespaces.
//!
//! Runs on the connection's reactor (at Connect and inside [`Connection::poll`]). It exists as
//! its own file because namespace changes at run time are a control concern that the I/O path
//! (`exec`) only reads the result of.

use std::sync::Arc;

use super::{Chan, Connection};
use crate::nvme::Status;

impl Connection {
    /// Brings `ns_cache` and `channels` up to date with the subsystem's namespace table, on
    /// this connection's reactor: a removed or replaced namespace's channel moves to `retired`
    /// (its I/O in flight completes there), requests parked for it fail with Invalid
    /// Namespace, and a new namespace gets a channel. Runs at Connect and when the table
    /// generation moved; the only place the I/O path allocates for namespaces.
    pub(super) fn sync_namespaces(&mut self) {
        let Some(s) = self.subsys.clone() else { return };
        // Read the generation first: a change racing with this pass bumps it again, so the
        // next poll repeats the pass.
        let gen = s.ns_generation();
        let n = s.max_nsid() as usize;
        if self.ns_cache.len() < n {
            self.ns_cache.resize_with(n, || None);
        }
        if self.channels.len() < n {
            self.channels.resize_with(n, || None);
        }
        for i in 0..n {
            let cur = s.slot(i);
            let same = match (&cur, &self.ns_cache[i]) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if same {
                continue;
            }
            let old = self.ns_cache[i].take();
            // A shared channel stays with the poll group (this reference is dropped here): the
            // group polls it until its I/O, this queue's included, is back, and closes it once
            // no queue uses it.
            if let (Some(old), Some(Chan::Own(ch))) = (old, self.channels[i].take()) {
                self.retired.push((old, ch));
            }
            self.fail_parked(i);
            if let Some(ns) = cur {
                if ns.bdev.buf_align() > self.pool_align {
                    tracing::warn!(
                        bdev = ns.bdev.name(),
                        "bdev needs buffers aligned beyond this queue's pool; namespace not ready here"
                    );
                    self.ns_cache[i] = Some(ns);
                    continue;
                }
                let opened = match self.group_channels.as_ref() {
                    Some(g) => g.channel_for(&ns).map(Chan::Shared),
                    None => ns.bdev.open_channel(self.core, self.depth).map(Chan::Own),
                };
                match opened {
                    Ok(c) => self.channels[i] = Some(c),
                    Err(e) => {
                        tracing::warn!(bdev = ns.bdev.name(), error = %e, "cannot open bdev channel")
                    }
                }
                self.ns_cache[i] = Some(ns);
            }
        }
        self.ns_gen = gen;
    }

    /// Re-reads the namespace table if the subsystem's generation moved (one atomic load
    /// otherwise); true if it did. Called once per poll and after each socket read that brings
    /// commands, so a command sent after an RPC changed the table always sees the change.
    pub(super) fn refresh_namespaces(&mut self) -> bool {
        let moved = self
            .subsys
            .as_ref()
            .is_some_and(|s| s.ns_generation() != self.ns_gen);
        if moved {
            self.sync_namespaces();
        }
        moved
    }

    /// Fails requests parked (channel busy) for namespace slot `slot`, whose namespace is gone:
    /// they must not reach whatever namespace takes the slot next.
    fn fail_parked(&mut self, slot: usize) {
        for _ in 0..self.exec_queue.len() {
            let Some(idx) = self.exec_queue.pop_front() else {
                break;
            };
            let r = &mut self.reqs[idx];
            if r.ns_idx != slot {
                self.exec_queue.push_back(idx);
                continue;
            }
            if r.sub_pending == 0 {
                self.complete(idx, Status::INVALID_NAMESPACE);
            } else {
                // Dataset Management with ranges at the old channel: submit no more, complete
                // when those are back.
                r.sub_total = r.sub_next;
                if r.sub_status.is_success() {
                    r.sub_status = Status::INVALID_NAMESPACE;
                }
            }
        }
    }

    /// Polls the channels of removed namespaces; drops each (and its namespace reference, which
    /// [`Target::remove_namespace`] waits for) once nothing is in flight on it.
    pub(super) fn poll_retired(&mut self) -> usize {
        let mut work = 0;
        let mut i = 0;
        while i < self.retired.len() {
            let (ns, mut ch) = self.retired.swap_remove(i);
            work += ch.poll(&mut |io| self.io_done(io));
            if ch.in_flight() == 0 {
                drop(ch);
                drop(ns);
                work += 1;
            } else {
                self.retired.push((ns, ch));
                let last = self.retired.len() - 1;
                self.retired.swap(i, last);
                i += 1;
            }
        }
        work
    }
}
