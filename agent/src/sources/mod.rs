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
//! A cycle keeps reading pages of `page_size` rows while they come back full (catching up, or
//! the initial load), up to `max_records` rows (seed 004's `MaxRecords`), then waits for the
//! next tick. Rows must come ordered by the checkpoint column(s), and with `group_by`, the rows
//! of a group one after another. Times without a zone are read in the source's `time_zone`.
//!
//! A row that cannot become a record (a value that cannot be read, a record its schema
//! refuses) is set aside in the store's `_failed/_refused/` with its reason, and the page's
//! other rows are staged: one bad row never stops a source. `after_stage` marks a staged page's
//! rows taken in a queue table (see `after_stage`), and a block with `each` is a template of
//! several sources (see `template`). `enrich` adds columns to each row through maps and
//! catalogs before it becomes a record (see `enrich`); a refused row whose data was read whole
//! can be staged again by `estafeta retry --send` once its mapping is fixed (see `replay`).

pub mod after_stage;
pub mod enrich;
pub mod health;
mod load;
pub mod mapping;
pub mod query;
mod records;
pub mod replay;
pub mod template;
pub mod transport;

pub use load::load;

use anyhow::Context as _;
use chrono::{DateTime, NaiveDateTime, Utc};
use estafeta_staging::{SourceMark, Staging};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::intake::Intake;
use query::{Param, Row};
use records::{Made, flat, kind_of, records_of};

/// Rows per page when neither `page_size` nor `max_records` is set.
pub const DEFAULT_PAGE_SIZE: usize = 1000;
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

/// `[[sources]]` as written in the TOML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSource {
    name: String,
    url: String,
    query: PathBuf,
    after_stage: Option<PathBuf>,
    schedule: Option<String>,
    every: Option<String>,
    enabled: Option<bool>,
    max_records: Option<usize>,
    page_size: Option<usize>,
    entity: String,
    action: Option<String>,
    action_column: Option<String>,
    key: Option<String>,
    checkpoint: Option<Columns>,
    debounce_secs: Option<u64>,
    debounce: Option<String>,
    debounce_column: Option<String>,
    time_zone: Option<String>,
    group_by: Option<String>,
    items: Option<String>,
    /// A template's list: one source per item (see `template`).
    each: Option<Vec<BTreeMap<String, String>>>,
    /// Constant query parameters (`params = { dias_sem_transito = 30 }`), bound as `:name`:
    /// a period or a code in the configuration rather than written into the SQL file.
    params: Option<BTreeMap<String, ParamValue>>,
    /// Mapping files for `enrich`, `{ name = "file.json" }` relative to the TOML file.
    maps: Option<BTreeMap<String, PathBuf>>,
    /// Catalogs an API serves, for `enrich`'s `catalog(name, id)`.
    catalogs: Option<BTreeMap<String, FileCatalog>>,
    /// Columns added to each row: `{ column = "{{ map('exames', row.codigo) }}" }`.
    enrich: Option<BTreeMap<String, String>>,
}

/// A source's catalog: `GET {url}`, items matched on `key`, cached `ttl_secs`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCatalog {
    url: String,
    key: String,
    /// The environment variable holding the API's token (sent as `Authorization: Bearer`).
    token_env: Option<String>,
    ttl_secs: Option<f64>,
}

/// A `params` value as TOML writes it; bound as text, like a template's variables (cast it in
/// the query where the database wants a number: `:dias::int`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum ParamValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
}

impl ParamValue {
    fn text(&self) -> String {
        match self {
            ParamValue::Int(i) => i.to_string(),
            ParamValue::Float(f) => f.to_string(),
            ParamValue::Bool(b) => b.to_string(),
            ParamValue::Text(t) => t.clone(),
        }
    }
}

/// One column name or several.
#[derive(Debug, Clone, Deserialize)]
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
    /// The statement that marks a staged page's rows taken (queue tables).
    pub after_stage: Option<after_stage::AfterStage>,
    pub when: When,
    pub enabled: bool,
    /// Rows per page: the query's `:limit`.
    pub page_size: usize,
    /// Most rows one cycle reads (seed 004's `MaxRecords`); `None`: pages are read while they
    /// come back full.
    pub max_records: Option<usize>,
    pub entity: String,
    pub action: ActionFrom,
    /// Column whose value is the record key (per-key order at the sinks).
    pub key: Option<String>,
    /// Checkpoint column(s), in the order the query sorts by.
    pub checkpoint: Vec<String>,
    /// Rows whose `debounce_column` is younger than this are left for a later cycle.
    pub debounce: Option<(String, Duration)>,
    /// The zone in which times without a zone (`timestamp`, `DATETIME`) were written; `None`:
    /// UTC.
    pub time_zone: Option<crate::timezone::Zone>,
    /// A template's variables for this expansion, also bound as `:<name>` in the query.
    pub vars: BTreeMap<String, String>,
    pub group_by: Option<String>,
    pub items: String,
    /// Columns added to each row through maps and catalogs (`enrich`), shared by the clones of
    /// this source so a catalog is fetched once per TTL.
    pub enrich: Option<Arc<enrich::Enrich>>,
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
    /// Rows (or groups) set aside under `_failed/_refused/`.
    pub refused: usize,
    /// The time in the checkpoint after the page, when its first column holds one (the
    /// source's lag, see `health`).
    pub newest_row_at: Option<DateTime<Utc>>,
}

/// Reads one page of at most `limit` rows of `source` and stages it with the checkpoint after
/// it.
pub async fn run_page(
    store: &Staging,
    intake: &Intake,
    source: &SourceConfig,
    limit: usize,
) -> anyhow::Result<Page> {
    // A page staged before a crash whose statement did not run yet comes first.
    after_stage::finish(store, source).await?;
    // Catalogs before the rows: one that cannot be fetched fails the cycle before anything is
    // read, so nothing is staged and the checkpoint stays.
    if let Some(enrich) = &source.enrich {
        enrich.refresh(&source.name).await?;
    }
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
    let mut given: BTreeMap<String, Param> = source
        .vars
        .iter()
        .map(|(name, value)| (name.clone(), Param::Text(value.clone())))
        .collect();
    for (column, value) in source.checkpoint.iter().zip(&last) {
        given.insert(format!("last_{column}"), Param::from_json(value));
    }
    given.insert("limit".into(), Param::Int(limit as i64));
    let not_after = now - source.debounce.as_ref().map_or(Duration::ZERO, |(_, d)| *d);
    given.insert("not_after".into(), Param::Text(rfc3339(not_after)));
    // The same instant as the wall clock of the source's zone, for `timestamp` / `DATETIME`
    // columns written in local time.
    given.insert(
        "not_after_local".into(),
        Param::Text(naive(local_wall_clock(source, not_after))),
    );

    let fetched = query::fetch(&source.url, &source.sql, &given).await?;
    let rows = &fetched.rows;
    let full = rows.len() >= limit;
    let kept = cut(source, rows, full, not_after)?;
    let mut page = Page {
        rows: rows.len(),
        records: 0,
        full: full && kept.len() == rows.len(),
        refused: 0,
        newest_row_at: checkpoint_time(source, &last),
    };
    let Some(last_row) = kept.last() else {
        return Ok(page);
    };
    let checkpoint = checkpoint_of(source, last_row)?;
    if let Some(first) = source.checkpoint.first() {
        let value = mapping::column(last_row, first)
            .cloned()
            .unwrap_or(Value::Null);
        page.newest_row_at = checkpoint_time(source, &[value]);
    }
    let mut records = Vec::new();
    let mut refused = 0usize;
    for made in records_of(intake, source, kept, &fetched.unreadable)? {
        match made {
            Made::Record(record) => records.push(record),
            Made::Refused {
                reason,
                rows,
                replayable,
            } => {
                // Durable before the checkpoint moves past it; read again after a crash, it
                // rewrites the same file.
                let at = checkpoint_of(source, rows.last().expect("a group has rows"))?;
                let row = match &rows[..] {
                    [one] => flat(one),
                    many => Value::Array(many.iter().map(flat).collect()),
                };
                let (store, name) = (store.clone(), source.name.clone());
                tokio::task::spawn_blocking(move || {
                    store.refuse_source_row(&name, &at, &reason, row, replayable)
                })
                .await
                .context("setting a row aside panicked")?
                .context("setting a refused row aside failed")?;
                refused += 1;
            }
        }
    }
    if refused > 0 {
        // Counts only: a reason may quote a value, and logs never carry patient data.
        warn!(source = %source.name, refused, "Rows that cannot become records were set aside with their reason under _failed/_refused/; the source moves past them.");
    }
    if let Some(after) = &source.after_stage {
        // Written before the page is staged: a crash after the commit and before the
        // statement leaves it, and the next cycle runs the statement (see `after_stage`).
        let note = after_stage::Note::of(source, after, kept, checkpoint.clone())?;
        let (store, name, bytes) = (store.clone(), source.name.clone(), note.to_bytes());
        tokio::task::spawn_blocking(move || store.set_source_note(&name, Some(&bytes)))
            .await
            .context("writing the after_stage note panicked")?
            .context("writing the after_stage note failed")?;
    }
    page.records = records.len();
    page.refused = refused;
    let (store2, name) = (store.clone(), source.name.clone());
    if records.is_empty() {
        // Every row of the page was refused: only the checkpoint moves.
        tokio::task::spawn_blocking(move || store2.reset_source(&name, Some(&checkpoint)))
            .await
            .context("moving the checkpoint panicked")?
            .context("moving the checkpoint past refused rows failed")?;
    } else {
        let mark = SourceMark { name, checkpoint };
        tokio::task::spawn_blocking(move || store2.stage_from_source(records, mark))
            .await
            .context("staging panicked")?
            .context("staging the rows failed")?;
    }
    after_stage::finish(store, source).await?;
    Ok(page)
}

/// The time a checkpoint's first value holds, if it is one (a time column first).
fn checkpoint_time(source: &SourceConfig, values: &[Value]) -> Option<DateTime<Utc>> {
    health::time_of(values.first()?, |wall| instant_of(source, wall))
}

/// The checkpoint after `row`, as stored: a JSON array of its checkpoint column(s).
fn checkpoint_of(source: &SourceConfig, row: &Row) -> anyhow::Result<String> {
    Ok(serde_json::to_string(
        &source
            .checkpoint
            .iter()
            .map(|c| mapping::column(row, c).cloned().unwrap_or(Value::Null))
            .collect::<Vec<_>>(),
    )?)
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
                    .or_else(|_| parse_naive(text).map(|t| instant_of(source, t))),
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
                warn!(source = %source.name, rows = kept.len(), "One group fills the whole page; it is staged as it is. Raise page_size if groups can be this large.");
            } else {
                kept = &kept[..0];
            }
        }
    }
    Ok(kept)
}

/// A time without a zone, read in the source's `time_zone` (UTC when not set). A wall-clock
/// time that happens twice (the hour repeated when daylight saving ends) is taken as the later
/// one, so a debounce never runs short; one skipped by a change of offset is read with the
/// offset before the change.
fn instant_of(source: &SourceConfig, wall: NaiveDateTime) -> DateTime<Utc> {
    use chrono::{Offset as _, TimeZone as _};
    match &source.time_zone {
        None => wall.and_utc(),
        Some(zone) => match zone.from_local_datetime(&wall).latest() {
            Some(t) => t.with_timezone(&Utc),
            None => {
                let before = zone.offset_from_utc_datetime(&wall);
                (wall - chrono::Duration::seconds(i64::from(before.fix().local_minus_utc())))
                    .and_utc()
            }
        },
    }
}

/// An instant as the wall clock of the source's `time_zone` (UTC when not set).
fn local_wall_clock(source: &SourceConfig, t: DateTime<Utc>) -> NaiveDateTime {
    match &source.time_zone {
        None => t.naive_utc(),
        Some(zone) => t.with_timezone(zone).naive_local(),
    }
}

/// Runs every enabled source on `tracker` until `stop` is cancelled; `staged` is called after
/// each page that staged records (it wakes the batcher when `FLUSH_ON_WRITE` is on). Every
/// cycle is noted in `health`.
#[allow(clippy::too_many_arguments)]
pub fn spawn_all(
    store: &Staging,
    intake: &Arc<Intake>,
    health: &Arc<health::SourcesHealth>,
    sources: &[SourceConfig],
    tz: Option<crate::timezone::Zone>,
    tracker: &TaskTracker,
    stop: &CancellationToken,
    staged: impl Fn() + Clone + Send + Sync + 'static,
) {
    for source in sources.iter().filter(|s| s.enabled) {
        health.register(&source.name);
        let (store, intake, health, source, tz, stop, staged) = (
            store.clone(),
            intake.clone(),
            health.clone(),
            source.clone(),
            tz.clone(),
            stop.clone(),
            staged.clone(),
        );
        tracker.spawn(async move {
            run_source(&store, &intake, &health, &source, tz, &stop, staged).await
        });
    }
}

/// One source's loop: wait for the tick, then read pages while they come back full.
async fn run_source(
    store: &Staging,
    intake: &Intake,
    health: &health::SourcesHealth,
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
        let mut cycle = health::Cycle::default();
        health.started(&source.name, Utc::now());
        let error = loop {
            if stop.is_cancelled() {
                return;
            }
            // What is left of this cycle's `max_records`, a page at most.
            let left = source
                .max_records
                .map_or(usize::MAX, |cap| cap.saturating_sub(rows as usize));
            if left == 0 {
                break None;
            }
            match run_page(store, intake, source, source.page_size.min(left)).await {
                Ok(page) => {
                    rows += page.rows as u64;
                    cycle.records += page.records as u64;
                    cycle.refused += page.refused as u64;
                    cycle.newest_row_at = page.newest_row_at.or(cycle.newest_row_at);
                    cycle.caught_up = !page.full;
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
        cycle.rows = rows;
        cycle.error = error.clone();
        health.finished(&source.name, Utc::now(), cycle);
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
