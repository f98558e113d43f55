//! The JetStream sink against the real NATS server (127.0.0.1:4222, JetStream on), through the
//! conformance suite every sink passes. Each test publishes under a subject prefix of its own
//! into a stream of its own, deleted at the end (also when the test panics). A missing server
//! is a failure, never a skip: `scripts/start-services` starts it.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use common::{Count, agent_id, closed_port, delivery};
use estafeta::sinks::nats::{NatsSink, NatsSinkConfig, Retention, StreamSettings};
use estafeta::sinks::{Outcome, Sink};

const NATS_URL: &str = "nats://127.0.0.1:4222";

/// A stream only this test uses; deleted when dropped.
struct Scratch {
    name: String,
    prefix: String,
    js: jetstream::Context,
}

impl Scratch {
    /// Names only: the stream is made by [`Scratch::create`] or by the sink itself.
    async fn new() -> Scratch {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(NATS_URL)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "NATS is missing: cannot connect to {NATS_URL} ({e}); run scripts/start-services"
                )
            });
        let unique = uuid::Uuid::now_v7().simple().to_string();
        Scratch {
            name: format!("SINKTEST_{unique}"),
            prefix: format!("sinktest_{unique}"),
            js: jetstream::new(client),
        }
    }

    /// Creates the stream. A server-side storage error (code 500, "error creating store for
    /// stream") is tried again twice: CI once met it on a single stream of five made at the same
    /// moment, a blip of the host's disk, not of the sink under test. Any other error, or a third
    /// 500, fails the test.
    async fn create(&self, max_message_size: i32) {
        let config = stream::Config {
            name: self.name.clone(),
            subjects: vec![format!("{}.>", self.prefix)],
            max_message_size,
            ..Default::default()
        };
        for attempt in 1.. {
            match self.js.create_stream(config.clone()).await {
                Ok(_) => return,
                Err(e) if attempt < 3 && e.to_string().contains("code 500") => {
                    eprintln!(
                        "creating the stream {} (try {attempt}): {e}; trying again",
                        self.name
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("creating the stream {}: {e}", self.name),
            }
        }
    }

    fn sink(&self, url: &str, stream: Option<StreamSettings>) -> NatsSink {
        NatsSink::new(
            "nats",
            NatsSinkConfig {
                url: url.to_owned(),
                token: None,
                subject: format!("{}.{{entity}}.{{action}}", self.prefix),
                timeout: Duration::from_secs(3),
                agent_id: agent_id(),
                stream,
                ..Default::default()
            },
        )
        .expect("a valid NATS sink")
    }

    /// How many of `ids` the stream holds (by `Nats-Msg-Id`, each message counted).
    fn counter(
        &self,
    ) -> impl Fn(Vec<String>) -> Pin<Box<dyn Future<Output = usize> + Send>> + Sync {
        let js = self.js.clone();
        let name = self.name.clone();
        move |ids| {
            let js = js.clone();
            let name = name.clone();
            Box::pin(async move {
                let wanted: BTreeSet<String> = ids.into_iter().collect();
                let stream = js.get_stream(&name).await.expect("the test stream");
                let state = stream.get_info().await.expect("stream info").state;
                let mut n = 0;
                if state.messages == 0 {
                    return 0;
                }
                for seq in state.first_sequence..=state.last_sequence {
                    let message = stream.get_raw_message(seq).await.expect("a stored message");
                    let id = message
                        .headers
                        .get("Nats-Msg-Id")
                        .map(|v| v.as_str().to_owned());
                    if id.is_some_and(|id| wanted.contains(&id)) {
                        n += 1;
                    }
                }
                n
            })
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime to delete the test stream");
            runtime.block_on(async move {
                if let Ok(client) = async_nats::connect(NATS_URL).await {
                    let _ = jetstream::new(client).delete_stream(&name).await;
                }
            });
        })
        .join();
    }
}

#[tokio::test]
async fn conformance_batch_lands_once_and_resend_changes_nothing() {
    let scratch = Scratch::new().await;
    scratch.create(0).await;
    let sink = scratch.sink(NATS_URL, None);
    let count = scratch.counter();
    let count: Count<'_> = &count;
    common::assert_batch_lands_once_and_resend_changes_nothing(&sink, count, "patient").await;
}

#[tokio::test]
async fn conformance_a_message_over_the_streams_max_msg_size_is_dead_alone() {
    let scratch = Scratch::new().await;
    scratch.create(2_048).await;
    let sink = scratch.sink(NATS_URL, None);
    let count = scratch.counter();
    let bad = delivery(
        "create",
        "patient",
        Some("big"),
        &format!(r#"{{"notes":"{}"}}"#, "x".repeat(4_000)),
    );
    let reason =
        common::assert_only_the_refused_record_is_dead(&sink, &count, "patient", bad).await;
    assert!(reason.summary.contains("max_msg_size"), "{reason:?}");
}

#[tokio::test]
async fn conformance_a_message_over_the_servers_max_payload_is_dead_alone() {
    let scratch = Scratch::new().await;
    scratch.create(0).await;
    let sink = scratch.sink(NATS_URL, None);
    let count = scratch.counter();
    let max_payload = scratch.js.client().server_info().max_payload;
    let bad = delivery(
        "create",
        "patient",
        Some("huge"),
        &format!(r#"{{"notes":"{}"}}"#, "x".repeat(max_payload)),
    );
    let reason =
        common::assert_only_the_refused_record_is_dead(&sink, &count, "patient", bad).await;
    assert!(reason.summary.contains("max_payload"), "{reason:?}");
}

#[tokio::test]
async fn conformance_unreachable_server_retries_everything_without_showing_secrets() {
    let scratch = Scratch::new().await;
    let url = format!("nats://estafeta:Pa55w0rd-x@127.0.0.1:{}", closed_port());
    let sink = scratch.sink(&url, None);
    let error = common::assert_unreachable_sink_retries_everything(&sink, &["Pa55w0rd-x"]).await;
    assert!(
        error.contains("cannot connect to nats://estafeta:***@127.0.0.1:"),
        "{error}"
    );
    let probe = sink.probe().await.expect_err("nothing listens there");
    assert!(!format!("{probe:#}").contains("Pa55w0rd-x"), "{probe:#}");
}

#[tokio::test]
async fn a_missing_stream_is_retried_and_create_stream_makes_it() {
    let scratch = Scratch::new().await;
    let sink = scratch.sink(NATS_URL, None);
    let batch = vec![delivery("create", "patient", Some("1"), "{}")];
    let outcomes = sink.deliver(&batch).await;
    assert!(
        matches!(&outcomes[..], [Outcome::Retry { error, .. }] if error.contains("no JetStream stream captures")),
        "{outcomes:?}"
    );

    let sink = scratch.sink(
        NATS_URL,
        Some(StreamSettings {
            name: scratch.name.clone(),
            subjects: vec![format!("{}.*.*", scratch.prefix)],
            retention: Retention::Limits,
            replicas: 1,
            duplicate_window: Some(Duration::from_secs(600)),
        }),
    );
    sink.probe().await.expect("the probe creates the stream");
    let config = scratch
        .js
        .get_stream(&scratch.name)
        .await
        .expect("the stream exists")
        .get_info()
        .await
        .expect("stream info")
        .config;
    assert_eq!(config.duplicate_window, Duration::from_secs(600));
    assert_eq!(config.subjects, vec![format!("{}.*.*", scratch.prefix)]);
    assert_eq!(sink.deliver(&batch).await, vec![Outcome::Delivered]);
}
