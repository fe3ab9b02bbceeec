//! The reconciler's ledger on the real broker: a check whose repair command is still on its
//! way when the partition is revoked and assigned again writes nothing over the new restore
//! (the stale write would reach the changelog the new owner restored from); sweep cursors
//! survive a restart and move only on the partitions a replica holds; a customer's contact
//! mark follows the sink's name-merge rule and goes with the erasure.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use elo_events::{EventCodec, IntegrationCommand, RegistryConfig};
use elo_integration_tests::*;
use elo_kafka::{KafkaArgs, Producer, StateStore};
use reconciler::ledger::Entry;
use reconciler::repair::{Policy, TargetSpec};
use reconciler::store::{CommandSink, Ledger};

/// A command sink whose sends wait for the test's go.
struct Gated {
    gate: Arc<tokio::sync::Semaphore>,
    waiting: Arc<AtomicUsize>,
}

impl CommandSink for Gated {
    async fn send(&self, _command: &IntegrationCommand) -> Result<(), String> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _go = self.gate.acquire().await.map_err(|e| e.to_string())?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_in_flight_writes_nothing_after_its_partition_was_released() {
    let topic = unique("e2e.ledger");
    let changelog = format!("{topic}.ledger");
    create_topics(&brokers(), &[(&changelog, 1)]).await;
    let kafka = KafkaArgs::local(brokers());
    let producer = Producer::new(&kafka, elo_telemetry::Health::new()).unwrap();
    let store = StateStore::<Entry>::new(&kafka, producer, changelog);
    let codec = Arc::new(EventCodec::new(&RegistryConfig::local(registry_url())).unwrap());
    let (gate, waiting) = (Arc::new(tokio::sync::Semaphore::new(0)), Arc::new(AtomicUsize::new(0)));
    let policy = Policy {
        targets: vec![TargetSpec {
            name: "salesforce".into(),
            sink: "salesforce-sink".into(),
            sla: Duration::from_secs(1),
        }],
        max_attempts: 3,
        backoff: Duration::from_secs(10),
        max_backoff: Duration::from_secs(10),
    };
    let ledger = Arc::new(Ledger::new(
        store,
        codec,
        Gated { gate: gate.clone(), waiting: waiting.clone() },
        policy,
        topic.clone(),
        Duration::from_secs(86_400),
        reconciler::status::channel().0,
    ));
    ledger.start(&topic, 0).await.unwrap();
    // One order, long overdue in Salesforce.
    let mut entry = Entry::default();
    entry.apply_event(&elo_events::sample::order_placed(1), 0);
    let key = entry.key();
    ledger.store.put(0, &key, entry).await.unwrap();

    let check = tokio::spawn({
        let ledger = ledger.clone();
        async move { ledger.check(10).await }
    });
    assert!(
        wait_until(Duration::from_secs(10), || waiting.load(Ordering::SeqCst) == 1).await,
        "the refetch is on its way"
    );

    // Revoked (on the poll thread) and assigned again while the command is in flight.
    let stopped = Instant::now();
    tokio::task::spawn_blocking({
        let (ledger, topic) = (ledger.clone(), topic.clone());
        move || ledger.stop(&topic, 0)
    })
    .await
    .unwrap();
    assert!(stopped.elapsed() < Duration::from_secs(5), "the revocation waited {:?} for a check", stopped.elapsed());
    let restart = tokio::spawn({
        let (ledger, topic) = (ledger.clone(), topic.clone());
        async move { ledger.start(&topic, 0).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    gate.add_permits(1);
    tokio::time::timeout(Duration::from_secs(30), check).await.expect("the check ends").unwrap();
    tokio::time::timeout(Duration::from_secs(30), restart).await.expect("the restore ends").unwrap().unwrap();

    // Nothing of the old check reached the new restore, in memory or in the changelog.
    let held = ledger.store.get(0, &key).expect("the entry");
    assert_eq!(held.repair, None, "a repair state written after the release");
    ledger.store.restore(0).unwrap();
    assert_eq!(ledger.store.get(0, &key).expect("the entry").repair, None, "in the changelog");
}

#[tokio::test]
async fn the_sweep_places_customers_on_the_topics_actual_partitions() {
    let topic = unique("e2e.parts");
    create_topics(&brokers(), &[(&topic, 3)]).await;
    let kafka = KafkaArgs::local(brokers());
    assert_eq!(
        reconciler::sweep::topic_partitions(&kafka, &topic, 6).await,
        3,
        "the topic's, not the configured count"
    );
}

/// A ledger on `changelog` that sends no commands.
fn plain_ledger(changelog: &str, topic: &str) -> Ledger<Gated> {
    let kafka = KafkaArgs::local(brokers());
    let producer = Producer::new(&kafka, elo_telemetry::Health::new()).unwrap();
    let gated = Gated { gate: Arc::new(tokio::sync::Semaphore::new(0)), waiting: Arc::default() };
    Ledger::new(
        StateStore::<Entry>::new(&kafka, producer, changelog),
        Arc::new(EventCodec::new(&RegistryConfig::local(registry_url())).unwrap()),
        gated,
        Policy {
            targets: vec![],
            max_attempts: 3,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(1),
        },
        topic.to_owned(),
        Duration::from_secs(86_400),
        reconciler::status::channel().0,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_salesforce_edit_cursor_survives_a_restart_and_follows_the_partitions() {
    use reconciler::cursor::{SALESFORCE_MODIFIED, get, set};
    let topic = unique("e2e.cursor");
    let changelog = format!("{topic}.ledger");
    create_topics(&brokers(), &[(&changelog, 2)]).await;
    let first = plain_ledger(&changelog, &topic);
    for p in [0, 1] {
        first.start(&topic, p).await.unwrap();
    }
    // A partition never swept counts as where a first pass starts (the `first` given).
    assert_eq!(get(&first, SALESFORCE_MODIFIED, 500), 500, "never swept");
    set(&first, &[0, 1], SALESFORCE_MODIFIED, 1_000).await.unwrap();
    set(&first, &[1], SALESFORCE_MODIFIED, 2_000).await.unwrap();
    assert_eq!(get(&first, SALESFORCE_MODIFIED, 5_000), 1_000, "the earliest of the held partitions");
    // Released meanwhile: not moved (the new owner moves it).
    tokio::task::block_in_place(|| first.stop(&topic, 0));
    set(&first, &[0, 1], SALESFORCE_MODIFIED, 3_000).await.unwrap();

    // A restarted replica resumes from the changelog, partition by partition.
    let second = plain_ledger(&changelog, &topic);
    second.start(&topic, 0).await.unwrap();
    assert_eq!(get(&second, SALESFORCE_MODIFIED, 5_000), 1_000, "partition 0 kept its cursor");
    second.start(&topic, 1).await.unwrap();
    assert_eq!(get(&second, SALESFORCE_MODIFIED, 5_000), 1_000);
    tokio::task::block_in_place(|| second.stop(&topic, 0));
    assert_eq!(get(&second, SALESFORCE_MODIFIED, 5_000), 3_000, "partition 1 alone");
}

/// `event` as the ledger's consumer would read it from `topic`.
async fn record(codec: &EventCodec, topic: &str, offset: i64, event: &elo_events::CommerceEvent) -> elo_kafka::Record {
    elo_kafka::Record {
        topic: topic.to_owned(),
        partition: 0,
        offset,
        key: Some(event.customer_key.as_bytes().to_vec()),
        payload: Some(codec.encode(topic, event).await.unwrap()),
        headers: Vec::new(),
        timestamp_ms: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contact_mark_follows_the_customers_blocks_and_goes_with_the_erasure() {
    use reconciler::contact::{Listed, contact_key};
    let topic = unique("e2e.contact");
    let changelog = format!("{topic}.ledger");
    create_topics(&brokers(), &[(&changelog, 1)]).await;
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let ledger = plain_ledger(&changelog, &topic);
    ledger.start(&topic, 0).await.unwrap();
    // Two orders of one customer; the later one without a last name (the sink keeps "Lima").
    let mut first = elo_events::sample::order_placed(1);
    let c = first.customer.as_mut().unwrap();
    (c.firstname, c.lastname) = (Some("Ana".into()), Some("Lima".into()));
    let mut second = elo_events::sample::order_placed(1);
    second.source_version.entity_id = "77".into();
    second.source_version.updated_at += 1_000;
    second.order.as_mut().unwrap().entity_id = 77;
    second.customer.as_mut().unwrap().lastname = None;
    let email = first.customer.as_ref().unwrap().email.clone();
    let batch = [record(&codec, &topic, 0, &first).await, record(&codec, &topic, 1, &second).await];
    assert!(ledger.handle(&batch).await.iter().all(Result::is_ok));
    let key = contact_key(&first.customer_key);
    let mark = ledger.store.get(0, &key).expect("a contact mark");
    let print = mark.contact.expect("its print");
    assert_eq!(print.key, "order:77", "the entry that brought the newest block");
    assert!(print.matches(&Listed::of(&email, "Ana Lima")), "what the sink writes");
    assert!(!print.matches(&Listed::of(&email, "Ana")));

    // The erasure takes the mark with the customer's entries; the restore agrees.
    let mut erased = second.clone();
    erased.event_type = elo_events::CommerceEventType::CustomerErased;
    erased.source_version.updated_at += 1_000;
    assert!(ledger.handle(&[record(&codec, &topic, 2, &erased).await]).await.iter().all(Result::is_ok));
    assert!(ledger.store.get(0, &key).is_none(), "no fingerprint of an erased person is kept");
    ledger.store.restore(0).unwrap();
    assert!(ledger.store.get(0, &key).is_none(), "nor in the changelog");
    assert!(ledger.store.get(0, "order:77").is_none());
}
