//! Body templates of HTTP routes: for APIs that take something other than the record's JSON
//! (HL7 v2 messages, XML/SOAP envelopes: the systems seed 004 feeds), a route names a template
//! file (`body_template`) in Jinja syntax (the `minijinja` crate), filled per record with
//! `record` (`id`, `seq`, `action`, `entity`, `key`, `staged_at`) and `payload` (the JSON).
//!
//! - Undefined values are errors, not empty text: a record without a field its template needs
//!   becomes a dead letter whose reason names the template and line, never a message with a
//!   hole in it.
//! - Escaping follows the file's extension, as minijinja does by default: `.xml` and `.html`
//!   escape `<`, `&` and quotes, `.json` writes values as JSON, anything else (`.hl7`, `.txt`)
//!   writes values as they are; the `hl7` filter escapes HL7 v2's delimiters (`| ^ ~ \ &`) in
//!   a value (`{{ payload.nome | hl7 }}`). A null value writes nothing (not "none").
//! - `.hl7` templates are written one segment per line, as people read them: the line breaks
//!   of the template become HL7's segment terminator (`\r`), and a line break inside a value is
//!   always escaped (`\X0A\`), so no value can start a segment of its own.
//! - The file is read and compiled when the configuration loads, so a syntax error fails
//!   `check-config` and the start, naming the file and line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::lookups::Lookups;

use estafeta_staging::Envelope;
use minijinja::value::Value as TemplateValue;
use minijinja::{
    AutoEscape, Environment, Error, ErrorKind, Output, State, UndefinedBehavior, context,
};
use serde_json::Value;

/// A compiled body template and the `Content-Type` its requests carry.
pub struct BodyTemplate {
    env: Environment<'static>,
    name: String,
    /// An HL7 v2 template: line breaks become segment terminators.
    hl7: bool,
    pub path: PathBuf,
    pub content_type: String,
}

impl std::fmt::Debug for BodyTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BodyTemplate({})", self.path.display())
    }
}

/// The `Content-Type` a template's extension implies, when the route names none.
fn content_type_for(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("xml") => "application/xml; charset=utf-8",
        Some("json") => "application/json",
        Some("hl7") => "x-application/hl7-v2+er7; charset=utf-8",
        Some("html" | "htm") => "text/html; charset=utf-8",
        _ => "text/plain; charset=utf-8",
    }
}

/// HL7 v2 escape sequences for a value placed in a field: the delimiters of the default
/// encoding characters (`|^~\&`) and line breaks, which would otherwise end the segment.
fn hl7_escape(value: String) -> String {
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\E\\"),
            '|' => out.push_str("\\F\\"),
            '^' => out.push_str("\\S\\"),
            '&' => out.push_str("\\T\\"),
            '~' => out.push_str("\\R\\"),
            '\r' => out.push_str("\\X0D\\"),
            '\n' => out.push_str("\\X0A\\"),
            c => out.push(c),
        }
    }
    out
}

/// Writes one value into the body: nothing for a null, line breaks escaped in an HL7
/// template, otherwise minijinja's escaping for the template's extension.
fn write_value(
    out: &mut Output,
    state: &State,
    value: &TemplateValue,
    hl7: bool,
) -> Result<(), Error> {
    if value.is_none() {
        return Ok(());
    }
    let written = if hl7 && state.auto_escape() == AutoEscape::None {
        let text = value.to_string();
        out.write_str(&text.replace('\r', "\\X0D\\").replace('\n', "\\X0A\\"))
    } else {
        return minijinja::escape_formatter(out, state, value);
    };
    written.map_err(|e| Error::new(ErrorKind::WriteFailure, e.to_string()))
}

impl BodyTemplate {
    /// Reads and compiles the template at `path`; `content_type` overrides the one its
    /// extension implies. The error names the file (and line, for a syntax error).
    pub fn load(
        path: &Path,
        content_type: Option<&str>,
        lookups: &Arc<Lookups>,
    ) -> Result<Self, String> {
        let source = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read the body template {}: {e}; check the path (relative to the TOML file)",
                path.display()
            )
        })?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "body".into());
        let hl7 = path.extension().is_some_and(|e| e == "hl7");
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.add_filter("hl7", hl7_escape);
        lookups.register(&mut env);
        env.set_formatter(move |out, state, value| write_value(out, state, value, hl7));
        env.add_template_owned(name.clone(), source).map_err(|e| {
            format!(
                "the body template {} does not compile: {e:#}",
                path.display()
            )
        })?;
        Ok(Self {
            env,
            name,
            hl7,
            path: path.to_path_buf(),
            content_type: content_type
                .map(str::to_owned)
                .unwrap_or_else(|| content_type_for(path).to_owned()),
        })
    }

    /// The body for one record, or why it cannot be made (a dead letter's reason: it names
    /// the template and line, never a payload value).
    pub fn render(&self, envelope: &Envelope) -> Result<String, String> {
        let payload: Value = serde_json::from_str(envelope.payload.get())
            .map_err(|e| format!("the payload is not JSON: {e}"))?;
        let record = context! {
            id => &envelope.id,
            seq => envelope.seq,
            action => &envelope.action,
            entity => &envelope.entity,
            key => &envelope.key,
            staged_at => &envelope.staged_at,
        };
        self.env
            .get_template(&self.name)
            .and_then(|t| t.render(context! { record, payload }))
            .map(|body| {
                if self.hl7 {
                    body.replace("\r\n", "\r").replace('\n', "\r")
                } else {
                    body
                }
            })
            .map_err(|e| {
                // A lookup's own message (a code without a mapping) names the code and the file;
                // other errors say only their kind, never a value of the record.
                let what = match (e.kind(), e.detail()) {
                    (ErrorKind::InvalidOperation, Some(detail)) => detail.to_owned(),
                    (kind, _) => kind.to_string(),
                };
                format!(
                    "the body template {} cannot be filled for this record: {}{}; fix the record or the template, then requeue it",
                    self.path.display(),
                    what,
                    e.line()
                        .map(|l| format!(" (line {l})"))
                        .unwrap_or_default()
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(payload: &str) -> Envelope {
        serde_json::from_value(serde_json::json!({
            "v": 1, "seq": 9, "id": "0190-x", "action": "create", "entity": "exame",
            "key": "sol-1", "staged_at": "2026-12-06T10:00:00Z", "sinks": ["api"],
            "payload": serde_json::from_str::<Value>(payload).unwrap(),
        }))
        .unwrap()
    }

    fn template(name: &str, text: &str) -> (tempfile::TempDir, Result<BodyTemplate, String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let t = BodyTemplate::load(&path, None, &Arc::default());
        (dir, t)
    }

    #[test]
    fn hl7_fields_are_escaped_and_xml_is_escaped_by_extension() {
        let (_d, t) = template(
            "oru.hl7",
            "MSH|^~\\&|ESTAFETA|{{ record.seq }}\rPID|||{{ payload.prontuario }}||{{ payload.nome | hl7 }}",
        );
        let body = t
            .unwrap()
            .render(&envelope(r#"{"prontuario": 42, "nome": "Ana|Maria^B"}"#));
        assert_eq!(
            body.unwrap(),
            "MSH|^~\\&|ESTAFETA|9\rPID|||42||Ana\\F\\Maria\\S\\B"
        );
        // One segment per line in the file; a line break in a value cannot end a segment, and
        // a null writes nothing.
        let (_d, t) = template(
            "adt.hl7",
            "MSH|^~\\&\nPID|||{{ payload.obs }}|{{ payload.nulo }}|\n",
        );
        let body = t
            .unwrap()
            .render(&envelope(r#"{"obs": "a\nOBX|evil", "nulo": null}"#));
        assert_eq!(body.unwrap(), "MSH|^~\\&\rPID|||a\\X0A\\OBX|evil||");
        let (_d, t) = template("soap.xml", "<nome>{{ payload.nome }}</nome>");
        let t = t.unwrap();
        assert_eq!(t.content_type, "application/xml; charset=utf-8");
        assert_eq!(
            t.render(&envelope(r#"{"nome": "Ana & <João>"}"#)).unwrap(),
            "<nome>Ana &amp; &lt;João&gt;</nome>"
        );
    }

    #[test]
    fn a_missing_field_is_an_error_naming_the_line_and_a_syntax_error_fails_the_load() {
        let (_d, t) = template("a.txt", "x\n{{ payload.falta }}");
        let err = t
            .unwrap()
            .render(&envelope(r#"{"nome": "segredo"}"#))
            .unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(!err.contains("segredo"), "{err}");
        let (_d, t) = template("b.txt", "{{ payload.nome ");
        assert!(t.unwrap_err().contains("does not compile"));
    }
}
