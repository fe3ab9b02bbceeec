//! Round 2 of the sink against the sandbox, in process: late enrichment, erasure by kept ids
//! in delete mode, Bulk API 2.0, and a guest who registers.

use std::time::Duration;

use elo_events::{CommerceEvent, CommerceEventType, OutcomeStatus};
use elo_kafka::ErrorClass;
use salesforce_sink::mapping::Mapping;
use sandbox::salesforce::{SalesforceApp, SalesforceConfig};
use serde_json::{Value, json};

mod common;

use common::*;

fn erased_event(placed: &CommerceEvent) -> CommerceEvent {
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
    erased
}

/// order-ingest's late-enrichment follow-up (same source version, new event id, stock and
/// consent filled in) is applied over the first event, and the first, replayed, never wins back.
#[tokio::test]
async fn a_late_enrichment_follow_up_wins_over_the_first_event_and_never_the_reverse() {
    let (app, url) = serve(SalesforceConfig::default()).await;
    app.sim
        .lock()
        .unwrap()
        .org
        .schema
        .add_field("Order", serde_json::from_value(json!({"name": "Inventory_Status__c", "type": "string"})).unwrap())
        .unwrap();
    let mapping: Mapping = serde_json::from_value(json!({"fields": {"order": {
        "Name": "order.increment_id", "EffectiveDate": "order.created_date",
        "Inventory_Status__c": "order.inventory_status"}}}))
    .unwrap();
    let sink = sink(&url, mapping.resolve().unwrap()).await;
    let first = |n: u64| {
        let mut e = order(n, "pending", 0);
        e.order.as_mut().unwrap().inventory_status = elo_events::InventoryStatus::Unchecked;
        e.customer.as_mut().unwrap().consent.status = elo_events::ConsentStatus::Unknown;
        e
    };
    let follow_up = |n: u64| {
        let mut e = order(n, "pending", 0);
        e.event_id = format!("{}-enrichment", e.event_id);
        e.order.as_mut().unwrap().inventory_status = elo_events::InventoryStatus::LowStock;
        e
    };
    let inventory = |n: u64| {
        let ext = format!("o:{}", first(n).order.unwrap().entity_id);
        records(&app, "Order").into_iter().find(|o| o["Elo_Id__c"] == ext.as_str()).unwrap()["Inventory_Status__c"]
            .clone()
    };
    // In two batches: the follow-up is written over the first.
    assert_eq!(sink.apply(&[Ok(first(0))]).await[0].outcome, Some(OutcomeStatus::Applied));
    assert_eq!(inventory(0), "UNCHECKED");
    let v = sink.apply(&[Ok(follow_up(0))]).await;
    assert_eq!((v[0].result.is_ok(), v[0].outcome), (true, Some(OutcomeStatus::Applied)));
    assert_eq!(inventory(0), "LOW_STOCK");
    // The first event replayed is older than the follow-up.
    let v = sink.apply(&[Ok(first(0))]).await;
    assert_eq!(v[0].outcome, Some(OutcomeStatus::SkippedStale));
    assert_eq!(inventory(0), "LOW_STOCK");
    // In one batch, whichever comes first, the follow-up wins.
    let v = sink.apply(&[Ok(follow_up(1)), Ok(first(1))]).await;
    assert_eq!(v[1].outcome, Some(OutcomeStatus::SkippedStale));
    assert_eq!(inventory(1), "LOW_STOCK");
}

/// `"erasure": "delete"`: the person's Orders (activated ones included, their items with
/// them), Contact and Account are deleted, found through the ids the sink kept; other
/// customers' records stay; erasing again is a no-op.
#[tokio::test]
async fn erasure_in_delete_mode_removes_the_persons_records_found_through_the_kept_ids() {
    let (app, url) = serve(SalesforceConfig::default()).await;
    let mapping: Mapping = serde_json::from_value(json!({"erasure": "delete"})).unwrap();
    let sink = sink(&url, mapping.resolve().unwrap()).await;
    let placed = order(0, "processing", 0);
    let other = order(1, "pending", 0);
    assert_ne!(placed.customer_key, other.customer_key);
    let v = sink.apply(&[Ok(placed.clone()), Ok(other.clone())]).await;
    assert!(v.iter().all(|v| v.result.is_ok()), "{v:?}");
    let account_id = v[0].target_ids["Account"].clone();
    assert_eq!(records(&app, "Order").iter().filter(|o| o["Status"] == "Activated").count(), 1);
    // The external ids are changed behind the sink's back: only the kept ids find the records.
    {
        let mut sim = app.sim.lock().unwrap();
        let ids: Vec<String> = sim
            .org
            .records
            .values()
            .filter(|r| r.fields.get("Elo_Id__c").and_then(Value::as_str) == Some(placed.customer_key.as_str()))
            .map(|r| r.id.clone())
            .collect();
        for id in ids {
            sim.org.alter(&id, json!({"Elo_Id__c": "renamed"}).as_object().unwrap(), 0);
        }
    }
    let calls = app.sim.lock().unwrap().api_usage;
    let v = sink.apply(&[Ok(erased_event(&placed))]).await;
    assert!(v[0].result.is_ok(), "{:?}", v[0].result);
    assert_eq!(v[0].target_ids["Account"], account_id);
    let key_of = |r: &Value| r["Elo_Id__c"].as_str().unwrap_or_default().to_owned();
    let (accounts, contacts) = (records(&app, "Account"), records(&app, "Contact"));
    assert_eq!(accounts.iter().map(key_of).collect::<Vec<_>>(), vec![other.customer_key.clone()]);
    assert_eq!(contacts.iter().map(key_of).collect::<Vec<_>>(), vec![other.customer_key.clone()]);
    let orders = records(&app, "Order");
    assert_eq!(orders.len(), 1, "{orders:?}");
    assert_eq!(orders[0]["AccountId"], json!(sink_account(&app, &other.customer_key)));
    let items = records(&app, "OrderItem");
    assert!(items.iter().all(|i| i["OrderId"] == json!(sink_id(&app, "Order", &orders[0]))), "{items:?}");
    // One query for the orders, one Composite for them, one for the Contact and Account.
    assert_eq!(app.sim.lock().unwrap().api_usage - calls, 3);
    // Again (a redelivery): nothing left, no error.
    assert!(sink.apply(&[Ok(erased_event(&placed))]).await[0].result.is_ok());
}

fn sink_account(app: &SalesforceApp, key: &str) -> String {
    let sim = app.sim.lock().unwrap();
    sim.org.records.values().find(|r| r.object == "Account" && r.fields["Elo_Id__c"] == key).unwrap().id.clone()
}

fn sink_id(app: &SalesforceApp, object: &str, fields: &Value) -> String {
    let sim = app.sim.lock().unwrap();
    sim.org
        .records
        .values()
        .find(|r| r.object == object && Value::Object(r.fields.clone()) == *fields)
        .unwrap()
        .id
        .clone()
}

/// A batch above the Bulk threshold is written by Bulk API 2.0 upsert jobs (Accounts,
/// Contacts, Orders, OrderItems, activations), the results are read back, a refused row fails
/// its customer's records `permanent` with Salesforce's code, and everything else lands.
#[tokio::test]
async fn a_large_batch_goes_through_bulk_api_2_and_refused_rows_fail_their_records() {
    use salesforce_sink::handler::BulkSettings;
    let (app, url) = serve(SalesforceConfig::default()).await;
    let bulk = BulkSettings {
        min_records: 50,
        poll: Duration::from_millis(5),
        timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let sink = sink(&url, Mapping::default().resolve().unwrap()).await.with_bulk(bulk);
    let events: Vec<CommerceEvent> =
        (0..90).map(|n| order(n, if n % 2 == 0 { "processing" } else { "pending" }, 0)).collect();
    let refused = events[5].clone();
    let email = refused.customer.as_ref().unwrap().email.clone();
    app.sim
        .lock()
        .unwrap()
        .org
        .create("Contact", json!({"LastName": "Existing", "Email": email}).as_object().unwrap().clone(), 0)
        .unwrap();
    let before = app.sim.lock().unwrap().api_usage;
    let v = sink.apply(&events.iter().cloned().map(Ok).collect::<Vec<_>>()).await;
    let calls = app.sim.lock().unwrap().api_usage - before;
    let jobs: Vec<(String, String)> =
        app.sim.lock().unwrap().jobs.values().map(|j| (j.object.clone(), j.state.clone())).collect();
    let objects: Vec<&str> = jobs.iter().map(|(o, _)| o.as_str()).collect();
    assert_eq!(objects, ["Account", "Contact", "Order", "OrderItem", "Order"], "{jobs:?}");
    assert!(jobs.iter().all(|(_, s)| s == "JobComplete"), "{jobs:?}");
    for (e, v) in events.iter().zip(&v) {
        if e.customer_key == refused.customer_key {
            let error = v.result.as_ref().unwrap_err();
            assert_eq!((error.class, error.code.as_str()), (ErrorClass::Permanent, "DUPLICATES_DETECTED"));
            assert_eq!(v.outcome, Some(OutcomeStatus::DeadLettered));
        } else {
            assert!(v.result.is_ok(), "{:?}", v.result);
            assert!(v.target_ids.contains_key("Order") && v.target_ids.contains_key("Account"), "{:?}", v.target_ids);
        }
    }
    let landed: Vec<&CommerceEvent> = events.iter().filter(|e| e.customer_key != refused.customer_key).collect();
    let orders = records(&app, "Order");
    assert_eq!(orders.len(), landed.len());
    for e in &landed {
        let o = e.order.as_ref().unwrap();
        let ext = format!("o:{}", o.entity_id);
        let got = orders.iter().find(|r| r["Elo_Id__c"] == ext.as_str()).unwrap();
        let want = if o.status == "processing" { "Activated" } else { "Draft" };
        assert_eq!((got["Status"].as_str(), got["Magento_Status__c"].as_str()), (Some(want), Some(o.status.as_str())));
        assert_eq!(got["Name"], json!(o.increment_id));
    }
    let items = records(&app, "OrderItem");
    let expected_items: usize = landed.iter().map(|e| e.order.as_ref().unwrap().items.len()).sum();
    assert_eq!(items.len(), expected_items);
    assert!(items.iter().all(|i| i["Quantity"].as_f64().is_some_and(|q| q > 0.0)), "typed quantities: {:?}", items[0]);
    // Five jobs of about seven calls each, plus the products: far fewer than one per record.
    assert!(calls <= 40, "{calls} calls");
    // A redelivery of the batch costs nothing.
    let before = app.sim.lock().unwrap().api_usage;
    let again = sink.apply(&landed.iter().map(|e| Ok((*e).clone())).collect::<Vec<_>>()).await;
    assert!(again.iter().all(|v| v.outcome == Some(OutcomeStatus::Applied)));
    assert_eq!(app.sim.lock().unwrap().api_usage, before);
}

/// A Bulk batch is read a chunk at a time (250 records here): an order's newest version in a
/// later chunk wins over an older one in an earlier chunk (and an older one after it is
/// skipped), and a customer with orders in several chunks is one row, written with its newest
/// data, holding every order.
#[tokio::test]
async fn a_bulk_batch_read_in_chunks_keeps_the_newest_versions_and_one_row_per_customer() {
    use salesforce_sink::handler::BulkSettings;
    let (app, url) = serve(SalesforceConfig::default()).await;
    let bulk = BulkSettings {
        min_records: 50,
        poll: Duration::from_millis(5),
        timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let sink = sink(&url, Mapping::default().resolve().unwrap()).await.with_bulk(bulk);
    // Registered customers only (n % 97 is the customer: each has orders in every chunk).
    let mut events: Vec<CommerceEvent> = (0..900).filter(|n| n % 3 != 2).map(|n| order(n, "pending", 0)).collect();
    // Order of events[3]: a newer version (activated) in the third chunk, an older one after it.
    let mut newer = events[3].clone();
    newer.order.as_mut().unwrap().status = "processing".into();
    newer.source_version.updated_at += 5_000;
    newer.event_type = CommerceEventType::OrderChanged;
    let mut older = events[3].clone();
    older.source_version.updated_at -= 5_000;
    events[520] = newer.clone();
    events[590] = older.clone();
    // The customer of the last order (its newest, placed last) renamed there.
    let renamed_at = 599;
    {
        let c = events[renamed_at].customer.as_mut().unwrap();
        c.lastname = Some("Renamed".into());
    }
    let key = events[renamed_at].customer_key.clone();
    let v = sink.apply(&events.iter().cloned().map(Ok).collect::<Vec<_>>()).await;
    let objects: Vec<String> = app.sim.lock().unwrap().jobs.values().map(|j| j.object.clone()).collect();
    assert_eq!(objects, ["Account", "Contact", "Order", "OrderItem", "Order"], "five jobs for the whole batch");
    assert_eq!(v[3].outcome, Some(OutcomeStatus::SkippedStale), "{:?}", v[3].result);
    assert_eq!(v[590].outcome, Some(OutcomeStatus::SkippedStale), "{:?}", v[590].result);
    assert_eq!(v[520].outcome, Some(OutcomeStatus::Applied), "{:?}", v[520].result);
    for (i, v) in v.iter().enumerate().filter(|(i, _)| ![3, 590].contains(i)) {
        assert!(v.result.is_ok() && v.target_ids.contains_key("Account"), "{i}: {:?} {:?}", v.result, v.target_ids);
    }
    let orders = records(&app, "Order");
    let ext = format!("o:{}", newer.order.as_ref().unwrap().entity_id);
    let got = orders.iter().find(|r| r["Elo_Id__c"] == ext.as_str()).unwrap();
    assert_eq!((got["Status"].as_str(), got["Magento_Status__c"].as_str()), (Some("Activated"), Some("processing")));
    let distinct: std::collections::BTreeSet<&str> = events.iter().map(|e| e.customer_key.as_str()).collect();
    assert_eq!(records(&app, "Account").len(), distinct.len(), "one Account per customer");
    assert_eq!(records(&app, "Contact").len(), distinct.len(), "one Contact per customer");
    let contact = records(&app, "Contact").into_iter().find(|c| c["Elo_Id__c"] == key.as_str()).unwrap();
    assert_eq!(contact["LastName"], json!("Renamed"), "the newest customer data of the batch");
    let ids: std::collections::BTreeSet<i64> = events.iter().map(|e| e.order.as_ref().unwrap().entity_id).collect();
    assert_eq!(orders.len(), ids.len(), "every order once");
}

/// A guest who registers later gets a second customer key with the same e-mail: the duplicate
/// rule refuses a second Contact, so the sink matches the existing person by e-mail and writes
/// the new key's orders to that Account and Contact (once looked up, at no extra call).
#[tokio::test]
async fn a_guest_who_registers_is_matched_by_e_mail_and_keeps_one_contact() {
    let (app, url) = serve(SalesforceConfig::default()).await;
    let sink = sink(&url, Mapping::default().resolve().unwrap()).await;
    let guest = order(2, "pending", 0); // n % 3 == 2: a guest
    assert!(guest.customer_key.starts_with("g:"), "{}", guest.customer_key);
    assert!(sink.apply(&[Ok(guest.clone())]).await[0].result.is_ok());
    // The same person, registered, orders again.
    let mut registered = order(3, "processing", 0);
    registered.customer_key = "c:777".into();
    {
        let c = registered.customer.as_mut().unwrap();
        c.email = guest.customer.as_ref().unwrap().email.clone();
        c.customer_id = Some(777);
        c.is_guest = false;
    }
    let v = sink.apply(&[Ok(registered.clone())]).await;
    assert!(v[0].result.is_ok(), "{:?}", v[0].result);
    let contacts = records(&app, "Contact");
    assert_eq!(contacts.len(), 1, "{contacts:?}");
    let account = sink_account(&app, &guest.customer_key);
    let ext = format!("o:{}", registered.order.as_ref().unwrap().entity_id);
    let order_record = records(&app, "Order").into_iter().find(|o| o["Elo_Id__c"] == ext.as_str()).unwrap();
    assert_eq!(order_record["AccountId"], json!(account), "the registered order hangs off the guest's account");
    // The next order of the registered key goes straight there: one call, no refusal.
    // (Same products, so only the graph is needed.)
    let mut next = registered.clone();
    {
        let o = next.order.as_mut().unwrap();
        o.entity_id += 1000;
        o.increment_id = format!("{}-next", o.increment_id);
        o.items.iter_mut().for_each(|i| i.item_id += 1000);
    }
    let before = app.sim.lock().unwrap().api_usage;
    let v = sink.apply(&[Ok(next)]).await;
    assert!(v[0].result.is_ok(), "{:?}", v[0].result);
    assert_eq!(app.sim.lock().unwrap().api_usage - before, 1);
    assert_eq!(records(&app, "Contact").len(), 1);
}
