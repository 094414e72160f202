//! The high-level async API: [`IdempotencyMiddleware::process_request`] around any business
//! logic, over a [`SqliteIdempotencyStore`].

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::contract::{
    Config, Contract, KeyPolicy, Problem, ProblemKind, canonical_json, parse_key_value,
};
use crate::{ClaimOutcome, Engine, EngineConfig, Error, Fingerprint, StoredResponse};

/// The trailer that marks a record completed without its response (see
/// [`ProcessError::ResponseNotStored`]).
const NOT_STORED_MARK: &str = "idempotency-rs-response-not-stored";

/// The error type of business logic run by [`IdempotencyMiddleware::process_request`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An idempotency store in an SQLite file: a thin, cloneable wrapper over an [`Engine`].
#[derive(Clone, Debug)]
pub struct SqliteIdempotencyStore {
    engine: Engine,
}

impl SqliteIdempotencyStore {
    /// Opens the store named by `url`: `sqlite:PATH`, `sqlite://PATH`, a plain path, or
    /// `sqlite::memory:` / `:memory:` for a private in-memory store (tests).
    ///
    /// The open runs on a thread of its own ([`Engine::open_async`]): it never blocks the
    /// caller's executor, even while it recovers a large WAL or waits for the file's lock.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a URL of another scheme (`postgres://...`) or an empty
    /// path, and every error of [`Engine::open`].
    pub async fn new(url: &str) -> Result<Self, Error> {
        Self::open(parse_url(url)?).await
    }

    /// Opens a store with a full engine configuration, without blocking the caller's executor
    /// (as [`SqliteIdempotencyStore::new`]).
    ///
    /// # Errors
    /// As [`Engine::open`].
    pub async fn open(config: EngineConfig) -> Result<Self, Error> {
        Ok(SqliteIdempotencyStore {
            engine: Engine::open_async(config).await?,
        })
    }

    /// Opens a store with a full engine configuration **on the calling thread**, which blocks
    /// until the file is open (for outside an async runtime, or at startup before one runs;
    /// inside one, use [`SqliteIdempotencyStore::open`]).
    ///
    /// # Errors
    /// As [`Engine::open`].
    pub fn with_config(config: EngineConfig) -> Result<Self, Error> {
        Ok(SqliteIdempotencyStore {
            engine: Engine::open(config)?,
        })
    }

    /// Wraps an engine opened elsewhere (to share it with the HTTP layers).
    pub fn from_engine(engine: Engine) -> Self {
        SqliteIdempotencyStore { engine }
    }

    /// The engine behind the store.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// The store's engine, so a store can be handed to any integration layer.
impl From<SqliteIdempotencyStore> for Engine {
    fn from(store: SqliteIdempotencyStore) -> Engine {
        store.engine().clone()
    }
}

/// The store's engine (a cheap handle clone).
impl From<&SqliteIdempotencyStore> for Engine {
    fn from(store: &SqliteIdempotencyStore) -> Engine {
        store.engine().clone()
    }
}

/// A cheap handle clone, so layers accept `&engine`.
impl From<&Engine> for Engine {
    fn from(engine: &Engine) -> Engine {
        engine.clone()
    }
}

/// An idempotency store in a PostgreSQL database, shared by every instance of a service: a thin,
/// cloneable wrapper over an [`Engine`] whose records live in one table on the server.
///
/// Every instance that opens the same URL (and table) sees the same records: a retry that
/// lands on another replica replays the first one's response, and the database decides which
/// of several concurrent claims runs the operation. See the README, *Several instances*.
#[cfg(feature = "postgres")]
#[derive(Clone, Debug)]
pub struct PostgresIdempotencyStore {
    engine: Engine,
}

#[cfg(feature = "postgres")]
impl PostgresIdempotencyStore {
    /// Connects to the database at `url` (`postgres://user@host/db`, `postgresql://...`; see
    /// [`EngineConfig::postgres`] for `sslmode`), creates or checks the table
    /// `idempotency_records`, and starts the engine. Runs on a thread of its own: it never
    /// blocks the caller's executor.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a malformed URL; [`Error::Unavailable`] when the server
    /// cannot be reached; [`Error::Refused`] for wrong credentials, a missing database or
    /// privilege, a read-only server or a foreign table; [`Error::SchemaTooNew`].
    pub async fn new(url: &str) -> Result<Self, Error> {
        if !url.trim().starts_with("postgres://") && !url.trim().starts_with("postgresql://") {
            return Err(Error::InvalidConfig {
                reason: "a PostgresIdempotencyStore needs a postgres:// or postgresql:// URL"
                    .into(),
            });
        }
        Self::open(EngineConfig::from_url(url)?).await
    }

    /// Opens a store with a full engine configuration ([`EngineConfig::postgres`] and its
    /// setters), without blocking the caller's executor.
    ///
    /// # Errors
    /// As [`Engine::open`].
    pub async fn open(config: EngineConfig) -> Result<Self, Error> {
        Ok(PostgresIdempotencyStore {
            engine: Engine::open_async(config).await?,
        })
    }

    /// The engine behind the store.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }
}

/// The store's engine, so a store can be handed to any integration layer.
#[cfg(feature = "postgres")]
impl From<PostgresIdempotencyStore> for Engine {
    fn from(store: PostgresIdempotencyStore) -> Engine {
        store.engine
    }
}

/// The store's engine (a cheap handle clone).
#[cfg(feature = "postgres")]
impl From<&PostgresIdempotencyStore> for Engine {
    fn from(store: &PostgresIdempotencyStore) -> Engine {
        store.engine.clone()
    }
}

/// Turns an SQLite store URL into an engine configuration (see
/// [`SqliteIdempotencyStore::new`]; [`EngineConfig::from_url`] takes every backend's URLs).
///
/// # Errors
/// [`Error::InvalidConfig`] for anything that is not an SQLite location.
pub fn parse_url(url: &str) -> Result<EngineConfig, Error> {
    let url = url.trim();
    if matches!(url, "sqlite::memory:" | ":memory:" | "sqlite://:memory:") {
        return Ok(EngineConfig::in_memory());
    }
    let path = if let Some(rest) = url.strip_prefix("sqlite://") {
        rest
    } else if let Some(rest) = url.strip_prefix("sqlite:") {
        rest
    } else if url.contains("://") {
        return Err(Error::InvalidConfig {
            reason: format!(
                "`{}` is not an SQLite URL: use sqlite:PATH, sqlite://PATH, a plain path or sqlite::memory:",
                crate::config::redact_url(url)
            ),
        });
    } else {
        url
    };
    let path = path.split('?').next().unwrap_or("");
    if path.is_empty() {
        return Err(Error::InvalidConfig {
            reason: format!("`{url}` names no database file"),
        });
    }
    Ok(EngineConfig::new(PathBuf::from(path)))
}

/// Runs business logic at most once per (scope, key), replaying its result to retries.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::collections::HashMap;
/// use idempotency_rs::{IdempotencyMiddleware, SqliteIdempotencyStore};
///
/// let store = SqliteIdempotencyStore::new("sqlite::memory:").await?;
/// let middleware = IdempotencyMiddleware::new(store);
/// let key = "6f1c1c3e-3a51-4f4b-9a43-2c5c6f0b1d2e".to_string();
/// let request = serde_json::json!({"symbol": "AAPL", "quantity": 10});
///
/// let first = middleware
///     .process_request(Some(key.clone()), "user123".into(), "/api/orders".into(), "POST".into(),
///         &request, || async { Ok((201, HashMap::new(), "order-1".to_string())) })
///     .await?;
/// let retry = middleware
///     .process_request(Some(key), "user123".into(), "/api/orders".into(), "POST".into(),
///         &request, || async { Ok((201, HashMap::new(), "order-2".to_string())) })
///     .await?;
/// assert_eq!(retry.body, "order-1");
/// assert!(retry.replayed && !first.replayed);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct IdempotencyMiddleware {
    engine: Engine,
    /// The settings (retention, lock timeout, key policy, storage rule, hint cap) and the
    /// timings of earlier runs, shared with the HTTP shims' rules.
    contract: Contract,
}

/// Builds an [`IdempotencyMiddleware`] with named settings; from
/// [`IdempotencyMiddleware::builder`].
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// use idempotency_rs::{IdempotencyMiddleware, KeyPolicy, SqliteIdempotencyStore};
///
/// let store = SqliteIdempotencyStore::new("sqlite::memory:").await?;
/// let middleware = IdempotencyMiddleware::builder(store)
///     .retention(Duration::from_secs(48 * 3600))
///     .lock_timeout(Duration::from_secs(10))
///     .key_policy(KeyPolicy::Opaque)
///     .build();
/// assert_eq!(middleware.lock_timeout(), Duration::from_secs(10));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
#[derive(Debug)]
#[must_use = "call .build() to get the middleware"]
pub struct IdempotencyMiddlewareBuilder {
    engine: Engine,
    config: Config,
}

impl IdempotencyMiddlewareBuilder {
    /// How long a completed record is replayed (its TTL). Default 24 h.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.config = self.config.retention(retention);
        self
    }

    /// How long a lease lives before another caller may take the key over. Default 30 s.
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.config = self.config.lock_timeout(timeout);
        self
    }

    /// Which keys are accepted (see [`KeyPolicy`]). Default [`KeyPolicy::Uuid`].
    pub fn key_policy(mut self, policy: KeyPolicy) -> Self {
        self.config = self.config.key_policy(policy);
        self
    }

    /// Replaces the rule deciding from the status which results are stored (default
    /// [`default_store_policy`](crate::contract::default_store_policy); see there why validation failures are not).
    pub fn store_when(mut self, predicate: impl Fn(u16) -> bool + Send + Sync + 'static) -> Self {
        self.config = self.config.store_when(predicate);
        self
    }

    /// The longest `retry_after` of [`ProcessError::InFlight`] (see
    /// [`Config::retry_after_max`](crate::contract::Config::retry_after_max)).
    pub fn retry_after_max(mut self, max: Duration) -> Self {
        self.config = self.config.retry_after_max(max);
        self
    }

    /// The middleware.
    pub fn build(self) -> IdempotencyMiddleware {
        IdempotencyMiddleware {
            contract: Contract::new(self.engine.clone(), self.config),
            engine: self.engine,
        }
    }
}

/// One call of [`IdempotencyMiddleware::process`]: the operation (method and path), the scope
/// it belongs to and the client's key, each named, so that none can be passed in another's
/// place.
///
/// ```
/// use idempotency_rs::Operation;
/// let op = Operation::post("/api/orders")
///     .scope("user123")
///     .key("6f1c1c3e-3a51-4f4b-9a43-2c5c6f0b1d2e");
/// # let _ = op;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "pass the operation to IdempotencyMiddleware::process"]
pub struct Operation {
    method: String,
    path: String,
    scope: String,
    key: Option<String>,
}

impl Operation {
    /// An operation with this method and path. [`IdempotencyMiddleware::process`] refuses a
    /// method that is not an HTTP token or a path that does not start with `/`
    /// ([`ProcessError::InvalidOperation`]), so a swap does not go unnoticed.
    pub fn new(method: impl Into<String>, path: impl Into<String>) -> Self {
        Operation {
            method: method.into(),
            path: path.into(),
            scope: String::new(),
            key: None,
        }
    }

    /// A `POST` to `path`.
    pub fn post(path: impl Into<String>) -> Self {
        Self::new("POST", path)
    }

    /// A `PUT` to `path`.
    pub fn put(path: impl Into<String>) -> Self {
        Self::new("PUT", path)
    }

    /// A `PATCH` to `path`.
    pub fn patch(path: impl Into<String>) -> Self {
        Self::new("PATCH", path)
    }

    /// A `DELETE` of `path`.
    pub fn delete(path: impl Into<String>) -> Self {
        Self::new("DELETE", path)
    }

    /// The tenant or user the key belongs to. Without it, the operation is in the one shared
    /// scope (as on the HTTP layers without a scope header): keys of different users would
    /// then meet.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = scope.into();
        self
    }

    /// The client's idempotency key. Without one, [`IdempotencyMiddleware::process`] runs the
    /// handler without deduplication (as an HTTP request without the header).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// The client's key, if it sent one (see [`Operation::key`]).
    pub fn maybe_key(mut self, key: Option<impl Into<String>>) -> Self {
        self.key = key.map(Into::into);
        self
    }

    fn check(&self) -> Result<(), ProcessError> {
        let token = !self.method.is_empty()
            && self
                .method
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            return Err(ProcessError::InvalidOperation {
                detail: format!("`{}` is not an HTTP method", self.method),
            });
        }
        if !self.path.starts_with('/') {
            return Err(ProcessError::InvalidOperation {
                detail: format!("the path `{}` does not start with `/`", self.path),
            });
        }
        Ok(())
    }
}

/// The result of [`IdempotencyMiddleware::process_request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessedResponse<T> {
    /// The status the business logic returned (or that was stored).
    pub status: u16,
    /// The headers the business logic returned (or that were stored).
    pub headers: HashMap<String, String>,
    /// The typed body.
    pub body: T,
    /// True when this is a replay of an earlier run.
    pub replayed: bool,
}

/// Why [`IdempotencyMiddleware::process_request`] did not return a response.
#[derive(Debug)]
#[non_exhaustive]
pub enum ProcessError {
    /// The key is malformed (empty, too long, not printable, not a UUID).
    InvalidKey {
        /// What is wrong with it.
        detail: String,
    },
    /// The scope is unusable (over 1024 bytes, or holding a NUL byte); nothing ran.
    InvalidScope {
        /// What is wrong with it.
        detail: String,
    },
    /// The key was used before with a different request: use a new key.
    KeyMismatch,
    /// A request with this key is still running: retry after the delay.
    InFlight {
        /// How long to wait before retrying: what runs of this path have been taking, less
        /// the time the running one has had, never past its lock timeout (see
        /// [`Contract::retry_hint`](crate::contract::Contract::retry_hint)).
        retry_after: Duration,
    },
    /// The store is closed, overloaded or failing; the business logic did not run.
    StoreUnavailable(Error),
    /// The business logic failed. Its lease was released: a retry runs it again.
    Handler(BoxError),
    /// The request could not be serialised (nothing ran), the response could not be
    /// serialised (the operation ran: its key is spent, and a retry gets
    /// [`ProcessError::ResponseNotStored`]), or a stored response no longer deserialises into
    /// the response type.
    Serialization(String),
    /// The [`Operation`] is malformed (its method is not an HTTP token, or its path does not
    /// start with `/`); nothing ran.
    InvalidOperation {
        /// What is wrong with it.
        detail: String,
    },
    /// The operation ran before with this key, but its response was not kept for replay (it
    /// could not be serialised, or it was over the HTTP layer's store limit). Do not run it
    /// again: look its result up, or use a new key for a new operation.
    ResponseNotStored {
        /// What the record says.
        detail: String,
    },
}

impl fmt::Display for ProcessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcessError::InvalidKey { detail } => write!(f, "invalid idempotency key: {detail}"),
            ProcessError::InvalidScope { detail } => write!(f, "invalid scope: {detail}"),
            ProcessError::InvalidOperation { detail } => write!(f, "invalid operation: {detail}"),
            ProcessError::KeyMismatch => {
                write!(f, "idempotency key reused with a different request")
            }
            ProcessError::InFlight { retry_after } => write!(
                f,
                "a request with this idempotency key is in progress; retry after {retry_after:?}"
            ),
            ProcessError::StoreUnavailable(e) => write!(f, "idempotency store unavailable: {e}"),
            ProcessError::Handler(e) => write!(f, "request handler failed: {e}"),
            ProcessError::Serialization(e) => write!(f, "serialisation failed: {e}"),
            ProcessError::ResponseNotStored { detail } => write!(
                f,
                "the operation with this idempotency key ran before, but its response was not kept: {detail}"
            ),
        }
    }
}

impl std::error::Error for ProcessError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProcessError::StoreUnavailable(e) => Some(e),
            ProcessError::Handler(e) => Some(&**e),
            _ => None,
        }
    }
}

impl IdempotencyMiddleware {
    /// Defaults: records kept 24 h, leases time out after 30 s, keys must be UUIDs.
    ///
    /// `store` is a [`SqliteIdempotencyStore`], a `PostgresIdempotencyStore` (feature
    /// `postgres`) or an [`Engine`] (or a reference to one of them).
    pub fn new(store: impl Into<Engine>) -> Self {
        Self::builder(store).build()
    }

    /// Named settings: `IdempotencyMiddleware::builder(store).retention(..).lock_timeout(..)
    /// .build()` (see [`IdempotencyMiddlewareBuilder`]).
    pub fn builder(store: impl Into<Engine>) -> IdempotencyMiddlewareBuilder {
        IdempotencyMiddlewareBuilder {
            engine: store.into(),
            config: Config::default()
                .retention(Duration::from_secs(24 * 3600))
                .lock_timeout(Duration::from_secs(30)),
        }
    }

    /// Sets the retention (TTL) of completed records and the lock timeout of leases, in that
    /// order. [`IdempotencyMiddleware::builder`] names them instead.
    pub fn with_config(store: impl Into<Engine>, ttl: Duration, lock_timeout: Duration) -> Self {
        Self::builder(store)
            .retention(ttl)
            .lock_timeout(lock_timeout)
            .build()
    }

    /// Accepts other keys than UUIDs (see [`KeyPolicy`]).
    pub fn key_policy(self, policy: KeyPolicy) -> Self {
        let config = self.contract.config().clone().key_policy(policy);
        IdempotencyMiddleware {
            contract: self.contract.with_config(config),
            engine: self.engine,
        }
    }

    /// The retention of completed records.
    pub fn ttl(&self) -> Duration {
        self.contract
            .config()
            .retention
            .unwrap_or_else(|| self.engine.retention())
    }

    /// The lock timeout of leases.
    pub fn lock_timeout(&self) -> Duration {
        self.contract
            .config()
            .lock_timeout
            .unwrap_or_else(|| self.engine.lock_timeout())
    }

    /// Runs `handler` at most once for `(scope, key)` and the fingerprint of
    /// `(method, path, request)`, and replays its stored result to retries: the seed's
    /// signature. [`IdempotencyMiddleware::process`] does the same with the four strings
    /// named in an [`Operation`], so none can take another's place.
    ///
    /// `key == None` runs the handler without idempotency. The request is fingerprinted as
    /// canonical JSON, so map key order does not matter. Results are stored by
    /// [`default_store_policy`](crate::contract::default_store_policy) (2xx, 3xx and the 4xx that are results; validation failures
    /// such as 400 and 422, 5xx, 429, a handler error or a panic release the key, so a retry
    /// runs again). If this future is dropped mid-way, the key is released.
    ///
    /// # Errors
    /// See [`ProcessError`].
    #[allow(clippy::too_many_arguments)]
    pub async fn process_request<Req, Resp, F, Fut>(
        &self,
        key: Option<String>,
        scope: String,
        path: String,
        method: String,
        request: &Req,
        handler: F,
    ) -> Result<ProcessedResponse<Resp>, ProcessError>
    where
        Req: Serialize + ?Sized,
        Resp: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(u16, HashMap<String, String>, Resp), BoxError>>,
    {
        let op = Operation {
            method,
            path,
            scope,
            key,
        };
        self.run(op, request, handler).await
    }

    /// Runs `handler` at most once for the operation's scope and key and the fingerprint of
    /// its method, path and `request`, and replays its stored result to retries.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use std::collections::HashMap;
    /// use idempotency_rs::{IdempotencyMiddleware, Operation, SqliteIdempotencyStore};
    ///
    /// let middleware = IdempotencyMiddleware::new(SqliteIdempotencyStore::new("sqlite::memory:").await?);
    /// let op = Operation::post("/api/orders")
    ///     .scope("user123")
    ///     .key("6f1c1c3e-3a51-4f4b-9a43-2c5c6f0b1d2e");
    /// let request = serde_json::json!({"symbol": "AAPL", "quantity": 10});
    /// let first = middleware
    ///     .process(op.clone(), &request, || async { Ok((201, HashMap::new(), "order-1".to_string())) })
    ///     .await?;
    /// let retry = middleware
    ///     .process(op, &request, || async { Ok((201, HashMap::new(), "order-2".to_string())) })
    ///     .await?;
    /// assert_eq!((first.body.as_str(), retry.body.as_str()), ("order-1", "order-1"));
    /// assert!(retry.replayed);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # }).unwrap();
    /// ```
    ///
    /// # Errors
    /// See [`ProcessError`]; [`ProcessError::InvalidOperation`] for a malformed method or path.
    pub async fn process<Req, Resp, F, Fut>(
        &self,
        operation: Operation,
        request: &Req,
        handler: F,
    ) -> Result<ProcessedResponse<Resp>, ProcessError>
    where
        Req: Serialize + ?Sized,
        Resp: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(u16, HashMap<String, String>, Resp), BoxError>>,
    {
        operation.check()?;
        self.run(operation, request, handler).await
    }

    async fn run<Req, Resp, F, Fut>(
        &self,
        op: Operation,
        request: &Req,
        handler: F,
    ) -> Result<ProcessedResponse<Resp>, ProcessError>
    where
        Req: Serialize + ?Sized,
        Resp: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(u16, HashMap<String, String>, Resp), BoxError>>,
    {
        let Operation {
            method,
            path,
            scope,
            key,
        } = op;
        let Some(key) = key else {
            let (status, headers, body) = handler().await.map_err(ProcessError::Handler)?;
            return Ok(ProcessedResponse {
                status,
                headers,
                body,
                replayed: false,
            });
        };
        let config = self.contract.config();
        let key = parse_key_value(key.as_bytes(), config.key_policy)
            .map_err(|p| ProcessError::InvalidKey { detail: p.detail })?;
        // Canonical JSON of the request's own bytes: a `serde_json::Value` would have lost
        // integers beyond 64 bits and decimals beyond f64 (two different requests, one
        // fingerprint).
        let bytes =
            serde_json::to_vec(request).map_err(|e| ProcessError::Serialization(e.to_string()))?;
        let canonical = canonical_json(&bytes).unwrap_or(bytes);
        let fp = Fingerprint::of_parts(&[
            method.to_ascii_uppercase().as_bytes(),
            path.as_bytes(),
            &canonical,
        ]);
        let req = self.contract.claim_request(scope, key, fp);
        let lease = match self.engine.claim_async(req).await {
            Ok(ClaimOutcome::Claimed(lease)) => lease,
            Ok(ClaimOutcome::Replay(stored)) => return decode(stored),
            Ok(ClaimOutcome::InFlight { retry_after }) => {
                return Err(ProcessError::InFlight {
                    retry_after: self.contract.retry_hint(&path, retry_after),
                });
            }
            Ok(ClaimOutcome::Mismatch) => return Err(ProcessError::KeyMismatch),
            Err(Error::InvalidScope { reason }) => {
                return Err(ProcessError::InvalidScope {
                    detail: reason.to_owned(),
                });
            }
            Err(e) => return Err(ProcessError::StoreUnavailable(e)),
        };
        // An error returns early and drops the lease, which releases the key.
        let started = Instant::now();
        let (status, headers, body) = handler().await.map_err(ProcessError::Handler)?;
        self.contract.record_run(&path, started.elapsed());
        if !(config.store_when)(status) {
            lease
                .release_async()
                .await
                .map_err(ProcessError::StoreUnavailable)?;
            return Ok(ProcessedResponse {
                status,
                headers,
                body,
                replayed: false,
            });
        }
        let bytes = match serde_json::to_vec(&body) {
            Ok(bytes) => bytes,
            Err(e) => {
                // The operation has run: its key must not be freed for a second run. The
                // record is completed with a marker a retry recognises.
                let marker = Problem::new(
                    ProblemKind::ResponseNotStored,
                    format!(
                        "The operation with this Idempotency-Key ran (status {status}), but its \
                         response could not be serialised for replay ({e}). Do not run it \
                         again; look its result up, or use a new key for a new operation."
                    ),
                );
                let marker = marker
                    .to_response()
                    .with_trailers(vec![(NOT_STORED_MARK.into(), b"1".to_vec())]);
                let stored = lease.complete_async(marker).await;
                return Err(ProcessError::Serialization(format!(
                    "the response could not be serialised ({e}); the operation ran, and its \
                     key {} (a retry is told so, it does not run again)",
                    match stored {
                        Ok(()) => "is spent".to_owned(),
                        Err(e) => format!("stays in flight until its lock timeout ({e})"),
                    }
                )));
            }
        };
        let mut stored = StoredResponse::new(status, bytes);
        let mut names: Vec<_> = headers.iter().collect();
        names.sort();
        for (n, v) in names {
            stored.headers.push((n.clone(), v.clone().into_bytes()));
        }
        lease
            .complete_async(stored)
            .await
            .map_err(ProcessError::StoreUnavailable)?;
        Ok(ProcessedResponse {
            status,
            headers,
            body,
            replayed: false,
        })
    }
}

fn decode<T: DeserializeOwned>(
    stored: StoredResponse,
) -> Result<ProcessedResponse<T>, ProcessError> {
    // The marker is told apart by a trailer, which no response of the business logic has
    // (this API stores none): a handler that answers a 410 problem of this crate's own (passed
    // on from another service) is replayed as it answered.
    let marked = stored.status == 410
        && stored
            .trailers
            .as_ref()
            .is_some_and(|t| t.iter().any(|(name, _)| name == NOT_STORED_MARK));
    if marked {
        let detail = serde_json::from_slice::<serde_json::Value>(&stored.body)
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_owned))
            .unwrap_or_default();
        return Err(ProcessError::ResponseNotStored { detail });
    }
    let body = serde_json::from_slice(&stored.body).map_err(|e| {
        ProcessError::Serialization(format!(
            "the stored response does not deserialise into the response type: {e}"
        ))
    })?;
    let headers = stored
        .headers
        .into_iter()
        .map(|(n, v)| (n, String::from_utf8_lossy(&v).into_owned()))
        .collect();
    Ok(ProcessedResponse {
        status: stored.status,
        headers,
        body,
        replayed: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(parse_url("sqlite::memory:").is_ok());
        assert!(parse_url(":memory:").is_ok());
        assert!(parse_url("sqlite:idempotency.db").is_ok());
        assert!(parse_url("sqlite://data/idempotency.db?mode=rwc").is_ok());
        assert!(parse_url("idempotency.db").is_ok());
        assert!(parse_url("postgres://localhost/db").is_err());
        assert!(parse_url("sqlite:").is_err());
        assert!(parse_url("").is_err());
    }
}
