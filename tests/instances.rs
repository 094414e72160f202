//! Several instances on one PostgreSQL database, each in a process of its own, driven from
//! outside over HTTP: three copies of the Axum example (`examples/axum_server.rs`, its real
//! `main`, with `IDEMPOTENCY_STORE_URL` naming the test server) take 100 concurrent identical
//! requests spread across them, and run the operation once; an instance killed with SIGKILL
//! in the middle of a request frees its key after the lock timeout, and a retry through
//! another instance runs it once.

#[path = "../examples/axum_server.rs"]
#[allow(dead_code, unreachable_pub)]
mod axum_example;
mod pg;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{Value, json};

const ENV_MODE: &str = "IDEM_INSTANCE_MODE";

/// Run by the tests below in a child process; does nothing in a normal run.
#[test]
#[ignore = "run by the tests of this file in a child process"]
fn instance_child() {
    let Ok(mode) = std::env::var(ENV_MODE) else {
        return;
    };
    match mode.as_str() {
        "example" => axum_example::main().unwrap(),
        "slow" => slow_main(),
        other => panic!("unknown mode {other}"),
    }
}

/// An instance whose `POST /slow` says when it starts and then takes a minute: the one killed
/// mid-request. Lock timeout 2 s.
fn slow_main() {
    use axum::routing::post;
    use idempotency_rs::axum_integration::idempotency_layer;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = std::env::var("IDEMPOTENCY_STORE_URL").unwrap();
        let config = idempotency_rs::EngineConfig::from_url(&url)
            .unwrap()
            .lock_timeout(Duration::from_secs(2));
        let engine = idempotency_rs::Engine::open_async(config).await.unwrap();
        let app = axum::Router::new()
            .route(
                "/slow",
                post(|| async {
                    println!("slow operation started on {}", std::process::id());
                    if std::env::var("IDEM_SLOW").is_ok() {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    println!("slow operation finished on {}", std::process::id());
                    (
                        axum::http::StatusCode::CREATED,
                        format!("ran on {}", std::process::id()),
                    )
                }),
            )
            .route_layer(idempotency_layer(&engine).scope_header("X-User-ID"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("listening on http://{}", listener.local_addr().unwrap());
        axum::serve(listener, app).await.unwrap();
    });
}

struct Instance {
    child: Child,
    addr: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Instance {
    fn start(mode: &str, url: &str, extra: &[(&str, &str)]) -> Instance {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "instance_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV_MODE, mode)
        .env("IDEMPOTENCY_STORE_URL", url)
        .env("ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let all = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                all.lock().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let addr = wait_for_line(&rx, &lines, |line| {
            let at = line.find("127.0.0.1:")?;
            let port: String = line[at + 10..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            (line.contains("listening") && !port.is_empty() && port != "0")
                .then(|| format!("127.0.0.1:{port}"))
        });
        Instance { child, addr, lines }
    }

    fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    fn kill9(&mut self) {
        // `Child::kill` is SIGKILL on Unix: no shutdown, no release, no completion.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

fn wait_for_line<T>(
    rx: &Receiver<String>,
    all: &Mutex<Vec<String>>,
    mut found: impl FnMut(&str) -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                if let Some(t) = found(&line) {
                    return t;
                }
            }
            Err(RecvTimeoutError::Timeout) => panic!("timed out; output: {:#?}", all.lock()),
            Err(RecvTimeoutError::Disconnected) => panic!("the instance exited: {:#?}", all.lock()),
        }
    }
}

/// The test server's URL with the instances' tables in `schema` (created here).
fn url_in_fresh_schema() -> String {
    let table = pg::fresh_table();
    let schema = table.split('.').next().unwrap().to_owned();
    pg::execute(&format!("CREATE SCHEMA {schema}"));
    let url = pg::url();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20search_path%3D{schema}&application_name={schema}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_run_a_hundred_concurrent_identical_requests_once() {
    let url = url_in_fresh_schema();
    let schema = url.rsplit("application_name=").next().unwrap().to_owned();
    let instances: Vec<Instance> = (0..3)
        .map(|_| Instance::start("example", &url, &[]))
        .collect();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for round in 0..5 {
        let key = uuid::Uuid::new_v4().to_string();
        let body = json!({"symbol": "AAPL", "quantity": 10 + round, "price": 187.25});
        let answers = futures_util::future::join_all((0..100).map(|i| {
            let (client, key, body) = (client.clone(), key.clone(), body.clone());
            let addr = instances[i % 3].addr.clone();
            async move {
                // A client that keeps its key and retries 409 and 503, as a client should.
                loop {
                    let r = client
                        .post(format!("http://{addr}/orders"))
                        .header("Idempotency-Key", &key)
                        .header("X-User-ID", "u1")
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    match r.status().as_u16() {
                        409 | 503 => tokio::time::sleep(Duration::from_millis(20)).await,
                        201 => return r.json::<Value>().await.unwrap(),
                        other => panic!("{other}: {}", r.text().await.unwrap()),
                    }
                }
            }
        }))
        .await;
        let ids: std::collections::HashSet<_> =
            answers.iter().map(|a| a["order_id"].clone()).collect();
        assert_eq!(
            ids.len(),
            1,
            "round {round}: {} different orders",
            ids.len()
        );
        let runs: usize = instances
            .iter()
            .map(|x| {
                x.count(&format!("idempotency_key=\"{key}\""))
                    + x.count(&format!("idempotency_key={key}"))
            })
            .sum();
        let created: usize = instances.iter().map(|x| x.count("order created")).sum();
        assert_eq!(
            created,
            round as usize + 1,
            "round {round}: {runs} runs of this key"
        );
        // Between rounds, every database connection of the three instances is terminated:
        // the next round's requests find them gone, and the instances reconnect by themselves.
        pg::execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{schema}'"
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_request_frees_the_key_after_the_lock_timeout() {
    let url = url_in_fresh_schema();
    let mut doomed = Instance::start("slow", &url, &[("IDEM_SLOW", "1")]);
    let survivor = Instance::start("slow", &url, &[]);
    let client = reqwest::Client::new();
    let key = uuid::Uuid::new_v4().to_string();
    let send = |addr: String| {
        let (client, key) = (client.clone(), key.clone());
        async move {
            client
                .post(format!("http://{addr}/slow"))
                .header("Idempotency-Key", &key)
                .header("X-User-ID", "u1")
                .body("{}")
                .header("content-type", "application/json")
                .send()
                .await
        }
    };
    let first = tokio::spawn(send(doomed.addr.clone()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while doomed.count("slow operation started") == 0 {
        assert!(Instant::now() < deadline, "the first request never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed_at = Instant::now();
    doomed.kill9();
    assert!(
        first.await.unwrap().is_err(),
        "the killed instance answered"
    );
    // Right away, the key is still held by the dead instance's lease: in flight.
    let r = send(survivor.addr.clone()).await.unwrap();
    assert_eq!(r.status(), 409, "{}", r.text().await.unwrap());
    // After the lock timeout (2 s, by the database's clock), the retry runs it, once.
    let r = loop {
        let r = send(survivor.addr.clone()).await.unwrap();
        if r.status() != 409 {
            break r;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "the key was never freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(r.status(), 201);
    assert!(
        killed_at.elapsed() >= Duration::from_millis(1500),
        "freed before its lock timeout"
    );
    let ran = r.text().await.unwrap();
    assert_eq!(ran, format!("ran on {}", survivor.child.id()));
    let again = send(survivor.addr.clone()).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.text().await.unwrap(), ran);
    assert_eq!(survivor.count("slow operation finished"), 1);
}
