//! The write-ahead log: checkpoints run off the writer thread and keep the WAL bounded, and a
//! clean shutdown leaves it empty.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idempotency_rs::{
    ClaimOutcome, ClaimRequest, Durability, Engine, EngineConfig, Fingerprint, IdempotencyKey,
    Lease, ManualClock, StoredResponse,
};

const T0: i64 = 1_700_000_000_000;

fn request(key: &str) -> ClaimRequest {
    ClaimRequest::new(
        "s",
        IdempotencyKey::new(key).unwrap(),
        Fingerprint::of_request("POST", "/", key.as_bytes()),
    )
}

fn response(key: &str) -> StoredResponse {
    StoredResponse::new(201, format!("{{\"key\":\"{key}\"}}")).with_header("x-k", key.as_bytes())
}

fn claimed(outcome: ClaimOutcome) -> Lease {
    match outcome {
        ClaimOutcome::Claimed(lease) => lease,
        other => panic!("expected Claimed, got {other:?}"),
    }
}

fn replayed(outcome: ClaimOutcome) -> StoredResponse {
    match outcome {
        ClaimOutcome::Replay(r) => r,
        other => panic!("expected Replay, got {other:?}"),
    }
}

fn config(path: &Path) -> EngineConfig {
    EngineConfig::new(path).clock(Arc::new(ManualClock::new(T0)))
}

fn wal(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

fn len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Claims and completes `n` keys named `{prefix}-{i}` from `threads` threads.
fn write(engine: &Engine, prefix: &str, threads: usize, n: usize) {
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for i in (t..n).step_by(threads) {
                    let key = format!("{prefix}-{i}");
                    claimed(engine.claim(request(&key)).unwrap())
                        .complete(response(&key))
                        .unwrap();
                }
            });
        }
    });
}

/// Shutdown checkpoints with TRUNCATE: the WAL is empty once the writer is gone, and dropping
/// the engine (which closes the last connection) removes it or leaves it empty. Everything is
/// in the database file: a new engine replays it.
#[test]
fn shutdown_and_drop_leave_an_empty_wal() {
    for durability in [Durability::Full, Durability::Normal] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.db");
        let engine = Engine::open(config(&path).durability(durability)).unwrap();
        write(&engine, "a", 4, 300);
        assert!(len(&wal(&path)) > 0, "the WAL was never written");
        engine.shutdown().unwrap();
        assert_eq!(len(&wal(&path)), 0, "{durability:?}: WAL after shutdown");
        drop(engine);

        let engine = Engine::open(config(&path).durability(durability)).unwrap();
        write(&engine, "b", 4, 300);
        drop(engine);
        assert_eq!(len(&wal(&path)), 0, "{durability:?}: WAL after drop");

        let engine = Engine::open(config(&path)).unwrap();
        for key in ["a-0", "a-299", "b-0", "b-299"] {
            assert_eq!(replayed(engine.claim(request(key)).unwrap()), response(key));
        }
    }
}

/// While the engine runs, the checkpointer thread copies the WAL into the database file (the
/// writer connection never checkpoints by itself).
#[test]
fn the_checkpointer_copies_the_wal_while_the_engine_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let engine = Engine::open(config(&path)).unwrap();
    let before = len(&path);
    write(&engine, "k", 4, 500);
    let deadline = Instant::now() + Duration::from_secs(30);
    while len(&path) <= before {
        assert!(
            Instant::now() < deadline,
            "the database file never grew: nothing was checkpointed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Under steady load the WAL stays bounded: a passive checkpoint off the writer thread cannot
/// rewind it by itself while batches keep coming, so the writer is asked to copy the last
/// frames between two batches once the WAL passes 16 MiB.
#[test]
fn the_wal_stays_bounded_under_steady_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let engine = Engine::open(config(&path).durability(Durability::Normal)).unwrap();
    // ~8 KiB of WAL per operation (its leaf page written by the claim and by the completion):
    // 12,000 operations write ~100 MiB of frames.
    let mut peak = 0;
    for round in 0..12 {
        write(&engine, &format!("r{round}"), 8, 1000);
        peak = peak.max(len(&wal(&path)));
    }
    eprintln!("peak WAL size: {:.1} MiB", peak as f64 / (1 << 20) as f64);
    assert!(
        peak < 48 << 20,
        "the WAL grew to {peak} bytes under steady load"
    );
}
