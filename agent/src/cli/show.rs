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

/// A dead-letter file (one JSON document with `record`) or a segment file (one record per line).
fn show_file(store: &Staging, path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("could not read {}", path.display()))?;
    if let Ok(letter) = serde_json::from_str::<Value>(&text)
        && let Some(id) = letter.pointer("/record/id").and_then(Value::as_str)
    {
        let mut record = record_json(store, id)?;
        record["dead_letter"] = json!({
            "file": path,
            "sink": letter.get("sink"),
            "reason": letter.get("reason"),
            "attempts": letter.get("attempts"),
            "failed_at": letter.get("failed_at"),
        });
        return Ok(vec![record]);
    }
    let mut records = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let id = serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned))
            .ok_or_else(|| {
                usage(format!(
                    "{} line {}: not a staged record (expected a segment or dead-letter file)",
                    path.display(),
                    number + 1
                ))
            })?;
        records.push(record_json(store, &id)?);
    }
    if records.is_empty() {
        return Err(usage(format!("{} holds no record", path.display())));
    }
    Ok(records)
}
