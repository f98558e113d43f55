//! Reading `.env`: python-dotenv's reading of unquoted values (spaces, Windows backslashes)
//! over dotenvy, and `${VAR}` expansion for the TOML file's strings. The process environment
//! is read by the caller, never changed.

use std::collections::BTreeMap;
use std::path::Path;

use super::raw::Loader;

impl Loader {
    /// Reads `.env` without touching the process environment.
    pub(super) fn read_env_file(&mut self, env_file: Option<&Path>) -> BTreeMap<String, String> {
        let (path, explicit) = match env_file {
            Some(path) => (self.cwd.join(path), true),
            None => (self.cwd.join(".env"), false),
        };
        let mut values = BTreeMap::new();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && !explicit => return values,
            Err(err) => {
                self.problem(
                    "--env-file",
                    Some(path.display().to_string()),
                    format!("expected a readable .env file: {err}"),
                );
                return values;
            }
        };
        self.sources.push(format!(".env {}", path.display()));
        let text = quote_unquoted_spaces(&text);
        for item in dotenvy::from_read_iter(std::io::Cursor::new(text.into_bytes())) {
            match item {
                Ok((key, value)) => {
                    values.insert(key, value);
                }
                // The line may hold a secret: say only that it is wrong.
                Err(dotenvy::Error::LineParse(_, index)) => self.problem(
                    format!(".env {}", path.display()),
                    None,
                    format!(
                        "a line could not be read (near character {index}); expected KEY=value, with quotes closed on the line where they open"
                    ),
                ),
                Err(err) => {
                    self.problem(
                        format!(".env {}", path.display()),
                        None,
                        format!("could not be read: {}", io_reason(&err)),
                    );
                    break;
                }
            }
        }
        values
    }
}

/// `.env` text with every unquoted value that holds spaces (`CRONTAB=*/5 * * * * # note`) or
/// backslashes (`FAILED_DIR=C:\Estafeta\failed`, a Windows path) single-quoted, comment
/// dropped, as python-dotenv (the seeds' reader) reads it: literally. dotenvy refuses the first
/// and reads `\` in the second as an escape. Lines inside a multi-line quoted value are left
/// alone.
pub(super) fn quote_unquoted_spaces(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut open: Option<char> = None;
    for line in text.split_inclusive('\n') {
        let (body, newline) = match line.strip_suffix('\n') {
            Some(body) => (body, "\n"),
            None => (line, ""),
        };
        if let Some(quote) = open {
            if !count_quotes(body, quote).is_multiple_of(2) {
                open = None;
            }
            out.push_str(line);
            continue;
        }
        let trimmed = body.trim_start();
        let rest = trimmed.strip_prefix("export ").unwrap_or(trimmed);
        let Some((key, value)) = rest.split_once('=') else {
            out.push_str(line);
            continue;
        };
        let value = value.trim();
        match value.chars().next() {
            Some(quote @ ('"' | '\'')) => {
                if count_quotes(&value[1..], quote).is_multiple_of(2) {
                    open = Some(quote);
                }
                out.push_str(line);
            }
            _ => {
                let value = match value.find(" #") {
                    Some(comment) => value[..comment].trim_end(),
                    None => value,
                };
                if is_env_name(key.trim())
                    && (value.contains(char::is_whitespace) || value.contains('\\'))
                    && !value.contains('\'')
                    && !trimmed.starts_with('#')
                {
                    out.push_str(&format!("{}='{value}'{newline}", key.trim()));
                } else {
                    out.push_str(line);
                }
            }
        }
    }
    out
}

/// Quote characters in `text` that are not escaped with a backslash.
pub(super) fn count_quotes(text: &str, quote: char) -> usize {
    let mut count = 0;
    let mut escaped = false;
    for c in text.chars() {
        if escaped {
            escaped = false;
        } else if c == '\\' && quote == '"' {
            escaped = true;
        } else if c == quote {
            count += 1;
        }
    }
    count
}

pub(super) fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// `${VAR}` replaced by VAR's value; an unset VAR is an error naming it.
pub(super) fn expand(text: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("expected ${NAME} with a closing brace".into());
        };
        let name = &after[..end];
        let valid = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!(
                "expected ${{NAME}} with NAME made of A-Z, 0-9 and '_', found ${{{name}}}"
            ));
        }
        match vars.get(name) {
            Some(value) => out.push_str(value),
            None => {
                return Err(format!(
                    "environment variable {name} is not set; set it in .env or the environment, or remove ${{{name}}}"
                ));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

pub(super) fn io_reason(err: &dotenvy::Error) -> String {
    match err {
        dotenvy::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expand_reads_variables_and_names_the_missing_one() {
        let vars = BTreeMap::from([("A".to_string(), "x".to_string())]);
        assert_eq!(expand("pre-${A}-post", &vars), Ok("pre-x-post".to_string()));
        let err = expand("${MISSING}", &vars).expect_err("unset variable");
        assert!(err.contains("MISSING"), "{err}");
        assert!(expand("${A", &vars).is_err());
    }

    #[test]
    fn unquoted_values_with_spaces_are_read_like_python_dotenv() {
        let text = "CRONTAB=*/5 * * * * # every five minutes\nexport TZ= UTC\nA=\"multi\nB=not a key\"\nC=plain\n# D=a b\n";
        assert_eq!(
            quote_unquoted_spaces(text),
            "CRONTAB='*/5 * * * *'\nexport TZ= UTC\nA=\"multi\nB=not a key\"\nC=plain\n# D=a b\n"
        );
        let parsed: BTreeMap<String, String> = dotenvy::from_read_iter(std::io::Cursor::new(
            quote_unquoted_spaces(text).into_bytes(),
        ))
        .collect::<Result<_, _>>()
        .expect("the quoted text parses");
        assert_eq!(parsed["CRONTAB"], "*/5 * * * *");
        assert_eq!(parsed["A"], "multi\nB=not a key");
        assert_eq!(parsed["TZ"], "UTC");
    }
}
