//! ODBC sources for the drivers no server here can answer (issue 22, seeds 001, 003, 004):
//! SQL Server through Debian's FreeTDS driver (`tdsodbc`, installed by scripts/install-deps),
//! and a driver that is not installed (Oracle, InterSystems). `check-config` connects to each
//! source: the FreeTDS driver loads and says that no server answered; a missing driver gives
//! the driver manager's own error and what to run. Neither shows the password. The README's
//! "SQL Server, Oracle and InterSystems through ODBC" quotes these messages.

use estafeta_e2e::{free_port, run_cli};

/// `check-config` over one ODBC source reading `url`; (exit code, stdout).
async fn check(url: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("q.sql"),
        "SELECT 1 AS id WHERE 1 = :limit\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("estafeta.toml"),
        format!(
            "[[sources]]\nname = \"lis\"\nurl = \"{}\"\nquery = \"q.sql\"\nevery = \"00:00:05\"\nentity = \"exame\"\naction = \"create\"\ncheckpoint = \"id\"\n",
            url.replace('\\', "\\\\")
        ),
    )
    .unwrap();
    let toml = dir.path().join("estafeta.toml");
    let db = dir.path().join("central.db");
    let db_url = format!("sqlite://{}", db.display());
    let env = [
        ("CONFIG_FILE", toml.to_str().unwrap()),
        ("CENTRAL_DATABASE_URL", db_url.as_str()),
    ];
    let out = run_cli(dir.path(), &env, &["check-config"]).await;
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freetds_loads_and_says_no_sql_server_answered() {
    let installed = std::process::Command::new("odbcinst")
        .args(["-q", "-d", "-n", "FreeTDS"])
        .output()
        .expect("odbcinst (unixodbc) is missing: run scripts/install-deps");
    assert!(
        installed.status.success(),
        "the FreeTDS ODBC driver is not registered: run scripts/install-deps (tdsodbc)"
    );
    let port = free_port();
    let (code, text) = check(&format!(
        "odbc:Driver={{FreeTDS}};Server=127.0.0.1;Port={port};Database=bemsoft;UID=estafeta;PWD=s3nha-forte;TDS_Version=7.4;Encrypt=yes"
    ))
    .await;
    assert_eq!(code, Some(3), "{text}");
    assert!(text.contains("source lis: UNREACHABLE"), "{text}");
    // The driver itself answered (it loaded): its message, as the README quotes it.
    assert!(
        text.contains("[FreeTDS][SQL Server]Unable to connect: Adaptive Server is unavailable or does not exist"),
        "{text}"
    );
    assert!(!text.contains("s3nha-forte"), "the password shows: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_that_is_not_installed_is_named_with_what_to_run() {
    let (code, text) = check(
        "odbc:Driver={Oracle 21 ODBC driver};Dbq=//127.0.0.1:1521/TASY;Uid=tasy;Pwd=s3nha-forte",
    )
    .await;
    assert_eq!(code, Some(3), "{text}");
    assert!(text.contains("source lis: UNREACHABLE"), "{text}");
    assert!(
        text.contains("is the driver named in Driver={…} installed? see odbcinst -q -d"),
        "{text}"
    );
    // unixODBC's own words for a driver it does not know, as the README quotes them.
    assert!(
        text.contains(
            "[unixODBC][Driver Manager]Can't open lib 'Oracle 21 ODBC driver' : file not found"
        ) || text.contains("[unixODBC][Driver Manager]Data source name not found"),
        "{text}"
    );
    assert!(!text.contains("s3nha-forte"), "the password shows: {text}");
}
