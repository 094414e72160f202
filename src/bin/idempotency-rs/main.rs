//! `idempotency-rs`: inspect and repair an idempotency-rs store from outside the service.
//!
//! Reads (`stats`, `inspect`, `list`, `check`) open the store read-only and work beside a
//! running service; the changes (`release`, `forget`, `purge`) open it for writing, which an
//! SQLite store allows only when no engine has it open.

mod fmt;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};
use idempotency_rs::admin::{Access, Change, Record, RecordState, Stats, Store, redact_url};
use idempotency_rs::{EngineConfig, Error, HeaderList, StoredResponse};
use serde_json::{Value, json};

/// Bytes of a text body shown without `--full`.
const TEXT_PREVIEW: usize = 2048;
/// Bytes of a binary body shown (as hex) without `--full`.
const HEX_PREVIEW: usize = 256;
/// The longest `--wait`.
const MAX_WAIT: Duration = Duration::from_secs(3600);

const HELP_FOOTER: &str = "\
Examples:
  idempotency-rs stats /var/lib/app/idempotency.db
  idempotency-rs list /var/lib/app/idempotency.db --in-flight --older-than 5m
  idempotency-rs inspect sqlite:/var/lib/app/idempotency.db --scope acme --key order-17
  idempotency-rs --json stats postgres://app@db.internal/app --table idempotency_records
  idempotency-rs release /var/lib/app/idempotency.db --scope acme --key order-17 --fence 4711
  idempotency-rs forget /var/lib/app/idempotency.db --scope acme --key order-17
  idempotency-rs purge /var/lib/app/idempotency.db --expired
  idempotency-rs check /var/lib/app/idempotency.db

Exit status:
  0  done: the answer is printed
  1  the answer is no: no such record, the change was not made (the outcome says why), or
     the check found problems
  2  usage error, or the store could not be opened or read (one line on stderr: `error: ...`)";

const STORE_HELP: &str = "\
The store: an SQLite file (a path, sqlite:PATH or sqlite://PATH) or, in a build with the
`postgres` feature, a PostgreSQL URL (postgres://user@host/db; --table names a table other
than idempotency_records). The store must exist: this tool never creates one.";

#[derive(Debug, Parser)]
#[command(
    name = "idempotency-rs",
    version,
    about = "Inspect and repair an idempotency-rs store (SQLite file or PostgreSQL table)",
    long_about = "Inspect and repair an idempotency-rs store (SQLite file or PostgreSQL table) \
from outside the service that uses it.\n\n\
Reads (stats, inspect, list, check) open the store read-only: they never change a record, \
never create a store (on SQLite, like any reader, they may add the -wal and -shm files beside \
it), and work beside a running service without blocking it. Changes (release, \
forget, purge) open it for writing. An SQLite store serves one engine at a time, so a change \
to a store a running service holds is refused (after --wait): stop the service first, or make \
the change from inside it (Engine::force_release, Engine::forget, Engine::purge_expired). A \
PostgreSQL store accepts changes beside running services.",
    after_help = HELP_FOOTER
)]
struct Cli {
    /// Print machine-readable JSON on stdout instead of text (times as RFC 3339 UTC strings
    /// and as milliseconds since the epoch, in `*_ms` fields)
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Figures: records by state, timed-out leases, the oldest lease, sizes, schema version
    #[command(after_help = "Examples:
  idempotency-rs stats /var/lib/app/idempotency.db
  idempotency-rs --json stats sqlite:/var/lib/app/idempotency.db
  idempotency-rs stats postgres://app@db.internal/app --table billing.idempotency")]
    Stats {
        #[command(flatten)]
        store: StoreArgs,
    },

    /// One record: state, fingerprint, fencing token, times, and its stored response
    #[command(after_help = "Examples:
  idempotency-rs inspect /var/lib/app/idempotency.db --scope acme --key order-17
  idempotency-rs inspect /var/lib/app/idempotency.db --scope acme --key order-17 --full
  idempotency-rs --json inspect /var/lib/app/idempotency.db --scope '' --key order-17

Exits 1 when the store has no record of that scope and key.")]
    Inspect {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        record: RecordArgs,
        /// Print the whole body (without it, a long body is cut and the bytes left out are
        /// counted). JSON output always holds the whole body.
        #[arg(long)]
        full: bool,
    },

    /// The leases in flight, oldest first: scope, key, fencing token, age, lock timed out
    #[command(after_help = "Examples:
  idempotency-rs list /var/lib/app/idempotency.db --in-flight
  idempotency-rs list /var/lib/app/idempotency.db --in-flight --older-than 30s --limit 20
  idempotency-rs --json list /var/lib/app/idempotency.db --in-flight --older-than 1h30m

Durations: a whole number and a unit (ms, s, m, h, d), or several run together: 500ms, 30s,
5m, 2h, 1h30m.")]
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// List the in-flight records (required: the only listing there is)
        #[arg(long)]
        in_flight: bool,
        /// Only leases granted at least this long ago (500ms, 30s, 5m, 2h, 1d)
        #[arg(long, value_name = "DURATION", default_value = "0s", allow_hyphen_values = true,
              value_parser = fmt::parse_duration)]
        older_than: Duration,
        /// Show at most this many (the oldest)
        #[arg(long, value_name = "N", default_value_t = 100, allow_negative_numbers = true,
              value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },

    /// Free a stuck key: delete its in-flight record, only under its current fencing token
    #[command(after_help = "Examples:
  idempotency-rs list /var/lib/app/idempotency.db --in-flight --older-than 10m
  idempotency-rs release /var/lib/app/idempotency.db --scope acme --key order-17 --fence 4711

Read the fencing token with `list --in-flight` or `inspect`. If the record has moved on (another
lease took it, it completed, it is gone), nothing is changed and the command exits 1 saying
why. The next claim of a released key runs the operation again; the lease that held it, if it
is still running, fails to complete. An SQLite store must not be held by a running service.")]
    Release {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        record: RecordArgs,
        /// The fencing token of the lease to end (as `list` or `inspect` shows it)
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        fence: u64,
        #[command(flatten)]
        write: WriteArgs,
    },

    /// Delete a completed record: the next claim of its key runs the operation again
    #[command(after_help = "Examples:
  idempotency-rs forget /var/lib/app/idempotency.db --scope acme --key order-17

An in-flight record is not forgotten (exit 1): release it under its fencing token instead.
An SQLite store must not be held by a running service.")]
    Forget {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        record: RecordArgs,
        #[command(flatten)]
        write: WriteArgs,
    },

    /// Delete every expired record now (`--expired` is required)
    #[command(after_help = "Examples:
  idempotency-rs purge /var/lib/app/idempotency.db --expired

Only records past their expiry are deleted (claims already ignore them; the service's own
cleanup deletes them too, spread out). An SQLite store must not be held by a running service.")]
    Purge {
        #[command(flatten)]
        store: StoreArgs,
        /// Delete the expired records (required: purge deletes nothing else)
        #[arg(long)]
        expired: bool,
        #[command(flatten)]
        write: WriteArgs,
    },

    /// Check the store: the database's integrity check, then every record decoded
    #[command(after_help = "Examples:
  idempotency-rs check /var/lib/app/idempotency.db
  idempotency-rs --json check /var/lib/app/idempotency.db

Exits 1 when it finds a problem, and lists them.")]
    Check {
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Args)]
struct StoreArgs {
    /// The store: an SQLite file (PATH, sqlite:PATH) or a PostgreSQL URL (postgres://...)
    #[arg(value_name = "STORE", long_help = STORE_HELP)]
    store: OsString,

    /// PostgreSQL only: the table of records, `name` or `schema.name` [default:
    /// idempotency_records]
    #[cfg(feature = "postgres")]
    #[arg(long, value_name = "NAME")]
    table: Option<String>,
}

#[derive(Debug, Args)]
struct RecordArgs {
    /// The record's scope (tenant or user; may be empty)
    #[arg(long)]
    scope: String,
    /// The record's idempotency key
    #[arg(long)]
    key: String,
}

#[derive(Debug, Args)]
struct WriteArgs {
    /// How long to wait for a service that holds an SQLite store to let go of it, before
    /// giving up (at most 1h)
    #[arg(long, value_name = "DURATION", default_value = "2s", allow_hyphen_values = true,
          value_parser = parse_wait)]
    wait: Duration,
}

fn parse_wait(text: &str) -> Result<Duration, String> {
    let wait = fmt::parse_duration(text)?;
    if wait > MAX_WAIT {
        return Err(format!("`{text}` is too long: wait at most 1h"));
    }
    Ok(wait)
}

/// Why a command could not do its work: one line for stderr (`error: ...`, exit status 2).
#[derive(Debug)]
struct Failure {
    message: String,
}

impl Failure {
    fn new(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
        }
    }
}

/// What a command answers: text for people, JSON for programs, and the exit code.
struct Answer {
    text: String,
    json: Value,
    code: u8,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go to stdout with status 0.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {}", usage_error(&e));
            return ExitCode::from(2);
        }
    };
    let json = cli.json;
    match run(cli.command) {
        Ok(answer) => {
            let out = if json {
                let mut s = serde_json::to_string_pretty(&answer.json)
                    .unwrap_or_else(|_| String::from("null"));
                s.push('\n');
                s
            } else {
                answer.text
            };
            let mut stdout = std::io::stdout().lock();
            match stdout
                .write_all(out.as_bytes())
                .and_then(|()| stdout.flush())
            {
                Ok(()) => ExitCode::from(answer.code),
                // A reader that went away (`| head`) is not an error of ours.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::from(answer.code),
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "error: cannot write the output: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Err(failure) => {
            // One line, whatever the message holds.
            let line = failure.message.replace(['\n', '\r'], " ");
            let _ = writeln!(std::io::stderr(), "error: {line}");
            ExitCode::from(2)
        }
    }
}

/// clap's usage error in one line: its message and tips, without the usage block.
fn usage_error(e: &clap::Error) -> String {
    if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        return "name a command: stats, inspect, list, release, forget, purge or check (try --help)"
            .to_owned();
    }
    let rendered = e.to_string();
    let mut line = String::new();
    let mut in_usage = false;
    for part in rendered.lines().map(str::trim) {
        if part.is_empty() {
            in_usage = false;
            continue;
        }
        if part.starts_with("Usage:") {
            in_usage = true;
        }
        if in_usage || part.starts_with("For more information") {
            continue;
        }
        let part = part.strip_prefix("error: ").unwrap_or(part);
        if !line.is_empty() {
            line.push_str(if line.ends_with(':') { " " } else { "; " });
        }
        line.push_str(part);
    }
    line.push_str(" (try --help)");
    line
}

fn run(command: Command) -> Result<Answer, Failure> {
    match command {
        Command::Stats { store } => stats(&store),
        Command::Inspect {
            store,
            record,
            full,
        } => inspect(&store, &record, full),
        Command::List {
            store,
            in_flight,
            older_than,
            limit,
        } => list(&store, in_flight, older_than, limit),
        Command::Release {
            store,
            record,
            fence,
            write,
        } => release(&store, &record, fence, write.wait),
        Command::Forget {
            store,
            record,
            write,
        } => forget(&store, &record, write.wait),
        Command::Purge {
            store,
            expired,
            write,
        } => purge(&store, expired, write.wait),
        Command::Check { store } => check(&store),
    }
}

// ---------------------------------------------------------------------------------------
// Opening the store
// ---------------------------------------------------------------------------------------

/// The store a command opened, and how to name it.
struct Opened {
    store: Store,
    /// The store as the user named it (a PostgreSQL password hidden).
    shown: String,
}

fn is_postgres(url: &str) -> bool {
    let url = url.trim_start();
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The file an SQLite store URL names, as `EngineConfig::from_url` reads it (`None` for
/// another scheme or an in-memory store).
fn sqlite_path(url: &str) -> Option<PathBuf> {
    let url = url.trim();
    if matches!(url, "sqlite::memory:" | ":memory:" | "sqlite://:memory:") {
        return None;
    }
    let path = if let Some(rest) = url.strip_prefix("sqlite://") {
        rest
    } else if let Some(rest) = url.strip_prefix("sqlite:") {
        rest
    } else if url.contains("://") {
        return None;
    } else {
        url
    };
    let path = path.split('?').next().unwrap_or("");
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// The configuration the command line names.
fn config(args: &StoreArgs) -> Result<(EngineConfig, String), Failure> {
    let (config, shown, postgres) = match args.store.to_str() {
        Some(url) => {
            if url.trim().is_empty() {
                return Err(Failure::new(
                    "the store is empty: name an SQLite file or a PostgreSQL URL",
                ));
            }
            if is_postgres(url) && cfg!(not(feature = "postgres")) {
                return Err(Failure::new(
                    "this idempotency-rs tool was built without PostgreSQL support: \
                     build it with `--features cli,postgres` to open a postgres:// store",
                ));
            }
            // SQLite reports a directory only when it first reads it, as an I/O error.
            if let Some(path) = sqlite_path(url)
                && path.is_dir()
            {
                return Err(Failure::new(format!(
                    "cannot open the store {}: it is a directory, not an SQLite file",
                    path.display()
                )));
            }
            let config = EngineConfig::from_url(url).map_err(|e| match e {
                Error::InvalidConfig { reason } => {
                    Failure::new(format!("cannot open the store: {reason}"))
                }
                other => open_failure(&other, &redact_url(url)),
            })?;
            (config, redact_url(url), is_postgres(url))
        }
        // Not UTF-8: only a plain file path can be that.
        None => {
            let path = PathBuf::from(&args.store);
            if path.is_dir() {
                return Err(Failure::new(format!(
                    "cannot open the store {}: it is a directory, not an SQLite file",
                    path.display()
                )));
            }
            let shown = path.display().to_string();
            (EngineConfig::new(path), shown, false)
        }
    };
    #[cfg(feature = "postgres")]
    let config = match (&args.table, postgres) {
        (Some(table), true) => config.table(table.clone()),
        (Some(_), false) => {
            return Err(Failure::new(format!(
                "--table applies to PostgreSQL stores only, and {shown} is an SQLite store (its table is always idempotency_records)"
            )));
        }
        (None, _) => config,
    };
    #[cfg(not(feature = "postgres"))]
    let _ = postgres;
    Ok((config, shown))
}

fn open(args: &StoreArgs) -> Result<Opened, Failure> {
    let (config, shown) = config(args)?;
    let store =
        Store::open_config(config, Access::ReadOnly).map_err(|e| open_failure(&e, &shown))?;
    Ok(Opened { store, shown })
}

/// Opens the store for a change; `what` says which (`release a key`).
fn open_for_writing(args: &StoreArgs, wait: Duration, what: &str) -> Result<Opened, Failure> {
    let (config, shown) = config(args)?;
    let store = Store::open_config(config.open_timeout(wait), Access::ReadWrite).map_err(|e| {
        match e {
            Error::AlreadyOpen { pid, .. } => {
                let holder = match pid {
                    Some(pid) => format!("process {pid}"),
                    None => "a process whose id is unknown".to_owned(),
                };
                Failure::new(format!(
                    "cannot {what}: {shown} is held by a running idempotency engine ({holder}), and an SQLite store \
                     serves one engine at a time, so this tool cannot write to it beside that engine \
                     (waited {wait}). Either stop that process (pid {pid}) and run this command again, \
                     or make the change from inside the running service with Engine::force_release, \
                     Engine::forget or Engine::purge_expired. Reads (stats, inspect, list, check) \
                     work beside it.",
                    wait = fmt::duration(wait),
                    pid = pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
                ))
            }
            other => open_failure(&other, &shown),
        }
    })?;
    Ok(Opened { store, shown })
}

/// The one line that says why the store could not be opened.
fn open_failure(e: &Error, shown: &str) -> Failure {
    Failure::new(match e {
        Error::CannotOpen { path, reason } => format!(
            "cannot open the store {}: {reason} (this tool never creates a store: check the path)",
            path.display()
        ),
        Error::NotADatabase { path } => format!(
            "{} is not an SQLite database, so not an idempotency-rs store",
            path.display()
        ),
        Error::Refused { detail } => format!("cannot open the store: {detail}"),
        Error::SchemaTooNew { found, supported } => format!(
            "{shown} has schema version {found}, newer than this tool understands ({supported}): \
             it was written by a newer idempotency-rs; use that version's tool"
        ),
        // A read needs write access too: SQLite's readers of a WAL store share its `-shm`
        // file, created beside it when missing.
        Error::ReadOnly { path } => format!(
            "cannot open {}: this user may not write the file or its directory, which even a \
             read of an SQLite store in WAL mode needs (for its -shm file): run as the \
             service's user",
            path.display()
        ),
        Error::Unavailable { detail } => format!("cannot reach the store: {detail}"),
        Error::InvalidConfig { reason } => format!("cannot open the store {shown}: {reason}"),
        Error::Busy => format!(
            "cannot open the store {shown}: the database stayed locked by another connection"
        ),
        other => format!("cannot open the store {shown}: {other}"),
    })
}

/// The one line for an error while reading or changing an opened store.
fn store_failure(e: &Error, shown: &str) -> Failure {
    match e {
        Error::Corrupt { detail } => Failure::new(format!(
            "{shown}: a record does not decode ({detail}); run `idempotency-rs check` on the store"
        )),
        Error::InvalidKey { .. } | Error::InvalidScope { .. } => Failure::new(e.to_string()),
        other => Failure::new(format!("{shown}: {other}")),
    }
}

/// Checks a scope and key before anything is opened.
fn validate(record: &RecordArgs) -> Result<(), Failure> {
    idempotency_rs::validate_scope(&record.scope)
        .map_err(|e| Failure::new(format!("--scope {}: {e}", fmt::name(&record.scope))))?;
    idempotency_rs::validate_key(record.key.as_bytes())
        .map_err(|e| Failure::new(format!("--key {}: {e}", fmt::name(&record.key))))
}

// ---------------------------------------------------------------------------------------
// Output helpers
// ---------------------------------------------------------------------------------------

/// Aligned `label  value` lines.
fn fields(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (label, value) in rows {
        let mut lines = value.lines();
        out.push_str(&format!(
            "{label:<width$}  {}\n",
            lines.next().unwrap_or_default()
        ));
        for more in lines {
            out.push_str(&format!("{:<width$}  {more}\n", ""));
        }
    }
    out
}

/// An aligned table with a header row.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                s.push_str(cell);
            } else {
                s.push_str(cell);
                s.push_str(&" ".repeat(w - cell.chars().count() + 2));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(&mut header.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// `"name": RFC 3339` and `"name_ms": ms` in a JSON object.
fn put_time(obj: &mut serde_json::Map<String, Value>, name: &str, t: Option<SystemTime>) {
    obj.insert(
        name.to_owned(),
        t.map_or(Value::Null, |t| json!(fmt::rfc3339(t))),
    );
    obj.insert(
        format!("{name}_ms"),
        t.map_or(Value::Null, |t| json!(fmt::epoch_ms(t))),
    );
}

/// How long ago `t` was, in ms (0 when it is ahead of now).
fn age_ms(t: SystemTime, now: SystemTime) -> u64 {
    now.duration_since(t)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Bytes as JSON: UTF-8 text as is, anything else as hex.
fn json_bytes(data: &[u8]) -> (Value, &'static str) {
    match std::str::from_utf8(data) {
        Ok(text) => (json!(text), "utf8"),
        Err(_) => (json!(fmt::hex(data)), "hex"),
    }
}

fn json_headers(list: &HeaderList) -> Value {
    Value::Array(
        list.iter()
            .map(|(name, value)| {
                let (value, encoding) = json_bytes(value);
                json!({"name": name, "encoding": encoding, "value": value})
            })
            .collect(),
    )
}

/// Header lines for people: `name: value`, a value that is not printable text in hex.
fn text_headers(list: &HeaderList) -> String {
    if list.is_empty() {
        return "(none)".to_owned();
    }
    list.iter()
        .map(|(name, value)| {
            let name = fmt::name(name);
            match fmt::printable(value).filter(|v| !v.contains(['\n', '\r'])) {
                Some(v) => format!("{name}: {v}"),
                None => format!("{name}: (hex) {}", fmt::hex(value)),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------
// The commands
// ---------------------------------------------------------------------------------------

fn stats(args: &StoreArgs) -> Result<Answer, Failure> {
    let opened = open(args)?;
    let s: Stats = opened
        .store
        .stats()
        .map_err(|e| store_failure(&e, &opened.shown))?;
    let now = SystemTime::now();
    let total = s.in_flight + s.completed + s.expired;

    let mut rows = vec![
        ("store", opened.shown.clone()),
        ("backend", s.backend.to_owned()),
        ("schema version", s.schema_version.to_string()),
        ("in flight", s.in_flight.to_string()),
        ("  lock timed out", s.lock_timed_out.to_string()),
        ("completed", s.completed.to_string()),
        ("expired backlog", s.expired.to_string()),
        ("total", total.to_string()),
        (
            "oldest lease",
            s.oldest_in_flight
                .map_or_else(|| "(none in flight)".to_owned(), |t| fmt::when(t, now)),
        ),
    ];
    let mut obj = serde_json::Map::new();
    obj.insert("store".into(), json!(opened.shown));
    obj.insert("backend".into(), json!(s.backend));
    obj.insert("schema_version".into(), json!(s.schema_version));
    obj.insert("in_flight".into(), json!(s.in_flight));
    obj.insert("lock_timed_out".into(), json!(s.lock_timed_out));
    obj.insert("completed".into(), json!(s.completed));
    obj.insert("expired".into(), json!(s.expired));
    obj.insert("total".into(), json!(total));
    put_time(&mut obj, "oldest_in_flight", s.oldest_in_flight);
    obj.insert(
        "oldest_in_flight_age_ms".into(),
        s.oldest_in_flight
            .map_or(Value::Null, |t| json!(age_ms(t, now))),
    );
    if s.backend == "sqlite" {
        rows.push(("file size", fmt::bytes(s.size_bytes)));
        rows.push((
            "WAL size",
            s.wal_bytes
                .map_or_else(|| "(no WAL file)".to_owned(), fmt::bytes),
        ));
        obj.insert("file_bytes".into(), json!(s.size_bytes));
        obj.insert("wal_bytes".into(), json!(s.wal_bytes));
    } else {
        rows.push(("table size", fmt::bytes(s.size_bytes)));
        obj.insert("table_bytes".into(), json!(s.size_bytes));
    }
    put_time(&mut obj, "now", Some(now));
    opened
        .store
        .close()
        .map_err(|e| store_failure(&e, &opened.shown))?;
    Ok(Answer {
        text: fields(&rows),
        json: Value::Object(obj),
        code: 0,
    })
}

fn inspect(args: &StoreArgs, record: &RecordArgs, full: bool) -> Result<Answer, Failure> {
    validate(record)?;
    let opened = open(args)?;
    let found = opened
        .store
        .record(&record.scope, &record.key)
        .map_err(|e| store_failure(&e, &opened.shown))?;
    let now = SystemTime::now();
    let _ = opened.store.close();
    let Some(r) = found else {
        return Ok(Answer {
            text: format!(
                "no record: scope {}, key {} has none in {} (never claimed, or released, forgotten or purged)\n",
                fmt::name(&record.scope),
                fmt::name(&record.key),
                opened.shown
            ),
            json: json!({"found": false, "scope": record.scope, "key": record.key}),
            code: 1,
        });
    };
    Ok(Answer {
        text: record_text(&r, now, full),
        json: record_json(&r, now),
        code: 0,
    })
}

fn record_json(r: &Record, now: SystemTime) -> Value {
    let mut obj = serde_json::Map::new();
    obj.insert("found".into(), json!(true));
    obj.insert("scope".into(), json!(r.scope));
    obj.insert("key".into(), json!(r.key));
    obj.insert("state".into(), json!(r.state.as_str()));
    obj.insert(
        "fingerprint".into(),
        json!(fmt::hex(r.fingerprint.as_bytes())),
    );
    obj.insert("fencing_token".into(), json!(r.fencing_token));
    put_time(&mut obj, "created_at", Some(r.created_at));
    put_time(&mut obj, "completed_at", r.completed_at);
    put_time(&mut obj, "locked_until", r.locked_until);
    put_time(&mut obj, "expires_at", Some(r.expires_at));
    obj.insert("lock_timed_out".into(), json!(r.lock_timed_out(now)));
    obj.insert(
        "response".into(),
        r.response.as_ref().map_or(Value::Null, response_json),
    );
    put_time(&mut obj, "now", Some(now));
    Value::Object(obj)
}

fn response_json(resp: &StoredResponse) -> Value {
    let (data, encoding) = json_bytes(&resp.body);
    json!({
        "status": resp.status,
        "headers": json_headers(&resp.headers),
        "trailers": resp.trailers.as_ref().map_or(Value::Null, json_headers),
        "body": {"length": resp.body.len(), "encoding": encoding, "data": data},
    })
}

fn record_text(r: &Record, now: SystemTime, full: bool) -> String {
    let state = match r.state {
        RecordState::InFlight if r.lock_timed_out(now) => {
            "in flight (its lock has timed out: the next claim takes it over)".to_owned()
        }
        RecordState::InFlight => "in flight".to_owned(),
        RecordState::Completed => "completed".to_owned(),
        RecordState::Expired => {
            "expired (claims ignore it; the next cleanup deletes it)".to_owned()
        }
        other => other.to_string(),
    };
    let mut rows = vec![
        ("scope", fmt::name(&r.scope)),
        ("key", fmt::name(&r.key)),
        ("state", state),
        ("fingerprint", fmt::hex(r.fingerprint.as_bytes())),
        ("fencing token", r.fencing_token.to_string()),
        ("created", fmt::when(r.created_at, now)),
    ];
    if let Some(t) = r.completed_at {
        rows.push(("completed", fmt::when(t, now)));
    }
    if let Some(t) = r.locked_until {
        rows.push(("locked until", fmt::when(t, now)));
    }
    rows.push(("expires", fmt::when(r.expires_at, now)));
    let mut body = String::new();
    match &r.response {
        None => rows.push(("response", "(none: not completed)".to_owned())),
        Some(resp) => {
            rows.push(("status", resp.status.to_string()));
            rows.push(("headers", text_headers(&resp.headers)));
            if let Some(trailers) = &resp.trailers {
                rows.push(("trailers", text_headers(trailers)));
            }
            let (kind, shown, left) = body_text(&resp.body, full);
            rows.push(("body", kind));
            body = shown;
            if left > 0 {
                body.push_str(&format!(
                    "... {left} more bytes not shown (--full prints everything, --json too)\n"
                ));
            }
        }
    }
    let mut out = fields(&rows);
    if !body.is_empty() {
        out.push('\n');
        out.push_str(&body);
    }
    out
}

/// The body for people: what it is, what is shown (ending in a line break), and how many
/// bytes were left out.
fn body_text(body: &[u8], full: bool) -> (String, String, usize) {
    if body.is_empty() {
        return ("(empty)".to_owned(), String::new(), 0);
    }
    match fmt::printable(body) {
        Some(text) => {
            let shown = if full {
                text
            } else {
                fmt::prefix(text, TEXT_PREVIEW)
            };
            let mut s = shown.to_owned();
            if !s.ends_with('\n') {
                s.push('\n');
            }
            (
                format!("{} bytes of text:", body.len()),
                s,
                body.len() - shown.len(),
            )
        }
        None => {
            let n = if full {
                body.len()
            } else {
                body.len().min(HEX_PREVIEW)
            };
            let kind = if std::str::from_utf8(body).is_ok() {
                "UTF-8 with control characters"
            } else {
                "binary"
            };
            (
                format!("{} bytes, {kind} (hex):", body.len()),
                fmt::hex_dump(&body[..n]),
                body.len() - n,
            )
        }
    }
}

fn list(
    args: &StoreArgs,
    in_flight: bool,
    older_than: Duration,
    limit: u32,
) -> Result<Answer, Failure> {
    if !in_flight {
        return Err(Failure::new(
            "list needs --in-flight: the in-flight leases are the only listing there is \
             (`stats` counts every state, `inspect` shows one record)",
        ));
    }
    let opened = open(args)?;
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut records = opened
        .store
        .in_flight(older_than, limit.saturating_add(1))
        .map_err(|e| store_failure(&e, &opened.shown))?;
    let now = SystemTime::now();
    let _ = opened.store.close();
    let more = records.len() > limit;
    records.truncate(limit);

    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let lock = match r.locked_until {
                Some(t) if r.lock_timed_out(now) => format!("timed out {}", fmt::relative(t, now)),
                Some(t) => format!("times out {}", fmt::relative(t, now)),
                None => String::new(),
            };
            vec![
                fmt::name(&r.scope),
                fmt::name(&r.key),
                r.fencing_token.to_string(),
                fmt::duration(now.duration_since(r.created_at).unwrap_or_default()),
                if r.lock_timed_out(now) { "yes" } else { "no" }.to_owned(),
                lock,
            ]
        })
        .collect();
    let older = if older_than.is_zero() {
        String::new()
    } else {
        format!(" granted at least {} ago", fmt::duration(older_than))
    };
    let mut text = String::new();
    if records.is_empty() {
        text.push_str(&format!("no in-flight records{older}\n"));
    } else {
        text.push_str(&table(
            &["SCOPE", "KEY", "FENCE", "AGE", "TIMED OUT", "LOCK"],
            &rows,
        ));
        let n = records.len();
        text.push_str(&format!(
            "{n} in-flight record{}{older}, oldest first{}\n",
            if n == 1 { "" } else { "s" },
            if more {
                format!("; more exist beyond --limit {limit}")
            } else {
                String::new()
            }
        ));
    }
    let items: Vec<Value> = records
        .iter()
        .map(|r| {
            let mut obj = serde_json::Map::new();
            obj.insert("scope".into(), json!(r.scope));
            obj.insert("key".into(), json!(r.key));
            obj.insert("fencing_token".into(), json!(r.fencing_token));
            obj.insert(
                "fingerprint".into(),
                json!(fmt::hex(r.fingerprint.as_bytes())),
            );
            put_time(&mut obj, "created_at", Some(r.created_at));
            obj.insert("age_ms".into(), json!(age_ms(r.created_at, now)));
            put_time(&mut obj, "locked_until", r.locked_until);
            obj.insert("lock_timed_out".into(), json!(r.lock_timed_out(now)));
            put_time(&mut obj, "expires_at", Some(r.expires_at));
            Value::Object(obj)
        })
        .collect();
    let mut obj = serde_json::Map::new();
    obj.insert("records".into(), Value::Array(items));
    obj.insert("more".into(), json!(more));
    obj.insert("limit".into(), json!(limit));
    obj.insert(
        "older_than_ms".into(),
        json!(u64::try_from(older_than.as_millis()).unwrap_or(u64::MAX)),
    );
    put_time(&mut obj, "now", Some(now));
    Ok(Answer {
        text,
        json: Value::Object(obj),
        code: 0,
    })
}

/// The answer to a change of one record.
fn change_answer(
    change: &Change,
    record: &RecordArgs,
    fence: Option<u64>,
    done_text: String,
) -> Answer {
    let (outcome, current) = match change {
        Change::Done => ("done", None),
        Change::NotFound => ("not_found", None),
        Change::InFlight { fencing_token } => ("in_flight", Some(*fencing_token)),
        Change::Completed => ("completed", None),
        Change::FenceMoved { current } => ("fence_moved", Some(*current)),
        _ => ("not_done", None),
    };
    let done = *change == Change::Done;
    let mut obj = serde_json::Map::new();
    obj.insert("scope".into(), json!(record.scope));
    obj.insert("key".into(), json!(record.key));
    if let Some(fence) = fence {
        obj.insert("fencing_token".into(), json!(fence));
    }
    obj.insert("outcome".into(), json!(outcome));
    obj.insert("changed".into(), json!(done));
    if let Some(current) = current {
        obj.insert("current_fencing_token".into(), json!(current));
    }
    obj.insert("message".into(), json!(change.to_string()));
    let text = if done {
        done_text
    } else if let (Change::FenceMoved { current }, Some(fence)) = (change, fence)
        && fence > *current
    {
        // Tokens only grow: a newer token than the record's was never one of its leases.
        format!(
            "nothing changed: scope {}, key {}: the record is in flight under fencing token {current}; \
             {fence} is newer, so it was never this record's token (check the number with `inspect`)\n",
            fmt::name(&record.scope),
            fmt::name(&record.key)
        )
    } else {
        format!(
            "nothing changed: scope {}, key {}: {change}\n",
            fmt::name(&record.scope),
            fmt::name(&record.key)
        )
    };
    Answer {
        text,
        json: Value::Object(obj),
        code: if done { 0 } else { 1 },
    }
}

fn release(
    args: &StoreArgs,
    record: &RecordArgs,
    fence: u64,
    wait: Duration,
) -> Result<Answer, Failure> {
    validate(record)?;
    let opened = open_for_writing(args, wait, "release the key")?;
    let change = opened
        .store
        .release(&record.scope, &record.key, fence)
        .map_err(|e| store_failure(&e, &opened.shown))?;
    opened
        .store
        .close()
        .map_err(|e| store_failure(&e, &opened.shown))?;
    let done = format!(
        "released: scope {}, key {} (fencing token {fence}) is free; the next claim runs the operation again\n",
        fmt::name(&record.scope),
        fmt::name(&record.key)
    );
    Ok(change_answer(&change, record, Some(fence), done))
}

fn forget(args: &StoreArgs, record: &RecordArgs, wait: Duration) -> Result<Answer, Failure> {
    validate(record)?;
    let opened = open_for_writing(args, wait, "forget the record")?;
    let change = opened
        .store
        .forget(&record.scope, &record.key)
        .map_err(|e| store_failure(&e, &opened.shown))?;
    opened
        .store
        .close()
        .map_err(|e| store_failure(&e, &opened.shown))?;
    let done = format!(
        "forgotten: the record of scope {}, key {} is deleted; the next claim runs the operation again\n",
        fmt::name(&record.scope),
        fmt::name(&record.key)
    );
    Ok(change_answer(&change, record, None, done))
}

fn purge(args: &StoreArgs, expired: bool, wait: Duration) -> Result<Answer, Failure> {
    if !expired {
        return Err(Failure::new(
            "purge needs --expired: it deletes expired records and nothing else \
             (`forget` deletes one completed record, `release` frees one stuck key)",
        ));
    }
    let opened = open_for_writing(args, wait, "purge the expired records")?;
    let n = opened
        .store
        .purge_expired()
        .map_err(|e| store_failure(&e, &opened.shown))?;
    opened
        .store
        .close()
        .map_err(|e| store_failure(&e, &opened.shown))?;
    Ok(Answer {
        text: format!(
            "purged {n} expired record{}\n",
            if n == 1 { "" } else { "s" }
        ),
        json: json!({"purged": n}),
        code: 0,
    })
}

fn check(args: &StoreArgs) -> Result<Answer, Failure> {
    let opened = open(args)?;
    let problems = opened
        .store
        .check()
        .map_err(|e| store_failure(&e, &opened.shown))?;
    let _ = opened.store.close();
    let text = if problems.is_empty() {
        format!("ok: {} passed every check\n", opened.shown)
    } else {
        let mut s = format!(
            "{} problem{} in {}:\n",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            opened.shown
        );
        for p in &problems {
            s.push_str(&format!("  {}\n", p.replace(['\n', '\r'], " ")));
        }
        s
    };
    Ok(Answer {
        text,
        json: json!({"ok": problems.is_empty(), "problems": problems}),
        code: u8::from(!problems.is_empty()),
    })
}
