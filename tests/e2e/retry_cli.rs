//! `estafeta retry`, flag by flag, as an integration engineer coming from the Bemsoft monitor's
//! `retry_failed.py` uses it (`--dir --file --send --move-ok --limit --verbose`), against a
//! stand-in API that refuses a path (422) and is then fixed: `--send` delivers now and prints
//! what the API answered per item, with the daemon stopped and with it running (the record
//! lands once, and the later records of its key only after it); `--move-ok` moves only what
//! was delivered. Also `max_attempts` (an API answering 503 forever gives a dead letter after
//! N attempts) and `flush --dry-run --show-payload` (the request shown, nothing sent).

use std::path::{Path, PathBuf};
use std::time::Duration;

use estafeta_e2e::{
    Agent, FlakyHttpServer, json_lines, log_tail, record_files, run_cli, sink_status, status,
    wait_status,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Stages `update patient` with key `key` through `estafeta stage` (the daemon may be stopped);
/// returns its (seq, id).
async fn stage(dir: &Path, env: &[(&str, &str)], key: &str, n: u32) -> (u64, String) {
    let file = dir.join(format!("{key}-{n}.json"));
    std::fs::write(&file, json!({"id": key, "n": n}).to_string()).unwrap();
    let out = run_cli(
        dir,
        env,
        &["stage", "update", "patient", file.to_str().unwrap()],
    )
    .await;
    assert!(
        out.status.success(),
        "estafeta stage: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = ls(dir, env).await;
    let line = listed
        .iter()
        .filter(|l| l["key"] == key)
        .max_by_key(|l| l["seq"].as_u64())
        .unwrap_or_else(|| panic!("ls lists the record of key {key}: {listed:?}"));
    (
        line["seq"].as_u64().unwrap(),
        line["id"].as_str().unwrap().to_owned(),
    )
}

async fn ls(dir: &Path, env: &[(&str, &str)]) -> Vec<Value> {
    let out = run_cli(dir, env, &["ls", "--json"]).await;
    assert!(out.status.success());
    json_lines(&out.stdout)
}

/// `estafeta <args>`: (exit code, stdout, stderr).
async fn cli(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let out = run_cli(dir, env, args).await;
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The dead-letter files under `<staging>/_failed`, sorted.
fn letters(staging: &Path) -> Vec<PathBuf> {
    let failed = staging.join("_failed");
    record_files(staging)
        .into_iter()
        .filter(|p| p.starts_with(&failed) && p.extension().is_some_and(|e| e == "json"))
        .collect()
}

/// The dead letter of record `seq`.
fn letter_of(staging: &Path, seq: u64) -> PathBuf {
    letters(staging)
        .into_iter()
        .find(|p| p.to_string_lossy().contains(&format!("-{seq:016}-")))
        .unwrap_or_else(|| panic!("no dead letter for seq {seq}: {:?}", letters(staging)))
}

/// (status) of every request that carried `id` as its Idempotency-Key, in arrival order.
fn answers(server: &FlakyHttpServer, id: &str) -> Vec<u16> {
    server
        .requests()
        .iter()
        .filter(|r| r.idempotency_key() == Some(id))
        .map(|r| r.status)
        .collect()
}

/// Every flag with the daemon stopped. Fails if `--send` only requeues (nothing is sent and
/// "delivered" is never printed), if `--limit` or `--file` is not honoured, if `--move-ok`
/// copies what was not delivered, or if a refusal is not reported as a dead letter again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_flags_with_the_daemon_stopped_send_now_and_report_each_answer() {
    let server = FlakyHttpServer::start_with_seed(22).await;
    for key in ["a", "b", "c", "d"] {
        server.respond_for(
            &format!("/patient/{key}"),
            422,
            json!({"error": "unknown exam code"}),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    let url = server.url();
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CENTRAL_API_TIMEOUT_SECS", "2"),
        ("RETRY_BASE_SECS", "1"),
        ("RETRY_MAX_SECS", "1"),
    ];
    let (a1, a1_id) = stage(dir.path(), &env, "a", 1).await;
    let (a2, a2_id) = stage(dir.path(), &env, "a", 2).await;
    let (b1, b1_id) = stage(dir.path(), &env, "b", 1).await;
    let (c1, c1_id) = stage(dir.path(), &env, "c", 1).await;
    let (d1, d1_id) = stage(dir.path(), &env, "d", 1).await;
    let (code, out, err) = cli(dir.path(), &env, &["flush"]).await;
    assert_eq!(code, 0, "flush: {out}{err}");
    assert_eq!(letters(&staging).len(), 4, "a1, b1, c1, d1 refused: {out}");
    assert!(answers(&server, &a2_id).is_empty(), "a2 waits behind a1");
    let failed = staging.join("_failed");
    let failed_arg = failed.to_str().unwrap();

    // No --send: a listing in sequence order that changes nothing.
    let before = server.requests().len();
    let (code, out, err) = cli(dir.path(), &env, &["retry", "--dir", failed_arg]).await;
    assert_eq!(code, 0, "retry: {out}{err}");
    let listed: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("would send"))
        .collect();
    assert_eq!(listed.len(), 4, "{out}");
    assert!(listed[0].contains(&format!("seq={a1} ")), "{out}");
    assert!(listed[0].contains("HTTP 422"), "the reason is shown: {out}");
    assert!(out.contains("4 dead letter(s) would be sent"), "{out}");
    // --verbose: every field, the file among them.
    let (_, out, _) = cli(dir.path(), &env, &["retry", "--verbose", "--limit", "1"]).await;
    assert!(
        out.contains(&format!("id: {a1_id}"))
            && out.contains("attempts: 1")
            && out.contains(&letter_of(&staging, a1).display().to_string())
            && out.contains("unknown exam code"),
        "retry --verbose: {out}"
    );
    assert_eq!(server.requests().len(), before, "a listing sends nothing");
    assert_eq!(letters(&staging).len(), 4, "a listing changes nothing");
    // --move-ok without --send is refused, changing nothing.
    let ok_dir = dir.path().join("sent");
    let (code, _, err) = cli(
        dir.path(),
        &env,
        &["retry", "--move-ok", ok_dir.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 2, "--move-ok needs --send: {err}");
    assert!(!ok_dir.exists());

    // The API is fixed for a and c; b is still refused; d's server is overloaded.
    server.status_for("/patient/a", 200);
    server.status_for("/patient/c", 201);
    server.status_for("/patient/d", 503);

    // --send --limit 1: only the oldest, a1, delivered now, by this process.
    let (code, out, err) = cli(dir.path(), &env, &["retry", "--send", "--limit", "1"]).await;
    assert_eq!(code, 0, "retry --send --limit 1: {out}{err}");
    assert!(
        out.contains(&format!("delivered seq={a1} sink=api update/patient key=a"))
            && out.contains("delivered 1 of 1 dead letter(s)"),
        "{out}"
    );
    assert_eq!(
        answers(&server, &a1_id),
        vec![422, 200],
        "a1 sent now, once"
    );
    assert!(
        answers(&server, &a2_id).is_empty(),
        "retry sends the dead letters, not the records waiting behind them"
    );
    assert_eq!(letters(&staging).len(), 3);

    // --send --file: b1 alone; refused again, so a dead letter again (a new file), exit 1.
    let b_letter = letter_of(&staging, b1);
    let (code, out, err) = cli(
        dir.path(),
        &env,
        &["retry", "--send", "--file", b_letter.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 1, "a refusal is a failure: {out}{err}");
    assert!(
        out.contains(&format!("refused again seq={b1} "))
            && out.contains("sink answered: HTTP 422 Unprocessable Entity")
            && out.contains(&format!("dead letter again: {}", b_letter.display()))
            && out.contains("delivered 0 of 1 dead letter(s), 1 refused again"),
        "{out}"
    );
    assert!(b_letter.is_file(), "b1 is a dead letter again");
    assert_eq!(answers(&server, &b1_id), vec![422, 422]);
    assert_eq!(
        answers(&server, &c1_id),
        vec![422],
        "--file sends only that file"
    );

    // --send --dir --move-ok: b1 refused again, c1 delivered and moved, d1 pending after a 503.
    let (code, out, err) = cli(
        dir.path(),
        &env,
        &[
            "retry",
            "--send",
            "--dir",
            failed_arg,
            "--move-ok",
            ok_dir.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 1, "not everything was delivered: {out}{err}");
    assert!(
        out.contains(&format!(
            "delivered seq={c1} sink=api update/patient key=c; moved to "
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("not delivered seq={d1} "))
            && out.contains("sink answered: HTTP 503 Service Unavailable")
            && out.contains("it stays pending"),
        "{out}"
    );
    assert!(
        out.contains(
            "delivered 1 of 3 dead letter(s), 1 refused again (dead letters again), 1 still pending"
        ),
        "{out}"
    );
    let moved: Vec<String> = std::fs::read_dir(&ok_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        moved.len(),
        1,
        "only the delivered item is moved: {moved:?}"
    );
    assert!(moved[0].contains(&format!("-{c1:016}-")), "{moved:?}");
    let moved_letter: Value =
        serde_json::from_slice(&std::fs::read(ok_dir.join(&moved[0])).unwrap()).unwrap();
    assert_eq!(moved_letter["record"]["id"], c1_id.as_str());
    assert!(b_letter.is_file(), "a refused item is not moved");
    assert_eq!(letters(&staging), vec![b_letter.clone()]);
    assert_eq!(answers(&server, &c1_id), vec![422, 201]);
    assert_eq!(answers(&server, &d1_id), vec![422, 503]);
    assert_eq!(answers(&server, &b1_id), vec![422, 422, 422]);

    // Everything fixed: the waiting and pending records go with a flush, b1 with --file.
    server.status_for("/patient/b", 200);
    server.status_for("/patient/d", 200);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (code, out, err) = cli(dir.path(), &env, &["flush"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cli(
        dir.path(),
        &env,
        &["retry", "--send", "--file", b_letter.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("delivered 1 of 1"), "{out}");
    assert_eq!(answers(&server, &a2_id), vec![200], "a2 after a1");
    assert_eq!(answers(&server, &d1_id), vec![422, 503, 200]);
    assert_eq!(answers(&server, &b1_id), vec![422, 422, 422, 200]);
    assert!(letters(&staging).is_empty());
    let a_order: Vec<u64> = server
        .succeeded()
        .iter()
        .filter(|r| r.path == "/patient/a")
        .filter_map(|r| r.seq())
        .collect();
    assert_eq!(a_order, vec![a1, a2], "key a in order");
    assert!(ls(dir.path(), &env).await.is_empty(), "nothing left");
}

/// With the daemon running, `retry --send` and the daemon never both send the record: the
/// record lands once, and the later record of its key only after it. The API answers slowly
/// (1.5 s) while the daemon ticks every second, so a record merely requeued (pending) during
/// the CLI's send would be taken by the daemon too: this fails if `--send` requeues without
/// holding the lease (two 200s for the refused record), or if it lets the daemon overtake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_send_with_the_daemon_running_lands_the_record_once_and_in_key_order() {
    let server = FlakyHttpServer::start_with_seed(23).await;
    server.respond_for("/patient/k", 422, json!({"error": "unknown exam code"}));
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    let url = server.url();
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CENTRAL_API_TIMEOUT_SECS", "5"),
        ("CRONTAB", "* * * * * *"),
        ("FLUSH_ON_WRITE", "true"),
        ("RETRY_BASE_SECS", "1"),
        ("RETRY_MAX_SECS", "1"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let mut ids = Vec::new();
    for n in 1..=2 {
        let (code, answer) = agent
            .post("update", "patient", &json!({"id": "k", "n": n}))
            .await;
        assert_eq!(
            code,
            StatusCode::ACCEPTED,
            "{answer}\n{}",
            log_tail(&agent, 30)
        );
        ids.push(answer["id"].as_str().unwrap().to_owned());
    }
    wait_status(
        &agent,
        Duration::from_secs(15),
        "the first record to die",
        |s| {
            let api = sink_status(s, "api");
            api["dead"] == 1 && api["pending"] == 1 && api["in_flight"] == 0
        },
    )
    .await;
    let letter = letters(&staging).pop().expect("a dead letter");

    server.status_for("/patient/k", 200);
    server.delay_all(Duration::from_millis(1_500));
    let (code, out, err) = cli(dir.path(), &env, &["retry", "--send"]).await;
    assert_eq!(
        code,
        0,
        "retry --send: {out}{err}\n{}",
        log_tail(&agent, 40)
    );
    assert!(out.contains("delivered 1 of 1"), "{out}");
    assert!(!letter.exists(), "the letter is gone");
    wait_status(&agent, Duration::from_secs(20), "the waiting record", |s| {
        sink_status(s, "api")["pending"] == 0 && sink_status(s, "api")["in_flight"] == 0
    })
    .await;
    // A few more ticks: nothing is sent again.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        answers(&server, &ids[0]),
        vec![422, 200],
        "the refused record lands once\n{}",
        log_tail(&agent, 40)
    );
    assert_eq!(answers(&server, &ids[1]), vec![200]);
    let order: Vec<u64> = server.succeeded().iter().filter_map(|r| r.seq()).collect();
    assert_eq!(order.len(), 2);
    assert!(order[0] < order[1], "key order: {order:?}");
    let final_status = status(&agent).await;
    assert_eq!(
        sink_status(&final_status, "api")["dead"],
        0,
        "{final_status}"
    );
}

/// `CENTRAL_API_MAX_ATTEMPTS=3` against an API that answers 503 forever: after the third
/// failure the record is a dead letter that says why, and nothing more is sent. Fails
/// without `max_attempts` (the record retries forever: no dead letter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_attempts_turns_a_record_the_api_never_takes_into_a_dead_letter() {
    let server = FlakyHttpServer::start_with_seed(24).await;
    server.fail_fraction(1.0);
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    let url = server.url();
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CENTRAL_API_MAX_ATTEMPTS", "3"),
        ("CRONTAB", "* * * * * *"),
        ("RETRY_BASE_SECS", "1"),
        ("RETRY_MAX_SECS", "1"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let (code, answer) = agent
        .post("update", "patient", &json!({"id": "k", "n": 1}))
        .await;
    assert_eq!(code, StatusCode::ACCEPTED, "{answer}");
    let id = answer["id"].as_str().unwrap().to_owned();
    wait_status(
        &agent,
        Duration::from_secs(30),
        "the record to be given up",
        |s| sink_status(s, "api")["dead"] == 1,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        answers(&server, &id),
        vec![503, 503, 503],
        "three attempts, then none"
    );
    let files = letters(&staging);
    assert_eq!(files.len(), 1, "{files:?}");
    let letter: Value = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    assert_eq!(letter["attempts"], 3, "{letter}");
    assert_eq!(
        letter["reason"], "gave up after 3 attempts: HTTP 503 Service Unavailable",
        "{letter}"
    );
    // A bad value is refused with what to write instead.
    let (code, _, err) = cli(
        dir.path(),
        &[
            ("CENTRAL_API_URL", url.as_str()),
            ("CENTRAL_API_MAX_ATTEMPTS", "0"),
        ],
        &["check-config"],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("CENTRAL_API_MAX_ATTEMPTS"), "{err}");
}

/// `flush --dry-run --show-payload` prints the request a record would be (method, URL,
/// headers with the token hidden, body) and sends, counts and changes nothing. Fails if the
/// token is printed, if anything reaches the API, or if the record is no longer pending with
/// zero attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_dry_run_show_payload_prints_the_request_and_sends_nothing() {
    let server = FlakyHttpServer::start_with_seed(25).await;
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CENTRAL_API_TOKEN", "tok-3c1e9a7b55d04f2e"),
    ];
    let (seq, id) = stage(dir.path(), &env, "k42", 7).await;
    let (code, out, err) = cli(dir.path(), &env, &["flush", "--dry-run", "--show-payload"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("PUT {url}/patient/k42\n"))
            && out.contains(&format!("idempotency-key: {id}\n"))
            && out.contains(&format!("x-estafeta-seq: {seq}\n"))
            && out.contains("content-type: application/json\n")
            && out.contains("authorization: ***\n")
            && out.contains(r#"{"id":"k42","n":7}"#)
            && out.contains("api: dry run, 1 request(s) shown, nothing sent"),
        "{out}"
    );
    assert!(!out.contains("tok-3c1e9a7b55d04f2e") && !err.contains("tok-3c1e9a7b55d04f2e"));
    assert!(server.requests().is_empty(), "nothing sent");
    let listed = ls(dir.path(), &env).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["state"], "pending", "{listed:?}");
    assert_eq!(listed[0]["attempts"], 0, "{listed:?}");
    // --dry-run alone: the DRY_RUN cycle for this run only, its count printed, nothing sent.
    let (code, out, err) = cli(dir.path(), &env, &["flush", "--dry-run"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("api: delivered 0, retried 0, dead 0, dry run 1"),
        "{out}"
    );
    assert!(
        !out.contains(r#""n":7"#) && !err.contains(r#""n":7"#),
        "no payload: {out}{err}"
    );
    assert!(server.requests().is_empty(), "nothing sent");
    // --show-payload alone would send: it is refused, changing nothing.
    let (code, _, err) = cli(dir.path(), &env, &["flush", "--show-payload"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(server.requests().is_empty());
}
