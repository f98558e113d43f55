//! The crash loop, long outage and flapping sink scenarios (contracts 1, 3, 4 and 5), written
//! once and parameterized by counts and durations: the CI tests (`tests/e2e/reliability.rs`)
//! run them small, `scripts/soak` (the `estafeta-soak` binary) runs them long with the release
//! build.
//!
//! - [`crash_loop`]: a *separate* load process (`estafeta-load --ack-log --retry`) posts from
//!   many clients that retry with the same `Idempotency-Key` until answered, while the agent is
//!   SIGKILLed at random moments and restarted, and the API fails at random. Every record the
//!   load process wrote down as acknowledged must be applied once at PostgreSQL and at the API,
//!   per key in seq order — counted both by the agent's record id and by the client's own
//!   identity of the record (its payload's `id` and `n`), so that a retried request staged a
//!   second time under a new record id counts as applied twice.
//! - [`long_outage`]: PostgreSQL (behind a [`TcpProxy`]) and the API refuse connections while
//!   many records arrive; the agent's memory is sampled; then both come back and the backlog
//!   drains, each record once, per key in order, and the drain throughput is measured.
//! - [`flapping`]: the API cycles through up / refusing / stalling / 500 phases; nothing is
//!   lost or doubled, and the attempts made while it is down stay under the bound the
//!   batcher's backoff policy gives.
//!
//! Each returns a report whose `problems` list what a user would call a failure (a lost
//! record, a doubled one, order broken, memory growing, a sink hammered); the caller asserts
//! it is empty. Failures to set up (a server missing, the agent not starting) panic at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::agent::Agent;
use crate::bin::profile_dir;
use crate::db::{PG_URL, pg, unique_name};
use crate::flaky::{FlakyHttpServer, RecordedRequest};
use crate::gate::TcpGate;
use crate::nats::TcpProxy;
use crate::support::{drained, log_tail, sink_status, status};
use crate::workload::{Rng, Staged, check_http_deliveries, mixed_plan, post_plan, seqs_by_key};

/// The agent's resident memory (`VmRSS` of `/proc/<pid>/status`), in KiB.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn rss(agent: &Agent) -> u64 {
    agent.pid().and_then(vm_rss_kib).unwrap_or(0)
}

/// A PostgreSQL schema of its own for one run: the agent's landing table
/// (`estafeta_records`) is created in it (through `search_path`), so the run's rows are
/// counted alone and dropped with the schema.
pub struct PgSchema {
    pub name: String,
}

impl PgSchema {
    /// Creates it.
    ///
    /// # Panics
    /// When PostgreSQL is missing.
    pub async fn create(prefix: &str) -> PgSchema {
        let name = unique_name(prefix);
        pg().await
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE SCHEMA {name}: {e}"));
        PgSchema { name }
    }

    /// The agent's `CENTRAL_DATABASE_URL` for this schema, through `host:port` (PostgreSQL
    /// itself or a proxy in front of it).
    pub fn url(&self, host_port: &str) -> String {
        let base = PG_URL.replacen("127.0.0.1:5432", host_port, 1);
        format!(
            "{base}?application_name={}&options=-csearch_path%3D{}",
            self.name, self.name
        )
    }

    /// The landed rows in landing order (`ORDER BY id`): idempotency key, seq, record key
    /// and payload.
    pub async fn rows(&self) -> Vec<(String, u64, String, Value)> {
        let client = pg().await;
        let rows = client
            .query(
                &format!(
                    "SELECT idempotency_key, seq, coalesce(record_key, ''), payload
                       FROM {}.estafeta_records ORDER BY id",
                    self.name
                ),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("reading {}.estafeta_records: {e}", self.name));
        rows.iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64, r.get(2), r.get(3)))
            .collect()
    }

    /// Drops the schema and everything in it.
    pub async fn drop_schema(self) {
        let _ = pg()
            .await
            .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name))
            .await;
    }
}

/// What a check of landed records found.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// Acknowledged records that never took effect.
    pub lost: usize,
    /// Acknowledged records that took effect more than once (rows at PostgreSQL; at the API,
    /// 2xx answers beyond the first that no crash or cut explains).
    pub doubled: usize,
    /// API requests beyond the first 2xx of a record that a crash or cut does explain: the
    /// answer was lost, the agent sent the record again, its `Idempotency-Key` deduplicates it.
    pub resent: usize,
    /// Records applied that nobody acknowledged (the client never got the answer).
    pub unacknowledged: usize,
}

/// Checks the rows of `schema` against `acked`: one row per acknowledged id, with its seq,
/// key and payload, per key in seq order; any other row must be a record whose request went
/// unanswered (`unanswered` holds their payloads' `(id field, n)`), or one whose `(id field,
/// n)` is in `by_identity`: another copy of an acknowledged record, which
/// [`check_identities`] counts (as applied twice).
async fn check_pg(
    schema: &PgSchema,
    acked: &[Staged],
    unanswered: &BTreeSet<(String, u64)>,
    by_identity: &BTreeSet<(String, u64)>,
    problems: &mut Vec<String>,
) -> Applied {
    let rows = schema.rows().await;
    let by_id: BTreeMap<&str, &Staged> = acked.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut applied = Applied::default();
    let mut per_id: BTreeMap<&str, usize> = BTreeMap::new();
    let mut landed: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut mismatched = 0usize;
    for (id, seq, key, payload) in &rows {
        match by_id.get(id.as_str()) {
            Some(s) => {
                *per_id.entry(s.id.as_str()).or_default() += 1;
                if (*seq, key.as_str(), payload) != (s.seq, s.key.as_str(), &s.payload) {
                    mismatched += 1;
                    if mismatched <= 5 {
                        problems.push(format!(
                            "PostgreSQL row {id} has seq {seq} key {key} payload {payload}; acknowledged seq {} key {} payload {}",
                            s.seq, s.key, s.payload
                        ));
                    }
                }
                landed.entry(key.clone()).or_default().push(*seq);
            }
            None => {
                let n = payload["n"].as_u64().unwrap_or(u64::MAX);
                let field = payload["id"].as_str().unwrap_or_default().to_owned();
                let pair = (field, n);
                if unanswered.contains(&pair) {
                    applied.unacknowledged += 1;
                } else if by_identity.contains(&pair) {
                    // Another copy of an acknowledged record: check_identities counts it.
                } else {
                    problems.push(format!(
                        "PostgreSQL has row {id} (key {key}, n {n}) that was neither acknowledged nor sent without an answer"
                    ));
                }
            }
        }
    }
    applied.lost = acked
        .iter()
        .filter(|s| !per_id.contains_key(s.id.as_str()))
        .count();
    applied.doubled = per_id.values().filter(|n| **n > 1).count();
    if applied.lost > 0 {
        let seqs: Vec<u64> = acked
            .iter()
            .filter(|s| !per_id.contains_key(s.id.as_str()))
            .map(|s| s.seq)
            .take(20)
            .collect();
        problems.push(format!(
            "PostgreSQL: {} acknowledged record(s) never landed, seqs (first 20) {seqs:?}",
            applied.lost
        ));
    }
    if applied.doubled > 0 {
        problems.push(format!(
            "PostgreSQL: {} record(s) landed more than once",
            applied.doubled
        ));
    }
    let mut disorder = 0;
    for ((_, key), expected) in seqs_by_key(acked) {
        let got = landed.remove(&key).unwrap_or_default();
        if got != expected {
            disorder += 1;
            if disorder <= 5 {
                problems.push(format!(
                    "PostgreSQL key {key}: rows landed (ORDER BY id) with seqs {:?}…, acknowledged {:?}…",
                    &got[..got.len().min(10)],
                    &expected[..expected.len().min(10)]
                ));
            }
        }
    }
    if disorder > 5 {
        problems.push(format!("PostgreSQL: {disorder} keys out of order in all"));
    }
    applied
}

/// Checks the API's requests against `acked` ([`check_http_deliveries`], at least once on the
/// wire), then counts a second 2xx for a record as *resent* only when a crash or a cut
/// explains it — the answer was lost on the way, as at-least-once delivery allows — and as
/// *doubled* otherwise. `breaks` are the windows `(from, until)` in which an answer could be
/// lost: from a SIGKILL until the next agent process was started (a request the dying process
/// sent may still be read by the server after the kill, but none of the next process can come
/// before its start), or from a cut of the connections until shortly after it. A pair of
/// successes `t1 < t2` is explained when some window has `t1 ≤ until` and `from ≤ t2`.
/// Requests for ids nobody acknowledged must carry a payload whose request went unanswered,
/// or one whose `(id field, n)` is in `by_identity` (another copy of an acknowledged record,
/// which [`check_identities`] counts).
fn check_api(
    requests: &[RecordedRequest],
    acked: &[Staged],
    unanswered: &BTreeSet<(String, u64)>,
    by_identity: &BTreeSet<(String, u64)>,
    breaks: &[(Instant, Instant)],
    problems: &mut Vec<String>,
) -> Applied {
    let ids: BTreeSet<&str> = acked.iter().map(|s| s.id.as_str()).collect();
    let mut applied = Applied::default();
    let mut strays = BTreeSet::new();
    let mut ours = Vec::with_capacity(requests.len());
    for r in requests {
        match r.idempotency_key() {
            Some(id) if ids.contains(id) => ours.push(r.clone()),
            Some(id) => {
                let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                let pair = (
                    body["id"].as_str().unwrap_or_default().to_owned(),
                    body["n"].as_u64().unwrap_or(u64::MAX),
                );
                if unanswered.contains(&pair) {
                    if r.succeeded() {
                        strays.insert(id.to_owned());
                    }
                } else if by_identity.contains(&pair) {
                    // Another copy of an acknowledged record: check_identities counts it.
                } else {
                    problems.push(format!(
                        "API request #{} carries {id} ({pair:?}), neither acknowledged nor sent without an answer",
                        r.index
                    ));
                }
            }
            None => problems.push(format!("API request #{} has no Idempotency-Key", r.index)),
        }
    }
    applied.unacknowledged = strays.len();
    match check_http_deliveries(&ours, acked, false) {
        Ok(_) => {}
        Err(found) => problems.push(format!("API: {found}")),
    }
    let mut successes: BTreeMap<&str, Vec<Instant>> = BTreeMap::new();
    for r in ours.iter().filter(|r| r.succeeded()) {
        if let Some(id) = r.idempotency_key() {
            successes.entry(id).or_default().push(r.received);
        }
    }
    applied.lost = acked
        .iter()
        .filter(|s| !successes.contains_key(s.id.as_str()))
        .count();
    for (id, times) in &successes {
        let mut doubled = false;
        for pair in times.windows(2) {
            if breaks
                .iter()
                .any(|(from, until)| pair[0] <= *until && *from <= pair[1])
            {
                applied.resent += 1;
            } else {
                doubled = true;
            }
        }
        if doubled {
            applied.doubled += 1;
            if applied.doubled <= 5 {
                // Where each success fell relative to the nearest crash or cut, for diagnosis.
                let near: Vec<String> = times
                    .iter()
                    .map(|t| {
                        let nearest = breaks
                            .iter()
                            .map(|(from, _)| from)
                            .min_by_key(|b| if **b > *t { **b - *t } else { *t - **b });
                        match nearest {
                            Some(b) if *b > *t => {
                                format!("{} ms before a break", (*b - *t).as_millis())
                            }
                            Some(b) => format!("{} ms after a break", (*t - *b).as_millis()),
                            None => "no break".into(),
                        }
                    })
                    .collect();
                let statuses: Vec<String> = ours
                    .iter()
                    .filter(|r| r.idempotency_key() == Some(id))
                    .map(|r| {
                        format!(
                            "#{} {}{}",
                            r.index,
                            r.status,
                            if r.stalled { " stalled" } else { "" }
                        )
                    })
                    .collect();
                problems.push(format!(
                    "API: record {id} took effect {} times with no crash or cut in between ({}); its requests: {}",
                    times.len(),
                    near.join(", "),
                    statuses.join(", ")
                ));
            }
        }
    }
    if applied.doubled > 5 {
        problems.push(format!(
            "API: {} records applied twice in all",
            applied.doubled
        ));
    }
    applied
}

/// The client's own identity of a record: its payload's `id` field (the client key, e.g.
/// `L-3-k1`) and its counter `n`. The agent's record id cannot tell a record staged twice
/// (two ids for one client record) from two records.
pub fn identity(payload: &Value) -> Option<(String, u64)> {
    Some((payload["id"].as_str()?.to_owned(), payload["n"].as_u64()?))
}

/// One record that took effect at a sink: a PostgreSQL row or a successful API request.
pub struct Landed {
    /// [`identity`] of its payload (`None`: the payload has no `id` and `n`).
    pub identity: Option<(String, u64)>,
    /// The agent's record id (the row's `idempotency_key`, the request's `Idempotency-Key`).
    pub id: String,
    pub seq: Option<u64>,
    /// Where it was seen, for messages: `row 17`, `request #40`.
    pub at: String,
}

/// The landed rows of a PostgreSQL schema ([`PgSchema::rows`]), in landing order.
pub fn landed_rows(rows: &[(String, u64, String, Value)]) -> Vec<Landed> {
    rows.iter()
        .enumerate()
        .map(|(i, (id, seq, _, payload))| Landed {
            identity: identity(payload),
            id: id.clone(),
            seq: Some(*seq),
            at: format!("row {}", i + 1),
        })
        .collect()
}

/// The API requests that took effect ([`RecordedRequest::succeeded`]), in arrival order.
pub fn landed_requests(requests: &[RecordedRequest]) -> Vec<Landed> {
    requests
        .iter()
        .filter(|r| r.succeeded())
        .map(|r| Landed {
            identity: serde_json::from_slice::<Value>(&r.body)
                .ok()
                .as_ref()
                .and_then(identity),
            id: r.idempotency_key().unwrap_or_default().to_owned(),
            seq: r.seq(),
            at: format!("request #{}", r.index),
        })
        .collect()
}

/// What [`check_identities`] counted at one sink.
#[derive(Debug, Clone, Default)]
pub struct ByIdentity {
    /// Client records (by [`identity`]) that took effect more than once: as more than one row
    /// (PostgreSQL), or under more than one record id (the API, where a resend of the same
    /// record id after a crash is deduplicated by its `Idempotency-Key`).
    pub applied_twice: usize,
    /// Acknowledged client records that never took effect.
    pub lost: usize,
    /// Client keys whose records took effect with `n` going back.
    pub disorder: usize,
}

/// The check by the client's identity of each record ([`identity`]), at one sink (`sink`
/// names it in messages): `landed` is everything that took effect there, in order. A client
/// record took effect twice when it landed more than once (`per_row`: PostgreSQL, where every
/// row is an application) or under more than one record id (the API); it is lost when it was
/// acknowledged and never landed. Per client key, `n` never goes back in first applications
/// (the load process posts one key from one connection, one request at a time, so `n` grows
/// in posting order). Each
/// kind of problem gets one line with up to 5 examples: the client key and `n`, and the
/// record ids and seqs involved.
pub fn check_identities(
    sink: &str,
    landed: &[Landed],
    acked: &[Staged],
    per_row: bool,
    problems: &mut Vec<String>,
) -> ByIdentity {
    let mut found = ByIdentity::default();
    let acked_by: BTreeMap<(String, u64), &Staged> = acked
        .iter()
        .filter_map(|s| Some((identity(&s.payload)?, s)))
        .collect();
    if acked_by.len() < acked.len() {
        problems.push(format!(
            "{sink}: {} acknowledged record(s) have no payload id and n, or share them",
            acked.len() - acked_by.len()
        ));
    }
    let mut by: BTreeMap<&(String, u64), Vec<&Landed>> = BTreeMap::new();
    let mut order: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut anonymous = 0usize;
    let mut first_landings = std::collections::HashSet::new();
    for l in landed {
        match &l.identity {
            Some(ident) => {
                by.entry(ident).or_default().push(l);
                // At the API a resend of a record id is deduplicated by its Idempotency-Key: only
                // its first landing is an application (a crash resends the unsettled part of a
                // key's run, in order). Every PostgreSQL row is one.
                if per_row || first_landings.insert(l.id.as_str()) {
                    order.entry(ident.0.as_str()).or_default().push(ident.1);
                }
            }
            None => anonymous += 1,
        }
    }
    if anonymous > 0 {
        problems.push(format!(
            "{sink}: {anonymous} record(s) took effect with no payload id and n"
        ));
    }
    let describe = |ident: &(String, u64)| -> String {
        match acked_by.get(ident) {
            Some(s) => format!("acknowledged as {} (seq {})", s.id, s.seq),
            None => "never acknowledged (the client gave up)".into(),
        }
    };
    let mut twice = Vec::new();
    for (ident, copies) in &by {
        let mut ids: Vec<(&str, Option<u64>, Vec<&str>)> = Vec::new();
        for l in copies {
            match ids.iter_mut().find(|(id, _, _)| *id == l.id) {
                Some((_, _, at)) => at.push(&l.at),
                None => ids.push((&l.id, l.seq, vec![&l.at])),
            }
        }
        let times = if per_row { copies.len() } else { ids.len() };
        if times > 1 {
            found.applied_twice += 1;
            if twice.len() < 5 {
                let ids: Vec<String> = ids
                    .iter()
                    .map(|(id, seq, at)| {
                        let seq = seq.map_or("?".into(), |s| s.to_string());
                        format!("{id} (seq {seq}; {})", at.join(", "))
                    })
                    .collect();
                twice.push(format!(
                    "{} n {} took effect {times} times as {}, {}",
                    ident.0,
                    ident.1,
                    ids.join(", "),
                    describe(ident)
                ));
            }
        }
    }
    if found.applied_twice > 0 {
        problems.push(format!(
            "{sink}: {} client record(s) (payload id, n) applied twice{}, e.g. {}",
            found.applied_twice,
            if per_row {
                ""
            } else {
                " under different record ids"
            },
            twice.join("; ")
        ));
    }
    let mut lost = Vec::new();
    for (ident, s) in &acked_by {
        if !by.contains_key(ident) {
            found.lost += 1;
            if lost.len() < 5 {
                lost.push(format!(
                    "{} n {} (record {} seq {})",
                    ident.0, ident.1, s.id, s.seq
                ));
            }
        }
    }
    if found.lost > 0 {
        problems.push(format!(
            "{sink}: {} acknowledged client record(s) (payload id, n) never took effect, e.g. {}",
            found.lost,
            lost.join("; ")
        ));
    }
    let mut disorder = Vec::new();
    for (key, ns) in &order {
        if let Some(w) = ns.windows(2).find(|w| w[1] < w[0]) {
            found.disorder += 1;
            if disorder.len() < 5 {
                disorder.push(format!("{key}: n {} after n {}", w[1], w[0]));
            }
        }
    }
    if found.disorder > 0 {
        problems.push(format!(
            "{sink}: {} client key(s) took effect out of order, e.g. {}",
            found.disorder,
            disorder.join("; ")
        ));
    }
    found
}

/// Polls the status until every sink drained (or `timeout`); returns, per sink, how long after
/// `since` it had nothing pending or in flight.
async fn wait_sinks_drained(
    agent: &Agent,
    since: Instant,
    timeout: Duration,
) -> Result<BTreeMap<String, Duration>, String> {
    let mut done: BTreeMap<String, Duration> = BTreeMap::new();
    loop {
        let s = status(agent).await;
        if let Some(sinks) = s["sinks"].as_array() {
            for sink in sinks {
                let name = sink["sink"].as_str().unwrap_or_default().to_owned();
                if sink["pending"] == 0 && sink["in_flight"] == 0 && !done.contains_key(&name) {
                    done.insert(name, since.elapsed());
                }
            }
        }
        if drained(&s) {
            return Ok(done);
        }
        if since.elapsed() > timeout {
            return Err(format!(
                "not drained {timeout:?} after the sinks came back; status: {s}\nagent log tail:\n{}",
                log_tail(agent, 30)
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Long outage

/// Counts of [`long_outage`].
#[derive(Debug, Clone)]
pub struct OutageParams {
    /// Records posted while both sinks refuse connections.
    pub records: usize,
    /// Records per request (JSON arrays).
    pub batch: usize,
    /// Distinct keys (a key's records land in order: a record in backoff holds back its key).
    pub keys: usize,
    /// `CENTRAL_API_CONCURRENCY`.
    pub api_concurrency: usize,
    /// How long the drain may take before it counts as a failure.
    pub drain_timeout: Duration,
    /// Allowed VmRSS growth from the sample after the first tenth of the records to the largest
    /// later sample during the outage, in KiB.
    pub rss_slack_kib: u64,
}

/// What [`long_outage`] measured.
#[derive(Debug, Clone, Default)]
pub struct OutageReport {
    pub records: usize,
    pub ingest_secs: f64,
    /// VmRSS after the first tenth of the records, after half of them, and the largest sample
    /// after the first tenth, in KiB. A leak grows as much in the second half as in the first;
    /// caches and allocator arenas level off.
    pub rss_first_tenth_kib: u64,
    pub rss_half_kib: u64,
    pub rss_max_kib: u64,
    /// Seconds from the sinks' return until each had nothing left.
    pub drain_secs: BTreeMap<String, f64>,
    pub pg: Applied,
    pub api: Applied,
    pub problems: Vec<String>,
}

impl OutageReport {
    /// Records per second through `sink` during the drain.
    pub fn throughput(&self, sink: &str) -> f64 {
        self.drain_secs
            .get(sink)
            .map_or(0.0, |s| self.records as f64 / s.max(0.001))
    }
}

/// Long outage: PostgreSQL (behind a proxy that refuses connections) and the API
/// (its port closed) are down while `records` arrive in arrays; the agent's VmRSS is sampled
/// after every request and must stay within `rss_slack_kib` of its value after the first
/// tenth. Then both return, and the backlog drains: every record once at each sink, per key
/// in seq order; the time each sink took is reported.
pub async fn long_outage(p: &OutageParams) -> OutageReport {
    let mut report = OutageReport {
        records: p.records,
        ..OutageReport::default()
    };
    let schema = PgSchema::create("outage").await;
    let proxy = TcpProxy::start("127.0.0.1:5432").await;
    proxy.down();
    let server = FlakyHttpServer::start_with_seed(5).await;
    server.down().await;
    let dir = tempfile::Builder::new()
        .prefix("estafeta-outage-")
        .tempdir()
        .expect("a temporary directory");
    let db_url = schema.url(&proxy.addr().to_string());
    let api_url = server.url();
    let concurrency = p.api_concurrency.to_string();
    let mut agent = Agent::spec(dir.path())
        .envs([
            ("CENTRAL_DATABASE_URL", db_url.as_str()),
            ("AGENT_ID", schema.name.as_str()),
            ("CENTRAL_API_URL", api_url.as_str()),
            ("CENTRAL_API_CONCURRENCY", concurrency.as_str()),
            // Long enough that no answer of the returning API is given up on under the drain's
            // load (a timed-out request is sent again, and the test counts exact deliveries).
            ("CENTRAL_API_TIMEOUT_SECS", "30"),
            ("CRONTAB", "* * * * * *"),
            // Retries back off to a minute, as a long outage does with the default (5 min):
            // the tick's probe, not the retry time, notices that a sink is back.
            ("RETRY_BASE_SECS", "1"),
            ("RETRY_MAX_SECS", "60"),
            // No heartbeat rows in the schema: only records are counted there.
            ("HEARTBEAT_SECS", "0"),
        ])
        .spawn();
    agent.wait_ready(Duration::from_secs(30)).await;

    // Post in arrays over `keys` keys, four requests at a time (so the agent's group commit
    // has company); sample VmRSS after each round.
    let started = Instant::now();
    let url = agent.url("/v1/records/create/patient");
    let client = agent.client().clone();
    let tenth = p.records / 10;
    let mut acked: Vec<Staged> = Vec::with_capacity(p.records);
    let mut posted = 0usize;
    let numbers: Vec<usize> = (0..p.records).collect();
    let arrays: Vec<&[usize]> = numbers.chunks(p.batch.max(1)).collect();
    for round in arrays.chunks(4) {
        let sends = round.iter().map(|chunk| {
            let bodies: Vec<Value> = chunk
                .iter()
                .map(|&n| json!({"id": format!("k{:05}", n % p.keys), "n": n}))
                .collect();
            let client = client.clone();
            let url = url.clone();
            async move {
                let answer = client
                    .post(&url)
                    .json(&bodies)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("posting an array: {e}"));
                let code = answer.status();
                let answer: Value = answer.json().await.unwrap_or(Value::Null);
                assert_eq!(code.as_u16(), 202, "posting an array: {answer}");
                (bodies, answer)
            }
        });
        for (bodies, answer) in futures_util::future::join_all(sends).await {
            let ids = answer["ids"].as_array().expect("ids");
            let seqs = answer["seqs"].as_array().expect("seqs");
            for ((body, id), seq) in bodies.into_iter().zip(ids).zip(seqs) {
                acked.push(Staged {
                    id: id.as_str().expect("an id").to_owned(),
                    seq: seq.as_u64().expect("a seq"),
                    action: "create".into(),
                    entity: "patient".into(),
                    key: body["id"].as_str().expect("a key").to_owned(),
                    payload: body,
                    path: None,
                });
            }
        }
        let before = posted;
        posted = acked.len();
        let kib = rss(&agent);
        if before < p.records / 2 && posted >= p.records / 2 {
            report.rss_half_kib = kib;
        }
        if before < tenth && posted >= tenth {
            report.rss_first_tenth_kib = kib;
        } else if posted > tenth {
            report.rss_max_kib = report.rss_max_kib.max(kib);
        }
    }
    report.ingest_secs = started.elapsed().as_secs_f64();
    // A few ticks with both sinks still down: the agent keeps probing, memory must not grow.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        report.rss_max_kib = report.rss_max_kib.max(rss(&agent));
    }
    let during = status(&agent).await;
    if during["records_pending"] != json!(p.records) {
        report.problems.push(format!(
            "during the outage the status should count {} records pending: {during}",
            p.records
        ));
    }
    for sink in ["database", "api"] {
        if !sink_status(&during, sink)["last_error"].is_string() {
            report.problems.push(format!(
                "the {sink} sink shows no failed attempt during the outage: {during}"
            ));
        }
    }
    if !server.requests().is_empty() {
        report
            .problems
            .push("the API got requests while its port was closed".into());
    }
    if report.rss_max_kib > report.rss_first_tenth_kib + p.rss_slack_kib {
        report.problems.push(format!(
            "memory grew during the outage: VmRSS {} KiB after {tenth} records, up to {} KiB later (allowed {} KiB more)",
            report.rss_first_tenth_kib, report.rss_max_kib, p.rss_slack_kib
        ));
    }

    // Both come back; the backlog drains.
    proxy.up().await;
    server.up().await;
    let back = Instant::now();
    match wait_sinks_drained(&agent, back, p.drain_timeout).await {
        Ok(times) => {
            report.drain_secs = times
                .into_iter()
                .map(|(k, v)| (k, v.as_secs_f64()))
                .collect();
        }
        Err(e) => report.problems.push(e),
    }
    let none = BTreeSet::new();
    report.pg = check_pg(&schema, &acked, &none, &none, &mut report.problems).await;
    report.api = check_api(
        &server.requests(),
        &acked,
        &none,
        &none,
        &[],
        &mut report.problems,
    );
    if report.api.resent > 0 || report.api.doubled > 0 {
        report.problems.push(format!(
            "the API got {} second request(s) for delivered records with nothing cut",
            report.api.resent + report.api.doubled
        ));
    }
    drop(agent);
    if report.problems.is_empty() {
        schema.drop_schema().await;
    }
    report
}

// ---------------------------------------------------------------------------------------------
// Flapping sink

/// Counts and durations of [`flapping`].
#[derive(Debug, Clone)]
pub struct FlapParams {
    /// How long the API flaps (then it stays up while the rest drains).
    pub duration: Duration,
    /// Mean length of one phase; each lasts 0.75 to 1.25 times this.
    pub phase: Duration,
    /// Distinct keys, and the most records in flight at once.
    pub keys: usize,
    /// Records per key, posted during the first three quarters of `duration`.
    pub per_key: usize,
    pub seed: u64,
}

/// One phase of [`flapping`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Up,
    /// The gate resets every connection.
    Refusing,
    /// Every request sleeps past the agent's timeout, then answers 503 (so it never applies).
    Stalling,
    /// Every request answers 500.
    Failing,
}

/// One down phase and what the agent sent during it.
#[derive(Debug, Clone)]
pub struct DownPhase {
    pub phase: Phase,
    pub secs: f64,
    /// Connections refused (Refusing) or requests received (Stalling, Failing).
    pub attempts: u64,
    pub bound: u64,
}

/// What [`flapping`] counted.
#[derive(Debug, Clone, Default)]
pub struct FlapReport {
    pub records: usize,
    pub phases: usize,
    pub down: Vec<DownPhase>,
    pub api: Applied,
    pub requests: usize,
    pub drain_secs: f64,
    pub problems: Vec<String>,
}

/// The agent settings [`flapping`] runs with, and the bound they give.
const FLAP_TIMEOUT_SECS: f64 = 0.5;
const FLAP_STALL: Duration = Duration::from_millis(1_500);
const FLAP_RETRY_BASE_SECS: f64 = 0.5;
const FLAP_RETRY_MAX_SECS: f64 = 2.0;
/// `CRONTAB` ticks every second.
const FLAP_TICK_SECS: f64 = 1.0;

/// The most attempts the agent may make against a sink that fails everything for `secs`
/// seconds, with `keys` keys, derived from the batcher (`agent/src/batcher.rs`):
///
/// - A record is sent by a flush cycle only when its retry time has come (`next_batch` leases
///   due records only). After its a-th failure it waits `backoff(a)`: `min(max, base · 2^a)`
///   times a jitter factor in [0.5, 1), so at least `d(a) = 0.5 · min(max, base · 2^a)` — the
///   sink sends no `Retry-After` here. `a` only grows while the record is pending, so
///   assuming `a = 0` at the start of the phase over-counts. Sends of one record in the
///   phase: `n = 1 + max{m : d(0) + … + d(m−1) ≤ secs}`, plus 1 for a send already due at the
///   phase's first instant (one leased just before it, or woken by the last probe that
///   succeeded).
/// - Only the head of each key can be sent (a record waiting for its retry holds back the
///   later records of its key: contract 3), so at most `keys` records are tried.
/// - Besides, each `CRONTAB` tick sends one probe (the oldest waiting head, whatever its retry
///   time): at most `secs / tick + 1`.
///
/// So `attempts ≤ keys · (n + 1) + secs / tick + 1`. With base 0.5 s and max 2 s,
/// `d = 0.25, 0.5, 1, 1, …`: a 4 s phase gives `n = 6` (sends at 0, 0.25, 0.75, 1.75, 2.75,
/// 3.75 s), so 20 keys allow 20 · 7 + 5 = 145 attempts in 4 s. An agent without backoff
/// would retry each failed batch at once: a 500 comes back in about a millisecond, so
/// thousands of requests in the same 4 s.
pub fn flap_attempt_bound(secs: f64, keys: usize) -> u64 {
    let mut n = 1u64;
    let mut waited = 0.0;
    let mut a = 0i32;
    loop {
        let d = 0.5 * FLAP_RETRY_MAX_SECS.min(FLAP_RETRY_BASE_SECS * 2f64.powi(a));
        if waited + d > secs {
            break;
        }
        waited += d;
        n += 1;
        a += 1;
    }
    keys as u64 * (n + 1) + (secs / FLAP_TICK_SECS).floor() as u64 + 1
}

/// Flapping sink: the API (behind a [`TcpGate`]) cycles through up, refusing, stalling
/// past the agent's timeout and answering 500, in phases of about `phase`, for `duration`,
/// while records over `keys` keys arrive. Then it stays up until everything drained. Every
/// record must take effect exactly once (a second 2xx only after a cut lost the first answer),
/// per key in seq order, and each down phase's attempts must stay under
/// [`flap_attempt_bound`].
pub async fn flapping(p: &FlapParams) -> FlapReport {
    let mut report = FlapReport::default();
    let server = FlakyHttpServer::start_with_seed(p.seed).await;
    let gate = TcpGate::start(server.addr()).await;
    let dir = tempfile::Builder::new()
        .prefix("estafeta-flap-")
        .tempdir()
        .expect("a temporary directory");
    let url = gate.url();
    let timeout = FLAP_TIMEOUT_SECS.to_string();
    let base = FLAP_RETRY_BASE_SECS.to_string();
    let max = FLAP_RETRY_MAX_SECS.to_string();
    let concurrency = p.keys.to_string();
    let mut agent = Agent::spec(dir.path())
        .envs([
            ("CENTRAL_API_URL", url.as_str()),
            ("CENTRAL_API_TIMEOUT_SECS", timeout.as_str()),
            ("CENTRAL_API_CONCURRENCY", concurrency.as_str()),
            ("CRONTAB", "* * * * * *"),
            ("RETRY_BASE_SECS", base.as_str()),
            ("RETRY_MAX_SECS", max.as_str()),
        ])
        .spawn();
    agent.wait_ready(Duration::from_secs(30)).await;

    let plan = mixed_plan(p.keys, p.per_key, p.seed);
    report.records = plan.len();
    let started = Instant::now();
    let post_for = p.duration.mul_f64(0.75);
    let chunks = plan.len().div_ceil(20).max(1);
    let pause = post_for / chunks as u32;
    let poster = async {
        let mut staged = Vec::with_capacity(plan.len());
        for (i, chunk) in plan.chunks(20).enumerate() {
            staged.extend(post_plan(&agent, "patient", chunk, 5, p.seed + i as u64).await);
            tokio::time::sleep(pause).await;
        }
        staged
    };
    let driver = async {
        let mut rng = Rng::new(p.seed);
        let cycle = [
            Phase::Up,
            Phase::Refusing,
            Phase::Up,
            Phase::Stalling,
            Phase::Up,
            Phase::Failing,
        ];
        let mut down = Vec::new();
        let mut phases = 0;
        let mut i = 0;
        while started.elapsed() < p.duration {
            let phase = cycle[i % cycle.len()];
            i += 1;
            phases += 1;
            let length = p
                .phase
                .mul_f64(0.75 + 0.5 * (rng.below(1000) as f64 / 1000.0));
            let refused_before = gate.refused();
            let requests_before = server.requests().len();
            let from = Instant::now();
            match phase {
                Phase::Up => {}
                Phase::Refusing => gate.refuse(),
                Phase::Stalling => {
                    server.stall(1.0, FLAP_STALL);
                    server.stall_status(503);
                }
                Phase::Failing => {
                    server.fail_status(500);
                    server.fail_fraction(1.0);
                }
            }
            tokio::time::sleep(length).await;
            let secs = from.elapsed().as_secs_f64();
            // Count before the phase ends: requests that arrive after `behave` are up-phase.
            let attempts = match phase {
                Phase::Up => 0,
                Phase::Refusing => gate.refused() - refused_before,
                Phase::Stalling | Phase::Failing => {
                    (server.requests().len() - requests_before) as u64
                }
            };
            gate.open();
            server.behave();
            if phase != Phase::Up {
                down.push(DownPhase {
                    phase,
                    secs,
                    attempts,
                    bound: flap_attempt_bound(secs, p.keys),
                });
            }
        }
        (down, phases)
    };
    let (staged, (down, phases)) = tokio::join!(poster, driver);
    report.phases = phases;
    let back = Instant::now();
    match wait_sinks_drained(&agent, back, Duration::from_secs(120)).await {
        Ok(_) => report.drain_secs = back.elapsed().as_secs_f64(),
        Err(e) => report.problems.push(e),
    }
    for d in &down {
        if d.attempts > d.bound {
            report.problems.push(format!(
                "{:?} for {:.1} s: {} attempts, more than the backoff allows ({})",
                d.phase, d.secs, d.attempts, d.bound
            ));
        }
    }
    if down.iter().map(|d| d.attempts).sum::<u64>() == 0 {
        report
            .problems
            .push("no attempt at all while the API was down: the test proved nothing".into());
    }
    report.down = down;
    let requests = server.requests();
    report.requests = requests.len();
    let none = BTreeSet::new();
    // A request the gate had already passed on may be read by the server just after the cut.
    let cuts: Vec<(Instant, Instant)> = gate
        .cuts()
        .into_iter()
        .map(|c| (c, c + Duration::from_millis(500)))
        .collect();
    report.api = check_api(
        &requests,
        &staged,
        &none,
        &none,
        &cuts,
        &mut report.problems,
    );
    if report.api.lost > 0 {
        report.problems.push(format!(
            "{} acknowledged records never took effect",
            report.api.lost
        ));
    }
    report
}

// ---------------------------------------------------------------------------------------------
// Crash loop under load from a separate process

/// Counts of [`crash_loop`].
#[derive(Debug, Clone)]
pub struct CrashParams {
    /// SIGKILL + restart cycles.
    pub cycles: usize,
    /// Time between restarts and the next SIGKILL, drawn uniformly in this range.
    pub kill_after: (Duration, Duration),
    /// Load process: concurrent connections, requests per second in all, records per request,
    /// keys per connection.
    pub connections: usize,
    pub rate: f64,
    pub batch: usize,
    pub keys: u64,
    /// Fraction of API requests answered 503.
    pub fail_fraction: f64,
    pub drain_timeout: Duration,
    pub seed: u64,
}

/// What [`crash_loop`] counted.
#[derive(Debug, Clone, Default)]
pub struct CrashReport {
    pub cycles: usize,
    pub acknowledged: usize,
    /// Records whose request the load process gave up on without an answer (it retries until
    /// `--retry-for` seconds after its end, so in practice none).
    pub unanswered: usize,
    /// From the load process: sends beyond the first of a request (after no answer or a 5xx),
    /// 202s that were replays of the first answer (`Idempotent-Replayed: true`), requests given
    /// up on.
    pub retries: u64,
    pub replayed: u64,
    pub gave_up: u64,
    /// By the agent's record id.
    pub pg: Applied,
    pub api: Applied,
    /// By the client's identity of each record (payload `id`, `n`: [`check_identities`]):
    /// applied more than once (PostgreSQL: more than one row; API: under more than one record
    /// id), and acknowledged but never applied.
    pub applied_twice_pg: usize,
    pub applied_twice_api: usize,
    pub business_lost_pg: usize,
    pub business_lost_api: usize,
    pub drain_secs: f64,
    pub peak_rss_kib: u64,
    /// The load process's own summary line.
    pub load_summary: Value,
    pub problems: Vec<String>,
}

/// How long the crash loop's load process keeps retrying a request after its run ends
/// (`--retry-for`) before giving up on it.
const LOAD_RETRY_FOR_SECS: f64 = 60.0;

/// The `estafeta-load` binary beside the test (or soak) executable.
pub fn load_bin() -> PathBuf {
    let bin = profile_dir().join(format!("estafeta-load{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p estafeta-e2e --bin estafeta-load` (cargo test builds it)",
        bin.display()
    );
    bin
}

/// What the load process sends: connections, requests per second in all, records per
/// request, keys per connection.
#[derive(Debug, Clone)]
pub struct LoadShape {
    pub connections: usize,
    pub rate: f64,
    pub batch: usize,
    pub keys: u64,
}

/// The crash tests' separate load process: `estafeta-load --retry --ack-log`, whose clients
/// send a request that got no answer or a 5xx again, same body and `Idempotency-Key`, until
/// it is answered, and write down every acknowledged record as soon as its answer is read.
pub struct RetryingLoad {
    child: tokio::process::Child,
    secs: f64,
}

impl RetryingLoad {
    /// Starts it against `url` for `secs` seconds (then `LOAD_RETRY_FOR_SECS` more for the
    /// requests still unanswered); record ids start with `prefix`.
    ///
    /// # Panics
    /// When `estafeta-load` cannot be started.
    pub fn spawn(url: &str, shape: &LoadShape, secs: f64, prefix: &str, ack_log: &Path) -> Self {
        let child = tokio::process::Command::new(load_bin())
            .arg("--url")
            .arg(url)
            .args(["--connections", &shape.connections.to_string()])
            .args(["--rate", &shape.rate.to_string()])
            .args(["--batch", &shape.batch.to_string()])
            .args(["--keys", &shape.keys.to_string()])
            .args(["--payload-bytes", "120"])
            .args(["--duration", &secs.to_string()])
            .args(["--timeout", "10"])
            .args(["--id-prefix", prefix])
            .arg("--retry")
            .args(["--retry-for", &LOAD_RETRY_FOR_SECS.to_string()])
            .arg("--ack-log")
            .arg(ack_log)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting estafeta-load");
        RetryingLoad { child, secs }
    }

    /// Waits for it to stop by itself and returns its summary line. A failed exit, or a
    /// request that ended with an answer other than 202 although it was retried, is a problem.
    ///
    /// # Panics
    /// When it does not stop within its duration plus a minute and a half.
    pub async fn finish(self, problems: &mut Vec<String>) -> Value {
        let out = tokio::time::timeout(
            Duration::from_secs_f64(self.secs + LOAD_RETRY_FOR_SECS + 90.0),
            self.child.wait_with_output(),
        )
        .await
        .expect("estafeta-load stops by itself")
        .expect("estafeta-load ran");
        let summary = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or(Value::Null);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            problems.push(format!("estafeta-load failed ({}): {stderr}", out.status));
        }
        // A retrying client ends each request with a 202, or gives up at the very end; a
        // refused connection after the load's end never carried its request. Anything else
        // (a 409 for a key sent again, a 400, a replay of a key never sent) is the agent
        // breaking its promise.
        if let Some(kinds) = summary["error_kinds"].as_object() {
            let other: BTreeMap<&String, &Value> = kinds
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "gave_up" | "connect"))
                .collect();
            if !other.is_empty() {
                problems.push(format!(
                    "estafeta-load: requests ended with answers other than 202 although they were retried: {other:?}; {}",
                    stderr.trim()
                ));
            }
        }
        summary
    }
}

/// Reads an `estafeta-load --ack-log` file: the acknowledged records (in file order) and the
/// `(id field, n)` of every record sent without an answer (with `--retry`: given up on).
pub fn read_ack_log(path: &Path) -> (Vec<Staged>, BTreeSet<(String, u64)>) {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading the ack log {}: {e}", path.display()));
    let mut acked = Vec::new();
    let mut unanswered = BTreeSet::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("ack log line is not JSON ({e}): {line}"));
        let key = v["key"].as_str().expect("a key").to_owned();
        let n = v["n"].as_u64().expect("an n");
        if v["unanswered"] == true {
            unanswered.insert((key, n));
        } else {
            acked.push(Staged {
                id: v["id"].as_str().expect("an id").to_owned(),
                seq: v["seq"].as_u64().expect("a seq"),
                action: "create".into(),
                entity: "patient".into(),
                key,
                payload: v["payload"].clone(),
                path: None,
            });
        }
    }
    (acked, unanswered)
}

/// Crash loop under load: `estafeta-load` (a separate process) posts at a paced rate from
/// `connections` clients and writes down every acknowledged record, while the agent is
/// SIGKILLed `cycles` times at random moments and restarted on the same folder. Its clients
/// retry like real ones (`--retry`): a request that got no answer (the agent died under it)
/// or a 5xx is sent again with the same body and `Idempotency-Key` until answered, and the
/// agent must answer a repeat with the first answer and stage nothing twice. It delivers to
/// PostgreSQL (its own schema) and to an API that answers 503 to `fail_fraction` of requests.
/// In the end every acknowledged record is applied once at each sink, per key in seq order,
/// both by the agent's record id ([`check_pg`], [`check_api`]) and by the client's identity of
/// the record ([`check_identities`]: a request staged before a SIGKILL and again when retried
/// lands under two record ids, which only the second check sees); the only other records
/// applied are ones whose request the load process gave up on.
pub async fn crash_loop(p: &CrashParams) -> CrashReport {
    let mut report = CrashReport::default();
    let schema = PgSchema::create("crash").await;
    let server = FlakyHttpServer::start_with_seed(p.seed).await;
    server.fail_fraction(p.fail_fraction);
    // Answers take a moment, so SIGKILLs land with deliveries in flight.
    server.delay_all(Duration::from_millis(20));
    let dir = tempfile::Builder::new()
        .prefix("estafeta-crash-")
        .tempdir()
        .expect("a temporary directory");
    let db_url = schema.url("127.0.0.1:5432");
    let api_url = server.url();
    let mut agent = Agent::spec(dir.path())
        .envs([
            ("CENTRAL_DATABASE_URL", db_url.as_str()),
            ("AGENT_ID", schema.name.as_str()),
            ("HEARTBEAT_SECS", "0"),
            ("CENTRAL_API_URL", api_url.as_str()),
            ("CENTRAL_API_TIMEOUT_SECS", "5"),
            ("CENTRAL_API_CONCURRENCY", "32"),
            ("CRONTAB", "* * * * * *"),
            ("RETRY_BASE_SECS", "0.2"),
            ("RETRY_MAX_SECS", "1"),
        ])
        .spawn();
    agent.wait_ready(Duration::from_secs(30)).await;

    let mut rng = Rng::new(p.seed);
    let (lo, hi) = p.kill_after;
    let spread = hi.saturating_sub(lo).as_millis().max(1) as usize;
    // The load runs through every cycle (each takes at most `hi`, a restart about a second
    // more) and stops by itself shortly after.
    let load_secs = p.cycles as f64 * (hi.as_secs_f64() + 0.5) + 2.0;
    let ack_log = dir.path().join("acks.jsonl");
    let load = RetryingLoad::spawn(
        &agent.url("/v1/records/create/patient"),
        &LoadShape {
            connections: p.connections,
            rate: p.rate,
            batch: p.batch,
            keys: p.keys,
        },
        load_secs,
        "L",
        &ack_log,
    );

    // (SIGKILL, start of the next process) of each cycle.
    let mut kills = Vec::with_capacity(p.cycles);
    for cycle in 1..=p.cycles {
        tokio::time::sleep(lo + Duration::from_millis(rng.below(spread) as u64)).await;
        report.peak_rss_kib = report.peak_rss_kib.max(rss(&agent));
        let killed = Instant::now();
        let exit = agent.kill9();
        assert!(
            !exit.success(),
            "cycle {cycle}: the agent should have died of SIGKILL: {exit}"
        );
        tokio::time::sleep(Duration::from_millis(rng.below(300) as u64)).await;
        kills.push((killed, Instant::now()));
        agent.restart();
        agent.wait_ready(Duration::from_secs(30)).await;
        report.cycles = cycle;
    }
    report.load_summary = load.finish(&mut report.problems).await;
    let figure = |name: &str| report.load_summary[name].as_u64().unwrap_or(0);
    report.retries = figure("retries");
    report.replayed = figure("replayed");
    report.gave_up = figure("gave_up");
    let (acked, unanswered) = read_ack_log(&ack_log);
    report.acknowledged = acked.len();
    report.unanswered = unanswered.len();
    let acked_identities: BTreeSet<(String, u64)> =
        acked.iter().filter_map(|s| identity(&s.payload)).collect();
    if acked.len() < 10 {
        report.problems.push(format!(
            "only {} records acknowledged: the load did not run",
            acked.len()
        ));
    }
    let back = Instant::now();
    match wait_sinks_drained(&agent, back, p.drain_timeout).await {
        Ok(_) => report.drain_secs = back.elapsed().as_secs_f64(),
        Err(e) => report.problems.push(e),
    }
    report.peak_rss_kib = report.peak_rss_kib.max(rss(&agent));
    report.pg = check_pg(
        &schema,
        &acked,
        &unanswered,
        &acked_identities,
        &mut report.problems,
    )
    .await;
    let requests = server.requests();
    report.api = check_api(
        &requests,
        &acked,
        &unanswered,
        &acked_identities,
        &kills,
        &mut report.problems,
    );
    if report.api.lost > 0 {
        report.problems.push(format!(
            "API: {} acknowledged records never took effect",
            report.api.lost
        ));
    }
    let pg = check_identities(
        "PostgreSQL",
        &landed_rows(&schema.rows().await),
        &acked,
        true,
        &mut report.problems,
    );
    let api = check_identities(
        "API",
        &landed_requests(&requests),
        &acked,
        false,
        &mut report.problems,
    );
    report.applied_twice_pg = pg.applied_twice;
    report.applied_twice_api = api.applied_twice;
    report.business_lost_pg = pg.lost;
    report.business_lost_api = api.lost;
    drop(agent);
    if report.problems.is_empty() {
        schema.drop_schema().await;
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acked(id: &str, seq: u64, key: &str, n: u64) -> Staged {
        Staged {
            id: id.into(),
            seq,
            action: "create".into(),
            entity: "patient".into(),
            key: key.into(),
            payload: json!({"id": key, "n": n, "kind": "bench"}),
            path: None,
        }
    }

    fn landed(id: &str, seq: u64, key: &str, n: u64, at: &str) -> Landed {
        Landed {
            identity: Some((key.into(), n)),
            id: id.into(),
            seq: Some(seq),
            at: at.into(),
        }
    }

    #[test]
    fn a_client_record_staged_twice_counts_as_applied_twice() {
        // L-0-k1 n 1 was staged as A before a SIGKILL, and again as B when retried (B was
        // acknowledged); n 3 was acknowledged as C and never landed.
        let acks = [
            acked("B", 2, "L-0-k1", 1),
            acked("C", 3, "L-0-k1", 3),
            acked("D", 4, "L-0-k0", 2),
        ];
        let rows = [
            landed("A", 1, "L-0-k1", 1, "row 1"),
            landed("B", 2, "L-0-k1", 1, "row 2"),
            landed("D", 4, "L-0-k0", 2, "row 3"),
        ];
        let mut problems = Vec::new();
        let found = check_identities("PostgreSQL", &rows, &acks, true, &mut problems);
        assert_eq!((found.applied_twice, found.lost, found.disorder), (1, 1, 0));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("L-0-k1 n 1 took effect 2 times as A (seq 1; row 1), B (seq 2; row 2), acknowledged as B (seq 2)"),
            "{problems:?}"
        );
        assert!(
            problems[1].contains("L-0-k1 n 3 (record C seq 3)"),
            "{problems:?}"
        );
    }

    #[test]
    fn at_the_api_a_resend_of_the_same_record_id_is_not_applied_twice() {
        let acks = [acked("B", 2, "L-0-k1", 1), acked("C", 5, "L-0-k1", 3)];
        let requests = [
            landed("B", 2, "L-0-k1", 1, "request #1"),
            landed("B", 2, "L-0-k1", 1, "request #4"),
            landed("C", 5, "L-0-k1", 3, "request #5"),
        ];
        let mut problems = Vec::new();
        let found = check_identities("API", &requests, &acks, false, &mut problems);
        assert_eq!((found.applied_twice, found.lost, found.disorder), (0, 0, 0));
        assert!(problems.is_empty(), "{problems:?}");
        // A second record id for the same client record is applied twice, and n going back
        // is out of order.
        let requests = [
            landed("A", 1, "L-0-k1", 1, "request #1"),
            landed("C", 5, "L-0-k1", 3, "request #2"),
            landed("B", 2, "L-0-k1", 1, "request #3"),
        ];
        let found = check_identities("API", &requests, &acks, false, &mut problems);
        assert_eq!((found.applied_twice, found.lost, found.disorder), (1, 0, 1));
        assert!(
            problems[0].contains("under different record ids"),
            "{problems:?}"
        );
        assert!(
            problems[1].contains("L-0-k1: n 1 after n 3"),
            "{problems:?}"
        );
    }
}
