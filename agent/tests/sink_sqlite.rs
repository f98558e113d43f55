//! The SQLite sink on a file in a temporary folder.

mod common;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use common::{Count, agent_id, delivery, ids};
use estafeta::sinks::database::{self, DatabaseSinkConfig};
use estafeta::sinks::{Outcome, Sink};
use rusqlite::Connection;

fn sink_at(path: &Path) -> Arc<dyn Sink> {
    database::build(
        "central",
        DatabaseSinkConfig {
            url: format!("sqlite://{}", path.display()),
            agent_id: agent_id(),
            apply: None,
            idempotency_key: None,
            connections: estafeta::sinks::database::DEFAULT_CONNECTIONS,
            transaction_pooling: false,
        },
    )
    .expect("a valid SQLite URL")
}

fn counter(
    path: &Path,
) -> impl Fn(Vec<String>) -> Pin<Box<dyn Future<Output = usize> + Send>> + Sync {
    let path = path.to_owned();
    move |ids| {
        let conn = Connection::open(&path).expect("open the database");
        let mut n = 0;
        for id in ids {
            let found: i64 = conn
                .query_row(
                    "SELECT count(*) FROM estafeta_records WHERE idempotency_key = ?1",
                    [id],
                    |r| r.get(0),
                )
                .expect("count rows");
            n += usize::try_from(found).expect("a count");
        }
        Box::pin(async move { n })
    }
}

#[tokio::test]
async fn conformance_batch_lands_once_and_resend_changes_nothing() {
    let dir = tempfile::tempdir().expect("a temp dir");
    // A folder that does not exist yet: the sink creates it and the file.
    let path = dir.path().join("central").join("central.db");
    let sink = sink_at(&path);
    let count = counter(&path);
    let count: Count<'_> = &count;
    common::assert_batch_lands_once_and_resend_changes_nothing(sink.as_ref(), count, "patient")
        .await;

    let conn = Connection::open(&path).expect("open");
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("journal mode");
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn rows_hold_the_envelope_and_the_payload_text() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("central.db");
    let sink = sink_at(&path);
    let batch = vec![
        delivery("upsert", "patient", Some("p/1"), r#"{"nome": "João"}"#),
        delivery("create", "event", None, "[1]"),
    ];
    assert_eq!(sink.deliver(&batch).await, vec![Outcome::Delivered; 2]);
    let conn = Connection::open(&path).expect("open");
    for record in &batch {
        let e = &record.envelope;
        let row: (i64, String, String, Option<String>, String, String) = conn
            .query_row(
                "SELECT seq, action, entity, record_key, payload, staged_at FROM estafeta_records WHERE idempotency_key = ?1",
                [&e.id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .expect("the row");
        assert_eq!(row.0, i64::try_from(e.seq).expect("small"));
        assert_eq!(
            (row.1.as_str(), row.2.as_str()),
            (e.action.as_str(), e.entity.as_str())
        );
        assert_eq!(row.3, e.key);
        assert_eq!(row.4, e.payload.get());
        assert_eq!(row.5, e.staged_at);
    }
}

#[tokio::test]
async fn conformance_a_value_too_long_is_dead_alone() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("central.db");
    let sink = sink_at(&path);
    let count = counter(&path);
    let bad = delivery("create", &"e".repeat(65), Some("1"), "{}");
    let reason =
        common::assert_only_the_refused_record_is_dead(sink.as_ref(), &count, "patient", bad).await;
    assert!(
        reason.summary.contains("CHECK constraint failed"),
        "{reason:?}"
    );
}

#[tokio::test]
async fn conformance_an_unopenable_file_retries_everything() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("not-a-folder");
    std::fs::write(&file, "x").expect("write");
    let sink = sink_at(&file.join("central.db"));
    let error = common::assert_unreachable_sink_retries_everything(sink.as_ref(), &[]).await;
    assert!(error.contains("not-a-folder"), "{error}");
    assert!(sink.probe().await.is_err());
}

#[tokio::test]
async fn the_file_is_reopened_after_a_failure() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let folder = dir.path().join("later");
    std::fs::write(&folder, "x").expect("write");
    let path = folder.join("central.db");
    let sink = sink_at(&path);
    let batch = vec![delivery("create", "patient", Some("1"), "{}")];
    assert!(matches!(
        sink.deliver(&batch).await[..],
        [Outcome::Retry { .. }]
    ));

    std::fs::remove_file(&folder).expect("remove the blocking file");
    assert_eq!(sink.deliver(&batch).await, vec![Outcome::Delivered]);
    assert_eq!(counter(&path)(ids(&batch)).await, 1);
    sink.probe().await.expect("the file opens now");
}
