//! Engine-level helpers shared by the engine test files (`mod support;`). The HTTP contract
//! suite has its own, in `tests/common`.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::time::{Duration, Instant};

use idempotency_rs::{
    ClaimOutcome, ClaimRequest, Fingerprint, IdempotencyKey, Lease, StoredResponse,
};

/// A claim of `key` in the scope `s`, for `POST /` with the key as its body.
pub fn request(key: &str) -> ClaimRequest {
    ClaimRequest::new(
        "s",
        IdempotencyKey::new(key).unwrap(),
        Fingerprint::of_request("POST", "/", key.as_bytes()),
    )
}

pub fn claimed(outcome: ClaimOutcome) -> Lease {
    match outcome {
        ClaimOutcome::Claimed(lease) => lease,
        other => panic!("expected Claimed, got {other:?}"),
    }
}

pub fn replayed(outcome: ClaimOutcome) -> StoredResponse {
    match outcome {
        ClaimOutcome::Replay(r) => r,
        other => panic!("expected Replay, got {other:?}"),
    }
}

/// The state of the record of `key` as another (read-only) connection sees it: `None` without
/// a row, `Some(0)` in flight, `Some(1)` completed.
pub fn record_state(db: &Path, key: &str) -> Option<i64> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row(
        "SELECT state FROM idempotency_records WHERE key = ?1",
        [key],
        |r| r.get(0),
    )
    .ok()
}

/// Waits (30 s at most) until another connection sees the record of `key` completed: its
/// completion is committed, flushed or not.
pub fn wait_until_committed(db: &Path, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while record_state(db, key) != Some(1) {
        assert!(
            Instant::now() < deadline,
            "the completion was never committed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A seeded splitmix64 stream, for kill points and other random choices of the crash tests.
/// The seed comes from the environment variable `var` when set (to replay a failed run), from
/// the clock otherwise; it is printed either way.
pub struct Rng(u64);

impl Rng {
    pub fn from_env(var: &str) -> Rng {
        let seed = std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{var}={seed}");
        Rng(seed)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (x ^ (x >> 31)) % n
    }
}
