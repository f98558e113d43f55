-- One heartbeat: the agent's row, inserted or replaced. last_seen_at is this database's clock.
-- $1 agent id, $2 host name, $3 version, $4 started at, $5 sent at, $6 records pending,
-- $7 oldest pending age (s), $8 dead letters, $9 free disk bytes, $10 staging blocked,
-- $11 last error, $12 sinks as JSON text.
INSERT INTO estafeta_agents
    (agent_id, hostname, version, started_at, sent_at, last_seen_at, records_pending,
     oldest_pending_age_secs, dead_letters, disk_free_bytes, staging_blocked, last_error, sinks)
VALUES ($1, $2, $3, $4, $5, now(), $6, $7, $8, $9, $10, $11, $12::text::jsonb)
ON CONFLICT (agent_id) DO UPDATE SET
    hostname = EXCLUDED.hostname,
    version = EXCLUDED.version,
    started_at = EXCLUDED.started_at,
    sent_at = EXCLUDED.sent_at,
    last_seen_at = EXCLUDED.last_seen_at,
    records_pending = EXCLUDED.records_pending,
    oldest_pending_age_secs = EXCLUDED.oldest_pending_age_secs,
    dead_letters = EXCLUDED.dead_letters,
    disk_free_bytes = EXCLUDED.disk_free_bytes,
    staging_blocked = EXCLUDED.staging_blocked,
    last_error = EXCLUDED.last_error,
    sinks = EXCLUDED.sinks
