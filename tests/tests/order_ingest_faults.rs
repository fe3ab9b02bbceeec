//! order-ingest under faults, on real brokers: a `kill -9` in the middle of a webhook burst
//! loses no order (Magento retries what was never acknowledged), and refusals of every kind,
//! including a broker outage, publish nothing while the service stays up.

use std::collections::BTreeSet;
use std::time::Duration;

use elo_events::CommerceEvent;
use elo_integration_tests::*;
use rdkafka::Message;
use sandbox::magento::webhook::{SIGNATURE_HEADER, WebhookConfig, WebhookStyle, sign};
use serde_json::{Value, json};

const SECRET: &str = "faults-webhook-secret-0123456789";

/// (entity_id, updated_at) of every order event on `topic` at `brokers`, as (version, event id).
fn order_versions(brokers: &str, topic: &str) -> Vec<((i64, i64), String)> {
    read_all(brokers, topic, 3)
        .iter()
        .filter_map(|r| {
            let (_, body) = elo_events::codec::unframe(r.payload()?).ok()?;
            let event: CommerceEvent = elo_events::codec::decode_direct(body).ok()?;
            let order = event.order?;
            Some(((order.entity_id, event.source_version.updated_at), event.event_id))
        })
        .collect()
}

fn magento_version(order: &Value) -> (i64, i64) {
    let at = order_ingest::normalize::parse_magento_time(order["updated_at"].as_str().unwrap()).unwrap();
    (order["entity_id"].as_i64().unwrap(), at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_push_burst_loses_no_order() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let topic = unique("burst.commerce");
    let (magento, magento_url) = serve_magento(0).await;
    let listen = free_port();
    // Push only (no poll), so nothing but Magento's retries can make up for the crash.
    let start = |log: &str| {
        ChildGuard::spawn(
            "order-ingest",
            order_ingest(dir.path(), &topic, &magento_url, log)
                .env("ELO_ORDER_INGEST_LISTEN", format!("127.0.0.1:{listen}"))
                .env("ELO_ORDER_INGEST_WEBHOOK_SECRET_FILE", &secret_file),
        )
    };
    let mut first = start("first");
    let up = wait_until(Duration::from_secs(60), || std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok()).await;
    assert!(up, "push endpoint never listened:\n{}", log(dir.path(), "first"));

    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sandbox::magento::webhook::dispatch(magento.clone(), shutdown.clone()));
    let notified: BTreeSet<(i64, i64)> = {
        let mut sim = magento.sim.lock().unwrap();
        sim.webhook = WebhookConfig {
            url: Some(format!("http://127.0.0.1:{listen}/webhooks/magento/orders")),
            customer_url: None,
            secret: SECRET.into(),
            duplicate_rate: 0.05,
            style: WebhookStyle::Plain,
            // Magento retries with backoff; a short cap keeps the test quick.
            max_backoff_ms: 2_000,
        };
        sim.generate(800);
        sim.outbox
            .queue
            .iter()
            .map(|n| magento_version(&serde_json::from_slice::<Value>(&n.body).unwrap()["order"]))
            .collect()
    };
    let burst_started =
        wait_until(Duration::from_secs(60), || magento.sim.lock().unwrap().outbox.delivered >= 100).await;
    assert!(burst_started, "the burst never got going:\n{}", log(dir.path(), "first"));
    first.signal("KILL");
    first.wait_timeout(Duration::from_secs(5)).expect("killed");
    let (delivered_at_kill, left_at_kill) = {
        let sim = magento.sim.lock().unwrap();
        (sim.outbox.delivered, sim.outbox.queue.len())
    };
    assert!(left_at_kill > 0, "the kill must land mid-burst ({delivered_at_kill} delivered)");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut second = start("second");
    let drained = wait_until(Duration::from_secs(180), || magento.sim.lock().unwrap().outbox.queue.is_empty()).await;
    shutdown.cancel();
    assert!(drained, "the outbox never drained:\n{}", log(dir.path(), "second"));
    let failed_attempts = magento.sim.lock().unwrap().outbox.failed_attempts;
    assert!(failed_attempts > 0, "deliveries failed while order-ingest was down");

    let published = order_versions(&brokers(), &topic);
    let versions: BTreeSet<(i64, i64)> = published.iter().map(|(v, _)| *v).collect();
    let missing: Vec<_> = notified.difference(&versions).collect();
    assert!(
        missing.is_empty(),
        "{} notified versions lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let mut ids = std::collections::BTreeMap::<(i64, i64), BTreeSet<String>>::new();
    for (version, id) in published {
        ids.entry(version).or_default().insert(id);
    }
    assert!(ids.values().all(|set| set.len() == 1), "a redelivered version keeps its event id");

    second.signal("TERM");
    assert!(second.wait_timeout(Duration::from_secs(30)).expect("stops on SIGTERM").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_publish_nothing_and_a_broker_outage_is_a_503_the_service_survives() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    // A broker of this test's own, so it can be taken down.
    let kafka_port = free_port();
    let kafka = format!("127.0.0.1:{kafka_port}");
    let broker_dir = dir.path().join("broker");
    std::fs::create_dir_all(&broker_dir).unwrap();
    let mut broker = TansuProcess::start(&broker_dir, kafka_port, &format!("tcp://{kafka}"), false);
    let topic = unique("refusals.commerce");
    let (magento, magento_url) = serve_magento(20).await;
    let (listen, admin) = (free_port(), free_port());
    let mut ingest = ChildGuard::spawn(
        "order-ingest",
        order_ingest(dir.path(), &topic, &magento_url, "ingest")
            .env("ELO_KAFKA_BROKERS", &kafka)
            .env("ELO_KAFKA_DELIVERY_TIMEOUT_MS", "3000")
            .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("ELO_ORDER_INGEST_LISTEN", format!("127.0.0.1:{listen}"))
            .env("ELO_ORDER_INGEST_WEBHOOK_SECRET_FILE", &secret_file)
            .env("ELO_ORDER_INGEST_MAX_BODY_BYTES", "65536"),
    );
    let http = reqwest::Client::new();
    let ready = format!("http://127.0.0.1:{admin}/health/readyz");
    let mut is_ready = false;
    for _ in 0..120 {
        if http.get(&ready).send().await.is_ok_and(|r| r.status() == 200) {
            is_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(is_ready, "never ready:\n{}", log(dir.path(), "ingest"));

    let order = |id: i64| magento.sim.lock().unwrap().orders[&id].clone();
    let url = format!("http://127.0.0.1:{listen}/webhooks/magento/orders");
    let post = |body: Vec<u8>, secret: &'static str| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        http.post(&url)
            .header(SIGNATURE_HEADER, sign(secret, t, &body))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let body =
        |id: i64| serde_json::to_vec(&json!({"order": order(id), "note": "unknown fields are tolerated"})).unwrap();
    assert_eq!(post(body(1), "not-the-secret").await.unwrap().status(), 401);
    assert_eq!(post(b"{\"order\": ".to_vec(), SECRET).await.unwrap().status(), 400);
    let mut oversized = serde_json::to_value(order(2)).unwrap();
    oversized["padding"] = json!("x".repeat(70 * 1024));
    assert_eq!(post(serde_json::to_vec(&json!({"order": oversized})).unwrap(), SECRET).await.unwrap().status(), 413);
    let mut broken = order(3);
    broken["grand_total"] = json!("lots");
    let invalid = post(serde_json::to_vec(&json!({"order": broken})).unwrap(), SECRET).await.unwrap();
    assert_eq!(invalid.status(), 422);
    assert!(invalid.text().await.unwrap().contains("grand_total"), "the 422 says what is wrong");
    let accepted = post(body(4), SECRET).await.unwrap();
    assert_eq!(accepted.status(), 200, "unknown fields are tolerated");

    // The broker goes away: 503 with Retry-After, and the process stays alive.
    broker.guard.signal("KILL");
    broker.guard.wait_timeout(Duration::from_secs(5)).expect("broker killed");
    let during = post(body(5), SECRET).await.unwrap();
    assert_eq!(during.status(), 503, "{}", during.text().await.unwrap_or_default());
    assert!(during.headers().contains_key("retry-after"));
    let live = http.get(format!("http://127.0.0.1:{admin}/health/livez")).send().await.unwrap();
    assert_eq!(live.status(), 200, "the service stays up during the outage");

    let status_of = |url: String| {
        let http = http.clone();
        async move { http.get(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
    };
    let mut unready = false;
    for _ in 0..60 {
        if status_of(ready.clone()).await == 503 {
            unready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(unready, "the outage must show in readiness:\n{}", log(dir.path(), "ingest"));

    // The broker returns: readiness comes back by itself (an unready pod gets no traffic, so
    // it cannot wait for a delivery to notice), then Magento's retry succeeds.
    let _broker = TansuProcess::start(&broker_dir, kafka_port, &format!("tcp://{kafka}"), false);
    let back = std::time::Instant::now();
    let mut ready_again = false;
    while back.elapsed() < Duration::from_secs(15) {
        if status_of(ready.clone()).await == 200 {
            ready_again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let detail = http.get(&ready).send().await.ok();
    let detail = match detail {
        Some(r) => r.text().await.unwrap_or_default(),
        None => String::new(),
    };
    assert!(
        ready_again,
        "readiness did not return within 15 s of the broker's return: {detail}\n{}",
        log(dir.path(), "ingest")
    );
    let mut retried = false;
    for _ in 0..60 {
        if post(body(5), SECRET).await.is_ok_and(|r| r.status() == 200) {
            retried = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(retried, "publishing never recovered:\n{}", log(dir.path(), "ingest"));

    // Only the two accepted orders are on the topic: order 4, and order 5 once (the 503'd
    // attempt expired in the producer and was not delivered late).
    let published = order_versions(&kafka, &topic);
    let orders: Vec<i64> = published.iter().map(|((id, _), _)| *id).collect();
    assert_eq!(orders.iter().filter(|id| **id == 4).count(), 1);
    assert_eq!(orders.iter().filter(|id| **id == 5).count(), 1, "no late duplicate of the refused attempt");
    assert!(orders.iter().all(|id| *id == 4 || *id == 5), "refused requests published nothing: {orders:?}");

    ingest.signal("TERM");
    assert!(ingest.wait_timeout(Duration::from_secs(30)).expect("stops on SIGTERM").success());
}
