//! What the database sinks and the SQL sources share: the [`Dialect`] a URL names, the path
//! in a `sqlite://` URL, and the SQL statement files with named parameters ([`apply`]) that
//! apply mode runs in a sink and a source's query uses, and PostgreSQL connections with libpq's
//! TLS settings ([`postgres_tls`]). Below both `sinks` and `sources`, so neither depends on the
//! other.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::redact;

pub mod apply;
pub mod mysql;
pub mod postgres_tls;

/// The database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Mysql,
    Sqlite,
}

impl Dialect {
    /// Reads the scheme: `postgres://`, `postgresql://`, `mysql://`, `mariadb://`, `sqlite:`.
    pub fn of(url: &str) -> anyhow::Result<Self> {
        let scheme = url
            .split_once(':')
            .map(|(s, _)| s.to_ascii_lowercase())
            .unwrap_or_default();
        match scheme.as_str() {
            "postgres" | "postgresql" => Ok(Dialect::Postgres),
            "mysql" | "mariadb" => Ok(Dialect::Mysql),
            "sqlite" => Ok(Dialect::Sqlite),
            _ => anyhow::bail!(
                "the database URL {:?} is not one Estafeta can use; expected postgres://user@host/db, \
                 mysql://user@host/db (MariaDB too) or sqlite://PATH",
                redact::url(url)
            ),
        }
    }
}

/// The path in `sqlite://PATH` (or `sqlite:PATH`), without a `?query`.
pub fn sqlite_path(url: &str) -> anyhow::Result<PathBuf> {
    let rest = url
        .split_once(':')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("sqlite"))
        .map(|(_, rest)| rest.strip_prefix("//").unwrap_or(rest))
        .with_context(|| format!("{url:?} is not a sqlite:// URL"))?;
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() {
        anyhow::bail!(
            "the SQLite URL {url:?} names no file; expected sqlite://./central.db (relative) or sqlite:///var/lib/estafeta/central.db (absolute)"
        );
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialect_follows_the_scheme() {
        assert_eq!(
            Dialect::of("postgres://u@h/db").ok(),
            Some(Dialect::Postgres)
        );
        assert_eq!(
            Dialect::of("PostgreSQL://u@h/db").ok(),
            Some(Dialect::Postgres)
        );
        assert_eq!(Dialect::of("mariadb://u@h/db").ok(), Some(Dialect::Mysql));
        assert_eq!(
            Dialect::of("sqlite:///tmp/x.db").ok(),
            Some(Dialect::Sqlite)
        );
        let err = Dialect::of("oracle://u:hunter2@h/db").expect_err("unknown scheme");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn sqlite_urls_name_relative_and_absolute_paths() {
        let path = |url: &str| sqlite_path(url).ok();
        assert_eq!(
            path("sqlite://./central.db"),
            Some(PathBuf::from("./central.db"))
        );
        assert_eq!(
            path("sqlite://central.db"),
            Some(PathBuf::from("central.db"))
        );
        assert_eq!(
            path("sqlite:///var/lib/e/c.db"),
            Some(PathBuf::from("/var/lib/e/c.db"))
        );
        assert_eq!(
            path("SQLITE:data/c.db?mode=rwc"),
            Some(PathBuf::from("data/c.db"))
        );
        assert_eq!(path("sqlite://"), None);
    }
}
