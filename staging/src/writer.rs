//! The writer: one thread per process that turns stage requests into durable records with
//! group commit. Requests queue on a channel; the writer takes every request waiting, appends
//! their lines to the segment files, makes each touched file durable with one fdatasync, indexes
//! them, and only then answers every caller in the group. Concurrent stagers share one flush;
//! no request is answered before its own flush.
//!
//! The work is pipelined over two groups: while a helper thread (`estafeta-staging-sync`)
//! fdatasyncs group N+1's lines, the writer indexes group N, whose lines are already durable.
//! The index never names a line before that line is on stable storage, groups are indexed in
//! sequence order, and a group is answered only after both its own fdatasync and its own index
//! commit. At most two groups are written and not yet indexed; if the older one fails, the
//! newer one (appended after it, perhaps to the same file) fails with it and both are cut.
//!
//! Across processes (the daemon and a CLI `stage`), sequence numbers come from `_state/seq`,
//! read and advanced under an exclusive file lock that is held while any group is written and
//! not yet indexed, so a record is never visible to a deliverer before the records numbered
//! below it. Under sustained load the lock is given up at least every [`LOCK_SLICE`], so that
//! another process waiting to stage gets its turn.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, TransactionBehavior, params};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};

use std::time::{Duration, Instant};

use crate::error::StageError;
use crate::layout;
use crate::record::{ClientKey, Envelope, FORMAT_VERSION, Receipt, SourceMark, Staged};
use crate::segment;
use crate::store::Shared;

/// Most records one group commit takes before flushing.
const MAX_GROUP_RECORDS: usize = 4096;
/// A segment idle this long with every record delivered is closed so cleanup can delete it.
const DRAINED_IDLE: Duration = Duration::from_secs(1);
/// Longest the writer keeps the cross-process sequence lock while groups keep coming.
const LOCK_SLICE: Duration = Duration::from_millis(50);

/// A record validated by the caller's thread, ready to be numbered and written.
pub struct Prepared {
    pub action: String,
    pub entity: String,
    pub key: Option<String>,
    pub payload: Box<serde_json::value::RawValue>,
    pub sinks: Vec<String>,
}

/// Where the writer sends a stage request's answer once its records are on stable storage (or
/// failed): a blocking caller's channel, or an async caller's wake-up. It runs on the writer
/// thread, so it must only hand the answer over, never block.
pub struct Reply(Box<dyn FnOnce(Result<Staged, StageError>) + Send>);

impl Reply {
    pub fn new(deliver: impl FnOnce(Result<Staged, StageError>) + Send + 'static) -> Self {
        Self(Box::new(deliver))
    }

    pub fn send(self, answer: Result<Staged, StageError>) {
        (self.0)(answer)
    }
}

pub struct StageRequest {
    pub records: Vec<Prepared>,
    pub client_key: Option<ClientKey>,
    /// A source's checkpoint, advanced in the same commit as these records.
    pub source: Option<SourceMark>,
    pub reply: Reply,
}

pub enum Message {
    /// Boxed: the queue allocates all its slots up front (16,384 of them), so a slot must be
    /// small; an unboxed request made the empty queue cost 2.3 MB of an idle agent's memory.
    Stage(Box<StageRequest>),
    /// Close active segments whose records are all delivered (cleanup asks before deleting).
    SealDrained(SyncSender<()>),
}

struct ActiveSegment {
    /// Shared with the sync thread, which fdatasyncs it while the writer goes on.
    file: Arc<File>,
    path: PathBuf,
    id: i64,
    /// Bytes written, including lines of groups not yet indexed.
    len: u64,
    day: (i32, u32, u32),
    last_write: Instant,
}

/// What one group appended to one segment file.
struct Extent {
    file: Arc<File>,
    path: PathBuf,
    id: i64,
    /// The file's length before the group: where a failed group is cut back to.
    before: u64,
    /// Its length after the group: the segment's `indexed_len` once the group is indexed.
    after: u64,
}

/// A request whose records were numbered and written.
struct Accepted {
    reply: Reply,
    envelopes: Vec<Envelope>,
    /// Per record: segment id, offset, length; and the segment's path, for the receipt.
    places: Vec<(i64, u64, u64)>,
    paths: Vec<PathBuf>,
    client_key: Option<ClientKey>,
}

/// A group whose lines are written and being made durable, not yet indexed nor answered.
struct InFlight {
    accepted: Vec<Accepted>,
    /// Requests repeating an `Idempotency-Key` of this group with the same body: they get the
    /// same receipts once the group is indexed (index in `accepted`).
    replays: Vec<(Reply, usize)>,
    /// The same for keys of the group in flight before this one, answered when it is indexed.
    replays_of_older: Vec<(Reply, usize)>,
    /// `Idempotency-Key` → (fingerprint, index in `accepted`).
    client_keys: HashMap<String, (String, usize)>,
    extents: Vec<Extent>,
    /// Segments rotated away by this group: sealed in its index commit (not earlier: the
    /// group before may still have unindexed lines in them, which cleanup must not delete).
    retired: Vec<ActiveSegment>,
    last_seq: u64,
    bytes: u64,
    now: DateTime<Utc>,
    synced: Receiver<Result<(), StageError>>,
}

/// Files for the sync thread to fdatasync; the answer goes back on `done`.
struct SyncJob {
    files: Vec<(Arc<File>, PathBuf)>,
    done: SyncSender<Result<(), StageError>>,
}

pub struct Writer {
    shared: Arc<Shared>,
    conn: Connection,
    seq_file: File,
    active: HashMap<(String, String), ActiveSegment>,
    /// When the writer took the sequence lock it still holds (`None`: not held).
    locked_since: Option<Instant>,
    /// The last sequence number handed out while the lock is held.
    last_seq: u64,
}

/// Opens `_state/seq`, the cross-process sequence counter and lock.
pub fn open_seq_file(state_dir: &Path) -> std::io::Result<File> {
    layout::private_file()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(state_dir.join("seq"))
}

/// Reads the last sequence number handed out (0 for a new store).
pub fn read_seq(f: &mut File) -> std::io::Result<u64> {
    let mut s = String::new();
    f.seek(SeekFrom::Start(0))?;
    f.read_to_string(&mut s)?;
    Ok(s.trim().parse().unwrap_or(0))
}

/// Writes the last sequence number handed out. Not fsync'd: after a power cut the store
/// recomputes it from the segments and the index on open.
pub fn write_seq(f: &mut File, seq: u64) -> std::io::Result<()> {
    f.seek(SeekFrom::Start(0))?;
    f.write_all(format!("{seq:020}\n").as_bytes())
}

impl Writer {
    pub fn new(shared: Arc<Shared>, conn: Connection, seq_file: File) -> Self {
        Self {
            shared,
            conn,
            seq_file,
            active: HashMap::new(),
            locked_since: None,
            last_seq: 0,
        }
    }

    pub fn run(mut self, rx: Receiver<Message>) {
        let (jobs, job_rx) = mpsc::sync_channel::<SyncJob>(2);
        let shared = self.shared.clone();
        std::thread::scope(|scope| {
            let syncer = std::thread::Builder::new()
                .name("estafeta-staging-sync".into())
                .spawn_scoped(scope, move || sync_files(&shared, job_rx));
            if let Err(err) = syncer {
                let reason = format!("cannot start the staging sync thread: {err}");
                tracing::error!("{reason}");
                self.shared.poison(reason);
            }
            self.pipeline(&rx, &jobs);
            // Dropping `jobs` ends the sync thread; the scope waits for it.
            drop(jobs);
        });
    }

    fn pipeline(&mut self, rx: &Receiver<Message>, jobs: &SyncSender<SyncJob>) {
        let mut in_flight: Option<InFlight> = None;
        loop {
            let first = if in_flight.is_some() {
                match rx.try_recv() {
                    Ok(msg) => msg,
                    Err(err) => {
                        // Nothing more to overlap with: finish the group in flight.
                        self.finish(in_flight.take().expect("checked"), None);
                        self.unlock();
                        if err == TryRecvError::Disconnected {
                            return;
                        }
                        continue;
                    }
                }
            } else {
                // Never wait for work while holding the lock another process may need.
                self.unlock();
                match rx.recv() {
                    Ok(msg) => msg,
                    Err(_) => return,
                }
            };
            let mut group = Vec::new();
            let mut seal_waiters = Vec::new();
            let mut count = 0;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Message::Stage(req) => {
                        count += req.records.len();
                        group.push(*req);
                    }
                    Message::SealDrained(reply) => seal_waiters.push(reply),
                }
                if count < MAX_GROUP_RECORDS {
                    next = rx.try_recv().ok();
                }
            }
            if !group.is_empty() {
                let newer = self.begin_group(group, in_flight.as_ref(), jobs);
                in_flight = match in_flight.take() {
                    Some(older) => {
                        let mut newer = newer;
                        // When the older group fails, `finish` fails and empties `newer` too.
                        self.finish(older, newer.as_mut());
                        newer.filter(|n| !n.accepted.is_empty())
                    }
                    None => newer,
                };
            }
            let slice_over = self
                .locked_since
                .is_some_and(|since| since.elapsed() >= LOCK_SLICE);
            if !seal_waiters.is_empty() || slice_over {
                if let Some(group) = in_flight.take() {
                    self.finish(group, None);
                }
                self.unlock();
            }
            if !seal_waiters.is_empty() {
                if let Err(err) = self.seal_drained() {
                    tracing::warn!(error = %err, "Could not close drained segment files; will retry at the next cleanup.");
                }
                for w in seal_waiters {
                    let _ = w.send(());
                }
            }
        }
    }

    fn unlock(&mut self) {
        if self.locked_since.take().is_some() {
            let _ = self.seq_file.unlock();
        }
    }

    /// Numbers the group's accepted records, appends their lines and hands the touched files
    /// to the sync thread. Requests that need no write (refused, or replayed from the index)
    /// are answered at once. Returns the group in flight, if anything was written.
    fn begin_group(
        &mut self,
        group: Vec<StageRequest>,
        older: Option<&InFlight>,
        jobs: &SyncSender<SyncJob>,
    ) -> Option<InFlight> {
        if let Some(reason) = self.shared.poisoned() {
            for req in group {
                req.reply.send(Err(StageError::Poisoned(reason.clone())));
            }
            return None;
        }
        if self.locked_since.is_none() {
            let locked = self
                .seq_file
                .lock()
                .and_then(|()| read_seq(&mut self.seq_file));
            match locked {
                Ok(seq) => {
                    self.last_seq = seq;
                    self.locked_since = Some(Instant::now());
                }
                Err(err) => {
                    let _ = self.seq_file.unlock();
                    let err = StageError::Io {
                        path: self.shared.state_dir.join("seq"),
                        source: err,
                    };
                    reply_all(group, &err);
                    return None;
                }
            }
        }
        match self.write_group(group, older, jobs) {
            Ok(in_flight) => in_flight,
            Err((err, replies)) => {
                self.fail_with(&err, replies);
                None
            }
        }
    }

    /// Poisons the store and answers every reply with why.
    fn fail_with(&self, err: &StageError, replies: Vec<Reply>) {
        // Nothing of the group was acknowledged; the store stops accepting writes.
        let reason = err.to_string();
        tracing::error!(error = %reason, "Staging write failed; refusing further writes until restart.");
        self.shared.poison(reason.clone());
        for reply in replies {
            reply.send(Err(StageError::Poisoned(reason.clone())));
        }
    }

    #[allow(clippy::type_complexity)]
    fn write_group(
        &mut self,
        group: Vec<StageRequest>,
        older: Option<&InFlight>,
        jobs: &SyncSender<SyncJob>,
    ) -> Result<Option<InFlight>, (StageError, Vec<Reply>)> {
        let now = Utc::now();
        let staged_at = layout::rfc3339(now);
        let Writer {
            shared,
            conn,
            active,
            last_seq,
            ..
        } = self;
        let root = shared.root.clone();
        let mut seq = *last_seq;

        // Bytes written but not indexed yet count against the limit too.
        let staged_bytes: u64 = conn
            .query_row(
                "SELECT COALESCE(SUM(indexed_len), 0) FROM segments WHERE deleting = 0",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap_or(0) as u64
            + older.map_or(0, |o| o.bytes);
        let free = fs4::available_space(&root).ok();

        // Phase 1: decide each request, number the accepted ones and encode their lines.
        let mut accepted: Vec<Accepted> = Vec::new();
        let mut lines: Vec<Vec<Vec<u8>>> = Vec::new();
        let mut group_bytes = 0u64;
        let mut client_keys: HashMap<String, (String, usize)> = HashMap::new();
        let mut replays: Vec<(Reply, usize)> = Vec::new();
        let mut replays_of_older: Vec<(Reply, usize)> = Vec::new();
        let mut refused_full = false;
        for req in group {
            if let Some(ck) = &req.client_key {
                // Answered at once: a replay from the index, or a conflict. A key of the
                // group in flight is not in the index yet: it is looked up in that group.
                let earlier = match lookup_client_key(conn, &ck.key) {
                    Ok(Some((fp, receipts))) => Some((fp, Some(receipts))),
                    Ok(None) => older
                        .and_then(|o| o.client_keys.get(&ck.key))
                        .map(|(fp, _)| (fp.clone(), None)),
                    Err(e) => {
                        req.reply.send(Err(StageError::Store(e.into())));
                        continue;
                    }
                };
                match earlier {
                    Some((fp, _)) if fp != ck.fingerprint => {
                        req.reply.send(Err(StageError::Conflict(ck.key.clone())));
                        continue;
                    }
                    Some((_, Some(receipts))) => {
                        req.reply.send(Ok(Staged::Replayed(receipts)));
                        continue;
                    }
                    Some((_, None)) => {
                        // The same request as one of the group in flight: answered with its
                        // receipts once that group is indexed.
                        if let Some((_, idx)) = older.and_then(|o| o.client_keys.get(&ck.key)) {
                            replays_of_older.push((req.reply, *idx));
                        }
                        continue;
                    }
                    None => {}
                }
                if let Some((fp, idx)) = client_keys.get(&ck.key) {
                    if *fp == ck.fingerprint {
                        replays.push((req.reply, *idx));
                    } else {
                        req.reply.send(Err(StageError::Conflict(ck.key.clone())));
                    }
                    continue;
                }
            }
            let estimate: u64 = req
                .records
                .iter()
                .map(|r| r.payload.get().len() as u64 + 320)
                .sum();
            if let Some(max) = shared.opts.max_bytes
                && staged_bytes + group_bytes + estimate > max
            {
                let reason = format!(
                    "the staging size limit of {max} bytes is reached ({} bytes staged)",
                    staged_bytes + group_bytes
                );
                shared.set_blocked(Some(reason.clone()));
                refused_full = true;
                req.reply.send(Err(StageError::Full(reason)));
                continue;
            }
            if let Some(free) = free
                && free < shared.opts.min_free_bytes + group_bytes + estimate
            {
                let reason = format!(
                    "only {free} bytes are free on the disk of {} and at least {} must stay free",
                    root.display(),
                    shared.opts.min_free_bytes
                );
                shared.set_blocked(Some(reason.clone()));
                refused_full = true;
                req.reply.send(Err(StageError::Full(reason)));
                continue;
            }
            let mut envelopes = Vec::with_capacity(req.records.len());
            let mut encoded = Vec::with_capacity(req.records.len());
            let count = req.records.len();
            let mut source = req.source;
            for (i, rec) in req.records.into_iter().enumerate() {
                seq += 1;
                let env = Envelope {
                    v: FORMAT_VERSION,
                    id: uuid::Uuid::now_v7().to_string(),
                    seq,
                    action: rec.action,
                    entity: rec.entity,
                    key: rec.key,
                    staged_at: staged_at.clone(),
                    client_key: req.client_key.as_ref().map(|c| c.key.clone()),
                    client_fingerprint: req.client_key.as_ref().map(|c| c.fingerprint.clone()),
                    sinks: rec.sinks,
                    source: if i + 1 == count { source.take() } else { None },
                    payload: rec.payload,
                };
                let line = segment::encode_line(&env);
                group_bytes += line.len() as u64;
                encoded.push(line);
                envelopes.push(env);
            }
            if let Some(ck) = &req.client_key {
                client_keys.insert(ck.key.clone(), (ck.fingerprint.clone(), accepted.len()));
            }
            accepted.push(Accepted {
                reply: req.reply,
                envelopes,
                places: Vec::new(),
                paths: Vec::new(),
                client_key: req.client_key,
            });
            lines.push(encoded);
        }
        if !refused_full {
            shared.set_blocked(None);
        }
        if accepted.is_empty() && replays_of_older.is_empty() {
            return Ok(None);
        }

        // Phase 2: place every line in its segment, in sequence order per segment.
        let mut order: Vec<(String, String)> = Vec::new();
        let mut extents: HashMap<(String, String), Extent> = HashMap::new();
        let mut retired: Vec<ActiveSegment> = Vec::new();
        let mut buffers: HashMap<(String, String), Vec<u8>> = HashMap::new();
        let mut placing: Result<(), StageError> = Ok(());
        'place: for (acc, encoded) in accepted.iter_mut().zip(&lines) {
            acc.places.reserve(encoded.len());
            for (env, line) in acc.envelopes.iter().zip(encoded) {
                let k = (env.action.clone(), env.entity.clone());
                if !extents.contains_key(&k) {
                    match segment_for(shared, active, conn, &k, now, env.seq) {
                        Ok(old) => retired.extend(old),
                        Err(e) => {
                            placing = Err(e);
                            break 'place;
                        }
                    }
                    let seg = &active[&k];
                    extents.insert(
                        k.clone(),
                        Extent {
                            file: seg.file.clone(),
                            path: seg.path.clone(),
                            id: seg.id,
                            before: seg.len,
                            after: seg.len,
                        },
                    );
                    order.push(k.clone());
                }
                let extent = extents.get_mut(&k).expect("inserted above");
                let buf = buffers.entry(k).or_default();
                let offset = extent.before + buf.len() as u64;
                buf.extend_from_slice(line);
                acc.places.push((extent.id, offset, line.len() as u64));
                acc.paths.push(extent.path.clone());
            }
        }
        let mut extents: Vec<Extent> = order
            .iter()
            .map(|k| extents.remove(k).expect("one extent per key"))
            .collect();
        // Phase 3: write each touched segment once; the sync thread makes them durable.
        if placing.is_ok() {
            for (k, extent) in order.iter().zip(extents.iter_mut()) {
                let buf = &buffers[k];
                if let Err(source) = (&*extent.file).write_all(buf) {
                    // Cut back what this group wrote so far (a partial write may be there).
                    extent.after = extent.before + buf.len() as u64;
                    placing = Err(StageError::Io {
                        path: extent.path.clone(),
                        source,
                    });
                    break;
                }
                extent.after = extent.before + buf.len() as u64;
                let seg = active.get_mut(k).expect("touched segments are active");
                seg.len = extent.after;
                seg.last_write = Instant::now();
            }
        }
        if let Err(err) = placing {
            cut_back(active, &extents);
            let mut replies: Vec<Reply> = accepted.into_iter().map(|a| a.reply).collect();
            replies.extend(replays.into_iter().map(|(r, _)| r));
            replies.extend(replays_of_older.into_iter().map(|(r, _)| r));
            return Err((err, replies));
        }
        let (done, synced) = mpsc::sync_channel(1);
        let job = SyncJob {
            files: extents
                .iter()
                .map(|e| (e.file.clone(), e.path.clone()))
                .collect(),
            done,
        };
        if jobs.send(job).is_err() {
            cut_back(active, &extents);
            let mut replies: Vec<Reply> = accepted.into_iter().map(|a| a.reply).collect();
            replies.extend(replays.into_iter().map(|(r, _)| r));
            replies.extend(replays_of_older.into_iter().map(|(r, _)| r));
            return Err((
                StageError::Io {
                    path: root,
                    source: std::io::Error::other("the staging sync thread is not running"),
                },
                replies,
            ));
        }
        *last_seq = seq;
        Ok(Some(InFlight {
            accepted,
            replays,
            replays_of_older,
            client_keys,
            extents,
            retired,
            last_seq: seq,
            bytes: group_bytes,
            now,
            synced,
        }))
    }

    /// Waits for the group's lines to be durable, indexes them, commits and answers. When it
    /// fails, `newer` (written after it) is failed and cut back too, and emptied.
    fn finish(&mut self, mut group: InFlight, newer: Option<&mut InFlight>) {
        let synced = group.synced.recv().unwrap_or_else(|_| {
            Err(StageError::Io {
                path: self.shared.root.clone(),
                source: std::io::Error::other("the staging sync thread stopped"),
            })
        });
        let result = synced.and_then(|()| {
            self.index_group(&group)
                .map_err(|e| StageError::Store(e.into()))
        });
        match result {
            Ok(()) => {
                if let Err(e) = write_seq(&mut self.seq_file, group.last_seq) {
                    // The records are durable and indexed; the counter is rebuilt on open.
                    tracing::warn!(error = %e, "Could not update the sequence counter file.");
                }
                let receipts: Vec<Vec<Receipt>> =
                    group.accepted.iter().map(Accepted::receipts).collect();
                if let Some(newer) = newer {
                    // Requests of the newer group that repeat one of this group's keys.
                    for (reply, idx) in newer.replays_of_older.drain(..) {
                        reply.send(Ok(Staged::Replayed(receipts[idx].clone())));
                    }
                }
                for (reply, idx) in group.replays.drain(..) {
                    reply.send(Ok(Staged::Replayed(receipts[idx].clone())));
                }
                for (acc, receipts) in group.accepted.drain(..).zip(receipts) {
                    acc.reply.send(Ok(Staged::New(receipts)));
                }
                // Sealed in the index: the rotated-away files can be closed now.
                group.retired.clear();
            }
            Err(err) => {
                // Cut the newer group first (its lines come after), then this one: each file
                // ends where it was before this group.
                let mut replies = Vec::new();
                if let Some(newer) = newer {
                    let _ = newer.synced.recv();
                    cut_back(&mut self.active, &newer.extents);
                    replies.extend(newer.accepted.drain(..).map(|a| a.reply));
                    replies.extend(newer.replays.drain(..).map(|(r, _)| r));
                    replies.extend(newer.replays_of_older.drain(..).map(|(r, _)| r));
                }
                cut_back(&mut self.active, &group.extents);
                replies.extend(group.accepted.drain(..).map(|a| a.reply));
                replies.extend(group.replays.drain(..).map(|(r, _)| r));
                self.fail_with(&err, replies);
            }
        }
    }

    /// Indexes a durable group and commits: its records, its clients' keys, the segments'
    /// indexed lengths and the seals of segments it rotated away.
    fn index_group(&mut self, group: &InFlight) -> rusqlite::Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        #[cfg(feature = "fault-injection")]
        if self
            .shared
            .fail_next_index
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                Some("injected: database or disk is full".into()),
            ));
        }
        for acc in &group.accepted {
            for (env, (seg_id, offset, len)) in acc.envelopes.iter().zip(&acc.places) {
                crate::index::insert_record(&tx, env, *seg_id, *offset, *len)?;
            }
            if let Some(ck) = &acc.client_key {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO client_keys (key, fingerprint, receipts, created_at) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![
                    ck.key,
                    ck.fingerprint,
                    serde_json::to_string(&acc.receipts()).expect("receipts serialize"),
                    group.now.timestamp()
                ])?;
            }
        }
        for extent in &group.extents {
            tx.prepare_cached(
                "UPDATE segments SET indexed_len = MAX(indexed_len, ?1) WHERE id = ?2",
            )?
            .execute(params![extent.after as i64, extent.id])?;
        }
        for seg in &group.retired {
            tx.prepare_cached("UPDATE segments SET sealed = 1 WHERE id = ?1")?
                .execute([seg.id])?;
        }
        tx.commit()
    }
}

impl Accepted {
    fn receipts(&self) -> Vec<Receipt> {
        self.envelopes
            .iter()
            .zip(&self.paths)
            .map(|(env, path)| Receipt {
                id: env.id.clone(),
                seq: env.seq,
                path: path.clone(),
            })
            .collect()
    }
}

/// The sync thread: fdatasyncs each job's files and answers.
fn sync_files(shared: &Shared, jobs: Receiver<SyncJob>) {
    for job in jobs {
        let mut result = Ok(());
        for (file, path) in &job.files {
            if let Err(source) = sync_data(file, shared) {
                result = Err(StageError::Io {
                    path: path.clone(),
                    source,
                });
                break;
            }
        }
        let _ = job.done.send(result);
    }
}

/// Cuts what a failed group appended to each segment file, and syncs the cut, so that no
/// record whose sender is answered with an error is left behind to be recovered at the next
/// start. Truncating needs no free space, so this works on a full disk too.
fn cut_back(active: &mut HashMap<(String, String), ActiveSegment>, extents: &[Extent]) {
    for extent in extents {
        let cut = extent
            .file
            .set_len(extent.before)
            .and_then(|()| extent.file.sync_data());
        if let Err(e) = cut {
            tracing::error!(path = %extent.path.display(), error = %e, "Could not cut the unacknowledged end of a segment; a restart may deliver records whose senders were told they failed (their Idempotency-Key, if any, still identifies them).");
        }
        if let Some(seg) = active.values_mut().find(|seg| seg.id == extent.id) {
            seg.len = extent.before;
        }
    }
}

/// Makes sure (action, entity) has an active segment, rotating it when full or on a new UTC
/// day. Returns the segment rotated away, for the caller to seal once every line in it is
/// indexed.
fn segment_for(
    shared: &Shared,
    active: &mut HashMap<(String, String), ActiveSegment>,
    conn: &Connection,
    k: &(String, String),
    now: DateTime<Utc>,
    first_seq: u64,
) -> Result<Option<ActiveSegment>, StageError> {
    use chrono::Datelike;
    let day = (now.year(), now.month(), now.day());
    let mut retired = None;
    if let Some(seg) = active.get(k) {
        if seg.day == day && seg.len < shared.opts.segment_max_bytes {
            return Ok(None);
        }
        retired = active.remove(k);
    }
    let created = create_segment(shared, conn, k, now, first_seq, day);
    match created {
        Ok(seg) => {
            active.insert(k.clone(), seg);
            Ok(retired)
        }
        Err(err) => {
            // Keep appending to the old one rather than lose track of it.
            if let Some(old) = retired {
                active.insert(k.clone(), old);
            }
            Err(err)
        }
    }
}

/// Creates, locks and registers a new segment file for (action, entity).
fn create_segment(
    shared: &Shared,
    conn: &Connection,
    k: &(String, String),
    now: DateTime<Utc>,
    first_seq: u64,
    day: (i32, u32, u32),
) -> Result<ActiveSegment, StageError> {
    let dir = shared.root.join(layout::day_dir(&k.0, &k.1, now));
    let path = dir.join(layout::segment_file_name(now, first_seq));
    let io = |source| StageError::Io {
        path: path.clone(),
        source,
    };
    // Cleanup (of this or another process) removes a day folder, and its parents, as soon as
    // its last segment is deleted, and may do so between our creating the folder and the
    // file in it: then both are created again. Failing instead would stop staging.
    let mut attempts = 0;
    let file = loop {
        let created = layout::create_dir_durable(&dir).and_then(|()| {
            layout::private_file()
                .append(true)
                .create_new(true)
                .open(&path)
        });
        match created {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 20 => attempts += 1,
            other => break other.map_err(io)?,
        }
    };
    // Held while this process appends: other processes leave a locked segment alone.
    file.try_lock().map_err(|e| {
        io(std::io::Error::other(format!(
            "cannot lock a new segment file: {e}"
        )))
    })?;
    layout::sync_dir(&dir).map_err(io)?;
    let rel = layout::rel_string(&shared.root, &path);
    conn.execute(
        "INSERT INTO segments (path, indexed_len, sealed) VALUES (?1, 0, 0)",
        [&rel],
    )
    .map_err(|e| StageError::Store(e.into()))?;
    let id = conn.last_insert_rowid();
    Ok(ActiveSegment {
        file: Arc::new(file),
        path,
        id,
        len: 0,
        day,
        last_write: Instant::now(),
    })
}

impl Writer {
    fn seal_drained(&mut self) -> rusqlite::Result<()> {
        let mut drained = Vec::new();
        for (k, seg) in &self.active {
            if seg.last_write.elapsed() < DRAINED_IDLE {
                continue;
            }
            let open: i64 = self.conn.query_row(
                "SELECT COUNT(*) FROM records WHERE segment_id = ?1 AND open_sinks > 0",
                [seg.id],
                |r| r.get(0),
            )?;
            if open == 0 {
                drained.push(k.clone());
            }
        }
        for k in drained {
            let seg = self.active.remove(&k).expect("listed above");
            self.conn
                .execute("UPDATE segments SET sealed = 1 WHERE id = ?1", [seg.id])?;
        }
        Ok(())
    }
}

/// `fdatasync`, or the injected failure of the `fault-injection` feature.
fn sync_data(file: &File, shared: &Shared) -> std::io::Result<()> {
    #[cfg(feature = "fault-injection")]
    if shared
        .fail_next_sync
        .swap(false, std::sync::atomic::Ordering::SeqCst)
    {
        return Err(std::io::Error::other("injected fdatasync failure"));
    }
    let _ = shared;
    file.sync_data()
}

fn lookup_client_key(
    conn: &Connection,
    key: &str,
) -> rusqlite::Result<Option<(String, Vec<Receipt>)>> {
    use rusqlite::OptionalExtension;
    let row: Option<(String, String)> = conn
        .query_row(
            "SELECT fingerprint, receipts FROM client_keys WHERE key = ?1",
            [key],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(row.map(|(fp, receipts)| (fp, serde_json::from_str(&receipts).unwrap_or_default())))
}

fn reply_all(group: Vec<StageRequest>, err: &StageError) {
    for req in group {
        req.reply.send(Err(StageError::Io {
            path: PathBuf::from("_state/seq"),
            source: std::io::Error::other(err.to_string()),
        }));
    }
}
