//! Adopting foreign files: JSON payloads that other programs write straight into the staging
//! tree in the old layout of the RHP seed, `<action>/<entity>/<yyyy>/<mm>/<dd>/<timestamp>.json`
//! (raw payload, no envelope). Each complete file is staged in the order of its timestamp and
//! then removed; a file still being written waits; a file that is not JSON, or whose record the
//! agent refuses (its JSON Schema), moves to the dead-letter folder with the reason beside it.
//!
//! The store knows nothing of routes, keys or schemas: for each file it asks the agent through
//! an [`Admit`] hook, the same intake that HTTP bodies and `estafeta stage` go through, so a file
//! reaches the same sinks as the same record posted to the API.
//!
//! Exactly once: each file is staged with a client idempotency key made of its path and a
//! digest of its bytes, so a crash between staging and removing it never stages it twice.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::api_types::{AdoptReport, MovedAside};
use crate::error::{StageError, StoreError};
use crate::layout;
use crate::record::{ClientKey, NewRecord, validate_name};
use crate::store::Staging;

/// The agent's verdict on one adopted record: its key, and the sinks it goes to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admission {
    /// The record key (per-key order at the sinks); `None`: ordered per entity.
    pub key: Option<String>,
    /// The sinks the record goes to; `None`: every sink the store was opened with.
    pub sinks: Option<Vec<String>>,
}

/// Asked once per file before it is staged, with `(action, entity, payload)`: the record's
/// [`Admission`], or why it is refused (a sentence saying what to fix), in which case the file
/// is set aside in the dead-letter folder with that reason beside it, never dropped.
pub type Admit<'a> = &'a dyn Fn(&str, &str, &serde_json::Value) -> Result<Admission, String>;

/// Adopts the files under `root`: the staging tree itself, or an inbox folder (`INBOX_PATH`)
/// laid out the same way. `label` tells their idempotency keys apart.
pub fn adopt(
    store: &Staging,
    root: &Path,
    label: &str,
    admit: Admit<'_>,
    quiet: Duration,
) -> Result<AdoptReport, StoreError> {
    let root = root.to_path_buf();
    let mut candidates: Vec<_> = layout::walk_day_files(&root)
        .map_err(|e| StoreError::io("read", &root, e))?
        .into_iter()
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("json"))
        .collect();
    // The seed names files by local time, %Y%m%d%H%M%S%f: sort by name across all folders,
    // so a create and a later update of one record are staged in the order they were made.
    candidates.sort_by(|a, b| a.file_name().cmp(&b.file_name()).then(a.cmp(b)));

    let mut report = AdoptReport::default();
    let now = SystemTime::now();
    for path in candidates {
        let modified = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .unwrap_or(now);
        let settled = now.duration_since(modified).unwrap_or_default() >= quiet;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(StoreError::io("read", &path, e)),
        };
        let Some((action, entity)) = layout::action_entity_of(&root, &path) else {
            continue;
        };
        let parsed: Result<serde_json::Value, String> =
            if bytes.iter().all(|b| b.is_ascii_whitespace()) {
                Err("the file is empty".into())
            } else {
                serde_json::from_slice(&bytes).map_err(|e| e.to_string())
            };
        let value = match parsed {
            Ok(v) if settled => v,
            // Maybe still being written: wait, and keep later files back to keep the order.
            _ if !settled => {
                report.waiting += 1;
                break;
            }
            Ok(_) => unreachable!("settled handled above"),
            Err(reason) => {
                report.moved_aside.push(move_aside(
                    store,
                    &root,
                    &path,
                    &format!("not valid JSON: {reason}"),
                )?);
                continue;
            }
        };
        if let Err(e) = validate_name("action", &action).and(validate_name("entity", &entity)) {
            report
                .moved_aside
                .push(move_aside(store, &root, &path, &e.to_string())?);
            continue;
        }
        let admission = match admit(&action, &entity, &value) {
            Ok(admission) => admission,
            Err(reason) => {
                report
                    .moved_aside
                    .push(move_aside(store, &root, &path, &reason)?);
                continue;
            }
        };
        let rel = layout::rel_string(&root, &path);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let mut record =
            NewRecord::new(&action, &entity, admission.key, text.trim()).map_err(|e| {
                StoreError::Damaged {
                    what: rel.clone(),
                    reason: e.to_string(),
                }
            })?;
        record.sinks = admission.sinks;
        let client_key = ClientKey {
            key: format!("{label}:{rel}"),
            fingerprint: format!("crc32:{:08x}:{}", crc32fast::hash(&bytes), bytes.len()),
        };
        match store.stage_batch(vec![record], Some(client_key)) {
            Ok(_) => {}
            Err(StageError::Full(reason)) => {
                tracing::warn!(file = %rel, reason = %reason, "Staging is full; foreign files wait.");
                report.waiting += 1;
                break;
            }
            Err(StageError::Conflict(_)) => {
                // Same path adopted before with other content: a new file reused the name.
                report.moved_aside.push(move_aside(
                    store,
                    &root,
                    &path,
                    "a file with this name was adopted before with different content",
                )?);
                continue;
            }
            Err(e) => {
                return Err(StoreError::Damaged {
                    what: rel,
                    reason: e.to_string(),
                });
            }
        }
        layout::remove_file_durable(&path).map_err(|e| StoreError::io("remove", &path, e))?;
        if let Some(dir) = path.parent() {
            layout::prune_empty_dirs(&root, dir);
        }
        report.adopted += 1;
    }
    Ok(report)
}

/// Moves a foreign file to the same place under the dead-letter folder, with a
/// `<name>.error.txt` beside it saying why.
fn move_aside(
    store: &Staging,
    root: &Path,
    path: &Path,
    reason: &str,
) -> Result<MovedAside, StoreError> {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let to = store.failed_dir().join(rel);
    if let Some(dir) = to.parent() {
        layout::create_dir_durable(dir).map_err(|e| StoreError::io("create folder", dir, e))?;
    }
    std::fs::rename(path, &to).map_err(|e| StoreError::io("move", path, e))?;
    let mut note = to.as_os_str().to_owned();
    note.push(".error.txt");
    layout::write_file_durable(Path::new(&note), format!("{reason}\n").as_bytes())
        .map_err(|e| StoreError::io("write", Path::new(&note), e))?;
    if let Some(dir) = path.parent() {
        let _ = layout::sync_dir(dir);
        layout::prune_empty_dirs(root, dir);
    }
    tracing::warn!(file = %path.display(), moved_to = %to.display(), reason, "Moved a foreign file aside.");
    Ok(MovedAside {
        from: path.to_path_buf(),
        to,
        reason: reason.to_string(),
    })
}
