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
    Address, CommerceEvent, CommerceEventType, ConsentStatus, Customer, CustomerErasure, Decimal4, InventoryStatus,
    MarketingConsent, Order, OrderItem, OrderTotals, SourceVersion, StoreRef, ids,
};
use serde_json::Value;

/// Why a payload cannot become an event (a 4xx on push, a DLQ record on poll).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NormalizeError {
    #[error("missing or empty field {0}")]
    Missing(&'static str),
    #[error("field {field} is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Store views known to the deployment: id → (code, website id).
#[derive(Clone, Debug, Default)]
pub struct Stores(pub HashMap<i64, (String, i32)>);

/// Parses Magento's UTC `YYYY-MM-DD HH:MM:SS` (a `T` separator and fractions are tolerated).
pub fn parse_magento_time(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b' ' || b[10] == b'T')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let n = |r: std::ops::Range<usize>| text.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, s) = (n(0..4)?, n(5..7)?, n(8..10)?, n(11..13)?, n(14..16)?, n(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 + s) * 1000)
}

/// Formats epoch milliseconds as Magento's `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn format_magento_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

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
    Ok(CommerceEvent {
        event_id: ids::event_id(&["magento", "order", &entity, &updated_at.to_string()]),
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
    })
}

/// Marketing consent from a customer record (`extension_attributes.is_subscribed`, Magento's
/// newsletter subscription, the opt-in LGPD's "consent" basis rests on). Unknown without a record.
pub fn consent_of(customer: Option<&Value>) -> MarketingConsent {
    let status = match customer.and_then(|c| c.pointer("/extension_attributes/is_subscribed")).and_then(Value::as_bool)
    {
        Some(true) => ConsentStatus::Granted,
        Some(false) => ConsentStatus::Declined,
        None => ConsentStatus::Unknown,
    };
    MarketingConsent {
        status,
        legal_basis: (status != ConsentStatus::Unknown).then(|| "consent".to_owned()),
        updated_at: customer.and_then(|c| c.get("updated_at")).and_then(Value::as_str).and_then(parse_magento_time),
    }
}

fn store_ref(stores: &Stores, store_id: i64) -> StoreRef {
    let (store_code, website_id) = stores.0.get(&store_id).cloned().map_or((None, None), |(c, w)| (Some(c), Some(w)));
    StoreRef { store_id: store_id as i32, store_code, website_id }
}

/// `CUSTOMER_CHANGED` from a customer record (`GET /V1/customers/{id}`), keyed `c:<id>`.
pub fn customer_event(customer: &Value, stores: &Stores, produced_at: i64) -> Result<CommerceEvent, NormalizeError> {
    let id = int(customer, "id")?;
    let updated_at = time(customer, "updated_at")?;
    let email = ids::normalise_email(text(customer, "email")?);
    let entity = id.to_string();
    // The default billing address holds the phone Magento knows for the person.
    let addresses = customer.get("addresses").and_then(Value::as_array);
    let billing = addresses.and_then(|a| {
        a.iter().find(|x| x.get("default_billing").and_then(Value::as_bool) == Some(true)).or_else(|| a.first())
    });
    Ok(CommerceEvent {
        event_id: ids::event_id(&["magento", "customer", &entity, &updated_at.to_string()]),
        event_type: CommerceEventType::CustomerChanged,
        source_system: "magento".into(),
        source_version: SourceVersion { entity_type: "customer".into(), entity_id: entity, updated_at },
        occurred_at: updated_at,
        produced_at,
        customer_key: ids::customer_key(Some(id), &email),
        store: store_ref(stores, opt_int(customer, "store_id").unwrap_or(0)),
        order: None,
        customer: Some(Customer {
            customer_id: Some(id),
            is_guest: false,
            email,
            firstname: opt_text(customer, "firstname"),
            lastname: opt_text(customer, "lastname"),
            group_id: opt_int(customer, "group_id").map(|g| g as i32),
            phone: billing.and_then(|b| opt_text(b, "telephone")),
            consent: consent_of(Some(customer)),
        }),
        erasure: None,
    })
}

/// Who must be forgotten, and why (`customer_deleted` or `erasure_request`).
#[derive(Clone, Debug, PartialEq)]
pub struct ErasureRequest {
    pub customer_id: Option<i64>,
    pub email: String,
    pub reason: &'static str,
    pub store_id: i64,
    /// When the deletion or request happened (ms, UTC).
    pub requested_at: i64,
}

/// `CUSTOMER_ERASED` events: one on the registered key `c:<id>` and one on the e-mail's guest
/// key `g:<sha256>`, so consumers partitioned by customer key see the erasure wherever that
/// person's history lives. The address itself is not republished: only its hash.
pub fn erasure_events(
    request: &ErasureRequest,
    stores: &Stores,
    produced_at: i64,
) -> Result<Vec<CommerceEvent>, NormalizeError> {
    let email = ids::normalise_email(&request.email);
    if email.is_empty() || !email.contains('@') {
        return Err(NormalizeError::Invalid { field: "email", reason: "an erasure needs the person's e-mail".into() });
    }
    let mut keys = vec![ids::customer_key(None, &email)];
    if let Some(id) = request.customer_id {
        keys.insert(0, ids::customer_key(Some(id), &email));
    }
    Ok(keys
        .into_iter()
        .map(|key| CommerceEvent {
            event_id: ids::event_id(&["magento", "customer-erased", &key, request.reason]),
            event_type: CommerceEventType::CustomerErased,
            source_system: "magento".into(),
            source_version: SourceVersion {
                entity_type: "customer".into(),
                entity_id: request.customer_id.map_or_else(|| key.clone(), |id| id.to_string()),
                updated_at: request.requested_at,
            },
            occurred_at: request.requested_at,
            produced_at,
            customer_key: key,
            store: store_ref(stores, request.store_id),
            order: None,
            customer: None,
            erasure: Some(CustomerErasure {
                customer_id: request.customer_id,
                email_sha256: ids::email_sha256(&email),
                reason: request.reason.to_owned(),
            }),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stores() -> Stores {
        Stores([(1, ("default".to_owned(), 1)), (2, ("br".to_owned(), 1))].into_iter().collect())
    }

    /// Orders exactly as the sandbox's Magento simulator serves them.
    fn sandbox_orders(n: usize) -> Vec<Value> {
        let mut shop = sandbox::magento::Magento::new(Default::default(), Default::default());
        shop.generate(n);
        shop.orders.values().cloned().collect()
    }

    #[test]
    fn magento_times_are_utc() {
        assert_eq!(parse_magento_time("1970-01-01 00:00:00"), Some(0));
        assert_eq!(parse_magento_time("2026-11-01 00:00:00"), Some(1_793_491_200_000));
        assert_eq!(parse_magento_time("2026-11-01T00:00:01"), Some(1_793_491_201_000));
        assert_eq!(parse_magento_time("2026-13-01 00:00:00"), None);
        assert_eq!(parse_magento_time("yesterday"), None);
        for ms in [0, 1_793_491_201_000, 951_782_400_000, 4_102_444_799_000] {
            assert_eq!(parse_magento_time(&format_magento_time(ms)), Some(ms), "{ms}");
        }
    }

    #[test]
    fn every_generated_order_normalises_and_encodes() {
        for order in sandbox_orders(400) {
            let event = order_event(&order, None, &stores(), 0).unwrap_or_else(|e| panic!("{e}: {order}"));
            elo_events::codec::encode_body(&event).expect("fits the Avro contract");
            let o = event.order.as_ref().unwrap();
            assert_eq!(o.totals.grand_total, Decimal4::parse(&order["grand_total"].to_string()).unwrap());
            assert_eq!(event.store.store_code.as_deref(), Some(if order["store_id"] == 1 { "default" } else { "br" }));
            if order["customer_is_guest"] == 1 {
                assert!(event.customer_key.starts_with("g:") && event.customer.as_ref().unwrap().is_guest);
            } else {
                assert_eq!(event.customer_key, format!("c:{}", order["customer_id"]));
            }
        }
    }

    #[test]
    fn configurable_lines_collapse_and_bundles_keep_their_children() {
        let orders = sandbox_orders(400);
        let configurable = orders
            .iter()
            .find(|o| o["items"].as_array().unwrap().iter().any(|i| i["product_type"] == "configurable"))
            .expect("a configurable order");
        let event = order_event(configurable, None, &stores(), 0).unwrap();
        let lines = &event.order.as_ref().unwrap().items;
        let raw = configurable["items"].as_array().unwrap();
        let children = raw.iter().filter(|i| i["parent_item"]["product_type"] == "configurable").count();
        assert_eq!(lines.len(), raw.len() - children, "each configurable child folds into its parent");
        let line = lines.iter().find(|l| l.product_type == "configurable").unwrap();
        assert!(line.price > Decimal4::ZERO, "the collapsed line keeps the parent's price");
        let top_level_qty: i64 = raw
            .iter()
            .filter(|i| i["parent_item_id"].is_null())
            .map(|i| i["qty_ordered"].as_f64().unwrap() as i64)
            .sum();
        assert_eq!(
            event.order.as_ref().unwrap().totals.total_qty_ordered,
            Decimal4::from_units(top_level_qty),
            "quantities counted once"
        );

        let bundle = orders
            .iter()
            .find(|o| o["items"].as_array().unwrap().iter().any(|i| i["product_type"] == "bundle"))
            .expect("a bundle order");
        let event = order_event(bundle, None, &stores(), 0).unwrap();
        let lines = &event.order.as_ref().unwrap().items;
        let parent = lines.iter().find(|l| l.product_type == "bundle").unwrap();
        let kids: Vec<_> = lines.iter().filter(|l| l.parent_item_id == Some(parent.item_id)).collect();
        assert!(
            !kids.is_empty() && kids.iter().all(|k| k.price > Decimal4::ZERO),
            "bundle children carry their prices"
        );
    }

    #[test]
    fn the_same_order_version_gives_the_same_event_id() {
        let order = sandbox_orders(10).remove(3);
        let a = order_event(&order, None, &stores(), 1).unwrap();
        let b = order_event(&order, None, &stores(), 999).unwrap();
        assert_eq!(a.event_id, b.event_id, "produced_at is not part of the id");
        let mut changed = order.clone();
        changed["updated_at"] = Value::String("2030-01-01 00:00:00".into());
        changed["status"] = Value::String("processing".into());
        let c = order_event(&changed, None, &stores(), 1).unwrap();
        assert_ne!(a.event_id, c.event_id);
        assert_eq!(c.event_type, CommerceEventType::OrderChanged);
    }

    #[test]
    fn consent_comes_from_the_customer_record() {
        let order = sandbox_orders(30).into_iter().find(|o| o["customer_is_guest"] == 0).unwrap();
        let customer =
            serde_json::json!({"updated_at": "2026-11-01 10:00:00", "extension_attributes": {"is_subscribed": true}});
        let event = order_event(&order, Some(&customer), &stores(), 0).unwrap();
        let consent = &event.customer.unwrap().consent;
        assert_eq!(consent.status, ConsentStatus::Granted);
        assert_eq!(consent.updated_at, parse_magento_time("2026-11-01 10:00:00"));
    }

    #[test]
    fn broken_payloads_say_what_is_wrong() {
        let order = sandbox_orders(3).remove(0);
        for (field, value, expected) in [
            ("entity_id", Value::Null, NormalizeError::Missing("entity_id")),
            ("customer_email", Value::String(String::new()), NormalizeError::Missing("customer_email")),
            ("items", serde_json::json!([]), NormalizeError::Missing("items")),
        ] {
            let mut broken = order.clone();
            broken[field] = value;
            assert_eq!(order_event(&broken, None, &stores(), 0).unwrap_err(), expected);
        }
        let mut bad_time = order.clone();
        bad_time["updated_at"] = Value::String("28/11/2026".into());
        assert!(matches!(
            order_event(&bad_time, None, &stores(), 0),
            Err(NormalizeError::Invalid { field: "updated_at", .. })
        ));
        let mut bad_money = order;
        bad_money["grand_total"] = Value::String("12,50".into());
        assert!(matches!(
            order_event(&bad_money, None, &stores(), 0),
            Err(NormalizeError::Invalid { field: "grand_total", .. })
        ));
    }

    #[test]
    fn customers_normalise_with_consent_phone_and_store() {
        let mut magento = sandbox::magento::Magento::new(Default::default(), Default::default());
        magento.generate(30);
        let stores = Stores([(1, ("default".to_owned(), 1)), (2, ("br".to_owned(), 1))].into_iter().collect());
        for customer in magento.customers.values() {
            let json = customer.to_json();
            let event = customer_event(&json, &stores, 5).unwrap();
            assert_eq!(event.event_type, CommerceEventType::CustomerChanged);
            assert_eq!(event.customer_key, format!("c:{}", customer.id));
            assert_eq!(event.store.store_code.as_deref(), Some(if customer.store_id == 1 { "default" } else { "br" }));
            let person = event.customer.as_ref().unwrap();
            assert_eq!(person.phone.as_deref(), json["addresses"][0]["telephone"].as_str());
            let expected = if customer.subscribed { ConsentStatus::Granted } else { ConsentStatus::Declined };
            assert_eq!(person.consent.status, expected);
            assert_eq!(event.event_id, customer_event(&json, &stores, 99).unwrap().event_id, "stable id");
            let body = elo_events::codec::encode_body(&event).expect("fits the Avro contract");
            assert_eq!(elo_events::codec::decode_direct::<CommerceEvent>(&body).unwrap(), event);
        }
        let mut broken = magento.customers[&1].to_json();
        broken["email"] = Value::Null;
        assert_eq!(customer_event(&broken, &stores, 0).unwrap_err(), NormalizeError::Missing("email"));
    }

    #[test]
    fn erasures_need_an_email_and_never_carry_it() {
        let request = ErasureRequest {
            customer_id: Some(7),
            email: " Ana@Example.com".into(),
            reason: "customer_deleted",
            store_id: 2,
            requested_at: 1_000,
        };
        let events = erasure_events(&request, &Stores::default(), 2_000).unwrap();
        let keys: Vec<&str> = events.iter().map(|e| e.customer_key.as_str()).collect();
        assert_eq!(keys, ["c:7", &ids::customer_key(None, "ana@example.com")]);
        assert!(
            events.iter().all(|e| e.erasure.as_ref().unwrap().email_sha256 == ids::email_sha256("ana@example.com"))
        );
        assert_ne!(events[0].event_id, events[1].event_id);
        assert_eq!(events, erasure_events(&request, &Stores::default(), 2_000).unwrap(), "deterministic");
        let nobody = ErasureRequest { email: "not-an-email".into(), ..request };
        assert!(erasure_events(&nobody, &Stores::default(), 0).is_err());
    }
}
