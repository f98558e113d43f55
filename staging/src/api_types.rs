//! Plain data the store's queries return: listings, status, reports.

use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

use crate::record::State;

/// How to open a store.
#[derive(Debug, Clone)]
pub struct Options {
    /// The staging folder; created 0700 if missing.
    pub root: PathBuf,
    /// Dead letters; `None`: `<root>/_failed`.
    pub failed_dir: Option<PathBuf>,
    /// Sink names records are routed to by default. May be empty for read-only tools.
    pub sinks: Vec<String>,
    /// Largest total size of the segment files, in bytes; `None`: no limit.
    pub max_bytes: Option<u64>,
    /// Staging stops accepting writes when the disk has less free space than this, in bytes.
    /// Default [`crate::DEFAULT_MIN_FREE_BYTES`].
    pub min_free_bytes: u64,
    /// How long a batch handed out by `next_batch` stays leased to its deliverer.
    /// Default [`crate::DEFAULT_LEASE`].
    pub lease: Duration,
    /// How long delivered records stay on disk. Default zero: deleted once every sink has them.
    pub keep_delivered: Duration,
    /// A segment file is closed and a new one started past this size, in bytes.
    /// Default [`crate::DEFAULT_SEGMENT_MAX_BYTES`].
    pub segment_max_bytes: u64,
    /// Encryption at rest: with a key file's keys, everything written from now on is sealed
    /// (see `crypt.rs`); `None`: written in clear, and a folder that holds sealed data is
    /// refused at open, untouched.
    pub keys: Option<std::sync::Arc<crate::Keyring>>,
}

impl Options {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            failed_dir: None,
            sinks: Vec::new(),
            max_bytes: None,
            min_free_bytes: crate::DEFAULT_MIN_FREE_BYTES,
            lease: crate::DEFAULT_LEASE,
            keep_delivered: Duration::ZERO,
            segment_max_bytes: crate::DEFAULT_SEGMENT_MAX_BYTES,
            keys: None,
        }
    }

    /// Seals everything written with `keys` (and opens what they sealed).
    pub fn with_keys(mut self, keys: std::sync::Arc<crate::Keyring>) -> Self {
        self.keys = Some(keys);
        self
    }

    pub fn with_sinks<I, S>(mut self, sinks: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.sinks = sinks.into_iter().map(Into::into).collect();
        self
    }
}

/// What opening the store found and repaired.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OpenReport {
    /// The index was missing or unreadable and was rebuilt from the folder.
    pub index_rebuilt: bool,
    /// Why the index was rebuilt, when it was.
    pub rebuild_reason: Option<String>,
    /// Records found in segment files that the index did not know yet (after a crash).
    pub records_recovered: u64,
    /// Incomplete last lines cut from segment files (never acknowledged writes).
    pub torn_tails_repaired: u64,
    /// Damaged lines or files moved aside, with where they went.
    pub moved_aside: Vec<MovedAside>,
    /// Records leased by deliverers that are no longer running, given back.
    pub leases_released: u64,
    /// Dead letters a crash left behind after their record was put back in line (see
    /// `dead::remove_stale_letters`), removed.
    pub stale_dead_letters_removed: u64,
}

/// A damaged piece of the folder and where it was put.
#[derive(Debug, Clone, Serialize)]
pub struct MovedAside {
    pub from: PathBuf,
    pub to: PathBuf,
    pub reason: String,
}

/// Filter for [`crate::Staging::list`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub action: Option<String>,
    pub entity: Option<String>,
    /// Only records with at least one dead delivery.
    pub dead_only: bool,
    /// Include records every sink has (kept by `keep_delivered`).
    pub include_delivered: bool,
    pub limit: Option<usize>,
}

/// One record's state for one sink.
#[derive(Debug, Clone, Serialize)]
pub struct SinkState {
    pub sink: String,
    pub state: State,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// RFC 3339 UTC.
    pub next_attempt_at: Option<String>,
}

/// A record as `ls` and `show` see it.
#[derive(Debug, Clone, Serialize)]
pub struct RecordInfo {
    pub id: String,
    pub seq: u64,
    pub action: String,
    pub entity: String,
    pub key: Option<String>,
    pub staged_at: String,
    pub path: PathBuf,
    /// The least advanced state over its sinks (pending before delivered).
    pub state: State,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub sinks: Vec<SinkState>,
}

/// Counts per sink and per action/entity.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Status {
    pub root: PathBuf,
    pub records_pending: u64,
    pub bytes_staged: u64,
    pub disk_free_bytes: Option<u64>,
    /// Why staging refuses writes right now (full disk, size limit, poisoned), if it does.
    pub staging_blocked: Option<String>,
    pub sinks: Vec<SinkStatus>,
    pub groups: Vec<GroupStatus>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct SinkStatus {
    pub sink: String,
    pub pending: u64,
    pub in_flight: u64,
    pub dead: u64,
    /// RFC 3339 UTC staged time of the oldest record not yet delivered to this sink.
    pub oldest_pending_staged_at: Option<String>,
    pub oldest_pending_age_secs: Option<i64>,
    pub last_success_at: Option<String>,
    pub last_failure_at: Option<String>,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<String>,
    /// Records delivered to this sink per second over the last minute, as the running agent
    /// counted them. The store does not keep it: `None` here, filled in by the agent's
    /// `GET /v1/status` (and by `estafeta status` when an agent answers it).
    pub drain_rate_per_sec: Option<f64>,
    /// Seconds until the records not yet delivered (pending and in flight) are delivered at
    /// `drain_rate_per_sec`; `None` while that rate is zero (not draining) or unknown.
    pub time_to_empty_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct GroupStatus {
    pub action: String,
    pub entity: String,
    pub pending: u64,
    pub dead: u64,
    pub oldest_pending_age_secs: Option<i64>,
}

/// A dead letter file under `_failed/`.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub path: PathBuf,
    pub id: String,
    pub seq: u64,
    pub sink: String,
    pub action: String,
    pub entity: String,
    pub key: Option<String>,
    pub reason: String,
    pub attempts: u32,
    pub failed_at: String,
}

/// What [`crate::Staging::cleanup`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CleanupReport {
    pub segments_deleted: u64,
    pub bytes_freed: u64,
    pub records_forgotten: u64,
    /// Records leased by deliverers that are no longer running, given back.
    pub leases_released: u64,
    /// Dead letters a crash left behind after their record was put back in line (see
    /// `dead::remove_stale_letters`), removed.
    pub stale_dead_letters_removed: u64,
}

/// What [`crate::Staging::adopt_foreign`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AdoptReport {
    pub adopted: u64,
    /// Files left for later because they changed too recently (maybe still being written).
    pub waiting: u64,
    pub moved_aside: Vec<MovedAside>,
}

/// A source's checkpoint and last run, as `estafeta sources` shows them.
#[derive(Debug, Clone, Serialize, Default, PartialEq, Eq)]
pub struct SourceState {
    pub name: String,
    /// JSON text of the last row's checkpoint column(s); `None` before the first row.
    pub checkpoint: Option<String>,
    /// RFC 3339 UTC.
    pub last_run_at: Option<String>,
    /// Rows the last cycle read.
    pub last_rows: Option<u64>,
    pub last_error: Option<String>,
}
