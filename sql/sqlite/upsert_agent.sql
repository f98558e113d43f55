-- One heartbeat: the agent's row, inserted or replaced. last_seen_at is this machine's clock.
INSERT INTO estafeta_agents
    (agent_id, hostname, version, started_at, sent_at, last_seen_at, records_pending,
     oldest_pending_age_secs, dead_letters, disk_free_bytes, staging_blocked, last_error, sinks)
VALUES (?1, ?2, ?3, ?4, ?5, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), ?6, ?7, ?8, ?9, ?10, ?11, ?12)
ON CONFLICT (agent_id) DO UPDATE SET
    hostname = excluded.hostname,
    version = excluded.version,
    started_at = excluded.started_at,
    sent_at = excluded.sent_at,
    last_seen_at = excluded.last_seen_at,
    records_pending = excluded.records_pending,
    oldest_pending_age_secs = excluded.oldest_pending_age_secs,
    dead_letters = excluded.dead_letters,
    disk_free_bytes = excluded.disk_free_bytes,
    staging_blocked = excluded.staging_blocked,
    last_error = excluded.last_error,
    sinks = excluded.sinks
