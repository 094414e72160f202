//! The shared contract suite: every case runs against a real server over TCP, whatever the
//! framework. A framework's test file provides `start(engine) -> Server` (with the routes
//! below) and expands `contract_cases!(start)`; Axum and Actix-Web run the same table, so the
//! two can never drift apart.
//!
//! Routes every test server must serve (scope from `X-User-ID`, request limit
//! [`REQUEST_LIMIT`], response limit [`RESPONSE_LIMIT`], UUID keys, key optional):
//! - `POST /orders` `{"symbol","quantity","price"}` -> 201 `{"order_id","status","total"}`
//! - `GET /orders` -> 200 (not covered)
//! - `POST /fail` -> 500; `POST /missing` -> 404 `{"error":"no such thing"}`
//! - `POST /slow` -> waits for a permit of `probe.gate`, then 200 `{"slow":true}`
//! - `POST /big?n=N` -> 200 with N bytes, sent in 16 KiB chunks
//! - `POST /strict/orders` -> as `/orders`, but behind a layer that requires the key
//! - `POST /closed/orders` -> as `/orders`, behind a layer over `closed_engine`
//! - `POST /tenant/orders` -> as `/orders`, but the scope comes from a scope function that
//!   returns the `X-Tenant` header as it is (`None` without it)
//! - `POST /echo-key` -> 200 [`echo_key`] of the `Option<ClaimedKey>` the handler extracted
//! - every other path: the framework's 404
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idempotency_rs::{Engine, EngineConfig};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

pub const REQUEST_LIMIT: usize = 64 * 1024;
pub const RESPONSE_LIMIT: usize = 256 * 1024;

/// Counters and a gate shared by the handlers and the test.
pub struct Probe {
    pub orders: AtomicUsize,
    pub fail: AtomicUsize,
    pub missing: AtomicUsize,
    pub slow: AtomicUsize,
    pub big: AtomicUsize,
    pub gate: Semaphore,
}

impl Probe {
    pub fn new() -> Arc<Probe> {
        Arc::new(Probe {
            orders: AtomicUsize::new(0),
            fail: AtomicUsize::new(0),
            missing: AtomicUsize::new(0),
            slow: AtomicUsize::new(0),
            big: AtomicUsize::new(0),
            gate: Semaphore::new(0),
        })
    }
}

/// The shared handler logic, framework-free.
pub fn order_response(body: &[u8]) -> (u16, Value) {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v["symbol"].is_string() && v["quantity"].is_number() && v["price"].is_number() => {
            let total = v["quantity"].as_f64().unwrap_or(0.0) * v["price"].as_f64().unwrap_or(0.0);
            (
                201,
                json!({"order_id": uuid::Uuid::new_v4().to_string(), "status": "created", "total": total}),
            )
        }
        _ => (400, json!({"error": "expected {symbol, quantity, price}"})),
    }
}

/// What `/echo-key` answers: the claimed key the handler extracted, or `{"key": null}`.
pub fn echo_key(claimed: Option<&idempotency_rs::ClaimedKey>) -> Value {
    match claimed {
        Some(c) => json!({
            "key": c.key().as_str(),
            "scope": c.scope(),
            "fencing_token": c.fencing_token(),
        }),
        None => json!({ "key": null }),
    }
}

#[cfg(feature = "postgres")]
#[path = "../pg/mod.rs"]
pub mod pg;

/// A running test server.
pub struct Server {
    pub base: String,
    pub probe: Arc<Probe>,
    pub engine: Engine,
    /// An engine the `/closed` routes use; the tests shut it down.
    pub closed_engine: Engine,
    /// Stops the server (and waits for it).
    pub stop: Box<dyn FnOnce() + Send>,
}

pub fn engine() -> Engine {
    Engine::open(EngineConfig::in_memory()).unwrap()
}

/// An engine on a fresh table of the test PostgreSQL server.
#[cfg(feature = "postgres")]
pub fn pg_engine() -> Engine {
    Engine::open(pg::config()).unwrap()
}

pub fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

pub fn order() -> Value {
    json!({"symbol": "AAPL", "quantity": 10, "price": 150.5})
}

pub async fn post(
    c: &reqwest::Client,
    url: String,
    key: Option<&str>,
    user: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut r = c
        .post(url)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).unwrap());
    if let Some(k) = key {
        r = r.header("idempotency-key", k);
    }
    if let Some(u) = user {
        r = r.header("x-user-id", u);
    }
    r.send().await.unwrap()
}

/// Checks a problem+json answer: status, content type, type URI, and a non-empty detail.
pub async fn expect_problem(r: reqwest::Response, status: u16, slug: &str) -> Value {
    assert_eq!(r.status().as_u16(), status, "status for {slug}");
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "application/problem+json"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], format!("urn:idempotency-rs:problem:{slug}"));
    assert_eq!(v["status"], status);
    assert!(v["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(v["detail"].as_str().is_some_and(|d| d.len() > 20));
    v
}

fn retry_after(r: &reqwest::Response) -> u64 {
    r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

pub async fn not_covered_passes_through(s: &Server) {
    let c = client();
    let r = c
        .get(format!("{}/orders", s.base))
        .header("idempotency-key", "not a uuid at all")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

pub async fn no_key_passes_through(s: &Server) {
    let c = client();
    for _ in 0..2 {
        let r = post(&c, format!("{}/orders", s.base), None, Some("u1"), &order()).await;
        assert_eq!(r.status(), 201);
        assert!(r.headers().get("idempotent-replayed").is_none());
    }
    assert_eq!(s.probe.orders.load(Ordering::SeqCst), 2);
}

pub async fn required_key_missing_is_400(s: &Server) {
    let c = client();
    let r = post(
        &c,
        format!("{}/strict/orders", s.base),
        None,
        Some("u1"),
        &order(),
    )
    .await;
    expect_problem(r, 400, "key-missing").await;
    let k = key();
    let r = post(
        &c,
        format!("{}/strict/orders", s.base),
        Some(&k),
        Some("u1"),
        &order(),
    )
    .await;
    assert_eq!(r.status(), 201);
    assert_eq!(s.probe.orders.load(Ordering::SeqCst), 1);
}

pub async fn bad_keys_are_400(s: &Server) {
    let c = client();
    let url = format!("{}/orders", s.base);
    let long = "a".repeat(256);
    for bad in [
        "",
        "not-a-uuid",
        long.as_str(),
        "0b6f5a3e9a7c4c1e8f2a2d8b4f1e6c3a",
        "\"unterminated",
    ] {
        let r = post(&c, url.clone(), Some(bad), Some("u1"), &order()).await;
        expect_problem(r, 400, "key-invalid").await;
    }
    // Bytes outside ASCII.
    let r = c
        .post(url.clone())
        .header("x-user-id", "u1")
        .header(
            "idempotency-key",
            reqwest::header::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        )
        .body("{}")
        .send()
        .await
        .unwrap();
    expect_problem(r, 400, "key-invalid").await;
    // The header twice, and two values folded into one line.
    let (a, b) = (key(), key());
    let r = c
        .post(url.clone())
        .header("x-user-id", "u1")
        .header("idempotency-key", &a)
        .header("idempotency-key", &b)
        .body("{}")
        .send()
        .await
        .unwrap();
    expect_problem(r, 400, "key-repeated").await;
    let r = post(&c, url, Some(&format!("{a}, {b}")), Some("u1"), &order()).await;
    expect_problem(r, 400, "key-repeated").await;
    assert_eq!(s.probe.orders.load(Ordering::SeqCst), 0);
}

pub async fn quoted_and_bare_key_are_one_key(s: &Server) {
    let c = client();
    let k = key();
    let url = format!("{}/orders", s.base);
    let first = post(&c, url.clone(), Some(&k), Some("u1"), &order()).await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let quoted = format!("\"{}\"", k.to_uppercase());
    let again = post(&c, url, Some(&quoted), Some("u1"), &order()).await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    assert_eq!(s.probe.orders.load(Ordering::SeqCst), 1);
}

pub async fn missing_scope_is_400(s: &Server) {
    let c = client();
    let r = post(
        &c,
        format!("{}/orders", s.base),
        Some(&key()),
        None,
        &order(),
    )
    .await;
    expect_problem(r, 400, "scope-missing").await;
    assert_eq!(s.probe.orders.load(Ordering::SeqCst), 0);
}

/// Issue #13, item 6: a scope function that returns a scope the engine cannot store (over
/// 1024 bytes) was answered 503 `store-unavailable` with `Retry-After`, inviting retries of a
/// request that can never succeed. It is a 400 `scope-invalid`, and the handler does not run;
/// no scope at all, or a blank one, is 400 `scope-missing`, and a usable one runs.
pub async fn unusable_scope_from_the_scope_fn_is_400(s: &Server) {
    let c = client();
    let url = format!("{}/tenant/orders", s.base);
    let long = "t".repeat(1025);
    let r = c
        .post(&url)
        .header("idempotency-key", key())
        .header("x-tenant", &long)
        .json(&order())
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("retry-after").is_none());
    expect_problem(r, 400, "scope-invalid").await;
    let r = c
        .post(&url)
        .header("idempotency-key", key())
        .json(&order())
        .send()
        .await
        .unwrap();
    expect_problem(r, 400, "scope-missing").await;
    // A blank scope (an empty user id) is no scope: it must not join the scope shared by
    // requests that have none.
    let r = c
        .post(&url)
        .header("idempotency-key", key())
        .header("x-tenant", "")
        .json(&order())
        .send()
        .await
        .unwrap();
    expect_problem(r, 400, "scope-missing").await;
    assert_eq!(s.probe.orders.load(Ordering::SeqCst), 0);
    let r = c
        .post(&url)
        .header("idempotency-key", key())
        .header("x-tenant", "t".repeat(1024))
        .json(&order())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(s.probe.orders.load(Ordering::SeqCst), 1);
}

pub async fn body_over_limit_is_413(s: &Server) {
    let c = client();
    let url = format!("{}/orders", s.base);
    let just_under = json!({"symbol": "x".repeat(REQUEST_LIMIT - 100), "quantity": 1, "price": 1});
    let r = post(&c, url.clone(), Some(&key()), Some("u1"), &just_under).await;
    assert_eq!(r.status(), 201);
    let over = json!({"symbol": "x".repeat(REQUEST_LIMIT), "quantity": 1, "price": 1});
    let r = post(&c, url, Some(&key()), Some("u1"), &over).await;
    expect_problem(r, 413, "body-too-large").await;
    assert_eq!(s.probe.orders.load(Ordering::SeqCst), 1);
}

pub async fn replay_is_identical(s: &Server) {
    let c = client();
    let k = key();
    let url = format!("{}/orders", s.base);
    let first = post(&c, url.clone(), Some(&k), Some("u1"), &order()).await;
    assert_eq!(first.status(), 201);
    let ct = first.headers()["content-type"].clone();
    let first_body = first.bytes().await.unwrap();
    for _ in 0..3 {
        let again = post(&c, url.clone(), Some(&k), Some("u1"), &order()).await;
        assert_eq!(again.status(), 201);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        assert_eq!(again.headers()["content-type"], ct);
        assert_eq!(
            again.headers()["content-length"].to_str().unwrap(),
            first_body.len().to_string()
        );
        assert_eq!(again.bytes().await.unwrap(), first_body);
    }
    assert_eq!(s.probe.orders.load(Ordering::SeqCst), 1);
}

pub async fn different_payload_is_422(s: &Server) {
    let c = client();
    let k = key();
    let url = format!("{}/orders", s.base);
    assert_eq!(
        post(&c, url.clone(), Some(&k), Some("u1"), &order())
            .await
            .status(),
        201
    );
    let other = json!({"symbol": "MSFT", "quantity": 10, "price": 150.5});
    let r = post(&c, url, Some(&k), Some("u1"), &other).await;
    expect_problem(r, 422, "key-reused").await;
    assert_eq!(s.probe.orders.load(Ordering::SeqCst), 1);
}

/// Holds a request in `/slow`, then checks 409 (same payload) and 422 (other payload, decided
/// before in-flight), then lets it finish and checks the replay.
pub async fn in_flight_is_409_and_mismatch_wins(s: &Server) {
    let c = client();
    let k = key();
    let url = format!("{}/slow", s.base);
    let first = tokio::spawn({
        let (c, url, k) = (c.clone(), url.clone(), k.clone());
        async move { post(&c, url, Some(&k), Some("u1"), &json!({"n": 1})).await }
    });
    wait_for(|| s.probe.slow.load(Ordering::SeqCst) == 1).await;
    let r = post(&c, url.clone(), Some(&k), Some("u1"), &json!({"n": 1})).await;
    assert!(retry_after(&r) >= 1);
    expect_problem(r, 409, "request-in-flight").await;
    let r = post(&c, url.clone(), Some(&k), Some("u1"), &json!({"n": 2})).await;
    expect_problem(r, 422, "key-reused").await;
    s.probe.gate.add_permits(1);
    let first = first.await.unwrap();
    assert_eq!(first.status(), 200);
    let r = post(&c, url, Some(&k), Some("u1"), &json!({"n": 1})).await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(s.probe.slow.load(Ordering::SeqCst), 1);
}

pub async fn scopes_are_independent(s: &Server) {
    let c = client();
    let k = key();
    let url = format!("{}/orders", s.base);
    let a: Value = post(&c, url.clone(), Some(&k), Some("alice"), &order())
        .await
        .json()
        .await
        .unwrap();
    let b = post(&c, url.clone(), Some(&k), Some("bob"), &order()).await;
    assert_eq!(b.status(), 201);
    assert!(b.headers().get("idempotent-replayed").is_none());
    let b: Value = b.json().await.unwrap();
    assert_ne!(a["order_id"], b["order_id"]);
    // And a different payload under another scope is no mismatch.
    let other = json!({"symbol": "MSFT", "quantity": 1, "price": 1});
    assert_eq!(
        post(&c, url, Some(&k), Some("carol"), &other)
            .await
            .status(),
        201
    );
    assert_eq!(s.probe.orders.load(Ordering::SeqCst), 3);
}

pub async fn server_error_is_not_stored(s: &Server) {
    let c = client();
    let k = key();
    let url = format!("{}/fail", s.base);
    for n in 1..=2 {
        let r = post(&c, url.clone(), Some(&k), Some("u1"), &json!({})).await;
        assert_eq!(r.status(), 500);
        assert!(r.headers().get("idempotent-replayed").is_none());
        assert_eq!(s.probe.fail.load(Ordering::SeqCst), n);
    }
}

pub async fn client_error_is_stored(s: &Server) {
    let c = client();
    let k = key();
    let url = format!("{}/missing", s.base);
    let first = post(&c, url.clone(), Some(&k), Some("u1"), &json!({})).await;
    assert_eq!(first.status(), 404);
    let body = first.bytes().await.unwrap();
    let again = post(&c, url, Some(&k), Some("u1"), &json!({})).await;
    assert_eq!(again.status(), 404);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.bytes().await.unwrap(), body);
    assert_eq!(s.probe.missing.load(Ordering::SeqCst), 1);
}

pub async fn large_response_is_sent_whole_and_not_rerun(s: &Server) {
    let c = client();
    // Under the limit: stored and replayed byte for byte.
    let k = key();
    let url = format!("{}/big?n={}", s.base, RESPONSE_LIMIT / 2);
    let first = post(&c, url.clone(), Some(&k), Some("u1"), &json!({})).await;
    let body = first.bytes().await.unwrap();
    assert_eq!(body.len(), RESPONSE_LIMIT / 2);
    let again = post(&c, url, Some(&k), Some("u1"), &json!({})).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.bytes().await.unwrap(), body);
    // Over it: the client gets it all, and a retry learns it ran (410), never a second run.
    let k = key();
    let n = RESPONSE_LIMIT * 3;
    let url = format!("{}/big?n={n}", s.base);
    let first = post(&c, url.clone(), Some(&k), Some("u1"), &json!({})).await;
    assert_eq!(first.status(), 200);
    let body = first.bytes().await.unwrap();
    assert_eq!(body.len(), n);
    assert!(body.iter().all(|b| *b == b'x'));
    let again = post(&c, url, Some(&k), Some("u1"), &json!({})).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    expect_problem(again, 410, "response-not-stored").await;
    assert_eq!(s.probe.big.load(Ordering::SeqCst), 2);
}

pub async fn store_closed_is_503_and_handler_not_run(s: &Server) {
    s.closed_engine.shutdown().unwrap();
    let c = client();
    let r = post(
        &c,
        format!("{}/closed/orders", s.base),
        Some(&key()),
        Some("u1"),
        &order(),
    )
    .await;
    assert!(retry_after(&r) >= 1);
    expect_problem(r, 503, "store-unavailable").await;
    assert_eq!(s.probe.orders.load(Ordering::SeqCst), 0);
}

/// A dead writer thread (a panic, injected with the `fault-injection` feature, which `make test`
/// enables) is a 503 like a closed store, promptly, for every request, and the handler never runs.
pub async fn dead_writer_is_503_and_handler_not_run(s: &Server) {
    #[cfg(not(feature = "fault-injection"))]
    {
        let _ = s;
        eprintln!("SKIPPED: needs the fault-injection feature (make test enables it)");
    }
    #[cfg(feature = "fault-injection")]
    {
        s.closed_engine.inject_writer_panic();
        let c = client();
        for _ in 0..3 {
            let r = post(
                &c,
                format!("{}/closed/orders", s.base),
                Some(&key()),
                Some("u1"),
                &order(),
            )
            .await;
            assert!(retry_after(&r) >= 1);
            expect_problem(r, 503, "store-unavailable").await;
        }
        assert_eq!(s.probe.orders.load(Ordering::SeqCst), 0);
    }
}

pub async fn hundred_concurrent_requests_run_once(s: &Server) {
    let c = client();
    let k = key();
    let url = format!("{}/orders", s.base);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (c, url, k) = (c.clone(), url.clone(), k.clone());
            tokio::spawn(async move {
                let r = post(&c, url, Some(&k), Some("u1"), &order()).await;
                let status = r.status().as_u16();
                let replayed = r.headers().contains_key("idempotent-replayed");
                (status, replayed, r.bytes().await.unwrap())
            })
        })
        .collect();
    let mut bodies = Vec::new();
    for t in tasks {
        let (status, replayed, body) = t.await.unwrap();
        match status {
            201 => bodies.push((replayed, body)),
            409 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(s.probe.orders.load(Ordering::SeqCst), 1);
    assert_eq!(bodies.iter().filter(|(replayed, _)| !replayed).count(), 1);
    assert!(bodies.windows(2).all(|w| w[0].1 == w[1].1));
}

/// A client that gives up mid-request must not leave the key locked.
pub async fn dropped_client_releases_key(s: &Server) {
    let k = key();
    let url = format!("{}/slow", s.base);
    let c = client();
    let task = tokio::spawn({
        let (c, url, k) = (c.clone(), url.clone(), k.clone());
        async move { post(&c, url, Some(&k), Some("u1"), &json!({"n": 1})).await }
    });
    wait_for(|| s.probe.slow.load(Ordering::SeqCst) == 1).await;
    task.abort();
    let _ = task.await;
    // The server notices the closed connection and drops the request; the key is released
    // at once (not after the 30 s lock timeout). Retry until a retry gets into the handler
    // (bounded); only then open the gate, so the first request cannot finish in the window
    // before the server has noticed the disconnect.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let retry = loop {
        let t = tokio::spawn({
            let (c, url, k) = (c.clone(), url.clone(), k.clone());
            async move { post(&c, url, Some(&k), Some("u1"), &json!({"n": 1})).await }
        });
        wait_for(|| s.probe.slow.load(Ordering::SeqCst) == 2 || t.is_finished()).await;
        if s.probe.slow.load(Ordering::SeqCst) == 2 {
            break t;
        }
        let r = t.await.unwrap();
        assert_eq!(r.status(), 409, "only in-flight may precede the release");
        assert!(
            std::time::Instant::now() < deadline,
            "key still locked after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    s.probe.gate.add_permits(1);
    let r = retry.await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("idempotent-replayed").is_none());
    assert_eq!(s.probe.slow.load(Ordering::SeqCst), 2);
}

/// Issue #14: a router's fallback is not an idempotent operation. A request no route matches
/// gets the framework's 404, untouched: not `key-missing` where the key is required, and not
/// stored and replayed where it has a key.
pub async fn an_unknown_path_is_the_frameworks_404(s: &Server) {
    let c = client();
    for url in [
        format!("{}/strict/nope", s.base),
        format!("{}/nope", s.base),
    ] {
        let r = post(&c, url.clone(), None, Some("u1"), &order()).await;
        assert_eq!(r.status(), 404, "{url} without a key");
        let k = key();
        for _ in 0..2 {
            let r = post(&c, url.clone(), Some(&k), Some("u1"), &order()).await;
            assert_eq!(r.status(), 404, "{url}");
            assert!(r.headers().get("idempotent-replayed").is_none(), "{url}");
            let ct = r
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_owned());
            assert_ne!(ct.as_deref(), Some("application/problem+json"), "{url}");
        }
        // A key no UUID is no business of the layer's on a path it does not cover.
        let r = post(&c, url.clone(), Some("not a uuid"), None, &order()).await;
        assert_eq!(r.status(), 404, "{url}");
    }
}

/// Issue #14: the handler sees the key the engine stored (unquoted, lower-cased under the UUID
/// policy), the scope, and a fencing token that grows; replays do not run the handler.
pub async fn the_handler_gets_the_key_as_it_was_stored(s: &Server) {
    let c = client();
    let url = format!("{}/echo-key", s.base);
    let k = key();
    let sent = format!("\"{}\"", k.to_ascii_uppercase());
    let first: Value = post(&c, url.clone(), Some(&sent), Some("u1"), &json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["key"], k.as_str());
    assert_eq!(first["scope"], "u1");
    let token = first["fencing_token"].as_u64().unwrap();
    assert!(token > 0);
    // The retry (bare, lower case) replays the same answer.
    let r = post(&c, url.clone(), Some(&k), Some("u1"), &json!({})).await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(r.json::<Value>().await.unwrap(), first);
    // A new key gets a greater token; no key, no claimed key.
    let second: Value = post(&c, url.clone(), Some(&key()), Some("u1"), &json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert!(second["fencing_token"].as_u64().unwrap() > token);
    let none: Value = post(&c, url, None, Some("u1"), &json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(none, json!({"key": null}));
}

/// Issue #14: one fingerprint default everywhere. `{"amount": 500}` and `{"amount":500}` are one
/// request through the layers, as they are through `process_request`.
pub async fn json_written_differently_is_one_request(s: &Server) {
    let c = client();
    let k = key();
    let url = format!("{}/orders", s.base);
    let send = |body: &'static str| {
        c.post(url.clone())
            .header("content-type", "application/json")
            .header("idempotency-key", &k)
            .header("x-user-id", "u1")
            .body(body)
            .send()
    };
    let first = send(r#"{"symbol":"AAPL","quantity":10,"price":150.5}"#)
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let again = send("{ \"price\": 150.5,\n  \"quantity\": 10, \"symbol\": \"AAPL\" }")
        .await
        .unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    // A number that differs is another request.
    let other = send(r#"{"symbol":"AAPL","quantity":11,"price":150.5}"#)
        .await
        .unwrap();
    expect_problem(other, 422, "key-reused").await;
    assert_eq!(s.probe.orders.load(Ordering::SeqCst), 1);
}

/// Issue #14: a request that fails validation (400 or 422) is not stored, so the client can fix
/// it and retry with the same key, as Stripe allows; the fixed request is then the key's.
pub async fn a_validation_failure_is_released_and_the_fixed_request_runs(s: &Server) {
    let c = client();
    let k = key();
    let url = format!("{}/orders", s.base);
    let r = post(
        &c,
        url.clone(),
        Some(&k),
        Some("u1"),
        &json!({"symbol": "AAPL"}),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert!(r.headers().get("idempotent-replayed").is_none());
    let r = post(&c, url.clone(), Some(&k), Some("u1"), &order()).await;
    assert_eq!(r.status(), 201);
    assert!(r.headers().get("idempotent-replayed").is_none());
    let r = post(&c, url.clone(), Some(&k), Some("u1"), &order()).await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    let r = post(&c, url, Some(&k), Some("u1"), &json!({"symbol": "AAPL"})).await;
    expect_problem(r, 422, "key-reused").await;
    assert_eq!(s.probe.orders.load(Ordering::SeqCst), 2);
}

/// Issue #14: a 409's `Retry-After` follows what the route's operations take (here a few
/// milliseconds: the shortest hint, one second), not the 30 s of the lock timeout.
pub async fn retry_after_follows_what_the_route_takes(s: &Server) {
    let c = client();
    let url = format!("{}/slow", s.base);
    // One quick run of the route.
    s.probe.gate.add_permits(1);
    let r = post(&c, url.clone(), Some(&key()), Some("u1"), &json!({"n": 0})).await;
    assert_eq!(r.status(), 200);
    let k = key();
    let first = tokio::spawn({
        let (c, url, k) = (c.clone(), url.clone(), k.clone());
        async move { post(&c, url, Some(&k), Some("u1"), &json!({"n": 1})).await }
    });
    wait_for(|| s.probe.slow.load(Ordering::SeqCst) == 2).await;
    let r = post(&c, url.clone(), Some(&k), Some("u1"), &json!({"n": 1})).await;
    assert_eq!(retry_after(&r), 1);
    let v = expect_problem(r, 409, "request-in-flight").await;
    assert_eq!(v["retry_after"], 1);
    s.probe.gate.add_permits(1);
    assert_eq!(first.await.unwrap().status(), 200);
}

/// One HTTP/1.1 exchange on an open connection: the status, the lower-cased head and the body.
/// The request's head goes first and its body 30 ms later, so a server that answers without
/// reading the body has answered before the body arrives.
async fn exchange(conn: &mut tokio::net::TcpStream, request: &str) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let split = request.find("\r\n\r\n").unwrap() + 4;
    conn.write_all(&request.as_bytes()[..split]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    conn.write_all(&request.as_bytes()[split..]).await.unwrap();
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut chunk))
            .await
            .expect("a response")
            .unwrap();
        assert!(n > 0, "the connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection closed in the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    (status, head, buf[head_end..head_end + len].to_vec())
}

/// Issue #14: the layer's own answers keep the connection open, as the handler's do: a client
/// sends its next request on the same connection (Actix closed it after a rejection).
pub async fn rejections_keep_the_connection(s: &Server) {
    let addr = s.base.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let k = key();
    let body = r#"{"symbol":"AAPL","quantity":10,"price":150.5}"#;
    let request = |key: &str, body: &str| {
        format!(
            "POST /orders HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             x-user-id: u1\r\nidempotency-key: {key}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let other = r#"{"symbol":"MSFT","quantity":10,"price":150.5}"#;
    let mut statuses = Vec::new();
    for req in [
        request("not a uuid", body), // refused before the body
        request(&k, body),           // runs
        request(&k, body),           // replayed
        request(&k, other),          // refused after the body
        format!(
            "POST /orders HTTP/1.1\r\nhost: {addr}\r\nidempotency-key: {k}\r\n\
                 content-length: 2\r\n\r\n{{}}"
        ), // no scope
    ] {
        let (status, head, _) = exchange(&mut conn, &req).await;
        assert!(!head.contains("connection: close"), "{status}: {head}");
        statuses.push(status);
    }
    assert_eq!(statuses, [400, 201, 201, 422, 400]);
    assert_eq!(s.probe.orders.load(Ordering::SeqCst), 1);
}

pub async fn wait_for(mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not met in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Stop the server, shut the engine down, open the same file again: the record survives and
/// replays byte for byte, and another payload under the key is still a mismatch.
pub async fn restart_on_same_database_replays_identically<F, Fut>(start: F)
where
    F: Fn(Engine) -> Fut,
    Fut: Future<Output = Server>,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idempotency.db");
    let c = client();
    let k = key();

    let engine = Engine::open(EngineConfig::new(&path)).unwrap();
    let s = start(engine.clone()).await;
    let first = post(
        &c,
        format!("{}/orders", s.base),
        Some(&k),
        Some("u1"),
        &order(),
    )
    .await;
    assert_eq!(first.status(), 201);
    let ct = first.headers()["content-type"].clone();
    let first_body = first.bytes().await.unwrap();
    assert_eq!(s.probe.orders.load(Ordering::SeqCst), 1);
    (s.stop)();
    engine.shutdown().unwrap();
    drop(engine);

    let engine = Engine::open(EngineConfig::new(&path)).unwrap();
    let s = start(engine.clone()).await;
    let again = post(
        &c,
        format!("{}/orders", s.base),
        Some(&k),
        Some("u1"),
        &order(),
    )
    .await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["content-type"], ct);
    assert_eq!(again.bytes().await.unwrap(), first_body);
    assert_eq!(
        s.probe.orders.load(Ordering::SeqCst),
        0,
        "replayed, not run"
    );
    let other = json!({"symbol": "MSFT", "quantity": 1, "price": 1});
    let r = post(
        &c,
        format!("{}/orders", s.base),
        Some(&k),
        Some("u1"),
        &other,
    )
    .await;
    expect_problem(r, 422, "key-reused").await;
    (s.stop)();
    engine.shutdown().unwrap();
}

/// Runs one case against a fresh server on `engine`.
pub async fn run<F, Fut, C, CFut>(engine: Engine, start: F, case: C)
where
    F: FnOnce(Engine) -> Fut,
    Fut: Future<Output = Server>,
    C: FnOnce(Server) -> CFut,
    CFut: Future<Output = Server>,
{
    let server = start(engine).await;
    let server = case(server).await;
    (server.stop)();
}

/// Expands one `#[tokio::test]` per contract case and store, each on a fresh server from
/// `$start`: `contract::sqlite::*` on an in-memory SQLite engine, `contract::postgres::*` on a
/// table of the test PostgreSQL server (with the `postgres` feature).
#[macro_export]
macro_rules! contract_cases {
    ($start:ident) => {
        $crate::contract_cases!(@cases $start;
            not_covered_passes_through, no_key_passes_through, required_key_missing_is_400,
            bad_keys_are_400, quoted_and_bare_key_are_one_key, missing_scope_is_400,
            unusable_scope_from_the_scope_fn_is_400,
            body_over_limit_is_413, replay_is_identical, different_payload_is_422,
            in_flight_is_409_and_mismatch_wins, scopes_are_independent,
            server_error_is_not_stored, client_error_is_stored,
            large_response_is_sent_whole_and_not_rerun, store_closed_is_503_and_handler_not_run,
            dead_writer_is_503_and_handler_not_run,
            hundred_concurrent_requests_run_once, dropped_client_releases_key,
            an_unknown_path_is_the_frameworks_404, the_handler_gets_the_key_as_it_was_stored,
            json_written_differently_is_one_request,
            a_validation_failure_is_released_and_the_fixed_request_runs,
            retry_after_follows_what_the_route_takes, rejections_keep_the_connection);
    };
    (@cases $start:ident; $($case:ident),* $(,)?) => {
        mod contract {
            mod sqlite {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $case() {
                        let engine = $crate::common::engine();
                        $crate::common::run(engine, super::super::$start, |s| async move {
                            $crate::common::$case(&s).await;
                            s
                        })
                        .await;
                    }
                )*
            }
            #[cfg(feature = "postgres")]
            mod postgres {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $case() {
                        let engine = $crate::common::pg_engine();
                        $crate::common::run(engine, super::super::$start, |s| async move {
                            $crate::common::$case(&s).await;
                            s
                        })
                        .await;
                    }
                )*
            }
        }
    };
}
