//! The chained setters of the shared settings, written once.
//!
//! [`config_setters!`] writes each setter of [`Config`](super::Config) from one definition:
//! its name, argument, documentation and effect. The same definition also writes, on a shim's
//! builder (the Axum layer, the Actix middleware, the Tonic layer), a setter of the same name,
//! signature and documentation that forwards to its `config: Config` field. A setting is added
//! or documented here, and every shim that lists it has it.

/// Writes chained setters from the definitions below.
///
/// - `config_setters!(config: all)` inside `impl Config`: the setters themselves.
/// - `config_setters!(forward: key_policy, require_key, ..)` inside the `impl` of a builder with
///   a `config: Config` field: setters that forward to `Config`'s. `all` stands for every
///   setting; `config` adds a setter that replaces the whole `Config`.
macro_rules! config_setters {
    ($mode:ident: $($name:ident),* $(,)?) => {
        $( $crate::contract::config_setters!(@def $mode $name); )*
    };

    // One setter of `Config`: `$c` is `&mut Config`.
    (@emit config
        $(#[$doc:meta])*
        fn $name:ident($arg:ident: $ty:ty) |$c:ident| $body:block
    ) => {
        $(#[$doc])*
        pub fn $name(mut self, $arg: $ty) -> Self {
            let $c = &mut self;
            $body
            self
        }
    };
    // The same setter on a builder with a `config: Config` field.
    (@emit forward
        $(#[$doc:meta])*
        fn $name:ident($arg:ident: $ty:ty) |$c:ident| $body:block
    ) => {
        $(#[$doc])*
        pub fn $name(mut self, $arg: $ty) -> Self {
            self.config = self.config.$name($arg);
            self
        }
    };

    // Every setting of `Config`, as the HTTP shims have them.
    (@def $mode:ident all) => {
        $crate::contract::config_setters!(
            $mode: key_policy,
            require_key,
            methods,
            paths,
            max_request_bytes,
            max_response_bytes,
            canonicalize_json,
            store_when,
            lock_timeout,
            retention,
            retry_after_max,
            scope_header,
        );
    };
    (@def forward config) => {
        /// Replaces all the shared settings at once (see [`Config`](crate::contract::Config)).
        pub fn config(mut self, config: $crate::contract::Config) -> Self {
            self.config = config;
            self
        }
    };
    (@def $mode:ident key_policy) => { $crate::contract::config_setters!(@emit $mode
        /// Which keys are accepted: [`KeyPolicy::Uuid`](crate::contract::KeyPolicy::Uuid) (the
        /// default) or [`KeyPolicy::Opaque`](crate::contract::KeyPolicy::Opaque) (1 to 255
        /// printable ASCII characters). Other keys are refused (HTTP 400 `key-invalid`, gRPC
        /// `INVALID_ARGUMENT`).
        fn key_policy(policy: $crate::contract::KeyPolicy) |c| { c.key_policy = policy; }
    ); };
    (@def $mode:ident require_key) => { $crate::contract::config_setters!(@emit $mode
        /// Whether a covered request without a key is refused (HTTP 400 `key-missing`, gRPC
        /// `INVALID_ARGUMENT`) instead of passed through without deduplication. Default
        /// `false`, which lets clients adopt keys one at a time.
        fn require_key(required: bool) |c| { c.require_key = required; }
    ); };
    (@def $mode:ident methods) => { $crate::contract::config_setters!(@emit $mode
        /// The covered HTTP methods (case-insensitive); other requests pass through untouched.
        /// Default POST and PATCH.
        fn methods(methods: impl IntoIterator<Item = impl AsRef<str>>) |c| {
            c.methods = methods
                .into_iter()
                .map(|m| m.as_ref().to_ascii_uppercase())
                .collect();
        }
    ); };
    (@def $mode:ident paths) => { $crate::contract::config_setters!(@emit $mode
        /// Covers only the requests whose path matches one of these patterns (and whose method
        /// is covered); every other request passes through untouched. Default: every path.
        ///
        /// A pattern is Axum's route syntax: `/orders`, `/orders/{id}/pay` (`{name}` is one
        /// segment), `/files/{*rest}` (the rest of the path); see
        /// [`PathPattern`](crate::contract::PathPattern). It is matched against the path the
        /// client sent, without its query string.
        ///
        /// # Panics
        /// On a malformed pattern (one that does not start with `/`, for example), when the
        /// layer is built: a configuration mistake, found at startup.
        fn paths(patterns: impl IntoIterator<Item = impl AsRef<str>>) |c| {
            c.paths = patterns
                .into_iter()
                .map(|p| match $crate::contract::PathPattern::parse(p.as_ref()) {
                    Ok(p) => p,
                    Err(e) => panic!("idempotency layer: {e}"),
                })
                .collect();
        }
    ); };
    (@def $mode:ident max_request_bytes) => { $crate::contract::config_setters!(@emit $mode
        /// The largest request body accepted on a covered request; a larger one gets 413
        /// `body-too-large` and the handler does not run. Default 1 MiB.
        fn max_request_bytes(limit: usize) |c| { c.max_request_bytes = limit; }
    ); };
    (@def $mode:ident max_response_bytes) => { $crate::contract::config_setters!(@emit $mode
        /// The largest response stored for replay. A larger one is still sent, and its record
        /// is completed with a marker instead (HTTP 410 `response-not-stored`, gRPC
        /// `ALREADY_EXISTS`), so a retry learns that the operation ran rather than running it
        /// again. Default 1 MiB on the HTTP shims, 4 MiB on the Tonic layer.
        fn max_response_bytes(limit: usize) |c| { c.max_response_bytes = limit; }
    ); };
    (@def $mode:ident canonicalize_json) => { $crate::contract::config_setters!(@emit $mode
        /// Fingerprint JSON bodies (by `Content-Type`: `application/json`, `application/*+json`)
        /// in canonical form ([`canonical_json`](crate::contract::canonical_json)), so key
        /// order and white space do not matter: `{"amount": 500}` and `{"amount":500}` are one
        /// request, as they are for
        /// [`IdempotencyMiddleware::process_request`](crate::IdempotencyMiddleware::process_request).
        /// Numbers are compared as written. Default `true`; `false` fingerprints the body bytes
        /// as received (a JSON body that does not parse is fingerprinted that way too).
        fn canonicalize_json(on: bool) |c| { c.canonicalize_json = on; }
    ); };
    (@def $mode:ident store_when) => { $crate::contract::config_setters!(@emit $mode
        /// Replaces the rule deciding from the status which responses are stored for replay
        /// (default [`default_store_policy`](crate::contract::default_store_policy), which does
        /// not store validation failures: 400, 422, and the other refusals of a request before
        /// it ran, so the client can fix the request and retry with the same key). A response
        /// that is not stored releases the key. To replay validation failures too, pass
        /// [`store_all_4xx`](crate::contract::store_all_4xx).
        fn store_when(predicate: impl Fn(u16) -> bool + Send + Sync + 'static) |c| {
            c.store_when = ::std::sync::Arc::new(predicate);
        }
    ); };
    (@def $mode:ident lock_timeout) => { $crate::contract::config_setters!(@emit $mode
        /// The lock timeout of the leases this layer takes (default: the engine's).
        fn lock_timeout(timeout: ::std::time::Duration) |c| { c.lock_timeout = Some(timeout); }
    ); };
    (@def $mode:ident retention) => { $crate::contract::config_setters!(@emit $mode
        /// How long the completed records of this layer are replayed (default: the engine's
        /// retention).
        fn retention(retention: ::std::time::Duration) |c| { c.retention = Some(retention); }
    ); };
    (@def $mode:ident retry_after_max) => { $crate::contract::config_setters!(@emit $mode
        /// The longest `Retry-After` hint a request found in flight gets (HTTP 409, gRPC
        /// `grpc-retry-pushback-ms`). Without it the hint is the longest of the route's last 16
        /// runs (one second before any run finished) minus the time the running request has
        /// had, and never past its lock timeout.
        fn retry_after_max(max: ::std::time::Duration) |c| { c.retry_after_max = Some(max); }
    ); };
    (@def $mode:ident scope_header) => { $crate::contract::config_setters!(@emit $mode
        /// Takes the scope from this request header (e.g. `X-User-ID`); a covered request
        /// without exactly one such header gets 400 `scope-missing`. Without a scope header or
        /// function, all requests share one scope.
        ///
        /// A scope taken from a client header is only as trustworthy as the client that sets
        /// it: behind real authentication, take it from what the authentication layer put
        /// into the request extensions (`scope_fn` on the shims).
        fn scope_header(name: impl Into<String>) |c| {
            c.scope_header = Some(name.into().to_ascii_lowercase());
        }
    ); };
}

pub(crate) use config_setters;
