//! `reconciler dlq` on the real broker: Magento simulator → order-ingest → salesforce-sink →
//! Salesforce simulator, with two customers the duplicate rule refuses (their records are
//! parked with DUPLICATES_DETECTED). One is fixed upstream (the clashing Contact deleted), the
//! other is not; then every dead letter is replayed. The fixed customer's records land in
//! Salesforce, the other's return to the DLQ (marked `elo-replay-of`), nothing is lost, a
//! second consumer of the same topic (the reconciler) skips every replay and commits past it,
//! and running the replay again repeats nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Output;
use std::time::Duration;

use elo_integration_tests::*;
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use sandbox::salesforce::SalesforceConfig;
use serde_json::{Value, json};

fn customer_key(order: &Value) -> String {
    elo_events::ids::customer_key(order["customer_id"].as_i64(), order["customer_email"].as_str().unwrap())
}

fn key_of(record: &OwnedMessage) -> String {
    String::from_utf8_lossy(record.key().unwrap_or_default()).into_owned()
}

fn run_cli(dir: &std::path::Path, topic: &str, args: &[&str]) -> Output {
    let output = run_cli_unchecked(dir, topic, args);
    assert!(
        output.status.success(),
        "reconciler {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        log(dir, "cli")
    );
    output
}

fn run_cli_unchecked(dir: &std::path::Path, topic: &str, args: &[&str]) -> Output {
    reconciler(dir, topic, free_port(), "cli").args(args).output().expect("run reconciler")
}

fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_land_when_fixed_return_when_not_and_other_consumers_skip_them() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("rc.dlq");
    let dlq = format!("{topic}.sf-dlq");
    let (magento, magento_url) = serve_magento(40).await;
    let (sf, sf_url, _faults) = serve_salesforce(SalesforceConfig::default()).await;

    // Two registered customers whose e-mail another Contact already holds.
    let orders: Vec<Value> = magento.sim.lock().unwrap().orders.values().cloned().collect();
    let mut registered: Vec<(String, String)> = orders
        .iter()
        .filter(|o| o["customer_id"].is_i64())
        .map(|o| (customer_key(o), o["customer_email"].as_str().unwrap().to_owned()))
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .collect();
    registered.truncate(2);
    assert_eq!(registered.len(), 2, "the simulator has registered customers");
    let [(fixed_key, fixed_email), (broken_key, broken_email)] = [registered[0].clone(), registered[1].clone()];
    let clash = |email: &str| {
        sf.sim
            .lock()
            .unwrap()
            .org
            .create("Contact", json!({"LastName": "Existing", "Email": email}).as_object().unwrap().clone(), 0)
            .unwrap()
    };
    let fixed_clash = clash(&fixed_email);
    clash(&broken_email);

    let _ingest = ChildGuard::spawn(
        "order-ingest",
        order_ingest(dir.path(), &topic, &magento_url, "ingest").env("ELO_ORDER_INGEST_POLL_INTERVAL", "1s"),
    );
    let _sink = ChildGuard::spawn("salesforce-sink", &mut salesforce_sink(dir.path(), &topic, &sf_url, "sink"));
    let rc_admin = free_port();
    let _rc = ChildGuard::spawn(
        "reconciler",
        reconciler(dir.path(), &topic, rc_admin, "reconciler").stdout(std::process::Stdio::null()),
    );

    // Everything else lands; the sink and the reconciler have finished the topic.
    let orders_of = |key: &str| orders.iter().filter(|o| customer_key(o) == key).count();
    let others = orders.len() - orders_of(&fixed_key) - orders_of(&broken_key);
    let sf_orders = || sf.sim.lock().unwrap().org.records.values().filter(|r| r.object == "Order").count();
    let caught_up = |group: &str| {
        let committed = committed(&brokers(), group, &topic, 3);
        let consumer: rdkafka::consumer::BaseConsumer =
            rdkafka::ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
        (0..3).all(|p| {
            let high =
                rdkafka::consumer::Consumer::fetch_watermarks(&consumer, &topic, p, Duration::from_secs(5)).unwrap().1;
            high == 0 || committed.get(&p) == Some(&high)
        })
    };
    let settled = wait_until(Duration::from_secs(150), || {
        sf_orders() == others
            && topic_count(&topic, 3) > 0
            && caught_up(&format!("{topic}.sf-group"))
            && caught_up(&format!("{topic}.rc-group"))
    })
    .await;
    assert!(settled, "{} of {others} orders in Salesforce\n{}", sf_orders(), log(dir.path(), "sink"));
    let parked = read_all(&brokers(), &dlq, 3);
    let parked_keys: BTreeSet<String> = parked.iter().map(key_of).collect();
    assert_eq!(
        parked_keys,
        BTreeSet::from([fixed_key.clone(), broken_key.clone()]),
        "only the refused customers are parked"
    );
    let fixed_letters = parked.iter().filter(|r| key_of(r) == fixed_key).count();
    let broken_letters: BTreeSet<String> = parked
        .iter()
        .filter(|r| key_of(r) == broken_key)
        .map(|r| format!("{dlq}/{}/{}", r.partition(), r.offset()))
        .collect();

    // list and show: filtered, decoded, personal data redacted.
    let topics_arg = format!("--dlq-topics={dlq}");
    let listed = run_cli(
        dir.path(),
        &topic,
        &["dlq", "list", &topics_arg, "--json", "--key", &broken_key, "--code", "DUPLICATES_DETECTED"],
    );
    let listed: Vec<Value> =
        String::from_utf8_lossy(&listed.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(listed.len(), broken_letters.len(), "list selects by key and code");
    assert!(listed.iter().all(|l| l["class"] == "permanent" && l["group"] == format!("{topic}.sf-group")));
    let none = run_cli(dir.path(), &topic, &["dlq", "list", &topics_arg, "--json", "--code", "INVALID_FIELD"]);
    assert!(none.stdout.is_empty(), "a code nobody has selects nothing");
    let first = listed[0]["dead_letter"].as_str().unwrap();
    let shown: Value =
        serde_json::from_slice(&run_cli(dir.path(), &topic, &["dlq", "show", &topics_arg, first]).stdout).unwrap();
    assert_eq!(shown["value"]["customer_key"], broken_key.as_str(), "the value is decoded: {shown}");
    assert!(shown["headers"]["traceparent"].is_string(), "headers are shown");
    assert!(!shown.to_string().contains(&broken_email), "the e-mail is redacted");

    // Dry run: lists, writes nothing.
    let checkpoints = format!("{topic}.replays");
    let commerce_before = topic_count(&topic, 3);
    let dry = run_cli(dir.path(), &topic, &["dlq", "replay", &topics_arg, "--dry-run"]);
    let dry_text = String::from_utf8_lossy(&dry.stdout);
    assert_eq!(dry_text.lines().filter(|l| l.contains("would replay")).count(), parked.len(), "{dry_text}");
    assert_eq!(topic_count(&dlq, 3), parked.len() as i64);
    assert_eq!(topic_count(&topic, 3), commerce_before, "a dry run publishes nothing");
    assert_eq!(topic_count(&checkpoints, 3), 0, "a dry run checkpoints nothing");

    // A replay for a group nobody runs is refused: every consumer would skip it.
    let bogus = run_cli_unchecked(dir.path(), &topic, &["dlq", "replay", &topics_arg, "--for-group", "bogus"]);
    assert!(!bogus.status.success(), "a replay for an unknown group must fail");
    assert!(
        log(dir.path(), "cli").contains("no consumer group bogus"),
        "the error names the group\n{}",
        log(dir.path(), "cli")
    );
    assert_eq!(topic_count(&topic, 3), commerce_before, "nothing published for an unknown group");
    assert_eq!(topic_count(&checkpoints, 3), 0, "nothing checkpointed for an unknown group");

    // Fix one customer upstream, then replay everything.
    assert!(sf.sim.lock().unwrap().org.delete("Contact", &fixed_clash).unwrap());
    let out = run_cli(dir.path(), &topic, &["dlq", "replay", &topics_arg]);
    let summary: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(summary["replayed"], parked.len(), "{summary}");
    assert_eq!(topic_count(&topic, 3), commerce_before + parked.len() as i64, "each dead letter republished once");
    // Replayed by key: with the partitions unchanged, each lands where its original was.
    let replays: Vec<OwnedMessage> =
        read_all(&brokers(), &topic, 3).into_iter().filter(|r| header(r, "elo-replay-of").is_some()).collect();
    assert_eq!(replays.len(), parked.len());
    for r in &replays {
        let of = header(r, "elo-replay-of").unwrap();
        let letter = parked.iter().find(|p| format!("{dlq}/{}/{}", p.partition(), p.offset()) == of).unwrap();
        assert_eq!(
            header(letter, "elo-dlq-origin-partition").unwrap(),
            r.partition().to_string(),
            "{of} replayed on another partition"
        );
    }

    // The fixed customer's orders land; the other's records come back to the DLQ, once each.
    let landed = wait_until(Duration::from_secs(90), || sf_orders() == others + orders_of(&fixed_key)).await;
    assert!(
        landed,
        "{} orders in Salesforce, want {}\n{}",
        sf_orders(),
        others + orders_of(&fixed_key),
        log(dir.path(), "sink")
    );
    let returned =
        wait_until(Duration::from_secs(60), || topic_count(&dlq, 3) == (parked.len() + broken_letters.len()) as i64)
            .await;
    assert!(returned, "{} dead letters, want {}", topic_count(&dlq, 3), parked.len() + broken_letters.len());
    let again: Vec<OwnedMessage> =
        read_all(&brokers(), &dlq, 3).into_iter().filter(|r| header(r, "elo-replay-of").is_some()).collect();
    let again_of: BTreeSet<String> = again.iter().filter_map(|r| header(r, "elo-replay-of")).collect();
    assert_eq!(again_of, broken_letters, "exactly the unfixed records returned, each naming the letter it replays");
    assert!(
        again
            .iter()
            .all(|r| key_of(r) == broken_key
                && header(r, "elo-dlq-error-code").as_deref() == Some("DUPLICATES_DETECTED"))
    );
    assert!(
        again.iter().all(|r| header(r, "traceparent")
            == parked
                .iter()
                .find(|p| format!("{dlq}/{}/{}", p.partition(), p.offset()) == header(r, "elo-replay-of").unwrap())
                .and_then(|p| header(p, "traceparent"))),
        "the trace context travels with the replay"
    );
    // Nothing lost: every replayed letter either landed (fixed) or came back (broken).
    assert_eq!(fixed_letters + again.len(), parked.len());

    // The day's report: the replays are counted apart, not as new orders; the replays the sink
    // handled need nobody, the letters that came back do.
    let handled = wait_until(Duration::from_secs(30), || caught_up(&format!("{topic}.sf-group"))).await;
    assert!(handled, "the sink did not commit past the replays");
    let report = run_cli(dir.path(), &topic, &["report", &topics_arg, "--format", "json", "--out", "-"]);
    let report: Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(report["replayed_records"], parked.len(), "{report}");
    assert_eq!(report["needs_person"]["dead_letters"], broken_letters.len(), "{report}");
    assert!(
        report["needs_person"]["examples"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e.as_str().unwrap().contains(&broken_key)),
        "only the unfixed customer's letters need a person: {report}"
    );

    // The other consumer of the topic skipped every replay and committed past it.
    let skipped = wait_until(Duration::from_secs(60), || caught_up(&format!("{topic}.rc-group"))).await;
    assert!(skipped, "the reconciler did not commit past the replays\n{}", log(dir.path(), "reconciler"));
    let metrics = reqwest::get(format!("http://127.0.0.1:{rc_admin}/metrics")).await.unwrap().text().await.unwrap();
    assert_eq!(
        metric(&metrics, "elo_consumer_records_total", "outcome=\"skipped_replay\"") as usize,
        parked.len(),
        "the reconciler skips every replay meant for the sink"
    );
    assert_eq!(topic_count(&format!("{topic}.rc-dlq"), 3), 0, "and parks none of them");

    // A rerun for the fixed customer repeats nothing (the checkpoint remembers).
    let rerun = run_cli(dir.path(), &topic, &["dlq", "replay", &topics_arg, "--key", &fixed_key]);
    let rerun: Value = serde_json::from_str(String::from_utf8_lossy(&rerun.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(rerun["replayed"], 0);
    assert_eq!(rerun["already_replayed"], fixed_letters);
    assert_eq!(topic_count(&topic, 3), commerce_before + parked.len() as i64);
}
