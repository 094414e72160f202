//! An operator's reads and changes on a PostgreSQL store: reads on a connection of their own
//! (in a read-only snapshot), changes on the writer's connection (single statements, each its
//! own transaction).

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_postgres::types::Type;

use crate::admin::{Answer, Change, Op, Row, Stats, explain, time};
use crate::clock::Clock;
use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::postgres::backend::{now_ms, within};
use crate::postgres::connect::pg_error;
use crate::postgres::schema::{Names, SCHEMA_VERSION};

/// Every column of a record, in the order [`row`] reads them.
const COLUMNS: &str = "scope, key, fingerprint, state::int8, fence, locked_until, expires_at,
    created_at, completed_at, status::int8, headers, body, trailers";

/// Records a check reads per statement.
const CHECK_PAGE: i64 = 10_000;

/// How long an operator's read of the whole table (`stats`, `check`) may take: a table of
/// millions of records takes far longer than one statement of the hot path.
const WHOLE_TABLE: Duration = Duration::from_secs(600);

/// Problems a check lists one by one before it only counts them.
const MAX_PROBLEMS: usize = 50;

/// A read connection of its own, on a thread of its own: its runtime must neither start nor
/// stop on a caller's thread, which may be running an async executor (an operator endpoint
/// inside the service).
pub(crate) struct PgReader {
    requests: Option<std::sync::mpsc::Sender<(Op, oneshot::Sender<Result<Answer>>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PgReader {
    /// Connects (on its thread) and checks that the table is an idempotency-rs store this
    /// build can read. Creates nothing.
    pub(crate) fn open(config: &EngineConfig, url: &str) -> Result<PgReader> {
        let (config, url) = (config.clone(), url.to_owned());
        let (requests, rx) = std::sync::mpsc::channel::<(Op, oneshot::Sender<Result<Answer>>)>();
        let (ready, opened) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("idempotency-admin".into())
            .spawn(move || match Conn::open(&config, &url) {
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
                Ok(conn) => {
                    let _ = ready.send(Ok(()));
                    for (op, reply) in rx {
                        let _ = reply.send(conn.run(&op));
                    }
                }
            })
            .map_err(|e| Error::Storage(Arc::new(e)))?;
        let reader = PgReader {
            requests: Some(requests),
            thread: Some(thread),
        };
        opened.recv().map_err(|_| gone())??;
        Ok(reader)
    }

    pub(crate) fn run(&self, op: &Op, _now: i64) -> Result<Answer> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .as_ref()
            .ok_or_else(gone)?
            .send((op.clone(), reply))
            .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }
}

impl Drop for PgReader {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn gone() -> Error {
    Error::Storage(Arc::new(std::io::Error::other(
        "the thread of an operator's read connection ended",
    )))
}

/// The connection, its runtime, and what it needs to read.
struct Conn {
    rt: tokio::runtime::Runtime,
    client: Client,
    names: Names,
    shown: String,
    deadline: Duration,
    db_clock: Option<Arc<dyn Clock>>,
}

impl Conn {
    fn open(config: &EngineConfig, url: &str) -> Result<Conn> {
        let c = crate::postgres::connect(config, url)?;
        let reader = Conn {
            rt: c.rt,
            client: c.client,
            names: c.names,
            shown: c.target.shown,
            deadline: c.deadline,
            db_clock: config.postgres.database_clock.clone(),
        };
        reader.check_schema()?;
        Ok(reader)
    }

    fn block<T>(
        &self,
        limit: Duration,
        f: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        within(&self.rt, limit, f).map_err(|_| Error::Unavailable {
            detail: format!("{}: no answer within {limit:?}", self.shown),
        })?
    }

    fn check_schema(&self) -> Result<()> {
        let names = &self.names;
        let not_ours = || Error::Refused {
            detail: format!(
                "{}: no idempotency-rs store in the table {} (it, or its {} table, is missing or not ours)",
                self.shown,
                names.shown,
                names.meta.replace('"', "")
            ),
        };
        self.block(self.deadline, async {
            let sql = format!(
                "SELECT to_regclass('{}') IS NOT NULL AND to_regclass('{}') IS NOT NULL",
                names.records.replace('\'', "''"),
                names.meta.replace('\'', "''")
            );
            let rows = self
                .client
                .query_typed(&sql, &[])
                .await
                .map_err(|e| pg_error(e, &self.shown))?;
            let exists: bool = rows.first().map(|r| r.get(0)).unwrap_or(false);
            if !exists {
                return Err(not_ours());
            }
            let version = self
                .client
                .query_typed(
                    &format!(
                        "SELECT value FROM {} WHERE name = 'schema_version'",
                        names.meta
                    ),
                    &[],
                )
                .await
                .map_err(|_| not_ours())?;
            let version: i64 = version
                .first()
                .and_then(|r| r.try_get(0).ok())
                .ok_or_else(not_ours)?;
            if version > SCHEMA_VERSION {
                return Err(Error::SchemaTooNew {
                    found: version,
                    supported: SCHEMA_VERSION,
                });
            }
            self.client
                .batch_execute(&format!("SELECT {COLUMNS} FROM {} LIMIT 0", names.records))
                .await
                .map_err(|_| not_ours())
        })
    }

    fn run(&self, op: &Op) -> Result<Answer> {
        if matches!(op, Op::Release { .. } | Op::Forget { .. }) {
            return Err(Error::Refused {
                detail: "the store was opened read-only".into(),
            });
        }
        let test_now = self.db_clock.as_ref().map(|c| c.now_ms());
        let limit = match op {
            Op::Stats | Op::Check => self.deadline.max(WHOLE_TABLE),
            _ => self.deadline,
        };
        self.block(limit, async {
            let pg = |e| pg_error(e, &self.shown);
            // One snapshot for the whole answer, and nothing written.
            self.client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(pg)?;
            let answer = run(&self.client, &self.names, op, test_now, &self.shown).await;
            let _ = self.client.batch_execute("ROLLBACK").await;
            answer
        })
    }
}

/// Runs `op` on `client`: reads in the caller's transaction, changes as single statements.
pub(crate) async fn run(
    client: &Client,
    names: &Names,
    op: &Op,
    test_now: Option<i64>,
    shown: &str,
) -> Result<Answer> {
    let pg = |e| pg_error(e, shown);
    let t = &names.records;
    let now = {
        let rows = client
            .query_typed(&format!("SELECT {}", now_ms(1)), &[(&test_now, Type::INT8)])
            .await
            .map_err(pg)?;
        let now: i64 = rows
            .first()
            .ok_or_else(|| corrupt("no clock"))?
            .try_get(0)
            .map_err(corrupt)?;
        now
    };
    match *op {
        Op::Record { ref id } => {
            let rows = client
                .query_typed(
                    &format!("SELECT {COLUMNS} FROM {t} WHERE id = $1"),
                    &[(&&id[..], Type::BYTEA)],
                )
                .await
                .map_err(pg)?;
            let record = match rows.first() {
                Some(r) => Some(row(r)?.into_record(now, true)?),
                None => None,
            };
            Ok(Answer::Record(record))
        }
        Op::InFlight {
            older_than_ms,
            limit,
        } => {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let before = now.saturating_sub(older_than_ms);
            let rows = client
                .query_typed(
                    &format!(
                        "SELECT {COLUMNS} FROM {t}
                         WHERE state = 0 AND expires_at > $1 AND created_at <= $2
                         ORDER BY created_at LIMIT $3"
                    ),
                    &[
                        (&now, Type::INT8),
                        (&before, Type::INT8),
                        (&limit, Type::INT8),
                    ],
                )
                .await
                .map_err(pg)?;
            let records = rows
                .iter()
                .map(|r| row(r)?.into_record(now, false))
                .collect::<Result<Vec<_>>>()?;
            Ok(Answer::Records(records))
        }
        Op::Stats => {
            let rows = client
                .query_typed(
                    &format!(
                        "SELECT count(*) FILTER (WHERE state = 0 AND expires_at > $1),
                                count(*) FILTER (WHERE state = 1 AND expires_at > $1),
                                count(*) FILTER (WHERE expires_at <= $1),
                                min(created_at) FILTER (WHERE state = 0 AND expires_at > $1),
                                count(*) FILTER (WHERE state = 0 AND expires_at > $1
                                                   AND locked_until <= $1),
                                pg_total_relation_size('{}'),
                                (SELECT value FROM {} WHERE name = 'schema_version')
                         FROM {t}",
                        t.replace('\'', "''"),
                        names.meta
                    ),
                    &[(&now, Type::INT8)],
                )
                .await
                .map_err(pg)?;
            let r = rows.first().ok_or_else(|| corrupt("no statistics"))?;
            let n = |i: usize| -> Result<u64> {
                let v: i64 = r.try_get(i).map_err(corrupt)?;
                Ok(u64::try_from(v).unwrap_or(0))
            };
            Ok(Answer::Stats(Stats {
                backend: "postgres",
                in_flight: n(0)?,
                completed: n(1)?,
                expired: n(2)?,
                oldest_in_flight: r.try_get::<_, Option<i64>>(3).map_err(corrupt)?.map(time),
                lock_timed_out: n(4)?,
                size_bytes: n(5)?,
                schema_version: r.try_get(6).map_err(corrupt)?,
                wal_bytes: None,
            }))
        }
        Op::Check => {
            let mut problems = Vec::new();
            let rows = client
                .query_typed(
                    &format!(
                        "SELECT (SELECT last_value FROM {}), (SELECT max(fence) FROM {t})",
                        names.fence
                    ),
                    &[],
                )
                .await
                .map_err(pg)?;
            if let Some(r) = rows.first() {
                let last: i64 = r.try_get(0).map_err(corrupt)?;
                let highest: Option<i64> = r.try_get(1).map_err(corrupt)?;
                if let Some(highest) = highest.filter(|h| *h > last) {
                    problems.push(format!(
                        "the fencing sequence ({last}) is behind a record's token ({highest}): a new lease could repeat a token"
                    ));
                }
            }
            // Page by page along the primary key: a table of millions of records is never in
            // memory at once.
            let mut bad = 0usize;
            let mut after: Vec<u8> = Vec::new();
            loop {
                let rows = client
                    .query_typed(
                        &format!(
                            "SELECT {COLUMNS}, id FROM {t} WHERE id > $1 ORDER BY id LIMIT $2"
                        ),
                        &[(&after, Type::BYTEA), (&CHECK_PAGE, Type::INT8)],
                    )
                    .await
                    .map_err(pg)?;
                for r in &rows {
                    if let Err(e) = row(r).and_then(|r| r.into_record(now, true)) {
                        bad += 1;
                        if bad <= MAX_PROBLEMS {
                            problems.push(e.to_string());
                        }
                    }
                }
                match rows.last() {
                    Some(last) if rows.len() as i64 == CHECK_PAGE => {
                        after = last.try_get(13).map_err(corrupt)?;
                    }
                    _ => break,
                }
            }
            if bad > MAX_PROBLEMS {
                problems.push(format!(
                    "... and {} more rows that do not decode",
                    bad - MAX_PROBLEMS
                ));
            }
            Ok(Answer::Problems(problems))
        }
        Op::Release { ref id, fence } => {
            let fence = i64::try_from(fence).unwrap_or(i64::MAX);
            let n = client
                .execute_typed(
                    &format!(
                        "DELETE FROM {t} WHERE id = $1 AND fence = $2 AND state = 0 AND expires_at > $3"
                    ),
                    &[
                        (&&id[..], Type::BYTEA),
                        (&fence, Type::INT8),
                        (&now, Type::INT8),
                    ],
                )
                .await
                .map_err(pg)?;
            Ok(Answer::Change(match n {
                0 => explain(found(client, names, id, now, shown).await?, true),
                _ => Change::Done,
            }))
        }
        Op::Forget { ref id } => {
            let n = client
                .execute_typed(
                    &format!("DELETE FROM {t} WHERE id = $1 AND (state = 1 OR expires_at <= $2)"),
                    &[(&&id[..], Type::BYTEA), (&now, Type::INT8)],
                )
                .await
                .map_err(pg)?;
            Ok(Answer::Change(match n {
                0 => explain(found(client, names, id, now, shown).await?, false),
                _ => Change::Done,
            }))
        }
    }
}

async fn found(
    client: &Client,
    names: &Names,
    id: &[u8; 32],
    now: i64,
    shown: &str,
) -> Result<Option<(i64, i64)>> {
    let rows = client
        .query_typed(
            &format!(
                "SELECT state::int8, fence FROM {} WHERE id = $1 AND expires_at > $2",
                names.records
            ),
            &[(&&id[..], Type::BYTEA), (&now, Type::INT8)],
        )
        .await
        .map_err(|e| pg_error(e, shown))?;
    rows.first()
        .map(|r| {
            Ok((
                r.try_get(0).map_err(corrupt)?,
                r.try_get(1).map_err(corrupt)?,
            ))
        })
        .transpose()
}

fn row(r: &tokio_postgres::Row) -> Result<Row> {
    let get = |i: usize| -> Result<Option<Vec<u8>>> { r.try_get(i).map_err(corrupt) };
    Ok(Row {
        scope: r.try_get(0).map_err(corrupt)?,
        key: r.try_get(1).map_err(corrupt)?,
        fingerprint: r.try_get(2).map_err(corrupt)?,
        state: r.try_get(3).map_err(corrupt)?,
        fence: r.try_get(4).map_err(corrupt)?,
        locked_until: r.try_get(5).map_err(corrupt)?,
        expires_at: r.try_get(6).map_err(corrupt)?,
        created_at: r.try_get(7).map_err(corrupt)?,
        completed_at: r.try_get(8).map_err(corrupt)?,
        status: r.try_get(9).map_err(corrupt)?,
        headers: get(10)?,
        body: get(11)?,
        trailers: get(12)?,
    })
}

fn corrupt(e: impl std::fmt::Display) -> Error {
    Error::Corrupt {
        detail: e.to_string(),
    }
}
