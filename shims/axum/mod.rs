//! Axum (and any tower HTTP service) integration: [`IdempotencyLayer`].
//!
//! The layer answers every case of the shared contract ([`crate::contract`]): it buffers the
//! request body through a limit (413 over it), claims the key through
//! [`Engine::claim_async`](crate::Engine::claim_async) (never blocking the runtime), runs the
//! inner service, buffers the response through a limit, completes or releases the key, and
//! only then lets the response go. Its own rejections are `application/problem+json`
//! responses; the service's error type stays the inner one.
//!
//! If the client disconnects, hyper drops the request future, which drops the lease and
//! releases the key (the lock timeout is the backstop).
//!
//! # Which requests
//!
//! A request goes through the contract when its method is covered
//! ([`IdempotencyLayer::methods`]), its path matches one of [`IdempotencyLayer::paths`] (if
//! any) and [`IdempotencyLayer::cover_if`] (if set) agrees; the handler then finds a
//! [`ClaimedKey`] (and the [`IdempotencyKey`]) as extractors. Where the layer sits decides the
//! rest:
//!
//! - `Router::route_layer`, `Router::layer`, a route's own `post(h).layer(..)`: after routing.
//!   A request the router routed without matching a route (it carries an [`OriginalUri`] and
//!   no [`MatchedPath`]) is on its way to the fallback: the layer refuses nothing there (no
//!   `key-missing`, `key-invalid`, `scope-missing`, 413) and does not store a 404, so an
//!   unknown path is the router's own 404. A service mounted with `nest_service` is reached the
//!   same way, so there too nothing is refused, but a request with a key is still
//!   deduplicated; layer that service itself to require keys. A layered `MethodRouter` served
//!   or called on its own (no router) covers every request.
//! - Around a whole `Router` (`tower::Layer::layer(&layer, router)`, `ServiceBuilder`): before
//!   routing, where the fallback cannot be told apart; name the covered [`IdempotencyLayer::paths`].
//!
//! ```no_run
//! use axum::{Router, routing::post};
//! use idempotency_rs::{SqliteIdempotencyStore, axum_integration::idempotency_layer};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = SqliteIdempotencyStore::new("sqlite:idempotency.db").await?;
//! let app: Router = Router::new()
//!     .route("/orders", post(|| async { "created" }))
//!     .layer(idempotency_layer(&store).scope_header("x-user-id"));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```

use std::any::TypeId;
use std::fmt;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{FromRequestParts, MatchedPath, OptionalFromRequestParts, OriginalUri};
use axum::response::IntoResponse;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, request::Parts};
use tower::{Layer, Service};

use crate::contract::body::{
    BoxError, Collected, Prefixed, collect, header_list, header_map, mark_unstored,
};
use crate::contract::{
    Begin, Config, Contract, Finished, Incoming, Mode, Problem, ProblemKind, Timings,
    config_setters, expects_continue, store_unavailable,
};
use crate::{Engine, Error, IdempotencyKey, StoredResponse};

pub use crate::contract::{
    ClaimedKey, KeyPolicy, PathPattern, default_store_policy, store_all_4xx,
};

type ScopeFn = Arc<dyn Fn(&Parts) -> Option<String> + Send + Sync>;
type CoverFn = Arc<dyn Fn(&Parts) -> bool + Send + Sync>;

/// A tower [`Layer`] that makes the wrapped HTTP service idempotent. Cheap to clone.
///
/// Configure it with the chained setters; the defaults are the contract's: UUID keys,
/// optional, POST and PATCH covered, 1 MiB request and response limits, one shared scope.
#[derive(Clone)]
pub struct IdempotencyLayer {
    config: Config,
    engine: Engine,
    scope_fn: Option<ScopeFn>,
    cover_if: Option<CoverFn>,
    timings: Arc<Timings>,
}

/// A layer over `store` with the default settings (see [`IdempotencyLayer`]).
pub fn idempotency_layer(store: impl Into<Engine>) -> IdempotencyLayer {
    IdempotencyLayer::new(store)
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("config", &self.config)
            .field("scope_fn", &self.scope_fn.is_some())
            .field("cover_if", &self.cover_if.is_some())
            .finish()
    }
}

impl IdempotencyLayer {
    /// A layer over an engine (or a store) with the default settings.
    pub fn new(engine: impl Into<Engine>) -> Self {
        IdempotencyLayer {
            config: Config::default(),
            engine: engine.into(),
            scope_fn: None,
            cover_if: None,
            timings: Arc::default(),
        }
    }

    /// Covers only the requests for which `predicate` is true (besides a covered method and,
    /// with [`Self::paths`], a matching path); the others pass through untouched, as with
    /// tower-http's predicates. It sees the request head: method, URI, headers and the
    /// extensions (such as Axum's [`MatchedPath`] when the layer is inside the router).
    ///
    /// ```
    /// # use idempotency_rs::{Engine, EngineConfig, axum_integration::IdempotencyLayer};
    /// # let engine = Engine::open(EngineConfig::in_memory()).unwrap();
    /// // Every covered request except the internal ones.
    /// let layer = IdempotencyLayer::new(&engine)
    ///     .cover_if(|parts| !parts.uri.path().starts_with("/internal/"));
    /// # let _ = layer;
    /// ```
    pub fn cover_if(mut self, predicate: impl Fn(&Parts) -> bool + Send + Sync + 'static) -> Self {
        self.cover_if = Some(Arc::new(predicate));
        self
    }

    config_setters!(forward: config, all);

    /// Takes the scope from the request, typically from an extension an authentication layer
    /// put there. `None` answers 400 `scope-missing`. Overrides [`Self::scope_header`].
    ///
    /// ```
    /// # use idempotency_rs::{Engine, EngineConfig, axum_integration::IdempotencyLayer};
    /// #[derive(Clone)]
    /// struct User(String);
    /// # let engine = Engine::open(EngineConfig::in_memory()).unwrap();
    /// let layer = IdempotencyLayer::new(&engine)
    ///     .scope_fn(|parts| parts.extensions.get::<User>().map(|u| u.0.clone()));
    /// # let _ = layer;
    /// ```
    pub fn scope_fn(
        mut self,
        f: impl Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.scope_fn = Some(Arc::new(f));
        self
    }
}

impl<S: 'static> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            // Around a whole `Router`, nothing has been routed by it yet: even a request that an
            // outer router passed on (a `nest_service`) is one of this router's to cover.
            wraps_router: TypeId::of::<S>() == TypeId::of::<axum::Router>(),
            inner,
            contract: Contract::with_timings(
                self.engine.clone(),
                self.config.clone(),
                self.timings.clone(),
            ),
            scope_fn: self.scope_fn.clone(),
            cover_if: self.cover_if.clone(),
        }
    }
}

/// The service made by [`IdempotencyLayer`].
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    contract: Contract,
    scope_fn: Option<ScopeFn>,
    cover_if: Option<CoverFn>,
    wraps_router: bool,
}

impl<S: fmt::Debug> fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("inner", &self.inner)
            .field("config", self.contract.config())
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
        // The inner service was driven to readiness: move that one into the future and leave
        // a fresh clone behind (tower's "be careful when cloning inner services").
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let contract = self.contract.clone();
        let scope_fn = self.scope_fn.clone();
        // `paths` match the path the client sent: inside a nested router the URI has lost its
        // prefix, and the `OriginalUri` the router recorded still has it.
        let path = req
            .extensions()
            .get::<OriginalUri>()
            .map_or_else(|| req.uri().path(), |o| o.path());
        let covered = contract
            .covers_request(req.method().as_str(), path)
            .then(|| Coverage {
                cover_if: self.cover_if.clone(),
                wraps_router: self.wraps_router,
            });
        Box::pin(handle(inner, contract, scope_fn, covered, req))
    }
}

async fn handle<S, ReqBody, ResBody>(
    mut inner: S,
    contract: Contract,
    scope_fn: Option<ScopeFn>,
    // `None`: method or path not covered; `Some`: the checks that need the request's parts.
    covered: Option<Coverage>,
    req: Request<ReqBody>,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<ResBody>>,
    ReqBody: http_body::Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let (mut parts, body) = req.into_parts();
    let mode = match covered {
        Some(coverage) => coverage.mode(&parts),
        None => None,
    };
    let Some(mode) = mode else {
        return pass_through(inner, parts, body).await;
    };
    let limit = contract.config().request_limit();
    let found = contract.key_and_scope(
        |name| {
            parts
                .headers
                .get_all(name)
                .iter()
                .map(HeaderValue::as_bytes)
        },
        scope_fn.as_ref().map(|f| || f(&parts)),
    );
    let (key, scope) = match (found, mode) {
        (Ok(Some(found)), _) => found,
        (Ok(None), _) | (Err(_), Mode::Lenient) => return pass_through(inner, parts, body).await,
        (Err(problem), Mode::Strict) => {
            // Read the body first (up to the limit, discarded), so the connection stays open
            // for the client's next request: hyper closes one whose request body is unread.
            drain(&parts, body, limit).await;
            contract.rejected(problem.kind, None, None);
            return Ok(problem_response(&problem));
        }
    };
    if body.size_hint().lower() > limit as u64 {
        return match mode {
            Mode::Strict => Ok(too_large(&contract)),
            Mode::Lenient => pass_through(inner, parts, body).await,
        };
    }
    let bytes = match collect(Box::pin(body), Some(limit)).await {
        Collected::Whole { data, .. } => data,
        Collected::TooLarge { prefix, rest } => {
            return match mode {
                Mode::Strict => Ok(too_large(&contract)),
                Mode::Lenient => {
                    let body = Body::new(Prefixed::new(prefix, rest));
                    let response = inner.call(Request::from_parts(parts, body)).await?;
                    Ok(response.map(Body::new))
                }
            };
        }
        Collected::Failed(e) => {
            tracing::debug!(error = %e, "idempotency: the request body could not be read");
            return Ok(plain(
                StatusCode::BAD_REQUEST,
                "the request body could not be read",
            ));
        }
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path(), |pq| pq.as_str());
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .map(HeaderValue::as_bytes);
    let route = parts
        .extensions
        .get::<MatchedPath>()
        .map_or(parts.uri.path(), MatchedPath::as_str);
    let incoming = Incoming {
        method: parts.method.as_str(),
        path_and_query: path,
        route,
        content_type,
        body: &bytes,
    };
    let begin = contract
        .begin_passing(scope, key, incoming, |p| mode.passes_on(p))
        .await;
    let pending = match begin {
        Begin::Replay(stored) => {
            tracing::debug!(
                status = stored.status,
                "idempotency: replayed a stored response"
            );
            return Ok(stored_response(stored));
        }
        Begin::Reject(problem) if mode.passes_on(&problem) => {
            let response = inner
                .call(Request::from_parts(parts, Body::from(bytes)))
                .await?;
            return Ok(response.map(Body::new));
        }
        Begin::Reject(problem) => return Ok(problem_response(&problem)),
        Begin::Run(pending) => {
            tracing::debug!(
                fencing_token = pending.lease().fencing_token(),
                "idempotency: key claimed"
            );
            mode.pending(pending)
        }
    };
    // From here until `finish`, an error, a panic or a dropped future drops `pending`, which
    // releases the key.
    let claimed = pending.claimed().clone();
    parts.extensions.insert(claimed.key().clone());
    parts.extensions.insert(claimed);
    let response = inner
        .call(Request::from_parts(parts, Body::from(bytes)))
        .await?;
    let (mut rparts, rbody) = response.into_parts();
    let status = rparts.status.as_u16();
    let headers = header_list(&rparts.headers);
    // Trailers of an HTTP response are not kept (HTTP/1.1 clients rarely see them); the gRPC
    // layer keeps them.
    let limit = contract.config().response_limit();
    match collect(Box::pin(rbody), Some(limit)).await {
        Collected::Whole { data, .. } => {
            let outcome = pending.finish_owned(status, headers, data.to_vec()).await;
            mark(&mut rparts.headers, &outcome);
            Ok(Response::from_parts(rparts, Body::from(data)))
        }
        Collected::TooLarge { prefix, rest } => {
            let outcome = pending.finish_oversized(status).await;
            mark(&mut rparts.headers, &outcome);
            let body = Prefixed::new(prefix, rest);
            Ok(Response::from_parts(rparts, Body::new(body)))
        }
        Collected::Failed(e) => {
            tracing::debug!(error = %e, "idempotency: the response body failed; key released");
            drop(pending);
            Ok(plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the response body failed while it was being produced",
            ))
        }
    }
}

/// Reads and discards a request body the layer refuses, up to `limit` bytes, so that hyper
/// keeps the connection. Not when the client waits for `100 Continue` before it sends the body:
/// then the refusal goes first, and the body is never asked for.
async fn drain<B>(parts: &Parts, body: B, limit: usize)
where
    B: http_body::Body<Data = Bytes>,
{
    let expect = parts.headers.get(http::header::EXPECT);
    if expects_continue(expect.map(HeaderValue::as_bytes))
        || body.size_hint().lower() > limit as u64
    {
        return;
    }
    let mut body = pin!(body);
    let mut read = 0usize;
    while read <= limit {
        match std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
            _ => return,
        }
    }
}

/// The checks of a covered method and path that need the request's parts.
struct Coverage {
    cover_if: Option<CoverFn>,
    wraps_router: bool,
}

impl Coverage {
    /// How the request is handled: `None` when `cover_if` says no.
    fn mode(self, parts: &Parts) -> Option<Mode> {
        if !self.cover_if.is_none_or(|p| p(parts)) {
            return None;
        }
        // Routed by a `Router` (which records the `OriginalUri` before it matches anything)
        // without matching a route (no `MatchedPath`).
        let unmatched = !self.wraps_router
            && parts.extensions.get::<MatchedPath>().is_none()
            && parts.extensions.get::<OriginalUri>().is_some();
        Some(if unmatched {
            Mode::Lenient
        } else {
            Mode::Strict
        })
    }
}

async fn pass_through<S, ReqBody, ResBody>(
    mut inner: S,
    parts: Parts,
    body: ReqBody,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<ResBody>>,
    ReqBody: http_body::Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let response = inner
        .call(Request::from_parts(parts, Body::new(body)))
        .await?;
    Ok(response.map(Body::new))
}

fn mark(headers: &mut http::HeaderMap, outcome: &Finished) {
    if let Finished::Failed(e) = outcome {
        mark_unstored(headers, e);
    }
}

/// Builds a response from a stored one. Names or values that are not valid HTTP (a corrupt
/// or foreign record) are skipped rather than failing the replay.
pub(crate) fn stored_response(stored: StoredResponse) -> Response<Body> {
    let Ok(status) = StatusCode::from_u16(stored.status) else {
        return problem_response(&store_unavailable(&Error::Corrupt {
            detail: format!("stored status {}", stored.status),
        }));
    };
    let mut response = Response::new(Body::from(stored.body));
    *response.status_mut() = status;
    *response.headers_mut() = header_map(&stored.headers);
    response
}

/// The problem+json response for a problem.
pub(crate) fn problem_response(problem: &Problem) -> Response<Body> {
    stored_response(problem.to_response())
}

fn too_large(contract: &Contract) -> Response<Body> {
    let problem = contract.body_too_large();
    contract.rejected(problem.kind, None, None);
    problem_response(&problem)
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::from(text));
    *r.status_mut() = status;
    r
}

/// The rejection of the [`ClaimedKey`] and [`IdempotencyKey`] extractors when the request
/// carries no claimed key (it came without an `Idempotency-Key` while the key is optional, or
/// the route is not behind the layer): 400 `key-missing`, problem+json.
#[derive(Debug, Clone, Copy)]
pub struct KeyMissing;

impl IntoResponse for KeyMissing {
    fn into_response(self) -> Response<Body> {
        problem_response(&Problem::new(
            ProblemKind::KeyMissing,
            "This endpoint requires an Idempotency-Key header. Send a new UUID with each new \
             request, and the same one when you retry it.",
        ))
    }
}

/// The key, scope and fencing token of a request that won its key, put there by the layer.
/// `Option<ClaimedKey>` is `None` for a request without a key.
impl<S: Send + Sync> FromRequestParts<S> for ClaimedKey {
    type Rejection = KeyMissing;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, KeyMissing> {
        parts
            .extensions
            .get::<ClaimedKey>()
            .cloned()
            .ok_or(KeyMissing)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for ClaimedKey {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<ClaimedKey>().cloned())
    }
}

/// The key of a request that won it, as the engine stored it (unquoted, normalised), put
/// there by the layer. `Option<IdempotencyKey>` is `None` for a request without a key.
impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = KeyMissing;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, KeyMissing> {
        parts
            .extensions
            .get::<IdempotencyKey>()
            .cloned()
            .ok_or(KeyMissing)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for IdempotencyKey {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<IdempotencyKey>().cloned())
    }
}
