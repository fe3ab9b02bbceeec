//! Incremental poll of `GET /V1/orders` by `updated_at`: the safety net under push.
//!
//! Each round asks for orders updated since `cursor - overlap`, sorted by `updated_at` then
//! `entity_id`, paging by `total_count` (Magento answers a page past the end with the last page
//! again, so "until an empty page" would never end). The overlap re-reads a window before the
//! cursor, catching orders committed late with earlier timestamps (Magento's naive UTC
//! timestamps and concurrent commits make that real); the checkpoint remembers which
//! (updated_at, entity_id) pairs inside the window were already published, so the overlap costs
//! reads, not duplicates, and many orders sharing one timestamp are neither skipped nor repeated.
//! The checkpoint only moves past what the broker acknowledged.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::normalize::{Stores, order_event};
use crate::push::{PublishError, Publisher};

/// Where one store's poll stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Greatest `updated_at` published (ms, UTC).
    pub cursor_ms: i64,
    /// (updated_at, entity_id) published within the overlap window before the cursor.
    pub recent: BTreeSet<(i64, i64)>,
}

/// One page of a search: the orders and Magento's `total_count`.
pub trait OrderSearch: Send + Sync {
    /// Orders of store view `store_id` updated at or after `from_ms`, sorted by `updated_at`
    /// then `entity_id`.
    fn updated_since(
        &self,
        store_id: i64,
        from_ms: i64,
        page: usize,
        page_size: usize,
    ) -> impl Future<Output = Result<(Vec<Value>, usize), String>> + Send;
}

/// Why a round stopped early (its progress so far is kept).
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("magento search failed: {0}")]
    Source(String),
    #[error("publish failed: {0}")]
    Publish(#[from] PublishError),
}

/// Outcome of one round.
#[derive(Debug, PartialEq)]
pub struct Round {
    pub checkpoint: Checkpoint,
    pub published: usize,
    pub skipped_invalid: usize,
}

/// Runs one poll round for store view `store_id`. On error, returns the checkpoint as far as it got.
pub async fn poll_once<S: OrderSearch, P: Publisher>(
    search: &S,
    publisher: &P,
    stores: &Stores,
    store_id: i64,
    start: &Checkpoint,
    overlap: Duration,
    page_size: usize,
) -> (Round, Option<PollError>) {
    let from = start.cursor_ms - overlap.as_millis() as i64;
    let mut checkpoint = start.clone();
    let (mut published, mut skipped_invalid) = (0, 0);
    let mut candidates: Vec<(i64, i64, Value)> = Vec::new();
    let mut page = 1;
    loop {
        let (orders, total) = match search.updated_since(store_id, from, page, page_size).await {
            Ok(r) => r,
            Err(e) => return (Round { checkpoint, published, skipped_invalid }, Some(PollError::Source(e))),
        };
        for order in orders {
            let ts = order.get("updated_at").and_then(Value::as_str).and_then(crate::normalize::parse_magento_time);
            let id = order.get("entity_id").and_then(Value::as_i64);
            if let (Some(ts), Some(id)) = (ts, id) {
                candidates.push((ts, id, order));
            } else {
                skipped_invalid += 1;
            }
        }
        // Page by total_count: a page past the end would repeat the last one.
        if page * page_size >= total {
            break;
        }
        page += 1;
    }
    candidates.sort_by_key(|(ts, id, _)| (*ts, *id));
    candidates.dedup_by_key(|(ts, id, _)| (*ts, *id));
    for (ts, id, order) in candidates {
        if checkpoint.recent.contains(&(ts, id)) || (ts < from) {
            continue;
        }
        let event = match order_event(&order, None, stores, crate::now_ms()) {
            Ok(e) => e,
            Err(error) => {
                tracing::warn!(entity_id = id, error = %error, "order skipped: not a valid order payload");
                skipped_invalid += 1;
                continue;
            }
        };
        if let Err(e) = publisher.publish(&event).await {
            return (Round { checkpoint, published, skipped_invalid }, Some(e.into()));
        }
        published += 1;
        checkpoint.recent.insert((ts, id));
        checkpoint.cursor_ms = checkpoint.cursor_ms.max(ts);
    }
    // Forget what the next round's overlap window can no longer reach.
    let horizon = checkpoint.cursor_ms - overlap.as_millis() as i64;
    checkpoint.recent.retain(|(ts, _)| *ts >= horizon);
    (Round { checkpoint, published, skipped_invalid }, None)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// The sandbox's Magento search, called in process (same code as its HTTP route).
    struct Sandbox(Arc<Mutex<sandbox::magento::Magento>>);

    impl OrderSearch for Sandbox {
        async fn updated_since(
            &self,
            _store_id: i64,
            from_ms: i64,
            page: usize,
            page_size: usize,
        ) -> Result<(Vec<Value>, usize), String> {
            let from = sandbox::magento::fmt_ts(from_ms);
            let orders: Vec<Value> = self.0.lock().unwrap().orders.values().cloned().collect();
            let criteria = sandbox::magento::search::SearchCriteria {
                groups: vec![vec![sandbox::magento::search::Filter {
                    field: "updated_at".into(),
                    value: from,
                    condition: "gteq".into(),
                }]],
                sort: vec![("updated_at".into(), true), ("entity_id".into(), true)],
                page_size: Some(page_size),
                current_page: page,
            };
            let result = sandbox::magento::search::run(orders, &criteria, 20, true);
            Ok((result["items"].as_array().unwrap().clone(), result["total_count"].as_u64().unwrap() as usize))
        }
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(i64, i64)>>, std::sync::atomic::AtomicUsize);

    impl Publisher for Recorder {
        async fn publish(&self, event: &elo_events::CommerceEvent) -> Result<(), PublishError> {
            // Fail the 7th publish once, to prove the checkpoint only moves past acknowledgements.
            if self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 6 {
                return Err(PublishError::Unavailable("broker hiccup".into()));
            }
            let id: i64 = event.source_version.entity_id.parse().unwrap();
            self.0.lock().unwrap().push((event.source_version.updated_at, id));
            Ok(())
        }
    }

    fn shop(spacing_ms: i64) -> Arc<Mutex<sandbox::magento::Magento>> {
        let generator =
            sandbox::magento::generator::GeneratorConfig { spacing_ms, transition_rate: 0.0, ..Default::default() };
        let mut m = sandbox::magento::Magento::new(Default::default(), generator);
        m.generate(45);
        Arc::new(Mutex::new(m))
    }

    #[tokio::test]
    async fn many_orders_sharing_a_timestamp_are_published_once_each_across_pages_and_failures() {
        // spacing 0: all 45 orders share one updated_at; pages of 7 end on ties.
        let magento = shop(0);
        let search = Sandbox(magento.clone());
        let publisher = Recorder::default();
        let stores = Stores::default();
        let overlap = Duration::from_secs(300);
        let (round, error) = poll_once(&search, &publisher, &stores, 1, &Checkpoint::default(), overlap, 7).await;
        assert!(error.is_some(), "the injected publish failure stops the round");
        assert_eq!(round.published, 6);
        let (round, error) = poll_once(&search, &publisher, &stores, 1, &round.checkpoint, overlap, 7).await;
        assert!(error.is_none());
        assert_eq!(round.published, 39, "the rest, none twice");
        let mut seen = publisher.0.lock().unwrap().clone();
        let total = seen.len();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!((total, seen.len()), (45, 45), "every order exactly once");
        let (again, _) = poll_once(&search, &publisher, &stores, 1, &round.checkpoint, overlap, 7).await;
        assert_eq!(again.published, 0, "nothing new, nothing republished");
    }

    #[tokio::test]
    async fn changes_and_late_commits_inside_the_overlap_are_picked_up() {
        let magento = shop(1_000);
        let search = Sandbox(magento.clone());
        let publisher = Recorder::default();
        publisher.1.store(100, std::sync::atomic::Ordering::SeqCst); // no injected failure
        let stores = Stores::default();
        let overlap = Duration::from_secs(60);
        let (round, _) = poll_once(&search, &publisher, &stores, 1, &Checkpoint::default(), overlap, 20).await;
        assert_eq!(round.published, 45);
        let cursor = round.checkpoint.cursor_ms;
        {
            let mut m = magento.lock().unwrap();
            // A change after the cursor, and a late commit stamped 30 s before it.
            m.orders.get_mut(&3).unwrap()["updated_at"] = Value::String(sandbox::magento::fmt_ts(cursor + 5_000));
            m.orders.get_mut(&7).unwrap()["updated_at"] = Value::String(sandbox::magento::fmt_ts(cursor - 30_000));
            m.orders.get_mut(&9).unwrap()["updated_at"] = Value::String(sandbox::magento::fmt_ts(cursor - 120_000));
        }
        let (round, _) = poll_once(&search, &publisher, &stores, 1, &round.checkpoint, overlap, 20).await;
        assert_eq!(round.published, 2, "the change and the late commit inside the window; not the one outside it");
        assert_eq!(round.checkpoint.cursor_ms, cursor + 5_000);
        assert!(round.checkpoint.recent.iter().all(|(ts, _)| *ts >= cursor + 5_000 - 60_000), "the window is pruned");
    }
}
