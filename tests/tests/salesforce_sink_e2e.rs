//! salesforce-sink's acceptance on the real broker: Magento simulator → order-ingest (poll) →
//! `commerce.events` → salesforce-sink → Salesforce simulator, compared field by field with
//! Magento's data. Faults on the way: 5% UNABLE_TO_LOCK_ROW per write and 5% 503 per call,
//! every token revoked mid-run, the sink killed with SIGKILL and restarted, and one customer
//! whose e-mail another Contact already holds (the duplicate rule refuses it: its records go
//! to the DLQ with DUPLICATES_DETECTED while everything else flows).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use elo_events::{EventCodec, OutcomeStatus, RegistryConfig, SyncOutcome};
use elo_integration_tests::*;
use rdkafka::Message;
use sandbox::faults::FaultConfig;
use sandbox::salesforce::{SalesforceApp, SalesforceConfig};
use serde_json::{Value, json};

const ACTIVATING: &[&str] = &["processing", "complete", "closed"];

fn customer_key(order: &Value) -> String {
    elo_events::ids::customer_key(order["customer_id"].as_i64(), order["customer_email"].as_str().unwrap())
}

/// Sellable lines of a Magento order, independently: top-level lines and bundle children.
fn expected_items(order: &Value) -> BTreeSet<(String, String, String)> {
    let items = order["items"].as_array().unwrap();
    let kind = |id: &Value| items.iter().find(|i| &i["item_id"] == id).map(|i| i["product_type"].clone());
    items
        .iter()
        .filter(|i| i["parent_item_id"].is_null() || kind(&i["parent_item_id"]) == Some("bundle".into()))
        .map(|i| {
            (
                format!("oi:{}", i["item_id"]),
                format!("{:.4}", i["qty_ordered"].as_f64().unwrap()),
                format!("{:.4}", i["price"].as_f64().unwrap()),
            )
        })
        .collect()
}

/// Differences between what Magento holds and what Salesforce holds (empty when in step).
fn differences(magento: &[Value], sf: &SalesforceApp, excluded_key: &str, person: bool) -> Vec<String> {
    // Copy out under the lock, compare without it: the sink keeps writing meanwhile.
    let all: Vec<(String, String, Value)> = {
        let sim = sf.sim.lock().unwrap();
        sim.org.records.values().map(|r| (r.id.clone(), r.object.clone(), Value::Object(r.fields.clone()))).collect()
    };
    let records = |object: &str| -> Vec<(String, Value)> {
        all.iter().filter(|(_, o, _)| o == object).map(|(id, _, f)| (id.clone(), f.clone())).collect()
    };
    let (accounts, contacts, orders, items) =
        (records("Account"), records("Contact"), records("Order"), records("OrderItem"));
    let books: BTreeMap<String, String> = records("Pricebook2")
        .into_iter()
        .map(|(id, f)| (id, f["Name"].as_str().unwrap_or_default().to_owned()))
        .collect();
    let mut diffs = Vec::new();
    for (object, list) in [("Account", &accounts), ("Contact", &contacts), ("Order", &orders), ("OrderItem", &items)] {
        let ids: Vec<&str> = list.iter().filter_map(|(_, f)| f["Elo_Id__c"].as_str()).collect();
        let unique: BTreeSet<&str> = ids.iter().copied().collect();
        if unique.len() != ids.len() {
            diffs.push(format!("{object}: duplicate external ids"));
        }
    }
    let by_ext = |list: &[(String, Value)]| -> BTreeMap<String, (String, Value)> {
        list.iter()
            .filter_map(|(id, f)| f["Elo_Id__c"].as_str().map(|e| (e.to_owned(), (id.clone(), f.clone()))))
            .collect()
    };
    let (account_by_key, contact_by_key, order_by_ext) = (by_ext(&accounts), by_ext(&contacts), by_ext(&orders));
    let mut items_by_order: BTreeMap<String, BTreeSet<(String, String, String)>> = BTreeMap::new();
    for (_, f) in &items {
        items_by_order.entry(f["OrderId"].as_str().unwrap_or_default().to_owned()).or_default().insert((
            f["Elo_Id__c"].as_str().unwrap_or_default().to_owned(),
            format!("{:.4}", f["Quantity"].as_f64().unwrap_or(-1.0)),
            format!("{:.4}", f["UnitPrice"].as_f64().unwrap_or(-1.0)),
        ));
    }
    let expected_keys: BTreeSet<String> = magento.iter().map(customer_key).filter(|k| k != excluded_key).collect();
    let account_keys: BTreeSet<String> = account_by_key.keys().cloned().collect();
    if account_keys != expected_keys {
        diffs.push(format!("accounts: {} expected, {} present", expected_keys.len(), account_keys.len()));
    }
    let account_id_of = |key: &str| account_by_key.get(key).map(|(id, _)| id.clone());
    for order in magento {
        let key = customer_key(order);
        if key == excluded_key {
            continue;
        }
        let ext = format!("o:{}", order["entity_id"]);
        let Some((sf_id, sf_order)) = order_by_ext.get(&ext) else {
            diffs.push(format!("{ext}: missing"));
            continue;
        };
        let status = order["status"].as_str().unwrap();
        let want_status = if ACTIVATING.contains(&status) { "Activated" } else { "Draft" };
        let store = order["store_id"].as_i64().unwrap();
        let want_book = if store == 1 { "Elo Store default" } else { "Elo Store br" };
        let checks = [
            ("Name", sf_order["Name"].clone(), json!(order["increment_id"])),
            ("Magento_Status__c", sf_order["Magento_Status__c"].clone(), json!(status)),
            ("Status", sf_order["Status"].clone(), json!(want_status)),
            ("EffectiveDate", sf_order["EffectiveDate"].clone(), json!(&order["created_at"].as_str().unwrap()[..10])),
            ("AccountId", sf_order["AccountId"].clone(), json!(account_id_of(&key))),
            ("Pricebook2", json!(books.get(sf_order["Pricebook2Id"].as_str().unwrap_or_default())), json!(want_book)),
        ];
        for (field, got, want) in checks {
            if got != want {
                diffs.push(format!("{ext}.{field}: {got} != {want}"));
            }
        }
        let got_items = items_by_order.get(sf_id).cloned().unwrap_or_default();
        if got_items != expected_items(order) {
            diffs.push(format!("{ext}: items {got_items:?} != {:?}", expected_items(order)));
        }
        if person {
            // A person account carries the e-mail; its hidden Contact follows it.
            match account_by_key.get(&key) {
                Some((_, a)) if a["PersonEmail"] == order["customer_email"] && a["IsPersonAccount"] == true => {}
                other => diffs.push(format!("{ext}: person account of {key} wrong: {other:?}")),
            }
            continue;
        }
        // The contact carries the e-mail and hangs off the account.
        match contact_by_key.get(&key) {
            Some((_, c)) if c["Email"] == order["customer_email"] && c["AccountId"] == json!(account_id_of(&key)) => {}
            other => diffs.push(format!("{ext}: contact of {key} wrong: {other:?}")),
        }
    }
    diffs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_orders_reach_salesforce_exactly_through_faults_revocation_and_a_kill() {
    // A broker of its own: see `use_private_broker`.
    let (_broker, _broker_dir) = elo_integration_tests::use_private_broker();
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("sf.commerce");
    // The default, 3, runs about 1,500 orders through order-ingest's poll (make test's time
    // budget: the 5,000-order acceptance run is `many_orders_straight_from_the_topic`); scale 10
    // runs 5,195 orders (6,842 versions) in 142 s on the 2-core box.
    let scale: usize = std::env::var("ELO_SF_E2E_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let (magento, magento_url) = serve_magento(300 * scale).await;
    let (sf, sf_url, faults) = serve_salesforce(SalesforceConfig::default()).await;

    // A registered customer whose e-mail another Contact already holds.
    let (dup_key, dup_email) = {
        let sim = magento.sim.lock().unwrap();
        let order = sim.orders.values().find(|o| o["customer_id"].is_i64()).unwrap().clone();
        (customer_key(&order), order["customer_email"].as_str().unwrap().to_owned())
    };
    sf.sim
        .lock()
        .unwrap()
        .org
        .create("Contact", json!({"LastName": "Existing", "Email": dup_email}).as_object().unwrap().clone(), 0)
        .unwrap();
    sf.sim.lock().unwrap().config.lock_row_rate = 0.05;
    faults.set("salesforce", FaultConfig { error_rates: [(503, 0.05)].into(), ..Default::default() });

    let _ingest = ChildGuard::spawn(
        "order-ingest",
        order_ingest(dir.path(), &topic, &magento_url, "ingest").env("ELO_ORDER_INGEST_POLL_INTERVAL", "1s"),
    );
    let mut sink = ChildGuard::spawn("salesforce-sink", &mut salesforce_sink(dir.path(), &topic, &sf_url, "sink"));

    let order_count = || sf.sim.lock().unwrap().org.records.values().filter(|r| r.object == "Order").count();
    let started = wait_until(Duration::from_secs(120), || order_count() >= 30).await;
    assert!(started, "no orders reached Salesforce:\n{}\n{}", log(dir.path(), "sink"), log(dir.path(), "ingest"));

    // Mid-run: more orders and status changes, every token revoked, the sink killed and restarted.
    magento.sim.lock().unwrap().generate(300 * scale);
    sf.sim.lock().unwrap().revoke_all();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sink.signal("KILL");
    let _ = sink.wait_timeout(Duration::from_secs(10));
    // Let the group forget the dead member first: Tansu 0.6 strands a killed member's partitions
    // while another member is active (tansu_known_issues.rs).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let _sink = ChildGuard::spawn("salesforce-sink", &mut salesforce_sink(dir.path(), &topic, &sf_url, "sink2"));
    magento.sim.lock().unwrap().generate(100 * scale);

    let orders: Vec<Value> = magento.sim.lock().unwrap().orders.values().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs((150 + 20 * scale as u64).min(230));
    let mut diffs = differences(&orders, &sf, &dup_key, false);
    while !diffs.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
        diffs = differences(&orders, &sf, &dup_key, false);
        eprintln!("{} differences, {} API calls", diffs.len(), sf.sim.lock().unwrap().api_usage);
    }
    assert!(
        diffs.is_empty(),
        "{} differences, first: {:?}\n{}",
        diffs.len(),
        &diffs[..diffs.len().min(10)],
        log(dir.path(), "sink2")
    );
    let calls = sf.sim.lock().unwrap().api_usage;
    let versions: usize = orders.iter().map(|o| o["status_histories"].as_array().map_or(1, Vec::len)).sum();
    eprintln!(
        "{} orders ({versions} status versions at most) applied with {calls} Salesforce API calls ({:.1} per 1,000 orders)",
        orders.len(),
        calls as f64 * 1000.0 / orders.len() as f64
    );

    // The refused customer's records are parked with Salesforce's code, and reported.
    let parked = read_all(&brokers(), &format!("{topic}.sf-dlq"), 3);
    assert!(!parked.is_empty(), "the refused customer's records are in the DLQ");
    for letter in &parked {
        assert_eq!(letter.key(), Some(dup_key.as_bytes()), "only the refused customer is parked");
        assert_eq!(header(letter, "elo-dlq-error-class").as_deref(), Some("permanent"));
        assert_eq!(header(letter, "elo-dlq-error-code").as_deref(), Some("DUPLICATES_DETECTED"));
        assert!(!header(letter, "elo-dlq-error-message").unwrap_or_default().contains('@'));
    }
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let mut outcomes = Vec::new();
    for record in read_all(&brokers(), &format!("{topic}.outcomes"), 3) {
        assert_event_type(&record, SyncOutcome::EVENT_TYPE);
        assert_traceparent(&record);
        outcomes.push(codec.decode::<SyncOutcome>(record.payload().unwrap()).await.unwrap());
    }
    let applied: BTreeSet<String> = outcomes
        .iter()
        .filter(|o| o.status == OutcomeStatus::Applied && o.source_version.entity_type == "order")
        .map(|o| o.source_version.entity_id.clone())
        .collect();
    let expected: BTreeSet<String> =
        orders.iter().filter(|o| customer_key(o) != dup_key).map(|o| o["entity_id"].to_string()).collect();
    assert!(expected.is_subset(&applied), "every applied order is reported on the outcomes topic");
    assert!(
        outcomes.iter().any(|o| o.status == OutcomeStatus::DeadLettered
            && o.customer_key == dup_key
            && o.error_code.as_deref() == Some("DUPLICATES_DETECTED")),
        "the refused records are reported"
    );
    let without_ids = outcomes.iter().find(|o| {
        o.status == OutcomeStatus::Applied
            && !o.target_ids.contains_key(if o.source_version.entity_type == "order" { "Order" } else { "Account" })
    });
    assert!(without_ids.is_none(), "applied outcomes name the Salesforce ids: {without_ids:?}");
}

/// Person Accounts mode, and the daily quota running out mid-run: the sink waits (nothing
/// parked, nothing lost) and resumes by itself when budget returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn person_accounts_and_an_exhausted_quota_pause_and_resume() {
    // A broker of its own: see `use_private_broker`.
    let (_broker, _broker_dir) = elo_integration_tests::use_private_broker();
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("sf.person");
    let (magento, magento_url) = serve_magento(200).await;
    let (sf, sf_url, _faults) =
        serve_salesforce(SalesforceConfig { person_accounts: true, ..SalesforceConfig::default() }).await;
    let mapping = dir.path().join("mapping.json");
    std::fs::write(&mapping, r#"{"account_mode": "person"}"#).unwrap();
    let _ingest = ChildGuard::spawn(
        "order-ingest",
        order_ingest(dir.path(), &topic, &magento_url, "ingest").env("ELO_ORDER_INGEST_POLL_INTERVAL", "1s"),
    );
    let _sink = ChildGuard::spawn(
        "salesforce-sink",
        salesforce_sink(dir.path(), &topic, &sf_url, "sink")
            .env("ELO_SALESFORCE_MAPPING_FILE", &mapping)
            .env("ELO_SALESFORCE_QUOTA_PAUSE", "1s"),
    );
    let orders: Vec<Value> = magento.sim.lock().unwrap().orders.values().cloned().collect();
    let done = wait_until(Duration::from_secs(120), || differences(&orders, &sf, "", true).is_empty()).await;
    assert!(done, "{:?}\n{}", differences(&orders, &sf, "", true).first(), log(dir.path(), "sink"));

    // The quota runs out: new orders wait.
    let exhausted = {
        let mut sim = sf.sim.lock().unwrap();
        sim.config.daily_quota = sim.api_usage;
        sim.api_usage
    };
    magento.sim.lock().unwrap().generate_orders(50);
    let orders: Vec<Value> = magento.sim.lock().unwrap().orders.values().cloned().collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!differences(&orders, &sf, "", true).is_empty(), "nothing can be written without quota");
    let refused = sf.sim.lock().unwrap().api_usage;
    assert_eq!(refused, exhausted, "refused calls are not counted");
    // Budget returns (the rolling window moves on): the sink resumes by itself.
    sf.sim.lock().unwrap().config.daily_quota = 1_000_000;
    let done = wait_until(Duration::from_secs(60), || differences(&orders, &sf, "", true).is_empty()).await;
    assert!(done, "{:?}\n{}", differences(&orders, &sf, "", true).first(), log(dir.path(), "sink"));
    assert_eq!(topic_count(&format!("{topic}.sf-dlq"), 3), 0, "a quota wait parks nothing");
    let contacts = sf.sim.lock().unwrap().org.records.values().filter(|r| r.object == "Contact").count();
    let accounts = sf.sim.lock().unwrap().org.records.values().filter(|r| r.object == "Account").count();
    assert_eq!(contacts, accounts, "one hidden Contact per person account, none written by the sink");
}

/// Orders with a second version where Magento changed them, published straight to the topic
/// (order-ingest's own throughput is not what this measures), through the same faults plus a
/// token revocation and a `kill -9` of the sink mid-batch: Salesforce ends exactly in step, and
/// the run reports the calls it took. About 5,000 orders (6,700 facts; `ELO_SF_E2E_FACTS`
/// changes it). The backlog goes through Bulk API 2.0 (threshold lowered to 200 records per
/// batch), so the Bulk path meets the faults, the kill and the restart too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_orders_straight_from_the_topic() {
    many_orders(false).await;
}

/// The same in Person Accounts mode, with about 1,500 orders by default (make test's time
/// budget; `ELO_SF_E2E_PERSON_FACTS=6700` runs 5,000 in ~150 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_orders_as_person_accounts() {
    many_orders(true).await;
}

async fn many_orders(person: bool) {
    // A broker of its own: see `use_private_broker`.
    let (_broker, _broker_dir) = elo_integration_tests::use_private_broker();
    let (variable, default) = if person { ("ELO_SF_E2E_PERSON_FACTS", 2_000) } else { ("ELO_SF_E2E_FACTS", 6_700) };
    let facts: usize = std::env::var(variable).ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("sf.bulk");
    create_topics(&brokers(), &[(&topic, 3)]).await;
    let (magento, _) = serve_magento(facts * 6 / 10).await;
    let stores = order_ingest::normalize::Stores(
        [(1, ("default".to_owned(), 1)), (2, ("br".to_owned(), 1))].into_iter().collect(),
    );
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let producer = producer(&brokers());
    let mut published = BTreeSet::new();
    for round in 0..2 {
        if round == 1 {
            magento.sim.lock().unwrap().generate(facts * 4 / 10);
        }
        let orders: Vec<Value> = magento.sim.lock().unwrap().orders.values().cloned().collect();
        let mut records = Vec::new();
        for order in &orders {
            let version = (order["entity_id"].as_i64().unwrap(), order["updated_at"].as_str().unwrap().to_owned());
            if !published.insert(version) {
                continue;
            }
            let event = order_ingest::normalize::order_event(order, None, &stores, 0).unwrap();
            records.push((event.customer_key.clone(), codec.encode(&topic, &event).await.unwrap()));
        }
        produce(&producer, &topic, &records).await;
    }
    let orders: Vec<Value> = magento.sim.lock().unwrap().orders.values().cloned().collect();
    let (sf, sf_url, faults) =
        serve_salesforce(SalesforceConfig { person_accounts: person, ..SalesforceConfig::default() }).await;
    sf.sim.lock().unwrap().config.lock_row_rate = 0.05;
    faults.set("salesforce", FaultConfig { error_rates: [(503, 0.05)].into(), ..Default::default() });
    let mapping = dir.path().join("mapping.json");
    std::fs::write(&mapping, if person { r#"{"account_mode": "person"}"# } else { "{}" }).unwrap();
    let started = Instant::now();
    let sink = |log: &str| {
        let mut command = salesforce_sink(dir.path(), &topic, &sf_url, log);
        command
            .env("ELO_SALESFORCE_MAPPING_FILE", &mapping)
            .env("ELO_SALESFORCE_BULK_MIN_RECORDS", "200")
            .env("ELO_SALESFORCE_BULK_POLL", "100ms");
        ChildGuard::spawn("salesforce-sink", &mut command)
    };
    let mut first = sink("sink");
    let order_count = || sf.sim.lock().unwrap().org.records.values().filter(|r| r.object == "Order").count();
    let midway = wait_until(Duration::from_secs(240), || order_count() >= orders.len() / 4).await;
    assert!(midway, "a quarter of the orders never arrived:\n{}", log(dir.path(), "sink"));
    sf.sim.lock().unwrap().revoke_all();
    first.signal("KILL");
    let _ = first.wait_timeout(Duration::from_secs(10));
    // Tansu 0.6 strands a killed member's partitions while another member is active.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let _second = sink("sink2");
    let done = wait_until(Duration::from_secs(400), || differences(&orders, &sf, "", person).is_empty()).await;
    let diffs = differences(&orders, &sf, "", person);
    assert!(done, "{} differences, first {:?}\n{}", diffs.len(), diffs.first(), log(dir.path(), "sink2"));
    let (calls, jobs) = {
        let sim = sf.sim.lock().unwrap();
        (sim.api_usage, sim.jobs.len())
    };
    eprintln!(
        "{} mode: {} orders ({} versions) in {:.1}s with {calls} Salesforce API calls ({:.1} per 1,000 orders, faults, the kill and {jobs} Bulk jobs included)",
        if person { "person" } else { "business" },
        orders.len(),
        published.len(),
        started.elapsed().as_secs_f64(),
        calls as f64 * 1000.0 / orders.len() as f64
    );
    assert!(jobs > 0, "the backlog went through Bulk API 2.0");
    assert_eq!(topic_count(&format!("{topic}.sf-dlq"), 3), 0, "nothing parked");
}
