//! `estafeta sources`: the SQL sources' checkpoints and last cycles, and `sources reset`, which
//! rewinds one on purpose.

use clap::{Args, Subcommand};

use crate::config::Config;

use super::table::{MAX_CELL_CHARS, shorten, table};
use super::{EXIT_OK, open_store, usage, write_stdout};

/// The arguments of `estafeta sources`.
#[derive(Debug, Args)]
pub struct SourcesArgs {
    #[command(subcommand)]
    pub command: Option<SourcesCommand>,
    /// One JSON object per source.
    #[arg(long)]
    pub json: bool,
}

/// `estafeta sources …`.
#[derive(Debug, Subcommand)]
pub enum SourcesCommand {
    /// Rewind a source on purpose: its next cycle reads from the start (the initial load
    /// again), or from just after VALUE. Records already staged are not touched.
    Reset {
        /// The source's name.
        name: String,
        /// The checkpoint to go back to: `1500`, or a JSON array with one value per
        /// checkpoint column (`'["2026-11-01T00:00:00Z", 0]'`).
        #[arg(long, value_name = "VALUE")]
        to: Option<String>,
    },
}

pub(super) fn sources(config: &Config, as_json: bool) -> anyhow::Result<u8> {
    let store = open_store(config)?;
    let states = store.sources()?;
    let mut names: Vec<&str> = config.sql_sources.iter().map(|s| s.name.as_str()).collect();
    // Sources the index knows but the configuration no longer has are shown too.
    for state in &states {
        if !names.contains(&state.name.as_str()) {
            names.push(&state.name);
        }
    }
    let rows: Vec<serde_json::Value> = names
        .iter()
        .map(|name| {
            let state = states
                .iter()
                .find(|s| s.name == *name)
                .cloned()
                .unwrap_or_default();
            let configured = config.sql_sources.iter().find(|s| s.name == *name);
            serde_json::json!({
                "name": name,
                "configured": configured.is_some(),
                "enabled": configured.is_some_and(|s| s.enabled),
                "schedule": configured.map(|s| match &s.when {
                    crate::sources::When::Cron(expr) => expr.clone(),
                    crate::sources::When::Every(every) => format!("every {}s", every.as_secs_f64()),
                }),
                "checkpoint": state.checkpoint,
                "last_run_at": state.last_run_at,
                "last_rows": state.last_rows,
                "last_error": state.last_error,
                // Rows set aside under _failed/_refused/<name>/ (see sources::records_of).
                "refused": store.refused_rows(name).map_or(0, |rows| rows.len()),
            })
        })
        .collect();
    if as_json {
        let mut out = String::new();
        for row in &rows {
            out.push_str(&row.to_string());
            out.push('\n');
        }
        write_stdout(&out);
        return Ok(EXIT_OK);
    }
    if rows.is_empty() {
        write_stdout("No sources are configured ([[sources]] in the CONFIG_FILE TOML).\n");
        return Ok(EXIT_OK);
    }
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let enabled = match (row["configured"].as_bool(), row["enabled"].as_bool()) {
                (Some(false), _) => "not configured",
                (_, Some(true)) => "yes",
                _ => "no",
            };
            vec![
                text(&row["name"]),
                enabled.to_owned(),
                text(&row["schedule"]),
                text(&row["checkpoint"]),
                text(&row["last_run_at"]),
                text(&row["last_rows"]),
                shorten(&text(&row["last_error"]), MAX_CELL_CHARS),
            ]
        })
        .collect();
    write_stdout(&table(
        &[
            "SOURCE",
            "ENABLED",
            "SCHEDULE",
            "CHECKPOINT",
            "LAST RUN",
            "ROWS",
            "LAST ERROR",
        ],
        &body,
    ));
    Ok(EXIT_OK)
}

pub(super) fn reset_source(config: &Config, name: &str, to: Option<&str>) -> anyhow::Result<u8> {
    let Some(source) = config.sql_sources.iter().find(|s| s.name == name) else {
        return Err(usage(format!(
            "no source is named {name:?}; the configured ones are: {}",
            config
                .sql_sources
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let checkpoint = match to {
        None => None,
        Some(text) => Some(checkpoint_from_cli(text, source.checkpoint.len()).map_err(usage)?),
    };
    let store = open_store(config)?;
    store.reset_source(name, checkpoint.as_deref())?;
    write_stdout(&match &checkpoint {
        None => format!(
            "Source {name} rewound to the start: its next cycle reads every row again (an initial load).\n"
        ),
        Some(c) => {
            format!("Source {name} rewound to {c}: its next cycle reads the rows after it.\n")
        }
    });
    Ok(EXIT_OK)
}

/// `--to VALUE` as the stored checkpoint: a JSON array with one value per checkpoint column.
fn checkpoint_from_cli(text: &str, columns: usize) -> Result<String, String> {
    let value = serde_json::from_str::<serde_json::Value>(text)
        .unwrap_or_else(|_| serde_json::Value::String(text.to_owned()));
    let values = match value {
        serde_json::Value::Array(values) => values,
        single => vec![single],
    };
    if values.len() != columns {
        return Err(format!(
            "--to {text:?} gives {} value(s) but the source has {columns} checkpoint column(s); give a JSON array such as '[\"2026-11-01T00:00:00Z\", 0]'",
            values.len()
        ));
    }
    Ok(serde_json::Value::Array(values).to_string())
}
