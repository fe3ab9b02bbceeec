//! `rdstation-sink rules backtest` reads a known order history to its end on the real broker
//! and reports the right weekly segment sizes, also when the broker is slow to answer large
//! fetches.
//!
//! Tansu 0.6 (the local broker) looks up every fetched record's headers with a query that
//! scans its whole header table, so once it holds some ten thousand records with headers (the
//! sink's outcomes carry one), a fetch of thousands of records takes longer than the client
//! waits; the request is sent again and times out again, and the back-test hung (seen in the
//! bench). Here the broker holds 15,000 records with headers and the client waits only 2 s
//! per request (`socket.timeout.ms`): a default-sized fetch of the 3,000-record history takes
//! several seconds and never completes, the back-test's small fetches each take a fraction.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use elo_events::{EventCodec, RegistryConfig};
use elo_integration_tests::*;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

const WEEK_MS: i64 = 7 * 86_400_000;
const CUSTOMERS: usize = 600;
const WEEKS: i64 = 6;
const NOISE: usize = 15_000;

const RULES: &str = r#"
[[rule]]
name = "buyer"
when = { frequency_gte = 1 }

[[rule]]
name = "repeat"
when = { frequency_gte = 3 }
"#;

/// Customer `c`'s orders: `c % 9 + 1` of them, the `j`-th in week `(c + 2j) % WEEKS` after
/// `start` (a week boundary), so segments grow week by week.
fn history(start: i64) -> Vec<(usize, i64)> {
    let mut orders = Vec::new();
    for c in 0..CUSTOMERS {
        for j in 0..(c % 9 + 1) {
            let week = (c as i64 + 2 * j as i64) % WEEKS;
            orders.push((c, start + week * WEEK_MS + 3_600_000 + (c * 10 + j) as i64 * 1000));
        }
    }
    orders
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backtest_reads_the_whole_history_with_the_right_weekly_counts_on_a_slow_broker() {
    let (_tansu, _broker_dir) = use_private_broker();
    let topic = unique("rd.backtest");
    let noise = unique("rd.backtest.noise");
    create_topics(&brokers(), &[(&topic, 6), (&noise, 1)]).await;
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "20")
        .set("enable.idempotence", "false")
        .create()
        .unwrap();

    // Records with headers elsewhere on the broker (what slows Tansu's fetches down).
    let mut deliveries = Vec::new();
    for _ in 0..NOISE {
        let headers = OwnedHeaders::new().insert(Header { key: "elo-event-type", value: Some("SYNC_OUTCOME") });
        let record = FutureRecord::to(&noise).key("k").payload("x").headers(headers);
        deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        if deliveries.len() == 5000 {
            for d in deliveries.drain(..) {
                d.await.unwrap().map_err(|(e, _)| e).unwrap();
            }
        }
    }
    for d in deliveries {
        d.await.unwrap().map_err(|(e, _)| e).unwrap();
    }

    // The history, in random order across partitions (keyed by customer).
    let start = 1_790_000_000_000 - 1_790_000_000_000_i64.rem_euclid(WEEK_MS);
    let orders = history(start);
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let mut deliveries = Vec::new();
    for (n, (c, at)) in orders.iter().enumerate().rev() {
        let event = rd_order("backtest", 2_000_000, n, *c, *at);
        let bytes = codec.encode(&topic, &event).await.unwrap();
        let record = FutureRecord::to(&topic).key(&event.customer_key).payload(&bytes);
        deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for d in deliveries {
        d.await.unwrap().map_err(|(e, _)| e).unwrap();
    }

    // Expected, computed here: at the end of week w, the customers with an order before it,
    // those with at least one and those with at least three.
    let mut expected = Vec::new();
    for w in 1..=WEEKS {
        let end = start + w * WEEK_MS;
        let mut per_customer: BTreeMap<usize, usize> = BTreeMap::new();
        for (c, at) in &orders {
            if *at < end {
                *per_customer.entry(*c).or_default() += 1;
            }
        }
        let repeat = per_customer.values().filter(|n| **n >= 3).count();
        expected.push(vec![per_customer.len(), per_customer.len(), repeat]);
    }
    assert!(expected.windows(2).all(|w| w[0] != w[1]), "segments must move every week: {expected:?}");

    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let csv = dir.path().join("backtest.csv");
    let mut command = Command::new(binary("rdstation-sink"));
    command
        .args(["rules", "backtest", "--csv"])
        .arg(&csv)
        .env("ELO_KAFKA_BROKERS", brokers())
        .env("ELO_REGISTRY_URL", registry_url())
        .env("ELO_TOPIC_COMMERCE", &topic)
        .env("ELO_RDSTATION_RULES_FILE", &rules)
        .env("ELO_RDKAFKA_SOCKET_TIMEOUT_MS", "2000")
        .env("ELO_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("backtest.log")).unwrap());
    let started = Instant::now();
    let mut job = ChildGuard::spawn("rdstation-sink rules backtest", &mut command);
    let status = job.wait_timeout(Duration::from_secs(150));
    let log = std::fs::read_to_string(dir.path().join("backtest.log")).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("the back-test did not finish in 150 s:\n{log}"));
    assert!(status.success(), "the back-test failed:\n{log}");
    eprintln!("back-test of {} orders in {:.1} s", orders.len(), started.elapsed().as_secs_f64());
    assert!(log.contains(&format!("{} events replayed (0 undecodable skipped)", orders.len())), "{log}");

    let csv = std::fs::read_to_string(&csv).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("week_ending,customers,buyer,repeat"));
    let weeks: Vec<Vec<usize>> = lines.map(|l| l.split(',').skip(1).map(|v| v.parse().unwrap()).collect()).collect();
    assert_eq!(weeks, expected, "{csv}");
    let days: BTreeSet<&str> = csv.lines().skip(1).filter_map(|l| l.split(',').next()).collect();
    assert_eq!(days.len(), WEEKS as usize, "{csv}");
}
