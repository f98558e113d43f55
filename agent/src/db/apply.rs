//! Apply mode for database sinks: besides its landing-table row, a record is applied to the
//! real tables by one SQL statement file per (entity, action), with named parameters bound from
//! the payload.
//!
//! ```text
//! apply_dir/                       the sink's `apply_dir` (TOML), read once at start
//!   usuario.upsert.sql             <entity>.<action>.sql: one statement, run for every
//!   usuario.deactivate.sql         record of that entity and action
//!   README.md                      files not ending in .sql are ignored
//!
//! INSERT INTO invenzi_usuario (matricula, nome, setor)
//! VALUES (:matricula, :nome, :lotacao.setor)     :name = payload field, :a.b = nested field
//! ```
//!
//! - **Parameters, never text.** [`parse`] turns `:name` into the dialect's positional
//!   placeholders (`$1`, `$2`, … for PostgreSQL, reused when a name repeats; `?` for MariaDB /
//!   MySQL and SQLite) and the values are bound by the driver. `:name` inside string literals,
//!   quoted identifiers, comments and PostgreSQL dollar quotes is left alone, as are `::` (the
//!   PostgreSQL cast) and `:=`. Positional placeholders written in the file (`?`, `$1`) and
//!   `:` followed by a digit or a quote are errors, so a statement never mixes both kinds.
//! - **Types.** JSON strings bind as text, integers as integers, other numbers as their exact
//!   JSON spelling (text that the database converts, so decimals are not rounded through a
//!   float), booleans as `true` / `false` (1 / 0 on MariaDB and SQLite), `null` as NULL, objects
//!   and arrays as their JSON text. PostgreSQL receives every parameter as `text`: cast where the
//!   column is not text (`:ativo::boolean`, `:nascimento::date`, `:dados::jsonb`).
//! - **A missing field** makes the record dead for this sink, with a reason naming the field and
//!   the file; a field present as `null` binds NULL.
//! - **Coverage.** An entity with no statement file is only landed. An entity with at least one
//!   file must have one for every action it receives: a record of another action is dead,
//!   saying which file to add, rather than silently landed without being applied.
//! - **Exactly once.** The sinks run the statement in the same transaction as the record's
//!   landing-table insert, and only when that insert added a row: the landing table's unique
//!   idempotency key is the marker, so a replayed record is never applied twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::value::RawValue;

use super::Dialect;

/// The statement files of one sink, by (entity, action).
#[derive(Debug)]
pub struct ApplyStatements {
    /// The folder they were read from.
    pub dir: PathBuf,
    by_name: BTreeMap<(String, String), Arc<Statement>>,
}

/// What a record's (entity, action) gets in apply mode.
#[derive(Debug)]
pub enum Lookup<'a> {
    /// No statement file for this entity: the record is only landed.
    NotApplied,
    /// This statement applies the record.
    Statement(&'a Arc<Statement>),
    /// The entity has statement files, but not for this action: the record is dead.
    Missing(String),
}

impl ApplyStatements {
    /// Reads and parses every `<entity>.<action>.sql` file of `dir`. Every problem found is
    /// returned, each naming its file.
    pub fn load(dir: &Path, dialect: Dialect) -> Result<Self, Vec<String>> {
        let entries = std::fs::read_dir(dir).map_err(|err| {
            vec![format!(
                "expected a readable folder of <entity>.<action>.sql statement files: {err}"
            )]
        })?;
        let mut paths = Vec::new();
        let mut problems = Vec::new();
        for entry in entries {
            match entry {
                Ok(entry) => paths.push(entry.path()),
                Err(err) => problems.push(format!("cannot list the folder: {err}")),
            }
        }
        paths.sort();
        let mut by_name = BTreeMap::new();
        for path in paths {
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(stem) = file_name.strip_suffix(".sql") else {
                continue;
            };
            match Statement::load(&path, stem, dialect) {
                Ok(statement) => {
                    by_name.insert(
                        (statement.entity.clone(), statement.action.clone()),
                        Arc::new(statement),
                    );
                }
                Err(problem) => problems.push(problem),
            }
        }
        if by_name.is_empty() && problems.is_empty() {
            problems.push(
                "the folder holds no <entity>.<action>.sql statement file, such as usuario.upsert.sql"
                    .to_owned(),
            );
        }
        if problems.is_empty() {
            Ok(Self {
                dir: dir.to_path_buf(),
                by_name,
            })
        } else {
            Err(problems)
        }
    }

    /// The statement for a record of `entity` and `action`.
    pub fn lookup(&self, entity: &str, action: &str) -> Lookup<'_> {
        if let Some(statement) = self.by_name.get(&(entity.to_owned(), action.to_owned())) {
            return Lookup::Statement(statement);
        }
        if self.by_name.keys().any(|(e, _)| e == entity) {
            let file = self.dir.join(format!("{entity}.{action}.sql"));
            return Lookup::Missing(format!(
                "apply mode has statement files for entity {entity:?} but none for action \
                 {action:?}: add {} (and restart the agent), then requeue this record with \
                 estafeta retry --send",
                file.display()
            ));
        }
        Lookup::NotApplied
    }

    /// Every statement, in file name order.
    pub fn statements(&self) -> impl Iterator<Item = &Arc<Statement>> {
        self.by_name.values()
    }
}

/// One statement file, parsed.
#[derive(Debug)]
pub struct Statement {
    /// The file it came from, for messages.
    pub file: PathBuf,
    pub entity: String,
    pub action: String,
    /// The statement with positional placeholders, ready for the driver.
    pub sql: String,
    /// The payload field of each positional parameter, in order (`$1`, `$2`, … for
    /// PostgreSQL; each `?` for the others).
    pub params: Vec<FieldPath>,
}

/// A payload field a parameter names: `cpf`, or `lotacao.setor` for a nested one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    /// As written after the `:`.
    pub name: String,
}

impl FieldPath {
    fn segments(&self) -> impl Iterator<Item = &str> {
        self.name.split('.')
    }
}

/// A value bound to a parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum Bound {
    Null,
    Bool(bool),
    Int(i64),
    /// A number that is not an `i64`, spelled exactly as in the payload.
    Number(String),
    Text(String),
    /// An object or array, as JSON text.
    Json(String),
}

impl Bound {
    /// The value as PostgreSQL text (every parameter is declared `text`), `None` for NULL.
    pub fn as_pg_text(&self) -> Option<String> {
        match self {
            Bound::Null => None,
            Bound::Bool(b) => Some(b.to_string()),
            Bound::Int(n) => Some(n.to_string()),
            Bound::Number(text) | Bound::Text(text) | Bound::Json(text) => Some(text.clone()),
        }
    }
}

impl Statement {
    /// Reads `path` (named `<stem>.sql`) and parses it for `dialect`.
    fn load(path: &Path, stem: &str, dialect: Dialect) -> Result<Self, String> {
        let shown = path.display();
        let (entity, action) = stem
            .split_once('.')
            .filter(|(e, a)| {
                !a.contains('.')
                    && estafeta_staging::validate_name("entity", e).is_ok()
                    && estafeta_staging::validate_name("action", a).is_ok()
            })
            .ok_or_else(|| {
                format!(
                    "{shown}: expected a file named <entity>.<action>.sql, each name 1 to 64 \
                     characters from a-z, 0-9, '_' and '-', such as usuario.upsert.sql; rename it \
                     or move it out of the folder"
                )
            })?;
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("{shown}: cannot read the statement file: {err}"))?;
        let (sql, params) = parse(&text, dialect).map_err(|err| format!("{shown}:{err}"))?;
        Ok(Self {
            file: path.to_path_buf(),
            entity: entity.to_owned(),
            action: action.to_owned(),
            sql,
            params,
        })
    }

    /// The values of the parameters, in order, from `payload`; `Err` says which field is
    /// missing and where the statement needs it (the record's dead-letter reason).
    pub fn bind(&self, payload: &RawValue) -> Result<Vec<Bound>, String> {
        let top: BTreeMap<String, &RawValue> =
            serde_json::from_str(payload.get()).map_err(|_| {
                format!(
                    "the payload is not a JSON object, so {} cannot take its fields",
                    self.file.display()
                )
            })?;
        let mut values = Vec::with_capacity(self.params.len());
        for param in &self.params {
            values.push(self.field(&top, param)?);
        }
        Ok(values)
    }

    fn field(&self, top: &BTreeMap<String, &RawValue>, param: &FieldPath) -> Result<Bound, String> {
        let missing = |why: String| {
            format!(
                "{why}; {} needs it as :{}: send the record again with the field (null is \
                 allowed), or change the statement",
                self.file.display(),
                param.name
            )
        };
        let mut segments = param.segments();
        let first = segments.next().unwrap_or_default();
        let mut value: &RawValue = top
            .get(first)
            .copied()
            .ok_or_else(|| missing(format!("payload field {first:?} is missing")))?;
        let mut at = first.to_owned();
        for segment in segments {
            let object: BTreeMap<String, &RawValue> = serde_json::from_str(value.get())
                .map_err(|_| missing(format!("payload field {at:?} is not an object")))?;
            at = format!("{at}.{segment}");
            value = object
                .get(segment)
                .copied()
                .ok_or_else(|| missing(format!("payload field {at:?} is missing")))?;
        }
        Ok(to_bound(value))
    }
}

fn to_bound(value: &RawValue) -> Bound {
    let text = value.get().trim();
    match text.as_bytes().first() {
        Some(b'"') => serde_json::from_str(text)
            .map(Bound::Text)
            .unwrap_or_else(|_| Bound::Text(text.to_owned())),
        Some(b'n') => Bound::Null,
        Some(b't') => Bound::Bool(true),
        Some(b'f') => Bound::Bool(false),
        Some(b'{' | b'[') => Bound::Json(text.to_owned()),
        _ => match text.parse::<i64>() {
            Ok(n) => Bound::Int(n),
            Err(_) => Bound::Number(text.to_owned()),
        },
    }
}

/// Where a statement file is wrong: ` line L, column C: what, and what to do` (the caller puts
/// the file name in front).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// Turns the named parameters of one SQL statement into `dialect`'s positional placeholders.
/// Returns the statement (without a trailing `;`) and the field of each placeholder.
pub fn parse(text: &str, dialect: Dialect) -> Result<(String, Vec<FieldPath>), SyntaxError> {
    let bytes = text.as_bytes();
    let error = |at: usize, message: String| {
        let before = &text[..at];
        let line = before.matches('\n').count() + 1;
        let column = before.rfind('\n').map_or(at, |nl| at - nl - 1) + 1;
        SyntaxError {
            line,
            column,
            message,
        }
    };
    let mysql = dialect == Dialect::Mysql;
    let postgres = dialect == Dialect::Postgres;
    let sqlite = dialect == Dialect::Sqlite;

    let mut out = String::with_capacity(text.len());
    let mut params: Vec<FieldPath> = Vec::new();
    // Copied to `out` up to here.
    let mut copied = 0;
    // Where a `;` ended the statement; only blanks and comments may follow.
    let mut ended: Option<usize> = None;
    let mut has_sql = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let next = bytes.get(i + 1).copied();
        let prev = i.checked_sub(1).map(|p| bytes[p]);
        let start = i;
        // Comments.
        if (b == b'-' && next == Some(b'-')) || (mysql && b == b'#') {
            i = text[i..].find('\n').map_or(bytes.len(), |n| i + n + 1);
            continue;
        }
        if b == b'/' && next == Some(b'*') {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                if j + 1 >= bytes.len() {
                    return Err(error(
                        start,
                        "a /* comment is never closed; close it with */".to_owned(),
                    ));
                }
                if bytes[j] == b'/' && bytes[j + 1] == b'*' {
                    depth += 1;
                    j += 2;
                    // Only PostgreSQL nests block comments.
                    if !postgres && depth > 1 {
                        depth = 1;
                    }
                } else if bytes[j] == b'*' && bytes[j + 1] == b'/' {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            i = j;
            continue;
        }
        if b.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if let Some(end) = ended {
            return Err(error(
                start,
                format!(
                    "a second statement follows the ';' at {}; put one statement per file",
                    error(end, String::new()).to_string().trim_end_matches(": ")
                ),
            ));
        }
        has_sql = true;
        match b {
            b';' => {
                out.push_str(&text[copied..i]);
                copied = i + 1;
                ended = Some(i);
                i += 1;
            }
            b'\'' | b'"' | b'`' | b'[' if b != b'`' || !postgres => {
                if b == b'[' && !sqlite {
                    i += 1;
                    continue;
                }
                let close = if b == b'[' { b']' } else { b };
                // Backslash escapes: MariaDB / MySQL strings (its default sql_mode), and
                // PostgreSQL E'…' strings.
                let backslash = match b {
                    b'\'' | b'"' if mysql => true,
                    b'\'' if postgres => {
                        matches!(prev, Some(b'e' | b'E'))
                            && !i.checked_sub(2).is_some_and(|p| is_ident(bytes[p]))
                    }
                    _ => false,
                };
                let mut j = i + 1;
                loop {
                    let Some(&c) = bytes.get(j) else {
                        let what = match b {
                            b'\'' => "a string literal",
                            b'[' => "a [quoted identifier]",
                            _ if mysql && b == b'"' => "a string literal",
                            _ => "a quoted identifier",
                        };
                        return Err(error(
                            start,
                            format!(
                                "{what} opened here is never closed; close it with {}",
                                close as char
                            ),
                        ));
                    };
                    let escaped = backslash && c == b'\\';
                    let doubled = c == close && bytes.get(j + 1) == Some(&close) && close != b']';
                    if escaped || doubled {
                        j += 2;
                    } else if c == close {
                        j += 1;
                        break;
                    } else {
                        j += 1;
                    }
                }
                i = j;
            }
            b'$' if postgres && !prev.is_some_and(is_ident) => {
                if next.is_some_and(|c| c.is_ascii_digit()) {
                    return Err(error(
                        start,
                        "a positional parameter ($1) in a statement file; name the payload \
                         field instead, such as :nome"
                            .to_owned(),
                    ));
                }
                // A dollar quote: $$…$$ or $tag$…$tag$.
                let tag_end = text[i + 1..].find('$').map(|n| i + 1 + n).filter(|&end| {
                    let tag = &bytes[i + 1..end];
                    tag.is_empty()
                        || is_ident_start(tag[0])
                            && tag.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_')
                });
                match tag_end {
                    Some(end) => {
                        let tag = &text[i..=end];
                        match text[end + 1..].find(tag) {
                            Some(n) => i = end + 1 + n + tag.len(),
                            None => {
                                return Err(error(
                                    start,
                                    format!(
                                        "the dollar quote {tag} is never closed; close it with {tag}"
                                    ),
                                ));
                            }
                        }
                    }
                    None => i += 1,
                }
            }
            b'$' | b'@' if sqlite && next.is_some_and(is_ident_start) => {
                return Err(error(
                    start,
                    format!(
                        "{}name is SQLite's own parameter syntax; write the payload field as :name",
                        b as char
                    ),
                ));
            }
            b'?' if !postgres => {
                return Err(error(
                    start,
                    "a positional placeholder (?) in a statement file; name the payload field \
                     instead, such as :nome"
                        .to_owned(),
                ));
            }
            b':' => match next {
                Some(b':' | b'=') => i += 2,
                Some(c) if is_ident_start(c) && prev != Some(b':') => {
                    let mut j = i + 1;
                    loop {
                        while bytes
                            .get(j)
                            .is_some_and(|&c| c.is_ascii_alphanumeric() || c == b'_')
                        {
                            j += 1;
                        }
                        if bytes.get(j) == Some(&b'.')
                            && bytes.get(j + 1).is_some_and(|&c| is_ident_start(c))
                        {
                            j += 1;
                        } else {
                            break;
                        }
                    }
                    let name = &text[i + 1..j];
                    out.push_str(&text[copied..i]);
                    if postgres {
                        let n = match params.iter().position(|p| p.name == name) {
                            Some(n) => n,
                            None => {
                                params.push(FieldPath {
                                    name: name.to_owned(),
                                });
                                params.len() - 1
                            }
                        };
                        out.push_str(&format!("${}", n + 1));
                    } else {
                        params.push(FieldPath {
                            name: name.to_owned(),
                        });
                        out.push('?');
                    }
                    copied = j;
                    i = j;
                }
                Some(c) if c.is_ascii_digit() || matches!(c, b'"' | b'\'' | b'`' | b'{' | b'[') => {
                    return Err(error(
                        start,
                        format!(
                            "unknown parameter syntax {:?}; a parameter is ':' and a payload \
                             field name (letters, digits and '_', starting with a letter or '_'; \
                             dots for nested fields), such as :nome or :lotacao.setor",
                            &text[i..(i + 2).min(text.len())]
                        ),
                    ));
                }
                _ => i += 1,
            },
            _ => i += 1,
        }
    }
    if !has_sql {
        return Err(error(
            0,
            "the file holds no SQL statement; write one statement, such as an INSERT … ON CONFLICT"
                .to_owned(),
        ));
    }
    if ended.is_none() {
        out.push_str(&text[copied..]);
    }
    Ok((out.trim().to_owned(), params))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(sql: &str) -> (String, Vec<String>) {
        let (sql, params) = parse(sql, Dialect::Postgres).expect("parses");
        (sql, params.into_iter().map(|p| p.name).collect())
    }

    fn my(sql: &str) -> (String, Vec<String>) {
        let (sql, params) = parse(sql, Dialect::Mysql).expect("parses");
        (sql, params.into_iter().map(|p| p.name).collect())
    }

    fn err(sql: &str, dialect: Dialect) -> String {
        parse(sql, dialect).expect_err("refused").to_string()
    }

    #[test]
    fn named_parameters_become_numbered_placeholders_in_postgres() {
        let (sql, params) = pg("INSERT INTO t (a, b, c) VALUES (:nome, :cpf::bigint, :nome);\n");
        assert_eq!(sql, "INSERT INTO t (a, b, c) VALUES ($1, $2::bigint, $1)");
        assert_eq!(params, ["nome", "cpf"]);
    }

    #[test]
    fn named_parameters_become_question_marks_in_mysql_and_sqlite() {
        let (sql, params) =
            my("UPDATE t SET a = :nome, b = :lotacao.setor WHERE id = :id AND x = :nome");
        assert_eq!(sql, "UPDATE t SET a = ?, b = ? WHERE id = ? AND x = ?");
        assert_eq!(params, ["nome", "lotacao.setor", "id", "nome"]);
        let (sql, _) = parse("SELECT :a", Dialect::Sqlite).expect("parses");
        assert_eq!(sql, "SELECT ?");
    }

    #[test]
    fn casts_and_assignments_are_not_parameters() {
        let (sql, params) = pg("SELECT :a::text, now()::date, x::jsonb, ARRAY[1]::int[]");
        assert_eq!(
            sql,
            "SELECT $1::text, now()::date, x::jsonb, ARRAY[1]::int[]"
        );
        assert_eq!(params, ["a"]);
        let (sql, params) = my("SET @n := :n");
        assert_eq!(sql, "SET @n := ?");
        assert_eq!(params, ["n"]);
    }

    #[test]
    fn strings_identifiers_and_comments_keep_their_colons() {
        let text = "SELECT ':no', 'it''s :no', \"col:no\", E'\\' :no', $$ :no $$, $t$ :no $t$ -- :no\n\
                    /* :no /* nested :no */ :no */ :yes";
        let (sql, params) = pg(text);
        assert_eq!(params, ["yes"]);
        assert!(sql.ends_with("$1"), "{sql}");
        assert!(sql.contains("'it''s :no'"), "{sql}");

        let (_, params) = my("SELECT 'a\\' :no', \"x :no\", `c:no` # :no\n, :yes -- :no");
        assert_eq!(params, ["yes"]);
        let (_, params) =
            parse("SELECT [c:no], 'x''s :no', :yes", Dialect::Sqlite).expect("parses");
        assert_eq!(params.len(), 1);
    }

    #[test]
    fn a_standard_postgres_string_has_no_backslash_escapes() {
        // 'a\' is a whole string in PostgreSQL; :yes follows it.
        let (_, params) = pg("SELECT 'a\\', :yes");
        assert_eq!(params, ["yes"]);
    }

    #[test]
    fn question_marks_stay_jsonb_operators_in_postgres() {
        let (sql, params) = pg("SELECT :d::jsonb ? 'k'");
        assert_eq!(sql, "SELECT $1::jsonb ? 'k'");
        assert_eq!(params, ["d"]);
    }

    #[test]
    fn positional_and_unknown_syntax_is_refused_with_its_place() {
        assert!(err("SELECT ?", Dialect::Mysql).starts_with("1:8: a positional placeholder"));
        assert!(err("SELECT\n  $1", Dialect::Postgres).starts_with("2:3: a positional parameter"));
        assert!(err("SELECT :1", Dialect::Postgres).contains("unknown parameter syntax \":1\""));
        assert!(err("SELECT :\"nome\"", Dialect::Mysql).contains("unknown parameter syntax"));
        assert!(err("SELECT @nome", Dialect::Sqlite).contains("SQLite's own parameter syntax"));
        assert!(err("SELECT 'open", Dialect::Postgres).contains("never closed"));
        assert!(err("SELECT 1 /* open", Dialect::Mysql).contains("never closed"));
        assert!(err("SELECT 1; SELECT 2", Dialect::Postgres).contains("one statement per file"));
        assert!(err("-- nothing\n", Dialect::Postgres).contains("no SQL statement"));
    }

    #[test]
    fn a_trailing_semicolon_and_comment_are_fine() {
        let (sql, _) = pg("SELECT :a; -- done\n");
        assert_eq!(sql, "SELECT $1");
    }

    fn statement(sql: &str) -> Statement {
        let (sql, params) = parse(sql, Dialect::Mysql).expect("parses");
        Statement {
            file: PathBuf::from("apply/usuario.upsert.sql"),
            entity: "usuario".into(),
            action: "upsert".into(),
            sql,
            params,
        }
    }

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).expect("valid JSON")
    }

    #[test]
    fn payload_fields_bind_with_their_json_types() {
        let s = statement("SELECT :s, :i, :d, :b, :n, :o, :l.setor");
        let values = s
            .bind(&raw(
                r#"{"s":"Jo\u00e3o","i":42,"d":12345678901234567890.10,"b":true,"n":null,"o":{"x":[1]},"l":{"setor":"UTI"}}"#,
            ))
            .expect("binds");
        assert_eq!(
            values,
            [
                Bound::Text("João".into()),
                Bound::Int(42),
                Bound::Number("12345678901234567890.10".into()),
                Bound::Bool(true),
                Bound::Null,
                Bound::Json(r#"{"x":[1]}"#.into()),
                Bound::Text("UTI".into()),
            ]
        );
    }

    #[test]
    fn a_missing_field_names_the_field_and_the_file() {
        let s = statement("SELECT :nome, :cpf");
        let reason = s
            .bind(&raw(r#"{"nome":"Ana"}"#))
            .expect_err("cpf is missing");
        assert!(reason.contains("\"cpf\" is missing"), "{reason}");
        assert!(reason.contains("usuario.upsert.sql"), "{reason}");
        let s = statement("SELECT :lotacao.setor");
        let reason = s
            .bind(&raw(r#"{"lotacao":"UTI"}"#))
            .expect_err("not an object");
        assert!(reason.contains("\"lotacao\" is not an object"), "{reason}");
    }

    #[test]
    fn a_folder_is_loaded_and_checked_file_by_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("usuario.upsert.sql"), "SELECT :a").expect("write");
        std::fs::write(dir.path().join("README.md"), "ignored").expect("write");
        let set = ApplyStatements::load(dir.path(), Dialect::Postgres).expect("loads");
        assert!(matches!(
            set.lookup("usuario", "upsert"),
            Lookup::Statement(_)
        ));
        assert!(
            matches!(set.lookup("usuario", "update"), Lookup::Missing(m) if m.contains("usuario.update.sql"))
        );
        assert!(matches!(set.lookup("exame", "create"), Lookup::NotApplied));

        std::fs::write(dir.path().join("bad name.sql"), "SELECT 1").expect("write");
        std::fs::write(
            dir.path().join("usuario.delete.sql"),
            "DELETE FROM t WHERE id = ?",
        )
        .expect("write");
        let problems = ApplyStatements::load(dir.path(), Dialect::Mysql).expect_err("refused");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("bad name.sql") && problems[0].contains("<entity>.<action>.sql")
        );
        assert!(
            problems[1].contains("usuario.delete.sql:1:26: a positional placeholder"),
            "{problems:?}"
        );

        let missing =
            ApplyStatements::load(&dir.path().join("nope"), Dialect::Mysql).expect_err("missing");
        assert!(
            missing[0].contains("expected a readable folder"),
            "{missing:?}"
        );
    }
}
