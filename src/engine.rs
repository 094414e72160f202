//! The engine handle, claims, outcomes and leases.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Sender, TrySendError};
use parking_lot::Mutex;
use rusqlite::Connection;

use crate::admin::{self, Answer, Change, Record, Stats};
use crate::cache::ReplayCache;
use crate::clock::{Clock, duration_ms};
use crate::config::{EngineConfig, Location};
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::{IdempotencyKey, record_id, validate_scope};
use crate::metrics::{ClaimTimer, Outcome, Source, Timer};
use crate::record::{Decision, Read};
use crate::response::StoredResponse;
use crate::sqlite::SqliteBackend;
use crate::sqlite::lock::EngineLock;
use crate::sqlite::storage;
use crate::sqlite::syncer::Unsynced;
use crate::writer::{self, ClaimCmd, ClaimReply, LeaseCmd, Shared};

/// What a caller asks to run: a scope (tenant or user), a validated key and the request's
/// fingerprint. The record's identity is (scope, key).
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    scope: String,
    key: IdempotencyKey,
    fingerprint: Fingerprint,
    lock_timeout: Option<Duration>,
    retention: Option<Duration>,
}

impl ClaimRequest {
    /// A claim of `key` in `scope` for a request with `fingerprint`.
    pub fn new(scope: impl Into<String>, key: IdempotencyKey, fingerprint: Fingerprint) -> Self {
        ClaimRequest {
            scope: scope.into(),
            key,
            fingerprint,
            lock_timeout: None,
            retention: None,
        }
    }

    /// Overrides the engine's lock timeout for this claim's lease.
    pub fn lock_timeout(mut self, lock_timeout: Duration) -> Self {
        self.lock_timeout = Some(lock_timeout);
        self
    }

    /// Overrides the engine's retention for the record this claim completes.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = Some(retention);
        self
    }

    /// The scope.
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The key.
    pub fn key(&self) -> &IdempotencyKey {
        &self.key
    }

    /// The fingerprint.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }
}

/// The answer to a claim. Exhaustive on purpose: every caller must handle all four cases.
#[derive(Debug)]
#[must_use = "a Claimed lease must be completed or released; the other cases answer the client"]
pub enum ClaimOutcome {
    /// No live record existed (or it expired, or its lock timed out): run the operation, then
    /// [`Lease::complete`] or [`Lease::release`].
    Claimed(Lease),
    /// The operation completed before: here is its stored response.
    Replay(StoredResponse),
    /// Another caller holds a live lease on the key.
    InFlight {
        /// When that lease's lock times out (at least 1 ms).
        retry_after: Duration,
    },
    /// The key was used with a different fingerprint. Decided before `InFlight`.
    Mismatch,
}

impl ClaimOutcome {
    fn from_decision(d: Decision, now: i64) -> Self {
        match d {
            Decision::Replay(r) => ClaimOutcome::Replay(r),
            Decision::Mismatch => ClaimOutcome::Mismatch,
            Decision::InFlight { locked_until } => ClaimOutcome::InFlight {
                retry_after: Duration::from_millis(
                    u64::try_from(locked_until.saturating_sub(now))
                        .unwrap_or(0)
                        .max(1),
                ),
            },
        }
    }
}

/// A cheap, cloneable handle to the idempotency engine. See the crate docs for the design.
///
/// Dropping the last handle (and the last [`Lease`]) drains the queue, commits, checkpoints the
/// WAL and joins the writer thread.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

// Field order matters: the senders drop before the joiner waits for the writer to finish, and
// the file lock goes last, once every connection to the file is closed.
struct Inner {
    claims: Sender<ClaimCmd>,
    leases: Sender<LeaseCmd>,
    shared: Arc<Shared>,
    closed: AtomicBool,
    readers: Option<ReaderPool>,
    /// PostgreSQL's read connections, and when they are worth a look.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    remote: Remote,
    /// Completed records replayed recently (see `cache.rs`); only with read connections.
    cache: Option<ReplayCache>,
    clock: Arc<dyn Clock>,
    lock_ms: i64,
    retention_ms: i64,
    /// Where an operator's reads open their own connection (`None`: an in-memory store,
    /// whose reads go through the writer).
    admin: Option<EngineConfig>,
    joiner: Joiner,
    /// The exclusive right to the database file (`lock.rs`); `None` in memory, and once
    /// [`Engine::shutdown`] has closed every connection.
    file: Mutex<Option<EngineLock>>,
}

impl Inner {
    /// Closes every connection to the database file and lets another engine open it: joins the
    /// writer thread (which has stopped, or is stopping), closes the read connections, drops
    /// the lock. Idempotent.
    fn let_go(&self) {
        if let Some(handle) = self.joiner.0.lock().take() {
            let _ = handle.join();
        }
        if let Some(readers) = &self.readers {
            readers.close();
        }
        #[cfg(feature = "postgres")]
        if let Some((readers, _)) = &self.remote {
            readers.close();
        }
        self.file.lock().take();
    }
}

struct Joiner(Mutex<Option<JoinHandle<()>>>);

impl Drop for Joiner {
    fn drop(&mut self) {
        if let Some(handle) = self.0.lock().take() {
            let _ = handle.join();
        }
    }
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("queued", &self.inner.claims.len())
            .field("closed", &self.inner.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Opens (or creates) the database and starts the writer thread.
    ///
    /// A database file serves one engine at a time: the engine takes an exclusive lock on
    /// `<file>-lock` first, and holds it until it is shut down (or dropped, or its process
    /// exits). Before it answers anything, it makes sure that everything it will read from the
    /// files is on disk: a previous engine killed with completions committed but not yet
    /// flushed, or stopped by a failed flush, may have left them in the OS page cache only.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`], [`Error::AlreadyOpen`], [`Error::NotADatabase`],
    /// [`Error::CannotOpen`], [`Error::ReadOnly`], [`Error::SchemaTooNew`], [`Error::NotWal`],
    /// [`Error::Busy`], [`Error::SyncFailed`] (the files could not be flushed) or
    /// [`Error::Storage`].
    // Without the `postgres` feature, `Remote` is `()`.
    #[cfg_attr(not(feature = "postgres"), allow(clippy::unit_arg))]
    pub fn open(mut config: EngineConfig) -> Result<Engine> {
        config.validate()?;
        #[cfg(feature = "postgres")]
        if let Location::Postgres(url) = &config.location {
            let (backend, readers) = crate::postgres::open(&config, url)?;
            // Every completed record the writer or a read connection returns is committed, so
            // durable: all of them may be cached.
            let cache = ReplayCache::new(config.replay_cache_bytes, config.replay_cache_max_age);
            let remote = readers.map(|r| (r, Gate::default()));
            let shared = Arc::new(Shared::new("postgres"));
            return Engine::start(backend, &config, shared, None, remote, cache, None);
        }
        let lock = match &config.location {
            Location::File(path) => Some(EngineLock::acquire(path, config.open_timeout)?),
            _ => None,
        };
        let conn = storage::open_writer(&config)?;
        if let Some(lock) = &lock {
            if let Err(e) = storage::make_durable(&conn, lock.db(), &config) {
                storage::no_checkpoint_on_close(&conn);
                return Err(e);
            }
            // From here on the resolved path: the syncer opens `<path>-wal` itself.
            config.location = Location::File(lock.db().to_path_buf());
        }
        let shared = Arc::new(Shared::new("sqlite"));
        let backend = SqliteBackend::new(conn, &config, shared.clone())?;
        let readers = match &config.location {
            Location::File(path) if config.read_connections > 0 => Some(ReaderPool {
                path: path.clone(),
                config: config.clone(),
                idle: Mutex::new(Idle::default()),
                open: AtomicUsize::new(0),
                in_use: AtomicUsize::new(0),
                max: config.read_connections,
                gate: Gate::default(),
            }),
            _ => None,
        };
        // Only with read connections: the writer's own replays may not be on disk yet.
        let cache = readers
            .as_ref()
            .and_then(|_| ReplayCache::new(config.replay_cache_bytes, config.replay_cache_max_age));
        Engine::start(
            backend,
            &config,
            shared,
            readers,
            Remote::default(),
            cache,
            lock,
        )
    }

    /// Starts the writer thread on an opened store.
    fn start<B: writer::Backend>(
        backend: B,
        config: &EngineConfig,
        shared: Arc<Shared>,
        readers: Option<ReaderPool>,
        remote: Remote,
        cache: Option<ReplayCache>,
        lock: Option<EngineLock>,
    ) -> Result<Engine> {
        let (claims_tx, claims_rx) = crossbeam_channel::bounded(config.queue_capacity);
        let (leases_tx, leases_rx) = crossbeam_channel::unbounded();
        let handle = writer::spawn(backend, config, claims_rx, leases_rx, shared.clone())?;
        Ok(Engine {
            inner: Arc::new(Inner {
                claims: claims_tx,
                leases: leases_tx,
                shared,
                closed: AtomicBool::new(false),
                cache,
                readers,
                remote,
                clock: config.clock.clone(),
                lock_ms: duration_ms(config.lock_timeout),
                retention_ms: duration_ms(config.retention),
                admin: match config.location {
                    Location::Memory => None,
                    _ => Some(config.clone()),
                },
                joiner: Joiner(Mutex::new(Some(handle))),
                file: Mutex::new(lock),
            }),
        })
    }

    /// [`Engine::open`] without blocking the caller's thread: the open (which may wait for
    /// [`EngineConfig::open_timeout`], recover and flush a WAL a crashed process left behind,
    /// and create or migrate the schema) runs on a thread of its own, and the returned future
    /// waits for it. Works on any executor (tokio, actix-rt, async-std, `block_on`).
    ///
    /// # Errors
    /// As [`Engine::open`]; [`Error::Storage`] if no thread can be started.
    pub async fn open_async(config: EngineConfig) -> Result<Engine> {
        let (tx, rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("idempotency-open".into())
            .spawn(move || {
                // Nobody waits any more (the future was dropped): the engine shuts down.
                let _ = tx.send(Engine::open(config));
            })
            .map_err(|e| Error::Storage(Arc::new(e)))?;
        rx.await.map_err(|_| {
            Error::Storage(Arc::new(std::io::Error::other(
                "the thread opening the engine panicked",
            )))
        })?
    }

    /// Opens the store a URL names, whatever its backend ([`EngineConfig::from_url`]: SQLite
    /// paths and `sqlite:` URLs, `postgres://` with the `postgres` feature), with the default
    /// settings, without blocking the caller's executor.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use idempotency_rs::Engine;
    /// let url = std::env::var("IDEMPOTENCY_STORE_URL").unwrap_or("sqlite::memory:".into());
    /// # let url = "sqlite::memory:";
    /// let engine = Engine::open_url(&url).await?;
    /// # drop(engine);
    /// # Ok::<(), idempotency_rs::Error>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    /// As [`EngineConfig::from_url`] and [`Engine::open`].
    pub async fn open_url(url: &str) -> Result<Engine> {
        Engine::open_async(EngineConfig::from_url(url)?).await
    }

    /// Claims `(scope, key)`, blocking the calling thread until the writer answers.
    ///
    /// Replays of completed records are served from a read connection without queueing behind
    /// writes. Do not call this on an async runtime thread: use [`Engine::claim_async`].
    ///
    /// # Errors
    /// [`Error::InvalidScope`]; [`Error::Overloaded`] when the queue is full (nothing was
    /// queued); [`Error::Closed`] or [`Error::WriterPanicked`]; a storage error of the batch
    /// ([`Error::DiskFull`], [`Error::Busy`], [`Error::Storage`]); [`Error::Corrupt`] when the
    /// stored record does not decode.
    pub fn claim(&self, request: ClaimRequest) -> Result<ClaimOutcome> {
        let mut timer = ClaimTimer::new();
        let who = Who::of(&request);
        let result = self.claim_blocking(request, &mut timer);
        self.observe_claim(timer, who, &result);
        result
    }

    #[cfg_attr(not(feature = "postgres"), allow(clippy::never_loop))]
    fn claim_blocking(
        &self,
        request: ClaimRequest,
        timer: &mut ClaimTimer,
    ) -> Result<ClaimOutcome> {
        #[cfg_attr(not(feature = "postgres"), allow(unused_mut))]
        let mut started = self.start_claim(request)?;
        loop {
            match started {
                Started::Done(outcome) => return Ok(outcome),
                Started::Queued(pending, rx) => {
                    timer.waits(true);
                    let reply = rx.recv().unwrap_or_else(|_| Err(self.inner.shared.gone()));
                    return self.finish_claim(pending, reply);
                }
                #[cfg(feature = "postgres")]
                Started::Reading(reading, rx) => {
                    timer.waits(false);
                    let found = rx.recv().ok();
                    started = self.after_read(*reading, found)?;
                }
            }
        }
    }

    /// Claims `(scope, key)` without blocking: the writer answers on a oneshot channel. Works on
    /// any executor (tokio, actix-rt, ...). If the future is dropped after the claim was queued
    /// and the claim wins, the writer releases the record itself.
    ///
    /// # Errors
    /// As [`Engine::claim`].
    pub async fn claim_async(&self, request: ClaimRequest) -> Result<ClaimOutcome> {
        let mut timer = ClaimTimer::new();
        let who = Who::of(&request);
        let result = self.claim_waiting(request, &mut timer).await;
        self.observe_claim(timer, who, &result);
        result
    }

    #[cfg_attr(not(feature = "postgres"), allow(clippy::never_loop))]
    async fn claim_waiting(
        &self,
        request: ClaimRequest,
        timer: &mut ClaimTimer,
    ) -> Result<ClaimOutcome> {
        #[cfg_attr(not(feature = "postgres"), allow(unused_mut))]
        let mut started = self.start_claim(request)?;
        loop {
            match started {
                Started::Done(outcome) => return Ok(outcome),
                Started::Queued(pending, rx) => {
                    timer.waits(true);
                    let reply = rx.await.unwrap_or_else(|_| Err(self.inner.shared.gone()));
                    return self.finish_claim(pending, reply);
                }
                #[cfg(feature = "postgres")]
                Started::Reading(reading, rx) => {
                    timer.waits(false);
                    let found = rx.await.ok();
                    started = self.after_read(*reading, found)?;
                }
            }
        }
    }

    /// Stops the engine: completions, releases and extensions queued before this call are
    /// committed and answered, claims still queued are refused with [`Error::Closed`] (a lease
    /// granted now could no longer be completed, so its operation must not run), the WAL is
    /// checkpointed, and every later call on any handle fails with [`Error::Closed`].
    /// Blocks until the writer thread has finished its work and every connection to the file
    /// is closed; another engine may then open the file, even while handles of this one live.
    ///
    /// # Errors
    /// [`Error::WriterPanicked`] if the writer had died; [`Error::SyncFailed`] if a flush of the
    /// WAL failed (before or during the shutdown; the WAL is then left for the next open, which
    /// makes it durable before it replays anything); [`Error::Closed`] if it was already shut
    /// down. The file is let go in every case.
    pub fn shutdown(&self) -> Result<()> {
        let result = self.stop_writer();
        self.inner.let_go();
        result
    }

    fn stop_writer(&self) -> Result<()> {
        if let Some(e) = self.inner.shared.ended() {
            return Err(e);
        }
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        // No claim reads from here on (`check_open` fails): close the read connections first,
        // so that the writer's connection is the file's last and its close removes the WAL.
        if let Some(readers) = &self.inner.readers {
            readers.close();
        }
        let (tx, rx) = oneshot::channel();
        self.inner
            .leases
            .send(LeaseCmd::Shutdown(tx))
            .map_err(|_| self.inner.shared.gone())?;
        rx.recv().map_err(|_| self.inner.shared.gone())?
    }

    /// The lock timeout of claims that do not set their own
    /// ([`EngineConfig::lock_timeout`](crate::EngineConfig::lock_timeout)).
    pub fn lock_timeout(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.inner.lock_ms).unwrap_or(0))
    }

    /// The retention of claims that do not set their own ([`EngineConfig::retention`](crate::EngineConfig::retention)).
    pub fn retention(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.inner.retention_ms).unwrap_or(0))
    }

    /// The engine's meters (for the layers' rejections).
    pub(crate) fn meters(&self) -> &crate::metrics::Meters {
        &self.inner.shared.meters
    }

    /// Commands waiting for the writer thread right now.
    pub fn queued(&self) -> usize {
        self.inner.claims.len() + self.inner.leases.len()
    }

    /// The record of `(scope, key)` as an operator sees it, expired ones included, with its
    /// stored response ([`admin`](crate::admin)). `None`: no record.
    ///
    /// Reads on a connection of its own (SQLite: a read-only one; PostgreSQL: a new one),
    /// never queued behind claims and never holding them up; an in-memory store is read by
    /// the writer between two batches. Blocks the calling thread.
    ///
    /// # Errors
    /// [`Error::InvalidScope`], [`Error::InvalidKey`], [`Error::Corrupt`] for a row that does
    /// not decode, a storage error, [`Error::Closed`].
    pub fn record(&self, scope: &str, key: &str) -> Result<Option<Record>> {
        let id = admin::id_of(scope, key)?;
        match self.admin_read(admin::Op::Record { id })? {
            Answer::Record(r) => Ok(r),
            other => Err(admin::unexpected(other)),
        }
    }

    /// Live in-flight records whose lease was granted at least `older_than` ago, oldest first,
    /// at most `limit` (without responses). Read as [`Engine::record`] reads.
    ///
    /// # Errors
    /// A storage error, [`Error::Corrupt`], [`Error::Closed`].
    pub fn in_flight(&self, older_than: Duration, limit: usize) -> Result<Vec<Record>> {
        let op = admin::in_flight_op(older_than, limit);
        match self.admin_read(op)? {
            Answer::Records(r) => Ok(r),
            other => Err(admin::unexpected(other)),
        }
    }

    /// The figures of the store: records by state, the oldest lease, the expired backlog,
    /// sizes, schema version. Read as [`Engine::record`] reads; it scans the table.
    ///
    /// # Errors
    /// A storage error, [`Error::Closed`].
    pub fn stats(&self) -> Result<Stats> {
        match self.admin_read(admin::Op::Stats)? {
            Answer::Stats(s) => Ok(s),
            other => Err(admin::unexpected(other)),
        }
    }

    /// Frees a stuck key: deletes its in-flight record, only if the record still carries
    /// `fencing_token` (read it with [`Engine::record`] or [`Engine::in_flight`]). The next
    /// claim runs the operation again; the lease that held the key, if it is still running,
    /// gets [`Error::LeaseLost`] when it completes, and stores nothing.
    ///
    /// Use it for a key whose holder is known to be gone, when its lock timeout is long. It
    /// goes through the writer, in a transaction of its own, on disk when this returns.
    ///
    /// # Errors
    /// [`Error::InvalidScope`], [`Error::InvalidKey`], a storage error, [`Error::Closed`].
    /// A record that is not there, completed, or under another token is not an error: the
    /// [`Change`] says which, and nothing was changed.
    pub fn force_release(&self, scope: &str, key: &str, fencing_token: u64) -> Result<Change> {
        let id = admin::id_of(scope, key)?;
        let change = self.admin_change(admin::Op::Release {
            id,
            fence: fencing_token,
        })?;
        tracing::warn!(
            scope,
            key,
            fence = fencing_token,
            outcome = %change,
            "idempotency: force-release of a key by an operator"
        );
        Ok(change)
    }

    /// Deletes a completed record: the next claim of its key runs the operation again. This
    /// engine stops replaying it at once (its replay cache included); another instance on a
    /// shared PostgreSQL store may still replay it from its cache for up to
    /// [`EngineConfig::replay_cache_max_age`](crate::EngineConfig::replay_cache_max_age). An
    /// in-flight record is not forgotten ([`Change::InFlight`]): release it under its token.
    ///
    /// # Errors
    /// As [`Engine::force_release`].
    pub fn forget(&self, scope: &str, key: &str) -> Result<Change> {
        let id = admin::id_of(scope, key)?;
        let change = self.admin_change(admin::Op::Forget { id })?;
        // Whatever the store answered, this engine stops replaying what it cached: on
        // `NotFound` another instance deleted the record first, and the entry here would
        // otherwise replay it until the cache's max age.
        if let Some(cache) = &self.inner.cache {
            cache.forget(&id);
        }
        tracing::warn!(scope, key, outcome = %change, "idempotency: a record forgotten by an operator");
        Ok(change)
    }

    /// Deletes every expired record now, and returns how many. It is the engine's own cleanup,
    /// run until the backlog is gone instead of every cleanup interval, and paced like it: in
    /// transactions sized to take about a millisecond (SQLite), and under load at most a ninth
    /// of the writer's time, so claims are not held up by a large backlog; it returns when the
    /// backlog is gone. On PostgreSQL, another instance's cleanup may be deleting the same
    /// backlog meanwhile: those rows are not counted here.
    ///
    /// On SQLite a record completed within its lock timeout stops being replayed exactly one
    /// retention after its completion, but is deleted from one retention after its lock
    /// expiry (the bound its claim set, so that the completion does not move its entry in the
    /// expiry index): it counts as expired in [`Engine::stats`] and [`Engine::record`] from
    /// the first moment, and is purged from the second, at most one lock timeout later.
    ///
    /// # Errors
    /// A storage error, [`Error::Closed`].
    pub fn purge_expired(&self) -> Result<u64> {
        self.check_open()?;
        let (reply, rx) = oneshot::channel();
        self.send_lease(LeaseCmd::Purge(reply))?;
        let n = rx.recv().map_err(|_| self.inner.shared.gone())??;
        tracing::info!(
            deleted = n,
            "idempotency: expired records purged by an operator"
        );
        Ok(n)
    }

    fn admin_read(&self, op: admin::Op) -> Result<Answer> {
        self.check_open()?;
        match &self.inner.admin {
            Some(config) => admin::Reader::open(config)?.run(&op, self.inner.clock.now_ms()),
            None => self.admin_writer(op),
        }
    }

    fn admin_change(&self, op: admin::Op) -> Result<Change> {
        match self.admin_writer(op)? {
            Answer::Change(c) => Ok(c),
            other => Err(admin::unexpected(other)),
        }
    }

    fn admin_writer(&self, op: admin::Op) -> Result<Answer> {
        self.check_open()?;
        let (reply, rx) = oneshot::channel();
        self.send_lease(LeaseCmd::Admin { op, reply })?;
        rx.recv().map_err(|_| self.inner.shared.gone())?
    }

    /// Makes the writer thread panic, to test how callers see a dead writer.
    /// Only with the `fault-injection` feature; never enable it in production.
    #[cfg(feature = "fault-injection")]
    pub fn inject_writer_panic(&self) {
        let _ = self.inner.leases.send(LeaseCmd::Panic);
    }

    /// Holds (`true`) or lets go (`false`) every flush of the WAL by the syncer thread: while
    /// held, completions are committed (visible in the database file's WAL) but not
    /// acknowledged, and not replayed. Only with [`Durability::Full`](crate::Durability::Full)
    /// on a file, and the `fault-injection` feature; never enable it in production. A held
    /// flush is let go when the engine shuts down.
    #[cfg(feature = "fault-injection")]
    pub fn inject_sync_pause(&self, paused: bool) {
        self.inner.shared.sync_faults.set_paused(paused);
    }

    /// Makes the syncer's next flush of the WAL fail as if `fdatasync` had returned an I/O
    /// error (see [`Error::SyncFailed`]). Only with the `fault-injection` feature.
    #[cfg(feature = "fault-injection")]
    pub fn inject_sync_failure(&self) {
        self.inner.shared.sync_faults.fail_next();
    }

    fn check_open(&self) -> Result<()> {
        if let Some(e) = self.inner.shared.ended() {
            return Err(e);
        }
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    fn start_claim(&self, req: ClaimRequest) -> Result<Started> {
        if let Err(e) = self.check_open().and_then(|()| validate_scope(&req.scope)) {
            return refused(Some(&req.scope), &req.key, e);
        }
        let id = record_id(&req.scope, req.key.as_str());
        let cache = self.inner.cache.as_ref();
        if let Some(cache) = cache {
            let now = self.inner.clock.now_ms();
            if let Some(record) = cache.get(&id, now) {
                let decision = record.decide(&req.fingerprint);
                self.replayed(&decision, Source::Cache);
                return Ok(Started::Done(ClaimOutcome::from_decision(decision, now)));
            }
        }
        if let Some(readers) = &self.inner.readers {
            let now = self.inner.clock.now_ms();
            let found = readers.lookup(
                &id,
                &req.fingerprint,
                now,
                &self.inner.shared.unsynced,
                cache,
            );
            if let Some(decision) = match found {
                Ok(found) => found,
                Err(e) => return refused(Some(&req.scope), &req.key, e),
            } {
                self.replayed(&decision, Source::ReadConnection);
                return Ok(Started::Done(ClaimOutcome::from_decision(decision, now)));
            }
        }
        #[cfg(feature = "postgres")]
        if let Some((readers, gate)) = &self.inner.remote
            && gate.worth_a_look()
            && let Some(rx) = readers.lookup(id)
        {
            return Ok(Started::Reading(Box::new(Reading { request: req, id }), rx));
        }
        self.queue_claim(req, id)
    }

    /// What a read connection found for a claim: a replay (or a mismatch) is its answer;
    /// nothing, or a failed read, sends the claim to the writer.
    #[cfg(feature = "postgres")]
    fn after_read(
        &self,
        reading: Reading,
        found: Option<crate::postgres::Found>,
    ) -> Result<Started> {
        let Reading { request, id } = reading;
        let gate = self.inner.remote.as_ref().map(|(_, gate)| gate);
        match found {
            Some(Ok(Some(record))) => {
                if let Some(gate) = gate {
                    gate.hit();
                }
                let decision = record.decide(&request.fingerprint);
                self.replayed(&decision, Source::ReadConnection);
                if let Some(cache) = &self.inner.cache {
                    cache.insert(id, record);
                }
                let now = self.inner.clock.now_ms();
                Ok(Started::Done(ClaimOutcome::from_decision(decision, now)))
            }
            // Nothing to replay there; or the read failed, or its connection went away (the
            // engine is closing): the writer has the final word (and the engine's error, when
            // it is closed).
            other => {
                if let (Some(Ok(None)), Some(gate)) = (&other, gate) {
                    gate.miss();
                }
                if let Err(e) = self.check_open() {
                    return refused(Some(&request.scope), &request.key, e);
                }
                self.queue_claim(request, id)
            }
        }
    }

    /// Sends a claim to the writer.
    fn queue_claim(&self, req: ClaimRequest, id: [u8; 32]) -> Result<Started> {
        let lock_ms = req.lock_timeout.map_or(self.inner.lock_ms, duration_ms);
        let retention_ms = req.retention.map_or(self.inner.retention_ms, duration_ms);
        let (tx, rx) = oneshot::channel();
        let cmd = ClaimCmd {
            id,
            scope: req.scope,
            key: req.key.as_str().to_owned(),
            fingerprint: req.fingerprint,
            lock_ms: lock_ms.max(1),
            retention_ms: retention_ms.max(1),
            reply: tx,
            leases: Some(self.inner.leases.clone()),
        };
        let pending = PendingClaim {
            id,
            key: req.key,
            fingerprint: req.fingerprint,
            lock_ms: lock_ms.max(1),
            retention_ms: retention_ms.max(1),
        };
        match self.inner.claims.try_send(cmd) {
            Ok(()) => match self.inner.shared.ended() {
                // The writer ended after `check_open`: its last sweep of the queue may have
                // missed this claim, which would then never be answered.
                Some(e) => refused(None, &pending.key, e),
                None => Ok(Started::Queued(pending, rx)),
            },
            Err(TrySendError::Full(cmd)) => refused(
                Some(&cmd.scope),
                &pending.key,
                Error::Overloaded {
                    retry_after: Duration::from_secs(1),
                },
            ),
            Err(TrySendError::Disconnected(cmd)) => {
                refused(Some(&cmd.scope), &pending.key, self.inner.shared.gone())
            }
        }
    }

    /// The writer's answer to a queued claim. (A failed batch is logged here, with the key:
    /// its scope went to the writer with the claim.)
    fn finish_claim(
        &self,
        pending: PendingClaim,
        reply: Result<ClaimReply>,
    ) -> Result<ClaimOutcome> {
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => return refused(None, &pending.key, e),
        };
        match reply {
            ClaimReply::Claimed(won) => {
                let (fence, locked_until, row) = won.disarm();
                self.inner.shared.meters.lease_granted();
                Ok(ClaimOutcome::Claimed(Lease {
                    engine: self.clone(),
                    id: pending.id,
                    key: pending.key,
                    fence,
                    row,
                    locked_until,
                    lock_ms: pending.lock_ms,
                    retention_ms: pending.retention_ms,
                    done: false,
                }))
            }
            ClaimReply::Decided(d) => {
                self.replayed(&d, Source::Writer);
                Ok(ClaimOutcome::from_decision(d, self.inner.clock.now_ms()))
            }
            ClaimReply::Completed(record) => {
                let decision = record.decide(&pending.fingerprint);
                self.replayed(&decision, Source::Writer);
                if let Some(cache) = &self.inner.cache {
                    cache.insert(pending.id, record);
                }
                Ok(ClaimOutcome::from_decision(
                    decision,
                    self.inner.clock.now_ms(),
                ))
            }
        }
    }

    fn send_lease(&self, cmd: LeaseCmd) -> Result<()> {
        self.inner
            .leases
            .send(cmd)
            .map_err(|_| self.inner.shared.gone())
    }

    fn replayed(&self, decision: &Decision, source: Source) {
        if let Decision::Replay(_) = decision {
            self.inner.shared.meters.replay(source);
        }
    }

    /// Meters and logs a claim's end: outcomes at debug, failures at warn (worth a retry) or
    /// error (the store is failing).
    fn observe_claim(&self, timer: ClaimTimer, who: Option<Who>, result: &Result<ClaimOutcome>) {
        let meters = &self.inner.shared.meters;
        match result {
            Ok(outcome) => {
                let (label, fence) = match outcome {
                    ClaimOutcome::Claimed(lease) => (Outcome::Claimed, Some(lease.fence)),
                    ClaimOutcome::Replay(_) => (Outcome::Replayed, None),
                    ClaimOutcome::InFlight { .. } => (Outcome::InFlight, None),
                    ClaimOutcome::Mismatch => (Outcome::Mismatch, None),
                };
                meters.claim(timer, label);
                if let Some(who) = who {
                    tracing::debug!(
                        scope = %who.scope,
                        key = %who.key,
                        outcome = label.as_str(),
                        fence,
                        "idempotency: claim"
                    );
                }
            }
            // Logged where it failed, with the scope and key at hand there (`refused`).
            Err(e) => meters.error("claim", e),
        }
    }
}

/// The scope and key of a claim, kept for its debug event only while that is enabled: a
/// copy of both on every claim measured +4% of the instructions of a replay from memory with
/// a subscriber at `info`. A failed claim is logged where it failed, with what is at hand.
struct Who {
    scope: String,
    key: IdempotencyKey,
}

impl Who {
    fn of(request: &ClaimRequest) -> Option<Who> {
        tracing::enabled!(tracing::Level::DEBUG).then(|| Who {
            scope: request.scope.clone(),
            key: request.key.clone(),
        })
    }
}

/// Logs a failed claim and returns its error.
fn refused<T>(scope: Option<&str>, key: &IdempotencyKey, e: Error) -> Result<T> {
    log_error("claim", scope, key, &e);
    Err(e)
}

/// A failed call, logged with its scope (when known) and key: warn when a retry may succeed
/// (overload, a busy or unreachable store, a lost lease), debug for a closed engine and
/// refused input (the layers answer those), error when the store is failing.
fn log_error(op: &'static str, scope: Option<&str>, key: &IdempotencyKey, e: &Error) {
    // As Display, like the claim events: `scope=acme key=order-17`.
    let (scope, key, kind) = (
        scope.map(tracing::field::display),
        tracing::field::display(key),
        e.kind(),
    );
    match e {
        Error::Closed | Error::InvalidScope { .. } | Error::InvalidKey { .. } => {
            tracing::debug!(scope, key, op, kind, error = %e, "idempotency: call refused");
        }
        Error::Overloaded { .. } | Error::Busy | Error::Unavailable { .. } | Error::LeaseLost => {
            tracing::warn!(scope, key, op, kind, error = %e, "idempotency: call failed");
        }
        _ => tracing::error!(scope, key, op, kind, error = %e, "idempotency: store failure"),
    }
}

/// PostgreSQL's read connections (none without the feature).
#[cfg(feature = "postgres")]
type Remote = Option<(crate::postgres::Readers, Gate)>;
#[cfg(not(feature = "postgres"))]
type Remote = ();

/// When a read path is worth a look: after [`MISSES_BEFORE_SKIPPING`] lookups in a row that
/// found nothing to replay, claims go straight to the writer (which answers replays too), but
/// one in [`PROBE_EVERY`] still looks, so that replays coming back (a retry storm) reopen the
/// read path at their first hit.
#[derive(Default)]
struct Gate {
    /// Lookups that found nothing since the last one that found a completed record.
    misses: AtomicU64,
    /// Claims that skipped the lookup (to probe one in [`PROBE_EVERY`] while skipping).
    skipped: AtomicU64,
}

impl Gate {
    fn worth_a_look(&self) -> bool {
        self.misses.load(Ordering::Relaxed) < MISSES_BEFORE_SKIPPING
            || self
                .skipped
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(PROBE_EVERY)
    }

    fn hit(&self) {
        // Not written when already 0: replays from several threads would fight over its
        // cache line for nothing.
        if self.misses.load(Ordering::Relaxed) != 0 {
            self.misses.store(0, Ordering::Relaxed);
        }
    }

    fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }
}

struct PendingClaim {
    id: [u8; 32],
    key: IdempotencyKey,
    fingerprint: Fingerprint,
    lock_ms: i64,
    retention_ms: i64,
}

enum Started {
    Done(ClaimOutcome),
    Queued(PendingClaim, oneshot::Receiver<Result<ClaimReply>>),
    /// Waiting for a PostgreSQL read connection.
    #[cfg(feature = "postgres")]
    Reading(Box<Reading>, oneshot::Receiver<crate::postgres::Found>),
}

/// A claim whose record a read connection is looking up.
#[cfg(feature = "postgres")]
struct Reading {
    request: ClaimRequest,
    id: [u8; 32],
}

/// Read-only connections that answer replays (and mismatches against completed records)
/// without going through the writer. Completed records never change until they expire, so a
/// snapshot read is as good as the writer's.
struct ReaderPool {
    path: PathBuf,
    config: EngineConfig,
    idle: Mutex<Idle>,
    open: AtomicUsize,
    /// Lookups under way (see [`ReaderPool::close`]).
    in_use: AtomicUsize,
    max: usize,
    gate: Gate,
}

/// After this many lookups in a row that found nothing to replay, claims skip the read
/// connections and go straight to the writer, which answers replays too: a workload of fresh
/// keys then does not pay for a B-tree search that always misses (~10% of the throughput of
/// fresh claims, measured with `--engine-readers 0`).
const MISSES_BEFORE_SKIPPING: u64 = 64;

/// While skipping, one claim in this many still looks, so that replays coming back (a retry
/// storm) reopen the read path at their first hit.
const PROBE_EVERY: u64 = 16;

#[derive(Default)]
struct Idle {
    conns: Vec<Connection>,
    /// Set by [`ReaderPool::close`]: no connection is opened or kept from then on.
    closed: bool,
}

impl ReaderPool {
    /// Closes every read connection, waiting for those in use (a lookup is one indexed read,
    /// bounded by the busy timeout): none may outlive the engine's lock on the file. Lookups
    /// after this find nothing and leave the claim to the writer, which answers it with the
    /// engine's closed error.
    fn close(&self) {
        let conns = {
            let mut idle = self.idle.lock();
            idle.closed = true;
            std::mem::take(&mut idle.conns)
        };
        drop(conns);
        while self.in_use.load(Ordering::SeqCst) != 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// `Ok(None)`: no completed record here, or not worth looking (see
    /// [`MISSES_BEFORE_SKIPPING`]); ask the writer. Errors other than a corrupt record also
    /// fall back to the writer, which has the final word.
    ///
    /// A completed record whose completion is not on disk yet is not replayed from here (it
    /// could still vanish in a power loss): the writer answers that claim after the flush.
    fn lookup(
        &self,
        id: &[u8; 32],
        fp: &Fingerprint,
        now: i64,
        unsynced: &Unsynced,
        cache: Option<&ReplayCache>,
    ) -> Result<Option<Decision>> {
        if !self.gate.worth_a_look() {
            return Ok(None);
        }
        self.in_use.fetch_add(1, Ordering::SeqCst);
        let result = self.read(id, fp, now);
        self.in_use.fetch_sub(1, Ordering::SeqCst);
        let Some(result) = result else {
            return Ok(None);
        };
        match &result {
            Ok(Some(_)) => self.gate.hit(),
            Ok(None) => self.gate.miss(),
            _ => {}
        }
        match result {
            Ok(Some(Read::Mismatch)) => Ok(Some(Decision::Mismatch)),
            // Checked after the read: see `Unsynced::contains`.
            Ok(Some(Read::Completed(_))) if unsynced.contains(id) => Ok(None),
            Ok(Some(Read::Completed(record))) => {
                let decision = record.decide(fp);
                if let Some(cache) = cache {
                    cache.insert(*id, record);
                }
                Ok(Some(decision))
            }
            Ok(None) => Ok(None),
            Err(e @ Error::Corrupt { .. }) => Err(e),
            Err(_) => Ok(None),
        }
    }

    /// One read on an idle connection (or a new one, up to `max`). `None`: no connection
    /// (the pool is full, closed, or a connection cannot be opened).
    fn read(&self, id: &[u8; 32], fp: &Fingerprint, now: i64) -> Option<Result<Option<Read>>> {
        let idle = {
            let mut idle = self.idle.lock();
            if idle.closed {
                return None;
            }
            idle.conns.pop()
        };
        let conn = match idle {
            Some(c) => c,
            None => {
                if self.open.fetch_add(1, Ordering::SeqCst) >= self.max {
                    self.open.fetch_sub(1, Ordering::SeqCst);
                    return None;
                }
                match storage::open_reader(&self.path, &self.config) {
                    Ok(c) => c,
                    Err(_) => {
                        self.open.fetch_sub(1, Ordering::SeqCst);
                        return None;
                    }
                }
            }
        };
        let result = storage::read_completed(&conn, id, fp, now);
        let mut idle = self.idle.lock();
        if !idle.closed {
            idle.conns.push(conn);
        }
        Some(result)
    }
}

/// The right to run the operation for one key: a linear token, like a database transaction.
///
/// [`complete`](Lease::complete) stores the response; [`release`](Lease::release) frees the key
/// so a retry runs the operation again. Dropping the lease releases the key without blocking.
/// Every lease carries a fencing token that grows with every claim: a lease whose lock timed out
/// and whose record was taken over gets [`Error::LeaseLost`] and changes nothing.
#[must_use = "dropping a lease releases the key: complete it to store the response"]
pub struct Lease {
    engine: Engine,
    id: [u8; 32],
    key: IdempotencyKey,
    fence: u64,
    /// Where the store keeps the record (SQLite's rowid), if it says.
    row: Option<i64>,
    locked_until: i64,
    lock_ms: i64,
    retention_ms: i64,
    done: bool,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("fencing_token", &self.fence)
            .field("locked_until", &self.locked_until())
            .finish()
    }
}

impl Lease {
    /// The fencing token: larger than every token handed out before it.
    pub fn fencing_token(&self) -> u64 {
        self.fence
    }

    /// The key this lease holds.
    pub fn key(&self) -> &IdempotencyKey {
        &self.key
    }

    /// When the lock times out (after which another caller may take the record over).
    pub fn locked_until(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(u64::try_from(self.locked_until).unwrap_or(0))
    }

    /// Stores `response` for replay and ends the lease. Blocks until the completion is
    /// committed (with [`Durability::Full`](crate::Durability::Full), until it is on disk).
    ///
    /// # Errors
    /// [`Error::LeaseLost`] when the record was taken over; [`Error::TooLarge`],
    /// [`Error::DiskFull`] or another storage error when it could not be stored;
    /// [`Error::Closed`]. On any of these errors the record stays in flight until its lock
    /// timeout: a failed completion never turns into an immediate re-run by a retry.
    /// [`Error::SyncFailed`] when the completion was committed but the flush that was to make
    /// it durable failed: it may or may not have reached the disk, this engine never replays
    /// it, and the engine stops.
    pub fn complete(mut self, response: StoredResponse) -> Result<()> {
        let timer = Timer::start();
        let result = self
            .send_complete(response)
            .and_then(|rx| rx.recv().map_err(|_| self.engine.inner.shared.gone())?);
        self.completed(timer, result)
    }

    /// [`Lease::complete`] without blocking.
    ///
    /// # Errors
    /// As [`Lease::complete`].
    pub async fn complete_async(mut self, response: StoredResponse) -> Result<()> {
        let timer = Timer::start();
        let result = match self.send_complete(response) {
            Ok(rx) => rx.await.map_err(|_| self.engine.inner.shared.gone())?,
            Err(e) => Err(e),
        };
        self.completed(timer, result)
    }

    /// Frees the key: the next claim runs the operation again. Blocks until committed.
    ///
    /// # Errors
    /// [`Error::LeaseLost`], a storage error, or [`Error::Closed`].
    pub fn release(mut self) -> Result<()> {
        let result = self
            .send_release()
            .and_then(|rx| rx.recv().map_err(|_| self.engine.inner.shared.gone())?);
        self.observe("release", result)
    }

    /// [`Lease::release`] without blocking.
    ///
    /// # Errors
    /// As [`Lease::release`].
    pub async fn release_async(mut self) -> Result<()> {
        let result = match self.send_release() {
            Ok(rx) => rx.await.map_err(|_| self.engine.inner.shared.gone())?,
            Err(e) => Err(e),
        };
        self.observe("release", result)
    }

    /// Moves the lock timeout to `by` from now, for operations that run longer than the lock
    /// timeout. Blocks until committed.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] when the record was already taken over; a storage error;
    /// [`Error::Closed`].
    pub fn extend(&mut self, by: Duration) -> Result<()> {
        let result = self
            .send_extend(by)
            .and_then(|rx| rx.recv().map_err(|_| self.engine.inner.shared.gone())?);
        self.locked_until = self.observe("extend", result)?;
        Ok(())
    }

    /// [`Lease::extend`] without blocking.
    ///
    /// # Errors
    /// As [`Lease::extend`].
    pub async fn extend_async(&mut self, by: Duration) -> Result<()> {
        let result = match self.send_extend(by) {
            Ok(rx) => rx.await.map_err(|_| self.engine.inner.shared.gone())?,
            Err(e) => Err(e),
        };
        self.locked_until = self.observe("extend", result)?;
        Ok(())
    }

    /// [`Lease::observe`] for a completion, and its duration when it was stored.
    fn completed(&self, timer: Timer, result: Result<()>) -> Result<()> {
        if result.is_ok() {
            self.engine.inner.shared.meters.completed(timer);
        }
        self.observe("complete", result)
    }

    /// Meters and logs the end of a lease command: debug when done, warn or error when not.
    fn observe<T>(&self, op: &'static str, result: Result<T>) -> Result<T> {
        let meters = &self.engine.inner.shared.meters;
        match &result {
            Ok(_) => {
                tracing::debug!(key = %self.key, fence = self.fence, op, "idempotency: lease");
            }
            Err(e) => {
                meters.error(op, e);
                let kind = e.kind();
                match e {
                    Error::LeaseLost
                    | Error::Overloaded { .. }
                    | Error::Busy
                    | Error::Unavailable { .. }
                    | Error::Closed => {
                        tracing::warn!(key = %self.key, fence = self.fence, op, kind, error = %e, "idempotency: lease command failed");
                    }
                    _ => {
                        tracing::error!(key = %self.key, fence = self.fence, op, kind, error = %e, "idempotency: lease command failed: store failure")
                    }
                }
            }
        }
        result
    }

    fn send_complete(&mut self, response: StoredResponse) -> Result<oneshot::Receiver<Result<()>>> {
        let (tx, rx) = oneshot::channel();
        // From here on the lease is spent, whatever happens: a completion that fails leaves the
        // record in flight until its lock timeout rather than freeing it for a re-run.
        self.done = true;
        self.engine.send_lease(LeaseCmd::Complete {
            id: self.id,
            fence: self.fence,
            row: self.row,
            response,
            retention_ms: self.retention_ms,
            reply: tx,
        })?;
        Ok(rx)
    }

    fn send_release(&mut self) -> Result<oneshot::Receiver<Result<()>>> {
        let (tx, rx) = oneshot::channel();
        self.done = true;
        self.engine.send_lease(LeaseCmd::Release {
            id: self.id,
            fence: self.fence,
            reply: Some(tx),
        })?;
        Ok(rx)
    }

    fn send_extend(&mut self, by: Duration) -> Result<oneshot::Receiver<Result<i64>>> {
        let (tx, rx) = oneshot::channel();
        self.engine.send_lease(LeaseCmd::Extend {
            id: self.id,
            fence: self.fence,
            lock_ms: duration_ms(by).max(1),
            retention_ms: self.retention_ms,
            reply: tx,
        })?;
        Ok(rx)
    }

    /// The lock timeout this lease was claimed with.
    pub fn lock_timeout(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.lock_ms).unwrap_or(0))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.engine.inner.shared.meters.lease_ended();
        if !self.done {
            // Fire and forget on the unbounded lease queue: never blocks. If the engine is gone
            // the lock timeout frees the key.
            let _ = self.engine.inner.leases.send(LeaseCmd::Release {
                id: self.id,
                fence: self.fence,
                reply: None,
            });
        }
    }
}
