//! Enrichment: the step seed 003's monitor ran between reading a row and building its payload
//! (mapping exam codes through `tests_map.json`, finding the specimen in the API's cached
//! `GET /tests`), as columns added to each row before it is nested or grouped.
//!
//! ```toml
//! maps = { exames = "tests_map.json" }
//! catalogs = { tests = { url = "https://api/tests", key = "supportTestId", token_env = "API_TOKEN" } }
//! enrich = { "items.supportTestId" = "{{ map('exames', row['items.exame']) }}" }
//! ```
//!
//! - Each `enrich` entry is a minijinja template evaluated per row, with `row` the row's
//!   columns as the query names them. A value that is one `{{ expression }}` keeps its type (a
//!   number, an object from a catalog); any other template gives text. Its result is a column
//!   of the row under the entry's name, so a dotted name nests and, with `group_by`, an
//!   `items.`-prefixed name goes into each item.
//! - `map` and `catalog` are the lookups body templates use ([`crate::lookups`], one
//!   implementation). A code with no mapping sets the row aside with a reason naming the code
//!   and the file; the source moves on. A mistake of the settings (a column the query does not
//!   return, a map name not configured) is the page's error: every row would share it.
//! - Catalogs are fetched before the page's query runs ([`Enrich::refresh`]); one that cannot be
//!   fetched (and has no earlier copy) fails the cycle like an unreachable database: nothing is
//!   staged, the checkpoint stays, and the cycle runs again.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use minijinja::{Environment, ErrorKind, UndefinedBehavior, Value as TemplateValue, context};
use serde_json::{Map, Value};

use super::query::Row;
use crate::lookups::{self, Lookups};

/// How long fetching a source's catalog may take.
const CATALOG_TIMEOUT: Duration = Duration::from_secs(30);

/// How one entry is evaluated.
#[derive(Debug)]
enum Form {
    /// One `{{ expression }}`: its value, typed.
    Expression(String),
    /// A template with text: its rendering, a string (the template's name in `env`).
    Text,
}

/// A source's enrichment step, checked at load.
pub struct Enrich {
    env: Environment<'static>,
    /// (column name, form), in the order they are written.
    fields: Vec<(String, Form)>,
    pub lookups: Arc<Lookups>,
    client: OnceLock<Result<reqwest::Client, String>>,
}

impl std::fmt::Debug for Enrich {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrich")
            .field(
                "fields",
                &self.fields.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("lookups", &self.lookups)
            .finish()
    }
}

/// What enriching a row (or a group) came to.
#[derive(Debug)]
pub enum Enriched {
    Rows(Vec<Row>),
    /// The rows' own data cannot be enriched (a code with no mapping): why, to set them aside.
    Refused(String),
}

/// The `{{ … }}` inside `text` when `text` is exactly one expression.
fn lone_expression(text: &str) -> Option<&str> {
    let inner = text.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    (!inner.contains("{{") && !inner.contains("}}")).then_some(inner.trim())
}

impl Enrich {
    /// Compiles every entry; an error names the entry and what is wrong with it.
    pub fn new(
        entries: &BTreeMap<String, String>,
        lookups: Lookups,
    ) -> Result<Self, Vec<(String, String)>> {
        let lookups = Arc::new(lookups);
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        lookups.register(&mut env);
        let mut fields = Vec::new();
        let mut problems = Vec::new();
        for (name, text) in entries {
            if name.is_empty() || name.split('.').any(str::is_empty) {
                problems.push((
                    name.clone(),
                    "expected a column name (dots nest: patient.code)".to_owned(),
                ));
                continue;
            }
            let form = match lone_expression(text) {
                Some(expr) => match env.compile_expression(expr) {
                    Ok(_) => Form::Expression(expr.to_owned()),
                    Err(e) => {
                        problems.push((
                            name.clone(),
                            format!("the expression does not compile: {e:#}"),
                        ));
                        continue;
                    }
                },
                None => match env.add_template_owned(name.clone(), text.clone()) {
                    Ok(()) => Form::Text,
                    Err(e) => {
                        problems.push((
                            name.clone(),
                            format!("the template does not compile: {e:#}"),
                        ));
                        continue;
                    }
                },
            };
            fields.push((name.clone(), form));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Self {
            env,
            fields,
            lookups,
            client: OnceLock::new(),
        })
    }

    /// One phrase for `check-config`: the columns added and the maps and catalogs they read.
    pub fn describe(&self) -> String {
        let names =
            |it: &mut dyn Iterator<Item = &String>| it.cloned().collect::<Vec<_>>().join(" ");
        let mut text = names(&mut self.fields.iter().map(|(n, _)| n));
        if !self.lookups.maps.is_empty() {
            text.push_str(&format!(" (maps {})", names(&mut self.lookups.maps.keys())));
        }
        if !self.lookups.catalogs.is_empty() {
            text.push_str(&format!(
                " (catalogs {})",
                names(&mut self.lookups.catalogs.keys())
            ));
        }
        text
    }

    /// Fetches the stale catalogs (`GET {url}` with `Authorization: Bearer <token_env>`).
    pub async fn refresh(&self, source: &str) -> anyhow::Result<()> {
        if self.lookups.catalogs.is_empty() {
            return Ok(());
        }
        let client = self
            .client
            .get_or_init(|| {
                reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .user_agent(format!("estafeta/{}", crate::version::current()))
                    .timeout(CATALOG_TIMEOUT)
                    .connect_timeout(CATALOG_TIMEOUT)
                    .build()
                    .map_err(|e| format!("cannot build the HTTP client for catalogs: {e}"))
            })
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        self.lookups
            .refresh(source, |catalog| {
                let mut request = client.get(&catalog.target);
                if let Some(token) = &catalog.token {
                    request = request.bearer_auth(token);
                }
                let secrets =
                    crate::redact::Secrets::of(&catalog.target).with(catalog.token.as_deref());
                async move {
                    let answer = match request.send().await {
                        Ok(response) if response.status().is_success() => response
                            .bytes()
                            .await
                            .map(|b| b.to_vec())
                            .map_err(|e| format!("reading it: {}", e.without_url())),
                        Ok(response) => Err(format!("HTTP {}", response.status())),
                        Err(e) if e.is_timeout() => {
                            Err(format!("no answer within {} s", CATALOG_TIMEOUT.as_secs()))
                        }
                        Err(e) => Err(format!("cannot connect: {}", error_chain(&e.without_url()))),
                    };
                    answer.map_err(|e| secrets.scrub(&e))
                }
            })
            .await
            .map_err(anyhow::Error::msg)
    }

    /// Each row with its entries added as columns, or why the rows' data cannot be enriched.
    /// An error is a mistake of the settings, shared by every row (the page's error).
    pub fn rows(&self, rows: &[Row]) -> anyhow::Result<Enriched> {
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let columns: Map<String, Value> = row.iter().cloned().collect();
            let ctx = context! { row => TemplateValue::from_serialize(&columns) };
            let mut row = row.clone();
            for (name, form) in &self.fields {
                if row.iter().any(|(n, _)| n == name) {
                    anyhow::bail!(
                        "enrich.{name}: the query already returns a column {name:?}; rename one of them"
                    );
                }
                let result = match form {
                    Form::Expression(expr) => self
                        .env
                        .compile_expression(expr)
                        .and_then(|e| e.eval(ctx.clone()))
                        .and_then(|v| {
                            serde_json::to_value(&v).map_err(|e| {
                                minijinja::Error::new(ErrorKind::BadSerialization, e.to_string())
                            })
                        }),
                    Form::Text => self
                        .env
                        .get_template(name)
                        .and_then(|t| t.render(ctx.clone()))
                        .map(Value::String),
                };
                match result {
                    Ok(value) => row.push((name.clone(), value)),
                    Err(e) if lookups::is_miss(&e) => {
                        return Ok(Enriched::Refused(format!("enrich.{name}: {}", detail(&e))));
                    }
                    Err(e) => anyhow::bail!(
                        "enrich.{name}: {}; fix the entry (or the source's maps and catalogs)",
                        detail(&e)
                    ),
                }
            }
            out.push(row);
        }
        Ok(Enriched::Rows(out))
    }
}

/// A template error as a reason: a lookup's own message (it names the code and the file), or
/// the error's kind and detail; minijinja's errors name the template's variables and never
/// quote a row's values.
fn detail(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(detail) if e.kind() == ErrorKind::InvalidOperation => detail.to_owned(),
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    }
}

/// An error and its causes, joined (reqwest's top line alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lookups::{Catalog, DEFAULT_CATALOG_TTL, MapFile};
    use serde_json::json;

    fn enrich(entries: &[(&str, &str)], dir: &std::path::Path) -> Enrich {
        std::fs::write(
            dir.join("tests_map.json"),
            r#"{"HEMOGRAMA": "HB-001", "GLICOSE": "GLU-FAST"}"#,
        )
        .unwrap();
        let mut lookups = Lookups::default();
        lookups.maps.insert(
            "exames".into(),
            MapFile::load(&dir.join("tests_map.json")).unwrap(),
        );
        let catalog = Catalog::new(
            "http://127.0.0.1:1/tests".into(),
            "supportTestId".into(),
            DEFAULT_CATALOG_TTL,
        );
        catalog
            .store(br#"[{"supportTestId": "HB-001", "supportSpecimenId": "SANGUE"}]"#)
            .unwrap();
        lookups.catalogs.insert("tests".into(), catalog);
        let entries = entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Enrich::new(&entries, lookups).unwrap()
    }

    fn row(pairs: &[(&str, Value)]) -> Row {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn entries_become_typed_columns_and_a_code_without_mapping_refuses_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let e = enrich(
            &[
                (
                    "items.supportTestId",
                    "{{ map('exames', row['items.exame']) }}",
                ),
                (
                    "items.specimen",
                    "{{ catalog('tests', map('exames', row['items.exame'])) }}",
                ),
                ("label", "exame {{ row.id }}"),
            ],
            dir.path(),
        );
        let Enriched::Rows(rows) = e
            .rows(&[row(&[
                ("id", json!(7)),
                ("items.exame", json!("HEMOGRAMA")),
            ])])
            .unwrap()
        else {
            panic!("refused")
        };
        let columns: Map<String, Value> = rows[0].iter().cloned().collect();
        assert_eq!(columns["items.supportTestId"], json!("HB-001"));
        assert_eq!(
            columns["items.specimen"],
            json!({"supportTestId": "HB-001", "supportSpecimenId": "SANGUE"})
        );
        assert_eq!(columns["label"], json!("exame 7"));
        // A code the file does not hold: the row's own problem, naming the code and the file.
        let Enriched::Refused(reason) = e
            .rows(&[row(&[("id", json!(8)), ("items.exame", json!("URINA"))])])
            .unwrap()
        else {
            panic!("not refused")
        };
        assert!(reason.contains("\"URINA\" has no mapping in"), "{reason}");
        assert!(reason.contains("tests_map.json"), "{reason}");
        // A mapped code the catalog does not hold, through a template: refused too.
        let Enriched::Refused(reason) = e
            .rows(&[row(&[("id", json!(9)), ("items.exame", json!("GLICOSE"))])])
            .unwrap()
        else {
            panic!("not refused")
        };
        assert!(reason.contains("supportTestId = \"GLU-FAST\""), "{reason}");
    }

    #[test]
    fn mistakes_of_the_settings_fail_the_page_or_the_load() {
        let dir = tempfile::tempdir().unwrap();
        // A column the query does not return: every row would fail, so the page fails.
        let e = enrich(&[("x", "{{ map('exames', row.falta) }}")], dir.path());
        let err = e.rows(&[row(&[("id", json!(1))])]).unwrap_err();
        assert!(err.to_string().contains("enrich.x"), "{err}");
        let e = enrich(&[("x", "{{ map('outro', row.id) }}")], dir.path());
        let err = e.rows(&[row(&[("id", json!(1))])]).unwrap_err();
        assert!(err.to_string().contains("no map of that name"), "{err}");
        let e = enrich(&[("id", "{{ 1 }}")], dir.path());
        let err = e.rows(&[row(&[("id", json!(1))])]).unwrap_err();
        assert!(err.to_string().contains("already returns"), "{err}");
        let entries = BTreeMap::from([("x".to_owned(), "{{ map(".to_owned())]);
        let problems = Enrich::new(&entries, Lookups::default()).unwrap_err();
        assert!(problems[0].1.contains("does not compile"), "{problems:?}");
    }
}
