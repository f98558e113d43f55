//! One JetStream message as the relay reads it: the body the NATS sink published (the record's
//! envelope and payload, see [`crate::sinks::nats`]) turned back into the [`Delivery`] the
//! database sink takes, with the agent that staged it.

use std::path::PathBuf;

use estafeta_staging::{Delivery, Envelope};
use serde::Deserialize;
use serde_json::value::RawValue;

/// The body of a message, as the NATS sink writes it.
#[derive(Deserialize)]
struct Body {
    id: String,
    seq: u64,
    agent_id: String,
    action: String,
    entity: String,
    key: Option<String>,
    staged_at: String,
    payload: Box<RawValue>,
}

/// A message read as a record.
pub(super) struct Record {
    /// The agent that staged it (its rows carry this id).
    pub agent_id: String,
    pub delivery: Delivery,
}

/// Reads a message body; `Err` says why it is not an Estafeta record (without quoting it).
pub(super) fn parse(payload: &[u8], sink: &str) -> Result<Record, String> {
    let body: Body = serde_json::from_slice(payload).map_err(|err| {
        format!(
            "the message is not an Estafeta record (expected the JSON the nats sink publishes: id, seq, agent_id, action, entity, key, staged_at, payload): {} at line {} column {}",
            classify(&err),
            err.line(),
            err.column()
        )
    })?;
    let envelope = Envelope {
        v: 1,
        id: body.id,
        seq: body.seq,
        action: body.action,
        entity: body.entity,
        key: body.key,
        staged_at: body.staged_at,
        client_key: None,
        client_fingerprint: None,
        client_records: None,
        sinks: vec![sink.to_owned()],
        source: None,
        payload: body.payload,
    };
    Ok(Record {
        agent_id: body.agent_id,
        delivery: Delivery {
            envelope,
            sink: sink.to_owned(),
            attempts: 0,
            path: PathBuf::new(),
        },
    })
}

/// serde_json's error class, without the text (which may quote the payload).
fn classify(err: &serde_json::Error) -> &'static str {
    match err.classify() {
        serde_json::error::Category::Io => "a read error",
        serde_json::error::Category::Syntax => "not valid JSON",
        serde_json::error::Category::Data => "a missing or mistyped field",
        serde_json::error::Category::Eof => "cut short",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_body_becomes_the_delivery_it_came_from() {
        let body = br#"{"id":"0190a0a0-0000-7000-8000-000000000001","seq":7,"agent_id":"ws-07","action":"create","entity":"patient","key":"42","staged_at":"2024-06-01T12:00:00.000000Z","payload":{"id":"42","n":1.50}}"#;
        let record = parse(body, "database").expect("a record");
        assert_eq!(record.agent_id, "ws-07");
        let e = &record.delivery.envelope;
        assert_eq!(
            (e.seq, e.action.as_str(), e.key.as_deref()),
            (7, "create", Some("42"))
        );
        // The payload's text as published (1.50 stays 1.50).
        assert_eq!(e.payload.get(), r#"{"id":"42","n":1.50}"#);
        assert_eq!(record.delivery.sink, "database");
    }

    #[test]
    fn a_foreign_message_is_refused_without_quoting_it() {
        let err = parse(br#"{"name":"Ana Secret"}"#, "database")
            .err()
            .expect("refused");
        assert!(err.contains("missing or mistyped field"), "{err}");
        assert!(!err.contains("Ana"), "{err}");
        assert!(parse(b"not json", "database").is_err());
    }
}
