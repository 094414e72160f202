//! Parity of the three shims, black-box: the same hostile inputs through a real Axum server and
//! a real Actix-Web server (both on 127.0.0.1:0, driven by reqwest), whose answers must agree
//! (tests/layer_inputs.rs pins the Axum ones), and the key and scope metadata of the Tonic
//! layer through a real tonic server and client.
//!
//! Run with
//! `cargo test --features axum-integration,actix-integration,tonic-integration --test shim_parity`.

mod http_client;
use http_client::{
    REQUEST_LIMIT, RESPONSE_HEADERS, Srv, axum_side, client, echo, key, outcome, raw, raw_post,
    send, send_body,
};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use idempotency_rs::contract::{KeyPolicy, is_stored_header};
use idempotency_rs::{Engine, EngineConfig};
use serde_json::Value;

const U: &str = "0b6f5a3e-9a7c-4c1e-8f2a-2d8b4f1e6c3a";

// ---------------------------------------------------------------------------------------------
// Servers: the same routes and layer settings on Axum and on Actix-Web
// ---------------------------------------------------------------------------------------------

mod actix_side {
    use super::*;
    use actix_web::http::StatusCode;
    use actix_web::http::header::{HeaderName, HeaderValue};
    use actix_web::web::{self, Bytes, Data};
    use actix_web::{App, HttpResponse, HttpServer};
    use idempotency_rs::actix_integration::{ClaimedKey, Idempotency};

    struct Runs(Arc<AtomicUsize>);

    async fn echo_handler(
        runs: Data<Runs>,
        claimed: Option<ClaimedKey>,
        _b: Bytes,
    ) -> HttpResponse {
        let n = runs.0.fetch_add(1, Ordering::SeqCst) + 1;
        HttpResponse::build(StatusCode::CREATED).json(echo(claimed.as_ref(), n))
    }

    async fn headers_handler(runs: Data<Runs>) -> HttpResponse {
        let n = runs.0.fetch_add(1, Ordering::SeqCst) + 1;
        let mut r = HttpResponse::Ok().body(format!("{{\"run\":{n}}}"));
        let h = r.headers_mut();
        for (name, value) in RESPONSE_HEADERS {
            h.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        h.append(
            HeaderName::from_static("x-run"),
            HeaderValue::from_str(&n.to_string()).unwrap(),
        );
        r
    }

    fn routes(cfg: &mut web::ServiceConfig) {
        cfg.route("/echo", web::post().to(echo_handler))
            .route("/headers", web::post().to(headers_handler));
    }

    pub(super) async fn start() -> Srv {
        let engine = Engine::open(EngineConfig::in_memory()).unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let runs2 = runs.clone();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let server = HttpServer::new(move || {
                    let base = || Idempotency::new(&engine).scope_header("X-User-ID");
                    App::new()
                        .app_data(Data::new(Runs(runs2.clone())))
                        .service(
                            web::scope("/opaque")
                                .wrap(base().key_policy(KeyPolicy::Opaque))
                                .configure(routes),
                        )
                        .service(
                            web::scope("/strict")
                                .wrap(base().require_key(true))
                                .configure(routes),
                        )
                        .service(
                            web::scope("/shared")
                                .wrap(Idempotency::new(&engine))
                                .configure(routes),
                        )
                        .service(
                            web::scope("/small")
                                .wrap(base().max_response_bytes(200))
                                .configure(routes),
                        )
                        .service(
                            web::scope("/tiny")
                                .wrap(base().max_response_bytes(100))
                                .configure(routes),
                        )
                        .service(
                            web::scope("/limited")
                                .wrap(base().max_request_bytes(REQUEST_LIMIT))
                                .configure(routes),
                        )
                        .service(web::scope("").wrap(base()).configure(routes))
                })
                .workers(1)
                .disable_signals()
                .shutdown_timeout(1)
                .bind(("127.0.0.1", 0))
                .unwrap();
                let addr = server.addrs()[0];
                let server = server.run();
                tx.send((addr, server.handle())).unwrap();
                server.await.unwrap();
            });
        });
        let (addr, handle) = rx.recv().unwrap();
        Srv {
            name: "actix",
            base: format!("http://{addr}"),
            addr,
            runs,
            stop: Some(Box::new(move || {
                drop(handle.stop(false));
                thread.join().unwrap();
            })),
        }
    }
}

async fn both() -> [Srv; 2] {
    [axum_side::start().await, actix_side::start().await]
}

// ---------------------------------------------------------------------------------------------
// The client side
// ---------------------------------------------------------------------------------------------

/// The short form of a raw answer: `"<status> <slug or body>"`.
fn raw_outcome((status, body): (u16, String)) -> String {
    match serde_json::from_str::<Value>(&body) {
        Ok(v) if v["type"].is_string() => format!(
            "{status} {}",
            v["type"]
                .as_str()
                .unwrap()
                .trim_start_matches("urn:idempotency-rs:problem:")
        ),
        _ => format!("{status} {body}"),
    }
}

/// Collects what a scenario saw on one server, and the expectations it broke.
#[derive(Default)]
struct Log {
    lines: Vec<(String, String)>,
    broken: Vec<String>,
}

impl Log {
    /// Records `got` under `label`.
    fn see(&mut self, label: impl Into<String>, got: impl Into<String>) -> String {
        let got = got.into();
        self.lines.push((label.into(), got.clone()));
        got
    }
    /// Records `got` and checks it.
    fn want(
        &mut self,
        label: impl Into<String>,
        got: impl Into<String>,
        ok: impl FnOnce(&str) -> bool,
        what: &str,
    ) {
        let label = label.into();
        let got = self.see(label.clone(), got);
        if !ok(&got) {
            self.broken
                .push(format!("{label}: want {what}, got {got:?}"));
        }
    }
    fn want_eq(&mut self, label: impl Into<String>, got: impl Into<String>, want: &str) {
        self.want(label, got, |g| g == want, &format!("{want:?}"));
    }
}

/// Runs `scenario` on Axum and on Actix; fails on every broken expectation and on every step
/// whose answer differs between the two.
async fn parity<F>(scenario: F)
where
    F: for<'a> Fn(
        &'a Srv,
        &'a mut Log,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>,
{
    let servers = both().await;
    let mut logs = Vec::new();
    for s in &servers {
        let mut log = Log::default();
        scenario(s, &mut log).await;
        logs.push((s.name, log));
    }
    let mut problems = Vec::new();
    for (name, log) in &logs {
        for b in &log.broken {
            problems.push(format!("[{name}] {b}"));
        }
    }
    let (ax, ac) = (&logs[0].1.lines, &logs[1].1.lines);
    if std::env::var_os("SHIM_PARITY_SHOW").is_some() {
        for (a, b) in ax.iter().zip(ac.iter()) {
            eprintln!("{}\n  axum:  {}\n  actix: {}", a.0, a.1, b.1);
        }
    }
    for (a, b) in ax.iter().zip(ac.iter()) {
        // Per-request values (keys) differ between runs; the labels match step by step.
        if mask_uuids(&a.1) != mask_uuids(&b.1) {
            problems.push(format!(
                "[parity] {}: axum answered {:?}, actix answered {:?}",
                a.0, a.1, b.1
            ));
        }
    }
    if ax.len() != ac.len() {
        problems.push(format!(
            "[parity] {} steps on axum, {} on actix",
            ax.len(),
            ac.len()
        ));
    }
    drop(servers);
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// Replaces every hyphenated UUID in `s` by `<uuid>` (the keys differ between the servers).
fn mask_uuids(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        let is_uuid = b.len() - i >= 36
            && b[i..i + 36].iter().enumerate().all(|(j, c)| match j {
                8 | 13 | 18 | 23 => *c == b'-',
                _ => c.is_ascii_hexdigit(),
            });
        if is_uuid {
            out.push_str("<uuid>");
            i += 36;
        } else {
            let ch = s[i..].chars().next().unwrap();
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// Replaces the per-test keys in an answer by placeholders, so both servers' answers compare.
fn anon(s: &str, keys: &[&str]) -> String {
    let mut s = s.to_owned();
    for (i, k) in keys.iter().enumerate() {
        s = s.replace(*k, &format!("<k{i}>"));
    }
    s
}

macro_rules! scenario {
    (|$s:ident, $log:ident| $body:block) => {
        |$s: &Srv, $log: &mut Log| Box::pin(async move $body)
    };
}

// ---------------------------------------------------------------------------------------------
// HTTP: Axum and Actix side by side
// ---------------------------------------------------------------------------------------------

/// 0, 1, 2 and 3 key header lines; comma-folded values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_key_header_counts() {
    parity(scenario!(|s, log| {
        let c = client();
        let url = s.url("/echo");
        let user: (&str, &[u8]) = ("x-user-id", b"u1");
        let (a, b, k3) = (key(), key(), key());
        let ks = [a.as_str(), b.as_str(), k3.as_str()];
        log.want(
            "no key",
            outcome(send(&c, &url, &[user]).await).await,
            |g| g.starts_with("201 {\"key\":null"),
            "201, no key",
        );
        log.want_eq(
            "no key, required",
            outcome(send(&c, &s.url("/strict/echo"), &[user]).await).await,
            "400 key-missing",
        );
        let first = outcome(send(&c, &url, &[user, ("idempotency-key", a.as_bytes())]).await).await;
        log.want(
            "one key",
            anon(&first, &ks),
            |g| g.starts_with("201 {"),
            "201",
        );
        let again = outcome(send(&c, &url, &[user, ("idempotency-key", a.as_bytes())]).await).await;
        log.want_eq(
            "one key again",
            anon(&again, &ks),
            &anon(&first.replacen("201", "201 replayed", 1), &ks),
        );
        for (i, lines) in [
            vec![a.as_bytes(), b.as_bytes()],
            vec![b.as_bytes(), b.as_bytes()],
            vec![a.as_bytes(), b.as_bytes(), k3.as_bytes()],
            vec![k3.as_bytes(), k3.as_bytes(), k3.as_bytes()],
            vec![b"".as_slice(), k3.as_bytes()],
            vec![b"not a key".as_slice(), k3.as_bytes(), b"x".as_slice()],
        ]
        .into_iter()
        .enumerate()
        {
            let mut h = vec![user];
            h.extend(lines.iter().map(|v| ("idempotency-key", *v)));
            for mount in ["", "/strict", "/opaque"] {
                log.want_eq(
                    format!("{} key lines #{i} on {mount:?}", lines.len()),
                    outcome(send(&c, &s.url(&format!("{mount}/echo")), &h).await).await,
                    "400 key-repeated",
                );
            }
        }
        let folded = format!("{a}, {b}");
        log.want_eq(
            "folded uuid",
            outcome(send(&c, &url, &[user, ("idempotency-key", folded.as_bytes())]).await).await,
            "400 key-repeated",
        );
        log.want_eq(
            "folded opaque",
            outcome(
                send(
                    &c,
                    &s.url("/opaque/echo"),
                    &[user, ("idempotency-key", b"k1,k2")],
                )
                .await,
            )
            .await,
            "400 key-repeated",
        );
        // Raw: two header lines, one empty.
        let (st, body) = raw(
            s.addr,
            &raw_post(
                "/echo",
                format!("X-User-ID: u1\r\nIdempotency-Key: {a}\r\nIdempotency-Key:\r\n").as_bytes(),
                "{\"a\":1}",
            ),
        )
        .await;
        log.want_eq(
            "raw: key + empty key line",
            raw_outcome((st, body)),
            "400 key-repeated",
        );
        log.want_eq("runs", s.runs().to_string(), "2");
    }))
    .await;
}

/// Upper-case and quoted UUIDs, white space, non-UTF-8 bytes, malformed quoting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_key_forms_and_bad_bytes() {
    parity(scenario!(|s, log| {
        let c = client();
        let url = s.url("/echo");
        let user: (&str, &[u8]) = ("x-user-id", b"u1");
        let k = key();
        let upper = k.to_ascii_uppercase();
        let ks = [k.as_str()];
        let first =
            outcome(send(&c, &url, &[user, ("idempotency-key", upper.as_bytes())]).await).await;
        log.want(
            "upper-case uuid",
            anon(&first, &ks),
            |g| g.starts_with("201 {") && g.contains("\"key\":\"<k0>\""),
            "201 with the key in lower case",
        );
        let replay = first.replacen("201", "201 replayed", 1);
        for form in [
            k.clone(),
            format!("\"{upper}\""),
            format!("\"{k}\""),
            format!("  {k}\t"),
        ] {
            log.want_eq(
                format!("form {:?}", anon(&form, &ks)),
                anon(
                    &outcome(send(&c, &url, &[user, ("idempotency-key", form.as_bytes())]).await)
                        .await,
                    &ks,
                ),
                &anon(&replay, &ks),
            );
        }
        let (st, body) = raw(
            s.addr,
            &raw_post(
                "/echo",
                format!("X-User-ID: u1\r\nIdempotency-Key:\t  \"{upper}\" \t\r\n").as_bytes(),
                "{\"a\":1}",
            ),
        )
        .await;
        log.want(
            "raw quoted upper with OWS",
            anon(&format!("{st} {body}"), &ks),
            |g| g.starts_with("201 ") && g.contains("\"run\":1"),
            "the replay of run 1",
        );
        let (st, body) = raw(
            s.addr,
            &raw_post(
                "/echo",
                format!("X-User-ID: u1\r\nIdempotency-Key: \" {k}\"\r\n").as_bytes(),
                "{\"a\":1}",
            ),
        )
        .await;
        log.want_eq(
            "raw quoted with inner space",
            raw_outcome((st, body)),
            "400 key-invalid",
        );
        for path in ["/echo", "/opaque/echo"] {
            for bad in [
                &b"caf\xc3\xa9"[..],
                b"\xff\xfe\xfd",
                b"\x80",
                b"k\xa0",
                b"\"caf\xc3\xa9\"",
                b"\"\xff\"",
                b"\"unterminated",
                b"\"\"",
                b"a\tb",
                b"\"a\\nb\"",
            ] {
                log.want_eq(
                    format!("{path} bad {:?}", String::from_utf8_lossy(bad)),
                    outcome(send(&c, &s.url(path), &[user, ("idempotency-key", bad)]).await).await,
                    "400 key-invalid",
                );
            }
            for line in [&b"Idempotency-Key:\r\n"[..], b"Idempotency-Key:  \t \r\n"] {
                let mut h = b"X-User-ID: u1\r\n".to_vec();
                h.extend_from_slice(line);
                log.want_eq(
                    format!("{path} raw blank key {:?}", String::from_utf8_lossy(line)),
                    raw_outcome(raw(s.addr, &raw_post(path, &h, "{}")).await),
                    "400 key-invalid",
                );
            }
        }
        for bad in [
            k.replace('-', ""),
            format!("{{{k}}}"),
            format!("urn:uuid:{k}"),
            U.replacen('a', "g", 1),
        ] {
            log.want_eq(
                format!("not a uuid {:?}", anon(&bad, &ks)),
                outcome(send(&c, &url, &[user, ("idempotency-key", bad.as_bytes())]).await).await,
                "400 key-invalid",
            );
        }
        // Opaque keys keep their case; quoted and bare are one key.
        let o = s.url("/opaque/echo");
        let first = outcome(send(&c, &o, &[user, ("idempotency-key", b"Order-42")]).await).await;
        log.want(
            "opaque Order-42",
            &*first,
            |g| g.contains("\"key\":\"Order-42\""),
            "key Order-42",
        );
        log.want_eq(
            "opaque quoted",
            outcome(send(&c, &o, &[user, ("idempotency-key", b"\"Order-42\"")]).await).await,
            &first.replacen("201", "201 replayed", 1),
        );
        log.want(
            "opaque lower",
            outcome(send(&c, &o, &[user, ("idempotency-key", b"order-42")]).await).await,
            |g| g.starts_with("201 {") && g.contains("\"key\":\"order-42\""),
            "a new run",
        );
        log.want(
            "opaque quoted comma",
            outcome(send(&c, &o, &[user, ("idempotency-key", b"\"a,b\"")]).await).await,
            |g| g.contains("\"key\":\"a,b\""),
            "key a,b",
        );
        log.want_eq("runs", s.runs().to_string(), "4");
    }))
    .await;
}

/// The scope header absent, repeated, blank, not UTF-8, long, or differing by white space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_scope_header_rules() {
    parity(scenario!(|s, log| {
        let c = client();
        let url = s.url("/echo");
        let k = key();
        let ks = [k.as_str()];
        let kh: (&str, &[u8]) = ("idempotency-key", k.as_bytes());
        for users in [
            vec![],
            vec![&b"u1"[..], b"u1"],
            vec![&b"u1"[..], b"u2"],
            vec![&b"u1"[..], b"u2", b"u3"],
            vec![&b""[..]],
            vec![&b""[..], b"u1"],
            vec!["\u{a0}".as_bytes()],
            vec!["\u{3000} \u{2028}".as_bytes()],
        ] {
            let mut h = vec![kh];
            h.extend(users.iter().map(|u| ("x-user-id", *u)));
            log.want_eq(
                format!(
                    "users {:?}",
                    users
                        .iter()
                        .map(|u| String::from_utf8_lossy(u))
                        .collect::<Vec<_>>()
                ),
                outcome(send(&c, &url, &h).await).await,
                "400 scope-missing",
            );
        }
        log.want_eq(
            "raw blank scope",
            raw_outcome(
                raw(
                    s.addr,
                    &raw_post(
                        "/echo",
                        format!("Idempotency-Key: {k}\r\nX-User-ID:  \t \r\n").as_bytes(),
                        "{}",
                    ),
                )
                .await,
            ),
            "400 scope-missing",
        );
        log.want_eq(
            "non-utf8 scope",
            outcome(send(&c, &url, &[kh, ("x-user-id", b"\xff\xfe")]).await).await,
            "400 scope-invalid",
        );
        log.want_eq(
            "long scope",
            outcome(send(&c, &url, &[kh, ("x-user-id", "u".repeat(1025).as_bytes())]).await).await,
            "400 scope-invalid",
        );
        log.want_eq("runs after refusals", s.runs().to_string(), "0");
        let first = outcome(send(&c, &url, &[kh, ("x-user-id", b"alice")]).await).await;
        log.want(
            "alice",
            anon(&first, &ks),
            |g| g.contains("\"scope\":\"alice\""),
            "scope alice",
        );
        let raw_same = raw(
            s.addr,
            &raw_post(
                "/echo",
                format!("Idempotency-Key: {k}\r\nx-user-id:\t alice \r\n").as_bytes(),
                "{\"a\":1}",
            ),
        )
        .await;
        log.want(
            "raw alice with OWS",
            anon(&format!("{} {}", raw_same.0, raw_same.1), &ks),
            |g| g.starts_with("201 ") && g.contains("\"run\":1"),
            "the replay of run 1",
        );
        for other in [
            "\u{a0}alice",
            "alice\u{3000}",
            "\u{85}alice",
            "alice\u{2028}",
            "Alice",
            "alice2",
        ] {
            let got = outcome(send(&c, &url, &[kh, ("x-user-id", other.as_bytes())]).await).await;
            log.want(
                format!("other scope {other:?}"),
                anon(&got, &ks),
                |g| {
                    g.starts_with("201 {")
                        && !g.contains("replayed")
                        && !g.contains("\"scope\":\"alice\"")
                },
                "a new run in its own scope",
            );
        }
        log.want(
            "1024-byte scope",
            outcome(send(&c, &url, &[kh, ("x-user-id", "u".repeat(1024).as_bytes())]).await).await,
            |g| g.starts_with("201 {"),
            "201",
        );
        // No scope header configured: every request shares one scope.
        let shared = s.url("/shared/echo");
        let a = outcome(
            send(
                &c,
                &shared,
                &[kh, ("x-user-id", b"u1"), ("x-user-id", b"u2")],
            )
            .await,
        )
        .await;
        log.want(
            "shared",
            anon(&a, &ks),
            |g| g.contains("\"scope\":\"\""),
            "the empty scope",
        );
        log.want_eq(
            "shared again",
            anon(&outcome(send(&c, &shared, &[kh]).await).await, &ks),
            &anon(&a.replacen("201", "201 replayed", 1), &ks),
        );
        log.want_eq("runs", s.runs().to_string(), "9");
    }))
    .await;
}

/// JSON bodies: reordered or re-spaced replays; a changed value or the repeated key's members
/// swapped is a mismatch; a lower-case method is the same request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_json_bodies_replay_or_mismatch() {
    parity(scenario!(|s, log| {
        let c = client();
        let url = s.url("/echo");
        let k = key();
        let ks = [k.as_str()];
        let h: [(&str, &[u8]); 2] = [("x-user-id", b"u1"), ("idempotency-key", k.as_bytes())];
        let doc = br#"{"z":{"y":[{"d":1,"c":{"f":[],"e":"\u00e9"}}],"x":0},"a":[{"c":3,"b":[{"z":1,"a":2}]}],"a":0}"#;
        let first = outcome(send_body(&c, &url, &h, doc).await).await;
        log.want("first", anon(&first, &ks), |g| g.starts_with("201 {"), "201");
        let replay = anon(&first.replacen("201", "201 replayed", 1), &ks);
        let same = "{ \"\\u007a\" : { \"x\" : 0, \"y\" : [ { \"c\" : { \"e\" : \"é\", \"f\" : [ ] }, \"d\" : 1 } ] },\n \"a\" : [ { \"b\" : [ { \"a\" : 2, \"z\" : 1 } ], \"c\" : 3 } ], \"a\" : 0 }";
        log.want_eq("reordered", anon(&outcome(send_body(&c, &url, &h, same.as_bytes()).await).await, &ks), &replay);
        let r = c.post(&url).header("x-user-id", "u1").header("idempotency-key", &k).header("content-type", "application/json; charset=utf-8").body(same).send().await.unwrap();
        log.want_eq("reordered, charset param", anon(&outcome(r).await, &ks), &replay);
        let lower = reqwest::Method::from_bytes(b"post").unwrap();
        let r = c.request(lower, &url).header("x-user-id", "u1").header("idempotency-key", &k).header("content-type", "application/json").body(same).send().await.unwrap();
        log.want_eq("lower-case method", anon(&outcome(r).await, &ks), &replay);
        let swapped = br#"{"a":0,"z":{"y":[{"d":1,"c":{"f":[],"e":"\u00e9"}}],"x":0},"a":[{"c":3,"b":[{"z":1,"a":2}]}]}"#;
        log.want_eq("repeated key swapped", outcome(send_body(&c, &url, &h, swapped).await).await, "422 key-reused");
        let other = br#"{"z":{"y":[{"d":1,"c":{"f":[],"e":"e"}}],"x":0},"a":[{"c":3,"b":[{"z":1,"a":2}]}],"a":0}"#;
        log.want_eq("changed value", outcome(send_body(&c, &url, &h, other).await).await, "422 key-reused");
        let r = c.post(&url).header("x-user-id", "u1").header("idempotency-key", &k).header("content-type", "text/plain").body(same).send().await.unwrap();
        log.want_eq("same text, not JSON", outcome(r).await, "422 key-reused");
        log.want_eq("other path", outcome(send_body(&c, &format!("{url}?x=1"), &h, doc).await).await, "422 key-reused");
        // Another scope with the same key and body is another request.
        let r = outcome(send_body(&c, &url, &[("x-user-id", b"u2"), ("idempotency-key", k.as_bytes())], doc).await).await;
        log.want("other scope", anon(&r, &ks), |g| g.starts_with("201 {") && g.contains("\"scope\":\"u2\""), "a new run");
        log.want_eq("runs", s.runs().to_string(), "2");
    }))
    .await;
}

/// Response headers: stored ones replay with their duplicates in order; hop-by-hop ones and
/// `Date` are not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_stored_headers_replay_per_name_in_order() {
    parity(scenario!(|s, log| {
        let c = client();
        let url = s.url("/headers");
        let k = key();
        let h: [(&str, &[u8]); 2] = [("x-user-id", b"u1"), ("idempotency-key", k.as_bytes())];
        let first = send(&c, &url, &h).await;
        let first_headers = header_pairs(first.headers());
        let first_body = first.bytes().await.unwrap();
        let again = send(&c, &url, &h).await;
        log.want_eq("replay status", again.status().as_u16().to_string(), "200");
        let again_headers = header_pairs(again.headers());
        let again_body = again.bytes().await.unwrap();
        log.want_eq(
            "replay body",
            String::from_utf8_lossy(&again_body),
            &String::from_utf8_lossy(&first_body),
        );
        log.want_eq("runs", s.runs().to_string(), "1");
        let by_name = |l: &[(String, String)], name: &str| -> String {
            l.iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
                .join(" | ")
        };
        let want: Vec<(String, String)> = RESPONSE_HEADERS
            .iter()
            .filter(|(n, _)| is_stored_header(n))
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .chain([("x-run".to_string(), "1".to_string())])
            .collect();
        for name in ["x-a", "set-cookie", "location", "content-type", "x-run"] {
            log.want_eq(
                format!("first {name}"),
                by_name(&first_headers, name),
                &by_name(&want, name),
            );
            log.want_eq(
                format!("replayed {name}"),
                by_name(&again_headers, name),
                &by_name(&want, name),
            );
        }
        log.want_eq(
            "replayed marker",
            by_name(&again_headers, "idempotent-replayed"),
            "true",
        );
        for name in [
            "proxy-authenticate",
            "keep-alive",
            "te",
            "trailer",
            "proxy-connection",
        ] {
            log.want_eq(
                format!("replayed {name}"),
                by_name(&again_headers, name),
                "",
            );
        }
        log.want(
            "replayed date",
            by_name(&again_headers, "date"),
            |g| !g.contains("2001"),
            "not the handler's Date",
        );
        log.want_eq(
            "replayed content-length",
            by_name(&again_headers, "content-length"),
            &again_body.len().to_string(),
        );
    }))
    .await;
}

fn header_pairs(h: &reqwest::header::HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// Axum: the replay's header lines in the handler's order (each name where it first appeared,
/// its values in order). Not Actix-Web: its `HeaderMap` is a hash map, so the order between
/// different names is lost before the layer sees the response (the order of one name's values
/// is kept, `http_stored_headers_replay_per_name_in_order`); HTTP gives that order no meaning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_replayed_header_order_across_names() {
    let stored = ["x-a", "set-cookie", "location", "content-type", "x-run"];
    let pick = |l: Vec<(String, String)>| -> Vec<String> {
        l.into_iter()
            .filter(|(n, _)| stored.contains(&n.as_str()))
            .map(|(n, v)| format!("{n}: {v}"))
            .collect()
    };
    // The handler's header lines, grouped by name in order of first appearance.
    let mut names: Vec<&str> = Vec::new();
    for (n, _) in RESPONSE_HEADERS.iter().chain([("x-run", "")].iter()) {
        if stored.contains(n) && !names.contains(n) {
            names.push(n);
        }
    }
    let handler_order = |run: usize| -> Vec<String> {
        let mut out = Vec::new();
        for name in &names {
            if *name == "x-run" {
                out.push(format!("x-run: {run}"));
            }
            for (n, v) in RESPONSE_HEADERS {
                if n == name {
                    out.push(format!("{n}: {v}"));
                }
            }
        }
        out
    };
    let mut problems = Vec::new();
    for s in both().await.iter().filter(|s| s.name == "axum") {
        let c = client();
        let url = s.url("/headers");
        let k = key();
        let h: [(&str, &[u8]); 2] = [("x-user-id", b"u1"), ("idempotency-key", k.as_bytes())];
        let first = pick(header_pairs(send(&c, &url, &h).await.headers()));
        let again = pick(header_pairs(send(&c, &url, &h).await.headers()));
        let want = handler_order(s.runs());
        if again != want {
            problems.push(format!(
                "[{}] the replay's header lines are not in the handler's order{}:\n  handler {want:?}\n  first   {first:?}\n  replay  {again:?}",
                s.name,
                if first == again { "" } else { ", nor in the first answer's" }
            ));
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

/// Response limits: the stored headers count, the others do not; over the limit the record is
/// the 410 marker. Request limit: 413, with a declared length and chunked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_size_limits() {
    parity(scenario!(|s, log| {
        let c = client();
        let k = key();
        let h: [(&str, &[u8]); 2] = [("x-user-id", b"u1"), ("idempotency-key", k.as_bytes())];
        let first = send(&c, &s.url("/small/headers"), &h).await;
        log.want_eq(
            "small first",
            format!(
                "{} stored={:?}",
                first.status().as_u16(),
                first.headers().get("idempotency-stored")
            ),
            "200 stored=None",
        );
        let again = send(&c, &s.url("/small/headers"), &h).await;
        log.want_eq(
            "small again",
            format!(
                "{} {:?}",
                again.status().as_u16(),
                again.headers().get("idempotent-replayed")
            ),
            "200 Some(\"true\")",
        );
        let k = key();
        let h: [(&str, &[u8]); 2] = [("x-user-id", b"u1"), ("idempotency-key", k.as_bytes())];
        let first = send(&c, &s.url("/tiny/headers"), &h).await;
        log.want_eq(
            "tiny first",
            format!(
                "{} x-a×{}",
                first.status().as_u16(),
                first.headers().get_all("x-a").iter().count()
            ),
            "200 x-a×3",
        );
        log.want_eq(
            "tiny again",
            outcome(send(&c, &s.url("/tiny/headers"), &h).await).await,
            "410 response-not-stored",
        );
        log.want_eq("runs after responses", s.runs().to_string(), "2");
        let url = s.url("/limited/echo");
        let k = key();
        let h: [(&str, &[u8]); 2] = [("x-user-id", b"u1"), ("idempotency-key", k.as_bytes())];
        let at = format!("{{\"a\":\"{}\"}}", "x".repeat(REQUEST_LIMIT - 8));
        assert_eq!(at.len(), REQUEST_LIMIT);
        let over = format!("{{\"a\":\"{}\"}}", "x".repeat(REQUEST_LIMIT - 7));
        log.want_eq(
            "over the request limit",
            outcome(send_body(&c, &url, &h, over.as_bytes()).await).await,
            "413 body-too-large",
        );
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            over.as_bytes().chunks(10).map(|c| Ok(c.to_vec())).collect();
        let r = c
            .post(&url)
            .header("x-user-id", "u1")
            .header("idempotency-key", &k)
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
            .send()
            .await
            .unwrap();
        log.want_eq(
            "over the request limit, chunked",
            outcome(r).await,
            "413 body-too-large",
        );
        log.want(
            "at the request limit",
            outcome(send_body(&c, &url, &h, at.as_bytes()).await).await,
            |g| g.starts_with("201 {"),
            "201",
        );
        log.want_eq("runs", s.runs().to_string(), "3");
    }))
    .await;
}

// ---------------------------------------------------------------------------------------------
// Tonic: the key and scope metadata through a real server and client
// ---------------------------------------------------------------------------------------------

#[allow(unreachable_pub, missing_docs, clippy::all, clippy::pedantic)]
mod orders {
    include!("../examples/generated/orders.rs");
}

mod grpc {
    use super::*;
    use idempotency_rs::tonic_integration::{
        ClaimedKey, IdempotencyLayer, KEY_METADATA, REPLAYED_METADATA,
    };
    use orders::orders_client::OrdersClient;
    use orders::orders_server::{Orders, OrdersServer};
    use orders::{CreateOrderRequest, Order, OrderUpdate, WatchOrderRequest};
    use tonic::codegen::tokio_stream;
    use tonic::metadata::{
        AsciiMetadataKey, AsciiMetadataValue, BinaryMetadataKey, BinaryMetadataValue, MetadataValue,
    };
    use tonic::transport::Channel;
    use tonic::transport::server::TcpIncoming;
    use tonic::{Request, Response, Status};

    pub(super) const CREATE: &str = "/orders.Orders/CreateOrder";

    /// `symbol` picks the answer: `INTERNAL`, `UNAVAILABLE`, `ABORTED`, `UNKNOWN` fail
    /// transiently, `DENIED` answers PERMISSION_DENIED (stored), anything else is an order
    /// whose id names the run, the claimed key and scope.
    struct Svc(Arc<AtomicUsize>);

    #[tonic::async_trait]
    impl Orders for Svc {
        async fn create_order(
            &self,
            request: Request<CreateOrderRequest>,
        ) -> Result<Response<Order>, Status> {
            let claimed = request.extensions().get::<ClaimedKey>().cloned();
            let req = request.into_inner();
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            let mut status = match req.symbol.as_str() {
                "INTERNAL" => Status::internal("boom"),
                "UNAVAILABLE" => Status::unavailable("down"),
                "ABORTED" => Status::aborted("conflict"),
                "UNKNOWN" => Status::unknown("?"),
                "DENIED" => Status::permission_denied(format!("denied on run {n}")),
                _ => {
                    let id = match &claimed {
                        Some(c) => format!("run={n} key={} scope={}", c.key(), c.scope()),
                        None => format!("run={n} key=none"),
                    };
                    return Ok(Response::new(Order {
                        order_id: id,
                        symbol: req.symbol,
                        quantity: req.quantity,
                        ..Order::default()
                    }));
                }
            };
            status
                .metadata_mut()
                .insert("x-run", n.to_string().parse().unwrap());
            Err(status)
        }

        type WatchOrderStream = tokio_stream::Iter<std::vec::IntoIter<Result<OrderUpdate, Status>>>;

        async fn watch_order(
            &self,
            _request: Request<WatchOrderRequest>,
        ) -> Result<Response<Self::WatchOrderStream>, Status> {
            Err(Status::unimplemented("not here"))
        }
    }

    pub(super) struct G {
        pub(super) client: OrdersClient<Channel>,
        pub(super) runs: Arc<AtomicUsize>,
    }

    impl G {
        pub(super) fn runs(&self) -> usize {
            self.runs.load(Ordering::SeqCst)
        }

        /// Calls CreateOrder with `symbol`, quantity `qty` and these metadata entries
        /// (`-bin` names take base64 text as given); the outcome as one line:
        /// `"OK[ replayed] <order id>"` or `"<code>[ replayed] <message>"`.
        pub(super) async fn call(
            &mut self,
            symbol: &str,
            qty: u32,
            md: &[(&str, &[u8])],
        ) -> String {
            let mut r = Request::new(CreateOrderRequest {
                symbol: symbol.into(),
                quantity: qty,
                price: "1".into(),
            });
            for (name, value) in md {
                if name.ends_with("-bin") {
                    let n = BinaryMetadataKey::from_bytes(name.as_bytes()).unwrap();
                    r.metadata_mut().append_bin(n, bin_from_text(value));
                } else {
                    let n = AsciiMetadataKey::from_bytes(name.as_bytes()).unwrap();
                    let v = AsciiMetadataValue::try_from(*value).unwrap();
                    r.metadata_mut().append(n, v);
                }
            }
            match self.client.create_order(r).await {
                Ok(resp) => {
                    let rep = replayed(resp.metadata());
                    format!(
                        "OK{} {}",
                        if rep { " replayed" } else { "" },
                        resp.get_ref().order_id
                    )
                }
                Err(s) => {
                    let rep = replayed(s.metadata());
                    format!(
                        "{:?}{} {}",
                        s.code(),
                        if rep { " replayed" } else { "" },
                        s.message()
                    )
                }
            }
        }
    }

    /// A binary metadata value from its base64 text, kept as written (padding included).
    fn bin_from_text(text: &[u8]) -> BinaryMetadataValue {
        let text: &'static str =
            Box::leak(String::from_utf8(text.to_vec()).unwrap().into_boxed_str());
        MetadataValue::from_static(text)
    }

    fn replayed(md: &tonic::metadata::MetadataMap) -> bool {
        md.get(REPLAYED_METADATA)
            .is_some_and(|v| v.as_bytes() == b"true")
    }

    pub(super) fn key_md(k: &str) -> (&'static str, &[u8]) {
        (KEY_METADATA, k.as_bytes())
    }

    pub(super) async fn start(configure: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer) -> G {
        let engine = Engine::open(EngineConfig::in_memory()).unwrap();
        let layer = configure(IdempotencyLayer::new(engine).method(CREATE));
        let runs = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .layer(layer)
            .add_service(OrdersServer::new(Svc(runs.clone())))
            .serve_with_incoming(TcpIncoming::from(listener));
        tokio::spawn(server);
        let client = OrdersClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        G { client, runs }
    }
}

/// The scope metadata entry: white space around the value is HTTP's optional white space
/// (trimmed, as the HTTP shims do), any other difference is another scope or a refusal, never
/// a replay of another tenant's response; absent, repeated or blank: INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_scope_metadata_white_space_and_repeats() {
    let mut g = grpc::start(|l| l.scope_metadata("X-Tenant-ID")).await;
    let k = key();
    let kmd = grpc::key_md(&k);
    let mut broken = Vec::new();
    let first = g.call("ECHO", 1, &[kmd, ("x-tenant-id", b"alice")]).await;
    assert!(
        first.starts_with("OK run=1 ") && first.ends_with("scope=alice"),
        "{first}"
    );
    let replay = first.replacen("OK", "OK replayed", 1);
    for same in [&b" alice"[..], b"alice ", b"\talice\t", b"  alice \t "] {
        let got = g.call("ECHO", 1, &[kmd, ("x-tenant-id", same)]).await;
        if got != replay {
            broken.push(format!(
                "{:?} (alice with OWS): want the replay, got {got}",
                String::from_utf8_lossy(same)
            ));
        }
    }
    for other in [
        "alice\u{a0}",
        "\u{a0}alice",
        "alice\u{3000}",
        "alice\u{85}",
        "Alice",
        "alice2",
    ] {
        let got = g
            .call("ECHO", 1, &[kmd, ("x-tenant-id", other.as_bytes())])
            .await;
        if got.contains("replayed") || got.ends_with("scope=alice") {
            broken.push(format!("{other:?}: took alice's scope: {got}"));
        }
        if !(got.starts_with("OK run=") || got.starts_with("InvalidArgument")) {
            broken.push(format!(
                "{other:?}: want a new run or INVALID_ARGUMENT, got {got}"
            ));
        }
    }
    let runs_before = g.runs();
    for values in [
        vec![],
        vec![&b"alice"[..], b"alice"],
        vec![&b"alice"[..], b"bob"],
        vec![&b""[..]],
        vec![&b"  \t "[..]],
        vec![&b""[..], b"alice"],
    ] {
        let mut md = vec![kmd];
        md.extend(values.iter().map(|v| ("x-tenant-id", *v)));
        let got = g.call("ECHO", 1, &md).await;
        if !got.starts_with("InvalidArgument ") {
            broken.push(format!(
                "scope entries {values:?}: want INVALID_ARGUMENT, got {got}"
            ));
        }
    }
    let long = "u".repeat(1025);
    let got = g
        .call("ECHO", 1, &[kmd, ("x-tenant-id", long.as_bytes())])
        .await;
    if !got.starts_with("InvalidArgument ") {
        broken.push(format!("1025-byte scope: want INVALID_ARGUMENT, got {got}"));
    }
    assert_eq!(g.runs(), runs_before, "a refused call ran");
    assert!(broken.is_empty(), "\n{}", broken.join("\n"));
}

/// A scope metadata value the layer cannot use (not printable ASCII, over 1024 bytes) is
/// refused; the HTTP shims answer `scope-invalid` ("cannot be used"), and take a UTF-8 value as
/// its own scope. The gRPC refusal must not tell the client that the entry is missing or
/// repeated when it sent exactly one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unusable_scope_metadata_is_not_reported_missing() {
    let mut g = grpc::start(|l| l.scope_metadata("x-tenant-id")).await;
    let mut wrong = Vec::new();
    let long = "u".repeat(1025);
    for value in ["josé".as_bytes(), b"alice\xa0", long.as_bytes()] {
        let k = key();
        let got = g
            .call("ECHO", 1, &[grpc::key_md(&k), ("x-tenant-id", value)])
            .await;
        let shown = String::from_utf8_lossy(&value[..value.len().min(12)]).into_owned();
        if got.starts_with("OK") {
            if got.contains("replayed") {
                wrong.push(format!("{shown:?}: replayed: {got}"));
            }
            continue;
        }
        if !got.starts_with("InvalidArgument ") || got.contains("send exactly one") {
            wrong.push(format!("{shown:?} (one entry sent): {got}"));
        }
    }
    assert_eq!(g.runs(), 0);
    assert!(
        wrong.is_empty(),
        "one scope metadata entry whose value cannot be a scope is refused as missing or \
         repeated (Scope::extract maps a failed HeaderValue::to_str and a failed \
         validate_scope to scope_metadata_missing; the HTTP shims answer scope-invalid for \
         these, and accept UTF-8 such as `josé` as a scope):\n{}",
        wrong.join("\n")
    );
}

/// `-bin` metadata: a key sent as `idempotency-key-bin` is no key (the call passes through,
/// or is refused where the key is required); a scope taken from a `-bin` entry is the same
/// scope whatever the base64 padding (tonic's own MetadataValue equality ignores it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_binary_key_metadata_is_no_key() {
    let mut g = grpc::start(|l| l).await;
    let k = key();
    let b64 = |s: &str| {
        // The key's bytes in unpadded base64 (tonic's encoding).
        let v = tonic::metadata::BinaryMetadataValue::from_bytes(s.as_bytes());
        v.as_encoded_bytes().to_vec()
    };
    let enc = b64(&k);
    let a = g.call("ECHO", 1, &[("idempotency-key-bin", &enc)]).await;
    let b = g.call("ECHO", 1, &[("idempotency-key-bin", &enc)]).await;
    assert_eq!(
        (a.as_str(), b.as_str()),
        ("OK run=1 key=none", "OK run=2 key=none")
    );
    let mut g = grpc::start(|l| l.require_key(true)).await;
    let got = g.call("ECHO", 1, &[("idempotency-key-bin", &enc)]).await;
    assert!(got.starts_with("InvalidArgument "), "{got}");
    assert_eq!(g.runs(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_binary_scope_metadata_padding_is_one_scope() {
    let mut g = grpc::start(|l| l.scope_metadata("x-tenant-bin")).await;
    let k = key();
    let kmd = grpc::key_md(&k);
    // "alice" in base64: unpadded (what tonic sends) and padded (what other gRPC stacks and
    // proxies may send); tonic decodes both to the same bytes.
    let first = g
        .call("ORDER", 1, &[kmd, ("x-tenant-bin", b"YWxpY2U")])
        .await;
    assert!(first.starts_with("OK run=1 "), "{first}");
    let padded = g
        .call("ORDER", 1, &[kmd, ("x-tenant-bin", b"YWxpY2U=")])
        .await;
    // Another tenant's bytes are another scope.
    let bob = g.call("ORDER", 1, &[kmd, ("x-tenant-bin", b"Ym9i")]).await;
    assert!(
        bob.starts_with("OK run=") && !bob.contains("replayed"),
        "{bob}"
    );
    assert_eq!(
        padded,
        first.replacen("OK", "OK replayed", 1),
        "the retry of tenant b\"alice\" with its -bin scope metadata padded (`YWxpY2U=` for \
         `YWxpY2U`, the same bytes to tonic) ran the method again ({} runs): Scope::extract \
         uses the entry's base64 text as the scope instead of the decoded bytes",
        g.runs() - 1
    );
}

/// The key metadata entry: repeated or comma-folded is INVALID_ARGUMENT and nothing runs;
/// upper-case or quoted UUIDs are the same key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_key_metadata_repeated_folded_and_forms() {
    let mut g = grpc::start(|l| l.scope_metadata("x-tenant-id")).await;
    let (a, b) = (key(), key());
    let t: (&str, &[u8]) = ("x-tenant-id", b"acme");
    for md in [
        vec![grpc::key_md(&a), grpc::key_md(&a), t],
        vec![grpc::key_md(&a), grpc::key_md(&b), t],
        vec![grpc::key_md(&a), grpc::key_md(&b), grpc::key_md(&a), t],
        vec![("idempotency-key", b"".as_slice()), grpc::key_md(&a), t],
    ] {
        let got = g.call("ECHO", 1, &md).await;
        assert!(
            got.starts_with("InvalidArgument send exactly one"),
            "{md:?}: {got}"
        );
    }
    let folded = format!("{a}, {b}");
    let got = g.call("ECHO", 1, &[grpc::key_md(&folded), t]).await;
    assert!(got.starts_with("InvalidArgument "), "folded: {got}");
    for bad in [
        &b"caf\xc3\xa9"[..],
        b"\xff",
        b"\"unterminated",
        b"not-a-uuid",
        b"",
    ] {
        let got = g.call("ECHO", 1, &[("idempotency-key", bad), t]).await;
        assert!(
            got.starts_with("InvalidArgument "),
            "{:?}: {got}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(g.runs(), 0, "a refused call ran");
    let upper = a.to_ascii_uppercase();
    let first = g.call("ECHO", 1, &[grpc::key_md(&upper), t]).await;
    assert_eq!(first, format!("OK run=1 key={a} scope=acme"));
    let quoted = format!("\"{upper}\"");
    let again = g.call("ECHO", 1, &[grpc::key_md(&quoted), t]).await;
    assert_eq!(again, first.replacen("OK", "OK replayed", 1));
    assert_eq!(g.runs(), 1);
}

/// A retry whose message differs is refused (FAILED_PRECONDITION) without running; the same
/// key in another scope runs; the same message replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_retry_with_another_message_is_refused() {
    let mut g = grpc::start(|l| l.scope_metadata("x-tenant-id")).await;
    let k = key();
    let t: (&str, &[u8]) = ("x-tenant-id", b"acme");
    let first = g.call("ORDER", 1, &[grpc::key_md(&k), t]).await;
    assert!(first.starts_with("OK run=1 "), "{first}");
    for (sym, qty) in [("ORDER", 2), ("ORDEr", 1), ("ECHO", 1), ("ORDER", 0)] {
        let got = g.call(sym, qty, &[grpc::key_md(&k), t]).await;
        assert!(
            got.starts_with("FailedPrecondition "),
            "{sym} x{qty}: {got}"
        );
    }
    assert_eq!(g.runs(), 1);
    let again = g.call("ORDER", 1, &[grpc::key_md(&k), t]).await;
    assert_eq!(again, first.replacen("OK", "OK replayed", 1));
    let other = g
        .call("ORDER", 2, &[grpc::key_md(&k), ("x-tenant-id", b"zeta")])
        .await;
    assert!(
        other.starts_with("OK run=2 ") && other.ends_with("scope=zeta"),
        "{other}"
    );
    assert_eq!(g.runs(), 2);
}

/// Handler errors: transient codes are not stored (the retry runs again); PERMISSION_DENIED is
/// stored and replayed with its metadata, as documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_handler_error_statuses() {
    let mut g = grpc::start(|l| l).await;
    for sym in ["INTERNAL", "UNAVAILABLE", "ABORTED", "UNKNOWN"] {
        let k = key();
        let before = g.runs();
        let a = g.call(sym, 1, &[grpc::key_md(&k)]).await;
        let b = g.call(sym, 1, &[grpc::key_md(&k)]).await;
        assert!(
            !a.contains("replayed") && !b.contains("replayed"),
            "{sym}: {a} / {b}"
        );
        assert_eq!(g.runs() - before, 2, "{sym} was stored: {a} / {b}");
    }
    let k = key();
    let before = g.runs();
    let a = g.call("DENIED", 1, &[grpc::key_md(&k)]).await;
    let b = g.call("DENIED", 1, &[grpc::key_md(&k)]).await;
    assert!(a.starts_with("PermissionDenied denied on run"), "{a}");
    assert_eq!(
        b,
        a.replacen("PermissionDenied", "PermissionDenied replayed", 1)
    );
    assert_eq!(g.runs() - before, 1);
}

/// Other inputs, for parity: a path no route matches (with a bad key, with a good one that is
/// then used on a real route), methods the layer does not cover, an invalid JSON body under a
/// JSON content type, an empty body, the query string, and a comma in the scope header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_other_inputs() {
    parity(scenario!(|s, log| {
        let c = client();
        let user: (&str, &[u8]) = ("x-user-id", b"u1");
        let k = key();
        let kh: (&str, &[u8]) = ("idempotency-key", k.as_bytes());
        let st = |r: reqwest::Response| r.status().as_u16().to_string();
        log.want_eq(
            "unrouted, bad key",
            st(send(&c, &s.url("/nope"), &[user, ("idempotency-key", b"bad")]).await),
            "404",
        );
        log.want_eq(
            "unrouted, good key",
            st(send(&c, &s.url("/nope"), &[user, kh]).await),
            "404",
        );
        log.want(
            "the key on a route",
            outcome(send(&c, &s.url("/echo"), &[user, kh]).await).await,
            |g| g.starts_with("201 {"),
            "a run",
        );
        for m in ["PUT", "DELETE", "GET"] {
            let r = c
                .request(
                    reqwest::Method::from_bytes(m.as_bytes()).unwrap(),
                    s.url("/echo"),
                )
                .header("x-user-id", "u1")
                .header("idempotency-key", "bad")
                .send()
                .await
                .unwrap();
            // The framework's answer (Axum 405, Actix 404): the layer only lets it through.
            let passed = if r.status().as_u16() == 400 {
                "refused"
            } else {
                "passed through"
            };
            log.want_eq(format!("{m} with a bad key"), passed, "passed through");
        }
        let k2 = key();
        let h2: [(&str, &[u8]); 2] = [user, ("idempotency-key", k2.as_bytes())];
        let first = outcome(send_body(&c, &s.url("/echo"), &h2, b"{\"a\":1,}").await).await;
        log.see("invalid JSON", mask_uuids(&first));
        log.want_eq(
            "invalid JSON again",
            mask_uuids(&outcome(send_body(&c, &s.url("/echo"), &h2, b"{\"a\":1,}").await).await),
            &mask_uuids(&first.replacen("201", "201 replayed", 1)),
        );
        log.want_eq(
            "invalid JSON re-spaced",
            outcome(send_body(&c, &s.url("/echo"), &h2, b"{\"a\": 1,}").await).await,
            "422 key-reused",
        );
        let k3 = key();
        let h3: [(&str, &[u8]); 2] = [user, ("idempotency-key", k3.as_bytes())];
        let first = outcome(send_body(&c, &s.url("/echo"), &h3, b"").await).await;
        log.see("empty body", mask_uuids(&first));
        log.want_eq(
            "empty body again",
            mask_uuids(&outcome(send_body(&c, &s.url("/echo"), &h3, b"").await).await),
            &mask_uuids(&first.replacen("201", "201 replayed", 1)),
        );
        let k4 = key();
        let h4: [(&str, &[u8]); 2] = [user, ("idempotency-key", k4.as_bytes())];
        log.see(
            "query a,b",
            mask_uuids(&outcome(send(&c, &s.url("/echo?a=1&b=2"), &h4).await).await),
        );
        log.see(
            "query b,a",
            outcome(send(&c, &s.url("/echo?b=2&a=1"), &h4).await).await,
        );
        let k5 = key();
        log.see(
            "scope with a comma",
            mask_uuids(
                &outcome(
                    send(
                        &c,
                        &s.url("/echo"),
                        &[("idempotency-key", k5.as_bytes()), ("x-user-id", b"u1, u2")],
                    )
                    .await,
                )
                .await,
            ),
        );
        log.see("runs", s.runs().to_string());
    }))
    .await;
}
