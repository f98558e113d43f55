//! The intake's settings, which configuration fills in (`[[routes]]`, `[entities.*]`): which sinks
//! the records of an (action, entity) go to, and each entity's key field and JSON Schema. Owned
//! here so the intake and the SQL sources need nothing of how configuration is loaded.

use std::collections::BTreeMap;

/// The payload field holding the record key when an entity names none.
pub const DEFAULT_KEY_FIELD: &str = "id";

/// Which sinks get the records of an (action, entity); `None` matches any.
#[derive(Debug, Clone)]
pub struct Route {
    pub action: Option<String>,
    pub entity: Option<String>,
    pub sinks: Vec<String>,
}

/// Settings of one entity.
#[derive(Debug, Clone, Default)]
pub struct EntityConfig {
    /// Payload field holding the record key (default `id`).
    pub key_field: Option<String>,
    /// JSON Schema every payload of this entity must satisfy (HTTP 422 otherwise).
    pub schema: Option<serde_json::Value>,
}

/// Routes, entities and the names of every sink (where a record goes when no route matches).
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub routes: Vec<Route>,
    pub entities: BTreeMap<String, EntityConfig>,
    pub sinks: Vec<String>,
}

impl Rules {
    /// The sinks the records of (action, entity) go to: the first matching route's, else all.
    pub fn route(&self, action: &str, entity: &str) -> Vec<String> {
        self.routes
            .iter()
            .find(|r| {
                r.action.as_deref().is_none_or(|a| a == action)
                    && r.entity.as_deref().is_none_or(|e| e == entity)
            })
            .map(|r| r.sinks.clone())
            .unwrap_or_else(|| self.sinks.clone())
    }

    /// The payload field holding the record key of `entity` (default `id`).
    pub fn key_field(&self, entity: &str) -> &str {
        key_field(&self.entities, entity)
    }
}

/// The payload field holding the record key of `entity` in `entities` (default `id`).
pub fn key_field<'a>(entities: &'a BTreeMap<String, EntityConfig>, entity: &str) -> &'a str {
    entities
        .get(entity)
        .and_then(|e| e.key_field.as_deref())
        .unwrap_or(DEFAULT_KEY_FIELD)
}
