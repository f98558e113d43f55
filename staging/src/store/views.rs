//! Read-only views for the CLI and the status page: records by id or sequence, listings,
//! dead letters, the status, the readiness ping, and the staging files read back by their
//! path (`read_file`, `dead_letter`), each checked against the format this version reads.

use chrono::{TimeZone, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::BTreeSet;
use std::path::Path;

use crate::layout;
use crate::record::State;
use crate::*;

use super::{Staging, lock, now_ms};

impl Staging {
    /// Dead letters, oldest first: those whose death the index holds. A letter is written
    /// (durably) before the transaction that records its death; listed in between, a power cut
    /// could take it back (the next open removes it as stale, and its record is sent again),
    /// so a letter not yet committed is not shown.
    pub fn dead_letters(&self, limit: Option<usize>) -> Result<Vec<DeadLetter>, StoreError> {
        let mut letters = crate::dead::list(self.failed_dir(), None, self.shared().keys())?;
        {
            let db = self.db();
            let mut dead = db.prepare_cached(
                "SELECT 1 FROM deliveries WHERE sink = ?1 AND seq = ?2 AND state = 'dead'",
            )?;
            let mut committed = Vec::with_capacity(letters.len());
            for letter in &letters {
                committed.push(dead.exists(params![letter.sink, letter.seq as i64])?);
            }
            let mut flags = committed.into_iter();
            letters.retain(|_| flags.next().unwrap_or(false));
        }
        if let Some(limit) = limit {
            letters.truncate(limit);
        }
        Ok(letters)
    }

    /// Records, oldest first.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<RecordInfo>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT r.seq FROM records r
              WHERE (?1 IS NULL OR r.action = ?1) AND (?2 IS NULL OR r.entity = ?2)
                AND (?3 OR r.open_sinks > 0)
                AND (NOT ?4 OR r.seq IN (SELECT seq FROM deliveries WHERE state = 'dead'))
                AND r.sinks != ''
              ORDER BY r.seq LIMIT ?5",
        )?;
        let limit = filter.limit.map(|l| l as i64).unwrap_or(-1);
        let seqs = stmt
            .query_map(
                params![
                    filter.action,
                    filter.entity,
                    filter.include_delivered,
                    filter.dead_only,
                    limit
                ],
                |r| r.get::<_, i64>(0),
            )?
            .collect::<Result<Vec<_>, _>>()?;
        let mut infos = seqs
            .into_iter()
            .map(|seq| info_of(&db, self.root(), seq as u64, self.shared().keys()))
            .collect::<Result<Vec<_>, _>>()?;
        drop(stmt);
        drop(db);
        if self.shared().keys().is_some() {
            // The index holds a keyed hash of each key: the key itself is in the sealed line.
            for info in &mut infos {
                if info.key.is_some()
                    && let Ok(env) = self.read_indexed(info)
                {
                    info.key = env.key;
                }
            }
        }
        Ok(infos)
    }

    /// Reads a segment file back by its path (every complete line, in file order), without
    /// the index: what `estafeta show PATH` prints. Each line's format version is checked
    /// ([`StoreError::NewerFormat`]) and its checksum ([`StoreError::Damaged`]); a file that
    /// is not a segment is [`StoreError::NotStagingFile`].
    pub fn read_file(path: &Path) -> Result<Vec<Envelope>, StoreError> {
        crate::segment::read_file(path, None)
    }

    /// [`Staging::read_file`] of a file that may hold sealed lines, opened with `keys`; a sealed
    /// line whose key is not in `keys` is [`StoreError::KeyNeeded`], never damage.
    pub fn read_file_with_keys(
        path: &Path,
        keys: Option<&Keyring>,
    ) -> Result<Vec<Envelope>, StoreError> {
        crate::segment::read_file(path, keys)
    }

    /// Reads a dead-letter file back by its path: the record, the sink that refused it, the
    /// reason, the attempts and when. Its format version is checked first
    /// ([`StoreError::NewerFormat`]); a file that is not a dead letter is
    /// [`StoreError::NotStagingFile`].
    pub fn dead_letter(path: &Path) -> Result<DeadLetterFile, StoreError> {
        DeadLetterFile::read(path, None)
    }

    /// [`Staging::dead_letter`] of a letter that may be sealed, opened with `keys`.
    pub fn dead_letter_with_keys(
        path: &Path,
        keys: Option<&Keyring>,
    ) -> Result<DeadLetterFile, StoreError> {
        DeadLetterFile::read(path, keys)
    }

    /// The ids of the keys that the folder's files and index use now (`estafeta key prune`).
    pub fn keys_in_use(&self) -> Result<std::collections::BTreeSet<String>, StoreError> {
        let db = self.db();
        crate::sealed_folder::keys_in_use(self.root(), self.failed_dir(), &db)
    }

    /// Records that the folder needs only the keys `ids` from now on (after a prune of the key
    /// file). Refused while another process has the store open: it may be about to seal with a
    /// key that nothing uses yet.
    pub fn set_keys_needed(
        &self,
        ids: &std::collections::BTreeSet<String>,
    ) -> Result<(), StoreError> {
        if crate::leases::others_alive(&self.shared().state_dir, &self.inner.owner) {
            return Err(StoreError::Busy(
                "another Estafeta process has the staging folder open (the daemon?): stop it, then prune the keys".into(),
            ));
        }
        crate::sealed_folder::set(&self.shared().state_dir, ids)
    }

    /// A record by id or sequence number (decimal).
    pub fn get(&self, id_or_seq: &str) -> Result<(Envelope, RecordInfo), StoreError> {
        let info = {
            let db = self.db();
            let seq: Option<i64> = match id_or_seq.parse::<u64>() {
                Ok(seq) => Some(seq as i64),
                Err(_) => db
                    .query_row("SELECT seq FROM records WHERE id = ?1", [id_or_seq], |r| {
                        r.get(0)
                    })
                    .optional()?,
            };
            let seq = seq.ok_or_else(|| StoreError::NotFound(id_or_seq.to_string()))?;
            info_of(&db, self.root(), seq as u64, self.shared().keys())?
        };
        let mut info = info;
        let env = self.read_indexed(&info)?;
        info.key = env.key.clone();
        Ok((env, info))
    }

    /// Reads an indexed record from its segment.
    fn read_indexed(&self, info: &RecordInfo) -> Result<Envelope, StoreError> {
        let (offset, len): (i64, i64) = self.db().query_row(
            "SELECT offset, len FROM records WHERE seq = ?1",
            [info.seq as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let env = crate::segment::read_record(
            &info.path,
            offset as u64,
            len as u64,
            self.shared().keys(),
        )
        .map_err(|e| match e {
            crate::segment::LineError::NeedsKey(kid) => StoreError::KeyNeeded {
                what: format!("record {}", info.id),
                kids: kid,
                why: "that key was not given".into(),
            },
            crate::segment::LineError::Damaged(reason) => StoreError::Damaged {
                what: info.id.clone(),
                reason,
            },
        })?;
        crate::segment::check_format(&info.path, env.v)?;
        Ok(env)
    }

    pub fn status(&self) -> Result<Status, StoreError> {
        crate::status::status(self)
    }

    /// Whether the index answers a query: the cheap check behind a readiness probe (`status`
    /// counts every pending record, which takes seconds with a backlog of millions).
    pub fn ping(&self) -> Result<(), StoreError> {
        self.db()
            .query_row("SELECT COUNT(*) FROM sinks", [], |_| Ok(()))?;
        Ok(())
    }

    /// Why staging refuses writes right now, if it does.
    pub fn blocked_reason(&self) -> Option<String> {
        if let Some(p) = self.inner.shared.poisoned() {
            return Some(format!("staging stopped after a failed disk flush: {p}"));
        }
        lock(&self.inner.shared.blocked).clone()
    }
}

/// Builds a record's listing from the index.
pub(crate) fn info_of(
    db: &Connection,
    root: &Path,
    seq: u64,
    keys: Option<&Keyring>,
) -> Result<RecordInfo, StoreError> {
    let (id, action, entity, key, staged_at, sinks, rel): (
        String,
        String,
        String,
        Option<String>,
        String,
        String,
        String,
    ) = db
        .query_row(
            "SELECT r.id, r.action, r.entity, r.key, r.staged_at, r.sinks, s.path
               FROM records r JOIN segments s ON s.id = r.segment_id WHERE r.seq = ?1",
            [seq as i64],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            },
        )
        .optional()?
        .ok_or_else(|| StoreError::NotFound(seq.to_string()))?;
    let mut stmt = db.prepare_cached(
        "SELECT sink, state, attempts, last_error, next_at, lease_until
           FROM deliveries d WHERE d.sink IN (SELECT value FROM json_each(?2)) AND d.seq = ?1",
    )?;
    let now = now_ms();
    let mut open: Vec<SinkState> = stmt
        .query_map(params![seq as i64, crate::index::sinks_json(&sinks)], |r| {
            let sink: String = r.get(0)?;
            let state = State::from_db(&r.get::<_, String>(1)?);
            let next_at: i64 = r.get(4)?;
            let lease_until: i64 = r.get(5)?;
            let lease_expired = state == State::InFlight && lease_until <= now;
            let leased = state == State::Pending && crate::leases::holds(db, &sink, seq, now)?;
            let state = if lease_expired {
                State::Pending
            } else if leased {
                State::InFlight
            } else {
                state
            };
            Ok(SinkState {
                sink,
                state,
                attempts: r.get::<_, i64>(2)? as u32,
                last_error: r
                    .get::<_, Option<String>>(3)?
                    .map(|e| crate::crypt::Keyring::reveal(keys, e)),
                next_attempt_at: (state == State::Pending && next_at > now)
                    .then(|| ms_to_rfc3339(next_at)),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let open_names: BTreeSet<String> = open.iter().map(|s| s.sink.clone()).collect();
    for sink in sinks.split(',').filter(|s| !s.is_empty()) {
        if !open_names.contains(sink) {
            open.push(SinkState {
                sink: sink.to_string(),
                state: State::Delivered,
                attempts: 0,
                last_error: None,
                next_attempt_at: None,
            });
        }
    }
    open.sort_by(|a, b| a.sink.cmp(&b.sink));
    let rank = |s: State| match s {
        State::Dead => 0,
        State::Pending => 1,
        State::InFlight => 2,
        State::Delivered => 3,
    };
    let state = open
        .iter()
        .map(|s| s.state)
        .min_by_key(|s| rank(*s))
        .unwrap_or(State::Delivered);
    let attempts = open.iter().map(|s| s.attempts).max().unwrap_or(0);
    let last_error = open.iter().find_map(|s| s.last_error.clone());
    Ok(RecordInfo {
        id,
        seq,
        action,
        entity,
        key,
        staged_at,
        path: root.join(rel),
        state,
        attempts,
        last_error,
        sinks: open,
    })
}

fn ms_to_rfc3339(ms: i64) -> String {
    layout::rfc3339(Utc.timestamp_millis_opt(ms).single().unwrap_or_default())
}
