//! The tonic layer against a real tonic server on 127.0.0.1 and a tonic client, plus frame-exact
//! checks of the replay through the bare tower service.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use idempotency_rs::tonic_integration::{
    ClaimedKey, IdempotencyLayer, KEY_METADATA, KeyPolicy, REPLAYED_METADATA,
    RETRY_PUSHBACK_METADATA, store_all_deterministic,
};
use idempotency_rs::{Engine, EngineConfig};
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc};
use tonic::codegen::tokio_stream;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};
use tower::{Layer, ServiceExt};

#[allow(unreachable_pub, missing_docs, clippy::all, clippy::pedantic)]
mod orders {
    include!("../examples/generated/orders.rs");
}

use orders::orders_client::OrdersClient;
use orders::orders_server::{Orders, OrdersServer};
use orders::{CreateOrderRequest, Order, OrderUpdate, WatchOrderRequest};

const CREATE: &str = "/orders.Orders/CreateOrder";

mod stores;

/// The engine of the store the running test is on.
fn test_engine() -> Engine {
    stores::engine()
}

/// What the test handlers saw. The symbol of a `CreateOrder` picks the handler's behaviour:
/// `MISSING` answers NOT_FOUND, `FLAKY` answers UNAVAILABLE on its first run and OK after,
/// `SLOW` signals `entered` and waits for `gate`, anything else is placed at once.
#[derive(Default)]
struct State {
    create_runs: AtomicUsize,
    watch_runs: AtomicUsize,
    runs_by_symbol: Mutex<HashMap<String, usize>>,
    entered: Mutex<Option<mpsc::UnboundedSender<()>>>,
    gate: Notify,
    dropped: Mutex<Option<mpsc::UnboundedSender<()>>>,
}

/// Reports a `SLOW` handler dropped before it finished (its call was cancelled).
struct DropSignal(Option<mpsc::UnboundedSender<()>>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

struct TestOrders(Arc<State>);

#[tonic::async_trait]
impl Orders for TestOrders {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let claimed = request.extensions().get::<ClaimedKey>().cloned();
        let req = request.into_inner();
        let total = self.0.create_runs.fetch_add(1, Ordering::SeqCst) + 1;
        let runs = {
            let mut by = self.0.runs_by_symbol.lock();
            let n = by.entry(req.symbol.clone()).or_default();
            *n += 1;
            *n
        };
        match req.symbol.as_str() {
            "MISSING" => return Err(Status::not_found("no instrument MISSING")),
            "INVALID" => return Err(Status::invalid_argument("symbol must be upper case")),
            "ECHO" => {
                let echo = claimed.map_or_else(
                    || "none".to_owned(),
                    |c| format!("{}#{}#{}", c.key(), c.scope(), c.fencing_token()),
                );
                return Ok(Response::new(Order {
                    order_id: echo,
                    ..Order::default()
                }));
            }
            "FLAKY" if runs == 1 => return Err(Status::unavailable("exchange unreachable")),
            "SLOW" => {
                let mut signal = DropSignal(self.0.dropped.lock().clone());
                if let Some(tx) = self.0.entered.lock().as_ref() {
                    let _ = tx.send(());
                }
                self.0.gate.notified().await;
                signal.0 = None; // finished: not a drop
            }
            _ => {}
        }
        let mut response = Response::new(Order {
            order_id: format!("order-{total}-{}", uuid::Uuid::new_v4()),
            symbol: req.symbol,
            quantity: req.quantity,
            price: req.price,
            status: "accepted".into(),
        });
        response
            .metadata_mut()
            .insert("x-handler-run", total.to_string().parse().unwrap());
        Ok(response)
    }

    type WatchOrderStream = tokio_stream::Iter<std::vec::IntoIter<Result<OrderUpdate, Status>>>;

    async fn watch_order(
        &self,
        request: Request<WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        self.0.watch_runs.fetch_add(1, Ordering::SeqCst);
        let id = request.into_inner().order_id;
        let updates = ["accepted", "routed", "filled"]
            .into_iter()
            .map(|status| {
                Ok(OrderUpdate {
                    order_id: id.clone(),
                    status: status.into(),
                })
            })
            .collect::<Vec<_>>();
        Ok(Response::new(tokio_stream::iter(updates)))
    }
}

struct Harness {
    client: OrdersClient<Channel>,
    state: Arc<State>,
    engine: Engine,
    addr: String,
}

impl Harness {
    fn runs(&self) -> usize {
        self.state.create_runs.load(Ordering::SeqCst)
    }
}

/// A tonic server on 127.0.0.1 (port 0) with the layer covering `CreateOrder`, configured
/// further by `configure`, and a client connected to it.
async fn start(configure: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer) -> Harness {
    let engine = test_engine();
    let layer = configure(IdempotencyLayer::new(engine.clone()).method(CREATE));
    let state = Arc::new(State::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .layer(layer)
        .add_service(OrdersServer::new(TestOrders(state.clone())))
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(server);
    let addr = format!("http://{addr}");
    let client = OrdersClient::connect(addr.clone()).await.unwrap();
    Harness {
        client,
        state,
        engine,
        addr,
    }
}

fn order(symbol: &str, quantity: u32) -> CreateOrderRequest {
    CreateOrderRequest {
        symbol: symbol.into(),
        quantity,
        price: "187.25".into(),
    }
}

fn new_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn with_key<T>(key: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(KEY_METADATA, key.parse().unwrap());
    request
}

fn replayed(metadata: &MetadataMap) -> bool {
    metadata
        .get(REPLAYED_METADATA)
        .is_some_and(|v| v.as_bytes() == b"true")
}

/// The metadata without what may differ between a response and its replay.
fn comparable(metadata: &MetadataMap) -> http::HeaderMap {
    let mut headers = metadata.clone().into_headers();
    headers.remove("date");
    headers.remove(REPLAYED_METADATA);
    headers
}

/// The caller an authentication interceptor found.
#[derive(Clone)]
struct Caller(String);

// Every test through `start` runs on both stores: `sqlite::*` on an in-memory SQLite engine,
// `postgres::*` on a table of the test PostgreSQL server.
on_both_stores! {
#[tokio::test]
async fn success_is_replayed_with_identical_message_and_metadata() {
    let mut h = start(|l| l).await;
    let key = &new_key();

    let first = h
        .client
        .create_order(with_key(key, order("AAPL", 10)))
        .await
        .unwrap();
    let again = h
        .client
        .create_order(with_key(key, order("AAPL", 10)))
        .await
        .unwrap();

    assert_eq!(h.runs(), 1, "the handler ran once");
    assert!(!replayed(first.metadata()));
    assert!(replayed(again.metadata()), "{:?}", again.metadata());
    assert_eq!(comparable(first.metadata()), comparable(again.metadata()));
    assert_eq!(
        first.metadata().get("x-handler-run").unwrap(),
        again.metadata().get("x-handler-run").unwrap()
    );
    assert_eq!(first.get_ref(), again.get_ref(), "the same order came back");
    assert!(first.get_ref().order_id.starts_with("order-1-"));
}

#[tokio::test]
async fn deterministic_error_is_stored_and_replayed_as_the_same_status() {
    let mut h = start(|l| l).await;
    let key = &new_key();

    let first = h
        .client
        .create_order(with_key(key, order("MISSING", 1)))
        .await
        .unwrap_err();
    let again = h
        .client
        .create_order(with_key(key, order("MISSING", 1)))
        .await
        .unwrap_err();

    assert_eq!(h.runs(), 1);
    assert_eq!(first.code(), Code::NotFound);
    assert_eq!(again.code(), Code::NotFound);
    assert_eq!(again.message(), first.message());
    assert!(!replayed(first.metadata()));
    assert!(replayed(again.metadata()));
}

/// Issue #14: the handler finds the key it runs under (unquoted, lower-cased), its scope and the
/// lease's fencing token in the request extensions.
#[tokio::test]
async fn the_handler_finds_the_claimed_key_in_the_extensions() {
    let mut h = start(|l| l.scope_metadata("x-tenant-id")).await;
    let key = new_key();
    let mut request = with_key(
        &format!("\"{}\"", key.to_ascii_uppercase()),
        order("ECHO", 1),
    );
    request
        .metadata_mut()
        .insert("x-tenant-id", "acme".parse().unwrap());
    let echo = h
        .client
        .create_order(request)
        .await
        .unwrap()
        .into_inner()
        .order_id;
    let mut parts = echo.split('#');
    assert_eq!(parts.next(), Some(key.as_str()));
    assert_eq!(parts.next(), Some("acme"));
    assert!(parts.next().unwrap().parse::<u64>().unwrap() > 0);
    // Without a key (optional), no claimed key.
    let mut request = Request::new(order("ECHO", 1));
    request
        .metadata_mut()
        .insert("x-tenant-id", "acme".parse().unwrap());
    let echo = h
        .client
        .create_order(request)
        .await
        .unwrap()
        .into_inner()
        .order_id;
    assert_eq!(echo, "none");
}

/// Issue #14: `INVALID_ARGUMENT` (the request failed validation) is not stored by default, so
/// the fixed request runs under the same key; `store_all_deterministic` replays it instead.
#[tokio::test]
async fn invalid_argument_is_released_unless_every_deterministic_code_is_stored() {
    let mut h = start(|l| l).await;
    let key = &new_key();
    let err = h
        .client
        .create_order(with_key(key, order("INVALID", 1)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let fixed = h
        .client
        .create_order(with_key(key, order("AAPL", 1)))
        .await
        .unwrap();
    assert!(!replayed(fixed.metadata()));
    assert_eq!(h.runs(), 2);

    let mut h = start(|l| l.store_when(store_all_deterministic)).await;
    let key = &new_key();
    for _ in 0..2 {
        let err = h
            .client
            .create_order(with_key(key, order("INVALID", 1)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    let fixed = h
        .client
        .create_order(with_key(key, order("AAPL", 1)))
        .await
        .unwrap_err();
    assert_eq!(fixed.code(), Code::FailedPrecondition);
    assert_eq!(h.runs(), 1);
}

#[tokio::test]
async fn transient_error_releases_the_key_and_the_retry_runs() {
    let mut h = start(|l| l).await;
    let key = &new_key();

    let first = h
        .client
        .create_order(with_key(key, order("FLAKY", 1)))
        .await
        .unwrap_err();
    assert_eq!(first.code(), Code::Unavailable);
    assert_eq!(first.message(), "exchange unreachable");

    let second = h
        .client
        .create_order(with_key(key, order("FLAKY", 1)))
        .await
        .unwrap();
    assert!(
        !replayed(second.metadata()),
        "the retry ran the handler again"
    );
    assert_eq!(h.runs(), 2);

    let third = h
        .client
        .create_order(with_key(key, order("FLAKY", 1)))
        .await
        .unwrap();
    assert!(replayed(third.metadata()), "the success was stored");
    assert_eq!(third.get_ref(), second.get_ref());
    assert_eq!(h.runs(), 2);
}

#[tokio::test]
async fn key_reused_with_another_message_is_failed_precondition() {
    let mut h = start(|l| l).await;
    let key = &new_key();
    h.client
        .create_order(with_key(key, order("AAPL", 10)))
        .await
        .unwrap();

    let status = h
        .client
        .create_order(with_key(key, order("AAPL", 11)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("new key"), "{}", status.message());
    assert_eq!(h.runs(), 1);
}

#[tokio::test]
async fn concurrent_call_is_aborted_while_the_first_runs_once() {
    let h = start(|l| l).await;
    let (tx, mut entered) = mpsc::unbounded_channel();
    *h.state.entered.lock() = Some(tx);
    let key = &new_key();

    let mut first_client = h.client.clone();
    let first_key = key.clone();
    let first = tokio::spawn(async move {
        first_client
            .create_order(with_key(&first_key, order("SLOW", 1)))
            .await
    });
    entered.recv().await.unwrap(); // the first call holds the key and sits in the handler

    let mut client = h.client.clone();
    let status = client
        .create_order(with_key(key, order("SLOW", 1)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert!(status.message().contains("retry"), "{}", status.message());
    let pushback: u64 = status
        .metadata()
        .get(RETRY_PUSHBACK_METADATA)
        .expect("a retry hint")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // Issue #14: no run of the method finished yet, so the hint is a second at most, not the
    // 30 s lock timeout.
    assert!((1..=1000).contains(&pushback), "{pushback}");

    h.state.gate.notify_one();
    let first = first.await.unwrap().unwrap();
    assert!(!replayed(first.metadata()));

    let again = client
        .create_order(with_key(key, order("SLOW", 1)))
        .await
        .unwrap();
    assert!(replayed(again.metadata()));
    assert_eq!(again.get_ref(), first.get_ref());
    assert_eq!(h.runs(), 1, "the handler ran once for three calls");
}

#[tokio::test]
async fn cancelled_call_releases_the_key() {
    let h = start(|l| l).await;
    let (tx, mut entered) = mpsc::unbounded_channel();
    *h.state.entered.lock() = Some(tx);
    let (tx, mut dropped) = mpsc::unbounded_channel();
    *h.state.dropped.lock() = Some(tx);
    let key = &new_key();

    let mut first_client = h.client.clone();
    let first_key = key.clone();
    let first = tokio::spawn(async move {
        first_client
            .create_order(with_key(&first_key, order("SLOW", 1)))
            .await
    });
    entered.recv().await.unwrap();
    first.abort(); // the client gives up: its stream is reset, the server drops the call
    assert!(first.await.unwrap_err().is_cancelled());

    dropped.recv().await.unwrap(); // the server dropped the call, and with it the lease

    // Dropping a lease queues its release without waiting; a claim racing it may still see
    // the key in flight for a moment, which is ABORTED: retry those, a bounded number of times.
    let mut client = h.client.clone();
    h.state.gate.notify_one(); // lets the retry's handler through at once
    let mut attempts = 0;
    let retried = loop {
        match client.create_order(with_key(key, order("SLOW", 1))).await {
            Err(s) if s.code() == Code::Aborted && attempts < 200 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => break other.unwrap(),
        }
    };
    assert!(!replayed(retried.metadata()), "the retry ran the handler");
    assert_eq!(h.runs(), 2);
}

/// Issue #13, item 5, through a real server: calls with deadlines of 0.2 to 30 ms under load
/// (the server drops each call's future when its deadline passes, wherever it is). A claim whose
/// answer had arrived but was not yet read when its call was dropped used to keep its key locked
/// for the whole lock timeout (a retry got ABORTED for ~30 s). Now every key is free again at
/// once: a retry without a deadline succeeds, after at most a short wait for a call that was
/// really still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_cut_short_by_their_deadline_leave_no_key_locked() {
    let h = start(|l| l).await;
    let keys: Vec<String> = (0..600).map(|_| new_key()).collect();
    let mut clients = Vec::new();
    for _ in 0..12 {
        clients.push(OrdersClient::connect(h.addr.clone()).await.unwrap());
    }
    let calls: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let mut client = clients[i % clients.len()].clone();
            let mut request = with_key(key, order("AAPL", 1));
            request.set_timeout(Duration::from_micros(200 + (i as u64 * 53) % 30_000));
            tokio::spawn(async move { client.create_order(request).await.map(|_| ()) })
        })
        .collect();
    let mut cut_short = 0;
    for c in calls {
        // DEADLINE_EXCEEDED, or a transport error once the server closes the connection.
        if c.await.unwrap().is_err() {
            cut_short += 1;
        }
    }
    // A new connection: the first one may have been closed by the server's HTTP/2 defence
    // against streams reset in bulk, which the client's own deadlines look like.
    let mut client = OrdersClient::connect(h.addr.clone()).await.unwrap();
    let mut locked = Vec::new();
    for key in &keys {
        let started = std::time::Instant::now();
        loop {
            match client.create_order(with_key(key, order("AAPL", 1))).await {
                Ok(_) => break,
                // Still running (ABORTED) or a transport hiccup: try again, briefly.
                Err(s) if started.elapsed() < Duration::from_secs(3) => {
                    if s.code() != Code::Aborted {
                        client = OrdersClient::connect(h.addr.clone()).await.unwrap();
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(s) => {
                    locked.push(format!("{key}: {:?} {}", s.code(), s.message()));
                    break;
                }
            }
        }
    }
    eprintln!(
        "{cut_short} of {} calls cut short by their deadline",
        keys.len()
    );
    assert!(locked.is_empty(), "keys left locked: {locked:?}");
}

#[tokio::test]
async fn missing_or_malformed_key_is_invalid_argument() {
    let mut h = start(|l| l.require_key(true)).await;

    let status = h
        .client
        .create_order(Request::new(order("AAPL", 1)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("idempotency-key"),
        "{}",
        status.message()
    );

    // The default policy, as in the HTTP shims: UUID keys.
    for bad in ["", "order-1", "7f9c2e5a0a4b4f0e9d1c3c2b1a0f9e8d"] {
        let status = h
            .client
            .create_order(with_key(bad, order("AAPL", 1)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        assert!(status.message().contains("UUID"), "{}", status.message());
    }

    let mut twice = with_key(&new_key(), order("AAPL", 1));
    twice
        .metadata_mut()
        .append(KEY_METADATA, new_key().parse().unwrap());
    let status = h.client.create_order(twice).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("exactly one"),
        "{}",
        status.message()
    );

    assert_eq!(h.runs(), 0, "the handler never ran");
}

#[tokio::test]
async fn opaque_keys_are_checked_for_length_and_characters() {
    let mut h = start(|l| l.key_policy(KeyPolicy::Opaque)).await;
    for bad in [String::new(), "k".repeat(256)] {
        let status = h
            .client
            .create_order(with_key(&bad, order("AAPL", 1)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        assert!(
            status.message().contains("printable ASCII"),
            "{}",
            status.message()
        );
    }
    assert_eq!(h.runs(), 0);
    for _ in 0..2 {
        h.client
            .create_order(with_key("order-1", order("AAPL", 1)))
            .await
            .unwrap();
    }
    assert_eq!(h.runs(), 1);
}

#[tokio::test]
async fn optional_key_missing_passes_through() {
    let mut h = start(|l| l).await;
    let a = h
        .client
        .create_order(Request::new(order("AAPL", 1)))
        .await
        .unwrap();
    let b = h
        .client
        .create_order(Request::new(order("AAPL", 1)))
        .await
        .unwrap();
    assert_ne!(a.get_ref().order_id, b.get_ref().order_id);
    assert!(!replayed(b.metadata()));
    assert_eq!(h.runs(), 2);
}

#[tokio::test]
async fn oversized_message_is_resource_exhausted() {
    let mut h = start(|l| l.max_message_bytes(64)).await;
    let status = h
        .client
        .create_order(with_key(&new_key(), order(&"X".repeat(100), 1)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("64 bytes"),
        "{}",
        status.message()
    );
    assert_eq!(h.runs(), 0);

    h.client
        .create_order(with_key(&new_key(), order("AAPL", 1)))
        .await
        .unwrap();
    assert_eq!(h.runs(), 1);
}

#[tokio::test]
async fn scope_from_metadata_keeps_tenants_apart() {
    let mut h = start(|l| l.scope_metadata("x-tenant-id")).await;
    let key = new_key();
    let call = |tenant: Option<&str>| {
        let mut r = with_key(&key, order("AAPL", 1));
        if let Some(t) = tenant {
            r.metadata_mut().insert("x-tenant-id", t.parse().unwrap());
        }
        r
    };
    let status = h.client.create_order(call(None)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("x-tenant-id"),
        "{}",
        status.message()
    );

    let a = h.client.create_order(call(Some("acme"))).await.unwrap();
    let b = h.client.create_order(call(Some("globex"))).await.unwrap();
    let a2 = h.client.create_order(call(Some("acme"))).await.unwrap();
    assert_ne!(a.get_ref().order_id, b.get_ref().order_id);
    assert!(!replayed(b.metadata()));
    assert!(replayed(a2.metadata()));
    assert_eq!(h.runs(), 2);
}

#[tokio::test]
async fn scope_from_an_extension_set_by_an_outer_interceptor() {
    let engine = test_engine();
    let state = Arc::new(State::default());
    let auth = |mut request: Request<()>| {
        let caller = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|user| Caller(user.to_owned()));
        if let Some(caller) = caller {
            request.extensions_mut().insert(caller);
        }
        Ok(request)
    };
    let idempotency = IdempotencyLayer::new(engine)
        .method(CREATE)
        .scope_fn(|parts| parts.extensions.get::<Caller>().map(|c| c.0.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(auth)) // outermost: runs first
            .layer(idempotency)
            .add_service(OrdersServer::new(TestOrders(state.clone())))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let mut client = OrdersClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    let key = new_key();
    let call = |user: Option<&str>| {
        let mut r = with_key(&key, order("AAPL", 1));
        if let Some(user) = user {
            let token = format!("Bearer {user}");
            r.metadata_mut()
                .insert("authorization", token.parse().unwrap());
        }
        r
    };
    let status = client.create_order(call(None)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let alice = client.create_order(call(Some("alice"))).await.unwrap();
    let bob = client.create_order(call(Some("bob"))).await.unwrap();
    let alice_again = client.create_order(call(Some("alice"))).await.unwrap();
    assert_ne!(alice.get_ref().order_id, bob.get_ref().order_id);
    assert!(replayed(alice_again.metadata()));
    assert_eq!(alice_again.get_ref(), alice.get_ref());
    assert_eq!(state.create_runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn response_over_the_store_limit_is_sent_and_recorded_as_done() {
    let mut h = start(|l| l.max_response_bytes(32)).await;
    let key = new_key();
    let first = h
        .client
        .create_order(with_key(&key, order("AAPL", 1)))
        .await
        .unwrap();
    assert!(first.get_ref().order_id.starts_with("order-1-"));

    let status = h
        .client
        .create_order(with_key(&key, order("AAPL", 1)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert!(
        status.message().contains("too large to keep"),
        "{}",
        status.message()
    );
    assert!(replayed(status.metadata()));
    assert_eq!(h.runs(), 1, "the retry did not run the method again");
}

#[tokio::test]
async fn streaming_method_passes_through_untouched() {
    let mut h = start(|l| l.require_key(true)).await;
    for _ in 0..2 {
        let response = h
            .client
            .watch_order(with_key(
                &new_key(),
                WatchOrderRequest {
                    order_id: "o-1".into(),
                },
            ))
            .await
            .unwrap();
        assert!(!replayed(response.metadata()));
        let mut stream = response.into_inner();
        let mut statuses = Vec::new();
        while let Some(update) = stream.message().await.unwrap() {
            statuses.push(update.status);
        }
        assert_eq!(statuses, ["accepted", "routed", "filled"]);
    }
    // Not covered: no key needed, and the handler ran for each call.
    h.client
        .watch_order(Request::new(WatchOrderRequest {
            order_id: "o-1".into(),
        }))
        .await
        .unwrap();
    assert_eq!(h.state.watch_runs.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn closed_store_is_unavailable_and_the_handler_does_not_run() {
    let mut h = start(|l| l).await;
    h.engine.shutdown().unwrap();
    let status = h
        .client
        .create_order(with_key(&new_key(), order("AAPL", 1)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("shut down"),
        "{}",
        status.message()
    );
    assert!(status.metadata().get(RETRY_PUSHBACK_METADATA).is_some());
    assert_eq!(h.runs(), 0);
}

#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn a_dead_writer_is_unavailable_and_the_handler_does_not_run() {
    let mut h = start(|l| l).await;
    h.engine.inject_writer_panic();
    for _ in 0..3 {
        let status = h
            .client
            .create_order(with_key(&new_key(), order("AAPL", 1)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
        assert!(status.metadata().get(RETRY_PUSHBACK_METADATA).is_some());
    }
    assert_eq!(h.runs(), 0);
}

#[tokio::test]
async fn custom_store_rule_is_honoured() {
    // Nothing but OK is stored: NOT_FOUND now releases the key.
    let mut h = start(|l| l.store_when(|code| code == Code::Ok)).await;
    let key = new_key();
    for _ in 0..2 {
        let status = h
            .client
            .create_order(with_key(&key, order("MISSING", 1)))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        assert!(!replayed(status.metadata()));
    }
    assert_eq!(h.runs(), 2);
}
}

// ---- Frame-exact replay through the bare tower service -------------------------------------

type TestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// The frames of a response body: its data, concatenated, and its trailers frame, if any.
async fn frames(body: tonic::body::Body) -> (Vec<u8>, Option<http::HeaderMap>) {
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (collected.to_bytes().to_vec(), trailers)
}

const KEY: &str = "0b6f5a3e-9a7c-4c1e-8f2a-2d8b4f1e6c3a";

fn grpc_request(key: &str, message: &'static [u8]) -> http::Request<tonic::body::Body> {
    http::Request::builder()
        .method("POST")
        .uri("http://localhost/pkg.Svc/Unary")
        .header("content-type", "application/grpc")
        .header(KEY_METADATA, key)
        .body(tonic::body::Body::new(Full::new(Bytes::from_static(
            message,
        ))))
        .unwrap()
}

#[tokio::test]
async fn replay_has_the_same_headers_data_and_trailers() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let inner = tower::service_fn(move |_req: http::Request<tonic::body::Body>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            trailers.insert("x-trailer", "kept".parse().unwrap());
            trailers.append("x-trailer", "twice".parse().unwrap());
            let body: TestBody = Full::new(Bytes::from_static(b"\0\0\0\0\x03abc"))
                .with_trailers(async move { Some(Ok(trailers)) })
                .boxed_unsync();
            let response = http::Response::builder()
                .header("content-type", "application/grpc")
                .header("x-header", "h")
                .body(body)
                .unwrap();
            Ok::<_, Infallible>(response)
        }
    });
    let engine = Engine::open(EngineConfig::in_memory()).unwrap();
    let svc = IdempotencyLayer::new(engine)
        .method("/pkg.Svc/Unary")
        .layer(inner);

    let first = svc
        .clone()
        .oneshot(grpc_request(KEY, b"\0\0\0\0\x01m"))
        .await
        .unwrap();
    let again = svc
        .clone()
        .oneshot(grpc_request(KEY, b"\0\0\0\0\x01m"))
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let (first_head, first_body) = first.into_parts();
    let (again_head, again_body) = again.into_parts();
    assert_eq!(again_head.status, first_head.status);
    let mut again_headers = again_head.headers.clone();
    assert_eq!(
        again_headers.remove(REPLAYED_METADATA).unwrap(),
        "true",
        "the replay is marked"
    );
    assert_eq!(again_headers, first_head.headers);

    let (first_data, first_trailers) = frames(first_body).await;
    let (again_data, again_trailers) = frames(again_body).await;
    assert_eq!(first_data, b"\0\0\0\0\x03abc");
    assert_eq!(again_data, first_data);
    let trailers = again_trailers.expect("the replay has its trailers");
    assert_eq!(Some(&trailers), first_trailers.as_ref());
    let kept: Vec<_> = trailers.get_all("x-trailer").iter().collect();
    assert_eq!(kept, ["kept", "twice"]);
}

#[tokio::test]
async fn trailers_only_response_is_replayed_as_trailers_only() {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let inner = tower::service_fn(move |_req: http::Request<tonic::body::Body>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, Infallible>(
                Status::already_exists("order exists").into_http::<tonic::body::Body>(),
            )
        }
    });
    let engine = Engine::open(EngineConfig::in_memory()).unwrap();
    let svc = IdempotencyLayer::new(engine)
        .method("/pkg.Svc/Unary")
        .layer(inner);

    let first = svc
        .clone()
        .oneshot(grpc_request(KEY, b"\0\0\0\0\x01m"))
        .await
        .unwrap();
    let again = svc
        .clone()
        .oneshot(grpc_request(KEY, b"\0\0\0\0\x01m"))
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(again.headers().get("grpc-status").unwrap(), "6");
    assert_eq!(
        again.headers().get("grpc-message"),
        first.headers().get("grpc-message")
    );
    assert_eq!(again.headers().get(REPLAYED_METADATA).unwrap(), "true");
    let (data, trailers) = frames(again.into_body()).await;
    assert!(data.is_empty());
    assert_eq!(trailers, None, "no trailers frame, as in the original");
}
