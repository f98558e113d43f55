//! Sealing a group's lines while the writer thread indexes it (encryption at rest, issue 23).
//!
//! Sealing a line (serializing its hidden part, AES-GCM, base64, CRC) is the writer's largest
//! cost with encryption on, and every batch waits for the writer. A sealed line's length is
//! known before it is sealed (`segment::sealed_line_len`), so the writer places and indexes a
//! group's lines (in its transaction, committed only once the lines are durable) while other
//! threads seal them. Each line's nonce is reserved in order from its segment's data key before
//! sealing starts, so which thread seals a line changes nothing in it.

use crate::crypt::DataKey;
use crate::record::Envelope;
use crate::segment;

/// Below this many lines a group is sealed on the writer thread alone: starting threads costs
/// more than it saves.
const PARALLEL_SEAL_MIN: usize = 64;

/// One line to seal: its envelope, its segment's data key and the nonce reserved for it.
pub type SealJob<'a> = (&'a Envelope, &'a DataKey, u64);

/// The sealed lines of a group, being made.
pub enum SealingGroup<'scope, 'env> {
    /// A small group (or none): sealed on the writer thread when its lines are asked for.
    Here(&'env [SealJob<'env>]),
    /// A large group: one share per thread, in order.
    Threads(Vec<std::thread::ScopedJoinHandle<'scope, SealedLines>>),
}

impl<'scope, 'env> SealingGroup<'scope, 'env> {
    /// Starts sealing `jobs`: on threads of `scope` for a large group, else not yet.
    pub fn start(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        jobs: &'env [SealJob<'env>],
    ) -> Self {
        if jobs.len() < PARALLEL_SEAL_MIN {
            return Self::Here(jobs);
        }
        let chunk = jobs.len().div_ceil(sealing_threads());
        Self::Threads(
            jobs.chunks(chunk)
                .map(|part| scope.spawn(move || seal_lines(part)))
                .collect(),
        )
    }

    /// The group's sealed lines, in shares whose lines follow one another in the order of
    /// the jobs.
    pub fn finish(self) -> Vec<SealedLines> {
        match self {
            Self::Here(jobs) => vec![seal_lines(jobs)],
            Self::Threads(handles) => handles
                .into_iter()
                .map(|h| h.join().expect("a sealing thread panicked"))
                .collect(),
        }
    }
}

/// Sealed lines one after another in one buffer (one allocation per share, not per line: the
/// writer frees what the sealing threads allocated), with each line's length.
pub struct SealedLines {
    bytes: Vec<u8>,
    lens: Vec<usize>,
}

impl SealedLines {
    /// Each line, newline included, in order.
    pub fn lines(&self) -> impl Iterator<Item = &[u8]> {
        self.lens.iter().scan(0, |at: &mut usize, &len| {
            let line = &self.bytes[*at..*at + len];
            *at += len;
            Some(line)
        })
    }
}

fn seal_lines(jobs: &[SealJob<'_>]) -> SealedLines {
    let room = jobs
        .iter()
        .map(|(env, _, _)| segment::sealed_line_room(env))
        .sum();
    let mut out = SealedLines {
        bytes: Vec::with_capacity(room),
        lens: Vec::with_capacity(jobs.len()),
    };
    let mut plain = Vec::new();
    for (env, dk, counter) in jobs {
        let start = out.bytes.len();
        segment::append_sealed_line(env, dk, *counter, &mut plain, &mut out.bytes);
        out.lens.push(out.bytes.len() - start);
    }
    out
}

/// Threads a large group is sealed on: the machine's cores but the one the writer indexes on,
/// at least 1 and at most 4. Asked once: on Linux `available_parallelism` reads the process's
/// cgroup files, which cost more (~40 µs) than sealing a small group.
fn sealing_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).clamp(1, 4))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn envelope(seq: u64) -> Envelope {
        let pad = "é".repeat((seq as usize * 37) % 400);
        Envelope {
            v: 1,
            id: format!("id-{seq}"),
            seq,
            action: "update".into(),
            entity: "attendance".into(),
            key: (!seq.is_multiple_of(3)).then(|| format!("k{}", seq % 5)),
            staged_at: "2026-12-07T06:00:00.000000Z".into(),
            client_key: None,
            client_fingerprint: None,
            client_records: None,
            sinks: vec!["db".into()],
            source: None,
            payload: RawValue::from_string(format!(r#"{{"n":{seq},"pad":"{pad}"}}"#)).unwrap(),
        }
    }

    /// Sealed on the writer (a small group) or in shares on threads (a large one), a group's
    /// lines come back in the jobs' order, each the very line its job seals alone (its nonce
    /// was reserved for it), and each opens to its record.
    #[test]
    fn a_group_sealed_in_shares_gives_each_jobs_line_in_order() {
        let ring = crate::Keyring::generate();
        let dk = ring.new_data_key();
        for n in [1, PARALLEL_SEAL_MIN - 1, PARALLEL_SEAL_MIN, 301] {
            let envelopes: Vec<Envelope> = (1..=n as u64).map(envelope).collect();
            let jobs: Vec<SealJob> = envelopes
                .iter()
                .zip(1u64..)
                .map(|(env, counter)| (env, &dk, counter))
                .collect();
            let shares = std::thread::scope(|scope| SealingGroup::start(scope, &jobs).finish());
            let lines: Vec<&[u8]> = shares.iter().flat_map(|share| share.lines()).collect();
            assert_eq!(lines.len(), n, "one line per job, {n} jobs");
            for (line, (env, dk, counter)) in lines.iter().zip(&jobs) {
                assert_eq!(
                    *line,
                    segment::encode_sealed_line(env, dk, *counter).as_slice()
                );
                let back = segment::decode_line(&line[..line.len() - 1], Some(&ring)).unwrap();
                assert_eq!(back.seq, env.seq);
                assert_eq!(back.key, env.key);
                assert_eq!(back.payload.get(), env.payload.get());
            }
        }
    }
}
