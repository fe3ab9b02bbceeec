use elo_events::ConsentStatus;

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
    let top_level_qty: i64 =
        raw.iter().filter(|i| i["parent_item_id"].is_null()).map(|i| i["qty_ordered"].as_f64().unwrap() as i64).sum();
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
    assert!(!kids.is_empty() && kids.iter().all(|k| k.price > Decimal4::ZERO), "bundle children carry their prices");
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
        request_ref: None,
    };
    let events = erasure_events(&request, &Stores::default(), 2_000).unwrap();
    let keys: Vec<&str> = events.iter().map(|e| e.customer_key.as_str()).collect();
    assert_eq!(keys, ["c:7", &ids::customer_key(None, "ana@example.com")]);
    assert!(events.iter().all(|e| e.erasure.as_ref().unwrap().email_sha256 == ids::email_sha256("ana@example.com")));
    assert_ne!(events[0].event_id, events[1].event_id);
    assert_eq!(events, erasure_events(&request, &Stores::default(), 2_000).unwrap(), "deterministic");
    let nobody = ErasureRequest { email: "not-an-email".into(), ..request };
    assert!(erasure_events(&nobody, &Stores::default(), 0).is_err());
}

#[test]
fn two_versions_saved_in_the_same_second_get_two_ids_and_every_read_path_gets_the_same_one() {
    let mut shop = sandbox::magento::Magento::new(Default::default(), Default::default());
    shop.generate(10);
    let full = shop.orders[&4].clone();
    let first = order_event(&full, None, &stores(), 1).unwrap();
    // A status change committed within the same second: same updated_at, new content.
    let mut second = full.clone();
    second["status"] = Value::String("holded".into());
    let second = order_event(&second, None, &stores(), 1).unwrap();
    assert_eq!(first.source_version, second.source_version, "Magento cannot tell them apart by time");
    assert_ne!(first.event_id, second.event_id, "different versions never share an id");

    // A search page (no shipping_assignments, as Magento's order list) names the same fact.
    let criteria = sandbox::magento::search::SearchCriteria { current_page: 1, ..Default::default() };
    let orders: Vec<Value> = shop.orders.values().cloned().collect();
    let page = sandbox::magento::search::run(orders, &criteria, 300, true);
    let listed = page["items"].as_array().unwrap().iter().find(|o| o["entity_id"] == 4).unwrap().clone();
    let polled = order_event(&listed, None, &stores(), 2).unwrap();
    assert_eq!(polled.event_id, first.event_id, "poll and push agree");
    // Enrichment (consent here) is not part of the fact.
    let customer = serde_json::json!({"extension_attributes": {"is_subscribed": true}});
    assert_eq!(order_event(&full, Some(&customer), &stores(), 3).unwrap().event_id, first.event_id);
}

#[test]
fn a_customer_changing_consent_within_a_second_is_a_new_version() {
    let mut magento = sandbox::magento::Magento::new(Default::default(), Default::default());
    magento.generate(5);
    let record = magento.customers[&1].to_json();
    let mut flipped = record.clone();
    let subscribed = record["extension_attributes"]["is_subscribed"].as_bool().unwrap();
    flipped["extension_attributes"]["is_subscribed"] = Value::Bool(!subscribed);
    let (a, b) = (customer_event(&record, &stores(), 0).unwrap(), customer_event(&flipped, &stores(), 0).unwrap());
    assert_eq!(a.source_version, b.source_version);
    assert_ne!(a.event_id, b.event_id);
}

#[test]
fn a_repeated_erasure_request_is_a_new_fact_and_a_retried_delivery_is_not() {
    let request = ErasureRequest {
        customer_id: Some(7),
        email: "ana@example.com".into(),
        reason: "erasure_request",
        store_id: 1,
        requested_at: 1_000,
        request_ref: Some("req-1".into()),
    };
    let first = erasure_events(&request, &Stores::default(), 0).unwrap();
    let retried = erasure_events(&request, &Stores::default(), 5).unwrap();
    assert_eq!(first[0].event_id, retried[0].event_id, "the same notification delivered twice");
    let again = ErasureRequest { requested_at: 90_000, request_ref: Some("req-2".into()), ..request.clone() };
    let again = erasure_events(&again, &Stores::default(), 0).unwrap();
    assert_ne!(first[0].event_id, again[0].event_id, "asking again is a new fact");
    let same_second = ErasureRequest { request_ref: Some("req-3".into()), ..request };
    assert_ne!(erasure_events(&same_second, &Stores::default(), 0).unwrap()[0].event_id, first[0].event_id);
}

/// The push path reads a webhook's bytes straight into the typed view; poll and refetch read a
/// parsed `Value`. One fact must give one event (id included) whichever way it came in.
fn from_bytes(order: &Value) -> Result<CommerceEvent, NormalizeError> {
    let bytes = serde_json::to_vec(order).unwrap();
    let text = crate::json::quote_fractions(&bytes);
    let raw: raw::RawOrder<'_> = serde_json::from_slice(&text).expect("lenient view reads any object");
    order_event_of(&raw, None, &stores(), 7)
}

#[test]
fn bytes_and_parsed_values_give_the_same_event() {
    for order in sandbox_orders(300) {
        let lossless = crate::json::parse_lossless(&serde_json::to_vec(&order).unwrap()).unwrap();
        assert_eq!(from_bytes(&order), order_event(&lossless, None, &stores(), 7), "{order}");
    }
}

#[test]
fn loose_types_are_read_alike_and_refused_by_field_name() {
    let base = sandbox_orders(1).remove(0);
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut order = base.clone();
        edit(&mut order);
        order
    };
    let cases = [
        with(&|o| o["entity_id"] = Value::from(o["entity_id"].to_string())), // id as text
        with(&|o| o["billing_address"] = Value::from("not an address")),
        with(&|o| o["billing_address"]["region"] = serde_json::json!({"region": "São Paulo", "region_id": 508})),
        with(&|o| o["billing_address"]["street"] = serde_json::json!(["Rua \"A\" \\ 1", 2, null])),
        with(&|o| o["customer_firstname"] = Value::from("Zoë \u{1F600} \"quoted\"")),
        with(&|o| o["extension_attributes"] = Value::from(3)),
        with(&|o| o["payment"] = serde_json::json!({"method": ""})),
        with(&|o| o["customer_is_guest"] = Value::from(true)),
    ];
    for order in &cases {
        let lossless = crate::json::parse_lossless(&serde_json::to_vec(order).unwrap()).unwrap();
        let (typed, parsed) = (from_bytes(order), order_event(&lossless, None, &stores(), 7));
        assert!(typed.is_ok(), "{typed:?}: {order}");
        assert_eq!(typed, parsed, "{order}");
    }
    let event = from_bytes(&cases[2]).unwrap();
    assert_eq!(event.order.unwrap().billing_address.unwrap().region.as_deref(), Some("São Paulo"));
    assert_eq!(from_bytes(&cases[1]).unwrap().order.unwrap().billing_address, None);
    let street = from_bytes(&cases[3]).unwrap().order.unwrap().billing_address.unwrap().street;
    assert_eq!(street, vec!["Rua \"A\" \\ 1".to_owned()], "escapes decoded, non-text lines dropped");

    let refused = [
        (with(&|o| o["entity_id"] = Value::from("12a")), "entity_id"),
        (with(&|o| o["entity_id"] = Value::from(1.5)), "entity_id"),
        (with(&|o| o["store_id"] = serde_json::json!({"id": 1})), "store_id"),
        (with(&|o| o["grand_total"] = Value::from(true)), "grand_total"),
        (with(&|o| o["grand_total"] = serde_json::json!([1])), "grand_total"),
        (with(&|o| o["items"] = Value::from("none")), "items"),
        (with(&|o| o["items"] = serde_json::json!(["not a line"])), "item_id"),
        (with(&|o| o["items"][0]["sku"] = Value::from("")), "sku"),
        (with(&|o| o["updated_at"] = Value::from("yesterday")), "updated_at"),
    ];
    for (order, field) in &refused {
        let lossless = crate::json::parse_lossless(&serde_json::to_vec(order).unwrap()).unwrap();
        let (typed, parsed) = (from_bytes(order), order_event(&lossless, None, &stores(), 7));
        assert_eq!(typed.as_ref().map_err(NormalizeError::field), Err(*field), "{order}");
        assert_eq!(typed, parsed);
    }
}
