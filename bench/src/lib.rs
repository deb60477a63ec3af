//! Benchmarks live in benches/; the timers and counters in src/bin. What both use to write to
//! a store and to a plain SQLite table is here.

pub mod store_fixture {
    //! The `items` table a store bench writes, on the store or on plain SQLite beside it (WAL,
    //! `synchronous = NORMAL`, like the store).

    use patina::store::{Store, StoreConfig};
    use patina_core::value::Value;

    /// The replicated table of the store benches.
    pub const SCHEMA: &str =
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER NOT NULL DEFAULT 0, price REAL);";

    /// One row's insert.
    pub const INSERT: &str = "INSERT INTO items (id, name, qty, price) VALUES (?1, ?2, ?3, ?4)";

    /// Row `id`: a text, an integer and a real beside the key.
    pub fn row(id: i64) -> Vec<Value> {
        vec![
            id.into(),
            format!("item-{id}").into(),
            (id % 100).into(),
            (id as f64 * 0.25).into(),
        ]
    }

    /// A store named `name` in `dir`, with [`SCHEMA`] and no limits.
    pub fn open_store(dir: &tempfile::TempDir, name: &str) -> Store {
        let schema = dir.path().join("schema.sql");
        std::fs::write(&schema, SCHEMA).expect("write the schema");
        Store::open(&StoreConfig {
            path: dir.path().join(name),
            schema_paths: vec![schema],
            max_db_bytes: None,
            changeset_bytes_max: None,
            parts_bytes_max: None,
        })
        .expect("open the store")
    }

    /// Plain SQLite in `dir` with the same table.
    pub fn open_plain(dir: &tempfile::TempDir) -> rusqlite::Connection {
        let conn =
            rusqlite::Connection::open(dir.path().join("plain.db")).expect("open plain SQLite");
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
            .expect("pragmas");
        conn.execute_batch(SCHEMA).expect("schema");
        conn
    }

    /// A value as rusqlite binds it.
    pub fn to_sql(v: &Value) -> rusqlite::types::Value {
        match v {
            Value::Null => rusqlite::types::Value::Null,
            Value::Integer(i) => rusqlite::types::Value::Integer(*i),
            Value::Real(r) => rusqlite::types::Value::Real(*r),
            Value::Text(s) => rusqlite::types::Value::Text(s.clone()),
            Value::Blob(b) => rusqlite::types::Value::Blob(b.clone()),
        }
    }
}
