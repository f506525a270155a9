//! Fabrics (Connect, Property Get/Set) and admin command handlers of a target [`Connection`]:
//! Identify, Get Log Page, Set/Get Features, Keep Alive, Asynchronous Event Request, Abort,
//! Format NVM and Sanitize (crypto erase, run by [`crate::nvmf::erase`]'s thread).
//! This file stays whole (about 1,100 lines): it is the one dispatch of the admin command set,
//! each handler a short function over the same connection state.
//!
//! Runs on the reactor that owns the connection, on the admin path only: here taking the
//! controller's `Mutex` and allocating scratch for a log page is fine; the I/O path never comes
//! here (except for Connect, once per queue).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::nvme::identify::{self, ControllerType, IdentifyController, IDENTIFY_SIZE};
use crate::nvme::log::{self as nlog, DiscoveryEntry};
use crate::nvme::{admin_op, cns, connect, fctype, feature, log_id, prop, sgl, Status};
use crate::nvmf::config::{is_valid_nqn, DISCOVERY_NQN};
use crate::nvmf::conn::{Action, Connection, ReqState};
use crate::nvmf::erase::{Done, Job, JobKind};
use crate::nvmf::target::{
    Controller, FeatureValues, SlotRefusal, SubsystemKind, ERROR_LOG_ENTRIES, MAX_AERS,
};

/// Firmware revision reported in Identify Controller.
const FIRMWARE: &str = env!("CARGO_PKG_VERSION");
/// Byte offset of the Connect command's KATO (CDW12) in the SQE, for Connect Invalid
/// Parameters.
const SQE_KATO_OFF: usize = 48;
/// CAP.TO: worst-case time to become ready, in 500 ms units (we are ready at once; 2 s of slack).
const CAP_TIMEOUT_500MS: u8 = 4;

impl Connection {
    /// Copies `data` into request `idx`'s buffer (at most the host's SGL length) for C2HData.
    fn reply_data(&mut self, idx: usize, data: &[u8]) -> Result<(), Status> {
        let sgl_desc = self.reqs[idx].sqe.sgl;
        if sgl_desc.len == 0 {
            return Ok(());
        }
        if sgl_desc.type_byte != sgl::TRANSPORT_DATA_BLOCK {
            return Err(Status::SGL_TYPE_INVALID);
        }
        let len = data.len().min(sgl_desc.len as usize);
        if !self.take_buf(idx, len, true) {
            return Err(Status::INVALID_FIELD);
        }
        if let Some(b) = self.reqs[idx].buf.as_mut() {
            b.as_mut_slice().copy_from_slice(&data[..len]);
        }
        self.reqs[idx].c2h = true;
        Ok(())
    }

    pub(super) fn fabrics_cmd(&mut self, idx: usize) -> Action {
        let sqe = self.reqs[idx].sqe;
        let r = match sqe.fctype() {
            fctype::CONNECT => self.connect(idx),
            fctype::PROPERTY_GET | fctype::PROPERTY_SET if self.ctrl.is_none() => {
                Err(Status::COMMAND_SEQUENCE_ERROR)
            }
            // Properties belong to the admin queue.
            fctype::PROPERTY_GET | fctype::PROPERTY_SET if self.qid != 0 => {
                Err(Status::INVALID_FIELD)
            }
            fctype::PROPERTY_GET => self.property_get(idx),
            fctype::PROPERTY_SET => self.property_set(idx),
            _ => Err(Status::INVALID_OPCODE),
        };
        Action::Complete(r.err().unwrap_or(Status::SUCCESS))
    }

    /// Fabrics Connect. Every refusal is logged with its reason (rate-limited target-wide, so
    /// a flood of bad Connects costs a few log lines a second); what the host sees is only the
    /// status and, for Connect Invalid Parameters, the field it points at.
    fn connect(&mut self, idx: usize) -> Result<(), Status> {
        let mut who = ConnectWho::default();
        let Err(r) = self.try_connect(idx, &mut who) else {
            return Ok(());
        };
        if let Some((in_data, off)) = r.param {
            self.reqs[idx].cqe.dw0 = connect::invalid_param_dw0(in_data, off);
        }
        if let Some(suppressed) = self.target.refusal_log().admit() {
            let listener = self.target.port_addr(self.port);
            tracing::warn!(
                peer = ?self.peer,
                ?listener,
                port = %self.port,
                qid = who.qid,
                subnqn = ?who.subnqn,
                hostnqn = ?who.hostnqn,
                status = ?r.status,
                reason = r.reason,
                suppressed_before = suppressed,
                "Connect refused"
            );
        }
        Err(r.status)
    }

    fn try_connect(&mut self, idx: usize, who: &mut ConnectWho) -> Result<(), Refusal> {
        if self.ctrl.is_some() {
            return Err(Refusal::status(
                Status::COMMAND_SEQUENCE_ERROR,
                "the queue is already connected",
            ));
        }
        let sqe = self.reqs[idx].sqe;
        let cmd = connect::ConnectCmd::from_sqe(&sqe);
        who.qid = cmd.qid;
        let mut data = [0u8; connect::DATA_SIZE];
        match self.reqs[idx].buf.as_ref() {
            Some(b) if b.len() == connect::DATA_SIZE => data.copy_from_slice(b.as_slice()),
            _ => {
                return Err(Refusal::status(
                    Status::DATA_SGL_LENGTH_INVALID,
                    "Connect data is not 1024 bytes",
                ))
            }
        }
        if cmd.recfmt != 0 {
            return Err(Refusal::status(
                Status::CONNECT_INCOMPATIBLE_FORMAT,
                "RECFMT is not 0",
            ));
        }
        let field = |off: usize| &data[off..off + connect::NQN_FIELD_LEN];
        let subnqn = parse_nqn_field(field(connect::SUBNQN_OFF))
            .map_err(|why| Refusal::param(true, connect::SUBNQN_OFF, why))?;
        who.subnqn = subnqn.to_string();
        let hostnqn = parse_nqn_field(field(connect::HOSTNQN_OFF))
            .map_err(|why| Refusal::param(true, connect::HOSTNQN_OFF, why))?;
        who.hostnqn = hostnqn.to_string();
        // An empty HOSTNQN (SPDK's tools send one unless told otherwise) is a host like any
        // other: admitted only where any host is. Anything else must be an NQN.
        if !hostnqn.is_empty() && !is_valid_nqn(hostnqn) {
            return Err(Refusal::param(
                true,
                connect::HOSTNQN_OFF,
                "HOSTNQN is not an NQN",
            ));
        }
        let cntlid = u16::from_le_bytes([data[connect::CNTLID_OFF], data[connect::CNTLID_OFF + 1]]);
        let mut hostid = [0u8; 16];
        hostid.copy_from_slice(&data[connect::HOSTID_OFF..connect::HOSTID_OFF + 16]);
        let Some(subsys) = self.target.subsystem(subnqn).cloned() else {
            return Err(Refusal::param(
                true,
                connect::SUBNQN_OFF,
                "no such subsystem",
            ));
        };
        // Not linked to this listener: to the host exactly like an unknown NQN.
        if !subsys.serves(self.port) {
            return Err(Refusal::param(
                true,
                connect::SUBNQN_OFF,
                "subsystem is not served on this listener",
            ));
        }
        if !subsys.host_allowed(hostnqn) {
            return Err(Refusal::status(
                Status::CONNECT_INVALID_HOST,
                if hostnqn.is_empty() {
                    "empty HOSTNQN and the subsystem does not allow any host"
                } else {
                    "host not in allowed_hosts"
                },
            ));
        }
        let l = self.target.limits;
        let max_depth = if cmd.qid == 0 {
            l.max_admin_queue_depth
        } else {
            l.max_queue_depth
        };
        if cmd.sqsize == 0 || u32::from(cmd.sqsize) + 1 > u32::from(max_depth) {
            return Err(Refusal::param(
                false,
                usize::from(connect::SQE_SQSIZE_OFF),
                "SQSIZE is 0 or deeper than the queue limit",
            ));
        }
        let depth = usize::from(cmd.sqsize) + 1;
        if cmd.qid == 0 {
            if cntlid != connect::CNTLID_DYNAMIC {
                return Err(Refusal::param(
                    true,
                    connect::CNTLID_OFF,
                    "admin queue CNTLID is not FFFFh (dynamic controller model)",
                ));
            }
            // A discovery controller without keep alive would live forever if the host vanished:
            // KATO 0 gets `discovery_kato_ms` there; `min_kato_ms` applies to every controller
            // (`Limits::effective_kato_ms`, docs/nvmf.md).
            let discovery = subsys.kind == SubsystemKind::Discovery;
            let kato_ms = l
                .effective_kato_ms(discovery, cmd.kato_ms)
                .map_err(|why| Refusal::param(false, SQE_KATO_OFF, why))?;
            self.claim_queue_slot(hostnqn)?;
            let Some(ctrl) =
                self.target
                    .create_controller(Arc::clone(&subsys), hostnqn, hostid, kato_ms)
            else {
                self.release_queue_slot();
                return Err(Refusal::status(
                    Status::CONNECT_CONTROLLER_BUSY,
                    "every controller id is in use",
                ));
            };
            self.subsys = Some(subsys);
            self.qid = 0;
            self.sqhd_disabled = Self::sqhd_disabled_flag(cmd.cattr);
            if let Err(s) = self.setup_queue(depth, false) {
                ctrl.kill();
                self.target.remove_controller(ctrl.cntlid);
                self.release_queue_slot();
                return Err(Refusal::status(s, "could not set the queue up"));
            }
            self.ka_deadline = kato_deadline(kato_ms);
            self.reqs[idx].cqe.dw0 = u32::from(ctrl.cntlid);
            // Any host may connect to discovery, again and again: rate-limited like refusals.
            if let Some(suppressed) = self.target.peer_log().admit() {
                tracing::info!(cntlid = ctrl.cntlid, %subnqn, %hostnqn, peer = ?self.peer, port = %self.port, kato_ms, requested_kato_ms = cmd.kato_ms, suppressed_before = suppressed, "admin queue connected");
            }
            self.connect_deadline = None;
            self.ctrl = Some(ctrl);
        } else {
            if subsys.kind == SubsystemKind::Discovery {
                return Err(Refusal::param(
                    false,
                    usize::from(connect::SQE_QID_OFF),
                    "I/O queue to the discovery subsystem",
                ));
            }
            let Some(ctrl) = self.target.find_controller(cntlid) else {
                return Err(Refusal::param(
                    true,
                    connect::CNTLID_OFF,
                    "no live controller with this CNTLID",
                ));
            };
            if !Arc::ptr_eq(&ctrl.subsys, &subsys) || ctrl.hostnqn != hostnqn {
                return Err(Refusal::param(
                    true,
                    connect::CNTLID_OFF,
                    "the controller belongs to another subsystem or host",
                ));
            }
            self.claim_queue_slot(hostnqn)?;
            {
                let mut a = ctrl.admin();
                // Checked under the admin lock, which a controller reset also takes: a queue
                // either sees the reset (not ready: refused) or joins the generation the reset
                // then retires (it closes on its first poll).
                if ctrl.csts.load(Ordering::Acquire) & prop::CSTS_RDY == 0 {
                    drop(a);
                    self.release_queue_slot();
                    return Err(Refusal::status(
                        Status::COMMAND_SEQUENCE_ERROR,
                        "the controller is not enabled (CSTS.RDY = 0)",
                    ));
                }
                let granted = a.io_queues_granted;
                let taken = a.io_qids.get(usize::from(cmd.qid)).copied().unwrap_or(true);
                if cmd.qid > granted || taken {
                    drop(a);
                    self.release_queue_slot();
                    return Err(Refusal::param(
                        false,
                        usize::from(connect::SQE_QID_OFF),
                        "QID above the granted queues or already connected",
                    ));
                }
                if let Some(q) = a.io_qids.get_mut(usize::from(cmd.qid)) {
                    *q = true;
                }
                a.queue_stats.push(Arc::clone(&self.stats));
                self.io_gen = ctrl.io_generation();
            }
            self.subsys = Some(subsys);
            self.qid = cmd.qid;
            self.sqhd_disabled = Self::sqhd_disabled_flag(cmd.cattr);
            self.connect_deadline = None;
            self.ctrl = Some(Arc::clone(&ctrl));
            if let Err(s) = self.setup_queue(depth, true) {
                self.ctrl = None;
                let mut a = ctrl.admin();
                if ctrl.io_generation() == self.io_gen {
                    if let Some(q) = a.io_qids.get_mut(usize::from(cmd.qid)) {
                        *q = false;
                    }
                }
                let me = Arc::as_ptr(&self.stats);
                a.queue_stats.retain(|q| Arc::as_ptr(q) != me);
                drop(a);
                self.release_queue_slot();
                return Err(Refusal::status(s, "could not set the queue up"));
            }
            self.reqs[idx].cqe.dw0 = u32::from(ctrl.cntlid);
            tracing::debug!(
                cntlid = ctrl.cntlid,
                qid = cmd.qid,
                depth,
                "I/O queue connected"
            );
        }
        Ok(())
    }

    /// Trades this socket's pre-Connect slot for a connection slot held by `hostnqn`
    /// (`max_connections`, `max_queues_per_host`); Controller Busy (the host may retry) if
    /// none is free.
    fn claim_queue_slot(&mut self, hostnqn: &str) -> Result<(), Refusal> {
        debug_assert!(self.connected_as.is_none());
        self.target.promote_socket(hostnqn).map_err(|r| {
            Refusal::status(
                Status::CONNECT_CONTROLLER_BUSY,
                match r {
                    SlotRefusal::PerHost(_) => {
                        "max_queues_per_host reached: the host holds its most queue pairs"
                    }
                    _ => "max_connections reached: every connection slot is taken",
                },
            )
        })?;
        self.connected_as = Some(hostnqn.to_string());
        Ok(())
    }

    /// Undoes [`Connection::claim_queue_slot`] when the Connect fails after it.
    fn release_queue_slot(&mut self) {
        if let Some(h) = self.connected_as.take() {
            self.target.demote_socket(&h);
        }
    }

    fn property_get(&mut self, idx: usize) -> Result<(), Status> {
        let sqe = self.reqs[idx].sqe;
        let size8 = sqe.cdw10 & 0b111 == 1;
        let ofst = sqe.cdw11;
        let Some(c) = self.ctrl.as_ref() else {
            return Err(Status::COMMAND_SEQUENCE_ERROR);
        };
        let l = self.target.limits;
        let v: u64 = match (ofst, size8) {
            (prop::CAP, true) => prop::cap(l.max_queue_depth - 1, CAP_TIMEOUT_500MS),
            (prop::VS, false) => u64::from(prop::VS_1_4),
            (prop::CC, false) => u64::from(c.cc.load(Ordering::Acquire)),
            (prop::CSTS, false) => u64::from(c.csts.load(Ordering::Acquire)),
            _ => return Err(Status::INVALID_FIELD),
        };
        let r = &mut self.reqs[idx];
        r.cqe.dw0 = v as u32;
        r.cqe.dw1 = (v >> 32) as u32;
        Ok(())
    }

    fn property_set(&mut self, idx: usize) -> Result<(), Status> {
        let sqe = self.reqs[idx].sqe;
        let size8 = sqe.cdw10 & 0b111 == 1;
        let Some(c) = self.ctrl.clone() else {
            return Err(Status::COMMAND_SEQUENCE_ERROR);
        };
        if sqe.cdw11 != prop::CC || size8 {
            return Err(Status::INVALID_FIELD);
        }
        let new = sqe.cdw12;
        let old = c.cc.swap(new, Ordering::AcqRel);
        let mut csts = c.csts.load(Ordering::Acquire);
        if new & prop::CC_EN != 0 && old & prop::CC_EN == 0 {
            let iosqes = (new >> prop::CC_IOSQES_SHIFT) & 0xf;
            let iocqes = (new >> prop::CC_IOCQES_SHIFT) & 0xf;
            if c.subsys.kind == SubsystemKind::Nvm && (iosqes != 6 || iocqes != 4) {
                csts |= prop::CSTS_CFS;
            } else {
                csts |= prop::CSTS_RDY;
            }
        }
        let reset = new & prop::CC_EN == 0 && old & prop::CC_EN != 0;
        if reset {
            // Controller reset: not ready, shutdown status cleared.
            csts &= !(prop::CSTS_RDY | prop::CSTS_SHST_MASK | prop::CSTS_CFS);
        }
        let shutdown = new & prop::CC_SHN_MASK != 0 && old & prop::CC_SHN_MASK == 0;
        if shutdown {
            // The backends may hold acknowledged writes in volatile caches: SHST says
            // "occurring" until every namespace is flushed (`Connection::poll_shutdown`).
            csts = (csts & !prop::CSTS_SHST_MASK) | prop::CSTS_SHST_OCCURRING;
        }
        c.csts.store(csts, Ordering::Release);
        if reset {
            self.controller_reset(&c);
        }
        if shutdown {
            self.start_shutdown_flush();
        }
        Ok(())
    }

    /// The rest of a controller reset (CC.EN 1 to 0), after CSTS.RDY went 0: the I/O queues
    /// are deleted (each I/O queue connection sees the new generation, refuses what it still
    /// receives and closes; their queue ids are free again at once) and the Asynchronous Event
    /// Requests held here are aborted, as a reset aborts every outstanding command. The admin
    /// queue itself stays connected: over Fabrics it is the host's way to enable again.
    fn controller_reset(&mut self, c: &Controller) {
        let queues = c.reset_io_queues();
        for idx in std::mem::take(&mut self.aers) {
            self.complete(idx, Status::SQ_DELETED);
        }
        // A Format NVM still on the erase thread is answered now, as the reset aborts it; the
        // erase itself runs to its end (its outcome is in the log and the audit trail).
        for (idx, _) in std::mem::take(&mut self.erase_wait) {
            self.complete(idx, Status::SQ_DELETED);
        }
        if let Some(suppressed) = self.target.peer_log().admit() {
            tracing::info!(
                cntlid = c.cntlid,
                peer = ?self.peer,
                io_queues = queues,
                suppressed_before = suppressed,
                "controller reset (CC.EN cleared): I/O queues deleted"
            );
        }
    }

    pub(super) fn admin_cmd(&mut self, idx: usize) -> Action {
        let sqe = self.reqs[idx].sqe;
        let Some(c) = self.ctrl.clone() else {
            return Action::Complete(Status::COMMAND_SEQUENCE_ERROR);
        };
        if c.cc.load(Ordering::Acquire) & prop::CC_EN == 0 {
            return Action::Complete(Status::COMMAND_SEQUENCE_ERROR);
        }
        let r = match sqe.opcode {
            admin_op::IDENTIFY => self.identify(idx),
            admin_op::GET_LOG_PAGE => self.get_log_page(idx),
            admin_op::SET_FEATURES => self.features(idx, true),
            admin_op::GET_FEATURES => self.features(idx, false),
            admin_op::KEEP_ALIVE => {
                self.ka_deadline = kato_deadline(c.kato_ms.load(Ordering::Acquire));
                Ok(())
            }
            admin_op::ASYNC_EVENT_REQUEST => return self.async_event_request(idx),
            admin_op::ABORT => self.abort(idx),
            admin_op::FORMAT_NVM => return self.format_nvm(idx),
            admin_op::SANITIZE => self.sanitize(idx),
            _ => Err(Status::INVALID_OPCODE),
        };
        Action::Complete(r.err().unwrap_or(Status::SUCCESS))
    }

    fn identify(&mut self, idx: usize) -> Result<(), Status> {
        let sqe = self.reqs[idx].sqe;
        let Some(c) = self.ctrl.clone() else {
            return Err(Status::COMMAND_SEQUENCE_ERROR);
        };
        let s = &c.subsys;
        let mut out = [0u8; IDENTIFY_SIZE];
        let cns_v = (sqe.cdw10 & 0xff) as u8;
        let l = self.target.limits;
        match (cns_v, s.kind) {
            (cns::CONTROLLER, kind) => {
                let namespaces = s.namespaces();
                let all = |t| namespaces.iter().all(|n| n.supports(t));
                let mut oncs = 0;
                if all(crate::bdev::IoType::WriteZeroes) {
                    oncs |= identify::ONCS_WRITE_ZEROES;
                }
                oncs |= identify::ONCS_DSM;
                let nvm = kind == SubsystemKind::Nvm;
                // Crypto erase: Format NVM offers it if some namespace can be crypto-erased
                // (the others refuse SES = 2); Sanitize only if every one can, since it erases
                // the whole subsystem (docs/lifecycle.md §5).
                let erasable = namespaces
                    .iter()
                    .filter(|n| self.target.erase().can_erase(n))
                    .count();
                let mut fna = identify::FNA_NO_BROADCAST_FORMAT;
                if erasable > 0 {
                    fna |= identify::FNA_CRYPTO_ERASE;
                }
                let sanicap = if erasable > 0 && erasable == namespaces.len() {
                    identify::SANICAP_CRYPTO_ERASE
                } else {
                    0
                };
                IdentifyController {
                    serial: &s.serial,
                    model: &s.model,
                    firmware: FIRMWARE,
                    cntlid: c.cntlid,
                    ver: prop::VS_1_4,
                    ctrl_type: if kind == SubsystemKind::Discovery {
                        ControllerType::Discovery
                    } else {
                        ControllerType::Io
                    },
                    mdts: l.mdts(),
                    acl: 3,
                    aerl: (MAX_AERS - 1) as u8,
                    elpe: (ERROR_LOG_ENTRIES - 1) as u8,
                    kas: 1,
                    maxcmd: l.max_queue_depth,
                    nn: s.max_nsid(),
                    oncs: if kind == SubsystemKind::Discovery {
                        0
                    } else {
                        oncs
                    },
                    oacs: if nvm { identify::OACS_FORMAT_NVM } else { 0 },
                    fna: if nvm { fna } else { 0 },
                    sanicap: if nvm { sanicap } else { 0 },
                    // Always: a namespace added later (namespace.create) may sit on a backend
                    // with a volatile cache, and a host decides at Identify whether to send
                    // Flush and FUA at all. Flush is a no-op success where nothing is cached.
                    vwc: kind != SubsystemKind::Discovery,
                    oaes: if kind == SubsystemKind::Discovery {
                        0
                    } else {
                        identify::OAES_NS_ATTR
                    },
                    ctratt: identify::CTRATT_HOST_ID_128,
                    subnqn: &s.nqn,
                    ioccsz_bytes: 64 + l.in_capsule_data_size,
                    iorcsz_bytes: 16,
                }
                .build(&mut out);
            }
            (cns::NAMESPACE, SubsystemKind::Nvm) => {
                match s.namespace(sqe.nsid) {
                    // An inactive (offline) namespace reads as zeroes, per the spec.
                    Some(ns) if ns.is_online() => {
                        identify::build_namespace(&mut out, ns.num_blocks, ns.block_size, &ns.nguid)
                    }
                    Some(_) => {}
                    None if sqe.nsid == 0 || sqe.nsid == u32::MAX => {
                        return Err(Status::INVALID_NAMESPACE)
                    }
                    None if sqe.nsid <= s.max_nsid() => {}
                    None => return Err(Status::INVALID_NAMESPACE),
                }
            }
            (cns::ACTIVE_NS_LIST, SubsystemKind::Nvm) => {
                if sqe.nsid >= 0xffff_fffe {
                    return Err(Status::INVALID_NAMESPACE);
                }
                let namespaces = s.namespaces();
                let active = namespaces.iter().filter(|n| n.is_online()).map(|n| n.nsid);
                identify::build_active_ns_list(&mut out, active, sqe.nsid);
            }
            (cns::NS_ID_DESCRIPTORS, SubsystemKind::Nvm) => match s.namespace(sqe.nsid) {
                Some(ns) if ns.is_online() => {
                    identify::build_ns_id_descriptors(&mut out, &ns.nguid, &ns.uuid)
                }
                _ => return Err(Status::INVALID_NAMESPACE),
            },
            _ => return Err(Status::INVALID_FIELD),
        }
        self.reply_data(idx, &out)
    }

    fn get_log_page(&mut self, idx: usize) -> Result<(), Status> {
        let sqe = self.reqs[idx].sqe;
        let Some(c) = self.ctrl.clone() else {
            return Err(Status::COMMAND_SEQUENCE_ERROR);
        };
        let lid = (sqe.cdw10 & 0xff) as u8;
        let rae = sqe.cdw10 & (1 << 15) != 0;
        let numd = (u64::from(sqe.cdw11 & 0xffff) << 16 | u64::from(sqe.cdw10 >> 16)) + 1;
        let len = numd * 4;
        let lpo = u64::from(sqe.cdw12) | (u64::from(sqe.cdw13) << 32);
        if lpo % 4 != 0 || len > u64::from(self.target.limits.max_io_size) {
            return Err(Status::INVALID_FIELD);
        }
        let discovery = c.subsys.kind == SubsystemKind::Discovery;
        let page: Vec<u8> = match (lid, discovery) {
            (log_id::ERROR_INFO, _) => {
                let a = c.admin();
                let mut v = vec![0u8; ERROR_LOG_ENTRIES * nlog::ERROR_ENTRY_SIZE];
                for (chunk, e) in v
                    .chunks_exact_mut(nlog::ERROR_ENTRY_SIZE)
                    .zip(a.errors.iter())
                {
                    let mut b = [0u8; nlog::ERROR_ENTRY_SIZE];
                    e.encode(&mut b);
                    chunk.copy_from_slice(&b);
                }
                v
            }
            (log_id::SMART_HEALTH, false) => {
                let mut b = [0u8; nlog::SMART_SIZE];
                c.smart().encode(&mut b);
                b.to_vec()
            }
            (log_id::FIRMWARE_SLOT, false) => {
                let mut b = [0u8; nlog::FIRMWARE_SLOT_SIZE];
                nlog::build_firmware_slot(&mut b, FIRMWARE);
                b.to_vec()
            }
            (log_id::CHANGED_NS_LIST, false) => {
                let mut a = c.admin();
                let mut b = [0u8; nlog::CHANGED_NS_SIZE];
                nlog::build_changed_ns(&mut b, &a.changed_ns);
                if !rae {
                    a.changed_ns.clear();
                    a.ns_event_masked = false;
                }
                b.to_vec()
            }
            (log_id::SANITIZE_STATUS, false) => {
                let mut b = [0u8; nlog::SANITIZE_STATUS_SIZE];
                self.target
                    .erase()
                    .sanitize_status(&c.subsys.nqn)
                    .encode(&mut b);
                b.to_vec()
            }
            (log_id::DISCOVERY, true) => self.discovery_log(&c.hostnqn),
            _ => return Err(Status::INVALID_LOG_PAGE),
        };
        let start = usize::try_from(lpo).map_err(|_| Status::INVALID_FIELD)?;
        if start > page.len() {
            return Err(Status::INVALID_FIELD);
        }
        // Past the end of the page reads as zeroes.
        let mut out = vec![0u8; len as usize];
        let n = (page.len() - start).min(out.len());
        out[..n].copy_from_slice(&page[start..start + n]);
        self.reply_data(idx, &out)
    }

    /// The discovery log page: one entry per NVM subsystem that the port this connection came
    /// through serves and that admits the host, with that port's address (as nvmet lists the
    /// subsystems linked to the port). Subsystems reachable only elsewhere are not shown.
    fn discovery_log(&self, hostnqn: &str) -> Vec<u8> {
        let mut entries: Vec<[u8; nlog::DISCOVERY_ENTRY_SIZE]> = Vec::new();
        if let Some(addr) = self.target.port_addr(self.port) {
            let adrfam = if addr.is_ipv6() {
                nlog::ADRFAM_IPV6
            } else {
                nlog::ADRFAM_IPV4
            };
            let traddr = addr.ip().to_string();
            let trsvcid = self.target.advertised_port(self.port).to_string();
            for s in self.target.subsystems() {
                if s.kind != SubsystemKind::Nvm || !s.serves(self.port) || !s.host_allowed(hostnqn)
                {
                    continue;
                }
                let mut e = [0u8; nlog::DISCOVERY_ENTRY_SIZE];
                DiscoveryEntry {
                    adrfam,
                    subtype: nlog::SUBTYPE_NVME,
                    portid: self.port.0,
                    asqsz: self.target.limits.max_admin_queue_depth,
                    trsvcid: &trsvcid,
                    traddr: &traddr,
                    subnqn: &s.nqn,
                }
                .encode(&mut e);
                entries.push(e);
            }
        }
        debug_assert!(!entries
            .iter()
            .any(|e| &e[256..256 + DISCOVERY_NQN.len()] == DISCOVERY_NQN.as_bytes()));
        let mut v =
            vec![0u8; nlog::DISCOVERY_HEADER_SIZE + entries.len() * nlog::DISCOVERY_ENTRY_SIZE];
        let mut h = [0u8; nlog::DISCOVERY_HEADER_SIZE];
        nlog::build_discovery_header(&mut h, self.target.genctr(), entries.len() as u64);
        v[..nlog::DISCOVERY_HEADER_SIZE].copy_from_slice(&h);
        for (chunk, e) in v[nlog::DISCOVERY_HEADER_SIZE..]
            .chunks_exact_mut(nlog::DISCOVERY_ENTRY_SIZE)
            .zip(&entries)
        {
            chunk.copy_from_slice(e);
        }
        v
    }

    fn features(&mut self, idx: usize, set: bool) -> Result<(), Status> {
        let sqe = self.reqs[idx].sqe;
        let Some(c) = self.ctrl.clone() else {
            return Err(Status::COMMAND_SEQUENCE_ERROR);
        };
        let fid = (sqe.cdw10 & 0xff) as u8;
        if set && sqe.cdw10 & (1 << 31) != 0 {
            return Err(Status::FEATURE_NOT_SAVEABLE);
        }
        let sel = (sqe.cdw10 >> 8) & 0b111;
        if !set && sel > 1 {
            // SEL: only current (0) and default (1) values are reported.
            return Err(Status::INVALID_FIELD);
        }
        let nvm = c.subsys.kind == SubsystemKind::Nvm;
        let dw0 = match fid {
            // The mandatory features nvseal records but that change nothing in how it works
            // (docs/nvmf.md, "Features"). Get with SEL = 1 reports the defaults.
            feature::ARBITRATION
            | feature::POWER_MANAGEMENT
            | feature::TEMPERATURE_THRESHOLD
            | feature::ERROR_RECOVERY
                if nvm =>
            {
                if !set && sel == 1 {
                    recorded_feature(fid, false, sqe.cdw11, &mut FeatureValues::default())?
                } else {
                    recorded_feature(fid, set, sqe.cdw11, &mut c.admin().features)?
                }
            }
            feature::HOST_IDENTIFIER if nvm => {
                // The host identifier comes with Connect (128 bits, CTRATT.HIDS); fabrics does
                // not let a host change it afterwards.
                if set {
                    return Err(Status::COMMAND_SEQUENCE_ERROR);
                }
                // EXHID (dword 11 bit 0) must ask for the 128-bit form, the only one there is.
                if sqe.cdw11 & 1 == 0 {
                    return Err(Status::INVALID_FIELD);
                }
                let hostid = c.hostid;
                return self.reply_data(idx, &hostid);
            }
            feature::NUMBER_OF_QUEUES if nvm => {
                let mut a = c.admin();
                if set {
                    // The count is fixed once I/O queues exist (until a controller reset
                    // deletes them): NVMe Base, Number of Queues.
                    if a.io_qids.iter().any(|&q| q) {
                        return Err(Status::COMMAND_SEQUENCE_ERROR);
                    }
                    let nsqr = sqe.cdw11 & 0xffff;
                    let ncqr = sqe.cdw11 >> 16;
                    if nsqr == 0xffff || ncqr == 0xffff {
                        return Err(Status::INVALID_FIELD);
                    }
                    let want = nsqr.max(ncqr) + 1;
                    a.io_queues_granted =
                        want.min(u32::from(self.target.limits.max_io_queues)) as u16;
                }
                let g = u32::from(a.io_queues_granted.saturating_sub(1));
                g | (g << 16)
            }
            feature::KEEP_ALIVE_TIMER => {
                if set {
                    // The Connect rules hold here too: a host cannot switch keep alive off
                    // where Connect would not let it.
                    let kato = self
                        .target
                        .limits
                        .effective_kato_ms(!nvm, sqe.cdw11)
                        .map_err(|_| Status::INVALID_FIELD)?;
                    c.kato_ms.store(kato, Ordering::Release);
                    self.ka_deadline = kato_deadline(kato);
                }
                c.kato_ms.load(Ordering::Acquire)
            }
            feature::ASYNC_EVENT_CONFIG => {
                let mut a = c.admin();
                if set {
                    a.aen_config = sqe.cdw11;
                }
                a.aen_config
            }
            feature::VOLATILE_WRITE_CACHE if nvm => {
                // The cache is the backends'; it cannot be switched off from here.
                if set && sqe.cdw11 & 1 == 0 {
                    return Err(Status::INVALID_FIELD);
                }
                1
            }
            _ => return Err(Status::INVALID_FIELD),
        };
        self.reqs[idx].cqe.dw0 = dw0;
        Ok(())
    }

    fn async_event_request(&mut self, idx: usize) -> Action {
        if self.aers.len() >= MAX_AERS {
            return Action::Complete(Status::ASYNC_EVENT_LIMIT_EXCEEDED);
        }
        self.put_buf(idx);
        self.transition(idx, ReqState::AwaitingEvent);
        self.aers.push(idx);
        // An event may already be waiting.
        self.deliver_events();
        Action::Pending
    }

    /// Completes held AERs with queued events; returns how many were completed.
    pub(super) fn deliver_events(&mut self) -> usize {
        let Some(c) = self.ctrl.clone() else { return 0 };
        let mut n = 0;
        while !self.aers.is_empty() {
            let Some(ev) = c.admin().pending_events.pop_front() else {
                break;
            };
            let idx = self.aers.remove(0);
            self.reqs[idx].cqe.dw0 = ev;
            self.complete(idx, Status::SUCCESS);
            n += 1;
        }
        // Format NVM commands the erase thread has finished (it sets `event_pending` too).
        let mut i = 0;
        while i < self.erase_wait.len() {
            match self.erase_wait[i].1.take() {
                Some(status) => {
                    let (idx, _) = self.erase_wait.swap_remove(i);
                    self.complete(idx, status);
                    n += 1;
                }
                None => i += 1,
            }
        }
        n
    }

    /// Format NVM. Only the current format exists (LBAF 0, no metadata, no protection
    /// information): anything else is Invalid Format. SES = 0 changes nothing and succeeds;
    /// SES = 1 (user data erase) and SES = 2 (cryptographic erase) crypto-erase an encrypted
    /// namespace on the erase thread, the command completing when that is done, and are
    /// refused with Invalid Field on a plaintext one (nvseal does not overwrite data).
    fn format_nvm(&mut self, idx: usize) -> Action {
        match self.try_format(idx) {
            Ok(None) => Action::Complete(Status::SUCCESS),
            Ok(Some(done)) => {
                self.put_buf(idx);
                self.transition(idx, ReqState::AwaitingEvent);
                self.erase_wait.push((idx, done));
                Action::Pending
            }
            Err((status, reason)) => {
                let nsid = self.reqs[idx].sqe.nsid;
                self.erase_refused("Format NVM", nsid, status, reason);
                Action::Complete(status)
            }
        }
    }

    fn try_format(&mut self, idx: usize) -> Result<Option<Arc<Done>>, (Status, &'static str)> {
        let sqe = self.reqs[idx].sqe;
        let Some(c) = self.ctrl.clone() else {
            return Err((Status::COMMAND_SEQUENCE_ERROR, "no controller"));
        };
        if c.subsys.kind != SubsystemKind::Nvm {
            return Err((Status::INVALID_OPCODE, "not an NVM subsystem"));
        }
        let d = sqe.cdw10;
        let lbaf = (d & 0xf) | (((d >> 12) & 0x3) << 4);
        let mset = (d >> 4) & 1;
        let pi = (d >> 5) & 0x7;
        let ses = (d >> 9) & 0x7;
        if sqe.nsid == u32::MAX {
            return Err((
                Status::INVALID_NAMESPACE,
                "broadcast NSID: Format NVM names one namespace (FNA bit 3)",
            ));
        }
        let Some(ns) = c.subsys.namespace(sqe.nsid) else {
            return Err((Status::INVALID_NAMESPACE, "no such namespace"));
        };
        if lbaf != 0 || mset != 0 || pi != 0 {
            return Err((
                Status::INVALID_FORMAT,
                "only the current format (LBAF 0, no metadata, no PI) is supported",
            ));
        }
        if ses > 2 {
            return Err((
                Status::INVALID_FIELD,
                "reserved Secure Erase Settings value",
            ));
        }
        let hub = self.target.erase();
        if hub.sanitizing(&c.subsys.nqn) {
            return Err((
                Status::SANITIZE_IN_PROGRESS,
                "a sanitize operation is running",
            ));
        }
        if !ns.is_online() {
            return Err((Status::NAMESPACE_NOT_READY, "the namespace is locked"));
        }
        if ses == 0 {
            return Ok(None);
        }
        if !hub.can_erase(&ns) {
            return Err((
                Status::INVALID_FIELD,
                "secure erase of a plaintext namespace: only an encrypted namespace can be crypto-erased",
            ));
        }
        let done = Arc::new(Done::default());
        hub.submit(Job {
            who: format!("nvmf host {} cntlid {}", c.hostnqn, c.cntlid),
            namespaces: vec![ns],
            ctrl: c.clone(),
            kind: JobKind::Format { done: done.clone() },
        })
        .map_err(|s| (s, "the erase queue is full or stopped"))?;
        Ok(Some(done))
    }

    /// Sanitize. Only the crypto erase action (and Exit Failure Mode, a no-op: nvseal has no
    /// restricted failure mode) is supported, and only where every namespace of the subsystem
    /// can be crypto-erased (SANICAP); anything else is Invalid Field and changes nothing. The
    /// command completes at once; the erase thread erases each namespace while the Sanitize
    /// Status log page reports progress, and I/O to them gets Sanitize In Progress.
    fn sanitize(&mut self, idx: usize) -> Result<(), Status> {
        let r = self.try_sanitize(idx);
        if let Err((status, reason)) = r {
            let nsid = self.reqs[idx].sqe.nsid;
            self.erase_refused("Sanitize", nsid, status, reason);
            return Err(status);
        }
        Ok(())
    }

    fn try_sanitize(&mut self, idx: usize) -> Result<(), (Status, &'static str)> {
        const SANACT_EXIT_FAILURE: u32 = 1;
        const SANACT_CRYPTO_ERASE: u32 = 4;
        let sqe = self.reqs[idx].sqe;
        let Some(c) = self.ctrl.clone() else {
            return Err((Status::COMMAND_SEQUENCE_ERROR, "no controller"));
        };
        if c.subsys.kind != SubsystemKind::Nvm {
            return Err((Status::INVALID_OPCODE, "not an NVM subsystem"));
        }
        let hub = self.target.erase();
        match sqe.cdw10 & 0x7 {
            SANACT_EXIT_FAILURE => return Ok(()),
            SANACT_CRYPTO_ERASE => {}
            _ => {
                return Err((
                    Status::INVALID_FIELD,
                    "only the crypto erase sanitize action is supported",
                ))
            }
        }
        let namespaces = c.subsys.namespaces();
        if namespaces.is_empty() || !namespaces.iter().all(|n| hub.can_erase(n)) {
            return Err((
                Status::INVALID_FIELD,
                "crypto erase sanitize needs every namespace of the subsystem encrypted",
            ));
        }
        if !namespaces.iter().all(|n| n.is_online()) {
            return Err((Status::NAMESPACE_NOT_READY, "a namespace is locked"));
        }
        let Some(prev) = hub.begin_sanitize(&c.subsys.nqn, sqe.cdw10, &namespaces) else {
            return Err((
                Status::SANITIZE_IN_PROGRESS,
                "a sanitize operation is running",
            ));
        };
        let job = Job {
            who: format!("nvmf host {} cntlid {}", c.hostnqn, c.cntlid),
            namespaces: namespaces.clone(),
            ctrl: c.clone(),
            kind: JobKind::Sanitize {
                nqn: c.subsys.nqn.clone(),
            },
        };
        if let Err(s) = hub.submit(job) {
            hub.abandon_sanitize(&c.subsys.nqn, prev, &namespaces);
            return Err((s, "the erase queue is full or stopped"));
        }
        Ok(())
    }

    /// Logs why a Format NVM or Sanitize was refused (rate-limited: a host can repeat it).
    fn erase_refused(&self, cmd: &str, nsid: u32, status: Status, reason: &str) {
        if let Some(suppressed) = self.target.peer_log().admit() {
            let (cntlid, hostnqn) = self
                .ctrl
                .as_ref()
                .map(|c| (c.cntlid, c.hostnqn.as_str()))
                .unwrap_or((0, ""));
            tracing::warn!(
                cntlid,
                hostnqn,
                peer = ?self.peer,
                nsid,
                ?status,
                reason,
                suppressed_before = suppressed,
                "{cmd} refused"
            );
        }
    }

    fn abort(&mut self, idx: usize) -> Result<(), Status> {
        let sqe = self.reqs[idx].sqe;
        let sqid = (sqe.cdw10 & 0xffff) as u16;
        let cid = (sqe.cdw10 >> 16) as u16;
        // dw0 bit 0 set: the command was not aborted.
        self.reqs[idx].cqe.dw0 = 1;
        if sqid == 0 {
            if let Some(pos) = self.aers.iter().position(|&i| self.reqs[i].sqe.cid == cid) {
                let a = self.aers.remove(pos);
                self.complete(a, Status::ABORT_REQUESTED);
                self.reqs[idx].cqe.dw0 = 0;
            }
        }
        Ok(())
    }
}

/// Get (`set` false) or Set one of the recorded features `fid` in `f`; the completion dword 0.
/// Set refuses what nvseal cannot honour: a power state other than 0 (NPSS = 0), a temperature
/// sensor other than the composite one, DULBE (no deallocated-block errors).
fn recorded_feature(fid: u8, set: bool, dw11: u32, f: &mut FeatureValues) -> Result<u32, Status> {
    match fid {
        feature::ARBITRATION => {
            if set {
                f.arbitration = dw11;
            }
            Ok(f.arbitration)
        }
        feature::POWER_MANAGEMENT => {
            if set {
                if dw11 & 0x1f != 0 {
                    return Err(Status::INVALID_FIELD);
                }
                f.power_mgmt = dw11 & 0xff;
            }
            Ok(f.power_mgmt)
        }
        feature::TEMPERATURE_THRESHOLD => {
            let tmpth = (dw11 & 0xffff) as u16;
            let tmpsel = (dw11 >> 16) & 0xf;
            let thsel = (dw11 >> 20) & 0b11;
            // TMPSEL 0 = composite; 0xF = every sensor (Set only), which is the composite one.
            let composite = tmpsel == 0 || (set && tmpsel == 0xf);
            if !composite || thsel > 1 {
                return Err(Status::INVALID_FIELD);
            }
            let t = if thsel == 0 {
                &mut f.temp_over_k
            } else {
                &mut f.temp_under_k
            };
            if set {
                *t = tmpth;
            }
            Ok(u32::from(*t))
        }
        feature::ERROR_RECOVERY => {
            if set {
                if dw11 & (1 << 16) != 0 {
                    return Err(Status::INVALID_FIELD);
                }
                f.tler_100ms = (dw11 & 0xffff) as u16;
            }
            Ok(u32::from(f.tler_100ms))
        }
        _ => Err(Status::INVALID_FIELD),
    }
}

/// What a Connect named, as far as it was parsed, for the refusal log line.
#[derive(Default)]
struct ConnectWho {
    qid: u16,
    subnqn: String,
    hostnqn: String,
}

/// A refused Connect: the status the host gets, the field it points at (IATTR: in the data,
/// IPO) for Connect Invalid Parameters, and the reason the log gets.
struct Refusal {
    status: Status,
    param: Option<(bool, u16)>,
    reason: &'static str,
}

impl Refusal {
    fn status(status: Status, reason: &'static str) -> Refusal {
        Refusal {
            status,
            param: None,
            reason,
        }
    }
    /// Connect Invalid Parameters pointing at byte `off` of the data (`in_data`) or the SQE.
    fn param(in_data: bool, off: usize, reason: &'static str) -> Refusal {
        Refusal {
            status: Status::CONNECT_INVALID_PARAMETERS,
            param: Some((in_data, off as u16)),
            reason,
        }
    }
}

/// Reads an NQN field of the Connect data (256 bytes, NUL-terminated); the reason if it is
/// not one. Whether the name is well-formed is the caller's business.
fn parse_nqn_field(field: &[u8]) -> Result<&str, &'static str> {
    let end = field
        .iter()
        .position(|&b| b == 0)
        .ok_or("NQN field is not NUL-terminated")?;
    std::str::from_utf8(&field[..end]).map_err(|_| "NQN is not UTF-8")
}

fn kato_deadline(kato_ms: u32) -> Option<Instant> {
    (kato_ms > 0).then(|| Instant::now() + Duration::from_millis(u64::from(kato_ms)))
}
