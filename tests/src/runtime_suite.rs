//! The consumer runtime's broker test suite, run against two broker implementations: Tansu
//! (`tests/consumer_runtime.rs`) and librdkafka's mock cluster
//! (`tests/consumer_runtime_mock.rs`), which also injects the request errors Tansu cannot
//! produce. Each test drives the `elo-test-consumer` binary as a separate process, so crashes
//! are real `kill -9`s.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rdkafka::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::{ChildGuard, applied, binary, committed, free_port, produce, producer, read_all, unique, wait_until};

/// The broker a suite run talks to.
pub enum Broker {
    /// The shared Tansu of `make test`.
    Tansu(String),
    /// An in-process librdkafka mock cluster (one broker).
    Mock(MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
}

impl Broker {
    pub fn tansu() -> Self {
        Self::Tansu(crate::brokers())
    }

    pub fn mock() -> Self {
        Self::Mock(MockCluster::new(1).expect("mock cluster"))
    }

    pub fn bootstrap(&self) -> String {
        match self {
            Self::Tansu(b) => b.clone(),
            Self::Mock(m) => m.bootstrap_servers(),
        }
    }

    pub async fn create_topics(&self, topics: &[(&str, i32)]) {
        match self {
            Self::Tansu(b) => crate::create_topics(b, topics).await,
            Self::Mock(m) => {
                for (topic, partitions) in topics {
                    m.create_topic(topic, *partitions, 1).expect("mock topic");
                }
            }
        }
    }

    /// The mock cluster, for error injection.
    pub fn as_mock(&self) -> &MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
        match self {
            Self::Mock(m) => m,
            Self::Tansu(_) => panic!("this test needs the mock cluster"),
        }
    }
}

/// Starts `elo-test-consumer`; its log goes next to `output`.
pub fn start_consumer(
    broker: &Broker,
    name: &str,
    (group, topic, dlq): (&str, &str, &str),
    output: &Path,
    delay_ms: u64,
    extra: &[&str],
) -> ChildGuard {
    let log = std::fs::File::create(output.with_extension(format!("{name}.log"))).unwrap();
    ChildGuard::spawn(
        name,
        Command::new(binary("elo-test-consumer"))
            .args(["--kafka-brokers", &broker.bootstrap(), "--group", group, "--topic", topic, "--dlq", dlq])
            .arg("--output")
            .arg(output)
            .args(["--delay-ms", &delay_ms.to_string(), "--max-batch", "10"])
            // A crashed member is noticed after the session timeout; keep tests short.
            .args(["--kafka-option", "session.timeout.ms=6000", "--kafka-option", "heartbeat.interval.ms=1000"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log),
    )
}

fn log_of(output: &Path, name: &str) -> String {
    std::fs::read_to_string(output.with_extension(format!("{name}.log"))).unwrap_or_default()
}

/// Every produced (partition, offset) appears in the union of the outputs.
pub fn assert_complete(produced: &[(i32, i64)], outputs: &[&Path]) {
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

/// Within one output, each partition (hence each key) goes forward one offset at a time: a
/// step back is a redelivery (at-least-once: a commit the broker refused, a worker restart)
/// and is allowed; a step forward by more than one is a skipped record.
pub fn assert_ordered_per_partition(path: &Path) {
    let mut last: BTreeMap<i32, i64> = BTreeMap::new();
    for (p, o, _) in applied(path) {
        if let Some(prev) = last.get(&p) {
            assert!(o <= prev + 1, "{}: partition {p} jumped from {prev} to {o}, skipping records", path.display());
        }
        last.insert(p, o);
    }
}

pub fn records(n: usize, prefix: &str) -> Vec<(String, Vec<u8>)> {
    (0..n).map(|i| (format!("customer-{}", i % 37), format!("{prefix}-{i}").into_bytes())).collect()
}

fn count_in(produced: &[(i32, i64)], partition: i32) -> i64 {
    produced.iter().filter(|(p, _)| *p == partition).count() as i64
}

async fn committed_to_end(
    broker: &Broker,
    group: &str,
    topic: &str,
    produced: &[(i32, i64)],
    partitions: i32,
    timeout: Duration,
) -> bool {
    wait_until(timeout, || {
        let c = committed(&broker.bootstrap(), group, topic, partitions);
        (0..partitions).all(|p| c.get(&p).copied().unwrap_or(-1) >= count_in(produced, p))
    })
    .await
}

/// kill -9 mid-stream, restart: nothing lost, and commits happened while the first one ran.
pub async fn crash_mid_stream_then_restart_loses_nothing(broker: &Broker) {
    let (topic, dlq, group) = (unique("crash"), unique("crash-dlq"), unique("crash-group"));
    broker.create_topics(&[(&topic, 3), (&dlq, 1)]).await;
    let produced = produce(&producer(&broker.bootstrap()), &topic, &records(1500, "r")).await;
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (dir.path().join("first.txt"), dir.path().join("second.txt"));

    let mut a = start_consumer(broker, "a", (&group, &topic, &dlq), &first, 100, &[]);
    assert!(
        wait_until(Duration::from_secs(60), || applied(&first).len() >= 300).await,
        "first consumer made no progress"
    );
    // Let at least one commit interval pass so the crash lands after a commit.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    a.signal("KILL");
    a.wait_timeout(Duration::from_secs(5)).expect("killed consumer exits");
    let applied_by_first = applied(&first).len();
    assert!(applied_by_first < produced.len(), "crash must happen mid-stream");

    let _b = start_consumer(broker, "b", (&group, &topic, &dlq), &second, 0, &[]);
    assert!(
        committed_to_end(broker, &group, &topic, &produced, 3, Duration::from_secs(90)).await,
        "restarted consumer did not commit to the end\n{}",
        log_of(&second, "b")
    );
    assert_complete(&produced, &[&first, &second]);
    assert_ordered_per_partition(&second);
    assert!(
        applied(&second).len() < produced.len(),
        "restart replayed everything: no commit was made before the crash"
    );
}

/// A member joins mid-stream, then the first leaves: nothing lost, and each member applied
/// every partition (so every key) in order.
pub async fn two_member_rebalance_loses_nothing(broker: &Broker) {
    let (topic, dlq, group) = (unique("rebalance"), unique("rebalance-dlq"), unique("rebalance-group"));
    broker.create_topics(&[(&topic, 4), (&dlq, 1)]).await;
    let producer = producer(&broker.bootstrap());
    let mut produced = produce(&producer, &topic, &records(600, "early")).await;
    let dir = tempfile::tempdir().unwrap();
    let (out_a, out_b) = (dir.path().join("a.txt"), dir.path().join("b.txt"));

    let mut a = start_consumer(broker, "a", (&group, &topic, &dlq), &out_a, 30, &[]);
    assert!(wait_until(Duration::from_secs(60), || applied(&out_a).len() >= 100).await);
    let _b = start_consumer(broker, "b", (&group, &topic, &dlq), &out_b, 30, &[]);
    produced.extend(produce(&producer, &topic, &records(600, "late")).await);
    assert!(
        wait_until(Duration::from_secs(90), || !applied(&out_b).is_empty()).await,
        "second member never got partitions"
    );
    a.signal("TERM");
    assert!(a.wait_timeout(Duration::from_secs(30)).expect("a exits after SIGTERM").success());
    let total = produced.len();
    if !committed_to_end(broker, &group, &topic, &produced, 4, Duration::from_secs(120)).await {
        panic!(
            "group did not commit all {total} records; committed {:?}\n--- a ---\n{}\n--- b ---\n{}",
            committed(&broker.bootstrap(), &group, &topic, 4),
            log_of(&out_a, "a"),
            log_of(&out_b, "b")
        );
    }
    assert_complete(&produced, &[&out_a, &out_b]);
    assert_ordered_per_partition(&out_a);
    assert_ordered_per_partition(&out_b);
    // Merged in time, each partition's last application is its newest record: no key was
    // left on an older version, whichever member applied what.
    let mut timeline: Vec<(u128, i32, i64)> = [&out_a, &out_b]
        .iter()
        .flat_map(|path| crate::applied_at(path).into_iter().map(|(p, o, _, at)| (at, p, o)))
        .collect();
    timeline.sort_by_key(|(at, _, _)| *at);
    let mut last: BTreeMap<i32, i64> = BTreeMap::new();
    for (_, p, o) in timeline {
        last.insert(p, o);
    }
    for p in 0..4 {
        let newest = produced.iter().filter(|(pp, _)| *pp == p).map(|(_, o)| *o).max().unwrap();
        assert_eq!(last.get(&p).copied(), Some(newest), "partition {p} did not end on its newest record");
    }
}

/// A poison record is parked with its original key, bytes and headers, and the partition goes on.
pub async fn poison_record_goes_to_dlq_and_partition_carries_on(broker: &Broker) {
    let (topic, dlq, group) = (unique("poison"), unique("poison-dlq"), unique("poison-group"));
    broker.create_topics(&[(&topic, 1), (&dlq, 1)]).await;
    let mut input = records(40, "ok");
    input[17].1 = b"poison-pill".to_vec();
    let plain = producer(&broker.bootstrap());
    let mut produced = produce(&plain, &topic, &input[..17]).await;
    let poison_at = send_with_header(
        &plain,
        &topic,
        &input[17],
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    )
    .await;
    produced.push(poison_at);
    produced.extend(produce(&plain, &topic, &input[18..]).await);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.txt");
    let _c = start_consumer(broker, "c", (&group, &topic, &dlq), &out, 0, &[]);

    assert!(
        wait_until(Duration::from_secs(60), || committed(&broker.bootstrap(), &group, &topic, 1).get(&0) == Some(&40))
            .await,
        "partition did not get past the poison record\n{}",
        log_of(&out, "c")
    );
    let offsets: Vec<i64> = applied(&out).iter().map(|(_, o, _)| *o).collect();
    let expected: Vec<i64> = produced.iter().map(|(_, o)| *o).filter(|o| *o != poison_at.1).collect();
    assert_eq!(offsets, expected, "every record but the poison one is applied, in order");

    let parked = read_all(&broker.bootstrap(), &dlq, 1);
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
    assert_eq!(
        headers["traceparent"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "original headers are kept"
    );
    assert_eq!(headers["elo-dlq-error-class"], "permanent");
    assert_eq!(headers["elo-dlq-error-code"], "poison");
    assert_eq!(headers["elo-dlq-origin-topic"], topic);
    assert_eq!(headers["elo-dlq-origin-partition"], "0");
    assert_eq!(headers["elo-dlq-origin-offset"], poison_at.1.to_string());
    assert_eq!(headers["elo-dlq-attempts"], "1");
    assert!(headers["elo-dlq-origin-timestamp-ms"].parse::<i64>().unwrap() > 1_700_000_000_000);
    assert!(headers["elo-dlq-first-failure-ms"].parse::<i64>().unwrap() > 1_700_000_000_000);
}

async fn send_with_header(
    producer: &FutureProducer,
    topic: &str,
    (key, value): &(String, Vec<u8>),
    (name, header): (&str, &str),
) -> (i32, i64) {
    let headers = OwnedHeaders::new().insert(Header { key: name, value: Some(header) });
    let record = FutureRecord::to(topic).key(key.as_bytes()).payload(value.as_slice()).headers(headers);
    let (partition, offset) = producer
        .send(record, Duration::from_secs(10))
        .await
        .map(|d| (d.partition, d.offset))
        .map_err(|(e, _)| e)
        .expect("delivery");
    (partition, offset)
}

/// SIGTERM mid-stream: exit 0 with a final commit that covers exactly what was applied.
pub async fn sigterm_mid_stream_ends_with_a_final_commit(broker: &Broker) {
    let (topic, dlq, group) = (unique("sigterm"), unique("sigterm-dlq"), unique("sigterm-group"));
    broker.create_topics(&[(&topic, 2), (&dlq, 1)]).await;
    let produced = produce(&producer(&broker.bootstrap()), &topic, &records(2000, "s")).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.txt");
    let mut c = start_consumer(broker, "c", (&group, &topic, &dlq), &out, 50, &[]);
    assert!(wait_until(Duration::from_secs(60), || applied(&out).len() >= 200).await);

    c.signal("TERM");
    let status = c.wait_timeout(Duration::from_secs(30)).expect("consumer exits after SIGTERM");
    assert!(status.success(), "graceful exit, got {status}");
    let done = applied(&out);
    assert!(done.len() < produced.len(), "SIGTERM must land mid-stream");
    let c = committed(&broker.bootstrap(), &group, &topic, 2);
    for p in 0..2 {
        let next = done.iter().filter(|(pp, _, _)| *pp == p).map(|(_, o, _)| o + 1).max().unwrap_or(0);
        assert_eq!(c.get(&p).copied().unwrap_or(0), next, "partition {p}: committed offset vs last applied");
    }
}

/// Scrapes a consumer's `/metrics`.
pub async fn scrape(admin: &str) -> String {
    match reqwest::get(format!("http://{admin}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The sum of a metric's samples whose line contains every `needle`.
pub fn metric_sum(text: &str, name: &str, needles: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Status of a consumer's health probe (`livez` or `readyz`), 0 when it does not answer.
pub async fn probe(admin: &str, which: &str) -> u16 {
    match reqwest::get(format!("http://{admin}/health/{which}")).await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

async fn wait_for_status(admin: &str, which: &str, status: u16, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if probe(admin, which).await == status {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// A handler panic is a bug, not bad data: the partition is held, nothing is parked, nothing
/// past the record is committed, and the process reports itself not live.
pub async fn a_handler_panic_holds_the_partition_and_fails_liveness(broker: &Broker) {
    let (topic, dlq, group) = (unique("panic"), unique("panic-dlq"), unique("panic-group"));
    broker.create_topics(&[(&topic, 1), (&dlq, 1)]).await;
    let mut input = records(30, "ok");
    input[12].1 = b"panic-now".to_vec();
    let produced = produce(&producer(&broker.bootstrap()), &topic, &input).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.txt");
    let admin = format!("127.0.0.1:{}", free_port());
    let _c = start_consumer(broker, "c", (&group, &topic, &dlq), &out, 0, &["--admin-listen", &admin]);
    assert!(
        wait_for_status(&admin, "livez", 503, Duration::from_secs(60)).await,
        "a handler panic must fail liveness\n{}",
        log_of(&out, "c")
    );
    // Give the runtime time to do the wrong thing (park it, commit past it) if it would.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let applied_offsets: Vec<i64> = applied(&out).iter().map(|(_, o, _)| *o).collect();
    assert!(!applied_offsets.contains(&produced[12].1), "the panicking record was not applied");
    assert!(applied_offsets.iter().all(|o| *o < produced[12].1), "nothing after the held record: {applied_offsets:?}");
    let c = committed(&broker.bootstrap(), &group, &topic, 1).get(&0).copied().unwrap_or(0);
    assert!(c <= produced[12].1, "committed {c} past the held record {}", produced[12].1);
    let metrics = scrape(&admin).await;
    assert_eq!(metric_sum(&metrics, "elo_consumer_records_total", &["dead_lettered"]), 0.0, "a bug parks nothing");
    assert_eq!(metric_sum(&metrics, "elo_consumer_handler_defects_total", &[&topic]), 1.0);
    assert!(log_of(&out, "c").contains("handler defect"), "ERROR log names the defect");
}
