//! Unit tests of the HTTP sink: routes, templates, the default mapping, answers and redaction.

use std::collections::BTreeMap;

use super::*;
use serde_json::value::RawValue;

fn envelope(action: &str, entity: &str, key: Option<&str>) -> Envelope {
    Envelope {
        v: 1,
        id: "0190a0a0-0000-7000-8000-000000000001".to_owned(),
        seq: 7,
        action: action.to_owned(),
        entity: entity.to_owned(),
        key: key.map(str::to_owned),
        staged_at: "2024-06-01T12:00:00.000000Z".to_owned(),
        client_key: None,
        client_fingerprint: None,
        client_records: None,
        sinks: vec!["api".to_owned()],
        source: None,
        payload: RawValue::from_string("{}".to_owned()).expect("valid JSON"),
    }
}

fn sink(routes: Vec<HttpRoute>) -> HttpSink {
    HttpSink::new(
        "api",
        HttpSinkConfig {
            url: "https://central.example/api/v1/?tenant=3".to_owned(),
            token: Some("s3cret".to_owned()),
            timeout: Duration::from_secs(5),
            verify_tls: true,
            ca_file: None,
            routes,
            idempotency_key: None,
            lookups: Default::default(),
            concurrency: 4,
            heartbeat_path: None,
        },
    )
    .expect("valid config")
}

fn target(sink: &HttpSink, e: &Envelope) -> (String, String) {
    let (method, url, _) = sink.target(e).expect("a target");
    (method.to_string(), url.to_string())
}

#[test]
fn default_mapping_follows_the_action_and_encodes_the_key() {
    let s = sink(vec![]);
    let base = "https://central.example/api/v1";
    let cases = [
        ("create", Some("1"), "POST", "/patient?tenant=3"),
        (
            "update",
            Some("a/b c"),
            "PUT",
            "/patient/a%2Fb%20c?tenant=3",
        ),
        ("upsert", Some("1"), "PUT", "/patient/1?tenant=3"),
        ("delete", Some("1"), "DELETE", "/patient/1?tenant=3"),
        ("delete", None, "POST", "/patient/delete?tenant=3"),
        ("update", None, "POST", "/patient/update?tenant=3"),
        ("deactivate", Some("1"), "POST", "/patient?tenant=3"),
    ];
    for (action, key, method, path) in cases {
        let got = target(&s, &envelope(action, "patient", key));
        assert_eq!(
            got,
            (method.to_owned(), format!("{base}{path}")),
            "{action} {key:?}"
        );
    }
}

#[test]
fn dot_keys_are_dead_not_folded_into_the_parent_path() {
    let s = sink(vec![]);
    for key in ["", ".", ".."] {
        let reason = s
            .target(&envelope("update", "patient", Some(key)))
            .map(drop)
            .expect_err("refused");
        assert!(reason.contains("path segment"), "{reason}");
    }
}

#[test]
fn first_matching_route_overrides_method_path_and_headers() {
    let route = |entity: Option<&str>, method: &str, path: &str| HttpRoute {
        entity: entity.map(str::to_owned),
        action: Some("delete".to_owned()),
        method: Some(method.to_owned()),
        path: Some(path.to_owned()),
        headers: BTreeMap::from([("X-Api-Key".to_owned(), "k".to_owned())]),
        idempotency_key: None,
        body: None,
    };
    let s = sink(vec![
        route(Some("patient"), "post", "/people/{key}/remove?by={action}"),
        route(None, "PATCH", "{entity}/{id}"),
    ]);
    assert_eq!(
        target(&s, &envelope("delete", "patient", Some("x y"))),
        (
            "POST".to_owned(),
            "https://central.example/api/v1/people/x%20y/remove?tenant=3&by=delete".to_owned()
        )
    );
    assert_eq!(
        target(&s, &envelope("delete", "visit", None)),
        (
            "PATCH".to_owned(),
            "https://central.example/api/v1/visit/0190a0a0-0000-7000-8000-000000000001?tenant=3"
                .to_owned()
        )
    );
    let err = s
        .target(&envelope("delete", "patient", None))
        .map(drop)
        .expect_err("no key");
    assert!(err.contains("no key"), "{err}");
}

#[test]
fn bad_routes_and_urls_fail_at_build_time() {
    let bad = HttpRoute {
        entity: None,
        action: None,
        method: None,
        path: Some("/x/{patient}".to_owned()),
        headers: BTreeMap::new(),
        idempotency_key: None,
        body: None,
    };
    let err = HttpSink::new(
        "api",
        HttpSinkConfig {
            url: "http://h/".to_owned(),
            token: None,
            timeout: Duration::from_secs(1),
            verify_tls: true,
            ca_file: None,
            routes: vec![bad],
            idempotency_key: None,
            lookups: Default::default(),
            concurrency: 1,
            heartbeat_path: None,
        },
    )
    .err()
    .expect("unknown placeholder");
    assert!(format!("{err:#}").contains("{patient}"), "{err:#}");

    let err = HttpSink::new(
        "api",
        HttpSinkConfig {
            url: "ftp://user:pw@h/".to_owned(),
            token: None,
            timeout: Duration::from_secs(1),
            verify_tls: true,
            ca_file: None,
            routes: vec![],
            idempotency_key: None,
            lookups: Default::default(),
            concurrency: 1,
            heartbeat_path: None,
        },
    )
    .err()
    .expect("bad scheme");
    assert!(!format!("{err:#}").contains("pw"), "{err:#}");
}

#[test]
fn retry_after_reads_seconds_and_dates() {
    assert_eq!(parse_retry_after(" 120 "), Some(Duration::from_secs(120)));
    assert_eq!(
        parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
        Some(Duration::ZERO)
    );
    let later = (chrono::Utc::now() + chrono::Duration::seconds(90))
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let wait = parse_retry_after(&later).expect("a date");
    assert!(wait > Duration::from_secs(80) && wait <= Duration::from_secs(90));
    assert_eq!(parse_retry_after("soon"), None);
}

#[test]
fn config_debug_hides_the_token() {
    let config = HttpSinkConfig {
        url: "https://u:pw@h/".to_owned(),
        token: Some("s3cret".to_owned()),
        timeout: Duration::from_secs(1),
        verify_tls: true,
        ca_file: None,
        routes: vec![],
        idempotency_key: None,
        lookups: Default::default(),
        concurrency: 1,
        heartbeat_path: None,
    };
    let text = format!("{config:?}");
    assert!(!text.contains("s3cret") && !text.contains(":pw@"), "{text}");
}
