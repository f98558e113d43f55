-- One record, executed per row inside the batch's transaction. A resend is skipped; a row that
-- breaks a CHECK fails alone (ABORT undoes only its own statement).
INSERT INTO estafeta_records
    (idempotency_key, agent_id, seq, action, entity, record_key, payload, staged_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
ON CONFLICT (idempotency_key) DO NOTHING
