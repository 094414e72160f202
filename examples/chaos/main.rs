//! Exactly once through a hostile network: the retrying clients against the example services,
//! through a fault-injecting proxy, counted.
//!
//! ```text
//! cargo run --release --example chaos --features client,tonic-client,axum-integration,actix-integration,tonic-integration
//! cargo run --release --example chaos --features ... -- --ops 5000 --concurrency 64 --seed 7
//! ```
//!
//! For each of the Axum, Actix-Web and Tonic example services, on a fresh SQLite store, it
//! sends `--ops` orders (default 2000), `--concurrency` at a time, through [`proxy::ChaosProxy`]:
//! 10% of connections carry the request and lose the answer, 5% are reset in the middle of the
//! request, 10% have their answer held back up to 1.5 s (past the client's 1 s timeout). The
//! HTTP clients go through `RetryMiddleware`, the gRPC one through `grpc::RetryLayer`, with the
//! default retry policy. Then the Axum service runs in a child process that is killed with
//! SIGKILL a third of the way through and restarted on the same store. Last, the plain reqwest
//! client retries the same way **without** a key, to show what the key prevents.
//!
//! Each row counts, from the service's own record of the orders it placed: every operation
//! must have run exactly once, every caller must hold the id of that one order, and no call
//! may have failed (a call fails only when it runs out of attempts). The exit status is 1 if
//! any row breaks that.

mod proxy;

#[path = "../axum_server.rs"]
#[allow(dead_code, unreachable_pub)]
pub(crate) mod axum_example;

#[path = "../actix_server.rs"]
#[allow(dead_code, unreachable_pub)]
mod actix_example;

#[path = "../tonic_server.rs"]
#[allow(dead_code, unreachable_pub)]
mod tonic_example;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use idempotency_rs::client::grpc::RetryLayer;
use idempotency_rs::client::{ClientError, ResponseExt, RetryMiddleware, RetryPolicy};
use idempotency_rs::{Engine, EngineConfig};
use parking_lot::Mutex;
pub(crate) use proxy::{ChaosProxy, Faults, Tally};

/// One chaos run's settings.
#[derive(Debug, Clone)]
pub(crate) struct Run {
    /// Operations per service.
    pub(crate) ops: usize,
    /// Operations in flight at once.
    pub(crate) concurrency: usize,
    /// What the proxy does to connections.
    pub(crate) faults: Faults,
    /// The proxy's seed.
    pub(crate) seed: u64,
    /// The clients' policy.
    pub(crate) policy: RetryPolicy,
    /// Each HTTP attempt's timeout.
    pub(crate) attempt_timeout: Duration,
}

impl Default for Run {
    fn default() -> Self {
        Run {
            ops: 2000,
            concurrency: 32,
            faults: Faults {
                drop_after_forward: 0.10,
                reset: 0.05,
                delay: 0.10,
                max_delay: Duration::from_millis(1500),
                // An HTTP connection carries one attempt; it is cut if it lives longer.
                max_lifetime: Some(Duration::from_secs(2)),
            },
            seed: 1,
            policy: RetryPolicy::default(),
            attempt_timeout: Duration::from_secs(1),
        }
    }
}

/// What one client call ended with.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    /// The key it carried (`None` for the keyless contrast).
    pub(crate) key: Option<String>,
    /// The order id it got back.
    pub(crate) order_id: Option<String>,
    /// Attempts made.
    pub(crate) attempts: u32,
    /// The answer was a replay.
    pub(crate) replayed: bool,
    /// Why it failed, if it did.
    pub(crate) error: Option<String>,
}

/// The tally of one row.
#[derive(Debug, Default, Clone)]
pub(crate) struct Report {
    pub(crate) name: String,
    pub(crate) ops: usize,
    pub(crate) succeeded: usize,
    /// Calls that failed (out of attempts).
    pub(crate) failed: usize,
    /// Calls answered by a replay.
    pub(crate) replayed: usize,
    /// Calls that took more than one attempt.
    pub(crate) retried: usize,
    pub(crate) attempts: u64,
    /// Orders the service placed.
    pub(crate) executions: usize,
    /// Operations placed more than once (extra orders in all).
    pub(crate) duplicates: usize,
    /// Calls whose order id is not the one order placed under their key.
    pub(crate) wrong_ids: usize,
    /// Calls of a keyed row that came back without their key.
    pub(crate) unkeyed: usize,
    /// Runs after the crash that found their key's order already placed.
    pub(crate) recovered: usize,
    /// The proxy's counts: dropped after forward, reset, delayed, cut at lifetime.
    pub(crate) faults: [u64; 4],
    pub(crate) elapsed: Duration,
    /// Whether the row must show exactly once (false for the keyless contrast).
    pub(crate) keyed: bool,
    /// The first few failures, in words.
    pub(crate) errors: Vec<String>,
}

impl Report {
    /// Exactly once, the right ids, no failed call.
    pub(crate) fn passed(&self) -> bool {
        self.failed == 0
            && self.duplicates == 0
            && self.wrong_ids == 0
            && self.unkeyed == 0
            && self.executions == self.ops
    }

    fn faults_of(tally: &Tally) -> [u64; 4] {
        [
            Tally::get(&tally.dropped_after_forward),
            Tally::get(&tally.reset),
            Tally::get(&tally.delayed),
            Tally::get(&tally.cut_at_lifetime),
        ]
    }

    /// Counts `calls` against the orders the service placed (`(key, order_id)` each).
    fn count(
        name: &str,
        keyed: bool,
        calls: &[Call],
        placed: &[(Option<String>, String)],
        tally: &Tally,
        elapsed: Duration,
    ) -> Report {
        let mut by_key: HashMap<&str, Vec<&str>> = HashMap::new();
        for (key, id) in placed {
            if let Some(key) = key {
                by_key.entry(key).or_default().push(id);
            }
        }
        let mut r = Report {
            name: name.into(),
            ops: calls.len(),
            executions: placed.len(),
            faults: Self::faults_of(tally),
            elapsed,
            keyed,
            ..Report::default()
        };
        for call in calls {
            r.attempts += u64::from(call.attempts);
            r.retried += usize::from(call.attempts > 1);
            r.replayed += usize::from(call.replayed);
            if let Some(error) = &call.error {
                r.failed += 1;
                if r.errors.len() < 5 {
                    r.errors
                        .push(format!("{error} (after {} attempts)", call.attempts));
                }
                continue;
            }
            r.succeeded += 1;
            if keyed && (call.key.is_none() || call.order_id.is_none()) {
                // Its id cannot be checked against the order placed under its key.
                r.unkeyed += 1;
            }
            if let (Some(key), Some(id)) = (&call.key, &call.order_id) {
                match by_key.get(key.as_str()).map(Vec::as_slice) {
                    Some([only]) if only == id => {}
                    _ => r.wrong_ids += 1,
                }
            }
        }
        r.duplicates = if keyed {
            by_key.values().map(|ids| ids.len() - 1).sum::<usize>()
                + placed.iter().filter(|(k, _)| k.is_none()).count()
        } else {
            // Without keys, every order beyond one per answered call ran twice.
            placed.len().saturating_sub(r.succeeded)
        };
        r
    }

    fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{}/{}/{} | {:.1} s |",
            self.name,
            self.ops,
            self.executions,
            self.duplicates,
            self.wrong_ids,
            self.failed,
            self.retried,
            self.replayed,
            self.attempts,
            self.recovered,
            self.faults[0],
            self.faults[1],
            self.faults[2],
            self.faults[3],
            self.elapsed.as_secs_f64(),
        )
    }
}

/// Prints the table of `reports`.
pub(crate) fn print(reports: &[Report]) {
    println!(
        "| service | operations | executions | duplicates | wrong ids | failed calls | retried \
         calls | replays | attempts | recovered after kill | dropped/reset/delayed/cut | time |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in reports {
        println!("{}", r.row());
    }
}

/// The JSON body of operation `i`.
fn order_body(i: usize) -> String {
    format!(
        r#"{{"symbol":"CHAOS","quantity":{},"price":1.5}}"#,
        i % 1000 + 1
    )
}

/// Runs `op(i)` for `0..ops`, `concurrency` at a time; `done` counts finished operations.
async fn drive<F, Fut>(ops: usize, concurrency: usize, done: Arc<AtomicUsize>, op: F) -> Vec<Call>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Call> + Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(Mutex::new(vec![None; ops]));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (op, next, calls, done) = (op.clone(), next.clone(), calls.clone(), done.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= ops {
                    return;
                }
                let call = op(i).await;
                calls.lock()[i] = Some(call);
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let calls = std::mem::take(&mut *calls.lock());
    calls
        .into_iter()
        .map(|c| c.expect("every operation ran"))
        .collect()
}

/// A reqwest client that opens a connection per attempt (so the proxy's faults strike
/// attempts, not a pooled connection once).
fn reqwest_client(run: &Run) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(run.attempt_timeout)
        .build()
        .expect("a client")
}

/// `ops` orders to `base` through the retrying client.
async fn http_calls(base: String, run: &Run, done: Arc<AtomicUsize>) -> Vec<Call> {
    let client = reqwest_middleware::ClientBuilder::new(reqwest_client(run))
        .with(RetryMiddleware::new().policy(run.policy.clone()))
        .build();
    drive(run.ops, run.concurrency, done, move |i| {
        let (client, url) = (client.clone(), format!("{base}/orders"));
        async move {
            let sent = client
                .post(url)
                .header("content-type", "application/json")
                .header("x-user-id", "chaos")
                .body(order_body(i))
                .send()
                .await;
            match sent {
                Ok(response) => {
                    let delivery = response.delivery().cloned();
                    let status = response.status();
                    let body: serde_json::Value = response.json().await.unwrap_or_default();
                    let order_id = body["order_id"].as_str().map(str::to_owned);
                    Call {
                        key: delivery.as_ref().map(|d| d.key.clone()),
                        attempts: delivery.as_ref().map_or(1, |d| d.attempts),
                        replayed: delivery.is_some_and(|d| d.replayed),
                        error: (status.as_u16() != 201 || order_id.is_none())
                            .then(|| format!("answered {status}")),
                        order_id,
                    }
                }
                Err(e) => Call {
                    key: ClientError::of(&e).map(|c| c.key().to_owned()),
                    attempts: ClientError::of(&e).map_or(1, ClientError::attempts),
                    order_id: None,
                    replayed: false,
                    error: Some(e.to_string()),
                },
            }
        }
    })
    .await
}

/// The contrast: the plain reqwest client, retrying the same way with no key.
async fn keyless_calls(base: String, run: &Run) -> Vec<Call> {
    let client = reqwest_client(run);
    let policy = run.policy.clone();
    drive(run.ops, run.concurrency, Arc::default(), move |i| {
        let (client, url, policy) = (client.clone(), format!("{base}/orders"), policy.clone());
        async move {
            let mut attempts = 0;
            loop {
                attempts += 1;
                let sent = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-user-id", "chaos")
                    .body(order_body(i))
                    .send()
                    .await;
                let error = match sent {
                    Ok(r) if r.status().as_u16() == 201 => {
                        match r.json::<serde_json::Value>().await {
                            Ok(body) => {
                                return Call {
                                    key: None,
                                    order_id: body["order_id"].as_str().map(str::to_owned),
                                    attempts,
                                    replayed: false,
                                    error: None,
                                };
                            }
                            Err(e) => e.to_string(),
                        }
                    }
                    Ok(r) => format!("answered {}", r.status()),
                    Err(e) => e.to_string(),
                };
                if attempts >= policy.attempts() {
                    return Call {
                        key: None,
                        order_id: None,
                        attempts,
                        replayed: false,
                        error: Some(error),
                    };
                }
                tokio::time::sleep(policy.backoff_ceiling(attempts) / 2).await;
            }
        }
    })
    .await
}

/// A fresh SQLite store in `dir`.
async fn store(dir: &Path, name: &str) -> Engine {
    Engine::open_async(EngineConfig::new(dir.join(name)))
        .await
        .expect("a store")
}

/// The Axum example, in this process, with and without keys.
pub(crate) async fn axum_rows(run: &Run, dir: &Path) -> Vec<Report> {
    let mut rows = Vec::new();
    for keyed in [true, false] {
        let engine = store(dir, if keyed { "axum.db" } else { "axum-keyless.db" }).await;
        let orders = Arc::new(axum_example::Orders::default());
        let app = axum_example::app(&engine, orders.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let proxy = ChaosProxy::start(addr, run.faults.clone(), run.seed).expect("proxy");
        let base = format!("http://{}", proxy.addr());
        let started = Instant::now();
        let calls = if keyed {
            http_calls(base, run, Arc::default()).await
        } else {
            keyless_calls(base, run).await
        };
        let elapsed = started.elapsed();
        // Answers still on their way (delayed by the proxy) land before the count.
        tokio::time::sleep(run.faults.max_delay + Duration::from_millis(200)).await;
        let placed = orders.placed();
        let name = if keyed {
            "Axum, RetryMiddleware"
        } else {
            "Axum, plain reqwest retrying without a key"
        };
        let mut report = Report::count(name, keyed, &calls, &placed, proxy.tally(), elapsed);
        // Orders are kept by key, so a second run of a key shows as a recovery, not an order.
        report.duplicates += orders.recovered();
        rows.push(report);
        server.abort();
        engine.shutdown().expect("shutdown");
    }
    rows
}

/// The Actix-Web example, on an Actix system in its own thread.
pub(crate) async fn actix_row(run: &Run, dir: &Path) -> Report {
    let engine = store(dir, "actix.db").await;
    let orders = actix_web::web::Data::new(actix_example::Orders::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let (e, o) = (engine.clone(), orders.clone());
    let thread = std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let (server, addrs) = actix_example::server(&e, o, "127.0.0.1:0").expect("bind");
            tx.send((addrs[0], server.handle())).expect("send");
            server.await
        })
    });
    let (addr, handle) = rx.recv().expect("actix started");
    let proxy = ChaosProxy::start(addr, run.faults.clone(), run.seed).expect("proxy");
    let started = Instant::now();
    let calls = http_calls(format!("http://{}", proxy.addr()), run, Arc::default()).await;
    let elapsed = started.elapsed();
    tokio::time::sleep(run.faults.max_delay + Duration::from_millis(200)).await;
    let report = Report::count(
        "Actix-Web, RetryMiddleware",
        true,
        &calls,
        &orders.placed(),
        proxy.tally(),
        elapsed,
    );
    handle.stop(false).await;
    let _ = thread.join();
    engine.shutdown().expect("shutdown");
    report
}

/// The Tonic example, through one channel wrapped in `RetryLayer`.
pub(crate) async fn tonic_row(run: &Run, dir: &Path) -> Report {
    use tonic_example::orders::CreateOrderRequest;
    use tonic_example::orders::orders_client::OrdersClient;

    let engine = store(dir, "tonic.db").await;
    let book = Arc::new(tonic_example::OrderBook::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tonic_example::serve(
        listener,
        tonic_example::layer(&engine),
        book.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    // One HTTP/2 connection carries every call: it is cut somewhere in its first 100 ms, so
    // that calls in flight lose their answers again and again.
    let faults = Faults {
        max_lifetime: Some(Duration::from_millis(100)),
        ..run.faults.clone()
    };
    let proxy = ChaosProxy::start(addr, faults, run.seed).expect("proxy");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.addr()))
        .expect("endpoint")
        .connect_lazy();
    let channel = tower::ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .method("/orders.Orders/CreateOrder")
                .policy(run.policy.clone()),
        )
        .service(channel);
    let client = OrdersClient::new(channel);
    let started = Instant::now();
    let calls = drive(run.ops, run.concurrency, Arc::default(), move |i| {
        let mut client = client.clone();
        async move {
            let mut request = tonic::Request::new(CreateOrderRequest {
                symbol: "CHAOS".into(),
                quantity: u32::try_from(i % 1000 + 1).unwrap_or(1),
                price: "1.50".into(),
            });
            request.set_timeout(Duration::from_secs(30));
            let text = |m: &tonic::metadata::MetadataMap, name: &str| {
                m.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
            };
            match client.create_order(request).await {
                Ok(response) => Call {
                    key: text(response.metadata(), "idempotency-key"),
                    attempts: text(response.metadata(), "idempotency-attempts")
                        .and_then(|a| a.parse().ok())
                        .unwrap_or(1),
                    replayed: text(response.metadata(), "idempotent-replayed").as_deref()
                        == Some("true"),
                    order_id: Some(response.into_inner().order_id),
                    error: None,
                },
                Err(status) => Call {
                    key: text(status.metadata(), "idempotency-key"),
                    attempts: text(status.metadata(), "idempotency-attempts")
                        .and_then(|a| a.parse().ok())
                        .unwrap_or(1),
                    order_id: None,
                    replayed: false,
                    error: Some(status.to_string()),
                },
            }
        }
    })
    .await;
    let elapsed = started.elapsed();
    tokio::time::sleep(run.faults.max_delay + Duration::from_millis(200)).await;
    let report = Report::count(
        "Tonic, grpc::RetryLayer",
        true,
        &calls,
        &book.placed(),
        proxy.tally(),
        elapsed,
    );
    let _ = stop.send(());
    let _ = server.await;
    engine.shutdown().expect("shutdown");
    report
}

/// The argument that makes this program (or a test binary) serve the Axum example in a child
/// process: `--serve-axum <store> <ledger>`.
pub(crate) const SERVE_AXUM: &str = "--serve-axum";

/// Serves the Axum example on 127.0.0.1 (a port the OS picks) with its orders kept in
/// `ledger` and a 2 s lock timeout, prints `listening <addr>` and, as it changes, `recovered
/// <n>`, and runs until killed.
pub(crate) fn serve_axum_child(store: &Path, ledger: &Path) {
    // Dies with its parent, so that a harness killed in the middle leaves no server behind.
    #[cfg(target_os = "linux")]
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let config = EngineConfig::new(store).lock_timeout(Duration::from_secs(2));
        let engine = Engine::open_async(config).await.expect("store");
        let orders = Arc::new(axum_example::Orders::with_ledger(ledger).expect("ledger"));
        let app = axum_example::app(&engine, orders.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        println!("listening {}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let mut told = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let now = orders.recovered();
                if now != told {
                    println!("recovered {now}");
                    told = now;
                }
            }
        });
        axum::serve(listener, app).await.expect("serve");
    });
}

/// A child process serving the Axum example, killed when dropped.
struct ServerChild {
    child: Child,
    addr: SocketAddr,
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_child(command: &dyn Fn() -> Command, recovered: &Arc<AtomicUsize>) -> ServerChild {
    let child = command()
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the server");
    // Killed on the way out, even if it never says where it listens.
    let mut server = ServerChild {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let stdout = server.child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let recovered = recovered.clone();
    std::thread::spawn(move || {
        let base = recovered.load(Ordering::SeqCst);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // A test harness may print its own words before the first line.
            if let Some((_, addr)) = line.split_once("listening ") {
                let _ = tx.send(addr.parse::<SocketAddr>().expect("an address"));
            } else if let Some(n) = line.strip_prefix("recovered ") {
                recovered.store(base + n.parse::<usize>().unwrap_or(0), Ordering::SeqCst);
            }
        }
    });
    server.addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server child listens");
    server
}

/// The Axum example in a child process (`command` starts it with [`SERVE_AXUM`]), killed with
/// SIGKILL once a third of the operations are done and restarted on the same store and ledger.
pub(crate) async fn kill_row(
    run: &Run,
    dir: &Path,
    command: impl Fn(&Path, &Path) -> Command,
) -> Report {
    let (store, ledger) = (dir.join("killed.db"), dir.join("killed.orders"));
    let command = || command(&store, &ledger);
    let recovered = Arc::new(AtomicUsize::new(0));
    let mut server = start_child(&command, &recovered);
    let proxy = ChaosProxy::start(server.addr, run.faults.clone(), run.seed).expect("proxy");
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let calls = tokio::spawn({
        let (base, run, done) = (
            format!("http://{}", proxy.addr()),
            run.clone(),
            done.clone(),
        );
        async move { http_calls(base, &run, done).await }
    });
    let waiting = Instant::now();
    while done.load(Ordering::Relaxed) < run.ops / 3 && !calls.is_finished() {
        assert!(
            waiting.elapsed() < Duration::from_secs(120),
            "a third of the operations did not finish in 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.child.kill().expect("SIGKILL");
    let _ = server.child.wait();
    let server = start_child(&command, &recovered);
    proxy.set_upstream(server.addr);
    let calls = calls.await.expect("the calls");
    let elapsed = started.elapsed();
    tokio::time::sleep(run.faults.max_delay + Duration::from_millis(200)).await;
    drop(server);
    let text = std::fs::read_to_string(&ledger).unwrap_or_default();
    let placed: Vec<_> = text
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            let text = |name: &str| v[name].as_str().map(str::to_owned);
            Some((text("key"), text("order_id")?))
        })
        .collect();
    let mut report = Report::count(
        "Axum, RetryMiddleware, server killed -9 and restarted",
        true,
        &calls,
        &placed,
        proxy.tally(),
        elapsed,
    );
    report.recovered = recovered.load(Ordering::SeqCst);
    report
}

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == SERVE_AXUM) {
        let (store, ledger) = (PathBuf::from(&args[i + 1]), PathBuf::from(&args[i + 2]));
        serve_axum_child(&store, &ledger);
        return;
    }
    let mut run = Run::default();
    if let Some(ops) = arg("--ops").and_then(|v| v.parse().ok()) {
        run.ops = ops;
    }
    if let Some(c) = arg("--concurrency").and_then(|v| v.parse().ok()) {
        run.concurrency = c;
    }
    if let Some(seed) = arg("--seed").and_then(|v| v.parse().ok()) {
        run.seed = seed;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let reports = runtime.block_on(async {
        let mut reports = Vec::new();
        let axum = axum_rows(&run, dir.path()).await;
        reports.push(axum[0].clone());
        reports.push(actix_row(&run, dir.path()).await);
        reports.push(tonic_row(&run, dir.path()).await);
        let exe = std::env::current_exe().expect("this program");
        let kill_run = Run {
            ops: run.ops / 2,
            ..run.clone()
        };
        reports.push(
            kill_row(&kill_run, dir.path(), |store, ledger| {
                let mut c = Command::new(&exe);
                c.arg(SERVE_AXUM).arg(store).arg(ledger);
                c
            })
            .await,
        );
        reports.push(axum[1].clone());
        reports
    });
    print(&reports);
    let mut broken: HashSet<_> = reports
        .iter()
        .filter(|r| r.keyed && !r.passed())
        .map(|r| &r.name)
        .collect();
    // The contrast must show what the key prevents, or the network was not hostile.
    broken.extend(
        reports
            .iter()
            .filter(|r| !r.keyed && r.duplicates == 0)
            .map(|r| &r.name),
    );
    if broken.is_empty() {
        println!("\nexactly once: every keyed row ran each operation once and answered its id");
    } else {
        println!("\nBROKEN: {broken:?}");
        std::process::exit(1);
    }
}
