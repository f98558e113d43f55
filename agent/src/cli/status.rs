//! `estafeta status`: pending, dead and last results per sink and per action/entity, disk free,
//! the update state and the version, as text or JSON.
//!
//! The counts come from the staging folder itself, so they are there whether or not the agent
//! runs. The drain rate and time to empty are counted by the running agent only: they are
//! asked of it (`GET /v1/status` on INGEST_ADDR, a short wait) and shown as unknown when no
//! agent of this staging folder answers.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use estafeta_staging::Status;
use serde_json::{Value, json};

use crate::config::Config;

use super::table::{age, bytes, shorten, table};
use super::{EXIT_OK, open_store, runtime, write_stdout};

/// How long `estafeta status` waits for the running agent's drain rates; an agent that is
/// there answers in milliseconds.
const AGENT_TIMEOUT: Duration = Duration::from_secs(2);

/// The running agent's `GET /v1/status`, if an agent answers on INGEST_ADDR for this staging
/// folder (another agent on that port, with another folder, is not asked about ours).
async fn agent_status(config: &Config, root: &Path) -> Option<Value> {
    // https:// trusting INGEST_TLS_CERT when the API is served over TLS.
    let (base, client) = crate::api_tls::local_client(
        crate::ingest::local_addr(config.ingest_addr),
        config.ingest_tls.as_ref().map(|tls| tls.cert.as_path()),
        AGENT_TIMEOUT,
    )
    .ok()?;
    let mut request = client.get(format!("{base}/v1/status"));
    if let Some(token) = &config.ingest_token {
        request = request.bearer_auth(token);
    }
    let answer = request.send().await.ok()?;
    if !answer.status().is_success() {
        return None;
    }
    let body: Value = answer.json().await.ok()?;
    let theirs = std::fs::canonicalize(body["root"].as_str()?).ok()?;
    (theirs == std::fs::canonicalize(root).ok()?).then_some(body)
}

/// Copies each sink's drain rate and time to empty from the running agent's status, when one
/// answered; returns its status.
fn add_drain(config: &Config, status: &mut Status) -> Option<Value> {
    let rt = runtime().ok()?;
    let agent = rt.block_on(agent_status(config, &status.root))?;
    let theirs = agent["sinks"].as_array().cloned().unwrap_or_default();
    for sink in &mut status.sinks {
        if let Some(them) = theirs.iter().find(|s| s["sink"] == sink.sink.as_str()) {
            sink.drain_rate_per_sec = them["drain_rate_per_sec"].as_f64();
            // Their pending count is a moment older than ours: the time to empty is ours.
            sink.time_to_empty_secs = sink.drain_rate_per_sec.and_then(|rate| {
                crate::metrics::time_to_empty(sink.pending + sink.in_flight, rate)
            });
        }
    }
    Some(agent)
}

/// How each configured sink's connection is protected: as the running agent last connected,
/// or, without one, as the settings ask (building a sink connects to nothing).
fn connections(config: &Config, agent: Option<&Value>) -> Vec<(String, Value)> {
    let sinks = crate::sinks::build(&config.sinks).unwrap_or_default();
    sinks
        .iter()
        .map(|sink| {
            let seen = agent
                .and_then(|a| a["sinks"].as_array())
                .and_then(|all| all.iter().find(|s| s["sink"] == sink.name()))
                .map(|s| s["connection"].clone())
                .filter(|c| c.is_object());
            let connection = seen.unwrap_or_else(|| sink.transport().to_json());
            (sink.name().to_owned(), connection)
        })
        .collect()
}

/// Each SQL source's health: the running agent's (`GET /v1/status`, `sources`), or without
/// one, the last run the staging index kept (no totals, no lag: those are the agent's).
fn sources(
    config: &Config,
    store: &estafeta_staging::Staging,
    agent: Option<&Value>,
) -> Vec<Value> {
    if let Some(Value::Array(theirs)) = agent.map(|a| &a["sources"]) {
        return theirs.clone();
    }
    let kept = store.sources().unwrap_or_default();
    config
        .sql_sources
        .iter()
        .map(|source| {
            let state = kept.iter().find(|s| s.name == source.name);
            let ran = state.and_then(|s| s.last_run_at.clone());
            let error = state.and_then(|s| s.last_error.clone());
            json!({
                "name": source.name,
                "last_run_finished_at": ran,
                "outcome": ran.as_ref().map(|_| if error.is_some() { "error" } else { "ok" }),
                "last_rows": state.and_then(|s| s.last_rows),
                "last_error": error.map(|e| crate::redact::text(&e)),
            })
        })
        .collect()
}

/// The sources' table and their last errors, as `estafeta status` prints them.
fn sources_text(sources: &[Value]) -> String {
    let cell = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let rows: Vec<Vec<String>> = sources
        .iter()
        .map(|q| {
            vec![
                cell(&q["name"]),
                cell(&q["last_run_finished_at"]),
                cell(&q["outcome"]),
                cell(&q["last_rows"]),
                cell(&q["rows_total"]),
                cell(&q["records_total"]),
                cell(&q["refused_total"]),
                q["lag_secs"]
                    .as_i64()
                    .map(age)
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "SOURCE",
            "LAST_RUN",
            "OUTCOME",
            "LAST_ROWS",
            "ROWS_TOTAL",
            "STAGED_TOTAL",
            "SET_ASIDE",
            "LAG",
        ],
        &rows,
    );
    for q in sources {
        if let Some(error) = q["last_error"].as_str() {
            out.push_str(&format!(
                "  source {} last error: {}\n",
                cell(&q["name"]),
                shorten(error, 200)
            ));
        }
    }
    out
}

/// `1,234/s`; the rate is unknown without a running agent.
fn rate_cell(rate: Option<f64>) -> String {
    match rate {
        None => "-".into(),
        Some(r) if r >= 10.0 => format!("{}/s", thousands(r.round() as u64)),
        Some(r) => format!("{r:.1}/s"),
    }
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The arguments of `estafeta status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub json: bool,
}

pub(super) fn status(config: &Config, as_json: bool) -> anyhow::Result<u8> {
    let store = open_store(config)?;
    let mut status = store.status()?;
    let agent = add_drain(config, &mut status);
    let agent_answered = agent.is_some();
    let connections = connections(config, agent.as_ref());
    let sources = sources(config, &store, agent.as_ref());
    if as_json {
        let mut value = serde_json::to_value(&status).context("could not format the status")?;
        value["connections"] = connections
            .into_iter()
            .collect::<serde_json::Map<_, _>>()
            .into();
        value["sources"] = Value::Array(sources);
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
                rate_cell(s.drain_rate_per_sec),
                match (s.drain_rate_per_sec, s.time_to_empty_secs) {
                    _ if s.pending + s.in_flight == 0 => "empty".into(),
                    (None, _) => "-".into(),
                    (Some(_), None) => "not draining".into(),
                    (Some(_), Some(secs)) => age(i64::try_from(secs).unwrap_or(i64::MAX)),
                },
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
            "DRAIN_RATE",
            "TIME_TO_EMPTY",
        ],
        &sink_rows,
    ));
    if !agent_answered {
        out.push_str(&format!(
            "  drain rate unknown: no agent of this staging folder answered on {} (INGEST_ADDR); it is counted by the running agent\n",
            config.ingest_addr
        ));
    }
    for (name, connection) in &connections {
        out.push_str(&format!(
            "  {name} connection: {}\n",
            connection["description"].as_str().unwrap_or("unknown")
        ));
    }
    for sink in &status.sinks {
        if let Some(error) = &sink.last_error {
            out.push_str(&format!(
                "  {} last error: {}\n",
                sink.sink,
                shorten(error, 200)
            ));
        }
    }
    if !sources.is_empty() {
        out.push('\n');
        out.push_str(&sources_text(&sources));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_as_a_person_writes_them() {
        assert_eq!(rate_cell(None), "-");
        assert_eq!(rate_cell(Some(0.0)), "0.0/s");
        assert_eq!(rate_cell(Some(2.46)), "2.5/s");
        assert_eq!(rate_cell(Some(1_234_567.4)), "1,234,567/s");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
    }
}
