//! Settling a delivered batch: a sink's outcomes become one [`Settlement`] (acks, retries with
//! exponential backoff and jitter, dead letters, records given back), written by the store in
//! one transaction; and the rule that keeps a batch leased ahead from overtaking a failure of
//! the batch before it ([`behind_failures`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use estafeta_staging::{Dead, Delivery, Retry, Settlement, Staging};
use tracing::{error, warn};

use super::blocking;
use crate::config::Config;
use crate::metrics::FlushReport;
use crate::sinks::Outcome;

/// What settling one batch did.
pub(super) struct Settled {
    pub delivered: u64,
    pub retried: u64,
    pub dead: u64,
    pub first_error: Option<String>,
    /// Each record's result, in the batch's order.
    pub records: Vec<Settle>,
}

/// What became of one record of a settled batch (for `estafeta retry --send`, which reports
/// each record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// The sink has it.
    Delivered,
    /// A transient failure: pending again, tried again at its retry time. The error says what
    /// happened by class (no payload text).
    Retry { error: String },
    /// Refused for good (or given up after `max_attempts`): a dead letter again. `summary` says
    /// what happened by class; the file at `path` holds the whole answer.
    Dead { summary: String, path: PathBuf },
    /// Not attempted (behind an earlier record of its key): pending again, untouched.
    GivenBack,
}

impl FlushReport {
    pub(super) fn add(&mut self, settled: &Settled) {
        self.delivered += settled.delivered;
        self.retried += settled.retried;
        self.dead += settled.dead;
    }
}

/// Turns a batch's outcomes into store calls, all in one blocking task.
pub(super) async fn settle(
    store: &Staging,
    sink: &str,
    config: &Config,
    batch: Vec<Delivery>,
    outcomes: Vec<Outcome>,
    rng: &mut XorShift,
) -> anyhow::Result<Settled> {
    if outcomes.len() != batch.len() {
        error!(
            sink,
            records = batch.len(),
            outcomes = outcomes.len(),
            "The sink answered a different number of outcomes than records; records without an outcome stay pending."
        );
    }
    let mut outcomes = outcomes;
    crate::sinks::hold_back(&batch, &mut outcomes);
    let now = Utc::now();
    let max_attempts = config.max_attempts(sink);
    let mut settlement = Settlement::default();
    let mut dead_summaries = Vec::new();
    let mut records = Vec::with_capacity(batch.len());
    let mut outcomes = outcomes.into_iter();
    for delivery in batch {
        let seq = delivery.envelope.seq;
        let outcome = match outcomes.next() {
            // The sink's `max_attempts`: this failure is the last one it allows (the store
            // counts the attempts before it), so the record stops waiting and becomes a dead
            // letter that says why, for a person to look at.
            Some(Outcome::Retry { error, .. })
                if max_attempts.is_some_and(|max| delivery.attempts.saturating_add(1) >= max) =>
            {
                let attempts = delivery.attempts.saturating_add(1);
                Some(Outcome::Dead {
                    reason: crate::sinks::Refusal::ours(format!(
                        "gave up after {attempts} attempts: {error}"
                    )),
                })
            }
            other => other,
        };
        match outcome {
            Some(Outcome::Delivered) => {
                settlement.delivered.push(seq);
                records.push(Settle::Delivered);
            }
            Some(Outcome::Retry { error, retry_after }) => {
                records.push(Settle::Retry {
                    error: error.clone(),
                });
                let delay = retry_after.unwrap_or_else(|| {
                    backoff(delivery.attempts, config.retry_base, config.retry_max, rng)
                });
                let at = now
                    + chrono::Duration::from_std(delay)
                        .unwrap_or_else(|_| chrono::Duration::days(1));
                settlement.retries.push(Retry { seq, error, at });
            }
            Some(Outcome::Dead { reason }) => {
                // The file keeps the whole answer; the log says what happened, by class.
                records.push(Settle::Dead {
                    summary: reason.summary.clone(),
                    path: PathBuf::new(),
                });
                dead_summaries.push((seq, delivery.envelope.id.clone(), reason.summary));
                settlement.dead.push(Dead {
                    delivery,
                    reason: reason.detail,
                });
            }
            // Not attempted (behind an earlier record of its key) or not answered: back to
            // pending untouched, no attempt counted.
            Some(Outcome::Skipped) | None => {
                settlement.give_back.push(seq);
                records.push(Settle::GivenBack);
            }
        }
    }
    let mut settled_counts = Settled {
        delivered: settlement.delivered.len() as u64,
        retried: settlement.retries.len() as u64,
        dead: settlement.dead.len() as u64,
        first_error: settlement.retries.first().map(|r| r.error.clone()),
        records,
    };
    let sink_name = sink.to_owned();
    // One transaction for the whole batch: acks, retries, dead letters, give-backs.
    let dead_paths = blocking(store, move |store| store.settle(&sink_name, settlement)).await?;
    let mut paths = dead_paths.iter();
    for record in &mut settled_counts.records {
        if let Settle::Dead { path, .. } = record
            && let Some(written) = paths.next()
        {
            *path = written.clone();
        }
    }
    for ((seq, id, error), path) in dead_summaries.into_iter().zip(dead_paths) {
        warn!(
            sink, seq, %id, path = %path.display(), %error,
            "Record refused by the sink; moved to the dead letters (the file holds the sink's whole answer). Fix it and replay it with `estafeta retry --send`."
        );
    }
    Ok(settled_counts)
}

/// Splits `next`, leased ahead while `before` travelled, into what may be sent and the seqs to
/// give back: the records of every key with a record in `before` that was not delivered (it
/// failed, was skipped or got no answer), which must not overtake it.
pub(super) fn behind_failures(
    before: &[Delivery],
    outcomes: &[Outcome],
    next: Vec<Delivery>,
) -> (Vec<Delivery>, Vec<u64>) {
    let mut stopped = std::collections::HashSet::new();
    for (index, delivery) in before.iter().enumerate() {
        if !matches!(outcomes.get(index), Some(Outcome::Delivered)) {
            stopped.insert(crate::sinks::order_key(delivery));
        }
    }
    let (behind, go): (Vec<Delivery>, Vec<Delivery>) = next
        .into_iter()
        .partition(|delivery| stopped.contains(&crate::sinks::order_key(delivery)));
    (go, behind.iter().map(|d| d.envelope.seq).collect())
}

/// `min(max, base * 2^attempts)`, then a random point between 50% and 100% of it (jitter, so
/// many agents coming back at once do not retry in step).
fn backoff(attempts: u32, base: Duration, max: Duration, rng: &mut XorShift) -> Duration {
    let factor = 1u32.checked_shl(attempts).unwrap_or(u32::MAX);
    let full = base.saturating_mul(factor).min(max);
    full.mul_f64(0.5 + 0.5 * rng.next_f64())
}

/// A tiny xorshift64* generator seeded from the clock; jitter needs spread, not secrecy.
pub(super) struct XorShift(u64);

impl XorShift {
    pub(super) fn from_clock() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        // Mix in a counter so generators made in the same nanosecond differ.
        static CALLS: AtomicU64 = AtomicU64::new(0);
        let salt = CALLS
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Self((nanos ^ salt) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)`.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let mut rng = XorShift::from_clock();
        let base = Duration::from_secs(2);
        let max = Duration::from_secs(60);
        for _ in 0..100 {
            let first = backoff(0, base, max, &mut rng);
            assert!(
                first >= Duration::from_secs(1) && first <= base,
                "{first:?}"
            );
            let third = backoff(3, base, max, &mut rng);
            assert!(
                third >= Duration::from_secs(8) && third <= Duration::from_secs(16),
                "{third:?}"
            );
            let late = backoff(200, base, max, &mut rng);
            assert!(late >= max / 2 && late <= max, "{late:?}");
        }
    }
}
