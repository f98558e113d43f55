-- Heartbeats (HEARTBEAT_SECS): one row per agent, upserted on every beat, and a view of the
-- fleet. Applied by the agent's heartbeat itself (not by the landing-table migrations). Times
-- are RFC 3339 text in UTC.
CREATE TABLE IF NOT EXISTS estafeta_agents (
    agent_id                TEXT    PRIMARY KEY,
    hostname                TEXT    NOT NULL,
    version                 TEXT    NOT NULL,
    started_at              TEXT    NOT NULL,
    sent_at                 TEXT    NOT NULL,
    last_seen_at            TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    records_pending         INTEGER NOT NULL,
    oldest_pending_age_secs INTEGER,
    dead_letters            INTEGER NOT NULL,
    disk_free_bytes         INTEGER,
    staging_blocked         TEXT,
    last_error              TEXT,
    sinks                   TEXT    NOT NULL CHECK (json_valid(sinks))
);

-- The fleet at a glance. seen_secs_ago is measured by this machine's clock. Examples:
--   agents not seen for 10 minutes:            WHERE seen_secs_ago > 600
--   agents with a backlog older than 30 min:   WHERE oldest_pending_age_secs > 1800
--   agents with dead letters:                  WHERE dead_letters > 0
CREATE VIEW IF NOT EXISTS estafeta_fleet AS
SELECT agent_id,
       hostname,
       version,
       last_seen_at,
       CAST((julianday('now') - julianday(last_seen_at)) * 86400 AS INTEGER) AS seen_secs_ago,
       records_pending,
       oldest_pending_age_secs,
       dead_letters,
       disk_free_bytes,
       staging_blocked,
       last_error,
       started_at
FROM estafeta_agents;
