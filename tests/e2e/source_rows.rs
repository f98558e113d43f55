//! SQL sources, what the teams migrating from seeds 001, 003 and 004 hit (issue 22), end to end
//! with the real binary and the real databases:
//!
//! - MariaDB: a `DATETIME` written in São Paulo's local time with a debounce: a fresh row waits
//!   for the debounce instead of being read as three hours old (`time_zone`).
//! - SQLite: `max_records` caps the rows one cycle reads, apart from `page_size`.
//! - SQLite: a row holding a value the agent cannot read is set aside under
//!   `_failed/_refused/` with its reason; the rows around it are staged and the checkpoint moves
//!   past it, also when a page holds only refused rows; `estafeta retry` lists them, and says
//!   such a row (a value it could not read) is read again with `sources reset`, not replayed.
//! - PostgreSQL: a queue table consumed with `after_stage`; a SIGKILL after the page is staged
//!   but before its statement ran is finished at the restart, and no row lands twice.
//! - SQLite: one template block expanded over two hospitals, each its own source and
//!   checkpoint, shown by `check-config`; intervals written `hh:mm:ss` and their errors.

use std::path::Path;
use std::time::{Duration, Instant};

use estafeta_e2e::{MYSQL_URL, PG_URL, log_tail, mysql, pg, run_cli, unique_name};
use mysql_async::prelude::Queryable;
use serde_json::Value;

use super::sources::{landed, source_env, started, wait_landed, write_config};

/// `estafeta sources --json`, one object per source, by name.
/// The `status` column of `table`, in id order, as one string (`"PPT"`).
async fn statuses(client: &tokio_postgres::Client, table: &str) -> String {
    client
        .query(&format!("SELECT status FROM {table} ORDER BY id"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

async fn sources_json(dir: &Path, env: &[(&str, &str)]) -> Vec<Value> {
    let out = run_cli(dir, env, &["sources", "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_time_column_with_a_debounce_is_not_staged_early() {
    let table = unique_name("src_tz");
    let agent_id = unique_name("src_tz");
    let mut conn = mysql().await;
    conn.query_drop(format!(
        "CREATE TABLE {table} (id INT PRIMARY KEY, nome VARCHAR(50), criado_em DATETIME(6))"
    ))
    .await
    .unwrap();
    // São Paulo has kept UTC-3 all year since 2019: its wall clock is UTC minus three hours,
    // as a Brazilian SQL Server's GETDATE() writes it.
    let local_now = (chrono::Utc::now() - chrono::Duration::hours(3)).naive_utc();
    let fmt = |t: chrono::NaiveDateTime| t.format("%Y-%m-%d %H:%M:%S%.6f").to_string();
    conn.exec_drop(
        format!("INSERT INTO {table} VALUES (1, 'antiga', ?), (2, 'recem-chegada', ?)"),
        (
            fmt(local_now - chrono::Duration::minutes(10)),
            fmt(local_now),
        ),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &format!(
            r#"
[[sources]]
name = "tz"
url = "{MYSQL_URL}"
query = "sql/sources/tz.sql"
every = "00:00:01"
entity = "visit"
action = "create"
key = "id"
checkpoint = "id"
debounce = "00:00:08"
debounce_column = "criado_em"
time_zone = "America/Sao_Paulo"
"#
        ),
        &[(
            "tz",
            &format!(
                "SELECT id, nome, criado_em FROM {table} WHERE (:last_id IS NULL OR id > :last_id) ORDER BY id LIMIT :limit"
            ),
        )],
    );
    let env = source_env(&agent_id);
    let inserted = Instant::now();
    let mut agent = started(dir.path(), &env).await;
    let rows = wait_landed(&agent, &agent_id, 1, Duration::from_secs(20)).await;
    assert_eq!(rows[0].2["id"], 1);
    // Cycles run every second; a row read as UTC would look three hours old and go at once.
    while inserted.elapsed() < Duration::from_secs(5) {
        let rows = landed(&agent_id).await;
        assert_eq!(
            rows.len(),
            1,
            "the row written {:?} ago in local time was staged before its 8 s debounce: {rows:?}",
            inserted.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows = wait_landed(&agent, &agent_id, 2, Duration::from_secs(20)).await;
    assert!(
        inserted.elapsed() >= Duration::from_secs(7),
        "landed after {:?}",
        inserted.elapsed()
    );
    assert_eq!(rows[1].2["id"], 2);
    agent.terminate();
    conn.query_drop(format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

/// A SQLite table `t (id INTEGER PRIMARY KEY, nome TEXT, obs)` in `dir/hospital.db` with rows
/// `1..=n`.
fn sqlite_table(dir: &Path, n: i64) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(dir.join("hospital.db")).unwrap();
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, nome TEXT, obs);")
        .unwrap();
    for id in 1..=n {
        conn.execute(
            "INSERT INTO t VALUES (?1, ?2, 'ok')",
            rusqlite::params![id, format!("Paciente {id}")],
        )
        .unwrap();
    }
    conn
}

const SQLITE_QUERY: &str = "SELECT id, nome, obs FROM t WHERE (:last_id IS NULL OR id > :last_id) ORDER BY id LIMIT :limit";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_records_caps_a_cycle_apart_from_the_page_size() {
    let agent_id = unique_name("src_cap");
    let dir = tempfile::tempdir().unwrap();
    sqlite_table(dir.path(), 10);
    write_config(
        dir.path(),
        &format!(
            r#"
[[sources]]
name = "cap"
url = "sqlite://{}"
query = "sql/sources/cap.sql"
every = "00:00:04"
page_size = 2
max_records = 4
entity = "patient"
action = "create"
key = "id"
checkpoint = "id"
"#,
            dir.path().join("hospital.db").display()
        ),
        &[("cap", SQLITE_QUERY)],
    );
    let env = source_env(&agent_id);
    let mut agent = started(dir.path(), &env).await;
    let started_at = Instant::now();
    wait_landed(&agent, &agent_id, 4, Duration::from_secs(20)).await;
    // The first cycle (at start) read two pages of two rows, then stopped at max_records.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    if started_at.elapsed() < Duration::from_secs(3) {
        let rows = landed(&agent_id).await;
        assert_eq!(
            rows.len(),
            4,
            "one cycle read more than max_records: {rows:?}"
        );
        let line = &sources_json(dir.path(), &env).await[0];
        assert_eq!(line["last_rows"], 4, "{line}");
        assert_eq!(line["checkpoint"], "[4]", "{line}");
    }
    // The next cycles take the rest, four rows at a time.
    let rows = wait_landed(&agent, &agent_id, 10, Duration::from_secs(30)).await;
    let ids: Vec<i64> = rows.iter().map(|r| r.2["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, (1..=10).collect::<Vec<_>>());
    agent.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_cannot_become_a_record_is_set_aside_and_the_source_moves_on() {
    let agent_id = unique_name("src_refuse");
    let dir = tempfile::tempdir().unwrap();
    let conn = sqlite_table(dir.path(), 5);
    // A BLOB where the other rows have text: SQLite types values, not columns.
    conn.execute("UPDATE t SET obs = x'00ff10' WHERE id = 3", [])
        .unwrap();
    write_config(
        dir.path(),
        &format!(
            r#"
[[sources]]
name = "refuse"
url = "sqlite://{}"
query = "sql/sources/refuse.sql"
every = "300ms"
entity = "patient"
action = "create"
key = "id"
checkpoint = "id"
"#,
            dir.path().join("hospital.db").display()
        ),
        &[("refuse", SQLITE_QUERY)],
    );
    let env = source_env(&agent_id);
    let mut agent = started(dir.path(), &env).await;
    let rows = wait_landed(&agent, &agent_id, 4, Duration::from_secs(20)).await;
    let ids: Vec<i64> = rows.iter().map(|r| r.2["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [1, 2, 4, 5], "the other rows of the page are staged");
    let refused_dir = dir.path().join("staging/_failed/_refused/refuse");
    let letter: Value =
        serde_json::from_slice(&std::fs::read(refused_dir.join("3.json")).unwrap()).unwrap();
    assert_eq!(letter["source"], "refuse");
    assert_eq!(letter["checkpoint"], "[3]");
    assert_eq!(letter["row"]["id"], 3);
    assert_eq!(letter["row"]["nome"], "Paciente 3");
    let reason = letter["reason"].as_str().unwrap();
    assert!(
        reason.contains("\"obs\"") && reason.contains("BLOB") && reason.contains("sources reset"),
        "{reason}"
    );
    // A page of refused rows only still moves the checkpoint.
    conn.execute("INSERT INTO t VALUES (6, 'Paciente 6', x'01')", [])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = &sources_json(dir.path(), &env).await[0];
        if line["checkpoint"] == "[6]" {
            assert_eq!(line["last_error"], Value::Null, "{line}");
            assert_eq!(line["refused"], 2, "{line}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "checkpoint stuck: {line}; log:\n{}",
            log_tail(&agent, 20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(refused_dir.join("6.json").exists());
    conn.execute("INSERT INTO t VALUES (7, 'Paciente 7', 'ok')", [])
        .unwrap();
    let rows = wait_landed(&agent, &agent_id, 5, Duration::from_secs(20)).await;
    assert_eq!(rows[4].2["id"], 7);
    // The log says how many, never the values.
    assert!(
        agent.stderr().contains("refused=1"),
        "{}",
        log_tail(&agent, 20)
    );
    assert!(!agent.stderr().contains("Paciente 3"));
    // A dead letter `estafeta retry` lists; a value that could not be read cannot be replayed
    // from the file (it holds NULL there): --send says so and points at `sources reset`.
    let out = run_cli(dir.path(), &env, &["retry"]).await;
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("cannot replay refused row source=refuse checkpoint=[3]: "),
        "{listed}"
    );
    let out = run_cli(dir.path(), &env, &["retry", "--send", "--limit", "1"]).await;
    let sent = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success()
            && sent.contains("not replayed refused row source=refuse checkpoint=[3]")
            && sent.contains("estafeta sources reset refuse --to"),
        "{sent}"
    );
    assert!(refused_dir.join("3.json").exists(), "the file stays");
    agent.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_table_is_marked_after_staging_even_across_a_sigkill() {
    let table = unique_name("src_fila");
    let agent_id = unique_name("src_fila");
    let client = pg().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, nome TEXT NOT NULL, status CHAR(1) NOT NULL DEFAULT 'P');
             INSERT INTO {table} (nome) SELECT 'Pendente ' || g FROM generate_series(1, 3) g;"
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        &format!(
            r#"
[[sources]]
name = "fila"
url = "{PG_URL}"
query = "sql/sources/fila.sql"
after_stage = "sql/sources/fila_taken.sql"
every = "200ms"
entity = "admission"
action = "create"
key = "id"
checkpoint = "id"
"#
        ),
        &[
            (
                "fila",
                &format!(
                    "SELECT id, nome FROM {table} WHERE status = 'P' AND (:last_id::bigint IS NULL OR id > :last_id) ORDER BY id LIMIT :limit"
                ),
            ),
            (
                "fila_taken",
                &format!("UPDATE {table} SET status = 'T' WHERE id = :id AND status = 'P'"),
            ),
        ],
    );
    // Another session holds the table against writes (reads still pass): the page is read and
    // staged, its UPDATE waits.
    let mut locker = pg().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute(&format!("LOCK TABLE {table} IN EXCLUSIVE MODE"))
        .await
        .unwrap();
    let env = source_env(&agent_id);
    let mut agent = started(dir.path(), &env).await;
    wait_landed(&agent, &agent_id, 3, Duration::from_secs(20)).await;
    let note = dir.path().join("staging/_state/source-notes/fila.json");
    assert!(note.exists(), "the page's note waits for its statement");
    agent.kill9();
    lock.rollback().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        statuses(&client, &table).await,
        "PPP",
        "the killed agent's statement never committed"
    );

    // The restart finishes the page's statement before it reads on.
    agent.restart();
    agent.wait_ready(Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while statuses(&client, &table).await != "TTT" {
        assert!(
            Instant::now() < deadline,
            "rows not marked: {}; log:\n{}",
            statuses(&client, &table).await,
            log_tail(&agent, 20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The note goes once the statement committed (just after the rows show as taken).
    let deadline = Instant::now() + Duration::from_secs(5);
    while note.exists() {
        assert!(
            Instant::now() < deadline,
            "the note stays after its statement ran"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client
        .batch_execute(&format!(
            "INSERT INTO {table} (nome) VALUES ('Pendente 4'), ('Pendente 5')"
        ))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while statuses(&client, &table).await != "TTTTT" {
        assert!(Instant::now() < deadline, "{}", log_tail(&agent, 20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = wait_landed(&agent, &agent_id, 5, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows = if rows.len() == 5 {
        landed(&agent_id).await
    } else {
        rows
    };
    let ids: Vec<i64> = rows.iter().map(|r| r.2["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5], "each row once");
    agent.terminate();
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_expands_into_one_source_per_hospital_with_its_own_checkpoint() {
    let agent_id = unique_name("src_tpl");
    let dir = tempfile::tempdir().unwrap();
    for (hospital, n) in [("hc", 2), ("hsl", 3)] {
        let sub = dir.path().join(hospital);
        std::fs::create_dir_all(&sub).unwrap();
        sqlite_table(&sub, n);
    }
    let db = |h: &str| dir.path().join(h).join("hospital.db").display().to_string();
    write_config(
        dir.path(),
        &format!(
            r#"
[[sources]]
name = "{{hospital}}-pacientes"
url = "sqlite://{{db}}"
query = "sql/sources/pacientes.sql"
every = "00:00:01"
entity = "patient"
action = "create"
key = "key"
checkpoint = "id"
each = [
  {{ hospital = "hc", db = "{}" }},
  {{ hospital = "hsl", db = "{}" }},
]
"#,
            db("hc"),
            db("hsl")
        ),
        &[(
            "pacientes",
            "SELECT id, :hospital AS hospital, :hospital || '-' || id AS key, nome FROM t WHERE (:last_id IS NULL OR id > :last_id) ORDER BY id LIMIT :limit",
        )],
    );
    let env = source_env(&agent_id);
    let out = run_cli(dir.path(), &env, &["check-config"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for h in ["hc", "hsl"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("source {h}-pacientes:")))
            .unwrap_or_else(|| panic!("no expansion for {h}: {text}"));
        assert!(
            line.contains(&format!("hospital={h}")) && line.contains("every 00:00:01"),
            "{line}"
        );
    }
    let mut agent = started(dir.path(), &env).await;
    let rows = wait_landed(&agent, &agent_id, 5, Duration::from_secs(20)).await;
    let mut keys: Vec<&str> = rows.iter().map(|r| r.1.as_deref().unwrap()).collect();
    keys.sort();
    assert_eq!(keys, ["hc-1", "hc-2", "hsl-1", "hsl-2", "hsl-3"]);
    assert!(rows.iter().all(|r| {
        r.2["key"]
            .as_str()
            .unwrap()
            .starts_with(r.2["hospital"].as_str().unwrap())
    }));
    let lines = sources_json(dir.path(), &env).await;
    let checkpoints: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["name"].as_str().unwrap(),
                l["checkpoint"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        checkpoints,
        [("hc-pacientes", "[2]"), ("hsl-pacientes", "[3]")]
    );
    agent.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_interval_is_named_with_the_forms_expected_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    write_config(
        dir.path(),
        r#"
[[sources]]
name = "ruim"
url = "sqlite://./x.db"
query = "sql/sources/ruim.sql"
every = "00:00:5x"
entity = "patient"
action = "create"
checkpoint = "id"
debounce = "1 minuto"
debounce_column = "criado_em"
time_zone = "America/Sao_Pablo"
"#,
        &[("ruim", SQLITE_QUERY)],
    );
    let env = source_env("ruim");
    let out = run_cli(dir.path(), &env, &["check-config"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for expected in [
        "sources[0].every",
        "00:00:5x",
        "sources[0].debounce",
        "1 minuto",
        "\"00:00:05\"",
        "sources[0].time_zone",
        "America/Sao_Paulo",
    ] {
        assert!(err.contains(expected), "{expected:?} missing from:\n{err}");
    }
    let mut agent = estafeta_e2e::Agent::start(dir.path(), &env);
    let status = agent.wait(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(2));
    assert!(!dir.path().join("staging/_state/sources.json").exists());
}
