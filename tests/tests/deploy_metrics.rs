//! Every metric an alert rule or a Grafana dashboard in `deploy/` reads is one the services
//! really export: the four binaries run against the test broker with Magento's simulator, get
//! traffic (pushed and polled orders, a badly signed webhook, a poison record, an undecodable
//! command) and a few cheap failures (a registry that is down, a broker that is down), and their
//! `/metrics` are scraped until every family the rules and dashboards use has shown up.
//!
//! The prometheus crate leaves a labelled family out of `/metrics` until it has a sample, so a
//! family that only counts a failure not induced here is listed in `FAILURE_ONLY` with its
//! reason and checked in the source that registers it. Metrics written by something other than
//! Elo are listed in `EXTERNAL`. Alerts on metrics no service exports yet live in
//! `deploy/monitoring/pending-rules.yaml`; this test fails once one of them is exported, so the
//! alert moves into the base.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use elo_integration_tests::*;
use sandbox::magento::webhook::{WebhookConfig, WebhookStyle};
use serde_json::Value;

const SECRET: &str = "deploy-metrics-secret-0123456789";

/// Written by something other than Elo's services.
const EXTERNAL: &[(&str, &str)] = &[
    ("up", "written by Prometheus for every scrape target"),
    ("ALERTS", "written by Prometheus for every pending or firing alert"),
    (
        "kafka_consumergroup_lag",
        "written by Strimzi's Kafka Exporter (Kafka CR spec.kafkaExporter); Elo exports no lag metric of its own",
    ),
];

/// Families that appear only after the failure they count, which this test does not cause
/// (the runtime suites do: tests/src/runtime_suite.rs, consumer_runtime_mock.rs).
const FAILURE_ONLY: &[(&str, &str, &str)] = &[
    (
        "elo_consumer_halted_partitions",
        "a failed seek or a batch that will not stop",
        "crates/elo-kafka/src/metrics.rs",
    ),
    ("elo_consumer_handler_defects_total", "a handler panic", "crates/elo-kafka/src/metrics.rs"),
    ("elo_consumer_paused_partitions", "a partition buffer filling up", "crates/elo-kafka/src/metrics.rs"),
    ("elo_consumer_commit_errors_total", "a commit the broker refuses", "crates/elo-kafka/src/metrics.rs"),
    ("elo_kafka_produce_errors_total", "a record the broker does not acknowledge", "crates/elo-kafka/src/metrics.rs"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `{"live": [...], "pending": [...], "by_job": {...}}`: metric names the rules and dashboards
/// read, and those a dashboard reads from one service (`job="<service>"`).
fn metrics_used() -> (BTreeSet<String>, BTreeSet<String>, BTreeMap<String, BTreeSet<String>>) {
    let out = Command::new("python3")
        .arg(root().join("tests/python/deploy_checks.py"))
        .arg("metrics-used")
        .output()
        .expect("python3");
    assert!(out.status.success(), "metrics-used failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let set = |k: &str| v[k].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_owned()).collect();
    let by_job = v["by_job"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(job, names)| {
            (job.clone(), names.as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_owned()).collect())
        })
        .collect();
    (set("live"), set("pending"), by_job)
}

/// Metric family names in a Prometheus text exposition.
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect()
}

async fn scrape(port: u16) -> String {
    match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

#[test]
fn families_reads_type_lines() {
    let text =
        "# HELP a_total x\n# TYPE a_total counter\na_total{k=\"v\"} 1\n# TYPE b histogram\nb_bucket{le=\"1\"} 0\n";
    assert_eq!(families(text), BTreeSet::from(["a_total".to_owned(), "b".to_owned()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_in_alerts_and_dashboards_is_exported_by_the_running_services() {
    let (live, pending, by_job) = metrics_used();
    let external: BTreeMap<_, _> = EXTERNAL.iter().copied().collect();
    for (name, _, source) in FAILURE_ONLY {
        let text = std::fs::read_to_string(root().join(source)).unwrap();
        assert!(text.contains(&format!("\"{name}\"")), "{name} is not registered in {source}");
    }
    for name in external.keys().copied().chain(FAILURE_ONLY.iter().map(|f| f.0)) {
        assert!(live.contains(name), "{name} is listed here but no rule or dashboard uses it: drop it from the list");
    }
    let must_scrape: BTreeSet<String> = live
        .iter()
        .filter(|n| !external.contains_key(n.as_str()) && !FAILURE_ONLY.iter().any(|f| f.0 == n.as_str()))
        .cloned()
        .collect();
    // (family, service): a panel on one service's dashboard needs that service to export it.
    // The runtime's families (`elo_consumer_*`, `elo_kafka_*`) come with every service's runtime
    // and some appear only once it acts; they are checked across the services above. The rest
    // are a service's own, and a dashboard reading one from the wrong service stays empty.
    let runtime = |n: &str| n.starts_with("elo_consumer_") || n.starts_with("elo_kafka_");
    let must_scrape_from: BTreeSet<(String, String)> = by_job
        .iter()
        .flat_map(|(job, names)| {
            names.iter().filter(|n| must_scrape.contains(*n) && !runtime(n)).map(|n| (n.clone(), job.clone()))
        })
        .collect();
    assert!(!must_scrape_from.is_empty(), "no dashboard selects a service by job: {by_job:?}");

    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let topic = unique("deploy.metrics");
    let (magento, magento_url) = serve_magento(20).await;
    {
        // One order broken in Magento: the poll parks it in order-ingest's DLQ.
        let mut sim = magento.sim.lock().unwrap();
        let (_, order) = sim.orders.iter_mut().next().expect("an order");
        order["grand_total"] = Value::String("lots".into());
    }
    let (listen, ingest_admin) = (free_port(), free_port());
    let mut running = vec![(
        "order-ingest",
        ingest_admin,
        ChildGuard::spawn(
            "order-ingest",
            order_ingest(dir.path(), &topic, &magento_url, "order-ingest")
                .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{ingest_admin}"))
                .env("ELO_ORDER_INGEST_LISTEN", format!("127.0.0.1:{listen}"))
                .env("ELO_ORDER_INGEST_WEBHOOK_SECRET_FILE", &secret_file)
                .env("ELO_ORDER_INGEST_POLL_INTERVAL", "1s")
                // The producer's statistics gauges every 2 s, not the 30 s default.
                .env("ELO_KAFKA_STATISTICS_INTERVAL_MS", "2000"),
        ),
    )];
    let consumer = |service: &str, admin: u16, log: &str| {
        let mut command = Command::new(binary(service));
        command
            .env("ELO_KAFKA_BROKERS", brokers())
            .env("ELO_REGISTRY_URL", registry_url())
            .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            // The reconciler's reports listener: a port of its own (a taken one stops it).
            .env("ELO_RECONCILER_HTTP_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("ELO_TOPIC_COMMERCE", &topic)
            .env("ELO_TOPIC_INVENTORY", format!("{topic}.inventory"))
            .env("ELO_TOPIC_OUTCOMES", format!("{topic}.outcomes"))
            .env("ELO_TOPIC_COMMANDS", format!("{topic}.commands"))
            .env("ELO_TOPIC_PARTITIONS", "3")
            .env("ELO_CONSUMER_GROUP", format!("{topic}-{log}"))
            .env("ELO_DLQ_TOPIC", format!("{topic}.{log}.dlq"))
            .env("ELO_KAFKA_STATISTICS_INTERVAL_MS", "2000")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join(format!("{log}.log"))).unwrap());
        command
    };
    for service in ["salesforce-sink", "rdstation-sink", "reconciler"] {
        let admin = free_port();
        running.push((service, admin, ChildGuard::spawn(service, &mut consumer(service, admin, service))));
    }
    // A consumer whose registry is down: every valid record is a transient failure, retried.
    let admin = free_port();
    let closed = free_port();
    running.push((
        "reconciler (registry down)",
        admin,
        ChildGuard::spawn(
            "reconciler",
            consumer("reconciler", admin, "no-registry").env("ELO_REGISTRY_URL", format!("http://127.0.0.1:{closed}")),
        ),
    ));
    // A service whose broker is down: the client reports it.
    let admin = free_port();
    running.push((
        "salesforce-sink (broker down)",
        admin,
        ChildGuard::spawn(
            "salesforce-sink",
            consumer("salesforce-sink", admin, "no-broker").env("ELO_KAFKA_BROKERS", format!("127.0.0.1:{closed}")),
        ),
    ));

    let up = wait_until(Duration::from_secs(60), || std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok()).await;
    assert!(up, "push endpoint never listened:\n{}", log(dir.path(), "order-ingest"));
    // Pushed orders, signed as Magento's module signs them.
    {
        let mut sim = magento.sim.lock().unwrap();
        sim.webhook = WebhookConfig {
            url: Some(format!("http://127.0.0.1:{listen}/webhooks/magento/orders")),
            customer_url: Some(format!("http://127.0.0.1:{listen}/webhooks/magento/customers")),
            secret: SECRET.into(),
            style: WebhookStyle::Plain,
            ..Default::default()
        };
        sim.generate(5);
    }
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sandbox::magento::webhook::dispatch(magento.clone(), shutdown.clone()));
    // A badly signed webhook.
    let refused = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{listen}/webhooks/magento/orders"))
        .header("x-elo-webhook-signature", "t=1,v1=00")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert!(refused.status().is_client_error(), "a badly signed webhook was accepted: {}", refused.status());
    // A poison record for the consumers and an undecodable command for order-ingest.
    create_topics(&brokers(), &[(&topic, 3), (&format!("{topic}.commands"), 3)]).await;
    let producer = producer(&brokers());
    produce(&producer, &topic, &[("poison".into(), b"bad".to_vec())]).await;
    produce(&producer, &format!("{topic}.commands"), &[("c:1".into(), b"bad".to_vec())]).await;

    let deadline = Instant::now() + Duration::from_secs(150);
    let mut seen: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    loop {
        for (name, port, _) in &running {
            for family in families(&scrape(*port).await) {
                seen.entry(family).or_default().insert(name);
            }
        }
        let missing: Vec<_> = must_scrape.iter().filter(|n| !seen.contains_key(n.as_str())).collect();
        // The running instances are named "<service>" or "<service> (<what is broken>)".
        let exported_by = |family: &str, job: &str| {
            seen.get(family).is_some_and(|names| names.iter().any(|n| n.split(' ').next() == Some(job)))
        };
        let missing_from: Vec<_> = must_scrape_from.iter().filter(|(f, job)| !exported_by(f, job)).collect();
        if missing.is_empty() && missing_from.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let logs: String =
                ["order-ingest", "salesforce-sink", "rdstation-sink", "reconciler", "no-registry", "no-broker"]
                    .iter()
                    .map(|l| {
                        format!(
                            "--- {l}\n{}\n",
                            log(dir.path(), l).lines().rev().take(15).collect::<Vec<_>>().join("\n")
                        )
                    })
                    .collect();
            panic!(
                "used by deploy/ but exported by no running service: {missing:?}\n\
                 read from one service's dashboard but not exported by it: {missing_from:?}\nseen: {seen:?}\n{logs}"
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    shutdown.cancel();
    for name in &pending {
        assert!(
            !seen.contains_key(name),
            "{name} is exported now: move its alerts from deploy/monitoring/pending-rules.yaml into the base"
        );
    }
    for name in &must_scrape {
        eprintln!("scraped: {name} from {:?}", seen[name]);
    }
    for (name, reason) in &external {
        eprintln!("external: {name} ({reason})");
    }
    for (name, reason, _) in FAILURE_ONLY {
        eprintln!("registered, shown after a failure not caused here: {name} ({reason})");
    }
    for name in &pending {
        eprintln!("pending (deploy/monitoring/pending-rules.yaml): {name} is exported by no service yet");
    }
    for (_, _, guard) in &mut running {
        guard.signal("TERM");
    }
}
