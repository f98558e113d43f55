//! Shared helpers of the sink tests: records built by hand, and the conformance suite every sink
//! passes (VEC `assert_sink_compliance`): a batch lands once, a resend changes nothing, a
//! refused record is dead alone, an unreachable sink retries everything.
//!
//! Tests share the real servers and the fixed landing table, so each record gets a fresh
//! UUIDv7 id and rows are counted `WHERE idempotency_key IN (…)`.
// Each test binary uses part of this module.
#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use estafeta::sinks::{Outcome, Refusal, Sink};
use estafeta_staging::{Delivery, Envelope, FORMAT_VERSION};
use serde_json::value::RawValue;

/// How a test counts what landed: the number of the given ids the destination holds.
pub type Count<'a> =
    &'a (dyn Fn(Vec<String>) -> Pin<Box<dyn Future<Output = usize> + Send>> + Sync);

static SEQ: AtomicU64 = AtomicU64::new(1);

/// A leased record with a fresh id and sequence number.
pub fn delivery(action: &str, entity: &str, key: Option<&str>, payload: &str) -> Delivery {
    Delivery {
        envelope: Envelope {
            v: FORMAT_VERSION,
            id: uuid::Uuid::now_v7().to_string(),
            seq: SEQ.fetch_add(1, Ordering::Relaxed),
            action: action.to_owned(),
            entity: entity.to_owned(),
            key: key.map(str::to_owned),
            staged_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            client_key: None,
            client_fingerprint: None,
            client_records: None,
            sinks: vec!["test".to_owned()],
            source: None,
            payload: RawValue::from_string(payload.to_owned()).expect("test payloads are JSON"),
        },
        sink: "test".to_owned(),
        attempts: 0,
        path: PathBuf::new(),
    }
}

/// A unique agent id, so rows of one test are told apart.
pub fn agent_id() -> String {
    format!("test-{}", uuid::Uuid::now_v7())
}

/// A port on 127.0.0.1 nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("a local address").port()
}

pub fn ids(batch: &[Delivery]) -> Vec<String> {
    batch.iter().map(|d| d.envelope.id.clone()).collect()
}

/// A varied batch of good records: several actions, keys with odd characters, no key.
pub fn good_batch(entity: &str) -> Vec<Delivery> {
    let key = uuid::Uuid::now_v7().to_string();
    vec![
        delivery(
            "create",
            entity,
            Some(&format!("{key}-1")),
            r#"{"nome":"Ana","idade":41}"#,
        ),
        delivery(
            "update",
            entity,
            Some(&format!("{key}/2 ç")),
            r#"{"nome":"Bia"}"#,
        ),
        delivery(
            "upsert",
            entity,
            Some(&format!("{key}-3")),
            r#"[1,2,{"x":null}]"#,
        ),
        delivery("delete", entity, Some(&format!("{key}-4")), r#"{}"#),
        delivery("create", entity, None, r#"{"evento":"login","ok":true}"#),
    ]
}

/// A batch lands once, and the same batch sent again changes nothing and is still delivered.
pub async fn assert_batch_lands_once_and_resend_changes_nothing(
    sink: &dyn Sink,
    count: Count<'_>,
    entity: &str,
) {
    let batch = good_batch(entity);
    let first = sink.deliver(&batch).await;
    assert_eq!(
        first,
        vec![Outcome::Delivered; batch.len()],
        "first delivery"
    );
    assert_eq!(
        count(ids(&batch)).await,
        batch.len(),
        "every record landed once"
    );

    let again = sink.deliver(&batch).await;
    assert_eq!(
        again,
        vec![Outcome::Delivered; batch.len()],
        "a resend is not an error"
    );
    assert_eq!(
        count(ids(&batch)).await,
        batch.len(),
        "a resend adds nothing"
    );

    assert!(
        sink.deliver(&[]).await.is_empty(),
        "an empty batch has no outcomes"
    );
}

/// In a batch of good records around `bad`, only `bad` is dead, the others land; resending
/// gives the same answers. The refusal's summary (what is logged and shown) quotes neither the
/// record's key nor its payload.
pub async fn assert_only_the_refused_record_is_dead(
    sink: &dyn Sink,
    count: Count<'_>,
    entity: &str,
    bad: Delivery,
) -> Refusal {
    let mut batch = good_batch(entity);
    batch.insert(2, bad);
    let outcomes = sink.deliver(&batch).await;
    assert_eq!(outcomes.len(), batch.len());
    let reason = match &outcomes[2] {
        Outcome::Dead { reason } => reason.clone(),
        other => panic!("the refused record should be dead, got {other:?}"),
    };
    let bad = &batch[2].envelope;
    if let Some(key) = bad.key.as_deref().filter(|k| k.len() >= 4) {
        assert!(
            !reason.summary.contains(key),
            "the summary shows the key: {reason:?}"
        );
    }
    let payload = bad.payload.get();
    assert!(
        payload.len() < 8 || !reason.summary.contains(payload),
        "the summary shows the payload: {reason:?}"
    );
    for (i, outcome) in outcomes.iter().enumerate().filter(|(i, _)| *i != 2) {
        assert_eq!(
            *outcome,
            Outcome::Delivered,
            "record {i} should be delivered"
        );
    }
    let good: Vec<String> = ids(&batch)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, id)| id)
        .collect();
    assert_eq!(
        count(good.clone()).await,
        good.len(),
        "the good records landed"
    );
    assert_eq!(
        count(vec![batch[2].envelope.id.clone()]).await,
        0,
        "the refused record did not land"
    );

    let again = sink.deliver(&batch).await;
    assert_eq!(again, outcomes, "a resend is sorted the same way");
    assert_eq!(
        count(good.clone()).await,
        good.len(),
        "a resend adds nothing"
    );
    reason
}

/// Every record of a batch sent to an unreachable sink is retried; errors hide `secrets`.
pub async fn assert_unreachable_sink_retries_everything(
    sink: &dyn Sink,
    secrets: &[&str],
) -> String {
    let batch = good_batch("patient");
    let outcomes = sink.deliver(&batch).await;
    assert_eq!(outcomes.len(), batch.len());
    let mut first_error = None;
    for outcome in outcomes {
        match outcome {
            Outcome::Retry { error, .. } => {
                for secret in secrets {
                    assert!(
                        !error.contains(secret),
                        "the error {error:?} shows a secret"
                    );
                }
                first_error.get_or_insert(error);
            }
            other => panic!("an unreachable sink should retry, got {other:?}"),
        }
    }
    let error = first_error.expect("the batch is not empty");
    assert!(!error.is_empty());
    error
}
