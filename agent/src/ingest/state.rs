//! The ingest API's shared state: the store, the configuration, the intake (with the JSON
//! Schema validators compiled once at start), the write signal that wakes the batcher (`FLUSH_ON_WRITE`), the
//! shutting-down flag and the counters. Cheap to clone: one `Arc` inside.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use estafeta_staging::Staging;
use tokio::sync::watch;

use crate::batcher::WriteSignal;
use crate::config::Config;
use crate::intake::Intake;
use crate::metrics::Metrics;
use crate::sinks::Sink;
use crate::sources::health::SourcesHealth;

/// What every ingest handler shares.
#[derive(Clone)]
pub struct IngestState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Staging,
    config: Arc<Config>,
    /// Turns bodies into records; shared with adoption and the SQL sources.
    intake: Arc<Intake>,
    /// The batchers' wake-up, bumped after each successful stage.
    writes: WriteSignal,
    shutting_down: AtomicBool,
    metrics: Arc<Metrics>,
    /// What each SQL source's cycles did, noted by their loops (`/v1/status`, `/metrics`).
    sources_health: Arc<SourcesHealth>,
    started: Instant,
    /// `POST /v1/update` wakes the update task through it.
    update_trigger: Arc<tokio::sync::Notify>,
    /// The daemon's sinks, for how each one's connection is protected (`/v1/status`).
    sinks: OnceLock<Vec<Arc<dyn Sink>>>,
}

impl IngestState {
    /// Compiles every entity's JSON Schema; fails naming the entity whose schema is invalid.
    pub fn new(store: Staging, config: Arc<Config>) -> anyhow::Result<Self> {
        let intake = Arc::new(Intake::new(config.rules())?);
        let writes = WriteSignal::new(config.flush_on_write);
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                config,
                intake,
                writes,
                shutting_down: AtomicBool::new(false),
                metrics: Arc::new(Metrics::default()),
                sources_health: Arc::default(),
                started: Instant::now(),
                update_trigger: Arc::new(tokio::sync::Notify::new()),
                sinks: OnceLock::new(),
            }),
        })
    }

    pub fn store(&self) -> &Staging {
        &self.inner.store
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.inner.config
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The SQL sources' health, shared with their loops.
    pub fn sources_health(&self) -> &Arc<SourcesHealth> {
        &self.inner.sources_health
    }

    /// The one intake, for every other way records come in (adoption, SQL sources).
    pub fn intake(&self) -> &Arc<Intake> {
        &self.inner.intake
    }

    /// A receiver that changes after every write (only when `FLUSH_ON_WRITE` is on).
    pub fn subscribe_writes(&self) -> watch::Receiver<u64> {
        self.inner.writes.subscribe()
    }

    /// The batchers' wake-up itself, for the other intake paths (adoption, SQL sources).
    pub fn write_signal(&self) -> WriteSignal {
        self.inner.writes.clone()
    }

    /// Tells the batchers that new records are staged, when `FLUSH_ON_WRITE` asks for it.
    pub fn notify_write(&self) {
        self.inner.writes.notify();
    }

    /// From now on every `POST` is answered 503.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    /// What `POST /v1/update` notifies; the update task waits on it.
    pub fn update_trigger(&self) -> Arc<tokio::sync::Notify> {
        self.inner.update_trigger.clone()
    }

    /// Gives the status the daemon's sinks (once; later calls are ignored).
    pub fn attach_sinks(&self, sinks: Vec<Arc<dyn Sink>>) {
        let _ = self.inner.sinks.set(sinks);
    }

    /// How each sink's connection is protected, by sink name.
    pub fn transports(&self) -> Vec<(String, crate::tls::Transport)> {
        self.inner
            .sinks
            .get()
            .map(|sinks| {
                sinks
                    .iter()
                    .map(|s| (s.name().to_owned(), s.transport()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn uptime_secs(&self) -> u64 {
        self.inner.started.elapsed().as_secs()
    }
}
