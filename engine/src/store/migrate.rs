//! Schema changes: building a table's description, migrating to the desired schema, the tables whose writes are captured, and backfilling clocks for rows written before.

use super::*;

impl Store {
    pub(super) fn build_table(&self, def: TableDef, ord: u32) -> Result<Table, StoreError> {
        let mut stmt = self
            .writer
            .prepare("SELECT ord, name FROM __patina_columns WHERE tbl = ?1")?;
        let known: HashMap<String, ColOrd> = stmt
            .query_map([ord], |r| Ok((r.get(1)?, r.get(0)?)))?
            .collect::<Result<_, _>>()?;
        let pk = def.pk_columns();
        let mut col_ords = Vec::new();
        let mut col_by_ord = FastMap::default();
        for (i, col) in def.columns.iter().enumerate() {
            if col.pk_position > 0 {
                col_ords.push(None);
                continue;
            }
            let ord = *known.get(&col.name).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "table {}: column {} has no ordinal",
                    def.name, col.name
                ))
            })?;
            col_ords.push(Some(ord));
            col_by_ord.insert(ord, i);
        }
        Ok(Table {
            name: def.name.as_str().into(),
            column_names: def.columns.iter().map(|c| c.name.as_str().into()).collect(),
            col_by_name: def
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name.clone(), i))
                .collect(),
            affinities: def
                .columns
                .iter()
                .map(|c| Affinity::of(&c.decl_type, def.strict))
                .collect(),
            def,
            ord,
            pk,
            col_ords,
            col_by_ord,
        })
    }

    /// Reads the schema files and applies them: new tables, new columns, new indexes. Anything
    /// else is refused with nothing changed. Tables already replicated but absent from the files
    /// stay replicated (schema changes are additive only).
    pub fn apply_schema_files(&mut self, paths: &[PathBuf]) -> Result<(), StoreError> {
        self.migrate_schema_files(paths, true)
    }

    /// [`Store::apply_schema_files`]; with `backfill_now` false, the backfill a new table's rows
    /// are owed is left to the next [`Store::settle`] (at open: an owed backfill that cannot be
    /// made, a table over the changeset cap or a store at its size cap, must not keep the node
    /// from starting; it is retried a minute later, and at every start, until it is made).
    pub(super) fn migrate_schema_files(
        &mut self,
        paths: &[PathBuf],
        backfill_now: bool,
    ) -> Result<(), StoreError> {
        let files = schema::read_schema_files(paths)?;
        let sql: String = files
            .iter()
            .map(|(_, s)| s.as_str())
            .collect::<Vec<_>>()
            .join(";\n");
        let desired = match schema::parse_schema(&sql) {
            Ok(desired) => desired,
            // The files run as one text, so SQLite's reason names no file: the first that
            // fails by itself for the same reason is named. (An index on another file's table
            // fails alone for another reason, so it is not blamed; and each file is tried
            // alone only once the whole text failed.)
            Err(SchemaError::Sql(reason)) => {
                let named = files.iter().find(|(_, text)| {
                    matches!(schema::parse_schema(text), Err(SchemaError::Sql(own)) if own == reason)
                });
                return Err(SchemaError::Sql(match named {
                    Some((path, _)) => format!("{}: {reason}", path.display()),
                    None => reason,
                })
                .into());
            }
            Err(e) => return Err(e.into()),
        };
        self.apply_desired_schema(desired, backfill_now)
    }

    /// [`Store::apply_schema_files`] from SQL text.
    pub fn apply_schema_sql(&mut self, sql: &str) -> Result<(), StoreError> {
        let desired = schema::parse_schema(sql)?;
        self.apply_desired_schema(desired, true)
    }

    /// Migrates to the tables `desired` (parsed from schema SQL).
    fn apply_desired_schema(
        &mut self,
        desired: BTreeMap<String, schema::TableDef>,
        backfill_now: bool,
    ) -> Result<(), StoreError> {
        self.settle()?;
        self.writer.execute_batch("BEGIN IMMEDIATE")?;
        let result = self.migrate(&desired);
        let result = result.and_then(|backfill| {
            self.writer.execute_batch("COMMIT")?;
            Ok(backfill)
        });
        match result {
            Ok(backfill) => {
                // Committed: should what follows fail, it is owed (see `Store::settle`), or
                // the new tables' rows would never get clocks (a later migration finds them
                // registered) and writes to them would be refused.
                for table in backfill {
                    if !self.backfill_owed.contains(&table) {
                        self.backfill_owed.push(table);
                    }
                }
                if let Err(e) = self.load_state() {
                    self.reload_owed = true;
                    return Err(e);
                }
                self.install_capture();
                let backfilled = if backfill_now {
                    self.backfill_owed()
                } else {
                    Ok(())
                };
                self.warm_statements();
                backfilled
            }
            Err(e) => {
                let _ = self.writer.execute_batch("ROLLBACK");
                self.reload_after_rollback();
                Err(e)
            }
        }
    }

    /// Applies the schema inside the open transaction; returns tables whose pre-existing rows
    /// need clocks.
    pub(super) fn migrate(
        &mut self,
        desired: &BTreeMap<String, TableDef>,
    ) -> Result<Vec<String>, StoreError> {
        let mut backfill = Vec::new();
        for (name, def) in desired {
            let existing_sql: Option<String> = self
                .writer
                .query_row(
                    "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = ?1",
                    [name],
                    |r| r.get(0),
                )
                .optional()?;
            let registered = self.tables.contains_key(name);
            let table_ord = match &existing_sql {
                Some(sql) => {
                    let existing = schema::introspect_table(&self.writer, name, sql)?;
                    let plan = schema::migration(&existing, def)?;
                    for (_, alter) in &plan.add_columns {
                        self.writer.execute_batch(alter)?;
                    }
                    for index in &plan.add_indexes {
                        self.writer.execute_batch(index)?;
                    }
                    let table_ord = self.register_table(name)?;
                    if !registered {
                        // Owed until the clocks commit: on disk, so that a backfill that
                        // fails or is cut off is made later (a minute later, or at an open).
                        self.writer.execute(
                            "INSERT OR IGNORE INTO __patina_backfill (tbl) VALUES (?1)",
                            [table_ord],
                        )?;
                        backfill.push(name.clone());
                    }
                    table_ord
                }
                None => {
                    self.writer.execute_batch(&def.sql)?;
                    for index in def.indexes.values() {
                        self.writer.execute_batch(index)?;
                    }
                    self.register_table(name)?
                }
            };
            // Column ordinals are assigned once and never reused, in declaration order.
            for col in def.columns.iter().filter(|c| c.pk_position == 0) {
                let known: Option<i64> = self
                    .writer
                    .query_row(
                        "SELECT ord FROM __patina_columns WHERE tbl = ?1 AND name = ?2",
                        params![table_ord, col.name],
                        |r| r.get(0),
                    )
                    .optional()?;
                if known.is_none() {
                    self.writer.execute(
                        "INSERT INTO __patina_columns (tbl, ord, name)
                         SELECT ?1, coalesce(max(ord) + 1, 0), ?2 FROM __patina_columns WHERE tbl = ?1",
                        params![table_ord, col.name],
                    )?;
                }
            }
        }
        Ok(backfill)
    }

    pub(super) fn register_table(&mut self, name: &str) -> Result<u32, StoreError> {
        self.writer.execute(
            "INSERT OR IGNORE INTO __patina_tables (name) VALUES (?1)",
            [name],
        )?;
        Ok(self.writer.query_row(
            "SELECT ord FROM __patina_tables WHERE name = ?1",
            [name],
            |r| r.get(0),
        )?)
    }

    /// Tells the capture hook which tables are replicated, by name (the name SQLite reports).
    pub(super) fn install_capture(&mut self) {
        self.capture.lock().tables = self
            .tables
            .iter()
            .map(|(name, table)| (name.clone(), (table.ord, table.pk.clone().into())))
            .collect();
    }

    /// Gives clocks to rows that existed before their table became replicated, as one local
    /// transaction of this replica, which also deletes the tables' marks that they are owed.
    pub(super) fn backfill(&mut self, tables: &[String]) -> Result<(), StoreError> {
        self.local_transaction(|store| {
            // An internal table, which user mode refuses; the capture hook ignores its rows.
            store.capture.lock().user_mode = false;
            let marks_deleted = tables.iter().try_for_each(|name| {
                store
                    .writer
                    .execute(
                        "DELETE FROM __patina_backfill WHERE tbl = ?1",
                        [store.tables[name].ord],
                    )
                    .map(drop)
            });
            store.capture.lock().user_mode = true;
            marks_deleted?;
            let mut writes = Vec::new();
            // What the rows' values take at least once encoded: a table far over the cap
            // stops here, not after its every row was read and given a clock.
            let (mut held, held_max) = (0usize, store.capture_bytes_max());
            for name in tables {
                let table = &store.tables[name];
                let mut stmt = store
                    .writer
                    .prepare(&format!("SELECT * FROM main.{}", quote_ident(name)))?;
                let ncols = table.def.columns.len();
                let mut rows = stmt.query([])?;
                while let Some(row) = rows.next()? {
                    let new = (0..ncols)
                        .map(|i| row.get_ref(i).map(capture::to_value))
                        .collect::<Result<Vec<_>, _>>()?;
                    held += new.iter().map(value_bytes_at_least).sum::<usize>();
                    if held > held_max {
                        return Err(StoreError::WritesTooLarge { limit: held_max });
                    }
                    writes.push(capture::CapturedWrite {
                        table_ord: table.ord,
                        write: RowWrite::Insert { new },
                    });
                }
            }
            store.capture.lock().writes = writes;
            Ok(Vec::new())
        })
        .map(|_| ())
    }
}

/// The fewest bytes a value takes in a changeset: its text or blob, one byte else.
fn value_bytes_at_least(value: &patina_core::Value) -> usize {
    match value {
        patina_core::Value::Text(s) => s.len(),
        patina_core::Value::Blob(b) => b.len(),
        _ => 1,
    }
}
