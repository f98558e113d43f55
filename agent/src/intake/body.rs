//! Splitting an input into records: one JSON object, or a non-empty array of JSON objects, each
//! record kept byte for byte.

use serde_json::value::RawValue;

use super::error::{IntakeError, IntakeErrorKind};

/// How deep arrays and objects may nest in a body. serde_json reads a `Value` at most 128 levels
/// deep (its stack guard) but checks a `RawValue` without limit, so deeper bodies would pass the
/// syntax check and fail later; they are refused up front.
pub const MAX_JSON_DEPTH: usize = 128;

/// The records of a body, and whether it was an array (the HTTP answer differs).
pub struct Split<'b> {
    pub items: Vec<&'b RawValue>,
    pub is_array: bool,
}

/// Parses `bytes` as one object or an array of objects.
pub fn split(bytes: &[u8]) -> Result<Split<'_>, IntakeError> {
    let raw: &RawValue = serde_json::from_slice(bytes).map_err(|err| {
        invalid_json(format!(
            "the body is not valid JSON: {err}; send one JSON object or an array of JSON objects"
        ))
    })?;
    if json_depth(bytes) > MAX_JSON_DEPTH {
        return Err(invalid_json(format!(
            "the body is nested deeper than {MAX_JSON_DEPTH} levels of arrays and objects; send flatter records"
        )));
    }
    split_raw(raw)
}

/// One object, or an array of at least one object.
pub(crate) fn split_raw(raw: &RawValue) -> Result<Split<'_>, IntakeError> {
    match raw.get().trim_start().as_bytes().first() {
        Some(b'{') => Ok(Split {
            items: vec![raw],
            is_array: false,
        }),
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(raw.get())
                .map_err(|err| invalid_json(format!("the array could not be read: {err}")))?;
            if items.is_empty() {
                return Err(invalid_body(
                    "the array is empty; send at least one JSON object",
                ));
            }
            if let Some((index, item)) = items
                .iter()
                .enumerate()
                .find(|(_, item)| !item.get().trim_start().starts_with('{'))
            {
                return Err(invalid_body(format!(
                    "element {index} of the array is {}, not a JSON object; every element must be an object",
                    json_kind(item.get())
                )));
            }
            Ok(Split {
                items,
                is_array: true,
            })
        }
        _ => Err(invalid_body(format!(
            "the body is {}; send one JSON object or an array of JSON objects",
            json_kind(raw.get())
        ))),
    }
}

fn invalid_json(message: impl Into<String>) -> IntakeError {
    IntakeError::new(IntakeErrorKind::InvalidJson, message)
}

fn invalid_body(message: impl Into<String>) -> IntakeError {
    IntakeError::new(IntakeErrorKind::InvalidBody, message)
}

/// The deepest nesting of arrays and objects in `bytes` (syntactically valid JSON), counted
/// without recursion; brackets inside strings do not count.
pub(crate) fn json_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Names the kind of a JSON text, never echoing its content (it may be patient data).
fn json_kind(text: &str) -> &'static str {
    match text.trim_start().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}
