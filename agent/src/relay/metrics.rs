//! The relay's counters and its small HTTP listener on `RELAY_ADDR`: `GET /metrics` in the
//! Prometheus text format (`estafeta_relay_*`) and `GET /healthz`. Counts only: no record,
//! key or payload is ever in them.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

/// Totals since the relay started.
#[derive(Default)]
pub struct Counters {
    /// Messages fetched from the stream (redeliveries included).
    pub fetched: AtomicU64,
    /// Messages fetched that JetStream had delivered before (a relay died, or an ack was lost).
    pub redelivered: AtomicU64,
    /// Messages whose row was committed (a row already there counts too: a resend).
    pub written: AtomicU64,
    /// Messages acknowledged to JetStream.
    pub acked: AtomicU64,
    /// Messages kept in `RELAY_DEAD_LETTER_DIR`.
    pub dead: AtomicU64,
    /// Batches written and acknowledged.
    pub batches: AtomicU64,
    /// Tries of a batch that failed on a transient error and were retried.
    pub retries: AtomicU64,
    /// Failures to fetch from JetStream or set up a consumer.
    pub fetch_errors: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The Prometheus text of every counter.
    pub fn render(&self) -> String {
        let rows: [(&str, &AtomicU64, &str); 8] = [
            (
                "fetched",
                &self.fetched,
                "Messages fetched from the stream, redeliveries included.",
            ),
            (
                "redelivered",
                &self.redelivered,
                "Messages JetStream had delivered before.",
            ),
            (
                "written",
                &self.written,
                "Messages whose row is committed in the database.",
            ),
            ("acked", &self.acked, "Messages acknowledged to JetStream."),
            (
                "dead",
                &self.dead,
                "Messages kept in RELAY_DEAD_LETTER_DIR.",
            ),
            (
                "batches",
                &self.batches,
                "Batches written and acknowledged.",
            ),
            (
                "retries",
                &self.retries,
                "Batch tries that failed on a transient error.",
            ),
            (
                "fetch_errors",
                &self.fetch_errors,
                "Failed fetches or consumer set-ups.",
            ),
        ];
        let mut out = String::new();
        for (name, value, help) in rows {
            let _ = writeln!(out, "# HELP estafeta_relay_{name}_total {help}");
            let _ = writeln!(out, "# TYPE estafeta_relay_{name}_total counter");
            let _ = writeln!(
                out,
                "estafeta_relay_{name}_total {}",
                value.load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// Serves `/metrics` and `/healthz` until `stop`.
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let counters = Arc::clone(&counters);
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        counters.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    if let Err(err) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(error = %err, "The relay's metrics listener stopped.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_is_rendered_with_its_help() {
        let counters = Counters::default();
        Counters::add(&counters.written, 3);
        let text = counters.render();
        assert!(text.contains("estafeta_relay_written_total 3\n"), "{text}");
        assert!(
            text.contains("# TYPE estafeta_relay_dead_total counter"),
            "{text}"
        );
        assert_eq!(text.matches("# HELP").count(), 8);
    }
}
