//! Counters shared by the ingest API and the batcher, and their rendering in the Prometheus
//! text format (version 0.0.4), written by hand: a handful of lines does not need a crate.
//! Gauges (pending, dead, bytes, disk free) come from the store's status at scrape time.
//! The drain rate of each sink (records delivered per second over the last [`DRAIN_WINDOW`])
//! and its time to empty come from the flush reports too, for `GET /v1/status`.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use estafeta_staging::Status;
use serde::Serialize;

/// What one flush cycle of one sink did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FlushReport {
    pub sink: String,
    pub delivered: u64,
    pub retried: u64,
    pub dead: u64,
    /// Records built and logged but not sent (`DRY_RUN`).
    pub dry_run: u64,
}

/// How far back the drain rate looks: long enough to smooth over cycles that deliver in bursts,
/// short enough that a sink that stopped answering shows "not draining" within a minute.
pub const DRAIN_WINDOW: Duration = Duration::from_secs(60);

/// Process-wide counters. Cheap to update from any task.
#[derive(Debug)]
pub struct Metrics {
    records_staged: AtomicU64,
    /// Ingest answers by HTTP status code.
    requests: Mutex<BTreeMap<u16, u64>>,
    /// Delivery outcomes by (sink, outcome).
    deliveries: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Recent flush cycles per sink, for the drain rate.
    drains: Mutex<BTreeMap<String, DrainLog>>,
    /// When counting started: the start of a sink's first cycle.
    started: Instant,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::starting_at(Instant::now())
    }
}

/// The flush cycles of one sink that ended within the window, so that the rate divides what
/// they delivered by the time they took: from the end of the cycle before the first of them
/// (a cycle starts when the one before it ended, or waits for the next tick, which is part of
/// draining too) to now.
#[derive(Debug)]
struct DrainLog {
    /// (end of the cycle, records delivered), oldest first.
    cycles: VecDeque<(Instant, u64)>,
    /// End of the last cycle that left the window, or when counting started.
    before: Instant,
    /// Records of the cycle under way already counted by [`Metrics::add_progress`].
    in_cycle: u64,
}

impl DrainLog {
    fn push(&mut self, end: Instant, delivered: u64) {
        match self.cycles.back_mut() {
            // An idle sink ticks every second or so: consecutive empty cycles only move the
            // boundary, they need not be kept one by one.
            Some(last) if last.1 == 0 && delivered == 0 => last.0 = end,
            _ => self.cycles.push_back((end, delivered)),
        }
        if let Some(cutoff) = end.checked_sub(DRAIN_WINDOW) {
            self.forget_before(cutoff);
        }
    }

    fn forget_before(&mut self, cutoff: Instant) {
        while let Some(&(end, _)) = self.cycles.front() {
            if end >= cutoff {
                break;
            }
            self.before = end;
            self.cycles.pop_front();
        }
    }

    fn rate(&mut self, now: Instant) -> f64 {
        self.forget_before(now.checked_sub(DRAIN_WINDOW).unwrap_or(self.before));
        let mut from = match now.checked_sub(DRAIN_WINDOW) {
            Some(cutoff) => self.before.max(cutoff),
            None => self.before,
        };
        let mut delivered = 0;
        for &(end, n) in &self.cycles {
            if delivered == 0 && n == 0 {
                // Idle before the drain began: the rate is that of the drain, not diluted by
                // the quiet time before the backlog arrived or the sink came back.
                from = from.max(end);
            }
            delivered += n;
        }
        if delivered == 0 {
            return 0.0;
        }
        // At least a second: a cycle that ended a moment after the agent started would
        // otherwise read as an absurd rate.
        let secs = now.saturating_duration_since(from).as_secs_f64().max(1.0);
        delivered as f64 / secs
    }
}

/// A copy of the ingest counters, for `/v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct IngestCounters {
    pub records_staged: u64,
    /// Answers of `POST /v1/records/…` by HTTP status code.
    pub requests: BTreeMap<String, u64>,
}

impl Metrics {
    /// Metrics whose drain rates count from `started` (tests pass their own clock).
    pub fn starting_at(started: Instant) -> Self {
        Self {
            records_staged: AtomicU64::new(0),
            requests: Mutex::default(),
            deliveries: Mutex::default(),
            drains: Mutex::default(),
            started,
        }
    }

    /// Counts one answer of `POST /v1/records/…`.
    pub fn record_request(&self, status: u16) {
        *lock(&self.requests).entry(status).or_default() += 1;
    }

    /// Counts records newly staged (not replays).
    pub fn add_staged(&self, records: u64) {
        self.records_staged.fetch_add(records, Ordering::Relaxed);
    }

    /// Counts the outcomes of one flush cycle, ended now.
    pub fn add_flush(&self, report: &FlushReport) {
        self.add_flush_at(report, Instant::now());
    }

    /// Counts records delivered to `sink` by one batch of a cycle still under way, so that the
    /// drain rate moves during a long cycle (`MAX_RECORDS` records can take minutes); the
    /// cycle's [`FlushReport`] then adds only what was not counted this way.
    pub fn add_progress(&self, sink: &str, delivered: u64) {
        self.add_progress_at(sink, delivered, Instant::now());
    }

    pub fn add_progress_at(&self, sink: &str, delivered: u64, at: Instant) {
        let mut drains = lock(&self.drains);
        let log = self.drain_log(&mut drains, sink);
        log.in_cycle += delivered;
        log.push(at, delivered);
    }

    fn drain_log<'a>(
        &self,
        drains: &'a mut BTreeMap<String, DrainLog>,
        sink: &str,
    ) -> &'a mut DrainLog {
        drains.entry(sink.to_owned()).or_insert_with(|| DrainLog {
            cycles: VecDeque::new(),
            before: self.started,
            in_cycle: 0,
        })
    }

    /// Counts the outcomes of one flush cycle that ended at `end`.
    pub fn add_flush_at(&self, report: &FlushReport, end: Instant) {
        {
            let mut drains = lock(&self.drains);
            let log = self.drain_log(&mut drains, &report.sink);
            let rest = report.delivered.saturating_sub(log.in_cycle);
            log.in_cycle = 0;
            log.push(end, rest);
        }
        let mut deliveries = lock(&self.deliveries);
        for (outcome, n) in [
            ("delivered", report.delivered),
            ("retry", report.retried),
            ("dead", report.dead),
            ("dry_run", report.dry_run),
        ] {
            if n > 0 {
                *deliveries
                    .entry((report.sink.clone(), outcome))
                    .or_default() += n;
            }
        }
    }

    /// Records delivered to `sink` per second over the last [`DRAIN_WINDOW`] before `now`;
    /// zero for a sink that delivered nothing in it.
    pub fn drain_rate_at(&self, sink: &str, now: Instant) -> f64 {
        lock(&self.drains)
            .get_mut(sink)
            .map_or(0.0, |log| log.rate(now))
    }

    /// Fills each sink's drain rate and time to empty into a status read from the store.
    pub fn fill_drain(&self, status: &mut Status) {
        self.fill_drain_at(status, Instant::now());
    }

    pub fn fill_drain_at(&self, status: &mut Status, now: Instant) {
        for sink in &mut status.sinks {
            let rate = self.drain_rate_at(&sink.sink, now);
            // One decimal is all a person reads, and keeps the JSON short.
            sink.drain_rate_per_sec = Some((rate * 10.0).round() / 10.0);
            sink.time_to_empty_secs = time_to_empty(sink.pending + sink.in_flight, rate);
        }
    }

    pub fn ingest_counters(&self) -> IngestCounters {
        IngestCounters {
            records_staged: self.records_staged.load(Ordering::Relaxed),
            requests: lock(&self.requests)
                .iter()
                .map(|(code, n)| (code.to_string(), *n))
                .collect(),
        }
    }

    /// Renders every metric; `status` is `None` when the store could not answer, `memory` when
    /// the platform does not tell this process's resident memory.
    pub fn render(&self, status: Option<&Status>, memory: Option<u64>) -> String {
        let mut out = String::new();
        if let Some(bytes) = memory {
            header(
                &mut out,
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory of the agent process.",
            );
            let _ = writeln!(out, "process_resident_memory_bytes {bytes}");
        }
        header(
            &mut out,
            "estafeta_records_staged_total",
            "counter",
            "Records durably staged through the ingest API since start.",
        );
        let staged = self.records_staged.load(Ordering::Relaxed);
        let _ = writeln!(out, "estafeta_records_staged_total {staged}");

        header(
            &mut out,
            "estafeta_ingest_requests_total",
            "counter",
            "Answers of POST /v1/records by HTTP status code.",
        );
        for (code, n) in lock(&self.requests).iter() {
            let _ = writeln!(out, "estafeta_ingest_requests_total{{code=\"{code}\"}} {n}");
        }

        header(
            &mut out,
            "estafeta_deliveries_total",
            "counter",
            "Delivery outcomes per sink: delivered, retry, dead, dry_run.",
        );
        for ((sink, outcome), n) in lock(&self.deliveries).iter() {
            let sink = escape_label(sink);
            let _ = writeln!(
                out,
                "estafeta_deliveries_total{{sink=\"{sink}\",outcome=\"{outcome}\"}} {n}"
            );
        }

        if let Some(status) = status {
            header(
                &mut out,
                "estafeta_records_pending",
                "gauge",
                "Records not yet delivered to the sink (pending or in flight).",
            );
            for sink in &status.sinks {
                let name = escape_label(&sink.sink);
                let pending = sink.pending + sink.in_flight;
                let _ = writeln!(out, "estafeta_records_pending{{sink=\"{name}\"}} {pending}");
            }
            header(
                &mut out,
                "estafeta_records_dead",
                "gauge",
                "Records in the dead letters for the sink.",
            );
            for sink in &status.sinks {
                let name = escape_label(&sink.sink);
                let _ = writeln!(
                    out,
                    "estafeta_records_dead{{sink=\"{name}\"}} {}",
                    sink.dead
                );
            }
            header(
                &mut out,
                "estafeta_staging_bytes",
                "gauge",
                "Bytes of segment files in the staging folder.",
            );
            let _ = writeln!(out, "estafeta_staging_bytes {}", status.bytes_staged);
            if let Some(free) = status.disk_free_bytes {
                header(
                    &mut out,
                    "estafeta_disk_free_bytes",
                    "gauge",
                    "Free bytes on the disk that holds the staging folder.",
                );
                let _ = writeln!(out, "estafeta_disk_free_bytes {free}");
            }
            header(
                &mut out,
                "estafeta_staging_blocked",
                "gauge",
                "1 while staging refuses writes (disk below MIN_FREE_DISK_MB, size limit, failed disk write), else 0.",
            );
            let blocked = u8::from(status.staging_blocked.is_some());
            let _ = writeln!(out, "estafeta_staging_blocked {blocked}");
        }
        out
    }
}

/// Seconds to deliver `waiting` records at `rate` per second, rounded up; `None` when nothing
/// is being delivered.
pub fn time_to_empty(waiting: u64, rate: f64) -> Option<u64> {
    (rate > 0.0).then(|| (waiting as f64 / rate).ceil() as u64)
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value as the text format requires.
pub fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Counters stay usable even if a thread panicked while holding the lock: a count is never
/// left half-updated.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_counters_and_gauges() {
        let metrics = Metrics::default();
        metrics.add_staged(3);
        metrics.record_request(202);
        metrics.record_request(202);
        metrics.record_request(400);
        metrics.add_flush(&FlushReport {
            sink: "api".into(),
            delivered: 2,
            retried: 1,
            ..Default::default()
        });
        let status = Status {
            bytes_staged: 10,
            disk_free_bytes: Some(99),
            sinks: vec![estafeta_staging::SinkStatus {
                sink: "a\"b".into(),
                pending: 4,
                dead: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = metrics.render(Some(&status), Some(12_345_678));
        assert!(text.contains("process_resident_memory_bytes 12345678\n"));
        assert!(text.contains("estafeta_staging_blocked 0\n"));
        assert!(text.contains("estafeta_records_staged_total 3\n"));
        assert!(text.contains("estafeta_ingest_requests_total{code=\"202\"} 2\n"));
        assert!(text.contains("estafeta_deliveries_total{sink=\"api\",outcome=\"retry\"} 1\n"));
        assert!(text.contains("estafeta_records_pending{sink=\"a\\\"b\"} 4\n"));
        assert!(text.contains("estafeta_records_dead{sink=\"a\\\"b\"} 1\n"));
        assert!(text.contains("estafeta_staging_bytes 10\n"));
        assert!(text.contains("estafeta_disk_free_bytes 99\n"));
    }

    fn delivered(sink: &str, n: u64) -> FlushReport {
        FlushReport {
            sink: sink.into(),
            delivered: n,
            ..Default::default()
        }
    }

    #[test]
    fn the_drain_rate_divides_the_window_s_deliveries_by_the_time_they_took() {
        let t0 = Instant::now();
        let metrics = Metrics::starting_at(t0);
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        assert_eq!(metrics.drain_rate_at("db", at(1)), 0.0);
        // Idle ticks, then 1,000 records per second for 10 s.
        for s in 1..=5 {
            metrics.add_flush_at(&delivered("db", 0), at(s));
        }
        for s in 6..=15 {
            metrics.add_flush_at(&delivered("db", 1000), at(s));
        }
        assert_eq!(metrics.drain_rate_at("db", at(15)), 1000.0);
        // Another sink is counted apart.
        assert_eq!(metrics.drain_rate_at("api", at(15)), 0.0);

        let mut status = Status {
            sinks: vec![estafeta_staging::SinkStatus {
                sink: "db".into(),
                pending: 4500,
                in_flight: 1000,
                ..Default::default()
            }],
            ..Default::default()
        };
        metrics.fill_drain_at(&mut status, at(15));
        assert_eq!(status.sinks[0].drain_rate_per_sec, Some(1000.0));
        assert_eq!(status.sinks[0].time_to_empty_secs, Some(6));

        // The sink stops answering: the rate falls as the window slides past the deliveries,
        // and once they are all out of it the sink is not draining.
        for s in 16..=70 {
            metrics.add_flush_at(&delivered("db", 0), at(s));
        }
        assert_eq!(metrics.drain_rate_at("db", at(70)), 6000.0 / 60.0);
        for s in 71..=80 {
            metrics.add_flush_at(&delivered("db", 0), at(s));
        }
        metrics.fill_drain_at(&mut status, at(80));
        assert_eq!(status.sinks[0].drain_rate_per_sec, Some(0.0));
        assert_eq!(status.sinks[0].time_to_empty_secs, None);
    }

    #[test]
    fn a_first_cycle_counts_from_the_start_and_at_least_a_second() {
        let t0 = Instant::now();
        let metrics = Metrics::starting_at(t0);
        metrics.add_flush_at(&delivered("db", 300), t0 + Duration::from_secs(3));
        assert_eq!(
            metrics.drain_rate_at("db", t0 + Duration::from_secs(3)),
            100.0
        );
        let quick = Metrics::starting_at(t0);
        quick.add_flush_at(&delivered("db", 50), t0 + Duration::from_millis(10));
        assert_eq!(
            quick.drain_rate_at("db", t0 + Duration::from_millis(20)),
            50.0
        );
        assert_eq!(time_to_empty(0, 50.0), Some(0));
    }

    #[test]
    fn progress_within_a_long_cycle_counts_once() {
        let t0 = Instant::now();
        let metrics = Metrics::starting_at(t0);
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        metrics.add_flush_at(&delivered("db", 0), at(1));
        for s in 2..=11 {
            metrics.add_progress_at("db", 500, at(s));
        }
        // The rate moves before the cycle ends...
        assert_eq!(metrics.drain_rate_at("db", at(11)), 500.0);
        // ... and its report adds only what the batches did not count.
        metrics.add_flush_at(&delivered("db", 5200), at(11));
        assert_eq!(metrics.drain_rate_at("db", at(11)), 520.0);
        assert_eq!(time_to_empty(10, 0.0), None);
    }
}
