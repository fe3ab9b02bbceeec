use std::sync::Arc;

use elo_events::{ConsentStatus, InventoryStatus};

use super::*;
use crate::inventory::InventoryConfig;
use crate::source::fake::Shop;

/// Records what reaches the broker, in order.
#[derive(Default, Clone)]
pub(crate) struct Recorder {
    pub(crate) events: Arc<Mutex<Vec<CommerceEvent>>>,
    pub(crate) stock: Arc<Mutex<Vec<InventoryEvent>>>,
    pub(crate) dead: Arc<Mutex<Vec<crate::push::DeadLetter>>>,
    /// The span each event and fact was published in (its `traceparent` comes from it).
    pub(crate) spans: Arc<Mutex<Vec<Option<&'static str>>>>,
}

impl Recorder {
    fn span(&self) {
        self.spans.lock().unwrap().push(tracing::Span::current().metadata().map(|m| m.name()));
    }
}

impl Publisher for Recorder {
    async fn publish(&self, event: &CommerceEvent) -> Result<(), PublishError> {
        self.span();
        self.events.lock().unwrap().push(event.clone());
        Ok(())
    }
    async fn dead_letter(&self, letter: &crate::push::DeadLetter) -> Result<(), PublishError> {
        self.dead.lock().unwrap().push(letter.clone());
        Ok(())
    }
}

impl InventoryPublisher for Recorder {
    async fn publish_inventory(&self, event: &InventoryEvent) -> Result<(), PublishError> {
        self.span();
        self.stock.lock().unwrap().push(event.clone());
        Ok(())
    }
}

#[tokio::test]
async fn orders_carry_consent_and_inventory_status_and_stock_facts_are_published_first() {
    let shop = Shop::generated(200);
    let recorder = Recorder::default();
    // The simulator's orders are from 2026-11-01: old enough to skip checks by default.
    let checker = InventoryChecker::new(InventoryConfig { max_order_age: Duration::MAX, ..Default::default() });
    let enricher = Enricher::new(recorder.clone(), shop.clone(), Some(checker), Duration::from_secs(60));
    let (orders, customers) = {
        let m = shop.0.lock().unwrap();
        (m.orders.values().cloned().collect::<Vec<_>>(), m.customers.clone())
    };
    for order in &orders {
        let event = crate::normalize::order_event(order, None, &Default::default(), 0).unwrap();
        assert_eq!(event.customer.as_ref().unwrap().consent.status, ConsentStatus::Unknown);
        enricher.publish(&event).await.unwrap();
    }
    let events = recorder.events.lock().unwrap();
    assert_eq!(events.len(), orders.len());
    for event in events.iter() {
        let customer = event.customer.as_ref().unwrap();
        let expected = match customer.customer_id {
            Some(id) if customers[&id].subscribed => ConsentStatus::Granted,
            Some(_) => ConsentStatus::Declined,
            None => ConsentStatus::Unknown,
        };
        assert_eq!(customer.consent.status, expected, "{}", event.customer_key);
        assert_ne!(event.order.as_ref().unwrap().inventory_status, InventoryStatus::Unchecked);
    }
    let stock = recorder.stock.lock().unwrap();
    assert!(!stock.is_empty());
    // The generator depletes stock below zero on popular SKUs; those orders say so.
    let oversold: Vec<_> =
        events.iter().filter(|e| e.order.as_ref().unwrap().inventory_status == InventoryStatus::Oversold).collect();
    let negative = shop.0.lock().unwrap().stock.values().filter(|(q, _)| *q < 0.0).count();
    assert_eq!(oversold.is_empty(), negative == 0, "oversold orders iff some SKU is negative");
}

#[tokio::test]
async fn without_inventory_checks_orders_stay_unchecked() {
    let shop = Shop::generated(5);
    let recorder = Recorder::default();
    let enricher = Enricher::new(recorder.clone(), shop.clone(), None, Duration::from_secs(60));
    let order = shop.0.lock().unwrap().orders[&1].clone();
    enricher.publish(&crate::normalize::order_event(&order, None, &Default::default(), 0).unwrap()).await.unwrap();
    let events = recorder.events.lock().unwrap();
    assert_eq!(events[0].order.as_ref().unwrap().inventory_status, InventoryStatus::Unchecked);
    assert!(recorder.stock.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_customer_change_notification_refreshes_the_cached_consent() {
    let shop = Shop::generated(60);
    let recorder = Recorder::default();
    let enricher = Enricher::new(recorder.clone(), shop.clone(), None, Duration::from_secs(60));
    let order = shop.0.lock().unwrap().orders.values().find(|o| o["customer_is_guest"] == 0).unwrap().clone();
    let id = order["customer_id"].as_i64().unwrap();
    let event = crate::normalize::order_event(&order, None, &Default::default(), 0).unwrap();
    shop.0.lock().unwrap().customers.get_mut(&id).unwrap().subscribed = false;
    enricher.publish(&event).await.unwrap();
    // The customer opts in; Magento notifies customer_save_after with the new record.
    shop.0.lock().unwrap().customers.get_mut(&id).unwrap().subscribed = true;
    let record = shop.0.lock().unwrap().customers[&id].to_json();
    enricher.publish(&crate::normalize::customer_event(&record, &Default::default(), 0).unwrap()).await.unwrap();
    enricher.publish(&event).await.unwrap();
    let events = recorder.events.lock().unwrap();
    let consent = |i: usize| events[i].customer.as_ref().unwrap().consent.status;
    assert_eq!((consent(0), consent(2)), (ConsentStatus::Declined, ConsentStatus::Granted));
}

/// The customer changes while an order's consent read is on its way (Magento saves the
/// customer during checkout): the read, older than the change, is not cached, so the next
/// order reads the consent again instead of serving the old one for a whole TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consent_read_overtaken_by_the_customers_change_is_not_cached() {
    let shop = Shop::generated(60);
    let magento = Gated { shop: shop.clone(), gate: Default::default(), reads: Default::default() };
    let recorder = Recorder::default();
    let enricher = Arc::new(Enricher::new(recorder.clone(), magento.clone(), None, Duration::from_secs(60)));
    let order = shop.0.lock().unwrap().orders.values().find(|o| o["customer_is_guest"] == 0).unwrap().clone();
    let id = order["customer_id"].as_i64().unwrap();
    let event = crate::normalize::order_event(&order, None, &Default::default(), 0).unwrap();
    shop.0.lock().unwrap().customers.get_mut(&id).unwrap().subscribed = false;
    // The order's read waits at the gate, already counted as started.
    let closed = magento.gate.write().await;
    let in_flight = tokio::spawn({
        let (enricher, event) = (enricher.clone(), event.clone());
        async move { enricher.publish(&event).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The customer opts in; customer_save_after arrives before the old read answers.
    shop.0.lock().unwrap().customers.get_mut(&id).unwrap().subscribed = true;
    let record = shop.0.lock().unwrap().customers[&id].to_json();
    let changed = crate::normalize::customer_event(&record, &Default::default(), 0).unwrap();
    // The read answers with what Magento held when it was made.
    shop.0.lock().unwrap().customers.get_mut(&id).unwrap().subscribed = false;
    enricher.publish(&changed).await.unwrap();
    drop(closed);
    in_flight.await.unwrap().unwrap();
    shop.0.lock().unwrap().customers.get_mut(&id).unwrap().subscribed = true;
    enricher.publish(&event).await.unwrap();
    let events = recorder.events.lock().unwrap();
    let consent = |i: usize| events[i].customer.as_ref().unwrap().consent.status;
    assert_eq!(events.len(), 3);
    assert_eq!(consent(2), ConsentStatus::Granted, "the read older than the change was cached and served");
}

/// Drops the first stock fact (the broker refused it), records the rest.
#[derive(Default, Clone)]
struct LosesFirstFact(Recorder, Arc<std::sync::atomic::AtomicBool>);

impl Publisher for LosesFirstFact {
    async fn publish(&self, event: &CommerceEvent) -> Result<(), PublishError> {
        self.0.publish(event).await
    }
    async fn dead_letter(&self, letter: &crate::push::DeadLetter) -> Result<(), PublishError> {
        self.0.dead_letter(letter).await
    }
}

impl InventoryPublisher for LosesFirstFact {
    async fn publish_inventory(&self, event: &InventoryEvent) -> Result<(), PublishError> {
        if !self.1.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(PublishError::Unavailable("no acknowledgement".into()));
        }
        self.0.publish_inventory(event).await
    }
}

#[tokio::test]
async fn a_stock_fact_is_cached_only_after_it_was_acknowledged() {
    let shop = Shop::generated(5);
    let publisher = LosesFirstFact::default();
    let checker = InventoryChecker::new(InventoryConfig { max_order_age: Duration::MAX, ..Default::default() });
    let enricher = Enricher::new(publisher.clone(), shop.clone(), Some(checker), Duration::from_secs(60));
    let mut order = shop.0.lock().unwrap().orders[&1].clone();
    let items = order["items"].as_array().unwrap();
    let first = items.iter().find(|i| i["product_type"] == "simple").expect("a simple line").clone();
    order["items"] = serde_json::json!([first]);
    let event = crate::normalize::order_event(&order, None, &Default::default(), 0).unwrap();
    assert!(enricher.publish(&event).await.is_err(), "the lost fact fails the publish");
    enricher.publish(&event).await.unwrap();
    let stock = publisher.0.stock.lock().unwrap();
    assert_eq!(stock.len(), 1, "the retry observes and publishes the fact again instead of trusting the cache");
}

/// The sandbox's shop answering after 50 ms, counting customer and stock calls.
struct Slow(Shop, std::sync::atomic::AtomicUsize, std::sync::atomic::AtomicUsize);

impl MagentoApi for Slow {
    async fn order(&self, id: i64) -> Result<serde_json::Value, crate::source::SourceError> {
        self.0.order(id).await
    }
    async fn customer(&self, id: i64) -> Result<serde_json::Value, crate::source::SourceError> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.0.customer(id).await
    }
    async fn salable_qty(
        &self,
        sku: &str,
        stock_id: i32,
    ) -> Result<Option<elo_events::Decimal4>, crate::source::SourceError> {
        self.2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.0.salable_qty(sku, stock_id).await
    }
}

#[tokio::test(start_paused = true)]
async fn consent_and_stock_are_asked_at_once_and_a_burst_costs_one_call_each() {
    let shop = Shop::generated(60);
    let order = shop.0.lock().unwrap().orders.values().find(|o| o["customer_is_guest"] == 0).unwrap().clone();
    let mut one_line = order.clone();
    let line = order["items"].as_array().unwrap().iter().find(|i| i["product_type"] == "simple").unwrap().clone();
    one_line["items"] = serde_json::json!([line]);
    let magento = Slow(shop, Default::default(), Default::default());
    let recorder = Recorder::default();
    let checker = InventoryChecker::new(InventoryConfig { max_order_age: Duration::MAX, ..Default::default() });
    let enricher = Enricher::new(recorder.clone(), magento, Some(checker), Duration::from_secs(60));
    let event = crate::normalize::order_event(&one_line, None, &Default::default(), 0).unwrap();
    let started = tokio::time::Instant::now();
    // A burst: twenty orders of one customer for one hot SKU, all at once.
    let results = futures::future::join_all((0..20).map(|_| enricher.publish(&event))).await;
    assert!(results.iter().all(Result::is_ok));
    let took = started.elapsed();
    assert!(took < Duration::from_millis(100), "consent and stock in parallel, not 50 + 50 ms: {took:?}");
    let calls = |c: &std::sync::atomic::AtomicUsize| c.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!((calls(&enricher.magento.1), calls(&enricher.magento.2)), (1, 1), "one lookup each");
    assert_eq!(recorder.events.lock().unwrap().len(), 20);
    assert_eq!(recorder.stock.lock().unwrap().len(), 1, "one stock fact for one reading");
}

#[tokio::test(start_paused = true)]
async fn past_the_budget_the_order_goes_out_unchecked_and_its_enrichment_follows() {
    let shop = Shop::generated(60);
    let mut order = shop.0.lock().unwrap().orders.values().find(|o| o["customer_is_guest"] == 0).unwrap().clone();
    let line = order["items"].as_array().unwrap().iter().find(|i| i["product_type"] == "simple").unwrap().clone();
    order["items"] = serde_json::json!([line]);
    // Spans exist only under a subscriber (this thread's: the test runtime is single-threaded).
    let _spans = tracing::subscriber::set_default(tracing_subscriber::registry());
    let recorder = Recorder::default();
    let checker = InventoryChecker::new(InventoryConfig { max_order_age: Duration::MAX, ..Default::default() });
    let (late, queue) = tokio::sync::mpsc::channel(8);
    let magento = Slow(shop, Default::default(), Default::default()); // 50 ms a call
    let enricher = Arc::new(
        Enricher::new(recorder.clone(), magento, Some(checker), Duration::from_secs(60))
            .with_budget(Budget { limit: Duration::from_millis(20), late }),
    );
    let event = crate::normalize::order_event(&order, None, &Default::default(), 0).unwrap();
    let started = tokio::time::Instant::now();
    enricher.publish(&event).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(50), "the webhook did not wait for Magento");
    {
        let events = recorder.events.lock().unwrap();
        let first = &events[0];
        assert_eq!(first.event_id, event.event_id);
        assert_eq!(first.order.as_ref().unwrap().inventory_status, InventoryStatus::Unchecked);
        assert_eq!(first.customer.as_ref().unwrap().consent.status, ConsentStatus::Unknown);
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let erased = Arc::new(crate::erasure::ErasedKeys::default());
    let worker = tokio::spawn(follow_ups(queue, enricher.clone(), erased, stop.clone()));
    for _ in 0..100 {
        if recorder.events.lock().unwrap().len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    worker.await.unwrap();
    let events = recorder.events.lock().unwrap();
    assert_eq!(events.len(), 2, "the late result follows as its own event");
    let follow = &events[1];
    assert_eq!(follow.source_version, event.source_version, "about the same order version");
    assert_ne!(follow.event_id, event.event_id, "with an id of its own");
    assert_ne!(follow.order.as_ref().unwrap().inventory_status, InventoryStatus::Unchecked);
    assert_ne!(follow.customer.as_ref().unwrap().consent.status, ConsentStatus::Unknown);
    // Published in a trace of its own, so the record carries a `traceparent`.
    assert_eq!(recorder.spans.lock().unwrap().last().copied().flatten(), Some("enrichment_follow_up"));
}

/// The sandbox's Magento behind a gate: while the test holds it closed, customer reads wait.
#[derive(Clone)]
struct Gated {
    shop: Shop,
    gate: Arc<tokio::sync::RwLock<()>>,
    reads: Arc<std::sync::atomic::AtomicUsize>,
}

impl MagentoApi for Gated {
    async fn order(&self, entity_id: i64) -> Result<serde_json::Value, crate::source::SourceError> {
        self.shop.order(entity_id).await
    }
    async fn customer(&self, customer_id: i64) -> Result<serde_json::Value, crate::source::SourceError> {
        let _open = self.gate.read().await;
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.shop.customer(customer_id).await
    }
    async fn salable_qty(
        &self,
        sku: &str,
        stock_id: i32,
    ) -> Result<Option<elo_events::Decimal4>, crate::source::SourceError> {
        self.shop.salable_qty(sku, stock_id).await
    }
}

/// A returning customer's order never waits for Magento once their consent is cached: in the
/// last quarter of its TTL the consent is served and read again in the background, so it has
/// not expired when the next order comes (without the refresh, that order waited for a read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_consent_is_refreshed_before_it_expires_so_orders_never_wait_for_it() {
    let shop = Shop::generated(60);
    let magento = Gated { shop: shop.clone(), gate: Default::default(), reads: Default::default() };
    // Seconds, not milliseconds: the checks below sleep to points inside the TTL, and a late
    // wake-up on a loaded machine must not cross them.
    let ttl = Duration::from_secs(4);
    let (refresh, due) = tokio::sync::mpsc::channel(16);
    let enricher =
        Arc::new(Enricher::new(Recorder::default(), magento.clone(), None, ttl).with_consent_refresh(refresh));
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(refresh_consents(due, enricher.clone(), stop.clone()));
    let order = shop.0.lock().unwrap().orders.values().find(|o| o["customer_is_guest"] == 0).unwrap().clone();
    let id = order["customer_id"].as_i64().unwrap();
    let event = crate::normalize::order_event(&order, None, &Default::default(), 0).unwrap();
    shop.0.lock().unwrap().customers.get_mut(&id).unwrap().subscribed = false;
    let stored = Instant::now();
    enricher.publish(&event).await.unwrap();
    // The entry counts as read up to a quarter of the TTL early (staggered by customer).
    let early = stored - crate::flight::staggered(stored, ttl, &id);
    let publish_closed = || async {
        let closed = magento.gate.write().await;
        let published = tokio::time::timeout(Duration::from_millis(300), enricher.publish(&event)).await;
        drop(closed);
        published.is_ok()
    };
    shop.0.lock().unwrap().customers.get_mut(&id).unwrap().subscribed = true;
    // Inside the refresh window (3/4 to 4/4 of the TTL): served from the cache, refresh queued.
    tokio::time::sleep_until((stored + ttl * 7 / 8 - early).into()).await;
    assert!(publish_closed().await, "served from the cache while Magento is unavailable");
    tokio::time::sleep(Duration::from_millis(50)).await; // the queued refresh reads
    // Past the first reading's expiry: the refreshed entry serves, Magento is not waited for.
    tokio::time::sleep_until((stored + ttl + Duration::from_millis(100) - early).into()).await;
    assert!(publish_closed().await, "the refreshed consent serves past the first reading's TTL");
    assert_eq!(magento.reads.load(std::sync::atomic::Ordering::SeqCst), 2, "one read, one refresh");
    let events = enricher.inner().events.lock().unwrap().clone();
    let consent = |i: usize| events[i].customer.as_ref().unwrap().consent.status;
    assert_eq!(
        (consent(0), consent(2)),
        (ConsentStatus::Declined, ConsentStatus::Granted),
        "the refresh read it again"
    );
    stop.cancel();
}

/// The sandbox's Magento with stock reads behind a gate (closed by the test) and counted.
#[derive(Clone)]
struct GatedStock {
    shop: Shop,
    gate: Arc<tokio::sync::RwLock<()>>,
    reads: Arc<std::sync::atomic::AtomicUsize>,
}

impl MagentoApi for GatedStock {
    async fn order(&self, entity_id: i64) -> Result<serde_json::Value, crate::source::SourceError> {
        self.shop.order(entity_id).await
    }
    async fn customer(&self, customer_id: i64) -> Result<serde_json::Value, crate::source::SourceError> {
        self.shop.customer(customer_id).await
    }
    async fn salable_qty(
        &self,
        sku: &str,
        stock_id: i32,
    ) -> Result<Option<elo_events::Decimal4>, crate::source::SourceError> {
        let _open = self.gate.read().await;
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.shop.salable_qty(sku, stock_id).await
    }
}

/// An enricher whose stock reads wait behind `magento.gate`, with stock refreshes running until
/// `stop`, and an order of one SKU (one reading, one staggered expiry to aim at). The TTL is in
/// seconds, not milliseconds: late wake-ups on a loaded machine must not cross the checks.
struct StockRig<P> {
    enricher: Arc<Enricher<P, GatedStock>>,
    magento: GatedStock,
    event: CommerceEvent,
    sku: String,
    ttl: Duration,
    stop: tokio_util::sync::CancellationToken,
}

fn stock_rig<P: Publisher + InventoryPublisher>(publisher: P) -> StockRig<P> {
    let shop = Shop::generated(20);
    let magento = GatedStock { shop: shop.clone(), gate: Default::default(), reads: Default::default() };
    let ttl = Duration::from_secs(4);
    let checker =
        InventoryChecker::new(InventoryConfig { cache_ttl: ttl, max_order_age: Duration::MAX, ..Default::default() });
    let (refresh, due) = tokio::sync::mpsc::channel(16);
    let enricher = Arc::new(
        Enricher::new(publisher, magento.clone(), Some(checker), Duration::from_secs(600)).with_stock_refresh(refresh),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(refresh_stock(due, enricher.clone(), stop.clone()));
    let order = shop.0.lock().unwrap().orders.values().next().unwrap().clone();
    let mut event = crate::normalize::order_event(&order, None, &Default::default(), 0).unwrap();
    let items = &mut event.order.as_mut().unwrap().items;
    items.retain(|item| item.product_type != "bundle");
    items.truncate(1);
    let sku = items[0].sku.clone();
    StockRig { enricher, magento, event, sku, ttl, stop }
}

/// Webhooks about orders placed before a stock reading (status changes, invoices, shipments)
/// never wait for Magento once the reading is cached: in the last quarter of its TTL it is
/// served and read again in the background, its fact published before it is cached, so it has
/// not expired when the next webhook comes (without the refresh, that one waited for a read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_stock_reading_still_in_use_is_refreshed_before_it_expires() {
    // Spans exist only under a subscriber; the refresh runs on another runtime thread.
    let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
    let StockRig { enricher, magento, event, sku, ttl, stop } = stock_rig(Recorder::default());
    let stored = Instant::now();
    enricher.publish(&event).await.unwrap();
    assert_eq!(magento.reads.load(std::sync::atomic::Ordering::SeqCst), 1, "the first order reads");
    let early = stored - crate::flight::staggered(stored, ttl, sku.as_str());
    let publish_closed = || async {
        let closed = magento.gate.write().await;
        let published = tokio::time::timeout(Duration::from_millis(300), enricher.publish(&event)).await;
        drop(closed);
        published.is_ok()
    };
    // Inside the refresh window (3/4 to 4/4 of the TTL): served from the cache, refresh queued.
    tokio::time::sleep_until((stored + ttl * 7 / 8 - early).into()).await;
    assert!(publish_closed().await, "served from the cache while Magento is unavailable");
    tokio::time::sleep(Duration::from_millis(100)).await; // the queued refresh reads
    assert_eq!(magento.reads.load(std::sync::atomic::Ordering::SeqCst), 2, "one read, one refresh");
    // Past the first reading's expiry: the refreshed reading serves, Magento is not waited for.
    tokio::time::sleep_until((stored + ttl + Duration::from_millis(100) - early).into()).await;
    assert!(publish_closed().await, "the refreshed reading serves past the first reading's TTL");
    assert_eq!(magento.reads.load(std::sync::atomic::Ordering::SeqCst), 2, "no read after the refresh");
    let facts = enricher.inner().stock.lock().unwrap().clone();
    assert_eq!(facts.len(), 2, "the first order's fact and the refresh's, nothing for cache hits: {facts:?}");
    assert_eq!(facts[0].order_increment_id.as_deref(), Some(event.order.as_ref().unwrap().increment_id.as_str()));
    assert_eq!(facts[1].order_increment_id, None, "a background reading is nobody's order's fact");
    let refreshed = enricher.inner().spans.lock().unwrap().iter().filter(|s| **s == Some("stock_refresh")).count();
    assert_eq!(refreshed, 1, "the refresh's fact is published in a trace of its own");
    assert_ne!(facts[0].event_id, facts[1].event_id);
    let statuses: Vec<_> =
        enricher.inner().events.lock().unwrap().iter().map(|e| e.order.as_ref().unwrap().inventory_status).collect();
    assert!(statuses.iter().all(|s| *s != InventoryStatus::Unchecked), "every order was checked: {statuses:?}");
    stop.cancel();
}

/// A refreshed fact the broker did not acknowledge is not cached: the old reading expires and
/// the next order reads (and publishes) again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_stock_fact_not_acknowledged_is_not_cached() {
    let publisher = FailingStock::default();
    let StockRig { enricher, magento, event, sku, ttl, stop } = stock_rig(publisher.clone());
    let stored = Instant::now();
    enricher.publish(&event).await.unwrap();
    let early = stored - crate::flight::staggered(stored, ttl, sku.as_str());
    publisher.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep_until((stored + ttl * 7 / 8 - early).into()).await;
    enricher.publish(&event).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(magento.reads.load(std::sync::atomic::Ordering::SeqCst), 2, "one read, one refresh");
    publisher.fail.store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep_until((stored + ttl + Duration::from_millis(100) - early).into()).await;
    enricher.publish(&event).await.unwrap();
    assert_eq!(magento.reads.load(std::sync::atomic::Ordering::SeqCst), 3, "the unacknowledged refresh was not cached");
    stop.cancel();
}

/// Publishes orders; refuses stock facts while `fail` is set.
#[derive(Default, Clone)]
struct FailingStock {
    fail: Arc<std::sync::atomic::AtomicBool>,
}

impl Publisher for FailingStock {
    async fn publish(&self, _: &CommerceEvent) -> Result<(), PublishError> {
        Ok(())
    }
    async fn dead_letter(&self, _: &crate::push::DeadLetter) -> Result<(), PublishError> {
        Ok(())
    }
}

impl InventoryPublisher for FailingStock {
    async fn publish_inventory(&self, _: &InventoryEvent) -> Result<(), PublishError> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(PublishError::Unavailable("broker down".into()));
        }
        Ok(())
    }
}

/// Records like [`Recorder`], but a stock fact is acknowledged only after `delay`.
#[derive(Default, Clone)]
struct SlowStock {
    recorder: Recorder,
    delay: Duration,
}

impl Publisher for SlowStock {
    async fn publish(&self, event: &CommerceEvent) -> Result<(), PublishError> {
        self.recorder.publish(event).await
    }
    async fn dead_letter(&self, letter: &crate::push::DeadLetter) -> Result<(), PublishError> {
        self.recorder.dead_letter(letter).await
    }
}

impl InventoryPublisher for SlowStock {
    async fn publish_inventory(&self, event: &InventoryEvent) -> Result<(), PublishError> {
        tokio::time::sleep(self.delay).await;
        self.recorder.publish_inventory(event).await
    }
}

/// A check that found the reading expired while its refresh was reading Magento waits for that
/// read and reuses it (its order was placed before it), instead of reading Magento once more
/// after it: the refresh's reading is shared like an inline fetch's while its fact is on its way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_waiting_behind_a_refresh_reuses_its_reading() {
    // The refreshed fact's acknowledgement takes long enough that the waiting check cannot find
    // the reading cached instead.
    let publisher = SlowStock { recorder: Recorder::default(), delay: Duration::from_millis(500) };
    let StockRig { enricher, magento, event, sku, ttl, stop } = stock_rig(publisher);
    enricher.publish(&event).await.unwrap();
    // Cached once its fact was acknowledged, just before the order went out.
    let stored = Instant::now();
    let early = stored - crate::flight::staggered(stored, ttl, sku.as_str());
    let reads = || magento.reads.load(std::sync::atomic::Ordering::SeqCst);
    // In the refresh window, with Magento held: served from the cache, the refresh is queued and
    // waits for Magento.
    tokio::time::sleep_until((stored + ttl * 7 / 8 - early).into()).await;
    let closed = magento.gate.write().await;
    enricher.publish(&event).await.unwrap();
    // Past the reading's expiry, the next check waits for the refresh's read.
    tokio::time::sleep_until((stored + ttl + Duration::from_millis(100) - early).into()).await;
    let waiting = tokio::spawn({
        let (enricher, event) = (enricher.clone(), event.clone());
        async move { enricher.publish(&event).await }
    });
    // Held long enough (past the quarter-TTL stagger) that the waiting check counts as having
    // arrived before the refresh's reading.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    drop(closed);
    waiting.await.unwrap().unwrap();
    assert_eq!(reads(), 2, "one read, one refresh: the waiting check reused the refresh's reading");
    let statuses: Vec<_> = enricher
        .inner()
        .recorder
        .events
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.order.as_ref().unwrap().inventory_status)
        .collect();
    assert!(statuses.iter().all(|s| *s != InventoryStatus::Unchecked), "every order was checked: {statuses:?}");
    stop.cancel();
}
