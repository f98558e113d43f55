//! Power cuts, not only process kills (contract 1, durable before acknowledged; workstations
//! switched off at the wall, with retrying clients, WORKLOADS.md). The staging folder is a
//! [`ForgetfulFs`] mount, and each cycle is: load from retrying clients → SIGKILL the agent →
//! power cut (everything not fsync'd forgotten, sometimes the last unsynced write torn) →
//! remount → restart → check what must have survived. Written once and parameterized by
//! counts: the CI test (`tests/e2e/power_cut.rs`) runs it small, `scripts/soak` long.
//!
//! What flows through the agent during the cycles, and what each stream proves:
//!
//! - **patient** records from `estafeta-load --retry` (a separate process whose clients resend
//!   an unanswered or 5xx request with the same body and `Idempotency-Key`): every acknowledged
//!   record lands once at PostgreSQL and at the API, by the client's own identity of it
//!   (payload `id` and `n`), and per key in order.
//! - **src** rows of a SQL source polling a PostgreSQL table that grows during the cycles: each
//!   row lands exactly once, so the source's checkpoint was never ahead of the records it
//!   vouches for (a skipped row) nor behind them without their records (a row read twice).
//! - **rejected** records, which the API refuses with 422: they become dead letters, and a dead
//!   letter seen before a cut is still one after it (never lost), with every record landing
//!   once at PostgreSQL.
//! - **fixable** records, refused until half-way, when the API is fixed and their dead letters
//!   are requeued through `POST /v1/dead-letters/api/{seq}/requeue`: once a requeue was
//!   acknowledged, a cut never brings the dead letter back, and each lands once at the API.
//! - the **sequence counter**: no sequence number is ever given to two records, checked over
//!   every row PostgreSQL received.
//!
//! Each returns a report whose `problems` list what a user would call a failure; the caller
//! asserts it is empty. Failing to set up (no FUSE, no PostgreSQL) panics at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::agent::Agent;
use crate::db::{PG_URL, pg};
use crate::flaky::FlakyHttpServer;
use crate::powercut_fs::ForgetfulFs;
use crate::reliability::{
    ByIdentity, Landed, LoadShape, PgSchema, RetryingLoad, check_identities, identity,
    landed_requests, read_ack_log,
};
use crate::support::{log_tail, status};
use crate::workload::Rng;

/// Counts of [`power_cut_cycles`].
#[derive(Debug, Clone)]
pub struct PowerCutParams {
    /// SIGKILL + power cut + restart cycles.
    pub cycles: usize,
    /// Time between a restart and the next cut, drawn uniformly in this range.
    pub cut_after: (Duration, Duration),
    /// Load process: connections, requests per second in all, records per request, keys per
    /// connection.
    pub connections: usize,
    pub rate: f64,
    pub batch: usize,
    pub keys: u64,
    /// Fraction of API requests answered 503.
    pub fail_fraction: f64,
    /// Every this many cuts, the most recent unsynced write is torn at a random byte (0: never).
    pub tear_every: usize,
    /// How long each fsync takes once its data is durable ([`ForgetfulFs::set_sync_delay`]).
    pub sync_delay: Duration,
    pub drain_timeout: Duration,
    pub seed: u64,
    /// Encryption at rest on: a key made by `estafeta key generate` beside (not on) the cut
    /// folder, named by `STAGING_KEY_FILE`.
    pub sealed: bool,
}

/// What [`power_cut_cycles`] counted.
#[derive(Debug, Clone, Default)]
pub struct PowerCutReport {
    pub cycles: usize,
    /// Patient records acknowledged to the load process, and its retry figures.
    pub acknowledged: usize,
    pub unanswered: usize,
    pub load_summary: Value,
    /// What the cuts forgot, in all.
    pub bytes_forgotten: u64,
    pub files_reverted: usize,
    pub entries_forgotten: usize,
    pub tears: usize,
    /// Rows the SQL source had to read; dead letters made (rejected) and requeued (fixable).
    pub source_rows: usize,
    pub rejected: usize,
    pub fixable: usize,
    pub requeued: usize,
    pub drain_secs: f64,
    /// The patient records by the client's identity, at PostgreSQL and at the API.
    pub pg: ByIdentity,
    pub api: ByIdentity,
    pub problems: Vec<String>,
}

/// One row of the landing table, with the entity the checks sort by.
struct Row {
    id: String,
    seq: u64,
    entity: String,
    payload: Value,
}

async fn landing_rows(schema: &PgSchema) -> Vec<Row> {
    pg().await
        .query(
            &format!(
                "SELECT idempotency_key, seq, entity, payload FROM {}.estafeta_records ORDER BY id",
                schema.name
            ),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("reading {}.estafeta_records: {e}", schema.name))
        .iter()
        .map(|r| Row {
            id: r.get(0),
            seq: r.get::<_, i64>(1) as u64,
            entity: r.get(2),
            payload: r.get(3),
        })
        .collect()
}

/// A record a test-side client got acknowledged: its entity, payload id and receipt.
#[derive(Debug, Clone)]
struct Acked {
    entity: String,
    tag: String,
    id: String,
    seq: u64,
}

/// POSTs `body` with `Idempotency-Key: key` until the agent answers it (not 5xx), as a real
/// client does across a restart; gives up after `patience`.
async fn post_retrying(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Value,
    patience: Duration,
) -> Result<Value, String> {
    let deadline = Instant::now() + patience;
    loop {
        let sent = client
            .post(url)
            .header("Idempotency-Key", key)
            .json(body)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        match sent {
            Ok(answer) if answer.status().as_u16() == 202 => {
                return answer.json().await.map_err(|e| e.to_string());
            }
            Ok(answer) if !answer.status().is_server_error() => {
                return Err(format!("{url}: HTTP {}", answer.status()));
            }
            _ if Instant::now() >= deadline => {
                return Err(format!("{url}: no answer within {patience:?}"));
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The seqs of the dead letters at sink `api` whose entity is `entity`, or `None` when the
/// agent did not answer.
async fn dead_seqs(client: &reqwest::Client, base: &str, entity: &str) -> Option<BTreeSet<u64>> {
    let answer: Value = client
        .get(format!("{base}/v1/dead-letters?limit=1000"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(
        answer["dead_letters"]
            .as_array()?
            .iter()
            .filter(|d| d["sink"] == "api" && d["entity"] == entity)
            .filter_map(|d| d["seq"].as_u64())
            .collect(),
    )
}

/// Power cuts under load from retrying clients (see the module's documentation).
///
/// # Panics
/// When FUSE cannot be mounted, PostgreSQL is missing or the agent does not start.
/// One power-cut scenario at a time in a test process: each runs a FUSE folder, a load process
/// and a restarting agent on a machine of two cores, and two at once starve each other's agent
/// into timeouts that say nothing about power cuts.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn power_cut_cycles(p: &PowerCutParams) -> PowerCutReport {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut report = PowerCutReport::default();
    let schema = PgSchema::create("powercut").await;
    let source_table = format!("{}.src_rows", schema.name);
    pg().await
        .batch_execute(&format!(
            "CREATE TABLE {source_table} (id BIGSERIAL PRIMARY KEY, note TEXT NOT NULL)"
        ))
        .await
        .expect("creating the source table");
    let server = FlakyHttpServer::start_with_seed(p.seed).await;
    server.fail_fraction(p.fail_fraction);
    server.delay_all(Duration::from_millis(10));
    server.status_for("/rejected", 422);
    server.status_for("/fixable", 422);

    let dir = tempfile::Builder::new()
        .prefix("estafeta-powercut-")
        .tempdir()
        .expect("a temporary directory");
    let staging = dir.path().join("staging");
    std::fs::create_dir(&staging).expect("creating the mountpoint");
    let mut fs = ForgetfulFs::mount(&staging).unwrap_or_else(|e| {
        panic!("the power-cut test needs FUSE (run scripts/install-deps as root): {e}")
    });
    fs.set_sync_delay(p.sync_delay);
    write_source_config(dir.path(), &source_table);

    let db_url = schema.url("127.0.0.1:5432");
    let api_url = server.url();
    // The key lives off the cut filesystem, as it would on its own volume or in a credential
    // store: the cuts test the staging folder, not the key.
    let key_file = dir.path().join("staging.key");
    if p.sealed {
        let key_arg = key_file.to_str().expect("a UTF-8 temporary path");
        let out = crate::run_cli(dir.path(), &[], &["key", "generate", key_arg]).await;
        assert!(
            out.status.success(),
            "estafeta key generate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut spec = Agent::spec(dir.path());
    if p.sealed {
        spec = spec.env("STAGING_KEY_FILE", &key_file);
    }
    let mut agent = spec
        .envs([
            ("CONFIG_FILE", "estafeta.toml"),
            ("CENTRAL_DATABASE_URL", db_url.as_str()),
            ("AGENT_ID", schema.name.as_str()),
            ("HEARTBEAT_SECS", "0"),
            ("CENTRAL_API_URL", api_url.as_str()),
            ("CENTRAL_API_TIMEOUT_SECS", "5"),
            ("CENTRAL_API_CONCURRENCY", "16"),
            ("CRONTAB", "* * * * * *"),
            ("RETRY_BASE_SECS", "0.2"),
            ("RETRY_MAX_SECS", "1"),
        ])
        .spawn();
    agent.wait_ready(Duration::from_secs(30)).await;
    let base = agent.url("");
    let base = base.trim_end_matches('/').to_owned();

    let mut rng = Rng::new(p.seed);
    let (lo, hi) = p.cut_after;
    let spread = hi.saturating_sub(lo).as_millis().max(1) as usize;
    // A cut and restart take about two seconds more than the wait before it.
    let load_secs = p.cycles as f64 * (hi.as_secs_f64() + 2.0) + 2.0;
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
        "P",
        &ack_log,
    );

    // The source table grows, and rejected / fixable records arrive, until `stop`.
    let stop = Arc::new(AtomicBool::new(false));
    let inserted = Arc::new(AtomicU64::new(0));
    let inserter = tokio::spawn({
        let (stop, inserted, table) = (stop.clone(), inserted.clone(), source_table.clone());
        async move {
            let client = pg().await;
            while !stop.load(Ordering::SeqCst) {
                let n = inserted.load(Ordering::SeqCst);
                client
                    .execute(
                        &format!("INSERT INTO {table} (note) VALUES ($1)"),
                        &[&format!("row {n}")],
                    )
                    .await
                    .expect("inserting a source row");
                inserted.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let side = tokio::spawn({
        let (stop, base) = (stop.clone(), base.clone());
        async move {
            let client = reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("a client");
            let mut acked = Vec::new();
            let mut failures = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let entity = if i.is_multiple_of(2) {
                    "rejected"
                } else {
                    "fixable"
                };
                let tag = format!("{entity}-{i}");
                let url = format!("{base}/v1/records/create/{entity}");
                let body = json!({"id": tag, "n": i});
                match post_retrying(&client, &url, &tag, &body, Duration::from_secs(90)).await {
                    Ok(answer) => acked.push(Acked {
                        entity: entity.to_owned(),
                        tag,
                        id: answer["id"].as_str().unwrap_or_default().to_owned(),
                        seq: answer["seq"].as_u64().unwrap_or_default(),
                    }),
                    Err(e) => failures.push(e),
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            (acked, failures)
        }
    });

    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("a client");
    let mut requeued: BTreeSet<u64> = BTreeSet::new();
    let mut breaks = Vec::with_capacity(p.cycles);
    for cycle in 1..=p.cycles {
        tokio::time::sleep(lo + Duration::from_millis(rng.below(spread) as u64)).await;
        if cycle >= p.cycles.div_ceil(2) {
            // Half-way the API is fixed, and from then on the fixable records' dead letters
            // are put back in line (again at later cycles: a record in flight when the API was
            // fixed may still have been refused).
            server.clear_status_for("/fixable");
            requeue_fixable(&client, &base, &mut requeued).await;
        }
        let dead_before = dead_seqs(&client, &base, "rejected").await;
        let killed = Instant::now();
        let exit = agent.kill9();
        assert!(
            !exit.success(),
            "cycle {cycle}: the agent should have died of SIGKILL: {exit}"
        );
        let tear = (p.tear_every > 0 && cycle.is_multiple_of(p.tear_every))
            .then_some(p.seed ^ cycle as u64);
        match fs.power_cut(tear) {
            Ok(cut) => {
                report.bytes_forgotten += cut.bytes_forgotten;
                report.files_reverted += cut.files_reverted;
                report.entries_forgotten += cut.entries_forgotten;
                report.tears += usize::from(cut.tear.is_some());
            }
            Err(e) => panic!("cycle {cycle}: the power cut failed: {e}"),
        }
        breaks.push((killed, Instant::now()));
        agent.restart();
        agent.wait_ready(Duration::from_secs(30)).await;
        report.cycles = cycle;

        let dead_after = dead_seqs(&client, &base, "rejected")
            .await
            .unwrap_or_default();
        for seq in dead_before.unwrap_or_default().difference(&dead_after) {
            report.problems.push(format!(
                "cycle {cycle}: the dead letter of seq {seq} was lost by the power cut"
            ));
        }
        let fixable_dead = dead_seqs(&client, &base, "fixable")
            .await
            .unwrap_or_default();
        for seq in requeued.intersection(&fixable_dead) {
            report.problems.push(format!(
                "cycle {cycle}: seq {seq} is a dead letter again after its requeue was acknowledged"
            ));
        }
    }
    stop.store(true, Ordering::SeqCst);
    inserter.await.expect("the source inserter");
    let (side_acked, side_failures) = side.await.expect("the side client");
    report.problems.extend(side_failures);
    report.requeued = requeued.len();

    report.load_summary = load.finish(&mut report.problems).await;
    let (acked, unanswered) = read_ack_log(&ack_log);
    report.acknowledged = acked.len();
    report.unanswered = unanswered.len();
    if acked.len() < 10 {
        report.problems.push(format!(
            "only {} records acknowledged: the load did not run",
            acked.len()
        ));
    }
    report.source_rows = inserted.load(Ordering::SeqCst) as usize;

    // The source reads every 200 ms: give it the time to read the last rows inserted. And
    // the last fixable records refused around the API's fix are put back in line.
    // A requeue the agent did not answer (it was still coming back from the last cut) or a
    // record refused just before the fix and settled after the previous pass is asked again,
    // until no fixable dead letter is left; one whose requeue was acknowledged and that is
    // dead again is a problem, not something to requeue again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let before = requeued.clone();
        requeue_fixable(&client, &base, &mut requeued).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let left = match dead_seqs(&client, &base, "fixable").await {
            Some(left) => left,
            None if Instant::now() < deadline => continue,
            None => break,
        };
        let again: Vec<u64> = before.intersection(&left).copied().collect();
        if !again.is_empty() {
            report.problems.push(format!(
                "fixable records {again:?} are dead letters again after their requeue was acknowledged"
            ));
            break;
        }
        if left.is_empty() || Instant::now() > deadline {
            break;
        }
    }
    let drain_started = Instant::now();
    if let Err(e) = wait_settled(&agent, p.drain_timeout).await {
        report.problems.push(e);
    }
    report.drain_secs = drain_started.elapsed().as_secs_f64();

    let rows = landing_rows(&schema).await;
    let requests = server.requests();
    check_sequence_numbers(&rows, &mut report.problems);

    // Patient records, by the client's identity.
    let patient_rows: Vec<Landed> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.entity == "patient")
        .map(|(i, r)| Landed {
            identity: identity(&r.payload),
            id: r.id.clone(),
            seq: Some(r.seq),
            at: format!("row {}", i + 1),
        })
        .collect();
    let patient_requests: Vec<_> = requests
        .iter()
        .filter(|r| r.path.starts_with("/patient"))
        .cloned()
        .collect();
    report.pg = check_identities(
        "PostgreSQL",
        &patient_rows,
        &acked,
        true,
        &mut report.problems,
    );
    report.api = check_identities(
        "API",
        &landed_requests(&patient_requests),
        &acked,
        false,
        &mut report.problems,
    );

    // Source rows: each exactly once at both sinks.
    let source_ids: BTreeMap<i64, usize> = rows
        .iter()
        .filter(|r| r.entity == "src")
        .filter_map(|r| r.payload["id"].as_i64())
        .fold(BTreeMap::new(), |mut m, id| {
            *m.entry(id).or_default() += 1;
            m
        });
    let expected: BTreeSet<i64> = (1..=report.source_rows as i64).collect();
    let missing: Vec<i64> = expected
        .iter()
        .filter(|id| !source_ids.contains_key(id))
        .copied()
        .take(10)
        .collect();
    if !missing.is_empty() {
        report.problems.push(format!(
            "source rows never landed at PostgreSQL (a checkpoint ahead of its records?), first ids: {missing:?}"
        ));
    }
    let twice: Vec<(i64, usize)> = source_ids
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| (*id, *n))
        .take(10)
        .collect();
    if !twice.is_empty() {
        report.problems.push(format!(
            "source rows staged more than once (a checkpoint behind its records), (id, times): {twice:?}"
        ));
    }
    let source_requests: Vec<_> = requests
        .iter()
        .filter(|r| r.path.starts_with("/src"))
        .cloned()
        .collect();
    check_once_per_tag(
        "source rows at the API",
        &source_requests,
        |body| body["id"].as_i64().map(|id| id.to_string()),
        &expected.iter().map(i64::to_string).collect(),
        &mut report.problems,
    );

    // Dead letters: every rejected record is one (and landed once at PostgreSQL); every
    // fixable record took effect once at the API and is no dead letter.
    let dead_rejected = dead_seqs(&client, &base, "rejected")
        .await
        .unwrap_or_default();
    let dead_fixable = dead_seqs(&client, &base, "fixable")
        .await
        .unwrap_or_default();
    for a in &side_acked {
        let landed = rows
            .iter()
            .filter(|r| r.entity == a.entity && r.payload["id"] == a.tag.as_str())
            .count();
        if landed != 1 {
            report.problems.push(format!(
                "{} record {} (seq {}) landed {landed} times at PostgreSQL",
                a.entity, a.id, a.seq
            ));
        }
        match a.entity.as_str() {
            "rejected" if !dead_rejected.contains(&a.seq) => report.problems.push(format!(
                "rejected record seq {} is not a dead letter at the end",
                a.seq
            )),
            "fixable" if dead_fixable.contains(&a.seq) => report.problems.push(format!(
                "fixable record seq {} is still a dead letter at the end",
                a.seq
            )),
            _ => {}
        }
    }
    report.rejected = side_acked.iter().filter(|a| a.entity == "rejected").count();
    report.fixable = side_acked.len() - report.rejected;
    let fixable_requests: Vec<_> = requests
        .iter()
        .filter(|r| r.path.starts_with("/fixable"))
        .cloned()
        .collect();
    check_once_per_tag(
        "fixable records at the API",
        &fixable_requests,
        |body| body["id"].as_str().map(str::to_owned),
        &side_acked
            .iter()
            .filter(|a| a.entity == "fixable")
            .map(|a| a.tag.clone())
            .collect(),
        &mut report.problems,
    );
    let _ = breaks;
    if p.sealed && !staging.join("_state").join("sealed-with").is_file() {
        report.problems.push(
            "STAGING_KEY_FILE was set but _state/sealed-with is missing: nothing was sealed".into(),
        );
    }

    drop(agent);
    if let Err(e) = fs.unmount() {
        report
            .problems
            .push(format!("unmounting the staging folder: {e}"));
    }
    if report.problems.is_empty() {
        schema.drop_schema().await;
    }
    report
}

/// Requeues every dead letter of a fixable record through the API, noting the seqs whose
/// requeue was acknowledged.
async fn requeue_fixable(client: &reqwest::Client, base: &str, requeued: &mut BTreeSet<u64>) {
    for seq in dead_seqs(client, base, "fixable").await.unwrap_or_default() {
        let answer = client
            .post(format!("{base}/v1/dead-letters/api/{seq}/requeue"))
            .header("X-Requested-By", "estafeta")
            .send()
            .await;
        if answer.is_ok_and(|a| a.status().is_success()) {
            requeued.insert(seq);
        }
    }
}

/// `estafeta.toml` with one source reading `table` (`id`, `note`) by id, 20 rows a page.
fn write_source_config(dir: &Path, table: &str) {
    std::fs::create_dir_all(dir.join("sql/sources")).expect("creating sql/sources");
    std::fs::write(
        dir.join("sql/sources/rows.sql"),
        format!(
            "SELECT id, note FROM {table}\n WHERE (:last_id::bigint IS NULL OR id > :last_id)\n ORDER BY id\n LIMIT :limit\n"
        ),
    )
    .expect("writing the source query");
    std::fs::write(
        dir.join("estafeta.toml"),
        format!(
            r#"[[sources]]
name = "rows"
url = "{PG_URL}"
query = "sql/sources/rows.sql"
every = "200ms"
max_records = 20
entity = "src"
action = "create"
key = "id"
checkpoint = "id"
"#
        ),
    )
    .expect("writing estafeta.toml");
}

/// No sequence number was given to two records: over every row PostgreSQL received.
fn check_sequence_numbers(rows: &[Row], problems: &mut Vec<String>) {
    let mut ids_by_seq: BTreeMap<u64, BTreeSet<&str>> = BTreeMap::new();
    for r in rows {
        ids_by_seq.entry(r.seq).or_default().insert(&r.id);
    }
    let reused: Vec<_> = ids_by_seq
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .take(5)
        .collect();
    if !reused.is_empty() {
        problems.push(format!("sequence numbers given to two records: {reused:?}"));
    }
}

/// Each expected tag took effect at the API under exactly one record id (a resend of the
/// same record id after a crash is deduplicated by its `Idempotency-Key`).
fn check_once_per_tag(
    what: &str,
    requests: &[crate::flaky::RecordedRequest],
    tag_of: impl Fn(&Value) -> Option<String>,
    expected: &BTreeSet<String>,
    problems: &mut Vec<String>,
) {
    let mut ids_by_tag: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in requests.iter().filter(|r| r.succeeded()) {
        let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        if let (Some(tag), Some(id)) = (tag_of(&body), r.idempotency_key()) {
            ids_by_tag.entry(tag).or_default().insert(id.to_owned());
        }
    }
    let lost: Vec<&String> = expected
        .iter()
        .filter(|t| !ids_by_tag.contains_key(*t))
        .take(10)
        .collect();
    if !lost.is_empty() {
        problems.push(format!("{what}: never applied: {lost:?}"));
    }
    let twice: Vec<_> = ids_by_tag
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .take(5)
        .collect();
    if !twice.is_empty() {
        problems.push(format!("{what}: applied under two record ids: {twice:?}"));
    }
}

/// Waits until no sink has anything pending or in flight (dead letters stay).
async fn wait_settled(agent: &Agent, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = status(agent).await;
        let settled = s["sinks"].as_array().is_some_and(|sinks| {
            !sinks.is_empty()
                && sinks
                    .iter()
                    .all(|k| k["pending"] == 0 && k["in_flight"] == 0)
        });
        if settled {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "not settled {timeout:?} after the last cut; status: {s}\nagent log tail:\n{}",
                log_tail(agent, 30)
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
