//! The service: claim, run, store, replay.

use std::fmt;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use tonic::body::Body;
use tonic::{Code, Status};
use tower::Service;

use super::layer::Settings;
use super::{KEY_METADATA, REPLAYED_METADATA, RETRY_PUSHBACK_METADATA};
use crate::contract::body::{
    BoxError, Buffered, Collected, collect, header_list, header_map, mark_unstored,
};
use crate::contract::{ClaimedKey, KeyPolicy, ProblemKind, is_stored_header, unavailable};
use crate::{ClaimOutcome, Error, Fingerprint, HeaderList, IdempotencyKey, Lease, StoredResponse};

/// The service made by [`IdempotencyLayer`](super::IdempotencyLayer) around tonic's routes.
///
/// It answers with `http::Response<tonic::body::Body>`; its errors are the inner service's.
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S> IdempotencyService<S> {
    pub(crate) fn new(inner: S, settings: Arc<Settings>) -> Self {
        IdempotencyService { inner, settings }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("inner", &self.inner)
            .field("layer", &self.settings)
            .finish()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for IdempotencyService<S>
where
    S: Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: http_body::Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        if !self.settings.methods.contains(req.uri().path()) {
            let fut = self.inner.call(req.map(Body::new));
            return Box::pin(async move { Ok(fut.await?.map(Body::new)) });
        }
        // The ready service goes into the future; a fresh clone stays for the next poll_ready.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(handle(self.settings.clone(), inner, req))
    }
}

async fn handle<S, ReqBody, ResBody>(
    settings: Arc<Settings>,
    mut inner: S,
    req: Request<ReqBody>,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<ResBody>>,
    ReqBody: http_body::Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();
    let key = match read_key(&parts.headers, &settings) {
        Ok(Some(key)) => key,
        Ok(None) => {
            let req = Request::from_parts(parts, Body::new(body));
            return Ok(inner.call(req).await?.map(Body::new));
        }
        Err((kind, status)) => {
            settings.contract.rejected(kind, None, None);
            return Ok(reject(status));
        }
    };
    let scope = match settings.scope.extract(&parts) {
        Ok(scope) => scope,
        Err((kind, status)) => {
            settings.contract.rejected(kind, None, None);
            return Ok(reject(status));
        }
    };
    let limit = settings.contract.config().request_limit();
    let (message, request_trailers) = match collect(pin!(body), Some(limit)).await {
        Collected::Whole { data, trailers } => (data, trailers),
        Collected::TooLarge { .. } => {
            settings
                .contract
                .rejected(ProblemKind::BodyTooLarge, Some(&scope), Some(key.as_str()));
            // A negative pushback is gRPC's "do not retry": the same message would be refused.
            let mut response = reject(Status::resource_exhausted(format!(
                "the request message is larger than {limit} bytes, the limit for idempotent \
                 calls of this method; send a smaller message"
            )));
            response
                .headers_mut()
                .insert(RETRY_PUSHBACK_METADATA, HeaderValue::from_static("-1"));
            return Ok(response);
        }
        Collected::Failed(e) => return Ok(reject(Status::from_error(e))),
    };

    let fingerprint = Fingerprint::of_parts(&[parts.uri.path().as_bytes(), &message]);
    // For a rejection's event only, and only while such events are wanted.
    let key_text = tracing::enabled!(tracing::Level::DEBUG).then(|| key.as_str().to_owned());
    let claim = settings
        .contract
        .claim_request(scope.clone(), key, fingerprint);
    let lease = match settings.contract.engine().claim_async(claim).await {
        Ok(ClaimOutcome::Claimed(lease)) => lease,
        Ok(ClaimOutcome::Replay(stored)) => return Ok(replay(stored)),
        Ok(ClaimOutcome::InFlight { retry_after }) => {
            settings
                .contract
                .rejected(ProblemKind::InFlight, Some(&scope), key_text.as_deref());
            let retry_after = settings.contract.retry_hint(parts.uri.path(), retry_after);
            return Ok(with_pushback(
                reject(Status::aborted(format!(
                    "a call with this idempotency-key is still being processed; retry it \
                     unchanged, with the same key, after {} ms to get its result",
                    retry_after.as_millis()
                ))),
                retry_after,
            ));
        }
        Ok(ClaimOutcome::Mismatch) => {
            settings
                .contract
                .rejected(ProblemKind::KeyReused, Some(&scope), key_text.as_deref());
            return Ok(reject(Status::failed_precondition(
                "this idempotency-key was already used for a different call (another method or \
                 request message); resend the original request unchanged, or use a new key for a \
                 new request",
            )));
        }
        Err(e) => {
            settings.contract.rejected(
                ProblemKind::StoreUnavailable,
                Some(&scope),
                key_text.as_deref(),
            );
            return Ok(store_unavailable(&e));
        }
    };

    // From here until the lease is completed or released, dropping this future (the client
    // went away, a deadline passed) drops the lease, which releases the key.
    let started = Instant::now();
    let route = parts.uri.path().to_owned();
    let claimed = ClaimedKey::of(&lease, scope);
    let mut parts = parts;
    parts.extensions.insert(claimed.key().clone());
    parts.extensions.insert(claimed);
    let req = Request::from_parts(parts, Body::new(Buffered::new(message, request_trailers)));
    let response = match inner.call(req).await {
        Ok(response) => response,
        Err(e) => {
            release(lease).await;
            return Err(e);
        }
    };
    let (mut head, body) = response.into_parts();
    // The whole response is read: its grpc-status, which decides whether it is stored, comes
    // last, in the trailers.
    let (data, trailers) = match collect(pin!(body), None).await {
        Collected::Whole { data, trailers } => (data, trailers),
        Collected::TooLarge { .. } => unreachable!("no limit"),
        Collected::Failed(e) => {
            release(lease).await;
            return Ok(reject(Status::from_error(e)));
        }
    };

    settings.contract.record_run(&route, started.elapsed());
    let code = grpc_code(&head.headers, trailers.as_ref());
    match code {
        Some(code) if head.status == StatusCode::OK && (settings.store_when)(code) => {
            let mut stored = StoredResponse {
                status: head.status.as_u16(),
                headers: stored_headers(&head.headers),
                body: data.to_vec(),
                trailers: trailers.as_ref().map(header_list),
            };
            if stored.size() > settings.contract.config().response_limit() {
                stored = not_stored_marker(code, stored.size());
            }
            if let Err(e) = lease.complete_async(stored).await {
                mark_unstored(&mut head.headers, &e);
            }
        }
        _ => release(lease).await,
    }
    Ok(Response::from_parts(
        head,
        Body::new(Buffered::new(data, trailers)),
    ))
}

/// The key from the metadata, under the HTTP shims' key rules. `Ok(None)`: no key, and none
/// is required.
fn read_key(
    headers: &HeaderMap,
    settings: &Settings,
) -> Result<Option<IdempotencyKey>, (ProblemKind, Status)> {
    let values: Vec<&[u8]> = headers
        .get_all(KEY_METADATA)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    settings.contract.parse_key(&values).map_err(|problem| {
        let status = match problem.kind {
            ProblemKind::KeyMissing => Status::invalid_argument(format!(
                "this method requires an idempotency key: send a new {} in the \
                 `idempotency-key` metadata with each new request, and the same one when you \
                 retry it",
                match settings.contract.config().key_policy {
                    KeyPolicy::Uuid => "UUID",
                    _ =>
                        "unique key (1 to 255 printable ASCII characters, a UUID is a good choice)",
                }
            )),
            ProblemKind::KeyRepeated => {
                Status::invalid_argument("send exactly one `idempotency-key` metadata entry")
            }
            _ => Status::invalid_argument(problem.detail),
        };
        (problem.kind, status)
    })
}

/// The call's `grpc-status`: from the trailers, or from the headers of a trailers-only
/// response.
fn grpc_code(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Option<Code> {
    trailers
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"))
        .map(|v| Code::from_bytes(v.as_bytes()))
}

/// Response headers as a stored list, in order, without those that describe one
/// transmission rather than the response (`date`, `content-length`, hop-by-hop headers).
fn stored_headers(headers: &HeaderMap) -> HeaderList {
    let mut list = header_list(headers);
    list.retain(|(name, _)| is_stored_header(name));
    list
}

/// The stored response, played back: headers (plus `idempotent-replayed: true`), the message
/// bytes and the trailers.
fn replay(stored: StoredResponse) -> Response<Body> {
    let mut headers = header_map(&stored.headers);
    headers.insert(REPLAYED_METADATA, HeaderValue::from_static("true"));
    let trailers = stored.trailers.as_ref().map(header_map);
    let mut response = Response::new(Body::new(Buffered::new(Bytes::from(stored.body), trailers)));
    *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    *response.headers_mut() = headers;
    response
}

/// A trailers-only gRPC response carrying `status`.
fn reject(status: Status) -> Response<Body> {
    status.into_http()
}

fn with_pushback(mut response: Response<Body>, after: Duration) -> Response<Body> {
    let ms = after.as_millis().max(1).to_string();
    if let Ok(value) = HeaderValue::from_str(&ms) {
        response
            .headers_mut()
            .insert(RETRY_PUSHBACK_METADATA, value);
    }
    response
}

/// `UNAVAILABLE` for an engine error: the handler did not run.
fn store_unavailable(e: &Error) -> Response<Body> {
    let (what, after) = unavailable(e);
    tracing::warn!(error = %e, "idempotency: claim failed; answering UNAVAILABLE");
    with_pushback(
        reject(Status::unavailable(format!(
            "the idempotency store {what}, so the call was not processed; retry it after {} ms \
             with the same idempotency-key",
            after.as_millis()
        ))),
        after,
    )
}

/// What is stored instead of a response over the store limit: a trailers-only
/// `ALREADY_EXISTS`, so a retry learns the call ran instead of running it again.
fn not_stored_marker(code: Code, size: usize) -> StoredResponse {
    let marker: Response<()> = Status::already_exists(format!(
        "the call with this idempotency-key was processed (grpc-status {code:?}), but its \
         {size}-byte response was too large to keep for replay; do not retry it: look the \
         result up instead, or use a new key for a new request"
    ))
    .into_http();
    StoredResponse {
        status: marker.status().as_u16(),
        headers: stored_headers(marker.headers()),
        body: Vec::new(),
        trailers: None,
    }
}

async fn release(lease: Lease) {
    match lease.release_async().await {
        Ok(()) | Err(Error::LeaseLost) => {}
        Err(e) => tracing::warn!(
            error = %e,
            "idempotency: releasing the key failed; it frees itself at its lock timeout"
        ),
    }
}
