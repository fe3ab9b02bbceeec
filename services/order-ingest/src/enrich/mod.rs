//! Enrichment between normalisation and publication, shared by push, poll, backfill and repair
//! commands: every path publishes through [`Enricher`], so an order carries the same consent
//! and inventory facts whichever way it arrived.
//!
//! - Registered customers' marketing consent comes from their customer record (cached briefly:
//!   one returning customer's burst of orders costs one lookup).
//! - Orders get an inventory check ([`crate::inventory`]); fresh stock observations are published
//!   to `inventory.events` (keyed by SKU) before the order, and the order carries the worst
//!   condition found.
//!
//! On the push path a cached consent is refreshed ahead of its expiry, in the background
//! ([`refresh_consents`]): a returning customer's webhook is served from the cache (still within
//! its TTL) instead of waiting for Magento every TTL, which put a 20 ms Magento call under
//! ~1% of warm webhooks, their p99. Stock readings still in use are refreshed the same way
//! ([`refresh_stock`], see [`crate::inventory`]).
//!
//! Enrichment failures never block an order: consent stays `UNKNOWN`, inventory `UNCHECKED`.
//! The `event_id` identifies the source fact only, so a redelivered order keeps its id even if
//! the stock observed the second time differs.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use elo_events::{CommerceEvent, InventoryEvent, MarketingConsent};
use tracing::Instrument;

use crate::inventory::InventoryChecker;
use crate::push::{PublishError, Publisher};
use crate::source::MagentoApi;
use crate::swept::SweptMap;

/// Publishes stock facts to `inventory.events`.
pub trait InventoryPublisher: Send + Sync + 'static {
    /// Publishes one event and resolves once the broker acknowledged it.
    fn publish_inventory(&self, event: &InventoryEvent) -> impl Future<Output = Result<(), PublishError>> + Send;
}

impl<T: InventoryPublisher> InventoryPublisher for std::sync::Arc<T> {
    fn publish_inventory(&self, event: &InventoryEvent) -> impl Future<Output = Result<(), PublishError>> + Send {
        (**self).publish_inventory(event)
    }
}

/// A [`Publisher`] that enriches before handing over to the inner one.
pub struct Enricher<P, M> {
    inner: P,
    magento: M,
    inventory: Option<InventoryChecker>,
    consent_ttl: Duration,
    consents: Mutex<SweptMap<i64, CachedConsent>>,
    /// When each customer's consent was last invalidated (their own change, an erasure): a
    /// Magento read started before that must not be cached (it may hold the old value).
    invalidated: Mutex<SweptMap<i64, Instant>>,
    consent_flights: crate::flight::Flights<i64>,
    budget: Option<Budget>,
    /// Where consents due for a refresh are queued ([`refresh_consents`]); `None`: they expire.
    refresh: Option<tokio::sync::mpsc::Sender<i64>>,
}

/// A customer's consent as last read.
struct CachedConsent {
    consent: MarketingConsent,
    /// When it was read, for the TTL (staggered by customer: [`crate::flight::staggered`]).
    at: Instant,
    /// Queued for a refresh ahead of its expiry (once per reading).
    refresh_queued: bool,
}

/// The push path's enrichment budget: past `limit`, the order is published as it is (`UNKNOWN`
/// consent, `UNCHECKED` inventory) and queued on `late` for [`follow_ups`], so a slow Magento
/// never turns into webhook timeouts.
#[derive(Clone, Debug)]
pub struct Budget {
    pub limit: Duration,
    pub late: tokio::sync::mpsc::Sender<CommerceEvent>,
}

/// Consent entries (and invalidation marks) kept before expired ones are first swept
/// ([`SweptMap`]).
const CONSENT_SWEEP_AT: usize = 50_000;

impl<P, M> Enricher<P, M> {
    /// `inventory: None` turns inventory checks off (orders stay `UNCHECKED`).
    pub fn new(inner: P, magento: M, inventory: Option<InventoryChecker>, consent_ttl: Duration) -> Self {
        let consents = Mutex::new(SweptMap::new(CONSENT_SWEEP_AT, consent_ttl, |cached: &CachedConsent| cached.at));
        // Reads take at most a few request timeouts: older marks guard nothing.
        let invalidated = Mutex::new(SweptMap::new(CONSENT_SWEEP_AT, INVALIDATION_KEPT, |at: &Instant| *at));
        let consent_flights = Default::default();
        Self {
            inner,
            magento,
            inventory,
            consent_ttl,
            consents,
            invalidated,
            consent_flights,
            budget: None,
            refresh: None,
        }
    }

    /// Consents in the last quarter of their TTL are served and queued on `refresh` for
    /// [`refresh_consents`] (push path).
    pub fn with_consent_refresh(mut self, refresh: tokio::sync::mpsc::Sender<i64>) -> Self {
        self.refresh = Some(refresh);
        self
    }

    /// Stock readings in use in the last quarter of their TTL are queued on `refresh` for
    /// [`refresh_stock`] (push path). Without inventory checks, nothing is queued.
    pub fn with_stock_refresh(mut self, refresh: tokio::sync::mpsc::Sender<String>) -> Self {
        self.inventory = self.inventory.take().map(|checker| checker.with_refresh(refresh));
        self
    }

    /// Enrichment past `budget.limit` is finished later (push path).
    pub fn with_budget(mut self, budget: Budget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// The publisher behind the enrichment.
    pub fn inner(&self) -> &P {
        &self.inner
    }
}

/// How long an invalidation is remembered: longer than any customer read can take (request
/// timeouts times attempts).
const INVALIDATION_KEPT: Duration = Duration::from_secs(600);

impl<P: Publisher + InventoryPublisher, M: MagentoApi> Enricher<P, M> {
    /// Whether the customer's consent was invalidated at or after `since`.
    fn invalidated_since(&self, customer_id: i64, since: Instant) -> bool {
        self.invalidated.lock().expect("invalidated lock").get(&customer_id).is_some_and(|at| *at >= since)
    }

    fn cached_consent(&self, customer_id: i64) -> Option<MarketingConsent> {
        let mut cache = self.consents.lock().expect("consent lock");
        let entry = cache.get_mut(&customer_id)?;
        let age = entry.at.elapsed();
        if age >= self.consent_ttl {
            return None;
        }
        // Due soon: a reading is queued once; a full queue leaves it to expire as before.
        if age >= self.consent_ttl - self.consent_ttl / 4
            && !entry.refresh_queued
            && let Some(refresh) = &self.refresh
        {
            entry.refresh_queued = refresh.try_send(customer_id).is_ok();
            if !entry.refresh_queued {
                metrics::CONSENT_REFRESHES.with_label_values(&["dropped"]).inc();
            }
        }
        Some(entry.consent.clone())
    }

    /// Reads `customer_id`'s consent again for a cached entry; an entry dropped meanwhile (the
    /// customer changed) stays dropped, and a failed read leaves the entry to expire.
    async fn refresh_consent(&self, customer_id: i64) {
        self.consent_flights
            .run(&customer_id, async {
                // Dropped (the customer changed, was erased), expired while queued, or read
                // again inline meanwhile: nothing to refresh, no Magento call.
                let due = self
                    .consents
                    .lock()
                    .expect("consent lock")
                    .get(&customer_id)
                    .is_some_and(|entry| entry.refresh_queued && entry.at.elapsed() < self.consent_ttl);
                if !due {
                    return;
                }
                let started = Instant::now();
                match self.magento.customer(customer_id).await {
                    Ok(customer) => {
                        let consent = crate::normalize::consent_of(Some(&customer));
                        let at = crate::flight::staggered(Instant::now(), self.consent_ttl, &customer_id);
                        let mut cache = self.consents.lock().expect("consent lock");
                        if let Some(entry) =
                            cache.get_mut(&customer_id).filter(|_| !self.invalidated_since(customer_id, started))
                        {
                            *entry = CachedConsent { consent, at, refresh_queued: false };
                        }
                        metrics::CONSENT_REFRESHES.with_label_values(&["refreshed"]).inc();
                    }
                    Err(error) => {
                        metrics::CONSENT_REFRESHES.with_label_values(&["failed"]).inc();
                        tracing::debug!(customer_id, error = %error, "consent refresh failed; the entry expires");
                    }
                }
            })
            .await;
    }

    /// Reads `sku`'s stock again for a cached reading due for it, publishes the fact and caches
    /// it once acknowledged (a fact that was not stays unpublished: the old reading expires).
    async fn refresh_stock(&self, sku: &str) {
        let Some(checker) = &self.inventory else { return };
        let Some(fact) = checker.refresh(&self.magento, sku).await else { return };
        // A trace of its own (no webhook waits for it): the refreshed fact carries its `traceparent`.
        let span = tracing::info_span!("stock_refresh", sku);
        match self.inner.publish_inventory(&fact).instrument(span).await {
            Ok(()) => checker.remember(&fact),
            Err(error) => {
                checker.forget(&fact);
                tracing::debug!(sku, error = %error, "refreshed stock fact not published; the entry expires");
            }
        }
    }

    /// The customer's consent: cached, or looked up once however many orders ask at once.
    async fn consent(&self, customer_id: i64) -> Option<MarketingConsent> {
        if let Some(consent) = self.cached_consent(customer_id) {
            return Some(consent);
        }
        self.consent_flights.run(&customer_id, self.fetch_consent(customer_id)).await
    }

    async fn fetch_consent(&self, customer_id: i64) -> Option<MarketingConsent> {
        if let Some(consent) = self.cached_consent(customer_id) {
            return Some(consent); // fetched while this one waited
        }
        let started = Instant::now();
        match self.magento.customer(customer_id).await {
            Ok(customer) => {
                let consent = crate::normalize::consent_of(Some(&customer));
                let mut cache = self.consents.lock().expect("consent lock");
                if self.invalidated_since(customer_id, started) {
                    // The customer changed while this read was on its way: used for this
                    // order (as read), not cached; the next order reads again.
                    return Some(consent);
                }
                let at = crate::flight::staggered(Instant::now(), self.consent_ttl, &customer_id);
                cache.insert(customer_id, CachedConsent { consent: consent.clone(), at, refresh_queued: false });
                Some(consent)
            }
            Err(error) => {
                tracing::warn!(customer_id, error = %error, "customer lookup failed; consent left unknown");
                None
            }
        }
    }
}

impl<P: Publisher + InventoryPublisher, M: MagentoApi> Enricher<P, M> {
    /// Enriches and publishes without a time budget (the late follow-ups).
    pub async fn publish_complete(&self, event: CommerceEvent) -> Result<(), PublishError> {
        self.publish_within(event, None).await
    }

    /// Customer changes and erasures carry nothing to enrich; they do make the customer's cached
    /// consent stale (the next order looks it up again), and a read already on its way too.
    async fn publish_unenriched(&self, event: &CommerceEvent) -> Result<(), PublishError> {
        let changed = event.customer.as_ref().and_then(|c| c.customer_id);
        if let Some(id) = changed.or_else(|| event.erasure.as_ref().and_then(|e| e.customer_id)) {
            // Under the cache's lock, as the reads' check-and-insert: no read can slip a stale
            // value in between the mark and the removal.
            let mut cache = self.consents.lock().expect("consent lock");
            let mut invalidated = self.invalidated.lock().expect("invalidated lock");
            invalidated.insert(id, Instant::now());
            cache.remove(&id);
        }
        self.inner.publish(event).await
    }

    /// Enriches `event` in place (no copy) and publishes it.
    async fn publish_within(&self, mut event: CommerceEvent, budget: Option<&Budget>) -> Result<(), PublishError> {
        if event.order.is_none() {
            return self.publish_unenriched(&event).await;
        }
        // Consent and every SKU's stock are asked at once, not one after another.
        let registered = event.customer.as_ref().and_then(|c| c.customer_id).filter(|_| event.order.is_some());
        let event_ref = &event;
        let consent = async {
            match registered {
                Some(id) => self.consent(id).await,
                None => None,
            }
        };
        let check = async {
            match (&self.inventory, &event_ref.order) {
                (Some(checker), Some(order)) => Some(checker.check(&self.magento, order, crate::now_ms()).await),
                _ => None,
            }
        };
        let enrichment = async { tokio::join!(consent, check) };
        let (consent, check) = match budget {
            None => enrichment.await,
            Some(budget) => match tokio::time::timeout(budget.limit, enrichment).await {
                Ok(found) => found,
                Err(_) => {
                    // Published as it is now; the complete enrichment follows as its own event.
                    let queued = budget.late.try_send(event_ref.clone()).is_ok();
                    metrics::LATE.with_label_values(&[if queued { "queued" } else { "dropped" }]).inc();
                    if !queued {
                        tracing::warn!("enrichment follow-up queue full: this order stays unchecked");
                    }
                    (None, None)
                }
            },
        };
        if let (Some(checker), Some(check)) = (&self.inventory, &check) {
            let sends = check.events.iter().map(|e| self.inner.publish_inventory(e));
            let results = futures::future::join_all(sends).await;
            // Only acknowledged facts are cached: a lost one is observed and published again.
            for (fact, result) in check.events.iter().zip(&results) {
                match result {
                    Ok(()) => checker.remember(fact),
                    Err(_) => checker.forget(fact),
                }
            }
            results.into_iter().collect::<Result<Vec<()>, _>>()?;
        }
        if let (Some(person), Some(consent)) = (event.customer.as_mut(), consent) {
            person.consent = consent;
        }
        if let (Some(order), Some(check)) = (event.order.as_mut(), check) {
            order.inventory_status = check.status;
        }
        self.inner.publish(&event).await
    }
}

/// Publishes the complete enrichment of orders that went out past the budget, one at a time,
/// as their own events: the same source version with an id of its own (the first event's id
/// is taken). Best effort: a follow-up that fails is logged, the order itself is already out.
pub async fn follow_ups<P: Publisher + InventoryPublisher, M: MagentoApi>(
    mut late: tokio::sync::mpsc::Receiver<CommerceEvent>,
    enricher: std::sync::Arc<Enricher<P, M>>,
    erased: std::sync::Arc<crate::erasure::ErasedKeys>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let mut event = tokio::select! {
            event = late.recv() => match event { Some(event) => event, None => return },
            _ = stop.cancelled() => return,
        };
        if erased.suppresses(&event) {
            continue;
        }
        event.event_id = elo_events::ids::event_id(&[&event.event_id, "enrichment"]);
        event.produced_at = crate::now_ms();
        let event_id = event.event_id.clone();
        // A trace of its own (the webhook's has ended): the follow-up carries its `traceparent`.
        let span = tracing::info_span!("enrichment_follow_up", event_id = %event_id);
        if let Err(error) = enricher.publish_complete(event).instrument(span).await {
            metrics::LATE.with_label_values(&["failed"]).inc();
            tracing::warn!(error = %error, event_id = %event_id, "enrichment follow-up not published");
        }
    }
}

/// Consent refreshes ahead of expiry, a few at a time (they share the push path's Magento
/// pool with webhook refetches), until `stop`.
pub async fn refresh_consents<P: Publisher + InventoryPublisher, M: MagentoApi>(
    queue: tokio::sync::mpsc::Receiver<i64>,
    enricher: std::sync::Arc<Enricher<P, M>>,
    stop: tokio_util::sync::CancellationToken,
) {
    refreshes(queue, stop, |id| {
        let enricher = enricher.clone();
        async move { enricher.refresh_consent(id).await }
    })
    .await
}

/// Stock readings refreshed ahead of expiry, a few at a time (same pool as above), until `stop`.
pub async fn refresh_stock<P: Publisher + InventoryPublisher, M: MagentoApi>(
    queue: tokio::sync::mpsc::Receiver<String>,
    enricher: std::sync::Arc<Enricher<P, M>>,
    stop: tokio_util::sync::CancellationToken,
) {
    refreshes(queue, stop, |sku| {
        let enricher = enricher.clone();
        async move { enricher.refresh_stock(&sku).await }
    })
    .await
}

/// Runs `refresh` for each key queued, [`REFRESH_CONCURRENCY`] at a time, until `stop`.
async fn refreshes<K, F: Future<Output = ()>>(
    queue: tokio::sync::mpsc::Receiver<K>,
    stop: tokio_util::sync::CancellationToken,
    refresh: impl FnMut(K) -> F,
) {
    use futures::StreamExt;
    let due = futures::stream::unfold(queue, |mut queue| async move { queue.recv().await.map(|key| (key, queue)) });
    tokio::select! {
        _ = due.for_each_concurrent(REFRESH_CONCURRENCY, refresh) => {}
        _ = stop.cancelled() => {}
    }
}

/// Refreshes of each kind in flight at once.
const REFRESH_CONCURRENCY: usize = 4;

impl<P: Publisher + InventoryPublisher, M: MagentoApi> Publisher for Enricher<P, M> {
    async fn publish(&self, event: &CommerceEvent) -> Result<(), PublishError> {
        if event.order.is_none() {
            return self.publish_unenriched(event).await;
        }
        self.publish_within(event.clone(), self.budget.as_ref()).await
    }

    async fn publish_owned(&self, event: CommerceEvent) -> Result<(), PublishError> {
        self.publish_within(event, self.budget.as_ref()).await
    }

    async fn dead_letter(&self, letter: &crate::push::DeadLetter) -> Result<(), PublishError> {
        self.inner.dead_letter(letter).await
    }
}

mod metrics {
    use std::sync::LazyLock;

    use prometheus::{IntCounterVec, register_int_counter_vec};

    pub(super) static CONSENT_REFRESHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "order_ingest_consent_refreshes_total",
            "Cached consents read again ahead of their expiry (push path), by outcome (refreshed, failed, dropped: the queue was full).",
            &["outcome"]
        )
        .expect("metric registers once")
    });

    pub(super) static LATE: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "order_ingest_enrichment_late_total",
            "Orders published past the push enrichment budget, by follow-up outcome (queued, dropped, failed).",
            &["outcome"]
        )
        .expect("metric registers once")
    });
}

#[cfg(test)]
pub(crate) mod tests;
