//! The one intake: every way a record enters estafeta goes through here to become records —
//! an HTTP body (`ingest::handlers`), `estafeta stage`, a file adopted from the staging tree or
//! the inbox (the staging crate asks [`Intake::admit`] through its adoption hook), and a SQL
//! source row (`sources`). Here, and only here: the body split into records (one JSON object or
//! a non-empty array of objects), the action and entity names, the key (`key_field` of the
//! entity unless the caller gives one), the sinks (`[[routes]]`) and the entity's JSON Schema.
//! One error type, [`IntakeError`]; each path turns it into its own answer.

mod body;
mod error;
pub mod rules;

use std::collections::HashMap;

use anyhow::Context;
use estafeta_staging::{Admission, NewRecord, StageError, validate_name};
use serde_json::Value;
use serde_json::value::RawValue;

pub use body::{MAX_JSON_DEPTH, Split, split};
pub use error::{IntakeError, IntakeErrorKind};
pub use rules::Rules;

/// Where a record's key comes from.
#[derive(Debug, Clone)]
pub enum KeyFrom {
    /// The caller's own key: the `X-Record-Key` header, `estafeta stage --key`, a source's
    /// `key` column (`None`: the record has no key).
    Given(Option<String>),
    /// The payload's field named by the entity's `key_field` (default `id`), when it holds a
    /// string or a number.
    KeyField,
}

/// The records of one input, ready to stage, and whether the input was an array.
pub struct Records {
    pub records: Vec<NewRecord>,
    pub is_array: bool,
}

/// The configuration the intake reads, with every entity's JSON Schema compiled once.
pub struct Intake {
    rules: Rules,
    /// One compiled validator per entity that has a schema.
    validators: HashMap<String, jsonschema::Validator>,
}

impl Intake {
    /// Compiles every entity's JSON Schema; fails naming the entity whose schema is invalid.
    pub fn new(rules: Rules) -> anyhow::Result<Self> {
        let mut validators = HashMap::new();
        for (entity, settings) in &rules.entities {
            if let Some(schema) = &settings.schema {
                let validator = jsonschema::validator_for(schema)
                    .map_err(|err| anyhow::anyhow!("{}", err.masked()))
                    .with_context(|| {
                        format!("the JSON Schema of entity {entity:?} is not valid; fix [entities.{entity}].schema")
                    })?;
                validators.insert(entity.clone(), validator);
            }
        }
        Ok(Self { rules, validators })
    }

    /// The action and entity must be names from `a-z`, `0-9`, `_` and `-`.
    pub fn check_names(action: &str, entity: &str) -> Result<(), IntakeError> {
        for (what, name) in [("action", action), ("entity", entity)] {
            validate_name(what, name).map_err(|err| {
                let message = match err {
                    StageError::Invalid(message) => message,
                    other => other.to_string(),
                };
                IntakeError::new(IntakeErrorKind::InvalidName, message)
            })?;
        }
        Ok(())
    }

    /// Turns a body (one JSON object or a non-empty array of objects) into records of
    /// `action`/`entity`, each checked against the entity's schema, keyed and routed.
    /// All or nothing: the first refused record refuses the whole body.
    pub fn records(
        &self,
        action: &str,
        entity: &str,
        body: &[u8],
        key: &KeyFrom,
    ) -> Result<Records, IntakeError> {
        Self::check_names(action, entity)?;
        let Split { items, is_array } = split(body)?;
        let mut records = Vec::with_capacity(items.len());
        for (index, item) in items.into_iter().enumerate() {
            // A payload is parsed only when something must be read from it.
            let needs_value =
                self.validators.contains_key(entity) || matches!(key, KeyFrom::KeyField);
            let value: Option<Value> = if needs_value {
                Some(serde_json::from_str(item.get()).map_err(|err| {
                    IntakeError::new(
                        IntakeErrorKind::InvalidJson,
                        format!("record {index} could not be read as JSON: {err}"),
                    )
                })?)
            } else {
                None
            };
            let admission = self.admission(
                action,
                entity,
                value.as_ref(),
                key,
                is_array.then_some(index),
            )?;
            records.push(NewRecord {
                action: action.to_owned(),
                entity: entity.to_owned(),
                key: admission.key,
                payload: RawValue::to_owned(item),
                sinks: admission.sinks,
            });
        }
        Ok(Records { records, is_array })
    }

    /// One record made elsewhere (a SQL source's row or group): checked against the entity's
    /// schema, keyed and routed. `payload` is the text of `value`.
    pub fn record(
        &self,
        action: &str,
        entity: &str,
        value: &Value,
        key: &KeyFrom,
    ) -> Result<NewRecord, IntakeError> {
        Self::check_names(action, entity)?;
        let admission = self.admission(action, entity, Some(value), key, None)?;
        let payload = serde_json::value::to_raw_value(value).map_err(|err| {
            IntakeError::new(
                IntakeErrorKind::InvalidJson,
                format!("the record could not be written as JSON: {err}"),
            )
        })?;
        Ok(NewRecord {
            action: action.to_owned(),
            entity: entity.to_owned(),
            key: admission.key,
            payload,
            sinks: admission.sinks,
        })
    }

    /// The staging crate's adoption hook: a file's record, keyed by `key_field`, checked and
    /// routed like the same record posted to the API.
    pub fn admit(&self, action: &str, entity: &str, value: &Value) -> Result<Admission, String> {
        self.admission(action, entity, Some(value), &KeyFrom::KeyField, None)
            .map_err(|err| err.message)
    }

    /// The schema check, then the key and the sinks. `index` names the record of an array.
    fn admission(
        &self,
        action: &str,
        entity: &str,
        value: Option<&Value>,
        key: &KeyFrom,
        index: Option<usize>,
    ) -> Result<Admission, IntakeError> {
        if let (Some(validator), Some(value)) = (self.validators.get(entity), value)
            && let Some(error) = validator.iter_errors(value).next()
        {
            return Err(schema_violation(entity, index, &error));
        }
        let key = match key {
            KeyFrom::Given(key) => key.clone(),
            KeyFrom::KeyField => value.and_then(|value| key_of(value, self.key_field(entity))),
        };
        let sinks = self.rules.route(action, entity);
        Ok(Admission {
            key,
            sinks: (!sinks.is_empty()).then_some(sinks),
        })
    }

    fn key_field(&self, entity: &str) -> &str {
        self.rules.key_field(entity)
    }
}

/// The record key from the payload's key field, when it is a string or a number.
pub fn key_of(value: &Value, key_field: &str) -> Option<String> {
    match value.get(key_field)? {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// Names where the record breaks which rule, never the value itself (`masked`): payloads may
/// be patient data, and this message is logged and written beside files set aside.
fn schema_violation(
    entity: &str,
    index: Option<usize>,
    error: &jsonschema::ValidationError<'_>,
) -> IntakeError {
    let pointer = error.instance_path.as_str();
    let at = if pointer.is_empty() {
        "the record itself".to_owned()
    } else {
        format!("{pointer:?}")
    };
    let schema_path = error.schema_path.as_str();
    let rule = schema_path.rsplit('/').next().unwrap_or(schema_path);
    let record = match index {
        Some(index) => format!("record {index}"),
        None => "the record".to_owned(),
    };
    IntakeError::new(
        IntakeErrorKind::SchemaViolation,
        format!(
            "{record} does not match the schema of entity {entity:?}: the value at {at} breaks the rule {rule:?} (schema path {schema_path:?}): {}; fix the payload",
            error.masked()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_depth_counts_brackets_outside_strings() {
        use body::json_depth;
        assert_eq!(json_depth(br#"{"a": 1}"#), 1);
        assert_eq!(json_depth(br#"[{"a": [1, {"b": {}}]}]"#), 5);
        assert_eq!(json_depth(br#"{"a": "[[[{{{\"]]]"}"#), 1);
        assert_eq!(json_depth(b"1"), 0);
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(json_depth(deep.as_bytes()), 100_000);
    }

    #[test]
    fn split_accepts_objects_and_arrays_of_objects_only() {
        assert!(matches!(split(br#"{"a":1}"#), Ok(s) if s.items.len() == 1 && !s.is_array));
        assert!(
            matches!(split(br#" [ {"a":1}, {} ] "#), Ok(s) if s.items.len() == 2 && s.is_array)
        );
        for bad in [
            "[]",
            "[1]",
            r#"[{}, "x"]"#,
            "3",
            "null",
            r#""text""#,
            "true",
        ] {
            let err = split(bad.as_bytes()).err().expect(bad);
            assert_eq!(err.kind, IntakeErrorKind::InvalidBody, "{bad}");
        }
        for not_json in ["{", "", "   "] {
            let err = split(not_json.as_bytes()).err().expect(not_json);
            assert_eq!(err.kind, IntakeErrorKind::InvalidJson, "{not_json:?}");
        }
    }

    #[test]
    fn key_of_takes_strings_and_numbers_only() {
        let value = serde_json::json!({"id": 42, "name": "x", "obj": {}});
        assert_eq!(key_of(&value, "id").as_deref(), Some("42"));
        assert_eq!(key_of(&value, "name").as_deref(), Some("x"));
        assert_eq!(key_of(&value, "obj"), None);
        assert_eq!(key_of(&value, "missing"), None);
    }
}
