//! The writer: one thread per process that turns stage requests into durable records with
//! group commit. Requests queue on a channel; the writer takes every request waiting, places
//! their lines after the last of their segment files and indexes them in a transaction (with
//! encryption on, other threads seal the lines meanwhile: see seal_group.rs), appends them,
//! makes each touched file durable with one fdatasync, commits the index, and only then answers
//! every caller in the group. The index never commits a line before the line is durable.
//! Concurrent stagers share one flush; no request is answered before its own flush.
//!
//! Across processes (the daemon and a CLI `stage`), sequence numbers come from `_state/seq`,
//! read and advanced under an exclusive file lock that is held until the group is indexed, so
//! a record is never visible to a deliverer before the records numbered below it.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, TransactionBehavior, params};
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender};

use std::time::Instant;

use crate::crypt::DataKey;
use crate::error::StageError;
use crate::layout;
use crate::record::{ClientKey, Envelope, FORMAT_VERSION, Receipt, SourceMark, Staged};
use crate::seal_group::{SealJob, SealingGroup};
use crate::segment;
use crate::store::Shared;
use crate::wal_checkpointer::Nudge;

/// Most records one group commit takes before flushing.
const MAX_GROUP_RECORDS: usize = 4096;
/// A segment idle this long with every record delivered is closed so cleanup can delete it.
const DRAINED_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

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
    file: File,
    path: PathBuf,
    id: i64,
    len: u64,
    day: (i32, u32, u32),
    last_write: Instant,
    /// The segment's own data key when the store seals (crypt.rs); dies with the segment.
    dk: Option<crate::crypt::DataKey>,
}

pub struct Writer {
    shared: Arc<Shared>,
    conn: Connection,
    seq_file: File,
    active: HashMap<(String, String), ActiveSegment>,
    checkpointer: Nudge,
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
    /// `checkpointer`: the nudge of the thread that checkpoints the index's WAL (see
    /// wal_checkpointer.rs), whose start set this connection's own automatic checkpoint to the
    /// safety net.
    pub fn new(shared: Arc<Shared>, conn: Connection, seq_file: File, checkpointer: Nudge) -> Self {
        Self {
            shared,
            conn,
            seq_file,
            active: HashMap::new(),
            checkpointer,
        }
    }

    pub fn run(mut self, rx: Receiver<Message>) {
        while let Ok(first) = rx.recv() {
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
                self.commit_group(group);
                self.checkpointer.wal_grew();
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

    fn commit_group(&mut self, group: Vec<StageRequest>) {
        if let Some(reason) = self.shared.poisoned() {
            for req in group {
                req.reply.send(Err(StageError::Poisoned(reason.clone())));
            }
            return;
        }
        if let Err(err) = self.seq_file.lock() {
            let err = StageError::Io {
                path: self.shared.state_dir.join("seq"),
                source: err,
            };
            reply_all(group, &err);
            return;
        }
        let result = self.commit_locked(group);
        let _ = self.seq_file.unlock();
        // Answer only now: every record of the group is durable and indexed.
        for (reply, answer) in result {
            reply.send(answer);
        }
    }

    /// Numbers, writes, syncs and indexes the group; returns each request's answer.
    #[allow(clippy::type_complexity)]
    fn commit_locked(
        &mut self,
        group: Vec<StageRequest>,
    ) -> Vec<(Reply, Result<Staged, StageError>)> {
        let mut answers = Vec::with_capacity(group.len());
        match self.try_commit(group, &mut answers) {
            Ok(()) => answers,
            Err((err, pending)) => {
                // Nothing of the group was acknowledged; the store stops accepting writes.
                let reason = err.to_string();
                tracing::error!(error = %reason, "Staging write failed; refusing further writes until restart.");
                self.shared.poison(reason.clone());
                let mut out: Vec<_> = answers;
                for reply in pending {
                    out.push((reply, Err(StageError::Poisoned(reason.clone()))));
                }
                out
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn try_commit(
        &mut self,
        group: Vec<StageRequest>,
        answers: &mut Vec<(Reply, Result<Staged, StageError>)>,
    ) -> Result<(), (StageError, Vec<Reply>)> {
        let now = Utc::now();
        let staged_at = layout::rfc3339(now);
        let Writer {
            shared,
            conn,
            seq_file,
            active,
            ..
        } = self;
        let root = shared.root.clone();

        let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => {
                let pending = group.into_iter().map(|r| r.reply).collect();
                return Err((StageError::Store(e.into()), pending));
            }
        };

        let mut last_seq = match read_seq(seq_file) {
            Ok(s) => s,
            Err(e) => {
                let pending = group.into_iter().map(|r| r.reply).collect();
                return Err((
                    StageError::Io {
                        path: shared.state_dir.join("seq"),
                        source: e,
                    },
                    pending,
                ));
            }
        };
        let staged_bytes: u64 = tx
            .query_row(
                "SELECT COALESCE(SUM(indexed_len), 0) FROM segments WHERE deleting = 0",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap_or(0) as u64;
        let free = fs4::available_space(&root).ok();

        let sealing = shared.opts.keys.is_some();
        // Phase 1: decide each request, number the accepted ones and encode their lines.
        struct Accepted {
            reply: Reply,
            envelopes: Vec<Envelope>,
            lines: Vec<Vec<u8>>,
            client_key: Option<ClientKey>,
        }
        let mut accepted: Vec<Accepted> = Vec::new();
        let mut group_bytes = 0u64;
        let mut keys_in_group: HashMap<String, (String, usize)> = HashMap::new();
        let mut replays: Vec<(Reply, usize)> = Vec::new();
        for req in group {
            if let Some(ck) = &req.client_key {
                match crate::client_keys::lookup(&tx, &shared.index_text(&ck.key)) {
                    Ok(Some((fp, receipts))) => {
                        let answer = if fp == shared.index_text(&ck.fingerprint) {
                            Ok(Staged::Replayed(receipts))
                        } else {
                            Err(StageError::Conflict(ck.key.clone()))
                        };
                        answers.push((req.reply, answer));
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        answers.push((req.reply, Err(StageError::Store(e.into()))));
                        continue;
                    }
                }
                if let Some((fp, idx)) = keys_in_group.get(&ck.key) {
                    if *fp == ck.fingerprint {
                        replays.push((req.reply, *idx));
                    } else {
                        answers.push((req.reply, Err(StageError::Conflict(ck.key.clone()))));
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
                answers.push((req.reply, Err(StageError::Full(reason))));
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
                answers.push((req.reply, Err(StageError::Full(reason))));
                continue;
            }
            let mut envelopes = Vec::with_capacity(req.records.len());
            let mut lines = Vec::with_capacity(req.records.len());
            let count = req.records.len();
            let mut source = req.source;
            for (i, rec) in req.records.into_iter().enumerate() {
                last_seq += 1;
                let env = Envelope {
                    v: FORMAT_VERSION,
                    id: uuid::Uuid::now_v7().to_string(),
                    seq: last_seq,
                    action: rec.action,
                    entity: rec.entity,
                    key: rec.key,
                    staged_at: staged_at.clone(),
                    client_key: req.client_key.as_ref().map(|c| c.key.clone()),
                    client_fingerprint: req.client_key.as_ref().map(|c| c.fingerprint.clone()),
                    client_records: req.client_key.as_ref().map(|_| count as u32),
                    sinks: rec.sinks,
                    source: if i + 1 == count { source.take() } else { None },
                    payload: rec.payload,
                };
                // Sealed lines are encoded in phase 2, with their segment's data key.
                let line = if sealing {
                    Vec::new()
                } else {
                    segment::encode_line(&env, None)
                };
                group_bytes += if sealing {
                    env.payload.get().len() as u64 + 400
                } else {
                    line.len() as u64
                };
                lines.push(line);
                envelopes.push(env);
            }
            if let Some(ck) = &req.client_key {
                keys_in_group.insert(ck.key.clone(), (ck.fingerprint.clone(), accepted.len()));
            }
            accepted.push(Accepted {
                reply: req.reply,
                envelopes,
                lines,
                client_key: req.client_key,
            });
        }
        if accepted.is_empty() {
            let _ = tx.commit();
            return Ok(());
        }
        if !answers
            .iter()
            .any(|(_, a)| matches!(a, Err(StageError::Full(_))))
        {
            shared.set_blocked(None);
        }

        // Phase 2: place every line after the last of its segment, in sequence order per
        // segment. A sealed line's length is known before it is sealed
        // (segment::sealed_line_len): its nonce is reserved here, in order, and it is sealed in
        // phase 3 while this thread indexes the group.
        let mut touched: Vec<(String, String)> = Vec::new();
        let mut before_len: HashMap<(String, String), u64> = HashMap::new();
        let mut placed: Vec<Vec<(i64, PathBuf, u64, u64)>> = Vec::with_capacity(accepted.len());
        let mut io_error: Option<StageError> = None;
        // 2a: each (action, entity)'s segment, opened once per group; `seg_of` gives each
        // line's segment as its index in `touched`, so later phases look nothing up by name.
        let mut seg_of: Vec<Vec<usize>> = Vec::with_capacity(accepted.len());
        let mut touched_index: HashMap<(&str, &str), usize> = HashMap::new();
        'open: for acc in &accepted {
            let mut segs = Vec::with_capacity(acc.envelopes.len());
            for env in &acc.envelopes {
                let name = (env.action.as_str(), env.entity.as_str());
                if let Some(&i) = touched_index.get(&name) {
                    segs.push(i);
                    continue;
                }
                let k = (env.action.clone(), env.entity.clone());
                match segment_for(shared, active, &tx, &k, now, env.seq) {
                    Ok(len) => {
                        before_len.insert(k.clone(), len);
                        touched_index.insert(name, touched.len());
                        segs.push(touched.len());
                        touched.push(k);
                    }
                    Err(e) => {
                        io_error = Some(e);
                        break 'open;
                    }
                }
            }
            seg_of.push(segs);
        }
        drop(touched_index);
        if let Some(err) = io_error {
            cut_back(active, &touched, &before_len);
            drop(tx);
            let pending = accepted.into_iter().map(|a| a.reply).collect();
            return Err((err, pending));
        }
        // 2b: each line's place.
        let mut seal_jobs: Vec<(&Envelope, usize, u64)> = Vec::new();
        let mut ends: Vec<u64> = touched.iter().map(|k| before_len[k]).collect();
        for (acc, segs) in accepted.iter().zip(&seg_of) {
            let mut places = Vec::with_capacity(acc.envelopes.len());
            for ((env, line), &i) in acc.envelopes.iter().zip(&acc.lines).zip(segs) {
                let seg = active.get_mut(&touched[i]).expect("opened above");
                let len = if sealing {
                    let dk = seg
                        .dk
                        .as_mut()
                        .expect("a sealing store's segments have data keys");
                    seal_jobs.push((env, i, dk.reserve(1)));
                    segment::sealed_line_len(env, dk)
                } else {
                    line.len()
                } as u64;
                places.push((seg.id, seg.path.clone(), ends[i], len));
                ends[i] += len;
            }
            placed.push(places);
        }

        // Phase 3: index the group (committed in phase 5, once its lines are durable) while
        // other threads seal its lines, then put each line in its segment's buffer.
        let data_keys: Vec<Option<&DataKey>> =
            touched.iter().map(|k| active[k].dk.as_ref()).collect();
        let seal_jobs: Vec<SealJob> = seal_jobs
            .into_iter()
            .map(|(env, i, counter)| {
                let dk = data_keys[i].expect("a sealing store's segments have data keys");
                (env, dk, counter)
            })
            .collect();
        let (indexed, sealed_lines) = std::thread::scope(|scope| {
            let sealing = SealingGroup::start(scope, &seal_jobs);
            let indexed = (|| -> rusqlite::Result<()> {
                for (acc, places) in accepted.iter().zip(&placed) {
                    for (env, (seg_id, _, offset, len)) in acc.envelopes.iter().zip(places) {
                        crate::index::insert_record(
                            &tx,
                            env,
                            *seg_id,
                            *offset,
                            *len,
                            shared.opts.keys.as_deref(),
                        )?;
                    }
                    if let Some(ck) = &acc.client_key {
                        let receipts = receipts_of(&acc.envelopes, places);
                        crate::client_keys::remember(
                            &tx,
                            &shared.index_text(&ck.key),
                            &shared.index_text(&ck.fingerprint),
                            &receipts,
                            now.timestamp(),
                        )?;
                    }
                }
                Ok(())
            })();
            (indexed, sealing.finish())
        });
        drop(seal_jobs);
        drop(data_keys);
        if let Err(e) = indexed {
            // Nothing is written yet: the group is refused whole.
            drop(tx);
            let pending = accepted.into_iter().map(|a| a.reply).collect();
            return Err((StageError::Store(e.into()), pending));
        }
        let mut buffers: Vec<Vec<u8>> = vec![Vec::new(); touched.len()];
        let mut next_sealed = sealed_lines.iter().flat_map(|share| share.lines());
        for ((acc, places), segs) in accepted.iter().zip(&placed).zip(&seg_of) {
            for ((line, (_, path, _, len)), &i) in acc.lines.iter().zip(places).zip(segs) {
                let line: &[u8] = if sealing {
                    next_sealed.next().expect("one sealed line per envelope")
                } else {
                    line
                };
                if line.len() as u64 != *len {
                    // A bug, caught before anything is written: the index would point at the
                    // wrong bytes.
                    io_error.get_or_insert_with(|| StageError::Io {
                        path: path.clone(),
                        source: std::io::Error::other(format!(
                            "a sealed line of {} bytes was placed as {len} bytes; nothing was written",
                            line.len()
                        )),
                    });
                }
                buffers[i].extend_from_slice(line);
            }
        }
        // Phase 4: write and fdatasync each touched segment once.
        if io_error.is_none() {
            for (k, buf) in touched.iter().zip(&buffers) {
                let seg = active.get_mut(k).expect("touched segments are active");
                let res = seg
                    .file
                    .write_all(buf)
                    .and_then(|()| sync_data(&seg.file, shared));
                if let Err(e) = res {
                    io_error = Some(StageError::Io {
                        path: seg.path.clone(),
                        source: e,
                    });
                    break;
                }
                seg.len += buf.len() as u64;
                seg.last_write = Instant::now();
            }
        }
        if let Some(err) = io_error {
            cut_back(active, &touched, &before_len);
            drop(tx);
            let pending = accepted.into_iter().map(|a| a.reply).collect();
            return Err((err, pending));
        }

        // Phase 5: the segments' indexed length, then commit: the index names only durable lines.
        let indexed = (|| -> rusqlite::Result<()> {
            // The worst moment for the index to fail: the lines are written and synced.
            #[cfg(feature = "fault-injection")]
            if shared
                .fail_next_index
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                    Some("injected: database or disk is full".into()),
                ));
            }
            for k in &touched {
                let seg = &active[k];
                tx.execute(
                    "UPDATE segments SET indexed_len = MAX(indexed_len, ?1) WHERE id = ?2",
                    params![seg.len as i64, seg.id],
                )?;
            }
            Ok(())
        })();
        let committed = indexed.and_then(|()| tx.commit());
        if let Err(e) = committed {
            // The lines are on disk but the index refused them (a full disk, most often), and
            // the clients are about to be told "not staged": cut the lines, so a restart does
            // not recover and deliver records whose senders were answered with an error.
            cut_back(active, &touched, &before_len);
            let pending = accepted.into_iter().map(|a| a.reply).collect();
            return Err((StageError::Store(e.into()), pending));
        }
        if let Err(e) = write_seq(seq_file, last_seq) {
            // The records are durable and indexed; the counter is rebuilt from them on open.
            tracing::warn!(error = %e, "Could not update the sequence counter file.");
        }
        let mut receipts_by_index = Vec::with_capacity(accepted.len());
        for (acc, places) in accepted.iter().zip(&placed) {
            receipts_by_index.push(receipts_of(&acc.envelopes, places));
        }
        for (reply, idx) in replays {
            answers.push((reply, Ok(Staged::Replayed(receipts_by_index[idx].clone()))));
        }
        for (acc, receipts) in accepted.into_iter().zip(receipts_by_index) {
            answers.push((acc.reply, Ok(Staged::New(receipts))));
        }
        Ok(())
    }
}

/// Cuts what a failed group appended to each touched segment, and syncs the cut, so that no
/// record whose sender is answered with an error is left behind to be recovered at the next
/// start. Truncating needs no free space, so this works on a full disk too.
fn cut_back(
    active: &mut HashMap<(String, String), ActiveSegment>,
    touched: &[(String, String)],
    before_len: &HashMap<(String, String), u64>,
) {
    for k in touched {
        if let (Some(seg), Some(len)) = (active.get_mut(k), before_len.get(k)) {
            let cut = seg
                .file
                .set_len(*len)
                .and_then(|()| seg.file.seek(SeekFrom::Start(*len)).map(|_| ()))
                .and_then(|()| seg.file.sync_data());
            if let Err(e) = cut {
                tracing::error!(path = %seg.path.display(), error = %e, "Could not cut the unacknowledged end of a segment; a restart may deliver records whose senders were told they failed (their Idempotency-Key, if any, still identifies them).");
            }
            seg.len = *len;
        }
    }
}

/// The active segment for (action, entity), rotating it when full or on a new UTC day.
/// Returns its current length.
fn segment_for(
    shared: &Shared,
    active: &mut HashMap<(String, String), ActiveSegment>,
    tx: &Connection,
    k: &(String, String),
    now: DateTime<Utc>,
    first_seq: u64,
) -> Result<u64, StageError> {
    use chrono::Datelike;
    let day = (now.year(), now.month(), now.day());
    if let Some(seg) = active.get(k) {
        if seg.day == day && seg.len < shared.opts.segment_max_bytes {
            return Ok(seg.len);
        }
        let seg = active.remove(k).expect("checked above");
        tx.execute("UPDATE segments SET sealed = 1 WHERE id = ?1", [seg.id])
            .map_err(|e| StageError::Store(e.into()))?;
    }
    if let Some(keys) = shared.keys() {
        // Listed before anything is sealed with it: a process without it is then refused.
        crate::sealed_folder::note_current(&shared.state_dir, keys).map_err(StageError::Store)?;
    }
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
    // The data key is kept (flushed) before the segment's first line names it, and after the
    // file exists, so the open's sweep never forgets it.
    let dk = match shared.opts.keys.as_ref() {
        Some(keys) => Some(
            keys.new_segment_data_key(&shared.data_keys, &rel)
                .map_err(|e| StageError::Io {
                    path: shared.state_dir.join(crate::data_keys::FILE),
                    source: e,
                })?,
        ),
        None => None,
    };
    tx.execute(
        "INSERT INTO segments (path, indexed_len, sealed) VALUES (?1, 0, 0)",
        [&rel],
    )
    .map_err(|e| StageError::Store(e.into()))?;
    let id = tx.last_insert_rowid();
    active.insert(
        k.clone(),
        ActiveSegment {
            file,
            path,
            id,
            len: 0,
            day,
            last_write: Instant::now(),
            dk,
        },
    );
    Ok(0)
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

fn receipts_of(envelopes: &[Envelope], places: &[(i64, PathBuf, u64, u64)]) -> Vec<Receipt> {
    envelopes
        .iter()
        .zip(places)
        .map(|(env, (_, path, _, _))| Receipt {
            id: env.id.clone(),
            seq: env.seq,
            path: path.clone(),
        })
        .collect()
}

fn reply_all(group: Vec<StageRequest>, err: &StageError) {
    for req in group {
        req.reply.send(Err(StageError::Io {
            path: PathBuf::from("_state/seq"),
            source: std::io::Error::other(err.to_string()),
        }));
    }
}
