//! Estafeta's staging store: every write is made durable on local disk before it is
//! acknowledged, kept in a folder a person can open and read, and handed to deliverers in
//! per-key order until every sink has confirmed it.
//!
//! # Invariants
//!
//! - **Durable before acknowledged.** `stage` / `stage_batch` return only after the record's
//!   line is in its segment file and that file is `fdatasync`'d. The line carries the record's
//!   sequence number, so the folder alone orders it; the index entry follows in the same
//!   group, and is re-read from the folder after a crash.
//! - **Group commit.** One writer thread per process takes every request waiting, appends
//!   them, syncs each touched file once and answers them all. No request is answered before the
//!   flush that covers it.
//! - **Strictly increasing sequence numbers**, across processes: `_state/seq` is read and
//!   advanced under an exclusive file lock held until the group is indexed, so no deliverer
//!   sees a record before the records numbered below it.
//! - **Per-key order.** For each sink, a record is deliverable only with every earlier
//!   undelivered record of its (entity, key) in the same batch, before it: a batch carries runs
//!   of consecutive records of a key. Keyless records form one group per entity. A record in
//!   flight, in backoff or dead holds back the later records of its own group, and only those.
//! - **Nothing leaves the disk before every sink confirmed it** (plus `keep_delivered`).
//! - **A failed fsync poisons the store**: the kernel may have dropped the dirty pages, so
//!   every later stage fails with [`StageError::Poisoned`] until a restart re-reads the disk.
//!
//! # Layout on disk
//!
//! Every file and folder under the root. Names starting with `_` (and `.`) are reserved for
//! the store and the agent: [`validate_name`] refuses them as an action or entity, and the
//! walks over the day folders skip them, so they never clash with records.
//!
//! ```text
//! <root>/                                   0700, files 0600 (Unix)
//!   create/patient/2026/11/23/              <action>/<entity>/<yyyy>/<mm>/<dd> (UTC day)
//!     20261123T084106.123456Z-0000000000000001.jsonl   segment: <UTC start>-<first seq>
//!     20261123T091502.000310Z-0000000000004097.jsonl   (deleted once every sink confirmed
//!                                                        every record in it)
//!     20261123T093000.000000Z.json          a foreign file dropped in the seed layout (raw
//!                                           payload, no envelope): adopted, then removed
//!   delete/patient/2026/11/23/...
//!   _failed/                                dead letters (or FAILED_DIR elsewhere)
//!     create/patient/2026/11/23/20261123T084106.123456Z-0000000000000007-api.json
//!                                           one per record and sink: <staged>-<seq>-<sink>.json,
//!                                           removed by a requeue
//!     create/patient/2026/11/23/<name>.json + <name>.json.error.txt
//!                                           a foreign file that is not JSON, and why
//!     _damaged/                             bytes the store could not trust, with the reason:
//!       create_patient_2026_11_23_<segment>.jsonl.at-000000001234.json
//!                                           {"segment", "offset", "reason", "moved_at", "bytes"}
//!     _refused/<source>/<checkpoint>.json   a source row that could not become a record:
//!                                           {"source", "checkpoint", "reason", "refused_at", "row"}
//!   _state/                                 the store's own state; never edit it by hand
//!     index.sqlite3 (+ -wal, -shm)          the index: a cache of the folder + delivery state
//!     index.sqlite3.set-aside-<UTC stamp>   a damaged index moved aside by a rebuild, kept
//!                                           for a person to look at (delete at will)
//!     rebuild-index                         when present, the next open rebuilds the index
//!                                           (`estafeta reindex` does it at once); then removed
//!     seq                                   last sequence number handed out (and the lock)
//!     owners/<pid>-<uuid>.lock              one per process that opened the store, locked
//!                                           while it lives: leases of an unlocked owner are
//!                                           given back at once
//!     sealed-with                           ids of the keys that sealed data here (no key):
//!                                           open refuses, untouched, without them
//!     sources.json                          the SQL sources' checkpoints, kept outside the
//!                                           index so that a rebuild does not rewind a source
//!     source-notes/<source>.json            a page whose `after_stage` statement has not run
//!                                           yet (the agent's, opaque to the store)
//!   _update/                                the agent's updater, not the store
//!     state.json                            last check, available version, what happened
//!     download-*/                           an archive being downloaded (removed when stale)
//! ```
//!
//! Files are replaced atomically through `<name>.tmp` and a rename (`sources.json`, dead
//! letters); a leftover `.tmp` is a write that never finished.
//!
//! One line of a segment (a JSON object; `cat` shows the records):
//!
//! ```text
//! {"v":1,"id":"019ab1c2-…","seq":1,"action":"create","entity":"patient","key":"42",
//!  "staged_at":"2026-11-23T08:41:06.123456Z","sinks":["database"],
//!  "payload":{"nome":"Ana","cpf":"…"},"crc32":"1a2b3c4d"}
//! ```
//!
//! (one physical line; `client_key`, `client_fingerprint` and `client_records` appear when the
//! client sent an `Idempotency-Key`, `source` when a SQL source read the row; `crc32` covers
//! every byte of the line before `,"crc32"`.) `v` is the format version, [`FORMAT_VERSION`].
//!
//! With encryption at rest ([`Options::keys`], `STAGING_KEY_FILE`), a line keeps in clear only
//! what order and routing need, bound to the ciphertext as associated data; the key, the client
//! key and fingerprint, the source mark and the payload are sealed (AES-256-GCM) with the
//! segment's own data key, which is wrapped by key `kid` of the key file (see `crypt.rs`):
//!
//! ```text
//! {"v":1,"id":"019ab1c2-…","seq":1,"action":"create","entity":"patient",
//!  "staged_at":"2026-11-23T08:41:06.123456Z","sinks":["database"],
//!  "sealed":{"kid":"k-3f…","dk":"<wrapped data key>","n":"<nonce>","ct":"<ciphertext>"},
//!  "crc32":"1a2b3c4d"}
//! ```
//!
//! A sealed dead letter holds its record in the same form and its `reason` as a sealed text;
//! the index then holds keyed hashes of record and client keys, and sealed error texts.
//!
//! A dead letter ([`DeadLetterFile`]), one pretty-printed JSON object:
//!
//! ```text
//! {"sink": "api", "reason": "HTTP 422: …", "attempts": 3,
//!  "failed_at": "2026-11-23T09:00:00.000000Z",
//!  "segment": "create/patient/2026/11/23/20261123T084106.123456Z-0000000000000001.jsonl",
//!  "record": { the envelope, as in the segment line, without "crc32" }}
//! ```
//!
//! Read them back with [`Staging::read_file`] and [`Staging::dead_letter`]: the format version
//! is checked first, and a file written by a newer Estafeta (left behind by an update that was
//! rolled back) is refused with [`StoreError::NewerFormat`], never misread.
//!
//! # Why append-only segment files, not one file per record
//!
//! Measured on these machines with 1 KB records: one file per record, with the file and its
//! folder fsync'd, reaches about 2,500 records/s (4,700/s with 256 files per flush), while one
//! append-only file with one `fdatasync` per 256 records reaches about 127,000 records/s — and
//! creating many small files is slower still on Windows. A file per record would cap durable
//! ingest far below the goal (≥ 60,000/s), so records are appended as JSON Lines to a
//! segment per (action, entity, UTC day), which stays as readable as a file per record:
//! each line is one complete record with its envelope. A segment is closed at
//! [`DEFAULT_SEGMENT_MAX_BYTES`], on a new day, when its process exits, or once all of its
//! records are delivered; it is deleted when every sink has every record in it. Payloads
//! are stored as given, minus the whitespace between tokens (a line must be one line).
//!
//! The index is SQLite (WAL), not the store of record: the folder is the truth. The writer's
//! connection runs with `synchronous=NORMAL` because the segment fsync already made the record
//! durable; after a power cut, open re-reads each segment past the length the index knew.
//! Delivery state (acks, failures, dead letters, deletions) is written with
//! `synchronous=FULL`. The WAL is copied into the index file by a thread of its own
//! (wal_checkpointer.rs), so the writer's commits do not wait for a checkpoint's fsyncs.
//! A missing or corrupt index is set aside and rebuilt from the folder:
//! records come back pending (a resend is harmless: sinks are idempotent on the record id)
//! and dead letters come back dead.
//!
//! # Flow
//!
//! ```text
//! stage ──> writer: number, append, fdatasync, index ──> Receipt{id, seq, path}
//! next_batch(sink) ──> lease runs of each (entity, key), from its head ──> deliverer
//! settle(sink, Settlement), one transaction:
//!     delivered ──> done for that sink ──> cleanup deletes fully delivered segments
//!     retries(at) ──> pending again after backoff (holds back its key)
//!     dead(reason) ──> _failed/…json, holds back its key until requeue
//!     give_back ──> pending again, untouched (not attempted)
//! open ──> index check ──> recover tails / torn lines / cut files ──> ready
//! ```
//!
//! Several processes (the daemon and CLI commands) may open one store at once: segments are
//! per process and locked while written, sequence numbers come from the shared counter, and
//! deliverers take leases in SQLite transactions, so two never hold the same record.

mod adopt;
mod api_types;
mod checkpoints;
mod client_keys;
mod crypt;
mod data_keys;
mod dead;
mod error;
mod index;
mod key_protect;
mod layout;
mod leases;
mod record;
mod recover;
mod seal_group;
mod sealed_file;
mod sealed_folder;
mod segment;
mod status;
mod store;
mod wal_checkpointer;
mod writer;

pub use adopt::{Admission, Admit};
pub use api_types::*;
pub use crypt::{KeyError, Keyring};
pub use dead::DeadLetterFile;
pub use error::{StageError, StoreError};
/// The store's private modes (0700 folders, 0600 files), which the agent uses too for the other
/// files that hold patient data or its traces: the embedded SQLite database and the log folder.
pub use layout::{make_private, private_file};
pub use record::*;
pub use store::{Dead, REFUSED_DIR, RefusedRow, Retry, Settlement, Staging};

use std::time::Duration;

/// Default minimum free disk space: 256 MiB.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 256 * 1024 * 1024;
/// Default lease of a batch handed to a deliverer.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(300);
/// Default segment size before a new file is started: 16 MiB.
pub const DEFAULT_SEGMENT_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// Line codecs for the crate's own damage tests, which forge and read lines as a crashed
/// writer or a disk would leave them. Not an API.
#[doc(hidden)]
pub mod testing {
    use crate::{Envelope, Keyring};

    /// Encodes `env` as a segment line, sealed under a fresh data key when `keys` is given.
    pub fn encode_line(env: &Envelope, keys: Option<&Keyring>) -> Vec<u8> {
        match keys {
            Some(k) => crate::segment::encode_line(env, Some(&mut k.new_data_key())),
            None => crate::segment::encode_line(env, None),
        }
    }

    /// Decodes a segment line (without its newline).
    pub fn decode_line(line: &[u8], keys: Option<&Keyring>) -> Result<Envelope, String> {
        crate::segment::decode_line(line, keys).map_err(|e| e.to_string())
    }
}
