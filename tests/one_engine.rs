//! One engine per SQLite file (issue #13, items 2 and 7).
//!
//! Two engines on one file used to both run: each counted fencing tokens from the value it read
//! at open, so after a lock timeout and a takeover by the other one, the *older* lease completed
//! and the newer holder got `LeaseLost`; and each held back its own unflushed completions from
//! replay, but not the other's. And two processes opening a new file at once raced on creating
//! the tables ("table idempotency_records already exists"). Now a second engine, in this
//! process or another, gets `Error::AlreadyOpen` naming the holder, before it touches the file;
//! with `EngineConfig::open_timeout` it waits for the holder to stop instead.
//!
//! Child processes are this test binary, re-executed to run `one_engine_child`.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use idempotency_rs::{
    ClaimOutcome, Clock, Engine, EngineConfig, Error, ManualClock, StoredResponse,
};
use support::{claimed, request};

mod support;

const T0: i64 = 1_700_000_000_000;
const LOCK: Duration = Duration::from_secs(10);

const ENV_MODE: &str = "IDEM_ONE_ENGINE_CHILD";
const ENV_DB: &str = "IDEM_ONE_ENGINE_DB";
const ENV_WAIT_MS: &str = "IDEM_ONE_ENGINE_WAIT_MS";

fn config(path: &Path, clock: &Arc<ManualClock>) -> EngineConfig {
    EngineConfig::new(path)
        .lock_timeout(LOCK)
        .clock(clock.clone())
}

// ---------------------------------------------------------------------------------------------
// The child

/// Run by the tests below in a child process; does nothing in a normal run.
///
/// * `hold`: opens the engine, claims `held` (never completing it), prints `OPENED <fence>`,
///   and keeps the engine until its stdin closes; or prints `REFUSED <pid>` / `ERROR <error>`.
/// * `turn`: opens the engine (waiting for the file as long as `IDEM_ONE_ENGINE_WAIT_MS`
///   says), claims and completes a key of its own, prints `DONE <fence>` and shuts down.
#[test]
#[ignore = "run by the tests of this file in a child process"]
fn one_engine_child() {
    let Ok(mode) = std::env::var(ENV_MODE) else {
        return;
    };
    // The harness has printed "test one_engine_child ... " without a newline.
    println!();
    let db = std::env::var(ENV_DB).unwrap();
    let wait = Duration::from_millis(std::env::var(ENV_WAIT_MS).unwrap().parse().unwrap());
    let clock = Arc::new(ManualClock::new(T0));
    let engine = match Engine::open(config(Path::new(&db), &clock).open_timeout(wait)) {
        Ok(engine) => engine,
        Err(Error::AlreadyOpen { pid, .. }) => {
            println!("REFUSED {}", pid.unwrap_or(0));
            return;
        }
        Err(e) => {
            println!("ERROR {e}");
            return;
        }
    };
    match mode.as_str() {
        "hold" => {
            let lease = claimed(engine.claim(request("held")).unwrap());
            println!("OPENED {}", lease.fencing_token());
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).unwrap_or(0) > 0 {}
            drop(lease);
            engine.shutdown().unwrap();
        }
        "turn" => {
            let key = format!("turn-{}", std::process::id());
            let lease = claimed(engine.claim(request(&key)).unwrap());
            let fence = lease.fencing_token();
            lease
                .complete(StoredResponse::new(201, key.clone()))
                .unwrap();
            println!("DONE {fence}");
            engine.shutdown().unwrap();
        }
        other => panic!("unknown mode {other}"),
    }
}

/// A child process; killed (SIGKILL) when dropped.
struct ChildProc {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl ChildProc {
    fn spawn(mode: &str, db: &Path, wait: Duration) -> ChildProc {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "one_engine_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ENV_MODE, mode)
            .env(ENV_DB, db)
            .env(ENV_WAIT_MS, wait.as_millis().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        ChildProc { child, lines }
    }

    /// The child's first line of ours (`OPENED`, `REFUSED`, `DONE`, `ERROR`).
    fn answer(&mut self) -> String {
        for line in self.lines.by_ref() {
            let line = line.unwrap();
            if ["OPENED", "REFUSED", "DONE", "ERROR"]
                .iter()
                .any(|w| line.starts_with(w))
            {
                return line;
            }
        }
        panic!(
            "the child exited without an answer: {:?}",
            self.child.wait()
        );
    }

    /// Closes the child's stdin (a `hold` child then shuts down) and waits for it to exit.
    fn finish(mut self) {
        drop(self.child.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status:?}");
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn schema(db: &Path) -> (i64, Vec<String>) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let version = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    let mut stmt = conn
        .prepare("SELECT name FROM sqlite_schema WHERE name LIKE 'idempotency%' ORDER BY name")
        .unwrap();
    let names = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    (version, names)
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn a_second_engine_in_the_same_process_is_refused_until_the_first_is_shut_down() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one.db");
    let clock = Arc::new(ManualClock::new(T0));
    let first = Engine::open(config(&db, &clock)).unwrap();
    let lease = claimed(first.claim(request("k")).unwrap());

    match Engine::open(config(&db, &clock)) {
        Err(e @ Error::AlreadyOpen { .. }) => {
            let Error::AlreadyOpen { path, pid } = &e else {
                unreachable!()
            };
            assert_eq!(path, &db);
            assert_eq!(*pid, Some(std::process::id()));
            let text = e.to_string();
            assert!(
                text.contains("already open") && text.contains(&std::process::id().to_string()),
                "{text}"
            );
            assert!(!e.is_transient() && !e.is_closed());
        }
        other => panic!("expected AlreadyOpen, got {other:?}"),
    }
    // The same file under another name (a symbolic link, a `.` in the path) is the same file.
    let link = dir.path().join("link.db");
    std::os::unix::fs::symlink(&db, &link).unwrap();
    for other in [link, dir.path().join(".").join("one.db")] {
        assert!(
            matches!(
                Engine::open(config(&other, &clock)),
                Err(Error::AlreadyOpen { .. })
            ),
            "{other:?}"
        );
    }

    // A shutdown lets go of the file, even while a handle and a lease of the first engine live.
    first.shutdown().unwrap();
    let second = Engine::open(config(&db, &clock)).unwrap();
    assert!(matches!(
        lease.complete(StoredResponse::new(200, "late")),
        Err(Error::Closed)
    ));
    // The lease the first engine granted is still in flight in the file, with its token; the
    // second engine's tokens are larger.
    assert!(matches!(
        second.claim(request("k")).unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    clock.advance(LOCK);
    let taken = claimed(second.claim(request("k")).unwrap());
    assert!(taken.fencing_token() > 1);
    drop(taken);
    drop(first);
    second.shutdown().unwrap();
}

#[test]
fn dropping_the_last_handle_lets_go_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one.db");
    let clock = Arc::new(ManualClock::new(T0));
    for _ in 0..3 {
        let engine = Engine::open(config(&db, &clock)).unwrap();
        claimed(
            engine
                .claim(request(&format!("k{}", clock.now_ms())))
                .unwrap(),
        )
        .complete(StoredResponse::new(200, "x"))
        .unwrap();
        clock.advance(Duration::from_millis(1));
    }
}

/// The holder is another process: the second engine is refused, naming it; once the holder is
/// killed (-9, no shutdown) the file opens at once, and the fencing tokens go on from the dead
/// engine's: its orphaned lease is taken over after its lock timeout with a larger token.
#[test]
fn an_engine_in_another_process_is_refused_until_it_dies() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one.db");
    let mut holder = ChildProc::spawn("hold", &db, Duration::ZERO);
    let answer = holder.answer();
    let child_fence: u64 = answer
        .strip_prefix("OPENED ")
        .unwrap_or_else(|| panic!("{answer}"))
        .parse()
        .unwrap();

    let clock = Arc::new(ManualClock::new(T0));
    match Engine::open(config(&db, &clock)) {
        Err(Error::AlreadyOpen { pid, .. }) => assert_eq!(pid, Some(holder.child.id())),
        other => panic!("expected AlreadyOpen, got {other:?}"),
    }
    // A second child is refused too, and says by whom.
    let mut second = ChildProc::spawn("hold", &db, Duration::ZERO);
    assert_eq!(second.answer(), format!("REFUSED {}", holder.child.id()));
    second.finish();

    holder.child.kill().unwrap();
    holder.child.wait().unwrap();
    let engine = Engine::open(config(&db, &clock)).unwrap();
    assert!(matches!(
        engine.claim(request("held")).unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    clock.advance(LOCK);
    let lease = claimed(engine.claim(request("held")).unwrap());
    assert!(lease.fencing_token() > child_fence);
    drop(lease);
    engine.shutdown().unwrap();
}

/// With a wait, an engine opens as soon as the holder shuts down: a restart that overlaps the
/// old process's shutdown.
#[test]
fn an_engine_waits_for_the_holder_when_told_to() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one.db");
    let mut holder = ChildProc::spawn("hold", &db, Duration::ZERO);
    assert!(holder.answer().starts_with("OPENED"));
    let clock = Arc::new(ManualClock::new(T0));
    let opener = {
        let (db, clock) = (db.clone(), clock.clone());
        std::thread::spawn(move || {
            Engine::open(config(&db, &clock).open_timeout(Duration::from_secs(60)))
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(!opener.is_finished(), "opened while the holder runs");
    holder
        .child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"\n")
        .unwrap();
    holder.finish();
    let engine = opener.join().unwrap().unwrap();
    // The holder released its lease on the way out.
    drop(claimed(engine.claim(request("held")).unwrap()));
}

/// Item 7: four engines opening a database that does not exist yet, at once, five times over:
/// one opens, the others get `AlreadyOpen`; none fails on a half-created schema.
#[test]
fn engines_opening_a_new_file_at_once_get_one_winner_and_clear_refusals() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("new.db");
        let barrier = Arc::new(Barrier::new(4));
        let results: Vec<_> = (0..4)
            .map(|_| {
                let (db, barrier) = (db.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    Engine::open(EngineConfig::new(&db))
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let opened = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(opened, 1, "round {round}: {results:?}");
        for r in &results {
            if let Err(e) = r {
                assert!(
                    matches!(e, Error::AlreadyOpen { .. }),
                    "round {round}: {e:?}"
                );
            }
        }
        drop(results);
        assert_eq!(
            schema(&db),
            (
                3,
                vec![
                    "idempotency_meta".to_string(),
                    "idempotency_records".into(),
                    "idempotency_records_expiry".into(),
                ]
            )
        );
    }
}

/// Item 7 across processes: six processes start on a new file at once. Without a wait, exactly
/// one opens and the others are refused; with one, all of them run in turn on one schema, and
/// their fencing tokens never repeat.
#[test]
fn processes_starting_at_once_on_a_new_file_take_turns_or_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("new.db");
    let mut children: Vec<_> = (0..6)
        .map(|_| ChildProc::spawn("hold", &db, Duration::ZERO))
        .collect();
    let answers: Vec<String> = children.iter_mut().map(ChildProc::answer).collect();
    let opened = answers.iter().filter(|a| a.starts_with("OPENED")).count();
    assert_eq!(opened, 1, "{answers:?}");
    assert!(
        answers
            .iter()
            .all(|a| a.starts_with("OPENED") || a.starts_with("REFUSED")),
        "{answers:?}"
    );
    for c in children {
        c.finish();
    }

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("new.db");
    let mut children: Vec<_> = (0..6)
        .map(|_| ChildProc::spawn("turn", &db, Duration::from_secs(120)))
        .collect();
    let mut fences: Vec<u64> = children
        .iter_mut()
        .map(|c| {
            let a = c.answer();
            a.strip_prefix("DONE ")
                .unwrap_or_else(|| panic!("{a}"))
                .parse()
                .unwrap()
        })
        .collect();
    for c in children {
        c.finish();
    }
    fences.sort_unstable();
    fences.dedup();
    assert_eq!(fences.len(), 6, "a fencing token was handed out twice");
    assert_eq!(schema(&db).0, 3);
    let conn = rusqlite::Connection::open(&db).unwrap();
    let n: i64 = conn
        .query_row(
            "SELECT count(*) FROM idempotency_records WHERE state = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 6);
}
