-- Heartbeats (HEARTBEAT_SECS): one row per agent, upserted on every beat, and a view of the
-- fleet. Applied by the agent's heartbeat itself (not by the landing-table migrations), so a
-- user without CREATE rights still delivers records; a DBA may run this file by hand.
CREATE TABLE IF NOT EXISTS estafeta_agents (
    agent_id                VARCHAR(255) PRIMARY KEY,
    hostname                VARCHAR(255) NOT NULL,
    version                 VARCHAR(64)  NOT NULL,
    started_at              TIMESTAMPTZ  NOT NULL,
    sent_at                 TIMESTAMPTZ  NOT NULL,
    last_seen_at            TIMESTAMPTZ  NOT NULL DEFAULT now(),
    records_pending         BIGINT       NOT NULL,
    oldest_pending_age_secs BIGINT,
    dead_letters            BIGINT       NOT NULL,
    disk_free_bytes         BIGINT,
    staging_blocked         TEXT,
    last_error              TEXT,
    sinks                   JSONB        NOT NULL
);

-- The fleet at a glance. seen_secs_ago is measured by this database's clock. Examples:
--   agents not seen for 10 minutes:            WHERE seen_secs_ago > 600
--   agents with a backlog older than 30 min:   WHERE oldest_pending_age_secs > 1800
--   agents with dead letters:                  WHERE dead_letters > 0
CREATE OR REPLACE VIEW estafeta_fleet AS
SELECT agent_id,
       hostname,
       version,
       last_seen_at,
       CAST(EXTRACT(EPOCH FROM (now() - last_seen_at)) AS BIGINT) AS seen_secs_ago,
       records_pending,
       oldest_pending_age_secs,
       dead_letters,
       disk_free_bytes,
       staging_blocked,
       last_error,
       started_at
FROM estafeta_agents;
