//! The client half through its public API, against real servers on 127.0.0.1: the reqwest
//! middleware against an Axum app behind the idempotency layer (and raw sockets where a server
//! must misbehave), the gRPC layer against a tonic server behind the tonic layer.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing;
use idempotency_rs::axum_integration::idempotency_layer;
use idempotency_rs::client::{ClientError, LastFailure, ResponseExt, RetryMiddleware, RetryPolicy};
use idempotency_rs::{Engine, EngineConfig};
use parking_lot::Mutex;
use reqwest_middleware::ClientWithMiddleware;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A scripted answer: status, extra headers, body.
type Answer = (u16, Vec<(&'static str, String)>, String);

/// What the scripted handler saw and what it answers next.
#[derive(Default)]
struct Script {
    /// Each run: the key and the body it got.
    runs: Mutex<Vec<(Option<String>, Bytes)>>,
    /// Answers to give before the normal 201, in order: status, extra headers, body.
    answers: Mutex<VecDeque<Answer>>,
    /// How long each run takes.
    delay: Mutex<Duration>,
}

async fn handler(State(s): State<Arc<Script>>, headers: HeaderMap, body: Bytes) -> Response {
    let key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap().to_owned());
    let n = {
        let mut runs = s.runs.lock();
        runs.push((key, body));
        runs.len()
    };
    let delay = *s.delay.lock();
    tokio::time::sleep(delay).await;
    let next = s.answers.lock().pop_front();
    match next {
        Some((status, headers, body)) => {
            let mut r = (StatusCode::from_u16(status).unwrap(), body).into_response();
            for (name, value) in headers {
                r.headers_mut().insert(name, value.parse().unwrap());
            }
            r
        }
        None => (
            StatusCode::CREATED,
            [("content-type", "application/json")],
            format!(r#"{{"run":{n}}}"#),
        )
            .into_response(),
    }
}

/// An Axum app behind the idempotency layer (UUID keys, JSON fingerprints) on a real socket.
struct Server {
    base: String,
    script: Arc<Script>,
    _engine: Engine,
}

async fn server(configure: impl FnOnce(EngineConfig) -> EngineConfig) -> Server {
    let engine = Engine::open_async(configure(EngineConfig::in_memory()))
        .await
        .unwrap();
    let script = Arc::new(Script::default());
    let app = Router::new()
        .route("/orders", routing::post(handler).get(handler).put(handler))
        .route_layer(idempotency_layer(&engine).max_request_bytes(64))
        .with_state(script.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server {
        base,
        script,
        _engine: engine,
    }
}

fn fast() -> RetryPolicy {
    RetryPolicy::new().backoff(Duration::from_millis(1), Duration::from_millis(20))
}

fn client(middleware: RetryMiddleware) -> ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(middleware)
        .build()
}

fn problem(status: u16, slug: &str) -> Answer {
    (
        status,
        vec![("content-type", "application/problem+json".into())],
        format!(
            r#"{{"type":"urn:idempotency-rs:problem:{slug}","title":"T{status}","status":{status},"detail":"do this"}}"#
        ),
    )
}

fn post(c: &ClientWithMiddleware, s: &Server, body: &str) -> reqwest_middleware::RequestBuilder {
    c.post(format!("{}/orders", s.base))
        .header("content-type", "application/json")
        .body(body.to_owned())
}

#[tokio::test]
async fn one_key_for_every_attempt_of_an_operation() {
    let s = server(|c| c).await;
    s.script.answers.lock().extend([
        (503, vec![], String::new()),
        (502, vec![], String::new()),
        (429, vec![], String::new()),
        (504, vec![], String::new()),
    ]);
    let c = client(RetryMiddleware::new().policy(fast()));
    let r = post(&c, &s, r#"{"qty":1}"#).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let d = r.delivery().unwrap().clone();
    assert_eq!(d.attempts, 5);
    assert!(!d.replayed);
    assert!(uuid::Uuid::parse_str(&d.key).is_ok(), "{}", d.key);
    assert_eq!(r.text().await.unwrap(), r#"{"run":5}"#);
    let runs = s.script.runs.lock().clone();
    assert_eq!(runs.len(), 5);
    assert!(
        runs.iter()
            .all(|(k, b)| k.as_deref() == Some(d.key.as_str()) && b == r#"{"qty":1}"#)
    );

    // The next operation gets another key.
    let again = post(&c, &s, r#"{"qty":1}"#).send().await.unwrap();
    assert_ne!(again.delivery().unwrap().key, d.key);
    // Methods not covered are neither keyed nor retried.
    s.script
        .answers
        .lock()
        .push_back((503, vec![], String::new()));
    let put = c.put(format!("{}/orders", s.base)).send().await.unwrap();
    assert_eq!(put.status(), 503);
    assert!(put.delivery().is_none());
    assert_eq!(s.script.runs.lock().last().unwrap().0, None);
}

#[tokio::test]
async fn the_callers_key_wins_and_a_retry_later_replays() {
    let s = server(|c| c).await;
    let c = client(RetryMiddleware::new().policy(fast()));
    let key = "6f1e0c2a-9b8d-4e7f-a1c3-5d2b8e9f0a41";
    let first = post(&c, &s, "{}")
        .header("idempotency-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(first.delivery().unwrap().key, key);
    let body = first.text().await.unwrap();
    let second = post(&c, &s, "{}")
        .header("idempotency-key", key)
        .send()
        .await
        .unwrap();
    let d = second.delivery().unwrap().clone();
    assert!(d.replayed && d.attempts == 1, "{d:?}");
    assert_eq!(second.text().await.unwrap(), body);
    assert_eq!(s.script.runs.lock().len(), 1);

    // A configured generator makes the keys (the server must accept them: opaque keys here
    // are refused by the UUID policy, which the caller sees as a typed refusal).
    let opaque = client(RetryMiddleware::new().key_generator(|| "order-17".into()));
    let e = post(&opaque, &s, "{}").send().await.unwrap_err();
    let error = ClientError::of(&e).unwrap();
    assert_eq!(error.key(), "order-17");
    assert_eq!(error.problem().unwrap().slug(), Some("key-invalid"));
    let bad = client(RetryMiddleware::new().key_generator(|| "a\nb".into()));
    let e = post(&bad, &s, "{}").send().await.unwrap_err();
    assert!(
        matches!(ClientError::of(&e), Some(ClientError::InvalidKey { .. })),
        "{e}"
    );
}

#[tokio::test]
async fn refusals_are_typed_and_never_retried() {
    let s = server(|c| c).await;
    let c = client(RetryMiddleware::new().policy(fast()));
    for (status, slug) in [
        (400, "bad"),
        (401, "unauthenticated"),
        (403, "forbidden"),
        (404, "missing"),
        (410, "gone"),
        (422, "invalid"),
        (500, "broken"),
    ] {
        let before = s.script.runs.lock().len();
        s.script.answers.lock().push_back(problem(status, slug));
        let e = post(&c, &s, "{}").send().await.unwrap_err();
        let Some(ClientError::Rejected {
            status: got,
            problem: Some(p),
            attempts: 1,
            key,
            ..
        }) = ClientError::of(&e)
        else {
            panic!("{status}: {e:?}");
        };
        assert_eq!(*got, status);
        assert_eq!(p.slug(), Some(slug));
        assert_eq!(p.detail.as_deref(), Some("do this"));
        assert_eq!(p.status, Some(status));
        assert_eq!(
            s.script.runs.lock().len(),
            before + 1,
            "{status} was retried"
        );
        assert_eq!(
            s.script.runs.lock().last().unwrap().0.as_deref(),
            Some(key.as_str())
        );
    }
    // The layer's own refusals: 413 (the body is over its 64-byte limit) and 422 key-reused.
    let e = post(&c, &s, &format!(r#"{{"pad":"{}"}}"#, "x".repeat(100)))
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        ClientError::of(&e).unwrap().problem().unwrap().slug(),
        Some("body-too-large")
    );
    let key = "0b7a1c9e-2d4f-4a6b-8c1e-3f5d7b9a1c2e";
    post(&c, &s, r#"{"a":1}"#)
        .header("idempotency-key", key)
        .send()
        .await
        .unwrap();
    let e = post(&c, &s, r#"{"a":2}"#)
        .header("idempotency-key", key)
        .send()
        .await
        .unwrap_err();
    let error = ClientError::of(&e).unwrap();
    assert_eq!(error.problem().unwrap().slug(), Some("key-reused"));
    assert_eq!(error.attempts(), 1);
    assert!(e.to_string().contains(key), "{e}");

    // An error status that is not problem+json is the application's: a response, as reqwest
    // gives it.
    s.script
        .answers
        .lock()
        .push_back((404, vec![], "no such thing".into()));
    let r = post(&c, &s, "{}").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.text().await.unwrap(), "no such thing");
}

#[tokio::test]
async fn retry_after_is_a_floor_in_seconds_and_dates() {
    let s = server(|c| c).await;
    let c = client(RetryMiddleware::new().policy(fast()));
    s.script
        .answers
        .lock()
        .push_back((429, vec![("retry-after", "1".into())], String::new()));
    let started = Instant::now();
    let r = post(&c, &s, "{}").send().await.unwrap();
    assert_eq!(r.delivery().unwrap().attempts, 2);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(2));
    s.script
        .answers
        .lock()
        .push_back((503, vec![("retry-after", date)], String::new()));
    let started = Instant::now();
    post(&c, &s, "{}").send().await.unwrap();
    // An HTTP date has whole seconds: at least one of the two is left.
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );

    // A floor past the time budget is not waited for: the call ends at once with its key.
    let c = client(RetryMiddleware::new().policy(fast().max_elapsed(Duration::from_secs(2))));
    s.script
        .answers
        .lock()
        .push_back((503, vec![("retry-after", "30".into())], String::new()));
    let started = Instant::now();
    let e = post(&c, &s, "{}").send().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    let Some(ClientError::Exhausted {
        attempts: 1,
        last:
            LastFailure::Status {
                status: 503,
                retry_after,
                ..
            },
        ..
    }) = ClientError::of(&e)
    else {
        panic!("{e:?}");
    };
    assert_eq!(*retry_after, Some(Duration::from_secs(30)));
}

#[tokio::test]
async fn a_request_in_flight_is_waited_for_and_replayed() {
    let s = server(|c| c).await;
    *s.script.delay.lock() = Duration::from_millis(600);
    let c = client(RetryMiddleware::new().policy(fast()));
    let key = "9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a";
    let first = tokio::spawn({
        let (c, url) = (c.clone(), format!("{}/orders", s.base));
        async move {
            c.post(url)
                .header("idempotency-key", key)
                .body("{}")
                .send()
                .await
                .unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = post(&c, &s, "{}")
        .header("content-type", "text/plain")
        .header("idempotency-key", key)
        .send()
        .await
        .unwrap();
    let d = second.delivery().unwrap().clone();
    assert!(d.replayed && d.attempts >= 2, "{d:?}");
    let first = first.await.unwrap();
    assert_eq!(first.text().await.unwrap(), second.text().await.unwrap());
    assert_eq!(s.script.runs.lock().len(), 1);
}

#[tokio::test]
async fn running_out_gives_the_key_to_retry_with_later() {
    let s = server(|c| c).await;
    let c = client(RetryMiddleware::new().policy(fast().max_attempts(3)));
    s.script
        .answers
        .lock()
        .extend(std::iter::repeat_n(problem(503, "down"), 3));
    let e = post(&c, &s, r#"{"n":1}"#).send().await.unwrap_err();
    let error = ClientError::of(&e).unwrap();
    let Some(ClientError::Exhausted {
        attempts: 3,
        last:
            LastFailure::Status {
                status: 503,
                problem: Some(p),
                ..
            },
        ..
    }) = Some(error)
    else {
        panic!("{e:?}");
    };
    assert_eq!(p.slug(), Some("down"));
    let key = error.key().to_owned();
    assert!(
        s.script
            .runs
            .lock()
            .iter()
            .all(|(k, _)| k.as_deref() == Some(key.as_str()))
    );
    // Later, by hand, with the same key: the operation runs (it never did), and a second try
    // gets its answer replayed.
    let r = post(&c, &s, r#"{"n":1}"#)
        .header("idempotency-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = post(&c, &s, r#"{"n":1}"#)
        .header("idempotency-key", &key)
        .send()
        .await
        .unwrap();
    assert!(r.delivery().unwrap().replayed);
    assert_eq!(s.script.runs.lock().len(), 4);

    // 500 is retried only when asked.
    s.script
        .answers
        .lock()
        .push_back((500, vec![], String::new()));
    assert_eq!(post(&c, &s, "{}").send().await.unwrap().status(), 500);
    let retrying = client(
        RetryMiddleware::new()
            .policy(fast())
            .retry_server_errors(true),
    );
    s.script
        .answers
        .lock()
        .push_back((500, vec![], String::new()));
    let r = post(&retrying, &s, "{}").send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.delivery().unwrap().attempts),
        (201, 2)
    );
}

#[tokio::test]
async fn a_streaming_body_is_refused_before_anything_is_sent() {
    let s = server(|c| c).await;
    let c = client(RetryMiddleware::new());
    let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"{}"))]);
    let e = post(&c, &s, "")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap_err();
    let Some(ClientError::BodyNotReplayable { key, .. }) = ClientError::of(&e) else {
        panic!("{e:?}");
    };
    assert!(!key.is_empty());
    assert!(e.to_string().contains("streaming body"), "{e}");
    assert!(s.script.runs.lock().is_empty());
}

/// A raw server that, for its first `bad` connections, reads the request and then closes
/// (after `answer_bytes` bytes of a response, at most all but its last 5: 0 = before any,
/// `usize::MAX` = in the middle of the body), and answers the rest with 201.
async fn misbehaving(bad: usize, answer_bytes: usize) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        for n in 0.. {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 8192];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let k = socket.read(&mut buf).await.unwrap();
                if k == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..k]);
            }
            let head = String::from_utf8_lossy(&got).to_lowercase();
            let key = head
                .lines()
                .find_map(|l| l.strip_prefix("idempotency-key: "))
                .unwrap_or_default()
                .to_owned();
            log.lock().push(key);
            let body = r#"{"order_id":"o-1"}"#;
            let answer = format!(
                "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            if n < bad {
                let cut = answer_bytes.min(answer.len() - 5);
                socket.write_all(&answer.as_bytes()[..cut]).await.unwrap();
                drop(socket);
                continue;
            }
            socket.write_all(answer.as_bytes()).await.unwrap();
        }
    });
    (base, seen)
}

#[tokio::test]
async fn a_connection_lost_before_or_during_the_answer_is_retried() {
    for cut_at in [0, 12, 90, usize::MAX] {
        let (base, seen) = misbehaving(2, cut_at).await;
        let c = client(RetryMiddleware::new().policy(fast()));
        let r = c
            .post(format!("{base}/orders"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.delivery().unwrap().attempts, 3, "cut at {cut_at}");
        assert_eq!(r.text().await.unwrap(), r#"{"order_id":"o-1"}"#);
        let seen = seen.lock().clone();
        assert_eq!(seen.len(), 3);
        assert!(
            seen.iter().all(|k| *k == seen[0] && !k.is_empty()),
            "{seen:?}"
        );
    }
    // Nothing listening: connect errors, retried, then the key comes back.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let c = client(RetryMiddleware::new().policy(fast().max_attempts(3)));
    let e = c
        .post(format!("http://127.0.0.1:{port}/orders"))
        .body("{}")
        .send()
        .await
        .unwrap_err();
    let Some(ClientError::Exhausted {
        attempts: 3,
        last: LastFailure::Transport(t),
        key,
        ..
    }) = ClientError::of(&e)
    else {
        panic!("{e:?}");
    };
    assert!(t.is_connect(), "{t}");
    assert!(e.to_string().contains(key.as_str()));
}

#[tokio::test]
async fn responses_over_the_limit() {
    // With a length over the limit: returned as it comes, unbuffered, still with its delivery.
    let s = server(|c| c).await;
    let c = client(RetryMiddleware::new().max_response_bytes(4));
    let r = post(&c, &s, "{}").send().await.unwrap();
    assert_eq!(r.delivery().unwrap().attempts, 1);
    assert_eq!(r.text().await.unwrap(), r#"{"run":1}"#);
    // Without a length, growing past it: an error with the key (the operation ran).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 8192];
        let _ = socket.read(&mut buf).await.unwrap();
        let answer = "HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n";
        socket.write_all(answer.as_bytes()).await.unwrap();
    });
    let e = c
        .post(format!("{base}/orders"))
        .body("{}")
        .send()
        .await
        .unwrap_err();
    let Some(ClientError::ResponseTooLarge {
        limit: 4,
        attempts: 1,
        status: 201,
        key,
    }) = ClientError::of(&e)
    else {
        panic!("{e:?}");
    };
    assert!(e.to_string().contains(key.as_str()));
}

/// Review defect: the application's 409 with `Retry-After` is stored and replayed; its replay
/// (`Idempotent-Replayed: true`) was retried until the attempts ran out and reported as
/// "may have run". A stored answer is returned after one retry.
#[tokio::test]
async fn a_replayed_answer_is_not_retried() {
    let s = server(|c| c).await;
    s.script
        .answers
        .lock()
        .push_back((409, vec![("retry-after", "0".into())], "taken".into()));
    let c = client(RetryMiddleware::new().policy(fast()));
    let r = post(&c, &s, "{}").send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.delivery().unwrap().attempts),
        (409, 2)
    );
    assert!(r.delivery().unwrap().replayed);
    assert_eq!(r.text().await.unwrap(), "taken");
    assert_eq!(s.script.runs.lock().len(), 1);
}

/// Review defect: a `Retry-After` too large for u64 was dropped, so the retry went out at once.
/// It is a wait past any budget: the call ends with its key, unretried.
#[tokio::test]
async fn a_retry_after_too_large_to_count_is_not_a_retry_at_once() {
    let s = server(|c| c).await;
    let huge = ("retry-after", "99999999999999999999".to_owned());
    s.script
        .answers
        .lock()
        .push_back((503, vec![huge], String::new()));
    let c = client(RetryMiddleware::new().policy(fast()));
    let e = post(&c, &s, "{}").send().await.unwrap_err();
    let Some(ClientError::Exhausted {
        attempts: 1,
        last: LastFailure::Status {
            retry_after: Some(wait),
            ..
        },
        ..
    }) = ClientError::of(&e)
    else {
        panic!("{e:?}");
    };
    assert_eq!(*wait, Duration::MAX);
    assert_eq!(s.script.runs.lock().len(), 1);
}

/// Review defect: a chunked 503 page longer than `max_response_bytes` ended the call with
/// `ResponseTooLarge` ("the operation ran"). The status decides a retry before any buffering.
#[tokio::test]
async fn a_retryable_status_with_a_long_unsized_body_is_retried() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let page = "x".repeat(100);
        let answers = [
            format!(
                "HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{page}\r\n0\r\n\r\n",
                page.len()
            ),
            "HTTP/1.1 201 Created\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok".into(),
        ];
        for answer in answers {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 8192];
            let _ = socket.read(&mut buf).await.unwrap();
            socket.write_all(answer.as_bytes()).await.unwrap();
            let _ = socket.shutdown().await;
        }
    });
    let c = client(RetryMiddleware::new().policy(fast()).max_response_bytes(16));
    let r = c
        .post(format!("{base}/orders"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), r.delivery().unwrap().attempts),
        (201, 2)
    );
}

/// Review defect: a caller's key of bytes that are not printable ASCII was sent, but reported
/// back (`ClientError::key`) as its lossy UTF-8 text, a different key. Now refused unsent.
#[tokio::test]
async fn a_caller_key_that_is_not_ascii_is_refused_unsent() {
    let s = server(|c| c).await;
    let c = client(RetryMiddleware::new().policy(fast()));
    let key = reqwest::header::HeaderValue::from_bytes(b"order-\xe9t\xe9-17").unwrap();
    let e = post(&c, &s, "{}")
        .header("idempotency-key", key)
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(ClientError::of(&e), Some(ClientError::InvalidKey { .. })),
        "{e:?}"
    );
    assert!(s.script.runs.lock().is_empty());
}

mod grpc {
    //! The gRPC layer against a tonic server behind the tonic idempotency layer.

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use idempotency_rs::client::RetryPolicy;
    use idempotency_rs::client::grpc::RetryLayer;
    use idempotency_rs::tonic_integration::{ClaimedKey, IdempotencyLayer};
    use idempotency_rs::{Engine, EngineConfig};
    use parking_lot::Mutex;
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

    /// The symbol picks the behaviour: `FLAKYn` fails UNAVAILABLE n times, `SLOW` takes
    /// 500 ms, `BAD` is INVALID_ARGUMENT, `DOWN` is always UNAVAILABLE with a 200 ms pushback.
    #[derive(Default)]
    struct Book {
        runs: AtomicUsize,
        keys: Mutex<Vec<String>>,
    }

    struct Svc(Arc<Book>);

    #[tonic::async_trait]
    impl Orders for Svc {
        async fn create_order(
            &self,
            request: Request<CreateOrderRequest>,
        ) -> Result<Response<Order>, Status> {
            let key = request
                .extensions()
                .get::<ClaimedKey>()
                .unwrap()
                .key()
                .as_str()
                .to_owned();
            let req = request.into_inner();
            let n = self.0.runs.fetch_add(1, Ordering::SeqCst) + 1;
            self.0.keys.lock().push(key);
            if let Some(times) = req.symbol.strip_prefix("FLAKY") {
                let failed = self.0.keys.lock().len();
                if failed <= times.parse::<usize>().unwrap() {
                    return Err(Status::unavailable("try again"));
                }
            }
            match req.symbol.as_str() {
                "SLOW" => tokio::time::sleep(Duration::from_millis(500)).await,
                "BAD" => return Err(Status::invalid_argument("bad symbol")),
                "ABORT" => return Err(Status::aborted("the application's own conflict")),
                "DOWN" => {
                    let mut s = Status::unavailable("down");
                    s.metadata_mut()
                        .insert("grpc-retry-pushback-ms", "200".parse().unwrap());
                    return Err(s);
                }
                _ => {}
            }
            Ok(Response::new(Order {
                order_id: format!("order-{n}"),
                symbol: req.symbol,
                quantity: req.quantity,
                price: req.price,
                status: "accepted".into(),
            }))
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

    type Client = OrdersClient<idempotency_rs::client::grpc::RetryService<Channel>>;

    async fn start() -> (Arc<Book>, Client, Engine) {
        start_with(|layer| layer).await
    }

    async fn start_with(
        configure: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer,
    ) -> (Arc<Book>, Client, Engine) {
        let engine = Engine::open_async(EngineConfig::in_memory()).await.unwrap();
        let book = Arc::new(Book::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let layer = configure(
            IdempotencyLayer::new(&engine)
                .method(CREATE)
                .require_key(true)
                .max_message_bytes(64),
        );
        let svc = OrdersServer::new(Svc(book.clone()));
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
                RetryPolicy::new().backoff(Duration::from_millis(1), Duration::from_millis(20)),
            ))
            .service(channel);
        (book, OrdersClient::new(channel), engine)
    }

    fn order(symbol: &str) -> Request<CreateOrderRequest> {
        Request::new(CreateOrderRequest {
            symbol: symbol.into(),
            quantity: 1,
            price: "1.00".into(),
        })
    }

    fn meta<'a>(m: &'a tonic::metadata::MetadataMap, name: &str) -> &'a str {
        m.get(name).unwrap().to_str().unwrap()
    }

    #[tokio::test]
    async fn unavailable_is_retried_with_one_key() {
        let (book, mut client, _e) = start().await;
        let r = client.create_order(order("FLAKY2")).await.unwrap();
        assert_eq!(meta(r.metadata(), "idempotency-attempts"), "3");
        let key = meta(r.metadata(), "idempotency-key").to_owned();
        assert!(uuid::Uuid::parse_str(&key).is_ok());
        assert_eq!(r.get_ref().order_id, "order-3");
        assert!(book.keys.lock().iter().all(|k| *k == key));
        // A key the caller set wins, and a second call with it is replayed.
        let mut again = order("PLAIN");
        again
            .metadata_mut()
            .insert("idempotency-key", key.parse().unwrap());
        let e = client.create_order(again).await.unwrap_err();
        assert_eq!(
            e.code(),
            Code::FailedPrecondition,
            "another message under the same key"
        );
        assert_eq!(meta(e.metadata(), "idempotency-attempts"), "1");
    }

    /// Review defect: a stored ABORTED (a server storing every outcome) came back replayed and
    /// was retried until the attempts ran out. A replay is the call's result.
    #[tokio::test]
    async fn a_replayed_aborted_is_not_retried() {
        let (book, mut client, _e) = start_with(|l| l.store_when(|_| true)).await;
        let e = client.create_order(order("ABORT")).await.unwrap_err();
        assert_eq!(e.code(), Code::Aborted);
        assert_eq!(book.runs.load(Ordering::SeqCst), 1);
        // The first ABORTED is retried (it may be "in flight"); its replay is not.
        assert_eq!(meta(e.metadata(), "idempotency-attempts"), "2");
    }

    #[tokio::test]
    async fn refusals_are_not_retried() {
        let (book, mut client, _e) = start().await;
        let e = client.create_order(order("BAD")).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(meta(e.metadata(), "idempotency-attempts"), "1");
        assert!(!meta(e.metadata(), "idempotency-key").is_empty());
        assert_eq!(book.runs.load(Ordering::SeqCst), 1);
        // Over the server's message limit: RESOURCE_EXHAUSTED with a "do not retry" pushback.
        let e = client
            .create_order(order(&"X".repeat(100)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert_eq!(meta(e.metadata(), "idempotency-attempts"), "1");
    }

    #[tokio::test]
    async fn in_flight_waits_for_the_pushback_and_replays() {
        let (book, client, _e) = start().await;
        let key = "3c2b1a09-8f7e-4d6c-9b5a-4e3d2c1b0a99";
        let mut first = order("SLOW");
        first
            .metadata_mut()
            .insert("idempotency-key", key.parse().unwrap());
        let mut c1 = client.clone();
        let first = tokio::spawn(async move { c1.create_order(first).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut second = order("SLOW");
        second
            .metadata_mut()
            .insert("idempotency-key", key.parse().unwrap());
        let r = client.clone().create_order(second).await.unwrap();
        assert_eq!(meta(r.metadata(), "idempotent-replayed"), "true");
        assert!(
            meta(r.metadata(), "idempotency-attempts")
                .parse::<u32>()
                .unwrap()
                >= 2
        );
        assert_eq!(
            first.await.unwrap().get_ref().order_id,
            r.get_ref().order_id
        );
        assert_eq!(book.runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_deadline_bounds_every_retry() {
        let (book, mut client, _e) = start().await;
        let mut request = order("DOWN");
        request.set_timeout(Duration::from_millis(700));
        let started = Instant::now();
        let e = client.create_order(request).await.unwrap_err();
        let took = started.elapsed();
        assert!(took < Duration::from_millis(900), "{took:?}");
        assert!(
            matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded),
            "{e:?}"
        );
        let runs = book.runs.load(Ordering::SeqCst);
        // 200 ms pushback each: at most 4 attempts fit in 700 ms.
        assert!((2..=4).contains(&runs), "{runs} runs");
        assert_eq!(meta(e.metadata(), "idempotency-attempts"), runs.to_string());
    }

    #[tokio::test]
    async fn a_server_not_yet_up_is_retried() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_lazy();
        let channel = tower::ServiceBuilder::new()
            .layer(
                RetryLayer::new().method(CREATE).policy(
                    RetryPolicy::new()
                        .max_attempts(3)
                        .backoff(Duration::from_millis(1), Duration::from_millis(5)),
                ),
            )
            .service(channel);
        let e = OrdersClient::new(channel)
            .create_order(order("PLAIN"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert_eq!(meta(e.metadata(), "idempotency-attempts"), "3");
        assert!(
            e.message().contains("retry it later with idempotency-key"),
            "{e:?}"
        );
    }
}
