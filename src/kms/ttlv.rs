//! KMIP TTLV (Tag-Type-Length-Value) decoding into a generic item tree.
//!
//! Owns the parsing of bytes received from a KMS. It runs on whichever control thread drives the
//! KMIP client (never a reactor). It exists because responses come from the network and must be
//! decoded without ever panicking: every length is checked against the bytes present, nesting
//! depth and item count are bounded, and all failures are typed [`TtlvError`]s. Requests are
//! encoded with the `kmip-protocol` crate (see [`super::message`]); responses are decoded here so
//! that failure replies can be read leniently and key material lands in zeroizing buffers.
//!
//! [`decode`] is the fuzzing entry point: it accepts any byte slice.

use zeroize::Zeroizing;

/// Length of a TTLV item header: 3-byte tag, 1-byte type, 4-byte big-endian length.
pub const HEADER_LEN: usize = 8;

/// Deepest structure nesting accepted. KMIP 1.x responses nest at most ~7 levels
/// (message → batch item → payload → object → key block → key value → material).
pub const MAX_DEPTH: usize = 16;

/// Most items accepted in one message; bounds work and memory on hostile input. A Query
/// response listing every operation and object type of a large server stays far below this.
pub const MAX_ITEMS: usize = 4096;

/// TTLV item types (KMIP 1.0 §9.1.1.2).
mod item_type {
    pub const STRUCTURE: u8 = 0x01;
    pub const INTEGER: u8 = 0x02;
    pub const LONG_INTEGER: u8 = 0x03;
    pub const BIG_INTEGER: u8 = 0x04;
    pub const ENUMERATION: u8 = 0x05;
    pub const BOOLEAN: u8 = 0x06;
    pub const TEXT_STRING: u8 = 0x07;
    pub const BYTE_STRING: u8 = 0x08;
    pub const DATE_TIME: u8 = 0x09;
    pub const INTERVAL: u8 = 0x0A;
}

/// Why a byte sequence is not valid TTLV.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlvError {
    #[error("truncated at offset {offset}: need {needed} bytes, {available} available")]
    Truncated {
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("tag {tag:#08x} at offset {offset}: unknown item type {item_type:#04x}")]
    UnknownType {
        offset: usize,
        tag: u32,
        item_type: u8,
    },
    #[error(
        "tag {tag:#08x} at offset {offset}: length {length} invalid for item type {item_type:#04x}"
    )]
    BadLength {
        offset: usize,
        tag: u32,
        item_type: u8,
        length: u32,
    },
    #[error("tag {tag:#08x} at offset {offset}: text string is not UTF-8")]
    BadUtf8 { offset: usize, tag: u32 },
    #[error("tag {tag:#08x} at offset {offset}: boolean value {value} is neither 0 nor 1")]
    BadBoolean { offset: usize, tag: u32, value: u64 },
    #[error("structure nesting deeper than {MAX_DEPTH} at offset {offset}")]
    TooDeep { offset: usize },
    #[error("more than {MAX_ITEMS} items")]
    TooManyItems,
    #[error("{extra} trailing bytes after the top-level item")]
    TrailingBytes { extra: usize },
}

/// One decoded TTLV item.
pub struct Item {
    /// 24-bit tag (0x42xxxx for KMIP-defined tags).
    pub tag: u32,
    pub value: Value,
}

/// The value of a TTLV item. Byte strings are held in zeroizing buffers because they may be
/// key material; for the same reason neither this type nor [`Item`] implements `Debug`.
pub enum Value {
    Structure(Vec<Item>),
    Integer(i32),
    LongInteger(i64),
    /// Big-endian two's complement, as received.
    BigInteger(Zeroizing<Vec<u8>>),
    Enumeration(u32),
    Boolean(bool),
    TextString(String),
    ByteString(Zeroizing<Vec<u8>>),
    /// Seconds since the Unix epoch.
    DateTime(i64),
    /// Seconds.
    Interval(u32),
}

impl Item {
    /// The children of a structure; empty for any other type.
    pub fn children(&self) -> &[Item] {
        match &self.value {
            Value::Structure(items) => items,
            _ => &[],
        }
    }

    /// The first child with `tag`.
    pub fn child(&self, tag: u32) -> Option<&Item> {
        self.children().iter().find(|i| i.tag == tag)
    }

    /// All children with `tag`, in order.
    pub fn children_with(&self, tag: u32) -> impl Iterator<Item = &Item> {
        self.children().iter().filter(move |i| i.tag == tag)
    }

    pub fn as_enumeration(&self) -> Option<u32> {
        match self.value {
            Value::Enumeration(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_integer(&self) -> Option<i32> {
        match self.value {
            Value::Integer(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_text(&self) -> Option<&str> {
        match &self.value {
            Value::TextString(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match &self.value {
            Value::ByteString(b) => Some(b),
            _ => None,
        }
    }

    /// A short name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self.value {
            Value::Structure(_) => "Structure",
            Value::Integer(_) => "Integer",
            Value::LongInteger(_) => "Long Integer",
            Value::BigInteger(_) => "Big Integer",
            Value::Enumeration(_) => "Enumeration",
            Value::Boolean(_) => "Boolean",
            Value::TextString(_) => "Text String",
            Value::ByteString(_) => "Byte String",
            Value::DateTime(_) => "Date-Time",
            Value::Interval(_) => "Interval",
        }
    }
}

/// Parsed item header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u32,
    pub item_type: u8,
    pub length: u32,
}

/// Splits an 8-byte item header. Used by the transport to learn how many bytes follow.
pub fn parse_header(bytes: &[u8; HEADER_LEN]) -> Header {
    let [t0, t1, t2, item_type, l0, l1, l2, l3] = *bytes;
    Header {
        tag: u32::from_be_bytes([0, t0, t1, t2]),
        item_type,
        length: u32::from_be_bytes([l0, l1, l2, l3]),
    }
}

/// Decodes exactly one top-level item that spans all of `bytes`.
pub fn decode(bytes: &[u8]) -> Result<Item, TtlvError> {
    let mut decoder = Decoder { bytes, items: 0 };
    let (item, end) = decoder.item(0, 0)?;
    if end != bytes.len() {
        return Err(TtlvError::TrailingBytes {
            extra: bytes.len().saturating_sub(end),
        });
    }
    Ok(item)
}

struct Decoder<'a> {
    bytes: &'a [u8],
    items: usize,
}

/// Rounds `len` up to the 8-byte TTLV alignment; `None` on overflow.
fn padded(len: usize) -> Option<usize> {
    len.checked_add(7).map(|l| l & !7)
}

impl Decoder<'_> {
    fn take(&self, offset: usize, needed: usize) -> Result<&[u8], TtlvError> {
        let truncated = || TtlvError::Truncated {
            offset,
            needed,
            available: self.bytes.len().saturating_sub(offset),
        };
        let end = offset.checked_add(needed).ok_or_else(truncated)?;
        self.bytes.get(offset..end).ok_or_else(truncated)
    }

    /// Decodes the item at `offset`; returns it and the offset just past its padding.
    fn item(&mut self, offset: usize, depth: usize) -> Result<(Item, usize), TtlvError> {
        self.items += 1;
        if self.items > MAX_ITEMS {
            return Err(TtlvError::TooManyItems);
        }
        let mut header_bytes = [0u8; HEADER_LEN];
        header_bytes.copy_from_slice(self.take(offset, HEADER_LEN)?);
        let Header {
            tag,
            item_type,
            length,
        } = parse_header(&header_bytes);
        let value_offset = offset + HEADER_LEN; // `take` proved offset + 8 <= len
        let len = usize::try_from(length).map_err(|_| TtlvError::BadLength {
            offset,
            tag,
            item_type,
            length,
        })?;
        let bad_length = TtlvError::BadLength {
            offset,
            tag,
            item_type,
            length,
        };
        let padded_len = padded(len).ok_or(bad_length.clone())?;
        // Every item is padded to 8 bytes; require the padding to be present too.
        let raw = self.take(value_offset, padded_len)?;
        let end = value_offset + padded_len; // `take` proved this does not overflow
        let data = raw.get(..len).ok_or(bad_length.clone())?;

        let value = match item_type {
            item_type::STRUCTURE => {
                if depth + 1 >= MAX_DEPTH {
                    return Err(TtlvError::TooDeep { offset });
                }
                if len % 8 != 0 {
                    return Err(bad_length);
                }
                let mut children = Vec::new();
                let mut child_offset = value_offset;
                let struct_end = value_offset + len;
                while child_offset < struct_end {
                    let (child, next) = self.item(child_offset, depth + 1)?;
                    if next > struct_end {
                        return Err(bad_length);
                    }
                    children.push(child);
                    child_offset = next;
                }
                Value::Structure(children)
            }
            item_type::INTEGER => {
                Value::Integer(i32::from_be_bytes(fixed::<4>(data, &bad_length)?))
            }
            item_type::LONG_INTEGER => {
                Value::LongInteger(i64::from_be_bytes(fixed::<8>(data, &bad_length)?))
            }
            item_type::BIG_INTEGER => {
                if len == 0 || len % 8 != 0 {
                    return Err(bad_length);
                }
                Value::BigInteger(Zeroizing::new(data.to_vec()))
            }
            item_type::ENUMERATION => {
                Value::Enumeration(u32::from_be_bytes(fixed::<4>(data, &bad_length)?))
            }
            item_type::BOOLEAN => match u64::from_be_bytes(fixed::<8>(data, &bad_length)?) {
                0 => Value::Boolean(false),
                1 => Value::Boolean(true),
                value => return Err(TtlvError::BadBoolean { offset, tag, value }),
            },
            item_type::TEXT_STRING => match std::str::from_utf8(data) {
                Ok(s) => Value::TextString(s.to_owned()),
                Err(_) => return Err(TtlvError::BadUtf8 { offset, tag }),
            },
            item_type::BYTE_STRING => Value::ByteString(Zeroizing::new(data.to_vec())),
            item_type::DATE_TIME => {
                Value::DateTime(i64::from_be_bytes(fixed::<8>(data, &bad_length)?))
            }
            item_type::INTERVAL => {
                Value::Interval(u32::from_be_bytes(fixed::<4>(data, &bad_length)?))
            }
            other => {
                return Err(TtlvError::UnknownType {
                    offset,
                    tag,
                    item_type: other,
                })
            }
        };
        Ok((Item { tag, value }, end))
    }
}

/// Copies a value of exactly `N` bytes.
fn fixed<const N: usize>(data: &[u8], bad_length: &TtlvError) -> Result<[u8; N], TtlvError> {
    <[u8; N]>::try_from(data).map_err(|_| bad_length.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(tag: u32, item_type: u8, len: u32) -> Vec<u8> {
        let t = tag.to_be_bytes();
        let mut v = vec![t[1], t[2], t[3], item_type];
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    fn pad(mut v: Vec<u8>) -> Vec<u8> {
        while !v.len().is_multiple_of(8) {
            v.push(0);
        }
        v
    }

    fn prim(tag: u32, item_type: u8, value: &[u8]) -> Vec<u8> {
        let mut v = header(tag, item_type, value.len() as u32);
        v.extend_from_slice(value);
        pad(v)
    }

    fn structure(tag: u32, children: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = children.concat();
        let mut v = header(tag, item_type::STRUCTURE, body.len() as u32);
        v.extend_from_slice(&body);
        v
    }

    /// KMIP 1.0 test vector §9.1.2 (structure with enumeration and integer).
    #[test]
    fn decodes_spec_example_structure() {
        let bytes = [
            0x42, 0x00, 0x20, 0x01, 0x00, 0x00, 0x00, 0x20, // structure, 32 bytes
            0x42, 0x00, 0x04, 0x05, 0x00, 0x00, 0x00, 0x04, // enumeration
            0x00, 0x00, 0x00, 0xFE, 0x00, 0x00, 0x00, 0x00, //   254, padding
            0x42, 0x00, 0x05, 0x02, 0x00, 0x00, 0x00, 0x04, // integer
            0x00, 0x00, 0x02, 0x55, 0x00, 0x00, 0x00, 0x00, //   597, padding
        ];
        let item = decode(&bytes).unwrap();
        assert_eq!(item.tag, 0x420020);
        assert_eq!(item.children().len(), 2);
        assert_eq!(
            item.child(0x420004).and_then(Item::as_enumeration),
            Some(254)
        );
        assert_eq!(item.child(0x420005).and_then(Item::as_integer), Some(597));
    }

    #[test]
    fn decodes_every_primitive_type() {
        let msg = structure(
            0x420001,
            &[
                prim(0x420002, item_type::INTEGER, &(-7i32).to_be_bytes()),
                prim(0x420003, item_type::LONG_INTEGER, &(-9i64).to_be_bytes()),
                prim(0x420004, item_type::BIG_INTEGER, &[0, 0, 0, 0, 0, 0, 1, 0]),
                prim(0x420005, item_type::ENUMERATION, &3u32.to_be_bytes()),
                prim(0x420006, item_type::BOOLEAN, &1u64.to_be_bytes()),
                prim(0x420007, item_type::TEXT_STRING, b"Hello World"),
                prim(0x420008, item_type::BYTE_STRING, &[1, 2, 3]),
                prim(
                    0x420009,
                    item_type::DATE_TIME,
                    &1_700_000_000i64.to_be_bytes(),
                ),
                prim(0x42000A, item_type::INTERVAL, &864_000u32.to_be_bytes()),
            ],
        );
        let item = decode(&msg).unwrap();
        let kids = item.children();
        assert_eq!(kids.len(), 9);
        assert!(matches!(kids[0].value, Value::Integer(-7)));
        assert!(matches!(kids[1].value, Value::LongInteger(-9)));
        assert!(matches!(&kids[2].value, Value::BigInteger(b) if b[6] == 1));
        assert!(matches!(kids[3].value, Value::Enumeration(3)));
        assert!(matches!(kids[4].value, Value::Boolean(true)));
        assert_eq!(kids[5].as_text(), Some("Hello World"));
        assert_eq!(kids[6].as_bytes(), Some(&[1u8, 2, 3][..]));
        assert!(matches!(kids[7].value, Value::DateTime(1_700_000_000)));
        assert!(matches!(kids[8].value, Value::Interval(864_000)));
    }

    #[test]
    fn rejects_bad_input_with_typed_errors() {
        let good = structure(
            0x420001,
            &[prim(0x420002, item_type::INTEGER, &[0, 0, 0, 1])],
        );
        // Every strict prefix is truncated.
        for cut in 0..good.len() {
            assert!(
                matches!(decode(&good[..cut]), Err(TtlvError::Truncated { .. })),
                "cut {cut}"
            );
        }
        let mut trailing = good.clone();
        trailing.extend_from_slice(&[0; 8]);
        assert_eq!(
            decode(&trailing).err(),
            Some(TtlvError::TrailingBytes { extra: 8 })
        );

        let wrong_int_len = prim(0x420002, item_type::INTEGER, &[0, 0, 1]);
        assert!(matches!(
            decode(&wrong_int_len),
            Err(TtlvError::BadLength { .. })
        ));
        let unknown = prim(0x420002, 0x0B, &[0; 8]);
        assert!(matches!(
            decode(&unknown),
            Err(TtlvError::UnknownType {
                item_type: 0x0B,
                ..
            })
        ));
        let bad_bool = prim(0x420002, item_type::BOOLEAN, &2u64.to_be_bytes());
        assert!(matches!(
            decode(&bad_bool),
            Err(TtlvError::BadBoolean { value: 2, .. })
        ));
        let bad_utf8 = prim(0x420002, item_type::TEXT_STRING, &[0xff, 0xfe]);
        assert!(matches!(decode(&bad_utf8), Err(TtlvError::BadUtf8 { .. })));
        let huge = header(0x420002, item_type::BYTE_STRING, u32::MAX);
        assert!(matches!(decode(&huge), Err(TtlvError::Truncated { .. })));

        // A child whose padded length runs past its parent's declared length.
        let mut overrun = header(0x420001, item_type::STRUCTURE, 8);
        overrun.extend_from_slice(&prim(0x420002, item_type::INTEGER, &[0, 0, 0, 1]));
        assert!(matches!(decode(&overrun), Err(TtlvError::BadLength { .. })));
    }

    #[test]
    fn bounds_depth_and_item_count() {
        let mut nested = prim(0x420002, item_type::INTEGER, &[0, 0, 0, 1]);
        for _ in 0..MAX_DEPTH {
            nested = structure(0x420001, &[nested]);
        }
        assert!(matches!(decode(&nested), Err(TtlvError::TooDeep { .. })));

        let many: Vec<Vec<u8>> = (0..MAX_ITEMS)
            .map(|_| prim(0x420002, item_type::INTEGER, &[0, 0, 0, 1]))
            .collect();
        assert_eq!(
            decode(&structure(0x420001, &many)).err(),
            Some(TtlvError::TooManyItems)
        );
    }

    /// Mutated and random inputs never panic (a cheap stand-in until a cargo-fuzz target runs).
    #[test]
    fn hostile_input_never_panics() {
        let seed = structure(
            0x42007B,
            &[
                structure(
                    0x42007A,
                    &[prim(0x42000D, item_type::INTEGER, &[0, 0, 0, 1])],
                ),
                structure(
                    0x42000F,
                    &[
                        prim(0x42007F, item_type::ENUMERATION, &[0, 0, 0, 0]),
                        prim(0x420094, item_type::TEXT_STRING, b"1"),
                        prim(0x420043, item_type::BYTE_STRING, &[7; 32]),
                    ],
                ),
            ],
        );
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut decoded = 0;
        for _ in 0..20_000 {
            let mut input = seed.clone();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % input.len();
                input[at] = next() as u8;
            }
            let cut = (next() as usize) % (input.len() + 1);
            if decode(&input[..cut]).is_ok() {
                decoded += 1;
            }
        }
        // Some mutations (e.g. inside string contents) stay valid; most do not.
        assert!(decoded < 20_000);
        for len in 0..64 {
            let random: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = decode(&random);
        }
    }
}
