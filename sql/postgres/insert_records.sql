-- Rows as arrays, one array parameter per column, zipped into rows by UNNEST, so the statement
-- text never depends on the rows. Used for one row at a time, under a savepoint, when PostgreSQL
-- refused the data of a batch sent by COPY (copy_records.sql). A resend is skipped.
-- $1 agent ids; $2 idempotency keys, $3 seqs, $4 actions, $5 entities, $6 record keys (NULL
-- allowed), $7 payloads as JSON text, $8 staged times.
INSERT INTO estafeta_records
    (idempotency_key, agent_id, seq, action, entity, record_key, payload, staged_at)
SELECT r.idempotency_key, r.agent_id, r.seq, r.action, r.entity, r.record_key, r.payload::jsonb, r.staged_at
FROM UNNEST($2::text[], $1::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::timestamptz[])
    AS r (idempotency_key, agent_id, seq, action, entity, record_key, payload, staged_at)
ON CONFLICT (idempotency_key) DO NOTHING
