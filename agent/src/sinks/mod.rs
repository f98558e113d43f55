//! Sinks: where staged records are delivered. Each sink takes a batch leased from the store
//! (at most one record per (entity, key), so a batch has no internal order to keep), delivers
//! it, and answers one [`Outcome`] per record; the batcher turns outcomes into ack / fail / dead.
//!
//! - [`http`]: one request per record, `Idempotency-Key` header, reqwest with rustls.
//! - [`database`]: a landing table `estafeta_records` with a unique idempotency key, on
//!   PostgreSQL ([`postgres`]), MariaDB / MySQL ([`mysql`]) or SQLite ([`sqlite`]); with
//!   [`apply`] mode, records are also applied to the real tables by statement files.
//! - [`nats`]: NATS JetStream, one message per record with `Nats-Msg-Id`, async-nats.
//!
//! [`build`] turns the configured sinks into `Arc<dyn Sink>`s; it checks every URL but connects
//! to nothing, so the agent starts (and stages) while the central side is down. URLs and
//! driver messages go through [`crate::redact`] before they reach a log line or an error.
//!
//! What a sink says about a failure reaches logs, `GET /v1/status`, `estafeta status` and the
//! heartbeats (`estafeta_agents.last_error`), so it names the record by seq / id only and says
//! what happened by class — `HTTP 503 Service Unavailable`, `cannot connect`, `PostgreSQL 23505
//! unique violation (constraint …)` — never with payload text, a record key, or a server's or
//! database's answer, which often echo the payload. Only a [`Refusal`]'s `detail` carries the
//! whole answer, and only into the dead-letter file (0600 in the 0700 staging folder).

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use estafeta_staging::Delivery;

/// A boxed future, so sinks can live behind `dyn Sink`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What happened to one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The sink has it (or already had it: a resend is not an error).
    Delivered,
    /// A transient failure: connection refused or lost, timeout, HTTP 408/425/429/5xx,
    /// deadlock. `retry_after` is the server's own hint (HTTP `Retry-After`), if any.
    Retry {
        /// What happened, by class (status code, error kind), with no payload text, record key
        /// or answer body: it is logged and shown as the sink's `last_error`.
        error: String,
        retry_after: Option<Duration>,
    },
    /// A permanent failure: the record goes to the dead letters.
    Dead { reason: Refusal },
}

/// Why a sink refused a record for good, said twice: once to be shown, once to be kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// What happened, by class: `HTTP 422 Unprocessable Entity`, `PostgreSQL 23514 check
    /// violation (table t, constraint c)`, a missing payload field's name. Names schema
    /// objects at most, never values: it is logged with the record's seq and id.
    pub summary: String,
    /// Everything known: the summary and the server's answer or the database's message and
    /// detail, which may quote the payload. Written only to the dead-letter file (and the
    /// index beside the records), for a person who may read the record anyway.
    pub detail: String,
}

impl Refusal {
    /// `summary`, and as detail `summary: answer` (or the summary alone when `answer` is
    /// empty).
    pub fn new(summary: impl Into<String>, answer: &str) -> Refusal {
        let summary = summary.into();
        let detail = if answer.is_empty() {
            summary.clone()
        } else {
            format!("{summary}: {answer}")
        };
        Refusal { summary, detail }
    }

    /// A refusal whose text Estafeta wrote from the record's envelope and the configuration
    /// alone (a missing field's name, a statement file), with no value of the record: the same
    /// text is shown and kept.
    pub fn ours(text: impl Into<String>) -> Refusal {
        let text = text.into();
        Refusal {
            summary: text.clone(),
            detail: text,
        }
    }

    /// Both texts with `f` applied (adding context such as the statement file).
    pub fn map(self, f: impl Fn(String) -> String) -> Refusal {
        Refusal {
            summary: f(self.summary),
            detail: f(self.detail),
        }
    }
}

/// A destination for records.
pub trait Sink: Send + Sync {
    /// The sink's name, as routes and the store know it.
    fn name(&self) -> &str;
    /// Delivers `batch`; returns exactly one outcome per record, in the same order.
    fn deliver<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>>;
    /// Describes what `deliver` would send, one line per record, for `DRY_RUN`.
    fn dry_run(&self, batch: &[Delivery]) -> Vec<String>;
    /// Tries to reach the sink (for `check-config` and `/readyz`).
    fn probe(&self) -> BoxFuture<'_, anyhow::Result<()>>;
    /// Sends a heartbeat ([`crate::heartbeat`]); `None` when this sink does not take them
    /// (the default).
    fn heartbeat<'a>(
        &'a self,
        beat: &'a heartbeat::Heartbeat,
    ) -> BoxFuture<'a, Option<anyhow::Result<()>>> {
        let _ = beat;
        Box::pin(async { None })
    }
}

pub mod database;
pub mod heartbeat;
pub mod http;
pub mod nats;

/// One configured sink: its name and what it is (built by `config`, owned here).
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Unique name: `database` and `api` for the ones from `.env`.
    pub name: String,
    pub kind: SinkKind,
}

/// What a sink is, with its settings.
#[derive(Debug, Clone)]
pub enum SinkKind {
    Http(http::HttpSinkConfig),
    /// `postgres://`, `mysql://` or `sqlite://` URL.
    Database(database::DatabaseSinkConfig),
    /// NATS JetStream: `nats://` or `tls://` URL.
    Nats(nats::NatsSinkConfig),
}

/// Builds every configured sink, in order. Connects to nothing: database sinks connect on their
/// first delivery or probe. Fails on a duplicate name or an unusable URL, TLS file or route.
pub fn build(configs: &[SinkConfig]) -> anyhow::Result<Vec<Arc<dyn Sink>>> {
    let mut names = BTreeSet::new();
    let mut sinks = Vec::with_capacity(configs.len());
    for config in configs {
        if !names.insert(config.name.as_str()) {
            anyhow::bail!(
                "two sinks are named {:?}; give each sink a unique name",
                config.name
            );
        }
        let sink: Arc<dyn Sink> = match &config.kind {
            SinkKind::Http(http) => Arc::new(
                http::HttpSink::new(config.name.clone(), http.clone())
                    .with_context(|| format!("sink {:?}", config.name))?,
            ),
            SinkKind::Database(db) => database::build(config.name.clone(), db.clone())
                .with_context(|| format!("sink {:?}", config.name))?,
            SinkKind::Nats(nats) => Arc::new(
                nats::NatsSink::new(config.name.clone(), nats.clone())
                    .with_context(|| format!("sink {:?}", config.name))?,
            ),
        };
        sinks.push(sink);
    }
    Ok(sinks)
}

/// The outcomes of a batch sent as parallel tasks, in the batch's order: a record whose task
/// failed (panicked, was cancelled) is retried, never lost. `what` names the task in the error.
pub(crate) fn retry_missing(outcomes: Vec<Option<Outcome>>, what: &str) -> Vec<Outcome> {
    outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| Outcome::Retry {
                error: format!("the {what} task failed unexpectedly"),
                retry_after: None,
            })
        })
        .collect()
}

/// How many of `outcomes` are deliveries (for the batch's debug line).
pub(crate) fn delivered(outcomes: &[Outcome]) -> usize {
    outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Delivered))
        .count()
}

/// `err` and its causes on one line, skipping a cause its parent already spells out.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_keeps_the_answer_out_of_its_summary() {
        let refusal = Refusal::new("HTTP 422 Unprocessable Entity", "{\"echo\":\"Maria\"}");
        assert_eq!(refusal.summary, "HTTP 422 Unprocessable Entity");
        assert_eq!(
            refusal.detail,
            "HTTP 422 Unprocessable Entity: {\"echo\":\"Maria\"}"
        );
        assert_eq!(Refusal::new("HTTP 400", "").detail, "HTTP 400");
        let ours = Refusal::ours("the record has no key");
        assert_eq!(ours.summary, ours.detail);
    }
}
