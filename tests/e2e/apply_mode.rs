//! Proves apply mode (contract 4, idempotent delivery: the upsert example against PostgreSQL and
//! MariaDB, replayed twice, applied once) with the shipped example `examples/aghu-user-sync/`, its
//! statement files used as they are except for the table name (unique per run):
//!
//! 1. the target table is created from the example's `schema/<dialect>.sql`, and
//!    `estafeta check-config` prepares every statement against it;
//! 2. the real `estafeta stage` + `estafeta flush` apply two users, an update of one (seed 000's
//!    "update if it exists, create otherwise") and a deactivation of the other; three records go
//!    dead alone with their reason: a missing payload field (named, with the file), a value the
//!    database refuses (its landing row rolled back with it) and an action with no statement;
//! 3. the staging index is deleted and rebuilt from the folder twice (`KEEP_DELIVERED_DAYS`
//!    keeps the delivered records on disk), so every delivered record is delivered again with
//!    its id: the flush reports them delivered, and the target table still shows each applied
//!    exactly once (the `aplicacoes` counter, the row count, the landing rows).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;

use estafeta_e2e::{MYSQL_URL, PG_URL, json_lines, mysql, pg, run_cli, unique_name};
use mysql_async::prelude::Queryable;
use serde_json::{Value, json};

/// The example's table name, replaced by a unique one in the copied files.
const EXAMPLE_TABLE: &str = "invenzi_usuario";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Postgres,
    MariaDb,
}

impl Dialect {
    /// `INVENZI_DIALECT`: the example's folder names.
    fn folder(self) -> &'static str {
        match self {
            Dialect::Postgres => "postgres",
            Dialect::MariaDb => "mariadb",
        }
    }

    fn url(self) -> &'static str {
        match self {
            Dialect::Postgres => PG_URL,
            Dialect::MariaDb => MYSQL_URL,
        }
    }
}

/// One row of the target table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct User {
    nome: String,
    cpf: String,
    email: Option<String>,
    setor: Option<String>,
    ativo: bool,
    fim_vinculo: Option<String>,
    aplicacoes: i64,
}

/// The test's database: its target table and this run's landing rows.
struct Target {
    dialect: Dialect,
    table: String,
    agent_id: String,
}

impl Target {
    async fn execute(&self, sql: &str) {
        match self.dialect {
            Dialect::Postgres => pg().await.batch_execute(sql).await.unwrap(),
            Dialect::MariaDb => {
                let mut conn = mysql().await;
                conn.query_drop(sql).await.unwrap();
                conn.disconnect().await.unwrap();
            }
        }
    }

    async fn users(&self) -> BTreeMap<String, User> {
        let table = &self.table;
        match self.dialect {
            Dialect::Postgres => pg()
                .await
                .query(
                    &format!(
                        "SELECT matricula, nome, cpf, email, setor, ativo, fim_vinculo::text, aplicacoes FROM {table}"
                    ),
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| {
                    let user = User {
                        nome: r.get(1),
                        cpf: r.get(2),
                        email: r.get(3),
                        setor: r.get(4),
                        ativo: r.get(5),
                        fim_vinculo: r.get(6),
                        aplicacoes: i64::from(r.get::<_, i32>(7)),
                    };
                    (r.get(0), user)
                })
                .collect(),
            Dialect::MariaDb => {
                let mut conn = mysql().await;
                type Raw = (
                    String,
                    String,
                    String,
                    Option<String>,
                    Option<String>,
                    i64,
                    Option<String>,
                    i64,
                );
                let rows: Vec<Raw> = conn
                    .query(format!(
                        "SELECT matricula, nome, cpf, email, setor, ativo, CAST(fim_vinculo AS CHAR), aplicacoes FROM {table}"
                    ))
                    .await
                    .unwrap();
                conn.disconnect().await.unwrap();
                rows.into_iter()
                    .map(|(matricula, nome, cpf, email, setor, ativo, fim, aplicacoes)| {
                        let user = User {
                            nome,
                            cpf,
                            email,
                            setor,
                            ativo: ativo != 0,
                            fim_vinculo: fim,
                            aplicacoes,
                        };
                        (matricula, user)
                    })
                    .collect()
            }
        }
    }

    /// Idempotency keys of this run's landing rows.
    async fn landed(&self) -> BTreeSet<String> {
        let sql = "SELECT idempotency_key FROM estafeta_records WHERE agent_id = ";
        match self.dialect {
            Dialect::Postgres => pg()
                .await
                .query(&format!("{sql}$1"), &[&self.agent_id])
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect(),
            Dialect::MariaDb => {
                let mut conn = mysql().await;
                let keys: Vec<String> = conn
                    .exec(format!("{sql}?"), (self.agent_id.as_str(),))
                    .await
                    .unwrap();
                conn.disconnect().await.unwrap();
                keys.into_iter().collect()
            }
        }
    }

    async fn clean_up(&self) {
        self.execute(&format!("DROP TABLE {}", self.table)).await;
        let sql = "DELETE FROM estafeta_records WHERE agent_id = ";
        match self.dialect {
            Dialect::Postgres => {
                pg().await
                    .execute(&format!("{sql}$1"), &[&self.agent_id])
                    .await
                    .unwrap();
            }
            Dialect::MariaDb => {
                let mut conn = mysql().await;
                conn.exec_drop(format!("{sql}?"), (self.agent_id.as_str(),))
                    .await
                    .unwrap();
                conn.disconnect().await.unwrap();
            }
        }
    }
}

/// The repository's `examples/aghu-user-sync`.
fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .join("examples/aghu-user-sync")
}

/// Copies the example folder to `to`, with `table` for the example's table name in `.sql` files.
fn copy_example(from: &Path, to: &Path, table: &str) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_example(&entry.path(), &target, table);
        } else if entry.path().extension().is_some_and(|e| e == "sql") {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            std::fs::write(&target, text.replace(EXAMPLE_TABLE, table)).unwrap();
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `estafeta stage ACTION usuario FILE` with `records`; returns their ids in order.
async fn stage(dir: &Path, env: &[(&str, &str)], action: &str, records: &Value) -> Vec<String> {
    let file = dir.join(format!("{action}.json"));
    std::fs::write(&file, records.to_string()).unwrap();
    let output = run_cli(
        dir,
        env,
        &["stage", action, "usuario", file.to_str().unwrap()],
    )
    .await;
    assert!(output.status.success(), "stage failed: {}", text(&output));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| line.split('\t').next().unwrap().to_owned())
        .collect()
}

/// `estafeta flush`; asserts its summary line.
async fn flush(dir: &Path, env: &[(&str, &str)], expected: &str) {
    let output = run_cli(dir, env, &["flush"]).await;
    assert!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains(expected),
        "expected flush to say {expected:?}: {}",
        text(&output)
    );
}

fn user(nome: &str, cpf: &str, setor: &str, ativo: bool, aplicacoes: i64) -> User {
    User {
        nome: nome.to_owned(),
        cpf: cpf.to_owned(),
        email: None,
        setor: Some(setor.to_owned()),
        ativo,
        fim_vinculo: None,
        aplicacoes,
    }
}

async fn upsert_example_is_applied_once_across_replays(dialect: Dialect) {
    let target = Target {
        dialect,
        table: unique_name("invenzi_usuario"),
        agent_id: unique_name("e2e_apply"),
    };
    let dir = tempfile::tempdir().unwrap();
    let example = dir.path().join("example");
    copy_example(&example_dir(), &example, &target.table);
    let schema = std::fs::read_to_string(
        example
            .join("schema")
            .join(format!("{}.sql", dialect.folder())),
    )
    .unwrap();
    target.execute(&schema).await;

    // check-config prepares the sources' queries too: AGHU's tables must exist where
    // AGHU_DATABASE_URL points (created once, under a lock: both dialects' tests run at once).
    let aghu = std::fs::read_to_string(example.join("schema/aghu-postgres.sql")).unwrap();
    estafeta_e2e::pg()
        .await
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(2022); {aghu}; COMMIT;"
        ))
        .await
        .expect("creating AGHU's tables");

    let config = example.join("estafeta.toml");
    let env = [
        ("CONFIG_FILE", config.to_str().unwrap()),
        ("INVENZI_DATABASE_URL", dialect.url()),
        ("INVENZI_DIALECT", dialect.folder()),
        // The example's sources read AGHU; `stage` and `flush` do not run them.
        ("AGHU_DATABASE_URL", estafeta_e2e::PG_URL),
        ("AGENT_ID", target.agent_id.as_str()),
        // Delivered records stay on disk, so a rebuilt index replays them.
        ("KEEP_DELIVERED_DAYS", "1"),
    ];

    // 1. The statements load, and prepare against the real table.
    let output = run_cli(dir.path(), &env, &["check-config"]).await;
    let shown = text(&output);
    assert_eq!(output.status.code(), Some(0), "{shown}");
    assert!(
        shown.contains("usuario.deactivate, usuario.upsert") && shown.contains("reachable"),
        "{shown}"
    );

    // 2. Stage and deliver.
    let ana = json!({"matricula": "A1001", "nome": "Ana Souza", "cpf": "11122233344",
        "email": null, "lotacao": {"setor": "UTI Adulto"}, "ativo": true, "fim_vinculo": "2027-12-31"});
    let ana_updated = json!({"matricula": "A1001", "nome": "Ana Souza Lima", "cpf": "11122233344",
        "email": "ana@hospital.example", "lotacao": {"setor": "UTI Adulto"}, "ativo": true,
        "fim_vinculo": null});
    let joao = json!({"matricula": "B2002", "nome": "João Conceição", "cpf": "55566677788",
        "email": null, "lotacao": {"setor": "Farmácia"}, "ativo": true, "fim_vinculo": null});
    let no_cpf = json!({"matricula": "C3003", "nome": "Sem CPF", "email": null,
        "lotacao": {"setor": "RH"}, "ativo": true, "fim_vinculo": null});
    let long_cpf = json!({"matricula": "D4004", "nome": "CPF Longo", "cpf": "123456789012345",
        "email": null, "lotacao": {"setor": "RH"}, "ativo": true, "fim_vinculo": null});
    let upserts = stage(
        dir.path(),
        &env,
        "upsert",
        &json!([ana, joao, ana_updated, no_cpf, long_cpf]),
    )
    .await;
    let deactivated = stage(
        dir.path(),
        &env,
        "deactivate",
        &json!([{"matricula": "B2002"}]),
    )
    .await;
    let no_statement = stage(
        dir.path(),
        &env,
        "update",
        &json!([{"matricula": "E5005", "nome": "Sem arquivo"}]),
    )
    .await;
    assert_eq!(
        (upserts.len(), deactivated.len(), no_statement.len()),
        (5, 1, 1)
    );
    flush(dir.path(), &env, "invenzi: delivered 4, retried 0, dead 3").await;

    let mut expected = BTreeMap::new();
    let mut ana_row = user("Ana Souza Lima", "11122233344", "UTI Adulto", true, 2);
    ana_row.email = Some("ana@hospital.example".to_owned());
    expected.insert("A1001".to_owned(), ana_row);
    expected.insert(
        "B2002".to_owned(),
        user("João Conceição", "55566677788", "Farmácia", false, 2),
    );
    assert_eq!(
        target.users().await,
        expected,
        "created, updated once, deactivated once"
    );
    let delivered: BTreeSet<String> = [&upserts[0], &upserts[1], &upserts[2], &deactivated[0]]
        .into_iter()
        .cloned()
        .collect();
    assert_eq!(
        target.landed().await,
        delivered,
        "a landing row for each applied record, none for the dead (the refused one was rolled back)"
    );

    let output = run_cli(dir.path(), &env, &["ls", "--failed", "--json"]).await;
    assert!(output.status.success(), "{}", text(&output));
    let dead: BTreeMap<String, String> = json_lines(&output.stdout)
        .into_iter()
        .map(|l| {
            (
                l["id"].as_str().unwrap().to_owned(),
                l["last_error"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(dead.len(), 3, "{dead:?}");
    let reason = &dead[&upserts[3]];
    assert!(
        reason.contains("payload field \"cpf\" is missing")
            && reason.contains("usuario.upsert.sql"),
        "missing field: {reason}"
    );
    let reason = &dead[&upserts[4]];
    let code = match dialect {
        Dialect::Postgres => "PostgreSQL 22001",
        Dialect::MariaDb => "MySQL 1406",
    };
    assert!(
        reason.contains(code) && reason.contains("usuario.upsert.sql"),
        "refused value: {reason}"
    );
    let reason = &dead[&no_statement[0]];
    assert!(
        reason.contains("usuario.update.sql"),
        "no statement: {reason}"
    );

    // 3. Replay everything twice: the index is rebuilt from the folder, every delivered record
    // is pending again and delivered again with its id; the dead stay dead.
    for round in 1..=2 {
        for name in ["index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm"] {
            let path = dir.path().join("staging/_state").join(name);
            if path.exists() {
                std::fs::remove_file(&path).unwrap();
            }
        }
        flush(dir.path(), &env, "invenzi: delivered 4, retried 0, dead 0").await;
        assert_eq!(
            target.users().await,
            expected,
            "replay {round}: nothing applied a second time"
        );
        assert_eq!(target.landed().await, delivered, "replay {round}");
    }
    target.clean_up().await;
    eprintln!("apply_mode: {dialect:?}: 4 records applied once, 3 dead, 2 replays applied nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_upsert_example_is_applied_once_across_replays() {
    upsert_example_is_applied_once_across_replays(Dialect::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_upsert_example_is_applied_once_across_replays() {
    upsert_example_is_applied_once_across_replays(Dialect::MariaDb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_names_the_bad_statement_file_and_place() {
    let dir = tempfile::tempdir().unwrap();
    let apply = dir.path().join("apply");
    std::fs::create_dir(&apply).unwrap();
    std::fs::write(
        apply.join("usuario.upsert.sql"),
        "-- a comment\nUPDATE t SET nome = :nome WHERE id = ?",
    )
    .unwrap();
    std::fs::write(apply.join("usuario.sql"), "SELECT 1").unwrap();
    let config = dir.path().join("estafeta.toml");
    std::fs::write(
        &config,
        "[[sinks]]\nname = \"invenzi\"\ntype = \"database\"\nurl = \"sqlite://central.db\"\napply_dir = \"apply\"\n\n\
         [[sinks]]\nname = \"other\"\ntype = \"database\"\nurl = \"sqlite://other.db\"\napply_dir = \"missing\"\n",
    )
    .unwrap();
    let env = [("CONFIG_FILE", config.to_str().unwrap())];
    let output = run_cli(dir.path(), &env, &["check-config", "--offline"]).await;
    let shown = text(&output);
    assert_eq!(output.status.code(), Some(2), "{shown}");
    for expected in [
        "usuario.upsert.sql:2:38: a positional placeholder (?)",
        "usuario.sql: expected a file named <entity>.<action>.sql",
        "sinks[1].apply_dir=",
        "expected a readable folder",
    ] {
        assert!(
            shown.contains(expected),
            "{expected:?} missing from:\n{shown}"
        );
    }
    // The daemon refuses to start on the same mistakes.
    let output = run_cli(dir.path(), &env, &["flush"]).await;
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
}
