//! Lookups at the source (issue 22, seed 003), end to end with the real binary, the real
//! PostgreSQL as the source and the central database, and the stand-in API serving the catalog:
//!
//! - a PostgreSQL source maps exam codes through `tests_map.json` and finds the specimen in the
//!   API's catalog (`GET /tests`, fetched once with the `token_env` token) before the payload
//!   is built; a code with no mapping sets its row aside with a reason naming the code and the
//!   file, listed by `estafeta retry` and `GET /v1/dead-letters`; once the map is fixed,
//!   `estafeta retry --send` stages it again (once, even when repeated) and it lands;
//! - a catalog the API cannot serve fails the cycle: nothing is staged, the checkpoint stays,
//!   the source's status names the catalog, and the rows go once it answers.

use std::path::Path;
use std::time::{Duration, Instant};

use estafeta_e2e::{Agent, FlakyHttpServer, log_tail, pg, run_cli, unique_name};
use serde_json::{Value, json};

use crate::sources::{landed, source_env, started, wait_landed, write_config};

const TOKEN: &str = "catalogo-token-0123456789";

/// A PostgreSQL table of exam requests holding `codes`, ids from 1.
async fn exam_table(codes: &[&str]) -> String {
    let table = unique_name("src_lookup");
    let client = pg().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id BIGINT PRIMARY KEY, codigo TEXT NOT NULL)"
        ))
        .await
        .unwrap();
    for (i, code) in codes.iter().enumerate() {
        client
            .execute(
                &format!("INSERT INTO {table} VALUES ($1, $2)"),
                &[&(i as i64 + 1), code],
            )
            .await
            .unwrap();
    }
    table
}

/// The source's configuration: codes mapped and looked up in the catalog at `catalog_url`.
fn lookup_config(dir: &Path, table: &str, catalog_url: &str) {
    std::fs::write(
        dir.join("tests_map.json"),
        r#"{"HEMOGRAMA": "HB-001", "12345": "TEST-12345"}"#,
    )
    .unwrap();
    write_config(
        dir,
        &format!(
            r#"
[[sources]]
name = "exames"
url = "{url}"
query = "sql/sources/exames.sql"
every = "200ms"
entity = "exam"
action = "create"
key = "id"
checkpoint = "id"
maps = {{ exames = "tests_map.json" }}
catalogs = {{ tests = {{ url = "{catalog_url}", key = "supportTestId", token_env = "CATALOG_TOKEN" }} }}

[sources.enrich]
supportTestId = "{{{{ map('exames', row.codigo) }}}}"
"specimen.id" = "{{{{ catalog('tests', map('exames', row.codigo)).supportSpecimenId }}}}"
"#,
            url = estafeta_e2e::PG_URL
        ),
        &[(
            "exames",
            &format!(
                "SELECT id, codigo FROM {table} WHERE :last_id::bigint IS NULL OR id > :last_id::bigint ORDER BY id LIMIT :limit"
            ),
        )],
    );
}

fn catalog_body() -> Value {
    json!({"items": [
        {"supportTestId": "HB-001", "supportSpecimenId": "SANGUE-EDTA"},
        {"supportTestId": "TEST-12345", "supportSpecimenId": "SORO"},
        {"supportTestId": "URI-01", "supportSpecimenId": "URINA-JATO"}
    ]})
}

/// The one source of `GET /v1/status`.
async fn source_status(agent: &Agent) -> Value {
    let (code, status) = agent.get("/v1/status").await;
    assert_eq!(code, 200, "{status}");
    status["sources"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_are_mapped_and_looked_up_before_the_payload_and_an_unmapped_row_is_a_dead_letter_to_replay()
 {
    let server = FlakyHttpServer::start_with_seed(31).await;
    server.respond_for("/tests", 200, catalog_body());
    let table = exam_table(&["HEMOGRAMA", "URINA", "12345"]).await;
    let dir = tempfile::tempdir().unwrap();
    lookup_config(dir.path(), &table, &format!("{}/tests", server.url()));
    let agent_id = unique_name("src_lookup");
    let mut env = source_env(&agent_id).to_vec();
    env.push(("CATALOG_TOKEN", TOKEN));
    let agent = started(dir.path(), &env).await;

    let rows = wait_landed(&agent, &agent_id, 2, Duration::from_secs(30)).await;
    let payloads: Vec<&Value> = rows.iter().map(|r| &r.2).collect();
    assert_eq!(
        payloads,
        [
            &json!({"id": 1, "codigo": "HEMOGRAMA", "supportTestId": "HB-001", "specimen": {"id": "SANGUE-EDTA"}}),
            &json!({"id": 3, "codigo": "12345", "supportTestId": "TEST-12345", "specimen": {"id": "SORO"}}),
        ]
    );
    let fetches: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.path == "/tests")
        .collect();
    assert_eq!(fetches.len(), 1, "the catalog is fetched once and cached");
    assert_eq!(
        fetches[0].header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str()),
        "the catalog is fetched with token_env's token"
    );

    // The row whose code has no mapping is set aside with a reason naming the code and file.
    let file = dir.path().join("staging/_failed/_refused/exames/2.json");
    let refused: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let reason = refused["reason"].as_str().unwrap();
    assert!(
        reason.contains("code \"URINA\" has no mapping in") && reason.contains("tests_map.json"),
        "{reason}"
    );
    assert_eq!(refused["replayable"], true);
    assert_eq!(refused["row"], json!({"id": 2, "codigo": "URINA"}));
    // Listed as a dead letter, by `estafeta retry` and by the API.
    let out = run_cli(dir.path(), &env, &["retry"]).await;
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("would stage again refused row source=exames checkpoint=[2]: enrich.")
            && listed.contains("1 refused source row(s)"),
        "{listed}"
    );
    let (code, letters) = agent.get("/v1/dead-letters").await;
    assert_eq!(code, 200);
    let api = &letters["refused_rows"][0];
    assert_eq!(api["source"], "exames", "{letters}");
    assert_eq!(api["replayable"], true, "{letters}");
    assert!(
        api["reason"].as_str().unwrap().contains("URINA"),
        "{letters}"
    );

    // Before the fix, --send refuses it again and keeps the file.
    let out = run_cli(dir.path(), &env, &["retry", "--send"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && text.contains("refused again refused row source=exames"),
        "{text}"
    );
    assert!(file.exists());
    // The map fixed: --send stages it again; the daemon delivers it.
    std::fs::write(
        dir.path().join("tests_map.json"),
        r#"{"HEMOGRAMA": "HB-001", "12345": "TEST-12345", "URINA": "URI-01"}"#,
    )
    .unwrap();
    // A copy, as if the file had survived a crash between staging and its removal.
    let copy = dir.path().join("copy-of-2.json");
    std::fs::copy(&file, &copy).unwrap();
    let out = run_cli(dir.path(), &env, &["retry", "--send"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("staged again refused row source=exames checkpoint=[2] as seq="),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !file.exists(),
        "the refused row's file is removed once staged"
    );
    let seq_of = |text: &str| {
        text.split("as seq=")
            .nth(1)
            .and_then(|t| t.split(';').next())
            .map(str::to_owned)
    };
    // Replayed again: the first answer, the same record, nothing staged twice.
    let again = run_cli(
        dir.path(),
        &env,
        &["retry", "--send", "--file", copy.to_str().unwrap()],
    )
    .await;
    let again = String::from_utf8_lossy(&again.stdout);
    assert!(
        seq_of(&text).is_some() && seq_of(&text) == seq_of(&again),
        "{text}\n{again}"
    );
    let rows = wait_landed(&agent, &agent_id, 3, Duration::from_secs(30)).await;
    assert_eq!(
        rows[2].2,
        json!({"id": 2, "codigo": "URINA", "supportTestId": "URI-01", "specimen": {"id": "URINA-JATO"}})
    );
    // Nothing left to replay, and nothing landed twice.
    let out = run_cli(dir.path(), &env, &["retry"]).await;
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("refused row"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(landed(&agent_id).await.len(), 3, "{}", log_tail(&agent, 20));
    assert!(
        !agent.stderr().contains("URINA"),
        "the log quotes no code or value"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_the_api_cannot_serve_fails_the_cycle_and_stages_nothing_until_it_answers() {
    let server = FlakyHttpServer::start_with_seed(32).await;
    server.status_for("/tests", 503);
    let table = exam_table(&["HEMOGRAMA", "12345"]).await;
    let dir = tempfile::tempdir().unwrap();
    lookup_config(dir.path(), &table, &format!("{}/tests", server.url()));
    let agent_id = unique_name("src_lookup_down");
    let mut env = source_env(&agent_id).to_vec();
    env.push(("CATALOG_TOKEN", TOKEN));
    let agent = started(dir.path(), &env).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = source_status(&agent).await;
        if s["errors_total"].as_u64().unwrap_or(0) >= 2 {
            let error = s["last_error"].as_str().unwrap_or_default();
            assert!(
                error.contains("the catalog tests") && error.contains("503"),
                "{s}"
            );
            assert_eq!(s["records_total"], 0, "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "{s}\n{}", log_tail(&agent, 20));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(landed(&agent_id).await.is_empty());
    let out = run_cli(dir.path(), &env, &["sources", "--json"]).await;
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        line["checkpoint"],
        Value::Null,
        "the checkpoint stays: {line}"
    );
    assert!(
        !dir.path().join("staging/_failed/_refused").exists(),
        "no row is set aside for the API's outage"
    );

    server.clear_status_for("/tests");
    server.respond_for("/tests", 200, catalog_body());
    let rows = wait_landed(&agent, &agent_id, 2, Duration::from_secs(30)).await;
    assert_eq!(rows[0].2["specimen"]["id"], "SANGUE-EDTA");
    assert_eq!(source_status(&agent).await["last_error"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_names_a_missing_map_file_and_an_unset_token() {
    let dir = tempfile::tempdir().unwrap();
    lookup_config(dir.path(), "nenhuma", "https://api.example/tests");
    std::fs::remove_file(dir.path().join("tests_map.json")).unwrap();
    let out = run_cli(
        dir.path(),
        &[("CONFIG_FILE", "estafeta.toml")],
        &["check-config", "--offline"],
    )
    .await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("sources[0].maps.exames") && text.contains("tests_map.json"),
        "{text}"
    );
    assert!(
        text.contains("sources[0].catalogs.tests.token_env") && text.contains("CATALOG_TOKEN"),
        "{text}"
    );
}
