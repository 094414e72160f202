//! `make bench-compare` (through `scripts/bench-compare.sh`): the engine against the naive
//! SQLite approach, the raw SQLite ceiling and Redis, measured in one run on one machine, and
//! the engine with a large table. Writes a markdown table and a CSV into `bench-results/`.
//!
//! Run it through the script, which starts the Redis servers; by hand:
//!
//! ```text
//! cargo bench --bench compare -- [--secs S] [--warmup S] [--callers 1,8,64]
//!     [--redis-plain HOST:PORT] [--redis-aof HOST:PORT]
//!     [--growth 10000,1000000,5000000 | --skip-growth | --skip-5m]
//!     [--only engine-full,engine-normal,naive,raw,redis-plain,redis-aof,growth,raw-v1,engine-metrics]
//!     [--out DIR] [--dir DIR] [--stamp TEXT] [--command TEXT] [--no-latest]
//!     [--engine-readers N] [--engine-cache-kib N] [--engine-max-batch N] [--engine-replay-cache BYTES]
//!     [--engine-page-size BYTES]
//! ```
//!
//! `raw-v1` (only when named in `--only`) runs the raw baselines on schema version 1 too (a
//! `WITHOUT ROWID` table keyed by the record id, where every row lands on a random page)
//! instead of the engine's rowid table: the measurement behind schema version 2 (BENCHMARKS.md,
//! "Fewer pages per operation"). Every raw row's note gives the bytes written per row (WAL
//! frames and checkpoint copies).
//!
//! `engine-metrics` (only when named in `--only`, built with `--features metrics`) runs each
//! `engine-full` and `engine-normal` case a second time, right before or after it (in turn),
//! with a Prometheus recorder installed: what the meters cost (`make bench-metrics`).
//!
//! The `--engine-*` options change the engine's configuration in every engine case (tuning
//! experiments); `--engine-page-size` creates the database file with that page size before the
//! engine opens it.
//!
//! Every case runs in a child process of its own (this binary again, with `--case ID`), so its
//! peak memory (VmHWM) is its own and no case inherits another's heap. In the child, the
//! callers run for `--warmup` seconds, then for `--secs` measured seconds: throughput counts
//! the operations that finished inside the window; latency is per operation (claim + complete
//! for a fresh key, one claim for a replay) as the caller sees it. "Slowest caller" is the
//! rate of the caller that finished fewest operations: a lock that lets some callers starve
//! (the naive approach's busy-wait) shows there, not in the total. Peak memory is read after
//! the case, with the peak reset after the case's setup (`clear_refs`); for Redis the
//! server's is read the same way. The run starts and ends with an fsync probe of the
//! databases' file system: every durable system here waits for fsync, so its latency is
//! printed with the results.

mod common;

use std::fmt::Write as _;
use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idempotency_rs::{ClaimOutcome, ClaimRequest, Durability, Engine, EngineConfig};
use redis::AsyncCommands as _;

use common::{Hist, Keys};

// ------------------------------------------------------------------------------------------
// Command line
// ------------------------------------------------------------------------------------------

struct Args {
    secs: f64,
    warmup: f64,
    callers: Vec<usize>,
    redis_plain: Option<String>,
    redis_aof: Option<String>,
    growth: Vec<u64>,
    out: PathBuf,
    dir: Option<PathBuf>,
    stamp: Option<String>,
    command: String,
    /// Do not overwrite `compare-latest.*` (experiments).
    no_latest: bool,
    only: Option<Vec<String>>,
    /// Child mode: the case to run, and the parent's work directory.
    case: Option<String>,
    workdir: Option<PathBuf>,
    /// The arguments as given, passed on to the children.
    raw: Vec<String>,
    /// `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and then this
    /// binary does nothing (a full run takes minutes).
    bench: bool,
    engine_readers: Option<usize>,
    engine_replay_cache: Option<usize>,
    engine_cache_kib: Option<i64>,
    engine_max_batch: Option<usize>,
    engine_page_size: Option<u32>,
}

impl Args {
    /// Whether the section `name` runs (`--only` lists the sections to run).
    fn runs(&self, name: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|o| o == name))
    }

    fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup)
    }

    fn secs(&self) -> Duration {
        Duration::from_secs_f64(self.secs)
    }

    /// Opens an engine on `path` with the `--engine-*` settings.
    fn open_engine(&self, path: &Path, durability: Durability) -> Engine {
        if let Some(size) = self.engine_page_size {
            // The page size is fixed when the first table is created: set it on the empty file
            // first (WAL mode writes the header), then let the engine create its schema.
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.pragma_update(None, "page_size", size).unwrap();
            conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        }
        let mut config = EngineConfig::new(path).durability(durability);
        if let Some(n) = self.engine_readers {
            config = config.read_connections(n);
        }
        if let Some(bytes) = self.engine_replay_cache {
            config = config.replay_cache_bytes(bytes);
        }
        if let Some(kib) = self.engine_cache_kib {
            config = config.cache_size_kib(kib);
        }
        if let Some(n) = self.engine_max_batch {
            config = config.max_batch(n);
        }
        Engine::open(config).unwrap()
    }

    /// The `--engine-*` settings in effect, for the report.
    fn engine_settings(&self) -> Option<String> {
        let mut s = Vec::new();
        if let Some(n) = self.engine_readers {
            s.push(format!("read_connections {n}"));
        }
        if let Some(n) = self.engine_replay_cache {
            s.push(format!("replay_cache_bytes {n}"));
        }
        if let Some(n) = self.engine_cache_kib {
            s.push(format!("cache_size_kib {n}"));
        }
        if let Some(n) = self.engine_max_batch {
            s.push(format!("max_batch {n}"));
        }
        if let Some(n) = self.engine_page_size {
            s.push(format!("page_size {n}"));
        }
        (!s.is_empty()).then(|| s.join(", "))
    }
}

fn parse_args() -> Args {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut a = Args {
        secs: 3.0,
        warmup: 0.5,
        callers: vec![1, 8, 64],
        redis_plain: None,
        redis_aof: None,
        growth: vec![10_000, 1_000_000, 5_000_000],
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-results"),
        dir: None,
        stamp: None,
        command: "cargo bench --bench compare".into(),
        no_latest: false,
        only: None,
        case: None,
        workdir: None,
        raw: raw.clone(),
        bench: false,
        engine_readers: None,
        engine_replay_cache: None,
        engine_cache_kib: None,
        engine_max_batch: None,
        engine_page_size: None,
    };
    let mut it = raw.into_iter();
    let list = |s: String| -> Vec<u64> {
        s.split(',')
            .filter(|x| !x.is_empty())
            .map(|x| {
                x.trim()
                    .replace('_', "")
                    .parse()
                    .expect("a list of numbers")
            })
            .collect()
    };
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            // `cargo bench` passes --bench to every bench binary.
            "--bench" => a.bench = true,
            "--secs" => a.secs = value().parse().expect("--secs: seconds"),
            "--warmup" => a.warmup = value().parse().expect("--warmup: seconds"),
            "--callers" => a.callers = list(value()).into_iter().map(|n| n as usize).collect(),
            "--redis-plain" => a.redis_plain = Some(value()),
            "--redis-aof" => a.redis_aof = Some(value()),
            "--growth" => a.growth = list(value()),
            "--skip-growth" => a.growth.clear(),
            "--skip-5m" => a.growth.retain(|&n| n < 5_000_000),
            "--out" => a.out = PathBuf::from(value()),
            "--dir" => a.dir = Some(PathBuf::from(value())),
            "--stamp" => a.stamp = Some(value()),
            "--command" => a.command = value(),
            "--no-latest" => a.no_latest = true,
            "--only" => a.only = Some(value().split(',').map(str::to_owned).collect()),
            "--case" => a.case = Some(value()),
            "--workdir" => a.workdir = Some(PathBuf::from(value())),
            "--engine-readers" => a.engine_readers = Some(value().parse().expect("a number")),
            "--engine-replay-cache" => {
                a.engine_replay_cache = Some(value().parse().expect("a number"))
            }
            "--engine-cache-kib" => a.engine_cache_kib = Some(value().parse().expect("KiB")),
            "--engine-max-batch" => a.engine_max_batch = Some(value().parse().expect("a number")),
            "--engine-page-size" => a.engine_page_size = Some(value().parse().expect("bytes")),
            other => panic!("unknown argument {other}; see the header of benches/compare.rs"),
        }
    }
    a
}

// ------------------------------------------------------------------------------------------
// Cases
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Workload {
    Fresh,
    Replay,
}

#[derive(Clone, Copy)]
enum Case {
    Engine(Durability, Workload, usize),
    /// `Engine` with the `metrics` feature's meters recorded by a Prometheus recorder
    /// (scraped every 5 s), run right before or after the same case without.
    Metered(Durability, Workload, usize),
    Naive(usize),
    /// `v1`: on schema version 1 (`common::create_v1_schema`), for comparison.
    Raw {
        engine_shaped: bool,
        v1: bool,
    },
    Redis {
        aof: bool,
        workload: Workload,
        callers: usize,
    },
    Prefill(u64),
    Growth(u64),
    /// The growth workload on a table of `n` records that have all expired, with the cleanup
    /// running every 50 ms: what deleting them costs the claims' p99.
    Expiry(u64),
}

fn durability_name(d: Durability) -> &'static str {
    match d {
        Durability::Full => "full",
        Durability::Normal => "normal",
    }
}

fn workload_name(w: Workload) -> &'static str {
    match w {
        Workload::Fresh => "fresh",
        Workload::Replay => "replay",
    }
}

impl Case {
    fn id(&self) -> String {
        match *self {
            Case::Engine(d, w, n) => {
                format!("engine-{}/{}/{n}", durability_name(d), workload_name(w))
            }
            Case::Metered(d, w, n) => format!(
                "engine-{}-metrics/{}/{n}",
                durability_name(d),
                workload_name(w)
            ),
            Case::Naive(n) => format!("naive/fresh/{n}"),
            Case::Raw { engine_shaped, v1 } => {
                format!(
                    "raw/{}{}",
                    if engine_shaped {
                        "claim-complete64"
                    } else {
                        "insert64"
                    },
                    if v1 { "-v1" } else { "" }
                )
            }
            Case::Redis {
                aof,
                workload,
                callers,
            } => format!(
                "redis-{}/{}/{callers}",
                if aof { "aof" } else { "plain" },
                workload_name(workload)
            ),
            Case::Prefill(n) => format!("prefill/{n}"),
            Case::Growth(n) => format!("growth/{n}"),
            Case::Expiry(n) => format!("expiry/{n}"),
        }
    }

    fn parse(id: &str) -> Case {
        let parts: Vec<&str> = id.split('/').collect();
        let workload = |s: &str| match s {
            "fresh" => Workload::Fresh,
            "replay" => Workload::Replay,
            _ => panic!("bad workload in case {id}"),
        };
        let num = |s: &str| s.parse::<u64>().unwrap_or_else(|_| panic!("bad case {id}"));
        match parts.as_slice() {
            ["engine-full", w, n] => Case::Engine(Durability::Full, workload(w), num(n) as usize),
            ["engine-normal", w, n] => {
                Case::Engine(Durability::Normal, workload(w), num(n) as usize)
            }
            ["engine-full-metrics", w, n] => {
                Case::Metered(Durability::Full, workload(w), num(n) as usize)
            }
            ["engine-normal-metrics", w, n] => {
                Case::Metered(Durability::Normal, workload(w), num(n) as usize)
            }
            ["naive", "fresh", n] => Case::Naive(num(n) as usize),
            ["raw", shape] => Case::Raw {
                engine_shaped: shape.starts_with("claim-complete64"),
                v1: shape.ends_with("-v1"),
            },
            [r @ ("redis-plain" | "redis-aof"), w, n] => Case::Redis {
                aof: *r == "redis-aof",
                workload: workload(w),
                callers: num(n) as usize,
            },
            ["prefill", n] => Case::Prefill(num(n)),
            ["growth", n] => Case::Growth(num(n)),
            ["expiry", n] => Case::Expiry(num(n)),
            _ => panic!("unknown case {id}"),
        }
    }

    /// (workload, system, durability, callers) as the table shows them.
    fn labels(&self) -> (&'static str, &'static str, &'static str, usize) {
        let w = |w: Workload| match w {
            Workload::Fresh => "fresh claim+complete",
            Workload::Replay => "replay hit",
        };
        match *self {
            Case::Engine(d, wl, n) => (w(wl), "engine (tasks)", durability_name(d), n),
            Case::Metered(d, wl, n) => (w(wl), "engine + metrics (tasks)", durability_name(d), n),
            Case::Naive(n) => (w(Workload::Fresh), "naive SQLite (threads)", "full", n),
            Case::Raw { engine_shaped, v1 } => (
                w(Workload::Fresh),
                match (engine_shaped, v1) {
                    (true, false) => "raw SQLite claim+complete64",
                    (false, false) => "raw SQLite insert64",
                    (true, true) => "raw SQLite claim+complete64 (schema v1)",
                    (false, true) => "raw SQLite insert64 (schema v1)",
                },
                "full",
                1,
            ),
            Case::Redis {
                aof,
                workload,
                callers,
            } => (
                w(workload),
                if aof {
                    "redis (aof always)"
                } else {
                    "redis (no persistence)"
                },
                if aof { "always" } else { "none" },
                callers,
            ),
            Case::Prefill(_) | Case::Growth(_) | Case::Expiry(_) => {
                (w(Workload::Fresh), "engine (tasks)", "full", 64)
            }
        }
    }
}

/// The cases of a run, in order.
fn plan(args: &Args) -> Vec<Case> {
    let mut cases = Vec::new();
    for (section, d) in [
        ("engine-full", Durability::Full),
        ("engine-normal", Durability::Normal),
    ] {
        if args.runs(section) {
            let metered = args
                .only
                .as_ref()
                .is_some_and(|o| o.iter().any(|s| s == "engine-metrics"));
            // Which of a pair runs first alternates, from a run-dependent start: the second
            // of two cases in a row pays for the first's files being flushed and deleted.
            let mut first = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |t| t.as_secs())
                .is_multiple_of(2);
            for w in [Workload::Fresh, Workload::Replay] {
                for &n in &args.callers {
                    // Opt-in (`--only engine-full,engine-metrics`, with the `metrics`
                    // feature): each metered case beside its twin, so that the two share the
                    // machine's state of the moment.
                    let pair = [Case::Engine(d, w, n), Case::Metered(d, w, n)];
                    match (metered, first) {
                        (false, _) => cases.push(pair[0]),
                        (true, true) => cases.extend(pair),
                        (true, false) => cases.extend(pair.into_iter().rev()),
                    }
                    first = !first;
                }
            }
        }
    }
    if args.runs("naive") {
        cases.extend(args.callers.iter().map(|&n| Case::Naive(n)));
    }
    if args.runs("raw") {
        for engine_shaped in [false, true] {
            cases.push(Case::Raw {
                engine_shaped,
                v1: false,
            });
        }
    }
    // Opt-in only (`--only ...,raw-v1`): the schema comparison, not part of the standard run.
    if args
        .only
        .as_ref()
        .is_some_and(|o| o.iter().any(|s| s == "raw-v1"))
    {
        for engine_shaped in [false, true] {
            cases.push(Case::Raw {
                engine_shaped,
                v1: true,
            });
        }
    }
    for (section, aof, addr) in [
        ("redis-plain", false, &args.redis_plain),
        ("redis-aof", true, &args.redis_aof),
    ] {
        if args.runs(section) && addr.is_some() {
            for workload in [Workload::Fresh, Workload::Replay] {
                cases.extend(args.callers.iter().map(|&callers| Case::Redis {
                    aof,
                    workload,
                    callers,
                }));
            }
        }
    }
    if args.runs("growth") {
        // Cleanup cost, on the largest table up to 1M records (5M would take minutes to fill
        // for no new information).
        if let Some(&n) = args.growth.iter().filter(|&&n| n <= 1_000_000).max() {
            cases.push(Case::Expiry(n));
        }
        for &n in &args.growth {
            cases.push(Case::Prefill(n));
            cases.push(Case::Growth(n));
        }
    }
    cases
}

/// What a child reports for its case.
#[derive(Default)]
struct Outcome {
    ops: u64,
    secs: f64,
    min_caller_ops: u64,
    p50_ms: f64,
    p99_ms: f64,
    peak_kib: Option<u64>,
    server_peak_kib: Option<u64>,
    /// Growth: bytes of database + WAL before and after; prefill: seconds it took.
    size_before: Option<u64>,
    size_after: Option<u64>,
    prefill_secs: Option<f64>,
    note: String,
    /// Lines for the report's notes (deduplicated by the parent).
    notes: Vec<String>,
}

impl Outcome {
    fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }

    /// Operations per second of the slowest caller.
    fn slowest_rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.min_caller_ops as f64 / self.secs
        } else {
            0.0
        }
    }

    fn from_measured(m: &Measured) -> Self {
        Outcome {
            ops: m.ops,
            secs: m.elapsed.as_secs_f64(),
            min_caller_ops: m.min_caller_ops,
            p50_ms: m.hist.percentile_ms(0.50),
            p99_ms: m.hist.percentile_ms(0.99),
            ..Outcome::default()
        }
    }

    /// One line on the child's stdout.
    fn encode(&self) -> String {
        let o = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        format!(
            "RESULT\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            self.min_caller_ops,
            self.ops,
            self.secs,
            self.p50_ms,
            self.p99_ms,
            o(self.peak_kib),
            o(self.server_peak_kib),
            o(self.size_before),
            o(self.size_after),
            self.prefill_secs.map_or("-".to_owned(), |v| v.to_string()),
            self.note.replace(['\t', '\n'], " "),
        )
    }

    fn decode(stdout: &str) -> Option<Self> {
        let mut out = Outcome::default();
        let mut found = false;
        for line in stdout.lines() {
            if let Some(note) = line.strip_prefix("NOTE\t") {
                out.notes.push(note.to_owned());
            } else if let Some(rest) = line.strip_prefix("RESULT\t") {
                let f: Vec<&str> = rest.split('\t').collect();
                let u = |s: &str| s.parse::<u64>().ok();
                let x = |s: &str| s.parse::<f64>().ok();
                out.min_caller_ops = u(f.first()?)?;
                out.ops = u(f.get(1)?)?;
                out.secs = x(f.get(2)?)?;
                out.p50_ms = x(f.get(3)?)?;
                out.p99_ms = x(f.get(4)?)?;
                out.peak_kib = u(f.get(5)?);
                out.server_peak_kib = u(f.get(6)?);
                out.size_before = u(f.get(7)?);
                out.size_after = u(f.get(8)?);
                out.prefill_secs = x(f.get(9)?);
                out.note = f.get(10).copied().unwrap_or("").to_owned();
                found = true;
            }
        }
        found.then_some(out)
    }
}

// ------------------------------------------------------------------------------------------
// Measurement
// ------------------------------------------------------------------------------------------

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// What one case measured.
struct Measured {
    ops: u64,
    elapsed: Duration,
    hist: Hist,
    /// Operations of the caller that finished fewest (fairness: 0 means a starved caller).
    min_caller_ops: u64,
}

impl Measured {
    fn from_parts(parts: Vec<Hist>, elapsed: Duration) -> Self {
        let mut hist = Hist::new();
        for p in &parts {
            hist.merge(p);
        }
        Measured {
            ops: hist.total(),
            elapsed,
            min_caller_ops: parts.iter().map(Hist::total).min().unwrap_or(0),
            hist,
        }
    }
}

type BoxFut = Pin<Box<dyn Future<Output = ()> + Send>>;
type AsyncOp = Arc<dyn Fn(usize, u64) -> BoxFut + Send + Sync>;

/// Runs `op(caller, n)` in a loop on `callers` tokio tasks: warm-up, then the measured window.
/// The clock is kept by this (non-runtime) thread; every task yields after each operation, so
/// an operation that completes without waiting (an engine replay) cannot starve the others.
fn drive_tasks(
    rt: &tokio::runtime::Runtime,
    callers: usize,
    warmup: Duration,
    secs: Duration,
    op: AsyncOp,
) -> Measured {
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let tasks: Vec<_> = (0..callers)
        .map(|t| {
            let phase = phase.clone();
            let op = op.clone();
            rt.spawn(async move {
                let mut hist = Hist::new();
                let mut n = 0;
                loop {
                    if phase.load(Ordering::Acquire) == STOP {
                        break;
                    }
                    let start = Instant::now();
                    op(t, n).await;
                    n += 1;
                    if phase.load(Ordering::Acquire) == MEASURE {
                        hist.record(start.elapsed().as_nanos() as u64, 1);
                    }
                    tokio::task::yield_now().await;
                }
                hist
            })
        })
        .collect();
    std::thread::sleep(warmup);
    phase.store(MEASURE, Ordering::Release);
    let t0 = Instant::now();
    std::thread::sleep(secs);
    phase.store(STOP, Ordering::Release);
    let elapsed = t0.elapsed();
    let parts = rt.block_on(async {
        let mut parts = Vec::with_capacity(callers);
        for task in tasks {
            parts.push(task.await.expect("a benchmark task panicked"));
        }
        parts
    });
    Measured::from_parts(parts, elapsed)
}

/// The same with OS threads, for the blocking baselines. `op(thread, n)` returns how many
/// operations it completed (the raw ceiling completes 64 at a time; they share its latency).
fn drive_threads<S, F>(threads: usize, warmup: Duration, secs: Duration, setup: S) -> Measured
where
    S: Fn(usize) -> F,
    F: FnMut(u64) -> u64 + Send,
{
    let phase = AtomicU8::new(WARMUP);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mut op = setup(t);
                let phase = &phase;
                s.spawn(move || {
                    let mut hist = Hist::new();
                    let mut n = 0;
                    loop {
                        if phase.load(Ordering::Acquire) == STOP {
                            break;
                        }
                        let start = Instant::now();
                        let done = op(n);
                        n += 1;
                        if phase.load(Ordering::Acquire) == MEASURE {
                            hist.record(start.elapsed().as_nanos() as u64, done);
                        }
                    }
                    hist
                })
            })
            .collect();
        std::thread::sleep(warmup);
        phase.store(MEASURE, Ordering::Release);
        let t0 = Instant::now();
        std::thread::sleep(secs);
        phase.store(STOP, Ordering::Release);
        let elapsed = t0.elapsed();
        let parts = handles.into_iter().map(|h| h.join().unwrap()).collect();
        Measured::from_parts(parts, elapsed)
    })
}

/// The peak RSS since the last reset, and the same for another process.
fn peaks(outcome: &mut Outcome, server_pid: Option<&str>) {
    outcome.peak_kib = common::peak_rss_kib();
    outcome.server_peak_kib = server_pid.and_then(|p| common::proc_status_kib(p, "VmHWM"));
}

// ------------------------------------------------------------------------------------------
// The systems under test (each runs in a child process)
// ------------------------------------------------------------------------------------------

/// Engine, fresh claim + complete, through the async API on tokio tasks.
fn engine_fresh_op(engine: Engine, keys: Arc<Keys>) -> AsyncOp {
    Arc::new(move |_, _| {
        let engine = engine.clone();
        let key = keys.next();
        Box::pin(async move {
            match engine.claim_async(common::request(&key)).await.unwrap() {
                ClaimOutcome::Claimed(lease) => {
                    lease.complete_async(common::response()).await.unwrap()
                }
                other => panic!("a fresh key was not claimed: {other:?}"),
            }
        })
    })
}

/// Engine, replay hit, through the async API.
fn engine_replay_op(engine: Engine, requests: Arc<Vec<ClaimRequest>>) -> AsyncOp {
    Arc::new(move |t, n| {
        let engine = engine.clone();
        let req = requests[(t * 7919 + n as usize) % requests.len()].clone();
        Box::pin(async move {
            match engine.claim_async(req).await.unwrap() {
                ClaimOutcome::Replay(r) => {
                    std::hint::black_box(r);
                }
                other => panic!("expected a replay, got {other:?}"),
            }
        })
    })
}

const REPLAY_KEYS: usize = 1000;

fn engine_case(
    args: &Args,
    dir: &Path,
    durability: Durability,
    workload: Workload,
    callers: usize,
) -> Outcome {
    let rt = common::runtime();
    let name = format!(
        "engine-{}-{}-{callers}.db",
        durability_name(durability),
        workload_name(workload)
    );
    let engine = args.open_engine(&dir.join(name), durability);
    let op = match workload {
        Workload::Fresh => engine_fresh_op(engine.clone(), Arc::new(Keys::new("fresh"))),
        Workload::Replay => {
            let keys = Keys::new("replay");
            let requests: Vec<ClaimRequest> = (0..REPLAY_KEYS)
                .map(|_| {
                    let k = keys.next();
                    common::claim_complete(&engine, &k);
                    common::request(&k)
                })
                .collect();
            engine_replay_op(engine.clone(), Arc::new(requests))
        }
    };
    common::reset_peak_rss("self");
    let m = drive_tasks(&rt, callers, args.warmup(), args.secs(), op);
    let mut out = Outcome::from_measured(&m);
    peaks(&mut out, None);
    engine.shutdown().unwrap();
    out
}

fn naive_case(args: &Args, dir: &Path, callers: usize) -> Outcome {
    let path = dir.join(format!("naive-{callers}.db"));
    common::create_schema(&path);
    let keys = Keys::new("naive");
    let retries = AtomicU64::new(0);
    common::reset_peak_rss("self");
    let m = drive_threads(callers, args.warmup(), args.secs(), |_| {
        let conn = common::baseline_connection(&path, "FULL");
        let keys = &keys;
        let retries = &retries;
        move |n| {
            retries.fetch_add(
                common::naive_op(&conn, &keys.next(), n as i64),
                Ordering::Relaxed,
            );
            1
        }
    });
    let mut out = Outcome::from_measured(&m);
    peaks(&mut out, None);
    let r = retries.load(Ordering::Relaxed);
    if r > 0 {
        out.note = format!("{r} statements retried after SQLITE_BUSY");
    }
    out
}

fn raw_case(args: &Args, dir: &Path, engine_shaped: bool, v1: bool) -> Outcome {
    let path = dir.join(format!("raw-{engine_shaped}-{v1}.db"));
    if v1 {
        common::create_v1_schema(&path);
    } else {
        common::create_schema(&path);
    }
    let keys = Keys::new("raw");
    common::reset_peak_rss("self");
    let rows = AtomicU64::new(0);
    let written_before = common::written_bytes();
    let m = drive_threads(1, args.warmup(), args.secs(), |_| {
        let conn = common::baseline_connection(&path, "FULL");
        let keys = &keys;
        let rows = &rows;
        move |n| {
            rows.fetch_add(64, Ordering::Relaxed);
            let batch: Vec<String> = (0..64).map(|_| keys.next()).collect();
            let fence = n as i64 * 64;
            if engine_shaped {
                common::raw_claim_complete_batch(&conn, &batch, fence, v1);
            } else {
                common::raw_insert_batch(&conn, &batch, fence);
            }
            64
        }
    });
    let mut out = Outcome::from_measured(&m);
    peaks(&mut out, None);
    out.note = "1 thread, 64 rows per batch; each row's latency is its batch's".into();
    if let (Some(before), Some(after)) = (written_before, common::written_bytes()) {
        let _ = write!(
            out.note,
            "; {:.1} KiB written per row (WAL + checkpoints)",
            (after - before) as f64 / rows.load(Ordering::Relaxed).max(1) as f64 / 1024.0
        );
    }
    out
}

/// The Redis equivalent of the engine's protocol: `SET key "0:<fp>" NX EX 86400` to claim,
/// `SET key "1:<fp>:<response>" EX 86400` to complete, `GET key` to replay. One multiplexed
/// connection (redis-rs) shared by all tasks, as redis-rs recommends.
fn redis_case(args: &Args, aof: bool, workload: Workload, callers: usize) -> Outcome {
    let addr = if aof {
        args.redis_aof.as_deref()
    } else {
        args.redis_plain.as_deref()
    }
    .expect("the Redis address");
    let rt = common::runtime();
    let client = redis::Client::open(format!("redis://{addr}/")).unwrap();
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(Duration::from_secs(30)))
        .set_connection_timeout(Some(Duration::from_secs(5)));
    let conn = rt
        .block_on(client.get_multiplexed_async_connection_with_config(&config))
        .unwrap_or_else(|e| panic!("cannot connect to Redis at {addr}: {e}"));
    let info: String = rt
        .block_on(
            redis::cmd("INFO")
                .arg("server")
                .query_async(&mut conn.clone()),
        )
        .unwrap();
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_owned())
    };
    let server_pid = field("process_id").unwrap_or_default();
    let persistence = if aof {
        "appendonly yes, appendfsync always"
    } else {
        "no persistence"
    };
    println!(
        "NOTE\tRedis ({persistence}): redis-server {} on {addr}, one multiplexed redis-rs \
         connection shared by all tasks; the database is flushed before each case",
        field("redis_version").unwrap_or_default()
    );
    let _: () = rt
        .block_on(redis::cmd("FLUSHALL").query_async(&mut conn.clone()))
        .unwrap();

    let fp_hex: String = common::fingerprint()
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let claimed = Arc::new(format!("0:{fp_hex}").into_bytes());
    let mut done = format!("1:{fp_hex}:201:content-type=application/json:").into_bytes();
    done.extend_from_slice(common::BODY);
    let done = Arc::new(done);

    let op: AsyncOp = match workload {
        Workload::Fresh => {
            let keys = Arc::new(Keys::new("redis"));
            let conn = conn.clone();
            Arc::new(move |_, _| {
                let mut conn = conn.clone();
                let key = keys.next();
                let (claimed, done) = (claimed.clone(), done.clone());
                Box::pin(async move {
                    let won: Option<String> = redis::cmd("SET")
                        .arg(&key)
                        .arg(&claimed[..])
                        .arg("NX")
                        .arg("EX")
                        .arg(86_400)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    assert!(won.is_some(), "a fresh Redis key was taken");
                    let _: () = redis::cmd("SET")
                        .arg(&key)
                        .arg(&done[..])
                        .arg("EX")
                        .arg(86_400)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                })
            })
        }
        Workload::Replay => {
            let k = Keys::new("redis-replay");
            let keys: Vec<String> = (0..REPLAY_KEYS).map(|_| k.next()).collect();
            rt.block_on(async {
                let mut c = conn.clone();
                for k in &keys {
                    let _: () = c.set_ex(k, &done[..], 86_400).await.unwrap();
                }
            });
            let keys = Arc::new(keys);
            let conn = conn.clone();
            Arc::new(move |t, n| {
                let mut conn = conn.clone();
                let key = keys[(t * 7919 + n as usize) % keys.len()].clone();
                Box::pin(async move {
                    let v: Option<Vec<u8>> = conn.get(&key).await.unwrap();
                    let v = v.expect("a replay key is missing");
                    assert!(v.starts_with(b"1:"));
                    std::hint::black_box(v);
                })
            })
        }
    };
    common::reset_peak_rss("self");
    common::reset_peak_rss(&server_pid);
    let m = drive_tasks(&rt, callers, args.warmup(), args.secs(), op);
    let mut out = Outcome::from_measured(&m);
    peaks(&mut out, Some(&server_pid));
    out
}

fn growth_path(dir: &Path, records: u64) -> PathBuf {
    dir.join(format!("growth-{records}.db"))
}

/// Fills a table with `records` live records (a case of its own, so its 1 GiB page cache is
/// not in the growth case's peak memory).
fn prefill_case(dir: &Path, records: u64) -> Outcome {
    let path = growth_path(dir, records);
    common::create_schema(&path);
    let took = common::prefill(&path, records, 100_000);
    Outcome {
        prefill_secs: Some(took.as_secs_f64()),
        size_before: Some(common::db_size(&path)),
        ..Outcome::default()
    }
}

/// The engine on the table `prefill_case` filled.
fn growth_case(args: &Args, dir: &Path, records: u64) -> Outcome {
    let path = growth_path(dir, records);
    let size_before = common::db_size(&path);
    let rt = common::runtime();
    let engine = args.open_engine(&path, Durability::Full);
    common::reset_peak_rss("self");
    let op = engine_fresh_op(engine.clone(), Arc::new(Keys::new("growth")));
    let m = drive_tasks(&rt, 64, args.warmup(), args.secs(), op);
    let mut out = Outcome::from_measured(&m);
    peaks(&mut out, None);
    out.size_before = Some(size_before);
    out.size_after = Some(common::db_size(&path));
    engine.shutdown().unwrap();
    drop(engine);
    for ext in ["db", "db-wal", "db-shm"] {
        let _ = std::fs::remove_file(path.with_extension(ext));
    }
    out
}

/// A table of `records` expired records, the cleanup every 50 ms in batches of 1000 (the
/// default batch), and the growth workload on top; the note says how many were deleted.
fn expiry_case(args: &Args, dir: &Path, records: u64) -> Outcome {
    let path = dir.join(format!("expiry-{records}.db"));
    common::create_schema(&path);
    let took = common::prefill_expired(&path, records, 100_000);
    let size_before = common::db_size(&path);
    let rt = common::runtime();
    let engine = Engine::open(
        EngineConfig::new(&path)
            .durability(Durability::Full)
            .cleanup(Duration::from_millis(50), 1000),
    )
    .unwrap();
    common::reset_peak_rss("self");
    let op = engine_fresh_op(engine.clone(), Arc::new(Keys::new("expiry")));
    let m = drive_tasks(&rt, 64, args.warmup(), args.secs(), op);
    let mut out = Outcome::from_measured(&m);
    peaks(&mut out, None);
    engine.shutdown().unwrap();
    drop(engine);
    let left: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM idempotency_records WHERE expires_at <= ?1",
            [common::now_ms()],
            |r| r.get(0),
        )
        .unwrap();
    out.note = format!(
        "{} of {records} expired records deleted during the run ({:.1} s warm-up + measured)",
        records as i64 - left,
        args.warmup().as_secs_f64() + args.secs().as_secs_f64(),
    );
    out.size_before = Some(size_before);
    out.size_after = Some(common::db_size(&path));
    out.prefill_secs = Some(took.as_secs_f64());
    for ext in ["db", "db-wal", "db-shm"] {
        let _ = std::fs::remove_file(path.with_extension(ext));
    }
    out
}

/// The Prometheus recorder, as a service would install it (buckets, upkeep, and a scrape
/// every 5 s), before the engine opens and registers its meters.
#[cfg(feature = "metrics")]
fn install_recorder() {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("idempotency_batch_size".into()),
                &[1.0, 4.0, 16.0, 64.0, 256.0],
            )
        })
        .and_then(PrometheusBuilder::install_recorder)
        .expect("the Prometheus recorder");
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_secs(5));
            handle.run_upkeep();
            std::hint::black_box(handle.render());
        }
    });
}

#[cfg(not(feature = "metrics"))]
fn install_recorder() {
    panic!(
        "the engine-metrics cases need the `metrics` feature: cargo bench --bench compare --features metrics"
    );
}

/// Child mode: runs one case and prints its outcome.
fn run_child(args: &Args, id: &str) {
    let dir = args.workdir.as_deref().expect("--case needs --workdir");
    let out = match Case::parse(id) {
        Case::Engine(d, w, n) => engine_case(args, dir, d, w, n),
        Case::Metered(d, w, n) => {
            install_recorder();
            engine_case(args, dir, d, w, n)
        }
        Case::Naive(n) => naive_case(args, dir, n),
        Case::Raw { engine_shaped, v1 } => raw_case(args, dir, engine_shaped, v1),
        Case::Redis {
            aof,
            workload,
            callers,
        } => redis_case(args, aof, workload, callers),
        Case::Prefill(n) => prefill_case(dir, n),
        Case::Growth(n) => growth_case(args, dir, n),
        Case::Expiry(n) => expiry_case(args, dir, n),
    };
    println!("{}", out.encode());
    let _ = std::io::stdout().flush();
}

// ------------------------------------------------------------------------------------------
// PART 5, HTTP end to end, is `benches/http.rs` (it needs the `axum-integration` feature, which
// this bench does not): `scripts/bench-compare.sh` runs it after this bench and appends its
// tables to the same report files.
// ------------------------------------------------------------------------------------------

// ------------------------------------------------------------------------------------------
// The parent: runs every case in a child, writes the report
// ------------------------------------------------------------------------------------------

/// Median and 99th percentile of `write 4 KiB + fdatasync` in `dir`, in microseconds.
fn fsync_probe(dir: &Path) -> (f64, f64) {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![7u8; 4096];
    let mut lat: Vec<f64> = (0..200)
        .map(|_| {
            let start = Instant::now();
            f.write_all(&block).unwrap();
            f.sync_data().unwrap();
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    drop(f);
    let _ = std::fs::remove_file(&path);
    lat.sort_by(f64::total_cmp);
    (lat[lat.len() / 2], lat[lat.len() * 99 / 100])
}

fn machine(dir: &Path) -> String {
    let common::Machine {
        cpus,
        model,
        kernel,
        load,
    } = common::Machine::read();
    let mem = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .map(|v| v.trim().to_owned())
    });
    let df = Command::new("df")
        .args(["-h", "--output=source,fstype,size,avail"])
        .arg(dir)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default();
    format!(
        "- CPUs: {cpus} ({model}); memory {}; Linux {kernel}; load average at start {load}\n\
         - disk of the databases: `{}` ({})\n",
        mem.unwrap_or_else(|| "unknown".into()),
        df.split_whitespace().collect::<Vec<_>>().join(" "),
        dir.display(),
    )
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("n/a".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

struct Report {
    rows: Vec<(Case, Outcome)>,
    growth: Vec<(u64, Outcome, Outcome)>,
    /// The cleanup case: records expired before, and the outcome.
    expiry: Option<(u64, Outcome)>,
    notes: Vec<String>,
}

impl Report {
    fn rate(&self, workload: &str, system: &str, durability: &str, callers: usize) -> Option<f64> {
        self.rows
            .iter()
            .find(|(c, _)| c.labels() == (workload, system, durability, callers))
            .map(|(_, o)| o.rate())
    }

    fn csv(&self) -> String {
        let mut s = String::from(
            "section,workload,system,durability,callers,ops_per_s,slowest_caller_ops_per_s,p50_ms,p99_ms,peak_rss_mib,server_peak_rss_mib,records,db_bytes,prefill_s,note\n",
        );
        for (c, o) in &self.rows {
            let (w, sys, d, n) = c.labels();
            let _ = writeln!(
                s,
                "compare,{w},{sys},{d},{n},{:.1},{:.1},{:.4},{:.4},{},{},,,,{}",
                o.rate(),
                o.slowest_rate(),
                o.p50_ms,
                o.p99_ms,
                mib(o.peak_kib),
                mib(o.server_peak_kib),
                o.note.replace(',', ";"),
            );
        }
        // The engine on a pre-filled table: live records (growth, the prefill timed in its own
        // case) or expired ones (expiry, with a note of how many the cleanup deleted).
        let mut table_row = |kind: &str, records: &u64, o: &Outcome, prefill: Option<f64>| {
            let _ = writeln!(
                s,
                "{kind},fresh claim+complete,engine (tasks),full,64,{:.1},{:.1},{:.4},{:.4},{},n/a,{records},{},{:.1},{}",
                o.rate(),
                o.slowest_rate(),
                o.p50_ms,
                o.p99_ms,
                mib(o.peak_kib),
                o.size_after.unwrap_or(0),
                prefill.unwrap_or(f64::NAN),
                o.note.replace(',', ";"),
            );
        };
        for (records, pre, g) in &self.growth {
            table_row("growth", records, g, pre.prefill_secs);
        }
        if let Some((records, e)) = &self.expiry {
            table_row("expiry", records, e, e.prefill_secs);
        }
        s
    }

    fn markdown(&self, header: &str) -> String {
        let mut s = String::from(header);
        s.push_str(
            "\n| workload | system | durability | callers | ops/s | slowest caller ops/s | p50 ms | p99 ms | peak RSS MiB | server peak RSS MiB | note |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
        );
        for (c, o) in &self.rows {
            let (w, sys, d, n) = c.labels();
            let _ = writeln!(
                s,
                "| {w} | {sys} | {d} | {n} | {:.0} | {:.0} | {:.3} | {:.3} | {} | {} | {} |",
                o.rate(),
                o.slowest_rate(),
                o.p50_ms,
                o.p99_ms,
                mib(o.peak_kib),
                o.server_peak_kib.map_or("-".into(), |k| mib(Some(k))),
                o.note,
            );
        }

        let fresh = "fresh claim+complete";
        let mut ratios = String::new();
        let mut ratio = |label: String, a: Option<f64>, b: Option<f64>| {
            if let (Some(a), Some(b)) = (a, b) {
                let _ = writeln!(ratios, "| {label} | {:.2}x |", a / b);
            }
        };
        for &n in &[1, 8, 64] {
            let e = self.rate(fresh, "engine (tasks)", "full", n);
            ratio(
                format!("engine Full @{n} / naive SQLite @{n}"),
                e,
                self.rate(fresh, "naive SQLite (threads)", "full", n),
            );
            ratio(
                format!("engine Full @{n} / Redis appendfsync always @{n}"),
                e,
                self.rate(fresh, "redis (aof always)", "always", n),
            );
            ratio(
                format!("engine Full @{n} / Redis no persistence @{n}"),
                e,
                self.rate(fresh, "redis (no persistence)", "none", n),
            );
        }
        let e64 = self.rate(fresh, "engine (tasks)", "full", 64);
        ratio(
            "engine Full @64 / raw ceiling (insert, 64 per fsynced txn)".into(),
            e64,
            self.rate(fresh, "raw SQLite insert64", "full", 1),
        );
        ratio(
            "engine Full @64 / raw engine-shaped (in-flight insert + completed update, 64 per batch)"
                .into(),
            e64,
            self.rate(fresh, "raw SQLite claim+complete64", "full", 1),
        );
        for shape in ["insert64", "claim+complete64"] {
            ratio(
                format!("raw {shape}: schema v2 (rowid table) / schema v1 (WITHOUT ROWID)"),
                self.rate(fresh, &format!("raw SQLite {shape}"), "full", 1),
                self.rate(fresh, &format!("raw SQLite {shape} (schema v1)"), "full", 1),
            );
        }
        ratio(
            "engine Normal @64 / engine Full @64".into(),
            self.rate(fresh, "engine (tasks)", "normal", 64),
            e64,
        );
        for &n in &[1, 8, 64] {
            ratio(
                format!("engine replay @{n} / Redis GET @{n} (no persistence)"),
                self.rate("replay hit", "engine (tasks)", "full", n),
                self.rate("replay hit", "redis (no persistence)", "none", n),
            );
        }
        if !ratios.is_empty() {
            s.push_str("\n### Ratios (same run)\n\n| ratio | value |\n|---|---:|\n");
            s.push_str(&ratios);
        }

        if !self.growth.is_empty() {
            s.push_str(
                "\n### Growth: engine, Full, 64 tasks, fresh claim+complete on a pre-filled table\n\n| records before | claims/s | p50 ms | p99 ms | db+wal before | db+wal after | peak RSS MiB | prefill time |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            );
            let size = |b: Option<u64>| {
                b.map_or("n/a".into(), |b| {
                    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
                })
            };
            for (records, pre, g) in &self.growth {
                let _ = writeln!(
                    s,
                    "| {records} | {:.0} | {:.3} | {:.3} | {} | {} | {} | {:.1} s |",
                    g.rate(),
                    g.p50_ms,
                    g.p99_ms,
                    size(g.size_before),
                    size(g.size_after),
                    mib(g.peak_kib),
                    pre.prefill_secs.unwrap_or(f64::NAN),
                );
            }
        }

        if let Some((records, e)) = &self.expiry {
            let live = self.growth.iter().find(|(n, _, _)| n == records);
            let _ = write!(
                s,
                "\n### Cleanup: the same workload on {records} records that have all expired, cleanup \
                 every 50 ms (batches of 1000)\n\n| table | claims/s | p50 ms | p99 ms | peak RSS MiB |\n\
                 |---|---:|---:|---:|---:|\n"
            );
            if let Some((_, _, g)) = live {
                let _ = writeln!(
                    s,
                    "| {records} live records (growth row above) | {:.0} | {:.3} | {:.3} | {} |",
                    g.rate(),
                    g.p50_ms,
                    g.p99_ms,
                    mib(g.peak_kib)
                );
            }
            let _ = writeln!(
                s,
                "| {records} expired records, cleanup running | {:.0} | {:.3} | {:.3} | {} |\n\n{}",
                e.rate(),
                e.p50_ms,
                e.p99_ms,
                mib(e.peak_kib),
                e.note
            );
            if let Some((_, _, g)) = live {
                let _ = writeln!(
                    s,
                    "\np99 with the cleanup running / p99 on live records: {:.2}x",
                    e.p99_ms / g.p99_ms
                );
            }
        }

        if !self.notes.is_empty() {
            s.push_str("\n### Notes\n\n");
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s
    }
}

fn run_parent(args: &Args) {
    let tmp = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).unwrap();
            tempfile::Builder::new()
                .prefix("idempotency-compare-")
                .tempdir_in(d)
        }
        None => tempfile::Builder::new()
            .prefix("idempotency-compare-")
            .tempdir(),
    }
    .unwrap();
    let dir = tmp.path();
    let started = Instant::now();
    let machine = machine(dir);
    let fsync_before = fsync_probe(dir);
    eprintln!(
        "fsync probe: p50 {:.0} us, p99 {:.0} us",
        fsync_before.0, fsync_before.1
    );
    let exe = std::env::current_exe().unwrap();
    let mut report = Report {
        rows: Vec::new(),
        growth: Vec::new(),
        expiry: None,
        notes: Vec::new(),
    };
    let mut prefilled: Option<(u64, Outcome)> = None;
    for case in plan(args) {
        let id = case.id();
        let output = Command::new(&exe)
            .args(&args.raw)
            .arg("--case")
            .arg(&id)
            .arg("--workdir")
            .arg(dir)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let Some(out) = Outcome::decode(&stdout).filter(|_| output.status.success()) else {
            eprintln!("  {id}: FAILED ({})", output.status);
            report
                .notes
                .push(format!("case {id} failed: {}", output.status));
            continue;
        };
        for n in &out.notes {
            if !report.notes.contains(n) {
                report.notes.push(n.clone());
            }
        }
        match case {
            Case::Prefill(n) => {
                eprintln!(
                    "  {id}: {:.1} s, {:.1} MiB",
                    out.prefill_secs.unwrap_or(f64::NAN),
                    out.size_before.unwrap_or(0) as f64 / (1u64 << 20) as f64
                );
                prefilled = Some((n, out));
            }
            Case::Growth(n) => {
                eprintln!(
                    "  {id}: {:.0} claims/s, p50 {:.3} ms, p99 {:.3} ms, peak {} MiB",
                    out.rate(),
                    out.p50_ms,
                    out.p99_ms,
                    mib(out.peak_kib)
                );
                let pre = match prefilled.take() {
                    Some((m, pre)) if m == n => pre,
                    _ => Outcome::default(),
                };
                report.growth.push((n, pre, out));
            }
            Case::Expiry(n) => {
                eprintln!(
                    "  {id}: {:.0} claims/s, p50 {:.3} ms, p99 {:.3} ms; {}",
                    out.rate(),
                    out.p50_ms,
                    out.p99_ms,
                    out.note
                );
                report.expiry = Some((n, out));
            }
            _ => {
                eprintln!(
                    "  {id:<28} {:>9.0} ops/s (slowest caller {:>7.0})  p50 {:>7.3} ms  p99 {:>7.3} ms  peak {} MiB{}",
                    out.rate(),
                    out.slowest_rate(),
                    out.p50_ms,
                    out.p99_ms,
                    mib(out.peak_kib),
                    out.server_peak_kib
                        .map_or(String::new(), |k| format!(" (server {} MiB)", mib(Some(k)))),
                );
                report.rows.push((case, out));
            }
        }
    }
    let fsync_after = fsync_probe(dir);
    if let Some(settings) = args.engine_settings() {
        report.notes.push(format!(
            "engine configuration changed for this run: {settings}"
        ));
    }

    report.notes.push(format!(
        "each case: its own process, {:.1} s warm-up, {:.1} s measured; tokio multi-thread \
         runtime (one worker per CPU) for the engine and Redis callers; OS threads for the \
         naive and raw SQLite baselines; whole run {:.0} s",
        args.warmup,
        args.secs,
        started.elapsed().as_secs_f64()
    ));
    report.notes.push(
        "peak RSS: VmHWM of the case's process, reset after its setup; the engine's includes \
         its SQLite page caches (16 MiB writer + up to 4 readers of 4 MiB)"
            .into(),
    );
    report.notes.push(
        "the fsync probe (4 KiB write + fdatasync, 200 times) tells what every durable row \
         here waits for; on a shared machine it moves with the neighbours' I/O"
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
        "## bench-compare {stamp}\n\n- command: `{}`\n{machine}- fsync probe (4 KiB write + \
         fdatasync): p50 {:.0} us, p99 {:.0} us before the run; p50 {:.0} us, p99 {:.0} us \
         after\n",
        args.command, fsync_before.0, fsync_before.1, fsync_after.0, fsync_after.1,
    );
    let md = report.markdown(&header);
    let csv = report.csv();
    common::write_report(&args.out, "compare", &stamp, &md, &csv, args.no_latest);
}

fn main() {
    let args = parse_args();
    match &args.case {
        Some(id) => run_child(&args, id),
        None if !args.bench => {
            eprintln!("compare: not run without --bench (use `cargo bench --bench compare`)");
        }
        None => run_parent(&args),
    }
}
