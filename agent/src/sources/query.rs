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

mod postgres {
    use super::*;
    use crate::db::postgres_tls::PgTls;
    use bytes::BytesMut;
    use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

    /// A connection with libpq's TLS settings, the same rules as the sink's
    /// (`crate::db::postgres_tls`), and the task that drives it.
    async fn connect(
        url: &str,
    ) -> anyhow::Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>)> {
        let mut pg = PgTls::from_url(url)?;
        if pg.config().get_application_name().is_none() {
            pg.config_mut().application_name("estafeta");
        }
        let (client, connection) = pg
            .connect()
            .await
            .map_err(|err| anyhow::anyhow!("cannot connect: {err}"))?;
        Ok((
            client,
            tokio::spawn(async move {
                let _ = connection.await;
            }),
        ))
    }

    /// Prepares `sql` without running it: the server parses it and checks its names.
    pub async fn prepare(url: &str, sql: &str) -> Result<(), Unprepared> {
        let (client, connection) = connect(url).await.map_err(Unprepared::unreachable)?;
        let result = client
            .prepare(sql)
            .await
            .map(drop)
            .map_err(|err| Unprepared::Refused(format!("{:#}", anyhow::Error::new(err))));
        drop(client);
        let _ = connection.await;
        result
    }

    pub async fn fetch(url: &str, sql: &str, bound: &[Param]) -> anyhow::Result<Fetched> {
        let (client, connection) = connect(url).await?;
        let result = async {
            let statement = client.prepare(sql).await.context("the query was refused")?;
            let params: Vec<&(dyn ToSql + Sync)> =
                bound.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            let rows = client
                .query(&statement, &params)
                .await
                .context("the query failed")?;
            let mut out = Fetched::default();
            for r in &rows {
                out.push(row(r)?, None);
            }
            Ok(out)
        }
        .await;
        drop(client);
        let _ = connection.await;
        result
    }

    pub async fn execute_each(url: &str, sql: &str, sets: &[Vec<Param>]) -> anyhow::Result<()> {
        let (mut client, connection) = connect(url).await?;
        let result = async {
            let tx = client.transaction().await.context("cannot begin")?;
            let statement = tx.prepare(sql).await.context("the statement was refused")?;
            for set in sets {
                let params: Vec<&(dyn ToSql + Sync)> =
                    set.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
                tx.execute(&statement, &params)
                    .await
                    .context("the statement failed")?;
            }
            tx.commit().await.context("the commit failed")
        }
        .await;
        drop(client);
        let _ = connection.await;
        result
    }

    fn row(row: &tokio_postgres::Row) -> anyhow::Result<Row> {
        let mut out = Vec::with_capacity(row.len());
        for (i, column) in row.columns().iter().enumerate() {
            let name = column.name();
            let ty = column.type_();
            let value = match *ty {
                Type::BOOL => row.get::<_, Option<bool>>(i).map(Value::Bool),
                Type::INT2 => row.get::<_, Option<i16>>(i).map(Value::from),
                Type::INT4 => row.get::<_, Option<i32>>(i).map(Value::from),
                Type::INT8 => row.get::<_, Option<i64>>(i).map(Value::from),
                Type::OID => row.get::<_, Option<u32>>(i).map(Value::from),
                Type::FLOAT4 => row.get::<_, Option<f32>>(i).map(|f| float(f as f64)),
                Type::FLOAT8 => row.get::<_, Option<f64>>(i).map(float),
                Type::NUMERIC => row.get::<_, Option<Numeric>>(i).map(|n| Value::String(n.0)),
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                    row.get::<_, Option<String>>(i).map(Value::String)
                }
                Type::JSON | Type::JSONB => row.get::<_, Option<Value>>(i),
                Type::TIMESTAMPTZ => row
                    .get::<_, Option<chrono::DateTime<chrono::Utc>>>(i)
                    .map(|t| Value::String(crate::sources::rfc3339(t))),
                Type::TIMESTAMP => row
                    .get::<_, Option<chrono::NaiveDateTime>>(i)
                    .map(|t| Value::String(crate::sources::naive(t))),
                Type::DATE => row
                    .get::<_, Option<chrono::NaiveDate>>(i)
                    .map(|d| Value::String(d.to_string())),
                Type::TIME => row
                    .get::<_, Option<chrono::NaiveTime>>(i)
                    .map(|t| Value::String(t.to_string())),
                Type::UUID => row.get::<_, Option<Uuid>>(i).map(|u| Value::String(u.0)),
                _ => return Err(unsupported(name, ty.name())),
            };
            out.push((name.to_owned(), value.unwrap_or(Value::Null)));
        }
        Ok(out)
    }

    /// NUMERIC read from PostgreSQL's binary form into its exact decimal text.
    struct Numeric(String);

    impl<'a> FromSql<'a> for Numeric {
        fn from_sql(
            _: &Type,
            raw: &'a [u8],
        ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
            let word = |i: usize| -> Result<u16, Box<dyn std::error::Error + Sync + Send>> {
                raw.get(i * 2..i * 2 + 2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]))
                    .ok_or_else(|| "numeric value too short".into())
            };
            let ndigits = word(0)? as usize;
            let weight = word(1)? as i16 as i32;
            let sign = word(2)?;
            let dscale = word(3)? as usize;
            match sign {
                0xC000 => return Ok(Numeric("NaN".into())),
                0xD000 => return Ok(Numeric("Infinity".into())),
                0xF000 => return Ok(Numeric("-Infinity".into())),
                _ => {}
            }
            let digits = (0..ndigits)
                .map(|i| word(4 + i))
                .collect::<Result<Vec<_>, _>>()?;
            // Base-10000 digits; digit k stands for 10000^(weight - k).
            let mut int_part = String::new();
            for k in 0..=weight.max(-1) {
                let d = digits.get(k as usize).copied().unwrap_or(0);
                if int_part.is_empty() {
                    int_part = d.to_string();
                } else {
                    int_part.push_str(&format!("{d:04}"));
                }
            }
            if int_part.is_empty() {
                int_part.push('0');
            }
            let mut frac = String::new();
            let mut k = weight + 1;
            while frac.len() < dscale {
                let d = if k >= 0 {
                    digits.get(k as usize).copied().unwrap_or(0)
                } else {
                    0
                };
                frac.push_str(&format!("{d:04}"));
                k += 1;
            }
            frac.truncate(dscale);
            let mut text = String::new();
            if sign == 0x4000 {
                text.push('-');
            }
            text.push_str(&int_part);
            if dscale > 0 {
                text.push('.');
                text.push_str(&frac);
            }
            Ok(Numeric(text))
        }

        fn accepts(ty: &Type) -> bool {
            *ty == Type::NUMERIC
        }
    }

    /// UUID read as its text form.
    struct Uuid(String);

    impl<'a> FromSql<'a> for Uuid {
        fn from_sql(
            _: &Type,
            raw: &'a [u8],
        ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
            Ok(Uuid(uuid::Uuid::from_slice(raw)?.hyphenated().to_string()))
        }

        fn accepts(ty: &Type) -> bool {
            *ty == Type::UUID
        }
    }

    /// A parameter converted to whatever type PostgreSQL inferred for its placeholder.
    impl ToSql for Param {
        fn to_sql(
            &self,
            ty: &Type,
            out: &mut BytesMut,
        ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
            let text = |p: &Param| match p {
                Param::Text(s) => s.clone(),
                Param::Int(i) => i.to_string(),
                Param::Float(f) => f.to_string(),
                Param::Bool(b) => b.to_string(),
                Param::Null => String::new(),
            };
            let int = |p: &Param| -> Result<i64, Box<dyn std::error::Error + Sync + Send>> {
                match p {
                    Param::Int(i) => Ok(*i),
                    Param::Text(s) => Ok(s.trim().parse()?),
                    other => Err(format!("{other:?} is not an integer").into()),
                }
            };
            if *self == Param::Null {
                return Ok(IsNull::Yes);
            }
            match *ty {
                Type::INT2 => i16::try_from(int(self)?)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(int(self)?)?.to_sql(ty, out),
                Type::INT8 => int(self)?.to_sql(ty, out),
                Type::FLOAT4 | Type::FLOAT8 => {
                    let f: f64 = match self {
                        Param::Float(f) => *f,
                        Param::Int(i) => *i as f64,
                        other => text(other).parse()?,
                    };
                    if *ty == Type::FLOAT4 {
                        (f as f32).to_sql(ty, out)
                    } else {
                        f.to_sql(ty, out)
                    }
                }
                Type::BOOL => match self {
                    Param::Bool(b) => b.to_sql(ty, out),
                    other => text(other).parse::<bool>()?.to_sql(ty, out),
                },
                Type::TIMESTAMPTZ => chrono::DateTime::parse_from_rfc3339(&text(self))?
                    .with_timezone(&chrono::Utc)
                    .to_sql(ty, out),
                Type::TIMESTAMP => crate::sources::parse_naive(&text(self))?.to_sql(ty, out),
                Type::DATE => text(self).parse::<chrono::NaiveDate>()?.to_sql(ty, out),
                Type::JSON | Type::JSONB => {
                    serde_json::from_str::<Value>(&text(self))?.to_sql(ty, out)
                }
                _ => text(self).as_str().to_sql(ty, out),
            }
        }

        fn accepts(ty: &Type) -> bool {
            matches!(
                *ty,
                Type::INT2
                    | Type::INT4
                    | Type::INT8
                    | Type::FLOAT4
                    | Type::FLOAT8
                    | Type::BOOL
                    | Type::TIMESTAMPTZ
                    | Type::TIMESTAMP
                    | Type::DATE
                    | Type::JSON
                    | Type::JSONB
                    | Type::TEXT
                    | Type::VARCHAR
                    | Type::BPCHAR
                    | Type::NAME
                    | Type::UNKNOWN
            )
        }

        to_sql_checked!();
    }
}

mod mysql {
    use super::*;
    use mysql_async::consts::ColumnType;
    use mysql_async::prelude::Queryable;
    use mysql_async::{Params, Value as My};

    fn positional(bound: &[Param]) -> Params {
        Params::Positional(
            bound
                .iter()
                .map(|p| match p {
                    Param::Null => My::NULL,
                    Param::Bool(b) => My::Int(*b as i64),
                    Param::Int(i) => My::Int(*i),
                    Param::Float(f) => My::Double(*f),
                    Param::Text(s) => My::Bytes(s.clone().into_bytes()),
                })
                .collect(),
        )
    }

    /// The sink's connection code: the same ssl-mode, ssl-ca, ssl-cert and ssl-key.
    async fn connect(url: &str) -> anyhow::Result<mysql_async::Conn> {
        let target = crate::db::mysql::MysqlTarget::parse(url)?;
        let (conn, _tls) = target.connect().await.map_err(|err| {
            anyhow::anyhow!(
                "cannot connect: {}",
                err.message(|err| format!("{:#}", anyhow::Error::new(err)))
            )
        })?;
        Ok(conn)
    }

    /// Prepares `sql` without running it: the server parses it and checks its names.
    pub async fn prepare(url: &str, sql: &str) -> Result<(), Unprepared> {
        let mut conn = connect(url).await.map_err(Unprepared::unreachable)?;
        let result = match conn.prep(sql).await {
            Ok(statement) => {
                let _ = conn.close(statement).await;
                Ok(())
            }
            Err(err) => Err(Unprepared::Refused(format!(
                "{:#}",
                anyhow::Error::new(err)
            ))),
        };
        let _ = conn.disconnect().await;
        result
    }

    pub async fn execute_each(url: &str, sql: &str, sets: &[Vec<Param>]) -> anyhow::Result<()> {
        let mut conn = connect(url).await?;
        let result: anyhow::Result<()> = async {
            let mut tx = conn
                .start_transaction(mysql_async::TxOpts::default())
                .await
                .context("cannot begin")?;
            for set in sets {
                tx.exec_drop(sql, positional(set))
                    .await
                    .context("the statement failed")?;
            }
            tx.commit().await.context("the commit failed")
        }
        .await;
        let _ = conn.disconnect().await;
        result
    }

    pub async fn fetch(url: &str, sql: &str, bound: &[Param]) -> anyhow::Result<Fetched> {
        let mut conn = connect(url).await?;
        let params = positional(bound);
        let result: anyhow::Result<Fetched> = async {
            let rows: Vec<mysql_async::Row> =
                conn.exec(sql, params).await.context("the query failed")?;
            let mut out = Fetched::default();
            for r in rows {
                let (r, problem) = row(r)?;
                out.push(r, problem);
            }
            Ok(out)
        }
        .await;
        let _ = conn.disconnect().await;
        result
    }

    fn row(mut row: mysql_async::Row) -> anyhow::Result<(Row, Option<String>)> {
        let columns = row.columns();
        let mut out = Vec::with_capacity(columns.len());
        let mut problem = None;
        for (i, column) in columns.iter().enumerate() {
            let name = column.name_str().into_owned();
            let ty = column.column_type();
            let binary = column.character_set() == 63; // the `binary` character set
            let value = match row.take::<My, _>(i).unwrap_or(My::NULL) {
                My::NULL => Value::Null,
                My::Int(i) => Value::from(i),
                My::UInt(u) => Value::from(u),
                My::Float(f) => float(f as f64),
                My::Double(f) => float(f),
                My::Bytes(bytes) => match ty {
                    ColumnType::MYSQL_TYPE_JSON => or_null(
                        serde_json::from_slice(&bytes)
                            .with_context(|| format!("column {name:?} holds invalid JSON")),
                        &mut problem,
                    ),
                    ColumnType::MYSQL_TYPE_DECIMAL | ColumnType::MYSQL_TYPE_NEWDECIMAL => {
                        Value::String(String::from_utf8_lossy(&bytes).into_owned())
                    }
                    _ if binary => return Err(unsupported(&name, "binary")),
                    _ => or_null(
                        String::from_utf8(bytes).map(Value::String).map_err(|_| {
                            anyhow::anyhow!("column {name:?} is not valid UTF-8 text")
                        }),
                        &mut problem,
                    ),
                },
                My::Date(y, mo, d, h, mi, s, us) => {
                    if ty == ColumnType::MYSQL_TYPE_DATE {
                        Value::String(format!("{y:04}-{mo:02}-{d:02}"))
                    } else {
                        let t = chrono::NaiveDate::from_ymd_opt(y as i32, mo as u32, d as u32)
                            .and_then(|date| {
                                date.and_hms_micro_opt(h as u32, mi as u32, s as u32, us)
                            })
                            .with_context(|| format!("column {name:?} holds an invalid date"));
                        or_null(
                            t.map(|t| Value::String(crate::sources::naive(t))),
                            &mut problem,
                        )
                    }
                }
                My::Time(neg, days, h, mi, s, _us) => {
                    let hours = days * 24 + h as u32;
                    Value::String(format!(
                        "{}{hours:02}:{mi:02}:{s:02}",
                        if neg { "-" } else { "" }
                    ))
                }
            };
            out.push((name, value));
        }
        Ok((out, problem))
    }
}

mod sqlite {
    use super::*;
    use rusqlite::types::{ToSqlOutput, ValueRef};
    use rusqlite::{OpenFlags, ToSql};

    impl ToSql for Param {
        fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
            Ok(match self {
                Param::Null => ToSqlOutput::from(rusqlite::types::Null),
                Param::Bool(b) => ToSqlOutput::from(*b),
                Param::Int(i) => ToSqlOutput::from(*i),
                Param::Float(f) => ToSqlOutput::from(*f),
                Param::Text(s) => ToSqlOutput::from(s.as_str()),
            })
        }
    }

    /// Prepares `sql` on a read-only connection without running it.
    pub fn prepare(url: &str, sql: &str) -> Result<(), Unprepared> {
        let path = crate::db::sqlite_path(url).map_err(Unprepared::unreachable)?;
        let conn = rusqlite::Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|err| Unprepared::Unreachable(format!("cannot open {}: {err}", path.display())))?;
        conn.prepare(sql)
            .map(drop)
            .map_err(|err| Unprepared::Refused(err.to_string()))
    }

    /// The only write a source makes to the database it reads.
    pub fn execute_each(url: &str, sql: &str, sets: &[Vec<Param>]) -> anyhow::Result<()> {
        let path = crate::db::sqlite_path(url)?;
        let mut conn = rusqlite::Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("cannot open {}", path.display()))?;
        conn.busy_timeout(QUERY_TIMEOUT)?;
        let tx = conn.transaction().context("cannot begin")?;
        {
            let mut stmt = tx.prepare(sql).context("the statement was refused")?;
            for set in sets {
                stmt.execute(rusqlite::params_from_iter(set.iter()))
                    .context("the statement failed")?;
            }
        }
        tx.commit().context("the commit failed")
    }

    pub fn fetch(url: &str, sql: &str, bound: &[Param]) -> anyhow::Result<Fetched> {
        let path = crate::db::sqlite_path(url)?;
        // Read-only: a source never writes to the database it reads.
        let conn = rusqlite::Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("cannot open {}", path.display()))?;
        conn.busy_timeout(QUERY_TIMEOUT)?;
        let mut stmt = conn.prepare(sql).context("the query was refused")?;
        let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
        let mut rows = stmt
            .query(rusqlite::params_from_iter(bound.iter()))
            .context("the query failed")?;
        let mut out = Fetched::default();
        while let Some(r) = rows.next().context("the query failed")? {
            let mut row = Vec::with_capacity(names.len());
            // SQLite types values, not columns: one row's BLOB is that row's problem.
            let mut problem = None;
            for (i, name) in names.iter().enumerate() {
                let value = match r.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(n) => Value::from(n),
                    ValueRef::Real(f) => float(f),
                    ValueRef::Text(t) => or_null(
                        std::str::from_utf8(t)
                            .map(|t| Value::String(t.to_owned()))
                            .with_context(|| format!("column {name:?} is not valid UTF-8")),
                        &mut problem,
                    ),
                    ValueRef::Blob(_) => or_null(Err(unsupported(name, "BLOB")), &mut problem),
                };
                row.push((name.clone(), value));
            }
            out.push(row, problem);
        }
        Ok(out)
    }
}

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
