//! Events: `POST /platform/events`, `/platform/events/batch` (the same types) and API-key
//! conversions, validated against the payload schema in `data/rdstation-events.json`.
//!
//! The legacy e-commerce events (`ORDER_PLACED`, `ORDER_PLACED_ITEM`, `CART_ABANDONED`,
//! `CART_ABANDONED_ITEM`) were removed on 31 Dec 2025; they are refused like any unknown type
//! unless the account setting `legacy_ecommerce_events` models an older account.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{BODY_LIMIT, Contact, RdResponse, RdStation, array_error, default_funnel};
use crate::now_ms;

/// The embedded default schema.
const EVENT_SCHEMA: &str = include_str!("../../data/rdstation-events.json");

/// Which `cf_*` keys an event takes.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum CustomFields {
    /// Any `cf_*` key.
    Any,
    /// Only the ones listed in `types`.
    #[default]
    None,
}

/// Payload rules of one object (an event payload or a line item).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ObjectRules {
    #[serde(default)]
    pub required: Vec<String>,
    /// Accepted keys and their JSON type.
    #[serde(default)]
    pub types: BTreeMap<String, String>,
    #[serde(default)]
    pub options: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub allow_other_keys: bool,
    #[serde(default)]
    pub custom_fields: CustomFields,
}

/// Rules of one event type.
#[derive(Clone, Debug, Deserialize)]
pub struct EventRules {
    #[serde(flatten)]
    pub payload: ObjectRules,
    /// Rules of each element of `items`.
    #[serde(default)]
    pub items: Option<ObjectRules>,
    #[serde(default)]
    pub legacy: bool,
}

/// Every event type's rules.
#[derive(Clone, Debug, Deserialize)]
pub struct EventSchema {
    pub events: BTreeMap<String, EventRules>,
}

impl Default for EventSchema {
    fn default() -> Self {
        Self::load(EVENT_SCHEMA).expect("the embedded RD Station event schema is valid")
    }
}

impl EventSchema {
    pub fn load(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// The types accepted now.
    fn accepted(&self, legacy_allowed: bool) -> Vec<&str> {
        self.events.iter().filter(|(_, r)| legacy_allowed || !r.legacy).map(|(t, _)| t.as_str()).collect()
    }
}

fn type_matches(kind: &str, value: &Value) -> bool {
    match kind {
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.is_i64() || value.is_u64(),
        "boolean" => value.is_boolean(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => true,
    }
}

fn type_error(kind: &str) -> (&'static str, &'static str) {
    match kind {
        "string" => ("MUST_BE_STRING", "Must be a string."),
        "number" => ("MUST_BE_NUMBER", "Must be a number."),
        "integer" => ("MUST_BE_INTEGER", "Must be an integer."),
        "boolean" => ("MUST_BE_BOOLEAN", "Must be a boolean."),
        "array" => ("MUST_BE_ARRAY", "Must be an array."),
        _ => ("MUST_BE_OBJECT", "Must be an object."),
    }
}

fn invalid_option(options: &[impl serde::Serialize], path: String) -> Value {
    json!({"error_type": "INVALID_OPTION", "error_message": "Must be one of the valid options.", "validation_rules": {"valid_options": options}, "path": path})
}

/// Errors of one object against its rules; `path` is where it sits (`$.body.payload`).
fn check_object(object: &Map<String, Value>, rules: &ObjectRules, path: &str, errors: &mut Vec<Value>) {
    for key in &rules.required {
        if object.get(key).is_none_or(Value::is_null) {
            errors.push(array_error("CANNOT_BE_NULL", "Cannot be null.", &format!("{path}.{key}")));
        }
    }
    for (key, value) in object.iter().filter(|(_, v)| !v.is_null()) {
        let at = format!("{path}.{key}");
        match rules.types.get(key) {
            Some(kind) if !type_matches(kind, value) => {
                let (error_type, message) = type_error(kind);
                errors.push(array_error(error_type, message, &at));
            }
            Some(_) => {
                if let Some(options) = rules.options.get(key)
                    && !value.as_str().is_some_and(|v| options.iter().any(|o| o == v))
                {
                    errors.push(invalid_option(options, at));
                }
            }
            None if key.starts_with("cf_") && rules.custom_fields == CustomFields::Any => {}
            None if key.starts_with("cf_") => {
                errors.push(array_error("INVALID_FIELDS", "Custom fields are not accepted on this event.", &at));
            }
            None if rules.allow_other_keys => {}
            None => errors.push(array_error("INVALID_FIELDS", "Field does not exist.", &at)),
        }
    }
}

impl RdStation {
    /// Validates one event; errors carry `path` prefixed with `prefix` (`$.body` or `$[i]`).
    fn validate_event(&self, event: &Value, prefix: &str, only: Option<&str>) -> Vec<Value> {
        let mut errors = Vec::new();
        let accepted = match only {
            Some(t) => vec![t],
            None => self.event_schema.accepted(self.config.legacy_ecommerce_events),
        };
        let event_type = event.get("event_type").and_then(Value::as_str).unwrap_or_default();
        let Some(rules) = self.event_schema.events.get(event_type).filter(|_| accepted.contains(&event_type)) else {
            errors.push(invalid_option(&accepted, format!("{prefix}.event_type")));
            return errors;
        };
        if event.get("event_family").and_then(Value::as_str) != Some("CDP") {
            errors.push(invalid_option(&["CDP"], format!("{prefix}.event_family")));
        }
        let Some(payload) = event.get("payload").and_then(Value::as_object) else {
            errors.push(array_error("CANNOT_BE_NULL", "Cannot be null.", &format!("{prefix}.payload")));
            return errors;
        };
        check_object(payload, &rules.payload, &format!("{prefix}.payload"), &mut errors);
        if let (Some(item_rules), Some(items)) = (&rules.items, payload.get("items").and_then(Value::as_array)) {
            for (i, item) in items.iter().enumerate() {
                let at = format!("{prefix}.payload.items[{i}]");
                match item.as_object() {
                    Some(item) => check_object(item, item_rules, &at, &mut errors),
                    None => errors.push(array_error("MUST_BE_OBJECT", "Must be an object.", &at)),
                }
            }
        }
        errors
    }

    fn record_event(&mut self, event: &Value) -> String {
        let uuid = self.uuid();
        let mut stored = event.clone();
        stored["event_uuid"] = json!(uuid);
        stored["received_at_ms"] = json!(now_ms());
        if event["event_type"] == "CONVERSION"
            && let Some(email) = event["payload"].get("email").and_then(Value::as_str)
            && self.find(&format!("email:{email}")).is_none()
        {
            let id = self.uuid();
            let mut fields = Map::new();
            fields.insert("email".into(), json!(email));
            if let Some(name) = event["payload"].get("name") {
                fields.insert("name".into(), name.clone());
            }
            self.contacts
                .insert(id.clone(), Contact { uuid: id, fields, funnel: default_funnel(), created_ms: now_ms() });
        }
        self.events.push(stored);
        uuid
    }

    /// `POST /platform/events` (`batch: false`), `/platform/events/batch`, and API-key
    /// conversions (`only: Some("CONVERSION")`).
    pub(super) fn events(&mut self, body: &Value, body_len: usize, batch: bool, only: Option<&str>) -> RdResponse {
        if body_len > BODY_LIMIT {
            return RdResponse::flat(413, "REQUEST_ENTITY_TOO_LARGE", "The request body must be at most 0.2 MB.");
        }
        if !batch {
            let errors = self.validate_event(body, "$.body", only);
            if !errors.is_empty() {
                return RdResponse::array(400, errors);
            }
            let uuid = self.record_event(body);
            return RdResponse::json(200, json!({"event_uuid": uuid}));
        }
        let Some(events) = body.as_array() else {
            return RdResponse::flat(400, "BAD_REQUEST", "The batch must be a JSON array of events.");
        };
        let errors: Vec<Value> =
            events.iter().enumerate().flat_map(|(i, e)| self.validate_event(e, &format!("$[{i}]"), None)).collect();
        if !errors.is_empty() {
            return RdResponse::array(400, errors);
        }
        let uuids: Vec<Value> = events.iter().map(|e| json!({"event_uuid": self.record_event(e)})).collect();
        let batch = self.uuid();
        RdResponse::json(200, json!({"event_batch_uuid": batch, "events": uuids}))
    }
}
