//! Magento order payloads to `CommerceEvent`s: the same source fact always gives the same
//! event (id included), whichever path (push, poll, refetch) delivered it.
//!
//! - Timestamps: Magento's `YYYY-MM-DD HH:MM:SS` are UTC whatever the store timezone.
//! - Money and quantities: JSON numbers read as decimals (never through a float).
//! - Items: a configurable parent line and its child collapse into one sellable line (the
//!   child carries price 0 and would double-count quantity); bundle parents and children are
//!   kept, children linked by `parent_item_id`.
//! - Customer key: `c:<customer_id>`, or `g:<sha256 of the e-mail>` for guests.
//! - `ORDER_PLACED` when `created_at == updated_at` (the order's first version), otherwise
//!   `ORDER_CHANGED`: decided from the source, not from what this process happened to see.

use std::collections::HashMap;

use elo_events::{
    Address, CommerceEvent, CommerceEventType, Customer, Decimal4, InventoryStatus, Order, OrderItem, OrderTotals,
    SourceVersion, StoreRef, ids,
};
use serde_json::Value;
use sha2::Digest;

mod customer;
mod time;

pub use customer::{ErasureRequest, consent_of, customer_event, erasure_events};
pub use time::{format_magento_time, parse_magento_time};

/// Why a payload cannot become an event (a 4xx on push, a DLQ record on poll).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NormalizeError {
    #[error("missing or empty field {0}")]
    Missing(&'static str),
    #[error("field {field} is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl NormalizeError {
    /// The field in question.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Missing(field) | Self::Invalid { field, .. } => field,
        }
    }
}

/// Store views known to the deployment: id → (code, website id).
#[derive(Clone, Debug, Default)]
pub struct Stores(pub HashMap<i64, (String, i32)>);

fn text<'a>(v: &'a Value, field: &'static str) -> Result<&'a str, NormalizeError> {
    v.get(field).and_then(Value::as_str).filter(|s| !s.is_empty()).ok_or(NormalizeError::Missing(field))
}

fn opt_text(v: &Value, field: &str) -> Option<String> {
    v.get(field).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned)
}

fn int(v: &Value, field: &'static str) -> Result<i64, NormalizeError> {
    match v.get(field) {
        Some(Value::Number(n)) => n.as_i64().ok_or(NormalizeError::Invalid { field, reason: "not an integer".into() }),
        Some(Value::String(s)) => {
            s.parse().map_err(|_| NormalizeError::Invalid { field, reason: format!("{s:?} is not an integer") })
        }
        _ => Err(NormalizeError::Missing(field)),
    }
}

fn opt_int(v: &Value, field: &str) -> Option<i64> {
    match v.get(field) {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    }
}

/// A money or quantity field; absent means zero (Magento omits zero amounts on some lines).
fn decimal(v: &Value, field: &'static str) -> Result<Decimal4, NormalizeError> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(Decimal4::ZERO),
        // Magento's JSON is read with `crate::json::parse_lossless`: fractions arrive as their
        // text; a number here is an integer (exact), or a float from a caller that skipped it.
        Some(Value::Number(n)) => {
            Decimal4::parse(&n.to_string()).map_err(|e| NormalizeError::Invalid { field, reason: e.to_string() })
        }
        Some(Value::String(s)) => {
            Decimal4::parse(s).map_err(|e| NormalizeError::Invalid { field, reason: e.to_string() })
        }
        Some(other) => Err(NormalizeError::Invalid { field, reason: format!("{other} is not a number") }),
    }
}

fn time(v: &Value, field: &'static str) -> Result<i64, NormalizeError> {
    let raw = text(v, field)?;
    parse_magento_time(raw)
        .ok_or(NormalizeError::Invalid { field, reason: format!("{raw:?} is not YYYY-MM-DD HH:MM:SS") })
}

fn address(v: &Value) -> Option<Address> {
    if !v.is_object() {
        return None;
    }
    Some(Address {
        firstname: opt_text(v, "firstname"),
        lastname: opt_text(v, "lastname"),
        street: v
            .get("street")
            .and_then(Value::as_array)
            .map(|s| s.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default(),
        city: opt_text(v, "city"),
        region: v.get("region").and_then(|r| r.as_str().map(str::to_owned).or_else(|| opt_text(r, "region"))),
        region_code: opt_text(v, "region_code"),
        postcode: opt_text(v, "postcode"),
        country_id: opt_text(v, "country_id"),
        telephone: opt_text(v, "telephone"),
    })
}

/// Sellable lines: configurable parent + child collapsed, bundles kept with their children.
fn items(order: &Value) -> Result<Vec<OrderItem>, NormalizeError> {
    let lines = order.get("items").and_then(Value::as_array).ok_or(NormalizeError::Missing("items"))?;
    let by_id: HashMap<i64, &Value> = lines.iter().filter_map(|l| Some((opt_int(l, "item_id")?, l))).collect();
    let mut out = Vec::new();
    for line in lines {
        let parent = opt_int(line, "parent_item_id").and_then(|p| by_id.get(&p).copied());
        let kind = opt_text(line, "product_type").unwrap_or_else(|| "simple".into());
        if parent.is_some_and(|p| p.get("product_type").and_then(Value::as_str) == Some("configurable")) {
            continue; // its parent line already carries the sku, price and quantity
        }
        let item_id = int(line, "item_id")?;
        let child = (kind == "configurable")
            .then(|| lines.iter().find(|l| opt_int(l, "parent_item_id") == Some(item_id)))
            .flatten();
        out.push(OrderItem {
            item_id,
            sku: text(line, "sku")?.to_owned(),
            name: opt_text(line, "name").unwrap_or_default(),
            product_id: child.and_then(|c| opt_int(c, "product_id")).or_else(|| opt_int(line, "product_id")),
            product_type: kind,
            qty_ordered: decimal(line, "qty_ordered")?,
            price: decimal(line, "price")?,
            row_total: decimal(line, "row_total")?,
            tax: decimal(line, "tax_amount")?,
            discount: decimal(line, "discount_amount")?,
            parent_item_id: parent.and_then(|p| opt_int(p, "item_id")),
        });
    }
    if out.is_empty() {
        return Err(NormalizeError::Missing("items"));
    }
    Ok(out)
}

/// The event id of a source version: the entity plus a digest of its normalised content as
/// every read path sees it (a push body, `GET /V1/orders/{id}`, a search page), so one fact
/// gets one id however it arrived, and two versions saved in the same second get two.
/// Left out: what is not the source's (publication time; consent and stock on orders, added
/// by enrichment) and what search results lack (Magento's order list has no
/// `shipping_assignments`, so no shipping address or method).
pub(crate) fn version_id(kind: &str, event: &CommerceEvent) -> String {
    let person = event.customer.as_ref().map(|c| {
        let consent = (kind == "customer").then_some((&c.consent.status, &c.consent.legal_basis));
        (c.customer_id, c.is_guest, &c.email, &c.firstname, &c.lastname, c.group_id, &c.phone, consent)
    });
    let order = event.order.as_ref().map(|o| {
        let head = (o.entity_id, &o.increment_id, &o.state, &o.status, &o.currency, o.created_at);
        (head, &o.totals, &o.items, &o.billing_address, &o.payment_method)
    });
    let content = (&event.event_type, &event.customer_key, event.store.store_id, person, order);
    let bytes = serde_json::to_vec(&content).expect("plain data serialises");
    let digest: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    let version = &event.source_version;
    ids::event_id(&["magento", kind, &version.entity_id, &version.updated_at.to_string(), &digest])
}

/// Builds the commerce event of one order version. `customer` (from `GET /V1/customers/{id}`)
/// adds marketing consent when available; `produced_at` is the publication time.
pub fn order_event(
    order: &Value,
    customer: Option<&Value>,
    stores: &Stores,
    produced_at: i64,
) -> Result<CommerceEvent, NormalizeError> {
    let entity_id = int(order, "entity_id")?;
    let created_at = time(order, "created_at")?;
    let updated_at = time(order, "updated_at")?;
    let email = ids::normalise_email(text(order, "customer_email")?);
    let is_guest = opt_int(order, "customer_is_guest") == Some(1) || opt_int(order, "customer_id").is_none();
    let customer_id = if is_guest { None } else { opt_int(order, "customer_id") };
    let store_id = int(order, "store_id")?;
    let items = items(order)?;
    let total_qty = items
        .iter()
        .filter(|i| i.parent_item_id.is_none())
        .try_fold(Decimal4::ZERO, |acc, i| acc.checked_add(i.qty_ordered))
        .ok_or(NormalizeError::Invalid { field: "qty_ordered", reason: "overflow".into() })?;
    let shipping = order.pointer("/extension_attributes/shipping_assignments/0/shipping");
    let billing = order.get("billing_address").and_then(address);
    let event_type =
        if created_at == updated_at { CommerceEventType::OrderPlaced } else { CommerceEventType::OrderChanged };
    let entity = entity_id.to_string();
    let mut event = CommerceEvent {
        event_id: String::new(), // named after the content, below
        event_type,
        source_system: "magento".into(),
        source_version: SourceVersion { entity_type: "order".into(), entity_id: entity, updated_at },
        occurred_at: updated_at,
        produced_at,
        customer_key: ids::customer_key(customer_id, &email),
        store: store_ref(stores, store_id),
        order: Some(Order {
            entity_id,
            increment_id: text(order, "increment_id")?.to_owned(),
            state: text(order, "state")?.to_owned(),
            status: text(order, "status")?.to_owned(),
            currency: opt_text(order, "order_currency_code").ok_or(NormalizeError::Missing("order_currency_code"))?,
            created_at,
            totals: OrderTotals {
                grand_total: decimal(order, "grand_total")?,
                subtotal: decimal(order, "subtotal")?,
                tax: decimal(order, "tax_amount")?,
                shipping: decimal(order, "shipping_amount")?,
                discount: decimal(order, "discount_amount")?,
                total_qty_ordered: total_qty,
            },
            items,
            shipping_address: shipping.and_then(|s| s.get("address")).and_then(address),
            billing_address: billing.clone(),
            payment_method: order.pointer("/payment/method").and_then(Value::as_str).map(str::to_owned),
            shipping_method: shipping.and_then(|s| s.get("method")).and_then(Value::as_str).map(str::to_owned),
            inventory_status: InventoryStatus::Unchecked,
        }),
        customer: Some(Customer {
            customer_id,
            is_guest,
            email,
            firstname: opt_text(order, "customer_firstname"),
            lastname: opt_text(order, "customer_lastname"),
            group_id: opt_int(order, "customer_group_id").map(|g| g as i32),
            phone: billing.and_then(|b| b.telephone),
            consent: consent_of(customer),
        }),
        erasure: None,
    };
    event.event_id = version_id("order", &event);
    Ok(event)
}

fn store_ref(stores: &Stores, store_id: i64) -> StoreRef {
    let (store_code, website_id) = stores.0.get(&store_id).cloned().map_or((None, None), |(c, w)| (Some(c), Some(w)));
    StoreRef { store_id: store_id as i32, store_code, website_id }
}

#[cfg(test)]
mod tests;
