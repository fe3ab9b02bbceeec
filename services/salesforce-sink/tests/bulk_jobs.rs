//! One call of a Bulk API 2.0 job that fails transiently does not fail the batch: an upload
//! answered 503 is sent again in a new job (Bulk 2.0 takes one upload per job), a close
//! answered 503 is checked and sent again. A retried backlog batch with few records left goes
//! through Composite Graph, and after a stop that path writes nothing either.

use elo_events::{CommerceEvent, OutcomeStatus};
use elo_kafka::{ErrorClass, HandlerError};
use salesforce_sink::handler::Sink;
use salesforce_sink::mapping::Mapping;
use sandbox::faults::FaultConfig;
use sandbox::salesforce::{SalesforceApp, SalesforceConfig};
use serde_json::json;

mod common;

use common::*;

const UPLOAD: &str = "PUT /services/data/{v}/jobs/ingest/{id}/batches";
const JOB: &str = "PATCH /services/data/{v}/jobs/ingest/{id}";

async fn setup() -> (SalesforceApp, Sink) {
    let (app, url) = serve(SalesforceConfig::default()).await;
    let sink = sink(&url, Mapping::default().resolve().unwrap()).await.with_bulk(bulk_test_settings());
    (app, sink)
}

/// 300 completed orders of registered customers: all five jobs, activations included.
fn batch() -> Vec<Result<CommerceEvent, HandlerError>> {
    (0..450).filter(|n| n % 3 != 2).map(|n| Ok(order(n, "complete", 0))).collect()
}

/// The next `times` requests to `endpoint` answer 503.
fn fail_next(app: &SalesforceApp, endpoint: &str, times: u32) {
    let entry = FaultConfig { fail_next: times, ..Default::default() };
    app.faults
        .set("salesforce", FaultConfig { endpoints: [(endpoint.to_owned(), entry)].into(), ..Default::default() });
}

fn fault_spent(app: &SalesforceApp, endpoint: &str) -> bool {
    app.faults.get("salesforce").endpoints[endpoint].fail_next == 0
}

/// (object, state) of every job the batch ran, in creation order.
fn jobs(app: &SalesforceApp) -> Vec<(String, String)> {
    app.sim.lock().unwrap().jobs.values().map(|j| (j.object.clone(), j.state.clone())).collect()
}

/// Every record applied and every order activated, each once.
fn assert_all_landed(app: &SalesforceApp, v: &[salesforce_sink::handler::Verdict]) {
    for (i, v) in v.iter().enumerate() {
        assert!(v.result.is_ok(), "record {i}: {:?}", v.result);
        assert_eq!(v.outcome, Some(OutcomeStatus::Applied), "record {i}");
    }
    let orders = records(app, "Order");
    assert_eq!(orders.len(), v.len(), "every order once");
    assert!(orders.iter().all(|o| o["Status"] == json!("Activated")), "every order activated");
}

/// The first upload answers 503: that job is aborted and its rows go up again in a new job
/// (not a second upload into it, which Bulk 2.0 refuses), so no record fails.
#[tokio::test]
async fn an_upload_answered_503_is_sent_again_in_a_new_job() {
    let (app, sink) = setup().await;
    fail_next(&app, UPLOAD, 1);
    let v = sink.apply(&batch()).await;
    assert!(fault_spent(&app, UPLOAD), "the 503 was answered");
    assert_all_landed(&app, &v);
    let jobs = jobs(&app);
    let state = |s: &str| jobs.iter().filter(|(_, state)| state == s).map(|(o, _)| o.as_str()).collect::<Vec<_>>();
    assert_eq!(state("Aborted"), ["Account"], "the job whose upload failed, aborted: {jobs:?}");
    assert_eq!(state("JobComplete").len(), 5, "then every job once: {jobs:?}");
}

/// The activations' upload (the fifth) answers 503 after the Orders job landed Draft orders:
/// sent again in a new job, every order is activated and confirmed (before, every record failed
/// and each retry of the batch cost them one of their attempts).
#[tokio::test]
async fn an_activation_upload_answered_503_is_sent_again_in_a_new_job() {
    let (app, sink) = setup().await;
    let entry = FaultConfig { pass_first: 4, fail_next: 1, ..Default::default() };
    app.faults.set("salesforce", FaultConfig { endpoints: [(UPLOAD.to_owned(), entry)].into(), ..Default::default() });
    let v = sink.apply(&batch()).await;
    assert!(fault_spent(&app, UPLOAD), "the 503 was answered");
    assert_all_landed(&app, &v);
    let jobs = jobs(&app);
    let states: Vec<&str> = jobs.iter().map(|(_, s)| s.as_str()).collect();
    let complete = "JobComplete";
    assert_eq!(states, [complete, complete, complete, complete, "Aborted", complete], "{jobs:?}");
    assert_eq!(jobs[4].0, jobs[5].0, "the same job again: {jobs:?}");
}

/// The first close (`UploadComplete`) answers 503: the job's state shows it still open, the
/// close is sent again, and no record fails.
#[tokio::test]
async fn a_close_answered_503_is_sent_again() {
    let (app, sink) = setup().await;
    fail_next(&app, JOB, 1);
    let v = sink.apply(&batch()).await;
    assert!(fault_spent(&app, JOB), "the 503 was answered");
    assert_all_landed(&app, &v);
    let jobs = jobs(&app);
    assert!(jobs.len() == 5 && jobs.iter().all(|(_, s)| s == "JobComplete"), "{jobs:?}");
}

/// Two closes answer 503 and so does the first look at the job: it is closed again only once
/// seen `Open`, within four failed calls, and no record fails.
#[tokio::test]
async fn a_close_and_a_look_answered_503_are_tried_again() {
    let (app, sink) = setup().await;
    let look = "GET /services/data/{v}/jobs/ingest/{id}";
    let entry = |n| FaultConfig { fail_next: n, ..Default::default() };
    let endpoints = [(JOB.to_owned(), entry(2)), (look.to_owned(), entry(1))].into();
    app.faults.set("salesforce", FaultConfig { endpoints, ..Default::default() });
    let v = sink.apply(&batch()).await;
    assert!(fault_spent(&app, JOB) && fault_spent(&app, look), "the 503s were answered");
    assert_all_landed(&app, &v);
    let jobs = jobs(&app);
    assert!(jobs.len() == 5 && jobs.iter().all(|(_, s)| s == "JobComplete"), "{jobs:?}");
}

/// Three uploads in a row answer 503: a job's rows go up in at most three jobs in all, then
/// its records fail transient (retried by the runtime).
#[tokio::test]
async fn an_upload_failing_three_times_fails_its_records_transient() {
    let (app, sink) = setup().await;
    fail_next(&app, UPLOAD, 3);
    let v = sink.apply(&batch()).await;
    for (i, v) in v.iter().enumerate() {
        let error = v.result.as_ref().expect_err("no Account landed: not applied");
        assert_eq!(error.class, ErrorClass::Transient, "record {i}: {error:?}");
    }
    let jobs = jobs(&app);
    assert!(jobs.len() == 3 && jobs.iter().all(|(o, s)| o == "Account" && s == "Aborted"), "{jobs:?}");
    assert!(records(&app, "Order").is_empty());
}

/// Applies `events[..59]` (under the Bulk threshold, through Composite Graph) and makes the
/// last one a completed order: a backlog batch retried after its 60th record failed.
async fn retried_backlog(sink: &Sink) -> Vec<Result<CommerceEvent, HandlerError>> {
    let mut events: Vec<CommerceEvent> = (0..60).map(|n| order(n, "pending", 0)).collect();
    for part in events[..59].chunks(30) {
        for v in sink.apply(&part.iter().cloned().map(Ok).collect::<Vec<_>>()).await {
            assert!(v.result.is_ok(), "{:?}", v.result);
        }
    }
    events[59] = order(59, "complete", 0);
    events.into_iter().map(Ok).collect()
}

fn api_usage(app: &SalesforceApp) -> u64 {
    app.sim.lock().unwrap().api_usage
}

/// The runtime hands a batch back from its first failure, so a retried backlog batch is mostly
/// confirmed: its few records left go through Composite Graph (with its in-call retries), not
/// Bulk jobs (here every upload would fail), and the confirmed ones cost no call.
#[tokio::test]
async fn a_retried_backlog_batch_with_few_records_left_writes_them_without_bulk_jobs() {
    let (app, sink) = setup().await;
    let events = retried_backlog(&sink).await;
    // What the last record alone costs, measured on a twin with the same history.
    let (twin_app, twin) = setup().await;
    let twin_events = retried_backlog(&twin).await;
    let before = api_usage(&twin_app);
    assert!(twin.apply(&twin_events[59..]).await[0].result.is_ok());
    let one = api_usage(&twin_app) - before;
    assert!(one > 0, "the last record is written");
    let jobs = app.sim.lock().unwrap().jobs.len();
    let upload = FaultConfig { error_rate: 1.0, ..Default::default() };
    app.faults.set("salesforce", FaultConfig { endpoints: [(UPLOAD.to_owned(), upload)].into(), ..Default::default() });
    let before = api_usage(&app);
    let v = sink.apply(&events).await;
    assert_eq!(v.len(), 60);
    for (i, v) in v.iter().enumerate() {
        assert!(v.result.is_ok(), "record {i}: {:?}", v.result);
        assert_eq!(v.outcome, Some(OutcomeStatus::Applied), "record {i}");
    }
    let calls = api_usage(&app) - before;
    assert_eq!(calls, one, "calls for the last record only");
    assert_eq!(app.sim.lock().unwrap().jobs.len(), jobs, "no Bulk job for one record");
    let ext = format!("o:{}", events[59].as_ref().unwrap().order.as_ref().unwrap().entity_id);
    let orders = records(&app, "Order");
    let order = orders.iter().find(|o| o["Elo_Id__c"] == json!(ext)).expect("the order landed");
    assert_eq!(order["Status"], json!("Activated"));
}

/// After a stop the Composite fallback of a Bulk-sized batch writes nothing: its records stay
/// transient for the next owner.
#[tokio::test]
async fn after_a_stop_a_retried_backlog_batch_sends_no_graphs() {
    let stop = tokio_util::sync::CancellationToken::new();
    let (app, url) = serve(SalesforceConfig::default()).await;
    let sink =
        sink(&url, Mapping::default().resolve().unwrap()).await.with_bulk(bulk_test_settings()).with_stop(stop.clone());
    let events = retried_backlog(&sink).await;
    let orders = records(&app, "Order").len();
    stop.cancel();
    let before = api_usage(&app);
    let v = sink.apply(&events).await;
    for (i, v) in v.iter().enumerate() {
        let error = v.result.as_ref().expect_err("stopped: not applied");
        assert_eq!((error.class, error.code.as_str()), (ErrorClass::Transient, "bulk_stopped"), "record {i}");
        assert_eq!(v.outcome, None);
    }
    assert_eq!(api_usage(&app), before, "no call after the stop");
    assert_eq!(records(&app, "Order").len(), orders, "no order written after the stop");
}
