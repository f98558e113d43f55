//! Rows into payloads: a dotted column alias (`patient.name`) nests, and rows that share a
//! `group_by` value become one payload whose `<items>.`-prefixed columns form an array (one
//! exam request with its items). Also where a page is cut: after debounce and at the end of a
//! full page, so that a record is never made from a half-written group.

use serde_json::{Map, Value};

use super::query::Row;

/// A column's value in a row, by name.
pub fn column<'r>(row: &'r Row, name: &str) -> Option<&'r Value> {
    row.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

/// Puts `value` at the dotted `path` in `object`; an error if a part is already a plain value.
fn insert_path(object: &mut Map<String, Value>, path: &str, value: Value) -> Result<(), String> {
    let mut parts = path.split('.').peekable();
    let mut here = object;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            if here.contains_key(part) {
                return Err(format!("column {path:?} appears twice"));
            }
            here.insert(part.to_owned(), value);
            return Ok(());
        }
        let next = here
            .entry(part.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        here = next.as_object_mut().ok_or_else(|| {
            format!("column {path:?} nests under {part:?}, which is also a column of its own")
        })?;
    }
    Ok(())
}

/// One row as a JSON object, dotted names nested.
pub fn nest(row: &Row) -> Result<Map<String, Value>, String> {
    let mut object = Map::new();
    for (name, value) in row {
        insert_path(&mut object, name, value.clone())?;
    }
    Ok(object)
}

/// Rows sharing the `group_by` value (they must come one after another) as one object:
/// columns named `<items>.x` go, per row, into the `items` array; the others are taken once,
/// from the group's first row.
pub fn group(rows: &[Row], items: &str) -> Result<Map<String, Value>, String> {
    let prefix = format!("{items}.");
    let first = rows.first().ok_or("an empty group")?;
    let common: Row = first
        .iter()
        .filter(|(name, _)| !name.starts_with(&prefix))
        .cloned()
        .collect();
    let mut object = nest(&common)?;
    let mut array = Vec::with_capacity(rows.len());
    for row in rows {
        let item: Row = row
            .iter()
            .filter_map(|(name, value)| {
                name.strip_prefix(&prefix)
                    .map(|rest| (rest.to_owned(), value.clone()))
            })
            .collect();
        array.push(Value::Object(nest(&item)?));
    }
    if object.contains_key(items) {
        return Err(format!(
            "a column is named {items:?}, the name of the grouped rows' array; rename it or set `items`"
        ));
    }
    object.insert(items.to_owned(), Value::Array(array));
    Ok(object)
}

/// Splits rows into runs of equal `group_by` value, in order.
pub fn runs<'r>(rows: &'r [Row], group_by: &str) -> Vec<&'r [Row]> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=rows.len() {
        if i == rows.len() || column(&rows[i], group_by) != column(&rows[start], group_by) {
            if start < i {
                out.push(&rows[start..i]);
            }
            start = i;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(pairs: &[(&str, Value)]) -> Row {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn dotted_aliases_nest_and_types_are_kept() {
        let r = row(&[
            ("id", json!(7)),
            ("patient.name", json!("João")),
            ("patient.cpf", json!("123")),
            ("price", json!("12.50")),
            ("active", json!(true)),
            ("note", Value::Null),
        ]);
        assert_eq!(
            Value::Object(nest(&r).unwrap()),
            json!({"id": 7, "patient": {"name": "João", "cpf": "123"}, "price": "12.50", "active": true, "note": null})
        );
        let clash = row(&[("a", json!(1)), ("a.b", json!(2))]);
        assert!(nest(&clash).unwrap_err().contains("a.b"));
    }

    #[test]
    fn a_group_keeps_common_fields_once_and_items_in_an_array() {
        let rows = vec![
            row(&[
                ("request", json!(10)),
                ("patient.name", json!("Conceição")),
                ("items.exam", json!("HMG")),
            ]),
            row(&[
                ("request", json!(10)),
                ("patient.name", json!("Conceição")),
                ("items.exam", json!("GLI")),
            ]),
            row(&[
                ("request", json!(11)),
                ("patient.name", json!("Ana")),
                ("items.exam", json!("TSH")),
            ]),
        ];
        let groups = runs(&rows, "request");
        assert_eq!(groups.len(), 2);
        assert_eq!(
            Value::Object(group(groups[0], "items").unwrap()),
            json!({"request": 10, "patient": {"name": "Conceição"}, "items": [{"exam": "HMG"}, {"exam": "GLI"}]})
        );
        assert_eq!(groups[1].len(), 1);
    }
}
