//! Magento's MSI reservations and Web API input limits, as saas-apis.md §7 describes them.

mod common;

use common::magento::Shop;
use sandbox::magento::MagentoConfig;
use serde_json::{Value, json};

async fn quantities(shop: &Shop, sku: &str) -> (f64, f64) {
    let (_, salable) = shop.get(&format!("/inventory/get-product-salable-quantity/{sku}/1")).await;
    let filter = format!(
        "/inventory/source-items?searchCriteria[filter_groups][0][filters][0][field]=sku&searchCriteria[filter_groups][0][filters][0][value]={sku}"
    );
    let (_, source) = shop.get(&filter).await;
    (salable.as_f64().unwrap(), source["items"][0]["quantity"].as_f64().unwrap())
}

#[tokio::test]
async fn placing_an_order_reserves_and_only_a_shipment_deducts_the_source() {
    let shop = Shop::start(MagentoConfig::default(), 0).await;
    shop.app.sim.lock().unwrap().generate_orders(1);
    let order = shop.app.sim.lock().unwrap().orders[&1].clone();
    let simple: Vec<(String, f64)> = order["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["product_type"] == "simple")
        .map(|i| (i["sku"].as_str().unwrap().to_owned(), i["qty_ordered"].as_f64().unwrap()))
        .collect();
    let (sku, qty) = simple[0].clone();
    let held: f64 = simple.iter().filter(|(s, _)| *s == sku).map(|(_, q)| q).sum();
    let (salable, source) = quantities(&shop, &sku).await;
    assert_eq!(salable, source - held, "the order holds {held} of {sku} as a reservation");
    let (_, legacy) = shop.get(&format!("/stockItems/{sku}")).await;
    assert_eq!(legacy["qty"].as_f64(), Some(source), "the source quantity stays until shipment");

    let control = sandbox::control::router(sandbox::control::Control {
        faults: shop.app.faults.clone(),
        counters: shop.app.counters.clone(),
        salesforce: sandbox::salesforce::SalesforceApp::new(
            Default::default(),
            shop.app.faults.clone(),
            shop.app.counters.clone(),
        ),
        rdstation: sandbox::rdstation::RdStationApp::new(
            Default::default(),
            shop.app.faults.clone(),
            shop.app.counters.clone(),
        ),
        magento: shop.app.clone(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, control).await.unwrap() });
    let ship = || shop.http.post(format!("{control_url}/magento/orders/1/ship")).send();
    let shipped: Value = ship().await.unwrap().json().await.unwrap();
    assert!(shipped["deducted"].as_array().unwrap().iter().any(|d| d["sku"] == sku.as_str() && d["qty"] == qty));
    let (salable_after, source_after) = quantities(&shop, &sku).await;
    assert_eq!(source_after, source - held, "the shipment deducts the source");
    assert_eq!(salable_after, salable, "and compensates the reservation: salable unchanged");
    assert_eq!(ship().await.unwrap().status(), 400, "one shipment per order");
    let missing = shop.http.post(format!("{control_url}/magento/orders/999/ship")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn cancelled_orders_release_their_reservation() {
    let shop = Shop::start(MagentoConfig::default(), 0).await;
    let before = quantities(&shop, "SKU-002").await;
    {
        let mut sim = shop.app.sim.lock().unwrap();
        sim.reserve("SKU-002", 2.0);
        let id = 1;
        sim.orders.insert(
            id,
            json!({"entity_id": id, "state": "new", "items": [{"sku": "SKU-002", "product_type": "simple", "qty_ordered": 2.0}]}),
        );
        sim.release(id);
    }
    assert_eq!(quantities(&shop, "SKU-002").await, before);
}

#[tokio::test]
async fn input_limits_are_off_by_default_and_refuse_with_magentos_messages_when_on() {
    let shop = Shop::start(MagentoConfig::default(), 30).await;
    let (status, page) = shop.get("/orders?searchCriteria[pageSize]=1000").await;
    assert_eq!(status, 200, "no limit by default");
    assert_eq!(page["items"].as_array().unwrap().len(), page["total_count"].as_u64().unwrap() as usize);
    let (_, all) = shop.get("/orders?searchCriteria").await;
    assert!(all["items"].as_array().unwrap().len() > 20, "no pageSize, no paging");
    let many: Vec<Value> = (0..21)
        .map(|i| json!({"sku": format!("SKU-{:03}", i + 1), "source_code": "default", "quantity": 10, "status": 1}))
        .collect();
    let post = |items: &Vec<Value>| {
        shop.http
            .post(format!("{}/rest/default/V1/inventory/source-items", shop.base))
            .bearer_auth(&shop.token)
            .json(&json!({"sourceItems": items}))
            .send()
    };
    assert_eq!(post(&many).await.unwrap().status(), 200);

    shop.app.sim.lock().unwrap().config.input_limits = true;
    let (status, body) = shop.get("/orders?searchCriteria[pageSize]=301").await;
    assert_eq!(status, 400);
    assert_eq!(body, json!({"message": "Maximum SearchCriteria pageSize is %max", "parameters": {"max": 300}}));
    let (_, default_page) = shop.get("/orders?searchCriteria").await;
    assert_eq!(default_page["items"].as_array().unwrap().len(), 20, "the default page size");
    let refused = post(&many).await.unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["message"], "Maximum items of type \"%type\" is %max");
    assert_eq!(body["parameters"]["max"], 20);
    assert_eq!(post(&many[..20].to_vec()).await.unwrap().status(), 200);
}
