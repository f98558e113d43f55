//! The PostgreSQL reader of sources: rows with their types kept, prepared statements, and the
//! `after_stage` statements, over the sink's TLS rules.

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
        let statement = client
            .prepare(sql)
            .await
            .map_err(worded)
            .context("the query was refused")?;
        let params: Vec<&(dyn ToSql + Sync)> =
            bound.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let rows = client
            .query(&statement, &params)
            .await
            .map_err(worded)
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

/// SQLSTATE classes whose messages quote a row's values: 22 data exception (`invalid input
/// syntax for type integer: "…"`), 23 integrity constraint (`Key (id)=(…)`), 54 program limit.
const VALUE_CLASSES: &[&str] = &["22", "23", "54"];

/// A database error as a source shows it: its SQLSTATE, and PostgreSQL's message unless the
/// class quotes a row's values. A source's error is logged and shown by `GET /v1/status`,
/// `/metrics` readers, the status page and `estafeta sources`, where patient data never goes.
fn worded(err: tokio_postgres::Error) -> anyhow::Error {
    let Some(db) = err.as_db_error() else {
        return anyhow::Error::new(err);
    };
    let code = db.code().code();
    if VALUE_CLASSES.iter().any(|class| code.starts_with(class)) {
        anyhow::anyhow!(
            "PostgreSQL {code}: a value in the source's rows was refused (the database's message quotes it, so it is not shown); run the query by hand to see which, then cast or filter it in the query"
        )
    } else {
        anyhow::anyhow!("PostgreSQL {code}: {}", db.message())
    }
}

pub async fn execute_each(url: &str, sql: &str, sets: &[Vec<Param>]) -> anyhow::Result<()> {
    let (mut client, connection) = connect(url).await?;
    let result = async {
        let tx = client.transaction().await.context("cannot begin")?;
        let statement = tx
            .prepare(sql)
            .await
            .map_err(worded)
            .context("the statement was refused")?;
        for set in sets {
            let params: Vec<&(dyn ToSql + Sync)> =
                set.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            tx.execute(&statement, &params)
                .await
                .map_err(worded)
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
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
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
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
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
            Type::JSON | Type::JSONB => serde_json::from_str::<Value>(&text(self))?.to_sql(ty, out),
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
