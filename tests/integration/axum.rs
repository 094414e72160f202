//! The Axum layer on a real server over TCP: the shared HTTP contract suite plus what is
//! Axum's own (route selection, the extractors, the fallback).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::common::{self, Probe, REQUEST_LIMIT, RESPONSE_LIMIT, Server, key};
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idempotency_rs::axum_integration::{ClaimedKey, IdempotencyLayer};
use idempotency_rs::{Engine, EngineConfig, IdempotencyKey};
use serde_json::json;

fn routes(probe: Arc<Probe>) -> Router {
    Router::new()
        .route(
            "/echo-key",
            post(|claimed: Option<ClaimedKey>| async move {
                Json(common::echo_key(claimed.as_ref()))
            }),
        )
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

crate::contract_cases!(start);

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

/// Sends one request to `app` in process: `POST path` with a JSON body, the user `u1`, and the
/// key if any.
async fn send_to<S>(app: S, path: &str, key: Option<&str>, body: &str) -> axum::response::Response
where
    S: tower::Service<
            axum::http::Request<Body>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        >,
{
    let mut request = axum::http::Request::post(path)
        .header("x-user-id", "u1")
        .header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let request = request.body(Body::from(body.to_owned())).unwrap();
    tower::ServiceExt::oneshot(app, request).await.unwrap()
}

const ORDER: &str = r#"{"symbol":"AAPL","quantity":10,"price":150.5}"#;

/// Issue #14: `paths` chooses the covered routes, in every position of the layer, and
/// `route_layer`, a single route's `layer` and `Router::layer` leave the fallback's 404
/// untouched. Around a whole `Router` (outside it), the layer cannot see which requests no
/// route matches: without `paths`, every covered method is its business, as documented.
#[tokio::test]
async fn paths_route_layer_and_single_routes_choose_what_is_covered() {
    let engine = common::engine();
    let strict = || layer(&engine).require_key(true);
    let status = |r: axum::response::Response| r.status().as_u16();

    // Around the whole router, with paths: /orders needs a key, the rest passes through.
    let probe = Probe::new();
    let outside = tower::Layer::layer(
        &strict().paths(["/orders", "/orders/{id}"]),
        routes(probe.clone()),
    );
    assert_eq!(
        status(send_to(outside.clone(), "/orders", None, ORDER).await),
        400
    );
    assert_eq!(
        status(send_to(outside.clone(), "/fail", None, "{}").await),
        500
    );
    assert_eq!(
        status(send_to(outside.clone(), "/nope", None, "{}").await),
        404
    );
    // Around the whole router, without paths: the fallback cannot be told apart.
    let everything = tower::Layer::layer(&strict(), routes(probe.clone()));
    assert_eq!(status(send_to(everything, "/nope", None, "{}").await), 400);

    // Inside the router: `layer`, `route_layer` and one route's own layer leave /nope alone.
    let k = key();
    for app in [
        routes(probe.clone()).layer(strict()),
        routes(probe.clone()).route_layer(strict()),
        Router::new()
            .route(
                "/orders",
                post(|body: Bytes| async move {
                    let (status, v) = common::order_response(&body);
                    (StatusCode::from_u16(status).unwrap(), Json(v))
                })
                .layer(strict()),
            )
            .route("/free", post(|| async { StatusCode::CREATED })),
    ] {
        assert_eq!(status(send_to(app.clone(), "/nope", None, "{}").await), 404);
        assert_eq!(
            status(send_to(app.clone(), "/nope", Some(&k), "{}").await),
            404
        );
        assert_eq!(
            status(send_to(app.clone(), "/orders", None, ORDER).await),
            400
        );
    }
    // A service nested with `nest_service` is reached without a `MatchedPath`, like the
    // fallback: the outer router's layer refuses nothing there (a request without a key runs),
    // but still deduplicates a request with a key. Layered itself, it is covered whole. A
    // custom fallback passes through like the default one; so does the fallback when the
    // layer sits inside a `ServiceBuilder` stack.
    let outer = Router::new()
        .nest_service("/legacy", routes(probe.clone()))
        .route("/orders", post(|| async { StatusCode::CREATED }))
        .layer(strict());
    assert_eq!(
        status(send_to(outer.clone(), "/orders", None, ORDER).await),
        400
    );
    assert_eq!(
        status(send_to(outer.clone(), "/legacy/orders", None, ORDER).await),
        201
    );
    let before = probe.orders.load(Ordering::SeqCst);
    let nested_key = key();
    for _ in 0..2 {
        let r = send_to(outer.clone(), "/legacy/orders", Some(&nested_key), ORDER).await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    assert_eq!(
        probe.orders.load(Ordering::SeqCst),
        before + 1,
        "deduplicated"
    );
    let own = Router::new().nest_service(
        "/legacy",
        tower::Layer::layer(&strict(), routes(probe.clone())),
    );
    assert_eq!(
        status(send_to(own, "/legacy/orders", None, ORDER).await),
        400
    );
    let custom = Router::new()
        .route("/orders", post(|| async { StatusCode::CREATED }))
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(strict());
    assert_eq!(status(send_to(custom, "/nope", None, "{}").await), 404);
    let stacked = Router::new()
        .route("/orders", post(|| async { StatusCode::CREATED }))
        .layer(
            tower::ServiceBuilder::new()
                .layer(strict())
                .layer(axum::middleware::from_fn(
                    |req: axum::extract::Request, next: axum::middleware::Next| next.run(req),
                )),
        );
    assert_eq!(
        status(send_to(stacked.clone(), "/nope", None, "{}").await),
        404
    );
    assert_eq!(status(send_to(stacked, "/orders", None, "{}").await), 400);

    // `paths` are the paths the client sends, also inside a nested router.
    let api = Router::new().nest(
        "/api",
        routes(probe.clone()).layer(strict().paths(["/api/orders"])),
    );
    assert_eq!(
        status(send_to(api.clone(), "/api/orders", None, ORDER).await),
        400
    );
    assert_eq!(status(send_to(api, "/api/fail", None, "{}").await), 500);

    // A layered `MethodRouter` called on its own (no router, so no `MatchedPath`) is covered.
    let alone = post(|| async { StatusCode::CREATED }).layer(strict());
    assert_eq!(
        status(send_to(alone.clone(), "/anything", None, "{}").await),
        400
    );
    assert_eq!(
        status(send_to(alone, "/anything", Some(&k), "{}").await),
        201
    );

    // A route without the layer needs no key.
    let single = Router::new()
        .route(
            "/orders",
            post(|| async { StatusCode::CREATED }).layer(strict()),
        )
        .route("/free", post(|| async { StatusCode::CREATED }));
    assert_eq!(status(send_to(single, "/free", None, "{}").await), 201);

    // Paths with a parameter: /orders/{id} is covered, /orders/{id}/items is not.
    let by_id = Router::new()
        .route("/orders/{id}", post(|| async { StatusCode::OK }))
        .route("/orders/{id}/items", post(|| async { StatusCode::OK }))
        .layer(strict().paths(["/orders/{id}"]));
    assert_eq!(
        status(send_to(by_id.clone(), "/orders/42", None, "{}").await),
        400
    );
    assert_eq!(
        status(send_to(by_id, "/orders/42/items", None, "{}").await),
        200
    );
}

/// Issue #14: `cover_if` decides from the request head, as tower-http's predicates do.
#[tokio::test]
async fn cover_if_chooses_by_the_request_head() {
    let probe = Probe::new();
    let app = routes(probe.clone()).layer(
        layer(&common::engine())
            .require_key(true)
            .cover_if(|parts| !parts.headers.contains_key("x-internal")),
    );
    assert_eq!(
        send_to(app.clone(), "/orders", None, ORDER).await.status(),
        400
    );
    let internal = axum::http::Request::post("/orders")
        .header("x-internal", "1")
        .body(Body::from(ORDER))
        .unwrap();
    let r = tower::ServiceExt::oneshot(app, internal).await.unwrap();
    assert_eq!(r.status(), 201);
}

#[derive(serde::Deserialize)]
struct CreateOrder {
    #[allow(dead_code)]
    symbol: String,
    quantity: u32,
}

/// A route whose handler takes `Json<CreateOrder>`: a body without `quantity` is Axum's own 422.
fn json_route(probe: Arc<Probe>, layer: IdempotencyLayer) -> Router {
    Router::new()
        .route(
            "/orders",
            post(
                |State(p): State<Arc<Probe>>, Json(order): Json<CreateOrder>| async move {
                    p.orders.fetch_add(1, Ordering::SeqCst);
                    (
                        StatusCode::CREATED,
                        Json(json!({ "quantity": order.quantity })),
                    )
                },
            ),
        )
        .with_state(probe)
        .layer(layer)
}

/// Issue #14: Axum's `Json` rejection (422) is not stored by default, so the client fixes the
/// body and retries with the same key; with `store_when(store_all_4xx)` it is replayed, and a
/// fixed body under the same key is a mismatch.
#[tokio::test]
async fn the_json_extractors_rejection_is_released_by_default_and_kept_with_store_all_4xx() {
    let k = key();
    let probe = Probe::new();
    let app = json_route(probe.clone(), layer(&common::engine()));
    let r = send_to(app.clone(), "/orders", Some(&k), r#"{"symbol":"AAPL"}"#).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let fixed = r#"{"symbol":"AAPL","quantity":3}"#;
    let r = send_to(app.clone(), "/orders", Some(&k), fixed).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(r.headers().get("idempotent-replayed").is_none());
    assert_eq!(probe.orders.load(Ordering::SeqCst), 1);

    let probe = Probe::new();
    let app = json_route(
        probe.clone(),
        layer(&common::engine()).store_when(idempotency_rs::axum_integration::store_all_4xx),
    );
    let bad = r#"{"symbol":"AAPL"}"#;
    let first = send_to(app.clone(), "/orders", Some(&k), bad).await;
    assert_eq!(first.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let again = send_to(app.clone(), "/orders", Some(&k), bad).await;
    assert_eq!(again.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let r = send_to(app, "/orders", Some(&k), fixed).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(probe.orders.load(Ordering::SeqCst), 0);
}

/// Issue #14: `IdempotencyKey` is an extractor too; where the request has no claimed key it
/// answers 400 `key-missing` as problem+json, and `Option<IdempotencyKey>` is `None`.
#[tokio::test]
async fn the_key_is_an_extractor() {
    let app = Router::new()
        .route(
            "/must",
            post(|key: IdempotencyKey| async move { key.as_str().to_owned() }),
        )
        .route(
            "/may",
            post(|key: Option<IdempotencyKey>| async move {
                key.map_or_else(|| "none".to_owned(), |k| k.as_str().to_owned())
            }),
        )
        .layer(layer(&common::engine()));
    let k = key();
    let quoted = format!("\"{}\"", k.to_ascii_uppercase());
    let r = send_to(app.clone(), "/must", Some(&quoted), "{}").await;
    assert_eq!(r.status(), StatusCode::OK);
    let body = axum::body::to_bytes(r.into_body(), 1024).await.unwrap();
    assert_eq!(body, k.as_bytes());
    let r = send_to(app.clone(), "/must", None, "{}").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r = send_to(app, "/may", None, "{}").await;
    let body = axum::body::to_bytes(r.into_body(), 1024).await.unwrap();
    assert_eq!(body, "none");
}
