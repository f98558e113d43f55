//! Where an HTTP sink's request goes: the default method and path for a record, route path
//! templates filled from it (each value one encoded path segment, so a key can never climb out
//! of the path), and the join onto the sink's base URL.

use estafeta_staging::Envelope;
use reqwest::{Method, Url};

/// Why a key cannot be a path segment (it is empty, `.` or `..`); the key is not quoted.
pub(super) const KEY_NOT_A_SEGMENT: &str =
    "the record's key (empty, . or ..) cannot be sent as a URL path segment";

/// The default method for a record (see the module documentation).
pub(super) fn default_method(envelope: &Envelope) -> Method {
    match (envelope.action.as_str(), envelope.key.is_some()) {
        ("update" | "upsert", true) => Method::PUT,
        ("delete", true) => Method::DELETE,
        _ => Method::POST,
    }
}

/// The default path segments for a record whose key is `key` (see the module documentation).
pub(super) fn default_segments<'e>(
    envelope: &'e Envelope,
    key: Option<&'e str>,
) -> Result<Vec<&'e str>, String> {
    let entity = envelope.entity.as_str();
    let action = envelope.action.as_str();
    match (action, key) {
        ("update" | "upsert" | "delete", Some(key)) => {
            // `.` and `..` (even encoded) are dot segments a URL parser folds away:
            // `PUT {url}/patient/..` would reach `{url}/`.
            if matches!(key, "" | "." | "..") {
                return Err(KEY_NOT_A_SEGMENT.to_owned() + "; add a route that places it elsewhere");
            }
            Ok(vec![entity, key])
        }
        ("update" | "upsert" | "delete", None) => Ok(vec![entity, action]),
        _ => Ok(vec![entity]),
    }
}

/// Fills a checked template for a record whose key is `key`; each value is encoded as one
/// path segment.
pub(super) fn render(
    template: &str,
    envelope: &Envelope,
    key: Option<&str>,
) -> Result<String, String> {
    fill(template, |name| match name {
        "entity" => Ok(envelope.entity.as_str()),
        "action" => Ok(envelope.action.as_str()),
        "id" => Ok(envelope.id.as_str()),
        // check_template allows nothing else.
        _ => match key {
            Some(key) if !matches!(key, "" | "." | "..") => Ok(key),
            Some(_) => Err(format!("{KEY_NOT_A_SEGMENT} (route path {template:?})")),
            None => Err(format!(
                "the route path {template:?} needs {{key}} but the record has no key"
            )),
        },
    })
}

/// Fills a checked template with `value(name)` for each `{name}`, each encoded as one segment.
pub(super) fn fill<'v>(
    template: &str,
    value: impl Fn(&str) -> Result<&'v str, String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}').unwrap_or(after.len());
        out.push_str(&encode_segment(value(&after[..close])?));
        rest = after.get(close + 1..).unwrap_or("");
    }
    out.push_str(rest);
    Ok(out)
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so a value stays one segment.
pub(super) fn encode_segment(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `base` with `path` (which may carry a `?query`) appended to its path; base query kept.
pub(super) fn join(base: &Url, path: &str) -> Url {
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let mut url = base.clone();
    let full = format!(
        "{}/{}",
        base.path().trim_end_matches('/'),
        path.trim_start_matches('/')
    );
    url.set_path(&full);
    let query = match (base.query(), query) {
        (Some(b), Some(q)) => Some(format!("{b}&{q}")),
        (b, q) => b.or(q).map(str::to_owned),
    };
    url.set_query(query.as_deref());
    url
}
