//! HTTP helpers shared by the black-box suites that drive a real server with hostile input
//! (`tests/layer_inputs.rs`, `tests/shim_parity.rs`): a client without a connection pool,
//! requests with raw header bytes, raw request bytes on a socket, and the short form of an
//! answer that the tests compare.
#![allow(dead_code, unreachable_pub)]

use reqwest::header::HeaderValue;
use serde_json::Value;

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
