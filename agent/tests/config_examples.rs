//! The shipped examples (`.env.example`, `examples/estafeta.toml`) load without a mistake, so
//! what users copy always works. Hermetic: the environment is a map built here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
    for key in KEYS {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("#{key}="))),
            "{key} is missing from .env.example"
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
