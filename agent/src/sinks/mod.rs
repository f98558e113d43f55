//! Sinks: where staged records are delivered. Each sink takes a batch leased from the store,
//! delivers it, and answers one [`Outcome`] per record; the batcher turns outcomes into ack /
//! fail / dead / give back.
//!
//! A batch holds *runs*: consecutive records of one order key (entity and key; the keyless
//! records of an entity share one order key), in sequence order ([`runs`]). Every sink keeps
//! that order inside the batch: a record is attempted only after the earlier records of its key
//! in the batch were delivered, and once one of them is not, the later ones are answered
//! [`Outcome::Skipped`] without being attempted. Different keys are independent: a sink may
//! send them in parallel.
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
    /// Not attempted: an earlier record of its key in the batch was not delivered, and this
    /// one must not overtake it (per-key order, and the hold-back behind a dead letter). It goes
    /// back to pending untouched, with no attempt counted.
    Skipped,
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
    /// What `deliver` would send for one record, payload included, for a person at a terminal
    /// (`estafeta flush --dry-run --show-payload`), never for a log: the `DRY_RUN` line, then
    /// the payload as sent. Secrets (tokens, passwords, route headers) are never shown.
    fn preview(&self, delivery: &Delivery) -> String {
        let line = self
            .dry_run(std::slice::from_ref(delivery))
            .pop()
            .unwrap_or_default();
        format!("{line}\n\n{}", delivery.envelope.payload.get())
    }
    /// Tries to reach the sink (for `check-config` and `/readyz`).
    fn probe(&self) -> BoxFuture<'_, anyhow::Result<()>>;
    /// How the sink's connection is protected: TLS or not, verified or not (the last
    /// connection's, or what the settings ask for before the first one).
    fn transport(&self) -> crate::tls::Transport;
    /// Whether the sink applies a batch in one database transaction: it then takes
    /// `DATABASE_BATCH_SIZE` records at once rather than `BATCH_SIZE`.
    fn applies_in_one_transaction(&self) -> bool {
        false
    }
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
pub mod record_template;

/// One configured sink: its name and what it is (built by `config`, owned here).
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Unique name: `database` and `api` for the ones from `.env`.
    pub name: String,
    pub kind: SinkKind,
    /// `max_attempts` (TOML) / `CENTRAL_<SINK>_MAX_ATTEMPTS`: after this many transient
    /// failures of a record, it becomes a dead letter ("gave up after N attempts: …") instead
    /// of waiting for the sink forever. `None` (the default): retry forever, as nothing is
    /// ever dropped for being late.
    pub max_attempts: Option<u32>,
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

/// The order key of a record: its entity and key. Keyless records of an entity share one
/// order key (`None`), as they do in the store.
pub(crate) fn order_key(delivery: &Delivery) -> (&str, Option<&str>) {
    (&delivery.envelope.entity, delivery.envelope.key.as_deref())
}

/// The batch's runs: the indices of each order key's records, in batch (sequence) order; the
/// runs in the order of their first record.
pub(crate) fn runs(batch: &[Delivery]) -> Vec<Vec<usize>> {
    let mut by_key: std::collections::HashMap<(&str, Option<&str>), usize> = Default::default();
    let mut runs: Vec<Vec<usize>> = Vec::new();
    for (index, delivery) in batch.iter().enumerate() {
        let run = *by_key.entry(order_key(delivery)).or_insert_with(|| {
            runs.push(Vec::new());
            runs.len() - 1
        });
        runs[run].push(index);
    }
    runs
}

/// Enforces the hold-back inside a batch on a sink's answer: after the first record of a key
/// that was not delivered, a later record of that key answered `Retry` becomes `Skipped`, so a
/// batch whose whole transaction failed counts one attempt per key, not one per record. (A sink
/// does not attempt those records at all; this keeps the bookkeeping right when it reports a
/// whole-batch failure on every record.)
pub(crate) fn hold_back(batch: &[Delivery], outcomes: &mut [Outcome]) {
    let mut stopped: std::collections::HashSet<(&str, Option<&str>)> = Default::default();
    for (delivery, outcome) in batch.iter().zip(outcomes.iter_mut()) {
        let key = order_key(delivery);
        if stopped.contains(&key) {
            if matches!(outcome, Outcome::Retry { .. }) {
                *outcome = Outcome::Skipped;
            }
        } else if !matches!(outcome, Outcome::Delivered) {
            stopped.insert(key);
        }
    }
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

/// `err` and its causes on one line (kept below the sinks, where the connections are made).
pub(crate) use crate::redact::error_chain;

/// A leased record for sink unit tests: id `id-<seq>`, staged 2026-11-23, routed to sink `s`.
#[cfg(test)]
pub(crate) fn test_delivery(
    seq: u64,
    action: &str,
    entity: &str,
    key: Option<&str>,
    payload: &str,
) -> Delivery {
    Delivery {
        envelope: estafeta_staging::Envelope {
            v: 1,
            id: format!("id-{seq}"),
            seq,
            action: action.to_owned(),
            entity: entity.to_owned(),
            key: key.map(str::to_owned),
            staged_at: "2026-11-23T08:41:06.123456Z".to_owned(),
            client_key: None,
            client_fingerprint: None,
            client_records: None,
            source: None,
            sinks: vec!["s".to_owned()],
            payload: serde_json::value::RawValue::from_string(payload.to_owned())
                .expect("valid JSON"),
        },
        sink: "s".to_owned(),
        attempts: 0,
        path: std::path::PathBuf::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(seq: u64, entity: &str, key: Option<&str>) -> Delivery {
        test_delivery(seq, "update", entity, key, "{}")
    }

    #[test]
    fn runs_group_a_batch_by_entity_and_key_in_order() {
        let batch = [
            delivery(1, "patient", Some("a")),
            delivery(2, "patient", Some("b")),
            delivery(3, "patient", Some("a")),
            delivery(4, "attendance", Some("a")),
            delivery(5, "audit", None),
            delivery(6, "audit", None),
            delivery(7, "patient", Some("b")),
        ];
        assert_eq!(
            runs(&batch),
            vec![vec![0, 2], vec![1, 6], vec![3], vec![4, 5]]
        );
    }

    #[test]
    fn a_failure_holds_back_the_rest_of_its_key_only() {
        let batch = [
            delivery(1, "patient", Some("a")),
            delivery(2, "patient", Some("b")),
            delivery(3, "patient", Some("a")),
            delivery(4, "patient", Some("b")),
        ];
        let retry = || Outcome::Retry {
            error: "cannot connect".to_owned(),
            retry_after: None,
        };
        let mut outcomes = vec![retry(), Outcome::Delivered, retry(), retry()];
        hold_back(&batch, &mut outcomes);
        assert_eq!(
            outcomes,
            vec![retry(), Outcome::Delivered, Outcome::Skipped, retry()]
        );
    }

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
