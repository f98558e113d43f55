//! Lookups: what the old Bemsoft monitor did around its payloads (seed 003), as two template
//! functions shared by HTTP sinks (body templates) and SQL sources (`enrich`). One
//! implementation, below both: it knows neither sinks nor sources, only files, fetched bytes
//! and minijinja.
//!
//! - `map("exames", code)` reads a **mapping file** (`maps = { exames = "tests_map.json" }`, a
//!   JSON object `{"<local code>": <value>}`, read when the configuration loads);
//!   `map("exames", code, code)` gives a default when the code is not in the file. Without a
//!   default, a code with no mapping is an error ([`is_miss`]) whose message names the code and
//!   the file: a sink's record becomes a dead letter, a source's row is set aside.
//! - `catalog("tests", id)` finds an item of a **catalog** an API serves: a JSON array of
//!   objects (or an object holding one under `items`, `data` or `results`), cached for
//!   `ttl_secs` (default 3600). Its owner fetches it ([`Lookups::refresh`]) before rendering,
//!   never while rendering: a sink's catalog is `GET {sink url}{path}` with the sink's token, a
//!   source's is `GET {url}` with the token of `token_env`. When it cannot be fetched the work
//!   waits like any transient failure, and an old copy keeps serving meanwhile. An id the
//!   catalog does not hold is a miss naming it, as with a map.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use minijinja::{Error, ErrorKind, Value as TemplateValue};
use serde_json::Value;

/// How long a fetched catalog serves when `ttl_secs` is not set.
pub const DEFAULT_CATALOG_TTL: Duration = Duration::from_secs(3600);

/// One catalog an API serves.
pub struct Catalog {
    /// What is fetched: a path after a sink's URL (`/tests`), or a source's full URL. Shown in
    /// messages as it is written here, so a source's URL must not hold a password.
    pub target: String,
    /// The `Authorization: Bearer` token of a source's catalog (`token_env`); a sink's
    /// catalogs use the sink's token.
    pub token: Option<String>,
    /// The field of each item that `catalog(name, value)` matches.
    pub key: String,
    pub ttl: Duration,
    /// The items by their key's text, and when they were fetched.
    items: RwLock<Option<(Instant, HashMap<String, Value>)>>,
}

// By hand, so `{:?}` never prints the token.
impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("target", &self.target)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("key", &self.key)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl Catalog {
    pub fn new(target: String, key: String, ttl: Duration) -> Self {
        Self {
            target,
            token: None,
            key,
            ttl,
            items: RwLock::new(None),
        }
    }

    /// Whether it must be fetched (never fetched, or older than its TTL).
    pub fn stale(&self) -> bool {
        match &*self.items.read().unwrap_or_else(|e| e.into_inner()) {
            Some((at, _)) => at.elapsed() >= self.ttl,
            None => true,
        }
    }

    /// Whether a copy is there, fresh or not.
    pub fn loaded(&self) -> bool {
        self.items
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Takes a fetched body: a JSON array of objects, or an object holding one under `items`,
    /// `data` or `results`. The error says what was expected.
    pub fn store(&self, body: &[u8]) -> Result<usize, String> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| format!("the catalog {} is not JSON: {e}", self.target))?;
        let list = match &value {
            Value::Array(list) => list,
            Value::Object(o) => ["items", "data", "results"]
                .iter()
                .find_map(|k| o.get(*k).and_then(Value::as_array))
                .ok_or_else(|| {
                    format!(
                        "the catalog {} is an object without an items, data or results list",
                        self.target
                    )
                })?,
            _ => return Err(format!("the catalog {} is not a JSON list", self.target)),
        };
        let mut items = HashMap::with_capacity(list.len());
        for item in list {
            if let Some(key) = item.get(&self.key).and_then(text_of) {
                items.insert(key, item.clone());
            }
        }
        let count = items.len();
        *self.items.write().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), items));
        Ok(count)
    }

    fn get(&self, key: &str) -> Option<Option<Value>> {
        let items = self.items.read().unwrap_or_else(|e| e.into_inner());
        items.as_ref().map(|(_, items)| items.get(key).cloned())
    }
}

/// A mapping file, read at load.
#[derive(Debug)]
pub struct MapFile {
    pub path: PathBuf,
    entries: HashMap<String, Value>,
}

impl MapFile {
    /// Reads `path`: a JSON object of codes. The error names the file and what was expected.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read(path)
            .map_err(|e| format!("cannot read the mapping file {}: {e}", path.display()))?;
        let value: Value = serde_json::from_slice(&text).map_err(|e| {
            format!(
                "the mapping file {} is not JSON ({e}); expected an object such as {{\"HEMOGRAMA\": \"HB-001\"}}",
                path.display()
            )
        })?;
        let Value::Object(object) = value else {
            return Err(format!(
                "the mapping file {} is not a JSON object; expected {{\"<local code>\": \"<code>\"}}",
                path.display()
            ));
        };
        Ok(Self {
            path: path.to_path_buf(),
            entries: object.into_iter().collect(),
        })
    }
}

/// The maps and catalogs of one sink (for its body templates) or one source (for `enrich`).
#[derive(Debug, Default)]
pub struct Lookups {
    pub maps: BTreeMap<String, MapFile>,
    pub catalogs: BTreeMap<String, Catalog>,
}

/// A code as text: a string as it is, a number or boolean as JSON writes it.
fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// What kind of lookup error a template error is (see [`is_miss`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// A code this record holds that a map or catalog does not (or a code that is null or not
    /// a plain value): the record's own problem, which sets it aside while the others go on.
    Miss,
    /// A mistake of the settings (a map or catalog name not configured) or of the moment (a
    /// catalog not fetched yet): the same for every record, never a reason to set one aside.
    Setup,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Why::Miss => "a code with no mapping",
            Why::Setup => "a lookup that is not configured or not fetched",
        })
    }
}

impl std::error::Error for Why {}

fn failed(message: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, message).with_source(Why::Setup)
}

fn missed(message: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, message).with_source(Why::Miss)
}

/// The lookup kind an error (or one it wraps) carries, if it came from `map` or `catalog`.
fn why(err: &Error) -> Option<Why> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        if let Some(why) = e.downcast_ref::<Why>() {
            return Some(*why);
        }
        next = e.source();
    }
    None
}

/// Whether a template error is a lookup miss of the record's data (a code without a mapping,
/// an id the catalog does not hold, a null code), as opposed to a mistake of the settings.
pub fn is_miss(err: &Error) -> bool {
    why(err) == Some(Why::Miss)
}

/// Whether a template error is a lookup the settings do not provide (a map or catalog name
/// not configured) or a catalog not fetched yet.
pub fn is_setup(err: &Error) -> bool {
    why(err) == Some(Why::Setup)
}

/// A template value as a code (its text), or the error naming what it was.
fn code(value: &TemplateValue, function: &str) -> Result<String, Error> {
    // Undefined, not null: the template names a field (a column) that is not there at all,
    // a mistake of the template that every record would share.
    if value.is_undefined() {
        return Err(failed(format!(
            "{function}: the code is undefined (a field or column that does not exist); check the name"
        )));
    }
    let json: Value = serde_json::to_value(value)
        .map_err(|e| missed(format!("{function}: the code is not a plain value ({e})")))?;
    text_of(&json).ok_or_else(|| {
        missed(format!(
            "{function}: the code must be text or a number, not {}",
            if json.is_null() {
                "null"
            } else {
                "a list or object"
            }
        ))
    })
}

impl Lookups {
    /// `map(name, code[, default])`.
    pub fn map(
        &self,
        name: &str,
        value: &TemplateValue,
        default: Option<TemplateValue>,
    ) -> Result<TemplateValue, Error> {
        let file = self.maps.get(name).ok_or_else(|| {
            failed(format!(
                "map({name:?}, …): no map of that name is configured here; add maps = {{ {name} = \"file.json\" }} beside the template"
            ))
        })?;
        let code = code(value, "map")?;
        match (file.entries.get(&code), default) {
            (Some(found), _) => Ok(TemplateValue::from_serialize(found)),
            (None, Some(default)) => Ok(default),
            (None, None) => Err(missed(format!(
                "code {code:?} has no mapping in {}; add it to the file (or give map() a default)",
                file.path.display()
            ))),
        }
    }

    /// `catalog(name, id)`: the item whose key is `id`.
    pub fn catalog(&self, name: &str, value: &TemplateValue) -> Result<TemplateValue, Error> {
        let catalog = self.catalogs.get(name).ok_or_else(|| {
            failed(format!(
                "catalog({name:?}, …): no catalog of that name is configured here; add catalogs = {{ {name} = {{ … }} }} beside the template"
            ))
        })?;
        let id = code(value, "catalog")?;
        match catalog.get(&id) {
            Some(Some(item)) => Ok(TemplateValue::from_serialize(&item)),
            Some(None) => Err(missed(format!(
                "no item with {} = {id:?} in the catalog GET {}; check the code or the API's catalog",
                catalog.key,
                crate::redact::url(&catalog.target)
            ))),
            None => Err(failed(format!(
                "the catalog GET {} could not be fetched yet",
                crate::redact::url(&catalog.target)
            ))),
        }
    }

    /// Registers `map` and `catalog` on a template environment.
    pub fn register(self: &Arc<Self>, env: &mut minijinja::Environment<'static>) {
        let lookups = Arc::clone(self);
        env.add_function(
            "map",
            move |name: String, value: TemplateValue, default: Option<TemplateValue>| {
                lookups.map(&name, &value, default)
            },
        );
        let lookups = Arc::clone(self);
        env.add_function("catalog", move |name: String, value: TemplateValue| {
            lookups.catalog(&name, &value)
        });
    }
}

impl Lookups {
    /// Fetches every catalog that is stale, with `get` (the owner's HTTP client: the bytes of
    /// a successful answer, or why not). A failure is an error (the owner's work waits and is
    /// retried) unless an older copy can still serve, which a WARN then says. `owner` names
    /// the sink or source in the log; `shown` gives a catalog's target as logs may show it.
    pub async fn refresh<F, Fut>(&self, owner: &str, mut get: F) -> Result<(), String>
    where
        F: FnMut(&Catalog) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<u8>, String>>,
    {
        for (name, catalog) in &self.catalogs {
            if !catalog.stale() {
                continue;
            }
            let fetched = match get(catalog).await {
                Ok(body) => catalog.store(&body),
                Err(why) => Err(why),
            };
            let shown = crate::redact::url(&catalog.target);
            match fetched {
                Ok(items) => {
                    tracing::info!(owner = %owner, catalog = %name, url = %shown, items, "Catalog fetched for lookups.");
                }
                Err(why) if catalog.loaded() => {
                    tracing::warn!(owner = %owner, catalog = %name, url = %shown, error = %why, "Catalog could not be refreshed; the copy fetched earlier serves.");
                }
                Err(why) => {
                    return Err(format!(
                        "the catalog {name} (GET {shown}) could not be fetched: {why}"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_gives_the_code_its_default_or_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tests_map.json");
        std::fs::write(&path, r#"{"HEMOGRAMA": "HB-001", "12345": "TEST-12345"}"#).unwrap();
        let mut lookups = Lookups::default();
        lookups
            .maps
            .insert("exames".into(), MapFile::load(&path).unwrap());
        let v = |s: &str| TemplateValue::from(s);
        assert_eq!(
            lookups.map("exames", &v("HEMOGRAMA"), None).unwrap(),
            v("HB-001")
        );
        assert_eq!(
            lookups
                .map("exames", &TemplateValue::from(12345), None)
                .unwrap(),
            v("TEST-12345")
        );
        assert_eq!(
            lookups.map("exames", &v("X"), Some(v("X"))).unwrap(),
            v("X")
        );
        let err = lookups.map("exames", &v("URINA"), None).unwrap_err();
        assert!(
            is_miss(&err),
            "a code without a mapping is the record's own problem"
        );
        assert!(is_miss(
            &lookups
                .map("exames", &TemplateValue::from(()), None)
                .unwrap_err()
        ));
        assert!(
            err.to_string().contains("\"URINA\" has no mapping in"),
            "{err}"
        );
        let err = lookups.map("outro", &v("X"), None).unwrap_err();
        assert!(
            !is_miss(&err) && is_setup(&err),
            "a map that is not configured is a mistake of the settings"
        );
        let err = lookups
            .map("exames", &TemplateValue::UNDEFINED, None)
            .unwrap_err();
        assert!(is_setup(&err), "an undefined code is a field no record has");
        assert!(lookups.map("outro", &v("X"), None).is_err());
        std::fs::write(&path, "[1]").unwrap();
        assert!(
            MapFile::load(&path)
                .unwrap_err()
                .contains("not a JSON object")
        );
    }

    #[test]
    fn a_catalog_finds_items_by_key_and_names_a_missing_one() {
        let catalog = Catalog::new("/tests".into(), "supportTestId".into(), DEFAULT_CATALOG_TTL);
        assert!(catalog.stale());
        let n = catalog
            .store(br#"{"items": [{"supportTestId": "HB-001", "supportSpecimenId": "SANGUE"}, {"x": 1}]}"#)
            .unwrap();
        assert_eq!(n, 1);
        assert!(!catalog.stale());
        let mut lookups = Lookups::default();
        lookups.catalogs.insert("tests".into(), catalog);
        let item = lookups
            .catalog("tests", &TemplateValue::from("HB-001"))
            .unwrap();
        assert_eq!(
            item.get_attr("supportSpecimenId").unwrap(),
            TemplateValue::from("SANGUE")
        );
        let err = lookups
            .catalog("tests", &TemplateValue::from("GLU"))
            .unwrap_err();
        assert!(err.to_string().contains("supportTestId = \"GLU\""), "{err}");
    }
}
