//! KMIP 1.x request encoding and response decoding for the operations nvseal uses.
//!
//! Owns the mapping between nvseal's key operations and KMIP messages. Runs on the control
//! thread that drives a [`super::KmipClient`]. Requests are built from the `kmip-protocol`
//! crate's spec-checked types and its TTLV serializer. Responses are decoded with our own
//! [`super::ttlv`] tree decoder instead of that crate's serde deserializer because (1) replies
//! come from the network and decoding must never panic, (2) failure replies from other servers
//! carry KMIP 2.x result reasons that a strict 1.x schema rejects, and (3) the key bytes of a
//! Get response must land only in zeroizing buffers.

use kmip_protocol::types::common::{
    AttributeName, AttributeValue, CompromiseOccurrenceDate, CryptographicAlgorithm, KeyFormatType,
    ObjectType, RevocationMessage, RevocationReasonCode, State, UniqueIdentifier,
};
use kmip_protocol::types::request::{
    Attribute, QueryFunction, RequestPayload, RevocationReason as KmipRevocationReason,
    TemplateAttribute,
};

use super::key::{Kek, KeyId, KEK_BYTES};
use super::ttlv::{self, Item, TtlvError};

/// KMIP tags used when reading responses (KMIP 1.0 §9.1.3.1).
pub mod tag {
    pub const ATTRIBUTE: u32 = 0x420008;
    pub const ATTRIBUTE_NAME: u32 = 0x42000A;
    pub const ATTRIBUTE_VALUE: u32 = 0x42000B;
    pub const BATCH_COUNT: u32 = 0x42000D;
    pub const BATCH_ITEM: u32 = 0x42000F;
    pub const KEY_BLOCK: u32 = 0x420040;
    pub const KEY_FORMAT_TYPE: u32 = 0x420042;
    pub const KEY_MATERIAL: u32 = 0x420043;
    pub const KEY_VALUE: u32 = 0x420045;
    pub const KEY: u32 = 0x42003F;
    pub const CRYPTOGRAPHIC_ALGORITHM: u32 = 0x420028;
    pub const CRYPTOGRAPHIC_LENGTH: u32 = 0x42002A;
    pub const OBJECT_TYPE: u32 = 0x420057;
    pub const OPERATION: u32 = 0x42005C;
    pub const PROTOCOL_VERSION: u32 = 0x420069;
    pub const PROTOCOL_VERSION_MAJOR: u32 = 0x42006A;
    pub const PROTOCOL_VERSION_MINOR: u32 = 0x42006B;
    pub const RESPONSE_HEADER: u32 = 0x42007A;
    pub const RESPONSE_MESSAGE: u32 = 0x42007B;
    pub const RESPONSE_PAYLOAD: u32 = 0x42007C;
    pub const RESULT_MESSAGE: u32 = 0x42007D;
    pub const RESULT_REASON: u32 = 0x42007E;
    pub const RESULT_STATUS: u32 = 0x42007F;
    pub const SERVER_INFORMATION: u32 = 0x420088;
    pub const SYMMETRIC_KEY: u32 = 0x42008F;
    pub const UNIQUE_IDENTIFIER: u32 = 0x420094;
    pub const VENDOR_IDENTIFICATION: u32 = 0x42009D;
}

/// KMIP enumeration values used in responses.
mod enumeration {
    pub const OBJECT_TYPE_SYMMETRIC_KEY: u32 = 0x02;
    pub const KEY_FORMAT_RAW: u32 = 0x01;
    pub const KEY_FORMAT_TRANSPARENT_SYMMETRIC: u32 = 0x07;
    pub const ALGORITHM_AES: u32 = 0x03;
}

/// Cryptographic Usage Mask bits (KMIP 1.0 §9.1.3.3.1).
pub mod usage_mask {
    pub const ENCRYPT: i32 = 0x04;
    pub const DECRYPT: i32 = 0x08;
    pub const WRAP_KEY: i32 = 0x10;
    pub const UNWRAP_KEY: i32 = 0x20;
}

/// Usage mask nvseal puts on a KEK: it only wraps and unwraps DEKs (AES Key Wrap).
/// PyKMIP 0.11 accepts Wrap Key | Unwrap Key alone on Create.
pub const KEK_USAGE_MASK: i32 = usage_mask::WRAP_KEY | usage_mask::UNWRAP_KEY;

/// Why a decoded TTLV message is not the response we expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("malformed TTLV: {0}")]
    Ttlv(#[from] TtlvError),
    #[error("response is tag {found:#08x}, expected Response Message")]
    NotAResponse { found: u32 },
    #[error("response has no {0}")]
    Missing(&'static str),
    #[error("{field}: expected {expected}, got {found}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    #[error("response has {0} batch items, expected 1")]
    BatchCount(usize),
    #[error("reply is for operation {found}, expected {expected}")]
    WrongOperation { expected: u32, found: u32 },
    #[error("Get returned object type {0:#x}, expected Symmetric Key")]
    NotSymmetricKey(u32),
    #[error("Get returned key format {0:#x}, expected Raw or Transparent Symmetric Key")]
    KeyFormat(u32),
    #[error("Get returned algorithm {0:#x}, expected AES")]
    NotAes(u32),
    #[error("Get returned {0} key bytes, expected {KEK_BYTES}")]
    KeyLength(usize),
    #[error("response length {length} exceeds the limit")]
    ResponseTooLarge { length: u32 },
    #[error("request could not be encoded: {0}")]
    Encode(String),
    #[error("Get Attributes reply has no State attribute")]
    NoState,
}

/// KMIP Result Status of a failed batch item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ResultStatus {
    OperationFailed,
    OperationPending,
    OperationUndone,
    /// A value outside KMIP 1.x; kept as received.
    Other(u32),
}

impl ResultStatus {
    fn from_code(code: u32) -> Option<Self> {
        match code {
            0 => None, // Success
            1 => Some(Self::OperationFailed),
            2 => Some(Self::OperationPending),
            3 => Some(Self::OperationUndone),
            other => Some(Self::Other(other)),
        }
    }
}

impl std::fmt::Display for ResultStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::OperationFailed => f.write_str("Operation Failed"),
            Self::OperationPending => f.write_str("Operation Pending"),
            Self::OperationUndone => f.write_str("Operation Undone"),
            Self::Other(code) => write!(f, "result status {code:#x}"),
        }
    }
}

/// KMIP Result Reason, kept as the raw enumeration value so that reasons from newer protocol
/// versions survive; [`ResultReason::name`] knows the KMIP 1.x and 2.x names (others print as
/// `result reason 0x..`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ResultReason(pub u32);

impl ResultReason {
    pub const ITEM_NOT_FOUND: Self = Self(0x01);
    pub const AUTHENTICATION_NOT_SUCCESSFUL: Self = Self(0x03);
    pub const PERMISSION_DENIED: Self = Self(0x0C);
    pub const INVALID_FIELD: Self = Self(0x07);
    pub const ILLEGAL_OPERATION: Self = Self(0x0B);
    /// KMIP 2.x: the object exists but its key material was destroyed.
    pub const OBJECT_DESTROYED: Self = Self(0x36);
    /// KMIP 2.x spelling of "no such object" (servers that speak 2.x answer it where 1.x
    /// servers answer Item Not Found).
    pub const OBJECT_NOT_FOUND: Self = Self(0x37);
    /// KMIP 2.x: the object is not in a state that allows the operation (e.g. Get of a
    /// Deactivated key on a strict server).
    pub const WRONG_KEY_LIFECYCLE_STATE: Self = Self(0x43);

    /// Whether the reason says the object does not exist (1.x Item Not Found or 2.x Object Not
    /// Found).
    pub fn is_not_found(self) -> bool {
        self == Self::ITEM_NOT_FOUND || self == Self::OBJECT_NOT_FOUND
    }

    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0x01 => "Item Not Found",
            0x02 => "Response Too Large",
            0x03 => "Authentication Not Successful",
            0x04 => "Invalid Message",
            0x05 => "Operation Not Supported",
            0x06 => "Missing Data",
            0x07 => "Invalid Field",
            0x08 => "Feature Not Supported",
            0x09 => "Operation Canceled By Requester",
            0x0A => "Cryptographic Failure",
            0x0B => "Illegal Operation",
            0x0C => "Permission Denied",
            0x0D => "Object Archived",
            0x0E => "Index Out of Bounds",
            0x0F => "Application Namespace Not Supported",
            0x10 => "Key Format Type Not Supported",
            0x11 => "Key Compression Type Not Supported",
            0x12 => "Encoding Option Error",
            0x13 => "Key Value Not Present",
            0x14 => "Attestation Required",
            0x15 => "Attestation Failed",
            0x16 => "Sensitive",
            0x17 => "Not Extractable",
            0x18 => "Object Already Exists",
            // KMIP 2.x (2.0 and 2.1 §11 Result Reason Enumeration).
            0x19 => "Invalid Ticket",
            0x1A => "Usage Limit Exceeded",
            0x1B => "Numeric Range",
            0x1C => "Invalid Data Type",
            0x1D => "Read Only Attribute",
            0x1E => "Multi Valued Attribute",
            0x1F => "Unsupported Attribute",
            0x20 => "Attribute Instance Not Found",
            0x21 => "Attribute Not Found",
            0x22 => "Attribute Read Only",
            0x23 => "Attribute Single Valued",
            0x24 => "Bad Cryptographic Parameters",
            0x25 => "Bad Password",
            0x26 => "Codec Error",
            0x28 => "Illegal Object Type",
            0x29 => "Incompatible Cryptographic Usage Mask",
            0x2A => "Internal Server Error",
            0x2B => "Invalid Asynchronous Correlation Value",
            0x2C => "Invalid Attribute",
            0x2D => "Invalid Attribute Value",
            0x2E => "Invalid Correlation Value",
            0x2F => "Invalid CSR",
            0x30 => "Invalid Object Type",
            0x32 => "Key Wrap Type Not Supported",
            0x34 => "Missing Initialization Vector",
            0x35 => "Non Unique Name Attribute",
            0x36 => "Object Destroyed",
            0x37 => "Object Not Found",
            0x39 => "Not Authorised",
            0x3A => "Server Limit Exceeded",
            0x3B => "Unknown Enumeration",
            0x3C => "Unknown Message Extension",
            0x3D => "Unknown Tag",
            0x3E => "Unsupported Cryptographic Parameters",
            0x3F => "Unsupported Protocol Version",
            0x40 => "Wrapping Object Archived",
            0x41 => "Wrapping Object Destroyed",
            0x42 => "Wrapping Object Not Found",
            0x43 => "Wrong Key Lifecycle State",
            0x44 => "Protection Storage Unavailable",
            0x45 => "PKCS#11 Codec Error",
            0x46 => "PKCS#11 Invalid Function",
            0x47 => "PKCS#11 Invalid Interface",
            0x48 => "Private Protection Storage Unavailable",
            0x49 => "Public Protection Storage Unavailable",
            0x0100 => "General Failure",
            _ => return None,
        })
    }
}

impl std::fmt::Display for ResultReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "result reason {:#x}", self.0),
        }
    }
}

/// Why a key is revoked. Maps to KMIP Revocation Reason Code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationReason {
    /// Replaced by a new KEK (shallow or deep rekey).
    Superseded,
    /// No longer used (namespace deleted).
    CessationOfOperation,
    /// The key is believed exposed. Sent with the current time as compromise date.
    KeyCompromise,
}

/// KMIP operation codes (KMIP 1.0 §9.1.3.2.26), for checking replies and for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Locate,
    Get,
    GetAttributes,
    Activate,
    Revoke,
    Destroy,
    Query,
    DiscoverVersions,
}

impl Operation {
    pub fn code(self) -> u32 {
        match self {
            Self::Create => 0x01,
            Self::Locate => 0x08,
            Self::Get => 0x0A,
            Self::GetAttributes => 0x0B,
            Self::Activate => 0x12,
            Self::Revoke => 0x13,
            Self::Destroy => 0x14,
            Self::Query => 0x18,
            Self::DiscoverVersions => 0x1E,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Create => "Create",
            Self::Locate => "Locate",
            Self::Get => "Get",
            Self::GetAttributes => "Get Attributes",
            Self::Activate => "Activate",
            Self::Revoke => "Revoke",
            Self::Destroy => "Destroy",
            Self::Query => "Query",
            Self::DiscoverVersions => "Discover Versions",
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A request ready to send: its operation and TTLV bytes.
pub struct Request {
    pub operation: Operation,
    pub bytes: Vec<u8>,
}

fn encode(operation: Operation, payload: RequestPayload) -> Result<Request, ProtocolError> {
    let bytes = kmip_protocol::request::to_vec(payload, None)
        .map_err(|e| ProtocolError::Encode(e.to_string()))?;
    Ok(Request { operation, bytes })
}

fn uid(id: &KeyId) -> Option<UniqueIdentifier> {
    Some(UniqueIdentifier(id.as_str().to_owned()))
}

/// Create an AES-256 symmetric key with usage mask `usage_mask` and Name `name`.
pub fn create_aes256(name: &str, usage_mask: i32) -> Result<Request, ProtocolError> {
    let attributes = vec![
        Attribute::CryptographicAlgorithm(CryptographicAlgorithm::AES),
        Attribute::CryptographicLength(256),
        Attribute(
            AttributeName("Cryptographic Usage Mask".into()),
            None,
            AttributeValue::Integer(usage_mask),
        ),
        Attribute::Name(name.to_owned()),
    ];
    encode(
        Operation::Create,
        RequestPayload::Create(
            ObjectType::SymmetricKey,
            TemplateAttribute::unnamed(attributes),
        ),
    )
}

pub fn activate(id: &KeyId) -> Result<Request, ProtocolError> {
    encode(Operation::Activate, RequestPayload::Activate(uid(id)))
}

/// Get the key in Raw format.
pub fn get(id: &KeyId) -> Result<Request, ProtocolError> {
    encode(
        Operation::Get,
        RequestPayload::Get(uid(id), Some(KeyFormatType::Raw), None, None),
    )
}

/// Locate symmetric keys carrying Name `name`.
pub fn locate_by_name(name: &str) -> Result<Request, ProtocolError> {
    encode(
        Operation::Locate,
        RequestPayload::Locate(vec![
            Attribute::ObjectType(ObjectType::SymmetricKey),
            Attribute::Name(name.to_owned()),
        ]),
    )
}

/// Locate symmetric keys carrying Name `name` that are in the Active state (a Name stays on a
/// key after it is revoked, so a name alone may find a Deactivated or Pre-Active key).
pub fn locate_active_by_name(name: &str) -> Result<Request, ProtocolError> {
    encode(
        Operation::Locate,
        RequestPayload::Locate(vec![
            Attribute::ObjectType(ObjectType::SymmetricKey),
            Attribute::Name(name.to_owned()),
            Attribute(
                AttributeName("State".into()),
                None,
                AttributeValue::State(State::Active),
            ),
        ]),
    )
}

/// Get Attributes asking for the State attribute only.
pub fn get_state(id: &KeyId) -> Result<Request, ProtocolError> {
    encode(
        Operation::GetAttributes,
        RequestPayload::GetAttributes(uid(id), Some(vec![AttributeName("State".into())])),
    )
}

/// Revoke with `reason`; `now_unix_s` is the compromise date for [`RevocationReason::KeyCompromise`].
pub fn revoke(
    id: &KeyId,
    reason: RevocationReason,
    now_unix_s: u64,
) -> Result<Request, ProtocolError> {
    let (code, compromise) = match reason {
        RevocationReason::Superseded => (RevocationReasonCode::Superseded, None),
        RevocationReason::CessationOfOperation => {
            (RevocationReasonCode::CessationOfOperation, None)
        }
        RevocationReason::KeyCompromise => (
            RevocationReasonCode::KeyCompromise,
            Some(CompromiseOccurrenceDate(now_unix_s)),
        ),
    };
    let reason = KmipRevocationReason(code, Some(RevocationMessage("revoked by nvseal".into())));
    encode(
        Operation::Revoke,
        RequestPayload::Revoke(uid(id), reason, compromise),
    )
}

pub fn destroy(id: &KeyId) -> Result<Request, ProtocolError> {
    encode(Operation::Destroy, RequestPayload::Destroy(uid(id)))
}

pub fn query() -> Result<Request, ProtocolError> {
    encode(
        Operation::Query,
        RequestPayload::Query(vec![
            QueryFunction::QueryOperations,
            QueryFunction::QueryObjects,
            QueryFunction::QueryServerInformation,
        ]),
    )
}

pub fn discover_versions() -> Result<Request, ProtocolError> {
    encode(
        Operation::DiscoverVersions,
        RequestPayload::DiscoverVersions(Vec::new()),
    )
}

/// The KMIP lifecycle state of a managed object (KMIP 1.0 §9.1.3.2.17).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum KeyState {
    PreActive,
    Active,
    Deactivated,
    Compromised,
    Destroyed,
    DestroyedCompromised,
    /// A value outside the enumeration; kept as received (and never taken for Active).
    Other(u32),
}

impl KeyState {
    pub fn from_code(code: u32) -> Self {
        match code {
            1 => Self::PreActive,
            2 => Self::Active,
            3 => Self::Deactivated,
            4 => Self::Compromised,
            5 => Self::Destroyed,
            6 => Self::DestroyedCompromised,
            other => Self::Other(other),
        }
    }
}

impl std::fmt::Display for KeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PreActive => f.write_str("Pre-Active"),
            Self::Active => f.write_str("Active"),
            Self::Deactivated => f.write_str("Deactivated"),
            Self::Compromised => f.write_str("Compromised"),
            Self::Destroyed => f.write_str("Destroyed"),
            Self::DestroyedCompromised => f.write_str("Destroyed Compromised"),
            Self::Other(code) => write!(f, "state {code:#x}"),
        }
    }
}

/// The decoded outcome of one single-item response.
pub enum Outcome {
    /// Result Status Success; the Response Payload if one was sent.
    Success(Option<Item>),
    /// Any other status, with whatever reason and message the server sent.
    Failure {
        status: ResultStatus,
        reason: Option<ResultReason>,
        message: String,
    },
}

/// Decodes a complete response message (fuzzing entry point) and checks it answers `expected`.
/// Lenient on what a failure reply carries: reason and message are optional and reasons
/// outside KMIP 1.x are kept as numbers; the Operation field is optional in failure replies.
pub fn parse_response(bytes: &[u8], expected: Operation) -> Result<Outcome, ProtocolError> {
    let message = ttlv::decode(bytes)?;
    if message.tag != tag::RESPONSE_MESSAGE {
        return Err(ProtocolError::NotAResponse { found: message.tag });
    }
    message
        .child(tag::RESPONSE_HEADER)
        .ok_or(ProtocolError::Missing("Response Header"))?;
    let items: Vec<&Item> = message.children_with(tag::BATCH_ITEM).collect();
    let [item] = items[..] else {
        return Err(ProtocolError::BatchCount(items.len()));
    };
    let status = item
        .child(tag::RESULT_STATUS)
        .ok_or(ProtocolError::Missing("Result Status"))?;
    let status = enumeration_of(status, "Result Status")?;
    let operation = item
        .child(tag::OPERATION)
        .map(|op| enumeration_of(op, "Operation"))
        .transpose()?;
    match ResultStatus::from_code(status) {
        None => {
            let found = operation.ok_or(ProtocolError::Missing("Operation"))?;
            if found != expected.code() {
                return Err(ProtocolError::WrongOperation {
                    expected: expected.code(),
                    found,
                });
            }
            Ok(Outcome::Success(take_child(message, tag::RESPONSE_PAYLOAD)))
        }
        Some(status) => {
            let reason = item
                .child(tag::RESULT_REASON)
                .and_then(Item::as_enumeration)
                .map(ResultReason);
            let message = item
                .child(tag::RESULT_MESSAGE)
                .and_then(Item::as_text)
                .unwrap_or("")
                .to_owned();
            Ok(Outcome::Failure {
                status,
                reason,
                message,
            })
        }
    }
}

/// Moves the payload out of the (only) batch item so that key bytes are not copied.
fn take_child(message: Item, wanted: u32) -> Option<Item> {
    let ttlv::Value::Structure(items) = message.value else {
        return None;
    };
    let batch = items.into_iter().find(|i| i.tag == tag::BATCH_ITEM)?;
    let ttlv::Value::Structure(fields) = batch.value else {
        return None;
    };
    fields.into_iter().find(|i| i.tag == wanted)
}

fn enumeration_of(item: &Item, field: &'static str) -> Result<u32, ProtocolError> {
    item.as_enumeration().ok_or(ProtocolError::WrongType {
        field,
        expected: "Enumeration",
        found: item.type_name(),
    })
}

fn text_of<'a>(item: &'a Item, field: &'static str) -> Result<&'a str, ProtocolError> {
    item.as_text().ok_or(ProtocolError::WrongType {
        field,
        expected: "Text String",
        found: item.type_name(),
    })
}

fn payload(payload: Option<Item>) -> Result<Item, ProtocolError> {
    payload.ok_or(ProtocolError::Missing("Response Payload"))
}

/// The Unique Identifier of a Create / Activate / Revoke / Destroy reply.
pub fn unique_identifier(reply: Option<Item>) -> Result<KeyId, ProtocolError> {
    let payload = payload(reply)?;
    let id = payload
        .child(tag::UNIQUE_IDENTIFIER)
        .ok_or(ProtocolError::Missing("Unique Identifier"))?;
    Ok(KeyId::new(text_of(id, "Unique Identifier")?))
}

/// All Unique Identifiers of a Locate reply (none is a valid answer).
pub fn located_ids(reply: Option<Item>) -> Result<Vec<KeyId>, ProtocolError> {
    let Some(payload) = reply else {
        return Ok(Vec::new());
    };
    payload
        .children_with(tag::UNIQUE_IDENTIFIER)
        .map(|id| text_of(id, "Unique Identifier").map(KeyId::new))
        .collect()
}

/// The State attribute of a Get Attributes reply (the first Attribute named "State"; any
/// other attributes the server adds are ignored).
pub fn key_state(reply: Option<Item>) -> Result<KeyState, ProtocolError> {
    let payload = payload(reply)?;
    let attr = payload
        .children_with(tag::ATTRIBUTE)
        .find(|a| a.child(tag::ATTRIBUTE_NAME).and_then(Item::as_text) == Some("State"))
        .ok_or(ProtocolError::NoState)?;
    let value = attr
        .child(tag::ATTRIBUTE_VALUE)
        .ok_or(ProtocolError::Missing("Attribute Value of State"))?;
    Ok(KeyState::from_code(enumeration_of(value, "State")?))
}

/// The 32-byte AES key of a Get reply, checked for object type, algorithm and length.
pub fn symmetric_key(reply: Option<Item>) -> Result<Kek, ProtocolError> {
    let payload = payload(reply)?;
    let object_type = payload
        .child(tag::OBJECT_TYPE)
        .ok_or(ProtocolError::Missing("Object Type"))?;
    let object_type = enumeration_of(object_type, "Object Type")?;
    if object_type != enumeration::OBJECT_TYPE_SYMMETRIC_KEY {
        return Err(ProtocolError::NotSymmetricKey(object_type));
    }
    let block = payload
        .child(tag::SYMMETRIC_KEY)
        .and_then(|k| k.child(tag::KEY_BLOCK))
        .ok_or(ProtocolError::Missing("Symmetric Key / Key Block"))?;
    let format = block
        .child(tag::KEY_FORMAT_TYPE)
        .ok_or(ProtocolError::Missing("Key Format Type"))?;
    let format = enumeration_of(format, "Key Format Type")?;
    if let Some(alg) = block.child(tag::CRYPTOGRAPHIC_ALGORITHM) {
        let alg = enumeration_of(alg, "Cryptographic Algorithm")?;
        if alg != enumeration::ALGORITHM_AES {
            return Err(ProtocolError::NotAes(alg));
        }
    }
    let value = block
        .child(tag::KEY_VALUE)
        .ok_or(ProtocolError::Missing("Key Value"))?;
    let material = value
        .child(tag::KEY_MATERIAL)
        .ok_or(ProtocolError::Missing("Key Material"))?;
    let bytes = match format {
        enumeration::KEY_FORMAT_RAW => material.as_bytes(),
        enumeration::KEY_FORMAT_TRANSPARENT_SYMMETRIC => {
            material.child(tag::KEY).and_then(Item::as_bytes)
        }
        other => return Err(ProtocolError::KeyFormat(other)),
    }
    .ok_or(ProtocolError::WrongType {
        field: "Key Material",
        expected: "Byte String",
        found: material.type_name(),
    })?;
    Kek::from_slice(bytes).ok_or(ProtocolError::KeyLength(bytes.len()))
}

/// What a Query reply says about the server.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerInfo {
    /// KMIP operation codes the server supports.
    pub operations: Vec<u32>,
    /// KMIP object type codes the server supports.
    pub object_types: Vec<u32>,
    pub vendor: Option<String>,
}

impl ServerInfo {
    pub fn supports(&self, operation: Operation) -> bool {
        self.operations.contains(&operation.code())
    }
}

pub fn server_info(reply: Option<Item>) -> Result<ServerInfo, ProtocolError> {
    let Some(payload) = reply else {
        return Ok(ServerInfo::default());
    };
    let operations = payload
        .children_with(tag::OPERATION)
        .map(|i| enumeration_of(i, "Operation"))
        .collect::<Result<_, _>>()?;
    let object_types = payload
        .children_with(tag::OBJECT_TYPE)
        .map(|i| enumeration_of(i, "Object Type"))
        .collect::<Result<_, _>>()?;
    let vendor = payload
        .child(tag::VENDOR_IDENTIFICATION)
        .map(|v| text_of(v, "Vendor Identification").map(str::to_owned))
        .transpose()?;
    Ok(ServerInfo {
        operations,
        object_types,
        vendor,
    })
}

/// A KMIP protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct ProtocolVersion {
    pub major: i32,
    pub minor: i32,
}

impl std::fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

pub fn protocol_versions(reply: Option<Item>) -> Result<Vec<ProtocolVersion>, ProtocolError> {
    let Some(payload) = reply else {
        return Ok(Vec::new());
    };
    payload
        .children_with(tag::PROTOCOL_VERSION)
        .map(|v| {
            let part = |t, field| {
                v.child(t)
                    .ok_or(ProtocolError::Missing(field))?
                    .as_integer()
                    .ok_or(ProtocolError::WrongType {
                        field,
                        expected: "Integer",
                        found: "other",
                    })
            };
            Ok(ProtocolVersion {
                major: part(tag::PROTOCOL_VERSION_MAJOR, "Protocol Version Major")?,
                minor: part(tag::PROTOCOL_VERSION_MINOR, "Protocol Version Minor")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minimal TTLV writer for building replies in tests.
    enum T {
        S(u32, Vec<T>),
        I(u32, i32),
        E(u32, u32),
        Txt(u32, &'static str),
        B(u32, Vec<u8>),
    }

    fn enc(t: &T, out: &mut Vec<u8>) {
        let (tag, ty, body): (u32, u8, Vec<u8>) = match t {
            T::S(tag, kids) => {
                let mut b = Vec::new();
                kids.iter().for_each(|k| enc(k, &mut b));
                (*tag, 1, b)
            }
            T::I(tag, v) => (*tag, 2, v.to_be_bytes().to_vec()),
            T::E(tag, v) => (*tag, 5, v.to_be_bytes().to_vec()),
            T::Txt(tag, s) => (*tag, 7, s.as_bytes().to_vec()),
            T::B(tag, b) => (*tag, 8, b.clone()),
        };
        out.extend_from_slice(&tag.to_be_bytes()[1..]);
        out.push(ty);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        while !out.len().is_multiple_of(8) {
            out.push(0);
        }
    }

    fn reply(batch: Vec<T>) -> Vec<u8> {
        let msg = T::S(
            tag::RESPONSE_MESSAGE,
            vec![
                T::S(tag::RESPONSE_HEADER, vec![T::I(tag::BATCH_COUNT, 1)]),
                T::S(tag::BATCH_ITEM, batch),
            ],
        );
        let mut out = Vec::new();
        enc(&msg, &mut out);
        out
    }

    #[test]
    fn get_reply_yields_the_raw_key() {
        let key: Vec<u8> = (0..32).collect();
        let bytes = reply(vec![
            T::E(tag::OPERATION, Operation::Get.code()),
            T::E(tag::RESULT_STATUS, 0),
            T::S(
                tag::RESPONSE_PAYLOAD,
                vec![
                    T::E(tag::OBJECT_TYPE, 2),
                    T::Txt(tag::UNIQUE_IDENTIFIER, "7"),
                    T::S(
                        tag::SYMMETRIC_KEY,
                        vec![T::S(
                            tag::KEY_BLOCK,
                            vec![
                                T::E(tag::KEY_FORMAT_TYPE, 1),
                                T::S(tag::KEY_VALUE, vec![T::B(tag::KEY_MATERIAL, key.clone())]),
                                T::E(tag::CRYPTOGRAPHIC_ALGORITHM, 3),
                                T::I(tag::CRYPTOGRAPHIC_LENGTH, 256),
                            ],
                        )],
                    ),
                ],
            ),
        ]);
        let Outcome::Success(payload) = parse_response(&bytes, Operation::Get).unwrap() else {
            panic!("expected success");
        };
        let kek = symmetric_key(payload).unwrap();
        assert_eq!(&kek.expose()[..], &key[..]);
        // The same bytes are not an answer to another operation.
        assert!(matches!(
            parse_response(&bytes, Operation::Create),
            Err(ProtocolError::WrongOperation {
                expected: 1,
                found: 0x0A
            })
        ));
    }

    #[test]
    fn failure_reply_is_decoded_leniently() {
        // A reason no KMIP version defines (0x38 is reserved in 2.x) and no Operation field,
        // as some servers send: kept as a number.
        let bytes = reply(vec![
            T::E(tag::RESULT_STATUS, 1),
            T::E(tag::RESULT_REASON, 0x38),
            T::Txt(tag::RESULT_MESSAGE, "nope"),
        ]);
        let Outcome::Failure {
            status,
            reason,
            message,
        } = parse_response(&bytes, Operation::Get).unwrap()
        else {
            panic!("expected failure");
        };
        assert_eq!(status, ResultStatus::OperationFailed);
        assert_eq!(reason, Some(ResultReason(0x38)));
        assert_eq!(reason.unwrap().to_string(), "result reason 0x38");
        assert_eq!(message, "nope");
        let bare = reply(vec![T::E(tag::RESULT_STATUS, 1)]);
        assert!(matches!(
            parse_response(&bare, Operation::Get),
            Ok(Outcome::Failure { reason: None, .. })
        ));
    }

    fn state_reply(attrs: Vec<T>) -> Option<Item> {
        let bytes = reply(vec![
            T::E(tag::OPERATION, Operation::GetAttributes.code()),
            T::E(tag::RESULT_STATUS, 0),
            T::S(tag::RESPONSE_PAYLOAD, attrs),
        ]);
        match parse_response(&bytes, Operation::GetAttributes).unwrap() {
            Outcome::Success(p) => p,
            Outcome::Failure { .. } => panic!("expected success"),
        }
    }

    #[test]
    fn get_attributes_reply_yields_the_state() {
        let attr = |name: &'static str, v: u32| {
            T::S(
                tag::ATTRIBUTE,
                vec![
                    T::Txt(tag::ATTRIBUTE_NAME, name),
                    T::E(tag::ATTRIBUTE_VALUE, v),
                ],
            )
        };
        let p = state_reply(vec![
            T::Txt(tag::UNIQUE_IDENTIFIER, "7"),
            attr("Cryptographic Algorithm", 3),
            attr("State", 3),
        ]);
        assert_eq!(key_state(p).unwrap(), KeyState::Deactivated);
        let p = state_reply(vec![attr("State", 2)]);
        assert_eq!(key_state(p).unwrap(), KeyState::Active);
        let p = state_reply(vec![attr("State", 99)]);
        assert_eq!(key_state(p).unwrap(), KeyState::Other(99));
        // No State attribute, or one of the wrong type: refused, never taken for Active.
        let p = state_reply(vec![T::Txt(tag::UNIQUE_IDENTIFIER, "7")]);
        assert!(matches!(key_state(p), Err(ProtocolError::NoState)));
        let p = state_reply(vec![T::S(
            tag::ATTRIBUTE,
            vec![
                T::Txt(tag::ATTRIBUTE_NAME, "State"),
                T::Txt(tag::ATTRIBUTE_VALUE, "Active"),
            ],
        )]);
        assert!(matches!(key_state(p), Err(ProtocolError::WrongType { .. })));
        assert!(get_state(&KeyId::new("7")).is_ok());
        assert!(locate_active_by_name("kek").is_ok());
    }

    #[test]
    fn kmip_2_result_reasons_have_names_and_object_not_found_is_not_found() {
        // What a KMIP 2.x server (Cosmian) answers for a destroyed key, a missing key and a
        // Get of a Deactivated key.
        assert_eq!(ResultReason(0x36).to_string(), "Object Destroyed");
        assert_eq!(ResultReason(0x37).to_string(), "Object Not Found");
        assert_eq!(ResultReason(0x43).to_string(), "Wrong Key Lifecycle State");
        assert_eq!(ResultReason::OBJECT_NOT_FOUND, ResultReason(0x37));
        assert!(ResultReason(0x37).is_not_found());
        assert!(ResultReason(0x01).is_not_found());
        assert!(!ResultReason(0x36).is_not_found());
        assert!(!ResultReason(0x43).is_not_found());
        // Every defined 1.x / 2.x code below 0x4A has a name except the reserved ones.
        for code in 0x01..0x4A {
            let reserved = matches!(code, 0x27 | 0x31 | 0x33 | 0x38);
            assert_eq!(ResultReason(code).name().is_none(), reserved, "{code:#x}");
        }
    }

    #[test]
    fn short_key_and_wrong_types_are_errors() {
        let short = Some(T::S(
            tag::RESPONSE_PAYLOAD,
            vec![
                T::E(tag::OBJECT_TYPE, 2),
                T::S(
                    tag::SYMMETRIC_KEY,
                    vec![T::S(
                        tag::KEY_BLOCK,
                        vec![
                            T::E(tag::KEY_FORMAT_TYPE, 1),
                            T::S(tag::KEY_VALUE, vec![T::B(tag::KEY_MATERIAL, vec![1; 16])]),
                        ],
                    )],
                ),
            ],
        ));
        let mut b = Vec::new();
        enc(short.as_ref().unwrap(), &mut b);
        let item = ttlv::decode(&b).unwrap();
        assert!(matches!(
            symmetric_key(Some(item)),
            Err(ProtocolError::KeyLength(16))
        ));

        let bytes = reply(vec![T::E(tag::OPERATION, 1), T::I(tag::RESULT_STATUS, 0)]);
        assert!(matches!(
            parse_response(&bytes, Operation::Create),
            Err(ProtocolError::WrongType {
                field: "Result Status",
                ..
            })
        ));
        assert!(matches!(
            parse_response(&reply(vec![]), Operation::Create),
            Err(ProtocolError::Missing("Result Status"))
        ));
    }

    #[test]
    fn requests_encode_as_single_item_messages() {
        let id = KeyId::new("42");
        for req in [
            create_aes256("kek-a", KEK_USAGE_MASK).unwrap(),
            activate(&id).unwrap(),
            get(&id).unwrap(),
            locate_by_name("kek-a").unwrap(),
            revoke(&id, RevocationReason::KeyCompromise, 1_700_000_000).unwrap(),
            destroy(&id).unwrap(),
            query().unwrap(),
            discover_versions().unwrap(),
        ] {
            let item = ttlv::decode(&req.bytes).unwrap();
            assert_eq!(item.tag, 0x420078, "{}", req.operation);
            let batch = item.child(tag::BATCH_ITEM).unwrap();
            assert_eq!(
                batch.child(tag::OPERATION).and_then(Item::as_enumeration),
                Some(req.operation.code())
            );
        }
    }
}
