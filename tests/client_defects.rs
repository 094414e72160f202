#![cfg(all(
    feature = "client",
    feature = "tonic-client",
    feature = "axum-integration",
    feature = "tonic-integration"
))]
//! The adversarial review's reproductions for the client half: each failed before its fix.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing;
use idempotency_rs::axum_integration::idempotency_layer;
use idempotency_rs::client::{ClientError, ResponseExt, RetryMiddleware, RetryPolicy};
use idempotency_rs::{Engine, EngineConfig};
use parking_lot::Mutex;
use reqwest_middleware::ClientWithMiddleware;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn fast() -> RetryPolicy {
    RetryPolicy::new().backoff(Duration::from_millis(1), Duration::from_millis(5))
}

fn client(middleware: RetryMiddleware) -> ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(middleware)
        .build()
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

/// A raw HTTP/1.1 server: connection `n` gets `answers[n]` (the last one repeats).
async fn raw(answers: Vec<String>) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let answer = answers[n.min(answers.len() - 1)].clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let k = socket.read(&mut buf).await.unwrap_or(0);
                    if k == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..k]);
                }
                let _ = socket.write_all(answer.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (base, count)
}

// ---------------------------------------------------------------------------------------------
// 1. A replayed (stored) answer is retried as if it could change.
// ---------------------------------------------------------------------------------------------

/// The application answers 409 with `Retry-After` (a result of the operation, which the server
/// layer stores and replays, Retry-After included). The first retry is by design; every retry
/// after it gets the *replay* (`Idempotent-Replayed: true`), which can never change, yet the
/// middleware keeps retrying and ends with `Exhausted` ("the operation may have run, retry
/// later") instead of handing back the stored answer.
#[tokio::test]
async fn a_replayed_409_with_retry_after_is_not_retried() {
    let engine = Engine::open_async(EngineConfig::in_memory()).await.unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    async fn conflict(State(runs): State<Arc<AtomicUsize>>) -> impl IntoResponse {
        runs.fetch_add(1, Ordering::SeqCst);
        (
            StatusCode::CONFLICT,
            [("retry-after", "0"), ("content-type", "application/json")],
            r#"{"error":"seat already taken"}"#,
        )
    }
    let app = Router::new()
        .route("/orders", routing::post(conflict))
        .route_layer(idempotency_layer(&engine))
        .with_state(runs.clone());
    let base = serve(app).await;
    let c = client(RetryMiddleware::new().policy(fast()));
    let result = c
        .post(format!("{base}/orders"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the server deduplicated");
    match result {
        Ok(r) => {
            assert_eq!(r.status(), 409);
            assert!(r.delivery().unwrap().attempts <= 2, "{:?}", r.delivery());
        }
        Err(e) => panic!(
            "the stored 409 was replayed and retried until the attempts ran out: {:?}",
            ClientError::of(&e)
        ),
    }
}

mod grpc {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use idempotency_rs::client::RetryPolicy;
    use idempotency_rs::client::grpc::RetryLayer;
    use idempotency_rs::tonic_integration::IdempotencyLayer;
    use idempotency_rs::{Engine, EngineConfig};
    use tonic::transport::Channel;
    use tonic::transport::server::TcpIncoming;
    use tonic::{Code, Request, Response, Status};

    #[allow(unreachable_pub, missing_docs, clippy::all, clippy::pedantic)]
    mod orders {
        include!("../examples/generated/orders.rs");
    }
    use orders::orders_client::OrdersClient;
    use orders::orders_server::{Orders, OrdersServer};
    use orders::{CreateOrderRequest, Order, OrderUpdate, WatchOrderRequest};

    const CREATE: &str = "/orders.Orders/CreateOrder";

    struct Svc(Arc<AtomicUsize>);

    #[tonic::async_trait]
    impl Orders for Svc {
        async fn create_order(
            &self,
            _request: Request<CreateOrderRequest>,
        ) -> Result<Response<Order>, Status> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Err(Status::aborted("the order book rejected the order"))
        }

        type WatchOrderStream =
            tonic::codegen::tokio_stream::Iter<std::vec::IntoIter<Result<OrderUpdate, Status>>>;

        async fn watch_order(
            &self,
            _request: Request<WatchOrderRequest>,
        ) -> Result<Response<Self::WatchOrderStream>, Status> {
            Err(Status::unimplemented("not here"))
        }
    }

    /// The gRPC twin: a server that stores every outcome (`store_when(|_| true)`) replays the
    /// application's ABORTED with `idempotent-replayed: true`; the layer retries the replay
    /// again and again (it never looks at the replay flag).
    #[tokio::test]
    async fn a_replayed_aborted_is_not_retried() {
        let engine = Engine::open_async(EngineConfig::in_memory()).await.unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let layer = IdempotencyLayer::new(&engine)
            .method(CREATE)
            .store_when(|_| true);
        let svc = OrdersServer::new(Svc(runs.clone()));
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .layer(layer)
                .add_service(svc)
                .serve_with_incoming(TcpIncoming::from(listener))
                .await
        });
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let channel = tower::ServiceBuilder::new()
            .layer(RetryLayer::new().method(CREATE).policy(
                RetryPolicy::new().backoff(Duration::from_millis(1), Duration::from_millis(5)),
            ))
            .service(channel);
        let e = OrdersClient::new(channel)
            .create_order(Request::new(CreateOrderRequest {
                symbol: "X".into(),
                quantity: 1,
                price: "1.00".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Aborted);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let attempts = e
            .metadata()
            .get("idempotency-attempts")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            attempts == "1" || attempts == "2",
            "a stored answer was retried {attempts} times"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. A Retry-After too large for u64 is ignored: the retry goes out at once.
// ---------------------------------------------------------------------------------------------

/// `Retry-After: 99999999999999999999` ("not for a very long time") fails `parse::<u64>`, is
/// then not an HTTP date either, and is dropped: the middleware retries after a jitter of a few
/// milliseconds, the opposite of what the server asked. (RFC 9111 §1.2.2: a delta-seconds
/// value too large to represent is to be taken as a very large value, not ignored.) A
/// Retry-After of "30" on the same 2 s budget ends the call at once (tests/client.rs).
#[tokio::test]
async fn a_retry_after_too_large_for_u64_is_not_ignored() {
    let calls = Arc::new(AtomicUsize::new(0));
    async fn busy(State(calls): State<Arc<AtomicUsize>>) -> axum::response::Response {
        if calls.fetch_add(1, Ordering::SeqCst) == 0 {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "99999999999999999999")],
            )
                .into_response()
        } else {
            StatusCode::CREATED.into_response()
        }
    }
    let base = serve(
        Router::new()
            .route("/orders", routing::post(busy))
            .with_state(calls.clone()),
    )
    .await;
    let c = client(RetryMiddleware::new().policy(fast().max_elapsed(Duration::from_secs(2))));
    let started = Instant::now();
    let result = c.post(format!("{base}/orders")).body("{}").send().await;
    if let Ok(r) = &result {
        panic!(
            "retried after {:?} although the server asked for ~3e12 years: {} after {} attempts",
            started.elapsed(),
            r.status(),
            r.delivery().unwrap().attempts
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// 3. A retryable status whose (unsized) body passes the limit ends the call as "ran".
// ---------------------------------------------------------------------------------------------

/// A 503 (the store is down, the handler never ran) or a proxy's 502 page sent chunked, longer
/// than `max_response_bytes`: the status says "retry", but the body is buffered first and the
/// call fails with `ResponseTooLarge`, whose text says "the operation ran". The status alone
/// decides a retry (the Content-Length branch already does so); the same answer with a length
/// is retried.
#[tokio::test]
async fn a_retryable_status_with_an_unsized_large_body_is_retried() {
    let page = "x".repeat(100);
    let unavailable = format!(
        "HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{page}\r\n0\r\n\r\n",
        page.len()
    );
    let created =
        "HTTP/1.1 201 Created\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok".to_owned();
    let (base, connections) = raw(vec![unavailable, created]).await;
    let c = client(RetryMiddleware::new().policy(fast()).max_response_bytes(16));
    let result = c.post(format!("{base}/orders")).body("{}").send().await;
    match result {
        Ok(r) => {
            assert_eq!(r.status(), 201);
            assert_eq!(connections.load(Ordering::SeqCst), 2);
        }
        Err(e) => panic!("a 503 was not retried: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 4. A caller's key that is not printable ASCII came back altered (lossy UTF-8): retrying
//    later "with this key" sent a different key. It is now refused before anything is sent.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_non_ascii_caller_key_is_refused_before_sending() {
    let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    async fn down(State(seen): State<Arc<Mutex<Vec<Vec<u8>>>>>, h: HeaderMap) -> StatusCode {
        seen.lock()
            .push(h.get("idempotency-key").unwrap().as_bytes().to_vec());
        StatusCode::SERVICE_UNAVAILABLE
    }
    let base = serve(
        Router::new()
            .route("/orders", routing::post(down))
            .with_state(seen.clone()),
    )
    .await;
    let c = client(RetryMiddleware::new().policy(fast().max_attempts(2)));
    let key = reqwest::header::HeaderValue::from_bytes(b"order-\xe9t\xe9-17").unwrap();
    let e = c
        .post(format!("{base}/orders"))
        .header("idempotency-key", key)
        .body("{}")
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(ClientError::of(&e), Some(ClientError::InvalidKey { .. })),
        "{e:?}"
    );
    assert!(seen.lock().is_empty(), "nothing may be sent");
}
