//! Proves contracts 3 and 5 for a refused record and the replay CLI: the central API answers
//! 400 with a JSON body to one record, which then sits in `_failed/…` with the status and the
//! body in its reason; the later records of its key wait, never sent, while other keys keep
//! flowing; after the server is fixed, `estafeta retry` only lists it and changes nothing, and
//! `estafeta retry --send` delivers it at once, then the waiting records of its key are
//! delivered by the daemon, in order.

use std::path::PathBuf;
use std::time::Duration;

use estafeta_e2e::{
    Agent, FlakyHttpServer, Staged, check_http_deliveries, json_lines, log_tail, record_files,
    run_cli, sink_status, status, wait_drained, wait_status,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Posts one record of `patient` with its key in `id`; returns what the 202 acknowledged.
async fn post(agent: &Agent, action: &str, key: &str, payload: Value) -> Staged {
    let (code, answer) = agent.post(action, "patient", &payload).await;
    assert_eq!(
        code,
        StatusCode::ACCEPTED,
        "{action} {key}: {answer}\n{}",
        log_tail(agent, 40)
    );
    Staged {
        id: answer["id"].as_str().unwrap().to_owned(),
        seq: answer["seq"].as_u64().unwrap(),
        action: action.to_owned(),
        entity: "patient".to_owned(),
        key: key.to_owned(),
        payload,
        path: answer["path"].as_str().map(PathBuf::from),
    }
}

fn dead_letter_files(staging: &std::path::Path) -> Vec<PathBuf> {
    let failed = staging.join("_failed");
    record_files(staging)
        .into_iter()
        .filter(|p| p.starts_with(&failed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_waits_in_failed_with_its_key_until_retry_send() {
    let server = FlakyHttpServer::start_with_seed(4).await;
    let refusal =
        json!({"error": "invalid_patient", "detail": "birth_date 31/02/1990 is not a date"});
    server.respond_for("/patient/bad", 400, refusal.clone());
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    let url = server.url();
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CENTRAL_API_TIMEOUT_SECS", "1"),
        ("CRONTAB", "* * * * * *"),
        ("RETRY_BASE_SECS", "1"),
        ("RETRY_MAX_SECS", "2"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;

    // Key "bad": created fine, then an update the API refuses, then two records that must wait.
    let mut all = Vec::new();
    let created = post(&agent, "create", "bad", json!({"id": "bad", "name": "Ana"})).await;
    let refused = post(
        &agent,
        "update",
        "bad",
        json!({"id": "bad", "birth_date": "31/02/1990"}),
    )
    .await;
    let waiting = vec![
        post(
            &agent,
            "update",
            "bad",
            json!({"id": "bad", "birth_date": "1990-02-28"}),
        )
        .await,
        post(&agent, "delete", "bad", json!({"id": "bad"})).await,
    ];
    let mut others = Vec::new();
    for k in ["ok1", "ok2", "ok3"] {
        others.push(post(&agent, "create", k, json!({"id": k, "name": k})).await);
        others.push(post(&agent, "update", k, json!({"id": k, "v": 2})).await);
    }

    let dead = wait_status(
        &agent,
        Duration::from_secs(15),
        "the refused record to become a dead letter and the other keys to be delivered",
        |s| {
            let api = sink_status(s, "api");
            api["dead"] == 1 && api["in_flight"] == 0 && s["records_pending"] == 3
        },
    )
    .await;
    assert_eq!(
        sink_status(&dead, "api")["pending"],
        2,
        "the two later records of key bad wait: {dead}"
    );

    // The dead letter: one readable file under _failed/update/patient/…, with status and body.
    let files = dead_letter_files(&staging);
    assert_eq!(files.len(), 1, "one dead letter: {files:?}");
    let file = &files[0];
    let rel = file.strip_prefix(staging.join("_failed")).unwrap();
    assert!(
        rel.starts_with("update/patient"),
        "dead letter in the action/entity layout: {rel:?}"
    );
    let letter: Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    assert_eq!(letter["record"]["id"], refused.id.as_str(), "{letter}");
    assert_eq!(letter["record"]["payload"], refused.payload, "{letter}");
    assert_eq!(letter["sink"], "api", "{letter}");
    let reason = letter["reason"].as_str().unwrap();
    assert!(
        reason.contains("400") && reason.contains("birth_date 31/02/1990 is not a date"),
        "the reason has the status and the body: {reason}"
    );
    let out = run_cli(dir.path(), &env, &["ls", "--failed", "--json"]).await;
    let failed = json_lines(&out.stdout);
    assert_eq!(failed.len(), 1, "ls --failed: {failed:?}");
    assert_eq!(failed[0]["id"], refused.id.as_str());
    assert!(failed[0]["last_error"].as_str().unwrap().contains("400"));

    // Other keys keep flowing while "bad" waits: a record posted now is delivered.
    let late = post(&agent, "update", "ok1", json!({"id": "ok1", "v": 3})).await;
    others.push(late.clone());
    wait_status(&agent, Duration::from_secs(10), "ok1's late update", |_| {
        server
            .succeeded()
            .iter()
            .any(|r| r.idempotency_key() == Some(late.id.as_str()))
    })
    .await;
    // A few more ticks: the waiting records are still never sent.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let sent_waiting = server
        .requests()
        .iter()
        .filter(|r| {
            waiting
                .iter()
                .any(|w| r.idempotency_key() == Some(w.id.as_str()))
        })
        .count();
    assert_eq!(sent_waiting, 0, "records behind a dead letter must wait");
    let out = run_cli(dir.path(), &env, &["ls", "--json"]).await;
    let pending = json_lines(&out.stdout);
    for w in &waiting {
        let line = pending
            .iter()
            .find(|l| l["id"] == w.id.as_str())
            .unwrap_or_else(|| panic!("ls --json lists the waiting record {}: {pending:?}", w.seq));
        assert_eq!(line["state"], "pending", "{line}");
        assert_eq!(line["attempts"], 0, "{line}");
    }
    let refused_requests = || {
        server
            .requests()
            .iter()
            .filter(|r| r.idempotency_key() == Some(refused.id.as_str()))
            .count()
    };
    assert_eq!(refused_requests(), 1, "a 400 is not retried");

    // The server is fixed.
    server.status_for("/patient/bad", 201);

    // `retry` without --send lists it and changes nothing.
    let out = run_cli(dir.path(), &env, &["retry"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "estafeta retry: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("would send")
            && stdout.contains(&format!("seq={}", refused.seq))
            && stdout.contains("1 dead letter(s) would be sent"),
        "retry lists the dead letter: {stdout}"
    );
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(file.is_file(), "retry without --send keeps the dead letter");
    assert_eq!(refused_requests(), 1, "retry without --send sends nothing");
    let still = status(&agent).await;
    assert_eq!(sink_status(&still, "api")["dead"], 1, "{still}");
    assert_eq!(sink_status(&still, "api")["pending"], 2, "{still}");

    // `retry --send` delivers it now; then the waiting records of its key go, in order.
    let out = run_cli(dir.path(), &env, &["retry", "--send"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("delivered 1 of 1"),
        "estafeta retry --send: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_drained(&agent, Duration::from_secs(15)).await;
    assert!(!file.exists(), "the requeued dead letter is gone");
    assert!(dead_letter_files(&staging).is_empty());

    let key_bad: Vec<(u64, u16)> = server
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/patient/bad") || r.json()["id"] == "bad")
        .map(|r| (r.seq().unwrap(), r.status))
        .collect();
    assert_eq!(
        key_bad,
        vec![
            (created.seq, 200),
            (refused.seq, 400),
            (refused.seq, 201),
            (waiting[0].seq, 201),
            (waiting[1].seq, 201),
        ],
        "key bad: created, refused, then after retry --send the refused record and the waiting ones in order"
    );
    all.push(created);
    all.push(refused);
    all.extend(waiting);
    all.extend(others);
    // Every record took effect once; the 400 is the only failed request.
    let report = check_http_deliveries(&server.requests(), &all, true)
        .unwrap_or_else(|problems| panic!("{problems}\n{}", log_tail(&agent, 60)));
    assert_eq!(report.failed, 1, "{report:?}");
}
