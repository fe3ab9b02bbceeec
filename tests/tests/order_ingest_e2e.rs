//! order-ingest's acceptance on the real broker, read back by an independent consumer.
//!
//! The sandbox generates orders (returning customers, guests, configurable and bundle items,
//! two store views, status changes). The first batch is placed before any webhook exists, so
//! only the poll can find it; the second is pushed (signed, CloudEvents and plain styles,
//! duplicates included) while the poll also runs. Then a customer edits their account, another
//! is deleted, and the reconciler's repair path asks for a refetch.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use elo_events::{
    CommandType, CommerceEvent, CommerceEventType, ConsentStatus, Decimal4, EventCodec, IntegrationCommand,
    InventoryEvent, InventoryEventType, InventoryStatus, RegistryConfig,
};
use elo_integration_tests::*;
use rdkafka::Message;
use rdkafka::producer::FutureRecord;
use sandbox::magento::webhook::{WebhookConfig, WebhookStyle};
use serde_json::Value;

const SECRET: &str = "e2e-webhook-secret-0123456789";

fn magento_time(text: &str) -> i64 {
    order_ingest::normalize::parse_magento_time(text).expect("Magento timestamp")
}

/// `(entity_id, updated_at ms)` from a sandbox notification id (`order-<id>-<updated_at>`).
fn notified_version(id: &str) -> Option<(i64, i64)> {
    let rest = id.strip_prefix("order-")?;
    let (entity, at) = rest.split_once('-')?;
    Some((entity.parse().ok()?, magento_time(at)))
}

/// Independent reading of a Magento order: sellable lines are top-level lines plus bundle
/// children (a configurable's child repeats its parent and is not sold twice).
fn expected_lines(order: &Value) -> (usize, Decimal4) {
    let items = order["items"].as_array().unwrap();
    let kind_of = |id: &Value| items.iter().find(|i| &i["item_id"] == id).map(|i| i["product_type"].clone());
    let sellable = items
        .iter()
        .filter(|i| i["parent_item_id"].is_null() || kind_of(&i["parent_item_id"]) == Some("bundle".into()))
        .count();
    let qty = items
        .iter()
        .filter(|i| i["parent_item_id"].is_null())
        .map(|i| Decimal4::parse(&i["qty_ordered"].to_string()).unwrap())
        .fold(Decimal4::ZERO, |a, b| a.checked_add(b).unwrap());
    (sellable, qty)
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_source_fact_reaches_the_topics_by_push_poll_and_repair() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let topic = unique("e2e.commerce");
    // Batch 1: placed before webhooks exist, so only the poll can find these.
    let (magento, magento_url) = serve_magento(150).await;
    // One of them is broken in Magento (a final state, so no later version will be notified): the
    // poll must park it in the DLQ and carry on.
    let broken = {
        let mut sim = magento.sim.lock().unwrap();
        let (id, order) = sim
            .orders
            .iter_mut()
            .find(|(_, o)| o["state"] == "canceled" || o["state"] == "closed")
            .expect("some order reached a final state");
        order["grand_total"] = Value::String("lots".into());
        *id
    };
    let (listen, admin) = (free_port(), free_port());
    let mut ingest = ChildGuard::spawn(
        "order-ingest",
        order_ingest(dir.path(), &topic, &magento_url, "ingest")
            .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("ELO_ORDER_INGEST_LISTEN", format!("127.0.0.1:{listen}"))
            .env("ELO_ORDER_INGEST_WEBHOOK_SECRET_FILE", &secret_file)
            .env("ELO_ORDER_INGEST_POLL_INTERVAL", "2s"),
    );
    let up = wait_until(Duration::from_secs(60), || std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok()).await;
    assert!(up, "push endpoint never listened:\n{}", log(dir.path(), "ingest"));

    // Batch 2: pushed, half CloudEvents (partial, refetched) and half plain, with duplicates.
    let hooks = |style| WebhookConfig {
        url: Some(format!("http://127.0.0.1:{listen}/webhooks/magento/orders")),
        customer_url: Some(format!("http://127.0.0.1:{listen}/webhooks/magento/customers")),
        secret: SECRET.into(),
        duplicate_rate: 0.3,
        style,
        ..Default::default()
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sandbox::magento::webhook::dispatch(magento.clone(), shutdown.clone()));
    let mut pushed_versions = BTreeSet::new();
    for style in [WebhookStyle::CloudEvents, WebhookStyle::Plain] {
        {
            let mut sim = magento.sim.lock().unwrap();
            sim.webhook = hooks(style);
            sim.generate(100);
            // Every version a plain notification carries is a source fact that must be published. A
            // CloudEvents notification is partial: its refetch returns the order as it is by then,
            // so an intermediate version may be superseded (its current version is checked below).
            let carries_the_order =
                |body: &[u8]| serde_json::from_slice::<Value>(body).is_ok_and(|v| v["order"]["items"].is_array());
            pushed_versions.extend(
                sim.outbox.queue.iter().filter(|n| carries_the_order(&n.body)).filter_map(|n| notified_version(&n.id)),
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // A customer edits their account (consent flips); another is deleted in Magento.
    let (edited, edited_consent) = {
        let mut sim = magento.sim.lock().unwrap();
        let customer = sim.customers.get_mut(&2).expect("customer 2");
        customer.subscribed = !customer.subscribed;
        customer.updated_ms += 60_000;
        let (json, subscribed) = (customer.to_json(), customer.subscribed);
        sim.notify_customer(&json, false);
        (json, subscribed)
    };
    // Magento's own REST API, as an admin would use it.
    let http = reqwest::Client::new();
    let token: Value = http
        .post(format!("{magento_url}/rest/V1/integration/admin/token"))
        .json(&serde_json::json!({"username": "admin", "password": "elo-sandbox-admin1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let customer_3 = format!("{magento_url}/rest/V1/customers/3");
    let as_admin = |request: reqwest::RequestBuilder| request.bearer_auth(token.as_str().unwrap()).send();
    let deleted: Value = as_admin(http.get(&customer_3)).await.unwrap().json().await.unwrap();
    let answer = as_admin(http.delete(&customer_3)).await.unwrap();
    assert_eq!(answer.status(), 200);

    let erased_email = deleted["email"].as_str().unwrap().to_lowercase();
    let of_erased = |o: &Value| {
        o["customer_id"] == 3 || o["customer_email"].as_str().is_some_and(|e| e.to_lowercase() == erased_email)
    };
    // Everything current in Magento must reach the topic.
    let (orders, customers): (BTreeMap<i64, Value>, BTreeMap<i64, Value>) = {
        let sim = magento.sim.lock().unwrap();
        (sim.orders.clone().into_iter().collect(), sim.customers.iter().map(|(id, c)| (*id, c.to_json())).collect())
    };
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let mut events: Vec<(Vec<u8>, CommerceEvent)> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(150);
    let mut progress;
    loop {
        let drained = magento.sim.lock().unwrap().outbox.queue.is_empty();
        if drained && topic_count(&topic, 3) >= (orders.len() + customers.len()) as i64 {
            events.clear();
            for record in read_all(&brokers(), &topic, 3) {
                events.push((record.key().unwrap().to_vec(), codec.decode(record.payload().unwrap()).await.unwrap()));
            }
            let versions: BTreeSet<(i64, i64)> = events
                .iter()
                .filter_map(|(_, e)| e.order.as_ref().map(|o| (o.entity_id, e.source_version.updated_at)))
                .collect();
            // Customer 3 was erased: their orders not published by then must never be.
            let current = orders
                .iter()
                .filter(|(id, o)| **id != broken && !of_erased(o))
                .all(|(id, o)| versions.contains(&(*id, magento_time(o["updated_at"].as_str().unwrap()))));
            let erased = events.iter().any(|(_, e)| e.event_type == CommerceEventType::CustomerErased);
            let unpushed = pushed_versions.difference(&versions).count();
            progress = format!(
                "{} events, current versions all in: {current}, pushed versions missing: {unpushed}, erased: {erased}",
                events.len()
            );
            if current && unpushed == 0 && erased {
                break;
            }
        } else {
            progress = format!("outbox drained: {drained}, {} records", topic_count(&topic, 3));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not every fact arrived ({progress}):\n{}",
            log(dir.path(), "ingest")
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // Orders: keyed by customer, every version once by id, totals and lines as Magento says.
    // A version is its content: two status changes within one second are two versions.
    let mut ids_per_version: BTreeMap<(i64, i64, String), BTreeSet<String>> = BTreeMap::new();
    let mut stores_seen = BTreeSet::new();
    let (mut guests, mut registered) = (0, 0);
    for (key, event) in &events {
        assert_eq!(key, event.customer_key.as_bytes(), "keyed by customer");
        let Some(order) = &event.order else { continue };
        ids_per_version
            .entry((order.entity_id, event.source_version.updated_at, order.status.clone()))
            .or_default()
            .insert(event.event_id.clone());
        assert_ne!(order.inventory_status, InventoryStatus::Unchecked, "every order was checked against stock");
        let customer = event.customer.as_ref().unwrap();
        let source = &orders[&order.entity_id];
        let expected_key = match source["customer_id"].as_i64() {
            Some(id) if source["customer_is_guest"] == 0 => {
                registered += 1;
                format!("c:{id}")
            }
            _ => {
                guests += 1;
                format!("g:{}", sha256_hex(&source["customer_email"].as_str().unwrap().to_lowercase()))
            }
        };
        assert_eq!(event.customer_key, expected_key);
        stores_seen.insert((event.store.store_id, event.store.store_code.clone()));
        assert_eq!(customer.is_guest, expected_key.starts_with("g:"));
        if source["updated_at"].as_str().map(magento_time) == Some(event.source_version.updated_at) {
            assert_eq!(order.totals.grand_total, Decimal4::parse(&source["grand_total"].to_string()).unwrap());
            assert_eq!(order.status, source["status"].as_str().unwrap());
            let (lines, qty) = expected_lines(source);
            assert_eq!((order.items.len(), order.totals.total_qty_ordered), (lines, qty), "order {}", order.entity_id);
        }
    }
    assert!(ids_per_version.values().all(|ids| ids.len() == 1), "redelivered facts carry the same event_id");
    assert!(!ids_per_version.keys().any(|(id, _, _)| *id == broken), "the broken order was not published");
    let parked = read_all(&brokers(), &format!("{topic}.dlq"), 3);
    let letter =
        parked.iter().find(|r| r.key() == Some(broken.to_string().as_bytes())).expect("the broken order is in the DLQ");
    assert_eq!(header(letter, "elo-dlq-error-class").as_deref(), Some("permanent"));
    assert_eq!(header(letter, "elo-dlq-error-code").as_deref(), Some("invalid_payload"));
    assert_eq!(header(letter, "elo-dlq-origin-source").as_deref(), Some("magento-poll/orders"));
    assert_traceparent(letter);
    assert!(header(letter, "elo-dlq-error-message").unwrap().contains("grand_total"));
    let kept: Value = serde_json::from_slice(letter.payload().unwrap()).unwrap();
    assert_eq!(kept["fields"]["grand_total"], "lots", "the field in question, as Magento sent it");
    assert!(kept.get("customer_email").is_none(), "not a copy of the person");
    assert_eq!(parked.len(), 1, "reported once");
    let order_events = events.iter().filter(|(_, e)| e.order.is_some()).count();
    assert!(order_events > ids_per_version.len(), "duplicates were delivered and kept their ids");
    assert!(guests > 0 && registered > 0, "guests and registered customers");
    let kinds: BTreeSet<&str> = orders
        .values()
        .flat_map(|o| o["items"].as_array().unwrap().iter().filter_map(|i| i["product_type"].as_str()))
        .collect();
    assert!(kinds.contains("configurable") && kinds.contains("bundle"), "configurable and bundle items were sold");
    assert_eq!(
        stores_seen,
        BTreeSet::from([(1, Some("default".to_owned())), (2, Some("br".to_owned()))]),
        "both store views, named"
    );
    let changed =
        ids_per_version.keys().filter(|(id, at, _)| magento_time(orders[id]["created_at"].as_str().unwrap()) != *at);
    assert!(changed.count() > 0, "status changes were published as new versions");
    let batch_one: BTreeSet<i64> = (1..=40).filter(|id| *id != broken && !of_erased(&orders[id])).collect();
    assert!(
        batch_one.iter().all(|id| ids_per_version.keys().any(|(o, _, _)| o == id)),
        "the poll found the unpushed batch"
    );

    // Customers: the edit carries the new consent; the deletion erases both keys, hash only.
    let edit = events
        .iter()
        .map(|(_, e)| e)
        .find(|e| {
            e.event_type == CommerceEventType::CustomerChanged
                && e.customer_key == "c:2"
                && e.source_version.updated_at == magento_time(edited["updated_at"].as_str().unwrap())
        })
        .expect("the customer edit was published");
    let consent = &edit.customer.as_ref().unwrap().consent;
    assert_eq!(consent.status, if edited_consent { ConsentStatus::Granted } else { ConsentStatus::Declined });
    assert!(customers.keys().all(|id| events.iter().any(|(_, e)| e.customer_key == format!("c:{id}"))));
    let email = deleted["email"].as_str().unwrap().to_lowercase();
    let erasures: BTreeSet<String> = events
        .iter()
        .filter(|(_, e)| e.event_type == CommerceEventType::CustomerErased)
        .map(|(_, e)| {
            let erasure = e.erasure.as_ref().unwrap();
            assert_eq!(
                (erasure.email_sha256.as_str(), erasure.reason.as_str()),
                (sha256_hex(&email).as_str(), "customer_deleted")
            );
            assert!(e.customer.is_none(), "an erasure does not republish the person");
            e.customer_key.clone()
        })
        .collect();
    assert_eq!(erasures, BTreeSet::from(["c:3".to_owned(), format!("g:{}", sha256_hex(&email))]));
    // Erasure sticks: on each erased key, nothing of the person follows the erasure (the poll's
    // overlap and later rounds run on after it).
    for key in &erasures {
        let on_key: Vec<&CommerceEvent> = events.iter().filter(|(k, _)| k == key.as_bytes()).map(|(_, e)| e).collect();
        let at = on_key.iter().position(|e| e.event_type == CommerceEventType::CustomerErased).unwrap();
        assert!(
            on_key[at..].iter().all(|e| e.order.is_none() && e.customer.is_none()),
            "{key} republished after its erasure"
        );
    }

    // Stock facts: keyed by SKU, classified by the salable quantity.
    let mut stock = Vec::new();
    for record in read_all(&brokers(), &format!("{topic}.inventory"), 3) {
        let event: InventoryEvent = codec.decode(record.payload().unwrap()).await.unwrap();
        assert_eq!(record.key(), Some(event.sku.as_bytes()), "keyed by SKU");
        assert_event_type(&record, event.event_type.as_str());
        let expected = if event.salable_qty < Decimal4::ZERO {
            InventoryEventType::Oversold
        } else if event.salable_qty <= Decimal4::from_units(5) {
            InventoryEventType::LowStock
        } else {
            InventoryEventType::StockLevel
        };
        assert_eq!(event.event_type, expected, "{event:?}");
        stock.push(event);
    }
    assert!(!stock.is_empty(), "inventory checks published stock facts");
    let oversold_orders = events
        .iter()
        .filter(|(_, e)| e.order.as_ref().is_some_and(|o| o.inventory_status == InventoryStatus::Oversold))
        .count();
    let oversold_facts = stock.iter().filter(|e| e.event_type == InventoryEventType::Oversold).count();
    assert_eq!(oversold_orders > 0, oversold_facts > 0, "orders are flagged oversold when their SKUs are");

    // Repair: a REFETCH_ORDER command republishes the current version with its id.
    let target = &orders[&5];
    let version =
        (5, magento_time(target["updated_at"].as_str().unwrap()), target["status"].as_str().unwrap().to_owned());
    let original_id = ids_per_version[&version].iter().next().unwrap().clone();
    let copies_of_version = || -> Vec<String> {
        read_all(&brokers(), &topic, 3)
            .iter()
            .filter_map(|r| {
                let (_, body) = elo_events::codec::unframe(r.payload()?).ok()?;
                let event: CommerceEvent = elo_events::codec::decode_direct(body).ok()?;
                let is_version = event.order.as_ref().is_some_and(|o| o.entity_id == 5)
                    && event.source_version.updated_at == version.1
                    && event.order.as_ref().is_some_and(|o| o.status == version.2);
                is_version.then_some(event.event_id)
            })
            .collect()
    };
    // Push and poll both publish a version; wait for the count to settle before asking.
    let mut before = copies_of_version().len();
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = copies_of_version().len();
        if now == before {
            break;
        }
        before = now;
    }
    let command = IntegrationCommand {
        command_id: "e2e-refetch-5".into(),
        command_type: CommandType::RefetchOrder,
        target_service: "order-ingest".into(),
        customer_key: events
            .iter()
            .find(|(_, e)| e.order.as_ref().is_some_and(|o| o.entity_id == 5))
            .unwrap()
            .1
            .customer_key
            .clone(),
        entity_id: "5".into(),
        store_id: None,
        reason: "drift".into(),
        requested_by: "e2e".into(),
        requested_at: 0,
    };
    let commands = format!("{topic}.commands");
    let payload = codec.encode(&commands, &command).await.unwrap();
    producer(&brokers())
        .send(FutureRecord::to(&commands).key(&command.customer_key).payload(&payload), Duration::from_secs(10))
        .await
        .unwrap();
    let mut copies = Vec::new();
    let arrived = wait_until(Duration::from_secs(90), || {
        copies = copies_of_version();
        copies.len() > before
    })
    .await;
    assert!(
        arrived,
        "the refetch command was not executed:
{}",
        log(dir.path(), "ingest")
    );
    assert!(copies.iter().all(|id| *id == original_id), "a repair republishes the same fact with the same id");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(copies_of_version().len(), before + 1, "exactly one republication for one command");

    // The issue's metrics, as Prometheus scrapes them.
    let metrics = reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await.unwrap().text().await.unwrap();
    let sample = |name: &str, labels: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains(labels))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name}{{{labels}}} is not exported:\n{metrics}"))
    };
    assert!(sample("order_ingest_notifications_total", r#"outcome="published""#) > 0.0);
    assert!(sample("order_ingest_publish_latency_seconds_count", "") > 0.0);
    assert!(sample("order_ingest_poll_lag_seconds", r#"entity="orders",store="default""#) >= 0.0);
    assert!(sample("order_ingest_poll_lag_seconds", r#"entity="customers",store="br""#) >= 0.0);
    assert!(sample("order_ingest_inventory_checks_total", r#"outcome="fetched""#) > 0.0);
    assert!(sample("order_ingest_magento_errors_total", r#"class="unavailable""#) >= 0.0);
    assert_eq!(sample("order_ingest_commands_total", r#"outcome="executed""#), 1.0);

    shutdown.cancel();
    ingest.signal("TERM");
    assert!(ingest.wait_timeout(Duration::from_secs(30)).expect("stops on SIGTERM").success());
}

/// `order-ingest backfill --from <date>` republishes every order and customer changed since the
/// date, through the same enrichment, and exits 0 with a summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backfill_command_republishes_everything_changed_since_a_date() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("backfill.commerce");
    let (magento, magento_url) = serve_magento(400).await;
    let (orders, customers) = {
        let sim = magento.sim.lock().unwrap();
        let orders: Vec<Value> = sim.orders.values().cloned().collect();
        (orders, sim.customers.values().map(|c| c.to_json()).collect::<Vec<_>>())
    };
    // From the 100th order's last change: the first part of the history stays out.
    let mut changes: Vec<i64> = orders.iter().map(|o| magento_time(o["updated_at"].as_str().unwrap())).collect();
    changes.sort_unstable();
    let from_ms = changes[100];
    let from = order_ingest::normalize::format_magento_time(from_ms).replace(' ', "T") + "Z";
    let mut backfill = ChildGuard::spawn(
        "order-ingest backfill",
        order_ingest(dir.path(), &topic, &magento_url, "backfill")
            .env("ELO_ORDER_INGEST_POLL_PAGE_SIZE", "40")
            .args(["backfill", "--from", &from]),
    );
    let status = backfill.wait_timeout(Duration::from_secs(180)).expect("the backfill finishes");
    let log = log(dir.path(), "backfill");
    assert!(status.success(), "backfill failed:\n{log}");
    let summary = log.lines().find(|l| l.starts_with("backfill: ")).unwrap_or_else(|| panic!("no summary:\n{log}"));

    let expected_orders: BTreeSet<(i64, i64)> = orders
        .iter()
        .map(|o| (o["entity_id"].as_i64().unwrap(), magento_time(o["updated_at"].as_str().unwrap())))
        .filter(|(_, at)| *at >= from_ms)
        .collect();
    let expected_customers: BTreeSet<i64> = customers
        .iter()
        .filter(|c| magento_time(c["updated_at"].as_str().unwrap()) >= from_ms)
        .map(|c| c["id"].as_i64().unwrap())
        .collect();
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    let (mut got_orders, mut got_customers) = (BTreeSet::new(), BTreeSet::new());
    for record in read_all(&brokers(), &topic, 3) {
        let event: CommerceEvent = codec.decode(record.payload().unwrap()).await.unwrap();
        assert!(event.source_version.updated_at >= from_ms, "nothing before the date");
        match &event.order {
            Some(order) => {
                assert_ne!(order.inventory_status, InventoryStatus::Unchecked, "enriched like the live path");
                got_orders.insert((order.entity_id, event.source_version.updated_at));
            }
            None => {
                got_customers.insert(event.customer.unwrap().customer_id.unwrap());
            }
        }
    }
    assert!(expected_orders.len() > 100 && !expected_customers.is_empty());
    assert_eq!(got_orders, expected_orders, "every order changed since the date, once");
    assert_eq!(got_customers, expected_customers, "every customer changed since the date");
    let published: usize = summary["backfill: ".len()..].split(' ').next().unwrap().parse().unwrap();
    assert_eq!(published, expected_orders.len() + expected_customers.len(), "{summary}");
}
