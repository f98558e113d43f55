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
    #[error("staging is shutting down")]
    Closed,
    /// Writing the record failed; the store is poisoned from now on.
    #[error("could not write to staging at {path}: {source}")]
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
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The SQLite index failed.
    #[error("staging index: {0}")]
    Index(#[from] rusqlite::Error),
    /// A record the index points at is not where it should be.
    #[error("record {what} is damaged or missing: {reason}")]
    Damaged { what: String, reason: String },
    /// No record with this id, sequence or path.
    #[error("no record {0} in staging")]
    NotFound(String),
    /// A record in a folder names a sink the store was not opened with.
    #[error("unknown sink {0:?}")]
    UnknownSink(String),
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
