//! A batch whose outcome is unknown (a terminated backend, a pooler's FATAL, no answer in time)
//! runs its lease commands again on a new connection (`PgBackend::after_unknown`): a completion
//! that then finds no in-flight record is done if its record is completed under its own
//! fencing token, a release if its record is gone. Black-box: engines on a real server, a
//! second raw session holding row locks, backends terminated, connections given up or
//! black-holed by a proxy. From a review of that change, which found committed releases
//! reported `LeaseLost` (`a_release_that_committed_is_not_reported_lease_lost`).
#![cfg(feature = "postgres")]

mod pg;
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use idempotency_rs::{ClaimOutcome, Engine, EngineConfig, Error, StoredResponse};
use parking_lot::Mutex;
use support::{claimed, request};

use pg::Session;

static APP: AtomicUsize = AtomicUsize::new(0);

/// An application name no other test (or test process) uses.
fn app(name: &str) -> String {
    format!(
        "uo_{name}_{}_{}",
        std::process::id(),
        APP.fetch_add(1, Ordering::SeqCst)
    )
}

fn with_app(url: &str, app: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={app}")
}

fn count(sql: &str) -> usize {
    pg::query(sql)[0].as_deref().unwrap().parse().unwrap()
}

/// Waits until a backend of `app` waits for a lock.
fn wait_for_lock_wait(app: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}'
         AND wait_event_type = 'Lock'"
    )) == 0
    {
        assert!(Instant::now() < deadline, "{app}: no lock wait");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The pids of `app`'s backends waiting for a lock.
fn lock_waiters(app: &str) -> Vec<String> {
    pg::query(&format!(
        "SELECT pid::text FROM pg_stat_activity WHERE application_name = '{app}'
         AND wait_event_type = 'Lock'"
    ))
    .into_iter()
    .flatten()
    .collect()
}

/// Waits until a backend of `app` other than `old` waits for a lock.
fn wait_for_new_lock_wait(app: &str, old: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lock_waiters(app).iter().any(|p| !old.contains(p)) {
        assert!(Instant::now() < deadline, "{app}: no new lock wait");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn terminate(app: &str) -> usize {
    count(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE application_name = '{app}'"
    ))
}

fn wait_queued(engine: &Engine, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.queued() < n {
        assert!(Instant::now() < deadline, "queued {}", engine.queued());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// (state, fence, body, ms left on the lock) of the record of `key`, as the server sees it.
fn row(table: &str, key: &str) -> Option<(i64, u64, Option<String>, i64)> {
    let r = pg::query(&format!(
        "SELECT state::text || '|' || fence::text || '|' || coalesce(encode(body, 'escape'), '<null>')
                || '|' || (locked_until - (extract(epoch from clock_timestamp()) * 1000)::int8)::text
         FROM {table} WHERE key = '{key}'"
    ));
    let s = r.first()?.clone()?;
    let parts: Vec<&str> = s.split('|').collect();
    Some((
        parts[0].parse().unwrap(),
        parts[1].parse().unwrap(),
        (parts[2] != "<null>").then(|| parts[2].to_owned()),
        parts[3].parse().unwrap(),
    ))
}

fn body(r: &StoredResponse) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

fn hold_row(table: &str, key: &str) -> Session {
    let s = Session::new();
    s.exec(&format!(
        "BEGIN; SELECT 1 FROM {table} WHERE key = '{key}' FOR UPDATE"
    ))
    .unwrap();
    s
}

/// The question of the brief: the first run did not commit (its backend terminated while it
/// waited for a row lock), the lock timed out meanwhile, another caller took the key over and
/// completed it before the re-run. The re-run must say `LeaseLost`, never `Ok`. Whichever of
/// the re-run and the takeover gets the row first, the store and the answers must agree.
#[test]
fn a_rerun_after_a_takeover_is_lease_lost_never_ok() {
    let table = pg::fresh_table();
    let (app_a, app_b) = (app("a"), app("b"));
    let a = Engine::open(
        EngineConfig::postgres(with_app(&pg::url(), &app_a))
            .table(table.clone())
            .pool_size(1)
            .lock_timeout(Duration::from_millis(400)),
    )
    .unwrap();
    let b = Engine::open(
        EngineConfig::postgres(with_app(&pg::url(), &app_b))
            .table(table.clone())
            .pool_size(1)
            .lock_timeout(Duration::from_secs(30)),
    )
    .unwrap();
    let lease = claimed(a.claim(request("k")).unwrap());
    let fence_a = lease.fencing_token();
    let blocker = hold_row(&table, "k");
    let first = std::thread::spawn(move || lease.complete(StoredResponse::new(201, "from A")));
    wait_for_lock_wait(&app_a);
    let old = lock_waiters(&app_a);
    std::thread::sleep(Duration::from_millis(500)); // A's lock times out
    let b2 = b.clone();
    let takeover = std::thread::spawn(move || b2.claim(request("k")));
    wait_for_lock_wait(&app_b);
    assert!(terminate(&app_a) >= 1);
    wait_for_new_lock_wait(&app_a, &old); // the re-run, queued behind B's claim
    blocker.exec("ROLLBACK").unwrap();
    let taken = takeover.join().unwrap().unwrap();
    let out_a = first.join().unwrap();
    match taken {
        ClaimOutcome::Claimed(lease_b) => {
            assert!(lease_b.fencing_token() > fence_a);
            assert!(
                matches!(out_a, Err(Error::LeaseLost)),
                "A's completion was taken over by B (fence {} > {fence_a}) before its re-run, \
                 yet A was told {out_a:?}",
                lease_b.fencing_token()
            );
            lease_b
                .complete(StoredResponse::new(201, "from B"))
                .unwrap();
            let (state, fence, body_b, _) = row(&table, "k").unwrap();
            assert_eq!((state, body_b.as_deref()), (1, Some("from B")));
            assert!(fence > fence_a);
        }
        ClaimOutcome::Replay(r) => {
            eprintln!("the re-run got the row first");
            assert!(out_a.is_ok(), "{out_a:?}");
            assert_eq!(body(&r), "from A");
        }
        other => panic!("B: {other:?}; A: {out_a:?}"),
    }
    let fresh = Engine::open(pg::config().table(table.clone()).replay_cache_bytes(0)).unwrap();
    let stored = row(&table, "k").unwrap().2.unwrap();
    match fresh.claim(request("k")).unwrap() {
        ClaimOutcome::Replay(r) => assert_eq!(body(&r), stored),
        other => panic!("{other:?}"),
    }
}

/// A completion whose first run committed (a pooler gave the connection up, the server went
/// on) is `Ok`, stored once with its own body, and replays; another key's completion in the
/// same batch whose record was meanwhile taken over is `LeaseLost` and changes nothing.
#[test]
fn a_batch_given_up_settles_each_completion_by_its_own_fence() {
    let proxy = pg::proxy::Proxy::start();
    let table = pg::fresh_table();
    let app_a = app("a");
    let a = Engine::open(
        EngineConfig::postgres(with_app(&proxy.url(), &app_a))
            .table(table.clone())
            .pool_size(1)
            .lock_timeout(Duration::from_secs(30)),
    )
    .unwrap();
    let b = Engine::open(pg::config().table(table.clone()).pool_size(1)).unwrap();
    let l1 = claimed(a.claim(request("k1")).unwrap());
    let l2 = claimed(
        a.claim(request("k2").lock_timeout(Duration::from_millis(200)))
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let l2b = claimed(b.claim(request("k2")).unwrap());
    l2b.complete(StoredResponse::new(200, "k2 by B")).unwrap();
    // The writer waits on z; both completions queue behind it and go in one batch, which
    // then waits for k1.
    let lz = claimed(a.claim(request("z")).unwrap());
    let block_z = hold_row(&table, "z");
    let blocker = hold_row(&table, "k1");
    let tz = std::thread::spawn(move || lz.complete(StoredResponse::new(200, "z")));
    wait_for_lock_wait(&app_a);
    let t1 = std::thread::spawn(move || l1.complete(StoredResponse::new(201, "k1 by A")));
    let t2 = std::thread::spawn(move || l2.complete(StoredResponse::new(201, "k2 by A")));
    wait_queued(&a, 2);
    block_z.exec("ROLLBACK").unwrap();
    tz.join().unwrap().unwrap();
    wait_for_lock_wait(&app_a);
    let old = lock_waiters(&app_a);
    proxy.give_up_all();
    wait_for_new_lock_wait(&app_a, &old);
    blocker.exec("ROLLBACK").unwrap();
    let (o1, o2) = (t1.join().unwrap(), t2.join().unwrap());
    assert!(o1.is_ok(), "k1: {o1:?}");
    assert!(matches!(o2, Err(Error::LeaseLost)), "k2: {o2:?}");
    assert_eq!(row(&table, "k1").unwrap().2.as_deref(), Some("k1 by A"));
    assert_eq!(row(&table, "k2").unwrap().2.as_deref(), Some("k2 by B"));
    let fresh = Engine::open(pg::config().table(table.clone()).replay_cache_bytes(0)).unwrap();
    for (k, want) in [("k1", "k1 by A"), ("k2", "k2 by B")] {
        match fresh.claim(request(k)).unwrap() {
            ClaimOutcome::Replay(r) => assert_eq!(body(&r), want),
            other => panic!("{k}: {other:?}"),
        }
    }
}

/// A release whose first run committed (the pooler gave up, the server went on), then a new
/// claim took the key before the re-run: the new holder's record must survive the re-run.
#[test]
fn a_release_rerun_never_deletes_the_next_holders_record() {
    let proxy = pg::proxy::Proxy::start();
    let table = pg::fresh_table();
    let (app_a, app_b) = (app("a"), app("b"));
    let a = Engine::open(
        EngineConfig::postgres(with_app(&proxy.url(), &app_a))
            .table(table.clone())
            .pool_size(1),
    )
    .unwrap();
    let b = Engine::open(
        EngineConfig::postgres(with_app(&pg::url(), &app_b))
            .table(table.clone())
            .pool_size(1),
    )
    .unwrap();
    let lease = claimed(a.claim(request("k")).unwrap());
    let blocker = hold_row(&table, "k");
    let rel = std::thread::spawn(move || lease.release());
    wait_for_lock_wait(&app_a);
    let old = lock_waiters(&app_a);
    let b2 = b.clone();
    let next = std::thread::spawn(move || b2.claim(request("k")));
    wait_for_lock_wait(&app_b);
    proxy.give_up_all();
    wait_for_new_lock_wait(&app_a, &old);
    blocker.exec("ROLLBACK").unwrap();
    let rel = rel.join().unwrap();
    let lease_b = claimed(next.join().unwrap().unwrap());
    let (state, fence, _, _) = row(&table, "k").expect("the new holder's record was deleted");
    assert_eq!((state, fence), (0, lease_b.fencing_token()));
    lease_b.complete(StoredResponse::new(201, "B")).unwrap();
    eprintln!("A's release was told {rel:?}");
}

/// A release whose first run committed is not reported as a lost lease: `LeaseLost` says the
/// record was taken over, while the release did what it was asked.
#[test]
fn a_release_that_committed_is_not_reported_lease_lost() {
    let proxy = pg::proxy::Proxy::start();
    let table = pg::fresh_table();
    let app_a = app("a");
    let a = Engine::open(
        EngineConfig::postgres(with_app(&proxy.url(), &app_a))
            .table(table.clone())
            .pool_size(1),
    )
    .unwrap();
    let lease = claimed(a.claim(request("k")).unwrap());
    let blocker = hold_row(&table, "k");
    let rel = std::thread::spawn(move || lease.release());
    wait_for_lock_wait(&app_a);
    let old = lock_waiters(&app_a);
    proxy.give_up_all();
    wait_for_new_lock_wait(&app_a, &old);
    blocker.exec("ROLLBACK").unwrap();
    let rel = rel.join().unwrap();
    assert!(row(&table, "k").is_none(), "the release did not commit");
    assert!(
        !matches!(rel, Err(Error::LeaseLost)),
        "the release committed (its record is gone, nobody took the key over), yet its caller \
         was told LeaseLost: the re-run found no record under its fence and reported \
         Owned(false); it should be Ok (or Unavailable, as before the change)"
    );
}

/// An extension whose first run committed and is run again: the lock is not shortened, and the
/// caller learns the new lock.
#[test]
fn an_extension_run_twice_does_not_shorten_the_lock() {
    let proxy = pg::proxy::Proxy::start();
    let table = pg::fresh_table();
    let app_a = app("a");
    let a = Engine::open(
        EngineConfig::postgres(with_app(&proxy.url(), &app_a))
            .table(table.clone())
            .pool_size(1)
            .lock_timeout(Duration::from_secs(2)),
    )
    .unwrap();
    let mut lease = claimed(a.claim(request("k")).unwrap());
    let blocker = hold_row(&table, "k");
    let ext = std::thread::spawn(move || {
        let r = lease.extend(Duration::from_secs(60));
        (lease, r)
    });
    wait_for_lock_wait(&app_a);
    let old = lock_waiters(&app_a);
    proxy.give_up_all();
    wait_for_new_lock_wait(&app_a, &old);
    blocker.exec("ROLLBACK").unwrap();
    let (lease, r) = ext.join().unwrap();
    assert!(r.is_ok(), "{r:?}");
    let left = row(&table, "k").unwrap().3;
    assert!(
        left > 55_000,
        "lock left {left} ms after an extension by 60 s"
    );
    let seen = lease
        .locked_until()
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(seen > Duration::from_secs(55), "{seen:?}");
    lease.complete(StoredResponse::new(200, "x")).unwrap();
}

/// An extension whose first run did not commit, re-run after another caller took the key
/// over: `LeaseLost`, and the other holder's lock is not moved.
#[test]
fn an_extension_rerun_never_lands_on_another_holders_lease() {
    let table = pg::fresh_table();
    let (app_a, app_b) = (app("a"), app("b"));
    let a = Engine::open(
        EngineConfig::postgres(with_app(&pg::url(), &app_a))
            .table(table.clone())
            .pool_size(1)
            .lock_timeout(Duration::from_millis(400)),
    )
    .unwrap();
    let b = Engine::open(
        EngineConfig::postgres(with_app(&pg::url(), &app_b))
            .table(table.clone())
            .pool_size(1)
            .lock_timeout(Duration::from_secs(5)),
    )
    .unwrap();
    let mut lease = claimed(a.claim(request("k")).unwrap());
    let blocker = hold_row(&table, "k");
    let ext = std::thread::spawn(move || lease.extend(Duration::from_secs(120)));
    wait_for_lock_wait(&app_a);
    let old = lock_waiters(&app_a);
    std::thread::sleep(Duration::from_millis(500));
    let b2 = b.clone();
    let takeover = std::thread::spawn(move || b2.claim(request("k")));
    wait_for_lock_wait(&app_b);
    assert!(terminate(&app_a) >= 1);
    wait_for_new_lock_wait(&app_a, &old);
    blocker.exec("ROLLBACK").unwrap();
    let taken = takeover.join().unwrap().unwrap();
    let r = ext.join().unwrap();
    let left = row(&table, "k").unwrap().3;
    match taken {
        ClaimOutcome::Claimed(lease_b) => {
            assert!(matches!(r, Err(Error::LeaseLost)), "A's extension: {r:?}");
            assert!(
                left <= 5_000,
                "B's lock (5 s) now has {left} ms left: A's extension landed on B's lease"
            );
            lease_b.complete(StoredResponse::new(200, "B")).unwrap();
        }
        other => {
            eprintln!("the re-run got the row first: B got {other:?}");
            assert!(r.is_ok(), "{r:?}");
            assert!(left > 100_000, "{left}");
        }
    }
}

/// A release of `k` and a claim of `k` in the same batch, given up mid-flight (`give_up`:
/// the server goes on and commits) or terminated (rolled back). What the callers see, and the
/// store must stay consistent: never a completed record, a record in flight only under a fence
/// newer than the release's, and the key claimable again (after the lock timeout at most).
/// `mode`: 0 the pooler gives up (the server sees its socket closed and usually rolls back at
/// its next write), 1 the backend is terminated (rolled back), 2 a black hole (the server goes
/// on and commits; the engine hears nothing).
fn release_and_claim_in_one_batch(mode: u8) -> (Result<(), Error>, String) {
    let give_up = mode;
    let proxy = pg::proxy::Proxy::start();
    let stall = Stall::start();
    let table = pg::fresh_table();
    let app_a = app("a");
    let url = if mode == 2 { stall.url() } else { proxy.url() };
    let a = Engine::open(
        EngineConfig::postgres(with_app(&url, &app_a))
            .table(table.clone())
            .pool_size(1)
            .statement_timeout(Duration::from_secs(2))
            .lock_timeout(Duration::from_millis(800)),
    )
    .unwrap();
    let lz = claimed(a.claim(request("z")).unwrap());
    let lk = claimed(a.claim(request("k")).unwrap());
    let fence_k = lk.fencing_token();
    let block_z = hold_row(&table, "z");
    let block_k = hold_row(&table, "k");
    let tz = std::thread::spawn(move || lz.complete(StoredResponse::new(200, "z")));
    wait_for_lock_wait(&app_a);
    let rel = std::thread::spawn(move || lk.release());
    wait_queued(&a, 1);
    let a2 = a.clone();
    let cl = std::thread::spawn(move || a2.claim(request("k")));
    wait_queued(&a, 2);
    block_z.exec("ROLLBACK").unwrap();
    tz.join().unwrap().unwrap();
    wait_for_lock_wait(&app_a); // the batch [release k, claim k] waits for k
    let old = lock_waiters(&app_a);
    match mode {
        0 => proxy.give_up_all(),
        1 => assert!(terminate(&app_a) >= 1),
        _ => stall.stall_all(),
    }
    if mode == 2 {
        std::thread::sleep(Duration::from_millis(200));
    } else {
        wait_for_new_lock_wait(&app_a, &old);
    }
    block_k.exec("ROLLBACK").unwrap();
    let rel = rel.join().unwrap();
    let cl = cl.join().unwrap();
    let claim_seen = match &cl {
        Ok(ClaimOutcome::Claimed(l)) => format!("Claimed(fence {})", l.fencing_token()),
        other => format!("{other:?}"),
    };
    let stored = row(&table, "k");
    eprintln!(
        "mode {give_up}: release {rel:?}; claim {claim_seen}; record (state, fence, body, \
         lock left) {stored:?} (released fence {fence_k})"
    );
    if let Some((state, fence, _, _)) = stored {
        assert_eq!(state, 0, "a record nobody completed is completed");
        assert!(fence > fence_k, "the release did not happen: {stored:?}");
    }
    if let Ok(ClaimOutcome::Claimed(l)) = cl {
        l.release().unwrap();
    } else {
        // The key must be claimable again within its lock timeout.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match a.claim(request("k")) {
                Ok(ClaimOutcome::Claimed(l)) => {
                    l.complete(StoredResponse::new(200, "k")).unwrap();
                    break;
                }
                other => {
                    assert!(Instant::now() < deadline, "k stays unclaimable: {other:?}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
    (rel, claim_seen)
}

#[test]
fn release_and_claim_of_one_key_in_a_batch_given_up() {
    let (rel, claim) = release_and_claim_in_one_batch(0);
    assert!(
        !matches!(rel, Err(Error::LeaseLost)),
        "release: {rel:?} (claim {claim})"
    );
}

#[test]
fn release_and_claim_of_one_key_in_a_batch_black_holed() {
    let (rel, _) = release_and_claim_in_one_batch(2);
    assert!(
        !matches!(rel, Err(Error::LeaseLost)),
        "the release committed (a later claim in the same transaction took the key), yet its \
         caller was told LeaseLost"
    );
}

#[test]
fn release_and_claim_of_one_key_in_a_batch_terminated() {
    let (rel, claim) = release_and_claim_in_one_batch(1);
    assert!(rel.is_ok(), "release: {rel:?} (claim {claim})");
}

/// The first transaction waits for a row lock another session holds when the pooler gives
/// the connection up; the re-run waits behind it. The caller (and a claim queued behind it)
/// must be answered within about two statement timeouts.
#[test]
fn a_rerun_behind_a_held_row_answers_within_two_statement_timeouts() {
    let proxy = pg::proxy::Proxy::start();
    let table = pg::fresh_table();
    let app_a = app("a");
    let st = Duration::from_secs(1);
    let a = Engine::open(
        EngineConfig::postgres(with_app(&proxy.url(), &app_a))
            .table(table.clone())
            .pool_size(1)
            .statement_timeout(st),
    )
    .unwrap();
    let lease = claimed(a.claim(request("k")).unwrap());
    let blocker = hold_row(&table, "k");
    let started = Instant::now();
    let t = std::thread::spawn(move || {
        let r = lease.complete(StoredResponse::new(200, "k"));
        (r, started.elapsed())
    });
    wait_for_lock_wait(&app_a);
    let a2 = a.clone();
    let other = std::thread::spawn(move || {
        let s = Instant::now();
        let r = a2
            .claim(request("other"))
            .map(|o| matches!(o, ClaimOutcome::Claimed(_)));
        (r, s.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    proxy.give_up_all();
    let (r, took) = t.join().unwrap();
    let (ro, took_o) = other.join().unwrap();
    blocker.exec("ROLLBACK").unwrap();
    eprintln!("completion {r:?} after {took:?}; queued claim {ro:?} after {took_o:?}");
    assert!(
        took < st * 2 + Duration::from_millis(700),
        "the completion took {took:?} (statement timeout {st:?})"
    );
    assert!(
        took_o < st * 2 + Duration::from_millis(900),
        "a claim queued behind it took {took_o:?}"
    );
    assert!(matches!(r, Err(Error::Unavailable { .. })), "{r:?}");
    // The record stays in flight (neither run committed), under the lease's fence.
    assert_eq!(row(&table, "k").unwrap().0, 0);
}

/// A TCP proxy whose existing connections can be black-holed (nothing forwarded either way,
/// nothing closed): what a partitioned network looks like. New connections pass.
struct Stall {
    port: u16,
    generation: Arc<AtomicU64>,
}

impl Stall {
    fn start() -> Stall {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let generation = Arc::new(AtomicU64::new(0));
        let g = generation.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap().port()).unwrap();
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    let born = g.load(Ordering::SeqCst);
                    let g = g.clone();
                    tokio::spawn(async move {
                        let Ok(server) = tokio::net::TcpStream::connect("127.0.0.1:5432").await
                        else {
                            return;
                        };
                        let (mut cr, mut cw) = client.into_split();
                        let (mut sr, mut sw) = server.into_split();
                        let g2 = g.clone();
                        let up = async move {
                            let mut buf = vec![0u8; 65536];
                            loop {
                                let n = cr.read(&mut buf).await.unwrap_or(0);
                                if g2.load(Ordering::SeqCst) != born {
                                    std::future::pending::<()>().await;
                                }
                                if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        };
                        let down = async move {
                            let mut buf = vec![0u8; 65536];
                            loop {
                                let n = sr.read(&mut buf).await.unwrap_or(0);
                                if g.load(Ordering::SeqCst) != born {
                                    std::future::pending::<()>().await;
                                }
                                if n == 0 || cw.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        };
                        tokio::select! { _ = up => {}, _ = down => {} }
                    });
                }
            });
        });
        Stall {
            port: rx.recv().unwrap(),
            generation,
        }
    }

    fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/test?sslmode=disable",
            self.port
        )
    }

    fn stall_all(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// The first run gets no answer at all (a black hole) while it waits for a held row; the
/// re-run waits for the same row. Bound: the first run's deadline (statement timeout + 1 s)
/// plus the re-run's statement timeout, about two statement timeouts and the network second.
#[test]
fn a_black_holed_batch_answers_within_two_deadlines() {
    if !pg::url().contains("127.0.0.1:5432") {
        return;
    }
    let stall = Stall::start();
    let table = pg::fresh_table();
    let app_a = app("a");
    let st = Duration::from_secs(1);
    let a = Engine::open(
        EngineConfig::postgres(with_app(&stall.url(), &app_a))
            .table(table.clone())
            .pool_size(1)
            .statement_timeout(st),
    )
    .unwrap();
    let lease = claimed(a.claim(request("k")).unwrap());
    let blocker = hold_row(&table, "k");
    let started = Instant::now();
    let t = std::thread::spawn(move || {
        let r = lease.complete(StoredResponse::new(200, "k"));
        (r, started.elapsed())
    });
    wait_for_lock_wait(&app_a);
    stall.stall_all();
    let (r, took) = t.join().unwrap();
    blocker.exec("ROLLBACK").unwrap();
    eprintln!("completion {r:?} after {took:?}");
    let bound = (st + Duration::from_secs(1)) * 2 + Duration::from_millis(500);
    assert!(took < bound, "took {took:?}, bound {bound:?}");
    assert!(r.is_err(), "{r:?}");
}

/// Load with repeated cuts (the pooler's FATAL, resets, terminated backends): no key's
/// operation runs twice (the lock timeout is long: nothing may be taken over), no completion
/// is `LeaseLost`, and every acknowledged completion replays its own body.
#[test]
fn cuts_under_load_run_nothing_twice_and_lose_no_acknowledged_completion() {
    let proxy = Arc::new(pg::proxy::Proxy::start());
    let table = pg::fresh_table();
    let app_v = app("victim");
    let st = Duration::from_secs(2);
    let victim = Engine::open(
        EngineConfig::postgres(with_app(&proxy.url(), &app_v))
            .table(table.clone())
            .pool_size(2)
            .statement_timeout(st)
            .lock_timeout(Duration::from_secs(60)),
    )
    .unwrap();
    let steady = Engine::open(
        pg::config()
            .table(table.clone())
            .statement_timeout(st)
            .lock_timeout(Duration::from_secs(60)),
    )
    .unwrap();
    // Every write takes a few ms more, so that cuts land mid-batch (and between a COMMIT and
    // its answer) too.
    let schema = table.split('.').next().unwrap();
    pg::execute(&format!(
        "CREATE FUNCTION \"{schema}\".slow() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_sleep(0.003); RETURN NEW; END $$;
         CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON {table}
           FOR EACH ROW EXECUTE FUNCTION \"{schema}\".slow()"
    ));
    let keys: Vec<String> = (0..600).map(|i| format!("k{i}")).collect();
    let until = Instant::now() + Duration::from_secs(6);
    let ran: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let failed: Arc<Mutex<Vec<(String, Error)>>> = Arc::default();
    let bad_replays: Arc<Mutex<Vec<String>>> = Arc::default();
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let claim_errors: Arc<Mutex<HashMap<&'static str, usize>>> = Arc::default();
    let killed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let (stop, proxy, app_v) = (stop.clone(), proxy.clone(), app_v.clone());
        let killed = killed.clone();
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(Ordering::SeqCst) {
                match i % 3 {
                    0 => proxy.give_up_all(),
                    1 => proxy.cut(),
                    _ => {
                        killed.fetch_add(terminate(&app_v), Ordering::SeqCst);
                    }
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(15));
            }
        })
    };
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let engine = if w < 5 {
                victim.clone()
            } else {
                steady.clone()
            };
            let mut order = keys.clone();
            order.rotate_left(w * 100);
            let claim_errors = claim_errors.clone();
            let (ran, acked, failed, bad, slowest) = (
                ran.clone(),
                acked.clone(),
                failed.clone(),
                bad_replays.clone(),
                slowest.clone(),
            );
            std::thread::spawn(move || {
                for (n, key) in order.into_iter().enumerate() {
                    if Instant::now() > until {
                        break;
                    }
                    let s = Instant::now();
                    let outcome = engine.claim(request(&key));
                    {
                        let t = s.elapsed();
                        let mut g = slowest.lock();
                        *g = (*g).max(t);
                    }
                    match outcome {
                        Ok(ClaimOutcome::Claimed(lease)) => {
                            *ran.lock().entry(key.clone()).or_default() += 1;
                            let b = format!("{key} by {w}/{n}");
                            let s = Instant::now();
                            let done = lease.complete(StoredResponse::new(201, b.clone()));
                            {
                                let t = s.elapsed();
                                let mut g = slowest.lock();
                                *g = (*g).max(t);
                            }
                            match done {
                                Ok(()) => {
                                    acked.lock().insert(key.clone(), b);
                                }
                                Err(e) => failed.lock().push((key.clone(), e)),
                            }
                        }
                        Ok(ClaimOutcome::Replay(r)) => {
                            if let Some(want) = acked.lock().get(&key)
                                && *want != body(&r)
                            {
                                bad.lock().push(format!("{key}: {} != {want}", body(&r)));
                            }
                        }
                        Err(e) => {
                            *claim_errors.lock().entry(e.kind()).or_default() += 1;
                        }
                        _ => {}
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
    let ran = ran.lock().clone();
    let acked = acked.lock().clone();
    let failed = failed.lock().clone();
    eprintln!(
        "{} keys run, {} completions acknowledged, {} failed ({:?}); claim errors {:?}; \
         slowest call {:?}; {} backends terminated",
        ran.len(),
        acked.len(),
        failed.len(),
        failed
            .iter()
            .map(|(_, e)| e.kind())
            .collect::<std::collections::HashSet<_>>(),
        claim_errors.lock(),
        *slowest.lock(),
        killed.load(Ordering::SeqCst)
    );
    let twice: Vec<_> = ran.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "operations run twice: {twice:?}");
    let lost: Vec<_> = failed
        .iter()
        .filter(|(_, e)| matches!(e, Error::LeaseLost))
        .collect();
    assert!(
        lost.is_empty(),
        "completions told LeaseLost though nothing could be taken over: {lost:?}"
    );
    let bad = bad_replays.lock().clone();
    assert!(bad.is_empty(), "replays of another body: {bad:?}");
    assert!(!acked.is_empty());
    assert!(
        *slowest.lock() < st * 3 + Duration::from_secs(2),
        "slowest call {:?}",
        *slowest.lock()
    );
    let fresh = Engine::open(
        pg::config()
            .table(table.clone())
            .pool_size(1)
            .replay_cache_bytes(0),
    )
    .unwrap();
    for (key, want) in &acked {
        match fresh.claim(request(key)).unwrap() {
            ClaimOutcome::Replay(r) => assert_eq!(&body(&r), want, "{key}"),
            other => panic!("{key}: acknowledged ({want}) but {other:?}"),
        }
    }
    // Every failed completion's record is in flight under its fence or completed: never gone.
    for (key, e) in &failed {
        let r = row(&table, key);
        assert!(
            r.is_some(),
            "{key}: completion failed ({e:?}) and its record is gone"
        );
    }
}
