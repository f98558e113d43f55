//! End-to-end tests: the real `estafeta` binary against real servers, through the helpers of
//! the `estafeta_e2e` library. Needs `scripts/start-services` (PostgreSQL, MariaDB, NATS).

mod harness;
// 2,000 records to an API answering 503 / stalling: each applied exactly once, in key order.
mod http_flaky;
// Central API refusing connections: records pile up readable (ls, cat), then drain once.
mod outage;
// A 400 answer: dead letter with status and body, its key waits, retry / retry --send.
mod dead_letters;
// Every refused request (400/401/413/415/422/507) answers JSON and stages nothing; no public
// INGEST_ADDR without INGEST_TOKEN.
mod bad_input;
// SIGKILL with deliveries in flight, restart: nothing lost, nothing applied twice in effect;
// SIGTERM exits 0 within the grace period.
mod kill_restart;
// The real PostgreSQL and MariaDB: one row per record, per-key landing order, C→D→C.
mod databases;
// Files other programs write into the staging tree (the seed's layout) are adopted and delivered.
mod foreign_files;
