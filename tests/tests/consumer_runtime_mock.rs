//! The consumer runtime suite on librdkafka's mock cluster, a second Kafka implementation with
//! its own group coordinator, plus the failures Tansu cannot produce: refused offset commits
//! (`REBALANCE_IN_PROGRESS`, `NOT_COORDINATOR`) and a broker that goes away and comes back.

use std::time::Duration;

use elo_integration_tests::runtime_suite::{self as suite, Broker};
use elo_integration_tests::*;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_stream_then_restart_loses_nothing() {
    suite::crash_mid_stream_then_restart_loses_nothing(&Broker::mock()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_member_rebalance_loses_nothing() {
    suite::two_member_rebalance_loses_nothing(&Broker::mock()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_record_goes_to_dlq_and_partition_carries_on() {
    suite::poison_record_goes_to_dlq_and_partition_carries_on(&Broker::mock()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_ends_with_a_final_commit() {
    suite::sigterm_mid_stream_ends_with_a_final_commit(&Broker::mock()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_panic_holds_the_partition_and_fails_liveness() {
    suite::a_handler_panic_holds_the_partition_and_fails_liveness(&Broker::mock()).await;
}

/// The broker refuses the first commits. The consumer applies everything at once and then sits
/// idle: the refused commit must be retried while running (not only at shutdown), counted, and
/// the committed-offset metric must follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_commits_are_retried_while_running_and_counted() {
    let broker = Broker::mock();
    let (topic, dlq, group) = (unique("commitfail"), unique("commitfail-dlq"), unique("commitfail-group"));
    broker.create_topics(&[(&topic, 1), (&dlq, 1)]).await;
    let produced = produce(&producer(&broker.bootstrap()), &topic, &suite::records(200, "c")).await;
    use RDKafkaRespErr::*;
    broker.as_mock().request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[
            RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
            RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
            RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.txt");
    let admin = format!("127.0.0.1:{}", free_port());
    let _c = suite::start_consumer(&broker, "c", (&group, &topic, &dlq), &out, 0, &["--admin-listen", &admin]);
    assert!(wait_until(Duration::from_secs(60), || applied(&out).len() == produced.len()).await, "applied everything");
    let end = produced.len() as i64;
    assert!(
        wait_until(Duration::from_secs(60), || committed(&broker.bootstrap(), &group, &topic, 1).get(&0) == Some(&end))
            .await,
        "the refused commit was never retried while running\n{}",
        std::fs::read_to_string(out.with_extension("c.log")).unwrap_or_default()
    );
    let metrics = suite::scrape(&admin).await;
    assert!(
        suite::metric_sum(&metrics, "elo_consumer_commit_errors_total", &[]) >= 1.0,
        "refused commits are counted:\n{metrics}"
    );
    assert_eq!(
        suite::metric_sum(&metrics, "elo_consumer_committed_offset", &[&topic]),
        end as f64,
        "the committed-offset metric follows commits made while running"
    );
}

/// All brokers go away for a while, with no rebalance: readiness drops, and returns within
/// 15 s of the broker's return although no record arrives (the topic is idle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_returns_after_a_broker_outage() {
    let broker = Broker::mock();
    let (topic, dlq, group) = (unique("blip"), unique("blip-dlq"), unique("blip-group"));
    broker.create_topics(&[(&topic, 1), (&dlq, 1)]).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.txt");
    let admin = format!("127.0.0.1:{}", free_port());
    let _c = suite::start_consumer(&broker, "c", (&group, &topic, &dlq), &out, 0, &["--admin-listen", &admin]);
    let ready = |status: u16, secs: u64| {
        let admin = admin.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(secs);
            while std::time::Instant::now() < deadline {
                if suite::probe(&admin, "readyz").await == status {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            false
        }
    };
    assert!(ready(200, 60).await, "consumer never became ready");
    broker.as_mock().broker_down(-1).unwrap();
    assert!(
        ready(503, 60).await,
        "an outage must show in readiness\n{}",
        std::fs::read_to_string(out.with_extension("c.log")).unwrap_or_default()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    broker.as_mock().broker_up(-1).unwrap();
    let back = std::time::Instant::now();
    assert!(
        ready(200, 15).await,
        "readiness did not return within 15 s of the broker's return\n{}",
        std::fs::read_to_string(out.with_extension("c.log")).unwrap_or_default()
    );
    eprintln!("ready again {:?} after the broker returned", back.elapsed());
}

/// The coordinator forgets us (`UNKNOWN_MEMBER_ID` on a heartbeat): librdkafka reports the
/// assignment lost. The runtime stops its workers without committing (the group may already
/// have given the partitions away), rejoins, and finishes from the last commit: nothing lost,
/// nothing skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_assignment_is_not_committed_and_loses_nothing() {
    let broker = Broker::mock();
    let (topic, dlq, group) = (unique("lost"), unique("lost-dlq"), unique("lost-group"));
    broker.create_topics(&[(&topic, 2), (&dlq, 1)]).await;
    let produced = produce(&producer(&broker.bootstrap()), &topic, &suite::records(600, "l")).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.txt");
    let _c = suite::start_consumer(&broker, "c", (&group, &topic, &dlq), &out, 40, &[]);
    assert!(wait_until(Duration::from_secs(60), || applied(&out).len() >= 100).await, "no progress");
    broker.as_mock().request_errors(RDKafkaApiKey::Heartbeat, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID]);
    let log = || std::fs::read_to_string(out.with_extension("c.log")).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(30), || log().contains("assignment lost")).await,
        "the lost assignment was not noticed\n{}",
        log()
    );
    assert!(!log().contains("committed after drain"), "a lost assignment must not be committed");
    let end = |p: i32| produced.iter().filter(|(pp, _)| *pp == p).count() as i64;
    assert!(
        wait_until(Duration::from_secs(60), || {
            let c = committed(&broker.bootstrap(), &group, &topic, 2);
            (0..2).all(|p| c.get(&p).copied().unwrap_or(-1) >= end(p))
        })
        .await,
        "did not finish after rejoining\n{}",
        log()
    );
    suite::assert_complete(&produced, &[&out]);
    suite::assert_ordered_per_partition(&out);
}

/// A batch that will not stop (its handler blocks the thread, a bug) when its partition is
/// revoked: the runtime waits for it after aborting, notices it is still running, and fails
/// liveness instead of letting the partition be worked again beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_that_ignores_cancellation_fails_liveness() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use elo_kafka::{ConsumerSettings, Handler, HandlerError, KafkaArgs, Producer, Record};
    use tokio_util::sync::CancellationToken;

    /// Lets the stuck batch end once the test has seen what it wanted.
    static RELEASE: AtomicBool = AtomicBool::new(false);
    struct Blocking(AtomicBool);
    impl Handler for Blocking {
        async fn handle(&self, batch: &[Record]) -> Vec<Result<(), HandlerError>> {
            if !self.0.swap(true, Ordering::SeqCst) {
                // A bug: blocking the worker thread, deaf to cancellation.
                while !RELEASE.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            batch.iter().map(|_| Ok(())).collect()
        }
    }
    struct Quick;
    impl Handler for Quick {
        async fn handle(&self, batch: &[Record]) -> Vec<Result<(), HandlerError>> {
            batch.iter().map(|_| Ok(())).collect()
        }
    }

    let broker = Broker::mock();
    let (topic, dlq, group) = (unique("zombie"), unique("zombie-dlq"), unique("zombie-group"));
    broker.create_topics(&[(&topic, 2), (&dlq, 1)]).await;
    produce(&producer(&broker.bootstrap()), &topic, &suite::records(50, "z")).await;
    let kafka = KafkaArgs {
        options: vec![("heartbeat.interval.ms".into(), "500".into()), ("session.timeout.ms".into(), "6000".into())],
        ..KafkaArgs::local(broker.bootstrap())
    };
    let settings = |drain: Duration| {
        let mut s = ConsumerSettings::new(group.clone(), vec![topic.clone()], dlq.clone());
        s.drain_timeout = drain;
        s
    };
    let (health_a, stop_a) = (elo_telemetry::Health::new(), CancellationToken::new());
    let blocking = Arc::new(Blocking(AtomicBool::new(false)));
    let a = tokio::spawn({
        let (kafka, health, stop, handler, settings) =
            (kafka.clone(), health_a.clone(), stop_a.clone(), blocking.clone(), settings(Duration::from_millis(500)));
        async move {
            let producer = Producer::new(&kafka, health.clone()).unwrap();
            elo_kafka::run_consumer(&kafka, settings, handler, producer, health, stop).await
        }
    });
    assert!(wait_until(Duration::from_secs(30), || blocking.0.load(Ordering::SeqCst)).await, "no batch started");
    // A second member joins: the first must revoke while its batch is stuck.
    let (health_b, stop_b) = (elo_telemetry::Health::new(), CancellationToken::new());
    let b = tokio::spawn({
        let (kafka, health, stop, settings) =
            (kafka.clone(), health_b.clone(), stop_b.clone(), settings(Duration::from_secs(5)));
        async move {
            let producer = Producer::new(&kafka, health.clone()).unwrap();
            elo_kafka::run_consumer(&kafka, settings, Arc::new(Quick), producer, health, stop).await
        }
    });
    let noticed = wait_until(Duration::from_secs(60), || !health_a.is_live()).await;
    RELEASE.store(true, Ordering::SeqCst);
    assert!(noticed, "a batch that outlived its abort must fail liveness");
    stop_a.cancel();
    stop_b.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), a).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), b).await;
}

/// A fatal client error (a static member fenced by a newer instance with the same
/// `group.instance.id`): liveness fails and the process exits non-zero instead of looping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_consumer_error_fails_liveness_and_exits_non_zero() {
    let broker = Broker::mock();
    let (topic, dlq, group) = (unique("fatal"), unique("fatal-dlq"), unique("fatal-group"));
    broker.create_topics(&[(&topic, 1), (&dlq, 1)]).await;
    produce(&producer(&broker.bootstrap()), &topic, &suite::records(20, "f")).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.txt");
    let admin = format!("127.0.0.1:{}", free_port());
    let mut c = suite::start_consumer(
        &broker,
        "c",
        (&group, &topic, &dlq),
        &out,
        0,
        &["--admin-listen", &admin, "--kafka-option", "group.instance.id=elo-static-1"],
    );
    assert!(wait_until(Duration::from_secs(60), || applied(&out).len() == 20).await, "no progress");
    broker
        .as_mock()
        .request_errors(RDKafkaApiKey::Heartbeat, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_FENCED_INSTANCE_ID; 3]);
    let status = c.wait_timeout(Duration::from_secs(60));
    let log = std::fs::read_to_string(out.with_extension("c.log")).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("a fatal error must end the process\n{log}"));
    assert!(!status.success(), "exit must be non-zero, got {status}\n{log}");
    assert!(log.contains("fatal"), "the ERROR log names the fatal error\n{log}");
}
