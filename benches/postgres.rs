//! `cargo bench --bench postgres --features postgres` (also the last part of
//! `scripts/bench-compare.sh`): several instances on PostgreSQL (issue #15). Fresh-key claim +
//! complete operations per second, with p50/p99 per operation, at 1, 8 and 64 callers, for
//!
//! * `engine`: the engine on PostgreSQL, one engine in the bench process (async API, tokio
//!   tasks on a multi-thread runtime);
//! * `per-request`: what a typical middleware does: one autocommit
//!   `INSERT .. ON CONFLICT (id) DO NOTHING RETURNING fence` per claim and one
//!   `UPDATE .. SET state = 1, .. WHERE id = $1 AND fence = $2` per completion, prepared once per
//!   connection, on a pool of 16 connections (each statement checks a connection out for
//!   itself, as sqlx or deadpool do outside a transaction);
//! * `raw`: a pgbench-style ceiling: per connection, one transaction after another, each an
//!   `INSERT .. SELECT FROM unnest(..)` of R new in-flight rows and one `UPDATE .. FROM
//!   unnest(..)` completing the R rows of the previous transaction, sent pipelined (the shape
//!   of the engine's batches, without any per-operation decision); counted in completed rows
//!   per second. `--raw CxR,..` lists the (connections, rows) cases: by default 1x512 and 2x512
//!   (the ceiling: the best of them) and 1x32 (the most rows 64 callers can put in one of the
//!   engine's batches: each caller has one claim or one completion outstanding);
//! * `engine-procs-N`: the engine in N processes (this binary again, one engine each, a share of
//!   the callers each, the same table), started together; their rates are summed.
//!
//! Every case runs in a child process (this binary with `--case ID`) on a table of its own in a
//! schema made for the run (`bench_<pid>`, dropped at the end); the engine creates each table
//! (the baselines' too: they open an engine once on their table and shut it down, so they write
//! exactly the engine's layout). Before each case the parent runs `CHECKPOINT`, so no case pays
//! for another's dirty pages. The engine runs with its default configuration (`Durability::Full`:
//! `synchronous_commit` stays on; 4 read connections); the baselines commit with the server's
//! `synchronous_commit`. A baseline's statements are prepared on its table while it is empty, so
//! its sessions turn sequential scans off (`enable_seqscan = off`), or PostgreSQL would cache a
//! generic plan that scans the whole table for each update (measured: 36k rows/s fell to 11k at
//! 32 rows per transaction); the parent reports any sequential scan of a case's table.
//!
//! ```text
//! cargo bench --bench postgres --features postgres -- [--url URL] [--secs S] [--warmup S]
//!     [--callers 1,8,64] [--procs 1,2,3] [--procs-callers 64] [--raw 1x512,2x512,1x32]
//!     [--pool 16] [--engine-max-batch N] [--allow-seqscan] [--backlog N]
//!     [--only engine,per-request,raw,procs] [--out DIR] [--stamp TEXT] [--command TEXT]
//!     [--no-latest]
//! ```
//!
//! The URL defaults to `$IDEMPOTENCY_TEST_PG_URL`, else `postgres://postgres@127.0.0.1:5432/test`
//! (no TLS: the baselines connect with `NoTls`, and the engine's URL gets `sslmode=disable`
//! unless it names an `sslmode`). The role needs `CREATE` on the database, and
//! superuser (or `pg_checkpoint`) for the `CHECKPOINT` (skipped with a note when refused).
//!
//! Profile columns, over each case's measured window: CPU of the bench process(es) and of the
//! `postgres` processes serving them (utime + stime from `/proc`: the run's connections, found
//! by their `application_name`, and the server's background processes; so the server must run
//! on this machine), in microseconds per operation, and how busy the machine's CPUs were
//! (`/proc/stat`; the part that was neither, "other", shows a noisy neighbour).
//! Over the whole case (warm-up included), from the server's statistics: WAL bytes and WAL
//! flushes (`pg_stat_wal`, cluster-wide, so other clients of the server count too) per
//! operation, and completions per commit (the completed rows of the case's table over the
//! distinct transactions that wrote them, from `xmin`: the engine's batch size, exactly).
//! Writes `bench-results/postgres-<stamp>.{md,csv}` and `postgres-latest.{md,csv}`.

mod common;

use std::fmt::Write as _;
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use idempotency_rs::{ClaimOutcome, Engine, EngineConfig};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls, Statement};

use common::{Hist, Keys};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// `/proc` reports CPU time in USER_HZ ticks, 100 per second on Linux.
const TICK_US: f64 = 10_000.0;

/// Lock timeout and retention of the baselines' rows (the engine's defaults: 30 s, 24 h).
const LOCK_MS: i64 = 30_000;
const RETENTION_MS: i64 = 24 * 3600 * 1000;

// ------------------------------------------------------------------------------------------
// Command line
// ------------------------------------------------------------------------------------------

struct Args {
    url: String,
    secs: f64,
    warmup: f64,
    callers: Vec<usize>,
    procs: Vec<usize>,
    procs_callers: usize,
    /// Raw cases: (connections, rows per transaction).
    raw: Vec<(usize, usize)>,
    pool: usize,
    engine_max_batch: Option<usize>,
    /// Expired records the `engine-backlog` cases start with (0: no such case).
    backlog: u64,
    /// Let the baselines' sessions scan tables sequentially (the planner's default): shows
    /// what a generic plan made on an empty table costs once it has grown.
    allow_seqscan: bool,
    only: Option<Vec<String>>,
    out: PathBuf,
    stamp: Option<String>,
    command: String,
    no_latest: bool,
    /// Child mode: the case, the run's schema and when to start (ms since the epoch).
    case: Option<String>,
    schema: Option<String>,
    start_at: Option<u64>,
    /// The `application_name` of the run's connections (the parent's pid in it), by which the
    /// children find the server processes that serve them.
    app: String,
    /// The arguments as given, passed on to the children.
    argv: Vec<String>,
    /// `cargo bench` passes `--bench`; without it (`cargo test --all-targets`) nothing runs.
    bench: bool,
}

impl Args {
    fn runs(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|s| s == section))
    }

    fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup)
    }

    fn secs(&self) -> Duration {
        Duration::from_secs_f64(self.secs)
    }

    /// The URL the run's connections use: `--url` with the run's `application_name`, and
    /// `sslmode=disable` unless it names an `sslmode`: the baselines connect without TLS, so
    /// the engine does too (with the engine's default, `prefer`, a server with `ssl = on`
    /// would encrypt only the engine's traffic).
    fn conn_url(&self) -> String {
        if !(self.url.starts_with("postgres://") || self.url.starts_with("postgresql://")) {
            return self.url.clone();
        }
        let sep = if self.url.contains('?') { '&' } else { '?' };
        let tls = if self.url.contains("sslmode=") {
            ""
        } else {
            "&sslmode=disable"
        };
        format!("{}{sep}application_name={}{tls}", self.url, self.app)
    }

    fn engine_config(&self, table: &str) -> EngineConfig {
        let mut config = EngineConfig::postgres(self.conn_url()).table(table);
        if let Some(n) = self.engine_max_batch {
            config = config.max_batch(n);
        }
        config
    }
}

fn parse_args() -> Args {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut a = Args {
        url: std::env::var("IDEMPOTENCY_TEST_PG_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| DEFAULT_URL.into()),
        secs: 3.0,
        warmup: 0.5,
        callers: vec![1, 8, 64],
        procs: vec![1, 2, 3],
        procs_callers: 64,
        raw: vec![(1, 512), (2, 512), (1, 32)],
        pool: 16,
        engine_max_batch: None,
        backlog: 0,
        allow_seqscan: false,
        only: None,
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-results"),
        stamp: None,
        command: "cargo bench --bench postgres --features postgres".into(),
        no_latest: false,
        case: None,
        schema: None,
        start_at: None,
        app: format!("idempotency-bench-{}", std::process::id()),
        argv: raw.clone(),
        bench: false,
    };
    let list = |s: String| -> Vec<usize> {
        s.split(',')
            .filter(|x| !x.trim().is_empty())
            .map(|x| x.trim().parse().expect("a list of numbers"))
            .collect()
    };
    let mut it = raw.into_iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--bench" => a.bench = true,
            "--url" => a.url = value(),
            "--secs" => a.secs = value().parse().expect("--secs: seconds"),
            "--warmup" => a.warmup = value().parse().expect("--warmup: seconds"),
            "--callers" => a.callers = list(value()),
            "--procs" => a.procs = list(value()),
            "--procs-callers" => a.procs_callers = value().parse().expect("a number"),
            "--raw" => {
                a.raw = value()
                    .split(',')
                    .filter(|x| !x.trim().is_empty())
                    .map(|x| {
                        let (c, b) = x.trim().split_once('x').expect("--raw: CONNSxROWS,...");
                        (
                            c.parse().expect("--raw: connections"),
                            b.parse().expect("--raw: rows per transaction"),
                        )
                    })
                    .collect()
            }
            "--pool" => a.pool = value().parse().expect("a number"),
            "--engine-max-batch" => a.engine_max_batch = Some(value().parse().expect("a number")),
            "--allow-seqscan" => a.allow_seqscan = true,
            "--backlog" => a.backlog = value().parse().expect("--backlog: a number of records"),
            "--only" => a.only = Some(value().split(',').map(str::to_owned).collect()),
            "--out" => a.out = PathBuf::from(value()),
            "--stamp" => a.stamp = Some(value()),
            "--command" => a.command = value(),
            "--no-latest" => a.no_latest = true,
            "--case" => a.case = Some(value()),
            "--schema" => a.schema = Some(value()),
            "--app" => a.app = value(),
            "--start-at" => a.start_at = Some(value().parse().expect("ms since the epoch")),
            other => panic!("unknown argument {other}; see the header of benches/postgres.rs"),
        }
    }
    a
}

// ------------------------------------------------------------------------------------------
// Cases
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    /// One engine, `callers` tasks.
    Engine(usize),
    /// Autocommit statements on a pool.
    PerRequest(usize),
    /// The raw ceiling on `conns` connections, `rows` per transaction.
    Raw { conns: usize, rows: usize },
    /// `n` engine processes on one table, the callers shared among them.
    Procs(usize),
    /// One engine, `callers` tasks, on a table that starts with `--backlog` expired records,
    /// its cleanup running every 50 ms.
    Backlog(usize),
}

impl Case {
    fn id(self) -> String {
        match self {
            Case::Engine(n) => format!("engine/{n}"),
            Case::PerRequest(n) => format!("per-request/{n}"),
            Case::Raw { conns, rows } => format!("raw/{conns}x{rows}"),
            Case::Procs(n) => format!("engine-procs-{n}"),
            Case::Backlog(n) => format!("engine-backlog/{n}"),
        }
    }

    /// The case's table in the run's schema: its id, as a name.
    fn table(self) -> String {
        self.id().replace(['/', '-'], "_")
    }

    fn system(self) -> String {
        match self {
            Case::Engine(_) => "engine".into(),
            Case::PerRequest(_) => "per-request".into(),
            Case::Raw { .. } => "raw".into(),
            Case::Procs(n) => format!("engine-procs-{n}"),
            Case::Backlog(_) => "engine, expired backlog".into(),
        }
    }
}

fn plan(args: &Args) -> Vec<Case> {
    let mut cases = Vec::new();
    if args.runs("engine") {
        cases.extend(args.callers.iter().map(|&n| Case::Engine(n)));
    }
    if args.runs("per-request") {
        cases.extend(args.callers.iter().map(|&n| Case::PerRequest(n)));
    }
    if args.runs("raw") {
        cases.extend(
            args.raw
                .iter()
                .map(|&(conns, rows)| Case::Raw { conns, rows }),
        );
    }
    if args.runs("procs") {
        cases.extend(args.procs.iter().map(|&n| Case::Procs(n)));
    }
    if args.backlog > 0 {
        cases.extend(args.callers.iter().map(|&n| Case::Backlog(n)));
    }
    cases
}

// ------------------------------------------------------------------------------------------
// Measurement
// ------------------------------------------------------------------------------------------

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// CPU time so far: this process, every `postgres` process, and the machine (`/proc/stat`).
#[derive(Clone, Copy, Default)]
struct Cpu {
    own: u64,
    pg: u64,
    /// The busiest PostgreSQL process (the engine's writer connection, for the engine).
    pg_top: u64,
    busy: u64,
    steal: u64,
    total: u64,
}

/// utime + stime of process `pid`, in ticks.
fn proc_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the line; field 3 (the state) is the first after the name.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The pids of the `postgres` processes on this machine (server, backends, walwriter, ...).
fn postgres_pids() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim_end() == "postgres")
        })
        .collect()
}

/// The CPU time of the PostgreSQL processes that serve this run, per pid.
type PgTicks = std::collections::HashMap<String, u64>;

fn pg_ticks(pids: &[String]) -> PgTicks {
    pids.iter()
        .filter_map(|p| proc_ticks(p).map(|t| (p.clone(), t)))
        .collect()
}

/// The ticks the processes of `after` used since `before` (a process that was not there
/// before started during the window: all of its time counts; one that exited is lost), in
/// all and by the busiest of them.
fn pg_ticks_since(before: &PgTicks, after: &PgTicks) -> (u64, u64) {
    let used = after
        .iter()
        .map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0)));
    used.fold((0, 0), |(sum, top), t| (sum + t, top.max(t)))
}

/// The PostgreSQL processes that serve the run: its connections (by `application_name`) and
/// the server's own processes (WAL writer, checkpointer, autovacuum, ...), not other clients'
/// backends. Every local `postgres` process when the server cannot be asked.
fn serving_pids(rt: &tokio::runtime::Runtime, probe: &Client, app: &str) -> Vec<String> {
    let rows = rt.block_on(probe.query(
        "SELECT pid::text FROM pg_stat_activity
         WHERE application_name = $1 OR backend_type <> 'client backend'",
        &[&app],
    ));
    match rows {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        Err(_) => postgres_pids(),
    }
}

impl Cpu {
    /// This process and the machine (the PostgreSQL part is filled in by the caller).
    fn now() -> Cpu {
        let own = proc_ticks("self").unwrap_or(0);
        let mut cpu = Cpu {
            own,
            ..Cpu::default()
        };
        if let Some(line) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned))
        {
            // cpu user nice system idle iowait irq softirq steal ...
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .take(8)
                .filter_map(|x| x.parse().ok())
                .collect();
            if v.len() == 8 {
                cpu.total = v.iter().sum();
                cpu.steal = v[7];
                cpu.busy = cpu.total - v[3] - v[4] - v[7];
            }
        }
        cpu
    }

    fn minus(self, before: Cpu) -> Cpu {
        Cpu {
            own: self.own.saturating_sub(before.own),
            pg: self.pg.saturating_sub(before.pg),
            pg_top: self.pg_top.saturating_sub(before.pg_top),
            busy: self.busy.saturating_sub(before.busy),
            steal: self.steal.saturating_sub(before.steal),
            total: self.total.saturating_sub(before.total),
        }
    }
}

/// What one child measured.
#[derive(Clone)]
struct Outcome {
    /// Operations (fresh claim + complete, or completed rows) finished in the measured window.
    ops: u64,
    /// Operations finished in the whole case, warm-up included (for the server's counters).
    total_ops: u64,
    secs: f64,
    hist: Hist,
    min_caller_ops: u64,
    /// CPU over the measured window.
    cpu: Cpu,
    /// When the measured window started, ms since the epoch.
    window_start_ms: u64,
    note: String,
}

impl Outcome {
    fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }

    fn encode(&self) -> String {
        let c = &self.cpu;
        format!(
            "RESULT\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            self.ops,
            self.total_ops,
            self.secs,
            self.min_caller_ops,
            c.own,
            c.pg,
            c.pg_top,
            c.busy,
            c.steal,
            c.total,
            self.window_start_ms,
            self.hist.encode(),
            self.note.replace(['\t', '\n'], " "),
        )
    }

    fn decode(stdout: &str) -> Option<Outcome> {
        let rest = stdout.lines().find_map(|l| l.strip_prefix("RESULT\t"))?;
        let f: Vec<&str> = rest.split('\t').collect();
        let u = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
        Some(Outcome {
            ops: u(0)?,
            total_ops: u(1)?,
            secs: f.get(2)?.parse().ok()?,
            min_caller_ops: u(3)?,
            cpu: Cpu {
                own: u(4)?,
                pg: u(5)?,
                pg_top: u(6)?,
                busy: u(7)?,
                steal: u(8)?,
                total: u(9)?,
            },
            window_start_ms: u(10)?,
            hist: Hist::decode(f.get(11)?)?,
            note: f.get(12).copied().unwrap_or("").to_owned(),
        })
    }
}

type BoxFut = Pin<Box<dyn Future<Output = u64> + Send>>;
/// `op(worker, n)`: one operation (or one batch) of worker `worker`; returns how many
/// operations it finished (they share its latency).
type AsyncOp = Arc<dyn Fn(usize, u64) -> BoxFut + Send + Sync>;

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Sleeps until `at` (ms since the epoch), when given.
fn wait_until(at: Option<u64>) {
    if let Some(at) = at {
        let now = epoch_ms();
        if at > now {
            std::thread::sleep(Duration::from_millis(at - now));
        }
    }
}

/// Runs `op` in a loop on `workers` tokio tasks: warm-up, then the measured window, with the
/// CPU counters read at both ends of the window (`pg_pids`: the PostgreSQL processes serving
/// the run). Every task yields after each operation.
fn drive(
    rt: &tokio::runtime::Runtime,
    workers: usize,
    warmup: Duration,
    secs: Duration,
    pg_pids: &dyn Fn() -> Vec<String>,
    op: AsyncOp,
) -> Outcome {
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let total = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let phase = phase.clone();
            let total = total.clone();
            let op = op.clone();
            rt.spawn(async move {
                let mut hist = Hist::new();
                let mut n = 0;
                while phase.load(Ordering::Acquire) != STOP {
                    let start = Instant::now();
                    let done = op(w, n).await;
                    n += 1;
                    total.fetch_add(done, Ordering::Relaxed);
                    if phase.load(Ordering::Acquire) == MEASURE {
                        hist.record(start.elapsed().as_nanos() as u64, done);
                    }
                    tokio::task::yield_now().await;
                }
                hist
            })
        })
        .collect();
    std::thread::sleep(warmup);
    let pg_before = pg_ticks(&pg_pids());
    let cpu_before = Cpu::now();
    let window_start_ms = epoch_ms();
    phase.store(MEASURE, Ordering::Release);
    let t0 = Instant::now();
    std::thread::sleep(secs);
    phase.store(STOP, Ordering::Release);
    let elapsed = t0.elapsed();
    let mut cpu = Cpu::now().minus(cpu_before);
    (cpu.pg, cpu.pg_top) = pg_ticks_since(&pg_before, &pg_ticks(&pg_pids()));
    let parts: Vec<Hist> = rt.block_on(async {
        let mut parts = Vec::with_capacity(workers);
        for task in tasks {
            parts.push(task.await.expect("a benchmark task panicked"));
        }
        parts
    });
    let mut hist = Hist::new();
    for p in &parts {
        hist.merge(p);
    }
    Outcome {
        ops: hist.total(),
        total_ops: total.load(Ordering::Relaxed),
        secs: elapsed.as_secs_f64(),
        min_caller_ops: parts.iter().map(Hist::total).min().unwrap_or(0),
        hist,
        cpu,
        window_start_ms,
        note: String::new(),
    }
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A connection for the baselines. Their statements are prepared once, on a table that is
/// empty then: PostgreSQL would cache a generic plan that scans the table (right for an empty
/// table, ruinous once it has grown), so sequential scans are ruled out for these sessions; the
/// plans are then the index lookups a production table would get (the parent checks the
/// table's scan counters after each case). `--allow-seqscan` leaves the planner alone.
async fn baseline_connect(args: &Args) -> Client {
    let client = connect(&args.conn_url()).await;
    if !args.allow_seqscan {
        client
            .batch_execute("SET enable_seqscan = off")
            .await
            .unwrap();
    }
    client
}

/// `"schema"."table"` (both plain identifiers).
fn qualified(schema: &str, table: &str) -> String {
    format!("\"{schema}\".\"{table}\"")
}

/// Creates the engine's table `schema.table` (by opening an engine on it and shutting it down).
fn create_table(args: &Args, schema: &str, table: &str) {
    let engine = Engine::open(args.engine_config(&format!("{schema}.{table}")))
        .unwrap_or_else(|e| panic!("cannot open the engine on {schema}.{table}: {e}"));
    engine.shutdown().unwrap();
}

// ------------------------------------------------------------------------------------------
// The systems under test (each in a child process)
// ------------------------------------------------------------------------------------------

/// The engine, fresh claim + complete through the async API; `callers` tasks.
fn engine_case(args: &Args, schema: &str, table: &str, callers: usize) -> Outcome {
    let engine = Engine::open(args.engine_config(&format!("{schema}.{table}")))
        .unwrap_or_else(|e| panic!("cannot open the engine on {schema}.{table}: {e}"));
    let rt = common::runtime();
    let keys = Arc::new(Keys::new(&format!("engine-{}", std::process::id())));
    let op: AsyncOp = {
        let engine = engine.clone();
        Arc::new(move |_, _| {
            let engine = engine.clone();
            let key = keys.next();
            Box::pin(async move {
                match engine.claim_async(common::request(&key)).await.unwrap() {
                    ClaimOutcome::Claimed(lease) => {
                        lease.complete_async(common::response()).await.unwrap();
                    }
                    other => panic!("a fresh key was not claimed: {other:?}"),
                }
                1
            })
        })
    };
    let probe = rt.block_on(connect(&args.conn_url()));
    let pids = || serving_pids(&rt, &probe, &args.app);
    wait_until(args.start_at);
    let out = drive(&rt, callers, args.warmup(), args.secs(), &pids, op);
    engine.shutdown().unwrap();
    out
}

/// The engine as in [`engine_case`], on a table that starts with `--backlog` expired records,
/// with its cleanup every 50 ms: what a large expired backlog costs the callers while it is
/// deleted (compare with the `engine` row of the same callers: an empty table, no cleanup).
fn backlog_case(args: &Args, schema: &str, table: &str, callers: usize) -> Outcome {
    create_table(args, schema, table);
    let rt = common::runtime();
    let probe = rt.block_on(connect(&args.conn_url()));
    let qualified = qualified(schema, table);
    rt.block_on(probe.batch_execute(&format!(
        "INSERT INTO {qualified} (id, scope, key, fingerprint, state, fence, locked_until,
             expires_at, created_at, completed_at, status, headers, body)
         SELECT sha256(('backlog ' || g)::bytea), 's', 'backlog ' || g, sha256('x'::bytea), 1,
                g, 0, 1, 0, 0, 200, NULL, convert_to('{{\"order\": 1}}', 'UTF8')
         FROM generate_series(1, {}) AS g;
         ANALYZE {qualified};
         CHECKPOINT",
        args.backlog
    )))
    .unwrap_or_else(|e| panic!("filling the backlog: {e}"));
    let config = args
        .engine_config(&format!("{schema}.{table}"))
        .cleanup(Duration::from_millis(50), 1000);
    let engine = Engine::open(config).unwrap();
    let keys = Arc::new(Keys::new(&format!("backlog-{}", std::process::id())));
    let op: AsyncOp = {
        let engine = engine.clone();
        Arc::new(move |_, _| {
            let engine = engine.clone();
            let key = keys.next();
            Box::pin(async move {
                match engine.claim_async(common::request(&key)).await.unwrap() {
                    ClaimOutcome::Claimed(lease) => {
                        lease.complete_async(common::response()).await.unwrap();
                    }
                    other => panic!("a fresh key was not claimed: {other:?}"),
                }
                1
            })
        })
    };
    let pids = || serving_pids(&rt, &probe, &args.app);
    wait_until(args.start_at);
    let mut out = drive(&rt, callers, args.warmup(), args.secs(), &pids, op);
    engine.shutdown().unwrap();
    let left: i64 = rt
        .block_on(probe.query_one(
            &format!("SELECT count(*) FROM {qualified} WHERE expires_at <= 1"),
            &[],
        ))
        .map(|r| r.get(0))
        .unwrap_or(-1);
    let deleted = i64::try_from(args.backlog).unwrap_or(0) - left;
    out.note = format!(
        "backlog of {} expired records, cleanup every 50 ms: {deleted} deleted during the case ({:.0}/s), {left} left",
        args.backlog,
        deleted as f64 / (args.warmup() + args.secs()).as_secs_f64()
    );
    out
}

/// One pooled connection of the per-request baseline, with its prepared statements.
struct PooledConn {
    client: Client,
    insert: Statement,
    update: Statement,
}

/// A minimal pool: a semaphore for the free connections and a stack of them. A statement
/// checks a connection out for itself, as a middleware outside a transaction does.
struct Pool {
    free: Mutex<Vec<PooledConn>>,
    permits: tokio::sync::Semaphore,
}

struct Checkout<'a> {
    pool: &'a Pool,
    conn: Option<PooledConn>,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Pool {
    async fn get(&self) -> Checkout<'_> {
        let permit = self.permits.acquire().await.unwrap();
        let conn = self
            .free
            .lock()
            .unwrap()
            .pop()
            .expect("a permit without a connection");
        Checkout {
            pool: self,
            conn: Some(conn),
            _permit: permit,
        }
    }
}

impl std::ops::Deref for Checkout<'_> {
    type Target = PooledConn;
    fn deref(&self) -> &PooledConn {
        self.conn.as_ref().unwrap()
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            self.pool.free.lock().unwrap().push(c);
        }
    }
}

/// The typical middleware: an autocommit INSERT .. ON CONFLICT DO NOTHING per claim, an
/// autocommit UPDATE per completion, on a pool of `args.pool` connections.
fn per_request_case(args: &Args, schema: &str, table: &str, callers: usize) -> Outcome {
    create_table(args, schema, table);
    let t = qualified(schema, table);
    let fence = qualified(schema, &format!("{table}_fence"));
    let insert_sql = format!(
        "INSERT INTO {t} (id, scope, key, fingerprint, state, fence, locked_until, expires_at,
                          created_at)
         VALUES ($1, $2, $3, $4, 0, nextval('{fence}'), $5, $6, $7)
         ON CONFLICT (id) DO NOTHING
         RETURNING fence"
    );
    let update_sql = format!(
        "UPDATE {t} SET state = 1, status = $3, headers = $4, body = $5, trailers = NULL,
                        completed_at = $6, expires_at = $7, locked_until = 0
         WHERE id = $1 AND fence = $2 AND state = 0"
    );
    let rt = common::runtime();
    let pool = rt.block_on(async {
        let mut free = Vec::with_capacity(args.pool);
        for _ in 0..args.pool {
            let client = baseline_connect(args).await;
            let insert = client.prepare(&insert_sql).await.unwrap();
            let update = client.prepare(&update_sql).await.unwrap();
            free.push(PooledConn {
                client,
                insert,
                update,
            });
        }
        Arc::new(Pool {
            free: Mutex::new(free),
            permits: tokio::sync::Semaphore::new(args.pool),
        })
    });
    let keys = Arc::new(Keys::new(&format!("per-request-{}", std::process::id())));
    let fp = common::fingerprint();
    let headers = Arc::new(common::headers_blob());
    let op: AsyncOp = Arc::new(move |_, _| {
        let pool = pool.clone();
        let headers = headers.clone();
        let key = keys.next();
        Box::pin(async move {
            let id = common::record_id(common::SCOPE, &key);
            let now = common::now_ms();
            let rows = {
                let c = pool.get().await;
                c.client
                    .query(
                        &c.insert,
                        &[
                            &&id[..],
                            &common::SCOPE,
                            &key,
                            &&fp.as_bytes()[..],
                            &(now + LOCK_MS),
                            &(now + LOCK_MS + RETENTION_MS),
                            &now,
                        ],
                    )
                    .await
                    .unwrap()
            };
            let row = rows.first().expect("a fresh key was not claimed");
            let fence: i64 = row.get(0);
            // (the handler runs here, without a connection)
            let done = common::now_ms();
            let c = pool.get().await;
            let n = c
                .client
                .execute(
                    &c.update,
                    &[
                        &&id[..],
                        &fence,
                        &201i32,
                        &&headers[..],
                        &common::BODY,
                        &done,
                        &(done + RETENTION_MS),
                    ],
                )
                .await
                .unwrap();
            assert_eq!(n, 1, "the completion matched no row");
            1
        })
    });
    let probe = rt.block_on(connect(&args.conn_url()));
    let pids = || serving_pids(&rt, &probe, &args.app);
    let mut out = drive(&rt, callers, args.warmup(), args.secs(), &pids, op);
    out.note = format!("pool of {} connections", args.pool);
    out
}

/// One connection of the raw ceiling, and the rows its previous transaction inserted.
struct RawConn {
    client: Client,
    insert: Statement,
    update: Statement,
    pending: Vec<[u8; 32]>,
    pending_fences: Vec<i64>,
}

/// The raw ceiling: per connection, transactions of `batch` fresh in-flight rows inserted and
/// the previous transaction's `batch` rows completed, pipelined; no decisions.
fn raw_case(args: &Args, schema: &str, table: &str, conns: usize, batch: usize) -> Outcome {
    create_table(args, schema, table);
    let t = qualified(schema, table);
    let insert_sql = format!(
        "INSERT INTO {t} (id, scope, key, fingerprint, state, fence, locked_until, expires_at,
                          created_at)
         SELECT i.id, i.scope, i.key, i.fingerprint, 0, i.fence, $6 + $8, $6 + $8 + $7, $6
         FROM unnest($1::bytea[], $2::text[], $3::text[], $4::bytea[], $5::int8[])
                  AS i(id, scope, key, fingerprint, fence)"
    );
    let update_sql = format!(
        "UPDATE {t} AS r SET state = 1, status = i.status, headers = i.headers, body = i.body,
                 trailers = NULL, completed_at = $6, expires_at = $6 + $7, locked_until = 0
         FROM unnest($1::bytea[], $2::int8[], $3::int4[], $4::bytea[], $5::bytea[])
                  AS i(id, fence, status, headers, body)
         WHERE r.id = i.id AND r.fence = i.fence AND r.state = 0"
    );
    let rt = common::runtime();
    let workers: Arc<Vec<tokio::sync::Mutex<RawConn>>> = Arc::new(rt.block_on(async {
        let mut v = Vec::with_capacity(conns);
        for _ in 0..conns {
            let client = baseline_connect(args).await;
            let insert = client
                .prepare_typed(
                    &insert_sql,
                    &[
                        Type::BYTEA_ARRAY,
                        Type::TEXT_ARRAY,
                        Type::TEXT_ARRAY,
                        Type::BYTEA_ARRAY,
                        Type::INT8_ARRAY,
                        Type::INT8,
                        Type::INT8,
                        Type::INT8,
                    ],
                )
                .await
                .unwrap();
            let update = client
                .prepare_typed(
                    &update_sql,
                    &[
                        Type::BYTEA_ARRAY,
                        Type::INT8_ARRAY,
                        Type::INT4_ARRAY,
                        Type::BYTEA_ARRAY,
                        Type::BYTEA_ARRAY,
                        Type::INT8,
                        Type::INT8,
                    ],
                )
                .await
                .unwrap();
            v.push(tokio::sync::Mutex::new(RawConn {
                client,
                insert,
                update,
                pending: Vec::new(),
                pending_fences: Vec::new(),
            }));
        }
        v
    }));
    let keys = Arc::new(Keys::new(&format!("raw-{}", std::process::id())));
    let fences = Arc::new(AtomicU64::new(1));
    let fp = common::fingerprint().as_bytes().to_vec();
    let headers = common::headers_blob();
    let op: AsyncOp = Arc::new(move |w, _| {
        let workers = workers.clone();
        let keys = keys.clone();
        let fences = fences.clone();
        let (fp, headers) = (fp.clone(), headers.clone());
        Box::pin(async move {
            let mut guard = workers[w].lock().await;
            let conn = &mut *guard;
            let new_keys: Vec<String> = (0..batch).map(|_| keys.next()).collect();
            let ids: Vec<[u8; 32]> = new_keys
                .iter()
                .map(|k| common::record_id(common::SCOPE, k))
                .collect();
            let first = fences.fetch_add(batch as u64, Ordering::Relaxed) as i64;
            let new_fences: Vec<i64> = (0..batch as i64).map(|i| first + i).collect();
            let id_refs: Vec<&[u8]> = ids.iter().map(|id| &id[..]).collect();
            let scopes = vec![common::SCOPE; batch];
            let fps = vec![&fp[..]; batch];
            let now = common::now_ms();
            let done_ids: Vec<&[u8]> = conn.pending.iter().map(|id| &id[..]).collect();
            let n = done_ids.len();
            let statuses = vec![201i32; n];
            let header_col = vec![&headers[..]; n];
            let bodies = vec![common::BODY; n];
            let client = &conn.client;
            let insert_params: [&(dyn ToSql + Sync); 8] = [
                &id_refs,
                &scopes,
                &new_keys,
                &fps,
                &new_fences,
                &now,
                &RETENTION_MS,
                &LOCK_MS,
            ];
            let (begin, inserted, updated, commit) = tokio::join!(
                biased;
                client.batch_execute("BEGIN"),
                client.execute(&conn.insert, &insert_params),
                async {
                    if n == 0 {
                        return Ok(0);
                    }
                    client
                        .execute(
                            &conn.update,
                            &[
                                &done_ids,
                                &conn.pending_fences,
                                &statuses,
                                &header_col,
                                &bodies,
                                &now,
                                &RETENTION_MS,
                            ],
                        )
                        .await
                },
                client.batch_execute("COMMIT"),
            );
            begin.unwrap();
            assert_eq!(inserted.unwrap(), batch as u64, "raw insert");
            assert_eq!(updated.unwrap(), n as u64, "raw update");
            commit.unwrap();
            conn.pending = ids;
            conn.pending_fences = new_fences;
            n as u64
        })
    });
    let probe = rt.block_on(connect(&args.conn_url()));
    let pids = || serving_pids(&rt, &probe, &args.app);
    let mut out = drive(&rt, conns, args.warmup(), args.secs(), &pids, op);
    out.note = format!(
        "{conns} connection{}; per transaction {batch} rows inserted + the previous {batch} \
         completed; latency is the transaction's (a row waits for two)",
        if conns == 1 { "" } else { "s" }
    );
    out
}

/// Child mode: runs one case and prints its outcome.
fn run_child(args: &Args, id: &str) {
    let schema = args.schema.as_deref().expect("--case needs --schema");
    let parts: Vec<&str> = id.split('/').collect();
    let num = |s: &str| -> usize { s.parse().unwrap_or_else(|_| panic!("bad case {id}")) };
    let out = match parts.as_slice() {
        ["engine", n] => engine_case(args, schema, &Case::Engine(num(n)).table(), num(n)),
        ["engine-backlog", n] => backlog_case(args, schema, &Case::Backlog(num(n)).table(), num(n)),
        ["per-request", n] => {
            per_request_case(args, schema, &Case::PerRequest(num(n)).table(), num(n))
        }
        ["raw", spec] => {
            let (conns, rows) = spec
                .split_once('x')
                .unwrap_or_else(|| panic!("bad case {id}"));
            let (conns, rows) = (num(conns), num(rows));
            raw_case(
                args,
                schema,
                &Case::Raw { conns, rows }.table(),
                conns,
                rows,
            )
        }
        // One of `procs` engine processes: its share of the callers.
        ["engine-proc", procs, index] => {
            let (procs, index) = (num(procs), num(index));
            let callers = common::share(args.procs_callers as u64, procs, index) as usize;
            engine_case(args, schema, &Case::Procs(procs).table(), callers)
        }
        _ => panic!("unknown case {id}"),
    };
    println!("{}", out.encode());
    let _ = std::io::stdout().flush();
}

// ------------------------------------------------------------------------------------------
// The parent: runs the cases, reads the server's counters, writes the report
// ------------------------------------------------------------------------------------------

/// Cluster-wide counters: commits of the database, and WAL (`pg_stat_wal`, PostgreSQL 14+).
#[derive(Clone, Copy, Default)]
struct ServerStats {
    commits: i64,
    wal_bytes: i64,
    wal_syncs: i64,
}

async fn server_stats(c: &Client) -> Option<ServerStats> {
    let row = c
        .query_one(
            "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()),
                    wal_bytes::int8, wal_sync
             FROM pg_stat_wal",
            &[],
        )
        .await
        .ok()?;
    Some(ServerStats {
        commits: row.get(0),
        wal_bytes: row.get(1),
        wal_syncs: row.get(2),
    })
}

/// One row of the report.
struct Row {
    case: Case,
    /// Callers (connections for `raw`).
    callers: usize,
    procs: usize,
    out: Outcome,
    /// Per-process rates (engine-procs), summed in `out`.
    per_proc: Vec<f64>,
    /// Over the whole case: server counters' deltas, completed rows and their transactions.
    server: Option<ServerStats>,
    completed: Option<(i64, i64)>,
    /// The table's sequential scans and the rows they read (pg_stat_user_tables).
    seq_scans: Option<(i64, i64)>,
}

impl Row {
    fn rate(&self) -> f64 {
        if self.per_proc.is_empty() {
            self.out.rate()
        } else {
            self.per_proc.iter().sum()
        }
    }

    fn us_per_op(&self, ticks: u64) -> f64 {
        ticks as f64 * TICK_US / self.out.ops.max(1) as f64
    }

    /// The busiest PostgreSQL process's CPU, in % of one core.
    fn top_pct(&self) -> f64 {
        100.0 * self.out.cpu.pg_top as f64 * TICK_US / (self.out.secs.max(1e-9) * 1e6)
    }

    fn busy_pct(&self) -> f64 {
        let c = &self.out.cpu;
        100.0 * c.busy as f64 / c.total.max(1) as f64
    }

    /// The machine's busy CPU time that was neither the bench's nor PostgreSQL's (other
    /// tenants of the machine: a noisy run shows here).
    fn other_pct(&self) -> f64 {
        let c = &self.out.cpu;
        100.0 * c.busy.saturating_sub(c.own + c.pg) as f64 / c.total.max(1) as f64
    }

    fn steal_pct(&self) -> f64 {
        let c = &self.out.cpu;
        100.0 * c.steal as f64 / c.total.max(1) as f64
    }

    fn per_op(&self, f: impl Fn(&ServerStats) -> i64) -> Option<f64> {
        self.server
            .map(|s| f(&s) as f64 / self.out.total_ops.max(1) as f64)
    }

    fn completions_per_commit(&self) -> Option<f64> {
        self.completed
            .filter(|&(_, txns)| txns > 0)
            .map(|(rows, txns)| rows as f64 / txns as f64)
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.digits$}"))
}

fn machine(server_version: &str, settings: &str) -> String {
    let common::Machine {
        cpus,
        model,
        kernel,
        load,
    } = common::Machine::read();
    format!(
        "- CPUs: {cpus} ({model}); Linux {kernel}; load average at start {load}\n\
         - server: {server_version}; {settings}\n"
    )
}

struct Parent {
    rt: tokio::runtime::Runtime,
    client: Client,
    schema: String,
}

impl Drop for Parent {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        match self.rt.block_on(self.client.batch_execute(&sql)) {
            Ok(()) => eprintln!("dropped the schema {}", self.schema),
            Err(e) => eprintln!("could not drop the schema {}: {e}", self.schema),
        }
    }
}

fn spawn_child(args: &Args, schema: &str, id: &str, start_at: Option<u64>) -> std::process::Child {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(&args.argv)
        .args(["--case", id, "--schema", schema, "--app", &args.app])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(at) = start_at {
        cmd.args(["--start-at", &at.to_string()]);
    }
    cmd.spawn().unwrap()
}

fn wait_child(child: std::process::Child) -> Result<Outcome, String> {
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    Outcome::decode(&stdout)
        .filter(|_| output.status.success())
        .ok_or_else(|| format!("{}", output.status))
}

fn run_parent(args: &Args) {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(async { connect(&args.url).await });
    let schema = format!("bench_{}", std::process::id());
    rt.block_on(client.batch_execute(&format!("CREATE SCHEMA \"{schema}\"")))
        .unwrap();
    let parent = Parent { rt, client, schema };
    let (rt, client, schema) = (&parent.rt, &parent.client, parent.schema.as_str());

    let version: String = rt
        .block_on(client.query_one("SHOW server_version", &[]))
        .map(|r| r.get(0))
        .unwrap_or_default();
    let settings: String = rt
        .block_on(client.query(
            "SELECT name, setting, coalesce(unit, '') FROM pg_settings
             WHERE name IN ('fsync', 'synchronous_commit', 'wal_sync_method', 'shared_buffers',
                            'commit_delay', 'max_connections', 'full_page_writes')
             ORDER BY name",
            &[],
        ))
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    let (n, v, u): (String, String, String) = (r.get(0), r.get(1), r.get(2));
                    format!(
                        "{n}={v}{}",
                        if u.is_empty() {
                            String::new()
                        } else {
                            format!(" ({u})")
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let machine = machine(&format!("PostgreSQL {version}"), &settings);
    eprintln!("PostgreSQL {version}; schema {schema}; {settings}");

    let mut notes: Vec<String> = Vec::new();
    let mut rows: Vec<Row> = Vec::new();
    for case in plan(args) {
        let id = case.id();
        if let Err(e) = rt.block_on(client.batch_execute("CHECKPOINT")) {
            let note = format!("CHECKPOINT before each case refused: {e}");
            if !notes.contains(&note) {
                notes.push(note);
            }
        }
        let before = rt.block_on(server_stats(client));
        let (callers, procs, result) = match case {
            Case::Engine(n)
            | Case::PerRequest(n)
            | Case::Backlog(n)
            | Case::Raw { conns: n, .. } => {
                let child = spawn_child(args, schema, &id, None);
                (n, 1, wait_child(child).map(|o| (o, Vec::new())))
            }
            Case::Procs(n) => {
                let start_at = epoch_ms() + 1500;
                let children: Vec<_> = (0..n)
                    .map(|i| {
                        spawn_child(
                            args,
                            schema,
                            &format!("engine-proc/{n}/{i}"),
                            Some(start_at),
                        )
                    })
                    .collect();
                let outs: Result<Vec<Outcome>, String> =
                    children.into_iter().map(wait_child).collect();
                (
                    args.procs_callers,
                    n,
                    outs.map(|outs| {
                        let per_proc: Vec<f64> = outs.iter().map(Outcome::rate).collect();
                        let skew = outs.iter().map(|o| o.window_start_ms).max().unwrap_or(0)
                            - outs.iter().map(|o| o.window_start_ms).min().unwrap_or(0);
                        // The machine's and the server's CPU as the first process saw them
                        // (the windows are aligned); the bench CPU of all of them.
                        let mut sum = outs[0].clone();
                        for o in &outs[1..] {
                            sum.ops += o.ops;
                            sum.total_ops += o.total_ops;
                            sum.hist.merge(&o.hist);
                            sum.min_caller_ops = sum.min_caller_ops.min(o.min_caller_ops);
                            sum.cpu.own += o.cpu.own;
                        }
                        sum.note = format!(
                            "{n} processes of {} callers, windows {skew} ms apart; per process: {}",
                            outs.iter()
                                .enumerate()
                                .map(|(i, _)| common::share(args.procs_callers as u64, n, i)
                                    .to_string())
                                .collect::<Vec<_>>()
                                .join("+"),
                            per_proc
                                .iter()
                                .map(|r| format!("{r:.0}"))
                                .collect::<Vec<_>>()
                                .join(" + ")
                        );
                        (sum, per_proc)
                    }),
                )
            }
        };
        let (out, per_proc) = match result {
            Ok(r) => r,
            Err(status) => {
                eprintln!("  {id}: FAILED ({status})");
                notes.push(format!("case {id} failed: {status}"));
                continue;
            }
        };
        // Backends flush their statistics when they exit: give the children's a moment.
        std::thread::sleep(Duration::from_millis(300));
        let after = rt.block_on(server_stats(client));
        let server = before.zip(after).map(|(b, a)| ServerStats {
            commits: a.commits - b.commits,
            wal_bytes: a.wal_bytes - b.wal_bytes,
            wal_syncs: a.wal_syncs - b.wal_syncs,
        });
        let seq_scans = rt
            .block_on(client.query_one(
                "SELECT seq_scan, seq_tup_read FROM pg_stat_user_tables
                 WHERE schemaname = $1 AND relname = $2",
                &[&schema, &case.table()],
            ))
            .ok()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)));
        let completed = rt
            .block_on(client.query_one(
                &format!(
                    "SELECT count(*), count(DISTINCT xmin::text) FROM {} WHERE state = 1",
                    qualified(schema, &case.table())
                ),
                &[],
            ))
            .ok()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)));
        // Scans while the table is small are the planner's right choice (the engine's
        // statements make a few hundred in the first second of a case); a cached plan that
        // scans the grown table reads, per scan, a good part of the final table.
        if let (Some((scans, read)), Some((rows, _))) = (seq_scans, completed)
            && scans > 0
            && read / scans > rows.max(1000) / 4
        {
            notes.push(format!(
                "{id}: {scans} sequential scans of its table read {read} rows ({} per scan, of \
                 {rows} rows at the end): a plan that does not use the primary key slowed this \
                 case down",
                read / scans
            ));
        }
        let row = Row {
            case,
            callers,
            procs,
            out,
            per_proc,
            server,
            completed,
            seq_scans,
        };
        eprintln!(
            "  {id:<18} {:>8.0} ops/s  p50 {:>7.3} ms  p99 {:>7.3} ms  bench {:>5.0} us/op  postgres {:>5.0} us/op (busiest {:>3.0}% of a core)  CPUs {:>3.0}% busy ({:.0}% other, {:.0}% steal)  {} completions/commit",
            row.rate(),
            row.out.hist.percentile_ms(0.5),
            row.out.hist.percentile_ms(0.99),
            row.us_per_op(row.out.cpu.own),
            row.us_per_op(row.out.cpu.pg),
            row.top_pct(),
            row.busy_pct(),
            row.other_pct(),
            row.steal_pct(),
            fmt_opt(row.completions_per_commit(), 1),
        );
        rows.push(row);
    }

    notes.push(format!(
        "each case: its own process(es) and table, {:.1} s warm-up, {:.1} s measured, after a \
         CHECKPOINT; callers are tokio tasks on a multi-thread runtime (one worker per CPU); \
         whole run {:.0} s",
        args.warmup,
        args.secs,
        started.elapsed().as_secs_f64()
    ));
    if let Some(n) = args.engine_max_batch {
        notes.push(format!(
            "engine configuration changed for this run: max_batch {n}"
        ));
    }
    if args.allow_seqscan {
        notes.push(
            "--allow-seqscan: the baselines' sessions may scan tables sequentially (their \
             prepared statements' generic plans are made on an empty table)"
                .into(),
        );
    }
    notes.push(
        "CPU columns: utime + stime over the measured window, per operation, of the bench \
         process(es) and of the `postgres` processes serving them (their connections, found by \
         `application_name`, and the server's background processes; not other clients' \
         backends); `CPUs busy` is the whole \
         machine's, and `(other)` the part of it that was neither (other tenants: a noisy run \
         shows there)"
            .into(),
    );
    notes.push(
        "WAL columns: pg_stat_wal deltas over the whole case (warm-up included) per operation, \
         cluster-wide; completions/commit: completed rows of the case's table over the distinct \
         transactions (xmin) that completed them"
            .into(),
    );

    let stamp = args.stamp.clone().unwrap_or_else(|| {
        Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    });
    let header = format!(
        "## bench postgres {stamp}\n\n- command: `{}`\n{machine}",
        args.command
    );
    let md = markdown(&header, args, &rows, &notes);
    let csv = csv(&rows, args);
    common::write_report(&args.out, "postgres", &stamp, &md, &csv, args.no_latest);
}

/// The per-request rate at `callers`, and the raw ceiling (the best raw row).
fn references(rows: &[Row], callers: usize) -> (Option<f64>, Option<f64>) {
    let per_request = rows
        .iter()
        .find(|r| r.case == Case::PerRequest(callers))
        .map(Row::rate);
    let raw = rows
        .iter()
        .filter(|r| matches!(r.case, Case::Raw { .. }))
        .map(Row::rate)
        .max_by(f64::total_cmp);
    (per_request, raw)
}

fn ratio(a: f64, b: Option<f64>) -> Option<f64> {
    b.filter(|&b| b > 0.0).map(|b| a / b)
}

fn csv(rows: &[Row], args: &Args) -> String {
    let mut s = String::from(
        "system,procs,callers,rows_per_txn,ops_per_s,vs_per_request,vs_raw,p50_ms,p99_ms,slowest_caller_ops_per_s,bench_cpu_us_per_op,postgres_cpu_us_per_op,busiest_postgres_process_pct_of_core,cpus_busy_pct,other_cpu_pct,steal_pct,completions_per_commit,commits_per_op,wal_bytes_per_op,wal_syncs_per_op,table_seq_scans,table_seq_rows_read,max_batch,note\n",
    );
    for r in rows {
        let (pr, raw) = references(rows, r.callers);
        let _ = writeln!(
            s,
            "{},{},{},{},{:.1},{},{},{:.4},{:.4},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1},{},{},{},{},{},{},{},{}",
            r.case.system(),
            r.procs,
            r.callers,
            match r.case {
                Case::Raw { rows, .. } => rows.to_string(),
                _ => String::new(),
            },
            r.rate(),
            fmt_opt(
                ratio(r.rate(), pr).filter(|_| matches!(
                    r.case,
                    Case::Engine(_) | Case::Procs(_) | Case::Backlog(_)
                )),
                3
            ),
            fmt_opt(ratio(r.rate(), raw), 3),
            r.out.hist.percentile_ms(0.5),
            r.out.hist.percentile_ms(0.99),
            r.out.min_caller_ops as f64 / r.out.secs.max(1e-9),
            r.us_per_op(r.out.cpu.own),
            r.us_per_op(r.out.cpu.pg),
            r.top_pct(),
            r.busy_pct(),
            r.other_pct(),
            r.steal_pct(),
            fmt_opt(r.completions_per_commit(), 2),
            fmt_opt(r.per_op(|s| s.commits), 4),
            fmt_opt(r.per_op(|s| s.wal_bytes), 0),
            fmt_opt(r.per_op(|s| s.wal_syncs), 4),
            r.seq_scans.map_or("n/a".into(), |(n, _)| n.to_string()),
            r.seq_scans
                .map_or("n/a".into(), |(_, rows)| rows.to_string()),
            args.engine_max_batch
                .map_or("default".into(), |n| n.to_string()),
            r.out.note.replace(',', ";"),
        );
    }
    s
}

fn markdown(header: &str, args: &Args, rows: &[Row], notes: &[String]) -> String {
    let mut s = String::from(header);
    s.push_str(
        "\nFresh-key claim + complete per second (raw: completed rows per second).\n\n\
         | system | procs | callers | ops/s | × per-request | × raw | p50 ms | p99 ms | bench CPU µs/op | postgres CPU µs/op | busiest postgres process | CPUs busy (other) | completions/commit | WAL B/op | WAL flushes/op |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let (pr, raw) = references(rows, r.callers);
        let callers = match r.case {
            Case::Raw { conns, rows } => format!("{conns} conn × {rows} rows"),
            _ => r.callers.to_string(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {callers} | {:.0} | {} | {} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0}% of a core | {:.0}% ({:.0}%) | {} | {} | {} |",
            r.case.system(),
            r.procs,
            r.rate(),
            fmt_opt(
                ratio(r.rate(), pr).filter(|_| matches!(
                    r.case,
                    Case::Engine(_) | Case::Procs(_) | Case::Backlog(_)
                )),
                2
            )
            .replace("n/a", "-"),
            fmt_opt(
                ratio(r.rate(), raw).filter(|_| !matches!(r.case, Case::Raw { .. })),
                2
            )
            .replace("n/a", "-"),
            r.out.hist.percentile_ms(0.5),
            r.out.hist.percentile_ms(0.99),
            r.us_per_op(r.out.cpu.own),
            r.us_per_op(r.out.cpu.pg),
            r.top_pct(),
            r.busy_pct(),
            r.other_pct(),
            fmt_opt(r.completions_per_commit(), 1),
            fmt_opt(r.per_op(|s| s.wal_bytes), 0),
            fmt_opt(r.per_op(|s| s.wal_syncs), 3),
        );
    }
    let (_, raw) = references(rows, args.procs_callers);
    if let Some(raw) = raw {
        let _ = writeln!(
            s,
            "\n× raw: against the best raw row ({raw:.0} rows/s); × per-request: against per-request at the same number of callers ({} for the engine-procs rows).",
            args.procs_callers
        );
    }

    // The issue's targets, at the largest caller count.
    let top = args.callers.iter().copied().max().unwrap_or(64);
    if let Some(e) = rows.iter().find(|r| r.case == Case::Engine(top)) {
        let (pr, raw) = references(rows, top);
        s.push_str(
            "\n### Targets (issue #15), same run\n\n| ratio | value | target |\n|---|---:|---|\n",
        );
        if let Some(v) = ratio(e.rate(), pr) {
            let _ = writeln!(
                s,
                "| engine @{top} / per-request @{top} | {v:.2}x | ≥ 5x: {} |",
                if v >= 5.0 { "met" } else { "missed" }
            );
        }
        if let Some(v) = ratio(e.rate(), raw) {
            let _ = writeln!(
                s,
                "| engine @{top} / raw ceiling | {v:.2}x | ≥ 0.7x: {} |",
                if v >= 0.7 { "met" } else { "missed" }
            );
        }
        for r in rows
            .iter()
            .filter(|r| matches!(r.case, Case::Raw { .. }) && Some(r.rate()) != raw)
        {
            let Case::Raw { conns, rows } = r.case else {
                continue;
            };
            let _ = writeln!(
                s,
                "| engine @{top} / raw on {conns} connection{}, {rows} rows per transaction | {:.2}x | |",
                if conns == 1 { "" } else { "s" },
                e.rate() / r.rate().max(1e-9)
            );
        }
        for r in rows.iter().filter(|r| matches!(r.case, Case::Procs(_))) {
            let _ = writeln!(
                s,
                "| {} ({} callers) / engine @{top} (1 process) | {:.2}x | |",
                r.case.system(),
                r.callers,
                r.rate() / e.rate().max(1e-9)
            );
        }

        // Where the time goes, for the engine at the largest caller count.
        let c = &e.out.cpu;
        let window_us = e.out.secs * 1e6;
        let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let own = c.own as f64 * TICK_US;
        let pg = c.pg as f64 * TICK_US;
        let busy = c.busy as f64 / c.total.max(1) as f64 * ncpu * window_us;
        let _ = write!(
            s,
            "\n### Where the time goes: engine @{top}, one process\n\n\
             Over the {:.1} s window, of {ncpu:.0} CPUs ({:.1} CPU-s): the bench process used \
             {:.2} CPU-s ({:.0} µs per operation: callers, engine, writer thread, client side of \
             the protocol), the postgres processes {:.2} CPU-s ({:.0} µs per operation), \
             everything else on the machine {:.2} CPU-s; the CPUs were {:.0}% busy ({:.0}% \
             stolen by the hypervisor). {:.1} operations were completed per commit (the \
             writer's batch holds about twice that many commands: the completions plus the next \
             claims). The busiest postgres process (the writer's connection) was on CPU {:.0}% \
             of the window: the writer sends one batch at a time on one connection, so one \
             server process runs them all, one after the other; at 100% it would allow about \
             {:.0} operations per second.\n",
            e.out.secs,
            ncpu * e.out.secs,
            own / 1e6,
            e.us_per_op(c.own),
            pg / 1e6,
            e.us_per_op(c.pg),
            ((busy - own - pg) / 1e6).max(0.0),
            e.busy_pct(),
            e.steal_pct(),
            e.completions_per_commit().unwrap_or(f64::NAN),
            e.top_pct(),
            e.rate() * 100.0 / e.top_pct().max(1e-9),
        );
        if own + pg > 0.0 {
            let _ = writeln!(
                s,
                "At that CPU cost, the {ncpu:.0} CPUs alone would allow at most {:.0} operations \
                 per second (measured: {:.0}).",
                ncpu * 1e6 / (e.us_per_op(c.own) + e.us_per_op(c.pg)),
                e.rate()
            );
        }
    }

    // What limits the most processes.
    if let Some(p) = rows
        .iter()
        .filter(|r| matches!(r.case, Case::Procs(_)))
        .max_by_key(|r| r.procs)
        .filter(|p| p.procs > 1)
    {
        let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let one = rows.iter().find(|r| r.case == Case::Procs(1));
        let per_op = p.us_per_op(p.out.cpu.own) + p.us_per_op(p.out.cpu.pg);
        let _ = write!(
            s,
            "\n### What limits {} engine processes\n\n\
             {} processes, {} callers in all: {:.0} operations per second{}, with the CPUs \
             {:.0}% busy ({:.0}% other). Each engine has a share of the callers, so its batches \
             are smaller: {} operations completed per commit{}; every batch pays the same fixed \
             cost (parsing and planning its statements, BEGIN and COMMIT, a WAL flush), so the \
             CPU per operation grows to {:.0} µs (bench {:.0} + postgres {:.0}){}. At that \
             cost the {ncpu:.0} CPUs allow at most {:.0} operations per second.\n",
            p.procs,
            p.procs,
            p.callers,
            p.rate(),
            one.map_or(String::new(), |o| format!(
                " ({:.2}x one process)",
                p.rate() / o.rate().max(1e-9)
            )),
            p.busy_pct(),
            p.other_pct(),
            fmt_opt(p.completions_per_commit(), 1),
            one.map_or(String::new(), |o| format!(
                " (one process: {})",
                fmt_opt(o.completions_per_commit(), 1)
            )),
            per_op,
            p.us_per_op(p.out.cpu.own),
            p.us_per_op(p.out.cpu.pg),
            one.map_or(String::new(), |o| format!(
                " (one process: {:.0})",
                o.us_per_op(o.out.cpu.own) + o.us_per_op(o.out.cpu.pg)
            )),
            ncpu * 1e6 / per_op.max(1e-9),
        );
    }

    if !notes.is_empty() {
        s.push_str("\n### Notes\n\n");
        for n in notes {
            let _ = writeln!(s, "- {n}");
        }
        for r in rows.iter().filter(|r| !r.out.note.is_empty()) {
            let _ = writeln!(s, "- {}: {}", r.case.id(), r.out.note);
        }
    }
    s
}

fn main() {
    let args = parse_args();
    match &args.case {
        Some(id) => run_child(&args, id),
        None if !args.bench => {
            eprintln!(
                "postgres: not run without --bench (use `cargo bench --bench postgres --features postgres`)"
            );
        }
        None => run_parent(&args),
    }
}
