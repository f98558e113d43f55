//! Runs of a key through the JetStream sink, against the real NATS at 127.0.0.1:4222 (a missing
//! server fails the test; `scripts/start-services` starts it). Each test has a stream of its own,
//! deleted at the end: a batch of runs lands in per-key seq order; a record too large for the
//! stream or the server is dead without being sent and holds back the rest of its key only;
//! the size the sink checks is the size the server measures; a raised limit is seen.

use std::collections::HashMap;

use super::*;
use crate::sinks::test_delivery;

const NATS_URL: &str = "nats://127.0.0.1:4222";

/// A stream capturing `<prefix>.>`, only this test's; deleted when dropped.
struct Scratch {
    name: String,
    prefix: String,
    js: jetstream::Context,
}

impl Scratch {
    async fn create(max_message_size: i32) -> Scratch {
        let client = ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(NATS_URL)
            .await
            .unwrap_or_else(|e| {
                panic!("NATS is missing: cannot connect to {NATS_URL} ({e}); run scripts/start-services")
            });
        let unique = uuid::Uuid::now_v7().simple().to_string();
        let scratch = Scratch {
            name: format!("RUNTEST_{unique}"),
            prefix: format!("runtest_{unique}"),
            js: jetstream::new(client),
        };
        scratch
            .js
            .create_stream(jetstream::stream::Config {
                name: scratch.name.clone(),
                subjects: vec![format!("{}.>", scratch.prefix)],
                max_message_size,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("creating the stream {}: {e}", scratch.name));
        scratch
    }

    fn sink(&self) -> NatsSink {
        NatsSink::new(
            "nats",
            NatsSinkConfig {
                url: NATS_URL.to_owned(),
                token: None,
                subject: format!("{}.{{entity}}.{{action}}", self.prefix),
                timeout: Duration::from_secs(3),
                agent_id: "run-test".to_owned(),
                stream: None,
                ..Default::default()
            },
        )
        .expect("a valid NATS sink")
    }

    /// The stored messages' bodies, in stream order.
    async fn bodies(&self) -> Vec<serde_json::Value> {
        let stream = self.js.get_stream(&self.name).await.expect("the stream");
        let state = stream.get_info().await.expect("stream info").state;
        if state.messages == 0 {
            return Vec::new();
        }
        let mut bodies = Vec::new();
        for seq in state.first_sequence..=state.last_sequence {
            let message = stream.get_raw_message(seq).await.expect("a stored message");
            bodies.push(serde_json::from_slice(&message.payload).expect("a JSON body"));
        }
        bodies
    }

    /// The record ids stored, in stream order.
    async fn ids(&self) -> Vec<String> {
        self.bodies()
            .await
            .iter()
            .map(|b| b["id"].as_str().expect("an id").to_owned())
            .collect()
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

/// A record whose payload is `{"p":"xxx…"}` with `pad` x's.
fn padded(seq: u64, key: &str, pad: usize) -> Delivery {
    let payload = format!(r#"{{"p":"{}"}}"#, "x".repeat(pad));
    test_delivery(seq, "update", "patient", Some(key), &payload)
}

fn kind(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Delivered => "delivered",
        Outcome::Retry { .. } => "retry",
        Outcome::Dead { .. } => "dead",
        Outcome::Skipped => "skipped",
    }
}

#[tokio::test]
async fn a_batch_of_runs_over_several_keys_lands_in_per_key_seq_order() {
    let scratch = Scratch::create(0).await;
    let sink = scratch.sink();
    // Six keys (one of them the keyless audit records) × 8 records, interleaved as staged.
    let mut batch = Vec::new();
    for _ in 0..8 {
        for key in ["a", "b", "c", "d", "e", ""] {
            let seq = batch.len() as u64 + 1;
            batch.push(if key.is_empty() {
                test_delivery(seq, "create", "audit", None, "{}")
            } else {
                test_delivery(seq, "update", "patient", Some(key), "{}")
            });
        }
    }
    let outcomes = sink.deliver(&batch).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; batch.len()]);

    let bodies = scratch.bodies().await;
    assert_eq!(bodies.len(), batch.len(), "one message per record");
    let mut last: HashMap<(String, String), u64> = HashMap::new();
    for body in &bodies {
        let key = (body["entity"].to_string(), body["key"].to_string());
        let seq = body["seq"].as_u64().expect("a seq");
        if let Some(before) = last.insert(key.clone(), seq) {
            assert!(before < seq, "{key:?}: seq {seq} stored after {before}");
        }
    }
    assert_eq!(last.len(), 6);
}

#[tokio::test]
async fn a_record_over_the_streams_max_msg_size_is_dead_unsent_and_holds_back_its_key() {
    let scratch = Scratch::create(1_024).await;
    let sink = scratch.sink();
    let batch = vec![
        padded(1, "a", 10),
        padded(2, "b", 10),
        padded(3, "a", 2_000),
        padded(4, "b", 10),
        padded(5, "a", 10),
        padded(6, "b", 10),
    ];
    let outcomes = sink.deliver(&batch).await;
    let kinds: Vec<_> = outcomes.iter().map(kind).collect();
    assert_eq!(
        kinds,
        [
            "delivered",
            "delivered",
            "dead",
            "delivered",
            "skipped",
            "delivered"
        ]
    );
    let Outcome::Dead { reason } = &outcomes[2] else {
        unreachable!("checked above")
    };
    assert!(
        reason.summary.contains("max_msg_size") && reason.summary.contains("not sent"),
        "{reason:?}"
    );
    assert_eq!(
        scratch.ids().await,
        ["id-1", "id-2", "id-4", "id-6"],
        "the record after the dead one was not published"
    );
}

#[tokio::test]
async fn a_record_over_the_servers_max_payload_is_dead_unsent_and_holds_back_its_key() {
    let scratch = Scratch::create(0).await;
    let sink = scratch.sink();
    let max_payload = scratch.js.client().server_info().max_payload;
    let batch = vec![
        padded(1, "a", 10),
        padded(2, "a", max_payload),
        padded(3, "b", 10),
        padded(4, "a", 10),
    ];
    let outcomes = sink.deliver(&batch).await;
    let kinds: Vec<_> = outcomes.iter().map(kind).collect();
    assert_eq!(kinds, ["delivered", "dead", "delivered", "skipped"]);
    assert!(
        matches!(&outcomes[1], Outcome::Dead { reason } if reason.summary.contains("max_payload")),
        "{outcomes:?}"
    );
    assert_eq!(scratch.ids().await, ["id-1", "id-3"]);
}

#[tokio::test]
async fn the_size_checked_is_the_size_the_server_measures() {
    const MAX: usize = 1_000;
    let scratch = Scratch::create(MAX as i32).await;
    let sink = scratch.sink();
    let (_, base) = sink
        .message(&padded(1, "a", 0).envelope)
        .expect("a message");
    let fits = padded(1, "a", MAX - base);
    let over = padded(2, "b", MAX - base + 1);
    assert_eq!(sink.message(&fits.envelope).expect("a message").1, MAX);

    // One byte over is refused by the sink, unsent; exactly the limit is stored.
    let outcomes = sink.deliver(&[fits, over.clone()]).await;
    assert_eq!(kind(&outcomes[0]), "delivered", "{outcomes:?}");
    assert!(
        matches!(&outcomes[1], Outcome::Dead { reason } if reason.summary.contains("not sent")),
        "{outcomes:?}"
    );
    // The server refuses that same message too: the sink did not refuse one it would store.
    let (message, size) = sink.message(&over.envelope).expect("a message");
    assert_eq!(size, MAX + 1);
    let connection = sink.connection().await.expect("connected");
    let subject = sink.subject_for(&over.envelope);
    let ack = connection
        .js
        .send_publish(subject, message)
        .await
        .expect("handed to the connection")
        .await;
    let err = ack.expect_err("the server refuses one byte over max_msg_size");
    let code = std::error::Error::source(&err)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .map(jetstream::Error::error_code);
    assert_eq!(
        code,
        Some(ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM),
        "{err}"
    );
    assert_eq!(scratch.ids().await, ["id-1"]);
}

#[tokio::test]
async fn a_raised_max_msg_size_is_seen_before_a_record_is_refused() {
    let scratch = Scratch::create(1_024).await;
    let sink = scratch.sink();
    assert_eq!(
        sink.deliver(&[padded(1, "a", 10)]).await,
        [Outcome::Delivered]
    );
    // The sink has kept 1,024 for this subject; the stream now takes 8 KiB.
    let mut config = scratch
        .js
        .get_stream(&scratch.name)
        .await
        .expect("the stream")
        .get_info()
        .await
        .expect("stream info")
        .config;
    config.max_message_size = 8_192;
    scratch
        .js
        .update_stream(config)
        .await
        .expect("raising max_msg_size");
    assert_eq!(
        sink.deliver(&[padded(2, "a", 4_000)]).await,
        [Outcome::Delivered]
    );
    assert_eq!(scratch.ids().await, ["id-1", "id-2"]);
}
