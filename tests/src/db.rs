//! Connections to the real PostgreSQL and MariaDB servers the tests use, and unique table names.
//! A missing server is a failure, never a silent skip: `scripts/start-services` starts them.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Connection string of the test PostgreSQL (trust authentication).
pub const PG_CONFIG: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=5";
/// The same database as a URL, as the agent's `CENTRAL_DATABASE_URL` takes it.
pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// URL of the test MariaDB (root, empty password).
pub const MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/test";

/// A client of the test PostgreSQL database; its connection runs on a spawned task.
///
/// # Panics
/// When the server cannot be reached, saying to run `scripts/start-services`.
pub async fn pg() -> tokio_postgres::Client {
    match tokio_postgres::connect(PG_CONFIG, tokio_postgres::NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    eprintln!("PostgreSQL connection closed: {e}");
                }
            });
            client
        }
        Err(e) => panic!(
            "PostgreSQL is missing: cannot connect to postgres@127.0.0.1:5432/test ({e}); \
             run scripts/start-services"
        ),
    }
}

/// A connection to the test MariaDB database.
///
/// # Panics
/// When the server cannot be reached, saying to run `scripts/start-services`.
pub async fn mysql() -> mysql_async::Conn {
    match mysql_async::Conn::from_url(MYSQL_URL).await {
        Ok(conn) => conn,
        Err(e) => panic!(
            "MariaDB is missing: cannot connect to root@127.0.0.1:3306/test ({e}); \
             run scripts/start-services"
        ),
    }
}

/// A name no other test (in this run or a concurrent one) uses, such as `patient_4711_3_k2x9`:
/// `prefix`, the process id, a per-process counter and a time salt. Lower case ASCII, digits
/// and `_` only, so it is a valid unquoted table name in PostgreSQL, MariaDB and SQLite, and
/// fits PostgreSQL's 63-byte limit for prefixes up to 30 bytes.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{}_{}_{n}_{}",
        prefix.to_ascii_lowercase(),
        std::process::id(),
        base36(u64::from(nanos))
    )
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ASCII digits")
}
