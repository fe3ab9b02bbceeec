//! Contacts (POST create, PATCH upsert replacing tags, `/tag` append, funnel) and the
//! account's contact fields (`GET`/`POST /platform/contacts/fields`): a contact write may use
//! the standard fields and the `cf_*` fields the account has, nothing else.

use axum::http::Method;
use serde_json::{Map, Value, json};

use super::{Contact, RdResponse, RdStation, array_error, default_funnel, invalid_json, percent};
use crate::now_ms;

/// The embedded default custom fields of the account.
const SEEDED_FIELDS: &str = include_str!("../../data/rdstation-contact-fields.json");

/// Standard contact fields and whether they take a string (the others are checked apart).
const STANDARD_FIELDS: &[&str] = &[
    "name",
    "email",
    "job_title",
    "bio",
    "website",
    "linkedin",
    "facebook",
    "twitter",
    "personal_phone",
    "mobile_phone",
    "city",
    "state",
    "country",
    "birthdate",
    "tags",
    "extra_emails",
    "legal_bases",
];

const LEGAL_BASIS_TYPES: &[&str] = &[
    "pre_existent_contract",
    "consent",
    "legitimate_interest",
    "judicial_process",
    "vital_interest",
    "public_interest",
];
const DATA_TYPES: &[&str] = &["STRING", "INTEGER", "BOOLEAN", "STRING[]"];
const PRESENTATION_TYPES: &[&str] = &[
    "TEXT_INPUT",
    "TEXT_AREA",
    "URL_INPUT",
    "PHONE_INPUT",
    "EMAIL_INPUT",
    "CHECK_BOX",
    "NUMBER_INPUT",
    "COMBO_BOX",
    "RADIO_BUTTON",
    "MULTIPLE_CHOICE",
];

/// A custom contact field of the account.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ContactField {
    #[serde(default)]
    pub uuid: String,
    pub api_identifier: String,
    pub data_type: String,
    pub presentation_type: String,
    pub name: Value,
    #[serde(default)]
    pub label: Value,
}

impl ContactField {
    fn to_json(&self) -> Value {
        let label = if self.label.is_null() { self.name.clone() } else { self.label.clone() };
        json!({"uuid": self.uuid, "api_identifier": self.api_identifier, "custom_field": true, "data_type": self.data_type,
            "name": self.name, "label": label, "presentation_type": self.presentation_type, "validation_rules": {}})
    }

    fn accepts(&self, value: &Value) -> bool {
        match self.data_type.as_str() {
            "INTEGER" => value.is_i64() || value.is_u64(),
            "BOOLEAN" => value.is_boolean(),
            "STRING[]" => value.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
            _ => value.is_string(),
        }
    }
}

/// The account's starting custom fields.
pub fn seeded_fields() -> Vec<ContactField> {
    #[derive(serde::Deserialize)]
    struct Seed {
        fields: Vec<ContactField>,
    }
    let seed: Seed = serde_json::from_str(SEEDED_FIELDS).expect("the embedded RD Station contact fields are valid");
    seed.fields
        .into_iter()
        .enumerate()
        .map(|(i, mut f)| {
            f.uuid = format!("00000000-0000-4000-a000-{:012x}", i + 1);
            f
        })
        .collect()
}

/// `{"errors": {"tags": [...]}}` for a tag list.
fn tags_error(error_type: &str, message: &str) -> RdResponse {
    RdResponse::field(400, "tags", error_type, message)
}

/// Tags must be lower-case strings, each once.
fn check_tags(value: &Value) -> Result<Vec<String>, RdResponse> {
    let Some(tags) = value.as_array().filter(|t| t.iter().all(Value::is_string)) else {
        return Err(tags_error("MUST_BE_ARRAY_OF_STRINGS", "Must be an array of strings."));
    };
    let tags: Vec<String> = tags.iter().filter_map(Value::as_str).map(str::to_owned).collect();
    if tags.iter().any(|t| t.chars().any(char::is_uppercase)) {
        return Err(tags_error("VALUES_MUST_BE_LOWERCASE", "Values must be lowercase."));
    }
    if tags.iter().enumerate().any(|(i, t)| tags[..i].contains(t)) {
        return Err(tags_error("VALUES_MUST_BE_UNIQUE", "Values must be unique."));
    }
    Ok(tags)
}

impl RdStation {
    fn validate_contact(&self, body: &Map<String, Value>) -> Result<(), RdResponse> {
        let unknown: Vec<&str> = body
            .keys()
            .map(String::as_str)
            .filter(|k| !STANDARD_FIELDS.contains(k) && !self.fields.iter().any(|f| f.api_identifier == *k))
            .collect();
        if !unknown.is_empty() {
            return Err(RdResponse::flat(
                400,
                "INVALID_FIELDS",
                &format!("Payload contains fields that do not exist: ({})", unknown.join(", ")),
            ));
        }
        for (key, value) in body.iter().filter(|(_, v)| !v.is_null()) {
            match key.as_str() {
                "tags" => {
                    check_tags(value)?;
                }
                "extra_emails" => {
                    if !value.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
                        return Err(RdResponse::field(
                            400,
                            key,
                            "MUST_BE_ARRAY_OF_STRINGS",
                            "Must be an array of strings.",
                        ));
                    }
                }
                "legal_bases" => {
                    let ok = value.as_array().is_some_and(|items| {
                        items.iter().all(|b| {
                            b.get("category").and_then(Value::as_str) == Some("communications")
                                && b.get("type").and_then(Value::as_str).is_some_and(|t| LEGAL_BASIS_TYPES.contains(&t))
                                && matches!(b.get("status").and_then(Value::as_str), Some("granted" | "declined"))
                        })
                    });
                    if !ok {
                        return Err(RdResponse::field(400, key, "INVALID", "Invalid legal bases."));
                    }
                }
                k if k.starts_with("cf_") => {
                    let field = self.fields.iter().find(|f| f.api_identifier == k).expect("checked above");
                    if !field.accepts(value) {
                        return Err(RdResponse::field(400, key, "INVALID", "Invalid value for the field's data type."));
                    }
                }
                _ => {
                    if !value.is_string() {
                        return Err(RdResponse::field(400, key, "MUST_BE_STRING", "Must be a string."));
                    }
                }
            }
        }
        Ok(())
    }

    /// `GET`/`POST /platform/contacts/fields`.
    fn contact_fields(&mut self, method: &Method, body: &Value) -> RdResponse {
        if method == Method::GET {
            let standard = STANDARD_FIELDS.iter().map(|f| {
                json!({"api_identifier": f, "custom_field": false, "data_type": if matches!(*f, "tags" | "extra_emails") { "STRING[]" } else { "STRING" },
                    "name": {"default": f}, "label": {"default": f}, "presentation_type": "TEXT_INPUT", "validation_rules": {}})
            });
            let fields: Vec<Value> = standard.chain(self.fields.iter().map(ContactField::to_json)).collect();
            return RdResponse::json(200, json!({"fields": fields}));
        }
        let Some(map) = body.as_object() else { return invalid_json() };
        let text = |k: &str| map.get(k).and_then(Value::as_str).map(str::to_owned);
        let Some(api_identifier) = text("api_identifier") else {
            return RdResponse::array(
                400,
                vec![array_error("CANNOT_BE_NULL", "Cannot be null.", "body.api_identifier")],
            );
        };
        if !api_identifier.starts_with("cf_") || api_identifier.len() <= 3 {
            return RdResponse::field(400, "api_identifier", "INVALID", "Must start with cf_.");
        }
        if self.fields.iter().any(|f| f.api_identifier == api_identifier) {
            return RdResponse::field(400, "api_identifier", "TAKEN", "has already been taken");
        }
        let data_type = text("data_type").unwrap_or_default();
        if !DATA_TYPES.contains(&data_type.as_str()) {
            return RdResponse::array(
                400,
                vec![
                    json!({"error_type": "INVALID_OPTION", "error_message": "Must be one of the valid options.", "validation_rules": {"valid_options": DATA_TYPES}, "path": "$.body.data_type"}),
                ],
            );
        }
        let presentation_type = text("presentation_type").unwrap_or_default();
        if !PRESENTATION_TYPES.contains(&presentation_type.as_str()) {
            return RdResponse::array(
                400,
                vec![
                    json!({"error_type": "INVALID_OPTION", "error_message": "Must be one of the valid options.", "validation_rules": {"valid_options": PRESENTATION_TYPES}, "path": "$.body.presentation_type"}),
                ],
            );
        }
        let Some(name) = map.get("name").filter(|n| n.is_object()).cloned() else {
            return RdResponse::array(400, vec![array_error("CANNOT_BE_NULL", "Cannot be null.", "body.name")]);
        };
        let field = ContactField {
            uuid: self.uuid(),
            api_identifier,
            data_type,
            presentation_type,
            name,
            label: map.get("label").cloned().unwrap_or(Value::Null),
        };
        let out = field.to_json();
        self.fields.push(field);
        RdResponse::json(200, out)
    }

    pub(super) fn contacts(&mut self, method: &Method, rest: &[&str], body: &Value) -> RdResponse {
        if let Err(e) = Self::limit(&mut self.contact_calls, self.config.contacts_per_minute, 60_000) {
            return e;
        }
        match (method.as_str(), rest) {
            ("GET" | "POST", ["fields"]) => self.contact_fields(method, body),
            ("POST", []) => {
                let Some(map) = body.as_object() else { return invalid_json() };
                let Some(email) = map.get("email").and_then(Value::as_str).filter(|e| !e.is_empty()) else {
                    return RdResponse::array(
                        400,
                        vec![array_error("CANNOT_BE_NULL", "Cannot be null.", "body.email")],
                    );
                };
                if let Err(e) = self.validate_contact(map) {
                    return e;
                }
                if self.find(&format!("email:{email}")).is_some() {
                    return RdResponse::flat(400, "EMAIL_ALREADY_IN_USE", "Email already in use.");
                }
                let uuid = self.uuid();
                let contact =
                    Contact { uuid: uuid.clone(), fields: map.clone(), funnel: default_funnel(), created_ms: now_ms() };
                let out = contact.to_json();
                self.contacts.insert(uuid, contact);
                RdResponse::json(200, out)
            }
            ("GET", [identifier]) => match self.find(&percent(identifier)) {
                Some(uuid) => RdResponse::json(200, self.contacts[&uuid].to_json()),
                None => Self::not_found(),
            },
            ("DELETE", [identifier]) => match self.find(&percent(identifier)) {
                Some(uuid) => {
                    self.contacts.remove(&uuid);
                    RdResponse { status: 204, body: None, headers: Vec::new() }
                }
                None => Self::not_found(),
            },
            ("PATCH", [identifier]) => self.upsert(&percent(identifier), body),
            ("POST", [identifier, "tag"]) => self.add_tags(&percent(identifier), body),
            ("GET", [identifier, "funnels", "default"]) => match self.find(&percent(identifier)) {
                Some(uuid) => RdResponse::json(200, self.contacts[&uuid].funnel.clone()),
                None => Self::not_found(),
            },
            ("PUT", [identifier, "funnels", "default"]) => self.set_funnel(&percent(identifier), body),
            _ => RdResponse::flat(404, "RESOURCE_NOT_FOUND", "Resource not found."),
        }
    }

    /// `PATCH /platform/contacts/{id}:{value}`: creates by e-mail when missing; replaces tags.
    fn upsert(&mut self, identifier: &str, body: &Value) -> RdResponse {
        let Some(map) = body.as_object() else { return invalid_json() };
        let (kind, value) = identifier.split_once(':').unwrap_or(("uuid", identifier));
        if map.contains_key(kind) {
            return RdResponse::flat(
                400,
                "CONFLICTING_FIELD",
                &format!("The {kind} is already used to identify the contact and cannot be in the payload."),
            );
        }
        if let Err(e) = self.validate_contact(map) {
            return e;
        }
        // RD limits PATCH per contact, however it is identified (`email:` or `uuid:`); a
        // contact about to be created has no calls yet.
        let found = self.find(identifier);
        if let Some(uuid) = &found {
            let window = self.patches.entry(uuid.clone()).or_default();
            if let Err(e) = Self::limit(window, self.config.patches_per_contact_per_day, 86_400_000) {
                return e;
            }
        }
        let uuid = match found {
            Some(uuid) => uuid,
            None if kind == "email" => {
                let uuid = self.uuid();
                let mut fields = Map::new();
                fields.insert("email".into(), json!(value));
                self.contacts.insert(
                    uuid.clone(),
                    Contact { uuid: uuid.clone(), fields, funnel: default_funnel(), created_ms: now_ms() },
                );
                self.patches.entry(uuid.clone()).or_default().push_back(now_ms());
                uuid
            }
            None => return Self::not_found(),
        };
        let contact = self.contacts.get_mut(&uuid).expect("found above");
        for (k, v) in map {
            // Upsert replaces tags (the documented trap: partial lists wipe tags).
            contact.fields.insert(k.clone(), v.clone());
        }
        RdResponse::json(200, contact.to_json())
    }

    /// `POST /platform/contacts/{id}:{value}/tag`: appends; a tag the contact has is refused.
    fn add_tags(&mut self, identifier: &str, body: &Value) -> RdResponse {
        let tags = match check_tags(body.get("tags").unwrap_or(&Value::Null)) {
            Ok(tags) => tags,
            Err(e) => return e,
        };
        let Some(uuid) = self.find(identifier) else { return Self::not_found() };
        // "Limite de requisições da API": 24 per contact and 15,000 per account in 24 h.
        const DAY_MS: i64 = 86_400_000;
        let per_contact = self.tag_posts.entry(uuid.clone()).or_default();
        if let Err(e) = Self::limit(per_contact, self.config.tags_per_contact_per_day, DAY_MS)
            .and_then(|()| Self::limit(&mut self.account_tag_posts, self.config.tags_per_account_per_day, DAY_MS))
        {
            return e;
        }
        let contact = self.contacts.get_mut(&uuid).expect("found above");
        let list = contact.fields.entry("tags").or_insert(json!([]));
        let list = list.as_array_mut().expect("tags are an array");
        if tags.iter().any(|t| list.contains(&json!(t))) {
            return tags_error("VALUES_MUST_BE_UNIQUE", "Values must be unique.");
        }
        list.extend(tags.into_iter().map(Value::String));
        RdResponse::json(200, json!({"tags": list}))
    }

    fn set_funnel(&mut self, identifier: &str, body: &Value) -> RdResponse {
        let Some(uuid) = self.find(identifier) else { return Self::not_found() };
        let stage = body.get("lifecycle_stage").and_then(Value::as_str);
        if !matches!(stage, Some("Lead" | "Qualified Lead" | "Client")) {
            return RdResponse::array(
                400,
                vec![
                    json!({"error_type": "INVALID_OPTION", "error_message": "Must be one of the valid options.", "validation_rules": {"valid_options": ["Lead", "Qualified Lead", "Client"]}, "path": "$.body.lifecycle_stage"}),
                ],
            );
        }
        let contact = self.contacts.get_mut(&uuid).expect("found above");
        contact.funnel["lifecycle_stage"] = json!(stage);
        if let Some(o) = body.get("opportunity").and_then(Value::as_bool) {
            contact.funnel["opportunity"] = json!(o);
        }
        if let Some(owner) = body.get("contact_owner_email") {
            contact.funnel["contact_owner_email"] = owner.clone();
        }
        RdResponse::json(200, contact.funnel.clone())
    }
}
