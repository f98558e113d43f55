-- One record; prepared once per batch and executed per row inside the batch's transaction.
-- Not INSERT IGNORE, which would turn a bad value into a warning and a mangled row: a resend
-- hits the unique idempotency key and updates nothing.
INSERT INTO estafeta_records
    (idempotency_key, agent_id, seq, action, entity, record_key, payload, staged_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON DUPLICATE KEY UPDATE idempotency_key = idempotency_key
