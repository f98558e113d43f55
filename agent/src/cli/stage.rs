//! `estafeta stage`: stages a JSON object, or an array of objects all or nothing, from a file
//! or stdin, and prints each record's id, sequence number and segment file.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;
use estafeta_staging::NewRecord;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::config::Config;

use super::{EXIT_OK, open_store, usage, write_stdout};

/// The arguments of `estafeta stage`.
#[derive(Debug, Args)]
pub struct StageArgs {
    /// What happened: create, update, delete, upsert, … ([a-z0-9_-]).
    pub action: String,
    /// What it happened to: patient, attendance, … ([a-z0-9_-]).
    pub entity: String,
    /// JSON file to read; `-` or nothing reads stdin.
    pub file: Option<PathBuf>,
    /// Record key (default: the entity's key field in the payload, `id` unless configured).
    #[arg(long, value_name = "K")]
    pub key: Option<String>,
}

pub(super) fn stage(
    config: &Config,
    action: &str,
    entity: &str,
    file: Option<&Path>,
    key: Option<String>,
) -> anyhow::Result<u8> {
    for (what, name) in [("action", action), ("entity", entity)] {
        estafeta_staging::validate_name(what, name).map_err(|err| usage(err.to_string()))?;
    }
    let (text, source) = match file {
        None => (read_stdin()?, "stdin".to_owned()),
        Some(path) if path == Path::new("-") => (read_stdin()?, "stdin".to_owned()),
        Some(path) => (
            std::fs::read_to_string(path)
                .map_err(|err| usage(format!("could not read {}: {err}", path.display())))?,
            path.display().to_string(),
        ),
    };
    let items = split_payload(&text).map_err(|why| usage(format!("{source}: {why}")))?;
    let key_field = config.key_field(entity).to_owned();
    let sinks = config.route(action, entity);
    let mut records = Vec::with_capacity(items.len());
    for item in items {
        let record_key = match &key {
            Some(key) => Some(key.clone()),
            None => {
                let value: Value = serde_json::from_str(item.get())
                    .context("could not read a record of the input again")?;
                key_of(&value, &key_field)
            }
        };
        records.push(NewRecord {
            action: action.to_owned(),
            entity: entity.to_owned(),
            key: record_key,
            payload: item,
            sinks: (!sinks.is_empty()).then(|| sinks.clone()),
        });
    }
    let store = open_store(config)?;
    let staged = store.stage_batch(records, None)?;
    let mut out = String::new();
    for receipt in staged.receipts() {
        out.push_str(&format!(
            "{}\t{}\t{}\n",
            receipt.id,
            receipt.seq,
            receipt.path.display()
        ));
    }
    write_stdout(&out);
    Ok(EXIT_OK)
}

fn read_stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|err| usage(format!("could not read stdin: {err}")))?;
    Ok(text)
}

/// One JSON object, or a non-empty array of objects, each kept byte for byte.
fn split_payload(text: &str) -> Result<Vec<Box<RawValue>>, String> {
    let expected = "expected one JSON object or an array of JSON objects";
    let trimmed = text.trim();
    match trimmed.as_bytes().first() {
        Some(b'{') => {
            let raw: Box<RawValue> =
                serde_json::from_str(trimmed).map_err(|err| format!("not valid JSON: {err}"))?;
            Ok(vec![raw])
        }
        Some(b'[') => {
            let items: Vec<Box<RawValue>> =
                serde_json::from_str(trimmed).map_err(|err| format!("not valid JSON: {err}"))?;
            if items.is_empty() {
                return Err(format!("the array is empty; {expected}"));
            }
            if let Some(index) = items.iter().position(|i| !i.get().starts_with('{')) {
                return Err(format!(
                    "item {index} of the array is not an object; {expected}"
                ));
            }
            Ok(items)
        }
        Some(_) => match serde_json::from_str::<Value>(trimmed) {
            Ok(_) => Err(expected.to_owned()),
            Err(err) => Err(format!("not valid JSON: {err}")),
        },
        None => Err(format!("the input is empty; {expected}")),
    }
}

/// The record key from the payload's key field, when it is a string or a number.
fn key_of(value: &Value, key_field: &str) -> Option<String> {
    match value.get(key_field)? {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_an_object_or_an_array_of_objects() {
        assert_eq!(split_payload(r#"{"id": 1}"#).map(|v| v.len()), Ok(1));
        assert_eq!(
            split_payload(r#"[{"id": 1}, {"id": 2}]"#).map(|v| v.len()),
            Ok(2)
        );
        assert!(split_payload("[]").is_err());
        assert!(split_payload(r#"[{"id": 1}, 2]"#).is_err());
        assert!(split_payload("42").is_err());
        assert!(split_payload("{").is_err());
        assert!(split_payload("").is_err());
    }
}
