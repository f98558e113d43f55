//! The daemon (`estafeta run`): opens the staging store, builds the sinks, binds the ingest
//! API, starts one batcher task per sink and the scanner that adopts JSON files other programs
//! drop into the staging tree, then runs until `shutdown` resolves. Stopping refuses new
//! writes (503), stops accepting connections, cancels the batchers and waits at most
//! `SHUTDOWN_GRACE_SECS` for the work in flight; whatever is not settled by then stays pending.
//! Under systemd it reports ready, stopping and watchdog pings (see [`crate::notify`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use estafeta_staging::{OpenReport, Staging};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::batcher::{Batcher, WriteSignal};
use crate::config::{Config, SinkKind};
use crate::ingest::{self, IngestState};

/// How often the staging tree is scanned for files written by other programs. A plain rescan,
/// not a file watcher: a watcher on the staging tree is woken by every append the agent itself
/// makes (inotify cannot be told to skip modifications through the `notify` crate 8), which
/// cost about a tenth of the writer's time under load; walking the day folders every 2 s costs
/// next to nothing, and adoption waits for `FOREIGN_QUIET` anyway.
pub const FOREIGN_SCAN_INTERVAL: Duration = Duration::from_secs(2);
/// A foreign file is adopted only once it has not changed for this long (it may still be
/// being written).
pub const FOREIGN_QUIET: Duration = Duration::from_secs(2);

/// Why [`run_until`] returned.
pub enum Exit {
    /// `shutdown` resolved (or the ingest API stopped).
    Stopped,
    /// A verified release is ready: the daemon drained so it can be tried (see `crate::update`).
    Update(crate::update::Prepared),
}

/// Runs the agent until `shutdown` resolves: opens the store, binds the ingest API, starts the
/// batcher and the foreign-file scanner, then drains within the grace period. Update checks
/// (`UPDATE_CRONTAB`) only record what is available (the Windows service).
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_until(config, shutdown, false, None).await.map(|_| ())
}

/// What the daemon calls once it is up (the store open, the port bound), beside telling
/// systemd: the Windows service reports "running" to its control manager only then, so that an
/// MSI upgrade whose new version cannot start fails and is rolled back.
pub type OnReady = Box<dyn FnOnce() + Send>;

/// [`run`], calling `on_ready` once the daemon is up (the Windows service).
pub async fn run_reporting_ready(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: OnReady,
) -> anyhow::Result<()> {
    run_until(config, shutdown, false, Some(on_ready))
        .await
        .map(|_| ())
}

/// [`run`], and with `apply_updates` a verified plain-install release found by the scheduled
/// checks drains the daemon and is returned, for the caller to try and hand over to.
pub async fn run_until(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    apply_updates: bool,
    on_ready: Option<OnReady>,
) -> anyhow::Result<Exit> {
    let config = Arc::new(config);
    info!(
        version = crate::version::current(),
        sources = ?config.sources,
        staging = %config.staging_path.display(),
        dry_run = config.dry_run,
        "Starting estafeta."
    );
    if let Some(problem) =
        crate::config::ingest_exposure_problem(config.ingest_addr, config.ingest_token.as_deref())
    {
        bail!("INGEST_ADDR={} {problem}", config.ingest_addr);
    }
    if let Some(problem) = crate::config::ingest_plaintext_problem(
        config.ingest_addr,
        config.ingest_tls.is_some(),
        config.ingest_allow_plaintext,
    ) {
        bail!("INGEST_ADDR={} {problem}", config.ingest_addr);
    }
    if config.ingest_tls.is_none() && !config.ingest_addr.ip().is_loopback() {
        // Only with INGEST_ALLOW_PLAINTEXT=true (checked above).
        warn!(addr = %config.ingest_addr, "INGEST_ALLOW_PLAINTEXT=true: the ingest API listens beyond this machine in clear HTTP; records (patient data) and INGEST_TOKEN cross the network readable by anyone on it. Set INGEST_TLS_CERT and INGEST_TLS_KEY to serve HTTPS.");
    }
    let ingest_tls = config
        .ingest_tls
        .as_ref()
        .map(|tls| crate::api_tls::acceptor(&tls.cert, &tls.key))
        .transpose()?;
    for sink in &config.sinks {
        let (kind, url) = match &sink.kind {
            SinkKind::Http(http) => ("http", &http.url),
            SinkKind::Database(database) => ("database", &database.url),
            SinkKind::Nats(nats) => ("nats", &nats.url),
        };
        info!(sink = %sink.name, kind, url = %crate::redact::url(url), "Sink configured.");
        if let SinkKind::Database(database) = &sink.kind
            && let Some(apply) = &database.apply
        {
            info!(sink = %sink.name, apply_dir = %apply.dir.display(), statements = apply.statements().count(), "Apply mode: records with a statement file are applied to the real tables.");
        }
    }
    if config.sinks.is_empty() {
        warn!("No sink is configured: records are staged but delivered nowhere.");
    }

    let options = config.staging_options();
    let staging_path = config.staging_path.clone();
    let (store, report) = tokio::task::spawn_blocking(move || Staging::open(options))
        .await
        .context("the task opening the staging store panicked")?
        .with_context(|| {
            format!(
                "could not open the staging folder {}",
                staging_path.display()
            )
        })?;
    log_open_report(&report);

    let sinks = crate::sinks::build(&config.sinks).context("could not set up the sinks")?;
    let state = IngestState::new(store.clone(), config.clone())?;
    state.attach_sinks(sinks.clone());

    let listener = tokio::net::TcpListener::bind(config.ingest_addr)
        .await
        .map_err(|err| match err.kind() {
            std::io::ErrorKind::AddrInUse => anyhow::anyhow!(
                "the ingest address {} is already in use (is another estafeta running?); stop the other program or change INGEST_ADDR",
                config.ingest_addr
            ),
            _ => anyhow::Error::new(err).context(format!(
                "could not listen on {}; check INGEST_ADDR",
                config.ingest_addr
            )),
        })?;
    let bound = listener.local_addr().context("reading the bound address")?;
    info!(addr = %bound, https = ingest_tls.is_some(), token = config.ingest_token.is_some(), allowed_hosts = ?config.ingest_allowed_hosts, "Ingest API listening.");

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();

    let app = ingest::router(state.clone());
    let server_stop = cancel.clone();
    let header_timeout = config.ingest_body_timeout;
    let server = tracker.spawn(ingest::serve(
        listener,
        app,
        header_timeout,
        ingest_tls,
        server_stop,
    ));

    // The batchers settle their flush in flight a little before the daemon stops waiting, so
    // their release reaches the store.
    let deliver_grace = config
        .shutdown_grace
        .saturating_sub(config.shutdown_grace / 5);
    // The batchers' wake-up: the API, adoption and the SQL sources bump it after a write.
    let writes = state.write_signal();
    let batcher = Batcher::new(
        store.clone(),
        config.clone(),
        state.metrics().clone(),
        Some(writes.subscribe()),
    )?;
    batcher.spawn(&sinks, &tracker, &cancel, deliver_grace);
    tracker.spawn(crate::heartbeat::run(
        store.clone(),
        sinks.clone(),
        config.clone(),
        cancel.clone(),
    ));
    let wake = writes.clone();
    crate::sources::spawn_all(
        &store,
        state.intake(),
        state.sources_health(),
        &config.sql_sources,
        config.tz.clone(),
        &tracker,
        &cancel,
        move || wake.notify(),
    );
    tracker.spawn(scan_foreign(
        store,
        config.clone(),
        state.intake().clone(),
        writes.clone(),
        cancel.clone(),
    ));
    let (takeover_tx, mut takeover_rx) = tokio::sync::mpsc::channel(1);
    // A trial child of an update never updates itself.
    if config.update.url.is_some() && !config.update.trial {
        let trigger = state.update_trigger();
        if apply_updates {
            tracker.spawn(crate::update::run_checks(
                Arc::new(config.update_context()),
                cancel.clone(),
                takeover_tx,
                trigger,
            ));
        } else {
            let (tx, mut rx) = tokio::sync::mpsc::channel(1);
            tracker.spawn(crate::update::run_checks(
                Arc::new(config.update_context()),
                cancel.clone(),
                tx,
                trigger,
            ));
            tokio::spawn(async move { while rx.recv().await.is_some() {} });
        }
    }
    info!(sinks = sinks.len(), crontab = %config.crontab, flush_on_write = config.flush_on_write, "Estafeta is running.");
    // systemd (Type=notify): up now; the watchdog pings run until the drain below is over.
    crate::notify::ready(&format!("Running; ingest API on {bound}."));
    if let Some(on_ready) = on_ready {
        on_ready();
    }
    let watchdog = crate::notify::spawn_watchdog();

    tokio::pin!(shutdown);
    tokio::pin!(server);
    let mut update = None;
    let server_failed = tokio::select! {
        () = &mut shutdown => None,
        result = &mut server => Some(result),
        Some(prepared) = takeover_rx.recv() => {
            info!(version = %prepared.version, "Stopping to try the new version.");
            update = Some(prepared);
            None
        }
    };

    info!(
        grace_secs = config.shutdown_grace.as_secs_f64(),
        "Stopping: refusing new records and draining."
    );
    match &update {
        // Not STOPPING=1: systemd would take the service as going down and kill it after
        // TimeoutStopSec, while this process goes on to try the new version and exec it.
        Some(prepared) => crate::notify::status(&format!(
            "Updating: draining to try version {}.",
            prepared.version
        )),
        None => crate::notify::stopping("Stopping: draining the delivery in flight."),
    }
    state.begin_shutdown();
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            "The grace period ran out; records still in flight stay pending and are sent after the next start."
        );
    }
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    match server_failed {
        Some(Ok(())) | None => {
            info!("Estafeta stopped.");
            Ok(update.map_or(Exit::Stopped, Exit::Update))
        }
        Some(Err(err)) => Err(anyhow::Error::new(err).context("the ingest API task failed")),
    }
}

fn log_open_report(report: &OpenReport) {
    if report.index_rebuilt {
        warn!(
            reason = report.rebuild_reason.as_deref().unwrap_or("missing"),
            "The staging index was rebuilt from the folder."
        );
    }
    for moved in &report.moved_aside {
        warn!(
            from = %moved.from.display(), to = %moved.to.display(), reason = %moved.reason,
            "Damaged bytes in the staging folder were moved aside with the reason; the file says which record they held."
        );
    }
    if report.records_recovered > 0
        || report.torn_tails_repaired > 0
        || report.leases_released > 0
        || report.stale_dead_letters_removed > 0
    {
        info!(
            recovered = report.records_recovered,
            torn_tails = report.torn_tails_repaired,
            leases_released = report.leases_released,
            stale_dead_letters_removed = report.stale_dead_letters_removed,
            "Staging recovered after an unclean stop."
        );
    }
}

/// Adopts JSON files other programs write into the staging tree (the seed's layout).
async fn scan_foreign(
    store: Staging,
    config: Arc<Config>,
    intake: Arc<crate::intake::Intake>,
    writes: WriteSignal,
    cancel: CancellationToken,
) {
    let mut interval = tokio::time::interval(FOREIGN_SCAN_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = interval.tick() => {}
        }
        let store = store.clone();
        let config = config.clone();
        let intake = intake.clone();
        let scan = tokio::task::spawn_blocking(move || {
            // Routes, keys and schemas as for the same record posted to the API.
            let admit = |action: &str, entity: &str, payload: &serde_json::Value| {
                intake.admit(action, entity, payload)
            };
            let mut report = store.adopt_foreign(&admit, FOREIGN_QUIET)?;
            if let Some(inbox) = &config.inbox_path {
                let inbox_report = store.adopt_inbox(inbox, &admit, FOREIGN_QUIET)?;
                report.adopted += inbox_report.adopted;
                report.waiting += inbox_report.waiting;
                report.moved_aside.extend(inbox_report.moved_aside);
            }
            Ok::<_, estafeta_staging::StoreError>(report)
        })
        .await;
        match scan {
            Ok(Ok(report)) => {
                for moved in &report.moved_aside {
                    warn!(
                        from = %moved.from.display(), to = %moved.to.display(), reason = %moved.reason,
                        "A file in the staging folder could not be adopted and was moved aside."
                    );
                }
                if report.adopted > 0 {
                    info!(
                        adopted = report.adopted,
                        waiting = report.waiting,
                        "Adopted files written by other programs."
                    );
                    writes.notify();
                }
            }
            Ok(Err(err)) => {
                error!(error = %err, "Scanning the staging folder for foreign files failed; trying again later.");
            }
            Err(err) => error!(error = %err, "The foreign-file scan panicked; trying again later."),
        }
    }
}
