//! What an operator reaches: records by scope and key, the leases in flight, the store's
//! figures, and the few changes an operator may make (free a stuck key under its fencing
//! token, forget a completed record, purge expired ones).
//!
//! Two ways in:
//! * from a running service, through its [`Engine`]: [`Engine::record`],
//!   [`Engine::in_flight`], [`Engine::stats`], [`Engine::force_release`], [`Engine::forget`],
//!   [`Engine::purge_expired`];
//! * from outside, on a store nobody else writes to or beside a running service, with a
//!   [`Store`]: read-only unless opened with [`Access::ReadWrite`]. This is what the
//!   `idempotency-rs` command-line tool uses.
//!
//! Reads never wait for the writer and never block it: on SQLite they run on a read-only
//! connection of their own (WAL readers and the writer do not wait for each other), on
//! PostgreSQL on a connection of their own.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use crate::config::redact_url;
use crate::config::{EngineConfig, Location};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;
use crate::key::{IdempotencyKey, record_id, validate_scope};
use crate::record::{RawRecord, STATE_COMPLETED, STATE_IN_FLIGHT};
use crate::response::StoredResponse;

/// Where a record stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RecordState {
    /// A lease holds it (or held it: see [`Record::lock_timed_out`]); the operation may be
    /// running.
    InFlight,
    /// The operation completed; its response is replayed until the record expires.
    Completed,
    /// Past its expiry: claims no longer see it, and the next cleanup deletes it.
    Expired,
}

impl RecordState {
    /// `in_flight`, `completed` or `expired`.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordState::InFlight => "in_flight",
            RecordState::Completed => "completed",
            RecordState::Expired => "expired",
        }
    }
}

impl std::fmt::Display for RecordState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record as an operator sees it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Record {
    /// The scope (tenant or user).
    pub scope: String,
    /// The client's idempotency key.
    pub key: String,
    /// In flight, completed or expired.
    pub state: RecordState,
    /// The fingerprint of the request that claimed it.
    pub fingerprint: Fingerprint,
    /// The fencing token of the record's current (or last) lease.
    pub fencing_token: u64,
    /// When the current lease was granted.
    pub created_at: SystemTime,
    /// When the operation completed (completed records).
    pub completed_at: Option<SystemTime>,
    /// When the lease's lock times out (in-flight records).
    pub locked_until: Option<SystemTime>,
    /// When the record stops counting: a claim after it runs the operation again.
    pub expires_at: SystemTime,
    /// The stored response (completed records; never in [`Engine::in_flight`]'s list).
    pub response: Option<StoredResponse>,
}

impl Record {
    /// An in-flight record whose lock has timed out at `now`: the next claim with the same
    /// fingerprint takes it over (its holder's completion then fails with
    /// [`Error::LeaseLost`]).
    pub fn lock_timed_out(&self, now: SystemTime) -> bool {
        self.state == RecordState::InFlight && self.locked_until.is_some_and(|t| t <= now)
    }
}

/// The figures of a store.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Stats {
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    /// Live in-flight records (leases, held or with a timed-out lock).
    pub in_flight: u64,
    /// Live completed records.
    pub completed: u64,
    /// Records past their expiry, waiting for the cleanup (the backlog).
    pub expired: u64,
    /// When the oldest live in-flight lease was granted.
    pub oldest_in_flight: Option<SystemTime>,
    /// In-flight records whose lock has timed out (nobody has taken them over yet).
    pub lock_timed_out: u64,
    /// The schema version of the store.
    pub schema_version: i64,
    /// SQLite: the database file's size (pages in use included); PostgreSQL: the table's,
    /// indexes and TOAST included.
    pub size_bytes: u64,
    /// SQLite: the write-ahead log's size (`None` when there is none); PostgreSQL: `None`.
    pub wal_bytes: Option<u64>,
}

/// What a change asked of one record did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// Done.
    Done,
    /// No live record has that scope and key.
    NotFound,
    /// The record is in flight (forgetting it is refused: release it under its fencing token).
    InFlight {
        /// Its current fencing token.
        fencing_token: u64,
    },
    /// The record is completed (releasing it is refused: forget it if it must go).
    Completed,
    /// The record is in flight under another fencing token than the one given: the lease
    /// that was meant has already ended, and another took the record. Nothing was changed.
    FenceMoved {
        /// The record's fencing token now.
        current: u64,
    },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Done => f.write_str("done"),
            Change::NotFound => f.write_str("no live record has that scope and key"),
            Change::InFlight { fencing_token } => write!(
                f,
                "the record is in flight (fencing token {fencing_token}): release it under that token instead"
            ),
            Change::Completed => {
                f.write_str("the record is completed: forget it instead if it must go")
            }
            Change::FenceMoved { current } => write!(
                f,
                "the record's fencing token is {current}, not the one given: the record is held under another lease, and nothing was changed"
            ),
        }
    }
}

/// A record row as both stores read it (times in ms since the epoch).
pub(crate) struct Row {
    pub(crate) scope: String,
    pub(crate) key: String,
    pub(crate) fingerprint: Vec<u8>,
    pub(crate) state: i64,
    pub(crate) fence: i64,
    pub(crate) locked_until: i64,
    pub(crate) expires_at: i64,
    pub(crate) created_at: i64,
    pub(crate) completed_at: Option<i64>,
    pub(crate) status: Option<i64>,
    pub(crate) headers: Option<Vec<u8>>,
    pub(crate) body: Option<Vec<u8>>,
    pub(crate) trailers: Option<Vec<u8>>,
}

/// Milliseconds since the epoch as a time (0 for anything before it).
pub(crate) fn time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

impl Row {
    /// The record, checked: a row that is not what the engine writes is [`Error::Corrupt`].
    pub(crate) fn into_record(self, now: i64, with_response: bool) -> Result<Record> {
        let corrupt = |detail: String| Error::Corrupt {
            detail: format!("record ({:?}, {:?}): {detail}", self.scope, self.key),
        };
        let fingerprint: [u8; 32] = self
            .fingerprint
            .as_slice()
            .try_into()
            .map_err(|_| corrupt(format!("fingerprint of {} bytes", self.fingerprint.len())))?;
        let live = self.expires_at > now;
        let state = match self.state {
            _ if !live => RecordState::Expired,
            STATE_IN_FLIGHT => RecordState::InFlight,
            STATE_COMPLETED => RecordState::Completed,
            s => return Err(corrupt(format!("unknown state {s}"))),
        };
        let fencing_token = u64::try_from(self.fence)
            .map_err(|_| corrupt(format!("fencing token {}", self.fence)))?;
        let response = match (self.state, with_response) {
            (STATE_COMPLETED, true) => Some(
                RawRecord {
                    fingerprint: Vec::new(),
                    state: self.state,
                    locked_until: self.locked_until,
                    status: self.status,
                    headers: self.headers,
                    body: self.body,
                    trailers: self.trailers,
                }
                .into_response()
                .map_err(|e| match e {
                    Error::Corrupt { detail } => corrupt(detail),
                    e => e,
                })?,
            ),
            _ => None,
        };
        Ok(Record {
            scope: self.scope,
            key: self.key,
            state,
            fingerprint: Fingerprint::from_bytes(fingerprint),
            fencing_token,
            created_at: time(self.created_at),
            completed_at: self.completed_at.map(time),
            locked_until: (self.state == STATE_IN_FLIGHT).then(|| time(self.locked_until)),
            expires_at: time(self.expires_at),
            response,
        })
    }
}

/// What the writer is asked to do for an operator.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Record { id: [u8; 32] },
    InFlight { older_than_ms: i64, limit: usize },
    Stats,
    Check,
    Release { id: [u8; 32], fence: u64 },
    Forget { id: [u8; 32] },
}

/// Its answer.
#[derive(Debug)]
pub(crate) enum Answer {
    Record(Option<Record>),
    Records(Vec<Record>),
    Stats(Stats),
    Problems(Vec<String>),
    Change(Change),
}

/// What a backend found for a release or a forget that changed nothing: the record's state
/// and fence, to explain why.
pub(crate) fn explain(found: Option<(i64, i64)>, release: bool) -> Change {
    match found {
        None => Change::NotFound,
        Some((STATE_IN_FLIGHT, fence)) if release => Change::FenceMoved {
            current: u64::try_from(fence).unwrap_or(0),
        },
        Some((STATE_IN_FLIGHT, fence)) => Change::InFlight {
            fencing_token: u64::try_from(fence).unwrap_or(0),
        },
        Some(_) if release => Change::Completed,
        // A forget that found a completed record deleted it: not reached.
        Some(_) => Change::Done,
    }
}

/// How a [`Store`] is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Access {
    /// Reads only: never writes a record, creates no store, works beside a running engine.
    /// (Like every reader of an SQLite database in WAL mode, it may create the `-wal` and
    /// `-shm` files beside a store that has none, and so needs write access to its
    /// directory.)
    #[default]
    ReadOnly,
    /// Reads, and the changes of [`Store::release`], [`Store::forget`] and
    /// [`Store::purge_expired`]. An SQLite store serves one engine at a time: opening it for
    /// writing while a service runs on it fails with [`Error::AlreadyOpen`] (go through that
    /// service's engine instead). A PostgreSQL store accepts it beside running services.
    ReadWrite,
}

/// A store opened from outside a service, by URL: for tools and scripts.
///
/// ```
/// use idempotency_rs::admin::{Access, Store};
/// use idempotency_rs::{ClaimOutcome, ClaimRequest, Engine, EngineConfig, Fingerprint, IdempotencyKey};
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("store.db");
/// let engine = Engine::open(EngineConfig::new(&path))?;
/// let key = IdempotencyKey::new("order-1")?;
/// let ClaimOutcome::Claimed(lease) =
///     engine.claim(ClaimRequest::new("acme", key, Fingerprint::of_request("POST", "/", b"")))?
/// else { unreachable!() };
///
/// // Beside the running engine: reading works.
/// let store = Store::open(path.to_str().unwrap(), Access::ReadOnly)?;
/// let record = store.record("acme", "order-1")?.expect("in flight");
/// assert_eq!(record.fencing_token, lease.fencing_token());
/// assert_eq!(store.stats()?.in_flight, 1);
/// # drop(lease);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Store {
    reader: Reader,
    /// The configuration's clock: what "expired" means to this store's reads, as to its
    /// engine's changes.
    clock: std::sync::Arc<dyn crate::Clock>,
    /// With [`Access::ReadWrite`]: the changes go through an engine of its own.
    writer: Option<Engine>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("writable", &self.writer.is_some())
            .finish_non_exhaustive()
    }
}

/// A read connection of either store.
pub(crate) enum Reader {
    Sqlite(crate::sqlite::admin::SqliteReader),
    #[cfg(feature = "postgres")]
    Postgres(Box<crate::postgres::admin::PgReader>),
}

impl Reader {
    /// A read connection to the store `config` names. Checks that the store exists and is
    /// ours; creates nothing.
    pub(crate) fn open(config: &EngineConfig) -> Result<Reader> {
        match &config.location {
            Location::File(path) => Ok(Reader::Sqlite(crate::sqlite::admin::SqliteReader::open(
                path, config,
            )?)),
            Location::Memory => Err(Error::InvalidConfig {
                reason: "an in-memory store cannot be opened from outside its engine".into(),
            }),
            #[cfg(feature = "postgres")]
            Location::Postgres(url) => Ok(Reader::Postgres(Box::new(
                crate::postgres::admin::PgReader::open(config, url)?,
            ))),
        }
    }

    pub(crate) fn run(&self, op: &Op, now: i64) -> Result<Answer> {
        match self {
            Reader::Sqlite(r) => r.run(op, now),
            #[cfg(feature = "postgres")]
            Reader::Postgres(r) => r.run(op, now),
        }
    }
}

impl Store {
    /// Opens the store a URL names ([`EngineConfig::from_url`]).
    ///
    /// # Errors
    /// As [`Store::open_config`].
    pub fn open(url: &str, access: Access) -> Result<Store> {
        Store::open_config(EngineConfig::from_url(url)?, access)
    }

    /// Opens the store `config` names. The store must exist and be an idempotency-rs store:
    /// nothing is created.
    ///
    /// # Errors
    /// [`Error::CannotOpen`] (no such file), [`Error::NotADatabase`], [`Error::Refused`] (a
    /// database, but not an idempotency-rs store), [`Error::SchemaTooNew`],
    /// [`Error::Unavailable`]; with [`Access::ReadWrite`], [`Error::AlreadyOpen`] when an
    /// engine holds an SQLite store (after the config's
    /// [`open_timeout`](EngineConfig::open_timeout)), and whatever [`Engine::open`] returns.
    pub fn open_config(config: EngineConfig, access: Access) -> Result<Store> {
        let reader = Reader::open(&config)?;
        let clock = config.clock.clone();
        let writer = match access {
            Access::ReadOnly => None,
            // The reader has checked that the store is ours: the engine creates nothing.
            Access::ReadWrite => Some(Engine::open(config.read_connections(0))?),
        };
        Ok(Store {
            reader,
            clock,
            writer,
        })
    }

    fn read(&self, op: &Op) -> Result<Answer> {
        self.reader.run(op, self.clock.now_ms())
    }

    fn writer(&self) -> Result<&Engine> {
        self.writer.as_ref().ok_or_else(|| Error::InvalidConfig {
            reason: "the store was opened read-only: open it with Access::ReadWrite to change it"
                .into(),
        })
    }

    /// The figures of the store.
    ///
    /// # Errors
    /// A storage error.
    pub fn stats(&self) -> Result<Stats> {
        match self.read(&Op::Stats)? {
            Answer::Stats(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// The record of `(scope, key)`, expired ones included, with its stored response.
    ///
    /// # Errors
    /// [`Error::InvalidScope`], [`Error::InvalidKey`]; [`Error::Corrupt`] for a row that does
    /// not decode; a storage error.
    pub fn record(&self, scope: &str, key: &str) -> Result<Option<Record>> {
        let id = id_of(scope, key)?;
        match self.read(&Op::Record { id })? {
            Answer::Record(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Live in-flight records whose lease was granted at least `older_than` ago, oldest
    /// first, at most `limit` (without responses).
    ///
    /// # Errors
    /// A storage error, or [`Error::Corrupt`].
    pub fn in_flight(&self, older_than: Duration, limit: usize) -> Result<Vec<Record>> {
        match self.read(&in_flight_op(older_than, limit))? {
            Answer::Records(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Checks the store: the database's own integrity check, then every record decoded.
    /// Returns the problems found (empty: none).
    ///
    /// # Errors
    /// A storage error that stopped the check itself.
    pub fn check(&self) -> Result<Vec<String>> {
        match self.read(&Op::Check)? {
            Answer::Problems(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    /// Frees a stuck key, only if its in-flight record still carries `fencing_token`: see
    /// [`Engine::force_release`].
    ///
    /// # Errors
    /// As [`Engine::force_release`]; [`Error::InvalidConfig`] on a read-only store.
    pub fn release(&self, scope: &str, key: &str, fencing_token: u64) -> Result<Change> {
        self.writer()?.force_release(scope, key, fencing_token)
    }

    /// Deletes a completed record: see [`Engine::forget`].
    ///
    /// # Errors
    /// As [`Engine::forget`]; [`Error::InvalidConfig`] on a read-only store.
    pub fn forget(&self, scope: &str, key: &str) -> Result<Change> {
        self.writer()?.forget(scope, key)
    }

    /// Deletes every expired record now: see [`Engine::purge_expired`].
    ///
    /// # Errors
    /// As [`Engine::purge_expired`]; [`Error::InvalidConfig`] on a read-only store.
    pub fn purge_expired(&self) -> Result<u64> {
        self.writer()?.purge_expired()
    }

    /// Closes the store; with [`Access::ReadWrite`], shuts its engine down (committing and
    /// flushing what it changed).
    ///
    /// # Errors
    /// As [`Engine::shutdown`].
    pub fn close(self) -> Result<()> {
        // The read connection first: the engine's connection is then the file's last, and its
        // close removes the WAL.
        drop(self.reader);
        match self.writer {
            Some(engine) => engine.shutdown(),
            None => Ok(()),
        }
    }
}

/// The record id of `(scope, key)`, both checked as a claim checks them.
pub(crate) fn id_of(scope: &str, key: &str) -> Result<[u8; 32]> {
    validate_scope(scope)?;
    let key = IdempotencyKey::new(key)?;
    Ok(record_id(scope, key.as_str()))
}

pub(crate) fn in_flight_op(older_than: Duration, limit: usize) -> Op {
    Op::InFlight {
        older_than_ms: crate::clock::duration_ms(older_than),
        limit,
    }
}

pub(crate) fn unexpected(answer: Answer) -> Error {
    Error::Corrupt {
        detail: format!("the store answered an operator's request with {answer:?}"),
    }
}
