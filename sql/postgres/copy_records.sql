-- The fast path of a batch: its rows straight into the landing table, in PostgreSQL's binary
-- COPY format (no text to parse but the payload's JSON, no array to unpack, no plan), in batch
-- order. A COPY is all or nothing: a row already there (a resend) fails it on the unique
-- idempotency key, and the batch goes through incoming_table.sql and insert_from_incoming.sql.
COPY estafeta_records (idempotency_key, agent_id, seq, action, entity, record_key, payload, staged_at)
FROM STDIN (FORMAT binary)
