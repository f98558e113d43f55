//! Building the sink configurations: the TOML file's `[[sinks]]` (HTTP and database; NATS is
//! in [`super::nats`]), then the `database` and `api` sinks the `CENTRAL_*` keys define, which
//! override the file's sinks of the same name field by field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::checks::{
    check_concurrency, check_database_url, check_http_url, check_readable, invalid_reason,
};
use super::file::{FileHttpRoute, FileSink, FileSinkType, METHODS};
use super::keys::*;
use super::parse::{parse_bool, parse_secs, parse_u64, secs_from_f64};
use super::raw::Loader;
use super::{API_SINK, DATABASE_SINK, NATS_SINK};
use crate::db::Dialect;
use crate::db::apply::ApplyStatements;
use crate::lookups::{Catalog, DEFAULT_CATALOG_TTL, Lookups, MapFile};
use crate::problem::Problem;
use crate::redact::url as redact_url;
use crate::sinks::database::DatabaseSinkConfig;
use crate::sinks::http::{BodyTemplate, HttpRoute, HttpSinkConfig};
use crate::sinks::record_template::RecordTemplate;
use crate::sinks::{SinkConfig, SinkKind};

impl Loader {
    pub(super) fn sinks(
        &mut self,
        file_sinks: &[FileSink],
        file_dir: &Path,
        agent_id: &str,
    ) -> Vec<SinkConfig> {
        let mut sinks: Vec<SinkConfig> = Vec::new();
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        // (sink name, key, folder): loaded once the URL is final (CENTRAL_DATABASE_URL may
        // change the dialect).
        let mut apply_dirs: Vec<(String, String, PathBuf)> = Vec::new();
        for (i, sink) in file_sinks.iter().enumerate() {
            let at = format!("sinks[{i}]");
            if let Err(err) = estafeta_staging::validate_name("sink", &sink.name) {
                self.problem(
                    format!("{at}.name"),
                    Some(sink.name.clone()),
                    invalid_reason(err),
                );
            }
            if let Some(first) = seen.get(&sink.name) {
                self.problem(
                    format!("{at}.name"),
                    Some(sink.name.clone()),
                    format!("expected a unique sink name; sinks[{first}] is already called that"),
                );
                continue;
            }
            seen.insert(sink.name.clone(), i);
            for (field, set, types) in sink.typed_fields() {
                if set && !types.contains(&sink.kind) {
                    let applies = types
                        .iter()
                        .map(|t| t.as_str())
                        .collect::<Vec<_>>()
                        .join(" and ");
                    self.problem(
                        format!("{at}.{field}"),
                        None,
                        format!(
                            "applies to {applies} sinks only; remove it from this {} sink",
                            sink.kind.as_str()
                        ),
                    );
                }
            }
            let kind = match sink.kind {
                FileSinkType::Nats => {
                    SinkKind::Nats(self.file_nats_sink(&at, sink, file_dir, agent_id))
                }
                FileSinkType::Database => {
                    if let Err(expected) = check_database_url(&sink.url) {
                        self.problem(format!("{at}.url"), Some(redact_url(&sink.url)), expected);
                    }
                    if let Some(dir) = &sink.apply_dir {
                        apply_dirs.push((
                            sink.name.clone(),
                            format!("{at}.apply_dir"),
                            file_dir.join(dir),
                        ));
                    }
                    let connections = match sink.connections {
                        None => crate::sinks::database::DEFAULT_CONNECTIONS,
                        Some(n @ 1..=2) => n,
                        Some(n) => {
                            self.problem(
                                format!("{at}.connections"),
                                Some(n.to_string()),
                                "expected 1 or 2 (connections a PostgreSQL batch is spread over)",
                            );
                            crate::sinks::database::DEFAULT_CONNECTIONS
                        }
                    };
                    let idempotency_key = self
                        .record_template(&format!("{at}.idempotency_key"), &sink.idempotency_key);
                    let transaction_pooling = sink.transaction_pooling.unwrap_or(false);
                    // An invalid url is reported on its own key.
                    if transaction_pooling
                        && crate::db::Dialect::of(&sink.url)
                            .is_ok_and(|d| d != crate::db::Dialect::Postgres)
                    {
                        self.problem(
                            format!("{at}.transaction_pooling"),
                            Some("true".to_owned()),
                            "applies to postgres:// database sinks only (PgBouncer in front of PostgreSQL); remove it from this sink",
                        );
                    }
                    SinkKind::Database(DatabaseSinkConfig {
                        url: sink.url.clone(),
                        agent_id: agent_id.to_owned(),
                        apply: None,
                        idempotency_key,
                        connections,
                        transaction_pooling,
                    })
                }
                FileSinkType::Http => {
                    if let Err(expected) = check_http_url(&sink.url) {
                        self.problem(format!("{at}.url"), Some(redact_url(&sink.url)), expected);
                    }
                    let timeout = match sink.timeout_secs {
                        Some(t) => match secs_from_f64(t, false) {
                            Ok(d) => d,
                            Err(expected) => {
                                self.problem(
                                    format!("{at}.timeout_secs"),
                                    Some(t.to_string()),
                                    expected,
                                );
                                Duration::from_secs(DEFAULT_API_TIMEOUT_SECS)
                            }
                        },
                        None => Duration::from_secs(DEFAULT_API_TIMEOUT_SECS),
                    };
                    let concurrency = sink.concurrency.unwrap_or(DEFAULT_API_CONCURRENCY);
                    if let Err(expected) = check_concurrency(concurrency) {
                        self.problem(
                            format!("{at}.concurrency"),
                            Some(concurrency.to_string()),
                            expected,
                        );
                    }
                    let ca_file = sink.ca_file.as_ref().map(|p| file_dir.join(p));
                    if let Some(ca) = &ca_file
                        && let Err(expected) = check_readable(ca)
                    {
                        self.problem(
                            format!("{at}.ca_file"),
                            Some(ca.display().to_string()),
                            expected,
                        );
                    }
                    let lookups = Arc::new(self.lookups(&at, sink, file_dir));
                    let mut routes = Vec::new();
                    for (j, route) in sink.routes.iter().enumerate() {
                        routes.push(self.http_route(
                            &format!("{at}.routes[{j}]"),
                            route,
                            file_dir,
                            &lookups,
                        ));
                    }
                    if let Some(path) = &sink.heartbeat_path
                        && let Err(expected) = crate::sinks::http::check_heartbeat_path(path)
                    {
                        self.problem(format!("{at}.heartbeat_path"), Some(path.clone()), expected);
                    }
                    SinkKind::Http(HttpSinkConfig {
                        url: sink.url.clone(),
                        token: sink.token.clone().filter(|t| !t.is_empty()),
                        timeout,
                        verify_tls: sink.verify_tls.unwrap_or(DEFAULT_VERIFY_TLS),
                        ca_file,
                        routes,
                        idempotency_key: self.record_template(
                            &format!("{at}.idempotency_key"),
                            &sink.idempotency_key,
                        ),
                        lookups,
                        concurrency,
                        heartbeat_path: sink.heartbeat_path.clone(),
                    })
                }
            };
            let max_attempts = sink.max_attempts.and_then(|n| match check_max_attempts(n) {
                Ok(n) => Some(n),
                Err(expected) => {
                    self.problem(format!("{at}.max_attempts"), Some(n.to_string()), expected);
                    None
                }
            });
            sinks.push(SinkConfig {
                name: sink.name.clone(),
                kind,
                max_attempts,
            });
        }
        self.env_database_sink(&mut sinks, agent_id);
        for (name, at, dir) in apply_dirs {
            self.apply_statements(&mut sinks, &name, &at, &dir);
        }
        self.env_api_sink(&mut sinks);
        self.env_nats_sink(&mut sinks, agent_id);
        self.env_max_attempts(&mut sinks);
        if sinks.is_empty() {
            sinks.push(SinkConfig {
                name: DATABASE_SINK.into(),
                kind: SinkKind::Database(DatabaseSinkConfig {
                    url: DEFAULT_DATABASE_URL.into(),
                    agent_id: agent_id.to_owned(),
                    apply: None,
                    idempotency_key: None,
                    connections: crate::sinks::database::DEFAULT_CONNECTIONS,
                    transaction_pooling: false,
                }),
                max_attempts: None,
            });
        }
        sinks
    }

    /// An HTTP sink's `maps` (files read now) and `catalogs`; each mistake is a problem.
    fn lookups(&mut self, at: &str, sink: &FileSink, file_dir: &Path) -> Lookups {
        let mut lookups = Lookups::default();
        for (name, file) in sink.maps.iter().flatten() {
            let path = file_dir.join(file);
            match MapFile::load(&path) {
                Ok(map) => {
                    lookups.maps.insert(name.clone(), map);
                }
                Err(expected) => self.problem(
                    format!("{at}.maps.{name}"),
                    Some(path.display().to_string()),
                    expected,
                ),
            }
        }
        for (name, catalog) in sink.catalogs.iter().flatten() {
            if !catalog.path.starts_with('/') {
                self.problem(
                    format!("{at}.catalogs.{name}.path"),
                    Some(catalog.path.clone()),
                    "expected a path starting with '/', such as /tests",
                );
            }
            let ttl = match catalog.ttl_secs {
                None => DEFAULT_CATALOG_TTL,
                Some(t) => match secs_from_f64(t, false) {
                    Ok(d) => d,
                    Err(expected) => {
                        self.problem(
                            format!("{at}.catalogs.{name}.ttl_secs"),
                            Some(t.to_string()),
                            expected,
                        );
                        DEFAULT_CATALOG_TTL
                    }
                },
            };
            lookups.catalogs.insert(
                name.clone(),
                Catalog::new(catalog.path.clone(), catalog.key.clone(), ttl),
            );
        }
        lookups
    }

    /// A record template (`idempotency_key`), checked: a bad one is a problem at `at`.
    fn record_template(&mut self, at: &str, text: &Option<String>) -> Option<RecordTemplate> {
        let text = text.as_ref()?;
        match RecordTemplate::parse(text) {
            Ok(template) => Some(template),
            Err(expected) => {
                self.problem(at.to_owned(), Some(text.clone()), expected);
                None
            }
        }
    }

    pub(super) fn http_route(
        &mut self,
        at: &str,
        route: &FileHttpRoute,
        file_dir: &Path,
        lookups: &Arc<Lookups>,
    ) -> HttpRoute {
        let method = route.method.as_ref().map(|m| m.to_ascii_uppercase());
        if let Some(m) = &method
            && !METHODS.contains(&m.as_str())
        {
            self.problem(
                format!("{at}.method"),
                Some(m.clone()),
                format!("expected one of {}", METHODS.join(", ")),
            );
        }
        self.check_route_names(at, &[("entity", &route.entity), ("action", &route.action)]);
        if let Some(path) = &route.path
            && !path.starts_with('/')
        {
            self.problem(
                format!("{at}.path"),
                Some(path.clone()),
                "expected a path starting with '/', such as /{entity}/{key}",
            );
        }
        if route.content_type.is_some() && route.body_template.is_none() {
            self.problem(
                format!("{at}.content_type"),
                route.content_type.clone(),
                "applies with body_template only (the record's JSON always goes as application/json)",
            );
        }
        let body = route.body_template.as_ref().and_then(|path| {
            let path = file_dir.join(path);
            match BodyTemplate::load(&path, route.content_type.as_deref(), lookups) {
                Ok(template) => Some(Arc::new(template)),
                Err(expected) => {
                    self.problem(
                        format!("{at}.body_template"),
                        Some(path.display().to_string()),
                        expected,
                    );
                    None
                }
            }
        });
        HttpRoute {
            entity: route.entity.clone().filter(|e| e != "*"),
            action: route.action.clone().filter(|a| a != "*"),
            method,
            path: route.path.clone(),
            headers: route.headers.clone(),
            idempotency_key: self
                .record_template(&format!("{at}.idempotency_key"), &route.idempotency_key),
            body,
        }
    }

    /// Apply mode: reads and checks the statement files of sink `name` for its final URL's
    /// dialect; each bad file is a problem naming it.
    pub(super) fn apply_statements(
        &mut self,
        sinks: &mut [SinkConfig],
        name: &str,
        at: &str,
        dir: &Path,
    ) {
        let Some(SinkConfig {
            kind: SinkKind::Database(db),
            ..
        }) = sinks.iter_mut().find(|s| s.name == name)
        else {
            return;
        };
        // A bad URL is reported on its own.
        let Ok(dialect) = Dialect::of(&db.url) else {
            return;
        };
        match ApplyStatements::load(dir, dialect) {
            Ok(statements) => db.apply = Some(Arc::new(statements)),
            Err(problems) => {
                for problem in problems {
                    self.problem(at, Some(dir.display().to_string()), problem);
                }
            }
        }
    }

    /// `CENTRAL_DATABASE_URL`: the `database` sink (overriding the file's, if it has one).
    pub(super) fn env_database_sink(&mut self, sinks: &mut Vec<SinkConfig>, agent_id: &str) {
        let key_text = self.text("CENTRAL_DATABASE_IDEMPOTENCY_KEY");
        let label = self.label("CENTRAL_DATABASE_IDEMPOTENCY_KEY");
        let idempotency_key = self.record_template(&label, &key_text);
        let Some(url) = self.text("CENTRAL_DATABASE_URL") else {
            if idempotency_key.is_some() {
                match sinks.iter_mut().find(|s| s.name == DATABASE_SINK) {
                    Some(SinkConfig {
                        kind: SinkKind::Database(db),
                        ..
                    }) => db.idempotency_key = idempotency_key,
                    _ => self.problem(
                        label,
                        key_text,
                        "is set but there is no database sink: set CENTRAL_DATABASE_URL or remove this key",
                    ),
                }
            }
            return;
        };
        if let Err(expected) = check_database_url(&url) {
            self.problem(
                self.label("CENTRAL_DATABASE_URL"),
                Some(redact_url(&url)),
                expected,
            );
        }
        match sinks.iter_mut().find(|s| s.name == DATABASE_SINK) {
            Some(SinkConfig {
                kind: SinkKind::Database(db),
                ..
            }) => {
                db.url = url;
                if idempotency_key.is_some() {
                    db.idempotency_key = idempotency_key;
                }
            }
            Some(_) => self.problem(
                self.label("CENTRAL_DATABASE_URL"),
                Some(redact_url(&url)),
                "the CONFIG_FILE already has an http sink named \"database\"; rename that sink",
            ),
            None => sinks.push(SinkConfig {
                name: DATABASE_SINK.into(),
                kind: SinkKind::Database(DatabaseSinkConfig {
                    url,
                    agent_id: agent_id.to_owned(),
                    apply: None,
                    idempotency_key,
                    connections: crate::sinks::database::DEFAULT_CONNECTIONS,
                    transaction_pooling: false,
                }),
                max_attempts: None,
            }),
        }
    }

    /// `CENTRAL_DATABASE_MAX_ATTEMPTS`, `CENTRAL_API_MAX_ATTEMPTS`, `CENTRAL_NATS_MAX_ATTEMPTS`:
    /// the `max_attempts` of the `database`, `api` and `nats` sinks (overriding the file's).
    /// Read once those sinks are final, so a key for a sink that does not exist is reported.
    pub(super) fn env_max_attempts(&mut self, sinks: &mut [SinkConfig]) {
        for (key, name, url_key) in [
            (
                "CENTRAL_DATABASE_MAX_ATTEMPTS",
                DATABASE_SINK,
                "CENTRAL_DATABASE_URL",
            ),
            ("CENTRAL_API_MAX_ATTEMPTS", API_SINK, "CENTRAL_API_URL"),
            ("CENTRAL_NATS_MAX_ATTEMPTS", NATS_SINK, "CENTRAL_NATS_URL"),
        ] {
            let Some(max) = self.parse_opt(key, |v| {
                parse_u64(v, MAX_ATTEMPTS_EXPECTED)
                    .and_then(|n| u32::try_from(n).map_err(|_| MAX_ATTEMPTS_EXPECTED.to_owned()))
                    .and_then(|n| check_max_attempts(n).map_err(str::to_owned))
            }) else {
                continue;
            };
            match sinks.iter_mut().find(|s| s.name == name) {
                Some(sink) => sink.max_attempts = Some(max),
                None => self.problem(
                    self.label(key),
                    Some(max.to_string()),
                    format!(
                        "is set but there is no {name:?} sink: set {url_key} or remove this key"
                    ),
                ),
            }
        }
    }

    /// `CENTRAL_API_*`: the `api` sink (overriding the file's, field by field, if it has one).
    pub(super) fn env_api_sink(&mut self, sinks: &mut Vec<SinkConfig>) {
        let url = self.text("CENTRAL_API_URL");
        if let Some(url) = &url
            && let Err(expected) = check_http_url(url)
        {
            self.problem(
                self.label("CENTRAL_API_URL"),
                Some(redact_url(url)),
                expected,
            );
        }
        let token = self.text("CENTRAL_API_TOKEN");
        let timeout = self.parse_opt("CENTRAL_API_TIMEOUT_SECS", |v| parse_secs(v, false));
        let verify_tls = self.parse_opt("CENTRAL_API_VERIFY_TLS", parse_bool);
        let ca_file = self.text("CENTRAL_API_CA_FILE").map(|p| self.cwd.join(p));
        if let Some(ca) = &ca_file
            && let Err(expected) = check_readable(ca)
        {
            self.problem(
                self.label("CENTRAL_API_CA_FILE"),
                Some(ca.display().to_string()),
                expected,
            );
        }
        let concurrency = self.parse_opt("CENTRAL_API_CONCURRENCY", |v| {
            parse_u64(v, "a whole number from 1 to 1024")
                .and_then(|n| {
                    usize::try_from(n).map_err(|_| "expected a whole number from 1 to 1024".into())
                })
                .and_then(|n| check_concurrency(n).map(|()| n))
        });
        let key_text = self.text("CENTRAL_API_IDEMPOTENCY_KEY");
        let idempotency_key =
            self.record_template(&self.label("CENTRAL_API_IDEMPOTENCY_KEY"), &key_text);
        let heartbeat_path = self.text("CENTRAL_API_HEARTBEAT_PATH");
        if let Some(path) = &heartbeat_path
            && let Err(expected) = crate::sinks::http::check_heartbeat_path(path)
        {
            self.problem(
                self.label("CENTRAL_API_HEARTBEAT_PATH"),
                Some(path.clone()),
                expected,
            );
        }
        let existing = sinks.iter_mut().find(|s| s.name == API_SINK);
        match existing {
            Some(SinkConfig {
                kind: SinkKind::Http(http),
                ..
            }) => {
                if let Some(url) = url {
                    http.url = url;
                }
                if token.is_some() {
                    http.token = token;
                }
                if let Some(timeout) = timeout {
                    http.timeout = timeout;
                }
                if let Some(verify) = verify_tls {
                    http.verify_tls = verify;
                }
                if ca_file.is_some() {
                    http.ca_file = ca_file;
                }
                if let Some(concurrency) = concurrency {
                    http.concurrency = concurrency;
                }
                if heartbeat_path.is_some() {
                    http.heartbeat_path = heartbeat_path;
                }
                if idempotency_key.is_some() {
                    http.idempotency_key = idempotency_key;
                }
            }
            Some(_) => {
                if let Some(key) = in_section(Section::CentralApi)
                    .find(|k| is_kind_key(k) && self.raw.contains_key(*k))
                {
                    self.problem(
                        self.label(key),
                        None,
                        "the CONFIG_FILE already has a database sink named \"api\"; rename that sink",
                    );
                }
            }
            None => match url {
                Some(url) => sinks.push(SinkConfig {
                    name: API_SINK.into(),
                    kind: SinkKind::Http(HttpSinkConfig {
                        url,
                        token,
                        timeout: timeout.unwrap_or(Duration::from_secs(DEFAULT_API_TIMEOUT_SECS)),
                        verify_tls: verify_tls.unwrap_or(DEFAULT_VERIFY_TLS),
                        ca_file,
                        routes: Vec::new(),
                        idempotency_key,
                        lookups: Default::default(),
                        concurrency: concurrency.unwrap_or(DEFAULT_API_CONCURRENCY),
                        heartbeat_path,
                    }),
                    max_attempts: None,
                }),
                None => {
                    // Only keys that show intent: the defaults may well be uncommented.
                    for key in ["CENTRAL_API_TOKEN", "CENTRAL_API_CA_FILE"] {
                        if let Some(raw) = self.raw.get(key).cloned() {
                            self.problems.push(Problem::sentence(
                                raw.origin.label(key),
                                shown(key, &raw.value),
                                "is set but CENTRAL_API_URL is empty: set CENTRAL_API_URL or remove this key",
                            ));
                        }
                    }
                }
            },
        }
    }
}

/// What a `max_attempts` must be.
const MAX_ATTEMPTS_EXPECTED: &str =
    "a whole number of attempts from 1 to 1000000 (leave it unset to retry forever)";

/// `max_attempts`: at least one attempt (zero would refuse every record unsent).
fn check_max_attempts(n: u32) -> Result<u32, &'static str> {
    if (1..=1_000_000).contains(&n) {
        Ok(n)
    } else {
        Err(MAX_ATTEMPTS_EXPECTED)
    }
}

/// Whether a `CENTRAL_*` key sets something of one sink type (not `*_MAX_ATTEMPTS`, which any
/// sink of that name takes, whatever its type: see [`Loader::env_max_attempts`]).
pub(super) fn is_kind_key(key: &str) -> bool {
    !key.ends_with("_MAX_ATTEMPTS")
}
