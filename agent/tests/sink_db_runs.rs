//! Runs of a key in the database sinks, against the real PostgreSQL and MariaDB
//! (`scripts/start-services`; never skipped) and a SQLite file: a batch carries several records
//! of one key, applied in sequence order; a record refused for good is dead, the later records
//! of its key in the batch are skipped (neither landed nor applied), other keys are delivered.
//! PostgreSQL's COPY paths too: a resend lands the new rows once, in one statement; a batch over
//! two connections never splits a key's run.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{agent_id, delivery, ids};
use estafeta::db::Dialect;
use estafeta::db::apply::ApplyStatements;
use estafeta::sinks::database::{self, DatabaseSinkConfig};
use estafeta::sinks::{Outcome, Sink};
use estafeta_staging::Delivery;
use mysql_async::prelude::Queryable;
use tokio::sync::Mutex;

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const MY_URL: &str = "mysql://root@127.0.0.1:3306/test";

/// Where a test looks at what landed, by direct connection.
enum Central {
    Postgres(tokio_postgres::Client),
    Mysql(Mutex<mysql_async::Conn>),
    Sqlite(PathBuf),
}

impl Central {
    async fn postgres() -> Central {
        let (client, connection) = tokio_postgres::connect(PG_URL, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|err| {
                panic!("cannot connect to PostgreSQL at {PG_URL}: {err}; run scripts/start-services to start the test servers")
            });
        tokio::spawn(connection);
        Central::Postgres(client)
    }

    async fn mysql() -> Central {
        let opts = mysql_async::Opts::from_url(MY_URL).expect("a valid URL");
        let conn = mysql_async::Conn::new(opts).await.unwrap_or_else(|err| {
            panic!("cannot connect to MariaDB at {MY_URL}: {err}; run scripts/start-services to start the test servers")
        });
        Central::Mysql(Mutex::new(conn))
    }

    fn sqlite(path: &Path) -> Central {
        Central::Sqlite(path.to_owned())
    }

    fn url(&self) -> String {
        match self {
            Central::Postgres(_) => PG_URL.to_owned(),
            Central::Mysql(_) => MY_URL.to_owned(),
            Central::Sqlite(path) => format!("sqlite://{}", path.display()),
        }
    }

    fn dialect(&self) -> Dialect {
        match self {
            Central::Postgres(_) => Dialect::Postgres,
            Central::Mysql(_) => Dialect::Mysql,
            Central::Sqlite(_) => Dialect::Sqlite,
        }
    }

    /// The sink for this database, with `connections` and the statement files in `apply`.
    fn sink(&self, agent: &str, connections: usize, apply: Option<&Path>) -> Arc<dyn Sink> {
        let apply = apply.map(|dir| {
            Arc::new(ApplyStatements::load(dir, self.dialect()).expect("the statements load"))
        });
        database::build(
            "central",
            DatabaseSinkConfig {
                url: self.url(),
                agent_id: agent.to_owned(),
                apply,
                idempotency_key: None,
                connections,
                transaction_pooling: false,
            },
        )
        .expect("a valid URL")
    }

    async fn execute(&self, sql: &str) {
        match self {
            Central::Postgres(client) => client.batch_execute(sql).await.expect(sql),
            Central::Mysql(conn) => conn.lock().await.query_drop(sql).await.expect(sql),
            Central::Sqlite(path) => rusqlite::Connection::open(path)
                .expect("open the SQLite file")
                .execute_batch(sql)
                .expect(sql),
        }
    }

    /// The first column of `sql`'s rows, as text, in order; `sql` takes one bound value.
    async fn strings(&self, sql: &str, value: &str) -> Vec<String> {
        match self {
            Central::Postgres(client) => client
                .query(&sql.replace('?', "$1"), &[&value])
                .await
                .expect(sql)
                .iter()
                .map(|row| row.get(0))
                .collect(),
            Central::Mysql(conn) => conn.lock().await.exec(sql, (value,)).await.expect(sql),
            Central::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path).expect("open the SQLite file");
                let mut statement = conn.prepare(sql).expect(sql);
                statement
                    .query_map([value], |row| row.get(0))
                    .expect(sql)
                    .collect::<Result<_, _>>()
                    .expect(sql)
            }
        }
    }

    /// The idempotency keys of `agent`'s landing rows, in the order they were inserted.
    async fn landed(&self, agent: &str) -> Vec<String> {
        self.strings(
            "SELECT idempotency_key FROM estafeta_records WHERE agent_id = ? ORDER BY id",
            agent,
        )
        .await
    }
}

/// A name no other test uses, for an entity and a table.
fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// The batch's ids at `indices`, in that order.
fn ids_at(batch: &[Delivery], indices: &[usize]) -> Vec<String> {
    indices
        .iter()
        .map(|&i| batch[i].envelope.id.clone())
        .collect()
}

/// Asserts `outcomes` against `expected`: `D` delivered, `X` dead, `S` skipped.
fn assert_outcomes(outcomes: &[Outcome], expected: &str) {
    let got: String = outcomes
        .iter()
        .map(|o| match o {
            Outcome::Delivered => 'D',
            Outcome::Dead { .. } => 'X',
            Outcome::Skipped => 'S',
            Outcome::Retry { .. } => 'R',
        })
        .collect();
    assert_eq!(got, expected, "{outcomes:#?}");
}

/// Runs of k1 (3 records), k2 (2) and the keyless records (2), interleaved in sequence order as
/// the store leases them; k1's second record has an action too long for the landing table.
fn landing_runs(entity: &str) -> Vec<Delivery> {
    let bad = "x".repeat(65);
    vec![
        delivery("create", entity, Some("k1"), r#"{"n":1}"#),
        delivery("create", entity, Some("k2"), r#"{"n":1}"#),
        delivery(&bad, entity, Some("k1"), r#"{"n":2}"#),
        delivery("create", entity, None, r#"{"n":1}"#),
        delivery("update", entity, Some("k2"), r#"{"n":2}"#),
        delivery("update", entity, Some("k1"), r#"{"n":3}"#),
        delivery("create", entity, None, r#"{"n":2}"#),
    ]
}

/// k1:1 delivered, k1:2 dead, k1:3 skipped and absent; k2 and the keyless delivered, landed in
/// sequence order; a resend is sorted the same and lands nothing twice.
async fn a_refused_record_skips_the_rest_of_its_run(central: Central) {
    let agent = agent_id();
    let sink = central.sink(&agent, 2, None);
    let batch = landing_runs(&unique("runs"));
    let outcomes = sink.deliver(&batch).await;
    assert_outcomes(&outcomes, "DDXDDSD");
    let landed = ids_at(&batch, &[0, 1, 3, 4, 6]);
    assert_eq!(central.landed(&agent).await, landed);

    // A resend is sorted the same way.
    assert_outcomes(&sink.deliver(&batch).await, "DDXDDSD");
    assert_eq!(
        central.landed(&agent).await,
        landed,
        "a resend adds nothing"
    );
}

/// Apply mode: an apply statement appending to a history table. k1's second record is refused
/// by the table's CHECK, k2's second cannot be bound (no `v`): both dead, the rest of their runs
/// skipped, neither landed nor applied; the keyless and k3 runs applied in sequence order.
async fn apply_mode_skips_the_rest_of_a_refused_run(central: Central, create_table: &str) {
    let agent = agent_id();
    let table = unique("runs_applied");
    central
        .execute(&create_table.replace("{table}", &table))
        .await;
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(
        dir.path().join(format!("{table}.upsert.sql")),
        format!("INSERT INTO {table} (k, v) VALUES (:k, :v)"),
    )
    .expect("write the statement");
    let sink = central.sink(&agent, 2, Some(dir.path()));
    let record = |key: Option<&str>, payload: &str| delivery("upsert", &table, key, payload);
    let batch = vec![
        record(Some("k1"), r#"{"k":"k1","v":"a1"}"#),
        record(Some("k2"), r#"{"k":"k2","v":"b1"}"#),
        record(Some("k1"), r#"{"k":"k1","v":"much too long"}"#),
        record(Some("k2"), r#"{"k":"k2"}"#),
        record(Some("k1"), r#"{"k":"k1","v":"a3"}"#),
        record(Some("k2"), r#"{"k":"k2","v":"b3"}"#),
        record(None, r#"{"k":"-","v":"n1"}"#),
        record(Some("k3"), r#"{"k":"k3","v":"c1"}"#),
        record(Some("k3"), r#"{"k":"k3","v":"c2"}"#),
        record(None, r#"{"k":"-","v":"n2"}"#),
    ];
    let applied_sql = format!("SELECT v FROM {table} WHERE k <> ? ORDER BY id");
    let outcomes = sink.deliver(&batch).await;
    assert_outcomes(&outcomes, "DDXXSSDDDD");
    let landed = ids_at(&batch, &[0, 1, 6, 7, 8, 9]);
    assert_eq!(central.landed(&agent).await, landed);
    let applied = ["a1", "b1", "n1", "c1", "c2", "n2"];
    assert_eq!(central.strings(&applied_sql, "").await, applied);

    // A resend is sorted the same way (the refusal's detail may quote a new identity value).
    assert_outcomes(&sink.deliver(&batch).await, "DDXXSSDDDD");
    assert_eq!(
        central.landed(&agent).await,
        landed,
        "a resend lands nothing"
    );
    assert_eq!(
        central.strings(&applied_sql, "").await,
        applied,
        "a resend applies nothing again"
    );
    central.execute(&format!("DROP TABLE {table}")).await;
}

#[tokio::test]
async fn postgres_a_refused_record_skips_the_rest_of_its_run() {
    a_refused_record_skips_the_rest_of_its_run(Central::postgres().await).await;
}

#[tokio::test]
async fn mariadb_a_refused_record_skips_the_rest_of_its_run() {
    a_refused_record_skips_the_rest_of_its_run(Central::mysql().await).await;
}

#[tokio::test]
async fn sqlite_a_refused_record_skips_the_rest_of_its_run() {
    let dir = tempfile::tempdir().expect("a temp dir");
    a_refused_record_skips_the_rest_of_its_run(Central::sqlite(&dir.path().join("c.db"))).await;
}

#[tokio::test]
async fn postgres_apply_mode_skips_the_rest_of_a_refused_run() {
    apply_mode_skips_the_rest_of_a_refused_run(
        Central::postgres().await,
        "CREATE TABLE {table} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
         k text NOT NULL, v text NOT NULL CHECK (length(v) < 10))",
    )
    .await;
}

#[tokio::test]
async fn mariadb_apply_mode_skips_the_rest_of_a_refused_run() {
    apply_mode_skips_the_rest_of_a_refused_run(
        Central::mysql().await,
        "CREATE TABLE {table} (id BIGINT AUTO_INCREMENT PRIMARY KEY, k VARCHAR(16) NOT NULL, \
         v VARCHAR(64) NOT NULL CHECK (char_length(v) < 10))",
    )
    .await;
}

#[tokio::test]
async fn sqlite_apply_mode_skips_the_rest_of_a_refused_run() {
    let dir = tempfile::tempdir().expect("a temp dir");
    apply_mode_skips_the_rest_of_a_refused_run(
        Central::sqlite(&dir.path().join("c.db")),
        "CREATE TABLE {table} (id INTEGER PRIMARY KEY, k TEXT NOT NULL, \
         v TEXT NOT NULL CHECK (length(v) < 10))",
    )
    .await;
}

/// The transaction ids (`xmin`) that wrote the given rows: one for rows inserted by one
/// statement, one per row for rows inserted row by row (each under its own savepoint).
async fn writers(client: &tokio_postgres::Client, ids: &[String]) -> usize {
    let row = client
        .query_one(
            "SELECT count(DISTINCT xmin::text) FROM estafeta_records WHERE idempotency_key = ANY($1)",
            &[&ids],
        )
        .await
        .expect("count the writing transactions");
    usize::try_from(row.get::<_, i64>(0)).expect("a count")
}

#[tokio::test]
async fn postgres_a_resend_lands_the_new_rows_once_in_one_statement() {
    let central = Central::postgres().await;
    let Central::Postgres(client) = &central else {
        unreachable!("built as PostgreSQL")
    };
    let agent = agent_id();
    let sink = central.sink(&agent, 1, None);
    let entity = unique("resend");
    let batch: Vec<Delivery> = (0..6)
        .map(|i| delivery("create", &entity, Some(&format!("k{}", i % 2)), "{}"))
        .collect();
    // A crash after the first two landed, before the agent heard of it: the whole batch again.
    assert_eq!(sink.deliver(&batch[..2]).await, vec![Outcome::Delivered; 2]);
    assert_eq!(sink.deliver(&batch).await, vec![Outcome::Delivered; 6]);
    assert_eq!(
        central.landed(&agent).await,
        ids(&batch),
        "each row once, in order"
    );
    // The four new rows came through the exactly-once path's one INSERT, not row by row.
    assert_eq!(writers(client, &ids(&batch[2..])).await, 1);

    // A resend with a refused row in it: the known rows are delivered, the new good ones land,
    // the refused one is dead, the later record of its key skipped.
    let mut more = batch.clone();
    more.push(delivery(&"x".repeat(65), &entity, Some("k0"), "{}"));
    more.push(delivery("create", &entity, Some("k1"), "{}"));
    more.push(delivery("create", &entity, Some("k0"), "{}"));
    let outcomes = sink.deliver(&more).await;
    assert_outcomes(&outcomes, "DDDDDDXDS");
    let mut landed = ids(&batch);
    landed.push(more[7].envelope.id.clone());
    assert_eq!(central.landed(&agent).await, landed);
}

#[tokio::test]
async fn postgres_two_connections_never_split_a_run() {
    let central = Central::postgres().await;
    let agent = agent_id();
    let sink = central.sink(&agent, 2, None);
    let entity = unique("split");
    // 400 records of three hot keys and keyless ones, interleaved; b's 30th is refused.
    let key = |i: usize| match i % 10 {
        0..=3 => Some("a"),
        4..=6 => Some("b"),
        7 => Some("c"),
        _ => None,
    };
    let mut b_seen = 0;
    let mut refused = None;
    let batch: Vec<Delivery> = (0..400)
        .map(|i| {
            let mut action = "update".to_owned();
            if key(i) == Some("b") {
                b_seen += 1;
                if b_seen == 30 {
                    action = "x".repeat(65);
                    refused = Some(i);
                }
            }
            delivery(&action, &entity, key(i), &format!(r#"{{"i":{i}}}"#))
        })
        .collect();
    let refused = refused.expect("b has 30 records");
    let outcomes = sink.deliver(&batch).await;
    let mut landed_by_key: std::collections::BTreeMap<Option<&str>, Vec<String>> =
        Default::default();
    for (i, outcome) in outcomes.iter().enumerate() {
        let expected = if i == refused {
            "dead"
        } else if key(i) == Some("b") && i > refused {
            "skipped"
        } else {
            "delivered"
        };
        let got = match outcome {
            Outcome::Delivered => "delivered",
            Outcome::Dead { .. } => "dead",
            Outcome::Skipped => "skipped",
            Outcome::Retry { .. } => "retried",
        };
        assert_eq!(got, expected, "record {i} ({:?}): {outcome:?}", key(i));
        if expected == "delivered" {
            landed_by_key
                .entry(key(i))
                .or_default()
                .push(batch[i].envelope.id.clone());
        }
    }
    // Each key's rows landed in sequence order (the table's identity follows the inserts).
    let landed = central.landed(&agent).await;
    let position: std::collections::HashMap<&str, usize> = landed
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    for (key, ids) in &landed_by_key {
        let places: Vec<usize> = ids
            .iter()
            .map(|id| *position.get(id.as_str()).expect("landed"))
            .collect();
        assert!(
            places.windows(2).all(|w| w[0] < w[1]),
            "{key:?} landed out of order: {places:?}"
        );
    }
    assert_eq!(
        landed.len(),
        landed_by_key.values().map(Vec::len).sum::<usize>()
    );
}
