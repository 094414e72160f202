//! The SQLite store: one file, one engine. Its SQL, its files (WAL, lock), its helper threads
//! (checkpointer, syncer) and the [`Backend`](crate::writer::Backend) the writer drives.

pub(crate) mod admin;
mod backend;
pub(crate) mod checkpointer;
pub(crate) mod lock;
pub(crate) mod storage;
pub(crate) mod syncer;

pub(crate) use backend::SqliteBackend;
