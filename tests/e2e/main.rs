//! End-to-end tests: the real `estafeta` binary against real servers, through the helpers of
//! the `estafeta_e2e` library. Needs `scripts/start-services` (PostgreSQL, MariaDB, NATS).

mod harness;
// What crosses the network: a canary through a recording proxy, absent with TLS, present without.
mod wire;
// 2,000 records to an API answering 503 / stalling: each applied exactly once, in key order.
mod http_flaky;
// Central API refusing connections: records pile up readable (ls, cat), then drain once.
mod outage;
// estafeta-sink-server, the benchmarks' stand-in API: --latency-ms on timers, its counts.
mod sink_server;
// A 400 answer: dead letter with status and body, its key waits, retry / retry --send.
mod dead_letters;
// `estafeta retry` flag by flag (--dir --file --send --move-ok --limit --verbose), with the
// daemon stopped and running (the record lands once); max_attempts; flush --dry-run --show-payload.
mod retry_cli;
// Every refused request (400/401/413/415/422/507) answers JSON and stages nothing; no public
// INGEST_ADDR without INGEST_TOKEN.
mod bad_input;
// Staging on an 8 MiB tmpfs: 507 when full, nothing acknowledged lost, space freed by delivery,
// intake resumes by itself (needs root or CAP_SYS_ADMIN to mount).
mod full_disk;
// Hostile input: NUL/non-ASCII/encoded names, 100 MB bodies, JSON 100,000 deep, invalid UTF-8,
// 1,000 simultaneous connections, slow clients, and schemathesis against /v1/openapi.json.
mod hostile;
// Encryption at rest: a canary staged, delivered, dead-lettered, requeued and cleaned up is never
// in clear under the staging folder; without the key the agent refuses and changes no file.
mod at_rest;
// Access: no token, URL password or payload in logs or check-config; staging 0600/0700; an
// HTTPS API with an unknown CA is refused until CENTRAL_API_CA_FILE names it.
mod access;
// DNS rebinding (contract 7): a web page (Host: rebind.attacker.example) can neither stage nor read
// on any route; INGEST_ALLOWED_HOSTS; no public INGEST_ADDR with a short token; INGEST_TOKEN_FILE.
mod rebinding;
// A staging folder of the current format (tests/fixtures/staging-v1) is delivered by this binary.
mod upgrade;
// Self-update from a release server on 127.0.0.1: a signed newer version is installed and drains
// the backlog; a bad signature or no key is refused; a version crashing at start is rolled back.
mod self_update;
// Garbled bytes, a cut record and a deleted index made while the agent is stopped: reported at
// start, set aside, every intact record delivered once.
mod damaged_files;
// SIGKILL with deliveries in flight, restart: nothing lost, nothing applied twice in effect;
// SIGTERM exits 0 within the grace period; a crash loop of 10 SIGKILLs under concurrent load with
// a sink failing 20% of requests loses nothing acknowledged (bounded).
mod kill_restart;
// The real PostgreSQL and MariaDB: one row per record, per-key landing order, C→D→C.
mod databases;
// Apply mode: the AGHU user-sync example upserted into PostgreSQL and MariaDB, replayed twice,
// applied once; bad statement files named by check-config.
mod apply_mode;
// Files other programs write into the staging tree (the seed's layout) are adopted and delivered.
mod foreign_files;
// One intake: HTTP, `estafeta stage`, staging-tree and inbox files, SQL source rows all follow
// [[routes]] and the entity's JSON Schema.
mod intake;
// The real NATS JetStream: one message per record with Nats-Msg-Id, key order, a resend after
// SIGKILL dropped as a duplicate, outage and recovery, no stream, messages too large.
mod jetstream;
// A 3-node JetStream cluster, an R3 stream, CENTRAL_NATS_URL listing the three: the stream leader
// SIGKILLed during delivery, twice; every record once, in key order (issue 24).
mod jetstream_cluster;
// `estafeta relay`: agent → JetStream (4 partitions) → two relays → PostgreSQL behind a proxy; a
// relay SIGKILLed and restarted, the database cut off: 0 lost, 0 doubled, per-key order.
mod relay;
// Heartbeats into PostgreSQL / MariaDB / SQLite (estafeta_agents) and `estafeta fleet` flags.
mod fleet;
// PgBouncer in transaction pooling mode (4 server connections, round robin) between the agent and
// PostgreSQL: every path of the sink (COPY, a resend through the temporary table, a refused row,
// apply mode, heartbeats) with transaction_pooling = true, once each, without a failed attempt.
mod pgbouncer;
// Canary secrets, payloads and keys at trace level appear in no log, status or heartbeat.
mod canary;
// SQL sources: checkpoints across SIGKILLs (PostgreSQL), grouping and debounce (SQLite), types
// (MariaDB), `estafeta sources` and `sources reset`.
mod sources;
// Source health (issue 22): a PostgreSQL source that works, fails (a value its query cannot cast,
// a dropped table) and is fixed, in /v1/status, /metrics, `estafeta status` and the status page.
mod source_health;
// SQL sources, what migrating teams hit (issue 22): a local-time column's debounce (MariaDB),
// max_records per cycle apart from page_size (SQLite), a row that cannot become a record set
// aside while the rest is staged (SQLite), after_stage on a queue table across a SIGKILL
// (PostgreSQL), a template expanded over hospitals, hh:mm:ss intervals and their errors.
mod source_rows;
// Lookups at the source (seed 003): codes mapped and looked up in the API's cached catalog before
// the payload (PostgreSQL); an unmapped row set aside, listed by `retry` and /v1/dead-letters,
// staged again by `retry --send` once fixed; an unreachable catalog stages nothing until it
// answers; check-config names a missing map file and an unset token_env.
mod source_lookups;
// The examples under examples/ run as shipped against the local PostgreSQL.
mod examples;
// ODBC drivers no server here answers: FreeTDS (SQL Server) loads and says so; a missing
// driver (Oracle) is named with what to run.
mod odbc_drivers;
// Record templates (a business Idempotency-Key and landing key) and body templates (HL7 v2)
// against the stand-in API and PostgreSQL.
mod templates;
// The status page in headless Chromium (WebDriver).
mod status_page;
// The ingest API over HTTPS (INGEST_TLS_CERT): verified POST staged and delivered, clear HTTP and
// an untrusted CA refused, idle handshakes dropped, `status` over HTTPS; 0.0.0.0 without TLS refused.
mod ingest_tls;
// The reliability scenarios through the code scripts/soak runs long: a crash loop fed by the
// separate estafeta-load process, a 200,000-record outage of PostgreSQL and the API with flat
// memory, and a flapping API whose down phases get no more attempts than the backoff allows.
mod reliability;
// The power-cut file system: what was not fsync'd (file content, directory entries, whole trees)
// is gone after a cut, a seed tears the last write, SQLite WAL survives it, flock works.
mod powercut_fs;
// Power cuts, not only kills (contract 1). The staging folder on the power-cut file system; cycles
// of load from retrying clients → SIGKILL → forget what was not fsync'd (sometimes tearing the last
// write) → remount → restart: records, dead letters, requeues, a source's checkpoint, the sequence
// counter and the self-update state all come through, nothing applied twice.
mod power_cut;
