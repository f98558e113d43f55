-- Bookkeeping: one row per applied migration (sql/sqlite/NNNN_*.sql).
CREATE TABLE IF NOT EXISTS estafeta_schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT    NOT NULL,
    applied_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
