//! Helpers for the end-to-end tests: the `estafeta` binary as a child process ([`Agent`],
//! [`run_cli`]), the real PostgreSQL and MariaDB servers ([`pg`], [`mysql`]) and an in-process
//! misbehaving HTTP API ([`FlakyHttpServer`]), the real NATS JetStream server with per-test
//! streams and a TCP proxy that can cut it off ([`nats`], [`TestStream`], [`TcpProxy`]), waiting on the agent's status and reading its
//! staging folder ([`wait_drained`], [`record_files`], [`raw_request`]) and a reproducible
//! workload of records ([`mixed_plan`], [`post_plan`]), a TCP gate that refuses and counts
//! connections ([`TcpGate`]), and the crash loop, long outage and flapping sink scenarios
//! parameterized by counts ([`reliability`]: shared by the CI tests and `scripts/soak`), and an
//! in-memory FUSE file system that forgets on a simulated power cut whatever was not fsync'd
//! ([`powercut_fs`]) with the power-cut cycles under retrying clients on top of it
//! ([`powercut`]). The servers come from `scripts/start-services`.

mod agent;
mod bin;
mod cuttable;
mod db;
mod flaky;
mod gate;
pub mod mariadb_server;
mod nats;
pub mod nats_server;
pub mod pg_cluster;
pub mod pki;
pub mod powercut;
pub mod powercut_fs;
pub mod release;
pub mod reliability;
mod support;
pub mod wire;
mod workload;

pub use agent::{Agent, AgentSpec, CLI_TIMEOUT, body_value, run_cli};
pub use bin::{BIN_NAME, estafeta_bin, free_port, profile_dir};
pub use db::{MYSQL_URL, PG_CONFIG, PG_URL, mysql, pg, unique_name};
pub use flaky::{FlakyHttpServer, RecordedRequest};
pub use gate::TcpGate;
pub use nats::{
    NATS_ADDR, NATS_URL, StoredMessage, TcpProxy, TestStream, check_stream_deliveries, nats,
};
pub use release::{
    ReleaseServer, host_target, next_patch, public_key_base64, restamp, sha256_hex, signed_archive,
    signing_key,
};
pub use support::{
    RawBody, drained, json_lines, log_tail, raw_request, record_files, sink_status, status,
    status_with, wait_drained, wait_status,
};
pub use workload::{
    DeliveryReport, Planned, Rng, Staged, by_id, check_http_deliveries, default_route, mixed_plan,
    payload, post_plan, seqs_by_key,
};
