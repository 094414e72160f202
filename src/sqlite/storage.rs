//! Every SQL statement of the crate lives here, so a second backend only has to replace this
//! module. The rest of the engine speaks in [`Decision`]s and plain values.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::config::DbConfig;
use rusqlite::{CachedStatement, Connection, OpenFlags, OptionalExtension, params};

use crate::cache::Completed;
use crate::config::{EngineConfig, Location};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::record::{Decision, RawRecord, Read};
use crate::response::{StoredResponse, encode_headers_into};

/// The schema version this build writes (`PRAGMA user_version`).
///
/// * 1: `idempotency_records` a `WITHOUT ROWID` table keyed by the record id.
/// * 2: a rowid table (`seq INTEGER PRIMARY KEY`) with a `UNIQUE` index on the record id. Rows
///   are appended in claim order, so the claims of one batch share a few table pages and their
///   completions update those same pages; only the small index entries land on random pages.
///   Measured on the raw ceiling: 1.6x-1.9x the rows/s and half the bytes written per row
///   (BENCHMARKS.md). Version 1 files are migrated when opened.
/// * 3: a `replay_until` column. A completion stores when its record stops being replayed
///   there, and leaves `expires_at` (indexed) at the bound its claim set, which is later in
///   the usual case of a completion within the lock timeout: the completion no longer deletes
///   and re-inserts an entry of the expiry index (issue #18: 7% of the instructions of a claim
///   and its completion). Version 2 files get the column when opened (no row is rewritten);
///   their rows, with `replay_until` NULL, are live until `expires_at` as before.
pub(crate) const SCHEMA_VERSION: i64 = 3;

/// Until when a record answers claims: the SQL of it, for every statement that asks whether a
/// record is live (`concat!` takes it into the statements' literals). `expires_at` is when the
/// record may be deleted, and never earlier than this.
macro_rules! live_until {
    () => {
        "coalesce(replay_until, expires_at)"
    };
}
pub(crate) use live_until;

/// [`live_until!`] as a value, for SQL built at run time.
pub(crate) const LIVE_UNTIL: &str = live_until!();

/// The records table and its expiry index (version 3).
const RECORDS_TABLE: &str = "
CREATE TABLE idempotency_records (
    seq          INTEGER PRIMARY KEY,          -- rowid: rows are appended in claim order
    id           BLOB    NOT NULL UNIQUE,      -- SHA-256 of (scope, key)
    scope        TEXT    NOT NULL,             -- kept readable for operators
    key          TEXT    NOT NULL,
    fingerprint  BLOB    NOT NULL,             -- SHA-256 of the request
    state        INTEGER NOT NULL,             -- 0 in flight, 1 completed
    fence        INTEGER NOT NULL,             -- fencing token of the current lease
    locked_until INTEGER NOT NULL,             -- ms since epoch; in flight only
    expires_at   INTEGER NOT NULL,             -- ms since epoch; absent from then on, may be deleted
    created_at   INTEGER NOT NULL,
    completed_at INTEGER,
    status       INTEGER,
    headers      BLOB,                         -- postcard-encoded [(name, value)]
    body         BLOB,
    trailers     BLOB,                         -- NULL: no trailers
    replay_until INTEGER                       -- completed: replayed until then (<= expires_at);
                                               -- NULL: live until expires_at
);
CREATE INDEX idempotency_records_expiry ON idempotency_records (expires_at);
";

/// The meta table (unchanged since version 1).
const META_TABLE: &str = "
CREATE TABLE idempotency_meta (
    name  TEXT    NOT NULL PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO idempotency_meta (name, value) VALUES ('fence', 0);
";

/// Version 2 to 3: the new column, NULL in every row (SQLite adds it without rewriting them).
const MIGRATE_2_TO_3: &str = "ALTER TABLE idempotency_records ADD COLUMN replay_until INTEGER;";

/// Version 1 to 3, run in the transaction that sets the new version (a crash leaves version 1
/// intact): the old table is renamed, [`RECORDS_TABLE`] created, and every row copied over in
/// the order the records were created, then the old table dropped.
const MIGRATE_1_TO_2_BEFORE: &str = "
ALTER TABLE idempotency_records RENAME TO idempotency_records_v1;
DROP INDEX idempotency_records_expiry;
";
const MIGRATE_1_TO_2_AFTER: &str = "
INSERT INTO idempotency_records
    (id, scope, key, fingerprint, state, fence, locked_until, expires_at, created_at,
     completed_at, status, headers, body, trailers)
SELECT id, scope, key, fingerprint, state, fence, locked_until, expires_at, created_at,
       completed_at, status, headers, body, trailers
FROM idempotency_records_v1 ORDER BY created_at;
DROP TABLE idempotency_records_v1;
";

/// Opens the writer connection: WAL (checked), `synchronous=NORMAL`, no automatic checkpoints,
/// schema created or checked.
///
/// `synchronous=NORMAL` whatever the durability: no commit waits for `fsync`. With
/// [`Durability::Full`](crate::Durability::Full) the syncer thread flushes the WAL before a
/// completion is acknowledged (see `syncer.rs`).
///
/// Checkpoints are run by the checkpointer thread on its own connection
/// ([`open_checkpointer`]), never inline in a commit of this one.
pub(crate) fn open_writer(config: &EngineConfig) -> Result<Connection> {
    let conn = match &config.location {
        Location::Memory => Connection::open_in_memory()?,
        #[cfg(feature = "postgres")]
        Location::Postgres(_) => {
            return Err(Error::InvalidConfig {
                reason: "not an SQLite location".into(),
            });
        }
        Location::File(path) => {
            let conn = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_CREATE
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| open_error(e, path))?;
            if conn.is_readonly("main").map_err(|e| open_error(e, path))? {
                return Err(Error::ReadOnly {
                    path: path.to_path_buf(),
                });
            }
            conn
        }
    };
    let path = match &config.location {
        Location::File(p) => p.as_path(),
        _ => Path::new(":memory:"),
    };
    conn.busy_timeout(config.busy_timeout)?;
    // Refuse a newer schema (and a file that is not a database) before anything is changed: the
    // journal mode switch below would already write to the file.
    schema_version(&conn).map_err(|e| open_error_any(e, path))?;
    if let Some(size) = config.page_size {
        // Only a database without a page yet takes it (SQLite ignores it afterwards; in WAL
        // mode it cannot change at all): before the switch to WAL writes the header.
        let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
        if pages == 0 {
            conn.pragma_update(None, "page_size", size)?;
        }
    }
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(|e| open_error(e, path))?;
    let wanted = if matches!(config.location, Location::Memory) {
        "memory"
    } else {
        "wal"
    };
    if !mode.eq_ignore_ascii_case(wanted) {
        return Err(Error::NotWal { actual: mode });
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(None, "cache_size", -config.cache_size_kib)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_prepared_statement_cache_capacity(32);
    migrate(&conn).map_err(|e| open_error_any(e, path))?;
    if let Some(pages) = config.max_page_count {
        // After the migration, so the schema itself always fits.
        conn.pragma_update(None, "max_page_count", pages)?;
    }
    Ok(conn)
}

/// Opens a read-only connection to an existing WAL database.
pub(crate) fn open_reader(path: &Path, config: &EngineConfig) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| open_error(e, path))?;
    conn.busy_timeout(config.busy_timeout)?;
    conn.pragma_update(None, "cache_size", -(config.cache_size_kib / 4).max(1024))?;
    conn.set_prepared_statement_cache_capacity(4);
    Ok(conn)
}

/// The database's write-ahead log file (SQLite names it after the database).
pub(crate) fn wal_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

/// Opens the checkpointer's connection: read-write (a checkpoint writes the database file), a
/// small page cache (a checkpoint copies WAL frames without it).
///
/// Checkpoints and the syncer's pipelined flush: the writer commits without `fsync`, so the
/// WAL holds committed frames that are not on disk yet, and a checkpoint copies committed
/// frames into the database file. That is safe because the checkpointing connection does not
/// run with `synchronous=OFF` (FULL here; NORMAL for the writer's own occasional checkpoint):
/// SQLite then `fsync`s the WAL *before* it copies the first frame, and `fsync`s the database
/// file before it records the frames as copied (`nBackfill`); the WAL is rewound only once
/// every frame is copied and synced. So the database file never holds a page whose WAL frame is
/// not on disk, and no frame is dropped from the WAL before its page is on disk: a checkpoint
/// cannot reorder anything or lose a commit. What it can do is make an un-flushed completion
/// durable before the syncer's own flush does. That is harmless: the completion stays
/// registered as not yet durable (in flight for readers) until the syncer's flush, which is the
/// only thing that acknowledges it, so the rule "acknowledged or replayed only once on disk"
/// does not depend on the checkpointer at all.
pub(crate) fn open_checkpointer(path: &Path, config: &EngineConfig) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| open_error(e, path))?;
    conn.busy_timeout(config.busy_timeout)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(None, "cache_size", -256)?;
    Ok(conn)
}

pub(crate) fn open_error(e: rusqlite::Error, path: &Path) -> Error {
    open_error_any(e.into(), path)
}

pub(crate) fn open_error_any(e: Error, path: &Path) -> Error {
    if let Error::Storage(inner) = &e
        && let Some(rusqlite::Error::SqliteFailure(f, _)) = inner.downcast_ref::<rusqlite::Error>()
    {
        use rusqlite::ErrorCode as C;
        match f.code {
            C::NotADatabase => {
                return Error::NotADatabase {
                    path: path.to_path_buf(),
                };
            }
            C::CannotOpen if path.is_dir() => {
                return Error::CannotOpen {
                    path: path.to_path_buf(),
                    reason: "the path is a directory",
                };
            }
            C::CannotOpen
                if path
                    .parent()
                    .is_some_and(|d| !d.as_os_str().is_empty() && !d.is_dir()) =>
            {
                return Error::CannotOpen {
                    path: path.to_path_buf(),
                    reason: "its directory does not exist",
                };
            }
            C::ReadOnly | C::CannotOpen | C::PermissionDenied => {
                return Error::ReadOnly {
                    path: path.to_path_buf(),
                };
            }
            _ => {}
        }
    }
    e
}

/// The file's schema version, or `SchemaTooNew` when this build cannot read it.
pub(crate) fn schema_version(conn: &Connection) -> Result<i64> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(Error::SchemaTooNew {
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(version)
}

fn migrate(conn: &Connection) -> Result<()> {
    // The version is read again inside the write transaction that migrates: two connections
    // opening a new file at once (an engine and a tool, or engines waiting for the file one
    // after the other) must not both create the tables.
    if schema_version(conn)? == SCHEMA_VERSION {
        return check_tables(conn, SCHEMA_VERSION);
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        let version = schema_version(conn)?;
        check_tables(conn, version)?;
        match version {
            v if v == SCHEMA_VERSION => return Ok(()),
            0 => {
                conn.execute_batch(RECORDS_TABLE)?;
                conn.execute_batch(META_TABLE)?;
            }
            1 => {
                conn.execute_batch(MIGRATE_1_TO_2_BEFORE)?;
                conn.execute_batch(RECORDS_TABLE)?;
                conn.execute_batch(MIGRATE_1_TO_2_AFTER)?;
            }
            2 => conn.execute_batch(MIGRATE_2_TO_3)?,
            v => {
                return Err(Error::Corrupt {
                    detail: format!("unknown schema version {v}"),
                });
            }
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(())
    })();
    match result {
        Ok(()) => {
            conn.execute_batch("COMMIT")?;
            Ok(())
        }
        Err(e) => {
            rollback(conn);
            Err(e)
        }
    }
}

/// Checks that a file claiming schema `version` really has our tables: a foreign database with
/// our version number must not be written to.
pub(crate) fn check_tables(conn: &Connection, version: i64) -> Result<()> {
    if version <= 0 {
        return Ok(());
    }
    let ok: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name IN ('idempotency_records', 'idempotency_meta')",
        [],
        |r| r.get(0),
    )?;
    if ok != 2 {
        return Err(Error::Corrupt {
            detail: format!("schema version {version} but the idempotency tables are missing"),
        });
    }
    Ok(())
}

/// Makes everything SQLite will read from the files durable, before the engine answers
/// anything (called by `Engine::open` with the writer connection open, the engine lock held,
/// and no other connection of this engine yet).
///
/// The previous engine on the file may have died (kill -9, abort, OOM) with completions
/// committed to the WAL but not yet flushed, or stopped after a failed flush
/// ([`Error::SyncFailed`]); either way their frames may exist only in the OS page cache, where
/// SQLite reads them as if they were on disk. After a failed `fdatasync`, Linux marks the
/// pages it could not write as clean, so flushing again would not write them: the WAL is
/// instead checkpointed whole into the database file (`TRUNCATE`), which writes every page
/// anew, `fsync`s the WAL before and the database file after, and empties the WAL. Then the
/// directory is flushed, so the entries of a database or WAL file this open created are
/// durable before any completion is acknowledged (SQLite flushes the directory on its own first
/// sync of a new WAL, but the syncer flushes the WAL through a descriptor of its own).
///
/// If the checkpoint cannot complete (another process reads an old snapshot, so some frames
/// may not be copied yet), the WAL is written back over itself under the write lock and
/// flushed, which makes its frames durable where they are.
pub(crate) fn make_durable(conn: &Connection, db: &Path, config: &EngineConfig) -> Result<()> {
    #[cfg(feature = "fault-injection")]
    if config.fail_open_sync {
        return Err(Error::sync_failed(std::io::Error::other(
            "injected failure to flush the files at open (fault-injection)",
        )));
    }
    // Readers of other processes may hold a snapshot: wait for them a little, not for the
    // whole busy timeout.
    conn.busy_timeout(std::time::Duration::from_millis(100))?;
    let checkpoint = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    });
    conn.busy_timeout(config.busy_timeout)?;
    match checkpoint {
        Ok((0, log, done)) if log <= 0 || done == log => {}
        Ok(_) => rewrite_wal(conn, db)?,
        // An I/O error here is a failed read, write or flush of the files.
        Err(rusqlite::Error::SqliteFailure(f, message))
            if f.code == rusqlite::ErrorCode::SystemIoFailure =>
        {
            return Err(Error::sync_failed(std::io::Error::other(format!(
                "checkpoint at open: {}",
                message.unwrap_or_else(|| f.to_string())
            ))));
        }
        Err(e) => match Error::from(e) {
            Error::Busy => rewrite_wal(conn, db)?,
            e => return Err(e),
        },
    }
    sync_dir(db).map_err(Error::sync_failed)
}

/// Writes the WAL back over itself and flushes it, under SQLite's write lock (so no other
/// connection appends meanwhile): pages whose earlier write-back failed are written again.
fn rewrite_wal(conn: &Connection, db: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        let mut wal = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(wal_path(db))?;
        let mut chunk = vec![0u8; 1 << 20];
        let mut at = 0u64;
        loop {
            wal.seek(SeekFrom::Start(at))?;
            let n = wal.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            wal.seek(SeekFrom::Start(at))?;
            wal.write_all(&chunk[..n])?;
            at += n as u64;
        }
        wal.sync_data()
    })();
    rollback(conn);
    result.map_err(Error::sync_failed)
}

/// Flushes the directory that holds the database: its entries for the database, WAL and
/// shared-memory files. (On Windows a directory cannot be opened as a file, and NTFS journals
/// its metadata: nothing to do.)
fn sync_dir(db: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(crate::sqlite::lock::dir_of(db))?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = db;
        Ok(())
    }
}

/// Reads the last fencing token handed out.
pub(crate) fn load_fence(conn: &Connection) -> Result<u64> {
    let v: i64 = conn.query_row(
        "SELECT value FROM idempotency_meta WHERE name = 'fence'",
        [],
        |r| r.get(0),
    )?;
    Ok(v as u64)
}

/// Persists the last fencing token handed out (inside the writer's transaction).
pub(crate) fn store_fence(conn: &Connection, fence: u64) -> Result<()> {
    conn.prepare_cached("UPDATE idempotency_meta SET value = ?1 WHERE name = 'fence'")?
        .execute([fence as i64])?;
    Ok(())
}

pub(crate) fn begin(conn: &Connection) -> Result<()> {
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    Ok(())
}

pub(crate) fn commit(conn: &Connection) -> Result<()> {
    conn.prepare_cached("COMMIT")?.execute([])?;
    Ok(())
}

/// Rolls back if a transaction is open; errors are ignored (SQLite may already have rolled back).
pub(crate) fn rollback(conn: &Connection) {
    if !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
}

/// Truncates the WAL (on shutdown).
pub(crate) fn checkpoint(conn: &Connection) -> Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(())
}

/// What a passive checkpoint reported.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WalState {
    /// Frames in the WAL since it last restarted from its beginning.
    pub frames: i64,
    /// Of those, the frames copied into the database file.
    pub copied: i64,
}

/// Copies into the database file every WAL frame no reader still needs, without waiting for
/// (or blocking) the writer or any reader.
pub(crate) fn checkpoint_passive(conn: &Connection) -> Result<WalState> {
    let (frames, copied) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    })?;
    Ok(WalState { frames, copied })
}

/// After a failed flush of the WAL: closing this connection must not checkpoint (it would copy
/// frames whose flush failed into the database file, and rewind the WAL); SQLite recovers the
/// WAL at the next open instead.
pub(crate) fn no_checkpoint_on_close(conn: &Connection) {
    let _ = conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true);
}

/// The parameters of one claim.
pub(crate) struct ClaimRow<'a> {
    pub id: &'a [u8; 32],
    pub scope: &'a str,
    pub key: &'a str,
    pub fingerprint: &'a Fingerprint,
    pub fence: u64,
    pub now: i64,
    pub locked_until: i64,
    pub expires_at: i64,
}

/// The writer's statements for one batch, each prepared the first time the batch uses it.
///
/// Taken from rusqlite's statement cache once per batch instead of once per command: every
/// `prepare_cached` hashes and compares the whole SQL text (the claim's is ~700 bytes), twice
/// with the return to the cache, which cost ~6% of a claim+complete (`make bench-cpu`).
pub(crate) struct Statements<'c> {
    conn: &'c Connection,
    claim: Option<CachedStatement<'c>>,
    seq_of: Option<CachedStatement<'c>>,
    inspect: Option<CachedStatement<'c>>,
    complete: Option<CachedStatement<'c>>,
    complete_row: Option<CachedStatement<'c>>,
    release: Option<CachedStatement<'c>>,
    extend: Option<CachedStatement<'c>>,
    /// Encoded header and trailer lists of the completion being stored, reused.
    headers: Vec<u8>,
    trailers: Vec<u8>,
}

/// The statement in `slot`, prepared (from the connection's cache) on first use.
fn prepared<'s, 'c>(
    conn: &'c Connection,
    slot: &'s mut Option<CachedStatement<'c>>,
    sql: &str,
) -> Result<&'s mut CachedStatement<'c>> {
    match slot {
        Some(stmt) => Ok(stmt),
        None => Ok(slot.insert(conn.prepare_cached(sql)?)),
    }
}

/// Takes the record with one `INSERT ... ON CONFLICT DO UPDATE ... WHERE`: it inserts when no
/// record exists, and replaces one that has expired, or an in-flight one with the same
/// fingerprint whose lock timed out (a takeover).
const CLAIM: &str = "INSERT INTO idempotency_records
     (id, scope, key, fingerprint, state, fence, locked_until, expires_at, created_at)
 VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, ?7, ?8)
 ON CONFLICT (id) DO UPDATE SET
     scope = excluded.scope, key = excluded.key, fingerprint = excluded.fingerprint,
     state = 0, fence = excluded.fence, locked_until = excluded.locked_until,
     expires_at = excluded.expires_at, created_at = excluded.created_at,
     completed_at = NULL, status = NULL, headers = NULL, body = NULL, trailers = NULL,
     replay_until = NULL
 WHERE coalesce(idempotency_records.replay_until, idempotency_records.expires_at)
           <= excluded.created_at
    OR (idempotency_records.state = 0
        AND idempotency_records.locked_until <= excluded.created_at
        AND idempotency_records.fingerprint = excluded.fingerprint)";

const INSPECT: &str = concat!(
    "SELECT fingerprint, state, locked_until, status, headers, body, trailers
 FROM idempotency_records WHERE id = ?1 AND ",
    live_until!(),
    " > ?2"
);

/// A completion that moves `expires_at` (and so the record's expiry index entry): the record
/// is live until `?8` exactly.
const COMPLETE: &str = "UPDATE idempotency_records
 SET state = 1, status = ?3, headers = ?4, body = ?5, trailers = ?6,
     completed_at = ?7, expires_at = ?8, locked_until = 0, replay_until = NULL
 WHERE id = ?1 AND fence = ?2 AND state = 0";

/// The usual completion, of the row whose rowid the claim reported, when the bound its claim
/// set (`expires_at`, lock expiry + retention) is not before the new one (`?8`, now +
/// retention), as it is not for a completion within the lock timeout: `replay_until` says
/// until when it is replayed, and `expires_at` stays, with its index entry.
const COMPLETE_ROW: &str = "UPDATE idempotency_records
 SET state = 1, status = ?3, headers = ?4, body = ?5, trailers = ?6,
     completed_at = ?7, replay_until = ?8, locked_until = 0
 WHERE seq = ?9 AND id = ?1 AND fence = ?2 AND state = 0 AND expires_at >= ?8";

const SEQ_OF: &str = "SELECT seq FROM idempotency_records WHERE id = ?1";

const RELEASE: &str = "DELETE FROM idempotency_records WHERE id = ?1 AND fence = ?2 AND state = 0";

const EXTEND: &str = "UPDATE idempotency_records
 SET locked_until = ?3, expires_at = max(expires_at, ?4)
 WHERE id = ?1 AND fence = ?2 AND state = 0";

impl<'c> Statements<'c> {
    pub(crate) fn new(conn: &'c Connection) -> Self {
        Statements {
            conn,
            claim: None,
            seq_of: None,
            inspect: None,
            complete: None,
            complete_row: None,
            release: None,
            extend: None,
            headers: Vec::new(),
            trailers: Vec::new(),
        }
    }

    /// Tries to take the record ([`CLAIM`]). `Some` when it took it, with the record's rowid
    /// when it is known.
    ///
    /// A fresh key is inserted, which sets `last_insert_rowid`; a takeover or the replacement
    /// of an expired record updates the row in place and leaves it as it was, so a rowid that
    /// did not change (also when a deleted last row's rowid was handed out again) is looked up
    /// by id instead: always right, and one statement fewer for the common case than
    /// `RETURNING`.
    ///
    /// Nothing may fail once the record is taken: the batch goes on after a command's error,
    /// and a claim reported failed with its record written would leave the key held by no one
    /// until its lock expired, and its token handed out again to the next claim of the batch.
    /// So a lookup of the rowid that fails leaves it unknown (the completion then finds the
    /// record by id), unless it took the transaction down with it.
    pub(crate) fn try_claim(&mut self, c: &ClaimRow<'_>) -> Result<Option<Option<i64>>> {
        let before = self.conn.last_insert_rowid();
        let n = prepared(self.conn, &mut self.claim, CLAIM)?.execute(params![
            &c.id[..],
            c.scope,
            c.key,
            &c.fingerprint.as_bytes()[..],
            c.fence as i64,
            c.locked_until,
            c.expires_at,
            c.now,
        ])?;
        if n != 1 {
            return Ok(None);
        }
        let after = self.conn.last_insert_rowid();
        if after != before {
            return Ok(Some(Some(after)));
        }
        let seq = prepared(self.conn, &mut self.seq_of, SEQ_OF)
            .and_then(|s| Ok(s.query_row([&c.id[..]], |r| r.get(0))?));
        match seq {
            Ok(seq) => Ok(Some(Some(seq))),
            // SQLite rolled the transaction back: the batch fails, this claim with it.
            Err(e) if self.conn.is_autocommit() => Err(e),
            Err(_) => Ok(Some(None)),
        }
    }

    /// Reads a live record and decides what a claim that could not take it gets. Mismatch is
    /// decided before in-flight. `None`: no live record (cannot happen right after a failed
    /// `try_claim` in the same transaction).
    pub(crate) fn inspect(
        &mut self,
        id: &[u8; 32],
        fingerprint: &Fingerprint,
        now: i64,
    ) -> Result<Option<Decision>> {
        let raw = prepared(self.conn, &mut self.inspect, INSPECT)?
            .query_row(params![&id[..], now], raw_record)
            .optional()
            .map_err(column_error)?;
        raw.map(|raw| raw.decide(fingerprint)).transpose()
    }

    /// Stores the response of the lease `(id, fence)`. Returns false when the lease no longer
    /// owns an in-flight record (lost to a takeover, released, or expired and deleted).
    ///
    /// With the rowid its claim found (`row`), the row is reached through the table's own
    /// B-tree, whose pages the claim's batch has just written, instead of a search of the id
    /// index, whose leaves are spread at random; the id and fence are checked all the same
    /// ([`COMPLETE_ROW`]). When that changes nothing ([`COMPLETE`] then decides): no rowid, a
    /// completion after the lock expired, or a lease that lost its record.
    pub(crate) fn complete(
        &mut self,
        id: &[u8; 32],
        fence: u64,
        row: Option<i64>,
        response: &StoredResponse,
        now: i64,
        expires_at: i64,
    ) -> Result<bool> {
        encode_headers_into(&response.headers, &mut self.headers);
        let trailers = match &response.trailers {
            Some(list) => {
                encode_headers_into(list, &mut self.trailers);
                Some(&self.trailers[..])
            }
            None => None,
        };
        let fields = params![
            &id[..],
            fence as i64,
            response.status,
            &self.headers[..],
            &response.body,
            trailers,
            now,
            expires_at,
        ];
        if let Some(seq) = row {
            let stmt = prepared(self.conn, &mut self.complete_row, COMPLETE_ROW)?;
            stmt.raw_bind_parameter(9, seq)?;
            for (i, v) in fields.iter().enumerate() {
                stmt.raw_bind_parameter(i + 1, v)?;
            }
            if stmt.raw_execute()? == 1 {
                return Ok(true);
            }
        }
        let n = prepared(self.conn, &mut self.complete, COMPLETE)?.execute(fields)?;
        Ok(n == 1)
    }

    /// Deletes the in-flight record of the lease `(id, fence)`. False when the lease lost it.
    pub(crate) fn release(&mut self, id: &[u8; 32], fence: u64) -> Result<bool> {
        let n = prepared(self.conn, &mut self.release, RELEASE)?
            .execute(params![&id[..], fence as i64])?;
        Ok(n == 1)
    }

    /// Moves the lock of the lease `(id, fence)` forward. False when the lease lost the record.
    pub(crate) fn extend(
        &mut self,
        id: &[u8; 32],
        fence: u64,
        locked_until: i64,
        expires_at: i64,
    ) -> Result<bool> {
        let n = prepared(self.conn, &mut self.extend, EXTEND)?.execute(params![
            &id[..],
            fence as i64,
            locked_until,
            expires_at
        ])?;
        Ok(n == 1)
    }
}

/// Reads the first seven columns, in the order `inspect` selects them.
fn raw_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRecord> {
    Ok(RawRecord {
        fingerprint: r.get(0)?,
        state: r.get(1)?,
        locked_until: r.get(2)?,
        status: r.get(3)?,
        headers: r.get(4)?,
        body: r.get(5)?,
        trailers: r.get(6)?,
    })
}

/// A type or conversion failure while reading a row means the row is not what we wrote.
pub(crate) fn column_error(e: rusqlite::Error) -> Error {
    match e {
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::Utf8Error(..) => Error::Corrupt {
            detail: e.to_string(),
        },
        e => e.into(),
    }
}

/// Reads a live completed record (for the read connections and the replay cache). `None` when
/// there is no live record or it is still in flight. As in [`inspect`], a mismatch is decided
/// before the response is decoded.
pub(crate) fn read_completed(
    conn: &Connection,
    id: &[u8; 32],
    wanted: &Fingerprint,
    now: i64,
) -> Result<Option<Read>> {
    let mut stmt = conn.prepare_cached(concat!(
        "SELECT fingerprint, state, locked_until, status, headers, body, trailers, ",
        live_until!(),
        " FROM idempotency_records WHERE id = ?1 AND ",
        live_until!(),
        " > ?2 AND state = 1"
    ))?;
    let raw = stmt
        .query_row(params![&id[..], now], |r| {
            Ok((raw_record(r)?, r.get::<_, i64>(7)?))
        })
        .optional()
        .map_err(column_error)?;
    let Some((raw, expires_at)) = raw else {
        return Ok(None);
    };
    let fingerprint = raw.fingerprint()?;
    if fingerprint != *wanted.as_bytes() {
        return Ok(Some(Read::Mismatch));
    }
    Ok(Some(Read::Completed(Completed {
        deadline: None,
        fingerprint,
        expires_at,
        response: Arc::new(raw.into_response()?),
    })))
}

/// Deletes up to `limit` records whose `expires_at` has passed; returns how many. (A completed
/// record stops being replayed at its `replay_until`, and is deleted from its `expires_at`, at
/// most one lock timeout later.)
pub(crate) fn delete_expired(conn: &Connection, now: i64, limit: usize) -> Result<usize> {
    let n = conn
        .prepare_cached(
            "DELETE FROM idempotency_records WHERE seq IN
                 (SELECT seq FROM idempotency_records WHERE expires_at <= ?1 LIMIT ?2)",
        )?
        .execute(params![now, limit as i64])?;
    Ok(n)
}
