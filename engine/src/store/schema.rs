//! Schema files: reading them, checking the rules a replicated table must follow, and working
//! out the additive changes that bring a database up to them.
//!
//! The SQL is run in a scratch in-memory SQLite first and the result is read back with pragmas,
//! so SQLite itself parses the schema: no SQL parser of our own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::error::SchemaError;

/// One column as SQLite reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnDef {
    /// Name.
    pub name: String,
    /// Declared type, as written (may be empty).
    pub decl_type: String,
    /// NOT NULL.
    pub not_null: bool,
    /// The DEFAULT expression, as written.
    pub default: Option<String>,
    /// 1-based position in the primary key, 0 if not part of it.
    pub pk_position: usize,
}

/// One table as SQLite reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDef {
    /// Name.
    pub name: String,
    /// The CREATE TABLE statement.
    pub sql: String,
    /// Columns in declaration order.
    pub columns: Vec<ColumnDef>,
    /// STRICT table.
    pub strict: bool,
    /// Declared indexes (name, CREATE INDEX statement); automatic ones are left out.
    pub indexes: BTreeMap<String, String>,
}

impl TableDef {
    /// Indexes into `columns` of the primary-key columns, in key order.
    pub fn pk_columns(&self) -> Vec<usize> {
        let mut pk: Vec<usize> = (0..self.columns.len())
            .filter(|&i| self.columns[i].pk_position > 0)
            .collect();
        pk.sort_by_key(|&i| self.columns[i].pk_position);
        pk
    }
}

/// Reads every schema file: a path is a `.sql` file or a folder whose `.sql` files are read in
/// name order.
pub fn read_schema_files(paths: &[PathBuf]) -> Result<Vec<(PathBuf, String)>, SchemaError> {
    let read_err = |path: &Path, source| SchemaError::Read {
        path: path.display().to_string(),
        source,
    };
    let mut out = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| read_err(path, e))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|ext| ext == "sql"))
                .collect();
            files.sort();
            for file in files {
                let sql = std::fs::read_to_string(&file).map_err(|e| read_err(&file, e))?;
                out.push((file, sql));
            }
        } else {
            let sql = std::fs::read_to_string(path).map_err(|e| read_err(path, e))?;
            out.push((path.clone(), sql));
        }
    }
    Ok(out)
}

/// Runs schema SQL in a scratch database, checks every rule, and returns the tables it defines.
pub fn parse_schema(sql: &str) -> Result<BTreeMap<String, TableDef>, SchemaError> {
    let scratch = Connection::open_in_memory().map_err(|e| SchemaError::Sql(e.to_string()))?;
    scratch
        .execute_batch(sql)
        .map_err(|e| SchemaError::Sql(e.to_string()))?;
    let objects: Vec<(String, String, Option<String>)> = query_strings(
        &scratch,
        "SELECT type, name, sql FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%' ORDER BY rowid",
    )?;
    let mut tables = BTreeMap::new();
    for (kind, name, sql) in &objects {
        match kind.as_str() {
            "table" => {
                let sql = sql.clone().unwrap_or_default();
                let table = introspect_table(&scratch, name, &sql)?;
                check_rules(&scratch, &table)?;
                tables.insert(name.clone(), table);
            }
            "index" => {}
            other => {
                return Err(SchemaError::Unsupported {
                    kind: other.to_owned(),
                    name: name.clone(),
                })
            }
        }
    }
    Ok(tables)
}

fn query_strings(
    conn: &Connection,
    sql: &str,
) -> Result<Vec<(String, String, Option<String>)>, SchemaError> {
    let sql_err = |e: rusqlite::Error| SchemaError::Sql(e.to_string());
    let mut stmt = conn.prepare(sql).map_err(sql_err)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .map_err(sql_err)?;
    rows.collect::<Result<_, _>>().map_err(sql_err)
}

/// Reads a table's definition back from a database.
pub fn introspect_table(conn: &Connection, name: &str, sql: &str) -> Result<TableDef, SchemaError> {
    let sql_err = |e: rusqlite::Error| SchemaError::Sql(format!("table {name}: {e}"));
    let mut columns = Vec::new();
    let mut stmt = conn
        .prepare(
            "SELECT name, type, \"notnull\", dflt_value, pk, hidden FROM pragma_table_xinfo(?1)",
        )
        .map_err(sql_err)?;
    let mut rows = stmt.query([name]).map_err(sql_err)?;
    while let Some(row) = rows.next().map_err(sql_err)? {
        let hidden: i64 = row.get(5).map_err(sql_err)?;
        let col_name: String = row.get(0).map_err(sql_err)?;
        if hidden != 0 {
            return Err(SchemaError::Rule {
                table: name.to_owned(),
                rule: format!(
                    "column {col_name} is generated or hidden; replicated tables store every column"
                ),
            });
        }
        columns.push(ColumnDef {
            name: col_name,
            decl_type: row.get(1).map_err(sql_err)?,
            not_null: row.get::<_, i64>(2).map_err(sql_err)? != 0,
            default: row.get(3).map_err(sql_err)?,
            pk_position: row.get::<_, i64>(4).map_err(sql_err)? as usize,
        });
    }
    let strict: bool = conn
        .query_row(
            "SELECT strict FROM pragma_table_list WHERE schema = 'main' AND name = ?1",
            [name],
            |r| r.get::<_, i64>(0),
        )
        .map_err(sql_err)?
        != 0;
    let mut indexes = BTreeMap::new();
    let mut stmt = conn
        .prepare(
            "SELECT name, sql FROM sqlite_schema WHERE type = 'index' AND tbl_name = ?1 AND sql IS NOT NULL",
        )
        .map_err(sql_err)?;
    let mut rows = stmt.query([name]).map_err(sql_err)?;
    while let Some(row) = rows.next().map_err(sql_err)? {
        indexes.insert(row.get(0).map_err(sql_err)?, row.get(1).map_err(sql_err)?);
    }
    Ok(TableDef {
        name: name.to_owned(),
        sql: sql.to_owned(),
        columns,
        strict,
        indexes,
    })
}

/// The rules of crdt-spec.md: what a table must be so concurrent merges can converge.
fn check_rules(conn: &Connection, table: &TableDef) -> Result<(), SchemaError> {
    let broken = |rule: &str| SchemaError::Rule {
        table: table.name.clone(),
        rule: rule.to_owned(),
    };
    let sql_err = |e: rusqlite::Error| SchemaError::Sql(format!("table {}: {e}", table.name));
    if table.name.starts_with("__patina") {
        return Err(broken("names starting with __patina are reserved"));
    }
    let pk = table.pk_columns();
    if pk.is_empty() {
        return Err(broken(
            "no PRIMARY KEY: a replicated table needs a primary key to identify rows on every node",
        ));
    }
    let without_rowid: bool = conn
        .query_row(
            "SELECT wr FROM pragma_table_list WHERE schema = 'main' AND name = ?1",
            [&table.name],
            |r| r.get::<_, i64>(0),
        )
        .map_err(sql_err)?
        != 0;
    let rowid_alias = pk.len() == 1
        && !without_rowid
        && table.columns[pk[0]]
            .decl_type
            .eq_ignore_ascii_case("INTEGER");
    for &i in &pk {
        let col = &table.columns[i];
        if !col.not_null && !without_rowid && !rowid_alias {
            return Err(broken(&format!(
                "primary key column {} must be NOT NULL (NULL keys never compare equal)",
                col.name
            )));
        }
    }
    if table.sql.to_ascii_uppercase().contains("AUTOINCREMENT") {
        return Err(broken(
            "AUTOINCREMENT is not allowed: nodes would hand out the same ids to different rows",
        ));
    }
    let mut stmt = conn
        .prepare("SELECT name, \"unique\", origin FROM pragma_index_list(?1)")
        .map_err(sql_err)?;
    let indexes: Vec<(String, bool, String)> = stmt
        .query_map([&table.name], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? != 0, r.get(2)?))
        })
        .map_err(sql_err)?
        .collect::<Result<_, _>>()
        .map_err(sql_err)?;
    if let Some((name, _, _)) = indexes
        .iter()
        .find(|(_, unique, origin)| *unique && origin != "pk")
    {
        return Err(broken(&format!(
            "UNIQUE constraint or index {name} besides the primary key: two nodes can insert \
             different rows with the same value and the merge could never converge"
        )));
    }
    let foreign_keys: i64 = conn
        .query_row(
            "SELECT count(*) FROM pragma_foreign_key_list(?1)",
            [&table.name],
            |r| r.get(0),
        )
        .map_err(sql_err)?;
    if foreign_keys > 0 {
        return Err(broken(
            "REFERENCES (foreign keys) are not allowed: cells merge in any order, a child may arrive before its parent",
        ));
    }
    for col in &table.columns {
        if col.pk_position == 0 && col.not_null && col.default.is_none() {
            return Err(broken(&format!(
                "NOT NULL column {} needs a DEFAULT: a row must be creatable from a single cell change",
                col.name
            )));
        }
    }
    Ok(())
}

/// The steps that bring one existing table up to its new definition.
#[derive(Debug, Default)]
pub struct TableMigration {
    /// ALTER TABLE ... ADD COLUMN statements.
    pub add_columns: Vec<(ColumnDef, String)>,
    /// CREATE INDEX statements.
    pub add_indexes: Vec<String>,
}

/// Compares an existing table with its desired definition; only additions are allowed.
pub fn migration(existing: &TableDef, desired: &TableDef) -> Result<TableMigration, SchemaError> {
    let not_additive = |detail: String| SchemaError::NotAdditive {
        table: desired.name.clone(),
        detail,
    };
    let mut plan = TableMigration::default();
    for (i, old) in existing.columns.iter().enumerate() {
        match desired.columns.get(i) {
            Some(new) if new == old => {}
            Some(new) if new.name == old.name => {
                return Err(not_additive(format!(
                    "column {} changed definition",
                    old.name
                )))
            }
            _ => {
                return Err(not_additive(format!(
                    "column {} was removed, renamed or moved",
                    old.name
                )))
            }
        }
    }
    if existing.strict != desired.strict {
        return Err(not_additive("STRICT changed".into()));
    }
    for new in &desired.columns[existing.columns.len()..] {
        if new.pk_position > 0 {
            return Err(not_additive(format!(
                "new column {} is part of the primary key",
                new.name
            )));
        }
        let mut sql = format!(
            "ALTER TABLE {} ADD COLUMN {} {}",
            quote_ident(&desired.name),
            quote_ident(&new.name),
            new.decl_type
        );
        if new.not_null {
            sql.push_str(" NOT NULL");
        }
        if let Some(default) = &new.default {
            sql.push_str(&format!(" DEFAULT {default}"));
        }
        plan.add_columns.push((new.clone(), sql));
    }
    for (name, sql) in &desired.indexes {
        match existing.indexes.get(name) {
            None => plan.add_indexes.push(sql.clone()),
            Some(old) if old == sql => {}
            Some(_) => return Err(not_additive(format!("index {name} changed definition"))),
        }
    }
    Ok(plan)
}

/// Quotes an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// SQLite's column affinity, from the declared type (section 3.1 of SQLite's datatype doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// INTEGER.
    Integer,
    /// TEXT.
    Text,
    /// BLOB (no conversion), and STRICT's ANY.
    Blob,
    /// REAL.
    Real,
    /// NUMERIC.
    Numeric,
}

impl Affinity {
    /// Affinity of a declared type.
    pub fn of(decl_type: &str, strict: bool) -> Affinity {
        let t = decl_type.to_ascii_uppercase();
        if strict && t == "ANY" {
            Affinity::Blob
        } else if t.contains("INT") {
            Affinity::Integer
        } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
            Affinity::Text
        } else if t.contains("BLOB") || t.is_empty() {
            Affinity::Blob
        } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
            Affinity::Real
        } else {
            Affinity::Numeric
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule_error(sql: &str) -> String {
        match parse_schema(sql) {
            Err(SchemaError::Rule { table, rule }) => format!("{table}: {rule}"),
            other => panic!("expected a rule error for {sql}, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_good_table() {
        let tables = parse_schema(
            "CREATE TABLE hosts (id INTEGER PRIMARY KEY, name TEXT NOT NULL DEFAULT '', cpu REAL);
             CREATE INDEX hosts_name ON hosts (name);
             CREATE TABLE kv (k TEXT NOT NULL, n INTEGER NOT NULL, v BLOB, PRIMARY KEY (k, n)) WITHOUT ROWID;",
        )
        .unwrap();
        assert_eq!(tables["hosts"].columns.len(), 3);
        assert_eq!(tables["hosts"].indexes.len(), 1);
        assert_eq!(tables["kv"].pk_columns(), vec![0, 1]);
    }

    #[test]
    fn each_rule_names_table_and_rule() {
        assert!(rule_error("CREATE TABLE t (a TEXT)").contains("t: no PRIMARY KEY"));
        assert!(rule_error("CREATE TABLE t (a TEXT PRIMARY KEY)").contains("must be NOT NULL"));
        assert!(
            rule_error("CREATE TABLE t (id INTEGER PRIMARY KEY, e TEXT UNIQUE)").contains("UNIQUE")
        );
        assert!(rule_error(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, e TEXT); CREATE UNIQUE INDEX te ON t (e);"
        )
        .contains("UNIQUE"));
        assert!(
            rule_error("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT)")
                .contains("AUTOINCREMENT")
        );
        assert!(rule_error(
            "CREATE TABLE p (id INTEGER PRIMARY KEY); CREATE TABLE c (id INTEGER PRIMARY KEY, p INTEGER REFERENCES p(id));"
        )
        .contains("c: REFERENCES"));
        assert!(
            rule_error("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
                .contains("needs a DEFAULT")
        );
        assert!(
            rule_error("CREATE TABLE __patina_x (id INTEGER PRIMARY KEY)").contains("reserved")
        );
        assert!(rule_error(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, a INT, b INT GENERATED ALWAYS AS (a + 1))"
        )
        .contains("generated"));
    }

    #[test]
    fn refuses_views_and_bad_sql() {
        assert!(matches!(
            parse_schema(
                "CREATE TABLE t (id INTEGER PRIMARY KEY); CREATE VIEW v AS SELECT * FROM t;"
            ),
            Err(SchemaError::Unsupported { .. })
        ));
        assert!(matches!(
            parse_schema("CREATE TABLEX t"),
            Err(SchemaError::Sql(_))
        ));
    }

    #[test]
    fn migrations_are_additive_only() {
        let v1 = parse_schema("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT)").unwrap();
        let v2 = parse_schema(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b INTEGER NOT NULL DEFAULT 7); CREATE INDEX ta ON t (a);",
        )
        .unwrap();
        let plan = migration(&v1["t"], &v2["t"]).unwrap();
        assert_eq!(plan.add_columns.len(), 1);
        assert!(plan.add_columns[0].1.ends_with("NOT NULL DEFAULT 7"));
        assert_eq!(plan.add_indexes.len(), 1);
        let dropped = parse_schema("CREATE TABLE t (id INTEGER PRIMARY KEY)").unwrap();
        assert!(matches!(
            migration(&v1["t"], &dropped["t"]),
            Err(SchemaError::NotAdditive { .. })
        ));
        let retyped = parse_schema("CREATE TABLE t (id INTEGER PRIMARY KEY, a BLOB)").unwrap();
        assert!(matches!(
            migration(&v1["t"], &retyped["t"]),
            Err(SchemaError::NotAdditive { .. })
        ));
    }

    #[test]
    fn affinity_rules() {
        assert_eq!(Affinity::of("BIGINT", false), Affinity::Integer);
        assert_eq!(Affinity::of("VARCHAR(10)", false), Affinity::Text);
        assert_eq!(Affinity::of("", false), Affinity::Blob);
        assert_eq!(Affinity::of("DOUBLE", false), Affinity::Real);
        assert_eq!(Affinity::of("DECIMAL", false), Affinity::Numeric);
        assert_eq!(Affinity::of("ANY", true), Affinity::Blob);
    }
}
