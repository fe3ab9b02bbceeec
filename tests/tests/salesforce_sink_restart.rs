//! salesforce-sink's confirmed versions survive a restart: they live in a compacted changelog
//! restored when the partition is assigned, so an older version arriving after a restart is
//! still skipped (with the versions in memory it would overwrite newer data in Salesforce).

use std::time::{Duration, Instant};

use elo_events::{CommerceEventType, EventCodec, OutcomeStatus, RegistryConfig, SyncOutcome};
use elo_integration_tests::*;
use rdkafka::Message;
use sandbox::salesforce::SalesforceConfig;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_an_older_version_replayed_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("sf.restart");
    create_topics(&brokers(), &[(&topic, 3)]).await;
    let (sf, sf_url, _faults) = serve_salesforce(SalesforceConfig::default()).await;
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let producer = producer(&brokers());
    let status_of = |entity_id: i64| -> Option<String> {
        let sim = sf.sim.lock().unwrap();
        let ext = format!("o:{entity_id}");
        sim.org
            .records
            .values()
            .find(|r| r.object == "Order" && r.fields.get("Elo_Id__c").and_then(Value::as_str) == Some(&ext))
            .and_then(|r| r.fields.get("Magento_Status__c").and_then(Value::as_str).map(str::to_owned))
    };
    let version = |status: &str, delta: i64| {
        let mut e = elo_events::sample::order_placed(0);
        e.order.as_mut().unwrap().status = status.into();
        e.source_version.updated_at += delta;
        e.event_id = format!("{}-{delta}", e.event_id);
        if delta > 0 {
            e.event_type = CommerceEventType::OrderChanged;
        }
        e
    };
    let newer = version("complete", 60_000);
    let entity_id = newer.order.as_ref().unwrap().entity_id;
    produce(&producer, &topic, &[(newer.customer_key.clone(), codec.encode(&topic, &newer).await.unwrap())]).await;

    let mut sink = ChildGuard::spawn("salesforce-sink", &mut salesforce_sink(dir.path(), &topic, &sf_url, "sink"));
    let applied = wait_until(Duration::from_secs(90), || status_of(entity_id).as_deref() == Some("complete")).await;
    assert!(applied, "the newer version never reached Salesforce:\n{}", log(dir.path(), "sink"));
    // A graceful stop: the newer version's offset is committed, so it is not replayed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    sink.signal("TERM");
    assert!(sink.wait_timeout(Duration::from_secs(30)).is_some(), "the sink did not stop");

    // The older version arrives late (a repair, a replay from another source), then a marker.
    let older = version("pending", 0);
    let marker = elo_events::sample::order_placed(97); // the same customer as order 0
    let marker_id = marker.order.as_ref().unwrap().entity_id;
    for e in [&older, &marker] {
        produce(&producer, &topic, &[(e.customer_key.clone(), codec.encode(&topic, e).await.unwrap())]).await;
    }
    let _sink = ChildGuard::spawn("salesforce-sink", &mut salesforce_sink(dir.path(), &topic, &sf_url, "sink2"));
    let marked = wait_until(Duration::from_secs(90), || status_of(marker_id).is_some()).await;
    assert!(marked, "the marker never reached Salesforce:\n{}", log(dir.path(), "sink2"));
    // Same customer key: the older version was handled before the marker (per-key order).
    assert_eq!(marker.customer_key, older.customer_key);
    assert_eq!(status_of(entity_id).as_deref(), Some("complete"), "the older version overwrote the newer one");
    // Outcomes follow the Salesforce write: wait for the older version's (a busy box was seen
    // reading the topic between the marker's write and its batch's outcomes).
    let mut skipped = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while skipped.is_none() && Instant::now() < deadline {
        for record in read_all(&brokers(), &format!("{topic}.outcomes"), 3) {
            let outcome = codec.decode::<SyncOutcome>(record.payload().unwrap()).await.unwrap();
            if outcome.event_id == older.event_id {
                skipped = Some(outcome.status);
            }
        }
        if skipped.is_none() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert_eq!(skipped, Some(OutcomeStatus::SkippedStale), "the older version is reported skipped");
}
