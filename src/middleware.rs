//! The high-level async API: [`IdempotencyMiddleware::process_request`] around any business
//! logic, over a [`SqliteIdempotencyStore`].

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::http::{
    KeyPolicy, Problem, ProblemKind, canonical_json, default_store_policy, parse_key_value,
};
use crate::{ClaimOutcome, ClaimRequest, Engine, EngineConfig, Error, Fingerprint, StoredResponse};

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
    /// # Errors
    /// [`Error::InvalidConfig`] for a URL of another scheme (`postgres://...`) or an empty
    /// path, and every error of [`Engine::open`].
    pub async fn new(url: &str) -> Result<Self, Error> {
        Self::with_config(parse_url(url)?)
    }

    /// Opens a store with a full engine configuration.
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

/// Turns a store URL into an engine configuration (see [`SqliteIdempotencyStore::new`]).
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
                "`{url}` is not an SQLite URL: use sqlite:PATH, sqlite://PATH, a plain path or sqlite::memory:"
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
    store: SqliteIdempotencyStore,
    ttl: Duration,
    lock_timeout: Duration,
    key_policy: KeyPolicy,
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
        /// When the running request's lock times out.
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
    pub fn new(store: SqliteIdempotencyStore) -> Self {
        Self::with_config(
            store,
            Duration::from_secs(24 * 3600),
            Duration::from_secs(30),
        )
    }

    /// Sets the retention (TTL) of completed records and the lock timeout of leases.
    pub fn with_config(
        store: SqliteIdempotencyStore,
        ttl: Duration,
        lock_timeout: Duration,
    ) -> Self {
        IdempotencyMiddleware {
            store,
            ttl,
            lock_timeout,
            key_policy: KeyPolicy::Uuid,
        }
    }

    /// Accepts other keys than UUIDs (see [`KeyPolicy`]).
    pub fn key_policy(mut self, policy: KeyPolicy) -> Self {
        self.key_policy = policy;
        self
    }

    /// The retention of completed records.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The lock timeout of leases.
    pub fn lock_timeout(&self) -> Duration {
        self.lock_timeout
    }

    /// Runs `handler` at most once for `(scope, key)` and the fingerprint of
    /// `(method, path, request)`, and replays its stored result to retries.
    ///
    /// `key == None` runs the handler without idempotency. The request is fingerprinted as
    /// canonical JSON, so map key order does not matter. Results with status 2xx, 3xx and
    /// deterministic 4xx are stored; 5xx, 408, 425, 429, a handler error or a panic release
    /// the key so a retry runs again. If this future is dropped mid-way, the key is released.
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
        let Some(key) = key else {
            let (status, headers, body) = handler().await.map_err(ProcessError::Handler)?;
            return Ok(ProcessedResponse {
                status,
                headers,
                body,
                replayed: false,
            });
        };
        let key = parse_key_value(key.as_bytes(), self.key_policy)
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
        let req = ClaimRequest::new(scope, key, fp)
            .lock_timeout(self.lock_timeout)
            .retention(self.ttl);
        let lease = match self.store.engine.claim_async(req).await {
            Ok(ClaimOutcome::Claimed(lease)) => lease,
            Ok(ClaimOutcome::Replay(stored)) => return decode(stored),
            Ok(ClaimOutcome::InFlight { retry_after }) => {
                return Err(ProcessError::InFlight { retry_after });
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
        let (status, headers, body) = handler().await.map_err(ProcessError::Handler)?;
        if !default_store_policy(status) {
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
