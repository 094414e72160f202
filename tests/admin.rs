//! What an operator reaches from code (`Engine::record`, `in_flight`, `stats`,
//! `force_release`, `forget`, `purge_expired`, and `admin::Store` from outside), on SQLite
//! files, in memory, and on PostgreSQL with the `postgres` feature: exact states and tokens,
//! the fence check of a forced release, and the replay cache that must stop answering for a
//! record once it is forgotten (found when tried as a new user would: a record deleted by
//! hand kept being replayed from memory for the whole retention).

#[cfg(feature = "postgres")]
mod pg;
mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use idempotency_rs::admin::{Access, Change, RecordState, Store};
use idempotency_rs::{ClaimOutcome, Engine, EngineConfig, Error, ManualClock, StoredResponse};
use support::{claimed, replayed, request};

fn ok(body: &str) -> StoredResponse {
    StoredResponse::new(201, body.as_bytes().to_vec()).with_header("content-type", "text/plain")
}

/// One completed record (`done`), one replayed twice (so a read connection has cached it), one
/// in flight (`held`, whose lease is returned).
fn populate(engine: &Engine) -> idempotency_rs::Lease {
    claimed(engine.claim(request("done")).unwrap())
        .complete(ok("first"))
        .unwrap();
    for _ in 0..2 {
        assert_eq!(
            replayed(engine.claim(request("done")).unwrap()).body,
            b"first"
        );
    }
    claimed(engine.claim(request("held")).unwrap())
}

fn records_and_changes(engine: &Engine) {
    let lease = populate(engine);
    let fence = lease.fencing_token();

    let done = engine.record("s", "done").unwrap().unwrap();
    assert_eq!(done.state, RecordState::Completed);
    assert_eq!((done.scope.as_str(), done.key.as_str()), ("s", "done"));
    let response = done.response.unwrap();
    assert_eq!((response.status, &response.body[..]), (201, &b"first"[..]));
    assert_eq!(
        response.headers,
        vec![("content-type".into(), b"text/plain".to_vec())]
    );
    assert!(done.completed_at.is_some() && done.locked_until.is_none());
    assert!(done.expires_at > SystemTime::now());

    let held = engine.record("s", "held").unwrap().unwrap();
    assert_eq!(held.state, RecordState::InFlight);
    assert_eq!(held.fencing_token, fence);
    assert!(held.response.is_none() && held.completed_at.is_none());
    assert!(!held.lock_timed_out(SystemTime::now()));
    assert!(engine.record("s", "never").unwrap().is_none());
    assert!(engine.record("other-scope", "done").unwrap().is_none());

    let listed = engine.in_flight(Duration::ZERO, 10).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].key.as_str(), listed[0].fencing_token),
        ("held", fence)
    );
    assert!(
        engine
            .in_flight(Duration::from_secs(3600), 10)
            .unwrap()
            .is_empty()
    );

    let stats = engine.stats().unwrap();
    assert_eq!((stats.in_flight, stats.completed, stats.expired), (1, 1, 0));
    assert!(stats.oldest_in_flight.is_some());
    assert_eq!(
        stats.schema_version,
        if stats.backend == "sqlite" { 3 } else { 1 }
    );

    // Forgetting an in-flight record is refused; a completed one goes, cache and all: the
    // next claim runs the operation again.
    assert_eq!(
        engine.forget("s", "held").unwrap(),
        Change::InFlight {
            fencing_token: fence
        }
    );
    assert_eq!(engine.forget("s", "done").unwrap(), Change::Done);
    assert_eq!(engine.forget("s", "done").unwrap(), Change::NotFound);
    let again = claimed(engine.claim(request("done")).unwrap());
    again.complete(ok("second")).unwrap();
    assert_eq!(
        replayed(engine.claim(request("done")).unwrap()).body,
        b"second"
    );

    // A forced release checks the fence: another token changes nothing.
    assert_eq!(
        engine.force_release("s", "held", fence + 1000).unwrap(),
        Change::FenceMoved { current: fence }
    );
    assert_eq!(
        engine.force_release("s", "done", fence).unwrap(),
        Change::Completed
    );
    assert_eq!(
        engine.force_release("s", "never", 1).unwrap(),
        Change::NotFound
    );
    assert!(matches!(
        engine.claim(request("held")).unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    assert_eq!(
        engine.force_release("s", "held", fence).unwrap(),
        Change::Done
    );
    // The key is free; the lease that held it can no longer store anything.
    let retry = claimed(engine.claim(request("held")).unwrap());
    assert!(retry.fencing_token() > fence);
    assert!(matches!(lease.complete(ok("stale")), Err(Error::LeaseLost)));
    retry.complete(ok("retried")).unwrap();
    assert_eq!(
        replayed(engine.claim(request("held")).unwrap()).body,
        b"retried"
    );

    // Bad input is refused as a claim refuses it.
    assert!(matches!(
        engine.record("s", "bad\nkey"),
        Err(Error::InvalidKey { .. })
    ));
    assert!(matches!(
        engine.forget("s\0", "k"),
        Err(Error::InvalidScope { .. })
    ));
}

#[test]
fn records_and_changes_on_an_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(EngineConfig::new(dir.path().join("db"))).unwrap();
    records_and_changes(&engine);
    engine.shutdown().unwrap();
    assert!(matches!(engine.stats(), Err(Error::Closed)));
    assert!(matches!(engine.forget("s", "done"), Err(Error::Closed)));
}

#[test]
fn records_and_changes_in_memory() {
    let engine = Engine::open(EngineConfig::in_memory()).unwrap();
    records_and_changes(&engine);
}

#[test]
fn purge_deletes_exactly_the_expired_records() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000_000));
    let engine = Engine::open(
        EngineConfig::new(dir.path().join("db"))
            .clock(clock.clone())
            .retention(Duration::from_secs(60)),
    )
    .unwrap();
    for key in ["a", "b", "c"] {
        claimed(engine.claim(request(key)).unwrap())
            .complete(ok(key))
            .unwrap();
    }
    clock.advance(Duration::from_secs(45));
    claimed(engine.claim(request("d")).unwrap())
        .complete(ok("d"))
        .unwrap();
    // a, b and c expire (lock timeout 30 s + retention 60 s after their claim); d does not.
    clock.advance(Duration::from_secs(50));
    let stats = engine.stats().unwrap();
    assert_eq!((stats.completed, stats.expired), (1, 3));
    assert_eq!(
        engine.record("s", "a").unwrap().unwrap().state,
        RecordState::Expired
    );
    assert_eq!(engine.purge_expired().unwrap(), 3);
    assert_eq!(engine.purge_expired().unwrap(), 0);
    let stats = engine.stats().unwrap();
    assert_eq!((stats.completed, stats.expired), (1, 0));
    assert!(engine.record("s", "a").unwrap().is_none());
}

/// A record deleted behind the engine's back (SQL by hand) stops being replayed once its
/// cache entry reaches `replay_cache_max_age`.
#[test]
fn a_record_deleted_by_hand_is_replayed_at_most_the_cache_max_age() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let engine =
        Engine::open(EngineConfig::new(&path).replay_cache_max_age(Duration::from_millis(300)))
            .unwrap();
    let _held = populate(&engine);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("DELETE FROM idempotency_records WHERE key = 'done'", [])
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let lease = claimed(engine.claim(request("done")).unwrap());
    lease.complete(ok("ran again")).unwrap();
}

/// From outside: a read-only store beside the running engine reads what it wrote; writing is
/// refused, clearly, while the engine holds the file, and works once it has stopped.
#[test]
fn a_store_opened_from_outside() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let url = path.to_str().unwrap().to_owned();
    let engine = Engine::open(EngineConfig::new(&path)).unwrap();
    let lease = populate(&engine);
    let fence = lease.fencing_token();

    let store = Store::open(&url, Access::ReadOnly).unwrap();
    assert_eq!(
        store.record("s", "held").unwrap().unwrap().fencing_token,
        fence
    );
    assert_eq!(store.stats().unwrap().in_flight, 1);
    assert!(store.check().unwrap().is_empty());
    assert!(matches!(
        store.forget("s", "done"),
        Err(Error::InvalidConfig { .. })
    ));
    let busy = Store::open_config(
        EngineConfig::new(&path).open_timeout(Duration::from_millis(100)),
        Access::ReadWrite,
    )
    .unwrap_err();
    assert!(
        matches!(busy, Error::AlreadyOpen { pid: Some(pid), .. } if pid == std::process::id()),
        "{busy:?}"
    );

    drop(lease);
    engine.shutdown().unwrap();
    let store = Store::open(&url, Access::ReadWrite).unwrap();
    assert_eq!(store.forget("s", "done").unwrap(), Change::Done);
    store.close().unwrap();
    let engine = Engine::open(EngineConfig::new(&path)).unwrap();
    assert!(engine.record("s", "done").unwrap().is_none());

    // Nothing is created, and foreign files are refused.
    assert!(matches!(
        Store::open(dir.path().to_str().unwrap(), Access::ReadOnly),
        Err(Error::CannotOpen { .. })
    ));
    let missing = dir.path().join("missing.db");
    assert!(matches!(
        Store::open(missing.to_str().unwrap(), Access::ReadOnly),
        Err(Error::CannotOpen { .. })
    ));
    assert!(!missing.exists());
    let foreign = dir.path().join("foreign.db");
    rusqlite::Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE t (x)")
        .unwrap();
    assert!(matches!(
        Store::open(foreign.to_str().unwrap(), Access::ReadOnly),
        Err(Error::Refused { .. })
    ));
    let text = dir.path().join("text.db");
    std::fs::write(
        &text,
        "not a database, just text that is long enough to have a header",
    )
    .unwrap();
    assert!(matches!(
        Store::open(text.to_str().unwrap(), Access::ReadOnly),
        Err(Error::NotADatabase { .. })
    ));
}

#[cfg(feature = "postgres")]
#[test]
fn records_and_changes_on_postgres() {
    let engine = Engine::open(pg::config()).unwrap();
    records_and_changes(&engine);
}

/// Two instances on one PostgreSQL table: one forgets a record; the other, which had it in its
/// replay cache, stops replaying it within its `replay_cache_max_age`.
#[cfg(feature = "postgres")]
#[test]
fn another_instance_stops_replaying_a_forgotten_record_within_the_max_age() {
    let config = pg::config();
    let one = Engine::open(config.clone()).unwrap();
    let two = Engine::open(config.replay_cache_max_age(Duration::from_millis(500))).unwrap();
    claimed(one.claim(request("k")).unwrap())
        .complete(ok("first"))
        .unwrap();
    // The second instance reads it on a read connection and caches it.
    for _ in 0..2 {
        assert_eq!(replayed(two.claim(request("k")).unwrap()).body, b"first");
    }
    assert_eq!(one.forget("s", "k").unwrap(), Change::Done);
    // Its cache may still answer (the documented bound)...
    let _ = two.claim(request("k")).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    // ...but no longer after the max age: the operation runs again.
    let lease = claimed(two.claim(request("k")).unwrap());
    lease.complete(ok("second")).unwrap();
    assert_eq!(replayed(one.claim(request("k")).unwrap()).body, b"second");
}

/// `check` reads a PostgreSQL table page by page: a bad row past the first page (of 10,000)
/// is found, and the healthy ones are not reported.
#[cfg(feature = "postgres")]
#[test]
fn check_pages_through_a_large_postgres_table() {
    let table = pg::fresh_table();
    let config = EngineConfig::postgres(pg::url()).table(table.clone());
    Engine::open(config.clone()).unwrap().shutdown().unwrap();
    pg::execute(&format!(
        "INSERT INTO {table} (id, scope, key, fingerprint, state, fence, locked_until, expires_at,
                              created_at, completed_at, status, headers, body, trailers)
         SELECT sha256(('k' || g)::bytea), 's', 'k' || g, sha256('fp'::bytea), 1, g, 0,
                9000000000000000, 0, 0, 201, NULL, 'ok'::bytea, NULL
         FROM generate_series(1, 10050) g;
         SELECT setval('{table}_fence', 10050);
         UPDATE {table} SET fingerprint = '\\x00'::bytea WHERE id = (SELECT id FROM {table} ORDER BY id DESC LIMIT 1);"
    ));
    let store = Store::open_config(config, Access::ReadOnly).unwrap();
    let problems = store.check().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("fingerprint of 1 bytes"),
        "{problems:?}"
    );
    assert_eq!(store.stats().unwrap().completed, 10050);
}
