//! The consumer runtime against the real broker (Tansu): nothing is lost across crashes,
//! restarts, rebalances and shutdowns; a poison record is parked in the DLQ while its partition
//! goes on; a handler bug holds its partition; a DLQ that cannot be written holds only its own
//! partition. The same suite runs on librdkafka's mock cluster in `consumer_runtime_mock.rs`.

use std::time::Duration;

use elo_integration_tests::runtime_suite::{self as suite, Broker};
use elo_integration_tests::*;
use rdkafka::producer::FutureRecord;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_stream_then_restart_loses_nothing() {
    suite::crash_mid_stream_then_restart_loses_nothing(&Broker::tansu()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_member_rebalance_loses_nothing() {
    suite::two_member_rebalance_loses_nothing(&Broker::tansu()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_record_goes_to_dlq_and_partition_carries_on() {
    suite::poison_record_goes_to_dlq_and_partition_carries_on(&Broker::tansu()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_ends_with_a_final_commit() {
    suite::sigterm_mid_stream_ends_with_a_final_commit(&Broker::tansu()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_panic_holds_the_partition_and_fails_liveness() {
    suite::a_handler_panic_holds_the_partition_and_fails_liveness(&Broker::tansu()).await;
}

/// The DLQ topic does not exist (Tansu never auto-creates): the partition with the poison
/// record waits, says why, and commits nothing past it; the other partition finishes. Once the
/// topic exists, the record is parked and the partition finishes too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_dlq_holds_only_its_partition() {
    let broker = Broker::tansu();
    let (topic, dlq, group) = (unique("dlqdown"), unique("dlqdown-dlq"), unique("dlqdown-group"));
    broker.create_topics(&[(&topic, 2)]).await;
    let plain = producer(&brokers());
    let mut last = [0i64; 2];
    for i in 0..60 {
        let partition = i % 2;
        let payload = if partition == 0 && i == 20 { "poison".to_owned() } else { format!("ok-{i}") };
        let key = format!("k{i}");
        let record = FutureRecord::to(&topic).partition(partition).key(key.as_bytes()).payload(payload.as_bytes());
        let delivery = plain.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
        last[partition as usize] = delivery.offset;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.txt");
    let admin = format!("127.0.0.1:{}", free_port());
    let _c = suite::start_consumer(
        &broker,
        "c",
        (&group, &topic, &dlq),
        &out,
        0,
        &["--admin-listen", &admin, "--kafka-delivery-timeout-ms", "2000", "--max-in-flight", "1"],
    );
    // Partition 1 finishes although the only handler permit is shared with a stuck partition.
    assert!(
        wait_until(Duration::from_secs(60), || committed(&brokers(), &group, &topic, 2).get(&1)
            == Some(&(last[1] + 1)))
        .await,
        "the healthy partition was held up by the unwritable DLQ"
    );
    let mut blocked = false;
    for _ in 0..150 {
        let text = suite::scrape(&admin).await;
        if suite::metric_sum(&text, "elo_consumer_dlq_blocked_partitions", &[&topic]) == 1.0 {
            blocked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(blocked, "the blocked partition is reported");
    let poison_offset = 10; // the 11th record of partition 0
    let c0 = committed(&brokers(), &group, &topic, 2).get(&0).copied().unwrap_or(0);
    assert!(c0 <= poison_offset, "committed {c0} past the record that could not be parked");
    let log = std::fs::read_to_string(out.with_extension("c.log")).unwrap();
    assert!(log.contains("cannot write the dead letter"), "ERROR log names the problem:\n{log}");

    create_topics(&brokers(), &[(&dlq, 1)]).await;
    assert!(
        wait_until(Duration::from_secs(60), || committed(&brokers(), &group, &topic, 2).get(&0)
            == Some(&(last[0] + 1)))
        .await,
        "the partition did not finish once the DLQ could be written"
    );
    assert_eq!(read_all(&brokers(), &dlq, 1).len(), 1, "the record is parked exactly once");
}
