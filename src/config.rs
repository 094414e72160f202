//! Engine configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};

/// How hard a completion is pushed to disk before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// When `complete` returns `Ok`, the stored response is on disk: it survives a power loss or
    /// an OS crash.
    ///
    /// Every batch is committed without waiting for `fsync` (`synchronous=NORMAL`); claims,
    /// releases and extensions are answered right after the commit, and a syncer thread then
    /// flushes the WAL (`fdatasync`) and answers the batch's completions, while the writer is
    /// already committing the next batch (one flush covers every completion committed before
    /// it started). Losing an un-flushed claim, release or extension to a power loss is the
    /// same as its holder crashing (see the crate docs, *Design*).
    ///
    /// Until its flush, a completion counts as in flight: nobody gets it as a replay, because a
    /// power loss could still erase it. A retry arriving in that window waits for the flush
    /// (one or two `fdatasync`s) and then gets the replay. If a flush fails, the completions it
    /// covered get [`Error::SyncFailed`](crate::Error::SyncFailed) and the engine stops.
    ///
    /// On an in-memory database (nothing to flush) this behaves like [`Durability::Normal`].
    #[default]
    Full,
    /// Nothing waits for `fsync`: a completion is acknowledged, and replayed, as soon as it is
    /// committed. An application crash loses nothing, but a power loss or OS crash can lose the
    /// last completions acknowledged before it, and a retry of one of those runs the operation
    /// again. The database itself is never corrupted.
    Normal,
}

/// Where the database lives.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Location {
    File(PathBuf),
    Memory,
    /// A PostgreSQL URL (`postgres://...`), checked when the engine opens.
    #[cfg(feature = "postgres")]
    Postgres(String),
}

/// Settings for [`Engine::open`](crate::Engine::open). Build it with [`EngineConfig::new`] or
/// [`EngineConfig::in_memory`] and the chained setters.
///
/// ```
/// use std::time::Duration;
/// use idempotency_rs::{Durability, EngineConfig};
/// let config = EngineConfig::new("idempotency.db")
///     .durability(Durability::Full)
///     .lock_timeout(Duration::from_secs(30))
///     .retention(Duration::from_secs(24 * 3600));
/// # let _ = config;
/// ```
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub(crate) location: Location,
    pub(crate) durability: Durability,
    pub(crate) lock_timeout: Duration,
    pub(crate) retention: Duration,
    pub(crate) queue_capacity: usize,
    pub(crate) max_batch: usize,
    pub(crate) cleanup_interval: Duration,
    pub(crate) cleanup_batch: usize,
    pub(crate) read_connections: usize,
    pub(crate) replay_cache_bytes: usize,
    pub(crate) replay_cache_max_age: Duration,
    pub(crate) cache_size_kib: i64,
    pub(crate) busy_timeout: Duration,
    pub(crate) max_page_count: Option<u32>,
    pub(crate) page_size: Option<u32>,
    pub(crate) open_timeout: Duration,
    pub(crate) clock: Arc<dyn Clock>,
    #[cfg(feature = "postgres")]
    pub(crate) postgres: PostgresSettings,
    #[cfg(feature = "fault-injection")]
    pub(crate) fail_open_sync: bool,
}

// By hand: a PostgreSQL URL's password never reaches a log through `{:?}`.
impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::File(path) => f.debug_tuple("File").field(path).finish(),
            Location::Memory => f.write_str("Memory"),
            #[cfg(feature = "postgres")]
            Location::Postgres(url) => f.debug_tuple("Postgres").field(&redact_url(url)).finish(),
        }
    }
}

/// A URL (or a `key=value` connection string) with every password in it replaced by `***`,
/// for messages and `Debug`: the user info's password (up to the first `@`, as libpq and
/// tokio-postgres read it, whatever it holds) and every `password=` parameter.
///
/// ```
/// use idempotency_rs::admin::redact_url;
/// assert_eq!(
///     redact_url("postgres://app:secret@db/app?password=x&sslmode=require"),
///     "postgres://app:***@db/app?password=***&sslmode=require"
/// );
/// ```
pub fn redact_url(url: &str) -> String {
    let mut out = match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((userinfo, after)) if userinfo.contains(':') => {
                let user = userinfo.split(':').next().unwrap_or_default();
                format!("{scheme}://{user}:***@{after}")
            }
            _ => url.to_owned(),
        },
        None => url.to_owned(),
    };
    let mut from = 0;
    while let Some(at) = out[from..].find("password=") {
        let start = from + at + "password=".len();
        let end = out[start..]
            .find(['&', ' '])
            .map_or(out.len(), |n| start + n);
        out.replace_range(start..end, "***");
        from = start + 3;
    }
    out
}

/// The settings only a PostgreSQL store reads.
#[cfg(feature = "postgres")]
#[derive(Debug, Clone)]
pub(crate) struct PostgresSettings {
    pub(crate) table: String,
    pub(crate) statement_timeout: Duration,
    pub(crate) database_clock: Option<Arc<dyn Clock>>,
}

impl EngineConfig {
    /// A configuration for the database file at `path` (created if missing), with the defaults:
    /// [`Durability::Full`], 30 s lock timeout, 24 h retention, a queue of 4096 commands, batches
    /// of up to 512, cleanup every 60 s in batches of 1000 rows, 4 read connections.
    pub fn new(path: impl AsRef<Path>) -> Self {
        Self::with_location(Location::File(path.as_ref().to_path_buf()))
    }

    /// A private in-memory database (for tests). It is not WAL (memory databases cannot be) and
    /// has no read connections: everything goes through the writer thread.
    pub fn in_memory() -> Self {
        Self::with_location(Location::Memory)
    }

    /// A configuration for the PostgreSQL database at `url` (`postgres://user@host/db` or
    /// `postgresql://...`), shared by every instance that names it. Checked when the engine
    /// opens. `sslmode` takes libpq's values: `disable`, `prefer` (the default), `require`
    /// (encrypted, the server's certificate unchecked, as in libpq), `verify-ca` and
    /// `verify-full` (checked against `sslrootcert=FILE`, or the Mozilla roots, with the host
    /// name checked in both). TLS is rustls.
    ///
    /// The SQLite settings ([`durability`](Self::durability) aside) do not apply: see
    /// [`table`](Self::table), [`statement_timeout`](Self::statement_timeout).
    #[cfg(feature = "postgres")]
    pub fn postgres(url: impl Into<String>) -> Self {
        Self::with_location(Location::Postgres(url.into()))
    }

    /// The configuration a store URL names, whatever its backend: `sqlite:PATH`,
    /// `sqlite://PATH`, a plain path, `sqlite::memory:` (or `:memory:`), and with the
    /// `postgres` feature `postgres://...` and `postgresql://...`.
    ///
    /// ```
    /// # use idempotency_rs::EngineConfig;
    /// let config = EngineConfig::from_url("sqlite:idempotency.db")?;
    /// # let _ = config;
    /// # Ok::<(), idempotency_rs::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a URL of another scheme, a PostgreSQL URL without the
    /// `postgres` feature, or an SQLite URL that names no file.
    pub fn from_url(url: &str) -> Result<Self> {
        let trimmed = url.trim();
        if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
            #[cfg(feature = "postgres")]
            {
                crate::postgres::check_url(trimmed)?;
                return Ok(Self::postgres(trimmed));
            }
            #[cfg(not(feature = "postgres"))]
            return Err(Error::InvalidConfig {
                reason: "a PostgreSQL URL needs idempotency-rs's `postgres` feature".into(),
            });
        }
        crate::middleware::parse_url(trimmed)
    }

    /// PostgreSQL only: the table of records, `name` or `schema.name` (lower-case letters,
    /// digits and `_`). Default `idempotency_records`, in the first schema of the
    /// connection's `search_path`. The store also owns `<name>_meta` (its schema version) and
    /// the sequence `<name>_fence` (fencing tokens), created beside it on the first open.
    #[cfg(feature = "postgres")]
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.postgres.table = table.into();
        self
    }

    /// PostgreSQL only: the longest one statement may run (`SET LOCAL statement_timeout` in
    /// each transaction, so it holds behind PgBouncer too), and how long connecting and a
    /// batch's answer are awaited. Past it, the batch's callers get
    /// [`Error::Unavailable`](crate::Error::Unavailable). Default 5 s.
    #[cfg(feature = "postgres")]
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.postgres.statement_timeout = timeout;
        self
    }

    /// PostgreSQL only: the most connections this engine opens, the writer's and `n - 1` read
    /// connections that answer replays beside it (the same as
    /// [`read_connections(n - 1)`](Self::read_connections)). Read connections connect at
    /// their first lookup. Default 5; 1 sends every claim to the writer.
    #[cfg(feature = "postgres")]
    pub fn pool_size(mut self, n: usize) -> Self {
        self.read_connections = n.saturating_sub(1);
        self
    }

    /// PostgreSQL only, **for tests and simulations**: take "now" from this clock instead of
    /// the database server's. By default every lock timeout and expiry is decided by the
    /// server's clock, so that instances whose clocks drift agree; set this to move time by
    /// hand in a test (with the same clock as [`clock`](Self::clock)).
    #[cfg(feature = "postgres")]
    pub fn database_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.postgres.database_clock = Some(clock);
        self
    }

    fn with_location(location: Location) -> Self {
        EngineConfig {
            location,
            durability: Durability::Full,
            lock_timeout: Duration::from_secs(30),
            retention: Duration::from_secs(24 * 3600),
            queue_capacity: 4096,
            max_batch: 512,
            cleanup_interval: Duration::from_secs(60),
            cleanup_batch: 1000,
            read_connections: 4,
            replay_cache_bytes: 8 << 20,
            replay_cache_max_age: Duration::from_secs(10),
            cache_size_kib: 16 * 1024,
            busy_timeout: Duration::from_secs(5),
            max_page_count: None,
            page_size: None,
            open_timeout: Duration::ZERO,
            clock: Arc::new(SystemClock),
            #[cfg(feature = "postgres")]
            postgres: PostgresSettings {
                table: "idempotency_records".into(),
                statement_timeout: Duration::from_secs(5),
                database_clock: None,
            },
            #[cfg(feature = "fault-injection")]
            fail_open_sync: false,
        }
    }

    /// Sets the durability. Default [`Durability::Full`].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// How long a lease lives before another caller may take the record over. Default 30 s.
    /// A single claim may override it ([`ClaimRequest::lock_timeout`](crate::ClaimRequest::lock_timeout)).
    pub fn lock_timeout(mut self, lock_timeout: Duration) -> Self {
        self.lock_timeout = lock_timeout;
        self
    }

    /// How long a completed record is replayed. Default 24 h.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// The writer's queue length. A claim that finds it full fails at once with
    /// [`Error::Overloaded`]. Default 4096.
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity;
        self
    }

    /// The most commands committed in one transaction. Default 512.
    pub fn max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch;
        self
    }

    /// How often the writer deletes expired records, and how many at most per transaction.
    /// Defaults: 60 s, 1000.
    ///
    /// Deleting is paced so that it hurts the callers' latency as little as possible: the
    /// writer sizes each cleanup transaction to take about 1 ms (up to `batch` rows), and while
    /// a backlog of expired records remains it goes on at once when idle but gives it at most
    /// a ninth of its time when commands are waiting. Expired records are already absent for
    /// claims, so a backlog costs only disk space while it lasts; but a load that keeps the
    /// writer saturated around the clock creates records faster than that share deletes them.
    pub fn cleanup(mut self, interval: Duration, batch: usize) -> Self {
        self.cleanup_interval = interval;
        self.cleanup_batch = batch;
        self
    }

    /// How many bytes of completed responses the replay cache keeps in memory. Default 8 MiB;
    /// 0 turns it off.
    ///
    /// A replay served by a read connection is kept there (up to this budget, the oldest
    /// dropped first; a response over a 32nd of it is not kept), so a storm of retries of the
    /// same keys skips SQLite. It is always right: a completed record cannot change before it
    /// expires, every hit checks the expiry, and only records already flushed to disk are kept.
    /// A record deleted through this engine ([`Engine::forget`](crate::Engine::forget)) leaves
    /// the cache at once; one deleted any other way (by another instance on a shared
    /// PostgreSQL store, or by hand) is replayed for at most
    /// [`replay_cache_max_age`](Self::replay_cache_max_age).
    pub fn replay_cache_bytes(mut self, bytes: usize) -> Self {
        self.replay_cache_bytes = bytes;
        self
    }

    /// The longest the replay cache keeps an entry after reading it. Default 10 s; zero turns
    /// the cache off.
    ///
    /// This bounds how long a record deleted outside this engine is still replayed from its
    /// memory: forgotten by another instance on a shared PostgreSQL store, or deleted by SQL
    /// by hand. (The record's own expiry bounds every entry too.)
    pub fn replay_cache_max_age(mut self, max_age: Duration) -> Self {
        self.replay_cache_max_age = max_age;
        self
    }

    /// How many read-only connections serve replays beside the writer. 0 sends every claim to
    /// the writer. Default 4. On PostgreSQL each is a connection of its own (see
    /// `pool_size`).
    pub fn read_connections(mut self, n: usize) -> Self {
        self.read_connections = n;
        self
    }

    /// SQLite's page cache per connection, in KiB. Default 16384 (16 MiB).
    pub fn cache_size_kib(mut self, kib: i64) -> Self {
        self.cache_size_kib = kib;
        self
    }

    /// How long a statement waits for a lock held by another process before failing with
    /// [`Error::Busy`]. Default 5 s.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// The page size of a database file this engine creates, in bytes: a power of two from 512
    /// to 65536. Default SQLite's, 4096. An existing file keeps the size it was created with.
    ///
    /// Each claim writes one leaf of the record-id index, at a random place in it (the ids are
    /// hashes), so the page size sets most of what a claim writes: 2048 writes about 30% fewer
    /// bytes per claim and completion than 4096 (4.7 against 6.8 KB at 64 callers, WAL and
    /// checkpoints, `make bench-cpu`), for ~2% more instructions and the same throughput on a
    /// local SSD; worth it where writes are scarce or billed (cloud block storage, flash wear).
    /// Responses over about half a page spill into overflow pages. The WAL's bounds do not
    /// depend on it: a checkpoint every 8 MiB of growth, a rewind forced from 64 MiB.
    pub fn page_size(mut self, bytes: u32) -> Self {
        self.page_size = Some(bytes);
        self
    }

    /// Caps the database file at this many pages (SQLite's `max_page_count`; pages are 4 KiB
    /// unless [`Self::page_size`] says otherwise).
    /// When the cap is reached, writes fail with [`Error::DiskFull`] exactly as on a full disk,
    /// and nothing of the failed batch is applied. Default: no cap.
    pub fn max_page_count(mut self, pages: u32) -> Self {
        self.max_page_count = Some(pages);
        self
    }

    /// How long [`Engine::open`](crate::Engine::open) waits for another engine that has the
    /// same database file open to stop, before failing with
    /// [`Error::AlreadyOpen`](crate::Error::AlreadyOpen). Default: no wait.
    ///
    /// A database file serves one engine at a time (see [`Error::AlreadyOpen`] for why). Set a
    /// wait when a new process may start while the old one is still shutting down (a restart
    /// that overlaps); the old engine lets go of the file when it is shut down, or when its
    /// process exits, however it exits.
    pub fn open_timeout(mut self, wait: Duration) -> Self {
        self.open_timeout = wait;
        self
    }

    /// Makes [`Engine::open`](crate::Engine::open) fail with
    /// [`Error::SyncFailed`](crate::Error::SyncFailed) as if flushing the files to disk had
    /// failed: after it has opened the database, before it flushes or checkpoints anything.
    /// Only with the `fault-injection` feature; never enable it in production.
    #[cfg(feature = "fault-injection")]
    pub fn inject_open_sync_failure(mut self) -> Self {
        self.fail_open_sync = true;
        self
    }

    /// The clock used for leases and retention. Default [`SystemClock`].
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |reason: &str| {
            Err(Error::InvalidConfig {
                reason: reason.to_owned(),
            })
        };
        if self.queue_capacity == 0 {
            return bad("queue_capacity must be at least 1");
        }
        if self.max_batch == 0 {
            return bad("max_batch must be at least 1");
        }
        if self.cleanup_batch == 0 {
            return bad("the cleanup batch must be at least 1");
        }
        if self.lock_timeout.is_zero() {
            return bad("lock_timeout must be longer than zero");
        }
        if self.retention.is_zero() {
            return bad("retention must be longer than zero");
        }
        if let Some(size) = self.page_size
            && !(size.is_power_of_two() && (512..=65536).contains(&size))
        {
            return bad("page_size must be a power of two from 512 to 65536");
        }
        if self.cleanup_interval.is_zero() {
            return bad("the cleanup interval must be longer than zero");
        }
        #[cfg(feature = "postgres")]
        if self.postgres.statement_timeout.is_zero() {
            return bad("statement_timeout must be longer than zero");
        }
        // PostgreSQL holds it in an int of milliseconds (about 24.8 days).
        #[cfg(feature = "postgres")]
        if self.postgres.statement_timeout > Duration::from_millis(i32::MAX as u64) {
            return bad("statement_timeout must be at most 2147483647 ms (about 24.8 days)");
        }
        Ok(())
    }
}
