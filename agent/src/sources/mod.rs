//! Sources: SQL queries run on a schedule against a hospital database, whose new rows become
//! staged records (what seeds 000, 003 and 004 did with their own scripts).
//!
//! A source pages through its table by a **checkpoint**: one column, or several (a timestamp
//! with an id as tie-breaker), whose values in the last row read are stored with the records
//! that row produced, in the same commit (see `Staging::stage_from_source`). The query gets
//! them back as bound parameters (`:last_<column>`), with the page size (`:limit`) and the
//! debounce cut-off (`:not_after`), so after a crash at any moment no row is skipped and none
//! is staged twice. With no checkpoint yet, `:last_<column>` is NULL and the query reads from
//! the beginning: the initial load, a page at a time, each page committed before the next.
//!
//! A cycle keeps reading pages while they come back full (catching up, or the initial load),
//! then waits for the next tick. Rows must come ordered by the checkpoint column(s), and with
//! `group_by`, the rows of a group one after another.

pub mod mapping;
pub mod query;
pub mod transport;

use anyhow::Context as _;
use chrono::{DateTime, NaiveDateTime, Utc};
use estafeta_staging::{NewRecord, SourceMark, Staging};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::intake::{Intake, KeyFrom};
use crate::problem::Problem;
use query::{Param, Row};

/// Page size when `max_records` is not set.
pub const DEFAULT_MAX_RECORDS: usize = 1000;
/// Name of the grouped rows' array when `items` is not set.
pub const DEFAULT_ITEMS: &str = "items";
/// Pause before a failed cycle is tried again when the schedule is far away.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(30);

/// RFC 3339 in UTC with microseconds, the form timestamps with a zone take in payloads.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// A timestamp without a zone, as its wall-clock value (`2026-11-23T10:30:00.000000`).
pub fn naive(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
}

/// Reads back [`naive`] (and the space-separated form databases print).
pub fn parse_naive(text: &str) -> Result<NaiveDateTime, chrono::ParseError> {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f"))
}

/// `every = "10s"`: a whole number with ms, s, m or h.
fn parse_every(text: &str) -> Option<Duration> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit())?;
    let n: u64 = text[..digits].parse().ok().filter(|n| *n > 0)?;
    match text[digits..].trim() {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" | "min" => Some(Duration::from_secs(n * 60)),
        "h" => Some(Duration::from_secs(n * 3600)),
        _ => None,
    }
}

/// `[[sources]]` as written in the TOML file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSource {
    name: String,
    url: String,
    query: PathBuf,
    schedule: Option<String>,
    every: Option<String>,
    enabled: Option<bool>,
    max_records: Option<usize>,
    entity: String,
    action: Option<String>,
    action_column: Option<String>,
    key: Option<String>,
    checkpoint: Option<Columns>,
    debounce_secs: Option<u64>,
    debounce_column: Option<String>,
    group_by: Option<String>,
    items: Option<String>,
}

/// One column name or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Columns {
    One(String),
    Many(Vec<String>),
}

/// When a source runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum When {
    /// A cron expression, read in `TZ` like `CRONTAB`.
    Cron(String),
    /// A fixed interval between the end of a cycle and the start of the next.
    Every(Duration),
}

/// Where a record's action comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionFrom {
    Fixed(String),
    Column(String),
}

/// One source, checked.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    /// The database URL (its password is never shown: see `query::shown_and_secrets`).
    pub url: String,
    pub query_path: PathBuf,
    /// The query file's text, read when the configuration is loaded.
    pub sql: String,
    pub when: When,
    pub enabled: bool,
    /// Rows per page (seed 004's `MaxRecords`).
    pub max_records: usize,
    pub entity: String,
    pub action: ActionFrom,
    /// Column whose value is the record key (per-key order at the sinks).
    pub key: Option<String>,
    /// Checkpoint column(s), in the order the query sorts by.
    pub checkpoint: Vec<String>,
    /// Rows whose `debounce_column` is younger than this are left for a later cycle.
    pub debounce: Option<(String, Duration)>,
    pub group_by: Option<String>,
    pub items: String,
}

/// Checks `[[sources]]`; each mistake becomes a [`Problem`] naming the key.
pub fn load(
    file: &[FileSource],
    file_dir: &Path,
    problems: &mut Vec<Problem>,
) -> Vec<SourceConfig> {
    let mut out: Vec<SourceConfig> = Vec::new();
    for (i, src) in file.iter().enumerate() {
        let at = |field: &str| format!("sources[{i}].{field}");
        let mut problem = |field: &str, value: Option<String>, expected: String| {
            problems.push(Problem::new(at(field), value, expected));
        };
        if let Err(err) = estafeta_staging::validate_name("source", &src.name) {
            problem("name", Some(src.name.clone()), err.to_string());
        }
        if out.iter().any(|s| s.name == src.name) {
            problem(
                "name",
                Some(src.name.clone()),
                "expected a name no other source uses".into(),
            );
        }
        if let Err(err) = query::check_url(&src.url) {
            problem("url", Some(query::shown_and_secrets(&src.url).0), err);
        }
        let query_path = file_dir.join(&src.query);
        let sql = match std::fs::read_to_string(&query_path) {
            Ok(sql) if sql.trim().is_empty() => {
                problem(
                    "query",
                    Some(query_path.display().to_string()),
                    "the file is empty; write the SELECT there".into(),
                );
                String::new()
            }
            Ok(sql) => {
                if let Ok(driver) = query::Driver::of(&src.url)
                    && let Err(err) = driver.rewrite(&sql)
                {
                    problem("query", Some(query_path.display().to_string()), err);
                }
                sql
            }
            Err(err) => {
                problem(
                    "query",
                    Some(query_path.display().to_string()),
                    format!(
                        "cannot read it ({err}); expected a .sql file, relative to the TOML file's folder (for example sql/sources/{}.sql)",
                        src.name
                    ),
                );
                String::new()
            }
        };
        let when = match (&src.schedule, &src.every) {
            (Some(cron), None) => {
                if let Err(err) = crate::crontab::validate_crontab(cron) {
                    problem("schedule", Some(cron.clone()), err);
                }
                When::Cron(cron.clone())
            }
            (None, Some(every)) => match parse_every(every) {
                Some(d) => When::Every(d),
                None => {
                    problem(
                        "every",
                        Some(every.clone()),
                        "expected a duration such as \"10s\", \"5m\" or \"1h\"".into(),
                    );
                    When::Every(Duration::from_secs(60))
                }
            },
            _ => {
                problem(
                    "schedule",
                    None,
                    "expected exactly one of schedule (cron, like CRONTAB) or every (\"10s\")"
                        .into(),
                );
                When::Every(Duration::from_secs(60))
            }
        };
        let max_records = src.max_records.unwrap_or(DEFAULT_MAX_RECORDS);
        if max_records == 0 {
            problem(
                "max_records",
                Some("0".into()),
                "expected at least 1".into(),
            );
        }
        if let Err(err) = estafeta_staging::validate_name("entity", &src.entity) {
            problem("entity", Some(src.entity.clone()), err.to_string());
        }
        let action = match (&src.action, &src.action_column) {
            (Some(action), None) => {
                if let Err(err) = estafeta_staging::validate_name("action", action) {
                    problem("action", Some(action.clone()), err.to_string());
                }
                ActionFrom::Fixed(action.clone())
            }
            (None, Some(column)) => ActionFrom::Column(column.clone()),
            _ => {
                problem("action", None, "expected exactly one of action (create, update, upsert, delete) or action_column".into());
                ActionFrom::Fixed("create".into())
            }
        };
        let checkpoint = match &src.checkpoint {
            Some(Columns::One(c)) => vec![c.clone()],
            Some(Columns::Many(cs)) => cs.clone(),
            None => Vec::new(),
        };
        if checkpoint.is_empty() {
            problem("checkpoint", None, "expected the column (or columns, such as [\"updated_at\", \"id\"]) the query sorts by, so each cycle reads only new rows".into());
        }
        for column in &checkpoint {
            if !column
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
                || column.is_empty()
            {
                problem("checkpoint", Some(column.clone()), "expected a column name of letters, digits and '_' (it becomes the parameter :last_<column>)".into());
            }
        }
        let debounce = match (src.debounce_secs, &src.debounce_column) {
            (None | Some(0), None) => None,
            (Some(secs), Some(column)) if secs > 0 => {
                Some((column.clone(), Duration::from_secs(secs)))
            }
            (Some(0), Some(_)) => None,
            _ => {
                problem("debounce_column", None, "debounce_secs and debounce_column go together: the timestamp column that says when a row was written".into());
                None
            }
        };
        if let Some(key) = &src.key
            && key.is_empty()
        {
            problem("key", Some(String::new()), "expected a column name".into());
        }
        out.push(SourceConfig {
            name: src.name.clone(),
            url: src.url.clone(),
            query_path,
            sql,
            when,
            enabled: src.enabled.unwrap_or(true),
            max_records,
            entity: src.entity.clone(),
            action,
            key: src.key.clone(),
            checkpoint,
            debounce,
            group_by: src.group_by.clone(),
            items: src
                .items
                .clone()
                .unwrap_or_else(|| DEFAULT_ITEMS.to_owned()),
        });
    }
    out
}

/// What one page did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Page {
    /// Rows the query returned.
    pub rows: usize,
    /// Records staged from them.
    pub records: usize,
    /// The page was full: more rows are probably waiting.
    pub full: bool,
}

/// Reads one page of `source` and stages it with the checkpoint after it.
pub async fn run_page(
    store: &Staging,
    intake: &Intake,
    source: &SourceConfig,
) -> anyhow::Result<Page> {
    let checkpoint = {
        let store = store.clone();
        let name = source.name.clone();
        tokio::task::spawn_blocking(move || store.source_checkpoint(&name))
            .await
            .context("reading the checkpoint panicked")??
    };
    let last: Vec<Value> = match &checkpoint {
        Some(text) => match serde_json::from_str::<Value>(text)? {
            Value::Array(values) if values.len() == source.checkpoint.len() => values,
            _ => anyhow::bail!(
                "the stored checkpoint {text} does not match checkpoint = {:?}; rewind with `estafeta sources reset {}`",
                source.checkpoint,
                source.name
            ),
        },
        None => vec![Value::Null; source.checkpoint.len()],
    };
    let now = Utc::now();
    let mut given: BTreeMap<String, Param> = BTreeMap::new();
    for (column, value) in source.checkpoint.iter().zip(&last) {
        given.insert(format!("last_{column}"), Param::from_json(value));
    }
    given.insert("limit".into(), Param::Int(source.max_records as i64));
    let not_after = now - source.debounce.as_ref().map_or(Duration::ZERO, |(_, d)| *d);
    given.insert("not_after".into(), Param::Text(rfc3339(not_after)));

    let rows = query::fetch(&source.url, &source.sql, &given).await?;
    let full = rows.len() >= source.max_records;
    let kept = cut(source, &rows, full, not_after)?;
    let mut page = Page {
        rows: rows.len(),
        records: 0,
        full: full && kept.len() == rows.len(),
    };
    let Some(last_row) = kept.last() else {
        return Ok(page);
    };
    let mark = SourceMark {
        name: source.name.clone(),
        checkpoint: serde_json::to_string(
            &source
                .checkpoint
                .iter()
                .map(|c| mapping::column(last_row, c).cloned().unwrap_or(Value::Null))
                .collect::<Vec<_>>(),
        )?,
    };
    let records = records(intake, source, kept)?;
    page.records = records.len();
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.stage_from_source(records, mark))
        .await
        .context("staging panicked")?
        .context("staging the rows failed")?;
    Ok(page)
}

/// The rows of a page that become records now: up to the first row younger than the debounce
/// cut-off, and without a trailing group a full page may have cut in two.
fn cut<'r>(
    source: &SourceConfig,
    rows: &'r [Row],
    full: bool,
    not_after: DateTime<Utc>,
) -> anyhow::Result<&'r [Row]> {
    for column in source
        .checkpoint
        .iter()
        .chain(source.key.iter())
        .chain(source.group_by.iter())
    {
        if let Some(first) = rows.first()
            && mapping::column(first, column).is_none()
        {
            anyhow::bail!(
                "the query returns no column {column:?} (it returns {}); fix the query or the source's settings",
                first
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let mut end = rows.len();
    if let Some((column, _)) = &source.debounce {
        for (i, row) in rows.iter().enumerate() {
            let written = match mapping::column(row, column) {
                Some(Value::String(text)) => DateTime::parse_from_rfc3339(text)
                    .map(|t| t.with_timezone(&Utc))
                    .or_else(|_| parse_naive(text).map(|t| t.and_utc())),
                other => {
                    anyhow::bail!(
                        "debounce_column {column:?} holds {}, not a timestamp",
                        kind_of(other)
                    )
                }
            };
            let written = written
                .with_context(|| format!("debounce_column {column:?} does not hold a timestamp"))?;
            if written > not_after {
                end = i;
                break;
            }
        }
    }
    let mut kept = &rows[..end];
    if let Some(group_by) = &source.group_by
        && let Some(last) = kept.last()
    {
        // The last group may go on past the cut: after a debounce cut, when the row cut off
        // belongs to it; at the end of a full page, always possibly. It is then left whole for
        // a later cycle, unless it is the only group of a full page (a group larger than a
        // page is taken as it is, or it would never be taken).
        let may_go_on = match rows.get(end) {
            Some(next) => mapping::column(next, group_by) == mapping::column(last, group_by),
            None => full,
        };
        if may_go_on {
            let groups = mapping::runs(kept, group_by);
            if groups.len() > 1 {
                let trailing = groups.last().map_or(0, |g| g.len());
                kept = &kept[..kept.len() - trailing];
            } else if end == rows.len() {
                warn!(source = %source.name, rows = kept.len(), "One group fills the whole page; it is staged as it is. Raise max_records if groups can be this large.");
            } else {
                kept = &kept[..0];
            }
        }
    }
    Ok(kept)
}

/// What a column holds, by JSON type: an error names the type, never the value (a row's values
/// are patient data, and errors are logged and shown by `estafeta sources`).
fn kind_of(value: Option<&Value>) -> &'static str {
    match value {
        None => "nothing (the query returns no such column)",
        Some(Value::Null) => "NULL",
        Some(Value::Bool(_)) => "a boolean",
        Some(Value::Number(_)) => "a number",
        Some(Value::String(_)) => "text",
        Some(Value::Array(_)) => "an array",
        Some(Value::Object(_)) => "an object",
    }
}

/// Turns kept rows into records: one per row, or one per group, through the one intake (routes
/// and the entity's JSON Schema as for a record posted to the API). A record that breaks the
/// schema fails the cycle like any other bad row: nothing of the page is staged, the checkpoint
/// stays, and the error (shown by `estafeta sources`) says what to fix.
fn records(intake: &Intake, source: &SourceConfig, rows: &[Row]) -> anyhow::Result<Vec<NewRecord>> {
    let groups: Vec<&[Row]> = match &source.group_by {
        Some(group_by) => mapping::runs(rows, group_by),
        None => rows.chunks(1).collect(),
    };
    let mut out = Vec::with_capacity(groups.len());
    for (index, group) in groups.into_iter().enumerate() {
        let first = &group[0];
        let payload: Map<String, Value> = match &source.group_by {
            Some(_) => mapping::group(group, &source.items),
            None => mapping::nest(first),
        }
        .map_err(|err| {
            anyhow::anyhow!(
                "{err}; fix the column aliases in {}",
                source.query_path.display()
            )
        })?;
        let action = match &source.action {
            ActionFrom::Fixed(action) => action.clone(),
            ActionFrom::Column(column) => match mapping::column(first, column) {
                Some(Value::String(action)) => action.to_ascii_lowercase(),
                other => anyhow::bail!(
                    "action_column {column:?} holds {}; expected create, update, upsert or delete",
                    kind_of(other)
                ),
            },
        };
        let key = match &source.key {
            Some(column) => match mapping::column(first, column) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                Some(Value::Null) | None => None,
                Some(other) => Some(other.to_string()),
            },
            None => None,
        };
        let record = intake
            .record(
                &action,
                &source.entity,
                &Value::Object(payload),
                &KeyFrom::Given(key),
            )
            .map_err(|err| {
                anyhow::anyhow!(
                    "{err} (record {index} of the page, counted from the row after the checkpoint); fix that row in the database or [entities.{}].schema: the source waits at this row and tries it again each cycle",
                    source.entity
                )
            })?;
        out.push(record);
    }
    Ok(out)
}

/// Runs every enabled source on `tracker` until `stop` is cancelled; `staged` is called after
/// each page that staged records (it wakes the batcher when `FLUSH_ON_WRITE` is on).
pub fn spawn_all(
    store: &Staging,
    intake: &Arc<Intake>,
    sources: &[SourceConfig],
    tz: Option<crate::timezone::Zone>,
    tracker: &TaskTracker,
    stop: &CancellationToken,
    staged: impl Fn() + Clone + Send + Sync + 'static,
) {
    for source in sources.iter().filter(|s| s.enabled) {
        let (store, intake, source, tz, stop, staged) = (
            store.clone(),
            intake.clone(),
            source.clone(),
            tz.clone(),
            stop.clone(),
            staged.clone(),
        );
        tracker.spawn(async move { run_source(&store, &intake, &source, tz, &stop, staged).await });
    }
}

/// One source's loop: wait for the tick, then read pages while they come back full.
async fn run_source(
    store: &Staging,
    intake: &Intake,
    source: &SourceConfig,
    tz: Option<crate::timezone::Zone>,
    stop: &CancellationToken,
    staged: impl Fn(),
) {
    let cron = match &source.when {
        When::Cron(expr) => match crate::crontab::Schedule::new(expr, tz) {
            Ok(schedule) => Some(schedule),
            Err(err) => {
                warn!(source = %source.name, error = format!("{err:#}"), "The source's schedule is not valid; it will not run.");
                return;
            }
        },
        When::Every(_) => None,
    };
    info!(source = %source.name, url = %query::shown_and_secrets(&source.url).0, "Source started.");
    if query::clear_beyond_loopback(&source.url) {
        warn!(
            source = %source.name,
            url = %query::shown_and_secrets(&source.url).0,
            "sslmode=disable to a host beyond loopback: rows cross the network in clear text; use sslmode=verify-full (the default) unless this network is trusted."
        );
    }
    let mut first = true;
    let mut failed = false;
    loop {
        let wait = if first {
            Duration::ZERO
        } else {
            match (&cron, &source.when) {
                (Some(schedule), _) => match schedule.next_after(Utc::now()) {
                    Some(next) => (next - Utc::now()).to_std().unwrap_or_default(),
                    None => return,
                },
                (None, When::Every(every)) => *every,
                (None, When::Cron(_)) => return,
            }
        };
        first = false;
        // After a failure, a far-away tick would leave the error standing for long.
        let wait = if failed {
            wait.min(RETRY_AFTER_ERROR)
        } else {
            wait
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        let mut rows = 0u64;
        let error = loop {
            if stop.is_cancelled() {
                return;
            }
            match run_page(store, intake, source).await {
                Ok(page) => {
                    rows += page.rows as u64;
                    if page.records > 0 {
                        staged();
                        info!(source = %source.name, rows = page.rows, records = page.records, "Source rows staged.");
                    }
                    if !page.full {
                        break None;
                    }
                }
                Err(err) => break Some(format!("{err:#}")),
            }
        };
        if let Some(error) = &error {
            warn!(source = %source.name, error = %error, "The source's cycle failed; it will run again at the next tick.");
        }
        let note = {
            let (store, name, error) = (store.clone(), source.name.clone(), error.clone());
            tokio::task::spawn_blocking(move || {
                store.note_source_run(&name, rows, error.as_deref())
            })
            .await
        };
        if !matches!(note, Ok(Ok(()))) {
            warn!(source = %source.name, "Could not note the source's last run in the staging index.");
        }
        failed = error.is_some();
    }
}
