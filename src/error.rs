//! The one error type of the crate.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Everything that can go wrong in the engine.
///
/// The enum is `#[non_exhaustive]`: new failure kinds may be added in a minor release. Every
/// variant is cheap to clone, so one failed group commit can hand the same error to each caller in
/// the batch.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Error {
    /// The idempotency key is empty, too long or holds characters outside printable ASCII.
    InvalidKey {
        /// Why the key was refused.
        reason: &'static str,
    },
    /// The scope is too long or holds a NUL byte.
    InvalidScope {
        /// Why the scope was refused.
        reason: &'static str,
    },
    /// The configuration is self-contradictory (a zero queue, a zero lock timeout, ...).
    InvalidConfig {
        /// What is wrong with it.
        reason: String,
    },
    /// The file exists but is not an SQLite database.
    NotADatabase {
        /// The file that was opened.
        path: PathBuf,
    },
    /// The database file cannot be opened at all: its directory does not exist, or the path
    /// names a directory.
    CannotOpen {
        /// The file that was opened.
        path: PathBuf,
        /// Why it cannot be opened.
        reason: &'static str,
    },
    /// The database (or its directory) cannot be written.
    ReadOnly {
        /// The file that was opened.
        path: PathBuf,
    },
    /// The database was written by a newer version of this crate.
    SchemaTooNew {
        /// The `user_version` found in the file.
        found: i64,
        /// The newest schema version this build understands.
        supported: i64,
    },
    /// `PRAGMA journal_mode=WAL` did not take effect (for example on a file system without
    /// shared memory support).
    NotWal {
        /// The journal mode SQLite reported instead of `wal`.
        actual: String,
    },
    /// Another engine (in this process or another) has the database file open.
    ///
    /// An SQLite store serves one engine at a time: the engine's fencing tokens and its record
    /// of completions not yet flushed to disk live in its memory, so a second engine on the same
    /// file could hand out a fencing token twice or replay a response a power loss could still
    /// erase. Share one [`Engine`](crate::Engine) (a cheap clone) within a process; to run
    /// several processes, give each its own file or use a shared database server. Engines wait
    /// for the file up to [`EngineConfig::open_timeout`](crate::EngineConfig::open_timeout)
    /// (for a restart while the old process is still stopping).
    AlreadyOpen {
        /// The database that was opened.
        path: PathBuf,
        /// The process that holds it, when known.
        pid: Option<u32>,
    },
    /// Another process holds a lock on the database for longer than the busy timeout.
    Busy,
    /// The disk (or `max_page_count`) is full. Nothing of the failed transaction was applied.
    DiskFull,
    /// A stored record could not be decoded, or SQLite reported a malformed database.
    Corrupt {
        /// What could not be read.
        detail: String,
    },
    /// A value is larger than SQLite (or a configured limit) accepts.
    TooLarge {
        /// What was too large.
        detail: String,
    },
    /// The lease no longer owns its record: its lock timed out and another caller took the record
    /// over with a newer fencing token. Nothing was changed. (A lease whose lock timed out but
    /// that nobody took over still owns its record and may complete it.)
    LeaseLost,
    /// The engine's command queue is full. Retry after a short pause.
    Overloaded {
        /// A suggested pause before retrying.
        retry_after: Duration,
    },
    /// The engine was shut down.
    Closed,
    /// The writer thread panicked; the engine cannot serve any more requests.
    WriterPanicked {
        /// The panic message.
        message: String,
    },
    /// Flushing the write-ahead log to disk (`fdatasync`, with [`Durability::Full`]) failed.
    ///
    /// The completions that flush was to make durable get this error: each of them is
    /// committed but may or may not survive a power loss, so none is acknowledged, and this
    /// engine never replays them. The engine then stops, and every later call gets this error
    /// too ([`Error::is_closed`]): after a failed flush the operating system may have dropped
    /// the unwritten pages of the log, and since SQLite's recovery stops at the first missing
    /// frame, nothing written after them could be recovered either, so no later completion
    /// could honestly be acknowledged. Open a new engine on the same file: SQLite recovers the
    /// log, and a completion that did reach the disk is replayed from then on.
    ///
    /// [`Durability::Full`]: crate::Durability::Full
    SyncFailed {
        /// The error `fdatasync` returned.
        source: Arc<std::io::Error>,
    },
    /// The database server cannot be reached, or it lost the connection (refused, reset,
    /// restarting, shutting down, a statement timeout). Nothing was done, or, for a batch whose
    /// `COMMIT` got no answer, whether it was done is unknown: a claim that gets this error
    /// never runs its operation, and a record such a claim did write stays in flight until its
    /// lock timeout. (A completion of such a batch is run again on a new connection first, and
    /// gets this error only if that fails too.) The engine reconnects by itself (with a
    /// backoff); retry later.
    Unavailable {
        /// What failed, with the server's address (never its password).
        detail: String,
    },
    /// The database refused the store for a reason a retry does not fix: wrong credentials, a
    /// missing database, a missing privilege, a read-only server, or a table of that name that
    /// is not idempotency-rs's.
    Refused {
        /// What was refused, and why.
        detail: String,
    },
    /// Any other SQLite, PostgreSQL or I/O failure.
    Storage(Arc<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// [`Error::SyncFailed`] for the I/O error a flush (or the open's checkpoint) returned.
    pub(crate) fn sync_failed(source: std::io::Error) -> Self {
        Error::SyncFailed {
            source: Arc::new(source),
        }
    }

    /// True when the same call may succeed later without any change by the caller
    /// (overload, a busy database, a full disk, an I/O error).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Overloaded { .. }
                | Error::Busy
                | Error::DiskFull
                | Error::Unavailable { .. }
                | Error::Storage(_)
        )
    }

    /// A short, stable name of the variant (`lease_lost`, `disk_full`, ...): the `kind` label
    /// of `idempotency_errors_total`, and a field of the crate's `tracing` events.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidKey { .. } => "invalid_key",
            Error::InvalidScope { .. } => "invalid_scope",
            Error::InvalidConfig { .. } => "invalid_config",
            Error::NotADatabase { .. } => "not_a_database",
            Error::CannotOpen { .. } => "cannot_open",
            Error::ReadOnly { .. } => "read_only",
            Error::SchemaTooNew { .. } => "schema_too_new",
            Error::NotWal { .. } => "not_wal",
            Error::AlreadyOpen { .. } => "already_open",
            Error::Busy => "busy",
            Error::DiskFull => "disk_full",
            Error::Corrupt { .. } => "corrupt",
            Error::TooLarge { .. } => "too_large",
            Error::LeaseLost => "lease_lost",
            Error::Overloaded { .. } => "overloaded",
            Error::Closed => "closed",
            Error::WriterPanicked { .. } => "writer_panicked",
            Error::SyncFailed { .. } => "sync_failed",
            Error::Unavailable { .. } => "unavailable",
            Error::Refused { .. } => "refused",
            Error::Storage(_) => "storage",
        }
    }

    /// True when the engine can never serve another request (closed, its writer died, or a
    /// flush of its log failed).
    pub fn is_closed(&self) -> bool {
        matches!(
            self,
            Error::Closed | Error::WriterPanicked { .. } | Error::SyncFailed { .. }
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidKey { reason } => write!(f, "invalid idempotency key: {reason}"),
            Error::InvalidScope { reason } => write!(f, "invalid scope: {reason}"),
            Error::InvalidConfig { reason } => write!(f, "invalid engine configuration: {reason}"),
            Error::NotADatabase { path } => {
                write!(f, "{} is not an SQLite database", path.display())
            }
            Error::CannotOpen { path, reason } => {
                write!(f, "cannot open the database {}: {reason}", path.display())
            }
            Error::ReadOnly { path } => write!(
                f,
                "{} is read-only: the idempotency store needs write access to the file and its directory",
                path.display()
            ),
            Error::SchemaTooNew { found, supported } => write!(
                f,
                "database schema version {found} is newer than this build supports ({supported}); upgrade idempotency-rs"
            ),
            Error::NotWal { actual } => write!(
                f,
                "could not switch the database to WAL journal mode (SQLite reports `{actual}`)"
            ),
            Error::AlreadyOpen { path, pid } => {
                write!(
                    f,
                    "{} is already open in another idempotency engine",
                    path.display()
                )?;
                if let Some(pid) = pid {
                    write!(f, " (process {pid})")?;
                }
                write!(
                    f,
                    "; an SQLite store serves one engine at a time: share one Engine per process, \
                     stop the other one, or give each process its own file"
                )
            }
            Error::Busy => write!(f, "the database is locked by another connection"),
            Error::DiskFull => write!(f, "the database or disk is full"),
            Error::Corrupt { detail } => write!(f, "corrupt idempotency record: {detail}"),
            Error::TooLarge { detail } => write!(f, "value too large: {detail}"),
            Error::LeaseLost => write!(
                f,
                "the lease lost its record to a newer holder (lock timeout passed); nothing was changed"
            ),
            Error::Overloaded { .. } => write!(f, "the idempotency engine is overloaded"),
            Error::Closed => write!(f, "the idempotency engine is closed"),
            Error::WriterPanicked { message } => {
                write!(
                    f,
                    "the idempotency engine's writer thread panicked: {message}"
                )
            }
            Error::SyncFailed { source } => write!(
                f,
                "flushing the idempotency log to disk failed ({source}); the engine stopped and must be reopened"
            ),
            Error::Unavailable { detail } => {
                write!(f, "the idempotency store is unavailable: {detail}")
            }
            Error::Refused { detail } => {
                write!(f, "the database refused the idempotency store: {detail}")
            }
            Error::Storage(e) => write!(f, "storage error: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Storage(e) => Some(&**e),
            Error::SyncFailed { source } => Some(&**source),
            _ => None,
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        if let rusqlite::Error::SqliteFailure(f, _) = &e {
            match f.code {
                C::DiskFull => return Error::DiskFull,
                C::DatabaseBusy | C::DatabaseLocked => return Error::Busy,
                C::DatabaseCorrupt => {
                    return Error::Corrupt {
                        detail: e.to_string(),
                    };
                }
                C::TooBig => {
                    return Error::TooLarge {
                        detail: e.to_string(),
                    };
                }
                _ => {}
            }
        }
        Error::Storage(Arc::new(e))
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
