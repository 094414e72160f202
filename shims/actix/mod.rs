//! Actix-Web 4 integration: the [`Idempotency`] middleware.
//!
//! The middleware answers every case of the shared contract ([`crate::contract`]): it buffers the
//! request body through a limit (413 over it), claims the key through
//! [`Engine::claim_async`](crate::Engine::claim_async) (awaited on the worker's own runtime,
//! never blocking it), puts the body back for the handler, runs it, buffers the response
//! through a limit, completes or releases the key, and only then lets the response go. Its
//! own rejections are `application/problem+json` responses.
//!
//! An error from the inner service, a handler panic or a dropped request future drops the
//! claim, which releases the key (the lock timeout is the backstop). Actix-Web keeps running
//! a handler after the client closed its side of the connection unless the server is built
//! with [`HttpServer::h1_allow_half_closed(false)`](actix_web::HttpServer::h1_allow_half_closed):
//! set it so that a client that gives up releases its key at once instead of after the
//! handler has finished (and stored a response nobody read).
//!
//! A replayed response has the stored headers with each name's values in order; the order
//! between different names is Actix-Web's `HeaderMap`'s, which has none (HTTP gives it no
//! meaning).
//!
//! ```no_run
//! use actix_web::{App, HttpResponse, HttpServer, web};
//! use idempotency_rs::{SqliteIdempotencyStore, actix_integration::Idempotency};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = SqliteIdempotencyStore::new("sqlite:idempotency.db").await?;
//! let idempotency = Idempotency::new(&store).scope_header("x-user-id");
//! HttpServer::new(move || {
//!     App::new()
//!         .wrap(idempotency.clone())
//!         .route("/orders", web::post().to(|| async { HttpResponse::Created().body("created") }))
//! })
//! .h1_allow_half_closed(false)
//! .bind("127.0.0.1:3000")?
//! .run()
//! .await?;
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::future::{Future, Ready, poll_fn, ready};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use actix_web::body::{BodySize, BodyStream, BoxBody, EitherBody, MessageBody};
use actix_web::dev::{Payload, Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::{HttpMessage as _, HttpRequest, HttpResponse};
use bytes::Bytes;

use crate::contract::body::concat;
use crate::contract::{
    Begin, Config, Contract, Finished, Incoming, Mode, Problem, ProblemKind, STORED_HEADER,
    Timings, config_setters, expects_continue, store_unavailable,
};
use crate::{Engine, Error, HeaderList, IdempotencyKey, StoredResponse};

pub use crate::contract::{
    ClaimedKey, KeyPolicy, PathPattern, default_store_policy, store_all_4xx,
};

type ScopeFn = Arc<dyn Fn(&HttpRequest) -> Option<String> + Send + Sync>;
type CoverFn = Arc<dyn Fn(&HttpRequest) -> bool + Send + Sync>;

/// Actix-Web middleware that makes the wrapped app, scope or resource idempotent. Cheap to
/// clone; build it once and clone it into the `HttpServer::new` factory.
///
/// Configure it with the chained setters (the same as the Axum layer's); the defaults are the
/// contract's: UUID keys, optional, POST and PATCH covered, 1 MiB request and response
/// limits, one shared scope.
#[derive(Clone)]
pub struct Idempotency {
    config: Config,
    engine: Engine,
    scope_fn: Option<ScopeFn>,
    cover_if: Option<CoverFn>,
    timings: Arc<Timings>,
}

impl fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("config", &self.config)
            .field("scope_fn", &self.scope_fn.is_some())
            .field("cover_if", &self.cover_if.is_some())
            .finish()
    }
}

impl Idempotency {
    /// A middleware over an engine (or a store) with the default settings.
    pub fn new(engine: impl Into<Engine>) -> Self {
        Idempotency {
            config: Config::default(),
            engine: engine.into(),
            scope_fn: None,
            cover_if: None,
            timings: Arc::default(),
        }
    }

    /// Covers only the requests for which `predicate` is true (besides a covered method and,
    /// with [`Self::paths`], a matching path); the others pass through untouched.
    ///
    /// ```
    /// # use idempotency_rs::{Engine, EngineConfig, actix_integration::Idempotency};
    /// # let engine = Engine::open(EngineConfig::in_memory()).unwrap();
    /// let idempotency = Idempotency::new(&engine)
    ///     .cover_if(|req| !req.path().starts_with("/internal/"));
    /// # let _ = idempotency;
    /// ```
    pub fn cover_if(
        mut self,
        predicate: impl Fn(&HttpRequest) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.cover_if = Some(Arc::new(predicate));
        self
    }

    config_setters!(forward: config, all);

    /// Takes the scope from the request, typically from an extension an authentication
    /// middleware put there. `None` answers 400 `scope-missing`. Overrides
    /// [`Self::scope_header`].
    ///
    /// ```
    /// # use idempotency_rs::{Engine, EngineConfig, actix_integration::Idempotency};
    /// use actix_web::HttpMessage as _;
    ///
    /// #[derive(Clone)]
    /// struct User(String);
    /// # let engine = Engine::open(EngineConfig::in_memory()).unwrap();
    /// let idempotency = Idempotency::new(&engine)
    ///     .scope_fn(|req| req.extensions().get::<User>().map(|u| u.0.clone()));
    /// # let _ = idempotency;
    /// ```
    pub fn scope_fn(
        mut self,
        f: impl Fn(&HttpRequest) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.scope_fn = Some(Arc::new(f));
        self
    }
}

impl<S, B> Transform<S, ServiceRequest> for Idempotency
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Transform = IdempotencyService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(IdempotencyService {
            service: Rc::new(service),
            contract: Contract::with_timings(
                self.engine.clone(),
                self.config.clone(),
                self.timings.clone(),
            ),
            scope_fn: self.scope_fn.clone(),
            cover_if: self.cover_if.clone(),
        }))
    }
}

/// The service made by [`Idempotency`] around the wrapped one.
pub struct IdempotencyService<S> {
    service: Rc<S>,
    contract: Contract,
    scope_fn: Option<ScopeFn>,
    cover_if: Option<CoverFn>,
}

impl<S> fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("config", self.contract.config())
            .field("scope_fn", &self.scope_fn.is_some())
            .finish_non_exhaustive()
    }
}

type Reply<B> = Result<ServiceResponse<EitherBody<B>>, actix_web::Error>;

impl<S, B> Service<ServiceRequest> for IdempotencyService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Future = Pin<Box<dyn Future<Output = Reply<B>>>>;

    actix_web::dev::forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        // `paths` match the path as Actix routes it (percent-decoded).
        let covered = self
            .contract
            .covers_request(req.method().as_str(), req.match_info().as_str())
            && self.cover_if.as_ref().is_none_or(|p| p(req.request()));
        if !covered {
            let service = self.service.clone();
            return Box::pin(async move { pass_through(&service, req).await });
        }
        // The pattern of the resource the path matches. `None` for the default service, and
        // also where this lookup, made before routing, cannot see what routing will do (guards,
        // a `NormalizePath` inside this middleware): `Mode::Lenient` then refuses nothing but
        // still deduplicates a request with a key.
        let (mode, route) = match req.match_pattern() {
            Some(pattern) => (Mode::Strict, pattern),
            None => (Mode::Lenient, req.match_info().as_str().to_owned()),
        };
        Box::pin(handle(
            self.service.clone(),
            self.contract.clone(),
            self.scope_fn.clone(),
            mode,
            route,
            req,
        ))
    }
}

async fn handle<S, B>(
    service: Rc<S>,
    contract: Contract,
    scope_fn: Option<ScopeFn>,
    mode: Mode,
    route: String,
    mut req: ServiceRequest,
) -> Reply<B>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody + 'static,
{
    let limit = contract.config().request_limit();
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let found = contract.key_and_scope(
        |name| req.headers().get_all(name).map(HeaderValue::as_bytes),
        scope_fn.as_ref().map(|f| || f(req.request())),
    );
    let (key, scope) = match (found, mode) {
        (Ok(Some(found)), _) => found,
        (Ok(None), _) | (Err(_), Mode::Lenient) => return pass_through(&service, req).await,
        (Err(problem), Mode::Strict) => {
            // The body is read (and dropped) before the answer: Actix closes the connection
            // after a response sent before the request's body was read.
            let expect = req.headers().get(header::EXPECT).map(HeaderValue::as_bytes);
            if declared.is_none_or(|n| n <= limit as u64) && !expects_continue(expect) {
                drain(req.take_payload(), limit).await;
            }
            contract.rejected(problem.kind, None, None);
            return Ok(reject(req, &problem));
        }
    };
    if declared.is_some_and(|n| n > limit as u64) {
        return match mode {
            Mode::Strict => Ok(too_large(req, &contract)),
            Mode::Lenient => pass_through(&service, req).await,
        };
    }
    let payload = BodyStream::new(req.take_payload());
    let read = actix_web::body::to_bytes_limited(payload, limit).await;
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Err(_) => return Ok(too_large(req, &contract)),
        Ok(Err(_)) => {
            return Ok(plain(
                req,
                StatusCode::BAD_REQUEST,
                "the request body could not be read",
            ));
        }
    };
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.path(), |pq| pq.as_str());
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .map(HeaderValue::as_bytes);
    let incoming = Incoming {
        method: req.method().as_str(),
        path_and_query: path,
        route: &route,
        content_type,
        body: &bytes,
    };
    let begin = contract
        .begin_passing(scope, key, incoming, |p| mode.passes_on(p))
        .await;
    let pending = match begin {
        Begin::Replay(stored) => {
            let (http_req, _) = req.into_parts();
            return Ok(
                ServiceResponse::new(http_req, stored_response(stored)).map_into_right_body()
            );
        }
        Begin::Reject(problem) if mode.passes_on(&problem) => {
            req.set_payload(Payload::from(bytes));
            return pass_through(&service, req).await;
        }
        Begin::Reject(problem) => return Ok(reject(req, &problem)),
        Begin::Run(pending) => mode.pending(pending),
    };
    // From here until `finish`, an error, a panic or a dropped future drops `pending`, which
    // releases the key.
    req.set_payload(Payload::from(bytes));
    let claimed = pending.claimed().clone();
    req.extensions_mut().insert(claimed.key().clone());
    req.extensions_mut().insert(claimed);
    let response = service.call(req).await?;
    let (http_req, response) = response.into_parts();
    let (mut head, body) = response.into_parts();
    let status = head.status().as_u16();
    let headers = header_list(head.headers());
    let body = match buffer(body, contract.config().response_limit()).await {
        Buffered::Whole(body) => {
            let outcome = pending.finish_owned(status, headers, body.to_vec()).await;
            mark_unstored(head.headers_mut(), &outcome);
            BoxBody::new(body)
        }
        Buffered::TooLarge { prefix, rest, size } => {
            let outcome = pending.finish_oversized(status).await;
            mark_unstored(head.headers_mut(), &outcome);
            BoxBody::new(Prefixed {
                prefix: prefix.into(),
                rest,
                size,
            })
        }
        Buffered::Failed => {
            drop(pending);
            let response = HttpResponse::with_body(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the response body failed while it was being produced",
            );
            return Ok(
                ServiceResponse::new(http_req, response.map_into_boxed_body())
                    .map_into_right_body(),
            );
        }
    };
    Ok(ServiceResponse::new(http_req, head.set_body(body)).map_into_right_body())
}

/// Reads and drops a refused request's body, up to `limit` bytes, chunk by chunk.
async fn drain(payload: Payload, limit: usize) {
    let mut body = Box::pin(BodyStream::new(payload));
    let mut read = 0usize;
    while read <= limit {
        match poll_fn(|cx| body.as_mut().poll_next(cx)).await {
            Some(Ok(chunk)) => read += chunk.len(),
            _ => return,
        }
    }
}

async fn pass_through<S, B>(service: &S, req: ServiceRequest) -> Reply<B>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody + 'static,
{
    Ok(service.call(req).await?.map_into_left_body())
}

fn too_large<B>(req: ServiceRequest, contract: &Contract) -> ServiceResponse<EitherBody<B>> {
    let problem = contract.body_too_large();
    contract.rejected(problem.kind, None, None);
    reject(req, &problem)
}

fn reject<B>(req: ServiceRequest, problem: &Problem) -> ServiceResponse<EitherBody<B>> {
    let (http_req, _) = req.into_parts();
    ServiceResponse::new(http_req, problem_response(problem)).map_into_right_body()
}

fn plain<B>(
    req: ServiceRequest,
    status: StatusCode,
    text: &'static str,
) -> ServiceResponse<EitherBody<B>> {
    let (http_req, _) = req.into_parts();
    let response = HttpResponse::with_body(status, text).map_into_boxed_body();
    ServiceResponse::new(http_req, response).map_into_right_body()
}

fn mark_unstored(headers: &mut HeaderMap, outcome: &Finished) {
    if let Finished::Failed(e) = outcome {
        tracing::warn!(error = %e, "idempotency: the response was sent but could not be stored");
        headers.insert(
            HeaderName::from_static(STORED_HEADER),
            HeaderValue::from_static("false"),
        );
    }
}

enum Buffered<B> {
    Whole(Bytes),
    TooLarge {
        prefix: Vec<Bytes>,
        rest: Option<Pin<Box<B>>>,
        size: BodySize,
    },
    Failed,
}

/// Reads the body until it ends or passes `limit` bytes.
async fn buffer<B: MessageBody>(body: B, limit: usize) -> Buffered<B> {
    let size = body.size();
    let body = match body.try_into_bytes() {
        // Already in memory (the usual case): no copy, whatever its size.
        Ok(bytes) if bytes.len() <= limit => return Buffered::Whole(bytes),
        Ok(bytes) => {
            return Buffered::TooLarge {
                prefix: vec![bytes],
                rest: None,
                size,
            };
        }
        Err(body) => body,
    };
    let mut body = Box::pin(body);
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    loop {
        match poll_fn(|cx| body.as_mut().poll_next(cx)).await {
            None => break,
            Some(Err(_)) => return Buffered::Failed,
            Some(Ok(chunk)) => {
                total += chunk.len();
                chunks.push(chunk);
                if total > limit {
                    return Buffered::TooLarge {
                        prefix: chunks,
                        rest: Some(body),
                        size,
                    };
                }
            }
        }
    }
    Buffered::Whole(concat(chunks, total))
}

/// The buffered start of an over-limit body, followed by the rest of it, unbuffered.
struct Prefixed<B> {
    prefix: VecDeque<Bytes>,
    rest: Option<Pin<Box<B>>>,
    size: BodySize,
}

impl<B: MessageBody> MessageBody for Prefixed<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.size
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        if let Some(chunk) = self.prefix.pop_front() {
            return Poll::Ready(Some(Ok(chunk)));
        }
        match self.rest.as_mut() {
            Some(rest) => rest.as_mut().poll_next(cx),
            None => Poll::Ready(None),
        }
    }
}

fn header_list(headers: &HeaderMap) -> HeaderList {
    headers
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

/// Builds a response from a stored one. Names or values that are not valid HTTP (a corrupt
/// or foreign record) are skipped rather than failing the replay.
fn stored_response(stored: StoredResponse) -> HttpResponse {
    let Ok(status) = StatusCode::from_u16(stored.status) else {
        return problem_response(&store_unavailable(&Error::Corrupt {
            detail: format!("stored status {}", stored.status),
        }));
    };
    let mut response = HttpResponse::with_body(status, stored.body).map_into_boxed_body();
    let headers = response.headers_mut();
    for (name, value) in stored.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(&value),
        ) {
            headers.append(n, v);
        }
    }
    response
}

/// The problem+json response for a problem.
fn problem_response(problem: &Problem) -> HttpResponse {
    stored_response(problem.to_response())
}

/// The error of the [`ClaimedKey`] and [`IdempotencyKey`] extractors when the request carries
/// no claimed key (it came without an `Idempotency-Key` while the key is optional, or the
/// route is not behind the middleware): 400 `key-missing`, problem+json. `Option<ClaimedKey>`
/// and `Option<IdempotencyKey>` extract `None` instead.
#[derive(Debug, Clone, Copy)]
pub struct KeyMissing;

impl fmt::Display for KeyMissing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the request carries no claimed Idempotency-Key")
    }
}

impl actix_web::ResponseError for KeyMissing {
    fn status_code(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }

    fn error_response(&self) -> HttpResponse {
        problem_response(&Problem::new(
            ProblemKind::KeyMissing,
            "This endpoint requires an Idempotency-Key header. Send a new UUID with each new \
             request, and the same one when you retry it.",
        ))
    }
}

/// The key, scope and fencing token of a request that won its key, put there by the
/// middleware.
impl actix_web::FromRequest for ClaimedKey {
    type Error = KeyMissing;
    type Future = Ready<Result<Self, KeyMissing>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            req.extensions()
                .get::<ClaimedKey>()
                .cloned()
                .ok_or(KeyMissing),
        )
    }
}

/// The key of a request that won it, as the engine stored it (unquoted, normalised), put
/// there by the middleware.
impl actix_web::FromRequest for IdempotencyKey {
    type Error = KeyMissing;
    type Future = Ready<Result<Self, KeyMissing>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            req.extensions()
                .get::<IdempotencyKey>()
                .cloned()
                .ok_or(KeyMissing),
        )
    }
}
