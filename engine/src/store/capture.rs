//! Change capture: every write to a replicated table, seen from inside the writing transaction.
//!
//! For each replicated table the writer connection has three TEMP triggers (insert, update,
//! delete) that call the Rust function `patina_capture` with the old and new row. The function
//! appends the write to an in-memory buffer; the store turns the buffer into clock rows before
//! COMMIT, so user data and clocks commit or roll back together. TEMP triggers live only on the
//! writer connection: the database file keeps no trigger that other SQLite clients would trip on.
//!
//! The authorizer keeps user statements away from what would break that contract: schema
//! changes, transaction control, pragmas, writes to internal tables, and direct calls of
//! `patina_capture`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use patina_core::value::Value;
use rusqlite::functions::FunctionFlags;
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::types::ValueRef;
use rusqlite::Connection;

use super::schema::quote_ident;

/// Name of the capture function the triggers call.
pub const CAPTURE_FUNCTION: &str = "patina_capture";

/// One captured row write; values are in the table's column order.
#[derive(Debug, Clone)]
pub enum RowWrite {
    /// A row was inserted.
    Insert {
        /// The new row.
        new: Vec<Value>,
    },
    /// A row was updated (possibly its primary key).
    Update {
        /// The row before.
        old: Vec<Value>,
        /// The row after.
        new: Vec<Value>,
    },
    /// A row was deleted.
    Delete {
        /// The row before.
        old: Vec<Value>,
    },
}

/// A captured write and the table it hit.
#[derive(Debug, Clone)]
pub struct CapturedWrite {
    /// Local ordinal of the table.
    pub table_ord: u32,
    /// What happened.
    pub write: RowWrite,
}

/// State shared between the store and the callbacks it installs on the writer connection.
#[derive(Debug, Default)]
pub struct CaptureState {
    /// True while user statements run: writes are captured and the authorizer is strict.
    pub user_mode: bool,
    /// Writes captured since the last take.
    pub writes: Vec<CapturedWrite>,
    /// Tables user statements may write to.
    pub writable_tables: HashSet<String>,
    /// A malformed call of the capture function (a bug, never user input).
    pub error: Option<String>,
}

/// Shared handle on [`CaptureState`].
#[derive(Debug, Clone, Default)]
pub struct Capture(Arc<Mutex<CaptureState>>);

impl Capture {
    /// Locks the state. A poisoned lock only means a panic elsewhere; the data is still whole.
    pub fn lock(&self) -> MutexGuard<'_, CaptureState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Installs the capture function and the authorizer on the writer connection.
    pub fn install(&self, conn: &mut Connection) -> rusqlite::Result<()> {
        let state = self.clone();
        conn.create_scalar_function(
            CAPTURE_FUNCTION,
            -1,
            FunctionFlags::SQLITE_UTF8,
            move |ctx| {
                let mut st = state.lock();
                if !st.user_mode {
                    // Remote changes applied by the store are not local writes.
                    return Ok(0i64);
                }
                let parsed = (|| {
                    let table_ord = match ctx.get_raw(0) {
                        ValueRef::Integer(i) => u32::try_from(i).ok()?,
                        _ => return None,
                    };
                    let op = match ctx.get_raw(1) {
                        ValueRef::Integer(i) => i,
                        _ => return None,
                    };
                    let values: Vec<Value> =
                        (2..ctx.len()).map(|i| to_value(ctx.get_raw(i))).collect();
                    let write = match op {
                        1 => RowWrite::Insert { new: values },
                        2 => RowWrite::Delete { old: values },
                        3 if values.len().is_multiple_of(2) => {
                            let mut old = values;
                            let new = old.split_off(old.len() / 2);
                            RowWrite::Update { old, new }
                        }
                        _ => return None,
                    };
                    Some(CapturedWrite { table_ord, write })
                })();
                match parsed {
                    Some(w) => st.writes.push(w),
                    None => st.error = Some("malformed capture call".into()),
                }
                Ok(0i64)
            },
        )?;
        let state = self.clone();
        conn.authorizer(Some(move |ctx: AuthContext<'_>| {
            authorize(&state.lock(), &ctx)
        }))?;
        Ok(())
    }
}

fn authorize(state: &CaptureState, ctx: &AuthContext<'_>) -> Authorization {
    if let AuthAction::Function { function_name } = ctx.action {
        // Only our triggers may call the capture function, never top-level SQL.
        if function_name.eq_ignore_ascii_case(CAPTURE_FUNCTION) && ctx.accessor.is_none() {
            return Authorization::Deny;
        }
    }
    if !state.user_mode {
        return Authorization::Allow;
    }
    let writable = |table: &str| {
        // Trigger bodies write nothing; user writes must target a replicated table.
        ctx.accessor.is_some() || state.writable_tables.contains(table)
    };
    match ctx.action {
        AuthAction::Select | AuthAction::Read { .. } | AuthAction::Function { .. } => {
            Authorization::Allow
        }
        AuthAction::Recursive => Authorization::Allow,
        AuthAction::Insert { table_name }
        | AuthAction::Delete { table_name }
        | AuthAction::Update { table_name, .. } => {
            if writable(table_name) {
                Authorization::Allow
            } else {
                Authorization::Deny
            }
        }
        // Schema changes, pragmas, ATTACH, transaction control: the store owns those.
        _ => Authorization::Deny,
    }
}

/// Converts a borrowed SQLite value. Invalid UTF-8 in TEXT is kept as a BLOB rather than lost.
pub fn to_value(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(r) => Value::Real(r),
        ValueRef::Text(t) => match std::str::from_utf8(t) {
            Ok(s) => Value::Text(s.to_owned()),
            Err(_) => Value::Blob(t.to_vec()),
        },
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

/// The TEMP triggers that capture writes to one table.
pub fn trigger_sql(table: &str, table_ord: u32, columns: &[String]) -> String {
    let cols = |prefix: &str| {
        columns
            .iter()
            .map(|c| format!("{prefix}.{}", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let t = quote_ident(table);
    format!(
        "DROP TRIGGER IF EXISTS temp.__patina_ins_{table_ord};
         DROP TRIGGER IF EXISTS temp.__patina_upd_{table_ord};
         DROP TRIGGER IF EXISTS temp.__patina_del_{table_ord};
         CREATE TEMP TRIGGER __patina_ins_{table_ord} AFTER INSERT ON main.{t}
           BEGIN SELECT {CAPTURE_FUNCTION}({table_ord}, 1, {new}); END;
         CREATE TEMP TRIGGER __patina_upd_{table_ord} AFTER UPDATE ON main.{t}
           BEGIN SELECT {CAPTURE_FUNCTION}({table_ord}, 3, {old}, {new}); END;
         CREATE TEMP TRIGGER __patina_del_{table_ord} AFTER DELETE ON main.{t}
           BEGIN SELECT {CAPTURE_FUNCTION}({table_ord}, 2, {old}); END;",
        new = cols("NEW"),
        old = cols("OLD"),
    )
}
