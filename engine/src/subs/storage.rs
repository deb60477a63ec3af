//! The manager's own SQLite file: each subscription's SQL, rows and recent changes, written before events leave; read back after a restart and for resuming subscribers.

use super::*;

impl Manager {
    /// Saves a new subscription with its first rows.
    pub(super) fn store_new(&mut self, index: usize) -> Result<(), SubsError> {
        let matcher = &self.matchers[index];
        let tx = self.storage.transaction()?;
        tx.execute(
            "INSERT INTO subs (id, sql, hash, last_change_id, next_row_id) VALUES (?1, ?2, ?3, 0, ?4)",
            params![matcher.id, matcher.sql, matcher.hash, matcher.next_row_id as i64],
        )?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO sub_rows (sub, identity, row_id, vals) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (identity, (row_id, values)) in &matcher.rows {
                insert.execute(params![
                    matcher.id,
                    identity,
                    *row_id as i64,
                    encode_row(values)
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// A subscriber resuming after change id `from`: the changes since, from the history.
    pub(super) fn replay(&mut self, index: usize, from: u64) -> Result<Attached, SubsError> {
        let matcher = &self.matchers[index];
        if from > matcher.last_change_id {
            return Err(SubsError::BadQuery(format!(
                "change id {from} is ahead of this subscription (last {})",
                matcher.last_change_id
            )));
        }
        let oldest: Option<i64> = self
            .storage
            .query_row(
                "SELECT min(change_id) FROM sub_changes WHERE sub = ?1",
                [&matcher.id],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        let oldest = oldest.map_or(matcher.last_change_id + 1, |o| o as u64);
        if from + 1 < oldest {
            return Err(SubsError::Resume(format!(
                "change id {from} is older than the history kept (changes {oldest} to {}): subscribe again without from",
                matcher.last_change_id
            )));
        }
        let mut replay = Vec::new();
        let mut stmt = self.storage.prepare_cached(
            "SELECT change_id, kind, row_id, vals FROM sub_changes
             WHERE sub = ?1 AND change_id > ?2 ORDER BY change_id",
        )?;
        let mut found = stmt.query(params![matcher.id, from as i64])?;
        while let Some(row) = found.next()? {
            let change_id = row.get::<_, i64>(0)? as u64;
            let values = decode_row(&row.get::<_, Vec<u8>>(3)?).map_err(|e| {
                SubsError::Resume(format!(
                    "change {change_id} cannot be read back ({e}): subscribe again without from"
                ))
            })?;
            replay.push(Arc::new(ChangeEvent {
                change_id,
                kind: kind_from_code(row.get(1)?),
                row_id: row.get::<_, i64>(2)? as u64,
                values,
            }));
        }
        Ok(self.attached(index, None, true, replay))
    }

    /// Loads the stored subscriptions and reconciles them with the data.
    pub(super) fn load(&mut self) -> Result<(), SubsError> {
        let stored: Vec<(String, String, String, i64, i64)> = self
            .storage
            .prepare("SELECT id, sql, hash, last_change_id, next_row_id FROM subs")?
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?;
        for (id, sql, hash, last_change_id, next_row_id) in stored {
            let (plan, _, columns) = match self.prepare(&sql) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("subscription {id} can no longer run ({e}); dropped");
                    self.forget_stored(&id)?;
                    continue;
                }
            };
            let (live, _) = broadcast::channel(self.config.subscriber_buffer);
            let mut matcher = Matcher {
                id: id.clone(),
                hash,
                sql,
                by_alias: vec![HashMap::new(); plan.aliases.len()],
                plan,
                columns,
                rows: HashMap::new(),
                next_row_id: next_row_id as u64,
                last_change_id: last_change_id as u64,
                live,
                // Nobody listens yet after a restart: collected unless someone resumes it.
                idle_since: Some(Instant::now()),
                ready: true,
                work: Work::new(0),
            };
            matcher.work = Work::new(matcher.plan.aliases.len());
            let rows: Vec<(Vec<u8>, i64, Vec<u8>)> = self
                .storage
                .prepare("SELECT identity, row_id, vals FROM sub_rows WHERE sub = ?1")?
                .query_map([&id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            let mut unreadable = None;
            for (identity, row_id, vals) in rows {
                // Rows of another width: the schema changed the query's columns while the
                // node was down (`SELECT *` after a column was added).
                let decoded = decode_row(&vals).and_then(|values| {
                    if values.len() == matcher.plan.visible {
                        Ok(values)
                    } else {
                        Err(SubsError::Ended(format!(
                            "its rows have {} columns, its query now {}",
                            values.len(),
                            matcher.plan.visible
                        )))
                    }
                });
                match decoded {
                    Ok(values) => {
                        matcher
                            .rows
                            .insert(identity.clone(), (row_id as u64, values));
                        matcher.index(&identity, true);
                    }
                    Err(e) => {
                        unreadable = Some(e);
                        break;
                    }
                }
            }
            // A subscription whose rows cannot be read back (an earlier release stored rows
            // with a NULL empty) is dropped, as one whose SQL no longer runs: its clients
            // subscribe again. Failing here failed the node's start.
            if let Some(e) = unreadable {
                tracing::warn!("subscription {id}: {e}; dropped");
                self.forget_stored(&id)?;
                continue;
            }
            self.matchers.push(matcher);
        }
        self.note_any();
        // Anything committed while subscriptions were not watching becomes events (soon).
        self.resync();
        Ok(())
    }
}

impl Manager {
    /// Deletes a stored subscription: its SQL, rows and history.
    pub(super) fn forget_stored(&mut self, id: &str) -> Result<(), SubsError> {
        let tx = self.storage.transaction()?;
        for table in ["subs", "sub_rows", "sub_changes"] {
            let column = if table == "subs" { "id" } else { "sub" };
            tx.execute(&format!("DELETE FROM {table} WHERE {column} = ?1"), [id])?;
        }
        tx.commit()?;
        Ok(())
    }
}

/// Opens the connections the manager keeps: `db`, the replicated database, read only (it only
/// plans queries: prepares them, runs none), and `path`, the subscriptions' own file, created
/// with its tables if new.
pub(super) fn open(db: &Path, path: &Path) -> Result<(Connection, Connection), SubsError> {
    // Only plans queries (prepares them, runs none).
    let reader = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    reader.execute_batch("PRAGMA busy_timeout = 5000;")?;
    let storage = Connection::open(path)?;
    // FULL: each batch of events is on disk before any subscriber sees it. Under NORMAL a
    // power loss (not a process crash) could take back the last events, and their change ids
    // would then be given to other events: a client that had seen them, resuming from its
    // last id, would skip those without an error. Costs an fsync per batch: remote write to
    // event p50 0.50 -> 0.66-0.76 ms, fan-out 800-840 -> 700-750 events/s (BENCHMARKS).
    storage.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE IF NOT EXISTS subs (
           id TEXT PRIMARY KEY, sql TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
           last_change_id INTEGER NOT NULL, next_row_id INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS sub_rows (
           sub TEXT NOT NULL, identity BLOB NOT NULL, row_id INTEGER NOT NULL, vals BLOB NOT NULL,
           PRIMARY KEY (sub, identity)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS sub_changes (
           sub TEXT NOT NULL, change_id INTEGER NOT NULL, kind INTEGER NOT NULL,
           row_id INTEGER NOT NULL, vals BLOB NOT NULL,
           PRIMARY KEY (sub, change_id)) WITHOUT ROWID;",
    )?;
    Ok((reader, storage))
}
