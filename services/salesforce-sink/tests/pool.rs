//! Adaptive batching: the partitions' batches share Composite Graph requests (the pool), a
//! lone order leaves at once.

use std::time::{Duration, Instant};

use elo_events::CommerceEvent;
use salesforce_sink::mapping::Mapping;
use sandbox::salesforce::SalesforceConfig;

mod common;

use common::*;

fn batch(range: std::ops::Range<u64>) -> Vec<Result<CommerceEvent, elo_kafka::HandlerError>> {
    // Registered customers only (the sample's guests share e-mails with registered ones).
    range.filter(|n| n % 3 != 2).map(|n| Ok(order(n, "processing", 0))).collect()
}

#[tokio::test]
async fn busy_partitions_share_one_request_and_a_lone_order_leaves_at_once() {
    let (app, url) = serve(SalesforceConfig::default()).await;
    let linger = Duration::from_secs(3);
    let sink = sink(&url, Mapping::default().resolve().unwrap()).await.with_graph_linger(linger);

    // Quiet: a lone order leaves at once, not after the linger.
    let started = Instant::now();
    let first = sink.apply_partition(9, &batch(0..1)).await;
    assert!(first[0].result.is_ok(), "{:?}", first[0].result);
    assert!(started.elapsed() < linger / 2, "a lone order waited {:?}", started.elapsed());
    // The same products and price book entries as below, so only graph calls follow.
    let warm = sink.apply_partition(9, &batch(0..36)).await;
    assert!(warm.iter().all(|v| v.result.is_ok()));

    // Busy: three partitions' batches within the linger share one request.
    let before = app.sim.lock().unwrap().api_usage;
    let (p0, p1, p2) = (batch(0..12), batch(12..24), batch(24..36));
    let (a, b, c) =
        tokio::join!(sink.apply_partition(0, &p0), sink.apply_partition(1, &p1), sink.apply_partition(2, &p2));
    let calls = app.sim.lock().unwrap().api_usage - before;
    for v in a.iter().chain(&b).chain(&c) {
        assert!(v.result.is_ok(), "{:?}", v.result);
        assert!(v.target_ids.contains_key("Order") && v.target_ids.contains_key("Account"), "{:?}", v.target_ids);
    }
    assert_eq!(a.len() + b.len() + c.len(), 24);
    assert_eq!(calls, 1, "three batches of 8 orders: one Composite Graph call");
}

#[tokio::test]
async fn customers_sharing_a_graph_keep_their_own_ids_and_blame() {
    let (app, url) = serve(SalesforceConfig::default()).await;
    let sink = sink(&url, Mapping::default().resolve().unwrap()).await;
    // The merged graphs hold several customers: each record gets its own Account and Contact.
    let events = batch(0..12);
    let verdicts = sink.apply(&events).await;
    let sim = app.sim.lock().unwrap();
    let key_of = |id: &str| {
        let record = sim.org.records.values().find(|r| r.id == id).expect("record exists");
        record.fields["Elo_Id__c"].as_str().unwrap_or_default().to_owned()
    };
    let customers: std::collections::BTreeSet<&str> =
        events.iter().map(|e| e.as_ref().unwrap().customer_key.as_str()).collect();
    assert!(customers.len() >= 4, "several customers in the batch");
    for (v, e) in verdicts.iter().zip(&events) {
        let e = e.as_ref().unwrap();
        assert!(v.result.is_ok(), "{:?}", v.result);
        assert_eq!(key_of(&v.target_ids["Account"]), e.customer_key, "the record's own account");
        assert_eq!(key_of(&v.target_ids["Contact"]), e.customer_key, "the record's own contact");
    }
}

/// Orders of distinct registered customers (`n` is also the customer), as many nodes each
/// (Account, Contact, Order, one item, the activation).
fn distinct(range: std::ops::Range<u64>) -> Vec<Result<CommerceEvent, elo_kafka::HandlerError>> {
    range
        .map(|n| {
            let mut e = order(n, "processing", 0);
            e.customer_key = format!("c:{}", 100_000 + n);
            let c = e.customer.as_mut().unwrap();
            (c.customer_id, c.is_guest, c.email) = (Some(100_000 + n as i64), false, format!("buyer{n}@example.com"));
            Ok(e)
        })
        .collect()
}

/// Under a backlog each partition's chunk is most of a request: a chunk that would overflow
/// the boarding train fills it up to 500 nodes and rides on in the next one, instead of
/// sending the train a third empty (three chunks of 300 nodes: two calls, not three).
#[tokio::test]
async fn a_chunk_that_overflows_a_train_fills_it_and_rides_on_in_the_next() {
    let (_app, url) = serve(SalesforceConfig::default()).await;
    let linger = Duration::from_secs(3);
    let sink = sink(&url, Mapping::default().resolve().unwrap()).await.with_graph_linger(linger);
    // The same products and price book entries (SKU and store follow n mod 200 and n mod 2),
    // and partition 9 busy, so the three below wait for each other.
    let warm = sink.apply_partition(9, &distinct(400..580)).await;
    assert!(warm.iter().all(|v| v.result.is_ok()));
    let graph_calls = || salesforce_sink::metrics::API_CALLS.with_label_values(&["graph"]).get();
    let before = graph_calls();
    let (p0, p1, p2) = (distinct(0..60), distinct(60..120), distinct(120..180));
    let (a, b, c) =
        tokio::join!(sink.apply_partition(0, &p0), sink.apply_partition(1, &p1), sink.apply_partition(2, &p2));
    for v in a.iter().chain(&b).chain(&c) {
        assert!(v.result.is_ok(), "{:?}", v.result);
        assert!(v.target_ids.contains_key("Order") && v.target_ids.contains_key("Account"), "{:?}", v.target_ids);
    }
    assert_eq!(graph_calls() - before, 2, "900 nodes in three chunks of 300: two full requests");
}

/// A graph waiting for company leaves as soon as the service stops (the drain should not
/// sit out the linger).
#[tokio::test]
async fn a_waiting_graph_leaves_when_the_service_stops() {
    let (_app, url) = serve(SalesforceConfig::default()).await;
    let linger = Duration::from_secs(5);
    let stop = tokio_util::sync::CancellationToken::new();
    let sink =
        sink(&url, Mapping::default().resolve().unwrap()).await.with_graph_linger(linger).with_stop(stop.clone());
    // Partition 9 busy: partition 0's graph waits for it.
    assert!(sink.apply_partition(9, &batch(0..6)).await.iter().all(|v| v.result.is_ok()));
    let started = Instant::now();
    let events = batch(6..12);
    let (verdicts, ()) = tokio::join!(sink.apply_partition(0, &events), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.cancel();
    });
    assert!(verdicts.iter().all(|v| v.result.is_ok()), "sent, not dropped");
    assert!(started.elapsed() < linger / 2, "waited {:?} after the stop", started.elapsed());
}
