//! The `idempotency-rs` command-line tool, end to end: the real binary in a process of its own,
//! on real store files (and, with the `postgres` feature, a real PostgreSQL table), beside a
//! running engine and after it has stopped.

#[cfg(feature = "postgres")]
mod pg;

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use idempotency_rs::{
    ClaimOutcome, ClaimRequest, Engine, EngineConfig, Fingerprint, IdempotencyKey, Lease,
    ManualClock, StoredResponse,
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_idempotency-rs");

/// What one run of the tool did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// Exit 2 with exactly one line on stderr, `error: ...`, containing every `part`; nothing
    /// on stdout.
    fn assert_error(&self, parts: &[&str]) {
        assert_eq!(self.code, 2, "{self:?}");
        assert_eq!(self.stdout, "", "{self:?}");
        assert!(self.stderr.starts_with("error: "), "{self:?}");
        assert_eq!(self.stderr.trim_end().lines().count(), 1, "{self:?}");
        for part in parts {
            assert!(self.stderr.contains(part), "{part:?} missing: {self:?}");
        }
    }
}

/// Runs the tool; fails the test if it runs for more than 30 s or dies of a signal.
fn cli<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let start = Instant::now();
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            r.read_to_end(&mut s).unwrap();
            String::from_utf8(s).expect("the tool printed something that is not UTF-8")
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("the tool ran for more than 30 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let took = start.elapsed();
    let run = Run {
        code: status.code().unwrap_or(-1),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        took,
    };
    assert!(
        status.code().is_some(),
        "the tool died of a signal: {run:?}"
    );
    assert!(
        !run.stderr.contains("panicked"),
        "the tool panicked: {run:?}"
    );
    run
}

/// `args` with the store path first.
fn on(db: &Path, args: &[&str]) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = Vec::new();
    let (global, rest): (Vec<&str>, Vec<&str>) = args.iter().partition(|a| **a == "--json");
    v.extend(global.into_iter().map(Into::into));
    let mut rest = rest.into_iter();
    v.push(rest.next().expect("a subcommand").into());
    v.push(db.as_os_str().to_owned());
    v.extend(rest.map(Into::into));
    v
}

fn fingerprint(key: &str) -> Fingerprint {
    Fingerprint::of_request("POST", "/orders", key.as_bytes())
}

fn request(scope: &str, key: &str) -> ClaimRequest {
    ClaimRequest::new(scope, IdempotencyKey::new(key).unwrap(), fingerprint(key))
}

fn claimed(outcome: ClaimOutcome) -> Lease {
    match outcome {
        ClaimOutcome::Claimed(lease) => lease,
        other => panic!("expected Claimed, got {other:?}"),
    }
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Parses `YYYY-MM-DDTHH:MM:SS.mmmZ` (independently of the tool: days from the civil date).
fn parse_rfc3339(s: &str) -> i64 {
    assert_eq!(s.len(), 24, "{s}");
    assert!(s.ends_with('Z') && &s[10..11] == "T", "{s}");
    let n = |a: usize, b: usize| s[a..b].parse::<i64>().unwrap();
    let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
    let (y, m) = if m <= 2 { (y - 1, m + 12) } else { (y, m) };
    // Days since 1970-01-01 (March-based years).
    let days = 365 * y + y / 4 - y / 100 + y / 400 + (153 * (m - 3) + 2) / 5 + d - 719_469;
    days * 86_400_000 + n(11, 13) * 3_600_000 + n(14, 16) * 60_000 + n(17, 19) * 1_000 + n(20, 23)
}

/// Checks the pair `name` (RFC 3339) and `name_ms` of a JSON object agree, and returns the ms.
fn time_of(v: &Value, name: &str) -> i64 {
    let at = v[name].as_str().unwrap_or_else(|| panic!("{name} in {v}"));
    let at_ms = v[format!("{name}_ms")].as_i64().unwrap();
    assert_eq!(parse_rfc3339(at), at_ms, "{name}: {at}");
    at_ms
}

/// The value of a `label   value` line of the human output.
fn field(text: &str, label: &str) -> String {
    text.lines()
        .find_map(|l| {
            l.trim_start()
                .strip_prefix(label)
                .filter(|rest| rest.starts_with("  "))
                .map(|rest| rest.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{text}"))
}

fn user_version(db: &Path) -> i64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Records the writer's leases and tokens, for the assertions.
struct Seeded {
    engine: Engine,
    db: PathBuf,
    tokens: std::collections::HashMap<&'static str, u64>,
    held: Lease,
    _dir: tempfile::TempDir,
}

/// A store with three completed records in `acme` (a JSON answer with a binary header, a
/// binary body, a long text body) and one in flight (`acme`, `order-4`), its engine running.
fn seeded() -> Seeded {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    let engine = Engine::open(EngineConfig::new(&db)).unwrap();
    let mut tokens = std::collections::HashMap::new();
    let responses = [
        (
            "order-1",
            StoredResponse::new(201, r#"{"id":1}"#)
                .with_header("content-type", "application/json")
                .with_header("x-bin", vec![0u8, 255]),
        ),
        (
            "order-2",
            StoredResponse::new(200, vec![0u8, 1, 2, 255, 254]),
        ),
        ("order-3", StoredResponse::new(200, "x".repeat(5000))),
    ];
    for (key, response) in responses {
        let lease = claimed(engine.claim(request("acme", key)).unwrap());
        tokens.insert(key, lease.fencing_token());
        lease.complete(response).unwrap();
    }
    let held = claimed(engine.claim(request("acme", "order-4")).unwrap());
    tokens.insert("order-4", held.fencing_token());
    Seeded {
        engine,
        db,
        tokens,
        held,
        _dir: dir,
    }
}

/// stats, inspect and list beside a running engine: exact counts and fields, in JSON and in
/// text, agreeing with what the engine itself reports.
#[test]
fn reads_beside_a_running_engine() {
    let s = seeded();
    let db = &s.db;

    // stats
    let run = cli(on(db, &["--json", "stats"]));
    assert_eq!((run.code, run.stderr.as_str()), (0, ""), "{run:?}");
    let v = run.json();
    assert_eq!(v["backend"], "sqlite");
    assert_eq!(v["store"], db.to_str().unwrap());
    assert_eq!(v["schema_version"].as_i64().unwrap(), user_version(db));
    assert_eq!(v["in_flight"], 1);
    assert_eq!(v["completed"], 3);
    assert_eq!(v["expired"], 0);
    assert_eq!(v["total"], 4);
    assert_eq!(v["lock_timed_out"], 0);
    let held = s.engine.record("acme", "order-4").unwrap().unwrap();
    assert_eq!(time_of(&v, "oldest_in_flight"), ms(held.created_at));
    let age = v["oldest_in_flight_age_ms"].as_u64().unwrap();
    assert!(age < 60_000, "{v}");
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let pages: i64 = conn
        .pragma_query_value(None, "page_count", |r| r.get(0))
        .unwrap();
    let page_size: i64 = conn
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .unwrap();
    let (pages, page_size) = (pages as u64, page_size as u64);
    drop(conn);
    assert_eq!(v["file_bytes"].as_u64().unwrap(), pages * page_size);
    assert!(
        v["wal_bytes"].as_u64().unwrap() > 0,
        "a running engine has a WAL: {v}"
    );
    assert!(v.get("table_bytes").is_none());

    let run = cli(on(db, &["stats"]));
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(field(&run.stdout, "backend"), "sqlite");
    assert_eq!(field(&run.stdout, "in flight"), "1");
    assert_eq!(field(&run.stdout, "lock timed out"), "0");
    assert_eq!(field(&run.stdout, "completed"), "3");
    assert_eq!(field(&run.stdout, "expired backlog"), "0");
    assert_eq!(field(&run.stdout, "total"), "4");
    assert!(
        field(&run.stdout, "oldest lease").ends_with(" ago)"),
        "{}",
        run.stdout
    );
    assert_eq!(
        field(&run.stdout, "file size"),
        format!(
            "{} bytes ({:.1} KiB)",
            pages * page_size,
            (pages * page_size) as f64 / 1024.0
        )
    );

    // inspect: a completed record with a JSON body and a binary header
    let run = cli(on(
        db,
        &["--json", "inspect", "--scope", "acme", "--key", "order-1"],
    ));
    assert_eq!(run.code, 0, "{run:?}");
    let v = run.json();
    let record = s.engine.record("acme", "order-1").unwrap().unwrap();
    assert_eq!(v["found"], true);
    assert_eq!(v["scope"], "acme");
    assert_eq!(v["key"], "order-1");
    assert_eq!(v["state"], "completed");
    assert_eq!(v["fingerprint"], hex(fingerprint("order-1").as_bytes()));
    assert_eq!(v["fencing_token"], s.tokens["order-1"]);
    assert_eq!(time_of(&v, "created_at"), ms(record.created_at));
    assert_eq!(
        time_of(&v, "completed_at"),
        ms(record.completed_at.unwrap())
    );
    assert_eq!(time_of(&v, "expires_at"), ms(record.expires_at));
    assert_eq!(v["locked_until"], Value::Null);
    assert_eq!(v["lock_timed_out"], false);
    assert_eq!(
        v["response"],
        serde_json::json!({
            "status": 201,
            "headers": [
                {"name": "content-type", "encoding": "utf8", "value": "application/json"},
                {"name": "x-bin", "encoding": "hex", "value": "00ff"},
            ],
            "trailers": null,
            "body": {"length": 8, "encoding": "utf8", "data": "{\"id\":1}"},
        })
    );
    let run = cli(on(db, &["inspect", "--scope", "acme", "--key", "order-1"]));
    assert_eq!(run.code, 0, "{run:?}");
    let text = &run.stdout;
    assert_eq!(field(text, "scope"), "acme");
    assert_eq!(field(text, "key"), "order-1");
    assert_eq!(field(text, "state"), "completed");
    assert_eq!(
        field(text, "fencing token"),
        s.tokens["order-1"].to_string()
    );
    assert_eq!(
        field(text, "fingerprint"),
        hex(fingerprint("order-1").as_bytes())
    );
    assert_eq!(field(text, "status"), "201");
    assert_eq!(field(text, "headers"), "content-type: application/json");
    // The second header under the first, aligned (the labels are 13 wide: "fencing token").
    assert!(
        text.contains(&format!("\n{:15}x-bin: (hex) 00ff\n", "")),
        "{text}"
    );
    assert_eq!(field(text, "body"), "8 bytes of text:");
    assert!(text.ends_with("\n\n{\"id\":1}\n"), "{text}");

    // a binary body: a hex preview
    let run = cli(on(db, &["inspect", "--scope", "acme", "--key", "order-2"]));
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(field(&run.stdout, "body"), "5 bytes, binary (hex):");
    assert!(
        run.stdout.contains("00000000  00 01 02 ff fe "),
        "{}",
        run.stdout
    );
    assert!(run.stdout.trim_end().ends_with("|.....|"), "{}", run.stdout);
    let v = cli(on(
        db,
        &["--json", "inspect", "--scope", "acme", "--key", "order-2"],
    ))
    .json();
    assert_eq!(
        v["response"]["body"],
        serde_json::json!({"length": 5, "encoding": "hex", "data": "000102fffe"})
    );

    // a long text body: cut, with the bytes left out counted; --full prints it all
    let run = cli(on(db, &["inspect", "--scope", "acme", "--key", "order-3"]));
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(field(&run.stdout, "body"), "5000 bytes of text:");
    let longest = run.stdout.lines().map(str::len).max().unwrap();
    assert_eq!(longest, 2048, "{}", run.stdout);
    assert!(
        run.stdout
            .ends_with("... 2952 more bytes not shown (--full prints everything, --json too)\n"),
        "{}",
        run.stdout
    );
    let run = cli(on(
        db,
        &["inspect", "--scope", "acme", "--key", "order-3", "--full"],
    ));
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.ends_with(&format!("\n\n{}\n", "x".repeat(5000))),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("not shown"));
    let v = cli(on(
        db,
        &["--json", "inspect", "--scope", "acme", "--key", "order-3"],
    ))
    .json();
    assert_eq!(v["response"]["body"]["data"], "x".repeat(5000));

    // the record in flight
    let v = cli(on(
        db,
        &["--json", "inspect", "--scope", "acme", "--key", "order-4"],
    ))
    .json();
    assert_eq!(v["state"], "in_flight");
    assert_eq!(v["fencing_token"], s.tokens["order-4"]);
    assert_eq!(time_of(&v, "locked_until"), ms(s.held.locked_until()));
    assert_eq!(time_of(&v, "created_at"), ms(held.created_at));
    assert_eq!(v["completed_at"], Value::Null);
    assert_eq!(v["lock_timed_out"], false);
    assert_eq!(v["response"], Value::Null);
    let run = cli(on(db, &["inspect", "--scope", "acme", "--key", "order-4"]));
    assert_eq!(field(&run.stdout, "state"), "in flight");
    assert_eq!(field(&run.stdout, "response"), "(none: not completed)");

    // no record: exit 1, said plainly
    let run = cli(on(db, &["inspect", "--scope", "acme", "--key", "order-9"]));
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stdout
            .starts_with("no record: scope acme, key order-9 has none in "),
        "{run:?}"
    );
    let run = cli(on(
        db,
        &["--json", "inspect", "--scope", "other", "--key", "order-1"],
    ));
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(
        run.json(),
        serde_json::json!({"found": false, "scope": "other", "key": "order-1"})
    );

    // list
    let run = cli(on(db, &["--json", "list", "--in-flight"]));
    assert_eq!(run.code, 0, "{run:?}");
    let v = run.json();
    let records = v["records"].as_array().unwrap();
    assert_eq!(records.len(), 1, "{v}");
    assert_eq!(records[0]["scope"], "acme");
    assert_eq!(records[0]["key"], "order-4");
    assert_eq!(records[0]["fencing_token"], s.tokens["order-4"]);
    assert_eq!(records[0]["lock_timed_out"], false);
    assert_eq!(time_of(&records[0], "created_at"), ms(held.created_at));
    assert_eq!(
        time_of(&records[0], "locked_until"),
        ms(s.held.locked_until())
    );
    assert_eq!(
        records[0]["age_ms"].as_u64().unwrap(),
        (time_of(&v, "now") - ms(held.created_at)) as u64
    );
    assert_eq!(
        (v["more"].clone(), v["limit"].clone()),
        (false.into(), 100.into())
    );
    let run = cli(on(db, &["list", "--in-flight"]));
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", run.stdout);
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["SCOPE", "KEY", "FENCE", "AGE", "TIMED", "OUT", "LOCK"]
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        row[..3],
        ["acme", "order-4", &s.tokens["order-4"].to_string()[..]]
    );
    assert_eq!(row[4], "no", "{}", run.stdout);
    assert_eq!(lines[2], "1 in-flight record, oldest first");
    let run = cli(on(
        db,
        &["--json", "list", "--in-flight", "--older-than", "1h"],
    ));
    assert_eq!(run.json()["records"], serde_json::json!([]));
    assert_eq!(run.json()["older_than_ms"], 3_600_000);
    let run = cli(on(db, &["list", "--in-flight", "--older-than", "1h"]));
    assert_eq!(
        run.stdout,
        "no in-flight records granted at least 1h 00m ago\n"
    );

    // --limit: the oldest first, and a word that more exist
    let second = claimed(s.engine.claim(request("acme", "order-5")).unwrap());
    let v = cli(on(db, &["--json", "list", "--in-flight", "--limit", "1"])).json();
    assert_eq!(v["records"].as_array().unwrap().len(), 1);
    assert_eq!(v["records"][0]["key"], "order-4");
    assert_eq!(v["more"], true);
    let v = cli(on(db, &["--json", "list", "--in-flight", "--limit", "2"])).json();
    let keys: Vec<&str> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["order-4", "order-5"]);
    assert_eq!(v["more"], false);
    drop(second);
}

/// While a thread claims and completes fresh keys without pause, the tool's reads finish
/// quickly, never see a record half written or figures that do not add up, and the writer
/// keeps completing claims.
#[test]
fn reads_neither_wait_for_nor_stall_a_busy_writer() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    let engine = Engine::open(EngineConfig::new(&db)).unwrap();
    let _held = claimed(engine.claim(request("load", "held")).unwrap());
    let body_of = |key: &str| key.repeat(4000 / key.len() + 1).into_bytes();

    let stop = Arc::new(AtomicBool::new(false));
    let claimed_n = Arc::new(AtomicU64::new(0));
    let completed_n = Arc::new(AtomicU64::new(0));
    let current = Arc::new(Mutex::new(String::new()));
    let gaps = Arc::new(Mutex::new(Vec::<(Instant, Duration)>::new()));
    let writer = {
        let (engine, stop, claimed_n, completed_n, current, gaps) = (
            engine.clone(),
            stop.clone(),
            claimed_n.clone(),
            completed_n.clone(),
            current.clone(),
            gaps.clone(),
        );
        std::thread::spawn(move || {
            let mut last = Instant::now();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let key = format!("w-{i}");
                i += 1;
                let lease = claimed(engine.claim(request("load", &key)).unwrap());
                claimed_n.fetch_add(1, Ordering::SeqCst);
                *current.lock().unwrap() = key.clone();
                // Every tenth lease runs a while, so that the tool sees both states.
                if i.is_multiple_of(10) {
                    std::thread::sleep(Duration::from_millis(30));
                }
                lease
                    .complete(
                        StoredResponse::new(201, body_of(&key)).with_header("x-key", key.clone()),
                    )
                    .unwrap();
                completed_n.fetch_add(1, Ordering::SeqCst);
                let now = Instant::now();
                gaps.lock().unwrap().push((now, now - last));
                last = now;
            }
        })
    };
    while completed_n.load(Ordering::SeqCst) < 20 {
        std::thread::sleep(Duration::from_millis(5));
    }

    let started = Instant::now();
    let completed_at_start = completed_n.load(Ordering::SeqCst);
    let mut reads = 0;
    let (mut saw_in_flight, mut saw_completed) = (0, 0);
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(3) {
        // stats: the figures of one snapshot add up
        let (c0, k0) = (
            completed_n.load(Ordering::SeqCst),
            claimed_n.load(Ordering::SeqCst),
        );
        let run = cli(on(&db, &["--json", "stats"]));
        let (c1, k1) = (
            completed_n.load(Ordering::SeqCst),
            claimed_n.load(Ordering::SeqCst),
        );
        assert_eq!(run.code, 0, "{run:?}");
        assert!(
            run.took < Duration::from_secs(2),
            "stats took {:?}",
            run.took
        );
        slowest = slowest.max(run.took);
        let v = run.json();
        let (in_flight, completed) = (
            v["in_flight"].as_u64().unwrap(),
            v["completed"].as_u64().unwrap(),
        );
        // A completion is committed before it is acknowledged: at most one more is visible.
        assert!((c0..=c1 + 1).contains(&completed), "{c0}..={c1}: {v}");
        // `held`, and the writer's current lease between its claim and its completion.
        assert!((1..=2).contains(&in_flight), "{v}");
        assert!(
            (k0 + 1..=k1 + 2).contains(&(completed + in_flight)),
            "{k0} {k1}: {v}"
        );
        assert_eq!(v["total"].as_u64().unwrap(), in_flight + completed);
        assert_eq!(
            (v["expired"].as_u64(), v["lock_timed_out"].as_u64()),
            (Some(0), Some(0))
        );

        // inspect the key the writer is working on: in flight without a response, or
        // completed with all of it
        let key = current.lock().unwrap().clone();
        let run = cli(on(
            &db,
            &["--json", "inspect", "--scope", "load", "--key", &key],
        ));
        assert_eq!(run.code, 0, "{run:?}");
        assert!(
            run.took < Duration::from_secs(2),
            "inspect took {:?}",
            run.took
        );
        slowest = slowest.max(run.took);
        let v = run.json();
        match v["state"].as_str().unwrap() {
            "in_flight" => {
                saw_in_flight += 1;
                assert_eq!(v["response"], Value::Null, "{v}");
                assert_eq!(v["completed_at"], Value::Null, "{v}");
            }
            "completed" => {
                saw_completed += 1;
                let body = String::from_utf8(body_of(&key)).unwrap();
                assert_eq!(v["response"]["status"], 201);
                assert_eq!(v["response"]["body"]["length"], body.len());
                assert_eq!(v["response"]["body"]["data"], body);
                assert_eq!(
                    v["response"]["headers"],
                    serde_json::json!([{"name": "x-key", "encoding": "utf8", "value": key}])
                );
                time_of(&v, "completed_at");
            }
            other => panic!("state {other}: {v}"),
        }

        // list: `held` always, oldest first
        let run = cli(on(&db, &["--json", "list", "--in-flight"]));
        assert_eq!(run.code, 0, "{run:?}");
        assert!(
            run.took < Duration::from_secs(2),
            "list took {:?}",
            run.took
        );
        slowest = slowest.max(run.took);
        let v = run.json();
        let records = v["records"].as_array().unwrap();
        assert!((1..=2).contains(&records.len()), "{v}");
        assert_eq!(records[0]["key"], "held");
        reads += 3;
    }
    let during = completed_n.load(Ordering::SeqCst) - completed_at_start;
    let window = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();

    assert!(reads >= 15, "only {reads} reads in {window:?}");
    assert!(
        saw_in_flight > 0 && saw_completed > 0,
        "in flight {saw_in_flight} times, completed {saw_completed} times"
    );
    // The writer kept going: many completions, and never a long pause between two.
    assert!(
        during >= 100,
        "{during} completions in {window:?} while the tool read"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "the slowest read took {slowest:?}"
    );
    let longest = gaps
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, _)| *at > started)
        .map(|(_, gap)| *gap)
        .max()
        .unwrap();
    assert!(
        longest < Duration::from_millis(500),
        "the writer paused {longest:?}"
    );
    eprintln!(
        "{reads} reads in {window:?}, the slowest {slowest:?}; {during} completions meanwhile, \
         longest gap {longest:?}; the inspected key in flight {saw_in_flight} times, completed \
         {saw_completed} times"
    );
}

/// release, forget and purge on an SQLite store a running engine holds: refused within the
/// wait, with a message naming the process and the way out; nothing changed.
#[test]
fn changes_are_refused_while_an_engine_holds_the_store() {
    let s = seeded();
    let db = &s.db;
    let pid = std::process::id();
    let fence = s.tokens["order-4"].to_string();

    let run = cli(on(
        db,
        &[
            "release", "--scope", "acme", "--key", "order-4", "--fence", &fence, "--wait", "1s",
        ],
    ));
    run.assert_error(&[
        "error: cannot release the key: ",
        &format!("is held by a running idempotency engine (process {pid})"),
        "an SQLite store serves one engine at a time",
        "(waited 1.0s)",
        &format!("stop that process (pid {pid})"),
        "Engine::force_release, Engine::forget or Engine::purge_expired",
    ]);
    assert!(run.took >= Duration::from_secs(1), "{:?}", run.took);
    assert!(run.took < Duration::from_secs(4), "{:?}", run.took);

    // The default wait is 2 s.
    let run = cli(on(
        db,
        &["--json", "forget", "--scope", "acme", "--key", "order-1"],
    ));
    run.assert_error(&[
        "error: cannot forget the record: ",
        &format!("(process {pid})"),
    ]);
    assert!(run.took >= Duration::from_secs(2), "{:?}", run.took);
    assert!(run.took < Duration::from_secs(5), "{:?}", run.took);

    let run = cli(on(db, &["purge", "--expired", "--wait", "0s"]));
    run.assert_error(&[
        "error: cannot purge the expired records: ",
        &format!("(pid {pid})"),
    ]);
    assert!(run.took < Duration::from_secs(2), "{:?}", run.took);

    // Nothing changed, and the engine serves on.
    let r = s.engine.record("acme", "order-4").unwrap().unwrap();
    assert_eq!(r.fencing_token, s.tokens["order-4"]);
    assert!(matches!(
        s.engine.claim(request("acme", "order-4")).unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    assert!(matches!(
        s.engine.claim(request("acme", "order-1")).unwrap(),
        ClaimOutcome::Replay(_)
    ));
    let v = cli(on(db, &["--json", "stats"])).json();
    assert_eq!(
        (v["in_flight"].clone(), v["completed"].clone()),
        (1.into(), 3.into())
    );
}

/// Stops the engine of a seeded store, its lease still unreleased (as after a crash).
fn stopped(
    s: Seeded,
) -> (
    PathBuf,
    std::collections::HashMap<&'static str, u64>,
    tempfile::TempDir,
) {
    s.engine.shutdown().unwrap();
    drop(s.held);
    drop(s.engine);
    (s.db, s.tokens, s._dir)
}

/// `release --fence`: a wrong token changes nothing (FenceMoved, exit 1); the right one frees
/// the key, and the next claim runs.
#[test]
fn release_frees_a_stuck_key_only_under_its_fencing_token() {
    let (db, tokens, _dir) = stopped(seeded());
    let db = &db;
    let token = tokens["order-4"];
    let wrong = (token + 1).to_string();

    let run = cli(on(
        db,
        &[
            "--json", "release", "--scope", "acme", "--key", "order-4", "--fence", &wrong,
        ],
    ));
    assert_eq!((run.code, run.stderr.as_str()), (1, ""), "{run:?}");
    let v = run.json();
    assert_eq!(v["outcome"], "fence_moved");
    assert_eq!(v["changed"], false);
    assert_eq!(v["current_fencing_token"], token);
    assert_eq!(v["fencing_token"], token + 1);
    // An older token: that lease has ended. A newer one: never this record's.
    let older = (token - 1).to_string();
    let run = cli(on(
        db,
        &[
            "release", "--scope", "acme", "--key", "order-4", "--fence", &older,
        ],
    ));
    assert_eq!(run.code, 1);
    assert_eq!(
        run.stdout,
        format!(
            "nothing changed: scope acme, key order-4: the record's fencing token is {token}, not the one given: the record is held under another lease, and nothing was changed\n"
        )
    );
    let run = cli(on(
        db,
        &[
            "release", "--scope", "acme", "--key", "order-4", "--fence", &wrong,
        ],
    ));
    assert_eq!(run.code, 1);
    assert_eq!(
        run.stdout,
        format!(
            "nothing changed: scope acme, key order-4: the record is in flight under fencing token {token}; {wrong} is newer, so it was never this record's token (check the number with `inspect`)\n"
        )
    );
    let v = cli(on(
        db,
        &["--json", "inspect", "--scope", "acme", "--key", "order-4"],
    ))
    .json();
    assert_eq!(
        (v["state"].clone(), v["fencing_token"].clone()),
        ("in_flight".into(), token.into())
    );

    // Not in flight: completed, or no record at all.
    let v = cli(on(
        db,
        &[
            "--json", "release", "--scope", "acme", "--key", "order-1", "--fence", "1",
        ],
    ));
    assert_eq!(v.code, 1);
    assert_eq!(v.json()["outcome"], "completed");
    let v = cli(on(
        db,
        &[
            "--json", "release", "--scope", "acme", "--key", "nope", "--fence", "1",
        ],
    ));
    assert_eq!(v.code, 1);
    assert_eq!(v.json()["outcome"], "not_found");

    // The right token.
    let run = cli(on(
        db,
        &[
            "release",
            "--scope",
            "acme",
            "--key",
            "order-4",
            "--fence",
            &token.to_string(),
        ],
    ));
    assert_eq!((run.code, run.stderr.as_str()), (0, ""), "{run:?}");
    assert_eq!(
        run.stdout,
        format!(
            "released: scope acme, key order-4 (fencing token {token}) is free; the next claim runs the operation again\n"
        )
    );
    assert_eq!(
        cli(on(db, &["inspect", "--scope", "acme", "--key", "order-4"])).code,
        1
    );
    let v = cli(on(db, &["--json", "stats"])).json();
    assert_eq!(
        (v["in_flight"].clone(), v["completed"].clone()),
        (0.into(), 3.into())
    );
    // The engines are gone: the WAL is empty (the tool's read connections leave an empty one).
    assert_eq!(v["wal_bytes"], 0);

    let engine = Engine::open(EngineConfig::new(db)).unwrap();
    let lease = claimed(engine.claim(request("acme", "order-4")).unwrap());
    assert!(lease.fencing_token() > token);
    assert!(matches!(
        engine.claim(request("acme", "order-1")).unwrap(),
        ClaimOutcome::Replay(_)
    ));
}

/// `forget`: a completed record goes (its key runs again); an in-flight one is refused.
#[test]
fn forget_deletes_a_completed_record_and_refuses_one_in_flight() {
    let (db, tokens, _dir) = stopped(seeded());
    let db = &db;

    let run = cli(on(
        db,
        &["--json", "forget", "--scope", "acme", "--key", "order-1"],
    ));
    assert_eq!((run.code, run.stderr.as_str()), (0, ""), "{run:?}");
    assert_eq!(
        run.json(),
        serde_json::json!({"scope": "acme", "key": "order-1", "outcome": "done", "changed": true, "message": "done"})
    );
    let run = cli(on(db, &["forget", "--scope", "acme", "--key", "order-1"]));
    assert_eq!(run.code, 1);
    assert_eq!(
        run.stdout,
        "nothing changed: scope acme, key order-1: no live record has that scope and key\n"
    );

    let run = cli(on(
        db,
        &["--json", "forget", "--scope", "acme", "--key", "order-4"],
    ));
    assert_eq!(run.code, 1, "{run:?}");
    let v = run.json();
    assert_eq!(v["outcome"], "in_flight");
    assert_eq!(v["current_fencing_token"], tokens["order-4"]);
    let v = cli(on(
        db,
        &["--json", "inspect", "--scope", "acme", "--key", "order-4"],
    ))
    .json();
    assert_eq!(v["state"], "in_flight");

    let v = cli(on(db, &["--json", "stats"])).json();
    assert_eq!(
        (v["in_flight"].clone(), v["completed"].clone()),
        (1.into(), 2.into())
    );
    let engine = Engine::open(EngineConfig::new(db)).unwrap();
    let again = claimed(engine.claim(request("acme", "order-1")).unwrap());
    assert!(again.fencing_token() > tokens["order-4"]);
    assert!(matches!(
        engine.claim(request("acme", "order-2")).unwrap(),
        ClaimOutcome::Replay(_)
    ));
}

/// `purge --expired` deletes exactly the records past their expiry. The engine's clock is two
/// hours behind, so records it keeps for one hour expired an hour ago in real time (the
/// tool's clock), and a lease of 30 s has timed out.
#[test]
fn purge_deletes_exactly_the_expired_records() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.db");
    let two_hours_ago = ms(SystemTime::now()) - 2 * 3_600_000;
    let clock = Arc::new(ManualClock::new(two_hours_ago));
    let engine = Engine::open(
        EngineConfig::new(&db)
            .clock(clock)
            .cleanup(Duration::from_secs(3600), 1000),
    )
    .unwrap();
    let hour = Duration::from_secs(3600);
    for key in ["old-1", "old-2", "old-3"] {
        claimed(engine.claim(request("p", key).retention(hour)).unwrap())
            .complete(StoredResponse::new(200, "old"))
            .unwrap();
    }
    // An abandoned lease whose record expired too.
    let gone = claimed(
        engine
            .claim(
                request("p", "old-lease")
                    .retention(hour)
                    .lock_timeout(Duration::from_secs(1)),
            )
            .unwrap(),
    );
    for key in ["new-1", "new-2"] {
        claimed(engine.claim(request("p", key)).unwrap())
            .complete(StoredResponse::new(200, "new"))
            .unwrap();
    }
    // Its lock (30 s) timed out long ago; its record (24 h) lives on.
    let stale = claimed(engine.claim(request("p", "stale")).unwrap());
    let stale_token = stale.fencing_token();
    engine.shutdown().unwrap();
    drop((gone, stale, engine));

    let v = cli(on(&db, &["--json", "stats"])).json();
    assert_eq!(
        (
            &v["in_flight"],
            &v["completed"],
            &v["expired"],
            &v["lock_timed_out"],
            &v["total"]
        ),
        (&1.into(), &2.into(), &4.into(), &1.into(), &7.into()),
        "{v}"
    );
    let v = cli(on(
        &db,
        &["--json", "inspect", "--scope", "p", "--key", "old-1"],
    ))
    .json();
    assert_eq!(v["state"], "expired");
    assert!(time_of(&v, "expires_at") < ms(SystemTime::now()) - 3_500_000);
    let v = cli(on(&db, &["--json", "list", "--in-flight"])).json();
    let records = v["records"].as_array().unwrap();
    assert_eq!(records.len(), 1, "{v}");
    assert_eq!(records[0]["key"], "stale");
    assert_eq!(records[0]["fencing_token"], stale_token);
    assert_eq!(records[0]["lock_timed_out"], true);
    let run = cli(on(&db, &["list", "--in-flight", "--older-than", "1h59m"]));
    let row: Vec<&str> = run
        .stdout
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        (row[1], row[5], row[6], row[7]),
        ("stale", "yes", "timed", "out"),
        "{}",
        run.stdout
    );
    let v = cli(on(
        &db,
        &["--json", "list", "--in-flight", "--older-than", "2h1m"],
    ))
    .json();
    assert_eq!(v["records"], serde_json::json!([]));

    // Without --expired, purge deletes nothing.
    cli(on(&db, &["purge"])).assert_error(&["purge needs --expired"]);
    assert_eq!(cli(on(&db, &["--json", "stats"])).json()["expired"], 4);
    let run = cli(on(&db, &["--json", "purge", "--expired"]));
    assert_eq!((run.code, run.stderr.as_str()), (0, ""), "{run:?}");
    assert_eq!(run.json(), serde_json::json!({"purged": 4}));
    let run = cli(on(&db, &["purge", "--expired"]));
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "purged 0 expired records\n")
    );

    let v = cli(on(&db, &["--json", "stats"])).json();
    assert_eq!(
        (&v["in_flight"], &v["completed"], &v["expired"], &v["total"]),
        (&1.into(), &2.into(), &0.into(), &3.into()),
        "{v}"
    );
    for key in ["old-1", "old-2", "old-3", "old-lease"] {
        assert_eq!(
            cli(on(&db, &["inspect", "--scope", "p", "--key", key])).code,
            1,
            "{key}"
        );
    }
    for key in ["new-1", "new-2", "stale"] {
        assert_eq!(
            cli(on(&db, &["inspect", "--scope", "p", "--key", key])).code,
            0,
            "{key}"
        );
    }
}

/// Stores that are not there, not SQLite, not ours or too new: exit 2 with one clear line,
/// and nothing created or changed.
#[test]
fn bad_stores_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // A missing file, for a read and for a change: not created.
    let missing = d.join("missing.db");
    cli(on(&missing, &["stats"])).assert_error(&[&format!(
        "error: cannot open the store {}: it does not exist (this tool never creates a store",
        missing.display()
    )]);
    cli(on(&missing, &["purge", "--expired"])).assert_error(&["it does not exist"]);
    cli(on(
        &missing,
        &["release", "--scope", "s", "--key", "k", "--fence", "1"],
    ))
    .assert_error(&["it does not exist"]);
    let url = format!("sqlite:{}", missing.display());
    cli(["stats", &url]).assert_error(&["it does not exist"]);
    assert_eq!(names_in(d), Vec::<String>::new());
    cli(on(&d.join("no-dir/store.db"), &["stats"])).assert_error(&["it does not exist"]);
    assert_eq!(names_in(d), Vec::<String>::new());

    // A directory.
    cli(on(d, &["stats"])).assert_error(&["it is a directory, not an SQLite file"]);
    cli(on(d, &["forget", "--scope", "s", "--key", "k"]))
        .assert_error(&["it is a directory, not an SQLite file"]);

    // A text file, an empty file.
    let text = d.join("notes.txt");
    std::fs::write(&text, "hello, this is not a database\n".repeat(100)).unwrap();
    cli(on(&text, &["stats"])).assert_error(&[&format!(
        "{} is not an SQLite database, so not an idempotency-rs store",
        text.display()
    )]);
    cli(on(&text, &["purge", "--expired"])).assert_error(&["is not an SQLite database"]);
    assert_eq!(
        std::fs::read_to_string(&text).unwrap(),
        "hello, this is not a database\n".repeat(100)
    );
    let empty = d.join("empty.db");
    std::fs::write(&empty, "").unwrap();
    cli(on(&empty, &["stats"])).assert_error(&["not an idempotency-rs store"]);
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);

    // An SQLite database of something else.
    let other = d.join("other.db");
    {
        let conn = rusqlite::Connection::open(&other).unwrap();
        conn.execute_batch("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO users VALUES (1, 'a');")
            .unwrap();
    }
    cli(on(&other, &["stats"])).assert_error(&[
        "error: cannot open the store: ",
        "is an SQLite database but not an idempotency-rs store",
    ]);
    cli(on(&other, &["purge", "--expired"])).assert_error(&["not an idempotency-rs store"]);
    let conn = rusqlite::Connection::open(&other).unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(tables, ["users"]);
    drop(conn);

    // A store of a newer version.
    let newer = d.join("newer.db");
    Engine::open(EngineConfig::new(&newer))
        .unwrap()
        .shutdown()
        .unwrap();
    let supported = user_version(&newer);
    rusqlite::Connection::open(&newer)
        .unwrap()
        .pragma_update(None, "user_version", supported + 1)
        .unwrap();
    for args in [&["stats"][..], &["check"], &["purge", "--expired"]] {
        cli(on(&newer, args)).assert_error(&[&format!(
            "has schema version {}, newer than this tool understands ({supported}): it was written by a newer idempotency-rs",
            supported + 1
        )]);
    }
    assert_eq!(user_version(&newer), supported + 1);

    // Not a store URL at all.
    cli(["stats", "http://example.com/store"]).assert_error(&["is not an SQLite URL"]);
    cli(["stats", ""]).assert_error(&["the store is empty"]);
    cli(["stats", "sqlite::memory:"])
        .assert_error(&["in-memory store cannot be opened from outside"]);
    #[cfg(not(feature = "postgres"))]
    cli(["stats", "postgres://postgres@127.0.0.1:5432/test"]).assert_error(&[
        "built without PostgreSQL support",
        "--features cli,postgres",
    ]);
}

/// Malformed arguments: exit 2, a clear message, the store untouched.
#[test]
fn bad_arguments_are_refused_clearly() {
    let (db, tokens, _dir) = stopped(seeded());
    let db = &db;
    let fence = tokens["order-4"].to_string();

    cli(on(db, &["inspect", "--scope", "acme", "--key", "order\n1"])).assert_error(&[
        "error: --key \"order\\n1\": invalid idempotency key: the key holds a byte outside printable ASCII",
    ]);
    cli(on(
        db,
        &[
            "release", "--scope", "acme", "--key", " order-4", "--fence", &fence,
        ],
    ))
    .assert_error(&["invalid idempotency key: the key starts or ends with a space"]);
    cli(on(db, &["forget", "--scope", "acme", "--key", ""]))
        .assert_error(&["invalid idempotency key: the key is empty"]);
    cli(on(
        db,
        &["inspect", "--scope", &"s".repeat(1025), "--key", "k"],
    ))
    .assert_error(&["invalid scope: the scope is longer than 1024 bytes"]);

    for (value, says) in [
        ("garbage", "`garbage` is not a duration"),
        ("5", "`5` has no unit"),
        ("1.5s", "whole numbers only"),
        ("5y", "unknown unit `y`"),
        ("-5s", "is not a duration"),
        ("999999999d", "too long"),
    ] {
        let run = cli(on(db, &["list", "--in-flight", "--older-than", value]));
        run.assert_error(&[says]);
        assert!(
            run.stderr.starts_with(&format!(
                "error: invalid value '{value}' for '--older-than <DURATION>': "
            )),
            "{run:?}"
        );
        assert!(run.stderr.contains(says), "{run:?}");
    }
    cli(on(db, &["purge", "--expired", "--wait", "2h"])).assert_error(&[
        "invalid value '2h' for '--wait <DURATION>': `2h` is too long: wait at most 1h",
    ]);

    cli(on(db, &["purge"]))
        .assert_error(&["purge needs --expired: it deletes expired records and nothing else"]);
    cli(on(db, &["list"])).assert_error(&["list needs --in-flight"]);
    for (args, says) in [
        (
            &[
                "release", "--scope", "acme", "--key", "order-4", "--fence", "abc",
            ][..],
            "error: invalid value 'abc' for '--fence <N>': invalid digit found in string (try --help)",
        ),
        (
            &[
                "release", "--scope", "acme", "--key", "order-4", "--fence", "-1",
            ],
            "error: invalid value '-1' for '--fence <N>': invalid digit found in string (try --help)",
        ),
        (
            &["release", "--scope", "acme", "--key", "order-4"],
            "error: the following required arguments were not provided: --fence <N> (try --help)",
        ),
        (
            &["list", "--in-flight", "--limit", "0"],
            "error: invalid value '0' for '--limit <N>': 0 is not in 1..=4294967295 (try --help)",
        ),
        (
            &["inspect", "--key", "order-1"],
            "error: the following required arguments were not provided: --scope <SCOPE> (try --help)",
        ),
        (
            &["stats", "--bogus"],
            "error: unexpected argument '--bogus' found; tip: to pass '--bogus' as a value, use '-- --bogus' (try --help)",
        ),
    ] {
        let run = cli(on(db, args));
        run.assert_error(&[]);
        assert_eq!(run.stderr, format!("{says}\n"), "{args:?}");
    }
    cli(["frobnicate"]).assert_error(&["error: unrecognized subcommand 'frobnicate'"]);
    cli(std::iter::empty::<&str>()).assert_error(&[
        "error: name a command: stats, inspect, list, release, forget, purge or check (try --help)",
    ]);
    cli(["stats"]).assert_error(&["not provided: <STORE>"]);
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let run = cli([
            OsStr::new("inspect"),
            db.as_os_str(),
            OsStr::new("--scope"),
            OsStr::from_bytes(b"\xff"),
            OsStr::new("--key"),
            OsStr::new("k"),
        ]);
        run.assert_error(&["invalid UTF-8 was detected in one or more arguments"]);
        // A path that is not UTF-8 is still a path.
        let run = cli([
            OsStr::new("stats"),
            OsStr::from_bytes(b"/nonexistent/\xff.db"),
        ]);
        run.assert_error(&["it does not exist"]);
    }
    #[cfg(feature = "postgres")]
    cli(on(db, &["stats", "--table", "t"])).assert_error(&[
        "--table applies to PostgreSQL stores only",
        "is an SQLite store",
    ]);

    // Nothing above changed the store.
    let v = cli(on(db, &["--json", "stats"])).json();
    assert_eq!((&v["in_flight"], &v["completed"]), (&1.into(), &3.into()));
    let v = cli(on(
        db,
        &["--json", "inspect", "--scope", "acme", "--key", "order-4"],
    ))
    .json();
    assert_eq!(v["fencing_token"], tokens["order-4"]);

    // --help documents every subcommand, with examples.
    let run = cli(["--help"]);
    assert_eq!((run.code, run.stderr.as_str()), (0, ""));
    for sub in [
        "stats", "inspect", "list", "release", "forget", "purge", "check",
    ] {
        assert!(
            run.stdout.contains(&format!("\n  {sub} ")),
            "{sub}: {}",
            run.stdout
        );
        assert!(
            run.stdout.contains(&format!("idempotency-rs {sub} "))
                || run.stdout.contains(&format!("--json {sub} ")),
            "{sub}"
        );
        let run = cli([sub, "--help"]);
        assert_eq!(run.code, 0, "{sub}: {run:?}");
        assert!(run.stdout.contains("Examples:"), "{sub}: {}", run.stdout);
        assert!(
            run.stdout.contains(&format!(" {sub} ")),
            "{sub}: {}",
            run.stdout
        );
        assert!(run.stdout.contains("<STORE>"), "{sub}: {}", run.stdout);
    }
    assert!(run.stdout.contains("Exit status:"));
}

/// `check`: a healthy store passes (exit 0); a row with a broken fingerprint is named (exit
/// 1), and the other commands keep working around it.
#[test]
fn check_names_a_corrupt_row() {
    let (db, _tokens, _dir) = stopped(seeded());
    let db = &db;
    let run = cli(on(db, &["check"]));
    assert_eq!((run.code, run.stderr.as_str()), (0, ""), "{run:?}");
    assert_eq!(
        run.stdout,
        format!("ok: {} passed every check\n", db.display())
    );
    assert_eq!(
        cli(on(db, &["--json", "check"])).json(),
        serde_json::json!({"ok": true, "problems": []})
    );

    let seq: i64 = {
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.execute(
            "UPDATE idempotency_records SET fingerprint = x'00' WHERE key = 'order-2'",
            [],
        )
        .unwrap();
        conn.query_row(
            "SELECT seq FROM idempotency_records WHERE key = 'order-2'",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    let problem = format!(
        "row {seq}: corrupt idempotency record: record (\"acme\", \"order-2\"): fingerprint of 1 bytes"
    );
    let run = cli(on(db, &["check"]));
    assert_eq!((run.code, run.stderr.as_str()), (1, ""), "{run:?}");
    assert_eq!(
        run.stdout,
        format!("1 problem in {}:\n  {problem}\n", db.display())
    );
    let run = cli(on(db, &["--json", "check"]));
    assert_eq!(run.code, 1);
    assert_eq!(
        run.json(),
        serde_json::json!({"ok": false, "problems": [problem]})
    );

    // The broken record is an error (exit 2) that points at `check`; the others read fine.
    cli(on(db, &["inspect", "--scope", "acme", "--key", "order-2"])).assert_error(&[
        "a record does not decode",
        "fingerprint of 1 bytes",
        "run `idempotency-rs check`",
    ]);
    assert_eq!(
        cli(on(db, &["inspect", "--scope", "acme", "--key", "order-1"])).code,
        0
    );
    let v = cli(on(db, &["--json", "stats"])).json();
    assert_eq!((&v["in_flight"], &v["completed"]), (&1.into(), &3.into()));
    assert_eq!(cli(on(db, &["list", "--in-flight"])).code, 0);
}

/// A PostgreSQL store (a table of its own): the reads, and a release beside the running
/// engine (PostgreSQL serves several).
#[cfg(feature = "postgres")]
#[test]
fn postgres_store_reads_and_release() {
    let table = pg::fresh_table();
    let url = pg::url();
    let engine = Engine::open(EngineConfig::postgres(url.clone()).table(table.clone())).unwrap();
    let done = claimed(engine.claim(request("acme", "paid")).unwrap());
    let done_token = done.fencing_token();
    done.complete(StoredResponse::new(201, "receipt").with_header("x-order", "7"))
        .unwrap();
    let held = claimed(engine.claim(request("acme", "stuck")).unwrap());
    let token = held.fencing_token();
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        let mut it = extra.iter();
        let first = it.next().unwrap();
        if *first == "--json" {
            v.push("--json".into());
            v.push((*it.next().unwrap()).into());
        } else {
            v.push((*first).into());
        }
        v.push(url.clone());
        v.push("--table".into());
        v.push(table.clone());
        v.extend(it.map(|s| (*s).to_owned()));
        v
    };

    let run = cli(args(&["--json", "stats"]));
    assert_eq!((run.code, run.stderr.as_str()), (0, ""), "{run:?}");
    let v = run.json();
    assert_eq!(v["backend"], "postgres");
    assert_eq!(
        (&v["in_flight"], &v["completed"], &v["expired"], &v["total"]),
        (&1.into(), &1.into(), &0.into(), &2.into())
    );
    assert!(v["table_bytes"].as_u64().unwrap() > 0, "{v}");
    assert!(v.get("file_bytes").is_none() && v.get("wal_bytes").is_none());
    let run = cli(args(&["stats"]));
    assert_eq!(field(&run.stdout, "backend"), "postgres");
    assert!(
        field(&run.stdout, "table size").ends_with(")"),
        "{}",
        run.stdout
    );

    let v = cli(args(&[
        "--json", "inspect", "--scope", "acme", "--key", "paid",
    ]))
    .json();
    assert_eq!(v["state"], "completed");
    assert_eq!(v["fencing_token"], done_token);
    assert_eq!(v["fingerprint"], hex(fingerprint("paid").as_bytes()));
    assert_eq!(v["response"]["status"], 201);
    assert_eq!(v["response"]["body"]["data"], "receipt");
    assert_eq!(
        v["response"]["headers"],
        serde_json::json!([{"name": "x-order", "encoding": "utf8", "value": "7"}])
    );
    let v = cli(args(&["--json", "list", "--in-flight"])).json();
    assert_eq!(v["records"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["records"][0]["key"], "stuck");
    assert_eq!(v["records"][0]["fencing_token"], token);

    // Changes go beside the running engine.
    let run = cli(args(&[
        "--json",
        "release",
        "--scope",
        "acme",
        "--key",
        "stuck",
        "--fence",
        &(token + 1).to_string(),
    ]));
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.json()["outcome"], "fence_moved");
    assert_eq!(run.json()["current_fencing_token"], token);
    assert!(matches!(
        engine.claim(request("acme", "stuck")).unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    let run = cli(args(&[
        "release",
        "--scope",
        "acme",
        "--key",
        "stuck",
        "--fence",
        &token.to_string(),
    ]));
    assert_eq!((run.code, run.stderr.as_str()), (0, ""), "{run:?}");
    let again = claimed(engine.claim(request("acme", "stuck")).unwrap());
    assert!(again.fencing_token() > token);
    assert!(matches!(
        held.complete(StoredResponse::new(200, "late")),
        Err(idempotency_rs::Error::LeaseLost)
    ));
    let run = cli(args(&["--json", "purge", "--expired"]));
    assert_eq!(run.json(), serde_json::json!({"purged": 0}));
    let run = cli(args(&["check"]));
    assert_eq!(run.code, 0, "{run:?}");

    // A table that is not there.
    let run = cli([
        "stats",
        &url,
        "--table",
        &format!("idem_missing_{}.records", std::process::id()),
    ]);
    run.assert_error(&[
        "cannot open the store: ",
        "no idempotency-rs store in the table",
    ]);
}
