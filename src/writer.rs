//! The writer thread: owns the write connection, drains the command queues into batches and
//! commits each batch as one transaction (group commit). With `Durability::Full` on a file, the
//! batch's completions are answered by the syncer thread after it has flushed the WAL
//! (`syncer.rs`); everything else is answered right after the commit.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Select, Sender, TryRecvError};
use parking_lot::{Condvar, Mutex};
use rusqlite::Connection;

use crate::checkpointer::Checkpointer;
use crate::clock::Clock;
use crate::config::{Durability, EngineConfig, Location};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::response::StoredResponse;
use crate::storage::{self, ClaimRow, Decision};
use crate::syncer::{AfterSync, Syncer, Unsynced};

/// The longest a cleanup transaction should hold the writer: the number of rows per
/// transaction halves when one takes longer, and doubles (up to the configured batch) when one
/// takes less than half of it.
const CLEANUP_SLICE: Duration = Duration::from_millis(1);

/// Rows in the first cleanup transaction (or the configured batch, if smaller).
const CLEANUP_FIRST_CHUNK: usize = 64;

/// While commands are waiting, a backlog of expired records gets at most one part in
/// `1 + CLEANUP_YIELD` of the writer's time: after a cleanup transaction, the next waits this
/// many times as long as it took. Expired records are already invisible to claims, so a backlog
/// only costs disk space while it lasts.
const CLEANUP_YIELD: u32 = 8;

/// A claim, as the writer sees it.
pub(crate) struct ClaimCmd {
    pub id: [u8; 32],
    pub scope: String,
    pub key: String,
    pub fingerprint: Fingerprint,
    pub lock_ms: i64,
    pub retention_ms: i64,
    pub reply: oneshot::Sender<Result<ClaimReply>>,
    /// The engine's lease queue, for the [`Won`] answer to release the record if its caller
    /// is gone by the time it arrives. Taken by the writer when the claim wins.
    pub leases: Option<Sender<LeaseCmd>>,
}

/// The writer's answer to a claim.
#[derive(Debug)]
pub(crate) enum ClaimReply {
    Claimed(Won),
    Decided(Decision),
}

/// A won claim on its way to its caller: a lease that nobody holds yet. Until the caller turns
/// it into a [`Lease`](crate::Lease) ([`Won::disarm`]), dropping it releases the record.
///
/// That covers the answer that was delivered but never read: an async claim whose future was
/// dropped after the writer had put the answer in its channel (a client disconnect, a gRPC
/// deadline, a `select!`) drops the answer with the channel, and the record would otherwise
/// stay locked until its lock timeout. (An answer that cannot be delivered at all comes back
/// to the writer, which releases the record itself, also when it is shutting down.)
#[derive(Debug)]
pub(crate) struct Won {
    pub(crate) fence: u64,
    pub(crate) locked_until: i64,
    id: [u8; 32],
    release: Option<Sender<LeaseCmd>>,
}

impl Won {
    /// The fencing token and lock expiry, for the lease that now owns the record: dropping
    /// this no longer releases it.
    pub(crate) fn disarm(mut self) -> (u64, i64) {
        self.release = None;
        (self.fence, self.locked_until)
    }
}

impl Drop for Won {
    fn drop(&mut self) {
        if let Some(leases) = self.release.take() {
            // Fire and forget on the unbounded lease queue; if the engine is gone, the lock
            // timeout frees the key.
            let _ = leases.send(LeaseCmd::Release {
                id: self.id,
                fence: self.fence,
                reply: None,
            });
        }
    }
}

/// Commands of an existing lease (and control messages). They travel on an unbounded channel:
/// admission control happens once, at the claim; an admitted lease is never refused its
/// completion for lack of queue space, and there can be no more of them than live leases.
pub(crate) enum LeaseCmd {
    Complete {
        id: [u8; 32],
        fence: u64,
        response: StoredResponse,
        retention_ms: i64,
        reply: oneshot::Sender<Result<()>>,
    },
    Release {
        id: [u8; 32],
        fence: u64,
        reply: Option<oneshot::Sender<Result<()>>>,
    },
    Extend {
        id: [u8; 32],
        fence: u64,
        lock_ms: i64,
        retention_ms: i64,
        reply: oneshot::Sender<Result<i64>>,
    },
    /// Answered once everything before it is committed (and flushed), with the error that
    /// stopped the engine if a flush failed.
    Shutdown(oneshot::Sender<Result<()>>),
    #[cfg(feature = "fault-injection")]
    Panic,
}

/// How the writer thread ended.
#[derive(Debug, Clone)]
pub(crate) enum Exit {
    Clean,
    Panicked(String),
    /// A flush of the WAL failed ([`Error::SyncFailed`]).
    Failed(Error),
}

/// State shared between the handles, the writer thread and its helper threads.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    exit: Mutex<Option<Exit>>,
    exited: Condvar,
    /// Completions committed but not yet flushed: never replayed (see `syncer.rs`).
    pub(crate) unsynced: Unsynced,
    /// Set once a flush of the WAL failed; the error stays.
    sync_failed: AtomicBool,
    sync_failure: Mutex<Option<Error>>,
    #[cfg(feature = "fault-injection")]
    pub(crate) sync_faults: crate::syncer::SyncFaults,
}

impl Shared {
    /// The error of the first failed flush, if one failed.
    pub(crate) fn sync_failure(&self) -> Option<Error> {
        if !self.sync_failed.load(Ordering::Acquire) {
            return None;
        }
        self.sync_failure.lock().clone()
    }

    pub(crate) fn set_sync_failure(&self, e: Error) {
        let mut failure = self.sync_failure.lock();
        if failure.is_none() {
            *failure = Some(e);
            self.sync_failed.store(true, Ordering::Release);
        }
    }

    fn set_exit(&self, exit: Exit) {
        *self.exit.lock() = Some(exit);
        self.exited.notify_all();
    }

    /// The error for a caller whose channel to the writer broke. A broken channel means the
    /// writer is ending; wait (briefly) for it to say how, so a panic is never reported as a
    /// plain close.
    pub(crate) fn gone(&self) -> Error {
        let mut exit = self.exit.lock();
        if exit.is_none() {
            self.exited.wait_for(&mut exit, Duration::from_secs(5));
        }
        match &*exit {
            Some(Exit::Panicked(message)) => Error::WriterPanicked {
                message: message.clone(),
            },
            Some(Exit::Failed(e)) => e.clone(),
            _ => Error::Closed,
        }
    }

    /// The error to give at once when the writer has already ended.
    pub(crate) fn ended(&self) -> Option<Error> {
        match &*self.exit.lock() {
            None => None,
            Some(Exit::Clean) => Some(Error::Closed),
            Some(Exit::Panicked(message)) => Some(Error::WriterPanicked {
                message: message.clone(),
            }),
            Some(Exit::Failed(e)) => Some(e.clone()),
        }
    }
}

/// Starts the writer thread on an opened connection.
pub(crate) fn spawn(
    conn: Connection,
    config: &EngineConfig,
    claims: Receiver<ClaimCmd>,
    leases: Receiver<LeaseCmd>,
    shared: Arc<Shared>,
) -> Result<std::thread::JoinHandle<()>> {
    let fence = storage::load_fence(&conn)?;
    // A bounded crossbeam channel keeps its messages when its receiver is dropped, so a claim
    // still queued when the writer ends (a panic, or a claim racing a shutdown) would wait for
    // its answer forever. This second receiver sweeps the queue once the end is announced.
    let stranded = claims.clone();
    let checkpointer = match &config.location {
        Location::File(path) => Some(Checkpointer::spawn(path, config, shared.clone())?),
        Location::Memory => None,
    };
    // An in-memory database has no WAL to flush: its completions are answered at commit.
    let syncer = match &config.location {
        Location::File(path) if config.durability == Durability::Full => {
            Some(Syncer::spawn(path, shared.clone())?)
        }
        _ => None,
    };
    let writer = Writer {
        syncer,
        checkpointer,
        shared: shared.clone(),
        conn,
        claims,
        leases,
        clock: config.clock.clone(),
        checkpoint_on_exit: matches!(config.location, Location::File(_)),
        max_batch: config.max_batch,
        cleanup_interval: config.cleanup_interval,
        cleanup_batch: config.cleanup_batch,
        cleanup_chunk: config.cleanup_batch.min(CLEANUP_FIRST_CHUNK),
        next_cleanup: Instant::now() + config.cleanup_interval,
        fence,
        persisted_fence: fence,
        requeued: Vec::new(),
        registered: Vec::new(),
    };
    std::thread::Builder::new()
        .name("idempotency-writer".into())
        .spawn(move || {
            let result = catch_unwind(AssertUnwindSafe(move || writer.run()));
            let exit = match result {
                Ok(exit) => exit,
                Err(payload) => Exit::Panicked(
                    payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into()),
                ),
            };
            shared.set_exit(exit);
            // Dropping a claim drops its reply sender: its caller wakes and reads the exit set
            // above. A claim sent after this sweep is caught by `Engine::start_claim`, which
            // checks for the end after queueing.
            stranded.try_iter().for_each(drop);
        })
        .map_err(|e| Error::Storage(Arc::new(e)))
}

/// Orders a batch so that every lease command runs before every claim (a stable sort, so each
/// kind keeps its order). `wait` may hand over a claim first even though a lease command sent
/// before it was already queued (a select picks at random among ready channels); without this a
/// claim right after dropping a lease could still find the key held.
fn lease_commands_first(batch: &mut [Pending]) {
    batch.sort_by_key(|p| matches!(p, Pending::Claim(..)));
}

// Field order matters: when a panic drops the writer, the syncer flushes and answers what it
// was handed, and the checkpointer stops, before the connection closes.
struct Writer {
    /// `Durability::Full` on a file only.
    syncer: Option<Syncer>,
    /// None for an in-memory database (it has no WAL).
    checkpointer: Option<Checkpointer>,
    shared: Arc<Shared>,
    conn: Connection,
    claims: Receiver<ClaimCmd>,
    leases: Receiver<LeaseCmd>,
    clock: Arc<dyn Clock>,
    checkpoint_on_exit: bool,
    max_batch: usize,
    cleanup_interval: Duration,
    cleanup_batch: usize,
    /// Rows deleted per cleanup transaction now: adapted to [`CLEANUP_SLICE`], at most
    /// `cleanup_batch`.
    cleanup_chunk: usize,
    next_cleanup: Instant,
    /// The last fencing token handed out, and the last one written to `idempotency_meta`.
    fence: u64,
    persisted_fence: u64,
    /// Releases of claims whose caller went away before the answer arrived.
    requeued: Vec<LeaseCmd>,
    /// Completions of the open transaction registered in `shared.unsynced`, to unregister if
    /// it rolls back.
    registered: Vec<[u8; 32]>,
}

/// One command of a batch, with what its caller will be told.
enum Pending {
    Claim(ClaimCmd, Option<Result<ClaimReply>>),
    Lease(LeaseCmd, Option<Result<i64>>),
}

impl Writer {
    fn run(mut self) -> Exit {
        let mut shutdown = None;
        let mut disconnected = false;
        loop {
            let mut batch = Vec::new();
            batch.extend(self.requeued.drain(..).map(|c| Pending::Lease(c, None)));
            if batch.is_empty() {
                match self.wait() {
                    Ok(first) => batch.push(first),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => disconnected = true,
                }
            }
            self.drain(&mut batch, &mut disconnected);
            for p in &mut batch {
                if let Pending::Lease(LeaseCmd::Shutdown(_), _) = p {
                    disconnected = true;
                }
            }
            // A failed flush stops the engine: nothing more is committed, and every command
            // still queued gets the error.
            let failure = self.shared.sync_failure();
            if disconnected || failure.is_some() {
                // Take everything still queued: nothing a caller sent before the end is lost.
                self.drain_all(&mut batch);
            }
            lease_commands_first(&mut batch);
            let mut rest = Vec::with_capacity(batch.len());
            for p in batch {
                match p {
                    Pending::Lease(LeaseCmd::Shutdown(ack), _) => shutdown = Some(ack),
                    #[cfg(feature = "fault-injection")]
                    Pending::Lease(LeaseCmd::Panic, _) => {
                        panic!("injected writer panic (fault-injection feature)")
                    }
                    p => rest.push(p),
                }
            }
            if let Some(e) = failure {
                self.fail_all(rest, e);
                break;
            }
            if shutdown.is_some() {
                // The last batch: a claim won now would be a lease whose completion can no
                // longer be stored (the engine is closed by then), so its handler would run
                // for nothing, and its key stay locked across the restart. Refuse it: its
                // caller gets `Closed` and runs nothing. Lease commands are still applied.
                let (claims, leases) = rest
                    .into_iter()
                    .partition(|p| matches!(p, Pending::Claim(..)));
                rest = leases;
                for refused in claims {
                    self.answer(refused);
                }
            }
            self.process(rest);
            if disconnected && self.requeued.is_empty() {
                break;
            }
            if Instant::now() >= self.next_cleanup {
                self.cleanup();
            }
            if let Some(c) = &self.checkpointer
                && c.take_restart_request()
                && self.shared.sync_failure().is_none()
            {
                // The checkpointer cannot catch up with the WAL while batches keep coming: copy
                // the last few frames here, between two batches, so the next one rewinds it.
                let _ = storage::checkpoint_passive(&self.conn);
            }
        }
        // The syncer flushes and answers everything it was handed; the checkpointer stops
        // before the final checkpoint, which then has the WAL to itself.
        if let Some(mut s) = self.syncer.take() {
            s.stop();
        }
        if let Some(mut c) = self.checkpointer.take() {
            c.stop();
        }
        let failure = self.shared.sync_failure();
        if failure.is_some() {
            storage::no_checkpoint_on_close(&self.conn);
        } else if self.checkpoint_on_exit {
            let _ = storage::checkpoint(&self.conn);
        }
        if let Some(ack) = shutdown {
            let _ = ack.send(failure.clone().map_or(Ok(()), Err));
        }
        failure.map_or(Exit::Clean, Exit::Failed)
    }

    /// Waits for the first command, or until the next cleanup is due.
    fn wait(&self) -> Result<Pending, RecvTimeoutError> {
        let timeout = self.next_cleanup.saturating_duration_since(Instant::now());
        let mut sel = Select::new();
        let c = sel.recv(&self.claims);
        let l = sel.recv(&self.leases);
        let op = sel
            .select_timeout(timeout)
            .map_err(|_| RecvTimeoutError::Timeout)?;
        match op.index() {
            i if i == c => op
                .recv(&self.claims)
                .map(|m| Pending::Claim(m, None))
                .map_err(|_| RecvTimeoutError::Disconnected),
            i if i == l => op
                .recv(&self.leases)
                .map(|m| Pending::Lease(m, None))
                .map_err(|_| RecvTimeoutError::Disconnected),
            _ => unreachable!("select returned an operation that was not registered"),
        }
    }

    /// Adds whatever is queued, up to the batch limit. Lease commands first: they finish work
    /// already admitted. The caller then puts every lease command of the batch before its
    /// claims ([`lease_commands_first`]).
    fn drain(&self, batch: &mut Vec<Pending>, disconnected: &mut bool) {
        while batch.len() < self.max_batch {
            match self.leases.try_recv() {
                Ok(m) => batch.push(Pending::Lease(m, None)),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    *disconnected = true;
                    break;
                }
            }
        }
        while batch.len() < self.max_batch {
            match self.claims.try_recv() {
                Ok(m) => batch.push(Pending::Claim(m, None)),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    *disconnected = true;
                    break;
                }
            }
        }
        // No claim may overtake a lease command sent before it (a lease dropped, then a retry
        // of the same key): one sent before a claim of this batch was queued before the claim
        // was, so it is in the lease queue now. Take them all, past the batch limit if need be
        // (there are never more lease commands than live leases). This covers lease commands
        // left over by the first loop when more than a batch of them were queued, and the
        // claim `wait` may have handed over first (a select picks at random among ready
        // channels).
        if batch.iter().any(|p| matches!(p, Pending::Claim(..))) {
            batch.extend(self.leases.try_iter().map(|m| Pending::Lease(m, None)));
        }
    }

    fn drain_all(&self, batch: &mut Vec<Pending>) {
        batch.extend(self.leases.try_iter().map(|m| Pending::Lease(m, None)));
        batch.extend(self.claims.try_iter().map(|m| Pending::Claim(m, None)));
    }

    /// Commits a batch in one transaction, without `fsync` (`synchronous=NORMAL`), and answers
    /// it: with a syncer, completions (and replays of completions not yet on disk) after its
    /// next flush of the WAL; everything else at once. See the crate docs, *Design*.
    fn process(&mut self, mut batch: Vec<Pending>) {
        if batch.is_empty() {
            return;
        }
        if let Err(e) = storage::begin(&self.conn) {
            return self.fail_all(batch, e);
        }
        let now = self.clock.now_ms();
        for p in &mut batch {
            let aborted = match p {
                // Its caller is gone (an async claim dropped while queued): running it would
                // only lock the key until the release this writer would then queue, and a
                // retry of the same key in this batch would be told to wait for a whole lock
                // timeout. It is answered `Closed`, which nobody reads.
                Pending::Claim(cmd, _) if cmd.reply.is_closed() => false,
                Pending::Claim(cmd, out) => {
                    let r = self.exec_claim(cmd, now);
                    let aborted = r.is_err() && self.conn.is_autocommit();
                    *out = Some(r);
                    aborted
                }
                Pending::Lease(cmd, out) => {
                    let r = self.exec_lease(cmd, now);
                    let aborted = r.is_err() && self.conn.is_autocommit();
                    *out = Some(r);
                    aborted
                }
            };
            if aborted {
                // SQLite rolled the whole transaction back (disk full, I/O error): every
                // command of the batch failed, including those that had succeeded.
                let e = match p {
                    Pending::Claim(_, Some(Err(e))) => e.clone(),
                    Pending::Lease(_, Some(Err(e))) => e.clone(),
                    _ => Error::DiskFull,
                };
                return self.fail_all(batch, e);
            }
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
            return self.fail_all(batch, e);
        }
        self.persisted_fence = fence;
        // The registered completions are the syncer's to unregister from now on.
        self.registered.clear();
        self.poke_checkpointer();
        if let Some(syncer) = &self.syncer {
            let mut after_sync = Vec::new();
            let mut now = Vec::with_capacity(batch.len());
            for p in batch {
                match p {
                    Pending::Lease(LeaseCmd::Complete { id, reply, .. }, Some(Ok(_))) => {
                        after_sync.push(AfterSync::Completion { id, reply });
                    }
                    // A completed record whose completion is not on disk yet (committed in this
                    // batch or in one whose flush is still running) is not replayed before
                    // it is: the answer waits for the next flush, which covers that commit.
                    Pending::Claim(
                        cmd,
                        Some(Ok(answer @ ClaimReply::Decided(Decision::Replay(_)))),
                    ) if self.shared.unsynced.contains(&cmd.id) => {
                        after_sync.push(AfterSync::Replay {
                            reply: cmd.reply,
                            answer,
                        });
                    }
                    p => now.push(p),
                }
            }
            // Hand over first, so the flush starts while the others are answered.
            if !after_sync.is_empty() {
                syncer.send(after_sync);
            }
            batch = now;
        }
        for p in batch {
            self.answer(p);
        }
    }

    fn poke_checkpointer(&self) {
        if let Some(c) = &self.checkpointer {
            c.poke();
        }
    }

    fn fail_all(&mut self, batch: Vec<Pending>, e: Error) {
        storage::rollback(&self.conn);
        for id in self.registered.drain(..) {
            self.shared.unsynced.remove(&id);
        }
        for p in batch {
            match p {
                Pending::Claim(cmd, out) => {
                    // Rolled back: there is no record to release.
                    if let Some(Ok(ClaimReply::Claimed(won))) = out {
                        won.disarm();
                    }
                    let _ = cmd.reply.send(Err(e.clone()));
                }
                Pending::Lease(cmd, _) => self.answer_lease(cmd, Err(e.clone())),
            }
        }
    }

    fn answer(&mut self, p: Pending) {
        match p {
            Pending::Claim(cmd, out) => {
                let out = out.unwrap_or(Err(Error::Closed));
                // The caller went away (an async claim whose future was dropped). If it had won
                // the record, free it now instead of leaving it locked until the timeout: on
                // the writer's own list, which is applied even while the engine shuts down.
                if let Err(unsent) = cmd.reply.send(out)
                    && let Ok(ClaimReply::Claimed(won)) = unsent.into_inner()
                {
                    let (fence, _) = won.disarm();
                    self.requeued.push(LeaseCmd::Release {
                        id: cmd.id,
                        fence,
                        reply: None,
                    });
                }
            }
            Pending::Lease(cmd, out) => self.answer_lease(cmd, out.unwrap_or(Err(Error::Closed))),
        }
    }

    fn answer_lease(&mut self, cmd: LeaseCmd, out: Result<i64>) {
        match cmd {
            LeaseCmd::Complete { reply, .. } => {
                let _ = reply.send(out.map(|_| ()));
            }
            LeaseCmd::Release { reply, .. } => {
                if let Some(reply) = reply {
                    let _ = reply.send(out.map(|_| ()));
                }
            }
            LeaseCmd::Extend { reply, .. } => {
                let _ = reply.send(out);
            }
            LeaseCmd::Shutdown(_) => {}
            #[cfg(feature = "fault-injection")]
            LeaseCmd::Panic => {}
        }
    }

    fn exec_claim(&mut self, c: &mut ClaimCmd, now: i64) -> Result<ClaimReply> {
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
            return Ok(ClaimReply::Claimed(Won {
                fence,
                locked_until,
                id: c.id,
                release: c.leases.take(),
            }));
        }
        match storage::inspect(&self.conn, &c.id, &c.fingerprint, now)? {
            Some(d) => Ok(ClaimReply::Decided(d)),
            None => Err(Error::Corrupt {
                detail: "a record blocked the claim but cannot be read back".into(),
            }),
        }
    }

    fn exec_lease(&mut self, cmd: &LeaseCmd, now: i64) -> Result<i64> {
        let owned = match cmd {
            LeaseCmd::Complete {
                id,
                fence,
                response,
                retention_ms,
                ..
            } => {
                let done = storage::complete(
                    &self.conn,
                    id,
                    *fence,
                    response,
                    now,
                    now.saturating_add(*retention_ms),
                )?;
                if done && self.syncer.is_some() {
                    // Before the commit that makes it visible: from then until its flush, no
                    // connection replays it.
                    self.shared.unsynced.add(id);
                    self.registered.push(*id);
                }
                done
            }
            LeaseCmd::Release { id, fence, .. } => storage::release(&self.conn, id, *fence)?,
            LeaseCmd::Extend {
                id,
                fence,
                lock_ms,
                retention_ms,
                ..
            } => {
                let until = now.saturating_add(*lock_ms);
                return if storage::extend(
                    &self.conn,
                    id,
                    *fence,
                    until,
                    until.saturating_add(*retention_ms),
                )? {
                    Ok(until)
                } else {
                    Err(Error::LeaseLost)
                };
            }
            LeaseCmd::Shutdown(_) => true,
            #[cfg(feature = "fault-injection")]
            LeaseCmd::Panic => true,
        };
        if owned {
            Ok(now)
        } else {
            Err(Error::LeaseLost)
        }
    }

    fn cleanup(&mut self) {
        let now = self.clock.now_ms();
        let chunk = self.cleanup_chunk;
        let started = Instant::now();
        let deleted = (|| -> Result<usize> {
            storage::begin(&self.conn)?;
            let n = storage::delete_expired(&self.conn, now, chunk)?;
            storage::commit(&self.conn)?;
            self.poke_checkpointer();
            Ok(n)
        })();
        let spent = started.elapsed();
        // Each delete dirties a page of the id index at random, so a transaction of a thousand
        // can hold the writer for tens of milliseconds: size the next one to fit the slice.
        if spent > CLEANUP_SLICE {
            self.cleanup_chunk = (chunk / 2).max(1);
        }
        match deleted {
            // A full chunk: there may be more. Go on at once when nobody is waiting; under
            // load, leave the writer to the callers for CLEANUP_YIELD times as long.
            Ok(n) if n >= chunk => {
                if spent < CLEANUP_SLICE / 2 {
                    self.cleanup_chunk = (chunk * 2).min(self.cleanup_batch);
                }
                let busy = !self.claims.is_empty() || !self.leases.is_empty();
                self.next_cleanup = match busy {
                    true => Instant::now() + spent * CLEANUP_YIELD,
                    false => Instant::now(),
                };
            }
            Ok(_) => self.next_cleanup = Instant::now() + self.cleanup_interval,
            Err(_) => {
                storage::rollback(&self.conn);
                self.next_cleanup = Instant::now() + self.cleanup_interval;
            }
        }
    }
}
