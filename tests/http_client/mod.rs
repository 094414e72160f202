//! HTTP helpers shared by the black-box suites that drive a real server with hostile input
//! (`tests/layer_inputs.rs`, `tests/shim_parity.rs`): an Axum server with the layer on several
//! mounts, a client without a connection pool, requests with raw header bytes, raw request
//! bytes on a socket, and the short form of an answer that the tests compare.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use idempotency_rs::contract::KeyPolicy;
use idempotency_rs::{Engine, EngineConfig};
use reqwest::header::HeaderValue;
use serde_json::{Value, json};

/// The headers `/headers` answers with, in this order: stored ones with duplicates, and the
/// ones that must not be stored.
pub const RESPONSE_HEADERS: &[(&str, &str)] = &[
    ("x-a", "1"),
    ("set-cookie", "s=1; Path=/"),
    ("proxy-authenticate", "Basic realm=\"r\""),
    ("x-a", "2"),
    ("keep-alive", "timeout=5"),
    ("set-cookie", "s=2; Path=/"),
    ("date", "Mon, 01 Jan 2001 00:00:00 GMT"),
    ("te", "trailers"),
    ("location", "/orders/1"),
    ("trailer", "x-t"),
    ("proxy-connection", "keep-alive"),
    ("x-a", "3"),
    ("content-type", "application/json"),
];

/// The request body limit of the `/limited` mount.
pub const REQUEST_LIMIT: usize = 64;

/// One running server.
pub struct Srv {
    pub name: &'static str,
    pub base: String,
    pub addr: SocketAddr,
    pub runs: Arc<AtomicUsize>,
    pub stop: Option<Box<dyn FnOnce() + Send>>,
}

impl Srv {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
    pub fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

impl Drop for Srv {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
    }
}

/// What `/echo` answers: the claimed key and scope, and the how-manieth run this is.
pub fn echo(claimed: Option<&idempotency_rs::contract::ClaimedKey>, n: usize) -> Value {
    match claimed {
        Some(c) => json!({"key": c.key().as_str(), "scope": c.scope(), "run": n}),
        None => json!({"key": null, "run": n}),
    }
}

/// The mounts, each with its layer settings (the same on both frameworks):
/// `""`: UUID keys, scope header `X-User-ID`; `/opaque`: opaque keys; `/strict`: key
/// required; `/shared`: no scope header; `/small`, `/tiny`: 200- and 100-byte response
/// limits; `/limited`: a 64-byte request limit.
pub mod axum_side {
    use super::*;
    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use idempotency_rs::axum_integration::{ClaimedKey, IdempotencyLayer};

    fn routes(runs: Arc<AtomicUsize>) -> Router {
        Router::new()
            .route(
                "/echo",
                post(
                    |State(runs): State<Arc<AtomicUsize>>,
                     claimed: Option<ClaimedKey>,
                     _b: Bytes| async move {
                        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                        (StatusCode::CREATED, axum::Json(echo(claimed.as_ref(), n)))
                    },
                ),
            )
            .route(
                "/headers",
                post(|State(runs): State<Arc<AtomicUsize>>| async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    let mut h = HeaderMap::new();
                    for (name, value) in RESPONSE_HEADERS {
                        h.append(
                            HeaderName::from_static(name),
                            HeaderValue::from_static(value),
                        );
                    }
                    h.append("x-run", HeaderValue::from(n));
                    let mut r = Response::new(axum::body::Body::from(format!("{{\"run\":{n}}}")));
                    *r.headers_mut() = h;
                    r.into_response()
                }),
            )
            .with_state(runs)
    }

    pub async fn start() -> Srv {
        let engine = Engine::open(EngineConfig::in_memory()).unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let base = || IdempotencyLayer::new(&engine).scope_header("X-User-ID");
        let app = Router::new()
            .merge(routes(runs.clone()).layer(base()))
            .nest(
                "/opaque",
                routes(runs.clone()).layer(base().key_policy(KeyPolicy::Opaque)),
            )
            .nest(
                "/strict",
                routes(runs.clone()).layer(base().require_key(true)),
            )
            .nest(
                "/shared",
                routes(runs.clone()).layer(IdempotencyLayer::new(&engine)),
            )
            .nest(
                "/small",
                routes(runs.clone()).layer(base().max_response_bytes(200)),
            )
            .nest(
                "/tiny",
                routes(runs.clone()).layer(base().max_response_bytes(100)),
            )
            .nest(
                "/limited",
                routes(runs.clone()).layer(base().max_request_bytes(REQUEST_LIMIT)),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Srv {
            name: "axum",
            base: format!("http://{addr}"),
            addr,
            runs,
            stop: Some(Box::new(move || {
                let _ = tx.send(());
            })),
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

pub fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A POST of `{}` with these header lines (each value raw bytes).
pub async fn send(c: &reqwest::Client, url: &str, headers: &[(&str, &[u8])]) -> reqwest::Response {
    send_body(c, url, headers, b"{\"a\":1}").await
}

pub async fn send_body(
    c: &reqwest::Client,
    url: &str,
    headers: &[(&str, &[u8])],
    body: &[u8],
) -> reqwest::Response {
    let mut r = c
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (n, v) in headers {
        r = r.header(*n, HeaderValue::from_bytes(v).unwrap());
    }
    r.send().await.unwrap()
}

/// The problem slug of a 400/422 answer, or a description of what came instead.
pub async fn outcome(r: reqwest::Response) -> String {
    let status = r.status().as_u16();
    let replayed = r.headers().contains_key("idempotent-replayed");
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    let body = r.bytes().await.unwrap();
    if ct.as_deref() == Some("application/problem+json") {
        let v: Value = serde_json::from_slice(&body).unwrap();
        let slug = v["type"]
            .as_str()
            .unwrap()
            .trim_start_matches("urn:idempotency-rs:problem:")
            .to_owned();
        assert_eq!(v["status"], status);
        return format!("{status} {slug}");
    }
    format!(
        "{status}{} {}",
        if replayed { " replayed" } else { "" },
        String::from_utf8_lossy(&body)
    )
}

/// Sends raw request bytes on a new connection and returns the status and body.
pub async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("the server did not close the connection")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A POST with these raw header lines (each ending in CRLF) and a JSON body.
pub fn raw_post(path: &str, header_lines: &[u8], body: &str) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(header_lines);
    r.extend_from_slice(b"\r\n");
    r.extend_from_slice(body.as_bytes());
    r
}
