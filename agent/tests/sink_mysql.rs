//! The MariaDB / MySQL sink against the real MariaDB on 127.0.0.1:3306
//! (`scripts/start-services`). Never skipped: a missing server fails the tests with a message
//! saying how to start it.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use common::{Count, agent_id, closed_port, delivery};
use estafeta::sinks::database::{self, DatabaseSinkConfig};
use estafeta::sinks::{Outcome, Sink};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts};
use tokio::sync::Mutex;

const URL: &str = "mysql://root@127.0.0.1:3306/test";

/// A direct connection for checking what landed.
async fn connect_to(url: &str) -> Conn {
    let opts = Opts::from_url(url).expect("a valid URL");
    Conn::new(opts).await.unwrap_or_else(|err| {
        panic!("cannot connect to MariaDB at {url}: {err}; run scripts/start-services to start the test servers")
    })
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
    .expect("a valid MySQL URL")
}

async fn sink(agent: &str) -> (Arc<dyn Sink>, Arc<Mutex<Conn>>) {
    let conn = connect_to(URL).await;
    (sink_at(URL, agent), Arc::new(Mutex::new(conn)))
}

fn counter(
    conn: &Arc<Mutex<Conn>>,
) -> impl Fn(Vec<String>) -> Pin<Box<dyn Future<Output = usize> + Send>> + Sync {
    let conn = Arc::clone(conn);
    move |ids| {
        let conn = Arc::clone(&conn);
        Box::pin(async move {
            let mut conn = conn.lock().await;
            let mut n = 0;
            // One bound id per query: no SQL built from values, even in tests.
            for id in ids {
                let found: Option<i64> = conn
                    .exec_first(
                        "SELECT count(*) FROM estafeta_records WHERE idempotency_key = ?",
                        (id,),
                    )
                    .await
                    .expect("count rows");
                n += usize::try_from(found.unwrap_or(0)).expect("a count");
            }
            n
        })
    }
}

#[tokio::test]
async fn conformance_batch_lands_once_and_resend_changes_nothing() {
    let (sink, conn) = sink(&agent_id()).await;
    let count = counter(&conn);
    let count: Count<'_> = &count;
    common::assert_batch_lands_once_and_resend_changes_nothing(sink.as_ref(), count, "patient")
        .await;
}

#[tokio::test]
async fn rows_hold_the_envelope_and_the_payload_in_utc() {
    let agent = agent_id();
    let (sink, conn) = sink(&agent).await;
    let batch = vec![
        delivery(
            "upsert",
            "patient",
            Some("p/1 ç"),
            r#"{"nome":"João","idade":41}"#,
        ),
        delivery("create", "event", None, r#"[1,"dois"]"#),
    ];
    assert_eq!(sink.deliver(&batch).await, vec![Outcome::Delivered; 2]);
    let mut conn = conn.lock().await;
    for record in &batch {
        let e = &record.envelope;
        type Row = (String, i64, String, String, Option<String>, String, String);
        let row: Row = conn
            .exec_first(
                "SELECT agent_id, seq, action, entity, record_key, payload, \
                 DATE_FORMAT(staged_at, '%Y-%m-%dT%H:%i:%s.%fZ') \
                 FROM estafeta_records WHERE idempotency_key = ?",
                (e.id.as_str(),),
            )
            .await
            .expect("query the row")
            .expect("the row");
        assert_eq!(row.0, agent);
        assert_eq!(row.1, i64::try_from(e.seq).expect("small"));
        assert_eq!(
            (row.2.as_str(), row.3.as_str()),
            (e.action.as_str(), e.entity.as_str())
        );
        assert_eq!(row.4, e.key);
        assert_eq!(
            row.5,
            e.payload.get(),
            "MariaDB keeps the JSON text as given"
        );
        assert_eq!(
            row.6, e.staged_at,
            "staged_at is stored in UTC with microseconds"
        );
    }
}

#[tokio::test]
async fn conformance_a_value_too_long_is_dead_alone() {
    let (sink, conn) = sink(&agent_id()).await;
    let count = counter(&conn);
    let bad = delivery("create", &"e".repeat(65), Some("1"), "{}");
    let reason =
        common::assert_only_the_refused_record_is_dead(sink.as_ref(), &count, "patient", bad).await;
    assert!(reason.summary.starts_with("MySQL 1406"), "{reason:?}");
}

#[tokio::test]
async fn a_key_too_long_is_dead_alone() {
    let (sink, conn) = sink(&agent_id()).await;
    let count = counter(&conn);
    let bad = delivery("update", "patient", Some(&"k".repeat(513)), "{}");
    let reason =
        common::assert_only_the_refused_record_is_dead(sink.as_ref(), &count, "visit", bad).await;
    assert!(reason.detail.contains("record_key"), "{reason:?}");
}

/// A batch goes as multi-row inserts of at most 256 rows: a refused row in the middle of the
/// second one is dead alone, the rows around it land, and rows already there from an earlier
/// (partial) delivery are neither duplicated nor refused.
#[tokio::test]
async fn a_batch_of_several_multi_row_inserts_lands_once_with_only_the_refused_row_dead() {
    let (sink, conn) = sink(&agent_id()).await;
    let count = counter(&conn);
    let run = uuid::Uuid::now_v7();
    let mut batch: Vec<_> = (0..600)
        .map(|i| {
            let key = format!("{run}-{i}");
            delivery("create", "patient", Some(&key), r#"{"nome":"Ana"}"#)
        })
        .collect();
    batch[300] = delivery("create", "patient", Some(&"k".repeat(513)), "{}");
    assert_eq!(
        sink.deliver(&batch[..100]).await,
        vec![Outcome::Delivered; 100],
        "the first 100 land on their own first"
    );

    let outcomes = sink.deliver(&batch).await;
    for (i, outcome) in outcomes.iter().enumerate() {
        match (i, outcome) {
            (300, Outcome::Dead { reason }) => {
                assert!(reason.detail.contains("record_key"), "{reason:?}")
            }
            (300, other) => panic!("the key too long should be dead, got {other:?}"),
            (_, outcome) => assert_eq!(*outcome, Outcome::Delivered, "record {i}"),
        }
    }
    assert_eq!(outcomes.len(), 600);
    let mut good = common::ids(&batch);
    let refused = good.remove(300);
    assert_eq!(count(good).await, 599, "every good record landed once");
    assert_eq!(
        count(vec![refused]).await,
        0,
        "the refused record did not land"
    );
}

#[tokio::test]
async fn conformance_connection_refused_retries_everything_without_the_password() {
    for scheme in ["mysql", "mariadb"] {
        let url = format!(
            "{scheme}://root:Pa55w0rd-x@127.0.0.1:{}/test",
            closed_port()
        );
        let sink = sink_at(&url, &agent_id());
        let error =
            common::assert_unreachable_sink_retries_everything(sink.as_ref(), &["Pa55w0rd-x"])
                .await;
        assert!(
            error.contains(&format!("{scheme}://root:***@127.0.0.1:")),
            "{error}"
        );
        let err = sink.probe().await.expect_err("nothing listens there");
        assert!(!format!("{err:#}").contains("Pa55w0rd-x"), "{err:#}");
    }
}

#[tokio::test]
async fn probe_reaches_the_database() {
    let (sink, _conn) = sink(&agent_id()).await;
    sink.probe().await.expect("MariaDB answers SELECT 1");
}

#[tokio::test]
async fn migrations_run_once_even_when_agents_start_together() {
    // A fresh database, so the migrations really run, by four sinks at once.
    let mut admin = connect_to(URL).await;
    let db = format!("estafeta_test_{}", uuid::Uuid::now_v7().simple());
    admin
        .query_drop(format!("CREATE DATABASE {db}"))
        .await
        .expect("create a scratch database");
    let url = format!("mysql://root@127.0.0.1:3306/{db}");

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
    let mut conn = connect_to(&url).await;
    let applied: Vec<(i64, String)> = conn
        .query("SELECT version, name FROM estafeta_schema_migrations")
        .await
        .expect("the migrations table");
    let rows: Option<i64> = conn
        .query_first("SELECT count(*) FROM estafeta_records")
        .await
        .expect("count");
    drop(conn);
    admin
        .query_drop(format!("DROP DATABASE {db}"))
        .await
        .expect("drop the scratch database");

    for o in outcomes {
        assert_eq!(o, vec![Outcome::Delivered]);
    }
    assert_eq!(applied, vec![(1, "0001_landing".to_owned())]);
    assert_eq!(rows, Some(4));
}

#[tokio::test]
async fn a_killed_connection_is_replaced_before_the_next_batch() {
    // A scratch database, so the sink's connection is the only one using it.
    let mut admin = connect_to(URL).await;
    let db = format!("estafeta_test_{}", uuid::Uuid::now_v7().simple());
    admin
        .query_drop(format!("CREATE DATABASE {db}"))
        .await
        .expect("create a scratch database");
    let url = format!("mysql://root@127.0.0.1:3306/{db}");
    let sink = sink_at(&url, &agent_id());

    let first = sink
        .deliver(&[delivery("create", "patient", Some("1"), "{}")])
        .await;
    let ids: Vec<u64> = admin
        .exec(
            "SELECT id FROM information_schema.processlist WHERE db = ?",
            (db.as_str(),),
        )
        .await
        .expect("find the sink's connection");
    for id in &ids {
        admin
            .query_drop(format!("KILL {id}"))
            .await
            .expect("kill the sink's connection");
    }
    let second = sink
        .deliver(&[delivery("create", "patient", Some("2"), "{}")])
        .await;
    let rows: Option<i64> = admin
        .query_first(format!("SELECT count(*) FROM {db}.estafeta_records"))
        .await
        .expect("count");
    admin
        .query_drop(format!("DROP DATABASE {db}"))
        .await
        .expect("drop the scratch database");

    assert_eq!(first, vec![Outcome::Delivered]);
    assert_eq!(ids.len(), 1, "one connection per sink");
    assert_eq!(
        second,
        vec![Outcome::Delivered],
        "the dead connection was noticed and replaced"
    );
    assert_eq!(rows, Some(2));
}

#[tokio::test]
async fn dry_run_names_the_row_but_not_the_payload() {
    let sink = sink_at("mariadb://u:hunter22@db.example/central", "a");
    let record = delivery("create", "patient", Some("1"), r#"{"nome":"Segredo"}"#);
    let lines = sink.dry_run(std::slice::from_ref(&record));
    assert_eq!(lines.len(), 1);
    let line = &lines[0];
    assert!(
        line.contains(&record.envelope.id) && line.contains("seq="),
        "{line}"
    );
    assert!(
        !line.contains("Segredo") && !line.contains("hunter22"),
        "{line}"
    );
}

/// `Duplicate entry '…' for key …` quotes the value: the refusal is shown by code and
/// SQLSTATE, and the dead letter's detail keeps the server's message.
#[tokio::test]
async fn a_duplicate_entry_is_shown_without_the_value_it_quotes() {
    let agent = agent_id();
    let mut conn = connect_to(URL).await;
    let table = format!("people_{}", agent.replace('-', "_"));
    conn.query_drop(format!(
        "CREATE TABLE {table} (cpf VARCHAR(32) UNIQUE, nome TEXT)"
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
        estafeta::db::apply::ApplyStatements::load(dir.path(), estafeta::db::Dialect::Mysql)
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
    ];
    let outcomes = sink.deliver(&batch).await;
    assert_eq!(outcomes[0], Outcome::Delivered);
    let Outcome::Dead { reason } = &outcomes[1] else {
        panic!("the duplicate should be dead: {:?}", outcomes[1]);
    };
    assert!(
        reason
            .summary
            .starts_with("MySQL 1062 (23000) duplicate entry")
            && reason.summary.contains("person.upsert.sql")
            && !reason.summary.contains("CPF-111"),
        "{reason:?}"
    );
    assert!(reason.detail.contains("CPF-11122233344"), "{reason:?}");
    conn.query_drop(format!("DROP TABLE {table}"))
        .await
        .expect("drop the table");
}
