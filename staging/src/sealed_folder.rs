//! Which keys a staging folder needs. `_state/sealed-with` lists the ids (never the keys) of
//! every key that may have sealed something in the folder. Open reads it before touching
//! anything: a process without those keys is refused there, so it changes nothing on disk (no
//! index created, no line taken for damage, no dead letter removed). The list only grows while
//! processes run; [`keys_in_use`] finds what the folder really uses, for `estafeta key prune`.

use std::collections::BTreeSet;
use std::path::Path;

use crate::crypt::Keyring;
use crate::error::StoreError;
use crate::layout;

/// The file under `_state/`.
pub const MARKER: &str = "sealed-with";

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Marker {
    keys: BTreeSet<String>,
}

fn read(state_dir: &Path) -> Result<Option<Marker>, StoreError> {
    let path = state_dir.join(MARKER);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            StoreError::NotStagingFile {
                path,
                expected: "list of key ids",
                reason: format!(
                    "{e}; it says which keys sealed this folder: restore it from a backup, or delete it if no key was ever used here"
                ),
            }
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io("read", path, e)),
    }
}

/// Refuses, before anything is written, to open a folder sealed with keys not given.
pub fn check(state_dir: &Path, keys: Option<&Keyring>) -> Result<(), StoreError> {
    let Some(marker) = read(state_dir)? else {
        return Ok(());
    };
    let missing: Vec<&String> = marker
        .keys
        .iter()
        .filter(|id| !keys.is_some_and(|k| k.has(id)))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let kids = missing
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let why = match keys {
        None => "no key file was given (STAGING_KEY_FILE is not set)".to_string(),
        Some(k) => format!(
            "the key file given holds only {} (a wrong or older key file)",
            k.ids().join(", ")
        ),
    };
    Err(StoreError::KeyNeeded {
        what: format!(
            "the staging folder {}",
            state_dir.parent().unwrap_or(state_dir).display()
        ),
        kids,
        why,
    })
}

/// Adds the current key to the list before anything is sealed with it (a new segment, a dead
/// letter), not at open: a process opened with a wrong key that seals nothing must not make
/// the folder ask for that key.
pub fn note_current(state_dir: &Path, keys: &Keyring) -> Result<(), StoreError> {
    let mut marker = read(state_dir)?.unwrap_or_default();
    if marker.keys.insert(keys.current_id().to_owned()) {
        write(state_dir, &marker)?;
    }
    Ok(())
}

fn write(state_dir: &Path, marker: &Marker) -> Result<(), StoreError> {
    let path = state_dir.join(MARKER);
    let mut bytes = serde_json::to_vec_pretty(marker).expect("ids serialize");
    bytes.push(b'\n');
    layout::write_file_durable(&path, &bytes).map_err(|e| StoreError::io("write", &path, e))
}

/// Replaces the list with `ids` (after [`keys_in_use`], by `estafeta key prune`).
pub fn set(state_dir: &Path, ids: &BTreeSet<String>) -> Result<(), StoreError> {
    write(state_dir, &Marker { keys: ids.clone() })
}

/// The key ids the folder's files and index use now: each segment's sealed lines, the live
/// data keys of `_state/data-keys`, each dead letter, each sealed text in the index.
pub fn keys_in_use(
    root: &Path,
    failed_dir: &Path,
    conn: &rusqlite::Connection,
) -> Result<BTreeSet<String>, StoreError> {
    let mut ids = BTreeSet::new();
    for dir in [root, failed_dir] {
        for file in layout::walk_day_files(dir).map_err(|e| StoreError::io("read", dir, e))? {
            let bytes = std::fs::read(&file).map_err(|e| StoreError::io("read", &file, e))?;
            ids.extend(find_kids(&bytes));
        }
    }
    // Refused source rows and source notes, sealed whole (sealed_file.rs).
    for dir in [
        failed_dir.join(crate::REFUSED_DIR),
        root.join(layout::STATE_DIR).join("source-notes"),
    ] {
        for file in files_under(&dir) {
            let bytes = std::fs::read(&file).map_err(|e| StoreError::io("read", &file, e))?;
            ids.extend(find_kids(&bytes));
        }
    }
    let slots = crate::data_keys::DataKeySlots::new(&root.join(layout::STATE_DIR));
    ids.extend(
        slots
            .kids()
            .map_err(|e| StoreError::io("read", root.join(layout::STATE_DIR), e))?,
    );
    for sql in [
        "SELECT last_error FROM deliveries WHERE last_error LIKE 'sealed:%'",
        "SELECT last_error FROM sinks WHERE last_error LIKE 'sealed:%'",
        "SELECT last_error FROM sources WHERE last_error LIKE 'sealed:%'",
    ] {
        let mut stmt = conn.prepare(sql)?;
        for text in stmt.query_map([], |r| r.get::<_, String>(0))? {
            if let Some(kid) = text?.split(':').nth(2) {
                ids.insert(kid.to_owned());
            }
        }
    }
    Ok(ids)
}

/// Every file under `dir`, at any depth (none when it does not exist).
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// Every `"kid":"…"` in a file (lines and letters) and every `sealed:v1:<kid>:` text.
fn find_kids(bytes: &[u8]) -> BTreeSet<String> {
    let text = String::from_utf8_lossy(bytes);
    let mut out = BTreeSet::new();
    for marker in ["\"kid\":\"", "\"kid\": \"", "sealed:v1:"] {
        for (at, _) in text.match_indices(marker) {
            let rest = &text[at + marker.len()..];
            let id: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if id.starts_with("k-") {
                out.insert(id);
            }
        }
    }
    out
}
