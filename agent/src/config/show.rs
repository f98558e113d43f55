//! What `check-config` shows: every flat key with its origin (unset keys with the table's
//! default), and the effective configuration, secrets and URL passwords hidden.

use std::collections::BTreeMap;

use super::DEFAULT_KEY_FIELD;
use super::keys;
use super::parse::default_agent_id;
use super::parse::secs;
use super::raw::{Loader, Origin};
use super::{Config, Setting};
use crate::redact::url as redact_url;
use crate::sinks::SinkKind;
use crate::sinks::http::HttpRoute;

impl Config {
    /// The effective configuration as (key, shown value): secrets are `***`, passwords inside
    /// URLs are `***`.
    pub fn redacted(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        let mut push = |key: &str, value: String| out.push((key.to_owned(), value));
        push("CRONTAB", self.crontab.clone());
        push(
            "TZ",
            self.tz
                .as_ref()
                .map(|tz| tz.name().to_owned())
                .unwrap_or_else(|| "(local time)".into()),
        );
        push("STAGING_AREA_PATH", self.staging_path.display().to_string());
        push("FAILED_DIR", self.failed_dir().display().to_string());
        push(
            "STAGING_KEY_FILE",
            match (&self.staging_key_file, &self.staging_keys) {
                (Some(path), Some(keys)) => format!(
                    "{} (keys {}; new data sealed with {})",
                    path.display(),
                    keys.ids().join(", "),
                    keys.current_id()
                ),
                (Some(path), None) => path.display().to_string(),
                (None, _) => "(no encryption)".into(),
            },
        );
        push(
            "INBOX_PATH",
            self.inbox_path
                .as_ref()
                .map_or_else(|| "(none)".to_owned(), |p| p.display().to_string()),
        );
        push(
            "STAGING_MAX_BYTES",
            self.staging_max_bytes
                .map(|b| b.to_string())
                .unwrap_or_else(|| "(no limit)".into()),
        );
        push(
            "MIN_FREE_DISK_MB",
            format!(
                "{} ({} bytes; STAGING_MIN_FREE_BYTES is the same setting)",
                self.staging_min_free_bytes >> 20,
                self.staging_min_free_bytes
            ),
        );
        push(
            "KEEP_DELIVERED_DAYS",
            (self.keep_delivered.as_secs() / 86_400).to_string(),
        );
        push("INGEST_ADDR", self.ingest_addr.to_string());
        push("INGEST_TOKEN", shown_secret(self.ingest_token.as_deref()));
        push(
            "INGEST_ALLOWED_HOSTS",
            if self.ingest_allowed_hosts.is_empty() {
                "(none: localhost, 127.0.0.1, [::1] and INGEST_ADDR only)".into()
            } else {
                self.ingest_allowed_hosts.join(",")
            },
        );
        push("MAX_BODY_BYTES", self.max_body_bytes.to_string());
        push("INGEST_BODY_TIMEOUT_SECS", secs(self.ingest_body_timeout));
        push(
            "INGEST_TLS_CERT",
            self.ingest_tls.as_ref().map_or_else(
                || "(none: clear HTTP)".to_owned(),
                |tls| tls.cert.display().to_string(),
            ),
        );
        if let Some(tls) = &self.ingest_tls {
            push("INGEST_TLS_KEY", tls.key.display().to_string());
        }
        push(
            "INGEST_ALLOW_PLAINTEXT",
            self.ingest_allow_plaintext.to_string(),
        );
        push("FLUSH_ON_WRITE", self.flush_on_write.to_string());
        push("MAX_RECORDS", self.max_records.to_string());
        push("BATCH_SIZE", self.batch_size.to_string());
        push("DATABASE_BATCH_SIZE", self.database_batch_size.to_string());
        push("DRY_RUN", self.dry_run.to_string());
        push("RETRY_BASE_SECS", secs(self.retry_base));
        push("RETRY_MAX_SECS", secs(self.retry_max));
        push("SHUTDOWN_GRACE_SECS", secs(self.shutdown_grace));
        push("AGENT_ID", self.agent_id.clone());
        push("HEARTBEAT_SECS", secs(self.heartbeat));
        push(
            "LOG_DIR",
            self.log_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|| "(stderr only)".into()),
        );
        push("LOG_RETENTION_DAYS", self.log_retention_days.to_string());
        push("LOG_LEVEL", self.log_level.clone());
        push(
            "UPDATE_URL",
            self.update
                .url
                .as_deref()
                .map_or_else(|| "(updates off)".to_owned(), redact_url),
        );
        push(
            "UPDATE_CRONTAB",
            self.update
                .crontab
                .clone()
                .unwrap_or_else(|| "(no automatic checks)".into()),
        );
        push(
            "UPDATE_PUBLIC_KEY",
            format!(
                "{} key(s) configured, {} built in",
                self.update.keys.len(),
                crate::update::keys::all(&[]).len()
            ),
        );
        push("UPDATE_HEALTH_SECS", secs(self.update.health));
        push("UPDATE_ALLOW_HTTP", self.update.allow_http.to_string());
        push(
            "UPDATE_CA_FILE",
            self.update
                .ca_file
                .as_ref()
                .map_or_else(|| "(not set)".to_owned(), |p| p.display().to_string()),
        );
        for sink in &self.sinks {
            let key = |field: &str| format!("sinks.{}.{field}", sink.name);
            match &sink.kind {
                SinkKind::Database(db) => {
                    push(&key("type"), "database".into());
                    push(&key("url"), redact_url(&db.url));
                    if let Some(apply) = &db.apply {
                        let files: Vec<String> = apply
                            .statements()
                            .map(|s| format!("{}.{}", s.entity, s.action))
                            .collect();
                        push(
                            &key("apply_dir"),
                            format!("{} ({})", apply.dir.display(), files.join(", ")),
                        );
                    }
                }
                SinkKind::Http(http) => {
                    push(&key("type"), "http".into());
                    push(&key("url"), redact_url(&http.url));
                    push(&key("token"), shown_secret(http.token.as_deref()));
                    push(&key("timeout_secs"), secs(http.timeout));
                    push(&key("verify_tls"), http.verify_tls.to_string());
                    push(
                        &key("ca_file"),
                        http.ca_file
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_else(|| "(not set)".into()),
                    );
                    push(&key("concurrency"), http.concurrency.to_string());
                    for (i, route) in http.routes.iter().enumerate() {
                        push(&key(&format!("routes[{i}]")), describe_http_route(route));
                    }
                }
                SinkKind::Nats(nats) => {
                    push(&key("type"), "nats".into());
                    push(&key("url"), redact_url(&nats.url));
                    push(&key("token"), shown_secret(nats.token.as_deref()));
                    push(&key("subject"), nats.subject.clone());
                    push(&key("timeout_secs"), secs(nats.timeout));
                    push(&key("partitions"), nats.partitions.to_string());
                    push(
                        &key("tls_required"),
                        nats.tls_required.map_or_else(
                            || "(default: true beyond loopback)".to_owned(),
                            |b| b.to_string(),
                        ),
                    );
                    for (field, path) in [
                        ("ca_file", &nats.ca_file),
                        ("client_cert", &nats.client_cert),
                        ("client_key", &nats.client_key),
                        ("creds_file", &nats.creds_file),
                        ("nkey_file", &nats.nkey_file),
                    ] {
                        if let Some(path) = path {
                            push(&key(field), path.display().to_string());
                        }
                    }
                    push(&key("create_stream"), nats.stream.is_some().to_string());
                    if let Some(stream) = &nats.stream {
                        push(&key("stream"), stream.name.clone());
                        push(&key("stream_subjects"), stream.subjects.join(", "));
                        push(&key("retention"), stream.retention.as_str().into());
                        push(&key("replicas"), stream.replicas.to_string());
                        push(
                            &key("duplicate_window_secs"),
                            stream
                                .duplicate_window
                                .map(secs)
                                .unwrap_or_else(|| "(server default, 120)".into()),
                        );
                    }
                }
            }
        }
        // Only when set: unset is the default (retry forever) and says nothing new.
        for sink in &self.sinks {
            if let Some(max) = sink.max_attempts {
                push(
                    &format!("sinks.{}.max_attempts", sink.name),
                    max.to_string(),
                );
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            push(
                &format!("routes[{i}]"),
                format!(
                    "action={} entity={} -> {}",
                    route.action.as_deref().unwrap_or("*"),
                    route.entity.as_deref().unwrap_or("*"),
                    route.sinks.join(", ")
                ),
            );
        }
        for (name, entity) in &self.entities {
            push(
                &format!("entities.{name}.key_field"),
                entity
                    .key_field
                    .clone()
                    .unwrap_or_else(|| DEFAULT_KEY_FIELD.into()),
            );
            if entity.schema.is_some() {
                push(&format!("entities.{name}.schema"), "(JSON Schema)".into());
            }
        }
        out
    }
}

pub(super) fn describe_http_route(route: &HttpRoute) -> String {
    let mut text = format!(
        "entity={} action={}",
        route.entity.as_deref().unwrap_or("*"),
        route.action.as_deref().unwrap_or("*")
    );
    if let Some(method) = &route.method {
        text.push_str(&format!(" method={method}"));
    }
    if let Some(path) = &route.path {
        text.push_str(&format!(" path={path}"));
    }
    for name in route.headers.keys() {
        // Header values may be API keys: names only.
        text.push_str(&format!(" header {name}=***"));
    }
    text
}

pub(super) fn shown_secret(secret: Option<&str>) -> String {
    match secret {
        Some(_) => "***".into(),
        None => "(not set)".into(),
    }
}

impl Loader {
    /// Every flat key as loaded, in the table's order: its value shown (secrets hidden) and where
    /// it came from; an unset key shows the table's default.
    pub(super) fn settings(&self, process_env: &BTreeMap<String, String>) -> Vec<Setting> {
        keys::KEY_TABLE
            .iter()
            .map(|key| match self.raw.get(key.name) {
                Some(raw) => Setting {
                    key: key.name.to_owned(),
                    value: keys::shown(key.name, &raw.value),
                    origin: raw.origin.as_str().to_owned(),
                },
                None => Setting {
                    key: key.name.to_owned(),
                    // The two defaults that depend on the machine or on another key.
                    value: match key.name {
                        "AGENT_ID" => default_agent_id(process_env),
                        "INGEST_TOKEN" if self.raw.contains_key("INGEST_TOKEN_FILE") => {
                            "(read from INGEST_TOKEN_FILE)".into()
                        }
                        _ => key.default.shown(),
                    },
                    origin: Origin::Default.as_str().to_owned(),
                },
            })
            .collect()
    }
}
