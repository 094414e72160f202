//! The writer's PostgreSQL side. A batch is one transaction of set-based statements (arrays
//! and `unnest`), sent pipelined: `BEGIN`, the lease commands, the claims and `COMMIT` leave
//! in one write and come back in one round trip. Every statement is unnamed (no prepared
//! statement outlives it, no session state), so PgBouncer's transaction mode is fine.
//!
//! Times are the database's: every lock and expiry is computed and compared in SQL from the
//! server's clock (`clock_timestamp()`, read after any wait for a lock), and only translated to
//! the engine's clock (by the offset measured with each batch) in what the callers are told.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::cache::Completed;
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::postgres::connect::{Target, pg_error};
use crate::postgres::schema::Names;
use crate::record::{Decision, RawRecord, STATE_COMPLETED};
use crate::response::encode_headers;
use crate::writer::{Backend, ClaimCmd, Done, Work};

/// The first pause before reconnecting after a lost connection; it doubles up to
/// [`MAX_BACKOFF`] while connecting keeps failing. Meanwhile every batch fails at once with
/// [`Error::Unavailable`]: nobody waits for a server that is not there.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The longest a cleanup transaction should hold the writer.
const CLEANUP_SLICE: Duration = Duration::from_millis(20);

/// The statements, with the configured table's names in them.
struct Sql {
    begin: String,
    lock: Stmt,
    complete: Stmt,
    release: Stmt,
    extend: Stmt,
    claim: Stmt,
    cleanup: Stmt,
    /// The fencing token and state of these records (see [`PgBackend::after_unknown`]).
    records_of: Stmt,
}

/// A statement of the hot path: its text (with the configured table's names in it) and its
/// parameter types.
pub(crate) struct Stmt {
    sql: String,
    types: Vec<Type>,
}

impl Stmt {
    pub(crate) fn new(sql: String, types: &[Type]) -> Stmt {
        Stmt {
            sql,
            types: types.to_vec(),
        }
    }
}

/// Runs `stmt` as an unnamed statement: parsed and planned at every execution, nothing left
/// on the connection (which any pooler accepts). Named prepared statements were measured and
/// left out: see BENCHMARKS.md, "Prepared statements: tried, slower".
pub(crate) async fn query(
    client: &Client,
    stmt: &Stmt,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    debug_assert!(
        params.iter().map(|(_, t)| t).eq(stmt.types.iter()),
        "the parameters do not match the statement's"
    );
    client.query_typed(&stmt.sql, params).await
}

/// The database's clock in ms since the epoch (`clock_timestamp()`, the time when it is read,
/// not when the transaction started: a statement that waited for a lock must not grant a lease
/// whose lock already ran out while it waited), or the test clock's (`$n`).
pub(crate) fn now_ms(param: usize) -> String {
    format!("coalesce(${param}::int8, (extract(epoch from clock_timestamp()) * 1000)::int8)")
}

impl Sql {
    /// `synchronous_commit`: what this engine's transactions set (`None`: the server's).
    fn new(names: &Names, statement_timeout: Duration, synchronous_commit: Option<&str>) -> Sql {
        use Type as T;
        let t = &names.records;
        let columns = RECORD_COLUMNS;
        Sql {
            // Every statement has an index path; a plan made on statistics gathered while the
            // table was new and empty must not scan the whole table once it has grown.
            begin: format!(
                "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL statement_timeout = {};
                 SET LOCAL enable_seqscan = off{}",
                statement_timeout.as_millis().max(1),
                match synchronous_commit {
                    Some(mode) => format!("; SET LOCAL synchronous_commit = {mode}"),
                    None => String::new(),
                }
            ),
            lock: Stmt::new(
                format!("SELECT 1 FROM {t} WHERE id = ANY($1::bytea[]) ORDER BY id FOR UPDATE"),
                &[T::BYTEA_ARRAY],
            ),
            records_of: Stmt::new(
                format!("SELECT id, fence, state FROM {t} WHERE id = ANY($1::bytea[])"),
                &[T::BYTEA_ARRAY],
            ),
            complete: Stmt::new(
                format!(
                    "UPDATE {t} AS r SET state = 1, status = i.status, headers = i.headers,
                     body = i.body, trailers = i.trailers, completed_at = n.ms,
                     expires_at = n.ms + i.retention_ms, locked_until = 0
                 FROM unnest($1::bytea[], $2::int8[], $3::int4[], $4::bytea[], $5::bytea[],
                             $6::bytea[], $7::int8[])
                          AS i(id, fence, status, headers, body, trailers, retention_ms),
                      (SELECT {now} AS ms) AS n
                 WHERE r.id = i.id AND r.fence = i.fence AND r.state = 0
                 RETURNING r.id, r.fence",
                    now = now_ms(8)
                ),
                &[
                    T::BYTEA_ARRAY,
                    T::INT8_ARRAY,
                    T::INT4_ARRAY,
                    T::BYTEA_ARRAY,
                    T::BYTEA_ARRAY,
                    T::BYTEA_ARRAY,
                    T::INT8_ARRAY,
                    T::INT8,
                ],
            ),
            release: Stmt::new(
                format!(
                    "DELETE FROM {t} AS r USING unnest($1::bytea[], $2::int8[]) AS i(id, fence)
                 WHERE r.id = i.id AND r.fence = i.fence AND r.state = 0
                 RETURNING r.id, r.fence"
                ),
                &[T::BYTEA_ARRAY, T::INT8_ARRAY],
            ),
            extend: Stmt::new(
                format!(
                    "UPDATE {t} AS r SET locked_until = n.ms + i.lock_ms,
                     expires_at = greatest(r.expires_at, n.ms + i.lock_ms + i.retention_ms)
                 FROM unnest($1::bytea[], $2::int8[], $3::int8[], $4::int8[])
                          AS i(id, fence, lock_ms, retention_ms),
                      (SELECT {now} AS ms) AS n
                 WHERE r.id = i.id AND r.fence = i.fence AND r.state = 0
                 RETURNING r.id, r.fence, r.locked_until, n.ms",
                    now = now_ms(5)
                ),
                &[
                    T::BYTEA_ARRAY,
                    T::INT8_ARRAY,
                    T::INT8_ARRAY,
                    T::INT8_ARRAY,
                    T::INT8,
                ],
            ),
            // Rows are inserted in id order, so two instances' batches take their locks in
            // the same order. A record is taken over when it has expired, or is in flight with
            // the same fingerprint past its lock timeout: decided, and the new lock computed,
            // on the clock read after the row is locked. The second half reads, in the
            // statement's snapshot, the records that kept a claim out (the insert did not
            // change them). Every row also says the clock when it was produced (after any wait
            // for a lock), for the translation into the engine's clock.
            claim: Stmt::new(
                format!(
                    "WITH n AS (SELECT {now} AS ms),
                 i AS (SELECT t.*, {now} AS c
                       FROM unnest($1::bytea[], $2::text[], $3::text[], $4::bytea[],
                                   $5::int8[], $6::int8[])
                           AS t(id, scope, key, fingerprint, lock_ms, retention_ms)),
                 won AS (
                     INSERT INTO {t} AS r (id, scope, key, fingerprint, state, fence,
                                           locked_until, expires_at, created_at)
                     SELECT i.id, i.scope, i.key, i.fingerprint, 0, nextval('{fence}'),
                            i.c + i.lock_ms, i.c + i.lock_ms + i.retention_ms, i.c
                     FROM i ORDER BY i.id
                     ON CONFLICT (id) DO UPDATE SET
                         scope = excluded.scope, key = excluded.key,
                         fingerprint = excluded.fingerprint, state = 0, fence = excluded.fence,
                         locked_until = {now} + (excluded.locked_until - excluded.created_at),
                         expires_at = {now} + (excluded.expires_at - excluded.created_at),
                         created_at = {now}, completed_at = NULL, status = NULL,
                         headers = NULL, body = NULL, trailers = NULL
                     WHERE r.expires_at <= {now}
                        OR (r.state = 0 AND r.locked_until <= {now}
                            AND r.fingerprint = excluded.fingerprint)
                     RETURNING r.id, r.fence, r.locked_until)
                 SELECT w.id, w.fence, w.locked_until, NULL::bytea, NULL::int2, NULL::int4,
                        NULL::bytea, NULL::bytea, NULL::bytea, NULL::int8, {now}
                 FROM won AS w
                 UNION ALL
                 SELECT r.id, NULL::int8, {columns}, {now}
                 FROM {t} AS r JOIN i ON r.id = i.id, n
                 WHERE r.expires_at > n.ms AND r.id NOT IN (SELECT id FROM won)",
                    now = now_ms(7),
                    fence = names.fence.replace('\'', "''"),
                ),
                &[
                    T::BYTEA_ARRAY,
                    T::TEXT_ARRAY,
                    T::TEXT_ARRAY,
                    T::BYTEA_ARRAY,
                    T::INT8_ARRAY,
                    T::INT8_ARRAY,
                    T::INT8,
                ],
            ),
            // One instance at a time (a transaction-level advisory lock: nothing outlives the
            // transaction), the oldest first, skipping rows another transaction holds.
            cleanup: Stmt::new(
                format!(
                    "WITH l AS (SELECT pg_try_advisory_xact_lock($1) AS got),
                 doomed AS (
                     SELECT r.id FROM {t} AS r
                     WHERE (SELECT got FROM l) AND r.expires_at <= {now}
                     ORDER BY r.expires_at LIMIT $2
                     FOR UPDATE OF r SKIP LOCKED),
                 d AS (DELETE FROM {t} AS r USING doomed WHERE r.id = doomed.id RETURNING 1)
                 SELECT (SELECT got FROM l), count(*) FROM d",
                    now = now_ms(3)
                ),
                &[T::INT8, T::INT8, T::INT8],
            ),
        }
    }
}

/// The PostgreSQL writer backend (see the module docs).
pub(crate) struct PgBackend {
    link: Link,
    /// Set when an exchange that otherwise succeeded left the connection unusable (a claim
    /// re-run that got no answer in time): the connection is dropped after it.
    poisoned: std::cell::Cell<bool>,
    names: Names,
    sql: Sql,
    clock: Arc<dyn Clock>,
    db_clock: Option<Arc<dyn Clock>>,
}

/// One connection to the server, with its runtime, and the reconnection after it is lost
/// (with a backoff). The writer has one; so has each read connection.
pub(crate) struct Link {
    client: Option<Client>,
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) target: Target,
    connector: MakeRustlsConnect,
    /// How long an exchange may take before the connection is given up (the statement
    /// timeout, plus a second for the network).
    pub(crate) deadline: Duration,
    backoff: Duration,
    next_attempt: Instant,
    /// Why the last connection attempt failed, for the exchanges refused meanwhile.
    down: Option<Error>,
}

impl Link {
    /// A link, connected (`client`) or not yet (it connects at its first exchange).
    pub(crate) fn new(
        client: Option<Client>,
        rt: tokio::runtime::Runtime,
        target: Target,
        connector: MakeRustlsConnect,
        statement_timeout: Duration,
    ) -> Link {
        Link {
            client,
            rt,
            target,
            connector,
            deadline: statement_timeout + Duration::from_secs(1),
            backoff: MIN_BACKOFF,
            next_attempt: Instant::now(),
            down: None,
        }
    }

    /// Takes the connection for one exchange, reconnecting when it was lost and the backoff
    /// has passed. Give it back with [`Link::give_back`].
    pub(crate) fn take_client(&mut self) -> Result<Client> {
        if let Some(client) = self.client.take()
            && !client.is_closed()
        {
            return Ok(client);
        }
        if Instant::now() < self.next_attempt
            && let Some(down) = &self.down
        {
            return Err(down.clone());
        }
        let attempt = within(
            &self.rt,
            self.deadline,
            connect(&self.target, &self.connector),
        );
        match attempt {
            Ok(Ok(client)) => {
                self.backoff = MIN_BACKOFF;
                self.down = None;
                Ok(client)
            }
            failed => {
                let e = match failed {
                    Ok(Err(e)) => pg_error(e, &self.target.shown),
                    _ => Error::Unavailable {
                        detail: format!(
                            "{}: no connection within {:?}",
                            self.target.shown, self.deadline
                        ),
                    },
                };
                self.next_attempt = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                self.down = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Ends an exchange whose connection was already given up.
    pub(crate) fn give_back_none<T>(&mut self, out: Result<T, Fail>) -> Result<T> {
        out.map_err(|f| self.fail_error(f))
    }

    /// The callers' error for a failed exchange.
    pub(crate) fn fail_error(&self, f: Fail) -> Error {
        match f {
            Fail::Pg(e) | Fail::RolledBack(e) => pg_error(e, &self.target.shown),
            Fail::Timeout(what) => Error::Unavailable {
                detail: format!(
                    "{}: {what} got no answer within {:?}; its outcome is unknown",
                    self.target.shown, self.deadline
                ),
            },
            Fail::Other(e) => e,
        }
    }

    /// Ends an exchange: keeps the connection unless it is gone or did not answer in time
    /// (then the server rolls back whatever it was doing when it notices), and turns the
    /// failure into the callers' error.
    pub(crate) fn give_back<T>(&mut self, client: Client, out: Result<T, Fail>) -> Result<T> {
        let keep = !client.is_closed() && !matches!(out, Err(Fail::Timeout(_)));
        if keep {
            self.client = Some(client);
        }
        out.map_err(|f| self.fail_error(f))
    }
}

/// Runs `f` on the runtime for at most `limit`.
pub(crate) fn within<F: std::future::Future>(
    rt: &tokio::runtime::Runtime,
    limit: Duration,
    f: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    rt.block_on(async move { tokio::time::timeout(limit, f).await })
}

/// Connects and hands the connection's I/O to the runtime.
pub(crate) async fn connect(
    target: &Target,
    connector: &MakeRustlsConnect,
) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = target.config.connect(connector.clone()).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

impl PgBackend {
    pub(crate) fn new(
        link: Link,
        names: Names,
        statement_timeout: Duration,
        synchronous_commit: Option<&str>,
        clock: Arc<dyn Clock>,
        db_clock: Option<Arc<dyn Clock>>,
    ) -> PgBackend {
        PgBackend {
            sql: Sql::new(&names, statement_timeout, synchronous_commit),
            link,
            poisoned: std::cell::Cell::new(false),
            names,
            clock,
            db_clock,
        }
    }

    fn test_now(&self) -> Option<i64> {
        self.db_clock.as_ref().map(|c| c.now_ms())
    }
}

/// The claims of a batch, once per record id (a second claim of the same id in one batch is
/// decided from the first one's result, as if it came right after it).
struct Claims<'a> {
    /// (work index, claim), the first claim of each id, sorted by id.
    first: Vec<(usize, &'a ClaimCmd)>,
    /// Later claims of an id: (work index, index into `first`).
    repeats: Vec<(usize, usize)>,
}

impl<'a> Claims<'a> {
    fn of(work: &[Work<'a>]) -> Claims<'a> {
        let mut first: Vec<(usize, &ClaimCmd)> = Vec::new();
        let mut seen: HashMap<[u8; 32], usize> = HashMap::new();
        let mut repeats = Vec::new();
        for (i, w) in work.iter().enumerate() {
            if let Work::Claim(c) = w {
                match seen.get(&c.id) {
                    Some(&f) => repeats.push((i, f)),
                    None => {
                        seen.insert(c.id, first.len());
                        first.push((i, c));
                    }
                }
            }
        }
        // Sort by id, keeping `repeats` pointing at the right entries.
        let mut order: Vec<usize> = (0..first.len()).collect();
        order.sort_by_key(|&k| first[k].1.id);
        let mut position = vec![0; first.len()];
        for (new, &old) in order.iter().enumerate() {
            position[old] = new;
        }
        let first = order.iter().map(|&k| first[k]).collect();
        for r in &mut repeats {
            r.1 = position[r.1];
        }
        Claims { first, repeats }
    }
}

/// A record row as the claim and read statements return it.
#[derive(Clone)]
pub(crate) struct RecordRow {
    raw: RawRecord,
    expires_at: i64,
}

pub(crate) enum ClaimRow {
    Won { fence: i64, locked_until: i64 },
    Found(RecordRow),
}

fn corrupt(e: impl std::fmt::Display) -> Error {
    Error::Corrupt {
        detail: e.to_string(),
    }
}

/// The columns of a record as [`claim_row`] reads them, after the id and the fence: the claim
/// statement's, the read connections' (`r` the record, `{now}` the database's clock).
pub(crate) const RECORD_COLUMNS: &str =
    "r.locked_until, r.fingerprint, r.state, r.status, r.headers, r.body, r.trailers, r.expires_at";

/// Reads a row of the claim or read statement: (id, fence, locked_until, fingerprint, state,
/// status, headers, body, trailers, expires_at, now).
pub(crate) fn claim_row(row: &Row) -> Result<([u8; 32], ClaimRow, i64)> {
    let id: &[u8] = row.try_get(0).map_err(corrupt)?;
    let id: [u8; 32] = id
        .try_into()
        .map_err(|_| corrupt(format!("record id of {} bytes", id.len())))?;
    let now: i64 = row.try_get(10).map_err(corrupt)?;
    let locked_until: i64 = row.try_get(2).map_err(corrupt)?;
    if let Some(fence) = row.try_get::<_, Option<i64>>(1).map_err(corrupt)? {
        return Ok((
            id,
            ClaimRow::Won {
                fence,
                locked_until,
            },
            now,
        ));
    }
    let raw = RawRecord {
        fingerprint: row.try_get(3).map_err(corrupt)?,
        state: i64::from(row.try_get::<_, i16>(4).map_err(corrupt)?),
        locked_until,
        status: row
            .try_get::<_, Option<i32>>(5)
            .map_err(corrupt)?
            .map(i64::from),
        headers: row.try_get(6).map_err(corrupt)?,
        body: row.try_get(7).map_err(corrupt)?,
        trailers: row.try_get(8).map_err(corrupt)?,
    };
    let expires_at: i64 = row.try_get(9).map_err(corrupt)?;
    Ok((id, ClaimRow::Found(RecordRow { raw, expires_at }), now))
}

/// How database times become the engine clock's: the offset between the two clocks seen by one
/// batch, bounded by the engine's clock read before the batch was sent (`early`: translated
/// times err early) and after its answer came (`late`: they err late by at most the answer's
/// trip).
#[derive(Clone, Copy)]
pub(crate) struct Offsets {
    pub(crate) early: i64,
    pub(crate) late: i64,
    /// The monotonic clock read before the batch was sent, and the database's now then (at
    /// the latest): a cached replay's deadline, immune to steps of the wall clock.
    pub(crate) sent: Instant,
    pub(crate) db_now: i64,
}

/// A live completed record as the replay cache keeps it: its expiry translated early, and a
/// monotonic deadline, so that the cache never outlives the record on the server.
pub(crate) fn completed(record: RecordRow, offsets: Offsets) -> Result<Completed> {
    let RecordRow { raw, expires_at } = record;
    let left = u64::try_from(expires_at.saturating_sub(offsets.db_now)).unwrap_or(0);
    Ok(Completed {
        fingerprint: raw.fingerprint()?,
        expires_at: expires_at.saturating_add(offsets.early),
        response: Arc::new(raw.into_response()?),
        deadline: offsets
            .sent
            .checked_add(Duration::from_millis(left.min(MAX_SPAN_MS as u64))),
    })
}

/// What a claim with `fp` gets from a live record that kept it out. An expiry (for the replay
/// cache) is translated early, so the cache never outlives the record; a lock (for hints) late.
fn decide(record: RecordRow, fp: &Fingerprint, offsets: Offsets) -> Result<Done> {
    if record.raw.state == STATE_COMPLETED && record.raw.fingerprint()? == *fp.as_bytes() {
        // A completed record never changes before it expires: the engine may cache it.
        return Ok(Done::Replay(completed(record, offsets)?));
    }
    let mut raw = record.raw;
    raw.locked_until = raw.locked_until.saturating_add(offsets.late);
    Ok(Done::Decided(raw.decide(fp)?))
}

/// The leases a lease statement found, by (record id, fencing token), with the lock time
/// left (extensions only).
type Fenced = HashMap<([u8; 32], i64), Option<i64>>;

fn fenced(rows: &[Row]) -> Result<Fenced> {
    rows.iter()
        .map(|row| {
            let id: &[u8] = row.try_get(0).map_err(corrupt)?;
            let id: [u8; 32] = id.try_into().map_err(corrupt)?;
            let fence: i64 = row.try_get(1).map_err(corrupt)?;
            // Extensions also return the new lock and the database's now.
            let until = match row.len() {
                4 => {
                    let until: i64 = row.try_get(2).map_err(corrupt)?;
                    let now: i64 = row.try_get(3).map_err(corrupt)?;
                    Some(until - now)
                }
                _ => None,
            };
            Ok(((id, fence), until))
        })
        .collect()
}

/// The longest lock or retention sent to the database (about 35,000 years): `now + lock +
/// retention` then always fits a `bigint`, where an overflow would fail the whole batch.
const MAX_SPAN_MS: i64 = 1 << 50;

fn span(ms: i64) -> i64 {
    ms.clamp(0, MAX_SPAN_MS)
}

fn fence_i64(fence: u64) -> i64 {
    i64::try_from(fence).unwrap_or(i64::MAX)
}

impl Backend for PgBackend {
    fn run(&mut self, work: &[Work<'_>]) -> Result<Vec<Result<Done>>> {
        let mut retries = 0;
        loop {
            let client = self.link.take_client()?;
            let out = self.exchange(&client, work);
            // No answer, or not one that says what happened: whether the batch committed is
            // unknown. Its claims fail with that (their callers have not started anything);
            // its lease commands are run again on a new connection and their records looked
            // at, rather than leaving completions whose operation ran "unknown", their keys
            // held until the lock times out and the operation then run again.
            if matches!(out, Err(Fail::Pg(_) | Fail::Timeout(_)))
                && work.iter().any(|w| !matches!(w, Work::Claim(_)))
            {
                drop(client);
                self.poisoned.take();
                let Err(fail) = out else {
                    unreachable!("matched as an error just above")
                };
                let error = self.link.fail_error(fail);
                return Ok(self.after_unknown(work, &error));
            }
            match &out {
                // Rolled back, and worth running again: a deadlock or serialization failure
                // (PostgreSQL chose this batch as the victim), or a connection the server had
                // already closed (an idle timeout, a terminated backend) before it read the
                // batch. The next attempt reconnects if need be.
                Err(Fail::RolledBack(e)) if retries < RETRIES && again(e) => {
                    retries += 1;
                    if lost_connection(e) {
                        drop(client);
                    } else {
                        let _ = self.link.give_back(client, Ok::<(), Fail>(()));
                    }
                }
                // Rolled back by one command's own failure (a value the database refuses):
                // each command again in a transaction of its own, so that only that one's
                // caller gets the error, as on SQLite.
                Err(Fail::RolledBack(e)) if work.len() > 1 && alone(e) => {
                    let _ = self.link.give_back(client, Ok::<(), Fail>(()));
                    return Ok(work
                        .iter()
                        .map(|w| {
                            self.run(std::slice::from_ref(w))
                                .and_then(|mut r| r.pop().unwrap_or(Err(Error::Busy)))
                        })
                        .collect());
                }
                _ => return self.end_exchange(client, out),
            }
        }
    }

    fn delete_expired(&mut self, limit: usize) -> Result<usize> {
        let client = self.link.take_client()?;
        let out = self.cleanup(&client, limit);
        self.link.give_back(client, out)
    }

    fn cleanup_slice(&self) -> Duration {
        CLEANUP_SLICE
    }

    fn admin(&mut self, op: &crate::admin::Op) -> Result<crate::admin::Answer> {
        let client = self.link.take_client()?;
        let test_now = self.test_now();
        let shown = self.link.target.shown.clone();
        let out = within(
            &self.link.rt,
            self.link.deadline,
            crate::postgres::admin::run(&client, &self.names, op, test_now, &shown),
        );
        match out {
            Ok(answer) => {
                let _ = self.link.give_back(client, Ok::<(), Fail>(()));
                answer
            }
            Err(_) => self.link.give_back(
                client,
                Err::<crate::admin::Answer, _>(Fail::Timeout("an operator's request")),
            ),
        }
    }
}

/// How often a batch that was rolled back for a reason worth a retry runs again.
const RETRIES: u32 = 3;

/// Whether a batch rolled back with `e` is worth running again as it is.
fn again(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState as S;
    e.code().is_some_and(|c| {
        *c == S::T_R_DEADLOCK_DETECTED
            || *c == S::T_R_SERIALIZATION_FAILURE
            || *c == S::ADMIN_SHUTDOWN
            || *c == S::IDLE_SESSION_TIMEOUT
            || c.code().starts_with("08")
    })
}

/// Whether the server ended the session with `e` (the next attempt needs a new connection).
fn lost_connection(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState as S;
    e.code().is_some_and(|c| {
        *c == S::ADMIN_SHUTDOWN || *c == S::IDLE_SESSION_TIMEOUT || c.code().starts_with("08")
    })
}

/// Whether `e` is the failure of one command's values, which the batch's other commands do
/// not share: data exceptions (22: an encoding the database cannot hold, a value out of
/// range), integrity violations (23), limits (54: a value too large).
fn alone(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        ["22", "23", "54"]
            .iter()
            .any(|class| c.code().starts_with(class))
    })
}

/// Why an exchange failed.
pub(crate) enum Fail {
    /// No answer, or an answer that does not say what happened: the outcome is unknown.
    Pg(tokio_postgres::Error),
    /// The server refused a statement before `COMMIT`: the transaction was rolled back whole,
    /// nothing of it is applied.
    RolledBack(tokio_postgres::Error),
    Timeout(&'static str),
    Other(Error),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Other(e)
    }
}

/// The lease commands of a batch as the statements' arrays.
#[derive(Default)]
struct Leases<'a> {
    complete_ids: Vec<&'a [u8]>,
    complete_fences: Vec<i64>,
    statuses: Vec<i32>,
    headers: Vec<Vec<u8>>,
    bodies: Vec<&'a [u8]>,
    trailers: Vec<Option<Vec<u8>>>,
    complete_retentions: Vec<i64>,
    release_ids: Vec<&'a [u8]>,
    release_fences: Vec<i64>,
    extend_ids: Vec<&'a [u8]>,
    extend_fences: Vec<i64>,
    extend_locks: Vec<i64>,
    extend_retentions: Vec<i64>,
    /// Every record id the batch touches, sorted: locked first, in this order.
    touched: Vec<&'a [u8]>,
}

impl<'a> Leases<'a> {
    fn of(work: &[Work<'a>]) -> Leases<'a> {
        let mut l = Leases::default();
        for w in work {
            match *w {
                Work::Complete {
                    id,
                    fence,
                    response,
                    retention_ms,
                    row: _,
                } => {
                    l.complete_ids.push(&id[..]);
                    l.complete_fences.push(fence_i64(fence));
                    l.statuses.push(i32::from(response.status));
                    l.headers.push(encode_headers(&response.headers));
                    l.bodies.push(&response.body[..]);
                    l.trailers
                        .push(response.trailers.as_ref().map(encode_headers));
                    l.complete_retentions.push(span(retention_ms));
                    l.touched.push(&id[..]);
                }
                Work::Release { id, fence } => {
                    l.release_ids.push(&id[..]);
                    l.release_fences.push(fence_i64(fence));
                    l.touched.push(&id[..]);
                }
                Work::Extend {
                    id,
                    fence,
                    lock_ms,
                    retention_ms,
                } => {
                    l.extend_ids.push(&id[..]);
                    l.extend_fences.push(fence_i64(fence));
                    l.extend_locks.push(span(lock_ms));
                    l.extend_retentions.push(span(retention_ms));
                    l.touched.push(&id[..]);
                }
                Work::Claim(_) => {}
            }
        }
        l
    }
}

/// Claims as the claim statement's arrays.
struct ClaimArrays<'a> {
    ids: Vec<&'a [u8]>,
    scopes: Vec<&'a str>,
    keys: Vec<&'a str>,
    fingerprints: Vec<&'a [u8]>,
    locks: Vec<i64>,
    retentions: Vec<i64>,
}

impl<'a> ClaimArrays<'a> {
    fn of(claims: &[&'a ClaimCmd]) -> ClaimArrays<'a> {
        ClaimArrays {
            ids: claims.iter().map(|c| &c.id[..]).collect(),
            scopes: claims.iter().map(|c| c.scope.as_str()).collect(),
            keys: claims.iter().map(|c| c.key.as_str()).collect(),
            fingerprints: claims
                .iter()
                .map(|c| &c.fingerprint.as_bytes()[..])
                .collect(),
            locks: claims.iter().map(|c| span(c.lock_ms)).collect(),
            retentions: claims.iter().map(|c| span(c.retention_ms)).collect(),
        }
    }
}

/// What one transaction's statements returned.
struct Answers {
    completed: Vec<Row>,
    released: Vec<Row>,
    extended: Vec<Row>,
    claimed: Vec<Row>,
}

/// How many times a claim whose blocking record could not be read back is run again (in a
/// transaction of its own) before its caller gets [`Error::Busy`].
const CLAIM_ROUNDS: usize = 3;

impl PgBackend {
    /// One transaction: `BEGIN`, the lease statements, the claim statement and `COMMIT`,
    /// pipelined (sent together, answered together: one round trip).
    fn transaction(
        &self,
        client: &Client,
        leases: &Leases<'_>,
        claims: &ClaimArrays<'_>,
        test_now: Option<i64>,
    ) -> Result<Answers, Fail> {
        let sql = &self.sql;
        let l = leases;
        // The rows lease commands touch are locked first, in id order, when there are several:
        // the lease statements' joins take them in no particular order, and two instances'
        // batches must not wait for each other in a cycle over them. (A cycle through claims,
        // or through rows that did not exist yet, can still form: PostgreSQL breaks it, and the
        // victim batch, rolled back whole, runs again.) Fresh claims' ids are not looked up:
        // their rows do not exist.
        let mut touched = l.touched.clone();
        touched.sort_unstable();
        touched.dedup();
        if touched.len() < 2 {
            touched.clear();
        }
        let exchange = async {
            let begin = client.batch_execute(&sql.begin);
            let lock = async {
                if touched.is_empty() {
                    return Ok(Vec::new());
                }
                query(client, &sql.lock, &[(&touched, Type::BYTEA_ARRAY)]).await
            };
            let completed = async {
                if l.complete_ids.is_empty() {
                    return Ok(Vec::new());
                }
                query(
                    client,
                    &sql.complete,
                    &[
                        (&l.complete_ids, Type::BYTEA_ARRAY),
                        (&l.complete_fences, Type::INT8_ARRAY),
                        (&l.statuses, Type::INT4_ARRAY),
                        (&l.headers, Type::BYTEA_ARRAY),
                        (&l.bodies, Type::BYTEA_ARRAY),
                        (&l.trailers, Type::BYTEA_ARRAY),
                        (&l.complete_retentions, Type::INT8_ARRAY),
                        (&test_now, Type::INT8),
                    ],
                )
                .await
            };
            let released = async {
                if l.release_ids.is_empty() {
                    return Ok(Vec::new());
                }
                query(
                    client,
                    &sql.release,
                    &[
                        (&l.release_ids, Type::BYTEA_ARRAY),
                        (&l.release_fences, Type::INT8_ARRAY),
                    ],
                )
                .await
            };
            let extended = async {
                if l.extend_ids.is_empty() {
                    return Ok(Vec::new());
                }
                query(
                    client,
                    &sql.extend,
                    &[
                        (&l.extend_ids, Type::BYTEA_ARRAY),
                        (&l.extend_fences, Type::INT8_ARRAY),
                        (&l.extend_locks, Type::INT8_ARRAY),
                        (&l.extend_retentions, Type::INT8_ARRAY),
                        (&test_now, Type::INT8),
                    ],
                )
                .await
            };
            let claimed = async {
                if claims.ids.is_empty() {
                    return Ok(Vec::new());
                }
                let params: [(&(dyn ToSql + Sync), Type); 7] = [
                    (&claims.ids, Type::BYTEA_ARRAY),
                    (&claims.scopes, Type::TEXT_ARRAY),
                    (&claims.keys, Type::TEXT_ARRAY),
                    (&claims.fingerprints, Type::BYTEA_ARRAY),
                    (&claims.locks, Type::INT8_ARRAY),
                    (&claims.retentions, Type::INT8_ARRAY),
                    (&test_now, Type::INT8),
                ];
                query(client, &sql.claim, &params).await
            };
            let commit = client.batch_execute("COMMIT");
            // `biased`: polled (so sent) in this order, all before the first answer.
            tokio::join!(
                biased;
                begin, lock, completed, released, extended, claimed, commit
            )
        };
        let Ok((begin, lock, completed, released, extended, claimed, commit)) =
            within(&self.link.rt, self.link.deadline, exchange)
        else {
            return Err(Fail::Timeout("a batch"));
        };
        // The first error is the cause; the statements after it only say the transaction was
        // aborted. An error the server sent for a statement before `COMMIT` means the whole
        // transaction was rolled back (the `COMMIT` of an aborted transaction rolls it back);
        // no answer at all leaves the outcome unknown.
        //
        // Only an `ERROR` is the server's own verdict on a statement. A `FATAL` may come from a
        // pooler in between (PgBouncer's `query_timeout` sends `08P01` and closes) while the
        // server still holds the pipeline, `COMMIT` included, and may commit it: unknown. A
        // `FATAL` answering `BEGIN` is the exception: nothing of the batch ran (the server had
        // closed the idle session, or the pooler never found it a server connection).
        let before_commit = |e: tokio_postgres::Error| match e.as_db_error() {
            Some(db) if db.severity() == "ERROR" => Fail::RolledBack(e),
            _ => Fail::Pg(e),
        };
        begin.map_err(|e| match e.as_db_error() {
            Some(_) => Fail::RolledBack(e),
            None => Fail::Pg(e),
        })?;
        lock.map_err(before_commit)?;
        let answers = Answers {
            completed: completed.map_err(before_commit)?,
            released: released.map_err(before_commit)?,
            extended: extended.map_err(before_commit)?,
            claimed: claimed.map_err(before_commit)?,
        };
        // An error for `COMMIT` itself is not proof of a rollback (a commit that waited for a
        // synchronous standby can be cancelled after it was written locally): unknown.
        commit.map_err(Fail::Pg)?;
        Ok(answers)
    }

    /// Ends an exchange on `client`: the connection is given up when a claim round timed out
    /// on it (`poisoned`), otherwise as [`Link::give_back`] decides.
    fn end_exchange<T>(&mut self, client: Client, out: Result<T, Fail>) -> Result<T> {
        if self.poisoned.take() {
            drop(client);
            return self.link.give_back_none(out);
        }
        self.link.give_back(client, out)
    }

    /// The batch `work` ended without an answer saying whether it committed (`error`): its
    /// claims get `error`; its lease commands run again, in a transaction of their own on a
    /// new connection. They are fenced, so running one twice changes nothing the first run did
    /// not. One that finds its record no longer in flight under its token is then looked at
    /// ([`PgBackend::settle_again`]): a completion whose record is completed under its own
    /// fencing token, which only its lease can have written, is done; a release whose record
    /// is gone is done. If the first transaction is still running on the server (a pooler lost
    /// the connection, not the server), the new one waits for its row locks and then sees what
    /// it did. Whatever cannot be settled this way (no connection, no answer again, a release
    /// whose record another claim has taken since) keeps `error`.
    fn after_unknown(&mut self, work: &[Work<'_>], error: &Error) -> Vec<Result<Done>> {
        let leases: Vec<Work<'_>> = work
            .iter()
            .copied()
            .filter(|w| !matches!(w, Work::Claim(_)))
            .collect();
        let settled = self.link.take_client().and_then(|client| {
            let out = self.exchange(&client, &leases).and_then(|mut results| {
                self.settle_again(&client, &leases, &mut results, error)?;
                Ok(results)
            });
            self.end_exchange(client, out)
        });
        tracing::warn!(
            error = %error,
            settled = settled.is_ok(),
            "idempotency: a batch's outcome was unknown; its lease commands were run again"
        );
        let mut settled = match settled {
            Ok(results) => results.into_iter(),
            Err(_) => Vec::new().into_iter(),
        };
        work.iter()
            .map(|w| match w {
                Work::Claim(_) => Err(error.clone()),
                _ => settled.next().unwrap_or_else(|| Err(error.clone())),
            })
            .collect()
    }

    /// After running `leases` again, those that found their record no longer in flight under
    /// their token: a completion is done if the record is completed under its token (the first
    /// run committed), otherwise its lease was lost; a release is done if the record is gone,
    /// and otherwise unknown (`error`): the first run may have deleted it and a claim created
    /// it anew since, or the lease may have been taken over; an extension's lease was lost.
    fn settle_again(
        &self,
        client: &Client,
        leases: &[Work<'_>],
        results: &mut [Result<Done>],
        error: &Error,
    ) -> Result<(), Fail> {
        let ids: Vec<&[u8]> = leases
            .iter()
            .zip(results.iter())
            .filter_map(|(w, r)| match (w, r) {
                (Work::Complete { id, .. } | Work::Release { id, .. }, Ok(Done::Owned(false))) => {
                    Some(&id[..])
                }
                _ => None,
            })
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let rows = within(
            &self.link.rt,
            self.link.deadline,
            query(client, &self.sql.records_of, &[(&ids, Type::BYTEA_ARRAY)]),
        )
        .map_err(|_| Fail::Timeout("a look at the records of a batch run again"))?
        .map_err(Fail::Pg)?;
        let mut found: HashMap<[u8; 32], (i64, i16)> = HashMap::with_capacity(rows.len());
        for row in &rows {
            let id: &[u8] = row.try_get(0).map_err(corrupt)?;
            let id: [u8; 32] = id.try_into().map_err(corrupt)?;
            let fence: i64 = row.try_get(1).map_err(corrupt)?;
            let state: i16 = row.try_get(2).map_err(corrupt)?;
            found.insert(id, (fence, state));
        }
        for (w, r) in leases.iter().zip(results.iter_mut()) {
            if !matches!(r, Ok(Done::Owned(false))) {
                continue;
            }
            match w {
                Work::Complete { id, fence, .. }
                    if found.get(*id) == Some(&(fence_i64(*fence), 1)) =>
                {
                    *r = Ok(Done::Owned(true));
                }
                Work::Release { id, .. } => {
                    *r = match found.contains_key(*id) {
                        false => Ok(Done::Owned(true)),
                        true => Err(error.clone()),
                    };
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// One batch: one transaction, one round trip (and a transaction of their own for
    /// claims whose blocking record another instance changed during the claim statement).
    fn exchange(&self, client: &Client, work: &[Work<'_>]) -> Result<Vec<Result<Done>>, Fail> {
        let test_now = self.test_now();
        let leases = Leases::of(work);
        let claims = Claims::of(work);
        let first: Vec<&ClaimCmd> = claims.first.iter().map(|(_, c)| *c).collect();
        let local_before = self.clock.now_ms();
        let sent = Instant::now();
        let answers = self.transaction(client, &leases, &ClaimArrays::of(&first), test_now)?;
        let local_now = self.clock.now_ms();

        let completed = fenced(&answers.completed)?;
        let released = fenced(&answers.released)?;
        let extended = fenced(&answers.extended)?;
        let mut found: HashMap<[u8; 32], ClaimRow> = HashMap::with_capacity(first.len());
        let mut db_now = None;
        for row in &answers.claimed {
            let (id, r, now) = claim_row(row)?;
            db_now = db_now.max(Some(now));
            found.insert(id, r);
        }
        // A record that kept a claim out but was committed after the claim statement's
        // snapshot (by another instance) cannot be read in that snapshot; and it may be
        // released or expire right after. Such claims run again, in a transaction of their
        // own (the batch is committed by now), until they win or see what kept them out.
        let mut unread = None;
        for _ in 1..CLAIM_ROUNDS {
            let missing: Vec<&ClaimCmd> = first
                .iter()
                .copied()
                .filter(|c| !found.contains_key(&c.id))
                .collect();
            if missing.is_empty() {
                break;
            }
            match self.transaction(
                client,
                &Leases::default(),
                &ClaimArrays::of(&missing),
                test_now,
            ) {
                Ok(again) => {
                    for row in &again.claimed {
                        let (id, r, now) = claim_row(row)?;
                        db_now.get_or_insert(now);
                        found.insert(id, r);
                    }
                }
                Err(f) => {
                    if matches!(f, Fail::Timeout(_)) {
                        // Whatever that transaction is doing, this connection is given up.
                        self.poisoned.set(true);
                    }
                    unread = Some(self.link.fail_error(f));
                    break;
                }
            }
        }
        // Database times become the engine clock's by the offsets seen in this batch.
        let offsets = match db_now {
            Some(db) => Offsets {
                early: local_before - db,
                late: local_now - db,
                sent,
                db_now: db,
            },
            None => Offsets {
                early: 0,
                late: 0,
                sent,
                db_now: local_before,
            },
        };

        let mut results: Vec<Option<Result<Done>>> = (0..work.len()).map(|_| None).collect();
        // What each first claim of an id found, for the later claims of that id.
        let mut firsts: Vec<Option<(ClaimRow, Fingerprint)>> =
            Vec::with_capacity(claims.first.len());
        for (i, c) in &claims.first {
            let (r, first) = match found.remove(&c.id) {
                Some(ClaimRow::Won {
                    fence,
                    locked_until,
                }) => {
                    let locked_until = locked_until.saturating_add(offsets.late);
                    let fence = u64::try_from(fence).map_err(corrupt)?;
                    (
                        Ok(Done::Won {
                            fence,
                            locked_until,
                            row: None,
                        }),
                        Some(ClaimRow::Won {
                            fence: fence_i64(fence),
                            locked_until,
                        }),
                    )
                }
                Some(ClaimRow::Found(record)) => (
                    decide(record.clone(), &c.fingerprint, offsets),
                    Some(ClaimRow::Found(record)),
                ),
                None => match &unread {
                    Some(e) => (Err(e.clone()), None),
                    // Lost to others every time it ran: a retry soon succeeds.
                    None => (Err(Error::Busy), None),
                },
            };
            firsts.push(first.map(|f| (f, c.fingerprint)));
            results[*i] = Some(r);
        }
        for (i, f) in &claims.repeats {
            let Work::Claim(c) = &work[*i] else {
                continue;
            };
            let r = match &firsts[*f] {
                Some((ClaimRow::Won { locked_until, .. }, first_fp)) => {
                    Ok(Done::Decided(if c.fingerprint == *first_fp {
                        Decision::InFlight {
                            locked_until: *locked_until,
                        }
                    } else {
                        Decision::Mismatch
                    }))
                }
                Some((ClaimRow::Found(record), _)) => {
                    decide(record.clone(), &c.fingerprint, offsets)
                }
                None => match &results[claims.first[*f].0] {
                    Some(Err(e)) => Err(e.clone()),
                    _ => Err(Error::Busy),
                },
            };
            results[*i] = Some(r);
        }
        for (i, w) in work.iter().enumerate() {
            let r = match *w {
                Work::Complete { id, fence, .. } => Ok(Done::Owned(
                    completed.contains_key(&(*id, fence_i64(fence))),
                )),
                Work::Release { id, fence } => {
                    Ok(Done::Owned(released.contains_key(&(*id, fence_i64(fence)))))
                }
                Work::Extend { id, fence, .. } => Ok(Done::Until(
                    extended
                        .get(&(*id, fence_i64(fence)))
                        .map(|left| local_now.saturating_add(left.unwrap_or(0))),
                )),
                Work::Claim(_) => continue,
            };
            results[i] = Some(r);
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or(Err(Error::Busy)))
            .collect())
    }

    fn cleanup(&self, client: &Client, limit: usize) -> Result<usize, Fail> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let test_now = self.test_now();
        let sql = &self.sql;
        let key = self.names.cleanup_lock;
        let params: [(&(dyn ToSql + Sync), Type); 3] = [
            (&key, Type::INT8),
            (&limit, Type::INT8),
            (&test_now, Type::INT8),
        ];
        let exchange = async {
            let (begin, deleted, commit) = tokio::join!(
                biased;
                client.batch_execute(&sql.begin),
                query(client, &sql.cleanup, &params),
                client.batch_execute("COMMIT"),
            );
            let before_commit = |e: tokio_postgres::Error| match e.as_db_error() {
                Some(_) => Fail::RolledBack(e),
                None => Fail::Pg(e),
            };
            begin.map_err(before_commit)?;
            let rows = deleted.map_err(before_commit)?;
            commit.map_err(Fail::Pg)?;
            Ok::<_, Fail>(rows)
        };
        match within(&self.link.rt, self.link.deadline, exchange) {
            Ok(Ok(rows)) => {
                let row = rows
                    .first()
                    .ok_or_else(|| corrupt("cleanup returned no row"))?;
                let got: bool = row.try_get(0).map_err(corrupt)?;
                let n: i64 = row.try_get(1).map_err(corrupt)?;
                // Another instance is cleaning: nothing for this one to do until next time.
                Ok(if got {
                    usize::try_from(n).unwrap_or(0)
                } else {
                    0
                })
            }
            Ok(Err(f)) => Err(f),
            Err(_) => Err(Fail::Timeout("a cleanup")),
        }
    }
}
