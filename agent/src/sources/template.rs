//! Source templates: one `[[sources]]` block with an `each` list becomes one source per item,
//! so twelve hospitals × six areas (seeds 001 and 004) are six blocks and a list each, not 72
//! hand-written copies. Every `{name}` of an item's variable is replaced in the block's text
//! settings, and the variables are also bound as `:name` parameters in the query (a hospital
//! code filters rows as a bound value, never as pasted SQL). Each expansion is a source of its
//! own: its own name (so the name must use a variable) and its own checkpoint.
//!
//! Only declared variables are replaced: other braces stay as written, because ODBC
//! connection strings use them (`Driver={ODBC Driver 18 for SQL Server}`).

use std::collections::BTreeMap;

use super::{Columns, FileSource};
use crate::problem::Problem;

/// Parameter names the agent binds itself, which a variable may not take.
const RESERVED: &[&str] = &["limit", "not_after", "not_after_local"];

/// One source to check: where it was written (for problems), its settings, its variables.
pub struct Expanded {
    pub at: String,
    pub source: FileSource,
    pub vars: BTreeMap<String, String>,
}

/// Every `[[sources]]` block, templates expanded in their list's order.
pub fn expand(file: &[FileSource], problems: &mut Vec<Problem>) -> Vec<Expanded> {
    let mut out = Vec::new();
    for (i, src) in file.iter().enumerate() {
        // Constant parameters: bound like a template's variables, which win over them.
        let params: BTreeMap<String, String> = src
            .params
            .iter()
            .flatten()
            .map(|(name, value)| (name.clone(), value.text()))
            .collect();
        if !check_names(&format!("sources[{i}].params"), &params, problems) {
            continue;
        }
        let Some(items) = &src.each else {
            out.push(Expanded {
                at: format!("sources[{i}]"),
                source: src.clone(),
                vars: params,
            });
            continue;
        };
        if items.is_empty() {
            problems.push(Problem::new(
                format!("sources[{i}].each"),
                Some("[]".into()),
                "expected at least one item, such as { hospital = \"hc\", url = \"postgres://…\" }; or remove `each`",
            ));
        }
        for (j, vars) in items.iter().enumerate() {
            let at = format!("sources[{i}].each[{j}]");
            let mut ok = check_names(&at, vars, problems);
            if !src.name.contains('{') || fill(&src.name, vars) == src.name {
                problems.push(Problem::new(
                    format!("sources[{i}].name"),
                    Some(src.name.clone()),
                    "a template's name must use one of its variables (such as \"{hospital}-exames\"), so that each expansion has its own name and checkpoint",
                ));
                ok = false;
            }
            if ok {
                out.push(Expanded {
                    at,
                    source: apply(src, vars),
                    vars: params.clone().into_iter().chain(vars.clone()).collect(),
                });
            }
        }
    }
    out
}

/// Whether every name of `vars` can be a query parameter; each one that cannot is a problem
/// under `at`.
fn check_names(at: &str, vars: &BTreeMap<String, String>, problems: &mut Vec<Problem>) -> bool {
    let mut ok = true;
    for name in vars.keys() {
        let plain =
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !plain || RESERVED.contains(&name.as_str()) || name.starts_with("last_") {
            problems.push(Problem::new(
                format!("{at}.{name}"),
                None,
                format!("expected a variable name of letters, digits and '_' that is not one of {} and does not start with last_ (it is also the query parameter :{name})", RESERVED.join(", ")),
            ));
            ok = false;
        }
    }
    ok
}

/// `text` with each `{name}` of `vars` replaced by its value.
fn fill(text: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = text.to_owned();
    for (name, value) in vars {
        out = out.replace(&format!("{{{name}}}"), value);
    }
    out
}

/// The block with every text setting filled in, without its list.
fn apply(src: &FileSource, vars: &BTreeMap<String, String>) -> FileSource {
    let text = |t: &String| fill(t, vars);
    let opt = |t: &Option<String>| t.as_ref().map(|t| fill(t, vars));
    FileSource {
        name: text(&src.name),
        url: text(&src.url),
        query: fill(&src.query.to_string_lossy(), vars).into(),
        after_stage: src
            .after_stage
            .as_ref()
            .map(|p| fill(&p.to_string_lossy(), vars).into()),
        schedule: opt(&src.schedule),
        every: opt(&src.every),
        enabled: src.enabled,
        max_records: src.max_records,
        page_size: src.page_size,
        entity: text(&src.entity),
        action: opt(&src.action),
        action_column: opt(&src.action_column),
        key: opt(&src.key),
        checkpoint: src.checkpoint.as_ref().map(|c| match c {
            Columns::One(c) => Columns::One(fill(c, vars)),
            Columns::Many(cs) => Columns::Many(cs.iter().map(|c| fill(c, vars)).collect()),
        }),
        debounce_secs: src.debounce_secs,
        debounce: opt(&src.debounce),
        debounce_column: opt(&src.debounce_column),
        time_zone: opt(&src.time_zone),
        group_by: opt(&src.group_by),
        items: opt(&src.items),
        each: None,
        params: src.params.clone(),
        // Lookups are the same for every expansion: the files and catalogs are shared data.
        maps: src.maps.clone(),
        catalogs: src.catalogs.clone(),
        enrich: src.enrich.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Vec<FileSource> {
        #[derive(serde::Deserialize)]
        struct File {
            sources: Vec<FileSource>,
        }
        toml::from_str::<File>(toml_text).unwrap().sources
    }

    #[test]
    fn a_template_becomes_one_source_per_item_with_its_variables() {
        let file = parse(
            r#"
[[sources]]
name = "{hospital}-exames"
url = "odbc:Driver={FreeTDS};Server={host};Database=HIS"
query = "sql/sources/exames.sql"
every = "00:00:05"
entity = "exam"
action = "create"
checkpoint = "id"
each = [
  { hospital = "hc", host = "10.0.0.1" },
  { hospital = "hsl", host = "10.0.0.2" },
]
"#,
        );
        let mut problems = Vec::new();
        let out = expand(&file, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let names: Vec<_> = out.iter().map(|e| e.source.name.as_str()).collect();
        assert_eq!(names, ["hc-exames", "hsl-exames"]);
        // Braces that are no variable stay: ODBC needs them.
        assert_eq!(
            out[1].source.url,
            "odbc:Driver={FreeTDS};Server=10.0.0.2;Database=HIS"
        );
        assert_eq!(out[0].vars["hospital"], "hc");
        assert_eq!(out[1].at, "sources[0].each[1]");
    }

    #[test]
    fn a_template_name_without_a_variable_and_reserved_variables_are_refused() {
        let file = parse(
            r#"
[[sources]]
name = "exames"
url = "sqlite://x.db"
query = "q.sql"
every = "5s"
entity = "exam"
action = "create"
checkpoint = "id"
each = [{ limit = "3" }]
"#,
        );
        let mut problems = Vec::new();
        let out = expand(&file, &mut problems);
        assert!(out.is_empty());
        let text = format!("{problems:?}");
        assert!(text.contains("sources[0].each[0].limit"), "{text}");
        assert!(text.contains("must use one of its variables"), "{text}");
    }
}
