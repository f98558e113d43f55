//! The intake's one error type: what was wrong with an input, as a sentence that says what to
//! fix, and its kind, from which each intake path makes its own answer (the HTTP API its status
//! and code, `estafeta stage` a usage error, adoption the reason beside a file set aside, a SQL
//! source the error of its cycle).

/// What kind of input was refused; the HTTP API maps each to its status and code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntakeErrorKind {
    /// The action or the entity is not a valid name (HTTP 400 `invalid_name`).
    InvalidName,
    /// The input is not JSON, or nests too deep (HTTP 400 `invalid_json`).
    InvalidJson,
    /// The input is JSON but not one object or a non-empty array of objects (HTTP 400
    /// `invalid_body`).
    InvalidBody,
    /// A record breaks its entity's JSON Schema (HTTP 422 `schema_violation`).
    SchemaViolation,
}

/// One refused input. The message never echoes a payload's values (they may be patient data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct IntakeError {
    pub kind: IntakeErrorKind,
    /// A sentence for a person: what is wrong and what to fix.
    pub message: String,
}

impl IntakeError {
    pub(crate) fn new(kind: IntakeErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}
