//! The real `estafeta` binary: `version`, `check-config` and exit codes. Each run gets an empty
//! environment and its own working directory, so no test sees another's settings.

use std::path::Path;
use std::process::{Command, Output};

fn estafeta(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_estafeta"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("the estafeta binary runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn version_prints_the_package_version() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = estafeta(dir.path(), &[], &["version"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("estafeta {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_config_with_a_bad_crontab_names_it_and_exits_2() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = estafeta(
        dir.path(),
        &[("CRONTAB", "*/5 * *")],
        &["check-config", "--offline"],
    );
    let all = text(&output);
    assert_eq!(output.status.code(), Some(2), "{all}");
    assert!(
        all.contains(r#"CRONTAB="*/5 * *": expected 5 cron fields (or 6 with seconds), found 3"#),
        "{all}"
    );
}

#[test]
fn check_config_offline_accepts_the_defaults_and_hides_secrets() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join(".env"),
        "CRONTAB=\"*/5 * * * *\"\nINGEST_TOKEN=very-secret-token\n",
    )
    .expect("write .env");
    let output = estafeta(
        dir.path(),
        &[("CENTRAL_API_URL", "https://user:hunter2@api.example/v1")],
        &["check-config", "--offline"],
    );
    let all = text(&output);
    assert_eq!(output.status.code(), Some(0), "{all}");
    assert!(all.contains("*/5 * * * *"), "{all}");
    assert!(
        all.contains("sinks.api.url = https://user:***@api.example/v1"),
        "{all}"
    );
    assert!(
        !all.contains("very-secret-token") && !all.contains("hunter2"),
        "{all}"
    );
}

#[test]
fn a_config_mistake_stops_other_commands_with_exit_2() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = estafeta(dir.path(), &[("INGEST_ADDR", "0.0.0.0:8787")], &["status"]);
    let all = text(&output);
    assert_eq!(output.status.code(), Some(2), "{all}");
    assert!(all.contains("INGEST_TOKEN is empty"), "{all}");
}

#[test]
fn a_missing_env_file_and_bad_arguments_exit_2() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = estafeta(dir.path(), &[], &["--env-file", "nope.env", "status"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    let output = estafeta(dir.path(), &[], &["frobnicate"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
}
