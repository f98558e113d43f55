-- The exactly-once path of a batch (a resend, or apply mode): a temporary table of this
-- connection that the batch is copied into before insert_from_incoming.sql moves the rows that
-- are new. Emptied at every commit, gone with the connection; only the TEMP right on the
-- database is needed (PUBLIC has it by default). Plain types: a value too long for the landing
-- table is refused by the insert, as a row of the batch. Run at the start of every transaction
-- that uses it, so none depends on an earlier one having made it (cheap when it exists);
-- SET LOCAL keeps the "already exists, skipping" notice out of the agent's log.
SET LOCAL client_min_messages = warning;
CREATE TEMP TABLE IF NOT EXISTS estafeta_incoming (
    idempotency_key TEXT        NOT NULL,
    agent_id        TEXT        NOT NULL,
    seq             BIGINT      NOT NULL,
    action          TEXT        NOT NULL,
    entity          TEXT        NOT NULL,
    record_key      TEXT,
    payload         JSONB       NOT NULL,
    staged_at       TIMESTAMPTZ NOT NULL
) ON COMMIT DELETE ROWS
