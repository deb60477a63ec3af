//! SQLite values and the total order the merge rule breaks ties with.
//!
//! The order across storage classes is NULL < BLOB < TEXT < REAL < INTEGER (cr-sqlite's order,
//! kept so that values compare the same way as upstream); within a class the natural order, with
//! TEXT and BLOB compared bytewise and REAL by IEEE total order.

use std::cmp::Ordering;
use std::hash::{Hash, Hasher};

/// One SQLite value.
#[derive(Debug, Clone)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// 64-bit signed integer.
    Integer(i64),
    /// 64-bit float. SQLite never stores NaN (it becomes NULL), but the order is total anyway.
    Real(f64),
    /// UTF-8 text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

impl Value {
    /// Rank of the storage class in the merge order.
    fn class_rank(&self) -> u8 {
        match self {
            Value::Null => 0,
            Value::Blob(_) => 1,
            Value::Text(_) => 2,
            Value::Real(_) => 3,
            Value::Integer(_) => 4,
        }
    }

    /// Name of the storage class, as SQLite's `typeof()` prints it.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Integer(_) => "integer",
            Value::Real(_) => "real",
            Value::Text(_) => "text",
            Value::Blob(_) => "blob",
        }
    }

    /// Size of the payload in bytes (used for limits).
    pub fn payload_len(&self) -> usize {
        match self {
            Value::Null => 0,
            Value::Integer(_) | Value::Real(_) => 8,
            Value::Text(s) => s.len(),
            Value::Blob(b) => b.len(),
        }
    }
}

impl Ord for Value {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Value::Null, Value::Null) => Ordering::Equal,
            (Value::Integer(a), Value::Integer(b)) => a.cmp(b),
            (Value::Real(a), Value::Real(b)) => a.total_cmp(b),
            (Value::Text(a), Value::Text(b)) => a.as_bytes().cmp(b.as_bytes()),
            (Value::Blob(a), Value::Blob(b)) => a.cmp(b),
            _ => self.class_rank().cmp(&other.class_rank()),
        }
    }
}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Value {}

impl Hash for Value {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.class_rank().hash(state);
        match self {
            Value::Null => {}
            Value::Integer(i) => i.hash(state),
            // Consistent with total_cmp equality: equal bit patterns.
            Value::Real(r) => r.to_bits().hash(state),
            Value::Text(s) => s.hash(state),
            Value::Blob(b) => b.hash(state),
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Integer(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Real(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Blob(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn class_order_is_null_blob_text_real_integer() {
        let ordered = [
            Value::Null,
            Value::Blob(vec![0xff; 4]),
            Value::Text("zzz".into()),
            Value::Real(f64::MAX),
            Value::Integer(i64::MIN),
        ];
        for pair in ordered.windows(2) {
            assert!(pair[0] < pair[1], "{:?} < {:?}", pair[0], pair[1]);
        }
    }

    #[test]
    fn text_compares_bytewise() {
        assert!(Value::from("B") < Value::from("a"));
        assert!(Value::from("a") < Value::from("ab"));
        assert!(Value::Blob(vec![]) < Value::Blob(vec![0]));
    }

    fn any_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(Value::Integer),
            any::<f64>().prop_map(Value::Real),
            ".{0,4}".prop_map(Value::Text),
            proptest::collection::vec(any::<u8>(), 0..4).prop_map(Value::Blob),
        ]
    }

    proptest! {
        // The order is total: antisymmetric and transitive, so "take the max" is well defined.
        #[test]
        fn value_order_is_total(a in any_value(), b in any_value(), c in any_value()) {
            prop_assert_eq!(a.cmp(&b), b.cmp(&a).reverse());
            if a <= b && b <= c {
                prop_assert!(a <= c);
            }
            prop_assert_eq!(a == b, a.cmp(&b) == Ordering::Equal);
        }
    }
}
