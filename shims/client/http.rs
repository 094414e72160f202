//! The reqwest middleware: one key per operation, kept across every retry.

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{Extensions, HeaderMap, HeaderValue, Method, StatusCode};
use reqwest::{Request, Response, ResponseBuilderExt, Url};
use reqwest_middleware::{Middleware, Next};

use super::{KEY_HEADER, KeyGenerator, RetryPolicy, is_replay, uuid_key};
use crate::contract::{ProblemKind, TYPE_PREFIX};

/// The body of an answer to retry is read for its problem only up to this many bytes.
const PROBLEM_LIMIT: usize = 64 * 1024;

/// A [`reqwest_middleware::Middleware`] that gives each covered request one `Idempotency-Key`
/// and retries it, with that key and the same body, until it gets an answer that settles it.
/// See [the module docs](crate::client) for what is retried.
///
/// ```
/// use std::time::Duration;
/// use idempotency_rs::client::{RetryMiddleware, RetryPolicy};
///
/// let middleware = RetryMiddleware::new()
///     .policy(RetryPolicy::new().max_attempts(4).max_elapsed(Duration::from_secs(10)))
///     .retry_server_errors(true);
/// let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
///     .with(middleware)
///     .build();
/// # drop(client);
/// ```
#[derive(Clone)]
pub struct RetryMiddleware {
    policy: RetryPolicy,
    methods: Vec<Method>,
    keys: KeyGenerator,
    retry_500: bool,
    max_response_bytes: usize,
    attempt_timeout: Option<Duration>,
}

impl fmt::Debug for RetryMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryMiddleware")
            .field("policy", &self.policy)
            .field("methods", &self.methods)
            .field("retry_500", &self.retry_500)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("attempt_timeout", &self.attempt_timeout)
            .finish_non_exhaustive()
    }
}

impl Default for RetryMiddleware {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryMiddleware {
    /// POST and PATCH covered, the default [`RetryPolicy`], UUID v4 keys, 500 not retried,
    /// responses buffered up to 16 MiB.
    pub fn new() -> Self {
        RetryMiddleware {
            policy: RetryPolicy::default(),
            methods: vec![Method::POST, Method::PATCH],
            keys: std::sync::Arc::new(uuid_key),
            retry_500: false,
            max_response_bytes: 16 * 1024 * 1024,
            attempt_timeout: None,
        }
    }

    /// How many times and how far apart.
    pub fn policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The methods that get a key and retries (default POST and PATCH). Requests of other
    /// methods pass through untouched, neither keyed nor retried.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// Makes the key of each operation that does not carry one (default: a UUID v4). The
    /// server's key policy must accept what it makes (the server layers take UUIDs only unless
    /// configured with `KeyPolicy::Opaque`).
    pub fn key_generator(mut self, generate: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.keys = std::sync::Arc::new(generate);
        self
    }

    /// Retries 500 Internal Server Error too (default: no). The server layers release the key
    /// of a request that failed with a 5xx, so a retry runs the operation again: turn this on
    /// where a 500 means "nothing happened", as it does for a handler that failed before acting.
    pub fn retry_server_errors(mut self, retry: bool) -> Self {
        self.retry_500 = retry;
        self
    }

    /// The largest response body read into memory (default 16 MiB). Bodies are buffered so
    /// that a connection dropped in the middle of the answer is retried rather than handed to
    /// the caller half read. A response whose `Content-Length` is over the limit is returned
    /// unbuffered; one without a length that grows past it fails with
    /// [`ClientError::ResponseTooLarge`].
    pub fn max_response_bytes(mut self, limit: usize) -> Self {
        self.max_response_bytes = limit;
        self
    }

    /// The longest one attempt may take, to the end of its answer's body; past it the attempt
    /// counts as lost and is retried (a body over [`RetryMiddleware::max_response_bytes`],
    /// handed over unread, is read by the caller, outside it). Default: none of the
    /// middleware's own, so the client's (`reqwest::ClientBuilder::timeout`) or the request's
    /// (`.timeout(..)`) applies, and without either an attempt may wait as long as the server
    /// keeps the connection open.
    /// [`RetryPolicy::max_elapsed`] bounds when attempts *start*, not how long each takes.
    pub fn attempt_timeout(mut self, limit: Duration) -> Self {
        self.attempt_timeout = Some(limit);
        self
    }

    fn covers(&self, method: &Method) -> bool {
        self.methods.contains(method)
    }
}

#[async_trait::async_trait]
impl Middleware for RetryMiddleware {
    async fn handle(
        &self,
        mut req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        if !self.covers(req.method()) {
            return next.run(req, extensions).await;
        }
        let key = match req.headers().get(KEY_HEADER) {
            // A key is printable ASCII; anything else could not be reported back as sent.
            Some(value) => match value.to_str() {
                Ok(key) => key.to_owned(),
                Err(_) => {
                    let key = String::from_utf8_lossy(value.as_bytes()).into_owned();
                    return Err(fail(ClientError::InvalidKey { key }));
                }
            },
            None => {
                let key = (self.keys)();
                let Ok(value) = HeaderValue::from_str(&key) else {
                    return Err(fail(ClientError::InvalidKey { key }));
                };
                req.headers_mut().insert(KEY_HEADER, value);
                key
            }
        };
        let method = req.method().clone();
        let url = req.url().clone();
        // A streaming body can be sent once: refuse before sending anything.
        if req.try_clone().is_none() {
            return Err(fail(ClientError::BodyNotReplayable { key, method, url }));
        }
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let Some(attempt) = req.try_clone() else {
                return Err(fail(ClientError::BodyNotReplayable { key, method, url }));
            };
            tracing::debug!(%key, attempt = attempts, %method, %url, "idempotent request: sending");
            // One deadline for the whole attempt: the answer's head, then its body (`settle`
            // reads it), which a server or a proxy may stall after the head.
            let deadline = self
                .attempt_timeout
                .map(|limit| (tokio::time::Instant::now() + limit, limit));
            let sent = next.clone().run(attempt, extensions);
            let sent = match deadline {
                Some((at, limit)) => tokio::time::timeout_at(at, sent).await.map_err(|_| limit),
                None => Ok(sent.await),
            };
            let failure = match sent {
                Err(limit) => LastFailure::TimedOut(limit),
                Ok(Err(reqwest_middleware::Error::Reqwest(e))) if is_transport(&e) => {
                    LastFailure::Transport(e)
                }
                // Nothing was sent: the request could not be built.
                Ok(Err(reqwest_middleware::Error::Reqwest(e))) if e.is_builder() => {
                    return Err(e.into());
                }
                // Sent, and then something else failed (a redirect loop after the POST ran,
                // an inner middleware's error): not retried, but the key goes back with it.
                Ok(Err(e)) => {
                    return Err(fail(ClientError::Failed {
                        key,
                        attempts,
                        source: Box::new(e),
                    }));
                }
                Ok(Ok(response)) => {
                    let settled = self.settle(response, &key, attempts, started);
                    let settled = match deadline {
                        Some((at, limit)) => tokio::time::timeout_at(at, settled)
                            .await
                            .unwrap_or(Settled::Retry(LastFailure::TimedOut(limit))),
                        None => settled.await,
                    };
                    match settled {
                        Settled::Done(result) => return result,
                        Settled::Retry(failure) => failure,
                    }
                }
            };
            let floor = failure.retry_after();
            match self.policy.next_delay(attempts, floor, started, None) {
                Ok(delay) => {
                    tracing::info!(%key, attempt = attempts, ?delay, reason = %failure,
                        "idempotent request: retrying with the same key");
                    tokio::time::sleep(delay).await;
                }
                Err(_) => {
                    tracing::warn!(%key, attempts, reason = %failure,
                        "idempotent request: attempts exhausted; retry later with the same key");
                    return Err(fail(ClientError::Exhausted {
                        key,
                        attempts,
                        elapsed: started.elapsed(),
                        last: failure,
                    }));
                }
            }
        }
    }
}

/// What one answer means.
enum Settled {
    Done(reqwest_middleware::Result<Response>),
    Retry(LastFailure),
}

impl RetryMiddleware {
    async fn settle(
        &self,
        response: Response,
        key: &str,
        attempts: u32,
        started: Instant,
    ) -> Settled {
        let status = response.status();
        let replayed = is_replay(response.headers());
        // A stored answer is the operation's result: replayed again, it cannot change.
        if !replayed && self.retryable_head(status, response.headers()) {
            let retry_after = retry_after(response.headers());
            let problem_json = is_problem(response.headers());
            // Only the problem is of use, and only a small one.
            let problem = match read_up_to(response, PROBLEM_LIMIT).await {
                Some(body) if problem_json => ProblemDetails::parse(&body),
                _ => None,
            };
            return Settled::Retry(LastFailure::Status {
                status: status.as_u16(),
                retry_after,
                problem,
            });
        }
        let too_long = response
            .content_length()
            .is_some_and(|n| n > self.max_response_bytes as u64);
        let error = status.is_client_error() || status.is_server_error();
        if too_long && error && is_problem(response.headers()) {
            // A refusal too long to keep: its problem, if it is a small one, still decides.
            let retry_after = retry_after(response.headers());
            let body = read_up_to(response, PROBLEM_LIMIT).await;
            let problem = body.as_deref().and_then(ProblemDetails::parse);
            let refusal = Refusal {
                status,
                replayed,
                retry_after,
                problem,
                body: body.unwrap_or_default(),
            };
            return refusal.settle(key, attempts);
        }
        if too_long {
            return Settled::Done(Ok(self.deliver(response, key, attempts, started)));
        }
        let (response, body) = match buffer(response, self.max_response_bytes).await {
            Ok(buffered) => buffered,
            Err(Buffering::Transport(e)) => return Settled::Retry(LastFailure::Transport(e)),
            Err(Buffering::TooLarge) => {
                return Settled::Done(Err(fail(ClientError::ResponseTooLarge {
                    key: key.to_owned(),
                    attempts,
                    status: status.as_u16(),
                    limit: self.max_response_bytes,
                })));
            }
        };
        if error && is_problem(response.headers()) {
            let refusal = Refusal {
                status,
                replayed,
                retry_after: retry_after(response.headers()),
                problem: ProblemDetails::parse(&body),
                body,
            };
            return refusal.settle(key, attempts);
        }
        Settled::Done(Ok(self.deliver(response, key, attempts, started)))
    }

    /// Worth retrying by status and headers alone: 408, 425, 429, 502, 503, 504, 500 when
    /// configured, and a 409 with `Retry-After` (the in-flight 409 is told by its body).
    fn retryable_head(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        match status.as_u16() {
            409 => headers.contains_key(http::header::RETRY_AFTER),
            408 | 425 | 429 | 502 | 503 | 504 => true,
            500 => self.retry_500,
            _ => false,
        }
    }

    fn deliver(
        &self,
        mut response: Response,
        key: &str,
        attempts: u32,
        started: Instant,
    ) -> Response {
        let replayed = is_replay(response.headers());
        tracing::debug!(%key, attempts, status = response.status().as_u16(), replayed,
            "idempotent request: answered");
        response.extensions_mut().insert(Delivery {
            key: key.to_owned(),
            attempts,
            replayed,
            elapsed: started.elapsed(),
        });
        response
    }
}

/// An error answer with a problem document.
struct Refusal {
    status: StatusCode,
    replayed: bool,
    retry_after: Option<Duration>,
    problem: Option<ProblemDetails>,
    body: Bytes,
}

impl Refusal {
    /// The server layer's 409 for a request still running is retried (with or without
    /// `Retry-After`); any other refusal reaches the caller as [`ClientError::Rejected`].
    fn settle(self, key: &str, attempts: u32) -> Settled {
        let in_flight = self
            .problem
            .as_ref()
            .is_some_and(|p| p.slug() == Some(ProblemKind::InFlight.slug()));
        if !self.replayed && self.status == StatusCode::CONFLICT && in_flight {
            return Settled::Retry(LastFailure::Status {
                status: self.status.as_u16(),
                retry_after: self.retry_after,
                problem: self.problem,
            });
        }
        tracing::debug!(%key, attempt = attempts, status = self.status.as_u16(),
            replayed = self.replayed, "idempotent request: refused");
        Settled::Done(Err(fail(ClientError::Rejected {
            key: key.to_owned(),
            attempts,
            status: self.status.as_u16(),
            problem: self.problem,
            replayed: self.replayed,
            body: self.body,
        })))
    }
}

fn fail(error: ClientError) -> reqwest_middleware::Error {
    reqwest_middleware::Error::middleware(error)
}

/// Failed on the way: connecting, sending, waiting (timeout) or reading the answer.
fn is_transport(e: &reqwest::Error) -> bool {
    e.is_connect() || e.is_timeout() || e.is_request() || e.is_body()
}

fn is_problem(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            let essence = v.split(';').next().unwrap_or_default().trim();
            essence.eq_ignore_ascii_case("application/problem+json")
        })
}

/// `Retry-After` as delta-seconds or an HTTP date (a date in the past is no wait).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many seconds to count is "not within any budget", never "at once".
        return Some(value.parse().map_or(Duration::MAX, Duration::from_secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// The body, if it ends within `limit` bytes and arrives whole.
async fn read_up_to(mut response: Response, limit: usize) -> Option<Bytes> {
    read_body(&mut response, limit).await.ok()
}

enum Buffering {
    Transport(reqwest::Error),
    TooLarge,
}

/// Reads the rest of the body, failing past `limit` bytes.
async fn read_body(response: &mut Response, limit: usize) -> Result<Bytes, Buffering> {
    let mut body = BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(Buffering::Transport)? {
        if body.len() + chunk.len() > limit {
            return Err(Buffering::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Reads the whole body (up to `limit`), and gives back an equal response holding it.
async fn buffer(mut response: Response, limit: usize) -> Result<(Response, Bytes), Buffering> {
    let body = read_body(&mut response, limit).await?;
    let url: Url = response.url().clone();
    let mut rebuilt = http::Response::builder()
        .status(response.status())
        .version(response.version())
        .url(url)
        .body(body.clone())
        .map_err(|_| Buffering::TooLarge)?;
    *rebuilt.headers_mut() = std::mem::take(response.headers_mut());
    rebuilt
        .extensions_mut()
        .extend(std::mem::take(response.extensions_mut()));
    Ok((Response::from(rebuilt), body))
}

/// How a covered request was delivered: in the extensions of every response the middleware
/// returns (read it with [`ResponseExt::delivery`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delivery {
    /// The `Idempotency-Key` every attempt carried.
    pub key: String,
    /// How many attempts it took (1: no retry).
    pub attempts: u32,
    /// The server answered with a stored response (`Idempotent-Replayed: true`): the operation
    /// had run before, on an attempt whose answer was lost, or on an earlier call with this key.
    pub replayed: bool,
    /// From the first attempt to the answer.
    pub elapsed: Duration,
}

/// Reads the [`Delivery`] of a response returned through [`RetryMiddleware`].
pub trait ResponseExt {
    /// The key, attempts and replay flag; `None` for a request the middleware did not cover.
    fn delivery(&self) -> Option<&Delivery>;
}

impl ResponseExt for Response {
    fn delivery(&self) -> Option<&Delivery> {
        self.extensions().get::<Delivery>()
    }
}

/// An RFC 9457 problem document, as the server layers (and many APIs) answer errors.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ProblemDetails {
    /// `type`: for this crate's server layers `urn:idempotency-rs:problem:<slug>`
    /// (see [`crate::contract`]); `about:blank` when absent.
    pub type_uri: String,
    /// `title`.
    pub title: Option<String>,
    /// `status`.
    pub status: Option<u16>,
    /// `detail`: what went wrong and what to do, in words.
    pub detail: Option<String>,
    /// `instance`.
    pub instance: Option<String>,
    /// Every other member of the document.
    pub extensions: serde_json::Map<String, serde_json::Value>,
}

impl ProblemDetails {
    /// Parses a problem document; `None` when the body is not a JSON object.
    pub fn parse(body: &[u8]) -> Option<Self> {
        let serde_json::Value::Object(mut doc) = serde_json::from_slice(body).ok()? else {
            return None;
        };
        let mut text = |name: &str| match doc.remove(name) {
            Some(serde_json::Value::String(s)) => Some(s),
            Some(other) => {
                doc.insert(name.to_owned(), other);
                None
            }
            None => None,
        };
        let type_uri = text("type").unwrap_or_else(|| "about:blank".to_owned());
        let title = text("title");
        let detail = text("detail");
        let instance = text("instance");
        let status = match doc.remove("status") {
            Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
            _ => None,
        };
        Some(ProblemDetails {
            type_uri,
            title,
            status,
            detail,
            instance,
            extensions: doc,
        })
    }

    /// The slug of a problem from this crate's server layers (`key-reused`,
    /// `request-in-flight`, ...), which [`crate::contract::ProblemKind::slug`] lists.
    pub fn slug(&self) -> Option<&str> {
        self.type_uri.strip_prefix(TYPE_PREFIX)
    }
}

impl fmt::Display for ProblemDetails {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.title, &self.detail) {
            (Some(t), Some(d)) => write!(f, "{t}: {d}"),
            (Some(t), None) => f.write_str(t),
            (None, Some(d)) => f.write_str(d),
            (None, None) => f.write_str(&self.type_uri),
        }
    }
}

/// The last failed attempt of a call that ran out of attempts or time.
#[derive(Debug)]
#[non_exhaustive]
pub enum LastFailure {
    /// The server answered with a status worth retrying.
    Status {
        /// The status.
        status: u16,
        /// Its problem document, when it sent one.
        problem: Option<ProblemDetails>,
        /// Its `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// No answer: connecting, sending or reading failed, or timed out.
    Transport(reqwest::Error),
    /// No answer within [`RetryMiddleware::attempt_timeout`].
    TimedOut(Duration),
}

impl LastFailure {
    fn retry_after(&self) -> Option<Duration> {
        match self {
            LastFailure::Status { retry_after, .. } => *retry_after,
            LastFailure::Transport(_) | LastFailure::TimedOut(_) => None,
        }
    }
}

impl fmt::Display for LastFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LastFailure::Status {
                status, problem, ..
            } => match problem {
                Some(p) => write!(f, "{status} ({p})"),
                None => write!(f, "{status}"),
            },
            LastFailure::Transport(e) => {
                // reqwest says "error sending request"; the causes say why.
                write!(f, "{e}")?;
                let mut cause = std::error::Error::source(e);
                while let Some(c) = cause {
                    write!(f, ": {c}")?;
                    cause = c.source();
                }
                Ok(())
            }
            LastFailure::TimedOut(limit) => write!(f, "no answer within {limit:?}"),
        }
    }
}

/// Why a call through [`RetryMiddleware`] failed. It reaches the caller inside
/// [`reqwest_middleware::Error::Middleware`]; [`ClientError::of`] finds it there.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientError {
    /// The server refused the request with a problem document and a status that retrying
    /// cannot change (400, 401, 403, 404, 410, 413, 422, ...).
    Rejected {
        /// The key the request carried.
        key: String,
        /// Attempts made.
        attempts: u32,
        /// The status.
        status: u16,
        /// The parsed problem (`None` if the body was not a JSON object).
        problem: Option<ProblemDetails>,
        /// The refusal was a stored answer (`Idempotent-Replayed: true`).
        replayed: bool,
        /// The body as received.
        body: Bytes,
    },
    /// The attempts or the time ran out. The operation may or may not have run: send it again
    /// later **with this key** (set it as the `Idempotency-Key` header) and the server
    /// answers its one result, running it only if it never ran.
    Exhausted {
        /// The key every attempt carried.
        key: String,
        /// Attempts made.
        attempts: u32,
        /// From the first attempt to giving up.
        elapsed: Duration,
        /// What the last attempt ended with.
        last: LastFailure,
    },
    /// The request body is a stream, which cannot be sent a second time; nothing was sent.
    /// Give the request a body of bytes (`.body(Vec<u8>)`, `.json(..)`).
    BodyNotReplayable {
        /// The key the request would have carried.
        key: String,
        /// The method.
        method: Method,
        /// The URL.
        url: Url,
    },
    /// The key (the caller's, or the generator's) cannot be a header value of printable
    /// ASCII; nothing was sent.
    InvalidKey {
        /// The key, non-ASCII bytes replaced.
        key: String,
    },
    /// The request was sent, and then failed in a way retrying cannot mend (a redirect loop
    /// after the server answered, another middleware's error). The operation may have run:
    /// a retry with this key gets its one result.
    Failed {
        /// The key the request carried.
        key: String,
        /// Attempts made.
        attempts: u32,
        /// What failed.
        source: Box<reqwest_middleware::Error>,
    },
    /// The response had no length and grew past [`RetryMiddleware::max_response_bytes`]. The
    /// server answered (with a status that is not retried): a retry with this key gets the
    /// same answer.
    ResponseTooLarge {
        /// The key the request carried.
        key: String,
        /// Attempts made.
        attempts: u32,
        /// The answer's status.
        status: u16,
        /// The limit.
        limit: usize,
    },
}

impl ClientError {
    /// The error inside a `reqwest_middleware::Error`, if the middleware made it.
    pub fn of(error: &reqwest_middleware::Error) -> Option<&ClientError> {
        match error {
            reqwest_middleware::Error::Middleware(e) => e.downcast_ref::<ClientError>(),
            reqwest_middleware::Error::Reqwest(_) => None,
        }
    }

    /// The key of the operation: keep it to retry the same operation later.
    pub fn key(&self) -> &str {
        match self {
            ClientError::Rejected { key, .. }
            | ClientError::Exhausted { key, .. }
            | ClientError::BodyNotReplayable { key, .. }
            | ClientError::InvalidKey { key }
            | ClientError::Failed { key, .. }
            | ClientError::ResponseTooLarge { key, .. } => key,
        }
    }

    /// Attempts made (0 when nothing was sent).
    pub fn attempts(&self) -> u32 {
        match self {
            ClientError::Rejected { attempts, .. }
            | ClientError::Exhausted { attempts, .. }
            | ClientError::Failed { attempts, .. }
            | ClientError::ResponseTooLarge { attempts, .. } => *attempts,
            ClientError::BodyNotReplayable { .. } | ClientError::InvalidKey { .. } => 0,
        }
    }

    /// The problem document of a refusal, or of the last answer before running out.
    pub fn problem(&self) -> Option<&ProblemDetails> {
        match self {
            ClientError::Rejected { problem, .. }
            | ClientError::Exhausted {
                last: LastFailure::Status { problem, .. },
                ..
            } => problem.as_ref(),
            _ => None,
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Rejected {
                key,
                status,
                problem,
                ..
            } => match problem {
                Some(p) => write!(
                    f,
                    "request refused with {status}: {p} (Idempotency-Key {key})"
                ),
                None => write!(f, "request refused with {status} (Idempotency-Key {key})"),
            },
            ClientError::Exhausted {
                key,
                attempts,
                elapsed,
                last,
            } => write!(
                f,
                "no settled answer after {attempts} attempt(s) in {elapsed:.1?}, the last: {last}; \
                 the operation may have run: retry it later with Idempotency-Key {key}"
            ),
            ClientError::BodyNotReplayable { method, url, .. } => write!(
                f,
                "{method} {url} has a streaming body, which cannot be retried; nothing was sent \
                 (give it a body of bytes)"
            ),
            ClientError::Failed { key, source, .. } => write!(
                f,
                "{source}; the operation may have run: retry it later with Idempotency-Key {key}"
            ),
            ClientError::InvalidKey { key } => write!(
                f,
                "the Idempotency-Key {key:?} is not printable ASCII; nothing was sent"
            ),
            ClientError::ResponseTooLarge {
                key, status, limit, ..
            } => write!(
                f,
                "the {status} response grew past {limit} bytes, the limit for buffering it \
                 (Idempotency-Key {key}, which gets the same answer again)"
            ),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Exhausted {
                last: LastFailure::Transport(e),
                ..
            } => Some(e),
            ClientError::Failed { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        let later = SystemTime::now() + Duration::from_secs(120);
        h.insert(
            "retry-after",
            HeaderValue::from_str(&httpdate::fmt_http_date(later)).unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(115) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert(
            "retry-after",
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn problems_parse_with_extensions() {
        let p = ProblemDetails::parse(
            br#"{"type":"urn:idempotency-rs:problem:key-reused","title":"T","status":422,"detail":"D","retry_after":2}"#,
        )
        .unwrap();
        assert_eq!(p.slug(), Some("key-reused"));
        assert_eq!(p.status, Some(422));
        assert_eq!(p.extensions["retry_after"], 2);
        assert_eq!(p.to_string(), "T: D");
        let blank = ProblemDetails::parse(br#"{"title":7}"#).unwrap();
        assert_eq!(blank.type_uri, "about:blank");
        assert_eq!(blank.title, None);
        assert_eq!(blank.extensions["title"], 7);
        assert!(ProblemDetails::parse(b"[1]").is_none());
        assert!(ProblemDetails::parse(b"<html>").is_none());
    }
}
