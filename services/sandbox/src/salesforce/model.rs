//! The simulated org's data: objects, fields, records, validation rules.

use serde_json::{Map, Value, json};

use super::schema::Schema;
use super::store::{RecordStore, index_text};

/// A response of the simulated API: status, JSON body (absent for 204) and extra headers.
#[derive(Clone, Debug, PartialEq)]
pub struct SfResponse {
    pub status: u16,
    pub body: Option<Value>,
    pub headers: Vec<(String, String)>,
}

impl SfResponse {
    pub fn json(status: u16, body: Value) -> Self {
        Self { status, body: Some(body), headers: Vec::new() }
    }

    /// A CSV body (Bulk API results).
    pub fn csv(status: u16, text: String) -> Self {
        Self { status, body: Some(Value::String(text)), headers: vec![("Content-Type".into(), "text/csv".into())] }
    }

    pub fn empty(status: u16) -> Self {
        Self { status, body: None, headers: Vec::new() }
    }

    /// Salesforce's REST error body: a JSON array of `{message, errorCode, fields?}`.
    pub fn error(status: u16, code: &str, message: impl Into<String>) -> Self {
        Self::json(status, json!([{"message": message.into(), "errorCode": code}]))
    }

    pub fn error_fields(status: u16, code: &str, message: impl Into<String>, fields: &[&str]) -> Self {
        Self::json(status, json!([{"message": message.into(), "errorCode": code, "fields": fields}]))
    }

    pub fn not_found() -> Self {
        Self::error(404, "NOT_FOUND", "The requested resource does not exist")
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A save failure, as it appears in per-row results (`statusCode`) and REST errors (`errorCode`).
#[derive(Clone, Debug, PartialEq)]
pub struct SaveError {
    pub code: &'static str,
    pub message: String,
    pub fields: Vec<String>,
}

impl SaveError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), fields: Vec::new() }
    }

    pub fn with_fields(mut self, fields: &[&str]) -> Self {
        self.fields = fields.iter().map(|f| (*f).to_owned()).collect();
        self
    }

    /// The REST form: `[{"message","errorCode","fields"}]` with HTTP 400 (404 for lookups of
    /// missing resources).
    pub fn response(&self) -> SfResponse {
        let status = if self.code == "NOT_FOUND" { 404 } else { 400 };
        SfResponse::json(status, json!([{"message": self.message, "errorCode": self.code, "fields": self.fields}]))
    }

    /// The per-row form in collections: `{"statusCode","message","fields"}`.
    pub fn row(&self) -> Value {
        json!({"statusCode": self.code, "message": self.message, "fields": self.fields})
    }
}

/// One stored record.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SfRecord {
    pub id: String,
    pub object: String,
    pub fields: Map<String, Value>,
    pub created_ms: i64,
    pub modified_ms: i64,
}

impl SfRecord {
    /// The record as the REST API returns it.
    pub fn to_json(&self, version: &str) -> Value {
        let mut out = Map::new();
        out.insert("attributes".into(), json!({"type": self.object, "url": format!("/services/data/{version}/sobjects/{}/{}", self.object, self.id)}));
        out.insert("Id".into(), json!(self.id));
        for (k, v) in &self.fields {
            out.insert(k.clone(), v.clone());
        }
        out.insert("CreatedDate".into(), json!(format_datetime(self.created_ms)));
        out.insert("LastModifiedDate".into(), json!(format_datetime(self.modified_ms)));
        out.insert("SystemModstamp".into(), json!(format_datetime(self.modified_ms)));
        Value::Object(out)
    }

    pub fn get(&self, field: &str) -> Option<Value> {
        match field {
            "Id" => Some(json!(self.id)),
            "CreatedDate" => Some(json!(format_datetime(self.created_ms))),
            "LastModifiedDate" | "SystemModstamp" => Some(json!(format_datetime(self.modified_ms))),
            _ => self.fields.get(field).cloned(),
        }
    }
}

/// `2026-11-28T12:00:00.000+0000`, Salesforce's datetime format.
pub fn format_datetime(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}+0000", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.sss](Z|+0000|+00:00)` to epoch milliseconds.
pub fn parse_datetime(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| text.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, s) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &text[19..];
    let mut millis = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits: String = frac.chars().take_while(char::is_ascii_digit).collect();
        millis = format!("{digits:0<3}")[..3].parse().ok()?;
        rest = &frac[digits.len()..];
    }
    let offset_secs = match rest {
        "Z" | "+0000" | "+00:00" | "" => 0,
        _ => {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            let digits: String = rest.chars().filter(char::is_ascii_digit).collect();
            if digits.len() != 4 {
                return None;
            }
            sign * (digits[..2].parse::<i64>().ok()? * 3600 + digits[2..].parse::<i64>().ok()? * 60)
        }
    };
    let days = days_from_civil(y, mo, d);
    Some(((days * 86_400 + h * 3600 + mi * 60 + s - offset_secs) * 1000) + millis)
}

// Howard Hinnant's civil calendar algorithms.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Duplicate rule: creating a record of `object` whose `field` equals (case-insensitively) an
/// existing one's is blocked with DUPLICATES_DETECTED.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DuplicateRule {
    pub object: String,
    pub field: String,
}

/// The org's schema and records.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Org {
    /// Objects and fields (kept with the data, so fields added at run time survive restarts).
    #[serde(default)]
    pub schema: Schema,
    /// Records by Id (indexed; read through `Deref`, written through the `Org` methods).
    pub records: RecordStore,
    pub(super) next_id: u64,
    pub duplicate_rules: Vec<DuplicateRule>,
    pub standard_pricebook: String,
}

impl Default for Org {
    fn default() -> Self {
        let mut org = Self {
            schema: Schema::default(),
            records: RecordStore::default(),
            next_id: 1,
            duplicate_rules: vec![DuplicateRule { object: "Contact".into(), field: "Email".into() }],
            standard_pricebook: String::new(),
        };
        let mut fields = Map::new();
        fields.insert("Name".into(), json!("Standard Price Book"));
        fields.insert("IsActive".into(), json!(true));
        fields.insert("IsStandard".into(), json!(true));
        let id = org.insert("Pricebook2", fields, 0);
        org.standard_pricebook = id;
        org
    }
}

impl Org {
    fn new_id(&mut self, object: &str) -> String {
        let n = self.next_id;
        self.next_id += 1;
        format!("{}{:012}AAA", self.schema.key_prefix(object), n)
    }

    pub(super) fn insert(&mut self, object: &str, fields: Map<String, Value>, now: i64) -> String {
        let id = self.new_id(object);
        self.records.put(SfRecord {
            id: id.clone(),
            object: object.to_owned(),
            fields,
            created_ms: now,
            modified_ms: now,
        });
        id
    }

    /// Records of `object` whose `field` equals `value`: ignoring case, as Salesforce matches
    /// external ids, unless the field is unique and case-sensitive.
    pub fn find_by(&self, object: &str, field: &str, value: &str) -> Vec<&SfRecord> {
        let ignore_case = field != "Id" && self.schema.field(object, field).is_none_or(|f| f.case_insensitive());
        let matches = |r: &&SfRecord| match r.get(field) {
            Some(Value::String(s)) if ignore_case => s.to_lowercase() == value.to_lowercase(),
            Some(Value::String(s)) => s == value,
            Some(Value::Number(n)) => n.to_string() == value,
            _ => false,
        };
        match field {
            "Id" => self.get(object, value).into_iter().collect(),
            // Derived fields are not stored, so not indexed.
            "CreatedDate" | "LastModifiedDate" | "SystemModstamp" => {
                self.records.values().filter(|r| r.object == object).filter(matches).collect()
            }
            _ => {
                // Numbers are indexed as written, which lower-casing leaves alone.
                let text = index_text(&Value::String(value.to_owned())).unwrap_or_default();
                self.records.candidates(object, field, &text).filter(matches).collect()
            }
        }
    }

    pub fn get(&self, object: &str, id: &str) -> Option<&SfRecord> {
        self.records.get(id).filter(|r| r.object == object)
    }

    /// Turns a request body into storable fields: refuses unknown and read-only fields and
    /// resolves relationship references by external id (`"Account": {"Ext__c": "1"}`).
    pub fn prepare(&self, object: &str, body: &Map<String, Value>) -> Result<Map<String, Value>, SaveError> {
        let mut out = Map::new();
        for (key, value) in body {
            if key == "attributes" {
                continue;
            }
            let field = self.schema.field(object, key);
            if field.as_ref().is_some_and(|f| !f.createable && !f.updateable) {
                return Err(SaveError::new(
                    "INVALID_FIELD_FOR_INSERT_UPDATE",
                    format!("Unable to create/update fields: {key}. Please check the security settings of this field and verify that it is read/write for your profile or permission set."),
                )
                .with_fields(&[key]));
            }
            let lookup = (value.is_object())
                .then(|| self.schema.fields(object).into_iter().find(|f| f.relationship_name().as_deref() == Some(key)))
                .flatten();
            if let (Some(reference), Some(lookup)) = (value.as_object(), lookup) {
                let target = lookup.reference_to.clone().unwrap_or_default();
                let (ext_field, ext_value) = reference
                    .iter()
                    .find(|(k, _)| *k != "attributes")
                    .ok_or_else(|| SaveError::new("INVALID_FIELD", format!("Invalid reference for {key}")))?;
                let ext_value = scalar_text(ext_value);
                let matches = self.find_by(&target, ext_field, &ext_value);
                let found = match matches.as_slice() {
                    [one] => one.id.clone(),
                    [] => {
                        return Err(SaveError::new(
                            "INVALID_FIELD",
                            format!(
                                "Foreign key external ID: {ext_value} not found for field {ext_field} in entity {target}"
                            ),
                        ));
                    }
                    _ => {
                        return Err(SaveError::new(
                            "INVALID_FIELD",
                            format!(
                                "Foreign key external ID: {ext_value} matched more than one record for field {ext_field} in entity {target}"
                            ),
                        ));
                    }
                };
                out.insert(lookup.name.clone(), json!(found));
                continue;
            }
            if field.is_none() {
                return Err(SaveError::new(
                    "INVALID_FIELD",
                    format!("No such column '{key}' on sobject of type {object}"),
                )
                .with_fields(&[key]));
            }
            out.insert(key.clone(), value.clone());
        }
        Ok(out)
    }

    /// Checks a record as it would be saved (merged fields), `existing` = its id on update.
    pub fn validate(&self, object: &str, fields: &Map<String, Value>, existing: Option<&str>) -> Result<(), SaveError> {
        let schema_fields = self.schema.fields(object);
        let missing: Vec<&str> = schema_fields
            .iter()
            .filter(|f| f.required && fields.get(&f.name).is_none_or(|v| v.is_null() || v == ""))
            .map(|f| f.name.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(SaveError::new(
                "REQUIRED_FIELD_MISSING",
                format!("Required fields are missing: [{}]", missing.join(", ")),
            )
            .with_fields(&missing));
        }
        for field in &schema_fields {
            if let (Some(target), Some(Value::String(id))) = (&field.reference_to, fields.get(&field.name))
                && self.get(target, id).is_none()
            {
                return Err(SaveError::new("INVALID_CROSS_REFERENCE_KEY", format!("invalid cross reference id: {id}"))
                    .with_fields(&[&field.name]));
            }
            if field.unique
                && let Some(Value::String(value)) = fields.get(&field.name)
            {
                let clash =
                    self.find_by(object, &field.name, value).into_iter().find(|r| Some(r.id.as_str()) != existing);
                if let Some(other) = clash {
                    return Err(SaveError::new(
                        "DUPLICATE_VALUE",
                        format!(
                            "duplicate value found: {} duplicates value on record with id: {}",
                            field.name, other.id
                        ),
                    )
                    .with_fields(&[&field.name]));
                }
            }
        }
        self.check_rules(object, fields, existing)?;
        match object {
            "OrderItem" => self.validate_order_item(fields)?,
            "PricebookEntry" => self.validate_pricebook_entry(fields)?,
            _ => {}
        }
        for rule in self.duplicate_rules.iter().filter(|r| r.object == object) {
            let Some(Value::String(value)) = fields.get(&rule.field) else { continue };
            let clash = self.matching(object, &rule.field, value).any(|r| Some(r.id.as_str()) != existing);
            if clash {
                return Err(SaveError::new(
                    "DUPLICATES_DETECTED",
                    "You're creating a duplicate record. We recommend you use an existing record instead.",
                ));
            }
        }
        Ok(())
    }

    fn validate_order_item(&self, fields: &Map<String, Value>) -> Result<(), SaveError> {
        let order = fields.get("OrderId").and_then(Value::as_str).and_then(|id| self.get("Order", id));
        let entry =
            fields.get("PricebookEntryId").and_then(Value::as_str).and_then(|id| self.get("PricebookEntry", id));
        let (Some(order), Some(entry)) = (order, entry) else { return Ok(()) };
        let order_book = order.fields.get("Pricebook2Id").and_then(Value::as_str);
        let entry_book = entry.fields.get("Pricebook2Id").and_then(Value::as_str);
        if order_book.is_none() || order_book != entry_book {
            return Err(SaveError::new(
                "FIELD_INTEGRITY_EXCEPTION",
                "field integrity exception: PricebookEntryId (pricebook entry is in a different pricebook than the one assigned to the order, or Order has no pricebook)",
            )
            .with_fields(&["PricebookEntryId"]));
        }
        Ok(())
    }

    fn validate_pricebook_entry(&self, fields: &Map<String, Value>) -> Result<(), SaveError> {
        let book = fields.get("Pricebook2Id").and_then(Value::as_str);
        let product = fields.get("Product2Id").and_then(Value::as_str);
        if let (Some(book), Some(product)) = (book, product)
            && book != self.standard_pricebook
        {
            let has_standard = self.matching("PricebookEntry", "Product2Id", product).any(|r| {
                r.fields.get("Pricebook2Id").and_then(Value::as_str) == Some(self.standard_pricebook.as_str())
            });
            if !has_standard {
                return Err(SaveError::new(
                    "FIELD_INTEGRITY_EXCEPTION",
                    "field integrity exception: unknown (You need to define a standard price for this product before defining a custom price.)",
                ));
            }
        }
        Ok(())
    }

    /// Creates a record after validation.
    pub fn create(&mut self, object: &str, mut fields: Map<String, Value>, now: i64) -> Result<String, SaveError> {
        self.derive_person_fields(object, &mut fields)?;
        self.validate(object, &fields, None)?;
        let id = self.insert(object, fields, now);
        self.sync_person_contact(&id, now);
        Ok(id)
    }

    /// Updates a record after validating the merged result.
    pub fn update(&mut self, id: &str, fields: Map<String, Value>, now: i64) -> Result<(), SaveError> {
        let record =
            self.records.get(id).ok_or_else(|| SaveError::new("NOT_FOUND", "The requested resource does not exist"))?;
        let mut merged = record.fields.clone();
        merged.extend(fields);
        let object = record.object.clone();
        self.derive_person_fields(&object, &mut merged)?;
        self.validate(&object, &merged, Some(id))?;
        let mut record = self.records.get(id).expect("checked above").clone();
        record.fields = merged;
        record.modified_ms = now.max(record.modified_ms + 1);
        self.records.put(record);
        self.sync_person_contact(id, now);
        Ok(())
    }

    /// Upserts by external id: `Ok((id, created))`; several matches is an error the caller
    /// turns into HTTP 300.
    pub fn upsert(
        &mut self,
        object: &str,
        ext_field: &str,
        ext_value: &str,
        body: &Map<String, Value>,
        now: i64,
    ) -> Result<(String, bool), UpsertError> {
        let mut fields = self.prepare(object, body).map_err(UpsertError::Save)?;
        if let Some(v) = fields.get(ext_field)
            && scalar_text(v) != ext_value
        {
            return Err(UpsertError::Save(SaveError::new(
                "INVALID_FIELD",
                format!("The value of {ext_field} in the request body does not match the value in the URL"),
            )));
        }
        let ids: Vec<String> = self.find_by(object, ext_field, ext_value).into_iter().map(|r| r.id.clone()).collect();
        match ids.as_slice() {
            [] => {
                if ext_field != "Id" {
                    fields.insert(ext_field.to_owned(), json!(ext_value));
                }
                self.create(object, fields, now).map(|id| (id, true)).map_err(UpsertError::Save)
            }
            [id] => self.update(id, fields, now).map(|()| (id.clone(), false)).map_err(UpsertError::Save),
            _ => Err(UpsertError::Multiple(ids)),
        }
    }

    /// Deletes a record: `Ok(false)` when there is none.
    pub fn delete(&mut self, object: &str, id: &str) -> Result<bool, SaveError> {
        let Some(record) = self.get(object, id) else { return Ok(false) };
        self.check_delete(record)?;
        if object == "Order" {
            // OrderItem is a detail of Order: its items go with it.
            let items: Vec<String> = self.matching("OrderItem", "OrderId", id).map(|r| r.id.clone()).collect();
            for item in items {
                self.records.take(&item);
            }
        }
        self.records.take(id);
        Ok(true)
    }
}

/// Why an upsert failed.
#[derive(Debug)]
pub enum UpsertError {
    Save(SaveError),
    Multiple(Vec<String>),
}

/// A JSON scalar as the text Salesforce compares external ids with.
pub fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes_round_trip() {
        let ms = parse_datetime("2026-11-28T12:34:56.789Z").unwrap();
        assert_eq!(format_datetime(ms), "2026-11-28T12:34:56.789+0000");
        assert_eq!(parse_datetime("2026-11-28T12:34:56+0000"), Some(ms - 789));
        assert_eq!(parse_datetime("2026-11-28T09:34:56-03:00"), Some(ms - 789));
        assert_eq!(format_datetime(0), "1970-01-01T00:00:00.000+0000");
        assert!(parse_datetime("yesterday").is_none());
    }
}
