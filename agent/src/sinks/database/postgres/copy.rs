//! Rows in PostgreSQL's binary COPY format (`tokio_postgres::binary_copy`), for the landing
//! table (`sql/postgres/copy_records.sql`) and the connection's temporary `estafeta_incoming`
//! (`sql/postgres/copy_incoming.sql`), which share the column list and so the row encoding.

use std::error::Error;

use bytes::{BufMut as _, Bytes, BytesMut};
use tokio_postgres::CopyInSink;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use crate::sinks::database::landing::LandingRow;

/// The COPY into the landing table, prepared once per connection.
pub(super) const COPY_RECORDS_SQL: &str =
    include_str!("../../../../../sql/postgres/copy_records.sql");
/// The temporary table of the exactly-once path, created once per connection.
pub(super) const INCOMING_TABLE_SQL: &str =
    include_str!("../../../../../sql/postgres/incoming_table.sql");
/// The COPY into that temporary table.
pub(super) const COPY_INCOMING_SQL: &str =
    include_str!("../../../../../sql/postgres/copy_incoming.sql");
/// From the temporary table into the landing table, skipping rows already there.
pub(super) const INSERT_FROM_INCOMING_SQL: &str =
    include_str!("../../../../../sql/postgres/insert_from_incoming.sql");
/// The same, returning the idempotency keys it added (apply mode).
pub(super) const INSERT_FROM_INCOMING_RETURNING_SQL: &str =
    include_str!("../../../../../sql/postgres/insert_from_incoming_returning.sql");

/// The wire type of each column the COPY statements list, in their order. The server reads each
/// value with its column's own binary input, so `VARCHAR` here also fits the temporary table's
/// `TEXT` columns (same encoding), and a value too long for a `VARCHAR(n)` is refused (22001).
const COLUMN_TYPES: [Type; 8] = [
    Type::VARCHAR,     // idempotency_key
    Type::VARCHAR,     // agent_id
    Type::INT8,        // seq
    Type::VARCHAR,     // action
    Type::VARCHAR,     // entity
    Type::VARCHAR,     // record_key (NULL when keyless)
    Type::JSONB,       // payload
    Type::TIMESTAMPTZ, // staged_at
];

/// Writes `rows` into an open COPY … FROM STDIN (FORMAT binary), in order, and ends it, each row
/// with its origin agent or else `agent_id` (the sink's own); the number of rows the server took. An error is the server's (a refused row fails the COPY as a
/// whole) or the connection's.
pub(super) async fn write_rows(
    sink: CopyInSink<Bytes>,
    agent_id: &str,
    rows: &[LandingRow],
) -> Result<u64, tokio_postgres::Error> {
    let writer = BinaryCopyInWriter::new(sink, &COLUMN_TYPES);
    let mut writer = std::pin::pin!(writer);
    for row in rows {
        writer
            .as_mut()
            .write(&[
                &row.idempotency_key,
                &row.agent_id(agent_id),
                &row.seq,
                &row.action,
                &row.entity,
                &row.record_key,
                &JsonText(&row.payload),
                &row.staged_at,
            ])
            .await?;
    }
    writer.finish().await
}

/// A payload's JSON text as a `json` or `jsonb` value: jsonb's binary form is a version byte (1)
/// and the text, which the server parses once, as it would the text format's.
#[derive(Debug)]
struct JsonText<'a>(&'a str);

impl ToSql for JsonText<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        if *ty == Type::JSONB {
            out.put_u8(1);
        }
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSON || *ty == Type::JSONB
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonb_carries_its_version_byte_and_json_does_not() {
        let mut out = BytesMut::new();
        let value = JsonText(r#"{"a":1}"#);
        assert!(matches!(
            value.to_sql(&Type::JSONB, &mut out),
            Ok(IsNull::No)
        ));
        assert_eq!(&out[..], b"\x01{\"a\":1}");
        out.clear();
        assert!(matches!(
            value.to_sql(&Type::JSON, &mut out),
            Ok(IsNull::No)
        ));
        assert_eq!(&out[..], b"{\"a\":1}");
        assert!(value.to_sql_checked(&Type::TEXT, &mut out).is_err());
    }

    #[test]
    fn the_copy_statements_list_the_columns_in_the_encoded_order() {
        let columns =
            "(idempotency_key, agent_id, seq, action, entity, record_key, payload, staged_at)";
        for sql in [COPY_RECORDS_SQL, COPY_INCOMING_SQL] {
            assert!(sql.contains(columns), "{sql}");
            assert!(sql.contains("FORMAT binary"), "{sql}");
        }
        assert_eq!(COLUMN_TYPES.len(), columns.split(',').count());
    }
}
