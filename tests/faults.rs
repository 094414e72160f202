//! Fault injection through the public API: a full disk (a page cap on the database, and a real
//! 1 MiB tmpfs where the test may mount one) and a handler slower than the lock timeout. Time
//! only moves through a [`ManualClock`]; nothing sleeps.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idempotency_rs::{
    ClaimOutcome, ClaimRequest, Engine, EngineConfig, Error, Fingerprint, IdempotencyKey, Lease,
    ManualClock, StoredResponse,
};
use support::{claimed, replayed};

mod support;

const T0: i64 = 1_700_000_000_000;
const LOCK: Duration = Duration::from_secs(10);

fn fp(body: &str) -> Fingerprint {
    Fingerprint::of_request("POST", "/payments", body.as_bytes())
}

fn request(scope: &str, key: &str, body: &str) -> ClaimRequest {
    ClaimRequest::new(scope, IdempotencyKey::new(key).unwrap(), fp(body))
}

fn response(i: usize, body_len: usize) -> StoredResponse {
    StoredResponse::new(201, vec![(i % 251) as u8; body_len])
        .with_header("x-payment", format!("p-{i}").into_bytes())
}

fn at(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms as u64)
}

// ---------------------------------------------------------------------------------------------
// Disk full
// ---------------------------------------------------------------------------------------------

/// Pages of 4 KiB: the schema takes a handful; the rest fills up within a few dozen records.
const PAGE_CAP: u32 = 48;

/// A scope of 1024 bytes makes each in-flight row spill into an overflow page of its own, so
/// releasing such rows gives whole pages back to the free list.
fn big_scope() -> String {
    "s".repeat(1024)
}

/// The database cannot grow past `max_page_count`: claims and completions fail with
/// `Error::DiskFull`, every acknowledged completion still replays (also after a reopen), a
/// completion that failed leaves its key in flight until the lock timeout (never an immediate
/// re-run), and the same engine recovers once space is freed.
#[test]
fn disk_full_fails_cleanly_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let clock = Arc::new(ManualClock::new(T0));
    let config = EngineConfig::new(&path)
        .clock(clock.clone())
        .lock_timeout(LOCK)
        .max_page_count(PAGE_CAP);
    let engine = Engine::open(config).unwrap();
    let scope = big_scope();

    // Ballast: in-flight records, each with an overflow page, released later to free space.
    let mut ballast: Vec<Lease> = (0..8)
        .map(|i| {
            claimed(
                engine
                    .claim(request(&scope, &format!("ballast-{i}"), "b"))
                    .unwrap(),
            )
        })
        .collect();

    // Fill the database with completed records until a claim or a completion hits the cap.
    let mut acked: Vec<(String, StoredResponse)> = Vec::new();
    let mut stuck: Option<String> = None;
    for i in 0..1000 {
        let key = format!("done-{i}");
        match engine.claim(request("t", &key, "x")) {
            Ok(outcome) => {
                let resp = response(i, 3000);
                match claimed(outcome).complete(resp.clone()) {
                    Ok(()) => acked.push((key, resp)),
                    Err(Error::DiskFull) => {
                        stuck = Some(key);
                        break;
                    }
                    Err(e) => panic!("complete {i}: {e:?}"),
                }
            }
            Err(Error::DiskFull) => break,
            Err(e) => panic!("claim {i}: {e:?}"),
        }
    }
    assert!(
        acked.len() >= 5,
        "only {} completions fit under the cap",
        acked.len()
    );
    assert!(acked.len() < 1000, "the page cap was never reached");
    eprintln!(
        "page cap: {} completions stored, then {}",
        acked.len(),
        stuck
            .as_ref()
            .map_or("a claim failed", |_| "a completion failed")
    );

    // Take whatever single pages are left with more ballast, until a claim is refused.
    let mut refused = false;
    for i in 0..64 {
        match engine.claim(request(&scope, &format!("extra-{i}"), "b")) {
            Ok(outcome) => ballast.push(claimed(outcome)),
            Err(Error::DiskFull) => {
                refused = true;
                break;
            }
            Err(e) => panic!("extra claim {i}: {e:?}"),
        }
    }
    assert!(refused, "claims kept succeeding on a full database");
    // Nothing changed, so the same claim is refused again; so is a large completion.
    let err = engine.claim(request(&scope, "refused", "b")).unwrap_err();
    assert!(matches!(err, Error::DiskFull), "{err:?}");
    assert!(err.is_transient());

    // No acknowledged completion was lost.
    for (key, resp) in &acked {
        assert_eq!(
            &replayed(engine.claim(request("t", key, "x")).unwrap()),
            resp
        );
    }
    // The completion that failed did not free its key: a retry sees it in flight.
    if let Some(key) = &stuck {
        assert!(matches!(
            engine.claim(request("t", key, "x")).unwrap(),
            ClaimOutcome::InFlight { .. }
        ));
    }

    // Space returns: release the ballast (deletes need no new pages).
    for lease in ballast.drain(..) {
        lease.release().unwrap();
    }
    let lease = claimed(engine.claim(request(&scope, "after", "b")).unwrap());
    lease.complete(response(7, 100)).unwrap();
    assert_eq!(
        replayed(engine.claim(request(&scope, "after", "b")).unwrap()),
        response(7, 100)
    );
    // The stuck key is taken over once its lock times out, and completes.
    if let Some(key) = &stuck {
        clock.advance(LOCK);
        let lease = claimed(engine.claim(request("t", key, "x")).unwrap());
        lease.complete(response(9, 100)).unwrap();
    }
    engine.shutdown().unwrap();
    drop(engine);

    // Everything acknowledged is on disk: a new engine without the cap replays it.
    let engine = Engine::open(EngineConfig::new(&path).clock(clock)).unwrap();
    for (key, resp) in &acked {
        assert_eq!(
            &replayed(engine.claim(request("t", key, "x")).unwrap()),
            resp
        );
    }
    if let Some(key) = &stuck {
        assert_eq!(
            replayed(engine.claim(request("t", key, "x")).unwrap()),
            response(9, 100)
        );
    }
}

/// Unmounts on drop, so a failing test does not leave the mount behind.
struct Mount<'a>(&'a Path);

impl Drop for Mount<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

/// A real full file system: the database on a 1 MiB tmpfs, filled with a ballast file. Needs
/// root (mount privileges); where the mount is refused the test says so and checks nothing
/// else (the page-cap test above covers the same behaviour everywhere).
#[test]
fn real_full_filesystem_fails_cleanly_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(dir.path())
        .output();
    match mounted {
        Ok(out) if out.status.success() => {}
        other => {
            eprintln!("SKIPPED: cannot mount a tmpfs here ({other:?})");
            return;
        }
    }
    let _mount = Mount(dir.path());
    let path = dir.path().join("idem.db");
    let clock = Arc::new(ManualClock::new(T0));
    let engine = Engine::open(
        EngineConfig::new(&path)
            .clock(clock.clone())
            .lock_timeout(LOCK),
    )
    .unwrap();

    let mut acked: Vec<(String, StoredResponse)> = Vec::new();
    for i in 0..5 {
        let key = format!("early-{i}");
        let lease = claimed(engine.claim(request("t", &key, "x")).unwrap());
        lease.complete(response(i, 2000)).unwrap();
        acked.push((key, response(i, 2000)));
    }

    // Fill the file system.
    let ballast = dir.path().join("ballast");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&ballast).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).and_then(|()| f.flush()).is_ok() {}
        let _ = f.sync_all();
    }

    // Writes fail with DiskFull; a large completion cannot be stored either, unless it fits in
    // WAL space already allocated (SQLite rewinds a WAL whose frames are all checkpointed and
    // writes over it): then it is stored, and must replay like any other.
    let mut refused = 0;
    let mut stuck = Vec::new();
    for i in 0..50 {
        match engine.claim(request("t", &format!("late-{i}"), "x")) {
            Ok(outcome) => match claimed(outcome).complete(response(i, 64 * 1024)) {
                Ok(()) => acked.push((format!("late-{i}"), response(i, 64 * 1024))),
                Err(Error::DiskFull) => stuck.push(format!("late-{i}")),
                Err(e) => panic!("complete late-{i}: {e:?}"),
            },
            Err(Error::DiskFull) => refused += 1,
            Err(e) => panic!("claim late-{i}: {e:?}"),
        }
    }
    assert!(
        refused > 0 || !stuck.is_empty(),
        "nothing failed on a full disk"
    );
    eprintln!(
        "full tmpfs: {refused} claims refused, {} completions failed",
        stuck.len()
    );
    for (key, resp) in &acked {
        assert_eq!(
            &replayed(engine.claim(request("t", key, "x")).unwrap()),
            resp
        );
    }

    // Space returns: the same engine works again.
    std::fs::remove_file(&ballast).unwrap();
    let lease = claimed(engine.claim(request("t", "after", "x")).unwrap());
    lease.complete(response(1, 2000)).unwrap();
    assert_eq!(
        replayed(engine.claim(request("t", "after", "x")).unwrap()),
        response(1, 2000)
    );
    for key in &stuck {
        // A failed completion holds its key until the lock timeout.
        assert!(matches!(
            engine.claim(request("t", key, "x")).unwrap(),
            ClaimOutcome::InFlight { .. }
        ));
    }
    for (key, resp) in &acked {
        assert_eq!(
            &replayed(engine.claim(request("t", key, "x")).unwrap()),
            resp
        );
    }
    engine.shutdown().unwrap();
}

// ---------------------------------------------------------------------------------------------
// A handler slower than the lock timeout
// ---------------------------------------------------------------------------------------------

fn manual_engine() -> (Engine, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T0));
    let engine = Engine::open(
        EngineConfig::in_memory()
            .clock(clock.clone())
            .lock_timeout(LOCK),
    )
    .unwrap();
    (engine, clock)
}

/// The first holder runs past its lock timeout; a retry takes the record over with a larger
/// fencing token; the stale holder's completion, release and extension all get `LeaseLost`
/// and change nothing; the record holds the newer result.
#[test]
fn slow_handler_loses_its_lease_to_a_takeover() {
    let (engine, clock) = manual_engine();
    let stale = claimed(engine.claim(request("t", "pay-1", "100")).unwrap());
    assert_eq!(stale.locked_until(), at(T0 + 10_000));

    // Still locked one millisecond before the timeout.
    clock.advance(LOCK - Duration::from_millis(1));
    match engine.claim(request("t", "pay-1", "100")).unwrap() {
        ClaimOutcome::InFlight { retry_after } => {
            assert_eq!(retry_after, Duration::from_millis(1));
        }
        other => panic!("expected InFlight, got {other:?}"),
    }
    // A different request with the key never takes it over.
    clock.advance(Duration::from_millis(1));
    assert!(matches!(
        engine.claim(request("t", "pay-1", "999")).unwrap(),
        ClaimOutcome::Mismatch
    ));

    let mut fresh = claimed(engine.claim(request("t", "pay-1", "100")).unwrap());
    assert!(fresh.fencing_token() > stale.fencing_token());

    let mut stale = stale;
    assert!(matches!(stale.extend(LOCK).unwrap_err(), Error::LeaseLost));
    let err = stale.complete(response(1, 10)).unwrap_err();
    assert!(matches!(err, Error::LeaseLost), "{err:?}");
    assert!(!err.is_transient());

    // The takeover's lease is intact: it can still be extended and completed.
    fresh.extend(LOCK).unwrap();
    fresh.complete(response(2, 10)).unwrap();
    assert_eq!(
        replayed(engine.claim(request("t", "pay-1", "100")).unwrap()),
        response(2, 10)
    );

    // A stale release after the completion changes nothing either.
    let (engine2, clock2) = manual_engine();
    let old = claimed(engine2.claim(request("t", "k", "1")).unwrap());
    clock2.advance(LOCK);
    let new = claimed(engine2.claim(request("t", "k", "1")).unwrap());
    new.complete(response(3, 5)).unwrap();
    assert!(matches!(old.release().unwrap_err(), Error::LeaseLost));
    assert_eq!(
        replayed(engine2.claim(request("t", "k", "1")).unwrap()),
        response(3, 5)
    );
}

/// A lease past its lock timeout that nobody took over still completes: the timeout only
/// allows a takeover, it does not revoke the lease by itself.
#[test]
fn late_completion_without_takeover_is_kept() {
    let (engine, clock) = manual_engine();
    let lease = claimed(engine.claim(request("t", "pay-2", "1")).unwrap());
    clock.advance(LOCK * 3);
    lease.complete(response(4, 10)).unwrap();
    assert_eq!(
        replayed(engine.claim(request("t", "pay-2", "1")).unwrap()),
        response(4, 10)
    );
}

/// `extend` keeps a long operation's lease: retries see it in flight past the original
/// timeout, with `retry_after` counting to the extended one, and the completion is stored.
#[test]
fn extend_keeps_a_long_operation_lease() {
    let (engine, clock) = manual_engine();
    let mut lease = claimed(engine.claim(request("t", "report", "q")).unwrap());
    let fence = lease.fencing_token();
    for step in 1..=5 {
        clock.advance(Duration::from_secs(8));
        lease.extend(LOCK).unwrap();
        let now = T0 + step * 8_000;
        assert_eq!(lease.locked_until(), at(now + 10_000));
        // Past the original (and every earlier) timeout, a retry still finds it in flight.
        match engine.claim(request("t", "report", "q")).unwrap() {
            ClaimOutcome::InFlight { retry_after } => assert_eq!(retry_after, LOCK),
            other => panic!("step {step}: expected InFlight, got {other:?}"),
        }
    }
    assert_eq!(lease.fencing_token(), fence);
    clock.advance(Duration::from_secs(9));
    lease.complete(response(5, 10)).unwrap();
    assert_eq!(
        replayed(engine.claim(request("t", "report", "q")).unwrap()),
        response(5, 10)
    );
}

/// Without `extend`, the same long operation loses its record at the first timeout.
#[test]
fn without_extend_the_long_operation_is_taken_over() {
    let (engine, clock) = manual_engine();
    let lease = claimed(engine.claim(request("t", "report", "q")).unwrap());
    clock.advance(Duration::from_secs(16));
    let other = claimed(engine.claim(request("t", "report", "q")).unwrap());
    assert!(matches!(
        lease.complete(response(6, 1)).unwrap_err(),
        Error::LeaseLost
    ));
    other.complete(response(7, 1)).unwrap();
    assert_eq!(
        replayed(engine.claim(request("t", "report", "q")).unwrap()),
        response(7, 1)
    );
}

// ---------------------------------------------------------------------------------------------
// Another process holds the lock; one scope floods the store
// ---------------------------------------------------------------------------------------------

/// Another connection holds the write lock past the busy timeout: claims fail with
/// `Error::Busy` (transient, nothing applied), and succeed as soon as the lock is gone.
#[test]
fn locked_by_another_connection_is_busy_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let clock = Arc::new(ManualClock::new(T0));
    let engine = Engine::open(
        EngineConfig::new(&path)
            .clock(clock)
            .busy_timeout(Duration::from_millis(50)),
    )
    .unwrap();
    let done = claimed(engine.claim(request("t", "before", "x")).unwrap());
    done.complete(response(1, 10)).unwrap();

    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let err = engine.claim(request("t", "during", "x")).unwrap_err();
    assert!(matches!(err, Error::Busy), "{err:?}");
    assert!(err.is_transient());
    // Replays of completed records do not need the write lock.
    assert_eq!(
        replayed(engine.claim(request("t", "before", "x")).unwrap()),
        response(1, 10)
    );
    other.execute_batch("ROLLBACK").unwrap();
    drop(other);

    let lease = claimed(engine.claim(request("t", "during", "x")).unwrap());
    lease.complete(response(2, 10)).unwrap();
    assert_eq!(
        replayed(engine.claim(request("t", "during", "x")).unwrap()),
        response(2, 10)
    );
}

/// 10,000 keys from one scope: every one is stored and replayed, and another scope is
/// unaffected (its claims neither see those keys nor wait for them).
#[test]
fn ten_thousand_keys_from_one_scope_leave_other_scopes_alone() {
    let (engine, _clock) = manual_engine();
    for i in 0..10_000 {
        let lease = claimed(
            engine
                .claim(request("flood", &format!("k{i}"), "x"))
                .unwrap(),
        );
        lease.complete(StoredResponse::new(201, vec![])).unwrap();
    }
    // The same key names in another scope are fresh.
    for i in (0..10_000).step_by(997) {
        let key = format!("k{i}");
        let lease = claimed(engine.claim(request("quiet", &key, "y")).unwrap());
        lease.complete(response(i, 8)).unwrap();
        assert_eq!(
            replayed(engine.claim(request("quiet", &key, "y")).unwrap()),
            response(i, 8)
        );
        assert_eq!(
            replayed(engine.claim(request("flood", &key, "x")).unwrap()),
            StoredResponse::new(201, vec![])
        );
    }
}
