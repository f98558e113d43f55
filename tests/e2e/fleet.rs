//! Heartbeats into the central database and `estafeta fleet`: an agent with a PostgreSQL,
//! MariaDB or SQLite sink upserts its row into `estafeta_agents` every `HEARTBEAT_SECS`, with
//! its backlog and dead letters, and `estafeta fleet --database URL` shows it flagged.

use std::time::{Duration, Instant};

use estafeta_e2e::{
    Agent, MYSQL_URL, PG_URL, json_lines, log_tail, mysql, pg, run_cli, unique_name, wait_status,
};
use serde_json::{Value, json};

/// The agent's line of `estafeta fleet --database url --json` once `done` holds for it.
async fn fleet_line(
    agent: &Agent,
    url: &str,
    agent_id: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = run_cli(agent.dir(), &[], &["fleet", "--database", url, "--json"]).await;
        let lines = if out.status.success() {
            json_lines(&out.stdout)
        } else {
            Vec::new()
        };
        if let Some(line) = lines.into_iter().find(|l| l["agent_id"] == agent_id)
            && done(&line)
        {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "estafeta fleet never showed {agent_id} as expected; last output: {}{}\nagent log tail:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            log_tail(agent, 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_heartbeats_fill_estafeta_agents_and_fleet_flags_dead_letters() {
    let agent_id = unique_name("fleet_pg");
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("CENTRAL_DATABASE_URL", PG_URL),
        ("AGENT_ID", agent_id.as_str()),
        ("HEARTBEAT_SECS", "0.5"),
        ("CRONTAB", "* * * * * *"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    // jsonb cannot hold \u0000: PostgreSQL refuses the row, so the record is a dead letter.
    let (code, answer) = agent
        .post(
            "create",
            "exam",
            &json!({"id": "bad", "note": "a\u{0000}b"}),
        )
        .await;
    assert_eq!(code, 202, "{answer}");
    let (code, answer) = agent.post("create", "exam", &json!({"id": "good"})).await;
    assert_eq!(code, 202, "{answer}");
    wait_status(&agent, Duration::from_secs(20), "one dead letter", |s| {
        s["sinks"][0]["dead"] == 1 && s["sinks"][0]["pending"] == 0
    })
    .await;

    let line = fleet_line(&agent, PG_URL, &agent_id, |l| l["dead_letters"] == 1).await;
    assert_eq!(line["flags"], json!(["DEAD"]), "{line}");
    assert_eq!(line["version"], env!("CARGO_PKG_VERSION"), "{line}");
    assert_eq!(line["records_pending"], 1, "the dead record stays: {line}");
    assert!(
        line["seen_secs_ago"].as_i64().is_some_and(|s| s < 30),
        "{line}"
    );

    let client = pg().await;
    let row = client
        .query_one(
            "SELECT hostname, dead_letters, sinks::text FROM estafeta_agents WHERE agent_id = $1",
            &[&agent_id],
        )
        .await
        .expect("the agent's row");
    let hostname: String = row.get(0);
    assert!(!hostname.is_empty());
    let dead: i64 = row.get(1);
    assert_eq!(dead, 1);
    let sinks: Value = serde_json::from_str(&row.get::<_, String>(2)).expect("JSON sinks");
    assert_eq!(sinks[0]["sink"], "database", "{sinks}");
    assert_eq!(sinks[0]["dead"], 1, "{sinks}");

    // An agent that stops beating turns STALE (here after one second).
    agent.kill9();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let out = run_cli(
        dir.path(),
        &[],
        &["fleet", "--database", PG_URL, "--stale-minutes", "0"],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("AGENT"), "{text}");
    let mine = text
        .lines()
        .find(|l| l.starts_with(&agent_id))
        .unwrap_or_else(|| panic!("{agent_id} is not in the table:\n{text}"));
    assert!(mine.contains("STALE,DEAD"), "{mine}");
    let out = run_cli(
        dir.path(),
        &[],
        &[
            "fleet",
            "--database",
            PG_URL,
            "--stale-minutes",
            "0",
            "--json",
        ],
    )
    .await;
    let stale = json_lines(&out.stdout)
        .into_iter()
        .find(|l| l["agent_id"] == agent_id.as_str())
        .expect("the agent's line");
    assert_eq!(stale["flags"], json!(["STALE", "DEAD"]), "{stale}");

    client
        .execute(
            "DELETE FROM estafeta_agents WHERE agent_id = $1",
            &[&agent_id],
        )
        .await
        .expect("cleaning up the agent's row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_heartbeats_show_the_backlog_in_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("central.db");
    let url = format!("sqlite://{}", db.display());
    // Records go to an API that is down, so they wait; heartbeats go to the SQLite sink.
    let api = format!("http://127.0.0.1:{}/api", estafeta_e2e::free_port());
    let config = dir.path().join("estafeta.toml");
    std::fs::write(
        &config,
        format!(
            "[[sinks]]\nname = \"central\"\ntype = \"database\"\nurl = \"{url}\"\n\n\
             [[sinks]]\nname = \"api\"\ntype = \"http\"\nurl = \"{api}\"\n\n\
             [[routes]]\nentity = \"exam\"\nsinks = [\"api\"]\n"
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let env = [
        ("CONFIG_FILE", config.as_str()),
        ("AGENT_ID", "ws-sqlite-1"),
        ("HEARTBEAT_SECS", "0.5"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    for n in 0..3 {
        let (code, answer) = agent.post("create", "exam", &json!({"id": n})).await;
        assert_eq!(code, 202, "{answer}");
    }
    let line = fleet_line(&agent, &url, "ws-sqlite-1", |l| {
        l["records_pending"] == 3
            && l["last_error"].is_string()
            && l["oldest_pending_age_secs"].as_i64() >= Some(1)
    })
    .await;
    assert_eq!(line["dead_letters"], 0, "{line}");
    assert!(line["oldest_pending_age_secs"].as_i64().is_some(), "{line}");
    let out = run_cli(
        dir.path(),
        &[],
        &["fleet", "--database", &url, "--backlog-minutes", "0"],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with("AGENT"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("ws-sqlite-1") && l.contains("BACKLOG")),
        "{text}"
    );
    assert!(text.contains("1 agent(s), 1 flagged"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_heartbeats_fill_estafeta_agents_and_fleet_reads_them() {
    use mysql_async::prelude::Queryable as _;
    let agent_id = unique_name("fleet_my");
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("CENTRAL_DATABASE_URL", MYSQL_URL),
        ("AGENT_ID", agent_id.as_str()),
        ("HEARTBEAT_SECS", "0.5"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let (code, answer) = agent.post("create", "exam", &json!({"id": "1"})).await;
    assert_eq!(code, 202, "{answer}");

    let line = fleet_line(&agent, MYSQL_URL, &agent_id, |l| l["records_pending"] == 0).await;
    assert_eq!(line["flags"], json!([]), "{line}");
    assert_eq!(line["dead_letters"], 0, "{line}");
    assert!(
        line["seen_secs_ago"]
            .as_i64()
            .is_some_and(|s| (0..30).contains(&s)),
        "{line}"
    );

    let mut conn = mysql().await;
    let row: Option<(String, String)> = conn
        .exec_first(
            "SELECT version, CAST(sinks AS CHAR) FROM estafeta_agents WHERE agent_id = ?",
            (agent_id.as_str(),),
        )
        .await
        .expect("reading the agent's row");
    let (version, sinks) = row.expect("the agent's row");
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    let sinks: Value = serde_json::from_str(&sinks).expect("JSON sinks");
    assert_eq!(sinks[0]["sink"], "database", "{sinks}");
    agent.kill9();
    conn.exec_drop(
        "DELETE FROM estafeta_agents WHERE agent_id = ?",
        (agent_id.as_str(),),
    )
    .await
    .expect("cleaning up the agent's row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_heartbeats_go_to_the_configured_path_with_the_backlog() {
    let api = estafeta_e2e::FlakyHttpServer::start().await;
    // Records wait (the records endpoint answers 503); heartbeats still go through.
    api.status_for("/patient", 503);
    let dir = tempfile::tempdir().unwrap();
    let url = api.url();
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CENTRAL_API_TOKEN", "s3cret-token"),
        ("CENTRAL_API_HEARTBEAT_PATH", "/agents/{agent_id}/heartbeat"),
        ("AGENT_ID", "ws-07 ala b"),
        ("HEARTBEAT_SECS", "0.5"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    for n in 0..2 {
        let (code, answer) = agent
            .post("create", "patient", &json!({"id": n.to_string()}))
            .await;
        assert_eq!(code, 202, "{answer}");
    }
    // The agent id is one encoded path segment, so a space or a slash cannot move the beat.
    let deadline = Instant::now() + Duration::from_secs(20);
    let beat = loop {
        let beats: Vec<_> = api
            .requests()
            .into_iter()
            .filter(|r| r.path == "/agents/ws-07%20ala%20b/heartbeat")
            .collect();
        if let Some(last) = beats.last()
            && last.json()["records_pending"] == 2
        {
            break last.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no heartbeat with 2 pending records reached the API; requests: {:?}\nagent log tail:\n{}",
            api.requests()
                .iter()
                .map(|r| format!("{} {} {}", r.method, r.path, r.status))
                .collect::<Vec<_>>(),
            log_tail(&agent, 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(beat.method, "PUT");
    assert_eq!(beat.header("authorization"), Some("Bearer s3cret-token"));
    assert_eq!(beat.header("content-type"), Some("application/json"));
    let body = beat.json();
    assert_eq!(body["agent_id"], "ws-07 ala b", "{body}");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"), "{body}");
    assert!(
        body["hostname"].as_str().is_some_and(|h| !h.is_empty()),
        "{body}"
    );
    assert!(
        body["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("503")),
        "the beat names the sink's last error: {body}"
    );
    assert_eq!(body["sinks"][0]["sink"], "api", "{body}");
    assert_eq!(body["sinks"][0]["pending"], 2, "{body}");
    // Heartbeats are not records: none of them is staged or counted as a delivery.
    let status = estafeta_e2e::run_cli(dir.path(), &env, &["status", "--json"]).await;
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["records_pending"], 2, "{status}");
}
