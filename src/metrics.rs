//! The engine's meters, through the `metrics` facade (feature `metrics`); without the feature,
//! every call here is empty and compiles away. The table of names is in `docs/metrics.md`
//! (the crate docs, *Metrics*).
//!
//! Handles are registered once, when the engine opens, with the recorder installed then: on
//! the hot path a meter is an atomic add on a handle, never a lookup by name.

use std::time::Duration;

#[cfg(feature = "metrics")]
use std::time::Instant;

use crate::error::Error;

/// How a claim ended, for `idempotency_claims_total{outcome}`.
#[derive(Clone, Copy)]
pub(crate) enum Outcome {
    Claimed,
    Replayed,
    InFlight,
    Mismatch,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Claimed => "claimed",
            Outcome::Replayed => "replayed",
            Outcome::InFlight => "in_flight",
            Outcome::Mismatch => "mismatch",
        }
    }
}

/// Where a replay came from, for `idempotency_replays_total{source}`.
#[derive(Clone, Copy)]
pub(crate) enum Source {
    Cache,
    ReadConnection,
    Writer,
}

/// One claim in this many of those answered without the writer (from the replay cache or a
/// read connection, in a microsecond or two) is timed: timing each would cost more than the
/// answer itself measurably does (a clock read, and a sample the recorder keeps until it
/// aggregates it). Claims the writer answers are all timed.
#[cfg(feature = "metrics")]
const SAMPLE_READS: u32 = 16;

/// The time a claim took: every claim the writer answered (from when it was queued, or from
/// its start when it was sampled), one in [`SAMPLE_READS`] of the others.
pub(crate) struct ClaimTimer {
    #[cfg(feature = "metrics")]
    started: Option<Instant>,
    #[cfg(feature = "metrics")]
    writer: bool,
}

impl ClaimTimer {
    /// At the start of a claim: timed from here if sampled.
    #[inline]
    pub(crate) fn new() -> ClaimTimer {
        #[cfg(feature = "metrics")]
        {
            thread_local!(static N: std::cell::Cell<u32> = const { std::cell::Cell::new(0) });
            let n = N.with(|n| {
                let v = n.get().wrapping_add(1);
                n.set(v);
                v
            });
            ClaimTimer {
                started: n.is_multiple_of(SAMPLE_READS).then(Instant::now),
                writer: false,
            }
        }
        #[cfg(not(feature = "metrics"))]
        ClaimTimer {}
    }

    /// The claim goes to the writer (`writer`), or on PostgreSQL waits for a read connection:
    /// timed from here on if it was not already.
    #[inline]
    pub(crate) fn waits(&mut self, writer: bool) {
        #[cfg(feature = "metrics")]
        {
            self.writer |= writer;
            if self.started.is_none() {
                self.started = Some(Instant::now());
            }
        }
        #[cfg(not(feature = "metrics"))]
        let _ = writer;
    }
}

/// A started measurement (nothing without the feature).
#[derive(Clone, Copy)]
pub(crate) struct Timer(#[cfg(feature = "metrics")] Instant);

impl Timer {
    #[inline]
    pub(crate) fn start() -> Timer {
        Timer(
            #[cfg(feature = "metrics")]
            Instant::now(),
        )
    }
}

/// How often the claim and replay counts gathered per thread are added to the recorder's
/// counters (by the writer thread, which wakes for it): a scrape sees them at most this late.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_secs(1);

#[cfg(feature = "metrics")]
mod on {
    use super::*;
    use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    /// The counts every claim adds to: claims by outcome (4), then replays by source (3).
    const COUNTS: usize = 7;
    /// Threads share [`SHARDS`] sets of counts, handed out in turn.
    const SHARDS: usize = 8;

    /// One thread's counts, on cache lines of their own. A claim answered from the replay
    /// cache takes a microsecond or so; two tokio workers adding to one shared counter (the
    /// recorder's, and its generation beside it) on every claim pass its cache line back and
    /// forth, which measured 10-30% of the replay throughput at 8 and 64 callers.
    #[repr(align(128))]
    #[derive(Default)]
    struct Shard([AtomicU64; COUNTS]);

    fn my_shard() -> usize {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local!(static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
        MINE.with(|s| *s)
    }

    /// Every handle of one engine.
    pub(crate) struct Meters {
        backend: &'static str,
        /// Claims and replays counted per thread, added to `claims` and `replays` by
        /// [`Meters::flush`].
        local: Box<[Shard; SHARDS]>,
        claims: [Counter; 4],
        replays: [Counter; 3],
        /// Answered without the writer (sampled), and by the writer.
        claim_seconds: [Histogram; 2],
        complete_seconds: Histogram,
        batch_size: Histogram,
        batch_seconds: Histogram,
        flush_seconds: Histogram,
        queue_depth: Gauge,
        leases: Gauge,
        cleanup_deleted: Counter,
    }

    impl Meters {
        pub(crate) fn new(backend: &'static str) -> Meters {
            let b = ("backend", backend);
            let claims = ["claimed", "replayed", "in_flight", "mismatch"]
                .map(|o| counter!("idempotency_claims_total", &[b, ("outcome", o)]));
            let replays = ["cache", "read_connection", "writer"]
                .map(|s| counter!("idempotency_replays_total", &[b, ("source", s)]));
            Meters {
                backend,
                local: Box::default(),
                claims,
                replays,
                claim_seconds: ["read", "writer"]
                    .map(|p| histogram!("idempotency_claim_duration_seconds", &[b, ("path", p)])),
                complete_seconds: histogram!("idempotency_complete_duration_seconds", &[b]),
                batch_size: histogram!("idempotency_batch_size", &[b]),
                batch_seconds: histogram!("idempotency_batch_duration_seconds", &[b]),
                flush_seconds: histogram!("idempotency_flush_duration_seconds", &[b]),
                queue_depth: gauge!("idempotency_queue_depth", &[b]),
                leases: gauge!("idempotency_leases", &[b]),
                cleanup_deleted: counter!("idempotency_cleanup_deleted_total", &[b]),
            }
        }

        #[inline]
        pub(crate) fn claim(&self, timer: ClaimTimer, outcome: Outcome) {
            self.count(outcome as usize);
            if let Some(started) = timer.started {
                self.claim_seconds[usize::from(timer.writer)].record(started.elapsed());
            }
        }

        #[inline]
        pub(crate) fn replay(&self, source: Source) {
            self.count(4 + source as usize);
        }

        #[inline]
        fn count(&self, i: usize) {
            self.local[my_shard()].0[i].fetch_add(1, Ordering::Relaxed);
        }

        /// Adds the counts gathered per thread to the recorder's counters (the writer thread,
        /// every [`FLUSH_EVERY`], and when it stops).
        pub(crate) fn flush(&self) {
            let mut sums = [0u64; COUNTS];
            for shard in self.local.iter() {
                for (sum, n) in sums.iter_mut().zip(&shard.0) {
                    if n.load(Ordering::Relaxed) != 0 {
                        *sum += n.swap(0, Ordering::Relaxed);
                    }
                }
            }
            for (counter, n) in self.claims.iter().chain(&self.replays).zip(sums) {
                if n != 0 {
                    counter.increment(n);
                }
            }
        }

        #[inline]
        pub(crate) fn completed(&self, started: Timer) {
            self.complete_seconds.record(started.0.elapsed());
        }

        /// A failed call of the engine (`op`: claim, complete, release, extend) or of its
        /// threads (flush, cleanup).
        pub(crate) fn error(&self, op: &'static str, e: &Error) {
            counter!(
                "idempotency_errors_total",
                &[("backend", self.backend), ("op", op), ("kind", e.kind())]
            )
            .increment(1);
        }

        #[inline]
        pub(crate) fn batch(
            &self,
            commands: usize,
            started: Timer,
            queued: impl FnOnce() -> usize,
        ) {
            self.batch_size.record(commands as f64);
            self.batch_seconds.record(started.0.elapsed());
            self.queue_depth.set(queued() as f64);
        }

        #[inline]
        pub(crate) fn flushed(&self, started: Timer) {
            self.flush_seconds.record(started.0.elapsed());
        }

        #[inline]
        pub(crate) fn lease_granted(&self) {
            self.leases.increment(1.0);
        }

        #[inline]
        pub(crate) fn lease_ended(&self) {
            self.leases.decrement(1.0);
        }

        pub(crate) fn cleaned(&self, deleted: usize) {
            self.cleanup_deleted.increment(deleted as u64);
        }

        /// An answer the HTTP or gRPC layer gave on its own (`kind`: the problem's slug).
        pub(crate) fn rejected(&self, kind: &'static str) {
            counter!(
                "idempotency_rejections_total",
                &[("backend", self.backend), ("kind", kind)]
            )
            .increment(1);
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod on {
    use super::*;

    /// No meters without the `metrics` feature.
    pub(crate) struct Meters;

    #[allow(clippy::unused_self)]
    impl Meters {
        pub(crate) fn new(_backend: &'static str) -> Meters {
            Meters
        }
        #[inline]
        pub(crate) fn claim(&self, _timer: ClaimTimer, _outcome: Outcome) {}
        #[inline]
        pub(crate) fn replay(&self, _source: Source) {}
        #[inline]
        pub(crate) fn completed(&self, _started: Timer) {}
        #[inline]
        pub(crate) fn error(&self, _op: &'static str, _e: &Error) {}
        #[inline]
        pub(crate) fn batch(
            &self,
            _commands: usize,
            _started: Timer,
            _queued: impl FnOnce() -> usize,
        ) {
        }
        #[inline]
        pub(crate) fn flushed(&self, _started: Timer) {}
        #[inline]
        pub(crate) fn lease_granted(&self) {}
        #[inline]
        pub(crate) fn lease_ended(&self) {}
        #[inline]
        pub(crate) fn cleaned(&self, _deleted: usize) {}
        #[inline]
        pub(crate) fn rejected(&self, _kind: &'static str) {}
        #[inline]
        pub(crate) fn flush(&self) {}
    }
}

pub(crate) use on::Meters;

impl std::fmt::Debug for Meters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Meters")
    }
}
