-- A batch into this connection's estafeta_incoming (incoming_table.sql), binary COPY format.
COPY estafeta_incoming (idempotency_key, agent_id, seq, action, entity, record_key, payload, staged_at)
FROM STDIN (FORMAT binary)
