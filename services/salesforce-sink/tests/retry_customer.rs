//! An in-call retry (a record rolled back with another one's failure, sent again alone) never
//! writes older customer data over what the batch already wrote: the retry carries a key's
//! customer data only when it is the newest of the batch that has not failed for good.

mod common;

use common::*;
use elo_events::{CommerceEvent, OutcomeStatus};
use salesforce_sink::handler::Sink;
use salesforce_sink::mapping::Mapping;
use sandbox::salesforce::{SalesforceApp, SalesforceConfig};
use serde_json::{Value, json};

async fn setup() -> (SalesforceApp, Sink) {
    let (app, url) = serve(SalesforceConfig::default()).await;
    let sink = sink(&url, Mapping::default().resolve().unwrap()).await;
    (app, sink)
}

/// The Account (id, Name) and Contact LastName Salesforce holds for a customer key.
fn customer(app: &SalesforceApp, key: &str) -> Option<(String, Value, Value)> {
    let sim = app.sim.lock().unwrap();
    let find = |object: &str| sim.org.records.iter().find(|(_, r)| r.object == object && r.fields["Elo_Id__c"] == key);
    let (id, account) = find("Account")?;
    let contact = find("Contact").map_or(Value::Null, |(_, c)| c.fields["LastName"].clone());
    Some((id.clone(), account.fields["Name"].clone(), contact))
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

/// [`repeat`] with 497 items: its graph holds 500 nodes, so it rides alone and the customer's
/// other orders share another graph. Item ids from `first_item`.
fn filling_a_graph(first: &CommerceEvent, n: u64, later_ms: i64, lastname: &str, first_item: i64) -> CommerceEvent {
    let mut e = repeat(first, n, later_ms, lastname);
    let item = e.order.as_ref().unwrap().items[0].clone();
    e.order.as_mut().unwrap().items =
        (0..497).map(|k| elo_events::OrderItem { item_id: first_item + k, ..item.clone() }).collect();
    e
}

/// [`repeat`] with an item of the product [`retire_a_product`] retired: refused for good, it
/// rolls back the rest of its graph.
fn refused(first: &CommerceEvent, n: u64, later_ms: i64, lastname: &str) -> CommerceEvent {
    let mut e = repeat(first, n, later_ms, lastname);
    e.order.as_mut().unwrap().items[0].sku = "RETIRED".into();
    e
}

#[tokio::test]
async fn a_retry_never_writes_older_customer_data_than_the_batch_already_wrote() {
    let (app, sink) = setup().await;
    let first = elo_events::sample::order_placed(3);
    retire_a_product(&app, &sink, &first.store).await;
    // One customer: its newest order (renamed "New") fills a graph of 500 nodes by itself, so
    // its two older orders ("Old") share a second graph, which the retired item fails.
    let newest = filling_a_graph(&first, 101, 120_000, "New", 500_000);
    let older = repeat(&first, 102, 60_000, "Old");
    let refused = refused(&first, 103, 30_000, "Old");
    let verdicts = sink.apply(&[Ok(newest.clone()), Ok(older.clone()), Ok(refused)]).await;
    assert!(verdicts[0].result.is_ok() && verdicts[1].result.is_ok(), "{verdicts:?}");
    assert_eq!(verdicts[2].outcome, Some(OutcomeStatus::DeadLettered), "{:?}", verdicts[2].result);
    // The older order, retried alone, carried the newest customer data, not its own.
    let (account, _, lastname) = customer(&app, &first.customer_key).expect("the Account landed");
    assert_eq!(lastname, json!("New"), "the newest customer data stays");
    // Resent without its customer's nodes, it still names the Account in its outcome.
    assert_eq!(verdicts[1].target_ids.get("Account"), Some(&account), "{:?}", verdicts[1].target_ids);
}

#[tokio::test]
async fn a_new_customers_older_order_still_creates_the_account_when_the_newest_is_refused() {
    let (app, sink) = setup().await;
    let first = elo_events::sample::order_placed(5);
    retire_a_product(&app, &sink, &first.store).await;
    // A customer Salesforce has never seen: its newest order is refused, which rolls back the
    // older one sharing its graph; the older one, retried alone, must bring the customer.
    let refused = refused(&first, 301, 60_000, "Newest");
    let verdicts = sink.apply(&[Ok(first.clone()), Ok(refused)]).await;
    assert!(verdicts[0].result.is_ok(), "{:?}", verdicts[0].result);
    assert_eq!(verdicts[1].outcome, Some(OutcomeStatus::DeadLettered), "{:?}", verdicts[1].result);
    let (_, _, lastname) = customer(&app, &first.customer_key).expect("the Account was created");
    assert_eq!(lastname, json!(first.customer.as_ref().unwrap().lastname.clone().unwrap_or_default()));
}

#[tokio::test]
async fn a_retry_never_writes_less_enriched_customer_data_of_the_same_version() {
    let (app, sink) = setup().await;
    let first = elo_events::sample::order_placed(7);
    retire_a_product(&app, &sink, &first.store).await;
    // Two orders placed at the same instant: the newest data by version ties, and the one with
    // checked stock and known consent is the more complete (order-ingest's late enrichment).
    let complete = filling_a_graph(&first, 401, 120_000, "Complete", 600_000);
    let mut partial = repeat(&first, 402, 120_000, "Partial");
    partial.order.as_mut().unwrap().inventory_status = elo_events::InventoryStatus::Unchecked;
    partial.customer.as_mut().unwrap().consent.status = elo_events::ConsentStatus::Unknown;
    let refused = refused(&first, 403, 30_000, "Old");
    let verdicts = sink.apply(&[Ok(complete), Ok(partial), Ok(refused)]).await;
    assert!(verdicts[0].result.is_ok() && verdicts[1].result.is_ok(), "{verdicts:?}");
    let (_, _, lastname) = customer(&app, &first.customer_key).expect("the Account landed");
    assert_eq!(lastname, json!("Complete"), "the more enriched data of the version stays");
}
