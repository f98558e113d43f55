//! Proves contracts 6 and 7 against the running binary: every kind of request the ingest API
//! refuses — 400 (invalid JSON; names outside `[a-z0-9_-]`, with `..`, `%2e%2e`, `_failed`, upper
//! case; a body that is not an object or an array of objects), 401 (`INGEST_TOKEN`), 413 (over
//! `MAX_BODY_BYTES`, announced or chunked), 415, 422 (the entity's JSON Schema from
//! `CONFIG_FILE`) and 507 (`STAGING_MAX_BYTES`) — answers JSON `{"error", "message"}` and
//! stages nothing: the status shows nothing pending, the staging folder holds no record file
//! and the central API receives nothing. And `estafeta run` on a non-loopback `INGEST_ADDR`
//! without `INGEST_TOKEN` exits at once, non-zero, naming `INGEST_TOKEN`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use estafeta_e2e::{
    Agent, FlakyHttpServer, RawBody, free_port, log_tail, raw_request, record_files, run_cli,
    status_with,
};
use serde_json::{Value, json};

const TOKEN: &str = "s3cret-ingest-token-of-32-characters";
const MAX_BODY: usize = 4096;

/// One refused request and the answer it must get.
struct Case {
    what: &'static str,
    target: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    chunked: bool,
    status: u16,
    error: &'static str,
}

fn case(what: &'static str, target: &str, body: &str, status: u16, error: &'static str) -> Case {
    Case {
        what,
        target: target.to_owned(),
        headers: vec![
            ("Authorization", format!("Bearer {TOKEN}")),
            ("Content-Type", "application/json".to_owned()),
        ],
        body: body.as_bytes().to_vec(),
        chunked: false,
        status,
        error,
    }
}

impl Case {
    fn header(mut self, name: &'static str, value: Option<&str>) -> Self {
        self.headers.retain(|(n, _)| *n != name);
        if let Some(value) = value {
            self.headers.push((name, value.to_owned()));
        }
        self
    }

    fn chunked(mut self) -> Self {
        self.chunked = true;
        self
    }
}

fn cases() -> Vec<Case> {
    const P: &str = "/v1/records/create/patient";
    let good = r#"{"id": 1, "name": "Ana"}"#;
    let big = format!(
        r#"{{"id": 1, "name": "Ana", "notes": "{}"}}"#,
        "x".repeat(MAX_BODY)
    );
    vec![
        // 400: invalid JSON.
        case(
            "truncated JSON",
            P,
            r#"{"id": 1, "name": "#,
            400,
            "invalid_json",
        ),
        case(
            "trailing garbage",
            P,
            r#"{"id": 1} {"id": 2}"#,
            400,
            "invalid_json",
        ),
        case("empty body", P, "", 400, "invalid_json"),
        Case {
            body: b"{\"id\": 1, \"name\": \"Ana \xff\"}".to_vec(),
            ..case("not UTF-8", P, "", 400, "invalid_json")
        },
        // 400: names.
        case(
            "literal .. as entity",
            "/v1/records/create/..",
            good,
            400,
            "invalid_name",
        ),
        case(
            "literal .. as action",
            "/v1/records/../patient",
            good,
            400,
            "invalid_name",
        ),
        case(
            "%2e%2e as entity",
            "/v1/records/create/%2e%2e",
            good,
            400,
            "invalid_name",
        ),
        case(
            "%2E%2E as action",
            "/v1/records/%2E%2E/patient",
            good,
            400,
            "invalid_name",
        ),
        case(
            "encoded slash",
            "/v1/records/create/..%2Fetc",
            good,
            400,
            "invalid_name",
        ),
        case(
            "_failed as action",
            "/v1/records/_failed/patient",
            good,
            400,
            "invalid_name",
        ),
        case(
            "_state as entity",
            "/v1/records/create/_state",
            good,
            400,
            "invalid_name",
        ),
        case(
            "upper case entity",
            "/v1/records/create/Patient",
            good,
            400,
            "invalid_name",
        ),
        case(
            "upper case action",
            "/v1/records/CREATE/patient",
            good,
            400,
            "invalid_name",
        ),
        case(
            "space in a name",
            "/v1/records/create/pa%20tient",
            good,
            400,
            "invalid_name",
        ),
        case(
            "name over 64 characters",
            &format!("/v1/records/create/{}", "a".repeat(65)),
            good,
            400,
            "invalid_name",
        ),
        // 400: the body's shape.
        case("a number", P, "42", 400, "invalid_body"),
        case("a string", P, r#""Ana""#, 400, "invalid_body"),
        case("null", P, "null", 400, "invalid_body"),
        case("an empty array", P, "[]", 400, "invalid_body"),
        case("an array of numbers", P, "[1, 2]", 400, "invalid_body"),
        case(
            "an array with one non-object",
            P,
            r#"[{"id": 1, "name": "Ana"}, "Bia"]"#,
            400,
            "invalid_body",
        ),
        case(
            "nested arrays",
            P,
            r#"[[{"id": 1, "name": "Ana"}]]"#,
            400,
            "invalid_body",
        ),
        // 401.
        case("no token", P, good, 401, "unauthorized").header("Authorization", None),
        case("wrong token", P, good, 401, "unauthorized")
            .header("Authorization", Some("Bearer not-the-token")),
        case("token without Bearer", P, good, 401, "unauthorized")
            .header("Authorization", Some(TOKEN)),
        // 413.
        case("body over MAX_BODY_BYTES", P, &big, 413, "body_too_large"),
        case(
            "chunked body over MAX_BODY_BYTES",
            P,
            &big,
            413,
            "body_too_large",
        )
        .chunked(),
        // 415.
        case("text/plain", P, good, 415, "unsupported_media_type")
            .header("Content-Type", Some("text/plain")),
        case(
            "form encoded",
            P,
            "id=1&name=Ana",
            415,
            "unsupported_media_type",
        )
        .header("Content-Type", Some("application/x-www-form-urlencoded")),
        case("no Content-Type", P, good, 415, "unsupported_media_type")
            .header("Content-Type", None),
        // 422: the schema of entity patient.
        case(
            "id of the wrong type",
            P,
            r#"{"id": "one", "name": "Ana"}"#,
            422,
            "schema_violation",
        ),
        case(
            "required field missing",
            P,
            r#"{"id": 1}"#,
            422,
            "schema_violation",
        ),
        case(
            "one bad record in an array",
            P,
            r#"[{"id": 1, "name": "Ana"}, {"id": 2, "name": 7}, {"id": 3, "name": "Caio"}]"#,
            422,
            "schema_violation",
        ),
    ]
}

async fn send(addr: SocketAddr, c: &Case) -> (u16, Value) {
    let headers: Vec<(&str, &str)> = c.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let body = if c.chunked {
        RawBody::Chunked(c.body.chunks(1024).collect())
    } else {
        RawBody::Full(&c.body)
    };
    raw_request(addr, "POST", &c.target, &headers, body).await
}

/// The answer is exactly `{"error": <code>, "message": <non-empty text>}`.
fn check_error_body(what: &str, body: &Value, code: &str) -> Result<(), String> {
    let object = body
        .as_object()
        .ok_or_else(|| format!("{what}: the answer is not a JSON object: {body}"))?;
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys != ["error", "message"] {
        return Err(format!("{what}: expected keys error and message: {body}"));
    }
    if body["error"] != code {
        return Err(format!("{what}: expected error {code:?}: {body}"));
    }
    if body["message"].as_str().is_none_or(|m| m.trim().is_empty()) {
        return Err(format!("{what}: the message is empty: {body}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_a_json_error_and_stages_nothing() {
    let server = FlakyHttpServer::start_with_seed(5).await;
    let dir = tempfile::tempdir().unwrap();
    let schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["id", "name"],
        "properties": {"id": {"type": "integer"}, "name": {"type": "string"}}
    });
    std::fs::write(dir.path().join("patient.schema.json"), schema.to_string()).unwrap();
    std::fs::write(
        dir.path().join("estafeta.toml"),
        "[entities.patient]\nschema = \"patient.schema.json\"\n",
    )
    .unwrap();
    let url = server.url();
    let max_body = MAX_BODY.to_string();
    let env = [
        ("CENTRAL_API_URL", url.as_str()),
        ("CONFIG_FILE", "estafeta.toml"),
        ("INGEST_TOKEN", TOKEN),
        ("MAX_BODY_BYTES", max_body.as_str()),
        ("CRONTAB", "* * * * * *"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let addr = agent.addr();

    let mut problems = Vec::new();
    for c in cases() {
        let (status, body) = send(addr, &c).await;
        if status != c.status {
            problems.push(format!(
                "{}: POST {} answered {status}, expected {}: {body}",
                c.what, c.target, c.status
            ));
            continue;
        }
        if let Err(problem) = check_error_body(c.what, &body, c.error) {
            problems.push(problem);
        }
    }
    // The status needs the token too.
    let (status, body) = raw_request(addr, "GET", "/v1/status", &[], RawBody::None).await;
    if status != 401 {
        problems.push(format!(
            "GET /v1/status without the token answered {status}: {body}"
        ));
    }
    assert!(
        problems.is_empty(),
        "{} refused request(s) were not answered as expected:\n  {}\nagent log tail:\n{}",
        problems.len(),
        problems.join("\n  "),
        log_tail(&agent, 40)
    );

    // Nothing was staged, nothing was sent.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let status = status_with(&agent, Some(TOKEN)).await;
    assert_eq!(status["records_pending"], 0, "{status}");
    assert_eq!(status["ingest"]["records_staged"], 0, "{status}");
    let staging = dir.path().join("staging");
    assert_eq!(record_files(&staging), Vec::<std::path::PathBuf>::new());
    assert!(server.requests().is_empty(), "nothing reached the API");

    // Control: the same agent takes a good request, so the refusals above were not vacuous.
    let good = case(
        "good",
        "/v1/records/create/patient",
        r#"{"id": 1, "name": "Ana"}"#,
        202,
        "",
    );
    let (status, body) = send(addr, &good).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(record_files(&staging).len(), 1, "one segment file now");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_staging_area_answers_507_and_stages_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("CENTRAL_API_URL", "http://127.0.0.1:9"),
        ("STAGING_MAX_BYTES", "1"),
    ];
    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let (status, body) = agent
        .post("create", "patient", &json!({"id": 1, "name": "Ana"}))
        .await;
    assert_eq!(status.as_u16(), 507, "{body}\n{}", log_tail(&agent, 30));
    check_error_body("staging limit", &body, "staging_full").unwrap();
    let status = estafeta_e2e::status(&agent).await;
    assert_eq!(status["records_pending"], 0, "{status}");
    assert_eq!(
        record_files(&dir.path().join("staging")),
        Vec::<std::path::PathBuf>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_ingest_address_without_a_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("0.0.0.0:{}", free_port());
    // Clear HTTP on purpose: this test is about the token (ingest_tls.rs covers TLS).
    let env = [
        ("INGEST_ADDR", addr.as_str()),
        ("INGEST_ALLOW_PLAINTEXT", "true"),
        ("CENTRAL_API_URL", "http://127.0.0.1:9"),
    ];
    let started = Instant::now();
    let out = run_cli(dir.path(), &env, &["run"]).await;
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "estafeta run on {addr} without INGEST_TOKEN must fail: {stderr}"
    );
    assert!(
        took < Duration::from_secs(10),
        "it must fail at once, took {took:?}"
    );
    assert!(
        stderr.contains("INGEST_TOKEN"),
        "the message names INGEST_TOKEN: {stderr}"
    );
    assert!(
        !dir.path().join("staging").exists(),
        "nothing was created before refusing"
    );

    // With a token the same address is accepted, and the token is enforced.
    let mut agent = Agent::spec(dir.path())
        .envs(env)
        .env("INGEST_TOKEN", TOKEN)
        .spawn();
    agent.wait_ready(Duration::from_secs(20)).await;
    let (status, body) = agent.post("create", "patient", &json!({"id": 1})).await;
    assert_eq!(status.as_u16(), 401, "{body}");
    check_error_body("no token", &body, "unauthorized").unwrap();
}
