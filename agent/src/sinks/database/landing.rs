//! What the three database sinks share: the landing table's rows, their migrations, how a
//! batch's failures become outcomes, the hold-back of a key's run behind a refused record
//! ([`Stopped`]), and the timeouts. See [`super`] for the landing table.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use estafeta_staging::Delivery;

use crate::db::apply::{ApplyStatements, Bound, Lookup, Statement};
use crate::sinks::record_template::RecordTemplate;
use crate::sinks::{Outcome, Refusal};

/// Name of the landing table.
pub const LANDING_TABLE: &str = "estafeta_records";

/// Longest wait for a connection (and its migrations), in seconds.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Waits for `connecting` (a connection with its TLS handshake) at most [`CONNECT_TIMEOUT`];
/// the error names the server as `shown` (password hidden).
pub async fn connect_within<T, E>(
    shown: &str,
    connecting: impl std::future::Future<Output = Result<T, E>>,
) -> Result<Result<T, E>, String> {
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| format!("connecting to {shown} timed out after {CONNECT_TIMEOUT:?}"))
}

/// Longest time one batch may take, connection included; past it, the batch is retried.
pub const BATCH_TIMEOUT: Duration = Duration::from_secs(120);

/// One schema change, applied once per database.
pub(crate) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// One row for the landing table, borrowing its text from the record it comes from: a batch
/// of 2,000 records of 1 KB is not copied once more before it is encoded for the database.
#[derive(Debug, Clone)]
pub(crate) struct LandingRow<'a> {
    /// The record's id, or the configured `idempotency_key` template rendered for it.
    pub idempotency_key: Cow<'a, str>,
    pub seq: i64,
    pub action: Cow<'a, str>,
    pub entity: Cow<'a, str>,
    pub record_key: Option<Cow<'a, str>>,
    /// The payload's JSON text, as staged.
    pub payload: Cow<'a, str>,
    pub staged_at: DateTime<Utc>,
    /// Apply mode: the statement that applies this record and its parameter values.
    pub apply: Option<ApplyRow>,
    /// The agent that staged the record when it is not this process (the relay,
    /// [`super::ORIGIN_AGENTS`]); `None`: the sink's own `agent_id`.
    pub origin: Option<String>,
}

/// The statement that applies one record, with its bound values.
#[derive(Debug, Clone)]
pub(crate) struct ApplyRow {
    pub statement: Arc<Statement>,
    pub values: Vec<Bound>,
}

impl ApplyRow {
    /// `message` (a database error of the statement) with the statement's file named.
    pub fn context(&self, message: String) -> String {
        format!("{message} (applying {})", self.statement.file.display())
    }
}

impl<'a> LandingRow<'a> {
    /// The `agent_id` column: the record's origin, else `own` (the sink's).
    pub fn agent_id<'s>(&'s self, own: &'s str) -> &'s str {
        self.origin.as_deref().unwrap_or(own)
    }

    /// The row's order key: its entity and key (the keyless rows of an entity share one), as
    /// [`crate::sinks::order_key`] gives it for the record.
    pub fn order_key(&self) -> (&str, Option<&str>) {
        (&self.entity, self.record_key.as_deref())
    }

    /// The same row owning its text, for a sink whose work outlives the batch it was lent
    /// (SQLite's blocking task).
    pub fn into_owned(self) -> LandingRow<'static> {
        LandingRow {
            idempotency_key: Cow::Owned(self.idempotency_key.into_owned()),
            seq: self.seq,
            action: Cow::Owned(self.action.into_owned()),
            entity: Cow::Owned(self.entity.into_owned()),
            record_key: self.record_key.map(|k| Cow::Owned(k.into_owned())),
            payload: Cow::Owned(self.payload.into_owned()),
            staged_at: self.staged_at,
            apply: self.apply,
            origin: self.origin,
        }
    }

    /// The row for one record, or why the record cannot be a row (or cannot be applied).
    fn from_delivery(
        delivery: &'a Delivery,
        apply: Option<&ApplyStatements>,
        key: Option<&RecordTemplate>,
    ) -> Result<Self, String> {
        let envelope = &delivery.envelope;
        let seq = i64::try_from(envelope.seq)
            .map_err(|_| format!("seq {} does not fit a signed 64-bit column", envelope.seq))?;
        let staged_at = DateTime::parse_from_rfc3339(&envelope.staged_at)
            .map_err(|err| {
                format!(
                    "staged_at {:?} is not an RFC 3339 time: {err}",
                    envelope.staged_at
                )
            })?
            .with_timezone(&Utc);
        let apply = match apply.map(|a| a.lookup(&envelope.entity, &envelope.action)) {
            None | Some(Lookup::NotApplied) => None,
            Some(Lookup::Missing(reason)) => return Err(reason),
            Some(Lookup::Statement(statement)) => Some(ApplyRow {
                values: statement.bind(&envelope.payload)?,
                statement: Arc::clone(statement),
            }),
        };
        let idempotency_key = match key {
            Some(template) => template
                .render(envelope)
                .map_err(|e| format!("idempotency_key: {e}"))?
                .into(),
            None => Cow::Borrowed(envelope.id.as_str()),
        };
        Ok(Self {
            idempotency_key,
            seq,
            action: Cow::Borrowed(&envelope.action),
            entity: Cow::Borrowed(&envelope.entity),
            record_key: envelope.key.as_deref().map(Cow::Borrowed),
            payload: Cow::Borrowed(envelope.payload.get()),
            staged_at,
            apply,
            origin: None,
        })
    }
}

/// The order keys whose run stopped in a batch: once a record is refused for good (dead), the
/// later records of its key in the batch are not inserted nor applied but answered
/// [`Outcome::Skipped`], so none overtakes it; other keys go on.
#[derive(Default)]
pub(crate) struct Stopped<'a>(HashSet<(&'a str, Option<&'a str>)>);

impl<'a> Stopped<'a> {
    /// Whether `row`'s key stopped earlier in the batch (the row must be skipped).
    pub fn holds(&self, row: &LandingRow<'_>) -> bool {
        !self.0.is_empty() && self.0.contains(&row.order_key())
    }

    /// `row` was refused for good: the later rows of its key are skipped.
    pub fn stop(&mut self, row: &'a LandingRow<'_>) {
        self.0.insert(row.order_key());
    }
}

/// A batch as rows, remembering which records could not become rows.
pub(crate) struct Rows<'a> {
    /// Outcomes already known (records that cannot be rows, and the later records of their
    /// keys, skipped); `None` for rows.
    slots: Vec<Option<Outcome>>,
    pub rows: Vec<LandingRow<'a>>,
}

impl<'a> Rows<'a> {
    /// The batch's rows. A record that cannot become a row (a missing field of its apply
    /// statement, a seq or time out of range) is dead here, and the later records of its key
    /// are skipped: they never become rows, so no sink inserts or applies them.
    pub fn new(
        batch: &'a [Delivery],
        apply: Option<&ApplyStatements>,
        landing_key: Option<&RecordTemplate>,
    ) -> Self {
        let mut slots = Vec::with_capacity(batch.len());
        let mut rows = Vec::with_capacity(batch.len());
        let mut stopped: HashSet<(&str, Option<&str>)> = HashSet::new();
        for (index, delivery) in batch.iter().enumerate() {
            let key = crate::sinks::order_key(delivery);
            if !stopped.is_empty() && stopped.contains(&key) {
                slots.push(Some(Outcome::Skipped));
                continue;
            }
            match LandingRow::from_delivery(delivery, apply, landing_key) {
                Ok(mut row) => {
                    row.origin = super::origin_agent(index);
                    rows.push(row);
                    slots.push(None);
                }
                Err(reason) => {
                    stopped.insert(key);
                    slots.push(Some(Outcome::Dead {
                        reason: Refusal::ours(reason),
                    }));
                }
            }
        }
        Self { slots, rows }
    }

    /// The batch's outcomes, given one outcome per row in row order (`rows` may have been
    /// moved out meanwhile).
    pub fn finish(self, row_outcomes: Vec<Outcome>) -> Vec<Outcome> {
        debug_assert_eq!(
            row_outcomes.len(),
            self.slots.iter().filter(|s| s.is_none()).count()
        );
        let mut row_outcomes = row_outcomes.into_iter();
        self.slots
            .into_iter()
            .map(|slot| {
                slot.or_else(|| row_outcomes.next())
                    .unwrap_or_else(|| Outcome::Retry {
                        error: "the database sink lost track of this record".to_owned(),
                        retry_after: None,
                    })
            })
            .collect()
    }
}

/// How a database error is sorted.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Not about one row's data: retry the whole batch, on a new connection. The text is
    /// safe to log (see the module documentation).
    Transient(String),
    /// The database refused this row's data: the record is dead, the others go on.
    Row(Refusal),
}

impl Failure {
    /// The text to log and show: a row's refusal by its summary only.
    pub fn message(self) -> String {
        match self {
            Failure::Transient(m) => m,
            Failure::Row(refusal) => refusal.summary,
        }
    }

    /// With `f` applied to every text (adding context such as the statement file).
    pub fn map(self, f: impl Fn(String) -> String) -> Failure {
        match self {
            Failure::Transient(m) => Failure::Transient(f(m)),
            Failure::Row(refusal) => Failure::Row(refusal.map(f)),
        }
    }
}

/// Turns a batch attempt bounded by [`BATCH_TIMEOUT`] into outcomes: on an error or a
/// timeout every row is retried and `reset` drops the connection, so the next batch reconnects.
pub(crate) fn outcomes_or_retry(
    sink: &str,
    rows: usize,
    attempt: Result<Result<Vec<Outcome>, String>, tokio::time::error::Elapsed>,
    reset: impl FnOnce(),
) -> Vec<Outcome> {
    match attempt {
        Ok(Ok(outcomes)) => outcomes,
        Ok(Err(error)) => {
            reset();
            retry_all(sink, rows, error)
        }
        Err(_) => {
            reset();
            retry_all(
                sink,
                rows,
                format!("the batch took longer than {BATCH_TIMEOUT:?}"),
            )
        }
    }
}

/// Every row retried with `error`, logged once for the batch.
pub(crate) fn retry_all(sink: &str, rows: usize, error: String) -> Vec<Outcome> {
    tracing::warn!(sink = %sink, records = rows, error = %error, "Database delivery failed; the batch will be retried.");
    vec![
        Outcome::Retry {
            error,
            retry_after: None,
        };
        rows
    ]
}

/// `DRY_RUN` lines: what would be inserted, without the payload.
/// In apply mode, each line also says which statement file would apply the record, or why
/// the record would be dead.
pub(crate) fn dry_run_lines(
    shown_url: &str,
    apply: Option<&ApplyStatements>,
    key: Option<&RecordTemplate>,
    batch: &[Delivery],
) -> Vec<String> {
    batch
        .iter()
        .map(|d| {
            let e = &d.envelope;
            let landing_key = key
                .map(|t| t.render(e).unwrap_or_else(|_| "(cannot be made)".into()))
                .unwrap_or_else(|| e.id.clone());
            let mut line = format!(
                "INSERT INTO {LANDING_TABLE} at {shown_url} idempotency_key={landing_key} seq={} entity={} action={} ({} bytes)",
                e.seq,
                e.entity,
                e.action,
                e.payload.get().len()
            );
            match LandingRow::from_delivery(d, apply, key) {
                Ok(LandingRow {
                    apply: Some(apply), ..
                }) => {
                    line.push_str(&format!(
                        " then apply {} ({} parameters)",
                        apply.statement.file.display(),
                        apply.values.len()
                    ));
                }
                Ok(_) => {}
                Err(reason) => line.push_str(&format!(" would be dead: {reason}")),
            }
            line
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::test_delivery;

    #[test]
    fn a_record_that_cannot_be_a_row_skips_the_rest_of_its_key_only() {
        let mut batch = vec![
            test_delivery(1, "create", "patient", Some("k1"), "{}"),
            test_delivery(2, "update", "patient", Some("k1"), "{}"),
            test_delivery(3, "create", "patient", Some("k2"), "{}"),
            test_delivery(4, "update", "patient", Some("k1"), "{}"),
            test_delivery(5, "create", "audit", None, "{}"),
        ];
        // A time that cannot be read: the record cannot become a row.
        batch[1].envelope.staged_at = "yesterday".to_owned();
        let rows = Rows::new(&batch, None, None);
        let seqs: Vec<i64> = rows.rows.iter().map(|r| r.seq).collect();
        assert_eq!(
            seqs,
            [1, 3, 5],
            "k1:4 must not become a row behind the dead k1:2"
        );
        let outcomes = rows.finish(vec![Outcome::Delivered; 3]);
        assert_eq!(outcomes[0], Outcome::Delivered);
        assert!(
            matches!(&outcomes[1], Outcome::Dead { reason } if reason.summary.contains("staged_at")),
            "{outcomes:?}"
        );
        assert_eq!(outcomes[2], Outcome::Delivered);
        assert_eq!(outcomes[3], Outcome::Skipped);
        assert_eq!(outcomes[4], Outcome::Delivered);
    }

    #[tokio::test]
    async fn each_row_takes_the_agent_of_its_own_record_when_the_relay_says() {
        let batch = [
            test_delivery(1, "create", "patient", Some("k1"), "{}"),
            test_delivery(2, "create", "patient", Some("k2"), "{}"),
            test_delivery(3, "create", "patient", Some("k3"), "{}"),
        ];
        // Outside the relay: no origin, the sink's own agent id.
        let own = Rows::new(&batch, None, None);
        assert!(own.rows.iter().all(|r| r.agent_id("me") == "me"));
        // The relay: one agent per record, in batch order, even when they alternate.
        let agents: std::sync::Arc<[String]> = ["ws-1", "ws-2", "ws-1"]
            .map(str::to_owned)
            .into_iter()
            .collect();
        let relayed = super::super::ORIGIN_AGENTS
            .scope(agents, async { Rows::new(&batch, None, None) })
            .await;
        let got: Vec<&str> = relayed.rows.iter().map(|r| r.agent_id("me")).collect();
        assert_eq!(got, ["ws-1", "ws-2", "ws-1"]);
    }

    #[test]
    fn stopped_holds_the_later_rows_of_a_stopped_key() {
        let batch = [
            test_delivery(1, "create", "patient", Some("k1"), "{}"),
            test_delivery(2, "create", "patient", Some("k2"), "{}"),
            test_delivery(3, "create", "patient", None, "{}"),
            test_delivery(4, "create", "attendance", Some("k1"), "{}"),
        ];
        let rows = Rows::new(&batch, None, None).rows;
        let mut stopped = Stopped::default();
        assert!(!rows.iter().any(|r| stopped.holds(r)));
        stopped.stop(&rows[0]);
        stopped.stop(&rows[2]);
        let held: Vec<bool> = rows.iter().map(|r| stopped.holds(r)).collect();
        assert_eq!(held, [true, false, true, false]);
    }
}
