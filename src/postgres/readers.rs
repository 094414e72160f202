//! Read connections: replays (and mismatches against completed records) answered beside the
//! writer, so that a retry storm does not queue behind writes. Each read connection is a thread
//! with its own connection; it takes the lookups waiting for it as one batch, one statement
//! (`id = ANY(...)`), one round trip. A completed record never changes before it expires, so a
//! read is as good as the writer's; a lookup that finds nothing (or fails) leaves the claim to
//! the writer, which has the final word.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::Mutex;
use tokio_postgres::types::Type;

use crate::cache::Completed;
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::postgres::backend::{
    ClaimRow, Fail, Link, Offsets, RECORD_COLUMNS, Stmt, claim_row, completed, now_ms, query,
    within,
};
use crate::postgres::connect::Target;
use crate::postgres::schema::Names;
use crate::record::STATE_COMPLETED;

/// Lookups waiting at most; past it a claim goes straight to the writer.
const QUEUE: usize = 1024;

/// The most lookups in one statement.
const BATCH: usize = 256;

/// What a lookup found: a live completed record (times in the engine clock's terms), or
/// nothing to replay.
pub(crate) type Found = Result<Option<Completed>>;

struct Lookup {
    id: [u8; 32],
    reply: oneshot::Sender<Found>,
}

/// The read connections of one engine.
pub(crate) struct Readers {
    queue: Mutex<Option<Sender<Lookup>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// What a read thread needs.
pub(crate) struct Setup {
    pub(crate) target: Target,
    pub(crate) connector: tokio_postgres_rustls::MakeRustlsConnect,
    pub(crate) names: Names,
    pub(crate) statement_timeout: Duration,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) db_clock: Option<Arc<dyn Clock>>,
}

impl Readers {
    /// `n` read connections; each connects at its first lookup.
    pub(crate) fn spawn(n: usize, setup: Setup) -> Result<Readers> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let setup = Arc::new(setup);
        let mut threads = Vec::with_capacity(n);
        for _ in 0..n {
            let (rx, setup) = (rx.clone(), setup.clone());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::Storage(Arc::new(e)))?;
            let link = Link::new(
                None,
                rt,
                setup.target.clone(),
                setup.connector.clone(),
                setup.statement_timeout,
            );
            threads.push(
                std::thread::Builder::new()
                    .name("idempotency-reader".into())
                    .spawn(move || serve(link, &setup, &rx))
                    .map_err(|e| Error::Storage(Arc::new(e)))?,
            );
        }
        Ok(Readers {
            queue: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
        })
    }

    /// Queues a lookup of the record `id`. `None`: no read connection can take it now (the
    /// queue is full, or closed): ask the writer.
    pub(crate) fn lookup(&self, id: [u8; 32]) -> Option<oneshot::Receiver<Found>> {
        let (reply, rx) = oneshot::channel();
        let queue = self.queue.lock();
        match queue.as_ref()?.try_send(Lookup { id, reply }) {
            Ok(()) => Some(rx),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => None,
        }
    }

    /// Closes the read connections (lookups under way are answered first).
    pub(crate) fn close(&self) {
        self.queue.lock().take();
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.close();
    }
}

fn serve(mut link: Link, setup: &Setup, rx: &Receiver<Lookup>) {
    // The claim statement's row layout (no fence: never won), read by the same `claim_row`.
    let sql = Stmt::new(
        format!(
            "SELECT r.id, NULL::int8, {RECORD_COLUMNS}, n.ms
             FROM {t} AS r, (SELECT {now} AS ms) AS n
             WHERE r.id = ANY($1::bytea[]) AND r.state = {STATE_COMPLETED} AND r.expires_at > n.ms",
            t = setup.names.records,
            now = now_ms(2)
        ),
        &[Type::BYTEA_ARRAY, Type::INT8],
    );
    let begin = format!(
        "BEGIN READ ONLY; SET LOCAL statement_timeout = {}; SET LOCAL enable_seqscan = off",
        setup.statement_timeout.as_millis().max(1)
    );
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter().take(BATCH - 1));
        // A claim whose caller went away needs no answer.
        batch.retain(|l| !l.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let found = match link.take_client() {
            Ok(client) => {
                let out = read(&link, &client, &begin, &sql, &batch, setup);
                link.give_back(client, out)
            }
            Err(e) => Err(e),
        };
        match found {
            Ok(records) => {
                for l in batch {
                    // Two lookups of one id in a batch both get the record.
                    let record = records.iter().find(|(id, _)| *id == l.id);
                    let _ = l.reply.send(Ok(record.map(|(_, r)| r.clone())));
                }
            }
            Err(e) => {
                for l in batch {
                    let _ = l.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

fn read(
    link: &Link,
    client: &tokio_postgres::Client,
    begin: &str,
    sql: &Stmt,
    batch: &[Lookup],
    setup: &Setup,
) -> Result<Vec<([u8; 32], Completed)>, Fail> {
    let ids: Vec<&[u8]> = batch.iter().map(|l| &l.id[..]).collect();
    let test_now = setup.db_clock.as_ref().map(|c| c.now_ms());
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] =
        [(&ids, Type::BYTEA_ARRAY), (&test_now, Type::INT8)];
    let exchange = async {
        let (b, rows, c) = tokio::join!(
            biased;
            client.batch_execute(begin),
            query(client, sql, &params),
            client.batch_execute("COMMIT"),
        );
        b?;
        let rows = rows?;
        c?;
        Ok::<_, tokio_postgres::Error>(rows)
    };
    // Read before the exchange: the database's `now` is later, so a cached record's expiry,
    // translated, errs early, never late.
    let local_now = setup.clock.now_ms();
    let sent = std::time::Instant::now();
    let rows = match within(&link.rt, link.deadline, exchange) {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => return Err(Fail::Pg(e)),
        Err(_) => return Err(Fail::Timeout("a read")),
    };
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let (id, found, db_now) = claim_row(row)?;
        let ClaimRow::Found(record) = found else {
            return Err(Fail::Other(Error::Corrupt {
                detail: "a read returned a claim's row".into(),
            }));
        };
        let offsets = Offsets {
            early: local_now - db_now,
            late: local_now - db_now,
            sent,
            db_now,
        };
        out.push((id, completed(record, offsets)?));
    }
    Ok(out)
}
