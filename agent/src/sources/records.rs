//! Rows into records: one per row, or one per group, enriched (see `enrich`), nested or
//! grouped (see `mapping`) and passed through the one intake (routes and the entity's JSON
//! Schema, as for a record posted to the API). A row that cannot become a record is refused
//! alone, with its reason; the page's other rows are staged. Used by a cycle (`run_page`) and by
//! the replay of a refused row (`replay`), so both make the same record of the same row.

use std::collections::BTreeMap;

use estafeta_staging::NewRecord;
use serde_json::{Map, Value};

use super::enrich::Enriched;
use super::query::Row;
use super::{ActionFrom, SourceConfig, mapping};
use crate::intake::{Intake, KeyFrom};

/// A row as one JSON object of its columns, as named by the query (not nested: nesting may be
/// what failed).
pub(super) fn flat(row: &Row) -> Value {
    Value::Object(row.iter().cloned().collect())
}

/// What a column holds, by JSON type: an error names the type, never the value (a row's values
/// are patient data, and errors are logged and shown by `estafeta sources`).
pub(super) fn kind_of(value: Option<&Value>) -> &'static str {
    match value {
        None => "nothing (the query returns no such column)",
        Some(Value::Null) => "NULL",
        Some(Value::Bool(_)) => "a boolean",
        Some(Value::Number(_)) => "a number",
        Some(Value::String(_)) => "text",
        Some(Value::Array(_)) => "an array",
        Some(Value::Object(_)) => "an object",
    }
}

/// What a row (or a group of rows) became.
pub(super) enum Made {
    Record(NewRecord),
    /// It cannot become a record: a value that could not be read, an action that is none, a
    /// record its entity's JSON Schema refuses. It is set aside and the source moves on.
    Refused {
        reason: String,
        rows: Vec<Row>,
        /// The rows were read whole, so running them through the mapping again (after the
        /// mapping, a map file or the schema is fixed) can make their record: `estafeta retry
        /// --send`. Not so for a value that could not be read (it is NULL in the saved row).
        replayable: bool,
    },
}

/// Turns kept rows into records: one per row, or one per group, through the one intake (routes
/// and the entity's JSON Schema as for a record posted to the API). A row that cannot become a
/// record is refused alone; the page's other rows are staged. A mistake of the source's own
/// settings (a column alias that cannot nest) is an error of the page, since every row would
/// share it: nothing is staged and the error says what to fix.
pub(super) fn records_of(
    intake: &Intake,
    source: &SourceConfig,
    rows: &[Row],
    unreadable: &BTreeMap<usize, String>,
) -> anyhow::Result<Vec<Made>> {
    let groups: Vec<&[Row]> = match &source.group_by {
        Some(group_by) => mapping::runs(rows, group_by),
        None => rows.chunks(1).collect(),
    };
    let mut out = Vec::with_capacity(groups.len());
    let mut start = 0usize;
    for group in groups {
        let range = start..start + group.len();
        start += group.len();
        let refuse = |reason: String| Made::Refused {
            reason,
            rows: group.to_vec(),
            replayable: true,
        };
        if let Some(reason) = range.clone().find_map(|i| unreadable.get(&i)) {
            out.push(Made::Refused {
                reason: format!("{reason}; fix the value in the database (or cast it in {}), then `estafeta sources reset {} --to` the checkpoint before it to read it again", source.query_path.display(), source.name),
                rows: group.to_vec(),
                replayable: false,
            });
            continue;
        }
        let enriched;
        let group = match &source.enrich {
            None => group,
            Some(enrich) => match enrich.rows(group)? {
                Enriched::Rows(rows) => {
                    enriched = rows;
                    &enriched[..]
                }
                Enriched::Refused(reason) => {
                    out.push(refuse(format!(
                        "{reason}; fix it, then `estafeta retry --send` stages the row again"
                    )));
                    continue;
                }
            },
        };
        let first = &group[0];
        let payload: Map<String, Value> = match &source.group_by {
            Some(_) => mapping::group(group, &source.items),
            None => mapping::nest(first),
        }
        .map_err(|err| {
            anyhow::anyhow!(
                "{err}; fix the column aliases in {}",
                source.query_path.display()
            )
        })?;
        let action = match &source.action {
            ActionFrom::Fixed(action) => action.clone(),
            ActionFrom::Column(column) => match mapping::column(first, column) {
                Some(Value::String(action)) => action.to_ascii_lowercase(),
                other => {
                    out.push(refuse(format!(
                        "action_column {column:?} holds {}; expected create, update, upsert or delete",
                        kind_of(other)
                    )));
                    continue;
                }
            },
        };
        let key = match &source.key {
            Some(column) => match mapping::column(first, column) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(n)) => Some(n.to_string()),
                Some(Value::Null) | None => None,
                Some(other) => Some(other.to_string()),
            },
            None => None,
        };
        match intake.record(
            &action,
            &source.entity,
            &Value::Object(payload),
            &KeyFrom::Given(key),
        ) {
            Ok(record) => out.push(Made::Record(record)),
            Err(err) => out.push(refuse(format!(
                "{err}; fix [entities.{}].schema (then `estafeta retry --send` stages the row again) or the row in the database (then `estafeta sources reset {} --to` the checkpoint before it)",
                source.entity, source.name
            ))),
        }
    }
    Ok(out)
}
