//! Helpers shared by the sink's in-process tests against the sandbox.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use elo_events::{CommerceEvent, CommerceEventType};
use salesforce_sink::client::{AuthFlow, ClientConfig, SalesforceClient};
use salesforce_sink::handler::{BulkSettings, Sink};
use salesforce_sink::mapping::Resolved;
use sandbox::salesforce::{SalesforceApp, SalesforceConfig};
use serde_json::Value;

pub async fn serve(config: SalesforceConfig) -> (SalesforceApp, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = SalesforceApp::new(
        SalesforceConfig { instance_url: url.clone(), ..config },
        Default::default(),
        Default::default(),
    );
    let router = app.clone().router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (app, url)
}

pub fn client(url: &str, secret: &str) -> SalesforceClient {
    SalesforceClient::new(ClientConfig {
        login_url: url.into(),
        api_version: "v66.0".into(),
        auth: AuthFlow::ClientCredentials { client_id: "elo-sandbox-client".into(), client_secret: secret.into() },
        request_timeout: Duration::from_secs(10),
        max_concurrent: 2,
        quota_reserve_percent: 0,
        quota_warn_hours: 4.0,
        quota_probe_every: Duration::from_secs(3600),
    })
    .unwrap()
}

pub async fn sink(url: &str, mapping: Resolved) -> Sink {
    let c = client(url, "elo-sandbox-secret");
    let org = salesforce_sink::setup::check(&c, &mapping).await.unwrap().unwrap();
    Sink::new(c, mapping, org, Duration::from_secs(30))
}

pub fn records(app: &SalesforceApp, object: &str) -> Vec<Value> {
    let sim = app.sim.lock().unwrap();
    sim.org.records.values().filter(|r| r.object == object).map(|r| Value::Object(r.fields.clone())).collect()
}

pub fn order(n: u64, status: &str, updated_at_delta: i64) -> CommerceEvent {
    let mut e = elo_events::sample::order_placed(n);
    if let Some(o) = e.order.as_mut() {
        o.status = status.into();
    }
    e.source_version.updated_at += updated_at_delta;
    if updated_at_delta > 0 {
        e.event_type = CommerceEventType::OrderChanged;
    }
    e
}

/// Bulk API 2.0 settings for in-process tests: batches of 50 records and more go through Bulk,
/// jobs are looked at every 5 ms.
pub fn bulk_test_settings() -> BulkSettings {
    BulkSettings {
        min_records: 50,
        poll: Duration::from_millis(5),
        timeout: Duration::from_secs(30),
        ..Default::default()
    }
}

/// Deactivates the price book entry of `sku` in store `store_id` (a product retired in
/// Salesforce): items of it are refused from then on (FIELD_INTEGRITY_EXCEPTION, permanent).
pub fn deactivate_entry(app: &SalesforceApp, store_id: i32, sku: &str) {
    let mut sim = app.sim.lock().unwrap();
    let entry = serde_json::json!(format!("pbe:s{store_id}:{sku}"));
    let id = sim.org.records.iter().find(|(_, r)| r.fields.get("Elo_Id__c") == Some(&entry)).unwrap().0.clone();
    let edit = serde_json::Map::from_iter([("IsActive".to_owned(), serde_json::json!(false))]);
    sim.org.alter(&id, &edit, sandbox::now_ms());
}

/// A product (sku `RETIRED`) whose price book entry is deactivated after a first order cached
/// it: its items are refused for good and roll back the rest of their graph.
pub async fn retire_a_product(app: &SalesforceApp, sink: &Sink, store: &elo_events::StoreRef) {
    let mut probe = elo_events::sample::order_placed(40);
    probe.store = store.clone();
    probe.order.as_mut().unwrap().items[0].sku = "RETIRED".into();
    let verdicts = sink.apply(&[Ok(probe)]).await;
    assert!(verdicts.iter().all(|v| v.result.is_ok()), "{verdicts:?}");
    deactivate_entry(app, store.store_id, "RETIRED");
}

/// Asserts every record of a batch was applied, naming the first that was not.
pub fn all_ok(verdicts: &[salesforce_sink::handler::Verdict]) {
    for (i, v) in verdicts.iter().enumerate() {
        assert!(v.result.is_ok(), "record {i}: {:?}", v.result);
    }
}
