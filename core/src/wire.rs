//! Compact binary encoding of changesets, and a decoder for untrusted bytes.
//!
//! Layout (format 1), integers as LEB128 varints unless noted:
//! ```text
//! format: u8 = 1 | site: 16 bytes | version | span: start, end, last (seqs; see SeqSpan)
//! n_tables, then per table: len, UTF-8 bytes
//! n_columns, then per column name: len, UTF-8 bytes
//! n_changes, then per change:
//!   table index | pk len, packed pk | column (0 = sentinel, i + 1 = column name i)
//!   value tag u8 (0 null, 1 integer, 2 real, 3 text, 4 blob) and payload
//!     (integer: zigzag varint; real: 8 bytes little-endian; text, blob: len, bytes)
//!   col_version | cl | seq
//! ```
//! Table and column names are written once per changeset, so a changeset of many rows of one
//! table costs a few bytes per cell beyond the values themselves.
//!
//! The decoder never panics and never allocates more than the input justifies: every length is
//! checked against the bytes that remain and against [`Limits`] before anything is allocated.

use std::collections::BTreeMap;

use crate::change::{Change, Changeset, ChangesetId, Column, CommitTime, PartId, SeqSpan};
use crate::ids::{CausalLength, ColVersion, DbVersion, Seq, SiteId, SITE_ID_LEN};
use crate::pk::{PackedPk, PkError};
use crate::value::Value;

/// The format of peer message frames and sync requests (unchanged since the first release, so
/// nodes of both releases keep their membership and sync sessions during a rolling upgrade).
pub const FORMAT_VERSION: u8 = 1;
/// The format of changesets this code writes: [`FORMAT_VERSION_WITHOUT_TIME`] plus the commit
/// time after the version.
pub const CHANGESET_FORMAT: u8 = 2;
/// The changeset format before changesets carried their commit time (still read: parts stored
/// by an older node, peers not yet upgraded).
pub const FORMAT_VERSION_WITHOUT_TIME: u8 = 1;

/// Bounds on what a decoder accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded changeset, in bytes.
    pub changeset_bytes_max: usize,
    /// Most changes in one changeset.
    pub changes_max: usize,
    /// Largest single value (text or blob) or packed primary key, in bytes.
    pub value_bytes_max: usize,
    /// Longest table or column name, in bytes.
    pub name_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            changeset_bytes_max: 16 * 1024 * 1024,
            changes_max: 250_000,
            value_bytes_max: 4 * 1024 * 1024,
            name_bytes_max: 1024,
        }
    }
}

/// Why bytes could not be decoded. Always the peer's fault (or corruption); nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ends in the middle of a field.
    #[error("truncated input: {0}")]
    Truncated(&'static str),
    /// A size is over its limit.
    #[error("{what} is {got}, over the limit of {limit}")]
    TooLarge {
        /// Which size.
        what: &'static str,
        /// The size found.
        got: u64,
        /// The limit.
        limit: u64,
    },
    /// Unknown format version byte.
    #[error("unknown changeset format {0}")]
    UnknownFormat(u8),
    /// A varint longer than 10 bytes or over u64.
    #[error("malformed varint")]
    Varint,
    /// A name or text value is not UTF-8.
    #[error("invalid UTF-8 in {0}")]
    InvalidUtf8(&'static str),
    /// Unknown value tag.
    #[error("unknown value tag {0}")]
    ValueTag(u8),
    /// A table or column index points past the name table.
    #[error("{0} index out of range")]
    Index(&'static str),
    /// A number does not fit its field.
    #[error("{0} out of range")]
    Range(&'static str),
    /// A malformed primary key.
    #[error("primary key: {0}")]
    Pk(#[from] PkError),
    /// Bytes left after the changeset.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

/// Appends the encoding of `changeset` to `out`.
pub fn encode_changeset(changeset: &Changeset, out: &mut Vec<u8>) {
    let mut tables: BTreeMap<&str, u64> = BTreeMap::new();
    let mut columns: BTreeMap<&str, u64> = BTreeMap::new();
    let mut table_order = Vec::new();
    let mut column_order = Vec::new();
    for change in &changeset.changes {
        if !tables.contains_key(change.table.as_str()) {
            tables.insert(&change.table, table_order.len() as u64);
            table_order.push(change.table.as_str());
        }
        if let Column::Name(name) = &change.column {
            if !columns.contains_key(name.as_str()) {
                columns.insert(name, column_order.len() as u64);
                column_order.push(name.as_str());
            }
        }
    }
    out.push(CHANGESET_FORMAT);
    out.extend_from_slice(&changeset.id.site.0);
    put_varint(out, changeset.id.version.get());
    put_varint(out, changeset.committed_at.0);
    for seq in [
        changeset.span.start,
        changeset.span.end,
        changeset.span.last,
    ] {
        put_varint(out, u64::from(seq.get()));
    }
    for names in [&table_order, &column_order] {
        put_varint(out, names.len() as u64);
        for name in names.iter() {
            put_bytes(out, name.as_bytes());
        }
    }
    put_varint(out, changeset.changes.len() as u64);
    for change in &changeset.changes {
        put_varint(out, tables[change.table.as_str()]);
        put_bytes(out, change.pk.as_bytes());
        put_varint(
            out,
            match &change.column {
                Column::Sentinel => 0,
                Column::Name(n) => columns[n.as_str()] + 1,
            },
        );
        put_value(out, &change.value);
        put_varint(out, change.col_version.get());
        put_varint(out, change.cl.get());
        put_varint(out, u64::from(change.seq.get()));
    }
}

/// Encodes `changeset` into a new buffer.
pub fn changeset_to_bytes(changeset: &Changeset) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + changeset.changes.len() * 24);
    encode_changeset(changeset, &mut out);
    out
}

/// Decodes one changeset that must fill `bytes` exactly.
pub fn decode_changeset(bytes: &[u8], limits: &Limits) -> Result<Changeset, DecodeError> {
    if bytes.len() > limits.changeset_bytes_max {
        return Err(DecodeError::TooLarge {
            what: "changeset size",
            got: bytes.len() as u64,
            limit: limits.changeset_bytes_max as u64,
        });
    }
    let mut r = Reader { bytes, limits };
    let format = r.u8("format")?;
    if format != CHANGESET_FORMAT && format != FORMAT_VERSION_WITHOUT_TIME {
        return Err(DecodeError::UnknownFormat(format));
    }
    let site = SiteId::from_slice(r.take(SITE_ID_LEN, "site id")?)
        .map_err(|_| DecodeError::Truncated("site id"))?;
    let version = DbVersion(r.varint()?);
    let committed_at = if format == CHANGESET_FORMAT {
        r.varint()?
    } else {
        0
    };
    let mut seq = || -> Result<Seq, DecodeError> {
        Ok(Seq(
            u32::try_from(r.varint()?).map_err(|_| DecodeError::Range("seq"))?
        ))
    };
    let span = SeqSpan {
        start: seq()?,
        end: seq()?,
        last: seq()?,
    };
    if !span.is_valid() {
        return Err(DecodeError::Range("seq span"));
    }
    let tables = r.names("table")?;
    let columns = r.names("column")?;
    let count = r.count("change count", limits.changes_max, 9)?;
    let mut changes = Vec::with_capacity(count);
    for _ in 0..count {
        let table = tables
            .get(usize::try_from(r.varint()?).unwrap_or(usize::MAX))
            .ok_or(DecodeError::Index("table"))?
            .clone();
        let pk_len = r.len("primary key", limits.value_bytes_max)?;
        let pk = PackedPk::from_bytes(r.take(pk_len, "primary key")?.to_vec())?;
        let column = match r.varint()? {
            0 => Column::Sentinel,
            i => Column::Name(
                columns
                    .get(usize::try_from(i - 1).unwrap_or(usize::MAX))
                    .ok_or(DecodeError::Index("column"))?
                    .clone(),
            ),
        };
        let value = r.value()?;
        let col_version = ColVersion(r.varint()?);
        let cl = CausalLength(r.varint()?);
        let seq = Seq(u32::try_from(r.varint()?).map_err(|_| DecodeError::Range("seq"))?);
        if !span.contains(seq) {
            return Err(DecodeError::Range("seq outside the span"));
        }
        changes.push(Change {
            table,
            pk,
            column,
            value,
            col_version,
            cl,
            seq,
        });
    }
    if !r.bytes.is_empty() {
        return Err(DecodeError::Trailing(r.bytes.len()));
    }
    Ok(Changeset {
        id: ChangesetId { site, version },
        span,
        changes,
        committed_at: CommitTime(committed_at),
    })
}

/// Appends `n` as an LEB128 varint (1 to 10 bytes).
pub fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Reads an LEB128 varint from the front of `input`, advancing it. None if truncated or over
/// u64.
pub fn take_varint(input: &mut &[u8]) -> Option<u64> {
    let mut n: u64 = 0;
    for i in 0..10 {
        let (&b, rest) = input.split_first()?;
        *input = rest;
        if i == 9 && b > 1 {
            return None;
        }
        n |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(n);
        }
    }
    None
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.push(0),
        Value::Integer(i) => {
            out.push(1);
            put_varint(out, ((i << 1) ^ (i >> 63)) as u64);
        }
        Value::Real(r) => {
            out.push(2);
            out.extend_from_slice(&r.to_le_bytes());
        }
        Value::Text(s) => {
            out.push(3);
            put_bytes(out, s.as_bytes());
        }
        Value::Blob(b) => {
            out.push(4);
            put_bytes(out, b);
        }
    }
}

/// A cursor over untrusted bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    limits: &'a Limits,
}

impl<'a> Reader<'a> {
    /// A reader past the header every peer message starts with (format byte, cluster id),
    /// refusing other formats and other clusters.
    fn for_cluster(
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

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let before = self.bytes;
        take_varint(&mut self.bytes).ok_or(if before.len() >= 10 {
            DecodeError::Varint
        } else {
            DecodeError::Truncated("varint")
        })
    }

    /// A length, checked against `limit` and against the bytes left.
    fn len(&mut self, what: &'static str, limit: usize) -> Result<usize, DecodeError> {
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
    fn count(
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

    fn utf8(&mut self, what: &'static str, limit: usize) -> Result<String, DecodeError> {
        let len = self.len(what, limit)?;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8(what))
    }

    fn names(&mut self, what: &'static str) -> Result<Vec<String>, DecodeError> {
        let count = self.count("name count", self.limits.changes_max, 1)?;
        (0..count)
            .map(|_| self.utf8(what, self.limits.name_bytes_max))
            .collect()
    }

    fn value(&mut self) -> Result<Value, DecodeError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Changeset {
        let pk = PackedPk::pack(&[Value::Integer(7)]).unwrap();
        let change = |column: Column, value: Value, seq: u32| Change {
            table: "hosts".into(),
            pk: pk.clone(),
            column,
            value,
            col_version: ColVersion(3),
            cl: CausalLength(1),
            seq: Seq(seq),
        };
        Changeset::whole(
            ChangesetId {
                site: SiteId([5; 16]),
                version: DbVersion(300),
            },
            vec![
                change(Column::Sentinel, Value::Null, 0),
                change(Column::Name("name".into()), Value::from("web-1"), 1),
                change(Column::Name("cpu".into()), Value::Real(0.5), 2),
                change(Column::Name("port".into()), Value::Integer(-8080), 3),
                change(Column::Name("cert".into()), Value::Blob(vec![1, 2]), 4),
            ],
        )
    }

    #[test]
    fn the_commit_time_travels_and_older_encodings_still_read() {
        let limits = Limits::default();
        let mut stamped = sample();
        stamped.committed_at = CommitTime(1_764_650_000_123);
        let bytes = changeset_to_bytes(&stamped);
        assert_eq!(
            decode_changeset(&bytes, &limits).unwrap().committed_at.0,
            1_764_650_000_123
        );
        // Identity ignores it: the same changeset read back by sync (time unknown) is equal.
        assert_eq!(stamped, sample());
        // The format before the commit time: the same bytes without its varint.
        let mut old = vec![FORMAT_VERSION_WITHOUT_TIME];
        let plain = changeset_to_bytes(&sample());
        let header = 1 + SITE_ID_LEN;
        let mut version = Vec::new();
        put_varint(&mut version, sample().id.version.get());
        old.extend_from_slice(&plain[1..header + version.len()]);
        old.extend_from_slice(&plain[header + version.len() + 1..]);
        let decoded = decode_changeset(&old, &limits).unwrap();
        assert_eq!(decoded, sample());
        assert!(!decoded.committed_at.is_known());
    }

    #[test]
    fn parts_round_trip_and_bad_spans_are_refused() {
        let mut cs = sample();
        cs.span = SeqSpan {
            start: Seq(1),
            end: Seq(4),
            last: Seq(9),
        };
        cs.changes.remove(0);
        let bytes = changeset_to_bytes(&cs);
        assert_eq!(decode_changeset(&bytes, &Limits::default()).unwrap(), cs);
        // A change outside its span.
        let mut outside = cs.clone();
        outside.span.start = Seq(2);
        assert_eq!(
            decode_changeset(&changeset_to_bytes(&outside), &Limits::default()),
            Err(DecodeError::Range("seq outside the span"))
        );
        // end past last, start past end.
        for (start, end, last) in [(0, 5, 4), (3, 2, 4)] {
            let mut bad = sample();
            bad.changes.clear();
            bad.span = SeqSpan {
                start: Seq(start),
                end: Seq(end),
                last: Seq(last),
            };
            assert_eq!(
                decode_changeset(&changeset_to_bytes(&bad), &Limits::default()),
                Err(DecodeError::Range("seq span"))
            );
        }
    }

    #[test]
    fn round_trip() {
        let cs = sample();
        let bytes = changeset_to_bytes(&cs);
        assert_eq!(decode_changeset(&bytes, &Limits::default()).unwrap(), cs);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = changeset_to_bytes(&sample());
        for len in 0..bytes.len() {
            assert!(
                decode_changeset(&bytes[..len], &Limits::default()).is_err(),
                "prefix {len} decoded"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            decode_changeset(&longer, &Limits::default()),
            Err(DecodeError::Trailing(1))
        );
    }

    #[test]
    fn limits_are_enforced() {
        let bytes = changeset_to_bytes(&sample());
        let tight = Limits {
            changeset_bytes_max: 10,
            ..Limits::default()
        };
        assert!(matches!(
            decode_changeset(&bytes, &tight),
            Err(DecodeError::TooLarge { .. })
        ));
        let few = Limits {
            changes_max: 4,
            ..Limits::default()
        };
        assert!(matches!(
            decode_changeset(&bytes, &few),
            Err(DecodeError::TooLarge {
                what: "change count",
                ..
            })
        ));
        let short_values = Limits {
            value_bytes_max: 2,
            ..Limits::default()
        };
        assert!(matches!(
            decode_changeset(&bytes, &short_values),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn forged_counts_do_not_allocate() {
        // Claims 2^40 changes in a few bytes: refused before any allocation.
        let mut bytes = vec![CHANGESET_FORMAT];
        bytes.extend_from_slice(&[0; 16]);
        // version 1, no commit time, span 0..=0 of 0, no tables, no columns, then the forged
        // count.
        for n in [1, 0, 0, 0, 0, 0, 0] {
            put_varint(&mut bytes, n);
        }
        put_varint(&mut bytes, 1 << 40);
        let no_limit = Limits {
            changes_max: usize::MAX,
            ..Limits::default()
        };
        assert_eq!(
            decode_changeset(&bytes, &no_limit),
            Err(DecodeError::Truncated("change count"))
        );
    }

    #[test]
    fn bad_fields() {
        assert_eq!(
            decode_changeset(&[9], &Limits::default()),
            Err(DecodeError::UnknownFormat(9))
        );
        let mut bytes = changeset_to_bytes(&sample());
        // Corrupt the first table name into invalid UTF-8 (after format, site, 2-byte version,
        // 1-byte unknown commit time, the span's three 1-byte seqs, table count, name length).
        let at = 1 + 16 + 2 + 1 + 3 + 1 + 1;
        assert_eq!(bytes[at], b'h');
        bytes[at] = 0xff;
        assert_eq!(
            decode_changeset(&bytes, &Limits::default()),
            Err(DecodeError::InvalidUtf8("table"))
        );
        let mut overlong = vec![CHANGESET_FORMAT];
        overlong.extend_from_slice(&[0; 16]);
        overlong.extend_from_slice(&[0xff; 11]);
        assert_eq!(
            decode_changeset(&overlong, &Limits::default()),
            Err(DecodeError::Varint)
        );
    }

    proptest! {
        // Arbitrary bytes never panic the decoder.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_changeset(&bytes, &Limits::default());
        }

        // Flipping any byte of a valid encoding never panics either.
        #[test]
        fn corrupted_encoding_never_panics(at in 0usize..200, byte in any::<u8>()) {
            let mut bytes = changeset_to_bytes(&sample());
            let at = at % bytes.len();
            bytes[at] = byte;
            let _ = decode_changeset(&bytes, &Limits::default());
        }

        #[test]
        fn integers_round_trip(n in any::<i64>(), ver in any::<u64>()) {
            let mut cs = sample();
            cs.changes[3].value = Value::Integer(n);
            cs.changes[3].col_version = ColVersion(ver);
            let bytes = changeset_to_bytes(&cs);
            prop_assert_eq!(decode_changeset(&bytes, &Limits::default()).unwrap(), cs);
        }
    }
}

/// A message between two nodes, as it travels in one QUIC stream or datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMessage {
    /// A SWIM packet (opaque here: the membership shell encodes it).
    Membership(Vec<u8>),
    /// A broadcast message and the site that sent it.
    Broadcast {
        /// The sender.
        from: SiteId,
        /// The message.
        msg: crate::broadcast::BroadcastMsg,
    },
}

const TAG_MEMBERSHIP: u8 = 1;
const TAG_BROADCAST: u8 = 2;
const MSG_GOSSIP: u8 = 1;
const MSG_IHAVE: u8 = 2;
const MSG_GRAFT: u8 = 3;
const MSG_PRUNE: u8 = 4;
const MSG_PING: u8 = 5;
const MSG_PONG: u8 = 6;
const MSG_KEPT_GOSSIP: u8 = 7;
const MSG_KEEP: u8 = 8;

/// Most ids in one "I have" or graft.
pub const IDS_PER_MESSAGE_MAX: usize = 4096;

/// Encodes a peer message: format byte, cluster id (u16 little-endian), kind, payload.
pub fn encode_peer_message(cluster: u16, message: &PeerMessage) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    out.extend_from_slice(&cluster.to_le_bytes());
    match message {
        PeerMessage::Membership(bytes) => {
            out.push(TAG_MEMBERSHIP);
            out.extend_from_slice(bytes);
        }
        PeerMessage::Broadcast { from, msg } => {
            use crate::broadcast::BroadcastMsg;
            out.push(TAG_BROADCAST);
            out.extend_from_slice(&from.0);
            match msg {
                BroadcastMsg::Gossip(cs) => {
                    out.push(MSG_GOSSIP);
                    encode_changeset(cs, &mut out);
                }
                BroadcastMsg::KeptGossip(cs) => {
                    out.push(MSG_KEPT_GOSSIP);
                    encode_changeset(cs, &mut out);
                }
                BroadcastMsg::IHave(ids) | BroadcastMsg::Graft(ids) => {
                    out.push(if matches!(msg, BroadcastMsg::IHave(_)) {
                        MSG_IHAVE
                    } else {
                        MSG_GRAFT
                    });
                    put_varint(&mut out, ids.len() as u64);
                    for part in ids {
                        out.extend_from_slice(&part.id.site.0);
                        put_varint(&mut out, part.id.version.get());
                        put_varint(&mut out, u64::from(part.start.get()));
                    }
                }
                BroadcastMsg::Prune => out.push(MSG_PRUNE),
                BroadcastMsg::Keep => out.push(MSG_KEEP),
                BroadcastMsg::Ping(at) | BroadcastMsg::Pong(at) => {
                    out.push(if matches!(msg, BroadcastMsg::Ping(_)) {
                        MSG_PING
                    } else {
                        MSG_PONG
                    });
                    put_varint(&mut out, *at);
                }
            }
        }
    }
    out
}

/// Why a peer message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerMessageError {
    /// The message is for another cluster.
    #[error("message for cluster {0}")]
    OtherCluster(u16),
    /// The bytes are malformed.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// Decodes a peer message from untrusted bytes.
pub fn decode_peer_message(
    bytes: &[u8],
    cluster: u16,
    limits: &Limits,
) -> Result<PeerMessage, PeerMessageError> {
    use crate::broadcast::BroadcastMsg;
    let mut r = Reader::for_cluster(bytes, cluster, limits)?;
    match r.u8("message kind")? {
        TAG_MEMBERSHIP => Ok(PeerMessage::Membership(r.bytes.to_vec())),
        TAG_BROADCAST => {
            let from = SiteId::from_slice(r.take(SITE_ID_LEN, "sender")?)
                .map_err(|_| DecodeError::Truncated("sender"))?;
            let msg = match r.u8("broadcast kind")? {
                kind @ (MSG_GOSSIP | MSG_KEPT_GOSSIP) => {
                    let rest = std::mem::take(&mut r.bytes);
                    let cs = std::sync::Arc::new(decode_changeset(rest, limits)?);
                    if kind == MSG_GOSSIP {
                        BroadcastMsg::Gossip(cs)
                    } else {
                        BroadcastMsg::KeptGossip(cs)
                    }
                }
                kind @ (MSG_IHAVE | MSG_GRAFT) => {
                    let n = r.count("id count", IDS_PER_MESSAGE_MAX, SITE_ID_LEN + 2)?;
                    let mut ids = Vec::with_capacity(n);
                    for _ in 0..n {
                        let site = SiteId::from_slice(r.take(SITE_ID_LEN, "site id")?)
                            .map_err(|_| DecodeError::Truncated("site id"))?;
                        let version = DbVersion(r.varint()?);
                        let start =
                            Seq(u32::try_from(r.varint()?)
                                .map_err(|_| DecodeError::Range("seq"))?);
                        ids.push(PartId {
                            id: ChangesetId { site, version },
                            start,
                        });
                    }
                    if kind == MSG_IHAVE {
                        BroadcastMsg::IHave(ids)
                    } else {
                        BroadcastMsg::Graft(ids)
                    }
                }
                MSG_PRUNE => BroadcastMsg::Prune,
                MSG_KEEP => BroadcastMsg::Keep,
                MSG_PING => BroadcastMsg::Ping(r.varint()?),
                MSG_PONG => BroadcastMsg::Pong(r.varint()?),
                other => return Err(DecodeError::ValueTag(other).into()),
            };
            if !r.bytes.is_empty() {
                return Err(DecodeError::Trailing(r.bytes.len()).into());
            }
            Ok(PeerMessage::Broadcast { from, msg })
        }
        other => Err(DecodeError::ValueTag(other).into()),
    }
}

#[cfg(test)]
mod peer_message_tests {
    use super::*;
    use crate::broadcast::BroadcastMsg;
    use proptest::prelude::*;

    #[test]
    fn peer_messages_round_trip() {
        let from = SiteId([3; 16]);
        let id = ChangesetId {
            site: SiteId([4; 16]),
            version: DbVersion(1 << 40),
        };
        let cs = std::sync::Arc::new(Changeset::whole(id, vec![]));
        let id = PartId {
            id,
            start: Seq(70_000),
        };
        for msg in [
            PeerMessage::Membership(vec![1, 2, 3]),
            PeerMessage::Broadcast {
                from,
                msg: BroadcastMsg::Gossip(cs.clone()),
            },
            PeerMessage::Broadcast {
                from,
                msg: BroadcastMsg::KeptGossip(cs),
            },
            PeerMessage::Broadcast {
                from,
                msg: BroadcastMsg::IHave(vec![id, id]),
            },
            PeerMessage::Broadcast {
                from,
                msg: BroadcastMsg::Graft(vec![id]),
            },
            PeerMessage::Broadcast {
                from,
                msg: BroadcastMsg::Prune,
            },
            PeerMessage::Broadcast {
                from,
                msg: BroadcastMsg::Keep,
            },
            PeerMessage::Broadcast {
                from,
                msg: BroadcastMsg::Ping(u64::MAX),
            },
            PeerMessage::Broadcast {
                from,
                msg: BroadcastMsg::Pong(12_345),
            },
        ] {
            let bytes = encode_peer_message(7, &msg);
            assert_eq!(
                decode_peer_message(&bytes, 7, &Limits::default()),
                Ok(msg.clone())
            );
            assert_eq!(
                decode_peer_message(&bytes, 8, &Limits::default()),
                Err(PeerMessageError::OtherCluster(7))
            );
            if let PeerMessage::Broadcast { .. } = msg {
                for len in 0..bytes.len() {
                    assert!(decode_peer_message(&bytes[..len], 7, &Limits::default()).is_err());
                }
            }
        }
    }

    proptest! {
        #[test]
        fn peer_message_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut framed = vec![FORMAT_VERSION, 7, 0, TAG_BROADCAST];
            framed.extend_from_slice(&bytes);
            let _ = decode_peer_message(&framed, 7, &Limits::default());
            let _ = decode_peer_message(&bytes, 7, &Limits::default());
        }
    }
}

/// Most sites in a sync request.
pub const SYNC_SITES_MAX: usize = 100_000;
/// Most gap ranges per site in a sync request.
pub const SYNC_GAPS_MAX: usize = 100_000;

/// Encodes a sync request (a node's [`crate::sync::SyncState`]).
pub fn encode_sync_state(cluster: u16, state: &crate::sync::SyncState) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    out.extend_from_slice(&cluster.to_le_bytes());
    put_varint(&mut out, state.sites.len() as u64);
    for (site, (head, needs)) in &state.sites {
        out.extend_from_slice(&site.0);
        put_varint(&mut out, head.get());
        put_varint(&mut out, needs.len() as u64);
        for (a, b) in needs {
            put_varint(&mut out, *a);
            put_varint(&mut out, b.saturating_sub(*a));
        }
    }
    out
}

/// Decodes a sync request from untrusted bytes.
pub fn decode_sync_state(
    bytes: &[u8],
    cluster: u16,
    limits: &Limits,
) -> Result<crate::sync::SyncState, PeerMessageError> {
    let mut r = Reader::for_cluster(bytes, cluster, limits)?;
    let mut state = crate::sync::SyncState::default();
    let n = r.count("site count", SYNC_SITES_MAX, SITE_ID_LEN + 2)?;
    for _ in 0..n {
        let site = SiteId::from_slice(r.take(SITE_ID_LEN, "site id")?)
            .map_err(|_| DecodeError::Truncated("site id"))?;
        let head = DbVersion(r.varint()?);
        let gaps = r.count("gap count", SYNC_GAPS_MAX, 2)?;
        let mut needs = Vec::with_capacity(gaps);
        for _ in 0..gaps {
            let a = r.varint()?;
            let b = a
                .checked_add(r.varint()?)
                .ok_or(DecodeError::Range("gap"))?;
            if b > head.get() || a == 0 {
                return Err(DecodeError::Range("gap outside 1..=head").into());
            }
            needs.push((a, b));
        }
        state.sites.insert(site, (head, needs));
    }
    if !r.bytes.is_empty() {
        return Err(DecodeError::Trailing(r.bytes.len()).into());
    }
    Ok(state)
}

#[cfg(test)]
mod sync_wire_tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sync_state_round_trips_and_refuses_bad_input() {
        let mut state = crate::sync::SyncState::default();
        state
            .sites
            .insert(SiteId([1; 16]), (DbVersion(100), vec![(3, 4), (50, 100)]));
        state.sites.insert(SiteId([2; 16]), (DbVersion(0), vec![]));
        let bytes = encode_sync_state(9, &state);
        assert_eq!(
            decode_sync_state(&bytes, 9, &Limits::default()),
            Ok(state.clone())
        );
        assert_eq!(
            decode_sync_state(&bytes, 8, &Limits::default()),
            Err(PeerMessageError::OtherCluster(9))
        );
        for len in 0..bytes.len() {
            assert!(decode_sync_state(&bytes[..len], 9, &Limits::default()).is_err());
        }
        // A gap beyond the head is absurd.
        state
            .sites
            .insert(SiteId([3; 16]), (DbVersion(5), vec![(1, u64::MAX)]));
        assert!(decode_sync_state(&encode_sync_state(9, &state), 9, &Limits::default()).is_err());
    }

    proptest! {
        #[test]
        fn sync_state_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut framed = vec![FORMAT_VERSION, 9, 0];
            framed.extend_from_slice(&bytes);
            let _ = decode_sync_state(&framed, 9, &Limits::default());
        }
    }
}
