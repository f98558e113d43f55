//! Replaying a refused row (`estafeta retry --send`): a row set aside under
//! `_failed/_refused/<source>/` because its mapping, a map file or its entity's schema refused
//! it is run again through the same steps a cycle runs (`records::records_of`: enrich, nest or
//! group, intake) with the configuration as it is now, and staged as a new record. The source's
//! checkpoint does not move, and no other row is read again.
//!
//! - Only a row that was read whole can be replayed. A row set aside for a value the agent
//!   could not read holds NULL in its place, so its record would be wrong: the fix is in the
//!   database, then `estafeta sources reset <source> --to` the checkpoint before it.
//! - The record is staged under an ingest `Idempotency-Key` of its own (the source, the
//!   checkpoint and when it was set aside): a replay repeated after a crash between staging and
//!   removing the file gets the first answer and stages nothing twice.
//! - It is staged now, so it is delivered after the records of its key staged meanwhile (a
//!   later row of the same key, read since, went first). The README says so.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use estafeta_staging::{ClientKey, RefusedRow, Staging, StoreError};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::SourceConfig;
use super::query::Row;
use super::records::{Made, records_of};
use crate::intake::Intake;

/// What replaying one refused row came to.
#[derive(Debug)]
pub enum Replayed {
    /// Staged as the record with this sequence number; the file is removed.
    Staged { seq: u64 },
    /// Refused again (the mapping still refuses it): why. The file stays.
    RefusedAgain(String),
    /// This file cannot be replayed: why, and what to do instead. The file stays.
    NotReplayable(String),
}

/// The saved row (or a group's rows) as the query gave them.
fn rows_of(saved: &Value) -> Option<Vec<Row>> {
    let one = |v: &Value| -> Option<Row> {
        Some(
            v.as_object()?
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    };
    match saved {
        Value::Array(rows) if !rows.is_empty() => rows.iter().map(one).collect(),
        Value::Object(_) => Some(vec![one(saved)?]),
        _ => None,
    }
}

/// Runs the refused row saved at `path` through `source`'s mapping again and stages its record.
pub async fn replay(
    store: &Staging,
    intake: &Intake,
    source: &SourceConfig,
    path: &Path,
    refused: &RefusedRow,
) -> anyhow::Result<Replayed> {
    if !refused.replayable {
        return Ok(Replayed::NotReplayable(format!(
            "it was set aside for a value that could not be read (saved as NULL), or by an older estafeta; fix the row in the database, then `estafeta sources reset {} --to '{}'` with the checkpoint before it",
            refused.source, refused.checkpoint
        )));
    }
    let Some(rows) = rows_of(&refused.row) else {
        return Ok(Replayed::NotReplayable(
            "its row is not a JSON object (or a list of them)".into(),
        ));
    };
    if let Some(enrich) = &source.enrich {
        enrich.refresh(&source.name).await?;
    }
    let mut made = records_of(intake, source, &rows, &BTreeMap::new())?;
    if made.len() != 1 {
        return Ok(Replayed::NotReplayable(format!(
            "its rows make {} records, not one (has group_by changed?)",
            made.len()
        )));
    }
    let record = match made.remove(0) {
        Made::Record(record) => record,
        Made::Refused { reason, .. } => return Ok(Replayed::RefusedAgain(reason)),
    };
    let client_key = ClientKey {
        key: format!(
            "refused-row:{}:{}",
            refused.source,
            hex(&Sha256::digest(
                format!("{}\n{}", refused.checkpoint, refused.refused_at).as_bytes()
            ))
        ),
        fingerprint: format!(
            "sha256:{}",
            hex(&Sha256::digest(refused.row.to_string().as_bytes()))
        ),
    };
    let (store2, path2) = (store.clone(), path.to_path_buf());
    let seq = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let staged = store2
            .stage_batch(vec![record], Some(client_key))
            .context("staging the record failed; the refused row stays")?;
        // Durable first, then the file goes: a crash in between leaves the file, and a second
        // replay gets the first answer under the same key.
        match store2.remove_refused_row(&path2) {
            // A copy outside the store (`--file` elsewhere) is the caller's to move.
            Ok(()) | Err(StoreError::NotStagingFile { .. }) => {}
            Err(err) => {
                return Err(anyhow::Error::new(err).context(
                    "the record is staged, but the refused row's file could not be removed",
                ));
            }
        }
        Ok(staged.receipts()[0].seq)
    })
    .await
    .context("replaying panicked")??;
    Ok(Replayed::Staged { seq })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
