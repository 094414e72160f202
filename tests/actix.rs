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
use idempotency_rs::actix_integration::Idempotency;
use idempotency_rs::{Engine, EngineConfig};
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

fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/orders", web::post().to(orders))
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
