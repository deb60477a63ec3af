//! The matcher: one query's current result rows by identity, and the difference a rerun makes (insert, update, delete events).

use super::*;

/// Result rows as (identity: the packed key columns, visible values).
pub(super) type FoundRows = Vec<(Vec<u8>, Vec<Value>)>;

pub(super) fn pack(values: &[Value]) -> Vec<u8> {
    PackedPk::pack(values)
        .map(|p| p.as_bytes().to_vec())
        .unwrap_or_default()
}

pub(super) fn unpack(bytes: &[u8]) -> Result<Vec<Value>, SubsError> {
    PackedPk::from_bytes(bytes.to_vec())
        .map(|p| p.values())
        .map_err(|e| SubsError::Internal(format!("stored row: {e}")))
}

/// The first byte of a result row's values as the subscriptions file stores them. Earlier
/// releases stored them packed as a key, which starts with the value count (1 to 255) and
/// cannot hold NULL: a row with one was stored empty, and the file then failed every start.
const ROW_FORMAT: u8 = 0;

/// A result row's values as the subscriptions file stores them: any values, NULL included.
pub(super) fn encode_row(values: &[Value]) -> Vec<u8> {
    let mut out = vec![ROW_FORMAT];
    let put_bytes = |out: &mut Vec<u8>, tag: u8, bytes: &[u8]| {
        out.push(tag);
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(bytes);
    };
    for value in values {
        match value {
            Value::Null => out.push(0),
            Value::Integer(n) => {
                out.push(1);
                out.extend_from_slice(&n.to_le_bytes());
            }
            Value::Real(r) => {
                out.push(2);
                out.extend_from_slice(&r.to_bits().to_le_bytes());
            }
            Value::Text(s) => put_bytes(&mut out, 3, s.as_bytes()),
            Value::Blob(b) => put_bytes(&mut out, 4, b),
        }
    }
    out
}

/// Reads a result row's values back from [`encode_row`], or from an earlier release's format.
pub(super) fn decode_row(bytes: &[u8]) -> Result<Vec<Value>, SubsError> {
    let mut rest =
        match bytes.split_first() {
            Some((&ROW_FORMAT, rest)) => rest,
            Some(_) => return unpack(bytes),
            None => return Err(SubsError::Internal(
                "a stored result row is empty (a row with a NULL, stored by an earlier release)"
                    .into(),
            )),
        };
    let mut values = Vec::new();
    while let Some((&tag, after)) = rest.split_first() {
        rest = after;
        values.push(match tag {
            0 => Value::Null,
            1 => Value::Integer(take_word(&mut rest)? as i64),
            2 => Value::Real(f64::from_bits(take_word(&mut rest)?)),
            3 | 4 => {
                let len = usize::try_from(take_word(&mut rest)?).map_err(|_| malformed_row())?;
                let bytes = take(&mut rest, len)?.to_vec();
                if tag == 3 {
                    Value::Text(String::from_utf8(bytes).map_err(|_| malformed_row())?)
                } else {
                    Value::Blob(bytes)
                }
            }
            _ => return Err(malformed_row()),
        });
    }
    Ok(values)
}

fn malformed_row() -> SubsError {
    SubsError::Internal("a stored result row is malformed".into())
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], SubsError> {
    if rest.len() < n {
        return Err(malformed_row());
    }
    let (taken, left) = rest.split_at(n);
    *rest = left;
    Ok(taken)
}

fn take_word(rest: &mut &[u8]) -> Result<u64, SubsError> {
    let bytes = take(rest, 8)?;
    Ok(u64::from_le_bytes(
        bytes.try_into().expect("took eight bytes"),
    ))
}

/// One subscription: its plan, its rows, its change stream.
pub(super) struct Matcher {
    pub(super) id: String,
    pub(super) hash: String,
    pub(super) sql: String,
    pub(super) plan: Plan,
    pub(super) columns: Vec<String>,
    /// identity (packed key values) -> (row id, visible values)
    pub(super) rows: HashMap<Vec<u8>, (u64, Vec<Value>)>,
    /// Per alias: that table's key (packed) -> identities of rows it contributes to.
    pub(super) by_alias: Vec<HashMap<Vec<u8>, BTreeSet<Vec<u8>>>>,
    pub(super) next_row_id: u64,
    pub(super) last_change_id: u64,
    pub(super) live: broadcast::Sender<Arc<ChangeEvent>>,
    /// Since when nobody has listened (None while someone does).
    pub(super) idle_since: Option<Instant>,
    /// False until its first rows are in (a query thread runs them).
    pub(super) ready: bool,
    pub(super) work: Work,
}

impl Matcher {
    /// Subscribers are waiting for its rows (a first or an ordered query is out for them).
    pub(super) fn waited_on(&self) -> bool {
        !self.work.waiting.is_empty()
            || matches!(self.work.busy, Some(Purpose::First | Purpose::Ordered(_)))
    }

    pub(super) fn alias_key(&self, alias: usize, identity_values: &[Value]) -> Vec<u8> {
        let a = &self.plan.aliases[alias];
        pack(&identity_values[a.key_start..a.key_start + a.key_len])
    }

    pub(super) fn index(&mut self, identity: &[u8], add: bool) {
        let Ok(values) = unpack(identity) else { return };
        for alias in 0..self.plan.aliases.len() {
            let key = self.alias_key(alias, &values);
            let entry = self.by_alias[alias].entry(key.clone()).or_default();
            if add {
                entry.insert(identity.to_vec());
            } else {
                entry.remove(identity);
                if entry.is_empty() {
                    self.by_alias[alias].remove(&key);
                }
            }
        }
    }

    /// Diffs `found` (identity -> values) against the held rows among `scope` (None: all held
    /// rows); applies the difference and returns it as events (not yet numbered).
    pub(super) fn diff(
        &mut self,
        scope: Option<BTreeSet<Vec<u8>>>,
        found: FoundRows,
    ) -> Vec<(ChangeType, u64, Vec<Value>, Vec<u8>)> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for (identity, values) in found {
            seen.insert(identity.clone());
            match self.rows.get_mut(&identity) {
                Some((row_id, old)) => {
                    if *old != values {
                        *old = values.clone();
                        out.push((ChangeType::Update, *row_id, values, identity));
                    }
                }
                None => {
                    self.next_row_id += 1;
                    let row_id = self.next_row_id;
                    self.rows.insert(identity.clone(), (row_id, values.clone()));
                    self.index(&identity, true);
                    out.push((ChangeType::Insert, row_id, values, identity));
                }
            }
        }
        let gone: Vec<Vec<u8>> = match scope {
            Some(scope) => scope.into_iter().filter(|i| !seen.contains(i)).collect(),
            None => self
                .rows
                .keys()
                .filter(|i| !seen.contains(*i))
                .cloned()
                .collect(),
        };
        for identity in gone {
            if let Some((row_id, values)) = self.rows.remove(&identity) {
                self.index(&identity, false);
                out.push((ChangeType::Delete, row_id, values, identity));
            }
        }
        out
    }
}

#[cfg(test)]
mod row_tests {
    use super::*;

    /// Every kind of value comes back as stored, NULL included (an earlier release stored a
    /// row with a NULL empty, and could not read it back), and so do an earlier release's
    /// rows without one.
    #[test]
    fn result_rows_with_any_values_come_back_as_stored() {
        let row = vec![
            Value::Null,
            Value::Integer(-7),
            Value::Real(1.5),
            Value::Text("é".into()),
            Value::Blob(vec![0, 1, 2]),
            Value::Text(String::new()),
        ];
        assert_eq!(decode_row(&encode_row(&row)).unwrap(), row);
        assert_eq!(decode_row(&encode_row(&[])).unwrap(), Vec::<Value>::new());
        let earlier = vec![Value::Integer(3), Value::Text("a".into())];
        assert_eq!(decode_row(&pack(&earlier)).unwrap(), earlier);
        assert!(
            decode_row(&[]).is_err(),
            "an earlier release's row with a NULL"
        );
        let encoded = encode_row(&row);
        for len in 1..encoded.len() {
            let cut = decode_row(&encoded[..len]);
            assert!(
                cut.is_err() || cut.unwrap().len() < row.len(),
                "cut at {len}"
            );
        }
        assert!(decode_row(&[ROW_FORMAT, 9]).is_err());
    }
}
