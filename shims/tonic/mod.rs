//! Tonic / gRPC integration: a tower layer that makes unary gRPC methods safe to retry.
//!
//! Enable the `tonic-integration` feature. [`IdempotencyLayer`] goes on the server with
//! `tonic::transport::Server::builder().layer(...)`: it sees every call's request message and
//! response, which a tonic interceptor cannot. Only the unary methods you name by full path
//! (`/package.Service/Method`) are covered; every other call, streaming ones included, passes
//! through untouched.
//!
//! ```no_run
//! use idempotency_rs::tonic_integration::IdempotencyLayer;
//! use idempotency_rs::{Engine, EngineConfig};
//! use tonic::service::Routes;
//! use tonic::transport::Server;
//!
//! # async fn example(routes: Routes) -> Result<(), Box<dyn std::error::Error>> {
//! let engine = Engine::open(EngineConfig::new("idempotency.db"))?;
//! let layer = IdempotencyLayer::new(engine)
//!     .method("/orders.Orders/CreateOrder")
//!     .require_key(true)
//!     .scope_metadata("x-tenant-id");
//! Server::builder()
//!     .layer(layer)
//!     .add_routes(routes) // or .add_service(OrdersServer::new(MyOrders))
//!     .serve("127.0.0.1:50051".parse()?)
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! `examples/tonic_server.rs` is a complete server; `tests/tonic.rs` drives a real server with a
//! tonic client through every case below.
//!
//! # How a covered call is handled
//!
//! 1. The key is the `idempotency-key` metadata entry, new for each logical call and the same
//!    on its retries: a UUID by default, or any 1 to 255 printable ASCII characters under
//!    [`KeyPolicy::Opaque`]. The rules are the HTTP shims' ([`crate::contract::parse_key_value`]).
//! 2. The scope (the tenant or user the key belongs to) is one shared scope by default, or a
//!    metadata entry ([`IdempotencyLayer::scope_metadata`]), or any function of the request
//!    head ([`IdempotencyLayer::scope_fn`]), such as the identity an authentication layer placed
//!    *before* this one put into the request extensions.
//! 3. The request message is buffered, up to [`IdempotencyLayer::max_message_bytes`]. The
//!    fingerprint covers the method path and the message bytes as received (the gRPC
//!    length-prefixed frames).
//! 4. The key is claimed. On a first call the handler runs; its response (headers, message
//!    bytes and trailers) is buffered and, if its `grpc-status` is one to keep, stored
//!    **before** it is sent. Otherwise the key is released, so a retry runs the method again.
//!
//! | situation | gRPC status |
//! |---|---|
//! | no `idempotency-key`, key required ([`IdempotencyLayer::require_key`]) | `INVALID_ARGUMENT` |
//! | no `idempotency-key`, key optional (the default) | the call passes through untouched |
//! | key malformed (not a UUID under the default policy; empty, over 255 bytes or not printable ASCII), or sent twice | `INVALID_ARGUMENT` |
//! | no scope: the scope metadata entry missing or repeated | `INVALID_ARGUMENT` |
//! | no scope: the scope function answers `None` or a blank scope | `UNAUTHENTICATED` |
//! | the scope function answers a scope over 1024 bytes or with a NUL byte | `INVALID_ARGUMENT` |
//! | request message over the limit (default 4 MiB) | `RESOURCE_EXHAUSTED`, with `grpc-retry-pushback-ms: -1` (gRPC's "do not retry") |
//! | key already used with a different method or message | `FAILED_PRECONDITION` |
//! | first call with this key still running | `ABORTED`, with `grpc-retry-pushback-ms` metadata: what the method's last runs took, less the time the running call has had (100 ms at least unless the lock times out sooner, never past it) |
//! | first call completed | its stored response, replayed, with `idempotent-replayed: true` |
//! | store closed, overloaded or failing | `UNAVAILABLE` (with `grpc-retry-pushback-ms`); the handler does not run |
//!
//! Each status message tells the client what to do next. The pushback metadata is the one the
//! gRPC retry policy honours (`grpc-retry-pushback-ms`, a delay in milliseconds).
//!
//! # Faithful replay
//!
//! gRPC carries the outcome of a call in trailers: `grpc-status`, `grpc-message` and any
//! trailing metadata come after the message, or, for an error without a message, in the headers
//! of a *trailers-only* response. A replay that drops the trailers breaks clients ("missing
//! grpc-status trailer"). The layer stores the response headers, the data frames' bytes and the
//! trailers (`None` for a trailers-only response, which is replayed as one again), and replays
//! all of them, adding `idempotent-replayed: true` to the headers. `date` and `content-length`
//! are not stored.
//!
//! # What is stored
//!
//! [`default_store_policy`]: `OK` and the errors that are a result of the call (`NOT_FOUND`,
//! `ALREADY_EXISTS`, `PERMISSION_DENIED`, `FAILED_PRECONDITION`, `OUT_OF_RANGE`) are stored and
//! replayed. Every other code (`INVALID_ARGUMENT` and `UNIMPLEMENTED`, which say the call never
//! started, so a client can fix the request and retry with the same key; `UNAVAILABLE`,
//! `INTERNAL`, `UNKNOWN`, `DEADLINE_EXCEEDED`, `ABORTED`, `RESOURCE_EXHAUSTED`, `CANCELLED`, ...),
//! an error from the inner service, a response without a `grpc-status`, a handler panic and a
//! call cancelled by the client release the key. [`IdempotencyLayer::store_when`] replaces the
//! rule; [`store_all_deterministic`] also stores `INVALID_ARGUMENT` and `UNIMPLEMENTED`.
//!
//! # The key in the handler
//!
//! Before the handler runs, the layer inserts a [`ClaimedKey`] (the key as stored, its scope,
//! the lease's fencing token) and the [`IdempotencyKey`](crate::IdempotencyKey) into the request
//! extensions: `request.extensions().get::<ClaimedKey>()` in the service method.
//!
//! A response to store that is larger than [`IdempotencyLayer::max_response_bytes`] is sent to
//! the client in full, and the record is completed with an `ALREADY_EXISTS` marker instead: a
//! retry learns that the call ran rather than running it again.
//!
//! If the completion cannot be stored (disk full, store closed), the client still gets the real
//! response, with `idempotency-stored: false` metadata: the method has run, and answering an
//! error would invite a retry that runs it twice once the lock timeout passes. Until then the key
//! stays locked, so an immediate retry gets `ABORTED`, never a second run.
//!
//! # Placement
//!
//! Layers added with `Server::builder().layer(..)` wrap each other in the order they are added,
//! the first outermost. Put an authentication layer (for example a tonic `InterceptorLayer`)
//! that inserts the caller's identity into the request extensions *before* this layer, and take
//! the scope from that extension with [`IdempotencyLayer::scope_fn`]. Interceptors attached to a single
//! service with `with_interceptor` run after this layer and are invisible to it.

mod layer;
mod service;

pub use crate::contract::{ClaimedKey, KeyPolicy};
pub use layer::{IdempotencyLayer, default_store_policy, store_all_deterministic};
pub use service::IdempotencyService;

/// The request metadata entry that carries the idempotency key.
pub const KEY_METADATA: &str = "idempotency-key";
/// The response metadata entry that marks a replay (`true`).
pub const REPLAYED_METADATA: &str = "idempotent-replayed";
/// The response metadata entry set to `false` when a completed response could not be stored.
pub const STORED_METADATA: &str = "idempotency-stored";
/// The response metadata entry with the delay, in milliseconds, before a retry is worth trying
/// (on `ABORTED` and `UNAVAILABLE` answers of the layer). The gRPC retry policy honours it.
pub const RETRY_PUSHBACK_METADATA: &str = "grpc-retry-pushback-ms";
