//! `estafeta status`: pending, dead and last results per sink and per action/entity, disk free,
//! the update state and the version, as text or JSON.

use anyhow::Context as _;
use clap::Args;
use serde_json::json;

use crate::config::Config;

use super::table::{age, bytes, shorten, table};
use super::{EXIT_OK, open_store, write_stdout};

/// The arguments of `estafeta status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub json: bool,
}

pub(super) fn status(config: &Config, as_json: bool) -> anyhow::Result<u8> {
    let store = open_store(config)?;
    let status = store.status()?;
    if as_json {
        let mut value = serde_json::to_value(&status).context("could not format the status")?;
        value["version"] = json!(crate::version::current());
        value["agent_id"] = json!(config.agent_id);
        value["update"] = serde_json::to_value(crate::update::state::load(&config.staging_path))
            .context("could not format the update status")?;
        let mut text =
            serde_json::to_string_pretty(&value).context("could not format the status")?;
        text.push('\n');
        write_stdout(&text);
        return Ok(EXIT_OK);
    }
    let mut out = format!(
        "estafeta {} (agent {})\nstaging: {}\nrecords pending: {}, bytes staged: {}, disk free: {}\n",
        crate::version::current(),
        config.agent_id,
        status.root.display(),
        status.records_pending,
        bytes(status.bytes_staged),
        status
            .disk_free_bytes
            .map(bytes)
            .unwrap_or_else(|| "unknown".into()),
    );
    if let Some(reason) = &status.staging_blocked {
        out.push_str(&format!("STAGING REFUSES WRITES: {reason}\n"));
    }
    let update = crate::update::state::load(&config.staging_path);
    if update.last_check.is_some() || update.state != crate::update::State::Idle {
        out.push_str(&format!(
            "update: {} (last check {}{}){}\n",
            serde_json::to_value(update.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            update.last_check.as_deref().unwrap_or("never"),
            update
                .available
                .as_deref()
                .map(|v| format!(", {v} available"))
                .unwrap_or_default(),
            update
                .message
                .as_deref()
                .map(|m| format!(": {}", shorten(m, 200)))
                .unwrap_or_default(),
        ));
    }
    out.push('\n');
    let sink_rows: Vec<Vec<String>> = status
        .sinks
        .iter()
        .map(|s| {
            vec![
                s.sink.clone(),
                s.pending.to_string(),
                s.in_flight.to_string(),
                s.dead.to_string(),
                s.oldest_pending_age_secs
                    .map(age)
                    .unwrap_or_else(|| "-".into()),
                s.last_success_at.clone().unwrap_or_else(|| "-".into()),
                s.last_failure_at.clone().unwrap_or_else(|| "-".into()),
                s.next_attempt_at.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "SINK",
            "PENDING",
            "IN_FLIGHT",
            "DEAD",
            "OLDEST_PENDING",
            "LAST_SUCCESS",
            "LAST_FAILURE",
            "NEXT_ATTEMPT",
        ],
        &sink_rows,
    ));
    for sink in &status.sinks {
        if let Some(error) = &sink.last_error {
            out.push_str(&format!(
                "  {} last error: {}\n",
                sink.sink,
                shorten(error, 200)
            ));
        }
    }
    if !status.groups.is_empty() {
        out.push('\n');
        let group_rows: Vec<Vec<String>> = status
            .groups
            .iter()
            .map(|g| {
                vec![
                    g.action.clone(),
                    g.entity.clone(),
                    g.pending.to_string(),
                    g.dead.to_string(),
                    g.oldest_pending_age_secs
                        .map(age)
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        out.push_str(&table(
            &["ACTION", "ENTITY", "PENDING", "DEAD", "OLDEST_PENDING"],
            &group_rows,
        ));
    }
    write_stdout(&out);
    Ok(EXIT_OK)
}
