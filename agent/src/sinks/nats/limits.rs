//! The stream limit the sink checks before it publishes: the `max_msg_size` of the stream that
//! captures a subject, looked up once per connection and subject and kept.
//!
//! Why: the batch is pipelined, so a message the stream refuses for its size would be refused
//! while the later records of its key, already sent behind it, are stored: they would overtake
//! it. Checked before sending, the too-large record is a dead letter without being sent and the
//! rest of its key is held back. A kept limit is looked up again before it condemns a record
//! (the stream may have been given a larger limit since: a dead letter needs a person) and is
//! forgotten when the server refuses a message for its size (the limit was lowered).
//! The server's own `max_payload` needs no lookup: async-nats refuses such a message before
//! sending it.

use std::collections::HashMap;
use std::sync::Mutex;

use async_nats::jetstream;

/// What the sink knows of the stream behind one subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Limit {
    /// The stream's name (for the dead letter's reason).
    pub stream: String,
    /// Largest message the stream stores, headers and body, in bytes; `None` for no limit.
    pub max_msg_size: Option<usize>,
}

/// The limits looked up on one connection, by subject.
#[derive(Default)]
pub(super) struct StreamLimits {
    by_subject: Mutex<HashMap<String, Limit>>,
}

impl StreamLimits {
    /// The limit for `subject`, kept or looked up. `None` when no stream could be found or
    /// asked: nothing is checked then, and the publish says what is wrong.
    pub async fn get(&self, js: &jetstream::Context, subject: &str) -> Option<Limit> {
        if let Some(limit) = self.lock().get(subject) {
            return Some(limit.clone());
        }
        self.refresh(js, subject).await
    }

    /// The limit for `subject` as the server has it now (kept for later).
    pub async fn refresh(&self, js: &jetstream::Context, subject: &str) -> Option<Limit> {
        let limit = look_up(js, subject).await;
        let mut kept = self.lock();
        match &limit {
            Some(limit) => kept.insert(subject.to_owned(), limit.clone()),
            None => kept.remove(subject),
        };
        limit
    }

    /// Drops what is kept for `subject`: the server refused a message for its size.
    pub fn forget(&self, subject: &str) {
        self.lock().remove(subject);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Limit>> {
        // Held for a map operation only; nothing under it can leave the map half-changed.
        self.by_subject
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn look_up(js: &jetstream::Context, subject: &str) -> Option<Limit> {
    let found = async {
        let name = js.stream_by_subject(subject).await?;
        let stream = js.get_stream(&name).await?;
        let max = stream.cached_info().config.max_message_size;
        Ok::<_, async_nats::Error>(Limit {
            stream: name,
            // The server reads 0 and -1 as "no limit".
            max_msg_size: usize::try_from(max).ok().filter(|max| *max > 0),
        })
    };
    match found.await {
        Ok(limit) => Some(limit),
        Err(err) => {
            tracing::debug!(subject, error = %err, "No JetStream stream limit for this subject; message sizes are left to the server.");
            None
        }
    }
}

/// The size the server holds against a stream's `max_msg_size`: the header block as sent
/// (`NATS/1.0\r\n`, each `name: value\r\n`, a blank line) plus the body.
pub(super) fn wire_size(headers: &[(&str, &str)], body_len: usize) -> usize {
    let block: usize = headers
        .iter()
        .map(|(name, value)| name.len() + 2 + value.len() + 2)
        .sum();
    "NATS/1.0\r\n".len() + block + 2 + body_len
}
