//! `estafeta show`: one record (by id, sequence number, or a segment or dead-letter file) as
//! JSON, with its state for every sink.

use std::path::Path;

use anyhow::Context as _;
use clap::Args;
use estafeta_staging::{Staging, StoreError};
use serde_json::{Value, json};

use crate::config::Config;

use super::{EXIT_OK, open_store, usage, write_stdout};

/// The arguments of `estafeta show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    #[arg(value_name = "ID|SEQ|PATH")]
    pub target: String,
}

pub(super) fn show(config: &Config, target: &str) -> anyhow::Result<u8> {
    let store = open_store(config)?;
    let path = Path::new(target);
    let documents = if path.is_file() {
        show_file(&store, path)?
    } else {
        vec![record_json(&store, target)?]
    };
    let value = if documents.len() == 1 {
        documents.into_iter().next().unwrap_or(Value::Null)
    } else {
        Value::Array(documents)
    };
    let mut text = serde_json::to_string_pretty(&value).context("could not format the record")?;
    text.push('\n');
    write_stdout(&text);
    Ok(EXIT_OK)
}

/// A record as `show` prints it: the envelope and its state for every sink.
fn record_json(store: &Staging, id_or_seq: &str) -> anyhow::Result<Value> {
    let (envelope, info) = store.get(id_or_seq).map_err(|err| match err {
        StoreError::NotFound(what) => anyhow::anyhow!(
            "no record {what} in staging at {}; `estafeta ls` lists the records it holds",
            store.root().display()
        ),
        other => anyhow::Error::new(other),
    })?;
    Ok(json!({
        "envelope": envelope,
        "path": info.path,
        "state": info.state,
        "attempts": info.attempts,
        "last_error": info.last_error,
        "sinks": info.sinks,
    }))
}

/// The keys the store was opened with (`STAGING_KEY_FILE`): sealed files open with them.
fn store_keys(store: &Staging) -> Option<&estafeta_staging::Keyring> {
    store.keys()
}

/// A dead-letter file (one JSON document with `record`) or a segment file (one record per
/// line), read by the store, each record shown with its state from the index.
fn show_file(store: &Staging, path: &Path) -> anyhow::Result<Vec<Value>> {
    let keys = store_keys(store);
    match Staging::dead_letter_with_keys(path, keys) {
        Ok(letter) => {
            let mut record = record_json(store, &letter.record.id)?;
            record["dead_letter"] = json!({
                "file": path,
                "sink": letter.sink,
                "reason": letter.reason,
                "attempts": letter.attempts,
                "failed_at": letter.failed_at,
            });
            return Ok(vec![record]);
        }
        // Not a dead letter: it may be a segment.
        Err(StoreError::NotStagingFile { .. }) => {}
        Err(err) => return Err(err.into()),
    }
    let envelopes = Staging::read_file_with_keys(path, keys).map_err(|err| match err {
        StoreError::NotStagingFile { .. } => usage(err.to_string()),
        other => anyhow::Error::new(other),
    })?;
    envelopes
        .iter()
        .map(|envelope| record_json(store, &envelope.id))
        .collect()
}
