//! Sources' checkpoints kept outside the index too. A checkpoint travels in the segment with
//! the records it produced (see `Envelope::source`), so a rebuilt index gets it back from
//! there; but cleanup deletes delivered segments, and with them the marks. So before cleanup
//! deletes anything, and after a reset, the index's checkpoints are written to
//! `_state/sources.json` (atomically, durably), and an opening store takes from that file any
//! checkpoint newer (by seq) than what the segments gave it. The text is copied as the index
//! holds it: sealed when the store seals.

use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::StoreError;
use crate::layout;

const FILE: &str = "sources.json";

#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    name: String,
    checkpoint: Option<String>,
    checkpoint_seq: i64,
}

/// Writes every source's checkpoint to `_state/sources.json`. Nothing to write, nothing done.
pub fn save(conn: &Connection, state_dir: &Path) -> Result<(), StoreError> {
    let saved: Vec<Saved> = {
        let mut stmt =
            conn.prepare("SELECT name, checkpoint, checkpoint_seq FROM sources ORDER BY name")?;
        stmt.query_map([], |r| {
            Ok(Saved {
                name: r.get(0)?,
                checkpoint: r.get(1)?,
                checkpoint_seq: r.get(2)?,
            })
        })?
        .collect::<Result<_, _>>()?
    };
    if saved.is_empty() {
        return Ok(());
    }
    let path = state_dir.join(FILE);
    let text = serde_json::to_vec_pretty(&saved).expect("checkpoints serialize");
    layout::write_file_durable(&path, &text).map_err(|e| StoreError::io("write", &path, e))
}

/// Takes from `_state/sources.json` every checkpoint newer than the index's.
pub fn restore(conn: &Connection, state_dir: &Path) -> Result<(), StoreError> {
    let path = state_dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io("read", &path, e)),
    };
    let saved: Vec<Saved> = match serde_json::from_slice(&bytes) {
        Ok(saved) => saved,
        Err(err) => {
            // The segments still hold the newest marks; the file only covers cleaned ones.
            tracing::warn!(file = %path.display(), error = %err, "Ignoring an unreadable sources checkpoint file.");
            return Ok(());
        }
    };
    for s in saved {
        conn.execute(
            "INSERT INTO sources (name, checkpoint, checkpoint_seq) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET checkpoint = excluded.checkpoint,
                                             checkpoint_seq = excluded.checkpoint_seq
              WHERE excluded.checkpoint_seq > sources.checkpoint_seq",
            params![s.name, s.checkpoint, s.checkpoint_seq],
        )?;
    }
    Ok(())
}
