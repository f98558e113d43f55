//! The PostgreSQL sink against the real server on 127.0.0.1:5432 (`scripts/start-services`).
//! Never skipped: a missing server fails the tests with a message saying how to start it.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use common::{Count, agent_id, closed_port, delivery, ids};
use estafeta::sinks::database::{self, DatabaseSinkConfig};
use estafeta::sinks::{Outcome, Sink};
use tokio_postgres::{Client, NoTls};

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A direct connection for checking what landed.
async fn connect() -> Arc<Client> {
    let (client, connection) = tokio_postgres::connect(URL, NoTls).await.unwrap_or_else(|err| {
        panic!("cannot connect to PostgreSQL at {URL}: {err}; run scripts/start-services to start the test servers")
    });
    tokio::spawn(connection);
    Arc::new(client)
}

fn sink_at(url: &str, agent: &str) -> Arc<dyn Sink> {
    database::build(
        "central",
        DatabaseSinkConfig {
            url: url.to_owned(),
            agent_id: agent.to_owned(),
            apply: None,
            idempotency_key: None,
            connections: estafeta::sinks::database::DEFAULT_CONNECTIONS,
            transaction_pooling: false,
        },
    )
    .expect("a valid PostgreSQL URL")
}

/// A sink, checked reachable first so a missing server reads as such.
async fn sink(agent: &str) -> (Arc<dyn Sink>, Arc<Client>) {
    let client = connect().await;
    (sink_at(URL, agent), client)
}

fn counter(
    client: &Arc<Client>,
) -> impl Fn(Vec<String>) -> Pin<Box<dyn Future<Output = usize> + Send>> + Sync {
    let client = Arc::clone(client);
    move |ids| {
        let client = Arc::clone(&client);
        Box::pin(async move {
            let row = client
                .query_one(
                    "SELECT count(*) FROM estafeta_records WHERE idempotency_key = ANY($1)",
                    &[&ids],
                )
                .await
                .expect("count rows");
            usize::try_from(row.get::<_, i64>(0)).expect("a count")
        })
    }
}

#[tokio::test]
async fn conformance_batch_lands_once_and_resend_changes_nothing() {
    let agent = agent_id();
    let (sink, client) = sink(&agent).await;
    let count = counter(&client);
    let count: Count<'_> = &count;
    common::assert_batch_lands_once_and_resend_changes_nothing(sink.as_ref(), count, "patient")
        .await;
}

#[tokio::test]
async fn rows_hold_the_envelope_and_the_payload_as_json() {
    let agent = agent_id();
    let (sink, client) = sink(&agent).await;
    let batch = vec![
        delivery(
            "upsert",
            "patient",
            Some("p/1"),
            r#"{"nome":"Ana","idade":41}"#,
        ),
        delivery("create", "event", None, r#"[1,"dois"]"#),
    ];
    assert_eq!(sink.deliver(&batch).await, vec![Outcome::Delivered; 2]);
    for record in &batch {
        let e = &record.envelope;
        let row = client
            .query_one(
                "SELECT agent_id, seq, action, entity, record_key, payload, \
                 to_char(staged_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), delivered_at >= staged_at \
                 FROM estafeta_records WHERE idempotency_key = $1",
                &[&e.id],
            )
            .await
            .expect("the row");
        assert_eq!(row.get::<_, String>(0), agent);
        assert_eq!(row.get::<_, i64>(1), i64::try_from(e.seq).expect("small"));
        assert_eq!(row.get::<_, String>(2), e.action);
        assert_eq!(row.get::<_, String>(3), e.entity);
        assert_eq!(row.get::<_, Option<String>>(4), e.key);
        let payload: serde_json::Value = row.get(5);
        assert_eq!(
            payload,
            serde_json::from_str::<serde_json::Value>(e.payload.get()).expect("JSON")
        );
        assert_eq!(row.get::<_, String>(6), e.staged_at);
        assert!(row.get::<_, bool>(7));
    }
}

/// A batch whose COPY is sent in many pieces (over both connections) lands whole: every row,
/// each with its own payload.
#[tokio::test]
async fn a_batch_sent_in_many_pieces_lands_whole() {
    let agent = agent_id();
    let (sink, client) = sink(&agent).await;
    let batch: Vec<_> = (0..600)
        .map(|n| {
            let payload = format!(r#"{{"n":{n},"texto":"{}"}}"#, "x".repeat(1000));
            delivery("create", "patient", Some(&format!("p{n}")), &payload)
        })
        .collect();
    assert_eq!(sink.deliver(&batch).await, vec![Outcome::Delivered; 600]);
    let rows = client
        .query(
            "SELECT seq, (payload->>'n')::bigint, length(payload->>'texto') FROM estafeta_records \
             WHERE agent_id = $1 ORDER BY seq",
            &[&agent],
        )
        .await
        .expect("the rows");
    assert_eq!(rows.len(), 600, "every row of the batch");
    for (n, (row, record)) in rows.iter().zip(&batch).enumerate() {
        assert_eq!(row.get::<_, i64>(0), record.envelope.seq as i64);
        assert_eq!(row.get::<_, i64>(1), n as i64);
        assert_eq!(row.get::<_, i32>(2), 1000);
    }
}

#[tokio::test]
async fn conformance_a_value_too_long_is_dead_alone() {
    let agent = agent_id();
    let (sink, client) = sink(&agent).await;
    let count = counter(&client);
    let bad = delivery("create", &"e".repeat(65), Some("1"), "{}");
    let reason =
        common::assert_only_the_refused_record_is_dead(sink.as_ref(), &count, "patient", bad).await;
    assert!(reason.summary.starts_with("PostgreSQL 22001"), "{reason:?}");
}

#[tokio::test]
async fn a_payload_jsonb_cannot_hold_is_dead_alone() {
    let agent = agent_id();
    let (sink, client) = sink(&agent).await;
    let count = counter(&client);
    // Valid JSON, but jsonb refuses the NUL character (22P05).
    let bad = delivery("create", "patient", Some("nul"), r#"{"nota":"a\u0000b"}"#);
    let reason =
        common::assert_only_the_refused_record_is_dead(sink.as_ref(), &count, "patient", bad).await;
    assert!(reason.summary.starts_with("PostgreSQL 22P05"), "{reason:?}");
}

#[tokio::test]
async fn conformance_connection_refused_retries_everything_without_the_password() {
    let url = format!(
        "postgres://postgres:Pa55w0rd-x@127.0.0.1:{}/test",
        closed_port()
    );
    let sink = sink_at(&url, &agent_id());
    let error =
        common::assert_unreachable_sink_retries_everything(sink.as_ref(), &["Pa55w0rd-x"]).await;
    assert!(
        error.contains("postgres://postgres:***@127.0.0.1:"),
        "{error}"
    );
    let err = sink.probe().await.expect_err("nothing listens there");
    assert!(!format!("{err:#}").contains("Pa55w0rd-x"), "{err:#}");
}

#[tokio::test]
async fn probe_reaches_the_database() {
    let (sink, _client) = sink(&agent_id()).await;
    sink.probe().await.expect("PostgreSQL answers SELECT 1");
}

#[tokio::test]
async fn migrations_run_once_even_when_agents_start_together() {
    // A fresh database, so the migrations really run, by four sinks at once.
    let admin = connect().await;
    let db = format!("estafeta_test_{}", uuid::Uuid::now_v7().simple());
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .expect("create a scratch database");
    let url = format!("postgres://postgres@127.0.0.1:5432/{db}");

    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let sink = sink_at(&url, &agent_id());
            let batch = vec![delivery("create", "patient", None, "{}")];
            tokio::spawn(async move { sink.deliver(&batch).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("the task ran"));
    }

    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .expect("connect to the scratch database");
    let connection = tokio::spawn(connection);
    let applied: Vec<(i64, String)> = client
        .query("SELECT version, name FROM estafeta_schema_migrations", &[])
        .await
        .expect("the migrations table")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let rows: i64 = client
        .query_one("SELECT count(*) FROM estafeta_records", &[])
        .await
        .expect("count")
        .get(0);
    drop(client);
    let _ = connection.await;
    // The sinks' own connections close when the sinks (dropped with their tasks) go.
    admin
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .expect("drop the scratch database");

    for o in outcomes {
        assert_eq!(o, vec![Outcome::Delivered]);
    }
    assert_eq!(applied, vec![(1, "0001_landing".to_owned())]);
    assert_eq!(rows, 4);
}

#[tokio::test]
async fn a_killed_connection_is_replaced() {
    let client = connect().await;
    let app = format!("estafeta-test-{}", uuid::Uuid::now_v7().simple());
    let url = format!("{URL}?application_name={app}");
    let sink = sink_at(&url, &agent_id());
    let count = counter(&client);

    let first = vec![delivery("create", "patient", Some("1"), "{}")];
    assert_eq!(sink.deliver(&first).await, vec![Outcome::Delivered]);
    let killed: i64 = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .expect("terminate the sink's backend")
        .get(0);
    assert_eq!(killed, 1);
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The loss is noticed either before the batch (reconnect) or during it (retry, then
    // reconnect): within two attempts the batch lands, once.
    let second = vec![delivery("create", "patient", Some("2"), "{}")];
    let mut outcome = sink.deliver(&second).await;
    if matches!(outcome[..], [Outcome::Retry { .. }]) {
        outcome = sink.deliver(&second).await;
    }
    assert_eq!(outcome, vec![Outcome::Delivered]);
    assert_eq!(count(ids(&second)).await, 1);
}

/// The batch insert is prepared once per connection; a DBA changing the landing table under a
/// running agent (here: adding a column) must not make the next batches fail. Runs in a schema
/// of its own so the shared table is untouched.
#[tokio::test]
async fn a_column_added_under_a_running_agent_changes_nothing() {
    let client = connect().await;
    let schema = format!("estafeta_test_{}", uuid::Uuid::now_v7().simple());
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .expect("create a private schema");
    let url = format!("{URL}?options=-csearch_path%3D{schema}");
    let sink = sink_at(&url, &agent_id());

    let first = vec![delivery("create", "patient", Some("1"), "{}")];
    assert_eq!(sink.deliver(&first).await, vec![Outcome::Delivered]);
    client
        .batch_execute(&format!(
            "ALTER TABLE {schema}.estafeta_records ADD COLUMN checked_by text DEFAULT 'nobody'"
        ))
        .await
        .expect("add a column");

    let second = vec![
        delivery("create", "patient", Some("2"), "{}"),
        delivery("update", "patient", Some("3"), "{}"),
    ];
    assert_eq!(
        sink.deliver(&second).await,
        vec![Outcome::Delivered, Outcome::Delivered]
    );
    let landed: Vec<String> = client
        .query(
            &format!("SELECT checked_by FROM {schema}.estafeta_records ORDER BY seq"),
            &[],
        )
        .await
        .expect("read the private table")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(landed, ["nobody", "nobody", "nobody"]);
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .expect("drop the private schema");
}

#[tokio::test]
async fn dry_run_names_the_row_but_not_the_payload() {
    let sink = sink_at("postgres://u:hunter22@db.example/central", "a");
    let record = delivery("create", "patient", Some("1"), r#"{"nome":"Segredo"}"#);
    let lines = sink.dry_run(std::slice::from_ref(&record));
    assert_eq!(lines.len(), 1);
    let line = &lines[0];
    assert!(
        line.contains(&record.envelope.id)
            && line.contains("entity=patient")
            && line.contains("action=create"),
        "{line}"
    );
    assert!(
        !line.contains("Segredo") && !line.contains("hunter22"),
        "{line}"
    );
}

/// A refusal whose message and detail quote the row's values (`Key (cpf)=(…) already exists`,
/// `Failing row contains (…)`) is shown by SQLSTATE and constraint only; the dead letter's
/// detail keeps PostgreSQL's words.
#[tokio::test]
async fn a_refused_apply_statement_is_shown_without_the_values_it_quotes() {
    let agent = agent_id();
    let client = connect().await;
    let table = format!("people_{}", agent.replace('-', "_"));
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (cpf text UNIQUE, nome text CHECK (length(nome) < 12))"
        ))
        .await
        .expect("create the table");
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(
        dir.path().join("person.upsert.sql"),
        format!("INSERT INTO {table} (cpf, nome) VALUES (:cpf, :nome)"),
    )
    .expect("write the statement");
    let statements =
        estafeta::db::apply::ApplyStatements::load(dir.path(), estafeta::db::Dialect::Postgres)
            .expect("the statement loads");
    let sink = database::build(
        "central",
        DatabaseSinkConfig {
            url: URL.to_owned(),
            agent_id: agent.clone(),
            apply: Some(Arc::new(statements)),
            idempotency_key: None,
            connections: 1,
            transaction_pooling: false,
        },
    )
    .expect("a valid URL");
    let batch = [
        delivery(
            "upsert",
            "person",
            Some("k1"),
            r#"{"cpf":"CPF-11122233344","nome":"Ana"}"#,
        ),
        delivery(
            "upsert",
            "person",
            Some("k2"),
            r#"{"cpf":"CPF-11122233344","nome":"Bia"}"#,
        ),
        delivery(
            "upsert",
            "person",
            Some("k3"),
            r#"{"cpf":"CPF-55566677788","nome":"Maria das Dores Silva"}"#,
        ),
    ];
    let outcomes = sink.deliver(&batch).await;
    assert_eq!(outcomes[0], Outcome::Delivered);
    for (i, value, constraint) in [
        (1, "CPF-11122233344", "23505 unique violation"),
        (2, "Maria das Dores", "23514 check violation"),
    ] {
        let Outcome::Dead { reason } = &outcomes[i] else {
            panic!("record {i} should be dead: {:?}", outcomes[i]);
        };
        assert!(
            reason.summary.contains(constraint)
                && reason.summary.contains(&table)
                && reason.summary.contains("person.upsert.sql"),
            "{reason:?}"
        );
        assert!(!reason.summary.contains(value), "{reason:?}");
        assert!(reason.detail.contains(value), "{reason:?}");
    }
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .expect("drop the table");
}
