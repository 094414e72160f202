//! Criterion benchmarks of the engine's hot paths and its throughput under concurrency, with
//! two baselines measured in the same run on the same schema and file system:
//!
//! * **naive**: check-then-insert, one autocommit statement per step (SELECT, INSERT, UPDATE),
//!   every thread on its own rusqlite connection (WAL, `synchronous=FULL`, busy timeout);
//! * **raw ceiling**: one thread inserting the same rows with plain rusqlite, 64 rows per
//!   transaction (`raw_insert64`, one fsynced transaction per 64 rows), and the same work
//!   shaped as the engine does it (`raw_claim_complete64`: insert 64 in-flight rows without
//!   fsync, then update them to completed in a second, fsynced transaction).
//!
//! Every database is a file in a temporary directory, with `Durability::Full` for the engine.
//! After Criterion's own report the bench prints a summary of ratios between the engine and
//! the baselines, all from this run, and the process's peak memory (`VmHWM`); the summary is
//! also written to `bench-results/engine-summary.md`.
//!
//! `cargo bench --bench engine` (about 2-3 minutes). Criterion filters work as usual
//! (`cargo bench --bench engine -- throughput`); the summary lists what ran.

mod common;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::{Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use idempotency_rs::{ClaimOutcome, ClaimRequest, Durability, IdempotencyKey};

use common::{Keys, SCOPE};

/// Concurrency levels of the throughput group.
const CLAIMERS: [usize; 3] = [1, 8, 64];
/// Rows per transaction in the raw ceiling.
const RAW_BATCH: usize = 64;
/// Completed records the replay benches cycle through.
const REPLAY_KEYS: usize = 1000;

/// Operations and time measured per benchmark, from every `iter_custom` call that ran long
/// enough to be past start-up effects (Criterion's own report has the full statistics).
static TALLY: Mutex<BTreeMap<String, (u64, Duration)>> = Mutex::new(BTreeMap::new());
/// Every operation run per benchmark, warm-up included (to relate to syscall counts).
static RUN: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

fn tally(name: &str, ops: u64, elapsed: Duration) {
    *RUN.lock().unwrap().entry(name.to_owned()).or_default() += ops;
    if elapsed < Duration::from_millis(20) {
        return;
    }
    let mut t = TALLY.lock().unwrap();
    let e = t.entry(name.to_owned()).or_default();
    e.0 += ops;
    e.1 += elapsed;
}

/// Runs `per_thread(thread, ops)` on `threads` threads that start together; returns the time
/// from the start signal until the last one is done (thread creation is not measured).
fn run_threads<F>(threads: usize, total: u64, per_thread: F) -> Duration
where
    F: Fn(usize, u64) + Sync,
{
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                let per_thread = &per_thread;
                s.spawn(move || {
                    let ops = common::share(total, threads, t);
                    barrier.wait();
                    per_thread(t, ops);
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        for h in handles {
            h.join().unwrap();
        }
        start.elapsed()
    })
}

fn claim_request(key: &str, fp: idempotency_rs::Fingerprint) -> ClaimRequest {
    ClaimRequest::new(SCOPE, IdempotencyKey::new(key).unwrap(), fp)
}

/// Single-caller latency of each claim outcome.
fn hot_paths(c: &mut Criterion, dir: &Path) {
    let engine = common::open_engine(&dir.join("hot.db"), Durability::Full);
    let keys = Keys::new("hot");
    let fp = common::fingerprint();
    let other = common::other_fingerprint();

    let done_key = keys.next();
    common::claim_complete(&engine, &done_key);
    let held_key = keys.next();
    let held = match engine.claim(common::request(&held_key)).unwrap() {
        ClaimOutcome::Claimed(lease) => lease,
        other => panic!("unexpected {other:?}"),
    };

    let mut g = c.benchmark_group("hot");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));

    g.bench_function("fresh_claim_complete", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                common::claim_complete(&engine, &keys.next());
            }
            let elapsed = start.elapsed();
            tally("hot/fresh_claim_complete", iters, elapsed);
            elapsed
        })
    });
    g.bench_function("replay_hit", |b| {
        b.iter(
            || match engine.claim(claim_request(&done_key, fp)).unwrap() {
                ClaimOutcome::Replay(r) => black_box(r),
                other => panic!("expected a replay, got {other:?}"),
            },
        )
    });
    g.bench_function("in_flight", |b| {
        b.iter(
            || match engine.claim(claim_request(&held_key, fp)).unwrap() {
                ClaimOutcome::InFlight { retry_after } => black_box(retry_after),
                other => panic!("expected in-flight, got {other:?}"),
            },
        )
    });
    g.bench_function("mismatch_completed", |b| {
        b.iter(
            || match engine.claim(claim_request(&done_key, other)).unwrap() {
                ClaimOutcome::Mismatch => black_box(()),
                other => panic!("expected a mismatch, got {other:?}"),
            },
        )
    });
    g.bench_function("mismatch_in_flight", |b| {
        b.iter(
            || match engine.claim(claim_request(&held_key, other)).unwrap() {
                ClaimOutcome::Mismatch => black_box(()),
                other => panic!("expected a mismatch, got {other:?}"),
            },
        )
    });
    g.finish();
    held.release().unwrap();
    engine.shutdown().unwrap();
}

/// Operations per second with many callers, the engine against the baselines.
fn throughput(c: &mut Criterion, dir: &Path) {
    let mut g = c.benchmark_group("throughput");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(1));

    // Engine: fresh claim -> complete, each on its own key.
    for &threads in &CLAIMERS {
        let engine =
            common::open_engine(&dir.join(format!("engine{threads}.db")), Durability::Full);
        let keys = Keys::new("tp");
        let name = format!("engine_claim_complete/{threads}");
        g.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let elapsed = run_threads(threads, iters, |_, ops| {
                    for _ in 0..ops {
                        common::claim_complete(&engine, &keys.next());
                    }
                });
                tally(&format!("throughput/{name}"), iters, elapsed);
                elapsed
            })
        });
        engine.shutdown().unwrap();
    }

    // Naive: 64 threads, each on its own connection, one autocommit statement per step.
    {
        let threads = 64;
        let path = dir.join("naive.db");
        common::create_schema(&path);
        let conns: Vec<Mutex<rusqlite::Connection>> = (0..threads)
            .map(|_| Mutex::new(common::baseline_connection(&path, "FULL")))
            .collect();
        let keys = Keys::new("naive");
        let name = format!("naive_claim_complete/{threads}");
        let retries = std::sync::atomic::AtomicU64::new(0);
        g.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let elapsed = run_threads(threads, iters, |t, ops| {
                    let conn = conns[t].lock().unwrap();
                    for i in 0..ops {
                        let r = common::naive_op(&conn, &keys.next(), i as i64);
                        retries.fetch_add(r, std::sync::atomic::Ordering::Relaxed);
                    }
                });
                tally(&format!("throughput/{name}"), iters, elapsed);
                elapsed
            })
        });
        let r = retries.load(std::sync::atomic::Ordering::Relaxed);
        if r > 0 {
            eprintln!("naive baseline: {r} statements retried after SQLITE_BUSY");
        }
    }

    // Raw ceilings: one thread, 64 rows per transaction.
    for (label, engine_shaped) in [("raw_insert64", false), ("raw_claim_complete64", true)] {
        let path = dir.join(format!("{label}.db"));
        common::create_schema(&path);
        let conn = common::baseline_connection(&path, "FULL");
        let keys = Keys::new(label);
        let mut fence = 0i64;
        g.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                let mut left = iters;
                while left > 0 {
                    let n = left.min(RAW_BATCH as u64);
                    let batch: Vec<String> = (0..n).map(|_| keys.next()).collect();
                    if engine_shaped {
                        common::raw_claim_complete_batch(&conn, &batch, fence, false);
                    } else {
                        common::raw_insert_batch(&conn, &batch, fence);
                    }
                    fence += n as i64;
                    left -= n;
                }
                let elapsed = start.elapsed();
                tally(&format!("throughput/{label}"), iters, elapsed);
                elapsed
            })
        });
    }

    // Replay hits from 1 and 2 threads, cycling through completed records.
    {
        let engine = common::open_engine(&dir.join("replay.db"), Durability::Full);
        // Filled on first use, so a filtered run that skips these benches does not pay for it.
        let requests = OnceLock::new();
        let requests = || {
            requests.get_or_init(|| {
                let keys = Keys::new("replay");
                (0..REPLAY_KEYS)
                    .map(|_| {
                        let k = keys.next();
                        common::claim_complete(&engine, &k);
                        common::request(&k)
                    })
                    .collect::<Vec<ClaimRequest>>()
            })
        };
        for threads in [1, 2] {
            let name = format!("replay_hit/{threads}");
            g.bench_function(&name, |b| {
                b.iter_custom(|iters| {
                    let requests = requests();
                    let elapsed = run_threads(threads, iters, |t, ops| {
                        for i in 0..ops {
                            let req = requests[(i as usize * threads + t) % requests.len()].clone();
                            match engine.claim(req).unwrap() {
                                ClaimOutcome::Replay(r) => {
                                    black_box(r);
                                }
                                other => panic!("expected a replay, got {other:?}"),
                            }
                        }
                    });
                    tally(&format!("throughput/{name}"), iters, elapsed);
                    elapsed
                })
            });
        }
        engine.shutdown().unwrap();
    }
    g.finish();
}

fn rate(t: &BTreeMap<String, (u64, Duration)>, name: &str) -> Option<f64> {
    t.get(name)
        .filter(|(ops, d)| *ops > 0 && !d.is_zero())
        .map(|(ops, d)| *ops as f64 / d.as_secs_f64())
}

/// The ratios the engine is judged by, from this run's tallies.
fn summary() -> String {
    let t = TALLY.lock().unwrap();
    let mut out = String::from("## engine bench summary (this run)\n\n");
    let run = RUN.lock().unwrap();
    out.push_str("| benchmark | ops/s | ops run (warm-up included) |\n|---|---:|---:|\n");
    for name in t.keys() {
        if let Some(r) = rate(&t, name) {
            let n = run.get(name).copied().unwrap_or(0);
            out.push_str(&format!("| {name} | {r:.0} | {n} |\n"));
        }
    }
    let e64 = rate(&t, "throughput/engine_claim_complete/64");
    let ratio = |label: &str, base: &str, target: &str| -> String {
        match (e64, rate(&t, base)) {
            (Some(a), Some(b)) => format!("| {label} | {:.2}x | {target} |\n", a / b),
            _ => format!("| {label} | (not run) | {target} |\n"),
        }
    };
    out.push_str("\n| ratio | measured | target |\n|---|---:|---|\n");
    out.push_str(&ratio(
        "engine@64 / naive@64",
        "throughput/naive_claim_complete/64",
        ">= 10x",
    ));
    out.push_str(&ratio(
        "engine@64 / raw ceiling (insert, 64 per fsynced txn)",
        "throughput/raw_insert64",
        ">= 0.8x",
    ));
    out.push_str(&ratio(
        "engine@64 / raw engine-shaped (insert in-flight, update completed; 64 per batch)",
        "throughput/raw_claim_complete64",
        "(honest ceiling)",
    ));
    match common::peak_rss_kib() {
        Some(kib) => out.push_str(&format!(
            "\nPeak memory of the bench process (VmHWM): {:.1} MiB\n",
            kib as f64 / 1024.0
        )),
        None => out.push_str("\nPeak memory: /proc/self/status not readable\n"),
    }
    out
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let dir = tempfile::Builder::new()
        .prefix("idempotency-bench-")
        .tempdir()
        .unwrap();
    hot_paths(&mut c, dir.path());
    throughput(&mut c, dir.path());
    c.final_summary();

    let text = summary();
    println!("\n{text}");
    let results = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-results");
    if std::fs::create_dir_all(&results).is_ok() {
        let _ = std::fs::write(results.join("engine-summary.md"), &text);
    }
}
