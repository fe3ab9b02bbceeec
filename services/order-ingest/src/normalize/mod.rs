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
pub(crate) mod raw;
mod time;

pub use customer::{ErasureRequest, consent_of, customer_event, erasure_events};
pub(crate) use raw::RawOrder;
use raw::{RawAddress, RawItem, Scalar};
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

fn text<'s>(v: &'s Scalar<'_>, field: &'static str) -> Result<&'s str, NormalizeError> {
    v.text().ok_or(NormalizeError::Missing(field))
}

/// A field of a parsed record as a [`Scalar`] (customer records stay `Value`s: they are few).
fn leaf<'v>(record: &'v Value, field: &str) -> Scalar<'v> {
    // Reading a `Value` as a `Scalar` cannot fail: every JSON value is one.
    record.get(field).and_then(|v| serde::Deserialize::deserialize(v).ok()).unwrap_or_default()
}

fn opt_text(v: &Scalar<'_>) -> Option<String> {
    v.text().map(str::to_owned)
}

fn int(v: &Scalar<'_>, field: &'static str) -> Result<i64, NormalizeError> {
    match v {
        Scalar::Int(i) => Ok(*i),
        Scalar::BigUint(_) | Scalar::Float(_) => {
            Err(NormalizeError::Invalid { field, reason: "not an integer".into() })
        }
        Scalar::Str(s) => {
            s.parse().map_err(|_| NormalizeError::Invalid { field, reason: format!("{s:?} is not an integer") })
        }
        Scalar::Null | Scalar::Bool(_) | Scalar::Compound => Err(NormalizeError::Missing(field)),
    }
}

/// A money or quantity field; absent means zero (Magento omits zero amounts on some lines).
fn decimal(v: &Scalar<'_>, field: &'static str) -> Result<Decimal4, NormalizeError> {
    let invalid = |reason: String| NormalizeError::Invalid { field, reason };
    let parse = |text: &str| Decimal4::parse(text).map_err(|e| invalid(e.to_string()));
    match v {
        Scalar::Null => Ok(Decimal4::ZERO),
        // Magento's JSON is read with `crate::json`'s lossless reading: fractions arrive as
        // their text; a number here is an integer (exact), or a float from a caller that
        // skipped it (written the way serde_json writes it).
        Scalar::Str(s) => parse(s),
        Scalar::Int(i) => parse(&i.to_string()),
        Scalar::BigUint(u) => parse(&u.to_string()),
        Scalar::Float(f) => parse(&serde_json::Number::from_f64(*f).map_or_else(|| f.to_string(), |n| n.to_string())),
        Scalar::Bool(b) => Err(invalid(format!("{b} is not a number"))),
        Scalar::Compound => Err(invalid("an object or a list is not a number".into())),
    }
}

fn time(v: &Scalar<'_>, field: &'static str) -> Result<i64, NormalizeError> {
    let raw = text(v, field)?;
    parse_magento_time(raw)
        .ok_or(NormalizeError::Invalid { field, reason: format!("{raw:?} is not YYYY-MM-DD HH:MM:SS") })
}

fn address(v: &RawAddress<'_>) -> Address {
    Address {
        firstname: opt_text(&v.firstname),
        lastname: opt_text(&v.lastname),
        street: v
            .street
            .0
            .iter()
            .flatten()
            .filter_map(|s| match s {
                Scalar::Str(s) => Some(s.to_string()),
                _ => None,
            })
            .collect(),
        city: opt_text(&v.city),
        region: v.region.0.as_deref().map(str::to_owned),
        region_code: opt_text(&v.region_code),
        postcode: opt_text(&v.postcode),
        country_id: opt_text(&v.country_id),
        telephone: opt_text(&v.telephone),
    }
}

/// Sellable lines: configurable parent + child collapsed, bundles kept with their children.
fn items(order: &RawOrder<'_>) -> Result<Vec<OrderItem>, NormalizeError> {
    let lines: Vec<&RawItem<'_>> =
        order.items.0.as_ref().ok_or(NormalizeError::Missing("items"))?.iter().map(|l| &l.0).collect();
    let by_id: HashMap<i64, &RawItem<'_>> = lines.iter().filter_map(|l| Some((l.item_id.int()?, *l))).collect();
    let mut out = Vec::with_capacity(lines.len());
    for line in &lines {
        let parent = line.parent_item_id.int().and_then(|p| by_id.get(&p).copied());
        let kind = line.product_type.text().unwrap_or("simple");
        if parent.is_some_and(|p| matches!(&p.product_type, Scalar::Str(t) if t == "configurable")) {
            continue; // its parent line already carries the sku, price and quantity
        }
        let item_id = int(&line.item_id, "item_id")?;
        let child =
            (kind == "configurable").then(|| lines.iter().find(|l| l.parent_item_id.int() == Some(item_id))).flatten();
        out.push(OrderItem {
            item_id,
            sku: text(&line.sku, "sku")?.to_owned(),
            name: opt_text(&line.name).unwrap_or_default(),
            product_id: child.and_then(|c| c.product_id.int()).or_else(|| line.product_id.int()),
            product_type: kind.to_owned(),
            qty_ordered: decimal(&line.qty_ordered, "qty_ordered")?,
            price: decimal(&line.price, "price")?,
            row_total: decimal(&line.row_total, "row_total")?,
            tax: decimal(&line.tax_amount, "tax_amount")?,
            discount: decimal(&line.discount_amount, "discount_amount")?,
            parent_item_id: parent.and_then(|p| p.item_id.int()),
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
    // Serialised into a buffer kept per thread, then hashed in one pass: serde_json writes a
    // few bytes at a time, and a hasher update per write cost twice the hashing itself.
    thread_local! {
        static CONTENT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let digest = CONTENT.with_borrow_mut(|buffer| {
        buffer.clear();
        serde_json::to_writer(&mut *buffer, &content).expect("plain data serialises");
        sha2::Sha256::digest(buffer.as_slice())
    });
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest: String =
        digest.iter().flat_map(|b| [HEX[usize::from(b >> 4)] as char, HEX[usize::from(b & 15)] as char]).collect();
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
    order_event_of(&RawOrder::of_value(order), customer, stores, produced_at)
}

/// [`order_event`] over the typed view (the push path reads a webhook body straight into it).
pub(crate) fn order_event_of(
    order: &RawOrder<'_>,
    customer: Option<&Value>,
    stores: &Stores,
    produced_at: i64,
) -> Result<CommerceEvent, NormalizeError> {
    let entity_id = int(&order.entity_id, "entity_id")?;
    let created_at = time(&order.created_at, "created_at")?;
    let updated_at = time(&order.updated_at, "updated_at")?;
    let email = ids::normalise_email(text(&order.customer_email, "customer_email")?);
    let is_guest = order.customer_is_guest.int() == Some(1) || order.customer_id.int().is_none();
    let customer_id = if is_guest { None } else { order.customer_id.int() };
    let store_id = int(&order.store_id, "store_id")?;
    let items = items(order)?;
    let total_qty = items
        .iter()
        .filter(|i| i.parent_item_id.is_none())
        .try_fold(Decimal4::ZERO, |acc, i| acc.checked_add(i.qty_ordered))
        .ok_or(NormalizeError::Invalid { field: "qty_ordered", reason: "overflow".into() })?;
    let shipping = order.shipping();
    let billing = order.billing_address.0.as_ref().map(address);
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
            increment_id: text(&order.increment_id, "increment_id")?.to_owned(),
            state: text(&order.state, "state")?.to_owned(),
            status: text(&order.status, "status")?.to_owned(),
            currency: opt_text(&order.order_currency_code).ok_or(NormalizeError::Missing("order_currency_code"))?,
            created_at,
            totals: OrderTotals {
                grand_total: decimal(&order.grand_total, "grand_total")?,
                subtotal: decimal(&order.subtotal, "subtotal")?,
                tax: decimal(&order.tax_amount, "tax_amount")?,
                shipping: decimal(&order.shipping_amount, "shipping_amount")?,
                discount: decimal(&order.discount_amount, "discount_amount")?,
                total_qty_ordered: total_qty,
            },
            items,
            shipping_address: shipping.and_then(|s| s.address.0.as_ref()).map(address),
            billing_address: billing.clone(),
            payment_method: order.payment.0.as_ref().and_then(|p| opt_text_any(&p.method)),
            shipping_method: shipping.and_then(|s| opt_text_any(&s.method)),
            inventory_status: InventoryStatus::Unchecked,
        }),
        customer: Some(Customer {
            customer_id,
            is_guest,
            email,
            firstname: opt_text(&order.customer_firstname),
            lastname: opt_text(&order.customer_lastname),
            group_id: order.customer_group_id.int().map(|g| g as i32),
            phone: billing.and_then(|b| b.telephone),
            consent: consent_of(customer),
        }),
        erasure: None,
    };
    event.event_id = version_id("order", &event);
    Ok(event)
}

/// Any text, the empty one included (as `Value::as_str` read it).
fn opt_text_any(v: &Scalar<'_>) -> Option<String> {
    match v {
        Scalar::Str(s) => Some(s.to_string()),
        _ => None,
    }
}

fn store_ref(stores: &Stores, store_id: i64) -> StoreRef {
    let (store_code, website_id) = stores.0.get(&store_id).cloned().map_or((None, None), |(c, w)| (Some(c), Some(w)));
    StoreRef { store_id: store_id as i32, store_code, website_id }
}

#[cfg(test)]
mod tests;
