//! Identify data structures as byte builders (each is 4096 bytes on the wire): Identify
//! Controller, Identify Namespace, the active namespace id list and the namespace identification
//! descriptor list. Built on the admin path (any thread), never on the I/O path.

use super::put_str;

/// Size of every Identify data structure.
pub const IDENTIFY_SIZE: usize = 4096;

/// Controller type (CNTRLTYPE, byte 111).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControllerType {
    Io = 1,
    Discovery = 2,
}

/// The fields nvseal fills in Identify Controller.
#[derive(Clone, Debug)]
pub struct IdentifyController<'a> {
    pub serial: &'a str,
    pub model: &'a str,
    pub firmware: &'a str,
    pub cntlid: u16,
    pub ver: u32,
    pub ctrl_type: ControllerType,
    /// Maximum data transfer size as a power of two of 4 KiB pages (0 = no limit).
    pub mdts: u8,
    /// Abort command limit, 0-based.
    pub acl: u8,
    /// Async event request limit, 0-based.
    pub aerl: u8,
    /// Error log page entries, 0-based.
    pub elpe: u8,
    /// Keep alive support granularity in 100 ms units (0 = not supported).
    pub kas: u16,
    /// Maximum outstanding commands per queue.
    pub maxcmd: u16,
    /// Number of namespaces (highest NSID).
    pub nn: u32,
    /// Optional NVM commands supported (ONCS).
    pub oncs: u16,
    /// Optional admin commands supported (OACS): [`OACS_FORMAT_NVM`].
    pub oacs: u16,
    /// Format NVM attributes (FNA): [`FNA_CRYPTO_ERASE`], [`FNA_NO_BROADCAST_FORMAT`].
    pub fna: u8,
    /// Sanitize capabilities (SANICAP): [`SANICAP_CRYPTO_ERASE`] (0 = no sanitize action).
    pub sanicap: u32,
    /// Volatile write cache present.
    pub vwc: bool,
    /// Optional asynchronous events supported (OAES).
    pub oaes: u32,
    /// Controller attributes (CTRATT); fabrics controllers set [`CTRATT_HOST_ID_128`].
    pub ctratt: u32,
    pub subnqn: &'a str,
    /// I/O queue command capsule size in bytes (SQE + in-capsule data).
    pub ioccsz_bytes: u32,
    /// I/O queue response capsule size in bytes.
    pub iorcsz_bytes: u32,
}

/// ONCS bits.
pub const ONCS_DSM: u16 = 1 << 2;
pub const ONCS_WRITE_ZEROES: u16 = 1 << 3;
/// OACS bit 1: the Format NVM command is supported.
pub const OACS_FORMAT_NVM: u16 = 1 << 1;
/// FNA bit 2: cryptographic erase is supported as a Format NVM secure erase (SES = 2). Bits 0
/// and 1 stay clear: a format, and a secure erase, apply to the one namespace named.
pub const FNA_CRYPTO_ERASE: u8 = 1 << 2;
/// FNA bit 3: Format NVM does not accept the broadcast NSID FFFFFFFFh (name one namespace).
pub const FNA_NO_BROADCAST_FORMAT: u8 = 1 << 3;
/// SANICAP bit 0 (CES): the Sanitize crypto erase action is supported.
pub const SANICAP_CRYPTO_ERASE: u32 = 1 << 0;
/// OAES bit 8: namespace attribute notices.
pub const OAES_NS_ATTR: u32 = 1 << 8;
/// LPA bit 2: extended data for Get Log Page (offset and 32-bit NUMD).
pub const LPA_EXTENDED: u8 = 1 << 2;
/// CTRATT bit 0 (HIDS): 128-bit host identifier, which NVMe over Fabrics controllers must set
/// (the Connect data carries a 128-bit HOSTID).
pub const CTRATT_HOST_ID_128: u32 = 1 << 0;
/// FRMW: firmware slot 1 read-only (bit 0), one slot (NOFS, bits 3:1). A software target has no
/// firmware to download; the Firmware Slot Information log reports the version in slot 1.
pub const FRMW_ONE_READ_ONLY_SLOT: u8 = 1 | (1 << 1);

/// Byte offsets of Identify Controller fields (tests check them against the spec).
pub mod ctrl_off {
    pub const SN: usize = 4;
    pub const MN: usize = 24;
    pub const FR: usize = 64;
    pub const MDTS: usize = 77;
    pub const CNTLID: usize = 78;
    pub const VER: usize = 80;
    pub const OAES: usize = 92;
    pub const CTRATT: usize = 96;
    pub const CNTRLTYPE: usize = 111;
    pub const OACS: usize = 256;
    pub const ACL: usize = 258;
    pub const AERL: usize = 259;
    pub const FRMW: usize = 260;
    pub const LPA: usize = 261;
    pub const ELPE: usize = 262;
    pub const KAS: usize = 320;
    pub const SANICAP: usize = 328;
    pub const SQES: usize = 512;
    pub const CQES: usize = 513;
    pub const MAXCMD: usize = 514;
    pub const NN: usize = 516;
    pub const ONCS: usize = 520;
    pub const FNA: usize = 524;
    pub const VWC: usize = 525;
    pub const SGLS: usize = 536;
    pub const SUBNQN: usize = 768;
    pub const IOCCSZ: usize = 1792;
    pub const IORCSZ: usize = 1796;
    pub const ICDOFF: usize = 1800;
    pub const MSDBD: usize = 1803;
}

impl IdentifyController<'_> {
    pub fn build(&self, out: &mut [u8; IDENTIFY_SIZE]) {
        use ctrl_off::*;
        out.fill(0);
        put_str(&mut out[SN..SN + 20], self.serial, b' ');
        put_str(&mut out[MN..MN + 40], self.model, b' ');
        put_str(&mut out[FR..FR + 8], self.firmware, b' ');
        out[MDTS] = self.mdts;
        out[CNTLID..CNTLID + 2].copy_from_slice(&self.cntlid.to_le_bytes());
        out[VER..VER + 4].copy_from_slice(&self.ver.to_le_bytes());
        out[OAES..OAES + 4].copy_from_slice(&self.oaes.to_le_bytes());
        out[CTRATT..CTRATT + 4].copy_from_slice(&self.ctratt.to_le_bytes());
        out[CNTRLTYPE] = self.ctrl_type as u8;
        out[OACS..OACS + 2].copy_from_slice(&self.oacs.to_le_bytes());
        out[ACL] = self.acl;
        out[AERL] = self.aerl;
        out[FRMW] = FRMW_ONE_READ_ONLY_SLOT;
        out[LPA] = LPA_EXTENDED;
        out[ELPE] = self.elpe;
        out[KAS..KAS + 2].copy_from_slice(&self.kas.to_le_bytes());
        out[SANICAP..SANICAP + 4].copy_from_slice(&self.sanicap.to_le_bytes());
        // Required and maximum entry sizes, log2: 64-byte SQEs, 16-byte CQEs.
        out[SQES] = 0x66;
        out[CQES] = 0x44;
        out[MAXCMD..MAXCMD + 2].copy_from_slice(&self.maxcmd.to_le_bytes());
        out[NN..NN + 4].copy_from_slice(&self.nn.to_le_bytes());
        out[ONCS..ONCS + 2].copy_from_slice(&self.oncs.to_le_bytes());
        out[FNA] = self.fna;
        out[VWC] = u8::from(self.vwc);
        // SGLS: bit 0 = SGLs supported (no alignment requirement); bit 20 = offset-based
        // in-capsule data (Data Block descriptor, Offset subtype).
        let sgls: u32 = 1 | (1 << 20);
        out[SGLS..SGLS + 4].copy_from_slice(&sgls.to_le_bytes());
        put_str(&mut out[SUBNQN..SUBNQN + 256], self.subnqn, 0);
        out[IOCCSZ..IOCCSZ + 4].copy_from_slice(&(self.ioccsz_bytes / 16).to_le_bytes());
        out[IORCSZ..IORCSZ + 4].copy_from_slice(&(self.iorcsz_bytes / 16).to_le_bytes());
        // ICDOFF = 0: in-capsule data starts right after the SQE. MSDBD = 1 descriptor.
        out[ICDOFF..ICDOFF + 2].copy_from_slice(&0u16.to_le_bytes());
        out[MSDBD] = 1;
    }
}

/// Identify Namespace for a namespace of `nsze` blocks of `block_size` bytes.
pub fn build_namespace(
    out: &mut [u8; IDENTIFY_SIZE],
    nsze: u64,
    block_size: u32,
    nguid: &[u8; 16],
) {
    out.fill(0);
    out[0..8].copy_from_slice(&nsze.to_le_bytes()); // NSZE
    out[8..16].copy_from_slice(&nsze.to_le_bytes()); // NCAP
    out[16..24].copy_from_slice(&nsze.to_le_bytes()); // NUSE
    out[25] = 0; // NLBAF: one format (0-based)
    out[26] = 0; // FLBAS: format 0, no metadata
    out[104..120].copy_from_slice(nguid); // NGUID
    let lbads = block_size.trailing_zeros();
    out[128..132].copy_from_slice(&(lbads << 16).to_le_bytes()); // LBAF0: LBADS, MS = 0
}

/// Active namespace id list: the ids in `active` greater than `after`, ascending, at most 1024.
pub fn build_active_ns_list(
    out: &mut [u8; IDENTIFY_SIZE],
    active: impl Iterator<Item = u32>,
    after: u32,
) {
    out.fill(0);
    let mut ids = active.filter(|&n| n > after).collect::<Vec<_>>();
    ids.sort_unstable();
    for (slot, id) in out.chunks_exact_mut(4).zip(ids) {
        slot.copy_from_slice(&id.to_le_bytes());
    }
}

/// Namespace identification descriptor types.
pub const NIDT_NGUID: u8 = 0x02;
pub const NIDT_UUID: u8 = 0x03;

/// Namespace identification descriptor list: an NGUID and a UUID descriptor.
pub fn build_ns_id_descriptors(out: &mut [u8; IDENTIFY_SIZE], nguid: &[u8; 16], uuid: &[u8; 16]) {
    out.fill(0);
    out[0] = NIDT_NGUID;
    out[1] = 16;
    out[4..20].copy_from_slice(nguid);
    out[20] = NIDT_UUID;
    out[21] = 16;
    out[24..40].copy_from_slice(uuid);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_offsets() {
        let c = IdentifyController {
            serial: "SN1",
            model: "nvseal",
            firmware: "0.1",
            cntlid: 0x0102,
            ver: 0x0001_0400,
            ctrl_type: ControllerType::Io,
            mdts: 5,
            acl: 3,
            aerl: 3,
            elpe: 7,
            kas: 1,
            maxcmd: 128,
            nn: 4,
            oncs: ONCS_DSM | ONCS_WRITE_ZEROES,
            oacs: OACS_FORMAT_NVM,
            fna: FNA_CRYPTO_ERASE | FNA_NO_BROADCAST_FORMAT,
            sanicap: SANICAP_CRYPTO_ERASE,
            vwc: true,
            oaes: OAES_NS_ATTR,
            ctratt: CTRATT_HOST_ID_128,
            subnqn: "nqn.2026-01.io.nvseal:a",
            ioccsz_bytes: 64 + 8192,
            iorcsz_bytes: 16,
        };
        let mut b = [0u8; IDENTIFY_SIZE];
        c.build(&mut b);
        assert_eq!(&b[4..8], b"SN1 ");
        assert_eq!(b[23], b' ');
        assert_eq!(&b[24..30], b"nvseal");
        assert_eq!(b[77], 5);
        assert_eq!(&b[78..80], &[2, 1]);
        assert_eq!(b[111], 1);
        assert_eq!(&b[96..100], &[1, 0, 0, 0], "CTRATT.HIDS");
        assert_eq!(b[260], 0b11, "FRMW: one read-only slot");
        assert_eq!(b[512], 0x66);
        assert_eq!(b[513], 0x44);
        assert_eq!(&b[516..520], &4u32.to_le_bytes());
        assert_eq!(b[520], 0x0c);
        assert_eq!(&b[256..258], &[0b10, 0], "OACS: Format NVM");
        assert_eq!(b[524], 0b1100, "FNA: crypto erase, no broadcast NSID");
        assert_eq!(&b[328..332], &[1, 0, 0, 0], "SANICAP: crypto erase");
        assert_eq!(&b[768..791], b"nqn.2026-01.io.nvseal:a");
        assert_eq!(b[791], 0);
        assert_eq!(&b[1792..1796], &((64 + 8192) / 16u32).to_le_bytes());
        assert_eq!(&b[1796..1800], &1u32.to_le_bytes());
    }

    #[test]
    fn namespace_and_lists() {
        let mut b = [0u8; IDENTIFY_SIZE];
        build_namespace(&mut b, 1000, 4096, &[7; 16]);
        assert_eq!(&b[0..8], &1000u64.to_le_bytes());
        assert_eq!(&b[104..120], &[7; 16]);
        assert_eq!(
            (u32::from_le_bytes(b[128..132].try_into().unwrap()) >> 16) & 0xff,
            12
        );
        build_active_ns_list(&mut b, [3u32, 1, 2].into_iter(), 1);
        assert_eq!(&b[0..12], &[2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
        build_ns_id_descriptors(&mut b, &[1; 16], &[2; 16]);
        assert_eq!(&b[0..4], &[2, 16, 0, 0]);
        assert_eq!(&b[20..24], &[3, 16, 0, 0]);
        assert_eq!(&b[24..40], &[2; 16]);
        assert_eq!(b[40], 0, "list terminated by a zero descriptor");
    }
}
