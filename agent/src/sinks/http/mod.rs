//! HTTP sink: one request per record, sent with reqwest over rustls.
//!
//! A batch carries runs of records of one order key (entity and key; the keyless records of an
//! entity share one), in sequence order ([`super::runs`]). A key's records go one after another:
//! the next is sent only after the previous one was answered 2xx. Once a record of a key is not
//! delivered (retry or dead), the rest of that key's run is answered [`Outcome::Skipped`]
//! without being sent, so nothing overtakes it. Different keys go in parallel: up to
//! `concurrency` workers (`CENTRAL_API_CONCURRENCY`) each take a key's run and send it to its
//! end (the longest runs first), so there are never more than `concurrency` requests in flight.
//! A batch of one hot key is
//! therefore bound by the API's latency (one request at a time); a batch of many keys fills the
//! concurrency. Outcomes keep the batch's order.
//!
//! Default mapping, from the record's action (routes below override it):
//!
//! ```text
//! create                       POST   {url}/{entity}
//! update, upsert (with a key)  PUT    {url}/{entity}/{key}
//! delete (with a key)          DELETE {url}/{entity}/{key}
//! update, upsert, delete
//!   (no key)                   POST   {url}/{entity}/{action}
//! any other action             POST   {url}/{entity}
//! ```
//!
//! A keyless update or delete cannot name a resource, and `DELETE {url}/{entity}` would read as
//! "delete the collection", so those go as a `POST` to an action endpoint; the action is also in
//! the `X-Estafeta-Action` header. The key is sent as one path segment, percent-encoded
//! (`a/b c` → `a%2Fb%20c`); a key that cannot be a segment (empty, `.` or `..`) makes the record
//! dead with that reason unless a route places it elsewhere. Routes ([`HttpRoute`]) override the
//! method, the path (a template with `{entity}`, `{action}`, `{key}`, `{id}`, each encoded as a
//! segment) and add headers, per (entity, action); the first matching route wins.
//!
//! Every request carries `Content-Type: application/json`, `Authorization: Bearer <token>` when
//! a token is set (a route may replace both), then `Idempotency-Key` (the record's id, contract
//! 4), `X-Estafeta-Seq` and `X-Estafeta-Action`, which no route can change. The body is the
//! payload byte for byte, for `DELETE` too.
//!
//! Answers are sorted as contract 5 says: 2xx → delivered; connection errors, timeouts, 408,
//! 425, 429 and 5xx → retry, with the server's `Retry-After` (seconds or an IMF-fixdate) as the
//! hint; anything else → dead. Redirects are not followed and count as dead: following a
//! 301/303 turns a `POST` into a `GET` whose 200 would be taken for a delivery that never
//! happened.
//!
//! What is said about a failure names the method, the entity and the status or error class
//! (`HTTP 503 Service Unavailable`, `PUT patient: cannot connect: …`), never the request's path
//! (it holds the record key) nor the answer's body (APIs echo the payload): that text is logged
//! and becomes the sink's `last_error` in the status and the heartbeats. A dead letter's file
//! alone keeps `HTTP <status>: <first 512 bytes of the body>`. Error messages never carry the
//! token or a password from the URL.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use estafeta_staging::{Delivery, Envelope};
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, Method, Response, StatusCode, Url};
use tokio::task::JoinSet;

use super::{BoxFuture, Outcome, Refusal, Sink, error_chain, runs};
use crate::redact::{self, Secrets};

mod body;
mod config;
mod path;
#[cfg(test)]
mod run_tests;
#[cfg(test)]
mod tests;

use crate::sinks::record_template::RecordTemplate;
pub use body::BodyTemplate;
pub use config::{HttpRoute, HttpSinkConfig, check_heartbeat_path};
use config::{PLACEHOLDERS, check_template};
use path::{default_method, default_segments, encode_segment, fill, join, render};

/// Most bytes of a response body kept in a dead letter's file (never logged or shown).
pub const MAX_ERROR_BODY_BYTES: usize = 512;

/// The placeholder a `DRY_RUN` line shows in place of the record's key, as it comes out of
/// [`encode_segment`].
const KEY_SHOWN: &str = "%7Bkey%7D";

/// A route checked and parsed once, at build time.
struct CompiledRoute {
    entity: Option<String>,
    action: Option<String>,
    method: Option<Method>,
    path: Option<String>,
    headers: HeaderMap,
    idempotency_key: Option<RecordTemplate>,
    body: Option<Arc<BodyTemplate>>,
}

impl CompiledRoute {
    fn matches(&self, envelope: &Envelope) -> bool {
        self.entity.as_ref().is_none_or(|e| *e == envelope.entity)
            && self.action.as_ref().is_none_or(|a| *a == envelope.action)
    }
}

/// What the workers share: enough to send a request and describe its failure.
struct Shared {
    client: Client,
    timeout: Duration,
    /// Token and URL password, scrubbed from every error message.
    secrets: Secrets,
    /// The protection the settings give (reqwest never falls back from https to http), marked
    /// seen once the API answered.
    transport: crate::tls::Observed,
}

impl Shared {
    fn answered(&self) {
        let t = self.transport.transport();
        if !t.observed {
            self.transport.connected(t.tls, t.verified);
        }
    }
}

/// Delivers records as HTTP requests; see the module documentation for the mapping.
pub struct HttpSink {
    name: String,
    base: Url,
    token: Option<HeaderValue>,
    routes: Vec<CompiledRoute>,
    /// The `Idempotency-Key` of records whose route sets none; `None`: the record's id.
    idempotency_key: Option<RecordTemplate>,
    /// Maps and catalogs of its body templates.
    lookups: Arc<crate::lookups::Lookups>,
    concurrency: usize,
    heartbeat_path: Option<String>,
    shared: Arc<Shared>,
}

/// `https` verified against the system's store, the bundled roots and `ca_file`, unless
/// `verify_tls` is off; `http` is clear text.
fn transport_of(base: &Url, verify_tls: bool) -> crate::tls::Transport {
    use crate::tls::{Transport, Verify};
    match (base.scheme(), verify_tls) {
        ("https", true) => Transport::tls(Verify::Full, "https"),
        ("https", false) => Transport::tls(Verify::Nothing, "https, verify_tls=false"),
        _ => Transport::clear("http://"),
    }
}

impl HttpSink {
    /// Checks the URL, the routes and the TLS settings and builds the client. Connects to
    /// nothing.
    pub fn new(name: impl Into<String>, config: HttpSinkConfig) -> anyhow::Result<Self> {
        let name = name.into();
        let shown = redact::url(&config.url);
        let base = Url::parse(&config.url).with_context(|| {
            format!("the HTTP sink URL {shown:?} is not a valid URL; expected https://host/path")
        })?;
        if !matches!(base.scheme(), "http" | "https") {
            bail!(
                "the HTTP sink URL {shown:?} has scheme {:?}; expected http or https",
                base.scheme()
            );
        }

        let mut builder = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(format!("estafeta/{}", crate::version::current()));
        if !config.timeout.is_zero() {
            builder = builder
                .timeout(config.timeout)
                .connect_timeout(config.timeout);
        }
        let transport = transport_of(&base, config.verify_tls);
        if !transport.tls && !crate::tls::is_loopback(base.host_str().unwrap_or_default()) {
            tracing::warn!(sink = %name, url = %shown, "Records go to this API in clear text (http://) across the network; use https://.");
        }
        if !config.verify_tls {
            tracing::warn!(sink = %name, url = %shown, "TLS certificate verification is disabled for this sink.");
            builder = builder.danger_accept_invalid_certs(true);
        }
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).with_context(|| {
                format!("cannot read the CA file {}; check the path", path.display())
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
                format!("the CA file {} is not a PEM certificate", path.display())
            })?;
            if certs.is_empty() {
                bail!(
                    "the CA file {} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
                    path.display()
                );
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .build()
            .context("cannot build the HTTP client for this sink")?;

        let token = match &config.token {
            Some(token) => {
                let mut value =
                    HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                        anyhow::anyhow!(
                            "the API token holds characters not allowed in an HTTP header"
                        )
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };

        let routes = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, route)| {
                compile_route(route).with_context(|| format!("route {} of the HTTP sink", i + 1))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;

        if let Some(template) = &config.heartbeat_path {
            check_heartbeat_path(template)
                .map_err(|e| anyhow::anyhow!("the heartbeat path: {e}"))?;
        }

        let secrets = Secrets::of(&config.url).with(config.token.as_deref());
        Ok(Self {
            name,
            base,
            token,
            routes,
            idempotency_key: config.idempotency_key,
            lookups: config.lookups,
            concurrency: config.concurrency.max(1),
            heartbeat_path: config.heartbeat_path,
            shared: Arc::new(Shared {
                client,
                timeout: config.timeout,
                secrets,
                transport: crate::tls::Observed::new(transport),
            }),
        })
    }

    /// The method, URL and route for one record, or the reason it cannot be sent.
    fn target(&self, envelope: &Envelope) -> Result<(Method, Url, Option<&CompiledRoute>), String> {
        self.target_with(envelope, envelope.key.as_deref())
    }

    /// The `Idempotency-Key` of one record: its route's template, else the sink's, else its id.
    fn idempotency_key(
        &self,
        envelope: &Envelope,
        route: Option<&CompiledRoute>,
    ) -> Result<String, String> {
        match route
            .and_then(|r| r.idempotency_key.as_ref())
            .or(self.idempotency_key.as_ref())
        {
            Some(template) => template
                .render(envelope)
                .map_err(|e| format!("Idempotency-Key: {e}")),
            None => Ok(envelope.id.clone()),
        }
    }

    /// [`HttpSink::target`] with `key` standing for the record's key in the path.
    fn target_with(
        &self,
        envelope: &Envelope,
        key: Option<&str>,
    ) -> Result<(Method, Url, Option<&CompiledRoute>), String> {
        let route = self.routes.iter().find(|r| r.matches(envelope));
        let method = route
            .and_then(|r| r.method.clone())
            .unwrap_or_else(|| default_method(envelope));
        let path = match route.and_then(|r| r.path.as_deref()) {
            Some(template) => render(template, envelope, key)?,
            None => default_segments(envelope, key)?
                .iter()
                .map(|s| encode_segment(s))
                .collect::<Vec<_>>()
                .join("/"),
        };
        Ok((method, join(&self.base, &path), route))
    }

    /// The request for one record, or its outcome when it cannot be built.
    fn request(&self, delivery: &Delivery) -> Result<reqwest::Request, Outcome> {
        let envelope = &delivery.envelope;
        let ours = |reason| Outcome::Dead {
            reason: Refusal::ours(reason),
        };
        let (method, url, route) = self.target(envelope).map_err(ours)?;
        let idempotency_key = self.idempotency_key(envelope, route).map_err(ours)?;
        let body = match route.and_then(|r| r.body.as_deref()) {
            Some(template) => Some((template.render(envelope).map_err(ours)?, template)),
            None => None,
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            match &body {
                Some((_, template)) => {
                    HeaderValue::from_str(&template.content_type).map_err(|_| {
                        ours("the body template's content type is not a valid header value".into())
                    })?
                }
                None => HeaderValue::from_static("application/json"),
            },
        );
        if let Some(token) = &self.token {
            headers.insert(header::AUTHORIZATION, token.clone());
        }
        if let Some(route) = route {
            for (name, value) in &route.headers {
                headers.insert(name.clone(), value.clone());
            }
        }
        let dead = |what: &str| Outcome::Dead {
            reason: Refusal::ours(format!(
                "the record's {what} cannot be sent as an HTTP header"
            )),
        };
        headers.insert(
            HeaderName::from_static("idempotency-key"),
            HeaderValue::from_str(&idempotency_key).map_err(|_| dead("Idempotency-Key"))?,
        );
        headers.insert(
            HeaderName::from_static("x-estafeta-seq"),
            HeaderValue::from(envelope.seq),
        );
        headers.insert(
            HeaderName::from_static("x-estafeta-action"),
            HeaderValue::from_str(&envelope.action).map_err(|_| dead("action"))?,
        );
        let mut request = reqwest::Request::new(method, url);
        *request.headers_mut() = headers;
        *request.body_mut() = Some(match body {
            Some((text, _)) => text.into_bytes().into(),
            None => envelope.payload.get().as_bytes().to_vec().into(),
        });
        Ok(request)
    }
}

impl HttpSink {
    /// Fetches every catalog that is stale (`GET {url}{path}` with the token); see
    /// [`crate::lookups::Lookups::refresh`].
    async fn refresh_catalogs(&self) -> Result<(), String> {
        self.lookups
            .refresh(&self.name, |catalog| {
                let url = join(&self.base, &catalog.target);
                let mut request = self.shared.client.get(url);
                if let Some(token) = &self.token {
                    request = request.header(header::AUTHORIZATION, token.clone());
                }
                async move {
                    match request.send().await {
                        Ok(response) if response.status().is_success() => {
                            response.bytes().await.map(|b| b.to_vec()).map_err(|err| {
                                format!("reading it: {}", describe(&self.shared, err))
                            })
                        }
                        Ok(response) => Err(format!("HTTP {}", response.status())),
                        Err(err) => Err(describe(&self.shared, err)),
                    }
                }
            })
            .await
    }

    /// `PUT`s one heartbeat as JSON: the latest state of one agent, so repeating it is harmless.
    async fn send_heartbeat(
        &self,
        url: Url,
        beat: &crate::sinks::heartbeat::Heartbeat,
    ) -> anyhow::Result<()> {
        let shown = redact::url(url.as_str());
        let mut request = self.shared.client.put(url).json(beat);
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, token.clone());
        }
        let response = request.send().await.map_err(|err| {
            anyhow::anyhow!("heartbeat to {shown}: {}", describe(&self.shared, err))
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = self.shared.secrets.scrub(&body_start(response).await);
        bail!(
            "heartbeat to {shown}: HTTP {status} {body}; check heartbeat_path (CENTRAL_API_HEARTBEAT_PATH) against the API"
        );
    }
}

impl Sink for HttpSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, batch: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(async move {
            // Catalogs are fetched before any body is rendered; without one the batch waits.
            if let Err(error) = self.refresh_catalogs().await {
                return batch
                    .iter()
                    .map(|_| Outcome::Retry {
                        error: error.clone(),
                        retry_after: None,
                    })
                    .collect();
            }
            // Requests are built up front: the workers are tasks of their own and own what they
            // send. A record whose request cannot be built carries its outcome (dead) instead.
            let queue: VecDeque<Vec<Item>> = runs(batch)
                .into_iter()
                .map(|run| {
                    run.into_iter()
                        .map(|index| Item {
                            index,
                            request: self.request(&batch[index]),
                            entity: batch[index].envelope.entity.clone(),
                        })
                        .collect()
                })
                .collect();
            let mut queue = queue;
            // Longest runs first: a long run is the batch's critical path (its records cannot
            // overlap), so starting it last would leave the other workers idle at the end.
            // Keys are independent, so their start order changes no outcome.
            queue
                .make_contiguous()
                .sort_by_key(|run| std::cmp::Reverse(run.len()));
            let workers = self.concurrency.min(queue.len());
            let queue = Arc::new(Mutex::new(queue));
            let outcomes = Arc::new(Mutex::new(vec![None; batch.len()]));
            // Dropping the JoinSet (the batch future cancelled at shutdown) aborts the sends.
            let mut tasks = JoinSet::new();
            for _ in 0..workers {
                let shared = Arc::clone(&self.shared);
                let queue = Arc::clone(&queue);
                let outcomes = Arc::clone(&outcomes);
                tasks.spawn(async move { send_runs(&shared, &queue, &outcomes).await });
            }
            while let Some(joined) = tasks.join_next().await {
                if let Err(err) = joined {
                    tracing::error!(sink = %self.name, error = %err, "An HTTP delivery task failed; its records will be retried.");
                }
            }
            let outcomes = std::mem::take(&mut *lock(&outcomes));
            let mut outcomes = super::retry_missing(outcomes, "delivery");
            // A failed task leaves the rest of its run unanswered (retry, above): those must
            // not count as attempts.
            super::hold_back(batch, &mut outcomes);
            tracing::debug!(
                sink = %self.name,
                records = batch.len(),
                delivered = super::delivered(&outcomes),
                skipped = outcomes.iter().filter(|o| matches!(o, Outcome::Skipped)).count(),
                "HTTP batch sent."
            );
            outcomes
        })
    }

    fn heartbeat<'a>(
        &'a self,
        beat: &'a crate::sinks::heartbeat::Heartbeat,
    ) -> BoxFuture<'a, Option<anyhow::Result<()>>> {
        Box::pin(async move {
            let template = self.heartbeat_path.as_deref()?;
            let path = fill(template, |name| match name {
                "agent_id" => Ok(beat.agent_id.as_str()),
                other => Err(format!("{{{other}}} is not a heartbeat placeholder")),
            });
            Some(match path {
                Ok(path) => self.send_heartbeat(join(&self.base, &path), beat).await,
                Err(reason) => Err(anyhow::anyhow!(reason)),
            })
        })
    }

    fn dry_run(&self, batch: &[Delivery]) -> Vec<String> {
        batch
            .iter()
            .map(|delivery| {
                let envelope = &delivery.envelope;
                // The URL as it would be sent, with `{key}` in place of the record's key.
                let shown = self.target(envelope).and_then(|_| {
                    self.target_with(envelope, envelope.key.as_ref().map(|_| "{key}"))
                });
                let shown = shown.and_then(|(method, url, route)| {
                    let key = self.idempotency_key(envelope, route)?;
                    let bytes = match route.and_then(|r| r.body.as_deref()) {
                        Some(template) => template.render(envelope)?.len(),
                        None => envelope.payload.get().len(),
                    };
                    Ok((method, url, key, bytes))
                });
                match shown {
                    Ok((method, url, key, bytes)) => format!(
                        "{method} {} Idempotency-Key={key} seq={} ({bytes} bytes)",
                        redact::url(url.as_str()).replace(KEY_SHOWN, "{key}"),
                        envelope.seq,
                    ),
                    Err(reason) => format!(
                        "NOT SENT Idempotency-Key={} seq={}: {reason}",
                        envelope.id, envelope.seq
                    ),
                }
            })
            .collect()
    }

    /// The request exactly as `deliver` would build it: method, URL (the record's key in it,
    /// this is for the person who asked), every header with the token and route headers (they
    /// may hold secrets) masked, and the body.
    fn preview(&self, delivery: &Delivery) -> String {
        let envelope = &delivery.envelope;
        let request = match self.request(delivery) {
            Ok(request) => request,
            Err(Outcome::Dead { reason }) => {
                return format!(
                    "NOT SENT Idempotency-Key={} seq={}: would be a dead letter: {}",
                    envelope.id, envelope.seq, reason.summary
                );
            }
            Err(other) => {
                return format!(
                    "NOT SENT Idempotency-Key={} seq={}: {other:?}",
                    envelope.id, envelope.seq
                );
            }
        };
        let mut out = format!(
            "{} {}\n",
            request.method(),
            redact::url(request.url().as_str())
        );
        for (name, value) in request.headers() {
            let shown = if value.is_sensitive() {
                "***"
            } else {
                value.to_str().unwrap_or("(not text)")
            };
            out.push_str(&format!("{name}: {shown}\n"));
        }
        out.push('\n');
        out.push_str(envelope.payload.get());
        out
    }

    fn transport(&self) -> crate::tls::Transport {
        self.shared.transport.transport()
    }

    fn probe(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            let mut request = self.shared.client.head(self.base.clone());
            if let Some(token) = &self.token {
                request = request.header(header::AUTHORIZATION, token.clone());
            }
            match request.send().await {
                // Any answer, even 404 or 405, means the server is there.
                Ok(response) => {
                    self.shared.answered();
                    tracing::debug!(sink = %self.name, status = %response.status(), "HTTP sink reachable.");
                    Ok(())
                }
                Err(err) => Err(anyhow::anyhow!(
                    "cannot reach {}: {}",
                    redact::url(self.base.as_str()),
                    describe(&self.shared, err)
                )),
            }
        })
    }
}

fn compile_route(route: &HttpRoute) -> anyhow::Result<CompiledRoute> {
    let method = match &route.method {
        Some(m) => Some(
            Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes())
                .map_err(|_| anyhow::anyhow!("method {m:?} is not an HTTP method"))?,
        ),
        None => None,
    };
    if let Some(template) = &route.path {
        check_template(template, PLACEHOLDERS)?;
    }
    let mut headers = HeaderMap::new();
    for (name, value) in &route.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| anyhow::anyhow!("header name {name:?} is not a valid HTTP header name"))?;
        // The value may be a secret: never quote it.
        let mut value = HeaderValue::from_str(value).map_err(|_| {
            anyhow::anyhow!("the value of header {name} holds characters not allowed in a header")
        })?;
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    Ok(CompiledRoute {
        entity: route.entity.clone(),
        action: route.action.clone(),
        method,
        path: route.path.clone(),
        headers,
        idempotency_key: route.idempotency_key.clone(),
        body: route.body.clone(),
    })
}
/// One record of a run, ready to send (or already answered: its request could not be built).
struct Item {
    /// Its place in the batch.
    index: usize,
    request: Result<reqwest::Request, Outcome>,
    entity: String,
}

/// A worker: takes runs off `queue` until it is empty and sends each to its end.
async fn send_runs(
    shared: &Shared,
    queue: &Mutex<VecDeque<Vec<Item>>>,
    outcomes: &Mutex<Vec<Option<Outcome>>>,
) {
    loop {
        let Some(run) = lock(queue).pop_front() else {
            return;
        };
        send_run(shared, run, outcomes).await;
    }
}

/// Sends one key's records one after another; after the first that is not delivered, answers
/// the rest `Skipped` without sending them. Each outcome is stored as soon as it is known, so
/// a task that fails midway loses only the record it was sending.
async fn send_run(shared: &Shared, run: Vec<Item>, outcomes: &Mutex<Vec<Option<Outcome>>>) {
    let mut held = false;
    for item in run {
        let outcome = match item.request {
            _ if held => Outcome::Skipped,
            Err(outcome) => outcome,
            Ok(request) => send(shared, request, &item.entity).await,
        };
        held = !matches!(outcome, Outcome::Delivered);
        lock(outcomes)[item.index] = Some(outcome);
    }
}

/// Locks a mutex of the batch; it is never held across an await, and a panic while holding it
/// (none of the code under it panics) would leave nothing half-written worth refusing.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Sends one record's request; a failure names the method and the entity, not the path,
/// which holds the record key.
async fn send(shared: &Shared, request: reqwest::Request, entity: &str) -> Outcome {
    let method = request.method().clone();
    match shared.client.execute(request).await {
        Ok(response) => {
            shared.answered();
            classify(response, &shared.secrets).await
        }
        Err(err) => Outcome::Retry {
            error: format!("{method} {entity}: {}", describe(shared, err)),
            retry_after: None,
        },
    }
}

/// Sorts an answer into delivered / retry / dead (contract 5). The status is what is shown;
/// the body (APIs echo the payload) goes only into a dead letter's detail.
async fn classify(response: Response, secrets: &Secrets) -> Outcome {
    let status = response.status();
    if status.is_success() {
        // Read the (usually small) answer so the connection can be reused.
        let _ = response.bytes().await;
        return Outcome::Delivered;
    }
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let transient = matches!(
        status,
        StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_EARLY | StatusCode::TOO_MANY_REQUESTS
    ) || status.is_server_error();
    let summary = format!("HTTP {status}");
    if transient {
        // Read (the start of) the answer so the connection can be reused; its text is not
        // kept: a 503's body may echo the request as well as a 422's.
        let _ = body_start(response).await;
        Outcome::Retry {
            error: summary,
            retry_after,
        }
    } else {
        let body = secrets.scrub(&body_start(response).await);
        Outcome::Dead {
            reason: Refusal::new(summary, &body),
        }
    }
}

/// The first [`MAX_ERROR_BODY_BYTES`] of a body, as text; whatever arrived if reading fails.
async fn body_start(mut response: Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < MAX_ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    bytes.truncate(MAX_ERROR_BODY_BYTES);
    String::from_utf8_lossy(&bytes).trim().to_owned()
}

/// `Retry-After`: delay in seconds or an HTTP-date (IMF-fixdate); a date in the past is zero.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

/// A transport error as one line, with its causes, without URL, token or password.
fn describe(shared: &Shared, err: reqwest::Error) -> String {
    let err = err.without_url();
    let text = if err.is_timeout() {
        format!(
            "timed out after {:?}: {}",
            shared.timeout,
            error_chain(&err)
        )
    } else if err.is_connect() {
        format!("cannot connect: {}", error_chain(&err))
    } else {
        error_chain(&err)
    };
    shared.secrets.scrub(&text)
}
