//! The checkpointer thread: copies the WAL into the database file off the writer thread.
//!
//! The writer connection runs with `wal_autocheckpoint=0`, so no commit ever stops to copy
//! pages (with SQLite's automatic checkpoint, one commit in ~500 operations did, with two
//! `fsync`s, while every other caller waited). After each commit the writer pokes this thread,
//! which runs a `PASSIVE` checkpoint on its own connection at most once per
//! [`INTERVAL`]: a passive checkpoint never waits for, nor blocks, the writer or a reader.
//! Idle engines cost nothing: without a poke the thread sleeps.
//!
//! A passive checkpoint only copies frames committed before it started, and SQLite rewinds the
//! WAL to its beginning only when a write transaction starts while every frame has been copied.
//! Under steady load the writer commits during nearly every checkpoint, so the WAL could grow
//! without bound; when a checkpoint reports more than [`RESTART_FRAMES`] frames, this thread
//! asks the writer to run one passive checkpoint itself, between two batches (it only has the
//! few frames committed since this thread's last one to copy), after which its next transaction
//! rewinds the WAL.
//!
//! Errors are not fatal here: a busy checkpoint (another process checkpointing) or an I/O error
//! leaves the frames in the WAL, and SQLite marks frames as copied only once the database file
//! has been synced, so the next checkpoint copies them again. A failed flush of the WAL itself
//! is the syncer's business (Linux reports a write-back error to every descriptor open at the
//! time, so the syncer's next `fdatasync` fails too); once one has failed, this thread stops.
//! Why a checkpoint may run over WAL frames the syncer has not flushed yet: see
//! `storage::open_checkpointer`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, select};

use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::sqlite::storage;
use crate::writer::Shared;

/// The shortest time between two checkpoints.
const INTERVAL: Duration = Duration::from_millis(10);

/// WAL size (in frames, ~4 KiB each) from which the writer is asked to checkpoint once itself so
/// that the WAL rewinds: 64 MiB. That checkpoint stalls the writer for two `fsync`s of a busy
/// disk whatever is left to copy (measured: 10-15 ms under a saturating load, even with a tail
/// of a few dozen frames), so the threshold trades WAL size for how often that happens; at
/// 16 MiB it cost a fifth of the writer's time at saturation and doubled p99. With any pause
/// in the load the WAL rewinds by itself, long before this.
const RESTART_FRAMES: i64 = 16384;

/// The handle the writer keeps. Dropping it stops and joins the thread.
pub(crate) struct Checkpointer {
    poke: Sender<()>,
    stop: Option<Sender<()>>,
    restart_wanted: Arc<AtomicBool>,
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
        let (poke, poked) = crossbeam_channel::bounded(1);
        let (stop, stopped) = crossbeam_channel::bounded(0);
        let restart_wanted = Arc::new(AtomicBool::new(false));
        let wanted = restart_wanted.clone();
        let handle = std::thread::Builder::new()
            .name("idempotency-ckpt".into())
            .spawn(move || run(&conn, &poked, &stopped, &wanted, &shared))
            .map_err(|e| Error::Storage(Arc::new(e)))?;
        Ok(Checkpointer {
            poke,
            stop: Some(stop),
            restart_wanted,
            handle: Some(handle),
        })
    }

    /// Tells the thread that the WAL grew (after a commit). Never blocks.
    pub(crate) fn poke(&self) {
        match self.poke.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
        }
    }

    /// True once after the thread saw the WAL pass [`RESTART_FRAMES`].
    pub(crate) fn take_restart_request(&self) -> bool {
        self.restart_wanted.load(Ordering::Relaxed)
            && self.restart_wanted.swap(false, Ordering::Relaxed)
    }

    /// Stops the thread (a checkpoint in progress finishes first) and waits for it.
    pub(crate) fn stop(&mut self) {
        self.stop = None;
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    conn: &rusqlite::Connection,
    poked: &Receiver<()>,
    stopped: &Receiver<()>,
    restart_wanted: &AtomicBool,
    shared: &Shared,
) {
    loop {
        // Nothing is ever sent on `stopped`: it disconnects when the writer stops us.
        select! {
            recv(poked) -> msg => if msg.is_err() { return },
            recv(stopped) -> _ => return,
        }
        if shared.sync_failure().is_some() {
            // A flush of the WAL failed: nothing more may be copied into the database file,
            // not even when this connection closes (see `storage::no_checkpoint_on_close`).
            storage::no_checkpoint_on_close(conn);
            return;
        }
        if let Ok(state) = storage::checkpoint_passive(conn)
            && state.frames >= RESTART_FRAMES
        {
            restart_wanted.store(true, Ordering::Relaxed);
        }
        match stopped.recv_timeout(INTERVAL) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}
