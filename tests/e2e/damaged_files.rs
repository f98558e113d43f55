//! Damaged files (contract 2, inspectable staging: the folder is the truth, the index is rebuilt
//! from it) against the binary; `staging/tests/damage.rs` covers the store's own cases in depth. 40
//! records are staged by `estafeta run` with the API down, the agent stops (SIGTERM), and while it
//! is stopped one record line gets garbled bytes, the last record of another segment is cut in
//! half, and the index is deleted. On the next start the agent logs that it rebuilt the index and
//! what it moved aside (the files are under `_failed/_damaged/` with the reason), and every intact
//! record is delivered exactly once in key order; the two damaged ones are not delivered.

use std::path::{Path, PathBuf};
use std::time::Duration;

use estafeta_e2e::{Agent, FlakyHttpServer, Staged, check_http_deliveries, log_tail, wait_drained};
use serde_json::{Value, json};

fn segment_of(staging: &Path, action: &str, entity: &str) -> PathBuf {
    let mut found = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "jsonl") {
                out.push(path);
            }
        }
    }
    walk(&staging.join(action).join(entity), &mut found);
    assert_eq!(
        found.len(),
        1,
        "one segment for {action}/{entity}: {found:?}"
    );
    found.remove(0)
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    walk(dir, &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_made_while_stopped_is_set_aside_and_everything_intact_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    let down = [
        ("CENTRAL_API_URL", "http://127.0.0.1:9"),
        ("CRONTAB", "0 0 1 1 *"),
        ("FLUSH_ON_WRITE", "false"),
    ];
    let mut agent = Agent::start(dir.path(), &down);
    agent.wait_ready(Duration::from_secs(20)).await;
    let mut staged: Vec<Staged> = Vec::new();
    for n in 0..40u64 {
        let (action, entity) = match n % 4 {
            0 | 1 => ("create", "patient"),
            2 => ("update", "patient"),
            _ => ("create", "exam"),
        };
        let key = format!("k{}", n % 8);
        let body = json!({"id": key, "n": n, "name": format!("Paciente {n}")});
        let (code, answer) = agent.post(action, entity, &body).await;
        assert_eq!(code.as_u16(), 202, "{answer}");
        staged.push(Staged {
            id: answer["id"].as_str().unwrap().to_owned(),
            seq: answer["seq"].as_u64().unwrap(),
            action: action.to_owned(),
            entity: entity.to_owned(),
            key,
            payload: body,
            path: None,
        });
    }
    agent.terminate();
    let exit = agent.wait(Duration::from_secs(20)).await;
    assert_eq!(exit.code(), Some(0), "{}", log_tail(&agent, 20));

    // Garble bytes inside the payload of the 3rd record of update/patient.
    let update = segment_of(&staging, "update", "patient");
    let text = std::fs::read_to_string(&update).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 10, "{update:?}");
    let garbled_id = serde_json::from_str::<Value>(lines[2]).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut bytes = text.clone().into_bytes();
    let at = text.find(lines[2]).unwrap() + lines[2].find("Paciente").unwrap();
    bytes[at..at + 4].copy_from_slice(b"\x00\xff\x13X");
    std::fs::write(&update, bytes).unwrap();
    // Cut the last record of create/exam in half.
    let exam = segment_of(&staging, "create", "exam");
    let text = std::fs::read_to_string(&exam).unwrap();
    let last = text.lines().last().unwrap();
    let cut_id = serde_json::from_str::<Value>(last).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(&exam, &text.as_bytes()[..text.len() - last.len() / 2 - 1]).unwrap();
    // Delete the index.
    for name in ["index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm"] {
        let _ = std::fs::remove_file(staging.join("_state").join(name));
    }

    let server = FlakyHttpServer::start_with_seed(5).await;
    let url = server.url();
    let mut agent = Agent::spec(dir.path())
        .envs(down)
        .env("CENTRAL_API_URL", url.as_str())
        .env("CRONTAB", "* * * * * *")
        .spawn();
    agent.wait_ready(Duration::from_secs(20)).await;
    let log = agent.stderr();
    assert!(
        log.contains("The staging index was rebuilt from the folder."),
        "the start reports the rebuilt index:\n{log}"
    );
    assert!(
        log.contains("Cut an incomplete last line"),
        "the start reports the cut record:\n{log}"
    );
    assert!(
        log.contains("moved aside"),
        "the start reports what it moved aside:\n{log}"
    );
    wait_drained(&agent, Duration::from_secs(30)).await;
    let intact: Vec<Staged> = staged
        .iter()
        .filter(|s| s.id != garbled_id && s.id != cut_id)
        .cloned()
        .collect();
    assert_eq!(intact.len(), 38);
    let requests = server.requests();
    for r in &requests {
        let id = r.idempotency_key().unwrap_or_default();
        assert!(
            id != garbled_id && id != cut_id,
            "a damaged record was delivered: {id}"
        );
    }
    let report = check_http_deliveries(&requests, &intact, true)
        .unwrap_or_else(|problems| panic!("{problems}\nagent log tail:\n{}", log_tail(&agent, 40)));
    // The damaged bytes are kept, with the reason, for a person to read.
    let damaged = files_under(&staging.join("_failed").join("_damaged"));
    assert!(!damaged.is_empty(), "nothing under _failed/_damaged");
    let all: String = damaged
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect();
    assert!(
        all.contains(&garbled_id) || all.contains("Paciente"),
        "the garbled record is kept under _failed/_damaged: {damaged:?}\n{all}"
    );
    for line in agent
        .stderr()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("recovered"))
    {
        eprintln!("damaged files: agent said: {line}");
    }
    eprintln!(
        "damaged files: index rebuilt, {} file(s) under _failed/_damaged, 38 intact records delivered once ({report:?})",
        damaged.len()
    );
}
