//! The shared contract suite against the Actix-Web middleware, on a real server over TCP,
//! plus Actix-specific cases (restart on the same database file, a panicking handler).
//! Run with `cargo test --test actix --features actix-integration`.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::web::{self, Bytes, Data};
use actix_web::{App, HttpResponse, HttpServer, http::StatusCode};
use common::{Probe, REQUEST_LIMIT, RESPONSE_LIMIT, Server, client, key, post};
use idempotency_rs::actix_integration::{ClaimedKey, Idempotency};
use idempotency_rs::{Engine, EngineConfig, IdempotencyKey};
use serde_json::{Value, json};

/// Counts the calls of `/panic`, which panics on its first call.
#[derive(Default)]
struct Panics(AtomicUsize);

async fn orders(p: Data<Probe>, body: Bytes) -> HttpResponse {
    p.orders.fetch_add(1, Ordering::SeqCst);
    let (status, v) = common::order_response(&body);
    HttpResponse::build(StatusCode::from_u16(status).unwrap()).json(v)
}

async fn list() -> HttpResponse {
    HttpResponse::Ok().json(json!([]))
}

async fn fail(p: Data<Probe>) -> HttpResponse {
    p.fail.fetch_add(1, Ordering::SeqCst);
    HttpResponse::InternalServerError().body("boom")
}

async fn missing(p: Data<Probe>) -> HttpResponse {
    p.missing.fetch_add(1, Ordering::SeqCst);
    HttpResponse::NotFound().json(json!({"error": "no such thing"}))
}

async fn slow(p: Data<Probe>) -> HttpResponse {
    p.slow.fetch_add(1, Ordering::SeqCst);
    p.gate.acquire().await.unwrap().forget();
    HttpResponse::Ok().json(json!({"slow": true}))
}

async fn big(p: Data<Probe>, q: web::Query<HashMap<String, usize>>) -> HttpResponse {
    p.big.fetch_add(1, Ordering::SeqCst);
    let n = q.get("n").copied().unwrap_or(0);
    let chunks = (0..n.div_ceil(16 * 1024)).map(move |i| {
        let len = (n - i * 16 * 1024).min(16 * 1024);
        Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; len]))
    });
    HttpResponse::Ok().streaming(futures_util::stream::iter(chunks))
}

async fn panics(p: Data<Panics>) -> HttpResponse {
    if p.0.fetch_add(1, Ordering::SeqCst) == 0 {
        panic!("the handler panics on its first call");
    }
    HttpResponse::Created().json(json!({"ran": true}))
}

async fn echo_key(claimed: Option<ClaimedKey>) -> HttpResponse {
    HttpResponse::Ok().json(common::echo_key(claimed.as_ref()))
}

fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/orders", web::post().to(orders))
        .route("/echo-key", web::post().to(echo_key))
        .route("/orders", web::get().to(list))
        .route("/fail", web::post().to(fail))
        .route("/missing", web::post().to(missing))
        .route("/slow", web::post().to(slow))
        .route("/big", web::post().to(big))
        .route("/panic", web::post().to(panics));
}

fn layer(engine: &Engine) -> Idempotency {
    Idempotency::new(engine)
        .scope_header("x-user-id")
        .max_request_bytes(REQUEST_LIMIT)
        .max_response_bytes(RESPONSE_LIMIT)
}

/// Runs the app on its own thread and actix system, on 127.0.0.1 port 0.
fn serve(
    probe: Arc<Probe>,
    panics: Arc<Panics>,
    engine: Engine,
    closed_engine: Engine,
) -> (SocketAddr, ServerHandle, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let server = HttpServer::new(move || {
                App::new()
                    .app_data(Data::from(probe.clone()))
                    .app_data(Data::from(panics.clone()))
                    .service(
                        web::scope("/strict")
                            .wrap(layer(&engine).require_key(true))
                            .configure(routes),
                    )
                    .service(
                        web::scope("/closed")
                            .wrap(layer(&closed_engine))
                            .configure(routes),
                    )
                    .service(
                        web::scope("/tenant")
                            .wrap(layer(&engine).scope_fn(|req| {
                                req.headers()
                                    .get("x-tenant")
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_owned)
                            }))
                            .configure(routes),
                    )
                    .service(web::scope("").wrap(layer(&engine)).configure(routes))
            })
            .workers(2)
            .disable_signals()
            .shutdown_timeout(1)
            // A client that closes its connection drops the request future (and releases its
            // key) instead of letting the handler finish unseen.
            .h1_allow_half_closed(false)
            .bind(("127.0.0.1", 0))
            .unwrap();
            let addr = server.addrs()[0];
            let server = server.run();
            tx.send((addr, server.handle())).unwrap();
            server.await.unwrap();
        });
    });
    let (addr, handle) = rx.recv().unwrap();
    (addr, handle, thread)
}

async fn start(engine: Engine) -> Server {
    start_with(engine, Arc::new(Panics::default())).await
}

async fn start_with(engine: Engine, panics: Arc<Panics>) -> Server {
    let probe = Probe::new();
    let closed_engine = Engine::open(EngineConfig::in_memory()).unwrap();
    let (addr, handle, thread) =
        serve(probe.clone(), panics, engine.clone(), closed_engine.clone());
    Server {
        base: format!("http://{addr}"),
        probe,
        engine,
        closed_engine,
        stop: Box::new(move || {
            // Sends the stop command at once; the thread ends when the server has stopped.
            drop(handle.stop(false));
            thread.join().unwrap();
        }),
    }
}

contract_cases!(start);

/// Stop the server, shut the engine down, open the same file again: the record survives and
/// replays byte for byte (the case is shared with the Axum suite).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_on_same_database_replays_identically() {
    common::restart_on_same_database_replays_identically(start).await;
}

/// A handler that panics releases the key: the retry runs the handler again (and is stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_handler_releases_key() {
    let panics = Arc::new(Panics::default());
    let s = start_with(common::engine(), panics.clone()).await;
    let c = client();
    let k = key();
    let url = format!("{}/panic", s.base);
    let mut first = c
        .post(url.clone())
        .header("idempotency-key", &k)
        .header("x-user-id", "u1")
        .header("content-type", "application/json")
        .body("{}");
    first = first.timeout(Duration::from_secs(10));
    match first.send().await {
        // The connection is dropped with the panicking task...
        Err(e) => assert!(!e.is_timeout(), "the panicking request hung: {e}"),
        // ...or, should the framework answer, it is a server error.
        Ok(r) => assert!(r.status().is_server_error(), "{}", r.status()),
    }
    assert_eq!(panics.0.load(Ordering::SeqCst), 1);
    // The release is queued when the request future is dropped: retry until it is applied.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let body: Value = loop {
        let r = post(&c, url.clone(), Some(&k), Some("u1"), &json!({})).await;
        if r.status() == 201 {
            assert!(r.headers().get("idempotent-replayed").is_none());
            break r.json().await.unwrap();
        }
        assert_eq!(r.status(), 409, "only in-flight may precede the release");
        assert!(std::time::Instant::now() < deadline, "key still locked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(body, json!({"ran": true}));
    assert_eq!(panics.0.load(Ordering::SeqCst), 2);
    // The worker survived the panic, and the successful run is stored.
    let again = post(&c, url, Some(&k), Some("u1"), &json!({})).await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(panics.0.load(Ordering::SeqCst), 2);
    (s.stop)();
}

/// One in-process request to an Actix app: `POST path` with a JSON body, user `u1`, the key if
/// any. Answers the status, the `idempotent-replayed` header and the body.
async fn call<S, B>(
    app: &S,
    path: &str,
    key: Option<&str>,
    body: &'static str,
) -> (u16, bool, Bytes)
where
    S: actix_web::dev::Service<
            actix_http::Request,
            Response = actix_web::dev::ServiceResponse<B>,
            Error = actix_web::Error,
        >,
    B: actix_web::body::MessageBody,
{
    let mut req = actix_web::test::TestRequest::post()
        .uri(path)
        .insert_header(("x-user-id", "u1"))
        .insert_header(("content-type", "application/json"))
        .set_payload(body);
    if let Some(key) = key {
        req = req.insert_header(("idempotency-key", key));
    }
    let r = actix_web::test::call_service(app, req.to_request()).await;
    let status = r.status().as_u16();
    let replayed = r.headers().contains_key("idempotent-replayed");
    (status, replayed, actix_web::test::read_body(r).await)
}

const ORDER: &str = r#"{"symbol":"AAPL","quantity":10,"price":150.5}"#;

/// Issue #14: `paths` and `cover_if` choose the covered routes; the default service's 404 is
/// never the middleware's business.
#[actix_web::test]
async fn paths_and_cover_if_choose_what_is_covered() {
    let engine = common::engine();
    let probe = Probe::new();
    let app = actix_web::test::init_service(
        App::new()
            .app_data(Data::from(probe.clone()))
            .app_data(Data::new(Panics::default()))
            .wrap(
                layer(&engine)
                    .require_key(true)
                    .paths(["/orders", "/missing"])
                    .cover_if(|req| !req.headers().contains_key("x-internal")),
            )
            .configure(routes),
    )
    .await;
    assert_eq!(call(&app, "/orders", None, ORDER).await.0, 400);
    assert_eq!(call(&app, "/fail", None, "{}").await.0, 500);
    assert_eq!(call(&app, "/nope", None, "{}").await.0, 404);
    let internal = actix_web::test::TestRequest::post()
        .uri("/orders")
        .insert_header(("x-internal", "1"))
        .set_payload(ORDER)
        .to_request();
    assert_eq!(
        actix_web::test::call_service(&app, internal).await.status(),
        201
    );
}

#[derive(serde::Deserialize)]
struct CreateOrder {
    #[allow(dead_code)]
    symbol: String,
    quantity: u32,
}

async fn json_order(p: Data<Probe>, order: web::Json<CreateOrder>) -> HttpResponse {
    p.orders.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Created().json(json!({ "quantity": order.quantity }))
}

/// Issue #14: Actix's `web::Json` error (400) is not stored by default, so the client fixes the
/// body and retries with the same key; with `store_when(store_all_4xx)` it is replayed.
#[actix_web::test]
async fn the_json_extractors_error_is_released_by_default_and_kept_with_store_all_4xx() {
    let k = key();
    let bad = r#"{"symbol":"AAPL"}"#;
    let fixed = r#"{"symbol":"AAPL","quantity":3}"#;
    for store_all in [false, true] {
        let probe = Probe::new();
        let mut idempotency = layer(&common::engine());
        if store_all {
            idempotency = idempotency.store_when(idempotency_rs::actix_integration::store_all_4xx);
        }
        let app = actix_web::test::init_service(
            App::new()
                .app_data(Data::from(probe.clone()))
                .wrap(idempotency)
                .route("/orders", web::post().to(json_order)),
        )
        .await;
        assert_eq!(call(&app, "/orders", Some(&k), bad).await.0, 400);
        let again = call(&app, "/orders", Some(&k), bad).await;
        assert_eq!((again.0, again.1), (400, store_all));
        let fixed = call(&app, "/orders", Some(&k), fixed).await;
        let expected = if store_all { 422 } else { 201 };
        assert_eq!(fixed.0, expected, "store_all_4xx: {store_all}");
        assert_eq!(probe.orders.load(Ordering::SeqCst), usize::from(!store_all));
    }
}

/// Issue #14: `IdempotencyKey` is an extractor; without a claimed key it answers 400
/// `key-missing` as problem+json, and `Option<IdempotencyKey>` is `None`.
#[actix_web::test]
async fn the_key_is_an_extractor() {
    async fn must(key: IdempotencyKey) -> String {
        key.as_str().to_owned()
    }
    async fn may(key: Option<IdempotencyKey>) -> String {
        key.map_or_else(|| "none".to_owned(), |k| k.as_str().to_owned())
    }
    let app = actix_web::test::init_service(
        App::new()
            .wrap(layer(&common::engine()))
            .route("/must", web::post().to(must))
            .route("/may", web::post().to(may)),
    )
    .await;
    let k = key();
    let quoted: &'static str =
        Box::leak(format!("\"{}\"", k.to_ascii_uppercase()).into_boxed_str());
    let (status, _, body) = call(&app, "/must", Some(quoted), "{}").await;
    assert_eq!((status, body.as_ref()), (200, k.as_bytes()));
    let (status, _, body) = call(&app, "/must", None, "{}").await;
    assert_eq!(status, 400);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["type"], "urn:idempotency-rs:problem:key-missing");
    assert_eq!(call(&app, "/may", None, "{}").await.2, "none");
}

/// Issue #14 review: where the middleware cannot see, before routing, which resource a request
/// will reach (a second scope behind a guard, a `NormalizePath` inside the middleware, a
/// percent-encoded path), it refuses nothing but still deduplicates a request with a key: the
/// handler runs once.
#[actix_web::test]
async fn requests_routed_where_the_middleware_cannot_see_are_still_deduplicated() {
    let engine = common::engine();
    let probe = Probe::new();
    let app = actix_web::test::init_service(
        App::new()
            .app_data(Data::from(probe.clone()))
            .app_data(Data::new(Panics::default()))
            .wrap(actix_web::middleware::NormalizePath::trim())
            .wrap(layer(&engine).require_key(true))
            .service(
                web::scope("/v")
                    .guard(actix_web::guard::Header("x-api-version", "1"))
                    .route("/other", web::post().to(list)),
            )
            .service(
                web::scope("/v")
                    .guard(actix_web::guard::Header("x-api-version", "2"))
                    .configure(routes),
            )
            .configure(routes),
    )
    .await;
    for (path, version) in [("/v/orders", "2"), ("/orders/", ""), ("/%6Frders", "")] {
        let k = key();
        let before = probe.orders.load(Ordering::SeqCst);
        for _ in 0..2 {
            let mut req = actix_web::test::TestRequest::post()
                .uri(path)
                .insert_header(("x-user-id", "u1"))
                .insert_header(("idempotency-key", k.as_str()))
                .set_payload(ORDER);
            if !version.is_empty() {
                req = req.insert_header(("x-api-version", version));
            }
            let r = actix_web::test::call_service(&app, req.to_request()).await;
            assert_eq!(r.status(), 201, "{path}");
        }
        assert_eq!(
            probe.orders.load(Ordering::SeqCst),
            before + 1,
            "{path} ran twice"
        );
    }
}
