//! Record templates: a short text with `{placeholders}` filled from one record, for the key a
//! sink hands the server in place of the record's id: the HTTP sink's `Idempotency-Key` and
//! the database sinks' landing key (`idempotency_key`, TOML and `CENTRAL_*_IDEMPOTENCY_KEY`).
//!
//! Why: the record id is new each time a record is staged, so when the same business fact is
//! staged twice (a source rewound with `estafeta sources reset`, a file dropped again) the
//! server sees two requests. A template such as `sol-{payload.CodSolicitacao}` gives both the
//! same key, the one the old Bemsoft monitor sent, and the server (or the landing table's
//! unique key) takes the second as a resend. Two records whose template gives the same text are
//! one to the server: put a version field in the template (`{payload.id}-{payload.updated_at}`)
//! when every change must land.
//!
//! Placeholders: `{id}` `{key}` `{entity}` `{action}` `{seq}` and `{payload.FIELD}` (a dotted
//! path into the JSON payload: `{payload.paciente.cpf}`). A template is checked when the
//! configuration loads, so a typo fails at start; a record the template cannot be filled for
//! (no such field, a null, an object) becomes a dead letter whose reason names the field.

use std::fmt;

use estafeta_staging::Envelope;
use serde_json::Value;

/// Placeholders other than `{payload.…}`.
const NAMES: &[&str] = &["id", "key", "entity", "action", "seq"];

/// Longest text a template may give: it travels as a header and a unique column.
pub const MAX_RENDERED: usize = 255;

#[derive(Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Id,
    Key,
    Entity,
    Action,
    Seq,
    /// A path into the payload, one name per level.
    Payload(Vec<String>),
}

/// A checked template; see the module documentation.
#[derive(Clone, PartialEq, Eq)]
pub struct RecordTemplate {
    source: String,
    parts: Vec<Part>,
}

impl fmt::Debug for RecordTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.source)
    }
}

impl fmt::Display for RecordTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl RecordTemplate {
    /// Parses `source`; the error says what is wrong and what is allowed.
    pub fn parse(source: &str) -> Result<Self, String> {
        let allowed = || {
            let mut names: Vec<String> = NAMES.iter().map(|n| format!("{{{n}}}")).collect();
            names.push("{payload.FIELD}".into());
            names.join(", ")
        };
        if source.trim().is_empty() {
            return Err(format!(
                "the template is empty; use placeholders such as {}",
                allowed()
            ));
        }
        let mut parts = Vec::new();
        let mut rest = source;
        while let Some(open) = rest.find(['{', '}']) {
            if rest.as_bytes()[open] == b'}' {
                return Err(format!("template {source:?} has a '}}' without its '{{'"));
            }
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("template {source:?} has an unclosed '{{'"))?;
            let name = &after[..close];
            parts.push(match name {
                "id" => Part::Id,
                "key" => Part::Key,
                "entity" => Part::Entity,
                "action" => Part::Action,
                "seq" => Part::Seq,
                _ => match name.strip_prefix("payload.") {
                    Some(path)
                        if path
                            .split('.')
                            .all(|p| !p.is_empty() && !p.contains(['{', ' '])) =>
                    {
                        Part::Payload(path.split('.').map(str::to_owned).collect())
                    }
                    _ => {
                        return Err(format!(
                            "template {source:?} uses {{{name}}}; the placeholders are {}",
                            allowed()
                        ));
                    }
                },
            });
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Self {
            source: source.to_owned(),
            parts,
        })
    }

    /// Whether the template reads the payload (which then must be parsed for each record).
    fn reads_payload(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Payload(_)))
    }

    /// The text for `envelope`, or why it cannot be made (this becomes the record's dead-letter
    /// reason, so it names the field and never quotes payload values).
    pub fn render(&self, envelope: &Envelope) -> Result<String, String> {
        let payload: Option<Value> = if self.reads_payload() {
            Some(serde_json::from_str(envelope.payload.get()).map_err(|e| {
                format!("the payload is not JSON the template {self} can read: {e}")
            })?)
        } else {
            None
        };
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Id => out.push_str(&envelope.id),
                Part::Entity => out.push_str(&envelope.entity),
                Part::Action => out.push_str(&envelope.action),
                Part::Seq => out.push_str(&envelope.seq.to_string()),
                Part::Key => out.push_str(envelope.key.as_deref().ok_or_else(|| {
                    format!("the template {self} needs {{key}} but the record has no key")
                })?),
                Part::Payload(path) => {
                    let mut value = payload.as_ref().expect("parsed above");
                    for name in path {
                        value = value.get(name).unwrap_or(&Value::Null);
                    }
                    let shown = path.join(".");
                    match value {
                        Value::String(s) if !s.is_empty() => out.push_str(s),
                        Value::Number(n) => out.push_str(&n.to_string()),
                        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                        Value::Null => {
                            return Err(format!(
                                "the template {self} needs payload field {shown:?}, which this record does not have (or is null); fix the record or the template, then requeue it"
                            ));
                        }
                        Value::String(_) => {
                            return Err(format!(
                                "the template {self} needs payload field {shown:?}, which is empty in this record"
                            ));
                        }
                        Value::Array(_) | Value::Object(_) => {
                            return Err(format!(
                                "the template {self} needs payload field {shown:?} to be a string, number or boolean, not an array or object"
                            ));
                        }
                    }
                }
            }
        }
        if out.len() > MAX_RENDERED {
            return Err(format!(
                "the template {self} gives {} bytes for this record; at most {MAX_RENDERED} fit a key",
                out.len()
            ));
        }
        if out.chars().any(char::is_control) {
            return Err(format!(
                "the template {self} gives a key with control characters for this record"
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(payload: &str, key: Option<&str>) -> Envelope {
        serde_json::from_value(serde_json::json!({
            "v": 1,
            "seq": 7,
            "id": "0190-abc",
            "action": "create",
            "entity": "solicitacao",
            "key": key,
            "staged_at": "2026-12-06T10:00:00Z",
            "sinks": ["api"],
            "payload": serde_json::from_str::<Value>(payload).unwrap(),
        }))
        .unwrap()
    }

    #[test]
    fn fills_fields_of_the_record_and_its_payload() {
        let t = RecordTemplate::parse("sol-{payload.CodSolicitacao}-{entity}-{seq}").unwrap();
        let e = envelope(r#"{"CodSolicitacao": 4711}"#, None);
        assert_eq!(t.render(&e).unwrap(), "sol-4711-solicitacao-7");
        let t = RecordTemplate::parse("{payload.paciente.cpf}/{key}/{action}/{id}").unwrap();
        let e = envelope(r#"{"paciente": {"cpf": "123"}}"#, Some("k1"));
        assert_eq!(t.render(&e).unwrap(), "123/k1/create/0190-abc");
    }

    #[test]
    fn a_typo_fails_at_parse_time_with_the_allowed_names() {
        let err = RecordTemplate::parse("sol-{payload_CodSolicitacao}").unwrap_err();
        assert!(err.contains("{payload.FIELD}"), "{err}");
        assert!(
            RecordTemplate::parse("sol-{id")
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(
            RecordTemplate::parse("sol-id}")
                .unwrap_err()
                .contains("without")
        );
        assert!(RecordTemplate::parse("{payload.}").is_err());
        assert!(RecordTemplate::parse(" ").is_err());
    }

    #[test]
    fn a_record_without_the_field_is_refused_with_the_field_named_and_no_value() {
        let t = RecordTemplate::parse("sol-{payload.CodSolicitacao}").unwrap();
        let err = t
            .render(&envelope(r#"{"Outro": "segredo"}"#, None))
            .unwrap_err();
        assert!(err.contains("\"CodSolicitacao\""), "{err}");
        assert!(!err.contains("segredo"), "{err}");
        assert!(
            t.render(&envelope(r#"{"CodSolicitacao": {"a": 1}}"#, None))
                .is_err()
        );
        assert!(
            t.render(&envelope(r#"{"CodSolicitacao": ""}"#, None))
                .is_err()
        );
        let t = RecordTemplate::parse("{key}").unwrap();
        assert!(
            t.render(&envelope("{}", None))
                .unwrap_err()
                .contains("no key")
        );
    }
}
