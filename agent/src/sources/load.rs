//! Reads and checks `[[sources]]` (templates expanded first, see `template`) into
//! [`SourceConfig`]s, every mistake a [`Problem`] naming the key, and describes a source in one
//! line for `check-config`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{
    ActionFrom, Columns, DEFAULT_ITEMS, DEFAULT_PAGE_SIZE, FileSource, SourceConfig, When,
    after_stage, enrich, query, template,
};
use crate::lookups::{Catalog, DEFAULT_CATALOG_TTL, Lookups, MapFile};
use crate::problem::Problem;

impl SourceConfig {
    /// One line for `check-config`: where it reads, when, how much, and a template's
    /// variables (passwords hidden), so the expansions of a template can be checked by eye.
    pub fn describe(&self) -> String {
        let (url, secrets) = query::shown_and_secrets(&self.url);
        let mut parts = vec![url];
        parts.push(match &self.when {
            When::Cron(expr) => format!("schedule {expr:?}"),
            When::Every(every) => format!("every {}", crate::interval::show_interval(*every)),
        });
        parts.push(format!("pages of {} rows", self.page_size));
        if let Some(cap) = self.max_records {
            parts.push(format!("at most {cap} rows per cycle"));
        }
        if let Some((column, wait)) = &self.debounce {
            parts.push(format!(
                "debounce {} on {column}",
                crate::interval::show_interval(*wait)
            ));
        }
        parts.push(format!(
            "times without a zone read in {}",
            self.time_zone.as_ref().map_or("UTC", |z| z.name())
        ));
        if let Some(after) = &self.after_stage {
            parts.push(format!("after_stage {}", after.path.display()));
        }
        if let Some(enrich) = &self.enrich {
            parts.push(format!("enrich {}", enrich.describe()));
        }
        if !self.vars.is_empty() {
            let vars: Vec<String> = self
                .vars
                .iter()
                .map(|(k, v)| format!("{k}={}", secrets.scrub(v)))
                .collect();
            parts.push(format!("template variables {}", vars.join(", ")));
        }
        if !self.enabled {
            parts.push("disabled".into());
        }
        parts.join(", ")
    }
}

/// A source's `maps` (files read now), `catalogs` (`token_env` read from `vars`, the `.env`
/// and process environment) and `enrich` entries, checked; each mistake a problem under `at`.
fn enrich_of(
    src: &FileSource,
    file_dir: &Path,
    vars: &BTreeMap<String, String>,
    problem: &mut dyn FnMut(&str, Option<String>, String),
) -> Option<Arc<enrich::Enrich>> {
    let mut lookups = Lookups::default();
    for (name, file) in src.maps.iter().flatten() {
        let path = file_dir.join(file);
        match MapFile::load(&path) {
            Ok(map) => {
                lookups.maps.insert(name.clone(), map);
            }
            Err(expected) => problem(
                &format!("maps.{name}"),
                Some(path.display().to_string()),
                expected,
            ),
        }
    }
    for (name, catalog) in src.catalogs.iter().flatten() {
        let at = |field: &str| format!("catalogs.{name}.{field}");
        match reqwest::Url::parse(&catalog.url) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.password().is_none() => {}
            _ => problem(
                &at("url"),
                Some(crate::redact::url(&catalog.url)),
                "expected an http:// or https:// URL without a password, such as https://api.example/tests (the token goes in token_env)".into(),
            ),
        }
        let ttl = match catalog.ttl_secs {
            None => DEFAULT_CATALOG_TTL,
            Some(t) if t.is_finite() && t > 0.0 => Duration::from_secs_f64(t),
            Some(t) => {
                problem(
                    &at("ttl_secs"),
                    Some(t.to_string()),
                    "expected a number of seconds above 0, such as 3600".into(),
                );
                DEFAULT_CATALOG_TTL
            }
        };
        let mut entry = Catalog::new(catalog.url.clone(), catalog.key.clone(), ttl);
        if let Some(var) = &catalog.token_env {
            match vars.get(var).filter(|v| !v.is_empty()) {
                Some(token) => entry.token = Some(token.clone()),
                None => problem(
                    &at("token_env"),
                    Some(var.clone()),
                    format!(
                        "the environment variable {var} is not set (nor in .env); set it to the API's token"
                    ),
                ),
            }
        }
        lookups.catalogs.insert(name.clone(), entry);
    }
    let entries = match &src.enrich {
        Some(entries) => entries,
        None => {
            if src.maps.is_some() || src.catalogs.is_some() {
                problem(
                    "enrich",
                    None,
                    "maps and catalogs are read by enrich; add enrich = { <column> = \"{{ map('name', row.<column>) }}\" }".into(),
                );
            }
            return None;
        }
    };
    match enrich::Enrich::new(entries, lookups) {
        Ok(enrich) => Some(Arc::new(enrich)),
        Err(found) => {
            for (name, expected) in found {
                problem(
                    &format!("enrich.{name}"),
                    entries.get(&name).cloned(),
                    expected,
                );
            }
            None
        }
    }
}

/// Checks `[[sources]]`; each mistake becomes a [`Problem`] naming the key. `vars` (the `.env`
/// and process environment) give catalogs their `token_env`.
pub fn load(
    file: &[FileSource],
    file_dir: &Path,
    vars: &BTreeMap<String, String>,
    problems: &mut Vec<Problem>,
) -> Vec<SourceConfig> {
    let mut out: Vec<SourceConfig> = Vec::new();
    for expanded in template::expand(file, problems) {
        let src = &expanded.source;
        let at = |field: &str| format!("{}.{field}", expanded.at);
        let mut problem = |field: &str, value: Option<String>, expected: String| {
            problems.push(Problem::new(at(field), value, expected));
        };
        if let Err(err) = estafeta_staging::validate_name("source", &src.name) {
            problem("name", Some(src.name.clone()), err.to_string());
        }
        if out.iter().any(|s| s.name == src.name) {
            problem(
                "name",
                Some(src.name.clone()),
                "expected a name no other source uses".into(),
            );
        }
        if let Err(err) = query::check_url(&src.url) {
            problem("url", Some(query::shown_and_secrets(&src.url).0), err);
        }
        let query_path = file_dir.join(&src.query);
        let sql = match std::fs::read_to_string(&query_path) {
            Ok(sql) if sql.trim().is_empty() => {
                problem(
                    "query",
                    Some(query_path.display().to_string()),
                    "the file is empty; write the SELECT there".into(),
                );
                String::new()
            }
            Ok(sql) => {
                if let Ok(driver) = query::Driver::of(&src.url)
                    && let Err(err) = driver.rewrite(&sql)
                {
                    problem("query", Some(query_path.display().to_string()), err);
                }
                sql
            }
            Err(err) => {
                problem(
                    "query",
                    Some(query_path.display().to_string()),
                    format!(
                        "cannot read it ({err}); expected a .sql file, relative to the TOML file's folder (for example sql/sources/{}.sql)",
                        src.name
                    ),
                );
                String::new()
            }
        };
        let after_stage = src.after_stage.as_ref().and_then(|rel| {
            let path = file_dir.join(rel);
            let shown = Some(path.display().to_string());
            match std::fs::read_to_string(&path) {
                Ok(sql) => match after_stage::AfterStage::new(path, sql, &src.url) {
                    Ok(after) => Some(after),
                    Err(err) => {
                        problem("after_stage", shown, err);
                        None
                    }
                },
                Err(err) => {
                    problem("after_stage", shown, format!("cannot read it ({err}); expected a .sql file, relative to the TOML file's folder (for example sql/sources/{}_taken.sql)", src.name));
                    None
                }
            }
        });
        let when = match (&src.schedule, &src.every) {
            (Some(cron), None) => {
                if let Err(err) = crate::crontab::validate_crontab(cron) {
                    problem("schedule", Some(cron.clone()), err);
                }
                When::Cron(cron.clone())
            }
            (None, Some(every)) => match crate::interval::parse_interval(every) {
                Ok(d) => When::Every(d),
                Err(err) => {
                    problem("every", Some(every.clone()), err);
                    When::Every(Duration::from_secs(60))
                }
            },
            _ => {
                problem(
                    "schedule",
                    None,
                    "expected exactly one of schedule (cron, like CRONTAB) or every (\"10s\")"
                        .into(),
                );
                When::Every(Duration::from_secs(60))
            }
        };
        for (field, value) in [
            ("max_records", src.max_records),
            ("page_size", src.page_size),
        ] {
            if value == Some(0) {
                problem(field, Some("0".into()), "expected at least 1".into());
            }
        }
        // `max_records` caps a cycle (seed 004's MaxRecords); a page is never larger than
        // the cap, and a configuration from before `page_size` keeps its page size.
        let max_records = src.max_records.filter(|n| *n > 0);
        let page_size = src
            .page_size
            .filter(|n| *n > 0)
            .or(max_records)
            .unwrap_or(DEFAULT_PAGE_SIZE)
            .min(max_records.unwrap_or(usize::MAX));
        if let Err(err) = estafeta_staging::validate_name("entity", &src.entity) {
            problem("entity", Some(src.entity.clone()), err.to_string());
        }
        let action = match (&src.action, &src.action_column) {
            (Some(action), None) => {
                if let Err(err) = estafeta_staging::validate_name("action", action) {
                    problem("action", Some(action.clone()), err.to_string());
                }
                ActionFrom::Fixed(action.clone())
            }
            (None, Some(column)) => ActionFrom::Column(column.clone()),
            _ => {
                problem("action", None, "expected exactly one of action (create, update, upsert, delete) or action_column".into());
                ActionFrom::Fixed("create".into())
            }
        };
        let checkpoint = match &src.checkpoint {
            Some(Columns::One(c)) => vec![c.clone()],
            Some(Columns::Many(cs)) => cs.clone(),
            None => Vec::new(),
        };
        if checkpoint.is_empty() {
            problem("checkpoint", None, "expected the column (or columns, such as [\"updated_at\", \"id\"]) the query sorts by, so each cycle reads only new rows".into());
        }
        for column in &checkpoint {
            if !column
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
                || column.is_empty()
            {
                problem("checkpoint", Some(column.clone()), "expected a column name of letters, digits and '_' (it becomes the parameter :last_<column>)".into());
            }
        }
        let debounce_for = match (src.debounce_secs, &src.debounce) {
            (Some(_), Some(_)) => {
                problem("debounce", src.debounce.clone(), "expected one of debounce_secs (a number of seconds) or debounce (\"00:01:00\", \"60s\"), not both".into());
                None
            }
            (Some(0), None) | (None, None) => None,
            (Some(secs), None) => Some(Duration::from_secs(secs)),
            (None, Some(text)) => match crate::interval::parse_interval(text) {
                Ok(d) => Some(d),
                Err(err) => {
                    problem("debounce", Some(text.clone()), err);
                    None
                }
            },
        };
        let debounce = match (debounce_for, &src.debounce_column) {
            (Some(d), Some(column)) => Some((column.clone(), d)),
            (None, None) => None,
            (None, Some(_)) if src.debounce_secs == Some(0) => None,
            _ => {
                problem("debounce_column", None, "debounce (or debounce_secs) and debounce_column go together: the timestamp column that says when a row was written".into());
                None
            }
        };
        let time_zone = match &src.time_zone {
            None => None,
            Some(name) => match crate::timezone::Zone::named(name) {
                Some(zone) => Some(zone),
                None => {
                    problem("time_zone", Some(name.clone()), "expected an IANA time zone name such as America/Sao_Paulo or UTC (from the system's time zone database, /usr/share/zoneinfo; install the tzdata package if it is missing)".into());
                    None
                }
            },
        };
        if let Some(key) = &src.key
            && key.is_empty()
        {
            problem("key", Some(String::new()), "expected a column name".into());
        }
        let enrich = enrich_of(src, file_dir, vars, &mut |field, value, expected| {
            problem(field, value, expected)
        });
        out.push(SourceConfig {
            name: src.name.clone(),
            url: src.url.clone(),
            query_path,
            sql,
            after_stage,
            when,
            enabled: src.enabled.unwrap_or(true),
            page_size,
            max_records,
            entity: src.entity.clone(),
            action,
            key: src.key.clone(),
            checkpoint,
            debounce,
            time_zone,
            vars: expanded.vars,
            group_by: src.group_by.clone(),
            items: src
                .items
                .clone()
                .unwrap_or_else(|| DEFAULT_ITEMS.to_owned()),
            enrich,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::{
        DEFAULT_PAGE_SIZE, instant_of, local_wall_clock, naive, parse_naive, rfc3339,
    };
    use serde::Deserialize;

    /// The sources of `toml_text`, with a query file in a fresh folder, and the problems.
    fn loaded(toml_text: &str) -> (Vec<SourceConfig>, Vec<Problem>) {
        #[derive(Deserialize)]
        struct File {
            sources: Vec<FileSource>,
        }
        let dir = std::env::temp_dir().join(format!(
            "estafeta-sources-test-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("q.sql"), "SELECT id FROM t LIMIT :limit").unwrap();
        let file: File = toml::from_str(toml_text).unwrap();
        let mut problems = Vec::new();
        let out = load(&file.sources, &dir, &BTreeMap::new(), &mut problems);
        std::fs::remove_dir_all(&dir).unwrap();
        (out, problems)
    }

    const BASE: &str = "[[sources]]\nname = \"s\"\nurl = \"sqlite://x.db\"\nquery = \"q.sql\"\nentity = \"e\"\naction = \"create\"\ncheckpoint = \"id\"\n";

    #[test]
    fn max_records_caps_a_cycle_and_an_old_configuration_keeps_its_page_size() {
        let page = |extra: &str| {
            let (out, problems) = loaded(&format!("{BASE}every = \"00:00:05\"\n{extra}"));
            assert!(problems.is_empty(), "{problems:?}");
            (out[0].page_size, out[0].max_records)
        };
        assert_eq!(page(""), (DEFAULT_PAGE_SIZE, None));
        assert_eq!(page("max_records = 50\n"), (50, Some(50)));
        assert_eq!(page("page_size = 100\n"), (100, None));
        assert_eq!(
            page("page_size = 100\nmax_records = 1000\n"),
            (100, Some(1000))
        );
        // A page never reads past the cycle's cap.
        assert_eq!(page("page_size = 100\nmax_records = 30\n"), (30, Some(30)));
    }

    #[test]
    fn a_local_time_is_read_in_the_source_zone() {
        let (out, problems) = loaded(&format!(
            "{BASE}every = \"10s\"\ntime_zone = \"America/Sao_Paulo\"\n"
        ));
        assert!(problems.is_empty(), "{problems:?}");
        let wall = parse_naive("2026-11-23T10:30:00").unwrap();
        assert_eq!(
            rfc3339(instant_of(&out[0], wall)),
            "2026-11-23T13:30:00.000000Z"
        );
        assert_eq!(
            naive(local_wall_clock(&out[0], instant_of(&out[0], wall))),
            "2026-11-23T10:30:00.000000"
        );
        let (utc, _) = loaded(&format!("{BASE}every = \"10s\"\n"));
        assert_eq!(
            rfc3339(instant_of(&utc[0], wall)),
            "2026-11-23T10:30:00.000000Z"
        );
    }

    #[test]
    fn bad_intervals_and_zones_are_named() {
        let (_, problems) = loaded(&format!(
            "{BASE}every = \"00:00:5x\"\ndebounce = \"1 minuto\"\ndebounce_column = \"c\"\ntime_zone = \"Mars/Olympus\"\n"
        ));
        let text = format!("{problems:?}");
        for want in [
            "sources[0].every",
            "sources[0].debounce",
            "sources[0].time_zone",
        ] {
            assert!(text.contains(want), "{want}: {text}");
        }
    }
}

#[cfg(test)]
mod lookup_tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct File {
        sources: Vec<FileSource>,
    }

    #[test]
    fn maps_catalogs_and_enrich_are_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("q.sql"), "SELECT id FROM t LIMIT :limit").unwrap();
        std::fs::write(dir.path().join("ok.json"), r#"{"A": "1"}"#).unwrap();
        let base = "[[sources]]\nname = \"s\"\nurl = \"sqlite://x.db\"\nquery = \"q.sql\"\nentity = \"e\"\naction = \"create\"\ncheckpoint = \"id\"\nevery = \"5s\"\n";
        let load_text = |extra: &str, vars: &[(&str, &str)]| {
            let file: File = toml::from_str(&format!("{base}{extra}")).unwrap();
            let vars = vars
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            let mut problems = Vec::new();
            let out = load(&file.sources, dir.path(), &vars, &mut problems);
            (out, format!("{problems:?}"))
        };
        let (out, problems) = load_text(
            "maps = { a = \"ok.json\" }\ncatalogs = { t = { url = \"https://api.example/tests\", key = \"id\", token_env = \"TOK\" } }\nenrich = { x = \"{{ map('a', row.c) }}\" }\n",
            &[("TOK", "segredo")],
        );
        assert_eq!(problems, "[]");
        let enrich = out[0].enrich.as_ref().expect("enrich is loaded");
        assert_eq!(
            enrich.lookups.catalogs["t"].token.as_deref(),
            Some("segredo")
        );
        assert!(
            !format!("{:?}", out[0]).contains("segredo"),
            "the token never prints"
        );
        assert!(out[0].describe().contains("enrich x (maps a) (catalogs t)"));
        let (_, problems) = load_text(
            "maps = { a = \"falta.json\" }\ncatalogs = { t = { url = \"ftp://u:pw@h/x\", key = \"id\", token_env = \"TOK\", ttl_secs = 0 } }\nenrich = { x = \"{{ map(\" }\n",
            &[],
        );
        for want in [
            "sources[0].maps.a",
            "falta.json",
            "sources[0].catalogs.t.url",
            "sources[0].catalogs.t.token_env",
            "sources[0].catalogs.t.ttl_secs",
            "sources[0].enrich.x",
        ] {
            assert!(problems.contains(want), "{want}: {problems}");
        }
        assert!(!problems.contains("pw@"), "{problems}");
        let (_, problems) = load_text("maps = { a = \"ok.json\" }\n", &[]);
        assert!(problems.contains("sources[0].enrich"), "{problems}");
    }
}
