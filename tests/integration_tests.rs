//! The main integration suite: the Axum layer on a real server over TCP.
//! Run with `cargo test --test integration_tests --features axum-integration`.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use common::{Probe, REQUEST_LIMIT, RESPONSE_LIMIT, Server};
use idempotency_rs::axum_integration::IdempotencyLayer;
use idempotency_rs::{Engine, EngineConfig};
use serde_json::json;

fn routes(probe: Arc<Probe>) -> Router {
    Router::new()
        .route(
            "/orders",
            post(|State(p): State<Arc<Probe>>, body: Bytes| async move {
                p.orders.fetch_add(1, Ordering::SeqCst);
                let (status, v) = common::order_response(&body);
                (StatusCode::from_u16(status).unwrap(), Json(v))
            })
            .get(|| async { Json(json!([])) }),
        )
        .route(
            "/fail",
            post(|State(p): State<Arc<Probe>>| async move {
                p.fail.fetch_add(1, Ordering::SeqCst);
                (StatusCode::INTERNAL_SERVER_ERROR, "boom")
            }),
        )
        .route(
            "/missing",
            post(|State(p): State<Arc<Probe>>| async move {
                p.missing.fetch_add(1, Ordering::SeqCst);
                (
                    StatusCode::NOT_FOUND,
                    Json(json!({"error": "no such thing"})),
                )
            }),
        )
        .route(
            "/slow",
            post(|State(p): State<Arc<Probe>>| async move {
                p.slow.fetch_add(1, Ordering::SeqCst);
                p.gate.acquire().await.unwrap().forget();
                Json(json!({"slow": true}))
            }),
        )
        .route(
            "/big",
            post(
                |State(p): State<Arc<Probe>>,
                 Query(q): Query<std::collections::HashMap<String, usize>>| async move {
                    p.big.fetch_add(1, Ordering::SeqCst);
                    let n = q.get("n").copied().unwrap_or(0);
                    let chunks = (0..n.div_ceil(16 * 1024)).map(move |i| {
                        let len = (n - i * 16 * 1024).min(16 * 1024);
                        Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; len]))
                    });
                    Response::new(Body::from_stream(futures_util::stream::iter(chunks)))
                        .into_response()
                },
            ),
        )
        .with_state(probe)
}

fn layer(engine: &Engine) -> IdempotencyLayer {
    IdempotencyLayer::new(engine)
        .scope_header("x-user-id")
        .max_request_bytes(REQUEST_LIMIT)
        .max_response_bytes(RESPONSE_LIMIT)
}

async fn start(engine: Engine) -> Server {
    let probe = Probe::new();
    let closed_engine = Engine::open(EngineConfig::in_memory()).unwrap();
    let app = Router::new()
        .merge(routes(probe.clone()).layer(layer(&engine)))
        .nest(
            "/strict",
            routes(probe.clone()).layer(layer(&engine).require_key(true)),
        )
        .nest(
            "/closed",
            routes(probe.clone()).layer(layer(&closed_engine)),
        )
        .nest(
            "/tenant",
            routes(probe.clone()).layer(layer(&engine).scope_fn(|parts| {
                parts
                    .headers
                    .get("x-tenant")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })),
        );
    serve(app, probe, engine, closed_engine).await
}

async fn serve(app: Router, probe: Arc<Probe>, engine: Engine, closed_engine: Engine) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Server {
        base,
        probe,
        engine,
        closed_engine,
        stop: Box::new(move || {
            let _ = tx.send(());
            handle.abort();
        }),
    }
}

contract_cases!(start);

/// Stop the server, shut the engine down, open the same file again: the record survives and
/// replays byte for byte (the case is shared with the Actix suite).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_on_same_database_replays_identically() {
    common::restart_on_same_database_replays_identically(start).await;
}

/// Issue #13, item 4, through the layer: with `canonicalize_json(true)`, two bodies that differ
/// only in an account number beyond 64 bits (or in a decimal beyond f64) used to get one
/// fingerprint, and the second replayed the first's response. Now the second is 422
/// `key-reused`, while the same document with other white space and key order still replays.
#[tokio::test]
async fn canonical_json_keeps_numbers_that_differ_apart() {
    let probe = Probe::new();
    let app = routes(probe.clone()).layer(layer(&common::engine()).canonicalize_json(true));
    let send = |body: &'static str| {
        let app = app.clone();
        async move {
            let request = axum::http::Request::post("/orders")
                .header("idempotency-key", "8b1f0c3e-6a2d-4e5f-9a7b-1c2d3e4f5a6b")
                .header("x-user-id", "u1")
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap();
            tower::ServiceExt::oneshot(app, request).await.unwrap()
        }
    };
    let first =
        send(r#"{"symbol":"A","quantity":1,"price":1,"account":18446744073709551616}"#).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let same =
        send(r#"{ "account" : 18446744073709551616, "price":1, "quantity":1, "symbol":"A" }"#)
            .await;
    assert_eq!(same.status(), StatusCode::CREATED);
    assert_eq!(same.headers()["idempotent-replayed"], "true");
    for other in [
        r#"{"symbol":"A","quantity":1,"price":1,"account":18446744073709551617}"#,
        r#"{"symbol":"A","quantity":1,"price":1.00000000000000001,"account":18446744073709551616}"#,
    ] {
        assert_eq!(
            send(other).await.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{other}"
        );
    }
    assert_eq!(probe.orders.load(Ordering::SeqCst), 1);
}
