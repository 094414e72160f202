//! Regressions from the second adversarial review of the client half (and of the Axum
//! example's ledger of orders): each test failed before its fix.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idempotency_rs::client::{ClientError, RetryMiddleware, RetryPolicy};

#[path = "../examples/chaos/main.rs"]
#[allow(dead_code, unreachable_pub)]
mod chaos;

use chaos::axum_example;

fn fast() -> RetryPolicy {
    RetryPolicy::new().backoff(Duration::from_millis(1), Duration::from_millis(5))
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// The POST runs and answers 303; the redirect chain then fails (too many redirects). The
/// operation ran, but the error reaches the caller with no key: `ClientError::of` is `None`,
/// so the caller cannot "retry later with the same key".
#[tokio::test]
async fn http_a_failure_after_the_post_ran_still_carries_the_key() {
    use axum::response::Redirect;
    use axum::routing::{get, post};
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = axum::Router::new()
        .route(
            "/orders",
            post(move || {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    Redirect::to("/loop")
                }
            }),
        )
        .route("/loop", get(|| async { Redirect::to("/loop") }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RetryMiddleware::new().policy(fast()))
        .build();
    let e = client
        .post(format!("http://{addr}/orders"))
        .body("{}")
        .send()
        .await
        .unwrap_err();
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the operation ran once");
    assert!(
        ClientError::of(&e).is_some(),
        "the operation ran, but the error has no key to retry it with: {e:?}"
    );
}

/// README: "Never retried: any other error status. With an `application/problem+json` body it
/// becomes `ClientError::Rejected`". A problem whose `Content-Length` is over
/// `max_response_bytes` skips that check and comes back as `Ok(422)` (with a Delivery), so a
/// caller matching on `Rejected` treats the refusal as a success.
#[tokio::test]
async fn http_a_long_problem_is_still_rejected() {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/orders",
        post(|| async {
            (
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                [("content-type", "application/problem+json")],
                r#"{"type":"about:blank","title":"quantity must be positive","status":422}"#,
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RetryMiddleware::new().policy(fast()).max_response_bytes(32))
        .build();
    let r = client
        .post(format!("http://{addr}/orders"))
        .body("{}")
        .send()
        .await;
    match r {
        Err(e) => assert!(
            matches!(
                ClientError::of(&e),
                Some(ClientError::Rejected { status: 422, .. })
            ),
            "{e:?}"
        ),
        Ok(r) => panic!("a problem+json 422 came back as a response: {}", r.status()),
    }
}

// ---------------------------------------------------------------------------------------------
// The Axum example's `Orders` ledger
// ---------------------------------------------------------------------------------------------

/// Runs the Axum example on a fresh store `store` with its orders in `ledger`, and places the
/// order `body` under `key` (scope `u`): the order id answered, and the orders.
async fn place_once(
    dir: &std::path::Path,
    store: &str,
    ledger: &std::path::Path,
    key: &str,
    body: &str,
) -> (serde_json::Value, Arc<axum_example::Orders>) {
    let engine =
        idempotency_rs::Engine::open_async(idempotency_rs::EngineConfig::new(dir.join(store)))
            .await
            .unwrap();
    let orders = Arc::new(axum_example::Orders::with_ledger(ledger).unwrap());
    let router = axum_example::app(&engine, orders.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let answer: serde_json::Value = reqwest::Client::new()
        .post(format!("http://{addr}/orders"))
        .header("x-user-id", "u")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    server.abort();
    engine.shutdown().unwrap();
    (answer["order_id"].clone(), orders)
}

/// `Orders::with_ledger` says a torn last line "does not parse: that order was never answered,
/// and is placed again by the retry". But the file is reopened for append without ending the
/// torn line, so the next order's line is glued to the fragment and is unparseable too: an
/// order that WAS answered disappears from the ledger at the next restart, and a run of its key
/// after a lost record places a second order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_ledger_line_does_not_swallow_the_next_order() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("orders");
    // A crash in the middle of writing an earlier order's line.
    std::fs::write(
        &ledger,
        r#"{"scope":"u","key":"0a0a0a0a-0b0b-4c0c-8d0d-0e0e0e0e0e0e","order_id":"1234"#,
    )
    .unwrap();
    let key = "1f2e3d4c-5b6a-4978-8a9b-0c1d2e3f4a5b";
    let body = r#"{"symbol":"A","quantity":1,"price":2.0}"#;
    let (first, orders) = place_once(dir.path(), "first.db", &ledger, key, body).await;
    assert_eq!(orders.created(), 1);
    // Restarted, the record of the first run lost (a fresh store): the ledger must answer it.
    let (second, orders) = place_once(dir.path(), "second.db", &ledger, key, body).await;
    assert_eq!(
        (second, orders.created(), orders.recovered()),
        (first, 0, 1),
        "the answered order was lost from the ledger behind the torn line:\n{}",
        std::fs::read_to_string(&ledger).unwrap()
    );
}

/// An order whose total is not finite (`quantity × price` overflows) was written to the
/// ledger as `"total":null`, which could not be read back, so the next run of its key placed a
/// second order. Such an order is now refused with a 422 (which releases the key), nothing
/// placed, and the fixed request under the same key is placed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_with_an_infinite_total_is_refused_and_nothing_placed() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("orders");
    let engine = idempotency_rs::Engine::open_async(idempotency_rs::EngineConfig::new(
        dir.path().join("store.db"),
    ))
    .await
    .unwrap();
    let orders = Arc::new(axum_example::Orders::with_ledger(&ledger).unwrap());
    let router = axum_example::app(&engine, orders.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let send = |body: &'static str| {
        reqwest::Client::new()
            .post(format!("http://{addr}/orders"))
            .header("x-user-id", "u")
            .header("idempotency-key", "2f2e3d4c-5b6a-4978-8a9b-0c1d2e3f4a5b")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = send(r#"{"symbol":"A","quantity":10,"price":1e308}"#)
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(orders.created(), 0);
    assert_eq!(std::fs::read_to_string(&ledger).unwrap(), "");
    let r = send(r#"{"symbol":"A","quantity":10,"price":1.5}"#)
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(orders.created(), 1);
    // A ledger line that is not an order, other than a torn last one, is refused at open.
    std::fs::write(&ledger, "not an order\n{}\n").unwrap();
    assert!(axum_example::Orders::with_ledger(&ledger).is_err());
}

// ---------------------------------------------------------------------------------------------
// The chaos tally
// ---------------------------------------------------------------------------------------------

/// `Report::passed` ignores `unkeyed`: a keyed row whose calls came back without their key
/// (so `count` never checks their order ids) still passes.
#[test]
fn chaos_a_keyed_row_whose_calls_lost_their_keys_does_not_pass() {
    let report = chaos::Report {
        name: "keyed".into(),
        ops: 10,
        succeeded: 10,
        executions: 10,
        unkeyed: 10,
        keyed: true,
        ..chaos::Report::default()
    };
    assert!(
        !report.passed(),
        "every call came back without its key, so no order id was checked: {report:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// gRPC
// ---------------------------------------------------------------------------------------------

mod grpc {
    use super::*;

    use bytes::Bytes;
    use http_body_util::{Full, StreamBody};
    use hyper::body::Frame;
    use idempotency_rs::client::grpc::RetryLayer;
    use tonic::Code;
    use tonic::transport::Channel;

    #[allow(unreachable_pub, missing_docs, clippy::all, clippy::pedantic)]
    mod orders {
        include!("../examples/generated/orders.rs");
    }
    use orders::orders_client::OrdersClient;
    use orders::{CreateOrderRequest, Order};

    const CREATE: &str = "/orders.Orders/CreateOrder";

    type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

    /// A raw HTTP/2 server: `answer(n)` makes the response to the n-th request (1-based).
    async fn h2_server<F, Fut>(answer: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(usize) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = http::Response<Body>> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                let (answer, c) = (answer.clone(), c.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                        let answer = answer.clone();
                        async move { Ok::<_, Infallible>(answer(n).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(socket), svc)
                    .await;
                });
            }
        });
        (addr, count)
    }

    fn full(status: u16, content_type: &str, body: Bytes) -> http::Response<Body> {
        use http_body_util::BodyExt;
        http::Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(body).boxed())
            .unwrap()
    }

    /// A whole gRPC OK answer: the message, then `grpc-status: 0` in trailers.
    fn ok_order() -> http::Response<Body> {
        use http_body_util::BodyExt;
        use prost::Message;
        let msg = Order {
            order_id: "o-1".into(),
            ..Order::default()
        }
        .encode_to_vec();
        let mut framed = vec![0u8];
        framed.extend_from_slice(&u32::try_from(msg.len()).unwrap().to_be_bytes());
        framed.extend_from_slice(&msg);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
            Ok(Frame::data(Bytes::from(framed))),
            Ok(Frame::trailers(trailers)),
        ];
        http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
            .unwrap()
    }

    fn client(
        addr: SocketAddr,
        policy: RetryPolicy,
    ) -> OrdersClient<idempotency_rs::client::grpc::RetryService<Channel>> {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let channel = tower::ServiceBuilder::new()
            .layer(RetryLayer::new().method(CREATE).policy(policy))
            .service(channel);
        OrdersClient::new(channel)
    }

    fn order() -> tonic::Request<CreateOrderRequest> {
        tonic::Request::new(CreateOrderRequest {
            symbol: "A".into(),
            quantity: 1,
            price: "1.00".into(),
        })
    }

    /// An HTTP 200 stream that ends without `grpc-status` is an answer cut short (a proxy's
    /// RST_STREAM(NO_ERROR/CANCEL) ends up exactly so in hyper): the operation may have run and
    /// the answer was lost, the very case the retry is for. The layer maps it to UNKNOWN and
    /// hands it over unretried.
    #[tokio::test]
    async fn grpc_an_answer_cut_short_without_a_status_is_retried() {
        let (addr, count) = h2_server(|n| async move {
            if n == 1 {
                full(200, "application/grpc", Bytes::new())
            } else {
                ok_order()
            }
        })
        .await;
        let r = client(addr, fast()).create_order(order()).await;
        let attempts = count.load(Ordering::SeqCst);
        match r {
            Ok(r) => {
                assert_eq!(r.get_ref().order_id, "o-1");
                assert_eq!(attempts, 2);
            }
            Err(e) => panic!(
                "not retried ({attempts} attempt): {e:?}; key in metadata: {:?}",
                e.metadata().get("idempotency-key")
            ),
        }
    }

    /// The docs: "a call that reaches [its deadline] ends with DEADLINE_EXCEEDED". The attempt
    /// carries the time left rounded down to whole ms as `grpc-timeout`, so the channel's own
    /// timeout fires first (tonic's `TimeoutExpired`, a transport error); the layer then finds
    /// no time for a retry and answers UNAVAILABLE "no answer after 1 attempt(s)".
    #[tokio::test]
    async fn grpc_a_call_that_reaches_its_deadline_ends_with_deadline_exceeded() {
        let (addr, _count) = h2_server(|_| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            ok_order()
        })
        .await;
        let mut c = client(addr, RetryPolicy::new());
        for _ in 0..3 {
            let mut request = order();
            request.set_timeout(Duration::from_millis(300));
            let e = c.create_order(request).await.unwrap_err();
            assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
        }
    }
}
