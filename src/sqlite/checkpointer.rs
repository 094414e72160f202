//! The checkpointer thread: copies the WAL into the database file off the writer thread.
//!
//! The writer connection runs with `wal_autocheckpoint=0`, so no commit ever stops to copy
//! pages (with SQLite's automatic checkpoint, one commit in ~500 operations did, with two
//! `fsync`s, while every other caller waited). The writer's WAL hook records how many frames
//! the WAL holds after each commit; the writer wakes this thread on the first commit while it
//! sleeps, and each time the WAL has grown by [`CHECKPOINT_BYTES`], and the thread then runs a
//! `PASSIVE` checkpoint on its own connection. Once the WAL has not grown for [`IDLE`], it
//! copies the tail and sleeps.
//! A passive checkpoint never waits for, nor blocks, the writer or a reader. Idle engines cost
//! nothing: without a poke the thread sleeps.
//!
//! Why by WAL growth rather than by time (until issue #18 it ran at most every 10 ms): a page
//! written again before the next checkpoint is copied into the database file once, not once
//! per commit. The B-tree pages a batch of claims dirties (the record-id index is keyed by a
//! hash, so its inserts land on random leaves) are rewritten many times over within a few
//! thousand frames; copying each version cost CPU (sorting the WAL index, checksums) and as
//! many bytes as the WAL itself (`make bench-cpu`, BENCHMARKS.md).
//!
//! A passive checkpoint only copies frames committed before it started, and SQLite rewinds the
//! WAL to its beginning only when a write transaction starts while every frame has been copied.
//! Under steady load the writer commits during nearly every checkpoint, so the WAL could grow
//! without bound; when a checkpoint reports more than [`RESTART_BYTES`] of frames, this thread
//! checkpoints again until only a short tail is left and asks the writer to run one passive
//! checkpoint itself, between two batches (it only has the few frames committed since this
//! thread's last one to copy), after which its next transaction rewinds the WAL.
//!
//! Errors are not fatal here: a busy checkpoint (another process checkpointing) or an I/O error
//! leaves the frames in the WAL, and SQLite marks frames as copied only once the database file
//! has been synced, so the next checkpoint copies them again. A failed flush of the WAL itself
//! is the syncer's business (Linux reports a write-back error to every descriptor open at the
//! time, so the syncer's next `fdatasync` fails too); once one has failed, this thread stops.
//! Why a checkpoint may run over WAL frames the syncer has not flushed yet: see
//! `storage::open_checkpointer`.

use std::cell::Cell;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError, select};

use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::sqlite::storage;
use crate::writer::Shared;

/// WAL growth that starts a checkpoint: 8 MiB (2048 frames of 4 KiB pages).
const CHECKPOINT_BYTES: i64 = 8 << 20;

/// After a checkpoint, a last one copies the tail once the WAL has not grown for this long
/// (the load paused or stopped), so that the WAL can rewind.
const IDLE: Duration = Duration::from_millis(100);

/// WAL size from which the writer is asked to checkpoint once itself so that the WAL rewinds:
/// 64 MiB (16384 frames of 4 KiB pages). That checkpoint stalls the writer for two `fsync`s of a busy
/// disk whatever is left to copy (measured: 10-15 ms under a saturating load, even with a tail
/// of a few dozen frames), so the threshold trades WAL size for how often that happens; at
/// 16 MiB it cost a fifth of the writer's time at saturation and doubled p99. With any pause
/// in the load the WAL rewinds by itself, long before this.
const RESTART_BYTES: i64 = 64 << 20;

/// What is left to copy below which the writer is asked to finish the job (see
/// [`checkpoint_passive`]): 1 MiB (256 frames of 4 KiB pages).
const RESTART_TAIL_BYTES: i64 = 1 << 20;

/// The thresholds above in frames of the file's page size: the WAL hook and checkpoints count
/// frames, and a frame is one page (512 bytes to 64 KiB, `EngineConfig::page_size`). Counted
/// as a fixed number of frames, a file of 64 KiB pages grew its WAL to a gigabyte before the
/// writer made it rewind (tests/crash_points.rs).
#[derive(Clone, Copy, Debug)]
struct Frames {
    checkpoint: i64,
    restart: i64,
    restart_tail: i64,
}

impl Frames {
    fn of_page_size(page_size: i64) -> Frames {
        let frames = |bytes: i64| (bytes / page_size.max(1)).max(1);
        Frames {
            checkpoint: frames(CHECKPOINT_BYTES),
            restart: frames(RESTART_BYTES),
            restart_tail: frames(RESTART_TAIL_BYTES),
        }
    }
}

/// The handle the writer keeps. Dropping it stops and joins the thread.
pub(crate) struct Checkpointer {
    poke: Sender<()>,
    watch: Arc<Watch>,
    /// The WAL thresholds in frames of this file's page size.
    limits: Frames,
    /// `watch.frames` when the writer last woke the thread for the WAL's growth.
    poked_at: Cell<i64>,
    stop: Option<Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Opens the checkpointer's connection and starts its thread.
    pub(crate) fn spawn(
        path: &Path,
        config: &EngineConfig,
        shared: Arc<Shared>,
    ) -> Result<Checkpointer> {
        let conn = storage::open_checkpointer(path, config)?;
        let page_size: i64 = conn
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .map_err(|e| storage::open_error(e, path))?;
        let limits = Frames::of_page_size(page_size);
        let (poke, poked) = crossbeam_channel::bounded(1);
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let watch = Arc::new(Watch {
            frames: AtomicI64::new(0),
            commits: AtomicU64::new(0),
            asleep: AtomicBool::new(false),
            restart_wanted: AtomicBool::new(false),
        });
        let watched = watch.clone();
        let handle = std::thread::Builder::new()
            .name("idempotency-ckpt".into())
            .spawn(move || run(&conn, limits, &poked, &stopped, &watched, &shared))
            .map_err(|e| Error::Storage(Arc::new(e)))?;
        Ok(Checkpointer {
            poke,
            watch,
            limits,
            poked_at: Cell::new(0),
            stop: Some(stop),
            handle: Some(handle),
        })
    }

    /// Makes `conn` (the writer's) report the WAL's size to this thread after every commit.
    pub(crate) fn watch(&self, conn: &mut rusqlite::Connection) -> Result<()> {
        let watch = self.watch.clone();
        conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: i32| {
            watch.frames.store(i64::from(pages), Ordering::Relaxed);
            watch.commits.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }))?;
        Ok(())
    }

    /// After a commit: wakes the thread when it sleeps, and when the WAL has grown by
    /// [`CHECKPOINT_BYTES`] since the last such wake-up (or rewound since). Never blocks; a
    /// commit that adds little to the WAL of an awake thread costs a few loads, not a wake-up
    /// of another thread.
    pub(crate) fn committed(&self) {
        let now = self.watch.frames.load(Ordering::Relaxed);
        let last = self.poked_at.get();
        let grown = now < last || now - last >= self.limits.checkpoint;
        if grown {
            self.poked_at.set(now);
        }
        if grown
            || (self.watch.asleep.load(Ordering::SeqCst)
                && self.watch.asleep.swap(false, Ordering::SeqCst))
        {
            self.poke();
        }
    }

    /// Wakes the thread for a checkpoint now. Never blocks.
    pub(crate) fn poke(&self) {
        match self.poke.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
        }
    }

    /// True once after the thread saw the WAL pass [`RESTART_BYTES`].
    pub(crate) fn take_restart_request(&self) -> bool {
        self.watch.restart_wanted.load(Ordering::Relaxed)
            && self.watch.restart_wanted.swap(false, Ordering::Relaxed)
    }

    /// Stops the thread (a checkpoint in progress finishes first) and waits for it.
    pub(crate) fn stop(&mut self) {
        self.stop = None;
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// What the writer and the thread share.
struct Watch {
    /// Frames in the WAL after the writer's last commit (its WAL hook sets it).
    frames: AtomicI64,
    /// Commits so far (its WAL hook counts them).
    commits: AtomicU64,
    /// The thread waits for a poke, with the WAL copied as far as it knows.
    asleep: AtomicBool,
    /// See [`Checkpointer::take_restart_request`].
    restart_wanted: AtomicBool,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    conn: &rusqlite::Connection,
    limits: Frames,
    poked: &Receiver<()>,
    stopped: &Receiver<()>,
    watch: &Watch,
    shared: &Shared,
) {
    // What the WAL held when the last checkpoint started: its size (to see it grow) and the
    // writer's commit count (monotonic, unlike the size, which falls back when the WAL rewinds
    // and may grow back to the very same count).
    let mut last = Copied::default();
    loop {
        // Announce the sleep first, then look: a commit after the look finds the flag set and
        // pokes; one before it is seen here (SeqCst on both sides, see `committed`).
        watch.asleep.store(true, Ordering::SeqCst);
        if watch.commits.load(Ordering::SeqCst) == last.commits {
            // Nothing is ever sent on `stopped`: it disconnects when the writer stops us.
            select! {
                recv(poked) -> msg => if msg.is_err() { return },
                recv(stopped) -> _ => return,
            }
        } else {
            watch.asleep.store(false, Ordering::SeqCst);
        }
        // Awake: checkpoint each time the WAL has grown by CHECKPOINT_BYTES, and once nothing
        // was committed for IDLE, copy the tail and sleep until the next commit.
        let mut seen = watch.commits.load(Ordering::SeqCst);
        loop {
            let frames = watch.frames.load(Ordering::Relaxed);
            if frames < last.frames {
                // The WAL rewound: it starts again from its first frame.
                last.frames = 0;
            }
            if frames - last.frames >= limits.checkpoint
                && !checkpoint(conn, limits, watch, shared, &mut last)
            {
                return;
            }
            select! {
                recv(poked) -> msg => if msg.is_err() { return } else { continue },
                recv(stopped) -> _ => return,
                default(IDLE) => {}
            }
            let now = watch.commits.load(Ordering::SeqCst);
            if now == seen {
                if now != last.commits && !checkpoint(conn, limits, watch, shared, &mut last) {
                    return;
                }
                break;
            }
            seen = now;
        }
    }
}

/// The WAL as the last checkpoint found it when it started.
#[derive(Default)]
struct Copied {
    frames: i64,
    commits: u64,
}

/// Records what the WAL holds, then checkpoints (see [`checkpoint_passive`]). False once a
/// flush of the WAL has failed: nothing more may be copied into the database file, not even
/// when this connection closes (see `storage::no_checkpoint_on_close`), and the thread stops.
/// The failure is looked at right before each checkpoint, not only when the thread wakes: a
/// tail checkpoint runs after a wait.
fn checkpoint(
    conn: &rusqlite::Connection,
    limits: Frames,
    watch: &Watch,
    shared: &Shared,
    last: &mut Copied,
) -> bool {
    if shared.sync_failure().is_some() {
        storage::no_checkpoint_on_close(conn);
        return false;
    }
    last.commits = watch.commits.load(Ordering::SeqCst);
    last.frames = watch.frames.load(Ordering::Relaxed);
    checkpoint_passive(conn, limits, &watch.restart_wanted);
    true
}

/// One passive checkpoint. When the WAL has grown past [`RESTART_BYTES`], checkpoints again
/// until only the frames committed meanwhile are left (a few passes at most), then asks the
/// writer to copy that short tail itself so that its next transaction rewinds the WAL.
fn checkpoint_passive(conn: &rusqlite::Connection, limits: Frames, restart_wanted: &AtomicBool) {
    let Ok(mut state) = storage::checkpoint_passive(conn) else {
        return;
    };
    if state.frames < limits.restart {
        return;
    }
    for _ in 0..8 {
        if state.frames - state.copied <= limits.restart_tail {
            break;
        }
        match storage::checkpoint_passive(conn) {
            Ok(s) => state = s,
            Err(_) => return,
        }
    }
    restart_wanted.store(true, Ordering::Relaxed);
}
