//! The ingest API's OpenAPI 3.0 document, served at `GET /v1/openapi.json`. Written by hand as
//! one JSON literal so it reads like the API; the tests in `agent/tests/ingest_api.rs` check
//! that every path and status it lists is what the handlers really do. The `Host` check's two
//! answers, which every operation has, are added to each by [`with_host_answers`].

use serde_json::{Value, json};

/// The pattern of action and entity names (`estafeta_staging::validate_name`).
pub const NAME_PATTERN: &str = "^[a-z0-9-][a-z0-9_-]{0,63}$";

/// The document; `max_body_bytes` is the configured `MAX_BODY_BYTES`.
pub fn document(max_body_bytes: usize) -> Value {
    with_host_answers(operations(max_body_bytes))
}

/// What the `Host` check (`super::host`) answers, on every route before its handler.
const INVALID_HOST: &str =
    "invalid_host: the request has no Host header, several, or one that is not a host name.";
const HOST_NOT_ALLOWED: &str = "host_not_allowed: the Host names neither localhost, a 127.0.0.0/8 address, [::1], the INGEST_ADDR address nor a name in INGEST_ALLOWED_HOSTS (a web page trying DNS rebinding). Nothing was done.";

/// Adds the `Host` check's 400 and 421 to every operation (a 400 the operation already lists
/// gets `invalid_host` added to its description).
fn with_host_answers(mut doc: Value) -> Value {
    let error = |description: String| {
        json!({
            "description": description,
            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
        })
    };
    let Some(paths) = doc["paths"].as_object_mut() else {
        return doc;
    };
    for operation in paths
        .values_mut()
        .filter_map(Value::as_object_mut)
        .flat_map(|item| item.values_mut())
    {
        let Some(responses) = operation["responses"].as_object_mut() else {
            continue;
        };
        let bad_request = match responses.get("400").and_then(|r| r["description"].as_str()) {
            Some(listed) => format!("{listed} Or {INVALID_HOST}"),
            None => INVALID_HOST.to_owned(),
        };
        responses.insert("400".into(), error(bad_request));
        responses.insert("421".into(), error(HOST_NOT_ALLOWED.to_owned()));
    }
    doc
}

/// The document without the `Host` check's answers.
fn operations(max_body_bytes: usize) -> Value {
    let error = |description: &str| {
        json!({
            "description": description,
            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
        })
    };
    let unavailable = |description: &str| {
        json!({
            "description": description,
            "headers": { "Retry-After": { "$ref": "#/components/headers/RetryAfter" } },
            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
        })
    };
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Estafeta ingest API",
            "version": crate::version::current(),
            "description": "Stage records on the local disk; estafeta delivers them to the central database and APIs, in order per (entity, key), when they are reachable. A 202 answer means the records are durable on disk. Every error answer is JSON {\"error\": code, \"message\": text} and stages nothing. When INGEST_TOKEN is set, POST /v1/records, GET /v1/status, the dead-letter routes and POST /v1/update require 'Authorization: Bearer <INGEST_TOKEN>'. Every route answers only requests whose Host is localhost, a 127.0.0.0/8 address, [::1], the INGEST_ADDR address or a name in INGEST_ALLOWED_HOSTS (421 otherwise), so that web pages cannot reach the API through DNS rebinding."
        },
        "paths": {
            "/v1/records/{action}/{entity}": {
                "post": {
                    "operationId": "stageRecords",
                    "summary": "Stage one record (a JSON object) or several, all or nothing (a JSON array of objects).",
                    "security": [ {}, { "bearer": [] } ],
                    "parameters": [
                        { "$ref": "#/components/parameters/Action" },
                        { "$ref": "#/components/parameters/Entity" },
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": false,
                            "description": "The client's key for this request. The same key with the same action, entity, X-Record-Key and body answers the first answer again (header Idempotent-Replayed: true) and stages nothing; the same key with anything else is a 409.",
                            "schema": { "type": "string", "minLength": 1, "maxLength": super::handlers::MAX_IDEMPOTENCY_KEY_LEN }
                        },
                        {
                            "name": "X-Record-Key",
                            "in": "header",
                            "required": false,
                            "description": "The record key (applies to every record of the request). Without it, the key is the payload's key field for the entity (default \"id\") when it is a string or a number; otherwise the record has no key. Records of one (entity, key) are delivered in the order they were staged.",
                            "schema": { "type": "string", "maxLength": estafeta_staging::MAX_KEY_LEN }
                        }
                    ],
                    "requestBody": {
                        "required": true,
                        "description": format!("At most {max_body_bytes} bytes (MAX_BODY_BYTES). The entity's JSON Schema, when configured, applies to each record."),
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        { "type": "object" },
                                        { "type": "array", "minItems": 1, "items": { "type": "object" } }
                                    ]
                                }
                            }
                        }
                    },
                    "responses": {
                        "202": {
                            "description": "Staged durably (or, with a repeated Idempotency-Key, the first answer again). An object body answers {id, seq, path}; an array body answers {ids, seqs}.",
                            "headers": {
                                "Idempotent-Replayed": {
                                    "description": "\"true\" when this answer repeats the first answer to the Idempotency-Key.",
                                    "schema": { "type": "string", "enum": ["true"] }
                                }
                            },
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "oneOf": [
                                            { "$ref": "#/components/schemas/Receipt" },
                                            { "$ref": "#/components/schemas/BatchReceipt" }
                                        ]
                                    }
                                }
                            }
                        },
                        "400": error("invalid_name (action or entity outside the name pattern), invalid_header, invalid_json (with line and column), invalid_body (not an object or a non-empty array of objects), invalid_record (refused by the store, e.g. a key that is too long), unknown_sink (a route names a sink that does not exist)."),
                        "401": {
                            "description": "unauthorized: INGEST_TOKEN is set and the request has no 'Authorization: Bearer' header with it.",
                            "headers": { "WWW-Authenticate": { "schema": { "type": "string", "enum": ["Bearer"] } } },
                            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
                        },
                        "405": error("method_not_allowed: records are sent with POST."),
                        "408": error("body_timeout: the body was not received in full within INGEST_BODY_TIMEOUT_SECS; nothing was staged."),
                        "409": error("idempotency_conflict: the Idempotency-Key was already used with a different request."),
                        "413": error("body_too_large: the body is over MAX_BODY_BYTES."),
                        "415": error("unsupported_media_type: the Content-Type is missing or not application/json."),
                        "422": error("schema_violation: a record does not match its entity's JSON Schema; the message names the record, the JSON pointer of the value and the rule."),
                        "500": error("internal_error: writing to staging failed; nothing was staged."),
                        "503": unavailable("shutting_down (estafeta is stopping) or staging_stopped (a disk flush failed; estafeta must be restarted)."),
                        "507": unavailable("staging_full: the disk is below MIN_FREE_DISK_MB (STAGING_MIN_FREE_BYTES) or staging is at STAGING_MAX_BYTES; records already staged are safe.")
                    }
                }
            },
            "/v1/status": {
                "get": {
                    "operationId": "status",
                    "summary": "Counts per sink and per action/entity, disk space, version, uptime and ingest counters.",
                    "security": [ {}, { "bearer": [] } ],
                    "responses": {
                        "200": {
                            "description": "The status.",
                            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Status" } } }
                        },
                        "401": error("unauthorized: INGEST_TOKEN is set and the request does not carry it."),
                        "500": error("internal_error: the staging store could not be read.")
                    }
                }
            },
            "/v1/dead-letters": {
                "get": {
                    "operationId": "deadLetters",
                    "summary": "Dead letters, oldest first, with the reason each one failed.",
                    "security": [ {}, { "bearer": [] } ],
                    "parameters": [{
                        "name": "limit", "in": "query", "required": false,
                        "description": "How many (default 100).",
                        "schema": { "type": "integer", "minimum": 1, "maximum": super::dead_letters::MAX_LISTED }
                    }],
                    "responses": {
                        "200": {
                            "description": "The dead letters.",
                            "content": { "application/json": { "schema": {
                                "type": "object",
                                "required": ["dead_letters"],
                                "properties": {
                                    "dead_letters": { "type": "array", "items": { "$ref": "#/components/schemas/DeadLetter" } },
                                    "refused_rows": { "type": "array", "items": {
                                        "type": "object",
                                        "description": "A SQL source row that could not become a record, set aside under _failed/_refused/ (estafeta retry --send stages a replayable one again).",
                                        "required": ["source", "checkpoint", "reason", "refused_at", "replayable", "path"],
                                        "properties": {
                                            "source": { "type": "string" },
                                            "checkpoint": { "type": "string" },
                                            "reason": { "type": "string" },
                                            "refused_at": { "type": "string", "format": "date-time" },
                                            "replayable": { "type": "boolean" },
                                            "path": { "type": "string" }
                                        }
                                    } }
                                }
                            } } }
                        },
                        "400": error("invalid_query: limit is not a whole number from 1 to 1000."),
                        "401": error("unauthorized: INGEST_TOKEN is set and the request does not carry it."),
                        "500": error("internal_error: the dead letters could not be read.")
                    }
                }
            },
            "/v1/dead-letters/{sink}/{seq}/requeue": {
                "post": {
                    "operationId": "requeueDeadLetter",
                    "summary": "Puts one dead letter back in line for its sink (like `estafeta retry --send`) and wakes the batcher. Requires the header X-Requested-By: estafeta and, from a browser, a same-origin request.",
                    "security": [ {}, { "bearer": [] } ],
                    "parameters": [
                        { "name": "sink", "in": "path", "required": true, "schema": { "type": "string" } },
                        { "name": "seq", "in": "path", "required": true, "schema": { "type": "integer", "format": "int64", "minimum": 0 } },
                        {
                            "name": "X-Requested-By", "in": "header", "required": true,
                            "description": "Must be 'estafeta': a cross-site form cannot send it.",
                            "schema": { "type": "string", "enum": ["estafeta"] }
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "Requeued.",
                            "content": { "application/json": { "schema": { "type": "object", "required": ["requeued"] } } }
                        },
                        "400": error("invalid_path: seq is not a whole number."),
                        "401": error("unauthorized: INGEST_TOKEN is set and the request does not carry it."),
                        "403": error("cross_site_refused: X-Requested-By is missing, or the request comes from another site."),
                        "404": error("not_found: no dead letter with this sink and seq."),
                        "500": error("internal_error: the store could not requeue it.")
                    }
                }
            },
            "/": {
                "get": {
                    "operationId": "statusPage",
                    "summary": "The status page for people (HTML; its script reads /v1/status and /v1/dead-letters, asking for the token when one is set). No external assets.",
                    "responses": {
                        "200": { "description": "The page.", "content": { "text/html": { "schema": { "type": "string" } } } }
                    }
                }
            },
            "/assets/status.js": {
                "get": {
                    "operationId": "statusPageScript",
                    "summary": "The status page's script.",
                    "responses": {
                        "200": { "description": "The script.", "content": { "text/javascript": { "schema": { "type": "string" } } } }
                    }
                }
            },
            "/assets/status.css": {
                "get": {
                    "operationId": "statusPageStyle",
                    "summary": "The status page's style sheet.",
                    "responses": {
                        "200": { "description": "The style sheet.", "content": { "text/css": { "schema": { "type": "string" } } } }
                    }
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "Liveness: 200 while the process runs.",
                    "responses": {
                        "200": { "description": "ok", "content": { "text/plain": { "schema": { "type": "string", "enum": ["ok"] } } } }
                    }
                }
            },
            "/v1/update": {
                "post": {
                    "operationId": "checkUpdate",
                    "summary": "Check UPDATE_URL's release manifest now (as UPDATE_CRONTAB would, without skipping a version that was rolled back or an archive whose signature was refused); a newer signed version is then installed, tried and rolled back if it does not get ready. The outcome shows in GET /v1/status, `update`.",
                    "security": [ {}, { "bearer": [] } ],
                    "parameters": [{
                        "name": "X-Requested-By", "in": "header", "required": true,
                        "description": "Must be 'estafeta': a cross-site form cannot send it.",
                        "schema": { "type": "string", "enum": ["estafeta"] }
                    }],
                    "responses": {
                        "202": { "description": "The check started.", "content": { "application/json": { "schema": { "type": "object" } } } },
                        "401": error("unauthorized: INGEST_TOKEN is set and the request does not carry it."),
                        "403": error("cross_site_refused: X-Requested-By is missing, or the request comes from another site."),
                        "409": error("updates_off: UPDATE_URL is not set.")
                    }
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "ready",
                    "summary": "Readiness: 200 when the store is open and accepts writes.",
                    "responses": {
                        "200": { "description": "ready", "content": { "text/plain": { "schema": { "type": "string", "enum": ["ready"] } } } },
                        "503": error("not_ready: shutting down, the store does not answer, or staging refuses writes (full disk, size limit, failed flush); the message says which.")
                    }
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus text format: estafeta_records_staged_total, estafeta_ingest_requests_total{code}, estafeta_records_pending{sink}, estafeta_records_dead{sink}, estafeta_deliveries_total{sink,outcome}, estafeta_staging_bytes, estafeta_disk_free_bytes, estafeta_staging_blocked, process_resident_memory_bytes.",
                    "responses": {
                        "200": { "description": "The metrics.", "content": { "text/plain": { "schema": { "type": "string" } } } }
                    }
                }
            },
            "/v1/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document.",
                    "responses": {
                        "200": { "description": "OpenAPI 3.0 document.", "content": { "application/json": { "schema": { "type": "object" } } } }
                    }
                }
            }
        },
        "components": {
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer", "description": "INGEST_TOKEN" }
            },
            "parameters": {
                "Action": {
                    "name": "action", "in": "path", "required": true,
                    "description": "What happened: create, update, upsert, delete or another name. Names starting with '_' are reserved.",
                    "schema": { "type": "string", "pattern": NAME_PATTERN }
                },
                "Entity": {
                    "name": "entity", "in": "path", "required": true,
                    "description": "What it happened to: patient, attendance, … Names starting with '_' are reserved.",
                    "schema": { "type": "string", "pattern": NAME_PATTERN }
                }
            },
            "headers": {
                "RetryAfter": { "description": "Seconds to wait before sending again.", "schema": { "type": "integer" } }
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {
                        "error": {
                            "type": "string",
                            "description": "Stable code.",
                            "enum": [
                                "invalid_name", "invalid_header", "invalid_json", "invalid_body",
                                "invalid_record", "unknown_sink", "unauthorized", "not_found",
                                "method_not_allowed", "idempotency_conflict", "body_too_large",
                                "unsupported_media_type", "schema_violation", "internal_error",
                                "shutting_down", "staging_stopped", "staging_full", "not_ready",
                                "invalid_query", "invalid_path", "cross_site_refused",
                                "updates_off", "invalid_host", "host_not_allowed"
                            ]
                        },
                        "message": { "type": "string", "description": "What went wrong and what to do about it." }
                    }
                },
                "Receipt": {
                    "type": "object",
                    "required": ["id", "seq", "path"],
                    "properties": {
                        "id": { "type": "string", "description": "UUIDv7; also the Idempotency-Key sinks send." },
                        "seq": { "type": "integer", "format": "int64", "description": "Strictly increasing over the store." },
                        "path": { "type": "string", "description": "The staging file that holds the record." }
                    }
                },
                "BatchReceipt": {
                    "type": "object",
                    "required": ["ids", "seqs"],
                    "properties": {
                        "ids": { "type": "array", "items": { "type": "string" } },
                        "seqs": { "type": "array", "items": { "type": "integer", "format": "int64" } }
                    }
                },
                "DeadLetter": {
                    "type": "object",
                    "required": ["sink", "seq", "id", "action", "entity", "reason", "attempts", "failed_at"],
                    "properties": {
                        "sink": { "type": "string" },
                        "seq": { "type": "integer", "format": "int64" },
                        "id": { "type": "string" },
                        "action": { "type": "string" },
                        "entity": { "type": "string" },
                        "key": { "type": "string", "nullable": true },
                        "reason": { "type": "string", "description": "Why the sink refused it." },
                        "attempts": { "type": "integer" },
                        "failed_at": { "type": "string" },
                        "path": { "type": "string", "description": "The dead-letter file under FAILED_DIR." }
                    }
                },
                "Status": {
                    "type": "object",
                    "required": ["version", "uptime_secs", "records_pending", "sinks", "ingest"],
                    "properties": {
                        "version": { "type": "string" },
                        "uptime_secs": { "type": "integer" },
                        "dry_run": { "type": "boolean" },
                        "shutting_down": { "type": "boolean" },
                        "root": { "type": "string" },
                        "records_pending": { "type": "integer" },
                        "bytes_staged": { "type": "integer" },
                        "disk_free_bytes": { "type": "integer", "nullable": true },
                        "min_free_disk_bytes": { "type": "integer", "description": "MIN_FREE_DISK_MB in bytes: intake answers 507 below it." },
                        "memory_rss_bytes": { "type": "integer", "nullable": true, "description": "The agent's resident memory." },
                        "staging_blocked": { "type": "string", "nullable": true },
                        "sinks": { "type": "array", "items": { "type": "object" } },
                        "groups": { "type": "array", "items": { "type": "object" } },
                        "sources": sources_schema(),
                        "ingest": {
                            "type": "object",
                            "properties": {
                                "records_staged": { "type": "integer" },
                                "requests": { "type": "object", "additionalProperties": { "type": "integer" } }
                            }
                        }
                    }
                }
            }
        }
    })
}

/// `Status.sources`: each SQL source's health (apart: one `json!` this deep exceeds the macro
/// recursion limit).
fn sources_schema() -> serde_json::Value {
    json!({
        "type": "array",
        "description": "Each SQL source's health, as the running agent saw its cycles (issue 22).",
        "items": {
            "type": "object",
            "properties": {
                "name": { "type": "string" },
                "running": { "type": "boolean", "description": "A cycle is under way." },
                "last_run_started_at": { "type": "string", "nullable": true, "description": "RFC 3339 UTC." },
                "last_run_finished_at": { "type": "string", "nullable": true },
                "outcome": { "type": "string", "enum": ["ok", "error"], "nullable": true, "description": "Null before the first cycle ends." },
                "last_rows": { "type": "integer", "description": "Rows the last cycle read." },
                "last_records": { "type": "integer", "description": "Records the last cycle staged." },
                "last_refused": { "type": "integer", "description": "Rows the last cycle set aside (_failed/_refused/)." },
                "rows_total": { "type": "integer", "description": "Since the agent started." },
                "records_total": { "type": "integer" },
                "refused_total": { "type": "integer" },
                "errors_total": { "type": "integer", "description": "Failed cycles since start." },
                "last_success_at": { "type": "string", "nullable": true },
                "last_error": { "type": "string", "nullable": true, "description": "Without the URL's password or row values; null once a cycle ends well." },
                "lag_secs": { "type": "integer", "nullable": true, "description": "How far behind the source is." },
                "lag_from": { "type": "string", "enum": ["newest_row", "caught_up"], "nullable": true, "description": "newest_row: the age of the newest row staged (a time checkpoint); caught_up: the time since a cycle last read everything there was." }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_pattern_matches_validate_name() {
        // The pattern is written for people; check it agrees with the store on the edges.
        for (name, ok) in [
            ("create", true),
            ("a-b_c", true),
            ("-x", true),
            ("_failed", false),
            ("", false),
            ("Upper", false),
            ("a/b", false),
        ] {
            assert_eq!(
                estafeta_staging::validate_name("name", name).is_ok(),
                ok,
                "{name}"
            );
        }
        let doc = document(1024);
        assert_eq!(
            doc["components"]["parameters"]["Action"]["schema"]["pattern"],
            NAME_PATTERN
        );
    }
}
