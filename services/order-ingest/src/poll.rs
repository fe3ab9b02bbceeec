//! Incremental poll of `GET /V1/orders` and `GET /V1/customers/search` by `updated_at`: the
//! safety net under push, and the engine of the backfill command.
//!
//! Each round asks for entities updated since `cursor - overlap`, sorted by `updated_at` then
//! id. The overlap re-reads a window before the cursor, catching entities committed late with
//! earlier timestamps (Magento's naive UTC timestamps and concurrent commits make that real);
//! the checkpoint remembers which (updated_at, id) pairs inside the window were already
//! published, so the overlap costs reads, not duplicates.
//!
//! Paging is keyset-first: after each page the lower bound moves to the page's greatest
//! `updated_at` and the page number resets, so an entity updated mid-round (which moves to the
//! end of the result) cannot shift an unread one out of reach, and memory stays one page.
//! Only when a whole page shares the bound (many entities with one timestamp) does the page
//! number advance; the end is decided by `total_count`, never by an empty page (Magento answers
//! a page past the end with the last page again). A round ends after `max_pages` so long
//! catch-ups checkpoint as they go. The checkpoint only moves past what the broker acknowledged.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::normalize::{Stores, customer_event, order_event};
use crate::push::{DeadLetter, PublishError, Publisher};

/// What a poll reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Entity {
    Orders,
    Customers,
}

impl Entity {
    /// Field holding the id in search results (`entity_id` for orders, `id` for customers).
    pub fn id_field(self) -> &'static str {
        match self {
            Self::Orders => "entity_id",
            Self::Customers => "id",
        }
    }

    /// Checkpoint key of a store's poll (orders keep the bare store code).
    pub fn checkpoint_key(self, store_code: &str) -> String {
        match self {
            Self::Orders => store_code.to_owned(),
            Self::Customers => format!("customers/{store_code}"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Orders => "orders",
            Self::Customers => "customers",
        }
    }
}

/// Where one store's poll stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Greatest `updated_at` published (ms, UTC).
    pub cursor_ms: i64,
    /// (updated_at, id) published within the overlap window before the cursor.
    pub recent: BTreeSet<(i64, i64)>,
}

/// One page of a search: the entities and Magento's `total_count`.
pub trait EntitySearch: Send + Sync {
    /// `entity` of store view `store_id` updated at or after `from_ms`, sorted by `updated_at`
    /// then id.
    fn updated_since(
        &self,
        entity: Entity,
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
    /// The round stopped at `max_pages` with more to read.
    pub more: bool,
}

/// What one round is asked to do.
#[derive(Clone, Debug)]
pub struct RoundSpec {
    pub entity: Entity,
    pub store_id: i64,
    pub overlap: Duration,
    pub page_size: usize,
    pub max_pages: usize,
}

/// Progress after each page: entities read so far and Magento's count at the round's start.
pub type Progress<'a> = &'a mut (dyn FnMut(usize, usize) + Send);

/// Runs one poll round. On error, returns the checkpoint as far as it got.
pub async fn poll_once<S: EntitySearch, P: Publisher>(
    search: &S,
    publisher: &P,
    stores: &Stores,
    spec: &RoundSpec,
    start: &Checkpoint,
    progress: Progress<'_>,
) -> (Round, Option<PollError>) {
    let overlap_ms = spec.overlap.as_millis() as i64;
    let page_size = spec.page_size.max(1);
    let mut from = start.cursor_ms - overlap_ms;
    let mut round = Round { checkpoint: start.clone(), published: 0, skipped_invalid: 0, more: false };
    let (mut page, mut pages, mut initial_total) = (1, 0, None);
    loop {
        let (items, total) = match search.updated_since(spec.entity, spec.store_id, from, page, page_size).await {
            Ok(r) => r,
            Err(e) => return (round, Some(PollError::Source(e))),
        };
        pages += 1;
        let initial_total = *initial_total.get_or_insert(total);
        let mut entries: Vec<(i64, i64, Value)> = Vec::with_capacity(items.len());
        for item in items {
            let ts = item.get("updated_at").and_then(Value::as_str).and_then(crate::normalize::parse_magento_time);
            let id = item.get(spec.entity.id_field()).and_then(Value::as_i64);
            match (ts, id) {
                (Some(ts), Some(id)) => entries.push((ts, id, item)),
                _ => round.skipped_invalid += 1,
            }
        }
        entries.sort_by_key(|(ts, id, _)| (*ts, *id));
        let page_max = entries.last().map(|(ts, _, _)| *ts);
        for (ts, id, item) in entries {
            if ts < from || round.checkpoint.recent.contains(&(ts, id)) {
                continue;
            }
            let event = match spec.entity {
                Entity::Orders => order_event(&item, None, stores, crate::now_ms()),
                Entity::Customers => customer_event(&item, stores, crate::now_ms()),
            };
            match event {
                Ok(event) => {
                    if let Err(e) = publisher.publish(&event).await {
                        return (round, Some(e.into()));
                    }
                    round.published += 1;
                }
                Err(error) => {
                    // Parked in the DLQ with its error, then remembered as handled: a broken
                    // record is reported once per version, not every round.
                    tracing::warn!(entity = spec.entity.as_str(), id, error = %error, "dead-lettered: not a valid payload");
                    let letter = DeadLetter {
                        source: format!("magento-poll/{}", spec.entity.as_str()),
                        entity_id: id.to_string(),
                        payload: serde_json::to_vec(&item).unwrap_or_default(),
                        code: "invalid_payload",
                        message: error.to_string(),
                    };
                    if let Err(e) = publisher.dead_letter(&letter).await {
                        return (round, Some(e.into()));
                    }
                    metrics::INVALID.with_label_values(&[spec.entity.as_str()]).inc();
                    round.skipped_invalid += 1;
                }
            }
            round.checkpoint.recent.insert((ts, id));
            round.checkpoint.cursor_ms = round.checkpoint.cursor_ms.max(ts);
        }
        let done = round.published + round.skipped_invalid;
        progress(done, initial_total.max(done));
        if page * page_size >= total {
            break;
        }
        if pages >= spec.max_pages.max(1) {
            round.more = true;
            break;
        }
        match page_max {
            Some(max) if max > from => (from, page) = (max, 1),
            _ => page += 1,
        }
        // What the rest of the round and the next round's overlap can still meet.
        let keep_from = from.min(round.checkpoint.cursor_ms - overlap_ms);
        round.checkpoint.recent.retain(|(ts, _)| *ts >= keep_from);
    }
    let horizon = round.checkpoint.cursor_ms - overlap_ms;
    round.checkpoint.recent.retain(|(ts, _)| *ts >= horizon);
    (round, None)
}

mod metrics {
    use std::sync::LazyLock;

    use prometheus::{IntCounterVec, register_int_counter_vec};

    pub(super) static INVALID: LazyLock<IntCounterVec> = LazyLock::new(|| {
        register_int_counter_vec!(
            "order_ingest_poll_invalid_total",
            "Polled records that could not become events (parked in the DLQ), by entity.",
            &["entity"]
        )
        .expect("metric registers once")
    });
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// The sandbox's Magento search, called in process (same code as its HTTP route). The hook
    /// runs once, right after the first page was served (a change landing mid-round).
    pub(crate) struct Sandbox(Arc<Mutex<sandbox::magento::Magento>>, Mutex<Option<MidRoundChange>>);

    type MidRoundChange = Box<dyn FnOnce(&mut sandbox::magento::Magento) + Send>;

    impl Sandbox {
        pub(crate) fn new(magento: Arc<Mutex<sandbox::magento::Magento>>) -> Self {
            Self(magento, Mutex::new(None))
        }
    }

    impl EntitySearch for Sandbox {
        async fn updated_since(
            &self,
            _entity: Entity,
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
            if let Some(change) = self.1.lock().unwrap().take() {
                change(&mut self.0.lock().unwrap());
            }
            Ok((result["items"].as_array().unwrap().clone(), result["total_count"].as_u64().unwrap() as usize))
        }
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(i64, i64)>>, std::sync::atomic::AtomicUsize, Mutex<Vec<DeadLetter>>);

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
        async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), PublishError> {
            self.2.lock().unwrap().push(letter.clone());
            Ok(())
        }
    }

    async fn run(
        search: &Sandbox,
        publisher: &impl Publisher,
        start: &Checkpoint,
        overlap: Duration,
        page_size: usize,
    ) -> (Round, Option<PollError>) {
        let spec = RoundSpec { entity: Entity::Orders, store_id: 1, overlap, page_size, max_pages: 1000 };
        poll_once(search, publisher, &Stores::default(), &spec, start, &mut |_, _| {}).await
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
        let search = Sandbox::new(magento.clone());
        let publisher = Recorder::default();
        let overlap = Duration::from_secs(300);
        let (round, error) = run(&search, &publisher, &Checkpoint::default(), overlap, 7).await;
        assert!(error.is_some(), "the injected publish failure stops the round");
        assert_eq!(round.published, 6);
        let (round, error) = run(&search, &publisher, &round.checkpoint, overlap, 7).await;
        assert!(error.is_none());
        assert_eq!(round.published, 39, "the rest, none twice");
        let mut seen = publisher.0.lock().unwrap().clone();
        let total = seen.len();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!((total, seen.len()), (45, 45), "every order exactly once");
        let (again, _) = run(&search, &publisher, &round.checkpoint, overlap, 7).await;
        assert_eq!(again.published, 0, "nothing new, nothing republished");
    }

    #[tokio::test]
    async fn changes_and_late_commits_inside_the_overlap_are_picked_up() {
        let magento = shop(1_000);
        let search = Sandbox::new(magento.clone());
        let publisher = Recorder::default();
        publisher.1.store(100, std::sync::atomic::Ordering::SeqCst); // no injected failure
        let overlap = Duration::from_secs(60);
        let (round, _) = run(&search, &publisher, &Checkpoint::default(), overlap, 20).await;
        assert_eq!(round.published, 45);
        let cursor = round.checkpoint.cursor_ms;
        {
            let mut m = magento.lock().unwrap();
            // A change after the cursor, and a late commit stamped 30 s before it.
            m.orders.get_mut(&3).unwrap()["updated_at"] = Value::String(sandbox::magento::fmt_ts(cursor + 5_000));
            m.orders.get_mut(&7).unwrap()["updated_at"] = Value::String(sandbox::magento::fmt_ts(cursor - 30_000));
            m.orders.get_mut(&9).unwrap()["updated_at"] = Value::String(sandbox::magento::fmt_ts(cursor - 120_000));
        }
        let (round, _) = run(&search, &publisher, &round.checkpoint, overlap, 20).await;
        assert_eq!(round.published, 2, "the change and the late commit inside the window; not the one outside it");
        assert_eq!(round.checkpoint.cursor_ms, cursor + 5_000);
        assert!(round.checkpoint.recent.iter().all(|(ts, _)| *ts >= cursor + 5_000 - 60_000), "the window is pruned");
    }

    #[tokio::test]
    async fn an_order_updated_mid_round_does_not_push_an_unread_one_out_of_reach() {
        let magento = shop(1_000);
        let search = Sandbox::new(magento.clone());
        let last = magento
            .lock()
            .unwrap()
            .orders
            .values()
            .filter_map(|o| o["updated_at"].as_str().map(str::to_owned))
            .max()
            .unwrap();
        // Order 1 (on page 1) changes after page 1 was read: it moves to the end of the result.
        // Offset paging would now skip the order that slides into page 1's place.
        *search.1.lock().unwrap() = Some(Box::new(move |m: &mut sandbox::magento::Magento| {
            let later = crate::normalize::parse_magento_time(&last).unwrap() + 10_000;
            m.orders.get_mut(&1).unwrap()["updated_at"] = Value::String(sandbox::magento::fmt_ts(later));
        }));
        let publisher = Recorder::default();
        publisher.1.store(100, std::sync::atomic::Ordering::SeqCst);
        let (round, error) = run(&search, &publisher, &Checkpoint::default(), Duration::from_secs(60), 5).await;
        assert!(error.is_none());
        let seen: BTreeSet<i64> = publisher.0.lock().unwrap().iter().map(|(_, id)| *id).collect();
        assert_eq!(seen.len(), 45, "every order, none skipped");
        assert_eq!(round.published, 46, "45 orders plus order 1's new version");
    }

    #[tokio::test]
    async fn long_catch_ups_stop_every_max_pages_and_resume_from_the_checkpoint() {
        let magento = shop(1_000);
        let search = Sandbox::new(magento.clone());
        let publisher = Recorder::default();
        publisher.1.store(100, std::sync::atomic::Ordering::SeqCst);
        let spec = RoundSpec {
            entity: Entity::Orders,
            store_id: 1,
            overlap: Duration::from_secs(5),
            page_size: 5,
            max_pages: 2,
        };
        let (mut checkpoint, mut rounds, mut reports) = (Checkpoint::default(), 0, Vec::new());
        loop {
            let (round, error) =
                poll_once(&search, &publisher, &Stores::default(), &spec, &checkpoint, &mut |done, total| {
                    reports.push((done, total))
                })
                .await;
            assert!(error.is_none());
            rounds += 1;
            checkpoint = round.checkpoint;
            if !round.more {
                break;
            }
        }
        let published = publisher.0.lock().unwrap().clone();
        assert_eq!(published.len(), 45, "each order once across rounds");
        assert!(rounds >= 5, "rounds were cut at two pages ({rounds})");
        assert_eq!(reports.first(), Some(&(5, 45)), "progress counts against Magento's total");
        assert!(checkpoint.recent.len() <= 6, "only the overlap window is remembered: {}", checkpoint.recent.len());
    }

    #[tokio::test]
    async fn a_broken_order_is_dead_lettered_once_and_the_round_carries_on() {
        let magento = shop(1_000);
        magento.lock().unwrap().orders.get_mut(&10).unwrap()["grand_total"] = Value::String("lots".into());
        let search = Sandbox::new(magento.clone());
        let publisher = Recorder::default();
        publisher.1.store(100, std::sync::atomic::Ordering::SeqCst);
        let (round, error) = run(&search, &publisher, &Checkpoint::default(), Duration::from_secs(60), 7).await;
        assert!(error.is_none());
        assert_eq!((round.published, round.skipped_invalid), (44, 1));
        let dead = publisher.2.lock().unwrap().clone();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].entity_id.as_str(), dead[0].code, dead[0].source.as_str()),
            ("10", "invalid_payload", "magento-poll/orders")
        );
        assert!(dead[0].message.contains("grand_total"), "{}", dead[0].message);
        let original: Value = serde_json::from_slice(&dead[0].payload).unwrap();
        assert_eq!(original["grand_total"], "lots", "the record is kept as Magento sent it");
        let (again, _) = run(&search, &publisher, &round.checkpoint, Duration::from_secs(60), 7).await;
        assert_eq!((again.published, again.skipped_invalid), (0, 0));
        assert_eq!(publisher.2.lock().unwrap().len(), 1, "reported once per version");
    }
}
