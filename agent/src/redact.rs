//! Redaction: the one place that decides what of a URL, a connection string or an error
//! message may leave the process. Everything that goes out — a log line, an error message,
//! `_update/state.json`, `GET /v1/status`, a heartbeat, `check-config` — and may hold a URL or a
//! connection string goes through [`url`] (a value known to be one), [`text`] (free text that
//! may quote one, such as a driver's or an HTTP client's error) or [`Secrets::scrub`] (free
//! text, plus the exact secrets of the configuration it came from).
//!
//! What is replaced by `***`:
//! - the password of a URL's user info: `postgres://u:***@h/db`. In a NATS URL (`nats://`,
//!   `tls://`) a user without a password is a token and is hidden whole: `nats://***@h`. The
//!   user info ends at the last `@` before the query, so an unencoded `@` or `/` in a password
//!   leaves nothing of it behind;
//! - the value of every parameter with a [secret name](is_secret_name): in a query string or
//!   fragment (`?token=***&tenant=3`), in a libpq string (`host=h password=***`, quoted values
//!   `'a b'` included), in an ODBC / ADO string (`odbc:Driver={…};UID=u;PWD=***;`, where a
//!   value in braces may hold `;` and `}}` is an escaped `}`);
//! - in free text, the user-info password of every URL in it and every `name=value` with a
//!   secret name;
//! - with [`Secrets`], every secret of a configured URL or token wherever it appears, as
//!   written and percent-decoded: a last guard for messages that are not ours to trust.
//!
//! It errs on the side of hiding: text that merely looks like a secret is hidden too.
//! Patient data (payloads, record keys, a server's answer) is a different matter: it is kept
//! out of logs, status and heartbeats by never putting it there (see
//! [`crate::sinks::Refusal`]), not by redaction.

/// What a hidden value is replaced by.
pub const MASK: &str = "***";

/// Name parts that make a parameter secret (the name lower-cased, without `_`, `-` and `.`).
const SECRET_NAME_PARTS: &[&str] = &[
    "password",
    "passwd",
    "passphrase",
    "token",
    "secret",
    "key",
    "signature",
    "credential",
];

/// Whole names that are secret (lower-cased, without `_`, `-` and `.`).
const SECRET_NAMES: &[&str] = &["pwd", "pw", "pass", "sig", "auth"];

/// Where an unquoted value ends in a URL's query or fragment.
const URL_VALUE_END: &[char] = &['&', '#', ';', ' ', '\t', '\r', '\n'];
/// Where an unquoted value ends in a libpq `key=value` string.
const LIBPQ_VALUE_END: &[char] = &[' ', '\t', '\r', '\n'];
/// Where an unquoted value ends in free text.
const TEXT_VALUE_END: &[char] = &[
    '&', '#', ';', ',', ' ', '\t', '\r', '\n', '"', '\'', '`', '<', '>', ')', ']', '}',
];
/// Where a URL ends in free text.
const TEXT_URL_END: &[char] = &[' ', '\t', '\r', '\n', '"', '\'', '`', '<', '>'];

/// Whether a parameter named `name` holds a secret: `pwd`, `pw`, `pass`, `sig` or `auth`, or a
/// name containing `password`, `passwd`, `passphrase`, `token`, `secret`, `key`, `signature` or
/// `credential` (`access_token`, `api-key`, `X-Amz-Signature`, `sslpassword`, `client_secret`),
/// compared without case, `_`, `-` and `.`.
pub fn is_secret_name(name: &str) -> bool {
    let name: String = name
        .trim()
        .chars()
        .filter(|c| !matches!(c, '_' | '-' | '.'))
        .flat_map(char::to_lowercase)
        .collect();
    !name.is_empty()
        && (SECRET_NAMES.contains(&name.as_str())
            || SECRET_NAME_PARTS.iter().any(|part| name.contains(part)))
}

/// A URL or connection string as it may be shown: `postgres://user:pw@host/db?password=x` →
/// `postgres://user:***@host/db?password=***`; `host=db password='a b'` → `host=db
/// password=***`; `odbc:Driver={X};PWD={a;b}}c};` → `odbc:Driver={X};PWD=***;`.
pub fn url(input: &str) -> String {
    redact_url(input, &mut |_| {})
}

/// Free text (an error message, a driver's answer) with every URL password and every secret
/// `name=value` hidden; see the module documentation.
pub fn text(input: &str) -> String {
    pairs(
        &userinfo(input, TEXT_URL_END, &mut |_| {}),
        TEXT_VALUE_END,
        &mut |_| {},
    )
}

/// The secrets of one configuration (URL passwords, secret parameters, tokens), to hide from
/// messages wherever they appear, even outside a URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secrets(Vec<String>);

impl Secrets {
    /// The secrets in a URL or connection string, as written and percent-decoded (and, for
    /// a value in ODBC braces, with and without them).
    pub fn of(input: &str) -> Secrets {
        let mut secrets = Secrets::default();
        redact_url(input, &mut |secret| secrets.add(secret));
        secrets
    }

    /// Adds one secret (a token), ignoring an empty one.
    pub fn add(&mut self, secret: &str) {
        for candidate in [secret.to_owned(), percent_decode(secret)] {
            if !candidate.is_empty() && !self.0.contains(&candidate) {
                self.0.push(candidate);
            }
        }
        // Longest first, so that a secret containing another is hidden whole.
        self.0.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }

    /// With `secret` added, if there is one.
    pub fn with(mut self, secret: Option<&str>) -> Secrets {
        if let Some(secret) = secret {
            self.add(secret);
        }
        self
    }

    /// With every secret of `other` added.
    pub fn and(mut self, other: &Secrets) -> Secrets {
        for secret in &other.0 {
            self.add(secret);
        }
        self
    }

    /// `message` with every known secret replaced by `***`, then passed through [`text`].
    pub fn scrub(&self, message: &str) -> String {
        let mut message = message.to_owned();
        for secret in &self.0 {
            if message.contains(secret.as_str()) {
                message = message.replace(secret.as_str(), MASK);
            }
        }
        text(&message)
    }
}

/// [`url`], reporting each hidden value to `found`.
fn redact_url(input: &str, found: &mut dyn FnMut(&str)) -> String {
    let start = input.len() - input.trim_start().len();
    let body = &input[start..];
    if body.len() >= 5 && body[..5].eq_ignore_ascii_case("odbc:") {
        let split = start + 5;
        return format!("{}{}", &input[..split], odbc(&input[split..], found));
    }
    if body.contains("://") {
        return pairs(&userinfo(input, &[], found), URL_VALUE_END, found);
    }
    if body.contains(';') {
        return odbc(input, found);
    }
    pairs(input, LIBPQ_VALUE_END, found)
}

/// Hides the user-info password of every `scheme://` URL in `input` (and a NATS URL's token).
/// A URL ends at one of `ends` (nothing: the whole input is one URL).
fn userinfo(input: &str, ends: &[char], found: &mut dyn FnMut(&str)) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(at) = rest.find("://") {
        let scheme_start = rest[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        let scheme = &rest[scheme_start..at];
        let after = &rest[at + 3..];
        let end = after.find(ends).unwrap_or(after.len());
        // A comma followed by `scheme://` starts the next URL of a list (the servers of a NATS
        // cluster): each is redacted on its own, so that one server's user info cannot
        // swallow the addresses before the next one's '@'.
        let end = next_listed_url(&after[..end]).unwrap_or(end);
        let (url, tail) = after.split_at(end);
        out.push_str(&rest[..at + 3]);
        // The user info ends at the last '@' before the query or fragment.
        let authority_end = url.find(['?', '#']).unwrap_or(url.len());
        match url[..authority_end].rfind('@') {
            Some(at_sign) => {
                let user_info = &url[..at_sign];
                match user_info.find(':') {
                    Some(colon) => {
                        found(&user_info[colon + 1..]);
                        out.push_str(&user_info[..colon + 1]);
                        out.push_str(MASK);
                    }
                    None if is_nats_scheme(scheme) && !user_info.is_empty() => {
                        found(user_info);
                        out.push_str(MASK);
                    }
                    None => out.push_str(user_info),
                }
                out.push_str(&url[at_sign..]);
            }
            None => out.push_str(url),
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// Where in `url` a comma starts another `scheme://` URL (spaces after the comma allowed), if
/// anywhere: `nats://a:4222,nats://u:pw@b:4223` → the index of the comma.
fn next_listed_url(url: &str) -> Option<usize> {
    url.match_indices(',').map(|(i, _)| i).find(|&comma| {
        let next = url[comma + 1..].trim_start();
        next.find("://").is_some_and(|sep| {
            sep > 0
                && next[..sep]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        })
    })
}

/// `nats://` or `tls://` (NATS over TLS), any case.
fn is_nats_scheme(scheme: &str) -> bool {
    scheme.eq_ignore_ascii_case("nats") || scheme.eq_ignore_ascii_case("tls")
}

/// Hides the value of every `name=value` with a secret name. A value is `'quoted'` or
/// `"quoted"` (backslash escapes), `{braced}` (ODBC: `}}` is a `}`), or runs to one of `ends`.
fn pairs(input: &str, ends: &[char], found: &mut dyn FnMut(&str)) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(eq) = rest.find('=') {
        let name_start = rest[..eq]
            .rfind(|c: char| !(c.is_alphanumeric() || matches!(c, '_' | '-' | '.')))
            .map_or(0, |i| i + 1);
        let name = &rest[name_start..eq];
        out.push_str(&rest[..=eq]);
        let after = &rest[eq + 1..];
        if !is_secret_name(name) {
            rest = after;
            continue;
        }
        let len = value_len(after, ends);
        let value = &after[..len];
        if value.is_empty() || value == MASK {
            out.push_str(value);
        } else {
            report(value, found);
            out.push_str(MASK);
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// An ODBC / ADO connection string, `name=value` attributes separated by `;`, with every
/// secret attribute's value hidden (braces included).
fn odbc(input: &str, found: &mut dyn FnMut(&str)) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while !rest.is_empty() {
        let end = rest.find(['=', ';']).unwrap_or(rest.len());
        let name = &rest[..end];
        out.push_str(name);
        rest = &rest[end..];
        match rest.chars().next() {
            Some('=') => {
                out.push('=');
                let after = &rest[1..];
                let len = odbc_value_len(after);
                let value = &after[..len];
                if is_secret_name(name) && !value.trim().is_empty() {
                    report(value, found);
                    out.push_str(MASK);
                } else {
                    out.push_str(value);
                }
                rest = &after[len..];
            }
            Some(';') => {
                out.push(';');
                rest = &rest[1..];
            }
            _ => {}
        }
    }
    out
}

/// The `name=value` attributes of an ODBC / ADO connection string, in order, values as written
/// (braces kept), for whoever must read them (e.g. whether the connection is encrypted).
pub fn odbc_attributes(input: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let end = rest.find(['=', ';']).unwrap_or(rest.len());
        let name = rest[..end].trim();
        rest = &rest[end..];
        match rest.chars().next() {
            Some('=') => {
                let after = &rest[1..];
                let len = odbc_value_len(after);
                out.push((name, after[..len].trim()));
                rest = &after[len..];
            }
            Some(';') => rest = &rest[1..],
            _ => {}
        }
    }
    out
}

/// The length of an ODBC attribute value: up to the next `;`, or past the closing brace of a
/// `{…}` value (which may hold `;`, and `}}` for a `}`) and on to the next `;`. An unclosed
/// brace runs to the end: better to hide too much.
fn odbc_value_len(input: &str) -> usize {
    let lead = input.len() - input.trim_start().len();
    let value = &input[lead..];
    if value.starts_with('{') {
        let Some(close) = closing_brace(value) else {
            return input.len();
        };
        let after = &value[close + 1..];
        return lead + close + 1 + after.find(';').unwrap_or(after.len());
    }
    input.find(';').unwrap_or(input.len())
}

/// The length of a value in `name=value` text (see [`pairs`]).
fn value_len(input: &str, ends: &[char]) -> usize {
    match input.chars().next() {
        Some('{') => closing_brace(input).map_or(input.len(), |close| close + 1),
        Some(quote @ ('\'' | '"')) => {
            let mut escaped = false;
            for (i, c) in input.char_indices().skip(1) {
                match c {
                    '\\' if !escaped => escaped = true,
                    c if c == quote && !escaped => return i + 1,
                    _ => escaped = false,
                }
            }
            input.len()
        }
        _ => input.find(ends).unwrap_or(input.len()),
    }
}

/// The index of the `}` closing the `{` at the start of `input` (`}}` is an escaped `}`).
fn closing_brace(input: &str) -> Option<usize> {
    let bytes = input.as_bytes();
    let mut i = 1;
    while i < bytes.len() {
        if bytes[i] == b'}' {
            if bytes.get(i + 1) == Some(&b'}') {
                i += 2;
                continue;
            }
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Reports a hidden value to `found` as written, without its quotes or braces, and unescaped.
fn report(value: &str, found: &mut dyn FnMut(&str)) {
    found(value);
    let trimmed = value.trim();
    if let Some(inner) = trimmed.strip_prefix('{').and_then(|v| v.strip_suffix('}')) {
        found(inner);
        found(&inner.replace("}}", "}"));
    }
    for quote in ['\'', '"'] {
        if let Some(inner) = trimmed
            .strip_prefix(quote)
            .and_then(|v| v.strip_suffix(quote))
        {
            found(inner);
            found(&inner.replace(&format!("\\{quote}"), &quote.to_string()));
        }
    }
}

/// `%XX` sequences decoded (invalid UTF-8 replaced); anything else kept as it is.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The text of an error that leaves the process: `err` and its causes on one line, skipping a cause its parent already spells out.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_hide_the_password_and_secret_parameters() {
        assert_eq!(
            url("postgres://user:pw@host:5432/db"),
            "postgres://user:***@host:5432/db"
        );
        assert_eq!(
            url("mysql://root:p/a@ss@host/db?password=x&ssl=true"),
            "mysql://root:***@host/db?password=***&ssl=true"
        );
        assert_eq!(url("mysql://root@host/db"), "mysql://root@host/db");
        assert_eq!(url("sqlite://./central.db"), "sqlite://./central.db");
        assert_eq!(
            url("https://api.example/v1?token=abc#x"),
            "https://api.example/v1?token=***#x"
        );
        assert_eq!(url("nats://tok@h:4222"), "nats://***@h:4222");
        assert_eq!(url("tls://u:pw@h:4222"), "tls://u:***@h:4222");
        assert_eq!(url("nats://h:4222"), "nats://h:4222");
    }

    #[test]
    fn each_url_of_a_comma_list_is_redacted_on_its_own() {
        for (list, shown) in [
            (
                "nats://u:secret@a:4222,nats://b:4223",
                "nats://u:***@a:4222,nats://b:4223",
            ),
            (
                "nats://a:4222,nats://u:secret@b:4223",
                "nats://a:4222,nats://u:***@b:4223",
            ),
            (
                "nats://u:secret@a:4222, tls://u:secret@b:4223,nats://tok@c",
                "nats://u:***@a:4222, tls://u:***@b:4223,nats://***@c",
            ),
            (
                "nats://a:4222,nats://tok@b:4223",
                "nats://a:4222,nats://***@b:4223",
            ),
        ] {
            assert_eq!(url(list), shown, "{list}");
            assert_eq!(
                text(&format!("servers {list} down")),
                format!("servers {shown} down")
            );
            assert!(
                !url(list).contains("secret") && !url(list).contains("tok"),
                "{list}"
            );
        }
        // The secrets found are the passwords alone, not runs of the list.
        let secrets = Secrets::of("nats://a:4222,nats://u:secret@b:4223");
        assert_eq!(secrets, Secrets(vec!["secret".into()]));
        // A comma inside a password (no URL after it) is still part of the password.
        assert_eq!(url("nats://u:pa,ss@h:4222"), "nats://u:***@h:4222");
    }

    #[test]
    fn userinfo_is_hidden_up_to_the_last_at_sign() {
        assert_eq!(
            url("http://user:p@ss:w/rd@host/path?q=1"),
            "http://user:***@host/path?q=1"
        );
        assert_eq!(url("https://:secret@host/"), "https://:***@host/");
        assert_eq!(url("https://user@host/"), "https://user@host/");
        let secrets = Secrets::of("http://user:p%40ss@host/");
        assert_eq!(
            secrets.scrub("refused p@ss and p%40ss"),
            "refused *** and ***"
        );
    }

    #[test]
    fn query_parameters_with_secret_names_are_hidden() {
        assert_eq!(
            url(
                "https://h/m.json?X-Amz-Signature=ab&sig=cd&api-key=ef&access_token=gh&apikey=ij&tenant=3"
            ),
            "https://h/m.json?X-Amz-Signature=***&sig=***&api-key=***&access_token=***&apikey=***&tenant=3"
        );
        assert_eq!(
            url("https://h/?client_secret=x&Key=y&pass=z&page=2"),
            "https://h/?client_secret=***&Key=***&pass=***&page=2"
        );
    }

    #[test]
    fn libpq_strings_hide_quoted_and_bare_passwords() {
        assert_eq!(
            url("host=db user=u password=secret"),
            "host=db user=u password=***"
        );
        assert_eq!(
            url("host=db password='a b\\' c' dbname=x"),
            "host=db password=*** dbname=x"
        );
        let secrets = Secrets::of("host=db password='a b\\' c'");
        assert_eq!(secrets.scrub("it was a b' c"), "it was ***");
    }

    #[test]
    fn odbc_passwords_in_braces_may_hold_semicolons_and_escaped_braces() {
        assert_eq!(
            url("odbc:Driver={ODBC Driver 18};Server=h;UID=u;PWD={a;b}}c};Database=x"),
            "odbc:Driver={ODBC Driver 18};Server=h;UID=u;PWD=***;Database=x"
        );
        assert_eq!(
            url("Driver={PostgreSQL Unicode};Server=h;Uid=leitor;Password=s3cr3t;"),
            "Driver={PostgreSQL Unicode};Server=h;Uid=leitor;Password=***;"
        );
        assert_eq!(url("odbc:DSN=x;PWD={unclosed;rest"), "odbc:DSN=x;PWD=***");
        let secrets = Secrets::of("odbc:DSN=x;PWD={a;b}}c}");
        assert_eq!(
            secrets.scrub("login failed for {a;b}}c} (a;b}c)"),
            "login failed for *** (***)"
        );
    }

    #[test]
    fn free_text_hides_urls_and_secret_pairs_it_quotes() {
        assert_eq!(
            text("could not read http://u:pw@h/m.json?token=abc: connection refused"),
            "could not read http://u:***@h/m.json?token=*** connection refused"
        );
        assert_eq!(
            text("url=Some(\"nats://tok@h:4222\") and odbc PWD={x;y} failed"),
            "url=Some(\"nats://***@h:4222\") and odbc PWD=*** failed"
        );
        assert_eq!(
            text("HTTP 503 after 3 attempts; nothing secret"),
            "HTTP 503 after 3 attempts; nothing secret"
        );
    }

    #[test]
    fn secrets_hide_tokens_wherever_they_appear() {
        let secrets = Secrets::of("postgres://u:p%40ss%2Fword@h/db?sslpassword=zz9")
            .with(Some("tok-123"))
            .with(None);
        assert_eq!(
            secrets.scrub("failed for p@ss/word and p%40ss%2Fword and zz9, Bearer tok-123"),
            "failed for *** and *** and ***, Bearer ***"
        );
        assert_eq!(Secrets::of("https://h/"), Secrets::default());
    }
}
