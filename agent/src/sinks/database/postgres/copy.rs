//! Rows in PostgreSQL's binary COPY format, encoded here and sent in large pieces, for the landing
//! table (`sql/postgres/copy_records.sql`) and the connection's temporary `estafeta_incoming`
//! (`sql/postgres/copy_incoming.sql`), which share the column list and so the row encoding.

use std::error::Error;

use bytes::{BufMut as _, Bytes, BytesMut};
use futures_util::SinkExt as _;
use tokio_postgres::CopyInSink;
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

/// Encoded rows handed to the connection at once. tokio-postgres' own `BinaryCopyInWriter`
/// hands over every 4 KiB, and its connection task takes one piece at a time (a channel of one):
/// 250 hand-offs between two tasks, with their wake-ups, per 1,000 rows of 1 KB. Pieces of
/// 64 KiB take 16 times fewer, while the server still gets its first rows after ~60 of them
/// are encoded, not after the whole part.
const PIECE_BYTES: usize = 64 * 1024;

/// The binary COPY format's signature, flags and header extension length.
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// What a COPY of rows failed on.
#[derive(Debug)]
pub(super) enum CopyError {
    /// The server refused the COPY (a refused row fails it as a whole) or the connection failed.
    Server(tokio_postgres::Error),
    /// A row could not be encoded (a value out of its column type's range): nothing of the
    /// COPY was committed. Inserting row by row isolates it with the server's own error.
    Encode { seq: i64, error: String },
}

impl From<tokio_postgres::Error> for CopyError {
    fn from(err: tokio_postgres::Error) -> Self {
        CopyError::Server(err)
    }
}

/// Writes `rows` into an open COPY … FROM STDIN (FORMAT binary), in order, and ends it, each row
/// with its origin agent or else `agent_id` (the sink's own); the number of rows the server
/// took. Rows are encoded here, in PostgreSQL's binary COPY format, and sent in pieces of
/// [`PIECE_BYTES`]. Dropping the sink before it finishes (an encoding error) aborts the COPY.
pub(super) async fn write_rows(
    sink: CopyInSink<Bytes>,
    agent_id: &str,
    rows: &[LandingRow<'_>],
) -> Result<u64, CopyError> {
    let mut sink = std::pin::pin!(sink);
    let mut buf = BytesMut::with_capacity(PIECE_BYTES + 4096);
    buf.put_slice(HEADER);
    for row in rows {
        encode_row(&mut buf, agent_id, row).map_err(|err| CopyError::Encode {
            seq: row.seq,
            error: err.to_string(),
        })?;
        if buf.len() >= PIECE_BYTES {
            sink.as_mut().send(buf.split().freeze()).await?;
        }
    }
    buf.put_i16(-1); // the trailer
    sink.as_mut().send(buf.freeze()).await?;
    Ok(sink.finish().await?)
}

/// Appends one row: its field count, then each value as its length (-1: NULL) and its bytes,
/// in the columns' binary input format ([`COLUMN_TYPES`]).
fn encode_row(
    buf: &mut BytesMut,
    agent_id: &str,
    row: &LandingRow<'_>,
) -> Result<(), Box<dyn Error + Sync + Send>> {
    let key: &str = &row.idempotency_key;
    let (action, entity): (&str, &str) = (&row.action, &row.entity);
    let record_key = row.record_key.as_deref();
    let agent = row.agent_id(agent_id);
    let payload = JsonText(&row.payload);
    let values: [&(dyn ToSql + Sync); COLUMN_TYPES.len()] = [
        &key,
        &agent,
        &row.seq,
        &action,
        &entity,
        &record_key,
        &payload,
        &row.staged_at,
    ];
    buf.put_i16(COLUMN_TYPES.len() as i16);
    for (value, ty) in values.iter().zip(&COLUMN_TYPES) {
        let at = buf.len();
        buf.put_i32(0);
        let len = match value.to_sql_checked(ty, buf)? {
            IsNull::Yes => -1,
            IsNull::No => i32::try_from(buf.len() - at - 4)?,
        };
        buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }
    Ok(())
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
    fn a_row_is_its_field_count_then_each_value_after_its_length() {
        let row = LandingRow {
            idempotency_key: "k1".into(),
            seq: 7,
            action: "create".into(),
            entity: "patient".into(),
            record_key: None,
            payload: r#"{"a":1}"#.into(),
            staged_at: chrono::DateTime::from_timestamp(0, 0).expect("the epoch"),
            apply: None,
            origin: None,
        };
        let mut buf = BytesMut::new();
        encode_row(&mut buf, "agent-1", &row).expect("encodes");
        let mut want = 8i16.to_be_bytes().to_vec();
        let seq = 7i64.to_be_bytes();
        for field in [&b"k1"[..], b"agent-1", &seq, b"create", b"patient"] {
            want.extend((field.len() as i32).to_be_bytes());
            want.extend(field);
        }
        want.extend((-1i32).to_be_bytes()); // record_key: NULL
        want.extend(8i32.to_be_bytes());
        want.extend(b"\x01{\"a\":1}");
        // timestamptz: microseconds from 2000-01-01 UTC.
        want.extend(8i32.to_be_bytes());
        want.extend((-946_684_800_000_000i64).to_be_bytes());
        assert_eq!(&buf[..], &want[..]);
        assert_eq!(HEADER.len(), 19, "signature, flags, header extension");
        assert!(HEADER.starts_with(b"PGCOPY\n\xff\r\n\0"));
    }

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
