-- Heartbeats (HEARTBEAT_SECS): one row per agent, upserted on every beat, and a view of the
-- fleet. Applied by the agent's heartbeat itself (not by the landing-table migrations), so a
-- user without CREATE rights still delivers records; a DBA may run this file by hand. Times
-- are UTC.
CREATE TABLE IF NOT EXISTS estafeta_agents (
    agent_id                VARCHAR(255) NOT NULL PRIMARY KEY,
    hostname                VARCHAR(255) NOT NULL,
    version                 VARCHAR(64)  NOT NULL,
    started_at              DATETIME(6)  NOT NULL,
    sent_at                 DATETIME(6)  NOT NULL,
    last_seen_at            DATETIME(6)  NOT NULL,
    records_pending         BIGINT       NOT NULL,
    oldest_pending_age_secs BIGINT       NULL,
    dead_letters            BIGINT       NOT NULL,
    disk_free_bytes         BIGINT       NULL,
    staging_blocked         TEXT         NULL,
    last_error              TEXT         NULL,
    sinks                   JSON         NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- The fleet at a glance. seen_secs_ago is measured by this server's clock. Examples:
--   agents not seen for 10 minutes:            WHERE seen_secs_ago > 600
--   agents with a backlog older than 30 min:   WHERE oldest_pending_age_secs > 1800
--   agents with dead letters:                  WHERE dead_letters > 0
CREATE OR REPLACE VIEW estafeta_fleet AS
SELECT agent_id,
       hostname,
       version,
       last_seen_at,
       CAST(TIMESTAMPDIFF(SECOND, last_seen_at, UTC_TIMESTAMP(6)) AS SIGNED) AS seen_secs_ago,
       records_pending,
       oldest_pending_age_secs,
       dead_letters,
       disk_free_bytes,
       staging_blocked,
       last_error,
       started_at
FROM estafeta_agents;
