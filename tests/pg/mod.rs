//! The PostgreSQL the tests use (`mod pg;`): `IDEMPOTENCY_TEST_PG_URL`, by default the
//! machine's server at 127.0.0.1:5432 (user `postgres`, database `test`). `make test`
//! (scripts/test.sh) starts a private throwaway server when none answers there; a test that
//! finds none fails with a message saying so, it never skips.
//!
//! Every engine a test opens gets a schema of its own (`idem_<pid>_<n>`), so tests running at
//! once never see each other's records; the schemas of test processes that are gone are
//! dropped by the next run.
#![allow(dead_code, unreachable_pub)]

use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

use idempotency_rs::EngineConfig;

pub mod proxy;

pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The server's URL.
pub fn url() -> String {
    std::env::var("IDEMPOTENCY_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// The test server's URL with other parameters appended.
pub fn url_with(extra: &str) -> String {
    let url = url();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{extra}")
}

/// A raw session on the test server, on a thread of its own, driven statement by statement
/// (to hold locks or open transactions at chosen moments).
pub struct Session {
    tx: std::sync::mpsc::Sender<(String, std::sync::mpsc::Sender<Result<(), String>>)>,
}

impl Session {
    pub fn new() -> Session {
        let (tx, rx) =
            std::sync::mpsc::channel::<(String, std::sync::mpsc::Sender<Result<(), String>>)>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let client = connect().await;
                ready_tx.send(()).unwrap();
                while let Ok((sql, reply)) = rx.recv() {
                    let r = client.batch_execute(&sql).await.map_err(|e| e.to_string());
                    let _ = reply.send(r);
                }
            });
        });
        ready.recv().unwrap();
        Session { tx }
    }

    /// Runs `sql` and waits for it.
    pub fn exec(&self, sql: &str) -> Result<(), String> {
        self.start(sql).recv().unwrap()
    }

    /// Sends `sql` without waiting for it.
    pub fn start(&self, sql: &str) -> std::sync::mpsc::Receiver<Result<(), String>> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx.send((sql.to_owned(), tx)).unwrap();
        rx
    }
}

/// A table no other test uses: `idem_<pid>_<n>.records`.
pub fn fresh_table() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    static SWEEP: Once = Once::new();
    SWEEP.call_once(sweep);
    format!(
        "idem_{}_{}.records",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

/// An engine configuration on a fresh table of the test server.
pub fn config() -> EngineConfig {
    EngineConfig::postgres(url()).table(fresh_table())
}

/// Runs SQL on the test server (simple protocol; several statements allowed), on a thread of
/// its own so that it works inside and outside an async runtime. Panics with a clear message
/// when no server answers.
pub fn execute(sql: &str) {
    query(sql);
}

/// Runs SQL (as [`execute`]) and returns the first column of every row it returned, as text.
pub fn query(sql: &str) -> Vec<Option<String>> {
    let sql = sql.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = connect().await;
            client
                .simple_query(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_owned)),
                    _ => None,
                })
                .collect()
        })
    })
    .join()
    .unwrap()
}

async fn connect() -> tokio_postgres::Client {
    let url = url();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no PostgreSQL answers at {url} ({e}): run the tests with `make test`, which starts \
                 a throwaway server when none runs, or set IDEMPOTENCY_TEST_PG_URL"
            )
        });
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Drops the schemas of earlier test processes that are gone.
fn sweep() {
    let schemas = query("SELECT nspname FROM pg_namespace WHERE nspname ~ '^idem_[0-9]+_[0-9]+$'");
    let mut drop = String::new();
    for name in schemas.into_iter().flatten() {
        let pid: u32 = name
            .split('_')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            drop.push_str(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE;"));
        }
    }
    if !drop.is_empty() {
        execute(&drop);
    }
}
