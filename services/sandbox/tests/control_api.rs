//! The control and inspection API: faults (latency, error rates, outages), drift behind Elo's
//! back, the background generator, state and per-endpoint call counters.

use std::time::{Duration, Instant};

use reqwest::Client;
use sandbox::faults::Faults;
use sandbox::magento::{MagentoApp, MagentoConfig};
use sandbox::rdstation::{RdConfig, RdStationApp};
use sandbox::salesforce::{SalesforceApp, SalesforceConfig};
use sandbox::{Counters, control};
use serde_json::{Value, json};

struct Sandbox {
    control: String,
    salesforce: String,
    magento_url: String,
    magento: MagentoApp,
    rd: RdStationApp,
    http: Client,
}

async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

async fn start() -> Sandbox {
    let (faults, counters) = (Faults::default(), Counters::default());
    let sf = SalesforceApp::new(SalesforceConfig::default(), faults.clone(), counters.clone());
    let rd = RdStationApp::new(RdConfig::default(), faults.clone(), counters.clone());
    let magento = MagentoApp::new(MagentoConfig::default(), Default::default(), faults.clone(), counters.clone());
    let salesforce = serve(sf.clone().router()).await;
    let magento_url = serve(magento.clone().router()).await;
    let control = serve(control::router(control::Control {
        faults,
        counters,
        salesforce: sf,
        rdstation: rd.clone(),
        magento: magento.clone(),
    }))
    .await;
    Sandbox { control, salesforce, magento_url, magento, rd, http: Client::new() }
}

#[tokio::test]
async fn faults_inject_errors_outages_and_latency() {
    let sb = start().await;
    let versions = || sb.http.get(format!("{}/services/data/", sb.salesforce)).send();
    assert_eq!(versions().await.unwrap().status(), 200);

    let r = sb
        .http
        .put(format!("{}/faults/salesforce", sb.control))
        .json(&json!({"error_rate": 1.0, "error_status": 503}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(versions().await.unwrap().status(), 503);

    let until = sandbox::now_ms() + 60_000;
    sb.http
        .put(format!("{}/faults/salesforce", sb.control))
        .json(&json!({"outage_until_ms": until}))
        .send()
        .await
        .unwrap();
    assert_eq!(versions().await.unwrap().status(), 503, "outage window");

    sb.http
        .put(format!("{}/faults/salesforce", sb.control))
        .json(&json!({"latency_ms": [150, 200]}))
        .send()
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(versions().await.unwrap().status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(150), "latency injected: {:?}", started.elapsed());

    let bad =
        sb.http.put(format!("{}/faults/salesforce", sb.control)).json(&json!({"error_rate": 2})).send().await.unwrap();
    assert_eq!(bad.status(), 400);
    let unknown = sb.http.put(format!("{}/faults/nosuch", sb.control)).json(&json!({})).send().await.unwrap();
    assert_eq!(unknown.status(), 400);
    let typo =
        sb.http.put(format!("{}/faults/salesforce", sb.control)).json(&json!({"eror_rate": 0.5})).send().await.unwrap();
    assert!(typo.status().is_client_error(), "unknown fault settings are refused");

    let counters: Value = sb.http.get(format!("{}/counters", sb.control)).send().await.unwrap().json().await.unwrap();
    assert_eq!(counters["salesforce"]["GET /services/data"], 4, "{counters}");
}

/// Contract 2: an endpoint entry overrides the simulator's faults for the requests its
/// template matches, and only those; the simulator-level body keeps working beside it.
#[tokio::test]
async fn faults_per_endpoint_override_the_simulator_settings() {
    let sb = start().await;
    let r = sb
        .http
        .put(format!("{}/faults/magento", sb.control))
        .json(&json!({
            "latency_fixed_ms": 0,
            "endpoints": {
                "GET /rest/{store}/V1/orders/{id}": {"error_rates": {"429": 1.0}},
                "GET /rest/V1/store/websites": {"latency_fixed_ms": 150, "jitter_ms": 50},
                "GET /rest/{store}/V1/inventory/get-product-salable-quantity/{sku}/{stock_id}": {"error_rate": 1.0, "error_status": 502}
            }
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let get = |path: &str| sb.http.get(format!("{}{path}", sb.magento_url)).send();
    assert_eq!(get("/rest/br/V1/orders/7").await.unwrap().status(), 429, "the endpoint's status");
    assert_eq!(get("/rest/default/V1/inventory/get-product-salable-quantity/SKU-001/1").await.unwrap().status(), 502);
    assert_eq!(get("/rest/V1/orders/7").await.unwrap().status(), 401, "{{store}} needs a segment: no match");
    assert_eq!(get("/rest/default/V1/orders").await.unwrap().status(), 401, "other endpoints reach the API");

    let started = Instant::now();
    assert_eq!(get("/rest/V1/store/websites").await.unwrap().status(), 401);
    let slow = started.elapsed();
    assert!((Duration::from_millis(150)..Duration::from_millis(1000)).contains(&slow), "fixed + jitter: {slow:?}");
    let started = Instant::now();
    get("/rest/default/V1/store/websites").await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(150), "another path is not slowed");

    let read: Value = sb.http.get(format!("{}/faults/magento", sb.control)).send().await.unwrap().json().await.unwrap();
    assert_eq!(read["endpoints"]["GET /rest/V1/store/websites"]["latency_fixed_ms"], 150, "{read}");
    for bad in [
        json!({"endpoints": {"orders": {}}}),
        json!({"endpoints": {"GET /x": {"error_rates": {"429": 0.8, "500": 0.5}}}}),
        json!({"endpoints": {"GET /x": {"endpoints": {"GET /y": {}}}}}),
    ] {
        let r = sb.http.put(format!("{}/faults/magento", sb.control)).json(&bad).send().await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
    }
    // The same map works on every simulator.
    sb.http
        .put(format!("{}/faults/salesforce", sb.control))
        .json(&json!({"endpoints": {"GET /services/data": {"error_rates": {"503": 1.0}}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(sb.http.get(format!("{}/services/data", sb.salesforce)).send().await.unwrap().status(), 503);
    assert_eq!(sb.http.get(format!("{}/services/data/", sb.salesforce)).send().await.unwrap().status(), 503);
    assert_eq!(
        sb.http.get(format!("{}/services/data/v66.0/limits", sb.salesforce)).send().await.unwrap().status(),
        401
    );
}

/// Contract 1: 10,000 orders generated and mass-changed in seconds; every changed order gets
/// the same `updated_at`; `ids` and `limit` select, lowest entity_id first; notifications only
/// when asked for.
#[tokio::test]
async fn mass_status_changes_many_orders_in_one_second() {
    let sb = start().await;
    let post = |path: &str, body: Value| sb.http.post(format!("{}{path}", sb.control)).json(&body).send();
    let started = Instant::now();
    let generated: Value = post("/magento/generate", json!({"orders": 10_000})).await.unwrap().json().await.unwrap();
    assert_eq!(generated["orders_placed"], 10_000, "{generated}");
    assert_eq!(generated["orders_total"], 10_000, "orders only, no status changes");
    let r = post("/magento/orders/mass-status", json!({"status": "holded"})).await.unwrap();
    assert_eq!(r.status(), 200);
    let all: Value = r.json().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(30), "seconds, not minutes: {:?}", started.elapsed());
    assert_eq!(all["changed"], 10_000);
    let stamp = all["updated_at"].as_str().unwrap().to_owned();
    assert_eq!(stamp.len(), "YYYY-MM-DD HH:MM:SS".len(), "{stamp}");
    {
        let sim = sb.magento.sim.lock().unwrap();
        assert!(sim.orders.values().all(|o| o["status"] == "holded" && o["state"] == "holded"));
        assert!(sim.orders.values().all(|o| o["updated_at"] == stamp.as_str()), "one transaction, one second");
        assert!(sim.outbox.queue.is_empty(), "no notification unless asked for");
    }

    sb.http
        .put(format!("{}/magento/webhook", sb.control))
        .json(&json!({"url": "http://127.0.0.1:9/none", "secret": "s", "duplicate_rate": 0.0, "style": "plain"}))
        .send()
        .await
        .unwrap();
    let some: Value = post(
        "/magento/orders/mass-status",
        json!({"status": "fraud_review", "state": "payment_review", "ids": [9, 3, 5, 999_999], "limit": 2, "notify": true}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(some["changed"], 2, "unknown ids skipped, then the limit: {some}");
    {
        let sim = sb.magento.sim.lock().unwrap();
        assert_eq!(sim.orders[&3]["status"], "fraud_review");
        assert_eq!(sim.orders[&3]["state"], "payment_review");
        assert_eq!(sim.orders[&5]["status"], "fraud_review");
        assert_eq!(sim.orders[&9]["status"], "holded", "lowest entity_id first");
        assert_eq!(sim.outbox.queue.len(), 2, "one notification per changed order");
    }
    for bad in [json!({}), json!({"status": ""}), json!({"status": "x", "idz": [1]})] {
        assert_eq!(post("/magento/orders/mass-status", bad.clone()).await.unwrap().status(), 400, "{bad}");
    }
}

/// Contract 3: with `"signature": "adobe-rsa"` each delivery carries a base64 RSA-SHA256
/// signature of its body in `x-adobe-commerce-webhook-signature`, which verifies with the PEM
/// public key the control API serves (and fails for any other body).
#[tokio::test]
async fn adobe_signed_webhooks_verify_with_the_served_public_key() {
    use aws_lc_rs::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
    use base64::Engine as _;
    type Deliveries = std::sync::Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, Vec<u8>)>>>;
    let received: Deliveries = Default::default();
    let receiver = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let received = received.clone();
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| async move {
                received.lock().unwrap().push((headers, body.to_vec()));
                axum::Json(json!({"op": "success"}))
            }
        }),
    );
    let hook = format!("{}/hook", serve(receiver).await);
    let sb = start().await;
    let r = sb
        .http
        .put(format!("{}/magento/webhook", sb.control))
        .json(&json!({"url": hook, "secret": "s", "duplicate_rate": 0.0, "style": "plain", "signature": "adobe-rsa"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sandbox::magento::webhook::dispatch(sb.magento.clone(), shutdown.clone()));
    sb.magento.sim.lock().unwrap().generate_orders(3);
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.lock().unwrap().len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    let key = sb.http.get(format!("{}/magento/webhook/public-key", sb.control)).send().await.unwrap();
    assert_eq!(key.status(), 200);
    let pem = key.text().await.unwrap();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
    let der = sandbox::magento::signing::pem_body(&pem, "PUBLIC KEY").expect("PEM body");
    let verifier = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &der);
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 3);
    for (headers, body) in &received {
        let signature = headers["x-adobe-commerce-webhook-signature"].to_str().unwrap();
        let signature = base64::engine::general_purpose::STANDARD.decode(signature).expect("base64");
        assert!(verifier.verify(body, &signature).is_ok(), "the signature verifies");
        let mut tampered = body.clone();
        tampered[0] = b' ';
        assert!(verifier.verify(&tampered, &signature).is_err(), "a changed body does not");
        assert!(headers.get("x-elo-webhook-signature").is_none(), "one scheme at a time");
    }
    let integration: Value =
        sb.http.get(format!("{}/magento/integration", sb.control)).send().await.unwrap().json().await.unwrap();
    for field in ["consumer_key", "consumer_secret", "access_token", "access_token_secret"] {
        assert!(integration[field].as_str().is_some_and(|v| !v.is_empty()), "{field}: {integration}");
    }
    let bad = sb
        .http
        .put(format!("{}/magento/webhook", sb.control))
        .json(&json!({"url": hook, "secret": "s", "duplicate_rate": 0.0, "style": "plain", "signature": "rsa"}))
        .send()
        .await
        .unwrap();
    assert!(bad.status().is_client_error());
}

/// Generated orders never carry a future time, so a mass change (stamped now) is the latest
/// version of every order it touches, as a poller by `updated_at` must see it.
#[tokio::test]
async fn generated_orders_stay_behind_the_wall_clock() {
    let sb = start().await;
    {
        let mut sim = sb.magento.sim.lock().unwrap();
        sim.generator.config.start_ms = sandbox::now_ms() - 5_000;
    }
    let post = |path: &str, body: Value| sb.http.post(format!("{}{path}", sb.control)).json(&body).send();
    let generated: Value = post("/magento/generate", json!({"orders": 2000})).await.unwrap().json().await.unwrap();
    assert_eq!(generated["orders_placed"], 2000);
    let now = sandbox::magento::fmt_ts(sandbox::now_ms());
    let latest =
        sb.magento.sim.lock().unwrap().orders.values().map(|o| o["updated_at"].as_str().unwrap().to_owned()).max();
    assert!(latest.unwrap() <= now, "no order from the future");
    let changed: Value =
        post("/magento/orders/mass-status", json!({"status": "holded"})).await.unwrap().json().await.unwrap();
    let stamp = changed["updated_at"].as_str().unwrap();
    let sim = sb.magento.sim.lock().unwrap();
    assert!(sim.orders.values().all(|o| o["created_at"].as_str().unwrap() <= stamp));
}

#[tokio::test]
async fn drift_changes_data_behind_elos_back() {
    let sb = start().await;
    sb.magento.sim.lock().unwrap().generate(5);
    let r = sb
        .http
        .patch(format!("{}/magento/orders/1", sb.control))
        .json(&json!({"status": "holded"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sb.magento.sim.lock().unwrap().orders[&1]["status"], "holded");

    let uuid = {
        let mut sim = sb.rd.sim.lock().unwrap();
        let mut fields = serde_json::Map::new();
        fields.insert("email".into(), json!("drift@example.com"));
        sim.contacts.insert(
            "u-1".into(),
            sandbox::rdstation::Contact { uuid: "u-1".into(), fields, funnel: json!({}), created_ms: 0 },
        );
        "u-1".to_owned()
    };
    let r = sb
        .http
        .patch(format!("{}/rdstation/contacts/{uuid}", sb.control))
        .json(&json!({"name": "Changed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sb.rd.sim.lock().unwrap().contacts[&uuid].fields["name"], "Changed");
    let r = sb.http.delete(format!("{}/rdstation/contacts/{uuid}", sb.control)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(sb.rd.sim.lock().unwrap().contacts.is_empty());
    let r = sb.http.delete(format!("{}/rdstation/contacts/{uuid}", sb.control)).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn the_generator_runs_at_a_configured_rate() {
    let sb = start().await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sandbox::magento::run_generator(sb.magento.clone(), shutdown.clone()));
    let r = sb
        .http
        .put(format!("{}/magento/generator", sb.control))
        .json(&json!({"rate_per_sec": 200}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sb.http.put(format!("{}/magento/generator", sb.control)).json(&json!({"rate_per_sec": 0})).send().await.unwrap();
    let state: Value = sb.http.get(format!("{}/magento/state", sb.control)).send().await.unwrap().json().await.unwrap();
    let orders = state["orders"].as_u64().unwrap();
    assert!((100..=400).contains(&orders), "about 1.5 s at 200 facts/s, got {orders} orders");
    let steps = sb.magento.sim.lock().unwrap().generator.step;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(sb.magento.sim.lock().unwrap().generator.step, steps, "rate 0 stops the generator");
    shutdown.cancel();
    let generated: Value = sb
        .http
        .post(format!("{}/magento/generate", sb.control))
        .json(&json!({"count": 100}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(generated["facts"], 100);
}

#[test]
fn state_survives_a_restart_through_the_state_file() {
    let build = || {
        let (faults, counters) = (Faults::default(), Counters::default());
        (
            SalesforceApp::new(SalesforceConfig::default(), faults.clone(), counters.clone()),
            RdStationApp::new(RdConfig::default(), faults.clone(), counters.clone()),
            MagentoApp::new(MagentoConfig::default(), Default::default(), faults, counters),
        )
    };
    let (sf, rd, mg) = build();
    mg.sim.lock().unwrap().generate(50);
    let body = json!({"Name": "Persisted"});
    let id = sf.sim.lock().unwrap().org.upsert("Account", "Elo_Id__c", "p1", body.as_object().unwrap(), 1).unwrap().0;
    let mut fields = serde_json::Map::new();
    fields.insert("email".into(), json!("kept@example.com"));
    rd.sim
        .lock()
        .unwrap()
        .contacts
        .insert("u".into(), sandbox::rdstation::Contact { uuid: "u".into(), fields, funnel: json!({}), created_ms: 0 });

    let dir = std::env::temp_dir().join(format!("sandbox-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.json");
    sandbox::persist::save(&path, &sandbox::persist::snapshot(&sf, &rd, &mg)).unwrap();

    let (sf2, rd2, mg2) = build();
    let snapshot = sandbox::persist::load(&path).unwrap().expect("state file written");
    sandbox::persist::restore(snapshot, &sf2, &rd2, &mg2);
    assert_eq!(sf2.sim.lock().unwrap().org.get("Account", &id).unwrap().fields["Name"], "Persisted");
    assert!(rd2.sim.lock().unwrap().contacts.contains_key("u"));
    let (orders, step) = {
        let m = mg2.sim.lock().unwrap();
        (m.orders.clone(), m.generator.step)
    };
    assert_eq!(
        serde_json::to_string(&orders).unwrap(),
        serde_json::to_string(&mg.sim.lock().unwrap().orders).unwrap(),
        "orders survive byte for byte"
    );
    assert_eq!(step, 50);
    mg2.sim.lock().unwrap().generate(10);
    assert!(mg2.sim.lock().unwrap().orders.len() >= orders.len(), "generation continues after a restore");
    assert!(sandbox::persist::load(&dir.join("missing.json")).unwrap().is_none());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Malformed requests of every kind get the API's own 4xx error shape: never a 5xx, a panic or
/// a hang.
#[tokio::test]
async fn garbage_gets_the_real_error_shapes_never_a_5xx() {
    let (faults, counters) = (Faults::default(), Counters::default());
    let sf = serve(SalesforceApp::new(SalesforceConfig::default(), faults.clone(), counters.clone()).router()).await;
    let rd = serve(RdStationApp::new(RdConfig::default(), faults.clone(), counters.clone()).router()).await;
    let mg = serve(MagentoApp::new(MagentoConfig::default(), Default::default(), faults, counters).router()).await;
    let http = Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let bodies: [&[u8]; 5] = [b"", b"{", b"[]", b"\x00\xff\xfe", b"{\"a\":{\"b\":[1,2,{\"c\":null}]}}"];
    let paths = [
        (&sf, "/services/data/v66.0/sobjects/Account"),
        (&sf, "/services/data/v66.0/composite"),
        (&sf, "/services/data/v66.0/composite/sobjects/Account/Elo_Id__c"),
        (&sf, "/services/oauth2/token"),
        (&sf, "/services/data/v66.0/jobs/ingest"),
        (&rd, "/auth/token"),
        (&rd, "/platform/events"),
        (&rd, "/platform/contacts"),
        (&mg, "/rest/default/V1/integration/admin/token"),
        (&mg, "/rest/default/V1/orders"),
        (&mg, "/rest/xx/V1/orders"),
    ];
    for (base, path) in paths {
        for method in [reqwest::Method::GET, reqwest::Method::POST, reqwest::Method::PATCH] {
            for body in bodies {
                let resp = http
                    .request(method.clone(), format!("{base}{path}?searchCriteria[pageSize]=x&q=%ZZ"))
                    .header("content-type", "application/json")
                    .body(body.to_vec())
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
                let status = resp.status();
                assert!(status.is_client_error() || status.is_success(), "{method} {path} {body:?}: {status}");
                if status.is_client_error() {
                    let text = resp.text().await.unwrap();
                    if !text.is_empty() {
                        let parsed: Value =
                            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text}"));
                        let shaped = parsed.is_array() && parsed[0].get("errorCode").is_some()
                            || parsed.get("errors").is_some()
                            || parsed.get("message").is_some()
                            || parsed.get("error").is_some();
                        assert!(shaped, "{method} {path}: unexpected error body {parsed}");
                    }
                }
            }
        }
    }
}
