//! What the loader holds while it reads: each flat key's raw value and where it came from
//! ([`Origin`]), the variables for `${VAR}`, and the problems met so far; with the small
//! accessors every reading step uses. The reading steps themselves are `impl Loader` blocks in
//! the sibling modules (`env`, `file`, `sinks`, `nats`, `show`), which [`super::loader`] runs in
//! order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::keys::shown;
use crate::problem::Problem;

/// Where a flat value came from.
#[derive(Debug, Clone)]
pub(super) enum Origin {
    Default,
    EnvFile,
    Environment,
    ConfigFile,
}

impl Origin {
    pub(super) fn as_str(&self) -> &'static str {
        match self {
            Origin::Default => "default",
            Origin::EnvFile => ".env",
            Origin::Environment => "environment",
            Origin::ConfigFile => "CONFIG_FILE",
        }
    }

    /// The key as the user wrote it.
    pub(super) fn label(&self, key: &str) -> String {
        match self {
            Origin::ConfigFile => format!("[agent] {}", key.to_ascii_lowercase()),
            _ => key.to_owned(),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Raw {
    pub(super) value: String,
    pub(super) origin: Origin,
}

pub(super) struct Loader {
    pub(super) cwd: PathBuf,
    pub(super) problems: Vec<Problem>,
    pub(super) sources: Vec<String>,
    /// Flat keys, highest precedence already applied.
    pub(super) raw: BTreeMap<&'static str, Raw>,
    /// `.env` plus the process environment, for `${VAR}` (empty values kept).
    pub(super) vars: BTreeMap<String, String>,
}

impl Loader {
    pub(super) fn new(cwd: &Path) -> Self {
        Self {
            cwd: cwd.to_path_buf(),
            problems: Vec::new(),
            sources: Vec::new(),
            raw: BTreeMap::new(),
            vars: BTreeMap::new(),
        }
    }

    pub(super) fn problem(
        &mut self,
        key: impl Into<String>,
        value: Option<String>,
        expected: impl Into<String>,
    ) {
        self.problems.push(Problem::new(key, value, expected));
    }

    pub(super) fn set(&mut self, key: &'static str, value: &str, origin: Origin) {
        self.raw.insert(
            key,
            Raw {
                value: value.trim().to_owned(),
                origin,
            },
        );
    }
}

impl Loader {
    /// Parses `key` with `parse`, or gives `default` when it is not set. A bad value is
    /// recorded as a problem and `default` stands in so the rest can still be checked.
    pub(super) fn parse<T>(
        &mut self,
        key: &'static str,
        default: T,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> T {
        self.parse_opt(key, parse).unwrap_or(default)
    }

    pub(super) fn parse_opt<T>(
        &mut self,
        key: &'static str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let raw = self.raw.get(key)?.clone();
        match parse(&raw.value) {
            Ok(value) => Some(value),
            Err(expected) => {
                self.problem(
                    raw.origin.label(key),
                    Some(shown(key, &raw.value)),
                    expected,
                );
                None
            }
        }
    }

    pub(super) fn text(&self, key: &str) -> Option<String> {
        self.raw.get(key).map(|r| r.value.clone())
    }

    pub(super) fn label(&self, key: &str) -> String {
        self.raw
            .get(key)
            .map(|r| r.origin.label(key))
            .unwrap_or_else(|| key.to_owned())
    }

    /// A route's action and entity filters (`*` or absent: any) must be valid names; each bad
    /// one is a problem at `<at>.<field>`.
    pub(super) fn check_route_names(&mut self, at: &str, fields: &[(&str, &Option<String>)]) {
        for (field, name) in fields {
            if let Some(name) = name
                && name != "*"
                && let Err(err) = estafeta_staging::validate_name(field, name)
            {
                self.problem(
                    format!("{at}.{field}"),
                    Some(name.clone()),
                    super::checks::invalid_reason(err),
                );
            }
        }
    }
}
