//! Helpers shared by the benches (`engine.rs`, `compare.rs`, `postgres.rs`, `http.rs`): the rows
//! every system under test writes, the two SQLite baselines (naive and raw ceiling),
//! pre-filling, peak-memory readings and the latency histogram.
//!
//! The baselines write the engine's own table: [`create_schema`] opens an [`Engine`] on the
//! file once (which creates the schema) and drops it, so rusqlite then works on exactly the
//! schema `src/sqlite/storage.rs` makes.

// Each bench binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use idempotency_rs::{
    ClaimOutcome, ClaimRequest, Durability, Engine, EngineConfig, Fingerprint, IdempotencyKey,
    StoredResponse,
};
use rusqlite::{Connection, ErrorCode, params};
use sha2::{Digest, Sha256};

/// The scope every benchmark uses.
pub(crate) const SCOPE: &str = "bench-tenant";

/// The response body every completion stores (a typical small JSON answer).
pub(crate) const BODY: &[u8] =
    br#"{"id":"ord_8f14e45fceea167a5a36dedd4bea2543","status":"created","amount":4200}"#;

/// The response every completion stores.
pub(crate) fn response() -> StoredResponse {
    StoredResponse::new(201, BODY).with_header("content-type", "application/json")
}

/// The request fingerprint every claim carries.
pub(crate) fn fingerprint() -> Fingerprint {
    Fingerprint::of_request("POST", "/orders", br#"{"amount":4200,"currency":"EUR"}"#)
}

/// A different fingerprint, for mismatches.
pub(crate) fn other_fingerprint() -> Fingerprint {
    Fingerprint::of_request("POST", "/orders", br#"{"amount":1,"currency":"EUR"}"#)
}

/// Fresh keys, unique within the process (and across runs on the same file, thanks to the
/// start time in the prefix).
pub(crate) struct Keys {
    prefix: String,
    next: AtomicU64,
}

impl Keys {
    pub(crate) fn new(tag: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Keys {
            prefix: format!("{tag}-{nanos:x}-"),
            next: AtomicU64::new(0),
        }
    }

    pub(crate) fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}{n}", self.prefix)
    }
}

/// A claim request for `key` with the standard fingerprint.
pub(crate) fn request(key: &str) -> ClaimRequest {
    ClaimRequest::new(SCOPE, IdempotencyKey::new(key).unwrap(), fingerprint())
}

/// An engine on the file `path` with the default configuration and `durability`.
pub(crate) fn open_engine(path: &Path, durability: Durability) -> Engine {
    Engine::open(EngineConfig::new(path).durability(durability)).unwrap()
}

/// One fresh claim and its completion through the blocking API.
pub(crate) fn claim_complete(engine: &Engine, key: &str) {
    match engine.claim(request(key)).unwrap() {
        ClaimOutcome::Claimed(lease) => lease.complete(response()).unwrap(),
        other => panic!("a fresh key was not claimed: {other:?}"),
    }
}

/// Creates the engine's schema in the file `path` (by opening and closing an engine).
pub(crate) fn create_schema(path: &Path) {
    let engine = open_engine(path, Durability::Full);
    engine.shutdown().unwrap();
}

/// Schema version 1 (a `WITHOUT ROWID` table keyed by the record id, as the engine wrote it
/// before version 2), for the raw baselines of `--only raw-v1`: every row lands on a random
/// leaf of the table, against version 2's rows appended in claim order ("fewer pages per
/// operation", BENCHMARKS.md). Same columns and indexes, so the raw statements run unchanged.
pub(crate) fn create_v1_schema(path: &Path) {
    let conn = baseline_connection(path, "FULL");
    conn.execute_batch(
        "CREATE TABLE idempotency_records (
             id           BLOB    NOT NULL PRIMARY KEY,
             scope        TEXT    NOT NULL,
             key          TEXT    NOT NULL,
             fingerprint  BLOB    NOT NULL,
             state        INTEGER NOT NULL,
             fence        INTEGER NOT NULL,
             locked_until INTEGER NOT NULL,
             expires_at   INTEGER NOT NULL,
             created_at   INTEGER NOT NULL,
             completed_at INTEGER,
             status       INTEGER,
             headers      BLOB,
             body         BLOB,
             trailers     BLOB
         ) WITHOUT ROWID;
         CREATE INDEX idempotency_records_expiry ON idempotency_records (expires_at);",
    )
    .unwrap();
}

/// Bytes this process has passed to `write`-family calls so far (`wchar` in `/proc/self/io`):
/// WAL frames plus checkpoint copies, for the raw baselines' bytes per row.
pub(crate) fn written_bytes() -> Option<u64> {
    std::fs::read_to_string("/proc/self/io")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The record id the engine derives from (scope, key): the same SHA-256 as `src/key.rs`, so
/// the baselines pay for the same hashing and write the same B-tree keys.
pub(crate) fn record_id(scope: &str, key: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"idempotency-rs/record/v1\0");
    h.update((scope.len() as u64).to_be_bytes());
    h.update(scope.as_bytes());
    h.update(key.as_bytes());
    h.finalize().into()
}

/// The headers column as the engine stores it (postcard over (name, value) pairs).
pub(crate) fn headers_blob() -> Vec<u8> {
    let headers: Vec<(&str, &[u8])> = vec![("content-type", b"application/json")];
    postcard::to_stdvec(&headers).unwrap()
}

/// Milliseconds since the epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

const DAY_MS: i64 = 24 * 3600 * 1000;

/// A connection for the baselines: WAL, the given `synchronous`, a busy timeout, and the
/// engine's cache size.
pub(crate) fn baseline_connection(path: &Path, synchronous: &str) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.busy_timeout(Duration::from_secs(30)).unwrap();
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .unwrap();
    assert!(mode.eq_ignore_ascii_case("wal"), "journal_mode is {mode}");
    conn.pragma_update(None, "synchronous", synchronous)
        .unwrap();
    conn.pragma_update(None, "cache_size", -16 * 1024).unwrap();
    conn
}

const INSERT_IN_FLIGHT: &str = "INSERT INTO idempotency_records
     (id, scope, key, fingerprint, state, fence, locked_until, expires_at, created_at)
     VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, ?7, ?8)";

/// What an application without the engine writes at completion (the naive baseline), and
/// what the engine wrote before schema 3 (the raw baseline on schema 1).
const UPDATE_COMPLETED_BY_ID: &str = "UPDATE idempotency_records
     SET state = 1, status = ?3, headers = ?4, body = ?5, trailers = NULL,
         completed_at = ?6, expires_at = ?7, locked_until = 0
     WHERE id = ?1 AND fence = ?2 AND state = 0";

/// The engine's usual completion (schema 3): the row by the rowid its insert got, checked
/// against id and fence; `replay_until` set, `expires_at` (and its index entry) left alone.
const UPDATE_COMPLETED: &str = "UPDATE idempotency_records
     SET state = 1, status = ?3, headers = ?4, body = ?5, trailers = NULL,
         completed_at = ?6, replay_until = ?7, locked_until = 0
     WHERE seq = ?8 AND id = ?1 AND fence = ?2 AND state = 0 AND expires_at >= ?7";

const INSERT_COMPLETED: &str = "INSERT INTO idempotency_records
     (id, scope, key, fingerprint, state, fence, locked_until, expires_at, created_at,
      completed_at, status, headers, body, trailers)
     VALUES (?1, ?2, ?3, ?4, 1, ?5, 0, ?6, ?7, ?7, 201, ?8, ?9, NULL)";

/// Runs `f` again while SQLite answers BUSY (past the busy timeout); counts the retries.
fn retry_busy<T>(retries: &mut u64, mut f: impl FnMut() -> rusqlite::Result<T>) -> T {
    loop {
        match f() {
            Ok(v) => return v,
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(e.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) =>
            {
                *retries += 1;
            }
            Err(e) => panic!("naive baseline: {e}"),
        }
    }
}

/// The naive approach, one operation: check-then-insert with one autocommit statement per
/// step (SELECT, INSERT the in-flight row, UPDATE it to completed). With `synchronous=FULL`
/// each write is its own fsynced transaction. Returns the BUSY retries it needed.
pub(crate) fn naive_op(conn: &Connection, key: &str, fence: i64) -> u64 {
    let mut retries = 0;
    let id = record_id(SCOPE, key);
    let fp = fingerprint();
    let now = now_ms();
    let found: Option<i64> = retry_busy(&mut retries, || {
        let mut stmt = conn.prepare_cached(
            "SELECT state FROM idempotency_records WHERE id = ?1 AND expires_at > ?2",
        )?;
        let mut rows = stmt.query(params![&id[..], now])?;
        rows.next()?.map(|r| r.get(0)).transpose()
    });
    assert!(
        found.is_none(),
        "naive baseline: a fresh key already exists"
    );
    retry_busy(&mut retries, || {
        conn.prepare_cached(INSERT_IN_FLIGHT)?.execute(params![
            &id[..],
            SCOPE,
            key,
            &fp.as_bytes()[..],
            fence,
            now + 30_000,
            now + 30_000 + DAY_MS,
            now,
        ])
    });
    let headers = headers_blob();
    let done = now_ms();
    let n = retry_busy(&mut retries, || {
        conn.prepare_cached(UPDATE_COMPLETED_BY_ID)?
            .execute(params![
                &id[..],
                fence,
                201,
                &headers,
                BODY,
                done,
                done + DAY_MS,
            ])
    });
    assert_eq!(n, 1, "naive baseline: the completion matched no row");
    retries
}

/// Raw ceiling, plain: inserts the completed rows of `keys` in one transaction (the connection
/// decides `synchronous`).
pub(crate) fn raw_insert_batch(conn: &Connection, keys: &[String], fence: i64) {
    let fp = fingerprint();
    let headers = headers_blob();
    let now = now_ms();
    let tx = conn.unchecked_transaction().unwrap();
    {
        let mut stmt = tx.prepare_cached(INSERT_COMPLETED).unwrap();
        for (i, key) in keys.iter().enumerate() {
            let id = record_id(SCOPE, key);
            stmt.execute(params![
                &id[..],
                SCOPE,
                key,
                &fp.as_bytes()[..],
                fence + i as i64,
                now + DAY_MS,
                now,
                &headers,
                BODY,
            ])
            .unwrap();
        }
    }
    tx.commit().unwrap();
}

/// Raw ceiling, engine-shaped: what the engine's writer does for a batch of fresh claims and
/// their completions, minus the engine. One transaction inserts the in-flight rows with
/// `synchronous=NORMAL` (no fsync), a second updates them to completed with
/// `synchronous=FULL` (fsync).
///
/// `v1`: the table is schema 1's (`create_v1_schema`): no rowid to find a row by and no
/// `replay_until`, so the completion is the one the engine ran then, by id.
pub(crate) fn raw_claim_complete_batch(conn: &Connection, keys: &[String], fence: i64, v1: bool) {
    let fp = fingerprint();
    let headers = headers_blob();
    let now = now_ms();
    let ids: Vec<[u8; 32]> = keys.iter().map(|k| record_id(SCOPE, k)).collect();
    conn.pragma_update(None, "synchronous", "NORMAL").unwrap();
    let mut rows = Vec::with_capacity(keys.len());
    let tx = conn.unchecked_transaction().unwrap();
    {
        let mut stmt = tx.prepare_cached(INSERT_IN_FLIGHT).unwrap();
        for (i, (id, key)) in ids.iter().zip(keys).enumerate() {
            stmt.execute(params![
                &id[..],
                SCOPE,
                key,
                &fp.as_bytes()[..],
                fence + i as i64,
                now + 30_000,
                now + 30_000 + DAY_MS,
                now,
            ])
            .unwrap();
            rows.push(tx.last_insert_rowid());
        }
    }
    tx.commit().unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    let done = now_ms();
    let tx = conn.unchecked_transaction().unwrap();
    {
        let mut stmt = tx
            .prepare_cached(if v1 {
                UPDATE_COMPLETED_BY_ID
            } else {
                UPDATE_COMPLETED
            })
            .unwrap();
        for (i, (id, row)) in ids.iter().zip(&rows).enumerate() {
            let (fence, expires) = (fence + i as i64, done + DAY_MS);
            let n = if v1 {
                stmt.execute(params![&id[..], fence, 201, &headers, BODY, done, expires])
            } else {
                stmt.execute(params![
                    &id[..],
                    fence,
                    201,
                    &headers,
                    BODY,
                    done,
                    expires,
                    row
                ])
            }
            .unwrap();
            assert_eq!(n, 1);
        }
    }
    tx.commit().unwrap();
}

/// Fills the table at `path` (schema already created) with `n` live, completed records, in
/// transactions of `chunk` rows with `synchronous=OFF` and a large cache. Returns the time it
/// took. Keys are `prefill-<i>`, so the ids land in random B-tree order, as real ones do.
pub(crate) fn prefill(path: &Path, n: u64, chunk: u64) -> Duration {
    prefill_records(path, n, chunk, false)
}

/// Like [`prefill`], but every record expired an hour ago: work for the engine's cleanup.
pub(crate) fn prefill_expired(path: &Path, n: u64, chunk: u64) -> Duration {
    prefill_records(path, n, chunk, true)
}

fn prefill_records(path: &Path, n: u64, chunk: u64, expired: bool) -> Duration {
    let start = Instant::now();
    let conn = baseline_connection(path, "OFF");
    conn.pragma_update(None, "cache_size", -1024 * 1024)
        .unwrap();
    let fp = fingerprint();
    let headers = headers_blob();
    let now = now_ms();
    let mut i = 0;
    while i < n {
        let end = (i + chunk).min(n);
        let tx = conn.unchecked_transaction().unwrap();
        {
            let mut stmt = tx.prepare_cached(INSERT_COMPLETED).unwrap();
            for j in i..end {
                let key = format!("prefill-{j}");
                let id = record_id(SCOPE, &key);
                // Spread expiries over the next day, as a day of traffic would.
                let expires = if expired {
                    now - 3_600_000 - j as i64
                } else {
                    now + DAY_MS - (n - j) as i64 * DAY_MS / n.max(1) as i64 + 3_600_000
                };
                stmt.execute(params![
                    &id[..],
                    SCOPE,
                    key,
                    &fp.as_bytes()[..],
                    j as i64 + 1,
                    expires,
                    now,
                    &headers,
                    BODY,
                ])
                .unwrap();
            }
        }
        tx.commit().unwrap();
        i = end;
    }
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    start.elapsed()
}

/// The size of the database file plus its WAL, in bytes.
pub(crate) fn db_size(path: &Path) -> u64 {
    let wal = path.with_extension("db-wal");
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    len(path) + len(&wal)
}

/// A `/proc/<pid>/status` field in KiB (`VmHWM`: peak resident set; `VmRSS`: now).
pub(crate) fn proc_status_kib(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// This process's peak resident set (VmHWM), in KiB.
pub(crate) fn peak_rss_kib() -> Option<u64> {
    proc_status_kib("self", "VmHWM")
}

/// Resets the peak resident set of process `pid` to its current size (Linux `clear_refs` 5),
/// so the next reading is the peak of what ran in between. False where the kernel refuses.
pub(crate) fn reset_peak_rss(pid: &str) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Splits `total` operations over `threads` workers as evenly as possible.
pub(crate) fn share(total: u64, threads: usize, index: usize) -> u64 {
    let t = threads as u64;
    total / t + u64::from((index as u64) < total % t)
}

/// A log-linear latency histogram (32 buckets per power of two, about 3% resolution), so a
/// caller's memory does not grow with the number of operations. It travels from a child
/// process to its parent as its non-empty buckets (`encode`, `decode`).
#[derive(Clone)]
pub(crate) struct Hist {
    counts: Vec<u64>,
}

const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;

impl Hist {
    pub(crate) fn new() -> Self {
        Hist {
            counts: vec![0; (64 * SUB) as usize],
        }
    }

    pub(crate) fn index(ns: u64) -> usize {
        if ns < SUB {
            return ns as usize;
        }
        let e = 63 - ns.leading_zeros();
        let m = (ns >> (e - SUB_BITS)) & (SUB - 1);
        ((u64::from(e - SUB_BITS + 1)) * SUB + m) as usize
    }

    pub(crate) fn value(i: usize) -> f64 {
        let i = i as u64;
        if i < SUB {
            return i as f64;
        }
        let e = i / SUB - 1 + u64::from(SUB_BITS);
        let m = i % SUB;
        let low = (SUB + m) << (e - u64::from(SUB_BITS));
        let width = 1u64 << (e - u64::from(SUB_BITS));
        low as f64 + width as f64 / 2.0
    }

    pub(crate) fn record(&mut self, ns: u64, n: u64) {
        self.counts[Self::index(ns)] += n;
    }

    pub(crate) fn merge(&mut self, other: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }

    pub(crate) fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub(crate) fn percentile_ms(&self, p: f64) -> f64 {
        let total = self.total();
        if total == 0 {
            return f64::NAN;
        }
        let rank = ((total as f64 * p).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i) / 1e6;
            }
        }
        f64::NAN
    }

    pub(crate) fn encode(&self) -> String {
        let parts: Vec<String> = self
            .counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| format!("{i}:{c}"))
            .collect();
        parts.join(",")
    }

    pub(crate) fn decode(s: &str) -> Option<Hist> {
        let mut h = Hist::new();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (i, c) = part.split_once(':')?;
            let i: usize = i.parse().ok()?;
            *h.counts.get_mut(i)? += c.parse::<u64>().ok()?;
        }
        Some(h)
    }
}

/// A multi-thread tokio runtime (one worker per CPU) for the benches' async callers.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The machine as a report's header gives it: CPUs and their model, the kernel and the load
/// average at the start.
pub(crate) struct Machine {
    pub(crate) cpus: usize,
    pub(crate) model: String,
    pub(crate) kernel: String,
    pub(crate) load: String,
}

impl Machine {
    pub(crate) fn read() -> Machine {
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            model,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            load: std::fs::read_to_string("/proc/loadavg")
                .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
        }
    }
}

/// Writes a report as `<out>/<prefix>-<stamp>.{md,csv}` (and `<prefix>-latest.*` unless
/// `no_latest`), prints the markdown, and says where it went.
pub(crate) fn write_report(
    out: &Path,
    prefix: &str,
    stamp: &str,
    md: &str,
    csv: &str,
    no_latest: bool,
) {
    std::fs::create_dir_all(out).unwrap();
    let file_stamp: String = stamp
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let mut files = vec![
        (format!("{prefix}-{file_stamp}.md"), md),
        (format!("{prefix}-{file_stamp}.csv"), csv),
    ];
    if !no_latest {
        files.push((format!("{prefix}-latest.md"), md));
        files.push((format!("{prefix}-latest.csv"), csv));
    }
    for (name, text) in files {
        std::fs::write(out.join(&name), text).unwrap();
    }
    println!("{md}");
    eprintln!(
        "wrote {}/{prefix}-{file_stamp}.md and .csv{}",
        out.display(),
        if no_latest {
            String::new()
        } else {
            format!(" (and {prefix}-latest.*)")
        }
    );
}
