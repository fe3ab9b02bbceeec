//! The consumer runtime against the real broker: nothing is lost across crashes, restarts,
//! rebalances and shutdowns; a poison record is parked in the DLQ while its partition goes on.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use elo_integration_tests::*;
use rdkafka::Message;
use rdkafka::message::Headers;

const CONSUMER: &str = env!("CARGO_BIN_EXE_elo-test-consumer");

fn start_consumer(name: &str, group: &str, topic: &str, dlq: &str, output: &Path, delay_ms: u64) -> ChildGuard {
    let log = std::fs::File::create(output.with_extension(format!("{name}.log"))).unwrap();
    ChildGuard::spawn(
        name,
        Command::new(CONSUMER)
            .args(["--kafka-brokers", &brokers(), "--group", group, "--topic", topic, "--dlq", dlq])
            .arg("--output")
            .arg(output)
            .args(["--delay-ms", &delay_ms.to_string(), "--max-batch", "10"])
            // A crashed member is noticed after the session timeout; keep tests short.
            .args(["--kafka-option", "session.timeout.ms=6000", "--kafka-option", "heartbeat.interval.ms=1000"])
            .stdout(Stdio::null())
            .stderr(log),
    )
}

/// Every produced (partition, offset) must appear in the union of the outputs, and within each
/// output file a partition's offsets must only go forward (per-key order), except where a
/// restart replays from the last commit.
fn assert_complete(produced: &[(i32, i64)], outputs: &[&Path]) {
    let mut seen = BTreeSet::new();
    for path in outputs {
        for (p, o, _) in applied(path) {
            seen.insert((p, o));
        }
    }
    let missing: Vec<_> = produced.iter().filter(|po| !seen.contains(po)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} records never applied, e.g. {:?}",
        missing.len(),
        produced.len(),
        &missing[..missing.len().min(5)]
    );
}

fn assert_ordered_per_partition(path: &Path) {
    let mut last: BTreeMap<i32, i64> = BTreeMap::new();
    for (p, o, _) in applied(path) {
        if let Some(prev) = last.get(&p) {
            assert!(o > *prev, "{}: partition {p} went from {prev} to {o}", path.display());
        }
        last.insert(p, o);
    }
}

fn records(n: usize, prefix: &str) -> Vec<(String, Vec<u8>)> {
    (0..n).map(|i| (format!("customer-{}", i % 37), format!("{prefix}-{i}").into_bytes())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_stream_then_restart_loses_nothing() {
    let (topic, dlq, group) = (unique("crash"), unique("crash-dlq"), unique("crash-group"));
    create_topics(&brokers(), &[(&topic, 3), (&dlq, 1)]).await;
    let produced = produce(&producer(&brokers()), &topic, &records(1500, "r")).await;
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (dir.path().join("first.txt"), dir.path().join("second.txt"));

    let mut a = start_consumer("a", &group, &topic, &dlq, &first, 20);
    assert!(
        wait_until(Duration::from_secs(60), || applied(&first).len() >= 300).await,
        "first consumer made no progress"
    );
    a.signal("KILL");
    a.wait_timeout(Duration::from_secs(5)).expect("killed consumer exits");
    let applied_by_first = applied(&first).len();
    assert!(applied_by_first < produced.len(), "crash must happen mid-stream");

    let _b = start_consumer("b", &group, &topic, &dlq, &second, 0);
    let done = wait_until(Duration::from_secs(90), || {
        let c = committed(&brokers(), &group, &topic, 3);
        (0..3).all(|p| c.get(&p).copied().unwrap_or(-1) >= produced.iter().filter(|(pp, _)| *pp == p).count() as i64)
    })
    .await;
    assert!(done, "restarted consumer did not commit to the end");
    assert_complete(&produced, &[&first, &second]);
    assert_ordered_per_partition(&second);
    // The restart replays from the last commit (at-least-once), but never from the start:
    // commits were happening while the first consumer ran.
    assert!(
        applied(&second).len() < produced.len(),
        "restart replayed everything: no commit was made before the crash"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_member_rebalance_loses_nothing() {
    let (topic, dlq, group) = (unique("rebalance"), unique("rebalance-dlq"), unique("rebalance-group"));
    create_topics(&brokers(), &[(&topic, 4), (&dlq, 1)]).await;
    let producer = producer(&brokers());
    let mut produced = produce(&producer, &topic, &records(600, "early")).await;
    let dir = tempfile::tempdir().unwrap();
    let (out_a, out_b) = (dir.path().join("a.txt"), dir.path().join("b.txt"));

    let mut a = start_consumer("a", &group, &topic, &dlq, &out_a, 30);
    assert!(wait_until(Duration::from_secs(60), || applied(&out_a).len() >= 100).await);
    // A second member joins mid-stream: partitions move from a to b.
    let _b = start_consumer("b", &group, &topic, &dlq, &out_b, 30);
    produced.extend(produce(&producer, &topic, &records(600, "late")).await);
    assert!(
        wait_until(Duration::from_secs(90), || !applied(&out_b).is_empty()).await,
        "second member never got partitions"
    );
    // The first member leaves gracefully: its partitions move back to b.
    a.signal("TERM");
    assert!(a.wait_timeout(Duration::from_secs(30)).expect("a exits after SIGTERM").success());
    let total = produced.len();
    let done = wait_until(Duration::from_secs(120), || {
        let c = committed(&brokers(), &group, &topic, 4);
        (0..4).all(|p| c.get(&p).copied().unwrap_or(-1) >= produced.iter().filter(|(pp, _)| *pp == p).count() as i64)
    })
    .await;
    if !done {
        let logs =
            |name: &str| std::fs::read_to_string(out_a.with_extension(format!("{name}.log"))).unwrap_or_default();
        let logs_b = std::fs::read_to_string(out_b.with_extension("b.log")).unwrap_or_default();
        panic!(
            "group did not commit all {total} records; committed {:?}\n--- a ---\n{}\n--- b ---\n{logs_b}",
            committed(&brokers(), &group, &topic, 4),
            logs("a")
        );
    }
    assert_complete(&produced, &[&out_a, &out_b]);
    assert_ordered_per_partition(&out_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_record_goes_to_dlq_and_partition_carries_on() {
    let (topic, dlq, group) = (unique("poison"), unique("poison-dlq"), unique("poison-group"));
    create_topics(&brokers(), &[(&topic, 1), (&dlq, 1)]).await;
    let mut input = records(40, "ok");
    input[17].1 = b"poison-pill".to_vec();
    let produced = produce(&producer(&brokers()), &topic, &input).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.txt");
    let _c = start_consumer("c", &group, &topic, &dlq, &out, 0);

    assert!(
        wait_until(Duration::from_secs(60), || committed(&brokers(), &group, &topic, 1).get(&0) == Some(&40)).await,
        "partition did not get past the poison record"
    );
    let offsets: Vec<i64> = applied(&out).iter().map(|(_, o, _)| *o).collect();
    let expected: Vec<i64> = produced.iter().map(|(_, o)| *o).filter(|o| *o != produced[17].1).collect();
    assert_eq!(offsets, expected, "every record but the poison one is applied, in order");

    let parked = read_all(&brokers(), &dlq, 1);
    assert_eq!(parked.len(), 1);
    let record = &parked[0];
    assert_eq!(record.payload(), Some(&b"poison-pill"[..]), "original bytes are kept");
    assert_eq!(record.key(), Some(input[17].0.as_bytes()), "original key is kept");
    let headers: BTreeMap<String, String> = record
        .headers()
        .unwrap()
        .iter()
        .map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
        .collect();
    assert_eq!(headers["elo-dlq-error-class"], "permanent");
    assert_eq!(headers["elo-dlq-error-code"], "poison");
    assert_eq!(headers["elo-dlq-origin-topic"], topic);
    assert_eq!(headers["elo-dlq-origin-partition"], "0");
    assert_eq!(headers["elo-dlq-origin-offset"], produced[17].1.to_string());
    assert_eq!(headers["elo-dlq-attempts"], "1");
    assert!(headers["elo-dlq-first-failure-ms"].parse::<i64>().unwrap() > 1_700_000_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_ends_with_a_final_commit() {
    let (topic, dlq, group) = (unique("sigterm"), unique("sigterm-dlq"), unique("sigterm-group"));
    create_topics(&brokers(), &[(&topic, 2), (&dlq, 1)]).await;
    let produced = produce(&producer(&brokers()), &topic, &records(2000, "s")).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.txt");
    let mut c = start_consumer("c", &group, &topic, &dlq, &out, 50);
    assert!(wait_until(Duration::from_secs(60), || applied(&out).len() >= 200).await);

    c.signal("TERM");
    let status = c.wait_timeout(Duration::from_secs(30)).expect("consumer exits after SIGTERM");
    assert!(status.success(), "graceful exit, got {status}");
    let done = applied(&out);
    assert!(done.len() < produced.len(), "SIGTERM must land mid-stream");
    // The final commit covers exactly what was applied: nothing applied is left uncommitted
    // (no replay after a clean stop) and nothing unapplied is committed (no loss).
    let c = committed(&brokers(), &group, &topic, 2);
    for p in 0..2 {
        let next = done.iter().filter(|(pp, _, _)| *pp == p).map(|(_, o, _)| o + 1).max().unwrap_or(0);
        assert_eq!(c.get(&p).copied().unwrap_or(0), next, "partition {p}: committed offset vs last applied");
    }
}
