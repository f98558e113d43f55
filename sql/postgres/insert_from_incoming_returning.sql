-- Apply mode: insert_from_incoming.sql, returning the idempotency keys it added. A key it does
-- not return was delivered before (a replay), so its apply statement is skipped: the landing row
-- is the marker that the record was applied, written in the same transaction.
INSERT INTO estafeta_records
    (idempotency_key, agent_id, seq, action, entity, record_key, payload, staged_at)
SELECT idempotency_key, agent_id, seq, action, entity, record_key, payload, staged_at
FROM estafeta_incoming
ORDER BY seq
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING idempotency_key
