//! The PostgreSQL store on a real server: opening (and every way it can be refused), what
//! several engines on one database agree on, the database's clock, and connections that are
//! cut or refused under load.

mod pg;
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use idempotency_rs::{
    ClaimOutcome, Clock, Engine, EngineConfig, Error, StoredResponse, SystemClock,
};
use parking_lot::Mutex;
use support::{claimed, replayed, request};

fn open(config: EngineConfig) -> Engine {
    Engine::open(config).unwrap()
}

fn open_err(config: EngineConfig) -> Error {
    match Engine::open(config) {
        Ok(_) => panic!("the open succeeded"),
        Err(e) => e,
    }
}

use pg::url_with;

#[test]
fn claims_complete_and_replay() {
    let engine = open(pg::config());
    let lease = claimed(engine.claim(request("a")).unwrap());
    assert!(matches!(
        engine.claim(request("a")).unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    lease
        .complete(StoredResponse::new(201, b"done".to_vec()).with_header("x-order", "7"))
        .unwrap();
    let r = replayed(engine.claim(request("a")).unwrap());
    assert_eq!((r.status, &r.body[..]), (201, &b"done"[..]));
    assert_eq!(r.headers, vec![("x-order".to_owned(), b"7".to_vec())]);
}

/// Two engines on one table are two instances of a service: one record, one execution,
/// fencing tokens from one sequence.
#[test]
fn instances_share_records_and_fences() {
    let config = pg::config().lock_timeout(Duration::from_millis(300));
    let a = open(config.clone());
    let b = open(config);
    let first = claimed(a.claim(request("k")).unwrap());
    assert!(matches!(
        b.claim(request("k")).unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    let mismatch = support::request("k");
    let other = idempotency_rs::ClaimRequest::new(
        mismatch.scope(),
        mismatch.key().clone(),
        idempotency_rs::Fingerprint::of_request("POST", "/", b"another body"),
    );
    assert!(matches!(b.claim(other).unwrap(), ClaimOutcome::Mismatch));
    // The lock times out (the database's clock): the other instance takes over with a larger
    // token, and the first lease can no longer complete.
    std::thread::sleep(Duration::from_millis(400));
    let second = claimed(b.claim(request("k")).unwrap());
    assert!(second.fencing_token() > first.fencing_token());
    assert!(matches!(
        first.complete(StoredResponse::new(200, "late")),
        Err(Error::LeaseLost)
    ));
    let mut last = second.fencing_token();
    second.complete(StoredResponse::new(201, "b")).unwrap();
    assert_eq!(replayed(a.claim(request("k")).unwrap()).body, b"b");
    // Tokens grow across instances, whichever claims.
    for i in 0..20 {
        let engine = if i % 2 == 0 { &a } else { &b };
        let lease = claimed(engine.claim(request(&format!("t{i}"))).unwrap());
        assert!(lease.fencing_token() > last);
        last = lease.fencing_token();
        lease.release().unwrap();
    }
}

/// A clock that is an hour ahead of the real one.
#[derive(Debug)]
struct HourAhead;

impl Clock for HourAhead {
    fn now_ms(&self) -> i64 {
        SystemClock.now_ms() + 3_600_000
    }
}

/// Lock timeouts and expiry are the database's: an instance whose clock is an hour ahead
/// neither takes over a live lease nor keeps its own past the lock timeout, and what it tells
/// its callers is in its own clock's terms.
#[test]
fn an_instance_with_its_clock_an_hour_off_agrees_with_the_others() {
    let table = pg::fresh_table();
    let config = EngineConfig::postgres(pg::url())
        .table(table.clone())
        .lock_timeout(Duration::from_secs(2));
    let right = open(config.clone());
    let ahead = open(config.clone().clock(Arc::new(HourAhead)));

    let held = claimed(right.claim(request("a")).unwrap());
    match ahead.claim(request("a")).unwrap() {
        ClaimOutcome::InFlight { retry_after } => {
            assert!(retry_after > Duration::from_millis(1000), "{retry_after:?}");
            assert!(retry_after <= Duration::from_secs(2), "{retry_after:?}");
        }
        other => panic!("the instance an hour ahead took a live lease: {other:?}"),
    }
    let mine = claimed(ahead.claim(request("b")).unwrap());
    // Its lease's expiry is in its own clock: about two seconds after its now.
    let until = mine
        .locked_until()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let left = until - HourAhead.now_ms();
    assert!((1000..=2100).contains(&left), "{left} ms left");
    assert!(matches!(
        right.claim(request("b")).unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    held.complete(StoredResponse::new(201, "a")).unwrap();
    // A replay it caches expires by the database's retention, not an hour early or late.
    assert_eq!(replayed(ahead.claim(request("a")).unwrap()).body, b"a");
    assert_eq!(replayed(ahead.claim(request("a")).unwrap()).body, b"a");
    drop(mine);
}

#[test]
fn a_test_clock_moves_the_database_time() {
    let clock = Arc::new(idempotency_rs::ManualClock::new(1_700_000_000_000));
    let config = pg::config()
        .clock(clock.clone())
        .database_clock(clock.clone())
        .lock_timeout(Duration::from_secs(10))
        .retention(Duration::from_secs(60));
    let engine = open(config);
    let first = claimed(engine.claim(request("a")).unwrap());
    clock.advance(Duration::from_secs(11));
    let second = claimed(engine.claim(request("a")).unwrap());
    assert!(second.fencing_token() > first.fencing_token());
    second.complete(StoredResponse::new(200, "x")).unwrap();
    clock.advance(Duration::from_secs(61));
    claimed(engine.claim(request("a")).unwrap())
        .release()
        .unwrap();
}

/// Expired records are deleted in batches, by one instance at a time.
#[test]
fn cleanup_deletes_expired_records() {
    let clock = Arc::new(idempotency_rs::ManualClock::new(1_700_000_000_000));
    let table = pg::fresh_table();
    let config = EngineConfig::postgres(pg::url())
        .table(table.clone())
        .clock(clock.clone())
        .database_clock(clock.clone())
        .retention(Duration::from_secs(1))
        .cleanup(Duration::from_millis(20), 7);
    let a = open(config.clone());
    let b = open(config);
    for i in 0..50 {
        let engine = if i % 2 == 0 { &a } else { &b };
        claimed(engine.claim(request(&format!("k{i}"))).unwrap())
            .complete(StoredResponse::new(200, "x"))
            .unwrap();
    }
    let count = || -> i64 {
        pg::query(&format!("SELECT count(*) FROM {table}"))[0]
            .as_deref()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(count(), 50);
    clock.advance(Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(20);
    while count() != 0 {
        assert!(Instant::now() < deadline, "{} rows left", count());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_unknown_role_is_refused_clearly() {
    let config: tokio_postgres::Config = pg::url().parse().unwrap();
    let url = pg::url().replacen(
        &format!("{}@", config.get_user().unwrap()),
        "no_such_role_idem@",
        1,
    );
    let e = open_err(EngineConfig::postgres(url).table(pg::fresh_table()));
    assert!(matches!(e, Error::Refused { .. }), "{e:?}");
    assert!(e.to_string().contains("authentication failed"), "{e}");
}

#[test]
fn a_missing_database_is_refused_clearly() {
    let config: tokio_postgres::Config = pg::url().parse().unwrap();
    let db = config.get_dbname().unwrap();
    let url = pg::url().replacen(&format!("/{db}"), "/no_such_database_idem", 1);
    let e = open_err(EngineConfig::postgres(url).table(pg::fresh_table()));
    assert!(matches!(e, Error::Refused { .. }), "{e:?}");
    assert!(e.to_string().contains("does not exist"), "{e}");
}

#[test]
fn nothing_listening_is_unavailable_and_a_password_never_shows() {
    let e = open_err(
        EngineConfig::postgres("postgres://app:hunter2@127.0.0.1:1/db")
            .statement_timeout(Duration::from_secs(1)),
    );
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    assert!(e.is_transient());
    assert!(!e.to_string().contains("hunter2"), "{e}");
    assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
}

#[test]
fn a_table_that_is_not_ours_is_refused() {
    let table = pg::fresh_table();
    let schema = table.split('.').next().unwrap();
    pg::execute(&format!(
        "CREATE SCHEMA {schema}; CREATE TABLE {table} (id int PRIMARY KEY, name text)"
    ));
    let e = open_err(EngineConfig::postgres(pg::url()).table(table.clone()));
    assert!(matches!(e, Error::Refused { .. }), "{e:?}");
    assert!(
        e.to_string().contains("not created by idempotency-rs"),
        "{e}"
    );
    // Nothing was written: the foreign table is as it was, and no meta table appeared.
    let meta = pg::query(&format!("SELECT to_regclass('{table}_meta')::text"));
    assert_eq!(meta, vec![None]);
}

#[test]
fn a_newer_schema_is_refused() {
    let table = pg::fresh_table();
    drop(open(EngineConfig::postgres(pg::url()).table(table.clone())));
    pg::execute(&format!(
        "UPDATE {table}_meta SET value = 99 WHERE name = 'schema_version'"
    ));
    let e = open_err(EngineConfig::postgres(pg::url()).table(table));
    assert!(
        matches!(
            e,
            Error::SchemaTooNew {
                found: 99,
                supported: 1
            }
        ),
        "{e:?}"
    );
}

#[test]
fn a_read_only_server_is_refused() {
    let url = url_with("options=-c%20default_transaction_read_only%3Don");
    let table = pg::fresh_table();
    let e = open_err(EngineConfig::postgres(url.clone()).table(table.clone()));
    assert!(matches!(e, Error::Refused { .. }), "{e:?}");
    assert!(e.to_string().contains("only accepts reads"), "{e}");
    // Also when the table exists (a standby of a primary that has it).
    drop(open(EngineConfig::postgres(pg::url()).table(table.clone())));
    let e = open_err(EngineConfig::postgres(url).table(table));
    assert!(matches!(e, Error::Refused { .. }), "{e:?}");
}

#[test]
fn bad_table_names_are_invalid_config() {
    for bad in ["Records", "a.b.c", "x;drop table y", ""] {
        let e = open_err(EngineConfig::postgres(pg::url()).table(bad));
        assert!(matches!(e, Error::InvalidConfig { .. }), "{bad}: {e:?}");
    }
    let e = open_err(EngineConfig::postgres("postgres://u@h/d?sslmode=sometimes"));
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e:?}");
}

/// After the first open (by the owner), a role with only the README's grants runs the store.
#[test]
fn a_least_privilege_role_is_enough_after_the_first_open() {
    let table = pg::fresh_table();
    let schema = table.split('.').next().unwrap().to_owned();
    drop(open(EngineConfig::postgres(pg::url()).table(table.clone())));
    let role = format!("{schema}_app");
    pg::execute(&format!(
        "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN;
         GRANT USAGE ON SCHEMA {schema} TO {role};
         GRANT SELECT ON {table}_meta TO {role};
         GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {role};
         GRANT USAGE ON SEQUENCE {table}_fence TO {role};"
    ));
    let config: tokio_postgres::Config = pg::url().parse().unwrap();
    let url = pg::url().replacen(
        &format!("{}@", config.get_user().unwrap()),
        &format!("{role}@"),
        1,
    );
    let engine = open(EngineConfig::postgres(url.clone()).table(table.clone()));
    let lease = claimed(engine.claim(request("a")).unwrap());
    lease.complete(StoredResponse::new(201, "ok")).unwrap();
    assert_eq!(replayed(engine.claim(request("a")).unwrap()).body, b"ok");
    engine.shutdown().unwrap();
    // Without them: a clear refusal, not a generic error.
    pg::execute(&format!("REVOKE SELECT ON {table}_meta FROM {role}"));
    let e = open_err(EngineConfig::postgres(url).table(table));
    assert!(matches!(e, Error::Refused { .. }), "{e:?}");
    assert!(e.to_string().contains("permission denied"), "{e}");
    pg::execute(&format!("DROP OWNED BY {role}; DROP ROLE {role};"));
}

/// Ten instances starting at once on a new table: one creates it, all open.
#[test]
fn ten_instances_starting_at_once_create_the_schema_once() {
    let table = pg::fresh_table();
    let engines: Vec<_> = (0..10)
        .map(|_| {
            let table = table.clone();
            std::thread::spawn(move || Engine::open(EngineConfig::postgres(pg::url()).table(table)))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    let lease = claimed(engines[3].claim(request("a")).unwrap());
    lease.complete(StoredResponse::new(200, "x")).unwrap();
    for e in &engines {
        assert_eq!(replayed(e.claim(request("a")).unwrap()).body, b"x");
    }
}

/// `sslmode=require` encrypts when the server offers TLS, and says so clearly when it does not.
#[test]
fn tls_require_is_encrypted_or_refused_clearly() {
    let ssl = pg::query("SHOW ssl")[0].clone().unwrap();
    let url = url_with("sslmode=require&application_name=idem_tls_test");
    let result = Engine::open(EngineConfig::postgres(url).table(pg::fresh_table()));
    if ssl == "on" {
        let engine = result.unwrap();
        claimed(engine.claim(request("a")).unwrap())
            .release()
            .unwrap();
        let encrypted = pg::query(
            "SELECT bool_and(s.ssl)::text FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'idem_tls_test'",
        );
        assert_eq!(encrypted, vec![Some("true".to_owned())]);
    } else {
        let e = result.unwrap_err();
        assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
        assert!(e.to_string().to_lowercase().contains("tls"), "{e}");
    }
    // verify-full against a certificate no root vouches for is refused, never silently plain.
    if ssl == "on" {
        let url = url_with("sslmode=verify-full");
        let e = Engine::open(EngineConfig::postgres(url).table(pg::fresh_table())).unwrap_err();
        assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
        // With the server's certificate as the root, the right name passes and a wrong one
        // does not (Debian's server has a self-signed certificate for `localhost`).
        let cert = pg::query("SHOW ssl_cert_file")[0].clone().unwrap();
        let config: tokio_postgres::Config = pg::url().parse().unwrap();
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config.get_user().unwrap().to_owned();
        let db = config.get_dbname().unwrap().to_owned();
        if std::fs::read_to_string(&cert).is_ok_and(|pem| pem.contains("BEGIN CERTIFICATE")) {
            let root = format!("sslrootcert={}", cert.replace('/', "%2F"));
            let verified = format!(
                "postgres://{user}@localhost:{port}/{db}?sslmode=verify-full&{root}&application_name=idem_tls_verified"
            );
            let engine = Engine::open(EngineConfig::postgres(verified).table(pg::fresh_table()));
            match engine {
                Ok(engine) => claimed(engine.claim(request("v")).unwrap())
                    .release()
                    .unwrap(),
                // Only a certificate for another name may refuse `localhost`.
                Err(e) => assert!(e.to_string().contains("certificate"), "{e}"),
            }
            let wrong_name =
                format!("postgres://{user}@127.0.0.1:{port}/{db}?sslmode=verify-full&{root}");
            let e = Engine::open(EngineConfig::postgres(wrong_name).table(pg::fresh_table()))
                .unwrap_err();
            assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
        }
    }
}

/// Every connection of the engine reset under load, and the server refusing connections for
/// a while (a restart): claims fail as `Unavailable` and run nothing, the engine comes back by
/// itself, no acknowledged completion is lost, and an operation runs again only after a
/// completion that failed (whose outcome the caller could not know).
#[test]
fn cut_connections_and_a_restart_lose_nothing_and_run_nothing_twice() {
    let proxy = pg::proxy::Proxy::start();
    let table = pg::fresh_table();
    let config = EngineConfig::postgres(proxy.url())
        .table(table.clone())
        .lock_timeout(Duration::from_millis(300))
        .statement_timeout(Duration::from_secs(2));
    let instances = [open(config.clone()), open(config)];

    #[derive(Default)]
    struct Log {
        runs: HashMap<String, Vec<u64>>,
        failed_completions: HashMap<String, u32>,
        acked: HashMap<String, u64>,
        replays: Vec<(String, Vec<u8>)>,
        errors: HashMap<String, u32>,
    }
    let log = Arc::new(Mutex::new(Log::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let ok_after_last_cut = Arc::new(AtomicU64::new(0));
    let cutting = Arc::new(AtomicBool::new(true));
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let engines = instances.clone();
            let (log, stop, ok, cutting) = (
                log.clone(),
                stop.clone(),
                ok_after_last_cut.clone(),
                cutting.clone(),
            );
            std::thread::spawn(move || {
                let mut n = w as u64;
                while !stop.load(Ordering::SeqCst) {
                    n = n
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    // Mostly fresh keys (a replay from the cache never meets a cut), some repeats.
                    let key = format!("k{}", (n >> 33) % 1500);
                    let engine = &engines[((n >> 20) % 2) as usize];
                    match engine.claim(request(&key)) {
                        Ok(ClaimOutcome::Claimed(lease)) => {
                            let fence = lease.fencing_token();
                            log.lock().runs.entry(key.clone()).or_default().push(fence);
                            // The operation takes a moment: cuts land between claim and
                            // completion too.
                            std::thread::sleep(Duration::from_millis(1));
                            let body = fence.to_string();
                            match lease.complete(StoredResponse::new(201, body)) {
                                Ok(()) => {
                                    let mut l = log.lock();
                                    assert!(
                                        l.acked.insert(key.clone(), fence).is_none(),
                                        "{key}: a second acknowledged completion"
                                    );
                                }
                                Err(_) => {
                                    *log.lock().failed_completions.entry(key).or_default() += 1;
                                }
                            }
                        }
                        Ok(ClaimOutcome::Replay(r)) => log.lock().replays.push((key, r.body)),
                        Ok(_) => {}
                        Err(e) => {
                            assert!(
                                matches!(e, Error::Unavailable { .. } | Error::Busy),
                                "unexpected error {e:?}"
                            );
                            *log.lock()
                                .errors
                                .entry(format!("{e:?}").chars().take(12).collect())
                                .or_default() += 1;
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                    }
                    if !cutting.load(Ordering::SeqCst) {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for round in 0..12 {
        std::thread::sleep(Duration::from_millis(120));
        if round == 6 {
            proxy.down_for(Duration::from_millis(600));
        } else {
            proxy.cut();
        }
    }
    cutting.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ok_after_last_cut.load(Ordering::SeqCst) < 50 {
        assert!(
            Instant::now() < deadline,
            "the engines did not come back by themselves"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    let log = log.lock();
    assert!(
        log.errors.values().sum::<u32>() > 0,
        "the cuts never reached a batch: the test proves nothing"
    );
    // Checked on a connection of its own, past every lock timeout.
    std::thread::sleep(Duration::from_millis(400));
    let check = open(EngineConfig::postgres(pg::url()).table(table));
    for (key, runs) in &log.runs {
        let failed = log.failed_completions.get(key).copied().unwrap_or(0);
        assert!(
            runs.len() as u32 <= 1 + failed,
            "{key} ran {} times with {failed} failed completions",
            runs.len()
        );
        if let Some(fence) = log.acked.get(key) {
            let r = replayed(check.claim(request(key)).unwrap());
            assert_eq!(
                r.body,
                fence.to_string().as_bytes(),
                "{key}: acknowledged completion lost"
            );
        }
    }
    for (key, body) in &log.replays {
        let fence: u64 = std::str::from_utf8(body).unwrap().parse().unwrap();
        assert!(
            log.runs[key].contains(&fence),
            "{key}: replayed a run that never happened"
        );
    }
    eprintln!(
        "runs {} acked {} failed completions {} replays {} errors {:?}",
        log.runs.values().map(Vec::len).sum::<usize>(),
        log.acked.len(),
        log.failed_completions.values().sum::<u32>(),
        log.replays.len(),
        log.errors
    );
}

/// Replays go through the read connections, beside the writer: while another session holds a
/// lock that makes every write wait, a retry of a completed operation is still answered at
/// once (and a new claim waits, then fails as `Unavailable` at the statement timeout, never
/// running anything).
#[test]
fn replays_do_not_wait_behind_writes() {
    let table = pg::fresh_table();
    let config = EngineConfig::postgres(pg::url())
        .table(table.clone())
        .statement_timeout(Duration::from_secs(1))
        .replay_cache_bytes(0)
        .pool_size(3);
    let engine = open(config);
    claimed(engine.claim(request("done")).unwrap())
        .complete(StoredResponse::new(201, "kept"))
        .unwrap();

    // Another session: EXCLUSIVE mode lets reads through and blocks every write.
    let holder = pg::Session::new();
    holder
        .exec(&format!("BEGIN; LOCK TABLE {table} IN EXCLUSIVE MODE"))
        .unwrap();
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(
            replayed(engine.claim(request("done")).unwrap()).body,
            b"kept"
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
    let e = engine.claim(request("new")).unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
    holder.exec("ROLLBACK").unwrap();
    // The writer is free again: the new key runs.
    claimed(engine.claim(request("new")).unwrap())
        .release()
        .unwrap();
}

/// A retention or lock timeout of `Duration::MAX` ("forever") is stored, not an overflow that
/// fails the batch (and every other caller in it).
#[test]
fn forever_is_a_long_time_not_an_overflow() {
    let engine = open(pg::config());
    let forever = request("forever")
        .lock_timeout(Duration::MAX)
        .retention(Duration::MAX);
    let mut lease = claimed(engine.claim(forever).unwrap());
    lease.extend(Duration::MAX).unwrap();
    lease.complete(StoredResponse::new(201, "kept")).unwrap();
    assert_eq!(
        replayed(engine.claim(request("forever")).unwrap()).body,
        b"kept"
    );
}

#[test]
fn a_password_never_shows_in_debug_output() {
    let config = EngineConfig::postgres("postgres://app:hunter2@db.internal/payments");
    let shown = format!("{config:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("app:***@db.internal"), "{shown}");
}

/// Every connection of the engine terminated between batches, three times: each time the
/// next batch finds its connection gone before it reached the server, so it runs on a new one
/// instead of failing; claims, completions and replays go on.
#[test]
fn every_connection_terminated_between_batches_is_replaced() {
    let engine = open(
        EngineConfig::postgres(url_with("application_name=idem_prepared"))
            .table(pg::fresh_table())
            .replay_cache_bytes(0),
    );
    for round in 0..3 {
        let key = format!("k{round}");
        claimed(engine.claim(request(&key)).unwrap())
            .complete(StoredResponse::new(201, key.clone()))
            .unwrap();
        assert_eq!(
            replayed(engine.claim(request(&key)).unwrap()).body,
            key.as_bytes()
        );
        pg::execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'idem_prepared'",
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let prepared =
        pg::query("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'idem_prepared'");
    assert_eq!(prepared, vec![Some("0".to_owned())]);
    claimed(engine.claim(request("last")).unwrap())
        .release()
        .unwrap();
}
