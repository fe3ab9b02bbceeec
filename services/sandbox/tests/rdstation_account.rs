//! RD Station Marketing as saas-apis.md §7 describes it: legacy e-commerce events gone (unless
//! the account is an old one), `ECOMMERCE_*` payloads validated, the batch taking the same
//! types, tag rules, custom fields that must exist, and the documented error shapes.

mod common;

use common::rdstation::Rd;
use reqwest::Method;
use sandbox::rdstation::RdConfig;
use serde_json::{Value, json};

fn event(event_type: &str, payload: Value) -> Value {
    json!({"event_type": event_type, "event_family": "CDP", "payload": payload})
}

fn legacy_order() -> Value {
    event(
        "ORDER_PLACED",
        json!({"email": "a@b.c", "cf_order_id": "100000001", "cf_order_total_items": 2, "cf_order_status": "new", "cf_order_payment_method": "Credit Card", "cf_order_payment_amount": 199.9}),
    )
}

fn paths(body: &Value) -> Vec<String> {
    body["errors"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn legacy_ecommerce_events_are_refused_unless_the_account_is_an_old_one() {
    let rd = Rd::start(RdConfig::default()).await;
    for legacy in ["ORDER_PLACED", "ORDER_PLACED_ITEM", "CART_ABANDONED", "CART_ABANDONED_ITEM"] {
        let (s, _, b) = rd.send(Method::POST, "/platform/events", Some(event(legacy, json!({"email": "a@b.c"})))).await;
        assert_eq!(s, 400, "{legacy}");
        assert_eq!(b["errors"][0]["error_type"], "INVALID_OPTION", "{legacy}: like an unknown type");
        assert_eq!(b["errors"][0]["path"], "$.body.event_type");
    }
    let (s, _, b) = rd.send(Method::POST, "/platform/events/batch", Some(json!([legacy_order()]))).await;
    assert_eq!((s.as_u16(), paths(&b)), (400, vec!["$[0].event_type".to_owned()]));

    let old = Rd::start(RdConfig { legacy_ecommerce_events: true, ..RdConfig::default() }).await;
    let (s, _, b) = old.send(Method::POST, "/platform/events", Some(legacy_order())).await;
    assert_eq!(s, 200, "{b}");
    let (s, _, b) = old
        .send(
            Method::POST,
            "/platform/events",
            Some(event("ORDER_PLACED", json!({"email": "a@b.c", "cf_order_id": "1"}))),
        )
        .await;
    assert_eq!(s, 400);
    assert!(paths(&b).contains(&"$.body.payload.cf_order_payment_method".to_owned()), "{b}");
    let item = event(
        "ORDER_PLACED_ITEM",
        json!({"email": "a@b.c", "cf_order_id": "1", "cf_order_product_id": "p", "cf_custom": "x"}),
    );
    let (s, _, b) = old.send(Method::POST, "/platform/events", Some(item)).await;
    assert_eq!(s, 400, "ORDER_PLACED_ITEM rejects custom cf_ fields: {b}");
}

#[tokio::test]
async fn ecommerce_events_are_validated_against_the_schema_in_single_and_batch() {
    let rd = Rd::start(RdConfig::default()).await;
    let placed = event(
        "ECOMMERCE_ORDER_PLACED",
        json!({"email": "ana@example.com", "order_id": "100000042", "total_value": 199.9, "currency": "BRL",
            "items": [{"product_id": "SKU-001", "sku": "SKU-001", "quantity": 2, "price": 99.95}],
            "shipping_price": 10.0, "shipping_city": "São Paulo", "shipping_state": "SP", "shipping_country": "BR"}),
    );
    let (s, _, b) = rd.send(Method::POST, "/platform/events", Some(placed.clone())).await;
    assert_eq!(s, 200, "{b}");
    assert!(b["event_uuid"].is_string());
    let cancelled = event("ECOMMERCE_ORDER_CANCELLED", json!({"email": "ana@example.com", "order_id": "100000042"}));
    let (s, _, b) = rd.send(Method::POST, "/platform/events/batch", Some(json!([placed, cancelled]))).await;
    assert_eq!(s, 200, "the batch takes the same types: {b}");
    assert_eq!(b["events"].as_array().unwrap().len(), 2);

    let bad = event(
        "ECOMMERCE_ORDER_PLACED",
        json!({"order_id": 42, "total_value": "199.9", "items": [{"product_id": "p", "quantity": 1.5}], "coupom": "x"}),
    );
    let (s, _, b) = rd.send(Method::POST, "/platform/events", Some(bad)).await;
    assert_eq!(s, 400);
    let found = paths(&b);
    for path in [
        "$.body.payload.email",
        "$.body.payload.order_id",
        "$.body.payload.total_value",
        "$.body.payload.items[0].quantity",
        "$.body.payload.items[0].price",
        "$.body.payload.coupom",
    ] {
        assert!(found.contains(&path.to_owned()), "{path} in {found:?}");
    }
    let types: Vec<&str> = b["errors"].as_array().unwrap().iter().map(|e| e["error_type"].as_str().unwrap()).collect();
    assert!(
        types.contains(&"CANNOT_BE_NULL") && types.contains(&"MUST_BE_STRING") && types.contains(&"MUST_BE_INTEGER")
    );
}

#[tokio::test]
async fn tags_are_lower_case_and_tag_refuses_one_the_contact_has() {
    let rd = Rd::start(RdConfig::default()).await;
    let (s, _, b) =
        rd.send(Method::POST, "/platform/contacts", Some(json!({"email": "ana@example.com", "tags": ["VIP"]}))).await;
    assert_eq!(s, 400);
    assert_eq!(b["errors"]["tags"][0]["error_type"], "VALUES_MUST_BE_LOWERCASE", "{b}");
    let (s, _, _) =
        rd.send(Method::POST, "/platform/contacts", Some(json!({"email": "ana@example.com", "tags": ["vip"]}))).await;
    assert_eq!(s, 200);
    let tag = |tags: Value| {
        rd.send(Method::POST, "/platform/contacts/email:ana@example.com/tag", Some(json!({"tags": tags})))
    };
    let (s, _, b) = tag(json!(["Cliente"])).await;
    assert_eq!((s.as_u16(), b["errors"]["tags"][0]["error_type"].as_str()), (400, Some("VALUES_MUST_BE_LOWERCASE")));
    let (s, _, b) = tag(json!(["vip"])).await;
    assert_eq!(
        (s.as_u16(), b["errors"]["tags"][0]["error_type"].as_str()),
        (400, Some("VALUES_MUST_BE_UNIQUE")),
        "{b}"
    );
    let (s, _, b) = tag(json!(["cliente"])).await;
    assert_eq!(s, 200);
    assert_eq!(b["tags"], json!(["vip", "cliente"]));
    let (s, _, b) =
        rd.send(Method::PATCH, "/platform/contacts/email:ana@example.com", Some(json!({"tags": ["Novo"]}))).await;
    assert_eq!((s.as_u16(), b["errors"]["tags"][0]["error_type"].as_str()), (400, Some("VALUES_MUST_BE_LOWERCASE")));
}

#[tokio::test]
async fn custom_fields_must_exist_and_the_fields_api_lists_and_creates_them() {
    let rd = Rd::start(RdConfig::default()).await;
    let (s, _, fields) = rd.send(Method::GET, "/platform/contacts/fields", None).await;
    assert_eq!(s, 200);
    let ids: Vec<&str> =
        fields["fields"].as_array().unwrap().iter().map(|f| f["api_identifier"].as_str().unwrap()).collect();
    assert!(ids.contains(&"cf_magento_customer_id") && ids.contains(&"email") && ids.contains(&"birthdate"), "{ids:?}");

    let contact = json!({"email": "bia@example.com", "birthdate": "1990-05-17", "cf_magento_customer_id": "42"});
    let (s, _, b) = rd.send(Method::POST, "/platform/contacts", Some(contact)).await;
    assert_eq!(s, 200, "birthdate is standard and the seeded field exists: {b}");
    assert_eq!(b["birthdate"], "1990-05-17");

    let (s, _, b) = rd
        .send(
            Method::PATCH,
            "/platform/contacts/email:bia@example.com",
            Some(json!({"cf_loyalty_tier": "gold", "nickname": "B"})),
        )
        .await;
    assert_eq!(s, 400);
    assert_eq!(b["errors"]["error_type"], "INVALID_FIELDS", "the flat shape: {b}");
    let message = b["errors"]["error_message"].as_str().unwrap();
    assert!(message.starts_with("Payload contains fields that do not exist:") && message.contains("cf_loyalty_tier"));

    let new_field = json!({"api_identifier": "cf_loyalty_tier", "data_type": "STRING", "presentation_type": "TEXT_INPUT",
        "name": {"default": "Loyalty tier", "pt-BR": "Nível de fidelidade"}});
    let (s, _, b) = rd.send(Method::POST, "/platform/contacts/fields", Some(new_field.clone())).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["api_identifier"], "cf_loyalty_tier");
    let (s, _, b) = rd.send(Method::POST, "/platform/contacts/fields", Some(new_field)).await;
    assert_eq!((s.as_u16(), b["errors"]["api_identifier"][0]["error_type"].as_str()), (400, Some("TAKEN")));
    let (s, _, _) = rd
        .send(Method::PATCH, "/platform/contacts/email:bia@example.com", Some(json!({"cf_loyalty_tier": "gold"})))
        .await;
    assert_eq!(s, 200, "the field exists now");
    let (s, _, _) = rd
        .send(Method::POST, "/platform/contacts/fields", Some(json!({"api_identifier": "loyalty", "data_type": "STRING", "presentation_type": "TEXT_INPUT", "name": {"default": "x"}})))
        .await;
    assert_eq!(s, 400, "custom fields are cf_*");
}

#[tokio::test]
async fn tag_posts_are_limited_per_contact_and_per_account() {
    let rd = Rd::start(RdConfig { tags_per_account_per_day: 30, ..RdConfig::default() }).await;
    for email in ["a@example.com", "b@example.com"] {
        let (s, _, _) = rd.send(Method::POST, "/platform/contacts", Some(json!({"email": email}))).await;
        assert_eq!(s, 200);
    }
    let tag = |email: &'static str, i: usize| {
        let path = format!("/platform/contacts/email:{email}/tag");
        let rd = &rd;
        async move { rd.send(Method::POST, &path, Some(json!({"tags": [format!("t{i}")]}))).await }
    };
    for i in 0..24 {
        assert_eq!(tag("a@example.com", i).await.0, 200, "tag post {i}");
    }
    let (s, _, b) = tag("a@example.com", 24).await;
    assert_eq!((s.as_u16(), b["errors"]["error_type"].as_str()), (429, Some("RATE_LIMIT_EXCEDDED")), "{b}");
    for i in 0..6 {
        assert_eq!(tag("b@example.com", i).await.0, 200, "another contact, same account: {i}");
    }
    assert_eq!(tag("b@example.com", 6).await.0, 429, "the account's daily limit");
}
