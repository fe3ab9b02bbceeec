//! Poll rounds against the sandbox's Magento search (the production query, parsed and run by
//! the simulator) and, for tens of thousands of versions, an in-memory keyset index.

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
    async fn page_after(
        &self,
        entity: Entity,
        store_id: i64,
        after: Keyset,
        page_size: usize,
    ) -> Result<(Vec<Value>, usize), String> {
        // The production query string, parsed and run by the sandbox's own search code.
        let query = crate::wiring::keyset_query(store_id, after, page_size);
        let criteria = sandbox::magento::search::parse(&query).map_err(|e| format!("{:?}", e.body))?;
        assert_eq!(entity, Entity::Orders, "this fake serves orders");
        let orders: Vec<Value> = self.0.lock().unwrap().orders.values().cloned().collect();
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

/// Puts every order in store view 1, the one the rounds here poll.
pub(crate) fn one_store(magento: &mut sandbox::magento::Magento) {
    magento.orders.values_mut().for_each(|o| o["store_id"] = Value::from(1));
}

fn shop(spacing_ms: i64) -> Arc<Mutex<sandbox::magento::Magento>> {
    let generator =
        sandbox::magento::generator::GeneratorConfig { spacing_ms, transition_rate: 0.0, ..Default::default() };
    let mut m = sandbox::magento::Magento::new(Default::default(), generator);
    m.generate(45);
    one_store(&mut m);
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
    assert!(round.checkpoint.seen.iter().all(|(ts, _)| *ts >= cursor + 5_000 - 60_000), "the window is pruned");
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
    let spec =
        RoundSpec { entity: Entity::Orders, store_id: 1, overlap: Duration::from_secs(5), page_size: 5, max_pages: 2 };
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
    assert!(checkpoint.seen.len() <= 6, "only the overlap window is remembered: {}", checkpoint.seen.len());
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
    let parked: Value = serde_json::from_slice(&dead[0].payload).unwrap();
    assert_eq!(parked["fields"], serde_json::json!({"grand_total": "lots"}), "the field in question, as sent");
    assert_eq!((parked["entity_id"].as_i64(), parked["entity"].as_str()), (Some(10), Some("orders")));
    let text = String::from_utf8_lossy(&dead[0].payload);
    let email = magento.lock().unwrap().orders[&10]["customer_email"].as_str().unwrap().to_owned();
    assert!(!text.contains(&email) && !text.contains("customer_firstname"), "not the person: {text}");
    let (again, _) = run(&search, &publisher, &round.checkpoint, Duration::from_secs(60), 7).await;
    assert_eq!((again.published, again.skipped_invalid), (0, 0));
    assert_eq!(publisher.2.lock().unwrap().len(), 1, "reported once per version");
}

/// An in-memory keyset index with the same semantics as the Magento query (strictly after the
/// position, sorted by (updated_at, id), total = everything after it), fast enough for tens of
/// thousands of versions. Counts the searches it answers.
#[derive(Default)]
pub(crate) struct Index(Mutex<(BTreeMap<Keyset, Value>, HashMap<i64, Keyset>)>, std::sync::atomic::AtomicUsize);

impl Index {
    /// Saves an order version (replacing the entity's previous one) at `updated_at`.
    pub(crate) fn save(&self, template: &Value, id: i64, updated_at: i64, status: &str) {
        let (index, positions) = &mut *self.0.lock().unwrap();
        if let Some(previous) = positions.insert(id, Keyset::new(updated_at, id)) {
            index.remove(&previous);
        }
        let mut order = template.clone();
        order["entity_id"] = Value::from(id);
        order["increment_id"] = Value::from(format!("{:09}", id));
        order["updated_at"] = Value::from(crate::normalize::format_magento_time(updated_at));
        order["created_at"] = Value::from(crate::normalize::format_magento_time(updated_at - 60_000));
        order["status"] = Value::from(status);
        order["store_id"] = Value::from(1);
        index.insert(Keyset::new(updated_at, id), order);
    }

    pub(crate) fn searches(&self) -> usize {
        self.1.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl EntitySearch for Index {
    async fn page_after(
        &self,
        _entity: Entity,
        _store_id: i64,
        after: Keyset,
        page_size: usize,
    ) -> Result<(Vec<Value>, usize), String> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let index = &self.0.lock().unwrap().0;
        let after = index.range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded));
        let total = after.clone().count();
        Ok((after.take(page_size).map(|(_, order)| order.clone()).collect(), total))
    }
}

/// One order as the sandbox serves it, to copy.
pub(crate) fn template() -> Value {
    shop(1_000).lock().unwrap().orders[&1].clone()
}

/// The service's defaults: 100 a page, 20 pages a round (2,000 versions), 300 s overlap.
fn defaults() -> RoundSpec {
    RoundSpec { entity: Entity::Orders, store_id: 1, overlap: Duration::from_secs(300), page_size: 100, max_pages: 20 }
}

/// Runs rounds like the live poll (a cut round continues at once) until one finds nothing to
/// do; returns the rounds run. Every round must save progress.
async fn poll_until_quiet(index: &Index, publisher: &Recorder, checkpoint: &mut Checkpoint) -> usize {
    for rounds in 1..=100 {
        let (round, error) =
            poll_once(index, publisher, &Stores::default(), &defaults(), checkpoint, &mut |_, _| {}).await;
        assert!(error.is_none(), "{error:?}");
        let moved = round.checkpoint != *checkpoint;
        *checkpoint = round.checkpoint;
        if round.more {
            assert!(moved, "a round cut by its budget saves progress (round {rounds})");
        } else if round.published == 0 && checkpoint.recheck.is_none() {
            return rounds;
        }
    }
    panic!("the poll never went quiet: {:?}", (checkpoint.head(), checkpoint.recheck, checkpoint.seen.len()));
}

fn quiet_recorder() -> Recorder {
    let publisher = Recorder::default();
    publisher.1.store(usize::MAX / 2, std::sync::atomic::Ordering::SeqCst); // no injected failure
    publisher
}

#[tokio::test]
async fn ten_thousand_changes_in_one_second_are_all_published_with_the_default_budget() {
    // A mass status change: 10,000 orders saved in one second, five times a round's budget.
    let (index, template) = (Index::default(), template());
    let second = crate::normalize::parse_magento_time("2026-11-30 04:00:00").unwrap();
    for id in 1..=10_000 {
        index.save(&template, id, second, "processing");
    }
    let publisher = quiet_recorder();
    let mut checkpoint = Checkpoint::starting_at(second - 3_600_000);
    let rounds = poll_until_quiet(&index, &publisher, &mut checkpoint).await;
    let published = publisher.0.lock().unwrap().clone();
    let unique: BTreeSet<_> = published.iter().collect();
    assert_eq!((published.len(), unique.len()), (10_000, 10_000), "every order exactly once");
    assert_eq!(checkpoint.head(), Keyset::new(second, 10_000));
    // 5 rounds for the head, 5 more to re-read the overlap once, and a quiet one.
    assert!(rounds <= 12, "{rounds} rounds");
    // Each version read twice (head, then one re-read), plus one head search per round.
    assert!(index.searches() <= 200 + rounds, "{} searches in {rounds} rounds", index.searches());

    // Nothing changed: the next round re-reads the window (in budgets) and publishes nothing.
    poll_until_quiet(&index, &publisher, &mut checkpoint).await;
    assert_eq!(publisher.0.lock().unwrap().len(), 10_000, "the overlap costs reads, not duplicates");
}

#[tokio::test]
async fn an_overlap_holding_three_budgets_still_publishes_new_versions_first_and_late_ones_soon() {
    // 6,000 versions spread over the 300 s window: three rounds' budget just to re-read it.
    let (index, template) = (Index::default(), template());
    let start = crate::normalize::parse_magento_time("2026-11-30 04:00:00").unwrap();
    for id in 1..=6_000 {
        index.save(&template, id, start + (id * 290_000 / 6_000) / 1000 * 1000, "pending");
    }
    let publisher = quiet_recorder();
    let mut checkpoint = Checkpoint::starting_at(start - 1_000);
    poll_until_quiet(&index, &publisher, &mut checkpoint).await;
    assert_eq!(publisher.0.lock().unwrap().len(), 6_000);
    let head = checkpoint.head();

    // A new order after the head, and a late commit stamped 100 s before it.
    index.save(&template, 6_001, head.updated_at_ms + 1_000, "pending");
    index.save(&template, 6_002, head.updated_at_ms - 100_000, "pending");
    let mut late_after = None;
    for round in 1..=5 {
        let (next, error) =
            poll_once(&index, &publisher, &Stores::default(), &defaults(), &checkpoint, &mut |_, _| {}).await;
        assert!(error.is_none());
        assert_ne!(next.checkpoint, checkpoint, "every round saves progress (round {round})");
        checkpoint = next.checkpoint;
        let ids: BTreeSet<i64> = publisher.0.lock().unwrap().iter().map(|(_, id)| *id).collect();
        assert!(ids.contains(&6_001), "the new order goes out in the first round");
        if late_after.is_none() && ids.contains(&6_002) {
            late_after = Some(round);
        }
    }
    assert!(late_after.is_some_and(|r| r <= 4), "the late commit is found within ~3 rounds: {late_after:?}");
    assert_eq!(publisher.0.lock().unwrap().len(), 6_002, "and nothing twice");
}

#[tokio::test]
async fn a_backfill_over_ten_thousand_same_second_changes_finishes() {
    let (index, template) = (Index::default(), template());
    let second = crate::normalize::parse_magento_time("2026-11-30 04:00:00").unwrap();
    for id in 1..=10_000 {
        index.save(&template, id, second, "complete");
    }
    let recorder = crate::enrich::tests::Recorder::default();
    let stores = Stores([(1, ("default".to_owned(), 1))].into_iter().collect());
    let args = crate::backfill::BackfillArgs { from_ms: second, entities: vec![Entity::Orders], stores: vec![] };
    let stop = tokio_util::sync::CancellationToken::new();
    let summary = tokio::time::timeout(
        Duration::from_secs(120),
        crate::backfill::run(&index, &recorder, &stores, &args, 100, &stop),
    )
    .await
    .expect("the backfill finishes");
    assert_eq!((summary.published, summary.failed_scopes.len()), (10_000, 0));
    assert_eq!(index.searches(), 100, "one pass, no re-reads");
}

#[tokio::test]
async fn a_second_version_saved_in_the_same_second_is_published_with_its_own_id() {
    let (index, template) = (Index::default(), template());
    let second = crate::normalize::parse_magento_time("2026-11-30 04:00:00").unwrap();
    index.save(&template, 1, second, "pending");
    let recorder = crate::enrich::tests::Recorder::default();
    let (round, _) = poll_once(
        &index,
        &recorder,
        &Stores::default(),
        &defaults(),
        &Checkpoint::starting_at(second - 1_000),
        &mut |_, _| {},
    )
    .await;
    assert_eq!(round.published, 1);
    index.save(&template, 1, second, "processing"); // changed again within the second
    let (round, _) =
        poll_once(&index, &recorder, &Stores::default(), &defaults(), &round.checkpoint, &mut |_, _| {}).await;
    assert_eq!(round.published, 1, "the overlap re-read finds the new content");
    let (quiet, _) =
        poll_once(&index, &recorder, &Stores::default(), &defaults(), &round.checkpoint, &mut |_, _| {}).await;
    assert_eq!(quiet.published, 0, "and publishes it once");
    let events = recorder.events.lock().unwrap();
    let statuses: Vec<&str> = events.iter().map(|e| e.order.as_ref().unwrap().status.as_str()).collect();
    assert_eq!(statuses, ["pending", "processing"]);
    assert_ne!(events[0].event_id, events[1].event_id);
}

#[tokio::test]
async fn a_new_deployment_starts_a_day_back_not_at_the_beginning_of_time() {
    let (index, template) = (Index::default(), template());
    let now = crate::now_ms() / 1000 * 1000;
    index.save(&template, 1, now - 2 * 365 * 86_400_000, "complete"); // two years old
    index.save(&template, 2, now - 3_600_000, "processing"); // an hour ago
    let start = crate::parse_poll_start("24h").unwrap().resolve(now);
    let recorder = crate::enrich::tests::Recorder::default();
    let (round, _) =
        poll_once(&index, &recorder, &Stores::default(), &defaults(), &Checkpoint::starting_at(start), &mut |_, _| {})
            .await;
    assert_eq!(round.published, 1);
    assert_eq!(recorder.events.lock().unwrap()[0].order.as_ref().unwrap().entity_id, 2, "history is for backfill");
}
