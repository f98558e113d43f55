//! What a sink that takes heartbeats is handed ([`super::Sink::heartbeat`]): the agent's state
//! in one serializable value. The daemon's loop that builds and sends them is
//! [`crate::heartbeat`], above the sinks.

use serde::Serialize;

/// What one heartbeat says.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Heartbeat {
    /// `AGENT_ID`: stable across restarts.
    pub agent_id: String,
    pub hostname: String,
    pub version: String,
    /// When this heartbeat was built (RFC 3339 UTC).
    pub sent_at: String,
    /// When this daemon started.
    pub started_at: String,
    /// Records not yet delivered to every sink.
    pub records_pending: u64,
    /// The oldest pending record's age over every sink, in seconds.
    pub oldest_pending_age_secs: Option<i64>,
    /// Dead letters over every sink.
    pub dead_letters: u64,
    /// Free space on the staging disk.
    pub disk_free_bytes: Option<u64>,
    /// Why staging refuses writes, if it does.
    pub staging_blocked: Option<String>,
    /// The most recent error of any sink: a status code or an error class, never payload
    /// text, a record key or a server's answer (see [`crate::sinks`]).
    pub last_error: Option<String>,
    pub sinks: Vec<SinkBeat>,
}

/// One sink's part of a heartbeat.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SinkBeat {
    pub sink: String,
    pub pending: u64,
    pub in_flight: u64,
    pub dead: u64,
    pub oldest_pending_age_secs: Option<i64>,
    pub last_success_at: Option<String>,
    pub last_failure_at: Option<String>,
    pub last_error: Option<String>,
}
