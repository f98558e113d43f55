//! SQL sources (`[[sources]]`), end to end with the real binary and the real databases:
//!
//! - PostgreSQL: rows keep arriving in a source table while the agent is SIGKILLed ten times
//!   mid-cycle and restarted; the first start is an initial load paged 50 rows at a time. At the
//!   central landing table every source row appears exactly once, with nested fields.
//! - SQLite: grouping (one record per request, its items in an array) and debounce (a request
//!   younger than the debounce is left for a later cycle), and `estafeta sources` / `reset`.
//! - MariaDB: types kept (integers, decimals as exact strings, accented text, datetimes); a
//!   query naming a missing table shows its error class (MySQL 1146) in the source's status.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use estafeta_e2e::{Agent, MYSQL_URL, PG_URL, log_tail, mysql, pg, run_cli, unique_name};
use mysql_async::prelude::Queryable;
use serde_json::{Value, json};

/// Writes `estafeta.toml` and `sql/sources/<name>.sql` into `dir`.
pub(crate) fn write_config(dir: &Path, toml: &str, queries: &[(&str, &str)]) {
    std::fs::create_dir_all(dir.join("sql/sources")).unwrap();
    for (name, sql) in queries {
        std::fs::write(dir.join(format!("sql/sources/{name}.sql")), sql).unwrap();
    }
    std::fs::write(dir.join("estafeta.toml"), toml).unwrap();
}

/// The environment of an agent that reads `estafeta.toml` in its folder and lands records in
/// PostgreSQL as `agent_id`, flushing every second.
pub(crate) fn source_env(agent_id: &str) -> [(&'static str, &str); 4] {
    [
        ("CONFIG_FILE", "estafeta.toml"),
        ("CENTRAL_DATABASE_URL", PG_URL),
        ("AGENT_ID", agent_id),
        ("CRONTAB", "* * * * * *"),
    ]
}

/// `estafeta run` in `dir` with `env`, once it answers.
pub(crate) async fn started(dir: &Path, env: &[(&str, &str)]) -> Agent {
    let mut agent = Agent::start(dir, env);
    agent.wait_ready(Duration::from_secs(20)).await;
    agent
}

/// Payloads landed in PostgreSQL for `agent_id`, in landing order.
pub(crate) async fn landed(agent_id: &str) -> Vec<(String, Option<String>, Value)> {
    let client = pg().await;
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('public.estafeta_records') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if !exists {
        return Vec::new();
    }
    client
        .query(
            "SELECT entity, record_key, payload FROM estafeta_records WHERE agent_id = $1 ORDER BY id",
            &[&agent_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

pub(crate) async fn wait_landed(
    agent: &Agent,
    agent_id: &str,
    want: usize,
    timeout: Duration,
) -> Vec<(String, Option<String>, Value)> {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = landed(agent_id).await;
        if rows.len() >= want || Instant::now() >= deadline {
            assert!(
                rows.len() >= want,
                "{} of {want} rows landed within {timeout:?}; agent log tail:\n{}",
                rows.len(),
                log_tail(agent, 40)
            );
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_source_rows_land_exactly_once_across_sigkills() {
    let table = unique_name("src_patient");
    let agent_id = unique_name("src_pg");
    let client = pg().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, nome TEXT NOT NULL, peso NUMERIC(6,2), ativo BOOLEAN NOT NULL DEFAULT true, criado_em TIMESTAMPTZ NOT NULL DEFAULT now());
             INSERT INTO {table} (nome, peso) SELECT 'Paciente ' || g || ' Conceição', g + 0.25 FROM generate_series(1, 300) g;"
        ))
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &format!(
            r#"
[[sources]]
name = "pacientes"
url = "{PG_URL}"
query = "sql/sources/pacientes.sql"
every = "100ms"
max_records = 50
entity = "patient"
action = "upsert"
key = "id"
checkpoint = "id"
"#
        ),
        &[(
            "pacientes",
            &format!(
                "-- New patients since the last cycle, oldest first.\n\
                 SELECT id, nome AS \"patient.name\", peso AS \"patient.weight\", ativo AS \"patient.active\", criado_em\n\
                   FROM {table}\n\
                  WHERE (:last_id::bigint IS NULL OR id > :last_id)\n\
                  ORDER BY id\n\
                  LIMIT :limit"
            ),
        )],
    );
    let env = source_env(&agent_id);
    let mut agent = started(dir.path(), &env).await;

    // Rows keep arriving while the agent is killed at moments that fall anywhere in its cycles.
    let inserter = {
        let table = table.clone();
        tokio::spawn(async move {
            let client = pg().await;
            for i in 0..60 {
                client
                    .execute(
                        &format!("INSERT INTO {table} (nome, peso) SELECT 'Novo ' || $1::int || '-' || g, 1.5 FROM generate_series(1, 5) g"),
                        &[&i],
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..10 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(80 + seed % 250)).await;
        agent.kill9();
        agent.restart();
        agent.wait_ready(Duration::from_secs(20)).await;
    }
    inserter.await.unwrap();
    let total: i64 = client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 600);

    let rows = wait_landed(&agent, &agent_id, total as usize, Duration::from_secs(60)).await;
    // Give a stray second copy the time to land, then count each source id.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows = if rows.len() == total as usize {
        landed(&agent_id).await
    } else {
        rows
    };
    let mut per_id: BTreeMap<i64, usize> = BTreeMap::new();
    for (entity, key, payload) in &rows {
        assert_eq!(entity, "patient");
        let id = payload["id"].as_i64().expect("id is a number");
        assert_eq!(key.as_deref(), Some(id.to_string().as_str()));
        *per_id.entry(id).or_default() += 1;
    }
    let doubled: Vec<_> = per_id.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        doubled.is_empty(),
        "source rows staged more than once: {doubled:?}"
    );
    assert_eq!(per_id.len(), total as usize, "every source row lands once");
    assert_eq!(*per_id.keys().next().unwrap(), 1);
    assert_eq!(*per_id.keys().last().unwrap(), total);

    // Types and nesting, on the first row.
    let first = &rows.iter().find(|(_, _, p)| p["id"] == 1).unwrap().2;
    assert_eq!(first["patient"]["name"], "Paciente 1 Conceição");
    assert_eq!(
        first["patient"]["weight"], "1.25",
        "a NUMERIC keeps its exact digits"
    );
    assert_eq!(first["patient"]["active"], true);
    assert!(
        first["criado_em"].as_str().unwrap().ends_with('Z'),
        "{first}"
    );

    let out = run_cli(dir.path(), &env, &["sources", "--json"]).await;
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["name"], "pacientes");
    assert_eq!(line["checkpoint"], format!("[{total}]"));
    assert_eq!(line["last_error"], Value::Null);
    agent.terminate();
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_source_groups_items_waits_for_debounce_and_can_be_rewound() {
    let agent_id = unique_name("src_sqlite");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hospital.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let now = chrono::Utc::now();
    let old = (now - chrono::Duration::minutes(10)).to_rfc3339();
    conn.execute_batch(
        "CREATE TABLE item_sol (cod_item INTEGER PRIMARY KEY, cod_solicitacao INTEGER, paciente TEXT, exame TEXT, criado_em TEXT);",
    )
    .unwrap();
    for (item, request, patient, exam) in [
        (1, 100, "João", "HMG"),
        (2, 100, "João", "GLI"),
        (3, 101, "Maria", "TSH"),
    ] {
        conn.execute(
            "INSERT INTO item_sol VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![item, request, patient, exam, old],
        )
        .unwrap();
    }
    // A request still being written: younger than the debounce.
    conn.execute(
        "INSERT INTO item_sol VALUES (4, 102, 'Ana', 'URO', ?1)",
        [now.to_rfc3339()],
    )
    .unwrap();
    write_config(
        dir.path(),
        &format!(
            r#"
[[sources]]
name = "monitor"
url = "sqlite://{}"
query = "sql/sources/monitor.sql"
every = "200ms"
entity = "exam_request"
action = "create"
key = "request"
checkpoint = "cod_item"
group_by = "request"
items = "itens"
debounce_secs = 3
debounce_column = "criado_em"
"#,
            db.display()
        ),
        &[(
            "monitor",
            "SELECT cod_item, cod_solicitacao AS request, paciente AS \"patient.name\",
                    cod_item AS \"itens.cod_item\", exame AS \"itens.exame\", criado_em
               FROM item_sol WHERE (:last_cod_item IS NULL OR cod_item > :last_cod_item)
              ORDER BY cod_item LIMIT :limit",
        )],
    );
    let env = source_env(&agent_id);
    let mut agent = started(dir.path(), &env).await;
    let rows = wait_landed(&agent, &agent_id, 2, Duration::from_secs(20)).await;
    assert_eq!(
        rows.len(),
        2,
        "request 102 waits for its debounce: {rows:?}"
    );
    assert_eq!(
        rows[0].2,
        json!({"cod_item": 1, "request": 100, "patient": {"name": "João"}, "criado_em": old,
               "itens": [{"cod_item": 1, "exame": "HMG"}, {"cod_item": 2, "exame": "GLI"}]})
    );
    assert_eq!(rows[0].1.as_deref(), Some("100"));
    assert_eq!(rows[1].2["itens"], json!([{"cod_item": 3, "exame": "TSH"}]));
    // Once the debounce has passed, the last request goes too.
    let rows = wait_landed(&agent, &agent_id, 3, Duration::from_secs(20)).await;
    assert_eq!(rows[2].2["request"], 102);
    agent.terminate();
    agent.wait(Duration::from_secs(20)).await;

    // Rewound to after item 2, the next start reads request 101 and 102 again (and only them).
    let out = run_cli(
        dir.path(),
        &env,
        &["sources", "reset", "monitor", "--to", "2"],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_cli(dir.path(), &env, &["sources"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("monitor") && text.contains("[2]"), "{text}");
    let out = run_cli(dir.path(), &env, &["sources", "reset", "nope"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("monitor"));
    agent.restart();
    agent.wait_ready(Duration::from_secs(20)).await;
    let rows = wait_landed(&agent, &agent_id, 5, Duration::from_secs(20)).await;
    let requests: Vec<i64> = rows
        .iter()
        .map(|r| r.2["request"].as_i64().unwrap())
        .collect();
    assert_eq!(requests, [100, 101, 102, 101, 102]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_source_keeps_types() {
    let table = unique_name("src_mdb");
    let agent_id = unique_name("src_mdb");
    let mut conn = mysql().await;
    conn.query_drop(format!(
        "CREATE TABLE {table} (id INT PRIMARY KEY, nome VARCHAR(100) CHARACTER SET utf8mb4, valor DECIMAL(12,4), nascido DATE, visto DATETIME(6), nota DOUBLE, obs TEXT NULL)"
    ))
    .await
    .unwrap();
    conn.query_drop(format!(
        "INSERT INTO {table} VALUES (1, 'Conceição', 12345678.1234, '1980-02-29', '2026-11-23 10:30:00.250000', 7.5, NULL)"
    ))
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &format!(
            r#"
[[sources]]
name = "mdb"
url = "{MYSQL_URL}"
query = "sql/sources/mdb.sql"
every = "200ms"
entity = "person"
action = "create"
key = "id"
checkpoint = "id"
"#
        ),
        &[(
            "mdb",
            &format!(
                "SELECT * FROM {table} WHERE (:last_id IS NULL OR id > :last_id) ORDER BY id LIMIT :limit"
            ),
        )],
    );
    let env = source_env(&agent_id);
    let mut agent = started(dir.path(), &env).await;
    let rows = wait_landed(&agent, &agent_id, 1, Duration::from_secs(20)).await;
    assert_eq!(
        rows[0].2,
        json!({"id": 1, "nome": "Conceição", "valor": "12345678.1234", "nascido": "1980-02-29",
               "visto": "2026-11-23T10:30:00.250000", "nota": 7.5, "obs": null})
    );
    agent.terminate();
    conn.query_drop(format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_load_of_100000_rows_resumes_after_a_sigkill_midway() {
    const ROWS: i64 = 100_000;
    let table = unique_name("src_load");
    let agent_id = unique_name("src_load");
    let client = pg().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, nome TEXT NOT NULL);
             INSERT INTO {table} (nome) SELECT 'Paciente ' || g FROM generate_series(1, {ROWS}) g;"
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &format!(
            r#"
[[sources]]
name = "carga"
url = "{PG_URL}"
query = "sql/sources/carga.sql"
every = "1h"
page_size = 2000
entity = "patient"
action = "upsert"
key = "id"
checkpoint = "id"
"#
        ),
        &[(
            "carga",
            &format!(
                "SELECT id, nome FROM {table} WHERE (:last_id::bigint IS NULL OR id > :last_id) ORDER BY id LIMIT :limit"
            ),
        )],
    );
    let env = source_env(&agent_id);
    let mut agent = started(dir.path(), &env).await;
    // Kill once part of the history has landed, with pages still being read and delivered.
    let deadline = Instant::now() + Duration::from_secs(120);
    let at_kill = loop {
        let n = landed_count(&agent_id).await;
        if n >= 10_000 {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "the load did not start; log:\n{}",
            log_tail(&agent, 30)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    agent.kill9();
    assert!(
        at_kill < ROWS as usize,
        "the load finished before the kill ({at_kill} rows)"
    );
    let out = run_cli(dir.path(), &env, &["sources", "--json"]).await;
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    let checkpoint: Vec<i64> = serde_json::from_str(line["checkpoint"].as_str().unwrap()).unwrap();
    assert!(
        checkpoint[0] > 0 && checkpoint[0] < ROWS,
        "midway checkpoint {checkpoint:?}"
    );

    // The restart goes on from the checkpoint (its first cycle runs at once), not from the start.
    agent.restart();
    agent.wait_ready(Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    while landed_count(&agent_id).await < ROWS as usize {
        assert!(
            Instant::now() < deadline,
            "the load did not finish; log:\n{}",
            log_tail(&agent, 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT payload->>'id'), min((payload->>'id')::bigint), max((payload->>'id')::bigint)
               FROM estafeta_records WHERE agent_id = $1",
            &[&agent_id],
        )
        .await
        .unwrap();
    let (count, distinct, min, max): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(
        (count, distinct, min, max),
        (ROWS, ROWS, 1, ROWS),
        "every row once"
    );
    agent.terminate();
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

async fn landed_count(agent_id: &str) -> usize {
    let client = pg().await;
    client
        .query_one(
            "SELECT count(*) FROM estafeta_records WHERE agent_id = $1",
            &[&agent_id],
        )
        .await
        .map_or(0, |r| r.get::<_, i64>(0) as usize)
}

/// The ODBC path (the way hospitals reach SQL Server, Oracle and InterSystems) through Debian's
/// `odbc-postgresql` driver against the local PostgreSQL: accented text intact end to end,
/// types back from the driver's text, the checkpoint bound as a parameter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odbc_source_through_the_postgresql_driver_keeps_accents_and_types() {
    let table = unique_name("src_odbc");
    let agent_id = unique_name("src_odbc");
    let client = pg().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id BIGINT PRIMARY KEY, nome TEXT NOT NULL, peso NUMERIC(6,2), ativo BOOLEAN, visto TIMESTAMP);
             INSERT INTO {table} VALUES (1, 'João', 61.50, true, '2026-11-23 10:30:00'),
                                        (2, 'Conceição', NULL, false, NULL),
                                        (3, 'Antônia Araújo', 70.25, NULL, '2026-11-23 11:00:00.5');"
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        r#"
[[sources]]
name = "via-odbc"
url = "odbc:Driver={PostgreSQL Unicode};Server=127.0.0.1;Port=5432;Database=test;Uid=postgres;Pwd=unused-secret;BoolsAsChar=0;"
query = "sql/sources/odbc.sql"
every = "200ms"
max_records = 2
entity = "patient"
action = "create"
key = "id"
checkpoint = "id"
"#,
        &[(
            "odbc",
            &format!(
                "SELECT id, nome, peso, ativo, visto FROM {table} WHERE (CAST(:last_id AS bigint) IS NULL OR id > CAST(:last_id AS bigint)) ORDER BY id LIMIT :limit"
            ),
        )],
    );
    let env = source_env(&agent_id);
    let mut agent = started(dir.path(), &env).await;
    let rows = wait_landed(&agent, &agent_id, 3, Duration::from_secs(30)).await;
    let payloads: Vec<&Value> = rows.iter().map(|r| &r.2).collect();
    assert_eq!(
        payloads,
        [
            &json!({"id": 1, "nome": "João", "peso": "61.50", "ativo": true, "visto": "2026-11-23T10:30:00.000000"}),
            &json!({"id": 2, "nome": "Conceição", "peso": null, "ativo": false, "visto": null}),
            &json!({"id": 3, "nome": "Antônia Araújo", "peso": "70.25", "ativo": null, "visto": "2026-11-23T11:00:00.500000"}),
        ]
    );
    // The password never reaches the logs.
    assert!(
        !agent.stderr().contains("unused-secret"),
        "{}",
        log_tail(&agent, 20)
    );
    agent.terminate();
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

/// A MariaDB source whose query names a table that does not exist: its status (GET /v1/status)
/// says the error's class (MySQL 1146, table missing) and what to do next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mariadb_source_reading_a_missing_table_shows_the_error_class_in_its_status() {
    let dir = tempfile::tempdir().unwrap();
    let table = unique_name("src_missing");
    write_config(
        dir.path(),
        &format!(
            r#"
[[sources]]
name = "faltando"
url = "{MYSQL_URL}"
query = "sql/sources/faltando.sql"
every = "200ms"
entity = "exam"
action = "create"
checkpoint = "id"
"#
        ),
        &[(
            "faltando",
            &format!(
                "SELECT id FROM {table} WHERE :last_id IS NULL OR id > :last_id ORDER BY id LIMIT :limit"
            ),
        )],
    );
    let agent_id = unique_name("src_missing");
    let agent = started(dir.path(), &source_env(&agent_id)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let error = loop {
        let (code, status) = agent.get("/v1/status").await;
        assert_eq!(code, 200, "{status}");
        if let Some(error) = status["sources"][0]["last_error"].as_str() {
            break error.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{status}\n{}",
            log_tail(&agent, 20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        error.contains("MySQL 1146 (table missing)")
            && error.contains(&table)
            && error.contains("check the query file and the database in the url"),
        "{error}"
    );
}
