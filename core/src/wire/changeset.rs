//! The changeset codec (the layout is in the module's documentation).

use std::sync::Arc;

use super::*;

/// Appends the encoding of `changeset` to `out`.
pub fn encode_changeset(changeset: &Changeset, out: &mut Vec<u8>) {
    let mut tables: BTreeMap<&str, u64> = BTreeMap::new();
    let mut columns: BTreeMap<&str, u64> = BTreeMap::new();
    let mut table_order = Vec::new();
    let mut column_order = Vec::new();
    for change in &changeset.changes {
        if !tables.contains_key(&*change.table) {
            tables.insert(&change.table, table_order.len() as u64);
            table_order.push(&*change.table);
        }
        if let Column::Name(name) = &change.column {
            if !columns.contains_key(&**name) {
                columns.insert(name, column_order.len() as u64);
                column_order.push(&**name);
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
        put_varint(out, tables[&*change.table]);
        put_bytes(out, change.pk.as_bytes());
        put_varint(
            out,
            match &change.column {
                Column::Sentinel => 0,
                Column::Name(n) => columns[&**n] + 1,
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

/// What a changeset's encoding starts with: whose, which version, which seqs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangesetHead {
    /// The author.
    pub site: SiteId,
    /// The author's version.
    pub version: DbVersion,
    /// The seqs it covers.
    pub span: SeqSpan,
}

impl ChangesetHead {
    /// The id of the changeset or part.
    pub fn part_id(&self) -> PartId {
        PartId {
            id: ChangesetId {
                site: self.site,
                version: self.version,
            },
            start: self.span.start,
        }
    }
}

/// Reads a changeset's head and commit time (0 when the format has none), checked as
/// [`decode_changeset`] checks them.
fn read_head(r: &mut Reader<'_>) -> Result<(ChangesetHead, u64), DecodeError> {
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
    Ok((
        ChangesetHead {
            site,
            version,
            span,
        },
        committed_at,
    ))
}

/// Decodes only the head of an encoded changeset (see [`ChangesetHead`]): the rest is neither
/// read nor checked.
pub fn decode_changeset_head(bytes: &[u8], limits: &Limits) -> Result<ChangesetHead, DecodeError> {
    Ok(read_head(&mut changeset_reader(bytes, limits)?)?.0)
}

/// A reader over an encoded changeset, refused whole when it is over the size limit.
fn changeset_reader<'a>(bytes: &'a [u8], limits: &'a Limits) -> Result<Reader<'a>, DecodeError> {
    if bytes.len() > limits.changeset_bytes_max {
        return Err(DecodeError::TooLarge {
            what: "changeset size",
            got: bytes.len() as u64,
            limit: limits.changeset_bytes_max as u64,
        });
    }
    Ok(Reader { bytes, limits })
}

/// Decodes one changeset that must fill `bytes` exactly.
pub fn decode_changeset(bytes: &[u8], limits: &Limits) -> Result<Changeset, DecodeError> {
    let mut r = changeset_reader(bytes, limits)?;
    let (
        ChangesetHead {
            site,
            version,
            span,
        },
        committed_at,
    ) = read_head(&mut r)?;
    // Each change refers to these by index: one shared copy of each name.
    let tables: Vec<Arc<str>> = r.names("table")?.into_iter().map(Arc::from).collect();
    let columns: Vec<Arc<str>> = r.names("column")?.into_iter().map(Arc::from).collect();
    let count = r.count("change count", limits.changes_max, 9)?;
    let mut changes: Vec<Change> = Vec::with_capacity(count);
    for _ in 0..count {
        let table = tables
            .get(usize::try_from(r.varint()?).unwrap_or(usize::MAX))
            .ok_or(DecodeError::Index("table"))?
            .clone();
        let pk_len = r.len("primary key", limits.value_bytes_max)?;
        let pk_bytes = r.take(pk_len, "primary key")?;
        // A row's changes come one after another with the same key: validated and held once.
        let pk = match changes.last() {
            Some(previous) if previous.pk.as_bytes() == pk_bytes => previous.pk.clone(),
            _ => PackedPk::from_slice(pk_bytes)?,
        };
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
