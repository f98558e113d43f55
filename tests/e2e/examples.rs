//! The examples under `examples/` run as shipped: each test creates the example's source schema
//! in a throwaway PostgreSQL schema, runs `estafeta run` with the example's own `estafeta.toml`,
//! and checks what arrives at the sink.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use estafeta_e2e::{Agent, FlakyHttpServer, PG_URL, log_tail, pg, unique_name};
use serde_json::{Value, json};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

/// Creates a schema holding the tables of `ddl_file`; returns its name and a URL whose
/// connections use it.
async fn source_schema(ddl_file: &Path, prefix: &str) -> (String, String) {
    let schema = unique_name(prefix);
    let ddl = std::fs::read_to_string(ddl_file).unwrap();
    pg().await
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; SET search_path TO {schema}; {ddl}"
        ))
        .await
        .unwrap();
    let url = format!("{PG_URL}?options=-csearch_path%3D{schema}");
    (schema, url)
}

/// Runs `sql` with `schema` first on the search path, on a connection of its own (so the
/// test's other connections keep seeing `estafeta_records` in `public`).
async fn in_schema(schema: &str, sql: &str) {
    pg().await
        .batch_execute(&format!("SET search_path TO {schema}; {sql}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bemsoft_monitor() {
    let dir = example("bemsoft-monitor");
    let (schema, source_url) = source_schema(&dir.join("schema.sql"), "ex_bemsoft").await;
    let client = pg().await;
    in_schema(
        &schema,
        "INSERT INTO paciente VALUES (7, 'João da Conceição', '12345678901', '1980-02-29', 'M'),
                                         (8, 'Maria Antônia', '10987654321', '1990-05-01', 'F');
             INSERT INTO solicitacao VALUES (500, 7, '2026-11-23', '08:15'), (501, 8, '2026-11-23', '08:20');
             INSERT INTO item_sol (cod_solicitacao, cod_exame, material, nome_terceirizado, data_entrada) VALUES
               (500, 'HMG', 'Sangue', 'BEMSOFT', now() - interval '1 minute'),
               (500, 'GLI', 'Soro', 'BEMSOFT', now() - interval '1 minute'),
               (501, 'RX', NULL, 'OUTRO', now() - interval '1 minute'),
               (501, 'TSH', 'Soro', 'BEMSOFT', now() - interval '1 minute');",
    )
    .await;
    let server = FlakyHttpServer::start_with_seed(3).await;
    let api = server.url();
    let work = tempfile::tempdir().unwrap();
    let config = dir.join("estafeta.toml");
    let env = [
        ("CONFIG_FILE", config.to_str().unwrap()),
        ("MONITOR_SOURCE_URL", source_url.as_str()),
        ("BEMSOFT_API_URL", api.as_str()),
        ("BEMSOFT_API_TOKEN", "example-token"),
        ("CRONTAB", "* * * * * *"),
    ];
    let mut agent = Agent::start(work.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let requests = server.wait_for_requests(2, Duration::from_secs(30)).await;
    // Different requests travel side by side (the HTTP sink sends up to 8 at once): by request.
    let mut bodies: Vec<Value> = requests.iter().map(|r| r.json()).collect();
    bodies.sort_by_key(|b| b["request"].as_i64());
    assert_eq!(
        bodies.len(),
        2,
        "one POST per request; log:\n{}",
        log_tail(&agent, 30)
    );
    for r in &requests {
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/requests"));
        assert_eq!(r.header("authorization"), Some("Bearer example-token"));
    }
    // The seed's own Idempotency-Key, from the request number (idempotency_key in the TOML).
    let mut keys: Vec<_> = requests.iter().map(|r| r.idempotency_key()).collect();
    keys.sort();
    assert_eq!(keys, [Some("sol-500"), Some("sol-501")]);
    let first = &bodies[0];
    assert_eq!(first["request"], 500);
    assert_eq!(
        first["paciente"],
        json!({"codigo": 7, "nome": "João da Conceição", "cpf": "12345678901", "nascimento": "1980-02-29", "sexo": "M"})
    );
    assert_eq!(
        first["entrada"],
        json!({"data": "2026-11-23", "hora": "08:15:00"})
    );
    assert_eq!(
        first["itens"],
        json!([{"codigo": 1, "exame": "HMG", "material": "Sangue"}, {"codigo": 2, "exame": "GLI", "material": "Soro"}])
    );
    // The other lab's item is not sent; request 501 carries only the Bemsoft item.
    assert_eq!(
        bodies[1]["itens"],
        json!([{"codigo": 4, "exame": "TSH", "material": "Soro"}])
    );
    agent.terminate();
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fusion_initial_load() {
    let dir = example("fusion-initial-load");
    let (schema, source_url) = source_schema(&dir.join("schema.sql"), "ex_fusion").await;
    let client = pg().await;
    // 3,000 attendances, many changed in the same instant (the id breaks the ties).
    in_schema(
        &schema,
        "INSERT INTO atendimento (id_atendimento, id_paciente, nome_paciente, tipo, cid, valor, atualizado_em)
             SELECT g, 1000 + g % 97, 'Paciente ' || g, 'AMBULATORIAL', 'J11', g * 1.5,
                    timestamptz '2026-11-01 00:00:00+00' + (g / 10) * interval '1 second'
               FROM generate_series(1, 3000) g;",
    )
    .await;
    let agent_id = unique_name("ex_fusion");
    let work = tempfile::tempdir().unwrap();
    let config = dir.join("estafeta.toml");
    let env = [
        ("CONFIG_FILE", config.to_str().unwrap()),
        ("FUSION_SOURCE_URL", source_url.as_str()),
        ("CENTRAL_DATABASE_URL", PG_URL),
        ("AGENT_ID", agent_id.as_str()),
        ("CRONTAB", "* * * * * *"),
    ];
    let mut agent = Agent::start(work.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let landed = |want: i64| {
        let agent_id = agent_id.clone();
        async move {
            let client = pg().await;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let n: i64 = client
                    .query_one(
                        "SELECT count(*) FROM estafeta_records WHERE agent_id = $1",
                        &[&agent_id],
                    )
                    .await
                    .map_or(0, |r| r.get(0));
                if n >= want || Instant::now() >= deadline {
                    return n;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(
        landed(3000).await,
        3000,
        "initial load; log:\n{}",
        log_tail(&agent, 30)
    );
    // Two attendances change: the next cycle (every 30 s in the example) picks up only them.
    in_schema(
        &schema,
        "UPDATE atendimento SET cid = 'A90', atualizado_em = now() WHERE id_atendimento IN (10, 2999);",
    )
    .await;
    agent.terminate();
    agent.wait(Duration::from_secs(20)).await;
    agent.restart(); // a restart runs the first cycle at once instead of in 30 s
    agent.wait_ready(Duration::from_secs(20)).await;
    assert_eq!(landed(3002).await, 3002, "log:\n{}", log_tail(&agent, 30));
    let changed = client
        .query(
            "SELECT payload FROM estafeta_records WHERE agent_id = $1 AND payload->>'cid' = 'A90' ORDER BY id",
            &[&agent_id],
        )
        .await
        .unwrap();
    let ids: Vec<i64> = changed
        .iter()
        .map(|r| r.get::<_, Value>(0)["id_atendimento"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [10, 2999]);
    let distinct: i64 = client
        .query_one(
            "SELECT count(DISTINCT payload->>'id_atendimento') FROM estafeta_records WHERE agent_id = $1",
            &[&agent_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(distinct, 3000);
    agent.terminate();
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aghu_user_sync_sources() {
    let dir = example("aghu-user-sync");
    // AGHU's tables and Invenzi's in one throwaway schema, reached by both URLs.
    let (schema, url) = source_schema(&dir.join("schema/postgres.sql"), "ex_aghu").await;
    let aghu = std::fs::read_to_string(dir.join("schema/aghu-postgres.sql")).unwrap();
    in_schema(&schema, &aghu).await;
    in_schema(
        &schema,
        "INSERT INTO aghu_usuario (matricula, nome, cpf, setor, alterado_em) VALUES
           ('A1', 'Ana Souza', '11122233344', 'UTI', now() - interval '1 hour'),
           ('B2', 'João Conceição', '55566677788', 'Farmácia', now() - interval '1 hour');
         INSERT INTO aghu_agenda (dia, matricula, nome, cpf) VALUES (current_date, 'P9', 'Paciente Nove', '99988877766');
         INSERT INTO invenzi_usuario (matricula, nome, cpf, ativo, ultimo_transito, ativado_em)
           VALUES ('Z0', 'Antigo', '00011122233', true, now() - interval '40 days', now() - interval '400 days');
         INSERT INTO invenzi_usuario (matricula, nome, cpf, ativo, ativado_em)
           VALUES ('N1', 'Nunca Passou', '22233344455', true, now() - interval '40 days');",
    )
    .await;
    let work = tempfile::tempdir().unwrap();
    let config = dir.join("estafeta.toml");
    let env = [
        ("CONFIG_FILE", config.to_str().unwrap()),
        ("AGHU_DATABASE_URL", url.as_str()),
        ("INVENZI_DATABASE_URL", url.as_str()),
        ("INVENZI_DIALECT", "postgres"),
        ("CRONTAB", "* * * * * *"),
    ];
    let mut agent = Agent::start(work.path(), &env);
    agent.wait_ready(Duration::from_secs(20)).await;
    let users = |want: &'static str| {
        let schema = schema.clone();
        async move {
            let client = pg().await;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let rows = client
                    .query(
                        &format!("SELECT matricula, ativo, aplicacoes FROM {schema}.invenzi_usuario ORDER BY matricula"),
                        &[],
                    )
                    .await
                    .unwrap();
                let text = rows
                    .iter()
                    .map(|r| {
                        format!(
                            "{}:{}:{}",
                            r.get::<_, String>(0),
                            r.get::<_, bool>(1),
                            r.get::<_, i32>(2)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                if text == want || Instant::now() >= deadline {
                    return text;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // Changed users upserted, today's patient activated, the idle users deactivated (N1 never
    // passed a turnstile: released 30 days after its activation): each once.
    assert_eq!(
        users("A1:true:1 B2:true:1 N1:false:2 P9:true:1 Z0:false:2").await,
        "A1:true:1 B2:true:1 N1:false:2 P9:true:1 Z0:false:2",
        "log:\n{}",
        log_tail(&agent, 30)
    );
    // A change in AGHU reaches Invenzi at the next 10 s cycle; only that user moves.
    in_schema(
        &schema,
        "UPDATE aghu_usuario SET setor = 'CTI', alterado_em = now() WHERE matricula = 'B2'",
    )
    .await;
    assert_eq!(
        users("A1:true:1 B2:true:2 N1:false:2 P9:true:1 Z0:false:2").await,
        "A1:true:1 B2:true:2 N1:false:2 P9:true:1 Z0:false:2",
        "log:\n{}",
        log_tail(&agent, 30)
    );
    // AGHU reactivates Z0: a new licence period starts. When it is over (31 days, simulated by
    // moving the activation back), the next daily run releases Z0 again, although the source's
    // checkpoint went past Z0's first release (the seed's query never read it again).
    in_schema(
        &schema,
        "INSERT INTO aghu_usuario (matricula, nome, cpf, setor, alterado_em)
           VALUES ('Z0', 'Antigo', '00011122233', 'Portaria', now())",
    )
    .await;
    assert_eq!(
        users("A1:true:1 B2:true:2 N1:false:2 P9:true:1 Z0:true:3").await,
        "A1:true:1 B2:true:2 N1:false:2 P9:true:1 Z0:true:3",
        "log:\n{}",
        log_tail(&agent, 30)
    );
    in_schema(
        &schema,
        "UPDATE invenzi_usuario SET ativado_em = now() - interval '31 days' WHERE matricula = 'Z0'",
    )
    .await;
    // The daily schedule's next run: a start runs every source once.
    agent.restart();
    agent.wait_ready(Duration::from_secs(20)).await;
    assert_eq!(
        users("A1:true:1 B2:true:2 N1:false:2 P9:true:1 Z0:false:4").await,
        "A1:true:1 B2:true:2 N1:false:2 P9:true:1 Z0:false:4",
        "log:\n{}",
        log_tail(&agent, 30)
    );
    agent.terminate();
    pg().await
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

/// Copies the folder `from` into `to`, recursively.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Seed 000 with Invenzi on MariaDB: `check-config` prepares every source's query on its own
/// database. The example's MariaDB licence query passes; the PostgreSQL one put in its place
/// (what failed only at run time, "Named and positional parameters mixed", while check-config
/// said OK) is refused by check-config, naming the source and the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aghu_user_sync_check_config_prepares_each_source_on_its_database() {
    use mysql_async::prelude::Queryable;
    let dir = example("aghu-user-sync");
    let (schema, pg_url) = source_schema(&dir.join("schema/aghu-postgres.sql"), "ex_aghu_cc").await;
    let db = unique_name("ex_aghu");
    let mut my = estafeta_e2e::mysql().await;
    my.query_drop(format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    my.query_drop(format!("USE {db}")).await.unwrap();
    my.query_drop(std::fs::read_to_string(dir.join("schema/mariadb.sql")).unwrap())
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let copy = work.path().join("aghu-user-sync");
    copy_dir(&dir, &copy);
    let config = copy.join("estafeta.toml");
    let my_url = format!("mysql://root@127.0.0.1:3306/{db}");
    let env = [
        ("CONFIG_FILE", config.to_str().unwrap()),
        ("AGHU_DATABASE_URL", pg_url.as_str()),
        ("INVENZI_DATABASE_URL", my_url.as_str()),
        ("INVENZI_DIALECT", "mariadb"),
    ];
    let out = estafeta_e2e::run_cli(work.path(), &env, &["check-config"]).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for source in ["usuarios-alterados", "pacientes-do-dia", "liberar-licencas"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("source {source}: query"))
                    && l.ends_with("prepared on its database")),
            "{source}: {text}"
        );
    }

    std::fs::copy(
        copy.join("sql/sources/postgres/liberar-licencas.sql"),
        copy.join("sql/sources/mariadb/liberar-licencas.sql"),
    )
    .unwrap();
    let out = estafeta_e2e::run_cli(work.path(), &env, &["check-config"]).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("source liberar-licencas: query")
            && text.contains("mariadb/liberar-licencas.sql REFUSED by its database"),
        "{text}"
    );
    my.query_drop(format!("DROP DATABASE {db}")).await.unwrap();
    pg().await
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}
