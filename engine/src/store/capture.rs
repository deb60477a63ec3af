//! Change capture: every write to a replicated table, seen from inside the writing transaction.
//!
//! SQLite's pre-update hook on the writer connection reports each row an INSERT, UPDATE or
//! DELETE is about to change, with the row before and after. While user statements run, the hook
//! appends the writes to replicated tables to an in-memory buffer (an insert's new row, a
//! delete's old one, an update's new row with the old values of the columns it changed); the store turns the buffer into
//! clock rows before COMMIT, so user data and clocks commit or roll back together (a statement
//! that fails rolls the whole transaction back, so a write reported before its failure is never
//! recorded). The hook also reports the rows REPLACE deletes to make room, as the deletes they
//! are. Nothing is added to the database file: other SQLite clients see plain tables.
//!
//! The hook replaced per-table TEMP triggers calling a Rust function: those ran a trigger program
//! for every row written, remote merges included, and made SQLite keep a statement journal for
//! every user statement (docs/BENCHMARKS.md, issue 21).
//!
//! The authorizer keeps user statements away from what would break that contract: schema
//! changes, transaction control, pragmas, and writes to internal tables.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use patina_core::value::Value;
use rusqlite::hooks::{
    AuthAction, AuthContext, Authorization, PreUpdateCase, PreUpdateNewValueAccessor,
    PreUpdateOldValueAccessor,
};
use rusqlite::types::ValueRef;
use rusqlite::Connection;

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
        /// The row after.
        new: Vec<Value>,
        /// The columns the update changed, in column order, each with its value before; a
        /// column not listed kept its value. (Only these: reading and keeping every old value
        /// cost an allocation a row and one more per text or blob, to be compared and dropped.)
        old_changed: Vec<(usize, Value)>,
    },
    /// A row was deleted.
    Delete {
        /// The row before: its key columns, the others null.
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
    /// Replicated tables by name, with their local ordinals and key columns: the tables user statements may
    /// write to, and whose writes are captured.
    pub tables: super::FastMap<String, (u32, Arc<[usize]>)>,
    /// A value SQLite could not hand over (out of memory, a corrupt record).
    pub error: Option<String>,
    /// About how many bytes the captured writes hold (see [`write_bytes`]).
    pub bytes_held: usize,
    /// Past this many, capture stops and `over` is set.
    pub bytes_max: usize,
    /// The captured writes grew past `bytes_max`: the rest of the transaction's writes were
    /// not captured, so it must not commit (see `Store::transact_until`).
    pub over: Arc<AtomicBool>,
    /// Stops the writer's running statement once `over` is set.
    pub interrupt: Option<WriterInterrupt>,
}

/// The writer's [`rusqlite::InterruptHandle`], which has no `Debug` of its own.
pub struct WriterInterrupt(rusqlite::InterruptHandle);

impl std::fmt::Debug for WriterInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriterInterrupt")
    }
}

/// Shared handle on [`CaptureState`].
#[derive(Debug, Clone, Default)]
pub struct Capture(Arc<Mutex<CaptureState>>);

impl Capture {
    /// Locks the state. A poisoned lock only means a panic elsewhere; the data is still whole.
    pub fn lock(&self) -> MutexGuard<'_, CaptureState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Installs the authorizer on the writer connection.
    pub fn install(&self, conn: &mut Connection) -> rusqlite::Result<()> {
        self.lock().interrupt = Some(WriterInterrupt(conn.get_interrupt_handle()));
        let state = self.clone();
        conn.authorizer(Some(move |ctx: AuthContext<'_>| {
            authorize(&state.lock(), &ctx)
        }))?;
        Ok(())
    }

    /// Starts capturing: user mode on, the buffer emptied, the pre-update hook installed;
    /// capture stops, and [`Capture::over`] turns true, once the captured writes hold over
    /// `bytes_max` bytes.
    ///
    /// The hook is there only while user statements run: the store's own writes (clock rows,
    /// the changes index, remote merges) would each pay a call for nothing, a third of a
    /// ten-row update's hook calls. User statements are therefore prepared with the hook in
    /// place, which matters to SQLite in one case: a DELETE without WHERE is compiled as one
    /// truncation, unseen by the hook, when no hook is installed. The authorizer also turns that
    /// optimization off for user statements (see [`authorize`]), so a statement the writer's
    /// cache compiled earlier cannot slip through either.
    pub fn start(&self, conn: &mut Connection, bytes_max: usize) -> rusqlite::Result<()> {
        let state = self.clone();
        // Installed first: if that fails, nothing below has changed (user mode stays off).
        conn.preupdate_hook(Some(
            move |_, db: &str, table: &str, case: &PreUpdateCase| {
                let mut st = state.lock();
                if db != "main" {
                    return;
                }
                if st.bytes_held > st.bytes_max {
                    // Over already: the statement was interrupted and stops at SQLite's next check.
                    return;
                }
                let Some((table_ord, key)) = st.tables.get(table) else {
                    // The authorizer lets user statements write replicated tables only.
                    return;
                };
                let table_ord = *table_ord;
                match row_write(case, key) {
                    Ok(write) => {
                        st.bytes_held += write_bytes(&write);
                        if st.bytes_held > st.bytes_max {
                            // Stopped where SQLite next checks, within this statement.
                            st.over.store(true, Ordering::Relaxed);
                            if let Some(WriterInterrupt(interrupt)) = &st.interrupt {
                                interrupt.interrupt();
                            }
                        }
                        st.writes.push(CapturedWrite { table_ord, write });
                    }
                    Err(e) => st.error = Some(format!("capturing a write to {table}: {e}")),
                }
            },
        ))?;
        let mut st = self.lock();
        st.user_mode = true;
        st.writes.clear();
        st.error = None;
        st.bytes_held = 0;
        st.bytes_max = bytes_max;
        st.over.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Turns true once the writes captured since [`Capture::start`] grew past its limit (the
    /// same flag for good: a store reads it through its own copy).
    pub fn over(&self) -> Arc<AtomicBool> {
        self.lock().over.clone()
    }

    /// Stops capturing: the hook removed, user mode off; what was captured and any error.
    pub fn stop(&self, conn: &mut Connection) -> (Vec<CapturedWrite>, Option<String>) {
        let removed = conn.preupdate_hook(None::<fn(_, &str, &str, &PreUpdateCase)>);
        let mut st = self.lock();
        st.user_mode = false;
        let mut error = st.error.take();
        if let Err(e) = removed {
            // Left in place it would capture the store's own writes into the next transaction.
            error.get_or_insert(format!("removing the capture hook: {e}"));
        }
        (std::mem::take(&mut st.writes), error)
    }

    /// Gives back the (drained) vector [`Capture::stop`] returned, so the next transaction's
    /// writes need no new one.
    pub fn recycle(&self, mut writes: Vec<CapturedWrite>) {
        writes.clear();
        let mut st = self.lock();
        if st.writes.is_empty() && st.writes.capacity() < writes.capacity() {
            st.writes = writes;
        }
    }
}

/// About the memory a captured write holds: its value slots, and the text and blobs they
/// own (a delete holds its key only).
fn write_bytes(write: &RowWrite) -> usize {
    let value = |v: &Value| {
        std::mem::size_of::<Value>()
            + match v {
                Value::Text(t) => t.len(),
                Value::Blob(b) => b.len(),
                _ => 0,
            }
    };
    std::mem::size_of::<CapturedWrite>()
        + match write {
            RowWrite::Insert { new } => new.iter().map(value).sum::<usize>(),
            RowWrite::Delete { old } => old.iter().map(value).sum(),
            RowWrite::Update { new, old_changed } => {
                new.iter().map(value).sum::<usize>()
                    + old_changed.iter().map(|(_, v)| value(v)).sum::<usize>()
            }
        }
}

/// Reads what the store needs of a change the hook reports, values in the table's column order:
/// of a deleted row only its key columns (`key`), the others left null, since a delete's
/// change carries the key alone (and copying a large row only to drop it cost memory the
/// capture's cap then had to count).
fn row_write(case: &PreUpdateCase, key: &[usize]) -> Result<RowWrite, String> {
    let read_old_key = |old: &PreUpdateOldValueAccessor| {
        let mut row = vec![Value::Null; old.get_column_count().max(0) as usize];
        for &i in key {
            if let Some(slot) = row.get_mut(i) {
                *slot = to_value(old.get_old_column_value(i as i32)?);
            }
        }
        Ok::<_, rusqlite::Error>(row)
    };
    let read_new = |new: &PreUpdateNewValueAccessor| {
        (0..new.get_column_count())
            .map(|i| new.get_new_column_value(i).map(to_value))
            .collect::<rusqlite::Result<Vec<_>>>()
    };
    let write = match case {
        PreUpdateCase::Insert(new) => read_new(new).map(|new| RowWrite::Insert { new }),
        PreUpdateCase::Delete(old) => read_old_key(old).map(|old| RowWrite::Delete { old }),
        PreUpdateCase::Update {
            old_value_accessor: old,
            new_value_accessor: new,
        } => read_new(new).and_then(|new| {
            let mut old_changed = Vec::new();
            for (i, value) in new.iter().enumerate() {
                let before = old.get_old_column_value(i as i32)?;
                if !same_value(before, value) {
                    old_changed.push((i, to_value(before)));
                }
            }
            Ok(RowWrite::Update { new, old_changed })
        }),
        PreUpdateCase::Unknown => return Err("a change of a kind the hook did not name".into()),
    };
    write.map_err(|e| e.to_string())
}

fn authorize(state: &CaptureState, ctx: &AuthContext<'_>) -> Authorization {
    if !state.user_mode {
        return Authorization::Allow;
    }
    // Schemas hold tables and indexes only (no triggers or views run SQL of their own): a write
    // must target a replicated table.
    let writable = |table: &str| state.tables.contains_key(table);
    match ctx.action {
        AuthAction::Select | AuthAction::Read { .. } | AuthAction::Function { .. } => {
            Authorization::Allow
        }
        AuthAction::Recursive => Authorization::Allow,
        // SQLite's documented meaning of IGNORE for a DELETE: it proceeds, row by row, never
        // as the truncation the pre-update hook would not see (see [`Capture::start`]).
        AuthAction::Delete { table_name } if writable(table_name) => Authorization::Ignore,
        AuthAction::Insert { table_name } | AuthAction::Update { table_name, .. } => {
            if writable(table_name) {
                Authorization::Allow
            } else {
                Authorization::Deny
            }
        }
        AuthAction::Delete { .. } => Authorization::Deny,
        // Schema changes, pragmas, ATTACH, transaction control: the store owns those.
        _ => Authorization::Deny,
    }
}

/// Whether `to_value(old) == *new`, without building the value.
fn same_value(old: ValueRef<'_>, new: &Value) -> bool {
    match (old, new) {
        (ValueRef::Null, Value::Null) => true,
        (ValueRef::Integer(a), Value::Integer(b)) => a == *b,
        (ValueRef::Real(a), Value::Real(b)) => a.total_cmp(b).is_eq(),
        (ValueRef::Text(t), Value::Text(s)) => t == s.as_bytes(),
        // Text that is not UTF-8 is kept as a blob (see `to_value`).
        (ValueRef::Text(t), Value::Blob(b)) => t == &b[..] && std::str::from_utf8(t).is_err(),
        (ValueRef::Blob(a), Value::Blob(b)) => a == &b[..],
        _ => false,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An update keeps only the old values `same_value` says changed: it must agree with
    /// comparing the converted value, or a changed cell would go unreplicated (or an unchanged
    /// one be sent again).
    #[test]
    fn same_value_agrees_with_comparing_converted_values() {
        let not_utf8: &[u8] = &[0xff, 0xfe];
        let olds = [
            ValueRef::Null,
            ValueRef::Integer(1),
            ValueRef::Integer(-1),
            ValueRef::Real(1.0),
            ValueRef::Real(0.0),
            ValueRef::Real(-0.0),
            ValueRef::Real(f64::NAN),
            ValueRef::Text(b"a"),
            ValueRef::Text(b""),
            ValueRef::Text(not_utf8),
            ValueRef::Blob(b"a"),
            ValueRef::Blob(not_utf8),
            ValueRef::Blob(b""),
        ];
        let news: Vec<Value> = olds.iter().map(|v| to_value(*v)).collect();
        for old in olds {
            for new in &news {
                assert_eq!(
                    same_value(old, new),
                    to_value(old) == *new,
                    "{old:?} against {new:?}"
                );
            }
        }
    }
}
