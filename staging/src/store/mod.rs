//! The store handle, [`Staging`]: the state it shares with its writer thread, and the
//! housekeeping (`cleanup`, adoption of foreign files). Its API is split by role:
//!
//! - `open.rs`: opening, the index check or rebuild, the hand-off to recovery;
//! - `stage.rs`: checking records and queueing them for the writer thread;
//! - `deliver.rs`: leases of runs per key and their settlement (the batcher's API);
//! - `sources.rs`: the SQL sources' checkpoints;
//! - `views.rs`: status, listings, records and staging files read back.

mod deliver;
pub use deliver::{Dead, Retry, Settlement};
mod open;
mod source_files;
pub use source_files::{REFUSED_DIR, RefusedRow};
mod sources;
mod stage;
mod views;

use chrono::Utc;
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::writer::Message;
use crate::*;

/// Client idempotency keys are remembered this long.
const CLIENT_KEY_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// State shared by the handle and the writer thread.
pub(crate) struct Shared {
    pub root: PathBuf,
    pub state_dir: PathBuf,
    pub failed_dir: PathBuf,
    pub opts: Options,
    /// `_state/data-keys`: the data keys of sealed segments (data_keys.rs).
    pub data_keys: Arc<crate::data_keys::DataKeySlots>,
    poisoned: Mutex<Option<String>>,
    is_poisoned: AtomicBool,
    blocked: Mutex<Option<String>>,
    #[cfg(feature = "fault-injection")]
    pub fail_next_sync: AtomicBool,
    #[cfg(feature = "fault-injection")]
    pub fail_next_index: AtomicBool,
}

impl Shared {
    pub fn poisoned(&self) -> Option<String> {
        if !self.is_poisoned.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.poisoned).clone()
    }

    pub fn poison(&self, reason: String) {
        let mut p = lock(&self.poisoned);
        if p.is_none() {
            *p = Some(reason);
        }
        self.is_poisoned.store(true, Ordering::Release);
    }

    /// What the index keeps of a record key, client key or fingerprint: the text itself, or its
    /// keyed hash when the store seals (the index must not hold them in clear).
    pub fn index_text(&self, text: &str) -> String {
        match &self.opts.keys {
            Some(k) => k.hash(text),
            None => text.to_owned(),
        }
    }

    /// The key ring, when the store seals.
    pub fn keys(&self) -> Option<&crate::Keyring> {
        self.opts.keys.as_deref()
    }

    /// Sets why staging refuses writes (`None`: it accepts them), logging each change once:
    /// a WARN with the reason when writes start being refused, an INFO when they resume.
    pub fn set_blocked(&self, reason: Option<String>) {
        let mut blocked = lock(&self.blocked);
        match (&*blocked, &reason) {
            (None, Some(why)) => tracing::warn!(
                reason = %why,
                "Staging refuses new writes (HTTP 507); delivery goes on and writes resume by themselves when there is room."
            ),
            (Some(_), None) => tracing::info!("Staging accepts writes again."),
            _ => {}
        }
        *blocked = reason;
    }
}

/// Locks a mutex, recovering from a panic in another holder: the data behind these mutexes
/// (a SQLite connection, a string) stays consistent because SQLite rolls back on its own.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Inner {
    shared: Arc<Shared>,
    /// This process's lease-owner name, and its owner file (locked while we live).
    owner: String,
    _owner_lock: std::fs::File,
    db: Mutex<Connection>,
    tx: Mutex<Option<SyncSender<Message>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Ends after the writer (whose nudge it waits on).
    checkpointer: Mutex<Option<crate::wal_checkpointer::WalCheckpointer>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        lock(&self.tx).take();
        if let Some(handle) = lock(&self.writer).take() {
            let _ = handle.join();
        }
        if let Some(checkpointer) = lock(&self.checkpointer).take() {
            checkpointer.join();
        }
        crate::leases::unregister(&self.shared.state_dir, &self.owner);
    }
}

/// A handle on one staging folder. Cheap to clone; all clones share one writer thread.
#[derive(Clone)]
pub struct Staging {
    inner: Arc<Inner>,
}

pub(crate) fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

impl Staging {
    pub fn root(&self) -> &Path {
        &self.inner.shared.root
    }

    /// The dead-letter folder.
    pub fn failed_dir(&self) -> &Path {
        &self.inner.shared.failed_dir
    }

    /// The keys the store seals with (encryption at rest), if any.
    pub fn keys(&self) -> Option<&crate::Keyring> {
        self.inner.shared.keys()
    }

    /// Sinks records are routed to by default.
    pub fn sinks(&self) -> Vec<String> {
        self.inner.shared.opts.sinks.clone()
    }

    /// Test hook: the next segment flush fails as if the disk had reported an error.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fn inject_sync_failure(&self) {
        self.inner
            .shared
            .fail_next_sync
            .store(true, Ordering::SeqCst);
    }

    /// Test hook: the next group's lines reach the disk but its index commit fails, as on a
    /// disk that fills up between the two.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fn inject_index_failure(&self) {
        self.inner
            .shared
            .fail_next_index
            .store(true, Ordering::SeqCst);
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    pub(crate) fn db(&self) -> MutexGuard<'_, Connection> {
        lock(&self.inner.db)
    }

    /// Deletes segment files every sink has confirmed; frees space.
    pub fn cleanup(&self) -> Result<CleanupReport, StoreError> {
        // Ask our writer to close drained segments first (no lock held while waiting).
        if let Some(sender) = lock(&self.inner.tx).clone() {
            let (reply, done) = mpsc::sync_channel(1);
            if sender.send(Message::SealDrained(reply)).is_ok() {
                let _ = done.recv();
            }
        }
        let released = {
            let db = self.db();
            crate::leases::release_orphaned(&db, &self.inner.shared.state_dir, &self.inner.owner)?
        };
        let mut report = self.delete_delivered()?;
        report.leases_released = released;
        Ok(report)
    }

    /// Deletes the segment files every sink has confirmed, as [`Staging::cleanup`] does, without
    /// asking this process's writer to close the segment it is filling first: a long drain calls
    /// it between batches to free space as it goes, and closing the segment being written at
    /// every call would cut it into small files.
    pub fn delete_delivered(&self) -> Result<CleanupReport, StoreError> {
        let report = crate::recover::cleanup(self, CLIENT_KEY_TTL)?;
        if report.bytes_freed > 0 {
            self.inner.shared.set_blocked(None);
        }
        Ok(report)
    }

    /// Adopts JSON files written into the tree in the old seed layout; `admit` gives each
    /// record's key and sinks, or refuses it (the file is then set aside).
    pub fn adopt_foreign(
        &self,
        admit: crate::adopt::Admit<'_>,
        quiet: Duration,
    ) -> Result<AdoptReport, StoreError> {
        crate::adopt::adopt(self, self.root(), "adopt", admit, quiet)
    }

    /// The same for an inbox folder outside the store (`INBOX_PATH`) where other programs drop
    /// files in the same layout; each is removed once staged.
    pub fn adopt_inbox(
        &self,
        inbox: &Path,
        admit: crate::adopt::Admit<'_>,
        quiet: Duration,
    ) -> Result<AdoptReport, StoreError> {
        crate::adopt::adopt(self, inbox, "inbox", admit, quiet)
    }
}
