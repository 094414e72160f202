//! The writer's SQLite side: a batch is a sequence of statements in one `BEGIN IMMEDIATE`
//! transaction on the writer connection, fencing tokens are a counter reserved on disk ahead
//! of the tokens handed out ([`FENCE_BLOCK`] at a time), and with `Durability::Full` the
//! syncer acknowledges completions after its flush.

use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;

use crate::clock::Clock;
use crate::config::{Durability, EngineConfig, Location};
use crate::error::{Error, Result};
use crate::sqlite::checkpointer::Checkpointer;
use crate::sqlite::storage::{self, ClaimRow, Statements};
use crate::sqlite::syncer::Syncer;
use crate::writer::{Backend, Done, Shared, Work};

/// Fencing tokens reserved on disk at a time: `idempotency_meta` holds a token at least as high
/// as any handed out (the next engine on the file starts above it), and is rewritten only when
/// the tokens handed out pass it, instead of in every batch (one page, 4 KiB of WAL and as much
/// again at the checkpoint, per batch: a third of what a lone claim wrote).
const FENCE_BLOCK: u64 = 4096;

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
    /// The last fencing token handed out, and the one reserved in `idempotency_meta` (never
    /// below it).
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
        mut conn: Connection,
        config: &EngineConfig,
        shared: Arc<Shared>,
    ) -> Result<SqliteBackend> {
        let fence = storage::load_fence(&conn)?;
        let checkpointer = match &config.location {
            Location::File(path) => Some(Checkpointer::spawn(path, config, shared.clone())?),
            _ => None,
        };
        if let Some(c) = &checkpointer {
            c.watch(&mut conn)?;
        }
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
            c.committed();
        }
    }

    fn unregister(&mut self) {
        for id in self.registered.drain(..) {
            self.shared.unsynced.remove(&id);
        }
    }

    /// Runs one command of the batch; `next_fence` is the last token handed out so far.
    fn exec(
        &self,
        stmts: &mut Statements<'_>,
        next_fence: &mut u64,
        registered: &mut Vec<[u8; 32]>,
        work: &Work<'_>,
        now: i64,
    ) -> Result<Done> {
        match *work {
            Work::Claim(c) => {
                let fence = *next_fence + 1;
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
                if let Some(row) = stmts.try_claim(&row)? {
                    *next_fence = fence;
                    return Ok(Done::Won {
                        fence,
                        locked_until,
                        row,
                    });
                }
                match stmts.inspect(&c.id, &c.fingerprint, now)? {
                    Some(d) => Ok(Done::Decided(d)),
                    None => Err(Error::Corrupt {
                        detail: "a record blocked the claim but cannot be read back".into(),
                    }),
                }
            }
            Work::Complete {
                id,
                fence,
                row,
                response,
                retention_ms,
            } => {
                let done = stmts.complete(
                    id,
                    fence,
                    row,
                    response,
                    now,
                    now.saturating_add(retention_ms),
                )?;
                if done && self.syncer.is_some() {
                    // Before the commit that makes it visible: from then until its flush, no
                    // connection replays it.
                    self.shared.unsynced.add(id);
                    registered.push(*id);
                }
                Ok(Done::Owned(done))
            }
            Work::Release { id, fence } => Ok(Done::Owned(stmts.release(id, fence)?)),
            Work::Extend {
                id,
                fence,
                lock_ms,
                retention_ms,
            } => {
                let until = now.saturating_add(lock_ms);
                let owned = stmts.extend(id, fence, until, until.saturating_add(retention_ms))?;
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
        let mut fence = self.fence;
        let mut registered = std::mem::take(&mut self.registered);
        let mut failed = None;
        {
            let mut stmts = Statements::new(&self.conn);
            for w in work {
                let r = self.exec(&mut stmts, &mut fence, &mut registered, w, now);
                if let Err(e) = &r
                    && self.conn.is_autocommit()
                {
                    // SQLite rolled the whole transaction back (disk full, I/O error): every
                    // command of the batch failed, including those that had succeeded.
                    failed = Some(e.clone());
                    break;
                }
                results.push(r);
            }
        }
        self.registered = registered;
        // Tokens are never handed out twice, even if this batch rolls back.
        self.fence = fence;
        if let Some(e) = failed {
            self.unregister();
            return Err(e);
        }
        // The counter on disk runs ahead of the tokens handed out by up to a block, so that
        // the meta page is written once per FENCE_BLOCK tokens rather than in every batch.
        let reserve = (fence > self.persisted_fence).then(|| fence.saturating_add(FENCE_BLOCK));
        let finish = (|| {
            if let Some(reserve) = reserve {
                storage::store_fence(&self.conn, reserve)?;
            }
            storage::commit(&self.conn)
        })();
        if let Err(e) = finish {
            storage::rollback(&self.conn);
            self.unregister();
            return Err(e);
        }
        if let Some(reserve) = reserve {
            self.persisted_fence = reserve;
        }
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
