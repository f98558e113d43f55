//! Source errors worded by class, as the PostgreSQL reader words them by SQLSTATE
//! (`postgres::worded`): MySQL / MariaDB by the server's error code, SQLite by its result code,
//! ODBC by the SQLSTATE of the driver's diagnostic. Each says in one line what to do next. A
//! class whose messages quote a row's values (a value refused, a duplicate key) keeps only the
//! code: a source's error is logged and shown by `GET /v1/status`, `/metrics` readers, the
//! status page and `estafeta sources`, where patient data never goes.

/// What a class of error means and what to do next.
struct Class {
    what: &'static str,
    todo: &'static str,
    /// The database's message may quote a row's values: it is not shown.
    quotes_values: bool,
}

const fn class(what: &'static str, todo: &'static str) -> Class {
    Class {
        what,
        todo,
        quotes_values: false,
    }
}

const VALUES: Class = Class {
    what: "a value in the source's rows was refused",
    todo: "the database's message quotes it, so it is not shown; run the query by hand to see which, then cast or filter it in the query",
    quotes_values: true,
};

/// One line: `<db> <code> (<what>): <message>; <todo>`, the message left out when it may quote
/// a row's values.
fn line(db: &str, code: &str, class: Option<Class>, message: &str) -> String {
    let message = message.trim();
    match class {
        Some(c) if c.quotes_values => format!("{db} {code}: {}; {}", c.what, c.todo),
        Some(c) => format!("{db} {code} ({}): {message}; {}", c.what, c.todo),
        None => format!("{db} {code}: {message}"),
    }
}

/// A MySQL / MariaDB server error by its code.
pub fn mysql_words(code: u16, message: &str) -> String {
    let class = match code {
        1044 | 1045 | 1698 => Some(class(
            "access denied",
            "check the user and password in the source's url, and that this user may connect from this machine (GRANT … TO 'user'@'host')",
        )),
        1049 => Some(class(
            "unknown database",
            "check the database name in the source's url",
        )),
        1142 | 1143 => Some(class(
            "no permission on a table or column",
            "grant the source's user SELECT on the tables the query reads",
        )),
        1146 => Some(class(
            "table missing",
            "a table the query names does not exist in this database: check the query file and the database in the url",
        )),
        1054 => Some(class(
            "column missing",
            "a column the query names does not exist: check the query file against the table",
        )),
        1064 | 1149 => Some(class(
            "syntax error",
            "the query is not valid MySQL/MariaDB SQL (PostgreSQL's ::casts are not): fix the query file",
        )),
        1205 | 1213 => Some(class(
            "lock wait or deadlock",
            "another transaction held the rows; the cycle runs again by itself",
        )),
        1040 | 1203 | 1226 => Some(class(
            "too many connections",
            "the server is at its connection limit; the cycle runs again, or raise max_connections",
        )),
        1048 | 1062 | 1264 | 1292 | 1366 | 1367 | 1406 | 1411 | 1525 | 3140 => Some(VALUES),
        _ => None,
    };
    line("MySQL", &code.to_string(), class, message)
}

/// A MySQL error of the driver: the server's worded by code, the network's as unreachable
/// (the client's 2002 / 2003: no server answered at the url's host and port).
pub fn mysql_error(err: mysql_async::Error) -> anyhow::Error {
    match err {
        mysql_async::Error::Server(server) => {
            anyhow::anyhow!("{}", mysql_words(server.code, &server.message))
        }
        mysql_async::Error::Io(io) => anyhow::anyhow!(
            "MySQL 2003 (cannot reach the server): {io}; check the host and port in the source's url, that the server runs, and that a firewall lets this machine in"
        ),
        other => anyhow::Error::new(other),
    }
}

/// A SQLite error by its result code. SQLite gives one code (SQLITE_ERROR) to every mistake of
/// a statement (a missing table or column, a syntax error), so those keep SQLite's message,
/// which names the table or column and never a row's value.
pub fn sqlite_words(code: rusqlite::ErrorCode, message: &str) -> String {
    use rusqlite::ErrorCode as C;
    let (name, class) = match code {
        C::DatabaseBusy => (
            "SQLITE_BUSY",
            class(
                "locked by another program",
                "another connection holds a write lock; the cycle runs again by itself (if it lasts, look for a writer that never commits)",
            ),
        ),
        C::DatabaseLocked => (
            "SQLITE_LOCKED",
            class(
                "table locked",
                "a table is locked inside this connection's database; the cycle runs again by itself",
            ),
        ),
        C::CannotOpen => (
            "SQLITE_CANTOPEN",
            class(
                "cannot open the file",
                "check the path in the source's url and that estafeta's user may read the file and its folder",
            ),
        ),
        C::PermissionDenied | C::ReadOnly => (
            "SQLITE_PERM",
            class(
                "permission denied",
                "estafeta's user may not read (or, for after_stage, write) this database; fix the file's owner or mode",
            ),
        ),
        C::NotADatabase => (
            "SQLITE_NOTADB",
            class(
                "not a SQLite database",
                "the url names a file that is not a SQLite database: check the path",
            ),
        ),
        C::DatabaseCorrupt => (
            "SQLITE_CORRUPT",
            class(
                "the database file is damaged",
                "restore it from a backup or repair it (sqlite3 .recover); the source waits",
            ),
        ),
        C::ConstraintViolation | C::TypeMismatch | C::TooBig => ("SQLITE_CONSTRAINT", VALUES),
        C::Unknown => (
            "SQLITE_ERROR",
            class(
                "the statement was refused",
                "a table or column it names does not exist, or its SQL is not SQLite's: fix the query file (or the url's database)",
            ),
        ),
        _ => ("SQLITE", class("error", "see SQLite's message")),
    };
    line("SQLite", name, Some(class), message)
}

/// A rusqlite error: SQLite's worded by code, others as they are.
pub fn sqlite_error(err: rusqlite::Error) -> anyhow::Error {
    match err {
        rusqlite::Error::SqliteFailure(e, message) => anyhow::anyhow!(
            "{}",
            sqlite_words(e.code, message.as_deref().unwrap_or(&e.to_string()))
        ),
        other => anyhow::Error::new(other),
    }
}

/// An ODBC diagnostic by its SQLSTATE. The driver's own message is kept (the README quotes
/// unixODBC's and FreeTDS's words) unless the class may quote a row's values.
pub fn odbc_words(state: &str, message: &str) -> String {
    let class = match state {
        "08001" | "08S01" | "08004" | "HYT01" => Some(class(
            "no server answered",
            "check Server (host\\instance), Port and that the server accepts TCP connections from this machine",
        )),
        "28000" => Some(class(
            "login refused",
            "check UID and PWD (or the DSN's user) and that this login may use the database",
        )),
        "42S02" => Some(class(
            "table missing",
            "a table the query names does not exist (or is in another schema or database): check the query file and Database=",
        )),
        "42S22" => Some(class(
            "column missing",
            "a column the query names does not exist: check the query file against the table",
        )),
        "42000" => Some(class(
            "syntax error or access violation",
            "fix the query for this database's SQL, or grant its user SELECT on the tables",
        )),
        "IM002" => Some(class(
            "driver or DSN not found",
            "the Driver={…} name (or DSN) is not registered: list drivers with odbcinst -q -d and install the one named (SQL Server: apt install tdsodbc)",
        )),
        "IM003" | "01000" => Some(class(
            "driver cannot be loaded",
            "the driver's library named in odbcinst.ini is missing or cannot load: reinstall the driver or fix its Driver= path",
        )),
        "HYT00" => Some(class(
            "timeout",
            "the query took too long; the cycle runs again (add an index on the checkpoint column, or lower page_size)",
        )),
        s if s.starts_with("22") || s.starts_with("23") => Some(VALUES),
        _ => None,
    };
    line("ODBC", state, class, message)
}

/// An odbc-api error: a diagnostic worded by its SQLSTATE, others as they are.
pub fn odbc_error(err: odbc_api::Error) -> anyhow::Error {
    match err {
        odbc_api::Error::Diagnostics { record, .. } => {
            // Narrow (u8) or wide (u16, Windows) characters, as odbc-api was built.
            let message = odbc_api::handles::slice_to_cow_utf8(&record.message).into_owned();
            anyhow::anyhow!("{}", odbc_words(record.state.as_str(), &message))
        }
        other => anyhow::Error::new(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mysql_errors_say_their_class_and_what_to_do_and_never_a_value() {
        let w = mysql_words(1146, "Table 'test.exames' doesn't exist");
        assert_eq!(
            w,
            "MySQL 1146 (table missing): Table 'test.exames' doesn't exist; a table the query names does not exist in this database: check the query file and the database in the url"
        );
        assert!(
            mysql_words(1045, "Access denied for user 'leitor'@'h'")
                .contains("check the user and password")
        );
        assert!(mysql_words(1049, "Unknown database 'x'").contains("check the database name"));
        assert!(
            mysql_words(1064, "You have an error in your SQL syntax")
                .contains("fix the query file")
        );
        let w = mysql_words(
            1366,
            "Incorrect integer value: 'Maria Sigilosa' for column 'x'",
        );
        assert!(!w.contains("Maria"), "{w}");
        assert!(
            w.starts_with("MySQL 1366: a value in the source's rows was refused"),
            "{w}"
        );
        let w = mysql_words(1062, "Duplicate entry 'CPF-123' for key 'PRIMARY'");
        assert!(!w.contains("CPF-123"), "{w}");
        let io = mysql_error(mysql_async::Error::Io(mysql_async::IoError::Io(
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        )));
        assert!(
            io.to_string()
                .starts_with("MySQL 2003 (cannot reach the server)"),
            "{io}"
        );
    }

    #[test]
    fn sqlite_errors_say_their_class_and_what_to_do() {
        use rusqlite::ErrorCode as C;
        let w = sqlite_words(C::Unknown, "no such table: exames");
        assert!(
            w.starts_with(
                "SQLite SQLITE_ERROR (the statement was refused): no such table: exames; "
            ),
            "{w}"
        );
        assert!(
            sqlite_words(C::DatabaseBusy, "database is locked").contains("runs again by itself")
        );
        assert!(
            sqlite_words(C::CannotOpen, "unable to open database file").contains("check the path")
        );
        let w = sqlite_words(C::ConstraintViolation, "UNIQUE constraint failed: t.cpf");
        assert!(!w.contains("t.cpf") && w.contains("not shown"), "{w}");
        // Through rusqlite, as a cycle meets it.
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let err = sqlite_error(conn.prepare("SELECT * FROM falta").unwrap_err());
        assert!(err.to_string().contains("no such table: falta"), "{err}");
        assert!(err.to_string().contains("fix the query file"), "{err}");
    }

    #[test]
    fn odbc_errors_keep_the_drivers_words_and_add_what_to_do() {
        let w = odbc_words(
            "08001",
            "[FreeTDS][SQL Server]Unable to connect: Adaptive Server is unavailable or does not exist",
        );
        assert!(w.contains("[FreeTDS][SQL Server]Unable to connect"), "{w}");
        assert!(w.contains("check Server (host\\instance), Port"), "{w}");
        assert!(odbc_words("28000", "Login failed for user 'x'").contains("check UID and PWD"));
        assert!(odbc_words("42S02", "Invalid object name 'exames'").contains("table missing"));
        assert!(
            odbc_words(
                "IM002",
                "[unixODBC][Driver Manager]Data source name not found"
            )
            .contains("odbcinst -q -d")
        );
        let w = odbc_words("22018", "Conversion failed when converting 'Maria' to int");
        assert!(!w.contains("Maria"), "{w}");
        assert_eq!(odbc_words("HY000", "general"), "ODBC HY000: general");
    }
}
