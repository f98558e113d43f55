//! The status page (`GET /`) in a real browser: Debian's headless Chromium driven through
//! chromedriver (WebDriver). A record the API refuses for good becomes a dead letter; the page
//! asks for the token, shows the dead letter with the API's reason, a screenshot is taken, the
//! API is fixed, the Requeue button is clicked, and the record is seen delivered.
//!
//! Needs `chromium` and `chromedriver` (`scripts/install-deps` installs them); fails, never
//! skips, when they are missing.
//!
//! Also the drain rate and time to empty that `GET /v1/status`, `estafeta status` and the page
//! show: a backlog staged while the sink is down reads "not draining" (in the API and on the
//! page), then drains at a rate the agent measures, with a time to empty that matches what is
//! left.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use estafeta_e2e::{Agent, FlakyHttpServer, free_port, log_tail, profile_dir, run_cli};
use fantoccini::{ClientBuilder, Locator};
use serde_json::json;

/// chromedriver on a free loopback port, killed on drop.
pub(crate) struct Chromedriver {
    child: Child,
    port: u16,
}

impl Chromedriver {
    pub(crate) async fn start() -> Self {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start chromedriver ({e}); run scripts/install-deps (Debian packages chromium and chromium-driver)")
            });
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on 127.0.0.1:{port} within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self { child, port }
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 200 ms for up to 20 s; panics with `what` and the agent's log.
pub(crate) async fn eventually<F, Fut>(agent: &Agent, what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "waited 20 s for {what}; agent log tail:\n{}",
            log_tail(agent, 40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A headless Chromium session through `driver`, its profile in `profile`.
pub(crate) async fn open_browser(
    driver: &Chromedriver,
    profile: &std::path::Path,
) -> fantoccini::Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000",
                format!("--user-data-dir={}", profile.display()),
            ]
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a Chromium session through chromedriver")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_dead_letter_and_its_requeue_button_delivers_it() {
    let api = FlakyHttpServer::start().await;
    api.respond_for("/patient", 422, json!({"detail": "<b>cpf</b> inválido"}));
    let dir = tempfile::tempdir().unwrap();
    let url = api.url();
    let token = "page-token-7f3a";
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("INGEST_TOKEN", token),
        ("CRONTAB", "* * * * * *"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let answer = agent
        .client()
        .post(agent.url("/v1/records/create/patient"))
        .bearer_auth(token)
        .json(&json!({"id": "p-1", "cpf": "000"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    let record: serde_json::Value = answer.json().await.unwrap();
    let record_id = record["id"].as_str().unwrap().to_owned();
    let status_with_token = |agent: &Agent| {
        let request = agent
            .client()
            .get(agent.url("/v1/status"))
            .bearer_auth(token);
        async move {
            request
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    eventually(&agent, "the record to become a dead letter", || async {
        status_with_token(&agent).await["sinks"][0]["dead"] == 1
    })
    .await;

    let driver = Chromedriver::start().await;
    let profile = tempfile::tempdir().unwrap();
    let browser = open_browser(&driver, profile.path()).await;

    browser.goto(&agent.url("/")).await.unwrap();
    // The agent has a token: the page asks for it before showing anything.
    let field = browser
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css("#login:not([hidden]) #token"))
        .await
        .expect("the page asks for the token");
    field.send_keys(token).await.unwrap();
    browser
        .find(Locator::Css("#login button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let button = browser
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css("#dead button.requeue"))
        .await
        .expect("the dead letter is listed with a Requeue button");
    let dead_text = browser
        .find(Locator::Css("#dead tbody"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(dead_text.contains("patient"), "{dead_text}");
    // The API's answer is shown as text: its markup is not interpreted.
    assert!(
        dead_text.contains("HTTP 422") && dead_text.contains("<b>cpf</b> inválido"),
        "{dead_text}"
    );
    let sinks_text = browser
        .find(Locator::Css("#sinks tbody"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(sinks_text.starts_with("api"), "{sinks_text}");
    let summary = browser
        .find(Locator::Id("summary"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        summary.starts_with("0 waiting to be delivered · 1 dead letter ·"),
        "{summary}"
    );

    let png = browser.screenshot().await.expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    let shot = profile_dir().join("status-page.png");
    std::fs::write(&shot, &png).unwrap();
    println!("screenshot of the status page: {}", shot.display());

    // The API is fixed; the button puts the record back in line and it is delivered.
    api.clear_status_for("/patient");
    button.click().await.unwrap();
    eventually(&agent, "the requeued record to be delivered", || async {
        api.requests()
            .iter()
            .any(|r| r.idempotency_key() == Some(record_id.as_str()) && r.succeeded())
    })
    .await;
    let result = browser
        .find(Locator::Id("requeue-result"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        result.starts_with("Requeued record 1 for sink api"),
        "{result}"
    );
    // The page refreshes itself: the dead letter disappears without a reload.
    browser
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::XPath(
            "//table[@id='dead']//td[contains(., 'No dead letters.')]",
        ))
        .await
        .expect("the dead-letter table empties by itself");
    let status = status_with_token(&agent).await;
    assert_eq!(status["sinks"][0]["dead"], 0, "{status}");
    assert_eq!(status["records_pending"], 0, "{status}");
    browser.close().await.unwrap();
}

/// The first sink of a `GET /v1/status` or `estafeta status --json` answer.
fn api_sink(status: &serde_json::Value) -> &serde_json::Value {
    &status["sinks"][0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_drain_rate_and_time_to_empty_while_a_backlog_drains() {
    const BACKLOG: u64 = 300;
    let api = FlakyHttpServer::start().await;
    api.down().await;
    let dir = tempfile::tempdir().unwrap();
    let url = api.url();
    // Short cycles (MAX_RECORDS records, one per tick) so the backlog drains over several
    // seconds at a rate the agent can measure between them, and retries soon after the outage.
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CRONTAB", "* * * * * *"),
        ("MAX_RECORDS", "30"),
        ("RETRY_MAX_SECS", "1"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let records: Vec<_> = (0..BACKLOG)
        .map(|i| json!({"id": format!("p-{i}"), "name": "Maria"}))
        .collect();
    let (code, _) = agent
        .post("create", "patient", &serde_json::Value::Array(records))
        .await;
    assert_eq!(code, 202);

    // The sink is down: nothing is delivered, so no rate and no time to empty.
    eventually(
        &agent,
        "a failed delivery while the sink is down",
        || async { !api_sink(&agent.get("/v1/status").await.1)["last_failure_at"].is_null() },
    )
    .await;
    let (_, status) = agent.get("/v1/status").await;
    let sink = api_sink(&status);
    assert_eq!(sink["pending"], BACKLOG, "{status}");
    assert_eq!(sink["drain_rate_per_sec"], 0.0, "{status}");
    assert!(sink["time_to_empty_secs"].is_null(), "{status}");
    // The page says so in words.
    let driver = Chromedriver::start().await;
    let profile = tempfile::tempdir().unwrap();
    let browser = open_browser(&driver, profile.path()).await;
    browser.goto(&agent.url("/")).await.unwrap();
    browser
        .wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::XPath(
            "//table[@id='sinks']//td[contains(., 'not draining')]",
        ))
        .await
        .expect("the page says the sink is not draining");
    browser.close().await.unwrap();

    // The sink comes back: while the backlog drains, the rate is positive and the time to
    // empty is what is left at that rate.
    api.up().await;
    let mut seen = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.is_none() {
        assert!(
            Instant::now() < deadline,
            "no status with a drain rate while records were left within 30 s; agent log tail:\n{}",
            log_tail(&agent, 40)
        );
        let (_, status) = agent.get("/v1/status").await;
        let sink = api_sink(&status);
        let waiting = sink["pending"].as_u64().unwrap() + sink["in_flight"].as_u64().unwrap();
        let rate = sink["drain_rate_per_sec"].as_f64().unwrap();
        if rate > 0.0 && waiting > 0 {
            seen = Some((waiting, rate, status.clone()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (waiting, rate, status) = seen.unwrap();
    let eta = api_sink(&status)["time_to_empty_secs"]
        .as_u64()
        .unwrap_or_else(|| panic!("a time to empty while draining: {status}"));
    // 30 records a tick: tens of records a second, never thousands.
    assert!(rate < 500.0, "{status}");
    let expected = waiting as f64 / rate;
    assert!(
        eta >= 1 && (eta as f64 - expected).abs() <= expected * 0.05 + 1.0,
        "time to empty {eta} s for {waiting} records at {rate}/s: {status}"
    );

    // `estafeta status` asks the running agent for the same figures.
    let ingest_addr = agent.addr().to_string();
    let cli_env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("INGEST_ADDR", ingest_addr.as_str()),
    ];
    let output = run_cli(dir.path(), &cli_env, &["status", "--json"]).await;
    assert!(output.status.success(), "{output:?}");
    let cli: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let cli_sink = api_sink(&cli);
    assert!(
        cli_sink["drain_rate_per_sec"].as_f64().unwrap() > 0.0,
        "{cli}"
    );
    if cli_sink["pending"].as_u64().unwrap() + cli_sink["in_flight"].as_u64().unwrap() > 0 {
        assert!(cli_sink["time_to_empty_secs"].as_u64().is_some(), "{cli}");
    }
    let output = run_cli(dir.path(), &cli_env, &["status"]).await;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("DRAIN_RATE") && text.contains("TIME_TO_EMPTY") && text.contains("/s"),
        "{text}"
    );

    eventually(&agent, "the backlog to drain", || async {
        agent.get("/v1/status").await.1["records_pending"] == 0
    })
    .await;
    assert_eq!(api.count_by_idempotency_key().len() as u64, BACKLOG);
    agent.terminate();
    agent.wait(Duration::from_secs(30)).await;

    // With no agent running, the CLI still shows the counts, and says the rate is unknown.
    let output = run_cli(dir.path(), &cli_env, &["status"]).await;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(text.contains("drain rate unknown"), "{text}");
}
