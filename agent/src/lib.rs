//! The `estafeta` agent: configuration, ingest API, batcher, sinks and the CLI, on top of the
//! staging store (`estafeta-staging`). The binary's `main` only calls [`cli::main`].

pub mod api_tls;
pub mod batcher;
pub mod cli;
pub mod config;
pub mod crontab;
pub mod daemon;
pub mod db;
pub mod fleet;
pub mod heartbeat;
pub mod host;
pub mod hostname;
pub mod ingest;
pub mod intake;
pub mod interval;
pub mod logging;
pub mod lookups;
pub mod metrics;
pub mod notify;
pub mod problem;
pub mod redact;
pub mod relay;
pub mod sinks;
pub mod sources;
pub mod timezone;
pub mod tls;
pub mod update;
pub mod version;
pub mod winservice;
