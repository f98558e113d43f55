//! Unit tests of the JetStream sink: subjects, stream settings, URLs, redaction, and the records
//! named when a failed ack let later records of its key overtake it.

use super::*;

fn config(url: &str, subject: &str) -> NatsSinkConfig {
    NatsSinkConfig {
        url: url.to_owned(),
        token: None,
        subject: subject.to_owned(),
        timeout: Duration::from_secs(1),
        agent_id: "ws-07.ward b".to_owned(),
        stream: None,
        ..Default::default()
    }
}

fn envelope() -> Envelope {
    Envelope {
        v: 1,
        id: "0190a0a0-0000-7000-8000-000000000001".to_owned(),
        seq: 7,
        action: "create".to_owned(),
        entity: "patient".to_owned(),
        key: Some("42".to_owned()),
        staged_at: "2024-06-01T12:00:00.000000Z".to_owned(),
        client_key: None,
        client_fingerprint: None,
        client_records: None,
        sinks: vec!["nats".to_owned()],
        source: None,
        payload: RawValue::from_string(r#"{"id":"42","n":1.50}"#.to_owned()).expect("valid JSON"),
    }
}

#[test]
fn subject_template_fills_entity_action_and_a_safe_agent_token() {
    let sink =
        NatsSink::new("nats", config("nats://127.0.0.1:4222", DEFAULT_SUBJECT)).expect("valid");
    assert_eq!(sink.subject_for(&envelope()), "estafeta.patient.create");
    let sink = NatsSink::new(
        "nats",
        config("nats://127.0.0.1:4222", "h.{agent}.x{entity}"),
    )
    .expect("valid");
    assert_eq!(sink.subject_for(&envelope()), "h.ws-07_ward_b.xpatient");
    assert_eq!(default_stream_subject("h.{agent}.x{entity}"), "h.*.*");
    assert_eq!(default_stream_subject(DEFAULT_SUBJECT), "estafeta.*.*");
}

#[test]
fn bad_subjects_urls_and_stream_names_are_refused() {
    for bad in [
        "",
        "a..b",
        ".a",
        "a.*",
        "a.>",
        "a b",
        "a.{key}",
        "a.{entity",
    ] {
        assert!(check_subject_template(bad).is_err(), "{bad:?}");
    }
    for bad in ["http://h:4222", "nats://", "nats://h:4222/x", "h:4222"] {
        assert!(check_nats_url(bad).is_err(), "{bad:?}");
    }
    assert!(check_nats_url("tls://u:p@h:4222").is_ok());
    for bad in ["", "A.B", "a b", "a*"] {
        assert!(check_stream_name(bad).is_err(), "{bad:?}");
    }
    assert!(check_stream_name("ESTAFETA_1").is_ok());
}

#[test]
fn body_carries_the_envelope_and_the_payload_as_staged() {
    let sink =
        NatsSink::new("nats", config("nats://127.0.0.1:4222", DEFAULT_SUBJECT)).expect("valid");
    let body = String::from_utf8(sink.body(&envelope()).expect("a body")).expect("UTF-8");
    assert_eq!(
        body,
        r#"{"id":"0190a0a0-0000-7000-8000-000000000001","seq":7,"agent_id":"ws-07.ward b","action":"create","entity":"patient","key":"42","staged_at":"2024-06-01T12:00:00.000000Z","payload":{"id":"42","n":1.50}}"#
    );
}

#[test]
fn credentials_leave_the_url_and_never_show() {
    let sink = NatsSink::new(
        "nats",
        config("nats://estafeta:p%40ss@127.0.0.1:4222", DEFAULT_SUBJECT),
    )
    .expect("valid");
    assert_eq!(sink.servers, ["nats://127.0.0.1:4222"]);
    assert!(
        matches!(&sink.security.auth, security::Auth::UserPassword(u, p) if u == "estafeta" && p == "p@ss")
    );
    assert_eq!(sink.shown, "nats://estafeta:***@127.0.0.1:4222");
    assert_eq!(
        sink.scrub("refused p@ss and p%40ss".to_owned()),
        "refused *** and ***"
    );

    let sink = NatsSink::new(
        "nats",
        config("nats://s3cr3t@127.0.0.1:4222", DEFAULT_SUBJECT),
    )
    .expect("valid");
    assert!(matches!(&sink.security.auth, security::Auth::Token(t) if t == "s3cr3t"));
    assert!(!sink.shown.contains("s3cr3t"), "{}", sink.shown);
    let text = format!("{:?}", config("nats://s3cr3t@127.0.0.1:4222", "x"));
    assert!(!text.contains("s3cr3t"), "{text}");

    let mut with_token = config("nats://127.0.0.1:4222", DEFAULT_SUBJECT);
    with_token.token = Some("tok".to_owned());
    let sink = NatsSink::new("nats", with_token).expect("valid");
    assert!(matches!(&sink.security.auth, security::Auth::Token(t) if t == "tok"));
}

#[tokio::test]
async fn a_refused_connection_retries_every_record_with_a_clear_reason() {
    // Port 1 on loopback refuses connections.
    let sink = NatsSink::new("nats", config("nats://127.0.0.1:1", DEFAULT_SUBJECT)).expect("valid");
    let delivery = Delivery {
        envelope: envelope(),
        sink: "nats".to_owned(),
        attempts: 0,
        path: std::path::PathBuf::from("x.jsonl"),
    };
    let outcomes = sink.deliver(std::slice::from_ref(&delivery)).await;
    assert_eq!(outcomes.len(), 1);
    let Outcome::Retry { error, .. } = &outcomes[0] else {
        panic!("expected a retry, got {outcomes:?}");
    };
    assert!(
        error.contains("cannot connect to nats://127.0.0.1:1"),
        "{error}"
    );
}

#[test]
fn a_failed_ack_behind_which_its_key_was_stored_is_named_by_seq_and_id() {
    use crate::sinks::test_delivery;
    let record = |seq, key| test_delivery(seq, "update", "patient", Some(key), "{}");
    let batch = [
        record(1, "a"),
        record(2, "b"),
        record(3, "a"),
        record(4, "b"),
        record(5, "a"),
    ];
    let retry = Outcome::Retry {
        error: "publish to s: no acknowledgement".to_owned(),
        retry_after: None,
    };
    // a: 1 failed its ack, 3 and 5 were stored behind it; b: 2 stored, 4 failed last.
    let outcomes = [
        retry.clone(),
        Outcome::Delivered,
        Outcome::Delivered,
        retry,
        Outcome::Delivered,
    ];
    assert_eq!(
        overtaken(&batch, &outcomes),
        ["seq 1 (id id-1) failed, later stored: seq 3 (id id-3), seq 5 (id id-5)"]
    );
    let in_order = [
        Outcome::Delivered,
        Outcome::Delivered,
        Outcome::Dead {
            reason: Refusal::ours("too large"),
        },
        Outcome::Delivered,
        Outcome::Skipped,
    ];
    assert!(overtaken(&batch, &in_order).is_empty());
}

#[test]
fn a_cluster_list_gives_every_server_to_the_client_without_credentials() {
    let sink = NatsSink::new(
        "nats",
        config(
            "nats://u:p%40ss@127.0.0.1:4222, nats://u:p%40ss@127.0.0.1:4223,nats://127.0.0.1:4224",
            DEFAULT_SUBJECT,
        ),
    )
    .expect("valid");
    assert_eq!(
        sink.servers,
        [
            "nats://127.0.0.1:4222",
            "nats://127.0.0.1:4223",
            "nats://127.0.0.1:4224"
        ]
    );
    assert!(
        matches!(&sink.security.auth, security::Auth::UserPassword(u, p) if u == "u" && p == "p@ss")
    );
    assert_eq!(
        sink.shown,
        "nats://u:***@127.0.0.1:4222,nats://u:***@127.0.0.1:4223,nats://127.0.0.1:4224"
    );
    assert!(!sink.security.tls_required, "every host is loopback");
    assert_eq!(sink.scrub("p@ss".to_owned()), "***");
}

#[test]
fn each_server_of_a_cluster_list_is_checked_on_its_own() {
    assert_eq!(
        check_nats_url("nats://127.0.0.1:4222,,nats://127.0.0.1:4223"),
        Err("server 2 of 3 (): expected a URL between the commas, as in nats://10.0.0.1:4222,nats://10.0.0.2:4222".to_owned())
    );
    let err = check_nats_url("nats://127.0.0.1:4222,http://u:pw@10.0.0.2:4222").unwrap_err();
    assert!(
        err.starts_with("server 2 of 2 (http://u:***@10.0.0.2:4222): expected a nats:// or tls://"),
        "{err}"
    );
    let err = check_nats_url("nats://a:1@127.0.0.1:4222,nats://b:2@127.0.0.1:4223").unwrap_err();
    assert!(
        err.contains("other credentials than an earlier server"),
        "{err}"
    );
    assert!(!err.contains(":2@"), "{err}");
    // One server beyond loopback: TLS for the whole list (one client serves them all).
    let sink = NatsSink::new(
        "nats",
        config(
            "nats://127.0.0.1:4222,nats://10.0.0.2:4222",
            DEFAULT_SUBJECT,
        ),
    )
    .expect("valid");
    assert!(sink.security.tls_required);
    let mut refused = config(
        "tls://127.0.0.1:4222,nats://127.0.0.1:4223",
        DEFAULT_SUBJECT,
    );
    refused.tls_required = Some(false);
    assert!(NatsSink::new("nats", refused).is_err());
}
