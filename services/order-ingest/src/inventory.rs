//! Inventory checks (step 2 of the workflow): the salable quantity (MSI) of each SKU an order
//! touches, classified into stock facts for `inventory.events` and the order's own
//! `inventory_status`.
//!
//! Checks run with bounded concurrency (one semaphore for the whole process, so a burst of
//! orders cannot flood Magento) and a short per-SKU cache: a hot SKU in a burst is asked for
//! once per TTL, not once per order. Only fresh observations become events; a cache hit was
//! already published. A failed check never blocks the order: its status stays `UNCHECKED`.
//!
//! The cache never hides what it cannot know: an entry serves only orders placed before it was
//! read (a later order's reservation is not in it, and that order may be the oversell), and an
//! observation is cached only once its event was acknowledged ([`InventoryChecker::remember`]),
//! so a failed publish is observed and published again rather than silently skipped.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use elo_events::{Decimal4, InventoryEvent, InventoryEventType, InventoryStatus, Order, ids};
use futures::StreamExt;
use tokio::sync::Semaphore;

use crate::source::{MagentoApi, SourceError};

/// Inventory check settings.
#[derive(Clone, Debug)]
pub struct InventoryConfig {
    /// MSI stock the store sells from.
    pub stock_id: i32,
    /// Salable quantity at or below which a SKU is low on stock.
    pub low_stock_threshold: Decimal4,
    /// How long an observation is reused.
    pub cache_ttl: Duration,
    /// Salable-quantity requests in flight at once, process-wide.
    pub concurrency: usize,
    /// Orders placed longer ago than this are not checked: today's stock says nothing about
    /// them (a backfill or a refetch of last year's orders must not flag them oversold).
    pub max_order_age: Duration,
}

impl Default for InventoryConfig {
    fn default() -> Self {
        Self {
            stock_id: 1,
            low_stock_threshold: Decimal4::from_units(5),
            cache_ttl: Duration::from_secs(30),
            // As many as the push path's Magento client allows (ELO_ORDER_INGEST_MAGENTO_CONCURRENCY):
            // at 8, a burst of cache misses queued at 8 / 20 ms = 400 reads/s.
            concurrency: 32,
            max_order_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// Entries kept before expired ones are swept (a bound on memory, not a hard cap).
const CACHE_SWEEP_AT: usize = 50_000;

/// The result of checking one order.
#[derive(Debug, PartialEq)]
pub struct OrderCheck {
    pub status: InventoryStatus,
    /// Fresh observations to publish, one per SKU fetched.
    pub events: Vec<InventoryEvent>,
}

/// Checks SKUs against Magento with a shared cache and concurrency bound.
pub struct InventoryChecker {
    config: InventoryConfig,
    permits: Semaphore,
    cache: Mutex<HashMap<String, Cached>>,
    /// Fetched, its fact not yet acknowledged: shared with orders that waited on the fetch
    /// (single flight), never served from the cache.
    pending: Mutex<HashMap<String, Cached>>,
    flights: crate::flight::Flights<String>,
}

/// A SKU's salable quantity as last read (`None`: not stock-managed).
struct Cached {
    qty: Option<Decimal4>,
    /// When it was cached, for the TTL (staggered by SKU: [`crate::flight::staggered`]).
    at: Instant,
    /// No later than when it was read (ms UTC): it serves orders placed until then.
    read_at: i64,
}

enum Observation {
    Cached(Option<Decimal4>),
    Fresh(Option<Decimal4>),
    Failed(SourceError),
}

impl InventoryChecker {
    pub fn new(config: InventoryConfig) -> Self {
        metrics::CHECKS.with_label_values(&["fetched"]).inc_by(0);
        let permits = Semaphore::new(config.concurrency.max(1));
        let (cache, pending) = (Mutex::new(HashMap::new()), Mutex::new(HashMap::new()));
        Self { config, permits, cache, pending, flights: Default::default() }
    }

    /// Classifies a salable quantity.
    pub fn classify(&self, qty: Decimal4) -> InventoryEventType {
        if qty < Decimal4::ZERO {
            InventoryEventType::Oversold
        } else if qty <= self.config.low_stock_threshold {
            InventoryEventType::LowStock
        } else {
            InventoryEventType::StockLevel
        }
    }

    /// Checks every stock-carrying SKU of `order` (bundle parents carry none: their children do).
    pub async fn check<M: MagentoApi>(&self, magento: &M, order: &Order, now_ms: i64) -> OrderCheck {
        let age = u128::try_from(now_ms.saturating_sub(order.created_at)).unwrap_or_default();
        if age > self.config.max_order_age.as_millis() {
            metrics::CHECKS.with_label_values(&["too_old"]).inc();
            return OrderCheck { status: InventoryStatus::Unchecked, events: Vec::new() };
        }
        let skus: BTreeSet<String> =
            order.items.iter().filter(|i| i.product_type != "bundle").map(|i| i.sku.clone()).collect();
        // Owned SKUs: a closure over borrowed ones is not general enough for a Send future.
        let observations: Vec<(String, Observation)> = futures::stream::iter(skus)
            .map(|sku: String| async move {
                let observation = self.observe(magento, &sku, order.created_at, now_ms).await;
                (sku, observation)
            })
            .buffer_unordered(self.config.concurrency.max(1))
            .collect()
            .await;
        let mut status = InventoryStatus::Ok;
        let mut failed = false;
        let mut events = Vec::new();
        for (sku, observation) in observations {
            let qty = match observation {
                Observation::Cached(qty) => qty,
                Observation::Fresh(qty) => {
                    if let Some(qty) = qty {
                        events.push(self.event(&sku, qty, &order.increment_id, now_ms));
                    }
                    qty
                }
                Observation::Failed(error) => {
                    tracing::warn!(sku = %sku, error = %error, "salable quantity check failed");
                    failed = true;
                    continue;
                }
            };
            status = match (qty.map(|q| self.classify(q)), status) {
                (Some(InventoryEventType::Oversold), _) | (_, InventoryStatus::Oversold) => InventoryStatus::Oversold,
                (Some(InventoryEventType::LowStock), _) => InventoryStatus::LowStock,
                (_, current) => current,
            };
        }
        // A partial check only proves the worse conditions it found.
        if failed && status == InventoryStatus::Ok {
            status = InventoryStatus::Unchecked;
        }
        events.sort_by(|a, b| a.sku.cmp(&b.sku));
        OrderCheck { status, events }
    }

    /// A reusable reading for an order placed at `placed_at`: cached, or fetched by a concurrent
    /// check that this one waited for.
    /// A pending (not yet acknowledged) reading serves only checks that `arrived` before it was
    /// fetched, i.e. waited for that very fetch: a later one, or one after the fetching order
    /// was abandoned (say, past the push budget), fetches and publishes the fact itself.
    fn reusable(&self, sku: &str, placed_at: i64, arrived: Instant) -> Option<Option<Decimal4>> {
        let usable = |c: &Cached| c.at.elapsed() < self.config.cache_ttl && placed_at <= c.read_at;
        let cached = self.cache.lock().expect("cache lock").get(sku).filter(|c| usable(c)).map(|c| c.qty);
        cached.or_else(|| {
            let pending = self.pending.lock().expect("cache lock");
            pending.get(sku).filter(|c| usable(c) && arrived <= c.at).map(|c| c.qty)
        })
    }

    /// `placed_at`: when the order was placed; `now_ms`: a time no later than the read.
    async fn observe<M: MagentoApi>(&self, magento: &M, sku: &str, placed_at: i64, now_ms: i64) -> Observation {
        let arrived = Instant::now();
        if let Some(qty) = self.reusable(sku, placed_at, arrived) {
            metrics::CHECKS.with_label_values(&["cached"]).inc();
            return Observation::Cached(qty);
        }
        // One fetch per SKU at a time: whoever waited reuses it (if their order is older).
        self.flights
            .run(&sku.to_owned(), async {
                if let Some(qty) = self.reusable(sku, placed_at, arrived) {
                    metrics::CHECKS.with_label_values(&["cached"]).inc();
                    return Observation::Cached(qty);
                }
                let _permit = self.permits.acquire().await.expect("semaphore never closed");
                match magento.salable_qty(sku, self.config.stock_id).await {
                    Ok(qty) => {
                        let outcome = if qty.is_some() { "fetched" } else { "unknown_sku" };
                        metrics::CHECKS.with_label_values(&[outcome]).inc();
                        let at = crate::flight::staggered(Instant::now(), self.config.cache_ttl, sku);
                        let reading = Cached { qty, at, read_at: now_ms };
                        if qty.is_none() {
                            // Not stock-managed: no event to wait for.
                            self.cache_entry(sku, reading);
                        } else {
                            self.pending.lock().expect("cache lock").insert(sku.to_owned(), reading);
                        }
                        Observation::Fresh(qty)
                    }
                    Err(error) => {
                        metrics::CHECKS.with_label_values(&["failed"]).inc();
                        Observation::Failed(error)
                    }
                }
            })
            .await
    }

    /// Its event was not acknowledged: the reading is not reused (the next order fetches and
    /// publishes it again).
    pub fn forget(&self, event: &InventoryEvent) {
        let mut pending = self.pending.lock().expect("cache lock");
        if pending.get(&event.sku).is_some_and(|p| p.read_at == event.occurred_at) {
            pending.remove(&event.sku);
        }
    }

    /// Caches an observation once its event was acknowledged (never an older read over a newer).
    pub fn remember(&self, event: &InventoryEvent) {
        let read_at = event.occurred_at;
        let at = crate::flight::staggered(Instant::now(), self.config.cache_ttl, event.sku.as_str());
        self.cache_entry(&event.sku, Cached { qty: Some(event.salable_qty), at, read_at });
        self.forget(event);
    }

    fn cache_entry(&self, sku: &str, reading: Cached) {
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() >= CACHE_SWEEP_AT {
            let ttl = self.config.cache_ttl;
            cache.retain(|_, cached| cached.at.elapsed() < ttl);
        }
        if cache.get(sku).is_none_or(|newest| newest.read_at <= reading.read_at) {
            cache.insert(sku.to_owned(), reading);
        }
    }

    fn event(&self, sku: &str, qty: Decimal4, increment_id: &str, now_ms: i64) -> InventoryEvent {
        let event_type = self.classify(qty);
        let stock = self.config.stock_id.to_string();
        InventoryEvent {
            // The same order's check seeing the same quantity is the same fact.
            event_id: ids::event_id(&["magento", "salable", sku, &stock, &qty.to_string(), increment_id]),
            event_type,
            source_system: "magento".into(),
            sku: sku.to_owned(),
            stock_id: self.config.stock_id,
            salable_qty: qty,
            low_stock_threshold: (event_type == InventoryEventType::LowStock)
                .then_some(self.config.low_stock_threshold),
            order_increment_id: Some(increment_id.to_owned()),
            occurred_at: now_ms,
            produced_at: now_ms,
        }
    }
}

mod metrics {
    use std::sync::LazyLock;

    use prometheus::{IntCounterVec, register_int_counter_vec};

    pub(super) static CHECKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "order_ingest_inventory_checks_total",
            "Salable-quantity checks by outcome (fetched, cached, unknown_sku, failed, too_old: the order predates what stock can tell).",
            &["outcome"]
        )
        .expect("metric registers once")
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::Value;

    use super::*;
    use crate::source::fake::Shop;

    /// Counts calls and the most requests seen in flight at once; fails SKUs starting with `ERR`.
    struct Counting {
        stock: Mutex<HashMap<String, Decimal4>>,
        calls: AtomicUsize,
        in_flight: AtomicUsize,
        peak: AtomicUsize,
    }

    impl MagentoApi for Counting {
        async fn order(&self, _: i64) -> Result<Value, SourceError> {
            Err(SourceError::NotFound)
        }
        async fn customer(&self, _: i64) -> Result<Value, SourceError> {
            Err(SourceError::NotFound)
        }
        async fn salable_qty(&self, sku: &str, _: i32) -> Result<Option<Decimal4>, SourceError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if sku.starts_with("ERR") {
                return Err(SourceError::Unavailable("503".into()));
            }
            Ok(self.stock.lock().unwrap().get(sku).copied())
        }
    }

    fn order_with(skus: &[&str]) -> Order {
        let shop = Shop::generated(1);
        let json = shop.0.lock().unwrap().orders[&1].clone();
        let mut order =
            crate::normalize::order_event(&json, None, &Default::default(), 0).unwrap().order.expect("an order");
        let template = order.items[0].clone();
        order.items = skus
            .iter()
            .enumerate()
            .map(|(i, sku)| elo_events::OrderItem { item_id: i as i64, sku: (*sku).into(), ..template.clone() })
            .collect();
        order.created_at = 0; // placed at the epoch: checks "now" (1, 7, 8...) read after it
        order
    }

    fn counting(stock: &[(&str, i64)]) -> Counting {
        Counting {
            stock: Mutex::new(stock.iter().map(|(s, q)| ((*s).to_owned(), Decimal4::from_units(*q))).collect()),
            calls: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }
    }

    #[tokio::test]
    async fn the_worst_condition_wins_and_each_fresh_observation_is_an_event() {
        let magento = counting(&[("A", 100), ("B", 3), ("C", -2)]);
        let checker = InventoryChecker::new(InventoryConfig::default());
        let check = checker.check(&magento, &order_with(&["A", "B"]), 7).await;
        assert_eq!(check.status, InventoryStatus::LowStock);
        let kinds: Vec<_> = check.events.iter().map(|e| (e.sku.as_str(), e.event_type)).collect();
        assert_eq!(kinds, [("A", InventoryEventType::StockLevel), ("B", InventoryEventType::LowStock)]);
        assert_eq!(check.events[1].low_stock_threshold, Some(Decimal4::from_units(5)));
        assert_eq!(check.events[0].low_stock_threshold, None);
        check.events.iter().for_each(|e| checker.remember(e)); // acknowledged
        let check = checker.check(&magento, &order_with(&["A", "C", "UNKNOWN"]), 8).await;
        assert_eq!(check.status, InventoryStatus::Oversold);
        // A is cached (no event), C is fresh and oversold, UNKNOWN is not stock-managed.
        let kinds: Vec<_> = check.events.iter().map(|e| (e.sku.as_str(), e.event_type)).collect();
        assert_eq!(kinds, [("C", InventoryEventType::Oversold)]);
        assert_eq!(check.events[0].salable_qty, Decimal4::from_units(-2));
        assert_eq!(magento.calls.load(Ordering::SeqCst), 4, "A was asked once");
    }

    #[tokio::test]
    async fn failures_leave_the_order_unchecked_unless_something_worse_was_seen() {
        let magento = counting(&[("A", 100), ("C", -1)]);
        let checker = InventoryChecker::new(InventoryConfig::default());
        assert_eq!(checker.check(&magento, &order_with(&["A", "ERR1"]), 1).await.status, InventoryStatus::Unchecked);
        assert_eq!(checker.check(&magento, &order_with(&["C", "ERR2"]), 1).await.status, InventoryStatus::Oversold);
        // Failures are not cached: the next order asks again.
        checker.check(&magento, &order_with(&["ERR1"]), 1).await;
        assert_eq!(magento.calls.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn concurrency_is_bounded_across_orders_and_the_cache_expires() {
        let skus: Vec<String> = (0..40).map(|i| format!("S{i}")).collect();
        let stock: Vec<(&str, i64)> = skus.iter().map(|s| (s.as_str(), 50)).collect();
        let magento = Arc::new(counting(&stock));
        let config = InventoryConfig { concurrency: 3, cache_ttl: Duration::from_millis(300), ..Default::default() };
        let checker = Arc::new(InventoryChecker::new(config));
        let mut tasks = Vec::new();
        for chunk in skus.chunks(10) {
            let order = order_with(&chunk.iter().map(String::as_str).collect::<Vec<_>>());
            let (checker, magento) = (checker.clone(), magento.clone());
            tasks.push(tokio::spawn(async move { checker.check(&magento, &order, 1).await }));
        }
        for task in tasks {
            let check = task.await.unwrap();
            assert_eq!(check.status, InventoryStatus::Ok);
            check.events.iter().for_each(|e| checker.remember(e));
        }
        assert_eq!(magento.peak.load(Ordering::SeqCst), 3, "never more than the bound in flight");
        assert_eq!(magento.calls.load(Ordering::SeqCst), 40);
        tokio::time::sleep(Duration::from_millis(350)).await;
        let again = checker.check(&*magento, &order_with(&["S1"]), 2).await;
        assert_eq!(again.events.len(), 1, "an expired entry is observed afresh");
    }

    #[tokio::test]
    async fn sandbox_stock_is_read_per_sku_and_bundle_parents_are_skipped() {
        let shop = Shop::generated(300);
        let orders: Vec<Value> = shop.0.lock().unwrap().orders.values().cloned().collect();
        let bundle = orders
            .iter()
            .find(|o| o["items"].as_array().unwrap().iter().any(|i| i["product_type"] == "bundle"))
            .expect("the generator sells bundles");
        let order = crate::normalize::order_event(bundle, None, &Default::default(), 0).unwrap().order.unwrap();
        let checker = InventoryChecker::new(InventoryConfig::default());
        let check = checker.check(&shop, &order, 1).await;
        let bundle_skus: Vec<&str> =
            order.items.iter().filter(|i| i.product_type == "bundle").map(|i| i.sku.as_str()).collect();
        assert!(check.events.iter().all(|e| !bundle_skus.contains(&e.sku.as_str())));
        let expected = shop.0.lock().unwrap().stock[&check.events[0].sku].0;
        assert_eq!(check.events[0].salable_qty, Decimal4::parse(&expected.to_string()).unwrap());
    }

    #[tokio::test]
    async fn old_orders_are_not_tagged_with_todays_stock() {
        let shop = Shop::generated(30);
        let order = shop.0.lock().unwrap().orders[&1].clone();
        let mut event = crate::normalize::order_event(&order, None, &Default::default(), 0).unwrap();
        let order = event.order.as_mut().unwrap();
        let checker = InventoryChecker::new(InventoryConfig::default());
        let now = order.created_at + 2 * 365 * 86_400_000; // a backfill two years later
        let check = checker.check(&shop, order, now).await;
        assert_eq!(check, OrderCheck { status: InventoryStatus::Unchecked, events: vec![] });
        let fresh = checker.check(&shop, order, order.created_at + 60_000).await;
        assert_ne!(fresh.status, InventoryStatus::Unchecked, "a recent order is checked");
        assert!(!fresh.events.is_empty());
    }

    #[tokio::test]
    async fn a_cached_level_serves_only_orders_placed_before_it_was_read() {
        let magento = counting(&[("A", 10)]);
        let checker = InventoryChecker::new(InventoryConfig::default());
        let placed = |at: i64| Order { created_at: at, ..order_with(&["A"]) };
        let first = checker.check(&magento, &placed(0), 1_000).await;
        first.events.iter().for_each(|e| checker.remember(e));
        assert_eq!(checker.check(&magento, &placed(500), 2_000).await.status, InventoryStatus::Ok);
        assert_eq!(magento.calls.load(Ordering::SeqCst), 1, "placed before the read: the cache answers");
        // An order placed after the read took the last units and more: the cache cannot know.
        magento.stock.lock().unwrap().insert("A".into(), Decimal4::from_units(-1));
        let late = checker.check(&magento, &placed(1_500), 2_000).await;
        assert_eq!(late.status, InventoryStatus::Oversold, "a stale level never hides an oversell");
        assert_eq!(magento.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_reading_whose_fact_was_never_acknowledged_is_not_reused_later() {
        let magento = counting(&[("A", 10)]);
        let checker = InventoryChecker::new(InventoryConfig::default());
        // The first order's check fetches, then its publication is abandoned: neither
        // remembered nor forgotten.
        let abandoned = checker.check(&magento, &order_with(&["A"]), 1_000).await;
        assert_eq!(abandoned.events.len(), 1);
        let later = checker.check(&magento, &order_with(&["A"]), 2_000).await;
        assert_eq!(later.events.len(), 1, "observed and published again, not taken from the pending reading");
        assert_eq!(magento.calls.load(Ordering::SeqCst), 2);
    }
}
