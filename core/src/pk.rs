//! Primary-key packing: how a row's identity travels and is stored as bytes.
//!
//! Layout: one count byte, then per column a tag byte whose low 3 bits are the SQLite type code
//! (1 integer, 2 real, 3 text, 4 blob, 5 null) and whose high 5 bits are the width in bytes of
//! the field that follows (an integer, or the length of a text or blob), then the big-endian
//! field, then (text, blob) the bytes. Non-negative integers use the fewest bytes; negative
//! integers always use 8. Reals always use 8. The encoding is canonical: [`PackedPk::from_bytes`]
//! refuses any other encoding of the same tuple, so equal tuples are equal bytes and the packed
//! form can be a database key.

use std::sync::Arc;

use crate::value::Value;

const TYPE_INTEGER: u8 = 1;
const TYPE_REAL: u8 = 2;
const TYPE_TEXT: u8 = 3;
const TYPE_BLOB: u8 = 4;
const TYPE_NULL: u8 = 5;

/// Most columns a primary key may have (the count is one byte).
pub const PK_COLUMNS_MAX: usize = u8::MAX as usize;

/// A packed, validated primary-key tuple. Never empty, never contains NULL. Cheap to clone:
/// each change of a row, its clock and its changes-index entry hold the same key.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PackedPk(Arc<[u8]>);

/// Why a primary key could not be packed or unpacked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PkError {
    /// The tuple has no columns, or more than [`PK_COLUMNS_MAX`].
    #[error("primary key must have 1..=255 columns, got {0}")]
    ColumnCount(usize),
    /// A primary-key column is NULL.
    #[error("primary key column {0} is NULL")]
    Null(usize),
    /// The bytes end early, have bytes left over, or use an unknown tag.
    #[error("malformed packed primary key: {0}")]
    Malformed(&'static str),
    /// The bytes decode, but are not the canonical encoding of their tuple.
    #[error("packed primary key is not in canonical form")]
    NotCanonical,
    /// A text column is not valid UTF-8.
    #[error("primary key column {0} is not valid UTF-8")]
    InvalidUtf8(usize),
}

/// Bytes needed to hold `n` big-endian with leading zeros dropped (0 for 0).
fn width_of(n: u64) -> u8 {
    (8 - n.leading_zeros() / 8) as u8
}

/// Where a key is packed before its one copy into its shared allocation: on the stack up to
/// [`KeyBuf::SMALL`] bytes (nearly every key), on the heap beyond. Packing into a `Vec` and
/// converting it cost two allocations a key, and a key is packed for every row written.
struct KeyBuf {
    small: [u8; KeyBuf::SMALL],
    len: usize,
    large: Vec<u8>,
}

impl KeyBuf {
    const SMALL: usize = 64;

    fn new() -> KeyBuf {
        KeyBuf {
            small: [0; KeyBuf::SMALL],
            len: 0,
            large: Vec::new(),
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.large.is_empty() && self.len + bytes.len() <= KeyBuf::SMALL {
            self.small[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        } else {
            if self.large.is_empty() {
                self.large.extend_from_slice(&self.small[..self.len]);
            }
            self.large.extend_from_slice(bytes);
        }
    }

    fn bytes(&self) -> &[u8] {
        if self.large.is_empty() {
            &self.small[..self.len]
        } else {
            &self.large
        }
    }
}

fn put_uint(out: &mut KeyBuf, n: u64, width: u8) {
    out.push(&n.to_be_bytes()[8 - width as usize..]);
}

impl PackedPk {
    /// Packs a tuple. Fails on an empty tuple, more than 255 columns, or a NULL column.
    pub fn pack(values: &[Value]) -> Result<PackedPk, PkError> {
        PackedPk::pack_iter(values.iter())
    }

    /// [`PackedPk::pack`] of the tuple's values in order, borrowed from wherever they are.
    pub fn pack_iter<'v>(
        values: impl ExactSizeIterator<Item = &'v Value>,
    ) -> Result<PackedPk, PkError> {
        if values.len() == 0 || values.len() > PK_COLUMNS_MAX {
            return Err(PkError::ColumnCount(values.len()));
        }
        let mut out = KeyBuf::new();
        out.push(&[values.len() as u8]);
        for (i, v) in values.enumerate() {
            match v {
                Value::Null => return Err(PkError::Null(i)),
                Value::Integer(n) => {
                    let width = if *n < 0 { 8 } else { width_of(*n as u64) };
                    out.push(&[width << 3 | TYPE_INTEGER]);
                    put_uint(&mut out, *n as u64, width);
                }
                Value::Real(r) => {
                    out.push(&[8 << 3 | TYPE_REAL]);
                    out.push(&r.to_bits().to_be_bytes());
                }
                Value::Text(s) => pack_bytes(&mut out, TYPE_TEXT, s.as_bytes()),
                Value::Blob(b) => pack_bytes(&mut out, TYPE_BLOB, b),
            }
        }
        Ok(PackedPk(Arc::from(out.bytes())))
    }

    /// Validates untrusted bytes: they must unpack, contain no NULL, and be canonical.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<PackedPk, PkError> {
        PackedPk::from_slice(&bytes)
    }

    /// [`PackedPk::from_bytes`] of borrowed bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<PackedPk, PkError> {
        let values = unpack(bytes)?;
        if let Some(i) = values.iter().position(|v| matches!(v, Value::Null)) {
            return Err(PkError::Null(i));
        }
        let canonical = PackedPk::pack(&values)?;
        if *canonical.0 != *bytes {
            return Err(PkError::NotCanonical);
        }
        Ok(canonical)
    }

    /// The packed bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Number of columns.
    pub fn column_count(&self) -> usize {
        self.0[0] as usize
    }

    /// The tuple. Cannot fail: a `PackedPk` is only built from a valid tuple.
    pub fn values(&self) -> Vec<Value> {
        unpack(&self.0).expect("PackedPk holds a valid encoding by construction")
    }
}

impl std::fmt::Debug for PackedPk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pk{:?}", self.values())
    }
}

fn pack_bytes(out: &mut KeyBuf, type_code: u8, data: &[u8]) {
    let width = width_of(data.len() as u64);
    out.push(&[width << 3 | type_code]);
    put_uint(out, data.len() as u64, width);
    out.push(data);
}

/// Unpacks any well-formed encoding (canonical or not) into its tuple.
pub fn unpack(bytes: &[u8]) -> Result<Vec<Value>, PkError> {
    let (&count, mut rest) = bytes
        .split_first()
        .ok_or(PkError::Malformed("empty input"))?;
    if count == 0 {
        return Err(PkError::ColumnCount(0));
    }
    let mut values = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let (&tag, after_tag) = rest
            .split_first()
            .ok_or(PkError::Malformed("missing tag"))?;
        let type_code = tag & 0x07;
        let width = (tag >> 3) as usize;
        if width > 8 {
            return Err(PkError::Malformed("field wider than 8 bytes"));
        }
        if after_tag.len() < width {
            return Err(PkError::Malformed("truncated field"));
        }
        let (field, after_field) = after_tag.split_at(width);
        // Zero-extend: a field narrower than 8 bytes is always a non-negative number.
        let mut be = [0u8; 8];
        be[8 - width..].copy_from_slice(field);
        let n = u64::from_be_bytes(be);
        rest = after_field;
        let value = match type_code {
            TYPE_INTEGER => Value::Integer(n as i64),
            TYPE_REAL => {
                if width != 8 {
                    return Err(PkError::Malformed("real must be 8 bytes"));
                }
                Value::Real(f64::from_bits(n))
            }
            TYPE_TEXT | TYPE_BLOB => {
                let len = usize::try_from(n).map_err(|_| PkError::Malformed("length overflow"))?;
                if rest.len() < len {
                    return Err(PkError::Malformed("truncated text or blob"));
                }
                let (data, after) = rest.split_at(len);
                rest = after;
                if type_code == TYPE_TEXT {
                    Value::Text(
                        std::str::from_utf8(data)
                            .map_err(|_| PkError::InvalidUtf8(i))?
                            .to_owned(),
                    )
                } else {
                    Value::Blob(data.to_vec())
                }
            }
            TYPE_NULL => Value::Null,
            _ => return Err(PkError::Malformed("unknown type code")),
        };
        values.push(value);
    }
    if !rest.is_empty() {
        return Err(PkError::Malformed("trailing bytes"));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(values: Vec<Value>) {
        let packed = PackedPk::pack(&values).unwrap();
        let back = packed.values();
        assert_eq!(back.len(), values.len());
        for (a, b) in values.iter().zip(&back) {
            // Compare bit-exactly, so that -0.0 and +0.0 stay distinct.
            match (a, b) {
                (Value::Real(x), Value::Real(y)) => assert_eq!(x.to_bits(), y.to_bits()),
                _ => assert_eq!(a, b),
            }
        }
        assert_eq!(
            PackedPk::from_bytes(packed.as_bytes().to_vec()).unwrap(),
            packed
        );
    }

    #[test]
    fn edge_values_round_trip() {
        for n in [
            i64::MIN,
            i64::MAX,
            0,
            1,
            -1,
            127,
            128,
            255,
            256,
            1 << 31,
            -(1 << 31),
        ] {
            round_trip(vec![Value::Integer(n)]);
        }
        for r in [0.0, -0.0, 1.5, f64::MIN, f64::MAX, f64::INFINITY] {
            round_trip(vec![Value::Real(r)]);
        }
        round_trip(vec![Value::Text(String::new()), Value::Blob(vec![])]);
        round_trip(vec![
            Value::Blob(vec![7; 70_000]),
            Value::Text("é".repeat(300)),
        ]);
        // Keys packed on the stack up to 64 bytes, on the heap beyond: every length around
        // the switch, and a switch in the middle of a column.
        for len in 55..75 {
            round_trip(vec![Value::Blob(vec![1; len])]);
            round_trip(vec![
                Value::Integer(-1),
                Value::Text("x".repeat(len)),
                Value::Integer(9),
            ]);
        }
    }

    #[test]
    fn known_bytes() {
        // 1 column; integer 1 in one byte: tag (1 << 3) | 1.
        assert_eq!(
            PackedPk::pack(&[Value::Integer(1)]).unwrap().as_bytes(),
            &[1, 0x09, 1]
        );
        // 0 takes no bytes at all.
        assert_eq!(
            PackedPk::pack(&[Value::Integer(0)]).unwrap().as_bytes(),
            &[1, 0x01]
        );
        // -1 always takes 8 bytes.
        let neg = PackedPk::pack(&[Value::Integer(-1)]).unwrap();
        assert_eq!(
            neg.as_bytes(),
            &[1, 0x41, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        // text "ab": length 2 in one byte.
        assert_eq!(
            PackedPk::pack(&[Value::from("ab")]).unwrap().as_bytes(),
            &[1, 0x0b, 2, b'a', b'b']
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(PackedPk::pack(&[]), Err(PkError::ColumnCount(0)));
        assert_eq!(
            PackedPk::pack(&[Value::Integer(1), Value::Null]),
            Err(PkError::Null(1))
        );
        assert!(matches!(
            PackedPk::from_bytes(vec![]),
            Err(PkError::Malformed(_))
        ));
        assert!(matches!(
            PackedPk::from_bytes(vec![1, 0x09]),
            Err(PkError::Malformed(_))
        ));
        assert!(matches!(
            PackedPk::from_bytes(vec![1, 0x09, 1, 0]),
            Err(PkError::Malformed(_))
        ));
        assert!(matches!(
            PackedPk::from_bytes(vec![1, 0x07]),
            Err(PkError::Malformed(_))
        ));
        assert_eq!(PackedPk::from_bytes(vec![1, 0x05]), Err(PkError::Null(0)));
        // 1 written in two bytes is a second encoding of the same key.
        assert_eq!(
            PackedPk::from_bytes(vec![1, 0x11, 0, 1]),
            Err(PkError::NotCanonical)
        );
        assert_eq!(
            PackedPk::from_bytes(vec![1, 0x0b, 1, 0xff]),
            Err(PkError::InvalidUtf8(0))
        );
        // A length that claims more bytes than exist.
        assert!(matches!(
            PackedPk::from_bytes(vec![
                1, 0x43, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff
            ]),
            Err(PkError::Malformed(_))
        ));
    }

    proptest! {
        // Untrusted bytes never panic the decoder.
        #[test]
        fn unpack_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = PackedPk::from_bytes(bytes);
        }

        #[test]
        fn pack_round_trips(ints in proptest::collection::vec(any::<i64>(), 1..4), text in ".{0,8}") {
            let mut values: Vec<Value> = ints.into_iter().map(Value::Integer).collect();
            values.push(Value::Text(text));
            round_trip(values);
        }
    }
}
