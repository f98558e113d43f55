//! A reproducible workload for the end-to-end tests: records over a set of keys mixing
//! create, update and delete as an application would send them ([`mixed_plan`]), posted to a
//! running agent in single requests (the key in `X-Record-Key` or in the `id` field) and in JSON
//! arrays ([`post_plan`]), remembering what each 202 answer acknowledged ([`Staged`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::agent::Agent;
use crate::flaky::RecordedRequest;
use crate::support::log_tail;

/// A tiny xorshift64 generator: the same seed gives the same workload.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng((seed ^ 0x2545_F491_4F6C_DD1D).max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// One record to send.
#[derive(Debug, Clone)]
pub struct Planned {
    pub action: &'static str,
    pub key: String,
    /// Position in the plan; also in the payload as `n`, so every payload is unique.
    pub n: usize,
}

/// `keys` keys (`k00`, `k01`, …) with `per_key` records each, interleaved at random. Each key
/// starts with `create`; a key that exists gets `update` (80%) or `delete` (20%); a deleted
/// key is created again.
pub fn mixed_plan(keys: usize, per_key: usize, seed: u64) -> Vec<Planned> {
    let mut rng = Rng::new(seed);
    let mut order: Vec<usize> = (0..keys)
        .flat_map(|k| std::iter::repeat_n(k, per_key))
        .collect();
    for i in (1..order.len()).rev() {
        let j = rng.below(i + 1);
        order.swap(i, j);
    }
    let mut exists = vec![false; keys];
    order
        .into_iter()
        .enumerate()
        .map(|(n, k)| {
            let action = if !exists[k] {
                exists[k] = true;
                "create"
            } else if rng.chance(0.2) {
                exists[k] = false;
                "delete"
            } else {
                "update"
            };
            Planned {
                action,
                key: format!("k{k:02}"),
                n,
            }
        })
        .collect()
}

/// A record the agent acknowledged with 202.
#[derive(Debug, Clone)]
pub struct Staged {
    pub id: String,
    pub seq: u64,
    pub action: String,
    pub entity: String,
    pub key: String,
    /// The payload as posted.
    pub payload: Value,
    /// The staging file of a single-record answer (`path`); arrays answer ids only.
    pub path: Option<PathBuf>,
}

/// The payload of a planned record; `with_id` puts the key in the `id` field.
pub fn payload(p: &Planned, with_id: bool) -> Value {
    let ward = ["A", "B", "C"][p.n % 3];
    let mut value = json!({
        "n": p.n,
        "op": p.action,
        "name": format!("Paciente {}", p.n),
        "ward": ward,
    });
    if with_id {
        value["id"] = json!(p.key);
    }
    value
}

/// Posts `plan` for `entity` in plan order, one request at a time: a run of records with the
/// same action goes as one JSON array (up to `max_array` records, the length drawn from
/// `seed`), otherwise as a single record whose key is in `X-Record-Key` (every other one) or in
/// the `id` field. Returns what each 202 acknowledged, in plan order.
///
/// # Panics
/// When an answer is not 202 or does not carry one increasing seq per record.
pub async fn post_plan(
    agent: &Agent,
    entity: &str,
    plan: &[Planned],
    max_array: usize,
    seed: u64,
) -> Vec<Staged> {
    let mut rng = Rng::new(seed);
    let mut staged: Vec<Staged> = Vec::with_capacity(plan.len());
    let mut i = 0;
    let mut singles = 0usize;
    while i < plan.len() {
        let action = plan[i].action;
        let run = plan[i..].iter().take_while(|p| p.action == action).count();
        let want = 1 + rng.below(max_array.max(1));
        let take = run.min(want);
        let chunk = &plan[i..i + take];
        if take == 1 {
            let p = &chunk[0];
            let by_header = singles.is_multiple_of(2);
            singles += 1;
            let body = payload(p, !by_header);
            let headers: Vec<(&str, &str)> = if by_header {
                vec![("X-Record-Key", p.key.as_str())]
            } else {
                Vec::new()
            };
            let (code, answer) = agent.post_with(action, entity, &body, &headers).await;
            assert_eq!(
                code,
                StatusCode::ACCEPTED,
                "posting record {} ({action} {}): {answer}\nagent log tail:\n{}",
                p.n,
                p.key,
                log_tail(agent, 40)
            );
            let id = answer["id"].as_str().expect("202 answer has an id");
            let seq = answer["seq"].as_u64().expect("202 answer has a seq");
            let path = answer["path"].as_str().expect("202 answer has a path");
            staged.push(Staged {
                id: id.to_owned(),
                seq,
                action: action.to_owned(),
                entity: entity.to_owned(),
                key: p.key.clone(),
                payload: body,
                path: Some(PathBuf::from(path)),
            });
        } else {
            let bodies: Vec<Value> = chunk.iter().map(|p| payload(p, true)).collect();
            let (code, answer) = agent
                .post(action, entity, &Value::from(bodies.clone()))
                .await;
            assert_eq!(
                code,
                StatusCode::ACCEPTED,
                "posting records {}..={} ({action}) as an array: {answer}\nagent log tail:\n{}",
                chunk[0].n,
                chunk[take - 1].n,
                log_tail(agent, 40)
            );
            let ids = answer["ids"].as_array().expect("202 answer has ids");
            let seqs = answer["seqs"].as_array().expect("202 answer has seqs");
            assert_eq!(
                (ids.len(), seqs.len()),
                (take, take),
                "one id and seq per record: {answer}"
            );
            for ((p, body), (id, seq)) in chunk.iter().zip(bodies).zip(ids.iter().zip(seqs)) {
                staged.push(Staged {
                    id: id.as_str().expect("ids are strings").to_owned(),
                    seq: seq.as_u64().expect("seqs are numbers"),
                    action: action.to_owned(),
                    entity: entity.to_owned(),
                    key: p.key.clone(),
                    payload: body,
                    path: None,
                });
            }
        }
        i += take;
    }
    assert!(
        staged.windows(2).all(|w| w[0].seq < w[1].seq),
        "sequence numbers must increase strictly in the order records were acknowledged"
    );
    staged
}

/// The staged records by id.
pub fn by_id(staged: &[Staged]) -> BTreeMap<&str, &Staged> {
    staged.iter().map(|s| (s.id.as_str(), s)).collect()
}

/// Per (entity, key), the staged seqs in order.
pub fn seqs_by_key(staged: &[Staged]) -> BTreeMap<(String, String), Vec<u64>> {
    let mut out: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
    for s in staged {
        out.entry((s.entity.clone(), s.key.clone()))
            .or_default()
            .push(s.seq);
    }
    for seqs in out.values_mut() {
        seqs.sort_unstable();
    }
    out
}

/// The request the HTTP sink sends for a record by default: create → `POST /{entity}`,
/// update → `PUT /{entity}/{key}`, delete → `DELETE /{entity}/{key}` (keys here need no
/// percent-encoding).
pub fn default_route(s: &Staged) -> (&'static str, String) {
    match s.action.as_str() {
        "create" => ("POST", format!("/{}", s.entity)),
        "update" | "upsert" => ("PUT", format!("/{}/{}", s.entity, s.key)),
        "delete" => ("DELETE", format!("/{}/{}", s.entity, s.key)),
        _ => ("POST", format!("/{}", s.entity)),
    }
}

/// What [`check_http_deliveries`] counted.
#[derive(Debug, Clone, Default)]
pub struct DeliveryReport {
    pub requests: usize,
    /// Requests that took effect ([`RecordedRequest::succeeded`]).
    pub succeeded: usize,
    /// Successful requests beyond the first of their record (resends that reached the server).
    pub resent: usize,
    /// 503s and other failures, stalls included.
    pub failed: usize,
    pub stalled: usize,
}

/// Checks the requests an HTTP sink sent for `staged`:
/// - every request names a staged record by `Idempotency-Key`, with that record's method,
///   path ([`default_route`]), `X-Estafeta-Seq` and payload (byte for byte as JSON);
/// - every staged record took effect: exactly one successful request when `exactly_once`,
///   otherwise at least one;
/// - per (entity, key), records are first applied in staged sequence order: the first success
///   of each record comes in seq order. A resend (the server dedupes it by `Idempotency-Key`)
///   may follow a later record of its key: a batch carries runs of a key and settles as a
///   whole, so after a crash the records of a run that were sent but not settled are sent
///   again, in order.
///
/// Returns the counts, or every problem found (the first 30) as one message.
pub fn check_http_deliveries(
    requests: &[RecordedRequest],
    staged: &[Staged],
    exactly_once: bool,
) -> Result<DeliveryReport, String> {
    let ids = by_id(staged);
    let mut problems: Vec<String> = Vec::new();
    let mut report = DeliveryReport {
        requests: requests.len(),
        ..DeliveryReport::default()
    };
    let mut successes: BTreeMap<&str, usize> = BTreeMap::new();
    let mut order: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
    for r in requests {
        let Some(id) = r.idempotency_key() else {
            problems.push(format!(
                "request #{} {} {} has no Idempotency-Key",
                r.index, r.method, r.path
            ));
            continue;
        };
        let Some(s) = ids.get(id) else {
            problems.push(format!(
                "request #{} {} {} names Idempotency-Key {id}, which no 202 acknowledged",
                r.index, r.method, r.path
            ));
            continue;
        };
        let (method, path) = default_route(s);
        if (r.method.as_str(), r.path.as_str()) != (method, path.as_str()) {
            problems.push(format!(
                "record seq {} ({} {}) was sent as {} {}, expected {method} {path}",
                s.seq, s.action, s.key, r.method, r.path
            ));
        }
        if r.seq() != Some(s.seq) {
            problems.push(format!(
                "record {id} has seq {} but its request #{} carries X-Estafeta-Seq {:?}",
                s.seq,
                r.index,
                r.header("x-estafeta-seq")
            ));
        }
        let body: Option<Value> = serde_json::from_slice(&r.body).ok();
        if body.as_ref() != Some(&s.payload) {
            problems.push(format!(
                "record seq {} was sent with body {:?}, expected {}",
                s.seq,
                String::from_utf8_lossy(&r.body),
                s.payload
            ));
        }
        if r.stalled {
            report.stalled += 1;
        }
        if r.succeeded() {
            report.succeeded += 1;
            let times = successes.entry(id).or_insert(0);
            *times += 1;
            // Only a record's first success is an application: the server dedupes a resend by
            // its Idempotency-Key (after a crash, the records of a key's batch that were sent
            // but not settled are sent again, in seq order), so the order that matters is the
            // order of first applications.
            if *times == 1 {
                order
                    .entry((s.entity.clone(), s.key.clone()))
                    .or_default()
                    .push(s.seq);
            }
        } else {
            report.failed += 1;
        }
    }
    for s in staged {
        let n = successes.get(s.id.as_str()).copied().unwrap_or(0);
        if n == 0 {
            problems.push(format!(
                "record seq {} ({} {}, id {}) never took effect",
                s.seq, s.action, s.key, s.id
            ));
        } else if exactly_once && n > 1 {
            let times: Vec<String> = requests
                .iter()
                .filter(|r| r.idempotency_key() == Some(s.id.as_str()))
                .map(|r| {
                    format!(
                        "#{} {}{}",
                        r.index,
                        r.status,
                        if r.stalled { " stalled" } else { "" }
                    )
                })
                .collect();
            problems.push(format!(
                "record seq {} ({} {}) took effect {n} times; its requests: {}",
                s.seq,
                s.action,
                s.key,
                times.join(", ")
            ));
        }
        report.resent += n.saturating_sub(1);
    }
    for (key, expected) in seqs_by_key(staged) {
        let seen = order.remove(&key).unwrap_or_default();
        if seen.windows(2).any(|w| w[1] < w[0]) {
            problems.push(format!(
                "key {}/{}: records were first applied out of seq order: {seen:?} (staged {expected:?})",
                key.0, key.1
            ));
            continue;
        }
        let mut firsts = seen.clone();
        firsts.dedup();
        if firsts != expected {
            problems.push(format!(
                "key {}/{}: records took effect in the order {firsts:?}, staged {expected:?}",
                key.0, key.1
            ));
        }
    }
    if problems.is_empty() {
        Ok(report)
    } else {
        let total = problems.len();
        problems.truncate(30);
        Err(format!(
            "{total} problem(s) in {} requests for {} records:\n  {}",
            requests.len(),
            staged.len(),
            problems.join("\n  ")
        ))
    }
}
