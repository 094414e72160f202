//! HTTP end to end over loopback: the same Axum handler bare, behind the idempotency layer with
//! fresh keys, and behind it with replays, each under 64 concurrent keep-alive connections.
//! Not a criterion bench: a fixed-duration load run that prints one table, with ratios to the
//! bare handler measured in the same run.
//!
//! ```text
//! cargo bench --bench http --features axum-integration            # 5 s per case
//! HTTP_BENCH_SECS=10 HTTP_BENCH_CONNS=64 cargo bench --bench http --features axum-integration
//! ```
//! `HTTP_BENCH_REPLAY_CACHE=BYTES` sets the engine's replay cache (0: off).
//! `HTTP_BENCH_CSV=path` also writes the rows as CSV, `HTTP_BENCH_MD=path` the tables as
//! markdown.
//!
//! With `HTTP_BENCH_SERVER=path/to/axum_server` (the example, built in release mode; `make
//! bench-compare` does this) a second part runs the **example itself** as a child process on a
//! table pre-filled with `HTTP_BENCH_GROWTH` records (default `0,100000,1000000`): fresh keys and
//! replays under the same load, and the server's peak resident memory (VmHWM) read from
//! `/proc/<pid>/status`, to show that the server's memory does not grow with the table.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
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

/// One run of the example server on a pre-filled table.
struct GrowthRow {
    records: u64,
    fresh: Row,
    replay: Row,
    server_peak_kib: u64,
    db_bytes_after: u64,
}

/// The example as a child process in its own directory (its store is `./idempotency.db`).
struct Server {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Server {
    fn start(binary: &Path, dir: &Path) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let child = Command::new(binary)
            .current_dir(dir)
            .env("ADDR", addr.to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let server = Server { child, addr };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the example did not start listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn peak_rss_kib(&self) -> u64 {
        common::proc_status_kib(&self.child.id().to_string(), "VmHWM").unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn example_growth(
    rt: &tokio::runtime::Runtime,
    binary: &Path,
    sizes: &[u64],
    conns: usize,
    secs: u64,
) -> Vec<GrowthRow> {
    sizes
        .iter()
        .map(|&records| {
            let dir = tempfile::tempdir().unwrap();
            let db = dir.path().join("idempotency.db");
            common::create_schema(&db);
            if records > 0 {
                let took = common::prefill(&db, records, 50_000);
                eprintln!("prefilled {records} records in {:.1} s", took.as_secs_f64());
            }
            let server = Server::start(binary, dir.path());
            let replay_keys: Arc<Vec<String>> = Arc::new(
                (0..1024)
                    .map(|_| uuid::Uuid::new_v4().to_string())
                    .collect(),
            );
            let (fresh, replay) = rt.block_on(async {
                let fresh = load(
                    "example, fresh keys",
                    server.addr,
                    Keys::Fresh,
                    conns,
                    secs,
                    Arc::new(Vec::new()),
                )
                .await;
                prefill(server.addr, &replay_keys).await;
                let replay = load(
                    "example, replays",
                    server.addr,
                    Keys::Replay,
                    conns,
                    secs,
                    replay_keys,
                )
                .await;
                (fresh, replay)
            });
            let server_peak_kib = server.peak_rss_kib();
            drop(server);
            GrowthRow {
                records,
                fresh,
                replay,
                server_peak_kib,
                db_bytes_after: common::db_size(&db),
            }
        })
        .collect()
}

fn growth_markdown(rows: &[GrowthRow], conns: usize, secs: u64) -> String {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut s = format!(
        "\nThe `axum_server` example (release build, its own process), {conns} connections, {secs} s \
         per case, on a table pre-filled with N completed records\n\n\
         | records before | fresh req/s | fresh p99 ms | replay req/s | replay p99 ms | errors | \
         server peak RSS MiB | db+wal after MiB |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for g in rows {
        s.push_str(&format!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.2} | {} | {:.1} | {:.1} |\n",
            g.records,
            g.fresh.requests as f64 / g.fresh.secs,
            g.fresh.p99_us as f64 / 1000.0,
            g.replay.requests as f64 / g.replay.secs,
            g.replay.p99_us as f64 / 1000.0,
            g.fresh.errors + g.replay.errors,
            g.server_peak_kib as f64 / 1024.0,
            mib(g.db_bytes_after),
        ));
    }
    s
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
        let mut config =
            EngineConfig::new(dir.path().join("bench.db")).durability(Durability::Full);
        // `HTTP_BENCH_REPLAY_CACHE=0` turns the replay cache off (for an A/B of it).
        if let Some(bytes) = std::env::var("HTTP_BENCH_REPLAY_CACHE")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            config = config.replay_cache_bytes(bytes);
        }
        let engine = Engine::open(config).unwrap();
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
    let mut md = format!(
        "HTTP end to end, in process: {conns} connections, {secs} s per case, Durability::Full, \
         file database\n\n| case | requests/s | p50 ms | p99 ms | errors | vs bare |\n\
         |---|---:|---:|---:|---:|---:|\n"
    );
    let mut csv = String::from(
        "case,records_before,requests_per_s,p50_ms,p99_ms,errors,ratio_vs_bare,server_peak_rss_mib\n",
    );
    for r in &rows {
        let rps = r.requests as f64 / r.secs;
        md.push_str(&format!(
            "| {} | {:.0} | {:.2} | {:.2} | {} | {:.2}x |\n",
            r.name,
            rps,
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            r.errors,
            rps / base
        ));
        csv.push_str(&format!(
            "{},0,{:.0},{:.3},{:.3},{},{:.3},\n",
            r.name,
            rps,
            r.p50_us as f64 / 1000.0,
            r.p99_us as f64 / 1000.0,
            r.errors,
            rps / base
        ));
    }
    md.push_str(&format!(
        "\nPeak RSS of the in-process bench (server and clients): {:.1} MiB\n",
        common::peak_rss_kib().unwrap_or(0) as f64 / 1024.0
    ));
    if let Ok(binary) = std::env::var("HTTP_BENCH_SERVER") {
        let sizes: Vec<u64> = std::env::var("HTTP_BENCH_GROWTH")
            .unwrap_or_else(|_| "0,100000,1000000".into())
            .split(',')
            .map(|n| n.trim().parse().expect("HTTP_BENCH_GROWTH: numbers"))
            .collect();
        let growth = example_growth(&rt, Path::new(&binary), &sizes, conns, secs);
        md.push_str(&growth_markdown(&growth, conns, secs));
        for g in &growth {
            for r in [&g.fresh, &g.replay] {
                csv.push_str(&format!(
                    "{},{},{:.0},{:.3},{:.3},{},,{:.1}\n",
                    r.name,
                    g.records,
                    r.requests as f64 / r.secs,
                    r.p50_us as f64 / 1000.0,
                    r.p99_us as f64 / 1000.0,
                    r.errors,
                    g.server_peak_kib as f64 / 1024.0
                ));
            }
        }
    }
    println!("\n{md}");
    if let Ok(path) = std::env::var("HTTP_BENCH_CSV") {
        std::fs::write(path, csv).unwrap();
    }
    if let Ok(path) = std::env::var("HTTP_BENCH_MD") {
        std::fs::write(path, md).unwrap();
    }
}
