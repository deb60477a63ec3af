//! The bounded cursor every decoder reads untrusted bytes with.

use super::*;

/// A cursor over untrusted bytes.
pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) limits: &'a Limits,
}

impl<'a> Reader<'a> {
    /// A reader past the header every peer message starts with (format byte, cluster id),
    /// refusing other formats and other clusters.
    pub(super) fn for_cluster(
        bytes: &'a [u8],
        cluster: u16,
        limits: &'a Limits,
    ) -> Result<Reader<'a>, PeerMessageError> {
        let mut r = Reader { bytes, limits };
        let format = r.u8("format")?;
        if format != FORMAT_VERSION {
            return Err(DecodeError::UnknownFormat(format).into());
        }
        let theirs = u16::from_le_bytes(r.take(2, "cluster id")?.try_into().expect("took 2 bytes"));
        if theirs != cluster {
            return Err(PeerMessageError::OtherCluster(theirs));
        }
        Ok(r)
    }

    pub(super) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    pub(super) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    pub(super) fn varint(&mut self) -> Result<u64, DecodeError> {
        let before = self.bytes;
        take_varint(&mut self.bytes).ok_or(if before.len() >= 10 {
            DecodeError::Varint
        } else {
            DecodeError::Truncated("varint")
        })
    }

    /// A length, checked against `limit` and against the bytes left.
    pub(super) fn len(&mut self, what: &'static str, limit: usize) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        if n > limit as u64 {
            return Err(DecodeError::TooLarge {
                what,
                got: n,
                limit: limit as u64,
            });
        }
        if n > self.bytes.len() as u64 {
            return Err(DecodeError::Truncated(what));
        }
        Ok(n as usize)
    }

    /// A count of items each taking at least `min_item_bytes`, so a forged count cannot make us
    /// preallocate more than the input could hold.
    pub(super) fn count(
        &mut self,
        what: &'static str,
        limit: usize,
        min_item_bytes: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        if n > limit as u64 {
            return Err(DecodeError::TooLarge {
                what,
                got: n,
                limit: limit as u64,
            });
        }
        if n.saturating_mul(min_item_bytes as u64) > self.bytes.len() as u64 {
            return Err(DecodeError::Truncated(what));
        }
        Ok(n as usize)
    }

    pub(super) fn utf8(&mut self, what: &'static str, limit: usize) -> Result<String, DecodeError> {
        let len = self.len(what, limit)?;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8(what))
    }

    pub(super) fn names(&mut self, what: &'static str) -> Result<Vec<String>, DecodeError> {
        let count = self.count("name count", self.limits.changes_max, 1)?;
        (0..count)
            .map(|_| self.utf8(what, self.limits.name_bytes_max))
            .collect()
    }

    pub(super) fn value(&mut self) -> Result<Value, DecodeError> {
        Ok(match self.u8("value tag")? {
            0 => Value::Null,
            1 => {
                let z = self.varint()?;
                Value::Integer(((z >> 1) as i64) ^ -((z & 1) as i64))
            }
            2 => {
                let raw: [u8; 8] = self.take(8, "real")?.try_into().expect("took 8 bytes");
                Value::Real(f64::from_le_bytes(raw))
            }
            3 => Value::Text(self.utf8("text value", self.limits.value_bytes_max)?),
            4 => {
                let len = self.len("blob value", self.limits.value_bytes_max)?;
                Value::Blob(self.take(len, "blob value")?.to_vec())
            }
            tag => return Err(DecodeError::ValueTag(tag)),
        })
    }
}
