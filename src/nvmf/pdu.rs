//! NVMe/TCP PDU codec (NVMe/TCP Transport spec): the 8-byte common header, the nine PDU types,
//! header and data digests (CRC32C), and data placement (PDO/PDA).
//!
//! Pure functions, no I/O: the reactor that owns a connection (or a host queue pair) calls them.
//! Decoding is split in two steps so a streaming receiver can read exactly what it needs:
//! [`CommonHeader::parse`] + [`CommonHeader::layout`] validate the first 8 bytes and say how long
//! the header, padding, data and digest are; [`decode_header`] decodes the PDU-specific header
//! once it is in. [`decode`] does both on a complete PDU in one buffer (tests, fuzzing).
//! Every input-derived length is checked with checked arithmetic; nothing here panics on input.
//! Encoders write into caller-provided buffers and never allocate.

use crate::nvme::{Cqe, Sqe, CQE_SIZE, SQE_SIZE};

/// Length of the common header.
pub const CH_LEN: usize = 8;
/// Length of a digest.
pub const DIGEST_LEN: usize = 4;
/// Longest header region a receiver must buffer: a 128-byte header, its digest, and padding up
/// to the largest PDO a PDA of 31 can require (256 covers a TermReq with 128 bytes of data too).
pub const MAX_HEADER_REGION: usize = 256;

/// PDU types.
pub mod pdu_type {
    pub const IC_REQ: u8 = 0x00;
    pub const IC_RESP: u8 = 0x01;
    pub const H2C_TERM_REQ: u8 = 0x02;
    pub const C2H_TERM_REQ: u8 = 0x03;
    pub const CAPSULE_CMD: u8 = 0x04;
    pub const CAPSULE_RESP: u8 = 0x05;
    pub const H2C_DATA: u8 = 0x06;
    pub const C2H_DATA: u8 = 0x07;
    pub const R2T: u8 = 0x09;
}

/// Common-header flags.
pub mod flags {
    pub const HDGSTF: u8 = 0x01;
    pub const DDGSTF: u8 = 0x02;
    /// H2CData/C2HData: last PDU of the transfer.
    pub const LAST_PDU: u8 = 0x04;
    /// C2HData: the command completed successfully; no CapsuleResp follows.
    pub const SUCCESS: u8 = 0x08;
}

/// Fixed header lengths (HLEN) per PDU type.
pub const HLEN_IC: u8 = 128;
pub const HLEN_TERM: u8 = 24;
pub const HLEN_CMD: u8 = (CH_LEN + SQE_SIZE) as u8;
pub const HLEN_RESP: u8 = (CH_LEN + CQE_SIZE) as u8;
pub const HLEN_DATA: u8 = 24;
pub const HLEN_R2T: u8 = 24;
/// A TermReq carries at most this many bytes of the offending PDU header.
pub const TERM_MAX_DATA: usize = 128;

/// Fatal error status (FES) values of H2CTermReq/C2HTermReq.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fes {
    InvalidHeaderField = 0x01,
    PduSequenceError = 0x02,
    HeaderDigestError = 0x03,
    DataOutOfRange = 0x04,
    DataLimitExceeded = 0x05,
    UnsupportedParameter = 0x06,
}

/// Digests negotiated at connection setup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// Why a PDU was rejected. [`PduError::fes`] maps it to the TermReq the peer gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("truncated PDU: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("unknown PDU type {0:#04x}")]
    UnknownType(u8),
    #[error("PDU type {pdu_type:#04x}: invalid header field at byte {offset}")]
    InvalidField { pdu_type: u8, offset: u32 },
    #[error("PDU length {plen} over the limit {max}")]
    TooLong { plen: u32, max: u32 },
    #[error("header digest mismatch: computed {computed:#010x}, received {received:#010x}")]
    HeaderDigest { computed: u32, received: u32 },
    #[error("data digest mismatch: computed {computed:#010x}, received {received:#010x}")]
    DataDigest { computed: u32, received: u32 },
}

/// Byte offsets of common-header fields (FEI values for invalid-field errors).
pub const OFF_TYPE: u32 = 0;
pub const OFF_FLAGS: u32 = 1;
pub const OFF_HLEN: u32 = 2;
pub const OFF_PDO: u32 = 3;
pub const OFF_PLEN: u32 = 4;

impl PduError {
    /// The fatal error status and field information to report in a TermReq, or `None` where the
    /// spec defines no TermReq (a data digest error is handled by tearing the connection down).
    pub fn fes(&self) -> Option<(Fes, u32)> {
        match *self {
            PduError::Truncated { .. } => Some((Fes::InvalidHeaderField, OFF_PLEN)),
            PduError::UnknownType(_) => Some((Fes::InvalidHeaderField, OFF_TYPE)),
            PduError::InvalidField { offset, .. } => Some((Fes::InvalidHeaderField, offset)),
            PduError::TooLong { .. } => Some((Fes::DataLimitExceeded, OFF_PLEN)),
            PduError::HeaderDigest { .. } => Some((Fes::HeaderDigestError, 0)),
            PduError::DataDigest { .. } => None,
        }
    }
}

/// CRC32C as NVMe/TCP uses it (the digest goes on the wire little-endian).
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Continues a CRC32C over more data (`crc` from a previous call, 0 to start).
#[inline]
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

/// The 8-byte common header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommonHeader {
    pub pdu_type: u8,
    pub flags: u8,
    pub hlen: u8,
    pub pdo: u8,
    pub plen: u32,
}

/// Where the parts of a PDU lie, derived from a validated common header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of the header including its digest (HLEN + 4 when the header digest is on).
    pub header_len: usize,
    /// Offset of the data (PDO); equals `header_len` plus padding. 0 data bytes: = `header_len`.
    pub data_off: usize,
    /// Bytes of data (without padding or digest).
    pub data_len: usize,
    /// Whether a data digest follows the data.
    pub data_digest: bool,
}

impl Layout {
    /// Total PDU length.
    pub fn total(&self) -> usize {
        self.data_off + self.data_len + if self.data_digest { DIGEST_LEN } else { 0 }
    }
}

impl CommonHeader {
    pub fn parse(b: &[u8; CH_LEN]) -> Self {
        CommonHeader {
            pdu_type: b[0],
            flags: b[1],
            hlen: b[2],
            pdo: b[3],
            plen: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    pub fn encode(&self, out: &mut [u8; CH_LEN]) {
        out[0] = self.pdu_type;
        out[1] = self.flags;
        out[2] = self.hlen;
        out[3] = self.pdo;
        out[4..8].copy_from_slice(&self.plen.to_le_bytes());
    }

    /// Validates the header against the PDU type's fixed lengths, the negotiated digests and
    /// `max_plen`, and computes the layout. Never panics.
    pub fn layout(&self, dg: Digests, max_plen: u32) -> Result<Layout, PduError> {
        use pdu_type::*;
        let ty = self.pdu_type;
        let bad = |offset| PduError::InvalidField {
            pdu_type: ty,
            offset,
        };
        let (hlen, may_have_data, must_have_data, digests_apply) = match ty {
            IC_REQ | IC_RESP => (HLEN_IC, false, false, false),
            H2C_TERM_REQ | C2H_TERM_REQ => (HLEN_TERM, true, false, false),
            CAPSULE_CMD => (HLEN_CMD, true, false, true),
            CAPSULE_RESP => (HLEN_RESP, false, false, true),
            H2C_DATA | C2H_DATA => (HLEN_DATA, true, true, true),
            R2T => (HLEN_R2T, false, false, true),
            other => return Err(PduError::UnknownType(other)),
        };
        if self.hlen != hlen {
            return Err(bad(OFF_HLEN));
        }
        if self.plen > max_plen {
            return Err(PduError::TooLong {
                plen: self.plen,
                max: max_plen,
            });
        }
        let plen = self.plen as usize;
        if matches!(ty, H2C_TERM_REQ | C2H_TERM_REQ) {
            // TermReq: the data (offending header) follows the header directly, no digests.
            if plen < usize::from(hlen) || plen > usize::from(hlen) + TERM_MAX_DATA {
                return Err(bad(OFF_PLEN));
            }
            return Ok(Layout {
                header_len: usize::from(hlen),
                data_off: usize::from(hlen),
                data_len: plen - usize::from(hlen),
                data_digest: false,
            });
        }
        let hd = digests_apply && dg.header;
        let dd = digests_apply && dg.data;
        // The digest flags must agree with what was negotiated.
        if (self.flags & flags::HDGSTF != 0) != hd {
            return Err(bad(OFF_FLAGS));
        }
        let header_len = usize::from(hlen) + if hd { DIGEST_LEN } else { 0 };
        if plen < header_len {
            return Err(bad(OFF_PLEN));
        }
        if plen == header_len {
            if must_have_data || (self.flags & flags::DDGSTF != 0) {
                return Err(bad(OFF_PLEN));
            }
            return Ok(Layout {
                header_len,
                data_off: header_len,
                data_len: 0,
                data_digest: false,
            });
        }
        if !may_have_data {
            return Err(bad(OFF_PLEN));
        }
        if (self.flags & flags::DDGSTF != 0) != dd {
            return Err(bad(OFF_FLAGS));
        }
        let pdo = usize::from(self.pdo);
        if pdo < header_len || pdo > MAX_HEADER_REGION {
            return Err(bad(OFF_PDO));
        }
        let tail = if dd { DIGEST_LEN } else { 0 };
        let data_len = plen
            .checked_sub(pdo)
            .and_then(|x| x.checked_sub(tail))
            .ok_or(bad(OFF_PLEN))?;
        if data_len == 0 {
            return Err(bad(OFF_PLEN));
        }
        Ok(Layout {
            header_len,
            data_off: pdo,
            data_len,
            data_digest: dd,
        })
    }
}

/// ICReq (host → controller).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcReq {
    pub pfv: u16,
    /// Host PDU data alignment, 0-based in dwords.
    pub hpda: u8,
    pub digests: Digests,
    /// Maximum outstanding R2Ts per command, 0-based.
    pub maxr2t: u32,
}

/// ICResp (controller → host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcResp {
    pub pfv: u16,
    /// Controller PDU data alignment, 0-based in dwords.
    pub cpda: u8,
    pub digests: Digests,
    /// Maximum H2CData data length the controller accepts.
    pub maxh2cdata: u32,
}

/// H2CData / C2HData header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataHdr {
    pub cccid: u16,
    /// Transfer tag (H2CData only; reserved in C2HData).
    pub ttag: u16,
    pub datao: u32,
    pub datal: u32,
    pub flags: u8,
}

/// R2T fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct R2t {
    pub cccid: u16,
    pub ttag: u16,
    pub r2to: u32,
    pub r2tl: u32,
}

/// TermReq fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TermReq {
    pub fes: u16,
    pub fei: u32,
}

/// A decoded PDU header (the data, if any, is located by its [`Layout`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PduHeader {
    IcReq(IcReq),
    IcResp(IcResp),
    H2CTermReq(TermReq),
    C2HTermReq(TermReq),
    CapsuleCmd(Sqe),
    CapsuleResp(Cqe),
    H2CData(DataHdr),
    C2HData(DataHdr),
    R2T(R2t),
}

fn rd16(b: &[u8], o: usize) -> Result<u16, PduError> {
    let s = b.get(o..o + 2).ok_or(PduError::Truncated {
        need: o + 2,
        have: b.len(),
    })?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}
fn rd32(b: &[u8], o: usize) -> Result<u32, PduError> {
    let s = b.get(o..o + 4).ok_or(PduError::Truncated {
        need: o + 4,
        have: b.len(),
    })?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Decodes the PDU-specific header. `hdr` holds the header region (at least `layout.header_len`
/// bytes, common header included); the header digest, if on, is verified here.
pub fn decode_header(
    ch: &CommonHeader,
    layout: &Layout,
    hdr: &[u8],
) -> Result<PduHeader, PduError> {
    use pdu_type::*;
    if hdr.len() < layout.header_len {
        return Err(PduError::Truncated {
            need: layout.header_len,
            have: hdr.len(),
        });
    }
    let hlen = usize::from(ch.hlen);
    if layout.header_len > hlen {
        let received = rd32(hdr, hlen)?;
        let computed = crc32c(hdr.get(..hlen).unwrap_or_default());
        if received != computed {
            return Err(PduError::HeaderDigest { computed, received });
        }
    }
    let ty = ch.pdu_type;
    let bad = |offset| PduError::InvalidField {
        pdu_type: ty,
        offset,
    };
    Ok(match ty {
        IC_REQ | IC_RESP => {
            let pfv = rd16(hdr, 8)?;
            let pda = *hdr.get(10).ok_or(bad(10))?;
            let dgst = *hdr.get(11).ok_or(bad(11))?;
            let word = rd32(hdr, 12)?;
            if pda > 31 {
                return Err(bad(10));
            }
            let digests = Digests {
                header: dgst & 1 != 0,
                data: dgst & 2 != 0,
            };
            if ty == IC_REQ {
                PduHeader::IcReq(IcReq {
                    pfv,
                    hpda: pda,
                    digests,
                    maxr2t: word,
                })
            } else {
                PduHeader::IcResp(IcResp {
                    pfv,
                    cpda: pda,
                    digests,
                    maxh2cdata: word,
                })
            }
        }
        H2C_TERM_REQ | C2H_TERM_REQ => {
            let t = TermReq {
                fes: rd16(hdr, 8)?,
                fei: rd32(hdr, 10)?,
            };
            if ty == H2C_TERM_REQ {
                PduHeader::H2CTermReq(t)
            } else {
                PduHeader::C2HTermReq(t)
            }
        }
        CAPSULE_CMD => {
            let s: &[u8; SQE_SIZE] = hdr
                .get(CH_LEN..CH_LEN + SQE_SIZE)
                .and_then(|s| s.try_into().ok())
                .ok_or(bad(OFF_HLEN))?;
            PduHeader::CapsuleCmd(Sqe::decode(s))
        }
        CAPSULE_RESP => {
            let c: &[u8; CQE_SIZE] = hdr
                .get(CH_LEN..CH_LEN + CQE_SIZE)
                .and_then(|s| s.try_into().ok())
                .ok_or(bad(OFF_HLEN))?;
            PduHeader::CapsuleResp(Cqe::decode(c))
        }
        H2C_DATA | C2H_DATA => {
            let d = DataHdr {
                cccid: rd16(hdr, 8)?,
                ttag: rd16(hdr, 10)?,
                datao: rd32(hdr, 12)?,
                datal: rd32(hdr, 16)?,
                flags: ch.flags & (flags::LAST_PDU | flags::SUCCESS),
            };
            if d.datal as usize != layout.data_len {
                return Err(bad(16));
            }
            if ty == H2C_DATA {
                PduHeader::H2CData(d)
            } else {
                PduHeader::C2HData(d)
            }
        }
        R2T => {
            let r = R2t {
                cccid: rd16(hdr, 8)?,
                ttag: rd16(hdr, 10)?,
                r2to: rd32(hdr, 12)?,
                r2tl: rd32(hdr, 16)?,
            };
            if r.r2tl == 0 {
                return Err(bad(16));
            }
            PduHeader::R2T(r)
        }
        other => return Err(PduError::UnknownType(other)),
    })
}

/// A complete decoded PDU borrowing its data from the input buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pdu<'a> {
    pub header: PduHeader,
    pub data: &'a [u8],
}

/// Decodes one complete PDU at the start of `buf`; returns it and the bytes it used. Verifies
/// both digests when negotiated. `max_plen` bounds the PDU length.
pub fn decode(buf: &[u8], dg: Digests, max_plen: u32) -> Result<(Pdu<'_>, usize), PduError> {
    let ch_bytes: &[u8; CH_LEN] =
        buf.get(..CH_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(PduError::Truncated {
                need: CH_LEN,
                have: buf.len(),
            })?;
    let ch = CommonHeader::parse(ch_bytes);
    let layout = ch.layout(dg, max_plen)?;
    let total = layout.total();
    if buf.len() < total {
        return Err(PduError::Truncated {
            need: total,
            have: buf.len(),
        });
    }
    let header = decode_header(&ch, &layout, &buf[..layout.header_len])?;
    let data_end = layout.data_off + layout.data_len;
    let data = buf.get(layout.data_off..data_end).unwrap_or_default();
    if layout.data_digest {
        let received = rd32(buf, data_end)?;
        let computed = crc32c(data);
        if received != computed {
            return Err(PduError::DataDigest { computed, received });
        }
    }
    Ok((Pdu { header, data }, total))
}

// ---------------------------------------------------------------------------------------------
// Encoders. Each writes a header (with digest and PDO padding) into `out` and returns its length
// (= PDO when data follows). The caller sends the data and, if on, `crc32c(data)` after it.

/// Data offset for a header of `header_len` bytes under a PDU data alignment `pda` (0-based
/// dwords; 0 means no alignment).
pub fn data_offset(header_len: usize, pda: u8) -> usize {
    if pda == 0 {
        header_len
    } else {
        let a = (usize::from(pda) + 1) * 4;
        header_len.div_ceil(a) * a
    }
}

/// Finishes a header: common header, digest, padding. `hlen` bytes of `out` hold the type
/// specific fields already (bytes 8..hlen). Returns the header region length.
fn finish(
    out: &mut [u8],
    ty: u8,
    mut fl: u8,
    hlen: u8,
    data_len: usize,
    dg: Digests,
    pda: u8,
) -> usize {
    let hl = usize::from(hlen);
    if dg.header {
        fl |= flags::HDGSTF;
    }
    let header_len = hl + if dg.header { DIGEST_LEN } else { 0 };
    let (pdo, plen) = if data_len > 0 {
        if dg.data {
            fl |= flags::DDGSTF;
        }
        let pdo = data_offset(header_len, pda);
        (pdo, pdo + data_len + if dg.data { DIGEST_LEN } else { 0 })
    } else {
        (header_len, header_len)
    };
    let ch = CommonHeader {
        pdu_type: ty,
        flags: fl,
        hlen,
        pdo: if data_len > 0 { pdo as u8 } else { 0 },
        plen: plen as u32,
    };
    let mut c = [0u8; CH_LEN];
    ch.encode(&mut c);
    out[..CH_LEN].copy_from_slice(&c);
    if dg.header {
        let d = crc32c(&out[..hl]);
        out[hl..hl + DIGEST_LEN].copy_from_slice(&d.to_le_bytes());
    }
    out[header_len..pdo].fill(0);
    pdo
}

fn clear_hdr(out: &mut [u8], hlen: u8) {
    out[CH_LEN..usize::from(hlen)].fill(0);
}

/// Writes an ICReq (128 bytes).
pub fn encode_ic_req(out: &mut [u8; 128], r: &IcReq) -> usize {
    clear_hdr(out, HLEN_IC);
    out[8..10].copy_from_slice(&r.pfv.to_le_bytes());
    out[10] = r.hpda;
    out[11] = u8::from(r.digests.header) | (u8::from(r.digests.data) << 1);
    out[12..16].copy_from_slice(&r.maxr2t.to_le_bytes());
    finish(out, pdu_type::IC_REQ, 0, HLEN_IC, 0, Digests::default(), 0)
}

/// Writes an ICResp (128 bytes).
pub fn encode_ic_resp(out: &mut [u8; 128], r: &IcResp) -> usize {
    clear_hdr(out, HLEN_IC);
    out[8..10].copy_from_slice(&r.pfv.to_le_bytes());
    out[10] = r.cpda;
    out[11] = u8::from(r.digests.header) | (u8::from(r.digests.data) << 1);
    out[12..16].copy_from_slice(&r.maxh2cdata.to_le_bytes());
    finish(out, pdu_type::IC_RESP, 0, HLEN_IC, 0, Digests::default(), 0)
}

/// Writes a TermReq header followed by up to 128 bytes of the offending header; returns the
/// whole PDU length. `out` must hold 24 + 128 bytes.
pub fn encode_term_req(
    out: &mut [u8; HLEN_TERM as usize + TERM_MAX_DATA],
    c2h: bool,
    t: &TermReq,
    offending: &[u8],
) -> usize {
    let hl = usize::from(HLEN_TERM);
    clear_hdr(out, HLEN_TERM);
    out[8..10].copy_from_slice(&t.fes.to_le_bytes());
    out[10..14].copy_from_slice(&t.fei.to_le_bytes());
    let n = offending.len().min(TERM_MAX_DATA);
    out[hl..hl + n].copy_from_slice(&offending[..n]);
    let ty = if c2h {
        pdu_type::C2H_TERM_REQ
    } else {
        pdu_type::H2C_TERM_REQ
    };
    let ch = CommonHeader {
        pdu_type: ty,
        flags: 0,
        hlen: HLEN_TERM,
        pdo: 0,
        plen: (hl + n) as u32,
    };
    let mut c = [0u8; CH_LEN];
    ch.encode(&mut c);
    out[..CH_LEN].copy_from_slice(&c);
    hl + n
}

/// Writes a CapsuleCmd header for `data_len` bytes of in-capsule data. `out` ≥ 72 + 4 + pad.
pub fn encode_capsule_cmd(
    out: &mut [u8],
    sqe: &Sqe,
    data_len: usize,
    dg: Digests,
    pda: u8,
) -> usize {
    let mut s = [0u8; SQE_SIZE];
    sqe.encode(&mut s);
    out[CH_LEN..CH_LEN + SQE_SIZE].copy_from_slice(&s);
    finish(out, pdu_type::CAPSULE_CMD, 0, HLEN_CMD, data_len, dg, pda)
}

/// Writes a CapsuleResp (24 bytes, 28 with a header digest).
pub fn encode_capsule_resp(out: &mut [u8], cqe: &Cqe, dg: Digests) -> usize {
    let mut c = [0u8; CQE_SIZE];
    cqe.encode(&mut c);
    out[CH_LEN..CH_LEN + CQE_SIZE].copy_from_slice(&c);
    finish(out, pdu_type::CAPSULE_RESP, 0, HLEN_RESP, 0, dg, 0)
}

fn encode_data(out: &mut [u8], ty: u8, d: &DataHdr, dg: Digests, pda: u8) -> usize {
    clear_hdr(out, HLEN_DATA);
    out[8..10].copy_from_slice(&d.cccid.to_le_bytes());
    out[10..12].copy_from_slice(&d.ttag.to_le_bytes());
    out[12..16].copy_from_slice(&d.datao.to_le_bytes());
    out[16..20].copy_from_slice(&d.datal.to_le_bytes());
    let fl = d.flags & (flags::LAST_PDU | flags::SUCCESS);
    finish(out, ty, fl, HLEN_DATA, d.datal as usize, dg, pda)
}

/// Writes an H2CData header (`pda` = the controller's CPDA).
pub fn encode_h2c_data(out: &mut [u8], d: &DataHdr, dg: Digests, cpda: u8) -> usize {
    encode_data(out, pdu_type::H2C_DATA, d, dg, cpda)
}

/// Writes a C2HData header (`pda` = the host's HPDA).
pub fn encode_c2h_data(out: &mut [u8], d: &DataHdr, dg: Digests, hpda: u8) -> usize {
    encode_data(out, pdu_type::C2H_DATA, d, dg, hpda)
}

/// Writes an R2T (24 bytes, 28 with a header digest).
pub fn encode_r2t(out: &mut [u8], r: &R2t, dg: Digests) -> usize {
    clear_hdr(out, HLEN_R2T);
    out[8..10].copy_from_slice(&r.cccid.to_le_bytes());
    out[10..12].copy_from_slice(&r.ttag.to_le_bytes());
    out[12..16].copy_from_slice(&r.r2to.to_le_bytes());
    out[16..20].copy_from_slice(&r.r2tl.to_le_bytes());
    finish(out, pdu_type::R2T, 0, HLEN_R2T, 0, dg, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::{io_op, SglDesc, Status};

    const ALL: [Digests; 4] = [
        Digests {
            header: false,
            data: false,
        },
        Digests {
            header: true,
            data: false,
        },
        Digests {
            header: false,
            data: true,
        },
        Digests {
            header: true,
            data: true,
        },
    ];

    fn with_data(hdr: &[u8], data: &[u8], dg: Digests) -> Vec<u8> {
        let mut v = hdr.to_vec();
        v.extend_from_slice(data);
        if dg.data && !data.is_empty() {
            v.extend_from_slice(&crc32c(data).to_le_bytes());
        }
        v
    }

    #[test]
    fn crc32c_known_vector() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(
            crc32c_append(crc32c(b"1234"), b"56789"),
            crc32c(b"123456789")
        );
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn ic_round_trip() {
        let mut b = [0u8; 128];
        let r = IcReq {
            pfv: 0,
            hpda: 3,
            digests: Digests {
                header: true,
                data: false,
            },
            maxr2t: 0,
        };
        assert_eq!(encode_ic_req(&mut b, &r), 128);
        assert_eq!(&b[..8], &[0, 0, 128, 0, 128, 0, 0, 0]);
        let (p, n) = decode(&b, Digests::default(), 4096).unwrap();
        assert_eq!(n, 128);
        assert_eq!(p.header, PduHeader::IcReq(r));
        let rs = IcResp {
            pfv: 0,
            cpda: 0,
            digests: Digests {
                header: true,
                data: true,
            },
            maxh2cdata: 131072,
        };
        encode_ic_resp(&mut b, &rs);
        assert_eq!(
            decode(&b, Digests::default(), 4096).unwrap().0.header,
            PduHeader::IcResp(rs)
        );
    }

    #[test]
    fn capsule_and_data_round_trip_all_digests_and_alignments() {
        let sqe = Sqe {
            opcode: io_op::WRITE,
            cid: 9,
            nsid: 1,
            sgl: SglDesc::in_capsule(0, 100),
            ..Default::default()
        };
        let data: Vec<u8> = (0..100u8).collect();
        for dg in ALL {
            for pda in [0u8, 1, 7, 31] {
                let mut h = [0u8; MAX_HEADER_REGION];
                let pdo = encode_capsule_cmd(&mut h, &sqe, data.len(), dg, pda);
                assert_eq!(pdo % ((usize::from(pda) + 1) * 4), 0);
                let buf = with_data(&h[..pdo], &data, dg);
                let (p, n) = decode(&buf, dg, 1 << 20).unwrap();
                assert_eq!(n, buf.len());
                assert_eq!(p.header, PduHeader::CapsuleCmd(sqe));
                assert_eq!(p.data, &data[..]);

                let d = DataHdr {
                    cccid: 9,
                    ttag: 3,
                    datao: 4096,
                    datal: 100,
                    flags: flags::LAST_PDU,
                };
                let pdo = encode_h2c_data(&mut h, &d, dg, pda);
                let buf = with_data(&h[..pdo], &data, dg);
                let (p, _) = decode(&buf, dg, 1 << 20).unwrap();
                assert_eq!(p.header, PduHeader::H2CData(d));
                let pdo = encode_c2h_data(
                    &mut h,
                    &DataHdr {
                        flags: flags::LAST_PDU | flags::SUCCESS,
                        ..d
                    },
                    dg,
                    pda,
                );
                let buf = with_data(&h[..pdo], &data, dg);
                assert!(
                    matches!(decode(&buf, dg, 1 << 20).unwrap().0.header, PduHeader::C2HData(x) if x.flags & flags::SUCCESS != 0)
                );
            }
            let mut h = [0u8; MAX_HEADER_REGION];
            let cqe = Cqe::new(9, Status::LBA_OUT_OF_RANGE);
            let n = encode_capsule_resp(&mut h, &cqe, dg);
            assert_eq!(n, 24 + if dg.header { 4 } else { 0 });
            assert_eq!(
                decode(&h[..n], dg, 4096).unwrap().0.header,
                PduHeader::CapsuleResp(cqe)
            );
            let r = R2t {
                cccid: 1,
                ttag: 2,
                r2to: 8192,
                r2tl: 4096,
            };
            let n = encode_r2t(&mut h, &r, dg);
            assert_eq!(
                decode(&h[..n], dg, 4096).unwrap().0.header,
                PduHeader::R2T(r)
            );
        }
    }

    #[test]
    fn term_req_round_trip() {
        let mut b = [0u8; 24 + TERM_MAX_DATA];
        let n = encode_term_req(
            &mut b,
            true,
            &TermReq {
                fes: Fes::HeaderDigestError as u16,
                fei: 0,
            },
            &[1u8; 200],
        );
        assert_eq!(n, 24 + 128);
        let (p, _) = decode(
            &b[..n],
            Digests {
                header: true,
                data: true,
            },
            4096,
        )
        .unwrap();
        assert_eq!(p.header, PduHeader::C2HTermReq(TermReq { fes: 3, fei: 0 }));
        assert_eq!(p.data.len(), 128);
    }

    #[test]
    fn malformed_inputs_are_typed_errors() {
        let dg = Digests::default();
        assert!(matches!(
            decode(&[], dg, 4096),
            Err(PduError::Truncated { need: 8, have: 0 })
        ));
        let mut b = [0u8; MAX_HEADER_REGION];
        let n = encode_capsule_resp(&mut b, &Cqe::new(1, Status::SUCCESS), dg);
        assert!(matches!(
            decode(&b[..n - 1], dg, 4096),
            Err(PduError::Truncated { .. })
        ));
        // Unknown type.
        let mut x = b;
        x[0] = 0x08;
        assert_eq!(
            decode(&x[..n], dg, 4096).unwrap_err(),
            PduError::UnknownType(8)
        );
        // Wrong HLEN.
        let mut x = b;
        x[2] = 25;
        assert_eq!(
            decode(&x[..n], dg, 4096).unwrap_err().fes(),
            Some((Fes::InvalidHeaderField, OFF_HLEN))
        );
        // PLEN smaller than the header.
        let mut x = b;
        x[4] = 10;
        assert!(matches!(
            decode(&x[..n], dg, 4096),
            Err(PduError::InvalidField {
                offset: OFF_PLEN,
                ..
            })
        ));
        // PLEN over the limit.
        let mut x = b;
        x[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode(&x[..n], dg, 4096).unwrap_err().fes(),
            Some((Fes::DataLimitExceeded, OFF_PLEN))
        );
        // Header digest flag set but not negotiated.
        let mut x = b;
        x[1] = flags::HDGSTF;
        assert!(matches!(
            decode(&x[..n], dg, 4096),
            Err(PduError::InvalidField {
                offset: OFF_FLAGS,
                ..
            })
        ));
        // Bad header digest.
        let hd = Digests {
            header: true,
            data: false,
        };
        let n = encode_capsule_resp(&mut b, &Cqe::new(1, Status::SUCCESS), hd);
        b[10] ^= 1;
        assert!(matches!(
            decode(&b[..n], hd, 4096),
            Err(PduError::HeaderDigest { .. })
        ));
        // Bad data digest.
        let dd = Digests {
            header: false,
            data: true,
        };
        let sqe = Sqe {
            opcode: 1,
            ..Default::default()
        };
        let pdo = encode_capsule_cmd(&mut b, &sqe, 4, dd, 0);
        let mut v = with_data(&b[..pdo], &[1, 2, 3, 4], dd);
        let last = v.len() - 1;
        v[last] ^= 0xff;
        assert!(matches!(
            decode(&v, dd, 4096),
            Err(PduError::DataDigest { .. })
        ));
        assert_eq!(decode(&v, dd, 4096).unwrap_err().fes(), None);
        // H2CData whose DATAL disagrees with PLEN.
        let d = DataHdr {
            cccid: 1,
            ttag: 0,
            datao: 0,
            datal: 8,
            flags: 0,
        };
        let pdo = encode_h2c_data(&mut b, &d, dg, 0);
        let mut v = with_data(&b[..pdo], &[0; 8], dg);
        v[16] = 9;
        assert!(matches!(
            decode(&v, dg, 4096),
            Err(PduError::InvalidField { offset: 16, .. })
        ));
        // Data PDU without data.
        let mut v = b[..24].to_vec();
        v[4] = 24;
        assert!(decode(&v, dg, 4096).is_err());
        // PDO pointing inside the header.
        let pdo = encode_capsule_cmd(&mut b, &sqe, 4, dg, 0);
        let mut v = with_data(&b[..pdo], &[1, 2, 3, 4], dg);
        v[3] = 8;
        assert!(matches!(
            decode(&v, dg, 4096),
            Err(PduError::InvalidField {
                offset: OFF_PDO,
                ..
            })
        ));
    }

    #[test]
    fn every_prefix_and_every_single_byte_flip_is_handled() {
        // Exhaustive small fuzz: no panics, and a successful decode never reads past the input.
        let dg = Digests {
            header: true,
            data: true,
        };
        let sqe = Sqe {
            opcode: 1,
            cid: 3,
            ..Default::default()
        };
        let mut b = [0u8; MAX_HEADER_REGION];
        let pdo = encode_capsule_cmd(&mut b, &sqe, 16, dg, 3);
        let v = with_data(&b[..pdo], &[0xab; 16], dg);
        for cut in 0..v.len() {
            assert!(decode(&v[..cut], dg, 4096).is_err());
        }
        for i in 0..v.len() {
            for bit in 0..8 {
                let mut x = v.clone();
                x[i] ^= 1 << bit;
                if let Ok((_, n)) = decode(&x, dg, 4096) {
                    assert!(n <= x.len());
                }
            }
        }
    }
}
