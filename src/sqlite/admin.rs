//! An operator's reads and changes on an SQLite store: on a read-only connection of their own
//! (reads, beside a running engine), or on the writer's connection (changes, and every
//! operation of an in-memory store).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::admin::{Answer, Change, Op, Row, Stats, explain, time};
use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::sqlite::storage::{self, column_error, open_error, open_error_any};

/// Every column of a record, in the order [`row`] reads them, with `{live}` for until when
/// the record is live ([`live_until`]).
fn columns(live: &str) -> String {
    format!(
        "scope, key, fingerprint, state, fence, locked_until, {live}, created_at,
    completed_at, status, headers, body, trailers"
    )
}

/// The SQL of until when a record is live, for the file's schema version: a store of version
/// 2 (a service not upgraded yet, read by a newer tool) has no `replay_until`.
fn live_until(conn: &Connection) -> Result<&'static str> {
    Ok(if storage::schema_version(conn)? >= 3 {
        storage::LIVE_UNTIL
    } else {
        "expires_at"
    })
}

/// Problems a check lists one by one before it only counts them.
const MAX_PROBLEMS: usize = 50;

/// A read-only connection to an existing store.
pub(crate) struct SqliteReader {
    conn: Connection,
    path: PathBuf,
}

impl SqliteReader {
    /// Opens the file read-only and checks that it is an idempotency-rs store this build can
    /// read. Writes nothing, creates nothing.
    pub(crate) fn open(path: &Path, config: &EngineConfig) -> Result<SqliteReader> {
        if path.is_dir() {
            return Err(Error::CannotOpen {
                path: path.to_path_buf(),
                reason: "the path is a directory",
            });
        }
        if !path.exists() {
            return Err(Error::CannotOpen {
                path: path.to_path_buf(),
                reason: "it does not exist",
            });
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| open_error(e, path))?;
        conn.busy_timeout(config.busy_timeout)?;
        let version = storage::schema_version(&conn).map_err(|e| open_error_any(e, path))?;
        let ours = version > 0
            && storage::check_tables(&conn, version)
                .map_err(|e| open_error_any(e, path))
                .is_ok();
        if !ours {
            return Err(Error::Refused {
                detail: format!(
                    "{} is an SQLite database but not an idempotency-rs store (schema version {version}, no idempotency tables)",
                    path.display()
                ),
            });
        }
        Ok(SqliteReader {
            conn,
            path: path.to_path_buf(),
        })
    }

    pub(crate) fn run(&self, op: &Op, now: i64) -> Result<Answer> {
        match op {
            Op::Release { .. } | Op::Forget { .. } => Err(Error::ReadOnly {
                path: self.path.clone(),
            }),
            // One snapshot for the whole answer: a record is never seen half written, and
            // the figures of `stats` agree with each other.
            op => {
                self.conn.execute_batch("BEGIN")?;
                let answer = read(&self.conn, op, now, Some(&self.path));
                storage::rollback(&self.conn);
                answer
            }
        }
    }
}

/// A read, on any connection (a snapshot of its own, or the writer's between batches).
pub(crate) fn read(conn: &Connection, op: &Op, now: i64, path: Option<&Path>) -> Result<Answer> {
    let live = live_until(conn)?;
    let columns = columns(live);
    match *op {
        Op::Record { ref id } => {
            let row = conn
                .prepare_cached(&format!(
                    "SELECT {columns} FROM idempotency_records WHERE id = ?1"
                ))?
                .query_row(params![&id[..]], row)
                .optional()
                .map_err(column_error)?;
            Ok(Answer::Record(
                row.map(|r| r.into_record(now, true)).transpose()?,
            ))
        }
        Op::InFlight {
            older_than_ms,
            limit,
        } => {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {columns} FROM idempotency_records
                 WHERE state = 0 AND expires_at > ?1 AND created_at <= ?2
                 ORDER BY created_at LIMIT ?3"
            ))?;
            let rows = stmt
                .query_map(
                    params![
                        now,
                        now.saturating_sub(older_than_ms),
                        i64::try_from(limit).unwrap_or(i64::MAX)
                    ],
                    row,
                )?
                .collect::<rusqlite::Result<Vec<Row>>>()
                .map_err(column_error)?;
            let records = rows
                .into_iter()
                .map(|r| r.into_record(now, false))
                .collect::<Result<Vec<_>>>()?;
            Ok(Answer::Records(records))
        }
        Op::Stats => stats(conn, live, now, path).map(Answer::Stats),
        Op::Check => check(conn, &columns, now).map(Answer::Problems),
        _ => Err(Error::InvalidConfig {
            reason: "not a read".into(),
        }),
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        scope: r.get(0)?,
        key: r.get(1)?,
        fingerprint: r.get(2)?,
        state: r.get(3)?,
        fence: r.get(4)?,
        locked_until: r.get(5)?,
        expires_at: r.get(6)?,
        created_at: r.get(7)?,
        completed_at: r.get(8)?,
        status: r.get(9)?,
        headers: r.get(10)?,
        body: r.get(11)?,
        trailers: r.get(12)?,
    })
}

fn stats(conn: &Connection, live: &str, now: i64, path: Option<&Path>) -> Result<Stats> {
    let (in_flight, completed, expired, oldest, timed_out) = conn.query_row(
        &format!(
            "SELECT count(*) FILTER (WHERE state = 0 AND expires_at > ?1),
                count(*) FILTER (WHERE state = 1 AND {live} > ?1),
                count(*) FILTER (WHERE {live} <= ?1),
                min(created_at) FILTER (WHERE state = 0 AND expires_at > ?1),
                count(*) FILTER (WHERE state = 0 AND expires_at > ?1 AND locked_until <= ?1)
         FROM idempotency_records"
        ),
        [now],
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, i64>(4)?,
            ))
        },
    )?;
    let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
    let page_size: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok(Stats {
        backend: "sqlite",
        in_flight: count(in_flight),
        completed: count(completed),
        expired: count(expired),
        oldest_in_flight: oldest.map(time),
        lock_timed_out: count(timed_out),
        schema_version: storage::schema_version(conn)?,
        size_bytes: count(pages.saturating_mul(page_size)),
        wal_bytes: path
            .and_then(|p| std::fs::metadata(storage::wal_path(p)).ok())
            .map(|m| m.len()),
    })
}

/// SQLite's integrity check, the fencing counter against the records, then every record
/// decoded as a claim would decode it.
fn check(conn: &Connection, columns: &str, now: i64) -> Result<Vec<String>> {
    let mut problems: Vec<String> = conn
        .prepare("PRAGMA integrity_check")?
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?
        .into_iter()
        .filter(|line| line != "ok")
        .map(|line| format!("SQLite: {line}"))
        .collect();
    let counter = storage::load_fence(conn)?;
    let highest: Option<i64> =
        conn.query_row("SELECT max(fence) FROM idempotency_records", [], |r| {
            r.get(0)
        })?;
    if let Some(highest) = highest
        && u64::try_from(highest).is_ok_and(|h| h > counter)
    {
        problems.push(format!(
            "the fencing counter ({counter}) is behind a record's token ({highest}): a new lease could repeat a token"
        ));
    }
    let mut stmt = conn.prepare(&format!("SELECT {columns}, seq FROM idempotency_records"))?;
    let mut rows = stmt.query([])?;
    let mut bad = 0usize;
    while let Some(r) = rows.next()? {
        let seq: i64 = r.get(13).unwrap_or(-1);
        let problem = match row(r) {
            Ok(record) => record.into_record(now, true).err(),
            Err(e) => Some(column_error(e)),
        };
        if let Some(e) = problem {
            bad += 1;
            if bad <= MAX_PROBLEMS {
                problems.push(format!("row {seq}: {e}"));
            }
        }
    }
    if bad > MAX_PROBLEMS {
        problems.push(format!(
            "... and {} more rows that do not decode",
            bad - MAX_PROBLEMS
        ));
    }
    Ok(problems)
}

/// A change, on the writer's connection, in a transaction of its own that is on disk when
/// this returns (`synchronous=FULL` for its commit): an operator's change survives a power
/// loss once it is reported done.
pub(crate) fn change(conn: &Connection, op: &Op, now: i64) -> Result<Answer> {
    conn.pragma_update(None, "synchronous", "FULL")?;
    let answer = match *op {
        Op::Release { ref id, fence } => in_transaction(conn, || {
            let fence = i64::try_from(fence).unwrap_or(i64::MAX);
            let n = conn
                .prepare_cached(
                    "DELETE FROM idempotency_records
                     WHERE id = ?1 AND fence = ?2 AND state = 0 AND expires_at > ?3",
                )?
                .execute(params![&id[..], fence, now])?;
            Ok(Answer::Change(match n {
                1 => Change::Done,
                _ => explain(found(conn, id, now)?, true),
            }))
        }),
        Op::Forget { ref id } => in_transaction(conn, || {
            let n = conn
                .prepare_cached(
                    "DELETE FROM idempotency_records
                     WHERE id = ?1 AND (state = 1 OR expires_at <= ?2)",
                )?
                .execute(params![&id[..], now])?;
            Ok(Answer::Change(match n {
                1 => Change::Done,
                _ => explain(found(conn, id, now)?, false),
            }))
        }),
        ref read_op => read(conn, read_op, now, None),
    };
    let restored = conn.pragma_update(None, "synchronous", "NORMAL");
    let answer = answer?;
    restored?;
    Ok(answer)
}

/// The state and fence of the live record `id`.
fn found(conn: &Connection, id: &[u8; 32], now: i64) -> Result<Option<(i64, i64)>> {
    conn.prepare_cached(concat!(
        "SELECT state, fence FROM idempotency_records WHERE id = ?1 AND ",
        storage::live_until!(),
        " > ?2"
    ))?
    .query_row(params![&id[..], now], |r| Ok((r.get(0)?, r.get(1)?)))
    .optional()
    .map_err(column_error)
}

fn in_transaction<T>(conn: &Connection, f: impl FnOnce() -> Result<T>) -> Result<T> {
    storage::begin(conn)?;
    match f() {
        Ok(answer) => {
            if let Err(e) = storage::commit(conn) {
                storage::rollback(conn);
                return Err(e);
            }
            Ok(answer)
        }
        Err(e) => {
            storage::rollback(conn);
            Err(e)
        }
    }
}
