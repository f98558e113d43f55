//! `estafeta fleet`: the fleet's last heartbeats in a central database, as a table or JSON
//! lines. Reads no local configuration.

use anyhow::Context as _;
use clap::Args;

use super::table::{age, bytes, shorten, table};
use super::{EXIT_OK, runtime, write_stdout};

/// The arguments of `estafeta fleet`.
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// postgres://…, mysql://… (MariaDB too) or sqlite://PATH: the central database the
    /// agents' heartbeats reach.
    #[arg(long, value_name = "URL")]
    pub database: String,
    /// Flag agents not heard from for more than this many minutes.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub stale_minutes: u64,
    /// Flag agents whose oldest pending record is older than this many minutes.
    #[arg(long, value_name = "N", default_value_t = 30)]
    pub backlog_minutes: u64,
    /// One JSON object per agent and line, with its flags.
    #[arg(long)]
    pub json: bool,
}

/// `estafeta fleet`: the `estafeta_fleet` view as a table (or JSON lines).
pub(super) fn fleet(
    database: &str,
    stale_minutes: u64,
    backlog_minutes: u64,
    json: bool,
) -> anyhow::Result<u8> {
    let rows = runtime()?.block_on(crate::fleet::load(database))?;
    let stale = i64::try_from(stale_minutes.saturating_mul(60)).unwrap_or(i64::MAX);
    let backlog = i64::try_from(backlog_minutes.saturating_mul(60)).unwrap_or(i64::MAX);
    let mut out = String::new();
    if json {
        for row in &rows {
            let mut value = serde_json::to_value(row).context("writing a fleet row as JSON")?;
            value["flags"] = serde_json::json!(row.flags(stale, backlog));
            out.push_str(&value.to_string());
            out.push('\n');
        }
        write_stdout(&out);
        return Ok(EXIT_OK);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.agent_id.clone(),
                r.hostname.clone(),
                r.version.clone(),
                format!("{} ago", age(r.seen_secs_ago)),
                r.records_pending.to_string(),
                r.oldest_pending_age_secs
                    .map(age)
                    .unwrap_or_else(|| "-".into()),
                r.dead_letters.to_string(),
                r.disk_free_bytes
                    .and_then(|b| u64::try_from(b).ok())
                    .map(bytes)
                    .unwrap_or_else(|| "-".into()),
                {
                    let flags = r.flags(stale, backlog);
                    if flags.is_empty() {
                        "ok".into()
                    } else {
                        flags.join(",")
                    }
                },
                r.last_error
                    .as_deref()
                    .map(|e| shorten(e, 60))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "AGENT",
            "HOST",
            "VERSION",
            "SEEN",
            "PENDING",
            "OLDEST_PENDING",
            "DEAD",
            "DISK_FREE",
            "FLAGS",
            "LAST_ERROR",
        ],
        &cells,
    ));
    let flagged = rows
        .iter()
        .filter(|r| !r.flags(stale, backlog).is_empty())
        .count();
    out.push_str(&format!(
        "{} agent(s), {flagged} flagged (STALE: not seen for {stale_minutes} min; BACKLOG: oldest pending over {backlog_minutes} min; DEAD: dead letters)\n",
        rows.len()
    ));
    write_stdout(&out);
    Ok(EXIT_OK)
}
