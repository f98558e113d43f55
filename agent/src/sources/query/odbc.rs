//! The ODBC reader: a connection string after `odbc:`, through unixODBC (Windows: the system's
//! driver manager). Values arrive as the driver's text and are typed back from the column's
//! SQL type.

use super::*;
use odbc_api::{
    ConnectionOptions, Cursor, DataType, Environment, IntoParameter, Nullable, ResultSetMetadata,
    parameter::InputParameter,
};
use std::sync::OnceLock;

use super::errors::odbc_error;

/// One ODBC environment for the process, as ODBC wants.
fn environment() -> anyhow::Result<&'static Environment> {
    static ENV: OnceLock<Result<Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| Environment::new().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot load the ODBC driver manager (install unixODBC: apt install unixodbc): {e}"
            )
        })
}

fn parameters(bound: &[Param]) -> Vec<Box<dyn InputParameter>> {
    bound
        .iter()
        .map(|p| -> Box<dyn InputParameter> {
            match p {
                Param::Null => Box::new(Nullable::<i64>::null()),
                Param::Bool(b) => Box::new(odbc_api::Bit::from_bool(*b)),
                Param::Int(i) => Box::new(*i),
                Param::Float(f) => Box::new(*f),
                Param::Text(s) => Box::new(s.clone().into_parameter()),
            }
        })
        .collect()
}

/// A connection through the driver manager, with the connection string after `odbc:`.
fn connect(url: &str) -> anyhow::Result<odbc_api::Connection<'static>> {
    let connection_string = &url["odbc:".len()..];
    environment()?
        .connect_with_connection_string(connection_string, ConnectionOptions::default())
        .map_err(odbc_error)
        .context("cannot connect (is the driver named in Driver={…} installed? see odbcinst -q -d)")
}

/// Prepares `sql` without running it: the driver (or its server) checks it.
pub fn prepare(url: &str, sql: &str) -> Result<(), Unprepared> {
    let conn = connect(url).map_err(|err| Unprepared::Unreachable(format!("{err:#}")))?;
    conn.prepare(sql)
        .map(drop)
        .map_err(|err| Unprepared::Refused(odbc_error(err).to_string()))
}

/// Each set in autocommit: the statement is idempotent, so a set left undone by a failure
/// is done when the whole page is run again.
pub fn execute_each(url: &str, sql: &str, sets: &[Vec<Param>]) -> anyhow::Result<()> {
    let conn = connect(url)?;
    let timeout = Some(QUERY_TIMEOUT.as_secs() as usize);
    for set in sets {
        conn.execute(sql, &parameters(set)[..], timeout)
            .map_err(odbc_error)
            .context("the statement failed")?;
    }
    Ok(())
}

pub fn fetch(url: &str, sql: &str, bound: &[Param]) -> anyhow::Result<Fetched> {
    let conn = connect(url)?;
    let params = parameters(bound);
    let timeout = Some(QUERY_TIMEOUT.as_secs() as usize);
    let Some(mut cursor) = conn
        .execute(sql, &params[..], timeout)
        .map_err(odbc_error)
        .context("the query failed")?
    else {
        return Ok(Fetched::default());
    };
    let columns = cursor.num_result_cols().context("reading the columns")? as u16;
    let mut names = Vec::with_capacity(columns as usize);
    let mut types = Vec::with_capacity(columns as usize);
    for c in 1..=columns {
        names.push(cursor.col_name(c).context("reading a column name")?);
        types.push(cursor.col_data_type(c).context("reading a column type")?);
    }
    let mut out = Fetched::default();
    let mut buf = Vec::new();
    while let Some(mut row) = cursor
        .next_row()
        .map_err(odbc_error)
        .context("the query failed")?
    {
        let mut values = Vec::with_capacity(columns as usize);
        let mut problem = None;
        for (i, (name, ty)) in names.iter().zip(&types).enumerate() {
            let present = row
                .get_text(i as u16 + 1, &mut buf)
                .with_context(|| format!("reading column {name:?}"))?;
            let value = if !present {
                Value::Null
            } else {
                or_null(
                    String::from_utf8(buf.clone())
                        .map(|text| typed(text, ty))
                        .map_err(|_| {
                            anyhow::anyhow!(
                                "column {name:?} is not UTF-8 text; use the driver's Unicode variant"
                            )
                        }),
                    &mut problem,
                )
            };
            values.push((name.clone(), value));
        }
        out.push(values, problem);
    }
    Ok(out)
}

/// A value the driver gave as text, with its SQL type back.
fn typed(text: String, ty: &DataType) -> Value {
    match ty {
        DataType::TinyInt | DataType::SmallInt | DataType::Integer | DataType::BigInt => text
            .trim()
            .parse::<i64>()
            .map_or(Value::String(text), Value::from),
        DataType::Bit => Value::Bool(matches!(text.trim(), "1" | "t" | "true")),
        DataType::Real | DataType::Float { .. } | DataType::Double => text
            .trim()
            .parse::<f64>()
            .map_or(Value::String(text), float),
        DataType::Timestamp { .. } => match crate::sources::parse_naive(text.trim()) {
            Ok(t) => Value::String(crate::sources::naive(t)),
            Err(_) => Value::String(text),
        },
        _ => Value::String(text),
    }
}
