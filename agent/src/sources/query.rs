//! Runs a source's query on its database and hands back rows as (column, JSON value) pairs.
//!
//! One connection per page: a source reads on a schedule, and a connection that is opened,
//! used and closed can never be left broken or holding locks between cycles. Types are kept:
//! integers and floats become JSON numbers, booleans and NULL stay what they are, decimals
//! become strings with every digit (a JSON number would round them), timestamps with a zone
//! become RFC 3339 in UTC, and timestamps without one keep their wall-clock value without an
//! offset (`2026-11-23T10:30:00`). A column of another type is an error that names it, and
//! the fix is to cast it in the query (`CAST(col AS text)`).

use anyhow::Context as _;
use serde_json::{Number, Value};
use std::collections::BTreeMap;
use std::time::Duration;

use crate::db::Dialect;
use crate::db::apply;
use crate::redact::{self, Secrets};

/// How long connecting, or one query, may take before the cycle fails (and is retried).
const QUERY_TIMEOUT: Duration = Duration::from_secs(120);

/// One row: the columns as the query names them, in order.
pub type Row = Vec<(String, Value)>;

/// What a query returned: its rows, and for each row holding a value that could not be read
/// (text that is not UTF-8, an invalid date, a BLOB in a SQLite column, invalid JSON), why.
/// Such a value is NULL in its row, which the source sets aside rather than stage (the other
/// columns, the checkpoint among them, are read as usual). A column whose *type* estafeta does
/// not read is still an error of the whole query: every row would be refused, and the fix is
/// a cast in the query.
#[derive(Debug, Default)]
pub struct Fetched {
    pub rows: Vec<Row>,
    pub unreadable: BTreeMap<usize, String>,
}

impl Fetched {
    fn push(&mut self, row: Row, problem: Option<String>) {
        if let Some(problem) = problem {
            self.unreadable.insert(self.rows.len(), problem);
        }
        self.rows.push(row);
    }
}

/// Keeps the first problem of a row and reads the value as NULL.
fn or_null(value: anyhow::Result<Value>, problem: &mut Option<String>) -> Value {
    value.unwrap_or_else(|err| {
        problem.get_or_insert_with(|| format!("{err:#}"));
        Value::Null
    })
}

/// A value bound to a named parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl Param {
    /// A checkpoint value (as read from a row) turned back into a parameter.
    pub fn from_json(value: &Value) -> Param {
        match value {
            Value::Null => Param::Null,
            Value::Bool(b) => Param::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Param::Int(i),
                None => Param::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(s) => Param::Text(s.clone()),
            other => Param::Text(other.to_string()),
        }
    }
}

/// Which database a source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Postgres,
    MySql,
    Sqlite,
    /// `odbc:` followed by an ODBC connection string, through unixODBC (Windows: the system's
    /// driver manager): SQL Server, Oracle, InterSystems, … whatever driver is installed.
    Odbc,
}

impl Driver {
    /// The driver for a URL, or what to write instead.
    pub fn of(url: &str) -> Result<Driver, String> {
        let scheme = url
            .split(':')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        match scheme.as_str() {
            "postgres" | "postgresql" => Ok(Driver::Postgres),
            "mysql" | "mariadb" => Ok(Driver::MySql),
            "sqlite" => Ok(Driver::Sqlite),
            "odbc" => Ok(Driver::Odbc),
            _ => Err(format!(
                "expected a postgres://, mysql:// (MariaDB too) or sqlite:// URL, or odbc:<connection string>, got scheme {scheme:?}"
            )),
        }
    }

    /// How `:name` parameters are rewritten: `$n` for PostgreSQL, `?` for the others. ODBC
    /// takes SQLite's rules (no backslash escapes, `[quoted]` identifiers), which are also SQL
    /// Server's.
    fn dialect(self) -> Dialect {
        match self {
            Driver::Postgres => Dialect::Postgres,
            Driver::MySql => Dialect::Mysql,
            Driver::Sqlite | Driver::Odbc => Dialect::Sqlite,
        }
    }

    /// The query with the driver's placeholders, and the parameter name of each; an error
    /// says where the text is wrong.
    pub fn rewrite(self, sql: &str) -> Result<(String, Vec<String>), String> {
        let (sql, fields) = apply::parse(sql, self.dialect()).map_err(|e| format!("line {e}"))?;
        Ok((sql, fields.into_iter().map(|f| f.name).collect()))
    }
}

/// Runs `sql` (with `:name` parameters) on `url` and returns its rows. Parameters the query
/// does not use are ignored; one it uses but is not given is an error.
pub async fn fetch(
    url: &str,
    sql: &str,
    given: &BTreeMap<String, Param>,
) -> anyhow::Result<Fetched> {
    let driver = Driver::of(url).map_err(anyhow::Error::msg)?;
    let (sql, names) = driver
        .rewrite(sql)
        .map_err(|e| anyhow::anyhow!("the query cannot be read, {e}"))?;
    let mut bound = Vec::with_capacity(names.len());
    for name in &names {
        let value = given.get(name).with_context(|| {
            format!(
                "the query uses :{name}, which estafeta does not provide; available: {}",
                given
                    .keys()
                    .map(|k| format!(":{k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        bound.push(value.clone());
    }
    let (shown, secrets) = shown_and_secrets(url);
    let work = async {
        match driver {
            Driver::Postgres => postgres::fetch(url, &sql, &bound).await,
            Driver::MySql => mysql::fetch(url, &sql, &bound).await,
            Driver::Sqlite | Driver::Odbc => {
                let url = url.to_owned();
                let sql = sql.clone();
                tokio::task::spawn_blocking(move || {
                    if driver == Driver::Sqlite {
                        sqlite::fetch(&url, &sql, &bound)
                    } else {
                        odbc::fetch(&url, &sql, &bound)
                    }
                })
                .await
                .context("the reader panicked")?
            }
        }
    };
    match tokio::time::timeout(QUERY_TIMEOUT, work).await {
        Ok(Ok(fetched)) => Ok(fetched),
        Ok(Err(err)) => Err(anyhow::anyhow!(
            "{}: {}",
            shown,
            secrets.scrub(&format!("{err:#}"))
        )),
        Err(_) => anyhow::bail!("{shown}: the query took longer than {QUERY_TIMEOUT:?}"),
    }
}

/// Runs `sql` (with `:name` parameters) on `url` once per set of `sets`, in one transaction
/// where the driver has one: a source's `after_stage` statement.
pub async fn execute_each(
    url: &str,
    sql: &str,
    sets: &[BTreeMap<String, Param>],
) -> anyhow::Result<()> {
    if sets.is_empty() {
        return Ok(());
    }
    let driver = Driver::of(url).map_err(anyhow::Error::msg)?;
    let (sql, names) = driver
        .rewrite(sql)
        .map_err(|e| anyhow::anyhow!("the statement cannot be read, {e}"))?;
    let bound: Vec<Vec<Param>> = sets
        .iter()
        .map(|set| {
            names
                .iter()
                .map(|name| set.get(name).cloned().unwrap_or(Param::Null))
                .collect()
        })
        .collect();
    let (shown, secrets) = shown_and_secrets(url);
    let work = async {
        match driver {
            Driver::Postgres => postgres::execute_each(url, &sql, &bound).await,
            Driver::MySql => mysql::execute_each(url, &sql, &bound).await,
            Driver::Sqlite | Driver::Odbc => {
                let url = url.to_owned();
                let sql = sql.clone();
                tokio::task::spawn_blocking(move || {
                    if driver == Driver::Sqlite {
                        sqlite::execute_each(&url, &sql, &bound)
                    } else {
                        odbc::execute_each(&url, &sql, &bound)
                    }
                })
                .await
                .context("the statement panicked")?
            }
        }
    };
    match tokio::time::timeout(QUERY_TIMEOUT, work).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(anyhow::anyhow!(
            "{}: {}",
            shown,
            secrets.scrub(&format!("{err:#}"))
        )),
        Err(_) => anyhow::bail!("{shown}: the statement took longer than {QUERY_TIMEOUT:?}"),
    }
}

/// Why [`prepare`] failed: the database could not be reached (like an unreachable sink), or it
/// refused the query (a mistake in the file, to fix).
#[derive(Debug)]
pub enum Unprepared {
    Unreachable(String),
    Refused(String),
}

impl Unprepared {
    fn unreachable(err: anyhow::Error) -> Self {
        Unprepared::Unreachable(format!("{err:#}"))
    }
}

/// Prepares a source's query on its database without running it (`check-config`): the
/// database parses it and checks its tables, columns and parameters, so a query the dialect
/// does not accept (`::casts` on MariaDB, say) shows before the first cycle. The query's
/// `:name` parameters are rewritten for the driver as a cycle does.
pub async fn prepare(url: &str, sql: &str) -> Result<(), Unprepared> {
    let driver = Driver::of(url).map_err(Unprepared::Refused)?;
    let (sql, _) = driver
        .rewrite(sql)
        .map_err(|e| Unprepared::Refused(format!("the query cannot be read, {e}")))?;
    let (_, secrets) = shown_and_secrets(url);
    let work = async {
        match driver {
            Driver::Postgres => postgres::prepare(url, &sql).await,
            Driver::MySql => mysql::prepare(url, &sql).await,
            Driver::Sqlite | Driver::Odbc => {
                let url = url.to_owned();
                tokio::task::spawn_blocking(move || {
                    if driver == Driver::Sqlite {
                        sqlite::prepare(&url, &sql)
                    } else {
                        odbc::prepare(&url, &sql)
                    }
                })
                .await
                .unwrap_or_else(|err| {
                    Err(Unprepared::Unreachable(format!(
                        "the check panicked: {err}"
                    )))
                })
            }
        }
    };
    match tokio::time::timeout(PREPARE_TIMEOUT, work).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(Unprepared::Unreachable(e))) => Err(Unprepared::Unreachable(secrets.scrub(&e))),
        Ok(Err(Unprepared::Refused(e))) => Err(Unprepared::Refused(secrets.scrub(&e))),
        Err(_) => Err(Unprepared::Unreachable(format!(
            "no answer within {} s",
            PREPARE_TIMEOUT.as_secs()
        ))),
    }
}

/// How long `check-config` waits for one source's database.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(15);

/// Checks a source URL at start: its scheme, and for PostgreSQL its TLS settings (an unknown
/// `sslmode`, a missing `sslrootcert`, …), so `check-config` shows them rather than the first
/// cycle.
pub fn check_url(url: &str) -> Result<(), String> {
    if Driver::of(url)? == Driver::Postgres {
        crate::db::postgres_tls::PgTls::from_url(url).map_err(|err| format!("{err:#}"))?;
    }
    Ok(())
}

/// Whether a source URL sends its rows in clear text across the network (PostgreSQL
/// `sslmode=disable` to a host beyond loopback), for a WARN at start.
pub fn clear_beyond_loopback(url: &str) -> bool {
    Driver::of(url) == Ok(Driver::Postgres)
        && crate::db::postgres_tls::PgTls::from_url(url).is_ok_and(|pg| pg.clear_beyond_loopback())
}

/// A source URL as shown in logs (password hidden), and the secrets to scrub from messages.
/// An ODBC connection string hides its `PWD=` / `Password=` value, braces and all.
pub fn shown_and_secrets(url: &str) -> (String, Secrets) {
    (redact::url(url), Secrets::of(url))
}

/// A float as a JSON number, or as a string when JSON cannot hold it (NaN, infinities).
fn float(f: f64) -> Value {
    Number::from_f64(f).map_or_else(|| Value::String(f.to_string()), Value::Number)
}

fn unsupported(column: &str, ty: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "column {column:?} has type {ty}, which estafeta does not read; cast it in the query, for example CAST({column} AS text)"
    )
}

mod errors;

mod postgres;

mod mysql;

mod sqlite;

mod odbc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drivers_come_from_the_scheme() {
        assert_eq!(Driver::of("postgres://u@h/db"), Ok(Driver::Postgres));
        assert_eq!(Driver::of("mysql://root@127.0.0.1/test"), Ok(Driver::MySql));
        assert_eq!(Driver::of("sqlite://./hospital.db"), Ok(Driver::Sqlite));
        assert_eq!(
            Driver::of("odbc:Driver={ODBC Driver 18 for SQL Server};Server=x"),
            Ok(Driver::Odbc)
        );
        assert!(Driver::of("mssql://x").unwrap_err().contains("mssql"));
    }

    #[test]
    fn odbc_passwords_are_hidden() {
        let (shown, secrets) =
            shown_and_secrets("odbc:Driver={PostgreSQL Unicode};Server=h;Uid=leitor;PWD=s3cr3t;");
        assert_eq!(
            shown,
            "odbc:Driver={PostgreSQL Unicode};Server=h;Uid=leitor;PWD=***;"
        );
        assert_eq!(secrets.scrub("login s3cr3t failed"), "login *** failed");
        // Braces may hold a `;`, and `}}` is an escaped `}`.
        let (shown, secrets) = shown_and_secrets("odbc:DSN=x;PWD={a;b}}c};UID=u");
        assert_eq!(shown, "odbc:DSN=x;PWD=***;UID=u");
        assert_eq!(secrets.scrub("login a;b}c failed"), "login *** failed");
    }
}
