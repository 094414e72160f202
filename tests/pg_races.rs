//! A black-box review of the PostgreSQL store: several instances (threads and processes)
//! racing on the same keys, takeovers and releases racing with late completions, connections
//! terminated under load, a child instance killed with SIGKILL, instances with different
//! clocks, replay-cache coherence after an operator's forget, and corrupt or oversized rows
//! written by hand. Each test has a schema of its own, dropped at its end.
#![cfg(feature = "postgres")]

mod pg;
mod support;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use idempotency_rs::admin::Change;
use idempotency_rs::{
    ClaimOutcome, ClaimRequest, Engine, EngineConfig, Error, Fingerprint, IdempotencyKey,
    ManualClock, StoredResponse,
};
use parking_lot::Mutex;
use support::{claimed, replayed, request};

/// A fresh table whose schema is dropped when the guard goes (declare it before the engines,
/// so that it drops after them).
struct Table {
    name: String,
}

impl Table {
    fn new() -> Table {
        Table {
            name: pg::fresh_table(),
        }
    }

    fn schema(&self) -> &str {
        self.name.split('.').next().unwrap()
    }

    /// A configuration on this table, its connections named `app`.
    fn config(&self, app: &str) -> EngineConfig {
        EngineConfig::postgres(pg::url_with(&format!("application_name={app}")))
            .table(self.name.clone())
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        let schema = self.schema().to_owned();
        // Connections of engines still closing may hold locks for a moment.
        let _ = std::panic::catch_unwind(|| {
            pg::execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        });
    }
}

fn app(name: &str) -> String {
    format!("review_{}_{name}", std::process::id())
}

fn open(config: EngineConfig) -> Engine {
    Engine::open(config).unwrap()
}

fn is_transient(e: &Error) -> bool {
    matches!(
        e,
        Error::Busy | Error::Unavailable { .. } | Error::Overloaded { .. }
    )
}

// ---------------------------------------------------------------------------------------------
// Races across instances.
// ---------------------------------------------------------------------------------------------

/// Four engines on one table (with and without read connections), 100 threads per key racing
/// on the same keys: exactly one claim wins each key, and every loser ends with the winner's
/// response.
#[test]
fn hundred_way_races_across_four_instances_run_each_key_once() {
    let table = Table::new();
    let engines: Vec<Engine> = (0..4)
        .map(|i| {
            open(
                table
                    .config(&app("race"))
                    .pool_size(if i % 2 == 0 { 1 } else { 4 })
                    .lock_timeout(Duration::from_secs(30)),
            )
        })
        .collect();
    for round in 0..3 {
        let key = format!("race-{round}");
        let barrier = Arc::new(Barrier::new(100));
        let wins = Arc::new(AtomicUsize::new(0));
        let transient = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..100)
            .map(|t| {
                let engine = engines[t % 4].clone();
                let (barrier, wins, transient, key) = (
                    barrier.clone(),
                    wins.clone(),
                    transient.clone(),
                    key.clone(),
                );
                std::thread::spawn(move || {
                    barrier.wait();
                    let deadline = Instant::now() + Duration::from_secs(20);
                    loop {
                        assert!(Instant::now() < deadline, "{key}: no answer in 20 s");
                        match engine.claim(request(&key)) {
                            Ok(ClaimOutcome::Claimed(lease)) => {
                                wins.fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(Duration::from_millis(50));
                                lease
                                    .complete(StoredResponse::new(201, format!("winner-{t}")))
                                    .unwrap();
                            }
                            Ok(ClaimOutcome::Replay(r)) => return r.body,
                            Ok(ClaimOutcome::InFlight { .. }) => {
                                std::thread::sleep(Duration::from_millis(10))
                            }
                            Ok(ClaimOutcome::Mismatch) => panic!("{key}: a mismatch"),
                            Err(e) if is_transient(&e) => {
                                transient.fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            Err(e) => panic!("{key}: {e:?}"),
                        }
                    }
                })
            })
            .collect();
        let bodies: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(
            wins.load(Ordering::SeqCst),
            1,
            "{key}: claimed more than once across instances"
        );
        let first = &bodies[0];
        assert!(
            bodies.iter().all(|b| b == first),
            "{key}: callers got different responses"
        );
        eprintln!(
            "{key}: transient errors {}",
            transient.load(Ordering::SeqCst)
        );
    }
}

/// A lease whose lock timed out is taken over by another instance while its holder still
/// runs; then both complete, in either order or at once. The taker's completion must win, the
/// first holder's must be refused with `LeaseLost`, and every instance must replay the taker's
/// response.
#[test]
fn a_takeover_and_a_late_completion_exactly_one_wins() {
    let table = Table::new();
    let config = table
        .config(&app("takeover"))
        .lock_timeout(Duration::from_millis(200));
    let a = open(config.clone());
    let b = open(config.clone());
    for i in 0..9 {
        let key = format!("t{i}");
        let first = claimed(a.claim(request(&key)).unwrap());
        std::thread::sleep(Duration::from_millis(260));
        let second = match b.claim(request(&key)).unwrap() {
            ClaimOutcome::Claimed(l) => l,
            other => panic!("{key}: no takeover after the lock timeout: {other:?}"),
        };
        assert!(second.fencing_token() > first.fencing_token());
        let (ra, rb) = match i % 3 {
            0 => {
                let ra = first.complete(StoredResponse::new(200, "A"));
                let rb = second.complete(StoredResponse::new(201, "B"));
                (ra, rb)
            }
            1 => {
                let rb = second.complete(StoredResponse::new(201, "B"));
                let ra = first.complete(StoredResponse::new(200, "A"));
                (ra, rb)
            }
            _ => {
                let barrier = Arc::new(Barrier::new(2));
                let b2 = barrier.clone();
                let ha = std::thread::spawn(move || {
                    b2.wait();
                    first.complete(StoredResponse::new(200, "A"))
                });
                barrier.wait();
                let rb = second.complete(StoredResponse::new(201, "B"));
                (ha.join().unwrap(), rb)
            }
        };
        assert!(
            matches!(ra, Err(Error::LeaseLost)),
            "{key}: the first holder's completion after a takeover: {ra:?}"
        );
        assert!(rb.is_ok(), "{key}: the taker's completion: {rb:?}");
        for (name, e) in [("a", &a), ("b", &b)] {
            let r = replayed(e.claim(request(&key)).unwrap());
            assert_eq!(
                r.body, b"B",
                "{key}: instance {name} replays the loser's response"
            );
        }
    }
    let fresh = open(config.pool_size(1));
    for i in 0..9 {
        assert_eq!(
            replayed(fresh.claim(request(&format!("t{i}"))).unwrap()).body,
            b"B"
        );
    }
}

/// A release by the first holder races with a takeover by another instance: whichever goes
/// first, the taker holds the key (Claimed), and its completion is the one replayed.
#[test]
fn a_release_racing_a_takeover_leaves_the_taker_in_charge() {
    let table = Table::new();
    let config = table
        .config(&app("release"))
        .lock_timeout(Duration::from_millis(150));
    let a = open(config.clone());
    let b = open(config);
    let mut released_first = 0;
    for i in 0..12 {
        let key = format!("r{i}");
        let first = claimed(a.claim(request(&key)).unwrap());
        std::thread::sleep(Duration::from_millis(200));
        let barrier = Arc::new(Barrier::new(2));
        let b2 = barrier.clone();
        let h = std::thread::spawn(move || {
            b2.wait();
            // The takeover goes through a read connection first: give it a head start on
            // some rounds, so that both orders happen.
            std::thread::sleep(Duration::from_millis((i % 4) as u64 * 2));
            first.release()
        });
        barrier.wait();
        let taken = b.claim(request(&key)).unwrap();
        let released = h.join().unwrap();
        let lease = match taken {
            ClaimOutcome::Claimed(l) => l,
            other => panic!("{key}: the taker did not get the key ({released:?}): {other:?}"),
        };
        match &released {
            Ok(()) => released_first += 1,
            Err(Error::LeaseLost) => {}
            Err(e) => panic!("{key}: release: {e:?}"),
        }
        lease
            .complete(StoredResponse::new(201, "taker"))
            .unwrap_or_else(|e| panic!("{key}: the taker's completion ({released:?}): {e:?}"));
        assert_eq!(replayed(a.claim(request(&key)).unwrap()).body, b"taker");
    }
    eprintln!("releases first: {released_first}/12");
}

/// An operator's force-release through one instance races with the holder's completion on
/// another: the two answers must agree with each other and with what is replayed next.
#[test]
fn a_force_release_racing_a_completion_agrees_with_the_store() {
    let table = Table::new();
    let config = table.config(&app("force"));
    let a = open(config.clone());
    let b = open(config);
    for i in 0..12 {
        let key = format!("f{i}");
        let lease = claimed(a.claim(request(&key)).unwrap());
        let fence = lease.fencing_token();
        let barrier = Arc::new(Barrier::new(2));
        let b2 = barrier.clone();
        let h = std::thread::spawn(move || {
            b2.wait();
            lease.complete(StoredResponse::new(201, "done"))
        });
        barrier.wait();
        let change = b.force_release("s", &key, fence).unwrap();
        let completed = h.join().unwrap();
        match (&change, &completed) {
            (Change::Done, Err(Error::LeaseLost)) => {
                claimed(b.claim(request(&key)).unwrap()).release().unwrap();
            }
            (Change::Completed, Ok(())) => {
                assert_eq!(replayed(b.claim(request(&key)).unwrap()).body, b"done");
            }
            other => panic!("{key}: force-release and completion disagree: {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Replay cache coherence.
// ---------------------------------------------------------------------------------------------

/// Instance A replays (and caches) a record; an operator forgets it through instance B. A may
/// replay it for at most `replay_cache_max_age`; after that a claim on A runs the operation.
#[test]
fn a_record_forgotten_through_another_instance_stops_replaying_within_the_max_age() {
    let table = Table::new();
    let config = table.config(&app("forget"));
    let max_age = Duration::from_millis(600);
    let a = open(config.clone().replay_cache_max_age(max_age));
    let b = open(config);
    claimed(b.claim(request("k")).unwrap())
        .complete(StoredResponse::new(201, "old"))
        .unwrap();
    for _ in 0..3 {
        assert_eq!(replayed(a.claim(request("k")).unwrap()).body, b"old");
    }
    assert_eq!(b.forget("s", "k").unwrap(), Change::Done);
    let forgotten = Instant::now();
    std::thread::sleep(max_age + Duration::from_millis(300));
    match a.claim(request("k")).unwrap() {
        ClaimOutcome::Claimed(l) => l.release().unwrap(),
        other => panic!(
            "instance A still answers a record deleted {:?} ago (max age {max_age:?}): {other:?}",
            forgotten.elapsed()
        ),
    }
}

/// `Engine::forget` documents: "This engine stops replaying it at once (its replay cache
/// included)". When another instance already deleted the record, the forget on this instance
/// finds nothing to delete, but this instance must still stop replaying it.
#[test]
fn forget_on_an_instance_stops_its_cached_replays_even_when_another_deleted_first() {
    let table = Table::new();
    let config = table.config(&app("forget2"));
    let a = open(config.clone().replay_cache_max_age(Duration::from_secs(30)));
    let b = open(config);
    claimed(b.claim(request("k")).unwrap())
        .complete(StoredResponse::new(201, "old"))
        .unwrap();
    for _ in 0..3 {
        assert_eq!(replayed(a.claim(request("k")).unwrap()).body, b"old");
    }
    assert_eq!(b.forget("s", "k").unwrap(), Change::Done);
    let change = a.forget("s", "k").unwrap();
    match a.claim(request("k")).unwrap() {
        ClaimOutcome::Claimed(l) => l.release().unwrap(),
        other => panic!(
            "after A.forget(..) returned {change:?} (the record is gone from the store), A still \
             answers from its replay cache: {other:?}"
        ),
    }
}

/// An instance whose own clock is frozen (a `ManualClock` that never moves) beside one on the
/// real clock: expiry is the server's, so a replay it cached must stop when the record
/// expires on the server, a lock it reports must be about the lock timeout, and its late
/// completion after a takeover is refused.
#[test]
fn an_instance_with_a_frozen_clock_neither_replays_past_expiry_nor_keeps_a_lost_lease() {
    let table = Table::new();
    let frozen = Arc::new(ManualClock::new(1_000_000));
    let config = table.config(&app("clock"));
    let a = open(
        config
            .clone()
            .clock(frozen.clone())
            .replay_cache_max_age(Duration::from_secs(60)),
    );
    let b = open(config.clone());
    // Retention 1 s: A caches the replay, then the record expires on the server.
    let short = request("short").retention(Duration::from_secs(1));
    claimed(b.claim(short.clone()).unwrap())
        .complete(StoredResponse::new(201, "short"))
        .unwrap();
    for _ in 0..3 {
        assert_eq!(replayed(a.claim(short.clone()).unwrap()).body, b"short");
    }
    std::thread::sleep(Duration::from_millis(1300));
    match a.claim(short.clone()).unwrap() {
        ClaimOutcome::Claimed(l) => l.release().unwrap(),
        other => panic!("a replay past the record's expiry on the server: {other:?}"),
    }
    // A lock held by B: A's retry hint is about B's lock timeout.
    let held = claimed(
        b.claim(request("held").lock_timeout(Duration::from_secs(2)))
            .unwrap(),
    );
    match a.claim(request("held")).unwrap() {
        ClaimOutcome::InFlight { retry_after } => assert!(
            retry_after > Duration::from_millis(1000) && retry_after <= Duration::from_secs(2),
            "retry_after {retry_after:?} for a 2 s lock"
        ),
        other => panic!("{other:?}"),
    }
    held.release().unwrap();
    // A's own lease: taken over by B after the lock timeout (server's clock), not before.
    let mine = claimed(
        a.claim(request("mine").lock_timeout(Duration::from_millis(800)))
            .unwrap(),
    );
    let left = mine
        .locked_until()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 1_000_000;
    assert!((500..=900).contains(&left), "{left} ms left in A's clock");
    assert!(matches!(
        b.claim(request("mine")).unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    std::thread::sleep(Duration::from_millis(1000));
    let theirs = claimed(b.claim(request("mine")).unwrap());
    assert!(matches!(
        mine.complete(StoredResponse::new(200, "A")),
        Err(Error::LeaseLost)
    ));
    theirs.complete(StoredResponse::new(201, "B")).unwrap();
    assert_eq!(replayed(a.claim(request("mine")).unwrap()).body, b"B");
    // Moving A's clock does not move the server's decisions.
    frozen.advance(Duration::from_secs(3600));
    assert_eq!(replayed(a.claim(request("mine")).unwrap()).body, b"B");
}

/// An extension on one instance keeps another instance out past the original lock timeout.
#[test]
fn an_extension_keeps_other_instances_out() {
    let table = Table::new();
    let config = table
        .config(&app("extend"))
        .lock_timeout(Duration::from_millis(300));
    let a = open(config.clone());
    let b = open(config);
    let mut lease = claimed(a.claim(request("x")).unwrap());
    std::thread::sleep(Duration::from_millis(150));
    lease.extend(Duration::from_secs(2)).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    match b.claim(request("x")).unwrap() {
        ClaimOutcome::InFlight { retry_after } => assert!(
            retry_after > Duration::from_millis(1000),
            "retry_after {retry_after:?} after a 2 s extension"
        ),
        other => panic!("another instance took an extended lease: {other:?}"),
    }
    lease.complete(StoredResponse::new(201, "x")).unwrap();
    assert_eq!(replayed(b.claim(request("x")).unwrap()).body, b"x");
}

// ---------------------------------------------------------------------------------------------
// Connections terminated under load.
// ---------------------------------------------------------------------------------------------

/// Two instances work through the same 240 keys while every backend of one of them is
/// terminated every few tens of milliseconds. No key may be claimed twice (the lock timeout is
/// long), no call may take much longer than the statement timeout, and every completion that
/// was acknowledged must replay, through both instances and through a fresh one.
#[test]
fn backends_terminated_under_load_lose_no_acknowledged_completion() {
    let table = Table::new();
    let victim_app = app("victim");
    let timeout = Duration::from_secs(2);
    let base = table
        .config(&app("steady"))
        .statement_timeout(timeout)
        .lock_timeout(Duration::from_secs(60));
    let victim = open(
        table
            .config(&victim_app)
            .statement_timeout(timeout)
            .lock_timeout(Duration::from_secs(60))
            .pool_size(3),
    );
    let steady = open(base.clone());
    // Every write to the table takes a few ms more, so that terminations land mid-batch too.
    pg::execute(&format!(
        "CREATE FUNCTION \"{schema}\".slow() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_sleep(0.003); RETURN NEW; END $$;
         CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON {t}
           FOR EACH ROW EXECUTE FUNCTION \"{schema}\".slow()",
        schema = table.schema(),
        t = table.name
    ));
    let keys: Vec<String> = (0..600).map(|i| format!("k{i}")).collect();
    let until = Instant::now() + Duration::from_secs(6);
    let claims: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let failed: Arc<Mutex<Vec<(String, Error)>>> = Arc::default();
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let stop = Arc::new(AtomicBool::new(false));
    let terminated = Arc::new(AtomicUsize::new(0));
    let killer = {
        let (stop, terminated, victim_app) = (stop.clone(), terminated.clone(), victim_app.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let n = pg::query(&format!(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE application_name = '{victim_app}'"
                ));
                terminated.fetch_add(
                    n[0].as_deref().unwrap_or("0").parse().unwrap_or(0),
                    Ordering::SeqCst,
                );
                std::thread::sleep(Duration::from_millis(25));
            }
        })
    };
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let engine = if w < 4 {
                victim.clone()
            } else {
                steady.clone()
            };
            let mut order = keys.clone();
            order.rotate_left(w * 100);
            let (claims, acked, slowest) = (claims.clone(), acked.clone(), slowest.clone());
            let failed = failed.clone();
            std::thread::spawn(move || {
                for key in order {
                    if Instant::now() > until {
                        break;
                    }
                    let started = Instant::now();
                    let outcome = engine.claim(request(&key));
                    let took = started.elapsed();
                    {
                        let mut s = slowest.lock();
                        *s = (*s).max(took);
                    }
                    if let Ok(ClaimOutcome::Claimed(lease)) = outcome {
                        *claims.lock().entry(key.clone()).or_default() += 1;
                        let started = Instant::now();
                        let done = lease.complete(StoredResponse::new(201, key.clone()));
                        let took = started.elapsed();
                        let mut s = slowest.lock();
                        *s = (*s).max(took);
                        match done {
                            Ok(()) => {
                                acked.lock().insert(key.clone());
                            }
                            Err(e) => {
                                failed.lock().push((key.clone(), e));
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    killer.join().unwrap();
    let claims = claims.lock().clone();
    let acked = acked.lock().clone();
    eprintln!(
        "terminated {} backends; {} keys claimed, {} completions acknowledged; slowest call {:?}",
        terminated.load(Ordering::SeqCst),
        claims.len(),
        acked.len(),
        *slowest.lock()
    );
    let twice: Vec<_> = claims.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "keys claimed twice: {twice:?}");
    assert!(
        *slowest.lock() < timeout * 3 + Duration::from_secs(2),
        "a call took {:?} (statement timeout {timeout:?})",
        *slowest.lock()
    );
    assert!(!acked.is_empty(), "nothing was acknowledged at all");
    let fresh = open(base.pool_size(1).replay_cache_bytes(0));
    // A completion that failed: never `LeaseLost` (nobody could take the key over), and its
    // record is either completed (an unknown outcome that did commit) or still in flight: a
    // record that is gone would mean the lease was granted by a claim that did not commit.
    let failed = failed.lock().clone();
    for (key, e) in &failed {
        assert!(
            !matches!(e, Error::LeaseLost),
            "{key}: a completion under a live 60 s lock got LeaseLost"
        );
        match fresh.claim(request(key)) {
            Ok(ClaimOutcome::InFlight { .. }) => {}
            Ok(ClaimOutcome::Replay(r)) => assert_eq!(r.body, key.as_bytes()),
            other => panic!(
                "{key}: its lease was granted, its completion failed ({e:?}), and now: {other:?}"
            ),
        }
    }
    eprintln!(
        "failed completions: {} ({:?})",
        failed.len(),
        failed.iter().map(|(_, e)| e.kind()).collect::<HashSet<_>>()
    );
    // A batch cut off without an answer runs its lease commands again on a new connection and
    // looks at their records (`PgBackend::after_unknown`); before, every completion of such a
    // batch failed with an unknown outcome (155 of 578 here), its key held until the lock
    // timed out and its operation then run again. Now only one whose second run is cut off
    // too may fail.
    assert!(
        failed.len() * 20 <= claims.len(),
        "{} of {} completions failed with an unknown outcome",
        failed.len(),
        claims.len()
    );
    for key in &acked {
        for (name, e) in [("fresh", &fresh), ("steady", &steady), ("victim", &victim)] {
            let mut tries = 0;
            loop {
                match e.claim(request(key)) {
                    Ok(ClaimOutcome::Replay(r)) => {
                        assert_eq!(r.body, key.as_bytes(), "{name}: {key}");
                        break;
                    }
                    Err(err) if is_transient(&err) && tries < 20 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    other => panic!(
                        "{name}: the acknowledged completion of {key} does not replay: {other:?}"
                    ),
                }
            }
        }
    }
}

/// A session holds the table exclusively for 3 s: every call on an engine with a 500 ms
/// statement timeout returns within a bound (an error is fine), and all is well after.
#[test]
fn a_table_locked_by_another_session_makes_calls_fail_not_hang() {
    let table = Table::new();
    let timeout = Duration::from_millis(500);
    let engine = open(
        table
            .config(&app("locked"))
            .statement_timeout(timeout)
            .lock_timeout(Duration::from_secs(60)),
    );
    claimed(engine.claim(request("done")).unwrap())
        .complete(StoredResponse::new(201, "done"))
        .unwrap();
    let held = claimed(engine.claim(request("held")).unwrap());
    let session = pg::Session::new();
    session
        .exec(&format!(
            "BEGIN; LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
            table.name
        ))
        .unwrap();
    let bound = Duration::from_secs(6);
    let timed = |what: &str, f: &mut dyn FnMut() -> String| {
        let started = Instant::now();
        let out = f();
        let took = started.elapsed();
        assert!(took < bound, "{what} took {took:?} ({out})");
        eprintln!("{what}: {took:?}: {out}");
    };
    let engine2 = engine.clone();
    let fresh_claim = std::thread::spawn(move || {
        let started = Instant::now();
        let out = format!(
            "{:?}",
            engine2
                .claim(request("fresh"))
                .map(|o| o.release_if_claimed())
        );
        (started.elapsed(), out)
    });
    timed("a claim of a new key", &mut || {
        format!(
            "{:?}",
            engine.claim(request("new")).map(|o| o.release_if_claimed())
        )
    });
    let mut held = Some(held);
    timed("a completion", &mut || {
        format!(
            "{:?}",
            held.take()
                .unwrap()
                .complete(StoredResponse::new(201, "held"))
        )
    });
    let (took, out) = fresh_claim.join().unwrap();
    assert!(took < bound, "a concurrent claim took {took:?} ({out})");
    session.exec("ROLLBACK").unwrap();
    assert_eq!(
        replayed(engine.claim(request("done")).unwrap()).body,
        b"done"
    );
}

/// Whether a claim won (its lease is released at once).
trait ReleaseIfClaimed {
    fn release_if_claimed(self) -> bool;
}

impl ReleaseIfClaimed for ClaimOutcome {
    fn release_if_claimed(self) -> bool {
        match self {
            ClaimOutcome::Claimed(l) => {
                let _ = l.release();
                true
            }
            _ => false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Instances in other processes.
// ---------------------------------------------------------------------------------------------

const ENV_MODE: &str = "IDEM_REVIEW_CHILD";
const ENV_TABLE: &str = "IDEM_REVIEW_TABLE";
const ENV_START: &str = "IDEM_REVIEW_START_MS";

/// Run by the tests below in a child process; does nothing in a normal run.
#[test]
#[ignore = "run by the tests of this file in a child process"]
fn review_child() {
    let Ok(mode) = std::env::var(ENV_MODE) else {
        return;
    };
    let table = std::env::var(ENV_TABLE).unwrap();
    let config = EngineConfig::postgres(pg::url_with("application_name=review_child"))
        .table(table)
        .lock_timeout(Duration::from_secs(1));
    let engine = Engine::open(config).unwrap();
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let say = |out: &Mutex<std::io::Stdout>, line: String| {
        use std::io::Write;
        let mut o = out.lock();
        writeln!(o, "{line}").unwrap();
        o.flush().unwrap();
    };
    match mode.as_str() {
        // 33 threads race on 10 keys, all starting at the same wall-clock moment as the other
        // processes'.
        "race" => {
            let start: i64 = std::env::var(ENV_START).unwrap().parse().unwrap();
            let now = idempotency_rs::Clock::now_ms(&idempotency_rs::SystemClock);
            if start > now {
                std::thread::sleep(Duration::from_millis((start - now) as u64));
            }
            let pid = std::process::id();
            let handles: Vec<_> = (0..33)
                .map(|t| {
                    let (engine, out) = (engine.clone(), out.clone());
                    std::thread::spawn(move || {
                        for k in 0..10 {
                            let key = format!("p{k}");
                            loop {
                                match engine.claim(request(&key)) {
                                    Ok(ClaimOutcome::Claimed(l)) => {
                                        say(&out, format!("claimed {key}"));
                                        std::thread::sleep(Duration::from_millis(20));
                                        l.complete(StoredResponse::new(201, format!("{pid}-{t}")))
                                            .unwrap();
                                    }
                                    Ok(ClaimOutcome::Replay(r)) => {
                                        say(
                                            &out,
                                            format!(
                                                "replay {key} {}",
                                                String::from_utf8(r.body).unwrap()
                                            ),
                                        );
                                        break;
                                    }
                                    Ok(ClaimOutcome::InFlight { .. }) => {
                                        std::thread::sleep(Duration::from_millis(5))
                                    }
                                    Ok(ClaimOutcome::Mismatch) => panic!("mismatch"),
                                    Err(e) if is_transient(&e) => {
                                        say(&out, format!("transient {e}"));
                                        std::thread::sleep(Duration::from_millis(5));
                                    }
                                    Err(e) => panic!("{e:?}"),
                                }
                            }
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            say(&out, "finished".into());
        }
        // Holds ten leases, then completes keys as fast as it can, saying which completions
        // were acknowledged, until it is killed.
        "complete" => {
            let held: Vec<_> = (0..10)
                .map(|i| claimed(engine.claim(request(&format!("held{i}"))).unwrap()))
                .collect();
            for l in &held {
                say(&out, format!("held {} {}", l.key(), l.fencing_token()));
            }
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let (engine, out) = (engine.clone(), out.clone());
                    std::thread::spawn(move || {
                        for i in 0.. {
                            let key = format!("c{t}-{i}");
                            say(&out, format!("claiming {key}"));
                            let l = claimed(engine.claim(request(&key)).unwrap());
                            l.complete(StoredResponse::new(201, key.clone())).unwrap();
                            say(&out, format!("acked {key}"));
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            drop(held);
        }
        other => panic!("unknown mode {other}"),
    }
}

fn child(mode: &str, table: &str, start_ms: i64) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "review_child", "--ignored", "--nocapture"])
        .env(ENV_MODE, mode)
        .env(ENV_TABLE, table)
        .env(ENV_START, start_ms.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Three processes with 33 threads each race on ten keys: each key is claimed once in all,
/// and every caller everywhere replays the same response.
#[test]
fn hundred_way_races_across_three_processes_run_each_key_once() {
    let table = Table::new();
    // Create the table first, so that the children do not all migrate at the start.
    drop(open(table.config(&app("procs"))));
    let start = idempotency_rs::Clock::now_ms(&idempotency_rs::SystemClock) + 1500;
    let children: Vec<_> = (0..3).map(|_| child("race", &table.name, start)).collect();
    let mut claimed_keys: HashMap<String, usize> = HashMap::new();
    let mut replays: HashMap<String, HashSet<String>> = HashMap::new();
    let mut transient = 0;
    for mut c in children {
        let stdout = c.stdout.take().unwrap();
        let mut finished = false;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let parts: Vec<&str> = line.split(' ').collect();
            match parts[0] {
                "claimed" => *claimed_keys.entry(parts[1].to_owned()).or_default() += 1,
                "replay" => {
                    replays
                        .entry(parts[1].to_owned())
                        .or_default()
                        .insert(parts[2].to_owned());
                }
                "transient" => transient += 1,
                "finished" => finished = true,
                _ => {}
            }
        }
        assert!(c.wait().unwrap().success());
        assert!(finished, "a child did not finish");
    }
    eprintln!("transient errors: {transient}");
    for k in 0..10 {
        let key = format!("p{k}");
        assert_eq!(
            claimed_keys.get(&key).copied().unwrap_or(0),
            1,
            "{key} claimed {:?} times across processes",
            claimed_keys.get(&key)
        );
        assert_eq!(
            replays.get(&key).map(HashSet::len),
            Some(1),
            "{key}: different responses replayed: {:?}",
            replays.get(&key)
        );
    }
}

/// A child instance holding ten leases and completing keys as fast as it can is killed with
/// SIGKILL. Every completion it acknowledged replays here; the leases it held are in flight
/// until their lock timeout (1 s), then taken over with larger tokens; no key is left stuck.
#[test]
fn an_instance_killed_mid_batch_loses_no_acknowledged_completion() {
    let table = Table::new();
    let engine = open(
        table
            .config(&app("killed"))
            .lock_timeout(Duration::from_secs(1))
            .pool_size(1),
    );
    let mut c = child("complete", &table.name, 0);
    let stdout = c.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut held = Vec::new();
    let mut acked = Vec::new();
    let mut tried = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.len() < 300 {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the child stopped talking");
        let parts: Vec<&str> = line.split(' ').collect();
        match parts[0] {
            "held" => held.push((parts[1].to_owned(), parts[2].parse::<u64>().unwrap())),
            "acked" => acked.push(parts[1].to_owned()),
            "claiming" => {
                tried.insert(parts[1].to_owned());
            }
            _ => {}
        }
    }
    c.kill().unwrap();
    let killed = Instant::now();
    c.wait().unwrap();
    // Whatever it said before it died.
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
        let parts: Vec<&str> = line.split(' ').collect();
        match parts[0] {
            "acked" => acked.push(parts[1].to_owned()),
            "claiming" => {
                tried.insert(parts[1].to_owned());
            }
            _ => {}
        }
    }
    assert_eq!(held.len(), 10);
    for key in &acked {
        let r = replayed(engine.claim(request(key)).unwrap());
        assert_eq!(r.body, key.as_bytes());
    }
    if killed.elapsed() < Duration::from_millis(800) {
        for (key, _) in &held {
            assert!(
                matches!(
                    engine.claim(request(key)).unwrap(),
                    ClaimOutcome::InFlight { .. }
                ),
                "{key}: a dead instance's lease was taken before its lock timeout"
            );
        }
    }
    std::thread::sleep(Duration::from_millis(1200).saturating_sub(killed.elapsed()));
    for (key, fence) in &held {
        let lease = claimed(engine.claim(request(key)).unwrap());
        assert!(lease.fencing_token() > *fence);
        lease.complete(StoredResponse::new(201, "taken")).unwrap();
    }
    let acked: HashSet<_> = acked.into_iter().collect();
    for key in tried.difference(&acked) {
        match engine.claim(request(key)).unwrap() {
            ClaimOutcome::Claimed(l) => l.release().unwrap(),
            ClaimOutcome::Replay(r) => assert_eq!(r.body, key.as_bytes()),
            other => panic!("{key}: stuck after the dead instance's lock timeout: {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rows written by hand.
// ---------------------------------------------------------------------------------------------

fn other_fingerprint(key: &str) -> ClaimRequest {
    ClaimRequest::new(
        "s",
        IdempotencyKey::new(key).unwrap(),
        Fingerprint::of_request("PUT", "/other", b"x"),
    )
}

/// Completed rows corrupted by hand, one way each: every claim of them (with the record's
/// fingerprint or another) and every operator's read of them must be a clear `Corrupt` error
/// (or, for another fingerprint, a mismatch) and never a panic or a replay; other keys'
/// claims, at the same moment, are not affected.
#[test]
fn corrupt_rows_are_errors_never_replays_and_spare_other_keys() {
    let table = Table::new();
    let engine = open(
        table
            .config(&app("corrupt"))
            .lock_timeout(Duration::from_secs(30)),
    );
    let t = &table.name;
    let corruptions: &[(&str, &str)] = &[
        ("fp_short", "fingerprint = '\\x0102'::bytea"),
        ("state_9", "state = 9"),
        ("status_null", "status = NULL"),
        ("status_big", "status = 70000"),
        ("status_neg", "status = -1"),
        ("headers_bad", "headers = '\\xffffffffff'::bytea"),
        ("headers_huge", "headers = '\\xffffffff0f'::bytea"),
        ("headers_tail", "headers = '\\x000102'::bytea"),
        ("trailers_bad", "trailers = '\\x0105ab'::bytea"),
    ];
    for (key, _) in corruptions {
        claimed(engine.claim(request(key)).unwrap())
            .complete(StoredResponse::new(201, "ok").with_header("a", "b"))
            .unwrap();
    }
    for (key, set) in corruptions {
        pg::execute(&format!("UPDATE {t} SET {set} WHERE key = '{key}'"));
    }
    // A fresh instance: nothing cached.
    let reader = open(table.config(&app("corrupt2")));
    for (key, _) in corruptions {
        for (name, e) in [("writer", &open_pool1(&table)), ("readers", &reader)] {
            let out =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| e.claim(request(key))));
            match out {
                Err(_) => panic!("{name}: a claim of the corrupt row {key} panicked"),
                Ok(Err(Error::Corrupt { .. })) => {}
                Ok(other) => panic!("{name}: the corrupt row {key} answered {other:?}"),
            }
            match e.claim(other_fingerprint(key)) {
                Ok(ClaimOutcome::Mismatch) | Err(Error::Corrupt { .. }) => {}
                other => panic!("{name}: {key} with another fingerprint: {other:?}"),
            }
        }
        match engine.record("s", key) {
            Err(Error::Corrupt { .. }) => {}
            other => panic!("record({key}) of a corrupt row: {other:?}"),
        }
    }
    // All corrupt keys and twenty fresh ones at once, so that they share batches.
    let barrier = Arc::new(Barrier::new(corruptions.len() + 20));
    let mut handles = Vec::new();
    for (key, _) in corruptions {
        let (e, b, key) = (reader.clone(), barrier.clone(), key.to_string());
        handles.push(std::thread::spawn(move || {
            b.wait();
            (
                key.clone(),
                format!("{:?}", e.claim(request(&key)).map(|_| ())),
            )
        }));
    }
    for i in 0..20 {
        let (e, b) = (reader.clone(), barrier.clone());
        handles.push(std::thread::spawn(move || {
            b.wait();
            let key = format!("fresh{i}");
            let out = match e.claim(request(&key)) {
                Ok(ClaimOutcome::Claimed(l)) => {
                    l.complete(StoredResponse::new(201, "fresh")).unwrap();
                    "claimed".to_owned()
                }
                other => format!("{other:?}"),
            };
            (key, out)
        }));
    }
    for h in handles {
        let (key, out) = h.join().unwrap();
        if key.starts_with("fresh") {
            assert_eq!(out, "claimed", "{key}, batched with corrupt rows: {out}");
        } else {
            assert!(out.contains("Corrupt"), "{key}: {out}");
        }
    }
    let problems = engine_check(&table);
    assert!(
        problems.len() >= corruptions.len(),
        "the check lists {} problems for {} corrupt rows: {problems:?}",
        problems.len(),
        corruptions.len()
    );
}

fn open_pool1(table: &Table) -> Engine {
    open(table.config(&app("corrupt1")).pool_size(1))
}

fn engine_check(table: &Table) -> Vec<String> {
    let store = idempotency_rs::admin::Store::open_config(
        table.config(&app("check")),
        idempotency_rs::admin::Access::ReadOnly,
    )
    .unwrap();
    store.check().unwrap()
}

/// In-flight rows written by hand: a live lock with a fingerprint of the wrong length, and
/// one whose lock timed out with a negative fencing token. Claims are errors or takeovers with
/// a valid token, never a panic.
#[test]
fn corrupt_in_flight_rows_are_errors_or_clean_takeovers() {
    let table = Table::new();
    let engine = open(
        table
            .config(&app("corrupt_if"))
            .lock_timeout(Duration::from_millis(200)),
    );
    let t = &table.name;
    for key in ["short_fp", "neg_fence", "neg_fence_live"] {
        let lease = claimed(
            engine
                .claim(request(key).lock_timeout(Duration::from_secs(60)))
                .unwrap(),
        );
        // Never completed nor released.
        std::mem::forget(lease);
    }
    pg::execute(&format!(
        "UPDATE {t} SET fingerprint = '\\x01'::bytea, locked_until = 0 WHERE key = 'short_fp';
         UPDATE {t} SET fence = -5, locked_until = 0 WHERE key = 'neg_fence';
         UPDATE {t} SET fence = -7 WHERE key = 'neg_fence_live'"
    ));
    let fresh = open(table.config(&app("corrupt_if2")).pool_size(1));
    match fresh.claim(request("short_fp")) {
        Err(Error::Corrupt { .. }) => {}
        other => panic!("an in-flight row with a 1-byte fingerprint: {other:?}"),
    }
    match fresh.claim(request("neg_fence")) {
        Ok(ClaimOutcome::Claimed(l)) => {
            assert!(l.fencing_token() > 0);
            l.complete(StoredResponse::new(201, "n")).unwrap();
        }
        other => panic!("a timed-out row with a negative token: {other:?}"),
    }
    match fresh.claim(request("neg_fence_live")) {
        Ok(ClaimOutcome::InFlight { .. }) => {}
        other => panic!("a live row with a negative token: {other:?}"),
    }
    match fresh.record("s", "neg_fence_live") {
        Err(Error::Corrupt { .. }) => {}
        other => panic!("record() of a negative token: {other:?}"),
    }
}

/// A 24 MB body written by hand replays whole, through the read connections and the writer.
#[test]
fn an_oversized_body_written_by_hand_replays_whole() {
    let table = Table::new();
    let engine = open(table.config(&app("big")));
    claimed(engine.claim(request("big")).unwrap())
        .complete(StoredResponse::new(201, "small"))
        .unwrap();
    let n = 24 * 1024 * 1024;
    pg::execute(&format!(
        "UPDATE {} SET body = convert_to(repeat('z', {n}), 'UTF8') WHERE key = 'big'",
        table.name
    ));
    for e in [
        open(table.config(&app("big2"))),
        open(table.config(&app("big3")).pool_size(1)),
    ] {
        let r = replayed(e.claim(request("big")).unwrap());
        assert_eq!(r.body.len(), n);
        assert!(r.body.iter().all(|b| *b == b'z'));
    }
}

/// A lease whose lock timed out and was taken over by another instance can no longer be
/// extended (nor complete), and its attempts do not disturb the taker's lease.
#[test]
fn an_extension_after_a_takeover_is_refused() {
    let table = Table::new();
    let config = table
        .config(&app("extend2"))
        .lock_timeout(Duration::from_millis(200));
    let a = open(config.clone());
    let b = open(config);
    let mut first = claimed(a.claim(request("x")).unwrap());
    std::thread::sleep(Duration::from_millis(260));
    let second = claimed(
        b.claim(request("x").lock_timeout(Duration::from_secs(5)))
            .unwrap(),
    );
    assert!(
        matches!(first.extend(Duration::from_secs(10)), Err(Error::LeaseLost)),
        "a lost lease was extended"
    );
    assert!(matches!(first.release(), Err(Error::LeaseLost)));
    match a.claim(request("x")).unwrap() {
        ClaimOutcome::InFlight { retry_after } => assert!(
            retry_after > Duration::from_secs(3),
            "the taker's lock was moved: {retry_after:?}"
        ),
        other => panic!("{other:?}"),
    }
    second.complete(StoredResponse::new(201, "b")).unwrap();
    assert_eq!(replayed(a.claim(request("x")).unwrap()).body, b"b");
}
