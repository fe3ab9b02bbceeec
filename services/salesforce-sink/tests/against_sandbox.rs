//! The sink's Salesforce side against the sandbox's Salesforce simulator, in process: the
//! mapping check, Composite Graph writes, staleness, errors by class, re-authentication.

use std::time::Duration;

use elo_events::{CommerceEvent, CommerceEventType, OutcomeStatus};
use elo_kafka::ErrorClass;
use salesforce_sink::client::{AuthFlow, ClientConfig, SalesforceClient};
use salesforce_sink::handler::Sink;
use salesforce_sink::mapping::{Mapping, MappingError};
use sandbox::salesforce::SalesforceConfig;
use serde_json::json;

mod common;

use common::*;

#[tokio::test]
async fn orders_land_with_accounts_contacts_and_items_in_one_call() {
    let (app, url) = serve(SalesforceConfig::default()).await;
    let sink = sink(&url, Mapping::default().resolve().unwrap()).await;
    let events: Vec<_> = (0..40).map(|n| Ok(order(n, "pending", 0))).collect();
    let before = app.sim.lock().unwrap().api_usage;
    let verdicts = sink.apply(&events).await;
    for (i, v) in verdicts.iter().enumerate() {
        assert!(v.result.is_ok(), "record {i}: {:?}", v.result);
        assert_eq!(v.outcome, Some(OutcomeStatus::Applied));
        assert!(v.target_ids.contains_key("Order"));
    }
    let calls = app.sim.lock().unwrap().api_usage - before;
    assert!(calls <= 3, "40 orders took {calls} calls (products + graph)");
    assert_eq!(records(&app, "Order").len(), 40);
    assert_eq!(records(&app, "OrderItem").len(), 40);
    let keys: std::collections::BTreeSet<String> =
        events.iter().map(|e| e.as_ref().unwrap().customer_key.clone()).collect();
    assert_eq!(records(&app, "Account").len(), keys.len(), "one account per customer key, no duplicates");
    assert_eq!(records(&app, "Contact").len(), keys.len());
    let o = records(&app, "Order").into_iter().find(|o| o["Elo_Id__c"] == "o:1").unwrap();
    assert_eq!(o["Status"], "Draft");
    assert_eq!(o["Name"], "000000001");
    assert_eq!(o["EffectiveDate"], "2026-11-01");

    // A later version activates it; an older one arriving afterwards is skipped.
    let newer = order(0, "processing", 5_000);
    let verdicts = sink.apply(&[Ok(newer.clone())]).await;
    assert!(verdicts[0].result.is_ok(), "{:?}", verdicts[0].result);
    let o = records(&app, "Order").into_iter().find(|o| o["Elo_Id__c"] == "o:1").unwrap();
    assert_eq!((o["Status"].as_str(), o["Magento_Status__c"].as_str()), (Some("Activated"), Some("processing")));
    let verdicts = sink.apply(&[Ok(order(0, "pending", 1_000))]).await;
    assert_eq!(verdicts[0].outcome, Some(OutcomeStatus::SkippedStale));
    let o = records(&app, "Order").into_iter().find(|o| o["Elo_Id__c"] == "o:1").unwrap();
    assert_eq!(o["Status"], "Activated", "an older version never overwrites a newer one");

    // A change after activation: back to Draft, change, reactivate.
    let mut changed = order(0, "complete", 9_000);
    changed.order.as_mut().unwrap().items[0].qty_ordered = elo_events::Decimal4::from_units(7);
    let verdicts = sink.apply(&[Ok(changed)]).await;
    assert!(verdicts[0].result.is_ok(), "{:?}", verdicts[0].result);
    let item = records(&app, "OrderItem").into_iter().find(|i| i["Elo_Id__c"] == "oi:10").unwrap();
    assert_eq!(item["Quantity"], json!(7.0));
    let o = records(&app, "Order").into_iter().find(|o| o["Elo_Id__c"] == "o:1").unwrap();
    assert_eq!(o["Status"], "Activated");
}

#[tokio::test]
async fn a_rejected_record_is_permanent_and_the_rest_of_the_batch_applies() {
    let (app, url) = serve(SalesforceConfig::default()).await;
    let sink = sink(&url, Mapping::default().resolve().unwrap()).await;
    // Another contact already has this e-mail: the duplicate rule refuses the new one.
    {
        let mut sim = app.sim.lock().unwrap();
        let fields = json!({"LastName": "Other", "Email": "customer5@example.com"});
        sim.org.create("Contact", fields.as_object().unwrap().clone(), 0).unwrap();
    }
    let events: Vec<_> = (0..10).map(|n| Ok(order(n, "pending", 0))).collect();
    let first = sink.apply(&events).await;
    let bad = 5;
    let error = first[bad].result.as_ref().unwrap_err();
    assert_eq!((error.class, error.code.as_str()), (ErrorClass::Permanent, "DUPLICATES_DETECTED"), "{error}");
    assert!(!error.message.contains('@'), "no e-mail in DLQ messages: {}", error.message);
    for (i, v) in first.iter().enumerate().filter(|(i, _)| *i != bad) {
        assert!(v.result.is_ok(), "record {i}: {:?}", v.result);
    }
    assert_eq!(records(&app, "Order").len(), 9);

    // An unmappable event names its reason.
    let mut no_store = order(20, "pending", 0);
    no_store.store.store_id = 9;
    let v = sink.apply(&[Ok(no_store)]).await;
    let e = v[0].result.as_ref().unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
    assert!(e.message.contains("unknown store 9"), "{}", e.message);
}

#[tokio::test]
async fn lock_errors_are_transient_and_a_revoked_token_is_renewed_once() {
    let (app, url) = serve(SalesforceConfig::default()).await;
    let sink = sink(&url, Mapping::default().resolve().unwrap()).await;
    app.sim.lock().unwrap().revoke_all();
    let v = sink.apply(&[Ok(order(1, "pending", 0))]).await;
    assert!(v[0].result.is_ok(), "re-authenticated after the revocation: {:?}", v[0].result);

    app.sim.lock().unwrap().config.lock_row_rate = 1.0;
    let v = sink.apply(&[Ok(order(2, "pending", 0)), Ok(order(3, "pending", 0))]).await;
    for verdict in &v {
        let e = verdict.result.as_ref().unwrap_err();
        assert_eq!(e.class, ErrorClass::Transient, "{e}");
    }
    app.sim.lock().unwrap().config.lock_row_rate = 0.0;
    let v = sink.apply(&[Ok(order(2, "pending", 0)), Ok(order(3, "pending", 0))]).await;
    assert!(v.iter().all(|v| v.result.is_ok()));

    // Quota exhausted: rate limited with the configured pause.
    app.sim.lock().unwrap().config.daily_quota = 1;
    let v = sink.apply(&[Ok(order(4, "pending", 0))]).await;
    let e = v[0].result.as_ref().unwrap_err();
    assert_eq!((e.class, e.code.as_str()), (ErrorClass::RateLimited, "REQUEST_LIMIT_EXCEEDED"));
    assert_eq!(e.retry_after, Some(Duration::from_secs(30)));
}

#[tokio::test]
async fn wrong_credentials_are_auth_errors() {
    let (_app, url) = serve(SalesforceConfig::default()).await;
    let c = client(&url, "wrong");
    let error = c.describe("Account").await.unwrap_err();
    assert!(matches!(error, salesforce_sink::client::Error::Auth { .. }), "{error}");
}

#[tokio::test]
async fn a_mapping_that_does_not_fit_the_org_names_the_field() {
    let (_app, url) = serve(SalesforceConfig::default()).await;
    let c = client(&url, "elo-sandbox-secret");
    let bad: Mapping =
        serde_json::from_str(r#"{"fields":{"order":{"Nope__c":"order.status","EffectiveDate":"order.created_date"}}}"#)
            .unwrap();
    let error = salesforce_sink::setup::check(&c, &bad.resolve().unwrap()).await.unwrap().unwrap_err();
    assert_eq!(error.to_string(), "mapping: Order.Nope__c does not exist in the org");
    let no_ext: Mapping = serde_json::from_str(r#"{"external_ids":{"order":"Magento_Status__c"}}"#).unwrap();
    let error = salesforce_sink::setup::check(&c, &no_ext.resolve().unwrap()).await.unwrap().unwrap_err();
    assert!(matches!(error, MappingError::NotExternalId { .. }), "{error}");
    let missing_required: Mapping =
        serde_json::from_str(r#"{"fields":{"order":{"Name":"order.increment_id"}}}"#).unwrap();
    let error = salesforce_sink::setup::check(&c, &missing_required.resolve().unwrap()).await.unwrap().unwrap_err();
    assert_eq!(error.to_string(), "mapping: Order.EffectiveDate is required by the org and not mapped");
}

#[tokio::test]
async fn person_accounts_mode_writes_person_accounts_without_contacts() {
    let (app, url) = serve(SalesforceConfig { person_accounts: true, ..SalesforceConfig::default() }).await;
    let mapping: Mapping = serde_json::from_str(r#"{"account_mode":"person"}"#).unwrap();
    let sink = sink(&url, mapping.resolve().unwrap()).await;
    let mut events: Vec<CommerceEvent> = (0..6).map(|n| order(n, "pending", 0)).collect();
    for e in &mut events {
        e.customer.as_mut().unwrap().lastname = Some("Souza".into());
    }
    let v = sink.apply(&events.iter().cloned().map(Ok).collect::<Vec<_>>()).await;
    assert!(v.iter().all(|v| v.result.is_ok()), "{:?}", v.iter().map(|v| &v.result).collect::<Vec<_>>());
    let accounts = records(&app, "Account");
    assert!(accounts.iter().all(|a| a["IsPersonAccount"] == true), "{accounts:?}");
    assert_eq!(records(&app, "Order").len(), 6);
}

#[tokio::test]
async fn an_order_change_never_brings_back_older_customer_names() {
    let (app, url) = serve(SalesforceConfig::default()).await;
    let sink = sink(&url, Mapping::default().resolve().unwrap()).await;
    let placed = order(0, "pending", 0);
    assert!(sink.apply(&[Ok(placed.clone())]).await[0].result.is_ok());
    // The customer renames themselves after placing the order.
    let mut renamed = placed.clone();
    renamed.event_type = CommerceEventType::CustomerChanged;
    renamed.order = None;
    renamed.source_version.entity_type = "customer".into();
    renamed.source_version.updated_at += 2_000;
    renamed.customer.as_mut().unwrap().lastname = Some("Renamed".into());
    assert!(sink.apply(&[Ok(renamed)]).await[0].result.is_ok());
    // Later, the order changes status: it still carries the name as at placement.
    let shipped = order(0, "complete", 5_000);
    let v = sink.apply(&[Ok(shipped.clone())]).await;
    assert!(v[0].result.is_ok(), "{:?}", v[0].result);
    let contact =
        records(&app, "Contact").into_iter().find(|c| c["Elo_Id__c"] == placed.customer_key.as_str()).unwrap();
    assert_eq!(contact["LastName"], "Renamed");
    // A redelivery of the confirmed version costs no call and reports the same ids.
    let before = app.sim.lock().unwrap().api_usage;
    let again = sink.apply(&[Ok(shipped)]).await;
    assert_eq!(app.sim.lock().unwrap().api_usage, before);
    assert_eq!(again[0].outcome, Some(OutcomeStatus::Applied));
    assert_eq!(again[0].target_ids, v[0].target_ids);
}

/// Calls per 1,000 orders in batches of 200 (the runtime's default), against what a
/// one-call-per-record connector would spend on the same orders (an upsert per account,
/// contact, order, item and activation, plus a product and two price book entries per new SKU).
#[tokio::test]
async fn a_thousand_orders_cost_a_handful_of_calls() {
    let (app, url) = serve(SalesforceConfig::default()).await;
    let sink = sink(&url, Mapping::default().resolve().unwrap()).await;
    // Registered customers only: the sample's guests share e-mails with registered customers,
    // which the org's Contact duplicate rule refuses (see the README).
    let events: Vec<CommerceEvent> = (0..1500u64)
        .filter(|n| n % 3 != 2)
        .map(|n| order(n, if n % 2 == 0 { "processing" } else { "pending" }, 0))
        .collect();
    let before = app.sim.lock().unwrap().api_usage;
    for chunk in events.chunks(200) {
        let batch: Vec<_> = chunk.iter().cloned().map(Ok).collect();
        let verdicts = sink.apply(&batch).await;
        let failed: Vec<_> = verdicts
            .iter()
            .zip(chunk)
            .filter_map(|(v, e)| {
                v.result.as_ref().err().map(|r| (r, &e.customer_key, &e.customer.as_ref().unwrap().email))
            })
            .collect();
        assert!(failed.is_empty(), "{} failed, first {:?}", failed.len(), failed.first());
    }
    let calls = app.sim.lock().unwrap().api_usage - before;
    let skus: std::collections::BTreeSet<_> = events
        .iter()
        .flat_map(|e| e.order.as_ref().unwrap().items.iter().map(|i| (e.store.store_id, i.sku.clone())))
        .collect();
    let per_record: usize = events
        .iter()
        .map(|e| {
            let o = e.order.as_ref().unwrap();
            3 + o.items.len() + usize::from(o.status == "processing")
        })
        .sum::<usize>()
        + skus.len() * 3;
    eprintln!("1,000 orders: {calls} calls batched, {per_record} one call per record");
    assert!(calls <= 15, "{calls} calls for 1,000 orders");
    assert_eq!(records(&app, "Order").len(), 1000);
}

#[tokio::test]
async fn the_reserve_is_left_to_other_integrations_and_the_sink_resumes_when_budget_returns() {
    let (app, url) = serve(SalesforceConfig { daily_quota: 40, ..SalesforceConfig::default() }).await;
    let c = SalesforceClient::new(ClientConfig {
        login_url: url.clone(),
        api_version: "v66.0".into(),
        auth: AuthFlow::ClientCredentials {
            client_id: "elo-sandbox-client".into(),
            client_secret: "elo-sandbox-secret".into(),
        },
        request_timeout: Duration::from_secs(10),
        max_concurrent: 2,
        quota_reserve_percent: 50,
        quota_warn_hours: 4.0,
        quota_probe_every: Duration::from_millis(300),
    })
    .unwrap();
    let mapping = Mapping::default().resolve().unwrap();
    let org = salesforce_sink::setup::check(&c, &mapping).await.unwrap().unwrap();
    let sink = Sink::new(c, mapping, org, Duration::from_secs(1));
    // Spend up to the reserve (startup used ~9 calls; each lone order ~2).
    let mut n = 0;
    let held = loop {
        let v = sink.apply(&[Ok(order(n, "pending", 0))]).await;
        n += 1;
        if let Err(e) = &v[0].result {
            break e.clone();
        }
        assert!(n < 40, "never held back");
    };
    assert_eq!((held.class, held.retry_after), (ErrorClass::RateLimited, Some(Duration::from_secs(1))), "{held}");
    let used = app.sim.lock().unwrap().api_usage;
    assert!(used <= 22, "the sink stopped near half of the quota: {used}");
    let v = sink.apply(&[Ok(order(n, "pending", 0))]).await;
    assert!(v[0].result.is_err());
    assert_eq!(app.sim.lock().unwrap().api_usage, used, "held back locally, no call spent");
    // The rolling window frees budget: after the probe interval the sink finds out and goes on.
    app.sim.lock().unwrap().api_usage = 0;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let v = sink.apply(&[Ok(order(n, "pending", 0))]).await;
    assert!(v[0].result.is_ok(), "{:?}", v[0].result);
    let v = sink.apply(&[Ok(order(n + 1, "pending", 0))]).await;
    assert!(v[0].result.is_ok(), "{:?}", v[0].result);
}

#[tokio::test]
async fn an_erased_customer_is_anonymised_and_older_orders_do_not_bring_the_data_back() {
    let (app, url) = serve(SalesforceConfig::default()).await;
    let sink = sink(&url, Mapping::default().resolve().unwrap()).await;
    let placed = order(0, "pending", 0);
    assert!(sink.apply(&[Ok(placed.clone())]).await[0].result.is_ok());
    let mut erased = placed.clone();
    erased.event_type = CommerceEventType::CustomerErased;
    erased.order = None;
    erased.customer = None;
    erased.source_version = elo_events::SourceVersion {
        entity_type: "customer".into(),
        entity_id: "1".into(),
        updated_at: placed.source_version.updated_at + 60_000,
    };
    erased.erasure =
        Some(elo_events::CustomerErasure { customer_id: Some(1), email_sha256: "00".into(), reason: "request".into() });
    let v = sink.apply(&[Ok(erased.clone())]).await;
    assert!(v[0].result.is_ok(), "{:?}", v[0].result);
    assert!(v[0].target_ids.contains_key("Contact") && v[0].target_ids.contains_key("Account"));
    let key = placed.customer_key.as_str();
    let contact = records(&app, "Contact").into_iter().find(|c| c["Elo_Id__c"] == key).unwrap();
    assert_eq!((contact["LastName"].as_str(), contact["Email"].is_null()), (Some("Erased"), true), "{contact}");
    let account = records(&app, "Account").into_iter().find(|a| a["Elo_Id__c"] == key).unwrap();
    assert_eq!(account["Name"], "Erased customer");
    // An order placed before the erasure changes status later: its order is updated, the person stays erased.
    let mut later = order(0, "processing", 120_000);
    later.customer_key = placed.customer_key.clone();
    assert!(sink.apply(&[Ok(later)]).await[0].result.is_ok());
    let contact = records(&app, "Contact").into_iter().find(|c| c["Elo_Id__c"] == key).unwrap();
    assert!(contact["Email"].is_null(), "{contact}");
    // Erasing a key Salesforce never saw is a no-op, not an error.
    erased.customer_key = "c:999999".into();
    assert!(sink.apply(&[Ok(erased)]).await[0].result.is_ok());
}

#[tokio::test]
async fn the_jwt_bearer_flow_signs_an_assertion_the_org_accepts() {
    let dir = std::env::temp_dir().join(format!("sfsink-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (private, public) = (dir.join("key.pem"), dir.join("pub.pem"));
    let openssl = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new("openssl").args(args).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}");
    };
    openssl(&["genrsa".as_ref(), "-out".as_ref(), private.as_os_str(), "2048".as_ref()]);
    openssl(&[
        "rsa".as_ref(),
        "-in".as_ref(),
        private.as_os_str(),
        "-pubout".as_ref(),
        "-out".as_ref(),
        public.as_os_str(),
    ]);
    let (_app, url) = serve(SalesforceConfig {
        jwt_public_key_pem: Some(std::fs::read_to_string(&public).unwrap()),
        ..SalesforceConfig::default()
    })
    .await;
    let jwt = |audience: &str| {
        SalesforceClient::new(ClientConfig {
            login_url: url.clone(),
            api_version: "v66.0".into(),
            auth: AuthFlow::JwtBearer {
                client_id: "elo-sandbox-client".into(),
                username: "integration@elo.example".into(),
                private_key_pem: std::fs::read_to_string(&private).unwrap(),
                audience: audience.into(),
            },
            request_timeout: Duration::from_secs(10),
            max_concurrent: 2,
            quota_reserve_percent: 0,
            quota_warn_hours: 4.0,
            quota_probe_every: Duration::from_secs(60),
        })
        .unwrap()
    };
    let described = jwt("https://login.salesforce.com").describe("Order").await.unwrap();
    assert_eq!(described["name"], "Order");
    let refused = jwt("http://elsewhere.example").describe("Order").await.unwrap_err();
    assert!(matches!(refused, salesforce_sink::client::Error::Auth { .. }), "{refused}");
    std::fs::remove_dir_all(&dir).ok();
}
