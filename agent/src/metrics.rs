//! Counters shared by the ingest API and the batcher, and their rendering in the Prometheus
//! text format (version 0.0.4), written by hand: a handful of lines does not need a crate.
//! Gauges (pending, dead, bytes, disk free) come from the store's status at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// Process-wide counters. Cheap to update from any task.
#[derive(Debug, Default)]
pub struct Metrics {
    records_staged: AtomicU64,
    /// Ingest answers by HTTP status code.
    requests: Mutex<BTreeMap<u16, u64>>,
    /// Delivery outcomes by (sink, outcome).
    deliveries: Mutex<BTreeMap<(String, &'static str), u64>>,
}

/// A copy of the ingest counters, for `/v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct IngestCounters {
    pub records_staged: u64,
    /// Answers of `POST /v1/records/…` by HTTP status code.
    pub requests: BTreeMap<String, u64>,
}

impl Metrics {
    /// Counts one answer of `POST /v1/records/…`.
    pub fn record_request(&self, status: u16) {
        *lock(&self.requests).entry(status).or_default() += 1;
    }

    /// Counts records newly staged (not replays).
    pub fn add_staged(&self, records: u64) {
        self.records_staged.fetch_add(records, Ordering::Relaxed);
    }

    /// Counts the outcomes of one flush cycle.
    pub fn add_flush(&self, report: &FlushReport) {
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

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value as the text format requires.
fn escape_label(value: &str) -> String {
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
}
