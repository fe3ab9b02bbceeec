//! Stock facts from `inventory.events` (keyed by SKU): the latest salable quantity per SKU and
//! stock, and since when it has been negative. A quantity that stays negative past
//! `--negative-stock-grace` is reported (status, metric): Magento sold what it did not have
//! and nobody corrected the stock. Kept in its own state store (`reconciler.stock`),
//! co-partitioned with `inventory.events`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use elo_events::{EventCodec, InventoryEvent};
use elo_kafka::{HandlerError, Record, StateStore};
use serde::{Deserialize, Serialize};

use crate::metrics;

/// The stock store's key of a fact.
pub fn key(event: &InventoryEvent) -> String {
    format!("{}@{}", event.sku, event.stock_id)
}

/// What the reconciler knows of one SKU's stock.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    /// Latest salable quantity, in ten-thousandths (`Decimal4`).
    pub salable: i64,
    /// `occurred_at` of the latest fact.
    pub at_ms: i64,
    /// `occurred_at` of the first fact of the current negative run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_since_ms: Option<i64>,
    /// Orders that oversold it during the current negative run (the last few).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orders: Vec<String>,
}

/// Orders remembered per negative run.
const ORDERS_KEPT: usize = 10;

impl Stock {
    /// Folds a fact in; older facts change nothing.
    pub fn apply(&mut self, event: &InventoryEvent) {
        if event.occurred_at < self.at_ms {
            return;
        }
        self.salable = event.salable_qty.unscaled();
        self.at_ms = event.occurred_at;
        if self.salable < 0 {
            self.negative_since_ms.get_or_insert(event.occurred_at);
            if let Some(order) = &event.order_increment_id
                && !self.orders.contains(order)
            {
                self.orders.push(order.clone());
                if self.orders.len() > ORDERS_KEPT {
                    self.orders.remove(0);
                }
            }
        } else {
            self.negative_since_ms = None;
            self.orders.clear();
        }
    }

    /// Negative for longer than `grace_ms` at `now_ms`.
    pub fn stuck_negative(&self, grace_ms: i64, now_ms: i64) -> bool {
        self.negative_since_ms.is_some_and(|since| now_ms - since > grace_ms)
    }
}

/// The stock facts side: its own store, co-partitioned with `inventory.events`.
pub struct StockSide {
    pub store: StateStore<Stock>,
    pub topic: String,
    /// A quantity negative for longer than this is reported.
    pub grace: std::time::Duration,
    held: Mutex<BTreeSet<i32>>,
    locks: Mutex<HashMap<i32, Arc<tokio::sync::Mutex<()>>>>,
}

impl StockSide {
    pub fn new(store: StateStore<Stock>, topic: String, grace: std::time::Duration) -> Self {
        Self { store, topic, grace, held: Mutex::default(), locks: Mutex::default() }
    }

    fn lock(&self, partition: i32) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().expect("locks").entry(partition).or_default().clone()
    }

    pub(crate) async fn start(&self, partition: i32) -> Result<(), HandlerError> {
        let keys = self
            .store
            .restore_async(partition)
            .await
            .map_err(|e| HandlerError::new(e.class(), e.code(), e.to_string()))?;
        tracing::info!(partition, keys, "stock partition restored");
        self.held.lock().expect("held").insert(partition);
        Ok(())
    }

    pub(crate) fn stop(&self, partition: i32) {
        let lock = self.lock(partition);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let _guard = loop {
            match lock.try_lock() {
                Ok(guard) => break Some(guard),
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(_) => break None,
            }
        };
        self.held.lock().expect("held").remove(&partition);
        self.store.release(partition);
    }

    pub(crate) async fn handle(&self, codec: &EventCodec, batch: &[Record]) -> Vec<Result<(), HandlerError>> {
        let Some(partition) = batch.first().map(|r| r.partition) else { return Vec::new() };
        let lock = self.lock(partition);
        let _guard = lock.lock().await;
        let mut results = Vec::with_capacity(batch.len());
        let mut touched: BTreeMap<String, Stock> = BTreeMap::new();
        for record in batch {
            match elo_service::decode_record::<elo_events::InventoryEvent>(codec, record).await {
                Ok(event) => {
                    let key = key(&event);
                    let mut stock =
                        touched.remove(&key).or_else(|| self.store.get(partition, &key)).unwrap_or_default();
                    stock.apply(&event);
                    touched.insert(key, stock);
                    metrics::RECORDS.with_label_values(&["inventory"]).inc();
                    results.push(Ok(()));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        for (key, stock) in touched {
            if let Err(error) = self.store.put(partition, &key, stock).await {
                let e = HandlerError::new(error.class(), format!("stock_{}", error.code()), error.to_string());
                return vec![Err(e); batch.len()];
            }
        }
        results
    }

    /// SKUs negative past the grace period, sorted.
    pub(crate) fn stuck(&self, now: i64) -> Vec<String> {
        let held: Vec<i32> = self.held.lock().expect("held").iter().copied().collect();
        let grace = self.grace.as_millis() as i64;
        let mut out: Vec<String> = held
            .into_iter()
            .flat_map(|p| self.store.entries(p))
            .filter(|(_, s)| s.stuck_negative(grace, now))
            .map(|(k, _)| k)
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use elo_events::{Decimal4, InventoryEventType};

    use super::*;

    fn fact(qty: i64, at: i64, order: Option<&str>) -> InventoryEvent {
        InventoryEvent {
            event_id: format!("i{at}"),
            event_type: if qty < 0 { InventoryEventType::Oversold } else { InventoryEventType::StockLevel },
            source_system: "magento".into(),
            sku: "SKU-1".into(),
            stock_id: 1,
            salable_qty: Decimal4::from_units(qty),
            low_stock_threshold: None,
            order_increment_id: order.map(str::to_owned),
            occurred_at: at,
            produced_at: at,
        }
    }

    #[test]
    fn a_negative_run_is_reported_once_it_lasts_and_ends_with_a_correction() {
        let mut s = Stock::default();
        s.apply(&fact(3, 10, None));
        assert!(!s.stuck_negative(0, 1_000));
        s.apply(&fact(-1, 20, Some("100001")));
        s.apply(&fact(-2, 30, Some("100002")));
        assert_eq!((s.negative_since_ms, s.orders.len()), (Some(20), 2), "the run starts with its first fact");
        assert_eq!(key(&fact(0, 0, None)), "SKU-1@1");
        assert!(!s.stuck_negative(100, 50), "not for long yet");
        assert!(s.stuck_negative(100, 200));
        s.apply(&fact(-5, 25, None));
        assert_eq!(s.salable, Decimal4::from_units(-2).unscaled(), "an older fact changes nothing");
        s.apply(&fact(4, 40, None));
        assert!(!s.stuck_negative(100, 10_000), "corrected");
        assert!(s.orders.is_empty());
    }
}
