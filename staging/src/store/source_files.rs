//! Files a SQL source keeps beside the store, outside the index:
//!
//! - **Refused rows** (`<failed>/_refused/<source>/<checkpoint>.json`): a row the agent could
//!   not turn into a record (a value it cannot read, a record its entity's schema refuses). It
//!   is not a record, so it has no sequence number and no sink: it is kept here, durably and
//!   readable, with the reason, before the source's checkpoint moves past it. Its name comes
//!   from the row's checkpoint value, so reading the row again after a crash rewrites the same
//!   file rather than adding a second one.
//! - **Notes** (`_state/source-notes/<source>.json`): a small opaque document the agent writes
//!   before a page is staged and removes once the page's `after_stage` statement ran, so that a
//!   crash in between runs the statement again at the next cycle.
//!
//! With encryption at rest on, both are sealed whole (sealed_file.rs), and a refused row's file
//! is named by a keyed hash of its checkpoint instead of the checkpoint itself.

use std::path::{Path, PathBuf};

use chrono::Utc;

use crate::layout;
use crate::*;

use super::Staging;

/// Folder of the refused source rows, under the dead-letter folder.
pub const REFUSED_DIR: &str = "_refused";
/// Longest file name part taken from a checkpoint value, in bytes.
const MAX_NAME_PART: usize = 120;

/// One refused row as written and as listed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RefusedRow {
    /// The source that read it.
    pub source: String,
    /// Its checkpoint value(s), JSON text: `sources reset --to` with it reads it again.
    pub checkpoint: String,
    /// Why it could not become a record.
    pub reason: String,
    /// When it was set aside (RFC 3339, UTC).
    pub refused_at: String,
    /// Its columns as far as they could be read (patient data: the file is the agent's only).
    pub row: serde_json::Value,
    /// The row was read whole, so the agent can make its record again from this file once the
    /// mapping (or schema) that refused it is fixed. False for a value that could not be read,
    /// and for files written before this field existed.
    #[serde(default)]
    pub replayable: bool,
}

/// What [`crate::sealed_file`] binds a refused row's file to.
const REFUSED_WHAT: &str = "refused source row";
const NOTE_WHAT: &str = "source note";

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl RefusedRow {
    /// Reads a plain refused-row file; the error says what was expected.
    pub fn read(path: &Path) -> Result<RefusedRow, StoreError> {
        Self::read_with_keys(path, None)
    }

    /// Reads a refused-row file, opening it with `keys` when it is sealed.
    pub fn read_with_keys(path: &Path, keys: Option<&Keyring>) -> Result<RefusedRow, StoreError> {
        let bytes = std::fs::read(path).map_err(|e| StoreError::io("read", path, e))?;
        let bytes = crate::sealed_file::open(keys, REFUSED_WHAT, &file_name(path), bytes)
            .map_err(|e| key_error(path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| StoreError::NotStagingFile {
            path: path.to_path_buf(),
            expected: "refused source row",
            reason: format!(
                "expected a JSON object with source, checkpoint, reason, refused_at and row ({e})"
            ),
        })
    }
}

impl Staging {
    /// Sets a source row aside with its reason, durably, and returns the file's path.
    pub fn refuse_source_row(
        &self,
        source: &str,
        checkpoint: &str,
        reason: &str,
        row: serde_json::Value,
        replayable: bool,
    ) -> Result<PathBuf, StoreError> {
        validate_name("source", source).map_err(|e| StoreError::SourceName(e.to_string()))?;
        let name = match self.keys() {
            // A checkpoint can be a patient's id: sealed folders name the file by its hash.
            Some(keys) => file_part(&keys.hash(checkpoint)),
            None => file_part(checkpoint),
        };
        let path = self
            .failed_dir()
            .join(REFUSED_DIR)
            .join(source)
            .join(format!("{name}.json"));
        let doc = RefusedRow {
            source: source.to_owned(),
            checkpoint: checkpoint.to_owned(),
            reason: reason.to_owned(),
            refused_at: layout::rfc3339(Utc::now()),
            row,
            replayable,
        };
        let mut bytes = serde_json::to_vec_pretty(&doc).expect("refused rows serialize");
        bytes.push(b'\n');
        if let Some(keys) = self.keys() {
            bytes = crate::sealed_file::seal(keys, REFUSED_WHAT, &file_name(&path), &bytes);
        }
        layout::write_file_durable(&path, &bytes).map_err(|e| StoreError::io("write", &path, e))?;
        Ok(path)
    }

    /// The refused rows of `source`, in file name order; files that cannot be read are skipped.
    pub fn refused_rows(&self, source: &str) -> Result<Vec<RefusedRow>, StoreError> {
        let dir = self.failed_dir().join(REFUSED_DIR).join(source);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::io("read", &dir, e)),
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("json"))
            .collect();
        paths.sort();
        Ok(paths
            .iter()
            .filter_map(|p| RefusedRow::read_with_keys(p, self.keys()).ok())
            .collect())
    }

    /// Every refused row of every source with its file, oldest first (by `refused_at`), at most
    /// `limit`; files that cannot be read are skipped.
    pub fn refused_row_files(
        &self,
        limit: Option<usize>,
    ) -> Result<Vec<(PathBuf, RefusedRow)>, StoreError> {
        let root = self.failed_dir().join(REFUSED_DIR);
        let sources = match std::fs::read_dir(&root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::io("read", &root, e)),
        };
        let mut out = Vec::new();
        for dir in sources.filter_map(|e| e.ok().map(|e| e.path())) {
            let Ok(files) = std::fs::read_dir(&dir) else {
                continue;
            };
            for path in files.filter_map(|e| e.ok().map(|e| e.path())) {
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                if let Ok(row) = RefusedRow::read_with_keys(&path, self.keys()) {
                    out.push((path, row));
                }
            }
        }
        out.sort_by(|a, b| (&a.1.refused_at, &a.0).cmp(&(&b.1.refused_at, &b.0)));
        if let Some(limit) = limit {
            out.truncate(limit);
        }
        Ok(out)
    }

    /// Removes a refused row's file, durably, once its record is staged (`estafeta retry
    /// --send`). Only a file directly under `<failed>/_refused/<source>/` is removed.
    pub fn remove_refused_row(&self, path: &Path) -> Result<(), StoreError> {
        let root = self.failed_dir().join(REFUSED_DIR);
        let inside = path
            .parent()
            .and_then(Path::parent)
            .is_some_and(|p| same_dir(p, &root));
        if !inside || path.extension().and_then(|e| e.to_str()) != Some("json") {
            return Err(StoreError::NotStagingFile {
                path: path.to_path_buf(),
                expected: "refused source row",
                reason: format!("it is not a .json file under {}", root.display()),
            });
        }
        std::fs::remove_file(path).map_err(|e| StoreError::io("remove", path, e))?;
        layout::sync_dir(path.parent().unwrap_or(Path::new(".")))
            .map_err(|e| StoreError::io("sync", path, e))
    }

    /// The note `source` left, if any.
    pub fn source_note(&self, source: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.note_path(source)?;
        match std::fs::read(&path) {
            Ok(bytes) => crate::sealed_file::open(self.keys(), NOTE_WHAT, &file_name(&path), bytes)
                .map(Some)
                .map_err(|e| key_error(&path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("read", &path, e)),
        }
    }

    /// Writes (durably) or, with `None`, removes the note of `source`.
    pub fn set_source_note(&self, source: &str, note: Option<&[u8]>) -> Result<(), StoreError> {
        let path = self.note_path(source)?;
        match note {
            Some(bytes) => {
                let sealed;
                let bytes = match self.keys() {
                    Some(keys) => {
                        sealed =
                            crate::sealed_file::seal(keys, NOTE_WHAT, &file_name(&path), bytes);
                        &sealed[..]
                    }
                    None => bytes,
                };
                layout::write_file_durable(&path, bytes)
                    .map_err(|e| StoreError::io("write", &path, e))
            }
            None => match std::fs::remove_file(&path) {
                Ok(()) => layout::sync_dir(path.parent().unwrap_or(Path::new(".")))
                    .map_err(|e| StoreError::io("sync", &path, e)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(StoreError::io("remove", &path, e)),
            },
        }
    }

    fn note_path(&self, source: &str) -> Result<PathBuf, StoreError> {
        validate_name("source", source).map_err(|e| StoreError::SourceName(e.to_string()))?;
        Ok(self
            .inner
            .shared
            .state_dir
            .join("source-notes")
            .join(format!("{source}.json")))
    }
}

/// A sealed file that cannot be opened: a key not given (never damage), or damage.
fn key_error(path: &Path, e: crate::crypt::KeyError) -> StoreError {
    match e {
        crate::crypt::KeyError::Missing(kid) => StoreError::KeyNeeded {
            what: path.display().to_string(),
            kids: kid,
            why: "no key file holding it was given (STAGING_KEY_FILE)".into(),
        },
        other => StoreError::NotStagingFile {
            path: path.to_path_buf(),
            expected: "sealed file",
            reason: other.to_string(),
        },
    }
}

/// Whether two paths name the same folder (either may be relative or hold `..`).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// A checkpoint's JSON text as a file name: `[1500]` → `1500`, other characters than letters,
/// digits, `-` and `.` as `_`, cut to [`MAX_NAME_PART`] bytes.
fn file_part(checkpoint: &str) -> String {
    let inner = checkpoint
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let mut out: String = inner
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    out.truncate(MAX_NAME_PART);
    if out.is_empty() || out.starts_with('.') {
        out.push('_');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::file_part;

    #[test]
    fn checkpoints_become_plain_file_names() {
        assert_eq!(file_part("[1500]"), "1500");
        assert_eq!(
            file_part("[\"2026-11-23T10:00:00\",7]"),
            "_2026-11-23T10_00_00__7"
        );
        assert_eq!(file_part("[\"../x\"]"), "_.._x_");
    }
}
