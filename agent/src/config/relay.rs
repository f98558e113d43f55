//! The `RELAY_*` keys of `estafeta relay` (the central-side consumer, [`crate::relay`]): where
//! its `/metrics` listens, how many messages one partition takes at a time, how long JetStream
//! waits for an acknowledgement, the durable consumers' name, the partitions it consumes and
//! where records the database refuses for good are kept. The relay's NATS server and database
//! are the agent's own `CENTRAL_NATS_*` and `CENTRAL_DATABASE_*` (or `[[sinks]]`) settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::keys::{
    DEFAULT_RELAY_ACK_WAIT_SECS, DEFAULT_RELAY_ADDR, DEFAULT_RELAY_BATCH, DEFAULT_RELAY_CONSUMER,
    DEFAULT_RELAY_DEAD_LETTER_DIR, MAX_RELAY_BATCH,
};
use super::parse::{parse_addr, parse_secs, parse_u64, positive_usize};
use super::raw::Loader;

/// What `RELAY_*` says (defaults when unset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySettings {
    /// `RELAY_ADDR`: `/metrics` (`estafeta_relay_*`) and `/healthz`.
    pub addr: SocketAddr,
    /// `RELAY_BATCH`: messages per fetch and partition (1 to [`MAX_RELAY_BATCH`]); also each
    /// consumer's `max_ack_pending`, so a partition never has more in flight than one batch.
    pub batch: usize,
    /// `RELAY_ACK_WAIT_SECS`: JetStream redelivers a message not acknowledged in this time
    /// (the relay says "in progress" while it retries a batch, so only a dead relay's
    /// messages go back).
    pub ack_wait: Duration,
    /// `RELAY_CONSUMER`: the durable consumers' name (prefix).
    pub consumer: String,
    /// `RELAY_PARTITIONS`: the partitions this relay consumes (`0-3`, `0,2,5`); `None`: all
    /// of `CENTRAL_NATS_PARTITIONS`. `estafeta relay --partitions` overrides it.
    pub partitions: Option<Vec<u32>>,
    /// `RELAY_DEAD_LETTER_DIR`: one JSON file per message the database refused for good.
    pub dead_letter_dir: PathBuf,
}

impl Default for RelaySettings {
    fn default() -> Self {
        RelaySettings {
            addr: DEFAULT_RELAY_ADDR,
            batch: DEFAULT_RELAY_BATCH as usize,
            ack_wait: Duration::from_secs(DEFAULT_RELAY_ACK_WAIT_SECS),
            consumer: DEFAULT_RELAY_CONSUMER.to_owned(),
            partitions: None,
            dead_letter_dir: PathBuf::from(DEFAULT_RELAY_DEAD_LETTER_DIR),
        }
    }
}

/// A partition list: `0-3`, `0,2,5`, `0-1,4` (each 0 to 1023), sorted, without repeats.
pub fn parse_partition_list(text: &str) -> Result<Vec<u32>, String> {
    let expected = "expected partition numbers such as 0-3 or 0,2,5 (each 0 to 1023)";
    let number = |t: &str| {
        t.trim()
            .parse::<u32>()
            .ok()
            .filter(|n| *n < crate::sinks::nats::MAX_PARTITIONS)
            .ok_or_else(|| expected.to_owned())
    };
    let mut out = Vec::new();
    for part in text.split(',') {
        match part.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (number(from)?, number(to)?);
                if from > to {
                    return Err(format!("{expected}; {from}-{to} runs backwards"));
                }
                out.extend(from..=to);
            }
            None => out.push(number(part)?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

impl Loader {
    /// The `RELAY_*` keys; a bad value is a problem naming the key, the default stands in.
    pub(super) fn relay_settings(&mut self) -> RelaySettings {
        let defaults = RelaySettings::default();
        let cwd = self.cwd.clone();
        RelaySettings {
            addr: self.parse("RELAY_ADDR", defaults.addr, parse_addr),
            batch: self.parse("RELAY_BATCH", defaults.batch, |v| {
                let n = positive_usize(parse_u64(v, "a number of messages")?, "messages")?;
                if n > MAX_RELAY_BATCH {
                    return Err(format!("expected 1 to {MAX_RELAY_BATCH} messages"));
                }
                Ok(n)
            }),
            ack_wait: self.parse("RELAY_ACK_WAIT_SECS", defaults.ack_wait, |v| {
                parse_secs(v, false)
            }),
            consumer: self.parse("RELAY_CONSUMER", defaults.consumer, |v| {
                crate::sinks::nats::check_stream_name(v)
                    .map(|()| v.to_owned())
                    .map_err(|e| e.replace("a stream name", "a consumer name"))
            }),
            partitions: self.parse_opt("RELAY_PARTITIONS", parse_partition_list),
            dead_letter_dir: self
                .text("RELAY_DEAD_LETTER_DIR")
                .filter(|p| !p.is_empty())
                .map_or_else(|| cwd.join(defaults.dead_letter_dir), |p| cwd.join(p)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_lists_are_ranges_and_numbers() {
        assert_eq!(parse_partition_list("0-3"), Ok(vec![0, 1, 2, 3]));
        assert_eq!(parse_partition_list("5, 0-1,1"), Ok(vec![0, 1, 5]));
        assert!(
            parse_partition_list("3-1")
                .unwrap_err()
                .contains("backwards")
        );
        assert!(parse_partition_list("x").is_err());
        assert!(parse_partition_list("1024").is_err());
        assert!(parse_partition_list("").is_err());
    }
}
