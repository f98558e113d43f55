//! The ingest HTTP API against a real staging store in a temporary folder, driven through
//! `tower::ServiceExt::oneshot`: every answer the API documents, and for every error, that
//! nothing was staged.

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use estafeta::config::{Config, EntityConfig};
use estafeta::ingest::{self, IngestState};
use estafeta_staging::{ListFilter, Options, Staging};
use serde_json::{Value, json};
use tower::ServiceExt;

const TOKEN: &str = "s3cret-token";

/// A configuration with no sinks (the store is opened with its own) and small limits.
fn test_config(root: &std::path::Path) -> Config {
    Config {
        crontab: "* * * * *".into(),
        ..Config::for_tests(root)
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    store: Staging,
    state: IngestState,
    app: Router,
}

fn harness_with(configure: impl FnOnce(&mut Config, &mut Options)) -> Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = test_config(dir.path());
    let mut options = Options::new(dir.path()).with_sinks(["test"]);
    options.min_free_bytes = 0;
    configure(&mut config, &mut options);
    let (store, _) = Staging::open(options).expect("store opens");
    let state = IngestState::new(store.clone(), config.into()).expect("state builds");
    let app = ingest::router(state.clone());
    Harness {
        _dir: dir,
        store,
        state,
        app,
    }
}

fn harness() -> Harness {
    harness_with(|_, _| {})
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|err| panic!("answer is not JSON ({err}): {}", self.text))
    }

    /// Asserts an error answer: status, JSON `{"error", "message"}` and the code.
    fn assert_error(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        let body = self.json();
        assert_eq!(body["error"], code, "{}", self.text);
        let message = body["message"].as_str().expect("message is text");
        assert!(!message.is_empty());
        assert_eq!(
            body.as_object().map(|o| o.len()),
            Some(2),
            "only error and message: {body}"
        );
        assert_eq!(
            self.headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            Some("application/json")
        );
    }
}

impl Harness {
    /// Sends `request` with `Host: 127.0.0.1:8787` when it names no host (as every HTTP/1.1
    /// client does; the API refuses a request without one).
    async fn send(&self, mut request: Request<Body>) -> Answer {
        if !request.headers().contains_key(header::HOST) {
            request
                .headers_mut()
                .insert(header::HOST, HeaderValue::from_static("127.0.0.1:8787"));
        }
        self.send_as_is(request).await
    }

    /// Sends `request` exactly as built.
    async fn send_as_is(&self, request: Request<Body>) -> Answer {
        let response = self
            .app
            .clone()
            .oneshot(request)
            .await
            .expect("router is infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body reads");
        Answer {
            status,
            headers,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn post(&self, path: &str, body: &str) -> Answer {
        self.send(
            post(path)
                .body(Body::from(body.to_owned()))
                .expect("request"),
        )
        .await
    }

    fn pending(&self) -> u64 {
        self.store.status().expect("status").records_pending
    }

    fn records(&self) -> Vec<estafeta_staging::RecordInfo> {
        self.store.list(&ListFilter::default()).expect("list")
    }

    fn assert_nothing_staged(&self) {
        assert_eq!(self.pending(), 0);
        assert!(self.records().is_empty());
    }
}

fn post(path: &str) -> axum::http::request::Builder {
    Request::post(path).header(header::CONTENT_TYPE, "application/json")
}

#[tokio::test]
async fn object_is_staged_and_answered_with_id_seq_and_path() {
    let h = harness();
    let answer = h
        .post(
            "/v1/records/create/patient",
            r#"{"id": "p-1", "name": "Ana"}"#,
        )
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    let body = answer.json();
    assert!(body["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(body["seq"].as_u64().is_some());
    let path = body["path"].as_str().expect("path");
    assert!(std::path::Path::new(path).exists(), "{path}");
    assert_eq!(h.pending(), 1);
    let records = h.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].action, "create");
    assert_eq!(records[0].entity, "patient");
    assert_eq!(records[0].key.as_deref(), Some("p-1"));
    assert_eq!(records[0].id, body["id"].as_str().expect("id"));
}

#[tokio::test]
async fn array_is_staged_all_together() {
    let h = harness();
    let answer = h
        .post(
            "/v1/records/update/patient",
            r#"[{"id": 1}, {"id": 2}, {"name": "no key"}]"#,
        )
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    let body = answer.json();
    assert_eq!(body["ids"].as_array().map(Vec::len), Some(3));
    let seqs: Vec<u64> = body["seqs"]
        .as_array()
        .expect("seqs")
        .iter()
        .map(|s| s.as_u64().expect("number"))
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(h.pending(), 3);
    let keys: Vec<Option<String>> = h.records().into_iter().map(|r| r.key).collect();
    assert_eq!(keys, vec![Some("1".into()), Some("2".into()), None]);
}

#[tokio::test]
async fn record_key_header_overrides_the_key_field() {
    let h = harness_with(|config, _| {
        config.entities.insert(
            "visit".into(),
            EntityConfig {
                key_field: Some("visit_no".into()),
                schema: None,
            },
        );
    });
    let answer = h
        .post(
            "/v1/records/create/visit",
            r#"{"visit_no": "v-9", "id": "x"}"#,
        )
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    let answer = h
        .send(
            post("/v1/records/create/visit")
                .header("X-Record-Key", "from-header")
                .body(Body::from(r#"{"visit_no": "v-9"}"#))
                .expect("request"),
        )
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    let keys: Vec<Option<String>> = h.records().into_iter().map(|r| r.key).collect();
    assert_eq!(keys, vec![Some("v-9".into()), Some("from-header".into())]);
}

#[tokio::test]
async fn idempotency_key_replays_the_first_answer_and_refuses_another_body() {
    let h = harness();
    let request = |body: &str| {
        post("/v1/records/create/patient")
            .header("Idempotency-Key", "req-1")
            .body(Body::from(body.to_owned()))
            .expect("request")
    };
    let first = h.send(request(r#"{"id": 1}"#)).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.text);
    assert!(first.headers.get("idempotent-replayed").is_none());

    let again = h.send(request(r#"{"id": 1}"#)).await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{}", again.text);
    assert_eq!(again.json(), first.json());
    assert_eq!(
        again
            .headers
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    assert_eq!(h.pending(), 1);

    let other = h.send(request(r#"{"id": 2}"#)).await;
    other.assert_error(StatusCode::CONFLICT, "idempotency_conflict");
    assert_eq!(h.pending(), 1);

    // The same key on another entity is another request too.
    let elsewhere = h
        .send(
            post("/v1/records/create/visit")
                .header("Idempotency-Key", "req-1")
                .body(Body::from(r#"{"id": 1}"#))
                .expect("request"),
        )
        .await;
    elsewhere.assert_error(StatusCode::CONFLICT, "idempotency_conflict");
    assert_eq!(h.pending(), 1);
}

#[tokio::test]
async fn token_is_required_when_configured() {
    let h = harness_with(|config, _| config.ingest_token = Some(TOKEN.into()));
    let body = r#"{"id": 1}"#;
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Basic czNjcmV0LXRva2Vu"),
        Some("Bearer"),
    ] {
        let mut request = post("/v1/records/create/patient");
        if let Some(auth) = auth {
            request = request.header(header::AUTHORIZATION, auth);
        }
        let answer = h
            .send(request.body(Body::from(body)).expect("request"))
            .await;
        answer.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
        assert_eq!(
            answer
                .headers
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok()),
            Some("Bearer")
        );
    }
    // The token is checked before anything else, even a bad name.
    let answer = h
        .send(
            post("/v1/records/_x/patient")
                .body(Body::from(body))
                .expect("request"),
        )
        .await;
    answer.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    let status = h
        .send(
            Request::get("/v1/status")
                .body(Body::empty())
                .expect("request"),
        )
        .await;
    status.assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    h.assert_nothing_staged();

    let answer = h
        .send(
            post("/v1/records/create/patient")
                .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
                .body(Body::from(body))
                .expect("request"),
        )
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    assert_eq!(h.pending(), 1);
}

#[tokio::test]
async fn names_outside_the_pattern_are_refused() {
    let h = harness();
    let long = "a".repeat(65);
    for path in [
        "/v1/records/Create/patient".to_owned(),
        "/v1/records/create/_failed".to_owned(),
        "/v1/records/create/pa.tient".to_owned(),
        "/v1/records/create/%2E%2E".to_owned(),
        "/v1/records/cr%20eate/patient".to_owned(),
        format!("/v1/records/create/{long}"),
    ] {
        let answer = h.post(&path, r#"{"id": 1}"#).await;
        answer.assert_error(StatusCode::BAD_REQUEST, "invalid_name");
    }
    h.assert_nothing_staged();
}

#[tokio::test]
async fn content_type_must_be_json() {
    let h = harness();
    let body = r#"{"id": 1}"#;
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut request = Request::post("/v1/records/create/patient");
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        let answer = h
            .send(request.body(Body::from(body)).expect("request"))
            .await;
        answer.assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    }
    h.assert_nothing_staged();
    let answer = h
        .send(
            Request::post("/v1/records/create/patient")
                .header(header::CONTENT_TYPE, "Application/JSON; charset=utf-8")
                .body(Body::from(body))
                .expect("request"),
        )
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
}

#[tokio::test]
async fn body_over_the_limit_is_refused() {
    let h = harness(); // MAX_BODY_BYTES = 4096
    let big = format!(r#"{{"id": 1, "blob": "{}"}}"#, "x".repeat(5000));
    // Declared length over the limit.
    let answer = h
        .send(
            post("/v1/records/create/patient")
                .header(header::CONTENT_LENGTH, big.len())
                .body(Body::from(big.clone()))
                .expect("request"),
        )
        .await;
    answer.assert_error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    // No declared length: cut off while reading, never buffered whole.
    let answer = h
        .send(
            post("/v1/records/create/patient")
                .body(Body::from(big.clone()))
                .expect("request"),
        )
        .await;
    answer.assert_error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    h.assert_nothing_staged();
}

#[tokio::test]
async fn invalid_json_names_line_and_column() {
    let h = harness();
    let answer = h
        .post("/v1/records/create/patient", "{\"id\": 1,\n  \"name\": }")
        .await;
    answer.assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    let message = answer.json()["message"].as_str().expect("text").to_owned();
    assert!(message.contains("line 2 column"), "{message}");
    for body in ["", "{", r#"{"id": 1} trailing"#] {
        let answer = h.post("/v1/records/create/patient", body).await;
        answer.assert_error(StatusCode::BAD_REQUEST, "invalid_json");
    }
    h.assert_nothing_staged();
}

#[tokio::test]
async fn bodies_other_than_objects_are_refused() {
    let h = harness();
    for body in [
        "[]",
        "3",
        "null",
        r#""text""#,
        "[1, 2]",
        r#"[{"id": 1}, "x"]"#,
        "[[]]",
    ] {
        let answer = h.post("/v1/records/create/patient", body).await;
        answer.assert_error(StatusCode::BAD_REQUEST, "invalid_body");
    }
    h.assert_nothing_staged();
}

#[tokio::test]
async fn schema_violation_names_pointer_and_rule_and_stages_nothing() {
    let h = harness_with(|config, _| {
        config.entities.insert(
            "patient".into(),
            EntityConfig {
                key_field: None,
                schema: Some(json!({
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string"},
                        "age": {"type": "integer", "minimum": 0}
                    }
                })),
            },
        );
    });
    let answer = h
        .post(
            "/v1/records/create/patient",
            r#"{"name": "Ana", "age": -4}"#,
        )
        .await;
    answer.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "schema_violation");
    let message = answer.json()["message"].as_str().expect("text").to_owned();
    assert!(message.contains("/age"), "{message}");
    assert!(message.contains("minimum"), "{message}");
    assert!(
        !message.contains("-4"),
        "the value is not echoed: {message}"
    );

    // One bad record in an array refuses the whole array.
    let answer = h
        .post(
            "/v1/records/create/patient",
            r#"[{"name": "Ana"}, {"age": 3}]"#,
        )
        .await;
    answer.assert_error(StatusCode::UNPROCESSABLE_ENTITY, "schema_violation");
    let message = answer.json()["message"].as_str().expect("text").to_owned();
    assert!(message.contains("record 1"), "{message}");
    assert!(message.contains("required"), "{message}");
    h.assert_nothing_staged();

    // Other entities have no schema; valid records pass.
    let answer = h.post("/v1/records/create/visit", r#"{"age": -4}"#).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    let answer = h
        .post("/v1/records/create/patient", r#"{"name": "Ana", "age": 4}"#)
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text);
    assert_eq!(h.pending(), 2);
}

#[tokio::test]
async fn full_staging_answers_507() {
    let h = harness_with(|_, options| options.max_bytes = Some(10));
    let answer = h.post("/v1/records/create/patient", r#"{"id": 1}"#).await;
    answer.assert_error(StatusCode::INSUFFICIENT_STORAGE, "staging_full");
    assert!(answer.headers.get(header::RETRY_AFTER).is_some());
    h.assert_nothing_staged();
    let ready = h
        .send(
            Request::get("/readyz")
                .body(Body::empty())
                .expect("request"),
        )
        .await;
    ready.assert_error(StatusCode::SERVICE_UNAVAILABLE, "not_ready");
}

#[tokio::test]
async fn shutting_down_answers_503() {
    let h = harness();
    h.state.begin_shutdown();
    let answer = h.post("/v1/records/create/patient", r#"{"id": 1}"#).await;
    answer.assert_error(StatusCode::SERVICE_UNAVAILABLE, "shutting_down");
    assert!(answer.headers.get(header::RETRY_AFTER).is_some());
    h.assert_nothing_staged();
    let ready = h
        .send(
            Request::get("/readyz")
                .body(Body::empty())
                .expect("request"),
        )
        .await;
    ready.assert_error(StatusCode::SERVICE_UNAVAILABLE, "not_ready");
}

#[tokio::test]
async fn unknown_paths_and_wrong_methods_answer_json() {
    let h = harness();
    let answer = h
        .send(
            Request::get("/v1/nothing")
                .body(Body::empty())
                .expect("request"),
        )
        .await;
    answer.assert_error(StatusCode::NOT_FOUND, "not_found");
    let answer = h.post("/v1/records/create", r#"{"id": 1}"#).await;
    answer.assert_error(StatusCode::NOT_FOUND, "not_found");
    let answer = h
        .send(
            Request::get("/v1/records/create/patient")
                .body(Body::empty())
                .expect("request"),
        )
        .await;
    answer.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    let answer = h
        .send(
            Request::delete("/healthz")
                .body(Body::empty())
                .expect("request"),
        )
        .await;
    answer.assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    h.assert_nothing_staged();
}

#[tokio::test]
async fn health_ready_status_and_metrics_answer() {
    let h = harness();
    let get = |path: &str| Request::get(path).body(Body::empty()).expect("request");
    let health = h.send(get("/healthz")).await;
    assert_eq!(
        (health.status, health.text.as_str()),
        (StatusCode::OK, "ok")
    );
    let ready = h.send(get("/readyz")).await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text);

    let answer = h
        .post("/v1/records/create/patient", r#"[{"id": 1}, {"id": 2}]"#)
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    let answer = h.post("/v1/records/create/patient", "nope").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);

    let status = h.send(get("/v1/status")).await;
    assert_eq!(status.status, StatusCode::OK, "{}", status.text);
    let status = status.json();
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["records_pending"], 2);
    assert_eq!(status["ingest"]["records_staged"], 2);
    assert_eq!(status["ingest"]["requests"]["202"], 1);
    assert_eq!(status["ingest"]["requests"]["400"], 1);
    assert!(status["uptime_secs"].is_u64());

    let metrics = h.send(get("/metrics")).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(
        metrics
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/plain"))
    );
    for line in [
        "estafeta_records_staged_total 2",
        "estafeta_ingest_requests_total{code=\"202\"} 1",
        "estafeta_ingest_requests_total{code=\"400\"} 1",
        "estafeta_records_pending{sink=\"test\"} 2",
        "estafeta_records_dead{sink=\"test\"} 0",
        "estafeta_staging_bytes ",
    ] {
        assert!(metrics.text.contains(line), "{line:?} in\n{}", metrics.text);
    }
}

#[tokio::test]
async fn openapi_document_lists_what_the_api_does() {
    let h = harness();
    let answer = h
        .send(
            Request::get("/v1/openapi.json")
                .body(Body::empty())
                .expect("request"),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let doc = answer.json();
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.0"))
    );
    let paths = doc["paths"].as_object().expect("paths");
    for (path, item) in paths {
        for method in item.as_object().expect("methods").keys() {
            // Every documented path and method exists (a real path for the template).
            let uri = path
                .replace("{action}", "create")
                .replace("{entity}", "patient")
                .replace("{sink}", "test")
                .replace("{seq}", "1");
            let request = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(&uri)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(r#"{"id": 1}"#))
                .expect("request");
            let answer = h.send(request).await;
            let code = answer.status.as_u16().to_string();
            assert!(
                item[method]["responses"].get(&code).is_some(),
                "{method} {path} answered {code}, which the document does not list"
            );
        }
    }
    let post = &paths["/v1/records/{action}/{entity}"]["post"];
    for code in [
        "202", "400", "401", "409", "413", "415", "422", "503", "507",
    ] {
        assert!(post["responses"].get(code).is_some(), "{code}");
    }
    let headers: Vec<&str> = post["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(headers.contains(&"Idempotency-Key") && headers.contains(&"X-Record-Key"));
    assert_eq!(
        doc["components"]["parameters"]["Entity"]["schema"]["pattern"],
        "^[a-z0-9-][a-z0-9_-]{0,63}$"
    );
}

/// A harness whose one record (seq 1) is a dead letter of sink `test`.
fn harness_with_a_dead_letter(token: Option<&str>) -> Harness {
    let h = harness_with(|config, _| {
        config.ingest_token = token.map(str::to_owned);
        config.ingest_allowed_hosts = vec!["agent.hospital.local".into()];
    });
    let seq = h
        .store
        .stage(estafeta_staging::NewRecord {
            action: "create".into(),
            entity: "patient".into(),
            key: Some("p-1".into()),
            payload: serde_json::value::RawValue::from_string(r#"{"id":"p-1"}"#.into()).unwrap(),
            sinks: None,
        })
        .expect("stages")
        .seq;
    assert_eq!(h.store.next_batch("test", 10).unwrap().len(), 1);
    h.store.dead("test", seq, "HTTP 422: cpf inválido").unwrap();
    h
}

fn requeue_request(host: &str, extra: &[(&str, &str)]) -> Request<Body> {
    let mut request = Request::post("/v1/dead-letters/test/1/requeue").header(header::HOST, host);
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    request.body(Body::empty()).expect("request")
}

#[tokio::test]
async fn dead_letters_are_listed_and_requeued_only_by_a_same_origin_request() {
    let h = harness_with_a_dead_letter(None);
    let list = h
        .send(
            Request::get("/v1/dead-letters")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text);
    let letters = list.json()["dead_letters"].clone();
    assert_eq!(letters[0]["seq"], 1, "{letters}");
    assert_eq!(letters[0]["reason"], "HTTP 422: cpf inválido", "{letters}");

    // What a hostile page could make a browser send is refused, and changes nothing.
    let marker = ("x-requested-by", "estafeta");
    for (why, request) in [
        (
            "no X-Requested-By (a plain HTML form)",
            requeue_request("127.0.0.1:8787", &[]),
        ),
        (
            "another origin",
            requeue_request(
                "127.0.0.1:8787",
                &[marker, ("origin", "http://evil.example")],
            ),
        ),
        (
            "a cross-site fetch",
            requeue_request(
                "127.0.0.1:8787",
                &[marker, ("sec-fetch-site", "cross-site")],
            ),
        ),
    ] {
        let answer = h.send(request).await;
        assert_eq!(
            answer.status,
            StatusCode::FORBIDDEN,
            "{why}: {}",
            answer.text
        );
        assert_eq!(answer.json()["error"], "cross_site_refused", "{why}");
    }
    // DNS rebinding: the page is same-origin with itself; its Host gives it away.
    let answer = h
        .send(requeue_request(
            "evil.example:8787",
            &[marker, ("origin", "http://evil.example:8787")],
        ))
        .await;
    answer.assert_error(StatusCode::MISDIRECTED_REQUEST, "host_not_allowed");
    assert_eq!(h.store.dead_letters(None).unwrap().len(), 1);

    // The page's own request goes through; a second one finds nothing to requeue.
    let own = [
        marker,
        ("origin", "http://127.0.0.1:8787"),
        ("sec-fetch-site", "same-origin"),
    ];
    let answer = h.send(requeue_request("127.0.0.1:8787", &own)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert!(h.store.dead_letters(None).unwrap().is_empty());
    assert_eq!(h.store.next_batch("test", 10).unwrap().len(), 1);
    let again = h.send(requeue_request("127.0.0.1:8787", &own)).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND, "{}", again.text);
}

#[tokio::test]
async fn with_a_token_dead_letters_and_requeue_need_it() {
    let h = harness_with_a_dead_letter(Some(TOKEN));
    let list = h
        .send(
            Request::get("/v1/dead-letters")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(list.status, StatusCode::UNAUTHORIZED);
    let marker = ("x-requested-by", "estafeta");
    let answer = h
        .send(requeue_request("agent.hospital.local:8787", &[marker]))
        .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.text);
    // With the token, a name of this agent in INGEST_ALLOWED_HOSTS may requeue.
    let bearer = format!("Bearer {TOKEN}");
    let answer = h
        .send(requeue_request(
            "agent.hospital.local:8787",
            &[marker, ("authorization", bearer.as_str())],
        ))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    // The page itself holds no data and needs no token; it names no other site.
    let page = h.send(Request::get("/").body(Body::empty()).unwrap()).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text.contains("/assets/status.js"));
    assert!(!page.text.contains("http://") && !page.text.contains("https://"));
    let csp = page.headers[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
}

/// Every documented operation and an unknown path, each as `(method, concrete uri)`.
fn every_route(doc: &Value) -> Vec<(String, String)> {
    let mut routes = vec![("get".to_owned(), "/nowhere".to_owned())];
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let uri = path
            .replace("{action}", "create")
            .replace("{entity}", "patient")
            .replace("{sink}", "test")
            .replace("{seq}", "1");
        for method in item.as_object().expect("methods").keys() {
            routes.push((method.clone(), uri.clone()));
        }
    }
    routes
}

/// DNS rebinding (contract 7, safe by default; a web page in THREATS.md). Every route, documented
/// or not, answers 421 to a `Host` that is not one of the agent's names, before its handler runs
/// (even with the right token): nothing is staged, requeued or shown, and the OpenAPI document
/// says so for each operation.
#[tokio::test]
async fn every_route_refuses_a_foreign_host_and_changes_nothing() {
    let h = harness_with_a_dead_letter(Some(TOKEN));
    let doc = h
        .send(
            Request::get("/v1/openapi.json")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .json();
    let before = (h.records().len(), h.pending());
    let bearer = format!("Bearer {TOKEN}");
    let routes = every_route(&doc);
    assert!(routes.len() > 10, "{routes:?}");
    for (method, uri) in &routes {
        for host in [
            "rebind.attacker.example",
            "rebind.attacker.example:8787",
            "10.1.2.3:8787",
            "localhost.attacker.example",
        ] {
            let request = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(uri)
                .header(header::HOST, host)
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::AUTHORIZATION, bearer.as_str())
                .header("x-requested-by", "estafeta")
                .body(Body::from(r#"{"id": "forged"}"#))
                .expect("request");
            let answer = h.send(request).await;
            answer.assert_error(StatusCode::MISDIRECTED_REQUEST, "host_not_allowed");
            let message = answer.json()["message"].as_str().unwrap_or("").to_owned();
            assert!(
                message.contains(host) && message.contains("INGEST_ALLOWED_HOSTS"),
                "{method} {uri} with Host {host}: {message}"
            );
        }
    }
    assert_eq!((h.records().len(), h.pending()), before);
    assert_eq!(h.store.dead_letters(None).unwrap().len(), 1);
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("methods") {
            for code in ["400", "421"] {
                assert!(
                    operation["responses"].get(code).is_some(),
                    "{method} {path} does not document {code}"
                );
            }
        }
    }
}

#[tokio::test]
async fn loopback_names_the_bind_address_and_allowed_hosts_are_answered() {
    let h = harness_with(|config, _| {
        config.ingest_addr = "192.168.7.7:8787".parse().expect("address");
        config.ingest_token = Some(TOKEN.into());
        config.ingest_allowed_hosts = vec!["estafeta.hospital.local".into(), "10.0.0.5".into()];
    });
    let bearer = format!("Bearer {TOKEN}");
    let send = |host: &str| {
        post("/v1/records/create/patient")
            .header(header::HOST, host)
            .header(header::AUTHORIZATION, bearer.as_str())
            .body(Body::from(r#"{"id": 1}"#))
            .expect("request")
    };
    let accepted = [
        "localhost:8787",
        "localhost",
        "127.0.0.1:8787",
        "127.0.0.2",
        "[::1]:8787",
        "192.168.7.7:8787",
        "ESTAFETA.hospital.local:8787",
        "10.0.0.5",
    ];
    for host in accepted {
        let answer = h.send(send(host)).await;
        assert_eq!(
            answer.status,
            StatusCode::ACCEPTED,
            "{host}: {}",
            answer.text
        );
    }
    for host in [
        "estafeta.hospital.local.attacker.example",
        "hospital.local",
        "10.0.0.6:8787",
        "0.0.0.0:8787",
    ] {
        let answer = h.send(send(host)).await;
        answer.assert_error(StatusCode::MISDIRECTED_REQUEST, "host_not_allowed");
    }
    assert_eq!(h.pending(), accepted.len() as u64);
}

#[tokio::test]
async fn a_request_without_exactly_one_good_host_is_refused() {
    let h = harness();
    let body = r#"{"id": 1}"#;
    // No Host at all (HTTP/1.1 requires one; a browser always sends it).
    let answer = h
        .send_as_is(
            post("/v1/records/create/patient")
                .body(Body::from(body))
                .expect("request"),
        )
        .await;
    answer.assert_error(StatusCode::BAD_REQUEST, "invalid_host");
    // Two, the first a good one.
    let mut request = post("/v1/records/create/patient")
        .body(Body::from(body))
        .expect("request");
    for host in ["127.0.0.1:8787", "rebind.attacker.example"] {
        request
            .headers_mut()
            .append(header::HOST, HeaderValue::from_static(host));
    }
    let answer = h.send_as_is(request).await;
    answer.assert_error(StatusCode::BAD_REQUEST, "invalid_host");
    // Not a host name.
    for host in ["localhost:http", "[::1", "127.0.0.1:8787/x", "::1"] {
        let answer = h
            .send(
                post("/v1/records/create/patient")
                    .header(header::HOST, host)
                    .body(Body::from(body))
                    .expect("request"),
            )
            .await;
        answer.assert_error(StatusCode::BAD_REQUEST, "invalid_host");
    }
    // An absolute-form target naming another host, whatever the Host header says.
    let answer = h
        .send(
            post("http://rebind.attacker.example/v1/records/create/patient")
                .header(header::HOST, "127.0.0.1:8787")
                .body(Body::from(body))
                .expect("request"),
        )
        .await;
    answer.assert_error(StatusCode::MISDIRECTED_REQUEST, "host_not_allowed");
    h.assert_nothing_staged();
}
