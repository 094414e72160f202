//! Crash safety: a child process (this test binary, re-executed) claims and completes keys,
//! acknowledging each step on stdout, and is killed with SIGKILL at a random moment. The parent
//! then reopens the database and checks that every acknowledged completion replays byte for
//! byte, that orphaned leases are in flight until their lock timeout and claimable after it
//! (with a larger fencing token), and that SQLite's `integrity_check` is "ok".
//!
//! Both processes use a `ManualClock` that the parent sets, so nothing waits for a real lock
//! timeout. Set `IDEM_CRASH_SEED` to replay the kill points of a failed run (the seed is
//! printed).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use idempotency_rs::{
    ClaimOutcome, ClaimRequest, Engine, EngineConfig, Fingerprint, IdempotencyKey, ManualClock,
    StoredResponse,
};

mod support;

/// The virtual time the first child starts at (ms since the epoch).
const T0: i64 = 1_700_000_000_000;
const LOCK: Duration = Duration::from_secs(10);
const RETENTION: Duration = Duration::from_secs(24 * 3600);

const ENV_MODE: &str = "IDEM_CRASH_CHILD";
const ENV_DB: &str = "IDEM_CRASH_DB";
const ENV_CLOCK: &str = "IDEM_CRASH_CLOCK_MS";
const ENV_PREFIX: &str = "IDEM_CRASH_PREFIX";

fn config(path: &Path, clock: &Arc<ManualClock>) -> EngineConfig {
    EngineConfig::new(path)
        .lock_timeout(LOCK)
        .retention(RETENTION)
        .clock(clock.clone())
}

fn request(key: &str) -> ClaimRequest {
    ClaimRequest::new(
        "crash",
        IdempotencyKey::new(key).unwrap(),
        Fingerprint::of_request("POST", "/crash", key.as_bytes()),
    )
}

/// The response the child stores for `key` (the parent rebuilds it to compare).
fn response(key: &str) -> StoredResponse {
    let mut body = Vec::new();
    for i in 0..(key.len() * 7) {
        body.push((i as u8).wrapping_mul(31) ^ key.as_bytes()[i % key.len()]);
    }
    StoredResponse::new(200 + (key.len() % 50) as u16, body)
        .with_header("x-key", key.as_bytes().to_vec())
        .with_header("x-bin", vec![0u8, 0xff, 0x80])
        .with_trailers(vec![("grpc-status".into(), b"0".to_vec())])
}

// ---------------------------------------------------------------------------------------------
// The child

/// The child process's entry point: ignored in a normal run; the parent runs it with
/// `--ignored --exact` and the environment telling it what to do. It never returns by itself:
/// the parent kills it.
#[test]
#[ignore = "run by the crash tests in a child process"]
fn crash_child() {
    let Ok(mode) = std::env::var(ENV_MODE) else {
        return;
    };
    let path = std::env::var(ENV_DB).unwrap();
    let start: i64 = std::env::var(ENV_CLOCK).unwrap().parse().unwrap();
    let prefix = std::env::var(ENV_PREFIX).unwrap();
    let clock = Arc::new(ManualClock::new(start));
    let engine = Engine::open(config(Path::new(&path), &clock)).unwrap();
    println!("READY");
    match mode.as_str() {
        // Claims only: every acknowledged claim is a lease that is never completed.
        "claims" => {
            let mut held = Vec::new();
            for i in 0.. {
                let key = format!("{prefix}-{i}");
                match engine.claim(request(&key)).unwrap() {
                    ClaimOutcome::Claimed(lease) => {
                        println!("CLAIMED {key} {}", lease.fencing_token());
                        held.push(lease);
                    }
                    other => println!("BAD {key} {other:?}"),
                }
            }
        }
        // Claim and complete, one key after another.
        "completions" => {
            for i in 0.. {
                let key = format!("{prefix}-{i}");
                match engine.claim(request(&key)).unwrap() {
                    ClaimOutcome::Claimed(lease) => {
                        let fence = lease.fencing_token();
                        lease.complete(response(&key)).unwrap();
                        println!("COMPLETED {key} {fence}");
                    }
                    other => println!("BAD {key} {other:?}"),
                }
            }
        }
        // Four threads: claims, completions, leases left open, and replays of earlier keys.
        "mixed" => {
            let threads: Vec<_> = (0..4)
                .map(|t| {
                    let (engine, prefix) = (engine.clone(), prefix.clone());
                    std::thread::spawn(move || {
                        let mut held = Vec::new();
                        for i in 0usize.. {
                            let key = format!("{prefix}-t{t}-{i}");
                            let lease = match engine.claim(request(&key)).unwrap() {
                                ClaimOutcome::Claimed(lease) => lease,
                                other => {
                                    println!("BAD {key} {other:?}");
                                    continue;
                                }
                            };
                            let fence = lease.fencing_token();
                            println!("CLAIMED {key} {fence}");
                            if i % 3 == 0 {
                                held.push(lease);
                            } else {
                                lease.complete(response(&key)).unwrap();
                                println!("COMPLETED {key} {fence}");
                            }
                            if i % 4 == 1 {
                                // An earlier key of this thread: completed or left open.
                                let j = i / 2;
                                let earlier = format!("{prefix}-t{t}-{j}");
                                match engine.claim(request(&earlier)).unwrap() {
                                    ClaimOutcome::Replay(r) if j % 3 != 0 => {
                                        if r != response(&earlier) {
                                            println!("BAD replay of {earlier}");
                                        }
                                    }
                                    ClaimOutcome::InFlight { .. } if j % 3 == 0 => {}
                                    other => println!("BAD {earlier} {other:?}"),
                                }
                            }
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
        }
        // One completion committed but never flushed (the syncer held), then the parent kills
        // the child in that window: the completion is in the WAL, in the page cache only.
        #[cfg(feature = "fault-injection")]
        "unflushed" => {
            let key = format!("{prefix}-unflushed");
            let ClaimOutcome::Claimed(lease) = engine.claim(request(&key)).unwrap() else {
                panic!("a fresh key was not claimed");
            };
            println!("CLAIMED {key} {}", lease.fencing_token());
            engine.inject_sync_pause(true);
            let completing = std::thread::spawn(move || lease.complete(response(&key)));
            support::wait_until_committed(Path::new(&path), &format!("{prefix}-unflushed"));
            println!("UNFLUSHED {prefix}-unflushed");
            let _ = completing.join();
            println!("BAD the completion was answered while its flush was held");
        }
        other => panic!("unknown child mode {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The parent

/// Kills the child if the test fails before it does.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a child acknowledged before it died.
#[derive(Default, Debug)]
struct Acks {
    claimed: BTreeMap<String, u64>,
    completed: BTreeMap<String, u64>,
    /// Completions the child saw committed while their flush was held (never acknowledged).
    unflushed: BTreeSet<String>,
    lines: usize,
}

impl Acks {
    fn take(&mut self, line: &str) {
        let mut words = line.split(' ');
        match (words.next(), words.next(), words.next()) {
            (Some("CLAIMED"), Some(key), Some(fence)) => {
                self.claimed.insert(key.to_owned(), fence.parse().unwrap());
                self.lines += 1;
            }
            (Some("COMPLETED"), Some(key), Some(fence)) => {
                self.completed
                    .insert(key.to_owned(), fence.parse().unwrap());
                self.claimed.insert(key.to_owned(), fence.parse().unwrap());
                self.lines += 1;
            }
            (Some("UNFLUSHED"), Some(key), None) => {
                self.unflushed.insert(key.to_owned());
                self.lines += 1;
            }
            (Some("BAD"), ..) => panic!("the child saw something wrong: {line}"),
            // The test harness's own output.
            _ => {}
        }
    }

    fn max_fence(&self) -> u64 {
        self.claimed.values().copied().max().unwrap_or(0)
    }
}

fn lines_of(child: &mut Child) -> Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Runs a child in `mode` against `db`, with its clock at `clock_ms`, and SIGKILLs it after
/// `kill_after` acknowledgements plus `spin` extra scheduler yields (so the kill lands at a
/// random point of an operation). Returns everything it acknowledged, including lines written
/// between the kill decision and its death.
fn run_child(
    mode: &str,
    db: &Path,
    clock_ms: i64,
    prefix: &str,
    kill_after: usize,
    spin: u32,
) -> Acks {
    let mut child = ChildGuard(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ENV_MODE, mode)
            .env(ENV_DB, db)
            .env(ENV_CLOCK, clock_ms.to_string())
            .env(ENV_PREFIX, prefix)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let lines = lines_of(&mut child.0);
    let mut acks = Acks::default();
    let patience = Duration::from_secs(120);
    loop {
        match lines.recv_timeout(patience) {
            Ok(line) => acks.take(&line),
            Err(RecvTimeoutError::Disconnected) => {
                panic!(
                    "the child exited before it was killed: {:?}",
                    child.0.wait()
                )
            }
            Err(RecvTimeoutError::Timeout) => panic!("the child made no progress for {patience:?}"),
        }
        if acks.lines >= kill_after {
            break;
        }
    }
    for _ in 0..spin {
        std::thread::yield_now();
    }
    child.0.kill().unwrap(); // SIGKILL on unix
    let status = child.0.wait().unwrap();
    assert!(
        !status.success(),
        "the child was supposed to die: {status:?}"
    );
    // Whatever it wrote before dying was acknowledged too.
    loop {
        match lines.recv_timeout(patience) {
            Ok(line) => acks.take(&line),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => panic!("stdout of the dead child never closed"),
        }
    }
    acks
}

fn integrity_ok(db: &Path) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let result: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(result, "ok");
}

/// The parent's checks after a kill, at the child's clock. Returns the keys left in flight,
/// which the parent then takes over once their lock has timed out.
fn check_after_kill(
    engine: &Engine,
    acks: &Acks,
    must_be_in_flight: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut in_flight = Vec::new();
    for key in acks.completed.keys() {
        match engine.claim(request(key)).unwrap() {
            ClaimOutcome::Replay(r) => assert_eq!(r, response(key), "{key}"),
            other => panic!("acknowledged completion of {key} lost: {other:?}"),
        }
    }
    for key in acks
        .claimed
        .keys()
        .filter(|k| !acks.completed.contains_key(*k))
    {
        match engine.claim(request(key)).unwrap() {
            ClaimOutcome::InFlight { retry_after } => {
                assert!(retry_after <= LOCK && retry_after > Duration::ZERO);
                in_flight.push(key.clone());
            }
            // The completion committed, but the child died before saying so.
            ClaimOutcome::Replay(r) if !must_be_in_flight(key) => {
                assert_eq!(r, response(key), "{key}")
            }
            other => panic!("orphaned lease of {key}: expected InFlight, got {other:?}"),
        }
    }
    in_flight
}

/// Moves the clock to the orphans' lock timeout and takes each of them over: the fencing token
/// must be larger than any the dead child acknowledged. Completes every other one; returns
/// those keys and the largest token handed out.
fn take_over(
    engine: &Engine,
    clock: &ManualClock,
    orphans: &[String],
    floor: u64,
) -> (Vec<String>, u64) {
    clock.advance(LOCK - Duration::from_millis(1));
    for key in orphans {
        assert!(
            matches!(
                engine.claim(request(key)).unwrap(),
                ClaimOutcome::InFlight { .. }
            ),
            "{key} claimable before its lock timed out"
        );
    }
    clock.advance(Duration::from_millis(1));
    let mut completed = Vec::new();
    let mut max = floor;
    for (i, key) in orphans.iter().enumerate() {
        match engine.claim(request(key)).unwrap() {
            ClaimOutcome::Claimed(lease) => {
                max = max.max(lease.fencing_token());
                assert!(
                    lease.fencing_token() > floor,
                    "{key}: token {} not above {floor}",
                    lease.fencing_token()
                );
                if i % 2 == 0 {
                    lease.complete(response(key)).unwrap();
                    completed.push(key.clone());
                } else {
                    lease.release().unwrap();
                }
            }
            other => panic!("{key}: expected a takeover after the lock timeout, got {other:?}"),
        }
    }
    (completed, max)
}

#[test]
fn orphaned_claims_are_in_flight_until_their_lock_times_out() {
    let mut rng = support::Rng::from_env("IDEM_CRASH_SEED");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    let acks = run_child(
        "claims",
        &db,
        T0,
        "c",
        1 + rng.below(200) as usize,
        rng.below(3000) as u32,
    );
    assert!(!acks.claimed.is_empty());
    integrity_ok(&db);
    let clock = Arc::new(ManualClock::new(T0));
    let engine = Engine::open(config(&db, &clock)).unwrap();
    let orphans = check_after_kill(&engine, &acks, |_| true);
    assert_eq!(orphans.len(), acks.claimed.len());
    take_over(&engine, &clock, &orphans, acks.max_fence());
    engine.shutdown().unwrap();
    integrity_ok(&db);
}

#[test]
fn acknowledged_completions_survive_a_kill() {
    let mut rng = support::Rng::from_env("IDEM_CRASH_SEED");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    let acks = run_child(
        "completions",
        &db,
        T0,
        "d",
        1 + rng.below(100) as usize,
        rng.below(3000) as u32,
    );
    assert!(!acks.completed.is_empty());
    integrity_ok(&db);
    let clock = Arc::new(ManualClock::new(T0));
    let engine = Engine::open(config(&db, &clock)).unwrap();
    check_after_kill(&engine, &acks, |_| false);
    // The key after the last acknowledged one: absent, in flight or completed, never anything
    // else; and a fresh claim gets a larger token than any the child had.
    let next = format!("d-{}", acks.completed.len());
    match engine.claim(request(&next)).unwrap() {
        ClaimOutcome::Claimed(lease) => {
            assert!(lease.fencing_token() > acks.max_fence());
            lease.release().unwrap();
        }
        ClaimOutcome::InFlight { .. } => {}
        ClaimOutcome::Replay(r) => assert_eq!(r, response(&next)),
        ClaimOutcome::Mismatch => panic!("{next}: mismatch"),
    }
    let lease = match engine.claim(request("fresh")).unwrap() {
        ClaimOutcome::Claimed(lease) => lease,
        other => panic!("{other:?}"),
    };
    assert!(lease.fencing_token() > acks.max_fence());
    lease.release().unwrap();
    engine.shutdown().unwrap();
    integrity_ok(&db);
}

#[test]
fn repeated_kills_during_concurrent_claims_and_completions() {
    const ITERATIONS: usize = 10;
    let mut rng = support::Rng::from_env("IDEM_CRASH_SEED");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    let clock = Arc::new(ManualClock::new(T0));
    // Every key known to be completed, across all iterations.
    let mut completed: BTreeSet<String> = BTreeSet::new();
    let mut floor = 0;
    for it in 0..ITERATIONS {
        let prefix = format!("i{it}");
        let acks = run_child(
            "mixed",
            &db,
            {
                use idempotency_rs::Clock;
                clock.now_ms()
            },
            &prefix,
            1 + rng.below(300) as usize,
            rng.below(5000) as u32,
        );
        integrity_ok(&db);
        let engine = Engine::open(config(&db, &clock)).unwrap();
        // Keys the child meant to leave open (every third of each thread) are in flight;
        // others may have completed without an acknowledgement.
        let held = |key: &str| key.rsplit('-').next().unwrap().parse::<usize>().unwrap() % 3 == 0;
        let orphans = check_after_kill(&engine, &acks, held);
        // Everything completed in earlier iterations still replays.
        for key in &completed {
            match engine.claim(request(key)).unwrap() {
                ClaimOutcome::Replay(r) => assert_eq!(r, response(key), "{key}"),
                other => panic!("iteration {it}: {key} no longer replays: {other:?}"),
            }
        }
        // The child's tokens continue above everything handed out before it started.
        if let Some(lowest) = acks.claimed.values().min() {
            assert!(
                *lowest > floor,
                "iteration {it}: token {lowest} not above {floor}"
            );
        }
        floor = floor.max(acks.max_fence());
        completed.extend(acks.completed.keys().cloned());
        let (taken, max) = take_over(&engine, &clock, &orphans, floor);
        completed.extend(taken);
        floor = max;
        engine.shutdown().unwrap();
        drop(engine);
        integrity_ok(&db);
        eprintln!(
            "iteration {it}: {} claims, {} completions acknowledged, {} orphans taken over",
            acks.claimed.len(),
            acks.completed.len(),
            orphans.len()
        );
    }
}

/// Runs a child in `unflushed` mode on `db` and kills it once its completion is committed but
/// held back from its flush: returns that completion's key, which the child never acknowledged.
#[cfg(feature = "fault-injection")]
fn kill_with_an_unflushed_completion(db: &Path, prefix: &str) -> String {
    let acks = run_child("unflushed", db, T0, prefix, 2, 0);
    assert!(acks.completed.is_empty(), "{acks:?}");
    acks.unflushed
        .into_iter()
        .next()
        .expect("no unflushed completion")
}

/// Issue #13, item 1. A completion committed but not yet flushed when its process is killed is
/// in the WAL in the OS page cache only, where a new engine reads it as if it were on disk. The
/// reopened engine must not answer anything (a replay of it in particular) before it has made
/// it durable: `Engine::open` checkpoints the WAL into the database file (which writes and
/// flushes every page) before it returns, and an open whose flush fails returns the error
/// instead of an engine. Before the fix the reopened engine replayed the record at once, from
/// the page cache, with the WAL untouched.
#[cfg(feature = "fault-injection")]
#[test]
fn a_completion_unflushed_at_a_kill_is_made_durable_before_the_reopened_engine_answers() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("unflushed.db");
    let key = kill_with_an_unflushed_completion(&db, "u");
    let mut wal = db.clone().into_os_string();
    wal.push("-wal");
    let wal_len = || std::fs::metadata(&wal).map_or(0, |m| m.len());
    assert!(wal_len() > 0, "the killed child left no WAL");

    // An engine that cannot flush what it would read does not open, and so answers nothing.
    let clock = Arc::new(ManualClock::new(T0));
    match Engine::open(config(&db, &clock).inject_open_sync_failure()) {
        Err(idempotency_rs::Error::SyncFailed { .. }) => {}
        other => panic!("expected SyncFailed, got {other:?}"),
    }
    assert!(wal_len() > 0, "the failed open changed the WAL");

    // A real open: by the time it returns, every frame of the WAL is in the flushed database
    // file (the WAL is empty), and only then is the completion replayed.
    let engine = Engine::open(config(&db, &clock)).unwrap();
    assert_eq!(
        wal_len(),
        0,
        "Engine::open answered with frames not checkpointed"
    );
    match engine.claim(request(&key)).unwrap() {
        ClaimOutcome::Replay(r) => assert_eq!(r, response(&key)),
        other => panic!("{key}: {other:?}"),
    }
    engine.shutdown().unwrap();
    integrity_ok(&db);
}

/// The same kill, then a reader of another process (here, another connection) holds a snapshot
/// while the engine opens: the checkpoint cannot rewind the WAL, so `open` writes the WAL back
/// over itself and flushes it instead (its fallback), and still answers only after that.
#[cfg(feature = "fault-injection")]
#[test]
fn a_reader_holding_a_snapshot_at_open_does_not_stop_the_flush() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("unflushed.db");
    let key = kill_with_an_unflushed_completion(&db, "r");
    let reader =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let n: i64 = reader
        .query_row("SELECT count(*) FROM idempotency_records", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    let clock = Arc::new(ManualClock::new(T0));
    let engine = Engine::open(config(&db, &clock)).unwrap();
    match engine.claim(request(&key)).unwrap() {
        ClaimOutcome::Replay(r) => assert_eq!(r, response(&key)),
        other => panic!("{key}: {other:?}"),
    }
    reader.execute_batch("COMMIT").unwrap();
    drop(reader);
    engine.shutdown().unwrap();
    integrity_ok(&db);
}
