//! `after_stage`: a statement run on the source's database once a page is durably staged, once
//! per row, with the row's columns bound as `:<column>` (and a template's variables). It is
//! how a queue table is consumed at the source (seed 004's pending tables): `UPDATE
//! fila_pendente SET status = 'T' WHERE id = :id`.
//!
//! Exactly when it runs, across crashes: before a page is staged, the values the statement
//! will need are written (durably) to a note beside the store, with the checkpoint the page
//! leads to. After the page's commit the statement runs for each row, then the note is removed.
//! At the start of every page, a note left behind by a crash is finished: if the stored
//! checkpoint is the note's, the page was staged and the statement runs (again, perhaps: it
//! must be idempotent, which a `SET status = …` is); otherwise the page was not staged, its
//! rows will be read again, and the note is dropped. Rows are never staged twice for it: the
//! checkpoint already moved past them.

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

use super::query::{self, Driver, Param, Row};
use super::{SourceConfig, mapping};
use estafeta_staging::Staging;

/// The statement, read and checked when the configuration is loaded.
#[derive(Debug, Clone)]
pub struct AfterStage {
    pub path: PathBuf,
    pub sql: String,
    /// The parameters it uses, in the order of its text.
    pub params: Vec<String>,
}

impl AfterStage {
    /// Checks the statement's text against the source's driver.
    pub fn new(path: PathBuf, sql: String, url: &str) -> Result<AfterStage, String> {
        if sql.trim().is_empty() {
            return Err("the file is empty; write the UPDATE (or DELETE) that marks a row taken there, such as UPDATE fila SET status = 'T' WHERE id = :id".into());
        }
        let driver = Driver::of(url)?;
        let (_, params) = driver.rewrite(&sql)?;
        Ok(AfterStage { path, sql, params })
    }
}

/// What a page's statement needs, kept until it ran.
#[derive(Debug, Serialize, Deserialize)]
pub struct Note {
    /// The checkpoint the page leads to.
    checkpoint: String,
    /// Per row, the values of the parameters the statement uses (only those: the note holds
    /// as little patient data as it can).
    rows: Vec<BTreeMap<String, Value>>,
}

impl Note {
    /// The note of a page of `rows` leading to `checkpoint`; an error when the statement uses a
    /// parameter that is neither a column of the rows nor a template variable.
    pub fn of(
        source: &SourceConfig,
        after: &AfterStage,
        rows: &[Row],
        checkpoint: String,
    ) -> anyhow::Result<Note> {
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut values = BTreeMap::new();
            for name in &after.params {
                let value = match mapping::column(row, name) {
                    Some(value) => value.clone(),
                    None => match source.vars.get(name) {
                        Some(var) => Value::String(var.clone()),
                        None => anyhow::bail!(
                            "{} uses :{name}, which is neither a column the query returns ({}) nor a template variable; fix the statement or the query",
                            after.path.display(),
                            row.iter()
                                .map(|(n, _)| n.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    },
                };
                values.insert(name.clone(), value);
            }
            out.push(values);
        }
        Ok(Note {
            checkpoint,
            rows: out,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a note serializes")
    }
}

/// Finishes the note `source` left, if any: runs the statement for its rows when its page was
/// staged, then removes it.
pub async fn finish(store: &Staging, source: &SourceConfig) -> anyhow::Result<()> {
    let Some(after) = &source.after_stage else {
        return Ok(());
    };
    let (note, stored) = {
        let (store, name) = (store.clone(), source.name.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            Ok((store.source_note(&name)?, store.source_checkpoint(&name)?))
        })
        .await
        .context("reading the after_stage note panicked")??
    };
    let Some(bytes) = note else {
        return Ok(());
    };
    let note: Note = serde_json::from_slice(&bytes)
        .context("the after_stage note cannot be read; it is removed and its page's rows are not marked: mark them by hand")?;
    if stored.as_deref() == Some(note.checkpoint.as_str()) {
        let sets: Vec<BTreeMap<String, Param>> = note
            .rows
            .iter()
            .map(|row| {
                row.iter()
                    .map(|(k, v)| (k.clone(), Param::from_json(v)))
                    .collect()
            })
            .collect();
        query::execute_each(&source.url, &after.sql, &sets)
            .await
            .with_context(|| {
                format!(
                    "after_stage {} failed (the page is staged; the statement runs again at the next cycle)",
                    after.path.display()
                )
            })?;
    }
    let (store, name) = (store.clone(), source.name.clone());
    tokio::task::spawn_blocking(move || store.set_source_note(&name, None))
        .await
        .context("removing the after_stage note panicked")?
        .context("removing the after_stage note failed")?;
    Ok(())
}
