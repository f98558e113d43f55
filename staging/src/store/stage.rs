//! Staging: records are checked and normalised here, then queued for the writer thread
//! (`writer.rs`), which numbers, appends, syncs and indexes them and answers once they are on
//! stable storage.

use std::sync::mpsc;

use crate::record::{compact_json, validate_name};
use crate::writer::{Message, Prepared, Reply, StageRequest};
use crate::*;

use super::{Staging, lock};

impl Staging {
    /// Stages one record; returns once it is on stable storage. Blocking.
    pub fn stage(&self, record: NewRecord) -> Result<Receipt, StageError> {
        let staged = self.stage_batch(vec![record], None)?;
        Ok(staged.receipts()[0].clone())
    }

    /// Stages records all-or-nothing; returns once they are on stable storage. Blocking.
    pub fn stage_batch(
        &self,
        records: Vec<NewRecord>,
        client_key: Option<ClientKey>,
    ) -> Result<Staged, StageError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.stage_batch_then(records, client_key, move |staged| {
            let _ = reply.send(staged);
        })?;
        answer.recv().map_err(|_| StageError::Closed)?
    }

    /// The same without waiting: checks the records, queues them for the writer and returns.
    /// `when_durable` gets the answer on the writer thread once the records are on stable
    /// storage (or failed); it must only hand it over (a channel send), never block. An error
    /// returned here means nothing was queued. Blocks only while the writer's queue is full.
    /// This is what an async server uses, so that a request waiting for its flush holds no
    /// thread.
    pub fn stage_batch_then(
        &self,
        records: Vec<NewRecord>,
        client_key: Option<ClientKey>,
        when_durable: impl FnOnce(Result<Staged, StageError>) + Send + 'static,
    ) -> Result<(), StageError> {
        self.queue(records, client_key, None, Reply::new(when_durable))
    }

    /// Stages the records a source read from a database and advances the source's checkpoint
    /// in the same commit: after a crash at any moment, either both are there or neither is,
    /// so no row is skipped and none is staged twice. Blocking.
    pub fn stage_from_source(
        &self,
        records: Vec<NewRecord>,
        mark: SourceMark,
    ) -> Result<Staged, StageError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.queue(
            records,
            None,
            Some(mark),
            Reply::new(move |staged| {
                let _ = reply.send(staged);
            }),
        )?;
        answer.recv().map_err(|_| StageError::Closed)?
    }

    fn queue(
        &self,
        records: Vec<NewRecord>,
        client_key: Option<ClientKey>,
        source: Option<SourceMark>,
        reply: Reply,
    ) -> Result<(), StageError> {
        if records.is_empty() {
            return Err(StageError::Invalid(
                "nothing to stage: the batch is empty".into(),
            ));
        }
        if let Some(reason) = self.inner.shared.poisoned() {
            return Err(StageError::Poisoned(reason));
        }
        let prepared = records
            .into_iter()
            .map(|r| self.prepare(r))
            .collect::<Result<Vec<_>, _>>()?;
        let sender = lock(&self.inner.tx).clone().ok_or(StageError::Closed)?;
        sender
            .send(Message::Stage(Box::new(StageRequest {
                records: prepared,
                client_key,
                source,
                reply,
            })))
            .map_err(|_| StageError::Closed)
    }

    fn prepare(&self, r: NewRecord) -> Result<Prepared, StageError> {
        validate_name("action", &r.action)?;
        validate_name("entity", &r.entity)?;
        if let Some(k) = &r.key {
            if k.is_empty() || k.len() > MAX_KEY_LEN {
                return Err(StageError::Invalid(format!(
                    "record key must be 1 to {MAX_KEY_LEN} bytes, got {}",
                    k.len()
                )));
            }
            if k.chars().any(|c| c.is_control()) {
                return Err(StageError::Invalid(
                    "record key must not contain control characters".into(),
                ));
            }
        }
        let known = &self.inner.shared.opts.sinks;
        let sinks = match r.sinks {
            Some(s) if !s.is_empty() => {
                for name in &s {
                    if !known.contains(name) {
                        return Err(StageError::UnknownSink(name.clone(), known.join(", ")));
                    }
                }
                s
            }
            _ => known.clone(),
        };
        if sinks.is_empty() {
            return Err(StageError::Invalid(
                "no sink is configured, so the record could never be delivered".into(),
            ));
        }
        let payload = match compact_json(r.payload.get()) {
            Some(compacted) => serde_json::value::RawValue::from_string(compacted)
                .map_err(|e| StageError::Invalid(format!("payload is not valid JSON: {e}")))?,
            None => r.payload,
        };
        Ok(Prepared {
            action: r.action,
            entity: r.entity,
            key: r.key,
            payload,
            sinks,
        })
    }
}
