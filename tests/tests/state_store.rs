//! Per-partition state backed by a compacted changelog: what a store wrote is exactly what a
//! fresh store (a restarted or newly assigned replica) restores, partition by partition, with
//! overwrites and deletions applied; on Tansu and on librdkafka's mock cluster.

use std::collections::BTreeMap;

use elo_integration_tests::runtime_suite::Broker;
use elo_integration_tests::*;
use elo_kafka::{KafkaArgs, Producer, StateStore};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Aggregate {
    orders: u32,
    spent_cents: i64,
}

async fn restores_what_was_written(broker: Broker) {
    let changelog = unique("state-changelog");
    broker.create_topics(&[(&changelog, 3)]).await;
    let kafka = KafkaArgs::local(broker.bootstrap());
    let health = elo_telemetry::Health::new();
    let producer = Producer::new(&kafka, health).unwrap();
    let store: StateStore<Aggregate> = StateStore::new(&kafka, producer.clone(), &changelog);
    // Writes go to partitions this member holds (restored; empty at first).
    for partition in 0..2 {
        assert_eq!(store.restore_async(partition).await.unwrap(), 0);
    }
    let mut expected: BTreeMap<(i32, String), Aggregate> = BTreeMap::new();
    for round in 0..3u32 {
        for customer in 0..40 {
            let (partition, key) = (customer % 2, format!("c:{customer}"));
            let value = Aggregate { orders: round + 1, spent_cents: i64::from(customer) * 100 + i64::from(round) };
            store.put(partition, &key, value.clone()).await.unwrap();
            expected.insert((partition, key), value);
        }
    }
    for customer in (0..40).step_by(5) {
        let (partition, key) = (customer % 2, format!("c:{customer}"));
        store.remove(partition, &key).await.unwrap();
        expected.remove(&(partition, key));
    }
    assert_eq!(store.get(0, "c:2").map(|a| a.orders), Some(3), "reads see writes");

    // A fresh replica restores partition by partition, and only what it is assigned.
    let fresh: StateStore<Aggregate> = StateStore::new(&kafka, producer, &changelog);
    assert_eq!(fresh.restore(0).unwrap(), expected.keys().filter(|(p, _)| *p == 0).count());
    assert_eq!(fresh.restore(1).unwrap(), expected.keys().filter(|(p, _)| *p == 1).count());
    assert_eq!(fresh.restore(2).unwrap(), 0, "an empty partition restores at once");
    let mut restored: BTreeMap<(i32, String), Aggregate> = BTreeMap::new();
    for partition in 0..3 {
        for (key, value) in fresh.entries(partition) {
            restored.insert((partition, key), value);
        }
    }
    assert_eq!(restored, expected);
    assert!(fresh.get(0, "c:0").is_none(), "a deleted key stays deleted");
    fresh.release(0);
    assert_eq!(fresh.len(0), 0, "a revoked partition's state is dropped");
    assert_eq!(fresh.len(1), expected.keys().filter(|(p, _)| *p == 1).count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_restores_from_its_changelog_on_tansu() {
    restores_what_was_written(Broker::tansu()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_restores_from_its_changelog_on_the_mock_cluster() {
    restores_what_was_written(Broker::mock()).await;
}
