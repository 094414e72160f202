//! Exactly once through a hostile network, end to end: the retrying clients
//! (`client::RetryMiddleware`, `client::grpc::RetryLayer`) against the Axum, Actix-Web and
//! Tonic example services through the fault-injecting proxy of `examples/chaos`, which drops
//! answers after forwarding requests, resets connections in the middle of requests and holds
//! answers back past the client's timeout; once more with the Axum service in a child process
//! killed with SIGKILL and restarted; and the plain reqwest client retrying without a key, which
//! must show the duplicates the key prevents.
//!
//! Each run counts the orders the service placed: every operation exactly once, every caller
//! holding the id of its one order, no failed call.

#[path = "../examples/chaos/main.rs"]
#[allow(dead_code, unreachable_pub)]
mod chaos;

use std::path::PathBuf;
use std::process::Command;

use chaos::{Report, Run};

const ENV_STORE: &str = "CHAOS_CHILD_STORE";
const ENV_LEDGER: &str = "CHAOS_CHILD_LEDGER";

fn run() -> Run {
    Run {
        ops: 600,
        concurrency: 16,
        seed: 11,
        ..Run::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// The proxy did what it is for: answers were lost after the operation ran, requests reset,
/// answers held back (over HTTP, a connection per attempt); connections cut under the calls
/// (over gRPC's one connection).
fn assert_hostile(report: &Report, http: bool) {
    let [dropped, reset, delayed, cut] = report.faults;
    let hostile = if http {
        dropped > 0 && reset > 0 && delayed > 0
    } else {
        cut > 0
    };
    assert!(
        hostile && report.retried > 0,
        "the network was not hostile: {report:?}"
    );
}

fn assert_exactly_once(report: &Report, http: bool) {
    chaos::print(std::slice::from_ref(report));
    assert_hostile(report, http);
    assert_eq!(
        report.unkeyed, 0,
        "calls came back without their key or id: {report:?}"
    );
    assert_eq!(report.failed, 0, "calls failed: {report:?}");
    assert_eq!(report.duplicates, 0, "operations ran twice: {report:?}");
    assert_eq!(
        report.wrong_ids, 0,
        "callers hold ids of other orders: {report:?}"
    );
    assert_eq!(report.executions, report.ops, "{report:?}");
    assert!(
        report.replayed > 0,
        "no answer was lost and replayed: {report:?}"
    );
    assert!(report.passed());
}

#[test]
fn axum_exactly_once_and_the_keyless_contrast() {
    let dir = tempfile::tempdir().unwrap();
    let rows = runtime().block_on(chaos::axum_rows(&run(), dir.path()));
    assert_exactly_once(&rows[0], true);
    let keyless = &rows[1];
    chaos::print(std::slice::from_ref(keyless));
    assert!(
        keyless.duplicates > 0 && keyless.executions > keyless.ops,
        "retrying without a key through the same network must place orders twice: {keyless:?}"
    );
}

#[test]
fn actix_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let row = runtime().block_on(chaos::actix_row(&run(), dir.path()));
    assert_exactly_once(&row, true);
}

#[test]
fn tonic_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let row = runtime().block_on(chaos::tonic_row(&run(), dir.path()));
    assert_exactly_once(&row, false);
}

/// Run by `axum_killed_and_restarted` in a child process; does nothing in a normal run.
#[test]
#[ignore = "the server child of axum_killed_and_restarted"]
fn chaos_server_child() {
    if let (Ok(store), Ok(ledger)) = (std::env::var(ENV_STORE), std::env::var(ENV_LEDGER)) {
        chaos::serve_axum_child(&PathBuf::from(store), &PathBuf::from(ledger));
    }
}

#[test]
fn axum_killed_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let row = runtime().block_on(chaos::kill_row(&run(), dir.path(), |store, ledger| {
        let mut c = Command::new(&exe);
        c.args([
            "--exact",
            "chaos_server_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV_STORE, store)
        .env(ENV_LEDGER, ledger);
        c
    }));
    chaos::print(std::slice::from_ref(&row));
    assert_hostile(&row, true);
    assert_eq!(row.unkeyed, 0, "{row:?}");
    assert_eq!(row.failed, 0, "calls failed: {row:?}");
    assert_eq!(row.duplicates, 0, "operations ran twice: {row:?}");
    assert_eq!(row.wrong_ids, 0, "{row:?}");
    assert_eq!(row.executions, row.ops, "{row:?}");
    // The ledger keeps orders by key, so a second run of a key shows as a recovery: only the
    // calls in flight when the process died can have one.
    assert!(row.recovered <= run().concurrency, "{row:?}");
    assert!(row.passed());
}

/// The crash window, closed by the service: a run whose record was lost (the process died
/// after the order was written and before its response was stored) finds the order under its
/// key in the service's own ledger and answers it, instead of placing a second one.
#[test]
fn a_run_after_a_lost_record_finds_its_order() {
    use chaos::axum_example::{Orders, app};
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("orders");
    let key = "1f2e3d4c-5b6a-4978-8a9b-0c1d2e3f4a5b";
    let send = |store: &str| {
        let engine =
            idempotency_rs::Engine::open(idempotency_rs::EngineConfig::new(dir.path().join(store)))
                .unwrap();
        let orders = std::sync::Arc::new(Orders::with_ledger(&ledger).unwrap());
        let router = app(&engine, orders.clone());
        let body = runtime().block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, router).await });
            reqwest::Client::new()
                .post(format!("http://{addr}/orders"))
                .header("x-user-id", "u")
                .header("idempotency-key", key)
                .header("content-type", "application/json")
                .body(r#"{"symbol":"A","quantity":1,"price":2.0}"#)
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        });
        (body["order_id"].as_str().unwrap().to_owned(), orders)
    };
    let (first, orders) = send("first.db");
    assert_eq!((orders.created(), orders.recovered()), (1, 0));
    // A new store: the record of the first run is gone, as after a crash before it committed.
    let (second, orders) = send("second.db");
    assert_eq!(
        second, first,
        "the second run must answer the order already placed"
    );
    assert_eq!((orders.created(), orders.recovered()), (0, 1));
    assert_eq!(std::fs::read_to_string(&ledger).unwrap().lines().count(), 1);
}
