//! One intake for every way in (the same routes, and contract 6's checks, whichever way a record
//! arrives): with `[[routes]] entity = "atendimento" sinks = ["a"]` and a JSON Schema on
//! `atendimento`, a record that comes in through the HTTP API, through `estafeta stage`, as a file
//! dropped into the staging tree, as a file dropped into the inbox (`INBOX_PATH`) or as a row of a
//! PostgreSQL source reaches sink `a` only (two real SQLite sinks, `a` and `b`), and a record that
//! breaks the schema is refused (HTTP 422, `stage` fails; nothing staged) or set aside (files:
//! `_failed/` with the reason beside them; a source row: set aside in `_failed/_refused/` with
//! the reason, counted by `estafeta sources`, the source moves past it and the row never lands).

use std::path::Path;
use std::time::{Duration, Instant};

use estafeta_e2e::{Agent, PG_URL, log_tail, pg, run_cli, status, unique_name, wait_drained};
use serde_json::{Value, json};

/// The routed entity, with a schema that wants a text `paciente`.
const ENTITY: &str = "atendimento";

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// The ids of `entity`'s records that landed in the SQLite sink database `db`.
fn landed_ids(db: &Path, entity: &str) -> Vec<String> {
    if !db.exists() {
        return Vec::new();
    }
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut statement =
        match conn.prepare("SELECT payload FROM estafeta_records WHERE entity = ?1 ORDER BY seq") {
            Ok(statement) => statement,
            // The sink creates its table on its first delivery.
            Err(_) => return Vec::new(),
        };
    let rows = statement
        .query_map([entity], |row| row.get::<_, String>(0))
        .unwrap();
    let mut ids: Vec<String> = rows
        .map(|payload| {
            let payload: Value = serde_json::from_str(&payload.unwrap()).unwrap();
            payload["id"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    ids.sort();
    ids
}

/// The `.error.txt` written beside a file set aside at `rel` under the dead-letter folder.
fn set_aside_reason(dir: &Path, rel: &str) -> String {
    let failed = dir.join("staging/_failed").join(rel);
    assert!(
        failed.exists(),
        "{} should have been set aside",
        failed.display()
    );
    std::fs::read_to_string(failed.with_extension("json.error.txt")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_intake_path_routes_and_checks_the_schema() {
    let table = unique_name("src_atendimento");
    let client = pg().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (n BIGINT PRIMARY KEY, id TEXT NOT NULL, paciente TEXT);
             INSERT INTO {table} VALUES (1, 'sql-ok', 'Conceição'), (2, 'sql-bad', NULL);"
        ))
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::create_dir_all(dir.join("sql/sources")).unwrap();
    std::fs::write(
        dir.join("sql/sources/atendimentos.sql"),
        format!(
            "SELECT n, id, paciente FROM {table}\n\
              WHERE (:last_n::bigint IS NULL OR n > :last_n)\n\
              ORDER BY n\n\
              LIMIT :limit"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("atendimento.schema.json"),
        json!({
            "type": "object",
            "required": ["id", "paciente"],
            "properties": {"id": {"type": "string"}, "paciente": {"type": "string"}}
        })
        .to_string(),
    )
    .unwrap();
    // One row per page, so the good row and the bad one are in pages of their own.
    std::fs::write(
        dir.join("estafeta.toml"),
        format!(
            r#"
[[sinks]]
name = "a"
type = "database"
url = "sqlite://a.db"

[[sinks]]
name = "b"
type = "database"
url = "sqlite://b.db"

[[routes]]
entity = "{ENTITY}"
sinks = ["a"]

[entities.{ENTITY}]
schema = "atendimento.schema.json"

[[sources]]
name = "atendimentos"
url = "{PG_URL}"
query = "sql/sources/atendimentos.sql"
every = "100ms"
max_records = 1
entity = "{ENTITY}"
action = "create"
checkpoint = "n"
"#
        ),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("inbox")).unwrap();
    let env = [
        ("CONFIG_FILE", "estafeta.toml"),
        ("INBOX_PATH", "inbox"),
        ("CRONTAB", "* * * * * *"),
    ];
    let mut agent = Agent::start(dir, &env);
    agent.wait_ready(Duration::from_secs(20)).await;

    // HTTP: the good record is accepted, the bad one refused with 422; a record of an entity
    // without a route goes to both sinks, which shows `b` delivers.
    let (code, body) = agent
        .post(
            "create",
            ENTITY,
            &json!({"id": "http-ok", "paciente": "Maria"}),
        )
        .await;
    assert_eq!(code.as_u16(), 202, "{body}");
    let (code, body) = agent
        .post("create", ENTITY, &json!({"id": "http-bad", "paciente": 7}))
        .await;
    assert_eq!(code.as_u16(), 422, "{body}");
    assert_eq!(body["error"], "schema_violation", "{body}");
    let (code, body) = agent
        .post("create", "outro", &json!({"id": "other-ok"}))
        .await;
    assert_eq!(code.as_u16(), 202, "{body}");

    // `estafeta stage`: the same.
    write(
        &dir.join("stage-ok.json"),
        &json!({"id": "stage-ok", "paciente": "Ana"}).to_string(),
    );
    write(
        &dir.join("stage-bad.json"),
        &json!({"id": "stage-bad"}).to_string(),
    );
    let out = run_cli(dir, &env, &["stage", "create", ENTITY, "stage-ok.json"]).await;
    assert!(
        out.status.success(),
        "stage: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_cli(dir, &env, &["stage", "create", ENTITY, "stage-bad.json"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a record breaking the schema is refused"
    );
    assert!(stderr.contains("schema"), "{stderr}");

    // Files in the staging tree and in the inbox, in the seed's layout.
    let day = format!("create/{ENTITY}/2026/11/23");
    // Both set aside into one dead-letter folder, so their names differ.
    let files = [
        (
            "staging",
            "tree",
            "20261123101500000001",
            "20261123101500000002",
        ),
        (
            "inbox",
            "inbox",
            "20261123101500000003",
            "20261123101500000004",
        ),
    ];
    for (root, prefix, good, bad) in files {
        write(
            &dir.join(root).join(&day).join(format!("{good}.json")),
            &json!({"id": format!("{prefix}-ok"), "paciente": "José"}).to_string(),
        );
        write(
            &dir.join(root).join(&day).join(format!("{bad}.json")),
            &json!({"id": format!("{prefix}-bad")}).to_string(),
        );
    }

    let want_a = ["http-ok", "inbox-ok", "sql-ok", "stage-ok", "tree-ok"];
    let deadline = Instant::now() + Duration::from_secs(60);
    let (landed_a, landed_b) = loop {
        let landed = (
            landed_ids(&dir.join("a.db"), ENTITY),
            landed_ids(&dir.join("b.db"), "outro"),
        );
        if (landed.0.len() >= want_a.len() && !landed.1.is_empty()) || Instant::now() >= deadline {
            break landed;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let drained = wait_drained(&agent, Duration::from_secs(30)).await;
    assert_eq!(
        landed_a,
        want_a,
        "every good record reaches sink a once; agent log:\n{}",
        log_tail(&agent, 40)
    );
    assert_eq!(landed_b, ["other-ok"], "an unrouted entity goes to b too");
    assert_eq!(
        landed_ids(&dir.join("b.db"), ENTITY),
        Vec::<String>::new(),
        "no record of the routed entity reaches sink b, whatever way it came in"
    );
    assert_eq!(drained["records_pending"], 0, "{drained}");
    assert_eq!(status(&agent).await["sinks"][0]["dead"], 0);

    // The bad files are set aside beside their reason, never dropped nor staged.
    for (root, _, _, bad) in files {
        let bad = format!("{bad}.json");
        assert!(
            !dir.join(root).join(&day).join(&bad).exists(),
            "the bad file left {root}"
        );
        let reason = set_aside_reason(dir, &format!("{day}/{bad}"));
        assert!(reason.contains("schema"), "{root}: {reason}");
    }

    // The bad source row is set aside with the reason and the source moves past it (issue
    // 22: it used to stop the source for good); it never lands.
    let deadline = Instant::now() + Duration::from_secs(20);
    let line = loop {
        let out = run_cli(dir, &env, &["sources", "--json"]).await;
        let line: Value = serde_json::from_slice(&out.stdout).unwrap();
        if line["checkpoint"] == "[2]" || Instant::now() >= deadline {
            break line;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        line["checkpoint"], "[2]",
        "the source moves past the bad row: {line}"
    );
    assert_eq!(line["last_error"], Value::Null, "{line}");
    assert_eq!(line["refused"], 1, "{line}");
    let refused: Value = serde_json::from_slice(
        &std::fs::read(dir.join("staging/_failed/_refused/atendimentos/2.json")).unwrap(),
    )
    .unwrap();
    let reason = refused["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("schema"), "{refused}");
    assert_eq!(refused["row"]["id"], "sql-bad");

    agent.terminate();
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}
