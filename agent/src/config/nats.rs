//! The NATS JetStream sink's configuration: a `type = "nats"` sink of the TOML file, and the
//! `nats` sink the `CENTRAL_NATS_*` keys define (overriding the file's field by field).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::NATS_SINK;
use super::file::FileSink;
use super::keys::*;
use super::parse::{parse_bool, parse_secs, secs_from_f64};
use super::raw::Loader;
use super::sinks::is_kind_key;
use crate::problem::Problem;
use crate::sinks::nats::shown_nats_urls as redact_url;
use crate::sinks::nats::{NatsSinkConfig, Retention, StreamSettings};
use crate::sinks::{SinkConfig, SinkKind};

impl Loader {
    /// A `type = "nats"` sink of the file.
    pub(super) fn file_nats_sink(
        &mut self,
        at: &str,
        sink: &FileSink,
        file_dir: &Path,
        agent_id: &str,
    ) -> NatsSinkConfig {
        if let Err(expected) = crate::sinks::nats::check_nats_url(&sink.url) {
            self.problem(format!("{at}.url"), Some(redact_url(&sink.url)), expected);
        }
        let timeout = match sink.timeout_secs {
            Some(t) => secs_from_f64(t, false).unwrap_or_else(|expected| {
                self.problem(format!("{at}.timeout_secs"), Some(t.to_string()), expected);
                Duration::from_secs(crate::sinks::nats::DEFAULT_NATS_TIMEOUT_SECS)
            }),
            None => Duration::from_secs(crate::sinks::nats::DEFAULT_NATS_TIMEOUT_SECS),
        };
        let subject = sink
            .subject
            .clone()
            .unwrap_or_else(|| crate::sinks::nats::DEFAULT_SUBJECT.into());
        if let Err(expected) = crate::sinks::nats::check_subject_template(&subject) {
            self.problem(format!("{at}.subject"), Some(subject.clone()), expected);
        }
        // `partitions`: as CENTRAL_NATS_PARTITIONS (which overrides it, in env_nats_sink).
        let partitions = match sink.partitions {
            Some(n) => {
                crate::sinks::nats::parse_partitions(&n.to_string()).unwrap_or_else(|expected| {
                    self.problem(format!("{at}.partitions"), Some(n.to_string()), expected);
                    0
                })
            }
            None => 0,
        };
        let create = sink.create_stream.unwrap_or(DEFAULT_CREATE_STREAM);
        if !create {
            for (field, set) in [
                ("stream", sink.stream.is_some()),
                ("stream_subjects", sink.stream_subjects.is_some()),
                ("retention", sink.retention.is_some()),
                ("replicas", sink.replicas.is_some()),
                (
                    "duplicate_window_secs",
                    sink.duplicate_window_secs.is_some(),
                ),
            ] {
                if set {
                    self.problem(
                        format!("{at}.{field}"),
                        None,
                        "is used only to create the stream: set create_stream = true, or remove it",
                    );
                }
            }
        }
        let stream = create.then(|| {
            let name = sink
                .stream
                .clone()
                .unwrap_or_else(|| crate::sinks::nats::DEFAULT_STREAM.into());
            if let Err(expected) = crate::sinks::nats::check_stream_name(&name) {
                self.problem(format!("{at}.stream"), Some(name.clone()), expected);
            }
            let subjects = sink
                .stream_subjects
                .clone()
                .unwrap_or_else(|| vec![crate::sinks::nats::stream_subject(&subject, partitions)]);
            if subjects.is_empty() || subjects.iter().any(|s| s.trim().is_empty()) {
                self.problem(
                    format!("{at}.stream_subjects"),
                    Some(format!("{subjects:?}")),
                    "expected at least one subject, such as \"estafeta.>\"",
                );
            }
            let retention = match &sink.retention {
                Some(text) => Retention::parse(text).unwrap_or_else(|expected| {
                    self.problem(format!("{at}.retention"), Some(text.clone()), expected);
                    Retention::Limits
                }),
                None => Retention::Limits,
            };
            let replicas = sink.replicas.unwrap_or(1);
            if !(1..=crate::sinks::nats::MAX_REPLICAS).contains(&replicas) {
                self.problem(
                    format!("{at}.replicas"),
                    Some(replicas.to_string()),
                    format!(
                        "expected 1 to {} (at most the cluster's server count)",
                        crate::sinks::nats::MAX_REPLICAS
                    ),
                );
            }
            let duplicate_window = sink.duplicate_window_secs.and_then(|t| {
                secs_from_f64(t, false)
                    .map_err(|expected| {
                        self.problem(
                            format!("{at}.duplicate_window_secs"),
                            Some(t.to_string()),
                            expected,
                        )
                    })
                    .ok()
            });
            StreamSettings {
                name,
                subjects,
                retention,
                replicas,
                duplicate_window,
            }
        });
        let mut config = NatsSinkConfig {
            url: sink.url.clone(),
            token: sink.token.clone().filter(|t| !t.is_empty()),
            subject,
            timeout,
            agent_id: agent_id.to_owned(),
            stream,
            tls_required: sink.tls_required,
            partitions,
            ..Default::default()
        };
        for (field, value, slot) in [
            ("ca_file", &sink.ca_file, &mut config.ca_file),
            ("client_cert", &sink.client_cert, &mut config.client_cert),
            ("client_key", &sink.client_key, &mut config.client_key),
            ("creds_file", &sink.creds_file, &mut config.creds_file),
            ("nkey_file", &sink.nkey_file, &mut config.nkey_file),
        ] {
            *slot = value.as_ref().map(|p| file_dir.join(p));
            if let Some(path) = slot.as_ref()
                && let Err(expected) = check_readable_file(path)
            {
                self.problem(
                    format!("{at}.{field}"),
                    Some(path.display().to_string()),
                    expected,
                );
            }
        }
        self.check_nats_security(&config, &|field: &str| format!("{at}.{field}"));
        config
    }

    /// Checks what one NATS sink's settings say together: a client certificate needs its key,
    /// `tls://` cannot be told not to use TLS, and at most one authentication method.
    fn check_nats_security(&mut self, config: &NatsSinkConfig, label: &dyn Fn(&str) -> String) {
        match (&config.client_cert, &config.client_key) {
            (Some(_), None) => self.problem(
                label("client_key"),
                None,
                "is missing: a client certificate (client_cert) needs its private key; set both or neither",
            ),
            (None, Some(_)) => self.problem(
                label("client_cert"),
                None,
                "is missing: a client key (client_key) needs its certificate; set both or neither",
            ),
            _ => {}
        }
        // Several servers (a cluster): the rules hold for each; their credentials are the same
        // (check_nats_url), so the first server with any stands for all.
        let urls: Vec<reqwest::Url> = crate::sinks::nats::split_nats_urls(&config.url)
            .into_iter()
            .filter_map(|part| reqwest::Url::parse(part).ok())
            .collect();
        let url = urls
            .iter()
            .find(|u| !u.username().is_empty())
            .or(urls.first());
        if config.tls_required == Some(false) && urls.iter().any(|u| u.scheme() == "tls") {
            self.problem(
                label("tls_required"),
                Some("false".into()),
                "contradicts the tls:// URL (tls:// always uses TLS): remove it, or use a nats:// URL",
            );
        }
        let mut methods = Vec::new();
        if let Some(url) = url
            && !url.username().is_empty()
        {
            methods.push(if url.password().is_some() {
                "a user and password in the URL"
            } else {
                "a token in the URL"
            });
        }
        if config.token.is_some() {
            // A token setting replaces a token in the URL (as it always did).
            methods.retain(|m| *m != "a token in the URL");
            methods.push("token");
        }
        if config.nkey_file.is_some() {
            methods.push("nkey_file");
        }
        if config.creds_file.is_some() {
            methods.push("creds_file");
        }
        if methods.len() > 1 {
            self.problem(
                label("url"),
                Some(redact_url(&config.url)),
                format!(
                    "has {} NATS authentication methods ({}); keep only one",
                    methods.len(),
                    methods.join(", ")
                ),
            );
        }
    }

    /// `CENTRAL_NATS_*`: the `nats` sink (overriding the file's, field by field, if it has one).
    pub(super) fn env_nats_sink(&mut self, sinks: &mut Vec<SinkConfig>, agent_id: &str) {
        let url = self.text("CENTRAL_NATS_URL");
        if let Some(url) = &url
            && let Err(expected) = crate::sinks::nats::check_nats_url(url)
        {
            self.problem(
                self.label("CENTRAL_NATS_URL"),
                Some(redact_url(url)),
                expected,
            );
        }
        let token = self.text("CENTRAL_NATS_TOKEN");
        let subject = self.parse_opt("CENTRAL_NATS_SUBJECT", |v| {
            crate::sinks::nats::check_subject_template(v).map(|()| v.to_owned())
        });
        let timeout = self.parse_opt("CENTRAL_NATS_TIMEOUT_SECS", |v| parse_secs(v, false));
        let create_stream = self.parse_opt("CENTRAL_NATS_CREATE_STREAM", parse_bool);
        let stream_name = self.parse_opt("CENTRAL_NATS_STREAM", |v| {
            crate::sinks::nats::check_stream_name(v).map(|()| v.to_owned())
        });
        let tls_required = self.parse_opt("CENTRAL_NATS_TLS_REQUIRED", parse_bool);
        let partitions = self.parse_opt(
            "CENTRAL_NATS_PARTITIONS",
            crate::sinks::nats::parse_partitions,
        );
        let mut files: [(&'static str, Option<PathBuf>); 5] = [
            ("CENTRAL_NATS_CA_FILE", None),
            ("CENTRAL_NATS_CLIENT_CERT", None),
            ("CENTRAL_NATS_CLIENT_KEY", None),
            ("CENTRAL_NATS_CREDS_FILE", None),
            ("CENTRAL_NATS_NKEY_FILE", None),
        ];
        for (key, slot) in &mut files {
            *slot = self
                .text(key)
                .filter(|p| !p.is_empty())
                .map(|p| self.cwd.join(p));
            if let Some(path) = slot.as_ref()
                && let Err(expected) = check_readable_file(path)
            {
                self.problem(self.label(key), Some(path.display().to_string()), expected);
            }
        }
        let [
            (_, ca_file),
            (_, client_cert),
            (_, client_key),
            (_, creds_file),
            (_, nkey_file),
        ] = files;
        let env_security = |nats: &mut NatsSinkConfig| {
            if let Some(partitions) = partitions {
                // The stream's default subjects (for the file's `partitions`, if any) follow:
                // with or without the partition token.
                let default_subjects = [crate::sinks::nats::stream_subject(
                    &nats.subject,
                    nats.partitions,
                )];
                nats.partitions = partitions;
                if let Some(stream) = &mut nats.stream
                    && stream.subjects == default_subjects
                {
                    stream.subjects = vec![crate::sinks::nats::stream_subject(
                        &nats.subject,
                        partitions,
                    )];
                }
            }
            if tls_required.is_some() {
                nats.tls_required = tls_required;
            }
            for (value, slot) in [
                (&ca_file, &mut nats.ca_file),
                (&client_cert, &mut nats.client_cert),
                (&client_key, &mut nats.client_key),
                (&creds_file, &mut nats.creds_file),
                (&nkey_file, &mut nats.nkey_file),
            ] {
                if value.is_some() {
                    slot.clone_from(value);
                }
            }
        };
        let env_label = |field: &str| match field {
            "url" => "CENTRAL_NATS_URL".to_owned(),
            field => format!("CENTRAL_NATS_{}", field.to_ascii_uppercase()),
        };
        match sinks.iter_mut().find(|s| s.name == NATS_SINK) {
            Some(SinkConfig {
                kind: SinkKind::Nats(nats),
                ..
            }) => {
                if let Some(url) = url {
                    nats.url = url;
                }
                if token.is_some() {
                    nats.token = token;
                }
                if let Some(subject) = subject {
                    // The stream's default subjects follow the template.
                    if let Some(stream) = &mut nats.stream
                        && stream.subjects
                            == [crate::sinks::nats::default_stream_subject(&nats.subject)]
                    {
                        stream.subjects =
                            vec![crate::sinks::nats::default_stream_subject(&subject)];
                    }
                    nats.subject = subject;
                }
                if let Some(timeout) = timeout {
                    nats.timeout = timeout;
                }
                match (create_stream, &mut nats.stream) {
                    (Some(false), _) => nats.stream = None,
                    (Some(true), None) => {
                        nats.stream = Some(default_stream(&nats.subject, stream_name.clone()));
                    }
                    _ => {}
                }
                if let (Some(name), Some(stream)) = (stream_name, &mut nats.stream) {
                    stream.name = name;
                }
                if in_section(Section::CentralNats)
                    .any(|k| is_kind_key(k) && self.raw.contains_key(k))
                {
                    env_security(nats);
                    let nats = nats.clone();
                    self.check_nats_security(&nats, &env_label);
                }
            }
            Some(_) => {
                if let Some(key) = in_section(Section::CentralNats)
                    .find(|k| is_kind_key(k) && self.raw.contains_key(*k))
                {
                    self.problem(
                        self.label(key),
                        None,
                        "the CONFIG_FILE already has a sink named \"nats\" of another type; rename that sink",
                    );
                }
            }
            None => match url {
                Some(url) => {
                    let subject =
                        subject.unwrap_or_else(|| crate::sinks::nats::DEFAULT_SUBJECT.into());
                    let stream = create_stream
                        .unwrap_or(DEFAULT_CREATE_STREAM)
                        .then(|| default_stream(&subject, stream_name));
                    let mut nats = NatsSinkConfig {
                        url,
                        token,
                        subject,
                        timeout: timeout.unwrap_or(Duration::from_secs(
                            crate::sinks::nats::DEFAULT_NATS_TIMEOUT_SECS,
                        )),
                        agent_id: agent_id.to_owned(),
                        stream,
                        ..Default::default()
                    };
                    env_security(&mut nats);
                    self.check_nats_security(&nats, &env_label);
                    sinks.push(SinkConfig {
                        name: NATS_SINK.into(),
                        kind: SinkKind::Nats(nats),
                        max_attempts: None,
                    });
                }
                None => {
                    if let Some(raw) = self.raw.get("CENTRAL_NATS_TOKEN").cloned() {
                        self.problems.push(Problem::sentence(
                            raw.origin.label("CENTRAL_NATS_TOKEN"),
                            shown("CENTRAL_NATS_TOKEN", &raw.value),
                            "is set but CENTRAL_NATS_URL is empty: set CENTRAL_NATS_URL or remove this key",
                        ));
                    }
                }
            },
        }
    }
}

/// The stream `create_stream = true` makes when nothing else is said: `ESTAFETA` (or `name`),
/// capturing the template's subjects, limits retention, one replica, the server's window.
pub(super) fn default_stream(subject: &str, name: Option<String>) -> StreamSettings {
    StreamSettings {
        name: name.unwrap_or_else(|| crate::sinks::nats::DEFAULT_STREAM.into()),
        subjects: vec![crate::sinks::nats::default_stream_subject(subject)],
        retention: Retention::Limits,
        replicas: 1,
        duplicate_window: None,
    }
}

/// A file the agent must be able to read at start (a key, a seed, a certificate): opened, not
/// only looked at, so a permission problem is found now and not at the first delivery.
fn check_readable_file(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => Err("expected a file, found a folder".into()),
        Ok(_) => std::fs::File::open(path)
            .map(drop)
            .map_err(|err| format!("expected a file the agent can read: {err}")),
        Err(err) => Err(format!("expected a readable file: {err}")),
    }
}
