//! The retry engine without a broker: a scripted handler that keeps a key → version store, and
//! a dead-letter sink that records (or refuses) what is parked.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

use super::*;
use crate::Error;

type Script = dyn Fn(u32, &Record) -> Result<(), HandlerError> + Send + Sync;

/// Applies a record by storing its offset as the key's version, unless the script says it
/// fails on this call.
struct Store {
    state: Mutex<HashMap<String, i64>>,
    calls: AtomicU32,
    script: Box<Script>,
    panic_on_call: Option<u32>,
    short_results: bool,
}

impl Store {
    fn new(script: impl Fn(u32, &Record) -> Result<(), HandlerError> + Send + Sync + 'static) -> Self {
        Self {
            state: Mutex::default(),
            calls: AtomicU32::new(0),
            script: Box::new(script),
            panic_on_call: None,
            short_results: false,
        }
    }
    fn version(&self, key: &str) -> Option<i64> {
        self.state.lock().unwrap().get(key).copied()
    }
}

impl Handler for Store {
    async fn handle(&self, batch: &[Record]) -> Vec<Result<(), HandlerError>> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.panic_on_call == Some(call) {
            panic!("bug in the handler");
        }
        let mut results: Vec<_> = batch
            .iter()
            .map(|r| {
                (self.script)(call, r)?;
                let key = String::from_utf8(r.key.clone().unwrap()).unwrap();
                self.state.lock().unwrap().insert(key, r.offset);
                Ok(())
            })
            .collect();
        if self.short_results {
            results.pop();
        }
        results
    }
}

#[derive(Default)]
struct FakeDlq {
    parked: Mutex<Vec<DeadLetter>>,
    /// Writes refused before one succeeds (u32::MAX: never).
    refuse: AtomicU32,
    refused: AtomicU32,
}

impl DeadLetterSink for FakeDlq {
    async fn park(&self, letter: &DeadLetter) -> crate::Result<()> {
        if self.refused.load(Ordering::SeqCst) < self.refuse.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(Error::Kafka(rdkafka::error::KafkaError::MessageProduction(
                rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
            )));
        }
        self.parked.lock().unwrap().push(letter.clone());
        Ok(())
    }
}

fn record(offset: i64, key: &str) -> Record {
    Record {
        topic: "t".into(),
        partition: 0,
        offset,
        key: Some(key.as_bytes().to_vec()),
        payload: Some(format!("{key}@{offset}").into_bytes()),
        headers: vec![("traceparent".into(), b"00-abc-def-01".to_vec())],
        timestamp_ms: Some(1_700_000_000_000 + offset),
    }
}

fn fast_policy(budget: u32) -> RetryPolicy {
    RetryPolicy { initial: Duration::from_millis(1), max: Duration::from_millis(4), transient_attempts: budget }
}

struct Env {
    permits: Semaphore,
    stop: CancellationToken,
    done: AtomicI64,
    retry: RetryPolicy,
}

impl Env {
    fn new(budget: u32) -> Self {
        Self {
            permits: Semaphore::new(1),
            stop: CancellationToken::new(),
            done: AtomicI64::new(-1),
            retry: fast_policy(budget),
        }
    }
    fn with<'a, H, D>(&'a self, handler: &'a H, dlq: &'a D) -> BatchEnv<'a, H, D> {
        BatchEnv {
            handler,
            dlq,
            retry: &self.retry,
            permits: &self.permits,
            stop: &self.stop,
            done: &self.done,
            group: "g",
        }
    }
}

fn header<'a>(letter: &'a [(String, Vec<u8>)], name: &str) -> &'a str {
    letter
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| std::str::from_utf8(v).unwrap())
        .unwrap_or_else(|| panic!("no {name}"))
}

#[tokio::test]
async fn a_transient_failure_retries_the_suffix_so_the_newest_version_wins() {
    // [A@10 transient, A@11 ok]: A@11 is applied in the first call; retrying A@10 alone would
    // leave A at version 10.
    let store =
        Store::new(
            |call, r| {
                if call == 0 && r.offset == 10 { Err(HandlerError::transient("http_503", "busy")) } else { Ok(()) }
            },
        );
    let (env, dlq) = (Env::new(5), FakeDlq::default());
    let outcome = process_batch(&env.with(&store, &dlq), vec![record(10, "A"), record(11, "A")]).await;
    assert_eq!(outcome, BatchOutcome::Finished);
    assert_eq!(store.version("A"), Some(11), "the older version must not overwrite the newer");
    assert_eq!(env.done.load(Ordering::SeqCst), 12);
    assert!(dlq.parked.lock().unwrap().is_empty());
}

#[tokio::test]
async fn transient_then_success_parks_nothing() {
    let store = Store::new(|call, _| if call < 2 { Err(HandlerError::transient("http_502", "x")) } else { Ok(()) });
    let (env, dlq) = (Env::new(5), FakeDlq::default());
    let outcome = process_batch(&env.with(&store, &dlq), vec![record(0, "A"), record(1, "B")]).await;
    assert_eq!(outcome, BatchOutcome::Finished);
    assert_eq!((store.version("A"), store.version("B")), (Some(0), Some(1)));
    assert_eq!(store.calls.load(Ordering::SeqCst), 3);
    assert!(dlq.parked.lock().unwrap().is_empty());
}

#[tokio::test]
async fn exhausted_transient_budget_parks_with_what_was_really_tried() {
    let before = super::now_ms();
    let store =
        Store::new(|_, r| if r.offset == 5 { Err(HandlerError::transient("http_503", "still down")) } else { Ok(()) });
    let (env, dlq) = (Env::new(3), FakeDlq::default());
    let outcome = process_batch(&env.with(&store, &dlq), vec![record(4, "A"), record(5, "B"), record(6, "C")]).await;
    assert_eq!(outcome, BatchOutcome::Finished);
    let parked = dlq.parked.lock().unwrap();
    assert_eq!(parked.len(), 1);
    let letter = &parked[0];
    assert_eq!(letter.record.offset, 5);
    let headers = letter.headers("g");
    assert_eq!(header(&headers, crate::dlq::ERROR_CLASS), "transient");
    assert_eq!(header(&headers, crate::dlq::ERROR_CODE), "http_503");
    assert_eq!(header(&headers, crate::dlq::ATTEMPTS), "3");
    assert_eq!(header(&headers, crate::dlq::TRANSIENT_FAILURES), "3");
    assert_eq!(header(&headers, crate::dlq::ORIGIN_TIMESTAMP_MS), "1700000000005");
    assert_eq!(header(&headers, "traceparent"), "00-abc-def-01", "original headers are kept");
    let first = header(&headers, crate::dlq::FIRST_FAILURE_MS).parse::<i64>().unwrap();
    assert!(first >= before && first <= super::now_ms());
    assert_eq!((store.version("A"), store.version("C")), (Some(4), Some(6)));
    assert_eq!(env.done.load(Ordering::SeqCst), 7);
}

#[tokio::test]
async fn first_failure_is_the_records_own_not_the_batch_start() {
    // Record 1 is fine for a while (record 0 waits on a rate limit), then fails permanently:
    // its first failure is when it failed, not when the batch began.
    let started = super::now_ms();
    let store = Store::new(|call, r| match (call, r.offset) {
        (0..=5, 0) => Err(HandlerError::new(ErrorClass::RateLimited, "429", "slow down")),
        (_, 1) if call >= 6 => Err(HandlerError::permanent("bad", "no")),
        _ => Ok(()),
    });
    let (mut env, dlq) = (Env::new(3), FakeDlq::default());
    env.retry =
        RetryPolicy { initial: Duration::from_millis(20), max: Duration::from_millis(20), transient_attempts: 3 };
    process_batch(&env.with(&store, &dlq), vec![record(0, "A"), record(1, "B")]).await;
    let parked = dlq.parked.lock().unwrap();
    assert_eq!(parked.len(), 1);
    assert!(
        parked[0].first_failure_ms >= started + 50,
        "first failure {} vs start {started}",
        parked[0].first_failure_ms
    );
    assert_eq!(parked[0].attempts, 7, "tried in every call, including the suffix retries");
}

#[tokio::test]
async fn rate_limit_and_auth_waits_never_park_nor_spend_the_transient_budget() {
    // 20 auth refusals and 20 rate-limit answers (budget 3), then two transient failures, then
    // success: a record that waited out an outage still has its whole transient budget.
    let store = Store::new(|call, _| match call {
        0..=19 => Err(HandlerError::new(ErrorClass::Auth, "INVALID_SESSION_ID", "expired")),
        20..=39 => {
            Err(HandlerError::new(ErrorClass::RateLimited, "429", "window").with_retry_after(Duration::from_millis(1)))
        }
        40..=41 => Err(HandlerError::transient("http_503", "blip")),
        _ => Ok(()),
    });
    let (env, dlq) = (Env::new(3), FakeDlq::default());
    let outcome = process_batch(&env.with(&store, &dlq), vec![record(0, "A")]).await;
    assert_eq!(outcome, BatchOutcome::Finished);
    assert!(dlq.parked.lock().unwrap().is_empty(), "waits must not park");
    assert_eq!(store.version("A"), Some(0));
    assert_eq!(store.calls.load(Ordering::SeqCst), 43);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let store = Store::new(|call, _| {
        if call == 0 {
            Err(HandlerError::new(ErrorClass::RateLimited, "429", "w").with_retry_after(Duration::from_millis(150)))
        } else {
            Ok(())
        }
    });
    let (env, dlq) = (Env::new(3), FakeDlq::default());
    let started = Instant::now();
    process_batch(&env.with(&store, &dlq), vec![record(0, "A")]).await;
    assert!(started.elapsed() >= Duration::from_millis(150), "{:?}", started.elapsed());
}

#[tokio::test]
async fn permanent_failures_park_at_once_and_the_rest_is_applied() {
    let store = Store::new(|_, r| if r.offset == 1 { Err(HandlerError::permanent("bad_data", "no")) } else { Ok(()) });
    let (env, dlq) = (Env::new(5), FakeDlq::default());
    let outcome = process_batch(&env.with(&store, &dlq), vec![record(0, "A"), record(1, "B"), record(2, "C")]).await;
    assert_eq!(outcome, BatchOutcome::Finished);
    assert_eq!(store.calls.load(Ordering::SeqCst), 1);
    let parked = dlq.parked.lock().unwrap();
    assert_eq!(parked.iter().map(|l| (l.record.offset, l.attempts)).collect::<Vec<_>>(), vec![(1, 1)]);
    assert_eq!(env.done.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn an_unwritable_dlq_holds_only_its_records_and_commits_nothing_past_them() {
    let store = Store::new(|_, r| if r.offset == 8 { Err(HandlerError::permanent("bad_data", "no")) } else { Ok(()) });
    let (env, dlq) = (Env::new(5), FakeDlq::default());
    dlq.refuse.store(u32::MAX, Ordering::SeqCst);
    let stopper = env.stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stopper.cancel();
    });
    let outcome = process_batch(&env.with(&store, &dlq), vec![record(7, "A"), record(8, "B"), record(9, "C")]).await;
    assert_eq!(outcome, BatchOutcome::Stopped);
    assert!(dlq.refused.load(Ordering::SeqCst) >= 3, "the write is retried");
    let done = env.done.load(Ordering::SeqCst);
    assert!(done <= 8, "committed past a record that was never parked: done {done}");
}

#[tokio::test]
async fn a_dlq_that_recovers_finishes_the_batch() {
    let store = Store::new(|_, r| if r.offset == 1 { Err(HandlerError::permanent("bad_data", "no")) } else { Ok(()) });
    let (env, dlq) = (Env::new(5), FakeDlq::default());
    dlq.refuse.store(3, Ordering::SeqCst);
    let outcome = process_batch(&env.with(&store, &dlq), vec![record(0, "A"), record(1, "B")]).await;
    assert_eq!(outcome, BatchOutcome::Finished);
    assert_eq!(dlq.parked.lock().unwrap().len(), 1);
    assert_eq!(env.done.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_panic_is_a_defect_and_parks_nothing() {
    let mut store = Store::new(|_, _| Ok(()));
    store.panic_on_call = Some(0);
    let (env, dlq) = (Env::new(5), FakeDlq::default());
    let outcome = process_batch(&env.with(&store, &dlq), vec![record(0, "A"), record(1, "B")]).await;
    assert!(matches!(&outcome, BatchOutcome::Defect(m) if m.contains("bug in the handler")), "{outcome:?}");
    assert!(dlq.parked.lock().unwrap().is_empty());
    assert_eq!(env.done.load(Ordering::SeqCst), -1, "nothing finished");
}

#[tokio::test]
async fn a_wrong_result_count_is_a_defect_and_parks_nothing() {
    let mut store = Store::new(|_, _| Ok(()));
    store.short_results = true;
    let (env, dlq) = (Env::new(5), FakeDlq::default());
    let outcome = process_batch(&env.with(&store, &dlq), vec![record(0, "A"), record(1, "B")]).await;
    assert!(matches!(&outcome, BatchOutcome::Defect(m) if m.contains("1 results for 2")), "{outcome:?}");
    assert!(dlq.parked.lock().unwrap().is_empty());
    assert_eq!(env.done.load(Ordering::SeqCst), -1);
}

/// Two partitions share one permit. One waits out long backoffs (or an unwritable DLQ); the
/// other must still finish quickly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_partition_does_not_hold_the_concurrency_permit() {
    for blocked_by_dlq in [false, true] {
        let slow = Store::new(move |_, _| {
            if blocked_by_dlq {
                Err(HandlerError::permanent("bad", "x"))
            } else {
                Err(HandlerError::new(ErrorClass::Auth, "401", "expired"))
            }
        });
        let fast = Store::new(|_, _| Ok(()));
        let dlq = FakeDlq::default();
        dlq.refuse.store(u32::MAX, Ordering::SeqCst);
        let permits = Semaphore::new(1);
        let stop = CancellationToken::new();
        let retry = RetryPolicy { initial: Duration::from_secs(5), max: Duration::from_secs(5), transient_attempts: 3 };
        let (slow_done, fast_done) = (AtomicI64::new(-1), AtomicI64::new(-1));
        let slow_env = BatchEnv {
            handler: &slow,
            dlq: &dlq,
            retry: &retry,
            permits: &permits,
            stop: &stop,
            done: &slow_done,
            group: "g",
        };
        let fast_env = BatchEnv {
            handler: &fast,
            dlq: &dlq,
            retry: &retry,
            permits: &permits,
            stop: &stop,
            done: &fast_done,
            group: "g",
        };
        let slow_batch = process_batch(&slow_env, vec![record(0, "S")]);
        let fast_batch = async {
            // Let the slow partition take the permit first.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let started = Instant::now();
            let outcome = process_batch(&fast_env, vec![record(0, "F")]).await;
            stop.cancel();
            (outcome, started.elapsed())
        };
        let (slow_outcome, (fast_outcome, took)) = tokio::join!(slow_batch, fast_batch);
        assert_eq!(fast_outcome, BatchOutcome::Finished);
        assert!(took < Duration::from_secs(2), "fast partition waited {took:?} (dlq case: {blocked_by_dlq})");
        assert_eq!(slow_outcome, BatchOutcome::Stopped);
        assert_eq!(slow_done.load(Ordering::SeqCst), -1);
    }
}

#[test]
fn codes_are_bounded() {
    assert_eq!(bounded_code("DUPLICATES_DETECTED"), "DUPLICATES_DETECTED");
    assert_eq!(bounded_code("a b/c{}"), "abc");
    assert_eq!(bounded_code(""), "unknown");
    assert_eq!(bounded_code(&"x".repeat(100)).len(), 40);
}

fn replay(mut r: Record, group: &str) -> Record {
    r.headers.push((crate::dlq::REPLAY_OF.into(), b"svc.dlq/0/7".to_vec()));
    r.headers.push((crate::dlq::REPLAY_FOR.into(), group.as_bytes().to_vec()));
    r
}

#[tokio::test]
async fn a_replay_for_another_group_is_skipped_and_committed_past() {
    let store = Store::new(|_, _| Ok(()));
    let (env, dlq) = (Env::new(3), FakeDlq::default());
    let batch = vec![record(0, "A"), replay(record(1, "B"), "other"), record(2, "C"), replay(record(3, "D"), "other")];
    let outcome = process_batch(&env.with(&store, &dlq), batch).await;
    assert_eq!(outcome, BatchOutcome::Finished);
    assert_eq!((store.version("A"), store.version("C")), (Some(0), Some(2)));
    assert_eq!(
        (store.version("B"), store.version("D")),
        (None, None),
        "another group's replays never reach the handler"
    );
    assert_eq!(env.done.load(Ordering::SeqCst), 4, "done moves past the skipped tail");
    assert!(dlq.parked.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_batch_of_only_foreign_replays_finishes_without_a_handler_call() {
    let store = Store::new(|_, _| Ok(()));
    let (env, dlq) = (Env::new(3), FakeDlq::default());
    let outcome = process_batch(&env.with(&store, &dlq), vec![replay(record(5, "A"), "other")]).await;
    assert_eq!(outcome, BatchOutcome::Finished);
    assert_eq!(store.calls.load(Ordering::SeqCst), 0);
    assert_eq!(env.done.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn a_replay_for_this_group_is_handled_and_a_new_failure_parks_it_again_with_its_replay_headers() {
    let store = Store::new(|_, r| if r.offset == 1 { Err(HandlerError::permanent("still_bad", "no")) } else { Ok(()) });
    let (env, dlq) = (Env::new(3), FakeDlq::default());
    let batch = vec![replay(record(0, "A"), "g"), replay(record(1, "B"), "g")];
    let outcome = process_batch(&env.with(&store, &dlq), batch).await;
    assert_eq!(outcome, BatchOutcome::Finished);
    assert_eq!(store.version("A"), Some(0), "the replay meant for us is applied");
    let parked = dlq.parked.lock().unwrap();
    assert_eq!(parked.len(), 1, "the record that fails again goes back to the DLQ");
    let headers = parked[0].headers("g");
    assert_eq!(header(&headers, crate::dlq::REPLAY_OF), "svc.dlq/0/7");
    assert_eq!(header(&headers, crate::dlq::ERROR_CODE), "still_bad");
    assert_eq!(env.done.load(Ordering::SeqCst), 2);
}

fn skipped_count(topic: &str) -> u64 {
    metrics::CONSUMED.with_label_values(&[topic, "skipped_replay"]).get()
}

fn on(topic: &str, mut r: Record) -> Record {
    r.topic = topic.into();
    r
}

#[tokio::test]
async fn a_skipped_replay_before_a_wait_is_committed_and_counted_once_the_records_before_it_are() {
    let topic = "t-skip-wait";
    let store = Store::new(|_, r| if r.offset == 2 { Err(HandlerError::transient("busy", "again")) } else { Ok(()) });
    let (env, dlq) = (Env::new(u32::MAX), FakeDlq::default());
    let batch = vec![
        on(topic, record(0, "A")),
        on(topic, replay(record(1, "R"), "other")),
        on(topic, record(2, "C")),
        on(topic, record(3, "D")),
    ];
    let batch_env = env.with(&store, &dlq);
    let run = process_batch(&batch_env, batch);
    let check = async {
        while store.calls.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(env.done.load(Ordering::SeqCst), 2, "A and the skipped replay are finished; C waits");
        assert_eq!(skipped_count(topic), 1);
        env.stop.cancel();
    };
    let (outcome, ()) = tokio::join!(run, check);
    assert_eq!(outcome, BatchOutcome::Stopped);
    assert_eq!(skipped_count(topic), 1);
}

#[tokio::test]
async fn a_skipped_replay_ahead_of_a_stopped_wait_is_neither_committed_nor_counted() {
    let topic = "t-skip-stop";
    let store = Store::new(|_, _| Err(HandlerError::new(ErrorClass::Auth, "auth", "refused")));
    let (env, dlq) = (Env::new(3), FakeDlq::default());
    let batch = vec![on(topic, replay(record(0, "R"), "other")), on(topic, record(1, "A"))];
    let batch_env = env.with(&store, &dlq);
    let run = process_batch(&batch_env, batch);
    let check = async {
        while store.calls.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        env.stop.cancel();
    };
    let (outcome, ()) = tokio::join!(run, check);
    assert_eq!(outcome, BatchOutcome::Stopped);
    assert_eq!(env.done.load(Ordering::SeqCst), -1, "nothing finished: the batch is redelivered whole");
    assert_eq!(skipped_count(topic), 0, "counted when redelivered and finished, not now");
}

#[tokio::test]
async fn a_stray_replay_for_header_without_replay_of_is_handled_not_skipped() {
    let store = Store::new(|_, _| Ok(()));
    let (env, dlq) = (Env::new(3), FakeDlq::default());
    let mut r = record(0, "A");
    r.headers.push((crate::dlq::REPLAY_FOR.into(), b"other".to_vec()));
    assert_eq!(process_batch(&env.with(&store, &dlq), vec![r]).await, BatchOutcome::Finished);
    assert_eq!(store.version("A"), Some(0));
}
