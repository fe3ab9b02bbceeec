//! Magento simulator conformance, written from `../shared/docs/saas-apis.md` §1 and §4: tokens,
//! the `%resources` 401, searchCriteria paging (including the last-page repeat), order payload
//! shapes, customers, MSI, and the generator's determinism and stock depletion.

mod common;

use common::magento::Shop;
use sandbox::magento::MagentoConfig;
use sandbox::magento::generator::GeneratorConfig;
use serde_json::{Value, json};

fn criteria(filters: &[(&str, &str, &str)], page_size: usize, page: usize) -> String {
    let mut q: Vec<String> = filters
        .iter()
        .enumerate()
        .flat_map(|(g, (field, value, cond))| {
            [
                format!("searchCriteria[filter_groups][{g}][filters][0][field]={field}"),
                format!("searchCriteria[filter_groups][{g}][filters][0][value]={value}"),
                format!("searchCriteria[filter_groups][{g}][filters][0][condition_type]={cond}"),
            ]
        })
        .collect();
    q.push(format!("searchCriteria[pageSize]={page_size}"));
    q.push(format!("searchCriteria[currentPage]={page}"));
    q.join("&")
}

#[tokio::test]
async fn tokens_and_the_resources_401() {
    let shop = Shop::start(MagentoConfig::default(), 5).await;
    let url = format!("{}/rest/default/V1/integration/admin/token", shop.base);
    let wrong = shop.http.post(&url).json(&json!({"username": "admin", "password": "nope"})).send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(wrong.json::<Value>().await.unwrap()["message"].as_str().unwrap().contains("sign-in was incorrect"));
    let missing = shop.http.post(&url).json(&json!({"username": "admin"})).send().await.unwrap();
    assert_eq!(missing.status(), 400);
    assert_eq!(
        missing.json::<Value>().await.unwrap(),
        json!({"message": "\"%fieldName\" is required. Enter and try again.", "parameters": {"fieldName": "password"}})
    );

    let anonymous = shop.http.get(format!("{}/rest/default/V1/orders/1", shop.base)).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(
        anonymous.json::<Value>().await.unwrap(),
        json!({"message": "The consumer isn't authorized to access %resources.", "parameters": {"resources": "Magento_Sales::actions_view"}})
    );
    // Integration tokens as Bearer are off by default in 2.4.x.
    let integration = shop
        .http
        .get(format!("{}/rest/default/V1/orders/1", shop.base))
        .bearer_auth("elo-sandbox-integration-token")
        .send()
        .await
        .unwrap();
    assert_eq!(integration.status(), 401);
    shop.app.sim.lock().unwrap().config.integration_as_bearer = true;
    let integration = shop
        .http
        .get(format!("{}/rest/default/V1/orders/1", shop.base))
        .bearer_auth("elo-sandbox-integration-token")
        .send()
        .await
        .unwrap();
    assert_eq!(integration.status(), 200);
}

#[tokio::test]
async fn a_page_past_the_end_repeats_the_last_page() {
    let shop = Shop::start(MagentoConfig::default(), 200).await;
    let total = shop.app.sim.lock().unwrap().orders.len();
    let (status, page1) = shop.get(&format!("/orders?{}", criteria(&[], 20, 1))).await;
    assert_eq!(status, 200);
    assert_eq!(page1["total_count"], total);
    assert_eq!(page1["search_criteria"]["page_size"], 20);
    assert_eq!(page1["search_criteria"]["current_page"], 1);
    let last = total.div_ceil(20);
    let (_, last_page) = shop.get(&format!("/orders?{}", criteria(&[], 20, last))).await;
    let (_, past) = shop.get(&format!("/orders?{}", criteria(&[], 20, last + 3))).await;
    assert!(!past["items"].as_array().unwrap().is_empty(), "not an empty page");
    assert_eq!(past["items"], last_page["items"], "the last page again");
    assert_eq!(past["search_criteria"]["current_page"], last + 3);

    shop.app.sim.lock().unwrap().config.last_page_repeats = false;
    let (_, past) = shop.get(&format!("/orders?{}", criteria(&[], 20, last + 3))).await;
    assert_eq!(past["items"], json!([]));

    shop.app.sim.lock().unwrap().config.input_limits = true;
    let (status, body) = shop.get(&format!("/orders?{}", criteria(&[], 301, 1))).await;
    assert_eq!(status, 400, "page size above 300 is refused with input limits on: {body}");
}

#[tokio::test]
async fn search_criteria_filters_sorts_and_rejects_bad_fields() {
    let shop = Shop::start(MagentoConfig::default(), 300).await;
    let (_, all) = shop.get(&format!("/orders?{}", criteria(&[], 300, 1))).await;
    let items = all["items"].as_array().unwrap();
    let cutoff = items[items.len() / 2]["updated_at"].as_str().unwrap().replace(' ', "%20");
    let (_, newer) = shop
        .get(&format!(
            "/orders?{}&searchCriteria[sortOrders][0][field]=updated_at&searchCriteria[sortOrders][0][direction]=DESC",
            criteria(&[("updated_at", &cutoff, "gteq"), ("store_id", "2", "eq")], 300, 1)
        ))
        .await;
    let got = newer["items"].as_array().unwrap();
    assert!(!got.is_empty());
    let cutoff = cutoff.replace("%20", " ");
    assert!(got.iter().all(|o| o["updated_at"].as_str().unwrap() >= cutoff.as_str() && o["store_id"] == 2));
    assert!(got.windows(2).all(|w| w[0]["updated_at"].as_str() >= w[1]["updated_at"].as_str()), "sorted DESC");
    let expected =
        items.iter().filter(|o| o["updated_at"].as_str().unwrap() >= cutoff.as_str() && o["store_id"] == 2).count();
    assert_eq!(newer["total_count"], expected);

    // OR within a group.
    let q = "searchCriteria[filter_groups][0][filters][0][field]=status&searchCriteria[filter_groups][0][filters][0][value]=complete&searchCriteria[filter_groups][0][filters][1][field]=status&searchCriteria[filter_groups][0][filters][1][value]=canceled&searchCriteria[pageSize]=300";
    let (_, either) = shop.get(&format!("/orders?{q}")).await;
    assert!(either["items"].as_array().unwrap().iter().all(|o| o["status"] == "complete" || o["status"] == "canceled"));

    let (status, _) = shop.get(&format!("/orders?{}", criteria(&[("customerId", "1", "eq")], 20, 1))).await;
    assert_eq!(status, 500, "camelCase columns fail where snake_case works");
    let (status, body) =
        shop.get(&format!("/customers/search?{}", criteria(&[("customerId", "1", "eq")], 20, 1))).await;
    assert_eq!(status, 400);
    assert_eq!(body, json!({"message": "Invalid attribute name: %1", "parameters": ["customerId"]}));
    let (status, body) = shop.get(&format!("/customers/search?{}", criteria(&[("entity_id", "1", "eq")], 20, 1))).await;
    assert_eq!(status, 200);
    assert_eq!(body["items"][0]["id"], 1);
}

#[tokio::test]
async fn orders_look_like_magentos() {
    let shop = Shop::start(MagentoConfig::default(), 400).await;
    let orders: Vec<Value> = shop.app.sim.lock().unwrap().orders.values().cloned().collect();
    let ts = regex_like_timestamp;
    for order in &orders {
        assert!(order["increment_id"].is_string());
        assert!(
            ts(order["created_at"].as_str().unwrap()) && ts(order["updated_at"].as_str().unwrap()),
            "{}",
            order["created_at"]
        );
        assert!(order["grand_total"].is_number());
        for item in order["items"].as_array().unwrap() {
            if let Some(parent_id) = item["parent_item_id"].as_i64() {
                let parent = order["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|i| i["item_id"] == parent_id)
                    .expect("parent line present");
                assert_eq!(item["parent_item"]["item_id"], parent_id, "children embed their parent");
                if parent["product_type"] == "configurable" {
                    assert_eq!(item["price"], 0.0, "a configurable child line has price 0");
                    assert_eq!(item["sku"], parent["sku"], "the parent line carries the child's sku");
                }
                if parent["product_type"] == "bundle" {
                    assert!(item["price"].as_f64().unwrap() > 0.0, "bundle children carry their own prices");
                }
            }
        }
    }
    let guest = orders.iter().find(|o| o["customer_is_guest"] == 1).expect("guest orders exist");
    assert!(guest["customer_id"].is_null());
    assert!(orders.iter().any(|o| o["items"].as_array().unwrap().iter().any(|i| i["product_type"] == "configurable")));
    assert!(orders.iter().any(|o| o["items"].as_array().unwrap().iter().any(|i| i["product_type"] == "bundle")));
    assert!(
        orders.iter().any(|o| o["status"] == "complete") && orders.iter().any(|o| o["status"] == "canceled"),
        "status transitions happen"
    );
    assert!(orders.iter().any(|o| o["store_id"] == 1) && orders.iter().any(|o| o["store_id"] == 2));

    let (status, single) = shop.get("/orders/1").await;
    assert_eq!(status, 200);
    assert!(single["extension_attributes"]["shipping_assignments"][0]["shipping"]["address"]["city"].is_string());
    let (_, list) = shop.get(&format!("/orders?{}", criteria(&[("entity_id", "1", "eq")], 20, 1))).await;
    assert!(
        list["items"][0]["extension_attributes"].get("shipping_assignments").is_none(),
        "the list omits shipping assignments"
    );
    let (status, body) = shop.get("/orders/999999").await;
    assert_eq!(status, 404, "{body}");
}

fn regex_like_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 19 && b[4] == b'-' && b[7] == b'-' && b[10] == b' ' && b[13] == b':' && b[16] == b':'
}

#[tokio::test]
async fn customers_and_routes() {
    let shop = Shop::start(MagentoConfig::default(), 50).await;
    let (status, customer) = shop.get("/customers/1").await;
    assert_eq!(status, 200);
    assert!(customer["email"].as_str().unwrap().contains('@'));
    assert!(customer["addresses"][0]["street"].is_array());
    let (status, body) = shop.get("/customers/99999").await;
    assert_eq!(status, 404);
    assert_eq!(body["message"], "No such entity with %fieldName = %fieldValue");
    let (status, body) = shop.get("/customers").await;
    assert_eq!(status, 404);
    assert_eq!(body["message"], "Request does not match any route.");
}

#[tokio::test]
async fn msi_stock_is_depleted_by_orders() {
    let shop = Shop::start(MagentoConfig::default(), 0).await;
    let (_, before) = shop.get("/inventory/get-product-salable-quantity/SKU-001/1").await;
    shop.app.sim.lock().unwrap().generate(500);
    let (_, after) = shop.get("/inventory/get-product-salable-quantity/SKU-001/1").await;
    assert!(after.as_f64().unwrap() < before.as_f64().unwrap(), "orders deplete stock: {before} → {after}");
    let (_, salable) = shop.get("/inventory/is-product-salable-for-requested-qty/SKU-001/1/100000").await;
    assert_eq!(salable["salable"], false);
    assert_eq!(salable["errors"][0]["code"], "back_order-disabled");
    let (status, _) = shop.get("/inventory/get-product-salable-quantity/SKU-001/9").await;
    assert_eq!(status, 404);

    let resp = shop
        .http
        .post(format!("{}/rest/default/V1/inventory/source-items", shop.base))
        .bearer_auth(&shop.token)
        .json(&json!({"sourceItems": [{"sku": "SKU-001", "source_code": "default", "quantity": 7, "status": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!([]));
    let (_, qty) = shop.get("/inventory/get-product-salable-quantity/SKU-001/1").await;
    let reserved = shop.app.sim.lock().unwrap().reservations.get("SKU-001").copied().unwrap_or_default();
    assert_eq!(qty.as_f64(), Some(7.0 + reserved), "the new source quantity less what open orders hold");
    let (_, legacy) = shop.get("/stockItems/SKU-001").await;
    assert_eq!(legacy["qty"], 7.0);
}

#[test]
fn the_same_seed_gives_the_same_orders() {
    let run = |seed: u64| {
        let mut shop = sandbox::magento::Magento::new(
            MagentoConfig::default(),
            GeneratorConfig { seed, ..GeneratorConfig::default() },
        );
        shop.generate(300);
        serde_json::to_string(&shop.orders.values().collect::<Vec<_>>()).unwrap()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

#[tokio::test]
async fn order_webhooks_are_signed_retried_and_sometimes_duplicated() {
    use std::sync::{Arc, Mutex};
    /// (event id, signature, body) of each delivery.
    type Deliveries = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;
    let received: Deliveries = Arc::default();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let receiver = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let (received, calls) = (received.clone(), calls.clone());
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let (received, calls) = (received.clone(), calls.clone());
                async move {
                    // The receiver is down for its first five calls.
                    if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 5 {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let h = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
                    received.lock().unwrap().push((h("x-elo-webhook-id"), h("x-elo-webhook-signature"), body.to_vec()));
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, receiver).await.unwrap() });

    let shop = Shop::start(MagentoConfig::default(), 0).await;
    shop.app.sim.lock().unwrap().webhook = sandbox::magento::webhook::WebhookConfig {
        url: Some(hook),
        customer_url: None,
        secret: "s3cret".into(),
        duplicate_rate: 0.5,
        style: sandbox::magento::webhook::WebhookStyle::CloudEvents,
        ..Default::default()
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sandbox::magento::webhook::dispatch(shop.app.clone(), shutdown.clone()));
    shop.app.sim.lock().unwrap().generate(40);
    let expected: std::collections::BTreeSet<String> = {
        let sim = shop.app.sim.lock().unwrap();
        sim.orders.values().map(|o| sandbox::magento::webhook::notification(&sim.webhook, o).id).collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let got: std::collections::BTreeSet<String> =
            received.lock().unwrap().iter().map(|(id, _, _)| id.clone()).collect();
        if expected.is_subset(&got) || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    shutdown.cancel();
    let received = received.lock().unwrap().clone();
    let got: std::collections::BTreeSet<String> = received.iter().map(|(id, _, _)| id.clone()).collect();
    assert!(expected.is_subset(&got), "every order's latest version is notified despite the outage");
    assert!(received.len() > got.len(), "some notifications arrive twice");
    for (_, signature, body) in &received {
        let t: i64 = signature.split(',').next().unwrap().trim_start_matches("t=").parse().unwrap();
        assert_eq!(signature, &sandbox::magento::webhook::sign("s3cret", t, body), "signature verifies");
        let event: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(event["type"], "com.adobe.commerce.observer.sales_order_save_after");
        assert!(event["data"]["value"]["entity_id"].is_number());
    }
    assert!(shop.app.sim.lock().unwrap().outbox.failed_attempts >= 5, "the outage was retried");
}

#[tokio::test]
async fn customers_are_deleted_like_magento_and_notified_with_their_email() {
    let shop = Shop::start(MagentoConfig::default(), 0).await;
    shop.app.sim.lock().unwrap().webhook.customer_url = Some("http://127.0.0.1:9/customers".into());
    shop.app.sim.lock().unwrap().generate(30);
    let registered = shop.app.sim.lock().unwrap().customers.len();
    let saved = shop.app.sim.lock().unwrap().outbox.queue.iter().filter(|n| n.about_customer).count();
    assert_eq!(saved, registered, "one customer_save_after per registration");
    let (_, customer) = shop.get("/customers/1").await;
    let delete = |id: i64| {
        shop.http.delete(format!("{}/rest/default/V1/customers/{id}", shop.base)).bearer_auth(&shop.token).send()
    };
    let resp = delete(1).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!(true), "Magento answers a bare true");
    let resp = delete(1).await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.json::<Value>().await.unwrap()["message"], "No such entity with %fieldName = %fieldValue");
    let unauthorised = shop.http.delete(format!("{}/rest/default/V1/customers/2", shop.base)).send().await.unwrap();
    assert_eq!(unauthorised.status(), 401);
    assert_eq!(shop.get("/customers/1").await.0, 404);
    let last = shop.app.sim.lock().unwrap().outbox.queue.back().cloned().unwrap();
    let body: Value = serde_json::from_slice(&last.body).unwrap();
    assert_eq!(body["type"], "com.adobe.commerce.observer.customer_delete_after");
    let time = body["time"].as_str().unwrap();
    let shape = time.len() == 20 && &time[10..11] == "T" && time.ends_with('Z') && &time[4..5] == "-";
    assert!(shape, "CloudEvents time is RFC 3339 like order events: {time}");
    assert_eq!(body["data"]["value"]["email"], customer["email"], "the deletion says who, since the record is gone");
    // New registrations continue after the highest id, never reusing a deleted one.
    let before = shop.app.sim.lock().unwrap().customers.keys().max().copied().unwrap();
    shop.app.sim.lock().unwrap().generate(30);
    let ids: Vec<i64> = shop.app.sim.lock().unwrap().customers.keys().copied().collect();
    assert!(!ids.contains(&1));
    assert!(ids.iter().filter(|id| **id > before).count() > 0);
}

/// Contract 4: integration calls signed with OAuth 1.0a (HMAC-SHA256 or HMAC-SHA1) pass; a
/// wrong signature, a reused nonce or another consumer get Magento's 401; the integration
/// token as a plain bearer stays refused unless switched on.
#[tokio::test]
async fn integration_requests_are_verified_as_oauth_1_0a() {
    use sandbox::magento::oauth;
    let shop = Shop::start(MagentoConfig::default(), 5).await;
    let credentials = shop.app.sim.lock().unwrap().integration_credentials();
    let query = "searchCriteria[pageSize]=2&searchCriteria[currentPage]=1";
    let url = format!("{}/rest/default/V1/orders", shop.base);
    let signed = |credentials: &oauth::Credentials, method: &str, nonce: &str| {
        let request = oauth::Request { method: "GET", base_url: &url, query, form: None };
        oauth::authorization(&request, credentials, method, nonce, sandbox::now_ms() / 1000)
    };
    let call =
        |authorization: String| shop.http.get(format!("{url}?{query}")).header("authorization", authorization).send();
    for (method, nonce) in [("HMAC-SHA256", "nonce-1"), ("HMAC-SHA1", "nonce-2")] {
        let resp = call(signed(&credentials, method, nonce)).await.unwrap();
        assert_eq!(resp.status(), 200, "{method}");
        assert_eq!(resp.json::<Value>().await.unwrap()["items"].as_array().unwrap().len(), 2);
    }

    let reused = call(signed(&credentials, "HMAC-SHA256", "nonce-1")).await.unwrap();
    assert_eq!(reused.status(), 401);
    let body: Value = reused.json().await.unwrap();
    assert_eq!(body["message"], "The nonce is already being used by the consumer with ID %1", "{body}");

    let wrong_secret = oauth::Credentials { access_token_secret: "guess".into(), ..credentials.clone() };
    let resp = call(signed(&wrong_secret, "HMAC-SHA256", "nonce-3")).await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.json::<Value>().await.unwrap()["message"], "The signature is invalid. Verify and try again.");
    // Signed for another query: the signature covers the query parameters.
    let header = signed(&credentials, "HMAC-SHA256", "nonce-4");
    let tampered = shop.http.get(format!("{url}?searchCriteria[pageSize]=3")).header("authorization", header);
    assert_eq!(tampered.send().await.unwrap().status(), 401);

    let stranger = oauth::Credentials { consumer_key: "someone-else".into(), ..credentials.clone() };
    assert_eq!(call(signed(&stranger, "HMAC-SHA256", "nonce-5")).await.unwrap().status(), 401);
    let plaintext = signed(&credentials, "HMAC-SHA256", "nonce-6").replace("HMAC-SHA256", "PLAINTEXT");
    assert_eq!(call(plaintext).await.unwrap().status(), 400, "only the HMAC methods");

    let bearer = call(format!("Bearer {}", credentials.access_token)).await.unwrap();
    assert_eq!(bearer.status(), 401, "integration token as bearer is off by default");
    shop.app.sim.lock().unwrap().config.integration_as_bearer = true;
    assert_eq!(call(format!("Bearer {}", credentials.access_token)).await.unwrap().status(), 200);
    assert_eq!(shop.get("/orders/1").await.0, 200, "admin tokens keep working");
}
