//! The Axum example's `/metrics`, scraped after a scripted sequence of requests: the exact
//! counts of claims by outcome, replays by source, rejections by kind, durations and leases,
//! on SQLite (and on PostgreSQL with the `postgres` feature).
//!
//! The example's own `main` runs in a child process (this test binary, re-executed to run
//! `metrics_child`): the recorder is global to a process, and the counts must be this
//! sequence's alone.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

#[allow(dead_code)]
#[path = "../examples/axum_server.rs"]
mod axum_example;

const ENV_CHILD: &str = "IDEM_METRICS_CHILD";

/// Run by the tests below in a child process; does nothing in a normal run.
#[test]
#[ignore = "run by the tests of this file in a child process"]
fn metrics_child() {
    if std::env::var(ENV_CHILD).is_ok() {
        axum_example::main().unwrap();
    }
}

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the example on a port the OS picks, on the store `url`.
fn start(dir: &std::path::Path, url: &str) -> Server {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "metrics_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .current_dir(dir)
        .env(ENV_CHILD, "1")
        .env("ADDR", "127.0.0.1:0")
        .env("IDEMPOTENCY_STORE_URL", url)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                if line.contains("listening on http://")
                    && let Some((_, addr)) = line.split_once("http://")
                {
                    let addr = addr.trim().to_owned();
                    std::thread::spawn(move || rx.into_iter().for_each(drop));
                    return Server { child, addr };
                }
                seen.push(line);
            }
            Err(RecvTimeoutError::Timeout) => panic!("no address; output: {seen:#?}"),
            Err(RecvTimeoutError::Disconnected) => {
                panic!("the example exited: {:?}; output: {seen:#?}", child.wait())
            }
        }
    }
}

/// The value of the sample `name{labels...}` (all of `labels` among its labels).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v.parse().unwrap())
}

async fn order(
    client: &reqwest::Client,
    addr: &str,
    user: Option<&str>,
    key: &str,
    quantity: u32,
) -> reqwest::Response {
    let mut req = client
        .post(format!("http://{addr}/orders"))
        .header("Idempotency-Key", key)
        .json(&serde_json::json!({"symbol": "ACME", "quantity": quantity, "price": 2.5}));
    if let Some(user) = user {
        req = req.header("X-User-ID", user);
    }
    req.send().await.unwrap()
}

/// The scripted sequence, then the scrape; `backend` is the label every sample carries.
async fn scripted(addr: &str, backend: &str) {
    let client = reqwest::Client::new();
    let (a, b) = (
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
    );
    // 1. a fresh key: claimed, run, completed.
    assert_eq!(order(&client, addr, Some("u1"), &a, 1).await.status(), 201);
    // 2. its retry: replayed (read from the store); 3. again: replayed (from the cache on
    // SQLite, where the read connection cached it).
    for _ in 0..2 {
        let r = order(&client, addr, Some("u1"), &a, 1).await;
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["idempotent-replayed"], "true");
    }
    // 4. the same key with another body: a mismatch, rejected as key-reused.
    assert_eq!(order(&client, addr, Some("u1"), &a, 2).await.status(), 422);
    // 5. a key that is not a UUID: rejected before any claim.
    assert_eq!(
        order(&client, addr, Some("u1"), "nope", 1).await.status(),
        400
    );
    // 6. no user: no scope, rejected before any claim.
    assert_eq!(order(&client, addr, None, &b, 1).await.status(), 400);
    // 7. a second fresh key.
    assert_eq!(order(&client, addr, Some("u1"), &b, 1).await.status(), 201);

    // Claims and replays are counted per thread and reach the recorder within a second (the
    // writer adds them up every second): scrape until the five claims are there, then check
    // every figure, exactly.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let claims: f64 = ["claimed", "replayed", "in_flight", "mismatch"]
            .iter()
            .filter_map(|o| {
                sample(
                    &text,
                    "idempotency_claims_total",
                    &[("backend", backend), ("outcome", o)],
                )
            })
            .sum();
        if claims >= 5.0 || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let got = |name: &str, labels: &[(&str, &str)]| {
        let mut all = vec![("backend", backend)];
        all.extend_from_slice(labels);
        sample(&text, name, &all)
    };
    let claims = |outcome| got("idempotency_claims_total", &[("outcome", outcome)]);
    assert_eq!(claims("claimed"), Some(2.0), "{text}");
    assert_eq!(claims("replayed"), Some(2.0), "{text}");
    assert_eq!(claims("mismatch"), Some(1.0), "{text}");
    assert_eq!(claims("in_flight"), Some(0.0), "{text}");
    let replays = |source| got("idempotency_replays_total", &[("source", source)]);
    let total: f64 = ["cache", "read_connection", "writer"]
        .into_iter()
        .map(|s| replays(s).unwrap_or_else(|| panic!("no replays{{source={s}}}: {text}")))
        .sum();
    assert_eq!(total, 2.0, "{text}");
    if backend == "sqlite" {
        // The first retry was read on a read connection, which cached it for the second.
        assert_eq!(replays("read_connection"), Some(1.0), "{text}");
        assert_eq!(replays("cache"), Some(1.0), "{text}");
    }
    let rejections = |kind| got("idempotency_rejections_total", &[("kind", kind)]);
    assert_eq!(rejections("key-reused"), Some(1.0), "{text}");
    assert_eq!(rejections("key-invalid"), Some(1.0), "{text}");
    assert_eq!(rejections("scope-missing"), Some(1.0), "{text}");
    assert_eq!(rejections("request-in-flight"), None, "{text}");
    // Five claims: the two the writer answered are timed, and some of the three answered
    // without it (one in 16 is sampled); two completions, no lease left, no error.
    assert_eq!(
        got(
            "idempotency_claim_duration_seconds_count",
            &[("path", "writer")]
        ),
        Some(2.0),
        "{text}"
    );
    let read = got(
        "idempotency_claim_duration_seconds_count",
        &[("path", "read")],
    );
    assert!(read.is_none_or(|n| n <= 3.0), "{text}");
    assert_eq!(
        got("idempotency_complete_duration_seconds_count", &[]),
        Some(2.0),
        "{text}"
    );
    assert_eq!(got("idempotency_leases", &[]), Some(0.0), "{text}");
    assert!(!text.contains("idempotency_errors_total"), "{text}");
    // The writer committed batches: at least the two claims and two completions (a batch
    // may hold several), and histograms have buckets.
    let batches = got("idempotency_batch_size_count", &[]).unwrap();
    let commands = got("idempotency_batch_size_sum", &[]).unwrap();
    assert!(batches >= 1.0 && commands >= 4.0, "{text}");
    assert!(
        text.contains("idempotency_claim_duration_seconds_bucket{"),
        "{text}"
    );
    assert!(got("idempotency_queue_depth", &[]).is_some(), "{text}");
    if backend == "sqlite" {
        // Durability::Full: the syncer flushed the WAL before each completion was answered.
        assert!(
            got("idempotency_flush_duration_seconds_count", &[]).unwrap() >= 1.0,
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_axum_example_serves_exact_counts_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), "sqlite:idempotency.db");
    scripted(&server.addr, "sqlite").await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_axum_example_serves_exact_counts_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let url = std::env::var("IDEMPOTENCY_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let server = start(dir.path(), &url);
    scripted(&server.addr, "postgres").await;
}
