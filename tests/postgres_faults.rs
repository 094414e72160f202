//! The PostgreSQL store against what an adversarial review found (issue #15): instances that
//! would deadlock, a claim that waited for a lock, connections the server closed while idle,
//! two instances hammering a few keys, a record committed by another instance during a claim,
//! a database whose encoding cannot hold a scope, and passwords in messages. Each test drives
//! a real server, often with a second raw session holding locks at chosen moments.
#![cfg(feature = "postgres")]

mod pg;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use idempotency_rs::{ClaimOutcome, Engine, EngineConfig, Error, StoredResponse};
use support::{claimed, request};

use pg::{Session, url_with};

fn count(sql: &str) -> usize {
    pg::query(sql)[0].as_deref().unwrap().parse().unwrap()
}

/// Waits until a backend of `app` waits for a lock in a statement like `query_like`.
fn wait_for_lock_wait(app: &str, query_like: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'
         AND wait_event_type = 'Lock' AND query LIKE '{query_like}'"
    )) == 0
    {
        assert!(
            Instant::now() < deadline,
            "{app}: no lock wait on {query_like}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_queued(engine: &Engine, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.queued() < n {
        assert!(Instant::now() < deadline, "queued {}", engine.queued());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The record id of (scope, key), as the engine computes it (`src/key.rs`).
fn record_id(scope: &str, key: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"idempotency-rs/record/v1\0");
    h.update((scope.len() as u64).to_be_bytes());
    h.update(scope.as_bytes());
    h.update(key.as_bytes());
    h.finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn passwords_never_show_in_errors_or_debug() {
    for url in [
        "postgres://app@127.0.0.1:1/db?password=hunter2",
        "postgres://app:hun/ter2@127.0.0.1:1/db",
    ] {
        let e = Engine::open(EngineConfig::postgres(url).statement_timeout(Duration::from_secs(1)))
            .unwrap_err();
        assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
        assert!(
            !e.to_string().contains("hunter2") && !e.to_string().contains("ter2"),
            "{e}"
        );
        let shown = format!("{:?}", EngineConfig::postgres(url));
        assert!(
            !shown.contains("hunter2") && !shown.contains("ter2"),
            "{shown}"
        );
    }
    // A typo in the scheme: not a PostgreSQL URL, and still not shown whole.
    let e = EngineConfig::from_url("postgress://app:hunter2@db.internal/payments").unwrap_err();
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

/// A claim whose transaction waited for a lock longer than its lock timeout: the lease it gets
/// still has its whole lock ahead of it, so a second caller is `InFlight`, not a second lease.
#[test]
fn a_claim_that_waited_for_a_lock_gets_a_live_lease() {
    let table = pg::fresh_table();
    let engine = Engine::open(
        EngineConfig::postgres(url_with("application_name=idem_waited"))
            .table(table.clone())
            .pool_size(1),
    )
    .unwrap();
    claimed(engine.claim(request("k")).unwrap())
        .release()
        .unwrap();
    let blocker = Session::new();
    blocker
        .exec(&format!("BEGIN; LOCK TABLE {table} IN EXCLUSIVE MODE"))
        .unwrap();
    let e1 = engine.clone();
    let first =
        std::thread::spawn(move || e1.claim(request("k").lock_timeout(Duration::from_secs(1))));
    wait_for_lock_wait("idem_waited", "%");
    std::thread::sleep(Duration::from_millis(1500));
    blocker.exec("ROLLBACK").unwrap();
    let lease = claimed(first.join().unwrap().unwrap());
    let left = lease
        .locked_until()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(
        left > Duration::from_millis(500),
        "the lease has {left:?} left"
    );
    let second = engine.claim(request("k")).unwrap();
    assert!(
        matches!(second, ClaimOutcome::InFlight { .. }),
        "a second lease while the first has {left:?} left: {second:?}"
    );
    drop(lease);
}

/// A deadlock between an instance's batch and another session: the batch {complete k, claim
/// x} holds k and waits for x, which the other session inserted and which then waits for k.
/// PostgreSQL breaks the cycle by failing the batch that detects it (the engine's, which waited
/// first); the engine runs it again, rolled back whole, and once the other session is gone both
/// commands succeed. Without the retry the completion failed (and its operation ran again after
/// the lock timeout).
#[test]
fn a_deadlocked_batch_is_rolled_back_and_runs_again() {
    let (x, k) = {
        let mut keys: Vec<(String, [u8; 32])> = (0..2)
            .map(|i| {
                let key = format!("key{i}");
                let id = record_id("s", &key);
                (key, id)
            })
            .collect();
        keys.sort_by_key(|(_, id)| *id);
        (keys[0].0.clone(), keys[1].0.clone())
    };
    let table = pg::fresh_table();
    let engine = Engine::open(
        EngineConfig::postgres(url_with("application_name=idem_deadlock"))
            .table(table.clone())
            .pool_size(1),
    )
    .unwrap();
    claimed(engine.claim(request("z")).unwrap())
        .complete(StoredResponse::new(200, "z"))
        .unwrap();
    let lease_k = claimed(engine.claim(request(&k)).unwrap());
    let fp = hex(idempotency_rs::Fingerprint::of_request("POST", "/", x.as_bytes()).as_bytes());
    let other = Session::new();
    other
        .exec(&format!(
            "BEGIN; INSERT INTO {table} (id, scope, key, fingerprint, state, fence, locked_until,
                 expires_at, created_at)
             VALUES ('\\x{}'::bytea, 's', '{x}', '\\x{fp}'::bytea, 0, nextval('{table}_fence'),
                     0, 0, 0)",
            hex(&record_id("s", &x))
        ))
        .unwrap();
    // The engine's writer, held in a batch, so that the completion and the claim of x share
    // the next one.
    let holder = Session::new();
    holder
        .exec(&format!(
            "BEGIN; SELECT 1 FROM {table} WHERE key = 'z' FOR UPDATE"
        ))
        .unwrap();
    let e1 = engine.clone();
    let first = std::thread::spawn(move || e1.claim(request("z")).map(drop));
    wait_for_lock_wait("idem_deadlock", "%");
    let completion = std::thread::spawn(move || lease_k.complete(StoredResponse::new(201, "k")));
    let e2 = engine.clone();
    let claim_x = std::thread::spawn(move || e2.claim(request(&x)));
    wait_queued(&engine, 2);
    holder.exec("ROLLBACK").unwrap();
    first.join().unwrap().unwrap();
    // The batch holds k and waits for x; the other session now waits for k: a cycle.
    wait_for_lock_wait("idem_deadlock", "%");
    let closing = other.start(&format!(
        "SELECT 1 FROM {table} WHERE key = '{k}' FOR UPDATE"
    ));
    // The engine's batch detects the deadlock (after deadlock_timeout, 1 s by default), is
    // rolled back, and runs again: it waits for k, which the other session got meanwhile.
    closing.recv().unwrap().unwrap();
    other.exec("ROLLBACK").unwrap();
    let completion = completion.join().unwrap();
    assert!(completion.is_ok(), "{completion:?}");
    let claim_x = claim_x.join().unwrap();
    assert!(
        matches!(claim_x, Ok(ClaimOutcome::Claimed(_))),
        "{claim_x:?}"
    );
}

/// A connection the server closed while it was idle (`idle_session_timeout`; a terminated
/// backend while the handler ran): the next batch never reached a server, so it runs on a new
/// connection instead of failing.
#[test]
fn a_connection_closed_while_idle_is_replaced_not_failed() {
    let engine = Engine::open(
        EngineConfig::postgres(url_with("options=-c%20idle_session_timeout%3D300"))
            .table(pg::fresh_table())
            .pool_size(1),
    )
    .unwrap();
    claimed(engine.claim(request("a")).unwrap())
        .complete(StoredResponse::new(200, "a"))
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let out = engine.claim(request("b"));
    assert!(matches!(out, Ok(ClaimOutcome::Claimed(_))), "{out:?}");

    let engine = Engine::open(
        EngineConfig::postgres(url_with("application_name=idem_idle_terminated"))
            .table(pg::fresh_table())
            .pool_size(1),
    )
    .unwrap();
    let lease = claimed(engine.claim(request("a")).unwrap());
    pg::execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = 'idem_idle_terminated'",
    );
    std::thread::sleep(Duration::from_millis(200));
    let out = lease.complete(StoredResponse::new(201, "a"));
    assert!(out.is_ok(), "{out:?}");
}

/// Another instance's record committed during this instance's claim statement, expired by the
/// time it could be read: the claim runs again and wins, never `Busy`.
#[test]
fn a_claim_behind_another_instances_short_lived_record_runs_again() {
    let table = pg::fresh_table();
    let engine = Engine::open(
        EngineConfig::postgres(url_with("application_name=idem_short_lived"))
            .table(table.clone())
            .pool_size(1),
    )
    .unwrap();
    let id = hex(&record_id("s", "x"));
    let fp = hex(idempotency_rs::Fingerprint::of_request("POST", "/", b"x").as_bytes());
    let other = Session::new();
    other
        .exec(&format!(
            "BEGIN; INSERT INTO {table} (id, scope, key, fingerprint, state, fence, locked_until,
                 expires_at, created_at)
             SELECT '\\x{id}'::bytea, 's', 'x', '\\x{fp}'::bytea, 0, nextval('{table}_fence'),
                    n + 300, n + 301, n
             FROM (SELECT (extract(epoch from now()) * 1000)::int8 AS n) t"
        ))
        .unwrap();
    let e = engine.clone();
    let claim = std::thread::spawn(move || e.claim(request("x")));
    wait_for_lock_wait("idem_short_lived", "%");
    std::thread::sleep(Duration::from_millis(500));
    other.exec("COMMIT").unwrap();
    let out = claim.join().unwrap();
    assert!(matches!(out, Ok(ClaimOutcome::Claimed(_))), "{out:?}");
}

/// Two instances, twelve threads, three keys, short retention: one live lease per key at a
/// time, replays only of completions that happened, no mismatch and no error.
#[test]
fn two_instances_hammering_three_keys() {
    use std::collections::{HashMap, HashSet};
    let config = EngineConfig::postgres(pg::url())
        .table(pg::fresh_table())
        .lock_timeout(Duration::from_secs(20))
        .retention(Duration::from_millis(200))
        .pool_size(3);
    let engines = [
        Engine::open(config.clone()).unwrap(),
        Engine::open(config).unwrap(),
    ];
    #[derive(Default)]
    struct Seen {
        held: HashSet<String>,
        completed: HashMap<String, HashSet<u64>>,
        errors: Vec<String>,
        violations: Vec<String>,
        claims: u32,
    }
    let seen = Arc::new(parking_lot::Mutex::new(Seen::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads: Vec<_> = (0..12u64)
        .map(|w| {
            let (engines, seen, stop) = (engines.clone(), seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = w * 7919 + 1;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n = n
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let key = format!("k{}", (n >> 33) % 3);
                    let engine = &engines[((n >> 40) % 2) as usize];
                    match engine.claim(request(&key)) {
                        Ok(ClaimOutcome::Claimed(lease)) => {
                            let fence = lease.fencing_token();
                            {
                                let mut s = seen.lock();
                                s.claims += 1;
                                if !s.held.insert(key.clone()) {
                                    s.violations.push(format!("{key}: a second live lease"));
                                }
                            }
                            std::thread::sleep(Duration::from_micros(300));
                            seen.lock().held.remove(&key);
                            let out = if (n >> 50) % 3 == 0 {
                                // Noted before: a replay may come before `complete` returns.
                                seen.lock()
                                    .completed
                                    .entry(key.clone())
                                    .or_default()
                                    .insert(fence);
                                lease.complete(StoredResponse::new(201, fence.to_string()))
                            } else {
                                lease.release()
                            };
                            if let Err(e) = out {
                                seen.lock().errors.push(format!("{e:?}"));
                            }
                        }
                        Ok(ClaimOutcome::Replay(r)) => {
                            let fence: u64 = std::str::from_utf8(&r.body).unwrap().parse().unwrap();
                            let mut s = seen.lock();
                            if !s.completed.get(&key).is_some_and(|f| f.contains(&fence)) {
                                s.violations.push(format!("{key}: replayed {fence}"));
                            }
                        }
                        Ok(ClaimOutcome::InFlight { .. }) => {}
                        Ok(ClaimOutcome::Mismatch) => {
                            seen.lock().violations.push(format!("{key}: mismatch"));
                        }
                        Err(e) => seen.lock().errors.push(format!("{e:?}")),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let s = seen.lock();
    assert!(s.claims > 20, "only {} claims", s.claims);
    assert!(s.violations.is_empty(), "{:?}", s.violations);
    assert!(s.errors.is_empty(), "{:?}", s.errors);
}

/// A database whose encoding cannot hold every scope and key (LATIN1) is refused at open: on
/// it, one caller's scope outside LATIN1 would fail the whole batch, other callers included.
#[test]
fn a_database_that_is_not_utf8_is_refused() {
    let db = format!("idem_latin1_{}", std::process::id());
    pg::execute(&format!("DROP DATABASE IF EXISTS {db}"));
    pg::execute(&format!(
        "CREATE DATABASE {db} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    ));
    let config: tokio_postgres::Config = pg::url().parse().unwrap();
    let dbname = config.get_dbname().unwrap().to_owned();
    let url = pg::url().replacen(&format!("/{dbname}"), &format!("/{db}"), 1);
    let e = Engine::open(EngineConfig::postgres(url).table("records")).unwrap_err();
    pg::execute(&format!("DROP DATABASE IF EXISTS {db}"));
    assert!(matches!(e, Error::Refused { .. }), "{e:?}");
    assert!(e.to_string().contains("LATIN1"), "{e}");
}

/// One command's own failure (a value the database refuses, here through a CHECK constraint
/// added for the test) fails only that command: the batch it was in, rolled back, runs again
/// command by command, as SQLite keeps a failed statement to its own caller.
#[test]
fn one_commands_failure_fails_only_that_command() {
    let table = pg::fresh_table();
    let engine = Engine::open(
        EngineConfig::postgres(url_with("application_name=idem_alone"))
            .table(table.clone())
            .pool_size(1),
    )
    .unwrap();
    let lease = claimed(engine.claim(request("b")).unwrap());
    // A CHECK the server adds for this test makes one claim's value fail (as a value the
    // database cannot hold would), while the others of its batch are fine.
    pg::execute(&format!(
        "ALTER TABLE {table} ADD CONSTRAINT no_poison CHECK (key <> 'poison')"
    ));
    let blocker = Session::new();
    blocker
        .exec(&format!("BEGIN; LOCK TABLE {table} IN EXCLUSIVE MODE"))
        .unwrap();
    let e1 = engine.clone();
    let first = std::thread::spawn(move || e1.claim(request("c")).map(drop));
    wait_for_lock_wait("idem_alone", "%");
    let completion = std::thread::spawn(move || lease.complete(StoredResponse::new(201, "b")));
    let e2 = engine.clone();
    let poison = std::thread::spawn(move || e2.claim(request("poison")).map(drop));
    let e3 = engine.clone();
    let fine = std::thread::spawn(move || e3.claim(request("fine")).map(drop));
    wait_queued(&engine, 3);
    blocker.exec("ROLLBACK").unwrap();
    first.join().unwrap().unwrap();
    assert!(poison.join().unwrap().is_err());
    completion.join().unwrap().unwrap();
    fine.join().unwrap().unwrap();
}

/// A pooler's `FATAL` (not the server's verdict) in the middle of a batch leaves its outcome
/// unknown: the server may still commit the pipeline it holds. The batch is not run again as
/// it is; its lease commands are, on a new connection, whose transaction waits for the first
/// one's row locks and then finds the completion stored under its own fencing token: the
/// caller is told it is stored (until this session it got `Unavailable`, and its key stayed
/// held until the lock timed out), never `LeaseLost`, and the record is stored once.
#[test]
fn a_poolers_fatal_mid_batch_is_an_unknown_outcome_not_a_rollback() {
    let proxy = pg::proxy::Proxy::start();
    let app = "idem_bouncer_fatal";
    let table = pg::fresh_table();
    let engine = Engine::open(
        EngineConfig::postgres(format!("{}&application_name={app}", proxy.url()))
            .table(table.clone())
            .pool_size(1)
            .statement_timeout(Duration::from_secs(10)),
    )
    .unwrap();
    let lease = claimed(engine.claim(request("k")).unwrap());
    let blocker = Session::new();
    blocker
        .exec(&format!(
            "BEGIN; SELECT 1 FROM {table} WHERE key = 'k' FOR UPDATE"
        ))
        .unwrap();
    let completion =
        std::thread::spawn(move || lease.complete(StoredResponse::new(201, "stored once")));
    wait_for_lock_wait(app, "%");
    proxy.give_up_all();
    std::thread::sleep(Duration::from_millis(300));
    blocker.exec("ROLLBACK").unwrap();
    let out = completion.join().unwrap();
    assert!(matches!(out, Ok(())), "{out:?}");
    // The server did commit it: the completion is stored once and replays.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stored = pg::query(&format!(
            "SELECT state::text || ':' || encode(body, 'escape') FROM {table} WHERE key = 'k'"
        ));
        if stored == vec![Some("1:stored once".to_owned())] {
            break;
        }
        assert!(Instant::now() < deadline, "{stored:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(matches!(
        engine.claim(request("k")).unwrap(),
        ClaimOutcome::Replay(_)
    ));
}

/// A wall clock that can be stepped, as NTP or an operator steps a host's clock.
#[derive(Debug, Default)]
struct SteppedClock(std::sync::atomic::AtomicI64);

impl idempotency_rs::Clock for SteppedClock {
    fn now_ms(&self) -> i64 {
        idempotency_rs::SystemClock.now_ms() + self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The replay cache never outlives the record on the server, even when the engine host's wall
/// clock steps back: its entries also carry a monotonic deadline.
#[test]
fn a_backward_clock_step_does_not_keep_a_cached_replay_past_its_record() {
    let table = pg::fresh_table();
    let clock = Arc::new(SteppedClock::default());
    let config = EngineConfig::postgres(pg::url())
        .table(table)
        .retention(Duration::from_millis(1500))
        .pool_size(1);
    let a = Engine::open(config.clone().clock(clock.clone())).unwrap();
    let b = Engine::open(config).unwrap();
    claimed(a.claim(request("k")).unwrap())
        .complete(StoredResponse::new(200, "first"))
        .unwrap();
    assert!(matches!(
        a.claim(request("k")).unwrap(),
        ClaimOutcome::Replay(_)
    ));
    clock.0.store(-5_000, std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(2000));
    let again = claimed(b.claim(request("k")).unwrap());
    again.complete(StoredResponse::new(200, "second")).unwrap();
    match a.claim(request("k")).unwrap() {
        ClaimOutcome::Replay(r) => assert_eq!(r.body, b"second"),
        other => panic!("{other:?}"),
    }
}

/// A statement timeout PostgreSQL cannot hold (over 2^31 - 1 ms) is refused at open, not
/// accepted and then failing every batch.
#[test]
fn an_out_of_range_statement_timeout_is_refused_at_open() {
    for timeout in [Duration::from_secs(25 * 24 * 3600), Duration::MAX] {
        let e = Engine::open(pg::config().statement_timeout(timeout)).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
    }
}
