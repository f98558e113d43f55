//! Dead letters and damaged records. A record a sink refused for good gets one readable JSON
//! file under `<failed>/<action>/<entity>/<yyyy>/<mm>/<dd>/`, holding the envelope, the sink,
//! the reason and the attempts; `requeue` puts it back in line with its original sequence
//! number. Bytes the store cannot trust (bad checksum, cut files) go to `<failed>/_damaged/`
//! with the reason, and stop holding back the records after them.

use chrono::Utc;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::api_types::DeadLetter;
use crate::crypt::Keyring;
use crate::error::StoreError;
use crate::layout;
use crate::record::Envelope;
use crate::store::{Shared, Staging};

/// The content of a dead-letter file: one pretty-printed JSON object, whose format version is
/// its record's `v`. Read one back with [`DeadLetterFile::read`] (or [`Staging::dead_letter`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct DeadLetterFile {
    /// The sink that refused the record.
    pub sink: String,
    /// Why it refused it (its last error).
    pub reason: String,
    /// Delivery attempts, the refused one included.
    pub attempts: u32,
    /// When the record was declared dead (RFC 3339, UTC).
    pub failed_at: String,
    /// The segment holding the record, relative to the staging root.
    pub segment: String,
    /// The record, envelope and payload.
    pub record: Envelope,
}

/// Only the format version of a dead letter, read before the rest: a newer format may have a
/// shape this version cannot read.
#[derive(Deserialize)]
struct LetterVersion {
    record: crate::segment::FormatVersion,
}

/// A dead letter as it is on disk: its record plain or sealed (`segment::DiskRecord`), its
/// reason plain or sealed (`crypt::Keyring::seal_text`).
#[derive(Deserialize)]
struct RawLetter {
    sink: String,
    reason: String,
    attempts: u32,
    failed_at: String,
    segment: String,
    record: crate::segment::DiskRecord,
}

/// What a sealed dead letter writes: the record as a sealed line (without its crc32).
#[derive(Serialize)]
struct SealedLetter<'a> {
    sink: &'a str,
    reason: String,
    attempts: u32,
    failed_at: String,
    segment: String,
    record: crate::segment::SealedLine<'a>,
}

impl RawLetter {
    fn open(self, path: &Path, keys: Option<&Keyring>) -> Result<DeadLetterFile, StoreError> {
        let record = self.record.open(keys).map_err(|e| match e {
            crate::segment::LineError::NeedsKey(kid) => StoreError::KeyNeeded {
                what: format!("dead letter {}", path.display()),
                kids: kid,
                why: "that key was not given".into(),
            },
            crate::segment::LineError::Damaged(reason) => StoreError::Damaged {
                what: format!("dead letter {}", path.display()),
                reason,
            },
        })?;
        Ok(DeadLetterFile {
            sink: self.sink,
            reason: Keyring::reveal(keys, self.reason),
            attempts: self.attempts,
            failed_at: self.failed_at,
            segment: self.segment,
            record,
        })
    }
}

impl DeadLetterFile {
    /// Reads a dead-letter file, checking its format version first. A file that is not a dead
    /// letter is [`StoreError::NotStagingFile`]; one written by a newer Estafeta is
    /// [`StoreError::NewerFormat`]; a sealed one whose key is not in `keys` is
    /// [`StoreError::KeyNeeded`].
    pub fn read(path: &Path, keys: Option<&Keyring>) -> Result<DeadLetterFile, StoreError> {
        let bytes = std::fs::read(path).map_err(|e| StoreError::io("read", path, e))?;
        let not_a_letter = |reason: String| StoreError::NotStagingFile {
            path: path.to_path_buf(),
            expected: "dead letter",
            reason,
        };
        let version: LetterVersion = serde_json::from_slice(&bytes).map_err(|e| {
            not_a_letter(format!(
                "expected a JSON object with the refused record under \"record\" ({e})"
            ))
        })?;
        crate::segment::check_format(path, version.record.v)?;
        let raw: RawLetter =
            serde_json::from_slice(&bytes).map_err(|e| not_a_letter(e.to_string()))?;
        raw.open(path, keys)
    }
}

/// `<failed>/<action>/<entity>/<yyyy>/<mm>/<dd>/<staged>-<seq>-<sink>.json`, from the record's
/// staged date, so the same record and sink always map to the same file.
pub(crate) fn dead_letter_path(failed_dir: &Path, env: &Envelope, sink: &str) -> PathBuf {
    let staged = chrono::DateTime::parse_from_rfc3339(&env.staged_at)
        .map(|d| d.with_timezone(&Utc))
        .unwrap_or_else(|_| Utc::now());
    failed_dir
        .join(layout::day_dir(&env.action, &env.entity, staged))
        .join(format!(
            "{}-{:016}-{sink}.json",
            staged.format("%Y%m%dT%H%M%S%.6fZ"),
            env.seq
        ))
}

/// Marks (sink, seq) dead and writes its dead letter (outside a batch: tests and tools; the
/// batcher settles dead letters with [`Staging::settle`]).
pub fn kill(store: &Staging, sink: &str, seq: u64, reason: &str) -> Result<PathBuf, StoreError> {
    let (env, info) = store.get(&seq.to_string())?;
    let attempts = info
        .sinks
        .iter()
        .find(|s| s.sink == sink)
        .map(|s| s.attempts)
        .unwrap_or(0);
    let delivery = crate::Delivery {
        envelope: env,
        sink: sink.to_owned(),
        attempts,
        path: info.path,
    };
    store
        .settle(
            sink,
            crate::Settlement {
                dead: vec![crate::Dead {
                    delivery,
                    reason: reason.to_owned(),
                }],
                ..Default::default()
            },
        )
        .map(|mut paths| paths.remove(0))
}

/// Writes the dead letter of `delivery` for `sink` (durable before it returns) and its path;
/// `attempts` counts the refused one. The index is updated by the caller, after, in the
/// transaction it holds while writing: if we crash in between, the letter is stale (removed
/// at the next open by [`remove_stale_letters`]) and the record is simply sent again.
pub fn write_letter(
    store: &Staging,
    sink: &str,
    delivery: &crate::Delivery,
    attempts: u32,
    reason: &str,
) -> Result<PathBuf, StoreError> {
    let path = dead_letter_path(store.failed_dir(), &delivery.envelope, sink);
    let failed_at = layout::rfc3339(Utc::now());
    let segment = layout::rel_string(store.root(), &delivery.path);
    let mut bytes = match store.shared().keys() {
        // Sealed with a data key of its own: the record as in a sealed line, the server's
        // answer (which may quote the payload) as a sealed text.
        Some(keys) => {
            crate::sealed_folder::note_current(&store.shared().state_dir, keys)?;
            let mut dk = keys.new_data_key();
            let letter = SealedLetter {
                sink,
                reason: keys.seal_text(reason),
                attempts,
                failed_at,
                segment,
                record: crate::segment::seal_envelope(&delivery.envelope, &mut dk),
            };
            serde_json::to_vec_pretty(&letter).expect("dead letters serialize")
        }
        None => {
            let letter = DeadLetterFile {
                sink: sink.to_string(),
                reason: reason.to_string(),
                attempts,
                failed_at,
                segment,
                record: delivery.envelope.clone(),
            };
            serde_json::to_vec_pretty(&letter).expect("dead letters serialize")
        }
    };
    bytes.push(b'\n');
    layout::write_file_durable(&path, &bytes).map_err(|e| StoreError::io("write", &path, e))?;
    Ok(path)
}

/// Puts a dead (sink, seq) back to pending and removes its dead letter. The index says
/// pending first: a crash before the file is gone leaves a stale letter, removed at the next
/// open ([`remove_stale_letters`]), never a dead record without its letter.
pub fn requeue(store: &Staging, sink: &str, seq: u64) -> Result<(), StoreError> {
    let (env, _) = store.get(&seq.to_string())?;
    let changed = store.db().execute(
        "UPDATE deliveries SET state = 'pending', attempts = 0, next_at = 0, lease_until = 0, last_error = NULL
          WHERE sink = ?1 AND seq = ?2 AND state = 'dead'",
        params![sink, seq as i64],
    )?;
    if changed == 0 {
        return Err(StoreError::NotFound(format!(
            "{seq} as a dead letter of sink {sink:?}"
        )));
    }
    let path = dead_letter_path(store.failed_dir(), &env, sink);
    layout::remove_file_durable(&path).map_err(|e| StoreError::io("remove", &path, e))?;
    if let Some(dir) = path.parent() {
        layout::prune_empty_dirs(store.failed_dir(), dir);
    }
    Ok(())
}

fn parse_letter(path: &Path) -> Option<RawLetter> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Every dead letter under `failed_dir` as on disk, with its path.
fn raw_letters(failed_dir: &Path) -> Result<Vec<(PathBuf, RawLetter)>, StoreError> {
    let files =
        layout::walk_day_files(failed_dir).map_err(|e| StoreError::io("read", failed_dir, e))?;
    Ok(files
        .into_iter()
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("json"))
        .filter_map(|p| parse_letter(&p).map(|l| (p, l)))
        .collect())
}

/// Every dead letter under `failed_dir`, oldest record first; sealed ones opened with `keys`
/// (without them, a sealed letter is listed by what it keeps in clear).
pub fn list(
    failed_dir: &Path,
    limit: Option<usize>,
    keys: Option<&Keyring>,
) -> Result<Vec<DeadLetter>, StoreError> {
    let mut out: Vec<DeadLetter> = raw_letters(failed_dir)?
        .into_iter()
        .map(|(path, l)| {
            let (seq, id, action, entity) = l.record.clear_fields();
            let key = if l.record.kid().is_some() {
                keys.and_then(|k| l.record.clone_open(k).ok())
                    .and_then(|e| e.key)
            } else {
                l.record.clone_open_plain().and_then(|e| e.key)
            };
            DeadLetter {
                path,
                id,
                seq,
                sink: l.sink,
                action,
                entity,
                key,
                reason: Keyring::reveal(keys, l.reason),
                attempts: l.attempts,
                failed_at: l.failed_at,
            }
        })
        .collect();
    out.sort_by_key(|d| (d.seq, d.sink.clone()));
    if let Some(limit) = limit {
        out.truncate(limit);
    }
    Ok(out)
}

/// On an open over a sound index: removes the dead letters whose delivery the index does not
/// hold as dead, and returns how many. A crash between writing a letter and committing its
/// death, or between a requeue's commit and the removal of its letter, leaves one behind
/// while its record is pending again (or delivered since): listed, it would show a refusal
/// that no longer holds, and a requeue of it would answer "not found". Runs under the index's
/// write lock, which a settle holds while it writes its letters, so another process's letter
/// about to be committed is never taken for a stale one.
pub fn remove_stale_letters(shared: &Shared, conn: &Connection) -> Result<u64, StoreError> {
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
    let mut removed = 0;
    for letter in list(&shared.failed_dir, None, None)? {
        let dead: Option<i64> = tx
            .query_row(
                "SELECT 1 FROM deliveries WHERE sink = ?1 AND seq = ?2 AND state = 'dead'",
                params![letter.sink, letter.seq as i64],
                |r| r.get(0),
            )
            .optional()?;
        if dead.is_none() {
            layout::remove_file_durable(&letter.path)
                .map_err(|e| StoreError::io("remove", &letter.path, e))?;
            if let Some(dir) = letter.path.parent() {
                layout::prune_empty_dirs(&shared.failed_dir, dir);
            }
            removed += 1;
        }
    }
    tx.commit()?;
    Ok(removed)
}

/// After a rebuild: the dead letters in the folder say which deliveries are dead.
pub fn apply_dead_letters(shared: &Shared, conn: &Connection) -> Result<(), StoreError> {
    // The reason as on disk: a sealed one stays sealed in the index.
    for (_, letter) in raw_letters(&shared.failed_dir)? {
        let (seq, ..) = letter.record.clear_fields();
        conn.execute(
            "UPDATE deliveries SET state = 'dead', attempts = ?1, last_error = ?2 WHERE sink = ?3 AND seq = ?4",
            params![letter.attempts, letter.reason, letter.sink, seq as i64],
        )?;
    }
    Ok(())
}

/// Writes damaged bytes found in a segment to `<failed>/_damaged/`, with the reason.
pub fn write_damaged(
    shared: &Shared,
    segment: &Path,
    offset: u64,
    bytes: &[u8],
    reason: &str,
) -> Result<PathBuf, StoreError> {
    let rel = layout::rel_string(&shared.root, segment).replace('/', "_");
    let path = shared
        .failed_dir
        .join(layout::DAMAGED_DIR)
        .join(format!("{rel}.at-{offset:012}.json"));
    let doc = serde_json::json!({
        "segment": layout::rel_string(&shared.root, segment),
        "offset": offset,
        "reason": reason,
        "moved_at": layout::rfc3339(Utc::now()),
        "bytes": String::from_utf8_lossy(bytes),
    });
    let mut out = serde_json::to_vec_pretty(&doc).expect("json serializes");
    out.push(b'\n');
    layout::write_file_durable(&path, &out).map_err(|e| StoreError::io("write", &path, e))?;
    Ok(path)
}

/// Sets an indexed record aside as damaged: its bytes go to `_damaged/` as far as they can be
/// read, and it stops holding back the later records of its key. Runs in the caller's
/// transaction.
pub fn set_aside_record(
    shared: &Shared,
    conn: &Connection,
    seq: u64,
    segment: &Path,
    reason: &str,
) -> Result<PathBuf, StoreError> {
    let row: Option<(i64, i64, String, String, Option<String>, String)> = conn
        .query_row(
            "SELECT offset, len, id, entity, key, sinks FROM records WHERE seq = ?1",
            [seq as i64],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            },
        )
        .optional()?;
    let Some((offset, len, id, entity, key, sinks)) = row else {
        return Err(StoreError::NotFound(seq.to_string()));
    };
    let bytes = read_some(segment, offset as u64, len as u64);
    let note = format!(
        "{reason} (record seq {seq}, id {id}, entity {entity}, key {}, sinks {sinks})",
        key.as_deref().unwrap_or("-")
    );
    let to = write_damaged(shared, segment, offset as u64, &bytes, &note)?;
    conn.execute(
        "DELETE FROM deliveries WHERE sink IN (SELECT value FROM json_each(?2)) AND seq = ?1",
        params![seq as i64, crate::index::sinks_json(&sinks)],
    )?;
    conn.execute(
        "UPDATE records SET open_sinks = 0, sinks = '', delivered_at = NULL WHERE seq = ?1",
        [seq as i64],
    )?;
    tracing::error!(seq, id = %id, reason = %reason, moved_to = %to.display(), "A staged record is damaged on disk and was moved aside.");
    Ok(to)
}

fn read_some(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path)
        && f.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = f.take(len).read_to_end(&mut buf);
    }
    buf
}

/// A record found damaged while reading it for delivery.
pub fn move_damaged_record(
    store: &Staging,
    seq: u64,
    segment: &Path,
    reason: &str,
) -> Result<(), StoreError> {
    let mut db = store.db();
    let tx = db.transaction()?;
    set_aside_record(store.shared(), &tx, seq, segment, reason)?;
    tx.commit()?;
    Ok(())
}
