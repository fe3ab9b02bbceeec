//! The poll path on the real broker: every order of the store reaches `commerce.events`, and a
//! `kill -9` in the middle of a poll loses nothing: the restarted process resumes from the
//! checkpoint in the compacted topic (republishing at most the unconfirmed tail, same ids).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use elo_events::{CommerceEvent, EventCodec, RegistryConfig};
use elo_integration_tests::*;
use rdkafka::Message;
use sandbox::Counters;
use sandbox::faults::Faults;
use sandbox::magento::{MagentoApp, MagentoConfig};

fn binary(name: &str) -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug").join(name)
}

fn start_ingest(dir: &Path, topic: &str, magento_url: &str, name: &str) -> ChildGuard {
    ChildGuard::spawn(
        "order-ingest",
        Command::new(binary("order-ingest"))
            .env("ELO_KAFKA_BROKERS", brokers())
            .env("ELO_REGISTRY_URL", registry_url())
            .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("ELO_ORDER_INGEST_LISTEN", format!("127.0.0.1:{}", free_port()))
            .env("ELO_MAGENTO_URL", magento_url)
            .env("ELO_MAGENTO_STORES", "1=default:1,2=br:1")
            .env("ELO_ORDER_INGEST_POLL_INTERVAL", "1s")
            .env("ELO_ORDER_INGEST_POLL_PAGE_SIZE", "50")
            .env("ELO_TOPIC_COMMERCE", topic)
            .env("ELO_TOPIC_INVENTORY", format!("{topic}.inventory"))
            .env("ELO_TOPIC_OUTCOMES", format!("{topic}.outcomes"))
            .env("ELO_TOPIC_COMMANDS", format!("{topic}.commands"))
            .env("ELO_ORDER_INGEST_CHECKPOINT_TOPIC", format!("{topic}.checkpoints"))
            .env("ELO_ORDER_INGEST_DLQ_TOPIC", format!("{topic}.dlq"))
            .env("ELO_TOPIC_PARTITIONS", "3")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap()),
    )
}

fn published_count(topic: &str) -> i64 {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers()).create().unwrap();
    (0..3).map(|p| consumer.fetch_watermarks(topic, p, Duration::from_secs(5)).map(|(l, h)| h - l).unwrap_or(0)).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_survives_kill_9_and_loses_no_order() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("poll.commerce");
    let magento = MagentoApp::new(MagentoConfig::default(), Default::default(), Faults::default(), Counters::default());
    magento.sim.lock().unwrap().generate(1500);
    let expected: BTreeSet<i64> = magento.sim.lock().unwrap().orders.keys().copied().collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let magento_url = format!("http://{}", listener.local_addr().unwrap());
    let router = magento.clone().router();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

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
    let done = wait_until(Duration::from_secs(120), || published_count(&topic) >= all.len() as i64).await;
    assert!(
        done,
        "restart did not finish:\n{}",
        std::fs::read_to_string(dir.path().join("second.log")).unwrap_or_default()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let records = read_all(&brokers(), &topic, 3);
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let mut seen = BTreeSet::new();
    let mut ids_per_version = std::collections::BTreeMap::<(i64, i64), BTreeSet<String>>::new();
    for r in &records {
        let e: CommerceEvent = codec.decode(r.payload().unwrap()).await.unwrap();
        assert_eq!(r.key(), Some(e.customer_key.as_bytes()));
        let id = e.order.as_ref().unwrap().entity_id;
        seen.insert(id);
        ids_per_version.entry((id, e.source_version.updated_at)).or_default().insert(e.event_id);
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
