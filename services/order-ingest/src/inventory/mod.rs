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
//!
//! On the push path an entry still in use in the last quarter of its TTL is read again in the
//! background ([`InventoryChecker::refresh`]), its fact published and then cached like any
//! other: orders placed before that reading (status changes, invoices and shipments of orders
//! already placed, most of a store's webhooks) are served without waiting for Magento every TTL.
//! A new order still waits for a reading taken after it was placed.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use elo_events::{Decimal4, InventoryEvent, InventoryEventType, InventoryStatus, Order, ids};
use futures::StreamExt;
use tokio::sync::Semaphore;

use crate::source::{MagentoApi, SourceError};
use crate::swept::SweptMap;

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

/// Entries kept before expired ones are first swept; later sweeps wait for the map to double
/// what the last one left ([`SweptMap`]). A bound on memory, not a hard cap.
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
    cache: Mutex<SweptMap<String, Cached>>,
    /// Fetched, its fact not yet acknowledged: shared with orders that waited on the fetch
    /// (single flight), never served from the cache.
    pending: Mutex<SweptMap<String, Cached>>,
    flights: crate::flight::Flights<String>,
    /// Where SKUs due for a background reading are queued (push path); `None`: entries expire.
    refresh: Option<tokio::sync::mpsc::Sender<String>>,
    /// Wall clock (ms UTC) for stamping a reading when its request leaves.
    clock: fn() -> i64,
}

/// A SKU's salable quantity as last read (`None`: not stock-managed).
struct Cached {
    qty: Option<Decimal4>,
    /// When it was cached, for the TTL (staggered by SKU: [`crate::flight::staggered`]).
    at: Instant,
    /// When it was stored, not staggered: a pending reading serves the checks that arrived
    /// before then (they waited for that very fetch).
    stored: Instant,
    /// No later than when it was read (ms UTC): it serves orders placed until then.
    read_at: i64,
    /// Queued for a background reading (once per reading, unless an order's newer reading held
    /// the refresh back and was then forgotten).
    refresh_queued: bool,
}

impl Cached {
    /// A reading stored now, its expiry staggered by SKU.
    fn now(qty: Option<Decimal4>, read_at: i64, ttl: Duration, sku: &str) -> Self {
        let stored = Instant::now();
        Self { qty, at: crate::flight::staggered(stored, ttl, sku), stored, read_at, refresh_queued: false }
    }
}

enum Observation {
    Cached(Option<Decimal4>),
    /// Read from Magento, with when the request left (ms UTC).
    Fresh(Option<Decimal4>, i64),
    Failed(SourceError),
}

impl InventoryChecker {
    pub fn new(config: InventoryConfig) -> Self {
        metrics::CHECKS.with_label_values(&["fetched"]).inc_by(0);
        let permits = Semaphore::new(config.concurrency.max(1));
        // Expired readings are never served; past the threshold they are swept (memory bound).
        let readings = || Mutex::new(SweptMap::new(CACHE_SWEEP_AT, config.cache_ttl, |reading: &Cached| reading.at));
        let (cache, pending) = (readings(), readings());
        Self { config, permits, cache, pending, flights: Default::default(), refresh: None, clock: crate::now_ms }
    }

    /// Stamps readings with `clock` instead of the wall clock (tests that run on their own time).
    #[cfg(test)]
    pub fn with_clock(mut self, clock: fn() -> i64) -> Self {
        self.clock = clock;
        self
    }

    /// Entries in use in the last quarter of their TTL are queued on `due` for a background
    /// reading ([`Self::refresh`]); a full queue leaves them to expire.
    pub fn with_refresh(mut self, due: tokio::sync::mpsc::Sender<String>) -> Self {
        metrics::REFRESHES.with_label_values(&["refreshed"]).inc_by(0);
        self.refresh = Some(due);
        self
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
                Observation::Fresh(qty, read_at) => {
                    if let Some(qty) = qty {
                        events.push(self.event(&sku, qty, Some(&order.increment_id), read_at));
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
        let cached = {
            let mut cache = self.cache.lock().expect("cache lock");
            cache.get_mut(sku).filter(|c| usable(c)).map(|c| {
                self.queue_refresh(sku, c);
                c.qty
            })
        };
        cached.or_else(|| {
            let pending = self.pending.lock().expect("cache lock");
            // Compared with when it was stored, not with its staggered expiry stamp (up to a
            // quarter TTL earlier), which no check behind a fetch of a few ms would ever precede.
            pending.get(sku).filter(|c| usable(c) && arrived <= c.stored).map(|c| c.qty)
        })
    }

    /// A cached entry served in the last quarter of its TTL is queued for a background reading,
    /// once per reading.
    fn queue_refresh(&self, sku: &str, entry: &mut Cached) {
        let Some(refresh) = &self.refresh else { return };
        let ttl = self.config.cache_ttl;
        if entry.refresh_queued || entry.at.elapsed() < ttl - ttl / 4 {
            return;
        }
        entry.refresh_queued = refresh.try_send(sku.to_owned()).is_ok();
        metrics::REFRESHES.with_label_values(&[if entry.refresh_queued { "queued" } else { "dropped" }]).inc();
    }

    /// Reads `sku` again for a cached entry queued by [`Self::queue_refresh`]. Returns the fresh
    /// fact to publish (and then [`Self::remember`] or, unacknowledged, [`Self::forget`]), or
    /// nothing: the entry expired or was replaced meanwhile, or a newer reading awaits its
    /// acknowledgement (no Magento call; see [`Self::forget`] should it never be), the SKU is
    /// not stock-managed (cached at once), or the read failed (the entry expires as before and
    /// the next order reads inline).
    pub async fn refresh<M: MagentoApi>(&self, magento: &M, sku: &str) -> Option<InventoryEvent> {
        let ttl = self.config.cache_ttl;
        self.flights
            .run(&sku.to_owned(), async {
                // Not due once the entry expired or was replaced, or while a newer reading is on
                // its way to replace it (an inline read whose fact awaits its acknowledgement; one
                // older than the TTL was abandoned, say by a check cut off by the push budget).
                let newer = (self.pending.lock().expect("cache lock").get(sku))
                    .filter(|p| p.at.elapsed() < ttl)
                    .map(|p| p.read_at);
                let due = self.cache.lock().expect("cache lock").get(sku).is_some_and(|c| {
                    c.refresh_queued && c.at.elapsed() < ttl && newer.is_none_or(|read_at| read_at <= c.read_at)
                });
                if !due {
                    metrics::REFRESHES.with_label_values(&["not_due"]).inc();
                    return None;
                }
                let _permit = self.permits.acquire().await.expect("semaphore never closed");
                // Taken before the request: the reading holds every order placed until then.
                let read_at = (self.clock)();
                match magento.salable_qty(sku, self.config.stock_id).await {
                    Ok(Some(qty)) => {
                        metrics::REFRESHES.with_label_values(&["refreshed"]).inc();
                        // Like an inline fetch's: checks that waited for this read reuse it while
                        // its fact is on its way (then [`Self::remember`] or [`Self::forget`]).
                        self.hold_pending(sku, Cached::now(Some(qty), read_at, ttl, sku));
                        Some(self.event(sku, qty, None, read_at))
                    }
                    Ok(None) => {
                        metrics::REFRESHES.with_label_values(&["refreshed"]).inc();
                        self.cache_entry(sku, Cached::now(None, read_at, ttl, sku));
                        None
                    }
                    Err(error) => {
                        metrics::REFRESHES.with_label_values(&["failed"]).inc();
                        tracing::debug!(sku, error = %error, "stock refresh failed; the entry expires");
                        None
                    }
                }
            })
            .await
    }

    /// `placed_at`: when the order was placed; `now_ms`: a time no later than the read. A fresh
    /// reading is stamped when its request leaves (never before `now_ms`): a check that waited
    /// for the gate or a permit must not look older than a reading taken while it waited (the
    /// reconciler keeps a SKU's newest fact, and this one may be the oversell).
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
                let read_at = now_ms.max((self.clock)());
                match magento.salable_qty(sku, self.config.stock_id).await {
                    Ok(qty) => {
                        let outcome = if qty.is_some() { "fetched" } else { "unknown_sku" };
                        metrics::CHECKS.with_label_values(&[outcome]).inc();
                        let reading = Cached::now(qty, read_at, self.config.cache_ttl, sku);
                        if qty.is_none() {
                            // Not stock-managed: no event to wait for.
                            self.cache_entry(sku, reading);
                        } else {
                            self.hold_pending(sku, reading);
                        }
                        Observation::Fresh(qty, read_at)
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
    /// publishes it again). An order's reading newer than the cached one had held back that
    /// entry's refresh ([`Self::refresh`]), so the entry may be queued again; a refresh's own
    /// reading leaves its entry to expire (no Magento call per order while the broker fails).
    pub fn forget(&self, event: &InventoryEvent) {
        let removed = {
            let mut pending = self.pending.lock().expect("cache lock");
            let ours = pending.get(&event.sku).is_some_and(|p| p.read_at == event.occurred_at);
            ours.then(|| pending.remove(&event.sku)).flatten()
        };
        if let Some(reading) = removed
            && event.order_increment_id.is_some()
            && let Some(entry) = self.cache.lock().expect("cache lock").get_mut(&event.sku)
            && entry.read_at < reading.read_at
        {
            entry.refresh_queued = false;
        }
    }

    /// Caches an observation once its event was acknowledged (never an older read over a newer).
    pub fn remember(&self, event: &InventoryEvent) {
        let read_at = event.occurred_at;
        self.cache_entry(&event.sku, Cached::now(Some(event.salable_qty), read_at, self.config.cache_ttl, &event.sku));
        self.forget(event);
    }

    /// Holds a reading until its fact is acknowledged ([`Self::remember`]) or not
    /// ([`Self::forget`]). A check cut off by the push budget does neither, so expired readings
    /// (never served again: see [`Self::reusable`] and [`Self::refresh`]) are swept as the
    /// cache's are, instead of one staying for every SKU ever abandoned.
    fn hold_pending(&self, sku: &str, reading: Cached) {
        self.pending.lock().expect("cache lock").insert(sku.to_owned(), reading);
    }

    fn cache_entry(&self, sku: &str, reading: Cached) {
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.get(sku).is_none_or(|newest| newest.read_at <= reading.read_at) {
            cache.insert(sku.to_owned(), reading);
        }
    }

    /// A stock fact: read for an order's check (`order`), or in the background (`None`, its own
    /// observation at `now_ms`).
    fn event(&self, sku: &str, qty: Decimal4, order: Option<&str>, now_ms: i64) -> InventoryEvent {
        let event_type = self.classify(qty);
        let (stock, qty_text) = (self.config.stock_id.to_string(), qty.to_string());
        // The same order's check seeing the same quantity is the same fact; a background
        // reading is a fact of its own moment.
        let read_at = now_ms.to_string();
        let event_id = match order {
            Some(order) => ids::event_id(&["magento", "salable", sku, &stock, &qty_text, order]),
            None => ids::event_id(&["magento", "salable", sku, &stock, &qty_text, "refresh", &read_at]),
        };
        InventoryEvent {
            event_id,
            event_type,
            source_system: "magento".into(),
            sku: sku.to_owned(),
            stock_id: self.config.stock_id,
            salable_qty: qty,
            low_stock_threshold: (event_type == InventoryEventType::LowStock)
                .then_some(self.config.low_stock_threshold),
            order_increment_id: order.map(str::to_owned),
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

    pub(super) static REFRESHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "order_ingest_stock_refreshes_total",
            "Cached salable quantities read again ahead of their expiry (push path), by outcome (queued, refreshed, failed, not_due: expired, replaced or about to be replaced while queued, dropped: the queue was full).",
            &["outcome"]
        )
        .expect("metric registers once")
    });
}

#[cfg(test)]
mod tests;
