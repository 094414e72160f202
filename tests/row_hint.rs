//! The SQLite writer finds a completion's record by the rowid its claim reported, not by the
//! id index (issue #18). These are the paths where that rowid could be wrong if it were taken
//! carelessly: a claim that reuses the rowid of a row just deleted, a takeover and the
//! replacement of an expired record (both update the row in place, so SQLite's
//! `last_insert_rowid` does not move), and a completion of a lease that lost its record.

mod support;

use std::sync::Arc;
use std::time::Duration;

use idempotency_rs::{Engine, EngineConfig, Error, ManualClock, StoredResponse};
use support::{claimed, request};

/// The body of the response a claim replays.
fn replayed(outcome: idempotency_rs::ClaimOutcome) -> Vec<u8> {
    support::replayed(outcome).body
}

fn body(s: &str) -> StoredResponse {
    StoredResponse::new(201, s.as_bytes().to_vec())
}

fn engine(clock: &Arc<ManualClock>, dir: &tempfile::TempDir) -> Engine {
    Engine::open(
        EngineConfig::new(dir.path().join("db"))
            .clock(clock.clone())
            .lock_timeout(Duration::from_secs(10))
            .retention(Duration::from_secs(60)),
    )
    .unwrap()
}

/// The last row is deleted (a release), so the next insert gets the same rowid and
/// `last_insert_rowid` does not change: the claim must still report where its record is.
#[test]
fn a_claim_that_reuses_a_released_rowid_completes_its_own_record() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let engine = engine(&clock, &dir);
    claimed(engine.claim(request("first")).unwrap())
        .complete(body("first"))
        .unwrap();
    claimed(engine.claim(request("gone")).unwrap())
        .release()
        .unwrap();
    claimed(engine.claim(request("next")).unwrap())
        .complete(body("next"))
        .unwrap();
    assert_eq!(replayed(engine.claim(request("next")).unwrap()), b"next");
    assert_eq!(replayed(engine.claim(request("first")).unwrap()), b"first");
    assert!(engine.record("s", "gone").unwrap().is_none());
}

/// A takeover keeps the row (and its rowid) and moves the fence: the old holder's completion
/// finds the row but not its fence, the new holder's completes it.
#[test]
fn after_a_takeover_only_the_new_holder_completes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let engine = engine(&clock, &dir);
    let old = claimed(engine.claim(request("k")).unwrap());
    // Rows after it, so that the taken-over row is not the last one.
    for i in 0..3 {
        claimed(engine.claim(request(&format!("later-{i}"))).unwrap())
            .complete(body("later"))
            .unwrap();
    }
    clock.advance(Duration::from_secs(11));
    let new = claimed(engine.claim(request("k")).unwrap());
    assert!(new.fencing_token() > old.fencing_token());
    assert!(matches!(old.complete(body("old")), Err(Error::LeaseLost)));
    new.complete(body("new")).unwrap();
    assert_eq!(replayed(engine.claim(request("k")).unwrap()), b"new");
    assert_eq!(
        replayed(engine.claim(request("later-1")).unwrap()),
        b"later"
    );
}

/// An expired record is replaced in place by the next claim of its key: that claim's
/// completion stores the new response on that row, and nothing else changes.
#[test]
fn a_claim_that_replaces_an_expired_record_completes_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let engine = engine(&clock, &dir);
    claimed(engine.claim(request("k")).unwrap())
        .complete(body("v1"))
        .unwrap();
    claimed(engine.claim(request("other")).unwrap())
        .complete(body("other"))
        .unwrap();
    clock.advance(Duration::from_secs(61));
    claimed(engine.claim(request("k")).unwrap())
        .complete(body("v2"))
        .unwrap();
    assert_eq!(replayed(engine.claim(request("k")).unwrap()), b"v2");
    // `other` expired with `k`; it is claimed afresh, not replayed.
    claimed(engine.claim(request("other")).unwrap())
        .release()
        .unwrap();
    engine.shutdown().unwrap();
    // And the same after a restart, from the file.
    let engine = self::engine(&clock, &dir);
    assert_eq!(replayed(engine.claim(request("k")).unwrap()), b"v2");
}

/// A lease whose record was released by an operator and claimed again (a new row, maybe the
/// same rowid) cannot complete the new holder's record.
#[test]
fn a_lease_whose_row_was_reclaimed_cannot_complete_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let engine = engine(&clock, &dir);
    let old = claimed(engine.claim(request("k")).unwrap());
    engine.force_release("s", "k", old.fencing_token()).unwrap();
    let new = claimed(engine.claim(request("k")).unwrap());
    assert!(matches!(old.complete(body("old")), Err(Error::LeaseLost)));
    new.complete(body("new")).unwrap();
    assert_eq!(replayed(engine.claim(request("k")).unwrap()), b"new");
}
