//! Abuse of the HTTP surface, against the Axum and Actix-Web example apps
//! (`examples/axum_server.rs`, `examples/actix_server.rs`, included below as modules).
//!
//! Every case runs against both frameworks from one case list (`abuse_cases!` at the end), on
//! 127.0.0.1 port 0 over real TCP, with reqwest or, for requests reqwest will not send
//! (control characters, half a body, a 100 MB body written slowly), a raw socket. Each case
//! checks the contract's answer, the handler count where it matters, and that the server still
//! serves another client afterwards.
//!
//! The server of a case is the example's app on a file store in a temporary directory, with
//! three extra mounts behind the same middleware config: `/opaque/orders` (the example's routes
//! under `KeyPolicy::Opaque`, to reach the 255-byte and escaped keys the example's UUID policy
//! refuses), `/report?n=N` (N bytes, streamed in 16 KiB chunks) and `/shutdown` (shuts the
//! store down, then answers 201). The memory cases run the example's own `app` / `server`
//! unchanged, alone in the process (they take [`EXCLUSIVE`] for writing), and measure the peak
//! resident set while they run.

mod common;

#[allow(dead_code)]
#[path = "../examples/axum_server.rs"]
mod axum_example;

#[allow(dead_code)]
#[path = "../examples/actix_server.rs"]
mod actix_example;

use std::collections::HashMap;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use idempotency_rs::contract::KeyPolicy;
use idempotency_rs::{ClaimOutcome, EngineConfig, Error, ManualClock, SqliteIdempotencyStore};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The examples keep the contract's default request limit.
const REQUEST_LIMIT: usize = 1024 * 1024;
/// And its default response limit.
const RESPONSE_LIMIT: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framework {
    Axum,
    Actix,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The example's app (Axum) or server (Actix) exactly.
    Example,
    /// The example's routes and middleware plus the test mounts.
    Extended,
}

/// A running server.
struct Target {
    framework: Framework,
    base: String,
    addr: SocketAddr,
    store: SqliteIdempotencyStore,
    orders: Box<dyn Fn() -> usize + Send + Sync>,
    reports: Arc<AtomicUsize>,
    stop: Option<Box<dyn FnOnce() + Send>>,
}

impl Target {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// How many times the example's order handler ran.
    fn orders(&self) -> usize {
        (self.orders)()
    }

    /// How many times `/report` or `/shutdown` ran.
    fn reports(&self) -> usize {
        self.reports.load(Ordering::SeqCst)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
    }
}

/// State of the test-only routes.
#[derive(Clone)]
struct Extras {
    reports: Arc<AtomicUsize>,
    store: SqliteIdempotencyStore,
}

/// `n` bytes of `r`, in 16 KiB chunks made as they are sent.
fn report_chunks(n: usize) -> impl Iterator<Item = Result<Vec<u8>, std::io::Error>> {
    (0..n.div_ceil(16 * 1024)).map(move |i| Ok(vec![b'r'; (n - i * 16 * 1024).min(16 * 1024)]))
}

async fn start(framework: Framework, mode: Mode, store: SqliteIdempotencyStore) -> Target {
    match framework {
        Framework::Axum => start_axum(mode, store),
        Framework::Actix => start_actix(mode, store),
    }
}

/// A store on a fresh file in a temporary directory (removed when the `TempDir` is dropped).
fn file_store() -> (SqliteIdempotencyStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idempotency.db");
    (
        SqliteIdempotencyStore::with_config(EngineConfig::new(path)).unwrap(),
        dir,
    )
}

mod axum_app {
    use super::*;
    use axum::Router;
    use axum::body::{Body, Bytes};
    use axum::extract::{Query, State};
    use axum::http::StatusCode;
    use axum::response::Response;
    use axum::routing::post;

    async fn report(State(x): State<Extras>, Query(q): Query<HashMap<String, usize>>) -> Response {
        x.reports.fetch_add(1, Ordering::SeqCst);
        let chunks = report_chunks(q["n"]).map(|c| c.map(Bytes::from));
        Response::new(Body::from_stream(futures_util::stream::iter(chunks)))
    }

    async fn shutdown(State(x): State<Extras>) -> (StatusCode, axum::Json<Value>) {
        x.reports.fetch_add(1, Ordering::SeqCst);
        let engine = x.store.engine().clone();
        tokio::task::spawn_blocking(move || engine.shutdown())
            .await
            .unwrap()
            .unwrap();
        (StatusCode::CREATED, axum::Json(json!({"shut": true})))
    }

    pub(super) fn start(mode: Mode, store: SqliteIdempotencyStore) -> Target {
        let orders = Arc::new(axum_example::Orders::default());
        let reports = Arc::new(AtomicUsize::new(0));
        let app = axum_example::app(&store, orders.clone());
        let app = match mode {
            Mode::Example => app,
            Mode::Extended => {
                let extras = Router::new()
                    .route("/report", post(report))
                    .route("/shutdown", post(shutdown))
                    .with_state(Extras {
                        reports: reports.clone(),
                        store: store.clone(),
                    })
                    .layer(axum_example::layer(&store));
                let opaque = axum_example::routes(orders.clone())
                    .layer(axum_example::layer(&store).key_policy(KeyPolicy::Opaque));
                app.nest("/opaque", opaque).merge(extras)
            }
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // The server has a runtime of its own, as in the example's `main`.
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tokio::select! {
                    r = axum::serve(listener, app).into_future() => r.unwrap(),
                    _ = rx => {}
                }
            });
            // Drops the connections still open (a failed test may leave some behind).
            rt.shutdown_timeout(Duration::from_secs(1));
        });
        Target {
            framework: Framework::Axum,
            base: format!("http://{addr}"),
            addr,
            store,
            orders: Box::new(move || orders.created()),
            reports,
            stop: Some(Box::new(move || {
                let _ = tx.send(());
                thread.join().unwrap();
            })),
        }
    }
}

mod actix_app {
    use super::*;
    use actix_web::web::{self, Bytes, Data};
    use actix_web::{App, HttpResponse, HttpServer};

    async fn report(x: Data<Extras>, q: web::Query<HashMap<String, usize>>) -> HttpResponse {
        x.reports.fetch_add(1, Ordering::SeqCst);
        let chunks = report_chunks(q["n"]).map(|c| c.map(Bytes::from));
        HttpResponse::Ok().streaming(futures_util::stream::iter(chunks))
    }

    async fn shutdown(x: Data<Extras>) -> HttpResponse {
        x.reports.fetch_add(1, Ordering::SeqCst);
        let engine = x.store.engine().clone();
        web::block(move || engine.shutdown())
            .await
            .unwrap()
            .unwrap();
        HttpResponse::Created().json(json!({"shut": true}))
    }

    pub(super) fn start(mode: Mode, store: SqliteIdempotencyStore) -> Target {
        let orders = Data::new(actix_example::Orders::default());
        let reports = Arc::new(AtomicUsize::new(0));
        let extras = Data::new(Extras {
            reports: reports.clone(),
            store: store.clone(),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn({
            let (orders, store) = (orders.clone(), store.clone());
            move || {
                actix_web::rt::System::new().block_on(async move {
                    let (server, addrs) = match mode {
                        Mode::Example => {
                            actix_example::server(&store, orders, "127.0.0.1:0").unwrap()
                        }
                        Mode::Extended => {
                            let server = HttpServer::new(move || {
                                App::new()
                                    .app_data(orders.clone())
                                    .app_data(extras.clone())
                                    .service(
                                        web::scope("/opaque")
                                            .wrap(
                                                actix_example::idempotency(&store)
                                                    .key_policy(KeyPolicy::Opaque),
                                            )
                                            .configure(actix_example::routes),
                                    )
                                    .service(
                                        web::scope("")
                                            .wrap(actix_example::idempotency(&store))
                                            .configure(actix_example::routes)
                                            .route("/report", web::post().to(report))
                                            .route("/shutdown", web::post().to(shutdown)),
                                    )
                            })
                            .workers(2)
                            .disable_signals()
                            .shutdown_timeout(1)
                            // As the example's `server`.
                            .h1_allow_half_closed(false)
                            .bind(("127.0.0.1", 0))
                            .unwrap();
                            let addrs = server.addrs();
                            (server.run(), addrs)
                        }
                    };
                    tx.send((addrs[0], server.handle())).unwrap();
                    server.await.unwrap();
                });
            }
        });
        let (addr, handle) = rx.recv().unwrap();
        Target {
            framework: Framework::Actix,
            base: format!("http://{addr}"),
            addr,
            store,
            orders: Box::new(move || orders.created()),
            reports,
            stop: Some(Box::new(move || {
                drop(handle.stop(false));
                thread.join().unwrap();
            })),
        }
    }
}

use actix_app::start as start_actix;
use axum_app::start as start_axum;

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

fn order() -> Value {
    json!({"symbol": "AAPL", "quantity": 10, "price": 150.5})
}

/// An order of exactly `len` bytes of JSON.
fn order_of_len(len: usize) -> Vec<u8> {
    let frame = br#"{"symbol":"","quantity":1,"price":1}"#.len();
    assert!(len >= frame);
    let body = format!(
        r#"{{"symbol":"{}","quantity":1,"price":1}}"#,
        "x".repeat(len - frame)
    );
    assert_eq!(body.len(), len);
    body.into_bytes()
}

fn key() -> String {
    common::key()
}

async fn post_order(
    c: &reqwest::Client,
    url: String,
    key: Option<&str>,
    user: &str,
) -> reqwest::Response {
    common::post(c, url, key, Some(user), &order()).await
}

/// A new key on the example route runs the handler once and replays: the server still serves.
async fn still_serves(t: &Target) {
    let c = common::client();
    let before = t.orders();
    let k = key();
    let first = post_order(&c, t.url("/orders"), Some(&k), "still-serving").await;
    assert_eq!(
        first.status(),
        201,
        "{:?}: a fresh request failed",
        t.framework
    );
    let first: Value = first.json().await.unwrap();
    let again = post_order(&c, t.url("/orders"), Some(&k), "still-serving").await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    assert_eq!(t.orders(), before + 1);
}

/// A raw HTTP/1.1 request, built byte by byte.
struct Raw {
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    /// Send the body chunked, in chunks of this size.
    chunked: Option<usize>,
}

impl Raw {
    fn post(path: &str) -> Raw {
        Raw {
            path: path.into(),
            headers: vec![
                ("Host".into(), b"test".to_vec()),
                ("Connection".into(), b"close".to_vec()),
                ("Content-Type".into(), b"application/json".to_vec()),
                ("X-User-ID".into(), b"u1".to_vec()),
            ],
            body: serde_json::to_vec(&order()).unwrap(),
            chunked: None,
        }
    }

    fn key(self, key: impl AsRef<[u8]>) -> Raw {
        self.header("Idempotency-Key", key)
    }

    fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Raw {
        self.headers.push((name.into(), value.as_ref().to_vec()));
        self
    }

    fn body(mut self, body: Vec<u8>) -> Raw {
        self.body = body;
        self
    }

    fn chunked(mut self, size: usize) -> Raw {
        self.chunked = Some(size);
        self
    }

    /// The request head, ending with the blank line.
    fn head(&self, content_length: Option<u64>) -> Vec<u8> {
        let mut out = format!("POST {} HTTP/1.1\r\n", self.path).into_bytes();
        for (name, value) in &self.headers {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        match (self.chunked, content_length) {
            (Some(_), _) => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
            (None, Some(n)) => out.extend_from_slice(format!("Content-Length: {n}\r\n").as_bytes()),
            (None, None) => {}
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = self.head(Some(self.body.len() as u64));
        match self.chunked {
            None => out.extend_from_slice(&self.body),
            Some(size) => {
                for c in self.body.chunks(size) {
                    out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                    out.extend_from_slice(c);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
            }
        }
        out
    }

    /// Sends the request (while reading, so an early answer is seen) and reads the answer.
    async fn send(&self, addr: SocketAddr) -> Answer {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut rd, mut wr) = stream.into_split();
        let bytes = self.bytes();
        // The write half is kept until the answer is read: dropping it would half-close the
        // connection, which the Actix example takes as the client leaving.
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&bytes).await;
            wr
        });
        let answer = read_answer(&mut rd).await;
        drop(writer.await);
        answer
    }
}

/// A response read from a raw socket.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// What a raw request got.
#[derive(Debug)]
enum Answer {
    Response(RawResponse),
    /// The connection was closed (or reset) before a whole response arrived.
    Closed(String),
}

impl Answer {
    fn response(self) -> RawResponse {
        match self {
            Answer::Response(r) => r,
            Answer::Closed(why) => panic!("expected a response, the connection closed: {why}"),
        }
    }

    /// A 4xx response or a closed connection: how a server may refuse a request it cannot
    /// parse. Returns a description for the log.
    fn refused(&self) -> String {
        match self {
            Answer::Response(r) => {
                assert!(
                    (400..500).contains(&r.status),
                    "expected a 4xx, got {} {:?}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                );
                if r.header("content-type") == Some("application/problem+json") {
                    format!("{} {}", r.status, r.json()["type"])
                } else {
                    format!("{} (from the server's HTTP parser)", r.status)
                }
            }
            Answer::Closed(why) => format!("connection closed ({why})"),
        }
    }
}

/// Checks a problem+json answer.
fn expect_problem(answer: Answer, status: u16, slug: &str) -> RawResponse {
    let r = answer.response();
    assert_eq!(
        r.status,
        status,
        "status for {slug}: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let v = r.json();
    assert_eq!(v["type"], format!("urn:idempotency-rs:problem:{slug}"));
    assert_eq!(v["status"], status);
    assert!(v["detail"].as_str().is_some_and(|d| d.len() > 20));
    r
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response (its head, then a `Content-Length`, chunked or read-to-close body).
async fn read_answer<R: AsyncReadExt + Unpin>(rd: &mut R) -> Answer {
    match tokio::time::timeout(Duration::from_secs(20), read_response(rd)).await {
        Ok(answer) => answer,
        Err(_) => panic!("no answer in 20 s"),
    }
}

async fn read_response<R: AsyncReadExt + Unpin>(rd: &mut R) -> Answer {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    // The head.
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        match rd.read(&mut chunk).await {
            Ok(0) => return Answer::Closed(format!("EOF after {} bytes", buf.len())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Answer::Closed(e.to_string()),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, Vec<u8>)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_ascii_lowercase(), v.trim().as_bytes().to_vec())
        })
        .collect();
    let mut rest = buf[head_end..].to_vec();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).to_ascii_lowercase())
    };
    let body = if let Some(len) = get("content-length") {
        let len: usize = len.parse().unwrap();
        while rest.len() < len {
            match rd.read(&mut chunk).await {
                Ok(0) => return Answer::Closed(format!("EOF in a body of {len}")),
                Ok(n) => rest.extend_from_slice(&chunk[..n]),
                Err(e) => return Answer::Closed(e.to_string()),
            }
        }
        rest.truncate(len);
        rest
    } else if get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        let mut body = Vec::new();
        loop {
            // Decode every complete chunk in `rest`.
            if let Some(eol) = find(&rest, b"\r\n") {
                let size_text = String::from_utf8_lossy(&rest[..eol]).into_owned();
                let size =
                    usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
                if size == 0 {
                    break;
                }
                if rest.len() >= eol + 2 + size + 2 {
                    body.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
                    rest.drain(..eol + 2 + size + 2);
                    continue;
                }
            }
            match rd.read(&mut chunk).await {
                Ok(0) => return Answer::Closed("EOF in a chunked body".into()),
                Ok(n) => rest.extend_from_slice(&chunk[..n]),
                Err(e) => return Answer::Closed(e.to_string()),
            }
        }
        body
    } else {
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break rest,
                Ok(n) => rest.extend_from_slice(&chunk[..n]),
            }
        }
    };
    Answer::Response(RawResponse {
        status,
        headers,
        body,
    })
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

/// Ordinary cases share the process (read lock); a memory case runs alone (write lock).
static EXCLUSIVE: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    EXCLUSIVE.read().unwrap_or_else(PoisonError::into_inner)
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    EXCLUSIVE.write().unwrap_or_else(PoisonError::into_inner)
}

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The peak resident set of the process while it lives, over the resident set when it
/// started: `VmHWM` (reset at the start through `/proc/self/clear_refs`), and a sampler of
/// `VmRSS` every 2 ms where the reset is refused.
struct PeakRss {
    baseline_kib: u64,
    reset: bool,
    stop: Arc<AtomicBool>,
    sampled_kib: Arc<AtomicU64>,
    sampler: std::thread::JoinHandle<()>,
}

impl PeakRss {
    /// `None` where `/proc/self/status` does not exist (not Linux).
    fn start() -> Option<PeakRss> {
        let baseline_kib = status_kib("VmRSS:")?;
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        let stop = Arc::new(AtomicBool::new(false));
        let sampled_kib = Arc::new(AtomicU64::new(baseline_kib));
        let sampler = std::thread::spawn({
            let (stop, sampled) = (stop.clone(), sampled_kib.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(rss) = status_kib("VmRSS:") {
                        sampled.fetch_max(rss, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        Some(PeakRss {
            baseline_kib,
            reset,
            stop,
            sampled_kib,
            sampler,
        })
    }

    /// The growth of the peak over the baseline, in MiB.
    fn growth_mib(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.join().unwrap();
        let mut peak = self.sampled_kib.load(Ordering::Relaxed);
        if self.reset {
            peak = peak.max(status_kib("VmHWM:").unwrap_or(0));
        }
        peak.saturating_sub(self.baseline_kib) as f64 / 1024.0
    }
}

/// The instrument works: a 100 MB buffer shows as (at least 90 MiB of) peak growth, so the
/// bounds below would catch a layer that buffered a whole 100 MB body.
#[test]
fn peak_rss_sees_a_100_mb_buffer() {
    let _alone = exclusive();
    let Some(peak) = PeakRss::start() else {
        eprintln!("SKIPPED: no /proc/self/status here");
        return;
    };
    let buffer = vec![1u8; 100 * 1000 * 1000];
    assert_eq!(
        buffer
            .iter()
            .step_by(4096)
            .map(|b| *b as usize)
            .sum::<usize>(),
        24_415
    );
    drop(buffer);
    let growth = peak.growth_mib();
    assert!(growth >= 90.0, "a 100 MB buffer showed as {growth:.1} MiB");
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// Keys of 0, 1, 255 and 256 bytes get 400 `key-invalid` under the example's UUID policy;
/// under the opaque policy 1 and 255 bytes run (once) and 0 and 256 are refused. Keys of
/// 100,000 and 1,000,000 bytes get whatever the server's header limit makes of them (a 4xx or
/// a closed connection), never the handler.
async fn key_lengths(t: &Target) {
    for len in [0, 1, 255, 256] {
        let key = "a".repeat(len);
        let answer = Raw::post("/orders").key(&key).send(t.addr).await;
        expect_problem(answer, 400, "key-invalid");
    }
    for (len, runs) in [(0, false), (1, true), (255, true), (256, false)] {
        let key = "b".repeat(len);
        let answer = Raw::post("/opaque/orders").key(&key).send(t.addr).await;
        if runs {
            let first = answer.response();
            assert_eq!(first.status, 201, "{len} bytes");
            let again = Raw::post("/opaque/orders")
                .key(&key)
                .send(t.addr)
                .await
                .response();
            assert_eq!(again.header("idempotent-replayed"), Some("true"));
            assert_eq!(again.json(), first.json());
        } else {
            expect_problem(answer, 400, "key-invalid");
        }
    }
    assert_eq!(t.orders(), 2);
    for len in [100_000, 1_000_000] {
        for path in ["/orders", "/opaque/orders"] {
            let answer = Raw::post(path).key("c".repeat(len)).send(t.addr).await;
            eprintln!(
                "{:?}: a key of {len} bytes on {path}: {}",
                t.framework,
                answer.refused()
            );
            if let Answer::Response(r) = &answer
                && r.header("content-type") == Some("application/problem+json")
            {
                assert_eq!(r.json()["type"], "urn:idempotency-rs:problem:key-invalid");
            }
        }
    }
    assert_eq!(t.orders(), 2, "a huge key reached the handler");
    still_serves(t).await;
}

/// Non-ASCII bytes (UTF-8, a lone obs-text byte) are 400 `key-invalid` under both policies; a
/// tab (legal in a header value) too; control characters the HTTP parser refuses are a 4xx
/// (or a closed connection) from the server itself. The handler never runs.
async fn key_characters(t: &Target) {
    let u = key();
    let invalid: Vec<Vec<u8>> = vec![
        "caf\u{e9}".as_bytes().to_vec(),
        format!("{u}\u{e9}").into_bytes(),
        b"\xff".to_vec(),
        format!("{}\t{}", &u[..18], &u[19..]).into_bytes(),
        format!("\"{u}\u{e9}\"").into_bytes(),
    ];
    for path in ["/orders", "/opaque/orders"] {
        for bad in &invalid {
            let answer = Raw::post(path).key(bad).send(t.addr).await;
            expect_problem(answer, 400, "key-invalid");
        }
        for ctl in [b'\0', 0x01, 0x1b, 0x7f, b'\r'] {
            let mut bad = u.clone().into_bytes();
            bad[5] = ctl;
            let answer = Raw::post(path).key(&bad).send(t.addr).await;
            let what = answer.refused();
            if let Answer::Response(r) = &answer
                && r.header("content-type") == Some("application/problem+json")
            {
                assert_eq!(r.json()["type"], "urn:idempotency-rs:problem:key-invalid");
            }
            if path == "/orders" {
                eprintln!("{:?}: a key with byte {ctl:#04x}: {what}", t.framework);
            }
        }
    }
    assert_eq!(t.orders(), 0);
    still_serves(t).await;
}

/// Two `Idempotency-Key` headers (same value, different values, different spellings of the
/// name) and two values folded into one line are 400 `key-repeated`; a quoted opaque key with
/// a comma is one key.
async fn repeated_keys(t: &Target) {
    let (a, b) = (key(), key());
    for (first, second) in [(&a, &a), (&a, &b)] {
        let answer = Raw::post("/orders")
            .key(first)
            .header("idempotency-key", second)
            .send(t.addr)
            .await;
        expect_problem(answer, 400, "key-repeated");
    }
    let answer = Raw::post("/orders")
        .key(format!("{a}, {b}"))
        .send(t.addr)
        .await;
    expect_problem(answer, 400, "key-repeated");
    let answer = Raw::post("/opaque/orders").key("x,y").send(t.addr).await;
    expect_problem(answer, 400, "key-repeated");
    assert_eq!(t.orders(), 0);
    let first = Raw::post("/opaque/orders")
        .key("\"x,y\"")
        .send(t.addr)
        .await
        .response();
    assert_eq!(first.status, 201);
    assert!(first.header("idempotent-replayed").is_none());
    assert_eq!(t.orders(), 1);
    // Neither header is used when there are two, whatever they are.
    let answer = Raw::post("/opaque/orders")
        .key("\"x,y\"")
        .header("IDEMPOTENCY-KEY", "\"x,y\"")
        .send(t.addr)
        .await;
    expect_problem(answer, 400, "key-repeated");
    assert_eq!(t.orders(), 1);
    still_serves(t).await;
}

/// RFC 8941 quoted strings: a quoted UUID is the bare UUID (either order, either case); under
/// the UUID policy escapes can only make a non-UUID (400), and an escape other than `\"` and
/// `\\` is malformed (400). Under the opaque policy `"a \"q\" \\ b"` is the key `a "q" \ b`,
/// which replays when sent bare.
async fn quoted_keys(t: &Target) {
    let k = key();
    let first = Raw::post("/orders")
        .key(format!("\"{k}\""))
        .send(t.addr)
        .await
        .response();
    assert_eq!(first.status, 201);
    for same in [k.clone(), format!("\"{}\"", k.to_uppercase())] {
        let again = Raw::post("/orders").key(same).send(t.addr).await.response();
        assert_eq!(again.header("idempotent-replayed"), Some("true"));
        assert_eq!(again.json(), first.json());
    }
    for bad in [
        format!("\"\\\"{k}\\\"\""),
        format!("\"{k}\\\\\""),
        format!("\"\\{k}\""),
        format!("\"{k}"),
        format!("\"{k}\"\""),
    ] {
        let answer = Raw::post("/orders").key(&bad).send(t.addr).await;
        expect_problem(answer, 400, "key-invalid");
    }
    assert_eq!(t.orders(), 1);

    let first = Raw::post("/opaque/orders")
        .key(r#""a \"q\" \\ b""#)
        .send(t.addr)
        .await
        .response();
    assert_eq!(first.status, 201);
    let again = Raw::post("/opaque/orders")
        .key(r#"a "q" \ b"#)
        .send(t.addr)
        .await
        .response();
    assert_eq!(again.status, 201);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.json(), first.json());
    for bad in [r#""a \n b""#, r#""a \"#, "\"\""] {
        let answer = Raw::post("/opaque/orders").key(bad).send(t.addr).await;
        expect_problem(answer, 400, "key-invalid");
    }
    assert_eq!(t.orders(), 2);
    still_serves(t).await;
}

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

/// With `Content-Length` and chunked: one byte under the limit and exactly the limit run; one
/// byte over is 413 `body-too-large` and never runs.
async fn body_limits(t: &Target) {
    for chunked in [None, Some(64 * 1024)] {
        for (len, runs) in [
            (REQUEST_LIMIT - 1, true),
            (REQUEST_LIMIT, true),
            (REQUEST_LIMIT + 1, false),
        ] {
            let before = t.orders();
            let mut req = Raw::post("/orders").key(key()).body(order_of_len(len));
            if let Some(size) = chunked {
                req = req.chunked(size);
            }
            let answer = req.send(t.addr).await;
            if runs {
                let r = answer.response();
                assert_eq!(r.status, 201, "{len} bytes, chunked {chunked:?}");
                assert_eq!(t.orders(), before + 1);
            } else {
                expect_problem(answer, 413, "body-too-large");
                assert_eq!(t.orders(), before, "an over-limit body reached the handler");
            }
        }
    }
    still_serves(t).await;
}

/// A body of 100 MB, declared with `Content-Length` or sent chunked, written in 16 KiB pieces
/// with a 1 ms pause after each: the server answers 413 after at most the limit, long before
/// the body ends. The client then keeps sending the rest as fast as it can, for up to 2 s
/// (the server may drain it or close the connection). The process's peak memory grows by far
/// less than the body; the handler never runs. Runs against the example's own app/server,
/// alone in the process.
async fn slow_huge_body(t: &Target) {
    const TOTAL: u64 = 100 * 1000 * 1000;
    const PIECE: usize = 16 * 1024;
    for chunked in [false, true] {
        let Some(peak) = PeakRss::start() else {
            eprintln!("SKIPPED: no /proc/self/status here");
            return;
        };
        let started = Instant::now();
        let stream = TcpStream::connect(t.addr).await.unwrap();
        let (mut rd, mut wr) = stream.into_split();
        let mut req = Raw::post("/orders").key(key());
        if chunked {
            req = req.chunked(PIECE);
        }
        let head = req.head(Some(TOTAL));
        // Set when the answer has arrived: from then on the writer stops pausing.
        let answered = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let writer = tokio::spawn({
            let (answered, sent) = (answered.clone(), sent.clone());
            async move {
                wr.write_all(&head).await.unwrap();
                let piece = vec![b' '; PIECE];
                let mut framed = format!("{PIECE:x}\r\n").into_bytes();
                framed.extend_from_slice(&piece);
                framed.extend_from_slice(b"\r\n");
                let bytes = if chunked { &framed } else { &piece };
                let mut total = 0u64;
                let mut deadline = None;
                let outcome = loop {
                    if total >= TOTAL {
                        break "the whole body was accepted".to_string();
                    }
                    if answered.load(Ordering::SeqCst) {
                        let d = *deadline
                            .get_or_insert_with(|| Instant::now() + Duration::from_secs(2));
                        if Instant::now() > d {
                            break "still accepted after 2 s".to_string();
                        }
                    }
                    match tokio::time::timeout(Duration::from_secs(2), wr.write_all(bytes)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => break format!("closed by the server ({e})"),
                        Err(_) => break "the server stopped reading".to_string(),
                    }
                    total += PIECE as u64;
                    sent.store(total, Ordering::SeqCst);
                    if deadline.is_none() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                };
                (wr, outcome)
            }
        });
        let answer = read_answer(&mut rd).await;
        let at_answer = sent.load(Ordering::SeqCst);
        let elapsed = started.elapsed();
        answered.store(true, Ordering::SeqCst);
        let (wr, outcome) = writer.await.unwrap();
        let total = sent.load(Ordering::SeqCst);
        drop((rd, wr));
        let growth = peak.growth_mib();
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        eprintln!(
            "{:?}: 100 MB body (chunked: {chunked}): {} after {:.2} s and {:.1} MiB sent; then \
             {:.1} MiB more: {outcome}; peak memory +{growth:.1} MiB",
            t.framework,
            match &answer {
                Answer::Response(r) => r.status.to_string(),
                Answer::Closed(why) => format!("closed ({why})"),
            },
            elapsed.as_secs_f64(),
            mib(at_answer),
            mib(total - at_answer),
        );
        expect_problem(answer, 413, "body-too-large");
        assert!(
            at_answer < 16 * REQUEST_LIMIT as u64,
            "the client had to send {at_answer} bytes before the 413"
        );
        assert!(elapsed < Duration::from_secs(10), "413 took {elapsed:?}");
        assert!(
            growth < 48.0,
            "peak memory grew by {growth:.1} MiB while a 100 MB body was refused"
        );
    }
    assert_eq!(t.orders(), 0);
    still_serves(t).await;
}

/// A valid body trickled in 2-byte writes every 20 ms, its last byte held back, does not hold
/// the key while it arrives (the claim comes after the whole body): another client with the
/// same key and body runs at once, and the slow one gets the replay when its last byte comes.
async fn slow_body_does_not_hold_the_key(t: &Target) {
    let k = key();
    let req = Raw::post("/orders").key(&k);
    let (head, body) = (req.head(Some(req.body.len() as u64)), req.body.clone());
    let stream = TcpStream::connect(t.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    wr.write_all(&head).await.unwrap();
    let (last, most) = body.split_last().unwrap();
    for piece in most.chunks(2) {
        wr.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = common::client();
    let fast = post_order(&c, t.url("/orders"), Some(&k), "u1").await;
    assert_eq!(fast.status(), 201);
    assert!(fast.headers().get("idempotent-replayed").is_none());
    let fast: Value = fast.json().await.unwrap();
    assert_eq!(t.orders(), 1);
    wr.write_all(std::slice::from_ref(last)).await.unwrap();
    let slow = read_answer(&mut rd).await.response();
    drop(wr);
    assert_eq!(slow.status, 201);
    assert_eq!(slow.header("idempotent-replayed"), Some("true"));
    assert_eq!(slow.json(), fast);
    assert_eq!(t.orders(), 1);
    still_serves(t).await;
}

// ---------------------------------------------------------------------------------------------
// Disconnects
// ---------------------------------------------------------------------------------------------

/// A client that sends half its body (with `Content-Length`, or chunked) and hangs up never
/// claimed the key: the retry runs at once (no 409), once.
async fn disconnect_mid_body(t: &Target) {
    for chunked in [false, true] {
        let k = key();
        let before = t.orders();
        let mut req = Raw::post("/orders").key(&k).body(order_of_len(64 * 1024));
        if chunked {
            req = req.chunked(4096);
        }
        let bytes = req.bytes();
        let mut stream = TcpStream::connect(t.addr).await.unwrap();
        stream.write_all(&bytes[..bytes.len() / 2]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(stream);
        let c = common::client();
        let r = c
            .post(t.url("/orders"))
            .header("content-type", "application/json")
            .header("x-user-id", "u1")
            .header("idempotency-key", &k)
            .body(req.body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "chunked {chunked}");
        assert!(r.headers().get("idempotent-replayed").is_none());
        assert_eq!(t.orders(), before + 1);
    }
    still_serves(t).await;
}

/// Asks `/report` for `n` bytes, reads the head and `read` bytes of the body, then hangs up.
async fn hang_up_mid_response(t: &Target, k: &str, n: usize, read: usize) -> u16 {
    let req = Raw::post(&format!("/report?n={n}"))
        .key(k)
        .body(b"{}".to_vec());
    let mut stream = TcpStream::connect(t.addr).await.unwrap();
    stream.write_all(&req.bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let status = loop {
        let got = stream.read(&mut chunk).await.unwrap();
        assert!(got > 0, "closed before the response");
        buf.extend_from_slice(&chunk[..got]);
        if let Some(i) = find(&buf, b"\r\n\r\n")
            && buf.len() >= i + 4 + read
        {
            break std::str::from_utf8(&buf[9..12]).unwrap().parse().unwrap();
        }
    };
    drop(stream);
    status
}

/// A client that hangs up while its response is being sent: a response under the store limit
/// was stored before the first byte left, so the retry replays all of it; one over the limit
/// (16 MiB, streamed) was recorded as `response-not-stored`, so the retry gets 410 and never a
/// second run. The key is never left in flight.
async fn disconnect_mid_response(t: &Target) {
    let c = common::client();
    for (n, stored) in [
        (RESPONSE_LIMIT - 64 * 1024, true),
        (16 * 1024 * 1024, false),
    ] {
        let k = key();
        let before = t.reports();
        let status = hang_up_mid_response(t, &k, n, 32 * 1024).await;
        assert_eq!(status, 200);
        assert_eq!(t.reports(), before + 1);
        let r = c
            .post(t.url(&format!("/report?n={n}")))
            .header("content-type", "application/json")
            .header("x-user-id", "u1")
            .header("idempotency-key", &k)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["idempotent-replayed"], "true", "{n} bytes");
        if stored {
            assert_eq!(r.status(), 200);
            let body = r.bytes().await.unwrap();
            assert_eq!(body.len(), n);
            assert!(body.iter().all(|b| *b == b'r'));
        } else {
            common::expect_problem(r, 410, "response-not-stored").await;
        }
        assert_eq!(t.reports(), before + 1, "the retry ran the handler again");
    }
    still_serves(t).await;
}

// ---------------------------------------------------------------------------------------------
// Many keys
// ---------------------------------------------------------------------------------------------

/// 10,000 distinct keys from one scope, 32 at a time over keep-alive connections: each runs
/// once; a sample replays; the same keys in other scopes are fresh; the process's peak memory
/// stays bounded. Runs against the example's own app/server, alone in the process.
async fn ten_thousand_keys(t: &Target) {
    const KEYS: usize = 10_000;
    const WORKERS: usize = 32;
    let Some(peak) = PeakRss::start() else {
        eprintln!("SKIPPED: no /proc/self/status here");
        return;
    };
    let started = Instant::now();
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(WORKERS)
        .build()
        .unwrap();
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (c, next, url) = (c.clone(), next.clone(), t.url("/orders"));
            tokio::spawn(async move {
                let mut sample = Vec::new();
                while next.fetch_add(1, Ordering::SeqCst) < KEYS {
                    let k = key();
                    let r = post_order(&c, url.clone(), Some(&k), "flood").await;
                    assert_eq!(r.status(), 201);
                    let v: Value = r.json().await.unwrap();
                    if sample.len() < 2 {
                        sample.push((k, v));
                    }
                }
                sample
            })
        })
        .collect();
    let mut sample = Vec::new();
    for w in workers {
        sample.extend(w.await.unwrap());
    }
    let elapsed = started.elapsed();
    assert_eq!(t.orders(), KEYS);
    for (k, v) in &sample {
        let r = post_order(&c, t.url("/orders"), Some(k), "flood").await;
        assert_eq!(r.headers()["idempotent-replayed"], "true");
        assert_eq!(&r.json::<Value>().await.unwrap(), v);
        let r = post_order(&c, t.url("/orders"), Some(k), "quiet").await;
        assert_eq!(r.status(), 201);
        assert!(r.headers().get("idempotent-replayed").is_none());
        assert_ne!(r.json::<Value>().await.unwrap()["order_id"], v["order_id"]);
    }
    assert_eq!(t.orders(), KEYS + sample.len());
    drop(c);
    let growth = peak.growth_mib();
    eprintln!(
        "{:?}: {KEYS} keys in {:.2} s ({:.0}/s); peak memory +{growth:.1} MiB",
        t.framework,
        elapsed.as_secs_f64(),
        KEYS as f64 / elapsed.as_secs_f64()
    );
    assert!(
        growth < 64.0,
        "peak memory grew by {growth:.1} MiB for {KEYS} keys"
    );
    still_serves(t).await;
}

// ---------------------------------------------------------------------------------------------
// The completion cannot be stored
// ---------------------------------------------------------------------------------------------

/// The database is capped (`EngineConfig::max_page_count`) a few pages above its empty size: a
/// claim fits, the completion of a 200 KB response does not. The client gets the whole real
/// response with `Idempotency-Stored: false`; an immediate retry is 409 in flight (never a
/// second run); small records still fit, so other clients are served. Once the lock times out a
/// retry runs again: the documented price of a completion that could not be stored.
async fn stored_false_when_the_database_is_full(f: Framework) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idempotency.db");
    let store = SqliteIdempotencyStore::with_config(EngineConfig::new(&path)).unwrap();
    store.engine().shutdown().unwrap();
    drop(store);
    let pages: u32 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    let lock = Duration::from_secs(10);
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let config = EngineConfig::new(&path)
        .max_page_count(pages + 8)
        .lock_timeout(lock)
        .clock(clock.clone());
    let t = start(
        f,
        Mode::Extended,
        SqliteIdempotencyStore::with_config(config).unwrap(),
    )
    .await;
    let c = common::client();
    let n = 200 * 1000;
    let k = key();
    let report = || {
        c.post(t.url(&format!("/report?n={n}")))
            .header("content-type", "application/json")
            .header("x-user-id", "u1")
            .header("idempotency-key", &k)
            .body("{}")
            .send()
    };
    for run in 1..=2 {
        let r = report().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["idempotency-stored"], "false");
        assert!(r.headers().get("idempotent-replayed").is_none());
        let body = r.bytes().await.unwrap();
        assert_eq!(body.len(), n);
        assert!(body.iter().all(|b| *b == b'r'));
        assert_eq!(t.reports(), run);

        let again = report().await.unwrap();
        assert!(again.headers().contains_key("retry-after"));
        common::expect_problem(again, 409, "request-in-flight").await;
        assert_eq!(t.reports(), run, "an unstored completion ran again at once");
        // Small records still fit.
        still_serves(&t).await;
        clock.advance(lock);
    }
}

/// The store is shut down by the handler itself, between the claim and the completion: the
/// client gets the real 201 with `Idempotency-Stored: false`; from then on keyed requests are
/// 503 `store-unavailable` without running, and requests without a key still pass through.
async fn stored_false_when_the_store_closes(f: Framework) {
    let (store, _dir) = file_store();
    let t = start(f, Mode::Extended, store).await;
    let c = common::client();
    let k = key();
    let r = c
        .post(t.url("/shutdown"))
        .header("content-type", "application/json")
        .header("x-user-id", "u1")
        .header("idempotency-key", &k)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["idempotency-stored"], "false");
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"shut": true}));
    assert!(matches!(t.store.engine().shutdown(), Err(Error::Closed)));
    for path in ["/shutdown", "/orders"] {
        let r = c
            .post(t.url(path))
            .header("content-type", "application/json")
            .header("x-user-id", "u1")
            .header("idempotency-key", &k)
            .body(serde_json::to_vec(&order()).unwrap())
            .send()
            .await
            .unwrap();
        assert!(r.headers().contains_key("retry-after"));
        common::expect_problem(r, 503, "store-unavailable").await;
    }
    assert_eq!((t.reports(), t.orders()), (1, 0));
    for _ in 0..2 {
        let r = post_order(&c, t.url("/orders"), None, "u1").await;
        assert_eq!(r.status(), 201);
    }
    assert_eq!(t.orders(), 2);
}

// ---------------------------------------------------------------------------------------------
// The database file vanishes
// ---------------------------------------------------------------------------------------------

/// The database file and its `-wal` and `-shm` companions are deleted under the running
/// example server. Nothing notices: acknowledged records keep replaying and new keys are
/// claimed, completed and replayed, all in the unlinked file the engine still holds open; the
/// shutdown succeeds and writes nothing back to the path. A server started again on the path
/// gets a new, empty database, so a retry of a request acknowledged before (or after) the
/// deletion runs the handler again.
async fn database_file_deleted_while_serving(f: Framework) {
    if !cfg!(unix) {
        eprintln!("SKIPPED: an open file cannot be deleted here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idempotency.db");
    let store = SqliteIdempotencyStore::with_config(EngineConfig::new(&path)).unwrap();
    let t = start(f, Mode::Example, store).await;
    let c = common::client();
    let mut acked = Vec::new();
    let order_once = async |acked: &mut Vec<(String, Value)>| {
        let k = key();
        let r = post_order(&c, t.url("/orders"), Some(&k), "u1").await;
        assert_eq!(r.status(), 201);
        assert!(r.headers().get("idempotent-replayed").is_none());
        acked.push((k, r.json::<Value>().await.unwrap()));
    };
    for _ in 0..3 {
        order_once(&mut acked).await;
    }
    for name in database_files(&path) {
        std::fs::remove_file(name).unwrap();
    }
    order_once(&mut acked).await;
    for (k, v) in &acked {
        let r = post_order(&c, t.url("/orders"), Some(k), "u1").await;
        assert_eq!(r.headers()["idempotent-replayed"], "true");
        assert_eq!(&r.json::<Value>().await.unwrap(), v);
    }
    assert_eq!(t.orders(), 4);
    still_serves(&t).await;
    t.store.engine().shutdown().unwrap();
    drop(t);
    assert!(
        database_files(&path).is_empty(),
        "the shutdown wrote to the path"
    );

    let store = SqliteIdempotencyStore::with_config(EngineConfig::new(&path)).unwrap();
    let t = start(f, Mode::Example, store).await;
    for (k, _) in &acked {
        let r = post_order(&c, t.url("/orders"), Some(k), "u1").await;
        assert_eq!(r.status(), 201);
        assert!(r.headers().get("idempotent-replayed").is_none());
    }
    assert_eq!(
        t.orders(),
        acked.len(),
        "the new database remembered a deleted record"
    );
    t.store.engine().shutdown().unwrap();
}

/// The database file and its companions that exist now.
fn database_files(path: &std::path::Path) -> Vec<std::path::PathBuf> {
    ["", "-wal", "-shm"]
        .iter()
        .map(|s| std::path::PathBuf::from(format!("{}{s}", path.display())))
        .filter(|p| p.exists())
        .collect()
}

/// The same fault on the engine alone, in three forms: every file deleted; only the main file
/// deleted (`rm idempotency.db`); only the main file deleted and then the process killed,
/// leaving the `-wal` and `-shm` it had (simulated by copying them aside while the engine runs
/// and putting them back after it stopped). In every form: no error and no panic while the
/// engine lives (replays, from a read connection opened before the deletion and from 8 threads
/// at once; new claims and completions); a clean shutdown; and at the next open a new, empty
/// database with an `integrity_check` of "ok": leftover companions of the deleted file are not
/// replayed into it.
#[test]
fn file_vanishes_under_a_running_engine() {
    use idempotency_rs::{ClaimRequest, Engine, Fingerprint, IdempotencyKey, StoredResponse};
    let _shared = shared();
    if !cfg!(unix) {
        eprintln!("SKIPPED: an open file cannot be deleted here");
        return;
    }
    let request = |k: &str| {
        ClaimRequest::new(
            "s",
            IdempotencyKey::new(k).unwrap(),
            Fingerprint::of_request("POST", "/x", k.as_bytes()),
        )
    };
    let response = |i: usize| StoredResponse::new(201, vec![i as u8; 3000]);
    for form in ["every file", "the main file", "the main file, then a kill"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.db");
        let companion = |s: &str| dir.path().join(format!("idem.db{s}"));
        let engine = Engine::open(EngineConfig::new(&path)).unwrap();
        let complete = |i: usize| match engine.claim(request(&format!("k{i}"))).unwrap() {
            ClaimOutcome::Claimed(lease) => lease.complete(response(i)).unwrap(),
            other => panic!("{form}: k{i}: {other:?}"),
        };
        for i in 0..5 {
            complete(i);
        }
        // A replay opens a read connection before the deletion.
        assert!(matches!(
            engine.claim(request("k0")).unwrap(),
            ClaimOutcome::Replay(_)
        ));
        std::fs::remove_file(&path).unwrap();
        if form == "every file" {
            std::fs::remove_file(companion("-wal")).unwrap();
            std::fs::remove_file(companion("-shm")).unwrap();
        }
        for i in 5..10 {
            complete(i);
        }
        // From 8 threads at once, so the engine also tries to open read connections on the
        // missing path (and falls back to the writer).
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for i in 0..10 {
                        match engine.claim(request(&format!("k{i}"))).unwrap() {
                            ClaimOutcome::Replay(r) => assert_eq!(r, response(i), "{form}: k{i}"),
                            other => panic!("{form}: k{i} after the deletion: {other:?}"),
                        }
                    }
                });
            }
        });
        let leftovers = (form == "the main file, then a kill").then(|| {
            (
                std::fs::read(companion("-wal")).unwrap(),
                std::fs::read(companion("-shm")).unwrap(),
            )
        });
        engine.shutdown().unwrap();
        drop(engine);
        assert!(!path.exists(), "{form}: the shutdown recreated the file");
        if let Some((wal, shm)) = leftovers {
            assert!(!wal.is_empty());
            std::fs::write(companion("-wal"), wal).unwrap();
            std::fs::write(companion("-shm"), shm).unwrap();
        }

        let engine = Engine::open(EngineConfig::new(&path)).unwrap();
        for i in 0..10 {
            match engine.claim(request(&format!("k{i}"))).unwrap() {
                ClaimOutcome::Claimed(lease) => lease.release().unwrap(),
                other => panic!("{form}: k{i} after the reopen: {other:?}"),
            }
        }
        engine.shutdown().unwrap();
        let conn = rusqlite::Connection::open(&path).unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok", "{form}");
    }
}

// ---------------------------------------------------------------------------------------------
// The case list
// ---------------------------------------------------------------------------------------------

/// Issue #14: the framework's own refusal of a malformed body (Axum's `Json` rejection, 422;
/// Actix's `web::Json` error, 400) is not stored, so the client fixes the body and retries with
/// the same key; and a path no route serves is the framework's plain 404, with or without a key.
async fn framework_rejections_can_be_fixed_and_retried(t: &Target) {
    let c = common::client();
    let k = key();
    let url = t.url("/orders");
    let refused = match t.framework {
        Framework::Axum => 422,
        Framework::Actix => 400,
    };
    let before = t.orders();
    for _ in 0..2 {
        let r = common::post(
            &c,
            url.clone(),
            Some(&k),
            Some("fixer"),
            &json!({"symbol": "AAPL"}),
        )
        .await;
        assert_eq!(r.status(), refused, "{:?}", t.framework);
        assert!(r.headers().get("idempotent-replayed").is_none());
    }
    let r = post_order(&c, url.clone(), Some(&k), "fixer").await;
    assert_eq!(r.status(), 201);
    assert!(r.headers().get("idempotent-replayed").is_none());
    let r = post_order(&c, url.clone(), Some(&k), "fixer").await;
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(t.orders(), before + 1);
    for key in [None, Some(k.as_str()), Some("not a uuid")] {
        let r = post_order(&c, t.url("/no-such-route"), key, "fixer").await;
        assert_eq!(r.status(), 404, "{:?} {key:?}", t.framework);
        assert!(r.headers().get("idempotent-replayed").is_none());
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Expands, for each framework, one test per case. `target` cases get a server (`Extended`
/// or `Example`) on a fresh file store; `own` cases start what they need from the framework.
/// `exclusive` cases run alone in the process.
macro_rules! abuse_cases {
    (
        shared: [$($case:ident),* $(,)?],
        exclusive: [$($mem:ident),* $(,)?],
        own: [$($own:ident),* $(,)?] $(,)?
    ) => {
        abuse_cases!(@framework with_axum, Axum; [$($case),*]; [$($mem),*]; [$($own),*]);
        abuse_cases!(@framework with_actix, Actix; [$($case),*]; [$($mem),*]; [$($own),*]);
    };
    (@framework $m:ident, $f:ident; [$($case:ident),*]; [$($mem:ident),*]; [$($own:ident),*]) => {
        mod $m {
            $(
                #[test]
                fn $case() {
                    let _shared = super::shared();
                    super::runtime().block_on(async {
                        let (store, _dir) = super::file_store();
                        let t = super::start(super::Framework::$f, super::Mode::Extended, store)
                            .await;
                        super::$case(&t).await;
                    });
                }
            )*
            $(
                #[test]
                fn $mem() {
                    let _alone = super::exclusive();
                    super::runtime().block_on(async {
                        let (store, _dir) = super::file_store();
                        let t = super::start(super::Framework::$f, super::Mode::Example, store)
                            .await;
                        super::$mem(&t).await;
                    });
                }
            )*
            $(
                #[test]
                fn $own() {
                    let _shared = super::shared();
                    super::runtime().block_on(super::$own(super::Framework::$f));
                }
            )*
        }
    };
}

abuse_cases! {
    shared: [
        key_lengths,
        key_characters,
        repeated_keys,
        quoted_keys,
        body_limits,
        slow_body_does_not_hold_the_key,
        disconnect_mid_body,
        disconnect_mid_response,
        framework_rejections_can_be_fixed_and_retried,
    ],
    exclusive: [slow_huge_body, ten_thousand_keys],
    own: [
        stored_false_when_the_database_is_full,
        stored_false_when_the_store_closes,
        database_file_deleted_while_serving,
    ],
}
