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
    Threads(Vec<std::thread::ScopedJoinHandle<'scope, Vec<Vec<u8>>>>),
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

    /// The group's sealed lines, newline included, in the order of the jobs.
    pub fn finish(self) -> Vec<Vec<u8>> {
        match self {
            Self::Here(jobs) => seal_lines(jobs),
            Self::Threads(handles) => handles
                .into_iter()
                .flat_map(|h| h.join().expect("a sealing thread panicked"))
                .collect(),
        }
    }
}

fn seal_lines(jobs: &[SealJob<'_>]) -> Vec<Vec<u8>> {
    jobs.iter()
        .map(|(env, dk, counter)| segment::encode_sealed_line(env, dk, *counter))
        .collect()
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
