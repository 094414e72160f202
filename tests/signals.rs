//! The three examples stop cleanly on SIGTERM (what systemd, Docker and Kubernetes send) and on
//! SIGINT (Ctrl-C): each serves a request, gets the signal, finishes, shuts its store down and
//! exits with success, leaving its database closed properly (the record committed, no WAL left
//! behind, the file free for the next process). Issue #13, item 8: the Tonic example used to
//! handle Ctrl-C only, so SIGTERM killed it without its shutdown.
//!
//! Each example's own `main` runs in a child process: this test binary, re-executed to run
//! `signals_child`, which calls it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

#[allow(dead_code)]
#[path = "../examples/axum_server.rs"]
mod axum_example;

#[allow(dead_code)]
#[path = "../examples/actix_server.rs"]
mod actix_example;

#[allow(dead_code)]
#[path = "../examples/tonic_server.rs"]
mod tonic_example;

#[allow(unreachable_pub, missing_docs, clippy::all, clippy::pedantic)]
mod orders {
    include!("../examples/generated/orders.rs");
}

const ENV_EXAMPLE: &str = "IDEM_SIGNALS_EXAMPLE";

/// Run by the tests below in a child process; does nothing in a normal run.
#[test]
#[ignore = "run by the tests of this file in a child process"]
fn signals_child() {
    let Ok(example) = std::env::var(ENV_EXAMPLE) else {
        return;
    };
    let result = match example.as_str() {
        "axum" => axum_example::main(),
        "actix" => actix_example::main(),
        "tonic" => tonic_example::main(),
        other => panic!("unknown example {other}"),
    };
    result.unwrap();
    println!("EXITED");
}

struct Example {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Example {
    /// Starts `example` in `dir` on a port the OS picks, and waits for the address it logs.
    fn start(example: &str, dir: &Path) -> (Example, String) {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "signals_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .current_dir(dir)
            .env(ENV_EXAMPLE, example)
            .env("ADDR", "127.0.0.1:0")
            .env("TONIC_SERVER_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut ex = Example {
            child,
            lines,
            seen: Vec::new(),
        };
        let addr = ex.wait_for(|line| {
            let at = line.find("127.0.0.1:")?;
            let port: String = line[at + 10..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            (line.contains("listening") && !port.is_empty() && port != "0")
                .then(|| format!("127.0.0.1:{port}"))
        });
        (ex, addr)
    }

    fn wait_for<T>(&mut self, mut found: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = found(&line);
                    self.seen.push(line);
                    if let Some(t) = hit {
                        return t;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("timed out; output: {:#?}", self.seen),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "the example exited ({:?}); output: {:#?}",
                        self.child.wait(),
                        self.seen
                    )
                }
            }
        }
    }

    /// Sends `signal` and waits for the process to exit; returns whether it succeeded.
    fn stop_with(mut self, signal: &str) -> (bool, Vec<String>) {
        let sig = match signal {
            "TERM" => rustix::process::Signal::TERM,
            "INT" => rustix::process::Signal::INT,
            other => panic!("no signal {other}"),
        };
        rustix::process::kill_process(rustix::process::Pid::from_child(&self.child), sig).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "still running after {signal}");
            std::thread::sleep(Duration::from_millis(20));
        };
        self.seen.extend(self.lines.try_iter());
        (status.success(), std::mem::take(&mut self.seen))
    }
}

/// The database as the example left it: completed records, and whether WAL frames are left
/// (a clean shutdown checkpoints the WAL, and removes it).
fn after(db: &Path) -> (i64, bool) {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    let wal_left = std::fs::metadata(Path::new(&wal)).is_ok_and(|m| m.len() > 0);
    let conn = rusqlite::Connection::open(db).unwrap();
    let completed = conn
        .query_row(
            "SELECT count(*) FROM idempotency_records WHERE state = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    (completed, wal_left)
}

fn http_order(addr: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let r = reqwest::Client::new()
            .post(format!("http://{addr}/orders"))
            .header("idempotency-key", uuid::Uuid::new_v4().to_string())
            .header("x-user-id", "u1")
            .json(&serde_json::json!({"symbol": "AAPL", "quantity": 1, "price": 2.5}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    });
}

fn grpc_order(addr: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = orders::orders_client::OrdersClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut request = tonic::Request::new(orders::CreateOrderRequest {
            symbol: "AAPL".into(),
            quantity: 1,
            price: "2.50".into(),
        });
        request.metadata_mut().insert(
            "idempotency-key",
            uuid::Uuid::new_v4().to_string().parse().unwrap(),
        );
        client.create_order(request).await.unwrap();
    });
}

fn stops_cleanly(example: &str, signal: &str, db_name: &str, call: fn(&str)) {
    let dir = tempfile::tempdir().unwrap();
    let (ex, addr) = Example::start(example, dir.path());
    call(&addr);
    let (ok, output) = ex.stop_with(signal);
    assert!(
        ok,
        "{example} did not exit with success on {signal}: {output:#?}"
    );
    assert!(
        output.iter().any(|l| l.contains("stopped")) && output.iter().any(|l| l == "EXITED"),
        "{example} did not go through its shutdown on {signal}: {output:#?}"
    );
    let db = dir.path().join(db_name);
    assert_eq!(after(&db), (1, false), "{example} on {signal}");
    // The file is free for the next process.
    let engine = idempotency_rs::Engine::open(idempotency_rs::EngineConfig::new(&db)).unwrap();
    engine.shutdown().unwrap();
}

#[test]
fn the_axum_example_stops_cleanly_on_sigterm_and_sigint() {
    for signal in ["TERM", "INT"] {
        stops_cleanly("axum", signal, "idempotency.db", http_order);
    }
}

#[test]
fn the_actix_example_stops_cleanly_on_sigterm_and_sigint() {
    for signal in ["TERM", "INT"] {
        stops_cleanly("actix", signal, "idempotency.db", http_order);
    }
}

#[test]
fn the_tonic_example_stops_cleanly_on_sigterm_and_sigint() {
    for signal in ["TERM", "INT"] {
        stops_cleanly("tonic", signal, "tonic_server.db", grpc_order);
    }
}
