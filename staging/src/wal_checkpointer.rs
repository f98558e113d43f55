//! Checkpoints the index's write-ahead log on a thread of its own, so that the writer's commits
//! do not.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses its threshold: the writer
//! thread copies a thousand pages into the database file and waits for two fsyncs before it can
//! answer the group's clients or take the next group. Measured on the 2-core VMs (BENCHMARKS.md,
//! *Encryption at rest*), that was about 8 % of the writer's time under batch load. Here the
//! writer only nudges this thread after each commit; the thread runs a PASSIVE checkpoint (it
//! never blocks a writer or a reader, and copies only what no reader still needs) at most every
//! [`MIN_INTERVAL`], so a burst's pages are copied once per interval rather than per threshold.
//!
//! Durability does not change: a committed transaction is in the WAL (and the writer's records
//! are fsync'd in their segments before that), and a checkpoint cut by a crash or a power cut is
//! finished by the next open, as SQLite always does. The writer keeps an automatic checkpoint of
//! its own at [`WRITER_SAFETY_PAGES`], far above what one interval writes, in case this thread
//! cannot keep up; SQLite's `journal_size_limit` (index.rs) still cuts the WAL back after each
//! reset.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

use crate::error::StoreError;

/// The shortest time between two background checkpoints. Long enough that one checkpoint takes
/// a few hundred group commits' pages at full load (each page copied and synced once, not once
/// per commit that touched it), short enough that the WAL stays a few MiB.
pub(crate) const MIN_INTERVAL: Duration = Duration::from_millis(200);

/// The writer's own automatic checkpoint, kept as a safety net (pages of 4 KiB: 32 MiB).
const WRITER_SAFETY_PAGES: i64 = 8_000;

/// The running thread.
pub(crate) struct WalCheckpointer {
    handle: JoinHandle<()>,
}

/// What the writer holds: a nudge after each commit. Dropping it (the writer ending) ends the
/// thread after one last checkpoint.
pub(crate) struct Nudge(SyncSender<()>);

impl Nudge {
    /// Tells the thread the WAL grew. Never blocks: a nudge already waiting covers this one.
    pub(crate) fn wal_grew(&self) {
        let _ = self.0.try_send(());
    }
}

impl WalCheckpointer {
    /// Starts the thread on a connection of its own to the index at `index_path`, and turns the
    /// writer's own automatic checkpoint (`writer_conn`) down to the safety net.
    pub(crate) fn start(
        index_path: &Path,
        writer_conn: &Connection,
    ) -> Result<(WalCheckpointer, Nudge), StoreError> {
        writer_conn.pragma_update(None, "wal_autocheckpoint", WRITER_SAFETY_PAGES)?;
        // A bare connection: the index's schema and settings (index::open) are the other
        // connections' business; this one never writes a row.
        let conn = Connection::open_with_flags(
            index_path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let (tx, rx) = mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name("estafeta-wal-ckpt".into()) // within Linux's 15 characters, for top and strace
            .spawn(move || run(conn, rx))
            .map_err(|e| StoreError::io("start the index checkpoint thread for", index_path, e))?;
        Ok((WalCheckpointer { handle }, Nudge(tx)))
    }

    /// Waits for the thread to end (after the writer, whose [`Nudge`] ends it).
    pub(crate) fn join(self) {
        let _ = self.handle.join();
    }
}

fn run(conn: Connection, nudges: Receiver<()>) {
    // The first nudge is served at once (`checked_sub` only fails right after boot).
    let mut last = Instant::now()
        .checked_sub(MIN_INTERVAL)
        .unwrap_or_else(Instant::now);
    while nudges.recv().is_ok() {
        if let Some(wait) = MIN_INTERVAL.checked_sub(last.elapsed()) {
            std::thread::sleep(wait);
        }
        // The commits during the wait are covered by this checkpoint.
        while nudges.try_recv().is_ok() {}
        checkpoint(&conn);
        last = Instant::now();
    }
    // The writer is gone: copy what it left, so the next open starts from a short WAL.
    checkpoint(&conn);
}

/// One PASSIVE checkpoint. A failure (a full disk, most often) is logged and left to the next
/// nudge: the WAL keeps every committed page until a checkpoint succeeds.
fn checkpoint(conn: &Connection) {
    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
        tracing::warn!(error = %e, "Could not checkpoint the staging index's WAL; will try again after the next write.");
    }
}
