//! The shipped examples (`.env.example`, `examples/estafeta.toml`) load without a mistake, so
//! what users copy always works. Hermetic: the environment is a map built here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use estafeta::config::keys::{DefaultValue, KEY_TABLE};
use estafeta::config::{Config, KEYS, SinkKind};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent/ has a parent")
        .to_path_buf()
}

#[test]
fn env_example_lists_every_key_and_its_values_load() {
    let root = repo_root();
    let example = root.join(".env.example");
    let text = std::fs::read_to_string(&example).expect("read .env.example");
    let first_key = text.lines().find_map(|l| {
        let (key, _) = l.strip_prefix('#')?.split_once('=')?;
        (!key.is_empty() && key.chars().all(|c| c.is_ascii_uppercase() || c == '_')).then_some(key)
    });
    assert_eq!(
        first_key,
        Some("CRONTAB"),
        "CRONTAB comes first, as in the seed"
    );
    assert_lists_every_key(".env.example", &text);
    for key in KEYS {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("#{key}="))),
            "{key} is set in .env.example; every key stays commented there"
        );
    }

    // As shipped (everything commented out): the embedded defaults.
    let dir = tempfile::tempdir().expect("temp dir");
    let config = Config::inspect(dir.path(), Some(&example), &BTreeMap::new())
        .result
        .unwrap_or_else(|err| panic!(".env.example refused:\n{err}"));
    assert_eq!(config.sink_names(), vec!["database".to_string()]);

    // Every line uncommented: the documented defaults are valid and are the defaults.
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.split_once('=').is_some_and(|(k, _)| KEYS.contains(&k)) => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let env_file = dir.path().join(".env");
    std::fs::write(&env_file, uncommented).expect("write .env");
    let loaded = Config::inspect(dir.path(), Some(&env_file), &BTreeMap::new())
        .result
        .unwrap_or_else(|err| panic!(".env.example uncommented refused:\n{err}"));
    let defaults = Config::inspect(dir.path(), None, &BTreeMap::new())
        .result
        .expect("defaults load");
    let shown = |c: &Config| {
        c.redacted()
            .into_iter()
            .filter(|(k, _)| k != "AGENT_ID")
            .collect::<Vec<_>>()
    };
    assert_eq!(shown(&loaded), shown(&defaults));
}

#[test]
fn toml_example_loads_with_two_sinks_routes_and_entities() {
    let root = repo_root();
    let dir = tempfile::tempdir().expect("temp dir");
    let env: BTreeMap<String, String> = [
        ("CONFIG_FILE", root.join("examples/estafeta.toml")),
        ("API_TOKEN", PathBuf::from("example-token")),
        ("WAREHOUSE_PASSWORD", PathBuf::from("example-password")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.display().to_string()))
    .collect();
    let config = Config::inspect(dir.path(), None, &env)
        .result
        .unwrap_or_else(|err| panic!("examples/estafeta.toml refused:\n{err}"));
    assert_eq!(
        config.sink_names(),
        vec!["api".to_string(), "warehouse".to_string()]
    );
    assert!(matches!(config.sinks[0].kind, SinkKind::Http(_)));
    match &config.sinks[1].kind {
        SinkKind::Database(db) => assert!(db.url.contains("example-password")),
        other => panic!("expected a database sink, got {other:?}"),
    }
    assert_eq!(config.crontab, "*/5 * * * *");
    assert_eq!(
        config.route("create", "audit"),
        vec!["warehouse".to_string()]
    );
    assert_eq!(config.key_field("patient"), "mrn");
    assert!(config.entities["patient"].schema.is_some());
    let shown = format!("{:?}", config.redacted());
    assert!(!shown.contains("example-token") && !shown.contains("example-password"));
    assert!(
        estafeta::sinks::build(&config.sinks).is_ok(),
        "the example's sinks build"
    );
}

/// Every key of the key table appears in `text`, set (`KEY=`) or commented (`#KEY=`); a
/// commented key shows the table's default (`#KEY=` when there is none), so the files people
/// copy never disagree with the code. The first key is CRONTAB, as in the seed.
fn assert_lists_every_key(name: &str, text: &str) {
    for key in KEY_TABLE {
        let commented = format!("#{}=", key.name);
        let set = format!("{}=", key.name);
        assert!(
            text.lines()
                .any(|l| l.starts_with(&commented) || l.starts_with(&set)),
            "{} is missing from {name}",
            key.name
        );
        let expected = format!("{commented}{}", key.default.env_line_value());
        for line in text.lines().filter(|l| l.starts_with(&commented)) {
            assert_eq!(
                line, expected,
                "{name} comments out {} with a value other than its default",
                key.name
            );
        }
    }
    let first_key = text.lines().find_map(|l| {
        let (key, _) = l.trim_start_matches('#').split_once('=')?;
        (!key.is_empty() && key.chars().all(|c| c.is_ascii_uppercase() || c == '_')).then_some(key)
    });
    assert_eq!(first_key, Some("CRONTAB"), "CRONTAB comes first in {name}");
}

#[test]
fn readme_configuration_table_has_a_row_for_every_key() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("read README.md");
    for key in KEY_TABLE {
        let row_start = format!("| `{}` | ", key.name);
        let Some(row) = readme.lines().find(|l| l.starts_with(&row_start)) else {
            panic!(
                "README.md's configuration table has no row for {}",
                key.name
            );
        };
        let default_cell = row[row_start.len()..]
            .split(" | ")
            .next()
            .expect("a Default column");
        // A value is written as code (`10MiB`); no value is described in words, the words
        // check-config shows (`(no limit)`), without the parentheses.
        let expected = match key.default {
            DefaultValue::Unset(meaning) => meaning
                .trim_start_matches('(')
                .trim_end_matches(')')
                .to_owned(),
            DefaultValue::WhenNoSink(url) => format!("`{url}`"),
            other => format!("`{}`", other.value().expect("a default value")),
        };
        assert!(
            default_cell.contains(&expected),
            "README.md gives {} the default {default_cell:?}; the key table says {expected}",
            key.name
        );
    }
}

#[test]
fn deb_env_file_lists_every_key_and_loads_with_the_package_paths() {
    let path = repo_root().join("installer/debian/estafeta.env");
    let text = std::fs::read_to_string(&path).expect("read installer/debian/estafeta.env");
    assert_lists_every_key("installer/debian/estafeta.env", &text);
    let active: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert_eq!(
        active,
        vec![
            "CRONTAB=\"* * * * *\"",
            "STAGING_AREA_PATH=/var/lib/estafeta/staging",
            "IS_ABSOLUTE_STAGING_AREA_PATH=true",
            "STAGING_KEY_FILE=/etc/estafeta/keys/staging.key",
            "INGEST_TOKEN_FILE=/etc/estafeta/ingest-token",
            "LOG_DIR=/var/log/estafeta",
        ],
        "only the package's own paths are set; every other key stays commented"
    );
    // The token file is made by the postinst: stand one in for /etc/estafeta/ingest-token.
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("ingest-token");
    std::fs::write(&token_file, format!("{}\n", "a1".repeat(32))).expect("write token");
    // And the staging key the postinst makes (`estafeta key generate`).
    let key_file = dir.path().join("staging.key");
    estafeta_staging::Keyring::generate()
        .save(&key_file, false)
        .expect("write key");
    let env_file = dir.path().join("estafeta.env");
    std::fs::write(
        &env_file,
        text.replace(
            "=/etc/estafeta/ingest-token",
            &format!("={}", token_file.display()),
        )
        .replace(
            "=/etc/estafeta/keys/staging.key",
            &format!("={}", key_file.display()),
        ),
    )
    .expect("write env file");
    let config = Config::inspect(dir.path(), Some(&env_file), &BTreeMap::new())
        .result
        .unwrap_or_else(|err| panic!("installer/debian/estafeta.env refused:\n{err}"));
    assert_eq!(config.ingest_token, Some("a1".repeat(32)));
    assert_eq!(config.staging_path, Path::new("/var/lib/estafeta/staging"));
    assert_eq!(config.crontab, "* * * * *");
    assert_eq!(config.sink_names(), vec!["database".to_string()]);
    assert_eq!(
        config.log_dir.as_deref(),
        Some(Path::new("/var/log/estafeta"))
    );
    // Sealed from the install (issue 23).
    assert_eq!(config.staging_key_file.as_deref(), Some(key_file.as_path()));
    assert!(config.staging_keys.is_some());
}

#[test]
fn windows_env_template_lists_every_key_and_loads_once_its_data_dir_is_filled_in() {
    let path = repo_root().join("installer/windows/estafeta.env.default");
    let text = std::fs::read_to_string(&path).expect("read installer/windows/estafeta.env.default");
    assert_lists_every_key("installer/windows/estafeta.env.default", &text);
    let dir = tempfile::tempdir().expect("temp dir");
    let template = dir.path().join("estafeta.env.default");
    // The template's paths use `\`: on this (Unix) test machine stand in `/` so the absolute
    // path check applies; the Wine check in scripts/package-msi loads the real thing.
    std::fs::write(&template, text.replace('\\', "/")).expect("write template");
    let env_file = dir.path().join("data").join("estafeta.env");
    let outcome = estafeta::winservice::prepare_env_file(&env_file, &template).expect("prepare");
    assert_eq!(outcome, estafeta::winservice::EnvFile::Created);
    let token_file = estafeta::winservice::prepare_token_file(&env_file).expect("token");
    // The first start also makes the staging key the template names (DPAPI on Windows).
    let made = estafeta::winservice::staging_key::prepare(&dir.path().join("data")).expect("key");
    let key_file = dir.path().join("data").join("staging.key");
    assert_eq!(
        made,
        estafeta::winservice::staging_key::StagingKey::Made(key_file.clone())
    );
    let config = Config::inspect(dir.path(), Some(&env_file), &BTreeMap::new())
        .result
        .unwrap_or_else(|err| panic!("the filled-in Windows template was refused:\n{err}"));
    let data = std::path::absolute(dir.path().join("data")).expect("absolute");
    assert_eq!(config.staging_path, data.join("staging"));
    assert_eq!(config.staging_key_file, Some(data.join("staging.key")));
    assert!(config.staging_keys.is_some(), "sealed from the first start");
    // The service's first start made a token, and the template names it.
    assert_eq!(token_file, dir.path().join("data").join("ingest-token"));
    let token = config
        .ingest_token
        .expect("the packaged install has a token");
    assert_eq!(token.len(), 64);
    assert_eq!(
        std::fs::read_to_string(&token_file)
            .expect("token file")
            .trim(),
        token
    );
}

#[test]
fn backslashes_in_unquoted_env_values_are_kept() {
    // Windows paths in the service's env file: `C:\ProgramData\Estafeta\staging`.
    let dir = tempfile::tempdir().expect("temp dir");
    let env_file = dir.path().join("estafeta.env");
    std::fs::write(&env_file, "STAGING_AREA_PATH=a\\b\\staging\n").expect("write");
    let config = Config::inspect(dir.path(), Some(&env_file), &BTreeMap::new())
        .result
        .unwrap_or_else(|err| panic!("refused:\n{err}"));
    assert_eq!(config.staging_path, dir.path().join("a\\b\\staging"));
}

#[test]
fn aghu_user_sync_example_loads_its_statements_for_both_dialects() {
    let root = repo_root();
    let dir = tempfile::tempdir().expect("temp dir");
    for (url, dialect) in [
        (
            "postgres://invenzi@db.hospital.example:5432/invenzi",
            "postgres",
        ),
        (
            "mysql://invenzi@db.hospital.example:3306/invenzi",
            "mariadb",
        ),
    ] {
        let env: BTreeMap<String, String> = [
            (
                "CONFIG_FILE",
                root.join("examples/aghu-user-sync/estafeta.toml")
                    .display()
                    .to_string(),
            ),
            ("INVENZI_DATABASE_URL", url.to_owned()),
            ("INVENZI_DIALECT", dialect.to_owned()),
            (
                "AGHU_DATABASE_URL",
                "postgres://leitor@aghu.hospital.example:5432/aghu".to_owned(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let config = Config::inspect(dir.path(), None, &env)
            .result
            .unwrap_or_else(|err| panic!("examples/aghu-user-sync/estafeta.toml refused:\n{err}"));
        let SinkKind::Database(db) = &config.sinks[0].kind else {
            panic!("expected a database sink, got {:?}", config.sinks[0].kind);
        };
        let apply = db.apply.as_ref().expect("apply mode is on");
        let names: Vec<String> = apply
            .statements()
            .map(|s| format!("{}.{}", s.entity, s.action))
            .collect();
        assert_eq!(names, ["usuario.deactivate", "usuario.upsert"], "{dialect}");
        assert_eq!(config.key_field("usuario"), "matricula");
    }
}
