//! A slow partition is paused on its own: the other partitions keep flowing, and once the slow
//! one catches up every record is applied exactly in order, none skipped by the pause.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use elo_integration_tests::*;
use elo_kafka::{ConsumerSettings, Handler, HandlerError, KafkaArgs, Producer, Record};
use tokio_util::sync::CancellationToken;

/// Partition 0's handler is held until the test releases it (then it stays slow), so "the fast
/// partitions finished while partition 0 was behind" does not depend on the machine's speed.
#[derive(Default)]
struct SlowOnPartitionZero {
    applied: Mutex<BTreeMap<i32, Vec<i64>>>,
    released: AtomicBool,
}

impl Handler for SlowOnPartitionZero {
    async fn handle(&self, batch: &[Record]) -> Vec<Result<(), HandlerError>> {
        if batch[0].partition == 0 {
            while !self.released.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut applied = self.applied.lock().unwrap();
        for r in batch {
            applied.entry(r.partition).or_default().push(r.offset);
        }
        batch.iter().map(|_| Ok(())).collect()
    }
}

/// How the slow partition's buffer fills up.
#[derive(Clone, Copy, Debug)]
enum Bound {
    /// 4 records.
    Records,
    /// 1 KiB (a record here is ~250 bytes with overhead), records unbounded in practice.
    Bytes,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_partition_is_paused_alone_and_loses_nothing() {
    paused_alone_and_loses_nothing(Bound::Records).await;
}

/// The buffer is bounded in bytes too: with a record bound far away, the byte bound pauses the
/// slow partition (without it, its whole backlog would sit in memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_bound_pauses_a_slow_partition_too() {
    paused_alone_and_loses_nothing(Bound::Bytes).await;
}

async fn paused_alone_and_loses_nothing(bound: Bound) {
    let (topic, dlq, group) = (unique("backpressure"), unique("backpressure-dlq"), unique("backpressure-group"));
    create_topics(&brokers(), &[(&topic, 3), (&dlq, 1)]).await;
    let input: Vec<(String, Vec<u8>)> = (0..600).map(|i| (format!("k{i}"), vec![b'x'; 64])).collect();
    let produced = produce(&producer(&brokers()), &topic, &input).await;
    let mut expected: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for (p, o) in &produced {
        expected.entry(*p).or_default().push(*o);
    }
    assert!(expected.len() == 3 && expected.values().all(|v| v.len() > 100), "keys spread over partitions");

    // Short fetch waits: after each resume the tiny buffer refills in one quick round trip.
    let kafka = KafkaArgs { options: vec![("fetch.wait.max.ms".into(), "50".into())], ..KafkaArgs::local(brokers()) };
    let health = elo_telemetry::Health::new();
    let producer = Producer::new(&kafka, health.clone()).unwrap();
    let handler = Arc::new(SlowOnPartitionZero::default());
    let shutdown = CancellationToken::new();
    let mut settings = ConsumerSettings::new(group, vec![topic.clone()], dlq);
    match bound {
        // Tiny, so partition 0 fills up and gets paused.
        Bound::Records => settings.partition_buffer = 4,
        Bound::Bytes => {
            settings.partition_buffer = 100_000;
            settings.partition_buffer_bytes = 1024;
        }
    }
    settings.max_batch = 2;
    let run = tokio::spawn({
        let (kafka, handler, shutdown) = (kafka.clone(), handler.clone(), shutdown.clone());
        async move { elo_kafka::run_consumer(&kafka, settings, handler, producer, health, shutdown).await }
    });

    // The fast partitions finish while the slow one is still far behind.
    let fast_done = wait_until(Duration::from_secs(60), || {
        let applied = handler.applied.lock().unwrap();
        [1, 2].iter().all(|p| applied.get(p).map_or(0, Vec::len) == expected[p].len())
    })
    .await;
    assert!(fast_done, "fast partitions were held up by the slow one ({bound:?})");
    // Held, partition 0 filled its buffer and is paused, alone.
    let paused = prometheus::gather()
        .iter()
        .filter(|f| f.name() == "elo_consumer_paused_partitions")
        .flat_map(|f| f.get_metric().to_vec())
        .filter(|m| m.get_label().iter().any(|l| l.value() == topic))
        .map(|m| m.get_gauge().get_value())
        .sum::<f64>();
    assert_eq!(paused, 1.0, "exactly the slow partition is paused and reported ({bound:?})");
    handler.released.store(true, Ordering::SeqCst);

    let all_done = wait_until(Duration::from_secs(120), || {
        handler.applied.lock().unwrap().get(&0).map_or(0, Vec::len) >= expected[&0].len()
    })
    .await;
    assert!(all_done, "slow partition never caught up");
    shutdown.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(*handler.applied.lock().unwrap(), expected, "every record applied once, in order");
}
