//! Online backup and offline restore of a node's database.
//!
//! A backup is `VACUUM INTO` on a read-only connection of its own: one read transaction, so a
//! consistent snapshot of rows, clocks and bookkeeping, taken while the writer goes on (WAL
//! mode). It is written beside its destination and renamed into place once synced, so a
//! crash never leaves a half backup under the final name.
//!
//! A restore installs a backup as a stopped node's database. By default the node gets a
//! **new** site id: a copy of a node's database made to run beside the node it came from (a
//! new host, a clone) must not write under the same identity, which the CRDT could not tell
//! apart. The restored rows keep their clocks and origins: the old identity becomes an
//! ordinary remote site of the restored database, with all its versions applied, so what the
//! database says about whose writes it holds stays true.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use patina_core::ids::SiteId;
use patina_core::versions::RangeSet;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::clock::{self, SiteTable};
use super::error::StoreError;

/// What a backup wrote.
#[derive(Debug, Clone)]
pub struct BackupReport {
    /// The backup file.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// The site id of the node it was taken from.
    pub site: SiteId,
    /// How long it took.
    pub elapsed: Duration,
}

/// What a restore installed.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The site id the backup was taken under.
    pub backup_site: SiteId,
    /// The site id the restored node runs under (the same only when asked to keep it).
    pub site: SiteId,
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

fn own_site(conn: &Connection) -> Result<SiteId, StoreError> {
    let id: Option<Vec<u8>> = conn
        .query_row(
            "SELECT site_id FROM __patina_sites WHERE ord = 0",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(|_| StoreError::Corrupt("not a Patina database (no __patina_sites)".into()))?;
    let id = id.ok_or_else(|| StoreError::Corrupt("not a Patina database (no site)".into()))?;
    SiteId::from_slice(&id).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Writes a consistent snapshot of the database at `db` to `to`, which must not exist, within
/// `time_max`: a copy still running then is stopped, its partial file removed
/// ([`StoreError::DeadlinePassed`]). Why a deadline: the copy's read snapshot keeps the WAL
/// from being reset behind it, so a copy that went on (a database far larger than expected,
/// a slow destination) would let the WAL grow until `db.max_db_bytes` refused every write.
/// SQLite checks the deadline between the steps of its copy; one write or sync that never
/// returns (a hung disk) is not interrupted.
pub fn backup(db: &Path, to: &Path, time_max: Duration) -> Result<BackupReport, StoreError> {
    let started = Instant::now();
    if to.exists() {
        return Err(StoreError::Backup(format!(
            "{} exists; a backup never overwrites a file",
            to.display()
        )));
    }
    // A name of its own, so two backups to one destination never write one file.
    static BACKUPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let partial = with_suffix(
        to,
        &format!(
            ".partial-{}-{}",
            std::process::id(),
            BACKUPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ),
    );
    let mut conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.execute_batch("PRAGMA busy_timeout = 5000;")?;
    let target = partial
        .to_str()
        .ok_or_else(|| StoreError::Backup("the backup path is not UTF-8".into()))?;
    let deadline = started + time_max;
    let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stops = stopped.clone();
    // Checked every thousand of SQLite's steps: far more often than a millisecond.
    conn.progress_handler(
        1_000,
        Some(move || {
            let late = Instant::now() >= deadline;
            stops.fetch_or(late, std::sync::atomic::Ordering::Relaxed);
            late
        }),
    )?;
    let written = conn.execute("VACUUM INTO ?1", [target]);
    if let Err(e) = written {
        if let Err(removing) = std::fs::remove_file(&partial) {
            if removing.kind() != std::io::ErrorKind::NotFound {
                return Err(StoreError::Backup(format!(
                    "the backup failed ({e}), and its partial file {} could not be removed: {removing}",
                    partial.display()
                )));
            }
        }
        return Err(if stopped.load(std::sync::atomic::Ordering::Relaxed) {
            StoreError::DeadlinePassed(time_max)
        } else {
            e.into()
        });
    }
    drop(conn);
    let io = |e: std::io::Error| StoreError::Backup(format!("{}: {e}", to.display()));
    if let Err(e) = std::fs::File::open(&partial).and_then(|f| f.sync_all()) {
        let _ = std::fs::remove_file(&partial);
        return Err(io(e));
    }
    // A hard link fails if `to` appeared meanwhile: a backup never replaces a file.
    let linked = std::fs::hard_link(&partial, to);
    let _ = std::fs::remove_file(&partial);
    linked.map_err(io)?;
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    let check = Connection::open_with_flags(to, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let site = own_site(&check)?;
    Ok(BackupReport {
        path: to.to_path_buf(),
        bytes: std::fs::metadata(to).map_err(io)?.len(),
        site,
        elapsed: started.elapsed(),
    })
}

/// Takes the exclusive lock of the database at `db` (on `<db>.lock`, created if missing): the
/// running agent holds it, so a second agent or a restore on the same file is refused. The
/// lock lasts as long as the returned file stays open (and ends with the process).
pub fn lock_database(db: &Path) -> Result<std::fs::File, StoreError> {
    let path = with_suffix(db, ".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::Backup(format!("{}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Backup(format!(
            "{} is in use: an agent runs on this database (its lock {} is held)",
            db.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Backup(format!(
            "locking {}: {e}",
            path.display()
        ))),
    }
}

/// Installs the backup `from` as the database at `db` (whose node must be stopped), under a
/// new site id unless `keep_site`. The node's subscriptions (whose change ids belong to the
/// replaced database) are removed.
///
/// What is installed is what was checked: the backup is copied through SQLite from the
/// connection that checked it (with any WAL beside it), into a staging file made fresh, so a
/// WAL or journal an earlier restore left there cannot be replayed onto it. The database it
/// replaces is folded into one file; one that cannot be is moved aside to `<db>.replaced` before the staged file
/// takes its name, and removed once the new one is in place: a restore cut off between the
/// two leaves no database at `db` and the previous one whole at `<db>.replaced`, never a
/// database beside another's WAL. Folded whole (the usual case), the old file is replaced in
/// one rename, with no such moment.
pub fn restore(from: &Path, db: &Path, keep_site: bool) -> Result<RestoreReport, StoreError> {
    let io = |e: std::io::Error| StoreError::Backup(format!("{}: {e}", db.display()));
    let dir = db.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let _lock = lock_database(db)?;
    let remove_if_there = |path: &Path| match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
        _ => Ok(()),
    };
    let staged = with_suffix(db, ".restoring");
    for sidecar in ["", "-journal", "-wal", "-shm"] {
        remove_if_there(&with_suffix(&staged, sidecar))?;
    }
    {
        let check = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let verdict: String = check.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if verdict != "ok" {
            return Err(StoreError::Corrupt(format!(
                "{} fails its check: {verdict}",
                from.display()
            )));
        }
        own_site(&check)?;
        let target = staged
            .to_str()
            .ok_or_else(|| StoreError::Backup("the database path is not UTF-8".into()))?;
        check.execute("VACUUM INTO ?1", [target])?;
    }
    let report = {
        let mut conn = Connection::open(&staged)?;
        let backup_site = own_site(&conn)?;
        let site = if keep_site {
            backup_site
        } else {
            reidentify(&mut conn)?
        };
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        RestoreReport { backup_site, site }
    };
    std::fs::File::open(&staged)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    for sidecar in ["-journal", "-wal", "-shm"] {
        remove_if_there(&with_suffix(&staged, sidecar))?;
    }
    const SIDECARS: [&str; 4] = ["", "-journal", "-wal", "-shm"];
    let replaced = with_suffix(db, ".replaced");
    if db.exists() && fold_into_one_file(db) {
        // The old database is whole in its file: its empty WAL goes, and the rename below
        // replaces the file in one step.
        for sidecar in &SIDECARS[1..] {
            remove_if_there(&with_suffix(db, sidecar))?;
        }
    } else {
        // Not folded (it cannot be opened, or a reader held it): the file moves aside with
        // whatever journal or WAL it has, under one new name, so they still belong together
        // and no other database is ever opened beside them.
        for sidecar in SIDECARS {
            remove_if_there(&with_suffix(&replaced, sidecar))?;
        }
        for sidecar in SIDECARS {
            match std::fs::rename(with_suffix(db, sidecar), with_suffix(&replaced, sidecar)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
                _ => {}
            }
        }
    }
    for sidecar in SIDECARS {
        remove_if_there(&with_suffix(&with_suffix(db, ".subscriptions"), sidecar))?;
    }
    std::fs::rename(&staged, db).map_err(io)?;
    std::fs::File::open(dir.unwrap_or(Path::new(".")))
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    for sidecar in SIDECARS {
        let _ = std::fs::remove_file(with_suffix(&replaced, sidecar));
    }
    Ok(report)
}

/// Folds the database at `db` into its one file: a hot journal rolled back, the WAL
/// checkpointed and emptied. False if that could not be done whole.
fn fold_into_one_file(db: &Path) -> bool {
    let folded = Connection::open(db).and_then(|old| {
        // A read rolls a hot journal back.
        old.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))?;
        let (busy, left): (i64, i64) =
            old.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        Ok(busy == 0 && left <= 0)
    });
    match folded {
        Ok(folded) => folded,
        Err(e) => {
            tracing::warn!("folding the replaced database into one file failed: {e}");
            false
        }
    }
}

/// Gives the database a new site id: the old one moves to a new ordinal as a remote site whose
/// versions are all applied, and every clock that named it is rewritten to the new ordinal.
/// Returns the new id.
fn reidentify(conn: &mut Connection) -> Result<SiteId, StoreError> {
    let tx = conn.transaction()?;
    // The head below comes from the changes index: first the entries a backup of a running
    // node may lack (see `local::INDEX_BATCH`).
    {
        let mut statements = super::prepared::Statements::new(&tx);
        super::local::rebuild_unindexed(&tx, &mut statements)?;
    }
    let mut old_sites = SiteTable::default();
    {
        let mut stmt = tx.prepare("SELECT site_id FROM __patina_sites ORDER BY ord")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let id = SiteId::from_slice(&row.get::<_, Vec<u8>>(0)?)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            old_sites.push(id);
        }
    }
    let old = old_sites.site(0)?;
    let (head, cleared): (i64, Vec<u8>) = tx.query_row(
        "SELECT head, cleared FROM __patina_sites WHERE ord = 0",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    // The persisted head may lag the changes index (see Store::load_state).
    let indexed: Option<i64> = tx.query_row(
        "SELECT max(version) FROM __patina_changes WHERE site = 0",
        [],
        |r| r.get(0),
    )?;
    let head = head.max(indexed.unwrap_or(0)) as u64;
    let mut applied = RangeSet::default();
    if head > 0 {
        applied.insert_range(1, head);
    }
    let new = loop {
        let candidate = SiteId(rand::random());
        if old_sites.ord(&candidate).is_none() {
            break candidate;
        }
    };
    let moved = old_sites.len() as i64;
    tx.execute(
        "UPDATE __patina_sites SET site_id = ?1, head = 0, applied = x'', cleared = x'' WHERE ord = 0",
        params![new.0.to_vec()],
    )?;
    tx.execute(
        "INSERT INTO __patina_sites (ord, site_id, head, applied, cleared) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![moved, old.0.to_vec(), head as i64, clock::encode_ranges(&applied), cleared],
    )?;
    tx.execute(
        "UPDATE __patina_changes SET site = ?1 WHERE site = 0",
        params![moved],
    )?;
    let mut new_sites = SiteTable::default();
    new_sites.push(new);
    for ord in 1..old_sites.len() {
        new_sites.push(old_sites.site(ord as u32)?);
    }
    new_sites.push(old);
    {
        let mut read = tx.prepare("SELECT tbl, pk, cl, sentinel, cells FROM __patina_rows")?;
        let mut write = tx.prepare(
            "UPDATE __patina_rows SET sentinel = ?3, cells = ?4 WHERE tbl = ?1 AND pk = ?2",
        )?;
        let mut rows = read.query([])?;
        while let Some(row) = rows.next()? {
            let (tbl, pk, cl): (i64, Vec<u8>, i64) = (row.get(0)?, row.get(1)?, row.get(2)?);
            let sentinel: Option<Vec<u8>> = row.get(3)?;
            let cells: Vec<u8> = row.get(4)?;
            let clock =
                clock::decode_row_clock(cl as u64, sentinel.as_deref(), &cells, &old_sites)?;
            write.execute(params![
                tbl,
                pk,
                clock::encode_sentinel(&clock.sentinel, &new_sites),
                clock::encode_cells(&clock.cells, &new_sites),
            ])?;
        }
    }
    tx.commit()?;
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Statement, Store, StoreConfig};
    use patina_core::ids::DbVersion;

    fn open(dir: &Path, name: &str) -> Store {
        std::fs::create_dir_all(dir.join("schema")).unwrap();
        std::fs::write(
            dir.join("schema/kv.sql"),
            "CREATE TABLE kv (k TEXT NOT NULL PRIMARY KEY, v TEXT);",
        )
        .unwrap();
        Store::open(&StoreConfig {
            path: dir.join(name),
            schema_paths: vec![dir.join("schema")],
            ..StoreConfig::default()
        })
        .unwrap()
    }

    fn write(store: &mut Store, sql: &str) {
        store.transact(&[Statement::new(sql)]).unwrap();
    }

    #[test]
    fn a_restored_backup_keeps_rows_and_clocks_under_a_new_site() {
        let dir = tempfile::tempdir().unwrap();
        let mut original = open(dir.path(), "a.db");
        write(
            &mut original,
            "INSERT INTO kv (k, v) VALUES ('a', '1'), ('b', '2')",
        );
        write(&mut original, "UPDATE kv SET v = '3' WHERE k = 'a'");
        write(&mut original, "DELETE FROM kv WHERE k = 'b'");
        let old_site = original.site_id();
        let backup_file = dir.path().join("backup.db");
        let report = backup(
            &dir.path().join("a.db"),
            &backup_file,
            Duration::from_secs(600),
        )
        .unwrap();
        assert_eq!(report.site, old_site);
        assert!(report.bytes > 0);
        // A backup never overwrites.
        assert!(backup(
            &dir.path().join("a.db"),
            &backup_file,
            Duration::from_secs(600)
        )
        .is_err());

        let restored_path = dir.path().join("b.db");
        let out = restore(&backup_file, &restored_path, false).unwrap();
        assert_eq!(out.backup_site, old_site);
        assert_ne!(out.site, old_site);
        let mut restored = open(dir.path(), "b.db");
        assert_eq!(restored.site_id(), out.site);
        // Same rows, same clocks (authors included), same fingerprint.
        assert_eq!(restored.digest().unwrap(), original.digest().unwrap());
        assert_eq!(
            restored.clock_snapshot().unwrap(),
            original.clock_snapshot().unwrap()
        );
        // The old identity is a remote site with all its versions, and they can be served.
        let old_versions = restored.bookkeeping().site(&old_site).unwrap().clone();
        assert_eq!(old_versions.head, DbVersion(3));
        let served = restored
            .changesets(old_site, DbVersion(1), DbVersion(3), 10)
            .unwrap();
        let expected = original
            .changesets(old_site, DbVersion(1), DbVersion(3), 10)
            .unwrap();
        assert_eq!(served, expected);
        // The new identity starts at version 1.
        let next = restored
            .transact(&[Statement::new("INSERT INTO kv (k, v) VALUES ('c', '4')")])
            .unwrap();
        assert_eq!(next.version, Some(DbVersion(1)));

        // Kept on request.
        let kept = restore(&backup_file, &dir.path().join("c.db"), true).unwrap();
        assert_eq!(kept.site, old_site);
        assert_eq!(open(dir.path(), "c.db").site_id(), old_site);
    }

    #[test]
    fn a_database_in_use_is_neither_restored_over_nor_locked_twice() {
        let dir = tempfile::tempdir().unwrap();
        let mut node = open(dir.path(), "a.db");
        write(&mut node, "INSERT INTO kv (k, v) VALUES ('a', '1')");
        let backup_file = dir.path().join("backup.db");
        backup(
            &dir.path().join("a.db"),
            &backup_file,
            Duration::from_secs(600),
        )
        .unwrap();
        let held = lock_database(&dir.path().join("a.db")).unwrap();
        let e = lock_database(&dir.path().join("a.db")).unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        let e = restore(&backup_file, &dir.path().join("a.db"), false).unwrap_err();
        assert!(e.to_string().contains("in use"), "{e}");
        drop(held);
        restore(&backup_file, &dir.path().join("a.db"), false).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_backup_is_refused_and_nothing_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let mut node = open(dir.path(), "a.db");
        write(&mut node, "INSERT INTO kv (k, v) VALUES ('a', '1')");
        let digest = node.digest().unwrap();
        drop(node);
        let junk = dir.path().join("junk.db");
        Connection::open(&junk)
            .unwrap()
            .execute_batch("CREATE TABLE t (x);")
            .unwrap();
        assert!(restore(&junk, &dir.path().join("a.db"), false).is_err());
        std::fs::write(dir.path().join("text.db"), "not a database").unwrap();
        assert!(restore(&dir.path().join("text.db"), &dir.path().join("a.db"), false).is_err());
        assert_eq!(open(dir.path(), "a.db").digest().unwrap(), digest);
    }
}
