//! The real agent through the real PgBouncer (Debian's `pgbouncer`, started by
//! `scripts/start-pgbouncer`) in transaction pooling mode, into the real PostgreSQL: a sink
//! with `transaction_pooling = true` delivers every path of the PostgreSQL sink behind a pooler
//! (the batch insert, a resend of a row already there, the row-by-row path for a refused row,
//! apply mode with its statements and a refused statement, heartbeats) exactly once, in per-key
//! order, without one failed attempt. The resend is the case that once hung the agent: a COPY
//! failing on the unique key made PgBouncer 1.18 lose track of the server connection.
//!
//! The PgBouncer of this test keeps 4 server connections open and hands out the least recently
//! used one (`server_round_robin`), so consecutive transactions of the agent's one connection
//! run on different server connections: a statement prepared in one transaction and used in
//! the next (what the sink does without `transaction_pooling`) is missing there, and the batch
//! fails and is retried, which the test catches in the agent's log.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use estafeta_e2e::{Agent, free_port, log_tail, pg, unique_name, wait_status};
use serde_json::json;

/// A PgBouncer of this test; stopped when dropped.
struct Bouncer {
    dir: tempfile::TempDir,
    port: u16,
}

impl Bouncer {
    fn script() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/start-pgbouncer")
    }

    /// Transaction pooling in front of 127.0.0.1:5432, 4 server connections, round robin.
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let port = free_port();
        let out = Command::new(Self::script())
            .args(["--port", &port.to_string(), "--pool-size", "4"])
            .args(["--min-pool-size", "4", "--round-robin", "--dir"])
            .arg(dir.path())
            .output()
            .expect("run scripts/start-pgbouncer");
        assert!(
            out.status.success(),
            "this test needs PgBouncer (scripts/install-deps installs Debian's pgbouncer) and PostgreSQL on 127.0.0.1:5432 (scripts/start-services); scripts/start-pgbouncer said: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Bouncer { dir, port }
    }

    fn url(&self, application_name: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/test?application_name={application_name}",
            self.port
        )
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.path().join("pgbouncer.log"));
            eprintln!("PgBouncer's log:\n{}", log.unwrap_or_default());
        }
        let _ = Command::new(Self::script())
            .arg("--stop")
            .arg("--dir")
            .arg(self.dir.path())
            .status();
    }
}

/// A client of `bouncer`.
async fn bouncer_client(bouncer: &Bouncer) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=test",
            bouncer.port
        ),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect through PgBouncer");
    tokio::spawn(connection);
    client
}

/// The backend pid of one transaction of `client`.
async fn backend_pid(client: &tokio_postgres::Client) -> String {
    let rows = client
        .simple_query("SELECT pg_backend_pid()")
        .await
        .expect("a query through PgBouncer");
    rows.into_iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row")
}

/// Opens the pool's 4 server connections (4 clients in a transaction at once), then returns
/// the backend pids that answer 8 consecutive transactions of one client.
async fn backends_seen(bouncer: &Bouncer) -> std::collections::BTreeSet<String> {
    let mut holders = Vec::new();
    for _ in 0..4 {
        let client = bouncer_client(bouncer).await;
        client.batch_execute("BEGIN").await.expect("BEGIN");
        backend_pid(&client).await;
        holders.push(client);
    }
    for client in &holders {
        client.batch_execute("COMMIT").await.expect("COMMIT");
    }
    let client = bouncer_client(bouncer).await;
    let mut pids = std::collections::BTreeSet::new();
    for _ in 0..8 {
        pids.insert(backend_pid(&client).await);
    }
    pids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_of_the_postgres_sink_works_through_pgbouncer_in_transaction_mode() {
    let bouncer = Bouncer::start();
    // The setup can catch lost session state: one client's transactions move between servers.
    let pids = backends_seen(&bouncer).await;
    assert!(
        pids.len() >= 2,
        "PgBouncer lent one client a single server connection ({pids:?}); the test cannot catch lost session state"
    );

    let run = unique_name("bouncer");
    let table = format!("{run}_visits");
    let central = pg().await;
    central
        .batch_execute(&format!(
            "CREATE TABLE {table} (id TEXT PRIMARY KEY, n INT NOT NULL, applied INT NOT NULL DEFAULT 1)"
        ))
        .await
        .expect("create the apply mode's table");
    let dir = tempfile::tempdir().unwrap();
    let apply = dir.path().join("apply");
    std::fs::create_dir(&apply).unwrap();
    std::fs::write(
        apply.join("visit.upsert.sql"),
        format!(
            "INSERT INTO {table} (id, n) VALUES (:id, :n::int)\n\
             ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n, applied = {table}.applied + 1\n"
        ),
    )
    .unwrap();
    let config = dir.path().join("estafeta.toml");
    std::fs::write(
        &config,
        format!(
            "[[sinks]]\nname = \"landing\"\ntype = \"database\"\nurl = \"{landing}\"\n\
             connections = 1\ntransaction_pooling = true\nidempotency_key = \"{run}-{{payload.id}}\"\n\n\
             [[sinks]]\nname = \"applied\"\ntype = \"database\"\nurl = \"{applied}\"\n\
             connections = 1\ntransaction_pooling = true\napply_dir = \"apply\"\n\n\
             [[routes]]\nentity = \"patient\"\nsinks = [\"landing\"]\n\n\
             [[routes]]\nentity = \"visit\"\nsinks = [\"applied\"]\n",
            landing = bouncer.url(&format!("{run}_l")),
            applied = bouncer.url(&format!("{run}_a")),
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let env = [
        ("CONFIG_FILE", config.as_str()),
        ("AGENT_ID", run.as_str()),
        ("CRONTAB", "* * * * * *"),
        ("RETRY_BASE_SECS", "1"),
        ("RETRY_MAX_SECS", "2"),
        // Small batches: many transactions, each free to land on another server connection.
        ("BATCH_SIZE", "16"),
        ("HEARTBEAT_SECS", "1"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;

    // A first record, so the landing table exists before the test plants a "resend".
    let post = |entity: &'static str, key: String, payload: serde_json::Value| {
        let agent = &agent;
        async move {
            let (code, answer) = agent
                .post_with("upsert", entity, &payload, &[("X-Record-Key", &key)])
                .await;
            assert_eq!(code, 202, "{answer}");
        }
    };
    post("patient", "k0".into(), json!({"id": "first"})).await;
    wait_status(&agent, Duration::from_secs(30), "the first record", |s| {
        s["records_pending"] == 0
    })
    .await;
    // What a crash after the commit leaves: one row of the batch to come is there already (a
    // COPY of the batch would fail on the unique key; behind PgBouncer that hung the agent).
    central
        .execute(
            "INSERT INTO estafeta_records
                 (idempotency_key, agent_id, seq, action, entity, record_key, payload, staged_at)
             VALUES ($1, $2, 0, 'upsert', 'patient', 'k3', '{\"planted\": true}', now())",
            &[&format!("{run}-p3"), &run],
        )
        .await
        .expect("plant a resend");

    for i in 0..200 {
        let key = format!("k{}", i % 7);
        post("patient", key, json!({"id": format!("p{i}"), "i": i})).await;
        if i == 100 {
            // A value jsonb refuses: that record alone is dead, the rest of the batch lands.
            post(
                "patient",
                "bad".into(),
                json!({"id": "nul", "v": "a\u{0}b"}),
            )
            .await;
        }
    }
    for i in 0..60 {
        let n = if i == 50 {
            json!("not a number")
        } else {
            json!(i)
        };
        post(
            "visit",
            format!("v{}", i % 10),
            json!({"id": format!("v{}", i % 10), "n": n}),
        )
        .await;
    }
    let done = wait_status(&agent, Duration::from_secs(60), "the delivery", |s| {
        s["sinks"].as_array().is_some_and(|sinks| {
            sinks
                .iter()
                .all(|s| s["pending"] == 0 && s["in_flight"] == 0)
        })
    })
    .await;
    let dead: BTreeMap<String, u64> = done["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["sink"].as_str().unwrap().to_owned(),
                s["dead"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        dead,
        BTreeMap::from([("applied".to_owned(), 1), ("landing".to_owned(), 1)]),
        "{done}"
    );

    // Landing: one row per record but the refused one; the planted row was not doubled.
    let rows = central
        .query(
            "SELECT idempotency_key, record_key, seq, payload->>'planted' FROM estafeta_records
              WHERE agent_id = $1 AND entity = 'patient' ORDER BY id",
            &[&run],
        )
        .await
        .unwrap();
    let keys: std::collections::BTreeSet<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(rows.len(), 201, "201 rows (200 + the first), each once");
    assert_eq!(keys.len(), 201);
    let planted: Vec<&tokio_postgres::Row> = rows
        .iter()
        .filter(|r| r.get::<_, String>(0) == format!("{run}-p3"))
        .collect();
    assert_eq!(planted.len(), 1);
    assert_eq!(
        planted[0].get::<_, Option<String>>(3).as_deref(),
        Some("true")
    );
    // Per key, the rows landed in sequence order (the planted row, seq 0, aside).
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for row in rows.iter().filter(|r| r.get::<_, i64>(2) > 0) {
        let key: String = row.get(1);
        let seq: i64 = row.get(2);
        let previous = last.insert(key.clone(), seq).unwrap_or(0);
        assert!(
            previous < seq,
            "key {key}: seq {seq} landed after {previous}"
        );
    }

    // Apply mode: each of the 10 visits applied once per record; v0's last record refused
    // (dead, not applied).
    let applied: BTreeMap<String, (i32, i32)> = central
        .query(&format!("SELECT id, n, applied FROM {table}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    assert_eq!(applied.len(), 10, "{applied:?}");
    assert_eq!(applied["v0"], (40, 5), "{applied:?}");
    assert_eq!(applied["v9"], (59, 6), "{applied:?}");

    // Heartbeats went through the pool too.
    let beats: i64 = central
        .query_one(
            "SELECT count(*) FROM estafeta_agents WHERE agent_id = $1",
            &[&run],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(beats, 1);

    // Not one failed attempt: without transaction_pooling the sink's prepared statements go
    // missing between transactions and batches fail with 26000 (or worse, meet another
    // client's statement of the same name).
    let log = agent.stderr();
    assert!(
        !log.contains("will be retried") && !log.contains("Could not send a heartbeat"),
        "a delivery through PgBouncer failed:\n{}",
        log_tail(&agent, 40)
    );

    agent.terminate();
    agent.wait(Duration::from_secs(10)).await;
    central
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
    central
        .execute("DELETE FROM estafeta_records WHERE agent_id = $1", &[&run])
        .await
        .unwrap();
    central
        .execute("DELETE FROM estafeta_agents WHERE agent_id = $1", &[&run])
        .await
        .unwrap();
}
