//! Every error path of the engine, through the public API: files that are not databases,
//! read-only files and directories, newer schemas, corrupt rows, a closed engine, a full queue,
//! lost leases, retention and cleanup, dropped and extended leases, mismatches, invalid input
//! and (with the `fault-injection` feature) a writer thread that panics.

use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use idempotency_rs::admin::RecordState;
use idempotency_rs::{
    ClaimOutcome, ClaimRequest, Engine, EngineConfig, Error, Fingerprint, IdempotencyKey,
    ManualClock, StoredResponse,
};
use support::{claimed, replayed};

mod support;
use rusqlite::Connection;

const T0: i64 = 1_700_000_000_000;

fn fp(n: u8) -> Fingerprint {
    Fingerprint::of_request("POST", "/payments", &[n])
}

fn key(k: &str) -> IdempotencyKey {
    IdempotencyKey::new(k).unwrap()
}

fn req(scope: &str, k: &str, f: u8) -> ClaimRequest {
    ClaimRequest::new(scope, key(k), fp(f))
}

fn in_flight(outcome: ClaimOutcome) -> Duration {
    match outcome {
        ClaimOutcome::InFlight { retry_after } => retry_after,
        other => panic!("expected InFlight, got {other:?}"),
    }
}

fn response(body: &str) -> StoredResponse {
    StoredResponse::new(201, body.as_bytes().to_vec())
        .with_header("content-type", b"text/plain".to_vec())
        .with_header("x-bin", vec![0u8, 159, 255])
        .with_trailers(vec![("grpc-status".into(), b"0".to_vec())])
}

fn manual() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(T0))
}

fn file_config(path: &Path, clock: &Arc<ManualClock>) -> EngineConfig {
    EngineConfig::new(path)
        .lock_timeout(Duration::from_millis(100))
        .retention(Duration::from_millis(1000))
        .clock(clock.clone())
}

fn row_count(path: &Path) -> i64 {
    let conn = Connection::open(path).unwrap();
    conn.query_row("SELECT count(*) FROM idempotency_records", [], |r| r.get(0))
        .unwrap()
}

/// Runs `f` on another thread and fails the test if it has not finished within `limit`: a
/// guard against hangs, not a timing assertion (the limit is generous).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => {
            handle.join().unwrap();
            v
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            // The closure panicked: surface its panic.
            std::panic::resume_unwind(handle.join().unwrap_err())
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("hung for {limit:?}"),
    }
}

/// Polls a future once with a no-op waker (to get a claim queued without waiting for it).
fn poll_once<F: Future>(fut: &mut Pin<Box<F>>) -> Poll<F::Output> {
    fut.as_mut().poll(&mut Context::from_waker(Waker::noop()))
}

// ---------------------------------------------------------------------------------------------
// Opening

#[test]
fn a_file_that_is_not_a_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.db");
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 31 % 251) as u8).collect();
    fs::write(&path, &garbage).unwrap();
    match Engine::open(EngineConfig::new(&path)) {
        Err(Error::NotADatabase { path: p }) => assert_eq!(p, path),
        other => panic!("expected NotADatabase, got {other:?}"),
    }
    // Nothing was written to it.
    assert_eq!(fs::read(&path).unwrap(), garbage);

    // A text file too.
    fs::write(&path, "this is not a database\n".repeat(100)).unwrap();
    assert!(matches!(
        Engine::open(EngineConfig::new(&path)),
        Err(Error::NotADatabase { .. })
    ));
}

#[test]
fn a_path_in_a_missing_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no such directory").join("idem.db");
    match Engine::open(EngineConfig::new(&path)) {
        Err(Error::CannotOpen { path: p, reason }) => {
            assert_eq!(p, path);
            assert_eq!(reason, "its directory does not exist");
        }
        other => panic!("expected CannotOpen, got {other:?}"),
    }
    assert!(!path.exists());
}

#[test]
fn a_directory_is_not_a_database_file() {
    let dir = tempfile::tempdir().unwrap();
    match Engine::open(EngineConfig::new(dir.path())) {
        Err(e @ Error::CannotOpen { .. }) => {
            assert!(e.to_string().contains("is a directory"), "{e}");
        }
        other => panic!("expected CannotOpen, got {other:?}"),
    }
}

/// Makes `path` (a file or a directory) unwritable and undoes it on drop. Tries `chmod` first;
/// when that does not stop writes (tests often run as root, where permission bits are ignored)
/// it sets the immutable attribute with `chattr +i`, which stops root too. `None` when neither
/// works on this machine.
struct ReadOnlyGuard {
    path: PathBuf,
    mode: u32,
    immutable: bool,
}

impl ReadOnlyGuard {
    fn new(path: &Path) -> Option<ReadOnlyGuard> {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(path).unwrap().permissions().mode();
        let readonly_mode = if path.is_dir() { 0o555 } else { 0o444 };
        fs::set_permissions(path, fs::Permissions::from_mode(readonly_mode)).unwrap();
        let mut guard = ReadOnlyGuard {
            path: path.to_path_buf(),
            mode,
            immutable: false,
        };
        if !writable(path) {
            return Some(guard);
        }
        let ok = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        guard.immutable = ok;
        if ok && !writable(path) {
            return Some(guard);
        }
        None
    }
}

impl Drop for ReadOnlyGuard {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        if self.immutable {
            let _ = std::process::Command::new("chattr")
                .arg("-i")
                .arg(&self.path)
                .status();
        }
        let _ = fs::set_permissions(&self.path, fs::Permissions::from_mode(self.mode));
    }
}

fn writable(path: &Path) -> bool {
    if path.is_dir() {
        let probe = path.join(".write-probe");
        let ok = fs::File::create(&probe).is_ok();
        let _ = fs::remove_file(&probe);
        ok
    } else {
        fs::OpenOptions::new().append(true).open(path).is_ok()
    }
}

/// A database file the process cannot write.
#[test]
fn a_read_only_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let clock = manual();
    {
        let engine = Engine::open(file_config(&path, &clock)).unwrap();
        claimed(engine.claim(req("s", "k", 1)).unwrap())
            .complete(response("kept"))
            .unwrap();
        engine.shutdown().unwrap();
    }
    let Some(guard) = ReadOnlyGuard::new(&path) else {
        eprintln!(
            "SKIPPED: neither chmod nor chattr makes a file read-only for this user; only the \
             missing-directory case (Error::CannotOpen) is tested here"
        );
        return;
    };
    match Engine::open(file_config(&path, &clock)) {
        Err(Error::ReadOnly { path: p }) => assert_eq!(p, path),
        other => panic!("expected ReadOnly, got {other:?}"),
    }
    drop(guard);
    // Writable again: the record is intact.
    let engine = Engine::open(file_config(&path, &clock)).unwrap();
    assert_eq!(
        replayed(engine.claim(req("s", "k", 1)).unwrap()),
        response("kept")
    );
}

/// A writable database file in a directory where the WAL and shared-memory files cannot be
/// created.
#[test]
fn a_read_only_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("data");
    fs::create_dir(&sub).unwrap();
    let path = sub.join("idem.db");
    let clock = manual();
    {
        let engine = Engine::open(file_config(&path, &clock)).unwrap();
        claimed(engine.claim(req("s", "k", 1)).unwrap())
            .complete(response("kept"))
            .unwrap();
        engine.shutdown().unwrap();
    }
    // The clean shutdown removed the WAL: reopening must create it again.
    for leftover in ["idem.db-wal", "idem.db-shm"] {
        let _ = fs::remove_file(sub.join(leftover));
    }
    let Some(guard) = ReadOnlyGuard::new(&sub) else {
        eprintln!(
            "SKIPPED: neither chmod nor chattr makes a directory read-only for this user; only \
             the missing-directory case (Error::CannotOpen) is tested here"
        );
        return;
    };
    let opened = Engine::open(file_config(&path, &clock));
    drop(guard);
    match opened {
        Err(Error::ReadOnly { path: p }) => assert_eq!(p, path),
        other => panic!("expected ReadOnly, got {other:?}"),
    }
    let engine = Engine::open(file_config(&path, &clock)).unwrap();
    assert_eq!(
        replayed(engine.claim(req("s", "k", 1)).unwrap()),
        response("kept")
    );
}

fn user_version(conn: &Connection) -> i64 {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

/// How many tables, indexes and such have a name `LIKE` the pattern.
fn schema_objects(conn: &Connection, like: &str) -> i64 {
    conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE name LIKE ?1",
        [like],
        |r| r.get(0),
    )
    .unwrap()
}

/// The `CREATE TABLE` statement of the records table.
fn records_table_sql(conn: &Connection) -> String {
    conn.query_row(
        "SELECT sql FROM sqlite_schema WHERE name = 'idempotency_records'",
        [],
        |r| r.get(0),
    )
    .unwrap()
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE future (x); PRAGMA user_version = 99;")
            .unwrap();
    }
    match Engine::open(EngineConfig::new(&path)) {
        Err(Error::SchemaTooNew { found, supported }) => {
            assert_eq!(found, 99);
            assert!(supported < 99);
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    // The newer schema was not touched.
    let conn = Connection::open(&path).unwrap();
    let v = user_version(&conn);
    assert_eq!(v, 99);
    let ours = schema_objects(&conn, "idempotency%");
    assert_eq!(ours, 0);
    // Not even its journal mode: the refusal comes before the switch to WAL.
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "delete");
}

#[test]
fn a_known_schema_version_without_the_tables_is_corrupt() {
    for version in [1, 2, -1] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&format!(
                "CREATE TABLE someone_elses (x); PRAGMA user_version = {version};"
            ))
            .unwrap();
        }
        match Engine::open(EngineConfig::new(&path)) {
            Err(Error::Corrupt { .. }) => {}
            other => panic!("version {version}: expected Corrupt, got {other:?}"),
        }
        // Nothing was added to it.
        let conn = Connection::open(&path).unwrap();
        let ours = schema_objects(&conn, "idempotency%");
        assert_eq!(ours, 0, "version {version}");
    }
}

/// The version 1 schema (a `WITHOUT ROWID` table keyed by the record id), as the first
/// releases created it.
const SCHEMA_V1_RECORDS: &str = "
CREATE TABLE idempotency_records_v1 (
    id BLOB NOT NULL PRIMARY KEY, scope TEXT NOT NULL, key TEXT NOT NULL,
    fingerprint BLOB NOT NULL, state INTEGER NOT NULL, fence INTEGER NOT NULL,
    locked_until INTEGER NOT NULL, expires_at INTEGER NOT NULL, created_at INTEGER NOT NULL,
    completed_at INTEGER, status INTEGER, headers BLOB, body BLOB, trailers BLOB
) WITHOUT ROWID;
INSERT INTO idempotency_records_v1
    SELECT id, scope, key, fingerprint, state, fence, locked_until, expires_at, created_at,
           completed_at, status, headers, body, trailers FROM idempotency_records;
DROP TABLE idempotency_records;
ALTER TABLE idempotency_records_v1 RENAME TO idempotency_records;
CREATE INDEX idempotency_records_expiry ON idempotency_records (expires_at);
PRAGMA user_version = 1;
";

#[test]
fn a_version_1_database_is_migrated_with_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let clock = manual();
    let (held_token, done_token) = {
        let engine = Engine::open(file_config(&path, &clock)).unwrap();
        let done = claimed(engine.claim(req("s", "done", 1)).unwrap());
        let done_token = done.fencing_token();
        done.complete(response("done")).unwrap();
        let held = claimed(engine.claim(req("s", "held", 1)).unwrap());
        let held_token = held.fencing_token();
        engine.shutdown().unwrap();
        std::mem::forget(held); // still in flight in the file
        (held_token, done_token)
    };
    // Turn the file back into a version 1 database holding the same rows.
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(SCHEMA_V1_RECORDS).unwrap();
        let without_rowid = records_table_sql(&conn);
        assert!(without_rowid.contains("WITHOUT ROWID"));
    }

    let engine = Engine::open(file_config(&path, &clock)).unwrap();
    // The completed record replays, the in-flight one is still held, with the same fence.
    assert_eq!(
        replayed(engine.claim(req("s", "done", 1)).unwrap()),
        response("done")
    );
    assert!(matches!(
        engine.claim(req("s", "done", 2)).unwrap(),
        ClaimOutcome::Mismatch
    ));
    in_flight(engine.claim(req("s", "held", 1)).unwrap());
    clock.advance(Duration::from_millis(100));
    let taken = claimed(engine.claim(req("s", "held", 1)).unwrap());
    assert!(taken.fencing_token() > held_token.max(done_token));
    taken.complete(response("held")).unwrap();
    claimed(engine.claim(req("s", "new", 1)).unwrap())
        .release()
        .unwrap();
    engine.shutdown().unwrap();

    let conn = Connection::open(&path).unwrap();
    let v = user_version(&conn);
    assert_eq!(v, 3);
    let sql = records_table_sql(&conn);
    assert!(!sql.contains("WITHOUT ROWID"), "{sql}");
    assert_eq!(row_count(&path), 2);
    let leftovers = schema_objects(&conn, "idempotency_records_v1");
    assert_eq!(leftovers, 0);
}

/// Version 2 had no `replay_until`: its rows are live until `expires_at`. Opening the file
/// adds the column (NULL everywhere) and nothing else changes: the completed record replays
/// until its `expires_at`, the in-flight one is still held, and new completions use the column.
#[test]
fn a_version_2_database_is_migrated_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let clock = manual();
    {
        let engine = Engine::open(file_config(&path, &clock)).unwrap();
        claimed(engine.claim(req("s", "done", 1)).unwrap())
            .complete(response("done"))
            .unwrap();
        std::mem::forget(claimed(engine.claim(req("s", "held", 1)).unwrap()));
        engine.shutdown().unwrap();
    }
    // Back to version 2: the column gone, and `expires_at` the completion's bound, as
    // version 2 wrote it.
    let done_until = T0 + 1000;
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&format!(
            "UPDATE idempotency_records SET expires_at = {done_until} WHERE state = 1;
             ALTER TABLE idempotency_records DROP COLUMN replay_until;
             PRAGMA user_version = 2;"
        ))
        .unwrap();
    }
    let engine = Engine::open(file_config(&path, &clock)).unwrap();
    assert_eq!(
        replayed(engine.claim(req("s", "done", 1)).unwrap()),
        response("done")
    );
    in_flight(engine.claim(req("s", "held", 1)).unwrap());
    claimed(engine.claim(req("s", "new", 1)).unwrap())
        .complete(response("new"))
        .unwrap();
    // Replayed until its `expires_at`, then gone.
    clock.set_ms(done_until - 1);
    replayed(engine.claim(req("s", "done", 1)).unwrap());
    clock.set_ms(done_until);
    claimed(engine.claim(req("s", "done", 2)).unwrap())
        .release()
        .unwrap();
    engine.shutdown().unwrap();
    let conn = Connection::open(&path).unwrap();
    assert_eq!(user_version(&conn), 3);
    assert!(records_table_sql(&conn).contains("replay_until"));
}

/// A completion within the lock timeout leaves the record's `expires_at` (its claim's bound,
/// and its place in the expiry index) where it was, and says until when it is replayed in
/// `replay_until`; a completion after the lock expired moves `expires_at` itself. Either way
/// the record is replayed for exactly the retention after its completion, and cleanup
/// deletes it once `expires_at` has passed.
#[test]
fn a_completed_record_is_replayed_for_the_retention_after_its_completion() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let clock = manual();
    let engine = Engine::open(file_config(&path, &clock)).unwrap();
    // Lock timeout 100 ms, retention 1000 ms.
    let early = claimed(engine.claim(req("s", "early", 1)).unwrap());
    let late = claimed(engine.claim(req("s", "late", 1)).unwrap());
    clock.advance(Duration::from_millis(40));
    early.complete(response("early")).unwrap(); // replayed until T0 + 1040
    clock.advance(Duration::from_millis(110)); // T0 + 150: late's lock expired, not taken
    late.complete(response("late")).unwrap(); // replayed until T0 + 1150
    let columns = |key: &str| -> (i64, Option<i64>) {
        let conn = Connection::open(&path).unwrap();
        conn.query_row(
            "SELECT expires_at, replay_until FROM idempotency_records WHERE key = ?1",
            [key],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };
    assert_eq!(columns("early"), (T0 + 100 + 1000, Some(T0 + 1040)));
    assert_eq!(columns("late"), (T0 + 1150, None));
    clock.set_ms(T0 + 1039);
    replayed(engine.claim(req("s", "early", 1)).unwrap());
    // From T0 + 1040 `early` is expired for everyone, and deleted from T0 + 1100 (one lock
    // timeout later at most).
    clock.set_ms(T0 + 1040);
    let state = |key: &str| engine.record("s", key).unwrap().map(|r| r.state);
    assert_eq!(state("early"), Some(RecordState::Expired));
    let stats = engine.stats().unwrap();
    assert_eq!((stats.completed, stats.expired), (1, 1));
    assert_eq!(engine.purge_expired().unwrap(), 0);
    clock.set_ms(T0 + 1100);
    assert_eq!(engine.purge_expired().unwrap(), 1);
    assert_eq!(state("early"), None);
    clock.set_ms(T0 + 1149);
    replayed(engine.claim(req("s", "late", 1)).unwrap());
    clock.set_ms(T0 + 1150);
    assert_eq!(state("late"), Some(RecordState::Expired));
    assert_eq!(engine.purge_expired().unwrap(), 1);
    claimed(engine.claim(req("s", "early", 1)).unwrap())
        .release()
        .unwrap();
}

#[test]
fn invalid_configurations_are_refused() {
    let bad = [
        EngineConfig::in_memory().queue_capacity(0),
        EngineConfig::in_memory().max_batch(0),
        EngineConfig::in_memory().lock_timeout(Duration::ZERO),
        EngineConfig::in_memory().retention(Duration::ZERO),
        EngineConfig::in_memory().cleanup(Duration::ZERO, 10),
        EngineConfig::in_memory().cleanup(Duration::from_secs(1), 0),
    ];
    for config in bad {
        let shown = format!("{config:?}");
        assert!(
            matches!(Engine::open(config), Err(Error::InvalidConfig { .. })),
            "{shown}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Corrupt rows

/// Stores one completed record under (`scope`, `k`) with fingerprint 1, then lets `damage`
/// change its row with plain SQL while the engine is closed.
fn damaged_db(dir: &Path, damage: &str) -> PathBuf {
    let path = dir.join("idem.db");
    let clock = manual();
    let engine = Engine::open(file_config(&path, &clock)).unwrap();
    claimed(engine.claim(req("s", "k", 1)).unwrap())
        .complete(response("original"))
        .unwrap();
    claimed(engine.claim(req("s", "healthy", 1)).unwrap())
        .complete(response("healthy"))
        .unwrap();
    engine.shutdown().unwrap();
    drop(engine);
    let conn = Connection::open(&path).unwrap();
    let n = conn
        .execute(
            &format!("UPDATE idempotency_records SET {damage} WHERE scope = 's' AND key = 'k'"),
            [],
        )
        .unwrap();
    assert_eq!(n, 1);
    path
}

#[test]
fn corrupt_rows_are_errors_never_panics_or_wrong_replays() {
    let damages = [
        "headers = x'ffffffffffff'",
        "headers = x'0105616263'",
        "headers = 'text, not a blob'",
        "trailers = x'ff'",
        "state = 7",
        "state = 'completed'",
        "status = 70000",
        "status = -1",
        "status = NULL",
        "status = 'two hundred'",
        "fingerprint = x'0102'",
        "body = 42",
        "locked_until = 'soon'",
    ];
    for damage in damages {
        for readers in [4, 0] {
            let dir = tempfile::tempdir().unwrap();
            let path = damaged_db(dir.path(), damage);
            let clock = manual();
            let engine =
                Engine::open(file_config(&path, &clock).read_connections(readers)).unwrap();
            for attempt in 0..2 {
                let got = engine.claim(req("s", "k", 1));
                assert!(
                    matches!(got, Err(Error::Corrupt { .. })),
                    "{damage} (readers {readers}, attempt {attempt}): expected Corrupt, got {got:?}"
                );
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let got = rt.block_on(engine.claim_async(req("s", "k", 1)));
            assert!(
                matches!(got, Err(Error::Corrupt { .. })),
                "{damage} async: {got:?}"
            );
            // The engine keeps serving other records.
            assert_eq!(
                replayed(engine.claim(req("s", "healthy", 1)).unwrap()),
                response("healthy"),
                "{damage}"
            );
            claimed(engine.claim(req("s", "fresh", 1)).unwrap())
                .complete(response("fresh"))
                .unwrap();
        }
    }
}

#[test]
fn a_corrupt_row_with_another_fingerprint_is_a_mismatch_not_a_replay() {
    let dir = tempfile::tempdir().unwrap();
    let path = damaged_db(dir.path(), "headers = x'ffffffffff'");
    let engine = Engine::open(file_config(&path, &manual())).unwrap();
    assert!(matches!(
        engine.claim(req("s", "k", 2)).unwrap(),
        ClaimOutcome::Mismatch
    ));
}

// ---------------------------------------------------------------------------------------------
// Closed engine

#[test]
fn a_closed_engine_refuses_everything() {
    for on_file in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let clock = manual();
        let config = if on_file {
            file_config(&dir.path().join("idem.db"), &clock)
        } else {
            EngineConfig::in_memory().clock(clock.clone())
        };
        let engine = Engine::open(config).unwrap();
        let other_handle = engine.clone();
        let to_complete = claimed(engine.claim(req("s", "a", 1)).unwrap());
        let to_release = claimed(engine.claim(req("s", "b", 1)).unwrap());
        let mut to_extend = claimed(engine.claim(req("s", "c", 1)).unwrap());
        let to_drop = claimed(engine.claim(req("s", "d", 1)).unwrap());
        let to_complete_async = claimed(engine.claim(req("s", "e", 1)).unwrap());
        claimed(engine.claim(req("s", "done", 1)).unwrap())
            .complete(response("done"))
            .unwrap();

        engine.shutdown().unwrap();

        assert!(matches!(engine.claim(req("s", "x", 1)), Err(Error::Closed)));
        // Even a replay of a completed record (the read-connection path) is refused.
        assert!(matches!(
            other_handle.claim(req("s", "done", 1)),
            Err(Error::Closed)
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(matches!(
            rt.block_on(engine.claim_async(req("s", "y", 1))),
            Err(Error::Closed)
        ));
        assert!(matches!(
            to_complete.complete(response("late")),
            Err(Error::Closed)
        ));
        assert!(matches!(
            rt.block_on(to_complete_async.complete_async(response("late"))),
            Err(Error::Closed)
        ));
        assert!(matches!(to_release.release(), Err(Error::Closed)));
        assert!(matches!(
            to_extend.extend(Duration::from_secs(1)),
            Err(Error::Closed)
        ));
        drop(to_drop);
        drop(to_extend);
        assert!(matches!(engine.shutdown(), Err(Error::Closed)));
        assert!(matches!(other_handle.shutdown(), Err(Error::Closed)));
        assert!(Error::Closed.is_closed());
        assert!(!Error::Closed.is_transient());

        if on_file {
            // What was committed before the shutdown is there; the leases stay in flight until
            // their lock times out.
            drop((engine, other_handle));
            let engine = Engine::open(file_config(&dir.path().join("idem.db"), &clock)).unwrap();
            assert_eq!(
                replayed(engine.claim(req("s", "done", 1)).unwrap()),
                response("done")
            );
            for k in ["a", "b", "c", "d", "e"] {
                in_flight(engine.claim(req("s", k, 1)).unwrap());
            }
        }
    }
}

#[test]
fn claims_racing_a_shutdown_all_get_an_answer() {
    within(Duration::from_secs(300), || {
        for round in 0..20 {
            let engine = Engine::open(EngineConfig::in_memory().queue_capacity(4)).unwrap();
            let barrier = Arc::new(std::sync::Barrier::new(9));
            let callers: Vec<_> = (0..8)
                .map(|t| {
                    let (engine, barrier) = (engine.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .build()
                            .unwrap();
                        for i in 0.. {
                            let r = req("s", &format!("{round}-{t}-{i}"), 1);
                            let got = if i % 2 == 0 {
                                engine.claim(r)
                            } else {
                                rt.block_on(engine.claim_async(r))
                            };
                            match got {
                                Ok(ClaimOutcome::Claimed(lease)) => {
                                    let _ = lease.complete(response("x"));
                                }
                                Err(Error::Closed) => return,
                                Ok(_) | Err(Error::Overloaded { .. }) => {}
                                Err(e) => panic!("unexpected {e:?}"),
                            }
                        }
                    })
                })
                .collect();
            barrier.wait();
            for _ in 0..round * 50 {
                std::thread::yield_now();
            }
            engine.shutdown().unwrap();
            for c in callers {
                c.join().unwrap();
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Overload

/// Holds the database's write lock from another connection, so the writer thread blocks in
/// `BEGIN IMMEDIATE` (for up to its busy timeout) and the claim queue cannot drain.
fn block_writer(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    conn
}

fn spin_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::yield_now();
    }
}

#[test]
fn a_full_queue_is_overloaded_at_once_and_admitted_work_still_finishes() {
    within(Duration::from_secs(300), full_queue);
}

fn full_queue() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let clock = manual();
    let engine = Engine::open(
        file_config(&path, &clock)
            .queue_capacity(1)
            // One command per batch: otherwise the writer, between taking claim A off the
            // queue and starting its transaction, could also take claim B (sent the moment
            // A left the queue), leaving room for one of the claims below.
            .max_batch(1)
            .busy_timeout(Duration::from_secs(120)),
    )
    .unwrap();
    // A lease admitted before the overload.
    let admitted = claimed(engine.claim(req("s", "admitted", 1)).unwrap());

    let blocker = block_writer(&path);
    // Claim A reaches the writer, which then waits for the lock.
    let mut a = Box::pin(engine.claim_async(req("s", "a", 1)));
    assert!(poll_once(&mut a).is_pending());
    spin_until("the writer to take claim A", || engine.queued() == 0);
    // Claim B fills the queue (capacity 1).
    let mut b = Box::pin(engine.claim_async(req("s", "b", 1)));
    assert!(poll_once(&mut b).is_pending());
    assert_eq!(engine.queued(), 1);

    // Everyone else is refused at once, from any number of threads, sync or async.
    let threads: Vec<_> = (0..32)
        .map(|i| {
            let engine = engine.clone();
            std::thread::spawn(move || engine.claim(req("s", &format!("t{i}"), 1)))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !threads.iter().all(|t| t.is_finished()) {
        if Instant::now() > deadline {
            panic!(
                "a claim was admitted past the full queue; claim A: {:?}, queued: {}",
                poll_once(&mut a).map(|r| r.map(|_| ())),
                engine.queued()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for t in threads {
        match t.join().unwrap() {
            Err(e @ Error::Overloaded { retry_after }) => {
                assert!(e.is_transient());
                assert!(!e.is_closed());
                assert!(retry_after > Duration::ZERO);
            }
            other => panic!("expected Overloaded, got {other:?}"),
        }
    }
    let mut c = Box::pin(engine.claim_async(req("s", "c", 1)));
    assert!(matches!(
        poll_once(&mut c),
        Poll::Ready(Err(Error::Overloaded { .. }))
    ));

    // A lease admitted earlier may still complete: its command does not wait for queue space.
    let completing = std::thread::spawn(move || admitted.complete(response("admitted")));

    blocker.execute_batch("COMMIT").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let lease_a = claimed(rt.block_on(a).unwrap());
    let lease_b = claimed(rt.block_on(b).unwrap());
    completing.join().unwrap().unwrap();
    lease_a.complete(response("a")).unwrap();
    lease_b.release().unwrap();
    assert_eq!(
        replayed(engine.claim(req("s", "admitted", 1)).unwrap()),
        response("admitted")
    );
    // A refused claim left nothing behind.
    for i in 0..32 {
        claimed(engine.claim(req("s", &format!("t{i}"), 1)).unwrap())
            .release()
            .unwrap();
    }
    claimed(engine.claim(req("s", "c", 1)).unwrap())
        .release()
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Fencing

#[test]
fn a_taken_over_lease_is_lost_and_changes_nothing() {
    for on_file in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let clock = manual();
        let config = if on_file {
            file_config(&dir.path().join("idem.db"), &clock)
        } else {
            EngineConfig::in_memory()
                .lock_timeout(Duration::from_millis(100))
                .retention(Duration::from_millis(1000))
                .clock(clock.clone())
        };
        let engine = Engine::open(config).unwrap();

        // complete + extend of a lost lease.
        let mut old = claimed(engine.claim(req("s", "k", 1)).unwrap());
        // Still locked one millisecond before the timeout.
        clock.advance(Duration::from_millis(99));
        assert_eq!(
            in_flight(engine.claim(req("s", "k", 1)).unwrap()),
            Duration::from_millis(1)
        );
        clock.advance(Duration::from_millis(1));
        let new = claimed(engine.claim(req("s", "k", 1)).unwrap());
        assert!(new.fencing_token() > old.fencing_token());
        assert!(matches!(
            old.extend(Duration::from_secs(10)),
            Err(Error::LeaseLost)
        ));
        assert!(matches!(
            old.complete(response("stale")),
            Err(Error::LeaseLost)
        ));
        // The newer holder is unaffected and its result is the one kept.
        in_flight(engine.claim(req("s", "k", 1)).unwrap());
        new.complete(response("fresh")).unwrap();
        assert_eq!(
            replayed(engine.claim(req("s", "k", 1)).unwrap()),
            response("fresh")
        );

        // release of a lost lease.
        let old = claimed(engine.claim(req("s", "r", 1)).unwrap());
        clock.advance(Duration::from_millis(100));
        let new = claimed(engine.claim(req("s", "r", 1)).unwrap());
        assert!(matches!(old.release(), Err(Error::LeaseLost)));
        in_flight(engine.claim(req("s", "r", 1)).unwrap());
        new.complete(response("kept")).unwrap();
        assert_eq!(
            replayed(engine.claim(req("s", "r", 1)).unwrap()),
            response("kept")
        );

        // A lost lease completing after the newer one did: still lost, the result unchanged.
        let old = claimed(engine.claim(req("s", "q", 1)).unwrap());
        clock.advance(Duration::from_millis(150));
        claimed(engine.claim(req("s", "q", 1)).unwrap())
            .complete(response("winner"))
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(matches!(
            rt.block_on(old.complete_async(response("loser"))),
            Err(Error::LeaseLost)
        ));
        assert_eq!(
            replayed(engine.claim(req("s", "q", 1)).unwrap()),
            response("winner")
        );

        // A lease whose record expired and was claimed again by another request.
        let old = claimed(engine.claim(req("s", "e", 1)).unwrap());
        clock.advance(Duration::from_millis(1100)); // past lock + retention
        let new = claimed(engine.claim(req("s", "e", 2)).unwrap());
        assert!(matches!(old.complete(response("x")), Err(Error::LeaseLost)));
        new.release().unwrap();
        assert!(!Error::LeaseLost.is_transient());
    }
}

#[test]
fn fencing_tokens_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let clock = manual();
    let mut last = 0;
    for round in 0..3 {
        let engine = Engine::open(file_config(&path, &clock)).unwrap();
        for i in 0..5 {
            let lease = claimed(engine.claim(req("s", &format!("{round}-{i}"), 1)).unwrap());
            assert!(lease.fencing_token() > last);
            last = lease.fencing_token();
            if i % 2 == 0 {
                lease.complete(response("r")).unwrap();
            } else {
                lease.release().unwrap();
            }
        }
        engine.shutdown().unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Retention and cleanup

#[test]
fn a_completed_record_replays_until_its_retention_then_is_absent() {
    for on_file in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.db");
        let clock = manual();
        let config = if on_file {
            file_config(&path, &clock)
        } else {
            EngineConfig::in_memory()
                .lock_timeout(Duration::from_millis(100))
                .retention(Duration::from_millis(1000))
                .clock(clock.clone())
        };
        let engine = Engine::open(config).unwrap();
        claimed(engine.claim(req("s", "k", 1)).unwrap())
            .complete(response("r"))
            .unwrap();
        clock.advance(Duration::from_millis(999));
        assert_eq!(
            replayed(engine.claim(req("s", "k", 1)).unwrap()),
            response("r")
        );
        assert!(matches!(
            engine.claim(req("s", "k", 2)).unwrap(),
            ClaimOutcome::Mismatch
        ));
        clock.advance(Duration::from_millis(1));
        if on_file {
            // The row is still there (cleanup runs every 60 s by default)...
            assert_eq!(row_count(&path), 1);
        }
        // ...but the record is gone: even another fingerprint may claim the key.
        let lease = claimed(engine.claim(req("s", "k", 2)).unwrap());
        lease.complete(response("second")).unwrap();
        assert_eq!(
            replayed(engine.claim(req("s", "k", 2)).unwrap()),
            response("second")
        );

        // A per-claim retention overrides the engine's.
        claimed(
            engine
                .claim(req("s", "short", 1).retention(Duration::from_millis(10)))
                .unwrap(),
        )
        .complete(response("short"))
        .unwrap();
        clock.advance(Duration::from_millis(9));
        replayed(engine.claim(req("s", "short", 1)).unwrap());
        clock.advance(Duration::from_millis(1));
        claimed(engine.claim(req("s", "short", 1)).unwrap())
            .release()
            .unwrap();
    }
}

/// Waits (up to two minutes) until the cleanup has left exactly `n` rows.
fn wait_for_rows(path: &Path, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while row_count(path) != n {
        assert!(
            Instant::now() < deadline,
            "cleanup left {} rows",
            row_count(path)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_large_backlog_of_expired_records_is_deleted_in_paced_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let clock = manual();
    // More than the first chunk (64) and several full batches: the chunk size adapts between
    // transactions, and nothing expired may be left behind, nor anything live deleted.
    let engine =
        Engine::open(file_config(&path, &clock).cleanup(Duration::from_millis(5), 1000)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        for chunk in 0..30 {
            let claims =
                (0..100).map(|i| engine.claim_async(req("s", &format!("old{chunk}-{i}"), 1)));
            for outcome in futures_util::future::join_all(claims).await {
                claimed(outcome.unwrap())
                    .complete_async(response("old"))
                    .await
                    .unwrap();
            }
        }
    });
    claimed(
        engine
            .claim(req("s", "kept", 1).retention(Duration::from_secs(3600)))
            .unwrap(),
    )
    .complete(response("kept"))
    .unwrap();
    assert_eq!(row_count(&path), 3001);
    clock.advance(Duration::from_millis(1100));
    wait_for_rows(&path, 1);
    assert_eq!(
        replayed(engine.claim(req("s", "kept", 1)).unwrap()),
        response("kept")
    );
}

#[test]
fn cleanup_deletes_expired_records_and_only_those() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let clock = manual();
    // Cleanup every 5 ms in batches of 2: several batches are needed.
    let engine =
        Engine::open(file_config(&path, &clock).cleanup(Duration::from_millis(5), 2)).unwrap();
    for i in 0..7 {
        claimed(engine.claim(req("s", &format!("old{i}"), 1)).unwrap())
            .complete(response("old"))
            .unwrap();
    }
    // An abandoned lease: its record expires at lock timeout + retention.
    let abandoned = claimed(engine.claim(req("s", "abandoned", 1)).unwrap());
    // A record kept longer than the others.
    claimed(
        engine
            .claim(req("s", "kept", 1).retention(Duration::from_secs(3600)))
            .unwrap(),
    )
    .complete(response("kept"))
    .unwrap();
    assert_eq!(row_count(&path), 9);

    clock.advance(Duration::from_millis(1100));
    wait_for_rows(&path, 1);
    let conn = Connection::open(&path).unwrap();
    let left: String = conn
        .query_row("SELECT key FROM idempotency_records", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, "kept");
    assert_eq!(
        replayed(engine.claim(req("s", "kept", 1)).unwrap()),
        response("kept")
    );
    // The abandoned lease's record is gone.
    assert!(matches!(
        abandoned.complete(response("late")),
        Err(Error::LeaseLost)
    ));
    claimed(engine.claim(req("s", "old0", 2)).unwrap())
        .release()
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Leases

#[test]
fn dropping_a_lease_releases_the_key() {
    for on_file in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let clock = manual();
        let config = if on_file {
            file_config(&dir.path().join("idem.db"), &clock)
        } else {
            EngineConfig::in_memory().clock(clock.clone())
        };
        let engine = Engine::open(config).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // Many times, sync and async, with another fingerprint each time: a claim right after
        // the drop must never find the key still held (Mismatch or InFlight). The clock never
        // moves, so only the release can free the key.
        for i in 0..300u32 {
            let k = format!("k{}", i % 3);
            let f = (i % 251) as u8;
            let lease = claimed(engine.claim(req("s", &k, f)).unwrap());
            drop(lease);
            let next = if i % 2 == 0 {
                engine.claim(req("s", &k, f.wrapping_add(1)))
            } else {
                rt.block_on(engine.claim_async(req("s", &k, f.wrapping_add(1))))
            };
            let lease = claimed(next.unwrap());
            drop(lease);
            // Several dropped leases, then claims of all of them.
            let leases: Vec<_> = (0..4)
                .map(|j| claimed(engine.claim(req("t", &format!("{i}-{j}"), 1)).unwrap()))
                .collect();
            drop(leases);
            for j in 0..4 {
                claimed(engine.claim(req("t", &format!("{i}-{j}"), 2)).unwrap())
                    .complete(response("x"))
                    .unwrap();
            }
        }
    }
}

#[test]
fn extend_keeps_a_lease_alive_past_its_original_timeout() {
    let clock = manual();
    let engine = Engine::open(
        EngineConfig::in_memory()
            .lock_timeout(Duration::from_millis(100))
            .retention(Duration::from_millis(1000))
            .clock(clock.clone()),
    )
    .unwrap();
    let mut lease = claimed(engine.claim(req("s", "k", 1)).unwrap());
    let original = lease.locked_until();
    clock.advance(Duration::from_millis(50));
    lease.extend(Duration::from_millis(500)).unwrap();
    assert_eq!(lease.locked_until(), original + Duration::from_millis(450));
    // Past the original timeout the record is still held, with the new retry time.
    clock.advance(Duration::from_millis(300));
    assert_eq!(
        in_flight(engine.claim(req("s", "k", 1)).unwrap()),
        Duration::from_millis(200)
    );
    // Extended again, asynchronously.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(lease.extend_async(Duration::from_millis(1000)))
        .unwrap();
    clock.advance(Duration::from_millis(999));
    in_flight(engine.claim(req("s", "k", 1)).unwrap());
    lease.complete(response("late but owned")).unwrap();
    assert_eq!(
        replayed(engine.claim(req("s", "k", 1)).unwrap()),
        response("late but owned")
    );

    // Without extend, the same wait loses the record.
    let lease = claimed(engine.claim(req("s", "j", 1)).unwrap());
    clock.advance(Duration::from_millis(100));
    let newer = claimed(engine.claim(req("s", "j", 1)).unwrap());
    assert!(matches!(
        lease.complete(response("x")),
        Err(Error::LeaseLost)
    ));
    newer.release().unwrap();
}

#[test]
fn a_timed_out_lease_nobody_took_over_may_still_complete() {
    let clock = manual();
    let engine = Engine::open(
        EngineConfig::in_memory()
            .lock_timeout(Duration::from_millis(100))
            .clock(clock.clone()),
    )
    .unwrap();
    let lease = claimed(engine.claim(req("s", "k", 1)).unwrap());
    clock.advance(Duration::from_millis(500));
    lease.complete(response("slow")).unwrap();
    assert_eq!(
        replayed(engine.claim(req("s", "k", 1)).unwrap()),
        response("slow")
    );
}

// ---------------------------------------------------------------------------------------------
// Mismatch

#[test]
fn mismatch_is_decided_before_in_flight() {
    for on_file in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let clock = manual();
        let config = if on_file {
            file_config(&dir.path().join("idem.db"), &clock)
        } else {
            EngineConfig::in_memory()
                .lock_timeout(Duration::from_millis(100))
                .retention(Duration::from_millis(1000))
                .clock(clock.clone())
        };
        let engine = Engine::open(config).unwrap();
        let lease = claimed(engine.claim(req("s", "k", 1)).unwrap());
        // Held by fingerprint 1: another fingerprint is a mismatch, not "in flight".
        assert!(matches!(
            engine.claim(req("s", "k", 2)).unwrap(),
            ClaimOutcome::Mismatch
        ));
        in_flight(engine.claim(req("s", "k", 1)).unwrap());
        // After the lock timed out the record is still live: still a mismatch, and another
        // fingerprint cannot take it over.
        clock.advance(Duration::from_millis(100));
        assert!(matches!(
            engine.claim(req("s", "k", 2)).unwrap(),
            ClaimOutcome::Mismatch
        ));
        lease.complete(response("one")).unwrap();
        // Completed: the replay goes to fingerprint 1 only.
        assert!(matches!(
            engine.claim(req("s", "k", 2)).unwrap(),
            ClaimOutcome::Mismatch
        ));
        assert_eq!(
            replayed(engine.claim(req("s", "k", 1)).unwrap()),
            response("one")
        );
        // The same key in another scope is another record.
        claimed(engine.claim(req("other", "k", 2)).unwrap())
            .release()
            .unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Invalid input

#[test]
fn invalid_keys_and_scopes_are_refused() {
    for bad in [
        "",
        " leading",
        "trailing ",
        "tab\there",
        "caf\u{e9}",
        "\u{7f}",
    ] {
        assert!(
            matches!(IdempotencyKey::new(bad), Err(Error::InvalidKey { .. })),
            "{bad:?}"
        );
    }
    assert!(matches!(
        IdempotencyKey::new("k".repeat(256)),
        Err(Error::InvalidKey { .. })
    ));
    assert!(IdempotencyKey::new("k".repeat(255)).is_ok());

    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(EngineConfig::new(dir.path().join("idem.db"))).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for scope in ["a\0b".to_owned(), "s".repeat(1025)] {
        assert!(matches!(
            engine.claim(ClaimRequest::new(scope.clone(), key("k"), fp(1))),
            Err(Error::InvalidScope { .. })
        ));
        assert!(matches!(
            rt.block_on(engine.claim_async(ClaimRequest::new(scope, key("k"), fp(1)))),
            Err(Error::InvalidScope { .. })
        ));
    }
    // The longest valid scope and key work, and the engine is unharmed.
    claimed(
        engine
            .claim(ClaimRequest::new(
                "s".repeat(1024),
                key(&"k".repeat(255)),
                fp(1),
            ))
            .unwrap(),
    )
    .complete(response("long"))
    .unwrap();
    assert_eq!(
        replayed(
            engine
                .claim(ClaimRequest::new(
                    "s".repeat(1024),
                    key(&"k".repeat(255)),
                    fp(1)
                ))
                .unwrap()
        ),
        response("long")
    );
}

// ---------------------------------------------------------------------------------------------
// Writer panic (fault-injection feature)

#[cfg(feature = "fault-injection")]
#[test]
fn a_panicked_writer_fails_every_caller_promptly() {
    within(Duration::from_secs(120), || {
        let dir = tempfile::tempdir().unwrap();
        let clock = manual();
        let engine = Engine::open(file_config(&dir.path().join("idem.db"), &clock)).unwrap();
        claimed(engine.claim(req("s", "done", 1)).unwrap())
            .complete(response("done"))
            .unwrap();
        let to_complete = claimed(engine.claim(req("s", "a", 1)).unwrap());
        let to_release = claimed(engine.claim(req("s", "b", 1)).unwrap());
        let mut to_extend = claimed(engine.claim(req("s", "c", 1)).unwrap());
        let to_drop = claimed(engine.claim(req("s", "d", 1)).unwrap());

        // Callers hammering the engine while the writer dies: each gets an answer, and once
        // the writer is gone every claim fails with WriterPanicked.
        let hammers: Vec<_> = (0..8)
            .map(|t| {
                let engine = engine.clone();
                std::thread::spawn(move || {
                    for i in 0u64.. {
                        match engine.claim(req("h", &format!("{t}-{i}"), 1)) {
                            Ok(ClaimOutcome::Claimed(lease)) => {
                                let _ = lease.complete(response("h"));
                            }
                            Ok(_) | Err(Error::Overloaded { .. }) => {}
                            Err(Error::WriterPanicked { message }) => return message,
                            Err(e) => panic!("unexpected {e:?}"),
                        }
                    }
                    unreachable!()
                })
            })
            .collect();

        engine.inject_writer_panic();
        for h in hammers {
            let message = h.join().unwrap();
            assert!(message.contains("injected"), "{message}");
        }

        let is_panicked = |r: &Result<(), Error>| matches!(r, Err(e @ Error::WriterPanicked { .. }) if e.is_closed());
        assert!(matches!(
            engine.claim(req("s", "x", 1)),
            Err(Error::WriterPanicked { .. })
        ));
        // A replay that the read connections could serve is refused too.
        assert!(matches!(
            engine.claim(req("s", "done", 1)),
            Err(Error::WriterPanicked { .. })
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(matches!(
            rt.block_on(engine.claim_async(req("s", "y", 1))),
            Err(Error::WriterPanicked { .. })
        ));
        assert!(is_panicked(&to_complete.complete(response("late"))));
        assert!(is_panicked(&to_release.release()));
        assert!(is_panicked(&to_extend.extend(Duration::from_secs(1))));
        drop(to_drop);
        drop(to_extend);
        assert!(is_panicked(&engine.shutdown()));
        drop(engine);

        // The database is intact: a new engine serves it.
        let engine = Engine::open(file_config(&dir.path().join("idem.db"), &clock)).unwrap();
        assert_eq!(
            replayed(engine.claim(req("s", "done", 1)).unwrap()),
            response("done")
        );
    });
}

#[cfg(feature = "fault-injection")]
#[test]
fn a_writer_panic_wakes_callers_already_waiting() {
    within(Duration::from_secs(120), || {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.db");
        let engine = Engine::open(
            file_config(&path, &manual())
                .queue_capacity(8)
                .busy_timeout(Duration::from_secs(120)),
        )
        .unwrap();
        // Hold the writer in BEGIN IMMEDIATE with claims queued behind it, then queue the
        // panic: every waiting caller must be answered once the writer gets to it.
        let blocker = block_writer(&path);
        let mut first = Box::pin(engine.claim_async(req("s", "first", 1)));
        assert!(poll_once(&mut first).is_pending());
        spin_until("the writer to take the first claim", || {
            engine.queued() == 0
        });
        let waiting: Vec<_> = (0..4)
            .map(|i| {
                let engine = engine.clone();
                std::thread::spawn(move || engine.claim(req("s", &format!("w{i}"), 1)))
            })
            .collect();
        spin_until("the claims to queue", || engine.queued() == 4);
        engine.inject_writer_panic();
        blocker.execute_batch("COMMIT").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // The first claim was in the batch being committed: it may have succeeded.
        match rt.block_on(first) {
            Ok(ClaimOutcome::Claimed(_)) | Err(Error::WriterPanicked { .. }) => {}
            other => panic!("{other:?}"),
        }
        for w in waiting {
            match w.join().unwrap() {
                // Lease commands are taken before claims, so the panic comes first.
                Err(Error::WriterPanicked { .. }) => {}
                other => panic!("expected WriterPanicked, got {other:?}"),
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Replay cache

/// Deletes a record behind the engine's back: the one change the replay cache cannot see.
fn delete_by_hand(path: &Path, key: &str) {
    let conn = Connection::open(path).unwrap();
    conn.execute("DELETE FROM idempotency_records WHERE key = ?1", [key])
        .unwrap();
}

#[test]
fn replays_are_served_from_the_cache_until_the_record_expires() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let clock = manual();
    let engine = Engine::open(file_config(&path, &clock)).unwrap();
    claimed(engine.claim(req("s", "k", 1)).unwrap())
        .complete(response("once"))
        .unwrap();
    // The first replay reads the record from disk and keeps it.
    assert_eq!(
        replayed(engine.claim(req("s", "k", 1)).unwrap()),
        response("once")
    );
    // Proof that later ones come from memory: the row is gone, the replay is not.
    delete_by_hand(&path, "k");
    assert_eq!(row_count(&path), 0);
    assert_eq!(
        replayed(engine.claim(req("s", "k", 1)).unwrap()),
        response("once")
    );
    // Another payload under the same key is still a mismatch.
    assert!(matches!(
        engine.claim(req("s", "k", 2)).unwrap(),
        ClaimOutcome::Mismatch
    ));
    // Expiry is checked on every hit: one millisecond before, a replay; at expiry, the key is
    // free again (retention is 1000 ms in `file_config`).
    clock.advance(Duration::from_millis(999));
    replayed(engine.claim(req("s", "k", 1)).unwrap());
    clock.advance(Duration::from_millis(1));
    claimed(engine.claim(req("s", "k", 1)).unwrap())
        .complete(response("again"))
        .unwrap();
    assert_eq!(
        replayed(engine.claim(req("s", "k", 1)).unwrap()),
        response("again")
    );
}

#[test]
fn with_the_cache_off_every_replay_reads_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let engine = Engine::open(file_config(&path, &manual()).replay_cache_bytes(0)).unwrap();
    claimed(engine.claim(req("s", "k", 1)).unwrap())
        .complete(response("once"))
        .unwrap();
    replayed(engine.claim(req("s", "k", 1)).unwrap());
    delete_by_hand(&path, "k");
    claimed(engine.claim(req("s", "k", 1)).unwrap())
        .release()
        .unwrap();
}

#[test]
fn a_response_too_large_for_the_cache_is_read_from_disk_each_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    // A 64 KiB budget keeps responses of up to 2 KiB.
    let engine = Engine::open(file_config(&path, &manual()).replay_cache_bytes(64 << 10)).unwrap();
    let big = StoredResponse::new(200, vec![b'x'; 4096]);
    claimed(engine.claim(req("s", "big", 1)).unwrap())
        .complete(big.clone())
        .unwrap();
    assert_eq!(replayed(engine.claim(req("s", "big", 1)).unwrap()), big);
    delete_by_hand(&path, "big");
    claimed(engine.claim(req("s", "big", 1)).unwrap())
        .release()
        .unwrap();
}

#[test]
fn after_a_long_run_of_fresh_keys_replays_mismatches_and_in_flight_are_still_right() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let engine = Engine::open(file_config(&path, &manual())).unwrap();
    claimed(engine.claim(req("s", "old", 1)).unwrap())
        .complete(response("old"))
        .unwrap();
    let _held = claimed(engine.claim(req("s", "held", 1)).unwrap());
    // Hundreds of claims that find nothing to replay: the engine stops looking on its read
    // connections first and sends claims to the writer, which must answer them all the same.
    for i in 0..500 {
        claimed(engine.claim(req("s", &format!("fresh{i}"), 1)).unwrap())
            .complete(response("fresh"))
            .unwrap();
    }
    for _ in 0..40 {
        assert_eq!(
            replayed(engine.claim(req("s", "old", 1)).unwrap()),
            response("old")
        );
        assert!(matches!(
            engine.claim(req("s", "old", 2)).unwrap(),
            ClaimOutcome::Mismatch
        ));
        in_flight(engine.claim(req("s", "held", 1)).unwrap());
    }
    assert_eq!(
        replayed(engine.claim(req("s", "fresh7", 1)).unwrap()),
        response("fresh")
    );
}
