//! Model test: random sequences of stage / next_batch / next_batch_ahead / ack / fail / dead /
//! settle / requeue / reopen / cleanup against the real store in a temporary folder and against a
//! small in-memory model. After every step the store must agree with the model: per-key order
//! (a batch carries runs of a key, each from the key's earliest owed record), nothing lost,
//! nothing handed out twice while in flight, sequences strictly increasing.

use chrono::Utc;
use estafeta_staging::*;
use proptest::prelude::*;
use proptest::sample::Index;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const ENTITIES: [&str; 2] = ["patient", "exam"];
const ACTIONS: [&str; 2] = ["create", "update"];
const KEYS: [Option<&str>; 4] = [None, Some("a"), Some("b"), Some("c")];

/// One record of a stage batch: indexes into the tables above, and the route
/// (0: every sink, 1: only the first sink, 2: only the second sink; two-sink stores only).
#[derive(Debug, Clone)]
struct NewRec {
    action: usize,
    entity: usize,
    key: usize,
    route: usize,
}

#[derive(Debug, Clone)]
enum Op {
    Stage(Vec<NewRec>),
    NextBatch {
        sink: usize,
        limit: usize,
        ahead: bool,
    },
    /// Settles every leased record of a sink the way a sink answers a batch of runs: per key, a
    /// delivered prefix, then one failure (`seed` picks where and which), then the rest given
    /// back untouched.
    Settle {
        sink: usize,
        seed: u64,
    },
    Ack {
        pick: Index,
        every_leased_of_sink: bool,
    },
    Fail {
        pick: Index,
        far_future: bool,
    },
    Dead {
        pick: Index,
    },
    Requeue {
        pick: Index,
    },
    Reopen,
    Cleanup,
}

fn op() -> impl Strategy<Value = Op> {
    let new_rec =
        (0..2usize, 0..2usize, 0..4usize, 0..3usize).prop_map(|(action, entity, key, route)| {
            NewRec {
                action,
                entity,
                key,
                route,
            }
        });
    prop_oneof![
        5 => prop::collection::vec(new_rec, 1..=4).prop_map(Op::Stage),
        5 => (0..2usize, 1..6usize, prop::bool::weighted(0.2))
            .prop_map(|(sink, limit, ahead)| Op::NextBatch { sink, limit, ahead }),
        3 => (0..2usize, any::<u64>()).prop_map(|(sink, seed)| Op::Settle { sink, seed }),
        4 => (any::<Index>(), prop::bool::weighted(0.3))
            .prop_map(|(pick, every_leased_of_sink)| Op::Ack { pick, every_leased_of_sink }),
        2 => (any::<Index>(), prop::bool::weighted(0.2))
            .prop_map(|(pick, far_future)| Op::Fail { pick, far_future }),
        1 => any::<Index>().prop_map(|pick| Op::Dead { pick }),
        1 => any::<Index>().prop_map(|pick| Op::Requeue { pick }),
        1 => Just(Op::Reopen),
        1 => Just(Op::Cleanup),
    ]
}

#[derive(Debug, Clone)]
struct ModelRecord {
    action: String,
    entity: String,
    key: Option<String>,
    payload: String,
    sinks: Vec<String>,
}

/// Delivery state of one (sink, seq) not yet acknowledged by that sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    /// Eligible now (`due`) or in backoff until far in the future.
    Pending {
        due: bool,
    },
    InFlight,
    Dead,
}

#[derive(Default)]
struct Model {
    records: BTreeMap<u64, ModelRecord>,
    /// (sink, seq) → state, for every delivery not yet acknowledged.
    open: BTreeMap<(String, u64), Open>,
    last_seq: u64,
    payloads: u64,
}

impl Model {
    /// What `next_batch(sink, limit)` must return: in sequence order, the due records of each
    /// (entity, key) group up to the group's first record that is not due (in flight, in
    /// backoff, dead), at most `limit` in all.
    /// Records in `passing` (a batch in flight, for a look-ahead lease) count as taken.
    fn expected_batch(&self, sink: &str, limit: usize, passing: &[u64]) -> Vec<u64> {
        let mut held_back = BTreeSet::new();
        let mut out = Vec::new();
        for ((s, seq), state) in &self.open {
            if s != sink || out.len() == limit || passing.contains(seq) {
                continue;
            }
            let r = &self.records[seq];
            let group = (r.entity.clone(), r.key.clone());
            if held_back.contains(&group) {
                continue;
            }
            if *state == (Open::Pending { due: true }) {
                out.push(*seq);
            } else {
                held_back.insert(group);
            }
        }
        out
    }

    fn with_state(&self, want: Open) -> Vec<(String, u64)> {
        self.open
            .iter()
            .filter(|(_, s)| **s == want)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn open_seqs(&self) -> BTreeSet<u64> {
        self.open.keys().map(|(_, seq)| *seq).collect()
    }
}

fn options(dir: &Path, sinks: &[&str]) -> Options {
    let mut opts = Options::new(dir).with_sinks(sinks.iter().copied());
    opts.min_free_bytes = 0;
    opts
}

fn expected_state(model: &Model, sink: &str, seq: u64) -> State {
    match model.open.get(&(sink.to_string(), seq)) {
        None => State::Delivered,
        Some(Open::Pending { .. }) => State::Pending,
        Some(Open::InFlight) => State::InFlight,
        Some(Open::Dead) => State::Dead,
    }
}

/// The invariants that hold after every step.
fn check_invariants(store: &Staging, model: &Model) -> Result<(), TestCaseError> {
    // Nothing acknowledged as staged is lost: every record some sink still owes is listed, with
    // the state the model expects for each of its sinks; records every sink has are not.
    let listed = store.list(&ListFilter::default()).unwrap();
    let listed_seqs: BTreeSet<u64> = listed.iter().map(|r| r.seq).collect();
    prop_assert_eq!(listed.len(), listed_seqs.len(), "a record listed twice");
    prop_assert_eq!(
        &listed_seqs,
        &model.open_seqs(),
        "listed records differ from the model"
    );
    for info in &listed {
        let want = &model.records[&info.seq];
        prop_assert_eq!(&info.entity, &want.entity);
        prop_assert_eq!(&info.action, &want.action);
        prop_assert_eq!(&info.key, &want.key);
        let got: Vec<(String, State)> = info
            .sinks
            .iter()
            .map(|s| (s.sink.clone(), s.state))
            .collect();
        let mut expected: Vec<(String, State)> = want
            .sinks
            .iter()
            .map(|s| (s.clone(), expected_state(model, s, info.seq)))
            .collect();
        expected.sort_by(|a, b| a.0.cmp(&b.0));
        prop_assert_eq!(got, expected, "sink states of record {}", info.seq);
    }
    // Dead letters on disk are exactly the dead deliveries.
    let dead: BTreeSet<(String, u64)> = store
        .dead_letters(None)
        .unwrap()
        .into_iter()
        .map(|d| (d.sink, d.seq))
        .collect();
    let want_dead: BTreeSet<(String, u64)> = model.with_state(Open::Dead).into_iter().collect();
    prop_assert_eq!(dead, want_dead, "dead letters differ from the model");
    Ok(())
}

fn run(two_sinks: bool, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let sinks: Vec<&str> = if two_sinks {
        vec!["api", "db"]
    } else {
        vec!["db"]
    };
    let dir = tempfile::tempdir().unwrap();
    let mut store = Some(Staging::open(options(dir.path(), &sinks)).unwrap().0);
    let mut model = Model::default();
    // The records each sink holds leased, as handed out (a settlement's dead letters need them).
    let mut leased: BTreeMap<(String, u64), Delivery> = BTreeMap::new();

    for op in ops {
        let s = store.as_ref().expect("the store is open between steps");
        match op {
            Op::Stage(recs) => {
                let mut batch = Vec::new();
                let mut planned = Vec::new();
                for r in &recs {
                    model.payloads += 1;
                    let payload = format!(r#"{{"n":{},"k":"{:?}"}}"#, model.payloads, r.key);
                    let route: Option<Vec<String>> = match (two_sinks, r.route) {
                        (true, 1) => Some(vec![sinks[0].to_string()]),
                        (true, 2) => Some(vec![sinks[1].to_string()]),
                        _ => None,
                    };
                    let mut rec = NewRecord::new(
                        ACTIONS[r.action],
                        ENTITIES[r.entity],
                        KEYS[r.key].map(String::from),
                        &payload,
                    )
                    .unwrap();
                    rec.sinks = route.clone();
                    batch.push(rec);
                    planned.push(ModelRecord {
                        action: ACTIONS[r.action].to_string(),
                        entity: ENTITIES[r.entity].to_string(),
                        key: KEYS[r.key].map(String::from),
                        payload,
                        sinks: route
                            .unwrap_or_else(|| sinks.iter().map(|s| s.to_string()).collect()),
                    });
                }
                let staged = s.stage_batch(batch, None).unwrap();
                let receipts = match staged {
                    Staged::New(r) => r,
                    Staged::Replayed(_) => panic!("a batch without a client key was replayed"),
                };
                prop_assert_eq!(receipts.len(), planned.len());
                for (receipt, rec) in receipts.into_iter().zip(planned) {
                    prop_assert!(
                        receipt.seq > model.last_seq,
                        "sequence {} does not follow {}",
                        receipt.seq,
                        model.last_seq
                    );
                    model.last_seq = receipt.seq;
                    for sink in &rec.sinks {
                        model
                            .open
                            .insert((sink.clone(), receipt.seq), Open::Pending { due: true });
                    }
                    model.records.insert(receipt.seq, rec);
                }
            }
            Op::NextBatch { sink, limit, ahead } => {
                let sink = sinks[sink % sinks.len()];
                // A look-ahead lease passes over what this sink holds in flight.
                let passing: Vec<u64> = if ahead {
                    model
                        .with_state(Open::InFlight)
                        .into_iter()
                        .filter(|(s2, _)| s2 == sink)
                        .map(|(_, q)| q)
                        .collect()
                } else {
                    Vec::new()
                };
                let expected = model.expected_batch(sink, limit, &passing);
                let batch = if ahead {
                    s.next_batch_ahead(sink, limit, &passing).unwrap()
                } else {
                    s.next_batch(sink, limit).unwrap()
                };
                let got: Vec<u64> = batch.iter().map(|d| d.envelope.seq).collect();
                for d in &batch {
                    let seq = d.envelope.seq;
                    prop_assert_eq!(&d.sink, sink);
                    let state = model.open.get(&(sink.to_string(), seq)).copied();
                    prop_assert!(
                        state.is_some(),
                        "record {seq}, already acknowledged by {sink} (or never routed to it), came back"
                    );
                    prop_assert!(
                        state != Some(Open::InFlight),
                        "record {seq} handed out to {sink} again while still leased"
                    );
                    let want = &model.records[&seq];
                    // Per-key FIFO: every earlier record of the group still owed to this sink is
                    // in this batch, before it (or, for a look-ahead, in the batch in flight).
                    let earlier = model.open.keys().find(|(s2, seq2)| {
                        s2 == sink
                            && *seq2 < seq
                            && model.records[seq2].entity == want.entity
                            && model.records[seq2].key == want.key
                            && !got.iter().take_while(|q| **q != seq).any(|q| q == seq2)
                            && !passing.contains(seq2)
                    });
                    prop_assert!(
                        earlier.is_none(),
                        "record {seq} handed out before earlier record {:?} of its key",
                        earlier
                    );
                    prop_assert_eq!(&d.envelope.action, &want.action);
                    prop_assert_eq!(&d.envelope.entity, &want.entity);
                    prop_assert_eq!(&d.envelope.key, &want.key);
                    prop_assert_eq!(d.envelope.payload.get(), want.payload.as_str());
                }
                if ahead {
                    // A look-ahead walk may stop early: it returns a prefix of the full answer.
                    prop_assert!(
                        expected.starts_with(&got),
                        "next_batch_ahead({}, {}) = {:?} is not a prefix of {:?}",
                        sink,
                        limit,
                        got,
                        expected
                    );
                } else {
                    prop_assert_eq!(&got, &expected, "next_batch({}, {}) differs", sink, limit);
                }
                for d in batch {
                    let seq = d.envelope.seq;
                    model.open.insert((sink.to_string(), seq), Open::InFlight);
                    leased.insert((sink.to_string(), seq), d);
                }
            }
            Op::Ack {
                pick,
                every_leased_of_sink,
            } => {
                let leased = model.with_state(Open::InFlight);
                if !leased.is_empty() {
                    let (sink, seq) = pick.get(&leased).clone();
                    let seqs: Vec<u64> = if every_leased_of_sink {
                        leased
                            .iter()
                            .filter(|(s2, _)| *s2 == sink)
                            .map(|(_, q)| *q)
                            .collect()
                    } else {
                        vec![seq]
                    };
                    s.ack(&sink, &seqs).unwrap();
                    for q in seqs {
                        model.open.remove(&(sink.clone(), q));
                    }
                }
            }
            Op::Fail { pick, far_future } => {
                let leased = model.with_state(Open::InFlight);
                if !leased.is_empty() {
                    let (sink, seq) = pick.get(&leased).clone();
                    let retry_at = if far_future {
                        Utc::now() + chrono::Duration::hours(6)
                    } else {
                        Utc::now() - chrono::Duration::seconds(1)
                    };
                    s.fail(&sink, seq, "HTTP 503", retry_at).unwrap();
                    model
                        .open
                        .insert((sink, seq), Open::Pending { due: !far_future });
                }
            }
            Op::Dead { pick } => {
                let leased = model.with_state(Open::InFlight);
                if !leased.is_empty() {
                    let (sink, seq) = pick.get(&leased).clone();
                    let path = s.dead(&sink, seq, "HTTP 400: refused").unwrap();
                    prop_assert!(path.exists(), "dead letter {} not written", path.display());
                    model.open.insert((sink, seq), Open::Dead);
                }
            }
            Op::Settle { sink, seed } => {
                let sink = sinks[sink % sinks.len()].to_string();
                let mut rng = seed;
                let mut next = |n: u64| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % n
                };
                let in_flight: Vec<u64> = model
                    .with_state(Open::InFlight)
                    .into_iter()
                    .filter(|(s2, _)| *s2 == sink)
                    .map(|(_, q)| q)
                    .collect();
                let mut by_key: BTreeMap<(String, Option<String>), Vec<u64>> = BTreeMap::new();
                for q in in_flight {
                    let r = &model.records[&q];
                    by_key
                        .entry((r.entity.clone(), r.key.clone()))
                        .or_default()
                        .push(q);
                }
                let mut settlement = Settlement::default();
                let mut after = Vec::new();
                for run in by_key.values() {
                    let delivered = next(run.len() as u64 + 1) as usize;
                    for (i, &q) in run.iter().enumerate() {
                        let state = if i < delivered {
                            settlement.delivered.push(q);
                            None
                        } else if i == delivered {
                            match next(3) {
                                0 => {
                                    settlement.retries.push(Retry {
                                        seq: q,
                                        error: "HTTP 503".to_owned(),
                                        at: Utc::now() - chrono::Duration::seconds(1),
                                    });
                                    Some(Open::Pending { due: true })
                                }
                                1 => {
                                    settlement.retries.push(Retry {
                                        seq: q,
                                        error: "HTTP 503".to_owned(),
                                        at: Utc::now() + chrono::Duration::hours(6),
                                    });
                                    Some(Open::Pending { due: false })
                                }
                                _ => {
                                    let delivery = leased
                                        .remove(&(sink.clone(), q))
                                        .expect("a record in flight was leased");
                                    settlement.dead.push(Dead {
                                        delivery,
                                        reason: "HTTP 422: refused".to_owned(),
                                    });
                                    Some(Open::Dead)
                                }
                            }
                        } else {
                            settlement.give_back.push(q);
                            Some(Open::Pending { due: true })
                        };
                        after.push((q, state));
                    }
                }
                let dead = settlement.dead.len();
                let paths = s.settle(&sink, settlement).unwrap();
                prop_assert_eq!(paths.len(), dead);
                for path in &paths {
                    prop_assert!(path.exists(), "dead letter {} not written", path.display());
                }
                for (q, state) in after {
                    match state {
                        None => model.open.remove(&(sink.clone(), q)),
                        Some(state) => model.open.insert((sink.clone(), q), state),
                    };
                }
            }
            Op::Requeue { pick } => {
                let dead = model.with_state(Open::Dead);
                if !dead.is_empty() {
                    let (sink, seq) = pick.get(&dead).clone();
                    s.requeue(&sink, seq).unwrap();
                    model.open.insert((sink, seq), Open::Pending { due: true });
                }
            }
            Op::Reopen => {
                drop(store.take());
                let (reopened, report) = Staging::open(options(dir.path(), &sinks)).unwrap();
                prop_assert!(!report.index_rebuilt, "{:?}", report);
                prop_assert!(report.moved_aside.is_empty(), "{:?}", report);
                prop_assert_eq!(report.torn_tails_repaired, 0);
                // The dropped store's leases died with it: the reopened store gives them back
                // at once instead of waiting for them to time out.
                let in_flight = model.with_state(Open::InFlight);
                prop_assert_eq!(report.leases_released, in_flight.len() as u64);
                for k in in_flight {
                    model.open.insert(k, Open::Pending { due: true });
                }
                store = Some(reopened);
            }
            Op::Cleanup => {
                s.cleanup().unwrap();
            }
        }
        check_invariants(store.as_ref().unwrap(), &model)?;
    }

    // Finally deliver everything still deliverable: every owed record comes out exactly once,
    // in per-key order, and nothing already acknowledged comes back.
    let s = store.as_ref().unwrap();
    for sink in &sinks {
        loop {
            let expected = model.expected_batch(sink, 1000, &[]);
            let got: Vec<u64> = s
                .next_batch(sink, 1000)
                .unwrap()
                .iter()
                .map(|d| d.envelope.seq)
                .collect();
            prop_assert_eq!(&got, &expected);
            if got.is_empty() {
                break;
            }
            s.ack(sink, &got).unwrap();
            for q in got {
                model.open.remove(&(sink.to_string(), q));
            }
        }
    }
    check_invariants(s, &model)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_agree_with_the_in_memory_model(
        two_sinks in prop::bool::weighted(0.35),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        run(two_sinks, ops)?;
    }
}
