#![doc = include_str!("../docs/crate.md")]
#![doc = include_str!("../docs/metrics.md")]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
mod cache;
mod clock;
mod config;
mod engine;
mod error;
mod fingerprint;
mod key;
mod metrics;
mod middleware;
#[cfg(feature = "postgres")]
mod postgres;
mod record;
mod response;
mod sqlite;
mod writer;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{Durability, EngineConfig};
pub use engine::{ClaimOutcome, ClaimRequest, Engine, Lease};
pub use error::{Error, Result};
pub use fingerprint::Fingerprint;
pub use key::{IdempotencyKey, MAX_KEY_LEN, MAX_SCOPE_LEN, validate_key, validate_scope};
#[cfg(feature = "postgres")]
pub use middleware::PostgresIdempotencyStore;
pub use middleware::{
    BoxError, IdempotencyMiddleware, IdempotencyMiddlewareBuilder, Operation, ProcessError,
    ProcessedResponse, SqliteIdempotencyStore, parse_url,
};
pub use response::{HeaderList, StoredResponse, decode_headers};

pub use contract::{ClaimedKey, KeyPolicy};

#[path = "../shims/contract/mod.rs"]
pub mod contract;

#[cfg(feature = "axum-integration")]
#[path = "../shims/axum/mod.rs"]
pub mod axum_integration;

#[cfg(feature = "actix-integration")]
#[path = "../shims/actix/mod.rs"]
pub mod actix_integration;

#[cfg(feature = "tonic-integration")]
#[path = "../shims/tonic/mod.rs"]
pub mod tonic_integration;

#[cfg(any(feature = "client", feature = "tonic-client"))]
#[path = "../shims/client/mod.rs"]
pub mod client;

#[cfg(test)]
mod bounds {
    use super::*;

    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}

    #[test]
    fn public_types_are_thread_safe() {
        send_sync::<Engine>();
        send_sync::<Lease>();
        send_sync::<Error>();
        send_sync::<StoredResponse>();
        send_sync::<ClaimedKey>();
        send_sync::<IdempotencyMiddleware>();
        send::<ClaimOutcome>();
    }

    #[test]
    fn claim_async_future_is_send() {
        fn is_send<F: std::future::Future + Send>(_: F) {}
        let engine = Engine::open(EngineConfig::in_memory()).unwrap();
        let key = IdempotencyKey::new("k").unwrap();
        is_send(engine.claim_async(ClaimRequest::new(
            "s",
            key,
            Fingerprint::of_request("POST", "/", b""),
        )));
    }
}

/// The README's Rust examples, compiled and run as doc tests.
#[cfg(all(doctest, feature = "axum-integration"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
