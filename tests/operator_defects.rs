//! The adversarial review of issue #17 ("see it and operate it"): the operator API, the replay
//! cache's max age, metrics and the CLI. Every test here failed on the code as first written,
//! for a real defect, and passes since its fix, unless its comment says it is a regression
//! guard (something checked and found right).
//!
//! `cargo test --all-features --test operator_defects`

use std::time::{Duration, Instant};

use idempotency_rs::{
    ClaimOutcome, ClaimRequest, Durability, Engine, EngineConfig, Fingerprint, IdempotencyKey,
    Lease, StoredResponse,
};

fn request(key: &str) -> ClaimRequest {
    ClaimRequest::new(
        "s",
        IdempotencyKey::new(key).unwrap(),
        Fingerprint::of_request("POST", "/", key.as_bytes()),
    )
}

fn claimed(outcome: ClaimOutcome) -> Lease {
    match outcome {
        ClaimOutcome::Claimed(lease) => lease,
        other => panic!("expected Claimed, got {other:?}"),
    }
}

/// Defect: `EngineConfig::replay_cache_max_age(Duration::MAX)` (the natural way to ask for the
/// old, age-less cache) makes every replay served by a read connection PANIC in the caller's
/// thread: `ReplayCache::insert` computes `Instant::now() + self.max_age`, which overflows.
/// `validate()` accepts the value; the crate promises typed errors, never panics, for bad input.
#[test]
fn a_huge_replay_cache_max_age_does_not_panic_a_claim() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(
        EngineConfig::new(dir.path().join("db"))
            .durability(Durability::Normal)
            .replay_cache_max_age(Duration::MAX),
    )
    .expect("the config is accepted");
    claimed(engine.claim(request("k")).unwrap())
        .complete(StoredResponse::new(201, "done"))
        .unwrap();
    // The retry is answered by a read connection, which puts the record in the cache.
    let retry =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.claim(request("k"))));
    let outcome = retry.unwrap_or_else(|p| {
        panic!(
            "the retry's claim panicked: {:?}",
            p.downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
        )
    });
    assert!(
        matches!(outcome, Ok(ClaimOutcome::Replay(_))),
        "{outcome:?}"
    );
}

/// Defect: `Engine::purge_expired` runs its whole loop (a thousand rows per transaction, each
/// committed with `synchronous=FULL`) on the writer thread without ever yielding, so every
/// claim of the service waits for the whole purge. The engine's own cleanup is careful to
/// take at most a ninth of the writer's time while callers wait ("claims are not stalled
/// behind a large purge"); the operator's purge, run exactly when the backlog is large,
/// stalls the service (and fills the queue: `Overloaded`).
#[test]
fn an_operator_purge_does_not_stall_claims() {
    const ROWS: i64 = 400_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let config = || {
        EngineConfig::new(&path)
            // No background cleanup during the test: the backlog is the operator's to purge.
            .cleanup(Duration::from_secs(3600), 1000)
    };
    Engine::open(config()).unwrap().shutdown().unwrap();
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(&format!(
            "BEGIN;
             WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {ROWS})
             INSERT INTO idempotency_records
                 (id, scope, key, fingerprint, state, fence, locked_until, expires_at, created_at,
                  completed_at, status, body)
             SELECT randomblob(32), 's', 'expired-' || x, randomblob(32), 1, x, 0, 1, 0, 0, 201,
                    zeroblob(64)
             FROM c;
             UPDATE idempotency_meta SET value = {ROWS} WHERE name = 'fence';
             COMMIT;"
        ))
        .unwrap();
    }
    let engine = Engine::open(config()).unwrap();
    let purger = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let n = engine.purge_expired().unwrap();
            (n, started, Instant::now())
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let asked = Instant::now();
    let lease = claimed(engine.claim(request("fresh")).unwrap());
    let answered = Instant::now();
    drop(lease);
    let (n, purge_started, purge_ended) = purger.join().unwrap();
    assert_eq!(n, ROWS as u64);
    let purge = purge_ended - purge_started;
    let waited = answered - asked;
    eprintln!("purge of {n} rows took {purge:?}; a claim during it waited {waited:?}");
    assert!(
        asked < purge_ended,
        "inconclusive: the purge ({purge:?}) ended before the claim was sent"
    );
    assert!(
        waited < Duration::from_millis(250),
        "a claim sent during an operator's purge waited {waited:?} (the purge took {purge:?}): \
         the writer does not yield to callers during purge_expired"
    );
}

/// Defect (PostgreSQL): `Engine::record`, `Engine::in_flight` and `Engine::stats` (and
/// `admin::Store::open`) build a tokio runtime and `block_on` it on the CALLER's thread. Called
/// from async code (an operator endpoint in the very service whose engine it is) they panic
/// with "Cannot start a runtime from within a runtime", while the same call on an SQLite engine
/// just answers. `postgres::open` knows the hazard (it opens on a thread of its own for exactly
/// this reason); the admin readers do not, and there is no async variant.
#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_admin_reads_from_async_code_do_not_panic() {
    let table = pg_table();
    let engine = Engine::open_async(EngineConfig::postgres(pg_url()).table(table.clone()))
        .await
        .unwrap();
    let lease = claimed(engine.claim_async(request("held")).await.unwrap());
    // The same calls on SQLite, from this same async context, work.
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Engine::open_async(EngineConfig::new(dir.path().join("db")))
        .await
        .unwrap();
    assert_eq!(sqlite.stats().unwrap().in_flight, 0);

    let stats = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.stats()));
    let record =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.record("s", "held")));
    drop(lease);
    drop_pg_schema(&table);
    let why = |p: Box<dyn std::any::Any + Send>| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    };
    match stats {
        Ok(s) => assert_eq!(s.unwrap().in_flight, 1),
        Err(p) => panic!(
            "Engine::stats() on PostgreSQL panicked in async code: {}",
            why(p)
        ),
    }
    match record {
        Ok(r) => assert!(r.unwrap().is_some()),
        Err(p) => panic!(
            "Engine::record() on PostgreSQL panicked in async code: {}",
            why(p)
        ),
    }
}

#[cfg(feature = "postgres")]
fn pg_url() -> String {
    std::env::var("IDEMPOTENCY_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

#[cfg(feature = "postgres")]
fn pg_table() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "review_{}_{}.records",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Drops the schema of a test table (on a thread of its own: callers may be async).
#[cfg(feature = "postgres")]
fn drop_pg_schema(table: &str) {
    let schema = table.split('.').next().unwrap().to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (client, conn) = tokio_postgres_connect(&pg_url()).await;
            tokio::spawn(conn);
            let _ = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                .await;
        });
    })
    .join()
    .unwrap();
}

#[cfg(feature = "postgres")]
async fn tokio_postgres_connect(
    url: &str,
) -> (
    tokio_postgres::Client,
    tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
) {
    tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap()
}

/// Defect (metrics): behind `Router::layer`, a request on its way to the router's fallback
/// (Lenient mode) whose key was used before for another request passes through to the
/// fallback (`Mode::passes_on`), yet `Contract::begin` has already counted it in
/// `idempotency_rejections_total{kind="key-reused"}` (and logged "idempotency: rejected" at
/// warn). The table says that counter counts "answers the layers gave on their own, without
/// running the handler": here the handler ran and nothing was refused.
#[cfg(all(feature = "metrics", feature = "axum-integration"))]
#[tokio::test]
async fn a_request_passed_through_is_not_counted_as_a_rejection() {
    use axum::Router;
    use axum::body::Body;
    use axum::routing::post;
    use idempotency_rs::axum_integration::IdempotencyLayer;
    use tower::ServiceExt;

    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("the only recorder of this test binary");
    let engine = Engine::open(EngineConfig::in_memory()).unwrap();
    let app: Router = Router::new()
        .route("/orders", post(|| async { "created" }))
        .fallback(|| async { (http::StatusCode::IM_A_TEAPOT, "fallback ran") })
        .layer(IdempotencyLayer::new(&engine).scope_header("x-user-id"));
    let send = |path: &'static str| {
        let app = app.clone();
        async move {
            let req = http::Request::post(path)
                .header("idempotency-key", "0b6f5a3e-9a7c-4c1e-8f2a-2d8b4f1e6c3a")
                .header("x-user-id", "u1")
                .body(Body::from("{}"))
                .unwrap();
            app.oneshot(req).await.unwrap()
        }
    };
    let first = send("/orders").await;
    let status = first.status();
    let body = axum::body::to_bytes(first.into_body(), 1 << 16)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body:?}");
    // The same key on a path no route matches: passed through to the fallback, not refused.
    let passed = send("/nowhere").await;
    assert_eq!(passed.status(), http::StatusCode::IM_A_TEAPOT);
    let text = handle.render();
    let counted: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("idempotency_rejections_total"))
        .collect();
    assert!(
        counted.is_empty(),
        "no request was refused, yet the layer counted rejections: {counted:?}"
    );
}

/// Regression guard (passes): a forget of a record whose completion is committed but not yet
/// flushed (Durability::Full, flush held) neither hangs nor lets the old response be replayed
/// after it; the held completion is still acknowledged once flushed, and the key runs again.
#[cfg(feature = "fault-injection")]
#[test]
fn forget_of_an_unflushed_completion() {
    use idempotency_rs::admin::Change;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let engine = Engine::open(EngineConfig::new(&path)).unwrap();
    let lease = claimed(engine.claim(request("k")).unwrap());
    engine.inject_sync_pause(true);
    let completing = std::thread::spawn(move || lease.complete(StoredResponse::new(201, "old")));
    // Wait for the commit (visible to another connection).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let conn = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let state: Option<i64> = conn
            .query_row(
                "SELECT state FROM idempotency_records WHERE key = 'k'",
                [],
                |r| r.get(0),
            )
            .ok();
        if state == Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "never committed");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(engine.forget("s", "k").unwrap(), Change::Done);
    let again = claimed(engine.claim(request("k")).unwrap());
    engine.inject_sync_pause(false);
    completing.join().unwrap().unwrap();
    again.complete(StoredResponse::new(201, "new")).unwrap();
    for _ in 0..3 {
        match engine.claim(request("k")).unwrap() {
            ClaimOutcome::Replay(r) => assert_eq!(r.body, b"new"),
            other => panic!("{other:?}"),
        }
    }
}

/// Regression guard (passes): operator calls after a writer panic fail at once, none hangs.
#[cfg(feature = "fault-injection")]
#[test]
fn operator_calls_after_a_writer_panic_fail_at_once() {
    let dir = tempfile::tempdir().unwrap();
    for engine in [
        Engine::open(EngineConfig::new(dir.path().join("db"))).unwrap(),
        Engine::open(EngineConfig::in_memory()).unwrap(),
    ] {
        engine.inject_writer_panic();
        let started = Instant::now();
        assert!(engine.forget("s", "k").is_err());
        assert!(engine.force_release("s", "k", 1).is_err());
        assert!(engine.purge_expired().is_err());
        assert!(engine.stats().is_err());
        assert!(engine.in_flight(Duration::ZERO, 10).is_err());
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "{:?}",
            started.elapsed()
        );
    }
}

/// Defect (low): `admin::Store::open_config` honours the config's clock for its changes
/// (`purge_expired` runs on its engine, with `config.clock`) but not for its reads
/// (`Store::read` always uses `SystemClock`). One Store then contradicts itself: `stats()` and
/// `record()` say a record is live, and `purge_expired()` deletes it as expired.
#[test]
fn a_store_reads_and_purges_by_the_same_clock() {
    use idempotency_rs::ManualClock;
    use idempotency_rs::admin::{Access, RecordState, Store};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let engine = Engine::open(EngineConfig::new(&path)).unwrap();
    claimed(engine.claim(request("k")).unwrap())
        .complete(StoredResponse::new(201, "done"))
        .unwrap();
    engine.shutdown().unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // Ten years on: past the record's 24 h retention.
    let later = std::sync::Arc::new(ManualClock::new(now_ms + 10 * 365 * 86_400_000));
    let store =
        Store::open_config(EngineConfig::new(&path).clock(later), Access::ReadWrite).unwrap();
    let stats = store.stats().unwrap();
    let state = store.record("s", "k").unwrap().unwrap().state;
    let purged = store.purge_expired().unwrap();
    store.close().unwrap();
    assert_eq!(
        (stats.expired, state == RecordState::Expired),
        (purged, purged == 1),
        "the store's reads said expired={} and state={state}, its purge deleted {purged}",
        stats.expired
    );
}

/// Defect (PostgreSQL): `purge_expired` runs its whole loop of `DELETE ... LIMIT 1000`
/// statements inside ONE deadline meant for one statement (`statement_timeout` + 1 s), on the
/// writer's connection. A backlog that takes longer fails with `Unavailable` ("its outcome is
/// unknown") after deleting part of it, the writer's connection is dropped, and every claim of
/// the instance waited behind it meanwhile. Each statement here is quick; only their sum is
/// over the limit.
#[cfg(feature = "postgres")]
#[test]
fn postgres_purge_of_a_large_backlog_completes() {
    const ROWS: i64 = 400_000;
    let table = pg_table();
    let config = EngineConfig::postgres(pg_url())
        .table(table.clone())
        .statement_timeout(Duration::from_secs(1))
        .cleanup(Duration::from_secs(3600), 1000);
    let engine = Engine::open(config).unwrap();
    let (schema, name) = table.split_once('.').unwrap();
    let analyze = format!("ANALYZE \"{schema}\".\"{name}\"");
    let sql = format!(
        "INSERT INTO \"{schema}\".\"{name}\"
             (id, scope, key, fingerprint, state, fence, locked_until, expires_at, created_at,
              completed_at, status, body)
         SELECT sha256(i::text::bytea), 's', 'expired-' || i, sha256(i::text::bytea), 1, i, 0,
                1, 0, 0, 201, '\\x00'::bytea
         FROM generate_series(1, {ROWS}) AS i"
    );
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (client, conn) = tokio_postgres_connect(&pg_url()).await;
            tokio::spawn(conn);
            client.batch_execute(&sql).await.unwrap();
            client.batch_execute(&analyze).await.unwrap();
        });
    })
    .join()
    .unwrap();
    let purger = {
        let engine = engine.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let result = engine.purge_expired();
            (result, started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let asked = Instant::now();
    let claim = engine.claim(request("fresh"));
    let waited = asked.elapsed();
    drop(claim);
    let (result, took) = purger.join().unwrap();
    drop(engine);
    drop_pg_schema(&table);
    eprintln!("purge: {result:?} after {took:?}; a claim during it waited {waited:?}");
    assert_eq!(
        result.as_ref().ok(),
        Some(&(ROWS as u64)),
        "purge_expired of {ROWS} expired rows failed after {took:?}: {result:?}"
    );
}

/// Regression guard (passes): `check` on a healthy store that is busy (claims, completions,
/// releases and takeovers from several threads) finds no problem, on SQLite and PostgreSQL.
#[test]
fn check_has_no_false_positive_on_a_busy_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let engine = Engine::open(EngineConfig::new(&path)).unwrap();
    let store = idempotency_rs::admin::Store::open(
        path.to_str().unwrap(),
        idempotency_rs::admin::Access::ReadOnly,
    )
    .unwrap();
    busy_check(&engine, || store.check().unwrap());
    store.close().unwrap();
}

#[cfg(feature = "postgres")]
#[test]
fn check_has_no_false_positive_on_a_busy_postgres_store() {
    let table = pg_table();
    let config = EngineConfig::postgres(pg_url()).table(table.clone());
    let engine = Engine::open(config.clone()).unwrap();
    let store =
        idempotency_rs::admin::Store::open_config(config, idempotency_rs::admin::Access::ReadOnly)
            .unwrap();
    busy_check(&engine, || store.check().unwrap());
    drop(store);
    drop(engine);
    drop_pg_schema(&table);
}

fn busy_check(engine: &Engine, check: impl Fn() -> Vec<String>) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let (engine, stop) = (engine.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                let mut held = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let key = format!("t{t}-{}", i % 50);
                    let req = request(&key).lock_timeout(Duration::from_millis(5));
                    if let Ok(ClaimOutcome::Claimed(lease)) = engine.claim(req) {
                        match i % 3 {
                            0 => {
                                let _ = lease.complete(StoredResponse::new(201, "x"));
                            }
                            1 => drop(lease),
                            // Kept past its lock timeout, to be taken over.
                            _ => held.push(lease),
                        }
                    }
                }
            })
        })
        .collect();
    for _ in 0..20 {
        let problems = check();
        assert!(problems.is_empty(), "{problems:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
}
