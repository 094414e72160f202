//! The layer, its settings and the scope extractor.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use tonic::{Code, Status};
use tower::Layer;

use super::service::IdempotencyService;
use crate::Engine;
use crate::contract::{Config, Contract, ProblemKind, Timings, config_setters};

/// Decides from a response's `grpc-status` whether it is stored for replay.
pub(crate) type StorePredicate = Arc<dyn Fn(Code) -> bool + Send + Sync>;

type ScopeFn = dyn Fn(&http::request::Parts) -> Option<String> + Send + Sync;

/// The default storage rule: `OK` and the errors that are a result of the call are stored
/// (`NOT_FOUND`, `ALREADY_EXISTS`, `PERMISSION_DENIED`, `FAILED_PRECONDITION`, `OUT_OF_RANGE`);
/// every other code releases the key so that a retry runs the method again.
///
/// `INVALID_ARGUMENT` (the request failed validation) and `UNIMPLEMENTED` (no such method)
/// say the call never started, so, as the HTTP shims do with 400 and 422, they are not stored:
/// the client may fix the request and retry with the same key. A method that answers
/// `INVALID_ARGUMENT` after it has acted must use [`store_all_deterministic`] instead.
///
/// ```
/// use idempotency_rs::tonic_integration::{default_store_policy, store_all_deterministic};
/// use tonic::Code;
/// assert!(default_store_policy(Code::Ok));
/// assert!(default_store_policy(Code::NotFound));
/// assert!(!default_store_policy(Code::InvalidArgument));
/// assert!(store_all_deterministic(Code::InvalidArgument));
/// assert!(!default_store_policy(Code::Unavailable));
/// ```
pub fn default_store_policy(code: Code) -> bool {
    matches!(
        code,
        Code::Ok
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::OutOfRange
    )
}

/// The storage rule that replays validation failures too: [`default_store_policy`] plus
/// `INVALID_ARGUMENT` and `UNIMPLEMENTED`.
pub fn store_all_deterministic(code: Code) -> bool {
    default_store_policy(code) || matches!(code, Code::InvalidArgument | Code::Unimplemented)
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
    /// The call's scope, or the refusal: `ScopeMissing` (absent, repeated or blank) or
    /// `ScopeInvalid` (a value that cannot be a scope), with the status to answer.
    pub(crate) fn extract(
        &self,
        parts: &http::request::Parts,
    ) -> Result<String, (ProblemKind, Status)> {
        match self {
            Scope::Global => Ok(String::new()),
            Scope::Metadata(name) => {
                let mut values = parts.headers.get_all(name.as_str()).iter();
                let (Some(value), None) = (values.next(), values.next()) else {
                    return Err((ProblemKind::ScopeMissing, scope_metadata_missing(name)));
                };
                let scope = if name.ends_with("-bin") {
                    binary_scope(value).ok_or_else(|| scope_metadata_invalid(name))?
                } else {
                    // Only spaces and tabs are trimmed (and HTTP/2 has none around a value);
                    // anything else printable is part of the scope.
                    let Ok(text) = value.to_str() else {
                        return Err(scope_metadata_invalid(name));
                    };
                    text.trim_matches([' ', '\t']).to_owned()
                };
                if scope.is_empty() {
                    return Err((ProblemKind::ScopeMissing, scope_metadata_missing(name)));
                }
                match crate::validate_scope(&scope) {
                    Ok(()) => Ok(scope),
                    Err(_) => Err(scope_metadata_invalid(name)),
                }
            }
            // A blank scope (an empty user id) would share the scope of calls that have none:
            // it is no scope.
            Scope::Function(f) => match f(parts).filter(|s| !s.trim().is_empty()) {
                Some(scope) if crate::validate_scope(&scope).is_ok() => Ok(scope),
                Some(_) => Err((
                    ProblemKind::ScopeInvalid,
                    Status::invalid_argument(
                        "the tenant or user id of this call is too long (over 1024 bytes) or \
                         holds a NUL byte, so its idempotency-key cannot be checked",
                    ),
                )),
                None => Err((
                    ProblemKind::ScopeMissing,
                    Status::unauthenticated(
                        "the call does not say which user or tenant it belongs to, so its \
                         idempotency-key cannot be checked; authenticate the call and retry",
                    ),
                )),
            },
        }
    }
}

/// The scope of a binary (`-bin`) metadata entry: its decoded bytes, written in the one
/// encoding tonic sends (base64 without padding). The text as received would make `YWxpY2U`
/// and `YWxpY2U=`, the same bytes (gRPC accepts both), two scopes, and run a retry again.
/// `None` for a value that is not base64.
fn binary_scope(value: &http::HeaderValue) -> Option<String> {
    let mut headers = http::HeaderMap::with_capacity(1);
    headers.insert("x-scope-bin", value.clone());
    let map = tonic::metadata::MetadataMap::from_headers(headers);
    let bytes = map.get_bin("x-scope-bin")?.to_bytes().ok()?;
    let canonical = tonic::metadata::BinaryMetadataValue::from_bytes(&bytes);
    String::from_utf8(canonical.as_encoded_bytes().to_vec()).ok()
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

fn scope_metadata_invalid(name: &str) -> (ProblemKind, Status) {
    let what = match name.ends_with("-bin") {
        true => "is not base64, or is over 1024 bytes once encoded",
        false => {
            "is not printable ASCII (send other bytes in a `-bin` entry), is over 1024 bytes, \
             or holds a NUL byte"
        }
    };
    (
        ProblemKind::ScopeInvalid,
        Status::invalid_argument(format!(
            "the `{name}` metadata entry naming the user or tenant {what}, so this call's \
             idempotency-key cannot be checked; retrying it unchanged will not help"
        )),
    )
}

fn scope_metadata_missing(name: &str) -> Status {
    Status::invalid_argument(format!(
        "send exactly one `{name}` metadata entry naming the user or tenant: idempotency keys \
         are kept per user"
    ))
}

/// What the services of one layer share: the contract (engine and shared settings) and the
/// gRPC settings.
pub(crate) struct Settings {
    pub(crate) contract: Contract,
    pub(crate) methods: BTreeSet<String>,
    pub(crate) scope: Scope,
    pub(crate) store_when: StorePredicate,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug(
            f,
            self.contract.engine(),
            self.contract.config(),
            &self.methods,
            &self.scope,
        )
    }
}

fn debug(
    f: &mut fmt::Formatter<'_>,
    engine: &Engine,
    config: &Config,
    methods: &BTreeSet<String>,
    scope: &Scope,
) -> fmt::Result {
    f.debug_struct("IdempotencyLayer")
        .field("engine", engine)
        .field("methods", methods)
        .field("key_policy", &config.key_policy)
        .field("require_key", &config.require_key)
        .field("scope", scope)
        .field("max_message_bytes", &config.max_request_bytes)
        .field("max_response_bytes", &config.max_response_bytes)
        .field("lock_timeout", &config.lock_timeout)
        .field("retention", &config.retention)
        .finish_non_exhaustive()
}

/// The tower layer for `tonic::transport::Server::builder().layer(..)`. Cheap to clone.
///
/// Build it with [`IdempotencyLayer::new`] and the chained setters; name each covered unary
/// method with [`IdempotencyLayer::method`]. See the [module docs](super) for the behaviour.
#[derive(Clone)]
pub struct IdempotencyLayer {
    engine: Engine,
    timings: Arc<Timings>,
    /// The settings shared with the HTTP shims; its HTTP-only ones (methods, scope header,
    /// JSON canonicalisation, status predicate) are not used.
    config: Config,
    methods: BTreeSet<String>,
    scope: Scope,
    store_when: StorePredicate,
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug(f, &self.engine, &self.config, &self.methods, &self.scope)
    }
}

impl IdempotencyLayer {
    /// A layer over an engine (or a store) covering no method yet, with the defaults of the
    /// HTTP shims where they apply: UUID keys
    /// ([`KeyPolicy::Uuid`](crate::contract::KeyPolicy::Uuid)), optional; one shared
    /// scope; and gRPC's own: 4 MiB message and response limits, [`default_store_policy`]; the
    /// engine's lock timeout and retention.
    pub fn new(engine: impl Into<Engine>) -> Self {
        IdempotencyLayer {
            engine: engine.into(),
            timings: Arc::default(),
            config: Config::default()
                .max_request_bytes(4 * 1024 * 1024)
                .max_response_bytes(4 * 1024 * 1024),
            methods: BTreeSet::new(),
            scope: Scope::Global,
            store_when: Arc::new(default_store_policy),
        }
    }

    config_setters!(
        forward: key_policy,
        require_key,
        max_response_bytes,
        lock_timeout,
        retention,
        retry_after_max,
    );

    /// Covers the unary method with this full path, `/package.Service/Method` (as in the
    /// generated server's routes, e.g. `/orders.Orders/CreateOrder`).
    ///
    /// Name only unary methods: the layer buffers a covered call's whole request and response,
    /// which would break a streaming method.
    pub fn method(mut self, path: impl Into<String>) -> Self {
        self.methods.insert(path.into());
        self
    }

    /// Covers each of these unary methods (see [`IdempotencyLayer::method`]).
    pub fn methods<I, P>(mut self, paths: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        self.methods.extend(paths.into_iter().map(Into::into));
        self
    }

    /// Takes the scope from this metadata entry (such as `x-tenant-id`). A covered call without
    /// exactly one such entry, or with one that cannot be a scope (not printable ASCII, over
    /// 1024 bytes), gets `INVALID_ARGUMENT`. Spaces and tabs around the value are not part of
    /// it. A binary entry (a name ending in `-bin`) is read as the bytes it encodes, so that
    /// padded and unpadded base64 of the same bytes are one scope. Without a scope entry or
    /// function, all calls share one scope.
    ///
    /// A scope taken from client metadata is only as trustworthy as the client: behind real
    /// authentication, use [`IdempotencyLayer::scope_fn`] on what the authentication layer put
    /// into the request extensions.
    pub fn scope_metadata(mut self, name: impl Into<String>) -> Self {
        self.scope = Scope::Metadata(name.into().to_ascii_lowercase());
        self
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
        mut self,
        scope_of: impl Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.scope = Scope::Function(Arc::new(scope_of));
        self
    }

    /// The largest request body (the gRPC-framed message) accepted on a covered call; a larger
    /// one gets `RESOURCE_EXHAUSTED` and the handler does not run. Default 4 MiB, gRPC's default
    /// receive limit.
    pub fn max_message_bytes(mut self, limit: usize) -> Self {
        self.config = self.config.max_request_bytes(limit);
        self
    }

    /// Replaces the rule deciding, from the response's `grpc-status`, whether it is stored
    /// (default [`default_store_policy`]). A response that is not stored releases the key.
    pub fn store_when(mut self, predicate: impl Fn(Code) -> bool + Send + Sync + 'static) -> Self {
        self.store_when = Arc::new(predicate);
        self
    }

    /// Whether calls to this method path go through the idempotency check.
    pub fn covers(&self, path: &str) -> bool {
        self.methods.contains(path)
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let settings = Settings {
            contract: Contract::with_timings(
                self.engine.clone(),
                self.config.clone(),
                self.timings.clone(),
            ),
            methods: self.methods.clone(),
            scope: self.scope.clone(),
            store_when: self.store_when.clone(),
        };
        IdempotencyService::new(inner, Arc::new(settings))
    }
}
