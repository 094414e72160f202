//! The service: claim, run, store, replay.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, DATE};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::{Code, Status};
use tower::Service;

use super::body::Buffered;
use super::layer::Config;
use super::{KEY_METADATA, REPLAYED_METADATA, RETRY_PUSHBACK_METADATA, STORED_METADATA};
use crate::http::{KeyPolicy, parse_key_value};
use crate::{
    ClaimOutcome, ClaimRequest, Error, Fingerprint, HeaderList, IdempotencyKey, Lease,
    StoredResponse,
};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The service made by [`IdempotencyLayer`](super::IdempotencyLayer) around tonic's routes.
///
/// It answers with `http::Response<tonic::body::Body>`; its errors are the inner service's.
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> IdempotencyService<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        IdempotencyService { inner, config }
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
            .field("config", &self.config)
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
        if !self.config.covers(req.uri().path()) {
            let fut = self.inner.call(req.map(Body::new));
            return Box::pin(async move { Ok(fut.await?.map(Body::new)) });
        }
        // The ready service goes into the future; a fresh clone stays for the next poll_ready.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(handle(self.config.clone(), inner, req))
    }
}

async fn handle<S, ReqBody, ResBody>(
    config: Arc<Config>,
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
    let key = match read_key(&parts.headers, &config) {
        Ok(Some(key)) => key,
        Ok(None) => {
            let req = Request::from_parts(parts, Body::new(body));
            return Ok(inner.call(req).await?.map(Body::new));
        }
        Err(status) => return Ok(reject(status)),
    };
    let scope = match config.scope.extract(&parts) {
        Ok(scope) => scope,
        Err(status) => return Ok(reject(status)),
    };
    let (message, request_trailers) = match read_request(body, config.max_message_bytes).await {
        Ok(read) => read,
        Err(status) => return Ok(reject(status)),
    };

    let fingerprint = Fingerprint::of_parts(&[parts.uri.path().as_bytes(), &message]);
    let mut claim = ClaimRequest::new(scope, key, fingerprint);
    if let Some(t) = config.lock_timeout {
        claim = claim.lock_timeout(t);
    }
    if let Some(r) = config.retention {
        claim = claim.retention(r);
    }
    let lease = match config.engine.claim_async(claim).await {
        Ok(ClaimOutcome::Claimed(lease)) => lease,
        Ok(ClaimOutcome::Replay(stored)) => return Ok(replay(stored)),
        Ok(ClaimOutcome::InFlight { retry_after }) => {
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
            return Ok(reject(Status::failed_precondition(
                "this idempotency-key was already used for a different call (another method or \
                 request message); resend the original request unchanged, or use a new key for a \
                 new request",
            )));
        }
        Err(e) => return Ok(store_unavailable(&e)),
    };

    // From here until the lease is completed or released, dropping this future (the client
    // went away, a deadline passed) drops the lease, which releases the key.
    let req = Request::from_parts(parts, Body::new(Buffered::new(message, request_trailers)));
    let response = match inner.call(req).await {
        Ok(response) => response,
        Err(e) => {
            release(lease).await;
            return Err(e);
        }
    };
    let (mut head, body) = response.into_parts();
    let (data, trailers) = match read_response(body).await {
        Ok(read) => read,
        Err(status) => {
            release(lease).await;
            return Ok(reject(status));
        }
    };

    let code = grpc_code(&head.headers, trailers.as_ref());
    match code {
        Some(code) if head.status == StatusCode::OK && (config.store_when)(code) => {
            let mut stored = StoredResponse {
                status: head.status.as_u16(),
                headers: header_list(&head.headers, true),
                body: data.to_vec(),
                trailers: trailers.as_ref().map(|t| header_list(t, false)),
            };
            if stored.size() > config.max_response_bytes {
                stored = not_stored_marker(code, stored.size());
            }
            if let Err(e) = lease.complete_async(stored).await {
                tracing::warn!(
                    error = %e,
                    "idempotency: the gRPC response could not be stored; it is sent anyway and \
                     the key stays locked until its lock timeout"
                );
                head.headers
                    .insert(STORED_METADATA, HeaderValue::from_static("false"));
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
fn read_key(headers: &HeaderMap, config: &Config) -> Result<Option<IdempotencyKey>, Status> {
    let values: Vec<&[u8]> = headers
        .get_all(KEY_METADATA)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    match values.as_slice() {
        [] if config.require_key => Err(Status::invalid_argument(format!(
            "this method requires an idempotency key: send a new {} in the `idempotency-key` \
             metadata with each new request, and the same one when you retry it",
            match config.key_policy {
                KeyPolicy::Uuid => "UUID",
                _ => "unique key (1 to 255 printable ASCII characters, a UUID is a good choice)",
            }
        ))),
        [] => Ok(None),
        [value] => parse_key_value(value, config.key_policy)
            .map(Some)
            .map_err(|problem| Status::invalid_argument(problem.detail)),
        _ => Err(Status::invalid_argument(
            "send exactly one `idempotency-key` metadata entry",
        )),
    }
}

/// Buffers the request body up to `limit` bytes of data.
async fn read_request<B>(body: B, limit: usize) -> Result<(Bytes, Option<HeaderMap>), Status>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    read_all(body, Some(limit)).await.map_err(|e| match e {
        ReadError::TooLarge => Status::resource_exhausted(format!(
            "the request message is larger than {limit} bytes, the limit for idempotent calls \
             of this method; send a smaller message"
        )),
        ReadError::Body(status) => status,
    })
}

/// Buffers the whole response body: data and trailers.
async fn read_response<B>(body: B) -> Result<(Bytes, Option<HeaderMap>), Status>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    read_all(body, None).await.map_err(|e| match e {
        ReadError::TooLarge => Status::internal("unreachable: no response limit"),
        ReadError::Body(status) => status,
    })
}

enum ReadError {
    TooLarge,
    Body(Status),
}

async fn read_all<B>(body: B, limit: Option<usize>) -> Result<(Bytes, Option<HeaderMap>), ReadError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::Body(Status::from_error(e.into())))?;
        match frame.into_data() {
            Ok(data) => {
                len += data.len();
                if limit.is_some_and(|limit| len > limit) {
                    return Err(ReadError::TooLarge);
                }
                chunks.push(data);
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    match &mut trailers {
                        Some(all) => all.extend(t),
                        None => trailers = Some(t),
                    }
                }
            }
        }
    }
    let data = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(len);
            for c in &chunks {
                all.extend_from_slice(c);
            }
            all.freeze()
        }
    };
    Ok((data, trailers))
}

/// The call's `grpc-status`: from the trailers, or from the headers of a trailers-only
/// response.
fn grpc_code(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Option<Code> {
    trailers
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"))
        .map(|v| Code::from_bytes(v.as_bytes()))
}

/// A header map as a stored list, in order; `date` and `content-length` are left out of
/// response headers (they describe one transmission, not the response).
fn header_list(map: &HeaderMap, skip_transmission: bool) -> HeaderList {
    map.iter()
        .filter(|(name, _)| !skip_transmission || (**name != DATE && **name != CONTENT_LENGTH))
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect()
}

fn header_map(list: &HeaderList) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(list.len());
    for (name, value) in list {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            (Ok(name), Ok(value)) => {
                map.append(name, value);
            }
            _ => tracing::warn!(
                header = %name,
                "idempotency: a stored gRPC header is not a valid header and was not replayed"
            ),
        }
    }
    map
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
    let (what, after) = match e {
        Error::Overloaded { retry_after } => ("is overloaded", *retry_after),
        e if e.is_closed() => ("is shut down", Duration::from_secs(5)),
        _ => ("is failing", Duration::from_secs(1)),
    };
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
        headers: header_list(marker.headers(), true),
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
