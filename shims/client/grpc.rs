//! gRPC: a tower layer for tonic channels that keys and retries the covered unary methods.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use idempotency_rs::client::grpc::RetryLayer;
//! use tonic::transport::Channel;
//!
//! let channel = Channel::from_static("http://127.0.0.1:50051").connect_lazy();
//! let channel = tower::ServiceBuilder::new()
//!     .layer(RetryLayer::new().method("/orders.Orders/CreateOrder"))
//!     .service(channel);
//! // let mut client = OrdersClient::new(channel);
//! // let mut request = tonic::Request::new(CreateOrderRequest { .. });
//! // request.set_timeout(Duration::from_secs(10)); // the deadline bounds every retry
//! // let order = client.create_order(request).await?;
//! # drop(channel);
//! # Ok(())
//! # }
//! ```
//!
//! For a covered method (named by its full path, `/package.Service/Method`; unary only, since
//! the request message is buffered to be sent again), the layer:
//!
//! - adds `idempotency-key` metadata with a fresh key, unless the call carries one;
//! - retries, with the same key and message, on `UNAVAILABLE`, `ABORTED` (the server layer's
//!   "still in flight"; an application's own `ABORTED` is retried too, as gRPC means it),
//!   `RESOURCE_EXHAUSTED`, an HTTP 429/502/503/504 without a gRPC status, an HTTP 200 that ends
//!   without one (an answer cut short), and any transport error (connect, reset, a connection
//!   lost before the answer); never on any other status, `INVALID_ARGUMENT` and
//!   `FAILED_PRECONDITION` included, and never an answer marked `idempotent-replayed: true`;
//! - waits at least the server's `grpc-retry-pushback-ms`, and does not retry when it is
//!   negative (gRPC's "do not retry"; the server layer sends it on a message over its limit);
//! - keeps to the call's deadline (`grpc-timeout`, set by `tonic::Request::set_timeout`): each
//!   attempt carries the time left (rounded up), no attempt starts or waits past it, and a call
//!   that reaches it ends with `DEADLINE_EXCEEDED`;
//! - answers with `idempotency-key` and `idempotency-attempts` metadata added (on a status
//!   too), so a caller whose attempts ran out has the key to try again later.
//!
//! Every other call, streaming ones included, passes through untouched.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::Full;
use tonic::Code;
use tonic::body::Body;
use tower::{Layer, Service, ServiceExt};

use super::{KEY_HEADER, KeyGenerator, RetryPolicy, Stop, is_replay, uuid_key};
use crate::contract::body::{BoxError, Buffered, Collected, collect};

/// The response metadata entry with the number of attempts a call took.
pub const ATTEMPTS_METADATA: &str = "idempotency-attempts";
/// The response metadata entry with the server's delay before a retry, in milliseconds.
pub const RETRY_PUSHBACK_METADATA: &str = "grpc-retry-pushback-ms";

/// A tower layer for tonic channels: see [the module docs](self).
#[derive(Clone)]
pub struct RetryLayer {
    settings: Arc<Settings>,
}

struct Settings {
    policy: RetryPolicy,
    methods: HashSet<String>,
    keys: KeyGenerator,
}

impl fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("policy", &self.settings.policy)
            .field("methods", &self.settings.methods)
            .finish_non_exhaustive()
    }
}

impl Default for RetryLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryLayer {
    /// No method covered yet, the default [`RetryPolicy`], UUID v4 keys.
    pub fn new() -> Self {
        RetryLayer {
            settings: Arc::new(Settings {
                policy: RetryPolicy::default(),
                methods: HashSet::new(),
                keys: Arc::new(uuid_key),
            }),
        }
    }

    fn settings(&mut self) -> &mut Settings {
        // Built before use: the layer is not shared yet, or this clones the settings once.
        if Arc::get_mut(&mut self.settings).is_none() {
            let s = &self.settings;
            self.settings = Arc::new(Settings {
                policy: s.policy.clone(),
                methods: s.methods.clone(),
                keys: s.keys.clone(),
            });
        }
        Arc::get_mut(&mut self.settings).expect("just made unique")
    }

    /// Covers a unary method, by its full path (`/package.Service/Method`).
    pub fn method(mut self, path: impl Into<String>) -> Self {
        self.settings().methods.insert(path.into());
        self
    }

    /// How many times and how far apart.
    pub fn policy(mut self, policy: RetryPolicy) -> Self {
        self.settings().policy = policy;
        self
    }

    /// Makes the key of each call that does not carry one (default: a UUID v4).
    pub fn key_generator(mut self, generate: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.settings().keys = Arc::new(generate);
        self
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = RetryService<S>;

    fn layer(&self, inner: S) -> RetryService<S> {
        RetryService {
            inner,
            settings: self.settings.clone(),
        }
    }
}

/// The service [`RetryLayer`] makes around a channel.
#[derive(Clone)]
pub struct RetryService<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S: fmt::Debug> fmt::Debug for RetryService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RetryService<S>
where
    S: Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    ReqBody: http_body::Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        if !self.settings.methods.contains(req.uri().path()) {
            let fut = self.inner.call(req.map(Body::new));
            return Box::pin(async move { Ok(fut.await.map_err(Into::into)?.map(Body::new)) });
        }
        // The ready service goes into the future; a fresh clone stays for the next poll_ready.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(run(self.settings.clone(), inner, req))
    }
}

/// An answer worth retrying, or the transport error of an attempt.
enum Failure {
    Status(Box<Answer>),
    Transport(BoxError),
}

/// A whole answer: head, message bytes, trailers, and what they say.
struct Answer {
    parts: http::response::Parts,
    data: Bytes,
    trailers: Option<HeaderMap>,
    code: Code,
    pushback: Option<Duration>,
}

async fn run<S, ReqBody, ResBody>(
    settings: Arc<Settings>,
    mut inner: S,
    req: Request<ReqBody>,
) -> Result<Response<Body>, BoxError>
where
    S: Service<Request<Body>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ReqBody: http_body::Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    let key = match parts.headers.get(KEY_HEADER) {
        // A key is printable ASCII; anything else could not be reported back as sent.
        Some(value) => match value.to_str() {
            Ok(key) => key.to_owned(),
            Err(_) => {
                let status = tonic::Status::invalid_argument(
                    "the idempotency-key metadata is not printable ASCII; nothing was sent",
                );
                return Ok(status.into_http());
            }
        },
        None => {
            let key = (settings.keys)();
            let value = HeaderValue::from_str(&key)
                .map_err(|_| format!("the key generator made {key:?}, not a metadata value"))?;
            parts.headers.insert(KEY_HEADER, value);
            key
        }
    };
    let deadline = parts
        .headers
        .get("grpc-timeout")
        .and_then(|v| parse_grpc_timeout(v.as_bytes()))
        .and_then(|t| started.checked_add(t));
    let message = match collect(pin!(body), None).await {
        Collected::Whole { data, .. } => data,
        Collected::TooLarge { .. } => unreachable!("no limit"),
        Collected::Failed(e) => return Err(e),
    };
    let path = parts.uri.path().to_owned();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let mut attempt = Request::new(Body::new(Full::new(message.clone())));
        *attempt.method_mut() = parts.method.clone();
        *attempt.uri_mut() = parts.uri.clone();
        *attempt.version_mut() = parts.version;
        *attempt.headers_mut() = parts.headers.clone();
        *attempt.extensions_mut() = parts.extensions.clone();
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(deadline_exceeded(&key, attempts - 1));
            }
            attempt
                .headers_mut()
                .insert("grpc-timeout", grpc_timeout_value(left));
        }
        tracing::debug!(%key, attempt = attempts, method = %path, "idempotent call: sending");
        let call = async {
            let answer = inner
                .ready()
                .await
                .map_err(Into::into)?
                .call(attempt)
                .await
                .map_err(Into::into)?;
            let (parts, body) = answer.into_parts();
            match collect(pin!(body), None).await {
                Collected::Whole { data, trailers } => match grpc_code(&parts, trailers.as_ref()) {
                    Some(code) => Ok((parts, data, trailers, code)),
                    // An HTTP 200 that ends without a grpc-status anywhere was cut short (a
                    // reset stream): the answer was lost, and the call may have run.
                    None => Err("the answer ended without a grpc-status".into()),
                },
                Collected::TooLarge { .. } => unreachable!("no limit"),
                Collected::Failed(e) => Err(e),
            }
        };
        let answer = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline.into(), call).await {
                Ok(answer) => answer,
                Err(_) => return Ok(deadline_exceeded(&key, attempts)),
            },
            None => call.await,
        };
        let failure = match answer {
            Err(e) => Failure::Transport(e),
            Ok((parts, data, trailers, code)) => {
                let pushback = pushback(&parts.headers, trailers.as_ref());
                let replayed = is_replay(&parts.headers);
                // A stored answer is the call's result: replayed again, it cannot change.
                let retryable = !replayed
                    && matches!(
                        code,
                        Code::Unavailable | Code::Aborted | Code::ResourceExhausted
                    )
                    && pushback != Some(None);
                if !retryable {
                    tracing::debug!(%key, attempts, ?code, replayed, "idempotent call: answered");
                    return Ok(answer_with(parts, data, trailers, &key, attempts));
                }
                Failure::Status(Box::new(Answer {
                    parts,
                    data,
                    trailers,
                    code,
                    pushback: pushback.flatten(),
                }))
            }
        };
        let floor = match &failure {
            Failure::Status(answer) => answer.pushback,
            Failure::Transport(_) => None,
        };
        let past_deadline = deadline.is_some_and(|d| Instant::now() >= d);
        let next = settings
            .policy
            .next_delay(attempts, floor, started, deadline);
        match next {
            // The call's deadline came first: that is how it ends, as gRPC's own would.
            Err(Stop::Deadline) => return Ok(deadline_exceeded(&key, attempts)),
            Err(_) if past_deadline => return Ok(deadline_exceeded(&key, attempts)),
            Ok(delay) => {
                tracing::info!(%key, attempt = attempts, ?delay, reason = %describe(&failure),
                    "idempotent call: retrying with the same key");
                tokio::time::sleep(delay).await;
            }
            Err(_) => {
                tracing::warn!(%key, attempts, reason = %describe(&failure),
                    "idempotent call: attempts exhausted; retry later with the same key");
                return Ok(match failure {
                    Failure::Status(answer) => {
                        let Answer {
                            parts,
                            data,
                            trailers,
                            ..
                        } = *answer;
                        answer_with(parts, data, trailers, &key, attempts)
                    }
                    Failure::Transport(e) => {
                        let status = tonic::Status::unavailable(format!(
                            "no answer after {attempts} attempt(s): {e}; the call may have run: \
                             retry it later with idempotency-key {key}"
                        ));
                        with_metadata(status.into_http(), &key, attempts)
                    }
                });
            }
        }
    }
}

fn describe(failure: &Failure) -> String {
    match failure {
        Failure::Status(answer) => format!("{:?}", answer.code),
        Failure::Transport(e) => e.to_string(),
    }
}

/// The call's status: from the trailers, or from the headers of a trailers-only answer, or, with
/// neither, from the HTTP status as gRPC maps it. `None` for an HTTP 200 with no status at all:
/// an answer cut short.
fn grpc_code(parts: &http::response::Parts, trailers: Option<&HeaderMap>) -> Option<Code> {
    let status = trailers
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"));
    match status {
        Some(v) => Some(Code::from_bytes(v.as_bytes())),
        None => match parts.status.as_u16() {
            200 => None,
            429 | 502..=504 => Some(Code::Unavailable),
            _ => Some(Code::Unknown),
        },
    }
}

/// `grpc-retry-pushback-ms`: `None` absent, `Some(None)` negative or unreadable (do not retry),
/// `Some(Some(d))` a delay.
fn pushback(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Option<Option<Duration>> {
    let value = trailers
        .and_then(|t| t.get(RETRY_PUSHBACK_METADATA))
        .or_else(|| headers.get(RETRY_PUSHBACK_METADATA))?;
    let ms = std::str::from_utf8(value.as_bytes())
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok());
    Some(match ms {
        Some(ms) if ms >= 0 => Some(Duration::from_millis(ms.unsigned_abs())),
        _ => None,
    })
}

/// A `grpc-timeout` value: digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The time left, rounded up (so that the server's deadline is never the earlier one) to whole
/// milliseconds, or seconds, minutes or hours when it needs more than gRPC's 8 digits.
fn grpc_timeout_value(left: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let micros = left.as_micros().max(1);
    let mut value = micros.div_ceil(1000);
    let mut unit = 'm';
    for (next, per) in [('S', 1000), ('M', 60), ('H', 60)] {
        if value <= MAX {
            break;
        }
        value = value.div_ceil(per);
        unit = next;
    }
    let value = value.min(MAX);
    HeaderValue::from_str(&format!("{value}{unit}")).expect("digits and a unit")
}

fn deadline_exceeded(key: &str, attempts: u32) -> Response<Body> {
    tracing::warn!(%key, attempts, "idempotent call: deadline reached");
    let status = tonic::Status::deadline_exceeded(format!(
        "the call's deadline passed after {attempts} attempt(s); it may have run: retry it with \
         idempotency-key {key} to get its result"
    ));
    with_metadata(status.into_http(), key, attempts)
}

/// The answer rebuilt, with the key and the attempts where the caller reads them: in the
/// trailers when an error status is there (tonic's `Status::metadata`), else in the headers.
fn answer_with(
    mut parts: http::response::Parts,
    data: Bytes,
    mut trailers: Option<HeaderMap>,
    key: &str,
    attempts: u32,
) -> Response<Body> {
    match &mut trailers {
        Some(t) if t.get("grpc-status").is_some_and(|s| s.as_bytes() != b"0") => {
            add_metadata(t, key, attempts);
        }
        _ => add_metadata(&mut parts.headers, key, attempts),
    }
    Response::from_parts(parts, Body::new(Buffered::new(data, trailers)))
}

fn with_metadata(mut response: Response<Body>, key: &str, attempts: u32) -> Response<Body> {
    add_metadata(response.headers_mut(), key, attempts);
    response
}

fn add_metadata(headers: &mut HeaderMap, key: &str, attempts: u32) {
    if let Ok(value) = HeaderValue::from_str(key) {
        headers.insert(KEY_HEADER, value);
    }
    headers.insert(ATTEMPTS_METADATA, HeaderValue::from(attempts));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(
            parse_grpc_timeout(b"100m"),
            Some(Duration::from_millis(100))
        );
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"m"), None);
        assert_eq!(parse_grpc_timeout(b"123456789m"), None);
        assert_eq!(parse_grpc_timeout(b"10x"), None);
        assert_eq!(grpc_timeout_value(Duration::from_micros(10)), "1m");
        assert_eq!(grpc_timeout_value(Duration::from_micros(1001)), "2m");
        assert_eq!(grpc_timeout_value(Duration::from_secs(3)), "3000m");
        assert_eq!(grpc_timeout_value(Duration::from_secs(200_000)), "200000S");
        assert_eq!(
            grpc_timeout_value(Duration::from_secs(u64::MAX)),
            "99999999H"
        );
    }

    #[test]
    fn pushback_reads_delays_and_refusals() {
        let mut h = HeaderMap::new();
        assert_eq!(pushback(&h, None), None);
        h.insert(RETRY_PUSHBACK_METADATA, HeaderValue::from_static("250"));
        assert_eq!(pushback(&h, None), Some(Some(Duration::from_millis(250))));
        h.insert(RETRY_PUSHBACK_METADATA, HeaderValue::from_static("-1"));
        assert_eq!(pushback(&h, None), Some(None));
        h.insert(RETRY_PUSHBACK_METADATA, HeaderValue::from_static("later"));
        assert_eq!(pushback(&h, None), Some(None));
    }
}
