//! Records as callers hand them in and as the store hands them back: the envelope that is
//! written, one JSON line per record, into the segment files.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::path::PathBuf;

use crate::error::StageError;

/// Version of the envelope format written to segment files. Bumped only with a migration.
pub const FORMAT_VERSION: u32 = 1;

/// Longest action or entity name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Longest record key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 512;

/// A write handed to the store.
#[derive(Debug, Clone)]
pub struct NewRecord {
    /// What happened: `create`, `update`, `delete`, `upsert` or any name in `[a-z0-9_-]`.
    pub action: String,
    /// What it happened to: `patient`, `attendance`, …
    pub entity: String,
    /// The entity's key; records sharing (entity, key) are delivered in sequence order.
    /// Records without a key are ordered per entity.
    pub key: Option<String>,
    /// The payload, stored byte for byte except for whitespace between JSON tokens.
    pub payload: Box<RawValue>,
    /// Sinks this record goes to; `None` means every sink the store was opened with.
    pub sinks: Option<Vec<String>>,
}

impl NewRecord {
    /// A record routed to every sink, parsing `payload` from JSON text.
    pub fn new(
        action: impl Into<String>,
        entity: impl Into<String>,
        key: Option<String>,
        payload: &str,
    ) -> Result<Self, StageError> {
        let payload = RawValue::from_string(payload.to_owned())
            .map_err(|err| StageError::Invalid(format!("the payload is not valid JSON: {err}")))?;
        Ok(Self {
            action: action.into(),
            entity: entity.into(),
            key,
            payload,
            sinks: None,
        })
    }
}

/// A client's idempotency key for one stage call (HTTP `Idempotency-Key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKey {
    /// The key the client chose.
    pub key: String,
    /// A digest of the request body: the same key with another body is a conflict.
    pub fingerprint: String,
}

/// What the store answers once a record is durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub id: String,
    pub seq: u64,
    /// The segment file that holds the record.
    pub path: PathBuf,
}

/// The answer to a stage call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Staged {
    /// The records were written now.
    New(Vec<Receipt>),
    /// The client key was seen before with the same body: the first answer, nothing written.
    Replayed(Vec<Receipt>),
}

impl Staged {
    pub fn receipts(&self) -> &[Receipt] {
        match self {
            Staged::New(r) | Staged::Replayed(r) => r,
        }
    }
}

/// One record as it sits on disk: one line of a segment file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// Format version ([`FORMAT_VERSION`]).
    pub v: u32,
    /// UUIDv7, unique and sortable; also the idempotency key sinks send.
    pub id: String,
    /// Strictly increasing over the whole store.
    pub seq: u64,
    pub action: String,
    pub entity: String,
    pub key: Option<String>,
    /// RFC 3339, UTC, microseconds.
    pub staged_at: String,
    /// The client's `Idempotency-Key`, when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<String>,
    /// Digest of the client's request body, with `client_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_fingerprint: Option<String>,
    /// With `client_key`: how many records the request staged in all. A rebuild of the index
    /// that finds fewer knows the request was cut by a crash before it was answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_records: Option<u32>,
    /// Sinks this record is routed to.
    pub sinks: Vec<String>,
    /// On the last record a source stages in one commit: the source's checkpoint after it.
    /// It lives in the segment, beside the records it produced, so that the index's copy can
    /// be rebuilt with them after a crash: a row is then never read twice nor skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceMark>,
    pub payload: Box<RawValue>,
}

/// A source's checkpoint, carried by the last record it staged (see [`Envelope::source`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceMark {
    /// The source's name.
    pub name: String,
    /// The checkpoint as JSON text: the last row's value of the checkpoint column(s).
    pub checkpoint: String,
}

/// Delivery state of a record for one sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for its turn or its next attempt.
    Pending,
    /// Leased to a deliverer.
    InFlight,
    /// Confirmed by the sink.
    Delivered,
    /// Failed permanently; its dead letter is under `_failed/`.
    Dead,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::InFlight => "in_flight",
            State::Delivered => "delivered",
            State::Dead => "dead",
        }
    }

    pub(crate) fn from_db(s: &str) -> State {
        match s {
            "in_flight" => State::InFlight,
            "delivered" => State::Delivered,
            "dead" => State::Dead,
            _ => State::Pending,
        }
    }
}

/// A record leased to a deliverer by [`crate::Staging::next_batch`].
#[derive(Debug, Clone)]
pub struct Delivery {
    pub envelope: Envelope,
    pub sink: String,
    /// Attempts made before this one.
    pub attempts: u32,
    /// The segment file that holds the record.
    pub path: PathBuf,
}

/// Checks an action or entity name: `[a-z0-9_-]{1,64}`, not starting with `_`
/// (names starting with `_` are the store's own folders, such as `_failed`).
pub fn validate_name(what: &str, name: &str) -> Result<(), StageError> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_chars {
        return Err(StageError::Invalid(format!(
            "{what} name {name:?} is not allowed: use 1 to {MAX_NAME_LEN} characters from a-z, 0-9, '_' and '-'"
        )));
    }
    if name.starts_with('_') {
        return Err(StageError::Invalid(format!(
            "{what} name {name:?} is not allowed: names starting with '_' are reserved for the store's own folders"
        )));
    }
    Ok(())
}

/// The payload without the whitespace between its JSON tokens, so that it fits on one line of a
/// segment file; `None` when it has none, the usual case (spaces inside strings are content).
/// Everything else (key order, number spelling, string escapes) stays byte for byte.
///
/// Every record passes here on its stager's thread. Telling layout from content needs the
/// string boundaries, so strings, most of a record's bytes, are skipped with `memchr` to their
/// next quote or backslash, and nothing is copied unless something is removed: a record that
/// was compacted here whenever it had a space anywhere cost 13–17 % of a staging run's CPU
/// (BENCHMARKS.md).
pub fn compact_json(json: &str) -> Option<String> {
    let bytes = json.as_bytes();
    let mut out: Option<Vec<u8>> = None;
    // Bytes from `kept` to `i` are to be kept; copied into `out` when something is removed.
    let mut kept = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                // To the closing quote, past escaped characters.
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', bytes.get(i..).unwrap_or_default()) {
                        Some(at) if bytes[i + at] == b'\\' => i += at + 2,
                        Some(at) => {
                            i += at + 1;
                            break;
                        }
                        // Unterminated: the caller's JSON was checked, so this cannot happen;
                        // keep the rest as it is.
                        None => {
                            i = bytes.len();
                            break;
                        }
                    }
                }
            }
            b' ' | b'\t' | b'\n' | b'\r' => {
                let o = out.get_or_insert_with(|| Vec::with_capacity(bytes.len()));
                o.extend_from_slice(&bytes[kept..i]);
                i += 1;
                kept = i;
            }
            _ => i += 1,
        }
    }
    let mut out = out?;
    out.extend_from_slice(&bytes[kept.min(bytes.len())..]);
    Some(String::from_utf8(out).expect("only ASCII whitespace between tokens was removed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_json_keeps_strings_numbers_and_order() {
        let input = "{\n  \"b\" : \"a b\\\" c\",\n  \"a\": [1.50, 2e3 ,true]\n}";
        assert_eq!(
            compact_json(input).as_deref(),
            Some(r#"{"b":"a b\" c","a":[1.50,2e3,true]}"#)
        );
        // An escaped backslash ends right before the closing quote; the spaces after are layout.
        assert_eq!(
            compact_json(r#"{"p":"C:\\" , "q":"\\\"" }"#).as_deref(),
            Some(r#"{"p":"C:\\","q":"\\\""}"#)
        );
        assert_eq!(compact_json(" [ ] ").as_deref(), Some("[]"));
    }

    proptest::proptest! {
        /// Any JSON, laid out pretty or compact, comes out as serde_json's compact text: the
        /// same tokens, nothing inside strings touched.
        #[test]
        fn compact_json_removes_layout_and_only_layout(value in json_value()) {
            let compact = serde_json::to_string(&value).unwrap();
            let pretty = serde_json::to_string_pretty(&value).unwrap();
            let from_pretty = compact_json(&pretty).unwrap_or(pretty.clone());
            proptest::prop_assert_eq!(&from_pretty, &compact);
            proptest::prop_assert_eq!(compact_json(&compact), None);
        }
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        // Strings with the characters that matter: spaces, tabs and newlines (escaped by
        // serde_json), quotes, backslashes, and text outside ASCII.
        let text = "[ a\\t\\n\"\\\\ç😀]{0,12}";
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            text.prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                proptest::collection::vec((text, inner), 0..6)
                    .prop_map(|kv| { serde_json::Value::Object(kv.into_iter().collect()) }),
            ]
        })
    }

    #[test]
    fn compact_json_leaves_compact_payloads_alone() {
        for compact in [
            r#"{"nome":"Maria da Silva","obs":"em jejum\t\n de 12 h","n":[1,2.50]}"#,
            r#"{"s":"ação \"entre aspas\" e \\ barra"}"#,
            r#""só um texto com espaços""#,
            "{}",
        ] {
            assert_eq!(compact_json(compact), None, "{compact}");
        }
    }

    #[test]
    fn names_outside_the_alphabet_are_refused() {
        for bad in [
            "",
            "..",
            "a/b",
            "Patient",
            "_failed",
            "a%2e",
            "paciente\0",
            "ação",
        ] {
            assert!(validate_name("entity", bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_name("entity", "patient_v2-x").is_ok());
        assert!(validate_name("entity", &"a".repeat(65)).is_err());
    }
}
