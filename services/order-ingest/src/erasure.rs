//! Erasure that sticks: once a person is erased, no path (the poll's overlap, a backfill, a
//! repair command, a late webhook) republishes the personal data they had at that time.
//!
//! Every erasure is first recorded in a compacted topic (`ELO_ORDER_INGEST_ERASED_TOPIC`),
//! keyed by customer key (`c:<id>` and the e-mail's `g:<sha256>`), value
//! `{"erased_at": <ms>}`, and only then announced as `CUSTOMER_ERASED`. Every replica reads the
//! topic at startup and keeps tailing it, so an erasure taken by one replica binds them all.
//! [`ErasureGuard`] sits in front of every publication and drops events that carry data from
//! before the erasure:
//! - an order placed at or before the erasure (its later status changes included: the order is
//!   part of what was erased);
//! - a customer version saved at or before it.
//!
//! What the person does afterwards (a new order, a new registration) is new data and flows.

use std::collections::HashMap;
use std::sync::RwLock;

use elo_events::{CommerceEvent, CommerceEventType, ids};
use serde::{Deserialize, Serialize};

use crate::push::{DeadLetter, PublishError, Publisher};

/// The erased-keys record's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Erased {
    /// When the erasure was requested (ms, UTC).
    pub erased_at: i64,
}

/// Customer keys erased so far, and when (the latest erasure of a key wins).
#[derive(Debug, Default)]
pub struct ErasedKeys(RwLock<HashMap<String, i64>>);

impl ErasedKeys {
    /// Records an erasure (never moves a key's time back).
    pub fn record(&self, key: &str, erased_at: i64) {
        let mut keys = self.0.write().expect("erased keys lock");
        let at = keys.entry(key.to_owned()).or_insert(erased_at);
        *at = (*at).max(erased_at);
    }

    /// How many keys are erased.
    pub fn len(&self) -> usize {
        self.0.read().expect("erased keys lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `event` carries data its person had when they were erased.
    pub fn suppresses(&self, event: &CommerceEvent) -> bool {
        if event.event_type == CommerceEventType::CustomerErased {
            return false;
        }
        let keys = self.0.read().expect("erased keys lock");
        if keys.is_empty() {
            return false;
        }
        // By the event's key and by the e-mail's guest key: a registered customer's guest orders
        // (and a guest's later registration) are the same person.
        let guest_key = event.customer.as_ref().map(|c| ids::customer_key(None, &c.email));
        let erased_at = [Some(event.customer_key.as_str()), guest_key.as_deref()]
            .into_iter()
            .flatten()
            .filter_map(|key| keys.get(key).copied())
            .max();
        let Some(erased_at) = erased_at else { return false };
        let data_from = event.order.as_ref().map_or(event.source_version.updated_at, |o| o.created_at);
        data_from <= erased_at
    }
}

/// Where erasures are recorded before they are announced.
pub trait ErasureLog: Send + Sync + 'static {
    /// Stores `key`'s erasure and resolves once the broker acknowledged it.
    fn append(&self, key: &str, erased: Erased) -> impl Future<Output = Result<(), PublishError>> + Send;
}

/// A [`Publisher`] that records erasures first and drops what they erased.
pub struct ErasureGuard<P, L> {
    inner: P,
    keys: std::sync::Arc<ErasedKeys>,
    log: L,
}

impl<P, L> ErasureGuard<P, L> {
    pub fn new(inner: P, keys: std::sync::Arc<ErasedKeys>, log: L) -> Self {
        std::sync::LazyLock::force(&metrics::SUPPRESSED);
        Self { inner, keys, log }
    }
}

impl<P: Publisher, L: ErasureLog> ErasureGuard<P, L> {
    /// Whether `event` may go out: erasures are recorded first (once anyone saw one, every path
    /// obeys it); what they erased is dropped.
    async fn admit(&self, event: &CommerceEvent) -> Result<bool, PublishError> {
        if event.event_type == CommerceEventType::CustomerErased {
            let erased = Erased { erased_at: event.source_version.updated_at };
            self.log.append(&event.customer_key, erased).await?;
            self.keys.record(&event.customer_key, erased.erased_at);
        } else if self.keys.suppresses(event) {
            metrics::SUPPRESSED.inc();
            tracing::debug!(event_type = event.event_type.as_str(), "not republished: its person was erased");
            return Ok(false);
        }
        Ok(true)
    }
}

impl<P: Publisher, L: ErasureLog> Publisher for ErasureGuard<P, L> {
    async fn publish(&self, event: &CommerceEvent) -> Result<(), PublishError> {
        if self.admit(event).await? {
            self.inner.publish(event).await?;
        }
        Ok(())
    }

    async fn publish_owned(&self, event: CommerceEvent) -> Result<(), PublishError> {
        if self.admit(&event).await? {
            self.inner.publish_owned(event).await?;
        }
        Ok(())
    }

    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), PublishError> {
        self.inner.dead_letter(letter).await
    }
}

mod metrics {
    use std::sync::LazyLock;

    use prometheus::{IntCounter, register_int_counter};

    pub(super) static SUPPRESSED: LazyLock<IntCounter> = LazyLock::new(|| {
        register_int_counter!(
            "order_ingest_erased_suppressed_total",
            "Events not published because they carry data of a person erased after it."
        )
        .expect("metric registers once")
    });
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Erasures kept in memory, in order.
    #[derive(Default, Clone)]
    pub(crate) struct MemoryLog(pub(crate) Arc<Mutex<Vec<(String, Erased)>>>);

    impl ErasureLog for MemoryLog {
        async fn append(&self, key: &str, erased: Erased) -> Result<(), PublishError> {
            self.0.lock().unwrap().push((key.to_owned(), erased));
            Ok(())
        }
    }

    #[tokio::test]
    async fn after_an_erasure_a_backfill_republishes_none_of_the_persons_orders() {
        let shop = crate::source::fake::Shop::generated(120);
        let (id, email, theirs, first, everyone) = {
            let mut magento = shop.0.lock().unwrap();
            crate::poll::tests::one_store(&mut magento);
            let person = magento.orders.values().find(|o| o["customer_is_guest"] == 0).unwrap().clone();
            let (id, email) =
                (person["customer_id"].as_i64().unwrap(), person["customer_email"].as_str().unwrap().to_owned());
            let lowered = email.to_lowercase();
            let theirs = magento
                .orders
                .values()
                .filter(|o| {
                    o["customer_id"] == id
                        || o["customer_email"].as_str().map(str::to_lowercase) == Some(lowered.clone())
                })
                .count();
            let first = magento.orders.values().filter_map(|o| o["updated_at"].as_str()).min().unwrap().to_owned();
            let everyone = magento.orders.len();
            (id, email, theirs, first, everyone)
        };
        let email = email.as_str();

        let recorder = crate::enrich::tests::Recorder::default();
        let log = MemoryLog::default();
        let guard = ErasureGuard::new(recorder.clone(), Arc::new(ErasedKeys::default()), log.clone());
        let request = crate::normalize::ErasureRequest {
            customer_id: Some(id),
            email: email.to_owned(),
            reason: "erasure_request",
            store_id: 1,
            requested_at: crate::now_ms(),
            request_ref: None,
        };
        for event in crate::normalize::erasure_events(&request, &Default::default(), 0).unwrap() {
            guard.publish(&event).await.unwrap();
        }
        assert_eq!(log.0.lock().unwrap().len(), 2, "both keys recorded before the announcement");

        let search = crate::poll::tests::Sandbox::new(shop.0.clone());
        let stores = crate::normalize::Stores([(1, ("default".to_owned(), 1))].into_iter().collect());
        let from = crate::normalize::parse_magento_time(&first).unwrap();
        let args = crate::backfill::BackfillArgs {
            from_ms: from,
            entities: vec![crate::poll::Entity::Orders],
            stores: vec![],
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let summary = crate::backfill::run(&search, &guard, &stores, &args, 50, &stop).await;
        assert!(summary.failed_scopes.is_empty());
        let events = recorder.events.lock().unwrap();
        let orders: Vec<_> = events.iter().filter(|e| e.order.is_some()).collect();
        assert!(theirs > 0 && orders.len() == everyone - theirs, "everyone else's orders, none of theirs");
        let guest_key = ids::customer_key(None, email);
        assert!(orders.iter().all(|e| e.customer_key != format!("c:{id}") && e.customer_key != guest_key));
        assert!(orders.iter().all(|e| e.customer.as_ref().unwrap().email != email.to_lowercase()));
    }

    #[test]
    fn what_the_person_does_after_the_erasure_is_new_data() {
        let keys = ErasedKeys::default();
        let shop = crate::source::fake::Shop::generated(20);
        let order = shop.0.lock().unwrap().orders.values().find(|o| o["customer_is_guest"] == 0).unwrap().clone();
        let mut event = crate::normalize::order_event(&order, None, &Default::default(), 0).unwrap();
        let placed = event.order.as_ref().unwrap().created_at;
        keys.record(&event.customer_key, placed + 1_000);
        assert!(keys.suppresses(&event), "placed before the erasure");
        event.source_version.updated_at = placed + 60_000; // shipped later: still the erased order
        assert!(keys.suppresses(&event));
        event.order.as_mut().unwrap().created_at = placed + 5_000; // a new order afterwards
        assert!(!keys.suppresses(&event));
        keys.record(&event.customer_key, placed); // an older erasure does not move it back
        event.order.as_mut().unwrap().created_at = placed + 500;
        assert!(keys.suppresses(&event));
    }
}
