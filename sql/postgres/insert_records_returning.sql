-- Apply mode, row by row: the insert of insert_records.sql, returning the idempotency keys it added.
-- A key it does not return was delivered before (a replay), so its apply statement is skipped:
-- the landing row is the marker that the record was applied, written in the same transaction.
-- $1 agent ids; $2 idempotency keys, $3 seqs, $4 actions, $5 entities, $6 record keys (NULL
-- allowed), $7 payloads as JSON text, $8 staged times.
INSERT INTO estafeta_records
    (idempotency_key, agent_id, seq, action, entity, record_key, payload, staged_at)
SELECT r.idempotency_key, r.agent_id, r.seq, r.action, r.entity, r.record_key, r.payload::jsonb, r.staged_at
FROM UNNEST($2::text[], $1::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::timestamptz[])
    AS r (idempotency_key, agent_id, seq, action, entity, record_key, payload, staged_at)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING idempotency_key
