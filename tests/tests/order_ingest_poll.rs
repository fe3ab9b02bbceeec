//! The poll path on the real broker: every order of the store reaches `commerce.events`, and a
//! `kill -9` in the middle of a poll loses nothing: the restarted process resumes from the
//! checkpoint in the compacted topic (republishing at most the unconfirmed tail, same ids).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use elo_events::{CommerceEvent, EventCodec, RegistryConfig};
use elo_integration_tests::*;
use rdkafka::Message;

fn start_ingest(dir: &Path, topic: &str, magento_url: &str, name: &str) -> ChildGuard {
    ChildGuard::spawn(
        "order-ingest",
        order_ingest(dir, topic, magento_url, name)
            .env("ELO_ORDER_INGEST_POLL_INTERVAL", "1s")
            .env("ELO_ORDER_INGEST_POLL_PAGE_SIZE", "50")
            .env("ELO_ORDER_INGEST_POLL_ENTITIES", "orders"),
    )
}

fn published_count(topic: &str) -> i64 {
    topic_count(topic, 3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_survives_kill_9_and_loses_no_order() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("poll.commerce");
    let (magento, magento_url) = serve_magento(1500).await;
    let expected: BTreeSet<i64> = magento.sim.lock().unwrap().orders.keys().copied().collect();

    let mut first = start_ingest(dir.path(), &topic, &magento_url, "first");
    let started = wait_until(Duration::from_secs(60), || published_count(&topic) >= 200).await;
    assert!(
        started,
        "poll never published:\n{}",
        std::fs::read_to_string(dir.path().join("first.log")).unwrap_or_default()
    );
    first.signal("KILL");
    first.wait_timeout(Duration::from_secs(5)).expect("killed");
    let at_kill = published_count(&topic);
    assert!(at_kill < expected.len() as i64, "the kill must land mid-poll ({at_kill} published)");

    let _second = start_ingest(dir.path(), &topic, &magento_url, "second");
    // Orders placed while it was down are polled too.
    magento.sim.lock().unwrap().generate(100);
    let all: BTreeSet<i64> = magento.sim.lock().unwrap().orders.keys().copied().collect();
    // Done when every order id is on the topic (a count would be fooled by republished duplicates).
    let done = wait_until(Duration::from_secs(120), || {
        let ids: BTreeSet<i64> = read_all(&brokers(), &topic, 3)
            .iter()
            .filter_map(|r| {
                let (_, body) = elo_events::codec::unframe(r.payload()?).ok()?;
                elo_events::codec::decode_direct::<CommerceEvent>(body).ok()?.order.map(|o| o.entity_id)
            })
            .collect();
        all.is_subset(&ids)
    })
    .await;
    assert!(
        done,
        "restart did not finish:\n{}",
        std::fs::read_to_string(dir.path().join("second.log")).unwrap_or_default()
    );
    let records = read_all(&brokers(), &topic, 3);
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let mut seen = BTreeSet::new();
    let mut ids_per_version = std::collections::BTreeMap::<(i64, i64, String), BTreeSet<String>>::new();
    for r in &records {
        let e: CommerceEvent = codec.decode(r.payload().unwrap()).await.unwrap();
        assert_eq!(r.key(), Some(e.customer_key.as_bytes()));
        let id = e.order.as_ref().unwrap().entity_id;
        seen.insert(id);
        ids_per_version
            .entry((id, e.source_version.updated_at, e.order.as_ref().unwrap().status.clone()))
            .or_default()
            .insert(e.event_id);
    }
    let missing: Vec<_> = all.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "{} orders never published, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(ids_per_version.values().all(|ids| ids.len() == 1), "a republished order version keeps its event id");
    let republished = records.len() - ids_per_version.len();
    assert!(
        republished < 1000,
        "the restart resumed from the checkpoint, not from scratch ({republished} republished)"
    );
}

/// Order id → statuses published for it.
fn published_statuses(topic: &str) -> std::collections::BTreeMap<i64, BTreeSet<String>> {
    let mut statuses = std::collections::BTreeMap::<i64, BTreeSet<String>>::new();
    if topic_count(topic, 3) == 0 {
        return statuses; // not created yet
    }
    for record in read_all(&brokers(), topic, 3) {
        let Some((_, body)) = record.payload().and_then(|p| elo_events::codec::unframe(p).ok()) else { continue };
        let Ok(event) = elo_events::codec::decode_direct::<CommerceEvent>(body) else { continue };
        if let Some(order) = event.order {
            statuses.entry(order.entity_id).or_default().insert(order.status);
        }
    }
    statuses
}

/// A mass status change (the sandbox's `POST .../magento/orders/mass-status`, run in process): a
/// thousand orders saved in one second, five times the round budget set here (4 pages of 50).
/// Every one of them reaches the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mass_status_change_larger_than_the_round_budget_is_published_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("poll.mass");
    let (magento, magento_url) = serve_magento(1000).await;
    let ids: BTreeSet<i64> = magento.sim.lock().unwrap().orders.keys().copied().collect();
    let _ingest = ChildGuard::spawn(
        "order-ingest",
        order_ingest(dir.path(), &topic, &magento_url, "mass")
            .env("ELO_ORDER_INGEST_POLL_INTERVAL", "1s")
            .env("ELO_ORDER_INGEST_POLL_PAGE_SIZE", "50")
            .env("ELO_ORDER_INGEST_POLL_MAX_PAGES", "4")
            .env("ELO_ORDER_INGEST_POLL_ENTITIES", "orders"),
    );
    let caught_up = wait_until(Duration::from_secs(120), || published_statuses(&topic).len() == ids.len()).await;
    assert!(caught_up, "the first pass never finished:\n{}", log(dir.path(), "mass"));

    // The sandbox's own mass action (what its control API runs): one transaction, one second.
    let change: sandbox::magento::admin::MassStatus =
        serde_json::from_value(serde_json::json!({"status": "holded"})).unwrap();
    let (changed, _) = magento.sim.lock().unwrap().mass_status(&change);
    assert_eq!(changed, ids.len());
    let done = wait_until(Duration::from_secs(120), || {
        let statuses = published_statuses(&topic);
        ids.iter().all(|id| statuses.get(id).is_some_and(|s| s.contains("holded")))
    })
    .await;
    let statuses = published_statuses(&topic);
    let missing = ids.iter().filter(|id| !statuses.get(id).is_some_and(|s| s.contains("holded"))).count();
    assert!(done, "{missing} of {} changed orders never published:\n{}", ids.len(), log(dir.path(), "mass"));
    // Polled records carry a trace context too.
    read_all(&brokers(), &topic, 3).iter().for_each(assert_traceparent);
}
