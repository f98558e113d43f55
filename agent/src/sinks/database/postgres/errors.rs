//! How the PostgreSQL sink sorts an error: a refused row's data (dead), a resend meeting the
//! unique idempotency key (the exactly-once path), or anything else (retry the batch), each
//! worded by SQLSTATE and the objects involved, never with the values PostgreSQL quotes.

use crate::redact::Secrets;
use crate::sinks::database::LANDING_TABLE;
use crate::sinks::database::landing::Failure;
use crate::sinks::{Refusal, error_chain};

/// The landing table's unique constraint on the idempotency key (sql/postgres/0001_landing.sql).
const IDEMPOTENCY_CONSTRAINT: &str = "estafeta_records_idempotency_key";

/// Whether `err` is a row already in the landing table under the same idempotency key (a
/// resend after a crash or an expired lease): 23505 on the landing table's unique constraint on
/// `idempotency_key` (a DBA who made that table by hand may have named it
/// `…_idempotency_key_key`). Any other unique violation is a refusal of the row's data.
pub(super) fn is_resend(err: &tokio_postgres::Error) -> bool {
    err.as_db_error().is_some_and(|db| {
        db.code().code() == "23505"
            && db.table() == Some(LANDING_TABLE)
            && db
                .constraint()
                .is_some_and(|c| c.starts_with(IDEMPOTENCY_CONSTRAINT))
    })
}

/// Sorts an error (module documentation of [`super`]) and words it without the password: a
/// refused row by its SQLSTATE and the objects involved, with PostgreSQL's message and detail
/// (which quote the row's values) kept for the dead letter only.
pub(super) fn classify(secrets: &Secrets, err: tokio_postgres::Error) -> Failure {
    let Some(db) = err.as_db_error() else {
        return Failure::Transient(secrets.scrub(&error_chain(&err)));
    };
    let code = db.code().code();
    let mut summary = format!("PostgreSQL {code}");
    if let Some(name) = sqlstate_name(code) {
        summary.push(' ');
        summary.push_str(name);
    }
    let objects: Vec<String> = [
        ("table", db.table()),
        ("column", db.column()),
        ("constraint", db.constraint()),
    ]
    .into_iter()
    .filter_map(|(what, name)| name.map(|name| format!("{what} {name}")))
    .collect();
    if !objects.is_empty() {
        summary.push_str(&format!(" ({})", objects.join(", ")));
    }
    if ROW_CLASSES.iter().any(|class| code.starts_with(class)) {
        let mut answer = db.message().to_owned();
        if let Some(detail) = db.detail() {
            answer.push_str(" (");
            answer.push_str(detail);
            answer.push(')');
        }
        return Failure::Row(Refusal::new(
            secrets.scrub(&summary),
            &secrets.scrub(&answer),
        ));
    }
    let text = if NAMING_CLASSES.iter().any(|class| code.starts_with(class)) {
        format!("{summary}: {}", db.message())
    } else {
        summary
    };
    Failure::Transient(secrets.scrub(&text))
}

/// SQLSTATE classes that mean "this row's data": 22 data exception, 23 integrity constraint,
/// 54 program limit (a value too long, a `\u0000` jsonb cannot hold).
const ROW_CLASSES: &[&str] = &["22", "23", "54"];

/// SQLSTATE classes whose messages name objects (tables, columns, roles, databases), never a
/// row's values, so they are shown: 08 connection, 0A not supported, 25 transaction state, 28
/// authorization, 3D catalog, 40 rollback (deadlock, serialization), 42 syntax or access rule
/// (a missing table or grant), 53 resources, 55 object state (locks), 57 operator intervention.
/// Other classes (such as P0, a trigger's `RAISE`) are shown by code only.
const NAMING_CLASSES: &[&str] = &["08", "0A", "25", "28", "3D", "40", "42", "53", "55", "57"];

/// A short name for the SQLSTATEs a delivery meets, or for their class.
fn sqlstate_name(code: &str) -> Option<&'static str> {
    let name = match code {
        "23505" => "unique violation",
        "23503" => "foreign key violation",
        "23502" => "not null violation",
        "23514" => "check violation",
        "23P01" => "exclusion violation",
        "22001" => "value too long",
        "22003" => "numeric value out of range",
        "22007" => "invalid datetime format",
        "22008" => "datetime field overflow",
        "22021" => "invalid byte sequence",
        "22P02" => "invalid text representation",
        "22P05" => "untranslatable character",
        "40001" => "serialization failure",
        "40P01" => "deadlock detected",
        "42501" => "insufficient privilege",
        "42703" => "undefined column",
        "42P01" => "undefined table",
        "53300" => "too many connections",
        "57014" => "query canceled",
        "57P01" => "admin shutdown",
        "P0001" => "raise exception",
        _ => match code.get(..2)? {
            "08" => "connection exception",
            "22" => "data exception",
            "23" => "integrity constraint violation",
            "28" => "invalid authorization",
            "40" => "transaction rollback",
            "42" => "syntax error or access rule violation",
            "53" => "insufficient resources",
            "54" => "program limit exceeded",
            "57" => "operator intervention",
            _ => return None,
        },
    };
    Some(name)
}
