//! The layer, its settings and the scope extractor.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Code, Status};
use tower::Layer;

use super::service::IdempotencyService;
use crate::Engine;
use crate::http::KeyPolicy;

/// Decides from a response's `grpc-status` whether it is stored for replay.
pub(crate) type StorePredicate = Arc<dyn Fn(Code) -> bool + Send + Sync>;

type ScopeFn = dyn Fn(&http::request::Parts) -> Option<String> + Send + Sync;

/// The default storage rule: `OK` and the deterministic errors are stored (`INVALID_ARGUMENT`,
/// `NOT_FOUND`, `ALREADY_EXISTS`, `PERMISSION_DENIED`, `FAILED_PRECONDITION`, `OUT_OF_RANGE`,
/// `UNIMPLEMENTED`); every other code releases the key so that a retry runs the method again.
///
/// ```
/// use idempotency_rs::tonic_integration::default_store_policy;
/// use tonic::Code;
/// assert!(default_store_policy(Code::Ok));
/// assert!(default_store_policy(Code::NotFound));
/// assert!(!default_store_policy(Code::Unavailable));
/// ```
pub fn default_store_policy(code: Code) -> bool {
    matches!(
        code,
        Code::Ok
            | Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented
    )
}

/// Where a call's scope (the tenant or user its key belongs to) comes from.
#[derive(Clone)]
pub(crate) enum Scope {
    /// One scope for every call (the empty scope).
    Global,
    /// The value of this metadata entry (lower case).
    Metadata(String),
    /// A function of the request head.
    Function(Arc<ScopeFn>),
}

impl Scope {
    pub(crate) fn extract(&self, parts: &http::request::Parts) -> Result<String, Status> {
        match self {
            Scope::Global => Ok(String::new()),
            Scope::Metadata(name) => {
                let mut values = parts.headers.get_all(name.as_str()).iter();
                match (values.next(), values.next()) {
                    (Some(value), None) => match value.to_str().map(str::trim) {
                        Ok(s) if !s.is_empty() && crate::validate_scope(s).is_ok() => {
                            Ok(s.to_owned())
                        }
                        _ => Err(scope_metadata_missing(name)),
                    },
                    _ => Err(scope_metadata_missing(name)),
                }
            }
            Scope::Function(f) => match f(parts) {
                Some(scope) if crate::validate_scope(&scope).is_ok() => Ok(scope),
                Some(_) => Err(Status::invalid_argument(
                    "the tenant or user id of this call is too long (over 1024 bytes) or holds a \
                     NUL byte, so its idempotency-key cannot be checked",
                )),
                None => Err(Status::unauthenticated(
                    "the call does not say which user or tenant it belongs to, so its \
                     idempotency-key cannot be checked; authenticate the call and retry",
                )),
            },
        }
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Global => f.write_str("Global"),
            Scope::Metadata(name) => f.debug_tuple("Metadata").field(name).finish(),
            Scope::Function(_) => f.write_str("Function"),
        }
    }
}

fn scope_metadata_missing(name: &str) -> Status {
    Status::invalid_argument(format!(
        "send exactly one `{name}` metadata entry naming the user or tenant: idempotency keys \
         are kept per user"
    ))
}

/// The settings shared by every clone of the layer and its services.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) engine: Engine,
    pub(crate) methods: BTreeSet<String>,
    pub(crate) key_policy: KeyPolicy,
    pub(crate) require_key: bool,
    pub(crate) scope: Scope,
    pub(crate) max_message_bytes: usize,
    pub(crate) max_response_bytes: usize,
    pub(crate) store_when: StorePredicate,
    pub(crate) lock_timeout: Option<Duration>,
    pub(crate) retention: Option<Duration>,
}

impl Config {
    pub(crate) fn covers(&self, path: &str) -> bool {
        self.methods.contains(path)
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("engine", &self.engine)
            .field("methods", &self.methods)
            .field("key_policy", &self.key_policy)
            .field("require_key", &self.require_key)
            .field("scope", &self.scope)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("lock_timeout", &self.lock_timeout)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

/// The tower layer for `tonic::transport::Server::builder().layer(..)`. Cheap to clone.
///
/// Build it with [`IdempotencyLayer::new`] and the chained setters; name each covered unary
/// method with [`IdempotencyLayer::method`]. See the [module docs](super) for the behaviour.
#[derive(Clone)]
pub struct IdempotencyLayer {
    config: Arc<Config>,
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.config.fmt(f)
    }
}

impl IdempotencyLayer {
    /// A layer over an engine (or a store) covering no method yet, with the defaults of the
    /// HTTP shims where they apply: UUID keys ([`KeyPolicy::Uuid`]), optional; one shared
    /// scope; and gRPC's own: 4 MiB message and response limits, [`default_store_policy`]; the
    /// engine's lock timeout and retention.
    pub fn new(engine: impl Into<Engine>) -> Self {
        IdempotencyLayer {
            config: Arc::new(Config {
                engine: engine.into(),
                methods: BTreeSet::new(),
                key_policy: KeyPolicy::Uuid,
                require_key: false,
                scope: Scope::Global,
                max_message_bytes: 4 * 1024 * 1024,
                max_response_bytes: 4 * 1024 * 1024,
                store_when: Arc::new(default_store_policy),
                lock_timeout: None,
                retention: None,
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// Covers the unary method with this full path, `/package.Service/Method` (as in the
    /// generated server's routes, e.g. `/orders.Orders/CreateOrder`).
    ///
    /// Name only unary methods: the layer buffers a covered call's whole request and response,
    /// which would break a streaming method.
    pub fn method(self, path: impl Into<String>) -> Self {
        let path = path.into();
        self.with(|c| {
            c.methods.insert(path);
        })
    }

    /// Covers each of these unary methods (see [`IdempotencyLayer::method`]).
    pub fn methods<I, P>(self, paths: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        self.with(|c| c.methods.extend(paths.into_iter().map(Into::into)))
    }

    /// Whether a covered call without `idempotency-key` metadata is refused with
    /// `INVALID_ARGUMENT` (`true`) or passed through without deduplication (`false`, the
    /// default, which lets clients adopt keys one at a time).
    pub fn require_key(self, required: bool) -> Self {
        self.with(|c| c.require_key = required)
    }

    /// Which keys are accepted: [`KeyPolicy::Uuid`] (the default, as in the HTTP shims) or
    /// [`KeyPolicy::Opaque`] (1 to 255 printable ASCII characters). Others get
    /// `INVALID_ARGUMENT`.
    pub fn key_policy(self, policy: KeyPolicy) -> Self {
        self.with(|c| c.key_policy = policy)
    }

    /// Takes the scope from this metadata entry (such as `x-tenant-id`). A covered call without
    /// exactly one such entry gets `INVALID_ARGUMENT`. Without a scope entry or function, all
    /// calls share one scope.
    ///
    /// A scope taken from client metadata is only as trustworthy as the client: behind real
    /// authentication, use [`IdempotencyLayer::scope_fn`] on what the authentication layer put
    /// into the request extensions.
    pub fn scope_metadata(self, name: impl Into<String>) -> Self {
        let name = name.into().to_ascii_lowercase();
        self.with(|c| c.scope = Scope::Metadata(name))
    }

    /// Takes the scope from the request head (method path, metadata as headers, extensions),
    /// typically from an extension an authentication layer placed before this one inserted.
    /// `None` answers `UNAUTHENTICATED`. Replaces [`IdempotencyLayer::scope_metadata`].
    ///
    /// ```
    /// # use idempotency_rs::{Engine, EngineConfig, tonic_integration::IdempotencyLayer};
    /// #[derive(Clone)]
    /// struct Caller(String);
    /// # let engine = Engine::open(EngineConfig::in_memory()).unwrap();
    /// let layer = IdempotencyLayer::new(engine)
    ///     .method("/orders.Orders/CreateOrder")
    ///     .scope_fn(|parts| parts.extensions.get::<Caller>().map(|c| c.0.clone()));
    /// # let _ = layer;
    /// ```
    pub fn scope_fn(
        self,
        scope_of: impl Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        let f: Arc<ScopeFn> = Arc::new(scope_of);
        self.with(|c| c.scope = Scope::Function(f))
    }

    /// The largest request body (the gRPC-framed message) accepted on a covered call; a larger
    /// one gets `RESOURCE_EXHAUSTED` and the handler does not run. Default 4 MiB, gRPC's default
    /// receive limit.
    pub fn max_message_bytes(self, limit: usize) -> Self {
        self.with(|c| c.max_message_bytes = limit)
    }

    /// The largest response (headers, message and trailers) stored for replay. A larger one is
    /// still sent, and the record is completed with an `ALREADY_EXISTS` marker. Default 4 MiB.
    pub fn max_response_bytes(self, limit: usize) -> Self {
        self.with(|c| c.max_response_bytes = limit)
    }

    /// Replaces the rule deciding, from the response's `grpc-status`, whether it is stored
    /// (default [`default_store_policy`]). A response that is not stored releases the key.
    pub fn store_when(self, predicate: impl Fn(Code) -> bool + Send + Sync + 'static) -> Self {
        let predicate: StorePredicate = Arc::new(predicate);
        self.with(|c| c.store_when = predicate)
    }

    /// The lock timeout of the leases this layer takes (default: the engine's).
    pub fn lock_timeout(self, timeout: Duration) -> Self {
        self.with(|c| c.lock_timeout = Some(timeout))
    }

    /// How long completed calls of this layer are replayed (default: the engine's retention).
    pub fn retention(self, retention: Duration) -> Self {
        self.with(|c| c.retention = Some(retention))
    }

    /// Whether calls to this method path go through the idempotency check.
    pub fn covers(&self, path: &str) -> bool {
        self.config.covers(path)
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService::new(inner, self.config.clone())
    }
}
