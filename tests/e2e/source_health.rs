//! Source health (issue 22) as a person and a Prometheus server see it: a PostgreSQL source
//! that works, then meets a row whose value its query cannot cast, then whose table is dropped,
//! then is fixed. Each step is read in `GET /v1/status` (`sources`), `/metrics`
//! (`estafeta_source_*`), `estafeta status` and the status page in headless Chromium; the
//! errors shown name the SQLSTATE and the table, never the URL's password or a row's value.

use std::time::Duration;

use estafeta_e2e::{Agent, pg, run_cli, unique_name};
use fantoccini::Locator;
use serde_json::Value;

use crate::sources::{started, write_config};
use crate::status_page::{Chromedriver, eventually, open_browser};

/// Ignored by the server (trust authentication here), but in the URL: it must show nowhere.
const PASSWORD: &str = "s3nha-Secreta-77";
/// A row value that must show nowhere either.
const PATIENT_VALUE: &str = "Maria Sigilosa";

/// The source named `exames` in `GET /v1/status`.
async fn source(agent: &Agent) -> Value {
    let (code, status) = agent.get("/v1/status").await;
    assert_eq!(code, 200, "{status}");
    status["sources"]
        .as_array()
        .unwrap_or_else(|| panic!("no sources in /v1/status: {status}"))
        .iter()
        .find(|s| s["name"] == "exames")
        .cloned()
        .unwrap_or_else(|| panic!("no source exames in /v1/status: {status}"))
}

/// `/metrics` as text.
async fn metrics(agent: &Agent) -> String {
    let (code, body) = agent.get("/metrics").await;
    assert_eq!(code, 200);
    body.as_str().expect("/metrics is text").to_owned()
}

/// The value of one series of `/metrics`, as a scraper parses it.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().expect("a number"))
}

fn secs_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn assert_hidden(what: &str, text: &str) {
    assert!(
        !text.contains(PASSWORD) && !text.contains(PATIENT_VALUE),
        "{what} shows the password or a row value: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_health_shows_a_working_a_failing_and_a_fixed_postgres_source() {
    let table = unique_name("src_health");
    let client = pg().await;
    let create = format!(
        "CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, codigo TEXT NOT NULL, criado_em TIMESTAMPTZ NOT NULL DEFAULT now())"
    );
    client
        .batch_execute(&format!(
            "{create}; INSERT INTO {table} (codigo, criado_em) SELECT g::text, now() - interval '90 seconds' FROM generate_series(1, 3) g;"
        ))
        .await
        .unwrap();
    let url = format!("postgres://postgres:{PASSWORD}@127.0.0.1:5432/test");
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &format!(
            r#"
[[sources]]
name = "exames"
url = "{url}"
query = "sql/sources/exames.sql"
every = "200ms"
entity = "exam"
action = "upsert"
key = "id"
checkpoint = ["criado_em", "id"]
"#
        ),
        &[(
            "exames",
            &format!(
                "SELECT id, codigo::int AS \"exam.code\", criado_em FROM {table}\n\
                  WHERE :last_criado_em::timestamptz IS NULL\n\
                     OR (criado_em, id) > (:last_criado_em::timestamptz, :last_id::bigint)\n\
                  ORDER BY criado_em, id LIMIT :limit"
            ),
        )],
    );
    let agent_id = unique_name("src_health");
    let env = [
        ("CONFIG_FILE", "estafeta.toml"),
        ("CENTRAL_DATABASE_URL", estafeta_e2e::PG_URL),
        ("AGENT_ID", agent_id.as_str()),
        ("CRONTAB", "* * * * * *"),
    ];
    let agent = started(dir.path(), &env).await;

    // 1. It works: three rows read and staged, the lag is the age of the newest row (90 s).
    eventually(&agent, "the three rows staged", || async {
        source(&agent).await["records_total"] == 3
    })
    .await;
    let s = source(&agent).await;
    assert_eq!(s["outcome"], "ok", "{s}");
    assert_eq!(s["rows_total"], 3, "{s}");
    assert_eq!(s["errors_total"], 0, "{s}");
    assert!(s["last_error"].is_null(), "{s}");
    assert_eq!(s["lag_from"], "newest_row", "{s}");
    let lag = s["lag_secs"].as_u64().unwrap();
    assert!((89..=150).contains(&lag), "lag {lag}: {s}");
    for at in [
        "last_run_started_at",
        "last_run_finished_at",
        "last_success_at",
    ] {
        let t = s[at].as_str().unwrap_or_else(|| panic!("{at}: {s}"));
        assert!(chrono::DateTime::parse_from_rfc3339(t).is_ok(), "{at}: {s}");
    }
    let text = metrics(&agent).await;
    let series = |name: &str| format!("{name}{{source=\"exames\"}}");
    assert_eq!(
        sample(&text, &series("estafeta_source_rows_total")),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &series("estafeta_source_records_total")),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &series("estafeta_source_errors_total")),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &series("estafeta_source_up")),
        Some(1.0),
        "{text}"
    );
    let success = sample(
        &text,
        &series("estafeta_source_last_success_timestamp_seconds"),
    )
    .unwrap_or_else(|| panic!("{text}"));
    assert!((secs_now() - success).abs() < 30.0, "{success}: {text}");
    let lag = sample(&text, &series("estafeta_source_lag_seconds")).unwrap();
    assert!((89.0..=150.0).contains(&lag), "{text}");
    assert!(
        text.contains("# TYPE estafeta_source_rows_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE estafeta_source_lag_seconds gauge\n"),
        "{text}"
    );

    // 2. A row whose value the query cannot cast: the whole query fails with 22P02; the error
    // names the SQLSTATE but not the value (PostgreSQL's message quotes it).
    client
        .execute(
            &format!("INSERT INTO {table} (codigo) VALUES ($1)"),
            &[&PATIENT_VALUE],
        )
        .await
        .unwrap();
    eventually(&agent, "the cast error", || async {
        source(&agent).await["outcome"] == "error"
    })
    .await;
    let s = source(&agent).await;
    assert_hidden("/v1/status", &s.to_string());
    let error = s["last_error"].as_str().unwrap_or_else(|| panic!("{s}"));
    assert!(error.contains("PostgreSQL 22P02"), "{error}");
    assert!(
        error.contains("postgres://postgres:***@127.0.0.1"),
        "{error}"
    );
    // Nor in the agent's log.
    assert_hidden(
        "the agent's log",
        &format!("{}{}", agent.stdout(), agent.stderr()),
    );
    client
        .execute(
            &format!("DELETE FROM {table} WHERE codigo = $1"),
            &[&PATIENT_VALUE],
        )
        .await
        .unwrap();
    eventually(&agent, "ok again once the row is gone", || async {
        source(&agent).await["outcome"] == "ok"
    })
    .await;

    // 3. The table is dropped: every cycle fails, and says which table.
    let errors_before = source(&agent).await["errors_total"].as_u64().unwrap();
    let success_before = sample(
        &metrics(&agent).await,
        &series("estafeta_source_last_success_timestamp_seconds"),
    )
    .unwrap();
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
    eventually(&agent, "the dropped table's error", || async {
        source(&agent).await["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("42P01"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let s = source(&agent).await;
    assert_eq!(s["outcome"], "error", "{s}");
    let error = s["last_error"].as_str().unwrap();
    assert!(
        error.contains(&format!("relation \"{table}\" does not exist")),
        "{error}"
    );
    assert!(s["errors_total"].as_u64().unwrap() > errors_before, "{s}");
    assert_eq!(s["records_total"], 3, "{s}");
    assert_hidden("/v1/status", &s.to_string());
    let text = metrics(&agent).await;
    assert_hidden("/metrics", &text);
    assert_eq!(
        sample(&text, &series("estafeta_source_up")),
        Some(0.0),
        "{text}"
    );
    assert!(
        sample(&text, &series("estafeta_source_errors_total")).unwrap() > errors_before as f64,
        "{text}"
    );
    // The last success stays where it was: `time() - …` grows, which is what an alert watches.
    let success = sample(
        &text,
        &series("estafeta_source_last_success_timestamp_seconds"),
    );
    assert!(success.unwrap() <= success_before + 1.0, "{text}");

    // `estafeta status` asks the running agent.
    let ingest_addr = agent.addr().to_string();
    let cli_env = [
        ("CONFIG_FILE", "estafeta.toml"),
        ("CENTRAL_DATABASE_URL", estafeta_e2e::PG_URL),
        ("INGEST_ADDR", ingest_addr.as_str()),
    ];
    let output = run_cli(dir.path(), &cli_env, &["status"]).await;
    assert!(output.status.success(), "{output:?}");
    let cli = String::from_utf8_lossy(&output.stdout);
    assert!(cli.contains("SOURCE") && cli.contains("LAG"), "{cli}");
    assert!(
        cli.lines()
            .any(|l| l.starts_with("exames") && l.contains("error")),
        "{cli}"
    );
    assert!(
        cli.contains("source exames last error:") && cli.contains("42P01"),
        "{cli}"
    );
    assert_hidden("estafeta status", &cli);

    // The page: a Sources table with the error, and the alert above it.
    let driver = Chromedriver::start().await;
    let profile = tempfile::tempdir().unwrap();
    let browser = open_browser(&driver, profile.path()).await;
    browser.goto(&agent.url("/")).await.unwrap();
    let row = browser
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::XPath(
            "//table[@id='sources']//tr[td[1][.='exames']][td[contains(., '42P01')]]",
        ))
        .await
        .expect("the page shows the source's error");
    let row_text = row.text().await.unwrap();
    assert!(
        row_text.contains("error") && row_text.contains("does not exist"),
        "{row_text}"
    );
    assert_hidden("the status page", &row_text);
    let alert = browser
        .find(Locator::Id("alert"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        alert.contains("Source exames failed its last cycle"),
        "{alert}"
    );
    let png = browser.screenshot().await.expect("a screenshot");
    let shot = estafeta_e2e::profile_dir().join("status-page-sources.png");
    std::fs::write(&shot, &png).unwrap();
    println!("screenshot of the Sources table: {}", shot.display());

    // 4. Fixed: the table is back with a new row; the next cycle reads it and the error clears.
    client
        .batch_execute(&format!(
            "{create}; INSERT INTO {table} (codigo) VALUES ('4');"
        ))
        .await
        .unwrap();
    eventually(&agent, "the source ok again", || async {
        let s = source(&agent).await;
        s["outcome"] == "ok" && s["records_total"] == 4
    })
    .await;
    let s = source(&agent).await;
    assert!(s["last_error"].is_null(), "{s}");
    assert!(s["lag_secs"].as_u64().unwrap() < 30, "{s}");
    let text = metrics(&agent).await;
    assert_eq!(
        sample(&text, &series("estafeta_source_up")),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &series("estafeta_source_records_total")),
        Some(4.0),
        "{text}"
    );
    browser
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::XPath(
            "//table[@id='sources']//tr[td[1][.='exames']][td[3][.='ok']]",
        ))
        .await
        .expect("the page shows the source ok again, by itself");
    browser.close().await.unwrap();
}
