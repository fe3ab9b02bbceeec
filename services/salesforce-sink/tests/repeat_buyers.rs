//! The repeat-buyer skip (a customer whose data Salesforce holds, by digest, costs only its
//! orders' nodes) against the sandbox: it saves calls; changed data, a RESEND, an erasure and
//! the end of the rewrite window each bring the customer's nodes back; a record written under
//! an alias writes its newer data and is never left out; and an Account gone behind the
//! sink's back is recreated instead of failing the customer's orders.

mod common;

use std::time::Duration;

use common::*;
use elo_events::{CommerceEvent, CommerceEventType, OutcomeStatus};
use salesforce_sink::handler::Sink;
use salesforce_sink::mapping::Mapping;
use sandbox::salesforce::{SalesforceApp, SalesforceConfig};
use serde_json::{Value, json};

async fn setup() -> (SalesforceApp, Sink) {
    let (app, url) = serve(SalesforceConfig::default()).await;
    let sink = sink(&url, Mapping::default().resolve().unwrap()).await;
    (app, sink)
}

fn find(app: &SalesforceApp, object: &str, key: &str) -> Option<(String, serde_json::Map<String, Value>)> {
    let sim = app.sim.lock().unwrap();
    sim.org
        .records
        .iter()
        .find(|(_, r)| r.object == object && r.fields["Elo_Id__c"] == key)
        .map(|(id, r)| (id.clone(), r.fields.clone()))
}

/// The Account (id, Name) and the Contact's LastName Salesforce holds for a customer key.
fn customer(app: &SalesforceApp, key: &str) -> Option<(String, Value, Value)> {
    let (id, account) = find(app, "Account", key)?;
    let contact = find(app, "Contact", key).map_or(Value::Null, |(_, c)| c["LastName"].clone());
    Some((id, account["Name"].clone(), contact))
}

fn modified(app: &SalesforceApp, id: &str) -> i64 {
    app.sim.lock().unwrap().org.records[id].modified_ms
}

fn order_account(app: &SalesforceApp, event: &CommerceEvent) -> Option<Value> {
    let external = format!("o:{}", event.order.as_ref()?.entity_id);
    find(app, "Order", &external).map(|(_, r)| r["AccountId"].clone())
}

/// Another order `n` of `first`'s customer, placed `later_ms` after it, the customer's last
/// name then being `lastname`.
fn repeat(first: &CommerceEvent, n: u64, later_ms: i64, lastname: &str) -> CommerceEvent {
    let mut e = elo_events::sample::order_placed(n);
    (e.customer_key, e.customer, e.store) = (first.customer_key.clone(), first.customer.clone(), first.store.clone());
    e.customer.as_mut().unwrap().lastname = Some(lastname.into());
    e.source_version.updated_at = first.source_version.updated_at + later_ms;
    e.order.as_mut().unwrap().created_at = e.source_version.updated_at;
    e
}

/// `first` again as a new order of the same customer with the same data and products.
fn same_again(first: &CommerceEvent, later_ms: i64) -> CommerceEvent {
    let mut e = first.clone();
    let o = e.order.as_mut().unwrap();
    o.entity_id += 1_000_000;
    o.increment_id = format!("{}-again", o.increment_id);
    o.items.iter_mut().for_each(|i| i.item_id += 10_000_000);
    e.source_version.updated_at += later_ms;
    o.created_at = e.source_version.updated_at;
    e.source_version.entity_id = o.entity_id.to_string();
    e
}

fn lastname(e: &CommerceEvent) -> String {
    e.customer.as_ref().unwrap().lastname.clone().unwrap_or_default()
}

fn rename(app: &SalesforceApp, id: &str, field: &str) {
    let edit = serde_json::Map::from_iter([(field.to_owned(), json!("Edited By Hand"))]);
    app.sim.lock().unwrap().org.alter(id, &edit, sandbox::now_ms());
}

fn calls(app: &SalesforceApp) -> u64 {
    app.sim.lock().unwrap().api_usage
}

#[tokio::test]
async fn unchanged_repeat_buyers_cost_fewer_calls_and_their_accounts_are_left_as_they_are() {
    // The same 300 customers' second orders, on a sink that skips and one that never does.
    let (skip_app, skip) = setup().await;
    let (full_app, url) = serve(SalesforceConfig::default()).await;
    let full = sink(&url, Mapping::default().resolve().unwrap()).await.with_customer_rewrite_after(Duration::ZERO);
    let first: Vec<CommerceEvent> = (0..300)
        .map(|n| {
            let mut e = elo_events::sample::order_placed(n);
            e.customer_key = format!("c:{}", 10_000 + n);
            e.customer.as_mut().unwrap().email = format!("buyer{n}@example.com");
            e
        })
        .collect();
    let again: Vec<CommerceEvent> = first.iter().map(|e| same_again(e, 60_000)).collect();
    let batch = |events: &[CommerceEvent]| events.iter().cloned().map(Ok).collect::<Vec<_>>();
    for sink in [&skip, &full] {
        all_ok(&sink.apply(&batch(&first)).await);
    }
    let (account, ..) = customer(&skip_app, &first[7].customer_key).unwrap();
    let before = modified(&skip_app, &account);
    let mut spent = Vec::new();
    for (app, sink) in [(&skip_app, &skip), (&full_app, &full)] {
        let start = calls(app);
        let verdicts = sink.apply(&batch(&again)).await;
        all_ok(&verdicts);
        spent.push(calls(app) - start);
        // The outcome still names the Account and Contact (the reconciler watches them).
        let ids = &verdicts[7].target_ids;
        assert!(ids.contains_key("Account") && ids.contains_key("Contact") && ids.contains_key("Order"), "{ids:?}");
    }
    assert!(spent[0] < spent[1], "calls with the skip {} vs without {}", spent[0], spent[1]);
    let left_out = salesforce_sink::metrics::CUSTOMER_HEADS.with_label_values(&["left_out"]).get();
    assert!(left_out > 0, "the metric counts the heads left out");
    assert_eq!(modified(&skip_app, &account), before, "the unchanged Account is left as it is");
    assert_eq!(order_account(&skip_app, &again[7]), Some(json!(account)));
}

#[tokio::test]
async fn changed_customer_data_is_written() {
    let (app, sink) = setup().await;
    let first = elo_events::sample::order_placed(3);
    all_ok(&sink.apply(&[Ok(first.clone())]).await);
    all_ok(&sink.apply(&[Ok(repeat(&first, 100, 60_000, "Changed"))]).await);
    assert_eq!(customer(&app, &first.customer_key).unwrap().2, json!("Changed"));
}

#[tokio::test]
async fn past_the_rewrite_window_an_unchanged_customer_is_written_again() {
    let (app, url) = serve(SalesforceConfig::default()).await;
    let window = Duration::from_millis(1500);
    let sink = sink(&url, Mapping::default().resolve().unwrap()).await.with_customer_rewrite_after(window);
    let first = elo_events::sample::order_placed(3);
    all_ok(&sink.apply(&[Ok(first.clone())]).await);
    // The Contact edited behind Elo's back (the reconciler sweeps Accounts, not Contacts).
    let (contact, _) = find(&app, "Contact", &first.customer_key).unwrap();
    rename(&app, &contact, "LastName");
    // Within the window the unchanged customer is left out: the edit stays.
    all_ok(&sink.apply(&[Ok(repeat(&first, 100, 60_000, &lastname(&first)))]).await);
    assert_eq!(customer(&app, &first.customer_key).unwrap().2, json!("Edited By Hand"));
    // Past it, the next order writes the customer again.
    tokio::time::sleep(window + Duration::from_millis(100)).await;
    all_ok(&sink.apply(&[Ok(repeat(&first, 101, 120_000, &lastname(&first)))]).await);
    assert_eq!(customer(&app, &first.customer_key).unwrap().2, json!(lastname(&first)));
    // And that full write starts a new window: the next edit stays until it ends.
    rename(&app, &contact, "LastName");
    all_ok(&sink.apply(&[Ok(repeat(&first, 102, 180_000, &lastname(&first)))]).await);
    assert_eq!(customer(&app, &first.customer_key).unwrap().2, json!("Edited By Hand"));
}

/// A guest who registers has a second key with the same e-mail, written under the guest's key
/// (its alias): its newer customer data is written over the person's Account and Contact, as
/// without the skip, and its orders are never left out (the guest key's fingerprint does not
/// describe what the alias wrote); the guest key's own next order, with its own data, is
/// written too.
#[tokio::test]
async fn a_key_written_under_an_alias_writes_its_newer_data_and_is_never_left_out() {
    let (app, sink) = setup().await;
    let guest = order(2, "pending", 0); // n % 3 == 2: a guest
    assert!(guest.customer_key.starts_with("g:"), "{}", guest.customer_key);
    all_ok(&sink.apply(&[Ok(guest.clone())]).await);
    let (account, ..) = customer(&app, &guest.customer_key).unwrap();
    let mut registered = repeat(&guest, 500, 60_000, "Registered");
    registered.customer_key = "c:777".into();
    {
        let c = registered.customer.as_mut().unwrap();
        (c.customer_id, c.is_guest, c.firstname) = (Some(777), false, Some("Reg".into()));
    }
    // First through the e-mail match: the registered data is written.
    let verdicts = sink.apply(&[Ok(registered.clone())]).await;
    all_ok(&verdicts);
    assert_eq!(order_account(&app, &registered), Some(json!(account)), "hangs off the guest's Account");
    assert_eq!(verdicts[0].target_ids.get("Account"), Some(&account), "the outcome names it");
    assert_eq!(customer(&app, &guest.customer_key).unwrap().2, json!("Registered"));
    // Edited by hand: the alias's next order with the same data is not left out, and repairs it.
    let (contact, _) = find(&app, "Contact", &guest.customer_key).unwrap();
    rename(&app, &contact, "LastName");
    let next = repeat(&registered, 501, 60_000, "Registered");
    let verdicts = sink.apply(&[Ok(next.clone())]).await;
    all_ok(&verdicts);
    assert_eq!(order_account(&app, &next), Some(json!(account)));
    assert_eq!(verdicts[0].target_ids.get("Account"), Some(&account));
    assert_eq!(customer(&app, &guest.customer_key).unwrap().2, json!("Registered"), "written, not left out");
    assert_eq!(records(&app, "Contact").len(), 1);
    // The guest key's own next order, with its own data: written (last writer wins, as before).
    let own = repeat(&guest, 502, 120_000, &lastname(&guest));
    all_ok(&sink.apply(&[Ok(own)]).await);
    assert_eq!(customer(&app, &guest.customer_key).unwrap().2, json!(lastname(&guest)));
}

/// What a RESEND command does to the customer beside marking the entry (`resend::execute`):
/// the fingerprint is forgotten, so the customer's next order, with unchanged data, writes the
/// Account and Contact in full and repairs an edit made behind Elo's back.
#[tokio::test]
async fn a_forgotten_digest_makes_the_next_unchanged_order_write_the_customer() {
    let (app, sink) = setup().await;
    let first = elo_events::sample::order_placed(3);
    all_ok(&sink.apply(&[Ok(first.clone())]).await);
    let (account, name, _) = customer(&app, &first.customer_key).unwrap();
    rename(&app, &account, "Name");
    // Unchanged data within the window: left out, the edit stays.
    all_ok(&sink.apply(&[Ok(repeat(&first, 100, 60_000, &lastname(&first)))]).await);
    assert_eq!(customer(&app, &first.customer_key).unwrap().1, json!("Edited By Hand"));
    sink.forget_customer_digest(0, &first.customer_key).await.unwrap();
    all_ok(&sink.apply(&[Ok(repeat(&first, 101, 120_000, &lastname(&first)))]).await);
    assert_eq!(customer(&app, &first.customer_key).unwrap().1, name, "written in full again");
}

#[tokio::test]
async fn a_resend_writes_the_customer_even_when_another_order_of_its_graph_holds_the_digest() {
    let (app, sink) = setup().await;
    let first = elo_events::sample::order_placed(3);
    all_ok(&sink.apply(&[Ok(first.clone())]).await);
    let second = repeat(&first, 100, 60_000, &lastname(&first));
    all_ok(&sink.apply(&[Ok(second.clone())]).await);
    let (account, name, _) = customer(&app, &first.customer_key).unwrap();
    // Renamed behind Elo's back; the newest order is RESEND'd and republished in one batch with
    // a third order of the customer, which holds the digest of the unchanged data.
    rename(&app, &account, "Name");
    let entity = format!("order:{}", second.order.as_ref().unwrap().entity_id);
    assert!(sink.request_rewrite(0, &entity).await.unwrap());
    let third = repeat(&first, 197, 120_000, &lastname(&first));
    all_ok(&sink.apply(&[Ok(second), Ok(third)]).await);
    assert_eq!(customer(&app, &first.customer_key).unwrap().1, name, "the Account's name is restored");
}

/// A RESEND of an older order cannot write that order's older customer data (the sink keeps
/// no copy of the newer data): the customer's digest is forgotten instead, so its next event
/// writes the Account and Contact in full.
#[tokio::test]
async fn after_a_resend_of_an_older_order_the_customers_next_order_writes_it_in_full() {
    let (app, sink) = setup().await;
    let first = elo_events::sample::order_placed(3);
    all_ok(&sink.apply(&[Ok(first.clone())]).await);
    let second = repeat(&first, 100, 60_000, &lastname(&first));
    all_ok(&sink.apply(&[Ok(second)]).await);
    let (account, name, _) = customer(&app, &first.customer_key).unwrap();
    rename(&app, &account, "Name");
    let entity = format!("order:{}", first.order.as_ref().unwrap().entity_id);
    assert!(sink.request_rewrite(0, &entity).await.unwrap());
    all_ok(&sink.apply(&[Ok(first.clone())]).await);
    all_ok(&sink.apply(&[Ok(repeat(&first, 101, 120_000, &lastname(&first)))]).await);
    assert_eq!(customer(&app, &first.customer_key).unwrap().1, name, "the Account's name is restored");
}

#[tokio::test]
async fn an_erasure_forgets_the_digest_so_a_later_order_writes_the_customer_again() {
    let (app, sink) = setup().await;
    let first = elo_events::sample::order_placed(3);
    all_ok(&sink.apply(&[Ok(first.clone())]).await);
    let (_, name, _) = customer(&app, &first.customer_key).unwrap();
    let mut erased = first.clone();
    erased.event_type = CommerceEventType::CustomerErased;
    (erased.order, erased.customer) = (None, None);
    erased.source_version = elo_events::SourceVersion {
        entity_type: "customer".into(),
        entity_id: "1".into(),
        updated_at: first.source_version.updated_at + 60_000,
    };
    erased.erasure =
        Some(elo_events::CustomerErasure { customer_id: Some(1), email_sha256: "00".into(), reason: "request".into() });
    all_ok(&sink.apply(&[Ok(erased)]).await);
    assert_ne!(customer(&app, &first.customer_key).unwrap().1, name, "anonymised");
    // The customer orders again later with the same data: it is written, not left out.
    all_ok(&sink.apply(&[Ok(repeat(&first, 100, 120_000, &lastname(&first)))]).await);
    assert_eq!(customer(&app, &first.customer_key).unwrap().1, name);
}

#[tokio::test]
async fn a_repeat_buyers_next_order_recreates_an_account_deleted_behind_the_sinks_back() {
    let (app, sink) = setup().await;
    let first = elo_events::sample::order_placed(3);
    all_ok(&sink.apply(&[Ok(first.clone())]).await);
    let (account, name, _) = customer(&app, &first.customer_key).unwrap();
    app.sim.lock().unwrap().org.remove_record(&account);
    // Same customer data (the digest Salesforce held): the order is not refused for want of
    // its Account, it is written again with it.
    let next = repeat(&first, 100, 60_000, &lastname(&first));
    let verdicts = sink.apply(&[Ok(next.clone())]).await;
    all_ok(&verdicts);
    let (recreated, restored, _) = customer(&app, &first.customer_key).expect("the Account is recreated");
    assert_eq!(restored, name);
    assert_eq!(order_account(&app, &next), Some(json!(recreated)));
    assert_eq!(verdicts[0].target_ids.get("Account"), Some(&recreated), "the outcome names the new Account");
}

/// The gone Account shows only when a record rolled back by another customer's failure is
/// resent alone: it is recognised in that retry round too.
#[tokio::test]
async fn an_account_found_gone_in_a_retry_round_is_recreated() {
    let (app, sink) = setup().await;
    let first = elo_events::sample::order_placed(3);
    all_ok(&sink.apply(&[Ok(first.clone())]).await);
    retire_a_product(&app, &sink, &first.store).await;
    let (account, ..) = customer(&app, &first.customer_key).unwrap();
    app.sim.lock().unwrap().org.remove_record(&account);
    // Another customer's order, first in the shared graph, fails for good and rolls back the
    // repeat buyer's order, whose graph left its (unchanged) customer out.
    let mut refused = elo_events::sample::order_placed(4);
    refused.store = first.store.clone();
    refused.order.as_mut().unwrap().items[0].sku = "RETIRED".into();
    let next = repeat(&first, 100, 60_000, &lastname(&first));
    let verdicts = sink.apply(&[Ok(refused), Ok(next.clone())]).await;
    assert_eq!(verdicts[0].outcome, Some(OutcomeStatus::DeadLettered), "{:?}", verdicts[0].result);
    assert!(verdicts[1].result.is_ok(), "{:?}", verdicts[1].result);
    let (recreated, ..) = customer(&app, &first.customer_key).expect("the Account is recreated");
    assert_eq!(order_account(&app, &next), Some(json!(recreated)));
}

#[tokio::test]
async fn a_retry_never_writes_older_customer_data_than_the_digest_it_records() {
    let (app, sink) = setup().await;
    let first = elo_events::sample::order_placed(3);
    retire_a_product(&app, &sink, &first.store).await;
    // One customer: its newest order (renamed "New") fills a graph of 500 nodes by itself, so
    // its two older orders ("Old") share a second graph, which the retired item fails.
    let mut newest = repeat(&first, 101, 120_000, "New");
    let item = newest.order.as_ref().unwrap().items[0].clone();
    newest.order.as_mut().unwrap().items =
        (0..497).map(|k| elo_events::OrderItem { item_id: 500_000 + k, ..item.clone() }).collect();
    let older = repeat(&first, 102, 60_000, "Old");
    let mut refused = repeat(&first, 103, 30_000, "Old");
    refused.order.as_mut().unwrap().items[0].sku = "RETIRED".into();
    let verdicts = sink.apply(&[Ok(newest.clone()), Ok(older.clone()), Ok(refused)]).await;
    assert!(verdicts[0].result.is_ok() && verdicts[1].result.is_ok(), "{verdicts:?}");
    assert_eq!(verdicts[2].outcome, Some(OutcomeStatus::DeadLettered), "{:?}", verdicts[2].result);
    // The older order, retried alone, carried the newest customer data, not its own.
    assert_eq!(customer(&app, &first.customer_key).expect("the Account landed").2, json!("New"));
    // And the digest recorded is of what Salesforce holds: a later order with other data
    // rewrites it.
    all_ok(&sink.apply(&[Ok(repeat(&first, 104, 180_000, "Newer"))]).await);
    assert_eq!(customer(&app, &first.customer_key).unwrap().2, json!("Newer"));
}

/// Another customer's refused item rolls back the graph the customer shares with it; in the
/// retry round the customer's newest order is refused (its product was retired meanwhile)
/// while an older one, resent with the newest order's customer data ("New", the head its key's
/// graphs carry), lands. What was recorded as held must be what landed, not the older order's
/// own data ("Mid"): a later order carrying "Mid" again is written.
#[tokio::test]
async fn only_the_customer_data_a_retry_carried_is_recorded_as_held() {
    let (app, sink) = setup().await;
    let first = elo_events::sample::order_placed(3);
    all_ok(&sink.apply(&[Ok(first.clone())]).await);
    assert_ne!(lastname(&first), "New");
    retire_a_product(&app, &sink, &first.store).await;
    // A product retired only once the batch's first graph has been answered.
    let mut probe = elo_events::sample::order_placed(41);
    probe.store = first.store.clone();
    probe.order.as_mut().unwrap().items[0].sku = "LATER".into();
    all_ok(&sink.apply(&[Ok(probe)]).await);
    let mut other = elo_events::sample::order_placed(4);
    assert_ne!(other.customer_key, first.customer_key);
    other.store = first.store.clone();
    other.order.as_mut().unwrap().items[0].sku = "RETIRED".into();
    let mut older = repeat(&first, 101, 60_000, "Mid");
    let mut newest = repeat(&first, 102, 120_000, "New");
    newest.order.as_mut().unwrap().items[0].sku = "LATER".into();
    // Calls are answered 200 ms after they arrive: the product is retired between the rounds.
    let slow = sandbox::faults::FaultConfig { latency_fixed_ms: Some(200), ..Default::default() };
    app.faults.set("salesforce", slow);
    let graphs = |app: &SalesforceApp| {
        let counts = app.counters.snapshot();
        counts["salesforce"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.ends_with("/composite/graph"))
            .map(|(_, n)| n.as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let graphs_before = graphs(&app);
    let retire_later = {
        let app = app.clone();
        let store_id = first.store.store_id;
        tokio::spawn(async move {
            // The first graph arrived; once it is handled (the usage counts it), retire.
            while graphs(&app) == graphs_before {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let usage = app.sim.lock().unwrap().api_usage;
            while app.sim.lock().unwrap().api_usage == usage {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            deactivate_entry(&app, store_id, "LATER");
        })
    };
    // One item each: the two customers' graphs are small enough to share one graph.
    for e in [&mut other, &mut older, &mut newest] {
        e.order.as_mut().unwrap().items.truncate(1);
    }
    let verdicts = sink.apply(&[Ok(other), Ok(older), Ok(newest)]).await;
    retire_later.await.unwrap();
    app.faults.set("salesforce", sandbox::faults::FaultConfig::default());
    assert!(verdicts[1].result.is_ok(), "{verdicts:?}");
    assert_eq!(verdicts[2].outcome, Some(OutcomeStatus::DeadLettered), "{:?}", verdicts[2].result);
    assert_eq!(customer(&app, &first.customer_key).unwrap().2, json!("New"), "the head of the key's graphs landed");
    all_ok(&sink.apply(&[Ok(repeat(&first, 104, 180_000, "Mid"))]).await);
    assert_eq!(customer(&app, &first.customer_key).unwrap().2, json!("Mid"), "the next order carrying it writes it");
}

#[tokio::test]
async fn an_order_whose_unchanged_customer_data_was_left_out_still_names_the_account() {
    let (app, sink) = setup().await;
    let placed = elo_events::sample::order_placed(3);
    let mut registered = placed.clone();
    registered.event_type = CommerceEventType::CustomerChanged;
    registered.order = None;
    registered.source_version.entity_type = "customer".into();
    registered.source_version.updated_at -= 60_000;
    all_ok(&sink.apply(&[Ok(registered)]).await);
    let (account, ..) = customer(&app, &placed.customer_key).unwrap();
    // The order carries the same customer data: only its own nodes are written (the Account
    // is not touched), and its outcome names the Account the reconciler then watches.
    let before = modified(&app, &account);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let verdicts = sink.apply(&[Ok(placed.clone())]).await;
    all_ok(&verdicts);
    assert_eq!(modified(&app, &account), before, "the Account is left as it is");
    assert_eq!(verdicts[0].target_ids.get("Account"), Some(&account), "{:?}", verdicts[0].target_ids);
    assert!(verdicts[0].target_ids.contains_key("Contact") && verdicts[0].target_ids.contains_key("Order"));
}
