//! The TOML `partitions` of a nats sink: like `CENTRAL_NATS_PARTITIONS` (which overrides it),
//! it sets the partition count and the default stream subjects' partition token; a value
//! beyond the maximum is refused naming `sinks[i].partitions`.

use std::collections::BTreeMap;
use std::path::Path;

use estafeta::config::{Config, Inspection, SinkKind};
use estafeta::sinks::nats::NatsSinkConfig;

fn inspect(dir: &Path, pairs: &[(&str, &str)]) -> Inspection {
    let env: BTreeMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Config::inspect(dir, None, &env)
}

fn nats(dir: &Path, pairs: &[(&str, &str)]) -> NatsSinkConfig {
    let config = match inspect(dir, pairs).result {
        Ok(config) => config,
        Err(err) => panic!("configuration refused:\n{err}"),
    };
    match &config.sinks[0].kind {
        SinkKind::Nats(nats) => nats.clone(),
        other => panic!("expected a nats sink, got {other:?}"),
    }
}

fn write_sink(dir: &Path, partitions: &str) {
    std::fs::write(
        dir.join("estafeta.toml"),
        format!(
            r#"
[[sinks]]
name = "nats"
type = "nats"
url = "nats://127.0.0.1:4222"
subject = "hospital.{{entity}}.{{action}}"
create_stream = true
{partitions}
"#
        ),
    )
    .expect("write estafeta.toml");
}

#[test]
fn a_toml_nats_sink_takes_partitions_and_the_environment_overrides_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_sink(dir.path(), "partitions = 4");
    let file = [("CONFIG_FILE", "estafeta.toml")];
    let sink = nats(dir.path(), &file);
    assert_eq!(sink.partitions, 4);
    let stream = sink.stream.expect("create_stream");
    assert_eq!(stream.subjects, vec!["hospital.*.*.*".to_string()]);

    // CENTRAL_NATS_PARTITIONS wins, and the default stream subjects follow it.
    let sink = nats(dir.path(), &[file[0], ("CENTRAL_NATS_PARTITIONS", "0")]);
    assert_eq!(sink.partitions, 0);
    assert_eq!(
        sink.stream.expect("create_stream").subjects,
        vec!["hospital.*.*".to_string()]
    );

    // Without the field: no partition token, as before.
    write_sink(dir.path(), "");
    let sink = nats(dir.path(), &file);
    assert_eq!(sink.partitions, 0);
    assert_eq!(
        sink.stream.expect("create_stream").subjects,
        vec!["hospital.*.*".to_string()]
    );
}

#[test]
fn too_many_partitions_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_sink(dir.path(), "partitions = 5000");
    let err = inspect(dir.path(), &[("CONFIG_FILE", "estafeta.toml")])
        .result
        .expect_err("5000 partitions should be refused");
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, vec!["sinks[0].partitions"], "{err}");
    assert!(err.to_string().contains("1024"), "{err}");
}
