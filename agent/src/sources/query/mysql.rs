//! The MySQL / MariaDB reader of sources: rows with their types kept, prepared statements and
//! the `after_stage` statements, over the sink's TLS rules; server errors worded by their code.

use super::*;
use mysql_async::consts::ColumnType;
use mysql_async::prelude::Queryable;
use mysql_async::{Params, Value as My};

use super::errors::mysql_error;

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
            err.message(|err| format!("{:#}", mysql_error(err)))
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
        Err(err) => Err(Unprepared::Refused(format!("{:#}", mysql_error(err)))),
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
            .map_err(mysql_error)
            .context("cannot begin")?;
        for set in sets {
            tx.exec_drop(sql, positional(set))
                .await
                .map_err(mysql_error)
                .context("the statement failed")?;
        }
        tx.commit()
            .await
            .map_err(mysql_error)
            .context("the commit failed")
    }
    .await;
    let _ = conn.disconnect().await;
    result
}

pub async fn fetch(url: &str, sql: &str, bound: &[Param]) -> anyhow::Result<Fetched> {
    let mut conn = connect(url).await?;
    let params = positional(bound);
    let result: anyhow::Result<Fetched> = async {
        let rows: Vec<mysql_async::Row> = conn
            .exec(sql, params)
            .await
            .map_err(mysql_error)
            .context("the query failed")?;
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
                    String::from_utf8(bytes)
                        .map(Value::String)
                        .map_err(|_| anyhow::anyhow!("column {name:?} is not valid UTF-8 text")),
                    &mut problem,
                ),
            },
            My::Date(y, mo, d, h, mi, s, us) => {
                if ty == ColumnType::MYSQL_TYPE_DATE {
                    Value::String(format!("{y:04}-{mo:02}-{d:02}"))
                } else {
                    let t = chrono::NaiveDate::from_ymd_opt(y as i32, mo as u32, d as u32)
                        .and_then(|date| date.and_hms_micro_opt(h as u32, mi as u32, s as u32, us))
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
