//! The high-level API, `IdempotencyMiddleware::process_request` over a `SqliteIdempotencyStore`,
//! through its public surface only: every typed outcome and error, what is stored and what is
//! released, canonical JSON fingerprints, retention, and 50 concurrent callers with one key.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idempotency_rs::contract::KeyPolicy;
use idempotency_rs::{
    BoxError, EngineConfig, Error, IdempotencyMiddleware, ManualClock, ProcessError,
    ProcessedResponse, SqliteIdempotencyStore,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;

const KEY: &str = "0b6f5a3e-9a7c-4c1e-8f2a-2d8b4f1e6c3a";

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Order {
    id: u32,
    symbol: String,
}

type Outcome = Result<ProcessedResponse<Order>, ProcessError>;

/// What the business logic returns: status, headers, typed body.
type Answer = Result<(u16, HashMap<String, String>, Order), BoxError>;

/// Counts runs of the business logic and answers `status` with order number `runs`.
#[derive(Clone, Default)]
struct Logic {
    runs: Arc<AtomicUsize>,
}

impl Logic {
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    fn handler(&self, status: u16) -> impl FnOnce() -> std::future::Ready<Answer> {
        let runs = self.runs.clone();
        move || {
            let n = runs.fetch_add(1, Ordering::SeqCst) as u32 + 1;
            let headers = HashMap::from([("location".to_string(), format!("/orders/{n}"))]);
            std::future::ready(Ok((
                status,
                headers,
                Order {
                    id: n,
                    symbol: "AAPL".into(),
                },
            )))
        }
    }
}

mod stores;

/// A middleware on the running test's store (see `on_both_stores!`).
async fn memory() -> IdempotencyMiddleware {
    IdempotencyMiddleware::new(stores::engine())
}

async fn call(
    m: &IdempotencyMiddleware,
    key: Option<&str>,
    request: &serde_json::Value,
    logic: &Logic,
    status: u16,
) -> Outcome {
    m.process_request(
        key.map(str::to_owned),
        "user123".into(),
        "/api/orders".into(),
        "POST".into(),
        request,
        logic.handler(status),
    )
    .await
}

/// `process_request` with [`KEY`], scope `user123` and `POST /api/orders`, for any request,
/// response type and business logic.
async fn process<Req, Resp, F, Fut>(
    m: &IdempotencyMiddleware,
    request: &Req,
    handler: F,
) -> Result<ProcessedResponse<Resp>, ProcessError>
where
    Req: Serialize + ?Sized,
    Resp: Serialize + DeserializeOwned,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(u16, HashMap<String, String>, Resp), BoxError>>,
{
    m.process_request(
        Some(KEY.into()),
        "user123".into(),
        "/api/orders".into(),
        "POST".into(),
        request,
        handler,
    )
    .await
}

fn order() -> serde_json::Value {
    json!({"symbol": "AAPL", "quantity": 10, "price": 150.5})
}

on_both_stores! {
#[tokio::test]
async fn the_first_call_runs_and_a_retry_replays_status_headers_and_body() {
    let m = memory().await;
    let logic = Logic::default();
    let first = call(&m, Some(KEY), &order(), &logic, 201).await.unwrap();
    assert!(!first.replayed);
    assert_eq!(first.status, 201);
    assert_eq!(first.body.id, 1);
    let retry = call(&m, Some(KEY), &order(), &logic, 201).await.unwrap();
    assert!(retry.replayed);
    assert_eq!(
        (retry.status, &retry.headers, &retry.body),
        (first.status, &first.headers, &first.body)
    );
    assert_eq!(retry.headers["location"], "/orders/1");
    assert_eq!(logic.runs(), 1);
}

#[tokio::test]
async fn without_a_key_every_call_runs() {
    let m = memory().await;
    let logic = Logic::default();
    for _ in 0..3 {
        let r = call(&m, None, &order(), &logic, 201).await.unwrap();
        assert!(!r.replayed);
    }
    assert_eq!(logic.runs(), 3);
}

#[tokio::test]
async fn malformed_keys_are_invalid_and_nothing_runs() {
    let m = memory().await;
    let logic = Logic::default();
    for key in [
        "",
        "not-a-uuid",
        "0b6f5a3e-9a7c-4c1e-8f2a-2d8b4f1e6c3",
        "ключ",
        "a\tb",
    ] {
        match call(&m, Some(key), &order(), &logic, 201).await {
            Err(ProcessError::InvalidKey { detail }) => assert!(!detail.is_empty()),
            other => panic!("{key:?}: expected InvalidKey, got {other:?}"),
        }
    }
    let long = "k".repeat(256);
    let opaque = memory().await.key_policy(KeyPolicy::Opaque);
    assert!(matches!(
        call(&opaque, Some(&long), &order(), &logic, 201).await,
        Err(ProcessError::InvalidKey { .. })
    ));
    assert_eq!(logic.runs(), 0);
    // The opaque policy accepts keys that are not UUIDs.
    let r = call(&opaque, Some("order-42"), &order(), &logic, 201)
        .await
        .unwrap();
    assert!(!r.replayed);
    assert!(
        call(&opaque, Some("order-42"), &order(), &logic, 201)
            .await
            .unwrap()
            .replayed
    );
}

#[tokio::test]
async fn an_unusable_scope_is_its_own_error() {
    let m = memory().await;
    let logic = Logic::default();
    for scope in ["a\0b".to_string(), "s".repeat(1025)] {
        let got = m
            .process_request(
                Some(KEY.into()),
                scope,
                "/api/orders".into(),
                "POST".into(),
                &order(),
                logic.handler(201),
            )
            .await;
        assert!(
            matches!(got, Err(ProcessError::InvalidScope { .. })),
            "{got:?}"
        );
    }
    assert_eq!(logic.runs(), 0);
}

#[tokio::test]
async fn another_payload_method_or_path_under_the_same_key_is_a_mismatch() {
    let m = memory().await;
    let logic = Logic::default();
    call(&m, Some(KEY), &order(), &logic, 201).await.unwrap();
    let other = json!({"symbol": "AAPL", "quantity": 11, "price": 150.5});
    assert!(matches!(
        call(&m, Some(KEY), &other, &logic, 201).await,
        Err(ProcessError::KeyMismatch)
    ));
    for (path, method) in [("/api/refunds", "POST"), ("/api/orders", "PATCH")] {
        let got = m
            .process_request(
                Some(KEY.into()),
                "user123".into(),
                path.into(),
                method.into(),
                &order(),
                logic.handler(201),
            )
            .await;
        assert!(
            matches!(got, Err(ProcessError::KeyMismatch)),
            "{path} {method}: {got:?}"
        );
    }
    // The method is compared case-insensitively.
    let lower = m
        .process_request(
            Some(KEY.into()),
            "user123".into(),
            "/api/orders".into(),
            "post".into(),
            &order(),
            logic.handler(201),
        )
        .await
        .unwrap();
    assert!(lower.replayed);
    assert_eq!(logic.runs(), 1);
}

#[tokio::test]
async fn the_same_json_written_differently_is_the_same_request() {
    let m = memory().await;
    let logic = Logic::default();
    call(&m, Some(KEY), &order(), &logic, 201).await.unwrap();
    let reordered: serde_json::Value =
        serde_json::from_str(r#"{ "price": 150.50, "quantity": 10, "symbol": "\u0041APL" }"#)
            .unwrap();
    assert!(
        call(&m, Some(KEY), &reordered, &logic, 201)
            .await
            .unwrap()
            .replayed
    );
    // A typed request fingerprints like the JSON it serialises to.
    #[derive(Serialize)]
    struct Typed {
        quantity: u32,
        symbol: &'static str,
        price: f64,
    }
    let typed = Typed {
        quantity: 10,
        symbol: "AAPL",
        price: 150.5,
    };
    let r = process(&m, &typed, logic.handler(201)).await.unwrap();
    assert!(r.replayed);
    assert_eq!(logic.runs(), 1);
}

/// Issue #13, item 4: numbers are compared as written. A request with an account number beyond
/// 64 bits used to fail to fingerprint at all (`serde_json::Value` cannot hold it), and through
/// the HTTP layers' canonical JSON two such numbers got one fingerprint.
#[tokio::test]
async fn requests_that_differ_in_a_number_beyond_64_bits_are_different_requests() {
    #[derive(Serialize)]
    struct Transfer {
        account: u128,
        amount: f64,
    }
    let m = memory().await;
    let logic = Logic::default();
    let transfer = |account| Transfer {
        account,
        amount: 0.1,
    };
    let run = |t: Transfer| {
        let (m, logic) = (&m, &logic);
        async move { process(m, &t, logic.handler(201)).await }
    };
    let first = run(transfer(18_446_744_073_709_551_616)).await.unwrap();
    assert!(!first.replayed);
    assert!(
        run(transfer(18_446_744_073_709_551_616))
            .await
            .unwrap()
            .replayed
    );
    assert!(matches!(
        run(transfer(18_446_744_073_709_551_617)).await,
        Err(ProcessError::KeyMismatch)
    ));
    assert_eq!(logic.runs(), 1);
}

/// Issue #13, item 3: the business logic ran, but its response does not serialise (here a map
/// with non-string keys, which JSON cannot hold). The lease used to be dropped, freeing the
/// key: the retry ran the business logic a second time. The record is now completed with a
/// `response-not-stored` marker: the call says the response could not be serialised, and a
/// retry is told the operation ran, without running it.
#[tokio::test]
async fn a_response_that_cannot_be_serialised_never_runs_the_logic_twice() {
    type Unserialisable = HashMap<(u8, u8), u8>;
    let m = memory().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let request = order();
    let attempt = || {
        let runs = runs.clone();
        process(&m, &request, move || {
            runs.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok::<_, BoxError>((
                201,
                HashMap::new(),
                Unserialisable::from([((1, 2), 3)]),
            )))
        })
    };
    match attempt().await {
        Err(ProcessError::Serialization(detail)) => {
            assert!(
                detail.contains("ran") && detail.contains("spent"),
                "{detail}"
            );
        }
        other => panic!("expected Serialization, got {other:?}"),
    }
    for _ in 0..3 {
        match attempt().await {
            Err(e @ ProcessError::ResponseNotStored { .. }) => {
                assert!(e.to_string().contains("ran before"), "{e}");
            }
            other => panic!("expected ResponseNotStored, got {other:?}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the logic ran again");
}

/// The marker of a response that was not stored is a record of this crate's own: a handler
/// that answers a 410 problem that looks like it (passed on from another service using this
/// crate) is replayed as it answered, not taken for the marker.
#[tokio::test]
async fn a_handler_answering_a_lookalike_of_the_marker_is_replayed_as_it_answered() {
    let m = memory().await;
    let body = json!({
        "type": "urn:idempotency-rs:problem:response-not-stored",
        "title": "Original response not available",
        "status": 410,
        "detail": "passed on from upstream",
    });
    let request = order();
    let call = || {
        let body = body.clone();
        process(&m, &request, move || {
            std::future::ready(Ok::<_, BoxError>((410, HashMap::new(), body)))
        })
    };
    let first = call().await.unwrap();
    let again = call().await.unwrap();
    assert!(again.replayed);
    assert_eq!((again.status, again.body), (first.status, first.body));
}

#[tokio::test]
async fn scopes_are_separate() {
    let m = memory().await;
    let logic = Logic::default();
    for scope in ["alice", "bob"] {
        let r = m
            .process_request(
                Some(KEY.into()),
                scope.into(),
                "/api/orders".into(),
                "POST".into(),
                &order(),
                logic.handler(201),
            )
            .await
            .unwrap();
        assert!(!r.replayed);
    }
    assert_eq!(logic.runs(), 2);
}

#[tokio::test]
async fn a_second_call_while_the_first_runs_is_in_flight() {
    let m = memory().await;
    let (entered_tx, entered_rx) = tokio::sync::oneshot::channel();
    let (finish_tx, finish_rx) = tokio::sync::oneshot::channel::<()>();
    let first = {
        let m = m.clone();
        tokio::spawn(async move {
            m.process_request(
                Some(KEY.into()),
                "user123".into(),
                "/api/orders".into(),
                "POST".into(),
                &order(),
                || async move {
                    entered_tx.send(()).unwrap();
                    finish_rx.await.unwrap();
                    Ok((
                        201,
                        HashMap::new(),
                        Order {
                            id: 7,
                            symbol: "AAPL".into(),
                        },
                    ))
                },
            )
            .await
        })
    };
    entered_rx.await.unwrap();
    let logic = Logic::default();
    match call(&m, Some(KEY), &order(), &logic, 201).await {
        Err(ProcessError::InFlight { retry_after }) => {
            assert!(retry_after > Duration::ZERO && retry_after <= m.lock_timeout());
        }
        other => panic!("expected InFlight, got {other:?}"),
    }
    // Another payload is a mismatch even while the first runs.
    assert!(matches!(
        call(&m, Some(KEY), &json!({"other": true}), &logic, 201).await,
        Err(ProcessError::KeyMismatch)
    ));
    finish_tx.send(()).unwrap();
    assert_eq!(first.await.unwrap().unwrap().body.id, 7);
    let retry = call(&m, Some(KEY), &order(), &logic, 201).await.unwrap();
    assert!(retry.replayed);
    assert_eq!(retry.body.id, 7);
    assert_eq!(logic.runs(), 0);
}

#[tokio::test]
async fn results_are_stored_validation_failures_transient_ones_and_5xx_are_not() {
    let logic = Logic::default();
    for (status, stored) in [
        (200, true),
        (303, true),
        (402, true),
        (404, true),
        (409, true),
        (400, false),
        (401, false),
        (422, false),
        (408, false),
        (425, false),
        (429, false),
        (500, false),
        (503, false),
    ] {
        let m = memory().await;
        let before = logic.runs();
        let first = call(&m, Some(KEY), &order(), &logic, status).await.unwrap();
        assert_eq!(first.status, status);
        let retry = call(&m, Some(KEY), &order(), &logic, status).await.unwrap();
        assert_eq!(retry.replayed, stored, "status {status}");
        assert_eq!(
            logic.runs() - before,
            if stored { 1 } else { 2 },
            "status {status}"
        );
    }
}

#[tokio::test]
async fn a_failing_handler_releases_the_key_and_the_retry_runs() {
    let m = memory().await;
    let failed = m
        .process_request::<_, Order, _, _>(
            Some(KEY.into()),
            "user123".into(),
            "/api/orders".into(),
            "POST".into(),
            &order(),
            || async {
                Err::<(u16, HashMap<String, String>, Order), BoxError>(
                    "payment gateway down".into(),
                )
            },
        )
        .await;
    match failed {
        Err(ProcessError::Handler(e)) => assert_eq!(e.to_string(), "payment gateway down"),
        other => panic!("expected Handler, got {other:?}"),
    }
    let logic = Logic::default();
    let retry = call(&m, Some(KEY), &order(), &logic, 201).await.unwrap();
    assert!(!retry.replayed);
    assert_eq!(logic.runs(), 1);
}

#[tokio::test]
async fn a_panicking_handler_releases_the_key() {
    let m = memory().await;
    let task = {
        let m = m.clone();
        tokio::spawn(async move {
            m.process_request::<_, Order, _, _>(
                Some(KEY.into()),
                "user123".into(),
                "/api/orders".into(),
                "POST".into(),
                &order(),
                || async { panic!("the business logic panicked") },
            )
            .await
        })
    };
    assert!(task.await.unwrap_err().is_panic());
    let logic = Logic::default();
    assert!(
        !call(&m, Some(KEY), &order(), &logic, 201)
            .await
            .unwrap()
            .replayed
    );
    assert_eq!(logic.runs(), 1);
}

#[tokio::test]
async fn a_call_dropped_mid_way_releases_the_key() {
    let m = memory().await;
    let (entered_tx, entered_rx) = tokio::sync::oneshot::channel();
    let task = {
        let m = m.clone();
        tokio::spawn(async move {
            m.process_request::<_, Order, _, _>(
                Some(KEY.into()),
                "user123".into(),
                "/api/orders".into(),
                "POST".into(),
                &order(),
                || async move {
                    entered_tx.send(()).unwrap();
                    std::future::pending().await
                },
            )
            .await
        })
    };
    entered_rx.await.unwrap();
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    let logic = Logic::default();
    // The release is sent when the lease drops; the writer applies it before this claim.
    assert!(
        !call(&m, Some(KEY), &order(), &logic, 201)
            .await
            .unwrap()
            .replayed
    );
    assert_eq!(logic.runs(), 1);
}

#[tokio::test]
async fn a_closed_store_is_unavailable_and_nothing_runs() {
    let store = SqliteIdempotencyStore::new("sqlite::memory:")
        .await
        .unwrap();
    store.engine().shutdown().unwrap();
    let m = IdempotencyMiddleware::new(store);
    let logic = Logic::default();
    match call(&m, Some(KEY), &order(), &logic, 201).await {
        Err(ProcessError::StoreUnavailable(e)) => assert!(e.is_closed()),
        other => panic!("expected StoreUnavailable, got {other:?}"),
    }
    assert_eq!(logic.runs(), 0);
}

#[tokio::test]
async fn a_stored_response_of_another_type_is_a_serialization_error() {
    let m = memory().await;
    let logic = Logic::default();
    call(&m, Some(KEY), &order(), &logic, 201).await.unwrap();
    let got = m
        .process_request::<_, Vec<u64>, _, _>(
            Some(KEY.into()),
            "user123".into(),
            "/api/orders".into(),
            "POST".into(),
            &order(),
            || async { Ok((201, HashMap::new(), vec![1u64])) },
        )
        .await;
    assert!(
        matches!(got, Err(ProcessError::Serialization(ref d)) if d.contains("deserialise")),
        "{got:?}"
    );
}

#[tokio::test]
async fn a_record_is_replayed_for_the_ttl_then_the_key_runs_again() {
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let store = SqliteIdempotencyStore::with_config(EngineConfig::in_memory().clock(clock.clone()))
        .unwrap();
    let m =
        IdempotencyMiddleware::with_config(store, Duration::from_secs(60), Duration::from_secs(5));
    assert_eq!(m.ttl(), Duration::from_secs(60));
    let logic = Logic::default();
    call(&m, Some(KEY), &order(), &logic, 201).await.unwrap();
    clock.advance(Duration::from_millis(59_999));
    assert!(
        call(&m, Some(KEY), &order(), &logic, 201)
            .await
            .unwrap()
            .replayed
    );
    clock.advance(Duration::from_millis(1));
    let again = call(&m, Some(KEY), &order(), &logic, 201).await.unwrap();
    assert!(!again.replayed);
    assert_eq!(again.body.id, 2);
}
}

#[tokio::test]
async fn store_urls() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orders.db");
    for url in [
        format!("sqlite:{}", path.display()),
        format!("sqlite://{}", path.display()),
        path.display().to_string(),
    ] {
        let m = IdempotencyMiddleware::new(SqliteIdempotencyStore::new(&url).await.unwrap());
        let logic = Logic::default();
        // The same file each time: the first URL's record replays under the others.
        let r = call(&m, Some(KEY), &order(), &logic, 201).await.unwrap();
        assert_eq!(r.body.id, 1, "{url}");
    }
    for url in ["postgres://localhost/db", "sqlite:", ""] {
        assert!(
            matches!(
                SqliteIdempotencyStore::new(url).await,
                Err(Error::InvalidConfig { .. })
            ),
            "{url}"
        );
    }
    let missing = dir.path().join("missing").join("orders.db");
    assert!(matches!(
        SqliteIdempotencyStore::new(&format!("sqlite:{}", missing.display())).await,
        Err(Error::CannotOpen { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_calls_with_one_key_run_the_logic_once() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        SqliteIdempotencyStore::new(&format!("sqlite:{}", dir.path().join("c.db").display()))
            .await
            .unwrap();
    let m = IdempotencyMiddleware::new(store);
    let logic = Logic::default();
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (m, logic, barrier) = (m.clone(), logic.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                call(&m, Some(KEY), &order(), &logic, 201).await
            })
        })
        .collect();
    let mut ran = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) if !r.replayed => ran += 1,
            Ok(r) => assert_eq!(r.body.id, 1),
            Err(ProcessError::InFlight { .. }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(ran, 1);
    assert_eq!(logic.runs(), 1);
    let after = call(&m, Some(KEY), &order(), &logic, 201).await.unwrap();
    assert!(after.replayed);
    assert_eq!(after.body.id, 1);
}
