//! HTTP end to end over loopback: the same Axum handler bare, behind the idempotency layer with
//! fresh keys, and behind it with replays, each under 64 concurrent keep-alive connections.
//! Not a criterion bench: a fixed-duration load run that prints one table, with ratios to the
//! bare handler measured in the same run.
//!
//! ```text
//! cargo bench --bench http --features axum-integration            # 5 s per case
//! HTTP_BENCH_SECS=10 HTTP_BENCH_CONNS=64 cargo bench --bench http --features axum-integration
//! ```
//! `HTTP_BENCH_CSV=path` also writes the rows as CSV.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use idempotency_rs::axum_integration::IdempotencyLayer;
use idempotency_rs::{Durability, Engine, EngineConfig};
use serde_json::{Value, json};

const BODY: &str = r#"{"symbol":"AAPL","quantity":10,"price":150.5}"#;

async fn handler(body: Bytes) -> (StatusCode, Json<Value>) {
    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
    let total = v["quantity"].as_f64().unwrap_or(0.0) * v["price"].as_f64().unwrap_or(0.0);
    (
        StatusCode::CREATED,
        Json(
            json!({"order_id": uuid::Uuid::new_v4().to_string(), "status": "created", "total": total}),
        ),
    )
}

#[derive(Clone, Copy, PartialEq)]
enum Keys {
    None,
    Fresh,
    Replay,
}

struct Row {
    name: &'static str,
    requests: u64,
    secs: f64,
    p50_us: u64,
    p99_us: u64,
    errors: u64,
}

async fn serve(app: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn connection(
    addr: std::net::SocketAddr,
    keys: Keys,
    worker: usize,
    replay_keys: Arc<Vec<String>>,
    until: Instant,
) -> (u64, u64, Vec<u32>) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (mut ok, mut errors, mut lat) = (0u64, 0u64, Vec::with_capacity(1 << 16));
    let mut i = 0usize;
    while Instant::now() < until {
        let mut req = Request::post("/orders").header("content-type", "application/json");
        match keys {
            Keys::None => {}
            Keys::Fresh => {
                req = req
                    .header("x-user-id", format!("user{}", worker % 8))
                    .header("idempotency-key", uuid::Uuid::new_v4().to_string())
            }
            Keys::Replay => {
                // Key j always belongs to scope user{j % 8}: it was completed there.
                let j = (worker * 7919 + i) % replay_keys.len();
                req = req
                    .header("x-user-id", format!("user{}", j % 8))
                    .header("idempotency-key", &replay_keys[j])
            }
        }
        let req = req
            .body(Full::new(Bytes::from_static(BODY.as_bytes())))
            .unwrap();
        let start = Instant::now();
        if sender.ready().await.is_err() {
            errors += 1;
            break;
        }
        match sender.send_request(req).await {
            Ok(resp) => {
                let status = resp.status();
                let _ = resp.into_body().collect().await;
                if status == StatusCode::CREATED {
                    ok += 1;
                } else {
                    errors += 1;
                }
            }
            Err(_) => errors += 1,
        }
        lat.push(start.elapsed().as_micros() as u32);
        i += 1;
    }
    (ok, errors, lat)
}

/// Completes every replay key once, in its scope.
async fn prefill(addr: std::net::SocketAddr, keys: &[String]) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    for (j, key) in keys.iter().enumerate() {
        let req = Request::post("/orders")
            .header("content-type", "application/json")
            .header("x-user-id", format!("user{}", j % 8))
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from_static(BODY.as_bytes())))
            .unwrap();
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED, "prefill failed");
        let _ = resp.into_body().collect().await;
    }
}

async fn load(
    name: &'static str,
    addr: std::net::SocketAddr,
    keys: Keys,
    conns: usize,
    secs: u64,
    replay_keys: Arc<Vec<String>>,
) -> Row {
    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..conns)
        .map(|w| tokio::spawn(connection(addr, keys, w, replay_keys.clone(), until)))
        .collect();
    let (mut requests, mut errors, mut lat) = (0, 0, Vec::new());
    for t in tasks {
        let (o, e, l) = t.await.unwrap();
        requests += o;
        errors += e;
        lat.extend(l);
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as u64
    };
    Row {
        name,
        requests,
        secs,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        errors,
    }
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing special. Keep the
    // test run short.
    let testing = std::env::args().all(|a| a != "--bench");
    let secs: u64 = std::env::var("HTTP_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if testing { 1 } else { 5 });
    let conns: usize = std::env::var("HTTP_BENCH_CONNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rows = rt.block_on(async {
        let engine = Engine::open(
            EngineConfig::new(dir.path().join("bench.db")).durability(Durability::Full),
        )
        .unwrap();
        let bare = serve(Router::new().route("/orders", post(handler))).await;
        let layered = serve(
            Router::new()
                .route("/orders", post(handler))
                .layer(IdempotencyLayer::new(&engine).scope_header("x-user-id")),
        )
        .await;
        // Replay keys: completed once, before the clock starts.
        let replay_keys: Arc<Vec<String>> = Arc::new(
            (0..1024)
                .map(|_| uuid::Uuid::new_v4().to_string())
                .collect(),
        );
        prefill(layered, &replay_keys).await;
        let none = Arc::new(Vec::new());
        vec![
            load("bare handler", bare, Keys::None, conns, secs, none.clone()).await,
            load("layer, fresh keys", layered, Keys::Fresh, conns, secs, none).await,
            load(
                "layer, replays",
                layered,
                Keys::Replay,
                conns,
                secs,
                replay_keys,
            )
            .await,
        ]
    });
    let base = rows[0].requests as f64 / rows[0].secs;
    println!(
        "\nHTTP end to end, {conns} connections, {secs} s per case, Durability::Full, file database\n"
    );
    println!("| case | requests/s | p50 ms | p99 ms | errors | vs bare |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut csv = String::from("case,requests_per_s,p50_ms,p99_ms,errors,ratio_vs_bare\n");
    for r in &rows {
        let rps = r.requests as f64 / r.secs;
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {} | {:.2}x |",
            r.name,
            rps,
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            r.errors,
            rps / base
        );
        csv.push_str(&format!(
            "{},{:.0},{:.3},{:.3},{},{:.3}\n",
            r.name,
            rps,
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            r.errors,
            rps / base
        ));
    }
    println!(
        "\npeak RSS of the bench process: {} MiB",
        peak_rss_kib() / 1024
    );
    if let Ok(path) = std::env::var("HTTP_BENCH_CSV") {
        std::fs::write(path, csv).unwrap();
    }
}
