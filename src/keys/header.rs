//! The on-disk metadata header of an encrypted namespace: layout, encoding, validating decoder.
//! This file stays whole (about 1,200 lines without its tests, in `header/tests.rs`): the byte
//! layout, the decoder and the encoder of both format versions must be read side by side,
//! offset by offset, and a split would scatter one field's three places.
//!
//! Owns the byte layout of one 4 KiB header copy (documented byte by byte in
//! docs/on-disk-format.md, which must change together with the `layout` constants below) and the
//! geometry of the metadata region that precedes the data. Runs on control threads (format, open,
//! rekey); the data path only ever sees the data offset and block count it yields.
//!
//! It exists because the header is untrusted input read from a device: [`decode`] checks length,
//! magic, version, checksum and every field, and returns a typed [`HeaderError`] for every
//! defect instead of panicking. [`Header::encode`] runs the same field validation, so nothing
//! written can fail to decode.
//!
//! The two copies and their atomic update live in [`super::store`].

use sha2::{Digest, Sha256};
use thiserror::Error;
use uuid::Uuid;

use super::provider::{
    check_kms_alias, KekId, ProviderKind, KEK_ID_MAX_BYTES, KMS_ALIAS_MAX_BYTES,
};
use super::wrap::{KekFingerprint, WrappedDek, FINGERPRINT_BYTES, WRAPPED_DEK_BYTES};

/// Magic bytes at offset 0 of each copy.
pub const MAGIC: [u8; 8] = *b"NVSEALHD";
/// The format version of a header that uses no version-2 feature (every header written before
/// encrypt/decrypt existed, and every header written since that is neither plain, detached nor
/// converting): such headers are still written as version 1, so an older nvseal keeps reading them.
pub const FORMAT_VERSION: u16 = 1;
/// The format version of a header that uses a version-2 feature: the plain (retired) state, a
/// detached header, or an encrypt/decrypt pass in progress (docs/on-disk-format.md §2).
pub const FORMAT_VERSION_2: u16 = 2;
/// `flags` bit (v2): the header is retired, the device holds plaintext, no key slot.
pub const FLAG_PLAIN: u32 = 1 << 0;
/// `flags` bit (v2): the header lives in a detached file, bound to its device by the label.
pub const FLAG_DETACHED: u32 = 1 << 1;
/// Longest detached-header label (the namespace name the header is bound to).
pub const LABEL_MAX_BYTES: usize = 128;
/// Size of one header copy: one 4 KiB sector, so a copy is written by one aligned write on both
/// 512 B and 4 KiB devices.
pub const HEADER_COPY_BYTES: usize = 4096;
/// Size of the metadata region at the start of the backing device. 1 MiB keeps the data area
/// aligned for 4 KiB sectors, O_DIRECT and common erase/stripe units, leaves room for the
/// deep-rekey journal, and matches where partitioning tools start the first partition.
pub const METADATA_REGION_BYTES: u64 = 1 << 20;
/// Byte offsets of copy A and copy B. 64 KiB apart so that one damaged sector, a small stray
/// write or a wiped first page (wipefs, a partition-table write) does not take both.
pub const COPY_OFFSETS_BYTES: [u64; 2] = [0, 64 * 1024];
/// Start of the area reserved for the deep-rekey journal (owned by the deep-rekey code).
pub const REKEY_AREA_OFFSET_BYTES: u64 = 128 * 1024;
/// Size of the deep-rekey journal area (up to the data offset).
pub const REKEY_AREA_BYTES: u64 = METADATA_REGION_BYTES - REKEY_AREA_OFFSET_BYTES;
/// Data offset written by format: the data area starts right after the metadata region.
pub const DEFAULT_DATA_OFFSET_BYTES: u64 = METADATA_REGION_BYTES;
/// The cipher string (dm-crypt notation); the only one supported.
pub const CIPHER_AES_XTS_PLAIN64: &str = "aes-xts-plain64";
/// Data offsets must be a multiple of this (4 KiB sectors, O_DIRECT).
const DATA_ALIGN_BYTES: u64 = 4096;
/// Wrap algorithm byte: AES-256 Key Wrap, RFC 3394, default IV, 64-byte DEK → 72 bytes.
const WRAP_ALG_AES256_KW: u8 = 1;

/// Byte offsets inside one header copy (all little-endian). Keep in sync with
/// docs/on-disk-format.md.
pub mod layout {
    /// 8 bytes: [`super::MAGIC`].
    pub const MAGIC: usize = 0x000;
    /// u16: format version.
    pub const VERSION: usize = 0x008;
    /// u16: which copy this is (0 = A, 1 = B).
    pub const COPY_INDEX: usize = 0x00A;
    /// u32: header copy size in bytes (4096).
    pub const HEADER_BYTES: usize = 0x00C;
    /// u64: generation counter (≥ 1).
    pub const GENERATION: usize = 0x010;
    /// u64: metadata region size in bytes (1 MiB).
    pub const REGION_BYTES: usize = 0x018;
    /// 16 bytes: device UUID (RFC 4122 byte order).
    pub const DEVICE_UUID: usize = 0x020;
    /// 16 bytes: namespace UUID.
    pub const NAMESPACE_UUID: usize = 0x030;
    /// 32 bytes: cipher name, ASCII, NUL padded.
    pub const CIPHER: usize = 0x040;
    /// Cipher field length.
    pub const CIPHER_LEN: usize = 32;
    /// u32: data-unit (logical block) size in bytes.
    pub const DATA_UNIT_BYTES: usize = 0x060;
    /// u32: flags, must be 0 in version 1.
    pub const FLAGS: usize = 0x064;
    /// u64: byte offset of the data area on the device.
    pub const DATA_OFFSET_BYTES: usize = 0x068;
    /// u64: data area size in data units.
    pub const DATA_BLOCKS: usize = 0x070;
    /// u64: creation time, seconds since the Unix epoch.
    pub const CREATED_UNIX_S: usize = 0x078;
    /// u64: time of the last update, seconds since the Unix epoch.
    pub const UPDATED_UNIX_S: usize = 0x080;
    /// Reserved, zero: 0x088..0x0C0.
    pub const RESERVED0: usize = 0x088;
    /// Key slot (448 bytes): the active KEK and wrapped DEK.
    pub const ACTIVE_SLOT: usize = 0x0C0;
    /// u8: rekey state (0 none, 1 shallow in progress, 2 deep in progress); then 7 zero bytes.
    pub const REKEY_KIND: usize = 0x280;
    /// Key slot (448 bytes): the new KEK/DEK of a rekey in progress; zero when none.
    pub const PENDING_SLOT: usize = 0x288;
    /// u64: deep rekey watermark in data units.
    pub const DEEP_WATERMARK_BLOCKS: usize = 0x448;
    /// u64: deep rekey start time.
    pub const DEEP_STARTED_UNIX_S: usize = 0x450;
    /// u32: deep rekey segment size in data units.
    pub const DEEP_SEGMENT_BLOCKS: usize = 0x458;
    /// u32: deep rekey flags, must be 0 in version 1.
    pub const DEEP_FLAGS: usize = 0x45C;
    /// Reserved, zero: 0x460..0xFE0 in version 1 (deep-rekey extension room and spare); in
    /// version 2 the detached-header binding starts here.
    pub const RESERVED1: usize = 0x460;
    /// v2, u8: length of the detached-header label (1..=128 with `FLAG_DETACHED`, else 0); then
    /// 7 zero bytes.
    pub const LABEL_LEN: usize = 0x460;
    /// v2, 128 bytes: the detached-header label, printable ASCII, zero padded.
    pub const LABEL: usize = 0x468;
    /// Reserved, zero: 0x4E8..0xFE0.
    pub const RESERVED2: usize = 0x4E8;
    /// 32 bytes: SHA-256 over bytes 0x000..0xFE0 of this copy.
    pub const CHECKSUM: usize = 0xFE0;

    /// Size of a key slot.
    pub const SLOT_BYTES: usize = 0x1C0;
    /// Slot: u8 provider kind (1 local, 2 kmip).
    pub const SLOT_PROVIDER: usize = 0x000;
    /// Slot: u8 wrap algorithm (1 = AES-256-KW RFC 3394).
    pub const SLOT_WRAP_ALG: usize = 0x001;
    /// Slot: u8 KMS alias length.
    pub const SLOT_ALIAS_LEN: usize = 0x002;
    /// Slot: u8 reserved (0).
    pub const SLOT_RESERVED0: usize = 0x003;
    /// Slot: u16 KEK id length.
    pub const SLOT_KEK_ID_LEN: usize = 0x004;
    /// Slot: u16 reserved (0).
    pub const SLOT_RESERVED1: usize = 0x006;
    /// Slot: 64 bytes KMS cluster alias, zero padded.
    pub const SLOT_ALIAS: usize = 0x008;
    /// Slot: 256 bytes KEK id, zero padded.
    pub const SLOT_KEK_ID: usize = 0x048;
    /// Slot: 32 bytes KEK fingerprint.
    pub const SLOT_FINGERPRINT: usize = 0x148;
    /// Slot: 72 bytes wrapped DEK.
    pub const SLOT_WRAPPED_DEK: usize = 0x168;
    /// Slot: 16 reserved zero bytes.
    pub const SLOT_RESERVED2: usize = 0x1B0;
}

// The layout is consistent: fields are contiguous and fit the copy.
const _: () = {
    use layout::*;
    assert!(SLOT_ALIAS + super::provider::KMS_ALIAS_MAX_BYTES == SLOT_KEK_ID);
    assert!(SLOT_KEK_ID + super::provider::KEK_ID_MAX_BYTES == SLOT_FINGERPRINT);
    assert!(SLOT_FINGERPRINT + FINGERPRINT_BYTES == SLOT_WRAPPED_DEK);
    assert!(SLOT_WRAPPED_DEK + WRAPPED_DEK_BYTES == SLOT_RESERVED2);
    assert!(SLOT_RESERVED2 + 16 == SLOT_BYTES);
    assert!(ACTIVE_SLOT + SLOT_BYTES == REKEY_KIND);
    assert!(REKEY_KIND + 8 == PENDING_SLOT);
    assert!(PENDING_SLOT + SLOT_BYTES == DEEP_WATERMARK_BLOCKS);
    assert!(DEEP_FLAGS + 4 == RESERVED1);
    assert!(LABEL_LEN + 8 == LABEL);
    assert!(LABEL + LABEL_MAX_BYTES == RESERVED2);
    assert!(RESERVED2 < CHECKSUM);
    assert!(CHECKSUM + 32 == HEADER_COPY_BYTES);
    assert!(COPY_OFFSETS_BYTES[1] >= HEADER_COPY_BYTES as u64);
    assert!(COPY_OFFSETS_BYTES[1] + HEADER_COPY_BYTES as u64 <= REKEY_AREA_OFFSET_BYTES);
};

/// Which of the two header copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CopyId {
    /// Copy A, at byte 0.
    A,
    /// Copy B, at byte 64 KiB.
    B,
}

impl CopyId {
    /// Both copies, in on-disk order.
    pub const ALL: [CopyId; 2] = [CopyId::A, CopyId::B];

    /// Byte offset of this copy on the device.
    pub const fn offset_bytes(self) -> u64 {
        COPY_OFFSETS_BYTES[self.index()]
    }

    /// 0 for A, 1 for B (the on-disk copy index).
    pub const fn index(self) -> usize {
        match self {
            Self::A => 0,
            Self::B => 1,
        }
    }

    /// The other copy.
    pub const fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }
}

/// The XTS data unit: the namespace's logical block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataUnit {
    /// 512-byte blocks.
    Bytes512,
    /// 4096-byte blocks.
    Bytes4096,
}

impl DataUnit {
    /// Size in bytes.
    pub const fn bytes(self) -> u32 {
        match self {
            Self::Bytes512 => 512,
            Self::Bytes4096 => 4096,
        }
    }

    /// From a size in bytes.
    pub const fn from_bytes(b: u32) -> Option<Self> {
        match b {
            512 => Some(Self::Bytes512),
            4096 => Some(Self::Bytes4096),
            _ => None,
        }
    }
}

/// One KEK reference and the DEK wrapped under it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySlot {
    /// Which kind of provider holds the KEK.
    pub provider: ProviderKind,
    /// The KMS cluster (or local key file) alias.
    pub kms_alias: String,
    /// The KEK's id at that provider.
    pub kek_id: KekId,
    /// The KEK's fingerprint (see [`super::wrap`]).
    pub fingerprint: KekFingerprint,
    /// The DEK wrapped under the KEK.
    pub wrapped_dek: WrappedDek,
}

/// A deep rekey (new DEK, data re-encrypted) in progress. Only the fields are defined here; the
/// deep-rekey logic owns their meaning beyond what is documented.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeepRekeyState {
    /// The new KEK and the new DEK wrapped under it.
    pub new: KeySlot,
    /// Data units `0..watermark_blocks` are already encrypted with the new DEK.
    pub watermark_blocks: u64,
    /// When the deep rekey started (seconds since the Unix epoch).
    pub started_unix_s: u64,
    /// Size of one re-encryption step in data units.
    pub segment_blocks: u32,
}

/// Which way an encrypt/decrypt pass converts the data area.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Data units below the watermark are plaintext, the others ciphertext under the active DEK;
    /// at the end the header is retired ([`PlainHeader`]).
    Decrypt,
    /// Data units below the watermark are ciphertext under the active DEK, the others plaintext;
    /// at the end the header is an ordinary encrypted one.
    Encrypt,
}

impl Direction {
    /// `"decrypt"` or `"encrypt"` (status output, logs).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Decrypt => "decrypt",
            Self::Encrypt => "encrypt",
        }
    }
}

/// An encrypt or decrypt pass in progress (format version 2, `rekey_kind` 3 or 4). The key is
/// the active slot's DEK; there is no pending slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversion {
    /// Which way the pass goes.
    pub direction: Direction,
    /// Data units `0..watermark_blocks` are already converted.
    pub watermark_blocks: u64,
    /// When the pass started (seconds since the Unix epoch).
    pub started_unix_s: u64,
    /// Size of one step in data units (1 ..= what the journal holds).
    pub segment_blocks: u32,
}

/// Where a detached header says it belongs (format version 2, `FLAG_DETACHED`): the header then
/// lives in a file of its own and the data area is on another device, usually from offset 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detached {
    /// The name of the namespace the header belongs to (1..=128 printable ASCII bytes, no
    /// spaces). Together with `data_blocks` × `data_unit` (the data device's size) it is checked
    /// against the config before the header is used ([`Header::check_binding`]).
    pub label: String,
}

/// Rekey state persisted in the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RekeyState {
    /// No rekey in progress.
    None,
    /// Shallow rekey in progress: the same DEK wrapped under a new KEK, written before the
    /// active slot is switched, so that either KEK opens the namespace.
    Shallow {
        /// The new KEK and the DEK wrapped under it.
        new: KeySlot,
    },
    /// Deep rekey in progress.
    Deep(DeepRekeyState),
    /// Encrypt or decrypt pass in progress (format version 2).
    Convert(Conversion),
}

impl RekeyState {
    const fn kind_byte(&self) -> u8 {
        match self {
            Self::None => 0,
            Self::Shallow { .. } => 1,
            Self::Deep(_) => 2,
            Self::Convert(Conversion {
                direction: Direction::Decrypt,
                ..
            }) => 3,
            Self::Convert(Conversion {
                direction: Direction::Encrypt,
                ..
            }) => 4,
        }
    }
}

/// A decoded, validated header copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Generation counter: the valid copy with the highest one is current.
    pub generation: u64,
    /// Identity of the backing device (set at format).
    pub device_uuid: Uuid,
    /// Identity of the namespace (NVMe NGUID/UUID).
    pub namespace_uuid: Uuid,
    /// XTS data unit = logical block size.
    pub data_unit: DataUnit,
    /// Byte offset of the data area on the device.
    pub data_offset_bytes: u64,
    /// Size of the data area in data units.
    pub data_blocks: u64,
    /// Creation time (seconds since the Unix epoch).
    pub created_unix_s: u64,
    /// Last update time (seconds since the Unix epoch).
    pub updated_unix_s: u64,
    /// The KEK and wrapped DEK in use.
    pub active: KeySlot,
    /// Rekey in progress, if any.
    pub rekey: RekeyState,
    /// `Some` for a detached header (format version 2): the binding to its data device.
    pub detached: Option<Detached>,
}

/// A retired header (format version 2, `FLAG_PLAIN`): the device holds plaintext at
/// `data_offset_bytes`, there is no DEK and no key slot. Left by a finished decrypt; an encrypt
/// can start from it. The same identity and geometry fields as [`Header`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlainHeader {
    /// Generation counter: the valid copy with the highest one is current.
    pub generation: u64,
    /// Identity of the backing device.
    pub device_uuid: Uuid,
    /// Identity of the namespace.
    pub namespace_uuid: Uuid,
    /// Logical block size.
    pub data_unit: DataUnit,
    /// Byte offset of the (plaintext) data area on the device.
    pub data_offset_bytes: u64,
    /// Size of the data area in data units.
    pub data_blocks: u64,
    /// Creation time (seconds since the Unix epoch).
    pub created_unix_s: u64,
    /// Last update time (seconds since the Unix epoch).
    pub updated_unix_s: u64,
    /// `Some` for a detached header: the binding to its data device.
    pub detached: Option<Detached>,
}

/// Any valid header copy: one with a key (encrypted, or being rekeyed or converted) or a
/// retired, plain one.
// Headers live on control threads, a few at a time; boxing the keyed one would only add
// indirection to every match.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnyHeader {
    /// A header with an active key slot.
    Keyed(Header),
    /// A retired header: plaintext, no key.
    Plain(PlainHeader),
}

/// Why a header copy was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// The buffer is not exactly one header copy long.
    #[error("header buffer is {len} bytes, expected {HEADER_COPY_BYTES}")]
    WrongLength {
        /// Its length.
        len: usize,
    },
    /// The copy is all zeros: never written, or wiped.
    #[error("header copy is blank (all zeros)")]
    Blank,
    /// Not an nvseal header.
    #[error("bad magic: not an nvseal header")]
    BadMagic,
    /// Written by a different format version.
    #[error("unsupported header format version {version} (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion {
        /// The version found.
        version: u16,
    },
    /// The checksum does not match: torn write or corruption.
    #[error("header checksum mismatch (torn write or corruption)")]
    ChecksumMismatch,
    /// The copy says it is the other copy (misplaced write or copied sector).
    #[error("header copy index {found} found where copy {expected:?} belongs")]
    WrongCopy {
        /// The copy slot it was read from.
        expected: CopyId,
        /// The index stored in it.
        found: u16,
    },
    /// The cipher is not `aes-xts-plain64`.
    #[error("unsupported cipher in header (only {CIPHER_AES_XTS_PLAIN64})")]
    UnsupportedCipher,
    /// A field has a value outside its allowed range.
    #[error("header field {field} out of range")]
    FieldOutOfRange {
        /// The field's name (as in docs/on-disk-format.md).
        field: &'static str,
    },
    /// The header is valid but retired: the device holds plaintext and no key (a finished
    /// decrypt). Returned where a header with a key is required ([`decode`]).
    #[error("header is retired: the device holds plaintext and has no key")]
    Plain,
}

/// Why a detached header does not belong to the device and namespace it is used for.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BindingError {
    /// The config names a detached header, the header is not one.
    #[error("the header is not a detached header (it belongs in front of a data area)")]
    NotDetached,
    /// The header is detached, the config does not name it as such.
    #[error(
        "the header is a detached header (label {label:?}), but the namespace does not use one"
    )]
    UnexpectedDetached {
        /// The header's label.
        label: String,
    },
    /// The header names another namespace.
    #[error("the detached header belongs to namespace {found:?}, not {expected:?}")]
    OtherNamespace {
        /// The label in the header.
        found: String,
        /// The namespace it was used for.
        expected: String,
    },
    /// The data device is not the size the header describes.
    #[error(
        "the data device has {device_bytes} bytes; the header describes a data area of \
         {data_bytes} bytes at offset {data_offset_bytes}"
    )]
    SizeMismatch {
        /// The data device's size.
        device_bytes: u64,
        /// The header's data area size.
        data_bytes: u64,
        /// The header's data offset.
        data_offset_bytes: u64,
    },
}

fn out_of_range(field: &'static str) -> HeaderError {
    HeaderError::FieldOutOfRange { field }
}

type Copy = [u8; HEADER_COPY_BYTES];

// Fixed-offset little-endian accessors. Offsets are the `layout` constants, never input-derived,
// and the consistency assertions above keep them inside the 4096-byte copy.
fn get_u16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[off..off + 2]);
    u16::from_le_bytes(a)
}
fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}
fn get_array<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[off..off + N]);
    a
}
fn put(b: &mut [u8], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}
fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Reads a length-prefixed, zero-padded ASCII field of `cap` bytes.
fn get_text(
    b: &[u8],
    off: usize,
    cap: usize,
    len: usize,
    field: &'static str,
) -> Result<String, HeaderError> {
    let area = &b[off..off + cap];
    let (text, pad) = area.split_at_checked(len).ok_or(out_of_range(field))?;
    if !all_zero(pad) {
        return Err(out_of_range(field));
    }
    let s = std::str::from_utf8(text).map_err(|_| out_of_range(field))?;
    Ok(s.to_owned())
}

/// Decodes a key slot; `names` gives the field names used in errors.
fn decode_slot(s: &[u8], names: &SlotNames) -> Result<KeySlot, HeaderError> {
    use layout::*;
    let provider = ProviderKind::from_byte(s[SLOT_PROVIDER]).ok_or(out_of_range(names.provider))?;
    if s[SLOT_WRAP_ALG] != WRAP_ALG_AES256_KW {
        return Err(out_of_range(names.wrap_alg));
    }
    if s[SLOT_RESERVED0] != 0
        || get_u16(s, SLOT_RESERVED1) != 0
        || !all_zero(&s[SLOT_RESERVED2..SLOT_BYTES])
    {
        return Err(out_of_range(names.reserved));
    }
    let alias_len = usize::from(s[SLOT_ALIAS_LEN]);
    let kms_alias = get_text(s, SLOT_ALIAS, KMS_ALIAS_MAX_BYTES, alias_len, names.alias)?;
    check_kms_alias(&kms_alias).map_err(|_| out_of_range(names.alias))?;
    let id_len = usize::from(get_u16(s, SLOT_KEK_ID_LEN));
    let id = get_text(s, SLOT_KEK_ID, KEK_ID_MAX_BYTES, id_len, names.kek_id)?;
    let kek_id = KekId::new(id).map_err(|_| out_of_range(names.kek_id))?;
    Ok(KeySlot {
        provider,
        kms_alias,
        kek_id,
        fingerprint: KekFingerprint(get_array(s, SLOT_FINGERPRINT)),
        wrapped_dek: WrappedDek(get_array(s, SLOT_WRAPPED_DEK)),
    })
}

fn encode_slot(slot: &KeySlot, s: &mut [u8], names: &SlotNames) -> Result<(), HeaderError> {
    use layout::*;
    check_kms_alias(&slot.kms_alias).map_err(|_| out_of_range(names.alias))?;
    let alias_len = u8::try_from(slot.kms_alias.len()).map_err(|_| out_of_range(names.alias))?;
    let id_len =
        u16::try_from(slot.kek_id.as_str().len()).map_err(|_| out_of_range(names.kek_id))?;
    s[SLOT_PROVIDER] = slot.provider.to_byte();
    s[SLOT_WRAP_ALG] = WRAP_ALG_AES256_KW;
    s[SLOT_ALIAS_LEN] = alias_len;
    put(s, SLOT_KEK_ID_LEN, &id_len.to_le_bytes());
    put(s, SLOT_ALIAS, slot.kms_alias.as_bytes());
    put(s, SLOT_KEK_ID, slot.kek_id.as_str().as_bytes());
    put(s, SLOT_FINGERPRINT, &slot.fingerprint.0);
    put(s, SLOT_WRAPPED_DEK, slot.wrapped_dek.as_bytes());
    Ok(())
}

/// Field names of one slot for error messages.
struct SlotNames {
    provider: &'static str,
    wrap_alg: &'static str,
    reserved: &'static str,
    alias: &'static str,
    kek_id: &'static str,
}

const ACTIVE_NAMES: SlotNames = SlotNames {
    provider: "active.provider",
    wrap_alg: "active.wrap_alg",
    reserved: "active.reserved",
    alias: "active.kms_alias",
    kek_id: "active.kek_id",
};
const PENDING_NAMES: SlotNames = SlotNames {
    provider: "pending.provider",
    wrap_alg: "pending.wrap_alg",
    reserved: "pending.reserved",
    alias: "pending.kms_alias",
    kek_id: "pending.kek_id",
};

fn checksum(b: &Copy) -> [u8; 32] {
    let digest = Sha256::digest(&b[..layout::CHECKSUM]);
    let mut out = [0u8; 32];
    out.copy_from_slice(&digest);
    out
}

/// Decodes and validates a header copy that must carry a key (encrypted, rekeying or
/// converting), read from the slot of `copy`. A valid retired header is
/// [`HeaderError::Plain`]; [`decode_any`] accepts both. Never panics.
pub fn decode(buf: &[u8], copy: CopyId) -> Result<Header, HeaderError> {
    match decode_any(buf, copy)? {
        AnyHeader::Keyed(h) => Ok(h),
        AnyHeader::Plain(_) => Err(HeaderError::Plain),
    }
}

/// Decodes and validates any header copy (format version 1 or 2) read from the slot of `copy`.
/// Never panics.
pub fn decode_any(buf: &[u8], copy: CopyId) -> Result<AnyHeader, HeaderError> {
    use layout::*;
    let b: &Copy = buf
        .try_into()
        .map_err(|_| HeaderError::WrongLength { len: buf.len() })?;
    if all_zero(b) {
        return Err(HeaderError::Blank);
    }
    if b[MAGIC..MAGIC + 8] != super::header::MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let version = get_u16(b, VERSION);
    let flags = get_u32(b, FLAGS);
    let kind = b[REKEY_KIND];
    let uses_v2 = flags != 0 || kind == 3 || kind == 4;
    // Version 2 is written only when a version-2 feature is used, so a "version 2" copy that
    // uses none is not one this build wrote: an unknown version, like any other.
    if !(version == FORMAT_VERSION || version == FORMAT_VERSION_2 && uses_v2) {
        return Err(HeaderError::UnsupportedVersion { version });
    }
    if get_u32(b, HEADER_BYTES) != HEADER_COPY_BYTES as u32 {
        return Err(out_of_range("header_bytes"));
    }
    if b[CHECKSUM..] != checksum(b) {
        return Err(HeaderError::ChecksumMismatch);
    }
    let found = get_u16(b, COPY_INDEX);
    if usize::from(found) != copy.index() {
        return Err(HeaderError::WrongCopy {
            expected: copy,
            found,
        });
    }
    if get_u64(b, REGION_BYTES) != METADATA_REGION_BYTES {
        return Err(out_of_range("region_bytes"));
    }
    let cipher = &b[CIPHER..CIPHER + CIPHER_LEN];
    let (name, pad) = cipher.split_at(CIPHER_AES_XTS_PLAIN64.len());
    if name != CIPHER_AES_XTS_PLAIN64.as_bytes() || !all_zero(pad) {
        return Err(HeaderError::UnsupportedCipher);
    }
    let data_unit =
        DataUnit::from_bytes(get_u32(b, DATA_UNIT_BYTES)).ok_or(out_of_range("data_unit_bytes"))?;
    let known_flags = if version == FORMAT_VERSION {
        0
    } else {
        FLAG_PLAIN | FLAG_DETACHED
    };
    if flags & !known_flags != 0 {
        return Err(out_of_range("flags"));
    }
    if !all_zero(&b[RESERVED0..ACTIVE_SLOT]) {
        return Err(out_of_range("reserved0"));
    }
    if !all_zero(&b[REKEY_KIND + 1..PENDING_SLOT]) {
        return Err(out_of_range("rekey_reserved"));
    }
    // Version 1: everything after the deep-rekey fields is zero (as before version 2 existed).
    // Version 2: the label fields are checked below, the rest is zero.
    if version == FORMAT_VERSION && !all_zero(&b[RESERVED1..CHECKSUM]) {
        return Err(out_of_range("reserved1"));
    }
    if !all_zero(&b[RESERVED2..CHECKSUM]) {
        return Err(out_of_range("reserved2"));
    }
    let detached = if flags & FLAG_DETACHED != 0 {
        if !all_zero(&b[LABEL_LEN + 1..LABEL]) {
            return Err(out_of_range("label_reserved"));
        }
        let len = usize::from(b[LABEL_LEN]);
        let label = get_text(b, LABEL, LABEL_MAX_BYTES, len, "label")?;
        check_label(&label)?;
        Some(Detached { label })
    } else {
        if !all_zero(&b[LABEL_LEN..RESERVED2]) {
            return Err(out_of_range("label"));
        }
        None
    };
    let frame = PlainHeader {
        generation: get_u64(b, GENERATION),
        device_uuid: Uuid::from_bytes(get_array(b, DEVICE_UUID)),
        namespace_uuid: Uuid::from_bytes(get_array(b, NAMESPACE_UUID)),
        data_unit,
        data_offset_bytes: get_u64(b, DATA_OFFSET_BYTES),
        data_blocks: get_u64(b, DATA_BLOCKS),
        created_unix_s: get_u64(b, CREATED_UNIX_S),
        updated_unix_s: get_u64(b, UPDATED_UNIX_S),
        detached,
    };
    let active_bytes = &b[ACTIVE_SLOT..ACTIVE_SLOT + SLOT_BYTES];
    let pending_bytes = &b[PENDING_SLOT..PENDING_SLOT + SLOT_BYTES];
    let deep_bytes = &b[DEEP_WATERMARK_BLOCKS..RESERVED1];
    if flags & FLAG_PLAIN != 0 {
        // Retired: no key slot, no rekey, nothing pending.
        if !all_zero(active_bytes) {
            return Err(out_of_range("active"));
        }
        if kind != 0 {
            return Err(out_of_range("rekey_kind"));
        }
        if !all_zero(pending_bytes) {
            return Err(out_of_range("pending"));
        }
        if !all_zero(deep_bytes) {
            return Err(out_of_range("deep"));
        }
        frame.validate()?;
        return Ok(AnyHeader::Plain(frame));
    }
    let active = decode_slot(active_bytes, &ACTIVE_NAMES)?;
    let rekey = match kind {
        0 => {
            if !all_zero(pending_bytes) {
                return Err(out_of_range("pending"));
            }
            if !all_zero(deep_bytes) {
                return Err(out_of_range("deep"));
            }
            RekeyState::None
        }
        1 => {
            if !all_zero(deep_bytes) {
                return Err(out_of_range("deep"));
            }
            RekeyState::Shallow {
                new: decode_slot(pending_bytes, &PENDING_NAMES)?,
            }
        }
        2 => {
            if get_u32(b, DEEP_FLAGS) != 0 {
                return Err(out_of_range("deep.flags"));
            }
            RekeyState::Deep(DeepRekeyState {
                new: decode_slot(pending_bytes, &PENDING_NAMES)?,
                watermark_blocks: get_u64(b, DEEP_WATERMARK_BLOCKS),
                started_unix_s: get_u64(b, DEEP_STARTED_UNIX_S),
                segment_blocks: get_u32(b, DEEP_SEGMENT_BLOCKS),
            })
        }
        // Only reachable in version 2 (checked above): `uses_v2` holds for these kinds.
        3 | 4 => {
            if !all_zero(pending_bytes) {
                return Err(out_of_range("pending"));
            }
            if get_u32(b, DEEP_FLAGS) != 0 {
                return Err(out_of_range("deep.flags"));
            }
            RekeyState::Convert(Conversion {
                direction: if kind == 3 {
                    Direction::Decrypt
                } else {
                    Direction::Encrypt
                },
                watermark_blocks: get_u64(b, DEEP_WATERMARK_BLOCKS),
                started_unix_s: get_u64(b, DEEP_STARTED_UNIX_S),
                segment_blocks: get_u32(b, DEEP_SEGMENT_BLOCKS),
            })
        }
        _ => return Err(out_of_range("rekey_kind")),
    };
    if version == FORMAT_VERSION && matches!(rekey, RekeyState::Convert(_)) {
        return Err(out_of_range("rekey_kind"));
    }
    let header = Header {
        generation: frame.generation,
        device_uuid: frame.device_uuid,
        namespace_uuid: frame.namespace_uuid,
        data_unit,
        data_offset_bytes: frame.data_offset_bytes,
        data_blocks: frame.data_blocks,
        created_unix_s: frame.created_unix_s,
        updated_unix_s: frame.updated_unix_s,
        active,
        rekey,
        detached: frame.detached,
    };
    header.validate()?;
    Ok(AnyHeader::Keyed(header))
}

/// A detached-header label: 1..=128 bytes of printable ASCII without spaces.
fn check_label(label: &str) -> Result<(), HeaderError> {
    let ok = !label.is_empty()
        && label.len() <= LABEL_MAX_BYTES
        && label.bytes().all(|c| c.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(out_of_range("label"))
    }
}

/// The largest hot zone (in data units) a pass may record: 64 MiB, and no more units than the
/// journal's data room (`REKEY_AREA_BYTES` minus the 4 KiB record header) holds checksum pairs
/// for (8 bytes per unit, on-disk-format.md §7).
pub fn max_conversion_segment_blocks(unit: DataUnit) -> u64 {
    let table = (REKEY_AREA_BYTES - HEADER_COPY_BYTES as u64) / 8;
    table.min((64 << 20) / u64::from(unit.bytes()))
}

fn check_binding(
    detached: Option<&Detached>,
    data_offset_bytes: u64,
    data_bytes: u64,
    expected_label: Option<&str>,
    device_bytes: u64,
    unit: DataUnit,
) -> Result<(), BindingError> {
    match (detached, expected_label) {
        (None, None) => {}
        (None, Some(_)) => return Err(BindingError::NotDetached),
        (Some(d), None) => {
            return Err(BindingError::UnexpectedDetached {
                label: d.label.clone(),
            })
        }
        (Some(d), Some(want)) if d.label != want => {
            return Err(BindingError::OtherNamespace {
                found: d.label.clone(),
                expected: want.to_owned(),
            })
        }
        (Some(_), Some(_)) => {}
    }
    // The host-visible size is what fits the device after the data offset, in whole units: it
    // must be exactly the header's data area, so that nothing changes size and no header is used
    // on a device it was not written for.
    let unit = u64::from(unit.bytes());
    let fits = device_bytes.saturating_sub(data_offset_bytes) / unit * unit;
    if device_bytes < data_offset_bytes || fits != data_bytes {
        return Err(BindingError::SizeMismatch {
            device_bytes,
            data_bytes,
            data_offset_bytes,
        });
    }
    Ok(())
}

impl PlainHeader {
    /// Size of the data area in bytes.
    pub fn data_bytes(&self) -> u64 {
        // `validate` guarantees offset + blocks * unit fits in u64.
        self.data_blocks
            .saturating_mul(u64::from(self.data_unit.bytes()))
    }

    /// Checks that this header belongs to the namespace and data device it is about to be used
    /// for: `expected_label` is `Some(namespace name)` when the config names a detached header
    /// and `None` when the header is on the data device; `device_bytes` is the data device's
    /// size. Reads nothing, writes nothing.
    pub fn check_binding(
        &self,
        expected_label: Option<&str>,
        device_bytes: u64,
    ) -> Result<(), BindingError> {
        check_binding(
            self.detached.as_ref(),
            self.data_offset_bytes,
            self.data_bytes(),
            expected_label,
            device_bytes,
            self.data_unit,
        )
    }

    /// The identity and geometry rules every header satisfies, with or without a key.
    pub fn validate(&self) -> Result<(), HeaderError> {
        if self.generation == 0 {
            return Err(out_of_range("generation"));
        }
        // In front of the data area the metadata region comes first; a detached header has the
        // device to itself, so its data area may start anywhere aligned, 0 included.
        let min_offset = if self.detached.is_some() {
            0
        } else {
            METADATA_REGION_BYTES
        };
        if self.data_offset_bytes < min_offset
            || !self.data_offset_bytes.is_multiple_of(DATA_ALIGN_BYTES)
        {
            return Err(out_of_range("data_offset_bytes"));
        }
        if self.data_blocks == 0 {
            return Err(out_of_range("data_blocks"));
        }
        let end = self
            .data_blocks
            .checked_mul(u64::from(self.data_unit.bytes()))
            .and_then(|bytes| bytes.checked_add(self.data_offset_bytes));
        if end.is_none() {
            return Err(out_of_range("data_blocks"));
        }
        if let Some(d) = &self.detached {
            check_label(&d.label)?;
        }
        Ok(())
    }

    /// Encodes this retired header (format version 2) as the copy `copy`.
    pub fn encode(&self, copy: CopyId) -> Result<Box<Copy>, HeaderError> {
        self.validate()?;
        let mut b = encode_frame(self, copy, FLAG_PLAIN)?;
        seal(&mut b);
        Ok(b)
    }
}

/// Writes the fields a keyed and a plain header share (and the version the flags call for);
/// key slots, rekey state and checksum are the caller's.
fn encode_frame(f: &PlainHeader, copy: CopyId, mut flags: u32) -> Result<Box<Copy>, HeaderError> {
    use layout::*;
    if f.detached.is_some() {
        flags |= FLAG_DETACHED;
    }
    let mut b: Box<Copy> = Box::new([0u8; HEADER_COPY_BYTES]);
    put(&mut b[..], MAGIC, &super::header::MAGIC);
    let version = if flags != 0 {
        FORMAT_VERSION_2
    } else {
        FORMAT_VERSION
    };
    put(&mut b[..], VERSION, &version.to_le_bytes());
    let index = u16::try_from(copy.index()).map_err(|_| out_of_range("copy_index"))?;
    put(&mut b[..], COPY_INDEX, &index.to_le_bytes());
    put(
        &mut b[..],
        HEADER_BYTES,
        &(HEADER_COPY_BYTES as u32).to_le_bytes(),
    );
    put(&mut b[..], GENERATION, &f.generation.to_le_bytes());
    put(
        &mut b[..],
        REGION_BYTES,
        &METADATA_REGION_BYTES.to_le_bytes(),
    );
    put(&mut b[..], DEVICE_UUID, f.device_uuid.as_bytes());
    put(&mut b[..], NAMESPACE_UUID, f.namespace_uuid.as_bytes());
    put(&mut b[..], CIPHER, CIPHER_AES_XTS_PLAIN64.as_bytes());
    put(
        &mut b[..],
        DATA_UNIT_BYTES,
        &f.data_unit.bytes().to_le_bytes(),
    );
    put(&mut b[..], FLAGS, &flags.to_le_bytes());
    put(
        &mut b[..],
        DATA_OFFSET_BYTES,
        &f.data_offset_bytes.to_le_bytes(),
    );
    put(&mut b[..], DATA_BLOCKS, &f.data_blocks.to_le_bytes());
    put(&mut b[..], CREATED_UNIX_S, &f.created_unix_s.to_le_bytes());
    put(&mut b[..], UPDATED_UNIX_S, &f.updated_unix_s.to_le_bytes());
    if let Some(d) = &f.detached {
        // `validate` checked the label (1..=128 ASCII bytes), so the length fits a byte.
        b[LABEL_LEN] = u8::try_from(d.label.len()).map_err(|_| out_of_range("label"))?;
        put(&mut b[..], LABEL, d.label.as_bytes());
    }
    Ok(b)
}

fn seal(b: &mut Copy) {
    let sum = checksum(b);
    put(&mut b[..], layout::CHECKSUM, &sum);
}

impl AnyHeader {
    /// The generation counter.
    pub fn generation(&self) -> u64 {
        match self {
            Self::Keyed(h) => h.generation,
            Self::Plain(p) => p.generation,
        }
    }

    /// Sets the generation counter.
    pub fn set_generation(&mut self, generation: u64) {
        match self {
            Self::Keyed(h) => h.generation = generation,
            Self::Plain(p) => p.generation = generation,
        }
    }

    /// Identity and geometry (everything but keys, rekey state, generation and update time).
    pub fn frame(&self) -> PlainHeader {
        match self {
            Self::Keyed(h) => h.frame(),
            Self::Plain(p) => p.clone(),
        }
    }

    /// Validates the header (as [`decode_any`] would).
    pub fn validate(&self) -> Result<(), HeaderError> {
        match self {
            Self::Keyed(h) => h.validate(),
            Self::Plain(p) => p.validate(),
        }
    }

    /// Encodes the header as the copy `copy`.
    pub fn encode(&self, copy: CopyId) -> Result<Box<Copy>, HeaderError> {
        match self {
            Self::Keyed(h) => h.encode(copy),
            Self::Plain(p) => p.encode(copy),
        }
    }

    /// The keyed header, if this is one.
    pub fn keyed(&self) -> Option<&Header> {
        match self {
            Self::Keyed(h) => Some(h),
            Self::Plain(_) => None,
        }
    }

    /// `"plain"`, `"converting"` or `"encrypted"` (a shallow or deep rekey in progress is still
    /// `"encrypted"`): the state `keys.status` and the namespace list report.
    pub fn state_name(&self) -> &'static str {
        match self {
            Self::Plain(_) => "plain",
            Self::Keyed(Header {
                rekey: RekeyState::Convert(_),
                ..
            }) => "converting",
            Self::Keyed(_) => "encrypted",
        }
    }
}

impl Header {
    /// The cipher (always `aes-xts-plain64` in format version 1).
    pub const fn cipher(&self) -> &'static str {
        CIPHER_AES_XTS_PLAIN64
    }

    /// Size of the data area in bytes.
    pub fn data_bytes(&self) -> u64 {
        // `validate` guarantees offset + blocks * unit fits in u64.
        self.data_blocks
            .saturating_mul(u64::from(self.data_unit.bytes()))
    }

    /// The identity and geometry fields (this header without its keys).
    pub fn frame(&self) -> PlainHeader {
        PlainHeader {
            generation: self.generation,
            device_uuid: self.device_uuid,
            namespace_uuid: self.namespace_uuid,
            data_unit: self.data_unit,
            data_offset_bytes: self.data_offset_bytes,
            data_blocks: self.data_blocks,
            created_unix_s: self.created_unix_s,
            updated_unix_s: self.updated_unix_s,
            detached: self.detached.clone(),
        }
    }

    /// This header with `active` as its key slot and `rekey` as its state, on the identity and
    /// geometry of `frame`.
    pub fn from_frame(frame: &PlainHeader, active: KeySlot, rekey: RekeyState) -> Header {
        Header {
            generation: frame.generation,
            device_uuid: frame.device_uuid,
            namespace_uuid: frame.namespace_uuid,
            data_unit: frame.data_unit,
            data_offset_bytes: frame.data_offset_bytes,
            data_blocks: frame.data_blocks,
            created_unix_s: frame.created_unix_s,
            updated_unix_s: frame.updated_unix_s,
            active,
            rekey,
            detached: frame.detached.clone(),
        }
    }

    /// See [`PlainHeader::check_binding`].
    pub fn check_binding(
        &self,
        expected_label: Option<&str>,
        device_bytes: u64,
    ) -> Result<(), BindingError> {
        self.frame().check_binding(expected_label, device_bytes)
    }

    /// Checks the semantic rules every header must satisfy (used by both decode and encode).
    pub fn validate(&self) -> Result<(), HeaderError> {
        self.frame().validate()?;
        check_kms_alias(&self.active.kms_alias).map_err(|_| out_of_range("active.kms_alias"))?;
        match &self.rekey {
            RekeyState::None => {}
            RekeyState::Shallow { new } => {
                check_kms_alias(&new.kms_alias).map_err(|_| out_of_range("pending.kms_alias"))?;
            }
            RekeyState::Deep(d) => {
                check_kms_alias(&d.new.kms_alias).map_err(|_| out_of_range("pending.kms_alias"))?;
                if d.watermark_blocks > self.data_blocks {
                    return Err(out_of_range("deep.watermark_blocks"));
                }
            }
            RekeyState::Convert(c) => {
                if c.watermark_blocks > self.data_blocks {
                    return Err(out_of_range("deep.watermark_blocks"));
                }
                if c.segment_blocks == 0
                    || u64::from(c.segment_blocks) > max_conversion_segment_blocks(self.data_unit)
                {
                    return Err(out_of_range("deep.segment_blocks"));
                }
            }
        }
        Ok(())
    }

    /// Encodes this header as the copy `copy` (the copy index is part of the bytes). Format
    /// version 2 only if a version-2 feature is used (detached, or an encrypt/decrypt pass).
    pub fn encode(&self, copy: CopyId) -> Result<Box<Copy>, HeaderError> {
        use layout::*;
        self.validate()?;
        let mut b = encode_frame(&self.frame(), copy, 0)?;
        if matches!(self.rekey, RekeyState::Convert(_)) && get_u32(&b[..], FLAGS) == 0 {
            // A pass in progress is a version-2 feature even without flags.
            put(&mut b[..], VERSION, &FORMAT_VERSION_2.to_le_bytes());
        }
        encode_slot(
            &self.active,
            &mut b[ACTIVE_SLOT..ACTIVE_SLOT + SLOT_BYTES],
            &ACTIVE_NAMES,
        )?;
        b[REKEY_KIND] = self.rekey.kind_byte();
        let progress = match &self.rekey {
            RekeyState::None => None,
            RekeyState::Shallow { new } => {
                encode_slot(
                    new,
                    &mut b[PENDING_SLOT..PENDING_SLOT + SLOT_BYTES],
                    &PENDING_NAMES,
                )?;
                None
            }
            RekeyState::Deep(d) => {
                encode_slot(
                    &d.new,
                    &mut b[PENDING_SLOT..PENDING_SLOT + SLOT_BYTES],
                    &PENDING_NAMES,
                )?;
                Some((d.watermark_blocks, d.started_unix_s, d.segment_blocks))
            }
            RekeyState::Convert(c) => {
                Some((c.watermark_blocks, c.started_unix_s, c.segment_blocks))
            }
        };
        if let Some((watermark, started, segment)) = progress {
            put(&mut b[..], DEEP_WATERMARK_BLOCKS, &watermark.to_le_bytes());
            put(&mut b[..], DEEP_STARTED_UNIX_S, &started.to_le_bytes());
            put(&mut b[..], DEEP_SEGMENT_BLOCKS, &segment.to_le_bytes());
        }
        seal(&mut b);
        Ok(b)
    }
}

#[cfg(test)]
pub(crate) mod tests;
