//! The writer's SQLite side: a batch is a sequence of statements in one `BEGIN IMMEDIATE`
//! transaction on the writer connection, fencing tokens are a counter persisted with each
//! batch, and with `Durability::Full` the syncer acknowledges completions after its flush.

use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;

use crate::clock::Clock;
use crate::config::{Durability, EngineConfig, Location};
use crate::error::{Error, Result};
use crate::sqlite::checkpointer::Checkpointer;
use crate::sqlite::storage::{self, ClaimRow};
use crate::sqlite::syncer::Syncer;
use crate::writer::{Backend, Done, Shared, Work};

/// The longest a cleanup transaction should hold the writer (see `Writer::cleanup`).
const CLEANUP_SLICE: Duration = Duration::from_millis(1);

// Field order matters: when a panic drops the writer, the syncer flushes and answers what it
// was handed, and the checkpointer stops, before the connection closes.
pub(crate) struct SqliteBackend {
    /// `Durability::Full` on a file only.
    syncer: Option<Syncer>,
    /// None for an in-memory database (it has no WAL).
    checkpointer: Option<Checkpointer>,
    shared: Arc<Shared>,
    conn: Connection,
    clock: Arc<dyn Clock>,
    checkpoint_on_exit: bool,
    /// The last fencing token handed out, and the last one written to `idempotency_meta`.
    fence: u64,
    persisted_fence: u64,
    /// Completions of the open transaction registered in `shared.unsynced`, to unregister if
    /// it rolls back.
    registered: Vec<[u8; 32]>,
}

impl SqliteBackend {
    /// The writer's side of an opened writer connection: starts the checkpointer (on a file)
    /// and the syncer (`Durability::Full` on a file).
    pub(crate) fn new(
        conn: Connection,
        config: &EngineConfig,
        shared: Arc<Shared>,
    ) -> Result<SqliteBackend> {
        let fence = storage::load_fence(&conn)?;
        let checkpointer = match &config.location {
            Location::File(path) => Some(Checkpointer::spawn(path, config, shared.clone())?),
            _ => None,
        };
        // An in-memory database has no WAL to flush: its completions are answered at commit.
        let syncer = match &config.location {
            Location::File(path) if config.durability == Durability::Full => {
                Some(Syncer::spawn(path, shared.clone())?)
            }
            _ => None,
        };
        Ok(SqliteBackend {
            syncer,
            checkpointer,
            shared,
            conn,
            clock: config.clock.clone(),
            checkpoint_on_exit: matches!(config.location, Location::File(_)),
            fence,
            persisted_fence: fence,
            registered: Vec::new(),
        })
    }

    fn poke_checkpointer(&self) {
        if let Some(c) = &self.checkpointer {
            c.poke();
        }
    }

    fn unregister(&mut self) {
        for id in self.registered.drain(..) {
            self.shared.unsynced.remove(&id);
        }
    }

    fn exec(&mut self, work: &Work<'_>, now: i64) -> Result<Done> {
        match *work {
            Work::Claim(c) => {
                let fence = self.fence + 1;
                let locked_until = now.saturating_add(c.lock_ms);
                let row = ClaimRow {
                    id: &c.id,
                    scope: &c.scope,
                    key: &c.key,
                    fingerprint: &c.fingerprint,
                    fence,
                    now,
                    locked_until,
                    expires_at: locked_until.saturating_add(c.retention_ms),
                };
                if storage::try_claim(&self.conn, &row)? {
                    self.fence = fence;
                    return Ok(Done::Won {
                        fence,
                        locked_until,
                    });
                }
                match storage::inspect(&self.conn, &c.id, &c.fingerprint, now)? {
                    Some(d) => Ok(Done::Decided(d)),
                    None => Err(Error::Corrupt {
                        detail: "a record blocked the claim but cannot be read back".into(),
                    }),
                }
            }
            Work::Complete {
                id,
                fence,
                response,
                retention_ms,
            } => {
                let done = storage::complete(
                    &self.conn,
                    id,
                    fence,
                    response,
                    now,
                    now.saturating_add(retention_ms),
                )?;
                if done && self.syncer.is_some() {
                    // Before the commit that makes it visible: from then until its flush, no
                    // connection replays it.
                    self.shared.unsynced.add(id);
                    self.registered.push(*id);
                }
                Ok(Done::Owned(done))
            }
            Work::Release { id, fence } => {
                Ok(Done::Owned(storage::release(&self.conn, id, fence)?))
            }
            Work::Extend {
                id,
                fence,
                lock_ms,
                retention_ms,
            } => {
                let until = now.saturating_add(lock_ms);
                let owned = storage::extend(
                    &self.conn,
                    id,
                    fence,
                    until,
                    until.saturating_add(retention_ms),
                )?;
                Ok(Done::Until(owned.then_some(until)))
            }
        }
    }
}

impl Backend for SqliteBackend {
    /// One transaction, without `fsync` (`synchronous=NORMAL`); see the crate docs, *Design*.
    fn run(&mut self, work: &[Work<'_>]) -> Result<Vec<Result<Done>>> {
        storage::begin(&self.conn)?;
        let now = self.clock.now_ms();
        let mut results = Vec::with_capacity(work.len());
        for w in work {
            let r = self.exec(w, now);
            if let Err(e) = &r
                && self.conn.is_autocommit()
            {
                // SQLite rolled the whole transaction back (disk full, I/O error): every
                // command of the batch failed, including those that had succeeded.
                let e = e.clone();
                self.unregister();
                return Err(e);
            }
            results.push(r);
        }
        let fence = self.fence;
        let finish = (|| {
            if fence != self.persisted_fence {
                storage::store_fence(&self.conn, fence)?;
            }
            storage::commit(&self.conn)
        })();
        if let Err(e) = finish {
            storage::rollback(&self.conn);
            self.unregister();
            return Err(e);
        }
        self.persisted_fence = fence;
        // The registered completions are the syncer's to unregister from now on.
        self.registered.clear();
        self.poke_checkpointer();
        Ok(results)
    }

    fn delete_expired(&mut self, limit: usize) -> Result<usize> {
        let now = self.clock.now_ms();
        let deleted = (|| -> Result<usize> {
            storage::begin(&self.conn)?;
            let n = storage::delete_expired(&self.conn, now, limit)?;
            storage::commit(&self.conn)?;
            Ok(n)
        })();
        match deleted {
            Ok(n) => {
                self.poke_checkpointer();
                Ok(n)
            }
            Err(e) => {
                storage::rollback(&self.conn);
                Err(e)
            }
        }
    }

    fn cleanup_slice(&self) -> Duration {
        CLEANUP_SLICE
    }

    fn between_batches(&mut self) {
        if let Some(c) = &self.checkpointer
            && c.take_restart_request()
            && self.shared.sync_failure().is_none()
        {
            // The checkpointer cannot catch up with the WAL while batches keep coming: copy
            // the last few frames here, between two batches, so the next one rewinds it.
            let _ = storage::checkpoint_passive(&self.conn);
        }
    }

    fn syncer(&self) -> Option<&Syncer> {
        self.syncer.as_ref()
    }

    fn admin(&mut self, op: &crate::admin::Op) -> Result<crate::admin::Answer> {
        let answer = crate::sqlite::admin::change(&self.conn, op, self.clock.now_ms());
        self.poke_checkpointer();
        answer
    }

    fn stop(&mut self, failure: Option<&Error>) {
        // The syncer flushes and answers everything it was handed; the checkpointer stops
        // before the final checkpoint, which then has the WAL to itself.
        if let Some(mut s) = self.syncer.take() {
            s.stop();
        }
        if let Some(mut c) = self.checkpointer.take() {
            c.stop();
        }
        if failure.is_some() || self.shared.sync_failure().is_some() {
            storage::no_checkpoint_on_close(&self.conn);
        } else if self.checkpoint_on_exit {
            let _ = storage::checkpoint(&self.conn);
        }
    }
}
