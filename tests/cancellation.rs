//! What a caller that goes away leaves behind (issue #13, items 5 and 8): never a key locked
//! for the whole lock timeout, and never a false `InFlight` for a retry of a key whose lease
//! its caller had already dropped.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use idempotency_rs::{ClaimOutcome, Engine, EngineConfig, Lease};
use support::{claimed, record_state, request};

mod support;

/// Long enough that a key still locked by a forgotten lease cannot pass for a released one.
const LOCK: Duration = Duration::from_secs(30);

/// Item 5: a claim whose answer was delivered to its future, which was then dropped without
/// being polled again (a client disconnect, a gRPC deadline, a `select!`). The answer held a
/// won lease nobody owned; it was dropped with the future's channel and the key stayed locked
/// for the whole lock timeout (`InFlight { retry_after: ~30 s }` for the retry, 3 runs in 3).
/// Now dropping the undelivered answer releases the key, and the retry runs.
#[test]
fn a_claim_answered_but_never_read_releases_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let engine = Engine::open(EngineConfig::new(&db).lock_timeout(LOCK)).unwrap();
    let mut cx = Context::from_waker(Waker::noop());
    for run in 0..5 {
        let key = format!("k{run}");
        {
            // Another connection holds the write lock, so that the writer cannot answer before
            // the first poll: on two busy cores it sometimes did, between the claim's send and
            // its poll (6 runs in 30 of this file).
            let blocker = rusqlite::Connection::open(&db).unwrap();
            blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
            let mut claim = pin!(engine.claim_async(request(&key)));
            assert!(
                claim.as_mut().poll(&mut cx).is_pending(),
                "a fresh claim was answered without the writer"
            );
            blocker.execute_batch("ROLLBACK").unwrap();
            drop(blocker);
            // The writer commits the claim, then sends the answer into the future's channel.
            let deadline = Instant::now() + Duration::from_secs(30);
            while record_state(&db, &key).is_none() {
                assert!(Instant::now() < deadline, "never committed");
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(20));
            // The future is dropped here, its answer unread.
        }
        match engine.claim(request(&key)).unwrap() {
            ClaimOutcome::Claimed(lease) => drop(lease),
            other => panic!("run {run}: the key stayed locked: {other:?}"),
        }
    }
}

/// Item 5 under load: hundreds of async claims cut short by timeouts of 0 to 2 ms (some before
/// they are answered, some after, some after they won). Every key must be free at once
/// afterwards: a retry is claimed, never `InFlight`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_cut_short_by_timeouts_leave_no_key_locked() {
    let dir = tempfile::tempdir().unwrap();
    let engine =
        Engine::open(EngineConfig::new(dir.path().join("c.db")).lock_timeout(LOCK)).unwrap();
    let tasks: Vec<_> = (0..600)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let key = format!("t{i}");
                let limit = Duration::from_micros((i as u64 * 37) % 2000);
                // The deadline is looked at first, as a server's timeout or a `select!` may:
                // when it has passed, the claim is dropped without being polled again, even
                // if its answer is waiting. A lease won in time is dropped at the end of the
                // task: released as well.
                let claim = engine.claim_async(request(&key));
                tokio::select! {
                    biased;
                    () = tokio::time::sleep(limit) => {}
                    _ = claim => {}
                }
                key
            })
        })
        .collect();
    let mut keys = Vec::new();
    for t in tasks {
        keys.push(t.await.unwrap());
    }
    let mut locked = Vec::new();
    for key in &keys {
        match engine.claim_async(request(key)).await.unwrap() {
            ClaimOutcome::Claimed(_) => {}
            other => locked.push(format!("{key}: {other:?}")),
        }
    }
    assert!(locked.is_empty(), "keys left locked: {locked:?}");
}

/// Item 8: a release queued before a claim is applied before it, however many lease commands
/// are queued. The writer takes at most `max_batch` lease commands before claims; with more
/// queued, a claim could be committed in a batch before its own earlier release, and the retry
/// of a dropped lease got a false `InFlight`. The writer is held (another connection holds the
/// write lock) while 40 leases are dropped and one of their keys is claimed again, with
/// batches of 4.
#[test]
fn a_release_queued_before_a_claim_is_applied_before_it_whatever_the_queue_length() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("c.db");
        let engine = Engine::open(
            EngineConfig::new(&db)
                .lock_timeout(LOCK)
                .max_batch(4)
                .read_connections(0)
                .busy_timeout(Duration::from_secs(60)),
        )
        .unwrap();
        let leases: Vec<Lease> = (0..40)
            .map(|i| claimed(engine.claim(request(&format!("k{i}"))).unwrap()))
            .collect();

        let held = HeldWriter::hold(&engine, &db);
        // 40 releases queued, then a claim of the last released key, from this thread.
        drop(leases);
        let retry = {
            let engine = engine.clone();
            std::thread::spawn(move || engine.claim(request("k39")))
        };
        drop(claimed(held.release()));
        match retry.join().unwrap().unwrap() {
            ClaimOutcome::Claimed(_) => {}
            other => panic!("round {round}: the retry overtook its release: {other:?}"),
        }
    }
}

/// Holds the writer: another connection takes the write lock, and a claim of `stuck` makes the
/// writer wait for it inside its batch. Commands sent meanwhile all wait for the next batch.
struct HeldWriter {
    blocker: rusqlite::Connection,
    stuck: std::thread::JoinHandle<idempotency_rs::Result<ClaimOutcome>>,
}

impl HeldWriter {
    fn hold(engine: &Engine, db: &std::path::Path) -> HeldWriter {
        let blocker = rusqlite::Connection::open(db).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let stuck = {
            let engine = engine.clone();
            std::thread::spawn(move || engine.claim(request("stuck")))
        };
        std::thread::sleep(Duration::from_millis(100));
        HeldWriter { blocker, stuck }
    }

    /// Lets the writer go; returns the `stuck` claim's answer.
    fn release(self) -> ClaimOutcome {
        std::thread::sleep(Duration::from_millis(100));
        self.blocker.execute_batch("COMMIT").unwrap();
        self.stuck.join().unwrap().unwrap()
    }
}

fn held_engine(db: &std::path::Path) -> Engine {
    Engine::open(
        EngineConfig::new(db)
            .lock_timeout(LOCK)
            .read_connections(0)
            .busy_timeout(Duration::from_secs(60)),
    )
    .unwrap()
}

/// Found in review of item 5: a claim abandoned while still queued (its future dropped) and the
/// client's immediate retry land in one batch. The abandoned claim won the record, so the retry
/// was told `InFlight` for a whole lock timeout (~30 s of Retry-After) although the key was
/// released a moment later. A claim whose caller is gone is now not run at all.
#[test]
fn a_claim_abandoned_in_the_queue_does_not_block_its_retry_in_the_same_batch() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let engine = held_engine(&db);
    let held = HeldWriter::hold(&engine, &db);
    {
        let mut claim = pin!(engine.claim_async(request("k")));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(claim.as_mut().poll(&mut cx).is_pending());
        // Dropped here, while its claim waits in the queue.
    }
    let retry = {
        let engine = engine.clone();
        std::thread::spawn(move || engine.claim(request("k")))
    };
    drop(claimed(held.release()));
    match retry.join().unwrap().unwrap() {
        ClaimOutcome::Claimed(_) => {}
        other => panic!("the abandoned claim blocked its retry: {other:?}"),
    }
}

/// Found in review: a claim that reaches the writer in the same batch as `shutdown` used to be
/// granted a lease whose completion could no longer be stored (the engine is closed by then),
/// so its handler ran for nothing and its key stayed locked across the restart until the lock
/// timeout. It is refused with `Closed` now (nothing runs); lease commands queued with it are
/// still applied.
#[test]
fn a_claim_queued_with_the_shutdown_is_refused_and_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("c.db");
    let engine = held_engine(&db);
    let lease = claimed(engine.claim(request("done")).unwrap());
    let held = HeldWriter::hold(&engine, &db);
    let completed = std::thread::spawn(move || {
        lease.complete(idempotency_rs::StoredResponse::new(201, "done"))
    });
    let late = {
        let engine = engine.clone();
        std::thread::spawn(move || engine.claim(request("late")))
    };
    std::thread::sleep(Duration::from_millis(100));
    let shutdown = {
        let engine = engine.clone();
        std::thread::spawn(move || engine.shutdown())
    };
    drop(claimed(held.release()));
    shutdown.join().unwrap().unwrap();
    completed.join().unwrap().unwrap();
    match late.join().unwrap() {
        Err(idempotency_rs::Error::Closed) => {}
        other => panic!("expected Closed, got {other:?}"),
    }
    drop(engine);
    // After a restart: the completion queued with the shutdown replays, and the refused claim
    // left nothing behind.
    let engine = held_engine(&db);
    assert!(matches!(
        engine.claim(request("done")).unwrap(),
        ClaimOutcome::Replay(_)
    ));
    drop(claimed(engine.claim(request("late")).unwrap()));
}
