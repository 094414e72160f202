//! `cargo test --test integration_tests`: the high-level API as a new user meets it, over a
//! real store, with no feature to name: named operations and settings beside the seed's
//! signatures, validation failures a client can fix and retry, `InFlight` hints that follow
//! what the operations take, and a store that opens without blocking the runtime.
//!
//! With `--features axum-integration` (`make test` turns every feature on) the same target also
//! runs the Axum suite (`tests/integration/axum.rs`): the shared HTTP contract on a real server.

#[cfg(feature = "axum-integration")]
#[path = "integration/axum.rs"]
mod axum;
#[cfg(feature = "axum-integration")]
mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use idempotency_rs::contract::store_all_4xx;
use idempotency_rs::{
    BoxError, EngineConfig, Error, IdempotencyMiddleware, KeyPolicy, Operation, ProcessError,
    ProcessedResponse, SqliteIdempotencyStore,
};
use serde_json::{Value, json};

const KEY: &str = "5b3c1f9e-8d2a-4c7b-9e1f-0a6d4b2c8e71";

type Answer = Result<(u16, HashMap<String, String>, Value), BoxError>;

/// Business logic that counts its runs and answers `status` with the run's number.
#[derive(Clone, Default)]
struct Logic(Arc<AtomicUsize>);

impl Logic {
    fn runs(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    fn answer(&self, status: u16) -> impl FnOnce() -> std::future::Ready<Answer> + use<> {
        let runs = self.0.clone();
        move || {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            std::future::ready(Ok((status, HashMap::new(), json!({ "run": n }))))
        }
    }
}

async fn memory_store() -> SqliteIdempotencyStore {
    SqliteIdempotencyStore::new("sqlite::memory:")
        .await
        .unwrap()
}

fn order(quantity: u32) -> Value {
    json!({"symbol": "AAPL", "quantity": quantity})
}

#[tokio::test]
async fn an_operation_names_what_process_request_takes_in_order() {
    let m = IdempotencyMiddleware::new(memory_store().await);
    let logic = Logic::default();
    // The seed's form first...
    let first: ProcessedResponse<Value> = m
        .process_request(
            Some(KEY.into()),
            "user123".into(),
            "/api/orders".into(),
            "POST".into(),
            &order(10),
            logic.answer(201),
        )
        .await
        .unwrap();
    // ...and the named form is the same request: a replay.
    let op = Operation::post("/api/orders").scope("user123").key(KEY);
    let retry: ProcessedResponse<Value> =
        m.process(op, &order(10), logic.answer(201)).await.unwrap();
    assert!(!first.replayed && retry.replayed);
    assert_eq!(retry.body, json!({"run": 1}));
    assert_eq!(logic.runs(), 1);

    // Another scope is another record; no key runs without deduplication.
    let other = Operation::post("/api/orders").scope("user456").key(KEY);
    let r: ProcessedResponse<Value> = m
        .process(other, &order(10), logic.answer(201))
        .await
        .unwrap();
    assert!(!r.replayed);
    let keyless = Operation::post("/api/orders")
        .scope("user123")
        .maybe_key(None::<String>);
    for _ in 0..2 {
        let r: ProcessedResponse<Value> = m
            .process(keyless.clone(), &order(10), logic.answer(201))
            .await
            .unwrap();
        assert!(!r.replayed);
    }
    assert_eq!(logic.runs(), 4);
}

#[tokio::test]
async fn a_method_and_path_passed_in_each_others_place_are_refused_and_nothing_runs() {
    let m = IdempotencyMiddleware::new(memory_store().await);
    let logic = Logic::default();
    for op in [
        Operation::new("/api/orders", "POST"),
        Operation::new("POST", "api/orders"),
        Operation::new("", "/api/orders"),
        Operation::new("PO ST", "/api/orders"),
    ] {
        let op = op.scope("user123").key(KEY);
        match m
            .process::<_, Value, _, _>(op.clone(), &order(1), logic.answer(201))
            .await
        {
            Err(ProcessError::InvalidOperation { detail }) => assert!(!detail.is_empty()),
            other => panic!("{op:?}: expected InvalidOperation, got {other:?}"),
        }
    }
    assert_eq!(logic.runs(), 0);
    // A method in lower case is the same operation as in upper case.
    let lower = Operation::new("post", "/api/orders")
        .scope("user123")
        .key(KEY);
    let upper = Operation::post("/api/orders").scope("user123").key(KEY);
    let _: ProcessedResponse<Value> = m
        .process(lower, &order(1), logic.answer(201))
        .await
        .unwrap();
    let r: ProcessedResponse<Value> = m
        .process(upper, &order(1), logic.answer(201))
        .await
        .unwrap();
    assert!(r.replayed);
}

#[tokio::test]
async fn the_builder_names_the_durations_the_seed_takes_in_order() {
    let day = Duration::from_secs(24 * 3600);
    let store = memory_store().await;
    let seed = IdempotencyMiddleware::with_config(store.clone(), 2 * day, Duration::from_secs(5));
    let named = IdempotencyMiddleware::builder(store.clone())
        .lock_timeout(Duration::from_secs(5))
        .retention(2 * day)
        .build();
    for m in [&seed, &named] {
        assert_eq!(m.ttl(), 2 * day);
        assert_eq!(m.lock_timeout(), Duration::from_secs(5));
    }
    let defaults = IdempotencyMiddleware::new(store);
    assert_eq!(defaults.ttl(), day);
    assert_eq!(defaults.lock_timeout(), Duration::from_secs(30));

    // The key policy, from the crate root.
    let opaque = IdempotencyMiddleware::builder(memory_store().await)
        .key_policy(KeyPolicy::Opaque)
        .build();
    let op = Operation::post("/api/orders").key("order-42");
    let r: ProcessedResponse<Value> = opaque
        .process(op.clone(), &order(1), Logic::default().answer(201))
        .await
        .unwrap();
    assert!(!r.replayed);
    assert!(matches!(
        named
            .process::<_, Value, _, _>(op, &order(1), Logic::default().answer(201))
            .await,
        Err(ProcessError::InvalidKey { .. })
    ));
}

#[tokio::test]
async fn a_validation_failure_is_not_stored_so_the_fixed_request_runs_under_the_same_key() {
    let m = IdempotencyMiddleware::new(memory_store().await);
    let logic = Logic::default();
    let op = Operation::post("/api/orders").scope("user123").key(KEY);
    // The first attempt fails validation (quantity 0): 422, and the key is free again.
    let r: ProcessedResponse<Value> = m
        .process(op.clone(), &order(0), logic.answer(422))
        .await
        .unwrap();
    assert_eq!((r.status, r.replayed), (422, false));
    // The client fixes the request and retries with the same key: it runs.
    let r: ProcessedResponse<Value> = m
        .process(op.clone(), &order(5), logic.answer(201))
        .await
        .unwrap();
    assert_eq!((r.status, r.replayed), (201, false));
    // From now on the key is spent on the fixed request.
    let r: ProcessedResponse<Value> = m
        .process(op.clone(), &order(5), logic.answer(201))
        .await
        .unwrap();
    assert!(r.replayed);
    assert!(matches!(
        m.process::<_, Value, _, _>(op, &order(0), logic.answer(422))
            .await,
        Err(ProcessError::KeyMismatch)
    ));
    assert_eq!(logic.runs(), 2);
}

#[tokio::test]
async fn with_store_all_4xx_a_validation_failure_is_replayed() {
    let m = IdempotencyMiddleware::builder(memory_store().await)
        .store_when(store_all_4xx)
        .build();
    let logic = Logic::default();
    let op = Operation::post("/api/orders").scope("user123").key(KEY);
    let _: ProcessedResponse<Value> = m
        .process(op.clone(), &order(0), logic.answer(422))
        .await
        .unwrap();
    let r: ProcessedResponse<Value> = m
        .process(op.clone(), &order(0), logic.answer(422))
        .await
        .unwrap();
    assert_eq!((r.status, r.replayed), (422, true));
    assert!(matches!(
        m.process::<_, Value, _, _>(op, &order(5), logic.answer(201))
            .await,
        Err(ProcessError::KeyMismatch)
    ));
    assert_eq!(logic.runs(), 1);
}

/// Holds an operation of `path` in flight on `m` until the returned sender fires.
async fn hold(
    m: &IdempotencyMiddleware,
    path: &str,
    key: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (entered_tx, entered_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let m = m.clone();
    let op = Operation::post(path).key(key);
    let task = tokio::spawn(async move {
        let _: ProcessedResponse<Value> = m
            .process(op, &order(1), || async move {
                entered_tx.send(()).unwrap();
                finish_rx.await.unwrap();
                Ok((201, HashMap::new(), json!({})))
            })
            .await
            .unwrap();
    });
    entered_rx.await.unwrap();
    (finish_tx, task)
}

async fn in_flight_hint(m: &IdempotencyMiddleware, path: &str, key: &str) -> Duration {
    let op = Operation::post(path).key(key);
    match m
        .process::<_, Value, _, _>(op, &order(1), Logic::default().answer(201))
        .await
    {
        Err(ProcessError::InFlight { retry_after }) => retry_after,
        other => panic!("expected InFlight, got {other:?}"),
    }
}

/// A run of `path` that takes `took`.
async fn run_for(m: &IdempotencyMiddleware, path: &str, took: Duration) {
    let op = Operation::post(path).key(uuid::Uuid::new_v4().to_string());
    let _: ProcessedResponse<Value> = m
        .process(op, &order(1), || async move {
            tokio::time::sleep(took).await;
            Ok((201, HashMap::new(), json!({})))
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn an_in_flight_hint_follows_what_the_path_takes_not_the_whole_lock_timeout() {
    let m = IdempotencyMiddleware::new(memory_store().await);
    assert_eq!(m.lock_timeout(), Duration::from_secs(30));

    // No run of the path seen yet: a second, not the 30 s of the lock.
    let (go, task) = hold(&m, "/fresh", KEY).await;
    let hint = in_flight_hint(&m, "/fresh", KEY).await;
    assert!(hint <= Duration::from_secs(1), "{hint:?}");
    go.send(()).unwrap();
    task.await.unwrap();

    // Fast runs: the shortest hint (100 ms).
    for _ in 0..3 {
        run_for(&m, "/fast", Duration::ZERO).await;
    }
    let key = uuid::Uuid::new_v4().to_string();
    let (go, task) = hold(&m, "/fast", &key).await;
    let hint = in_flight_hint(&m, "/fast", &key).await;
    assert_eq!(hint, Duration::from_millis(100));
    go.send(()).unwrap();
    task.await.unwrap();

    // Runs of about 600 ms: a retry is told about what is left of one.
    run_for(&m, "/slow", Duration::from_millis(600)).await;
    let key = uuid::Uuid::new_v4().to_string();
    let (go, task) = hold(&m, "/slow", &key).await;
    let hint = in_flight_hint(&m, "/slow", &key).await;
    assert!(
        hint > Duration::from_millis(300) && hint <= Duration::from_millis(700),
        "{hint:?}"
    );
    go.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn an_in_flight_hint_never_passes_the_cap_or_the_lock_timeout() {
    let m = IdempotencyMiddleware::builder(memory_store().await)
        .retry_after_max(Duration::from_millis(40))
        .build();
    let (go, task) = hold(&m, "/capped", KEY).await;
    assert!(in_flight_hint(&m, "/capped", KEY).await <= Duration::from_millis(40));
    go.send(()).unwrap();
    task.await.unwrap();

    let m = IdempotencyMiddleware::builder(memory_store().await)
        .lock_timeout(Duration::from_millis(300))
        .build();
    run_for(&m, "/long", Duration::from_millis(500)).await;
    let key = uuid::Uuid::new_v4().to_string();
    let (go, task) = hold(&m, "/long", &key).await;
    assert!(in_flight_hint(&m, "/long", &key).await <= Duration::from_millis(300));
    go.send(()).unwrap();
    task.await.unwrap();
}

/// A current-thread runtime has one thread: if opening the store blocked it while the file's
/// lock is held, the task that lets the lock go could never run, and the open would time out.
#[test]
fn opening_a_store_does_not_block_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idempotency.db");
    let holder = SqliteIdempotencyStore::with_config(EngineConfig::new(&path)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let ticks = Arc::new(AtomicUsize::new(0));
        let ticker = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    ticks.fetch_add(1, Ordering::SeqCst);
                }
                // Lets the file go while the open below waits for it.
                holder.engine().shutdown().unwrap();
            })
        };
        let started = Instant::now();
        let store = SqliteIdempotencyStore::open(
            EngineConfig::new(&path).open_timeout(Duration::from_secs(10)),
        )
        .await
        .unwrap();
        assert_eq!(
            ticks.load(Ordering::SeqCst),
            10,
            "the runtime ran while the open waited"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        ticker.await.unwrap();
        // And a store that cannot open says why, without blocking either.
        match SqliteIdempotencyStore::new(path.to_str().unwrap()).await {
            Err(Error::AlreadyOpen { .. }) => {}
            other => panic!("expected AlreadyOpen, got {other:?}"),
        }
        drop(store);
    });
}
