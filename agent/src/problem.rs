//! A configuration mistake, as every part that checks configuration reports it: the key as the
//! user wrote it, the value as it may be shown, and what was expected. At the bottom of the
//! module graph, so sources and sinks can report mistakes without depending on `config`.

use std::fmt;

/// One configuration mistake: the key (as the user wrote it), the value (redacted when
/// secret) and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `CRONTAB`, `[agent] crontab`, `sinks[1].url`, `--env-file`, …
    pub key: String,
    /// The value as shown to people: secrets are `***`, URL passwords hidden.
    pub value: Option<String>,
    /// What was expected, or what to do.
    pub expected: String,
    /// `expected` continues a sentence (`KEY=value listens beyond …`) instead of following a
    /// colon.
    sentence: bool,
}

impl Problem {
    /// `KEY=value: expected`.
    pub fn new(key: impl Into<String>, value: Option<String>, expected: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value,
            expected: expected.into(),
            sentence: false,
        }
    }

    /// `KEY=value sentence`.
    pub fn sentence(key: impl Into<String>, value: String, rest: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: Some(value),
            expected: rest.into(),
            sentence: true,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.value, self.sentence) {
            (Some(value), true) => write!(f, "{}={} {}", self.key, quote(value), self.expected),
            (Some(value), false) => write!(f, "{}={}: {}", self.key, quote(value), self.expected),
            (None, _) => write!(f, "{}: {}", self.key, self.expected),
        }
    }
}

/// Quotes a value when it would be hard to read bare (spaces, quotes, empty).
fn quote(value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '"' && c != '\'');
    if plain {
        value.to_owned()
    } else {
        format!("{value:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_quote_values_with_spaces() {
        let p = Problem::new("CRONTAB", Some("*/5 * *".into()), "expected 5");
        assert_eq!(p.to_string(), "CRONTAB=\"*/5 * *\": expected 5");
        let p = Problem::sentence("INGEST_ADDR", "0.0.0.0:8787".into(), "listens");
        assert_eq!(p.to_string(), "INGEST_ADDR=0.0.0.0:8787 listens");
    }
}
