//! The fixed workloads behind `make bench-cpu` (`scripts/bench-cpu.sh`): instructions per
//! operation, counted by `valgrind --tool=callgrind` over every thread of the process (the
//! engine's writer, syncer and checkpointer included), and bytes written per operation.
//!
//! Not a timed bench. Each run is one workload of `n` operations after a fixed setup (open the
//! engine, prefill); the script runs every workload twice, with `n1` and `n2` operations, and
//! divides the difference by `n2 - n1`, so the setup, the shutdown and the process's own start
//! cancel out and what is left is the cost of one operation in steady state.
//!
//! ```text
//! cargo bench --bench cpu --features axum-integration -- <workload> <n>
//! ```
//! Every workload starts on a file database holding 10k completed records. Workloads:
//! * `fresh-1`: one thread, blocking API: claim a new key, complete it (201, ~80-byte JSON
//!   body, one header). `Durability::Full`, file database. Every batch holds one command.
//! * `fresh-64`: the same on 64 tokio tasks of a current-thread runtime (`claim_async`,
//!   `complete_async`): the writer sees batches of up to 64 commands, as at 64 callers in
//!   `make bench-compare`.
//! * `replay-1`: one thread replaying completed keys (1000, cycled): replay-cache hits.
//! * `axum-bare-64`, `axum-fresh-64`, `axum-replay-64`: the same JSON handler as
//!   `benches/http.rs`, called in process (`tower::ServiceExt::oneshot`, no sockets) bare,
//!   behind the layer with fresh keys, and behind it with replays, 64 tasks.
//!
//! * `raw-64`: the floor for `fresh-64` on this schema, without the engine: one thread of
//!   plain rusqlite doing what the writer does for batches of 64 fresh claims and their
//!   completions (`common::raw_claim_complete_batch`: insert 64 in-flight rows in one
//!   transaction, update them to completed in a second, `synchronous=FULL`; SQLite's own
//!   automatic checkpoints).
//!
//! `CPU_BENCH_PAGE_SIZE=BYTES` creates the engine's database with that page size
//! ([`EngineConfig::page_size`]).
//!
//! The run prints one line: `workload=<w> n=<n> written=<bytes>`, where `written` is what the
//! process passed to `write`-family calls (`wchar`) from after the setup to after the shutdown:
//! WAL frames, checkpoint copies and the final checkpoint.

mod common;

use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use axum::routing::post;
use idempotency_rs::axum_integration::IdempotencyLayer;
use idempotency_rs::{
    ClaimOutcome, ClaimRequest, Durability, Engine, EngineConfig, Fingerprint, IdempotencyKey,
};
use tower::ServiceExt;

/// The callers of the concurrent workloads.
const TASKS: usize = 64;
/// Completed keys the replay workloads cycle over.
const REPLAY_KEYS: usize = 1000;
/// The most operations one run may do (its fresh keys are made before the count starts).
const MAX_OPS: usize = 40_000;

/// Records in the table before a workload starts.
const PREFILL: u64 = 10_000;

/// The engine every workload runs on: a file database holding [`PREFILL`] completed records
/// (as the 10k row of `make bench-compare`'s growth table), `Durability::Full`.
fn open(dir: &Path) -> Engine {
    let path = dir.join("cpu.db");
    let config = || {
        let config = EngineConfig::new(&path).durability(Durability::Full);
        match std::env::var("CPU_BENCH_PAGE_SIZE") {
            Ok(size) => config.page_size(size.parse().expect("CPU_BENCH_PAGE_SIZE: bytes")),
            Err(_) => config,
        }
    };
    Engine::open(config()).unwrap().shutdown().unwrap();
    common::prefill(&path, PREFILL, PREFILL);
    Engine::open(config()).unwrap()
}

/// A claim of `key` with the bench's fingerprint, computed once: the engine workloads count
/// the engine's instructions, not the caller's hashing of its request (the Axum workloads
/// count the layer's).
fn request(fingerprint: &Fingerprint, key: &str) -> ClaimRequest {
    ClaimRequest::new(
        common::SCOPE,
        IdempotencyKey::new(key).unwrap(),
        *fingerprint,
    )
}

fn claim_complete(engine: &Engine, fingerprint: &Fingerprint, key: &str) {
    match engine.claim(request(fingerprint, key)).unwrap() {
        ClaimOutcome::Claimed(lease) => lease.complete(common::response()).unwrap(),
        other => panic!("a fresh key was not claimed: {other:?}"),
    }
}

/// Key `i` of a set: a UUID (what the layer's default key policy asks for), the same in
/// every run.
fn key(set: Set, i: usize) -> String {
    format!("{:08x}-0000-4000-8000-{i:012x}", set as u32)
}

#[derive(Clone, Copy)]
enum Set {
    Fresh = 1,
    Replay = 2,
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `op(i)` for `i in 0..n` on [`TASKS`] tasks of `rt`, task `t` taking `t, t + TASKS, ...`.
fn on_tasks<F, Fut>(rt: &tokio::runtime::Runtime, n: usize, op: F)
where
    F: Fn(usize) -> Fut + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let op = Rc::new(op);
    let local = tokio::task::LocalSet::new();
    for t in 0..TASKS {
        let op = op.clone();
        local.spawn_local(async move {
            let mut i = t;
            while i < n {
                op(i).await;
                i += TASKS;
            }
        });
    }
    rt.block_on(local);
}

async fn handler(body: Bytes) -> (StatusCode, axum::Json<serde_json::Value>) {
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let total = v["quantity"].as_f64().unwrap_or(0.0) * v["price"].as_f64().unwrap_or(0.0);
    (
        StatusCode::CREATED,
        axum::Json(
            serde_json::json!({"order_id": "ord_8f14e45fceea167a5a36dedd4bea2543", "status": "created", "total": total}),
        ),
    )
}

const ORDER: &str = r#"{"symbol":"AAPL","quantity":10,"price":150.5}"#;

fn order(key: Option<&str>) -> Request<Body> {
    let mut b = Request::post("/orders")
        .header("content-type", "application/json")
        .header("x-user-id", "bench-user");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Body::from(ORDER)).unwrap()
}

async fn call(app: &Router, key: Option<&str>, replayed: bool) {
    let res = app.clone().oneshot(order(key)).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(
        res.headers().contains_key("idempotent-replayed"),
        replayed,
        "{key:?}"
    );
    let body = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    std::hint::black_box(body);
}

/// The router, finalized as `axum::serve` finalizes it (`with_state`): its layers applied to
/// each route once, not again for every request.
fn app(engine: Option<&Engine>) -> Router {
    let app = Router::new().route("/orders", post(handler));
    let app = match engine {
        Some(e) => app.layer(IdempotencyLayer::new(e).scope_header("x-user-id")),
        None => app,
    };
    app.with_state(())
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let (Some(workload), Some(n)) = (args.first(), args.get(1).and_then(|n| n.parse().ok())) else {
        // `cargo test --benches` runs this with no arguments: a quick pass over every workload.
        for w in [
            "fresh-1",
            "fresh-64",
            "replay-1",
            "axum-bare-64",
            "axum-fresh-64",
            "axum-replay-64",
            "raw-64",
        ] {
            run(w, 128);
        }
        return;
    };
    run(workload, n);
}

fn run(workload: &str, n: usize) {
    let dir = tempfile::tempdir().unwrap();
    if workload == "raw-64" {
        return raw(dir.path(), n);
    }
    let engine = open(dir.path());
    let rt = current_thread();
    let fp = common::fingerprint();
    // Setup, the same whatever `n`: the keys too, so that formatting them is not counted.
    assert!(n <= MAX_OPS, "at most {MAX_OPS} operations per run");
    let replay_keys: Vec<String> = (0..REPLAY_KEYS).map(|i| key(Set::Replay, i)).collect();
    let fresh_keys: Arc<Vec<String>> = Arc::new((0..MAX_OPS).map(|i| key(Set::Fresh, i)).collect());
    match workload {
        "replay-1" => {
            for k in &replay_keys {
                claim_complete(&engine, &fp, k);
            }
        }
        "axum-replay-64" => {
            let app = app(Some(&engine));
            rt.block_on(async {
                for k in &replay_keys {
                    let res = app.clone().oneshot(order(Some(k))).await.unwrap();
                    assert_eq!(res.status(), StatusCode::CREATED);
                }
            });
        }
        _ => {}
    }
    let before = common::written_bytes();
    match workload {
        "fresh-1" => {
            for i in 0..n {
                claim_complete(&engine, &fp, &fresh_keys[i]);
            }
        }
        "fresh-64" => {
            let e = engine.clone();
            on_tasks(&rt, n, move |i| {
                let e = e.clone();
                let keys = fresh_keys.clone();
                async move {
                    match e.claim_async(request(&fp, &keys[i])).await.unwrap() {
                        ClaimOutcome::Claimed(lease) => {
                            lease.complete_async(common::response()).await.unwrap()
                        }
                        other => panic!("a fresh key was not claimed: {other:?}"),
                    }
                }
            });
        }
        "replay-1" => {
            for i in 0..n {
                let k = &replay_keys[i % REPLAY_KEYS];
                match engine.claim(request(&fp, k)).unwrap() {
                    ClaimOutcome::Replay(r) => {
                        std::hint::black_box(r);
                    }
                    other => panic!("expected a replay, got {other:?}"),
                }
            }
        }
        "axum-bare-64" | "axum-fresh-64" | "axum-replay-64" => {
            let bare = workload == "axum-bare-64";
            let replay = workload == "axum-replay-64";
            let app = Arc::new(app((!bare).then_some(&engine)));
            let keys = Arc::new(replay_keys);
            on_tasks(&rt, n, move |i| {
                let app = app.clone();
                let keys = keys.clone();
                let fresh = fresh_keys.clone();
                async move {
                    let k = if replay {
                        keys[i % REPLAY_KEYS].clone()
                    } else {
                        fresh[i].clone()
                    };
                    call(&app, (!bare).then_some(k.as_str()), replay).await;
                }
            });
        }
        other => panic!("unknown workload {other}"),
    }
    engine.shutdown().unwrap();
    let written = match (before, common::written_bytes()) {
        (Some(b), Some(a)) => a - b,
        _ => 0,
    };
    println!("workload={workload} n={n} written={written}");
}

/// The `raw-64` workload: batches of 64 claims and completions in plain rusqlite.
fn raw(dir: &Path, n: usize) {
    let path = dir.join("cpu.db");
    common::create_schema(&path);
    common::prefill(&path, PREFILL, PREFILL);
    let conn = common::baseline_connection(&path, "FULL");
    let before = common::written_bytes();
    let keys: Vec<String> = (0..n).map(|i| key(Set::Fresh, i)).collect();
    for (b, chunk) in keys.chunks(64).enumerate() {
        common::raw_claim_complete_batch(&conn, chunk, 1 + 64 * b as i64, false);
    }
    drop(conn);
    let written = match (before, common::written_bytes()) {
        (Some(b), Some(a)) => a - b,
        _ => 0,
    };
    println!("workload=raw-64 n={n} written={written}");
}
