//! JetStream sink: every record is published to a NATS JetStream stream, with the record's id
//! in the `Nats-Msg-Id` header so that the stream drops a resend (contract 4), and the record
//! is acknowledged only after the stream's publish acknowledgement came back.
//!
//! ```text
//! subject   from a template, default estafeta.{entity}.{action}   ({agent} is the AGENT_ID
//!           with every character outside [A-Za-z0-9_-] made '_')
//! headers   Nats-Msg-Id: <record id>   Estafeta-Seq: <seq>   Estafeta-Agent: <AGENT_ID>
//! body      {"id":…,"seq":…,"agent_id":…,"action":…,"entity":…,"key":…,"staged_at":…,"payload":<as staged>}
//! ```
//!
//! - A batch is pipelined on the one connection: every message is handed to the connection in
//!   batch order, then the acks are awaited concurrently. A batch carries runs of records of one
//!   key ([`super::runs`]) in seq order, and JetStream stores one connection's messages in the
//!   order they arrive, so a run lands in order.
//! - What could break that is a message refused while a later message of its key is accepted.
//!   Refusals found before sending hold back the rest of the key: a message over the server's
//!   `max_payload` (async-nats refuses it without sending it), over the stream's
//!   `max_msg_size` (checked first against the stream that captures the subject, looked up once
//!   per subject on a connection: [`limits`]), or one that cannot be handed to the connection
//!   at all. The record is dead (or retried) and the later records of its key in the batch are
//!   [`Outcome::Skipped`], not sent.
//! - An ack that fails after sending (a timeout, a lost connection, a refusal the check did not
//!   foresee) cannot hold back the later messages of its key: they were sent behind it and may
//!   be stored. Their outcomes are given as they are (the later ones delivered, the failed one
//!   retried or dead) and a WARN names the records by seq and id: that key's order in the
//!   stream may differ from the staged order. After a timeout the message was often stored
//!   anyway, in its place, and its resend is dropped as a duplicate; otherwise the resend lands
//!   after the later records of its key.
//! - JetStream drops a message whose `Nats-Msg-Id` it saw within the stream's
//!   `duplicate_window` (2 minutes by default). A resend after a longer outage is stored twice;
//!   consumers dedupe on the record id (see the README).
//! - Errors are sorted as contract 5 says. Connection refused, a lost connection, a missing
//!   stream ("no responders"), an ack timeout, storage limits: retry with backoff. A message
//!   the server refuses for its size (over the server's `max_payload`, or the stream's
//!   `max_msg_size`): dead letter with the sizes. Anything else the stream answers: retry
//!   (when in doubt, retry: a retry loses nothing, a dead letter needs a person).
//! - The connection is opened on the first delivery or probe, never at build time, so the agent
//!   starts (and stages) while NATS is down; afterwards the client reconnects by itself. A
//!   batch is not published while the client is disconnected: it is retried at once.
//! - With `create_stream = true` the stream is created (or left as it is, if it exists) on
//!   connection, and again after a publish finds no stream. Off by default: in most sites the
//!   stream belongs to the team that runs NATS.
//! - Credentials in the URL (`nats://user:password@host`, `nats://token@host`) and the token are
//!   taken out of the URL before it reaches the client, never logged, and scrubbed from errors.
//! - Several servers (`nats://a:4222,nats://b:4222`, a cluster): each URL is checked like one;
//!   the client connects to one of them and, when it fails, to another (and to the servers the
//!   cluster announces), so a stream replicated over the cluster keeps taking records while a
//!   node is down. One set of credentials and TLS rules serves them all ([`security`]).
//! - With `CENTRAL_NATS_PARTITIONS` = N, the subject gets one more token, `.p<k>`, k =
//!   [`partition_of`] the record's order key: every record of a key goes to one partition, so
//!   relays consuming partitions apart keep per-key order (see [`crate::relay`]).
//! - TLS and authentication ([`security`]): `tls://`, or `nats://` with `tls_required` (the
//!   default beyond loopback), is TLS verified against the host name before anything else is
//!   sent, never clear text; the trust is the project's ([`crate::tls`]: the CA file, else the
//!   system's store and the bundled roots); NKey seed and `.creds` files. `transport()` says
//!   what the last connection negotiated (on a loopback `nats://`, the server's INFO decides).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_nats::connection::State;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{ConnectErrorKind, ConnectOptions, HeaderMap};
use estafeta_staging::{Delivery, Envelope};
use reqwest::Url;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::OnceCell;
use tokio::task::JoinSet;

use super::{BoxFuture, Outcome, Refusal, Sink, error_chain, order_key, runs};
use crate::redact::Secrets;

mod config;
mod limits;
#[cfg(test)]
mod run_tests;
mod security;
#[cfg(test)]
mod tests;

pub use config::*;
use config::{AGENT_HEADER, MSG_ID_HEADER, SEQ_HEADER};

/// The open connection.
struct Connection {
    client: async_nats::Client,
    js: jetstream::Context,
    /// The streams' `max_msg_size` by subject, as looked up on this connection.
    limits: limits::StreamLimits,
}

/// Publishes records to JetStream; see the module documentation.
pub struct NatsSink {
    name: String,
    /// The servers' URLs without credentials, as the client gets them (several for a
    /// cluster: the client picks one and moves to another when it fails).
    servers: Vec<String>,
    /// The URL as shown (credentials hidden).
    shown: String,
    /// TLS and authentication.
    security: security::Security,
    subject: String,
    timeout: Duration,
    agent_id: String,
    /// The agent id as one subject token.
    agent_token: String,
    stream: Option<StreamSettings>,
    /// `CENTRAL_NATS_PARTITIONS` (0: no partition token).
    partitions: u32,
    /// Whether the configured stream was created (or found) on this connection.
    stream_ready: AtomicBool,
    connection: OnceCell<Connection>,
    /// Token, passwords and seed, scrubbed from every error message.
    secrets: Secrets,
}

impl NatsSink {
    /// Checks the URL, subject and stream settings. Connects to nothing.
    pub fn new(name: impl Into<String>, config: NatsSinkConfig) -> anyhow::Result<Self> {
        let name = name.into();
        let shown = shown_nats_urls(&config.url);
        check_nats_url(&config.url).map_err(|e| anyhow::anyhow!("the NATS URL {shown:?}: {e}"))?;
        // Every server of a cluster list, parsed; credentials leave each URL (they go to the
        // client's options, once: check_nats_url made sure they are the same everywhere).
        let mut urls = Vec::new();
        for part in split_nats_urls(&config.url) {
            urls.push(Url::parse(part).context("the NATS URL")?);
        }
        let security = security::Security::new(&config, &urls, &shown)?;
        let secrets = security.secrets.clone();
        let mut servers = Vec::with_capacity(urls.len());
        for mut url in urls {
            url.set_username("")
                .map_err(|()| anyhow::anyhow!("the NATS URL {shown:?} cannot hold credentials"))?;
            url.set_password(None)
                .map_err(|()| anyhow::anyhow!("the NATS URL {shown:?} cannot hold credentials"))?;
            servers.push(url.as_str().trim_end_matches('/').to_owned());
        }

        check_subject_template(&config.subject)
            .map_err(|e| anyhow::anyhow!("the subject {:?}: {e}", config.subject))?;
        if let Some(stream) = &config.stream {
            check_stream_name(&stream.name)
                .map_err(|e| anyhow::anyhow!("the stream name {:?}: {e}", stream.name))?;
            if stream.subjects.is_empty() {
                bail!("the stream {:?} needs at least one subject", stream.name);
            }
            if !(1..=MAX_REPLICAS).contains(&stream.replicas) {
                bail!("replicas must be 1 to {MAX_REPLICAS}");
            }
        }
        let agent_token = config
            .agent_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Ok(Self {
            name,
            servers,
            shown,
            security,
            subject: config.subject,
            timeout: config.timeout,
            agent_id: config.agent_id,
            agent_token,
            stream: config.stream,
            partitions: config.partitions,
            stream_ready: AtomicBool::new(false),
            connection: OnceCell::new(),
            secrets,
        })
    }

    /// The connection (opened now if needed, with the sink's TLS and credentials), for
    /// [`crate::relay`], which consumes what agents published with the same settings.
    pub async fn jetstream(&self) -> Result<jetstream::Context, String> {
        Ok(self.connection().await?.js.clone())
    }

    /// The URL(s) as shown (credentials hidden).
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// `CENTRAL_NATS_PARTITIONS` (0: none).
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The subjects of one partition (`None`: every subject the template makes): what a
    /// relay's consumer filters on, such as `estafeta.*.*.p3`.
    pub fn filter_subject(&self, partition: Option<u32>) -> String {
        let subjects = default_stream_subject(&self.subject);
        match partition {
            Some(k) => format!("{subjects}.p{k}"),
            None => stream_subject(&self.subject, self.partitions),
        }
    }

    /// Scrubs the sink's secrets from `message`.
    pub fn scrub_text(&self, message: String) -> String {
        self.scrub(message)
    }

    /// The subject of one record.
    fn subject_for(&self, envelope: &Envelope) -> String {
        let mut out = String::with_capacity(self.subject.len() + 32);
        let mut rest = self.subject.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after.find('}').unwrap_or(after.len());
            out.push_str(match &after[..close] {
                "entity" => envelope.entity.as_str(),
                "action" => envelope.action.as_str(),
                // check_subject_template allows nothing else.
                _ => self.agent_token.as_str(),
            });
            rest = after.get(close + 1..).unwrap_or("");
        }
        out.push_str(rest);
        if self.partitions > 0 {
            let partition =
                partition_of(&envelope.entity, envelope.key.as_deref(), self.partitions);
            out.push_str(&format!(".p{partition}"));
        }
        out
    }

    /// The message body of one record.
    fn body(&self, envelope: &Envelope) -> Result<Vec<u8>, String> {
        #[derive(Serialize)]
        struct Body<'a> {
            id: &'a str,
            seq: u64,
            agent_id: &'a str,
            action: &'a str,
            entity: &'a str,
            key: Option<&'a str>,
            staged_at: &'a str,
            payload: &'a RawValue,
        }
        serde_json::to_vec(&Body {
            id: &envelope.id,
            seq: envelope.seq,
            agent_id: &self.agent_id,
            action: &envelope.action,
            entity: &envelope.entity,
            key: envelope.key.as_deref(),
            staged_at: &envelope.staged_at,
            payload: &envelope.payload,
        })
        .map_err(|err| format!("the record cannot be written as a message: {err}"))
    }

    /// The message of one record and its size as the stream measures it (headers and body).
    fn message(&self, envelope: &Envelope) -> Result<(PublishMessage, usize), String> {
        let body = self.body(envelope)?;
        let seq = envelope.seq.to_string();
        let fields = [
            (MSG_ID_HEADER, envelope.id.as_str()),
            (SEQ_HEADER, seq.as_str()),
            (AGENT_HEADER, self.agent_id.as_str()),
        ];
        let size = limits::wire_size(&fields, body.len());
        let mut headers = HeaderMap::new();
        for (name, value) in fields {
            headers.insert(name, value);
        }
        Ok((
            PublishMessage::build()
                .payload(body.into())
                .headers(headers),
            size,
        ))
    }

    /// Why the stream that captures `subject` would refuse a message of `size` bytes, if it
    /// would; `None` when it takes it or no limit is known.
    async fn over_stream_limit(
        &self,
        connection: &Connection,
        subject: &str,
        size: usize,
    ) -> Option<Refusal> {
        if size > connection.client.max_payload() {
            // async-nats refuses it without sending it, naming the server's max_payload: the
            // first limit a person has to raise.
            return None;
        }
        let kept = connection.limits.get(&connection.js, subject).await?;
        if size <= kept.max_msg_size? {
            return None;
        }
        // Decide a dead letter on the stream's limit as it is now, not as it was kept.
        let limit = connection.limits.refresh(&connection.js, subject).await?;
        let max = limit.max_msg_size?;
        (size > max).then(|| {
            Refusal::ours(self.scrub(format!(
                "publish to {subject}: the message is {size} bytes (headers and body), over the max_msg_size of the stream {} ({max} bytes); not sent. Raise the stream's max_msg_size, then requeue it with `estafeta retry --send`",
                limit.stream
            )))
        })
    }

    /// The open connection, opening it (and creating the stream) when there is none yet.
    async fn connection(&self) -> Result<&Connection, String> {
        let connection = self
            .connection
            .get_or_try_init(|| async {
                let options = ConnectOptions::new()
                    .name(format!("estafeta {}", self.agent_id))
                    .connection_timeout(self.timeout)
                    .request_timeout(Some(self.timeout))
                    .ping_interval(Duration::from_secs(20));
                let options = self.security.apply(options).await?;
                let client = options
                    .connect(self.servers.clone())
                    .await
                    .map_err(|err| self.connect_error(&err))?;
                let js = jetstream::ContextBuilder::new()
                    .timeout(self.timeout)
                    .backpressure_on_inflight(true)
                    .build(client.clone());
                self.security.connected(client.server_info().tls_required);
                let transport = self.security.observed.transport().describe();
                tracing::info!(sink = %self.name, url = %self.shown, max_payload = client.server_info().max_payload, transport = %transport, "Connected to NATS.");
                Ok::<_, String>(Connection {
                    client,
                    js,
                    limits: limits::StreamLimits::default(),
                })
            })
            .await?;
        if !self.stream_ready.load(Ordering::Acquire) {
            self.ensure_stream(&connection.js).await?;
        }
        Ok(connection)
    }

    /// Creates the configured stream unless it exists; without `create_stream`, nothing.
    async fn ensure_stream(&self, js: &jetstream::Context) -> Result<(), String> {
        let Some(stream) = &self.stream else {
            self.stream_ready.store(true, Ordering::Release);
            return Ok(());
        };
        let mut config = jetstream::stream::Config {
            name: stream.name.clone(),
            subjects: stream.subjects.clone(),
            retention: stream.retention.policy(),
            num_replicas: stream.replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        if let Some(window) = stream.duplicate_window {
            config.duplicate_window = window;
        }
        match js.get_or_create_stream(config).await {
            Ok(_) => {
                tracing::info!(sink = %self.name, stream = %stream.name, subjects = ?stream.subjects, "JetStream stream ready.");
                self.stream_ready.store(true, Ordering::Release);
                Ok(())
            }
            Err(err) => Err(self.scrub(format!(
                "cannot create the JetStream stream {:?} (subjects {:?}) at {}: {}; check that JetStream is enabled and the stream's subjects do not overlap another stream's",
                stream.name,
                stream.subjects,
                self.shown,
                error_chain(&err)
            ))),
        }
    }

    /// Publishes `beat` as JSON on `estafeta_heartbeat.<agent>` and flushes it.
    async fn send_heartbeat(
        &self,
        beat: &crate::sinks::heartbeat::Heartbeat,
    ) -> anyhow::Result<()> {
        let connection = self.connection().await.map_err(anyhow::Error::msg)?;
        let state = connection.client.connection_state();
        if state != State::Connected {
            bail!("not connected to {} ({state})", self.shown);
        }
        let subject = format!("{HEARTBEAT_SUBJECT_PREFIX}.{}", self.agent_token);
        let body = serde_json::to_vec(beat).context("writing the heartbeat as JSON")?;
        connection
            .client
            .publish(subject.clone(), body.into())
            .await
            .map_err(|err| {
                anyhow::anyhow!(self.scrub(format!("publish to {subject}: {}", error_chain(&err))))
            })?;
        connection.client.flush().await.map_err(|err| {
            anyhow::anyhow!(self.scrub(format!("flush to {}: {}", self.shown, error_chain(&err))))
        })?;
        Ok(())
    }

    fn connect_error(&self, err: &async_nats::ConnectError) -> String {
        let hint = match err.kind() {
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                "check the token, user and password, NKey seed or credentials file".to_owned()
            }
            ConnectErrorKind::TimedOut => "check that the server is up and reachable".to_owned(),
            // rustls' errors reach async-nats as I/O errors of the handshake.
            ConnectErrorKind::Tls => self.security.tls_hint(&error_chain(err)),
            ConnectErrorKind::Io if security::is_tls_failure(&error_chain(err)) => {
                self.security.tls_hint(&error_chain(err))
            }
            _ => "check that nats-server runs there (with JetStream) and the port is right"
                .to_owned(),
        };
        self.scrub(format!(
            "cannot connect to {}: {}; {hint}",
            self.shown,
            error_chain(err)
        ))
    }

    fn scrub(&self, message: String) -> String {
        self.secrets.scrub(&message)
    }

    /// Publishes one batch (see the module documentation).
    async fn publish_batch(&self, batch: &[Delivery]) -> Vec<Outcome> {
        let retry_all = |error: String| {
            tracing::warn!(sink = %self.name, records = batch.len(), error = %error, "JetStream delivery failed; the batch will be retried.");
            vec![
                Outcome::Retry {
                    error,
                    retry_after: None,
                };
                batch.len()
            ]
        };
        let connection = match self.connection().await {
            Ok(connection) => connection,
            Err(error) => return retry_all(error),
        };
        let state = connection.client.connection_state();
        if state != State::Connected {
            return retry_all(format!(
                "not connected to {} ({state}); the client reconnects by itself",
                self.shown
            ));
        }
        let mut outcomes: Vec<Option<Outcome>> = vec![None; batch.len()];
        // Keys with a record refused before it was sent: the rest of their run is not sent.
        let mut held = std::collections::HashSet::new();
        // Dropping the JoinSet (the batch cancelled at shutdown) stops waiting for the acks; the
        // records stay pending and a resend is dropped by the stream as a duplicate.
        let mut acks = JoinSet::new();
        for (i, delivery) in batch.iter().enumerate() {
            let key = order_key(delivery);
            if held.contains(&key) {
                outcomes[i] = Some(Outcome::Skipped);
                continue;
            }
            let envelope = &delivery.envelope;
            let subject = self.subject_for(envelope);
            let sent = match self.message(envelope) {
                Err(reason) => Err(Outcome::Dead {
                    reason: Refusal::ours(reason),
                }),
                Ok((message, size)) => {
                    match self.over_stream_limit(connection, &subject, size).await {
                        Some(reason) => Err(Outcome::Dead { reason }),
                        None => connection
                            .js
                            .send_publish(subject.clone(), message)
                            .await
                            .map_err(|err| self.publish_outcome(connection, &subject, &err)),
                    }
                }
            };
            match sent {
                Ok(ack) => {
                    acks.spawn(async move { (i, subject, ack.await) });
                }
                Err(outcome) => {
                    held.insert(key);
                    outcomes[i] = Some(outcome);
                }
            }
        }
        let mut duplicates = 0usize;
        while let Some(joined) = acks.join_next().await {
            match joined {
                Ok((i, _, Ok(ack))) => {
                    duplicates += usize::from(ack.duplicate);
                    outcomes[i] = Some(Outcome::Delivered);
                }
                Ok((i, subject, Err(err))) => {
                    outcomes[i] = Some(self.publish_outcome(connection, &subject, &err));
                }
                Err(err) => {
                    tracing::error!(sink = %self.name, error = %err, "A JetStream ack task failed; its record will be retried.");
                }
            }
        }
        let outcomes = super::retry_missing(outcomes, "publish");
        self.warn_overtaken(batch, &outcomes);
        tracing::debug!(
            sink = %self.name,
            records = batch.len(),
            delivered = super::delivered(&outcomes),
            duplicates,
            "JetStream batch published."
        );
        outcomes
    }

    /// Logs the records whose publish failed after a later record of their key was stored (see
    /// the module documentation), by seq and id: that key's order in the stream may differ.
    fn warn_overtaken(&self, batch: &[Delivery], outcomes: &[Outcome]) {
        let overtaken = overtaken(batch, outcomes);
        if !overtaken.is_empty() {
            tracing::warn!(
                sink = %self.name,
                records = %overtaken.join("; "),
                "A publish failed after later records of its key were stored; that key's order in the stream may differ from the staged order (unless the stream had stored the failed one and drops its resend as a duplicate)."
            );
        }
    }

    /// Sorts a failed publish into retry or dead (contract 5).
    fn publish_outcome(
        &self,
        connection: &Connection,
        subject: &str,
        err: &jetstream::context::PublishError,
    ) -> Outcome {
        let retry = |error: String| Outcome::Retry {
            error: self.scrub(error),
            retry_after: None,
        };
        match err.kind() {
            PublishErrorKind::MaxPayloadExceeded => Outcome::Dead {
                reason: Refusal::ours(self.scrub(format!(
                    "publish to {subject}: the message is larger than the server's max_payload ({} bytes): {}; raise max_payload in nats-server.conf, then requeue it with `estafeta retry --send`",
                    connection.client.server_info().max_payload,
                    error_chain(err)
                ))),
            },
            PublishErrorKind::StreamNotFound => {
                // With create_stream, create it again before the next batch.
                self.stream_ready.store(false, Ordering::Release);
                retry(format!(
                    "publish to {subject}: no JetStream stream captures this subject (no responders); create one (nats stream add --subjects '{}') or set create_stream = true",
                    stream_subject(&self.subject, self.partitions)
                ))
            }
            PublishErrorKind::TimedOut => retry(format!(
                "publish to {subject}: no acknowledgement from JetStream within {:?} ({})",
                self.timeout,
                connection.client.connection_state()
            )),
            PublishErrorKind::BrokenPipe => retry(format!(
                "publish to {subject}: the connection to {} was lost before the acknowledgement",
                self.shown
            )),
            _ => {
                let server = std::error::Error::source(err)
                    .and_then(|source| source.downcast_ref::<jetstream::Error>());
                match server.map(jetstream::Error::error_code) {
                    Some(ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM) => {
                        // The kept limit was wrong (lowered since): look it up again next time.
                        connection.limits.forget(subject);
                        Outcome::Dead {
                        reason: Refusal::ours(self.scrub(format!(
                            "publish to {subject}: the stream refuses a message this large: {}; raise the stream's max_msg_size, then requeue it with `estafeta retry --send`",
                            error_chain(err)
                        ))),
                        }
                    }
                    _ => retry(format!("publish to {subject}: {}", error_chain(err))),
                }
            }
        }
    }
}

/// For each record not delivered (and not skipped) whose key has a later record delivered in
/// the batch, one line naming them by seq and id (never by key).
fn overtaken(batch: &[Delivery], outcomes: &[Outcome]) -> Vec<String> {
    let named = |i: usize| {
        let envelope = &batch[i].envelope;
        format!("seq {} (id {})", envelope.seq, envelope.id)
    };
    let mut lines = Vec::new();
    for run in runs(batch) {
        for (n, &i) in run.iter().enumerate() {
            if matches!(outcomes[i], Outcome::Delivered | Outcome::Skipped) {
                continue;
            }
            let later: Vec<String> = run[n + 1..]
                .iter()
                .filter(|&&j| outcomes[j] == Outcome::Delivered)
                .map(|&j| named(j))
                .collect();
            if !later.is_empty() {
                lines.push(format!(
                    "{} failed, later stored: {}",
                    named(i),
                    later.join(", ")
                ));
            }
        }
    }
    lines
}

impl Sink for NatsSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(self.publish_batch(batch))
    }

    fn dry_run(&self, batch: &[Delivery]) -> Vec<String> {
        batch
            .iter()
            .map(|delivery| {
                let envelope = &delivery.envelope;
                format!(
                    "PUBLISH {} at {} Nats-Msg-Id={} ({} bytes of payload)",
                    self.subject_for(envelope),
                    self.shown,
                    envelope.id,
                    envelope.payload.get().len()
                )
            })
            .collect()
    }

    fn heartbeat<'a>(
        &'a self,
        beat: &'a crate::sinks::heartbeat::Heartbeat,
    ) -> BoxFuture<'a, Option<anyhow::Result<()>>> {
        Box::pin(async move { Some(self.send_heartbeat(beat).await) })
    }

    fn transport(&self) -> crate::tls::Transport {
        self.security.observed.transport()
    }

    fn probe(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let connection = self.connection().await.map_err(anyhow::Error::msg)?;
            let subjects = stream_subject(&self.subject, self.partitions);
            match connection.js.stream_by_subject(subjects.clone()).await {
                Ok(stream) => {
                    tracing::debug!(sink = %self.name, stream = %stream, "JetStream stream found.");
                    Ok(())
                }
                Err(err) => Err(anyhow::anyhow!(self.scrub(format!(
                    "connected to {}, but no JetStream stream captures {subjects}: {}; records would wait: create a stream for these subjects or set create_stream = true",
                    self.shown,
                    error_chain(&err)
                )))),
            }
        })
    }
}
