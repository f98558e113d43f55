//! Record templates and body templates (issue 22, seeds 003 and 004), against the real binary,
//! the stand-in API and the real PostgreSQL:
//! - `idempotency_key = "sol-{payload.CodSolicitacao}"`: the same request staged twice under
//!   two record ids (a source rewound with `sources reset`) reaches the API twice with ONE
//!   `Idempotency-Key`, the one the old monitor sent, and lands once in the landing table; a
//!   record without the field is a dead letter naming it; a typo fails `check-config`.
//! - `body_template = "oru.hl7"`: the API receives an HL7 v2 message built from the record,
//!   with its content type and HL7 escaping; a record missing a field the template needs is a
//!   dead letter naming the template's line, and nothing with a hole in it is sent.

use std::time::Duration;

use estafeta_e2e::reliability::PgSchema;
use estafeta_e2e::{Agent, FlakyHttpServer, log_tail, run_cli, sink_status, wait_status};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn post(agent: &Agent, entity: &str, payload: Value) {
    let (code, answer) = agent.post("create", entity, &payload).await;
    assert_eq!(
        code,
        StatusCode::ACCEPTED,
        "{answer}\n{}",
        log_tail(agent, 40)
    );
}

/// The agent on `dir`'s `estafeta.toml`, delivering at once, ready.
async fn start(dir: &std::path::Path) -> Agent {
    let toml = dir.join("estafeta.toml");
    let env = [
        ("CONFIG_FILE", toml.to_str().unwrap()),
        ("CRONTAB", "* * * * * *"),
        ("FLUSH_ON_WRITE", "true"),
    ];
    let mut agent = Agent::start(dir, &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    agent
}

/// The dead letters of `sink`, as `GET /v1/dead-letters` lists them.
async fn dead_letters(agent: &Agent, sink: &str) -> Vec<Value> {
    let (code, answer) = agent.get("/v1/dead-letters").await;
    assert_eq!(code, StatusCode::OK, "{answer}");
    answer["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["sink"] == sink)
        .cloned()
        .collect()
}

/// Waits until every sink has nothing pending or in flight and `dead` dead letters.
async fn wait_settled(agent: &Agent, sinks: &[&str], dead: u64) {
    wait_status(
        agent,
        Duration::from_secs(30),
        "every record delivered or dead",
        |s| {
            sinks.iter().all(|name| {
                let sink = sink_status(s, name);
                sink["pending"] == 0 && sink["in_flight"] == 0 && sink["dead"] == dead
            })
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_key_template_gives_a_restaged_request_one_key_at_the_api_and_one_landing_row() {
    let server = FlakyHttpServer::start_with_seed(22).await;
    let schema = PgSchema::create("tmplkey").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("estafeta.toml"),
        format!(
            r#"[[sinks]]
name = "api"
type = "http"
url = "{}"
idempotency_key = "sol-{{payload.CodSolicitacao}}"

[[sinks]]
name = "db"
type = "database"
url = "{}"
idempotency_key = "sol-{{payload.CodSolicitacao}}"
"#,
            server.url(),
            schema.url("127.0.0.1:5432")
        ),
    )
    .unwrap();
    let toml = dir.path().join("estafeta.toml");
    let env = [
        ("CONFIG_FILE", toml.to_str().unwrap()),
        ("CRONTAB", "* * * * * *"),
        ("FLUSH_ON_WRITE", "true"),
    ];
    let out = run_cli(dir.path(), &env, &["check-config", "--offline"]).await;
    assert!(out.status.success(), "{out:?}");

    let mut agent = Agent::start(dir.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    // The same request twice, as a rewound source stages it again under a new record id.
    let request = json!({"CodSolicitacao": 4711, "exame": "HMG"});
    post(&agent, "solicitacao", request.clone()).await;
    post(&agent, "solicitacao", request).await;
    post(
        &agent,
        "solicitacao",
        json!({"CodSolicitacao": "4712", "exame": "GLI"}),
    )
    .await;
    // No business key: it cannot be sent under the template.
    post(
        &agent,
        "solicitacao",
        json!({"exame": "URO", "cpf": "segredo"}),
    )
    .await;
    wait_settled(&agent, &["api", "db"], 1).await;

    let keys: Vec<String> = server
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/solicitacao") && r.status < 300)
        .map(|r| {
            r.headers
                .iter()
                .find(|(n, _)| n == "idempotency-key")
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(keys, ["sol-4711", "sol-4711", "sol-4712"], "{keys:?}");

    let landed: Vec<String> = schema.rows().await.into_iter().map(|r| r.0).collect();
    assert_eq!(
        landed,
        ["sol-4711", "sol-4712"],
        "the landing table: {landed:?}"
    );

    for sink in ["api", "db"] {
        let dead = dead_letters(&agent, sink).await;
        assert_eq!(dead.len(), 1, "{sink}: {dead:?}");
        let reason = dead[0]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("\"CodSolicitacao\""), "{sink}: {reason}");
        assert!(!reason.contains("segredo"), "{sink}: {reason}");
    }
    drop(agent);
    schema.drop_schema().await;

    // A typo in a template fails check-config, naming the key and the allowed placeholders.
    std::fs::write(
        &toml,
        format!(
            "[[sinks]]\nname = \"api\"\ntype = \"http\"\nurl = \"{}\"\nidempotency_key = \"sol-{{payload_CodSolicitacao}}\"\n",
            server.url()
        ),
    )
    .unwrap();
    let out = run_cli(dir.path(), &env, &["check-config", "--offline"]).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("sinks[0].idempotency_key") && text.contains("{payload.FIELD}"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_body_template_sends_hl7_and_a_record_it_cannot_fill_is_a_dead_letter() {
    let server = FlakyHttpServer::start_with_seed(23).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("templates")).unwrap();
    std::fs::write(
        dir.path().join("templates/oru.hl7"),
        "MSH|^~\\&|ESTAFETA|HOSP|LIS|LAB|{{ record.staged_at[:4] }}||ORU^R01|{{ record.seq }}|P|2.5\n\
         PID|||{{ payload.prontuario }}||{{ payload.nome | hl7 }}\n\
         OBX|1|NM|{{ payload.exame }}||{{ payload.valor }}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("estafeta.toml"),
        format!(
            r#"[[sinks]]
name = "lis"
type = "http"
url = "{}"

[[sinks.routes]]
entity = "resultado"
method = "POST"
path = "/hl7"
body_template = "templates/oru.hl7"
"#,
            server.url()
        ),
    )
    .unwrap();
    let agent = start(dir.path()).await;
    post(
        &agent,
        "resultado",
        json!({"prontuario": 42, "nome": "Ana|Maria^Souza", "exame": "GLI", "valor": 99}),
    )
    .await;
    post(
        &agent,
        "resultado",
        json!({"prontuario": 43, "nome": "João", "exame": "GLI"}),
    )
    .await;
    wait_settled(&agent, &["lis"], 1).await;

    let sent: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.path == "/hl7")
        .collect();
    assert_eq!(
        sent.len(),
        1,
        "only the record the template could fill is sent"
    );
    let body = String::from_utf8(sent[0].body.clone()).unwrap();
    assert!(
        body.starts_with("MSH|^~\\&|ESTAFETA|HOSP|LIS|LAB|20"),
        "{body:?}"
    );
    assert!(
        body.contains("\rPID|||42||Ana\\F\\Maria\\S\\Souza\rOBX|1|NM|GLI||99"),
        "{body:?}"
    );
    let content_type = sent[0]
        .headers
        .iter()
        .find(|(n, _)| n == "content-type")
        .map(|(_, v)| v.as_str());
    assert_eq!(
        content_type,
        Some("x-application/hl7-v2+er7; charset=utf-8")
    );

    let dead = dead_letters(&agent, "lis").await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let reason = dead[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("oru.hl7") && reason.contains("line 3"),
        "{reason}"
    );
    assert!(!reason.contains("João"), "{reason}");
}

/// Seed 003's lookups: exam codes mapped through `tests_map.json`, the specimen found in the
/// API's own catalog (`GET /tests`, fetched once with the token and cached), the Bemsoft request
/// built by a JSON body template. A code with no mapping, and a mapped code the catalog does not
/// hold, are dead letters that say which code and where to fix it; the others go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_are_mapped_and_looked_up_in_the_apis_catalog_and_an_unknown_code_is_a_dead_letter() {
    let server = FlakyHttpServer::start_with_seed(24).await;
    server.respond_for(
        "/tests",
        200,
        json!([
            {"supportTestId": "HB-001", "supportSpecimenId": "SANGUE-EDTA"},
            {"supportTestId": "TEST-12345", "supportSpecimenId": "SORO"}
        ]),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("templates")).unwrap();
    std::fs::write(
        dir.path().join("tests_map.json"),
        r#"{"HEMOGRAMA": "HB-001", "GLICOSE": "GLU-FAST", "12345": "TEST-12345"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("templates/request.json"),
        r#"{"externalId": {{ payload.CodSolicitacao }},
 "tests": [{% for item in payload.items %}{% set id = map("exames", item.exame) %}
   {"supportTestId": {{ id }}, "supportSpecimenId": {{ catalog("tests", id).supportSpecimenId }}}{% if not loop.last %},{% endif %}{% endfor %}]}"#,
    )
    .unwrap();
    let token = "bemsoft-token-0123456789abcdef";
    std::fs::write(
        dir.path().join("estafeta.toml"),
        format!(
            r#"[[sinks]]
name = "bemsoft"
type = "http"
url = "{}"
token = "{token}"
idempotency_key = "sol-{{payload.CodSolicitacao}}"
maps = {{ exames = "tests_map.json" }}
catalogs = {{ tests = {{ path = "/tests", key = "supportTestId" }} }}

[[sinks.routes]]
entity = "solicitacao"
method = "POST"
path = "/requests"
body_template = "templates/request.json"

# One key per request, so a refused request holds back only its own later records.
[entities.solicitacao]
key_field = "CodSolicitacao"
"#,
            server.url()
        ),
    )
    .unwrap();
    let agent = start(dir.path()).await;
    let solicitacao = |cod: u64, exames: &[&str]| json!({"CodSolicitacao": cod, "items": exames.iter().map(|e| json!({"exame": e})).collect::<Vec<_>>()});
    post(
        &agent,
        "solicitacao",
        solicitacao(1, &["HEMOGRAMA", "12345"]),
    )
    .await;
    post(&agent, "solicitacao", solicitacao(2, &["URINA"])).await;
    post(&agent, "solicitacao", solicitacao(3, &["GLICOSE"])).await;
    wait_settled(&agent, &["bemsoft"], 2).await;

    let requests = server.requests();
    let sent: Vec<Value> = requests
        .iter()
        .filter(|r| r.path == "/requests")
        .map(|r| serde_json::from_slice(&r.body).expect("a JSON body"))
        .collect();
    assert_eq!(
        sent,
        [json!({"externalId": 1, "tests": [
            {"supportTestId": "HB-001", "supportSpecimenId": "SANGUE-EDTA"},
            {"supportTestId": "TEST-12345", "supportSpecimenId": "SORO"}
        ]})],
        "{sent:?}"
    );
    let catalog: Vec<_> = requests.iter().filter(|r| r.path == "/tests").collect();
    assert_eq!(catalog.len(), 1, "the catalog is fetched once and cached");
    assert!(
        catalog[0]
            .headers
            .iter()
            .any(|(n, v)| n == "authorization" && v == &format!("Bearer {token}")),
        "the catalog is fetched with the sink's token"
    );

    let mut reasons: Vec<String> = dead_letters(&agent, "bemsoft")
        .await
        .iter()
        .map(|d| d["reason"].as_str().unwrap_or_default().to_owned())
        .collect();
    reasons.sort();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].contains("code \"URINA\" has no mapping in")
            && reasons[0].contains("tests_map.json"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("no item with supportTestId = \"GLU-FAST\" in the catalog GET /tests"),
        "{reasons:?}"
    );
}
