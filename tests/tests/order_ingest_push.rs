//! Magento pushes signed order notifications (the sandbox's webhooks, duplicates included) to
//! order-ingest, which publishes them on the real broker: every order version arrives once or
//! more with the same event id, keyed by customer, decodable with the registry.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use elo_events::{CommerceEvent, EventCodec, RegistryConfig};
use elo_integration_tests::*;
use rdkafka::Message;
use sandbox::magento::webhook::{WebhookConfig, WebhookStyle};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_orders_reach_commerce_events_with_stable_ids() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "push-test-secret-0123456789\n").unwrap();
    let topic = unique("push.commerce");

    let (magento, magento_url) = serve_magento(0).await;
    let (listen, admin) = (free_port(), free_port());
    let mut ingest = ChildGuard::spawn(
        "order-ingest",
        order_ingest(dir.path(), &topic, &magento_url, "ingest")
            .env("ELO_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("ELO_ORDER_INGEST_LISTEN", format!("127.0.0.1:{listen}"))
            .env("ELO_ORDER_INGEST_WEBHOOK_SECRET_FILE", &secret_file),
    );
    let ready =
        wait_until(Duration::from_secs(60), || std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok()).await;
    assert!(
        ready,
        "push endpoint never listened:\n{}",
        std::fs::read_to_string(dir.path().join("ingest.log")).unwrap_or_default()
    );

    magento.sim.lock().unwrap().webhook = WebhookConfig {
        url: Some(format!("http://127.0.0.1:{listen}/webhooks/magento/orders")),
        customer_url: None,
        secret: "push-test-secret-0123456789".into(),
        duplicate_rate: 0.3,
        style: WebhookStyle::CloudEvents,
        ..Default::default()
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sandbox::magento::webhook::dispatch(magento.clone(), shutdown.clone()));
    magento.sim.lock().unwrap().generate(60);
    let versions = magento.sim.lock().unwrap().orders.len();
    let drained = wait_until(Duration::from_secs(60), || {
        let sim = magento.sim.lock().unwrap();
        sim.outbox.queue.is_empty() && sim.outbox.delivered > 0
    })
    .await;
    shutdown.cancel();
    assert!(
        drained,
        "webhooks were not all delivered:\n{}",
        std::fs::read_to_string(dir.path().join("ingest.log")).unwrap_or_default()
    );
    let (delivered, duplicates) = {
        let sim = magento.sim.lock().unwrap();
        (sim.outbox.delivered, sim.outbox.duplicates_sent)
    };

    let records = read_all(&brokers(), &topic, 3);
    // At least one event per acknowledged notification; more when a slow answer made Magento
    // retry a notification that had in fact been published (at-least-once, same id).
    assert!(records.len() as u64 >= delivered, "{} events for {delivered} acknowledged notifications", records.len());
    let codec = EventCodec::new(&RegistryConfig::local(registry_url())).unwrap();
    // A version is its content: two changes saved within one second are two versions.
    let mut ids_by_version: BTreeMap<(i64, String, String), BTreeSet<String>> = BTreeMap::new();
    for record in &records {
        let event: CommerceEvent = codec.decode(record.payload().unwrap()).await.unwrap();
        assert_eq!(record.key(), Some(event.customer_key.as_bytes()), "keyed by customer");
        assert_traceparent(record);
        let order = event.order.as_ref().unwrap();
        ids_by_version
            .entry((order.entity_id, event.source_version.updated_at.to_string(), order.status.clone()))
            .or_default()
            .insert(event.event_id.clone());
    }
    assert!(ids_by_version.values().all(|ids| ids.len() == 1), "redelivered facts carry the same event_id");
    let orders: BTreeSet<i64> = ids_by_version.keys().map(|(id, _, _)| *id).collect();
    assert_eq!(orders.len(), versions, "every order reached the topic");
    assert!(duplicates > 0 && records.len() > ids_by_version.len(), "duplicates were pushed and absorbed by id");

    ingest.signal("TERM");
    assert!(ingest.wait_timeout(Duration::from_secs(30)).expect("stops on SIGTERM").success());
}

/// Adobe Commerce Webhooks' own scheme end to end: the simulator signs with its store key
/// (RSA-SHA256, `x-adobe-commerce-webhook-signature`), order-ingest verifies with the public key
/// from a file, and an HMAC-signed request is refused when no HMAC secret is configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adobe_commerce_signed_webhooks_are_verified_with_the_stores_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let topic = unique("push.adobe");
    let (magento, magento_url) = serve_magento(0).await;
    let key_file = dir.path().join("adobe-public.pem");
    std::fs::write(&key_file, magento.webhook_key.get().public_pem()).unwrap();
    let listen = free_port();
    let _ingest = ChildGuard::spawn(
        "order-ingest",
        order_ingest(dir.path(), &topic, &magento_url, "adobe")
            .env("ELO_ORDER_INGEST_LISTEN", format!("127.0.0.1:{listen}"))
            .env("ELO_ORDER_INGEST_ADOBE_WEBHOOK_PUBLIC_KEY_FILE", &key_file),
    );
    let ready =
        wait_until(Duration::from_secs(60), || std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok()).await;
    assert!(ready, "push endpoint never listened:\n{}", log(dir.path(), "adobe"));
    let endpoint = format!("http://127.0.0.1:{listen}/webhooks/magento/orders");

    let hmac_signed = reqwest::Client::new()
        .post(&endpoint)
        .header("x-elo-webhook-signature", sandbox::magento::webhook::sign("any-secret", 0, b"{}"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(hmac_signed.status(), 401, "no HMAC secret configured: that scheme is off");

    {
        let mut sim = magento.sim.lock().unwrap();
        sim.webhook = WebhookConfig { url: Some(endpoint), duplicate_rate: 0.0, ..Default::default() };
        sim.webhook_signature = sandbox::magento::webhook::SignatureScheme::AdobeRsa;
    }
    magento.sim.lock().unwrap().generate(20);
    let notified = magento.sim.lock().unwrap().outbox.queue.len() as u64;
    assert!(notified > 0);
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(sandbox::magento::webhook::dispatch(magento.clone(), shutdown.clone()));
    let drained = wait_until(Duration::from_secs(60), || {
        let sim = magento.sim.lock().unwrap();
        sim.outbox.queue.is_empty() && sim.outbox.delivered >= notified
    })
    .await;
    shutdown.cancel();
    assert!(drained, "Adobe-signed webhooks were not accepted:\n{}", log(dir.path(), "adobe"));
    let delivered = magento.sim.lock().unwrap().outbox.delivered;
    let records = read_all(&brokers(), &topic, 3);
    assert!(records.len() as u64 >= delivered, "{} events, {delivered} delivered", records.len());
}
