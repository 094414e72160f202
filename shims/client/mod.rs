//! The client half: callers that mint one key per operation and retry it safely.
//!
//! A server that deduplicates is half of the pattern. The other half is the caller: it must
//! send one `Idempotency-Key` per *logical operation*, keep it across every retry of that
//! operation, back off with jitter, wait at least as long as the server asks, retry what is
//! safe to retry and stop on what is not. This module ships that half for both transports the
//! crate serves:
//!
//! - [`RetryMiddleware`] (feature `client`): a
//!   [`reqwest-middleware`](https://docs.rs/reqwest-middleware) middleware for reqwest;
//! - [`grpc::RetryLayer`] (feature `tonic-client`): a tower layer for tonic channels.
//!
//! Both follow one [`RetryPolicy`]: at most [`RetryPolicy::max_attempts`] attempts within
//! [`RetryPolicy::max_elapsed`], the delay before retry *n* drawn uniformly from
//! `0 ..= min(max_backoff, initial_backoff × 2^(n-1))` ("full jitter"), and never shorter than
//! what the server asked for (`Retry-After`, `grpc-retry-pushback-ms`). A delay that would end
//! past the time budget is not waited for: the call fails at once with its key.
//!
//! # HTTP
//!
//! ```no_run
//! # #[cfg(feature = "client")]
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use idempotency_rs::client::{ClientError, ResponseExt, RetryMiddleware};
//!
//! let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
//!     .with(RetryMiddleware::new())
//!     .build();
//! let response = client
//!     .post("http://127.0.0.1:3000/orders")
//!     .header("x-user-id", "alice")
//!     .header("content-type", "application/json")
//!     .body(r#"{"symbol":"AAPL","quantity":10,"price":150.5}"#)
//!     .send()
//!     .await;
//! match response {
//!     Ok(response) => {
//!         let delivery = response.delivery().expect("a covered method");
//!         println!("{} after {} attempt(s), replayed: {}",
//!             delivery.key, delivery.attempts, delivery.replayed);
//!     }
//!     // Out of attempts: store the key, and retry the same operation later with it.
//!     Err(e) => match ClientError::of(&e) {
//!         Some(error) => eprintln!("{error}; retry later with key {:?}", error.key()),
//!         None => eprintln!("{e}"),
//!     },
//! }
//! # Ok(())
//! # }
//! ```
//!
//! | the attempt ends with | the middleware |
//! |---|---|
//! | 2xx, 3xx, or an error status that is not problem+json | returns the response, buffered ([`RetryMiddleware::max_response_bytes`]), with a [`Delivery`] in its extensions |
//! | a connect error, a timeout, a connection dropped before or while the answer came | retries |
//! | 409 `request-in-flight` (or a 409 with `Retry-After`), 408, 425, 429, 502, 503, 504, and 500 if [`RetryMiddleware::retry_server_errors`], unless the answer is a replay (`Idempotent-Replayed: true`: a stored result does not change) | retries, waiting at least the `Retry-After` (seconds or an HTTP date) |
//! | any other error status with an `application/problem+json` body (400, 401, 403, 404, 410, 413, 422, ...) | fails with [`ClientError::Rejected`], the problem parsed |
//! | the attempts or the time run out | fails with [`ClientError::Exhausted`], which carries the key |
//! | sent, then failed in a way a retry cannot mend (a redirect loop after the POST ran) | fails with [`ClientError::Failed`], which carries the key |
//! | a streaming body, which cannot be sent twice | fails with [`ClientError::BodyNotReplayable`] before anything is sent |
//!
//! Only the covered methods (POST and PATCH unless [`RetryMiddleware::methods`] says
//! otherwise) get a key and retries; every other request passes through untouched. A key the
//! caller set (`.header("idempotency-key", ..)`) wins over a generated one: tie it to your own
//! record of the operation, and a retry after *your* crash is deduplicated too.
//!
//! # gRPC
//!
//! [`grpc::RetryLayer`] wraps a tonic `Channel`: the covered methods get `idempotency-key`
//! metadata and are retried on `UNAVAILABLE`, `ABORTED` (the layer's in-flight answer, honouring
//! `grpc-retry-pushback-ms`), `RESOURCE_EXHAUSTED`, transport errors and an answer cut short
//! before its `grpc-status`; never on `INVALID_ARGUMENT`, `FAILED_PRECONDITION` or any other
//! status. A call's `grpc-timeout` (its deadline) bounds every retry, and a call that reaches it
//! ends with `DEADLINE_EXCEEDED`.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[cfg(feature = "tonic-client")]
pub mod grpc;
#[cfg(feature = "client")]
mod http;

#[cfg(feature = "client")]
pub use http::{ClientError, Delivery, LastFailure, ProblemDetails, ResponseExt, RetryMiddleware};

/// The header (and gRPC metadata entry) that carries the key.
pub const KEY_HEADER: &str = crate::contract::KEY_HEADER;

/// How many times, and how far apart, an operation is tried.
///
/// Defaults: 8 attempts within 30 s, backoff from 100 ms doubling up to 5 s, with full jitter.
/// The defaults ride out a server restart of a few seconds and a lossy network; a caller that
/// must not wait (a user at a screen) lowers them, and keeps the key of a call that ran out to
/// try again later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    max_elapsed: Duration,
    initial_backoff: Duration,
    max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            max_elapsed: Duration::from_secs(30),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// The default policy.
    pub fn new() -> Self {
        Self::default()
    }

    /// A policy that sends each request once and never retries (the key is still sent).
    pub fn no_retries() -> Self {
        Self::default().max_attempts(1)
    }

    /// The most attempts, the first included (at least 1). Default 8.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The longest time from the first attempt to the start of the last one. A retry whose
    /// delay would end past it is not made. Default 30 s.
    pub fn max_elapsed(mut self, elapsed: Duration) -> Self {
        self.max_elapsed = elapsed;
        self
    }

    /// The backoff: the delay before retry *n* is drawn uniformly from
    /// `0 ..= min(max, initial × 2^(n-1))`. Default 100 ms and 5 s.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// The configured number of attempts.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The configured time budget.
    pub fn elapsed_budget(&self) -> Duration {
        self.max_elapsed
    }

    /// The upper bound of the jittered delay before retry `retry` (1 for the first retry).
    pub fn backoff_ceiling(&self, retry: u32) -> Duration {
        let shift = retry.saturating_sub(1).min(31);
        self.initial_backoff
            .checked_mul(1u32 << shift)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }

    /// The delay before the next attempt after `attempts` attempts made since `started`, at
    /// least `floor` (the server's `Retry-After`), or why there is none: the attempts are used
    /// up, or the delay would end past the time budget, or past `deadline` (the call's own).
    pub(crate) fn next_delay(
        &self,
        attempts: u32,
        floor: Option<Duration>,
        started: Instant,
        deadline: Option<Instant>,
    ) -> Result<Duration, Stop> {
        if attempts >= self.max_attempts {
            return Err(Stop::Attempts);
        }
        let delay = jitter(self.backoff_ceiling(attempts)).max(floor.unwrap_or_default());
        let Some(resume) = Instant::now().checked_add(delay) else {
            return Err(Stop::Budget);
        };
        if deadline.is_some_and(|d| resume >= d) {
            return Err(Stop::Deadline);
        }
        if started
            .checked_add(self.max_elapsed)
            .is_some_and(|end| resume > end)
        {
            return Err(Stop::Budget);
        }
        Ok(delay)
    }
}

/// Why a call is not tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// [`RetryPolicy::max_attempts`] were made.
    Attempts,
    /// The wait would end past [`RetryPolicy::max_elapsed`] (or past any instant).
    Budget,
    /// The wait would end past the call's own deadline.
    Deadline,
}

/// A duration drawn uniformly from `0 ..= ceiling`.
fn jitter(ceiling: Duration) -> Duration {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    if nanos == 0 {
        return Duration::ZERO;
    }
    // SipHash with a per-process random key over a counter: uniform enough for spreading
    // retries, and no dependency on a random number crate.
    let draw = RandomState::new().hash_one(SEQ.fetch_add(1, Ordering::Relaxed));
    Duration::from_nanos(draw % nanos.saturating_add(1))
}

/// Makes the key of each new operation.
pub type KeyGenerator = Arc<dyn Fn() -> String + Send + Sync>;

/// The answer is a stored one (`idempotent-replayed: true`, the header and the gRPC metadata
/// entry alike): a result that retrying cannot change.
pub(crate) fn is_replay(headers: &::http::HeaderMap) -> bool {
    headers
        .get(crate::contract::REPLAYED_HEADER)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
}

/// The default key: a random (v4) UUID, lower case.
pub(crate) fn uuid_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy::new().backoff(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(p.backoff_ceiling(1), Duration::from_millis(100));
        assert_eq!(p.backoff_ceiling(2), Duration::from_millis(200));
        assert_eq!(p.backoff_ceiling(4), Duration::from_millis(800));
        assert_eq!(p.backoff_ceiling(5), Duration::from_secs(1));
        assert_eq!(p.backoff_ceiling(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_under_the_ceiling_and_spreads() {
        let ceiling = Duration::from_millis(100);
        let draws: Vec<_> = (0..1000).map(|_| jitter(ceiling)).collect();
        assert!(draws.iter().all(|d| *d <= ceiling));
        let low = draws.iter().filter(|d| **d < ceiling / 2).count();
        assert!((350..650).contains(&low), "{low} of 1000 under half");
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn the_floor_wins_and_the_budget_stops() {
        let p = RetryPolicy::new()
            .max_attempts(3)
            .max_elapsed(Duration::from_secs(5));
        let now = Instant::now();
        let d = p
            .next_delay(1, Some(Duration::from_secs(2)), now, None)
            .unwrap();
        assert!(d >= Duration::from_secs(2));
        assert_eq!(p.next_delay(3, None, now, None), Err(Stop::Attempts));
        // A floor past the budget, or past counting: no retry.
        let six = Some(Duration::from_secs(6));
        assert_eq!(p.next_delay(1, six, now, None), Err(Stop::Budget));
        assert_eq!(
            p.next_delay(1, Some(Duration::MAX), now, None),
            Err(Stop::Budget)
        );
        // A floor past the call's deadline: no retry.
        let deadline = Some(now + Duration::from_secs(1));
        let two = Some(Duration::from_secs(2));
        assert_eq!(p.next_delay(1, two, now, deadline), Err(Stop::Deadline));
        assert_eq!(RetryPolicy::new().max_attempts(0).attempts(), 1);
    }
}
