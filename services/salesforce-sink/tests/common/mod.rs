//! Helpers shared by the sink's in-process tests against the sandbox.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use elo_events::{CommerceEvent, CommerceEventType};
use salesforce_sink::client::{AuthFlow, ClientConfig, SalesforceClient};
use salesforce_sink::handler::Sink;
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
