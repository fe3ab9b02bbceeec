//! Magento loses webhooks: with `drop_rate` set through the control API, that share of
//! notifications is never sent (not even retried), and the control API says which orders'
//! were lost, so a test can check that a reconciliation found exactly those.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Client;
use sandbox::faults::Faults;
use sandbox::magento::{MagentoApp, MagentoConfig};
use sandbox::rdstation::{RdConfig, RdStationApp};
use sandbox::salesforce::{SalesforceApp, SalesforceConfig};
use sandbox::{Counters, control};
use serde_json::{Value, json};

async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

#[tokio::test]
async fn a_drop_rate_loses_that_share_of_notifications_for_good() {
    let (faults, counters) = (Faults::default(), Counters::default());
    let magento = MagentoApp::new(MagentoConfig::default(), Default::default(), faults.clone(), counters.clone());
    let control = serve(control::router(control::Control {
        faults: faults.clone(),
        counters: counters.clone(),
        salesforce: SalesforceApp::new(SalesforceConfig::default(), faults.clone(), counters.clone()),
        rdstation: RdStationApp::new(RdConfig::default(), faults, counters),
        magento: magento.clone(),
    }))
    .await;
    let received: Arc<Mutex<Vec<i64>>> = Arc::default();
    let receiver = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let received = received.clone();
            move |body: axum::body::Bytes| {
                let received = received.clone();
                async move {
                    let event: Value = serde_json::from_slice(&body).unwrap();
                    received.lock().unwrap().push(event["order"]["entity_id"].as_i64().unwrap());
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    let hook = format!("{}/hook", serve(receiver).await);
    let http = Client::new();
    let put = |body: Value| http.put(format!("{control}/magento/webhook")).json(&body).send();
    let refused = put(json!({"url": hook, "secret": "s", "duplicate_rate": 0.0, "style": "plain", "drop_rate": 1.5}));
    assert_eq!(refused.await.unwrap().status(), 400);
    let r = put(json!({"url": hook, "secret": "s", "duplicate_rate": 0.0, "style": "plain", "drop_rate": 0.2}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["drop_rate"], 0.2);

    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sandbox::magento::webhook::dispatch(magento.clone(), shutdown.clone()));
    magento.sim.lock().unwrap().generate_orders(300);
    let orders: BTreeSet<i64> = magento.sim.lock().unwrap().orders.keys().copied().collect();
    assert_eq!(orders.len(), 300);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state: Value = http.get(format!("{control}/magento/state")).send().await.unwrap().json().await.unwrap();
        let (dropped, pending) =
            (state["webhook"]["dropped"].as_u64().unwrap(), state["webhook"]["pending"].as_u64().unwrap());
        if (received.lock().unwrap().len() as u64 + dropped >= 300 && pending == 0) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Lost for good: nothing more arrives later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    shutdown.cancel();
    let state: Value = http.get(format!("{control}/magento/state")).send().await.unwrap().json().await.unwrap();
    let lost: BTreeSet<i64> =
        state["webhook"]["dropped_orders"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    let got: BTreeSet<i64> = received.lock().unwrap().iter().copied().collect();
    assert_eq!(state["webhook"]["dropped"].as_u64().unwrap() as usize, lost.len());
    assert!((25..=100).contains(&lost.len()), "about 20% of 300 lost, got {}", lost.len());
    assert!(got.is_disjoint(&lost), "a lost notification is never sent");
    assert_eq!(got.union(&lost).copied().collect::<BTreeSet<_>>(), orders, "every other order is notified");
}
