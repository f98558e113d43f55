//! Crash test with real processes: a child stages records from several threads as fast as it
//! can and prints each acknowledged record; the parent SIGKILLs it at random moments, reopens
//! the store and checks that every acknowledged record is there exactly once, in sequence order.

#![cfg(unix)]

use estafeta_staging::*;
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROOT_ENV: &str = "ESTAFETA_CRASH_ROOT";
/// Set in the sealed run: the key file the child and the parent open the store with.
const KEY_ENV: &str = "ESTAFETA_CRASH_KEY_FILE";

/// The store's options, sealed when `key_file` is given (the child reads it from `KEY_ENV`).
fn options(root: impl Into<std::path::PathBuf>, key_file: Option<&std::path::Path>) -> Options {
    let opts = Options::new(root).with_sinks(["db"]);
    match key_file {
        Some(path) => opts.with_keys(std::sync::Arc::new(Keyring::load(path).unwrap())),
        None => opts,
    }
}
const KILLS: usize = 20;

/// The child: stages until killed. Run only by `acknowledged_records_survive_sigkill`.
#[test]
#[ignore = "child process of acknowledged_records_survive_sigkill"]
fn crash_child_stager() {
    let Ok(root) = std::env::var(ROOT_ENV) else {
        return;
    };
    let key_file = std::env::var_os(KEY_ENV)
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from);
    let (store, _) = Staging::open(options(&root, key_file.as_deref())).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                loop {
                    n += 1;
                    let batch = 1 + (n % 7) as usize;
                    let records = (0..batch)
                        .map(|i| {
                            let key = format!("k{}", (n as usize + i) % 13);
                            let payload = format!(
                                r#"{{"t":{t},"n":{n},"i":{i},"pad":"{}"}}"#,
                                "x".repeat(200)
                            );
                            NewRecord::new("create", "patient", Some(key), &payload).unwrap()
                        })
                        .collect();
                    let staged = store.stage_batch(records, None).unwrap();
                    let mut out = String::new();
                    for r in staged.receipts() {
                        out.push_str(&format!("ACK {t} {} {}\n", r.seq, r.id));
                    }
                    // One write per batch so a kill never splits an ACK line.
                    use std::io::Write;
                    let mut stdout = std::io::stdout().lock();
                    stdout.write_all(out.as_bytes()).unwrap();
                    stdout.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

/// A small xorshift: deterministic, no dependency.
fn next_rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn acknowledged_records_survive_sigkill() {
    survive_sigkill(None);
}

/// The same with encryption at rest on (issue 23): sealed lines cut by a kill are torn tails,
/// never damage, and every acknowledged record opens again.
#[test]
fn acknowledged_sealed_records_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("staging.key");
    Keyring::generate().save(&key_file, false).unwrap();
    survive_sigkill(Some(&key_file));
}

fn survive_sigkill(key_file: Option<&std::path::Path>) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("staging");
    let exe = std::env::current_exe().unwrap();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    // (thread, seq, id) in the order each thread saw them acknowledged.
    let mut acked: Vec<(u32, u64, String)> = Vec::new();
    let mut recovered_total = 0;
    let mut torn_total = 0;

    for round in 0..KILLS {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child_stager",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROOT_ENV, &root)
            .env(KEY_ENV, key_file.unwrap_or(std::path::Path::new("")))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("ACK ") {
                    let mut it = rest.split(' ');
                    let (Some(t), Some(seq), Some(id)) = (it.next(), it.next(), it.next()) else {
                        continue; // a line cut by the kill was never fully printed
                    };
                    if id.len() == 36 {
                        lines.push((t.parse().unwrap(), seq.parse().unwrap(), id.to_string()));
                    }
                }
            }
            lines
        });
        // Let it start and stage for a random while, then kill it mid-work.
        let wait = Duration::from_millis(150 + next_rand(&mut rng) % 400);
        let start = Instant::now();
        std::thread::sleep(wait);
        // SAFETY-free: plain kill(2) through libc on our own child.
        let rc = unsafe_kill(child.id() as i32);
        assert_eq!(rc, 0, "kill failed");
        let _ = child.wait();
        let lines = reader.join().unwrap();
        assert!(
            !lines.is_empty() || round > 0,
            "the child acknowledged nothing in {:?}",
            start.elapsed()
        );
        acked.extend(lines);

        let (store, report) = Staging::open(options(&root, key_file)).unwrap();
        recovered_total += report.records_recovered;
        torn_total += report.torn_tails_repaired;
        assert!(
            !report.index_rebuilt,
            "round {round}: {:?}",
            report.rebuild_reason
        );
        assert!(
            report.moved_aside.is_empty(),
            "round {round}: {:?}",
            report.moved_aside
        );
        drop(store);
    }

    let (store, _) = Staging::open(options(&root, key_file)).unwrap();
    let all = store
        .list(&ListFilter {
            include_delivered: true,
            ..ListFilter::default()
        })
        .unwrap();
    let mut by_id: HashMap<&str, u64> = HashMap::new();
    let mut seen_seq = HashSet::new();
    for r in &all {
        assert!(
            by_id.insert(r.id.as_str(), r.seq).is_none(),
            "id {} twice",
            r.id
        );
        assert!(seen_seq.insert(r.seq), "seq {} twice", r.seq);
    }
    assert!(
        acked.len() > 100,
        "too few acknowledged records to prove anything: {}",
        acked.len()
    );
    for (_, seq, id) in &acked {
        assert_eq!(
            by_id.get(id.as_str()),
            Some(seq),
            "acknowledged record {id} (seq {seq}) lost"
        );
    }
    // Per stager thread and run, acknowledged sequence numbers only go up.
    let mut last: HashMap<u32, u64> = HashMap::new();
    for (t, seq, _) in &acked {
        let prev = last.insert(*t, *seq).unwrap_or(0);
        // Each run restarts thread numbering, but seqs keep growing across runs.
        assert!(*seq > prev, "thread {t}: seq {seq} after {prev}");
    }
    eprintln!(
        "crash test: {} kills, {} acknowledged records all present once; {} recovered from segment tails, {} torn tails cut",
        KILLS,
        acked.len(),
        recovered_total,
        torn_total
    );
}

fn unsafe_kill(pid: i32) -> i32 {
    #[allow(unsafe_code)]
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, libc::SIGKILL)
    }
}
