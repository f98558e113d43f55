//! One partition's loop (see [`super`] for the rules): its durable consumer, fetching a batch,
//! writing it through the database sink until every message is committed or dead-lettered,
//! then acknowledging the batch as a whole.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use tokio_util::sync::CancellationToken;

use super::dead::{self, DeadLetter};
use super::message::{self, Record};
use super::{Counters, Relay, backoff};
use crate::sinks::Outcome;
use crate::sinks::database::ORIGIN_AGENTS;

/// How long an empty fetch waits before asking again.
const IDLE: Duration = Duration::from_millis(200);
/// How long a pull waits for messages when the stream had none for this partition.
const LONG_POLL: Duration = Duration::from_secs(1);
/// Waited beyond the ack wait for an earlier relay's unacknowledged messages, so that
/// JetStream has queued them for redelivery before the first fetch.
const ORPHAN_MARGIN: Duration = Duration::from_secs(1);

/// The loop of `partition` (`None`: the whole stream) until `stop`.
pub(super) async fn run(relay: Arc<Relay>, partition: Option<u32>, stop: CancellationToken) {
    let name = match partition {
        Some(k) => format!("{}-p{k}", relay.settings.consumer),
        None => relay.settings.consumer.clone(),
    };
    let filter = relay.nats.filter_subject(partition);
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        let (stream, consumer) = match consumer(&relay, &name, &filter).await {
            Ok(found) => {
                failures = 0;
                found
            }
            Err(error) => {
                failures += 1;
                Counters::add(&relay.counters.fetch_errors, 1);
                tracing::warn!(consumer = %name, error = %error, "Cannot set up the relay's consumer; retrying.");
                sleep_or_stop(backoff(failures), &stop).await;
                continue;
            }
        };
        tracing::info!(consumer = %name, stream = %stream, subjects = %filter, "Relay consumer ready.");
        // Messages handed out and never acknowledged (a relay killed mid-batch) come back only
        // after the ack wait; until then JetStream would hand this relay the messages after
        // them, and a later record of a key could land before an earlier one. So wait for the
        // ack wait to run out: JetStream then delivers the redeliveries before anything newer.
        let orphans = consumer.cached_info().num_ack_pending;
        if orphans > 0 {
            let wait = relay.settings.ack_wait + ORPHAN_MARGIN;
            tracing::info!(consumer = %name, messages = orphans, wait_secs = wait.as_secs_f64(), "Messages of an earlier relay are still unacknowledged; waiting for JetStream to give them back before fetching anything newer (per-key order).");
            if !sleep_or_stop(wait, &stop).await {
                break;
            }
        }
        while !stop.is_cancelled() {
            // What the stream holds now, without waiting: a backlog drains batch after batch,
            // and its last, partial batch of a partition is not held back for the pull's
            // expiry (that wait was a second per partition at the end of every drain). Only
            // when nothing is there, a pull that waits up to LONG_POLL for messages.
            let mut batch = fetch(&consumer, relay.settings.batch, None).await;
            if matches!(&batch, Ok(b) if b.is_empty()) {
                batch = fetch(&consumer, relay.settings.batch, Some(LONG_POLL)).await;
            }
            match batch {
                Ok(batch) if batch.is_empty() => {
                    sleep_or_stop(IDLE, &stop).await;
                }
                Ok(batch) => {
                    failures = 0;
                    write_and_ack(&relay, &stream, batch, &stop).await;
                }
                Err(error) => {
                    failures += 1;
                    Counters::add(&relay.counters.fetch_errors, 1);
                    tracing::warn!(consumer = %name, error = %relay.nats.scrub_text(error), "Fetching from JetStream failed; retrying.");
                    sleep_or_stop(backoff(failures), &stop).await;
                    // The consumer may be gone (deleted, or the stream re-created): set it up again.
                    break;
                }
            }
        }
    }
}

/// Up to `max` messages: those available now (`wait` = `None`), or those that come within
/// `wait` (the pull ends at `max` messages or when `wait` runs out).
async fn fetch(
    consumer: &consumer::PullConsumer,
    max: usize,
    wait: Option<Duration>,
) -> Result<Vec<jetstream::Message>, String> {
    let fetched = match wait {
        None => consumer.fetch().max_messages(max).messages().await,
        Some(wait) => {
            consumer
                .batch()
                .max_messages(max)
                .expires(wait)
                .messages()
                .await
        }
    };
    match fetched {
        Ok(messages) => collect(messages).await,
        Err(err) => Err(err.to_string()),
    }
}

/// The durable pull consumer `name` on the stream that captures `filter`, created when missing.
async fn consumer(
    relay: &Relay,
    name: &str,
    filter: &str,
) -> Result<(String, consumer::PullConsumer), String> {
    let js = relay.nats.jetstream().await?;
    let stream_name = js.stream_by_subject(filter).await.map_err(|err| {
        format!(
            "no JetStream stream captures {filter} at {} ({err}); create the stream the agents publish to, or check CENTRAL_NATS_SUBJECT and CENTRAL_NATS_PARTITIONS",
            relay.nats.shown()
        )
    })?;
    let stream = js
        .get_stream(&stream_name)
        .await
        .map_err(|err| format!("reading the stream {stream_name}: {err}"))?;
    let batch = i64::try_from(relay.settings.batch).expect("RELAY_BATCH is at most 10,000");
    let config = consumer::pull::Config {
        durable_name: Some(name.to_owned()),
        filter_subject: filter.to_owned(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: relay.settings.ack_wait,
        // One batch in flight per partition: nothing later can be handed to another relay
        // before this batch is committed and acknowledged (per-key order). A batch left
        // unacknowledged by a killed relay may be smaller than this: see the wait in [`run`].
        max_ack_pending: batch,
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    };
    let consumer = stream
        .get_or_create_consumer(name, config)
        .await
        .map_err(|err| format!("creating the consumer {name} on {stream_name}: {err}"))?;
    Ok((stream_name, consumer))
}

/// Every message of a fetch, or the error that cut it.
async fn collect(mut messages: consumer::pull::Batch) -> Result<Vec<jetstream::Message>, String> {
    use futures_util::StreamExt as _;
    let mut out = Vec::new();
    while let Some(message) = messages.next().await {
        match message {
            Ok(message) => out.push(message),
            // What was received is given back unacknowledged: JetStream redelivers it.
            Err(err) if out.is_empty() => return Err(err.to_string()),
            Err(_) => break,
        }
    }
    Ok(out)
}

/// One message of a batch and what became of it.
struct Slot {
    message: jetstream::Message,
    record: Option<Record>,
    done: bool,
}

/// Writes `batch` until every message is committed or dead-lettered, then acknowledges it all.
/// Returns early without acknowledging when `stop` comes first (JetStream redelivers it).
async fn write_and_ack(
    relay: &Relay,
    stream: &str,
    batch: Vec<jetstream::Message>,
    stop: &CancellationToken,
) {
    let counters = &relay.counters;
    Counters::add(&counters.fetched, batch.len());
    let mut slots: Vec<Slot> = Vec::with_capacity(batch.len());
    for message in batch {
        if message.info().is_ok_and(|info| info.delivered > 1) {
            Counters::add(&counters.redelivered, 1);
        }
        let parsed = message::parse(&message.payload, relay.database.name());
        let mut slot = Slot {
            message,
            record: None,
            done: false,
        };
        match parsed {
            Ok(record) => slot.record = Some(record),
            Err(reason) => {
                if !keep_dead(relay, stream, &slot, None, &reason, stop).await {
                    return;
                }
                slot.done = true;
            }
        }
        slots.push(slot);
    }
    let mut attempt = 0u32;
    loop {
        let stalled = write_pending(relay, stream, &mut slots, stop).await;
        let Some(stalled) = stalled else {
            return;
        };
        if slots.iter().all(|s| s.done) {
            break;
        }
        attempt += 1;
        Counters::add(&counters.retries, 1);
        let waiting = slots.iter().filter(|s| !s.done).count();
        tracing::warn!(stream, records = waiting, attempt, error = %stalled, "Writing a relay batch failed; it will be retried (nothing is acknowledged before it is written).");
        // Still being worked on: JetStream must not hand these to another relay meanwhile.
        for slot in slots.iter().filter(|s| !s.done) {
            let _ = slot.message.ack_with(AckKind::Progress).await;
        }
        if !sleep_or_stop(backoff(attempt), stop).await {
            return;
        }
    }
    // Every row committed (or kept as a dead letter): acknowledge the batch, in stream order.
    let mut acked = 0usize;
    for slot in &slots {
        match slot.message.ack().await {
            Ok(()) => acked += 1,
            // The row is committed: a redelivery finds it and writes nothing.
            Err(err) => {
                tracing::warn!(stream, error = %err, "An acknowledgement did not reach JetStream; the message will come again and find its row.");
            }
        }
    }
    Counters::add(&counters.acked, acked);
    Counters::add(&counters.batches, 1);
    tracing::debug!(
        stream,
        records = slots.len(),
        "Relay batch written and acknowledged."
    );
}

/// One pass over the messages not yet done: one delivery of them all, in stream order, each row
/// with the agent of its message ([`ORIGIN_AGENTS`]). The sink keeps each key's order inside
/// it (runs of a key in one transaction; a dead record's later records `Skipped`), so what is
/// not done after the pass is retried as a whole by the next one. Returns the last transient
/// error (`Some("")` when none), or `None` when `stop` came first.
async fn write_pending(
    relay: &Relay,
    stream: &str,
    slots: &mut [Slot],
    stop: &CancellationToken,
) -> Option<String> {
    // A slot without a record was dead-lettered when the batch was read, so is done.
    let pending: Vec<usize> = (0..slots.len())
        .filter(|&i| !slots[i].done && slots[i].record.is_some())
        .collect();
    let mut error = String::new();
    if pending.is_empty() {
        return Some(error);
    }
    let mut deliveries = Vec::with_capacity(pending.len());
    let mut agents = Vec::with_capacity(pending.len());
    for &i in &pending {
        let record = slots[i].record.as_ref().expect("filtered on is_some above");
        deliveries.push(record.delivery.clone());
        agents.push(record.agent_id.clone());
    }
    let outcomes = ORIGIN_AGENTS
        .scope(agents.into(), relay.database.deliver(&deliveries))
        .await;
    for (&i, outcome) in pending.iter().zip(outcomes) {
        match outcome {
            Outcome::Delivered => {
                slots[i].done = true;
                Counters::add(&relay.counters.written, 1);
            }
            Outcome::Dead { reason } => {
                let id = slots[i]
                    .record
                    .as_ref()
                    .map(|r| r.delivery.envelope.id.clone());
                if !keep_dead(
                    relay,
                    stream,
                    &slots[i],
                    id.as_deref(),
                    &reason.detail,
                    stop,
                )
                .await
                {
                    return None;
                }
                tracing::error!(stream, id = ?id, reason = %reason.summary, "The database refused a relayed record for good; it is kept in RELAY_DEAD_LETTER_DIR.");
                slots[i].done = true;
            }
            Outcome::Retry { error: e, .. } => error = e,
            Outcome::Skipped => {}
        }
    }
    Some(error)
}

/// Writes the slot's message to the dead-letter folder, retrying until it is on disk (it is
/// acknowledged afterwards, and the stream may then drop it). `false` when `stop` came first.
async fn keep_dead(
    relay: &Relay,
    stream: &str,
    slot: &Slot,
    id: Option<&str>,
    reason: &str,
    stop: &CancellationToken,
) -> bool {
    let stream_seq = slot.message.info().map_or(0, |info| info.stream_sequence);
    let mut attempt = 0;
    loop {
        let letter = DeadLetter {
            stream,
            stream_seq,
            subject: slot.message.subject.as_str(),
            id,
            reason,
            payload: &slot.message.payload,
        };
        match dead::write(&relay.settings.dead_letter_dir, &letter) {
            Ok(path) => {
                Counters::add(&relay.counters.dead, 1);
                tracing::warn!(stream, stream_seq, path = %path.display(), "A relayed message is a dead letter.");
                return true;
            }
            Err(err) => {
                attempt += 1;
                tracing::error!(dir = %relay.settings.dead_letter_dir.display(), error = %err, "Cannot write a relay dead letter; its message is not acknowledged until it can be. Check RELAY_DEAD_LETTER_DIR.");
                if !sleep_or_stop(backoff(attempt), stop).await {
                    return false;
                }
            }
        }
    }
}

/// Sleeps `wait`; `false` when `stop` came first.
async fn sleep_or_stop(wait: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        () = stop.cancelled() => false,
    }
}
