//! The mapping from Elo's events to Salesforce objects, read from a JSON file with working
//! defaults, and checked against the org's describe at startup.
//!
//! What is configurable without code: the account mode (business Account + Contact, or Person
//! Account), the external-id field of every object, the price book of each store, which
//! Magento statuses activate an Order, and any number of extra fields per object, each filled
//! from a named source value ([`Source`]). What the sink always sets itself: external ids,
//! lookups (Account, Order, PricebookEntry by external id), `Pricebook2Id`, `Status` and the
//! person record type.

use std::collections::BTreeMap;

use elo_events::{Address, CommerceEvent, Customer, Decimal4, Order, OrderItem};
use serde::Deserialize;
use serde_json::{Value, json};

/// Business accounts (Account + Contact) or Person Accounts (an org setting).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountMode {
    #[default]
    Business,
    Person,
}

/// What `CUSTOMER_ERASED` does to the person's records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErasureMode {
    /// Names become "Erased", e-mail and phone cleared; orders stay as the business's records.
    #[default]
    Anonymise,
    /// The person's Orders (put back to Draft first: Salesforce refuses to delete activated
    /// ones), Contact and Account are deleted.
    Delete,
}

/// External-id fields the sink upserts by.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExternalIds {
    pub account: String,
    pub contact: String,
    pub order: String,
    pub order_item: String,
    /// Product2 is found by SKU.
    pub product_sku: String,
    pub pricebook_entry: String,
}

impl Default for ExternalIds {
    fn default() -> Self {
        let elo = "Elo_Id__c".to_owned();
        Self {
            account: elo.clone(),
            contact: elo.clone(),
            order: elo.clone(),
            order_item: elo.clone(),
            product_sku: "Sku__c".into(),
            pricebook_entry: elo,
        }
    }
}

/// Extra fields per object: Salesforce field → source value name.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectFields {
    pub account: Option<BTreeMap<String, Source>>,
    pub contact: Option<BTreeMap<String, Source>>,
    pub order: Option<BTreeMap<String, Source>>,
    pub order_item: Option<BTreeMap<String, Source>>,
}

/// The mapping file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mapping {
    pub account_mode: AccountMode,
    pub external_ids: ExternalIds,
    /// Magento store id → the name of its Salesforce price book (created when missing).
    pub stores: BTreeMap<String, String>,
    /// Magento statuses whose orders are activated in Salesforce.
    pub activate_on: Vec<String>,
    /// `anonymise` (default) or `delete`.
    pub erasure: ErasureMode,
    pub fields: ObjectFields,
}

impl Default for Mapping {
    fn default() -> Self {
        Self {
            account_mode: AccountMode::Business,
            external_ids: ExternalIds::default(),
            stores: [("1".to_owned(), "Elo Store default".to_owned()), ("2".to_owned(), "Elo Store br".to_owned())]
                .into(),
            activate_on: vec!["processing".into(), "complete".into(), "closed".into()],
            erasure: ErasureMode::Anonymise,
            fields: ObjectFields::default(),
        }
    }
}

/// Values an event offers to the mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Source {
    #[serde(rename = "customer.email")]
    CustomerEmail,
    #[serde(rename = "customer.firstname")]
    CustomerFirstname,
    #[serde(rename = "customer.lastname")]
    CustomerLastname,
    /// First and last name (the e-mail when both are missing).
    #[serde(rename = "customer.name")]
    CustomerName,
    #[serde(rename = "customer.phone")]
    CustomerPhone,
    #[serde(rename = "customer.key")]
    CustomerKey,
    #[serde(rename = "order.increment_id")]
    OrderIncrementId,
    #[serde(rename = "order.status")]
    OrderStatus,
    #[serde(rename = "order.state")]
    OrderState,
    /// `YYYY-MM-DD` of the order's creation (UTC).
    #[serde(rename = "order.created_date")]
    OrderCreatedDate,
    #[serde(rename = "order.currency")]
    OrderCurrency,
    #[serde(rename = "order.grand_total")]
    OrderGrandTotal,
    #[serde(rename = "order.payment_method")]
    OrderPaymentMethod,
    #[serde(rename = "order.shipping_method")]
    OrderShippingMethod,
    /// order-ingest's stock check (`UNCHECKED` until enrichment finished, see the README).
    #[serde(rename = "order.inventory_status")]
    OrderInventoryStatus,
    /// Marketing consent (`UNKNOWN` until enrichment finished).
    #[serde(rename = "customer.consent")]
    CustomerConsent,
    #[serde(rename = "billing.street")]
    BillingStreet,
    #[serde(rename = "billing.city")]
    BillingCity,
    #[serde(rename = "billing.region")]
    BillingRegion,
    #[serde(rename = "billing.postcode")]
    BillingPostcode,
    #[serde(rename = "billing.country")]
    BillingCountry,
    #[serde(rename = "shipping.street")]
    ShippingStreet,
    #[serde(rename = "shipping.city")]
    ShippingCity,
    #[serde(rename = "shipping.postcode")]
    ShippingPostcode,
    #[serde(rename = "shipping.country")]
    ShippingCountry,
    #[serde(rename = "item.sku")]
    ItemSku,
    #[serde(rename = "item.name")]
    ItemName,
    #[serde(rename = "item.qty")]
    ItemQty,
    #[serde(rename = "item.price")]
    ItemPrice,
}

/// What a source value is read from.
pub struct Context<'a> {
    pub event: &'a CommerceEvent,
    pub customer: Option<&'a Customer>,
    pub order: Option<&'a Order>,
    pub item: Option<&'a OrderItem>,
}

fn money(d: Decimal4) -> Value {
    json!(d.unscaled() as f64 / Decimal4::SCALE as f64)
}

/// `YYYY-MM-DD` of a UTC epoch-millisecond instant.
pub fn date_of(ms: i64) -> String {
    elo_events::time::date_of_ms(ms)
}

impl Source {
    /// The value for `ctx`, `None` when the event does not carry it (the field is left out).
    pub fn value(self, ctx: &Context<'_>) -> Option<Value> {
        let text = |s: Option<&String>| s.filter(|s| !s.is_empty()).map(|s| json!(s));
        let address = |a: Option<&Address>, f: fn(&Address) -> Option<String>| a.and_then(f).map(|s| json!(s));
        let billing = ctx.order.and_then(|o| o.billing_address.as_ref());
        let shipping = ctx.order.and_then(|o| o.shipping_address.as_ref());
        let street = |a: &Address| (!a.street.is_empty()).then(|| a.street.join("\n"));
        match self {
            Self::CustomerEmail => text(ctx.customer.map(|c| &c.email)),
            Self::CustomerFirstname => text(ctx.customer.and_then(|c| c.firstname.as_ref())),
            Self::CustomerLastname => text(ctx.customer.and_then(|c| c.lastname.as_ref())),
            Self::CustomerName => ctx.customer.map(|c| json!(full_name(c))),
            Self::CustomerPhone => text(ctx.customer.and_then(|c| c.phone.as_ref())),
            Self::CustomerKey => Some(json!(ctx.event.customer_key)),
            Self::OrderIncrementId => ctx.order.map(|o| json!(o.increment_id)),
            Self::OrderStatus => ctx.order.map(|o| json!(o.status)),
            Self::OrderState => ctx.order.map(|o| json!(o.state)),
            Self::OrderCreatedDate => ctx.order.map(|o| json!(date_of(o.created_at))),
            Self::OrderCurrency => ctx.order.map(|o| json!(o.currency)),
            Self::OrderGrandTotal => ctx.order.map(|o| money(o.totals.grand_total)),
            Self::OrderPaymentMethod => text(ctx.order.and_then(|o| o.payment_method.as_ref())),
            Self::OrderShippingMethod => text(ctx.order.and_then(|o| o.shipping_method.as_ref())),
            Self::OrderInventoryStatus => ctx.order.and_then(|o| serde_json::to_value(o.inventory_status).ok()),
            Self::CustomerConsent => ctx.customer.and_then(|c| serde_json::to_value(c.consent.status).ok()),
            Self::BillingStreet => address(billing, street),
            Self::BillingCity => address(billing, |a| a.city.clone()),
            Self::BillingRegion => address(billing, |a| a.region.clone()),
            Self::BillingPostcode => address(billing, |a| a.postcode.clone()),
            Self::BillingCountry => address(billing, |a| a.country_id.clone()),
            Self::ShippingStreet => address(shipping, street),
            Self::ShippingCity => address(shipping, |a| a.city.clone()),
            Self::ShippingPostcode => address(shipping, |a| a.postcode.clone()),
            Self::ShippingCountry => address(shipping, |a| a.country_id.clone()),
            Self::ItemSku => ctx.item.map(|i| json!(i.sku)),
            Self::ItemName => ctx.item.map(|i| json!(i.name)),
            Self::ItemQty => ctx.item.map(|i| money(i.qty_ordered)),
            Self::ItemPrice => ctx.item.map(|i| money(i.price)),
        }
    }
}

/// "First Last", or the part that exists, or the e-mail's local part.
pub fn full_name(c: &Customer) -> String {
    let parts: Vec<&str> =
        [c.firstname.as_deref(), c.lastname.as_deref()].into_iter().flatten().filter(|s| !s.is_empty()).collect();
    if parts.is_empty() { c.email.split('@').next().unwrap_or("Unknown").to_owned() } else { parts.join(" ") }
}

/// A mapping whose per-object field tables are filled with the defaults of its mode.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub mode: AccountMode,
    pub ids: ExternalIds,
    pub stores: BTreeMap<i32, String>,
    pub activate_on: Vec<String>,
    pub erasure: ErasureMode,
    pub account: BTreeMap<String, Source>,
    pub contact: BTreeMap<String, Source>,
    pub order: BTreeMap<String, Source>,
    pub order_item: BTreeMap<String, Source>,
}

/// Errors of the mapping: each names the object and field.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("mapping file {path}: {message}")]
    File { path: String, message: String },
    #[error("mapping: store id {0:?} is not a number")]
    Store(String),
    #[error("mapping: {object}.{field} does not exist in the org")]
    MissingField { object: String, field: String },
    #[error("mapping: {object}.{field} is not an External ID field")]
    NotExternalId { object: String, field: String },
    #[error("mapping: {object}.{field} is required by the org and not mapped")]
    RequiredNotMapped { object: String, field: String },
    #[error("mapping: {object}.{field} is read-only")]
    ReadOnly { object: String, field: String },
    #[error("mapping: the org has no Person Account record type, but account_mode is person")]
    NoPersonAccounts,
}

fn table(pairs: &[(&str, Source)]) -> BTreeMap<String, Source> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

impl Mapping {
    /// Reads a mapping file (JSON); `None` gives the defaults.
    pub fn load(path: Option<&std::path::Path>) -> Result<Self, MappingError> {
        let Some(path) = path else { return Ok(Self::default()) };
        let text = std::fs::read_to_string(path)
            .map_err(|e| MappingError::File { path: path.display().to_string(), message: e.to_string() })?;
        serde_json::from_str(&text)
            .map_err(|e| MappingError::File { path: path.display().to_string(), message: e.to_string() })
    }

    /// Fills the field tables the file left out with the defaults of the account mode.
    pub fn resolve(self) -> Result<Resolved, MappingError> {
        use Source::*;
        let (account, contact) = match self.account_mode {
            AccountMode::Business => (
                table(&[("Name", CustomerName)]),
                table(&[("FirstName", CustomerFirstname), ("LastName", CustomerLastname), ("Email", CustomerEmail)]),
            ),
            AccountMode::Person => (
                table(&[
                    ("FirstName", CustomerFirstname),
                    ("LastName", CustomerLastname),
                    ("PersonEmail", CustomerEmail),
                ]),
                BTreeMap::new(),
            ),
        };
        let order = table(&[
            ("Name", OrderIncrementId),
            ("EffectiveDate", OrderCreatedDate),
            ("Magento_Status__c", OrderStatus),
            ("BillingStreet", BillingStreet),
            ("BillingCity", BillingCity),
            ("BillingPostalCode", BillingPostcode),
            ("BillingCountry", BillingCountry),
        ]);
        let order_item = table(&[("Quantity", ItemQty), ("UnitPrice", ItemPrice), ("Description", ItemName)]);
        let stores = self
            .stores
            .into_iter()
            .map(|(k, v)| k.parse::<i32>().map(|id| (id, v)).map_err(|_| MappingError::Store(k)))
            .collect::<Result<_, _>>()?;
        Ok(Resolved {
            mode: self.account_mode,
            ids: self.external_ids,
            stores,
            activate_on: self.activate_on,
            erasure: self.erasure,
            account: self.fields.account.unwrap_or(account),
            contact: if self.account_mode == AccountMode::Person {
                BTreeMap::new()
            } else {
                self.fields.contact.unwrap_or(contact)
            },
            order: self.fields.order.unwrap_or(order),
            order_item: self.fields.order_item.unwrap_or(order_item),
        })
    }
}

/// One object's describe, reduced to what the check needs.
pub struct Described<'a> {
    pub object: &'a str,
    pub describe: &'a Value,
}

impl Described<'_> {
    fn field(&self, name: &str) -> Option<&Value> {
        self.describe["fields"].as_array()?.iter().find(|f| f["name"] == name)
    }

    fn exists(&self, name: &str) -> Result<&Value, MappingError> {
        self.field(name).ok_or_else(|| MappingError::MissingField { object: self.object.into(), field: name.into() })
    }

    /// Checks that `field` can be written.
    pub fn writable(&self, name: &str) -> Result<(), MappingError> {
        let f = self.exists(name)?;
        if f["createable"] == false && f["updateable"] == false {
            return Err(MappingError::ReadOnly { object: self.object.into(), field: name.into() });
        }
        Ok(())
    }

    /// Checks that `field` is an External ID (or idLookup) field.
    pub fn external_id(&self, name: &str) -> Result<(), MappingError> {
        let f = self.exists(name)?;
        if f["externalId"] != true && f["idLookup"] != true {
            return Err(MappingError::NotExternalId { object: self.object.into(), field: name.into() });
        }
        Ok(())
    }

    /// Checks that every field the org requires on create is in `written` (or `exempt`).
    pub fn required_covered(&self, written: &[&str], exempt: &[&str]) -> Result<(), MappingError> {
        for f in self.describe["fields"].as_array().into_iter().flatten() {
            let name = f["name"].as_str().unwrap_or_default();
            let required = f["nillable"] == false && f["createable"] != false && f["defaultedOnCreate"] != true;
            if required && !written.contains(&name) && !exempt.contains(&name) {
                return Err(MappingError::RequiredNotMapped { object: self.object.into(), field: name.into() });
            }
        }
        Ok(())
    }

    /// The id of the record type with this developer name.
    pub fn record_type(&self, developer_name: &str) -> Option<String> {
        self.describe["recordTypeInfos"]
            .as_array()?
            .iter()
            .find(|r| r["developerName"] == developer_name)
            .and_then(|r| r["recordTypeId"].as_str())
            .map(str::to_owned)
    }
}

impl Resolved {
    /// Checks one object's part of the mapping: `fixed` are the fields the sink sets itself.
    pub fn check(
        &self,
        d: &Described<'_>,
        ext_id: &str,
        mapped: &BTreeMap<String, Source>,
        fixed: &[&str],
    ) -> Result<(), MappingError> {
        d.external_id(ext_id)?;
        for field in mapped.keys() {
            d.writable(field)?;
        }
        for field in fixed {
            d.writable(field)?;
        }
        let mut written: Vec<&str> = mapped.keys().map(String::as_str).collect();
        written.extend_from_slice(fixed);
        written.push(ext_id);
        // A person account's Name is derived from FirstName/LastName.
        let exempt: &[&str] = if d.object == "Account" && self.mode == AccountMode::Person { &["Name"] } else { &[] };
        d.required_covered(&written, exempt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn describe(fields: Value) -> Value {
        json!({"fields": fields})
    }

    #[test]
    fn defaults_resolve_per_mode() {
        let business = Mapping::default().resolve().unwrap();
        assert!(business.contact.contains_key("Email") && business.account.contains_key("Name"));
        let person: Mapping = serde_json::from_str(r#"{"account_mode":"person"}"#).unwrap();
        let person = person.resolve().unwrap();
        assert!(person.contact.is_empty() && person.account.contains_key("PersonEmail"));
        assert_eq!(person.stores[&2], "Elo Store br");
    }

    #[test]
    fn unknown_keys_and_sources_are_refused() {
        assert!(serde_json::from_str::<Mapping>(r#"{"acount_mode":"person"}"#).is_err());
        assert!(serde_json::from_str::<Mapping>(r#"{"fields":{"order":{"X__c":"order.nope"}}}"#).is_err());
    }

    #[test]
    fn check_names_the_bad_field() {
        let m = Mapping::default().resolve().unwrap();
        let d = describe(json!([
            {"name": "Elo_Id__c", "externalId": true, "nillable": true, "createable": true, "updateable": true},
            {"name": "Legacy__c", "externalId": false, "nillable": true, "createable": true, "updateable": true},
            {"name": "Name", "nillable": false, "createable": true, "updateable": true, "defaultedOnCreate": false},
            {"name": "Industry", "nillable": false, "createable": true, "updateable": true, "defaultedOnCreate": false},
        ]));
        let obj = Described { object: "Account", describe: &d };
        let err = m.check(&obj, "Elo_Id__c", &m.account, &[]).unwrap_err();
        assert_eq!(err.to_string(), "mapping: Account.Industry is required by the org and not mapped");
        let err = m.check(&obj, "Legacy__c", &m.account, &[]).unwrap_err();
        assert!(matches!(err, MappingError::NotExternalId { ref field, .. } if field == "Legacy__c"), "{err}");
        let err = m.check(&obj, "Elo_Id__c", &m.contact, &[]).unwrap_err();
        assert!(matches!(err, MappingError::MissingField { ref field, .. } if field == "Email"), "{err}");
    }

    #[test]
    fn dates_are_utc_calendar_days() {
        assert_eq!(date_of(0), "1970-01-01");
        assert_eq!(date_of(1_709_251_199_000), "2024-02-29");
        assert_eq!(date_of(1_709_251_200_000), "2024-03-01");
    }
}
