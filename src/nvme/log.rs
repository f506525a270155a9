//! Log page byte builders: Error Information entries, SMART / Health Information, Changed
//! Namespace List, Sanitize Status, and the Discovery log page (header + entries). Built on the admin path.

use super::put_str;

/// Size of one Error Information log entry.
pub const ERROR_ENTRY_SIZE: usize = 64;
/// Size of the SMART / Health Information log page.
pub const SMART_SIZE: usize = 512;
/// Size of the Changed Namespace List log page (1024 NSIDs).
pub const CHANGED_NS_SIZE: usize = 4096;
/// Size of the discovery log page header and of each entry.
pub const DISCOVERY_HEADER_SIZE: usize = 1024;
pub const DISCOVERY_ENTRY_SIZE: usize = 1024;

/// Size of the Sanitize Status log page (81h).
pub const SANITIZE_STATUS_SIZE: usize = 512;

/// Sanitize Status SSTAT bits 2:0.
pub mod sstat {
    /// The NVM subsystem has never been sanitized.
    pub const NEVER: u16 = 0;
    /// The most recent sanitize operation completed successfully.
    pub const COMPLETED: u16 = 1;
    /// A sanitize operation is in progress.
    pub const IN_PROGRESS: u16 = 2;
    /// The most recent sanitize operation failed.
    pub const FAILED: u16 = 3;
}

/// SPROG while no sanitize operation is in progress.
pub const SPROG_IDLE: u16 = 0xffff;
/// An estimated-time field with no time period reported (or an action not supported).
pub const SANITIZE_NO_ESTIMATE: u32 = 0xffff_ffff;

/// The Sanitize Status log page (81h) fields nvseal reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SanitizeStatus {
    /// Progress of the operation in progress, in 1/65536 ([`SPROG_IDLE`] when none is).
    pub sprog: u16,
    /// Status of the most recent operation ([`sstat`]); overwrite passes and Global Data
    /// Erased stay 0 (nvseal does not track writes since the last sanitize).
    pub sstat: u16,
    /// Command dword 10 of the Sanitize command that started the most recent operation.
    pub scdw10: u32,
}

impl Default for SanitizeStatus {
    fn default() -> Self {
        SanitizeStatus {
            sprog: SPROG_IDLE,
            sstat: sstat::NEVER,
            scdw10: 0,
        }
    }
}

impl SanitizeStatus {
    /// The page: SPROG, SSTAT, SCDW10, then the estimated times, every one "not reported"
    /// (overwrite and block erase are not supported; a crypto erase takes a key swap and three
    /// header writes per namespace, which nvseal does not promise a time for).
    pub fn encode(&self, out: &mut [u8; SANITIZE_STATUS_SIZE]) {
        out.fill(0);
        out[0..2].copy_from_slice(&self.sprog.to_le_bytes());
        out[2..4].copy_from_slice(&self.sstat.to_le_bytes());
        out[4..8].copy_from_slice(&self.scdw10.to_le_bytes());
        // ETO, ETBE, ETCE, ETOND, ETBEND, ETCEND (bytes 8..32).
        for f in out[8..32].chunks_exact_mut(4) {
            f.copy_from_slice(&SANITIZE_NO_ESTIMATE.to_le_bytes());
        }
    }
}

/// One Error Information log entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorEntry {
    /// Unique, increasing error count (0 = entry not valid).
    pub error_count: u64,
    pub sqid: u16,
    pub cid: u16,
    /// Status field (bits 15:1 of the CQE status word, as [`super::Status::to_field`]).
    pub status: u16,
    /// Parameter error location (byte offset in the SQE; 0xffff if not applicable).
    pub param_loc: u16,
    pub lba: u64,
    pub nsid: u32,
}

impl ErrorEntry {
    pub fn encode(&self, out: &mut [u8; ERROR_ENTRY_SIZE]) {
        out.fill(0);
        out[0..8].copy_from_slice(&self.error_count.to_le_bytes());
        out[8..10].copy_from_slice(&self.sqid.to_le_bytes());
        out[10..12].copy_from_slice(&self.cid.to_le_bytes());
        out[12..14].copy_from_slice(&(self.status << 1).to_le_bytes());
        out[14..16].copy_from_slice(&self.param_loc.to_le_bytes());
        out[16..24].copy_from_slice(&self.lba.to_le_bytes());
        out[24..28].copy_from_slice(&self.nsid.to_le_bytes());
        out[29] = 3; // TRTYPE: TCP
    }
}

/// Counters reported in the SMART / Health Information log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Smart {
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub read_cmds: u64,
    pub write_cmds: u64,
    pub media_errors: u64,
    pub error_log_entries: u64,
}

impl Smart {
    pub fn encode(&self, out: &mut [u8; SMART_SIZE]) {
        out.fill(0);
        // Critical warning 0; composite temperature 0 (no sensor: a software target has none).
        out[3] = 100; // available spare, percent (virtual media has no wear)
        out[4] = 10; // available spare threshold
                     // Data units are thousands of 512-byte units, rounded up.
        let du = |b: u64| (b / 512).div_ceil(1000);
        out[32..48].copy_from_slice(&u128::from(du(self.bytes_read)).to_le_bytes());
        out[48..64].copy_from_slice(&u128::from(du(self.bytes_written)).to_le_bytes());
        out[64..80].copy_from_slice(&u128::from(self.read_cmds).to_le_bytes());
        out[80..96].copy_from_slice(&u128::from(self.write_cmds).to_le_bytes());
        out[160..176].copy_from_slice(&u128::from(self.media_errors).to_le_bytes());
        out[176..192].copy_from_slice(&u128::from(self.error_log_entries).to_le_bytes());
    }
}

/// Size of the Firmware Slot Information log page.
pub const FIRMWARE_SLOT_SIZE: usize = 512;

/// Firmware Slot Information: one slot (1), active, holding `revision` (FRS1, 8 ASCII bytes).
pub fn build_firmware_slot(out: &mut [u8; FIRMWARE_SLOT_SIZE], revision: &str) {
    out.fill(0);
    out[0] = 1; // AFI: active slot 1 (bits 2:0), no slot pending activation (bits 6:4)
    put_str(&mut out[8..16], revision, b' ');
}

/// Changed Namespace List: up to 1024 NSIDs; more than that is reported as 0xffffffff.
pub fn build_changed_ns(out: &mut [u8; CHANGED_NS_SIZE], nsids: &[u32]) {
    out.fill(0);
    if nsids.len() > CHANGED_NS_SIZE / 4 {
        out[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        return;
    }
    for (slot, id) in out.chunks_exact_mut(4).zip(nsids) {
        slot.copy_from_slice(&id.to_le_bytes());
    }
}

/// Transport and address family codes used in discovery entries.
pub const TRTYPE_TCP: u8 = 3;
pub const ADRFAM_IPV4: u8 = 1;
pub const ADRFAM_IPV6: u8 = 2;
/// Subsystem types.
pub const SUBTYPE_DISCOVERY: u8 = 1;
pub const SUBTYPE_NVME: u8 = 2;
/// TREQ: secure channel not required (bits 1:0 = 10b), SQ flow control disable supported (bit 2).
pub const TREQ_NOT_REQUIRED_SQFLOW_DISABLE: u8 = 0b10 | (1 << 2);

/// One discovery log page entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryEntry<'a> {
    pub adrfam: u8,
    pub subtype: u8,
    pub portid: u16,
    pub asqsz: u16,
    pub trsvcid: &'a str,
    pub traddr: &'a str,
    pub subnqn: &'a str,
}

impl DiscoveryEntry<'_> {
    pub fn encode(&self, out: &mut [u8; DISCOVERY_ENTRY_SIZE]) {
        out.fill(0);
        out[0] = TRTYPE_TCP;
        out[1] = self.adrfam;
        out[2] = self.subtype;
        out[3] = TREQ_NOT_REQUIRED_SQFLOW_DISABLE;
        out[4..6].copy_from_slice(&self.portid.to_le_bytes());
        out[6..8].copy_from_slice(&0xffffu16.to_le_bytes()); // CNTLID: dynamic model
        out[8..10].copy_from_slice(&self.asqsz.to_le_bytes());
        put_str(&mut out[32..64], self.trsvcid, b' ');
        put_str(&mut out[256..512], self.subnqn, 0);
        put_str(&mut out[512..768], self.traddr, b' ');
        // TSAS for TCP: SECTYPE 0 (no security).
    }
}

/// Discovery log page header.
pub fn build_discovery_header(out: &mut [u8; DISCOVERY_HEADER_SIZE], genctr: u64, numrec: u64) {
    out.fill(0);
    out[0..8].copy_from_slice(&genctr.to_le_bytes());
    out[8..16].copy_from_slice(&numrec.to_le_bytes());
    // RECFMT 0.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let mut e = [0u8; ERROR_ENTRY_SIZE];
        ErrorEntry {
            error_count: 2,
            sqid: 0,
            cid: 5,
            status: 0x0002,
            param_loc: 0xffff,
            lba: 0,
            nsid: 1,
        }
        .encode(&mut e);
        assert_eq!(&e[0..8], &2u64.to_le_bytes());
        assert_eq!(&e[12..14], &4u16.to_le_bytes());
        assert_eq!(&e[24..28], &1u32.to_le_bytes());

        let mut s = [0u8; SMART_SIZE];
        Smart {
            bytes_read: 512 * 1001,
            write_cmds: 3,
            ..Default::default()
        }
        .encode(&mut s);
        assert_eq!(s[32], 2, "1001 units of 512 B round up to 2 data units");
        assert_eq!(s[80], 3);

        let mut c = [0u8; CHANGED_NS_SIZE];
        build_changed_ns(&mut c, &[4, 9]);
        assert_eq!(&c[0..8], &[4, 0, 0, 0, 9, 0, 0, 0]);
        build_changed_ns(&mut c, &vec![1; 1025]);
        assert_eq!(&c[0..4], &[0xff; 4]);

        let mut d = [0u8; DISCOVERY_ENTRY_SIZE];
        DiscoveryEntry {
            adrfam: ADRFAM_IPV4,
            subtype: SUBTYPE_NVME,
            portid: 1,
            asqsz: 32,
            trsvcid: "4420",
            traddr: "10.0.0.1",
            subnqn: "nqn.x",
        }
        .encode(&mut d);
        assert_eq!(&d[0..3], &[3, 1, 2]);
        assert_eq!(&d[32..37], b"4420 ");
        assert_eq!(&d[256..262], b"nqn.x\0");
        assert_eq!(&d[512..520], b"10.0.0.1");
        let mut h = [0u8; DISCOVERY_HEADER_SIZE];
        build_discovery_header(&mut h, 7, 2);
        assert_eq!(&h[8..16], &2u64.to_le_bytes());
    }

    #[test]
    fn sanitize_status_layout() {
        let mut p = [0xaau8; SANITIZE_STATUS_SIZE];
        SanitizeStatus::default().encode(&mut p);
        assert_eq!(&p[0..4], &[0xff, 0xff, 0, 0], "idle, never sanitized");
        SanitizeStatus {
            sprog: 0x8000,
            sstat: sstat::IN_PROGRESS,
            scdw10: 0x204,
        }
        .encode(&mut p);
        assert_eq!(&p[0..8], &[0, 0x80, 2, 0, 4, 2, 0, 0]);
        assert_eq!(&p[16..20], &[0xff; 4], "ETCE: no estimate");
        assert!(p[32..].iter().all(|&b| b == 0));
    }
}
