//! Clients' `Idempotency-Key`s: the first answer to a request, kept so that a repeat of it gets
//! that answer back instead of staging the records a second time.
//!
//! The index's `client_keys` table is a cache like the rest of the index. The truth is in the
//! segment lines: each record staged under a client key carries the key, the body's fingerprint
//! and how many records the request staged (`client_records`). So a key comes back whenever
//! its records do — a segment tail indexed after a crash (the segment was fsync'd, the index
//! commit was not), `reindex`, a missing or corrupt index — and only then.
//!
//! A request's records are all made durable before it is answered, so a request found with
//! fewer records than it staged was never answered: its other lines were torn off or never
//! reached the disk. Its surviving records are set aside (`_failed/_damaged/`) and its key
//! forgotten, so the client's retry stages the whole request once, rather than the agent
//! delivering a part of it and the retry delivering that part again.
//!
//! A key's lifetime counts from its records' `staged_at`, so a rebuild neither extends nor
//! cuts it (see [`CLIENT_KEY_TTL`](crate::store)).

use chrono::DateTime;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;

use crate::api_types::{MovedAside, OpenReport};
use crate::error::StoreError;
use crate::record::{Envelope, Receipt};
use crate::store::Shared;

/// The first answer given under `key`: the body's fingerprint and the receipts.
pub fn lookup(conn: &Connection, key: &str) -> rusqlite::Result<Option<(String, Vec<Receipt>)>> {
    let row: Option<(String, String)> = conn
        .prepare_cached("SELECT fingerprint, receipts FROM client_keys WHERE key = ?1")?
        .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(row.map(|(fp, receipts)| (fp, serde_json::from_str(&receipts).unwrap_or_default())))
}

/// Remembers the answer to a request the writer has just staged, in the transaction that
/// indexes its records.
pub fn remember(
    conn: &Connection,
    key: &str,
    fingerprint: &str,
    receipts: &[Receipt],
    staged_at_unix: i64,
) -> rusqlite::Result<()> {
    let records = Some(receipts.len() as i64);
    store(conn, key, fingerprint, receipts, staged_at_unix, records)
}

/// Writes a key's row; `records` is how many records its request staged (`None` for lines
/// written before the count was kept).
fn store(
    conn: &Connection,
    key: &str,
    fingerprint: &str,
    receipts: &[Receipt],
    staged_at_unix: i64,
    records: Option<i64>,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO client_keys (key, fingerprint, receipts, created_at, records)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        key,
        fingerprint,
        serde_json::to_string(receipts).expect("receipts serialize"),
        staged_at_unix,
        records
    ])?;
    Ok(())
}

/// Adds a record that recovery has just indexed to its client key's answer, in the same
/// transaction, so the key and the record come back together or not at all. Receipts stay in
/// sequence order, which is the order of the records in the request.
pub fn recovered(
    shared: &Shared,
    conn: &Connection,
    env: &Envelope,
    segment: &Path,
) -> rusqlite::Result<()> {
    let (Some(key), Some(fingerprint)) = (&env.client_key, &env.client_fingerprint) else {
        return Ok(());
    };
    // A sealing store's index holds keyed hashes of both (see `Shared::index_text`).
    let (key, fingerprint) = (&shared.index_text(key), &shared.index_text(fingerprint));
    let receipt = Receipt {
        id: env.id.clone(),
        seq: env.seq,
        path: segment.to_path_buf(),
    };
    let mut receipts = match lookup(conn, key)? {
        // Another request under the same key (a conflict the writer refused cannot be on
        // disk, so this is a foreign file's or a hand edit's): the first one found wins.
        Some((fp, _)) if fp != *fingerprint => return Ok(()),
        Some((_, receipts)) => receipts,
        None => Vec::new(),
    };
    if receipts.iter().any(|r| r.seq == env.seq) {
        return Ok(());
    }
    receipts.push(receipt);
    receipts.sort_by_key(|r| r.seq);
    let staged_at = DateTime::parse_from_rfc3339(&env.staged_at)
        .map(|t| t.timestamp())
        .unwrap_or_else(|_| chrono::Utc::now().timestamp());
    let records = env.client_records.map(i64::from);
    store(conn, key, fingerprint, &receipts, staged_at, records)
}

/// After recovery: a request found with fewer records than it staged was cut by a crash before
/// it was answered. Its surviving records are set aside and its key forgotten, so that the
/// client's retry stages it whole, once.
pub fn set_aside_cut_requests(
    shared: &Shared,
    conn: &Connection,
    report: &mut OpenReport,
) -> Result<(), StoreError> {
    let cut: Vec<(String, String, i64)> = {
        let mut stmt = conn.prepare(
            "SELECT key, receipts, records FROM client_keys
              WHERE records IS NOT NULL AND json_array_length(receipts) < records",
        )?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?
    };
    for (key, receipts, records) in cut {
        let receipts: Vec<Receipt> = serde_json::from_str(&receipts).unwrap_or_default();
        let tx = conn.unchecked_transaction()?;
        let reason = format!(
            "one of {records} records of a request that a crash cut before it was answered \
             ({} of them reached the disk); the client was never told they were staged, and \
             its retry with the same Idempotency-Key stages the whole request again",
            receipts.len()
        );
        for r in &receipts {
            let to = crate::dead::set_aside_record(shared, &tx, r.seq, &r.path, &reason)?;
            report.moved_aside.push(MovedAside {
                from: r.path.clone(),
                to,
                reason: reason.clone(),
            });
        }
        tx.execute("DELETE FROM client_keys WHERE key = ?1", [&key])?;
        tx.commit()?;
    }
    Ok(())
}
