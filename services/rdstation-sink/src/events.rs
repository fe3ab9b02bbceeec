//! RD Station `ECOMMERCE_*` events from orders, with the payload mapping in a configuration
//! file (`config/events.toml` is the embedded default): RD's payload schema for these events is
//! unconfirmed, so following RD's documentation must not need a release.
//!
//! An event is identified by the order and the RD event type (not by the Magento version that
//! revealed it): an order changed three times while `processing` is paid once. That id is the
//! sent-log key.

use std::collections::BTreeMap;
use std::path::Path;

use elo_events::{CommerceEvent, Decimal4, Order, OrderItem};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The embedded default mapping.
pub const DEFAULT_MAPPING: &str = include_str!("../config/events.toml");

const ORDER_SOURCES: &[&str] = &[
    "customer.email",
    "customer.name",
    "customer.phone",
    "order.id",
    "order.status",
    "order.currency",
    "order.total",
    "order.discount",
    "order.shipping",
    "order.payment_method",
    "order.shipping_city",
    "order.shipping_state",
    "order.shipping_country",
    "order.items",
];
const ITEM_SOURCES: &[&str] =
    &["item.product_id", "item.sku", "item.name", "item.quantity", "item.price", "item.total"];

#[derive(Debug, thiserror::Error)]
#[error("event mapping {origin}: {message}")]
pub struct MappingError {
    origin: String,
    message: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MappingFile {
    lifecycle: Vec<Lifecycle>,
    #[serde(default)]
    payload: BTreeMap<String, BTreeMap<String, String>>,
    #[serde(default)]
    items: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Lifecycle {
    event: String,
    statuses: Vec<String>,
}

/// The validated mapping.
#[derive(Clone, Debug)]
pub struct EventMapping {
    lifecycle: Vec<Lifecycle>,
    payloads: BTreeMap<String, BTreeMap<String, String>>,
    items: BTreeMap<String, String>,
}

/// One event to send.
#[derive(Clone, Debug, PartialEq)]
pub struct RdEvent {
    /// Deterministic id of (order, event type): the sent-log key.
    pub id: String,
    pub event_type: String,
    pub order_id: String,
    pub body: Value,
}

/// A sent-log entry: RD acknowledged this event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sent {
    pub event_type: String,
    pub order_id: String,
    pub source_event_id: String,
    pub rd_event_uuid: Option<String>,
    pub sent_at_ms: i64,
    /// The order's `created_at` (it never changes, whatever version of the order comes
    /// later): the entry ages from it, and an order older than the retention gets no event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_created_at_ms: Option<i64>,
}

impl Sent {
    /// When the entry ages out of the sent-log (entries written before `order_created_at_ms`
    /// existed age from when they were sent, which is never before the order was created).
    pub fn aged_from_ms(&self) -> i64 {
        self.order_created_at_ms.unwrap_or(self.sent_at_ms)
    }
}

impl EventMapping {
    pub fn default_mapping() -> Self {
        Self::parse(DEFAULT_MAPPING, "embedded default").expect("the embedded event mapping is valid")
    }

    pub fn load(path: &Path) -> Result<Self, MappingError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| MappingError { origin: origin.clone(), message: e.to_string() })?;
        Self::parse(&text, &origin)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, MappingError> {
        let error = |message: String| MappingError { origin: origin.to_owned(), message };
        let file: MappingFile = toml::from_str(text).map_err(|e| error(e.to_string()))?;
        for l in &file.lifecycle {
            if !l.event.starts_with("ECOMMERCE_") {
                return Err(error(format!(
                    "{}: only ECOMMERCE_* events are sent (the legacy family was removed)",
                    l.event
                )));
            }
        }
        for (event, keys) in &file.payload {
            if event != "common" && !file.lifecycle.iter().any(|l| &l.event == event) {
                return Err(error(format!("payload for {event}, which no lifecycle entry produces")));
            }
            for (key, source) in keys {
                if !source.is_empty() && !ORDER_SOURCES.contains(&source.as_str()) {
                    return Err(error(format!("{event}.{key}: unknown source {source:?} (one of {ORDER_SOURCES:?})")));
                }
            }
        }
        for (key, source) in &file.items {
            if !ITEM_SOURCES.contains(&source.as_str()) {
                return Err(error(format!("items.{key}: unknown source {source:?} (one of {ITEM_SOURCES:?})")));
            }
        }
        Ok(Self { lifecycle: file.lifecycle, payloads: file.payload, items: file.items })
    }

    /// Every event type the mapping can produce.
    pub fn event_types(&self) -> Vec<&str> {
        self.lifecycle.iter().map(|l| l.event.as_str()).collect()
    }

    /// The events an order version calls for (the sent-log decides which still need sending).
    pub fn events_for(&self, event: &CommerceEvent) -> Vec<RdEvent> {
        let (Some(order), Some(customer)) = (&event.order, &event.customer) else { return Vec::new() };
        let status = order.status.to_ascii_lowercase();
        self.lifecycle
            .iter()
            .filter(|l| l.statuses.iter().any(|s| s == "*" || s.eq_ignore_ascii_case(&status)))
            .map(|l| {
                let mut keys = self.payloads.get("common").cloned().unwrap_or_default();
                for (k, v) in self.payloads.get(&l.event).into_iter().flatten() {
                    keys.insert(k.clone(), v.clone());
                }
                let mut payload = Map::new();
                for (key, source) in keys.iter().filter(|(_, s)| !s.is_empty()) {
                    if let Some(value) = self.resolve(source, order, customer) {
                        payload.insert(key.clone(), value);
                    }
                }
                RdEvent {
                    id: event_key(order.entity_id, &l.event),
                    event_type: l.event.clone(),
                    order_id: order.increment_id.clone(),
                    body: serde_json::json!({"event_type": l.event, "event_family": "CDP", "payload": payload}),
                }
            })
            .collect()
    }

    fn resolve(&self, source: &str, order: &Order, customer: &elo_events::Customer) -> Option<Value> {
        let shipping = order.shipping_address.as_ref().or(order.billing_address.as_ref());
        let text = |s: &Option<String>| s.clone().filter(|s| !s.is_empty()).map(Value::String);
        match source {
            "customer.email" => Some(Value::String(elo_events::ids::normalise_email(&customer.email))),
            "customer.name" => {
                let name = [customer.firstname.as_deref(), customer.lastname.as_deref()]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" ");
                (!name.is_empty()).then_some(Value::String(name))
            }
            "customer.phone" => text(&customer.phone),
            "order.id" => Some(Value::String(order.increment_id.clone())),
            "order.status" => Some(Value::String(order.status.clone())),
            "order.currency" => Some(Value::String(order.currency.clone())),
            "order.total" => Some(number(order.totals.grand_total)),
            "order.discount" => Some(number(order.totals.discount)),
            "order.shipping" => Some(number(order.totals.shipping)),
            "order.payment_method" => text(&order.payment_method),
            "order.shipping_city" => shipping.and_then(|a| text(&a.city)),
            "order.shipping_state" => shipping.and_then(|a| text(&a.region_code).or_else(|| text(&a.region))),
            "order.shipping_country" => shipping.and_then(|a| text(&a.country_id)),
            "order.items" => Some(Value::Array(
                order.items.iter().filter(|i| i.parent_item_id.is_none()).map(|i| self.item(i)).collect(),
            )),
            _ => None,
        }
    }

    fn item(&self, item: &OrderItem) -> Value {
        let mut out = Map::new();
        for (key, source) in &self.items {
            let value = match source.as_str() {
                "item.product_id" => {
                    Value::String(item.product_id.map_or_else(|| item.sku.clone(), |id| id.to_string()))
                }
                "item.sku" => Value::String(item.sku.clone()),
                "item.name" => Value::String(item.name.clone()),
                "item.quantity" => Value::from(item.qty_ordered.unscaled().div_euclid(Decimal4::SCALE).max(1)),
                "item.price" => number(item.price),
                "item.total" => number(item.row_total),
                _ => continue,
            };
            out.insert(key.clone(), value);
        }
        Value::Object(out)
    }
}

/// The sent-log key of (order, RD event type).
pub fn event_key(order_entity_id: i64, event_type: &str) -> String {
    elo_events::ids::event_id(&["rdstation", "order", &order_entity_id.to_string(), event_type])
}

fn number(amount: Decimal4) -> Value {
    serde_json::Number::from_f64(amount.unscaled() as f64 / Decimal4::SCALE as f64).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use elo_events::sample;

    use super::*;

    #[test]
    fn placed_order_gives_one_placed_event_with_items() {
        let mapping = EventMapping::default_mapping();
        let event = sample::order_placed(1);
        let events = mapping.events_for(&event);
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!(e.event_type, "ECOMMERCE_ORDER_PLACED");
        let p = &e.body["payload"];
        assert_eq!(p["email"], "customer1@example.com");
        assert_eq!(p["order_id"], "000000002");
        assert_eq!(p["shipping_state"], "SP");
        assert_eq!(p["items"][0]["quantity"], 2);
        assert!(p["total_value"].as_f64().unwrap() > 0.0);
        assert_eq!(e.body["event_family"], "CDP");
    }

    #[test]
    fn a_completed_order_calls_for_its_whole_chain_with_stable_ids() {
        let mapping = EventMapping::default_mapping();
        let mut event = sample::order_placed(1);
        event.order.as_mut().unwrap().status = "complete".into();
        let types: Vec<String> = mapping.events_for(&event).into_iter().map(|e| e.event_type).collect();
        assert_eq!(types, ["ECOMMERCE_ORDER_PLACED", "ECOMMERCE_ORDER_PAID", "ECOMMERCE_ORDER_FULFILLED"]);
        let placed = &mapping.events_for(&sample::order_placed(1))[0];
        assert_eq!(mapping.events_for(&event)[0].id, placed.id, "the id names the order and type, not the version");
    }

    #[test]
    fn refuses_legacy_events_and_unknown_sources() {
        let legacy = "[[lifecycle]]\nevent = \"ORDER_PLACED\"\nstatuses = [\"*\"]\n";
        assert!(EventMapping::parse(legacy, "t").is_err());
        let unknown = "[[lifecycle]]\nevent = \"ECOMMERCE_ORDER_PLACED\"\nstatuses = [\"*\"]\n[payload.common]\nx = \"order.nope\"\n";
        assert!(EventMapping::parse(unknown, "t").unwrap_err().to_string().contains("order.nope"));
    }
}
