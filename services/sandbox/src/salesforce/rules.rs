//! Platform rules that go beyond "the field exists and is filled": the Order lifecycle
//! (inserted as Draft, activation needs items, an activated order is locked), price book
//! entries that must be active, restricted picklists, and Person Accounts (an Account with a
//! person record type carries a hidden Contact).

use serde_json::{Map, Value, json};

use super::model::{Org, SaveError, SfRecord};
use super::schema::{BUSINESS_RECORD_TYPE, PERSON_RECORD_TYPE};

/// Order header fields that cannot change once the order is activated.
const LOCKED_WHEN_ACTIVATED: &[&str] = &["AccountId", "Pricebook2Id", "CurrencyIsoCode"];

fn is_activated(order: &SfRecord) -> bool {
    order.fields.get("Status").and_then(Value::as_str) == Some("Activated")
}

fn order_locked() -> SaveError {
    SaveError::new(
        "ENTITY_IS_LOCKED",
        "Unable to modify activated or superseded Order: cannot delete Order, or add or remove Order Products",
    )
}

impl Org {
    /// Checks a save of `object` (`fields` merged with the stored record; `existing` = its id).
    pub(super) fn check_rules(
        &self,
        object: &str,
        fields: &Map<String, Value>,
        existing: Option<&str>,
    ) -> Result<(), SaveError> {
        for field in self.schema.fields(object).iter().filter(|f| !f.picklist_values.is_empty()) {
            if let Some(Value::String(v)) = fields.get(&field.name)
                && !field.picklist_values.contains(v)
            {
                return Err(SaveError::new(
                    "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                    format!("{}: bad value for restricted picklist field: {v}", field.name),
                )
                .with_fields(&[&field.name]));
            }
        }
        match object {
            "Order" => self.check_order(fields, existing),
            "OrderItem" => self.check_order_item(fields, existing),
            "Account" => self.check_account(fields),
            _ => Ok(()),
        }
    }

    fn check_order(&self, fields: &Map<String, Value>, existing: Option<&str>) -> Result<(), SaveError> {
        let status = fields.get("Status").and_then(Value::as_str);
        let Some(id) = existing else {
            if status != Some("Draft") {
                return Err(SaveError::new(
                    "FIELD_INTEGRITY_EXCEPTION",
                    "You can't create an order that isn't in Draft status. Create it as Draft, add order products, then activate it.",
                )
                .with_fields(&["Status"]));
            }
            return Ok(());
        };
        let Some(stored) = self.records.get(id) else { return Ok(()) };
        if is_activated(stored)
            && status == Some("Activated")
            && let Some(field) = LOCKED_WHEN_ACTIVATED.iter().find(|f| fields.get(**f) != stored.fields.get(**f))
        {
            return Err(SaveError::new(
                "FIELD_INTEGRITY_EXCEPTION",
                format!("You can't change {field} on an activated order."),
            )
            .with_fields(&[field]));
        }
        if !is_activated(stored) && status == Some("Activated") {
            let has_items = self.matching("OrderItem", "OrderId", id).next().is_some();
            if !has_items {
                return Err(SaveError::new(
                    "FIELD_INTEGRITY_EXCEPTION",
                    "You can't activate an order that has no order products.",
                )
                .with_fields(&["Status"]));
            }
        }
        Ok(())
    }

    fn check_order_item(&self, fields: &Map<String, Value>, existing: Option<&str>) -> Result<(), SaveError> {
        let order = fields.get("OrderId").and_then(Value::as_str).and_then(|id| self.get("Order", id));
        if order.is_some_and(is_activated) {
            return Err(match existing {
                None => order_locked(),
                Some(_) => SaveError::new(
                    "ENTITY_IS_LOCKED",
                    "Unable to modify activated or superseded Order: cannot change Order Products",
                ),
            });
        }
        let entry =
            fields.get("PricebookEntryId").and_then(Value::as_str).and_then(|id| self.get("PricebookEntry", id));
        if existing.is_none() && entry.is_some_and(|e| e.fields.get("IsActive") != Some(&json!(true))) {
            return Err(SaveError::new(
                "FIELD_INTEGRITY_EXCEPTION",
                "field integrity exception: PricebookEntryId (pricebook entry is inactive)",
            )
            .with_fields(&["PricebookEntryId"]));
        }
        Ok(())
    }

    /// Refuses deleting an item of an activated order.
    pub(super) fn check_delete(&self, record: &SfRecord) -> Result<(), SaveError> {
        let order_id = match record.object.as_str() {
            "Order" => Some(record.id.as_str()),
            "OrderItem" => record.fields.get("OrderId").and_then(Value::as_str),
            _ => None,
        };
        match order_id.and_then(|id| self.get("Order", id)) {
            Some(order) if is_activated(order) => Err(order_locked()),
            _ => Ok(()),
        }
    }

    fn check_account(&self, fields: &Map<String, Value>) -> Result<(), SaveError> {
        if !self.schema.person_accounts || is_person(fields) {
            return Ok(());
        }
        let person_field = fields.iter().find(|(k, v)| {
            !v.is_null()
                && (k.ends_with("__pc")
                    || k.starts_with("Person") && k.as_str() != "PersonContactId"
                    || matches!(k.as_str(), "FirstName" | "LastName" | "Salutation"))
        });
        match person_field {
            Some((name, _)) => Err(SaveError::new(
                "INVALID_FIELD",
                format!("{name} is a person account field and cannot be set on a business account"),
            )
            .with_fields(&[name])),
            None => Ok(()),
        }
    }

    /// Fills what the platform derives for a person account before it is validated: `Name`
    /// from first and last name, `IsPersonAccount`. `LastName` is required instead of `Name`.
    pub(super) fn derive_person_fields(&self, object: &str, fields: &mut Map<String, Value>) -> Result<(), SaveError> {
        if object != "Account" || !self.schema.person_accounts {
            return Ok(());
        }
        let person = is_person(fields);
        fields.insert("IsPersonAccount".into(), json!(person));
        if !person {
            return Ok(());
        }
        let last = fields.get("LastName").and_then(Value::as_str).filter(|s| !s.is_empty());
        let Some(last) = last else {
            return Err(SaveError::new("REQUIRED_FIELD_MISSING", "Required fields are missing: [LastName]")
                .with_fields(&["LastName"]));
        };
        let name = match fields.get("FirstName").and_then(Value::as_str).filter(|s| !s.is_empty()) {
            Some(first) => format!("{first} {last}"),
            None => last.to_owned(),
        };
        fields.insert("Name".into(), json!(name));
        Ok(())
    }

    /// Creates or refreshes the hidden Contact of a person account.
    pub(super) fn sync_person_contact(&mut self, account_id: &str, now: i64) {
        let Some(account) = self.records.get(account_id).filter(|r| r.object == "Account") else { return };
        if account.fields.get("IsPersonAccount") != Some(&json!(true)) {
            return;
        }
        let mut contact = Map::new();
        for (from, to) in [("FirstName", "FirstName"), ("LastName", "LastName"), ("PersonEmail", "Email")] {
            if let Some(v) = account.fields.get(from) {
                contact.insert(to.into(), v.clone());
            }
        }
        for (k, v) in account.fields.iter().filter(|(k, _)| k.ends_with("__pc")) {
            contact.insert(format!("{}c", k.trim_end_matches("pc")), v.clone());
        }
        contact.insert("AccountId".into(), json!(account_id));
        contact.insert("IsPersonAccount".into(), json!(true));
        match account.fields.get("PersonContactId").and_then(Value::as_str).map(str::to_owned) {
            Some(contact_id) => {
                if let Some(mut record) = self.records.get(&contact_id).cloned() {
                    record.fields.extend(contact);
                    record.modified_ms = now;
                    self.replace(record);
                }
            }
            None => {
                let contact_id = self.insert("Contact", contact, now);
                if let Some(mut account) = self.records.get(account_id).cloned() {
                    account.fields.insert("PersonContactId".into(), json!(contact_id));
                    self.replace(account);
                }
            }
        }
    }

    /// Turns Person Accounts on or off, seeding Account's record types when on.
    pub fn set_person_accounts(&mut self, on: bool) {
        self.schema.person_accounts = on;
        if !on {
            return;
        }
        for (id, name, developer, person) in [
            (BUSINESS_RECORD_TYPE, "Business Account", "Business_Account", false),
            (PERSON_RECORD_TYPE, "Person Account", "PersonAccount", true),
        ] {
            let fields = json!({"Name": name, "DeveloperName": developer, "SobjectType": "Account", "IsActive": true, "IsPersonType": person});
            let fields = fields.as_object().cloned().unwrap_or_default();
            if !self.records.contains_key(id) {
                self.replace(SfRecord {
                    id: id.to_owned(),
                    object: "RecordType".into(),
                    fields,
                    created_ms: 0,
                    modified_ms: 0,
                });
            }
        }
    }
}

fn is_person(fields: &Map<String, Value>) -> bool {
    fields.get("RecordTypeId").and_then(Value::as_str) == Some(PERSON_RECORD_TYPE)
}
