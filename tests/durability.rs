//! The write-ahead log: checkpoints run off the writer thread and keep the WAL bounded, and a
//! clean shutdown leaves it empty.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idempotency_rs::{
    ClaimOutcome, ClaimRequest, Durability, Engine, EngineConfig, Fingerprint, IdempotencyKey,
    ManualClock, StoredResponse,
};
use support::{claimed, replayed, request};

mod support;

const T0: i64 = 1_700_000_000_000;

fn response(key: &str) -> StoredResponse {
    StoredResponse::new(201, format!("{{\"key\":\"{key}\"}}")).with_header("x-k", key.as_bytes())
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
/// frames between two batches once the WAL passes 64 MiB.
#[test]
fn the_wal_stays_bounded_under_steady_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let engine = Engine::open(config(&path).durability(Durability::Normal)).unwrap();
    // ~20 KiB of WAL per operation here (the claim and the completion each write the record's
    // leaf page, plus index and interior pages): 30,000 operations write ~600 MiB of frames.
    let mut peak = 0;
    for round in 0..30 {
        write(&engine, &format!("r{round}"), 8, 1000);
        peak = peak.max(len(&wal(&path)));
    }
    eprintln!("peak WAL size: {:.1} MiB", peak as f64 / (1 << 20) as f64);
    assert!(
        peak < 128 << 20,
        "the WAL grew to {peak} bytes under steady load"
    );
}

// ---------------------------------------------------------------------------------------------
// Durability::Full: a completion is acknowledged, and replayed, only once the WAL is flushed
// (feature fault-injection: the syncer's flushes are held or failed on purpose).

#[cfg(feature = "fault-injection")]
mod flush {
    use std::sync::mpsc;

    use idempotency_rs::Error;

    use super::support::{record_state, wait_until_committed};
    use super::*;

    const WAIT: Duration = Duration::from_millis(300);

    /// Runs `f` on a thread; its result arrives on the receiver.
    fn background<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx
    }

    /// While the flush is held, the completion is committed (other connections see the
    /// completed row) but its caller is not answered, a retry is not answered with a replay
    /// (it waits for the flush), and a claim with another payload is still refused at once.
    /// Once the flush is done, both are answered and the key replays.
    #[test]
    fn a_completion_is_neither_acknowledged_nor_replayed_before_its_flush() {
        for readers in [4, 0] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("idem.db");
            let engine = Engine::open(config(&path).read_connections(readers)).unwrap();
            // Something already durable replays while the flush is held.
            claimed(engine.claim(request("before")).unwrap())
                .complete(response("before"))
                .unwrap();

            let lease = claimed(engine.claim(request("k")).unwrap());
            engine.inject_sync_pause(true);
            let completed = background(move || lease.complete(response("k")));
            wait_until_committed(&path, "k");

            let retry = {
                let engine = engine.clone();
                background(move || engine.claim(request("k")))
            };
            assert!(
                completed.recv_timeout(WAIT).is_err(),
                "acknowledged before the flush"
            );
            match retry.recv_timeout(WAIT) {
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Ok(got) => panic!("readers={readers}: answered before the flush: {got:?}"),
                Err(e) => panic!("{e:?}"),
            }
            let other = ClaimRequest::new(
                "s",
                IdempotencyKey::new("k").unwrap(),
                Fingerprint::of_request("POST", "/", b"another payload"),
            );
            assert!(matches!(
                engine.claim(other).unwrap(),
                ClaimOutcome::Mismatch
            ));
            assert_eq!(
                replayed(engine.claim(request("before")).unwrap()),
                response("before")
            );
            assert!(completed.try_recv().is_err() && retry.try_recv().is_err());

            engine.inject_sync_pause(false);
            completed
                .recv_timeout(Duration::from_secs(30))
                .unwrap()
                .unwrap();
            assert_eq!(
                replayed(
                    retry
                        .recv_timeout(Duration::from_secs(30))
                        .unwrap()
                        .unwrap()
                ),
                response("k")
            );
            assert_eq!(replayed(engine.claim(request("k")).unwrap()), response("k"));
        }
    }

    /// A failed flush: the completion it covered gets `SyncFailed` (never Ok), its record is
    /// not replayed, the engine stops (every later call fails with the same error), and no
    /// checkpoint runs. A new engine recovers the WAL: what was acknowledged before replays.
    #[test]
    fn a_failed_flush_fails_its_completions_and_stops_the_engine() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.db");
        let engine = Engine::open(config(&path)).unwrap();
        claimed(engine.claim(request("before")).unwrap())
            .complete(response("before"))
            .unwrap();
        let held = claimed(engine.claim(request("held")).unwrap());
        let lease = claimed(engine.claim(request("k")).unwrap());

        engine.inject_sync_failure();
        let err = lease.complete(response("k")).unwrap_err();
        assert!(matches!(err, Error::SyncFailed { .. }), "{err:?}");
        assert!(err.is_closed() && !err.is_transient());
        // Committed, visible to other connections, but never replayed by this engine.
        assert_eq!(record_state(&path, "k"), Some(1));
        let err = engine.claim(request("k")).unwrap_err();
        assert!(matches!(err, Error::SyncFailed { .. }), "{err:?}");
        // The engine has stopped.
        let err = held.complete(response("held")).unwrap_err();
        assert!(matches!(err, Error::SyncFailed { .. }), "{err:?}");
        let err = engine.shutdown().unwrap_err();
        assert!(matches!(err, Error::SyncFailed { .. }), "{err:?}");
        for key in ["before", "new"] {
            let err = engine.claim(request(key)).unwrap_err();
            assert!(matches!(err, Error::SyncFailed { .. }), "{key}: {err:?}");
        }
        // The shutdown let go of the file, so a new engine opens while this handle lives.
        assert!(len(&wal(&path)) > 0);

        // An engine that cannot flush the files does not open: it would read the WAL's frames
        // from the page cache, where a failed flush may have left them unwritten (and marked
        // clean, so that flushing again would not write them).
        match Engine::open(config(&path).inject_open_sync_failure()) {
            Err(Error::SyncFailed { .. }) => {}
            other => panic!("expected SyncFailed, got {other:?}"),
        }
        // A new engine checkpoints the WAL into the database file first, which writes every
        // page again and flushes it: by the time it answers, `k` is on disk, and replays.
        let engine2 = Engine::open(config(&path)).unwrap();
        assert_eq!(len(&wal(&path)), 0, "frames left in the WAL at open");
        assert_eq!(
            replayed(engine2.claim(request("before")).unwrap()),
            response("before")
        );
        assert_eq!(
            replayed(engine2.claim(request("k")).unwrap()),
            response("k")
        );
        drop(engine);
        drop(engine2);
    }

    /// A writer panic while completions wait for their flush: they are still flushed and
    /// answered on the way down (the syncer is stopped and joined, a held flush let go), and
    /// every caller is woken.
    #[test]
    fn a_writer_panic_still_answers_completions_waiting_for_their_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.db");
        let engine = Engine::open(config(&path)).unwrap();
        let lease = claimed(engine.claim(request("k")).unwrap());
        engine.inject_sync_pause(true);
        let completed = background(move || lease.complete(response("k")));
        wait_until_committed(&path, "k");
        let retry = {
            let engine = engine.clone();
            background(move || engine.claim(request("k")))
        };
        std::thread::sleep(Duration::from_millis(50));
        engine.inject_writer_panic();
        completed
            .recv_timeout(Duration::from_secs(30))
            .expect("the completion's caller was never woken")
            .unwrap();
        match retry
            .recv_timeout(Duration::from_secs(30))
            .expect("the retry's caller was never woken")
        {
            Ok(ClaimOutcome::Replay(r)) => assert_eq!(r, response("k")),
            Err(Error::WriterPanicked { .. }) => {}
            other => panic!("{other:?}"),
        }
        drop(engine);
        let engine = Engine::open(config(&path)).unwrap();
        assert_eq!(replayed(engine.claim(request("k")).unwrap()), response("k"));
    }
}
