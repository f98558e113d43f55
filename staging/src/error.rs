//! The store's error types: one per boundary, with variants callers can match.

use std::path::PathBuf;

/// Why a stage call was refused. Nothing of a refused call is on disk or in the index.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The record itself is wrong (bad name, key too long, payload not JSON).
    #[error("invalid record: {0}")]
    Invalid(String),
    /// The staging size limit or the minimum free disk space would be crossed.
    /// Delivery frees space; staging resumes by itself once there is room.
    #[error(
        "staging is full: {0}; records already staged are safe and are still being delivered, and staging resumes by itself once there is room"
    )]
    Full(String),
    /// The same client idempotency key was used before with another body.
    #[error(
        "idempotency key {0:?} was already used with a different body; send the same body again or choose a new key"
    )]
    Conflict(String),
    /// A record names a sink the store does not know.
    #[error("unknown sink {0:?}; configured sinks are: {1}")]
    UnknownSink(String, String),
    /// A flush to disk failed earlier; the kernel may have dropped the data, so the store
    /// accepts nothing more until it is reopened.
    #[error(
        "staging is stopped after a failed disk flush ({0}); check the disk and restart estafeta"
    )]
    Poisoned(String),
    /// The store is closing.
    #[error("staging is shutting down; send the record again once estafeta runs again")]
    Closed,
    /// Writing the record failed; the store is poisoned from now on.
    #[error(
        "could not write to staging at {path}: {source}{}; check the disk, then restart estafeta (staging accepts nothing until it is reopened)",
        io_hint(source)
    )]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Errors of the index, the folder and the delivery API.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or folder could not be read or written.
    #[error("{action} {path}: {source}{}", io_hint(source))]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The SQLite index failed.
    #[error(
        "staging index: {0}; the index is only a cache of the folder: if this persists, stop the daemon and run `estafeta reindex` to rebuild it"
    )]
    Index(#[from] rusqlite::Error),
    /// A record the index points at is not where it should be.
    #[error(
        "record {what} is damaged or missing: {reason}; delivery sets such records aside in _failed/_damaged with the reason, and `estafeta reindex` (daemon stopped) rebuilds the index from the folder"
    )]
    Damaged { what: String, reason: String },
    /// No record with this id, sequence or path.
    #[error(
        "no record {0} in staging; `estafeta ls` lists the records it holds, `estafeta ls --failed` the dead letters"
    )]
    NotFound(String),
    /// A dead letter asked to be sent now is not the first record its key still owes the
    /// sink: sending it would overtake `earlier`.
    #[error(
        "record {seq} waits behind the earlier record {earlier} of its key for sink {sink:?}; send that one first (`estafeta ls --failed` lists the dead letters)"
    )]
    NotHead {
        seq: u64,
        earlier: u64,
        sink: String,
    },
    /// A sink name the store cannot keep (empty, or with a comma: the index lists a record's
    /// sinks comma-separated).
    #[error(
        "unusable sink name {0:?}: a sink name is not empty and has no comma; rename the sink in the configuration"
    )]
    UnknownSink(String),
    /// A source name that cannot name a file (it must be `[a-z0-9_-]`, as the configuration
    /// checks).
    #[error("unusable source name: {0}; rename the source in the configuration")]
    SourceName(String),
    /// A staging file was written in a format newer than this version reads. An update that
    /// was rolled back leaves such files behind; they are left as they are.
    #[error(
        "{path} was written by a newer Estafeta (format {found}; this version reads format {supported}): run that version, or `estafeta update` to it; an update rolled back leaves such files, and they wait untouched for the newer version"
    )]
    NewerFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// The folder holds data sealed with keys this process was not given. Nothing was changed.
    #[error(
        "{what} is encrypted with key {kids} and {why}: set STAGING_KEY_FILE to the key file that holds that key and start again (nothing in the staging folder was changed)"
    )]
    KeyNeeded {
        what: String,
        kids: String,
        why: String,
    },
    /// Another process holds what this operation needs; the text says which and what to do.
    #[error("{0}")]
    Busy(String),
    /// A file given by its path is not the kind of staging file it was read as.
    #[error("{path} is not a {expected}: {reason}")]
    NotStagingFile {
        path: PathBuf,
        expected: &'static str,
        reason: String,
    },
}

impl StoreError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        StoreError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// What to do next for the I/O errors a person can fix: a full disk or missing permissions.
fn io_hint(source: &std::io::Error) -> &'static str {
    match source.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
            " (the disk is full: free space on it, or move STAGING_AREA_PATH to a larger disk)"
        }
        std::io::ErrorKind::PermissionDenied => {
            " (permission denied: run estafeta as the user that owns the staging folder, `estafeta` for the installed service)"
        }
        std::io::ErrorKind::ReadOnlyFilesystem => {
            " (the file system is read-only: remount it read-write)"
        }
        _ => "",
    }
}
