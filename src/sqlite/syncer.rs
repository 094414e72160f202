//! The syncer thread (`Durability::Full`, on a file): flushes the WAL and only then answers the
//! completions it made durable.
//!
//! The writer commits every batch with `synchronous=NORMAL` (no `fsync`), answers its claims,
//! releases and extensions at once, and hands the batch's completions here. This thread takes
//! everything queued, calls `fdatasync` on the `-wal` file (a descriptor of its own: a flush
//! covers the file whatever descriptor asks for it) and answers. One flush covers every commit
//! written before it started, so while the disk flushes batch *n* the writer already builds
//! and commits batch *n+1*, whose completions share the next flush (group commit, with the
//! flush out of the writer's way).
//!
//! **Not yet durable is in flight.** Between its commit and its flush, a completion is visible
//! to every connection but could still be lost to a power loss; a replay served in that window
//! would hand out a response that may vanish, and a later retry would run the operation again.
//! So the writer registers each completion in [`Unsynced`] *before* its commit, and this thread
//! removes it after the flush and before answering. Read connections that find a completed
//! record still registered do not replay it but pass the claim to the writer, and the writer
//! answers such a claim here, after the next flush (see `writer.rs`): a retry arriving in that
//! window waits at most one flush for its replay, and never gets one that is not on disk. No
//! timestamps are involved (tests run on a `ManualClock`).
//!
//! **A failed flush is fatal.** The completions it covered get [`Error::SyncFailed`], and so does
//! everything after: once `fdatasync` has failed, the kernel may have dropped the unwritten
//! pages of the WAL (and a later `fdatasync` succeeds without writing them), and SQLite's
//! recovery stops at the first missing frame, so nothing committed after them could be
//! recovered either. The writer sees the failure, fails every queued command and stops; the
//! records stay registered, so this engine never replays them. Reopening the engine lets
//! SQLite recover whatever did reach the disk.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::key::IdMap;
use crate::sqlite::storage;
use crate::writer::{ClaimReply, Shared};

/// Records whose completion is committed but not yet flushed, shared by the writer (which adds
/// them), the syncer (which removes them) and the read connections (which do not replay them).
#[derive(Debug, Default)]
pub(crate) struct Unsynced {
    /// Entries in `ids`: the fast path for readers when nothing is waiting for a flush.
    count: AtomicUsize,
    /// Record id -> how many of its completions are waiting (more than one only if a record
    /// expired, was claimed again and completed again before the first flush).
    ids: Mutex<IdMap<u32>>,
}

impl Unsynced {
    /// Registers a completion. Called before the commit that makes it visible.
    pub(crate) fn add(&self, id: &[u8; 32]) {
        *self.ids.lock().entry(*id).or_insert(0) += 1;
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    /// Unregisters a completion (flushed, or rolled back).
    pub(crate) fn remove(&self, id: &[u8; 32]) {
        let mut ids = self.ids.lock();
        if let Some(n) = ids.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                ids.remove(id);
            }
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// True when a completion of this record is committed but not yet on disk.
    ///
    /// Callers check this *after* reading the record. A reader that saw the completed row saw
    /// a commit that the writer started after `add` returned, and SQLite publishes a commit to
    /// readers through the WAL index in shared memory under its own locks and memory barriers,
    /// so the counter's increment is visible to the reader by then: `count == 0` can only mean
    /// that every completion the reader could have seen is durable.
    pub(crate) fn contains(&self, id: &[u8; 32]) -> bool {
        self.count.load(Ordering::SeqCst) != 0 && self.ids.lock().contains_key(id)
    }
}

/// An answer that must wait for the next flush.
pub(crate) enum AfterSync {
    /// A completion committed in a batch: Ok once it is on disk.
    Completion {
        id: [u8; 32],
        reply: oneshot::Sender<Result<()>>,
    },
    /// A claim that found a completed record not yet on disk: its replay, once it is.
    Replay {
        reply: oneshot::Sender<Result<ClaimReply>>,
        answer: ClaimReply,
    },
}

/// The handle the writer keeps. Dropping it flushes and answers whatever was handed over, then
/// joins the thread.
pub(crate) struct Syncer {
    tx: Option<Sender<Vec<AfterSync>>>,
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl Syncer {
    /// Opens the database's `-wal` file and starts the thread. The writer connection has
    /// already opened the database in WAL mode, so the file exists (and stays until the last
    /// connection closes, after this thread has stopped).
    pub(crate) fn spawn(db: &Path, shared: Arc<Shared>) -> Result<Syncer> {
        let wal = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(storage::wal_path(db))
            .map_err(|e| Error::Storage(Arc::new(e)))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("idempotency-sync".into())
            .spawn(move || run(&wal, &rx, &thread_shared))
            .map_err(|e| Error::Storage(Arc::new(e)))?;
        Ok(Syncer {
            tx: Some(tx),
            shared,
            handle: Some(handle),
        })
    }

    /// Hands over the answers of a committed batch; they are sent after the next flush.
    pub(crate) fn send(&self, answers: Vec<AfterSync>) {
        let Some(tx) = &self.tx else {
            return;
        };
        if let Err(lost) = tx.send(answers) {
            // The thread is gone (it cannot end while we hold the sender, short of a panic):
            // nobody will flush these, so they are failures.
            let e = Error::sync_failed(std::io::Error::other("the WAL syncer thread ended"));
            self.shared.set_sync_failure(e.clone());
            fail(lost.0, &e);
        }
    }

    /// Stops the thread after it has flushed and answered everything handed over.
    pub(crate) fn stop(&mut self) {
        self.tx = None;
        #[cfg(feature = "fault-injection")]
        self.shared.sync_faults.stop();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(wal: &File, rx: &Receiver<Vec<AfterSync>>, shared: &Shared) {
    while let Ok(mut group) = rx.recv() {
        // Everything queued shares this flush: each was committed before it was sent.
        for more in rx.try_iter() {
            group.extend(more);
        }
        match flush(wal, shared) {
            Ok(()) => {
                // Unregister first: a caller told "done" may retry at once and must get the
                // replay from a read connection.
                for a in &group {
                    if let AfterSync::Completion { id, .. } = a {
                        shared.unsynced.remove(id);
                    }
                }
                for a in group {
                    match a {
                        AfterSync::Completion { reply, .. } => {
                            let _ = reply.send(Ok(()));
                        }
                        AfterSync::Replay { reply, answer } => {
                            let _ = reply.send(Ok(answer));
                        }
                    }
                }
            }
            Err(e) => fail(group, &e),
        }
    }
}

fn fail(group: Vec<AfterSync>, e: &Error) {
    for a in group {
        match a {
            AfterSync::Completion { reply, .. } => {
                let _ = reply.send(Err(e.clone()));
            }
            AfterSync::Replay { reply, .. } => {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// One `fdatasync` of the WAL; after a failure, every later flush fails with the same error
/// without trying (a later `fdatasync` could succeed without the lost pages).
fn flush(wal: &File, shared: &Shared) -> Result<()> {
    if let Some(e) = shared.sync_failure() {
        return Err(e);
    }
    let started = crate::metrics::Timer::start();
    #[cfg(feature = "fault-injection")]
    let result = match shared.sync_faults.before_flush() {
        true => Err(std::io::Error::other(
            "injected fdatasync failure (fault-injection)",
        )),
        false => wal.sync_data(),
    };
    #[cfg(not(feature = "fault-injection"))]
    let result = wal.sync_data();
    shared.meters.flushed(started);
    result.map_err(|io| {
        let e = Error::sync_failed(io);
        shared.meters.error("flush", &e);
        tracing::error!(error = %e, "idempotency: flushing the WAL failed; the engine stops");
        shared.set_sync_failure(e.clone());
        e
    })
}

/// Test hooks on the syncer (feature `fault-injection`).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Default)]
pub(crate) struct SyncFaults {
    state: Mutex<FaultState>,
    changed: parking_lot::Condvar,
}

#[cfg(feature = "fault-injection")]
#[derive(Debug, Default)]
struct FaultState {
    paused: bool,
    fail_next: bool,
    stopping: bool,
}

#[cfg(feature = "fault-injection")]
impl SyncFaults {
    pub(crate) fn set_paused(&self, paused: bool) {
        self.state.lock().paused = paused;
        self.changed.notify_all();
    }

    pub(crate) fn fail_next(&self) {
        self.state.lock().fail_next = true;
    }

    /// Lets a paused flush go when the syncer is stopping, so a test cannot hang a shutdown.
    fn stop(&self) {
        self.state.lock().stopping = true;
        self.changed.notify_all();
    }

    /// Waits while paused; true when this flush must fail.
    fn before_flush(&self) -> bool {
        let mut state = self.state.lock();
        while state.paused && !state.stopping {
            self.changed.wait(&mut state);
        }
        std::mem::take(&mut state.fail_next)
    }
}
