-- One heartbeat: the agent's row, inserted or replaced. last_seen_at is this server's clock.
-- Parameters: agent id, host name, version, started at, sent at (RFC 3339 text, UTC), records
-- pending, oldest pending age (s), dead letters, free disk bytes, staging blocked, last error,
-- sinks as JSON text.
INSERT INTO estafeta_agents
    (agent_id, hostname, version, started_at, sent_at, last_seen_at, records_pending,
     oldest_pending_age_secs, dead_letters, disk_free_bytes, staging_blocked, last_error, sinks)
VALUES (?, ?, ?,
        STR_TO_DATE(?, '%Y-%m-%dT%H:%i:%s.%fZ'), STR_TO_DATE(?, '%Y-%m-%dT%H:%i:%s.%fZ'),
        UTC_TIMESTAMP(6), ?, ?, ?, ?, ?, ?, ?)
ON DUPLICATE KEY UPDATE
    hostname = VALUES(hostname),
    version = VALUES(version),
    started_at = VALUES(started_at),
    sent_at = VALUES(sent_at),
    last_seen_at = VALUES(last_seen_at),
    records_pending = VALUES(records_pending),
    oldest_pending_age_secs = VALUES(oldest_pending_age_secs),
    dead_letters = VALUES(dead_letters),
    disk_free_bytes = VALUES(disk_free_bytes),
    staging_blocked = VALUES(staging_blocked),
    last_error = VALUES(last_error),
    sinks = VALUES(sinks)
