//! A Bulk API 2.0 batch read a chunk at a time (250 records here, two chunks) behaves like one
//! batch: an alias found in one chunk serves the next, a lock retry never writes older
//! customer data than what landed, a decode failure between the passes loses no version,
//! rows Salesforce did not process are retried, and a stop aborts the open jobs.

use std::time::{Duration, Instant};

use elo_events::{CommerceEvent, CommerceEventType, OutcomeStatus};
use elo_kafka::{ErrorClass, HandlerError};
use salesforce_sink::handler::{BulkBatch, BulkChunks, BulkSettings, Events, Sink, Verdict};
use salesforce_sink::mapping::Mapping;
use sandbox::salesforce::{SalesforceApp, SalesforceConfig};
use serde_json::{Value, json};

mod common;

use common::*;

async fn setup(config: SalesforceConfig, bulk: BulkSettings) -> (SalesforceApp, Sink) {
    let (app, url) = serve(config).await;
    let sink = sink(&url, Mapping::default().resolve().unwrap()).await.with_bulk(bulk);
    (app, sink)
}

/// 300 orders of registered customers (no guest shares a registered customer's e-mail).
fn batch() -> Vec<CommerceEvent> {
    (0..450).filter(|n| n % 3 != 2).map(|n| order(n, "pending", 0)).collect()
}

/// `e` of another customer, `key` with `email`, its order placed `at_ms` after the original.
fn of_customer(e: &mut CommerceEvent, key: &str, email: &str, lastname: &str, at_ms: i64) {
    e.customer_key = key.into();
    let c = e.customer.as_mut().unwrap();
    (c.email, c.lastname) = (email.into(), Some(lastname.into()));
    c.customer_id = key.trim_start_matches("c:").parse().ok();
    let o = e.order.as_mut().unwrap();
    o.created_at += at_ms;
    e.source_version.updated_at = o.created_at;
}

fn order_ext(e: &CommerceEvent) -> String {
    format!("o:{}", e.order.as_ref().unwrap().entity_id)
}

fn find(app: &SalesforceApp, object: &str, ext: &str) -> Option<(String, Value)> {
    let sim = app.sim.lock().unwrap();
    sim.org
        .records
        .iter()
        .find(|(_, r)| r.object == object && r.fields.get("Elo_Id__c") == Some(&json!(ext)))
        .map(|(id, r)| (id.clone(), Value::Object(r.fields.clone())))
}

fn oks(events: &[CommerceEvent]) -> Vec<Result<CommerceEvent, HandlerError>> {
    events.iter().cloned().map(Ok).collect()
}

/// A key refused by the duplicate rule in the first chunk is matched by e-mail and stored as an
/// alias there; its orders in the second chunk are written to the same person, not refused.
#[tokio::test]
async fn a_key_aliased_in_an_earlier_chunk_is_applied_in_the_later_ones() {
    let (app, sink) = setup(SalesforceConfig::default(), bulk_test_settings()).await;
    let (email, existing) = ("alias@example.com", "c:6000");
    let account = {
        let mut sim = app.sim.lock().unwrap();
        let fields = json!({"Name": "Existing", "Elo_Id__c": existing});
        let account = sim.org.create("Account", fields.as_object().unwrap().clone(), 0).unwrap();
        let contact = json!({"LastName": "Existing", "Email": email, "Elo_Id__c": existing, "AccountId": account});
        sim.org.create("Contact", contact.as_object().unwrap().clone(), 0).unwrap();
        account
    };
    let mut events = batch();
    of_customer(&mut events[10], "c:5000", email, "Alias", 0);
    of_customer(&mut events[260], "c:5000", email, "Alias", 1_000);
    let v = sink.apply(&oks(&events)).await;
    for (i, v) in v.iter().enumerate() {
        assert!(v.result.is_ok(), "record {i}: {:?}", v.result);
    }
    for i in [10, 260] {
        assert_eq!(v[i].outcome, Some(OutcomeStatus::Applied));
        let (_, order) = find(&app, "Order", &order_ext(&events[i])).expect("the order landed");
        assert_eq!(order["AccountId"], json!(account), "record {i} hangs off the existing person");
    }
}

/// The older of a customer's two orders (first chunk) hits a lock on its Order row after the
/// Bulk jobs wrote the customer's newest data (second chunk): its retry does not write its own,
/// older customer data over it, and still names the Account.
#[tokio::test]
async fn a_lock_retry_in_an_earlier_chunk_never_writes_older_customer_data() {
    let mut events = batch();
    of_customer(&mut events[20], "c:7000", "stale@example.com", "Old", 0);
    of_customer(&mut events[270], "c:7000", "stale@example.com", "New", 60_000);
    let config = SalesforceConfig { bulk_locked_once: vec![order_ext(&events[20])], ..Default::default() };
    let (app, sink) = setup(config, bulk_test_settings()).await;
    let v = sink.apply(&oks(&events)).await;
    for (i, v) in v.iter().enumerate() {
        assert!(v.result.is_ok(), "record {i}: {:?}", v.result);
    }
    assert!(app.sim.lock().unwrap().config.bulk_locked_once.is_empty(), "the lock fired");
    let (account, _) = find(&app, "Account", "c:7000").unwrap();
    let (_, contact) = find(&app, "Contact", "c:7000").unwrap();
    assert_eq!(contact["LastName"], json!("New"), "the newest customer data stays");
    assert_eq!(v[20].target_ids.get("Account"), Some(&account), "{:?}", v[20].target_ids);
}

/// Runs a batch through the passes by hand, each pass reading its own copy of the chunks.
async fn passes(
    sink: &Sink,
    note: &[Vec<Result<CommerceEvent, HandlerError>>],
    prepare: &[Vec<Result<CommerceEvent, HandlerError>>],
    finish: &[Vec<Result<CommerceEvent, HandlerError>>],
) -> Vec<Verdict> {
    let total = note.iter().map(Vec::len).sum();
    let offsets: Vec<usize> = note
        .iter()
        .scan(0, |at, c| {
            let o = *at;
            *at += c.len();
            Some(o)
        })
        .collect();
    let mut batch = BulkBatch::new(0, total);
    for (o, c) in offsets.iter().zip(note) {
        sink.bulk_note(&mut batch, *o, c);
    }
    for (o, c) in offsets.iter().zip(prepare) {
        let _ = sink.bulk_prepare(&mut batch, *o, c).await;
    }
    sink.bulk_run(&mut batch).await;
    let mut out = Vec::new();
    for (o, c) in offsets.iter().zip(finish) {
        out.extend(sink.bulk_finish(&mut batch, *o, c).await);
    }
    out
}

/// A record that could not be read in one pass (the registry briefly out) is never taken for
/// older than it is, nor counted applied without its confirmation: it is applied or retried.
#[tokio::test]
async fn a_read_failure_between_the_passes_loses_no_version() {
    let (app, sink) = setup(SalesforceConfig::default(), bulk_test_settings()).await;
    let mut events = batch();
    // The newest version of the order of record 10 is record 260 (second chunk).
    let mut newer = events[10].clone();
    newer.order.as_mut().unwrap().status = "processing".into();
    newer.source_version.updated_at += 5_000;
    newer.event_type = CommerceEventType::OrderChanged;
    events[260] = newer.clone();
    let chunks = |events: &[CommerceEvent]| vec![oks(&events[..250]), oks(&events[250..])];
    let unreadable = || Err(HandlerError::transient("schema_registry", "registry unreachable"));
    let mut note = chunks(&events);
    note[1][10] = unreadable();
    let mut finish = chunks(&events);
    finish[0][100] = unreadable();
    let v = passes(&sink, &note, &chunks(&events), &finish).await;
    let (_, order) = find(&app, "Order", &order_ext(&newer)).expect("the order landed");
    let landed = order["Magento_Status__c"] == json!("processing");
    let retried = v[260].result.as_ref().is_err_and(|e| e.class == ErrorClass::Transient);
    assert!(landed || retried, "the newest version neither landed nor is retried: {:?} {:?}", v[260], order);
    assert_ne!(v[260].outcome, Some(OutcomeStatus::SkippedStale));
    let error = v[100].result.as_ref().expect_err("not confirmed: retried, not counted applied");
    assert_eq!(error.class, ErrorClass::Transient);
}

/// A row in neither result file (Salesforce did not process it) fails its record
/// transiently: it is retried, never counted applied.
#[tokio::test]
async fn rows_salesforce_did_not_process_are_retried() {
    let events = batch();
    let config = SalesforceConfig { bulk_unprocessed: vec![order_ext(&events[7])], ..Default::default() };
    let (_app, sink) = setup(config, bulk_test_settings()).await;
    let v = sink.apply(&oks(&events)).await;
    let error = v[7].result.as_ref().expect_err("not processed: not applied");
    assert_eq!(error.class, ErrorClass::Transient, "{error:?}");
    assert_eq!(v[7].outcome, None);
    for (i, v) in v.iter().enumerate().filter(|(i, _)| *i != 7) {
        assert!(v.result.is_ok(), "record {i}: {:?}", v.result);
    }
}

/// When the service stops, a Bulk batch waiting on its job aborts it at once (the records are
/// retried by the next owner; no job is left to write behind its back).
#[tokio::test]
async fn a_stop_aborts_the_open_bulk_jobs() {
    let bulk = BulkSettings { poll: Duration::from_secs(8), ..bulk_test_settings() };
    let stop = tokio_util::sync::CancellationToken::new();
    let (app, url) = serve(SalesforceConfig::default()).await;
    let sink = sink(&url, Mapping::default().resolve().unwrap()).await.with_bulk(bulk).with_stop(stop.clone());
    let events = oks(&batch());
    let started = Instant::now();
    let stopper = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.cancel();
    };
    let (v, ()) = tokio::join!(tokio::time::timeout(Duration::from_secs(6), sink.apply(&events)), stopper);
    let v = v.expect("the batch returned soon after the stop");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    for (i, v) in v.iter().enumerate() {
        let error = v.result.as_ref().expect_err("not applied");
        assert_eq!(error.class, ErrorClass::Transient, "record {i}: {error:?}");
    }
    let states: Vec<String> = app.sim.lock().unwrap().jobs.values().map(|j| j.state.clone()).collect();
    assert!(!states.is_empty() && states.iter().all(|s| s == "Aborted"), "{states:?}");
}

/// The jobs' spools never take more than `spool_bytes` on disk: a batch whose rows would pass
/// it runs as several Bulk batches in turn, and every record still lands once.
#[tokio::test]
async fn the_spool_stays_within_its_bound_and_the_batch_still_lands() {
    let events = batch();
    // Unbounded first, to learn what the whole batch spools.
    let (_, whole) = setup(SalesforceConfig::default(), bulk_test_settings()).await;
    assert!(whole.apply(&oks(&events)).await.iter().all(|v| v.result.is_ok()));
    let unbounded = whole.bulk_spool_peak();
    // A bound the first chunk (250 of 300 records) fits but not both: two Bulk batches.
    let bound = unbounded as usize - 8 * 1024;
    let (app, sink) =
        setup(SalesforceConfig::default(), BulkSettings { spool_bytes: bound, ..bulk_test_settings() }).await;
    let v = sink.apply(&oks(&events)).await;
    for (i, v) in v.iter().enumerate() {
        assert!(v.result.is_ok() && v.target_ids.contains_key("Order"), "record {i}: {:?}", v.result);
    }
    assert!(sink.bulk_spool_peak() <= bound as u64, "{} > {bound}", sink.bulk_spool_peak());
    assert!(sink.bulk_spool_peak() > 0);
    // The second Bulk batch is the last 50 records: exactly `min_records`, so it is Bulk-sized
    // too (one fewer and it would go through Composite Graph, with four jobs in all).
    assert_eq!(events.len() - 250, bulk_test_settings().min_records);
    let jobs = app.sim.lock().unwrap().jobs.len();
    assert_eq!(jobs, 8, "two Bulk batches of four jobs (no activations)");
    let ids: std::collections::BTreeSet<i64> = events.iter().map(|e| e.order.as_ref().unwrap().entity_id).collect();
    assert_eq!(records(&app, "Order").len(), ids.len(), "every order once");
}

/// A chunk whose rows alone are larger than the whole spool bound is not spooled past it: its
/// records go through Composite Graph (the bytes written to spools never pass the bound).
#[tokio::test]
async fn a_chunk_larger_than_the_spool_bound_never_passes_it() {
    let bound = 2048;
    let (app, sink) =
        setup(SalesforceConfig::default(), BulkSettings { spool_bytes: bound, ..bulk_test_settings() }).await;
    let events = batch();
    let v = sink.apply(&oks(&events)).await;
    for (i, v) in v.iter().enumerate() {
        assert!(v.result.is_ok() && v.target_ids.contains_key("Order"), "record {i}: {:?}", v.result);
    }
    assert!(sink.bulk_spool_peak() <= bound as u64, "{} > {bound}", sink.bulk_spool_peak());
    assert_eq!(records(&app, "Order").len(), events.len());
}

/// Rows that cannot be spooled (here: no spool directory) go through Composite Graph: every
/// record lands, applied, and no job is started for them.
#[tokio::test]
async fn rows_that_cannot_be_spooled_land_through_composite_graph() {
    let gone = std::env::temp_dir().join(format!("elo-no-such-spool-dir-{}", std::process::id()));
    let bulk = BulkSettings { spool_dir: Some(gone.clone()), ..bulk_test_settings() };
    assert!(bulk.check_spool_dir().unwrap_err().to_string().contains(&gone.display().to_string()));
    let (app, sink) = setup(SalesforceConfig::default(), bulk).await;
    let events = batch();
    let v = sink.apply(&oks(&events)).await;
    for (i, v) in v.iter().enumerate() {
        assert!(v.result.is_ok() && v.target_ids.contains_key("Order"), "record {i}: {:?}", v.result);
        assert_eq!(v.outcome, Some(OutcomeStatus::Applied), "record {i}");
    }
    assert!(app.sim.lock().unwrap().jobs.is_empty());
    assert_eq!(records(&app, "Order").len(), events.len());
}

/// The spool directory goes away mid-run (a full or broken disk): later backlog batches still
/// land through Composite Graph, and no record is dead-lettered however often it comes back.
#[tokio::test]
async fn a_spool_dir_lost_mid_run_dead_letters_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bulk = BulkSettings { spool_dir: Some(dir.path().to_owned()), ..bulk_test_settings() };
    bulk.check_spool_dir().expect("a writable directory passes the startup check");
    let (app, sink) = setup(SalesforceConfig::default(), bulk).await;
    assert!(sink.apply(&oks(&batch())).await.iter().all(|v| v.result.is_ok()));
    let jobs = app.sim.lock().unwrap().jobs.len();
    assert!(jobs > 0, "the first batch went through Bulk");
    drop(dir);
    let later: Vec<CommerceEvent> = (0..450).filter(|n| n % 3 != 2).map(|n| order(50_000 + n, "pending", 0)).collect();
    for attempt in 0..3 {
        let v = sink.apply(&oks(&later)).await;
        for (i, v) in v.iter().enumerate() {
            assert!(v.result.is_ok(), "attempt {attempt} record {i}: {:?}", v.result);
            assert_ne!(v.outcome, Some(OutcomeStatus::DeadLettered), "attempt {attempt} record {i}");
        }
    }
    assert_eq!(app.sim.lock().unwrap().jobs.len(), jobs, "no job for rows that were not spooled");
    assert_eq!(records(&app, "Order").len(), 2 * later.len(), "every order once");
}

/// A partition's batch read like the service reads it: each chunk under a permit of a shared
/// in-flight budget (one permit a chunk).
struct Budgeted<'a> {
    events: &'a [CommerceEvent],
    budget: std::sync::Arc<tokio::sync::Semaphore>,
    out: Vec<Verdict>,
}

impl BulkChunks for Budgeted<'_> {
    type Held = tokio::sync::OwnedSemaphorePermit;

    async fn read(&self, range: std::ops::Range<usize>) -> (Self::Held, Events) {
        let permit = self.budget.clone().acquire_owned().await.unwrap();
        // Another partition gets its turn while this one reads (decoding awaits the registry).
        tokio::task::yield_now().await;
        (permit, oks(&self.events[range]))
    }

    async fn done(&mut self, _range: std::ops::Range<usize>, _events: &Events, verdicts: Vec<Verdict>) {
        self.out.extend(verdicts);
    }
}

/// Several partitions in Bulk at once under a small in-flight budget (four chunks) and a spool
/// bound of about one chunk's rows: a partition holding spool room waits only for budget, and
/// none holding budget waits for spool room, so all finish (no deadlock) and every record lands.
#[tokio::test]
async fn partitions_in_bulk_at_once_under_small_budgets_all_finish() {
    let events = batch();
    let (_, whole) = setup(SalesforceConfig::default(), bulk_test_settings()).await;
    assert!(whole.apply(&oks(&events)).await.iter().all(|v| v.result.is_ok()));
    // A third of the batch's rows is one chunk of 100: room for one chunk and a bit.
    let bound = whole.bulk_spool_peak() as usize / 2;
    let (app, sink) =
        setup(SalesforceConfig::default(), BulkSettings { spool_bytes: bound, ..bulk_test_settings() }).await;
    let budget = std::sync::Arc::new(tokio::sync::Semaphore::new(4));
    let partitions: Vec<Vec<CommerceEvent>> = (0..5u64)
        .map(|p| (0..450).filter(|n| n % 3 != 2).map(|n| order(10_000 * (p + 1) + n, "pending", 0)).collect())
        .collect();
    let chunks: Vec<_> = (0..300).step_by(100).map(|at| at..at + 100).collect();
    let runs = partitions.iter().enumerate().map(|(p, events)| {
        let (sink, chunks, budget) = (&sink, &chunks, budget.clone());
        async move {
            let mut reader = Budgeted { events, budget, out: Vec::new() };
            sink.apply_bulk(p as i32, events.len(), chunks, &mut reader).await;
            reader.out
        }
    });
    let all = tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(runs))
        .await
        .expect("every partition finished (no partition waits for another in a cycle)");
    for (p, v) in all.iter().enumerate() {
        assert_eq!(v.len(), 300);
        for (i, v) in v.iter().enumerate() {
            assert!(v.result.is_ok(), "partition {p} record {i}: {:?}", v.result);
        }
    }
    assert_eq!(records(&app, "Order").len(), 5 * 300, "every order once");
}

/// A Bulk batch whose future is dropped mid-job (the runtime aborts a revoked partition's task
/// after the drain timeout) still aborts its open job at Salesforce: no orphan job lands older
/// rows over the new owner's writes later.
#[tokio::test]
async fn a_bulk_batch_dropped_mid_job_aborts_its_job() {
    let bulk = BulkSettings { poll: Duration::from_secs(8), ..bulk_test_settings() };
    let (app, sink) = setup(SalesforceConfig::default(), bulk).await;
    let events = oks(&batch());
    let dropped = tokio::time::timeout(Duration::from_millis(500), sink.apply(&events)).await;
    assert!(dropped.is_err(), "the batch was still waiting on its job when dropped");
    let states = || -> Vec<String> { app.sim.lock().unwrap().jobs.values().map(|j| j.state.clone()).collect() };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !states().iter().all(|s| s == "Aborted") {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let states = states();
    assert!(!states.is_empty() && states.iter().all(|s| s == "Aborted"), "{states:?}");
}

/// After a stop a Bulk batch writes nothing more through Composite Graph (here: rows that could
/// not be spooled): its records stay transient for the next owner.
#[tokio::test]
async fn after_a_stop_a_bulk_batch_sends_no_graphs() {
    let gone = std::env::temp_dir().join(format!("elo-no-such-spool-dir-stop-{}", std::process::id()));
    let stop = tokio_util::sync::CancellationToken::new();
    let (app, url) = serve(SalesforceConfig::default()).await;
    let bulk = BulkSettings { spool_dir: Some(gone), ..bulk_test_settings() };
    let sink = sink(&url, Mapping::default().resolve().unwrap()).await.with_bulk(bulk).with_stop(stop.clone());
    stop.cancel();
    let v = sink.apply(&oks(&batch())).await;
    for (i, v) in v.iter().enumerate() {
        let error = v.result.as_ref().expect_err("stopped: not applied");
        assert_eq!(error.class, ErrorClass::Transient, "record {i}: {error:?}");
        assert_eq!(v.outcome, None);
    }
    assert!(records(&app, "Order").is_empty(), "no order written after the stop");
}

/// A new customer's only order of the batch is dead-lettered after the Bulk jobs landed its
/// customer data (its Account and Contact rows went in, an item row was refused): no applied
/// record of the key confirms anything, yet the key's confirmed customer version is what
/// landed, so a later order with older customer data does not overwrite it.
#[tokio::test]
async fn customer_data_landed_by_a_customers_only_record_that_was_dead_lettered_is_not_overwritten() {
    let mut events = batch();
    of_customer(&mut events[270], "c:7200", "only@example.com", "New", 60_000);
    events[270].order.as_mut().unwrap().items[0].sku = "RETIRED".into();
    let (app, sink) = setup(SalesforceConfig::default(), bulk_test_settings()).await;
    retire_a_product(&app, &sink, &events[270].store).await;
    let v = sink.apply(&oks(&events)).await;
    assert_eq!(v[270].outcome, Some(OutcomeStatus::DeadLettered), "{:?}", v[270].result);
    let (_, contact) = find(&app, "Contact", "c:7200").unwrap();
    assert_eq!(contact["LastName"], json!("New"), "the customer data landed by Bulk");
    let mut older = order(9_200, "pending", 0);
    of_customer(&mut older, "c:7200", "only@example.com", "Older", 30_000);
    older.store = events[270].store.clone();
    let new_at = events[270].order.as_ref().unwrap().created_at;
    older.order.as_mut().unwrap().created_at = new_at - 1_000;
    older.source_version.updated_at = new_at - 1_000;
    let v = sink.apply(&[Ok(older)]).await;
    assert!(v[0].result.is_ok(), "{:?}", v[0].result);
    let (_, contact) = find(&app, "Contact", "c:7200").unwrap();
    assert_eq!(contact["LastName"], json!("New"), "older customer data overwrote what Bulk landed");
}

/// A customer's newer order (second chunk) is dead-lettered after the Bulk jobs landed its
/// newer customer data; the older order (first chunk) is applied. The key's confirmed customer
/// version is what landed, so a later order with customer data between the two does not
/// overwrite the newer data.
#[tokio::test]
async fn customer_data_landed_by_a_dead_lettered_record_is_not_overwritten_by_an_older_one() {
    let mut events = batch();
    of_customer(&mut events[20], "c:7100", "landed@example.com", "Old", 0);
    of_customer(&mut events[270], "c:7100", "landed@example.com", "New", 60_000);
    events[270].order.as_mut().unwrap().items[0].sku = "RETIRED".into();
    let (app, sink) = setup(SalesforceConfig::default(), bulk_test_settings()).await;
    retire_a_product(&app, &sink, &events[270].store).await;
    let v = sink.apply(&oks(&events)).await;
    assert!(v[20].result.is_ok(), "{:?}", v[20].result);
    assert_eq!(v[270].outcome, Some(OutcomeStatus::DeadLettered), "{:?}", v[270].result);
    let (_, contact) = find(&app, "Contact", "c:7100").unwrap();
    assert_eq!(contact["LastName"], json!("New"), "the newer customer data landed by Bulk");
    let mut middle = order(9_100, "pending", 0);
    of_customer(&mut middle, "c:7100", "landed@example.com", "Middle", 30_000);
    middle.store = events[20].store.clone();
    // Customer data between the two (by the order's creation time).
    let (old_at, new_at) =
        (events[20].order.as_ref().unwrap().created_at, events[270].order.as_ref().unwrap().created_at);
    assert!(old_at + 1_000 < new_at);
    middle.order.as_mut().unwrap().created_at = new_at - 1_000;
    middle.source_version.updated_at = new_at - 1_000;
    let v = sink.apply(&[Ok(middle)]).await;
    assert!(v[0].result.is_ok(), "{:?}", v[0].result);
    let (_, contact) = find(&app, "Contact", "c:7100").unwrap();
    assert_eq!(contact["LastName"], json!("New"), "older customer data never overwrites what landed");
}
