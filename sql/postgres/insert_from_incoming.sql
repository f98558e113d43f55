-- The copied batch into the landing table, in sequence order; a row whose idempotency key is
-- already there (delivered before) is skipped, so a resend never lands twice.
INSERT INTO estafeta_records
    (idempotency_key, agent_id, seq, action, entity, record_key, payload, staged_at)
SELECT idempotency_key, agent_id, seq, action, entity, record_key, payload, staged_at
FROM estafeta_incoming
ORDER BY seq
ON CONFLICT (idempotency_key) DO NOTHING
