//! The loader: gathers the flat keys by precedence (defaults, the TOML `[agent]` table, `.env`,
//! the process environment), parses each one, and collects every mistake as a [`Problem`] so
//! they are all reported at once. The TOML file, the sinks and `check-config`'s view are in the
//! sibling modules, as further `impl Loader` blocks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::checks::{
    GENERATE_TOKEN, check_http_url, check_readable, ingest_exposure_problem,
    ingest_plaintext_problem,
};
use super::file::FileConfig;
use super::keys::*;
use super::parse::*;
use super::raw::{Loader, Origin};
use super::{Config, ConfigError, IngestTls, Inspection};
use crate::crontab::validate_crontab;
use crate::problem::Problem;

impl Loader {
    pub(super) fn run(
        mut self,
        env_file: Option<&Path>,
        process_env: &BTreeMap<String, String>,
    ) -> Inspection {
        let dotenv = self.read_env_file(env_file);
        for (key, value) in &dotenv {
            self.vars.insert(key.clone(), value.clone());
        }
        for (key, value) in process_env {
            self.vars.insert(key.clone(), value.clone());
        }
        for key in KEYS {
            if let Some(value) = process_env.get(*key).filter(|v| !v.trim().is_empty()) {
                self.set(key, value, Origin::Environment);
            } else if let Some(value) = dotenv.get(*key).filter(|v| !v.trim().is_empty()) {
                self.set(key, value, Origin::EnvFile);
            }
        }
        if self.raw.keys().any(|k| process_env.contains_key(*k)) {
            self.sources.push("environment".into());
        }
        let (file, file_dir) = self.read_config_file();
        for (key, value) in &file.agent {
            self.agent_key(key, value);
        }
        let settings = self.settings(process_env);
        let config = self.build(file, &file_dir, process_env);
        let result = if self.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                problems: self.problems,
            })
        };
        Inspection { settings, result }
    }
}

impl Loader {
    pub(super) fn build(
        &mut self,
        file: FileConfig,
        file_dir: &Path,
        process_env: &BTreeMap<String, String>,
    ) -> Config {
        let crontab = self.parse("CRONTAB", DEFAULT_CRONTAB.to_owned(), |v| {
            validate_crontab(v).map(|()| v.to_owned())
        });
        let tz = self.parse_opt("TZ", parse_tz).flatten();

        let is_absolute = self.parse(
            "IS_ABSOLUTE_STAGING_AREA_PATH",
            DEFAULT_IS_ABSOLUTE_STAGING_AREA_PATH,
            parse_bool,
        );
        let staging_text = self
            .text("STAGING_AREA_PATH")
            .unwrap_or_else(|| DEFAULT_STAGING_AREA_PATH.into());
        let staging_given = PathBuf::from(&staging_text);
        if is_absolute && !staging_given.is_absolute() {
            self.problem(
                self.label("STAGING_AREA_PATH"),
                Some(staging_text.clone()),
                "expected an absolute path because IS_ABSOLUTE_STAGING_AREA_PATH is true; give a full path or set IS_ABSOLUTE_STAGING_AREA_PATH=false",
            );
        }
        // As the seed did: a relative path is taken from the working directory.
        let staging_path = if is_absolute {
            staging_given
        } else {
            self.cwd.join(staging_given)
        };
        let failed_dir = self.text("FAILED_DIR").map(|d| self.cwd.join(d));
        let inbox_path = self.text("INBOX_PATH").map(|d| self.cwd.join(d));
        let (staging_key_file, staging_keys) = self.staging_keys();
        let staging_max_bytes = self.parse_opt("STAGING_MAX_BYTES", |v| {
            parse_size(v).and_then(|b| {
                if b == 0 {
                    Err("expected a size above 0 (leave it empty for no limit)".into())
                } else {
                    Ok(b)
                }
            })
        });
        // Two spellings of one setting: MIN_FREE_DISK_MB (whole megabytes, the host guard's
        // name) and STAGING_MIN_FREE_BYTES (any size, for tests on small disks).
        let min_free_bytes = self.parse_opt("STAGING_MIN_FREE_BYTES", parse_size);
        let min_free_mb = self.parse_opt("MIN_FREE_DISK_MB", |v| {
            parse_u64(v, "a whole number of megabytes (MiB), such as 256").and_then(|mb| {
                mb.checked_mul(1024 * 1024)
                    .ok_or_else(|| "expected a number of megabytes below 2^44".to_owned())
            })
        });
        if let (Some(bytes), Some(mb)) = (min_free_bytes, min_free_mb)
            && bytes != mb
        {
            self.problem(
                self.label("MIN_FREE_DISK_MB"),
                self.text("MIN_FREE_DISK_MB"),
                format!("the same limit as STAGING_MIN_FREE_BYTES ({bytes} bytes), which says otherwise; set only one of the two"),
            );
        }
        let staging_min_free_bytes = min_free_mb
            .or(min_free_bytes)
            .unwrap_or(estafeta_staging::DEFAULT_MIN_FREE_BYTES);
        let keep_days = self.parse("KEEP_DELIVERED_DAYS", DEFAULT_KEEP_DELIVERED_DAYS, |v| {
            parse_u64(
                v,
                "a whole number of days (0 deletes delivered records at once)",
            )
        });
        let ingest_addr = self.parse("INGEST_ADDR", DEFAULT_INGEST_ADDR, parse_addr);
        let ingest_token = self.ingest_token();
        let ingest_allowed_hosts = self
            .parse_opt("INGEST_ALLOWED_HOSTS", parse_allowed_hosts)
            .unwrap_or_default();
        let max_body_bytes = self.parse("MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, |v| {
            parse_size(v).and_then(|b| positive_usize(b, "a size above 0 such as 10MiB"))
        });
        let ingest_body_timeout = self.parse(
            "INGEST_BODY_TIMEOUT_SECS",
            Duration::from_secs(DEFAULT_INGEST_BODY_TIMEOUT_SECS),
            |v| parse_secs(v, false),
        );
        let ingest_tls = self.ingest_tls();
        let ingest_allow_plaintext = self.parse(
            "INGEST_ALLOW_PLAINTEXT",
            DEFAULT_INGEST_ALLOW_PLAINTEXT,
            parse_bool,
        );
        let flush_on_write = self.parse("FLUSH_ON_WRITE", DEFAULT_FLUSH_ON_WRITE, parse_bool);
        let max_records = self.parse("MAX_RECORDS", DEFAULT_MAX_RECORDS, |v| {
            parse_u64(v, "a whole number above 0")
                .and_then(|n| positive_usize(n, "a whole number above 0"))
        });
        let batch_size = self.parse("BATCH_SIZE", DEFAULT_BATCH_SIZE, |v| {
            parse_u64(v, "a whole number above 0")
                .and_then(|n| positive_usize(n, "a whole number above 0"))
        });
        let database_batch_size =
            self.parse("DATABASE_BATCH_SIZE", DEFAULT_DATABASE_BATCH_SIZE, |v| {
                parse_u64(v, "a whole number above 0")
                    .and_then(|n| positive_usize(n, "a whole number above 0"))
            });
        let dry_run = self.parse("DRY_RUN", DEFAULT_DRY_RUN, parse_bool);
        let retry_base = self.parse(
            "RETRY_BASE_SECS",
            Duration::from_secs(DEFAULT_RETRY_BASE_SECS),
            |v| parse_secs(v, false),
        );
        let retry_max = self.parse(
            "RETRY_MAX_SECS",
            Duration::from_secs(DEFAULT_RETRY_MAX_SECS),
            |v| parse_secs(v, false),
        );
        if retry_base > retry_max {
            self.problem(
                self.label("RETRY_MAX_SECS"),
                Some(secs(retry_max)),
                format!("expected at least RETRY_BASE_SECS ({})", secs(retry_base)),
            );
        }
        let shutdown_grace = self.parse(
            "SHUTDOWN_GRACE_SECS",
            Duration::from_secs(DEFAULT_SHUTDOWN_GRACE_SECS),
            |v| parse_secs(v, true),
        );
        let agent_id = self
            .parse_opt("AGENT_ID", |v| validate_agent_id(v).map(|()| v.to_owned()))
            .unwrap_or_else(|| default_agent_id(process_env));
        let hostname = crate::hostname::machine_names(process_env)
            .next()
            .unwrap_or_else(|| "unknown".to_owned());
        let heartbeat = self.parse(
            "HEARTBEAT_SECS",
            Duration::from_secs(DEFAULT_HEARTBEAT_SECS),
            |v| parse_secs(v, true),
        );
        let log_dir = self.text("LOG_DIR").map(|d| self.cwd.join(d));
        let log_retention_days =
            self.parse("LOG_RETENTION_DAYS", DEFAULT_LOG_RETENTION_DAYS, |v| {
                parse_u64(v, "a whole number of days (0 keeps every log file)")
            });
        let log_level = self.parse("LOG_LEVEL", DEFAULT_LOG_LEVEL.to_owned(), |v| {
            validate_log_level(v).map(|()| v.to_owned())
        });

        if let Some(problem) = ingest_exposure_problem(ingest_addr, ingest_token.as_deref()) {
            self.problems.push(Problem::sentence(
                self.label("INGEST_ADDR"),
                ingest_addr.to_string(),
                problem,
            ));
        }

        if let Some(problem) =
            ingest_plaintext_problem(ingest_addr, ingest_tls.is_some(), ingest_allow_plaintext)
        {
            self.problems.push(Problem::sentence(
                self.label("INGEST_ADDR"),
                ingest_addr.to_string(),
                problem,
            ));
        }

        let update = self.update_config(process_env);
        let sinks = self.sinks(&file.sinks, file_dir, &agent_id);
        let names: BTreeSet<&str> = sinks.iter().map(|s| s.name.as_str()).collect();
        let routes = self.routes(&file.routes, &names);
        let entities = self.entities(file.entities, file_dir);
        let sql_sources =
            crate::sources::load(&file.sources, file_dir, &self.vars, &mut self.problems);
        let relay = self.relay_settings();

        Config {
            sources: if self.sources.is_empty() {
                vec!["embedded defaults".into()]
            } else {
                self.sources.clone()
            },
            crontab,
            tz,
            staging_path,
            failed_dir,
            staging_key_file,
            staging_keys,
            inbox_path,
            staging_max_bytes,
            staging_min_free_bytes,
            keep_delivered: Duration::from_secs(keep_days.saturating_mul(86_400)),
            ingest_addr,
            ingest_token,
            ingest_allowed_hosts,
            max_body_bytes,
            ingest_body_timeout,
            ingest_tls,
            ingest_allow_plaintext,
            flush_on_write,
            max_records,
            batch_size,
            database_batch_size,
            dry_run,
            retry_base,
            retry_max,
            shutdown_grace,
            agent_id,
            hostname,
            heartbeat,
            log_dir,
            log_retention_days,
            log_level,
            sinks,
            routes,
            entities,
            sql_sources,
            update,
            relay,
        }
    }

    /// `INGEST_TOKEN`, or the content of the file `INGEST_TOKEN_FILE` names (one line, spaces
    /// around it dropped): packaged installs keep a generated token there, readable by the
    /// service and administrators only. Both set: they must agree.
    /// `INGEST_TLS_CERT` and `INGEST_TLS_KEY`: both or neither, both readable and a matching
    /// pair (read now, so a mistake is a configuration error, not a failed start later).
    pub(super) fn ingest_tls(&mut self) -> Option<IngestTls> {
        let cert = self.text("INGEST_TLS_CERT").filter(|v| !v.is_empty());
        let key = self.text("INGEST_TLS_KEY").filter(|v| !v.is_empty());
        let (cert, key) = match (cert, key) {
            (None, None) => return None,
            (Some(cert), Some(key)) => (self.cwd.join(cert), self.cwd.join(key)),
            (Some(_), None) => {
                self.problem(
                    self.label("INGEST_TLS_KEY"),
                    None,
                    "is empty but INGEST_TLS_CERT is set: HTTPS needs the certificate's private key too; set both or neither",
                );
                return None;
            }
            (None, Some(_)) => {
                self.problem(
                    self.label("INGEST_TLS_CERT"),
                    None,
                    "is empty but INGEST_TLS_KEY is set: HTTPS needs the certificate (PEM chain) too; set both or neither",
                );
                return None;
            }
        };
        if let Err(err) = crate::api_tls::acceptor(&cert, &key) {
            self.problem(
                self.label("INGEST_TLS_CERT"),
                Some(cert.display().to_string()),
                format!("expected a PEM certificate chain and its key in INGEST_TLS_KEY: {err:#}"),
            );
            return None;
        }
        Some(IngestTls { cert, key })
    }

    /// `STAGING_KEY_FILE` and its keys; a key file that cannot be used is a problem (the agent
    /// must not start writing in clear what the operator asked to seal).
    #[allow(clippy::type_complexity)]
    fn staging_keys(
        &mut self,
    ) -> (
        Option<PathBuf>,
        Option<std::sync::Arc<estafeta_staging::Keyring>>,
    ) {
        let Some(given) = self.text("STAGING_KEY_FILE") else {
            return (None, None);
        };
        let path = self.cwd.join(&given);
        match estafeta_staging::Keyring::load(&path) {
            Ok(keys) => (Some(path), Some(std::sync::Arc::new(keys))),
            Err(err) => {
                let label = self.label("STAGING_KEY_FILE");
                self.problem(label, Some(given), err.to_string());
                (Some(path), None)
            }
        }
    }

    pub(super) fn ingest_token(&mut self) -> Option<String> {
        let given = self.text("INGEST_TOKEN");
        let Some(file) = self.raw.get("INGEST_TOKEN_FILE").cloned() else {
            return given;
        };
        let label = file.origin.label("INGEST_TOKEN_FILE");
        let path = self.cwd.join(&file.value);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) => {
                self.problem(
                    label,
                    Some(file.value),
                    format!(
                        "could not read the token file ({err}); run this as a user allowed to read it (root, or the service's user: sudo -u estafeta …), or write a token into it with {GENERATE_TOKEN}"
                    ),
                );
                return given;
            }
        };
        let token = text.trim();
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            self.problem(
                label,
                Some(file.value),
                format!(
                    "expected the file to hold one token on one line (it is empty or holds spaces); write one with {GENERATE_TOKEN}"
                ),
            );
            return given;
        }
        if let Some(given) = &given
            && given != token
        {
            self.problem(
                self.label("INGEST_TOKEN"),
                Some("***".into()),
                format!(
                    "differs from the token in INGEST_TOKEN_FILE={}; set only one of the two",
                    file.value
                ),
            );
        }
        Some(token.to_owned())
    }

    pub(super) fn update_config(
        &mut self,
        process_env: &BTreeMap<String, String>,
    ) -> crate::update::UpdateConfig {
        let url = self.parse_opt("UPDATE_URL", |v| check_http_url(v).map(|()| v.to_owned()));
        let crontab = self.parse_opt("UPDATE_CRONTAB", |v| {
            validate_crontab(v).map(|()| v.to_owned())
        });
        if crontab.is_some() && url.is_none() && !self.raw.contains_key("UPDATE_URL") {
            self.problem(
                self.label("UPDATE_CRONTAB"),
                self.text("UPDATE_CRONTAB"),
                "checks need UPDATE_URL (the release manifest's URL); set it, or leave UPDATE_CRONTAB empty",
            );
        }
        let cwd = self.cwd.clone();
        let keys = self
            .parse_opt("UPDATE_PUBLIC_KEY", |v| crate::update::keys::parse(v, &cwd))
            .unwrap_or_default();
        let health = self.parse(
            "UPDATE_HEALTH_SECS",
            Duration::from_secs(crate::update::DEFAULT_HEALTH_SECS),
            |v| parse_secs(v, false),
        );
        // Refused at check time, not here: a clear-text UPDATE_URL must not stop the agent (nor
        // fail the trial of the version that brings this rule); its checks fail and say why.
        let allow_http = self.parse("UPDATE_ALLOW_HTTP", DEFAULT_UPDATE_ALLOW_HTTP, parse_bool);
        let ca_file = self.text("UPDATE_CA_FILE").map(|p| self.cwd.join(p));
        if let Some(ca) = &ca_file
            && let Err(expected) = check_readable(ca)
        {
            self.problem(
                self.label("UPDATE_CA_FILE"),
                Some(ca.display().to_string()),
                expected,
            );
        }
        crate::update::UpdateConfig {
            url,
            crontab,
            keys,
            health,
            allow_http,
            ca_file,
            tmpdir: process_env
                .get("TMPDIR")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from),
            trial: process_env.contains_key(crate::update::trial::TRIAL_ENV),
        }
    }
}
