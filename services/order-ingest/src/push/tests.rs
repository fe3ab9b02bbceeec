use std::sync::Mutex;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use tower::ServiceExt;

use elo_events::Decimal4;

use super::*;

#[derive(Default, Clone)]
struct Recorder {
    events: Arc<Mutex<Vec<elo_events::CommerceEvent>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Publisher for Recorder {
    async fn publish(&self, event: &elo_events::CommerceEvent) -> Result<(), PublishError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(PublishError::Unavailable("broker down".into()));
        }
        self.events.lock().unwrap().push(event.clone());
        Ok(())
    }
    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), PublishError> {
        panic!("the push path refuses with a 4xx, it never dead-letters: {letter:?}")
    }
}

use crate::source::fake::Shop;

fn setup() -> (Router, Recorder, Shop) {
    let shop = Shop::generated(20);
    let recorder = Recorder::default();
    let config = PushConfig {
        verifier: Verifier::hmac("s3cret", Duration::from_secs(300)),
        max_body_bytes: 64 * 1024,
        stores: Stores::default(),
    };
    (router(config, recorder.clone(), shop.clone()), recorder, shop)
}

fn signed(body: &[u8], secret: &str, t: i64) -> Request<Body> {
    let sig = sandbox::magento::webhook::sign(secret, t, body);
    Request::post("/webhooks/magento/orders")
        .header(SIGNATURE_HEADER, sig)
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
        .unwrap()
}

async fn status(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn signed_notifications_publish_once_per_order_version() {
    let (app, recorder, shop) = setup();
    let order = &shop.0.lock().unwrap().orders[&3].clone();
    // The sandbox's own CloudEvents notification (partial: the order is refetched).
    let cloud =
        sandbox::magento::webhook::notification(&sandbox::magento::webhook::WebhookConfig::default(), order).body;
    let (s1, b1) = status(&app, signed(&cloud, "s3cret", now_secs())).await;
    let (s2, b2) = status(&app, signed(&cloud, "s3cret", now_secs())).await;
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK));
    assert_eq!(b1["event_id"], b2["event_id"], "a duplicate notification yields the same event id");
    let plain = serde_json::to_vec(&json!({"order": order, "unknown_field": {"tolerated": true}})).unwrap();
    let (s3, b3) = status(&app, signed(&plain, "s3cret", now_secs())).await;
    assert_eq!(s3, StatusCode::OK);
    assert_eq!(b3["event_id"], b1["event_id"], "push styles agree on the id");
    let events = recorder.events.lock().unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0].order.as_ref().unwrap().entity_id, 3);
}

#[tokio::test]
async fn refusals_publish_nothing() {
    let (app, recorder, shop) = setup();
    let body = serde_json::to_vec(&json!({"order": shop.0.lock().unwrap().orders[&1]})).unwrap();
    let (s, b) = status(&app, signed(&body, "wrong", now_secs())).await;
    assert_eq!((s, b["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_signature")));
    let (s, _) = status(&app, signed(&body, "s3cret", now_secs() - 3600)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "a replayed, stale notification is refused");
    let unsigned = Request::post("/webhooks/magento/orders").body(Body::from(body.clone())).unwrap();
    assert_eq!(status(&app, unsigned).await.0, StatusCode::UNAUTHORIZED);
    let (s, b) = status(&app, signed(b"{not json", "s3cret", now_secs())).await;
    assert_eq!((s, b["error"].as_str()), (StatusCode::BAD_REQUEST, Some("malformed_json")));
    let big = vec![b' '; 65 * 1024];
    assert_eq!(status(&app, signed(&big, "s3cret", now_secs())).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    for not_an_order in [&br#"{"hello": "world"}"#[..], br#"[{"items": []}, {"value": 1}]"#, br#""order""#] {
        let (s, b) = status(&app, signed(not_an_order, "s3cret", now_secs())).await;
        assert_eq!((s, b["error"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_payload")));
    }
    let (s, b) = status(&app, signed(br#"{"data": {"value": {"entity_id": "7x"}}}"#, "s3cret", now_secs())).await;
    assert_eq!((s, b["message"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("data.value.entity_id is missing")));
    let mut broken = shop.0.lock().unwrap().orders[&1].clone();
    broken["customer_email"] = Value::Null;
    let (s, b) =
        status(&app, signed(&serde_json::to_vec(&json!({"order": broken})).unwrap(), "s3cret", now_secs())).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(b["message"].as_str().unwrap().contains("customer_email"), "{b}");
    let missing = br#"{"data": {"value": {"entity_id": 999999}}}"#;
    assert_eq!(status(&app, signed(missing, "s3cret", now_secs())).await.0, StatusCode::BAD_GATEWAY);
    assert!(recorder.events.lock().unwrap().is_empty());
}

#[tokio::test]
async fn broker_down_is_503_with_retry_after() {
    let (app, recorder, shop) = setup();
    recorder.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let body = serde_json::to_vec(&json!({"order": shop.0.lock().unwrap().orders[&2]})).unwrap();
    let resp = app.clone().oneshot(signed(&body, "s3cret", now_secs())).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()[header::RETRY_AFTER], "5");
    assert!(recorder.events.lock().unwrap().is_empty());
}

fn signed_to(path: &str, body: &[u8]) -> Request<Body> {
    let mut request = signed(body, "s3cret", now_secs());
    *request.uri_mut() = path.parse().unwrap();
    request
}

#[tokio::test]
async fn customer_notifications_become_changes_and_erasures() {
    let (app, recorder, shop) = setup();
    let customer = shop.0.lock().unwrap().customers[&1].to_json();
    let path = "/webhooks/magento/customers";
    // CloudEvents: partial, refetched; plain: the full record.
    let cloud = json!({"type": "com.adobe.commerce.observer.customer_save_after", "data": {"value": {"id": 1}}});
    let (s, b1) = status(&app, signed_to(path, cloud.to_string().as_bytes())).await;
    assert_eq!(s, StatusCode::OK, "{b1}");
    let plain = json!({"event": "customer_save_after", "customer": customer});
    let (s, b2) = status(&app, signed_to(path, plain.to_string().as_bytes())).await;
    assert_eq!((s, &b1["event_id"]), (StatusCode::OK, &b2["event_id"]), "both styles give the same fact");
    // A deletion erases the registered key and the e-mail's guest key.
    let email = customer["email"].as_str().unwrap();
    let deleted = json!({"type": "com.adobe.commerce.observer.customer_delete_after", "time": "2026-11-28T10:00:00Z",
        "data": {"value": {"id": 1, "email": email, "store_id": 1}}});
    let (s, b) = status(&app, signed_to(path, deleted.to_string().as_bytes())).await;
    assert_eq!((s, b["event_ids"].as_array().unwrap().len()), (StatusCode::OK, 2));
    let request = json!({"event": "erasure_request", "customer": {"email": "Guest@Example.org "}});
    let (s, b) = status(&app, signed_to(path, request.to_string().as_bytes())).await;
    assert_eq!((s, b["event_ids"].as_array().unwrap().len()), (StatusCode::OK, 1), "a guest has one key");
    let events = recorder.events.lock().unwrap().clone();
    assert_eq!(events.len(), 5);
    assert_eq!(events[0].event_type, elo_events::CommerceEventType::CustomerChanged);
    let erased: Vec<&str> = events[2..4].iter().map(|e| e.customer_key.as_str()).collect();
    assert_eq!(erased[0], "c:1");
    assert_eq!(erased[1], elo_events::ids::customer_key(None, email));
    let guest = events[4].erasure.as_ref().unwrap();
    assert_eq!(guest.email_sha256, elo_events::ids::email_sha256("guest@example.org"));
    assert_eq!(guest.reason, "erasure_request");
    assert!(events[2..].iter().all(|e| e.customer.is_none()), "erasures carry no personal data");
    // Refusals.
    for (body, expected) in [
        (json!({"event": "customer_promoted", "customer": {"id": 1}}), StatusCode::UNPROCESSABLE_ENTITY),
        (json!({"event": "customer_delete_after", "customer": {"id": 1}}), StatusCode::UNPROCESSABLE_ENTITY),
        (
            json!({"type": "com.adobe.commerce.observer.customer_save_after", "data": {"value": {"id": 99999}}}),
            StatusCode::BAD_GATEWAY,
        ),
    ] {
        assert_eq!(status(&app, signed_to(path, body.to_string().as_bytes())).await.0, expected, "{body}");
    }
    assert_eq!(recorder.events.lock().unwrap().len(), 5, "refusals publish nothing");
}

/// The checked-in OpenAPI document and the implementation agree: the routes and methods, every
/// status the handlers return is documented, and error bodies use documented codes.
#[tokio::test]
async fn the_openapi_document_matches_the_implementation() {
    let doc: Value = serde_json::from_str(include_str!("../../api/openapi.json")).unwrap();
    let error_codes: Vec<&str> = doc["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let (app, recorder, shop) = setup();
    let order = serde_json::to_vec(&json!({"order": shop.0.lock().unwrap().orders[&1]})).unwrap();
    let customer = serde_json::to_vec(&json!({"event": "customer_save_after", "customer": {"id": 2}})).unwrap();
    let routes: [(&str, &[u8], &[u8]); 2] = [
        ("/webhooks/magento/orders", &order, br#"{"data": {"value": {"entity_id": 424242}}}"#),
        ("/webhooks/magento/customers", &customer, br#"{"event": "customer_save_after", "customer": {"id": 424242}}"#),
    ];
    assert_eq!(doc["paths"].as_object().unwrap().len(), routes.len(), "every documented route is tested");
    for (path, good, unknown) in routes {
        let op = &doc["paths"][path]["post"];
        assert!(op.is_object(), "{path} documented");
        let documented: Vec<u16> = op["responses"].as_object().unwrap().keys().map(|k| k.parse().unwrap()).collect();
        recorder.down.store(false, std::sync::atomic::Ordering::SeqCst);
        let mut seen = Vec::new();
        let mut with_bad_secret = signed_to(path, good);
        *with_bad_secret.headers_mut().get_mut(SIGNATURE_HEADER).unwrap() =
            sandbox::magento::webhook::sign("nope", now_secs(), good).parse().unwrap();
        let cases: Vec<Request<Body>> = vec![
            signed_to(path, good),
            signed_to(path, b"{x"),
            with_bad_secret,
            signed_to(path, &vec![b' '; 70 * 1024]),
            signed_to(path, b"{}"),
            signed_to(path, unknown),
        ];
        for req in cases {
            let (status, body) = status(&app, req).await;
            assert!(documented.contains(&status.as_u16()), "{path}: {status} is not documented");
            if let Some(code) = body.get("error").and_then(Value::as_str) {
                assert!(error_codes.contains(&code), "error code {code} is not documented");
            } else if status == StatusCode::OK {
                assert!(body["event_id"].is_string() && body["event_type"].is_string() && body["op"] == "success");
            }
            seen.push(status.as_u16());
        }
        recorder.down.store(true, std::sync::atomic::Ordering::SeqCst);
        seen.push(status(&app, signed_to(path, good)).await.0.as_u16());
        seen.sort_unstable();
        seen.dedup();
        let mut expected = documented.clone();
        expected.sort_unstable();
        assert_eq!(seen, expected, "{path}: every documented status is produced by the implementation");
    }
}

#[test]
fn signatures_are_checked_in_full() {
    let body = b"{}";
    let good = sandbox::magento::webhook::sign("k", 100, body);
    assert!(verify_signature(&["k".to_owned()], Some(&good), body, 100, Duration::from_secs(10)).is_ok());
    assert!(
        verify_signature(&["k".to_owned()], Some(&good), b"{ }", 100, Duration::from_secs(10)).is_err(),
        "body is signed"
    );
    assert!(verify_signature(&["k".to_owned()], Some(&good), body, 200, Duration::from_secs(10)).is_err(), "too old");
    assert!(verify_signature(&["k".to_owned()], Some("t=100"), body, 100, Duration::from_secs(10)).is_err());
    assert!(verify_signature(&["k".to_owned()], Some("v1=00"), body, 100, Duration::from_secs(10)).is_err());
    assert!(verify_signature(&["k".to_owned()], None, body, 100, Duration::from_secs(10)).is_err());
}

#[tokio::test]
async fn amounts_an_f64_cannot_hold_are_published_exactly() {
    let (app, recorder, shop) = setup();
    let mut order = shop.0.lock().unwrap().orders[&2].clone();
    order["grand_total"] = Value::String("@GRAND@".into());
    order["items"][0]["price"] = Value::String("@PRICE@".into());
    // Magento sends JSON numbers; these two are not representable as f64.
    let (grand, price) = ("90071992547409.9999", "70368744177663.0001");
    let body = String::from_utf8(serde_json::to_vec(&json!({ "order": order })).unwrap())
        .unwrap()
        .replace("\"@GRAND@\"", grand)
        .replace("\"@PRICE@\"", price);
    let through_f64 = serde_json::from_str::<Value>(grand).unwrap().to_string();
    assert_ne!(Decimal4::parse(&through_f64).unwrap(), Decimal4::parse(grand).unwrap(), "the case f64 rounds");
    let (status_code, _) = status(&app, signed(body.as_bytes(), "s3cret", now_secs())).await;
    assert_eq!(status_code, StatusCode::OK);
    let events = recorder.events.lock().unwrap();
    let published = events[0].order.as_ref().unwrap();
    assert_eq!(published.totals.grand_total.to_string(), grand);
    let line = published.items.iter().find(|i| i.item_id == order["items"][0]["item_id"].as_i64().unwrap()).unwrap();
    assert_eq!(line.price.to_string(), price);
}

#[tokio::test]
async fn unsigned_or_stale_requests_are_refused_before_their_body_is_read() {
    let (app, recorder, _) = setup();
    // A body that never arrives: a handler reading it first would hang.
    let never = || Body::from_stream(futures::stream::pending::<Result<axum::body::Bytes, std::io::Error>>());
    let stale = format!("t={},v1={}", now_secs() - 3_600, "0".repeat(64));
    for signature in [None, Some(stale.as_str()), Some("t=-9223372036854775808,v1=00")] {
        let mut request = Request::post("/webhooks/magento/orders").header("content-type", "application/json");
        if let Some(signature) = signature {
            request = request.header(SIGNATURE_HEADER, signature);
        }
        let answer = tokio::time::timeout(Duration::from_secs(2), app.clone().oneshot(request.body(never()).unwrap()))
            .await
            .expect("answered without waiting for the body")
            .unwrap();
        assert_eq!(answer.status(), StatusCode::UNAUTHORIZED, "{signature:?}");
    }
    assert!(recorder.events.lock().unwrap().is_empty());
}
