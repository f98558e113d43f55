//! `estafeta relay`: the central-side consumer of what agents publish to JetStream. It reads
//! a stream with durable pull consumers and writes each message as a row of the landing table
//! (or applies it, with `apply_dir`) in PostgreSQL or MariaDB, through the agent's own database
//! sink, so the SQL is the same as an agent writing directly.
//!
//! ```text
//! agents ──publish──> stream (subjects estafeta.{entity}.{action}[.p<k>])
//!                        │ one durable pull consumer per partition: <RELAY_CONSUMER>[-p<k>]
//!                        ▼   max_ack_pending = RELAY_BATCH, explicit acks
//!                 relay: fetch a batch ─> database sink (one transaction per run of a key)
//!                        ─> every row committed (or dead-lettered) ─> ack the whole batch
//! ```
//!
//! - Acknowledged only after its row is committed: a batch is acknowledged when every message
//!   in it was written (or kept as a dead letter); a relay killed before that leaves the batch
//!   unacknowledged and JetStream redelivers it after `RELAY_ACK_WAIT_SECS`. The rows already
//!   committed are not written again: the record id is the landing table's unique key (the
//!   sink's `ON CONFLICT DO NOTHING` / resend path), and apply mode applies only with a new
//!   landing row. Exactly once in effect.
//! - Per-key order: a consumer hands out nothing beyond `max_ack_pending` = one batch, and the
//!   batch is acknowledged as a whole after it was written, so no later message of a partition
//!   can be written before an earlier one, whichever relay holds it. Inside a batch the sink
//!   writes runs of one key in stream order. So two relays on one partition (a stand-by) keep
//!   the order too; they just do not add throughput.
//! - Sharing the work: agents with `CENTRAL_NATS_PARTITIONS` = N publish to `<subject>.p<k>`,
//!   k a hash of the record's key ([`crate::sinks::nats::partition_of`]); each partition has
//!   its own consumer, and `--partitions 0-3` / `RELAY_PARTITIONS` says which this relay runs.
//! - The rows carry the agent id of the message (the `agent_id` in its body), not the relay's
//!   ([`crate::sinks::database::ORIGIN_AGENTS`]). A batch mixing agents is written in one go
//!   (one COPY, or two on the sink's two connections split by key), in stream order: a batch
//!   from a fleet interleaves its agents record by record, and one transaction per run of an
//!   agent made the relay's drain a fraction of `estafeta flush`'s (docs/SCALING.md).
//! - Errors as the agent sorts them: transient ones (database or NATS down, a timeout) retry
//!   the batch with backoff, forever, telling JetStream it is still in progress; a message the
//!   database refuses for good (a constraint, apply mode's missing field) or that is not an
//!   Estafeta record is written to `RELAY_DEAD_LETTER_DIR` (0600, with the reason) and then
//!   acknowledged, so one bad record does not stop its partition.
//! - `/metrics` (`estafeta_relay_*`) and `/healthz` on `RELAY_ADDR` ([`metrics`]).

mod dead;
mod message;
mod metrics;
mod partition;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::sinks::database::DatabaseSinkConfig;
use crate::sinks::nats::{NatsSink, NatsSinkConfig};
use crate::sinks::{Sink, SinkKind};

pub use metrics::Counters;

/// First wait before retrying a batch; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between two tries of a batch. Short, because there are a few relays, not a
/// fleet reconnecting in step: with 30 s, the first rows after a 20 s database outage landed
/// 12 s after the database was back (docs/SCALING.md); a retry every 5 s of a down database
/// costs nothing.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What every partition task shares.
pub(crate) struct Relay {
    pub nats: NatsSink,
    pub database: Arc<dyn Sink>,
    pub settings: crate::config::relay::RelaySettings,
    pub counters: Arc<Counters>,
}

/// The relay's source and target, from the agent's configuration: the `nats` sink settings
/// (`CENTRAL_NATS_*` or a `type = "nats"` sink) and the one database sink (PostgreSQL or
/// MariaDB).
fn endpoints(config: &Config) -> anyhow::Result<(NatsSinkConfig, DatabaseSinkConfig)> {
    let mut nats = None;
    let mut database = None;
    for sink in &config.sinks {
        match &sink.kind {
            SinkKind::Nats(n) if nats.is_none() => nats = Some(n.clone()),
            SinkKind::Nats(_) => bail!(
                "the configuration has more than one NATS sink; the relay reads one stream: keep one (CENTRAL_NATS_URL or one type = \"nats\" sink)"
            ),
            SinkKind::Database(d) if database.is_none() => database = Some(d.clone()),
            SinkKind::Database(_) => bail!(
                "the configuration has more than one database sink; the relay writes into one: keep one (CENTRAL_DATABASE_URL or one type = \"database\" sink)"
            ),
            SinkKind::Http(_) => {}
        }
    }
    let Some(nats) = nats else {
        bail!(
            "the relay needs the NATS server to read from: set CENTRAL_NATS_URL (or a type = \"nats\" sink in CONFIG_FILE)"
        );
    };
    let Some(database) = database else {
        bail!(
            "the relay needs the database to write into: set CENTRAL_DATABASE_URL to a postgres:// or mysql:// URL"
        );
    };
    if !(database.url.starts_with("postgres") || database.url.starts_with("mysql")) {
        bail!(
            "the relay writes into PostgreSQL or MariaDB, and CENTRAL_DATABASE_URL is {}: set it to a postgres:// or mysql:// URL (the relay runs beside the central database; SQLite is the agent's local fallback)",
            crate::redact::url(&database.url)
        );
    }
    Ok((nats, database))
}

/// The partitions to consume: `--partitions` (or `RELAY_PARTITIONS`), each below
/// `CENTRAL_NATS_PARTITIONS`; all of them when neither is given; `[None]` without partitions.
fn partitions(total: u32, chosen: Option<&[u32]>) -> anyhow::Result<Vec<Option<u32>>> {
    match (total, chosen) {
        (0, None) => Ok(vec![None]),
        (0, Some(_)) => bail!(
            "--partitions (RELAY_PARTITIONS) needs CENTRAL_NATS_PARTITIONS: set it to the number the agents publish over, or remove --partitions"
        ),
        (n, None) => Ok((0..n).map(Some).collect()),
        (n, Some(list)) => {
            if let Some(bad) = list.iter().find(|k| **k >= n) {
                bail!(
                    "partition {bad} does not exist: CENTRAL_NATS_PARTITIONS is {n}, so partitions are 0 to {}",
                    n - 1
                );
            }
            Ok(list.iter().copied().map(Some).collect())
        }
    }
}

/// Runs the relay until `stop` is cancelled: one task per partition and the metrics listener.
/// `chosen` is `--partitions` (overriding `RELAY_PARTITIONS`).
pub async fn run(
    config: Config,
    chosen: Option<Vec<u32>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let (nats_config, database_config) = endpoints(&config)?;
    let settings = config.relay.clone();
    let chosen = chosen.or_else(|| settings.partitions.clone());
    let partitions = partitions(nats_config.partitions, chosen.as_deref())?;
    let nats = NatsSink::new("nats", nats_config)?;
    let database = crate::sinks::database::build("database", database_config)?;
    let counters = Arc::new(Counters::default());
    let listener = tokio::net::TcpListener::bind(settings.addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen on RELAY_ADDR {}; choose another address",
                settings.addr
            )
        })?;
    tracing::info!(
        version = crate::version::current(),
        nats = %nats.shown(),
        partitions = ?partitions,
        batch = settings.batch,
        metrics = %settings.addr,
        "Relay starting."
    );
    let relay = Arc::new(Relay {
        nats,
        database,
        settings,
        counters: Arc::clone(&counters),
    });
    let tracker = tokio_util::task::TaskTracker::new();
    tracker.spawn(metrics::serve(listener, counters, stop.clone()));
    for partition in partitions {
        tracker.spawn(partition::run(Arc::clone(&relay), partition, stop.clone()));
    }
    tracker.close();
    tracker.wait().await;
    tracing::info!("Relay stopped.");
    Ok(())
}

/// The wait before the `attempt`-th retry (1-based): doubling from [`FIRST_BACKOFF`], at most
/// [`MAX_BACKOFF`].
fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << attempt.saturating_sub(1).min(10))
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_checked_against_the_agents_count() {
        assert_eq!(partitions(0, None).unwrap(), vec![None]);
        assert_eq!(
            partitions(3, None).unwrap(),
            vec![Some(0), Some(1), Some(2)]
        );
        assert_eq!(
            partitions(4, Some(&[1, 3])).unwrap(),
            vec![Some(1), Some(3)]
        );
        let err = partitions(4, Some(&[4])).unwrap_err().to_string();
        assert!(err.contains("partition 4 does not exist"), "{err}");
        assert!(partitions(0, Some(&[0])).is_err());
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        assert_eq!(backoff(1), FIRST_BACKOFF);
        assert_eq!(backoff(2), FIRST_BACKOFF * 2);
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
