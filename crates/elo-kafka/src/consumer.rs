//! The at-least-once consumer runtime shared by the sinks and the reconciler.
//!
//! # How it works
//! A dedicated OS thread owns the librdkafka consumer and polls it. Each assigned partition
//! gets a worker task fed by a bounded channel; the worker takes batches (up to `max_batch`
//! records, one partition, in offset order), calls the [`Handler`], retries what failed by
//! error class, parks permanent failures in the DLQ, and only then advances the partition's
//! *done* offset. The poll thread commits done offsets periodically (async) and synchronously
//! on revoke and shutdown. Because a partition's records are finished strictly in order, the
//! done offset is always contiguous: nothing before it is unfinished.
//!
//! Backpressure: when a partition's channel is full the poll thread pauses that partition
//! alone and holds the one record it could not hand over. librdkafka then drops its prefetched
//! records for that partition and, on resume, fetches again from the record after the held one
//! (see librdkafka #2052), so nothing is skipped and other partitions keep flowing. The poll
//! loop never blocks on a worker, so `max.poll.interval.ms` is never exceeded by slow handlers.
//!
//! Rebalances: the revoke callback runs on the poll thread; it stops the revoked partitions'
//! workers (each finishes its current batch), waits up to `drain_timeout`, and commits their
//! done offsets synchronously before the partitions move. A worker still busy after the
//! deadline is aborted; its unfinished records are redelivered to the new owner.
//!
//! Why not rdkafka's `StreamConsumer` with `split_partition_queue`: the rebalance callbacks
//! must block while partitions drain, which is only safe on a thread that is not a tokio
//! worker; and per-partition queues lose their forwarding on every reassignment.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use elo_telemetry::Health;
use futures::FutureExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::producer::ConnectionContext;
use crate::{ErrorClass, HandlerError, KafkaArgs, Producer, Result, dlq, headers, metrics};

/// One consumed record, owned.
#[derive(Clone, Debug)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp_ms: Option<i64>,
}

impl Record {
    fn from_message(m: &BorrowedMessage<'_>) -> Self {
        Self {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers: headers::collect(m.headers()),
            timestamp_ms: m.timestamp().to_millis(),
        }
    }

    /// The first header with this name.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }
}

/// What a consumer service does with its records.
pub trait Handler: Send + Sync + 'static {
    /// Applies a batch of records of one partition, in offset order, and returns one result per
    /// record, in the same order. Must be idempotent: after a crash the same records come again.
    fn handle(&self, batch: &[Record]) -> impl Future<Output = Vec<Result<(), HandlerError>>> + Send;

    /// Called on the poll thread when a partition is assigned (rebuild per-partition state).
    fn on_assigned(&self, _topic: &str, _partition: i32) {}

    /// Called on the poll thread after a revoked partition was drained and committed.
    fn on_revoked(&self, _topic: &str, _partition: i32) {}
}

/// Retry timing.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// First backoff.
    pub initial: Duration,
    /// Backoff cap.
    pub max: Duration,
    /// Attempts for a transient failure before the record is parked in the DLQ.
    pub transient_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { initial: Duration::from_millis(200), max: Duration::from_secs(30), transient_attempts: 8 }
    }
}

impl RetryPolicy {
    /// Exponential backoff with full jitter: uniform in [base/2, base].
    pub fn backoff(&self, attempt: u32) -> Duration {
        let base = self.initial.saturating_mul(1u32 << attempt.min(16)).min(self.max);
        let half = base / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// Consumer runtime settings.
#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    pub group_id: String,
    pub topics: Vec<String>,
    /// Where records that cannot be applied are parked (never dropped).
    pub dlq_topic: String,
    /// Records per handler call (Salesforce collections take 200).
    pub max_batch: usize,
    /// How long a worker waits to fill a batch once it has one record.
    pub batch_linger: Duration,
    /// Records buffered per partition before the partition is paused.
    pub partition_buffer: usize,
    /// Handler calls running at once across all partitions.
    pub max_in_flight: usize,
    /// Periodic commit interval.
    pub commit_interval: Duration,
    /// How long revoke and shutdown wait for in-flight batches.
    pub drain_timeout: Duration,
    pub retry: RetryPolicy,
}

impl ConsumerSettings {
    /// Defaults that work locally.
    pub fn new(group_id: impl Into<String>, topics: Vec<String>, dlq_topic: impl Into<String>) -> Self {
        Self {
            group_id: group_id.into(),
            topics,
            dlq_topic: dlq_topic.into(),
            max_batch: 1,
            batch_linger: Duration::ZERO,
            partition_buffer: 5000,
            max_in_flight: 8,
            commit_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
        }
    }
}

type TopicPartition = (String, i32);

struct Worker {
    tx: mpsc::Sender<Record>,
    stop: CancellationToken,
    /// Next offset to commit (every earlier record is finished); -1 before the first one.
    done: Arc<AtomicI64>,
    /// Last offset handed to a commit request.
    sent: i64,
    /// First offset ever dispatched to this worker, to seek back to if the worker dies early.
    first_dispatched: i64,
    /// Disconnects when the worker task ends.
    finished: std::sync::mpsc::Receiver<()>,
    task: tokio::task::JoinHandle<()>,
    /// The record that found the channel full; its partition is paused until it is handed over.
    parked: Option<Record>,
    /// A record arrived while paused and was dropped: seek to just after `parked` on resume.
    seek_on_resume: bool,
}

struct Shared<H> {
    handler: Arc<H>,
    producer: Producer,
    settings: ConsumerSettings,
    permits: Arc<Semaphore>,
    runtime: tokio::runtime::Handle,
}

struct RuntimeContext<H: Handler> {
    connection: ConnectionContext,
    shared: Arc<Shared<H>>,
    workers: Mutex<HashMap<TopicPartition, Worker>>,
    health: Health,
}

impl<H: Handler> ClientContext for RuntimeContext<H> {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.connection.error(error, reason);
    }
}

impl<H: Handler> ConsumerContext for RuntimeContext<H> {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            metrics::REBALANCES.with_label_values(&["revoke"]).inc();
            let partitions: Vec<TopicPartition> =
                tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
            tracing::info!(partitions = ?partitions, "partitions revoked, draining");
            self.drain_and_commit(consumer, &partitions);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                metrics::REBALANCES.with_label_values(&["assign"]).inc();
                let mut workers = self.workers.lock().expect("workers lock");
                for e in tpl.elements() {
                    let tp = (e.topic().to_owned(), e.partition());
                    if !workers.contains_key(&tp) {
                        let worker = spawn_worker(&self.shared, &tp);
                        workers.insert(tp.clone(), worker);
                        self.shared.handler.on_assigned(&tp.0, tp.1);
                    }
                }
                update_assigned_gauge(&workers);
                tracing::info!(assigned = workers.len(), "partitions assigned");
                self.health.set_ready(crate::producer::AUTH_CHECK, true, "credentials accepted");
                self.health.set_ready("kafka_consumer", true, format!("group joined, {} partitions", workers.len()));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => {
                metrics::REBALANCES.with_label_values(&["error"]).inc();
                tracing::error!(error = %error, "rebalance failed");
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => {
                for e in offsets.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        metrics::COMMITTED_OFFSET.with_label_values(&[e.topic(), &e.partition().to_string()]).set(o);
                    }
                }
            }
            Err(error) => {
                metrics::COMMIT_ERRORS.with_label_values(&["async"]).inc();
                tracing::warn!(error = %error, "offset commit failed, will retry");
                // Force the next periodic commit to resend these partitions.
                let mut workers = self.workers.lock().expect("workers lock");
                for e in offsets.elements() {
                    if let Some(w) = workers.get_mut(&(e.topic().to_owned(), e.partition())) {
                        w.sent = -2;
                    }
                }
            }
        }
    }
}

impl<H: Handler> RuntimeContext<H> {
    /// Stops the given partitions' workers, waits for their in-flight batch (bounded by the
    /// drain timeout), and commits what they finished, synchronously.
    fn drain_and_commit(&self, consumer: &BaseConsumer<Self>, partitions: &[TopicPartition]) {
        let drained: Vec<(TopicPartition, Worker)> = {
            let mut workers = self.workers.lock().expect("workers lock");
            let drained = partitions.iter().filter_map(|tp| workers.remove(tp).map(|w| (tp.clone(), w))).collect();
            update_assigned_gauge(&workers);
            drained
        };
        if drained.is_empty() {
            return;
        }
        for (_, w) in &drained {
            w.stop.cancel();
        }
        let deadline = Instant::now() + self.shared.settings.drain_timeout;
        for ((topic, partition), w) in &drained {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = w.finished.recv_timeout(remaining) {
                tracing::warn!(
                    topic,
                    partition,
                    "partition did not drain in time; its unfinished records will be redelivered"
                );
                w.task.abort();
            }
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), w) in &drained {
            let done = w.done.load(Ordering::Acquire);
            if done >= 0 {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(done));
            }
            if w.parked.is_some() {
                // Pause flags outlive assignments in librdkafka; clear ours.
                let mut one = TopicPartitionList::new();
                one.add_partition(topic, *partition);
                let _ = consumer.resume(&one);
                metrics::PAUSED_PARTITIONS.with_label_values(&[topic]).dec();
            }
        }
        if tpl.count() > 0 {
            match consumer.commit(&tpl, CommitMode::Sync) {
                Ok(()) => {
                    for e in tpl.elements() {
                        if let Offset::Offset(o) = e.offset() {
                            metrics::COMMITTED_OFFSET
                                .with_label_values(&[e.topic(), &e.partition().to_string()])
                                .set(o);
                        }
                    }
                    tracing::info!(offsets = ?tpl_summary(&tpl), "committed after drain");
                }
                Err(error) => {
                    metrics::COMMIT_ERRORS.with_label_values(&["sync"]).inc();
                    tracing::error!(error = %error, "final commit failed; records after the last commit will be redelivered");
                }
            }
        }
        for ((topic, partition), _) in &drained {
            self.shared.handler.on_revoked(topic, *partition);
        }
    }

    /// Commits every partition whose done offset moved since the last request.
    fn commit_progress(&self, consumer: &BaseConsumer<Self>) {
        let mut tpl = TopicPartitionList::new();
        {
            let mut workers = self.workers.lock().expect("workers lock");
            for ((topic, partition), w) in workers.iter_mut() {
                let done = w.done.load(Ordering::Acquire);
                if done >= 0 && done != w.sent {
                    let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(done));
                    w.sent = done;
                }
            }
        }
        if tpl.count() > 0
            && let Err(error) = consumer.commit(&tpl, CommitMode::Async)
        {
            metrics::COMMIT_ERRORS.with_label_values(&["async"]).inc();
            tracing::warn!(error = %error, "offset commit request failed");
        }
    }

    /// Hands a record to its partition's worker, pausing the partition if the worker is full.
    fn dispatch(&self, consumer: &BaseConsumer<Self>, record: Record) {
        let tp = (record.topic.clone(), record.partition);
        let mut workers = self.workers.lock().expect("workers lock");
        let Some(worker) = workers.get_mut(&tp) else {
            // Workers exist for every assigned partition (created in the assign callback). A
            // record of a partition we no longer own belongs to its new owner: processing it
            // here could commit past what that owner has done.
            tracing::warn!(topic = %tp.0, partition = tp.1, offset = record.offset, "record for an unassigned partition ignored");
            return;
        };
        if worker.first_dispatched < 0 {
            worker.first_dispatched = record.offset;
        }
        if worker.parked.is_some() {
            // librdkafka stops delivering a paused partition, so this should not happen; if a
            // prefetched record slips through anyway, drop it and seek back on resume so it is
            // fetched again rather than skipped.
            worker.seek_on_resume = true;
            return;
        }
        match worker.tx.try_send(record) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(record)) => {
                let mut one = TopicPartitionList::new();
                one.add_partition(&tp.0, tp.1);
                if let Err(error) = consumer.pause(&one) {
                    tracing::error!(error = %error, topic = %tp.0, partition = tp.1, "pause failed");
                }
                metrics::PAUSED_PARTITIONS.with_label_values(&[&tp.0]).inc();
                worker.parked = Some(record);
            }
            Err(mpsc::error::TrySendError::Closed(record)) => {
                // The worker ended without being asked to: restart it from its last finished
                // offset, so the records it held are fetched again rather than lost.
                let restart_at = match worker.done.load(Ordering::Acquire) {
                    done if done >= 0 => done,
                    _ => worker.first_dispatched.min(record.offset),
                };
                tracing::error!(topic = %tp.0, partition = tp.1, restart_at, "partition worker died, restarting");
                let fresh = spawn_worker(&self.shared, &tp);
                let old = std::mem::replace(worker, fresh);
                worker.done.store(old.done.load(Ordering::Acquire), Ordering::Release);
                worker.first_dispatched = restart_at;
                if let Err(error) = consumer.seek(&tp.0, tp.1, Offset::Offset(restart_at), Duration::from_secs(5)) {
                    tracing::error!(error = %error, "seek after worker restart failed");
                }
            }
        }
    }

    /// Hands parked records over where there is room again, resuming their partitions.
    fn unpark(&self, consumer: &BaseConsumer<Self>) {
        let mut workers = self.workers.lock().expect("workers lock");
        for ((topic, partition), w) in workers.iter_mut() {
            // Resume only once half the buffer is free: each resume costs a fresh fetch, so
            // resuming for a single free slot would thrash.
            if w.parked.is_none() || w.tx.capacity() * 2 < w.tx.max_capacity() {
                continue;
            }
            let Some(record) = w.parked.take() else {
                continue;
            };
            let next = record.offset + 1;
            match w.tx.try_send(record) {
                Ok(()) => {
                    let mut one = TopicPartitionList::new();
                    one.add_partition(topic, *partition);
                    if let Err(error) = consumer.resume(&one) {
                        tracing::error!(error = %error, topic, partition, "resume failed");
                    }
                    if std::mem::take(&mut w.seek_on_resume)
                        && let Err(error) =
                            consumer.seek(topic, *partition, Offset::Offset(next), Duration::from_secs(5))
                    {
                        tracing::error!(error = %error, topic, partition, "seek after resume failed");
                    }
                    metrics::PAUSED_PARTITIONS.with_label_values(&[topic]).dec();
                }
                Err(mpsc::error::TrySendError::Full(record) | mpsc::error::TrySendError::Closed(record)) => {
                    w.parked = Some(record);
                }
            }
        }
    }
}

fn update_assigned_gauge(workers: &HashMap<TopicPartition, Worker>) {
    let mut per_topic: HashMap<&str, i64> = HashMap::new();
    for (topic, _) in workers.keys() {
        *per_topic.entry(topic).or_default() += 1;
    }
    metrics::ASSIGNED_PARTITIONS.reset();
    for (topic, n) in per_topic {
        metrics::ASSIGNED_PARTITIONS.with_label_values(&[topic]).set(n);
    }
}

fn tpl_summary(tpl: &TopicPartitionList) -> Vec<String> {
    tpl.elements().iter().map(|e| format!("{}/{}@{:?}", e.topic(), e.partition(), e.offset())).collect()
}

fn spawn_worker<H: Handler>(shared: &Arc<Shared<H>>, tp: &TopicPartition) -> Worker {
    let (tx, rx) = mpsc::channel(shared.settings.partition_buffer.max(1));
    let (finished_tx, finished) = std::sync::mpsc::channel::<()>();
    let stop = CancellationToken::new();
    let done = Arc::new(AtomicI64::new(-1));
    let task =
        shared.runtime.spawn(partition_worker(shared.clone(), tp.clone(), rx, stop.clone(), done.clone(), finished_tx));
    Worker { tx, stop, done, sent: -1, first_dispatched: -1, finished, task, parked: None, seek_on_resume: false }
}

/// The batch was cut short by a stop request; its records stay unfinished.
struct Stopped;

async fn partition_worker<H: Handler>(
    shared: Arc<Shared<H>>,
    (topic, partition): TopicPartition,
    mut rx: mpsc::Receiver<Record>,
    stop: CancellationToken,
    done: Arc<AtomicI64>,
    _finished: std::sync::mpsc::Sender<()>,
) {
    let settings = &shared.settings;
    loop {
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            next = rx.recv() => match next { Some(r) => r, None => break },
        };
        let mut batch = vec![first];
        let linger_until = tokio::time::Instant::now() + settings.batch_linger;
        while batch.len() < settings.max_batch {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) if settings.batch_linger.is_zero() => break,
                Err(_) => match tokio::time::timeout_at(linger_until, rx.recv()).await {
                    Ok(Some(r)) => batch.push(r),
                    _ => break,
                },
            }
        }
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            p = shared.permits.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let last = batch.last().map(|r| r.offset).expect("batch is never empty");
        let span = tracing::info_span!("consume_batch", topic = %topic, partition, first_offset = batch[0].offset, last_offset = last, size = batch.len());
        elo_telemetry::propagation::set_parent_from(&span, &headers::text_map(&batch[0].headers));
        let started = Instant::now();
        let outcome = process_batch(&shared, batch, &stop).instrument(span).await;
        drop(permit);
        metrics::BATCH_LATENCY.with_label_values(&[&topic]).observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(()) => done.store(last + 1, Ordering::Release),
            Err(Stopped) => break,
        }
    }
}

async fn process_batch<H: Handler>(
    shared: &Shared<H>,
    batch: Vec<Record>,
    stop: &CancellationToken,
) -> Result<(), Stopped> {
    let settings = &shared.settings;
    let topic = batch[0].topic.clone();
    let first_failure = now_ms();
    let mut pending: Vec<(Record, u32)> = batch.into_iter().map(|r| (r, 0)).collect();
    let mut round = 0u32;
    loop {
        let records: Vec<Record> = pending.iter().map(|(r, _)| r.clone()).collect();
        let results = match AssertUnwindSafe(shared.handler.handle(&records)).catch_unwind().await {
            Ok(results) if results.len() == records.len() => results,
            Ok(results) => {
                let msg = format!("handler returned {} results for {} records", results.len(), records.len());
                tracing::error!(%msg, "handler contract broken");
                records.iter().map(|_| Err(HandlerError::permanent("handler_contract", msg.clone()))).collect()
            }
            Err(_) => {
                tracing::error!(topic = %topic, "handler panicked; parking the batch in the DLQ");
                records.iter().map(|_| Err(HandlerError::permanent("handler_panic", "handler panicked"))).collect()
            }
        };
        let mut retry = Vec::new();
        let mut park = Vec::new();
        let mut applied = 0u64;
        let mut wait_hint = Duration::ZERO;
        let mut classes: Vec<ErrorClass> = Vec::new();
        for ((record, attempts), result) in pending.into_iter().zip(results) {
            let attempts = attempts + 1;
            match result {
                Ok(()) => applied += 1,
                Err(error) => {
                    metrics::HANDLER_ERRORS
                        .with_label_values(&[&topic, error.class.as_str(), &bounded_code(&error.code), "handle"])
                        .inc();
                    let give_up = match error.class {
                        ErrorClass::Permanent => true,
                        ErrorClass::Transient => attempts >= settings.retry.transient_attempts,
                        // Waiting is the right answer to quotas and credentials: never drop.
                        ErrorClass::RateLimited | ErrorClass::Auth => false,
                    };
                    if give_up {
                        park.push((record, attempts, error));
                    } else {
                        if let Some(after) = error.retry_after {
                            wait_hint = wait_hint.max(after);
                        }
                        if error.class == ErrorClass::Auth && round == 0 {
                            tracing::error!(topic = %topic, partition = record.partition, offset = record.offset, code = %error.code, "downstream refused credentials; holding the partition until they work again");
                        }
                        classes.push(error.class);
                        retry.push((record, attempts));
                    }
                }
            }
        }
        if applied > 0 {
            metrics::CONSUMED.with_label_values(&[&topic, "applied"]).inc_by(applied);
        }
        if !park.is_empty() {
            let parked = park.len() as u64;
            write_dead_letters(shared, park, first_failure, stop).await?;
            metrics::CONSUMED.with_label_values(&[&topic, "dead_lettered"]).inc_by(parked);
        }
        if retry.is_empty() {
            return Ok(());
        }
        let worst = classes.iter().copied().find(|c| *c == ErrorClass::Auth).unwrap_or(classes[0]);
        let delay = settings.retry.backoff(round).max(wait_hint);
        let gauge = metrics::RETRY_BLOCKED.with_label_values(&[worst.as_str()]);
        gauge.inc();
        let interrupted = tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = stop.cancelled() => true,
        };
        gauge.dec();
        if interrupted {
            return Err(Stopped);
        }
        round = round.saturating_add(1);
        pending = retry;
    }
}

async fn write_dead_letters<H: Handler>(
    shared: &Shared<H>,
    parked: Vec<(Record, u32, HandlerError)>,
    first_failure_ms: i64,
    stop: &CancellationToken,
) -> Result<(), Stopped> {
    for (record, attempts, error) in parked {
        let partition = record.partition.to_string();
        let offset = record.offset.to_string();
        let attempts_text = attempts.to_string();
        let first_failure = first_failure_ms.to_string();
        let message = dlq::truncate_message(&error.message);
        let mut pairs: Vec<(&str, &[u8])> = record.headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
        pairs.extend([
            (dlq::ERROR_CLASS, error.class.as_str().as_bytes()),
            (dlq::ERROR_CODE, error.code.as_bytes()),
            (dlq::ERROR_MESSAGE, message.as_bytes()),
            (dlq::ATTEMPTS, attempts_text.as_bytes()),
            (dlq::ORIGIN_TOPIC, record.topic.as_bytes()),
            (dlq::ORIGIN_PARTITION, partition.as_bytes()),
            (dlq::ORIGIN_OFFSET, offset.as_bytes()),
            (dlq::FIRST_FAILURE_MS, first_failure.as_bytes()),
            (dlq::GROUP, shared.settings.group_id.as_bytes()),
        ]);
        let mut attempt = 0;
        loop {
            let result = shared
                .producer
                .send_with_headers(
                    &shared.settings.dlq_topic,
                    record.key.as_deref(),
                    record.payload.as_deref(),
                    headers::to_owned_headers(pairs.iter().copied()),
                )
                .await;
            match result {
                Ok(_) => {
                    tracing::warn!(topic = %record.topic, partition = record.partition, offset = record.offset, error_type = error.class.as_str(), error_code = %error.code, attempts, "record parked in the DLQ");
                    break;
                }
                Err(e) => {
                    // The DLQ is Kafka too; a record is finished only once it is parked.
                    metrics::HANDLER_ERRORS
                        .with_label_values(&[&record.topic, "transient", e.code(), "dead_letter"])
                        .inc();
                    tracing::error!(error = %e, "DLQ write failed, retrying");
                    let delay = shared.settings.retry.backoff(attempt);
                    attempt += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => return Err(Stopped),
                    }
                }
            }
        }
    }
    Ok(())
}

/// Codes come from handlers; keep label cardinality bounded whatever they send.
fn bounded_code(code: &str) -> String {
    let clean: String = code.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(40).collect();
    if clean.is_empty() { "unknown".to_owned() } else { clean }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

/// Runs the consumer until `shutdown` is cancelled, then drains, commits and leaves the group.
///
/// The consumer uses manual commits (`enable.auto.commit=false`) so that offsets move only
/// through the done offsets above; `auto.offset.reset=earliest` so a new group starts from
/// the beginning rather than skipping what was already there.
pub async fn run_consumer<H: Handler>(
    args: &KafkaArgs,
    settings: ConsumerSettings,
    handler: Arc<H>,
    producer: Producer,
    health: Health,
    shutdown: CancellationToken,
) -> Result<()> {
    metrics::register_all();
    if settings.drain_timeout.is_zero() {
        return Err(crate::Error::Config("drain timeout must be positive".into()));
    }
    let config = args.client_config(&[
        ("group.id", settings.group_id.as_str()),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("auto.offset.reset", "earliest"),
        ("enable.partition.eof", "false"),
    ])?;
    health.set_ready("kafka_consumer", false, "joining group");
    let shared = Arc::new(Shared {
        handler,
        producer,
        permits: Arc::new(Semaphore::new(settings.max_in_flight.max(1))),
        settings: settings.clone(),
        runtime: tokio::runtime::Handle::current(),
    });
    let context = RuntimeContext {
        connection: ConnectionContext::new(health.clone(), "kafka_consumer"),
        shared,
        workers: Mutex::new(HashMap::new()),
        health: health.clone(),
    };
    let consumer: BaseConsumer<RuntimeContext<H>> = config.create_with_context(context)?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    tracing::info!(group = %settings.group_id, topics = ?settings.topics, "consumer started");

    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let commit_interval = settings.commit_interval;
    std::thread::Builder::new()
        .name(format!("elo-poll-{}", settings.group_id))
        .spawn(move || {
            poll_loop(&consumer, &shutdown, commit_interval);
            // Dropping the consumer closes it and sends LeaveGroup, so the partitions move to
            // the other members at once instead of after the session timeout. Only then may
            // the process exit: signalling before the drop let `main` return mid-close.
            let started = Instant::now();
            drop(consumer);
            tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "left the consumer group");
            let _ = done_tx.send(());
        })
        .map_err(|e| crate::Error::Config(format!("cannot start poll thread: {e}")))?;
    let _ = done_rx.await;
    health.set_ready("kafka_consumer", false, "stopped");
    tracing::info!("consumer stopped");
    Ok(())
}

fn poll_loop<H: Handler>(
    consumer: &BaseConsumer<RuntimeContext<H>>,
    shutdown: &CancellationToken,
    commit_interval: Duration,
) {
    let context = consumer.context();
    let mut last_commit = Instant::now();
    while !shutdown.is_cancelled() {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => context.dispatch(consumer, Record::from_message(&message)),
            Some(Err(error)) => {
                metrics::CLIENT_ERRORS
                    .with_label_values(&["kafka_consumer", crate::Error::Kafka(error.clone()).code()])
                    .inc();
                tracing::warn!(error = %error, "consume error");
            }
            None => {}
        }
        context.unpark(consumer);
        if last_commit.elapsed() >= commit_interval {
            context.commit_progress(consumer);
            last_commit = Instant::now();
        }
    }
    // Stop intake, let in-flight batches finish, commit what is done.
    let assigned: Vec<TopicPartition> = context.workers.lock().expect("workers lock").keys().cloned().collect();
    tracing::info!(partitions = assigned.len(), "shutting down consumer: draining");
    context.drain_and_commit(consumer, &assigned);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let policy =
            RetryPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(2), transient_attempts: 3 };
        for attempt in 0..20 {
            let d = policy.backoff(attempt);
            let base = Duration::from_millis(100).saturating_mul(1 << attempt.min(16)).min(Duration::from_secs(2));
            assert!(d >= base / 2 && d <= base, "attempt {attempt}: {d:?} not in [{:?}, {base:?}]", base / 2);
        }
    }

    #[test]
    fn codes_are_bounded() {
        assert_eq!(bounded_code("DUPLICATES_DETECTED"), "DUPLICATES_DETECTED");
        assert_eq!(bounded_code("a b/c{}"), "abc");
        assert_eq!(bounded_code(""), "unknown");
        assert_eq!(bounded_code(&"x".repeat(100)).len(), 40);
    }
}
