//! One engine per database file: an exclusive lock on `<database>-lock`, held from before the
//! engine first touches the file until its last connection to it has closed.
//!
//! Why refuse a second engine rather than share the file: the engine keeps two things in memory
//! that are only right while it is the file's only writer. Fencing tokens are counted in memory
//! (persisted with each batch, read once at open), so two engines on one file would hand out the
//! same tokens, and after a takeover across them the *older* lease would complete and the newer
//! holder get `LeaseLost`. And completions committed but not yet flushed are held back from
//! replay by an in-memory set that another process cannot see, so its read connections would
//! replay a response a power loss could still erase. Several instances need a shared store
//! (PostgreSQL), not several writers on one SQLite file.
//!
//! The lock is `flock`-style (`File::try_lock`), on a file of its own beside the database:
//! SQLite's own locks are POSIX record locks on the database file, which every `close` of any
//! descriptor of that file by this process would drop, so the database file itself is never
//! opened here. The lock file holds the holder's process id, for the error a second opener
//! gets; it is left in place when the engine stops (removing a lock file races with the next
//! opener).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::{Error, Result};

/// The databases (resolved paths) whose lock an engine of this process holds.
///
/// A lock that no engine of this process holds, yet is taken under this process's id, is held
/// by a copy of its descriptor in a child process being started: between `fork` and `exec` a
/// child has every descriptor of its parent, also those closed on `exec`, and with them their
/// `flock` locks. A thread spawning a process while another reopens a file its engine has just
/// let go would otherwise be refused with `AlreadyOpen` by its own lock; it waits for the
/// `exec`, up to [`SPAWN_GRACE`], whatever the configured wait.
static HELD: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// How long a lock held by a child being started (see [`HELD`]) is waited for.
const SPAWN_GRACE: Duration = Duration::from_secs(1);

/// The exclusive right to run an engine on one database file. Dropping it lets the next one in.
#[derive(Debug)]
pub(crate) struct EngineLock {
    _file: File,
    /// The database's path as SQLite resolves it (see [`canonical_db`]).
    db: PathBuf,
}

impl EngineLock {
    /// Takes the lock of the database at `db`, waiting up to `wait` for an engine that holds it
    /// to stop.
    ///
    /// # Errors
    /// [`Error::AlreadyOpen`] when another engine (in this process or another) holds it after
    /// `wait`; [`Error::CannotOpen`] or [`Error::ReadOnly`] when the lock file cannot be
    /// created (a missing directory, a directory as the path, a read-only directory).
    pub(crate) fn acquire(db: &Path, wait: Duration) -> Result<EngineLock> {
        let real = canonical_db(db)?;
        let mut path = real.clone().into_os_string();
        path.push("-lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| match e.kind() {
                ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => Error::ReadOnly {
                    path: db.to_path_buf(),
                },
                _ => Error::Storage(Arc::new(e)),
            })?;
        let deadline = crate::clock::instant_after(wait);
        let grace = Instant::now() + SPAWN_GRACE;
        let mut pause = Duration::from_millis(2);
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => {
                    let now = Instant::now();
                    let until = if now < deadline {
                        deadline
                    } else if now < grace
                        && holder(&mut file) == Some(std::process::id())
                        && !HELD.lock().contains(&real)
                    {
                        grace
                    } else {
                        return Err(Error::AlreadyOpen {
                            path: db.to_path_buf(),
                            pid: holder(&mut file),
                        });
                    };
                    std::thread::sleep(pause.min(until.saturating_duration_since(now)));
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(TryLockError::Error(e)) => return Err(Error::Storage(Arc::new(e))),
            }
        }
        // Who holds it, for the error the next opener gets. Informational only: a failure to
        // write it (a full disk) does not stop the engine.
        let _ = file
            .set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{}", std::process::id()));
        HELD.lock().insert(real.clone());
        Ok(EngineLock {
            _file: file,
            db: real,
        })
    }

    /// The database's path, resolved: where its `-wal` file and its directory are.
    pub(crate) fn db(&self) -> &Path {
        &self.db
    }
}

impl Drop for EngineLock {
    fn drop(&mut self) {
        // Before the file (and so the lock) goes: an opener that finds the lock still taken
        // after this takes it for a child's copy and waits for it.
        HELD.lock().remove(&self.db);
    }
}

/// The process id the holder wrote into the lock file, if it can be read.
fn holder(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// The database's path with its directory (and, for an existing file, the file itself)
/// resolved, as SQLite resolves it: two spellings of one database (a symbolic link to the file,
/// `./x.db` and `x.db`) share one lock.
///
/// # Errors
/// [`Error::CannotOpen`] when the path is a directory or its directory does not exist.
fn canonical_db(db: &Path) -> Result<PathBuf> {
    let cannot = |reason| Error::CannotOpen {
        path: db.to_path_buf(),
        reason,
    };
    if db.is_dir() {
        return Err(cannot("the path is a directory"));
    }
    if let Ok(real) = std::fs::canonicalize(db) {
        return Ok(real);
    }
    let name = db
        .file_name()
        .ok_or_else(|| cannot("the path names no file"))?;
    let dir = std::fs::canonicalize(dir_of(db)).map_err(|e| match e.kind() {
        ErrorKind::NotFound | ErrorKind::NotADirectory => cannot("its directory does not exist"),
        _ => Error::Storage(Arc::new(e)),
    })?;
    Ok(dir.join(name))
}

/// The directory that holds the database at `db` (`.` for a bare file name).
pub(crate) fn dir_of(db: &Path) -> &Path {
    match db.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_file_is_refused_with_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        let first = EngineLock::acquire(&db, Duration::ZERO).unwrap();
        match EngineLock::acquire(&db, Duration::from_millis(20)) {
            Err(Error::AlreadyOpen { path, pid }) => {
                assert_eq!(path, db);
                assert_eq!(pid, Some(std::process::id()));
            }
            other => panic!("expected AlreadyOpen, got {other:?}"),
        }
        drop(first);
        EngineLock::acquire(&db, Duration::ZERO).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn two_spellings_of_one_file_share_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        std::fs::write(&db, b"").unwrap();
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&db, &link).unwrap();
        let _first = EngineLock::acquire(&db, Duration::ZERO).unwrap();
        assert!(matches!(
            EngineLock::acquire(&link, Duration::ZERO),
            Err(Error::AlreadyOpen { .. })
        ));
        let dotted = dir.path().join(".").join("x.db");
        assert!(matches!(
            EngineLock::acquire(&dotted, Duration::ZERO),
            Err(Error::AlreadyOpen { .. })
        ));
    }

    /// A lock taken under this process's id that no engine of this process holds is a child's
    /// copy of the descriptor, between `fork` and `exec`: waited for, even with no wait
    /// configured. Found as a flaky `AlreadyOpen` in tests/one_engine.rs, whose reopen after a
    /// shutdown raced another test spawning child processes.
    #[test]
    fn a_lock_held_by_a_childs_copy_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        // What a child being spawned holds: the lock file, locked, with this process's id.
        let mut copy = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.path().join("x.db-lock"))
            .unwrap();
        copy.try_lock().unwrap();
        writeln!(copy, "{}", std::process::id()).unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(copy);
        });
        let started = Instant::now();
        EngineLock::acquire(&db, Duration::ZERO).unwrap();
        assert!(started.elapsed() < SPAWN_GRACE);
        t.join().unwrap();
    }

    #[test]
    fn the_lock_waits_for_the_holder_to_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        let first = EngineLock::acquire(&db, Duration::ZERO).unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(first);
        });
        EngineLock::acquire(&db, Duration::from_secs(10)).unwrap();
        t.join().unwrap();
    }
}
