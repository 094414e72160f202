//! The HTTP idempotency contract, once, for every framework.
//!
//! The Axum, Actix-Web and Tonic shims only adapt their request and response types to this
//! module; the rules live here. A shim:
//!
//! 1. passes a request through untouched unless [`Contract::covers_request`] its method and
//!    path (and the shim's own checks agree: its `cover_if` predicate, and a route that matched,
//!    so that a router's fallback is never the layer's business);
//! 2. reads the `Idempotency-Key` header values with [`Contract::parse_key`] (no key and the key
//!    optional: pass through; a bad key: answer the [`Problem`]);
//! 3. extracts the scope (a header, or a function of the request), buffers the body through
//!    [`Config::max_request_bytes`] (over it: [`Contract::body_too_large`], 413);
//! 4. calls [`Contract::begin`], which claims the key and answers [`Begin::Replay`],
//!    [`Begin::Reject`] or [`Begin::Run`];
//! 5. puts [`Pending::claimed`] (a [`ClaimedKey`]) and its key into the request extensions,
//!    runs the handler, buffers its response through [`Config::max_response_bytes`] and calls
//!    [`Pending::finish`] (or [`Pending::finish_oversized`]) **before** sending the response, so
//!    a response never leaves before its record is committed. An error or panic drops the
//!    [`Pending`], which releases the key.
//!
//! # The contract
//!
//! | situation | answer |
//! |---|---|
//! | method not covered (default: only POST and PATCH), path not in [`Config::paths`], the shim's `cover_if` false | pass through untouched |
//! | no route matches (a router's fallback, Actix's default service) | pass through untouched |
//! | no key, key optional (default) | pass through untouched |
//! | no key, key required | 400 `key-missing` |
//! | key malformed, empty, over 255 bytes, non-printable, or the header sent twice | 400 `key-invalid` / `key-repeated` |
//! | key not a UUID while the policy is [`KeyPolicy::Uuid`] (the default) | 400 `key-invalid` |
//! | the scope extractor finds no scope (or a blank one) | 400 `scope-missing` |
//! | the scope found is unusable (over 1024 bytes, a NUL byte, not UTF-8) | 400 `scope-invalid` |
//! | request body over the limit (default 1 MiB) | 413 `body-too-large` |
//! | same scope + key, different fingerprint | 422 `key-reused` (decided before in-flight) |
//! | same scope + key, first request still running | 409 `request-in-flight` with `Retry-After` ([`Contract::retry_hint`]) |
//! | same scope + key, first request completed | the stored status, headers and body, plus `Idempotent-Replayed: true` |
//! | the stored response was over the store limit | 410 `response-not-stored` |
//! | store closed, overloaded or failing | 503 `store-unavailable` with `Retry-After`; the handler does not run |
//!
//! Every answer the layer makes itself is `application/problem+json` (RFC 9457) with the
//! `type` `urn:idempotency-rs:problem:<slug>` (the slugs above), a `title`, the `status` and a
//! `detail` that tells the client what to do.
//!
//! **The key.** The header value may be a bare token or an RFC 8941 quoted string
//! (`"abc"`, the IETF draft's form); both name the same key. Under the UUID policy the key is
//! normalised to lower case, so `ABC…` and `abc…` are one key.
//!
//! **The fingerprint** covers the method, the path with its query string, and the body. A JSON
//! body (by `Content-Type`) is fingerprinted in [`canonical_json`] form, so key order and white
//! space do not matter, as in
//! [`IdempotencyMiddleware::process_request`](crate::IdempotencyMiddleware::process_request);
//! other bodies, and every body with [`Config::canonicalize_json`] off, as received.
//!
//! **The scope** keeps tenants apart: two scopes never see each other's records. A scope taken
//! from a client header (such as `X-User-ID` in the examples) is only as trustworthy as that
//! header: behind real authentication, take it from what the auth layer put into the request
//! extensions instead.
//!
//! **What is stored** ([`default_store_policy`]): 2xx, 3xx and the 4xx that are a result of the
//! operation are stored and replayed. 5xx, the transient 408, 425 and 429, the refusals of a
//! request before it ran (400 and 422 of validation, 401, 405, 413, 415, 431), a handler error
//! and a handler panic release the key, so a retry runs again (a request that failed
//! validation can be fixed and retried with the same key). [`Config::store_when`] replaces the
//! rule; [`store_all_4xx`] stores validation failures too. Hop-by-hop headers (`Connection`,
//! `Transfer-Encoding`, ...), `Content-Length` and `Date` are not stored; the framework sets
//! `Content-Length` from the replayed body.
//!
//! **A response over the store limit** is sent to the client in full, and the record is
//! completed with a 410 `response-not-stored` marker: a retry learns that the operation ran
//! instead of running it again.
//!
//! **If the completion cannot be stored** (disk full, store closed), the client still gets the
//! real response, with the header `Idempotency-Stored: false`. The operation has run; answering
//! 503 would invite a retry that, once the lock timeout passes, runs it a second time. The key
//! stays locked until the lock timeout, so an immediate retry gets 409, never a second run.
//!
//! **Expiry.** A completed record is replayed for the retention (default 24 h, set with
//! [`Config::retention`]) and then forgotten; a lease lives for the lock timeout (default 30 s).

#[cfg(any(
    feature = "axum-integration",
    feature = "actix-integration",
    feature = "tonic-integration",
    feature = "tonic-client"
))]
pub(crate) mod body;
mod canonical;
mod problem;
mod routes;
mod setters;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use canonical::{canonical_json, canonical_value};
#[cfg(feature = "client")]
pub(crate) use problem::TYPE_PREFIX;
pub use problem::{Problem, ProblemKind};
pub use routes::PathPattern;
pub(crate) use routes::Timings;
pub(crate) use setters::config_setters;

use crate::{
    ClaimOutcome, ClaimRequest, Engine, Error, Fingerprint, HeaderList, IdempotencyKey, Lease,
    StoredResponse,
};

/// The request header that carries the key.
pub const KEY_HEADER: &str = "idempotency-key";
/// The response header that marks a replay.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// The response header set to `false` when a completed response could not be stored.
pub const STORED_HEADER: &str = "idempotency-stored";

/// Which keys are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyPolicy {
    /// A UUID in its hyphenated form (any version; v4 and v7 are the usual), case-insensitive.
    #[default]
    Uuid,
    /// Any 1 to 255 bytes of printable ASCII, as Stripe accepts.
    Opaque,
}

/// Decides from the status whether a response is stored for replay.
pub type StorePredicate = Arc<dyn Fn(u16) -> bool + Send + Sync>;

/// The default storage rule: 2xx, 3xx and the 4xx that are a result are stored; 1xx, 5xx, the
/// transient 4xx (408, 425, 429) and the 4xx that say the request was refused before it was
/// processed are not, which releases the key.
///
/// Not stored, besides 1xx and 5xx:
///
/// | status | why |
/// |---|---|
/// | 400, 422 | request validation failed (Axum's `Json` and `Query` rejections, Actix's `web::Json` errors, a handler's own checks): nothing ran, so the client may fix the request and retry **with the same key**, as Stripe allows |
/// | 401 | not authenticated: the operation did not start |
/// | 405, 415 | the router or an extractor refused the method or the media type |
/// | 413, 431 | a framework limit refused the body or the headers |
/// | 408, 425, 429 | transient: the same request may succeed later |
///
/// Every other 4xx (402, 403, 404, 409, 410, ...) is a result of the operation and is replayed.
/// A handler that answers 400 or 422 **after** it has acted (charged, written) must not rely
/// on this rule: use [`store_all_4xx`] (or its own [`Config::store_when`]) for that route.
///
/// ```
/// use idempotency_rs::contract::{default_store_policy, store_all_4xx};
/// assert!(default_store_policy(201) && default_store_policy(404));
/// assert!(!default_store_policy(422) && !default_store_policy(503));
/// assert!(store_all_4xx(422) && !store_all_4xx(429));
/// ```
pub fn default_store_policy(status: u16) -> bool {
    matches!(status, 200..=499)
        && !matches!(
            status,
            400 | 401 | 405 | 408 | 413 | 415 | 422 | 425 | 429 | 431
        )
}

/// The storage rule that replays validation failures too: 2xx, 3xx and every 4xx except the
/// transient 408, 425 and 429. Use it (`store_when(store_all_4xx)`) where a 400 or 422 may come
/// after the operation acted, so a retry must never run it again.
pub fn store_all_4xx(status: u16) -> bool {
    matches!(status, 200..=499) && !matches!(status, 408 | 425 | 429)
}

/// What a covered request that won its key carries into the handler: the key as the engine
/// stored it (unquoted, lower-cased under [`KeyPolicy::Uuid`]), its scope and the fencing token
/// of the lease.
///
/// The Axum layer, the Actix middleware and the Tonic layer insert it (and the bare
/// [`IdempotencyKey`]) into the request extensions before the handler runs, so a handler that
/// forwards the key to a payment provider sends exactly the key that was deduplicated, and a
/// handler that writes to its own database can fence the write with the token (a write tagged
/// with an older token comes from a holder whose lease was taken over). Replays and rejections
/// never reach the handler; a request without a key (key optional) carries none.
///
/// Cheap to clone (it is shared, not copied: the layers hand it to the request, and the
/// extractors clone it out).
#[derive(Clone, PartialEq, Eq)]
pub struct ClaimedKey(Arc<Claimed>);

#[derive(PartialEq, Eq)]
struct Claimed {
    key: IdempotencyKey,
    scope: String,
    fencing_token: u64,
}

impl fmt::Debug for ClaimedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimedKey")
            .field("key", &self.0.key)
            .field("scope", &self.0.scope)
            .field("fencing_token", &self.0.fencing_token)
            .finish()
    }
}

impl ClaimedKey {
    pub(crate) fn of(lease: &Lease, scope: String) -> Self {
        ClaimedKey(Arc::new(Claimed {
            key: lease.key().clone(),
            scope,
            fencing_token: lease.fencing_token(),
        }))
    }

    /// The key, normalised.
    pub fn key(&self) -> &IdempotencyKey {
        &self.0.key
    }

    /// The scope (tenant or user) the key belongs to; empty for the shared scope.
    pub fn scope(&self) -> &str {
        &self.0.scope
    }

    /// The fencing token of this request's lease: greater than that of every earlier lease of
    /// the store.
    pub fn fencing_token(&self) -> u64 {
        self.0.fencing_token
    }
}

/// The settings every shim shares. Build with [`Config::default`] and the chained setters.
#[derive(Clone)]
pub struct Config {
    pub(crate) key_policy: KeyPolicy,
    pub(crate) require_key: bool,
    pub(crate) methods: Vec<String>,
    pub(crate) paths: Vec<PathPattern>,
    pub(crate) max_request_bytes: usize,
    pub(crate) max_response_bytes: usize,
    pub(crate) canonicalize_json: bool,
    pub(crate) store_when: StorePredicate,
    pub(crate) lock_timeout: Option<Duration>,
    pub(crate) retention: Option<Duration>,
    pub(crate) retry_after_max: Option<Duration>,
    pub(crate) scope_header: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            key_policy: KeyPolicy::Uuid,
            require_key: false,
            methods: vec!["POST".into(), "PATCH".into()],
            paths: Vec::new(),
            max_request_bytes: 1024 * 1024,
            max_response_bytes: 1024 * 1024,
            canonicalize_json: true,
            store_when: Arc::new(default_store_policy),
            lock_timeout: None,
            retention: None,
            retry_after_max: None,
            scope_header: None,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("key_policy", &self.key_policy)
            .field("require_key", &self.require_key)
            .field("methods", &self.methods)
            .field("paths", &self.paths)
            .field("max_request_bytes", &self.max_request_bytes)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("canonicalize_json", &self.canonicalize_json)
            .field("lock_timeout", &self.lock_timeout)
            .field("retention", &self.retention)
            .field("retry_after_max", &self.retry_after_max)
            .field("scope_header", &self.scope_header)
            .finish_non_exhaustive()
    }
}

impl Config {
    config_setters!(config: all);

    /// The scope header, if set (lower case).
    pub fn scope_header_name(&self) -> Option<&str> {
        self.scope_header.as_deref()
    }

    /// The request body limit.
    pub fn request_limit(&self) -> usize {
        self.max_request_bytes
    }

    /// The response storage limit.
    pub fn response_limit(&self) -> usize {
        self.max_response_bytes
    }
}

/// The contract bound to an engine: what each shim calls.
#[derive(Clone, Debug)]
pub struct Contract {
    engine: Engine,
    config: Arc<Config>,
    timings: Arc<Timings>,
}

/// What [`Contract::begin`] decided.
#[derive(Debug)]
pub enum Begin {
    /// Run the handler, then [`Pending::finish`].
    Run(Pending),
    /// Answer with this stored response (already marked `Idempotent-Replayed: true`).
    Replay(StoredResponse),
    /// Answer with this problem; the handler does not run.
    Reject(Problem),
}

/// A covered request with its key and scope, as a shim hands it to [`Contract::begin`].
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    /// The method.
    pub method: &'a str,
    /// The path with its query string, as the client sent it (fingerprinted).
    pub path_and_query: &'a str,
    /// The route the request matched (its template, such as `/orders/{id}`, when the framework
    /// knows it; otherwise the path): the runs of one route give the `Retry-After` hint of its
    /// in-flight answers.
    pub route: &'a str,
    /// The `Content-Type` header, if any (decides the JSON canonical form).
    pub content_type: Option<&'a [u8]>,
    /// The whole body.
    pub body: &'a [u8],
}

/// The shortest `Retry-After` hint for a request in flight.
const MIN_HINT: Duration = Duration::from_millis(100);
/// What a route whose runs were never seen is assumed to take.
const UNSEEN_RUN: Duration = Duration::from_secs(1);

impl Contract {
    /// Binds `config` to `engine`.
    pub fn new(engine: Engine, config: Config) -> Self {
        Self::with_timings(engine, config, Arc::default())
    }

    /// Binds `config` to `engine`, sharing the run timings of the other services of one layer.
    pub(crate) fn with_timings(engine: Engine, config: Config, timings: Arc<Timings>) -> Self {
        Contract {
            engine,
            config: Arc::new(config),
            timings,
        }
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Meters and logs an answer the layer gives on its own: `idempotency_rejections_total`
    /// by kind, and an event with the scope and key when they are known (a request still in
    /// flight at debug, as the retry it answers is routine; every other kind at warn).
    pub fn rejected(&self, kind: ProblemKind, scope: Option<&str>, key: Option<&str>) {
        self.engine.meters().rejected(kind.slug());
        match kind {
            ProblemKind::InFlight => tracing::debug!(
                kind = kind.slug(),
                status = kind.status(),
                scope,
                key,
                "idempotency: rejected"
            ),
            _ => tracing::warn!(
                kind = kind.slug(),
                status = kind.status(),
                scope,
                key,
                "idempotency: rejected"
            ),
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Whether requests with this method go through the contract.
    pub fn covers(&self, method: &str) -> bool {
        self.config
            .methods
            .iter()
            .any(|m| m.eq_ignore_ascii_case(method))
    }

    /// Whether a request with this method and path (without the query string) goes through
    /// the contract: its method is covered and, if [`Config::paths`] named any, its path
    /// matches one of them.
    pub fn covers_request(&self, method: &str, path: &str) -> bool {
        self.covers(method)
            && (self.config.paths.is_empty() || self.config.paths.iter().any(|p| p.matches(path)))
    }

    /// The same engine and timings under other settings.
    pub(crate) fn with_config(&self, config: Config) -> Self {
        Contract {
            engine: self.engine.clone(),
            config: Arc::new(config),
            timings: self.timings.clone(),
        }
    }

    /// Remembers that a run of `route` took `took` (for [`Self::retry_hint`]).
    pub(crate) fn record_run(&self, route: &str, took: Duration) {
        self.timings.record(route, took);
    }

    /// How long a client should wait before retrying a request of `route` found in flight,
    /// when its lease times out in `remaining`: the longest of the last runs of the route
    /// (one second if none was seen), minus the time the running request has had already
    /// (as far as its lease tells), at least 100 ms, at most [`Config::retry_after_max`], and
    /// never past the lock timeout (but never zero either: 1 ms at least).
    pub fn retry_hint(&self, route: &str, remaining: Duration) -> Duration {
        let lock = self
            .config
            .lock_timeout
            .unwrap_or_else(|| self.engine.lock_timeout());
        let elapsed = lock.saturating_sub(remaining);
        let run = self.timings.longest(route).unwrap_or(UNSEEN_RUN);
        let mut hint = run.saturating_sub(elapsed).max(MIN_HINT);
        if let Some(max) = self.config.retry_after_max {
            hint = hint.min(max);
        }
        // Never zero: "retry at once" would only meet the same lease again.
        hint.min(remaining).max(Duration::from_millis(1))
    }

    /// Reads the key from every value of the `Idempotency-Key` header, in order.
    /// `Ok(None)`: no key, and the key is optional (pass the request through).
    ///
    /// # Errors
    /// The 400 [`Problem`] to answer.
    pub fn parse_key(&self, values: &[&[u8]]) -> Result<Option<IdempotencyKey>, Problem> {
        match values {
            [] if self.config.require_key => Err(Problem::new(
                ProblemKind::KeyMissing,
                "This endpoint requires an Idempotency-Key header. Send a new UUID with each new \
                 request, and the same one when you retry it.",
            )),
            [] => Ok(None),
            [one] => parse_key_value(one, self.config.key_policy).map(Some),
            _ => Err(repeated()),
        }
    }

    /// The scope from the configured header. `Ok(None)` when no scope header is configured
    /// (the shim then uses its scope function, or the shared empty scope).
    ///
    /// Only the header's optional white space (spaces and tabs around the value, which are not
    /// part of it in HTTP) is trimmed: any other character is part of the scope, so that two
    /// values that differ are two scopes (`alice` and `alice` followed by a no-break space are
    /// two users as far as this layer can tell).
    ///
    /// # Errors
    /// 400 `scope-missing` when the header is configured but absent, repeated or blank (white
    /// space only, Unicode's included);
    /// 400 `scope-invalid` when its value cannot be a scope (not UTF-8, over 1024 bytes).
    pub fn scope_from_header(&self, values: &[&[u8]]) -> Result<Option<String>, Problem> {
        let Some(name) = &self.config.scope_header else {
            return Ok(None);
        };
        let [one] = values else {
            return Err(self.scope_missing_named(name));
        };
        let Ok(text) = std::str::from_utf8(trim_ows(one)) else {
            return Err(self.scope_invalid());
        };
        if text.trim().is_empty() {
            return Err(self.scope_missing_named(name));
        }
        self.scope_checked(text.to_owned()).map(Some)
    }

    /// The scope a scope function found for the request, checked like every scope.
    ///
    /// # Errors
    /// 400 `scope-missing` for `None` or a blank scope (an empty user id from an
    /// authentication layer must not fall into the scope shared by requests without one);
    /// 400 `scope-invalid` for a scope over 1024 bytes or holding a NUL byte (it can never be
    /// stored, so the client must not be told to retry).
    pub fn scope_from_fn(&self, scope: Option<String>) -> Result<String, Problem> {
        match scope {
            Some(scope) if !scope.trim().is_empty() => self.scope_checked(scope),
            _ => Err(self.scope_missing()),
        }
    }

    /// The key and scope of a covered request: `Ok(None)` for no key where none is required.
    /// `header` gives every value of a request header, in order; `scope_fn` is the shim's scope
    /// function over the request, asked only when the request has a key. Without one, the
    /// scope comes from [`Config::scope_header`], or is the shared empty scope.
    #[cfg(any(feature = "axum-integration", feature = "actix-integration"))]
    pub(crate) fn key_and_scope<'a, I>(
        &self,
        header: impl Fn(&str) -> I,
        scope_fn: Option<impl FnOnce() -> Option<String>>,
    ) -> Result<Option<(IdempotencyKey, String)>, Problem>
    where
        I: Iterator<Item = &'a [u8]>,
    {
        let Some(key) = self.parse_key(AtMostTwo::of(header(KEY_HEADER)).values())? else {
            return Ok(None);
        };
        let scope = match scope_fn {
            Some(f) => self.scope_from_fn(f())?,
            None => {
                let values = match self.config.scope_header.as_deref() {
                    Some(name) => AtMostTwo::of(header(name)),
                    None => AtMostTwo::default(),
                };
                self.scope_from_header(values.values())?.unwrap_or_default()
            }
        };
        Ok(Some((key, scope)))
    }

    fn scope_checked(&self, scope: String) -> Result<String, Problem> {
        match crate::validate_scope(&scope) {
            Ok(()) => Ok(scope),
            Err(_) => Err(self.scope_invalid()),
        }
    }

    /// 400 `scope-missing`, for a scope function that found nothing.
    pub fn scope_missing(&self) -> Problem {
        Problem::new(
            ProblemKind::ScopeMissing,
            "The request does not say which user or tenant it belongs to, so its \
             Idempotency-Key cannot be checked. Authenticate the request and retry.",
        )
    }

    /// 400 `scope-invalid`: the user or tenant the request names cannot be a scope.
    pub fn scope_invalid(&self) -> Problem {
        Problem::new(
            ProblemKind::ScopeInvalid,
            "The user or tenant this request belongs to cannot be used to keep its \
             Idempotency-Key (it is over 1024 bytes, holds a NUL byte or is not UTF-8 text). \
             The request was not processed, and retrying it unchanged will not help.",
        )
    }

    fn scope_missing_named(&self, header: &str) -> Problem {
        Problem::new(
            ProblemKind::ScopeMissing,
            format!(
                "Send exactly one {header} header naming the user or tenant: idempotency keys \
                 are kept per user."
            ),
        )
    }

    /// 413 `body-too-large`.
    pub fn body_too_large(&self) -> Problem {
        Problem::new(
            ProblemKind::BodyTooLarge,
            format!(
                "The request body is larger than {} bytes, the limit for idempotent requests on \
                 this endpoint. Send a smaller body.",
                self.config.max_request_bytes
            ),
        )
    }

    /// The fingerprint of a request, as this contract computes it.
    pub fn fingerprint(
        &self,
        method: &str,
        path_and_query: &str,
        content_type: Option<&[u8]>,
        body: &[u8],
    ) -> Fingerprint {
        let method = if method.bytes().any(|b| b.is_ascii_lowercase()) {
            Cow::Owned(method.to_ascii_uppercase())
        } else {
            Cow::Borrowed(method)
        };
        if self.config.canonicalize_json
            && content_type.is_some_and(is_json)
            && let Some(canon) = canonical_json(body)
        {
            return Fingerprint::of_parts(&[method.as_bytes(), path_and_query.as_bytes(), &canon]);
        }
        Fingerprint::of_request(&method, path_and_query, body)
    }

    /// The claim of `key` in `scope` for a request with this fingerprint, with the configured
    /// lock timeout and retention.
    pub(crate) fn claim_request(
        &self,
        scope: String,
        key: IdempotencyKey,
        fingerprint: Fingerprint,
    ) -> ClaimRequest {
        let mut req = ClaimRequest::new(scope, key, fingerprint);
        if let Some(t) = self.config.lock_timeout {
            req = req.lock_timeout(t);
        }
        if let Some(r) = self.config.retention {
            req = req.retention(r);
        }
        req
    }

    /// Claims the key for this request and decides what happens to it.
    pub async fn begin(&self, scope: String, key: IdempotencyKey, request: Incoming<'_>) -> Begin {
        self.begin_passing(scope, key, request, |_| false).await
    }

    /// [`Contract::begin`], for a layer that lets some refusals through to the handler
    /// (`passes`): those are not counted or logged as rejections.
    pub(crate) async fn begin_passing(
        &self,
        scope: String,
        key: IdempotencyKey,
        request: Incoming<'_>,
        passes: impl Fn(&Problem) -> bool,
    ) -> Begin {
        let fp = self.fingerprint(
            request.method,
            request.path_and_query,
            request.content_type,
            request.body,
        );
        // For the rejection's event only, and only while such events are wanted.
        let key_text = tracing::enabled!(tracing::Level::DEBUG).then(|| key.as_str().to_owned());
        let reject = |problem: Problem| {
            if !passes(&problem) {
                self.rejected(problem.kind, Some(&scope), key_text.as_deref());
            }
            Begin::Reject(problem)
        };
        match self
            .engine
            .claim_async(self.claim_request(scope.clone(), key, fp))
            .await
        {
            Ok(ClaimOutcome::Claimed(lease)) => Begin::Run(Pending {
                claimed: ClaimedKey::of(&lease, scope),
                release_404: false,
                lease,
                config: self.config.clone(),
                timings: self.timings.clone(),
                route: request.route.into(),
                started: Instant::now(),
            }),
            Ok(ClaimOutcome::Replay(mut stored)) => {
                stored
                    .headers
                    .push((REPLAYED_HEADER.into(), b"true".to_vec()));
                Begin::Replay(stored)
            }
            Ok(ClaimOutcome::InFlight { retry_after }) => reject(
                Problem::new(
                    ProblemKind::InFlight,
                    "A request with this Idempotency-Key is still being processed. Retry after \
                     the Retry-After delay with the same key to get its result.",
                )
                .retry_after(self.retry_hint(request.route, retry_after)),
            ),
            Ok(ClaimOutcome::Mismatch) => reject(Problem::new(
                ProblemKind::KeyReused,
                "This Idempotency-Key was already used for a different request (method, path or \
                 body differ). Resend the original request unchanged, or use a new key for a new \
                 request.",
            )),
            Err(e) => reject(store_unavailable(&e)),
        }
    }
}

/// How the HTTP shims handle a covered request.
#[cfg(any(feature = "axum-integration", feature = "actix-integration"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The contract, every answer of it.
    Strict,
    /// A request the framework routed to no route the shim can see (Axum: routed by a router
    /// without a `MatchedPath`, which is also how a `nest_service` is reached; Actix: no
    /// resource pattern before routing, also behind guards or a path rewrite inside the
    /// middleware). The shim refuses nothing (a missing or malformed key, no scope, a large
    /// body pass through untouched), so an unknown path is the framework's own 404; a request
    /// with a good key is still deduplicated, so no operation loses its protection, except
    /// that a key used before for another request passes through ([`Mode::passes_on`]) and a
    /// 404 answer releases the key ([`Mode::pending`]).
    Lenient,
}

#[cfg(any(feature = "axum-integration", feature = "actix-integration"))]
impl Mode {
    /// Whether the request goes on to the handler instead of getting this rejection of
    /// [`Contract::begin`]: where the shim cannot see a route, a key used before for another
    /// request (another path, say) is no duplicate of anything.
    pub(crate) fn passes_on(self, problem: &Problem) -> bool {
        self == Mode::Lenient && problem.kind == ProblemKind::KeyReused
    }

    /// The claim, finished as this mode finishes it.
    pub(crate) fn pending(self, pending: Pending) -> Pending {
        match self {
            Mode::Strict => pending,
            Mode::Lenient => pending.release_not_found(),
        }
    }
}

/// Whether an `Expect` header asks for `100 Continue`: such a client sends its body only when
/// asked, so a refusal goes first and the body is not drained.
#[cfg(any(feature = "axum-integration", feature = "actix-integration"))]
pub(crate) fn expects_continue(expect: Option<&[u8]>) -> bool {
    expect.is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"))
}

/// 503 `store-unavailable` for an engine error.
pub fn store_unavailable(e: &Error) -> Problem {
    let (what, after) = unavailable(e);
    Problem::new(
        ProblemKind::StoreUnavailable,
        format!(
            "The idempotency store {what}, so the request was not processed. Retry after the \
             Retry-After delay with the same Idempotency-Key."
        ),
    )
    .retry_after(after)
}

/// How the store fails, as the end of "the idempotency store ...", and how long a retry
/// should wait.
pub(crate) fn unavailable(e: &Error) -> (&'static str, Duration) {
    match e {
        Error::Overloaded { retry_after } => ("is overloaded", *retry_after),
        e if e.is_closed() => ("is shut down", Duration::from_secs(5)),
        Error::Unavailable { .. } => ("cannot be reached", Duration::from_secs(1)),
        _ => ("is failing", Duration::from_secs(1)),
    }
}

fn repeated() -> Problem {
    Problem::new(
        ProblemKind::KeyRepeated,
        "Send exactly one Idempotency-Key header with exactly one value.",
    )
}

/// Parses one `Idempotency-Key` header value under `policy`: a bare token or an RFC 8941
/// quoted string, surrounding spaces ignored.
///
/// # Errors
/// The 400 [`Problem`] to answer.
pub fn parse_key_value(raw: &[u8], policy: KeyPolicy) -> Result<IdempotencyKey, Problem> {
    let invalid = |why: &str| {
        Problem::new(
            ProblemKind::KeyInvalid,
            format!(
                "The Idempotency-Key {why}. {}",
                match policy {
                    KeyPolicy::Uuid =>
                        "Send a UUID such as 0b6f5a3e-9a7c-4c1e-8f2a-2d8b4f1e6c3a, new for each request.",
                    KeyPolicy::Opaque =>
                        "Send 1 to 255 printable ASCII characters, new for each request.",
                }
            ),
        )
    };
    let v = trim_ows(raw);
    let text = if v.first() == Some(&b'"') {
        Cow::Owned(unquote(v).ok_or_else(|| invalid("is a malformed quoted string"))?)
    } else {
        if v.contains(&b',') {
            // A comma in a bare value is two header lines folded into one.
            return Err(repeated());
        }
        Cow::Borrowed(std::str::from_utf8(v).map_err(|_| invalid("is not printable ASCII"))?)
    };
    // One allocation for the key, made here: the UUID check reads the borrowed header text.
    let text = match policy {
        KeyPolicy::Opaque => text.into_owned(),
        KeyPolicy::Uuid => {
            let ok = text.len() == 36
                && uuid::Uuid::try_parse(&text).is_ok()
                && text.bytes().enumerate().all(|(i, b)| match i {
                    8 | 13 | 18 | 23 => b == b'-',
                    _ => b.is_ascii_hexdigit(),
                });
            if !ok {
                return Err(invalid("is not a UUID"));
            }
            text.to_ascii_lowercase()
        }
    };
    IdempotencyKey::new(text).map_err(|e| match e {
        Error::InvalidKey { reason } => invalid(reason.trim_start_matches("the key ")),
        _ => invalid("is invalid"),
    })
}

/// The first two values of a header, without collecting them: the checks only tell none, one
/// and more than one apart.
#[cfg(any(feature = "axum-integration", feature = "actix-integration"))]
#[derive(Default)]
struct AtMostTwo<'a> {
    values: [&'a [u8]; 2],
    len: usize,
}

#[cfg(any(feature = "axum-integration", feature = "actix-integration"))]
impl<'a> AtMostTwo<'a> {
    fn of(values: impl Iterator<Item = &'a [u8]>) -> Self {
        let mut two = AtMostTwo::default();
        for v in values.take(2) {
            two.values[two.len] = v;
            two.len += 1;
        }
        two
    }

    fn values(&self) -> &[&'a [u8]] {
        &self.values[..self.len]
    }
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// RFC 8941 sf-string: `"` ... `"`, with `\"` and `\\` the only escapes, printable ASCII only.
fn unquote(v: &[u8]) -> Option<String> {
    let inner = v.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    let mut out = String::with_capacity(inner.len());
    let mut it = inner.iter();
    while let Some(&b) = it.next() {
        match b {
            b'\\' => match it.next() {
                Some(&e @ (b'"' | b'\\')) => out.push(e as char),
                _ => return None,
            },
            b'"' => return None,
            0x20..=0x7e => out.push(b as char),
            _ => return None,
        }
    }
    Some(out)
}

fn is_json(content_type: &[u8]) -> bool {
    let ct = content_type.to_ascii_lowercase();
    let essence = ct.split(|b| *b == b';').next().unwrap_or(&[]);
    let essence = trim_ows(essence);
    essence == b"application/json"
        || (essence.starts_with(b"application/") && essence.ends_with(b"+json"))
}

/// Headers that describe one connection or one encoding of the body, not the response: never
/// stored.
const NOT_STORED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "date",
];

/// Whether a response header is kept in the stored record.
pub fn is_stored_header(name: &str) -> bool {
    !NOT_STORED.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// A claimed request: run the handler, then finish. Dropping it (handler error, panic, client
/// gone) releases the key.
#[derive(Debug)]
pub struct Pending {
    lease: Lease,
    /// A 404 answer releases the key instead of being stored (a request the framework routed
    /// to no handler: its fallback's 404 is no result of an operation).
    release_404: bool,
    claimed: ClaimedKey,
    config: Arc<Config>,
    timings: Arc<Timings>,
    route: Box<str>,
    started: Instant,
}

/// What [`Pending::finish`] did with the response.
#[derive(Debug, Clone)]
pub enum Finished {
    /// Stored: retries replay it.
    Stored,
    /// Not stored by the storage rule (5xx, 429, ...); the key was released.
    Released,
    /// The store failed to keep it. The response still goes to the client, with
    /// `Idempotency-Stored: false` (see the module docs).
    Failed(Error),
}

impl Pending {
    /// The lease held for this request.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The lease (for its fencing token, or to extend it during a long handler).
    pub fn lease_mut(&mut self) -> &mut Lease {
        &mut self.lease
    }

    /// The key, scope and fencing token to hand to the handler (the shims put it into the
    /// request extensions).
    pub fn claimed(&self) -> &ClaimedKey {
        &self.claimed
    }

    /// A 404 answer will release the key rather than be stored.
    #[cfg(any(feature = "axum-integration", feature = "actix-integration"))]
    pub(crate) fn release_not_found(mut self) -> Self {
        self.release_404 = true;
        self
    }

    fn ran(&self) {
        self.timings.record(&self.route, self.started.elapsed());
    }

    fn stores(&self, status: u16) -> bool {
        (self.config.store_when)(status) && !(self.release_404 && status == 404)
    }

    /// Records the handler's response: stores it (minus hop-by-hop headers) if the storage
    /// rule says so, otherwise releases the key. Call it before the response is sent.
    pub async fn finish(self, status: u16, headers: &HeaderList, body: &[u8]) -> Finished {
        self.finish_with(status, || {
            let headers = headers
                .iter()
                .filter(|(n, _)| is_stored_header(n))
                .cloned()
                .collect();
            (headers, body.to_vec())
        })
        .await
    }

    /// [`Pending::finish`] for a shim that hands the response's header list and a copy of its
    /// body over: the list is filtered in place, not copied again.
    #[cfg(any(feature = "axum-integration", feature = "actix-integration"))]
    pub(crate) async fn finish_owned(
        self,
        status: u16,
        mut headers: HeaderList,
        body: Vec<u8>,
    ) -> Finished {
        self.finish_with(status, move || {
            headers.retain(|(n, _)| is_stored_header(n));
            (headers, body)
        })
        .await
    }

    /// `response`: the headers to store and the body, asked for only when the status is stored.
    async fn finish_with(
        self,
        status: u16,
        response: impl FnOnce() -> (HeaderList, Vec<u8>),
    ) -> Finished {
        self.ran();
        if !self.stores(status) {
            return match self.lease.release_async().await {
                Ok(()) | Err(Error::LeaseLost) => Finished::Released,
                Err(e) => Finished::Failed(e),
            };
        }
        let (headers, body) = response();
        let stored = StoredResponse {
            status,
            headers,
            body,
            trailers: None,
        };
        if stored.size() > self.config.max_response_bytes {
            return self.finish_oversized_inner(status).await;
        }
        match self.lease.complete_async(stored).await {
            Ok(()) => Finished::Stored,
            Err(e) => Finished::Failed(e),
        }
    }

    /// For a response larger than [`Config::max_response_bytes`]: if its status would be
    /// stored, completes the record with a 410 `response-not-stored` marker (so a retry does
    /// not run the operation again), otherwise releases the key.
    pub async fn finish_oversized(self, status: u16) -> Finished {
        self.ran();
        self.finish_oversized_inner(status).await
    }

    async fn finish_oversized_inner(self, status: u16) -> Finished {
        if !self.stores(status) {
            return match self.lease.release_async().await {
                Ok(()) | Err(Error::LeaseLost) => Finished::Released,
                Err(e) => Finished::Failed(e),
            };
        }
        let marker = Problem::new(
            ProblemKind::ResponseNotStored,
            format!(
                "The request with this Idempotency-Key was processed (status {status}), but its \
                 response was too large to keep for replay. Do not retry it; look the result up \
                 instead, or use a new key to run a new request."
            ),
        )
        .to_response();
        match self.lease.complete_async(marker).await {
            Ok(()) => Finished::Stored,
            Err(e) => Finished::Failed(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: &str = "0b6f5a3e-9a7c-4c1e-8f2a-2d8b4f1e6c3a";

    #[test]
    fn key_forms() {
        let p = KeyPolicy::Uuid;
        assert_eq!(parse_key_value(U.as_bytes(), p).unwrap().as_str(), U);
        let quoted = format!("\"{U}\"");
        assert_eq!(parse_key_value(quoted.as_bytes(), p).unwrap().as_str(), U);
        let upper = U.to_ascii_uppercase();
        assert_eq!(parse_key_value(upper.as_bytes(), p).unwrap().as_str(), U);
        assert_eq!(
            parse_key_value(format!("  {U} ").as_bytes(), p)
                .unwrap()
                .as_str(),
            U
        );
        for bad in [
            "",
            "abc",
            "0b6f5a3e9a7c4c1e8f2a2d8b4f1e6c3a",
            "{0b6f5a3e-9a7c-4c1e-8f2a-2d8b4f1e6c3a}",
            "\"abc",
            "\"a\\nb\"",
        ] {
            assert_eq!(
                parse_key_value(bad.as_bytes(), p).unwrap_err().kind,
                ProblemKind::KeyInvalid,
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_key_value(format!("{U}, {U}").as_bytes(), p)
                .unwrap_err()
                .kind,
            ProblemKind::KeyRepeated
        );
    }

    #[test]
    fn opaque_keys() {
        let p = KeyPolicy::Opaque;
        assert_eq!(parse_key_value(b"order-1", p).unwrap().as_str(), "order-1");
        assert_eq!(
            parse_key_value(br#""a \"q\" \\ b""#, p).unwrap().as_str(),
            r#"a "q" \ b"#
        );
        assert_eq!(parse_key_value(br#""x,y""#, p).unwrap().as_str(), "x,y");
        assert!(parse_key_value(&[b'a'; 255], p).is_ok());
        assert!(parse_key_value(&[b'a'; 256], p).is_err());
        assert!(parse_key_value(b"a\x01b", p).is_err());
        assert!(parse_key_value("é".as_bytes(), p).is_err());
        assert!(parse_key_value(b"\"\"", p).is_err());
    }

    #[test]
    fn storage_rule() {
        for s in [200, 201, 204, 301, 402, 403, 404, 409, 410] {
            assert!(default_store_policy(s), "{s}");
            assert!(store_all_4xx(s), "{s}");
        }
        for s in [400, 401, 405, 413, 415, 422, 431] {
            assert!(!default_store_policy(s), "{s}");
            assert!(store_all_4xx(s), "{s}");
        }
        for s in [100, 408, 425, 429, 500, 502, 503] {
            assert!(!default_store_policy(s), "{s}");
            assert!(!store_all_4xx(s), "{s}");
        }
    }

    #[test]
    fn json_content_types() {
        assert!(is_json(b"application/json"));
        assert!(is_json(b"Application/JSON; charset=utf-8"));
        assert!(is_json(b"application/merge-patch+json"));
        assert!(!is_json(b"text/plain"));
    }

    #[test]
    fn problem_shape() {
        let p =
            Problem::new(ProblemKind::InFlight, "wait").retry_after(Duration::from_millis(1500));
        let r = p.to_response();
        assert_eq!(r.status, 409);
        assert!(r.headers.contains(&("retry-after".into(), b"2".to_vec())));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["type"], "urn:idempotency-rs:problem:request-in-flight");
        assert_eq!(v["status"], 409);
    }
}
