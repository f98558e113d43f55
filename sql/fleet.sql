-- What `estafeta fleet --database URL` reads (the same text on PostgreSQL, MariaDB / MySQL and SQLite): every
-- agent's last heartbeat, from the estafeta_fleet view that sql/<dialect>/agents.sql creates.
SELECT agent_id, hostname, version, seen_secs_ago, records_pending, oldest_pending_age_secs,
       dead_letters, disk_free_bytes, last_error
FROM estafeta_fleet
ORDER BY agent_id
