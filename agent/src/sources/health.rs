//! Source health: what each SQL source's cycles did, kept in memory by the running agent and
//! shown by `GET /v1/status` (`sources`), `/metrics` (`estafeta_source_*`), the status page and
//! `estafeta status`. Updated at the start and the end of every cycle (see `run_source`).
//!
//! Counts since start live here only, not in the staging index: they are the running agent's,
//! like the sinks' drain rates. The index keeps the last run for `estafeta sources` offline.
//!
//! A last error is shown as the cycle wrote it, which is already worded without the URL's
//! password (`query::fetch` redacts it and scrubs the URL's secrets) and without row values
//! (the readers word a database error by its SQLSTATE, and set-aside rows are counted, never
//! quoted); it goes through [`crate::redact::text`] once more as a last guard.
//!
//! **Lag**, how far the source is behind, is chosen by what its checkpoint is:
//! - the checkpoint's first column holds a time (`criado_em`, `atualizado_em`): the age of the
//!   newest row staged, read from the checkpoint, so it is known after a restart too. A quiet
//!   source table reads as a growing lag on purpose: "the newest data here is two hours old"
//!   is what a person watching a hospital feed wants to see, whether the cause is the agent or
//!   the system that writes the table;
//! - otherwise (an id): the time since the last cycle that read everything there was (its last
//!   page came back short, no error), i.e. since the source was last known caught up. A cycle
//!   that finds nothing new is such a cycle; one that reads a short page of new rows is too,
//!   so a busy table read every few seconds does not look ever more behind. Until such a cycle,
//!   the time since the first cycle started.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;

/// One series' value for a source; `None`: the series is left out for it (not known yet).
type SeriesValue = dyn Fn(&SourceHealth) -> Option<f64>;

/// Longest last error kept, in characters: enough for a driver's message and its advice.
const MAX_ERROR_CHARS: usize = 500;

/// What one cycle of one source did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cycle {
    /// Rows the query returned, over the cycle's pages.
    pub rows: u64,
    /// Records staged from them.
    pub records: u64,
    /// Rows (or groups) set aside under `_failed/_refused/`.
    pub refused: u64,
    /// Why the cycle stopped, already redacted; `None`: it ended well.
    pub error: Option<String>,
    /// The cycle read everything there was: its last page came back short.
    pub caught_up: bool,
    /// The time in the checkpoint after the cycle, when its first column holds one.
    pub newest_row_at: Option<DateTime<Utc>>,
}

/// How the lag of a source was measured (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LagFrom {
    /// The age of the newest row staged (a time checkpoint).
    NewestRow,
    /// The time since the source was last caught up.
    CaughtUp,
}

/// One source's health as shown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceHealth {
    pub name: String,
    /// A cycle is under way.
    pub running: bool,
    pub last_run_started_at: Option<String>,
    pub last_run_finished_at: Option<String>,
    /// `ok` or `error`; `None` before the first cycle ends.
    pub outcome: Option<&'static str>,
    pub last_rows: u64,
    pub last_records: u64,
    pub last_refused: u64,
    pub rows_total: u64,
    pub records_total: u64,
    pub refused_total: u64,
    /// Cycles that failed since start.
    pub errors_total: u64,
    pub last_success_at: Option<String>,
    /// The last cycle's error, redacted; `None` once a cycle ends well.
    pub last_error: Option<String>,
    /// How far behind the source is, in seconds; `None` before anything is known.
    pub lag_secs: Option<u64>,
    pub lag_from: Option<LagFrom>,
}

#[derive(Debug, Default)]
struct Entry {
    running: bool,
    first_started: Option<DateTime<Utc>>,
    started: Option<DateTime<Utc>>,
    finished: Option<DateTime<Utc>>,
    last: Cycle,
    ran: bool,
    rows_total: u64,
    records_total: u64,
    refused_total: u64,
    errors_total: u64,
    last_success: Option<DateTime<Utc>>,
    caught_up_at: Option<DateTime<Utc>>,
    newest_row_at: Option<DateTime<Utc>>,
}

/// Every source's health, by name. Shared by the sources' loops (writers) and the API.
#[derive(Debug, Default)]
pub struct SourcesHealth {
    sources: Mutex<BTreeMap<String, Entry>>,
}

impl SourcesHealth {
    /// Lists a source before its first cycle, so it is shown as not run yet.
    pub fn register(&self, name: &str) {
        self.lock().entry(name.to_owned()).or_default();
    }

    /// A cycle of `name` starts at `at`.
    pub fn started(&self, name: &str, at: DateTime<Utc>) {
        let mut all = self.lock();
        let entry = all.entry(name.to_owned()).or_default();
        entry.running = true;
        entry.started = Some(at);
        entry.first_started.get_or_insert(at);
    }

    /// A cycle of `name` ended at `at`, having done `cycle`.
    pub fn finished(&self, name: &str, at: DateTime<Utc>, mut cycle: Cycle) {
        let mut all = self.lock();
        let entry = all.entry(name.to_owned()).or_default();
        entry.running = false;
        entry.finished = Some(at);
        entry.ran = true;
        entry.rows_total += cycle.rows;
        entry.records_total += cycle.records;
        entry.refused_total += cycle.refused;
        match &cycle.error {
            Some(_) => entry.errors_total += 1,
            None => {
                entry.last_success = Some(at);
                if cycle.caught_up {
                    // Caught up as of the cycle's start: rows written during it may wait.
                    entry.caught_up_at = entry.started.or(Some(at));
                }
            }
        }
        if cycle.newest_row_at.is_some() {
            entry.newest_row_at = cycle.newest_row_at;
        }
        cycle.error = cycle.error.map(|e| shown_error(&e));
        entry.last = cycle;
    }

    /// Every source's health as of `now`, by name.
    pub fn snapshot(&self, now: DateTime<Utc>) -> Vec<SourceHealth> {
        let time = |t: Option<DateTime<Utc>>| t.map(super::rfc3339);
        self.lock()
            .iter()
            .map(|(name, e)| {
                let (lag_from, since) = match (e.newest_row_at, e.caught_up_at) {
                    (Some(newest), _) => (Some(LagFrom::NewestRow), Some(newest)),
                    (None, Some(at)) => (Some(LagFrom::CaughtUp), Some(at)),
                    (None, None) => (e.first_started.map(|_| LagFrom::CaughtUp), e.first_started),
                };
                SourceHealth {
                    name: name.clone(),
                    running: e.running,
                    last_run_started_at: time(e.started),
                    last_run_finished_at: time(e.finished),
                    outcome: e.ran.then_some(if e.last.error.is_some() {
                        "error"
                    } else {
                        "ok"
                    }),
                    last_rows: e.last.rows,
                    last_records: e.last.records,
                    last_refused: e.last.refused,
                    rows_total: e.rows_total,
                    records_total: e.records_total,
                    refused_total: e.refused_total,
                    errors_total: e.errors_total,
                    last_success_at: time(e.last_success),
                    last_error: e.last.error.clone(),
                    // A row "from the future" (a clock ahead of ours) is no lag.
                    lag_secs: since.map(|t| (now - t).num_seconds().max(0) as u64),
                    lag_from,
                }
            })
            .collect()
    }

    /// The `estafeta_source_*` series of every source, in the Prometheus text format.
    pub fn render(&self, now: DateTime<Utc>, out: &mut String) {
        let all = self.snapshot(now);
        if all.is_empty() {
            return;
        }
        let label = |s: &SourceHealth| crate::metrics::escape_label(&s.name);
        let series: [(&str, &str, &str, &SeriesValue); 7] = [
            (
                "estafeta_source_rows_total",
                "counter",
                "Rows read from the source's query since start.",
                &|s| Some(s.rows_total as f64),
            ),
            (
                "estafeta_source_records_total",
                "counter",
                "Records staged from the source's rows since start.",
                &|s| Some(s.records_total as f64),
            ),
            (
                "estafeta_source_refused_total",
                "counter",
                "Source rows set aside (_failed/_refused/) since start.",
                &|s| Some(s.refused_total as f64),
            ),
            (
                "estafeta_source_errors_total",
                "counter",
                "Source cycles that failed since start.",
                &|s| Some(s.errors_total as f64),
            ),
            (
                "estafeta_source_up",
                "gauge",
                "1 when the source's last cycle ended well, 0 when it failed; absent before its first cycle ends.",
                &|s| s.outcome.map(|o| if o == "ok" { 1.0 } else { 0.0 }),
            ),
            (
                "estafeta_source_last_success_timestamp_seconds",
                "gauge",
                "Unix time the source's last successful cycle ended; absent before one.",
                &|s| {
                    s.last_success_at
                        .as_deref()
                        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                        .map(|t| t.timestamp_micros() as f64 / 1e6)
                },
            ),
            (
                "estafeta_source_lag_seconds",
                "gauge",
                "How far the source is behind: the age of the newest row staged (time checkpoint), else the time since it was last caught up.",
                &|s| s.lag_secs.map(|l| l as f64),
            ),
        ];
        for (name, kind, help, value) in series {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for source in &all {
                if let Some(v) = value(source) {
                    let _ = writeln!(out, "{name}{{source=\"{}\"}} {v}", label(source));
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        // A count is never left half-updated: a panic elsewhere does not make it unusable.
        self.sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// An error as shown: redacted once more and cut to [`MAX_ERROR_CHARS`].
fn shown_error(error: &str) -> String {
    let text = crate::redact::text(error);
    match text.char_indices().nth(MAX_ERROR_CHARS) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

/// The time a checkpoint value holds, if it is one: RFC 3339, or a time without a zone read by
/// `instant` (in the source's `time_zone`).
pub fn time_of(
    value: &serde_json::Value,
    instant: impl Fn(chrono::NaiveDateTime) -> DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let text = value.as_str()?;
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .ok()
        .or_else(|| super::parse_naive(text).ok().map(instant))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn counts_add_up_and_the_last_error_clears_when_a_cycle_ends_well() {
        let health = SourcesHealth::default();
        health.register("exames");
        assert_eq!(health.snapshot(at(0))[0].outcome, None);
        health.started("exames", at(0));
        health.finished(
            "exames",
            at(1),
            Cycle {
                rows: 5,
                records: 4,
                refused: 1,
                caught_up: true,
                ..Default::default()
            },
        );
        health.started("exames", at(10));
        health.finished(
            "exames",
            at(11),
            Cycle {
                error: Some("postgres://u:pw@h/db: PostgreSQL 42P01 undefined table".into()),
                ..Default::default()
            },
        );
        let s = &health.snapshot(at(20))[0];
        assert_eq!(s.outcome, Some("error"));
        assert_eq!((s.rows_total, s.records_total, s.refused_total), (5, 4, 1));
        assert_eq!((s.last_rows, s.errors_total), (0, 1));
        let error = s.last_error.as_deref().unwrap();
        assert!(error.contains("42P01") && !error.contains("pw@"), "{error}");
        // Caught up at the start of the first cycle, twenty seconds ago.
        assert_eq!(
            (s.lag_secs, s.lag_from),
            (Some(20), Some(LagFrom::CaughtUp))
        );
        assert_eq!(
            s.last_success_at.as_deref(),
            Some(super::super::rfc3339(at(1)).as_str())
        );

        health.started("exames", at(30));
        health.finished(
            "exames",
            at(31),
            Cycle {
                caught_up: true,
                newest_row_at: Some(at(25)),
                ..Default::default()
            },
        );
        let s = &health.snapshot(at(40))[0];
        assert_eq!((s.outcome, s.last_error.clone()), (Some("ok"), None));
        assert_eq!(
            (s.lag_secs, s.lag_from),
            (Some(15), Some(LagFrom::NewestRow))
        );

        let mut text = String::new();
        health.render(at(40), &mut text);
        assert!(
            text.contains("estafeta_source_rows_total{source=\"exames\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("estafeta_source_errors_total{source=\"exames\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("estafeta_source_up{source=\"exames\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("estafeta_source_lag_seconds{source=\"exames\"} 15\n"),
            "{text}"
        );
        assert!(text.contains(&format!(
            "estafeta_source_last_success_timestamp_seconds{{source=\"exames\"}} {}\n",
            at(31).timestamp()
        )));
    }

    #[test]
    fn a_checkpoint_holds_a_time_only_when_it_reads_as_one() {
        let utc = |wall: chrono::NaiveDateTime| wall.and_utc();
        let zoned = serde_json::json!("2026-11-23T10:30:00.000000Z");
        assert_eq!(
            time_of(&zoned, utc).unwrap().to_rfc3339(),
            "2026-11-23T10:30:00+00:00"
        );
        // A time without a zone goes through the source's zone (here, three hours behind).
        let wall = serde_json::json!("2026-11-23 10:30:00");
        let sao_paulo = |wall: chrono::NaiveDateTime| wall.and_utc() + chrono::Duration::hours(3);
        assert_eq!(
            time_of(&wall, sao_paulo).unwrap().to_rfc3339(),
            "2026-11-23T13:30:00+00:00"
        );
        // An id is no time: the lag is then the time since the source was caught up.
        assert_eq!(time_of(&serde_json::json!(1500), utc), None);
        assert_eq!(time_of(&serde_json::json!("1500"), utc), None);
    }

    #[test]
    fn a_long_error_is_cut() {
        let shown = shown_error(&"x".repeat(2000));
        assert_eq!(shown.chars().count(), MAX_ERROR_CHARS + 1);
    }
}
