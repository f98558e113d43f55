//! `estafeta ls`: the staged records (or the dead letters with `--failed`), oldest first, as a
//! table or JSON lines.

use std::path::PathBuf;

use clap::Args;
use estafeta_staging::ListFilter;
use serde_json::json;

use crate::config::Config;

use super::table::{MAX_CELL_CHARS, shorten, table};
use super::{EXIT_OK, open_store, write_stdout};

/// The arguments of `estafeta ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// List dead letters instead of pending records.
    #[arg(long)]
    pub failed: bool,
    #[arg(long, value_name = "A")]
    pub action: Option<String>,
    #[arg(long, value_name = "E")]
    pub entity: Option<String>,
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// One JSON object per line: id, seq, action, entity, key, state, attempts, last_error, path.
    #[arg(long)]
    pub json: bool,
}

/// One line of `ls`.
struct Row {
    id: String,
    seq: u64,
    action: String,
    entity: String,
    key: Option<String>,
    state: String,
    attempts: u32,
    last_error: Option<String>,
    path: PathBuf,
    sink: Option<String>,
}

pub(super) fn ls(
    config: &Config,
    failed: bool,
    action: Option<String>,
    entity: Option<String>,
    limit: Option<usize>,
    as_json: bool,
) -> anyhow::Result<u8> {
    let store = open_store(config)?;
    let rows: Vec<Row> = if failed {
        let mut letters = store.dead_letters(None)?;
        letters.retain(|d| {
            action.as_ref().is_none_or(|a| *a == d.action)
                && entity.as_ref().is_none_or(|e| *e == d.entity)
        });
        if let Some(limit) = limit {
            letters.truncate(limit);
        }
        letters
            .into_iter()
            .map(|d| Row {
                id: d.id,
                seq: d.seq,
                action: d.action,
                entity: d.entity,
                key: d.key,
                state: "dead".into(),
                attempts: d.attempts,
                last_error: Some(d.reason),
                path: d.path,
                sink: Some(d.sink),
            })
            .collect()
    } else {
        let filter = ListFilter {
            action,
            entity,
            limit,
            ..ListFilter::default()
        };
        store
            .list(&filter)?
            .into_iter()
            .map(|r| Row {
                id: r.id,
                seq: r.seq,
                action: r.action,
                entity: r.entity,
                key: r.key,
                state: r.state.as_str().into(),
                attempts: r.attempts,
                last_error: r.last_error,
                path: r.path,
                sink: None,
            })
            .collect()
    };
    let mut out = String::new();
    if as_json {
        for row in &rows {
            let mut line = json!({
                "id": row.id,
                "seq": row.seq,
                "action": row.action,
                "entity": row.entity,
                "key": row.key,
                "state": row.state,
                "attempts": row.attempts,
                "last_error": row.last_error,
                "path": row.path,
            });
            if let Some(sink) = &row.sink {
                line["sink"] = json!(sink);
            }
            out.push_str(&line.to_string());
            out.push('\n');
        }
    } else {
        let mut header = vec!["SEQ", "ID", "ACTION", "ENTITY", "KEY", "STATE", "ATTEMPTS"];
        if failed {
            header.push("SINK");
        }
        header.extend(["LAST_ERROR", "PATH"]);
        let body = rows
            .iter()
            .map(|row| {
                let mut cells = vec![
                    row.seq.to_string(),
                    row.id.clone(),
                    row.action.clone(),
                    row.entity.clone(),
                    row.key.clone().unwrap_or_else(|| "-".into()),
                    row.state.clone(),
                    row.attempts.to_string(),
                ];
                if let Some(sink) = &row.sink {
                    cells.push(sink.clone());
                }
                cells.push(
                    row.last_error
                        .as_deref()
                        .map(|e| shorten(e, MAX_CELL_CHARS))
                        .unwrap_or_else(|| "-".into()),
                );
                cells.push(row.path.display().to_string());
                cells
            })
            .collect::<Vec<_>>();
        out.push_str(&table(&header, &body));
    }
    write_stdout(&out);
    Ok(EXIT_OK)
}
