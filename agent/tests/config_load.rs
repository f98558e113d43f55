//! Loading the configuration: defaults, precedence (.env < environment, file < environment),
//! `${VAR}` in the TOML file, validation that reports every mistake at once, and redaction.
//! Every test passes its own environment map and working directory, so none depends on the
//! process environment or on another test.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use estafeta::config::{Config, ConfigError, Inspection, SinkKind};

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn inspect(dir: &Path, pairs: &[(&str, &str)]) -> Inspection {
    Config::inspect(dir, None, &env(pairs))
}

fn load(dir: &Path, pairs: &[(&str, &str)]) -> Config {
    match inspect(dir, pairs).result {
        Ok(config) => config,
        Err(err) => panic!("configuration refused:\n{err}"),
    }
}

fn refuse(dir: &Path, pairs: &[(&str, &str)]) -> ConfigError {
    inspect(dir, pairs)
        .result
        .expect_err("the configuration should be refused")
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write test file");
    path
}

#[test]
fn nothing_configured_gives_the_embedded_defaults() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = load(dir.path(), &[]);
    assert_eq!(config.crontab, "* * * * *");
    assert_eq!(config.tz, None);
    assert_eq!(config.staging_path, dir.path().join("staging"));
    assert_eq!(config.failed_dir, None);
    assert_eq!(
        config.failed_dir(),
        dir.path().join("staging").join("_failed")
    );
    assert_eq!(config.ingest_addr.to_string(), "127.0.0.1:8787");
    assert_eq!(config.ingest_token, None);
    assert_eq!(config.max_body_bytes, 10 * 1024 * 1024);
    assert!(config.flush_on_write);
    assert!(!config.dry_run);
    assert_eq!(config.max_records, 100_000);
    assert_eq!(config.batch_size, 500);
    assert_eq!(config.retry_base, Duration::from_secs(1));
    assert_eq!(config.retry_max, Duration::from_secs(300));
    assert_eq!(config.shutdown_grace, Duration::from_secs(10));
    assert_eq!(config.log_level, "info");
    assert_eq!(config.log_dir, None);
    assert!(!config.agent_id.is_empty());
    assert_eq!(config.sink_names(), vec!["database".to_string()]);
    match &config.sinks[0].kind {
        SinkKind::Database(db) => assert_eq!(db.url, "sqlite://central.db"),
        other => panic!("expected the embedded SQLite sink, got {other:?}"),
    }
    assert_eq!(
        config.route("create", "patient"),
        vec!["database".to_string()]
    );
    assert_eq!(config.key_field("patient"), "id");
    let options = config.staging_options();
    assert_eq!(options.root, dir.path().join("staging"));
    assert_eq!(options.sinks, vec!["database".to_string()]);
}

#[test]
fn every_mistake_is_listed_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let err = refuse(
        dir.path(),
        &[
            ("CRONTAB", "*/5 * *"),
            ("TZ", "Mars/Olympus"),
            ("IS_ABSOLUTE_STAGING_AREA_PATH", "maybe"),
            ("STAGING_MAX_BYTES", "lots"),
            ("MAX_BODY_BYTES", "0"),
            ("FLUSH_ON_WRITE", "sim"),
            ("BATCH_SIZE", "-3"),
            ("RETRY_BASE_SECS", "soon"),
            ("LOG_LEVEL", "verbose"),
            ("CENTRAL_DATABASE_URL", "oracle://u:pw@db/x"),
            ("CENTRAL_API_URL", "ftp://api"),
            ("INGEST_ADDR", "not-an-address"),
        ],
    );
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    for key in [
        "CRONTAB",
        "TZ",
        "IS_ABSOLUTE_STAGING_AREA_PATH",
        "STAGING_MAX_BYTES",
        "MAX_BODY_BYTES",
        "FLUSH_ON_WRITE",
        "BATCH_SIZE",
        "RETRY_BASE_SECS",
        "LOG_LEVEL",
        "CENTRAL_DATABASE_URL",
        "CENTRAL_API_URL",
        "INGEST_ADDR",
    ] {
        assert!(keys.contains(&key), "{key} missing from:\n{err}");
    }
    let text = err.to_string();
    assert!(
        text.contains(r#"CRONTAB="*/5 * *": expected 5 cron fields (or 6 with seconds), found 3"#),
        "{text}"
    );
    assert_eq!(
        text.lines().count(),
        err.problems.len(),
        "one problem per line"
    );
    assert!(!text.contains(":pw@"), "a URL password leaked:\n{text}");
}

#[test]
fn a_non_loopback_address_without_a_token_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let err = refuse(
        dir.path(),
        &[
            ("INGEST_ADDR", "0.0.0.0:8787"),
            ("INGEST_ALLOW_PLAINTEXT", "true"),
        ],
    );
    assert_eq!(
        err.to_string(),
        "INGEST_ADDR=0.0.0.0:8787 listens beyond this machine but INGEST_TOKEN is empty: set INGEST_TOKEN to a random secret of at least 32 characters, made with `estafeta token` (or `openssl rand -hex 32`), or listen on 127.0.0.1"
    );
    let config = load(
        dir.path(),
        &[
            ("INGEST_ADDR", "0.0.0.0:8787"),
            ("INGEST_TOKEN", "a-long-random-secret-of-32-chars"),
            ("INGEST_ALLOW_PLAINTEXT", "true"),
        ],
    );
    assert_eq!(config.ingest_addr.to_string(), "0.0.0.0:8787");
}

/// Safe by default (contract 7): beyond loopback the token is all that guards the records, so it
/// must be long.
#[test]
fn a_non_loopback_address_with_a_short_token_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let short = "0123456789abcdefghijklmnopqrstu"; // 31 characters
    let err = refuse(
        dir.path(),
        &[
            ("INGEST_ADDR", "10.0.0.5:8787"),
            ("INGEST_TOKEN", short),
            ("INGEST_ALLOW_PLAINTEXT", "true"),
        ],
    );
    assert_eq!(
        err.to_string(),
        "INGEST_ADDR=10.0.0.5:8787 listens beyond this machine but INGEST_TOKEN has only 31 characters: beyond loopback it must have at least 32; make one with `estafeta token` (or `openssl rand -hex 32`), or listen on 127.0.0.1"
    );
    assert!(!err.to_string().contains(short));
    // On loopback a short token is the user's choice; 32 characters do beyond it.
    load(dir.path(), &[("INGEST_TOKEN", "short")]);
    let long = format!("{short}v");
    load(
        dir.path(),
        &[
            ("INGEST_ADDR", "10.0.0.5:8787"),
            ("INGEST_TOKEN", &long),
            ("INGEST_ALLOW_PLAINTEXT", "true"),
        ],
    );
}

#[test]
fn the_token_can_come_from_a_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let token = "f".repeat(64);
    write(dir.path(), "ingest-token", &format!("{token}\n"));
    let config = load(
        dir.path(),
        &[
            ("INGEST_ADDR", "0.0.0.0:8787"),
            ("INGEST_TOKEN_FILE", "ingest-token"),
            ("INGEST_ALLOW_PLAINTEXT", "true"),
        ],
    );
    assert_eq!(config.ingest_token.as_deref(), Some(token.as_str()));
    // The same token in both places is fine; two different ones are a mistake.
    load(
        dir.path(),
        &[
            ("INGEST_TOKEN_FILE", "ingest-token"),
            ("INGEST_TOKEN", &token),
        ],
    );
    let err = refuse(
        dir.path(),
        &[
            ("INGEST_TOKEN_FILE", "ingest-token"),
            ("INGEST_TOKEN", "another-token"),
        ],
    );
    assert_eq!(
        err.to_string(),
        "INGEST_TOKEN=***: differs from the token in INGEST_TOKEN_FILE=ingest-token; set only one of the two"
    );
    // A missing or empty file is named, with what to do; the token never shows.
    let err = refuse(dir.path(), &[("INGEST_TOKEN_FILE", "nowhere")]);
    assert!(
        err.to_string()
            .starts_with("INGEST_TOKEN_FILE=nowhere: could not read the token file")
            && err.to_string().contains("estafeta token"),
        "{err}"
    );
    write(dir.path(), "empty", "\n");
    let err = refuse(dir.path(), &[("INGEST_TOKEN_FILE", "empty")]);
    assert!(err.to_string().contains("one token on one line"), "{err}");
    let inspection = inspect(dir.path(), &[("INGEST_TOKEN_FILE", "ingest-token")]);
    assert!(!format!("{:?}", inspection.settings).contains(&token));
}

#[test]
fn allowed_hosts_are_names_or_addresses_without_port() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = load(dir.path(), &[]);
    assert!(config.ingest_allowed_hosts.is_empty());
    let config = load(
        dir.path(),
        &[(
            "INGEST_ALLOWED_HOSTS",
            " Estafeta.Hospital.Local , 10.0.0.5,[FE80::1],,",
        )],
    );
    assert_eq!(
        config.ingest_allowed_hosts,
        vec!["estafeta.hospital.local", "10.0.0.5", "fe80::1"]
    );
    for bad in [
        "estafeta.local:8787",
        "*.hospital.local",
        "http://estafeta.local",
    ] {
        let err = refuse(dir.path(), &[("INGEST_ALLOWED_HOSTS", bad)]);
        assert!(
            err.to_string().contains("without scheme, port or wildcard"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn an_unknown_key_in_the_toml_file_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(
        dir.path(),
        "estafeta.toml",
        "[[sinks]]\nname = \"api\"\ntype = \"http\"\nurl = \"https://api.example\"\ncolour = \"blue\"\n",
    );
    let err = refuse(dir.path(), &[("CONFIG_FILE", "estafeta.toml")]);
    let text = err.to_string();
    assert!(text.contains("colour"), "{text}");
    assert!(
        text.starts_with("CONFIG_FILE=estafeta.toml: line 5"),
        "{text}"
    );

    write(
        dir.path(),
        "agent.toml",
        "[agent]\ncrontab = \"* * * * *\"\nkrontab = \"x\"\n",
    );
    let err = refuse(dir.path(), &[("CONFIG_FILE", "agent.toml")]);
    assert_eq!(err.problems.len(), 1, "{err}");
    assert_eq!(err.problems[0].key, "[agent] krontab");
}

#[test]
fn variables_in_the_toml_file_read_the_environment() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(
        dir.path(),
        "estafeta.toml",
        r#"
[[sinks]]
name = "api"
type = "http"
url = "https://${API_HOST}/v1"
token = "${API_TOKEN}"
"#,
    );
    let config = load(
        dir.path(),
        &[
            ("CONFIG_FILE", "estafeta.toml"),
            ("API_HOST", "central.example"),
            ("API_TOKEN", "t0ken"),
        ],
    );
    match &config.sinks[0].kind {
        SinkKind::Http(http) => {
            assert_eq!(http.url, "https://central.example/v1");
            assert_eq!(http.token.as_deref(), Some("t0ken"));
        }
        other => panic!("expected an http sink, got {other:?}"),
    }

    let err = refuse(
        dir.path(),
        &[
            ("CONFIG_FILE", "estafeta.toml"),
            ("API_HOST", "central.example"),
        ],
    );
    assert_eq!(err.problems.len(), 1, "{err}");
    assert_eq!(err.problems[0].key, "sinks[0].token");
    assert!(err.problems[0].expected.contains("API_TOKEN"), "{err}");
}

#[test]
fn the_environment_overrides_the_toml_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(
        dir.path(),
        "estafeta.toml",
        r#"
[agent]
crontab = "0 * * * *"
batch_size = 50
dry_run = true

[[sinks]]
name = "api"
type = "http"
url = "https://file.example"
timeout_secs = 3

[[sinks.routes]]
entity = "patient"
method = "put"
"#,
    );
    let config = load(
        dir.path(),
        &[
            ("CONFIG_FILE", "estafeta.toml"),
            ("CRONTAB", "*/10 * * * * *"),
            ("CENTRAL_API_URL", "https://env.example"),
        ],
    );
    assert_eq!(config.crontab, "*/10 * * * * *", "environment wins");
    assert_eq!(
        config.batch_size, 50,
        "the file fills what the environment leaves"
    );
    assert!(config.dry_run);
    assert_eq!(config.sink_names(), vec!["api".to_string()]);
    match &config.sinks[0].kind {
        SinkKind::Http(http) => {
            assert_eq!(http.url, "https://env.example");
            assert_eq!(http.timeout, Duration::from_secs(3));
            assert_eq!(http.routes.len(), 1, "the file's routes stay");
            assert_eq!(http.routes[0].method.as_deref(), Some("PUT"));
        }
        other => panic!("expected an http sink, got {other:?}"),
    }
}

#[test]
fn the_process_environment_overrides_the_env_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(
        dir.path(),
        ".env",
        "CRONTAB=\"*/5 * * * *\"\nSTAGING_AREA_PATH=dados\nMAX_RECORDS=10\n",
    );
    let config = load(dir.path(), &[("MAX_RECORDS", "20")]);
    assert_eq!(config.crontab, "*/5 * * * *");
    assert_eq!(config.staging_path, dir.path().join("dados"));
    assert_eq!(config.max_records, 20);
    assert!(
        config.sources.iter().any(|s| s.starts_with(".env")),
        "{:?}",
        config.sources
    );
}

#[test]
fn an_explicit_env_file_must_exist() {
    let dir = tempfile::tempdir().expect("temp dir");
    let err = Config::inspect(dir.path(), Some(Path::new("missing.env")), &env(&[]))
        .result
        .expect_err("a missing --env-file is an error");
    assert_eq!(err.problems[0].key, "--env-file");
}

#[test]
fn the_staging_path_follows_is_absolute_staging_area_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let absolute = dir.path().join("abs");
    let absolute_text = absolute.to_str().expect("utf-8 temp path");
    let config = load(
        dir.path(),
        &[
            ("STAGING_AREA_PATH", absolute_text),
            ("IS_ABSOLUTE_STAGING_AREA_PATH", "TRUE"),
        ],
    );
    assert_eq!(config.staging_path, absolute);
    let config = load(
        dir.path(),
        &[
            ("STAGING_AREA_PATH", "rel/dir"),
            ("IS_ABSOLUTE_STAGING_AREA_PATH", "no"),
        ],
    );
    assert_eq!(config.staging_path, dir.path().join("rel/dir"));
    let err = refuse(
        dir.path(),
        &[
            ("STAGING_AREA_PATH", "rel/dir"),
            ("IS_ABSOLUTE_STAGING_AREA_PATH", "1"),
        ],
    );
    assert_eq!(err.problems[0].key, "STAGING_AREA_PATH");
}

#[test]
fn routes_must_name_configured_sinks_and_sinks_must_be_unique() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(
        dir.path(),
        "estafeta.toml",
        r#"
[[sinks]]
name = "one"
type = "database"
url = "sqlite://one.db"

[[sinks]]
name = "one"
type = "database"
url = "sqlite://two.db"

[[routes]]
entity = "patient"
sinks = ["nowhere"]

[entities."Bad/Name"]
key_field = "x"
"#,
    );
    let err = refuse(dir.path(), &[("CONFIG_FILE", "estafeta.toml")]);
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"sinks[1].name"), "{err}");
    assert!(keys.contains(&"routes[0].sinks"), "{err}");
    assert!(keys.contains(&"entities.Bad/Name"), "{err}");
}

#[test]
fn routes_and_key_fields_answer_per_action_and_entity() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(
        dir.path(),
        "estafeta.toml",
        r#"
[[routes]]
entity = "audit"
sinks = ["database"]

[entities.visit]
key_field = "visit_no"
"#,
    );
    let config = load(
        dir.path(),
        &[
            ("CONFIG_FILE", "estafeta.toml"),
            ("CENTRAL_DATABASE_URL", "sqlite://db.sqlite"),
            ("CENTRAL_API_URL", "https://api.example"),
        ],
    );
    assert_eq!(
        config.route("create", "audit"),
        vec!["database".to_string()]
    );
    assert_eq!(
        config.route("create", "patient"),
        vec!["database".to_string(), "api".to_string()]
    );
    assert_eq!(config.key_field("visit"), "visit_no");
    assert_eq!(config.key_field("patient"), "id");
}

#[test]
fn secrets_are_redacted() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(
        dir.path(),
        "estafeta.toml",
        r#"
[[sinks]]
name = "partner"
type = "http"
url = "https://partner.example"
token = "file-token-123"

[[sinks.routes]]
headers = { "X-Api-Key" = "header-secret-456" }
"#,
    );
    let config = load(
        dir.path(),
        &[
            ("CONFIG_FILE", "estafeta.toml"),
            ("INGEST_TOKEN", "ingest-secret-789"),
            (
                "CENTRAL_DATABASE_URL",
                "postgres://estafeta:db-pass-000@db.example/central",
            ),
            ("CENTRAL_API_URL", "https://api.example"),
            ("CENTRAL_API_TOKEN", "api-token-abc"),
        ],
    );
    let shown = config.redacted();
    let text = shown
        .iter()
        .map(|(k, v)| format!("{k} = {v}"))
        .collect::<Vec<_>>()
        .join("\n");
    for secret in [
        "file-token-123",
        "header-secret-456",
        "ingest-secret-789",
        "db-pass-000",
        "api-token-abc",
    ] {
        assert!(!text.contains(secret), "{secret} shown:\n{text}");
    }
    let get = |key: &str| {
        shown
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{key} missing from:\n{text}"))
    };
    assert_eq!(get("INGEST_TOKEN"), "***");
    assert_eq!(get("sinks.api.token"), "***");
    assert_eq!(get("sinks.partner.token"), "***");
    assert_eq!(
        get("sinks.database.url"),
        "postgres://estafeta:***@db.example/central"
    );
    assert!(!format!("{config:?}").contains("ingest-secret-789"));

    // Check-config's view of the raw settings hides them too.
    let inspection = inspect(
        dir.path(),
        &[
            ("INGEST_TOKEN", "ingest-secret-789"),
            (
                "CENTRAL_DATABASE_URL",
                "postgres://estafeta:db-pass-000@db.example/central",
            ),
        ],
    );
    let raw = format!("{:?}", inspection.settings);
    assert!(
        !raw.contains("ingest-secret-789") && !raw.contains("db-pass-000"),
        "{raw}"
    );
}

#[test]
fn sizes_durations_and_booleans_are_read() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = load(
        dir.path(),
        &[
            ("STAGING_MAX_BYTES", "2GiB"),
            ("STAGING_MIN_FREE_BYTES", "500MB"),
            ("MAX_BODY_BYTES", "1048576"),
            ("KEEP_DELIVERED_DAYS", "7"),
            ("FLUSH_ON_WRITE", "No"),
            ("DRY_RUN", "yes"),
            ("RETRY_BASE_SECS", "0.5"),
            ("TZ", "America/Sao_Paulo"),
        ],
    );
    assert_eq!(config.staging_max_bytes, Some(2 << 30));
    assert_eq!(config.staging_min_free_bytes, 500_000_000);
    assert_eq!(config.max_body_bytes, 1 << 20);
    assert_eq!(config.keep_delivered, Duration::from_secs(7 * 86_400));
    assert!(!config.flush_on_write);
    assert!(config.dry_run);
    assert_eq!(config.retry_base, Duration::from_millis(500));
    assert_eq!(
        config.tz.as_ref().map(|tz| tz.name()),
        Some("America/Sao_Paulo")
    );
}

#[test]
fn a_seed_style_env_file_with_an_unquoted_crontab_is_read() {
    let dir = tempfile::tempdir().expect("temp dir");
    let absolute = dir.path().join("dados");
    write(
        dir.path(),
        ".env",
        &format!(
            "CRONTAB=*/5 * * * * # a cada 5 minutos\nSTAGING_AREA_PATH={}\nIS_ABSOLUTE_STAGING_AREA_PATH=True\nOUTRA_CHAVE=valor\n",
            absolute.display()
        ),
    );
    let config = load(dir.path(), &[]);
    assert_eq!(config.crontab, "*/5 * * * *");
    assert_eq!(config.staging_path, absolute);
}

#[test]
fn central_nats_url_adds_a_nats_sink_with_its_defaults_and_hides_its_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = load(
        dir.path(),
        &[
            ("CENTRAL_NATS_URL", "nats://s3cr3t-tok@127.0.0.1:4222"),
            ("AGENT_ID", "ws-01"),
        ],
    );
    assert_eq!(config.sink_names(), vec!["nats".to_string()]);
    match &config.sinks[0].kind {
        SinkKind::Nats(nats) => {
            assert_eq!(nats.subject, "estafeta.{entity}.{action}");
            assert_eq!(nats.timeout, Duration::from_secs(10));
            assert_eq!(nats.agent_id, "ws-01");
            assert!(nats.stream.is_none(), "no stream creation by default");
        }
        other => panic!("expected a nats sink, got {other:?}"),
    }
    let shown = format!("{:?} {:?}", config.redacted(), config);
    assert!(!shown.contains("s3cr3t-tok"), "{shown}");
    let settings = inspect(
        dir.path(),
        &[
            ("CENTRAL_NATS_URL", "nats://u:pa55@127.0.0.1:4222"),
            ("CENTRAL_NATS_TOKEN", "t0k"),
        ],
    )
    .settings;
    let text = format!("{settings:?}");
    assert!(!text.contains("pa55") && !text.contains("t0k"), "{text}");

    let config = load(
        dir.path(),
        &[
            ("CENTRAL_NATS_URL", "nats://127.0.0.1:4222"),
            ("CENTRAL_NATS_SUBJECT", "h.{agent}.{entity}"),
            ("CENTRAL_NATS_CREATE_STREAM", "yes"),
            ("CENTRAL_NATS_STREAM", "FLEET"),
            ("CENTRAL_NATS_TIMEOUT_SECS", "2.5"),
        ],
    );
    match &config.sinks[0].kind {
        SinkKind::Nats(nats) => {
            let stream = nats.stream.as_ref().expect("create_stream");
            assert_eq!(stream.name, "FLEET");
            assert_eq!(stream.subjects, vec!["h.*.*".to_string()]);
            assert_eq!(stream.replicas, 1);
            assert_eq!(nats.timeout, Duration::from_millis(2500));
        }
        other => panic!("expected a nats sink, got {other:?}"),
    }
}

#[test]
fn nats_mistakes_are_reported_with_key_and_expectation() {
    let dir = tempfile::tempdir().expect("temp dir");
    let err = refuse(
        dir.path(),
        &[
            ("CENTRAL_NATS_URL", "http://u:hunter2@127.0.0.1:4222"),
            ("CENTRAL_NATS_SUBJECT", "estafeta.*.{key}"),
            ("CENTRAL_NATS_STREAM", "A.B"),
        ],
    );
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "CENTRAL_NATS_URL",
            "CENTRAL_NATS_SUBJECT",
            "CENTRAL_NATS_STREAM"
        ],
        "{err}"
    );
    assert!(!err.to_string().contains("hunter2"), "{err}");

    let err = refuse(dir.path(), &[("CENTRAL_NATS_TOKEN", "t")]);
    assert!(
        err.to_string().contains("CENTRAL_NATS_URL is empty"),
        "{err}"
    );
}

#[test]
fn a_toml_nats_sink_takes_stream_settings_and_refuses_fields_of_other_types() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(
        dir.path(),
        "estafeta.toml",
        r#"
[[sinks]]
name = "nats"
type = "nats"
url = "nats://127.0.0.1:4222"
subject = "estafeta.{agent}.{entity}.{action}"
create_stream = true
stream = "FLEET"
stream_subjects = ["estafeta.>"]
retention = "workqueue"
replicas = 3
duplicate_window_secs = 3600
"#,
    );
    let config = load(
        dir.path(),
        &[
            ("CONFIG_FILE", "estafeta.toml"),
            ("CENTRAL_NATS_TIMEOUT_SECS", "4"),
        ],
    );
    match &config.sinks[0].kind {
        SinkKind::Nats(nats) => {
            let stream = nats.stream.as_ref().expect("create_stream");
            assert_eq!(stream.name, "FLEET");
            assert_eq!(stream.subjects, vec!["estafeta.>".to_string()]);
            assert_eq!(
                stream.retention,
                estafeta::sinks::nats::Retention::WorkQueue
            );
            assert_eq!(stream.replicas, 3);
            assert_eq!(stream.duplicate_window, Some(Duration::from_secs(3600)));
            assert_eq!(nats.timeout, Duration::from_secs(4), "environment wins");
        }
        other => panic!("expected a nats sink, got {other:?}"),
    }
    let config = load(
        dir.path(),
        &[
            ("CONFIG_FILE", "estafeta.toml"),
            ("CENTRAL_NATS_CREATE_STREAM", "false"),
        ],
    );
    assert!(
        matches!(&config.sinks[0].kind, SinkKind::Nats(n) if n.stream.is_none()),
        "{config:?}"
    );

    write(
        dir.path(),
        "bad.toml",
        r#"
[[sinks]]
name = "fleet"
type = "nats"
url = "nats://127.0.0.1:4222"
concurrency = 4
replicas = 9

[[sinks]]
name = "api"
type = "http"
url = "https://central.example"
subject = "x"
"#,
    );
    let err = refuse(dir.path(), &[("CONFIG_FILE", "bad.toml")]);
    let text = err.to_string();
    assert!(
        text.contains(
            "sinks[0].concurrency: applies to http sinks only; remove it from this nats sink"
        ),
        "{text}"
    );
    assert!(
        text.contains("sinks[0].replicas: is used only to create the stream"),
        "{text}"
    );
    assert!(
        text.contains(
            "sinks[1].subject: applies to nats sinks only; remove it from this http sink"
        ),
        "{text}"
    );
}

#[test]
fn a_postgresql_sink_takes_one_or_two_connections() {
    let dir = tempfile::tempdir().unwrap();
    let toml = |n: &str| {
        format!(
            "[[sinks]]\nname = \"central\"\ntype = \"database\"\nurl = \"postgres://u@db.example/central\"\nconnections = {n}\n"
        )
    };
    write(dir.path(), "one.toml", &toml("1"));
    let config = load(dir.path(), &[("CONFIG_FILE", "one.toml")]);
    let SinkKind::Database(db) = &config.sinks[0].kind else {
        panic!("expected a database sink");
    };
    assert_eq!(db.connections, 1);
    write(dir.path(), "three.toml", &toml("3"));
    let err = refuse(dir.path(), &[("CONFIG_FILE", "three.toml")]);
    assert!(
        err.to_string()
            .contains("sinks[0].connections=3: expected 1 or 2"),
        "{err}"
    );
}

#[test]
fn transaction_pooling_is_for_postgresql_sinks_and_off_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let toml = |url: &str, extra: &str| {
        format!("[[sinks]]\nname = \"central\"\ntype = \"database\"\nurl = \"{url}\"\n{extra}")
    };
    let pooling = |file: &str| {
        let config = load(dir.path(), &[("CONFIG_FILE", file)]);
        let SinkKind::Database(db) = &config.sinks[0].kind else {
            panic!("expected a database sink");
        };
        db.transaction_pooling
    };
    write(
        dir.path(),
        "off.toml",
        &toml("postgres://u@db.example/central", ""),
    );
    assert!(!pooling("off.toml"));
    let on = "transaction_pooling = true\n";
    write(
        dir.path(),
        "on.toml",
        &toml("postgres://u@pgbouncer.example:6432/central", on),
    );
    assert!(pooling("on.toml"));
    write(
        dir.path(),
        "mysql.toml",
        &toml("mysql://u@db.example/central", on),
    );
    let err = refuse(dir.path(), &[("CONFIG_FILE", "mysql.toml")]);
    assert!(
        err.to_string().contains(
            "sinks[0].transaction_pooling=true: applies to postgres:// database sinks only"
        ),
        "{err}"
    );
    write(
        dir.path(),
        "http.toml",
        &toml("https://api.example/v1", on).replace("\"database\"", "\"http\""),
    );
    let err = refuse(dir.path(), &[("CONFIG_FILE", "http.toml")]);
    assert!(
        err.to_string().contains("sinks[0].transaction_pooling"),
        "{err}"
    );
}

#[test]
fn a_heartbeat_path_is_checked_and_the_environment_overrides_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let err = refuse(
        dir.path(),
        &[
            ("CENTRAL_API_URL", "https://api.example/v1"),
            ("CENTRAL_API_HEARTBEAT_PATH", "/agents/{host}"),
        ],
    );
    assert_eq!(err.problems.len(), 1, "{err}");
    assert_eq!(err.problems[0].key, "CENTRAL_API_HEARTBEAT_PATH");
    assert!(err.to_string().contains("{agent_id}"), "{err}");

    write(
        dir.path(),
        "estafeta.toml",
        "[[sinks]]\nname = \"api\"\ntype = \"http\"\nurl = \"https://api.example\"\nheartbeat_path = \"/beats\"\n\n\
         [[sinks]]\nname = \"db\"\ntype = \"database\"\nurl = \"sqlite://c.db\"\nheartbeat_path = \"/x\"\n",
    );
    let err = refuse(dir.path(), &[("CONFIG_FILE", "estafeta.toml")]);
    assert_eq!(err.problems.len(), 1, "{err}");
    assert!(err.problems[0].key.contains("heartbeat_path"), "{err}");

    write(
        dir.path(),
        "estafeta.toml",
        "[[sinks]]\nname = \"api\"\ntype = \"http\"\nurl = \"https://api.example\"\nheartbeat_path = \"/beats\"\n",
    );
    let http_path = |config: &Config| match &config.sinks[0].kind {
        SinkKind::Http(http) => http.heartbeat_path.clone(),
        other => panic!("expected the HTTP sink, got {other:?}"),
    };
    let file_only = load(dir.path(), &[("CONFIG_FILE", "estafeta.toml")]);
    assert_eq!(http_path(&file_only).as_deref(), Some("/beats"));
    let overridden = load(
        dir.path(),
        &[
            ("CONFIG_FILE", "estafeta.toml"),
            ("CENTRAL_API_HEARTBEAT_PATH", "/agents/{agent_id}"),
        ],
    );
    assert_eq!(
        http_path(&overridden).as_deref(),
        Some("/agents/{agent_id}")
    );
}

#[test]
fn min_free_disk_mb_sets_the_host_guard_and_must_agree_with_its_byte_spelling() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = load(dir.path(), &[("MIN_FREE_DISK_MB", "512")]);
    assert_eq!(config.staging_min_free_bytes, 512 << 20);
    let config = load(
        dir.path(),
        &[
            ("MIN_FREE_DISK_MB", "256"),
            ("STAGING_MIN_FREE_BYTES", "256MiB"),
        ],
    );
    assert_eq!(config.staging_min_free_bytes, 256 << 20);
    let err = refuse(
        dir.path(),
        &[
            ("MIN_FREE_DISK_MB", "100"),
            ("STAGING_MIN_FREE_BYTES", "1GiB"),
        ],
    );
    assert_eq!(err.problems.len(), 1, "{err}");
    assert_eq!(err.problems[0].key, "MIN_FREE_DISK_MB");
    let err = refuse(dir.path(), &[("MIN_FREE_DISK_MB", "lots")]);
    assert!(err.to_string().contains("megabytes"), "{err}");
}

/// `max_attempts` (BEMSOFT_RETRIES): per sink in the TOML file, for the `api`, `database` and
/// `nats` sinks by `CENTRAL_<SINK>_MAX_ATTEMPTS` (overriding the file), unset by default
/// (retry forever); zero, a word, or a key for a sink that does not exist is refused, named.
#[test]
fn max_attempts_is_set_per_sink_and_checked() {
    let dir = tempfile::tempdir().expect("temp dir");
    write(
        dir.path(),
        "estafeta.toml",
        r#"
[[sinks]]
name = "central"
type = "http"
url = "https://api.example"
max_attempts = 5

[[sinks]]
name = "api"
type = "http"
url = "https://other.example"
max_attempts = 9

[[sinks]]
name = "landing"
type = "database"
url = "sqlite://landing.db"
"#,
    );
    let config = load(
        dir.path(),
        &[
            ("CONFIG_FILE", "estafeta.toml"),
            ("CENTRAL_API_MAX_ATTEMPTS", "3"),
        ],
    );
    assert_eq!(config.max_attempts("central"), Some(5));
    assert_eq!(
        config.max_attempts("api"),
        Some(3),
        "the key overrides the file"
    );
    assert_eq!(config.max_attempts("landing"), None, "unset: retry forever");

    let defaults = load(dir.path(), &[("CENTRAL_API_URL", "https://api.example")]);
    assert_eq!(defaults.max_attempts("api"), None);

    let err = refuse(
        dir.path(),
        &[
            ("CENTRAL_API_URL", "https://api.example"),
            ("CENTRAL_API_MAX_ATTEMPTS", "0"),
            ("CENTRAL_NATS_MAX_ATTEMPTS", "4"),
            ("CENTRAL_DATABASE_MAX_ATTEMPTS", "many"),
        ],
    );
    let text = err.to_string();
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "CENTRAL_DATABASE_MAX_ATTEMPTS",
            "CENTRAL_API_MAX_ATTEMPTS",
            "CENTRAL_NATS_MAX_ATTEMPTS"
        ],
        "{text}"
    );
    assert!(text.contains("from 1 to 1000000"), "{text}");
    assert!(
        text.contains("there is no \"nats\" sink: set CENTRAL_NATS_URL"),
        "{text}"
    );

    write(
        dir.path(),
        "zero.toml",
        "[[sinks]]\nname = \"central\"\ntype = \"http\"\nurl = \"https://api.example\"\nmax_attempts = 0\n",
    );
    let err = refuse(dir.path(), &[("CONFIG_FILE", "zero.toml")]);
    assert_eq!(err.problems.len(), 1, "{err}");
    assert_eq!(err.problems[0].key, "sinks[0].max_attempts");
}
