//! Proves contracts 3, 4 and 5 on the real central databases: the real `estafeta run`
//! delivers 500 records over 20 keys (creates, updates and deletes, singles and arrays) plus a
//! create → delete → create of one key to PostgreSQL and to MariaDB while the test cuts the
//! agent's database connections every 250 ms for a while (`pg_terminate_backend`,
//! `KILL CONNECTION`: a batch may be cut before or during its commit and be sent again), and
//! counted with SQL in `estafeta_records` (this run's rows, by a unique `AGENT_ID`): exactly
//! one row per acknowledged id, each with its seq, action, key and payload; per key, the rows
//! landed in seq order; and the create → delete → create landed in that order.
//!
//! Landing order is observable: the table's `id` is an identity (PostgreSQL) or
//! AUTO_INCREMENT (MariaDB) column, assigned as rows are inserted, and one sink inserts its
//! batches one after another, each key's run in one transaction in seq order, so per key
//! `ORDER BY id` is the order the rows arrived.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use estafeta_e2e::{
    Agent, MYSQL_URL, PG_URL, Staged, log_tail, mixed_plan, mysql, pg, post_plan, seqs_by_key,
    unique_name, wait_drained,
};
use mysql_async::prelude::Queryable;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// One row of `estafeta_records`, in `id` order.
#[derive(Debug)]
struct Row {
    id: i64,
    idempotency_key: String,
    seq: i64,
    action: String,
    entity: String,
    record_key: Option<String>,
    payload: Value,
}

/// Whose connections to cut: the agent's only, never the test's or another test's.
#[derive(Clone)]
enum Central {
    /// The agent's connections carry this `application_name` (set in its URL).
    Postgres { application_name: String },
    /// The agent logs in as this MariaDB user, made for the test.
    MariaDb { user: String },
}

impl Central {
    /// Cuts every connection the agent has open now; returns how many.
    async fn cut_connections(&self) -> u64 {
        match self {
            Central::Postgres { application_name } => {
                let client = pg().await;
                let row = client
                    .query_one(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                          WHERE application_name = $1 AND pid <> pg_backend_pid()",
                        &[application_name],
                    )
                    .await
                    .unwrap();
                row.get::<_, i64>(0) as u64
            }
            Central::MariaDb { user } => {
                let mut conn = mysql().await;
                let ids: Vec<u64> = conn
                    .exec(
                        "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = ?",
                        (user.as_str(),),
                    )
                    .await
                    .unwrap();
                let mut cut = 0;
                for id in ids {
                    // It may have gone on its own in between.
                    if conn
                        .query_drop(format!("KILL CONNECTION {id}"))
                        .await
                        .is_ok()
                    {
                        cut += 1;
                    }
                }
                let _ = conn.disconnect().await;
                cut
            }
        }
    }
}

/// Starts an agent delivering to `url` as `agent_id`, posts the workload while cutting the
/// agent's connections (8 times, every 250 ms) and waits until it is all delivered. Returns
/// the agent (still running), what was acknowledged and how many connections were cut.
async fn deliver(
    dir: &std::path::Path,
    url: &str,
    agent_id: &str,
    central: Central,
) -> (Agent, Vec<Staged>, u64) {
    let env = [
        ("CENTRAL_DATABASE_URL", url),
        ("AGENT_ID", agent_id),
        ("CRONTAB", "* * * * * *"),
        ("RETRY_BASE_SECS", "1"),
        ("RETRY_MAX_SECS", "2"),
        // Small batches, so many transactions and the per-key order across them count.
        ("BATCH_SIZE", "16"),
    ];
    let mut agent = Agent::start(dir, &env);
    agent.wait_ready(Duration::from_secs(20)).await;

    let chaos = tokio::spawn(async move {
        let mut cut = 0;
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            cut += central.cut_connections().await;
        }
        cut
    });
    let mut staged = Vec::new();
    // A create → delete → create of one key, posted first so it competes with the rest.
    for (action, v) in [("create", 1), ("delete", 2), ("create", 3)] {
        let payload = json!({"id": "cdc", "v": v});
        let (code, answer) = agent.post(action, "patient", &payload).await;
        assert_eq!(code, StatusCode::ACCEPTED, "{answer}");
        staged.push(Staged {
            id: answer["id"].as_str().unwrap().to_owned(),
            seq: answer["seq"].as_u64().unwrap(),
            action: action.to_owned(),
            entity: "patient".to_owned(),
            key: "cdc".to_owned(),
            payload,
            path: None,
        });
    }
    let plan = mixed_plan(20, 25, 500);
    staged.extend(post_plan(&agent, "patient", &plan, 20, 3).await);
    assert_eq!(staged.len(), 503);
    let cut = chaos.await.unwrap();
    wait_drained(&agent, Duration::from_secs(60)).await;
    (agent, staged, cut)
}

/// Checks the landed rows against what was acknowledged.
fn check_rows(rows: &[Row], staged: &[Staged], agent: &Agent) {
    let context = || format!("agent log tail:\n{}", log_tail(agent, 40));
    let mut per_id: BTreeMap<&str, usize> = BTreeMap::new();
    for row in rows {
        *per_id.entry(row.idempotency_key.as_str()).or_insert(0) += 1;
    }
    let missing: Vec<u64> = staged
        .iter()
        .filter(|s| !per_id.contains_key(s.id.as_str()))
        .map(|s| s.seq)
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged record(s) have no row: seqs {missing:?}\n{}",
        missing.len(),
        context()
    );
    let doubled: Vec<(&&str, &usize)> = per_id.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "ids landed more than once: {doubled:?}");
    assert_eq!(
        rows.len(),
        staged.len(),
        "exactly one row per acknowledged record, and no other row for this agent"
    );

    let by_id: BTreeMap<&str, &Staged> = staged.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut landed: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
    for row in rows {
        let s = by_id[row.idempotency_key.as_str()];
        assert_eq!(
            (
                row.seq,
                row.action.as_str(),
                row.entity.as_str(),
                row.record_key.as_deref()
            ),
            (
                s.seq as i64,
                s.action.as_str(),
                s.entity.as_str(),
                Some(s.key.as_str())
            ),
            "row id {} does not match record {}",
            row.id,
            s.id
        );
        assert_eq!(row.payload, s.payload, "payload of seq {}", s.seq);
        landed
            .entry((
                row.entity.clone(),
                row.record_key.clone().unwrap_or_default(),
            ))
            .or_default()
            .push(s.seq);
    }
    for (key, expected) in seqs_by_key(staged) {
        let got = landed.remove(&key).unwrap_or_default();
        assert_eq!(
            got, expected,
            "key {}/{}: rows in landing order (ORDER BY id) carry these seqs; staged order differs",
            key.0, key.1
        );
    }
    let cdc: Vec<&str> = rows
        .iter()
        .filter(|r| r.record_key.as_deref() == Some("cdc"))
        .map(|r| r.action.as_str())
        .collect();
    assert_eq!(
        cdc,
        ["create", "delete", "create"],
        "create → delete → create lands in that order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_gets_each_record_once_in_key_order() {
    let started = Instant::now();
    let agent_id = unique_name("e2e_pg");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("{PG_URL}?application_name={agent_id}");
    let central = Central::Postgres {
        application_name: agent_id.clone(),
    };
    let (agent, staged, cut) = deliver(dir.path(), &url, &agent_id, central).await;
    let delivered = started.elapsed();

    let client = pg().await;
    let rows: Vec<Row> = client
        .query(
            "SELECT id, idempotency_key, seq, action, entity, record_key, payload
               FROM estafeta_records WHERE agent_id = $1 ORDER BY id",
            &[&agent_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| Row {
            id: r.get(0),
            idempotency_key: r.get(1),
            seq: r.get(2),
            action: r.get(3),
            entity: r.get(4),
            record_key: r.get(5),
            payload: r.get(6),
        })
        .collect();
    check_rows(&rows, &staged, &agent);
    let (count, distinct): (i64, i64) = {
        let r = client
            .query_one(
                "SELECT count(*), count(DISTINCT idempotency_key) FROM estafeta_records WHERE agent_id = $1",
                &[&agent_id],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((count, distinct), (503, 503));
    client
        .execute(
            "DELETE FROM estafeta_records WHERE agent_id = $1",
            &[&agent_id],
        )
        .await
        .unwrap();
    assert!(
        cut > 0,
        "no connection of the agent was cut; the test proved less"
    );
    eprintln!("databases: PostgreSQL got 503 records in {delivered:?}, {cut} connection(s) cut");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_gets_each_record_once_in_key_order() {
    let started = Instant::now();
    let agent_id = unique_name("e2e_maria");
    let dir = tempfile::tempdir().unwrap();
    // A user of its own, so the test cuts the agent's connections only.
    let user = agent_id.clone();
    let mut conn = mysql().await;
    conn.query_drop(format!("CREATE USER '{user}'@'%'"))
        .await
        .unwrap();
    conn.query_drop(format!("GRANT ALL PRIVILEGES ON test.* TO '{user}'@'%'"))
        .await
        .unwrap();
    let url = MYSQL_URL.replacen("root@", &format!("{user}@"), 1);
    let central = Central::MariaDb { user: user.clone() };
    let (agent, staged, cut) = deliver(dir.path(), &url, &agent_id, central).await;
    let delivered = started.elapsed();

    type Raw = (u64, String, i64, String, String, Option<String>, String);
    let raw: Vec<Raw> = conn
        .exec(
            "SELECT id, idempotency_key, seq, action, entity, record_key, CAST(payload AS CHAR)
               FROM estafeta_records WHERE agent_id = ? ORDER BY id",
            (agent_id.as_str(),),
        )
        .await
        .unwrap();
    let rows: Vec<Row> = raw
        .into_iter()
        .map(|(id, key, seq, action, entity, record_key, payload)| Row {
            id: id as i64,
            idempotency_key: key,
            seq,
            action,
            entity,
            record_key,
            payload: serde_json::from_str(&payload).unwrap(),
        })
        .collect();
    check_rows(&rows, &staged, &agent);
    let counts: Option<(i64, i64)> = conn
        .exec_first(
            "SELECT count(*), count(DISTINCT idempotency_key) FROM estafeta_records WHERE agent_id = ?",
            (agent_id.as_str(),),
        )
        .await
        .unwrap();
    assert_eq!(counts, Some((503, 503)));
    conn.exec_drop(
        "DELETE FROM estafeta_records WHERE agent_id = ?",
        (agent_id.as_str(),),
    )
    .await
    .unwrap();
    drop(agent);
    conn.query_drop(format!("DROP USER '{user}'@'%'"))
        .await
        .unwrap();
    conn.disconnect().await.unwrap();
    assert!(
        cut > 0,
        "no connection of the agent was cut; the test proved less"
    );
    eprintln!("databases: MariaDB got 503 records in {delivered:?}, {cut} connection(s) cut");
}
