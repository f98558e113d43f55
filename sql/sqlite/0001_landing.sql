-- Landing table: one row per delivered record. The record's id is its idempotency key, so a
-- resend (after a crash or a timeout) inserts nothing. SQLite does not enforce VARCHAR
-- lengths, so CHECKs hold the same limits as the other dialects (names 64, keys 512) and the
-- payload must be valid JSON. Times are RFC 3339 text in UTC.
CREATE TABLE IF NOT EXISTS estafeta_records (
    id              INTEGER PRIMARY KEY,
    idempotency_key TEXT    NOT NULL UNIQUE,
    agent_id        TEXT    NOT NULL,
    seq             INTEGER NOT NULL,
    action          TEXT    NOT NULL CHECK (length(action) <= 64),
    entity          TEXT    NOT NULL CHECK (length(entity) <= 64),
    record_key      TEXT             CHECK (length(record_key) <= 512),
    payload         TEXT    NOT NULL CHECK (json_valid(payload)),
    staged_at       TEXT    NOT NULL,
    delivered_at    TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE INDEX IF NOT EXISTS estafeta_records_entity_key ON estafeta_records (entity, record_key);
CREATE INDEX IF NOT EXISTS estafeta_records_agent_seq ON estafeta_records (agent_id, seq);
