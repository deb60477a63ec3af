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
