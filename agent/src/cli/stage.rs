//! `estafeta stage`: stages a JSON object, or an array of objects all or nothing, from a file
//! or stdin, and prints each record's id, sequence number and segment file.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use clap::Args;

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
    crate::intake::Intake::check_names(action, entity).map_err(|err| usage(err.message))?;
    let (text, source) = match file {
        None => (read_stdin()?, "stdin".to_owned()),
        Some(path) if path == Path::new("-") => (read_stdin()?, "stdin".to_owned()),
        Some(path) => (
            std::fs::read_to_string(path)
                .map_err(|err| usage(format!("could not read {}: {err}", path.display())))?,
            path.display().to_string(),
        ),
    };
    // The same intake as the HTTP API: splitting, key, routes and the entity's schema.
    let intake = crate::intake::Intake::new(config.rules())?;
    let key = match key {
        Some(key) => crate::intake::KeyFrom::Given(Some(key)),
        None => crate::intake::KeyFrom::KeyField,
    };
    let records = intake
        .records(action, entity, text.as_bytes(), &key)
        .map_err(|err| usage(format!("{source}: {err}")))?
        .records;
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
