//! The client half under a hostile network: the reqwest middleware and the tonic retry layer
//! against real servers (Axum behind `idempotency_layer`, tonic behind `IdempotencyLayer`)
//! through a fault-injecting TCP proxy written here, on 127.0.0.1:0. The proxy loses answers
//! after forwarding the request, cuts them in the head or body (HTTP/1) or after a given HTTP/2
//! frame, holds them past the client's timeout, stalls a body after its head, resets
//! connections, duplicates requests and answers 502/503 itself. Each test checks that the
//! handler ran once, that the caller got its own operation's answer (or a typed error with the
//! key), that every attempt carried one key, and that attempts are bounded and spaced as the
//! server asks.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
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
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------------
// The HTTP/1 proxy
// ---------------------------------------------------------------------------------------------

/// What the proxy does to one connection (the clients here open one connection per attempt).
#[derive(Clone, Debug)]
enum Fault {
    Pass,
    /// Forward the request, read the whole answer, close the client's side without a byte of
    /// it (a FIN, or a RST with `reset`).
    LoseAnswer {
        reset: bool,
    },
    /// Forward the request and close the client's side at once, keeping the server's side open
    /// until it answers (the handler is not cancelled; the client retries while it runs).
    LoseAnswerEarly,
    /// Forward, then pass the answer only up to the cut, and close.
    Cut(Cut),
    /// Forward, then hold the whole answer this long before passing it.
    Delay(Duration),
    /// Forward, pass the head of the answer, then hold the body back for 30 s.
    StallBody,
    /// Reset the connection before forwarding anything: the server never sees the request.
    ResetUnsent,
    /// Answer `raw` itself: after forwarding the request (its answer discarded) when `forward`;
    /// with `stall`, keep the connection open 30 s after writing it.
    Own {
        raw: String,
        forward: bool,
        stall: bool,
    },
    /// Send the request twice to the server, on two connections at once; pass the first answer.
    Duplicate,
}

#[derive(Clone, Copy, Debug)]
enum Cut {
    /// In the middle of the status line and headers.
    MidHead,
    /// Right after the blank line ending the head.
    AfterHead,
    /// After half of the body.
    MidBody,
}

/// One connection as the proxy saw it.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    method: String,
    key: Option<String>,
    /// The server's answers to it (two for a duplicate), with when they came and their
    /// `Retry-After`.
    answers: Vec<(u16, Instant, Option<u64>)>,
}

#[derive(Clone)]
struct Proxy {
    addr: SocketAddr,
    plan: Arc<Mutex<VecDeque<Fault>>>,
    default: Arc<Mutex<Fault>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Proxy {
            addr: listener.local_addr().unwrap(),
            plan: Arc::default(),
            default: Arc::new(Mutex::new(Fault::Pass)),
            seen: Arc::default(),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let fault = p
                    .plan
                    .lock()
                    .pop_front()
                    .unwrap_or_else(|| p.default.lock().clone());
                let seen = p.seen.clone();
                tokio::spawn(async move {
                    let _ = serve(client, upstream, fault, seen).await;
                });
            }
        });
        proxy
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn plan(&self, faults: impl IntoIterator<Item = Fault>) {
        self.plan.lock().extend(faults);
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }

    fn clear(&self) {
        self.seen.lock().clear();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads one HTTP/1 message (a request, or an answer framed by `Content-Length` or chunked).
/// `None` when the peer closed before a whole head.
async fn read_message(s: &mut TcpStream) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = find(&got, b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..head_end]).into_owned();
    if let Some(len) = header(&head, "content-length") {
        let len: usize = len.parse().unwrap();
        while got.len() < head_end + len {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    } else if header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        while !got[head_end..].ends_with(b"0\r\n\r\n") {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    }
    Ok(Some((head, got)))
}

fn status_of(head: &str) -> u16 {
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn exchange(upstream: SocketAddr, request: &[u8]) -> std::io::Result<(String, Vec<u8>)> {
    let mut server = TcpStream::connect(upstream).await?;
    server.write_all(request).await?;
    read_message(&mut server)
        .await?
        .ok_or_else(|| std::io::Error::other("the server closed without answering"))
}

fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    fault: Fault,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> std::io::Result<()> {
    let Some((head, request)) = read_message(&mut client).await? else {
        return Ok(());
    };
    let index = {
        let mut seen = seen.lock();
        seen.push(Seen {
            at: Instant::now(),
            method: head
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned(),
            key: header(&head, "idempotency-key").map(str::to_owned),
            answers: Vec::new(),
        });
        seen.len() - 1
    };
    let note = |answer: &(String, Vec<u8>)| {
        let ra = header(&answer.0, "retry-after").and_then(|v| v.parse().ok());
        seen.lock()[index]
            .answers
            .push((status_of(&answer.0), Instant::now(), ra));
    };
    match fault {
        Fault::ResetUnsent => {
            reset(client);
            return Ok(());
        }
        Fault::LoseAnswerEarly => {
            let mut server = TcpStream::connect(upstream).await?;
            server.write_all(&request).await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
            reset(client);
            if let Some(answer) = read_message(&mut server).await? {
                note(&answer);
            }
            return Ok(());
        }
        Fault::Own {
            raw,
            forward,
            stall,
        } => {
            if forward {
                let answer = exchange(upstream, &request).await?;
                note(&answer);
            }
            client.write_all(raw.as_bytes()).await?;
            if stall {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            return Ok(());
        }
        Fault::Duplicate => {
            let (a, b) = tokio::join!(exchange(upstream, &request), async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                exchange(upstream, &request).await
            });
            let (a, b) = (a?, b?);
            note(&a);
            note(&b);
            client.write_all(&a.1).await?;
            return Ok(());
        }
        _ => {}
    }
    let answer = exchange(upstream, &request).await?;
    note(&answer);
    let (head, bytes) = answer;
    match fault {
        Fault::Pass => client.write_all(&bytes).await?,
        Fault::LoseAnswer { reset: true } => reset(client),
        Fault::LoseAnswer { reset: false } => drop(client),
        Fault::Cut(cut) => {
            let at = match cut {
                Cut::MidHead => head.len() / 2,
                Cut::AfterHead => head.len(),
                Cut::MidBody => head.len() + (bytes.len() - head.len()) / 2,
            };
            assert!(at < bytes.len(), "a cut past the end of the answer");
            client.write_all(&bytes[..at]).await?;
            client.flush().await?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Fault::Delay(d) => {
            tokio::time::sleep(d).await;
            client.write_all(&bytes).await?;
        }
        Fault::StallBody => {
            client.write_all(&bytes[..head.len()]).await?;
            client.flush().await?;
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        _ => unreachable!(),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The HTTP server and client
// ---------------------------------------------------------------------------------------------

/// Each run of the handler: its key and body.
#[derive(Default)]
struct Runs(Mutex<Vec<(Option<String>, String)>>);

impl Runs {
    fn count(&self) -> usize {
        self.0.lock().len()
    }
    fn with_body(&self, body: &str) -> usize {
        self.0.lock().iter().filter(|(_, b)| b == body).count()
    }
}

/// Answers 201 `{"run":n,"body":<the body>}`; a body with `slow` takes 1.2 s, one with
/// `chunked` is answered with a chunked (streamed) body.
async fn handler(
    State(runs): State<Arc<Runs>>,
    method: axum::http::Method,
    headers: HeaderMap,
    body: String,
) -> Response {
    let key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap().to_owned());
    let n = {
        let mut runs = runs.0.lock();
        runs.push((key, body.clone()));
        runs.len()
    };
    if body.contains("slow") {
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    let text = format!(
        r#"{{"run":{n},"method":"{method}","body":{}}}"#,
        serde_json::to_string(&body).unwrap()
    );
    if body.contains("chunked") {
        let half = text.len() / 2;
        let parts: Vec<Result<String, std::io::Error>> =
            vec![Ok(text[..half].to_owned()), Ok(text[half..].to_owned())];
        return (
            StatusCode::CREATED,
            [("content-type", "application/json")],
            axum::body::Body::from_stream(futures_util::stream::iter(parts)),
        )
            .into_response();
    }
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        text,
    )
        .into_response()
}

struct Server {
    proxy: Proxy,
    runs: Arc<Runs>,
    _engine: Engine,
}

async fn server() -> Server {
    let engine = Engine::open_async(EngineConfig::in_memory()).await.unwrap();
    let runs = Arc::new(Runs::default());
    let app = Router::new()
        .route(
            "/orders",
            routing::post(handler).put(handler).patch(handler),
        )
        .route_layer(idempotency_layer(&engine))
        .with_state(runs.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server {
        proxy: Proxy::start(addr).await,
        runs,
        _engine: engine,
    }
}

fn fast() -> RetryPolicy {
    RetryPolicy::new().backoff(Duration::from_millis(1), Duration::from_millis(20))
}

/// A connection per request (no pool), so that the proxy's plan is one fault per attempt.
fn client_with(middleware: RetryMiddleware, timeout: Option<Duration>) -> ClientWithMiddleware {
    let mut builder = reqwest::Client::builder().pool_max_idle_per_host(0);
    if let Some(t) = timeout {
        builder = builder.timeout(t);
    }
    reqwest_middleware::ClientBuilder::new(builder.build().unwrap())
        .with(middleware)
        .build()
}

fn client(middleware: RetryMiddleware) -> ClientWithMiddleware {
    client_with(middleware, None)
}

fn post(c: &ClientWithMiddleware, s: &Server, body: &str) -> reqwest_middleware::RequestBuilder {
    c.post(s.proxy.url("/orders"))
        .header("content-type", "application/json")
        .body(body.to_owned())
}

fn body_of(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not the JSON answer ({e}): {text:?}"))
}

/// Every connection the proxy saw carried `key`.
fn assert_one_key(seen: &[Seen], key: &str) {
    assert!(
        seen.iter().all(|s| s.key.as_deref() == Some(key)),
        "attempts carried other keys than {key}: {:?}",
        seen.iter().map(|s| &s.key).collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP tests
// ---------------------------------------------------------------------------------------------

/// The answer is lost after the handler ran, twice (a FIN, then a RST): the third attempt gets
/// the stored answer, the handler ran once.
#[tokio::test]
async fn http_an_answer_lost_after_the_handler_ran_is_replayed_not_rerun() {
    let s = server().await;
    s.proxy.plan([
        Fault::LoseAnswer { reset: false },
        Fault::LoseAnswer { reset: true },
    ]);
    let c = client(RetryMiddleware::new().policy(fast()));
    let r = post(&c, &s, r#"{"op":"lost"}"#).send().await.unwrap();
    let d = r.delivery().unwrap().clone();
    assert_eq!(r.status(), 201);
    assert_eq!((d.attempts, d.replayed), (3, true), "{d:?}");
    let body = body_of(&r.text().await.unwrap());
    assert_eq!(body["body"], r#"{"op":"lost"}"#);
    assert_eq!(body["run"], 1);
    assert_eq!(s.runs.count(), 1, "the handler ran more than once");
    let seen = s.proxy.seen();
    assert_eq!(seen.len(), 3);
    assert_one_key(&seen, &d.key);
    assert_eq!(
        seen.iter().map(|s| s.answers[0].0).collect::<Vec<_>>(),
        [201, 201, 201]
    );
}

/// Cut in the head, right after it, and in the middle of the body (fixed length and chunked):
/// the half answer never reaches the caller; the retry gets the whole stored one.
#[tokio::test]
async fn http_an_answer_cut_mid_response_is_retried_and_replayed_whole() {
    let s = server().await;
    let c = client(RetryMiddleware::new().policy(fast()));
    for (i, (cut, chunked)) in [
        (Cut::MidHead, false),
        (Cut::AfterHead, false),
        (Cut::MidBody, false),
        (Cut::AfterHead, true),
        (Cut::MidBody, true),
    ]
    .into_iter()
    .enumerate()
    {
        s.proxy.clear();
        s.proxy.plan([Fault::Cut(cut)]);
        let payload = if chunked {
            format!(r#"{{"op":{i},"chunked":true}}"#)
        } else {
            format!(r#"{{"op":{i}}}"#)
        };
        let r = post(&c, &s, &payload).send().await.unwrap();
        let d = r.delivery().unwrap().clone();
        assert_eq!(
            (d.attempts, d.replayed),
            (2, true),
            "{cut:?}/{chunked}: {d:?}"
        );
        let body = body_of(&r.text().await.unwrap());
        assert_eq!(
            body["body"],
            payload.as_str(),
            "{cut:?}: another operation's answer"
        );
        assert_eq!(
            s.runs.with_body(&payload),
            1,
            "{cut:?}: the handler ran again"
        );
        assert_one_key(&s.proxy.seen(), &d.key);
    }
    assert_eq!(s.runs.count(), 5);
}

/// The answer is held past reqwest's timeout: the retry gets it replayed.
#[tokio::test]
async fn http_an_answer_held_past_the_client_timeout_is_replayed() {
    let s = server().await;
    s.proxy.plan([Fault::Delay(Duration::from_millis(1500))]);
    let c = client_with(
        RetryMiddleware::new().policy(fast()),
        Some(Duration::from_millis(400)),
    );
    let started = Instant::now();
    let r = post(&c, &s, r#"{"op":"held"}"#).send().await.unwrap();
    let d = r.delivery().unwrap().clone();
    assert_eq!((d.attempts, d.replayed), (2, true), "{d:?}");
    assert!(started.elapsed() < Duration::from_millis(1400));
    assert_eq!(body_of(&r.text().await.unwrap())["run"], 1);
    assert_eq!(s.runs.count(), 1);
    assert_one_key(&s.proxy.seen(), &d.key);
}

/// reqwest's own timeout covers the body: a body that stalls after the head is retried.
#[tokio::test]
async fn http_the_client_timeout_ends_a_stalled_body_and_the_retry_replays() {
    let s = server().await;
    s.proxy.plan([Fault::StallBody]);
    let c = client_with(
        RetryMiddleware::new().policy(fast()),
        Some(Duration::from_millis(400)),
    );
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        post(&c, &s, r#"{"op":"stalled"}"#).send(),
    )
    .await
    .expect("hung on a stalled body despite reqwest's timeout")
    .unwrap();
    let d = r.delivery().unwrap().clone();
    assert_eq!((d.attempts, d.replayed), (2, true), "{d:?}");
    assert_eq!(s.runs.count(), 1);
}

/// `attempt_timeout` promises "the longest one attempt may take, to the end of its answer's
/// body". The head of a 201 arrives, then the body stalls: the attempt must end at the limit
/// and be retried.
#[tokio::test]
async fn http_attempt_timeout_ends_an_attempt_whose_body_stalls() {
    let s = server().await;
    s.proxy.plan([Fault::StallBody]);
    let limit = Duration::from_millis(300);
    let c = client(RetryMiddleware::new().policy(fast()).attempt_timeout(limit));
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(4),
        post(&c, &s, r#"{"op":"stall-201"}"#).send(),
    )
    .await;
    let Ok(result) = outcome else {
        panic!(
            "DEFECT: attempt_timeout({limit:?}) did not end an attempt whose answer's head came \
             and whose body stalled: the call still hung after {:?} ({} attempt(s) seen)",
            started.elapsed(),
            s.proxy.seen().len()
        );
    };
    let r = result.unwrap();
    assert_eq!(r.delivery().unwrap().attempts, 2);
    assert_eq!(s.runs.count(), 1);
}

/// The same for an answer that is retried by its status: a 503 whose body stalls.
#[tokio::test]
async fn http_attempt_timeout_ends_a_503_whose_body_stalls() {
    let s = server().await;
    s.proxy.plan([Fault::Own {
        raw: "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
              content-length: 100\r\n\r\nbusy"
            .into(),
        forward: false,
        stall: true,
    }]);
    let limit = Duration::from_millis(300);
    let c = client(RetryMiddleware::new().policy(fast()).attempt_timeout(limit));
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_secs(4),
        post(&c, &s, r#"{"op":"stall-503"}"#).send(),
    )
    .await;
    let Ok(result) = outcome else {
        panic!(
            "DEFECT: attempt_timeout({limit:?}) did not end an attempt answered 503 whose body \
             stalled (read for its problem): the call still hung after {:?}",
            started.elapsed()
        );
    };
    let r = result.unwrap();
    assert_eq!(r.delivery().unwrap().attempts, 2);
    assert_eq!(s.runs.count(), 1);
}

/// `attempt_timeout` does end attempts whose answer's head never comes: the call ends after
/// `max_attempts`, with `TimedOut` and the key; the handler ran once.
#[tokio::test]
async fn http_attempt_timeout_ends_attempts_whose_head_never_comes() {
    let s = server().await;
    *s.proxy.default.lock() = Fault::Delay(Duration::from_secs(3));
    let limit = Duration::from_millis(200);
    let c = client(
        RetryMiddleware::new()
            .policy(fast().max_attempts(3))
            .attempt_timeout(limit),
    );
    let started = Instant::now();
    let e = post(&c, &s, r#"{"op":"headless"}"#)
        .send()
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(1500));
    let Some(ClientError::Exhausted {
        attempts: 3,
        last: LastFailure::TimedOut(l),
        key,
        ..
    }) = ClientError::of(&e)
    else {
        panic!("{e:?}");
    };
    assert_eq!(*l, limit);
    let seen = s.proxy.seen();
    assert_eq!(seen.len(), 3);
    assert_one_key(&seen, key);
    assert_eq!(s.runs.count(), 1);
}

/// The answer is lost while the handler still runs: the immediate retry meets the 409
/// in-flight, waits at least its `Retry-After`, and gets the one result replayed.
#[tokio::test]
async fn http_a_retry_while_the_handler_runs_waits_for_retry_after_and_replays() {
    let s = server().await;
    s.proxy.plan([Fault::LoseAnswerEarly]);
    let c = client(RetryMiddleware::new().policy(fast()));
    let r = post(&c, &s, r#"{"op":"slow"}"#).send().await.unwrap();
    let d = r.delivery().unwrap().clone();
    assert!(d.replayed, "{d:?}");
    assert_eq!(body_of(&r.text().await.unwrap())["run"], 1);
    assert_eq!(s.runs.count(), 1);
    let seen = s.proxy.seen();
    assert_one_key(&seen, &d.key);
    let in_flight: Vec<_> = seen
        .iter()
        .enumerate()
        .filter(|(_, s)| s.answers.first().is_some_and(|a| a.0 == 409))
        .collect();
    assert!(!in_flight.is_empty(), "no 409 in flight was met: {seen:?}");
    for (i, s409) in in_flight {
        let (_, answered, ra) = s409.answers[0];
        let ra = Duration::from_secs(ra.expect("a 409 in flight without Retry-After"));
        let next = seen.get(i + 1).expect("no attempt after a 409").at;
        assert!(
            next.duration_since(answered) >= ra,
            "retried {:?} after a 409 with Retry-After {ra:?}",
            next.duration_since(answered)
        );
    }
}

/// The proxy forwards, then answers 502 itself (the operation ran); then 503 with
/// `Retry-After: 1`. The handler runs once; the third attempt gets the replay, a second after
/// the 503.
#[tokio::test]
async fn http_a_proxys_own_502_and_503_after_forwarding_are_retried_to_the_replay() {
    let s = server().await;
    s.proxy.plan([
        Fault::Own {
            raw: "HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n".into(),
            forward: true,
            stall: false,
        },
        Fault::Own {
            raw: "HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n"
                .into(),
            forward: true,
            stall: false,
        },
    ]);
    let c = client(RetryMiddleware::new().policy(fast()));
    let r = post(&c, &s, r#"{"op":"gateway"}"#).send().await.unwrap();
    let d = r.delivery().unwrap().clone();
    assert_eq!((d.attempts, d.replayed), (3, true), "{d:?}");
    assert_eq!(body_of(&r.text().await.unwrap())["run"], 1);
    assert_eq!(s.runs.count(), 1);
    let seen = s.proxy.seen();
    assert_one_key(&seen, &d.key);
    let gap = seen[2].at.duration_since(seen[1].answers[0].1);
    assert!(
        gap >= Duration::from_secs(1),
        "503 Retry-After: 1 not obeyed: {gap:?}"
    );
}

/// The proxy sends the request twice at once: the handler runs once and the caller gets its
/// operation's answer.
#[tokio::test]
async fn http_a_duplicated_request_runs_once() {
    let s = server().await;
    let c = client(RetryMiddleware::new().policy(fast()));
    for i in 0..5 {
        s.proxy.clear();
        s.proxy.plan([Fault::Duplicate]);
        let payload = format!(r#"{{"op":"dup-{i}"}}"#);
        let r = post(&c, &s, &payload).send().await.unwrap();
        let d = r.delivery().unwrap().clone();
        let body = body_of(&r.text().await.unwrap());
        assert_eq!(body["body"], payload.as_str());
        assert_eq!(s.runs.with_body(&payload), 1, "duplicate ran twice");
        let seen = s.proxy.seen();
        assert_one_key(&seen, &d.key);
        assert_eq!(seen[0].answers.len(), 2);
    }
    assert_eq!(s.runs.count(), 5);
}

/// Every answer is lost: the call ends after exactly `max_attempts` attempts, with its key;
/// the handler ran once; a call later with that key gets the one result.
#[tokio::test]
async fn http_a_network_that_always_loses_the_answer_is_tried_a_bounded_number_of_times() {
    let s = server().await;
    *s.proxy.default.lock() = Fault::LoseAnswer { reset: true };
    let c = client(RetryMiddleware::new().policy(fast().max_attempts(4)));
    let e = post(&c, &s, r#"{"op":"doomed"}"#).send().await.unwrap_err();
    let Some(ClientError::Exhausted {
        attempts: 4,
        last: LastFailure::Transport(_),
        key,
        ..
    }) = ClientError::of(&e)
    else {
        panic!("{e:?}");
    };
    let key = key.clone();
    let seen = s.proxy.seen();
    assert_eq!(seen.len(), 4, "attempts not bounded by max_attempts");
    assert_one_key(&seen, &key);
    assert_eq!(s.runs.count(), 1);
    *s.proxy.default.lock() = Fault::Pass;
    let r = post(&c, &s, r#"{"op":"doomed"}"#)
        .header("idempotency-key", &key)
        .send()
        .await
        .unwrap();
    assert!(r.delivery().unwrap().replayed);
    assert_eq!(body_of(&r.text().await.unwrap())["run"], 1);
    assert_eq!(s.runs.count(), 1);

    // Every answer held past the timeout: the time budget ends it.
    s.proxy.clear();
    *s.proxy.default.lock() = Fault::Delay(Duration::from_secs(2));
    let c = client_with(
        RetryMiddleware::new().policy(
            fast()
                .max_attempts(1000)
                .max_elapsed(Duration::from_millis(700)),
        ),
        Some(Duration::from_millis(200)),
    );
    let started = Instant::now();
    let e = post(&c, &s, r#"{"op":"budget"}"#).send().await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(ClientError::of(&e), Some(ClientError::Exhausted { .. })),
        "{e:?}"
    );
    assert!(took < Duration::from_millis(1500), "{took:?}");
    let n = s.proxy.seen().len();
    assert!((2..=6).contains(&n), "{n} attempts within a 700 ms budget");
}

/// 20 operations at once while the proxy loses, cuts, resets, duplicates and answers 502 for
/// half the connections: each caller gets its own operation's answer, each handler ran once.
#[tokio::test]
async fn http_concurrent_operations_under_mixed_faults_each_get_their_own_answer() {
    let s = server().await;
    for _ in 0..4 {
        s.proxy.plan([
            Fault::LoseAnswer { reset: true },
            Fault::Pass,
            Fault::Cut(Cut::MidBody),
            Fault::Pass,
            Fault::ResetUnsent,
            Fault::Duplicate,
            Fault::Own {
                raw: "HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n".into(),
                forward: true,
                stall: false,
            },
            Fault::Pass,
        ]);
    }
    let c = client(RetryMiddleware::new().policy(fast()));
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let c = c.clone();
            let url = s.proxy.url("/orders");
            tokio::spawn(async move {
                let payload = format!(r#"{{"op":"burst-{i}"}}"#);
                let r = c.post(url).body(payload.clone()).send().await;
                (payload, r)
            })
        })
        .collect();
    for call in calls {
        let (payload, r) = call.await.unwrap();
        let r = r.unwrap_or_else(|e| panic!("{payload}: {e}"));
        let key = r.delivery().unwrap().key.clone();
        let body = body_of(&r.text().await.unwrap());
        assert_eq!(body["body"], payload.as_str(), "another operation's answer");
        let run = usize::try_from(body["run"].as_u64().unwrap()).unwrap();
        assert_eq!(s.runs.0.lock()[run - 1].0.as_deref(), Some(key.as_str()));
        assert_eq!(
            s.runs.with_body(&payload),
            1,
            "{payload} ran more than once"
        );
    }
    assert_eq!(s.runs.count(), 20);
}

/// A refusal is never retried: the 422 of a key reused with another body, the 400 of a key
/// the server will not take. Each costs one connection and never runs the handler. A 422 whose
/// answer is cut is sent again (the answer was lost), and is still refused.
#[tokio::test]
async fn http_refusals_through_the_network_are_not_retried() {
    let s = server().await;
    let c = client(RetryMiddleware::new().policy(fast()));
    let key = "4a1b2c3d-5e6f-4a7b-8c9d-0e1f2a3b4c5d";
    post(&c, &s, r#"{"a":1}"#)
        .header("idempotency-key", key)
        .send()
        .await
        .unwrap();
    s.proxy.clear();
    let e = post(&c, &s, r#"{"a":2}"#)
        .header("idempotency-key", key)
        .send()
        .await
        .unwrap_err();
    let err = ClientError::of(&e).unwrap();
    assert!(
        matches!(
            err,
            ClientError::Rejected {
                status: 422,
                attempts: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.key(), key);
    assert_eq!(s.proxy.seen().len(), 1, "a 422 was retried");

    s.proxy.clear();
    let e = post(&c, &s, r#"{"a":3}"#)
        .header("idempotency-key", "not a uuid")
        .send()
        .await
        .unwrap_err();
    let err = ClientError::of(&e).unwrap();
    assert!(
        matches!(
            err,
            ClientError::Rejected {
                status: 400,
                attempts: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(s.proxy.seen().len(), 1, "a 400 was retried");

    s.proxy.clear();
    s.proxy.plan([Fault::Cut(Cut::MidBody)]);
    let e = post(&c, &s, r#"{"a":2}"#)
        .header("idempotency-key", key)
        .send()
        .await
        .unwrap_err();
    let err = ClientError::of(&e).unwrap();
    assert!(
        matches!(
            err,
            ClientError::Rejected {
                status: 422,
                attempts: 2,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(s.proxy.seen().len(), 2);
    assert_eq!(s.runs.count(), 1);
}

/// The caller's key is the one every attempt carries, through a reset before forwarding, a lost
/// answer and a cut one.
#[tokio::test]
async fn http_the_callers_key_is_kept_through_every_fault() {
    let s = server().await;
    s.proxy.plan([
        Fault::ResetUnsent,
        Fault::LoseAnswer { reset: false },
        Fault::Cut(Cut::AfterHead),
    ]);
    let key = "7e6d5c4b-3a29-4817-9f6e-5d4c3b2a1908";
    let c = client(RetryMiddleware::new().policy(fast()));
    let r = post(&c, &s, r#"{"op":"mine"}"#)
        .header("Idempotency-Key", key)
        .send()
        .await
        .unwrap();
    let d = r.delivery().unwrap().clone();
    assert_eq!(d.key, key);
    assert_eq!((d.attempts, d.replayed), (4, true), "{d:?}");
    assert_one_key(&s.proxy.seen(), key);
    assert_eq!(
        s.runs.0.lock().clone(),
        [(Some(key.to_owned()), r#"{"op":"mine"}"#.to_owned())]
    );
}

/// Methods the middleware does not cover pass through: no key, no retry, even when the answer
/// is lost after the handler ran, or a proxy answers 503; a streaming body goes out once.
#[tokio::test]
async fn http_an_uncovered_request_is_never_retried_blindly() {
    let s = server().await;
    let c = client(RetryMiddleware::new().policy(fast()));
    s.proxy.plan([Fault::LoseAnswer { reset: false }]);
    let e = c
        .put(s.proxy.url("/orders"))
        .body("{}")
        .send()
        .await
        .unwrap_err();
    assert!(ClientError::of(&e).is_none(), "{e:?}");
    assert_eq!(s.proxy.seen().len(), 1, "an uncovered PUT was retried");
    assert_eq!(s.proxy.seen()[0].key, None);
    assert_eq!(s.proxy.seen()[0].method, "PUT");
    assert_eq!(s.runs.count(), 1);

    s.proxy.clear();
    let only_patch = client(
        RetryMiddleware::new()
            .policy(fast())
            .methods([http::Method::PATCH]),
    );
    s.proxy.plan([Fault::Own {
        raw: "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n".into(),
        forward: true,
        stall: false,
    }]);
    let r = only_patch
        .post(s.proxy.url("/orders"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.delivery().is_none());
    assert_eq!(s.proxy.seen().len(), 1, "an uncovered POST was retried");
    assert_eq!(s.runs.count(), 2);

    s.proxy.clear();
    let stream =
        futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"{}"))]);
    let r = c
        .put(s.proxy.url("/orders"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(s.proxy.seen().len(), 1);
    assert_eq!(s.runs.count(), 3);
}

// ---------------------------------------------------------------------------------------------
// gRPC
// ---------------------------------------------------------------------------------------------

mod grpc {
    use super::*;

    use std::sync::atomic::{AtomicUsize, Ordering};

    use idempotency_rs::client::grpc::RetryLayer;
    use idempotency_rs::tonic_integration::{ClaimedKey, IdempotencyLayer};
    use tonic::transport::Channel;
    use tonic::transport::server::TcpIncoming;
    use tonic::{Code, Request, Status};

    #[allow(unreachable_pub, missing_docs, clippy::all, clippy::pedantic)]
    mod orders {
        include!("../examples/generated/orders.rs");
    }
    use orders::orders_client::OrdersClient;
    use orders::orders_server::{Orders, OrdersServer};
    use orders::{CreateOrderRequest, Order, OrderUpdate, WatchOrderRequest};

    const CREATE: &str = "/orders.Orders/CreateOrder";

    /// What the HTTP/2 proxy does to one answer, at its first HEADERS frame from the server:
    /// by then the handler has run and its result is stored. Each answer takes the next fault
    /// of the plan (the default when it is empty).
    #[derive(Clone, Debug)]
    enum H2Fault {
        Pass,
        /// Close the connection (both sides) instead of passing that frame.
        LoseAnswer,
        /// Pass the answer's frames up to and including the first of this type, then close the
        /// connection: 1 = right after the HEADERS, 0 = after a DATA frame, before the
        /// trailers.
        CutAfter(u8),
        /// Hold that frame, and everything after it, this long.
        Delay(Duration),
    }

    #[derive(Clone)]
    struct H2Proxy {
        addr: SocketAddr,
        plan: Arc<Mutex<VecDeque<H2Fault>>>,
        default: Arc<Mutex<H2Fault>>,
        connections: Arc<AtomicUsize>,
    }

    impl H2Proxy {
        async fn start(upstream: SocketAddr) -> H2Proxy {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let p = H2Proxy {
                addr: listener.local_addr().unwrap(),
                plan: Arc::default(),
                default: Arc::new(Mutex::new(H2Fault::Pass)),
                connections: Arc::default(),
            };
            let q = p.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    q.connections.fetch_add(1, Ordering::SeqCst);
                    let (plan, default) = (q.plan.clone(), q.default.clone());
                    tokio::spawn(async move {
                        let _ = h2_serve(client, upstream, plan, default).await;
                    });
                }
            });
            p
        }
    }

    async fn h2_serve(
        client: TcpStream,
        upstream: SocketAddr,
        plan: Arc<Mutex<VecDeque<H2Fault>>>,
        default: Arc<Mutex<H2Fault>>,
    ) -> std::io::Result<()> {
        let server = TcpStream::connect(upstream).await?;
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let up = tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
        let down = async {
            let mut answered = std::collections::HashSet::new();
            let mut cutting: Option<(u32, u8)> = None;
            loop {
                let mut head = [0u8; 9];
                sr.read_exact(&mut head).await?;
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let ty = head[3];
                let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                let mut payload = vec![0u8; len];
                sr.read_exact(&mut payload).await?;
                // The first HEADERS of a stream from the server: the answer begins.
                if stream != 0 && ty == 1 && answered.insert(stream) {
                    let fault = plan
                        .lock()
                        .pop_front()
                        .unwrap_or_else(|| default.lock().clone());
                    match fault {
                        H2Fault::Pass => {}
                        H2Fault::LoseAnswer => return Ok(()),
                        H2Fault::Delay(d) => tokio::time::sleep(d).await,
                        H2Fault::CutAfter(t) => cutting = Some((stream, t)),
                    }
                }
                cw.write_all(&head).await?;
                cw.write_all(&payload).await?;
                if cutting == Some((stream, ty)) {
                    cw.flush().await?;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    return Ok(());
                }
            }
        };
        let r: std::io::Result<()> = down.await;
        up.abort();
        r
    }

    #[derive(Default)]
    struct Book {
        keys: Mutex<Vec<String>>,
    }

    struct Svc(Arc<Book>);

    #[tonic::async_trait]
    impl Orders for Svc {
        async fn create_order(
            &self,
            request: Request<CreateOrderRequest>,
        ) -> Result<tonic::Response<Order>, Status> {
            let key = request
                .extensions()
                .get::<ClaimedKey>()
                .unwrap()
                .key()
                .as_str()
                .to_owned();
            let req = request.into_inner();
            let n = {
                let mut keys = self.0.keys.lock();
                keys.push(key);
                keys.len()
            };
            Ok(tonic::Response::new(Order {
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
        ) -> Result<tonic::Response<Self::WatchOrderStream>, Status> {
            Err(Status::unimplemented("not here"))
        }
    }

    type Client = OrdersClient<idempotency_rs::client::grpc::RetryService<Channel>>;

    async fn start(policy: RetryPolicy) -> (Arc<Book>, H2Proxy, Client, Engine) {
        let engine = Engine::open_async(EngineConfig::in_memory()).await.unwrap();
        let book = Arc::new(Book::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let layer = IdempotencyLayer::new(&engine)
            .method(CREATE)
            .require_key(true);
        let svc = OrdersServer::new(Svc(book.clone()));
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .layer(layer)
                .add_service(svc)
                .serve_with_incoming(TcpIncoming::from(listener))
                .await
        });
        let proxy = H2Proxy::start(addr).await;
        let channel = Channel::from_shared(format!("http://{}", proxy.addr))
            .unwrap()
            .connect_lazy();
        let channel = tower::ServiceBuilder::new()
            .layer(RetryLayer::new().method(CREATE).policy(policy))
            .service(channel);
        (book, proxy, OrdersClient::new(channel), engine)
    }

    fn order(symbol: &str) -> Request<CreateOrderRequest> {
        Request::new(CreateOrderRequest {
            symbol: symbol.into(),
            quantity: 1,
            price: "1.00".into(),
        })
    }

    fn meta(m: &tonic::metadata::MetadataMap, name: &str) -> String {
        m.get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }

    /// The connection is dropped before the answer's first frame, then cut right after its
    /// HEADERS, then after its DATA and before the trailers: each time the retry (on a new
    /// connection) gets the stored answer, the handler ran once, one key.
    #[tokio::test]
    async fn grpc_an_answer_lost_or_cut_mid_stream_is_replayed_not_rerun() {
        let (book, proxy, mut client, _e) = start(fast()).await;
        let mut expected_runs = 0;
        for fault in [
            H2Fault::LoseAnswer,
            H2Fault::CutAfter(1),
            H2Fault::CutAfter(0),
        ] {
            proxy.plan.lock().push_back(fault.clone());
            let r = client
                .create_order(order(&format!("{fault:?}")))
                .await
                .unwrap_or_else(|e| panic!("{fault:?}: {e:?}"));
            expected_runs += 1;
            let key = meta(r.metadata(), "idempotency-key");
            assert_eq!(
                meta(r.metadata(), "idempotent-replayed"),
                "true",
                "{fault:?}"
            );
            assert!(
                meta(r.metadata(), "idempotency-attempts")
                    .parse::<u32>()
                    .unwrap()
                    >= 2,
                "{fault:?}"
            );
            assert_eq!(
                r.get_ref().order_id,
                format!("order-{expected_runs}"),
                "{fault:?}"
            );
            assert_eq!(
                r.get_ref().symbol,
                format!("{fault:?}"),
                "another call's answer"
            );
            let keys = book.keys.lock().clone();
            assert_eq!(
                keys.len(),
                expected_runs,
                "{fault:?}: the handler ran again"
            );
            assert_eq!(keys.last().unwrap(), &key);
        }
    }

    /// The caller's key survives a lost answer; the same key with another message is refused
    /// with FAILED_PRECONDITION at once; when that refusal's answer is lost, it is sent again
    /// and refused again.
    #[tokio::test]
    async fn grpc_the_callers_key_is_kept_and_a_refusal_is_not_retried() {
        let (book, proxy, mut client, _e) = start(fast()).await;
        let key = "2f3e4d5c-6b7a-4c8d-9e0f-1a2b3c4d5e6f";
        let keyed = |symbol: &str| {
            let mut r = order(symbol);
            r.metadata_mut()
                .insert("idempotency-key", key.parse().unwrap());
            r
        };
        proxy.plan.lock().push_back(H2Fault::LoseAnswer);
        let r = client.create_order(keyed("MINE")).await.unwrap();
        assert_eq!(meta(r.metadata(), "idempotency-key"), key);
        assert_eq!(meta(r.metadata(), "idempotency-attempts"), "2");
        assert_eq!(book.keys.lock().clone(), [key.to_owned()]);

        let e = client.create_order(keyed("OTHER")).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert_eq!(
            meta(e.metadata(), "idempotency-attempts"),
            "1",
            "a refusal was retried"
        );
        proxy.plan.lock().push_back(H2Fault::LoseAnswer);
        let e = client.create_order(keyed("OTHER")).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert_eq!(meta(e.metadata(), "idempotency-attempts"), "2");
        assert_eq!(book.keys.lock().len(), 1);
    }

    /// 24 calls at once over the one HTTP/2 connection while the proxy kills it under them and
    /// cuts answers: every call succeeds with its own order (never another call's), each
    /// handler ran once.
    #[tokio::test]
    async fn grpc_concurrent_calls_under_cut_connections_each_get_their_own_answer() {
        let (book, proxy, client, _e) = start(
            RetryPolicy::new().backoff(Duration::from_millis(10), Duration::from_millis(200)),
        )
        .await;
        for _ in 0..3 {
            proxy.plan.lock().extend([
                H2Fault::Pass,
                H2Fault::LoseAnswer,
                H2Fault::Pass,
                H2Fault::CutAfter(0),
                H2Fault::CutAfter(1),
            ]);
        }
        let calls: Vec<_> = (0..24)
            .map(|i| {
                let mut c = client.clone();
                tokio::spawn(async move { (i, c.create_order(order(&format!("B{i}"))).await) })
            })
            .collect();
        let mut keys = std::collections::HashSet::new();
        for call in calls {
            let (i, r) = call.await.unwrap();
            let r = r.unwrap_or_else(|e| panic!("call {i} failed: {e:?}"));
            let key = meta(r.metadata(), "idempotency-key");
            let o = r.into_inner();
            assert_eq!(
                o.symbol,
                format!("B{i}"),
                "call {i} got another call's answer"
            );
            let n: usize = o.order_id.strip_prefix("order-").unwrap().parse().unwrap();
            assert_eq!(
                book.keys.lock()[n - 1],
                key,
                "call {i}'s order was placed under another key"
            );
            assert!(keys.insert(key));
        }
        let book = book.keys.lock().clone();
        assert_eq!(
            book.len(),
            24,
            "handlers ran {} times for 24 calls",
            book.len()
        );
        assert!(
            proxy.connections.load(Ordering::SeqCst) > 1,
            "no connection was cut"
        );
    }

    /// Every connection loses the answer: `max_attempts` attempts, UNAVAILABLE with the key and
    /// the count; the handler ran once; the key later gets the one result.
    #[tokio::test]
    async fn grpc_a_network_that_always_loses_the_answer_is_tried_a_bounded_number_of_times() {
        let (book, proxy, mut client, _e) = start(fast().max_attempts(3)).await;
        *proxy.default.lock() = H2Fault::LoseAnswer;
        let e = client.create_order(order("DOOMED")).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert_eq!(meta(e.metadata(), "idempotency-attempts"), "3");
        let key = meta(e.metadata(), "idempotency-key");
        assert!(!key.is_empty());
        assert!(proxy.connections.load(Ordering::SeqCst) <= 3);
        assert_eq!(*book.keys.lock(), std::slice::from_ref(&key));
        *proxy.default.lock() = H2Fault::Pass;
        let mut again = order("DOOMED");
        again
            .metadata_mut()
            .insert("idempotency-key", key.parse().unwrap());
        let r = client.create_order(again).await.unwrap();
        assert_eq!(meta(r.metadata(), "idempotent-replayed"), "true");
        assert_eq!(r.get_ref().order_id, "order-1");
        assert_eq!(book.keys.lock().len(), 1);
    }

    /// The answer is held past the call's deadline: DEADLINE_EXCEEDED with the key; a later
    /// call with it gets the one result.
    #[tokio::test]
    async fn grpc_an_answer_held_past_the_deadline_ends_with_the_key_and_replays() {
        let (book, proxy, mut client, _e) = start(fast()).await;
        proxy
            .plan
            .lock()
            .push_back(H2Fault::Delay(Duration::from_millis(1200)));
        let mut request = order("HELD");
        request.set_timeout(Duration::from_millis(400));
        let started = Instant::now();
        let e = client.create_order(request).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(1000));
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
        let key = meta(e.metadata(), "idempotency-key");
        assert!(!key.is_empty(), "{e:?}");
        let mut again = order("HELD");
        again
            .metadata_mut()
            .insert("idempotency-key", key.parse().unwrap());
        let r = client.create_order(again).await.unwrap();
        assert_eq!(r.get_ref().order_id, "order-1");
        assert_eq!(book.keys.lock().clone(), [key]);
    }
}
