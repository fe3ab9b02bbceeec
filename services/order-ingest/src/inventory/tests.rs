use std::collections::HashMap;
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

/// These tests run on their own time (the `now` each check is given): readings are stamped
/// with it, not with the wall clock.
fn checker(config: InventoryConfig) -> InventoryChecker {
    InventoryChecker::new(config).with_clock(|| 0)
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
    let checker = checker(InventoryConfig::default());
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
    let checker = checker(InventoryConfig::default());
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
    let checker = Arc::new(checker(config));
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
    let checker = checker(InventoryConfig::default());
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
    let checker = checker(InventoryConfig::default());
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
    let checker = checker(InventoryConfig::default());
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
    let checker = checker(InventoryConfig::default());
    // The first order's check fetches, then its publication is abandoned: neither
    // remembered nor forgotten.
    let abandoned = checker.check(&magento, &order_with(&["A"]), 1_000).await;
    assert_eq!(abandoned.events.len(), 1);
    let later = checker.check(&magento, &order_with(&["A"]), 2_000).await;
    assert_eq!(later.events.len(), 1, "observed and published again, not taken from the pending reading");
    assert_eq!(magento.calls.load(Ordering::SeqCst), 2);
}

/// Stock reads wait while the test holds `gate` closed.
#[derive(Default)]
struct GatedReads {
    gate: tokio::sync::RwLock<()>,
    reads: AtomicUsize,
}

impl MagentoApi for GatedReads {
    async fn order(&self, _: i64) -> Result<Value, SourceError> {
        Err(SourceError::NotFound)
    }
    async fn customer(&self, _: i64) -> Result<Value, SourceError> {
        Err(SourceError::NotFound)
    }
    async fn salable_qty(&self, _: &str, _: i32) -> Result<Option<Decimal4>, SourceError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let _open = self.gate.read().await;
        Ok(Some(Decimal4::from_units(10)))
    }
}

/// The wall clock of `a_reading_is_stamped_when_its_request_leaves`.
static CLOCK: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// A check that waited for a permit is stamped when its read left, not when the check began:
/// a reading taken meanwhile (say, a refresh's) must not look newer than this one, which the
/// reconciler would then drop (it keeps a SKU's newest fact, and this may be the oversell).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_is_stamped_when_its_request_leaves() {
    let config = InventoryConfig { concurrency: 1, ..Default::default() };
    let checker = Arc::new(InventoryChecker::new(config).with_clock(|| CLOCK.load(Ordering::SeqCst)));
    let magento = Arc::new(GatedReads::default());
    CLOCK.store(1_000, Ordering::SeqCst);
    let closed = magento.gate.write().await;
    let first = tokio::spawn({
        let (checker, magento) = (checker.clone(), magento.clone());
        async move { checker.check(&*magento, &order_with(&["A"]), 1_000).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await; // holds the only permit, reading
    let second = tokio::spawn({
        let (checker, magento) = (checker.clone(), magento.clone());
        async move { checker.check(&*magento, &order_with(&["B"]), 1_000).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await; // waits for the permit
    CLOCK.store(5_000, Ordering::SeqCst);
    drop(closed);
    assert_eq!(first.await.unwrap().events[0].occurred_at, 1_000, "read when its check began");
    assert_eq!(second.await.unwrap().events[0].occurred_at, 5_000, "read after waiting: stamped then");
}

/// Two SKUs whose entries count as stored at nearly the same moment (within 1% of `ttl`; they
/// are staggered by SKU: [`crate::flight::staggered`]), so that one sleep ages both alike.
fn skus_aged_alike(ttl: Duration) -> [String; 2] {
    let now = Instant::now();
    let head = |sku: &str| (now - crate::flight::staggered(now, ttl, sku)).as_secs_f64() / ttl.as_secs_f64();
    let twin = (1..10_000).map(|i| format!("S{i}")).find(|s| (head(s) - head("S0")).abs() < 0.01);
    ["S0".to_owned(), twin.expect("a SKU staggered like S0")]
}

/// The refresh tests' TTL: long enough that a test stalled by a loaded machine between aging an
/// entry (to 78% of it) and using it still finds it in use (the guards below say when not).
const REFRESH_TTL: Duration = Duration::from_secs(4);

/// Sleeps until entries of `sku` (or SKUs aged alike) cached at `cached` are `fraction` of
/// [`REFRESH_TTL`] old.
async fn age_entries(sku: &str, cached: Instant, fraction: f64) {
    let stored = crate::flight::staggered(cached, REFRESH_TTL, sku);
    tokio::time::sleep_until((stored + REFRESH_TTL.mul_f64(fraction)).into()).await;
}

/// Fails the test, rather than letting it pass for the wrong reason, when the machine was so slow
/// that the entry of `sku` cached at `cached` expired.
fn assert_in_use(sku: &str, cached: Instant) {
    let age = crate::flight::staggered(cached, REFRESH_TTL, sku).elapsed();
    assert!(age < REFRESH_TTL, "the test ran too slowly: {sku}'s entry expired ({age:?} old)");
}

/// A checker with [`REFRESH_TTL`] and a refresh queue of `capacity`, with `skus` read (10 in
/// stock each) and their facts acknowledged; returns when they were cached.
async fn refreshing_checker(
    magento: &Counting,
    skus: &[&str],
    capacity: usize,
) -> (InventoryChecker, tokio::sync::mpsc::Receiver<String>, Instant) {
    let (due, queued) = tokio::sync::mpsc::channel(capacity);
    let config = InventoryConfig { cache_ttl: REFRESH_TTL, ..Default::default() };
    let checker = checker(config).with_refresh(due);
    let check = checker.check(magento, &order_with(skus), 1).await;
    check.events.iter().for_each(|e| checker.remember(e));
    assert_eq!(magento.calls.load(Ordering::SeqCst), skus.len());
    (checker, queued, Instant::now())
}

/// A queued refresh whose entry was replaced by a newer reading, or expired, before its turn
/// reads nothing: Magento is not asked for a reading that no longer serves anyone.
#[tokio::test]
async fn a_refresh_no_longer_due_reads_nothing() {
    let [a, b] = skus_aged_alike(REFRESH_TTL);
    let magento = counting(&[(&a, 10), (&b, 10)]);
    let (checker, mut queued, cached) = refreshing_checker(&magento, &[&a, &b], 8).await;

    // Both served in the last quarter of their TTL: both queued.
    age_entries(&a, cached, 0.78).await;
    let check = checker.check(&magento, &order_with(&[&a, &b]), 2).await;
    assert!(check.events.is_empty(), "served from the cache");
    let mut skus = vec![queued.try_recv().unwrap(), queued.try_recv().unwrap()];
    skus.sort();
    assert_eq!(skus, [a.clone(), b.clone()]);

    // A newer reading of `a` is acknowledged before its turn: its refresh reads nothing.
    checker.remember(&checker.event(&a, Decimal4::from_units(9), Some("100000007"), 5));
    assert_eq!(checker.refresh(&magento, &a).await, None);
    assert_eq!(magento.calls.load(Ordering::SeqCst), 2, "no read for a replaced entry");
    // `b` is still due: it is read.
    assert_in_use(&b, cached);
    let fact = checker.refresh(&magento, &b).await.expect("b's entry is still in use");
    assert_eq!((fact.sku.as_str(), fact.order_increment_id.as_deref()), (b.as_str(), None));
    assert_eq!(magento.calls.load(Ordering::SeqCst), 3);

    // b's fact is not acknowledged (forgotten), so its queued entry stays; once that expired,
    // a refresh still queued for it reads nothing either.
    checker.forget(&fact);
    age_entries(&b, cached, 1.05).await;
    assert_eq!(checker.refresh(&magento, &b).await, None);
    assert_eq!(magento.calls.load(Ordering::SeqCst), 3, "no read for an expired entry");
}

/// A refresh that does not fit the full queue is not lost: the entry stays unqueued and the
/// next order it serves queues it (and one queued already is not queued twice).
#[tokio::test]
async fn a_refresh_dropped_on_a_full_queue_is_queued_by_the_next_order() {
    let [a, b] = skus_aged_alike(REFRESH_TTL);
    let magento = counting(&[(&a, 10), (&b, 10)]);
    let (checker, mut queued, cached) = refreshing_checker(&magento, &[&a, &b], 1).await;
    age_entries(&a, cached, 0.78).await;

    checker.check(&magento, &order_with(&[&a, &b]), 2).await;
    let first = queued.try_recv().expect("one refresh fits the queue");
    assert!(queued.try_recv().is_err(), "the other was dropped");
    checker.check(&magento, &order_with(&[&a, &b]), 3).await;
    let second = queued.try_recv().expect("the dropped one is queued by the next order");
    assert_ne!(first, second);
    checker.check(&magento, &order_with(&[&a, &b]), 4).await;
    assert!(queued.try_recv().is_err(), "each reading is queued once");
    assert_eq!(magento.calls.load(Ordering::SeqCst), 2, "queueing reads nothing");
    assert_in_use(&a, cached);
    assert_in_use(&b, cached);
}

/// A queued refresh whose entry is about to be replaced, by a newer reading whose fact is still
/// on its way (an order placed after the cached reading read it inline), reads nothing; should
/// that fact never be acknowledged, the next order the entry serves queues it again.
#[tokio::test]
async fn a_refresh_behind_a_newer_unacknowledged_reading_reads_nothing() {
    let magento = counting(&[("A", 10)]);
    let (checker, mut queued, cached) = refreshing_checker(&magento, &["A"], 8).await;
    age_entries("A", cached, 0.78).await;
    checker.check(&magento, &order_with(&["A"]), 2).await;
    assert_eq!(queued.try_recv().unwrap(), "A");

    // Placed after the cached reading (read at 1): read inline, its fact not yet acknowledged.
    let mut newer = order_with(&["A"]);
    newer.created_at = 3;
    let check = checker.check(&magento, &newer, 4).await;
    assert_eq!(check.events.len(), 1, "read inline");
    assert_eq!(magento.calls.load(Ordering::SeqCst), 2);

    assert_in_use("A", cached);
    assert_eq!(checker.refresh(&magento, "A").await, None);
    assert_eq!(magento.calls.load(Ordering::SeqCst), 2, "the newer reading replaces the entry once acknowledged");

    // Never acknowledged: the cached entry serves older orders again and is queued again.
    checker.forget(&check.events[0]);
    let check = checker.check(&magento, &order_with(&["A"]), 5).await;
    assert!(check.events.is_empty(), "served from the cache");
    assert_eq!(queued.try_recv().unwrap(), "A", "queued again");
    assert_in_use("A", cached);
}

/// A refresh's own reading whose fact is not acknowledged leaves its entry to expire: no Magento
/// read per order while the broker fails (only an order's newer reading, forgotten, re-queues).
#[tokio::test]
async fn a_forgotten_refresh_reading_is_not_queued_again() {
    /// Each reading later than the one before, as on a real clock.
    fn ticking() -> i64 {
        static NOW: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(100);
        NOW.fetch_add(1, Ordering::SeqCst)
    }
    let magento = counting(&[("A", 10)]);
    let (due, mut queued) = tokio::sync::mpsc::channel(8);
    let config = InventoryConfig { cache_ttl: REFRESH_TTL, ..Default::default() };
    let checker = InventoryChecker::new(config).with_clock(ticking).with_refresh(due);
    let check = checker.check(&magento, &order_with(&["A"]), 1).await;
    check.events.iter().for_each(|e| checker.remember(e));
    let cached = Instant::now();
    age_entries("A", cached, 0.78).await;
    checker.check(&magento, &order_with(&["A"]), 2).await;
    assert_eq!(queued.try_recv().unwrap(), "A");

    let fact = checker.refresh(&magento, "A").await.expect("due");
    assert!(fact.occurred_at > check.events[0].occurred_at, "the refresh reads later");
    checker.forget(&fact);
    checker.check(&magento, &order_with(&["A"]), 3).await;
    assert!(queued.try_recv().is_err(), "not queued again: the entry expires");
    assert_eq!(magento.calls.load(Ordering::SeqCst), 2);
    assert_in_use("A", cached);
}

/// A reading left in `pending` by a check that was abandoned (cut off by the push budget: its
/// fact neither acknowledged nor forgotten) holds a refresh back only for a TTL, not forever.
#[tokio::test]
async fn an_abandoned_newer_reading_stops_holding_the_refresh_back_after_a_ttl() {
    let magento = counting(&[("A", 10)]);
    let (due, mut queued) = tokio::sync::mpsc::channel(8);
    let checker = checker(InventoryConfig { cache_ttl: REFRESH_TTL, ..Default::default() }).with_refresh(due);
    let mut placed_later = order_with(&["A"]);
    placed_later.created_at = 3;
    let abandoned = checker.check(&magento, &placed_later, 5).await; // read at 5, never settled
    assert_eq!(abandoned.events.len(), 1);

    // A quarter TTL later an older reading (read at 1) is cached and ages into its last quarter,
    // by when the abandoned one is over a TTL old.
    tokio::time::sleep(REFRESH_TTL / 4).await;
    checker.remember(&checker.event("A", Decimal4::from_units(10), Some("100000001"), 1));
    let cached = Instant::now();
    age_entries("A", cached, 0.78).await;
    checker.check(&magento, &order_with(&["A"]), 6).await;
    assert_eq!(queued.try_recv().unwrap(), "A");

    assert!(checker.refresh(&magento, "A").await.is_some(), "the abandoned reading no longer counts");
    assert_eq!(magento.calls.load(Ordering::SeqCst), 2);
    assert_in_use("A", cached);
}

/// A check cut off by the push budget, or whose facts were never published, leaves its readings
/// neither remembered nor forgotten: they must not pile up for every SKU ever read, and a sweep
/// must not take a reading still in its TTL.
#[tokio::test]
async fn abandoned_readings_are_swept_once_expired() {
    // Long enough that the live reading (its expiry staggered up to a quarter TTL back) outlives
    // a stalled test thread between the two last checks.
    let ttl = Duration::from_secs(3);
    let checker = checker(InventoryConfig { cache_ttl: ttl, ..Default::default() });
    let magento = GatedReads::default(); // the gate stays open: every read answers at once
    let skus: Vec<String> = (1..CACHE_SWEEP_AT).map(|i| format!("SKU-{i}")).collect();
    let skus: Vec<&str> = skus.iter().map(String::as_str).collect();
    let abandoned = checker.check(&magento, &order_with(&skus), 1).await;
    assert_eq!(abandoned.events.len(), CACHE_SWEEP_AT - 1);

    // Past the TTL (its stagger only makes a reading expire earlier), one more reading brings
    // the set to the sweep mark, and the next one sweeps it.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    checker.check(&magento, &order_with(&["LIVE"]), 2).await;
    assert_eq!(checker.pending.lock().unwrap().len(), CACHE_SWEEP_AT, "each reading awaits its fact");
    checker.check(&magento, &order_with(&["NEW"]), 3).await;
    let pending = checker.pending.lock().unwrap();
    let mut kept: Vec<&str> = pending.keys().map(String::as_str).collect();
    kept.sort();
    assert_eq!(kept, ["LIVE", "NEW"], "expired readings swept, live ones kept");
}

/// Past the sweep mark with every reading still live (a backfill reading many SKUs within one
/// TTL), a sweep can free nothing: the map must not be walked again on every insert (50,000
/// entries under the lock each webhook needs), only once it has doubled.
#[tokio::test]
async fn live_readings_past_the_sweep_mark_are_not_walked_on_every_insert() {
    let checker = checker(InventoryConfig::default()); // 30 s TTL: nothing expires in this test
    let magento = GatedReads::default();
    let skus: Vec<String> = (0..CACHE_SWEEP_AT + 1_000).map(|i| format!("SKU-{i}")).collect();
    let skus: Vec<&str> = skus.iter().map(String::as_str).collect();
    let check = checker.check(&magento, &order_with(&skus), 1).await;
    assert_eq!(check.events.len(), CACHE_SWEEP_AT + 1_000);
    let pending = checker.pending.lock().unwrap();
    assert_eq!(pending.len(), CACHE_SWEEP_AT + 1_000, "live readings are never swept");
    assert_eq!(pending.sweeps(), 1, "one walk at the mark, none for the 1,000 inserts after it");
}

/// A burst of orders for one hot SKU costs one Magento call while the reading's fact is still on
/// its way to the broker: the checks that waited for the fetch reuse it, however far back the
/// reading's expiry is staggered (up to a quarter of the 30 s TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_that_waited_for_a_fetch_reuse_it_before_its_fact_is_acknowledged() {
    let magento = Arc::new(GatedReads::default());
    let checker = Arc::new(checker(InventoryConfig::default()));
    let order = order_with(&["A"]);
    // Magento held until every check of the burst is waiting for the first one's read.
    let closed = magento.gate.write().await;
    let burst: Vec<_> = (0..20)
        .map(|_| {
            let (magento, checker, order) = (magento.clone(), checker.clone(), order.clone());
            tokio::spawn(async move { checker.check(magento.as_ref(), &order, 1_000).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(closed);
    let mut checks = Vec::new();
    for check in burst {
        checks.push(check.await.unwrap());
    }
    assert_eq!(magento.reads.load(Ordering::SeqCst), 1, "one read for the burst");
    assert!(checks.iter().all(|c| c.status == InventoryStatus::Ok), "{checks:?}");
    assert_eq!(checks.iter().map(|c| c.events.len()).sum::<usize>(), 1, "one stock fact for one reading");
}
