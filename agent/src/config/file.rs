//! The TOML file named by `CONFIG_FILE`: its shape (`[agent]`, `[[sinks]]`, `[[routes]]`,
//! `[entities]`, `[[sources]]`), `${VAR}` substitution, the `[agent]` table's flat keys, and the
//! routes and entities it declares.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::checks::{invalid_reason, read_schema};
use super::env::expand;
use super::keys::KEYS;
use super::raw::{Loader, Origin};
use super::{EntityConfig, Route};

/// The TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    /// Flat keys in lowercase (checked by hand, to name the unknown ones).
    #[serde(default)]
    pub(super) agent: BTreeMap<String, toml::Value>,
    #[serde(default)]
    pub(super) sinks: Vec<FileSink>,
    #[serde(default)]
    pub(super) routes: Vec<FileRoute>,
    #[serde(default)]
    pub(super) entities: BTreeMap<String, FileEntity>,
    #[serde(default)]
    pub(super) sources: Vec<crate::sources::FileSource>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum FileSinkType {
    Http,
    Database,
    Nats,
}

impl FileSinkType {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            FileSinkType::Http => "http",
            FileSinkType::Database => "database",
            FileSinkType::Nats => "nats",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSink {
    pub(super) name: String,
    #[serde(rename = "type")]
    pub(super) kind: FileSinkType,
    pub(super) url: String,
    pub(super) token: Option<String>,
    pub(super) timeout_secs: Option<f64>,
    pub(super) verify_tls: Option<bool>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) concurrency: Option<usize>,
    #[serde(default)]
    pub(super) routes: Vec<FileHttpRoute>,
    /// http: where heartbeats go, `PUT {url}/{heartbeat_path}` (`{agent_id}` allowed).
    pub(super) heartbeat_path: Option<String>,
    /// nats: subject template (default `estafeta.{entity}.{action}`).
    pub(super) subject: Option<String>,
    /// nats: create the stream when it does not exist (default false).
    pub(super) create_stream: Option<bool>,
    /// nats: the stream's name (default `ESTAFETA`), with `create_stream`.
    pub(super) stream: Option<String>,
    /// nats: the stream's subjects (default: the template with `*` for placeholders).
    pub(super) stream_subjects: Option<Vec<String>>,
    /// nats: `limits` (default), `interest` or `workqueue`.
    pub(super) retention: Option<String>,
    /// nats: stream replicas, 1 to 5 (default 1).
    pub(super) replicas: Option<usize>,
    /// nats: the stream's duplicate window in seconds (default: the server's, 120).
    pub(super) duplicate_window_secs: Option<f64>,
    /// nats: TLS on `nats://` whatever the server says (default: beyond loopback).
    pub(super) tls_required: Option<bool>,
    /// nats: client certificate (PEM) and its key, for mTLS.
    pub(super) client_cert: Option<PathBuf>,
    pub(super) client_key: Option<PathBuf>,
    /// nats: a `.creds` file (user JWT and NKey seed).
    pub(super) creds_file: Option<PathBuf>,
    /// nats: a file holding a user NKey seed.
    pub(super) nkey_file: Option<PathBuf>,
    /// nats: publish over this many partitions, a `.p<k>` subject token by a hash of the
    /// record's key (like `CENTRAL_NATS_PARTITIONS`, which overrides it; default 0: none).
    pub(super) partitions: Option<u32>,
    /// Database sinks: folder of `<entity>.<action>.sql` apply statements (apply mode),
    /// relative to the TOML file.
    pub(super) apply_dir: Option<PathBuf>,
    pub(super) connections: Option<usize>,
    /// Database (PostgreSQL): a transaction-mode pooler such as PgBouncer is in between, so
    /// no prepared statement outlives its transaction.
    pub(super) transaction_pooling: Option<bool>,
    /// http: the `Idempotency-Key` template; database: the landing key's template
    /// (`sinks::record_template`).
    pub(super) idempotency_key: Option<String>,
    /// http: mapping files for body templates, `{ name = "file.json" }` relative to the TOML
    /// file (`map(name, code)` in a template).
    pub(super) maps: Option<BTreeMap<String, PathBuf>>,
    /// http: catalogs the API serves, for body templates (`catalog(name, id)`).
    pub(super) catalogs: Option<BTreeMap<String, FileCatalog>>,
    /// Any sink: after this many transient failures a record becomes a dead letter (default:
    /// retry forever).
    pub(super) max_attempts: Option<u32>,
}

impl FileSink {
    /// The optional fields that are set, with the sink types they apply to.
    pub(super) fn typed_fields(&self) -> Vec<(&'static str, bool, &'static [FileSinkType])> {
        use FileSinkType::{Database, Http, Nats};
        vec![
            ("token", self.token.is_some(), &[Http, Nats]),
            ("timeout_secs", self.timeout_secs.is_some(), &[Http, Nats]),
            ("verify_tls", self.verify_tls.is_some(), &[Http]),
            ("ca_file", self.ca_file.is_some(), &[Http, Nats]),
            ("concurrency", self.concurrency.is_some(), &[Http]),
            ("routes", !self.routes.is_empty(), &[Http]),
            ("heartbeat_path", self.heartbeat_path.is_some(), &[Http]),
            ("subject", self.subject.is_some(), &[Nats]),
            ("create_stream", self.create_stream.is_some(), &[Nats]),
            ("stream", self.stream.is_some(), &[Nats]),
            ("stream_subjects", self.stream_subjects.is_some(), &[Nats]),
            ("retention", self.retention.is_some(), &[Nats]),
            ("replicas", self.replicas.is_some(), &[Nats]),
            (
                "duplicate_window_secs",
                self.duplicate_window_secs.is_some(),
                &[Nats],
            ),
            ("tls_required", self.tls_required.is_some(), &[Nats]),
            ("client_cert", self.client_cert.is_some(), &[Nats]),
            ("client_key", self.client_key.is_some(), &[Nats]),
            ("creds_file", self.creds_file.is_some(), &[Nats]),
            ("nkey_file", self.nkey_file.is_some(), &[Nats]),
            ("partitions", self.partitions.is_some(), &[Nats]),
            ("apply_dir", self.apply_dir.is_some(), &[Database]),
            ("connections", self.connections.is_some(), &[Database]),
            (
                "transaction_pooling",
                self.transaction_pooling.is_some(),
                &[Database],
            ),
            ("maps", self.maps.is_some(), &[Http]),
            ("catalogs", self.catalogs.is_some(), &[Http]),
            (
                "idempotency_key",
                self.idempotency_key.is_some(),
                &[Http, Database],
            ),
        ]
    }
}

/// A catalog of an HTTP sink: `GET {url}{path}`, items matched on `key`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCatalog {
    pub(super) path: String,
    pub(super) key: String,
    pub(super) ttl_secs: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileHttpRoute {
    pub(super) entity: Option<String>,
    pub(super) action: Option<String>,
    pub(super) method: Option<String>,
    pub(super) path: Option<String>,
    #[serde(default)]
    pub(super) headers: BTreeMap<String, String>,
    /// The `Idempotency-Key` template of this route's records.
    pub(super) idempotency_key: Option<String>,
    /// A template file (relative to the TOML file) for the request body.
    pub(super) body_template: Option<PathBuf>,
    /// The body's `Content-Type` (default: by the template's extension).
    pub(super) content_type: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRoute {
    pub(super) action: Option<String>,
    pub(super) entity: Option<String>,
    pub(super) sinks: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileEntity {
    pub(super) key_field: Option<String>,
    pub(super) schema: Option<PathBuf>,
}

/// HTTP methods a route may use.
pub(super) const METHODS: &[&str] = &["POST", "PUT", "PATCH", "DELETE", "GET"];

impl Loader {
    /// Reads and parses `CONFIG_FILE`, with `${VAR}` substituted. Returns the file and its folder.
    pub(super) fn read_config_file(&mut self) -> (FileConfig, PathBuf) {
        let Some(raw) = self.raw.get("CONFIG_FILE").cloned() else {
            return (FileConfig::default(), self.cwd.clone());
        };
        let label = raw.origin.label("CONFIG_FILE");
        let path = self.cwd.join(&raw.value);
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.cwd.clone());
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) => {
                self.problem(
                    label,
                    Some(raw.value.clone()),
                    format!("expected a readable TOML file: {err}"),
                );
                return (FileConfig::default(), dir);
            }
        };
        self.sources.push(format!("CONFIG_FILE {}", path.display()));
        // First pass on the text itself, so unknown keys and wrong types come with a line.
        if let Err(err) = toml::from_str::<FileConfig>(&text) {
            let line = err
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
            let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
            self.problem(
                label,
                Some(raw.value.clone()),
                format!("{at}{}", err.message().trim()),
            );
            return (FileConfig::default(), dir);
        }
        let mut table: toml::Table = match toml::from_str(&text) {
            Ok(table) => table,
            Err(err) => {
                self.problem(label, Some(raw.value.clone()), err.message().to_owned());
                return (FileConfig::default(), dir);
            }
        };
        let before = self.problems.len();
        for (key, value) in table.iter_mut() {
            self.substitute(key, value);
        }
        if self.problems.len() > before {
            return (FileConfig::default(), dir);
        }
        match toml::Value::Table(table).try_into::<FileConfig>() {
            Ok(file) => (file, dir),
            Err(err) => {
                self.problem(label, Some(raw.value.clone()), err.message().to_owned());
                (FileConfig::default(), dir)
            }
        }
    }

    /// Replaces `${VAR}` in every string under `value` with the environment's VAR.
    pub(super) fn substitute(&mut self, path: &str, value: &mut toml::Value) {
        match value {
            toml::Value::String(text) if text.contains("${") => match expand(text, &self.vars) {
                Ok(expanded) => *text = expanded,
                Err(expected) => self.problem(path, Some(text.clone()), expected),
            },
            toml::Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    self.substitute(&format!("{path}[{i}]"), item);
                }
            }
            toml::Value::Table(table) => {
                for (key, item) in table.iter_mut() {
                    self.substitute(&format!("{path}.{key}"), item);
                }
            }
            _ => {}
        }
    }

    /// A flat key from the file's `[agent]` table; the environment wins over it.
    pub(super) fn agent_key(&mut self, key: &str, value: &toml::Value) {
        let upper = key.to_ascii_uppercase();
        let known = KEYS
            .iter()
            .find(|k| **k == upper && **k != "CONFIG_FILE" && key == key.to_ascii_lowercase());
        let Some(known) = known else {
            self.problem(
                format!("[agent] {key}"),
                None,
                format!(
                    "unknown key; expected one of: {}",
                    KEYS.iter()
                        .filter(|k| **k != "CONFIG_FILE")
                        .map(|k| k.to_ascii_lowercase())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            return;
        };
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => {
                self.problem(
                    format!("[agent] {key}"),
                    None,
                    "expected a string, a number or true/false",
                );
                return;
            }
        };
        if !self.raw.contains_key(known) && !text.trim().is_empty() {
            self.set(known, &text, Origin::ConfigFile);
        }
    }
}

impl Loader {
    pub(super) fn routes(
        &mut self,
        file_routes: &[FileRoute],
        names: &BTreeSet<&str>,
    ) -> Vec<Route> {
        let mut routes = Vec::new();
        for (i, route) in file_routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            self.check_route_names(&at, &[("action", &route.action), ("entity", &route.entity)]);
            if route.sinks.is_empty() {
                self.problem(
                    format!("{at}.sinks"),
                    Some("[]".into()),
                    "expected at least one sink name",
                );
            }
            for sink in &route.sinks {
                if !names.contains(sink.as_str()) {
                    self.problem(
                        format!("{at}.sinks"),
                        Some(sink.clone()),
                        format!(
                            "expected the name of a configured sink: {}",
                            names.iter().copied().collect::<Vec<_>>().join(", ")
                        ),
                    );
                }
            }
            routes.push(Route {
                action: route.action.clone().filter(|a| a != "*"),
                entity: route.entity.clone().filter(|e| e != "*"),
                sinks: route.sinks.clone(),
            });
        }
        routes
    }

    pub(super) fn entities(
        &mut self,
        file_entities: BTreeMap<String, FileEntity>,
        file_dir: &Path,
    ) -> BTreeMap<String, EntityConfig> {
        let mut entities = BTreeMap::new();
        for (name, entity) in file_entities {
            let at = format!("entities.{name}");
            if let Err(err) = estafeta_staging::validate_name("entity", &name) {
                self.problem(at.clone(), None, invalid_reason(err));
            }
            if let Some(field) = &entity.key_field
                && field.trim().is_empty()
            {
                self.problem(
                    format!("{at}.key_field"),
                    Some(field.clone()),
                    "expected a payload field name such as id",
                );
            }
            let schema = entity.schema.as_ref().and_then(|path| {
                let path = file_dir.join(path);
                match read_schema(&path) {
                    Ok(schema) => Some(schema),
                    Err(expected) => {
                        self.problem(
                            format!("{at}.schema"),
                            Some(path.display().to_string()),
                            expected,
                        );
                        None
                    }
                }
            });
            entities.insert(
                name,
                EntityConfig {
                    key_field: entity.key_field.filter(|f| !f.trim().is_empty()),
                    schema,
                },
            );
        }
        entities
    }
}
