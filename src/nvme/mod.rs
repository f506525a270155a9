//! NVMe spec types shared by the target and the host side: the 64-byte submission queue entry
//! (SQE), the 16-byte completion queue entry (CQE), opcodes, status codes, SGL descriptors,
//! controller properties, feature ids, and byte builders for Identify data and log pages.
//!
//! Pure data, no I/O and no threads: whichever thread parses a capsule uses these (the reactor
//! that owns an NVMe/TCP connection, or a host queue pair). It exists so the transport and the
//! command handlers speak in named fields instead of byte offsets. Decoders take fixed-size
//! arrays so they cannot index out of bounds; values inside are validated by the handlers.

pub mod identify;
pub mod log;

/// Size of a submission queue entry in bytes.
pub const SQE_SIZE: usize = 64;
/// Size of a completion queue entry in bytes.
pub const CQE_SIZE: usize = 16;

#[inline]
fn le16(b: &[u8; SQE_SIZE], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
#[inline]
fn le32(b: &[u8; SQE_SIZE], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
#[inline]
fn le64(b: &[u8; SQE_SIZE], off: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(x)
}

/// Admin command opcodes (NVMe base spec, Figure "Opcodes for Admin Commands").
pub mod admin_op {
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
    pub const KEEP_ALIVE: u8 = 0x18;
    pub const FORMAT_NVM: u8 = 0x80;
    pub const SANITIZE: u8 = 0x84;
}

/// NVM command set I/O opcodes.
pub mod io_op {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// The Fabrics command opcode; the command type is in byte 4 (`fctype`).
pub const FABRICS_OPCODE: u8 = 0x7f;

/// Fabrics command types (NVMe over Fabrics spec).
pub mod fctype {
    pub const PROPERTY_SET: u8 = 0x00;
    pub const CONNECT: u8 = 0x01;
    pub const PROPERTY_GET: u8 = 0x04;
}

/// Identify CNS values.
pub mod cns {
    pub const NAMESPACE: u8 = 0x00;
    pub const CONTROLLER: u8 = 0x01;
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    pub const NS_ID_DESCRIPTORS: u8 = 0x03;
}

/// Feature identifiers used by Set/Get Features.
pub mod feature {
    pub const ARBITRATION: u8 = 0x01;
    pub const POWER_MANAGEMENT: u8 = 0x02;
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    pub const ERROR_RECOVERY: u8 = 0x05;
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
    pub const KEEP_ALIVE_TIMER: u8 = 0x0f;
    pub const HOST_IDENTIFIER: u8 = 0x81;
}

/// Log page identifiers.
pub mod log_id {
    pub const ERROR_INFO: u8 = 0x01;
    pub const SMART_HEALTH: u8 = 0x02;
    pub const FIRMWARE_SLOT: u8 = 0x03;
    pub const CHANGED_NS_LIST: u8 = 0x04;
    pub const SANITIZE_STATUS: u8 = 0x81;
    pub const DISCOVERY: u8 = 0x70;
}

/// Controller property offsets and fields (NVMe over Fabrics Property Get/Set).
pub mod prop {
    /// Controller Capabilities (8 bytes).
    pub const CAP: u32 = 0x00;
    /// Version (4 bytes).
    pub const VS: u32 = 0x08;
    /// Controller Configuration (4 bytes).
    pub const CC: u32 = 0x14;
    /// Controller Status (4 bytes).
    pub const CSTS: u32 = 0x1c;

    /// NVMe version 1.4.0 as VS encodes it (major 31:16, minor 15:8).
    pub const VS_1_4: u32 = 0x0001_0400;

    pub const CC_EN: u32 = 1 << 0;
    pub const CC_SHN_SHIFT: u32 = 14;
    pub const CC_SHN_MASK: u32 = 0b11 << CC_SHN_SHIFT;
    pub const CC_IOSQES_SHIFT: u32 = 16;
    pub const CC_IOCQES_SHIFT: u32 = 20;

    pub const CSTS_RDY: u32 = 1 << 0;
    pub const CSTS_CFS: u32 = 1 << 1;
    pub const CSTS_SHST_SHIFT: u32 = 2;
    /// CSTS.SHST = 01b: shutdown processing occurring (backends being flushed).
    pub const CSTS_SHST_OCCURRING: u32 = 0b01 << CSTS_SHST_SHIFT;
    /// CSTS.SHST = 10b: shutdown processing complete.
    pub const CSTS_SHST_COMPLETE: u32 = 0b10 << CSTS_SHST_SHIFT;
    pub const CSTS_SHST_MASK: u32 = 0b11 << CSTS_SHST_SHIFT;

    /// Builds CAP: `mqes` is the 0-based max queue entries, `timeout_500ms` the ready timeout.
    pub fn cap(mqes: u16, timeout_500ms: u8) -> u64 {
        let mut v = u64::from(mqes);
        v |= 1 << 16; // CQR: contiguous queues required
        v |= u64::from(timeout_500ms) << 24;
        v |= 1 << 37; // CSS bit 0: NVM command set
                      // MPSMIN = MPSMAX = 0: 4 KiB memory pages.
        v
    }
}

/// Status code types.
pub mod sct {
    pub const GENERIC: u8 = 0x0;
    pub const COMMAND_SPECIFIC: u8 = 0x1;
    pub const MEDIA: u8 = 0x2;
    pub const PATH: u8 = 0x3;
}

/// NVMe completion status: status code type, status code, and Do Not Retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
    pub dnr: bool,
}

impl Status {
    pub const fn generic(sc: u8, dnr: bool) -> Self {
        Status {
            sct: sct::GENERIC,
            sc,
            dnr,
        }
    }
    pub const fn specific(sc: u8, dnr: bool) -> Self {
        Status {
            sct: sct::COMMAND_SPECIFIC,
            sc,
            dnr,
        }
    }
    pub const SUCCESS: Status = Status::generic(0x00, false);
    pub const INVALID_OPCODE: Status = Status::generic(0x01, true);
    pub const INVALID_FIELD: Status = Status::generic(0x02, true);
    pub const CID_CONFLICT: Status = Status::generic(0x03, true);
    pub const DATA_TRANSFER_ERROR: Status = Status::generic(0x04, false);
    pub const INTERNAL_ERROR: Status = Status::generic(0x06, false);
    pub const ABORT_REQUESTED: Status = Status::generic(0x07, false);
    pub const SQ_DELETED: Status = Status::generic(0x08, false);
    pub const INVALID_NAMESPACE: Status = Status::generic(0x0b, true);
    pub const COMMAND_SEQUENCE_ERROR: Status = Status::generic(0x0c, true);
    pub const DATA_SGL_LENGTH_INVALID: Status = Status::generic(0x0f, true);
    pub const SGL_TYPE_INVALID: Status = Status::generic(0x11, true);
    /// Generic, NVM command set specific range.
    pub const LBA_OUT_OF_RANGE: Status = Status::generic(0x80, true);
    /// Namespace Not Ready, retry allowed: used for a locked (offline) namespace.
    pub const NAMESPACE_NOT_READY: Status = Status::generic(0x82, false);
    /// The command is prohibited while a sanitize operation is in progress (retry later).
    pub const SANITIZE_IN_PROGRESS: Status = Status::generic(0x1d, false);
    /// Processing was interrupted; nvseal uses it, with DNR, for a crypto erase refused because
    /// the namespace is busy with a deep rekey or conversion (retry once that has ended).
    pub const COMMAND_INTERRUPTED: Status = Status::generic(0x21, true);
    // Command specific.
    pub const INVALID_QUEUE_ID: Status = Status::specific(0x01, true);
    pub const INVALID_QUEUE_SIZE: Status = Status::specific(0x02, true);
    pub const ASYNC_EVENT_LIMIT_EXCEEDED: Status = Status::specific(0x05, true);
    pub const INVALID_LOG_PAGE: Status = Status::specific(0x09, true);
    /// Format NVM: the format (LBAF, metadata, protection information) is not supported.
    pub const INVALID_FORMAT: Status = Status::specific(0x0a, true);
    pub const FEATURE_NOT_SAVEABLE: Status = Status::specific(0x0d, true);
    // Fabrics Connect (command specific).
    pub const CONNECT_INCOMPATIBLE_FORMAT: Status = Status::specific(0x80, true);
    pub const CONNECT_CONTROLLER_BUSY: Status = Status::specific(0x81, false);
    pub const CONNECT_INVALID_PARAMETERS: Status = Status::specific(0x82, true);
    pub const CONNECT_RESTART_DISCOVERY: Status = Status::specific(0x83, true);
    pub const CONNECT_INVALID_HOST: Status = Status::specific(0x84, true);
    // Media and data integrity errors.
    pub const WRITE_FAULT: Status = Status {
        sct: sct::MEDIA,
        sc: 0x80,
        dnr: false,
    };
    pub const UNRECOVERED_READ_ERROR: Status = Status {
        sct: sct::MEDIA,
        sc: 0x81,
        dnr: false,
    };
    /// Generic: a transport error the host may retry (used for a data digest error).
    pub const TRANSIENT_TRANSPORT_ERROR: Status = Status::generic(0x22, false);

    pub fn is_success(self) -> bool {
        self.sct == 0 && self.sc == 0
    }
    /// The 15-bit status field as it sits in CQE bits 31:17 (shifted down by one; phase excluded).
    pub fn to_field(self) -> u16 {
        u16::from(self.sc) | (u16::from(self.sct & 0x7) << 8) | (u16::from(self.dnr) << 14)
    }
    pub fn from_field(f: u16) -> Self {
        Status {
            sc: (f & 0xff) as u8,
            sct: ((f >> 8) & 0x7) as u8,
            dnr: f & (1 << 14) != 0,
        }
    }
}

/// SGL descriptor type/subtype byte values used by NVMe/TCP.
pub mod sgl {
    /// Data Block descriptor, Offset subtype: data is in the capsule at `addr` offset.
    pub const DATA_BLOCK_OFFSET: u8 = 0x01;
    /// Transport SGL Data Block, transport-specific subtype: data moves by R2T/H2CData/C2HData.
    pub const TRANSPORT_DATA_BLOCK: u8 = 0x5a;
}

/// An SGL descriptor (16 bytes at SQE bytes 24..40).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SglDesc {
    pub addr: u64,
    pub len: u32,
    /// Type in bits 7:4, subtype in bits 3:0.
    pub type_byte: u8,
}

impl SglDesc {
    pub fn in_capsule(offset: u64, len: u32) -> Self {
        SglDesc {
            addr: offset,
            len,
            type_byte: sgl::DATA_BLOCK_OFFSET,
        }
    }
    pub fn transport(len: u32) -> Self {
        SglDesc {
            addr: 0,
            len,
            type_byte: sgl::TRANSPORT_DATA_BLOCK,
        }
    }
    pub fn encode(&self, out: &mut [u8; 16]) {
        out[0..8].copy_from_slice(&self.addr.to_le_bytes());
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..15].fill(0);
        out[15] = self.type_byte;
    }
}

/// PSDT values (SQE byte 1 bits 7:6); fabrics requires SGLs.
pub const PSDT_SGL_MPTR_CONTIG: u8 = 0b01 << 6;

/// A decoded submission queue entry. Command dwords 10..15 stay raw: their meaning depends on the
/// opcode, and the handlers name them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sqe {
    pub opcode: u8,
    /// Byte 1: FUSE (1:0) and PSDT (7:6).
    pub flags: u8,
    pub cid: u16,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub mptr: u64,
    pub sgl: SglDesc,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
}

impl Sqe {
    pub fn decode(b: &[u8; SQE_SIZE]) -> Self {
        Sqe {
            opcode: b[0],
            flags: b[1],
            cid: le16(b, 2),
            nsid: le32(b, 4),
            cdw2: le32(b, 8),
            cdw3: le32(b, 12),
            mptr: le64(b, 16),
            sgl: SglDesc {
                addr: le64(b, 24),
                len: le32(b, 32),
                type_byte: b[39],
            },
            cdw10: le32(b, 40),
            cdw11: le32(b, 44),
            cdw12: le32(b, 48),
            cdw13: le32(b, 52),
            cdw14: le32(b, 56),
            cdw15: le32(b, 60),
        }
    }
    pub fn encode(&self, out: &mut [u8; SQE_SIZE]) {
        out[0] = self.opcode;
        out[1] = self.flags;
        out[2..4].copy_from_slice(&self.cid.to_le_bytes());
        out[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        out[8..12].copy_from_slice(&self.cdw2.to_le_bytes());
        out[12..16].copy_from_slice(&self.cdw3.to_le_bytes());
        out[16..24].copy_from_slice(&self.mptr.to_le_bytes());
        let mut s = [0u8; 16];
        self.sgl.encode(&mut s);
        out[24..40].copy_from_slice(&s);
        for (i, d) in [
            self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15,
        ]
        .iter()
        .enumerate()
        {
            out[40 + 4 * i..44 + 4 * i].copy_from_slice(&d.to_le_bytes());
        }
    }
    /// Fabrics command type (byte 4; overlaps the low byte of NSID in a fabrics command).
    pub fn fctype(&self) -> u8 {
        (self.nsid & 0xff) as u8
    }
    /// Starting LBA of a Read/Write/Write Zeroes (CDW10/11).
    pub fn slba(&self) -> u64 {
        u64::from(self.cdw10) | (u64::from(self.cdw11) << 32)
    }
    /// Number of logical blocks of a Read/Write/Write Zeroes (CDW12 bits 15:0 are 0-based).
    pub fn nlb(&self) -> u32 {
        (self.cdw12 & 0xffff) + 1
    }
    /// Force Unit Access of a Read/Write (CDW12 bit 30).
    pub fn fua(&self) -> bool {
        self.cdw12 & CDW12_FUA != 0
    }
}

/// Force Unit Access: CDW12 bit 30 of a Read or Write.
pub const CDW12_FUA: u32 = 1 << 30;

/// A completion queue entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cqe {
    pub dw0: u32,
    pub dw1: u32,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    /// Status word bits 15:1 (see [`Status::to_field`]); the phase tag is not used over fabrics.
    pub status: u16,
}

impl Cqe {
    pub fn new(cid: u16, status: Status) -> Self {
        Cqe {
            cid,
            status: status.to_field(),
            ..Default::default()
        }
    }
    pub fn status(&self) -> Status {
        Status::from_field(self.status)
    }
    pub fn decode(b: &[u8; CQE_SIZE]) -> Self {
        let w = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let h = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Cqe {
            dw0: w(0),
            dw1: w(4),
            sqhd: h(8),
            sqid: h(10),
            cid: h(12),
            status: h(14) >> 1,
        }
    }
    pub fn encode(&self, out: &mut [u8; CQE_SIZE]) {
        out[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        out[4..8].copy_from_slice(&self.dw1.to_le_bytes());
        out[8..10].copy_from_slice(&self.sqhd.to_le_bytes());
        out[10..12].copy_from_slice(&self.sqid.to_le_bytes());
        out[12..14].copy_from_slice(&self.cid.to_le_bytes());
        out[14..16].copy_from_slice(&(self.status << 1).to_le_bytes());
    }
}

/// Fabrics Connect: fields of the command (CDW10..12) and of its 1024-byte data.
pub mod connect {
    /// Size of the Connect command data.
    pub const DATA_SIZE: usize = 1024;
    /// Offsets inside the Connect data.
    pub const HOSTID_OFF: usize = 0;
    pub const CNTLID_OFF: usize = 16;
    pub const SUBNQN_OFF: usize = 256;
    pub const HOSTNQN_OFF: usize = 512;
    pub const NQN_FIELD_LEN: usize = 256;
    /// CATTR bit 2: the host disables SQ flow control (SQHD need not be reported).
    pub const CATTR_DISABLE_SQ_FLOW: u8 = 1 << 2;
    /// Controller id meaning "dynamic controller model: allocate one".
    pub const CNTLID_DYNAMIC: u16 = 0xffff;
    /// Offsets of Connect command fields inside the SQE (for IPO in invalid-parameter replies).
    pub const SQE_QID_OFF: u16 = 42;
    pub const SQE_SQSIZE_OFF: u16 = 44;

    /// Decoded Connect command dwords.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct ConnectCmd {
        pub recfmt: u16,
        pub qid: u16,
        /// 0-based submission queue size.
        pub sqsize: u16,
        pub cattr: u8,
        /// Keep alive timeout in milliseconds (0 = disabled).
        pub kato_ms: u32,
    }

    impl ConnectCmd {
        pub fn from_sqe(s: &super::Sqe) -> Self {
            ConnectCmd {
                recfmt: (s.cdw10 & 0xffff) as u16,
                qid: (s.cdw10 >> 16) as u16,
                sqsize: (s.cdw11 & 0xffff) as u16,
                cattr: ((s.cdw11 >> 16) & 0xff) as u8,
                kato_ms: s.cdw12,
            }
        }
        pub fn to_sqe(&self, cid: u16) -> super::Sqe {
            super::Sqe {
                opcode: super::FABRICS_OPCODE,
                flags: super::PSDT_SGL_MPTR_CONTIG,
                cid,
                nsid: u32::from(super::fctype::CONNECT),
                cdw10: u32::from(self.recfmt) | (u32::from(self.qid) << 16),
                cdw11: u32::from(self.sqsize) | (u32::from(self.cattr) << 16),
                cdw12: self.kato_ms,
                ..Default::default()
            }
        }
    }

    /// Reads a NUL-padded NQN field as a string; `None` if it is not valid UTF-8.
    pub fn nqn_from_field(field: &[u8]) -> Option<&str> {
        let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
        std::str::from_utf8(field.get(..end)?).ok()
    }

    /// The completion dword 0 for "Connect Invalid Parameters" (Fabrics Connect response):
    /// IPO, bits 15:00, is the byte offset of the bad field; IATTR, bit 16, says whether that
    /// offset is in the Connect data (1) or in the SQE (0). (Linux nvmet and SPDK agree.)
    pub fn invalid_param_dw0(in_data: bool, offset: u16) -> u32 {
        (u32::from(in_data) << 16) | u32::from(offset)
    }

    /// Splits a "Connect Invalid Parameters" dword 0 into (IATTR: in the data, IPO: offset).
    pub fn invalid_param_from_dw0(dw0: u32) -> (bool, u16) {
        (dw0 & (1 << 16) != 0, (dw0 & 0xffff) as u16)
    }
}

/// Writes `s` into `field` as ASCII, padded with `pad` (spaces for SN/MN/FR, NUL for NQNs).
pub fn put_str(field: &mut [u8], s: &str, pad: u8) {
    field.fill(pad);
    let n = s.len().min(field.len());
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqe_round_trip_and_offsets() {
        let s = Sqe {
            opcode: io_op::WRITE,
            flags: PSDT_SGL_MPTR_CONTIG,
            cid: 0x1234,
            nsid: 7,
            sgl: SglDesc::in_capsule(0, 4096),
            cdw10: 0xdead_beef,
            cdw11: 0x1,
            cdw12: 7,
            cdw15: 0xffff_0000,
            ..Default::default()
        };
        let mut b = [0u8; SQE_SIZE];
        s.encode(&mut b);
        assert_eq!(b[0], 0x01);
        assert_eq!(&b[2..4], &[0x34, 0x12]);
        assert_eq!(&b[4..8], &[7, 0, 0, 0]);
        assert_eq!(
            b[39], 0x01,
            "SGL type byte is the last byte of the descriptor"
        );
        assert_eq!(&b[32..36], &4096u32.to_le_bytes());
        assert_eq!(&b[40..44], &0xdead_beefu32.to_le_bytes());
        assert_eq!(Sqe::decode(&b), s);
        assert_eq!(s.slba(), 0x1_dead_beef);
        assert_eq!(s.nlb(), 8);
    }

    #[test]
    fn cqe_round_trip_and_status_bits() {
        let c = Cqe {
            dw0: 5,
            dw1: 6,
            sqhd: 7,
            sqid: 1,
            cid: 9,
            status: Status::LBA_OUT_OF_RANGE.to_field(),
        };
        let mut b = [0u8; CQE_SIZE];
        c.encode(&mut b);
        let sw = u16::from_le_bytes([b[14], b[15]]);
        assert_eq!(sw & 1, 0, "phase bit clear");
        assert_eq!((sw >> 1) & 0xff, 0x80, "SC");
        assert_eq!((sw >> 9) & 0x7, 0, "SCT");
        assert_eq!(sw >> 15, 1, "DNR");
        assert_eq!(Cqe::decode(&b), c);
        assert_eq!(c.status(), Status::LBA_OUT_OF_RANGE);
        let h = Status::CONNECT_INVALID_HOST.to_field() << 1;
        assert_eq!((h >> 9) & 7, 1);
        assert_eq!((h >> 1) & 0xff, 0x84);
    }

    #[test]
    fn connect_fields() {
        let c = connect::ConnectCmd {
            recfmt: 0,
            qid: 3,
            sqsize: 127,
            cattr: 4,
            kato_ms: 0,
        };
        let s = c.to_sqe(1);
        let mut b = [0u8; SQE_SIZE];
        s.encode(&mut b);
        assert_eq!(b[4], fctype::CONNECT);
        assert_eq!(&b[42..44], &3u16.to_le_bytes());
        assert_eq!(&b[44..46], &127u16.to_le_bytes());
        assert_eq!(b[46], 4);
        assert_eq!(connect::ConnectCmd::from_sqe(&Sqe::decode(&b)), c);
        assert_eq!(connect::nqn_from_field(b"nqn.x\0\0junk"), Some("nqn.x"));
        // As Linux nvmet encodes "bad SUBNQN in the data": (1 << 16) | 256.
        assert_eq!(connect::invalid_param_dw0(true, 256), 0x0001_0100);
        assert_eq!(connect::invalid_param_dw0(false, 44), 44);
        assert_eq!(connect::invalid_param_from_dw0(0x0001_0200), (true, 512));
        assert_eq!(connect::invalid_param_from_dw0(42), (false, 42));
    }

    #[test]
    fn cap_fields() {
        let cap = prop::cap(127, 20);
        assert_eq!(cap & 0xffff, 127);
        assert_eq!((cap >> 16) & 1, 1);
        assert_eq!((cap >> 24) & 0xff, 20);
        assert_eq!((cap >> 37) & 1, 1);
        assert_eq!((cap >> 48) & 0xf, 0);
    }
}
