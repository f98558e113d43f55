-- Bookkeeping: one row per applied migration (sql/postgres/NNNN_*.sql).
CREATE TABLE IF NOT EXISTS estafeta_schema_migrations (
    version    BIGINT       PRIMARY KEY,
    name       VARCHAR(255) NOT NULL,
    applied_at TIMESTAMPTZ  NOT NULL DEFAULT now()
);
