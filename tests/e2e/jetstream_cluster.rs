//! The JetStream sink against a 3-node nats-server cluster on loopback (issue 24, item 1): an R3
//! stream, the agent given the three servers in `CENTRAL_NATS_URL`, and during delivery the
//! stream's leader SIGKILLed, then (after it is back) the new leader too.
//!
//! Why the first node is restarted before the second is killed: an R3 stream needs 2 of its 3
//! replicas for a quorum. With two nodes down it accepts nothing, and the agent only retries
//! until one is back (what `jetstream::records_wait_through_an_outage…` already shows for one
//! server). Killing one node at a time, twice, and each time the leader, is the case a cluster
//! exists for: delivery must go on through the remaining nodes without a person.
//!
//! Asserted: every acknowledged record is in the stream exactly once (`Nats-Msg-Id` = record id,
//! resends after a lost ack dropped within the duplicate window), per key in seq order (shared
//! keys: many updates of one patient; keyless events: one ordering group), and the stream grew
//! while a node was down (the agent carried on with the others).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use estafeta_e2e::{
    Agent, Staged, StoredMessage, check_stream_deliveries, free_port, log_tail, mixed_plan,
    post_plan, unique_name, wait_drained,
};
use serde_json::json;

/// One node of the cluster.
struct Node {
    name: String,
    port: u16,
    cluster_port: u16,
    store: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// Three nats-server processes forming a JetStream cluster; each is killed (its own PID only)
/// when dropped, also when the test panics.
struct Cluster {
    nodes: Vec<Node>,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        std::fs::create_dir_all(dir).expect("creating the cluster's folder");
        // Six different ports (free_port releases each at once, so two calls may agree).
        let mut ports = Vec::new();
        while ports.len() < 6 {
            let port = free_port();
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let nodes = (0..3)
            .map(|i| Node {
                name: format!("n{i}"),
                port: ports[2 * i],
                cluster_port: ports[2 * i + 1],
                store: dir.join(format!("n{i}")),
                log: dir.join(format!("n{i}.log")),
                child: None,
            })
            .collect();
        let mut cluster = Cluster { nodes };
        for i in 0..3 {
            cluster.spawn(i);
        }
        for i in 0..3 {
            cluster.wait_listening(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let routes: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| format!("nats://127.0.0.1:{}", n.cluster_port))
            .collect();
        let node = &mut self.nodes[i];
        let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nats-server");
        let child = Command::new(binary)
            .args(["-a", "127.0.0.1", "-p", &node.port.to_string(), "-js"])
            .arg("-sd")
            .arg(&node.store)
            .args(["-n", &node.name, "--cluster_name", "e2e"])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", node.cluster_port),
            ])
            .args(["--routes", &routes.join(",")])
            .arg("-l")
            .arg(&node.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot start nats-server ({err}): this test needs the Debian package nats-server (scripts/install-deps installs it)"
                )
            });
        node.child = Some(child);
    }

    fn wait_listening(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let port = self.nodes[i].port;
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.nodes[i].child.as_mut().map(Child::try_wait) {
                panic!(
                    "nats-server {} exited at start ({status}); its log:\n{}",
                    self.nodes[i].name,
                    self.log(i)
                );
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "nats-server {} did not listen within 15 s:\n{}",
            self.nodes[i].name,
            self.log(i)
        );
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// `nats://127.0.0.1:a,nats://127.0.0.1:b,nats://127.0.0.1:c`.
    fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn index_of(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node named {name}"))
    }

    /// SIGKILL to node `i` (its own PID).
    fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again, with the same store.
    fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_listening(i);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill9(i);
        }
    }
}

/// A JetStream context on the cluster (any node; the client moves to another when one dies).
async fn connect(cluster: &Cluster) -> jetstream::Context {
    let urls: Vec<String> = cluster.urls().split(',').map(str::to_owned).collect();
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(3)))
        .connect(urls)
        .await
        .expect("connecting to the test cluster");
    jetstream::new(client)
}

/// Creates the R3 stream, retrying while the cluster elects its meta leader.
async fn create_r3_stream(js: &jetstream::Context, name: &str, prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let made = js
            .create_stream(stream::Config {
                name: name.to_owned(),
                subjects: vec![format!("{prefix}.>")],
                storage: stream::StorageType::File,
                num_replicas: 3,
                ..Default::default()
            })
            .await;
        match made {
            Ok(_) => return,
            Err(err) if Instant::now() < deadline => {
                eprintln!("creating the R3 stream: {err}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(err) => panic!("the cluster did not take an R3 stream within 60 s: {err}"),
        }
    }
}

/// The stream's message count and leader, `None` while it has no leader or cannot be asked.
async fn info(js: &jetstream::Context, name: &str) -> Option<(u64, String)> {
    let mut stream = js.get_stream(name).await.ok()?;
    let info = stream.info().await.ok()?;
    let leader = info.cluster.as_ref()?.leader.clone()?;
    Some((info.state.messages, leader))
}

/// Waits until the stream has a leader other than `not` and holds at least `min` messages.
async fn wait_for(
    js: &jetstream::Context,
    name: &str,
    min: u64,
    not: Option<&str>,
    agent: &Agent,
) -> (u64, String) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some((n, leader)) = info(js, name).await
            && n >= min
            && Some(leader.as_str()) != not
        {
            return (n, leader);
        }
        assert!(
            Instant::now() < deadline,
            "the stream {name} did not reach {min} messages with a leader other than {not:?} within 90 s (last {:?}); agent log tail:\n{}",
            info(js, name).await,
            log_tail(agent, 40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until every replica of the stream is current again (a restarted node caught up).
async fn wait_replicas_current(js: &jetstream::Context, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut stream) = js.get_stream(name).await
            && let Ok(info) = stream.info().await
            && let Some(cluster) = &info.cluster
            && cluster.replicas.len() == 2
            && cluster.replicas.iter().all(|p| p.current && !p.offline)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the replicas of {name} did not catch up within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every message the stream holds, in stream order.
async fn messages(js: &jetstream::Context, name: &str) -> Vec<StoredMessage> {
    let stream = js.get_stream(name).await.expect("the stream");
    let mut stream_info = stream.clone();
    let state = stream_info.info().await.expect("stream info").state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let message = stream.get_raw_message(seq).await.expect("a stored message");
        out.push(StoredMessage {
            stream_seq: message.sequence,
            subject: message.subject.to_string(),
            msg_id: message
                .headers
                .get("Nats-Msg-Id")
                .map(|v| v.as_str().to_owned()),
            body: serde_json::from_slice(&message.payload).expect("a JSON body"),
        });
    }
    out
}

/// Posts `count` keyless events (`{"n": i}`) one at a time, pausing `pause` between them.
async fn post_keyless(agent: &Agent, count: usize, pause: Duration) -> Vec<(String, u64)> {
    let mut acked = Vec::with_capacity(count);
    for n in 0..count {
        let (code, answer) = agent.post("create", "event", &json!({"n": n})).await;
        assert_eq!(code, 202, "keyless event {n}: {answer}");
        acked.push((
            answer["id"].as_str().expect("an id").to_owned(),
            answer["seq"].as_u64().expect("a seq"),
        ));
        tokio::time::sleep(pause).await;
    }
    acked
}

/// The keyless events: each acknowledged one stored once, in seq order (one ordering group).
fn check_keyless(messages: &[StoredMessage], acked: &[(String, u64)]) -> Result<(), String> {
    let mut problems = Vec::new();
    let stored: Vec<&StoredMessage> = messages
        .iter()
        .filter(|m| m.body["entity"] == "event")
        .collect();
    let mut last = 0u64;
    let mut seen = std::collections::BTreeMap::new();
    for m in &stored {
        let id = m.body["id"].as_str().unwrap_or_default().to_owned();
        if m.msg_id.as_deref() != Some(id.as_str()) {
            problems.push(format!("event {id}: Nats-Msg-Id {:?}", m.msg_id));
        }
        let seq = m.body["seq"].as_u64().unwrap_or_default();
        if seq <= last {
            problems.push(format!("event seq {seq} stored after seq {last}"));
        }
        last = seq;
        *seen.entry(id).or_insert(0usize) += 1;
    }
    for (id, seq) in acked {
        match seen.get(id) {
            None => problems.push(format!("event {id} (seq {seq}) is not in the stream")),
            Some(n) if *n > 1 => problems.push(format!("event {id} stored {n} times")),
            Some(_) => {}
        }
    }
    if seen.len() != acked.len() {
        problems.push(format!(
            "{} events stored, {} acknowledged",
            seen.len(),
            acked.len()
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

/// Keyless events, posted 25 ms apart: the load outlasts both kills (about 15 s).
const EVENTS: usize = 600;
/// Every record of the test: 600 patient records and the events.
const TOTAL: u64 = 600 + EVENTS as u64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leader_twice_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(&dir.path().join("cluster"));
    let js = connect(&cluster).await;
    let unique = unique_name("cluster");
    let (name, prefix) = (
        format!("E2E_{}", unique.to_ascii_uppercase()),
        format!("e2e_{unique}"),
    );
    create_r3_stream(&js, &name, &prefix).await;

    let env = [
        ("CENTRAL_NATS_URL", cluster.urls()),
        (
            "CENTRAL_NATS_SUBJECT",
            format!("{prefix}.{{entity}}.{{action}}"),
        ),
        ("CENTRAL_NATS_TIMEOUT_SECS", "2".to_owned()),
        ("CRONTAB", "* * * * * *".to_owned()),
        ("RETRY_BASE_SECS", "1".to_owned()),
        ("RETRY_MAX_SECS", "2".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let mut agent = Agent::start(&agent_dir, &env);
    agent.wait_ready(Duration::from_secs(20)).await;

    // Shared keys: 25 patients updated 24 times each, interleaved; keyless events beside them.
    let plan = mixed_plan(25, 24, 24);
    let load = async {
        let (staged, events) = tokio::join!(
            post_plan(&agent, "patient", &plan, 4, 5),
            post_keyless(&agent, EVENTS, Duration::from_millis(25)),
        );
        (staged, events)
    };
    let chaos = async {
        // The first kill once delivery is under way.
        let (before, leader) = wait_for(&js, &name, 60, None, &agent).await;
        let first = cluster.index_of(&leader);
        cluster.kill9(first);
        eprintln!("killed the stream leader {leader} at {before} messages");
        let (during, second_leader) =
            wait_for(&js, &name, (before + 60).min(TOTAL), Some(&leader), &agent).await;
        eprintln!("new leader {second_leader}; {during} messages with {leader} down");
        cluster.restart(first);
        wait_replicas_current(&js, &name).await;
        let (before, leader) = wait_for(&js, &name, (during + 30).min(TOTAL), None, &agent).await;
        let second = cluster.index_of(&leader);
        cluster.kill9(second);
        eprintln!("killed the stream leader {leader} at {before} messages");
        let (after, third_leader) =
            wait_for(&js, &name, (before + 60).min(TOTAL), Some(&leader), &agent).await;
        eprintln!("new leader {third_leader}; {after} messages with {leader} down");
        (before, after)
    };
    let ((staged, events), (before, after)) = tokio::join!(load, chaos);
    assert!(
        after > before || after == TOTAL,
        "the agent carried on with the remaining nodes"
    );
    wait_drained(&agent, Duration::from_secs(120)).await;

    let stored = messages(&js, &name).await;
    let patients: Vec<StoredMessage> = stored
        .iter()
        .filter(|m| m.body["entity"] == "patient")
        .cloned()
        .collect();
    let staged: Vec<Staged> = staged;
    assert_eq!(staged.len(), 600);
    check_stream_deliveries(&patients, &staged, &prefix)
        .unwrap_or_else(|problems| panic!("{problems}\nagent log tail:\n{}", log_tail(&agent, 60)));
    check_keyless(&stored, &events)
        .unwrap_or_else(|problems| panic!("{problems}\nagent log tail:\n{}", log_tail(&agent, 60)));
    assert_eq!(
        stored.len() as u64,
        TOTAL,
        "one message per acknowledged record"
    );
    let warned = agent
        .stderr()
        .lines()
        .filter(|l| l.contains("JetStream delivery failed") || l.contains("will be retried"))
        .count();
    eprintln!(
        "cluster: {} messages, {warned} retried batches logged, kills at {before} and during {after}",
        stored.len()
    );
}
