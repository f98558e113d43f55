//! `status`: counts per sink and per action/entity, oldest pending ages, disk space.

use chrono::{DateTime, Utc};
use rusqlite::params;
use std::collections::BTreeMap;

use crate::api_types::{GroupStatus, SinkStatus, Status};
use crate::error::StoreError;
use crate::store::{Staging, now_ms};

fn age_secs(staged_at: &str) -> Option<i64> {
    let t = DateTime::parse_from_rfc3339(staged_at).ok()?;
    Some((Utc::now() - t.with_timezone(&Utc)).num_seconds().max(0))
}

pub fn status(store: &Staging) -> Result<Status, StoreError> {
    let now = now_ms();
    let db = store.db();
    let records_pending: i64 = db.query_row(
        "SELECT COUNT(*) FROM records WHERE open_sinks > 0",
        [],
        |r| r.get(0),
    )?;
    let bytes_staged: i64 = db.query_row(
        "SELECT COALESCE(SUM(indexed_len), 0) FROM segments WHERE deleting = 0",
        [],
        |r| r.get(0),
    )?;

    let mut sinks: BTreeMap<String, SinkStatus> = BTreeMap::new();
    for name in store.sinks() {
        sinks.entry(name.clone()).or_default().sink = name.clone();
    }
    {
        let mut stmt =
            db.prepare("SELECT name, last_success_at, last_failure_at, last_error FROM sinks")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?;
        for row in rows {
            let (name, ok, fail, err) = row?;
            let s = sinks.entry(name.clone()).or_default();
            s.sink = name;
            s.last_success_at = ok;
            s.last_failure_at = fail;
            s.last_error = err.map(|e| crate::crypt::Keyring::reveal(store.shared().keys(), e));
        }
    }
    {
        let mut stmt = db.prepare(
            "SELECT sink,
                    SUM(state = 'pending' OR (state = 'in_flight' AND lease_until <= ?1)),
                    SUM(state = 'in_flight' AND lease_until > ?1),
                    SUM(state = 'dead'),
                    MIN(CASE WHEN state != 'dead' THEN seq END),
                    MIN(CASE WHEN state = 'pending' AND next_at > ?1 THEN next_at END)
               FROM deliveries GROUP BY sink",
        )?;
        let rows = stmt.query_map([now], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, Option<i64>>(5)?,
            ))
        })?;
        // Pending records under a lease (leases.rs) are in flight.
        let leased = crate::leases::pending_leased(&db, now)?;
        for row in rows {
            let (name, pending, in_flight, dead, oldest_seq, next_at) = row?;
            let leased = leased.get(&name).copied().unwrap_or(0);
            let s = sinks.entry(name.clone()).or_default();
            s.sink = name;
            s.pending = (pending - leased).max(0) as u64;
            s.in_flight = (in_flight + leased) as u64;
            s.dead = dead as u64;
            if let Some(seq) = oldest_seq {
                let staged: String =
                    db.query_row("SELECT staged_at FROM records WHERE seq = ?1", [seq], |r| {
                        r.get(0)
                    })?;
                s.oldest_pending_age_secs = age_secs(&staged);
                s.oldest_pending_staged_at = Some(staged);
            }
            s.next_attempt_at = next_at.and_then(|ms| {
                DateTime::<Utc>::from_timestamp_millis(ms).map(crate::layout::rfc3339)
            });
        }
    }
    let mut groups = Vec::new();
    {
        let mut stmt = db.prepare(
            "SELECT r.action, r.entity, COUNT(*), MIN(r.staged_at),
                    SUM(r.seq IN (SELECT seq FROM deliveries WHERE state = 'dead'))
               FROM records r WHERE r.open_sinks > 0
              GROUP BY r.action, r.entity ORDER BY r.action, r.entity",
        )?;
        let rows = stmt.query_map(params![], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        for row in rows {
            let (action, entity, pending, oldest, dead) = row?;
            groups.push(GroupStatus {
                action,
                entity,
                pending: pending as u64,
                dead: dead as u64,
                oldest_pending_age_secs: age_secs(&oldest),
            });
        }
    }
    drop(db);
    Ok(Status {
        root: store.root().to_path_buf(),
        records_pending: records_pending as u64,
        bytes_staged: bytes_staged as u64,
        disk_free_bytes: fs4::available_space(store.root()).ok(),
        staging_blocked: store.blocked_reason(),
        sinks: sinks.into_values().collect(),
        groups,
    })
}
