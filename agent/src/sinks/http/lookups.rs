//! Lookups for body templates: what the old Bemsoft monitor did around its payloads (seed 003),
//! as two template functions.
//!
//! - `map("exames", code)` reads a **mapping file** (`maps = { exames = "tests_map.json" }` on the
//!   sink, a JSON object `{"<local code>": <value>}`, read when the configuration loads);
//!   `map("exames", code, code)` gives a default when the code is not in the file. Without a
//!   default, a code with no mapping is an error: the record becomes a dead letter whose reason
//!   names the code and the file (fix the file, then `estafeta retry --send`).
//! - `catalog("tests", id)` finds an item of a **catalog** the API serves
//!   (`catalogs = { tests = { path = "/tests", key = "supportTestId" } }`): `GET {url}{path}`
//!   with the sink's token, a JSON array of objects (or an object holding one under `items`,
//!   `data` or `results`), cached for `ttl_secs` (default 3600). The catalog is fetched before a
//!   batch is rendered, never while rendering; when the API cannot serve it the batch is retried
//!   like any transient failure, and an old copy keeps serving meanwhile. An id the catalog does
//!   not hold is an error naming it, as with a map.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use minijinja::{Error, ErrorKind, Value as TemplateValue};
use serde_json::Value;

/// How long a fetched catalog serves when `ttl_secs` is not set.
pub const DEFAULT_CATALOG_TTL: Duration = Duration::from_secs(3600);

/// One catalog the API serves.
#[derive(Debug)]
pub struct Catalog {
    /// Path after the sink's URL, such as `/tests`.
    pub path: String,
    /// The field of each item that `catalog(name, value)` matches.
    pub key: String,
    pub ttl: Duration,
    /// The items by their key's text, and when they were fetched.
    items: RwLock<Option<(Instant, HashMap<String, Value>)>>,
}

impl Catalog {
    pub fn new(path: String, key: String, ttl: Duration) -> Self {
        Self {
            path,
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
            .map_err(|e| format!("the catalog {} is not JSON: {e}", self.path))?;
        let list = match &value {
            Value::Array(list) => list,
            Value::Object(o) => ["items", "data", "results"]
                .iter()
                .find_map(|k| o.get(*k).and_then(Value::as_array))
                .ok_or_else(|| {
                    format!(
                        "the catalog {} is an object without an items, data or results list",
                        self.path
                    )
                })?,
            _ => return Err(format!("the catalog {} is not a JSON list", self.path)),
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

/// A sink's maps and catalogs, shared by its body templates.
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

fn failed(message: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, message)
}

/// A template value as a code (its text), or the error naming what it was.
fn code(value: &TemplateValue, function: &str) -> Result<String, Error> {
    let json: Value = serde_json::to_value(value)
        .map_err(|e| failed(format!("{function}: the code is not a plain value ({e})")))?;
    text_of(&json).ok_or_else(|| {
        failed(format!(
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
                "map({name:?}, …): the sink has no map of that name; add maps = {{ {name} = \"file.json\" }}"
            ))
        })?;
        let code = code(value, "map")?;
        match (file.entries.get(&code), default) {
            (Some(found), _) => Ok(TemplateValue::from_serialize(found)),
            (None, Some(default)) => Ok(default),
            (None, None) => Err(failed(format!(
                "code {code:?} has no mapping in {}; add it to the file (or give map() a default)",
                file.path.display()
            ))),
        }
    }

    /// `catalog(name, id)`: the item whose key is `id`.
    pub fn catalog(&self, name: &str, value: &TemplateValue) -> Result<TemplateValue, Error> {
        let catalog = self.catalogs.get(name).ok_or_else(|| {
            failed(format!(
                "catalog({name:?}, …): the sink has no catalog of that name; add catalogs = {{ {name} = {{ path = \"/…\", key = \"…\" }} }}"
            ))
        })?;
        let id = code(value, "catalog")?;
        match catalog.get(&id) {
            Some(Some(item)) => Ok(TemplateValue::from_serialize(&item)),
            Some(None) => Err(failed(format!(
                "no item with {} = {id:?} in the catalog GET {}; check the code or the API's catalog",
                catalog.key, catalog.path
            ))),
            None => Err(failed(format!(
                "the catalog GET {} could not be fetched yet",
                catalog.path
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
            err.to_string().contains("\"URINA\" has no mapping in"),
            "{err}"
        );
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
