//! What never leaves the agent (contract 7, safe by default: no secrets in logs, no payload text or
//! record keys in logs, status or heartbeats). A canary secret sits in every key that holds one
//! (the central database's password, the API's URL password, `?token=` and token, the ingest token,
//! the update server's user, password and `?token=`, a NATS token in the URL and in
//! `CENTRAL_NATS_TOKEN`, a SQL source's password, an ODBC `PWD={…;…}` with a `;` inside its
//! braces), and canary text in payloads and record keys. With `LOG_LEVEL=trace`, one record is
//! refused for good (the API answers 422 echoing the payload), others are retried (the API answers
//! 503 echoing the key on the key's path; a second HTTP sink refuses connections on
//! `PUT …/patient/<key>`), the update check fails, heartbeats go to PostgreSQL and to the API, and
//! two SQL sources run (one fails). Then no canary appears in the agent's stderr, stdout or log
//! files, the staging folder's state files, `GET /v1/status`, `GET /metrics`, the heartbeat row in
//! `estafeta_agents` or the heartbeats the API received, nor in the output of `check-config`,
//! `status`, `sources` and `update --check`. Secrets appear nowhere at all (not in the index, not
//! in `GET /v1/dead-letters`); payload and key text only where the data lives: segments,
//! dead-letter files (which keep the server's whole answer), the index.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use estafeta_e2e::{
    Agent, FlakyHttpServer, free_port, log_tail, pg, run_cli, sink_status, status_with, unique_name,
};
use serde_json::json;

// Secrets: each must appear nowhere outside the files that configure them.
const DB_PASSWORD: &str = "cnryDbPass4417";
const API_PASSWORD: &str = "cnryApiPass9083";
const API_QUERY_TOKEN: &str = "cnryApiQueryTok2261";
const API_TOKEN: &str = "cnryApiBearer6650";
const INGEST_TOKEN: &str = "cnryIngestTok3308-long-enough-for-any-rule-0123456789";
const UPDATE_USER_PASSWORD: &str = "cnryUpdPass7192";
const UPDATE_QUERY_TOKEN: &str = "cnryUpdQueryTok5524";
const DOWN_PASSWORD: &str = "cnryDownPass8846";
const DOWN_API_KEY: &str = "cnryDownApiKey1379";
const NATS_TOKEN: &str = "cnryNatsTok6021";
const NATS_URL_TOKEN: &str = "cnryNatsUrlTok4480";
const SOURCE_PASSWORD: &str = "cnrySrcPass3157";
/// After the `;` inside `PWD={…}`: a redaction that stops at the first `;` shows it.
const ODBC_PASSWORD: &str = "cnryOdbcPass9912";

// Patient data: may be in the records' own files, nowhere in logs, status or telemetry.
const DEAD_PAYLOAD: &str = "cnryPayloadDead Maria das Dores";
const RETRY_PAYLOAD: &str = "cnryPayloadRetry Jose Arimateia";
const RECORD_KEY: &str = "MRN-cnryKey-55120";
const SOURCE_PAYLOAD: &str = "cnryPayloadSource Ana Beatriz";
const SOURCE_KEY: &str = "MRN-cnrySrcKey-77031";

/// Whether a canary is a secret (nowhere at all) or patient data (only in the data's files).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Secret,
    Data,
}

const CANARIES: &[(&str, Kind)] = &[
    (DB_PASSWORD, Kind::Secret),
    (API_PASSWORD, Kind::Secret),
    (API_QUERY_TOKEN, Kind::Secret),
    (API_TOKEN, Kind::Secret),
    (INGEST_TOKEN, Kind::Secret),
    (UPDATE_USER_PASSWORD, Kind::Secret),
    (UPDATE_QUERY_TOKEN, Kind::Secret),
    (DOWN_PASSWORD, Kind::Secret),
    (DOWN_API_KEY, Kind::Secret),
    (NATS_TOKEN, Kind::Secret),
    (NATS_URL_TOKEN, Kind::Secret),
    (SOURCE_PASSWORD, Kind::Secret),
    (ODBC_PASSWORD, Kind::Secret),
    (DEAD_PAYLOAD, Kind::Data),
    (RETRY_PAYLOAD, Kind::Data),
    (RECORD_KEY, Kind::Data),
    (SOURCE_PAYLOAD, Kind::Data),
    (SOURCE_KEY, Kind::Data),
];

/// Every canary of `kinds` found in `texts`, as `where: canary … excerpt …` lines.
fn findings(texts: &[(String, String)], kinds: &[Kind]) -> Vec<String> {
    let mut found = Vec::new();
    for (label, text) in texts {
        for (canary, kind) in CANARIES {
            if !kinds.contains(kind) {
                continue;
            }
            // Payload words may come escaped or split; the canary prefix is enough to tell.
            let needle = canary.split(' ').next().unwrap_or(canary);
            if let Some(at) = text.find(needle) {
                let mut start = at.saturating_sub(90);
                while !text.is_char_boundary(start) {
                    start -= 1;
                }
                let mut end = (at + needle.len() + 60).min(text.len());
                while !text.is_char_boundary(end) {
                    end += 1;
                }
                let count = text.matches(needle).count();
                found.push(format!(
                    "{label}: {needle} ({count}x), e.g. …{}…",
                    text[start..end].replace('\n', "⏎")
                ));
            }
        }
    }
    found
}

fn output(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Where records may lie at rest: segments (`.jsonl`), dead letters and set-aside bytes
/// (`_failed/`), the index (keys and each delivery's last error).
fn holds_records(staging: &Path, path: &Path) -> bool {
    let rel = path.strip_prefix(staging).unwrap_or(path);
    rel.extension().is_some_and(|e| e == "jsonl")
        || rel.starts_with("_failed")
        || rel
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("index.sqlite3"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_payload_or_record_key_leaves_through_logs_status_or_telemetry() {
    let agent_id = unique_name("canary");
    let api = FlakyHttpServer::start_with_seed(19).await;
    // A permanent refusal whose answer echoes the payload: the record becomes a dead letter.
    api.respond_for(
        "/api/refused",
        422,
        json!({"error": "invalid patient", "echo": {"name": DEAD_PAYLOAD}}),
    );
    // A transient failure on the key's own path, whose answer echoes the key and the payload.
    api.respond_for(
        &format!("/api/patient/{RECORD_KEY}"),
        503,
        json!({"error": format!("patient {RECORD_KEY} is locked"), "echo": RETRY_PAYLOAD}),
    );
    let closed = free_port();

    let table = unique_name("canary_src");
    let client = pg().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id BIGINT PRIMARY KEY, mrn TEXT NOT NULL, note TEXT NOT NULL);
             INSERT INTO {table} VALUES (1, '{SOURCE_KEY}', '{SOURCE_PAYLOAD}');"
        ))
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("sql/sources")).unwrap();
    std::fs::write(
        dir.path().join("sql/sources/canary_pg.sql"),
        format!(
            "SELECT id, mrn, note AS \"patient.note\" FROM {table}\n\
              WHERE (:last_id::bigint IS NULL OR id > :last_id) ORDER BY id LIMIT :limit"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("sql/sources/canary_odbc.sql"),
        "SELECT id, mrn FROM t WHERE (:last_id IS NULL OR id > :last_id) ORDER BY id LIMIT :limit",
    )
    .unwrap();
    // `{{`/`}}` inside PWD={…} is ODBC's escaped `}`; the value holds a `;`.
    let odbc = String::from("odbc:Driver={NoSuchDriver};Server=127.0.0.1;UID=reader;PWD={open;")
        + ODBC_PASSWORD
        + "}}tail};";
    let toml = format!(
        r#"
[[sinks]]
name = "down"
type = "http"
url = "http://clerk:{DOWN_PASSWORD}@127.0.0.1:{closed}/down?api_key={DOWN_API_KEY}"
timeout_secs = 2

[[sinks]]
name = "nats2"
type = "nats"
url = "nats://{NATS_URL_TOKEN}@127.0.0.1:{closed}"
timeout_secs = 1

[[sources]]
name = "canary_pg"
url = "postgres://postgres:{SOURCE_PASSWORD}@127.0.0.1:5432/test?application_name=canary"
query = "sql/sources/canary_pg.sql"
every = "200ms"
entity = "exam"
action = "create"
key = "mrn"
checkpoint = "id"

[[sources]]
name = "canary_odbc"
url = {odbc:?}
query = "sql/sources/canary_odbc.sql"
every = "1s"
entity = "exam"
action = "create"
key = "mrn"
checkpoint = "id"
"#
    );
    std::fs::write(dir.path().join("estafeta.toml"), toml).unwrap();

    let db_url = format!("postgres://postgres:{DB_PASSWORD}@127.0.0.1:5432/test");
    let api_url = format!(
        "http://nurse:{API_PASSWORD}@{}/api?token={API_QUERY_TOKEN}",
        api.addr()
    );
    let update_url = format!(
        "http://release:{UPDATE_USER_PASSWORD}@127.0.0.1:{closed}/estafeta/manifest.json?token={UPDATE_QUERY_TOKEN}"
    );
    let nats_url = format!("nats://127.0.0.1:{closed}");
    let log_dir = dir.path().join("logs");
    let log_dir_text = log_dir.display().to_string();
    let env = [
        ("CONFIG_FILE", "estafeta.toml"),
        ("LOG_LEVEL", "trace"),
        ("LOG_DIR", log_dir_text.as_str()),
        ("AGENT_ID", agent_id.as_str()),
        ("CRONTAB", "* * * * * *"),
        ("RETRY_BASE_SECS", "1"),
        ("RETRY_MAX_SECS", "1"),
        ("HEARTBEAT_SECS", "0.5"),
        ("INGEST_TOKEN", INGEST_TOKEN),
        ("CENTRAL_DATABASE_URL", db_url.as_str()),
        ("CENTRAL_API_URL", api_url.as_str()),
        ("CENTRAL_API_TOKEN", API_TOKEN),
        ("CENTRAL_API_TIMEOUT_SECS", "2"),
        ("CENTRAL_API_HEARTBEAT_PATH", "/agents/{agent_id}"),
        ("CENTRAL_NATS_URL", nats_url.as_str()),
        ("CENTRAL_NATS_TOKEN", NATS_TOKEN),
        ("CENTRAL_NATS_TIMEOUT_SECS", "1"),
        ("UPDATE_URL", update_url.as_str()),
        ("UPDATE_CRONTAB", "* * * * * *"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let auth = format!("Bearer {INGEST_TOKEN}");
    let headers = [("Authorization", auth.as_str())];
    for (action, entity, body) in [
        (
            "create",
            "refused",
            json!({"id": "r-1", "name": DEAD_PAYLOAD}),
        ),
        (
            "upsert",
            "patient",
            json!({"id": RECORD_KEY, "name": RETRY_PAYLOAD}),
        ),
        ("create", "patient", json!({"id": "ok-1", "name": "fine"})),
    ] {
        let (code, answer) = agent.post_with(action, entity, &body, &headers).await;
        assert_eq!(code.as_u16(), 202, "{answer}");
    }

    // Wait until every path a canary could leak through has been taken.
    let pg_client = pg().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = status_with(&agent, Some(INGEST_TOKEN)).await;
        let api_sink = sink_status(&status, "api");
        let down = sink_status(&status, "down");
        let beat = pg_client
            .query_opt(
                "SELECT 1 FROM estafeta_agents WHERE agent_id = $1 AND dead_letters >= 1 AND last_error IS NOT NULL",
                &[&agent_id],
            )
            .await
            .ok()
            .flatten();
        let landed = pg_client
            .query_opt(
                "SELECT 1 FROM estafeta_records WHERE agent_id = $1 AND entity = 'exam'",
                &[&agent_id],
            )
            .await
            .ok()
            .flatten();
        let http_beats = api
            .requests()
            .iter()
            .any(|r| r.path.starts_with("/api/agents/") && r.json()["dead_letters"] == 1);
        let retried_key = api
            .requests()
            .iter()
            .any(|r| r.path == format!("/api/patient/{RECORD_KEY}"));
        let ready = api_sink["dead"] == 1
            && api_sink["last_error"].is_string()
            && down["last_error"].is_string()
            && status["update"]["state"] == "failed"
            && beat.is_some()
            && landed.is_some()
            && http_beats
            && retried_key;
        if ready {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "waited 60 s for a dead letter, retries, a failed update check, heartbeats and a source's row: {status:#}\n{}",
            log_tail(&agent, 60)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // One more round of heartbeats, after the errors above.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let bearer = |path: &str| {
        agent
            .client()
            .get(agent.url(path))
            .bearer_auth(INGEST_TOKEN)
            .send()
    };
    let metrics = bearer("/metrics").await.unwrap().text().await.unwrap();
    assert!(metrics.contains("estafeta_"), "{metrics}");
    let dead_letters = bearer("/v1/dead-letters")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let status_now = status_with(&agent, Some(INGEST_TOKEN)).await;
    let beat_row: String = pg_client
        .query_one(
            "SELECT row_to_json(a)::text FROM estafeta_agents a WHERE agent_id = $1",
            &[&agent_id],
        )
        .await
        .unwrap()
        .get(0);
    let http_beats: String = api
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/api/agents/"))
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect::<Vec<_>>()
        .join("\n");
    let check_config = run_cli(dir.path(), &env, &["check-config"]).await;
    let check_offline = run_cli(dir.path(), &env, &["check-config", "--offline"]).await;
    let status_cli = run_cli(dir.path(), &env, &["status"]).await;
    let status_json = run_cli(dir.path(), &env, &["status", "--json"]).await;
    let sources = run_cli(dir.path(), &env, &["sources", "--json"]).await;
    let update_check = run_cli(dir.path(), &env, &["update", "--check"]).await;
    let listing = run_cli(dir.path(), &env, &["ls", "--json"]).await;
    agent.terminate();
    agent.wait(Duration::from_secs(30)).await;

    // The paths were taken: the logs are at trace level, the errors are there to be read.
    let stderr = agent.stderr();
    assert!(
        stderr.contains("TRACE") || stderr.contains("DEBUG"),
        "not at trace level"
    );
    assert!(
        output(&sources).contains("canary_odbc") && output(&sources).contains("last_error"),
        "{}",
        output(&sources)
    );
    assert!(!update_check.status.success(), "{}", output(&update_check));

    let mut texts: Vec<(String, String)> = vec![
        ("agent stderr".into(), stderr),
        ("agent stdout".into(), agent.stdout()),
        ("GET /v1/status".into(), status.to_string()),
        ("GET /v1/status (later)".into(), status_now.to_string()),
        ("GET /metrics".into(), metrics),
        ("estafeta_agents row".into(), beat_row),
        ("heartbeats received by the API".into(), http_beats),
        ("check-config".into(), output(&check_config)),
        ("check-config --offline".into(), output(&check_offline)),
        ("status".into(), output(&status_cli)),
        ("status --json".into(), output(&status_json)),
        ("sources --json".into(), output(&sources)),
        ("update --check".into(), output(&update_check)),
    ];
    for file in files(&log_dir) {
        let text = String::from_utf8_lossy(&std::fs::read(&file).unwrap()).into_owned();
        texts.push((format!("log file {}", file.display()), text));
    }
    let staging = dir.path().join("staging");
    let mut at_rest = Vec::new();
    for file in files(&staging) {
        let text = String::from_utf8_lossy(&std::fs::read(&file).unwrap()).into_owned();
        let label = format!("staging file {}", file.display());
        if holds_records(&staging, &file) {
            at_rest.push((label, text));
        } else {
            texts.push((label, text));
        }
    }
    // An administrator's views of the records: they show keys and reasons, never secrets.
    at_rest.push(("GET /v1/dead-letters".into(), dead_letters));
    at_rest.push(("ls --json".into(), output(&listing)));

    let mut found = findings(&texts, &[Kind::Secret, Kind::Data]);
    found.extend(findings(&at_rest, &[Kind::Secret]));
    assert!(
        found.is_empty(),
        "{} canaries leaked:\n{}",
        found.len(),
        found.join("\n")
    );

    // The whole answer stays in the dead letter, readable by its owner only.
    let letters: Vec<PathBuf> = files(&staging.join("_failed"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = std::fs::read_to_string(&letters[0]).unwrap();
    assert!(
        letter.contains("HTTP 422") && letter.contains("cnryPayloadDead"),
        "{letter}"
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&letters[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", letters[0].display());
    // Logs and status still say what happened, by seq and class.
    let api_sink = sink_status(&status_now, "api");
    let error: &str = api_sink["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("HTTP 503"), "{api_sink}");
    let down = sink_status(&status_now, "down");
    let down_error = down["last_error"].as_str().unwrap_or_default();
    assert!(down_error.contains("cannot connect"), "{down}");
    let dead_line = texts[0]
        .1
        .lines()
        .find(|l| l.contains("Record refused by the sink"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        dead_line.contains("seq=") && dead_line.contains("HTTP 422"),
        "{dead_line}"
    );
    eprintln!(
        "canary: nothing leaked through {} texts; api: {error}; down: {down_error}; {dead_line}",
        texts.len()
    );
    let _ = client
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await;
}
