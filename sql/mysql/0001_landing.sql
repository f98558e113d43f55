-- Landing table: one row per delivered record. The record's id is its idempotency key, so a
-- resend (after a crash or a timeout) inserts nothing. Lengths follow the staging store's
-- limits: names 64 bytes, keys 512. JSON is LONGTEXT with a JSON_VALID check on MariaDB and a
-- native type on MySQL. Times are UTC (the session sets time_zone = '+00:00').
CREATE TABLE IF NOT EXISTS estafeta_records (
    id              BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    idempotency_key VARCHAR(64)     NOT NULL,
    agent_id        VARCHAR(255)    NOT NULL,
    seq             BIGINT          NOT NULL,
    action          VARCHAR(64)     NOT NULL,
    entity          VARCHAR(64)     NOT NULL,
    record_key      VARCHAR(512)    NULL,
    payload         JSON            NOT NULL,
    staged_at       DATETIME(6)     NOT NULL,
    delivered_at    DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    UNIQUE KEY estafeta_records_idempotency_key (idempotency_key),
    KEY estafeta_records_entity_key (entity, record_key),
    KEY estafeta_records_agent_seq (agent_id, seq)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
