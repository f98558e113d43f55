//! Heartbeats: every `HEARTBEAT_SECS` the daemon tells the central side how this agent is —
//! its id (`AGENT_ID`, the host name by default, so the same across restarts), host name,
//! version, records pending per sink, the oldest pending age, dead letters, free disk and the
//! last error — so the IT team sees the whole fleet at a glance.
//!
//! A [`Heartbeat`] is built from the store's status and handed to every sink that takes
//! heartbeats ([`crate::sinks::Sink::heartbeat`]): the database sinks upsert it
//! into `estafeta_agents` (read by the `estafeta_fleet` view and `estafeta fleet`); the
//! JetStream sink publishes it as JSON on `estafeta_heartbeat.<agent>` (core NATS, not a
//! stream: a stream with `max_msgs_per_subject = 1` on `estafeta_heartbeat.>` keeps the last
//! one per agent). The HTTP sink takes them only when `heartbeat_path`
//! (`CENTRAL_API_HEARTBEAT_PATH`) says where: it `PUT`s the JSON to `{url}/{heartbeat_path}`.
//! A heartbeat that cannot be sent is dropped: the next one says the same, newer. Failures are
//! logged once per change of error, never per beat.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use estafeta_staging::{Staging, Status};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::sinks::Sink;

/// Default `HEARTBEAT_SECS` (written in the configuration's key table).
pub use crate::config::DEFAULT_HEARTBEAT_SECS;
/// Longest time one sink may take to take a heartbeat.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

pub use crate::sinks::heartbeat::{Heartbeat, SinkBeat};

impl Heartbeat {
    /// The heartbeat of an agent whose store reports `status`.
    pub fn new(config: &Config, status: &Status, started_at: DateTime<Utc>) -> Heartbeat {
        let sinks: Vec<SinkBeat> = status
            .sinks
            .iter()
            .map(|s| SinkBeat {
                sink: s.sink.clone(),
                pending: s.pending,
                in_flight: s.in_flight,
                dead: s.dead,
                oldest_pending_age_secs: s.oldest_pending_age_secs,
                last_success_at: s.last_success_at.clone(),
                last_failure_at: s.last_failure_at.clone(),
                last_error: s.last_error.clone(),
            })
            .collect();
        // RFC 3339 UTC times of one format sort as text.
        let last_error = status
            .sinks
            .iter()
            .filter(|s| s.last_error.is_some())
            .max_by(|a, b| a.last_failure_at.cmp(&b.last_failure_at))
            .and_then(|s| s.last_error.clone());
        Heartbeat {
            agent_id: config.agent_id.clone(),
            hostname: config.hostname.clone(),
            version: crate::version::current().to_owned(),
            sent_at: Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
            started_at: started_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            records_pending: status.records_pending,
            oldest_pending_age_secs: sinks.iter().filter_map(|s| s.oldest_pending_age_secs).max(),
            dead_letters: sinks.iter().map(|s| s.dead).sum(),
            disk_free_bytes: status.disk_free_bytes,
            staging_blocked: status.staging_blocked.clone(),
            last_error,
            sinks,
        }
    }
}

/// Sends a heartbeat every `config.heartbeat` until `cancel`, to every sink that takes them.
/// Returns at once when heartbeats are off (`HEARTBEAT_SECS=0`) or no sink takes them.
pub async fn run(
    store: Staging,
    sinks: Vec<Arc<dyn Sink>>,
    config: Arc<Config>,
    cancel: CancellationToken,
) {
    if config.heartbeat.is_zero() {
        debug!("Heartbeats are off (HEARTBEAT_SECS=0).");
        return;
    }
    if config.dry_run {
        info!("DRY_RUN: heartbeats are not sent.");
        return;
    }
    let started_at = Utc::now();
    let mut takers = sinks;
    let mut last_errors: Vec<Option<String>> = vec![None; takers.len()];
    let mut interval = tokio::time::interval(config.heartbeat);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = interval.tick() => {}
        }
        let status = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.status()).await
        };
        let status = match status {
            Ok(Ok(status)) => status,
            Ok(Err(err)) => {
                warn!(error = %err, "Could not read the staging status for a heartbeat; trying again at the next one.");
                continue;
            }
            Err(err) => {
                warn!(error = %err, "The heartbeat's status task failed; trying again at the next one.");
                continue;
            }
        };
        let beat = Heartbeat::new(&config, &status, started_at);
        let mut keep = Vec::with_capacity(takers.len());
        for (i, sink) in takers.iter().enumerate() {
            let sent = tokio::time::timeout(HEARTBEAT_TIMEOUT, sink.heartbeat(&beat)).await;
            let error = match sent {
                Ok(None) => continue, // This sink does not take heartbeats.
                Ok(Some(Ok(()))) => None,
                Ok(Some(Err(err))) => Some(format!("{err:#}")),
                Err(_) => Some(format!("no answer within {HEARTBEAT_TIMEOUT:?}")),
            };
            if error != last_errors[i] {
                match &error {
                    Some(error) => {
                        warn!(sink = %sink.name(), error = %error, "Could not send a heartbeat; the next one will be tried as usual.");
                    }
                    None if !first => {
                        info!(sink = %sink.name(), "Heartbeats go through again.");
                    }
                    None => {}
                }
            }
            keep.push((Arc::clone(sink), error));
        }
        if first {
            if keep.is_empty() {
                info!(
                    "No configured sink takes heartbeats (the database and NATS sinks do; the HTTP sink with CENTRAL_API_HEARTBEAT_PATH); heartbeats are off."
                );
                return;
            }
            info!(
                every_secs = config.heartbeat.as_secs_f64(),
                sinks = ?keep.iter().map(|(s, _)| s.name().to_owned()).collect::<Vec<_>>(),
                "Heartbeats started."
            );
            first = false;
        }
        last_errors = keep.iter().map(|(_, e)| e.clone()).collect();
        takers = keep.into_iter().map(|(s, _)| s).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use estafeta_staging::SinkStatus;

    #[test]
    fn a_heartbeat_sums_the_sinks_and_keeps_the_latest_error() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let env = [("AGENT_ID".to_owned(), "ws-07".to_owned())].into();
        let config = Config::inspect(dir.path(), None, &env)
            .result
            .expect("a valid configuration");
        assert_eq!(
            config.heartbeat,
            Duration::from_secs(DEFAULT_HEARTBEAT_SECS)
        );
        let sink = |name: &str, dead, age, failed: Option<&str>, error: Option<&str>| SinkStatus {
            sink: name.to_owned(),
            pending: 3,
            dead,
            oldest_pending_age_secs: age,
            last_failure_at: failed.map(str::to_owned),
            last_error: error.map(str::to_owned),
            ..SinkStatus::default()
        };
        let status = Status {
            root: dir.path().to_path_buf(),
            records_pending: 4,
            bytes_staged: 100,
            disk_free_bytes: Some(1 << 30),
            staging_blocked: None,
            sinks: vec![
                sink(
                    "api",
                    2,
                    Some(50),
                    Some("2026-01-01T10:00:00.000000Z"),
                    Some("old"),
                ),
                sink(
                    "nats",
                    1,
                    Some(70),
                    Some("2026-01-01T11:00:00.000000Z"),
                    Some("new"),
                ),
                sink("db", 0, None, None, None),
            ],
            groups: Vec::new(),
        };
        let beat = Heartbeat::new(&config, &status, Utc::now());
        assert_eq!(beat.agent_id, "ws-07");
        assert_eq!(beat.records_pending, 4);
        assert_eq!(beat.dead_letters, 3);
        assert_eq!(beat.oldest_pending_age_secs, Some(70));
        assert_eq!(beat.last_error.as_deref(), Some("new"));
        assert_eq!(beat.sinks.len(), 3);
        assert_eq!(beat.disk_free_bytes, Some(1 << 30));
    }
}
