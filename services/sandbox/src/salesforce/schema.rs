//! The org's schema: which objects and fields exist, their types and flags (External ID,
//! unique, case-sensitive, idLookup, createable/updateable), as `GET /sobjects` and
//! `/sobjects/{obj}/describe` report them. Standard objects come from
//! `data/salesforce-standard-objects.json`, custom objects and `__c` fields from
//! `data/salesforce-custom.json` (or another file) and the control API.
//!
//! With Person Accounts on (an org setting), Account also carries the person fields
//! (`FirstName`, `LastName`, `PersonEmail`, ..., `IsPersonAccount`, `PersonContactId`,
//! `RecordTypeId`) and every custom Contact field `X__c` as `X__pc` ("Person Accounts", SOAP
//! API guide).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Embedded defaults, so the binary runs without its data directory.
const STANDARD_OBJECTS: &str = include_str!("../../data/salesforce-standard-objects.json");
const CUSTOM_OBJECTS: &str = include_str!("../../data/salesforce-custom.json");

/// Fields every object has, maintained by the platform.
const SYSTEM_FIELDS: &[(&str, &str)] =
    &[("Id", "id"), ("CreatedDate", "datetime"), ("LastModifiedDate", "datetime"), ("SystemModstamp", "datetime")];

/// Account fields Person Accounts add (name, type).
const PERSON_FIELDS: &[(&str, &str)] = &[
    ("FirstName", "string"),
    ("LastName", "string"),
    ("Salutation", "picklist"),
    ("PersonEmail", "email"),
    ("PersonMobilePhone", "phone"),
    ("PersonHomePhone", "phone"),
    ("PersonBirthdate", "date"),
    ("PersonMailingStreet", "textarea"),
    ("PersonMailingCity", "string"),
    ("PersonMailingState", "string"),
    ("PersonMailingPostalCode", "string"),
    ("PersonMailingCountry", "string"),
    ("PersonHasOptedOutOfEmail", "boolean"),
    ("PersonLeadSource", "picklist"),
];

fn yes() -> bool {
    true
}

/// One field.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FieldSchema {
    pub name: String,
    #[serde(default)]
    pub label: Option<String>,
    #[serde(rename = "type", default = "default_type")]
    pub kind: String,
    /// Required on create (not nillable, no default).
    #[serde(default)]
    pub required: bool,
    #[serde(default = "yes")]
    pub createable: bool,
    #[serde(default = "yes")]
    pub updateable: bool,
    #[serde(default)]
    pub external_id: bool,
    #[serde(default)]
    pub unique: bool,
    /// Only meaningful with `unique`: "Treat ABC and abc as different values".
    #[serde(default)]
    pub case_sensitive: bool,
    /// Standard fields usable to match records in upserts (Contact.Email, Account.Name, ...).
    #[serde(default)]
    pub id_lookup: bool,
    #[serde(default)]
    pub reference_to: Option<String>,
    #[serde(default)]
    pub picklist_values: Vec<String>,
}

fn default_type() -> String {
    "string".into()
}

impl FieldSchema {
    fn system(name: &str, kind: &str) -> Self {
        Self {
            name: name.into(),
            label: None,
            kind: kind.into(),
            required: false,
            createable: false,
            updateable: false,
            external_id: false,
            unique: false,
            case_sensitive: false,
            id_lookup: name == "Id",
            reference_to: None,
            picklist_values: Vec::new(),
        }
    }

    fn plain(name: &str, kind: &str) -> Self {
        Self { createable: true, updateable: true, id_lookup: false, ..Self::system(name, kind) }
    }

    pub fn custom(&self) -> bool {
        self.name.ends_with("__c") || self.name.ends_with("__pc")
    }

    /// Text comparisons on this field ignore case (all but unique case-sensitive fields).
    pub fn case_insensitive(&self) -> bool {
        !(self.unique && self.case_sensitive)
    }

    /// `Account` for `AccountId`, `Account__r` for `Account__c`.
    pub fn relationship_name(&self) -> Option<String> {
        self.reference_to.as_ref()?;
        match self.name.strip_suffix("__c") {
            Some(stem) => Some(format!("{stem}__r")),
            None => self.name.strip_suffix("Id").map(str::to_owned),
        }
    }

    fn describe(&self) -> Value {
        let label = self.label.clone().unwrap_or_else(|| self.name.clone());
        let length = match self.kind.as_str() {
            "string" | "phone" | "url" | "email" | "picklist" => 255,
            "textarea" => 32_000,
            "id" | "reference" => 18,
            _ => 0,
        };
        json!({
            "name": self.name, "label": label, "type": self.kind, "length": length,
            "nillable": !self.required && self.kind != "boolean" && self.name != "Id",
            "createable": self.createable, "updateable": self.updateable, "custom": self.custom(),
            "externalId": self.external_id, "unique": self.unique, "caseSensitive": self.unique && self.case_sensitive,
            "idLookup": self.id_lookup || self.external_id, "filterable": true, "sortable": self.kind != "textarea",
            "defaultedOnCreate": !self.createable || self.kind == "boolean", "calculated": false,
            "referenceTo": self.reference_to.iter().collect::<Vec<_>>(), "relationshipName": self.relationship_name(),
            "picklistValues": self.picklist_values.iter().map(|v| json!({"value": v, "label": v, "active": true, "defaultValue": false})).collect::<Vec<_>>(),
        })
    }
}

/// One object.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectSchema {
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub key_prefix: Option<String>,
    #[serde(default = "yes")]
    pub createable: bool,
    #[serde(default)]
    pub fields: Vec<FieldSchema>,
}

/// The org's objects.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Schema {
    pub objects: BTreeMap<String, ObjectSchema>,
    /// Person Accounts enabled (an org setting that cannot be undone in a real org).
    #[serde(default)]
    pub person_accounts: bool,
}

/// Why a schema file or a control-API change was refused.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("invalid schema json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Deserialize)]
struct SchemaFile {
    objects: BTreeMap<String, ObjectSchema>,
}

impl Default for Schema {
    fn default() -> Self {
        Self::load(CUSTOM_OBJECTS).expect("the embedded Salesforce schema is valid")
    }
}

impl Schema {
    /// Standard objects plus the custom objects and fields of `custom_json`.
    pub fn load(custom_json: &str) -> Result<Self, SchemaError> {
        let standard: SchemaFile = serde_json::from_str(STANDARD_OBJECTS)?;
        let mut schema = Self { objects: standard.objects, person_accounts: false };
        let custom: SchemaFile = serde_json::from_str(custom_json)?;
        for (name, object) in custom.objects {
            if schema.objects.contains_key(&name) {
                for field in object.fields {
                    schema.add_field(&name, field)?;
                }
            } else {
                schema.add_object(&name, object)?;
            }
        }
        Ok(schema)
    }

    /// Declares a custom object (`Name__c`); it gets a `Name` field like every custom object.
    pub fn add_object(&mut self, name: &str, mut object: ObjectSchema) -> Result<(), SchemaError> {
        if !name.ends_with("__c") || name.len() <= 3 {
            return Err(SchemaError::Invalid(format!("custom object names end in __c: {name}")));
        }
        if self.objects.contains_key(name) {
            return Err(SchemaError::Invalid(format!("object {name} already exists")));
        }
        let fields = std::mem::take(&mut object.fields);
        if !fields.iter().any(|f| f.name == "Name") {
            object.fields.push(FieldSchema { id_lookup: true, ..FieldSchema::plain("Name", "string") });
        }
        let n = self.objects.values().filter(|o| o.key_prefix.as_deref().is_some_and(|p| p.starts_with('a'))).count();
        object.key_prefix.get_or_insert_with(|| format!("a{:02}", n + 1));
        self.objects.insert(name.to_owned(), object);
        for field in fields {
            self.add_field(name, field)?;
        }
        Ok(())
    }

    /// Declares a custom field (`Name__c`) on an existing object.
    pub fn add_field(&mut self, object: &str, field: FieldSchema) -> Result<(), SchemaError> {
        if !field.name.ends_with("__c") || field.name.len() <= 3 {
            return Err(SchemaError::Invalid(format!("custom field names end in __c: {}", field.name)));
        }
        if let Some(target) = &field.reference_to
            && !self.objects.contains_key(target)
        {
            return Err(SchemaError::Invalid(format!("reference to unknown object {target}")));
        }
        let target =
            self.objects.get_mut(object).ok_or_else(|| SchemaError::Invalid(format!("no such object {object}")))?;
        if target.fields.iter().any(|f| f.name == field.name) {
            return Err(SchemaError::Invalid(format!("field {object}.{} already exists", field.name)));
        }
        target.fields.push(field);
        Ok(())
    }

    pub fn object_exists(&self, name: &str) -> bool {
        self.objects.contains_key(name)
    }

    pub fn key_prefix(&self, object: &str) -> String {
        self.objects.get(object).and_then(|o| o.key_prefix.clone()).unwrap_or_else(|| "a00".into())
    }

    /// Every field of `object`, system and person fields included.
    pub fn fields(&self, object: &str) -> Vec<FieldSchema> {
        let Some(def) = self.objects.get(object) else { return Vec::new() };
        let mut out: Vec<FieldSchema> = SYSTEM_FIELDS.iter().map(|(n, k)| FieldSchema::system(n, k)).collect();
        out.extend(def.fields.iter().cloned());
        if self.person_accounts {
            match object {
                "Account" => {
                    out.extend(PERSON_FIELDS.iter().map(|(n, k)| FieldSchema::plain(n, k)));
                    out.push(FieldSchema::system("IsPersonAccount", "boolean"));
                    out.push(FieldSchema {
                        reference_to: Some("Contact".into()),
                        ..FieldSchema::system("PersonContactId", "reference")
                    });
                    out.push(FieldSchema {
                        reference_to: Some("RecordType".into()),
                        ..FieldSchema::plain("RecordTypeId", "reference")
                    });
                    let contact = self.objects.get("Contact").map(|c| c.fields.as_slice()).unwrap_or_default();
                    out.extend(contact.iter().filter(|f| f.name.ends_with("__c")).map(|f| FieldSchema {
                        name: format!("{}pc", f.name.trim_end_matches('c')),
                        // Contact's uniqueness does not carry over to the account.
                        external_id: false,
                        unique: false,
                        ..f.clone()
                    }));
                }
                "Contact" => out.push(FieldSchema::system("IsPersonAccount", "boolean")),
                _ => {}
            }
        }
        out
    }

    pub fn field(&self, object: &str, name: &str) -> Option<FieldSchema> {
        self.fields(object).into_iter().find(|f| f.name == name)
    }

    /// Fields an upsert or a GET by external id can match on: External ID and idLookup fields.
    pub fn matching_field(&self, object: &str, name: &str) -> bool {
        self.field(object, name).is_some_and(|f| f.external_id || f.id_lookup)
    }

    /// `GET /sobjects`.
    pub fn global_describe(&self, version: &str) -> Value {
        let sobjects: Vec<Value> = self.objects.keys().map(|name| self.object_summary(name, version)).collect();
        json!({"encoding": "UTF-8", "maxBatchSize": 200, "sobjects": sobjects})
    }

    fn object_summary(&self, name: &str, version: &str) -> Value {
        let def = &self.objects[name];
        let base = format!("/services/data/{version}/sobjects/{name}");
        json!({
            "name": name, "label": def.label.clone().unwrap_or_else(|| name.to_owned()), "custom": name.ends_with("__c"),
            "keyPrefix": self.key_prefix(name), "createable": def.createable, "updateable": def.createable,
            "deletable": def.createable, "queryable": true, "retrieveable": true, "searchable": true,
            "urls": {"sobject": base, "describe": format!("{base}/describe"), "rowTemplate": format!("{base}/{{ID}}")},
        })
    }

    /// `GET /sobjects/{obj}/describe`, or `None` for an unknown object.
    pub fn describe(&self, object: &str, version: &str) -> Option<Value> {
        self.objects.get(object)?;
        let mut out = self.object_summary(object, version);
        out["fields"] = Value::Array(self.fields(object).iter().map(FieldSchema::describe).collect());
        let record_types: Vec<Value> = if object == "Account" && self.person_accounts {
            vec![
                json!({"name": "Business Account", "developerName": "Business_Account", "recordTypeId": BUSINESS_RECORD_TYPE, "available": true, "defaultRecordTypeMapping": true, "master": false}),
                json!({"name": "Person Account", "developerName": "PersonAccount", "recordTypeId": PERSON_RECORD_TYPE, "available": true, "defaultRecordTypeMapping": false, "master": false}),
            ]
        } else {
            Vec::new()
        };
        out["recordTypeInfos"] = Value::Array(record_types);
        Some(out)
    }
}

/// Record type ids of Account when Person Accounts are on.
pub const BUSINESS_RECORD_TYPE: &str = "012000000000001AAA";
pub const PERSON_RECORD_TYPE: &str = "012000000000002AAA";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_schema_loads_and_person_fields_follow_the_setting() {
        let mut schema = Schema::default();
        assert!(schema.object_exists("Ecommerce_Order__c"));
        assert!(schema.matching_field("Account", "Elo_Id__c"));
        assert!(!schema.matching_field("Account", "Description"));
        assert!(schema.field("Account", "PersonEmail").is_none());
        schema.person_accounts = true;
        assert!(schema.field("Account", "PersonEmail").is_some());
        assert!(schema.field("Account", "Loyalty_Tier__pc").is_some(), "custom Contact fields as __pc");
        for object in schema.objects.keys() {
            let names: Vec<String> = schema.fields(object).into_iter().map(|f| f.name).collect();
            let unique: std::collections::BTreeSet<&String> = names.iter().collect();
            assert_eq!(unique.len(), names.len(), "{object} describes a field twice: {names:?}");
        }
        assert!(schema.add_field("Account", FieldSchema::plain("NotCustom", "string")).is_err());
        assert!(
            schema
                .add_object("Thing", ObjectSchema { label: None, key_prefix: None, createable: true, fields: vec![] })
                .is_err()
        );
    }
}
