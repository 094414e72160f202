//! Issue #18 (CPU per operation), from outside: the WAL-growth checkpointer (every burst
//! reaches the database file, also one committed during the tail checkpoint, and nothing after
//! a failed flush), fencing tokens reserved ahead, schema version 3 (`replay_until`), the
//! completion by rowid, and the statements and header buffers reused through a batch. Public
//! API only; rusqlite reads the files as an operator (or a crash) would see them.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, UNIX_EPOCH};

use idempotency_rs::admin::{Access, RecordState, Store};
use idempotency_rs::{
    ClaimOutcome, ClaimRequest, Durability, Engine, EngineConfig, Error, Fingerprint,
    IdempotencyKey, Lease, ManualClock, StoredResponse,
};
use rusqlite::Connection;
use support::{claimed, replayed, request, wait_until_committed};

const T0: i64 = 1_700_000_000_000;

fn manual() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(T0))
}

/// Lock timeout 100 ms, retention 1000 ms, on a manual clock.
fn short(path: &Path, clock: &Arc<ManualClock>) -> EngineConfig {
    EngineConfig::new(path)
        .lock_timeout(Duration::from_millis(100))
        .retention(Duration::from_millis(1000))
        .clock(clock.clone())
}

fn response(key: &str) -> StoredResponse {
    StoredResponse::new(201, format!("{{\"key\":\"{key}\"}}")).with_header("x-k", key.as_bytes())
}

fn at(ms: i64) -> std::time::SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms as u64)
}

static COPIES: AtomicUsize = AtomicUsize::new(0);

/// The state of `key`'s record in the database file alone, WAL ignored: what the checkpoints
/// have copied there. The file is copied (without its `-wal`) and the copy read.
fn in_database_file(db: &Path, key: &str) -> Option<i64> {
    let n = COPIES.fetch_add(1, Ordering::SeqCst);
    let copy: PathBuf = db.with_file_name(format!("main-file-copy-{n}.db"));
    std::fs::copy(db, &copy).unwrap();
    let state = {
        let conn = Connection::open(&copy).unwrap();
        conn.query_row(
            "SELECT state FROM idempotency_records WHERE key = ?1",
            [key],
            |r| r.get(0),
        )
        .ok()
    };
    for suffix in ["", "-wal", "-shm"] {
        let mut p = copy.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    state
}

/// Waits (up to `within`) until the database file alone holds `key` in `state`.
fn reaches_database_file(db: &Path, key: &str, state: i64, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if in_database_file(db, key) == Some(state) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpointer (src/sqlite/checkpointer.rs)

/// After every burst of writes, once the WAL has been idle for a while (100 ms), the
/// checkpointer copies the WAL's tail into the database file. Each claim below is a batch of
/// its own followed by an idle second: every one of them must reach the database file.
///
/// The thread remembers how many frames the WAL held when it last checkpointed (`copied`) and
/// only detects a rewind when the WAL is *smaller* than that: a WAL that rewound and grew back
/// to exactly the same number of frames (identical batches do) looks already copied, and is
/// never checkpointed while the engine stays idle.
#[test]
fn every_idle_burst_is_checkpointed_into_the_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let engine = Engine::open(
        EngineConfig::new(&path)
            .clock(manual())
            .lock_timeout(Duration::from_secs(600)),
    )
    .unwrap();
    let mut leases = Vec::new();
    let mut never_copied = Vec::new();
    for i in 0..8 {
        let key = format!("burst-{i}");
        leases.push(claimed(engine.claim(request(&key)).unwrap()));
        if !reaches_database_file(&path, &key, 0, Duration::from_secs(3)) {
            never_copied.push(key);
        }
    }
    assert!(
        never_copied.is_empty(),
        "these claims were still only in the WAL after 3 s of idle engine (never checkpointed): \
         {never_copied:?}"
    );
    drop(leases);
    engine.shutdown().unwrap();
}

/// Once a flush of the WAL has failed, nothing more may be copied into the database file
/// (checkpointer.rs: "nothing more may be copied into the database file"; the pages of a
/// failed `fdatasync` may be lost from the page cache). The checkpointer checks for a failed
/// flush when it wakes up, but its tail checkpoint, 100 ms of idle later, runs without
/// checking again: a flush that fails in between is followed by a checkpoint of the frames
/// it failed to flush.
///
/// The window is only open until the writer notices the failure and stops the thread (at its
/// next timer, up to a second later), so the scenario is tried three times.
#[test]
fn no_checkpoint_copies_frames_after_a_failed_flush() {
    for attempt in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.db");
        let engine = Engine::open(
            EngineConfig::new(&path)
                .clock(manual())
                .durability(Durability::Full)
                .lock_timeout(Duration::from_secs(600)),
        )
        .unwrap();
        let lease = claimed(engine.claim(request("k")).unwrap());
        assert!(
            reaches_database_file(&path, "k", 0, Duration::from_secs(5)),
            "the claim never reached the database file"
        );
        // Let the checkpointer go back to sleep.
        std::thread::sleep(Duration::from_millis(300));

        engine.inject_sync_pause(true);
        let completing = std::thread::spawn(move || lease.complete(response("k")));
        wait_until_committed(&path, "k");
        // The commit woke the checkpointer, which found no failure; now the flush fails.
        std::thread::sleep(Duration::from_millis(10));
        engine.inject_sync_failure();
        engine.inject_sync_pause(false);
        let err = completing.join().unwrap().unwrap_err();
        assert!(matches!(err, Error::SyncFailed { .. }), "{err:?}");

        let at_failure = in_database_file(&path, "k");
        std::thread::sleep(Duration::from_millis(500));
        let later = in_database_file(&path, "k");
        assert_eq!(
            at_failure, later,
            "attempt {attempt}: after the failed flush, a checkpoint copied the completion's \
             frames into the database file (state {at_failure:?} -> {later:?})"
        );
        drop(engine);
    }
}

// ---------------------------------------------------------------------------------------------
// Fencing tokens reserved ahead (src/sqlite/backend.rs, FENCE_BLOCK)

/// Tokens handed out past a reserved block, across clean restarts: every token of a new engine
/// is above every token handed out before, the counter on disk is never behind a record, and
/// the store's check finds nothing.
#[test]
fn fencing_tokens_never_repeat_across_restarts_and_reserved_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let clock = manual();
    let config = || {
        EngineConfig::new(&path)
            .clock(clock.clone())
            .durability(Durability::Normal)
            .lock_timeout(Duration::from_secs(600))
    };
    let mut highest = 0u64;
    {
        let engine = Engine::open(config()).unwrap();
        for i in 0..4200 {
            let lease = claimed(engine.claim(request(&format!("f{i}"))).unwrap());
            assert!(lease.fencing_token() > highest, "token repeated at {i}");
            highest = lease.fencing_token();
            lease.release().unwrap();
        }
        // A record kept, with the highest token of this engine.
        let kept = claimed(engine.claim(request("kept")).unwrap());
        highest = kept.fencing_token();
        kept.complete(response("kept")).unwrap();
        engine.shutdown().unwrap();
    }
    for round in 0..4 {
        let engine = Engine::open(config()).unwrap();
        let lease = claimed(engine.claim(request(&format!("r{round}"))).unwrap());
        assert!(
            lease.fencing_token() > highest,
            "round {round}: token {} after {highest}",
            lease.fencing_token()
        );
        highest = lease.fencing_token();
        lease.complete(response("r")).unwrap();
        engine.shutdown().unwrap();
    }
    let conn = Connection::open(&path).unwrap();
    let counter: i64 = conn
        .query_row(
            "SELECT value FROM idempotency_meta WHERE name = 'fence'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let max: i64 = conn
        .query_row("SELECT max(fence) FROM idempotency_records", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(counter >= max && max as u64 == highest, "{counter} {max}");
    drop(conn);
    let store = Store::open_config(
        EngineConfig::new(&path).clock(clock.clone()),
        Access::ReadOnly,
    )
    .unwrap();
    assert_eq!(store.check().unwrap(), Vec::<String>::new());
}

/// A batch that fails on a full disk rolls back: its tokens were handed out to nobody, and
/// the tokens after it still never repeat one that a committed lease holds (also after a
/// restart).
#[test]
fn fencing_tokens_stay_unique_around_a_failed_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let clock = manual();
    // Find the file's size with the schema, then cap it a little above.
    {
        let engine = Engine::open(EngineConfig::new(&path).clock(clock.clone())).unwrap();
        engine.shutdown().unwrap();
    }
    let pages: i64 = Connection::open(&path)
        .unwrap()
        .pragma_query_value(None, "page_count", |r| r.get(0))
        .unwrap();
    let engine = Engine::open(
        EngineConfig::new(&path)
            .clock(clock.clone())
            .lock_timeout(Duration::from_secs(600))
            .max_page_count((pages + 6) as u32),
    )
    .unwrap();
    let mut tokens = Vec::new();
    let mut full = false;
    for i in 0..2000 {
        let big = StoredResponse::new(200, vec![b'x'; 3000]);
        match engine.claim(request(&format!("d{i}"))) {
            Ok(ClaimOutcome::Claimed(lease)) => {
                tokens.push(lease.fencing_token());
                match lease.complete(big) {
                    Ok(()) => {}
                    Err(Error::DiskFull) => {
                        full = true;
                        break;
                    }
                    Err(e) => panic!("{e:?}"),
                }
            }
            Err(Error::DiskFull) => {
                full = true;
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(full, "the cap was never reached");
    engine.shutdown().unwrap();
    drop(engine);
    let engine = Engine::open(
        EngineConfig::new(&path)
            .clock(clock.clone())
            .lock_timeout(Duration::from_secs(600)),
    )
    .unwrap();
    let after = claimed(engine.claim(request("after")).unwrap());
    let highest = *tokens.iter().max().unwrap();
    assert!(
        after.fencing_token() > highest,
        "{} after {highest}",
        after.fencing_token()
    );
    after.release().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Schema 3: replay_until (src/sqlite/storage.rs, admin.rs)

/// Turns the SQLite store at `path` back into a version 2 file: no `replay_until`, and every
/// completed record's `expires_at` at `done_until` (as version 2 wrote it).
fn back_to_version_2(path: &Path, done_until: i64) {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(&format!(
        "UPDATE idempotency_records SET expires_at = {done_until} WHERE state = 1;
         ALTER TABLE idempotency_records DROP COLUMN replay_until;
         PRAGMA user_version = 2;"
    ))
    .unwrap();
}

/// An operator's read-only store on a version 2 file (a service not upgraded yet): stats,
/// record, in-flight list and check all work, with the v2 meaning of `expires_at`. Then an
/// upgraded engine opens the file (adding the column) while that store stays open: the same
/// store now reads version 3, where a completion within the lock timeout is live until its
/// `replay_until`, not its `expires_at`.
#[test]
fn an_operator_store_reads_a_version_2_file_and_the_same_file_after_its_migration() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let clock = manual();
    let held_token;
    {
        let engine = Engine::open(short(&path, &clock)).unwrap();
        claimed(engine.claim(request("done")).unwrap())
            .complete(response("done"))
            .unwrap();
        let held = claimed(engine.claim(request("held")).unwrap());
        held_token = held.fencing_token();
        engine.shutdown().unwrap();
        std::mem::forget(held);
    }
    let done_until = T0 + 1000;
    back_to_version_2(&path, done_until);

    let store = Store::open_config(
        EngineConfig::new(&path).clock(clock.clone()),
        Access::ReadOnly,
    )
    .unwrap();
    let stats = store.stats().unwrap();
    assert_eq!(stats.schema_version, 2);
    assert_eq!(
        (stats.in_flight, stats.completed, stats.expired),
        (1, 1, 0),
        "{stats:?}"
    );
    let done = store.record("s", "done").unwrap().unwrap();
    assert_eq!(done.state, RecordState::Completed);
    assert_eq!(done.expires_at, at(done_until));
    assert_eq!(done.response.unwrap(), response("done"));
    let listed = store.in_flight(Duration::ZERO, 10).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].fencing_token, held_token);
    assert_eq!(store.check().unwrap(), Vec::<String>::new());

    // The upgraded service opens the file beside the operator's store.
    let engine = Engine::open(short(&path, &clock)).unwrap();
    clock.set_ms(T0 + 10);
    claimed(engine.claim(request("new")).unwrap())
        .complete(response("new"))
        .unwrap();
    let stats = store.stats().unwrap();
    assert_eq!(stats.schema_version, 3);
    assert_eq!(
        (stats.in_flight, stats.completed, stats.expired),
        (1, 2, 0),
        "{stats:?}"
    );
    let new = store.record("s", "new").unwrap().unwrap();
    assert_eq!(new.state, RecordState::Completed);
    assert_eq!(new.expires_at, at(T0 + 10 + 1000));
    assert_eq!(store.check().unwrap(), Vec::<String>::new());

    // `done` (v2 row) until its expires_at, `new` until its replay_until.
    clock.set_ms(done_until);
    assert_eq!(
        store.record("s", "done").unwrap().unwrap().state,
        RecordState::Expired
    );
    assert_eq!(
        store.record("s", "new").unwrap().unwrap().state,
        RecordState::Completed
    );
    clock.set_ms(T0 + 1010);
    assert_eq!(
        store.record("s", "new").unwrap().unwrap().state,
        RecordState::Expired
    );
    // `held` (in flight, bound T0 + 1100) is still live.
    let stats = store.stats().unwrap();
    assert_eq!(
        (stats.in_flight, stats.completed, stats.expired),
        (1, 0, 2),
        "{stats:?}"
    );
    assert_eq!(engine.stats().unwrap().expired, 2);
    claimed(engine.claim(request("new")).unwrap())
        .release()
        .unwrap();
    engine.shutdown().unwrap();
    assert_eq!(store.check().unwrap(), Vec::<String>::new());
}

/// A lease extended past its first lock completes (by its rowid: the extension moved its
/// claim's bound forward), and is replayed for exactly the retention after its completion:
/// not a moment longer, whether the answer comes from the writer, a read connection, or the
/// replay cache. The row itself is deleted from the extended bound on.
#[test]
fn an_extended_lease_is_replayed_for_the_retention_after_its_completion_and_no_longer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let clock = manual();
    let engine = Engine::open(short(&path, &clock).replay_cache_bytes(1 << 20)).unwrap();
    let mut lease = claimed(engine.claim(request("k")).unwrap());
    lease.extend(Duration::from_secs(5)).unwrap(); // lock until T0 + 5000, bound T0 + 6000
    clock.set_ms(T0 + 200); // past the first lock, within the extended one
    lease.complete(response("k")).unwrap(); // replayed until T0 + 1200
    let record = engine.record("s", "k").unwrap().unwrap();
    assert_eq!(record.state, RecordState::Completed);
    assert_eq!(record.expires_at, at(T0 + 1200));
    // Replays from every source, up to the last millisecond.
    for _ in 0..3 {
        assert_eq!(replayed(engine.claim(request("k")).unwrap()), response("k"));
    }
    clock.set_ms(T0 + 1199);
    for _ in 0..3 {
        assert_eq!(replayed(engine.claim(request("k")).unwrap()), response("k"));
    }
    clock.set_ms(T0 + 1200);
    match engine.claim(request("k")).unwrap() {
        ClaimOutcome::Claimed(again) => again.release().unwrap(),
        other => panic!("replayed past its retention: {other:?}"),
    }
    // Released: gone; and a completed-then-expired record is purged with its row's bound.
    assert!(engine.record("s", "k").unwrap().is_none());
    claimed(engine.claim(request("j")).unwrap())
        .complete(response("j"))
        .unwrap(); // at T0 + 1200: replayed until T0 + 2200, deleted from T0 + 2300
    clock.set_ms(T0 + 2200);
    assert_eq!(
        engine.record("s", "j").unwrap().unwrap().state,
        RecordState::Expired
    );
    assert_eq!(engine.purge_expired().unwrap(), 0);
    clock.set_ms(T0 + 2300);
    assert_eq!(engine.purge_expired().unwrap(), 1);
    assert!(engine.record("s", "j").unwrap().is_none());
}

/// A completion whose claim's row expired and was purged, its rowid then reused by another
/// key's claim (the deleted row was the last one), must not touch that other record: the
/// lease is lost, and the other key's holder completes its own.
#[test]
fn a_lease_whose_purged_rowid_went_to_another_key_cannot_complete_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let clock = manual();
    let engine = Engine::open(short(&path, &clock)).unwrap();
    let old = claimed(engine.claim(request("a")).unwrap());
    clock.set_ms(T0 + 1100); // a's bound: lock (100) + retention (1000)
    assert_eq!(engine.purge_expired().unwrap(), 1);
    let other = claimed(engine.claim(request("b")).unwrap());
    assert!(matches!(old.complete(response("a")), Err(Error::LeaseLost)));
    assert_eq!(
        engine.record("s", "b").unwrap().unwrap().state,
        RecordState::InFlight
    );
    other.complete(response("b")).unwrap();
    assert_eq!(replayed(engine.claim(request("b")).unwrap()), response("b"));
    claimed(engine.claim(request("a")).unwrap())
        .release()
        .unwrap();
    engine.shutdown().unwrap();
    let conn = Connection::open(&path).unwrap();
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM idempotency_records", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 1);
}

// ---------------------------------------------------------------------------------------------
// Statements and header buffers reused through a batch (src/sqlite/storage.rs Statements,
// src/response.rs encode_headers_into)

fn varied(i: usize) -> StoredResponse {
    let mut r = StoredResponse::new(200 + (i % 7) as u16, format!("body-{i}").repeat(i % 5));
    for h in 0..(i % 4) {
        r = r.with_header(format!("h{h}"), format!("v{i}-{h}").repeat(1 + i % 3));
    }
    if i.is_multiple_of(2) {
        let trailers = (0..(i % 6) / 2)
            .map(|t| (format!("t{t}"), format!("tv{i}").into_bytes()))
            .collect();
        r = r.with_trailers(trailers);
    }
    r
}

/// Many completions in the same batches, fresh keys, takeovers and re-claims of expired
/// records mixed, with header and trailer lists of every length (and no trailers): each
/// record gets exactly its own response, also after a restart.
#[test]
fn completions_batched_together_store_exactly_their_own_responses() {
    const N: usize = 48;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let clock = manual();
    let engine = Engine::open(short(&path, &clock)).unwrap();
    let key = |i: usize| format!("b{i}");
    // A third of the keys: completed long ago (expired, replaced in place); a third: held by
    // a lease whose lock timed out (taken over); the rest fresh.
    let mut stale = Vec::new();
    for i in 0..N {
        match i % 3 {
            0 => claimed(engine.claim(request(&key(i))).unwrap())
                .complete(response("old"))
                .unwrap(),
            1 => stale.push(claimed(engine.claim(request(&key(i))).unwrap())),
            _ => {}
        }
    }
    clock.set_ms(T0 + 5000);
    let leases: Vec<Lease> = (0..N)
        .map(|i| claimed(engine.claim(request(&key(i))).unwrap()))
        .collect();
    let barrier = Arc::new(Barrier::new(N));
    let handles: Vec<_> = leases
        .into_iter()
        .enumerate()
        .map(|(i, lease)| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                lease.complete(varied(i))
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    for lease in stale {
        assert!(matches!(
            lease.complete(response("stale")),
            Err(Error::LeaseLost)
        ));
    }
    for i in 0..N {
        assert_eq!(
            replayed(engine.claim(request(&key(i))).unwrap()),
            varied(i),
            "key {i}"
        );
    }
    engine.shutdown().unwrap();
    drop(engine);
    let engine = Engine::open(short(&path, &clock)).unwrap();
    for i in 0..N {
        assert_eq!(
            replayed(engine.claim(request(&key(i))).unwrap()),
            varied(i),
            "key {i} after a restart"
        );
    }
}

/// A claim with another payload, on a record completed within its lock timeout whose replay
/// has ended but whose row is still there (its claim's bound is later): the key is free again,
/// so the new payload is claimed, not refused as a mismatch, and the old response is never
/// replayed again.
#[test]
fn a_record_past_its_replay_is_free_for_another_payload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let clock = manual();
    let engine = Engine::open(short(&path, &clock)).unwrap();
    claimed(engine.claim(request("k")).unwrap())
        .complete(response("k"))
        .unwrap(); // at T0: replayed until T0 + 1000, row kept until T0 + 1100
    clock.set_ms(T0 + 1050);
    let other = ClaimRequest::new(
        "s",
        IdempotencyKey::new("k").unwrap(),
        Fingerprint::of_request("POST", "/", b"another payload"),
    );
    let lease = match engine.claim(other.clone()).unwrap() {
        ClaimOutcome::Claimed(lease) => lease,
        outcome => panic!("a record past its replay still answered: {outcome:?}"),
    };
    // The new lease's record is live (not purged with the old row's bound).
    clock.set_ms(T0 + 1101);
    assert_eq!(engine.purge_expired().unwrap(), 0);
    lease.complete(response("new")).unwrap();
    assert_eq!(replayed(engine.claim(other).unwrap()), response("new"));
    assert!(matches!(
        engine.claim(request("k")).unwrap(),
        ClaimOutcome::Mismatch
    ));
}

/// A commit that lands while the checkpointer runs its tail checkpoint (the WAL idle for
/// 100 ms, then a last checkpoint of everything) must be checkpointed too once the engine is
/// idle again. The thread decides the WAL is idle, checkpoints, and only then marks itself
/// asleep: a commit meanwhile saw it awake and did not wake it, and a passive checkpoint only
/// copies frames committed before it started. Timing-dependent: each round lands one claim
/// at a different moment around the tail checkpoint of a large burst.
#[test]
fn a_commit_during_the_tail_checkpoint_is_checkpointed_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let engine = Engine::open(
        EngineConfig::new(&path)
            .clock(manual())
            .durability(Durability::Normal)
            .lock_timeout(Duration::from_secs(600)),
    )
    .unwrap();
    let mut leases = Vec::new();
    let mut missed = Vec::new();
    for round in 0..16u64 {
        // A burst of a thousand-odd WAL frames: its tail checkpoint takes a while.
        for i in 0..250 {
            let key = format!("burst-{round}-{i}");
            claimed(engine.claim(request(&key)).unwrap())
                .complete(StoredResponse::new(200, vec![b'x'; 3000]))
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(95 + round * 8));
        let key = format!("late-{round}");
        leases.push(claimed(engine.claim(request(&key)).unwrap()));
        if !reaches_database_file(&path, &key, 0, Duration::from_secs(2)) {
            missed.push(key);
        }
    }
    assert!(
        missed.is_empty(),
        "these claims stayed in the WAL only, with the engine idle: {missed:?}"
    );
}
