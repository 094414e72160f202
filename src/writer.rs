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

use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::record::Decision;
use crate::response::StoredResponse;
use crate::sqlite::syncer::{AfterSync, Syncer, Unsynced};

/// Rows in the first cleanup transaction (or the configured batch, if smaller).
const CLEANUP_FIRST_CHUNK: usize = 64;

/// While commands are waiting, a backlog of expired records gets at most one part in
/// `1 + CLEANUP_YIELD` of the writer's time: after a cleanup transaction, the next waits this
/// many times as long as it took. Expired records are already invisible to claims, so a backlog
/// only costs disk space while it lasts.
const CLEANUP_YIELD: u32 = 8;

/// What the writer needs of a store. The writer decides what goes into a batch, in which
/// order, and what every caller is told; a backend runs a batch as one transaction and says
/// what each command found. SQLite (`sqlite/backend.rs`) and PostgreSQL (`postgres/`) are the
/// two.
pub(crate) trait Backend: Send + 'static {
    /// Runs `work` in one transaction and commits it. `Ok`: committed, with one result per
    /// command, in order (a command that failed on its own changed nothing). `Err`: nothing of
    /// the batch is applied, or whether it was is unknown (a lost `COMMIT`): every command gets
    /// the error, and no claim of it is a lease.
    fn run(&mut self, work: &[Work<'_>]) -> Result<Vec<Result<Done>>>;

    /// Deletes up to `limit` expired records, in a transaction of its own.
    fn delete_expired(&mut self, limit: usize) -> Result<usize>;

    /// The longest a cleanup transaction should hold the writer: the number of rows per
    /// transaction halves when one takes longer, and doubles (up to the configured batch) when
    /// one takes less than half of it.
    fn cleanup_slice(&self) -> Duration;

    /// Housekeeping between two batches.
    fn between_batches(&mut self) {}

    /// The thread that acknowledges completions once they are on disk, for a store whose
    /// commit does not wait for the disk.
    fn syncer(&self) -> Option<&Syncer> {
        None
    }

    /// An operator's request ([`crate::admin`]), between two batches: changes in a
    /// transaction of their own, on disk when this returns.
    fn admin(&mut self, op: &crate::admin::Op) -> Result<crate::admin::Answer>;

    /// The writer is stopping (`failure`: a flush failed): last words to the store.
    fn stop(&mut self, failure: Option<&Error>) {
        let _ = failure;
    }
}

/// One command of a batch, as a backend sees it.
#[derive(Clone, Copy)]
pub(crate) enum Work<'a> {
    Claim(&'a ClaimCmd),
    Complete {
        id: &'a [u8; 32],
        fence: u64,
        /// Where the claim found the record in the store ([`Done::Won`]), if the store says.
        row: Option<i64>,
        response: &'a StoredResponse,
        retention_ms: i64,
    },
    Release {
        id: &'a [u8; 32],
        fence: u64,
    },
    Extend {
        id: &'a [u8; 32],
        fence: u64,
        lock_ms: i64,
        retention_ms: i64,
    },
}

impl Work<'_> {
    fn of(cmd: &LeaseCmd) -> Option<Work<'_>> {
        match cmd {
            LeaseCmd::Complete {
                id,
                fence,
                row,
                response,
                retention_ms,
                ..
            } => Some(Work::Complete {
                id,
                fence: *fence,
                row: *row,
                response,
                retention_ms: *retention_ms,
            }),
            LeaseCmd::Release { id, fence, .. } => Some(Work::Release { id, fence: *fence }),
            LeaseCmd::Extend {
                id,
                fence,
                lock_ms,
                retention_ms,
                ..
            } => Some(Work::Extend {
                id,
                fence: *fence,
                lock_ms: *lock_ms,
                retention_ms: *retention_ms,
            }),
            _ => None,
        }
    }
}

/// What one command found.
#[derive(Debug)]
pub(crate) enum Done {
    /// The claim took the record (times in the engine clock's terms). `row`: where the record
    /// is in the store (SQLite's rowid), for the completion to find it without the id index;
    /// `None` when the store has no such thing.
    Won {
        fence: u64,
        locked_until: i64,
        row: Option<i64>,
    },
    /// The claim could not take it.
    Decided(Decision),
    /// A completed record the claim replays, that the engine may keep in its replay cache.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Replay(crate::cache::Completed),
    /// A completion or release: whether the lease still owned its record.
    Owned(bool),
    /// An extension: the new lock expiry, `None` when the lease lost its record.
    Until(Option<i64>),
}

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
    /// A replay the engine may cache (see [`Done::Replay`]).
    Completed(crate::cache::Completed),
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
    pub(crate) row: Option<i64>,
    id: [u8; 32],
    release: Option<Sender<LeaseCmd>>,
}

impl Won {
    /// The fencing token and lock expiry, for the lease that now owns the record: dropping
    /// this no longer releases it.
    pub(crate) fn disarm(mut self) -> (u64, i64, Option<i64>) {
        self.release = None;
        (self.fence, self.locked_until, self.row)
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
        row: Option<i64>,
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
    /// An operator's request, run after the batch it arrives with.
    Admin {
        op: crate::admin::Op,
        reply: oneshot::Sender<Result<crate::admin::Answer>>,
    },
    /// An operator's purge of the expired records: the cleanup, run until the backlog is
    /// gone (answered with how many rows it deleted).
    Purge(oneshot::Sender<Result<u64>>),
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
#[derive(Debug)]
pub(crate) struct Shared {
    /// The engine's meters (empty without the `metrics` feature).
    pub(crate) meters: crate::metrics::Meters,
    exit: Mutex<Option<Exit>>,
    exited: Condvar,
    /// Completions committed but not yet flushed: never replayed (see `syncer.rs`).
    pub(crate) unsynced: Unsynced,
    /// Set once a flush of the WAL failed; the error stays.
    sync_failed: AtomicBool,
    sync_failure: Mutex<Option<Error>>,
    #[cfg(feature = "fault-injection")]
    pub(crate) sync_faults: crate::sqlite::syncer::SyncFaults,
}

impl Shared {
    /// The shared state of a new engine on `backend` (`sqlite`, `postgres`).
    pub(crate) fn new(backend: &'static str) -> Shared {
        Shared {
            meters: crate::metrics::Meters::new(backend),
            exit: Mutex::default(),
            exited: Condvar::new(),
            unsynced: Unsynced::default(),
            sync_failed: AtomicBool::new(false),
            sync_failure: Mutex::default(),
            #[cfg(feature = "fault-injection")]
            sync_faults: Default::default(),
        }
    }

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

/// Starts the writer thread on an opened store.
pub(crate) fn spawn<B: Backend>(
    backend: B,
    config: &EngineConfig,
    claims: Receiver<ClaimCmd>,
    leases: Receiver<LeaseCmd>,
    shared: Arc<Shared>,
) -> Result<std::thread::JoinHandle<()>> {
    // A bounded crossbeam channel keeps its messages when its receiver is dropped, so a claim
    // still queued when the writer ends (a panic, or a claim racing a shutdown) would wait for
    // its answer forever. This second receiver sweeps the queue once the end is announced.
    let stranded = claims.clone();
    let writer = Writer {
        backend,
        shared: shared.clone(),
        claims,
        leases,
        max_batch: config.max_batch,
        cleanup_interval: config.cleanup_interval,
        cleanup_batch: config.cleanup_batch,
        cleanup_chunk: config.cleanup_batch.min(CLEANUP_FIRST_CHUNK),
        next_cleanup: crate::clock::instant_after(config.cleanup_interval),
        requeued: Vec::new(),
        purges: Vec::new(),
        next_flush: crate::clock::instant_after(match cfg!(feature = "metrics") {
            true => crate::metrics::FLUSH_EVERY,
            false => Duration::MAX,
        }),
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

struct Writer<B: Backend> {
    /// First: when a panic drops the writer, the store's helper threads stop (and answer what
    /// they were handed) before anything else goes.
    backend: B,
    shared: Arc<Shared>,
    claims: Receiver<ClaimCmd>,
    leases: Receiver<LeaseCmd>,
    max_batch: usize,
    cleanup_interval: Duration,
    cleanup_batch: usize,
    /// Rows deleted per cleanup transaction now: adapted to the backend's cleanup slice, at
    /// most `cleanup_batch`.
    cleanup_chunk: usize,
    next_cleanup: Instant,
    /// Releases of claims whose caller went away before the answer arrived.
    requeued: Vec<LeaseCmd>,
    /// Operators waiting for the expired backlog to be gone ([`Engine::purge_expired`]), with
    /// the rows deleted since each asked. The purge is the cleanup, run until a chunk comes
    /// back short, and paced like it: claims are never held up by it.
    ///
    /// [`Engine::purge_expired`]: crate::Engine::purge_expired
    purges: Vec<(oneshot::Sender<Result<u64>>, u64)>,
    /// When the meters' per-thread counts are next added to the recorder's (never without
    /// the `metrics` feature).
    next_flush: Instant,
}

/// One command of a batch, with what its caller will be told.
enum Pending {
    Claim(ClaimCmd, Option<Result<ClaimReply>>),
    Lease(LeaseCmd, Option<Result<i64>>),
}

impl<B: Backend> Writer<B> {
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
            let mut admin = Vec::new();
            for p in batch {
                match p {
                    Pending::Lease(LeaseCmd::Shutdown(ack), _) => shutdown = Some(ack),
                    Pending::Lease(LeaseCmd::Admin { op, reply }, _) => admin.push((op, reply)),
                    Pending::Lease(LeaseCmd::Purge(reply), _) => {
                        self.purges.push((reply, 0));
                        self.next_cleanup = Instant::now();
                    }
                    #[cfg(feature = "fault-injection")]
                    Pending::Lease(LeaseCmd::Panic, _) => {
                        panic!("injected writer panic (fault-injection feature)")
                    }
                    p => rest.push(p),
                }
            }
            if let Some(e) = failure {
                for (_, reply) in admin {
                    let _ = reply.send(Err(e.clone()));
                }
                for (reply, _) in self.purges.drain(..) {
                    let _ = reply.send(Err(e.clone()));
                }
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
            // After the batch they came with: an operator's read sees every command sent
            // before it.
            for (op, reply) in admin {
                let _ = reply.send(self.backend.admin(&op));
            }
            if disconnected && self.requeued.is_empty() {
                break;
            }
            if Instant::now() >= self.next_cleanup {
                self.cleanup();
            }
            if Instant::now() >= self.next_flush {
                self.shared.meters.flush();
                self.next_flush = Instant::now() + crate::metrics::FLUSH_EVERY;
            }
            self.backend.between_batches();
        }
        self.shared.meters.flush();
        let failure = self.shared.sync_failure();
        for (reply, _) in self.purges.drain(..) {
            let _ = reply.send(Err(failure.clone().unwrap_or(Error::Closed)));
        }
        self.backend.stop(failure.as_ref());
        if let Some(ack) = shutdown {
            let _ = ack.send(failure.clone().map_or(Ok(()), Err));
        }
        failure.map_or(Exit::Clean, Exit::Failed)
    }

    /// Waits for the first command, or until the next cleanup is due.
    fn wait(&self) -> Result<Pending, RecvTimeoutError> {
        let timeout = self
            .next_cleanup
            .min(self.next_flush)
            .saturating_duration_since(Instant::now());
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

    /// Commits a batch in one transaction (the backend's) and answers it: with a syncer,
    /// completions (and replays of completions not yet on disk) after its next flush;
    /// everything else at once. See the crate docs, *Design*.
    fn process(&mut self, mut batch: Vec<Pending>) {
        if batch.is_empty() {
            return;
        }
        // A claim whose caller is gone (an async claim dropped while queued) is not run: it
        // would only lock the key until the release this writer would then queue, and a retry
        // of the same key in this batch would be told to wait for a whole lock timeout. It is
        // answered `Closed`, which nobody reads.
        let mut index = Vec::with_capacity(batch.len());
        let mut work = Vec::with_capacity(batch.len());
        for (i, p) in batch.iter().enumerate() {
            let w = match p {
                Pending::Claim(cmd, _) if cmd.reply.is_closed() => None,
                Pending::Claim(cmd, _) => Some(Work::Claim(cmd)),
                Pending::Lease(cmd, _) => Work::of(cmd),
            };
            if let Some(w) = w {
                work.push(w);
                index.push(i);
            }
        }
        let results = if work.is_empty() {
            Ok(Vec::new())
        } else {
            let started = crate::metrics::Timer::start();
            let results = self.backend.run(&work);
            let (claims, leases) = (&self.claims, &self.leases);
            self.shared
                .meters
                .batch(work.len(), started, || claims.len() + leases.len());
            results
        };
        drop(work);
        let results = match results {
            Ok(r) => r,
            Err(e) => return self.fail_all(batch, e),
        };
        for (i, r) in index.into_iter().zip(results) {
            match &mut batch[i] {
                Pending::Claim(cmd, out) => {
                    *out = Some(r.and_then(|done| match done {
                        Done::Won {
                            fence,
                            locked_until,
                            row,
                        } => Ok(ClaimReply::Claimed(Won {
                            fence,
                            locked_until,
                            row,
                            id: cmd.id,
                            release: cmd.leases.take(),
                        })),
                        Done::Decided(d) => Ok(ClaimReply::Decided(d)),
                        Done::Replay(c) => Ok(ClaimReply::Completed(c)),
                        other => Err(unexpected(other)),
                    }));
                }
                Pending::Lease(_, out) => {
                    *out = Some(r.and_then(|done| match done {
                        Done::Owned(true) => Ok(0),
                        Done::Owned(false) | Done::Until(None) => Err(Error::LeaseLost),
                        Done::Until(Some(until)) => Ok(until),
                        other => Err(unexpected(other)),
                    }));
                }
            }
        }
        if let Some(syncer) = self.backend.syncer() {
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

    /// Answers every command of a batch that was not committed (or whose commit is unknown)
    /// with `e`. No claim of it holds a lease (none was handed out), so nothing is released:
    /// a record a lost `COMMIT` did write stays in flight until its lock timeout.
    fn fail_all(&mut self, batch: Vec<Pending>, e: Error) {
        for p in batch {
            match p {
                Pending::Claim(cmd, _) => {
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
                    let (fence, _, _) = won.disarm();
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
            LeaseCmd::Admin { reply, .. } => {
                let _ = reply.send(out.and(Err(Error::Closed)));
            }
            LeaseCmd::Purge(reply) => {
                let _ = reply.send(out.and(Err(Error::Closed)));
            }
            #[cfg(feature = "fault-injection")]
            LeaseCmd::Panic => {}
        }
    }

    fn cleanup(&mut self) {
        let chunk = self.cleanup_chunk;
        let slice = self.backend.cleanup_slice();
        let started = Instant::now();
        let deleted = self.backend.delete_expired(chunk);
        let spent = started.elapsed();
        match &deleted {
            Ok(n) => {
                self.shared.meters.cleaned(*n);
                for (_, total) in &mut self.purges {
                    *total += *n as u64;
                }
                if *n < chunk {
                    for (reply, total) in self.purges.drain(..) {
                        let _ = reply.send(Ok(total));
                    }
                }
            }
            Err(e) => {
                self.shared.meters.error("cleanup", e);
                tracing::error!(kind = e.kind(), error = %e, "idempotency: cleanup of expired records failed");
                for (reply, _) in self.purges.drain(..) {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
        // Each delete dirties a page of the id index at random, so a transaction of a thousand
        // can hold the writer for tens of milliseconds: size the next one to fit the slice.
        if spent > slice {
            self.cleanup_chunk = (chunk / 2).max(1);
        }
        match deleted {
            // A full chunk: there may be more. Go on at once when nobody is waiting; under
            // load, leave the writer to the callers for CLEANUP_YIELD times as long.
            Ok(n) if n >= chunk => {
                if spent < slice / 2 {
                    self.cleanup_chunk = (chunk * 2).min(self.cleanup_batch);
                }
                let busy = !self.claims.is_empty() || !self.leases.is_empty();
                self.next_cleanup = match busy {
                    true => Instant::now() + spent * CLEANUP_YIELD,
                    false => Instant::now(),
                };
            }
            Ok(_) | Err(_) => {
                self.next_cleanup = crate::clock::instant_after(self.cleanup_interval)
            }
        }
    }
}

/// A backend answered a command with a result of another kind: a bug, reported to that
/// caller rather than panicking the writer.
fn unexpected(done: Done) -> Error {
    Error::Corrupt {
        detail: format!("the store answered a command with {done:?}"),
    }
}
