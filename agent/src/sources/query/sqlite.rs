//! The SQLite reader of sources: a read-only connection for the query (a source never writes to
//! the database it reads, but for `after_stage`), values typed per row; errors worded by code.

use super::*;
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{OpenFlags, ToSql};

use super::errors::sqlite_error;

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
    .map_err(sqlite_error)
    .with_context(|| format!("cannot open {}", path.display()))?;
    conn.busy_timeout(QUERY_TIMEOUT)?;
    let tx = conn
        .transaction()
        .map_err(sqlite_error)
        .context("cannot begin")?;
    {
        let mut stmt = tx
            .prepare(sql)
            .map_err(sqlite_error)
            .context("the statement was refused")?;
        for set in sets {
            stmt.execute(rusqlite::params_from_iter(set.iter()))
                .map_err(sqlite_error)
                .context("the statement failed")?;
        }
    }
    tx.commit()
        .map_err(sqlite_error)
        .context("the commit failed")
}

pub fn fetch(url: &str, sql: &str, bound: &[Param]) -> anyhow::Result<Fetched> {
    let path = crate::db::sqlite_path(url)?;
    // Read-only: a source never writes to the database it reads.
    let conn = rusqlite::Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite_error)
    .with_context(|| format!("cannot open {}", path.display()))?;
    conn.busy_timeout(QUERY_TIMEOUT)?;
    let mut stmt = conn
        .prepare(sql)
        .map_err(sqlite_error)
        .context("the query was refused")?;
    let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
    let mut rows = stmt
        .query(rusqlite::params_from_iter(bound.iter()))
        .map_err(sqlite_error)
        .context("the query failed")?;
    let mut out = Fetched::default();
    while let Some(r) = rows
        .next()
        .map_err(sqlite_error)
        .context("the query failed")?
    {
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
